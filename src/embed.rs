//! Sentence embeddings: the tokenizer and ONNX Runtime sessions on threads of their own.
//!
//! Callers tokenize on their own thread (the indexer also sorts its texts by length), then
//! queue a job. A model thread (one per worker, each with its own session) takes what is
//! queued: waiting queries alone, up to `--embed-batch-texts`, or when no query waits,
//! background jobs up to `--embed-background-batch-texts`, and never more than
//! `--embed-batch-tokens` padded tokens. It pads the batch to its longest member, runs it,
//! mean-pools over the attention mask and L2-normalises. There is no timer: an idle daemon runs
//! a lone query at once, a busy one batches what piled up meanwhile.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
use tokenizers::{Tokenizer, TruncationParams};

use crate::config::{EmbedConfig, GraphOptimization};
use crate::metrics::Metrics;
use crate::vector::DIM;

pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";
pub const MODEL_FILE: &str = "model.onnx";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

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

struct Job {
    texts: Vec<Vec<u32>>,
    enqueued: Instant,
    reply: Reply,
}

impl Job {
    /// Its texts, and the longest one's tokens.
    fn shape(&self) -> (usize, usize) {
        let width = self.texts.iter().map(Vec::len).max().unwrap_or(0);
        (self.texts.len(), width)
    }
}

#[derive(Default)]
struct QueueState {
    query: VecDeque<Job>,
    bulk: VecDeque<Job>,
    query_texts: usize,
    bulk_texts: usize,
    closed: bool,
}

struct JobQueue {
    state: Mutex<QueueState>,
    wake: Condvar,
    room: Condvar,
    capacity_texts: usize,
}

impl JobQueue {
    fn push(&self, job: Job, priority: Priority, metrics: &Metrics) -> Result<(), EmbedError> {
        let texts = job.texts.len();
        let mut state = self.state.lock().expect("embed queue lock");
        if state.closed {
            return Err(EmbedError::Closed);
        }
        match priority {
            Priority::Query => {
                if state.query_texts + texts > self.capacity_texts {
                    return Err(EmbedError::QueueFull);
                }
                state.query_texts += texts;
                state.query.push_back(job);
            }
            Priority::Bulk => {
                // Background work waits for room instead of failing.
                while state.bulk_texts > 0
                    && state.bulk_texts + texts > self.capacity_texts
                    && !state.closed
                {
                    state = self.room.wait(state).expect("embed queue lock");
                }
                if state.closed {
                    return Err(EmbedError::Closed);
                }
                state.bulk_texts += texts;
                state.bulk.push_back(job);
            }
        }
        metrics
            .embed_queue_texts
            .set((state.query_texts + state.bulk_texts) as i64);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Blocks until work is queued; takes queries first, up to `limits.query` texts, else bulk
    /// jobs, up to `limits.bulk` texts; either way no more than `limits.tokens` padded tokens
    /// (always at least one job). `None` once closed.
    fn take_batch(&self, limits: BatchLimits, metrics: &Metrics) -> Option<Vec<Job>> {
        let mut state = self.state.lock().expect("embed queue lock");
        while state.query.is_empty() && state.bulk.is_empty() {
            if state.closed {
                return None;
            }
            state = self.wake.wait(state).expect("embed queue lock");
        }
        if state.closed {
            return None;
        }
        // Queries and background work never share a run: a query's batch holds only queries,
        // so it is as short as it can be, and waits at most for one background run to end.
        let from_queries = !state.query.is_empty();
        let max_texts = if from_queries {
            limits.query
        } else {
            limits.bulk
        };
        let mut batch = Vec::new();
        let (mut texts, mut width) = (0, 0);
        loop {
            let queue = if from_queries {
                &mut state.query
            } else {
                &mut state.bulk
            };
            let Some((next_texts, next_width)) = queue.front().map(Job::shape) else {
                break;
            };
            // The batch pads every text to its longest: its cost is rows times that width.
            let padded = (texts + next_texts) * width.max(next_width);
            if !batch.is_empty() && (texts + next_texts > max_texts || padded > limits.tokens) {
                break;
            }
            batch.push(queue.pop_front().expect("front checked"));
            texts += next_texts;
            width = width.max(next_width);
        }
        if from_queries {
            state.query_texts -= texts;
        } else {
            state.bulk_texts -= texts;
        }
        metrics
            .embed_queue_texts
            .set((state.query_texts + state.bulk_texts) as i64);
        drop(state);
        self.room.notify_all();
        Some(batch)
    }

    fn close(&self) {
        let mut state = self.state.lock().expect("embed queue lock");
        state.closed = true;
        state.query.clear();
        state.bulk.clear();
        drop(state);
        self.wake.notify_all();
        self.room.notify_all();
    }
}

/// Most texts in one model run, by the kind of work it holds, and most padded tokens.
#[derive(Clone, Copy, Debug)]
struct BatchLimits {
    query: usize,
    bulk: usize,
    tokens: usize,
}

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
    tokenizer: Arc<Tokenizer>,
    queue: Arc<JobQueue>,
    metrics: Metrics,
    /// The model threads, joined by [`Embedder::join`].
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// The files the daemon needs in its models directory, each checked before anything loads.
pub fn model_files(models_dir: &Path) -> anyhow::Result<[PathBuf; 3]> {
    let files = [ORT_LIBRARY, MODEL_FILE, TOKENIZER_FILE].map(|name| models_dir.join(name));
    for file in &files {
        if !file.is_file() {
            bail!(
                "missing {}: run `make models` (or `scripts/fetch-models.sh {}`) to fetch the pinned, \
                 checksummed files, or point --models-dir / MEMORY_SIDECAR_MODELS_DIR at a directory holding them",
                file.display(),
                models_dir.display()
            );
        }
    }
    Ok(files)
}

fn ort_error<R>(error: ort::Error<R>) -> anyhow::Error {
    anyhow!("onnx runtime: {error}")
}

/// Loads the tokenizer with padding off (batches pad to their longest member) and an explicit
/// truncation to `max_tokens` word pieces.
pub fn load_tokenizer(path: &Path, max_tokens: usize) -> anyhow::Result<Tokenizer> {
    let mut tokenizer =
        Tokenizer::from_file(path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..TruncationParams::default()
        }))
        .map_err(|e| anyhow!("configuring truncation: {e}"))?;
    Ok(tokenizer)
}

/// The process's one ONNX Runtime environment (the runtime allows no second one), loaded from
/// `library` on first use.
fn environment(library: &Path) -> anyhow::Result<Environment> {
    static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);
    let mut slot = ENVIRONMENT.lock().expect("environment lock");
    if let Some(environment) = slot.as_ref() {
        return Ok(environment.clone());
    }
    let environment = ort::init_from(library)
        .map_err(|e| anyhow!("loading {}: {e}", library.display()))?
        .with_name("memory-sidecar")
        .build()
        .map_err(ort_error)?;
    *slot = Some(environment.clone());
    Ok(environment)
}

/// Opens an ONNX Runtime session for the model as `config` says: its intra-op threads, graph
/// optimisation and whether the threads spin between runs. Benchmarks open their bare-model
/// baselines through this too, with the daemon's own [`EmbedConfig`], so that both run alike.
pub fn load_session(models_dir: &Path, config: &EmbedConfig) -> anyhow::Result<Session> {
    let EmbedConfig {
        threads,
        optimization,
        spin,
        ..
    } = *config;
    let [library, model, _] = model_files(models_dir)?;
    let environment = environment(&library)?;
    let session = Session::builder(&environment)
        .map_err(ort_error)?
        .with_optimization_level(match optimization {
            GraphOptimization::Disable => GraphOptimizationLevel::Disable,
            GraphOptimization::Basic => GraphOptimizationLevel::Level1,
            GraphOptimization::Extended => GraphOptimizationLevel::Level2,
            GraphOptimization::All => GraphOptimizationLevel::All,
        })
        .map_err(ort_error)?
        .with_intra_threads(threads)
        .map_err(ort_error)?
        .with_intra_op_spinning(spin)
        .map_err(ort_error)?
        .with_inter_threads(1)
        .map_err(ort_error)?
        .commit_from_file(&model)
        .map_err(ort_error)
        .with_context(|| format!("loading {}", model.display()))?;
    Ok(session)
}

/// Runs one padded batch and returns one unit vector per text.
pub fn run_batch(session: &mut Session, texts: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
    let rows = texts.len();
    let width = texts.iter().map(|t| t.len()).max().unwrap_or(0);
    if rows == 0 || width == 0 {
        bail!("empty batch");
    }
    let mut input_ids = vec![0i64; rows * width];
    let mut attention = vec![0i64; rows * width];
    for (row, ids) in texts.iter().enumerate() {
        for (col, &id) in ids.iter().enumerate() {
            input_ids[row * width + col] = i64::from(id);
            attention[row * width + col] = 1;
        }
    }
    let shape = [rows, width];
    let ids_tensor = Tensor::from_array((shape, input_ids)).map_err(ort_error)?;
    let mask_tensor = Tensor::from_array((shape, attention.clone())).map_err(ort_error)?;
    let types_tensor = Tensor::from_array((shape, vec![0i64; rows * width])).map_err(ort_error)?;
    let outputs = session
        .run(ort::inputs![
            "input_ids" => ids_tensor,
            "attention_mask" => mask_tensor,
            "token_type_ids" => types_tensor,
        ])
        .map_err(ort_error)?;
    let (out_shape, hidden) = outputs[0].try_extract_tensor::<f32>().map_err(ort_error)?;
    if out_shape.len() != 3
        || out_shape[0] as usize != rows
        || out_shape[1] as usize != width
        || out_shape[2] as usize != DIM
    {
        bail!("model output shape {out_shape:?}, expected [{rows}, {width}, {DIM}]");
    }
    let mut vectors = Vec::with_capacity(rows);
    for row in 0..rows {
        let mut pooled = vec![0f32; DIM];
        let mut count = 0f32;
        for col in 0..width {
            if attention[row * width + col] == 0 {
                continue;
            }
            count += 1.0;
            let offset = (row * width + col) * DIM;
            for (sum, value) in pooled.iter_mut().zip(&hidden[offset..offset + DIM]) {
                *sum += value;
            }
        }
        let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt() / count;
        if !norm.is_finite() || norm == 0.0 {
            bail!("model produced a zero or non-finite vector");
        }
        // Mean then normalise: dividing by count is absorbed into the norm.
        let scale = 1.0 / (norm * count);
        pooled.iter_mut().for_each(|x| *x *= scale);
        vectors.push(pooled);
    }
    Ok(vectors)
}

impl Embedder {
    /// Checks and loads the model files, then starts the model thread.
    pub fn open(
        models_dir: &Path,
        config: &EmbedConfig,
        metrics: Metrics,
    ) -> anyhow::Result<Embedder> {
        let [_, _, tokenizer_path] = model_files(models_dir)?;
        let tokenizer = Arc::new(load_tokenizer(&tokenizer_path, config.max_text_tokens)?);
        let queue = Arc::new(JobQueue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            room: Condvar::new(),
            capacity_texts: config.queue_texts,
        });
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
            tokenizer,
            queue,
            metrics,
            threads: Arc::new(Mutex::new(threads)),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> JobQueue {
        JobQueue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            room: Condvar::new(),
            capacity_texts: 1024,
        }
    }

    /// Queues a job of texts with these token counts.
    fn push(queue: &JobQueue, widths: &[usize], priority: Priority, metrics: &Metrics) {
        let (reply, _) = tokio::sync::oneshot::channel();
        let job = Job {
            texts: widths.iter().map(|w| vec![1; *w]).collect(),
            enqueued: Instant::now(),
            reply,
        };
        queue.push(job, priority, metrics).unwrap();
    }

    /// The shapes of the next batch's jobs.
    fn next(queue: &JobQueue, limits: BatchLimits, metrics: &Metrics) -> Vec<(usize, usize)> {
        let batch = queue.take_batch(limits, metrics).unwrap();
        batch.iter().map(Job::shape).collect()
    }

    const LIMITS: BatchLimits = BatchLimits {
        query: 32,
        bulk: 8,
        tokens: 512,
    };

    #[test]
    fn queries_go_first_and_never_share_a_run_with_background_work() {
        let (queue, metrics) = (queue(), Metrics::new().unwrap());
        push(&queue, &[10, 10], Priority::Bulk, &metrics);
        push(&queue, &[12], Priority::Query, &metrics);
        push(&queue, &[14], Priority::Query, &metrics);
        assert_eq!(next(&queue, LIMITS, &metrics), [(1, 12), (1, 14)]);
        assert_eq!(next(&queue, LIMITS, &metrics), [(2, 10)]);
    }

    #[test]
    fn a_batch_stops_at_its_padded_token_budget() {
        let (queue, metrics) = (queue(), Metrics::new().unwrap());
        for width in [10, 10, 200, 10, 10] {
            push(&queue, &[width], Priority::Query, &metrics);
        }
        // A third text would pad three rows to 200 tokens: 600 > 512.
        assert_eq!(next(&queue, LIMITS, &metrics), [(1, 10), (1, 10)]);
        assert_eq!(next(&queue, LIMITS, &metrics), [(1, 200), (1, 10)]);
        assert_eq!(next(&queue, LIMITS, &metrics), [(1, 10)]);
        // A job over the budget on its own still runs, alone.
        push(&queue, &[300, 300], Priority::Query, &metrics);
        push(&queue, &[10], Priority::Query, &metrics);
        assert_eq!(next(&queue, LIMITS, &metrics), [(2, 300)]);
        assert_eq!(next(&queue, LIMITS, &metrics), [(1, 10)]);
    }

    #[test]
    fn background_batches_stop_at_their_own_text_limit() {
        let (queue, metrics) = (queue(), Metrics::new().unwrap());
        for _ in 0..3 {
            push(&queue, &[20, 20, 20, 20], Priority::Bulk, &metrics);
        }
        assert_eq!(next(&queue, LIMITS, &metrics), [(4, 20), (4, 20)]);
        assert_eq!(next(&queue, LIMITS, &metrics), [(4, 20)]);
    }
}
