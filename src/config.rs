//! Flags and environment variables, validated once into a `Config` that is passed explicitly.
//!
//! Every flag has a `MEMORY_SIDECAR_*` variable; a flag given on the command line wins. Bounds are
//! checked here, at start-up, so the request path can trust them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Parser, ValueEnum};

use crate::bounds::{MAX_LIMIT_CEILING, MAX_MESSAGE_CHARS_CEILING, MAX_PASSAGES_CEILING};
use crate::ids::Scope;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// ONNX Runtime's graph optimisation level. `basic` measured fastest for this int8 model on
/// the reference machine (docs/benchmarks.md, "Embedding"): the extended fusions slow it down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphOptimization {
    Disable,
    Basic,
    Extended,
    All,
}

/// One listener: a TCP address (or hostname) and port, or a unix socket file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// `host:port`, as given (resolved when bound).
    Tcp(String),
    /// `unix:/absolute/path`.
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Listen, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!(
                    "a unix socket needs an absolute path: unix:/run/..., got {text:?}"
                ));
            }
            return Ok(Listen::Unix(path));
        }
        if text.parse::<SocketAddr>().is_ok() {
            return Ok(Listen::Tcp(text.to_owned()));
        }
        let fine = text.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && port.parse::<u16>().is_ok()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        });
        if fine {
            Ok(Listen::Tcp(text.to_owned()))
        } else {
            Err(format!(
                "expected host:port (127.0.0.1:8080, [::1]:8080, localhost:8080) or unix:/path, got {text:?}"
            ))
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(address) => write!(f, "{address}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How `unix:` listeners' socket files are made.
#[derive(Clone, Debug)]
pub struct UnixSocket {
    pub mode: u32,
    pub group: Option<String>,
}

fn parse_mode(text: &str) -> anyhow::Result<u32> {
    match u32::from_str_radix(text, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => bail!("--unix-socket-mode must be octal permissions such as 660, got {text:?}"),
    }
}

/// The raw command line, as clap sees it. Validated into [`Config`] by [`Flags::validate`].
#[derive(Clone, Debug, Parser)]
#[command(
    name = "memory-sidecar",
    version,
    about = "Retrieval-only memory sidecar for LLM gateways"
)]
pub struct Flags {
    /// Where to listen: `host:port` (an address or a hostname, every address it resolves to;
    /// port 0 for any free port) or `unix:/path` (a socket file, --unix-socket-mode and
    /// --unix-socket-group). Several, comma-separated or repeated.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_LISTEN",
        default_value = "127.0.0.1:8080",
        value_delimiter = ','
    )]
    pub listen: Vec<Listen>,
    /// Where to serve the operator's routes, as --listen: when set, key management, vaults,
    /// the audit log, backup, check and /metrics are served there and answer 404 on --listen,
    /// which then carries prepare, ingest and the memory routes alone (health on both).
    #[arg(long, env = "MEMORY_SIDECAR_ADMIN_LISTEN", value_delimiter = ',')]
    pub admin_listen: Vec<Listen>,
    /// The permissions of a `unix:` listener's socket file (octal), e.g. 660 for the owner and
    /// the group.
    #[arg(long, env = "MEMORY_SIDECAR_UNIX_SOCKET_MODE", default_value = "660")]
    pub unix_socket_mode: String,
    /// The group (name or number) given a `unix:` listener's socket file, e.g. the gateway's.
    #[arg(long, env = "MEMORY_SIDECAR_UNIX_SOCKET_GROUP")]
    pub unix_socket_group: Option<String>,
    /// Directory for the store and the generated admin key.
    #[arg(long, env = "MEMORY_SIDECAR_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Where the system of record lives: `sled` (the embedded store in --data-dir, the
    /// default) or a PostgreSQL connection string shared by a fleet of nodes, e.g.
    /// `postgresql://memory@db1:5432,db2:5432/memory?target_session_attrs=read-write`
    /// (docs/fleet.md). Every node of a fleet needs the same master key and admin key.
    #[arg(long, env = "MEMORY_SIDECAR_STORE", default_value = "sled")]
    pub store: String,
    /// With a PostgreSQL store: connections this node keeps at most.
    #[arg(long, env = "MEMORY_SIDECAR_STORE_POOL_SIZE", default_value_t = 16)]
    pub store_pool_size: usize,
    /// With a PostgreSQL store: how long a connection attempt, or a wait for a free
    /// connection, may take before the request is answered 503 (ms).
    #[arg(
        long,
        env = "MEMORY_SIDECAR_STORE_CONNECT_TIMEOUT_MS",
        default_value_t = 3000
    )]
    pub store_connect_timeout_ms: u64,
    /// With a PostgreSQL store: how long one statement may run (ms; PostgreSQL's
    /// statement_timeout).
    #[arg(
        long,
        env = "MEMORY_SIDECAR_STORE_STATEMENT_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub store_statement_timeout_ms: u64,
    /// With a PostgreSQL store: how long a node's claim on a memory it stored but has not yet
    /// embedded lasts (ms); if the node dies, another embeds the memory once it ran out.
    #[arg(long, env = "MEMORY_SIDECAR_STORE_LEASE_MS", default_value_t = 30_000)]
    pub store_lease_ms: u64,
    /// File holding the master key (64 hex digits) that wraps every vault's data key; generated
    /// (mode 0600) on first start when absent. Default: `<data-dir>/master.key`. Keep it off the
    /// data volume for real protection of a stolen disk. `MEMORY_SIDECAR_MASTER_KEY` (the key
    /// itself) wins over this file.
    #[arg(long, env = "MEMORY_SIDECAR_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// The tombstone journal: every vault erasure, memory deletion and key revocation (ids and
    /// times only), appended and fsynced before it is done, and applied by `restore` to a
    /// backup taken before it. Default: `<data-dir>/tombstones`. Keep it on another volume
    /// than the data directory, so that it survives the loss of that disk.
    #[arg(long, env = "MEMORY_SIDECAR_TOMBSTONE_LOG")]
    pub tombstone_log: Option<PathBuf>,
    /// Where `POST /v1/admin/backup` (and `memory-sidecar backup`) writes backups, one new
    /// directory each; nothing is written elsewhere. Default: `<data-dir>/backups`. Put it on
    /// another volume.
    #[arg(long, env = "MEMORY_SIDECAR_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Directory holding libonnxruntime.so.1.31.1, model.onnx and tokenizer.json (`make models`).
    #[arg(long, env = "MEMORY_SIDECAR_MODELS_DIR", default_value = "./models")]
    pub models_dir: PathBuf,
    /// Log format: text for a terminal, json for a log pipeline.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, env = "MEMORY_SIDECAR_LOG", default_value = "info")]
    pub log: String,

    /// Largest request body accepted, in bytes (413 past it). Sized for a gateway that forwards
    /// its whole chat request (system prompt, tools, pasted documents).
    #[arg(long, env = "MEMORY_SIDECAR_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Most messages in one prepare or ingest request (413 past it).
    #[arg(long, env = "MEMORY_SIDECAR_MAX_MESSAGES", default_value_t = 10_000)]
    pub max_messages: usize,
    /// Characters a stored message is cut at into passages, each embedded and ranked on its
    /// own; a shorter message is one memory.
    #[arg(long, env = "MEMORY_SIDECAR_PASSAGE_CHARS", default_value_t = 1000)]
    pub passage_chars: usize,
    /// Characters of a passage's end repeated at the start of the next, so that a sentence cut
    /// by a passage boundary is whole in one of them.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_PASSAGE_OVERLAP_CHARS",
        default_value_t = 100
    )]
    pub passage_overlap_chars: usize,
    /// Most passages one stored message may make (413 `message_too_long` past it). System,
    /// developer and tool messages are never stored, so this does not bound them.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_MAX_PASSAGES_PER_MESSAGE",
        default_value_t = 256
    )]
    pub max_passages_per_message: usize,
    /// Characters of the latest user turn(s) prepare looks at for its query (the rest is
    /// ignored), and the longest `query` search accepts.
    #[arg(long, env = "MEMORY_SIDECAR_MAX_QUERY_CHARS", default_value_t = 4000)]
    pub max_query_chars: usize,
    /// Memories prepare returns when the request gives no `limit` (nor `context_limit`, nor
    /// `density`).
    #[arg(long, env = "MEMORY_SIDECAR_DEFAULT_LIMIT", default_value_t = 10)]
    pub default_limit: usize,
    /// Largest `limit` a request may ask for (at least 50).
    #[arg(long, env = "MEMORY_SIDECAR_MAX_LIMIT", default_value_t = 100)]
    pub max_limit: usize,
    /// Context budget in tokens when the request gives no `context_tokens` (nor `density`).
    #[arg(
        long,
        alias = "default-max-tokens",
        env = "MEMORY_SIDECAR_DEFAULT_CONTEXT_TOKENS",
        default_value_t = 1500
    )]
    pub default_context_tokens: usize,
    /// Largest `context_tokens` a request may ask for.
    #[arg(
        long,
        alias = "max-max-tokens",
        env = "MEMORY_SIDECAR_MAX_CONTEXT_TOKENS",
        default_value_t = 16_000
    )]
    pub max_context_tokens: usize,
    /// Scopes a key minted without `scopes` gets (comma-separated; a memory key minting gets
    /// those of them it holds). With delete, a user's own key can erase their data, as
    /// MemoryRouter's account deletion expects.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_DEFAULT_SCOPES",
        default_value = "read,write,delete",
        value_delimiter = ','
    )]
    pub default_scopes: Vec<String>,
    /// Largest JSONL upload body, in bytes (413 past it).
    #[arg(long, env = "MEMORY_SIDECAR_MAX_UPLOAD_BYTES", default_value_t = 16 << 20)]
    pub max_upload_bytes: usize,
    /// Most memories one vault may hold (409 `vault_full` past it).
    #[arg(
        long,
        env = "MEMORY_SIDECAR_MAX_VAULT_MEMORIES",
        default_value_t = 100_000
    )]
    pub max_vault_memories: usize,
    /// Audit log entries kept; the oldest are dropped past it.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_MAX_AUDIT_ENTRIES",
        default_value_t = 1_000_000
    )]
    pub max_audit_entries: usize,
    /// Requests per second one memory key may make, sustained (0 = no limit).
    #[arg(
        long,
        env = "MEMORY_SIDECAR_KEY_RATE_PER_SECOND",
        default_value_t = 50.0
    )]
    pub key_rate_per_second: f64,
    /// Requests one memory key may make in a burst above its rate.
    #[arg(long, env = "MEMORY_SIDECAR_KEY_BURST", default_value_t = 100)]
    pub key_burst: u32,
    /// Failed authentications per second one client address may make, sustained, before its
    /// keyed requests get 429 `auth_rate_limited` (0 = no limit).
    #[arg(
        long,
        env = "MEMORY_SIDECAR_AUTH_FAILURES_PER_SECOND",
        default_value_t = 20.0
    )]
    pub auth_failures_per_second: f64,
    /// Failed authentications one client address may make in a burst above that rate.
    #[arg(long, env = "MEMORY_SIDECAR_AUTH_FAILURE_BURST", default_value_t = 200)]
    pub auth_failure_burst: u32,
    /// Free space, in MiB, kept on the data directory's filesystem: below it, new memories and
    /// keys get 503 `disk_full`, while reads, deletes and revocations go on using the reserve.
    #[arg(long, env = "MEMORY_SIDECAR_MIN_FREE_MB", default_value_t = 64)]
    pub min_free_mb: u64,
    /// Open connections at once; further connections wait in the kernel's backlog.
    #[arg(long, env = "MEMORY_SIDECAR_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Requests being worked on at once; past it, 429 `overloaded`.
    #[arg(long, env = "MEMORY_SIDECAR_MAX_INFLIGHT", default_value_t = 256)]
    pub max_inflight: usize,
    /// Texts waiting for the model from requests (prepare queries); past it, 429.
    #[arg(long, env = "MEMORY_SIDECAR_EMBED_QUEUE_TEXTS", default_value_t = 1024)]
    pub embed_queue_texts: usize,
    /// Time allowed to read a request's headers, in milliseconds (also the idle keep-alive limit).
    #[arg(
        long,
        env = "MEMORY_SIDECAR_HEADER_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub header_timeout_ms: u64,
    /// Time allowed for a whole request, body included, in milliseconds.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_REQUEST_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub request_timeout_ms: u64,
    /// On SIGTERM, how long in-flight requests may take to finish, in milliseconds.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_SHUTDOWN_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub shutdown_timeout_ms: u64,

    /// Threads ONNX Runtime uses for one batch (0 = one per core), shared out among the
    /// model workers.
    #[arg(long, env = "MEMORY_SIDECAR_EMBED_THREADS", default_value_t = 0)]
    pub embed_threads: usize,
    /// Model workers: sessions that each run their own batches from the one queue, with
    /// `--embed-threads` divided among them (1 = one session using every thread).
    #[arg(long, env = "MEMORY_SIDECAR_EMBED_WORKERS", default_value_t = 1)]
    pub embed_workers: usize,
    /// ONNX Runtime graph optimisation level.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_EMBED_GRAPH_OPTIMIZATION",
        value_enum,
        default_value = "basic"
    )]
    pub embed_graph_optimization: GraphOptimization,
    /// Let ONNX Runtime's threads spin between model runs (true) instead of sleeping (false).
    /// Spinning made a lone query ~1 ms faster here but cost ~0.8 of a core at 60 requests/s,
    /// and fewer prepares at saturation: a sidecar shares its cores (docs/benchmarks.md).
    #[arg(long, env = "MEMORY_SIDECAR_EMBED_SPIN", default_value_t = false, action = ArgAction::Set)]
    pub embed_spin: bool,
    /// Most texts in one model batch of queries.
    #[arg(long, env = "MEMORY_SIDECAR_EMBED_BATCH_TEXTS", default_value_t = 32)]
    pub embed_batch_texts: usize,
    /// Most texts in one model batch of background (indexing) work. A query that arrives while
    /// one runs waits for it, so this bounds what indexing adds to a query's latency.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_EMBED_BACKGROUND_BATCH_TEXTS",
        default_value_t = 8
    )]
    pub embed_background_batch_texts: usize,
    /// Most padded tokens (texts times the longest text's word pieces) in one model batch: a
    /// few long texts do not make a batch of short ones pay for their length.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_EMBED_BATCH_TOKENS",
        default_value_t = 2048
    )]
    pub embed_batch_tokens: usize,
    /// Word pieces kept per text; longer texts are truncated for embedding (the model takes 512).
    #[arg(long, env = "MEMORY_SIDECAR_MAX_TEXT_TOKENS", default_value_t = 256)]
    pub max_text_tokens: usize,

    /// Lowest cosine similarity a memory needs to be returned by prepare.
    #[arg(long, env = "MEMORY_SIDECAR_MIN_SCORE", default_value_t = 0.25)]
    pub min_score: f32,
    /// Lowest BM25 score that makes a memory relevant to prepare without the cosine floor.
    #[arg(long, env = "MEMORY_SIDECAR_MIN_LEXICAL", default_value_t = 1.0)]
    pub min_lexical: f32,
    /// Weight of the dense (cosine) z-score in the hybrid ranking; the lexical (BM25) one gets
    /// the rest. 1 is dense only, 0 lexical only.
    #[arg(long, env = "MEMORY_SIDECAR_DENSE_WEIGHT", default_value_t = 0.6)]
    pub dense_weight: f32,
    /// Share of a memory's best session neighbour's score added to its own.
    #[arg(long, env = "MEMORY_SIDECAR_NEIGHBOUR_WEIGHT", default_value_t = 0.35)]
    pub neighbour_weight: f32,
    /// Added to the ranking score (in standard deviations) of memories from the request's own
    /// session.
    #[arg(long, env = "MEMORY_SIDECAR_SESSION_BOOST", default_value_t = 0.25)]
    pub session_boost: f32,
    /// Added to the ranking score (in standard deviations) of memories from the time a
    /// question names ("yesterday", "last week", "in May"), relative to the request's `now`.
    #[arg(long, env = "MEMORY_SIDECAR_TIME_WINDOW_BOOST", default_value_t = 0.5)]
    pub time_window_boost: f32,
    /// Half-life, in days, of the recency lift: a memory this old gets half of
    /// `--recency-weight`. 0 turns recency off, ranking by relevance alone.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_RECENCY_HALF_LIFE_DAYS",
        default_value_t = 0.0
    )]
    pub recency_half_life_days: f32,
    /// Most the recency lift adds (in standard deviations), to a memory made just now.
    #[arg(long, env = "MEMORY_SIDECAR_RECENCY_WEIGHT", default_value_t = 0.2)]
    pub recency_weight: f32,
    /// A query shorter than this many words is joined with the messages before it.
    #[arg(long, env = "MEMORY_SIDECAR_SHORT_QUERY_WORDS", default_value_t = 8)]
    pub short_query_words: usize,
    /// Vault size from which an HNSW graph serves queries instead of an exact scan.
    #[arg(long, env = "MEMORY_SIDECAR_HNSW_THRESHOLD", default_value_t = 50_000)]
    pub hnsw_threshold: usize,
    /// Memories kept in loaded vault indexes; past it the least recently queried vaults'
    /// indexes are dropped and loaded again on their next query.
    #[arg(
        long,
        env = "MEMORY_SIDECAR_MAX_LOADED_MEMORIES",
        default_value_t = 400_000
    )]
    pub max_loaded_memories: usize,
    /// Start even if the store lost commits its ledger says were acknowledged (a damaged or
    /// replaced store), serving what it still holds; the ledger is reset to the store.
    #[arg(long, env = "MEMORY_SIDECAR_ACCEPT_LOST_COMMITS")]
    pub accept_lost_commits: bool,
    /// When the store's vectors come from another model than the one in --models-dir: embed
    /// every memory again with this one (ready once done) instead of refusing to start.
    #[arg(long, env = "MEMORY_SIDECAR_REEMBED")]
    pub reembed: bool,
    /// Once the store has failed in the way that needs a restart, keep serving reads (for
    /// inspection) instead of draining and exiting with code 3.
    #[arg(long, env = "MEMORY_SIDECAR_KEEP_SERVING_AFTER_STORAGE_FAILURE")]
    pub keep_serving_after_storage_failure: bool,
    /// sled's page cache, in bytes.
    #[arg(long, env = "MEMORY_SIDECAR_CACHE_BYTES", default_value_t = 256 << 20)]
    pub cache_bytes: u64,
    /// Log one line per request at info (target `access`): route, method, status, duration,
    /// key id, vault, peer, request id and trace id; never a secret or a memory text.
    #[arg(long, env = "MEMORY_SIDECAR_ACCESS_LOG")]
    pub access_log: bool,
}

/// The validated configuration. Secrets never live here (the admin key is read by `auth`, the
/// master key by `crypto`).
#[derive(Clone, Debug)]
pub struct Config {
    pub store: StoreConfig,
    pub listen: Vec<Listen>,
    pub admin_listen: Vec<Listen>,
    pub unix_socket: UnixSocket,
    pub data_dir: PathBuf,
    pub master_key_file: PathBuf,
    pub tombstone_log: PathBuf,
    pub backup_dir: PathBuf,
    pub models_dir: PathBuf,
    pub log_format: LogFormat,
    pub log: String,
    pub http: HttpConfig,
    pub limits: Limits,
    pub embed: EmbedConfig,
    pub retrieval: RetrievalConfig,
    pub cache_bytes: u64,
    pub accept_lost_commits: bool,
    pub reembed: bool,
    pub keep_serving_after_storage_failure: bool,
    pub access_log: bool,
}

/// Which backend holds the system of record.
#[derive(Clone)]
pub enum StoreConfig {
    /// The embedded store in the data directory.
    Sled,
    /// A PostgreSQL database shared by a fleet.
    Postgres {
        /// libpq's connection string or URL; may hold a password, so never printed.
        url: String,
        pool_size: usize,
        connect_timeout: Duration,
        statement_timeout: Duration,
        lease: Duration,
    },
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreConfig::Sled => f.write_str("Sled"),
            StoreConfig::Postgres { pool_size, .. } => {
                write!(f, "Postgres {{ url: <redacted>, pool_size: {pool_size} }}")
            }
        }
    }
}

/// HTTP's own bounds: connections, time, body bytes. Passed to `http::serve`; the domain
/// never reads them.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Which routes this listener serves.
    pub surface: Surface,
    pub max_body_bytes: usize,
    pub max_upload_bytes: usize,
    pub max_connections: usize,
    pub max_inflight: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// One info line per request (`--access-log`).
    pub access_log: bool,
}

/// The routes one listener serves: all of them (one listener), or, with `--admin-listen`, the
/// gateway's (prepare, ingest, the memory routes, MCP) on `--listen` and the operator's (keys,
/// vaults, audit, metrics) on the admin listener. Health routes and the API description are on
/// every listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    All,
    Gateway,
    Admin,
}

/// Bounds on everything a request can make the domain hold.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_vault_memories: usize,
    pub max_audit_entries: usize,
    /// Sustained requests per second per memory key; 0 for none.
    pub key_rate_per_second: f64,
    pub key_burst: u32,
    /// Sustained failed authentications per second per client address; 0 for none.
    pub auth_failures_per_second: f64,
    pub auth_failure_burst: u32,
    /// Writes that add data are refused below this many free bytes on the data filesystem.
    pub min_free_bytes: u64,
    pub max_messages: usize,
    pub passage_chars: usize,
    pub passage_overlap_chars: usize,
    pub max_passages_per_message: usize,
    pub max_query_chars: usize,
    pub default_limit: usize,
    pub max_limit: usize,
    pub default_context_tokens: usize,
    pub max_context_tokens: usize,
    /// Scopes of a key minted without any named.
    pub default_scopes: Vec<Scope>,
}

#[derive(Clone, Debug)]
pub struct EmbedConfig {
    /// Intra-op threads per worker's session.
    pub threads: usize,
    pub workers: usize,
    pub optimization: GraphOptimization,
    /// Whether ONNX Runtime's threads spin between runs.
    pub spin: bool,
    pub batch_texts: usize,
    pub background_batch_texts: usize,
    pub batch_tokens: usize,
    pub queue_texts: usize,
    pub max_text_tokens: usize,
}

#[derive(Clone, Debug)]
pub struct RetrievalConfig {
    pub min_score: f32,
    pub min_lexical: f32,
    pub dense_weight: f32,
    pub neighbour_weight: f32,
    pub session_boost: f32,
    pub time_window_boost: f32,
    pub recency_half_life_days: f32,
    pub recency_weight: f32,
    pub short_query_words: usize,
    pub hnsw_threshold: usize,
    pub max_loaded_memories: usize,
}

impl Config {
    /// The configuration the daemon would run with here given no flags: its defaults, and any
    /// `MEMORY_SIDECAR_*` variables. Benchmarks build their bare-model baselines from it, so
    /// they run the model as the daemon does.
    pub fn from_environment() -> anyhow::Result<Config> {
        Flags::try_parse_from(["memory-sidecar"])?.validate()
    }
}

impl Flags {
    pub fn validate(self) -> anyhow::Result<Config> {
        fn at_least(name: &str, value: usize, min: usize) -> anyhow::Result<()> {
            if value < min {
                bail!("--{name} must be at least {min}, got {value}");
            }
            Ok(())
        }
        at_least("max-body-bytes", self.max_body_bytes, 1024)?;
        at_least("max-messages", self.max_messages, 1)?;
        at_least("max-upload-bytes", self.max_upload_bytes, 1024)?;
        at_least("max-vault-memories", self.max_vault_memories, 1)?;
        at_least("max-audit-entries", self.max_audit_entries, 100)?;
        if !(self.key_rate_per_second >= 0.0 && self.key_rate_per_second.is_finite()) {
            bail!(
                "--key-rate-per-second must be 0 (no limit) or positive, got {}",
                self.key_rate_per_second
            );
        }
        if !(self.auth_failures_per_second >= 0.0 && self.auth_failures_per_second.is_finite()) {
            bail!(
                "--auth-failures-per-second must be 0 (no limit) or positive, got {}",
                self.auth_failures_per_second
            );
        }
        if self.auth_failures_per_second > 0.0 && self.auth_failure_burst == 0 {
            bail!("--auth-failure-burst must be at least 1 when a failure rate is set");
        }
        if self.key_rate_per_second > 0.0 && self.key_burst == 0 {
            bail!("--key-burst must be at least 1 when a key rate is set");
        }
        at_least("passage-chars", self.passage_chars, 200)?;
        if self.passage_chars > MAX_MESSAGE_CHARS_CEILING {
            bail!(
                "--passage-chars must be at most {MAX_MESSAGE_CHARS_CEILING} (sled's blob \
                 threshold), got {}",
                self.passage_chars
            );
        }
        if self.passage_overlap_chars * 2 > self.passage_chars {
            bail!(
                "--passage-overlap-chars ({}) must be at most half of --passage-chars ({})",
                self.passage_overlap_chars,
                self.passage_chars
            );
        }
        at_least("max-passages-per-message", self.max_passages_per_message, 1)?;
        if self.max_passages_per_message > MAX_PASSAGES_CEILING {
            bail!(
                "--max-passages-per-message must be at most {MAX_PASSAGES_CEILING}, got {}",
                self.max_passages_per_message
            );
        }
        at_least("max-query-chars", self.max_query_chars, 16)?;
        let default_scopes = self
            .default_scopes
            .iter()
            .map(|name| {
                Scope::parse(name.trim()).with_context(|| {
                    format!("--default-scopes: unknown scope {name:?}; scopes are read, write, delete, admin")
                })
            })
            .collect::<anyhow::Result<Vec<Scope>>>()?;
        if default_scopes.is_empty() {
            bail!("--default-scopes must name at least one scope");
        }
        at_least("max-limit", self.max_limit, 50)?;
        if self.max_limit > MAX_LIMIT_CEILING {
            bail!(
                "--max-limit must be at most {MAX_LIMIT_CEILING}, got {}",
                self.max_limit
            );
        }
        at_least("default-limit", self.default_limit, 1)?;
        if self.default_limit > self.max_limit {
            bail!(
                "--default-limit ({}) is above --max-limit ({})",
                self.default_limit,
                self.max_limit
            );
        }
        at_least("default-context-tokens", self.default_context_tokens, 32)?;
        if self.default_context_tokens > self.max_context_tokens {
            bail!(
                "--default-context-tokens ({}) is above --max-context-tokens ({})",
                self.default_context_tokens,
                self.max_context_tokens
            );
        }
        at_least("max-connections", self.max_connections, 1)?;
        at_least("max-inflight", self.max_inflight, 1)?;
        at_least("embed-queue-texts", self.embed_queue_texts, 1)?;
        at_least("embed-batch-texts", self.embed_batch_texts, 1)?;
        at_least(
            "embed-background-batch-texts",
            self.embed_background_batch_texts,
            1,
        )?;
        at_least("embed-batch-tokens", self.embed_batch_tokens, 512)?;
        if !(16..=512).contains(&self.max_text_tokens) {
            bail!(
                "--max-text-tokens must be 16..=512 (the model's limit), got {}",
                self.max_text_tokens
            );
        }
        if !(-1.0..=1.0).contains(&self.min_score) {
            bail!(
                "--min-score must be a cosine similarity in -1..=1, got {}",
                self.min_score
            );
        }
        for (name, value) in [
            ("dense-weight", self.dense_weight),
            ("neighbour-weight", self.neighbour_weight),
        ] {
            if !(0.0..=1.0).contains(&value) {
                bail!("--{name} must be in 0..=1, got {value}");
            }
        }
        if !(self.min_lexical >= 0.0 && self.min_lexical.is_finite()) {
            bail!("--min-lexical must be 0 or more, got {}", self.min_lexical);
        }
        if !(0.0..=1.0).contains(&self.session_boost) {
            bail!(
                "--session-boost must be in 0..=1, got {}",
                self.session_boost
            );
        }
        for (name, value) in [
            ("time-window-boost", self.time_window_boost),
            ("recency-weight", self.recency_weight),
        ] {
            if !(0.0..=2.0).contains(&value) {
                bail!("--{name} must be in 0..=2, got {value}");
            }
        }
        if !(0.0..=36_500.0).contains(&self.recency_half_life_days) {
            bail!(
                "--recency-half-life-days must be 0 (off) to 36500, got {}",
                self.recency_half_life_days
            );
        }
        at_least("hnsw-threshold", self.hnsw_threshold, 1000)?;
        at_least("max-loaded-memories", self.max_loaded_memories, 1000)?;
        for (name, ms) in [
            ("header-timeout-ms", self.header_timeout_ms),
            ("request-timeout-ms", self.request_timeout_ms),
            ("shutdown-timeout-ms", self.shutdown_timeout_ms),
        ] {
            if ms == 0 {
                bail!("--{name} must be positive");
            }
        }
        let threads = match self.embed_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        if self.embed_workers == 0 || self.embed_workers > threads {
            bail!(
                "--embed-workers must be 1 to the embedding threads ({threads}), got {}",
                self.embed_workers
            );
        }
        let store = match self.store.as_str() {
            "sled" => StoreConfig::Sled,
            url if url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.contains("host=")
                || url.contains("dbname=") =>
            {
                if !(1..=1000).contains(&self.store_pool_size) {
                    bail!("--store-pool-size must be 1 to 1000");
                }
                if !(100..=600_000).contains(&self.store_connect_timeout_ms) {
                    bail!("--store-connect-timeout-ms must be 100 to 600000");
                }
                if !(100..=3_600_000).contains(&self.store_statement_timeout_ms) {
                    bail!("--store-statement-timeout-ms must be 100 to 3600000");
                }
                if !(1000..=3_600_000).contains(&self.store_lease_ms) {
                    bail!("--store-lease-ms must be 1000 to 3600000");
                }
                StoreConfig::Postgres {
                    lease: Duration::from_millis(self.store_lease_ms),
                    url: url.to_owned(),
                    pool_size: self.store_pool_size,
                    connect_timeout: Duration::from_millis(self.store_connect_timeout_ms),
                    statement_timeout: Duration::from_millis(self.store_statement_timeout_ms),
                }
            }
            _ => bail!(
                "--store must be `sled` or a PostgreSQL connection string (postgresql://... or \
                 host=... dbname=...)"
            ),
        };
        Ok(Config {
            store,
            unix_socket: UnixSocket {
                mode: parse_mode(&self.unix_socket_mode)?,
                group: self.unix_socket_group,
            },
            listen: self.listen,
            admin_listen: self.admin_listen,
            master_key_file: self
                .master_key_file
                .unwrap_or_else(|| self.data_dir.join("master.key")),
            tombstone_log: self
                .tombstone_log
                .unwrap_or_else(|| self.data_dir.join("tombstones")),
            backup_dir: self
                .backup_dir
                .unwrap_or_else(|| self.data_dir.join("backups")),
            data_dir: self.data_dir,
            models_dir: self.models_dir,
            log_format: self.log_format,
            log: self.log,
            http: HttpConfig {
                surface: Surface::All,
                max_body_bytes: self.max_body_bytes,
                max_upload_bytes: self.max_upload_bytes,
                max_connections: self.max_connections,
                max_inflight: self.max_inflight,
                header_timeout: Duration::from_millis(self.header_timeout_ms),
                request_timeout: Duration::from_millis(self.request_timeout_ms),
                shutdown_timeout: Duration::from_millis(self.shutdown_timeout_ms),
                access_log: self.access_log,
            },
            limits: Limits {
                max_vault_memories: self.max_vault_memories,
                max_audit_entries: self.max_audit_entries,
                key_rate_per_second: self.key_rate_per_second,
                key_burst: self.key_burst,
                auth_failures_per_second: self.auth_failures_per_second,
                auth_failure_burst: self.auth_failure_burst,
                min_free_bytes: self.min_free_mb.saturating_mul(1 << 20),
                max_messages: self.max_messages,
                passage_chars: self.passage_chars,
                passage_overlap_chars: self.passage_overlap_chars,
                max_passages_per_message: self.max_passages_per_message,
                max_query_chars: self.max_query_chars,
                default_limit: self.default_limit,
                max_limit: self.max_limit,
                default_context_tokens: self.default_context_tokens,
                max_context_tokens: self.max_context_tokens,
                default_scopes,
            },
            embed: EmbedConfig {
                threads: threads / self.embed_workers,
                workers: self.embed_workers,
                optimization: self.embed_graph_optimization,
                spin: self.embed_spin,
                batch_texts: self.embed_batch_texts,
                background_batch_texts: self.embed_background_batch_texts,
                batch_tokens: self.embed_batch_tokens,
                queue_texts: self.embed_queue_texts,
                max_text_tokens: self.max_text_tokens,
            },
            retrieval: RetrievalConfig {
                min_score: self.min_score,
                min_lexical: self.min_lexical,
                dense_weight: self.dense_weight,
                neighbour_weight: self.neighbour_weight,
                session_boost: self.session_boost,
                time_window_boost: self.time_window_boost,
                recency_half_life_days: self.recency_half_life_days,
                recency_weight: self.recency_weight,
                short_query_words: self.short_query_words,
                hnsw_threshold: self.hnsw_threshold,
                max_loaded_memories: self.max_loaded_memories,
            },
            cache_bytes: self.cache_bytes,
            accept_lost_commits: self.accept_lost_commits,
            reembed: self.reembed,
            keep_serving_after_storage_failure: self.keep_serving_after_storage_failure,
            access_log: self.access_log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Config> {
        let mut argv = vec!["memory-sidecar"];
        argv.extend_from_slice(args);
        Flags::try_parse_from(argv)?.validate()
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.listen, [Listen::Tcp("127.0.0.1:8080".into())]);
        assert!(config.limits.max_limit >= 50);
    }

    #[test]
    fn listeners_are_lists_of_addresses_hostnames_and_sockets() {
        let config = parse(&[
            "--listen",
            "127.0.0.1:0,[::1]:8080,localhost:9000,unix:/run/m/gw.sock",
            "--admin-listen",
            "unix:/run/m/admin.sock",
            "--unix-socket-mode",
            "640",
        ])
        .unwrap();
        assert_eq!(config.listen.len(), 4);
        assert_eq!(config.listen[3], Listen::Unix("/run/m/gw.sock".into()));
        assert_eq!(config.unix_socket.mode, 0o640);
        for bad in [
            "unix:relative.sock",
            "localhost",
            "host name:80",
            "1.2.3.4:99999",
        ] {
            let error = parse(&["--listen", bad]).expect_err(bad).to_string();
            assert!(error.contains("--listen"), "{bad}: {error}");
        }
        let error = parse(&["--unix-socket-mode", "999"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--unix-socket-mode"), "{error}");
    }

    #[test]
    fn bad_bounds_are_refused_with_the_flag_name() {
        let error = parse(&["--max-limit", "10"]).unwrap_err().to_string();
        assert!(error.contains("--max-limit"), "{error}");
        let error = parse(&["--min-score", "3"]).unwrap_err().to_string();
        assert!(error.contains("--min-score"), "{error}");
        let error = parse(&["--max-text-tokens", "4096"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--max-text-tokens"), "{error}");
        let error = parse(&["--embed-threads", "2", "--embed-workers", "3"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--embed-workers"), "{error}");
        let error = parse(&["--auth-failures-per-second=-1"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--auth-failures-per-second"), "{error}");
    }

    #[test]
    fn embedding_threads_are_shared_out_among_the_workers() {
        let config = parse(&["--embed-threads", "4", "--embed-workers", "2"]).unwrap();
        assert_eq!((config.embed.workers, config.embed.threads), (2, 2));
        let config = parse(&["--embed-threads", "2"]).unwrap();
        assert_eq!((config.embed.workers, config.embed.threads), (1, 2));
    }
}
