//! Upload: history imported as JSON Lines. Each valid line is stored (once, however often it is
//! uploaded) and each bad one reported with its line number; the valid ones are stored in
//! chunks of [`UPLOAD_CHUNK`], each durable before the next.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use super::audit::Audited;
use super::ingest::{check_label, check_tags, merge_tags, successor};
use super::session::SessionScope;
use super::App;
use crate::auth::{Access, MemoryAccess};
use crate::bounds::{MAX_LISTED_ERRORS, MAX_UPLOAD_LINES, UPLOAD_CHUNK};
use crate::error::ApiError;
use crate::ids::{MemoryId, Role, Scope};
use crate::store::{MemoryRecord, NewMemory};

/// One parsed upload line.
pub struct UploadLine {
    pub content: String,
    pub role: Role,
    pub timestamp_ms: Option<i64>,
    pub session_id: Option<String>,
    pub tags: Vec<String>,
    /// Memories of this vault the line replaces (ids not in the vault are passed over).
    pub supersedes: Vec<MemoryId>,
    /// Set on a line exported already superseded: stored as such, for export only.
    pub superseded_by: Option<String>,
}

pub struct LineError {
    pub line: usize,
    pub code: &'static str,
    pub message: String,
}

/// `total`, `processed` and `failed` count lines; `stored` and `duplicates` count memories (a
/// long line is stored as one memory per passage).
pub struct UploadResult {
    pub total: usize,
    pub processed: usize,
    pub stored: usize,
    pub duplicates: usize,
    pub failed: usize,
    pub errors: Vec<LineError>,
}

impl UploadResult {
    /// Counts a refused line, listing it while the list has room.
    fn fail(&mut self, line: usize, code: &'static str, message: String) {
        self.failed += 1;
        if self.errors.len() < MAX_LISTED_ERRORS {
            self.errors.push(LineError {
                line,
                code,
                message,
            });
        }
    }
}

impl App {
    /// Imports history; durable before the answer. Lines without a session of their own go
    /// into the request's; a request confined to its session may write only into it.
    pub async fn upload(
        self: &Arc<Self>,
        access: &MemoryAccess,
        session: &SessionScope,
        lines: Vec<(usize, Result<UploadLine, ApiError>)>,
    ) -> Result<UploadResult, ApiError> {
        let mut audited = Audited {
            vault: Some(access.vault),
            ..Audited::default()
        };
        let actor = Access::Memory(access.clone());
        let result = self.upload_inner(access, session, lines).await;
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
        self: &Arc<Self>,
        access: &MemoryAccess,
        session: &SessionScope,
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
        let confined = session.confined_to(access);
        let mut result = UploadResult {
            total: lines.len(),
            processed: 0,
            stored: 0,
            duplicates: 0,
            failed: 0,
            errors: Vec::new(),
        };
        // Each valid line's memories (one, or one per passage of a long line).
        let mut valid: Vec<(usize, Vec<NewMemory>)> = Vec::new();
        let mut supersedes: HashMap<usize, Vec<MemoryId>> = HashMap::new();
        for (line, parsed) in lines {
            let checked = parsed
                .map_err(|error| (error.code(), error.to_string()))
                .and_then(|mut parsed| {
                    match (&parsed.session_id, confined) {
                        (Some(own), Some(only)) if own != only => {
                            return Err(invalid(ApiError::invalid(
                                "under session isolation every line goes into the request's \
                                 session: leave out `session_id` or give the same",
                            )))
                        }
                        (None, _) => parsed.session_id = session.id.clone(),
                        _ => {}
                    }
                    if !parsed.supersedes.is_empty() {
                        supersedes.insert(line, std::mem::take(&mut parsed.supersedes));
                    }
                    let (explicit, record) = check_upload_line(parsed, now)?;
                    self.as_passages(0, record, explicit)
                        .map_err(|error| (error.code(), error.to_string()))
                });
            match checked {
                Ok(memories) => valid.push((line, memories)),
                Err((code, message)) => result.fail(line, code, message),
            }
        }
        let lock = self.locks.of(access.vault);
        let shared = lock.read().await;
        // Each superseding line's ids, and the first memory it was stored as.
        let mut replaced: Vec<(Vec<MemoryId>, MemoryId)> = Vec::new();
        for chunk in line_chunks(&valid, UPLOAD_CHUNK) {
            let memories: Vec<NewMemory> = chunk
                .iter()
                .flat_map(|(_, memories)| memories)
                .map(|m| NewMemory {
                    record: m.record.clone(),
                    explicit_timestamp: m.explicit_timestamp,
                })
                .collect();
            match self.store_memories(access.vault, memories).await {
                Ok(outcome) => {
                    let mut at = 0;
                    for (line, memories) in chunk {
                        let own = &outcome[at..at + memories.len()];
                        if let Some(ids) = supersedes.remove(line) {
                            if let Some(by) = successor(own, &ids) {
                                replaced.push((ids, by));
                            }
                        }
                        at += memories.len();
                    }
                    let stored = outcome.iter().filter(|(_, new)| *new).count();
                    result.processed += chunk.len();
                    result.stored += stored;
                    result.duplicates += outcome.len() - stored;
                }
                // The chunks before were stored: report this one's lines, and go on (a later
                // chunk of duplicates is still answered).
                Err(error @ (ApiError::VaultFull { .. } | ApiError::DiskFull { .. })) => {
                    for (line, _) in chunk {
                        result.fail(*line, error.code(), error.to_string());
                    }
                }
                Err(error) => return Err(error),
            }
        }
        drop(shared);
        self.supersede(access.vault, replaced).await?;
        result.errors.sort_by_key(|e| e.line);
        Ok(result)
    }
}

/// Whole lines, in order, grouped so that each group holds about `memories` memories (a line
/// is never split across two groups, so a refused group refuses whole lines).
fn line_chunks(
    lines: &[(usize, Vec<NewMemory>)],
    memories: usize,
) -> Vec<&[(usize, Vec<NewMemory>)]> {
    let mut chunks = Vec::new();
    let (mut start, mut held) = (0, 0);
    for (at, (_, line)) in lines.iter().enumerate() {
        if held > 0 && held + line.len() > memories {
            chunks.push(&lines[start..at]);
            (start, held) = (at, 0);
        }
        held += line.len();
    }
    if start < lines.len() {
        chunks.push(&lines[start..]);
    }
    chunks
}

/// A refusal as an upload line's error: its code and message.
fn invalid(error: ApiError) -> (&'static str, String) {
    (error.code(), error.to_string())
}

/// Turns an upload line into a memory record (and whether it was dated), or gives the error
/// code and message for it. `system` lines are taken, as MemoryRouter takes them; other roles
/// than user, assistant and system are not memory.
fn check_upload_line(
    line: UploadLine,
    now: i64,
) -> Result<(bool, MemoryRecord), (&'static str, String)> {
    if line.content.trim().is_empty() {
        return Err(invalid(ApiError::invalid("`content` is empty")));
    }
    if !(line.role.is_remembered() || line.role == Role::System) {
        return Err(invalid(ApiError::invalid(
            "`role` must be user, assistant or system: only what they said becomes memory",
        )));
    }
    if let Some(session) = &line.session_id {
        check_label(session, "session_id").map_err(invalid)?;
    }
    check_tags(&line.tags, "tags").map_err(invalid)?;
    if let Some(by) = &line.superseded_by {
        check_label(by, "superseded_by").map_err(invalid)?;
    }
    Ok((
        line.timestamp_ms.is_some(),
        MemoryRecord {
            content: line.content,
            role: line.role.as_str().to_owned(),
            session_id: line.session_id,
            created_at_ms: line.timestamp_ms.unwrap_or(now),
            model: None,
            tags: merge_tags(&[], &line.tags),
            digest: String::new(),
            passage: None,
            superseded_by: line.superseded_by,
        },
    ))
}
