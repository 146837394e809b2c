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

use crate::app::{
    IngestRequest, Message, MintedKey, PrepareRequest, PrepareResult, Recalled, Role,
};
use crate::auth;
use crate::error::ApiError;

/// Earliest and latest timestamps accepted (1970 to 9999), in ms since the epoch.
const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

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
}

#[derive(Deserialize)]
pub struct WireIngest {
    messages: Vec<WireMessage>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
pub struct WireMintKey {
    name: String,
}

impl WireMintKey {
    pub fn name(&self) -> &str {
        &self.name
    }
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
fn timestamp_ms(index: usize, value: Option<Value>) -> Result<Option<i64>, ApiError> {
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
            "messages[{index}].timestamp must be RFC 3339 text (2026-11-23T10:00:00Z) or epoch \
             milliseconds between 1970 and 9999"
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
                timestamp_ms: timestamp_ms(index, message.timestamp)?,
                remember: message.memory,
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
        })
    }
}

impl WireIngest {
    pub fn into_request(self, max_messages: usize) -> Result<IngestRequest, ApiError> {
        if let Some(model) = &self.model {
            if model.chars().count() > crate::app::MAX_LABEL_CHARS {
                return Err(ApiError::invalid(format!(
                    "`model` must be at most {} characters",
                    crate::app::MAX_LABEL_CHARS
                )));
            }
        }
        Ok(IngestRequest {
            messages: messages(self.messages, max_messages)?,
            model: self.model,
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
    created_at: String,
    score: f32,
}

impl<'a> From<&'a Recalled> for WireMemory<'a> {
    fn from(memory: &'a Recalled) -> Self {
        WireMemory {
            id: memory.id.to_string(),
            content: &memory.record.content,
            role: &memory.record.role,
            session_id: memory.record.session_id.as_deref(),
            created_at: rfc3339(memory.record.created_at_ms),
            score: (memory.score * 10_000.0).round() / 10_000.0,
        }
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
pub struct WireKeyInfo {
    id: String,
    name: String,
    key_prefix: String,
    vault_id: String,
    created_at: String,
}

#[derive(Serialize)]
pub struct WireMinted {
    key: String,
    key_info: WireKeyInfo,
}

impl From<MintedKey> for WireMinted {
    fn from(minted: MintedKey) -> Self {
        let record = minted.record;
        WireMinted {
            key: minted.key,
            key_info: WireKeyInfo {
                key_prefix: auth::key_prefix(&record.id),
                id: record.id,
                name: record.name,
                vault_id: record.vault,
                created_at: rfc3339(record.created_at_ms),
            },
        }
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
            timestamp_ms(0, Some(Value::from(1_700_000_000_000i64))).unwrap(),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            timestamp_ms(0, Some(Value::from("2023-11-14T22:13:20Z"))).unwrap(),
            Some(1_700_000_000_000)
        );
        assert!(timestamp_ms(0, Some(Value::from("yesterday"))).is_err());
        assert!(timestamp_ms(0, Some(Value::from(-5))).is_err());
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
