//! A vault's contents over a user's life: search and export, JSONL import, stats, and deletion
//! of one memory, one session, the whole contents, or the vault itself.
//!
//! Erasure is cryptographic as well as logical: the vault's data key is overwritten in the
//! keyring before any row is removed, so whatever sled's log segments still hold of the old
//! rows can no longer be opened. The steps are recorded in the vault record first, and an
//! erasure a crash cut short is finished at the next start.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use super::keys::Audited;
use super::{check_tags, merge_tags, App, MetaFilter, Recalled, Role, MAX_LABEL_CHARS};
use crate::auth::{Access, MemoryAccess, Scope};
use crate::crypto::VaultCipher;
use crate::error::ApiError;
use crate::store::{EntryMeta, MemoryId, MemoryRecord, NewMemory, VaultId};

/// Most memories one search or export page returns.
pub const MAX_PAGE: usize = 1000;
/// Most lines in one upload.
pub const MAX_UPLOAD_LINES: usize = 10_000;
/// Most line errors listed in an upload's answer (all are counted).
const MAX_LISTED_ERRORS: usize = 1000;
/// Memories stored per transaction during an upload.
const UPLOAD_CHUNK: usize = 1000;

pub struct SearchRequest {
    pub query: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<MemoryId>,
    pub session_id: Option<String>,
    pub tags: Vec<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

pub struct Found {
    pub id: MemoryId,
    pub record: MemoryRecord,
    /// The ranking score and the cosine similarity to the query; none when listing.
    pub score: Option<(f32, f32)>,
}

pub struct SearchResult {
    pub memories: Vec<Found>,
    pub next_cursor: Option<MemoryId>,
}

/// One parsed upload line.
pub struct UploadLine {
    pub content: String,
    pub role: Role,
    pub timestamp_ms: Option<i64>,
    pub session_id: Option<String>,
    pub tags: Vec<String>,
}

pub struct LineError {
    pub line: usize,
    pub code: &'static str,
    pub message: String,
}

pub struct UploadResult {
    pub total: usize,
    pub processed: usize,
    pub stored: usize,
    pub duplicates: usize,
    pub failed: usize,
    pub errors: Vec<LineError>,
}

pub struct VaultStats {
    pub count: usize,
    pub bytes: usize,
    pub oldest_ms: Option<i64>,
    pub newest_ms: Option<i64>,
    pub sessions: usize,
    pub pending: usize,
}

/// What a search filters on, applied to a record or to the index's metadata alike.
#[derive(Clone)]
struct Filter {
    session_id: Option<String>,
    tags: Vec<String>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.session_id.is_none()
            && self.tags.is_empty()
            && self.since_ms.is_none()
            && self.until_ms.is_none()
    }

    fn accepts(&self, meta: &EntryMeta) -> bool {
        self.accepts_fields(meta.created_at_ms, meta.session_id.as_deref(), &meta.tags)
    }

    fn accepts_fields(&self, created_at_ms: i64, session: Option<&str>, tags: &[String]) -> bool {
        self.session_id
            .as_deref()
            .is_none_or(|s| session == Some(s))
            && self.tags.iter().all(|t| tags.contains(t))
            && self.since_ms.is_none_or(|at| created_at_ms >= at)
            && self.until_ms.is_none_or(|at| created_at_ms < at)
    }
}

impl App {
    /// With a query: the best matches, ranked. Without: every memory in storage order, a
    /// page at a time, so that an export loop can pull a whole vault.
    pub async fn search(
        &self,
        access: &MemoryAccess,
        request: SearchRequest,
    ) -> Result<SearchResult, ApiError> {
        access.require(Scope::Read)?;
        check_tags(&request.tags, "tags")?;
        if let Some(session) = &request.session_id {
            check_label(session, "session_id")?;
        }
        let filter = Filter {
            session_id: request.session_id,
            tags: request.tags,
            since_ms: request.since_ms,
            until_ms: request.until_ms,
        };
        let vault = access.vault;
        match request.query {
            Some(query) => {
                let limits = &self.config.limits;
                let limit = request.limit.unwrap_or(limits.default_limit);
                if limit == 0 || limit > limits.max_limit {
                    return Err(ApiError::invalid(format!(
                        "`limit` with a `query` must be 1 to {}, got {limit}",
                        limits.max_limit
                    )));
                }
                if request.cursor.is_some() {
                    return Err(ApiError::invalid(
                        "`cursor` pages a listing; a `query` returns one ranked page",
                    ));
                }
                let chars = query.chars().count();
                if query.trim().is_empty() || chars > limits.max_message_chars {
                    return Err(ApiError::invalid(format!(
                        "`query` must be 1 to {} characters and not blank",
                        limits.max_message_chars
                    )));
                }
                let (vector, _) = self.embed_query(&query).await?;
                let keep: Option<MetaFilter> = if filter.is_empty() {
                    None
                } else {
                    Some(Box::new(move |meta: &EntryMeta| filter.accepts(meta)))
                };
                let recalled = self
                    .recall(vault, &query, vector, limit, keep, false)
                    .await?;
                Ok(SearchResult {
                    memories: recalled
                        .into_iter()
                        .map(|memory: Recalled| Found {
                            id: memory.id,
                            record: memory.record,
                            score: Some((memory.score, memory.similarity)),
                        })
                        .collect(),
                    next_cursor: None,
                })
            }
            None => {
                let limit = request.limit.unwrap_or(100);
                if limit == 0 || limit > MAX_PAGE {
                    return Err(ApiError::invalid(format!(
                        "`limit` must be 1 to {MAX_PAGE}, got {limit}"
                    )));
                }
                let lock = self.locks.of(vault);
                let shared = lock.read_owned().await;
                let cipher = self.cipher(vault)?;
                let store = self.store.clone();
                let cursor = request.cursor;
                let (page, next) = tokio::task::spawn_blocking(move || {
                    let _shared = shared;
                    store.memories_page(vault, &cipher, cursor, limit, |record| {
                        filter.accepts_fields(
                            record.created_at_ms,
                            record.session_id.as_deref(),
                            &record.tags,
                        )
                    })
                })
                .await
                .map_err(|e| anyhow::anyhow!("listing task: {e}"))??;
                Ok(SearchResult {
                    memories: page
                        .into_iter()
                        .map(|(id, record)| Found {
                            id,
                            record,
                            score: None,
                        })
                        .collect(),
                    next_cursor: next,
                })
            }
        }
    }

    /// Imports history: each valid line is stored (once, however often it is uploaded), each
    /// bad one reported with its line number. Durable before the answer.
    pub async fn upload(
        &self,
        access: &MemoryAccess,
        lines: Vec<(usize, Result<UploadLine, ApiError>)>,
    ) -> Result<UploadResult, ApiError> {
        let audited = Audited {
            vault: Some(access.vault),
            ..Audited::default()
        };
        let actor = Access::Memory(access.clone());
        let result = self.upload_inner(access, lines).await;
        let mut audited = audited;
        if let Ok(done) = &result {
            for (name, value) in [
                ("total", done.total),
                ("processed", done.processed),
                ("stored", done.stored),
                ("failed", done.failed),
            ] {
                audited.detail.insert(name.into(), Value::from(value));
            }
        }
        self.audit(&actor, "upload", audited, result).await
    }

    async fn upload_inner(
        &self,
        access: &MemoryAccess,
        lines: Vec<(usize, Result<UploadLine, ApiError>)>,
    ) -> Result<UploadResult, ApiError> {
        access.require(Scope::Write)?;
        if lines.is_empty() {
            return Err(ApiError::invalid("the upload holds no lines"));
        }
        if lines.len() > MAX_UPLOAD_LINES {
            return Err(ApiError::TooManyLines {
                count: lines.len(),
                max: MAX_UPLOAD_LINES,
            });
        }
        let now = self.now_ms();
        let max_chars = self.config.limits.max_message_chars;
        let mut result = UploadResult {
            total: lines.len(),
            processed: 0,
            stored: 0,
            duplicates: 0,
            failed: 0,
            errors: Vec::new(),
        };
        let fail = |result: &mut UploadResult, line: usize, code: &'static str, message: String| {
            result.failed += 1;
            if result.errors.len() < MAX_LISTED_ERRORS {
                result.errors.push(LineError {
                    line,
                    code,
                    message,
                });
            }
        };
        let mut valid: Vec<(usize, NewMemory)> = Vec::new();
        for (line, parsed) in lines {
            let checked = parsed
                .map_err(|error| (error.code(), error.to_string()))
                .and_then(|line| check_upload_line(line, max_chars, now));
            match checked {
                Ok(memory) => valid.push((line, memory)),
                Err((code, message)) => fail(&mut result, line, code, message),
            }
        }
        let lock = self.locks.of(access.vault);
        let _shared = lock.read().await;
        for chunk in valid.chunks(UPLOAD_CHUNK) {
            let memories: Vec<NewMemory> = chunk
                .iter()
                .map(|(_, m)| NewMemory {
                    record: m.record.clone(),
                    explicit_timestamp: m.explicit_timestamp,
                })
                .collect();
            match self.store_memories(access.vault, &memories).await {
                Ok(outcome) => {
                    let stored = outcome.iter().filter(|(_, new)| *new).count();
                    result.processed += outcome.len();
                    result.stored += stored;
                    result.duplicates += outcome.len() - stored;
                }
                // The chunks before were stored: report this one's lines, and go on (a later
                // chunk of duplicates is still answered).
                Err(error @ (ApiError::VaultFull { .. } | ApiError::DiskFull { .. })) => {
                    for (line, _) in chunk {
                        fail(&mut result, *line, error.code(), error.to_string());
                    }
                }
                Err(error) => return Err(error),
            }
        }
        result.errors.sort_by_key(|e| e.line);
        Ok(result)
    }

    /// Count, bytes of text, oldest and newest, distinct sessions, and how many memories still
    /// wait for their vector.
    pub async fn stats(&self, access: &MemoryAccess) -> Result<VaultStats, ApiError> {
        access.require(Scope::Read)?;
        let vault = access.vault;
        let lock = self.locks.of(vault);
        let shared = lock.read_owned().await;
        let cipher = self.cipher(vault)?;
        let store = self.store.clone();
        let stats = tokio::task::spawn_blocking(move || -> anyhow::Result<VaultStats> {
            let _shared = shared;
            let mut stats = VaultStats {
                count: 0,
                bytes: 0,
                oldest_ms: None,
                newest_ms: None,
                sessions: 0,
                pending: store.vault_pending_count(vault),
            };
            let mut sessions = HashSet::new();
            let mut cursor = None;
            loop {
                let (page, next) = store.memories_page(vault, &cipher, cursor, 1000, |_| true)?;
                for (_, record) in page {
                    stats.count += 1;
                    stats.bytes += record.content.len();
                    let at = record.created_at_ms;
                    stats.oldest_ms = Some(stats.oldest_ms.map_or(at, |o| o.min(at)));
                    stats.newest_ms = Some(stats.newest_ms.map_or(at, |n| n.max(at)));
                    if let Some(session) = record.session_id {
                        sessions.insert(session);
                    }
                }
                match next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            stats.sessions = sessions.len();
            Ok(stats)
        })
        .await
        .map_err(|e| anyhow::anyhow!("stats task: {e}"))??;
        Ok(stats)
    }

    /// Deletes one memory of the key's vault.
    pub async fn delete_memory(&self, access: &MemoryAccess, id: &str) -> Result<(), ApiError> {
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

    async fn delete_memory_inner(&self, access: &MemoryAccess, id: &str) -> Result<(), ApiError> {
        access.require(Scope::Delete)?;
        let not_found = || ApiError::MemoryNotFound(id.chars().take(64).collect());
        let memory: MemoryId = id.parse().map_err(|_| not_found())?;
        let deleted = self
            .delete_where(access.vault, Some(&[memory]), None)
            .await?;
        if deleted == 0 {
            return Err(not_found());
        }
        Ok(())
    }

    /// Deletes every memory of one session of the key's vault. Returns how many there were.
    pub async fn delete_session(
        &self,
        access: &MemoryAccess,
        session: &str,
    ) -> Result<usize, ApiError> {
        let mut audited = Audited {
            vault: Some(access.vault),
            ..Audited::default()
        };
        let result = async {
            access.require(Scope::Delete)?;
            self.delete_where(access.vault, None, Some(session)).await
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
    async fn delete_where(
        &self,
        vault: VaultId,
        ids: Option<&[MemoryId]>,
        session: Option<&str>,
    ) -> Result<usize, ApiError> {
        let lock = self.locks.of(vault);
        let _exclusive = lock.write().await;
        let cipher = self.cipher(vault)?;
        // Scanning and deleting may take a while in a large vault: off the async workers.
        tokio::task::block_in_place(|| self.delete_locked(vault, &cipher, ids, session))
    }

    /// The body of [`App::delete_where`], with the vault's lock held exclusively. The caller
    /// commits (with the audit entry).
    fn delete_locked(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        ids: Option<&[MemoryId]>,
        session: Option<&str>,
    ) -> Result<usize, ApiError> {
        let ids: Vec<MemoryId> = match (ids, session) {
            (Some(ids), _) => ids.to_vec(),
            (None, session) => {
                let mut ids = Vec::new();
                let mut cursor = None;
                loop {
                    let (page, next) =
                        self.store
                            .memories_page(vault, cipher, cursor, 1000, |record| {
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
        let _exclusive = lock.write().await;
        let Some(mut record) = self.store.vault(vault)? else {
            return Err(ApiError::VaultNotFound(vault.to_string()));
        };
        // A removal once asked for stays asked for, even if a later call only empties the vault.
        record.removing |= removing;
        record.erasing = true;
        let removing = record.removing;
        self.store
            .set_vault(vault, &record)
            .map_err(self.storage_error("marking a vault for erasure"))?;
        self.commit("committing an erasure mark").await?;
        let app = self.clone();
        let erased = tokio::task::spawn_blocking(move || app.finish_erasure(vault, removing))
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("erasure: {e}")))?
            .map_err(self.storage_error("erasing a vault"))?;
        tracing::info!(%vault, memories = erased, removing, "erased a vault");
        Ok(erased)
    }

    /// The steps of an erasure after its mark is durable; run again at start-up if a crash
    /// cut them short (each step may be repeated). Returns how many memories were erased.
    pub(super) fn finish_erasure(&self, vault: VaultId, removing: bool) -> anyhow::Result<usize> {
        // 1. Destroy the data key, durably: from here on the old rows cannot be opened.
        if removing {
            self.keyring.remove(vault)?;
        } else {
            self.keyring.replace(vault)?;
        }
        // 2. Forget what memory holds of the vault, then remove its rows.
        self.indexes.forget(vault);
        self.counts.lock().expect("count lock").remove(&vault);
        let removed = self.store.erase_vault_rows(vault)?;
        let erased = removed.memories;
        self.metrics.memories.sub(erased as i64);
        self.metrics.embed_pending.sub(removed.pending as i64);
        // 3. Clear the mark, or remove the vault and revoke every key of it.
        if removing {
            let now = self.now_ms();
            let owner = vault.to_string();
            // Under the key lock: a rotation or mint racing this scan cannot slip a key past it.
            let _serial = self.key_ops.lock().expect("key operations lock");
            let mut cursor: Option<String> = None;
            loop {
                let (page, next) = self
                    .store
                    .keys_page(cursor.as_deref(), 1000, |r| r.vault == owner)?;
                for key in page {
                    self.store.update_key(&key.id, |r| {
                        r.revoked_at_ms.get_or_insert(now);
                    })?;
                }
                match next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            self.store.remove_vault(vault)?;
            self.metrics.vaults.dec();
        } else if let Some(mut record) = self.store.vault(vault)? {
            record.erasing = false;
            record.removing = false;
            self.store.set_vault(vault, &record)?;
        }
        Ok(erased)
    }
}

fn check_label(text: &str, field: &str) -> Result<(), ApiError> {
    let chars = text.chars().count();
    if text.trim().is_empty() || chars > MAX_LABEL_CHARS || text.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "`{field}` must be 1 to {MAX_LABEL_CHARS} characters without control characters"
        )));
    }
    Ok(())
}

/// Turns an upload line into a memory, or gives the error code and message for it.
fn check_upload_line(
    line: UploadLine,
    max_chars: usize,
    now: i64,
) -> Result<NewMemory, (&'static str, String)> {
    let invalid = |error: ApiError| (error.code(), error.to_string());
    let chars = line.content.chars().count();
    if line.content.trim().is_empty() {
        return Err(invalid(ApiError::invalid("`content` is empty")));
    }
    if chars > max_chars {
        return Err((
            "message_too_long",
            format!("`content` has {chars} characters; the maximum is {max_chars}"),
        ));
    }
    if !matches!(line.role, Role::User | Role::Assistant) {
        return Err(invalid(ApiError::invalid(
            "`role` must be user or assistant: only what they said becomes memory",
        )));
    }
    if let Some(session) = &line.session_id {
        check_label(session, "session_id").map_err(invalid)?;
    }
    check_tags(&line.tags, "tags").map_err(invalid)?;
    Ok(NewMemory {
        explicit_timestamp: line.timestamp_ms.is_some(),
        record: MemoryRecord {
            content: line.content,
            role: line.role.as_str().to_owned(),
            session_id: line.session_id,
            created_at_ms: line.timestamp_ms.unwrap_or(now),
            model: None,
            tags: merge_tags(&[], &line.tags),
            digest: String::new(),
        },
    })
}
