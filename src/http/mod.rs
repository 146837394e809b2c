//! The only module that knows hyper and the wire JSON: accept loop, routing, limits, shutdown.
//!
//! Every bound is enforced here before domain code runs: connections (a semaphore in front of
//! `accept`), header read time (hyper's timer), requests in flight (429 past the limit), body
//! bytes (413), and total request time. Shutdown stops accepting, lets in-flight requests finish
//! within a deadline, and answers any request that arrives meanwhile with 503 `shutting_down`.

mod wire;

use std::convert::Infallible;
use std::future::Future;
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

use crate::app::{App, MAX_LABEL_CHARS};
use crate::auth::{MemoryAccess, MAX_CREDENTIAL_LEN};
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
    Prepare,
    Ingest,
    Unknown,
}

impl Route {
    fn of(path: &str) -> Route {
        match path {
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/metrics" => Route::Metrics,
            "/v1/keys" => Route::Keys,
            "/v1/memory/prepare" => Route::Prepare,
            "/v1/memory/ingest" => Route::Ingest,
            _ => Route::Unknown,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Keys => "keys",
            Route::Prepare => "prepare",
            Route::Ingest => "ingest",
            Route::Unknown => "unknown",
        }
    }

    fn allowed(self) -> &'static str {
        match self {
            Route::Healthz | Route::Readyz | Route::Metrics => "GET",
            Route::Keys | Route::Prepare | Route::Ingest => "POST",
            Route::Unknown => "",
        }
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
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
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
            handle(service_app.clone(), service_inflight.clone(), request)
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
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let route = Route::of(request.uri().path());
    // Decremented on drop: hyper drops this future when a client hangs up mid-request.
    let _in_flight = InFlight::enter(&app.metrics.http_in_flight);
    let timeout = app.config().limits.request_timeout;
    let outcome =
        match tokio::time::timeout(timeout, dispatch(&app, &inflight, route, request)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ApiError::Timeout(timeout.as_millis() as u64)),
        };
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
    let expected = if route.allowed() == "GET" {
        Method::GET
    } else {
        Method::POST
    };
    if request.method() != expected
        && !(expected == Method::GET && request.method() == Method::HEAD)
    {
        return Err(ApiError::MethodNotAllowed {
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
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
            let text = app.metrics.render()?;
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return Ok(response);
        }
        Route::Keys | Route::Prepare | Route::Ingest | Route::Unknown => {}
    }

    app.check_serving()?;
    let _permit = inflight
        .try_acquire()
        .map_err(|_| ApiError::Overloaded("requests in flight"))?;
    let credential = credential(request.headers())?;

    match route {
        Route::Keys => {
            let admin = app.admin_access(credential.as_deref())?;
            let body = read_json_body(app, request).await?;
            let wire: wire::WireMintKey = wire::parse(&body)?;
            let minted = app.mint_key(&admin, wire.name()).await?;
            Ok(json(StatusCode::CREATED, &wire::WireMinted::from(minted)))
        }
        Route::Prepare => {
            let (access, session) = memory_caller(app, credential.as_deref(), request.headers())?;
            let body = read_json_body(app, request).await?;
            let max_messages = app.config().limits.max_messages;
            let prepare = wire::parse::<wire::WirePrepare>(&body)?.into_request(max_messages)?;
            let result = app.prepare(&access, session.as_deref(), prepare).await?;
            Ok(json(StatusCode::OK, &wire::WirePrepared::from(&result)))
        }
        Route::Ingest => {
            let (access, session) = memory_caller(app, credential.as_deref(), request.headers())?;
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
        Route::Healthz | Route::Readyz | Route::Metrics | Route::Unknown => {
            unreachable!("answered above")
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
fn credential(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
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

fn session_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
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

/// Reads a JSON body within the byte limit. Checked in order: media type, declared length,
/// actual length; then, since reading may have taken a while, whether shutdown began.
async fn read_json_body(app: &App, request: Request<Incoming>) -> Result<Bytes, ApiError> {
    let max_bytes = app.config().limits.max_body_bytes;
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
    if media_type != "application/json" {
        return Err(ApiError::UnsupportedMediaType(
            media_type.chars().take(100).collect(),
        ));
    }
    let declared = headers
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
        ApiError::Overloaded(_) | ApiError::NotReady | ApiError::StorageUnavailable => {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    response
}
