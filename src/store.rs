//! sled: the single source of truth for keys, vaults, memories and their vectors.
//!
//! Trees (all keys big-endian so prefix scans follow vault then memory order):
//! `keys` key id -> [`KeyRecord`]; `vaults` vault -> [`VaultRecord`];
//! `memories` vault ++ memory id -> [`MemoryRecord`]; `vectors` vault ++ memory id -> 384 f32;
//! `pending` vault ++ memory id -> () for memories stored but not yet embedded (the replay set);
//! `dedup` vault ++ digest of a message -> memory id, so a retried exchange is stored once;
//! `unembeddable` vault ++ memory id -> () for memories the model failed on (kept, not indexed).
//! Durability is the [`Committer`]'s job: sled's own flush is not an fsync (FACTS.md).

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::metrics::Metrics;

/// Dimension of the model's sentence vectors.
pub const DIM: usize = 384;
const SCHEMA_VERSION: &[u8] = b"1";

/// A vault: one user's private memory space. 128 random bits, shown as `vlt_` + hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VaultId(pub [u8; 16]);

impl VaultId {
    pub fn generate() -> VaultId {
        VaultId(rand::random())
    }
}

impl fmt::Display for VaultId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vlt_{}", hex::encode(self.0))
    }
}

impl fmt::Debug for VaultId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for VaultId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<VaultId> {
        let hex_part = s
            .strip_prefix("vlt_")
            .context("a vault id starts with vlt_")?;
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(hex_part, &mut bytes).context("a vault id has 32 hex digits")?;
        Ok(VaultId(bytes))
    }
}

/// A memory's id, unique across the store; shown as `mem_` + 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct MemoryId(pub u64);

impl fmt::Display for MemoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mem_{:016x}", self.0)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    /// SHA-256 of the key's id and secret; the key itself is never stored.
    pub hash: String,
    pub vault: String,
    pub created_at_ms: i64,
    #[serde(default)]
    pub revoked_at_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaultRecord {
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MemoryRecord {
    pub content: String,
    pub role: String,
    #[serde(default)]
    pub session_id: Option<String>,
    pub created_at_ms: i64,
    #[serde(default)]
    pub model: Option<String>,
}

/// A memory to store, with the fields that make it a duplicate of an earlier one.
pub struct NewMemory {
    pub record: MemoryRecord,
    /// Whether the caller gave the timestamp (back-filled history): then it is part of identity.
    pub explicit_timestamp: bool,
}

/// A memory awaiting its vector.
pub struct PendingMemory {
    pub vault: VaultId,
    pub id: MemoryId,
    pub content: String,
}

pub struct Store {
    db: sled::Db,
    path: PathBuf,
    keys: sled::Tree,
    vaults: sled::Tree,
    memories: sled::Tree,
    vectors: sled::Tree,
    pending: sled::Tree,
    unembeddable: sled::Tree,
    dedup: sled::Tree,
}

fn memory_key(vault: VaultId, id: MemoryId) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&vault.0);
    key[16..].copy_from_slice(&id.0.to_be_bytes());
    key
}

fn split_memory_key(key: &[u8]) -> anyhow::Result<(VaultId, MemoryId)> {
    if key.len() != 24 {
        bail!("memory key of {} bytes, expected 24", key.len());
    }
    let vault = VaultId(key[..16].try_into().expect("length checked"));
    let id = MemoryId(u64::from_be_bytes(
        key[16..].try_into().expect("length checked"),
    ));
    Ok((vault, id))
}

fn dedup_key(vault: VaultId, memory: &NewMemory) -> [u8; 32] {
    let record = &memory.record;
    let mut hasher = Sha256::new();
    for part in [
        record.session_id.as_deref().unwrap_or(""),
        record.role.as_str(),
        record.content.as_str(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    if memory.explicit_timestamp {
        hasher.update(record.created_at_ms.to_be_bytes());
    }
    let digest = hasher.finalize();
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&vault.0);
    key[16..].copy_from_slice(&digest[..16]);
    key
}

/// Encodes a unit vector, checking its shape on the way in (paired with [`decode_vector`]).
pub fn encode_vector(vector: &[f32]) -> anyhow::Result<Vec<u8>> {
    check_vector(vector)?;
    Ok(vector.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Decodes a stored vector, checking its shape on the way out.
pub fn decode_vector(bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
    if bytes.len() != DIM * 4 {
        bail!(
            "stored vector has {} bytes, expected {}",
            bytes.len(),
            DIM * 4
        );
    }
    let vector: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("chunks of 4")))
        .collect();
    check_vector(&vector)?;
    Ok(vector)
}

/// Checks a vector is a unit vector of the model's dimension.
pub fn check_vector(vector: &[f32]) -> anyhow::Result<()> {
    if vector.len() != DIM {
        bail!("vector of dimension {}, expected {DIM}", vector.len());
    }
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !(0.99..=1.01).contains(&norm) {
        bail!("vector norm {norm}, expected 1");
    }
    Ok(())
}

impl Store {
    pub fn open(dir: &Path, cache_bytes: u64) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
            .with_context(|| format!("opening the store in {}", dir.display()))?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema")? {
            None => {
                meta.insert("schema", SCHEMA_VERSION)?;
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION => {}
            Some(v) => bail!(
                "the store in {} has schema {:?}; this build reads schema {:?}",
                dir.display(),
                String::from_utf8_lossy(&v),
                String::from_utf8_lossy(SCHEMA_VERSION)
            ),
        }
        Ok(Store {
            keys: db.open_tree("keys")?,
            vaults: db.open_tree("vaults")?,
            memories: db.open_tree("memories")?,
            vectors: db.open_tree("vectors")?,
            pending: db.open_tree("pending")?,
            unembeddable: db.open_tree("unembeddable")?,
            dedup: db.open_tree("dedup")?,
            path: dir.to_owned(),
            db,
        })
    }

    /// Starts the group-commit thread for this store.
    pub fn committer(&self, metrics: Metrics) -> anyhow::Result<Committer> {
        Committer::start(self.db.clone(), &self.path, metrics)
    }

    /// Flushes and fsyncs now, from the calling thread (start-up and shutdown).
    pub fn sync(&self) -> anyhow::Result<()> {
        self.db.flush().context("flushing the store")?;
        data_file(&self.path)?
            .sync_all()
            .context("fsync of the store")?;
        Ok(())
    }

    /// Stores a new key record; `false` if a record with that id already exists (left as is).
    pub fn insert_key(&self, record: &KeyRecord) -> anyhow::Result<bool> {
        let inserted = self.keys.compare_and_swap(
            record.id.as_bytes(),
            None::<&[u8]>,
            Some(serde_json::to_vec(record)?),
        )?;
        Ok(inserted.is_ok())
    }

    pub fn key(&self, id: &str) -> anyhow::Result<Option<KeyRecord>> {
        match self.keys.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => Ok(Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("key record {id} is corrupt"))?,
            )),
        }
    }

    pub fn create_vault(&self, vault: VaultId, record: &VaultRecord) -> anyhow::Result<()> {
        let previous = self.vaults.compare_and_swap(
            vault.0,
            None::<&[u8]>,
            Some(serde_json::to_vec(record)?),
        )?;
        if previous.is_err() {
            bail!("vault {vault} already exists");
        }
        Ok(())
    }

    pub fn vault_count(&self) -> usize {
        self.vaults.len()
    }

    pub fn memory_count(&self) -> usize {
        self.memories.len()
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Stores a batch of messages atomically. Returns each message's id and whether it is new
    /// (an identical message stored before keeps its first id). Not yet durable: see [`Committer`].
    pub fn insert_memories(
        &self,
        vault: VaultId,
        memories: &[NewMemory],
    ) -> anyhow::Result<Vec<(MemoryId, bool)>> {
        let mut prepared = Vec::with_capacity(memories.len());
        for memory in memories {
            let id = MemoryId(self.db.generate_id()?);
            prepared.push((
                id,
                dedup_key(vault, memory),
                serde_json::to_vec(&memory.record)?,
            ));
        }
        let result = (&self.memories, &self.pending, &self.dedup).transaction(
            |(memories, pending, dedup)| {
                let mut outcome = Vec::with_capacity(prepared.len());
                for (id, digest, record) in &prepared {
                    if let Some(existing) = dedup.get(digest)? {
                        let existing =
                            u64::from_be_bytes(existing.as_ref().try_into().map_err(|_| {
                                ConflictableTransactionError::Abort(
                                    "corrupt dedup entry".to_string(),
                                )
                            })?);
                        outcome.push((MemoryId(existing), false));
                        continue;
                    }
                    let key = memory_key(vault, *id);
                    memories.insert(&key, record.as_slice())?;
                    pending.insert(&key, &[])?;
                    dedup.insert(digest, &id.0.to_be_bytes())?;
                    outcome.push((*id, true));
                }
                Ok(outcome)
            },
        );
        match result {
            Ok(outcome) => Ok(outcome),
            Err(TransactionError::Abort(message)) => bail!("{message}"),
            Err(TransactionError::Storage(error)) => Err(error.into()),
        }
    }

    pub fn memory(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<Option<MemoryRecord>> {
        match self.memories.get(memory_key(vault, id))? {
            None => Ok(None),
            Some(bytes) => Ok(Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("memory {id} is corrupt"))?,
            )),
        }
    }

    /// Up to `limit` memories that are stored but have no vector yet, in store order.
    pub fn pending_batch(&self, limit: usize) -> anyhow::Result<Vec<PendingMemory>> {
        let mut batch = Vec::new();
        for entry in self.pending.iter().take(limit) {
            let (key, _) = entry?;
            let (vault, id) = split_memory_key(&key)?;
            match self.memory(vault, id)? {
                Some(record) => batch.push(PendingMemory {
                    vault,
                    id,
                    content: record.content,
                }),
                // The memory is gone (a later delete); so is the need to embed it.
                None => {
                    self.pending.remove(&key)?;
                }
            }
        }
        Ok(batch)
    }

    /// Takes a memory that cannot be embedded out of the pending set, into `unembeddable`, so
    /// that it does not block the memories behind it. The memory itself stays stored.
    pub fn set_unembeddable(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<()> {
        let key = memory_key(vault, id);
        self.unembeddable.insert(key, &[])?;
        self.pending.remove(key)?;
        Ok(())
    }

    /// Stores vectors, then clears their pending marks. In that order, a crash in between only
    /// means the memory is embedded again at start-up.
    pub fn insert_vectors(&self, items: &[(VaultId, MemoryId, Vec<f32>)]) -> anyhow::Result<()> {
        let mut vectors = sled::Batch::default();
        let mut pending = sled::Batch::default();
        for (vault, id, vector) in items {
            let key = memory_key(*vault, *id);
            vectors.insert(&key, encode_vector(vector)?);
            pending.remove(&key);
        }
        self.vectors.apply_batch(vectors)?;
        self.pending.apply_batch(pending)?;
        Ok(())
    }

    /// Every vector of one vault, in memory-id order. Only this vault's key range is read.
    pub fn vault_vectors(&self, vault: VaultId) -> anyhow::Result<Vec<(MemoryId, Vec<f32>)>> {
        let mut out = Vec::new();
        for entry in self.vectors.scan_prefix(vault.0) {
            let (key, value) = entry?;
            let (_, id) = split_memory_key(&key)?;
            let vector = decode_vector(&value).with_context(|| format!("vector of {id}"))?;
            out.push((id, vector));
        }
        Ok(out)
    }
}

fn data_file(dir: &Path) -> anyhow::Result<File> {
    // sled 0.34 keeps its log in `<dir>/db`. fsync on any descriptor of a file syncs the file.
    let path = dir.join("db");
    File::open(&path).with_context(|| format!("opening {} for fsync", path.display()))
}

type CommitReply = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Group commit: every caller waiting when a flush starts shares that flush and its fsync.
///
/// A caller's writes are durable once `commit` returns Ok: the flush that served it began after
/// the caller's writes were in sled's buffers.
///
/// A failed flush or fsync poisons the committer: every later commit fails too. After a failed
/// fsync Linux may drop the dirty pages and report the next fsync as clean, so nothing written
/// after it could honestly be acknowledged; a restart recovers from what is really on disk.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<CommitReply>,
    poisoned: Arc<AtomicBool>,
}

impl Committer {
    fn start(db: sled::Db, dir: &Path, metrics: Metrics) -> anyhow::Result<Committer> {
        let file = data_file(dir)?;
        let (tx, rx) = mpsc::channel::<CommitReply>();
        let poisoned = Arc::new(AtomicBool::new(false));
        let thread_poisoned = poisoned.clone();
        std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let started = Instant::now();
                    let result = if thread_poisoned.load(Ordering::Acquire) {
                        Err("an earlier flush or fsync failed; restart the daemon".to_owned())
                    } else {
                        db.flush()
                            .map(|_| ())
                            .map_err(|e| format!("flush: {e}"))
                            .and_then(|()| file.sync_data().map_err(|e| format!("fsync: {e}")))
                    };
                    if let Err(message) = &result {
                        if !thread_poisoned.swap(true, Ordering::AcqRel) {
                            tracing::error!(error = %message, "the store could not be made durable; refusing writes until restart");
                        }
                    }
                    metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    metrics.commit_batch_size.observe(waiters.len() as f64);
                    for waiter in waiters {
                        let _ = waiter.send(result.clone());
                    }
                }
            })
            .context("starting the group-commit thread")?;
        Ok(Committer { tx, poisoned })
    }

    /// Whether writes can still be made durable.
    pub fn is_healthy(&self) -> bool {
        !self.poisoned.load(Ordering::Acquire)
    }

    /// Waits until everything written before this call is on disk.
    pub async fn commit(&self) -> anyhow::Result<()> {
        let (reply, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send(reply)
            .map_err(|_| anyhow::anyhow!("the group-commit thread has stopped"))?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => bail!("commit failed: {message}"),
            Err(_) => bail!("the group-commit thread has stopped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_vector(seed: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..DIM)
            .map(|i| ((i * 31 + seed * 7) % 17) as f32 + 1.0)
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    fn message(content: &str) -> NewMemory {
        NewMemory {
            record: MemoryRecord {
                content: content.into(),
                role: "user".into(),
                session_id: None,
                created_at_ms: 1,
                model: None,
            },
            explicit_timestamp: false,
        }
    }

    #[test]
    fn vectors_round_trip_and_bad_ones_are_refused() {
        let v = unit_vector(3);
        assert_eq!(decode_vector(&encode_vector(&v).unwrap()).unwrap(), v);
        assert!(encode_vector(&[1.0; 3]).is_err());
        assert!(encode_vector(&vec![0.0; DIM]).is_err());
        assert!(decode_vector(&[0u8; 10]).is_err());
    }

    #[test]
    fn identical_messages_are_stored_once_per_vault() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (VaultId::generate(), VaultId::generate());
        let first = store
            .insert_memories(a, &[message("hello"), message("world")])
            .unwrap();
        assert!(first.iter().all(|(_, new)| *new));
        let again = store.insert_memories(a, &[message("hello")]).unwrap();
        assert_eq!(again, vec![(first[0].0, false)]);
        let other = store.insert_memories(b, &[message("hello")]).unwrap();
        assert!(
            other[0].1,
            "another vault's identical message is its own memory"
        );
        assert_eq!(store.pending_count(), 3);
    }

    #[test]
    fn vectors_clear_pending_and_stay_in_their_vault() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (VaultId::generate(), VaultId::generate());
        let ids = store.insert_memories(a, &[message("x")]).unwrap();
        store.insert_memories(b, &[message("y")]).unwrap();
        let pending = store.pending_batch(10).unwrap();
        assert_eq!(pending.len(), 2);
        store
            .insert_vectors(&[(a, ids[0].0, unit_vector(1))])
            .unwrap();
        assert_eq!(store.pending_count(), 1);
        assert_eq!(store.vault_vectors(a).unwrap().len(), 1);
        assert!(store.vault_vectors(b).unwrap().is_empty());
    }

    #[test]
    fn a_key_id_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let record = |name: &str| KeyRecord {
            id: "00112233aabbccdd".into(),
            name: name.into(),
            hash: "h".into(),
            vault: VaultId::generate().to_string(),
            created_at_ms: 1,
            revoked_at_ms: None,
        };
        assert!(store.insert_key(&record("first")).unwrap());
        assert!(!store.insert_key(&record("second")).unwrap());
        assert_eq!(
            store.key("00112233aabbccdd").unwrap().unwrap().name,
            "first"
        );
    }

    #[test]
    fn vault_ids_round_trip_through_text() {
        let vault = VaultId::generate();
        assert_eq!(vault.to_string().parse::<VaultId>().unwrap(), vault);
        assert!("vlt_zz".parse::<VaultId>().is_err());
    }
}
