//! Authentication: a credential in, a capability ([`Access`], [`MemoryAccess`]) or the reason
//! for none out. The key format and the constant-time checks are `crate::auth`'s; here the key
//! is looked up, its state checked, its rate spent and failures counted per address.

use std::net::IpAddr;
use std::sync::Arc;

use super::{blocking, App};
use crate::auth::{self, Access, MemoryAccess, PresentedKey};
use crate::error::ApiError;
use crate::ids::Scope;
use crate::store::KeyStatus;

/// Compared against when a key id is unknown, so that a miss costs what a hit costs.
const UNKNOWN_KEY_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Whether an authentication takes a request from the key's budget.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Spend {
    Yes,
    /// Only to say which error applies (the admin routes): the key's budget is left alone.
    No,
}

impl App {
    /// A memory key's capability, or why there is none. Counts against the key's rate.
    pub async fn memory_access(
        self: &Arc<Self>,
        credential: Option<&str>,
    ) -> Result<MemoryAccess, ApiError> {
        let credential = credential.ok_or(ApiError::MissingKey)?;
        if !credential.starts_with(auth::KEY_PREFIX) {
            return Err(if self.admin.matches(credential) {
                ApiError::MemoryKeyRequired
            } else {
                ApiError::InvalidKey
            });
        }
        self.verify_memory_key(credential, Spend::Yes).await
    }

    /// The capability to manage keys: the admin key, or a memory key with the `admin` scope
    /// (which manages its own vault's keys only).
    pub async fn key_manager(
        self: &Arc<Self>,
        credential: Option<&str>,
    ) -> Result<Access, ApiError> {
        let credential = credential.ok_or(ApiError::MissingKey)?;
        if self.admin.matches(credential) {
            crate::caller::note("admin", None);
            return Ok(Access::Admin);
        }
        if credential.starts_with(auth::KEY_PREFIX) {
            let access = self.verify_memory_key(credential, Spend::Yes).await?;
            access.require(Scope::Admin)?;
            if access.deprecated {
                return Err(ApiError::ScopeRequired {
                    scope: Scope::Admin,
                    reason: "a rotated key keeps only reading and writing during its grace period",
                });
            }
            return Ok(Access::Memory(access));
        }
        Err(ApiError::InvalidAdminKey)
    }

    /// The operator's capability (the audit log, erasing a vault by id), or why there is none.
    /// A valid memory key is told it is the wrong kind, without spending its budget.
    pub async fn admin_access(
        self: &Arc<Self>,
        credential: Option<&str>,
    ) -> Result<Access, ApiError> {
        let credential = credential.ok_or(ApiError::MissingKey)?;
        if self.admin.matches(credential) {
            crate::caller::note("admin", None);
            return Ok(Access::Admin);
        }
        if credential.starts_with(auth::KEY_PREFIX)
            && self.verify_memory_key(credential, Spend::No).await.is_ok()
        {
            return Err(ApiError::AdminKeyRequired);
        }
        Err(ApiError::InvalidAdminKey)
    }

    /// A request's error, after counting a failed authentication against its address: once
    /// the address has spent its budget, the failure is answered 429 `auth_rate_limited`
    /// instead. Keys that were right but revoked, rotated or expired are not guesses and are
    /// not counted; a valid key is never refused here (see `crate::throttle`).
    pub fn count_auth_failure(&self, address: IpAddr, error: ApiError) -> ApiError {
        if !matches!(
            error,
            ApiError::InvalidKey | ApiError::UnknownKey | ApiError::InvalidAdminKey
        ) {
            return error;
        }
        self.metrics
            .auth_failures
            .with_label_values(&[error.code()])
            .inc();
        match self.auth_failures.record_failure(address, self.now_ms()) {
            Ok(()) => error,
            Err(retry_after_s) => ApiError::AuthRateLimited { retry_after_s },
        }
    }

    /// Checks a memory key (`mk_...[:mode]`) against its record: format and checksum, then the
    /// record by id, the secret's hash in constant time, and the key's state now.
    async fn verify_memory_key(
        self: &Arc<Self>,
        credential: &str,
        spend: Spend,
    ) -> Result<MemoryAccess, ApiError> {
        let presented = PresentedKey::parse(credential)?;
        let app = self.clone();
        let access = blocking(move || app.verify_presented(presented, spend)).await?;
        crate::caller::note(access.key_id.as_str(), Some(access.vault.to_string()));
        if spend == Spend::Yes {
            self.metrics
                .key_mode
                .with_label_values(&[access.mode.label()])
                .inc();
        }
        Ok(access)
    }

    /// The blocking half of [`App::verify_memory_key`]: the store lookup, and the last-use
    /// write when it is due.
    fn verify_presented(
        &self,
        presented: PresentedKey,
        spend: Spend,
    ) -> Result<MemoryAccess, ApiError> {
        let hash = presented.hash();
        // A wrong secret for a real id answers exactly as an id never minted, and as fast: an
        // unknown id is hashed and compared too.
        let Some(record) = self.store.key(&presented.id)? else {
            let _ = auth::hashes_match(UNKNOWN_KEY_HASH, &hash);
            return Err(ApiError::UnknownKey);
        };
        if !auth::hashes_match(&record.hash, &hash) {
            return Err(ApiError::UnknownKey);
        }
        let now = self.now_ms();
        match record.status(now) {
            KeyStatus::Active => {}
            KeyStatus::Revoked => return Err(ApiError::KeyRevoked),
            KeyStatus::Rotated => return Err(ApiError::KeyRotated),
            KeyStatus::Expired => return Err(ApiError::KeyExpired),
        }
        if spend == Spend::Yes {
            let touch = self
                .key_throttle
                .spend(&record.id, now)
                .map_err(|retry_after_s| ApiError::RateLimited { retry_after_s })?;
            if touch {
                if let Err(error) = self.store.touch_key(&record.id, now) {
                    tracing::warn!(error = %format!("{error:#}"), "recording a key's last use failed");
                }
            }
        }
        Ok(MemoryAccess {
            session_isolation: record.session_isolation,
            deprecated: record.deprecated_at_ms.is_some(),
            expires_at_ms: record.expires_at_ms,
            key_id: record.id,
            vault: record.vault,
            scopes: record.scopes,
            mode: presented.mode,
        })
    }
}
