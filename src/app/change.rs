//! Change: memories replaced by later ones. An ingest (or an upload line) names the memories
//! it supersedes; a correction (`PATCH /v1/memory/{id}`) stores the corrected text as a new
//! memory that supersedes the old one. A superseded memory keeps its text for export, with
//! `superseded_by`, and leaves the index: prepare and search never show it again.

use std::sync::Arc;

use tokio::sync::OwnedRwLockWriteGuard;

use super::audit::Audited;
use super::ingest::check_tags;
use super::{blocking, App};
use crate::auth::{Access, MemoryAccess};
use crate::bounds::MAX_SUPERSEDES;
use crate::error::ApiError;
use crate::ids::{MemoryId, Scope, VaultId};
use crate::store::MemoryRecord;

/// A correction: the new text, and the tags (the old memory's when absent).
pub struct Correction {
    pub content: String,
    pub tags: Option<Vec<String>>,
}

pub struct Corrected {
    /// The memory that holds the corrected text (its first passage, for a long one).
    pub id: MemoryId,
    pub ids: Vec<MemoryId>,
    pub supersedes: MemoryId,
}

/// Parses the ids a request supersedes: at most [`MAX_SUPERSEDES`], each a memory id.
pub fn supersedes_field(ids: Vec<String>, field: &str) -> Result<Vec<MemoryId>, ApiError> {
    if ids.len() > MAX_SUPERSEDES {
        return Err(ApiError::invalid(format!(
            "`{field}` may name at most {MAX_SUPERSEDES} memories, got {}",
            ids.len()
        )));
    }
    ids.iter()
        .enumerate()
        .map(|(index, id)| {
            id.parse().map_err(|_| {
                ApiError::invalid(format!(
                    "`{field}[{index}]` must be a memory id (mem_ and 16 hex digits)"
                ))
            })
        })
        .collect()
}

impl App {
    /// Refuses ids that are not memories of the vault (`memory_not_found`, the first one).
    pub(super) async fn check_memories_exist(
        self: &Arc<Self>,
        vault: VaultId,
        ids: &[MemoryId],
    ) -> Result<(), ApiError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (app, ids) = (self.clone(), ids.to_vec());
        blocking(move || {
            for id in ids {
                let there = app
                    .store
                    .contains_memory(vault, id)
                    .map_err(app.storage_error("looking up a memory"))?;
                if !there {
                    return Err(ApiError::MemoryNotFound(id.to_string()));
                }
            }
            Ok(())
        })
        .await
    }

    /// Marks each group of ids as superseded by its memory, under the vault's exclusive lock,
    /// takes them out of the loaded index, and commits. A memory never supersedes itself.
    /// Returns how many were marked now (not those already superseded or gone).
    pub(super) async fn supersede(
        self: &Arc<Self>,
        vault: VaultId,
        groups: Vec<(Vec<MemoryId>, MemoryId)>,
    ) -> Result<usize, ApiError> {
        if groups.iter().all(|(ids, _)| ids.is_empty()) {
            return Ok(0);
        }
        let exclusive = self.locks.of(vault).write_owned().await;
        self.supersede_holding(exclusive, vault, groups).await
    }

    /// [`App::supersede`] for a caller that already holds the vault's lock exclusively (and
    /// gives it up here).
    async fn supersede_holding(
        self: &Arc<Self>,
        exclusive: OwnedRwLockWriteGuard<()>,
        vault: VaultId,
        groups: Vec<(Vec<MemoryId>, MemoryId)>,
    ) -> Result<usize, ApiError> {
        let app = self.clone();
        let marked = blocking(move || {
            let _exclusive = exclusive;
            app.supersede_locked(vault, groups)
        })
        .await?;
        self.commit("committing superseded memories").await?;
        Ok(marked)
    }

    /// The blocking body of [`App::supersede`], with the vault's lock held exclusively.
    fn supersede_locked(
        &self,
        vault: VaultId,
        groups: Vec<(Vec<MemoryId>, MemoryId)>,
    ) -> Result<usize, ApiError> {
        let cipher = self.cipher(vault)?;
        let mut marked = 0;
        for (ids, by) in groups {
            let ids: Vec<MemoryId> = ids.into_iter().filter(|id| *id != by).collect();
            let (now, were_pending) = self
                .store
                .supersede(vault, &cipher, &ids, by)
                .map_err(self.storage_error("superseding memories"))?;
            self.indexes.remove(vault, &now);
            self.metrics.embed_pending.sub(were_pending as i64);
            marked += now.len();
        }
        Ok(marked)
    }

    /// Corrects a memory: the new text is stored as a new memory (same role, session and
    /// time, embedded anew) that supersedes it. Audited.
    pub async fn correct_memory(
        self: &Arc<Self>,
        access: &MemoryAccess,
        id: &str,
        correction: Correction,
    ) -> Result<Corrected, ApiError> {
        let audited = Audited {
            vault: Some(access.vault),
            ..Audited::default()
        };
        let result = self.correct_inner(access, id, correction).await;
        self.audit(
            &Access::Memory(access.clone()),
            "correct_memory",
            audited,
            result,
        )
        .await
    }

    async fn correct_inner(
        self: &Arc<Self>,
        access: &MemoryAccess,
        id: &str,
        correction: Correction,
    ) -> Result<Corrected, ApiError> {
        access.require(Scope::Write)?;
        let not_found = || ApiError::MemoryNotFound(id.chars().take(64).collect());
        let old: MemoryId = id.parse().map_err(|_| not_found())?;
        if correction.content.trim().is_empty() {
            return Err(ApiError::invalid("`content` is empty"));
        }
        if let Some(tags) = &correction.tags {
            check_tags(tags, "tags")?;
        }
        // One exclusive hold from the read to the mark: two corrections of one memory, or a
        // correction and a delete, cannot both go through.
        let vault = access.vault;
        let lock = self.locks.of(vault);
        let exclusive = lock.write_owned().await;
        let cipher = self.cipher(vault)?;
        let app = self.clone();
        let record = blocking(move || {
            app.store
                .memory(vault, &cipher, old)
                .map_err(app.storage_error("reading a memory"))
        })
        .await?
        .ok_or_else(not_found)?;
        if let Some(by) = record.superseded_by {
            return Err(ApiError::MemorySuperseded {
                id: old.to_string(),
                by,
            });
        }
        let corrected = MemoryRecord {
            content: correction.content,
            tags: correction.tags.unwrap_or(record.tags),
            digest: String::new(),
            passage: None,
            superseded_by: None,
            ..record
        };
        let memories = self.as_passages(0, corrected, true)?;
        let outcome = self.store_memories(vault, memories).await?;
        let ids: Vec<MemoryId> = outcome.into_iter().map(|(id, _)| id).collect();
        if ids.contains(&old) {
            return Err(ApiError::invalid(
                "`content` is the memory's own text: nothing to correct (tags alone are not \
                 corrected)",
            ));
        }
        let first = ids[0];
        self.supersede_holding(exclusive, vault, vec![(vec![old], first)])
            .await?;
        Ok(Corrected {
            id: first,
            ids,
            supersedes: old,
        })
    }
}
