//! Every compile-time bound on what a request can make the daemon hold or do, in one place.
//!
//! Bounds an operator may change are flags ([`crate::config`]); these are fixed, because a
//! wire format, a file format or a library's limit sets them. `docs/api.md` lists them, and
//! `tests/docs.rs` checks that it lists them right.

/// Longest session id, model name or tag accepted, in characters.
pub const MAX_LABEL_CHARS: usize = 200;
/// Most tags on one memory or in one filter.
pub const MAX_TAGS: usize = 20;
/// Longest tag, in characters.
pub const MAX_TAG_CHARS: usize = 64;
/// Most memory ids one ingest, or one upload line, may supersede.
pub const MAX_SUPERSEDES: usize = 100;

/// Longest key name, in characters.
pub const MAX_KEY_NAME_CHARS: usize = 200;
/// Longest lifetime a key may be minted with, in days.
pub const MAX_EXPIRES_DAYS: u32 = 365;
/// Longest grace period of a rotated key, in days.
pub const MAX_GRACE_DAYS: u32 = 30;
/// Most active keys a memory key may give its vault (the admin key is not limited).
pub const MAX_KEYS_PER_VAULT: usize = 100;
/// Most keys, or audit entries, one listing page returns.
pub const MAX_KEYS_PAGE: usize = 1000;
/// Longest `X-Request-ID` echoed; a longer one (or one with other characters) is replaced.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// Most memories one search or export page returns.
pub const MAX_PAGE: usize = 1000;
/// Most lines in one upload.
pub const MAX_UPLOAD_LINES: usize = 10_000;
/// Most line errors listed in an upload's answer (all are counted).
pub const MAX_LISTED_ERRORS: usize = 1000;
/// Memories stored per transaction (and commit) during an upload.
pub const UPLOAD_CHUNK: usize = 1000;

/// Longest credential header value looked at; anything longer is refused unread.
pub const MAX_CREDENTIAL_LEN: usize = 256;
/// Admin keys shorter than this are refused at start-up.
pub const MIN_ADMIN_KEY_LEN: usize = 32;

/// Largest buffer hyper may hold for one connection's request head, in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest JSON-RPC message `POST /mcp` takes, in bytes.
pub const MAX_MCP_MESSAGE_BYTES: usize = 256 * 1024;
/// Longest path parameter (a key, memory or vault id) looked at, in characters.
pub const MAX_PARAM_CHARS: usize = 100;
/// Query parameters looked at in one URL; the rest are ignored.
pub const MAX_QUERY_PARAMS: usize = 20;

/// Latest timestamp accepted (9999-12-31T23:59:59.999Z), in ms since the epoch; the earliest
/// is the epoch itself.
pub const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// Longest word kept as a lexical term, in characters; longer runs are ids or noise.
pub const MAX_TERM_CHARS: usize = 40;

/// Client addresses whose failed authentications are tracked at once.
pub const MAX_TRACKED_ADDRESSES: usize = 4096;

/// Ceiling of `--passage-chars`: a stored passage stays under sled's 128 KiB blob threshold
/// (FACTS.md) even when every character is a control character that JSON escapes as six bytes.
pub const MAX_MESSAGE_CHARS_CEILING: usize = 20_000;
/// Ceiling of `--max-passages-per-message` (a passage's index is kept in 16 bits).
pub const MAX_PASSAGES_CEILING: usize = 4096;
/// Ceiling of `--max-limit`.
pub const MAX_LIMIT_CEILING: usize = 1000;
