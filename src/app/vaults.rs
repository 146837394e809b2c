//! The operator's view of vaults: a page of them with their sizes, and one vault's figures.
//! Admin only; never a memory's text (an export goes through a key of the vault).

use std::sync::Arc;

use serde::Serialize;

use super::{blocking, App};
use crate::auth::Access;
use crate::bounds::MAX_KEYS_PAGE;
use crate::error::ApiError;
use crate::ids::{KeyId, VaultId};
use crate::store::KeyStatus;

#[derive(Debug, Serialize)]
pub struct VaultInfo {
    pub vault_id: String,
    pub created_at_ms: i64,
    pub memories: usize,
    pub pending: usize,
    pub keys: usize,
    pub active_keys: usize,
    /// An erasure is under way (finished at the next start if a crash cut it short).
    pub erasing: bool,
}

#[derive(Debug, Serialize)]
pub struct VaultPage {
    pub vaults: Vec<VaultInfo>,
    pub next_cursor: Option<String>,
}

impl App {
    /// Vaults in id order after `cursor`, at most `limit` (1 to 1000), with their figures.
    pub async fn list_vaults(
        self: &Arc<Self>,
        access: &Access,
        cursor: Option<VaultId>,
        limit: usize,
    ) -> Result<VaultPage, ApiError> {
        require_admin(access)?;
        App::check_page_limit(limit)?;
        let app = self.clone();
        blocking(move || {
            let mut vaults = app
                .store
                .vaults()
                .map_err(app.storage_error("listing vaults"))?;
            vaults.sort_by_key(|(vault, _)| vault.0);
            let mut page: Vec<_> = vaults
                .into_iter()
                .filter(|(vault, _)| cursor.is_none_or(|after| vault.0 > after.0))
                .take(limit + 1)
                .collect();
            let more = page.len() > limit;
            page.truncate(limit);
            let next_cursor = more
                .then(|| page.last().map(|(v, _)| v.to_string()))
                .flatten();
            let vaults = page
                .into_iter()
                .map(|(vault, record)| app.vault_info_blocking(vault, record))
                .collect::<Result<_, _>>()?;
            Ok(VaultPage {
                vaults,
                next_cursor,
            })
        })
        .await
    }

    /// One vault's figures.
    pub async fn vault_info(
        self: &Arc<Self>,
        access: &Access,
        vault: VaultId,
    ) -> Result<VaultInfo, ApiError> {
        require_admin(access)?;
        let app = self.clone();
        blocking(move || {
            let record = app
                .store
                .vault(vault)
                .map_err(app.storage_error("reading a vault"))?
                .ok_or_else(|| ApiError::VaultNotFound(vault.to_string()))?;
            app.vault_info_blocking(vault, record)
        })
        .await
    }

    fn vault_info_blocking(
        &self,
        vault: VaultId,
        record: crate::store::VaultRecord,
    ) -> Result<VaultInfo, ApiError> {
        let now = self.now_ms();
        let (mut keys, mut active_keys) = (0, 0);
        let mut after: Option<KeyId> = None;
        loop {
            let (page, next) = self
                .store
                .vault_keys_page(vault, after.as_ref(), MAX_KEYS_PAGE, &mut |_| true)
                .map_err(self.storage_error("listing a vault's keys"))?;
            keys += page.len();
            active_keys += page
                .iter()
                .filter(|key| key.status(now) == KeyStatus::Active)
                .count();
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        Ok(VaultInfo {
            vault_id: vault.to_string(),
            created_at_ms: record.created_at_ms,
            memories: self.store.vault_memory_count(vault),
            pending: self.store.vault_pending_count(vault),
            keys,
            active_keys,
            erasing: record.erasing,
        })
    }
}

fn require_admin(access: &Access) -> Result<(), ApiError> {
    match access {
        Access::Admin => Ok(()),
        Access::Memory(_) => Err(ApiError::AdminKeyRequired),
    }
}
