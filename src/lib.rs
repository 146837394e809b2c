//! memory-sidecar: a retrieval-only memory daemon that runs beside an LLM gateway.
//!
//! Around each model call the gateway calls `POST /v1/memory/prepare` (the conversation in, a
//! ready-to-inject `context` of this user's relevant memories out) and `POST /v1/memory/ingest`
//! (the finished exchange in, 202 once it is durable). Inference and provider keys never leave
//! the gateway; the only model here is a small local embedding model. A Memory Key (`mk_...`)
//! selects one user's private vault.
//!
//! # Layers
//!
//! `bounds, ids, vector, clock, fsio, metrics, notify, caller -> config, throttle, error, tombstones -> auth, crypto
//! -> store -> embed, index -> app -> http -> cli` (then `main.rs`). A module imports only from layers to its
//! left; `tests/layers.rs` reads every `crate::` path in `src/` and fails on one that points
//! right, or at a module missing from this line.
//!
//! # Code map
//!
//! - `main.rs`: flags -> [`config::Config`] -> tracing -> [`app::App::open`] ->
//!   [`http::serve`] -> [`app::App::close`].
//! - [`http`]: the only module that knows hyper and the wire JSON. `routes` (the route table,
//!   dispatch), `request` (credentials, query parameters, bodies within their bounds),
//!   `response` (the error shape), `wire` (JSON shapes: `requests` into domain requests,
//!   `responses` from domain results).
//! - [`app`]: the domain operations, one file each: `auth` (a credential to a capability),
//!   `ingest`, `prepare`, `render` (the context block), `search` (ranked search, export, stats,
//!   and the ranking step prepare shares), `upload`, `erase`, `keys`, `audit`; the background
//!   `indexer`; `locks` (one lock per vault) and `blocking` (the one way to blocking work).
//! - [`store`]: the system of record behind one interface, [`store::Backend`], one trait per
//!   kind of record, each in the file of that record kind beside sled's implementation; the
//!   group `commit` thread and the commit `ledger`.
//! - [`index`]: per-vault indexes derived from the store: `cache` (loaded indexes within a
//!   budget), `vault`, `hybrid` (the ranking), `lexical` (terms and BM25), `session` (the
//!   session chain), `graph` (HNSW), `dot` (the crate's only `unsafe`).
//! - [`embed`]: tokenizer and ONNX Runtime sessions on their own threads, fed by a queue
//!   (`queue`, tested without the model; `model`, the files, a session, one batch run).
//! - [`auth`]: key format, hashing, constant-time checks; yields [`auth::Access`].
//! - [`crypto`]: the master key and each vault's cipher (sealing, keyed digests); the
//!   `keyring` file of data keys wrapped by the master key.
//! - [`throttle`]: one token bucket, for each key's rate and each address's failures.
//! - [`error`]: the one request-path error and its table of stable codes and statuses.
//! - [`config`], [`metrics`], [`clock`] (injectable time), [`fsio`] (fsync, secret files),
//!   [`ids`] (the shared nouns), [`vector`] (the checked unit vector), [`bounds`] (every
//!   compile-time bound).
//!
//! # A prepare, step by step
//!
//! 1. `http::serve` accepts the connection within `--max-connections`; `http::routes::dispatch`
//!    matches the route and method, checks the daemon is ready, takes an in-flight permit, and
//!    reads the credential (`http::request::credential`).
//! 2. `App::memory_access` (`app/auth.rs`) parses the key (format, checksum:
//!    [`auth::PresentedKey::parse`]), then in a blocking task looks up its record by id,
//!    compares the secret's hash in constant time, checks revocation, rotation and expiry,
//!    and spends one request of the key's rate.
//! 3. The body is read within `--max-body-bytes` and parsed by `wire::WirePrepare` into a
//!    `PrepareRequest`.
//! 4. `App::prepare` (`app/prepare.rs`) checks scope, limits and messages, builds the query
//!    from the latest user turn (`build_query`), and embeds it: the query joins the model queue
//!    ahead of background work and an `embed-N` thread runs it.
//! 5. `App::recall` (`app/search.rs`) takes the vault's lock shared and, in a blocking task,
//!    loads the vault's index if needed ([`index::Indexes::with_index`]), ranks it
//!    ([`index::VaultIndex::search_hybrid`]), and reads each hit's record (and, for a short
//!    turn, the turn before it) from the store.
//! 6. Memories of the request's own session are lifted, repeats collapsed, and the best
//!    rendered within the token budget (`app/render.rs`); the answer carries `Server-Timing`.
//!
//! # An ingest, step by step
//!
//! 1. to 3. as for prepare, with `wire::WireIngest` into an `IngestRequest`.
//! 4. `App::ingest` (`app/ingest.rs`) keeps the user and assistant messages that are to be
//!    remembered, takes the vault's lock shared and, in a blocking task: finds the vault's data
//!    key, counts what is new by keyed digest, checks the disk reserve and the vault's size,
//!    and stores the batch atomically, each memory sealed and marked pending.
//! 5. It waits for a group commit (`store/commit.rs`: flush, fsync, ledger) that began after
//!    the write, then answers 202, and rings the indexer's doorbell.
//! 6. Later, the `indexer` thread reads pending memories a window at a time, embeds them as
//!    background work, and under the vault's lock writes each vector (which clears its pending
//!    mark) and adds it to the vault's index if loaded. A crash before that only means the
//!    memory is embedded at the next start.
//!
//! # Threads
//!
//! | thread | started by | does | stops |
//! |---|---|---|---|
//! | main | the process | opens the app, runs the runtime, closes the app | after `serve` returns |
//! | `http` (tokio workers) | `main` | accepts and answers requests | when the runtime is dropped, after the drain |
//! | tokio blocking pool | [`app::blocking`] | store, keyring and index work for requests | idle, or with the runtime |
//! | `embed-N` | [`embed::Embedder::open`] | model batches from the queue, queries first | the queue closes (`App::close`); joined |
//! | `indexer` | `App::start` | embeds pending memories, writes vectors, feeds indexes | `App::close` (stopping, queue closed); joined |
//! | `group-commit` | [`store::SledStore::open`] | flush + fsync + ledger, one per group of waiters | the backend's `close`; joined |
//! | `postgres` (2 tokio workers) | [`store::PgStore::open`] | drives the pool's connections (fleet mode only) | shut down in the background when the store drops |
//! | `count-memories` | `App::open` | counts every memory once, for a gauge | by itself |
//! | `hnsw-build` | `index::Indexes` | builds one large vault's graph | by itself (memory only) |
//!
//! `App::close` joins the indexer, then the model threads, then the commit thread, and syncs:
//! nothing writes after the final fsync.
//!
//! # Ground truth and derived state
//!
//! Ground truth, which nothing else can rebuild: in sled, `keys`, `vaults`, `memories` (sealed
//! text) and `audit`; the `keyring` file (each vault's data key, wrapped by the master key);
//! the `ledger` (how many commits were acknowledged); the admin and master key files. In
//! fleet mode (`store::PgStore`) the same records are PostgreSQL's tables, the wrapped data
//! keys included, and every node's index is a cache of them (docs/fleet.md).
//! Durable but derived (rebuilt from the above by the daemon's own code): `vectors` and their
//! metadata (by embedding the text again: the `pending` set says which are missing),
//! `dedup` digests, `vault_keys` (from `keys`), `key_used` (advisory, not made durable).
//! In memory only: every vault index, the per-vault memory counts, throttles, locks and every
//! gauge.
//!
//! # Invariants
//!
//! 1. Only `http` knows hyper and the wire JSON. Domain code takes and returns domain types.
//! 2. The store is the truth. Every index is derived and can be rebuilt from it at any time.
//! 3. An ingest is acknowledged only after it is durable (flush + fsync); embedding and indexing
//!    after the acknowledgement are replayed from the store's `pending` set after a crash. What
//!    every storage backend must promise for this is written at [`store`].
//! 4. Model inference never runs on a tokio worker thread; neither does any other blocking work
//!    (it goes through [`app::blocking`]).
//! 5. Everything has an upper bound: body bytes, messages, characters, tokens per text and per
//!    model batch, `limit`, queued texts, requests in flight, connections, request time. Past a
//!    bound: a clear error. Fixed bounds are in [`bounds`], the rest are flags.
//! 6. A vault is chosen by the key alone, never by anything else in the request.
//! 7. No key and no memory text is logged or used as a metric label.
//! 8. No memory text, vector or digest of a message reaches the disk unsealed by its vault's data
//!    key; erasing a vault destroys that key (durably) before removing any row.
//! 9. Every operation on a vault holds that vault's lock: shared to read or add, exclusive to
//!    delete.
//! 10. `unsafe` is denied everywhere but `index/dot.rs`.

#![deny(unsafe_code)]

pub mod app;
pub mod auth;
pub mod bounds;
pub mod caller;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod embed;
pub mod error;
pub mod fsio;
pub mod http;
pub mod ids;
pub mod index;
pub mod metrics;
pub mod notify;
pub mod store;
pub mod throttle;
pub mod tombstones;
pub mod vector;
