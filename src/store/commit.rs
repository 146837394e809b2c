//! Group commit: the thread that makes the embedded store's writes durable.
//!
//! Every caller waiting when a flush starts shares that flush and its fsync. A caller's writes
//! are durable once `commit` returns Ok: the flush that served it began after the caller's
//! writes were in sled's buffers. Each commit also writes its number into the store and, once
//! durable, into the [`Ledger`], so a store that later loses commits is noticed at start-up.
//!
//! A failed flush or fsync poisons the committer: every later commit fails too. After a failed
//! fsync Linux may drop the dirty pages and report the next fsync as clean, so nothing written
//! after it could honestly be acknowledged; a restart recovers from what is really on disk.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{bail, Context};

use super::ledger::Ledger;
use super::sled::COMMIT_SEQ;
use super::CommitFuture;
use crate::metrics::Metrics;

type CommitReply = tokio::sync::oneshot::Sender<Result<(), String>>;

enum Request {
    Commit(CommitReply),
    /// Finish what is queued, then end the thread.
    Stop,
}

#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Request>,
    poisoned: Arc<AtomicBool>,
    ledger: Arc<Ledger>,
    metrics: Metrics,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Marks the store as refusing writes until restart; logs the first cause.
fn poison(poisoned: &AtomicBool, metrics: &Metrics, cause: &str) {
    if !poisoned.swap(true, Ordering::AcqRel) {
        metrics.storage_healthy.set(0);
        tracing::error!(error = %cause, "the store could not be made durable; refusing writes until restart");
    }
}

impl Committer {
    /// Starts the thread. `file` is the store's data file (fsynced after each flush), `seq`
    /// the store's last commit number.
    pub(super) fn start(
        db: &sled::Db,
        meta: &sled::Tree,
        file: File,
        mut seq: u64,
        metrics: Metrics,
        ledger: Ledger,
    ) -> anyhow::Result<Committer> {
        let (db, meta) = (db.clone(), meta.clone());
        let ledger = Arc::new(ledger);
        let thread_ledger = ledger.clone();
        let (tx, rx) = mpsc::channel::<Request>();
        let poisoned = Arc::new(AtomicBool::new(false));
        let thread_poisoned = poisoned.clone();
        let thread_metrics = metrics.clone();
        metrics.storage_healthy.set(1);
        let thread = std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || {
                let mut stopping = false;
                while !stopping {
                    let Ok(first) = rx.recv() else { break };
                    let mut waiters = Vec::new();
                    for request in std::iter::once(first).chain(rx.try_iter()) {
                        match request {
                            Request::Commit(reply) => waiters.push(reply),
                            Request::Stop => stopping = true,
                        }
                    }
                    if waiters.is_empty() {
                        continue;
                    }
                    let started = Instant::now();
                    let result = if thread_poisoned.load(Ordering::Acquire) {
                        Err("an earlier flush or fsync failed; restart the daemon".to_owned())
                    } else {
                        seq += 1;
                        meta.insert(COMMIT_SEQ, &seq.to_be_bytes())
                            .map(|_| ())
                            .and_then(|()| db.flush().map(|_| ()))
                            .map_err(|e| format!("flush: {e}"))
                            .and_then(|()| file.sync_data().map_err(|e| format!("fsync: {e}")))
                    };
                    match &result {
                        Ok(()) => {
                            if let Err(error) = thread_ledger.record(seq) {
                                tracing::warn!(error = %format!("{error:#}"), "the commit ledger lags the store");
                            }
                        }
                        Err(message) => poison(&thread_poisoned, &thread_metrics, message),
                    }
                    thread_metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    thread_metrics
                        .commit_batch_size
                        .observe(waiters.len() as f64);
                    for waiter in waiters {
                        let _ = waiter.send(result.clone());
                    }
                }
            })
            .context("starting the group-commit thread")?;
        Ok(Committer {
            tx,
            poisoned,
            ledger,
            metrics,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Takes a write that failed with an I/O error as the store failing: sled then refuses
    /// every write until restart, so the daemon says so, as after a failed flush.
    pub fn note_write_error(&self, error: &anyhow::Error) {
        if let Some(sled::Error::Io(_)) = error.downcast_ref::<sled::Error>() {
            poison(&self.poisoned, &self.metrics, &format!("{error:#}"));
        }
    }

    /// Whether writes can still be made durable.
    pub fn is_healthy(&self) -> bool {
        !self.poisoned.load(Ordering::Acquire)
    }

    /// Asks for a commit now and returns the wait for it: it resolves once everything written
    /// before this call is on disk.
    pub fn commit(&self) -> CommitFuture {
        let (reply, wait) = tokio::sync::oneshot::channel();
        let sent = self.tx.send(Request::Commit(reply));
        Box::pin(async move {
            if sent.is_err() {
                bail!("the group-commit thread has stopped");
            }
            match wait.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(message)) => bail!("commit failed: {message}"),
                Err(_) => bail!("the group-commit thread has stopped"),
            }
        })
    }

    /// Serves the commits already asked for, ends the thread and waits for it, then fsyncs the
    /// ledger (commits only `pwrite` it). Later commits fail. Idempotent.
    pub fn stop(&self) -> anyhow::Result<()> {
        let _ = self.tx.send(Request::Stop);
        let thread = self.thread.lock().expect("committer thread lock").take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                bail!("the group-commit thread panicked");
            }
        }
        self.ledger.sync()
    }
}
