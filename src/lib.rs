//! memory-sidecar: a retrieval-only memory daemon that runs beside an LLM gateway.
//!
//! Flow: around each model call the gateway calls `POST /v1/memory/prepare` (the conversation in,
//! a ready-to-inject `context` of this user's relevant memories out) and `POST /v1/memory/ingest`
//! (the finished exchange in, 202 once it is durable). Inference and provider keys never leave the
//! gateway; the only model here is a small local embedding model. A Memory Key (`mk_...`) selects
//! one user's private vault.
//!
//! Code map:
//! - `main.rs`: flags -> [`config::Config`] -> tracing -> [`app::App::open`] -> [`http::serve`].
//! - [`http`]: hyper, routes, wire JSON, limits, graceful shutdown.
//! - [`app`]: the domain operations (authenticate, prepare, ingest), the indexer; the key
//!   lifecycle and audit log ([`app::keys`]); search, upload, stats and erasure ([`app::vault`]).
//! - [`auth`]: key format, scopes, hashing, constant-time checks; yields an [`auth::Access`].
//! - [`crypto`]: per-vault data keys in the keyring file, wrapped by the master key; sealing.
//! - [`clock`]: injectable time, so expiry and grace periods are tested without sleeping.
//! - [`embed`]: tokenizer + ONNX Runtime session on their own thread, fed by a bounded queue.
//! - [`index`]: per-vault indexes (exact scan, HNSW when large; BM25 via [`lexical`]) and the
//!   hybrid ranking that fuses them, all derived from the store.
//! - [`store`]: sled, the single source of truth, and the group-commit thread.
//! - [`metrics`], [`error`], [`config`].
//!
//! Invariants:
//! 1. Only `http` knows hyper and the wire JSON. Domain code takes and returns domain types.
//! 2. The store is the truth. Every index is derived and can be rebuilt from it at any time.
//! 3. An ingest is acknowledged only after it is durable (flush + fsync); embedding and indexing
//!    after the acknowledgement are replayed from the store's `pending` set after a crash.
//! 4. Model inference never runs on a tokio worker thread.
//! 5. Everything has an upper bound: body bytes, messages, characters, tokens per text and per
//!    model batch, `limit`, queued texts, requests in flight, connections, request time. Past a
//!    bound: a clear error.
//! 6. A vault is chosen by the key alone, never by anything else in the request.
//! 7. No key and no memory text is logged or used as a metric label.
//! 8. No memory text, vector or digest of a message reaches the disk unsealed by its vault's data
//!    key; erasing a vault destroys that key (in place, fsynced) before removing any row.
//! 9. Every operation on a vault holds its lock: shared to read or add, exclusive to delete.

pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod embed;
pub mod error;
pub mod http;
pub mod index;
pub mod ledger;
pub mod lexical;
pub mod metrics;
pub mod store;
pub mod throttle;
