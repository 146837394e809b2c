//! The model queue: jobs of tokenized texts wait here, queries apart from background work,
//! and a model thread takes a batch at a time within the batch bounds. Tested without the model.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use super::{EmbedError, Priority, Reply};
use crate::metrics::Metrics;

pub(super) struct Job {
    pub texts: Vec<Vec<u32>>,
    pub enqueued: Instant,
    pub reply: Reply,
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

pub(super) struct JobQueue {
    state: Mutex<QueueState>,
    wake: Condvar,
    room: Condvar,
    capacity_texts: usize,
}

impl JobQueue {
    /// An empty queue holding at most `capacity_texts` texts of each kind.
    pub(super) fn new(capacity_texts: usize) -> JobQueue {
        JobQueue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            room: Condvar::new(),
            capacity_texts,
        }
    }

    pub(super) fn push(
        &self,
        job: Job,
        priority: Priority,
        metrics: &Metrics,
    ) -> Result<(), EmbedError> {
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
    pub(super) fn take_batch(&self, limits: BatchLimits, metrics: &Metrics) -> Option<Vec<Job>> {
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

    pub(super) fn close(&self) {
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
pub(super) struct BatchLimits {
    pub query: usize,
    pub bulk: usize,
    pub tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> JobQueue {
        JobQueue::new(1024)
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
