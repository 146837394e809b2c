//! The key lifecycle: mint, list, show, revoke, rotate.
//!
//! The admin key manages every key. A memory key with the `admin` scope manages the keys of its
//! own vault only, and cannot mint a key with a scope it does not hold itself. Keys of other
//! vaults are invisible to it (404, as if they did not exist). Every change is made under the
//! key lock (`App::key_ops`), in a blocking task, and committed with its audit entry.

use std::sync::Arc;

use serde_json::Value;

use super::audit::Audited;
use super::{blocking, App};
use crate::auth::{self, Access, MemoryAccess, NewKey};
use crate::bounds::{MAX_EXPIRES_DAYS, MAX_GRACE_DAYS, MAX_KEYS_PER_VAULT, MAX_KEY_NAME_CHARS};
use crate::error::ApiError;
use crate::ids::{KeyId, Scope, VaultId};
use crate::store::{KeyRecord, KeyStatus};
use crate::tombstones::Tombstone;

const DAY_MS: i64 = 86_400_000;

/// A key's name when the request gives none (as MemoryRouter names it).
pub const DEFAULT_KEY_NAME: &str = "New Key";

pub struct MintRequest {
    /// `None`: [`DEFAULT_KEY_NAME`].
    pub name: Option<String>,
    /// `None`: `--default-scopes` (those of them a minting memory key holds).
    pub scopes: Option<Vec<Scope>>,
    /// Requests with a session see only that session's memories, unless they say otherwise.
    pub session_isolation: bool,
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
    pub cursor: Option<KeyId>,
    pub limit: usize,
}

impl App {
    /// Mints a memory key: with a new, empty vault, or (`vault`) a further key for one.
    pub async fn mint_key(
        self: &Arc<Self>,
        access: &Access,
        request: MintRequest,
    ) -> Result<MintedKey, ApiError> {
        let mut audited = Audited {
            vault: request.vault,
            ..Audited::default()
        };
        let result = self.mint_key_inner(access, request).await;
        if let Ok(minted) = &result {
            audited.key_id = Some(minted.info.record.id.to_string());
            audited.vault = Some(minted.info.record.vault);
            audited.detail.insert(
                "scopes".into(),
                serde_json::to_value(&minted.info.record.scopes).unwrap_or_default(),
            );
        }
        self.audit(access, "mint", audited, result).await
    }

    async fn mint_key_inner(
        self: &Arc<Self>,
        access: &Access,
        request: MintRequest,
    ) -> Result<MintedKey, ApiError> {
        let name = request.name.as_deref().unwrap_or(DEFAULT_KEY_NAME).trim();
        if name.is_empty()
            || name.chars().count() > MAX_KEY_NAME_CHARS
            || name.chars().any(char::is_control)
        {
            return Err(ApiError::invalid(format!(
                "`name` must be 1 to {MAX_KEY_NAME_CHARS} characters without control characters"
            )));
        }
        let scopes = check_scopes(request.scopes, &self.config.limits.default_scopes, access)?;
        if let Some(days) = request.expires_days {
            if !(1..=MAX_EXPIRES_DAYS).contains(&days) {
                return Err(ApiError::invalid(format!(
                    "`expires_days` must be 1 to {MAX_EXPIRES_DAYS}, got {days}"
                )));
            }
        }
        let asked_vault = request.vault;
        let vault = managed_vault(access, request.vault)?;
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
        let name = name.to_owned();
        let (app, access) = (self.clone(), access.clone());
        let record = blocking(move || {
            // Rotation and revocation may use the disk reserve (a leaked key must always be
            // replaceable); a new key, and with it perhaps a new vault, may not.
            app.check_disk_room()?;
            if let Access::Memory(own) = &access {
                if let Some(missing) = scopes.iter().find(|s| !own.has_scope(**s)) {
                    return Err(ApiError::ScopeRequired {
                        scope: *missing,
                        reason: "a key cannot mint a key with a scope it does not hold",
                    });
                }
                // Its own vault only, and said so: a memory key minting "a key for a new
                // user" would otherwise put every user in its one vault.
                if asked_vault.is_none() {
                    return Err(ApiError::VaultIdRequired);
                }
            }
            let _serial = app.key_ops.lock().expect("key operations lock");
            if let Access::Memory(own) = &access {
                // Counted under the key lock, from the vault's own keys: two mints at once
                // cannot both pass the limit.
                let (active, _) =
                    app.store
                        .vault_keys_page(own.vault, None, MAX_KEYS_PER_VAULT, &mut |r| {
                            r.status(now) == KeyStatus::Active
                        })?;
                if active.len() >= MAX_KEYS_PER_VAULT {
                    return Err(ApiError::TooManyKeys {
                        max: MAX_KEYS_PER_VAULT,
                    });
                }
            }
            let vault = match vault {
                Some(vault) => {
                    app.check_vault_takes_keys(vault)?;
                    vault
                }
                None => {
                    let vault = app
                        .store
                        .create_vault(now)
                        .map_err(app.storage_error("creating a vault"))?;
                    app.metrics.vaults.inc();
                    vault
                }
            };
            let template = KeyRecord {
                id: KeyId::generate(),
                name,
                hash: String::new(),
                vault,
                scopes,
                created_at_ms: now,
                expires_days,
                expires_at_ms,
                revoked_at_ms: None,
                deprecated_at_ms: None,
                auto_revoke_at_ms: None,
                rotated_to: None,
                rotated_from: None,
                session_isolation: request.session_isolation,
            };
            let (key, record) = app.insert_new_key(template)?;
            Ok((key, app.info(record, now)))
        })
        .await?;
        tracing::info!(key_id = %record.1.record.id, vault = %record.1.record.vault, "minted a memory key");
        Ok(MintedKey {
            key: record.0.full,
            info: record.1,
        })
    }

    /// Refuses a key for a vault that does not exist or is being removed. Under the key lock.
    fn check_vault_takes_keys(&self, vault: VaultId) -> Result<(), ApiError> {
        match self.store.vault(vault)? {
            Some(record) if !record.removing => Ok(()),
            _ => Err(ApiError::VaultNotFound(vault.to_string())),
        }
    }

    /// Stores `template` under a fresh key id (another one on the unlikely clash of two
    /// 64-bit ids), with the new key's hash. Blocking, under the key lock.
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

    /// A key as listings show it. Blocking (its last use is read from the store).
    fn info(&self, record: KeyRecord, now: i64) -> KeyInfo {
        let last_used_at_ms = self.store.key_last_used(&record.id).ok().flatten();
        KeyInfo {
            status: record.status(now),
            last_used_at_ms,
            record,
        }
    }

    /// The key record with this id, if `access` may see it. Blocking.
    fn visible_key(&self, access: &Access, id: &str) -> Result<KeyRecord, ApiError> {
        let not_found = || ApiError::KeyNotFound(audited_key_id(id));
        let id: KeyId = id.parse().map_err(|_| not_found())?;
        let record = self.store.key(&id)?.ok_or_else(not_found)?;
        match access {
            Access::Admin => Ok(record),
            Access::Memory(own) if record.vault == own.vault => Ok(record),
            Access::Memory(_) => Err(not_found()),
        }
    }

    pub async fn key_info(
        self: &Arc<Self>,
        access: &Access,
        id: &str,
    ) -> Result<KeyInfo, ApiError> {
        let (app, access, id) = (self.clone(), access.clone(), id.to_owned());
        blocking(move || {
            let record = app.visible_key(&access, &id)?;
            Ok(app.info(record, app.now_ms()))
        })
        .await
    }

    /// A page of keys in id order. Without `include_revoked`, only keys usable now.
    pub async fn list_keys(
        self: &Arc<Self>,
        access: &Access,
        query: KeyQuery,
    ) -> Result<(Vec<KeyInfo>, Option<KeyId>), ApiError> {
        App::check_page_limit(query.limit)?;
        let vault = managed_vault(access, query.vault)?;
        let app = self.clone();
        blocking(move || {
            let now = app.now_ms();
            let mut keep = |record: &KeyRecord| {
                query.include_revoked || record.status(now) == KeyStatus::Active
            };
            let cursor = query.cursor.as_ref();
            let (records, next) = match vault {
                Some(vault) => app
                    .store
                    .vault_keys_page(vault, cursor, query.limit, &mut keep)?,
                None => app.store.keys_page(cursor, query.limit, &mut keep)?,
            };
            let infos = records.into_iter().map(|r| app.info(r, now)).collect();
            Ok((infos, next))
        })
        .await
    }

    /// Revokes a key now, durably. Revoking a revoked key changes nothing.
    pub async fn revoke_key(self: &Arc<Self>, access: &Access, id: &str) -> Result<(), ApiError> {
        let audited = Audited {
            key_id: Some(audited_key_id(id)),
            ..Audited::default()
        };
        let result = self.revoke_key_inner(access, id).await;
        self.audit(access, "revoke", audited, result).await
    }

    async fn revoke_key_inner(self: &Arc<Self>, access: &Access, id: &str) -> Result<(), ApiError> {
        let (app, access, id) = (self.clone(), access.clone(), id.to_owned());
        let revoked = blocking(move || {
            let _serial = app.key_ops.lock().expect("key operations lock");
            let record = app.visible_key(&access, &id)?;
            check_manageable(&access, &record)?;
            let now = app.now_ms();
            let _held = app.store.hold_writes();
            app.tombstone(Tombstone::KeyRevoked {
                key: record.id.to_string(),
                effective_at_ms: record.revoked_at_ms.unwrap_or(now),
            })?;
            app.store
                .update_key(&record.id, &mut |record| {
                    record.revoked_at_ms.get_or_insert(now);
                })
                .map_err(app.storage_error("revoking a key"))?;
            Ok(record.id)
        })
        .await?;
        tracing::info!(key_id = %revoked, "revoked a memory key");
        Ok(())
    }

    /// Replaces a key with a new one for the same vault. The old key keeps working for
    /// `grace_days`, then stops by itself.
    pub async fn rotate_key(
        self: &Arc<Self>,
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
            audited.vault = Some(minted.info.record.vault);
            audited.detail.insert(
                "new_key_id".into(),
                Value::from(minted.info.record.id.to_string()),
            );
        }
        self.audit(access, "rotate", audited, result).await
    }

    async fn rotate_key_inner(
        self: &Arc<Self>,
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
        let (app, access, id) = (self.clone(), access.clone(), id.to_owned());
        let (old_id, key, info) = blocking(move || {
            let access = &access;
            let _serial = app.key_ops.lock().expect("key operations lock");
            let old = app.visible_key(access, &id)?;
            check_manageable(access, &old)?;
            match old.status(now) {
                KeyStatus::Active if old.rotated_to.is_none() => {}
                KeyStatus::Active => {
                    return Err(ApiError::KeyInactive(format!(
                        "key {id} was already rotated (to {}); rotate that key instead",
                        old.rotated_to.as_ref().map_or("?", KeyId::as_str)
                    )))
                }
                status => {
                    return Err(ApiError::KeyInactive(format!(
                        "key {id} is {} and cannot be rotated; mint a new key for its vault",
                        status.as_str()
                    )))
                }
            }
            // A vault being removed takes no new key, by rotation either.
            app.check_vault_takes_keys(old.vault)?;
            let template = KeyRecord {
                id: KeyId::generate(),
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
            let old_id = old.id.clone();
            let _held = app.store.hold_writes();
            app.tombstone(Tombstone::KeyRevoked {
                key: old_id.to_string(),
                effective_at_ms: now + i64::from(grace_days) * DAY_MS,
            })?;
            let (key, record) = app.insert_new_key(template)?;
            app.store
                .update_key(&old_id, &mut |old| {
                    old.deprecated_at_ms = Some(now);
                    old.auto_revoke_at_ms = Some(now + i64::from(grace_days) * DAY_MS);
                    old.rotated_to = Some(record.id.clone());
                })
                .map_err(app.storage_error("deprecating a rotated key"))?;
            Ok((old_id, key, app.info(record, now)))
        })
        .await?;
        tracing::info!(old_key_id = %old_id, key_id = %info.record.id, grace_days, "rotated a memory key");
        Ok(MintedKey {
            key: key.full,
            info,
        })
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
    KeyId::is_valid(id)
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

/// The scopes asked for, checked: at least one, no repeats. Not given: the configured
/// defaults, or for a memory key those of them it holds.
fn check_scopes(
    scopes: Option<Vec<Scope>>,
    defaults: &[Scope],
    access: &Access,
) -> Result<Vec<Scope>, ApiError> {
    let mut scopes = match scopes {
        Some(scopes) => scopes,
        None => match access {
            Access::Admin => defaults.to_vec(),
            Access::Memory(own) => defaults
                .iter()
                .copied()
                .filter(|s| own.has_scope(*s))
                .collect(),
        },
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
