//! Reading a vault: ranked search, the listing that exports it a page at a time, its stats,
//! and the ranking step prepare shares ([`App::recall`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use super::ingest::{check_label, check_tags};
use super::prepare::lift_session;
use super::render::{estimate_tokens, is_short_turn};
use super::session::SessionScope;
use super::{blocking, App};
use crate::auth::MemoryAccess;
use crate::bounds::MAX_PAGE;
use crate::embed::{EmbedError, EmbedTiming, Priority};
use crate::error::ApiError;
use crate::ids::{MemoryId, Scope, VaultId};
use crate::index::{terms, HybridParams};
use crate::store::{EntryMeta, MemoryRecord};
use crate::vector::UnitVector;

/// A predicate over a memory's index metadata (filters by tag, session, date).
pub type MetaFilter = Box<dyn Fn(&EntryMeta) -> bool + Send>;

/// A ranked memory with its record.
pub struct Recalled {
    pub id: MemoryId,
    pub record: MemoryRecord,
    /// The hybrid ranking's score (higher is better; not bounded).
    pub score: f32,
    /// Cosine similarity to the query.
    pub similarity: f32,
    /// For a short memory, the one before it in its session.
    pub context: Option<MemoryRecord>,
    /// For a passage of a longer message, the passages just before and after it.
    pub before: Option<(MemoryId, MemoryRecord)>,
    pub after: Option<(MemoryId, MemoryRecord)>,
}

pub struct SearchRequest {
    pub query: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<MemoryId>,
    pub session_id: Option<String>,
    pub tags: Vec<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// A listing without the superseded memories the export keeps (a query never finds them).
    pub current_only: bool,
}

pub struct Found {
    pub id: MemoryId,
    pub record: MemoryRecord,
    /// The ranking score and the cosine similarity to the query; none when listing.
    pub score: Option<(f32, f32)>,
}

pub struct SearchResult {
    pub memories: Vec<Found>,
    pub next_cursor: Option<MemoryId>,
}

pub struct VaultStats {
    pub count: usize,
    pub bytes: usize,
    /// The memories' text in estimated tokens (four characters a token).
    pub tokens: usize,
    pub oldest_ms: Option<i64>,
    pub newest_ms: Option<i64>,
    pub sessions: usize,
    pub pending: usize,
}

/// A vault's index, loaded.
pub struct Warmed {
    /// Memories in the index.
    pub memories: usize,
    /// Memories stored and waiting for their vectors.
    pub pending: usize,
    pub took: std::time::Duration,
}

/// What a search or a prepare filters on, applied to a record or to the index's metadata
/// alike.
#[derive(Clone)]
pub(super) struct Filter {
    pub session_id: Option<String>,
    /// With `session_id`: memories stored without a session pass too (a confined request).
    pub with_sessionless: bool,
    pub tags: Vec<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.session_id.is_none()
            && self.tags.is_empty()
            && self.since_ms.is_none()
            && self.until_ms.is_none()
    }

    /// The filter as the index applies it; `None` when it keeps everything.
    pub(super) fn into_meta_filter(self) -> Option<MetaFilter> {
        if self.is_empty() {
            return None;
        }
        Some(Box::new(move |meta: &EntryMeta| {
            self.accepts_fields(meta.created_at_ms, meta.session_id.as_deref(), &meta.tags)
        }))
    }

    fn accepts_fields(&self, created_at_ms: i64, session: Option<&str>, tags: &[String]) -> bool {
        self.session_id
            .as_deref()
            .is_none_or(|s| session == Some(s) || (self.with_sessionless && session.is_none()))
            && self.tags.iter().all(|t| tags.contains(t))
            && self.since_ms.is_none_or(|at| created_at_ms >= at)
            && self.until_ms.is_none_or(|at| created_at_ms < at)
    }
}

impl App {
    /// With a query: the best matches, ranked (the request's session lifted). Without: every
    /// memory in storage order, a page at a time, so that an export loop can pull a whole
    /// vault. `session_id` in the request filters; a request confined to its session sees
    /// only that session either way.
    pub async fn search(
        self: &Arc<Self>,
        access: &MemoryAccess,
        session: &SessionScope,
        request: SearchRequest,
    ) -> Result<SearchResult, ApiError> {
        access.require(Scope::Read)?;
        check_tags(&request.tags, "tags")?;
        if let Some(session) = &request.session_id {
            check_label(session, "session_id")?;
        }
        let confined = session.confined_to(access).map(str::to_owned);
        if let (Some(asked), Some(own)) = (&request.session_id, &confined) {
            if asked != own {
                return Err(ApiError::invalid(
                    "under session isolation a request sees only its own session: \
                     `session_id` must be the request's X-Session-ID",
                ));
            }
        }
        let lifted = session
            .id
            .clone()
            .filter(|_| request.session_id.is_none() && confined.is_none());
        let filter = Filter {
            with_sessionless: request.session_id.is_none() && confined.is_some(),
            session_id: request.session_id.or(confined),
            tags: request.tags,
            since_ms: request.since_ms,
            until_ms: request.until_ms,
        };
        let vault = access.vault;
        match request.query {
            Some(query) => {
                let limits = &self.config.limits;
                let limit = request.limit.unwrap_or(limits.default_limit);
                if limit == 0 || limit > limits.max_limit {
                    return Err(ApiError::invalid(format!(
                        "`limit` with a `query` must be 1 to {}, got {limit}",
                        limits.max_limit
                    )));
                }
                if request.cursor.is_some() {
                    return Err(ApiError::invalid(
                        "`cursor` pages a listing; a `query` returns one ranked page",
                    ));
                }
                let chars = query.chars().count();
                if query.trim().is_empty() || chars > limits.max_query_chars {
                    return Err(ApiError::invalid(format!(
                        "`query` must be 1 to {} characters and not blank",
                        limits.max_query_chars
                    )));
                }
                let (vector, _) = self.embed_query(&query).await?;
                let mut recalled = self
                    .recall(
                        vault,
                        &query,
                        vector,
                        limit,
                        filter.into_meta_filter(),
                        false,
                    )
                    .await?;
                let boost = self.config.retrieval.session_boost;
                lift_session(&mut recalled, lifted.as_deref(), boost);
                Ok(SearchResult {
                    memories: recalled
                        .into_iter()
                        .map(|memory| Found {
                            id: memory.id,
                            record: memory.record,
                            score: Some((memory.score, memory.similarity)),
                        })
                        .collect(),
                    next_cursor: None,
                })
            }
            None => {
                let limit = request.limit.unwrap_or(100);
                if limit == 0 || limit > MAX_PAGE {
                    return Err(ApiError::invalid(format!(
                        "`limit` must be 1 to {MAX_PAGE}, got {limit}"
                    )));
                }
                let lock = self.locks.of(vault);
                let shared = lock.read_owned().await;
                let cipher = self.cipher(vault)?;
                let store = self.store.clone();
                let (cursor, current_only) = (request.cursor, request.current_only);
                let (page, next) = blocking(move || {
                    let _shared = shared;
                    let mut keep = |record: &MemoryRecord| {
                        !(current_only && record.superseded_by.is_some())
                            && filter.accepts_fields(
                                record.created_at_ms,
                                record.session_id.as_deref(),
                                &record.tags,
                            )
                    };
                    Ok(store.memories_page(vault, &cipher, cursor, limit, &mut keep)?)
                })
                .await?;
                Ok(SearchResult {
                    memories: page
                        .into_iter()
                        .map(|(id, record)| Found {
                            id,
                            record,
                            score: None,
                        })
                        .collect(),
                    next_cursor: next,
                })
            }
        }
    }

    /// Count, bytes of text, oldest and newest, distinct sessions, and how many memories still
    /// wait for their vector.
    pub async fn stats(self: &Arc<Self>, access: &MemoryAccess) -> Result<VaultStats, ApiError> {
        access.require(Scope::Read)?;
        let vault = access.vault;
        let lock = self.locks.of(vault);
        let shared = lock.read_owned().await;
        let cipher = self.cipher(vault)?;
        let store = self.store.clone();
        blocking(move || {
            let _shared = shared;
            let mut stats = VaultStats {
                count: 0,
                bytes: 0,
                tokens: 0,
                oldest_ms: None,
                newest_ms: None,
                sessions: 0,
                pending: store.vault_pending_count(vault),
            };
            let mut sessions = HashSet::new();
            let mut cursor = None;
            loop {
                let (page, next) =
                    store.memories_page(vault, &cipher, cursor, 1000, &mut |_| true)?;
                for (_, record) in page {
                    stats.count += 1;
                    stats.bytes += record.content.len();
                    stats.tokens += estimate_tokens(&record.content);
                    let at = record.created_at_ms;
                    stats.oldest_ms = Some(stats.oldest_ms.map_or(at, |o| o.min(at)));
                    stats.newest_ms = Some(stats.newest_ms.map_or(at, |n| n.max(at)));
                    if let Some(session) = record.session_id {
                        sessions.insert(session);
                    }
                }
                match next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            stats.sessions = sessions.len();
            Ok(stats)
        })
        .await
    }

    /// Loads the vault's index now, so the first prepare does not wait for it. Returns how
    /// many memories it holds, and how many more wait for their vectors.
    pub async fn warmup(self: &Arc<Self>, access: &MemoryAccess) -> Result<Warmed, ApiError> {
        access.require(Scope::Read)?;
        let vault = access.vault;
        let lock = self.locks.of(vault);
        let shared = lock.read_owned().await;
        let cipher = self.cipher(vault)?;
        let (store, indexes) = (self.store.clone(), self.indexes.clone());
        blocking(move || {
            let _shared = shared;
            let started = Instant::now();
            let memories = indexes.with_index(store.as_ref(), vault, &cipher, |i| i.len())?;
            Ok(Warmed {
                memories,
                pending: store.vault_pending_count(vault),
                took: started.elapsed(),
            })
        })
        .await
    }

    /// Embeds a query text, with the errors a request can show, and where its time went.
    pub(super) async fn embed_query(
        &self,
        text: &str,
    ) -> Result<(UnitVector, EmbedTiming), ApiError> {
        match self.embedder.embed(&[text], Priority::Query).await {
            Ok((mut vectors, timing)) => {
                let vector = vectors.pop().context("the model returned no vector")?;
                Ok((UnitVector::new(vector)?, timing))
            }
            Err(EmbedError::QueueFull) => Err(ApiError::Overloaded("queued embeddings")),
            Err(EmbedError::Closed) => Err(ApiError::ShuttingDown),
            Err(EmbedError::Failed(error)) => Err(ApiError::Internal(error)),
        }
    }

    /// The vault's memories best matching the query (its vector and its lexical terms), best
    /// first, among those `keep` accepts (all when `None`), with their records, and for a short
    /// memory the one before it in its session. With `relevant_only`, memories under both
    /// relevance floors are left out. Holds the vault's lock shared meanwhile.
    pub(super) async fn recall(
        &self,
        vault: VaultId,
        query: &str,
        vector: UnitVector,
        candidates: usize,
        keep: Option<MetaFilter>,
        relevant_only: bool,
    ) -> Result<Vec<Recalled>, ApiError> {
        let lock = self.locks.of(vault);
        let shared = lock.read_owned().await;
        let cipher = self.cipher(vault)?;
        let (store, indexes, metrics) = (
            self.store.clone(),
            self.indexes.clone(),
            self.metrics.clone(),
        );
        let retrieval = &self.config.retrieval;
        let floor = |value: f32| {
            if relevant_only {
                value
            } else {
                f32::NEG_INFINITY
            }
        };
        let params = HybridParams {
            dense_weight: retrieval.dense_weight,
            neighbour_weight: retrieval.neighbour_weight,
            min_similarity: floor(retrieval.min_score),
            min_lexical: floor(retrieval.min_lexical),
        };
        let terms = terms(query);
        blocking(move || {
            let _shared = shared;
            let started = Instant::now();
            let hits = indexes.with_index(store.as_ref(), vault, &cipher, |index| {
                let keep = keep
                    .as_ref()
                    .map(|k| k.as_ref() as &dyn Fn(&EntryMeta) -> bool);
                index.search_hybrid(&vector, &terms, candidates, &params, keep)
            })?;
            metrics
                .index_search_seconds
                .observe(started.elapsed().as_secs_f64());
            let mut recalled = Vec::with_capacity(hits.len());
            // A memory whose record is gone (deleted since indexing) is skipped. So is one the
            // store cannot read: the others still answer. (After a failed write sled refuses
            // writes, and reading a node it has not yet split needs one.)
            let read = |id: MemoryId| match store.memory(vault, &cipher, id) {
                Ok(record) => record,
                Err(error) => {
                    tracing::error!(%vault, memory = %id, error = %format!("{error:#}"), "a ranked memory cannot be read; left out");
                    metrics.unreadable_hits.inc();
                    None
                }
            };
            for hit in hits {
                let Some(record) = read(hit.id) else {
                    continue;
                };
                let (mut context, mut before, mut after) = (None, None, None);
                match record.passage {
                    // A passage's neighbours in its session are its message's other passages.
                    Some(passage) => {
                        let sibling = |id: Option<MemoryId>| {
                            let id = id?;
                            let record = read(id)?;
                            let same = record.passage.is_some_and(|p| p.message == passage.message);
                            same.then_some((id, record))
                        };
                        before = sibling(hit.previous);
                        after = sibling(hit.next);
                    }
                    None if is_short_turn(&record.content) => {
                        context = hit.previous.and_then(read);
                    }
                    None => {}
                }
                recalled.push(Recalled {
                    id: hit.id,
                    record,
                    score: hit.score,
                    similarity: hit.similarity,
                    context,
                    before,
                    after,
                });
            }
            Ok(recalled)
        })
        .await
    }
}
