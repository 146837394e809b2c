//! The routes: the fixed set a path can name (also the `route` label of the HTTP metrics), the
//! methods each answers, and the dispatch from a request to its domain operation.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use super::request::{
    credential, memory_mode, read_body, read_json_body, read_optional_json_body, session_id,
    session_isolation, QueryParams, JSONL_TYPES,
};
use super::response::{empty, json, server_timing};
use super::{mcp, wire, Server};
use crate::app::keys::KeyQuery;
use crate::app::session::SessionScope;
use crate::app::{blocking, App};
use crate::auth::{Access, MemoryAccess};
use crate::bounds::{MAX_MCP_MESSAGE_BYTES, MAX_PARAM_CHARS, MAX_UPLOAD_LINES};
use crate::config::Surface;
use crate::error::ApiError;
use crate::ids::{KeyId, Scope};

/// The OpenAPI 3.1 description of every route, served at `GET /openapi.json` (and checked
/// against this table by `tests/openapi.rs`).
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Health,
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
    Warmup,
    Memory,
    MemoryItem,
    Vaults,
    Vault,
    Audit,
    Backup,
    Check,
    Mcp,
    OpenApi,
    Unknown,
}

impl Route {
    /// The route of a path, and its parameter (`{id}`) if it has one.
    pub fn of(path: &str) -> (Route, Option<&str>) {
        // No trailing-slash folding: `DELETE /v1/memory/` (an empty id) must never mean
        // `DELETE /v1/memory` (the whole vault).
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        match segments.as_slice() {
            ["health"] => (Route::Health, None),
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
            ["v1", "memory", "warmup"] => (Route::Warmup, None),
            ["v1", "memory", id] => (Route::MemoryItem, Some(id)),
            ["v1", "vaults"] => (Route::Vaults, None),
            ["v1", "vaults", id] => (Route::Vault, Some(id)),
            ["v1", "audit"] => (Route::Audit, None),
            ["v1", "admin", "backup"] => (Route::Backup, None),
            ["v1", "admin", "check"] => (Route::Check, None),
            ["mcp"] => (Route::Mcp, None),
            ["openapi.json"] => (Route::OpenApi, None),
            _ => (Route::Unknown, None),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Route::Health => "health",
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
            Route::Warmup => "warmup",
            Route::Memory => "memory",
            Route::MemoryItem => "memory_item",
            Route::Vaults => "vaults",
            Route::Vault => "vault",
            Route::Audit => "audit",
            Route::Backup => "backup",
            Route::Check => "check",
            Route::Mcp => "mcp",
            Route::OpenApi => "openapi",
            Route::Unknown => "unknown",
        }
    }

    /// Whether a listener of this surface serves the route (`--admin-listen` splits them).
    pub fn served_on(self, surface: Surface) -> bool {
        let operator = matches!(
            self,
            Route::Keys
                | Route::Key
                | Route::KeyRotate
                | Route::Vaults
                | Route::Vault
                | Route::Audit
                | Route::Backup
                | Route::Check
                | Route::Metrics
        );
        let everywhere = matches!(
            self,
            Route::Health | Route::Healthz | Route::Readyz | Route::OpenApi
        );
        match surface {
            Surface::All => true,
            Surface::Admin => operator || everywhere,
            Surface::Gateway => !operator,
        }
    }

    /// The methods a route answers, as the `Allow` header lists them.
    pub fn allowed(self) -> &'static str {
        match self {
            Route::Health
            | Route::Healthz
            | Route::Readyz
            | Route::Metrics
            | Route::Stats
            | Route::Audit
            | Route::Vaults
            | Route::Check
            | Route::OpenApi => "GET",
            Route::Keys => "GET, POST",
            Route::Key => "GET, DELETE",
            Route::KeyRotate
            | Route::Prepare
            | Route::Ingest
            | Route::Search
            | Route::Upload
            | Route::Warmup
            | Route::Backup
            | Route::Mcp => "POST",
            Route::MemoryItem => "PATCH, DELETE",
            Route::Vault => "GET, DELETE",
            Route::Memory => "DELETE",
            Route::Unknown => "",
        }
    }

    /// Every route with a path, in table order.
    pub const ALL: [Route; 22] = [
        Route::Health,
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::OpenApi,
        Route::Keys,
        Route::Key,
        Route::KeyRotate,
        Route::Prepare,
        Route::Ingest,
        Route::Search,
        Route::Upload,
        Route::Stats,
        Route::Warmup,
        Route::Memory,
        Route::MemoryItem,
        Route::Vaults,
        Route::Vault,
        Route::Audit,
        Route::Backup,
        Route::Check,
        Route::Mcp,
    ];

    /// The route's path as OpenAPI writes it (`None` for no route).
    pub fn template(self) -> Option<&'static str> {
        Some(match self {
            Route::Health => "/health",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::Keys => "/v1/keys",
            Route::Key => "/v1/keys/{id}",
            Route::KeyRotate => "/v1/keys/{id}/rotate",
            Route::Prepare => "/v1/memory/prepare",
            Route::Ingest => "/v1/memory/ingest",
            Route::Search => "/v1/memory/search",
            Route::Upload => "/v1/memory/upload",
            Route::Stats => "/v1/memory/stats",
            Route::Warmup => "/v1/memory/warmup",
            Route::Memory => "/v1/memory",
            Route::MemoryItem => "/v1/memory/{id}",
            Route::Vaults => "/v1/vaults",
            Route::Vault => "/v1/vaults/{id}",
            Route::Audit => "/v1/audit",
            Route::Backup => "/v1/admin/backup",
            Route::Check => "/v1/admin/check",
            Route::Mcp => "/mcp",
            Route::Unknown => return None,
        })
    }

    /// Every status `method` on this route can be answered with (wrong methods aside: 405).
    /// The OpenAPI document lists exactly these (`tests/openapi.rs`).
    pub fn statuses(self, method: &str) -> &'static [u16] {
        // Keyed routes: 400 a bad request, 401 the key, 403 its scope, 429 rate or load, 500
        // internal, 503 not ready, stopping, storage or time; with a body, 413 and 415 too.
        match (self, method) {
            (Route::Health | Route::Metrics | Route::OpenApi, _) => &[200],
            (Route::Readyz | Route::Healthz, _) => &[200, 503],
            (Route::Keys, "POST") => &[201, 400, 401, 403, 404, 409, 413, 415, 429, 500, 503],
            (Route::Keys, _) => &[200, 400, 401, 403, 404, 429, 500, 503],
            (Route::Key, "DELETE") => &[204, 400, 401, 403, 404, 429, 500, 503],
            (Route::Key, _) => &[200, 400, 401, 403, 404, 429, 500, 503],
            (Route::KeyRotate, _) => &[201, 400, 401, 403, 404, 409, 413, 415, 429, 500, 503],
            (Route::Prepare | Route::Search, _) => &[200, 400, 401, 403, 413, 415, 429, 500, 503],
            (Route::Ingest, _) => &[202, 400, 401, 403, 404, 409, 413, 415, 429, 500, 503],
            (Route::Upload, _) => &[200, 400, 401, 403, 409, 413, 415, 429, 500, 503],
            (Route::Stats | Route::Warmup | Route::Memory | Route::Audit, _) => {
                &[200, 400, 401, 403, 429, 500, 503]
            }
            (Route::MemoryItem, "PATCH") => {
                &[200, 400, 401, 403, 404, 409, 413, 415, 429, 500, 503]
            }
            (Route::MemoryItem, _) => &[204, 400, 401, 403, 404, 429, 500, 503],
            (Route::Vault, _) => &[200, 400, 401, 403, 404, 429, 500, 503],
            (Route::Vaults, _) => &[200, 400, 401, 403, 429, 500, 503],
            (Route::Backup, _) => &[201, 400, 401, 403, 413, 415, 429, 500, 503],
            (Route::Check, _) => &[200, 401, 403, 429, 500, 503],
            (Route::Mcp, _) => &[200, 202, 400, 401, 403, 413, 415, 429, 500, 503],
            (Route::Unknown, _) => &[404],
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
    if route == Route::Unknown || !route.served_on(server.config.surface) {
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
        // Alive, unless the store failed in the way only a restart mends.
        Route::Healthz => {
            if !app.is_healthy() {
                return Err(ApiError::StorageUnavailable);
            }
            return Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})));
        }
        // MemoryRouter's liveness route and answer.
        Route::Health => {
            let timestamp = wire::rfc3339(app.now_ms());
            return Ok(json(
                StatusCode::OK,
                &serde_json::json!({"status": "healthy", "timestamp": timestamp}),
            ));
        }
        Route::Readyz => {
            app.check_ready()?;
            return Ok(json(
                StatusCode::OK,
                &serde_json::json!({"status": "ready"}),
            ));
        }
        Route::OpenApi => {
            let mut response = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(response);
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
            let (mut access, session) = memory_caller(app, credential, &request).await?;
            let headers_mode = memory_mode(request.headers())?;
            let body = read_json_body(app, request, max_body).await?;
            let max_messages = app.config().limits.max_messages;
            let (prepare, said) =
                wire::parse::<wire::WirePrepare>(&body)?.into_request(max_messages)?;
            // What the request's headers and body say of memory only ever narrows the key's.
            access.mode = access.mode.and(headers_mode).and(said.mode);
            let session = with_body(session, said);
            let result = app.prepare(&access, &session, prepare).await?;
            let mut response = json(StatusCode::OK, &wire::WirePrepared::from(&result));
            response
                .headers_mut()
                .insert("server-timing", server_timing(&result.timing));
            Ok(response)
        }
        (Route::Ingest, _) => {
            query.only(&[])?;
            let (mut access, session) = memory_caller(app, credential, &request).await?;
            let headers_mode = memory_mode(request.headers())?;
            let body = read_json_body(app, request, max_body).await?;
            let max_messages = app.config().limits.max_messages;
            let (ingest, said) =
                wire::parse::<wire::WireIngest>(&body)?.into_request(max_messages)?;
            access.mode = access.mode.and(headers_mode).and(said.mode);
            let session = with_body(session, said);
            let result = app.ingest(&access, &session, ingest).await?;
            let ids: Vec<String> = result.ids.iter().map(ToString::to_string).collect();
            Ok(json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"stored": result.stored, "ids": ids}),
            ))
        }
        (Route::Search, _) => {
            query.only(&[])?;
            let (access, session) = memory_caller(app, credential, &request).await?;
            access.require(Scope::Read)?;
            let body = read_json_body(app, request, max_body).await?;
            let search = wire::parse::<wire::WireSearch>(&body)?.into_request()?;
            let result = app.search(&access, &session, search).await?;
            Ok(json(StatusCode::OK, &wire::WireSearchResult::from(&result)))
        }
        (Route::Upload, _) => {
            query.only(&[])?;
            let (access, session) = memory_caller(app, credential, &request).await?;
            // Refused before up to 16 MiB is read and parsed.
            access.require(Scope::Write)?;
            let max_bytes = server.config.max_upload_bytes;
            let body = read_body(app, request, JSONL_TYPES, max_bytes).await?;
            let lines = wire::upload_lines(&body, MAX_UPLOAD_LINES)?;
            let result = app.upload(&access, &session, lines).await?;
            Ok(json(StatusCode::OK, &wire::upload_result(&result)))
        }
        (Route::Stats, _) => {
            query.only(&[])?;
            let access = app.memory_access(credential).await?;
            let stats = app.stats(&access).await?;
            Ok(json(StatusCode::OK, &wire::stats(&stats)))
        }
        (Route::Warmup, _) => {
            query.only(&[])?;
            let access = app.memory_access(credential).await?;
            let warmed = app.warmup(&access).await?;
            Ok(json(StatusCode::OK, &wire::warmed(&warmed)))
        }
        (Route::Memory, _) => {
            // `reset=true`: MemoryRouter's "full reset", the whole vault whatever the session.
            query.only(&["reset"])?;
            let reset = query.boolean("reset")?.unwrap_or(false);
            let (access, session) = memory_caller(app, credential, &request).await?;
            match session.id.filter(|_| !reset) {
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
        (Route::MemoryItem, Method::PATCH) => {
            query.only(&[])?;
            let access = app.memory_access(credential).await?;
            let body = read_json_body(app, request, max_body).await?;
            let correction = wire::parse::<wire::WireCorrection>(&body)?.into_correction();
            let corrected = app.correct_memory(&access, param, correction).await?;
            let ids: Vec<String> = corrected.ids.iter().map(ToString::to_string).collect();
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "id": corrected.id.to_string(),
                    "ids": ids,
                    "supersedes": corrected.supersedes.to_string(),
                }),
            ))
        }
        (Route::MemoryItem, _) => {
            query.only(&[])?;
            let access = app.memory_access(credential).await?;
            app.delete_memory(&access, param).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Route::Vaults, _) => {
            query.only(&["limit", "cursor"])?;
            let admin = app.admin_access(credential).await?;
            let cursor = query.get("cursor").map(wire::vault_id).transpose()?;
            let limit = query.number("limit")?.unwrap_or(100);
            let page = app.list_vaults(&admin, cursor, limit).await?;
            Ok(json(StatusCode::OK, &page))
        }
        (Route::Vault, Method::GET) => {
            query.only(&[])?;
            let admin = app.admin_access(credential).await?;
            let vault = param
                .parse()
                .map_err(|_| ApiError::VaultNotFound(param.to_owned()))?;
            let info = app.vault_info(&admin, vault).await?;
            Ok(json(StatusCode::OK, &info))
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
        (Route::Backup, _) => {
            query.only(&[])?;
            let admin = app.admin_access(credential).await?;
            let body = read_optional_json_body(app, request, max_body).await?;
            let name = wire::parse::<wire::WireBackup>(&body)?.name;
            let taken = app.backup(&admin, name).await?;
            Ok(json(StatusCode::CREATED, &taken))
        }
        (Route::Check, _) => {
            query.only(&[])?;
            app.admin_access(credential).await?;
            let report = app.check().await?;
            Ok(json(StatusCode::OK, &report))
        }
        (Route::Mcp, _) => {
            query.only(&[])?;
            let (access, _) = memory_caller(app, credential, &request).await?;
            let max_bytes = max_body.min(MAX_MCP_MESSAGE_BYTES);
            let body = read_json_body(app, request, max_bytes).await?;
            Ok(match mcp::handle(app, access, &body).await {
                mcp::Answer::Response(message) => json(StatusCode::OK, &message),
                mcp::Answer::Accepted => empty(StatusCode::ACCEPTED),
            })
        }
        (
            Route::Health
            | Route::Healthz
            | Route::Readyz
            | Route::Metrics
            | Route::OpenApi
            | Route::Unknown,
            _,
        ) => {
            unreachable!("answered above")
        }
    }
}

/// A memory key's capability and the request's session as its headers give it.
async fn memory_caller(
    app: &std::sync::Arc<App>,
    credential: Option<&str>,
    request: &Request<Incoming>,
) -> Result<(MemoryAccess, SessionScope), ApiError> {
    let access = app.memory_access(credential).await?;
    let headers = request.headers();
    let session = SessionScope {
        id: session_id(headers)?,
        isolation: session_isolation(headers)?,
    };
    Ok((access, session))
}

/// The session as the body says it, where it says it: the body wins over the headers.
fn with_body(mut session: SessionScope, body: wire::BodySession) -> SessionScope {
    if body.id.is_some() {
        session.id = body.id;
    }
    if body.isolation.is_some() {
        session.isolation = body.isolation;
    }
    session
}
