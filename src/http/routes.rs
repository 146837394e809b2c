//! The routes: the fixed set a path can name (also the `route` label of the HTTP metrics), the
//! methods each answers, and the dispatch from a request to its domain operation.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use super::request::{
    credential, read_body, read_json_body, read_optional_json_body, session_id, QueryParams,
    JSONL_TYPES,
};
use super::response::{empty, json, server_timing};
use super::{wire, Server};
use crate::app::keys::KeyQuery;
use crate::app::{blocking, App};
use crate::auth::{Access, MemoryAccess};
use crate::bounds::{MAX_PARAM_CHARS, MAX_UPLOAD_LINES};
use crate::error::ApiError;
use crate::ids::{KeyId, Scope};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
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

impl Route {
    /// The route of a path, and its parameter (`{id}`) if it has one.
    pub fn of(path: &str) -> (Route, Option<&str>) {
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

    pub fn label(self) -> &'static str {
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
    pub fn allowed(self) -> &'static str {
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

pub(super) async fn dispatch(
    server: &Server,
    route: Route,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let app = &server.app;
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
            let scraped = app.clone();
            let text = blocking(move || {
                scraped.refresh_gauges();
                Ok(scraped.metrics.render()?)
            })
            .await?;
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
    let _permit = server
        .inflight
        .try_acquire()
        .map_err(|_| ApiError::Overloaded("requests in flight"))?;
    let credential = credential(request.headers())?;
    let credential = credential.as_deref();
    let param: Option<String> = Route::of(request.uri().path())
        .1
        .map(|p| p.chars().take(MAX_PARAM_CHARS).collect());
    let param = param.as_deref().unwrap_or("");
    let method = request.method().clone();
    let query = QueryParams::parse(request.uri().query());
    let max_body = server.config.max_body_bytes;

    match (route, method) {
        (Route::Keys, Method::POST) => {
            query.only(&[])?;
            let manager = app.key_manager(credential).await?;
            let body = read_json_body(app, request, max_body).await?;
            let mint = wire::parse::<wire::WireMintKey>(&body)?.into_request()?;
            let minted = app.mint_key(&manager, mint).await?;
            Ok(json(StatusCode::CREATED, &wire::WireMinted::from(minted)))
        }
        (Route::Keys, _) => {
            query.only(&["include_revoked", "vault_id", "limit", "cursor"])?;
            let manager = app.key_manager(credential).await?;
            let list = KeyQuery {
                include_revoked: query.boolean("include_revoked")?.unwrap_or(false),
                vault: query.get("vault_id").map(wire::vault_id).transpose()?,
                cursor: query
                    .get("cursor")
                    .map(|text| {
                        text.parse::<KeyId>().map_err(|_| {
                            ApiError::invalid("`cursor` must be a `next_cursor` this API returned")
                        })
                    })
                    .transpose()?,
                limit: query.number("limit")?.unwrap_or(100),
            };
            let (keys, next) = app.list_keys(&manager, list).await?;
            Ok(json(StatusCode::OK, &wire::WireKeyList::new(keys, next)))
        }
        (Route::Key, Method::DELETE) => {
            query.only(&[])?;
            let manager = app.key_manager(credential).await?;
            app.revoke_key(&manager, param).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Route::Key, _) => {
            query.only(&[])?;
            let manager = app.key_manager(credential).await?;
            let info = app.key_info(&manager, param).await?;
            Ok(json(StatusCode::OK, &wire::WireKeyInfo::from(info)))
        }
        (Route::KeyRotate, _) => {
            query.only(&[])?;
            let manager = app.key_manager(credential).await?;
            let body = read_optional_json_body(app, request, max_body).await?;
            let grace_days = wire::parse::<wire::WireRotate>(&body)?.grace_days()?;
            let minted = app.rotate_key(&manager, param, grace_days).await?;
            Ok(json(StatusCode::CREATED, &wire::WireMinted::from(minted)))
        }
        (Route::Prepare, _) => {
            query.only(&[])?;
            let (access, session) = memory_caller(app, credential, &request).await?;
            let body = read_json_body(app, request, max_body).await?;
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
            let (access, session) = memory_caller(app, credential, &request).await?;
            let body = read_json_body(app, request, max_body).await?;
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
            let access = app.memory_access(credential).await?;
            access.require(Scope::Read)?;
            let body = read_json_body(app, request, max_body).await?;
            let search = wire::parse::<wire::WireSearch>(&body)?.into_request()?;
            let result = app.search(&access, search).await?;
            Ok(json(StatusCode::OK, &wire::WireSearchResult::from(&result)))
        }
        (Route::Upload, _) => {
            query.only(&[])?;
            let access = app.memory_access(credential).await?;
            // Refused before up to 16 MiB is read and parsed.
            access.require(Scope::Write)?;
            let max_bytes = server.config.max_upload_bytes;
            let body = read_body(app, request, JSONL_TYPES, max_bytes).await?;
            let lines = wire::upload_lines(&body, MAX_UPLOAD_LINES)?;
            let result = app.upload(&access, lines).await?;
            Ok(json(StatusCode::OK, &wire::upload_result(&result)))
        }
        (Route::Stats, _) => {
            query.only(&[])?;
            let access = app.memory_access(credential).await?;
            let stats = app.stats(&access).await?;
            Ok(json(StatusCode::OK, &wire::stats(&stats)))
        }
        (Route::Memory, _) => {
            query.only(&[])?;
            let (access, session) = memory_caller(app, credential, &request).await?;
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
            let access = app.memory_access(credential).await?;
            app.delete_memory(&access, param).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Route::Vault, _) => {
            query.only(&[])?;
            let admin = app.admin_access(credential).await?;
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
            let admin = app.admin_access(credential).await?;
            let cursor = match query.get("cursor") {
                None => None,
                Some(text) => Some(text.parse::<u64>().map_err(|_| {
                    ApiError::invalid("`cursor` must be a `next_cursor` this API returned")
                })?),
            };
            let limit = query.number("limit")?.unwrap_or(100);
            let (entries, next) = app.audit_log(&admin, cursor, limit).await?;
            Ok(json(StatusCode::OK, &wire::audit_page(&entries, next)))
        }
        (Route::Healthz | Route::Readyz | Route::Metrics | Route::Unknown, _) => {
            unreachable!("answered above")
        }
    }
}

/// A memory key's capability and the request's session.
async fn memory_caller(
    app: &std::sync::Arc<App>,
    credential: Option<&str>,
    request: &Request<Incoming>,
) -> Result<(MemoryAccess, Option<String>), ApiError> {
    let access = app.memory_access(credential).await?;
    Ok((access, session_id(request.headers())?))
}
