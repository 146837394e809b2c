//! The Model Context Protocol endpoint (`POST /mcp`, streamable HTTP): a user's memory as
//! tools for coding agents and assistants, authenticated by the same Memory Key as the REST
//! routes.
//!
//! JSON-RPC 2.0, one message per POST: `initialize`, `ping`, `tools/list` and `tools/call` are
//! answered as `application/json`; notifications get 202 with no body. No server-to-client
//! stream is offered (`GET /mcp` is 405, as the transport allows). Each tool maps onto the
//! operation its REST route runs, with that route's scopes; a key's mode suffix is honoured
//! (a `:read` key cannot store). Tool names follow MemoryRouter's where it has one.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::wire::{rfc3339, WireMemory};
use crate::app::ingest::{IngestRequest, Message};
use crate::app::search::SearchRequest;
use crate::app::session::SessionScope;
use crate::app::App;
use crate::auth::{Access, MemoryAccess};
use crate::bounds::MAX_MCP_MESSAGE_BYTES;
use crate::error::ApiError;
use crate::ids::{Role, Scope};

/// Protocol versions this endpoint speaks, newest first; a client asking for another is
/// answered with the newest.
const PROTOCOL_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

/// What the endpoint answers one POST with.
pub enum Answer {
    /// A JSON-RPC response (a result or an error), 200.
    Response(Value),
    /// A notification or a response from the client: nothing to say, 202.
    Accepted,
}

/// Handles one JSON-RPC message from a client holding `access`.
pub async fn handle(app: &Arc<App>, access: MemoryAccess, body: &[u8]) -> Answer {
    if body.len() > MAX_MCP_MESSAGE_BYTES {
        return Answer::Response(error(
            Value::Null,
            INVALID_REQUEST,
            &format!("a message may have at most {MAX_MCP_MESSAGE_BYTES} bytes"),
        ));
    }
    let message: Value = match serde_json::from_slice(body) {
        Ok(message) => message,
        Err(e) => return Answer::Response(error(Value::Null, PARSE_ERROR, &e.to_string())),
    };
    let Value::Object(message) = message else {
        return Answer::Response(error(
            Value::Null,
            INVALID_REQUEST,
            "one JSON-RPC object per request (batches are not supported)",
        ));
    };
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        // A response to a request of ours: we send none, so there is nothing to match.
        return Answer::Accepted;
    };
    let Some(id) = message.get("id").cloned() else {
        return Answer::Accepted;
    };
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    let result = match method {
        "initialize" => Ok(initialize(&params)),
        "ping" => Ok(json!({})),
        "tools/list" => Ok(json!({"tools": tools()})),
        "tools/call" => call_tool(app, &access, &params).await,
        other => Err((METHOD_NOT_FOUND, format!("no method {other:?} here"))),
    };
    Answer::Response(match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err((code, message)) => error(id, code, &message),
    })
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn initialize(params: &Value) -> Value {
    let asked = params.get("protocolVersion").and_then(Value::as_str);
    let version = asked
        .filter(|v| PROTOCOL_VERSIONS.contains(v))
        .unwrap_or(PROTOCOL_VERSIONS[0]);
    json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {"name": "memory-sidecar", "version": env!("CARGO_PKG_VERSION")},
        "instructions": "The user's long-term memory: search it before answering questions about \
            the user's life, preferences or past conversations; store what the user asks you to \
            remember.",
    })
}

/// The tools, with their input schemas.
fn tools() -> Value {
    let limit = json!({"type": "integer", "minimum": 1, "maximum": 100,
        "description": "Most memories to return (default 10)."});
    json!([
        {
            "name": "search_memories",
            "description": "Search the user's memories for those most relevant to a query.",
            "inputSchema": {"type": "object", "required": ["query"], "properties": {
                "query": {"type": "string", "minLength": 1},
                "limit": limit,
            }},
        },
        {
            "name": "date_search_memories",
            "description": "The user's memories from a time window (RFC 3339 instants), the most \
                relevant to `query` when one is given, else in the order they were stored.",
            "inputSchema": {"type": "object", "properties": {
                "since": {"type": "string", "format": "date-time"},
                "until": {"type": "string", "format": "date-time"},
                "query": {"type": "string", "minLength": 1},
                "limit": limit,
            }},
        },
        {
            "name": "store_memory",
            "description": "Store something the user said (or that was said to them) as a memory.",
            "inputSchema": {"type": "object", "required": ["content"], "properties": {
                "content": {"type": "string", "minLength": 1},
                "role": {"type": "string", "enum": ["user", "assistant"]},
                "session_id": {"type": "string"},
            }},
        },
        {
            "name": "memory_status",
            "description": "How many memories the user has, how much text, from when to when.",
            "inputSchema": {"type": "object", "properties": {}},
        },
        {
            "name": "delete_memories",
            "description": "Delete one memory (`memory_id`), one conversation's memories \
                (`session_id`), or all of them (`all`: true). Exactly one of the three.",
            "inputSchema": {"type": "object", "properties": {
                "memory_id": {"type": "string"},
                "session_id": {"type": "string"},
                "all": {"type": "boolean"},
            }},
        },
    ])
}

/// Runs a tool. A tool's own failure (a missing scope, a bad argument) is its result, marked
/// `isError`, so the model reads why; an unknown tool is a protocol error.
async fn call_tool(
    app: &Arc<App>,
    access: &MemoryAccess,
    params: &Value,
) -> Result<Value, (i64, String)> {
    let name = params.get("name").and_then(Value::as_str).unwrap_or("");
    let arguments = match params.get("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(arguments)) => arguments.clone(),
        Some(_) => return Err((INVALID_PARAMS, "`arguments` must be an object".to_owned())),
    };
    let outcome = match name {
        "search_memories" => search(app, access, &arguments, false).await,
        "date_search_memories" => search(app, access, &arguments, true).await,
        "store_memory" => store(app, access, &arguments).await,
        "memory_status" => status(app, access).await,
        "delete_memories" => delete(app, access, &arguments).await,
        other => return Err((INVALID_PARAMS, format!("no tool {other:?}"))),
    };
    Ok(match outcome {
        Ok(value) => json!({
            "content": [{"type": "text", "text": value.to_string()}],
            "structuredContent": value,
            "isError": false,
        }),
        Err(error) => json!({
            "content": [{"type": "text", "text": format!("{} ({})", error, error.code())}],
            "isError": true,
        }),
    })
}

fn text_argument(arguments: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match arguments.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(ApiError::invalid(format!("`{name}` must be a string"))),
    }
}

fn instant_argument(arguments: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    super::wire::timestamp_ms(name, arguments.get(name).cloned())
}

async fn search(
    app: &Arc<App>,
    access: &MemoryAccess,
    arguments: &Map<String, Value>,
    dated: bool,
) -> Result<Value, ApiError> {
    let query = text_argument(arguments, "query")?;
    if !dated && query.is_none() {
        return Err(ApiError::invalid("`query` is required"));
    }
    let limit = super::wire::positive_integer("limit", arguments.get("limit").cloned())?;
    let request = SearchRequest {
        query,
        limit: Some(limit.unwrap_or(10)),
        cursor: None,
        session_id: None,
        tags: Vec::new(),
        since_ms: if dated {
            instant_argument(arguments, "since")?
        } else {
            None
        },
        until_ms: if dated {
            instant_argument(arguments, "until")?
        } else {
            None
        },
        // A dated listing walks the export: an agent gets only what is current.
        current_only: true,
    };
    let found = app
        .search(access, &SessionScope::default(), request)
        .await?;
    let memories: Vec<Value> = found
        .memories
        .iter()
        .map(|m| serde_json::to_value(WireMemory::from(m)).unwrap_or_default())
        .collect();
    Ok(json!({"memories": memories}))
}

async fn store(
    app: &Arc<App>,
    access: &MemoryAccess,
    arguments: &Map<String, Value>,
) -> Result<Value, ApiError> {
    // Asked for outright, so a key that may not store is told, not silently ignored.
    access.require(Scope::Write)?;
    let content = text_argument(arguments, "content")?
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("`content` is required"))?;
    let role = match text_argument(arguments, "role")?.as_deref() {
        None | Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some(_) => return Err(ApiError::invalid("`role` must be user or assistant")),
    };
    let session = SessionScope::of(text_argument(arguments, "session_id")?.as_deref());
    if let Some(id) = &session.id {
        crate::app::ingest::check_label(id, "session_id")?;
    }
    let request = IngestRequest {
        messages: vec![Message {
            role,
            content,
            timestamp_ms: None,
            remember: true,
            tags: Vec::new(),
        }],
        model: None,
        supersedes: Vec::new(),
        tags: Vec::new(),
    };
    let stored = app.ingest(access, &session, request).await?;
    let ids: Vec<String> = stored.ids.iter().map(ToString::to_string).collect();
    Ok(json!({"stored": stored.stored, "ids": ids}))
}

async fn status(app: &Arc<App>, access: &MemoryAccess) -> Result<Value, ApiError> {
    let stats = app.stats(access).await?;
    Ok(json!({
        "memories": stats.count,
        "total_tokens": stats.tokens,
        "sessions": stats.sessions,
        "pending": stats.pending,
        "oldest": stats.oldest_ms.map(rfc3339),
        "newest": stats.newest_ms.map(rfc3339),
    }))
}

async fn delete(
    app: &Arc<App>,
    access: &MemoryAccess,
    arguments: &Map<String, Value>,
) -> Result<Value, ApiError> {
    let memory = text_argument(arguments, "memory_id")?;
    let session = text_argument(arguments, "session_id")?;
    let all = matches!(arguments.get("all"), Some(Value::Bool(true)));
    match (memory, session, all) {
        (Some(id), None, false) => {
            app.delete_memory(access, &id).await?;
            Ok(json!({"deleted": 1}))
        }
        (None, Some(session), false) => {
            let deleted = app.delete_session(access, &session).await?;
            Ok(json!({"deleted": deleted}))
        }
        (None, None, true) => {
            let deleted = app
                .erase_vault(&Access::Memory(access.clone()), access.vault, false)
                .await?;
            Ok(json!({"deleted": deleted}))
        }
        _ => Err(ApiError::invalid(
            "give exactly one of `memory_id`, `session_id` or `all: true`",
        )),
    }
}
