//! The JSON wire shapes, and their translation to and from domain types.
//!
//! Requests accept what chat gateways already send: OpenAI-style messages whose `content` is a
//! string, an array of parts, or null, and unknown fields (a gateway may forward its whole chat
//! request). Malformed JSON is `invalid_json`; well-formed JSON of the wrong shape is
//! `invalid_request`, with serde's description of what was wrong.
//!
//! Files: `requests` (request shapes into domain requests), `responses` (domain results into
//! response shapes); here, the parsing and the field checks both share.

mod requests;
mod responses;

use serde::Deserialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub use self::requests::{
    upload_lines, BodySession, ParsedLine, WireBackup, WireCorrection, WireIngest, WireMessage,
    WireMintKey, WirePrepare, WireRotate, WireSearch,
};
pub use self::responses::{
    audit_page, stats, upload_result, warmed, WireKeyInfo, WireKeyList, WireMemory, WireMinted,
    WirePrepared, WireSearchResult,
};
use crate::bounds::MAX_TIMESTAMP_MS;
use crate::error::ApiError;
use crate::ids::VaultId;

pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => ApiError::InvalidRequest(error.to_string()),
        _ => ApiError::InvalidJson(error.to_string()),
    })
}

/// A vault id as the API shows it, or `invalid_request`.
pub fn vault_id(text: &str) -> Result<VaultId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::invalid("`vault_id` must be `vlt_` and 32 hex digits, as key_info shows it")
    })
}

pub fn positive_integer(field: &str, value: Option<Value>) -> Result<Option<usize>, ApiError> {
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

pub fn kind_of(value: &Value) -> &'static str {
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
pub fn timestamp_ms(field: &str, value: Option<Value>) -> Result<Option<i64>, ApiError> {
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

pub fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn optional_time(ms: Option<i64>) -> Option<String> {
    ms.map(rfc3339)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
