//! The background indexer: embeds stored memories and adds them to their vaults' indexes.
//!
//! It reads pending memories a window at a time, in store order, decrypts and tokenizes them,
//! sorts the window by length and queues it for the model as small jobs of like-length texts
//! (a batch pads to its longest text, so mixed lengths waste model time). While the model runs
//! those jobs, the indexer writes the vectors of the ones already done and reads the next
//! window, so the model does not wait on the store.
//!
//! A window's memories stay pending until their vectors are written. The indexer walks the
//! pending set with a cursor and starts again from the first pending memory once it has
//! reached the end and nothing is in flight; so a memory whose write failed, or one stored
//! behind the cursor meanwhile, is taken on the next pass.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{App, READY, STARTING};
use crate::crypto::VaultCipher;
use crate::embed::{EmbedError, Priority, Ticket};
use crate::ids::{MemoryId, VaultId};
use crate::index::{terms, TERMS_VERSION};
use crate::store::{EntryMeta, MemoryRecord};
use crate::vector::UnitVector;

/// Pending memories read, sorted and queued at a time.
const WINDOW: usize = 64;
/// The next window is read once this few jobs are left in flight: enough model work to cover
/// the reading.
const REFILL_BELOW: usize = 2;
/// Pause after a store error before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A pending memory, read and tokenized.
struct Read {
    vault: VaultId,
    id: MemoryId,
    cipher: Arc<VaultCipher>,
    meta: EntryMeta,
    tokens: Vec<u32>,
}

/// Memories queued for the model together, and the ticket for their vectors.
struct Job {
    memories: Vec<Read>,
    ticket: Ticket,
}

impl App {
    /// The indexer thread's loop; returns when the daemon stops.
    pub(super) fn run_indexer(&self) {
        let mut replaying = true;
        let mut cursor: Option<(VaultId, MemoryId)> = None;
        let mut in_flight: VecDeque<Job> = VecDeque::new();
        loop {
            if self.is_stopping() {
                return;
            }
            if !self.store.is_healthy() {
                // Writes are refused until a restart, and a write to a store in this state can
                // leave reads failing too: what is pending stays pending for the restart.
                in_flight.clear();
                cursor = None;
                self.doorbell.wait(Duration::from_secs(1));
                continue;
            }
            if in_flight.len() < REFILL_BELOW {
                let window = match self.store.pending_after(cursor, WINDOW) {
                    Ok(window) => window,
                    Err(error) => {
                        tracing::error!(error = %format!("{error:#}"), "reading pending memories failed; retrying");
                        std::thread::sleep(RETRY_AFTER);
                        continue;
                    }
                };
                if window.is_empty() && in_flight.is_empty() {
                    if cursor.take().is_some() {
                        // The end of a pass: start the next from the first pending memory.
                        continue;
                    }
                    if replaying {
                        replaying = false;
                        self.replay_done();
                    }
                    self.doorbell.wait(Duration::from_secs(1));
                    continue;
                }
                if let Some(last) = window.last() {
                    cursor = Some(*last);
                    match self.queue_window(&window, &mut in_flight) {
                        Ok(Some(handled)) => self.count_handled(handled, replaying),
                        Ok(None) => return,
                        Err(error) => {
                            tracing::error!(error = %format!("{error:#}"), "reading a window of pending memories failed; retrying");
                            std::thread::sleep(RETRY_AFTER);
                        }
                    }
                    continue;
                }
            }
            let Some(job) = in_flight.pop_front() else {
                continue;
            };
            let handled = match self.finish_job(job) {
                Ok(Some(handled)) => handled,
                Ok(None) => return,
                Err(error) => {
                    // Its memories stay pending and are taken again on the next pass.
                    self.store.note_write_error(&error);
                    tracing::error!(error = %format!("{error:#}"), "storing a batch of vectors failed; retrying");
                    std::thread::sleep(RETRY_AFTER);
                    continue;
                }
            };
            self.count_handled(handled, replaying);
        }
    }

    fn replay_done(&self) {
        self.metrics.replay_remaining.set(0);
        if self
            .state
            .compare_exchange(STARTING, READY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.metrics.ready.set(1);
            tracing::info!("ready: model loaded, store open, replay done");
            crate::notify::notify("READY=1");
        }
    }

    /// Takes `handled` memories off the pending gauges.
    fn count_handled(&self, handled: usize, replaying: bool) {
        self.metrics.embed_pending.sub(handled as i64);
        if replaying {
            self.metrics.replay_remaining.sub(handled as i64);
        }
    }

    /// Reads a window of pending memories (each vault's part under its lock), sorts it by
    /// length and queues it as jobs of like-length texts. A memory whose vault is gone, or
    /// that cannot be read or tokenized, leaves the pending set here. Returns how many pending
    /// marks it took away, or `None` when the model has stopped.
    fn queue_window(
        &self,
        window: &[(VaultId, MemoryId)],
        in_flight: &mut VecDeque<Job>,
    ) -> anyhow::Result<Option<usize>> {
        let mut handled = 0;
        let mut read: Vec<Read> = Vec::with_capacity(window.len());
        for group in window.chunk_by(|a, b| a.0 == b.0) {
            let vault = group[0].0;
            let lock = self.locks.of(vault);
            let _shared = lock.blocking_read();
            let Some(cipher) = self.store.cipher(vault) else {
                for (_, id) in group {
                    let was_pending = if self.store.vault(vault)?.is_some() {
                        tracing::error!(%vault, memory = %id, "memory of a vault without a data key; set aside");
                        self.store.set_unembeddable(vault, *id)?
                    } else {
                        self.store.clear_pending(vault, *id)?
                    };
                    handled += usize::from(was_pending);
                }
                continue;
            };
            for (_, id) in group {
                let record = match self.store.memory(vault, &cipher, *id) {
                    Ok(Some(record)) => record,
                    Ok(None) => {
                        handled += usize::from(self.store.clear_pending(vault, *id)?);
                        continue;
                    }
                    // The store failing is not the memory's fault: try again later.
                    Err(error) if self.store.is_io_failure(&error) => return Err(error),
                    Err(error) => {
                        tracing::error!(%vault, memory = %id, error = %format!("{error:#}"), "memory cannot be read; set aside");
                        handled += usize::from(self.store.set_unembeddable(vault, *id)?);
                        continue;
                    }
                };
                let tokens = match self.embedder.tokenize(&[record.content.as_str()]) {
                    Ok(mut tokens) if tokens.len() == 1 && !tokens[0].is_empty() => {
                        tokens.pop().expect("length checked")
                    }
                    Ok(_) => {
                        tracing::error!(%vault, memory = %id, "memory tokenized to nothing; set aside");
                        handled += usize::from(self.store.set_unembeddable(vault, *id)?);
                        continue;
                    }
                    Err(error) => {
                        tracing::error!(%vault, memory = %id, error = %format!("{error:#}"), "memory cannot be tokenized; set aside");
                        handled += usize::from(self.store.set_unembeddable(vault, *id)?);
                        continue;
                    }
                };
                read.push(Read {
                    vault,
                    id: *id,
                    cipher: cipher.clone(),
                    meta: entry_meta(&record),
                    tokens,
                });
            }
        }
        read.sort_by_key(|memory| memory.tokens.len());
        let job_texts = self.config.embed.background_batch_texts;
        let mut read = read.into_iter().peekable();
        while read.peek().is_some() {
            let memories: Vec<Read> = read.by_ref().take(job_texts).collect();
            let texts = memories.iter().map(|m| m.tokens.clone()).collect();
            match self.embedder.submit_tokens(texts, Priority::Bulk) {
                Ok(ticket) => in_flight.push_back(Job { memories, ticket }),
                Err(EmbedError::Closed) => return Ok(None),
                Err(error) => anyhow::bail!("queueing a background batch: {error}"),
            }
        }
        Ok(Some(handled))
    }

    /// Waits for a job's vectors and stores them, each vault's part under its lock, and only
    /// for memories still pending (not deleted, not superseded) and sealed with their vault's current key: an erasure since the
    /// window was read leaves nothing behind. A job the model fails is run again text by text,
    /// so that one bad memory is set aside alone. Returns how many pending marks it took away,
    /// or `None` when the model has stopped.
    fn finish_job(&self, job: Job) -> anyhow::Result<Option<usize>> {
        let Job { memories, ticket } = job;
        let vectors: Vec<Result<Vec<f32>, String>> = match ticket.wait_blocking() {
            Ok(vectors) => vectors.into_iter().map(Ok).collect(),
            Err(EmbedError::Closed) => return Ok(None),
            Err(error) => {
                tracing::warn!(error = %error, memories = memories.len(), "a background batch failed; embedding its memories one by one");
                let mut one_by_one = Vec::with_capacity(memories.len());
                for memory in &memories {
                    let vector = self
                        .embedder
                        .submit_tokens(vec![memory.tokens.clone()], Priority::Bulk)
                        .and_then(Ticket::wait_blocking);
                    match vector {
                        Ok(mut vectors) => {
                            one_by_one.push(vectors.pop().ok_or_else(|| "no vector".to_owned()))
                        }
                        Err(EmbedError::Closed) => return Ok(None),
                        Err(error) => one_by_one.push(Err(error.to_string())),
                    }
                }
                one_by_one
            }
        };
        let mut handled = 0;
        let mut embedded = Vec::with_capacity(memories.len());
        for (memory, vector) in memories.into_iter().zip(vectors) {
            match vector.and_then(|v| UnitVector::new(v).map_err(|e| format!("{e:#}"))) {
                Ok(vector) => embedded.push((memory, vector)),
                Err(error) => {
                    tracing::error!(memory = %memory.id, vault = %memory.vault, %error, "memory cannot be embedded; set aside");
                    handled += usize::from(self.store.set_unembeddable(memory.vault, memory.id)?);
                }
            }
        }
        // The job is in length order; its vaults' parts are written together.
        embedded.sort_by_key(|(memory, _)| (memory.vault, memory.id));
        if !self.store.is_healthy() {
            anyhow::bail!("the store refuses writes until a restart");
        }
        for group in embedded.chunk_by(|a, b| a.0.vault == b.0.vault) {
            let vault = group[0].0.vault;
            let lock = self.locks.of(vault);
            let _shared = lock.blocking_read();
            let Some(current) = self.store.cipher(vault) else {
                continue;
            };
            let mut items = Vec::with_capacity(group.len());
            for (memory, vector) in group {
                if Arc::ptr_eq(&memory.cipher, &current)
                    && self.store.is_pending(vault, memory.id)?
                {
                    items.push((memory.id, vector.clone(), memory.meta.clone()));
                }
            }
            self.store.insert_vectors(vault, &current, &items)?;
            self.indexes.insert(vault, &items);
            handled += items.len();
        }
        Ok(Some(handled))
    }
}

/// What the index keeps of a memory: the filter fields, and its lexical terms (computed once,
/// here, and sealed beside its vector).
fn entry_meta(record: &MemoryRecord) -> EntryMeta {
    EntryMeta {
        created_at_ms: record.created_at_ms,
        session_id: record.session_id.clone(),
        tags: record.tags.clone(),
        terms: terms(&record.content),
        terms_version: TERMS_VERSION,
    }
}
