//! The domain operations, one file each: authentication ([`auth`]), [`ingest`], [`prepare`]
//! and the context it renders ([`render`]), [`search`] and export, [`upload`], deletion and
//! erasure ([`erase`]), the key lifecycle ([`keys`]) and the [`audit`] log; and the
//! background [`indexer`]. No HTTP types here.
//!
//! `App::open` loads the model and opens the store (which checks itself against its ledger and
//! finds its keyring), and finishes any erasure a crash cut short; `App::start` begins the
//! indexer, which first replays memories that were stored but not embedded when the process
//! last stopped and then keeps embedding new ones as ingests arrive. The daemon is ready once
//! that replay is done. `App::close` stops the indexer, the model and the store's threads,
//! waits for each, and leaves everything durable.
//!
//! Two rules every operation keeps:
//! - Blocking work (a store or keyring call, an index search) runs through [`blocking`], never
//!   on an async worker.
//! - Every operation on a vault holds its lock ([`locks`]): shared to read or add, exclusive
//!   to delete; so an ingest, a search or the indexer never sees a vault half erased, nor
//!   writes a row sealed with a destroyed key.

pub mod audit;
pub mod auth;
pub mod backup;
mod blocking;
pub mod change;
pub mod erase;
mod indexer;
pub mod ingest;
pub mod keys;
mod locks;
pub mod passages;
pub mod prepare;
pub mod render;
pub mod search;
pub mod session;
pub mod temporal;
pub mod upload;
pub mod vaults;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub use self::blocking::blocking;
use self::locks::VaultLocks;
use crate::auth::AdminKey;
use crate::bounds::MAX_KEYS_PAGE;
use crate::clock::Clock;
use crate::config::{Config, StoreConfig};
use crate::crypto::{MasterKey, VaultCipher};
use crate::embed::Embedder;
use crate::error::ApiError;
use crate::ids::VaultId;
use crate::index::Indexes;
use crate::metrics::Metrics;
use crate::store::{Backend, PgOptions, PgStore, SledOptions, SledStore};
use crate::throttle::{FailureThrottle, KeyThrottle};
use crate::tombstones::{Journal, Tombstone};

/// How often a key's last use is written to the store, at most.
const TOUCH_EVERY_MS: i64 = 60_000;

const STARTING: u8 = 0;
const READY: u8 = 1;
const STOPPING: u8 = 2;

/// Wakes the indexer when an ingest has stored something.
#[derive(Default)]
struct Doorbell {
    rung: Mutex<bool>,
    ring: Condvar,
}

impl Doorbell {
    fn ring(&self) {
        *self.rung.lock().expect("doorbell lock") = true;
        self.ring.notify_one();
    }

    /// Waits for a ring, or the timeout (a safety net: pending work is always rescanned).
    fn wait(&self, timeout: Duration) {
        let rung = self.rung.lock().expect("doorbell lock");
        let (mut rung, _) = self
            .ring
            .wait_timeout_while(rung, timeout, |rung| !*rung)
            .expect("doorbell lock");
        *rung = false;
    }
}

pub struct App {
    config: Config,
    store: Arc<dyn Backend>,
    embedder: Embedder,
    indexes: Arc<Indexes>,
    admin: AdminKey,
    pub metrics: Metrics,
    clock: Arc<dyn Clock>,
    state: AtomicU8,
    doorbell: Doorbell,
    locks: VaultLocks,
    /// Memories per vault, counted on first use and kept up to date (the vault size limit).
    counts: Mutex<HashMap<VaultId, usize>>,
    key_throttle: KeyThrottle,
    auth_failures: FailureThrottle,
    /// Serialises key minting, rotation and revocation, and the removal mark of a vault, so
    /// two rotations cannot both win and no key slips into a vault being removed.
    key_ops: Mutex<()>,
    indexer: Mutex<Option<JoinHandle<()>>>,
    /// Erasures and revocations, for a restore to apply (`crate::tombstones`).
    tombstones: Journal,
}

/// The master key for `config`'s store: generated on the first start of an embedded store
/// (beside its keyring), never for a shared one, whose every node needs the fleet's key.
pub fn master_key(config: &Config) -> anyhow::Result<MasterKey> {
    match config.store {
        StoreConfig::Sled => {
            MasterKey::load(&config.master_key_file, &config.data_dir.join("keyring"))
        }
        StoreConfig::Postgres { .. } => MasterKey::load_existing(&config.master_key_file),
    }
}

/// Opens `config`'s store: the embedded one in the data directory, or the database a fleet
/// shares.
pub fn open_store(
    config: &Config,
    master: MasterKey,
    metrics: &Metrics,
) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(match &config.store {
        StoreConfig::Sled => {
            let options = SledOptions {
                data_dir: config.data_dir.clone(),
                cache_bytes: config.cache_bytes,
                accept_lost_commits: config.accept_lost_commits,
            };
            Arc::new(SledStore::open(&options, &master, metrics.clone())?)
        }
        StoreConfig::Postgres {
            url,
            pool_size,
            connect_timeout,
            statement_timeout,
            lease,
        } => {
            // The node's own files (the tombstone journal) still live in its data dir.
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("creating {}", config.data_dir.display()))?;
            let options = PgOptions {
                url: url.clone(),
                pool_size: *pool_size,
                connect_timeout: *connect_timeout,
                statement_timeout: *statement_timeout,
                lease: *lease,
            };
            Arc::new(PgStore::open(&options, master)?)
        }
    })
}

/// The exit code after the store failed in the way that needs a restart (`Restart=on-failure`
/// restarts it; 1 is any other failure, 2 a refused configuration).
pub const EXIT_STORAGE_FAILED: u8 = 3;

impl App {
    /// Loads the model and opens the store and the keyring. Fails with a clear message when a
    /// file is missing, the store lost acknowledged commits, or the master key does not match.
    pub fn open(
        config: Config,
        admin: AdminKey,
        master: MasterKey,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Arc<App>> {
        let embedder = Embedder::open(&config.models_dir, &config.embed, metrics.clone())?;
        let opened = Instant::now();
        let store = open_store(&config, master, &metrics)?;
        let tombstones = Journal::open(&config.tombstone_log, clock.now_ms())?;
        let limits = &config.limits;
        let app = App {
            indexes: Arc::new(Indexes::new(
                config.retrieval.hnsw_threshold,
                config.retrieval.max_loaded_memories,
            )),
            key_throttle: KeyThrottle::new(
                limits.key_rate_per_second,
                limits.key_burst,
                TOUCH_EVERY_MS,
            ),
            auth_failures: FailureThrottle::new(
                limits.auth_failures_per_second,
                limits.auth_failure_burst,
            ),
            config,
            store,
            embedder,
            admin,
            metrics,
            clock,
            state: AtomicU8::new(STARTING),
            doorbell: Doorbell::default(),
            locks: VaultLocks::default(),
            counts: Mutex::new(HashMap::new()),
            key_ops: Mutex::new(()),
            indexer: Mutex::new(None),
            tombstones,
        };
        app.recover()?;
        app.check_embedding_model()?;
        let model: String = app.embedder.fingerprint().chars().take(12).collect();
        app.metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &model])
            .set(1);
        app.metrics
            .disk_reserve_bytes
            .set(i64::try_from(app.config.limits.min_free_bytes).unwrap_or(i64::MAX));
        let (store, metrics) = (&app.store, &app.metrics);
        let vaults = store.vault_count();
        metrics.vaults.set(vaults as i64);
        let pending = store.pending_count();
        metrics.embed_pending.set(pending as i64);
        metrics.replay_remaining.set(pending as i64);
        tracing::info!(
            vaults,
            pending,
            seconds = opened.elapsed().as_secs_f64(),
            "store open"
        );
        let app = Arc::new(app);
        // Counting every memory reads the whole tree (a second or more at a million): the
        // gauge is filled in the background instead of delaying readiness. The count usually
        // ends before the first request; an ingest racing it can be counted twice in the gauge
        // until the next start.
        let counter = app.store.clone();
        let gauge = app.metrics.memories.clone();
        std::thread::Builder::new()
            .name("count-memories".into())
            .spawn(move || {
                let started = Instant::now();
                let memories = counter.memory_count();
                gauge.add(memories as i64);
                tracing::info!(
                    memories,
                    seconds = started.elapsed().as_secs_f64(),
                    "memories counted"
                );
            })
            .context("starting the memory count")?;
        Ok(app)
    }

    /// Finishes erasures a crash cut short, drops data keys whose vault was never created (a
    /// crash mid-mint), and says which vaults have no data key (their reads fail loudly).
    fn recover(&self) -> anyhow::Result<()> {
        for (vault, record) in self.store.vaults()? {
            if record.erasing {
                tracing::warn!(%vault, "finishing an erasure interrupted by a stop");
                self.finish_erasure(vault, record.removing)?;
            }
        }
        let keyless = self.store.reconcile_data_keys()?;
        if keyless > 0 {
            tracing::error!(
                vaults = keyless,
                keys = %self.store.data_keys_location(),
                "vaults without a data key: their memories cannot be read; restore the data \
                 keys from backup"
            );
        }
        self.store.sync()
    }

    /// Vectors of one model are not comparable with another's: a store whose vectors come from
    /// another model than the one loaded is refused, or, with `--reembed`, has every memory
    /// marked for embedding again (the replay does it; ready once done). A store from before
    /// the fingerprint was recorded, holding vectors, counts as another model.
    fn check_embedding_model(&self) -> anyhow::Result<()> {
        let loaded = self.embedder.fingerprint();
        let (recorded, any_vectors) = self.store.embedding_model()?;
        if recorded.as_deref() == Some(loaded) {
            return Ok(());
        }
        if any_vectors && !self.config.reembed {
            anyhow::bail!(
                "the vectors in {} come from another embedding model ({}) than the one in {} \
                 ({loaded}); start with --reembed (MEMORY_SIDECAR_REEMBED=true) to embed every \
                 memory again with this model (the daemon is ready once that is done: about \
                 the memories' count divided by the fill rate in docs/benchmarks.md), or point \
                 --models-dir at the model the store was made with",
                self.config.data_dir.display(),
                recorded
                    .as_deref()
                    .unwrap_or("not recorded: a store made before models were fingerprinted"),
                self.config.models_dir.display(),
            );
        }
        let marked = self.store.set_embedding_model(loaded, any_vectors)?;
        if marked > 0 {
            tracing::warn!(
                memories = marked,
                model = loaded,
                "embedding every memory again with the loaded model (--reembed)"
            );
        }
        self.store.sync()
    }

    /// Writes a tombstone, durably, before the change it records (the caller holds writes
    /// off a backup's copy across both: `Snapshots::hold_writes`).
    fn tombstone(&self, tombstone: Tombstone) -> Result<(), ApiError> {
        self.tombstones
            .append(self.now_ms(), tombstone)
            .map(|_| ())
            .map_err(|error| {
                tracing::error!(
                    error = %format!("{error:#}"),
                    "writing the tombstone journal failed; nothing was erased or revoked"
                );
                ApiError::StorageUnavailable
            })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Starts the indexer thread; the app becomes ready once the start-up replay is done.
    pub fn start(self: &Arc<Self>) -> anyhow::Result<()> {
        let app = self.clone();
        let thread = std::thread::Builder::new()
            .name("indexer".into())
            .spawn(move || app.run_indexer())
            .context("starting the indexer thread")?;
        *self.indexer.lock().expect("indexer handle lock") = Some(thread);
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == READY
    }

    pub fn is_stopping(&self) -> bool {
        self.state.load(Ordering::Acquire) == STOPPING
    }

    /// Refuses new work from now on; in-flight requests finish.
    pub fn begin_shutdown(&self) {
        if self.state.swap(STOPPING, Ordering::AcqRel) != STOPPING {
            crate::notify::notify("STOPPING=1");
        }
        self.metrics.ready.set(0);
    }

    /// Whether the store still takes writes: false once a write failed in the way that needs
    /// a restart (`/healthz` then answers 503, and the daemon exits with
    /// [`EXIT_STORAGE_FAILED`] unless `--keep-serving-after-storage-failure`).
    pub fn is_healthy(&self) -> bool {
        self.store.is_healthy()
    }

    /// Stops the indexer, then the model threads, then the store's own threads, waiting for
    /// each, and makes everything written durable. Memories not yet embedded stay pending in
    /// the store and are embedded at the next start. Blocks: call it from a thread that may
    /// (after the server has drained), never from an async worker. Idempotent.
    pub fn close(&self) -> anyhow::Result<()> {
        self.begin_shutdown();
        // Closing the model's queue ends every wait the indexer may be in.
        self.embedder.close();
        self.doorbell.ring();
        let indexer = self.indexer.lock().expect("indexer handle lock").take();
        if let Some(indexer) = indexer {
            if indexer.join().is_err() {
                bail!("the indexer thread panicked");
            }
        }
        self.embedder.join();
        self.store.close()
    }

    /// `/readyz`: ready, and able to make writes durable.
    pub fn check_ready(&self) -> Result<(), ApiError> {
        self.check_serving()?;
        if !self.store.is_healthy() {
            return Err(ApiError::StorageUnavailable);
        }
        Ok(())
    }

    /// Requests other than health checks are refused unless the app is ready.
    pub fn check_serving(&self) -> Result<(), ApiError> {
        match self.state.load(Ordering::Acquire) {
            READY => Ok(()),
            STOPPING => Err(ApiError::ShuttingDown),
            _ => Err(ApiError::NotReady),
        }
    }

    /// An internal error on a store that has failed is the store's failure, and says so
    /// (`503 storage_unavailable`) rather than 500: sled refuses every write after a failed one,
    /// and a read through a node it has not yet split needs one.
    pub fn explain_store_failure(&self, error: ApiError) -> ApiError {
        match error {
            ApiError::Internal(cause) if !self.store.is_healthy() => {
                tracing::error!(error = %format!("{cause:#}"), "a request failed on the failed store");
                ApiError::StorageUnreadable
            }
            other => other,
        }
    }

    /// Maps a failed store write to its error; an I/O error marks the store as failed.
    fn storage_error(&self, what: &'static str) -> impl FnOnce(anyhow::Error) -> ApiError + '_ {
        move |error| {
            tracing::error!(error = %format!("{error:#}"), "{what} failed");
            self.store.note_write_error(&error);
            match ApiError::from(error) {
                away @ ApiError::DatabaseUnavailable(_) => away,
                _ => ApiError::StorageUnavailable,
            }
        }
    }

    /// Refuses a page size outside 1 to [`MAX_KEYS_PAGE`] (keys, vaults, the audit log).
    fn check_page_limit(limit: usize) -> Result<(), ApiError> {
        if limit == 0 || limit > MAX_KEYS_PAGE {
            return Err(ApiError::invalid(format!(
                "`limit` must be 1 to {MAX_KEYS_PAGE}"
            )));
        }
        Ok(())
    }

    /// Refuses a write that adds data while the data filesystem is under its reserve, so that
    /// sled never meets a full disk in the middle of a write, and the reserve is left for
    /// embedding what was already acknowledged, for deletes and for revocations.
    fn check_disk_room(&self) -> Result<(), ApiError> {
        let min = self.config.limits.min_free_bytes;
        let Some(free) = self.refresh_disk_free() else {
            return Ok(());
        };
        if free < min {
            return Err(ApiError::DiskFull {
                free_mb: free >> 20,
                min_mb: min >> 20,
            });
        }
        Ok(())
    }

    /// Brings the gauges read at scrape time up to date. Blocking (a statvfs).
    pub fn refresh_gauges(&self) {
        self.refresh_disk_free();
        self.metrics
            .index_loaded_memories
            .set(i64::try_from(self.indexes.loaded_memories()).unwrap_or(i64::MAX));
        let counter = &self.metrics.index_graphs_built;
        counter.inc_by(self.indexes.graphs_built().saturating_sub(counter.get()));
    }

    /// Reads the data filesystem's free space into its gauge. `None` if it cannot be read:
    /// then a write goes ahead and a real failure is reported by the store.
    fn refresh_disk_free(&self) -> Option<u64> {
        match fs2::available_space(&self.config.data_dir) {
            Ok(free) => {
                self.metrics
                    .disk_free_bytes
                    .set(i64::try_from(free).unwrap_or(i64::MAX));
                Some(free)
            }
            Err(error) => {
                tracing::warn!(%error, "reading the data filesystem's free space failed");
                None
            }
        }
    }

    /// Makes everything written so far durable, or says the store cannot.
    async fn commit(&self, what: &'static str) -> Result<(), ApiError> {
        self.store.commit().await.map_err(self.storage_error(what))
    }

    /// The vault's cipher. A live vault without one is a damaged keyring: a loud error, never
    /// an empty answer.
    fn cipher(&self, vault: VaultId) -> Result<Arc<VaultCipher>, ApiError> {
        self.store
            .cipher(vault)
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("vault {vault} has no data key")))
    }
}
