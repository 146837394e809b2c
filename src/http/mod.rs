//! The only module that knows hyper and the wire JSON: the accept loop, limits and shutdown
//! here; routing in [`routes`], request parsing in [`request`], responses in [`response`], the
//! JSON shapes in [`wire`].
//!
//! Every HTTP bound is enforced here before domain code runs, from the [`HttpConfig`] passed to
//! [`serve`]: connections (a semaphore in front of `accept`), header read time (hyper's timer),
//! requests in flight (429 past the limit), body bytes (413), and total request time. Shutdown
//! stops accepting, lets in-flight requests finish within a deadline, and answers any request
//! that arrives meanwhile with 503 `shutting_down`.

mod listener;
mod mcp;
mod request;
mod response;
mod routes;
pub mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::Semaphore;

pub use self::listener::Listener;
pub use self::request::{credential, session_id};
use self::response::error_response;
use self::routes::dispatch;
pub use self::routes::Route;
use crate::app::App;
use crate::bounds::{MAX_HEAD_BYTES, MAX_REQUEST_ID_CHARS};
use crate::caller;
pub use crate::config::HttpConfig;
use crate::error::ApiError;

/// What every request handler shares: the app, the HTTP bounds, the in-flight permits.
struct Server {
    app: Arc<App>,
    config: HttpConfig,
    inflight: Semaphore,
}

/// Serves `app` on `listener` within `config`'s bounds until `shutdown` resolves, then drains
/// in-flight requests within the configured deadline. Tests call this too.
pub async fn serve(
    app: Arc<App>,
    listener: impl Into<Listener>,
    config: HttpConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = listener.into();
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let server = Arc::new(Server {
        inflight: Semaphore::new(config.max_inflight),
        app: app.clone(),
        config: config.clone(),
    });
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
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
        let service_server = server.clone();
        let service = service_fn(move |request| handle(service_server.clone(), peer, request));
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
        deadline_ms = config.shutdown_timeout.as_millis() as u64,
        "shutting down: no longer accepting, finishing in-flight requests"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(config.shutdown_timeout) => {
            tracing::warn!("shutdown deadline passed with requests still in flight; closing them");
        }
    }
    Ok(())
}

/// The time a backup or a check may take before its answer is given up (the work itself runs
/// to the end).
const LONG_OPERATION_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

async fn handle(
    server: Arc<Server>,
    peer: IpAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let app = &server.app;
    let (route, _) = Route::of(request.uri().path());
    // Decremented on drop: hyper drops this future when a client hangs up mid-request.
    let _in_flight = InFlight::enter(&app.metrics.http_in_flight);
    // A backup or a check reads the whole store: the operator's client waits for it.
    let timeout = match route {
        Route::Backup | Route::Check => LONG_OPERATION_TIMEOUT,
        _ => server.config.request_timeout,
    };
    let request_id = request_id(request.headers());
    let trace_id = trace_id(request.headers());
    let method = request.method().clone();
    let (outcome, caller) = caller::scope(async {
        match tokio::time::timeout(timeout, dispatch(&server, route, request)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ApiError::Timeout(timeout.as_millis() as u64)),
        }
    })
    .await;
    let outcome =
        outcome.map_err(|error| app.explain_store_failure(app.count_auth_failure(peer, error)));
    let (mut response, error) = match outcome {
        Ok(response) => (response, None),
        Err(error) => {
            let code = error.code();
            (error_response(route, error), Some(code))
        }
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status_class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    if server.config.access_log {
        tracing::info!(
            target: "access",
            route = route.label(),
            method = %method,
            status = response.status().as_u16(),
            ms = started.elapsed().as_secs_f64() * 1000.0,
            key_id = caller.key_id.as_deref().unwrap_or("-"),
            vault = caller.vault.as_deref().unwrap_or("-"),
            peer = %peer,
            request_id = %request_id,
            trace_id = trace_id.as_deref().unwrap_or("-"),
            error = error.unwrap_or("-"),
            "request"
        );
    } else {
        tracing::debug!(
            route = route.label(),
            status = response.status().as_u16(),
            ms = started.elapsed().as_secs_f64() * 1000.0,
            request_id = %request_id,
            "request"
        );
    }
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

/// The request's `X-Request-ID` when it is one (1 to 128 of letters, digits and `-_.:`), else
/// a new one (16 hex digits). Echoed on the response, written in the access log.
fn request_id(headers: &hyper::HeaderMap) -> String {
    let given = headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            (1..=MAX_REQUEST_ID_CHARS).contains(&id.len())
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        });
    match given {
        Some(id) => id.to_owned(),
        None => format!("{:016x}", rand::random::<u64>()),
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if the request
/// carries a valid one: the access log carries it into the caller's trace.
fn trace_id(headers: &hyper::HeaderMap) -> Option<String> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let parts: Vec<&str> = value.trim().split('-').collect();
    let hex = |text: &str, len: usize| {
        text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let [version, trace, parent, flags] = parts.as_slice() else {
        return None;
    };
    let valid = hex(version, 2)
        && *version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then(|| (*trace).to_owned())
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
