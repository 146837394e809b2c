//! Sentence embeddings: the tokenizer and ONNX Runtime sessions on threads of their own.
//!
//! Callers tokenize on their own thread (the indexer also sorts its texts by length), then
//! queue a job. A model thread (one per worker, each with its own session) takes what is
//! queued: waiting queries alone, up to `--embed-batch-texts`, or when no query waits,
//! background jobs up to `--embed-background-batch-texts`, and never more than
//! `--embed-batch-tokens` padded tokens. It pads the batch to its longest member, runs it,
//! mean-pools over the attention mask and L2-normalises. There is no timer: an idle daemon runs
//! a lone query at once, a busy one batches what piled up meanwhile.
//!
//! Files: `queue` (the jobs waiting, and how a batch is taken), `model` (the files, the
//! tokenizer, a session, one batch run).

mod model;
mod queue;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use ort::session::Session;
use tokenizers::Tokenizer;

pub use self::model::{
    fingerprint, load_session, load_tokenizer, model_files, run_batch, MODEL_FILE, ORT_LIBRARY,
    TOKENIZER_FILE,
};
use self::queue::{BatchLimits, Job, JobQueue};
use crate::config::EmbedConfig;
use crate::metrics::Metrics;

/// Which queue a job joins. Queries sit on a user's request path; bulk work does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Query,
    Bulk,
}

/// Why an embedding was not produced.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("the embedding queue is full")]
    QueueFull,
    #[error("the embedder has stopped")]
    Closed,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Where an embedding job's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmbedTiming {
    /// From queueing the job to the start of the model run that took it.
    pub queued: Duration,
    /// The model run (the whole batch the job was part of, pooling included).
    pub model: Duration,
}

type Embedded = Result<(Vec<Vec<f32>>, EmbedTiming), String>;
type Reply = tokio::sync::oneshot::Sender<Embedded>;
type Pending = tokio::sync::oneshot::Receiver<Embedded>;

/// A queued embedding job: redeem it for the job's vectors, in the order of its texts.
pub struct Ticket(Pending);

impl Ticket {
    /// Waits for the vectors from a thread that may block (background indexing).
    pub fn wait_blocking(self) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(Embedder::finish(self.0.blocking_recv())?.0)
    }
}

/// The embedding front: tokenizes on the caller's thread, queues, and awaits the model thread.
#[derive(Clone)]
pub struct Embedder {
    /// What the vectors depend on: the sha256 of the model file and the tokenizer file.
    fingerprint: String,
    tokenizer: Arc<Tokenizer>,
    queue: Arc<JobQueue>,
    metrics: Metrics,
    /// The model threads, joined by [`Embedder::join`].
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Embedder {
    /// Checks and loads the model files, then starts the model thread.
    pub fn open(
        models_dir: &Path,
        config: &EmbedConfig,
        metrics: Metrics,
    ) -> anyhow::Result<Embedder> {
        let [_, model_path, tokenizer_path] = model_files(models_dir)?;
        let fingerprint = fingerprint(&model_path, &tokenizer_path)?;
        let tokenizer = Arc::new(load_tokenizer(&tokenizer_path, config.max_text_tokens)?);
        let queue = Arc::new(JobQueue::new(config.queue_texts));
        // Every session loads before any thread starts: a failure leaves no thread behind.
        let sessions = (0..config.workers)
            .map(|_| load_session(models_dir, config))
            .collect::<anyhow::Result<Vec<Session>>>()?;
        let mut threads = Vec::with_capacity(sessions.len());
        for (worker, mut session) in sessions.into_iter().enumerate() {
            let worker_queue = queue.clone();
            let worker_metrics = metrics.clone();
            let limits = BatchLimits {
                query: config.batch_texts,
                bulk: config.background_batch_texts,
                tokens: config.batch_tokens,
            };
            let thread = std::thread::Builder::new()
                .name(format!("embed-{worker}"))
                .spawn(move || {
                    while let Some(jobs) = worker_queue.take_batch(limits, &worker_metrics) {
                        run_jobs(&mut session, jobs, &worker_metrics);
                    }
                    tracing::debug!(worker, "embedding thread stopped");
                })
                .context("starting an embedding thread");
            match thread {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    // The threads already started end with the queue.
                    queue.close();
                    return Err(error);
                }
            }
        }
        Ok(Embedder {
            fingerprint,
            tokenizer,
            queue,
            metrics,
            threads: Arc::new(Mutex::new(threads)),
        })
    }

    /// Names the model the vectors come from: vectors of another fingerprint are not comparable
    /// with this model's (the store records it; see `App::open`).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Word-piece ids of each text, truncated to the configured maximum.
    pub fn tokenize(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|text| {
                let encoding = self
                    .tokenizer
                    .encode(*text, true)
                    .map_err(|e| anyhow!("tokenizing: {e}"))?;
                Ok(encoding.get_ids().to_vec())
            })
            .collect()
    }

    /// Embeds texts, with where the time went; waits for the model thread without blocking the
    /// caller's executor.
    pub async fn embed(
        &self,
        texts: &[&str],
        priority: Priority,
    ) -> Result<(Vec<Vec<f32>>, EmbedTiming), EmbedError> {
        Self::finish(self.submit(texts, priority)?.await)
    }

    /// Queues texts already tokenized by [`Embedder::tokenize`] (each non-empty). Bulk work
    /// waits here while the queue is full.
    pub fn submit_tokens(
        &self,
        texts: Vec<Vec<u32>>,
        priority: Priority,
    ) -> Result<Ticket, EmbedError> {
        if texts.is_empty() || texts.iter().any(Vec::is_empty) {
            return Err(EmbedError::Failed(anyhow!("an empty text to embed")));
        }
        let (reply, wait) = tokio::sync::oneshot::channel();
        let job = Job {
            texts,
            enqueued: Instant::now(),
            reply,
        };
        self.queue.push(job, priority, &self.metrics)?;
        Ok(Ticket(wait))
    }

    /// Tokenizes on the caller's thread and queues the job; the receiver yields its vectors.
    fn submit(&self, texts: &[&str], priority: Priority) -> Result<Pending, EmbedError> {
        Ok(self.submit_tokens(self.tokenize(texts)?, priority)?.0)
    }

    fn finish(
        received: Result<Embedded, tokio::sync::oneshot::error::RecvError>,
    ) -> Result<(Vec<Vec<f32>>, EmbedTiming), EmbedError> {
        match received {
            Ok(Ok(embedded)) => Ok(embedded),
            Ok(Err(message)) => Err(EmbedError::Failed(anyhow!(message))),
            Err(_) => Err(EmbedError::Closed),
        }
    }

    /// Stops the model threads after their current batch; queued jobs are dropped (their
    /// callers see `Closed`; stored memories stay pending for the next start).
    pub fn close(&self) {
        self.queue.close();
    }

    /// Closes the queue and waits for the model threads to end (at most one batch each).
    pub fn join(&self) {
        self.close();
        let threads = std::mem::take(&mut *self.threads.lock().expect("embed threads lock"));
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("an embedding thread panicked");
            }
        }
    }
}

fn run_jobs(session: &mut Session, jobs: Vec<Job>, metrics: &Metrics) {
    let started = Instant::now();
    for job in &jobs {
        metrics
            .embed_queue_wait_seconds
            .observe(started.duration_since(job.enqueued).as_secs_f64());
    }
    let texts: Vec<&[u32]> = jobs
        .iter()
        .flat_map(|job| job.texts.iter().map(Vec::as_slice))
        .collect();
    let width = texts.iter().map(|t| t.len()).max().unwrap_or(0);
    metrics.embed_batch_texts.observe(texts.len() as f64);
    metrics
        .embed_batch_tokens
        .observe((texts.len() * width) as f64);
    let result = run_batch(session, &texts);
    let model = started.elapsed();
    metrics.embed_batch_seconds.observe(model.as_secs_f64());
    match result {
        Ok(mut vectors) => {
            // Hand each job its own slice of the batch, in order.
            for job in jobs.into_iter().rev() {
                let mine = vectors.split_off(vectors.len() - job.texts.len());
                let timing = EmbedTiming {
                    queued: started.duration_since(job.enqueued),
                    model,
                };
                let _ = job.reply.send(Ok((mine, timing)));
            }
        }
        Err(error) => {
            tracing::error!(error = %error, texts = texts.len(), jobs = jobs.len(), "model batch failed");
            if jobs.len() == 1 {
                for job in jobs {
                    let _ = job.reply.send(Err(error.to_string()));
                }
                return;
            }
            // One bad job must not fail the others it was batched with: run each alone.
            for job in jobs {
                let texts: Vec<&[u32]> = job.texts.iter().map(Vec::as_slice).collect();
                let alone = Instant::now();
                let result = run_batch(session, &texts)
                    .map(|vectors| {
                        let timing = EmbedTiming {
                            queued: alone.duration_since(job.enqueued),
                            model: alone.elapsed(),
                        };
                        (vectors, timing)
                    })
                    .map_err(|e| e.to_string());
                let _ = job.reply.send(result);
            }
        }
    }
}
