//! Writing a response: JSON bodies, empty ones, the error shape
//! `{"error": {"code", "message"}}` with the headers each error carries (`Allow`,
//! `Retry-After`), and prepare's `Server-Timing`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

use super::routes::Route;
use crate::app::prepare::PrepareTiming;
use crate::error::ApiError;

pub fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// A JSON body. A value that cannot be serialised is an internal error, never a `{}`.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => json_bytes(status, body),
        Err(error) => error_response(
            Route::Unknown,
            ApiError::Internal(anyhow::anyhow!("serialising a response: {error}")),
        ),
    }
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `Server-Timing` for a prepare: the query's wait for the model, the model run and the search,
/// in milliseconds, so that a caller can tell the daemon's own time from the model's.
pub fn server_timing(timing: &PrepareTiming) -> HeaderValue {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let value = format!(
        "queue;dur={:.3}, model;dur={:.3}, search;dur={:.3}",
        ms(timing.embed.queued),
        ms(timing.embed.model),
        ms(timing.search)
    );
    HeaderValue::from_str(&value).expect("digits, letters and punctuation only")
}

pub fn error_response(route: Route, error: ApiError) -> Response<Full<Bytes>> {
    let (code, status) = error.code_and_status();
    if let ApiError::Internal(cause) = &error {
        // Logged once, here. Causes carry ids and paths, never keys or memory text.
        tracing::error!(route = route.label(), error = %format!("{cause:#}"), "internal error");
    }
    let status = StatusCode::from_u16(status.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({"error": {"code": code, "message": error.to_string()}});
    let mut response = json_bytes(status, body.to_string().into_bytes());
    let headers = response.headers_mut();
    match &error {
        ApiError::MethodNotAllowed { allowed, .. } => {
            headers.insert(ALLOW, HeaderValue::from_static(allowed));
        }
        ApiError::Overloaded(_)
        | ApiError::NotReady
        | ApiError::StorageUnavailable
        | ApiError::StorageUnreadable
        | ApiError::DatabaseUnavailable(_) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Unserialisable;

    impl serde::Serialize for Unserialisable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("refused"))
        }
    }

    #[test]
    fn a_body_that_cannot_be_serialised_is_a_500_not_an_empty_200() {
        let response = json(StatusCode::OK, &Unserialisable);
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let ok = json(StatusCode::CREATED, &serde_json::json!({"a": 1}));
        assert_eq!(ok.status(), StatusCode::CREATED);
    }

    #[test]
    fn errors_carry_their_retry_and_allow_headers() {
        let limited = error_response(Route::Unknown, ApiError::RateLimited { retry_after_s: 7 });
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers()[RETRY_AFTER], "7");
        let method = error_response(
            Route::Unknown,
            ApiError::MethodNotAllowed {
                method: "PUT".into(),
                path: "/x".into(),
                allowed: "GET",
            },
        );
        assert_eq!(method.headers()[ALLOW], "GET");
    }
}
