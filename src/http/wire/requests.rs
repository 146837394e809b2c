//! Request shapes, and their translation into domain requests.
//!
//! Messages take what chat gateways already send: OpenAI-style `content` as a string, an array
//! of parts, or null; unknown fields are ignored (a gateway may forward its whole chat request).

use serde::Deserialize;
use serde_json::Value;

use super::{kind_of, parse, positive_integer, timestamp_ms, vault_id};
use crate::app::change::{supersedes_field, Correction};
use crate::app::ingest::{check_label, IngestRequest, Message};
use crate::app::keys::MintRequest;
use crate::app::prepare::{Density, PrepareRequest};
use crate::app::search::SearchRequest;
use crate::app::upload::UploadLine;
use crate::auth::Mode;
use crate::bounds::MAX_LABEL_CHARS;
use crate::error::ApiError;
use crate::ids::{MemoryId, Role, Scope};

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
    /// MemoryRouter's name for `limit`; 0 means the default.
    #[serde(default)]
    context_limit: Option<Value>,
    #[serde(default)]
    context_tokens: Option<Value>,
    #[serde(default)]
    density: Option<Value>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    session_id: Option<Value>,
    #[serde(default)]
    session_isolation: Option<Value>,
    #[serde(default)]
    now: Option<Value>,
    #[serde(default)]
    since: Option<Value>,
    #[serde(default)]
    until: Option<Value>,
    #[serde(flatten)]
    switches: WireMemorySwitches,
    // `max_tokens`, if any, is the forwarded chat request's model setting, not ours: ignored
    // like every other unknown field.
}

#[derive(Deserialize)]
pub struct WireIngest {
    messages: Vec<WireMessage>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    session_id: Option<Value>,
    #[serde(default)]
    supersedes: Vec<String>,
    #[serde(flatten)]
    switches: WireMemorySwitches,
}

/// `PATCH /v1/memory/{id}`: the corrected text, and optionally new tags.
#[derive(Deserialize)]
pub struct WireCorrection {
    content: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

impl WireCorrection {
    pub fn into_correction(self) -> Correction {
        Correction {
            content: self.content,
            tags: self.tags,
        }
    }
}

/// What a request body says of its session (its id, winning over `X-Session-ID`, and whether
/// it is to be confined to it) and of memory (MemoryRouter's `memory`, `memory_mode`,
/// `memory_store`: they narrow what the request may do, as the headers do).
pub struct BodySession {
    pub id: Option<String>,
    pub isolation: Option<bool>,
    pub mode: Mode,
}

/// MemoryRouter's memory switches in a body.
#[derive(Deserialize, Default)]
pub struct WireMemorySwitches {
    #[serde(default)]
    memory: Option<Value>,
    #[serde(default)]
    memory_mode: Option<Value>,
    #[serde(default)]
    memory_store: Option<Value>,
}

impl WireMemorySwitches {
    fn mode(self) -> Result<Mode, ApiError> {
        let mut mode = Mode::FULL;
        if boolean_field("memory", self.memory)? == Some(false) {
            mode = Mode::parse("off").expect("off is a mode");
        }
        match self.memory_mode {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => {
                let named = Mode::parse(&text.to_ascii_lowercase()).ok_or_else(|| {
                    ApiError::invalid("`memory_mode` must be full (or on), read, write or off")
                })?;
                mode = mode.and(named);
            }
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "`memory_mode` must be a string, got {}",
                    kind_of(&other)
                )))
            }
        }
        if boolean_field("memory_store", self.memory_store)? == Some(false) {
            mode.store = false;
        }
        Ok(mode)
    }
}

#[derive(Deserialize)]
pub struct WireMintKey {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    session_isolation: Option<bool>,
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
            session_isolation: self.session_isolation.unwrap_or(false),
        })
    }
}

/// `POST /v1/admin/backup`: the new backup's name under `--backup-dir` (default: the time).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireBackup {
    #[serde(default)]
    pub name: Option<String>,
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
            current_only: false,
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
    #[serde(default)]
    supersedes: Vec<String>,
    #[serde(default)]
    superseded_by: Option<String>,
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
            .ok_or_else(|| ApiError::invalid("`role` must be user, assistant or system"))?,
    };
    Ok(UploadLine {
        content,
        role,
        timestamp_ms: timestamp_ms("timestamp", wire.timestamp)?,
        session_id: wire.session_id,
        tags: wire.tags,
        supersedes: supersedes_field(wire.supersedes, "supersedes")?,
        superseded_by: wire.superseded_by,
    })
}

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
    pub fn into_request(
        self,
        max_messages: usize,
    ) -> Result<(PrepareRequest, BodySession), ApiError> {
        let limit = match positive_integer("limit", self.limit)? {
            Some(limit) => Some(limit),
            None => positive_integer("context_limit", self.context_limit)?.filter(|n| *n > 0),
        };
        let density = match self.density {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(Density::parse(&text).ok_or_else(|| {
                ApiError::invalid("`density` must be low, default, high or xhigh")
            })?),
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "`density` must be low, default, high or xhigh, got {}",
                    kind_of(&other)
                )))
            }
        };
        let request = PrepareRequest {
            messages: messages(self.messages, max_messages)?,
            limit,
            context_tokens: positive_integer("context_tokens", self.context_tokens)?,
            density,
            tags: self.tags,
            now_ms: timestamp_ms("now", self.now)?,
            since_ms: timestamp_ms("since", self.since)?,
            until_ms: timestamp_ms("until", self.until)?,
        };
        let session = BodySession {
            id: session_field(self.session_id)?,
            isolation: boolean_field("session_isolation", self.session_isolation)?,
            mode: self.switches.mode()?,
        };
        Ok((request, session))
    }
}

impl WireIngest {
    pub fn into_request(
        self,
        max_messages: usize,
    ) -> Result<(IngestRequest, BodySession), ApiError> {
        if let Some(model) = &self.model {
            if model.chars().count() > MAX_LABEL_CHARS {
                return Err(ApiError::invalid(format!(
                    "`model` must be at most {MAX_LABEL_CHARS} characters"
                )));
            }
        }
        let request = IngestRequest {
            messages: messages(self.messages, max_messages)?,
            model: self.model,
            tags: self.tags,
            supersedes: supersedes_field(self.supersedes, "supersedes")?,
        };
        let session = BodySession {
            id: session_field(self.session_id)?,
            isolation: None,
            mode: self.switches.mode()?,
        };
        Ok((request, session))
    }
}

/// A body's `session_id`: a label (`null` or absent: none).
fn session_field(value: Option<Value>) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => {
            check_label(&text, "session_id")?;
            Ok(Some(text))
        }
        Some(other) => Err(ApiError::invalid(format!(
            "`session_id` must be a string, got {}",
            kind_of(&other)
        ))),
    }
}

fn boolean_field(field: &str, value: Option<Value>) -> Result<Option<bool>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(flag)) => Ok(Some(flag)),
        Some(other) => Err(ApiError::invalid(format!(
            "`{field}` must be true or false, got {}",
            kind_of(&other)
        ))),
    }
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
        let (request, _) = parse::<WirePrepare>(body)
            .unwrap()
            .into_request(10)
            .unwrap();
        assert_eq!(request.messages[0].content, "a\nb");
        assert_eq!(request.messages[1].content, "");
    }

    #[test]
    fn memoryrouter_fields_map_onto_ours_and_max_tokens_is_not_ours() {
        let body = br#"{"messages": [{"role": "user", "content": "q"}], "max_tokens": 4,
            "context_limit": 7, "density": "high", "session_id": "s1", "session_isolation": true}"#;
        let (request, session) = parse::<WirePrepare>(body)
            .unwrap()
            .into_request(10)
            .unwrap();
        assert_eq!(request.limit, Some(7));
        assert_eq!(
            request.context_tokens, None,
            "max_tokens is the model's, not the context's"
        );
        assert_eq!(request.density, Some(Density::High));
        assert_eq!(session.id.as_deref(), Some("s1"));
        assert_eq!(session.isolation, Some(true));
        // context_limit 0 is MemoryRouter's "default"; an explicit limit wins over it.
        let body =
            br#"{"messages": [{"role": "user", "content": "q"}], "context_limit": 0, "limit": 3}"#;
        let (request, _) = parse::<WirePrepare>(body)
            .unwrap()
            .into_request(10)
            .unwrap();
        assert_eq!(request.limit, Some(3));
        let body = br#"{"messages": [{"role": "user", "content": "q"}], "context_limit": 0}"#;
        let (request, _) = parse::<WirePrepare>(body)
            .unwrap()
            .into_request(10)
            .unwrap();
        assert_eq!(request.limit, None);
        let body = br#"{"messages": [{"role": "user", "content": "q"}], "density": "max"}"#;
        let error = parse::<WirePrepare>(body)
            .unwrap()
            .into_request(10)
            .err()
            .unwrap();
        assert!(error.to_string().contains("low, default, high or xhigh"));
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
