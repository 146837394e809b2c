//! The audit log: who minted, rotated, revoked, uploaded, deleted or erased what, and how it
//! ended. Written for every lifecycle operation, committed with a successful one; read by the
//! admin key. Never a secret, never memory text.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{blocking, App};
use crate::auth::Access;
use crate::error::ApiError;
use crate::ids::VaultId;
use crate::store::AuditEntry;

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
        self: &Arc<Self>,
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
            vault: audited.vault,
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
        if matches!(result, Err(ApiError::DiskFull { .. })) {
            tracing::warn!(action, "refused: the data filesystem is under its reserve");
        } else {
            let app = self.clone();
            let appended = blocking(move || {
                let max = app.config.limits.max_audit_entries;
                Ok(app.store.append_audit(&entry, max)?)
            })
            .await;
            match appended {
                Ok(()) => {}
                Err(ApiError::Internal(cause)) => {
                    tracing::error!(error = %format!("{cause:#}"), action, "appending to the audit log failed");
                }
                Err(error) => {
                    tracing::error!(error = %error, action, "appending to the audit log failed");
                }
            }
        }
        let value = result?;
        self.commit("committing an operation").await?;
        Ok(value)
    }

    /// Audit entries, oldest first, for the admin key.
    pub async fn audit_log(
        self: &Arc<Self>,
        _admin: &Access,
        cursor: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<AuditEntry>, Option<u64>), ApiError> {
        App::check_page_limit(limit)?;
        let store = self.store.clone();
        blocking(move || Ok(store.audit_page(cursor, limit)?)).await
    }
}
