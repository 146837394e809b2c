//! Deletion and erasure: one memory, one session, a vault's whole contents, or the vault itself.
//!
//! Erasure is cryptographic as well as logical: the backend destroys the vault's data key
//! before it removes any row ([`crate::store::Vaults::erase_vault`]), so whatever the store's
//! old files still hold of the rows can no longer be opened. The erasure is marked in the vault
//! record first, durably, and one cut short by a crash is finished at the next start.

use std::sync::Arc;

use serde_json::Value;

use super::audit::Audited;
use super::{blocking, App};
use crate::auth::{Access, MemoryAccess};
use crate::crypto::VaultCipher;
use crate::error::ApiError;
use crate::ids::{MemoryId, Scope, VaultId};
use crate::tombstones::{Tombstone, MAX_IDS_PER_ENTRY};

impl App {
    /// Deletes one memory of the key's vault.
    pub async fn delete_memory(
        self: &Arc<Self>,
        access: &MemoryAccess,
        id: &str,
    ) -> Result<(), ApiError> {
        let audited = Audited {
            vault: Some(access.vault),
            ..Audited::default()
        };
        let result = self.delete_memory_inner(access, id).await;
        self.audit(
            &Access::Memory(access.clone()),
            "delete_memory",
            audited,
            result,
        )
        .await
    }

    async fn delete_memory_inner(
        self: &Arc<Self>,
        access: &MemoryAccess,
        id: &str,
    ) -> Result<(), ApiError> {
        access.require(Scope::Delete)?;
        let not_found = || ApiError::MemoryNotFound(id.chars().take(64).collect());
        let memory: MemoryId = id.parse().map_err(|_| not_found())?;
        let deleted = self
            .delete_where(access.vault, Some(vec![memory]), None)
            .await?;
        if deleted == 0 {
            return Err(not_found());
        }
        Ok(())
    }

    /// Deletes every memory of one session of the key's vault. Returns how many there were.
    pub async fn delete_session(
        self: &Arc<Self>,
        access: &MemoryAccess,
        session: &str,
    ) -> Result<usize, ApiError> {
        let mut audited = Audited {
            vault: Some(access.vault),
            ..Audited::default()
        };
        let result = async {
            access.require(Scope::Delete)?;
            self.delete_where(access.vault, None, Some(session.to_owned()))
                .await
        }
        .await;
        if let Ok(count) = &result {
            audited.detail.insert("deleted".into(), Value::from(*count));
        }
        self.audit(
            &Access::Memory(access.clone()),
            "delete_session",
            audited,
            result,
        )
        .await
    }

    /// Deletes the given memories, or those of a session, under the vault's exclusive lock.
    /// The caller commits (with the audit entry).
    async fn delete_where(
        self: &Arc<Self>,
        vault: VaultId,
        ids: Option<Vec<MemoryId>>,
        session: Option<String>,
    ) -> Result<usize, ApiError> {
        let lock = self.locks.of(vault);
        let exclusive = lock.write_owned().await;
        let cipher = self.cipher(vault)?;
        let app = self.clone();
        blocking(move || {
            let _exclusive = exclusive;
            app.delete_locked(vault, &cipher, ids, session.as_deref())
        })
        .await
    }

    /// The blocking body of [`App::delete_where`], with the vault's lock held exclusively.
    fn delete_locked(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        ids: Option<Vec<MemoryId>>,
        session: Option<&str>,
    ) -> Result<usize, ApiError> {
        let ids: Vec<MemoryId> = match ids {
            Some(ids) => ids,
            None => {
                let mut ids = Vec::new();
                let mut cursor = None;
                loop {
                    let (page, next) =
                        self.store
                            .memories_page(vault, cipher, cursor, 1000, &mut |record| {
                                record.session_id.as_deref() == session
                            })?;
                    ids.extend(page.into_iter().map(|(id, _)| id));
                    match next {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
                ids
            }
        };
        let _held = self.store.hold_writes();
        for chunk in ids.chunks(MAX_IDS_PER_ENTRY) {
            self.tombstone(Tombstone::MemoriesDeleted {
                vault: vault.to_string(),
                memories: chunk.iter().map(MemoryId::to_string).collect(),
            })?;
        }
        let (deleted, were_pending) = self
            .store
            .delete_memories(vault, cipher, &ids)
            .map_err(self.storage_error("deleting memories"))?;
        self.indexes.remove(vault, &deleted);
        self.release(vault, deleted.len());
        self.metrics.memories.sub(deleted.len() as i64);
        self.metrics.embed_pending.sub(were_pending as i64);
        Ok(deleted.len())
    }

    /// Erases a vault's whole contents. `removing` also revokes its keys and removes the vault
    /// (the user left); otherwise the vault stays, empty, under a fresh data key, and its keys
    /// keep working. Returns how many memories were erased.
    ///
    /// Runs to completion in a task of its own: a client that hangs up, or the request timeout,
    /// must not leave an erasure half done until the next start.
    pub async fn erase_vault(
        self: &Arc<Self>,
        access: &Access,
        vault: VaultId,
        removing: bool,
    ) -> Result<usize, ApiError> {
        let app = self.clone();
        let access = access.clone();
        let task = tokio::spawn(async move {
            let mut audited = Audited {
                vault: Some(vault),
                ..Audited::default()
            };
            let action = if removing {
                "erase_vault"
            } else {
                "erase_contents"
            };
            let result = app.erase_vault_inner(&access, vault, removing).await;
            if let Ok(count) = &result {
                audited.detail.insert("deleted".into(), Value::from(*count));
            }
            app.audit(&access, action, audited, result).await
        });
        task.await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("erasure task: {e}")))?
    }

    async fn erase_vault_inner(
        self: &Arc<Self>,
        access: &Access,
        vault: VaultId,
        removing: bool,
    ) -> Result<usize, ApiError> {
        if let Access::Memory(own) = access {
            own.require(Scope::Delete)?;
        }
        let lock = self.locks.of(vault);
        let exclusive = lock.write_owned().await;
        let app = self.clone();
        let removing = blocking(move || {
            // With the key lock: a mint or rotation into this vault either comes before the
            // mark (and its key is revoked with the others) or sees the mark and is refused.
            let _serial = app.key_ops.lock().expect("key operations lock");
            let Some(mut record) = app.store.vault(vault)? else {
                return Err(ApiError::VaultNotFound(vault.to_string()));
            };
            // A removal once asked for stays asked for, even if a later call only empties it.
            record.removing |= removing;
            record.erasing = true;
            let _held = app.store.hold_writes();
            let vault_id = vault.to_string();
            app.tombstone(if record.removing {
                Tombstone::VaultErased { vault: vault_id }
            } else {
                Tombstone::VaultEmptied { vault: vault_id }
            })?;
            app.store
                .set_vault(vault, &record)
                .map_err(app.storage_error("marking a vault for erasure"))?;
            Ok(record.removing)
        })
        .await?;
        self.commit("committing an erasure mark").await?;
        let app = self.clone();
        let erased = blocking(move || {
            let _exclusive = exclusive;
            app.finish_erasure(vault, removing)
                .map_err(app.storage_error("erasing a vault"))
        })
        .await?;
        tracing::info!(%vault, memories = erased, removing, "erased a vault");
        Ok(erased)
    }

    /// The steps of an erasure after its mark is durable (the backend's, then what the app
    /// holds of the vault); run again at start-up if a crash cut them short. Returns how many
    /// memories were erased.
    pub(super) fn finish_erasure(&self, vault: VaultId, removing: bool) -> anyhow::Result<usize> {
        let removed = self.store.erase_vault(vault, removing, self.now_ms())?;
        self.indexes.forget(vault);
        self.counts.lock().expect("count lock").remove(&vault);
        self.metrics.memories.sub(removed.memories as i64);
        self.metrics.embed_pending.sub(removed.pending as i64);
        if removing {
            self.metrics.vaults.dec();
        }
        Ok(removed.memories)
    }
}
