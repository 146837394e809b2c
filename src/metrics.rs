//! A private Prometheus registry with named collectors.
//!
//! Names follow `memory_sidecar_<name>_<unit>[_total]`. Labels come from small fixed sets
//! (route, status class, mode); never a key, a vault, a memory or a raw path.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Cheap to clone: every collector is an `Arc` inside.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_seconds: HistogramVec,
    pub http_connections: IntGauge,
    pub http_in_flight: IntGauge,
    pub key_mode: IntCounterVec,
    pub embed_batch_texts: Histogram,
    pub embed_batch_tokens: Histogram,
    pub embed_batch_seconds: Histogram,
    pub embed_queue_wait_seconds: Histogram,
    pub embed_queue_texts: IntGauge,
    pub embed_pending: IntGauge,
    pub index_search_seconds: Histogram,
    pub commit_seconds: Histogram,
    pub commit_batch_size: Histogram,
    pub memories_stored: IntCounterVec,
    pub operations: IntCounterVec,
    pub vaults: IntGauge,
    pub memories: IntGauge,
    pub replay_remaining: IntGauge,
    pub ready: IntGauge,
    pub auth_failures: IntCounterVec,
    pub disk_free_bytes: IntGauge,
    pub storage_healthy: IntGauge,
    pub index_loaded_memories: IntGauge,
    pub index_graphs_built: IntCounter,
    pub unreadable_hits: IntCounter,
    /// The configured disk reserve (`--min-free-mb`), beside `disk_free_bytes` for alerts.
    pub disk_reserve_bytes: IntGauge,
    /// 1, labelled with the build's version and the loaded model's fingerprint (short).
    pub build_info: IntGaugeVec,
}

const NAMESPACE: &str = "memory_sidecar";

/// Latency buckets from 100 µs to 10 s.
fn seconds_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        10.0,
    ]
}

impl Metrics {
    pub fn new() -> anyhow::Result<Metrics> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(NAMESPACE);
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramOpts::new(name, help)
                .namespace(NAMESPACE)
                .buckets(buckets)
        };
        let counts = vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

        let metrics = Metrics {
            http_requests: IntCounterVec::new(
                opts(
                    "http_requests_total",
                    "HTTP requests answered, by route and status class.",
                ),
                &["route", "status"],
            )?,
            http_seconds: HistogramVec::new(
                hist(
                    "http_request_duration_seconds",
                    "Time from request headers to response, by route.",
                    seconds_buckets(),
                ),
                &["route"],
            )?,
            http_connections: IntGauge::with_opts(opts(
                "http_connections",
                "Open HTTP connections.",
            ))?,
            http_in_flight: IntGauge::with_opts(opts(
                "http_requests_in_flight",
                "Requests received and not yet answered.",
            ))?,
            key_mode: IntCounterVec::new(
                opts(
                    "key_mode_requests_total",
                    "Memory-key requests by the key's mode suffix.",
                ),
                &["mode"],
            )?,
            embed_batch_texts: Histogram::with_opts(hist(
                "embed_batch_texts",
                "Texts in one model batch.",
                counts.clone(),
            ))?,
            embed_batch_tokens: Histogram::with_opts(hist(
                "embed_batch_tokens",
                "Padded tokens (texts x longest) in one model batch.",
                vec![16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0],
            ))?,
            embed_batch_seconds: Histogram::with_opts(hist(
                "embed_batch_duration_seconds",
                "Model time for one batch.",
                seconds_buckets(),
            ))?,
            embed_queue_wait_seconds: Histogram::with_opts(hist(
                "embed_queue_wait_seconds",
                "Time a text waited for the model.",
                seconds_buckets(),
            ))?,
            embed_queue_texts: IntGauge::with_opts(opts(
                "embed_queue_texts",
                "Texts waiting for the model.",
            ))?,
            embed_pending: IntGauge::with_opts(opts(
                "embed_pending_memories",
                "Memories stored durably but not yet embedded and indexed.",
            ))?,
            index_search_seconds: Histogram::with_opts(hist(
                "index_search_duration_seconds",
                "Vector search time in one vault.",
                seconds_buckets(),
            ))?,
            commit_seconds: Histogram::with_opts(hist(
                "store_commit_duration_seconds",
                "Time of one group commit (flush and fsync).",
                seconds_buckets(),
            ))?,
            commit_batch_size: Histogram::with_opts(hist(
                "store_commit_waiters",
                "Requests made durable by one group commit.",
                counts,
            ))?,
            auth_failures: IntCounterVec::new(
                opts(
                    "auth_failures_total",
                    "Requests whose key failed to authenticate, by error code (never by key).",
                ),
                &["code"],
            )?,
            disk_free_bytes: IntGauge::with_opts(opts(
                "disk_free_bytes",
                "Free bytes on the data directory's filesystem, as last read.",
            ))?,
            index_graphs_built: IntCounter::with_opts(opts(
                "index_graphs_built_total",
                "HNSW graphs built for large vaults (after a load or growth past --hnsw-threshold).",
            ))?,
            unreadable_hits: IntCounter::with_opts(opts(
                "unreadable_hits_total",
                "Memories a search ranked but whose record the store could not read (left out of the answer).",
            ))?,
            disk_reserve_bytes: IntGauge::with_opts(opts(
                "disk_reserve_bytes",
                "Free bytes kept on the data directory's filesystem (--min-free-mb): below it new memories get 503 disk_full.",
            ))?,
            build_info: IntGaugeVec::new(
                opts(
                    "build_info",
                    "1, labelled with the daemon's version and the loaded embedding model's fingerprint (first 12 hex digits).",
                ),
                &["version", "model"],
            )?,
            index_loaded_memories: IntGauge::with_opts(opts(
                "index_loaded_memories",
                "Memories in the vault indexes held in memory (--max-loaded-memories bounds it).",
            ))?,
            storage_healthy: IntGauge::with_opts(opts(
                "storage_healthy",
                "1 while writes can be made durable; 0 after a failed flush or fsync, until restart.",
            ))?,
            operations: IntCounterVec::new(
                opts(
                    "lifecycle_operations_total",
                    "Key and vault operations (mint, rotate, revoke, upload, delete_*, erase_*) by outcome (ok, error).",
                ),
                &["operation", "outcome"],
            )?,
            memories_stored: IntCounterVec::new(
                opts(
                    "ingest_messages_total",
                    "Ingested messages by outcome (stored, or duplicate of one stored before).",
                ),
                &["outcome"],
            )?,
            vaults: IntGauge::with_opts(opts("vaults", "Vaults in the store."))?,
            memories: IntGauge::with_opts(opts("memories", "Memories in the store."))?,
            replay_remaining: IntGauge::with_opts(opts(
                "replay_remaining_memories",
                "Memories left to embed in the start-up replay.",
            ))?,
            ready: IntGauge::with_opts(opts(
                "ready",
                "1 once the model is loaded and replay is done.",
            ))?,
            registry,
        };
        metrics.register_all()?;
        Ok(metrics)
    }

    fn register_all(&self) -> anyhow::Result<()> {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.http_requests.clone()),
            Box::new(self.http_seconds.clone()),
            Box::new(self.http_connections.clone()),
            Box::new(self.http_in_flight.clone()),
            Box::new(self.key_mode.clone()),
            Box::new(self.embed_batch_texts.clone()),
            Box::new(self.embed_batch_tokens.clone()),
            Box::new(self.embed_batch_seconds.clone()),
            Box::new(self.embed_queue_wait_seconds.clone()),
            Box::new(self.embed_queue_texts.clone()),
            Box::new(self.embed_pending.clone()),
            Box::new(self.index_search_seconds.clone()),
            Box::new(self.commit_seconds.clone()),
            Box::new(self.commit_batch_size.clone()),
            Box::new(self.memories_stored.clone()),
            Box::new(self.operations.clone()),
            Box::new(self.vaults.clone()),
            Box::new(self.memories.clone()),
            Box::new(self.replay_remaining.clone()),
            Box::new(self.ready.clone()),
            Box::new(self.auth_failures.clone()),
            Box::new(self.disk_free_bytes.clone()),
            Box::new(self.storage_healthy.clone()),
            Box::new(self.index_loaded_memories.clone()),
            Box::new(self.index_graphs_built.clone()),
            Box::new(self.unreadable_hits.clone()),
            Box::new(self.disk_reserve_bytes.clone()),
            Box::new(self.build_info.clone()),
            // process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for collector in collectors {
            self.registry.register(collector)?;
        }
        Ok(())
    }

    /// The Prometheus text exposition of every collector.
    pub fn render(&self) -> anyhow::Result<String> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8(out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_the_namespace() {
        let metrics = Metrics::new().unwrap();
        metrics
            .http_requests
            .with_label_values(&["prepare", "2xx"])
            .inc();
        metrics.embed_batch_texts.observe(3.0);
        let text = metrics.render().unwrap();
        assert!(
            text.contains("memory_sidecar_http_requests_total{route=\"prepare\",status=\"2xx\"} 1")
        );
        assert!(text.contains("memory_sidecar_embed_batch_texts_bucket"));
    }
}
