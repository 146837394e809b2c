//! The JSON wire shapes, and their translation to and from domain types.
//!
//! Requests accept what chat gateways already send: OpenAI-style messages whose `content` is a
//! string, an array of parts, or null, and unknown fields (a gateway may forward its whole chat
//! request). Malformed JSON is `invalid_json`; well-formed JSON of the wrong shape is
//! `invalid_request`, with serde's description of what was wrong.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::app::ingest::{IngestRequest, Message};
use crate::app::keys::{self, KeyInfo, MintRequest, MintedKey};
use crate::app::prepare::{PrepareRequest, PrepareResult};
use crate::app::search::{Found, Recalled, SearchRequest, SearchResult, VaultStats};
use crate::app::upload::{UploadLine, UploadResult};
use crate::bounds::{MAX_LABEL_CHARS, MAX_TIMESTAMP_MS};
use crate::error::ApiError;
use crate::ids::{KeyId, MemoryId, Role, Scope, VaultId};
use crate::store::{AuditEntry, KeyStatus, MemoryRecord};

pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => ApiError::InvalidRequest(error.to_string()),
        _ => ApiError::InvalidJson(error.to_string()),
    })
}

#[derive(Deserialize)]
pub struct WireMessage {
    role: String,
    #[serde(default)]
    content: Value,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(default = "default_true")]
    memory: bool,
    #[serde(default)]
    tags: Vec<String>,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
pub struct WirePrepare {
    messages: Vec<WireMessage>,
    #[serde(default)]
    limit: Option<Value>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize)]
pub struct WireIngest {
    messages: Vec<WireMessage>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize)]
pub struct WireMintKey {
    name: String,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    expires_days: Option<Value>,
    #[serde(default)]
    vault_id: Option<String>,
}

impl WireMintKey {
    pub fn into_request(self) -> Result<MintRequest, ApiError> {
        let scopes = match self.scopes {
            None => None,
            Some(names) => Some(
                names
                    .iter()
                    .map(|name| {
                        Scope::parse(name).ok_or_else(|| {
                            ApiError::invalid(format!(
                                "unknown scope {:?}; scopes are read, write, delete, admin",
                                name.chars().take(32).collect::<String>()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let expires_days = positive_integer("expires_days", self.expires_days)?
            .map(|days| u32::try_from(days).unwrap_or(u32::MAX));
        let vault = self.vault_id.as_deref().map(vault_id).transpose()?;
        Ok(MintRequest {
            name: self.name,
            scopes,
            expires_days,
            vault,
        })
    }
}

/// A vault id as the API shows it, or `invalid_request`.
pub fn vault_id(text: &str) -> Result<VaultId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::invalid("`vault_id` must be `vlt_` and 32 hex digits, as key_info shows it")
    })
}

#[derive(Deserialize)]
pub struct WireRotate {
    #[serde(default)]
    grace_days: Option<Value>,
}

impl WireRotate {
    pub fn grace_days(self) -> Result<u32, ApiError> {
        match self.grace_days {
            Some(Value::Number(n)) if n.as_u64() == Some(0) => Ok(0),
            other => Ok(positive_integer("grace_days", other)?
                .map_or(0, |d| u32::try_from(d).unwrap_or(u32::MAX))),
        }
    }
}

#[derive(Deserialize)]
pub struct WireSearch {
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    limit: Option<Value>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    since: Option<Value>,
    #[serde(default)]
    until: Option<Value>,
}

impl WireSearch {
    pub fn into_request(self) -> Result<SearchRequest, ApiError> {
        let cursor = match self.cursor {
            None => None,
            Some(text) => Some(text.parse::<MemoryId>().map_err(|_| {
                ApiError::invalid("`cursor` must be a `next_cursor` this API returned")
            })?),
        };
        Ok(SearchRequest {
            query: self.query,
            limit: positive_integer("limit", self.limit)?,
            cursor,
            session_id: self.session_id,
            tags: self.tags,
            since_ms: timestamp_ms("since", self.since)?,
            until_ms: timestamp_ms("until", self.until)?,
        })
    }
}

#[derive(Deserialize)]
struct WireUploadLine {
    content: Value,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// One upload line with its number (from 1), parsed or refused.
pub type ParsedLine = (usize, Result<UploadLine, ApiError>);

/// Splits a JSONL body into numbered lines (blank ones skipped) and parses each on its own,
/// so that one bad line is reported and the rest still count. Too many lines refuse it whole.
pub fn upload_lines(body: &[u8], max_lines: usize) -> Result<Vec<ParsedLine>, ApiError> {
    let lines: Vec<(usize, &[u8])> = body
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(index, line)| (index + 1, line.strip_suffix(b"\r").unwrap_or(line)))
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .collect();
    if lines.len() > max_lines {
        return Err(ApiError::TooManyLines {
            count: lines.len(),
            max: max_lines,
        });
    }
    Ok(lines
        .into_iter()
        .map(|(number, line)| (number, upload_line(line)))
        .collect())
}

fn upload_line(line: &[u8]) -> Result<UploadLine, ApiError> {
    let wire: WireUploadLine = parse(line)?;
    let content = match wire.content {
        Value::String(text) => text,
        other => {
            return Err(ApiError::invalid(format!(
                "`content` must be a string, got {}",
                kind_of(&other)
            )))
        }
    };
    let role = match wire.role.as_deref() {
        None => Role::User,
        Some(text) => Role::parse(text)
            .ok_or_else(|| ApiError::invalid("`role` must be user or assistant"))?,
    };
    Ok(UploadLine {
        content,
        role,
        timestamp_ms: timestamp_ms("timestamp", wire.timestamp)?,
        session_id: wire.session_id,
        tags: wire.tags,
    })
}

fn positive_integer(field: &str, value: Option<Value>) -> Result<Option<usize>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            None => Err(ApiError::invalid(format!(
                "`{field}` must be a positive integer, got {n}"
            ))),
        },
        Some(other) => Err(ApiError::invalid(format!(
            "`{field}` must be a positive integer, got {}",
            kind_of(&other)
        ))),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `content` as text: a string, the text parts of an array joined by newlines, or empty.
fn content_text(index: usize, content: Value) -> Result<String, ApiError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(text) => Ok(text),
        Value::Array(parts) => {
            let mut texts = Vec::new();
            for part in parts {
                match part {
                    Value::String(text) => texts.push(text),
                    Value::Object(mut fields) => {
                        if let Some(Value::String(text)) = fields.remove("text") {
                            texts.push(text);
                        }
                    }
                    other => {
                        return Err(ApiError::invalid(format!(
                            "messages[{index}].content parts must be objects or strings, got {}",
                            kind_of(&other)
                        )))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        other => Err(ApiError::invalid(format!(
            "messages[{index}].content must be a string or an array of parts, got {}",
            kind_of(&other)
        ))),
    }
}

/// RFC 3339 text or integer milliseconds since the epoch.
fn timestamp_ms(field: &str, value: Option<Value>) -> Result<Option<i64>, ApiError> {
    let ms = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(text)) => OffsetDateTime::parse(&text, &Rfc3339)
            .ok()
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64),
        Some(_) => None,
    };
    match ms {
        Some(ms) if (0..=MAX_TIMESTAMP_MS).contains(&ms) => Ok(Some(ms)),
        _ => Err(ApiError::invalid(format!(
            "`{field}` must be RFC 3339 text (2026-11-23T10:00:00Z) or epoch milliseconds \
             between 1970 and 9999"
        ))),
    }
}

fn messages(wire: Vec<WireMessage>, max_messages: usize) -> Result<Vec<Message>, ApiError> {
    if wire.len() > max_messages {
        return Err(ApiError::TooManyMessages {
            count: wire.len(),
            max: max_messages,
        });
    }
    wire.into_iter()
        .enumerate()
        .map(|(index, message)| {
            let role = Role::parse(&message.role).ok_or_else(|| {
                ApiError::invalid(format!(
                    "messages[{index}].role must be user, assistant, system, developer or tool"
                ))
            })?;
            Ok(Message {
                role,
                content: content_text(index, message.content)?,
                timestamp_ms: timestamp_ms(
                    &format!("messages[{index}].timestamp"),
                    message.timestamp,
                )?,
                remember: message.memory,
                tags: message.tags,
            })
        })
        .collect()
}

impl WirePrepare {
    pub fn into_request(self, max_messages: usize) -> Result<PrepareRequest, ApiError> {
        Ok(PrepareRequest {
            messages: messages(self.messages, max_messages)?,
            limit: positive_integer("limit", self.limit)?,
            max_tokens: positive_integer("max_tokens", self.max_tokens)?,
            tags: self.tags,
        })
    }
}

impl WireIngest {
    pub fn into_request(self, max_messages: usize) -> Result<IngestRequest, ApiError> {
        if let Some(model) = &self.model {
            if model.chars().count() > MAX_LABEL_CHARS {
                return Err(ApiError::invalid(format!(
                    "`model` must be at most {MAX_LABEL_CHARS} characters"
                )));
            }
        }
        Ok(IngestRequest {
            messages: messages(self.messages, max_messages)?,
            model: self.model,
            tags: self.tags,
        })
    }
}

pub fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

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
}

impl<'a> From<&'a PrepareResult> for WirePrepared<'a> {
    fn from(result: &'a PrepareResult) -> Self {
        WirePrepared {
            context: result.context.as_deref(),
            memories: result.memories.iter().map(WireMemory::from).collect(),
            tokens: result.tokens,
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

fn optional_time(ms: Option<i64>) -> Option<String> {
    ms.map(rfc3339)
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
        }
    }
}

#[derive(Serialize)]
pub struct WireMinted {
    key: String,
    key_info: WireKeyInfo,
}

impl From<MintedKey> for WireMinted {
    fn from(minted: MintedKey) -> Self {
        WireMinted {
            key: minted.key,
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
    let status = match (result.processed, result.failed) {
        (_, 0) => "completed",
        (0, _) => "failed",
        _ => "partial",
    };
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
    })
}

pub fn stats(stats: &VaultStats) -> Value {
    serde_json::json!({
        "count": stats.count,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_and_shape_errors_get_different_codes() {
        assert_eq!(
            parse::<WirePrepare>(b"{not json").err().unwrap().code(),
            "invalid_json"
        );
        assert_eq!(
            parse::<WirePrepare>(b"{\"messages\": 3}")
                .err()
                .unwrap()
                .code(),
            "invalid_request"
        );
        let deep = format!(
            r#"{{"messages": [{{"role": "user", "content": {}}}]}}"#,
            "[".repeat(10_000)
        );
        assert_eq!(
            parse::<WirePrepare>(deep.as_bytes()).err().unwrap().code(),
            "invalid_json"
        );
    }

    #[test]
    fn content_may_be_parts_or_null_and_unknown_fields_are_ignored() {
        let body = br#"{"messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, "b"]},
            {"role": "assistant", "content": null, "tool_calls": []}
        ], "stream": true}"#;
        let request = parse::<WirePrepare>(body)
            .unwrap()
            .into_request(10)
            .unwrap();
        assert_eq!(request.messages[0].content, "a\nb");
        assert_eq!(request.messages[1].content, "");
    }

    #[test]
    fn timestamps_take_rfc3339_or_epoch_ms() {
        assert_eq!(
            timestamp_ms("t", Some(Value::from(1_700_000_000_000i64))).unwrap(),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            timestamp_ms("t", Some(Value::from("2023-11-14T22:13:20Z"))).unwrap(),
            Some(1_700_000_000_000)
        );
        assert!(timestamp_ms("t", Some(Value::from("yesterday"))).is_err());
        assert!(timestamp_ms("t", Some(Value::from(-5))).is_err());
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn limits_must_be_positive_integers() {
        assert_eq!(
            positive_integer("limit", Some(Value::from(5))).unwrap(),
            Some(5)
        );
        assert!(positive_integer("limit", Some(Value::from(-1))).is_err());
        assert!(positive_integer("limit", Some(Value::from("5"))).is_err());
        assert!(positive_integer("limit", Some(Value::from(1.5))).is_err());
        let huge: Value = serde_json::from_str("1e300").unwrap();
        assert!(positive_integer("limit", Some(huge)).is_err());
    }

    #[test]
    fn upload_lines_are_numbered_from_one_and_fail_alone() {
        let body = b"{\"content\": \"a\"}\r\n\n{broken\n{\"content\": 5}\n{\"content\": \"b\", \"role\": \"robot\"}\n{\"content\": \"c\", \"role\": \"assistant\", \"tags\": [\"x\"], \"timestamp\": \"2024-01-01T00:00:00Z\"}";
        let lines = upload_lines(body, 10).unwrap();
        let numbers: Vec<usize> = lines.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [1, 3, 4, 5, 6]);
        assert!(lines[0].1.is_ok());
        assert_eq!(lines[1].1.as_ref().err().unwrap().code(), "invalid_json");
        assert_eq!(lines[2].1.as_ref().err().unwrap().code(), "invalid_request");
        assert!(lines[3].1.is_err());
        let last = lines[4].1.as_ref().unwrap();
        assert_eq!(last.role, Role::Assistant);
        assert_eq!(last.timestamp_ms, Some(1_704_067_200_000));
        assert_eq!(
            upload_lines(b"{}\n{}\n{}", 2).err().unwrap().code(),
            "too_many_lines"
        );
    }

    #[test]
    fn mint_requests_name_unknown_scopes() {
        let wire: WireMintKey = parse(br#"{"name": "x", "scopes": ["read", "root"]}"#).unwrap();
        let error = wire.into_request().err().unwrap();
        assert!(error.to_string().contains("root"));
        let wire: WireMintKey =
            parse(br#"{"name": "x", "scopes": ["delete"], "expires_days": 3}"#).unwrap();
        let request = wire.into_request().unwrap();
        assert_eq!(request.scopes, Some(vec![Scope::Delete]));
        assert_eq!(request.expires_days, Some(3));
    }

    #[test]
    fn unknown_roles_are_refused_with_their_index() {
        let body = br#"{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}"#;
        let error = parse::<WireIngest>(body)
            .unwrap()
            .into_request(10)
            .err()
            .unwrap();
        assert!(error.to_string().contains("messages[1].role"));
    }
}
