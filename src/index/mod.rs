//! Per-vault indexes, derived from the store and rebuildable from it at any time.
//!
//! A vault's index is loaded from its own rows of the store on first use ([`Indexes`]), so
//! start-up does not wait on it and no query ever reads another vault's vectors. It ranks by
//! [`VaultIndex::search_hybrid`]: every memory is scored (a dot product per memory, the vectors
//! being unit length, and BM25 over session windows) below `hnsw_threshold` memories; from
//! there on an HNSW graph, built in the background over the vectors present then, picks the
//! dense candidates, and the memories added after it are scanned.
//!
//! Files: `cache` the loaded indexes and their budget; `vault` one vault's arrays; `hybrid` the
//! ranking; `lexical` terms and BM25; `session` the session chain; `graph` HNSW; `dot` the dot
//! product (the crate's only `unsafe`).

mod cache;
mod dot;
mod graph;
mod hybrid;
mod lexical;
mod session;
mod vault;

pub use self::cache::Indexes;
pub use self::dot::dot;
pub use self::hybrid::{fuse, HybridParams, Ranked};
pub use self::lexical::{terms, word_count, LexicalIndex, TERMS_VERSION};
pub use self::vault::VaultIndex;
