//! The key lifecycle: mint, list, show, revoke, rotate; and the audit log they write to.
//!
//! The admin key manages every key. A memory key with the `admin` scope manages the keys of its
//! own vault only, and cannot mint a key with a scope it does not hold itself. Keys of other
//! vaults are invisible to it (404, as if they did not exist).

use serde_json::{Map, Value};

use super::App;
use crate::auth::{self, Access, MemoryAccess, NewKey, Scope};
use crate::error::ApiError;
use crate::store::{AuditEntry, KeyRecord, KeyStatus, VaultId, VaultRecord};

const DAY_MS: i64 = 86_400_000;
/// Longest key name accepted.
const MAX_KEY_NAME_CHARS: usize = 200;
pub const MAX_EXPIRES_DAYS: u32 = 365;
pub const MAX_GRACE_DAYS: u32 = 30;
/// Most active keys a memory key may give its vault (the admin key is not limited).
pub const MAX_KEYS_PER_VAULT: usize = 100;
/// Most keys one listing page returns.
pub const MAX_KEYS_PAGE: usize = 1000;

pub struct MintRequest {
    pub name: String,
    /// `None`: read and write.
    pub scopes: Option<Vec<Scope>>,
    pub expires_days: Option<u32>,
    /// A further key for this existing vault; `None` mints a key with a new, empty vault.
    pub vault: Option<VaultId>,
}

/// A key as listings show it: its record (never the key), its last use and its status now.
pub struct KeyInfo {
    pub record: KeyRecord,
    pub last_used_at_ms: Option<i64>,
    pub status: KeyStatus,
}

pub struct MintedKey {
    /// The full key: in this answer only, never stored, never shown again.
    pub key: String,
    pub info: KeyInfo,
}

pub struct KeyQuery {
    pub include_revoked: bool,
    pub vault: Option<VaultId>,
    pub cursor: Option<String>,
    pub limit: usize,
}

/// What an operation touched, for the audit log.
#[derive(Default)]
pub(super) struct Audited {
    pub key_id: Option<String>,
    pub vault: Option<VaultId>,
    pub detail: Map<String, Value>,
}

impl App {
    /// Appends an audit entry for an operation and counts it. A successful operation is then
    /// committed, its entry with it, so that the answer and the entry are durable together (the
    /// operation's own writes are not committed before). A refused one is not committed here:
    /// its entry becomes durable with the next commit, so refusals cannot force fsyncs.
    pub(super) async fn audit<T>(
        &self,
        access: &Access,
        action: &'static str,
        audited: Audited,
        result: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(error) => error.code(),
        };
        let entry = AuditEntry {
            at_ms: self.now_ms(),
            actor: access.actor(),
            action: action.to_owned(),
            key_id: audited.key_id,
            vault: audited.vault.map(|v| v.to_string()),
            outcome: outcome.to_owned(),
            detail: audited.detail,
        };
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .operations
            .with_label_values(&[action, label])
            .inc();
        // A write refused for want of disk space leaves no row either: the reserve is not for
        // a log of refusals.
        let refused_for_space = matches!(result, Err(ApiError::DiskFull { .. }));
        if refused_for_space {
            tracing::warn!(action, "refused: the data filesystem is under its reserve");
        } else if let Err(error) = self
            .store
            .append_audit(&entry, self.config.limits.max_audit_entries)
        {
            tracing::error!(error = %format!("{error:#}"), action, "appending to the audit log failed");
        }
        let value = result?;
        self.commit("committing an operation").await?;
        Ok(value)
    }

    /// Mints a memory key: with a new, empty vault, or (`vault`) a further key for one.
    pub async fn mint_key(
        &self,
        access: &Access,
        request: MintRequest,
    ) -> Result<MintedKey, ApiError> {
        let mut audited = Audited {
            vault: request.vault,
            ..Audited::default()
        };
        let result = self.mint_key_inner(access, request).await;
        if let Ok(minted) = &result {
            audited.key_id = Some(minted.info.record.id.clone());
            audited.vault = minted.info.record.vault_id().ok();
            audited.detail.insert(
                "scopes".into(),
                serde_json::to_value(&minted.info.record.scopes).unwrap_or_default(),
            );
        }
        self.audit(access, "mint", audited, result).await
    }

    async fn mint_key_inner(
        &self,
        access: &Access,
        request: MintRequest,
    ) -> Result<MintedKey, ApiError> {
        let name = request.name.trim();
        if name.is_empty()
            || name.chars().count() > MAX_KEY_NAME_CHARS
            || name.chars().any(char::is_control)
        {
            return Err(ApiError::invalid(format!(
                "`name` must be 1 to {MAX_KEY_NAME_CHARS} characters without control characters"
            )));
        }
        let scopes = check_scopes(request.scopes)?;
        if let Some(days) = request.expires_days {
            if !(1..=MAX_EXPIRES_DAYS).contains(&days) {
                return Err(ApiError::invalid(format!(
                    "`expires_days` must be 1 to {MAX_EXPIRES_DAYS}, got {days}"
                )));
            }
        }
        let vault = managed_vault(access, request.vault)?;
        // Rotation and revocation may use the disk reserve (a leaked key must always be
        // replaceable); a new key, and with it perhaps a new vault, may not.
        self.check_disk_room()?;
        if let Access::Memory(own) = access {
            if let Some(missing) = scopes.iter().find(|s| !own.has_scope(**s)) {
                return Err(ApiError::ScopeRequired {
                    scope: *missing,
                    reason: "a key cannot mint a key with a scope it does not hold",
                });
            }
            let active = self.store.keys_page(None, usize::MAX, |r| {
                r.vault == own.vault.to_string() && r.status(self.now_ms()) == KeyStatus::Active
            })?;
            if active.0.len() >= MAX_KEYS_PER_VAULT {
                return Err(ApiError::TooManyKeys {
                    max: MAX_KEYS_PER_VAULT,
                });
            }
        }
        let now = self.now_ms();
        let mut expires_days = request.expires_days;
        let mut expires_at_ms = expires_days.map(|days| now + i64::from(days) * DAY_MS);
        // A key minted by a memory key never outlives it.
        if let Access::Memory(MemoryAccess {
            expires_at_ms: Some(cap),
            ..
        }) = access
        {
            if expires_at_ms.is_none_or(|at| at > *cap) {
                expires_at_ms = Some(*cap);
                expires_days = None;
            }
        }
        // Writing the keyring fsyncs: off the async workers.
        let record = tokio::task::block_in_place(|| -> Result<_, ApiError> {
            let _serial = self.key_ops.lock().expect("key operations lock");
            let vault = match vault {
                Some(vault) => {
                    match self.store.vault(vault)? {
                        Some(record) if !record.removing => {}
                        _ => return Err(ApiError::VaultNotFound(vault.to_string())),
                    }
                    vault
                }
                None => {
                    let vault = VaultId::generate();
                    // The data key first: a crash before the vault record leaves only an
                    // orphan key, dropped at the next start.
                    self.keyring
                        .replace(vault)
                        .map_err(self.storage_error("writing a vault data key"))?;
                    self.store
                        .create_vault(
                            vault,
                            &VaultRecord {
                                created_at_ms: now,
                                erasing: false,
                                removing: false,
                            },
                        )
                        .map_err(self.storage_error("creating a vault"))?;
                    self.metrics.vaults.inc();
                    vault
                }
            };
            let template = KeyRecord {
                id: String::new(),
                name: name.to_owned(),
                hash: String::new(),
                vault: vault.to_string(),
                scopes,
                created_at_ms: now,
                expires_days,
                expires_at_ms,
                revoked_at_ms: None,
                deprecated_at_ms: None,
                auto_revoke_at_ms: None,
                rotated_to: None,
                rotated_from: None,
            };
            self.insert_new_key(template)
        })?;
        tracing::info!(key_id = %record.1.id, vault = %record.1.vault, "minted a memory key");
        Ok(MintedKey {
            key: record.0.full,
            info: self.info(record.1, now),
        })
    }

    /// Stores `template` under a fresh key id (another one on the unlikely clash of two
    /// 64-bit ids), with the new key's hash.
    fn insert_new_key(&self, mut template: KeyRecord) -> Result<(NewKey, KeyRecord), ApiError> {
        for _ in 0..4 {
            let key = NewKey::generate();
            template.id = key.id.clone();
            template.hash = key.hash.clone();
            if self
                .store
                .insert_key(&template)
                .map_err(self.storage_error("storing a key"))?
            {
                return Ok((key, template));
            }
        }
        Err(ApiError::Internal(anyhow::anyhow!(
            "four generated key ids were all taken"
        )))
    }

    fn info(&self, record: KeyRecord, now: i64) -> KeyInfo {
        let last_used_at_ms = self.store.key_last_used(&record.id).ok().flatten();
        KeyInfo {
            status: record.status(now),
            last_used_at_ms,
            record,
        }
    }

    /// The key record with this id, if `access` may see it.
    fn visible_key(&self, access: &Access, id: &str) -> Result<KeyRecord, ApiError> {
        let not_found = || ApiError::KeyNotFound(audited_key_id(id));
        if !is_key_id(id) {
            return Err(not_found());
        }
        let record = self.store.key(id)?.ok_or_else(not_found)?;
        match access {
            Access::Admin => Ok(record),
            Access::Memory(own) if record.vault == own.vault.to_string() => Ok(record),
            Access::Memory(_) => Err(not_found()),
        }
    }

    pub fn key_info(&self, access: &Access, id: &str) -> Result<KeyInfo, ApiError> {
        let record = self.visible_key(access, id)?;
        Ok(self.info(record, self.now_ms()))
    }

    /// A page of keys in id order. Without `include_revoked`, only keys usable now.
    pub fn list_keys(
        &self,
        access: &Access,
        query: KeyQuery,
    ) -> Result<(Vec<KeyInfo>, Option<String>), ApiError> {
        if query.limit == 0 || query.limit > MAX_KEYS_PAGE {
            return Err(ApiError::invalid(format!(
                "`limit` must be 1 to {MAX_KEYS_PAGE}"
            )));
        }
        let vault = managed_vault(access, query.vault)?.map(|v| v.to_string());
        let now = self.now_ms();
        let (records, next) =
            self.store
                .keys_page(query.cursor.as_deref(), query.limit, |record| {
                    vault.as_ref().is_none_or(|v| *v == record.vault)
                        && (query.include_revoked || record.status(now) == KeyStatus::Active)
                })?;
        let infos = records.into_iter().map(|r| self.info(r, now)).collect();
        Ok((infos, next))
    }

    /// Revokes a key now, durably. Revoking a revoked key changes nothing.
    pub async fn revoke_key(&self, access: &Access, id: &str) -> Result<(), ApiError> {
        let audited = Audited {
            key_id: Some(audited_key_id(id)),
            ..Audited::default()
        };
        let result = self.revoke_key_inner(access, id).await;
        self.audit(access, "revoke", audited, result).await
    }

    async fn revoke_key_inner(&self, access: &Access, id: &str) -> Result<(), ApiError> {
        {
            let _serial = self.key_ops.lock().expect("key operations lock");
            check_manageable(access, &self.visible_key(access, id)?)?;
            let now = self.now_ms();
            self.store
                .update_key(id, |record| {
                    record.revoked_at_ms.get_or_insert(now);
                })
                .map_err(self.storage_error("revoking a key"))?;
        }
        tracing::info!(key_id = %id, "revoked a memory key");
        Ok(())
    }

    /// Replaces a key with a new one for the same vault. The old key keeps working for
    /// `grace_days`, then stops by itself.
    pub async fn rotate_key(
        &self,
        access: &Access,
        id: &str,
        grace_days: u32,
    ) -> Result<MintedKey, ApiError> {
        let mut audited = Audited {
            key_id: Some(audited_key_id(id)),
            ..Audited::default()
        };
        audited
            .detail
            .insert("grace_days".into(), Value::from(grace_days));
        let result = self.rotate_key_inner(access, id, grace_days).await;
        if let Ok(minted) = &result {
            audited.vault = minted.info.record.vault_id().ok();
            audited.detail.insert(
                "new_key_id".into(),
                Value::from(minted.info.record.id.clone()),
            );
        }
        self.audit(access, "rotate", audited, result).await
    }

    async fn rotate_key_inner(
        &self,
        access: &Access,
        id: &str,
        grace_days: u32,
    ) -> Result<MintedKey, ApiError> {
        if grace_days > MAX_GRACE_DAYS {
            return Err(ApiError::invalid(format!(
                "`grace_days` must be 0 to {MAX_GRACE_DAYS}, got {grace_days}"
            )));
        }
        let now = self.now_ms();
        let (key, record) = {
            let _serial = self.key_ops.lock().expect("key operations lock");
            let old = self.visible_key(access, id)?;
            check_manageable(access, &old)?;
            match old.status(now) {
                KeyStatus::Active if old.rotated_to.is_none() => {}
                KeyStatus::Active => {
                    return Err(ApiError::KeyInactive(format!(
                        "key {id} was already rotated (to {}); rotate that key instead",
                        old.rotated_to.as_deref().unwrap_or("?")
                    )))
                }
                status => {
                    return Err(ApiError::KeyInactive(format!(
                        "key {id} is {} and cannot be rotated; mint a new key for its vault",
                        status_text(status)
                    )))
                }
            }
            let template = KeyRecord {
                id: String::new(),
                hash: String::new(),
                created_at_ms: now,
                // The same lifetime from now, or the same end when it was fixed by a cap.
                expires_at_ms: match old.expires_days {
                    Some(days) => Some(now + i64::from(days) * DAY_MS),
                    None => old.expires_at_ms,
                }
                .map(|at| match access {
                    Access::Memory(MemoryAccess {
                        expires_at_ms: Some(cap),
                        ..
                    }) => at.min(*cap),
                    _ => at,
                })
                .or(match access {
                    Access::Memory(own) => own.expires_at_ms,
                    Access::Admin => None,
                }),
                revoked_at_ms: None,
                deprecated_at_ms: None,
                auto_revoke_at_ms: None,
                rotated_to: None,
                rotated_from: Some(old.id.clone()),
                ..old
            };
            let (key, record) = self.insert_new_key(template)?;
            self.store
                .update_key(id, |old| {
                    old.deprecated_at_ms = Some(now);
                    old.auto_revoke_at_ms = Some(now + i64::from(grace_days) * DAY_MS);
                    old.rotated_to = Some(record.id.clone());
                })
                .map_err(self.storage_error("deprecating a rotated key"))?;
            (key, record)
        };
        tracing::info!(old_key_id = %id, key_id = %record.id, grace_days, "rotated a memory key");
        Ok(MintedKey {
            key: key.full,
            info: self.info(record, now),
        })
    }

    /// Audit entries, oldest first, for the admin key.
    pub fn audit_log(
        &self,
        _admin: &Access,
        cursor: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<AuditEntry>, Option<u64>), ApiError> {
        if limit == 0 || limit > MAX_KEYS_PAGE {
            return Err(ApiError::invalid(format!(
                "`limit` must be 1 to {MAX_KEYS_PAGE}"
            )));
        }
        Ok(self.store.audit_page(cursor, limit)?)
    }
}

/// A key id as the audit log may hold it: 16 hex digits, or a placeholder, so that a secret
/// pasted into a path never reaches the log.
fn audited_key_id(id: &str) -> String {
    if is_key_id(id) {
        id.to_owned()
    } else {
        "<invalid>".to_owned()
    }
}

fn is_key_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn status_text(status: KeyStatus) -> &'static str {
    match status {
        KeyStatus::Active => "active",
        KeyStatus::Revoked => "revoked",
        KeyStatus::Rotated => "rotated",
        KeyStatus::Expired => "expired",
    }
}

/// The vault a key-management call is about: the one asked for (any, for the admin key), or
/// for a memory key its own, which is the only one it may name.
fn managed_vault(access: &Access, asked: Option<VaultId>) -> Result<Option<VaultId>, ApiError> {
    match access {
        Access::Admin => Ok(asked),
        Access::Memory(own) => match asked {
            Some(vault) if vault != own.vault => Err(ApiError::VaultNotFound(vault.to_string())),
            _ => Ok(Some(own.vault)),
        },
    }
}

/// A memory key manages only keys whose every scope it holds itself: it can never hand itself,
/// by rotation, a key stronger than its own.
fn check_manageable(access: &Access, target: &KeyRecord) -> Result<(), ApiError> {
    if let Access::Memory(own) = access {
        if let Some(missing) = target.scopes.iter().find(|s| !own.has_scope(**s)) {
            return Err(ApiError::ScopeRequired {
                scope: *missing,
                reason: "a key cannot manage a key with a scope it does not hold",
            });
        }
    }
    Ok(())
}

/// The scopes asked for, checked: at least one, no repeats; read and write when not given.
fn check_scopes(scopes: Option<Vec<Scope>>) -> Result<Vec<Scope>, ApiError> {
    let Some(mut scopes) = scopes else {
        return Ok(Scope::DEFAULT.to_vec());
    };
    if scopes.is_empty() {
        return Err(ApiError::invalid(
            "`scopes` must name at least one of read, write, delete, admin",
        ));
    }
    scopes.sort();
    scopes.dedup();
    Ok(scopes)
}

/// The public part of a key, for listings.
pub fn key_prefix(record: &KeyRecord) -> String {
    auth::key_prefix(&record.id)
}
