//! sled: the single source of truth for keys, vaults, memories and their vectors.
//!
//! Trees (all keys big-endian so prefix scans follow vault then memory order):
//! `keys` key id -> [`KeyRecord`]; `key_used` key id -> last use (ms, coarse, not durable);
//! `vaults` vault -> [`VaultRecord`]; `memories` vault ++ memory id -> sealed [`MemoryRecord`];
//! `vectors` vault ++ memory id -> sealed 384 f32 + [`EntryMeta`]; `pending` vault ++ memory id
//! -> () for memories stored but not yet embedded (the replay set); `unembeddable` the same for
//! memories the model failed on (kept, not indexed); `dedup` vault ++ keyed digest of a message
//! -> memory id, so a retried exchange is stored once; `audit` sequence -> [`AuditEntry`].
//! Memory text and vectors are sealed with the vault's data key ([`crate::crypto`]); digests
//! are keyed by it too, so nothing derived from a memory's text is readable once it is gone.
//! Durability is the [`Committer`]'s job: sled's own flush is not an fsync (FACTS.md).

use std::fmt;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::auth::Scope;
use crate::crypto::{Purpose, VaultCipher};
use crate::ledger::Ledger;
use crate::metrics::Metrics;

/// Dimension of the model's sentence vectors.
pub const DIM: usize = 384;
const SCHEMA_VERSION: &[u8] = b"2";
const COMMIT_SEQ: &str = "commit_seq";
/// Rows removed per sled batch when a vault or session is erased.
const ERASE_BATCH: usize = 1024;

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

impl FromStr for MemoryId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<MemoryId> {
        let hex_part = s
            .strip_prefix("mem_")
            .context("a memory id starts with mem_")?;
        if hex_part.len() != 16 {
            bail!("a memory id has 16 hex digits");
        }
        let id = u64::from_str_radix(hex_part, 16).context("a memory id has 16 hex digits")?;
        Ok(MemoryId(id))
    }
}

/// A memory key as stored: never the key itself, only a hash of its secret.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    /// SHA-256 of the key's id and secret; the key itself is never stored.
    pub hash: String,
    pub vault: String,
    pub scopes: Vec<Scope>,
    pub created_at_ms: i64,
    /// The lifetime asked for at minting; a rotation gives the new key the same.
    #[serde(default)]
    pub expires_days: Option<u32>,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    #[serde(default)]
    pub revoked_at_ms: Option<i64>,
    /// Set when the key was rotated: it keeps working until `auto_revoke_at_ms`.
    #[serde(default)]
    pub deprecated_at_ms: Option<i64>,
    #[serde(default)]
    pub auto_revoke_at_ms: Option<i64>,
    /// The key that replaced this one, and the key this one replaced.
    #[serde(default)]
    pub rotated_to: Option<String>,
    #[serde(default)]
    pub rotated_from: Option<String>,
}

/// Whether a key may be used at a given moment, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
    /// Rotated, and the grace period is over.
    Rotated,
    Expired,
}

impl KeyRecord {
    pub fn status(&self, now_ms: i64) -> KeyStatus {
        if self.revoked_at_ms.is_some_and(|at| at <= now_ms) {
            KeyStatus::Revoked
        } else if self.auto_revoke_at_ms.is_some_and(|at| at <= now_ms) {
            KeyStatus::Rotated
        } else if self.expires_at_ms.is_some_and(|at| at <= now_ms) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }

    pub fn vault_id(&self) -> anyhow::Result<VaultId> {
        self.vault
            .parse()
            .with_context(|| format!("key {} names a malformed vault", self.id))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaultRecord {
    pub created_at_ms: i64,
    /// Set while an erasure is under way; an erasure cut short by a crash is finished at start.
    #[serde(default)]
    pub erasing: bool,
    /// With `erasing`: the vault itself goes too (its keys revoked), not only its contents.
    #[serde(default)]
    pub removing: bool,
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
    #[serde(default)]
    pub tags: Vec<String>,
    /// The dedup digest (hex), so that deleting the memory can free it.
    #[serde(default)]
    pub digest: String,
}

impl MemoryRecord {
    /// What the index keeps of this memory: the filter fields, and its lexical terms.
    pub fn meta(&self) -> EntryMeta {
        EntryMeta {
            created_at_ms: self.created_at_ms,
            session_id: self.session_id.clone(),
            tags: self.tags.clone(),
            terms: crate::lexical::terms(&self.content),
        }
    }
}

/// What the index keeps beside each vector, so that filters need no record reads.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EntryMeta {
    #[serde(rename = "t")]
    pub created_at_ms: i64,
    #[serde(rename = "s", default)]
    pub session_id: Option<String>,
    #[serde(rename = "g", default)]
    pub tags: Vec<String>,
    /// The memory's own lexical terms and counts ([`crate::lexical::terms`]).
    #[serde(rename = "w", default)]
    pub terms: Vec<(String, u32)>,
}

/// What an erasure removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub memories: usize,
    /// Of them, how many were still waiting for their vector.
    pub pending: usize,
}

/// A page of memories, and the id to continue after when there are more.
pub type MemoryPage = (Vec<(MemoryId, MemoryRecord)>, Option<MemoryId>);

/// A memory to store, with the fields that make it a duplicate of an earlier one.
pub struct NewMemory {
    pub record: MemoryRecord,
    /// Whether the caller gave the timestamp (back-filled history): then it is part of identity.
    pub explicit_timestamp: bool,
}

/// One line of the audit log: who did what to which key or vault, and how it ended. Never a
/// secret, never memory text.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// `admin`, or the id of the memory key that acted.
    pub actor: String,
    pub action: String,
    #[serde(default)]
    pub key_id: Option<String>,
    #[serde(default)]
    pub vault: Option<String>,
    /// `ok`, or the error code the operation ended with.
    pub outcome: String,
    /// Counts and other non-secret details.
    #[serde(default)]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

pub struct Store {
    db: sled::Db,
    path: PathBuf,
    /// `schema`, and `commit_seq`: the last group commit's number (see [`crate::ledger`]).
    meta: sled::Tree,
    keys: sled::Tree,
    key_used: sled::Tree,
    vaults: sled::Tree,
    memories: sled::Tree,
    vectors: sled::Tree,
    pending: sled::Tree,
    unembeddable: sled::Tree,
    dedup: sled::Tree,
    audit: sled::Tree,
    /// Entries in `audit`, counted once at open.
    audit_entries: std::sync::atomic::AtomicUsize,
}

fn memory_key(vault: VaultId, id: MemoryId) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&vault.0);
    key[16..].copy_from_slice(&id.0.to_be_bytes());
    key
}

/// Reads back keys just written. sled splits a node that a write overfilled on the next read
/// through it, and a split is a write: done now, while writes work, so that reads still work
/// after a failed flush has made sled refuse every write until restart. Best effort: the write
/// itself has succeeded, and a failing store shows at the commit that follows.
fn settle(tree: &sled::Tree, keys: impl Iterator<Item = [u8; 24]>) {
    for key in keys {
        if let Err(error) = tree.get(key) {
            tracing::warn!(%error, "reading back a write failed");
            return;
        }
    }
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

/// The dedup digest of a message: keyed by the vault's data key, so it means nothing without it.
fn digest(cipher: &VaultCipher, memory: &NewMemory) -> [u8; 16] {
    let record = &memory.record;
    let timestamp = memory
        .explicit_timestamp
        .then(|| record.created_at_ms.to_be_bytes());
    let full = cipher.digest(&[
        record.session_id.as_deref().unwrap_or("").as_bytes(),
        record.role.as_bytes(),
        record.content.as_bytes(),
        timestamp.as_ref().map_or(&[][..], |t| &t[..]),
    ]);
    full[..16].try_into().expect("32 >= 16")
}

fn dedup_key(vault: VaultId, digest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + digest.len());
    key.extend_from_slice(&vault.0);
    key.extend_from_slice(digest);
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

fn transaction_result<T>(result: Result<T, TransactionError<String>>) -> anyhow::Result<T> {
    match result {
        Ok(value) => Ok(value),
        Err(TransactionError::Abort(message)) => bail!("{message}"),
        Err(TransactionError::Storage(error)) => Err(error.into()),
    }
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
                "the store in {} has schema {:?}; this build reads schema {:?} (schema 1 was a \
                 pre-release without encryption at rest: there is no migration, start from an \
                 empty data directory and import an export)",
                dir.display(),
                String::from_utf8_lossy(&v),
                String::from_utf8_lossy(SCHEMA_VERSION)
            ),
        }
        Ok(Store {
            keys: db.open_tree("keys")?,
            key_used: db.open_tree("key_used")?,
            vaults: db.open_tree("vaults")?,
            memories: db.open_tree("memories")?,
            vectors: db.open_tree("vectors")?,
            pending: db.open_tree("pending")?,
            unembeddable: db.open_tree("unembeddable")?,
            dedup: db.open_tree("dedup")?,
            audit_entries: db.open_tree("audit")?.len().into(),
            audit: db.open_tree("audit")?,
            meta,
            path: dir.to_owned(),
            db,
        })
    }

    /// The number of the last group commit written to the store (0 for a new store).
    pub fn commit_seq(&self) -> anyhow::Result<u64> {
        Ok(match self.meta.get(COMMIT_SEQ)? {
            Some(bytes) => u64::from_be_bytes(
                bytes
                    .as_ref()
                    .try_into()
                    .context("the store's commit number is corrupt")?,
            ),
            None => 0,
        })
    }

    /// Starts the group-commit thread for this store; it keeps `ledger` in step.
    pub fn committer(&self, metrics: Metrics, ledger: Ledger) -> anyhow::Result<Committer> {
        Committer::start(self, metrics, ledger)
    }

    /// Flushes and fsyncs now, from the calling thread (start-up and shutdown).
    pub fn sync(&self) -> anyhow::Result<()> {
        self.db.flush().context("flushing the store")?;
        data_file(&self.path)?
            .sync_all()
            .context("fsync of the store")?;
        Ok(())
    }

    // ---- keys

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

    /// Changes a key record atomically (a compare-and-swap loop), so two concurrent changes
    /// never undo each other. Returns the record as changed, or `None` if there is no such key.
    pub fn update_key(
        &self,
        id: &str,
        mut change: impl FnMut(&mut KeyRecord),
    ) -> anyhow::Result<Option<KeyRecord>> {
        loop {
            let Some(current) = self.keys.get(id.as_bytes())? else {
                return Ok(None);
            };
            let mut record: KeyRecord = serde_json::from_slice(&current)
                .with_context(|| format!("key record {id} is corrupt"))?;
            change(&mut record);
            let swapped = self.keys.compare_and_swap(
                id.as_bytes(),
                Some(current),
                Some(serde_json::to_vec(&record)?),
            )?;
            if swapped.is_ok() {
                return Ok(Some(record));
            }
        }
    }

    /// Every key record, in id order, starting after `after`, at most `limit`.
    pub fn keys_page(
        &self,
        after: Option<&str>,
        limit: usize,
        mut keep: impl FnMut(&KeyRecord) -> bool,
    ) -> anyhow::Result<(Vec<KeyRecord>, Option<String>)> {
        let range = match after {
            Some(after) => self.keys.range::<&[u8], _>((
                std::ops::Bound::Excluded(after.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.keys.iter(),
        };
        let mut page = Vec::new();
        for entry in range {
            let (key, value) = entry?;
            let record: KeyRecord = serde_json::from_slice(&value).with_context(|| {
                format!("key record {} is corrupt", String::from_utf8_lossy(&key))
            })?;
            if !keep(&record) {
                continue;
            }
            if page.len() == limit {
                let next = page.last().map(|r: &KeyRecord| r.id.clone());
                return Ok((page, next));
            }
            page.push(record);
        }
        Ok((page, None))
    }

    /// Records a key's use (coarse: callers write at most about once a minute per key).
    pub fn touch_key(&self, id: &str, at_ms: i64) -> anyhow::Result<()> {
        self.key_used.insert(id.as_bytes(), &at_ms.to_be_bytes())?;
        Ok(())
    }

    pub fn key_last_used(&self, id: &str) -> anyhow::Result<Option<i64>> {
        Ok(self
            .key_used
            .get(id.as_bytes())?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
    }

    // ---- vaults

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

    pub fn vault(&self, vault: VaultId) -> anyhow::Result<Option<VaultRecord>> {
        match self.vaults.get(vault.0)? {
            None => Ok(None),
            Some(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("vault record {vault} is corrupt")
                })?))
            }
        }
    }

    pub fn set_vault(&self, vault: VaultId, record: &VaultRecord) -> anyhow::Result<()> {
        self.vaults.insert(vault.0, serde_json::to_vec(record)?)?;
        Ok(())
    }

    pub fn remove_vault(&self, vault: VaultId) -> anyhow::Result<()> {
        self.vaults.remove(vault.0)?;
        Ok(())
    }

    /// Every vault and its record.
    pub fn vaults(&self) -> anyhow::Result<Vec<(VaultId, VaultRecord)>> {
        let mut out = Vec::new();
        for entry in self.vaults.iter() {
            let (key, value) = entry?;
            let vault = VaultId(
                key.as_ref()
                    .try_into()
                    .context("a vault key is not 16 bytes")?,
            );
            let record = serde_json::from_slice(&value)
                .with_context(|| format!("vault record {vault} is corrupt"))?;
            out.push((vault, record));
        }
        Ok(out)
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

    /// How many of one vault's memories wait for their vector.
    pub fn vault_pending_count(&self, vault: VaultId) -> usize {
        self.pending.scan_prefix(vault.0).keys().count()
    }

    /// How many memories one vault holds (a key-range count, nothing decrypted).
    pub fn vault_memory_count(&self, vault: VaultId) -> usize {
        self.memories.scan_prefix(vault.0).keys().count()
    }

    /// Deletes every row of a vault's memories, vectors, marks and digests, in batches.
    /// Not yet durable: see [`Committer`].
    pub fn erase_vault_rows(&self, vault: VaultId) -> anyhow::Result<Removed> {
        let mut removed = Removed::default();
        for (tree, counter) in [
            (&self.memories, Some(&mut removed.memories)),
            (&self.vectors, None),
            (&self.pending, Some(&mut removed.pending)),
            (&self.unembeddable, None),
            (&self.dedup, None),
        ] {
            let mut counter = counter;
            loop {
                let keys: Vec<sled::IVec> = tree
                    .scan_prefix(vault.0)
                    .keys()
                    .take(ERASE_BATCH)
                    .collect::<Result<_, _>>()?;
                if keys.is_empty() {
                    break;
                }
                if let Some(count) = counter.as_deref_mut() {
                    *count += keys.len();
                }
                let mut batch = sled::Batch::default();
                for key in keys {
                    batch.remove(key);
                }
                tree.apply_batch(batch)?;
            }
        }
        Ok(removed)
    }

    /// How many of a vault's new memories are not already stored (by their dedup digest).
    pub fn count_new(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        memories: &[NewMemory],
    ) -> anyhow::Result<usize> {
        let mut seen = std::collections::HashSet::new();
        let mut fresh = 0;
        for memory in memories {
            let key = dedup_key(vault, &digest(cipher, memory));
            if seen.insert(key.clone()) && !self.dedup.contains_key(&key)? {
                fresh += 1;
            }
        }
        Ok(fresh)
    }

    // ---- memories

    /// Stores a batch of messages atomically. Returns each message's id and whether it is new
    /// (an identical message stored before keeps its first id). Not yet durable: see [`Committer`].
    pub fn insert_memories(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        memories: &[NewMemory],
    ) -> anyhow::Result<Vec<(MemoryId, bool)>> {
        let mut prepared = Vec::with_capacity(memories.len());
        for memory in memories {
            let id = MemoryId(self.db.generate_id()?);
            let digest = digest(cipher, memory);
            let mut record = memory.record.clone();
            record.digest = hex::encode(digest);
            let key = memory_key(vault, id);
            let sealed = cipher.seal(Purpose::Memory, &key, &serde_json::to_vec(&record)?);
            prepared.push((id, dedup_key(vault, &digest), sealed));
        }
        let result = (&self.memories, &self.pending, &self.dedup).transaction(
            |(memories, pending, dedup)| {
                let mut outcome = Vec::with_capacity(prepared.len());
                for (id, digest, sealed) in &prepared {
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
                    memories.insert(&key, sealed.as_slice())?;
                    pending.insert(&key, &[])?;
                    dedup.insert(digest.as_slice(), &id.0.to_be_bytes())?;
                    outcome.push((*id, true));
                }
                Ok(outcome)
            },
        );
        let outcome = transaction_result(result)?;
        settle(
            &self.memories,
            outcome
                .iter()
                .filter(|(_, new)| *new)
                .map(|(id, _)| memory_key(vault, *id)),
        );
        Ok(outcome)
    }

    pub fn memory(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        id: MemoryId,
    ) -> anyhow::Result<Option<MemoryRecord>> {
        let key = memory_key(vault, id);
        match self.memories.get(key)? {
            None => Ok(None),
            Some(sealed) => Ok(Some(open_record(cipher, &key, &sealed)?)),
        }
    }

    pub fn contains_memory(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        Ok(self.memories.contains_key(memory_key(vault, id))?)
    }

    /// A vault's memories in id (that is, storage) order, after `after`, that `keep` accepts:
    /// at most `limit`, and the cursor to continue from when there are more.
    pub fn memories_page(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        after: Option<MemoryId>,
        limit: usize,
        mut keep: impl FnMut(&MemoryRecord) -> bool,
    ) -> anyhow::Result<MemoryPage> {
        let start = match after {
            Some(id) => memory_key(vault, MemoryId(id.0.saturating_add(1))),
            None => memory_key(vault, MemoryId(0)),
        };
        let end = memory_key(vault, MemoryId(u64::MAX));
        let mut page = Vec::new();
        if after.is_some_and(|id| id.0 == u64::MAX) {
            return Ok((page, None));
        }
        for entry in self.memories.range(start..=end) {
            let (key, sealed) = entry?;
            let (_, id) = split_memory_key(&key)?;
            let record = open_record(cipher, &key, &sealed)?;
            if !keep(&record) {
                continue;
            }
            if page.len() == limit {
                let next = page.last().map(|(id, _): &(MemoryId, MemoryRecord)| *id);
                return Ok((page, next));
            }
            page.push((id, record));
        }
        Ok((page, None))
    }

    /// Deletes memories of one vault, with their vectors, marks and digests, atomically per
    /// chunk. Returns the ids that existed, and how many were still pending. Not yet durable:
    /// see [`Committer`].
    pub fn delete_memories(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        ids: &[MemoryId],
    ) -> anyhow::Result<(Vec<MemoryId>, usize)> {
        let mut found = Vec::new();
        for id in ids {
            if let Some(record) = self.memory(vault, cipher, *id)? {
                let digest = hex::decode(&record.digest).unwrap_or_default();
                found.push((*id, dedup_key(vault, &digest)));
            }
        }
        let mut pending_removed = 0;
        for chunk in found.chunks(ERASE_BATCH) {
            let result = (
                &self.memories,
                &self.vectors,
                &self.pending,
                &self.unembeddable,
                &self.dedup,
            )
                .transaction(|(memories, vectors, pending, unembeddable, dedup)| {
                    let mut was_pending = 0;
                    for (id, digest) in chunk {
                        let key = memory_key(vault, *id);
                        memories.remove(&key)?;
                        vectors.remove(&key)?;
                        if pending.remove(&key)?.is_some() {
                            was_pending += 1;
                        }
                        unembeddable.remove(&key)?;
                        // Only if it still points at this memory.
                        if dedup
                            .get(digest.as_slice())?
                            .is_some_and(|v| v.as_ref() == id.0.to_be_bytes())
                        {
                            dedup.remove(digest.as_slice())?;
                        }
                    }
                    Ok(was_pending)
                });
            pending_removed += transaction_result(result)?;
        }
        Ok((
            found.into_iter().map(|(id, _)| id).collect(),
            pending_removed,
        ))
    }

    /// Up to `limit` memories stored but not yet embedded, in store order (ids only), from the
    /// first one after `after` (from the start when `None`).
    pub fn pending_after(
        &self,
        after: Option<(VaultId, MemoryId)>,
        limit: usize,
    ) -> anyhow::Result<Vec<(VaultId, MemoryId)>> {
        let range = match after {
            Some((vault, id)) => self.pending.range((
                Bound::Excluded(memory_key(vault, id).to_vec()),
                Bound::Unbounded,
            )),
            None => self.pending.iter(),
        };
        let mut batch = Vec::new();
        for entry in range.keys().take(limit) {
            batch.push(split_memory_key(&entry?)?);
        }
        Ok(batch)
    }

    /// Drops a pending mark whose memory is gone. Whether there was one.
    pub fn clear_pending(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        Ok(self.pending.remove(memory_key(vault, id))?.is_some())
    }

    /// Takes a memory that cannot be embedded out of the pending set, into `unembeddable`, so
    /// that it does not block the memories behind it. The memory itself stays stored.
    /// Whether it was pending.
    pub fn set_unembeddable(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        let key = memory_key(vault, id);
        self.unembeddable.insert(key, &[])?;
        Ok(self.pending.remove(key)?.is_some())
    }

    /// Stores a vault's vectors (with the metadata the index filters on), then clears their
    /// pending marks. In that order, a crash in between only means the memory is embedded again.
    pub fn insert_vectors(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        items: &[(MemoryId, Vec<f32>, EntryMeta)],
    ) -> anyhow::Result<()> {
        let mut vectors = sled::Batch::default();
        let mut pending = sled::Batch::default();
        for (id, vector, meta) in items {
            let key = memory_key(vault, *id);
            let mut plain = encode_vector(vector)?;
            plain.extend_from_slice(&serde_json::to_vec(meta)?);
            vectors.insert(&key, cipher.seal(Purpose::Vector, &key, &plain));
            pending.remove(&key);
        }
        self.vectors.apply_batch(vectors)?;
        self.pending.apply_batch(pending)?;
        settle(
            &self.vectors,
            items.iter().map(|(id, ..)| memory_key(vault, *id)),
        );
        Ok(())
    }

    /// Every vector of one vault, in memory-id order. Only this vault's key range is read.
    pub fn vault_vectors(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
    ) -> anyhow::Result<Vec<(MemoryId, Vec<f32>, EntryMeta)>> {
        let mut out = Vec::new();
        for entry in self.vectors.scan_prefix(vault.0) {
            let (key, sealed) = entry?;
            let (_, id) = split_memory_key(&key)?;
            let plain = cipher
                .open(Purpose::Vector, &key, &sealed)
                .with_context(|| format!("vector of {id}"))?;
            if plain.len() < DIM * 4 {
                bail!("vector of {id} is truncated");
            }
            let vector =
                decode_vector(&plain[..DIM * 4]).with_context(|| format!("vector of {id}"))?;
            let meta = serde_json::from_slice(&plain[DIM * 4..])
                .with_context(|| format!("index metadata of {id} is corrupt"))?;
            out.push((id, vector, meta));
        }
        Ok(out)
    }

    // ---- audit

    /// Appends an audit entry, dropping the oldest beyond `max_entries`. Not yet durable: it is
    /// made so by the operation's own commit.
    pub fn append_audit(&self, entry: &AuditEntry, max_entries: usize) -> anyhow::Result<()> {
        let seq = self.db.generate_id()?;
        self.audit
            .insert(seq.to_be_bytes(), serde_json::to_vec(entry)?)?;
        let mut count = self.audit_entries.fetch_add(1, Ordering::AcqRel) + 1;
        while count > max_entries && self.audit.pop_min()?.is_some() {
            count = self.audit_entries.fetch_sub(1, Ordering::AcqRel) - 1;
        }
        Ok(())
    }

    /// Audit entries after the cursor, oldest first.
    pub fn audit_page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> anyhow::Result<(Vec<AuditEntry>, Option<u64>)> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut page = Vec::new();
        let mut last = None;
        for entry in self.audit.range(start.to_be_bytes()..) {
            let (key, value) = entry?;
            if page.len() == limit {
                return Ok((page, last));
            }
            let seq = u64::from_be_bytes(key.as_ref().try_into().context("audit key")?);
            page.push(serde_json::from_slice(&value).context("an audit entry is corrupt")?);
            last = Some(seq);
        }
        Ok((page, None))
    }
}

fn open_record(cipher: &VaultCipher, key: &[u8], sealed: &[u8]) -> anyhow::Result<MemoryRecord> {
    let (_, id) = split_memory_key(key)?;
    let plain = cipher
        .open(Purpose::Memory, key, sealed)
        .with_context(|| format!("memory {id}"))?;
    serde_json::from_slice(&plain).with_context(|| format!("memory {id} is corrupt"))
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
    ledger: Arc<Ledger>,
    metrics: Metrics,
}

/// Marks the store as refusing writes until restart; logs the first cause.
fn poison(poisoned: &AtomicBool, metrics: &Metrics, cause: &str) {
    if !poisoned.swap(true, Ordering::AcqRel) {
        metrics.storage_healthy.set(0);
        tracing::error!(error = %cause, "the store could not be made durable; refusing writes until restart");
    }
}

impl Committer {
    fn start(store: &Store, metrics: Metrics, ledger: Ledger) -> anyhow::Result<Committer> {
        let file = data_file(&store.path)?;
        let (db, meta) = (store.db.clone(), store.meta.clone());
        let mut seq = store.commit_seq()?;
        let ledger = Arc::new(ledger);
        let thread_ledger = ledger.clone();
        let (tx, rx) = mpsc::channel::<CommitReply>();
        let poisoned = Arc::new(AtomicBool::new(false));
        let thread_poisoned = poisoned.clone();
        let thread_metrics = metrics.clone();
        metrics.storage_healthy.set(1);
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
        })
    }

    /// Takes a write that failed with an I/O error as the store failing: sled then refuses
    /// every write until restart, so the daemon says so, as after a failed flush.
    pub fn note_write_error(&self, error: &anyhow::Error) {
        if let Some(sled::Error::Io(_)) = error.downcast_ref::<sled::Error>() {
            poison(&self.poisoned, &self.metrics, &format!("{error:#}"));
        }
    }

    /// fsyncs the commit ledger (at shutdown; commits only `pwrite` it).
    pub fn sync_ledger(&self) -> anyhow::Result<()> {
        self.ledger.sync()
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
                tags: Vec::new(),
                digest: String::new(),
            },
            explicit_timestamp: false,
        }
    }

    fn cipher(seed: u8) -> VaultCipher {
        VaultCipher::new(&[seed; 32])
    }

    fn open_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        (dir, store)
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
        let (_dir, store) = open_store();
        let (a, b) = (VaultId::generate(), VaultId::generate());
        let (ca, cb) = (cipher(1), cipher(2));
        let first = store
            .insert_memories(a, &ca, &[message("hello"), message("world")])
            .unwrap();
        assert!(first.iter().all(|(_, new)| *new));
        let again = store.insert_memories(a, &ca, &[message("hello")]).unwrap();
        assert_eq!(again, vec![(first[0].0, false)]);
        let other = store.insert_memories(b, &cb, &[message("hello")]).unwrap();
        assert!(
            other[0].1,
            "another vault's identical message is its own memory"
        );
        assert_eq!(store.pending_count(), 3);
        assert_eq!(store.vault_memory_count(a), 2);
        let batch = [message("hello"), message("new"), message("new")];
        assert_eq!(store.count_new(a, &ca, &batch).unwrap(), 1);
    }

    #[test]
    fn records_open_only_with_their_vaults_key() {
        let (_dir, store) = open_store();
        let vault = VaultId::generate();
        let ids = store
            .insert_memories(vault, &cipher(1), &[message("private")])
            .unwrap();
        let record = store.memory(vault, &cipher(1), ids[0].0).unwrap().unwrap();
        assert_eq!(record.content, "private");
        assert!(store.memory(vault, &cipher(9), ids[0].0).is_err());
    }

    #[test]
    fn vectors_clear_pending_and_stay_in_their_vault() {
        let (_dir, store) = open_store();
        let (a, b) = (VaultId::generate(), VaultId::generate());
        let ids = store
            .insert_memories(a, &cipher(1), &[message("x")])
            .unwrap();
        store
            .insert_memories(b, &cipher(2), &[message("y")])
            .unwrap();
        let pending = store.pending_after(None, 10).unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(store.pending_after(None, 1).unwrap(), pending[..1]);
        assert_eq!(
            store.pending_after(Some(pending[0]), 10).unwrap(),
            pending[1..]
        );
        assert!(store
            .pending_after(Some(pending[1]), 10)
            .unwrap()
            .is_empty());
        let meta = EntryMeta {
            created_at_ms: 5,
            session_id: Some("s".into()),
            tags: vec!["t".into()],
            terms: vec![("word".into(), 2)],
        };
        store
            .insert_vectors(a, &cipher(1), &[(ids[0].0, unit_vector(1), meta.clone())])
            .unwrap();
        assert_eq!(store.pending_count(), 1);
        let vectors = store.vault_vectors(a, &cipher(1)).unwrap();
        assert_eq!(vectors.len(), 1);
        assert_eq!(vectors[0].2, meta);
        assert!(store.vault_vectors(b, &cipher(2)).unwrap().is_empty());
    }

    #[test]
    fn a_deleted_memory_frees_its_digest_and_leaves_the_rest() {
        let (_dir, store) = open_store();
        let vault = VaultId::generate();
        let key = cipher(1);
        let ids = store
            .insert_memories(vault, &key, &[message("gone"), message("kept")])
            .unwrap();
        let deleted = store
            .delete_memories(vault, &key, &[ids[0].0, MemoryId(12345)])
            .unwrap();
        assert_eq!(deleted, (vec![ids[0].0], 1));
        assert!(store.memory(vault, &key, ids[0].0).unwrap().is_none());
        assert_eq!(store.pending_count(), 1);
        let again = store
            .insert_memories(vault, &key, &[message("gone")])
            .unwrap();
        assert!(
            again[0].1,
            "the same text may be stored again after a delete"
        );
    }

    #[test]
    fn erasing_a_vault_leaves_the_others() {
        let (_dir, store) = open_store();
        let (a, b) = (VaultId::generate(), VaultId::generate());
        let many: Vec<NewMemory> = (0..2500).map(|i| message(&format!("m{i}"))).collect();
        store.insert_memories(a, &cipher(1), &many).unwrap();
        store
            .insert_memories(b, &cipher(2), &[message("b")])
            .unwrap();
        assert_eq!(
            store.erase_vault_rows(a).unwrap(),
            Removed {
                memories: 2500,
                pending: 2500
            }
        );
        assert_eq!(store.vault_memory_count(a), 0);
        assert_eq!(store.vault_memory_count(b), 1);
        assert_eq!(store.pending_count(), 1);
    }

    #[test]
    fn pages_follow_storage_order_and_filters() {
        let (_dir, store) = open_store();
        let vault = VaultId::generate();
        let key = cipher(1);
        let many: Vec<NewMemory> = (0..25).map(|i| message(&format!("m{i}"))).collect();
        store.insert_memories(vault, &key, &many).unwrap();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = store
                .memories_page(vault, &key, cursor, 10, |r| r.content != "m3")
                .unwrap();
            seen.extend(page.into_iter().map(|(_, r)| r.content));
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let expected: Vec<String> = (0..25)
            .filter(|i| *i != 3)
            .map(|i| format!("m{i}"))
            .collect();
        assert_eq!(seen, expected);
    }

    fn key_record(name: &str) -> KeyRecord {
        KeyRecord {
            id: "00112233aabbccdd".into(),
            name: name.into(),
            hash: "h".into(),
            vault: VaultId::generate().to_string(),
            scopes: vec![Scope::Read],
            created_at_ms: 1,
            expires_days: None,
            expires_at_ms: None,
            revoked_at_ms: None,
            deprecated_at_ms: None,
            auto_revoke_at_ms: None,
            rotated_to: None,
            rotated_from: None,
        }
    }

    #[test]
    fn a_key_id_is_never_overwritten_and_updates_are_atomic() {
        let (_dir, store) = open_store();
        assert!(store.insert_key(&key_record("first")).unwrap());
        assert!(!store.insert_key(&key_record("second")).unwrap());
        let id = "00112233aabbccdd";
        assert_eq!(store.key(id).unwrap().unwrap().name, "first");
        let updated = store
            .update_key(id, |r| r.revoked_at_ms = Some(7))
            .unwrap()
            .unwrap();
        assert_eq!(updated.status(6), KeyStatus::Active);
        assert_eq!(updated.status(7), KeyStatus::Revoked);
        assert!(store.update_key("nope", |_| {}).unwrap().is_none());
    }

    #[test]
    fn key_status_follows_the_clock() {
        let mut record = key_record("k");
        record.expires_at_ms = Some(100);
        record.auto_revoke_at_ms = Some(50);
        assert_eq!(record.status(10), KeyStatus::Active);
        assert_eq!(record.status(50), KeyStatus::Rotated);
        record.auto_revoke_at_ms = None;
        assert_eq!(record.status(100), KeyStatus::Expired);
    }

    #[test]
    fn ids_round_trip_through_text() {
        let vault = VaultId::generate();
        assert_eq!(vault.to_string().parse::<VaultId>().unwrap(), vault);
        assert!("vlt_zz".parse::<VaultId>().is_err());
        let id = MemoryId(0xabc);
        assert_eq!(id.to_string().parse::<MemoryId>().unwrap(), id);
        assert!("mem_1".parse::<MemoryId>().is_err());
        assert!("mem_zzzzzzzzzzzzzzzz".parse::<MemoryId>().is_err());
    }

    #[test]
    fn the_audit_log_pages_oldest_first_and_keeps_its_bound() {
        let (_dir, store) = open_store();
        for i in 0..7 {
            store
                .append_audit(
                    &AuditEntry {
                        at_ms: i,
                        actor: "admin".into(),
                        action: "mint".into(),
                        key_id: None,
                        vault: None,
                        outcome: "ok".into(),
                        detail: Default::default(),
                    },
                    5,
                )
                .unwrap();
        }
        // Seven appended, five kept: the two oldest were dropped.
        let (first, next) = store.audit_page(None, 3).unwrap();
        assert_eq!(first.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [2, 3, 4]);
        let (rest, end) = store.audit_page(next, 3).unwrap();
        assert_eq!(rest.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [5, 6]);
        assert!(end.is_none());
    }
}
