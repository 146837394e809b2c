//! The only module that knows hyper and the wire JSON: accept loop, routing, limits, shutdown.
//!
//! Every bound is enforced here before domain code runs: connections (a semaphore in front of
//! `accept`), header read time (hyper's timer), requests in flight (429 past the limit), body
//! bytes (413), and total request time. Shutdown stops accepting, lets in-flight requests finish
//! within a deadline, and answers any request that arrives meanwhile with 503 `shutting_down`.

pub mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::app::keys::KeyQuery;
use crate::app::vault::MAX_UPLOAD_LINES;
use crate::app::{App, PrepareTiming, MAX_LABEL_CHARS};
use crate::auth::{Access, MemoryAccess, Scope, MAX_CREDENTIAL_LEN};
use crate::error::ApiError;

/// Largest buffer hyper may hold for one connection's request head.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The routes, as a small fixed set: also the `route` label of the HTTP metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Healthz,
    Readyz,
    Metrics,
    Keys,
    Key,
    KeyRotate,
    Prepare,
    Ingest,
    Search,
    Upload,
    Stats,
    Memory,
    MemoryItem,
    Vault,
    Audit,
    Unknown,
}

/// Longest path parameter (a key, memory or vault id) looked at.
const MAX_PARAM_CHARS: usize = 100;

impl Route {
    /// The route of a path, and its parameter (`{id}`) if it has one.
    fn of(path: &str) -> (Route, Option<&str>) {
        // No trailing-slash folding: `DELETE /v1/memory/` (an empty id) must never mean
        // `DELETE /v1/memory` (the whole vault).
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        match segments.as_slice() {
            ["healthz"] => (Route::Healthz, None),
            ["readyz"] => (Route::Readyz, None),
            ["metrics"] => (Route::Metrics, None),
            ["v1", "keys"] => (Route::Keys, None),
            ["v1", "keys", id] => (Route::Key, Some(id)),
            ["v1", "keys", id, "rotate"] => (Route::KeyRotate, Some(id)),
            ["v1", "memory"] => (Route::Memory, None),
            ["v1", "memory", "prepare"] => (Route::Prepare, None),
            ["v1", "memory", "ingest"] => (Route::Ingest, None),
            ["v1", "memory", "search"] => (Route::Search, None),
            ["v1", "memory", "upload"] => (Route::Upload, None),
            ["v1", "memory", "stats"] => (Route::Stats, None),
            ["v1", "memory", id] => (Route::MemoryItem, Some(id)),
            ["v1", "vaults", id] => (Route::Vault, Some(id)),
            ["v1", "audit"] => (Route::Audit, None),
            _ => (Route::Unknown, None),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Keys => "keys",
            Route::Key => "key",
            Route::KeyRotate => "key_rotate",
            Route::Prepare => "prepare",
            Route::Ingest => "ingest",
            Route::Search => "search",
            Route::Upload => "upload",
            Route::Stats => "stats",
            Route::Memory => "memory",
            Route::MemoryItem => "memory_item",
            Route::Vault => "vault",
            Route::Audit => "audit",
            Route::Unknown => "unknown",
        }
    }

    /// The methods a route answers, as the `Allow` header lists them.
    fn allowed(self) -> &'static str {
        match self {
            Route::Healthz | Route::Readyz | Route::Metrics | Route::Stats | Route::Audit => "GET",
            Route::Keys => "GET, POST",
            Route::Key => "GET, DELETE",
            Route::KeyRotate | Route::Prepare | Route::Ingest | Route::Search | Route::Upload => {
                "POST"
            }
            Route::Memory | Route::MemoryItem | Route::Vault => "DELETE",
            Route::Unknown => "",
        }
    }

    fn allows(self, method: &Method) -> bool {
        let method = if method == Method::HEAD {
            "GET"
        } else {
            method.as_str()
        };
        self.allowed().split(", ").any(|m| m == method)
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains in-flight requests within
/// the configured deadline. Tests call this too.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let limits = app.config().limits.clone();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let inflight = Arc::new(Semaphore::new(limits.max_inflight));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);

    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit?,
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service_app = app.clone();
        let service_inflight = inflight.clone();
        let service = service_fn(move |request| {
            handle(
                service_app.clone(),
                service_inflight.clone(),
                peer.ip(),
                request,
            )
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        let gauge = app.metrics.http_connections.clone();
        gauge.inc();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            gauge.dec();
            drop(permit);
        });
    }

    app.begin_shutdown();
    drop(listener);
    tracing::info!(
        deadline_ms = limits.shutdown_timeout.as_millis() as u64,
        "shutting down: no longer accepting, finishing in-flight requests"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(limits.shutdown_timeout) => {
            tracing::warn!("shutdown deadline passed with requests still in flight; closing them");
        }
    }
    Ok(())
}

async fn handle(
    app: Arc<App>,
    inflight: Arc<Semaphore>,
    peer: IpAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let (route, _) = Route::of(request.uri().path());
    // Decremented on drop: hyper drops this future when a client hangs up mid-request.
    let _in_flight = InFlight::enter(&app.metrics.http_in_flight);
    let timeout = app.config().limits.request_timeout;
    let outcome =
        match tokio::time::timeout(timeout, dispatch(&app, &inflight, route, request)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ApiError::Timeout(timeout.as_millis() as u64)),
        }
        .map_err(|error| app.explain_store_failure(app.count_auth_failure(peer, error)));
    let response = outcome.unwrap_or_else(|error| error_response(route, error));
    let status_class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    tracing::debug!(
        route = route.label(),
        status = response.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    let metrics = &app.metrics;
    metrics
        .http_requests
        .with_label_values(&[route.label(), status_class])
        .inc();
    metrics
        .http_seconds
        .with_label_values(&[route.label()])
        .observe(started.elapsed().as_secs_f64());
    Ok(response)
}

/// Counts a request in flight for as long as it lives.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn enter(gauge: &prometheus::IntGauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn dispatch(
    app: &Arc<App>,
    inflight: &Arc<Semaphore>,
    route: Route,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if route == Route::Unknown {
        return Err(ApiError::NotFound(
            request.uri().path().chars().take(200).collect(),
        ));
    }
    if !route.allows(request.method()) {
        return Err(ApiError::MethodNotAllowed {
            method: request.method().to_string(),
            path: request.uri().path().chars().take(200).collect(),
            allowed: route.allowed(),
        });
    }
    match route {
        Route::Healthz => return Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"}))),
        Route::Readyz => {
            app.check_ready()?;
            return Ok(json(
                StatusCode::OK,
                &serde_json::json!({"status": "ready"}),
            ));
        }
        Route::Metrics => {
            app.refresh_gauges();
            let text = app.metrics.render()?;
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return Ok(response);
        }
        _ => {}
    }

    app.check_serving()?;
    let _permit = inflight
        .try_acquire()
        .map_err(|_| ApiError::Overloaded("requests in flight"))?;
    let credential = credential(request.headers())?;
    let credential = credential.as_deref();
    let param: Option<String> = Route::of(request.uri().path())
        .1
        .map(|p| p.chars().take(MAX_PARAM_CHARS).collect());
    let param = param.as_deref().unwrap_or("");
    let method = request.method().clone();
    let query = QueryParams::parse(request.uri().query())?;

    match (route, method) {
        (Route::Keys, Method::POST) => {
            query.only(&[])?;
            let manager = app.key_manager(credential)?;
            let body = read_json_body(app, request).await?;
            let mint = wire::parse::<wire::WireMintKey>(&body)?.into_request()?;
            let minted = app.mint_key(&manager, mint).await?;
            Ok(json(StatusCode::CREATED, &wire::WireMinted::from(minted)))
        }
        (Route::Keys, _) => {
            query.only(&["include_revoked", "vault_id", "limit", "cursor"])?;
            let manager = app.key_manager(credential)?;
            let list = KeyQuery {
                include_revoked: query.boolean("include_revoked")?.unwrap_or(false),
                vault: query.get("vault_id").map(wire::vault_id).transpose()?,
                cursor: query.get("cursor").map(str::to_owned),
                limit: query.number("limit")?.unwrap_or(100),
            };
            let (keys, next) = app.list_keys(&manager, list)?;
            Ok(json(StatusCode::OK, &wire::WireKeyList::new(keys, next)))
        }
        (Route::Key, Method::DELETE) => {
            query.only(&[])?;
            let manager = app.key_manager(credential)?;
            app.revoke_key(&manager, param).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Route::Key, _) => {
            query.only(&[])?;
            let manager = app.key_manager(credential)?;
            let info = app.key_info(&manager, param)?;
            Ok(json(StatusCode::OK, &wire::WireKeyInfo::from(info)))
        }
        (Route::KeyRotate, _) => {
            query.only(&[])?;
            let manager = app.key_manager(credential)?;
            let body = read_optional_json_body(app, request).await?;
            let grace_days = wire::parse::<wire::WireRotate>(&body)?.grace_days()?;
            let minted = app.rotate_key(&manager, param, grace_days).await?;
            Ok(json(StatusCode::CREATED, &wire::WireMinted::from(minted)))
        }
        (Route::Prepare, _) => {
            query.only(&[])?;
            let (access, session) = memory_caller(app, credential, request.headers())?;
            let body = read_json_body(app, request).await?;
            let max_messages = app.config().limits.max_messages;
            let prepare = wire::parse::<wire::WirePrepare>(&body)?.into_request(max_messages)?;
            let result = app.prepare(&access, session.as_deref(), prepare).await?;
            let mut response = json(StatusCode::OK, &wire::WirePrepared::from(&result));
            response
                .headers_mut()
                .insert("server-timing", server_timing(&result.timing));
            Ok(response)
        }
        (Route::Ingest, _) => {
            query.only(&[])?;
            let (access, session) = memory_caller(app, credential, request.headers())?;
            let body = read_json_body(app, request).await?;
            let max_messages = app.config().limits.max_messages;
            let ingest = wire::parse::<wire::WireIngest>(&body)?.into_request(max_messages)?;
            let result = app.ingest(&access, session.as_deref(), ingest).await?;
            let ids: Vec<String> = result.ids.iter().map(ToString::to_string).collect();
            Ok(json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"stored": result.stored, "ids": ids}),
            ))
        }
        (Route::Search, _) => {
            query.only(&[])?;
            let access = app.memory_access(credential)?;
            access.require(Scope::Read)?;
            let body = read_json_body(app, request).await?;
            let search = wire::parse::<wire::WireSearch>(&body)?.into_request()?;
            let result = app.search(&access, search).await?;
            Ok(json(StatusCode::OK, &wire::WireSearchResult::from(&result)))
        }
        (Route::Upload, _) => {
            query.only(&[])?;
            let access = app.memory_access(credential)?;
            // Refused before up to 16 MiB is read and parsed.
            access.require(Scope::Write)?;
            let max_bytes = app.config().limits.max_upload_bytes;
            let body = read_body(app, request, JSONL_TYPES, max_bytes).await?;
            let lines = wire::upload_lines(&body, MAX_UPLOAD_LINES)?;
            let result = app.upload(&access, lines).await?;
            Ok(json(StatusCode::OK, &wire::upload_result(&result)))
        }
        (Route::Stats, _) => {
            query.only(&[])?;
            let access = app.memory_access(credential)?;
            let stats = app.stats(&access).await?;
            Ok(json(StatusCode::OK, &wire::stats(&stats)))
        }
        (Route::Memory, _) => {
            query.only(&[])?;
            let (access, session) = memory_caller(app, credential, request.headers())?;
            match session {
                Some(session) => {
                    let deleted = app.delete_session(&access, &session).await?;
                    Ok(json(
                        StatusCode::OK,
                        &serde_json::json!({"deleted": deleted, "session_id": session}),
                    ))
                }
                None => {
                    let vault = access.vault;
                    let deleted = app
                        .erase_vault(&Access::Memory(access), vault, false)
                        .await?;
                    Ok(json(
                        StatusCode::OK,
                        &serde_json::json!({"deleted": deleted}),
                    ))
                }
            }
        }
        (Route::MemoryItem, _) => {
            query.only(&[])?;
            let access = app.memory_access(credential)?;
            app.delete_memory(&access, param).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Route::Vault, _) => {
            query.only(&[])?;
            let admin = app.admin_access(credential)?;
            let vault = param
                .parse()
                .map_err(|_| ApiError::VaultNotFound(param.to_owned()))?;
            let deleted = app.erase_vault(&admin, vault, true).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"deleted": deleted}),
            ))
        }
        (Route::Audit, _) => {
            query.only(&["limit", "cursor"])?;
            let admin = app.admin_access(credential)?;
            let cursor = match query.get("cursor") {
                None => None,
                Some(text) => Some(text.parse::<u64>().map_err(|_| {
                    ApiError::invalid("`cursor` must be a `next_cursor` this API returned")
                })?),
            };
            let limit = query.number("limit")?.unwrap_or(100);
            let (entries, next) = app.audit_log(&admin, cursor, limit)?;
            Ok(json(StatusCode::OK, &wire::audit_page(&entries, next)))
        }
        (Route::Healthz | Route::Readyz | Route::Metrics | Route::Unknown, _) => {
            unreachable!("answered above")
        }
    }
}

/// Media types an upload may declare: JSON Lines by any of its common names.
const JSONL_TYPES: &[&str] = &[
    "application/x-ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json-lines",
];

/// A URL's query parameters, checked against the names a route knows.
struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    fn parse(query: Option<&str>) -> Result<QueryParams, ApiError> {
        let mut params = Vec::new();
        for pair in query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .take(20)
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            params.push((name.to_owned(), value.to_owned()));
        }
        // An empty value (`?cursor=`) means the parameter is absent.
        params.retain(|(_, value)| !value.is_empty());
        Ok(QueryParams(params))
    }

    /// Refuses parameters the route does not know (a typo should not be silently ignored).
    fn only(&self, known: &[&str]) -> Result<(), ApiError> {
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

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(_) => Err(ApiError::invalid(format!("`{name}` must be true or false"))),
        }
    }

    fn number(&self, name: &str) -> Result<Option<usize>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| ApiError::invalid(format!("`{name}` must be a positive integer"))),
        }
    }
}

fn memory_caller(
    app: &App,
    credential: Option<&str>,
    headers: &HeaderMap,
) -> Result<(MemoryAccess, Option<String>), ApiError> {
    let access = app.memory_access(credential)?;
    Ok((access, session_id(headers)?))
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

/// Reads a JSON body within the byte limit.
async fn read_json_body(app: &App, request: Request<Incoming>) -> Result<Bytes, ApiError> {
    let max_bytes = app.config().limits.max_body_bytes;
    read_body(app, request, &["application/json"], max_bytes).await
}

/// Reads a JSON body that may be left out: an empty body reads as `{}`, whatever its declared
/// type; a non-empty one must be JSON.
async fn read_optional_json_body(app: &App, request: Request<Incoming>) -> Result<Bytes, ApiError> {
    let max_bytes = app.config().limits.max_body_bytes;
    let typed = request.headers().contains_key(CONTENT_TYPE);
    let body = if typed {
        read_json_body(app, request).await?
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
async fn read_body(
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

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// `Server-Timing` for a prepare: the query's wait for the model, the model run and the search,
/// in milliseconds, so that a caller can tell the daemon's own time from the model's.
fn server_timing(timing: &PrepareTiming) -> HeaderValue {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let value = format!(
        "queue;dur={:.3}, model;dur={:.3}, search;dur={:.3}",
        ms(timing.embed.queued),
        ms(timing.embed.model),
        ms(timing.search)
    );
    HeaderValue::from_str(&value).expect("digits, letters and punctuation only")
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(route: Route, error: ApiError) -> Response<Full<Bytes>> {
    let (code, status) = error.code_and_status();
    if let ApiError::Internal(cause) = &error {
        // Logged once, here. Causes carry ids and paths, never keys or memory text.
        tracing::error!(route = route.label(), error = %format!("{cause:#}"), "internal error");
    }
    let status = StatusCode::from_u16(status.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json(
        status,
        &serde_json::json!({"error": {"code": code, "message": error.to_string()}}),
    );
    let headers = response.headers_mut();
    match &error {
        ApiError::MethodNotAllowed { allowed, .. } => {
            headers.insert(ALLOW, HeaderValue::from_static(allowed));
        }
        ApiError::Overloaded(_)
        | ApiError::NotReady
        | ApiError::StorageUnavailable
        | ApiError::StorageUnreadable => {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        ApiError::DiskFull { .. } => {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("10"));
        }
        ApiError::RateLimited { retry_after_s } | ApiError::AuthRateLimited { retry_after_s } => {
            headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        _ => {}
    }
    response
}
