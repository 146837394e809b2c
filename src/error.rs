//! The request-path error: one enum, one exhaustive table of stable codes and HTTP statuses.
//!
//! Codes are snake_case strings that clients may match on; they never change meaning. Internal
//! failures get a generic message on the wire and are logged once, where they are turned into a
//! response.

use std::fmt;

use crate::ids::Scope;

/// Everything a request can fail with. The message is for humans; the code is for programs.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error(
        "no memory key: send it as `Authorization: Bearer mk_...`, `X-Memory-Key` or `x-api-key`"
    )]
    MissingKey,
    #[error("the key is malformed or its checksum does not match; check it was copied whole")]
    InvalidKey,
    #[error("the key is not known to this daemon")]
    UnknownKey,
    #[error("the key was revoked")]
    KeyRevoked,
    #[error("the key was rotated and its grace period is over; use the key that replaced it")]
    KeyRotated,
    #[error("the key has expired")]
    KeyExpired,
    #[error("this call needs the `{}` scope, and {reason}", scope.as_str())]
    ScopeRequired { scope: Scope, reason: &'static str },
    #[error("no key with id {0:?} (among the keys this credential may see)")]
    KeyNotFound(String),
    #[error("no memory {0} in this vault")]
    MemoryNotFound(String),
    #[error("no vault {0}")]
    VaultNotFound(String),
    #[error("memory {id} was superseded by {by}: correct that one instead")]
    MemorySuperseded { id: String, by: String },
    #[error("{0}")]
    KeyInactive(String),
    #[error("the vault already has {max} active keys; revoke some first")]
    TooManyKeys { max: usize },
    #[error("a memory key mints keys only for its own vault: name it in `vault_id`. To give a new user a vault of their own, mint with the admin key")]
    VaultIdRequired,
    #[error("the vault holds {count} memories and may hold at most {max}; delete some, or ask the operator to raise --max-vault-memories")]
    VaultFull { count: usize, max: usize },
    #[error("this key is over its request rate; retry in {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    #[error("too many failed authentications from this address; retry in {retry_after_s} s")]
    AuthRateLimited { retry_after_s: u64 },
    #[error("the data directory's filesystem has {free_mb} MiB free, under the {min_mb} MiB kept in reserve (--min-free-mb); nothing was stored. Free some space; reads, deletes and revocations still work")]
    DiskFull { free_mb: u64, min_mb: u64 },
    #[error("{count} lines in one upload; the maximum is {max}")]
    TooManyLines { count: usize, max: usize },
    #[error("this route needs the admin key")]
    InvalidAdminKey,
    #[error("this route needs the admin key, not a memory key")]
    AdminKeyRequired,
    #[error("this route needs a memory key (mk_...), not the admin key")]
    MemoryKeyRequired,
    #[error("no such route: {0}")]
    NotFound(String),
    #[error("method {method} is not allowed on {path}; allowed: {allowed}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("request body is larger than {max_bytes} bytes")]
    BodyTooLarge { max_bytes: usize },
    #[error("{count} messages in one request; the maximum is {max}")]
    TooManyMessages { count: usize, max: usize },
    #[error("message {index} has {chars} characters, {passages} passages to store; a stored message may have at most {max} passages (--max-passages-per-message)")]
    MessageTooLong {
        index: usize,
        chars: usize,
        passages: usize,
        max: usize,
    },
    #[error("content type must be {expected}, got {got:?}")]
    UnsupportedMediaType { expected: &'static str, got: String },
    #[error("the daemon is at its limit of {0}; retry shortly")]
    Overloaded(&'static str),
    #[error("the daemon is starting (loading the model or replaying un-indexed memories); retry shortly")]
    NotReady,
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("the store could not make the write durable, so nothing was acknowledged; retry later. After a failed flush or fsync writes stay refused until the daemon is restarted: see /readyz and its log")]
    StorageUnavailable,
    #[error("the store failed a write earlier and cannot serve this request from what it can still read; restart the daemon once the disk is fixed: see /readyz and its log")]
    StorageUnreadable,
    #[error("the database is unavailable ({0}); retry in a moment: a write answered with this was not acknowledged")]
    DatabaseUnavailable(String),
    #[error("the backup could not be written: {0}")]
    BackupFailed(String),
    #[error("the request took longer than {0} ms")]
    Timeout(u64),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// HTTP status, as a plain number so this module needs no HTTP crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u16);

impl ApiError {
    /// The one table: stable code and HTTP status for every variant. No `_` arm, on purpose.
    pub fn code_and_status(&self) -> (&'static str, Status) {
        use ApiError::*;
        let (code, status) = match self {
            InvalidJson(_) => ("invalid_json", 400),
            InvalidRequest(_) => ("invalid_request", 400),
            MissingKey => ("missing_key", 401),
            InvalidKey => ("invalid_key", 401),
            UnknownKey => ("unknown_key", 401),
            KeyRevoked => ("key_revoked", 401),
            KeyRotated => ("key_rotated", 401),
            KeyExpired => ("key_expired", 401),
            ScopeRequired { scope, .. } => (
                match scope {
                    Scope::Read => "read_scope_required",
                    Scope::Write => "write_scope_required",
                    Scope::Delete => "delete_scope_required",
                    Scope::Admin => "admin_scope_required",
                },
                403,
            ),
            KeyNotFound(_) => ("key_not_found", 404),
            MemoryNotFound(_) => ("memory_not_found", 404),
            VaultNotFound(_) => ("vault_not_found", 404),
            MemorySuperseded { .. } => ("memory_superseded", 409),
            KeyInactive(_) => ("key_inactive", 409),
            TooManyKeys { .. } => ("too_many_keys", 409),
            VaultIdRequired => ("vault_id_required", 400),
            VaultFull { .. } => ("vault_full", 409),
            RateLimited { .. } => ("rate_limited", 429),
            AuthRateLimited { .. } => ("auth_rate_limited", 429),
            DiskFull { .. } => ("disk_full", 503),
            TooManyLines { .. } => ("too_many_lines", 413),
            InvalidAdminKey => ("invalid_admin_key", 401),
            AdminKeyRequired => ("admin_key_required", 403),
            MemoryKeyRequired => ("memory_key_required", 403),
            NotFound(_) => ("not_found", 404),
            MethodNotAllowed { .. } => ("method_not_allowed", 405),
            BodyTooLarge { .. } => ("body_too_large", 413),
            TooManyMessages { .. } => ("too_many_messages", 413),
            MessageTooLong { .. } => ("message_too_long", 413),
            UnsupportedMediaType { .. } => ("unsupported_media_type", 415),
            Overloaded(_) => ("overloaded", 429),
            NotReady => ("not_ready", 503),
            ShuttingDown => ("shutting_down", 503),
            StorageUnavailable | StorageUnreadable | DatabaseUnavailable(_) => {
                ("storage_unavailable", 503)
            }
            Timeout(_) => ("timeout", 503),
            BackupFailed(_) => ("backup_failed", 500),
            Internal(_) => ("internal", 500),
        };
        (code, Status(status))
    }

    pub fn code(&self) -> &'static str {
        self.code_and_status().0
    }

    pub fn status(&self) -> Status {
        self.code_and_status().1
    }

    pub fn invalid(message: impl fmt::Display) -> Self {
        ApiError::InvalidRequest(message.to_string())
    }
}

/// A store's failure to reach its database (a connection lost, a server restarting or failing
/// over, a pool exhausted): passing, unlike a disk's, so it is answered 503 with `Retry-After`
/// and never makes the store unhealthy. Carried inside an `anyhow::Error`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DatabaseUnavailable(pub String);

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        match error
            .chain()
            .find_map(|cause| cause.downcast_ref::<DatabaseUnavailable>())
        {
            Some(away) => ApiError::DatabaseUnavailable(away.0.clone()),
            None => ApiError::Internal(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_statuses_are_errors() {
        let samples = [
            ApiError::InvalidJson("x".into()),
            ApiError::MissingKey,
            ApiError::Overloaded("connections"),
            ApiError::Internal(anyhow::anyhow!("boom")),
        ];
        for error in samples {
            let (code, status) = error.code_and_status();
            assert!(code.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            assert!((400..600).contains(&status.0));
        }
    }

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let error = ApiError::Internal(anyhow::anyhow!("secret path /etc/x"));
        assert_eq!(error.to_string(), "internal error");
    }
}
