//! The embedded backend: sled trees beside the keyring and the commit ledger, in the data
//! directory. Opening it checks the store against its ledger, migrates its schema, opens the
//! keyring and starts the group-commit thread; the other files of `store/` implement the
//! backend's traits on it, one kind of record each.
//!
//! Trees (all keys big-endian so prefix scans follow vault then memory order):
//! `keys` key id -> [`KeyRecord`]; `vault_keys` vault ++ key id -> () (a vault's keys without a
//! scan of every key); `key_used` key id -> last use (ms, coarse, not durable); `vaults` vault ->
//! [`VaultRecord`]; `memories` vault ++ memory id -> sealed [`MemoryRecord`]; `vectors` vault ++
//! memory id -> sealed vector + [`EntryMeta`]; `pending` vault ++ memory id -> () for memories
//! stored but not yet embedded (the replay set); `unembeddable` the same for memories the model
//! failed on (kept, not indexed); `dedup` vault ++ keyed digest of a message -> memory id, so a
//! retried exchange is stored once; `audit` sequence -> [`AuditEntry`]; `meta` the schema, the
//! last commit's number and the fingerprint of the model the vectors come from.
//!
//! [`KeyRecord`]: super::KeyRecord
//! [`VaultRecord`]: super::VaultRecord
//! [`MemoryRecord`]: super::MemoryRecord
//! [`EntryMeta`]: super::EntryMeta
//! [`AuditEntry`]: super::AuditEntry

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;

use anyhow::{bail, Context};
use sled::transaction::TransactionError;

use super::commit::Committer;
use super::ledger::Ledger;
use crate::crypto::{Keyring, MasterKey};
use crate::ids::{KeyId, MemoryId, VaultId};
use crate::metrics::Metrics;

/// The schema this build writes. 1 was a pre-release without encryption at rest; 2 had no
/// `vault_keys` tree (built from `keys` when a schema-2 store is opened).
const SCHEMA_VERSION: &[u8] = b"3";
const SCHEMA_WITHOUT_VAULT_KEYS: &[u8] = b"2";
pub(super) const COMMIT_SEQ: &str = "commit_seq";
/// `meta` key of the id floor (see `SledStore::id_floor`).
pub(super) const ID_FLOOR: &str = "id_floor";
/// Rows removed per sled batch when a vault or session is erased.
pub(super) const ERASE_BATCH: usize = 1024;

/// Where the embedded backend keeps its files, and how it opens them.
#[derive(Clone, Debug)]
pub struct SledOptions {
    /// The data directory: `store/` (sled), `keyring`, `ledger`.
    pub data_dir: PathBuf,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// Start even if the store lost commits its ledger says were acknowledged.
    pub accept_lost_commits: bool,
}

pub struct SledStore {
    pub(super) db: sled::Db,
    pub(super) path: PathBuf,
    pub(super) keys: sled::Tree,
    pub(super) vault_keys: sled::Tree,
    pub(super) key_used: sled::Tree,
    pub(super) vaults: sled::Tree,
    pub(super) memories: sled::Tree,
    pub(super) vectors: sled::Tree,
    pub(super) pending: sled::Tree,
    pub(super) unembeddable: sled::Tree,
    pub(super) dedup: sled::Tree,
    pub(super) audit: sled::Tree,
    /// The schema, the last commit's number and the embedding model's fingerprint.
    pub(super) meta: sled::Tree,
    /// Entries in `audit`, counted once at open.
    pub(super) audit_entries: AtomicUsize,
    pub(super) keyring: Keyring,
    pub(super) committer: Committer,
    /// Every write method holds it shared; a backup holds it exclusively for a moment.
    pub(super) gate: parking_lot::RwLock<()>,
    /// Added to every id sled generates: a restored store starts sled's counter again, so its
    /// ids begin above every id of the backup (`meta` `id_floor`, set by the restore).
    pub(super) id_floor: u64,
    /// The data directory's `lock` file, locked exclusively while the store is open: one
    /// process at a time (the daemon, or a command that opens the directory itself).
    _lock: File,
}

thread_local! {
    /// How many holds of the write gate this thread has (see [`SledStore::writing`]).
    static WRITE_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// One hold of the write gate, shared: writes held off a backup's consistent moment for as
/// long as it lives (also what [`super::backup::Snapshots::hold_writes`] returns).
pub struct Writing<'a> {
    _guard: parking_lot::RwLockReadGuard<'a, ()>,
}

impl Writing<'_> {
    /// Holds `gate` shared: plainly the first time on this thread, recursively when the thread
    /// already holds it (so a nested hold never waits behind a backup waiting for the outer).
    pub(super) fn hold(gate: &parking_lot::RwLock<()>) -> Writing<'_> {
        let depth = WRITE_DEPTH.get();
        let guard = if depth == 0 {
            gate.read()
        } else {
            gate.read_recursive()
        };
        WRITE_DEPTH.set(depth + 1);
        Writing { _guard: guard }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        WRITE_DEPTH.set(WRITE_DEPTH.get().saturating_sub(1));
    }
}

impl SledStore {
    /// Opens the data directory's store, refusing one that lost acknowledged commits or whose
    /// vaults' data keys are missing; starts the group-commit thread.
    pub fn open(
        options: &SledOptions,
        master: &MasterKey,
        metrics: Metrics,
    ) -> anyhow::Result<SledStore> {
        let dir = options.data_dir.join("store");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = lock_data_dir(&options.data_dir)?;
        let db = sled::Config::new()
            .path(&dir)
            .cache_capacity(options.cache_bytes)
            .open()
            .with_context(|| format!("opening the store in {}", dir.display()))?;
        let meta = db.open_tree("meta")?;
        let schema = meta.get("schema")?;
        match schema.as_deref() {
            None | Some(SCHEMA_VERSION) | Some(SCHEMA_WITHOUT_VAULT_KEYS) => {}
            Some(other) => bail!(
                "the store in {} has schema {:?}; this build reads schemas 2 and 3 (schema 1 \
                 was a pre-release without encryption at rest: there is no migration, start \
                 from an empty data directory and import an export)",
                dir.display(),
                String::from_utf8_lossy(other),
            ),
        }
        // Before anything is written or served: a store that lost acknowledged commits must
        // not answer.
        let ledger_path = options.data_dir.join("ledger");
        let store_seq = commit_seq(&meta)?;
        Ledger::check(
            &Ledger::read(&ledger_path),
            store_seq,
            (&dir, &ledger_path),
            options.accept_lost_commits,
        )?;
        let keys = db.open_tree("keys")?;
        let vault_keys = db.open_tree("vault_keys")?;
        if schema.as_deref() != Some(SCHEMA_VERSION) {
            index_vault_keys(&keys, &vault_keys)?;
            meta.insert("schema", SCHEMA_VERSION)?;
        }
        // The store's last commit may be only in the page cache (a kill between the commit's
        // flush and its fsync): make it durable before the ledger says it is.
        sync(&db, &dir)?;
        let ledger = Ledger::open(&ledger_path, store_seq)?;
        let vaults = db.open_tree("vaults")?;
        // A store that already holds vaults must find their keys: never start a fresh keyring
        // over data sealed by a lost one.
        let keyring = Keyring::open(&options.data_dir.join("keyring"), master, vaults.is_empty())?;
        let committer = Committer::start(&db, &meta, data_file(&dir)?, store_seq, metrics, ledger)?;
        let audit = db.open_tree("audit")?;
        let id_floor = meta_number(&meta, ID_FLOOR, "id floor")?;
        Ok(SledStore {
            key_used: db.open_tree("key_used")?,
            memories: db.open_tree("memories")?,
            vectors: db.open_tree("vectors")?,
            pending: db.open_tree("pending")?,
            unembeddable: db.open_tree("unembeddable")?,
            dedup: db.open_tree("dedup")?,
            audit_entries: audit.len().into(),
            audit,
            meta,
            keys,
            vault_keys,
            vaults,
            keyring,
            committer,
            gate: parking_lot::RwLock::new(()),
            id_floor,
            _lock: lock,
            path: dir,
            db,
        })
    }

    /// What every write method holds (see `gate`). The outermost hold on a thread queues
    /// behind a waiting backup (so a stream of overlapping writes cannot starve it); a hold
    /// within one (a write method under `hold_writes`) must not, or it would deadlock.
    pub(super) fn writing(&self) -> Writing<'_> {
        Writing::hold(&self.gate)
    }

    /// A new memory or audit id, above every id of the backup this store was restored from.
    pub(super) fn next_id(&self) -> anyhow::Result<u64> {
        Ok(self.id_floor + self.db.generate_id()?)
    }

    /// A store in `dir` with a random master key, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(dir: &Path) -> SledStore {
        let options = SledOptions {
            data_dir: dir.to_owned(),
            cache_bytes: 1 << 20,
            accept_lost_commits: false,
        };
        let master = MasterKey::from_hex(&MasterKey::generate_hex()).expect("a generated key");
        SledStore::open(&options, &master, Metrics::new().expect("metrics"))
            .expect("opening a test store")
    }

    /// Flushes and fsyncs now, from the calling thread.
    pub(super) fn flush_and_sync(&self) -> anyhow::Result<()> {
        sync(&self.db, &self.path)
    }
}

/// Whether another process (a daemon, or a command on its data directory) holds the data
/// directory's lock. A directory without a lock file is not in use.
pub fn data_dir_in_use(data_dir: &Path) -> anyhow::Result<bool> {
    use fs2::FileExt;
    let path = data_dir.join("lock");
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error).with_context(|| format!("opening {}", path.display())),
    };
    let in_use = file.try_lock_exclusive().is_err();
    Ok(in_use)
}

/// Takes the data directory's lock, or says that another process holds it.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<File> {
    use fs2::FileExt;
    let path = data_dir.join("lock");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if file.try_lock_exclusive().is_err() {
        bail!(
            "{} is in use by another process (a running daemon, or a command on its data \
             directory): stop it, or run the command against the daemon's admin listener",
            data_dir.display()
        );
    }
    Ok(file)
}

/// The number of the last group commit written to the store (0 for a new store).
pub(super) fn commit_seq(meta: &sled::Tree) -> anyhow::Result<u64> {
    meta_number(meta, COMMIT_SEQ, "commit number")
}

/// A big-endian number in `meta` (0 if absent).
fn meta_number(meta: &sled::Tree, key: &str, what: &str) -> anyhow::Result<u64> {
    Ok(match meta.get(key)? {
        Some(bytes) => u64::from_be_bytes(
            bytes
                .as_ref()
                .try_into()
                .with_context(|| format!("the store's {what} is corrupt"))?,
        ),
        None => 0,
    })
}

/// Fills `vault_keys` from `keys` (a schema-2 store): idempotent, so a migration cut short
/// runs again at the next start.
fn index_vault_keys(keys: &sled::Tree, vault_keys: &sled::Tree) -> anyhow::Result<()> {
    let mut indexed = 0;
    for entry in keys.iter() {
        let (key, value) = entry?;
        let record: super::KeyRecord = serde_json::from_slice(&value)
            .with_context(|| format!("key record {} is corrupt", String::from_utf8_lossy(&key)))?;
        vault_keys.insert(vault_key(record.vault, &record.id), &[])?;
        indexed += 1;
    }
    if indexed > 0 {
        tracing::info!(
            keys = indexed,
            "indexed keys by vault (store schema 2 -> 3)"
        );
    }
    Ok(())
}

fn sync(db: &sled::Db, dir: &Path) -> anyhow::Result<()> {
    db.flush().context("flushing the store")?;
    data_file(dir)?.sync_all().context("fsync of the store")?;
    Ok(())
}

/// sled 0.34 keeps its log in `<dir>/db`. fsync on any descriptor of a file syncs the file.
fn data_file(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("db");
    File::open(&path).with_context(|| format!("opening {} for fsync", path.display()))
}

/// The key of a memory's rows in every per-memory tree.
pub(super) fn memory_key(vault: VaultId, id: MemoryId) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&vault.0);
    key[16..].copy_from_slice(&id.0.to_be_bytes());
    key
}

pub(super) fn split_memory_key(key: &[u8]) -> anyhow::Result<(VaultId, MemoryId)> {
    if key.len() != 24 {
        bail!("memory key of {} bytes, expected 24", key.len());
    }
    let vault = VaultId(key[..16].try_into().expect("length checked"));
    let id = MemoryId(u64::from_be_bytes(
        key[16..].try_into().expect("length checked"),
    ));
    Ok((vault, id))
}

/// The key of a key's row in `vault_keys`.
pub(super) fn vault_key(vault: VaultId, id: &KeyId) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + KeyId::LEN);
    key.extend_from_slice(&vault.0);
    key.extend_from_slice(id.as_str().as_bytes());
    key
}

/// Reads back keys just written. sled splits a node that a write overfilled on the next read
/// through it, and a split is a write: done now, while writes work, so that reads still work
/// after a failed flush has made sled refuse every write until restart. Best effort: the write
/// itself has succeeded, and a failing store shows at the commit that follows.
pub(super) fn settle(tree: &sled::Tree, keys: impl Iterator<Item = [u8; 24]>) {
    for key in keys {
        if let Err(error) = tree.get(key) {
            tracing::warn!(%error, "reading back a write failed");
            return;
        }
    }
}

pub(super) fn transaction_result<T>(
    result: Result<T, TransactionError<String>>,
) -> anyhow::Result<T> {
    match result {
        Ok(value) => Ok(value),
        Err(TransactionError::Abort(message)) => bail!("{message}"),
        Err(TransactionError::Storage(error)) => Err(error.into()),
    }
}
