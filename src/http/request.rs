//! Reading a request: its credential and session headers, its query parameters, and its body
//! within the byte bound and the media types a route accepts.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::Request;

use crate::app::App;
use crate::auth::{Mode, KEY_PREFIX};
use crate::bounds::{MAX_CREDENTIAL_LEN, MAX_LABEL_CHARS, MAX_QUERY_PARAMS};
use crate::error::ApiError;

/// Media types an upload may declare: JSON Lines by any of its common names, what MemoryRouter's
/// own clients send (`text/plain`, or curl's default, or JSON), and none at all.
pub const JSONL_TYPES: &[&str] = &[
    "application/x-ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json-lines",
    "text/plain",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "application/json",
    "",
];

/// Media types a JSON route accepts: JSON, or none declared.
pub const JSON_TYPES: &[&str] = &["application/json", ""];

/// A URL's query parameters, checked against the names a route knows.
pub struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    pub fn parse(query: Option<&str>) -> QueryParams {
        let mut params = Vec::new();
        for pair in query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .take(MAX_QUERY_PARAMS)
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            params.push((name.to_owned(), value.to_owned()));
        }
        // An empty value (`?cursor=`) means the parameter is absent.
        params.retain(|(_, value)| !value.is_empty());
        QueryParams(params)
    }

    /// Refuses parameters the route does not know (a typo should not be silently ignored).
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        match self
            .0
            .iter()
            .find(|(name, _)| !known.contains(&name.as_str()))
        {
            None => Ok(()),
            Some((name, _)) => Err(ApiError::invalid(format!(
                "unknown query parameter {:?}; this route takes {}",
                name.chars().take(40).collect::<String>(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(_) => Err(ApiError::invalid(format!("`{name}` must be true or false"))),
        }
    }

    pub fn number(&self, name: &str) -> Result<Option<usize>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| ApiError::invalid(format!("`{name}` must be a positive integer"))),
        }
    }
}

/// The memory or admin key, from `X-Memory-Key`, `Authorization: Bearer` or `x-api-key`. The
/// first of them (in that order) holding a memory key (`mk_...`) wins, so that a caller may
/// keep a provider key in `Authorization` and a gateway may send an empty `X-Memory-Key`
/// templated from an unset variable. Failing that, the first one given (the admin key, or a
/// key to refuse). Empty headers count as absent.
pub fn credential(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let candidates = [
        header_credential(headers, "x-memory-key", false),
        header_credential(headers, AUTHORIZATION.as_str(), true),
        header_credential(headers, "x-api-key", false),
    ];
    let mut first = None;
    for candidate in candidates {
        match candidate {
            Ok(Some(text)) if text.starts_with(KEY_PREFIX) => return Ok(Some(text)),
            Ok(None) => {}
            other => {
                first.get_or_insert(other);
            }
        }
    }
    first.unwrap_or(Ok(None))
}

/// One header's credential: `None` when absent or empty; `invalid_key` when it cannot be one
/// (not text, too long, or an `Authorization` that is not `Bearer`).
fn header_credential(
    headers: &HeaderMap,
    name: &str,
    bearer: bool,
) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| ApiError::InvalidKey)?.trim();
    let raw = if bearer && !text.is_empty() {
        let (scheme, token) = text.split_once(' ').ok_or(ApiError::InvalidKey)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::InvalidKey);
        }
        token.trim()
    } else {
        text
    };
    if raw.is_empty() {
        return Ok(None);
    }
    if raw.len() > MAX_CREDENTIAL_LEN {
        return Err(ApiError::InvalidKey);
    }
    Ok(Some(raw.to_owned()))
}

/// `X-Session-Isolation`: `on`/`true` confines the request to its session, `off`/`false` does
/// not; absent leaves the key's default.
pub fn session_isolation(headers: &HeaderMap) -> Result<Option<bool>, ApiError> {
    match headers.get("x-session-isolation").map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok("on" | "true")) => Ok(Some(true)),
        Some(Ok("off" | "false")) => Ok(Some(false)),
        Some(_) => Err(ApiError::invalid(
            "X-Session-Isolation must be on, off, true or false",
        )),
    }
}

/// The mode the request's memory headers leave: `X-Memory-Mode` (`full`, `read`, `write`,
/// `off`) and `X-Memory-Store: false` only ever narrow the key's own.
pub fn memory_mode(headers: &HeaderMap) -> Result<Mode, ApiError> {
    let mut mode = Mode::FULL;
    if let Some(value) = headers.get("x-memory-mode") {
        let text = value.to_str().unwrap_or("").trim().to_ascii_lowercase();
        mode = Mode::parse(&text)
            .ok_or_else(|| ApiError::invalid("X-Memory-Mode must be full, read, write or off"))?;
    }
    if let Some(value) = headers.get("x-memory-store") {
        match value
            .to_str()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "true" => {}
            "false" => mode.store = false,
            _ => return Err(ApiError::invalid("X-Memory-Store must be true or false")),
        }
    }
    Ok(mode)
}

pub fn session_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("x-session-id") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::invalid("X-Session-ID must be visible ASCII"))?
        .trim();
    if text.is_empty() || text.len() > MAX_LABEL_CHARS {
        return Err(ApiError::invalid(format!(
            "X-Session-ID must be 1 to {MAX_LABEL_CHARS} characters"
        )));
    }
    Ok(Some(text.to_owned()))
}

/// Reads a JSON body (declared so, or undeclared) within `max_bytes`.
pub async fn read_json_body(
    app: &App,
    request: Request<Incoming>,
    max_bytes: usize,
) -> Result<Bytes, ApiError> {
    read_body(app, request, JSON_TYPES, max_bytes).await
}

/// Reads a JSON body that may be left out: an empty body reads as `{}`.
pub async fn read_optional_json_body(
    app: &App,
    request: Request<Incoming>,
    max_bytes: usize,
) -> Result<Bytes, ApiError> {
    let body = read_json_body(app, request, max_bytes).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Bytes::from_static(b"{}"));
    }
    Ok(body)
}

/// Reads a body within the byte limit. Checked in order: media type, declared length, actual
/// length; then, since reading may have taken a while, whether shutdown began.
pub async fn read_body(
    app: &App,
    request: Request<Incoming>,
    media_types: &'static [&'static str],
    max_bytes: usize,
) -> Result<Bytes, ApiError> {
    let headers = request.headers();
    let media_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if !media_types.contains(&media_type.as_str()) {
        return Err(ApiError::UnsupportedMediaType {
            expected: media_types[0],
            got: media_type.chars().take(100).collect(),
        });
    }

    collect_body(app, request, max_bytes).await
}

/// Reads a body of at most `max_bytes`: the declared length is checked first, then the bytes
/// as they arrive.
async fn collect_body(
    app: &App,
    request: Request<Incoming>,
    max_bytes: usize,
) -> Result<Bytes, ApiError> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_bytes as u64) {
        return Err(ApiError::BodyTooLarge { max_bytes });
    }
    let body = Limited::new(request.into_body(), max_bytes)
        .collect()
        .await
        .map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                ApiError::BodyTooLarge { max_bytes }
            } else {
                ApiError::invalid(format!("could not read the request body: {error}"))
            }
        })?
        .to_bytes();
    if app.is_stopping() {
        return Err(ApiError::ShuttingDown);
    }
    Ok(body)
}
