//! Ingest: a finished exchange in, its user and assistant messages stored durably, then
//! acknowledged; a message longer than one passage is stored as its passages
//! ([`super::passages`]). Embedding and indexing happen afterwards, in the indexer. Also the
//! checks every message-carrying request shares (messages, tags, labels) and the vault size
//! limit.

use std::sync::Arc;

use super::passages;
use super::session::SessionScope;
use super::{blocking, App};
use crate::auth::MemoryAccess;
use crate::bounds::{MAX_LABEL_CHARS, MAX_TAGS, MAX_TAG_CHARS};
use crate::error::ApiError;
use crate::ids::{MemoryId, Role, Scope, VaultId};
use crate::store::{MemoryRecord, NewMemory, Passage};

#[derive(Clone, Debug)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// When it was said, for back-filled history (ms since the epoch).
    pub timestamp_ms: Option<i64>,
    /// `false` leaves the message out of memory.
    pub remember: bool,
    pub tags: Vec<String>,
}

pub struct IngestRequest {
    pub messages: Vec<Message>,
    pub model: Option<String>,
    /// Tags for every stored message, besides each message's own.
    pub tags: Vec<String>,
    /// Memories this exchange replaces ([`super::change`]): superseded by its first memory.
    pub supersedes: Vec<MemoryId>,
}

pub struct IngestResult {
    pub stored: usize,
    pub ids: Vec<MemoryId>,
}

impl App {
    /// Stores the exchange's user and assistant messages and returns once they are durable.
    pub async fn ingest(
        self: &Arc<Self>,
        access: &MemoryAccess,
        session: &SessionScope,
        request: IngestRequest,
    ) -> Result<IngestResult, ApiError> {
        access.require_held(Scope::Write)?;
        self.check_messages(&request.messages)?;
        check_tags(&request.tags, "tags")?;
        for (index, message) in request.messages.iter().enumerate() {
            check_tags(&message.tags, &format!("messages[{index}].tags"))?;
            if merge_tags(&request.tags, &message.tags).len() > MAX_TAGS {
                return Err(ApiError::invalid(format!(
                    "messages[{index}] would carry more than {MAX_TAGS} tags"
                )));
            }
        }
        let nothing = IngestResult {
            stored: 0,
            ids: Vec::new(),
        };
        if !access.mode.store {
            return Ok(nothing);
        }
        let now = self.now_ms();
        let mut memories: Vec<NewMemory> = Vec::new();
        for (index, message) in request.messages.into_iter().enumerate() {
            if !(message.role.is_remembered() && message.remember)
                || message.content.trim().is_empty()
            {
                continue;
            }
            let record = MemoryRecord {
                content: message.content,
                role: message.role.as_str().to_owned(),
                session_id: session.id.clone(),
                created_at_ms: message.timestamp_ms.unwrap_or(now),
                model: request.model.clone(),
                tags: merge_tags(&request.tags, &message.tags),
                digest: String::new(),
                passage: None,
                superseded_by: None,
            };
            memories.extend(self.as_passages(index, record, message.timestamp_ms.is_some())?);
        }
        // Before anything is stored: a wrong id refuses the whole exchange.
        self.check_memories_exist(access.vault, &request.supersedes)
            .await?;
        if memories.is_empty() {
            return Ok(nothing);
        }
        let lock = self.locks.of(access.vault);
        let shared = lock.read().await;
        let outcome = self.store_memories(access.vault, memories).await?;
        drop(shared);
        if let Some(by) = successor(&outcome, &request.supersedes) {
            self.supersede(access.vault, vec![(request.supersedes, by)])
                .await?;
        }
        Ok(IngestResult {
            stored: outcome.iter().filter(|(_, new)| *new).count(),
            ids: outcome.into_iter().map(|(id, _)| id).collect(),
        })
    }

    /// A message to store, as its memories: itself when it fits one passage, else one memory
    /// per passage, linked as parts of one message. Refused with `message_too_long` past
    /// `--max-passages-per-message`. `index` is its place in the request, for the error.
    pub(super) fn as_passages(
        &self,
        index: usize,
        record: MemoryRecord,
        explicit_timestamp: bool,
    ) -> Result<Vec<NewMemory>, ApiError> {
        let limits = &self.config.limits;
        let texts = passages::split(
            &record.content,
            limits.passage_chars,
            limits.passage_overlap_chars,
        );
        if texts.len() > limits.max_passages_per_message {
            return Err(ApiError::MessageTooLong {
                index,
                chars: record.content.chars().count(),
                passages: texts.len(),
                max: limits.max_passages_per_message,
            });
        }
        if texts.len() == 1 {
            return Ok(vec![NewMemory {
                record,
                explicit_timestamp,
            }]);
        }
        let message: u64 = rand::random();
        let count = texts.len() as u16;
        Ok(texts
            .into_iter()
            .enumerate()
            .map(|(index, content)| NewMemory {
                record: MemoryRecord {
                    content,
                    passage: Some(Passage {
                        message,
                        index: index as u16,
                        count,
                    }),
                    ..record.clone()
                },
                explicit_timestamp,
            })
            .collect())
    }

    /// Writes memories into a vault (the caller holds the vault's lock, shared or exclusive)
    /// and makes them durable. Returns each one's id and whether it is new.
    pub(super) async fn store_memories(
        self: &Arc<Self>,
        vault: VaultId,
        memories: Vec<NewMemory>,
    ) -> Result<Vec<(MemoryId, bool)>, ApiError> {
        let app = self.clone();
        let outcome = blocking(move || app.insert_memories(vault, &memories)).await?;
        let stored = outcome.iter().filter(|(_, new)| *new).count();
        self.commit("committing memories").await?;
        let counter = &self.metrics.memories_stored;
        counter.with_label_values(&["stored"]).inc_by(stored as u64);
        counter
            .with_label_values(&["duplicate"])
            .inc_by((outcome.len() - stored) as u64);
        if stored > 0 {
            self.doorbell.ring();
        }
        Ok(outcome)
    }

    /// The blocking half of [`App::store_memories`]: the checks that need the store, and the
    /// write (not yet durable).
    fn insert_memories(
        &self,
        vault: VaultId,
        memories: &[NewMemory],
    ) -> Result<Vec<(MemoryId, bool)>, ApiError> {
        let cipher = self.cipher(vault)?;
        if self.store.vault(vault)?.is_some_and(|r| r.erasing) {
            tracing::error!(%vault, "refusing writes to a vault whose erasure did not finish");
            return Err(ApiError::StorageUnavailable);
        }
        // Room for what is new only: a retried exchange is answered even by a full vault.
        let fresh = self
            .store
            .count_new(vault, &cipher, memories)
            .map_err(self.storage_error("checking for duplicates"))?;
        if fresh > 0 {
            // A retry of what is already stored is answered even on a full disk.
            self.check_disk_room()?;
        }
        self.reserve(vault, fresh)?;
        let outcome = match self.store.insert_memories(vault, &cipher, memories) {
            Ok(outcome) => outcome,
            Err(error) => {
                self.release(vault, fresh);
                return Err(self.storage_error("storing memories")(error));
            }
        };
        // The rows are in the store now, whatever happens to this request: count them here, so
        // the gauges stay true when the commit fails or the caller goes away.
        let stored = outcome.iter().filter(|(_, new)| *new).count();
        let to_embed = outcome
            .iter()
            .zip(memories)
            .filter(|((_, new), memory)| *new && memory.record.superseded_by.is_none())
            .count();
        self.release(vault, fresh.saturating_sub(stored));
        self.metrics.memories.add(stored as i64);
        self.metrics.embed_pending.add(to_embed as i64);
        Ok(outcome)
    }

    /// Checks a request's messages: at least one, at most `--max-messages`. Their length is
    /// bounded by the body alone: only stored messages have a bound of their own (passages).
    pub(super) fn check_messages(&self, messages: &[Message]) -> Result<(), ApiError> {
        let limits = &self.config.limits;
        if messages.is_empty() {
            return Err(ApiError::invalid(
                "`messages` must hold at least one message",
            ));
        }
        if messages.len() > limits.max_messages {
            return Err(ApiError::TooManyMessages {
                count: messages.len(),
                max: limits.max_messages,
            });
        }
        Ok(())
    }

    /// Reserves room for `n` more memories in the vault, or refuses with `vault_full`. Blocking:
    /// a vault's first reservation counts its memories.
    fn reserve(&self, vault: VaultId, n: usize) -> Result<(), ApiError> {
        let max = self.config.limits.max_vault_memories;
        let known = self.counts.lock().expect("count lock").contains_key(&vault);
        // Counted outside the lock: a large vault's first count must not stall the others.
        let counted = (!known).then(|| self.store.vault_memory_count(vault));
        let mut counts = self.counts.lock().expect("count lock");
        let count = counts.entry(vault).or_insert(counted.unwrap_or(0));
        if *count + n > max {
            return Err(ApiError::VaultFull { count: *count, max });
        }
        *count += n;
        Ok(())
    }

    /// Gives back room reserved but not used (duplicates, failed writes) or freed by deletes.
    pub(super) fn release(&self, vault: VaultId, n: usize) {
        if let Some(count) = self.counts.lock().expect("count lock").get_mut(&vault) {
            *count = count.saturating_sub(n);
        }
    }
}

/// The memory an exchange's `supersedes` names as their successor: its first new memory, else
/// its first memory (a resent exchange) that is not itself superseded by it.
pub(super) fn successor(outcome: &[(MemoryId, bool)], supersedes: &[MemoryId]) -> Option<MemoryId> {
    let candidates = || outcome.iter().filter(|(id, _)| !supersedes.contains(id));
    candidates()
        .find(|(_, new)| *new)
        .or_else(|| candidates().next())
        .map(|(id, _)| *id)
}

/// Checks a list of tags: at most [`MAX_TAGS`], each 1 to [`MAX_TAG_CHARS`] characters,
/// without control characters.
pub fn check_tags(tags: &[String], field: &str) -> Result<(), ApiError> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::invalid(format!(
            "`{field}` holds {} tags; the maximum is {MAX_TAGS}",
            tags.len()
        )));
    }
    for tag in tags {
        let chars = tag.chars().count();
        if chars == 0 || chars > MAX_TAG_CHARS || tag.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "each tag in `{field}` must be 1 to {MAX_TAG_CHARS} characters without control \
                 characters"
            )));
        }
    }
    Ok(())
}

/// Checks a session id or similar label: 1 to [`MAX_LABEL_CHARS`] characters, not blank,
/// without control characters.
pub fn check_label(text: &str, field: &str) -> Result<(), ApiError> {
    let chars = text.chars().count();
    if text.trim().is_empty() || chars > MAX_LABEL_CHARS || text.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "`{field}` must be 1 to {MAX_LABEL_CHARS} characters without control characters"
        )));
    }
    Ok(())
}

/// The union of two tag lists, in first-seen order.
pub(super) fn merge_tags(shared: &[String], own: &[String]) -> Vec<String> {
    let mut tags: Vec<String> = Vec::with_capacity(shared.len() + own.len());
    for tag in shared.iter().chain(own) {
        if !tags.contains(tag) {
            tags.push(tag.clone());
        }
    }
    tags
}
