//! Response shapes: domain results into the JSON the API answers with.

use serde::Serialize;
use serde_json::Value;

use super::{optional_time, rfc3339};
use crate::app::keys::{self, KeyInfo, MintedKey};
use crate::app::prepare::PrepareResult;
use crate::app::search::{Found, Recalled, SearchResult, VaultStats, Warmed};
use crate::app::upload::UploadResult;
use crate::ids::{KeyId, MemoryId, Scope};
use crate::store::{AuditEntry, KeyStatus, MemoryRecord};

#[derive(Serialize)]
pub struct WireMemory<'a> {
    id: String,
    content: &'a str,
    role: &'a str,
    session_id: Option<&'a str>,
    tags: &'a [String],
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    similarity: Option<f32>,
    /// For a passage of a longer message: which one, and of how many.
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<WirePart>,
    /// Set on a memory a later one replaced (in an export; prepare and search never show one).
    #[serde(skip_serializing_if = "Option::is_none")]
    superseded_by: Option<&'a str>,
}

#[derive(Serialize)]
pub struct WirePart {
    /// Shared by the passages of one message.
    message: String,
    /// From 1.
    index: u16,
    count: u16,
}

impl<'a> WireMemory<'a> {
    fn new(id: MemoryId, record: &'a MemoryRecord, score: Option<(f32, f32)>) -> Self {
        let round = |x: f32| (x * 10_000.0).round() / 10_000.0;
        WireMemory {
            id: id.to_string(),
            content: &record.content,
            role: &record.role,
            session_id: record.session_id.as_deref(),
            tags: &record.tags,
            created_at: rfc3339(record.created_at_ms),
            score: score.map(|(s, _)| round(s)),
            similarity: score.map(|(_, s)| round(s)),
            part: record.passage.map(|p| WirePart {
                message: format!("msg_{:016x}", p.message),
                index: p.index + 1,
                count: p.count,
            }),
            superseded_by: record.superseded_by.as_deref(),
        }
    }
}

impl<'a> From<&'a Recalled> for WireMemory<'a> {
    fn from(memory: &'a Recalled) -> Self {
        WireMemory::new(
            memory.id,
            &memory.record,
            Some((memory.score, memory.similarity)),
        )
    }
}

impl<'a> From<&'a Found> for WireMemory<'a> {
    fn from(memory: &'a Found) -> Self {
        WireMemory::new(memory.id, &memory.record, memory.score)
    }
}

#[derive(Serialize)]
pub struct WirePrepared<'a> {
    context: Option<&'a str>,
    memories: Vec<WireMemory<'a>>,
    tokens: usize,
    /// How many memories the context holds (MemoryRouter's name; the length of `memories`).
    memories_found: usize,
}

impl<'a> From<&'a PrepareResult> for WirePrepared<'a> {
    fn from(result: &'a PrepareResult) -> Self {
        WirePrepared {
            context: result.context.as_deref(),
            memories: result.memories.iter().map(WireMemory::from).collect(),
            tokens: result.tokens,
            memories_found: result.memories.len(),
        }
    }
}

#[derive(Serialize)]
pub struct WireSearchResult<'a> {
    memories: Vec<WireMemory<'a>>,
    next_cursor: Option<String>,
}

impl<'a> From<&'a SearchResult> for WireSearchResult<'a> {
    fn from(result: &'a SearchResult) -> Self {
        WireSearchResult {
            memories: result.memories.iter().map(WireMemory::from).collect(),
            next_cursor: result.next_cursor.map(|id| id.to_string()),
        }
    }
}

#[derive(Serialize)]
pub struct WireKeyInfo {
    id: String,
    name: String,
    key_prefix: String,
    scopes: Vec<Scope>,
    vault_id: String,
    created_at: String,
    last_used_at: Option<String>,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    deprecated_at: Option<String>,
    auto_revoke_at: Option<String>,
    is_active: bool,
    status: &'static str,
    rotated_to: Option<String>,
    rotated_from: Option<String>,
    session_isolation: bool,
}

impl From<KeyInfo> for WireKeyInfo {
    fn from(info: KeyInfo) -> Self {
        let record = info.record;
        WireKeyInfo {
            key_prefix: keys::key_prefix(&record),
            id: record.id.to_string(),
            name: record.name,
            scopes: record.scopes,
            vault_id: record.vault.to_string(),
            created_at: rfc3339(record.created_at_ms),
            last_used_at: optional_time(info.last_used_at_ms),
            expires_at: optional_time(record.expires_at_ms),
            revoked_at: optional_time(record.revoked_at_ms),
            deprecated_at: optional_time(record.deprecated_at_ms),
            auto_revoke_at: optional_time(record.auto_revoke_at_ms),
            is_active: info.status == KeyStatus::Active,
            status: info.status.as_str(),
            rotated_to: record.rotated_to.map(|id| id.to_string()),
            rotated_from: record.rotated_from.map(|id| id.to_string()),
            session_isolation: record.session_isolation,
        }
    }
}

#[derive(Serialize)]
pub struct WireMinted {
    key: String,
    /// The key's name and birth, at the top as MemoryRouter's quickstart reads them.
    name: String,
    created_at: String,
    key_info: WireKeyInfo,
}

impl From<MintedKey> for WireMinted {
    fn from(minted: MintedKey) -> Self {
        WireMinted {
            key: minted.key,
            name: minted.info.record.name.clone(),
            created_at: rfc3339(minted.info.record.created_at_ms),
            key_info: minted.info.into(),
        }
    }
}

#[derive(Serialize)]
pub struct WireKeyList {
    keys: Vec<WireKeyInfo>,
    next_cursor: Option<String>,
}

impl WireKeyList {
    pub fn new(keys: Vec<KeyInfo>, next_cursor: Option<KeyId>) -> Self {
        WireKeyList {
            keys: keys.into_iter().map(WireKeyInfo::from).collect(),
            next_cursor: next_cursor.map(|id| id.to_string()),
        }
    }
}

pub fn upload_result(result: &UploadResult) -> Value {
    // MemoryRouter's words: complete, partial; and failed when nothing was taken.
    let status = match (result.processed, result.failed) {
        (_, 0) => "complete",
        (0, _) => "failed",
        _ => "partial",
    };
    let message = format!(
        "{} of {} lines taken: {} memories stored, {} already stored, {} lines failed",
        result.processed, result.total, result.stored, result.duplicates, result.failed
    );
    let errors: Vec<Value> = result
        .errors
        .iter()
        .map(|e| serde_json::json!({"line": e.line, "code": e.code, "message": e.message}))
        .collect();
    serde_json::json!({
        "status": status,
        "stats": {
            "total": result.total,
            "processed": result.processed,
            "failed": result.failed,
            "stored": result.stored,
            "duplicates": result.duplicates,
        },
        "errors": errors,
        "message": message,
    })
}

pub fn stats(stats: &VaultStats) -> Value {
    serde_json::json!({
        "count": stats.count,
        "memories": stats.count,
        "total_tokens": stats.tokens,
        "bytes": stats.bytes,
        "oldest": optional_time(stats.oldest_ms),
        "newest": optional_time(stats.newest_ms),
        "sessions": stats.sessions,
        "pending": stats.pending,
    })
}

pub fn audit_page(entries: &[AuditEntry], next: Option<u64>) -> Value {
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "at": rfc3339(e.at_ms),
                "actor": e.actor,
                "action": e.action,
                "key_id": e.key_id,
                "vault_id": e.vault,
                "outcome": e.outcome,
                "detail": e.detail,
            })
        })
        .collect();
    serde_json::json!({"entries": entries, "next_cursor": next.map(|n| n.to_string())})
}

pub fn warmed(warmed: &Warmed) -> Value {
    let ms = warmed.took.as_secs_f64() * 1000.0;
    serde_json::json!({
        "status": "warm",
        "memories": warmed.memories,
        "pending": warmed.pending,
        "load_ms": ms,
        // MemoryRouter's names for the same.
        "memories_loaded": warmed.memories,
        "warmup_ms": ms,
    })
}
