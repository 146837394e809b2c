//! Reading a request: its credential and session headers, its query parameters, and its body
//! within the byte bound and the media types a route accepts.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::Request;

use crate::app::App;
use crate::bounds::{MAX_CREDENTIAL_LEN, MAX_LABEL_CHARS, MAX_QUERY_PARAMS};
use crate::error::ApiError;

/// Media types an upload may declare: JSON Lines by any of its common names.
pub const JSONL_TYPES: &[&str] = &[
    "application/x-ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json-lines",
];

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

/// The memory or admin key: `X-Memory-Key` first (so a caller may keep a provider key in
/// `Authorization`), then `Authorization: Bearer`, then `x-api-key`.
pub fn credential(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let raw = if let Some(value) = headers.get("x-memory-key") {
        value.to_str().map_err(|_| ApiError::InvalidKey)?.trim()
    } else if let Some(value) = headers.get(AUTHORIZATION) {
        let text = value.to_str().map_err(|_| ApiError::InvalidKey)?;
        let (scheme, token) = text.split_once(' ').ok_or(ApiError::InvalidKey)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::InvalidKey);
        }
        token.trim()
    } else if let Some(value) = headers.get("x-api-key") {
        value.to_str().map_err(|_| ApiError::InvalidKey)?.trim()
    } else {
        return Ok(None);
    };
    if raw.is_empty() {
        return Ok(None);
    }
    if raw.len() > MAX_CREDENTIAL_LEN {
        return Err(ApiError::InvalidKey);
    }
    Ok(Some(raw.to_owned()))
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

/// Reads a JSON body within `max_bytes`.
pub async fn read_json_body(
    app: &App,
    request: Request<Incoming>,
    max_bytes: usize,
) -> Result<Bytes, ApiError> {
    read_body(app, request, &["application/json"], max_bytes).await
}

/// Reads a JSON body that may be left out: an empty body reads as `{}`, whatever its declared
/// type; a non-empty one must be JSON.
pub async fn read_optional_json_body(
    app: &App,
    request: Request<Incoming>,
    max_bytes: usize,
) -> Result<Bytes, ApiError> {
    let typed = request.headers().contains_key(CONTENT_TYPE);
    let body = if typed {
        read_json_body(app, request, max_bytes).await?
    } else {
        collect_body(app, request, max_bytes).await?
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Bytes::from_static(b"{}"));
    }
    if !typed {
        return Err(ApiError::UnsupportedMediaType {
            expected: "application/json",
            got: String::new(),
        });
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
