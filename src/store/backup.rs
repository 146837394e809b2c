//! Backups of the embedded backend: a consistent copy of every durable tree and of the
//! keyring, taken while the daemon serves, and the restore of one into an empty data directory.
//!
//! A backup is a directory: one file per sled tree (`trees/<name>`, records as `u8` kind (1 an
//! insert, 0 a removal), `u32` key length, key, and for an insert `u32` value length, value;
//! little-endian, applied in order), `keyring` (the wrapped data keys, byte for byte) and
//! `manifest.json`, written last, which names every file with its size, record count and
//! sha256. A directory without a manifest, or whose files do not match it, is not a backup and
//! is refused. Everything in it is as sealed as in the store (no memory text, no data key, no
//! key secret in the clear): it is useless without the master key.
//!
//! Consistency, with writes paused for a moment only: every write method of the backend holds
//! a gate shared ([`Snapshots::hold_writes`] lets the app hold it across a tombstone and its
//! change). The backup first subscribes to every tree's changes (sled's `watch_prefix`), then
//! copies each tree while writes go on, then takes the gate exclusively: every write has
//! returned and its change is gathered; the keyring and the tombstone journal's place are read;
//! the gate is released. Each tree's file is its copy followed by the changes since the
//! subscription, in order, so applied in order it is the tree at the moment the gate was held,
//! with every write whole or absent. The manifest says how long writes waited
//! (`writes_paused_ms`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ledger::Ledger;
use super::sled::{commit_seq, SledStore, Writing, COMMIT_SEQ, ID_FLOOR};

/// What `manifest.json` says `format` is.
pub const FORMAT: &str = "memory-sidecar-backup";
/// The manifest's version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The trees a backup holds. `key_used` (last use of each key, coarse and not durable) is left
/// out: a restored key reads as not used since the restore.
const TREES: [&str; 10] = [
    "meta",
    "keys",
    "vault_keys",
    "vaults",
    "memories",
    "vectors",
    "pending",
    "unembeddable",
    "dedup",
    "audit",
];

/// A record of more than this is not one this build wrote: the manifest and the checksum
/// passed, so the file was written by something else.
const MAX_RECORD_BYTES: u32 = 64 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The build that wrote it.
    pub daemon_version: String,
    pub created_at_ms: i64,
    /// The store's schema and its last group commit when the copy was taken.
    pub schema: String,
    pub commit_seq: u64,
    /// Above every memory and audit id in the backup: a restored store's ids start there.
    pub id_floor: u64,
    /// The tombstone journal's id and last entry when the copy was taken: a restore applies
    /// every entry of that journal after it.
    pub tombstones_journal: String,
    pub tombstones_seq: u64,
    /// How long writes waited while the copy was taken.
    pub writes_paused_ms: u64,
    pub counts: Counts,
    pub files: Vec<FileEntry>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub vaults: u64,
    pub keys: u64,
    pub memories: u64,
    pub vectors: u64,
    pub pending: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the backup directory.
    pub path: String,
    pub bytes: u64,
    /// Records in a tree's file (0 for the keyring).
    pub records: u64,
    pub sha256: String,
}

/// The backend's part in backups (the embedded backend's; PostgreSQL has its own).
pub trait Snapshots {
    /// Holds writes off a backup's copy while it lives, so that writes to the tombstone
    /// journal and the store that go together are copied together. Writes within it nest.
    fn hold_writes(&self) -> Writing<'_>;

    /// Writes a consistent copy of the store and the keyring into `to` (created; must not
    /// exist or be empty), as of a moment when writes are held (briefly: see the module).
    /// `tombstones_seq` is read at that moment, so that the journal's entries up to it are in
    /// the copy and the later ones are not.
    fn backup_to(
        &self,
        to: &Path,
        tombstones_seq: &dyn Fn() -> (String, u64),
        now_ms: i64,
    ) -> anyhow::Result<Manifest>;
}

impl Snapshots for SledStore {
    fn hold_writes(&self) -> Writing<'_> {
        self.writing()
    }

    fn backup_to(
        &self,
        to: &Path,
        tombstones_seq: &dyn Fn() -> (String, u64),
        now_ms: i64,
    ) -> anyhow::Result<Manifest> {
        prepare_empty_dir(to)?;
        let result = self.backup_into(to, tombstones_seq, now_ms);
        if result.is_err() {
            // Not a backup (no manifest): nothing is left to mistake for one.
            let _ = std::fs::remove_dir_all(to);
        }
        result
    }
}

impl SledStore {
    fn backup_into(
        &self,
        to: &Path,
        tombstones_seq: &dyn Fn() -> (String, u64),
        now_ms: i64,
    ) -> anyhow::Result<Manifest> {
        let trees_dir = to.join("trees");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&trees_dir)
            .with_context(|| format!("creating {}", trees_dir.display()))?;
        let trees = TREES
            .iter()
            .map(|name| Ok((*name, self.db.open_tree(name)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // 1. Every write from here on is an event, gathered as it happens (sled blocks a writer
        //    once a subscriber is 1,024 events behind, so they are drained all along). The
        //    subscriptions are made with writes held, so no write is half before them.
        let mut watchers = Watchers {
            stop: Arc::new(AtomicBool::new(false)),
            overflow: Arc::new(AtomicBool::new(false)),
            gathered: Arc::new(AtomicUsize::new(0)),
            threads: Vec::new(),
        };
        let subscribers: Vec<_> = {
            let _held = self.gate.write();
            trees
                .iter()
                .map(|(_, tree)| tree.watch_prefix(vec![]))
                .collect()
        };
        for ((name, _), subscriber) in trees.iter().zip(subscribers) {
            let stop = watchers.stop.clone();
            let overflow = watchers.overflow.clone();
            let gathered = watchers.gathered.clone();
            watchers.threads.push(
                std::thread::Builder::new()
                    .name(format!("backup-{name}"))
                    .spawn(move || gather(subscriber, &stop, &overflow, &gathered))?,
            );
        }
        // 2. A copy of every tree while writes go on: each key as it was at some moment since.
        let mut copies = Vec::new();
        for (name, tree) in &trees {
            let counted = COUNTED.contains(name);
            copies.push(copy_tree(tree, &trees_dir.join(name), counted)?);
        }
        // 3. With writes held: the events up to this moment, the keyring, the journal's place.
        //    Every write holds the gate shared, so once it is ours every write has returned,
        //    and its event is gathered.
        let held = Instant::now();
        let (events, tombstones, commit_seq, schema, keyring, id_floor) = {
            let _held = self.gate.write();
            let events = watchers.finish();
            if watchers.overflow.load(Ordering::SeqCst) {
                bail!(
                    "more than {} MiB of writes arrived during the copy; take the backup at a \
                     quieter time",
                    MAX_GATHERED_BYTES >> 20
                );
            }
            // Above every id in the copy: a store restored from it starts its ids there.
            let id_floor = self.next_id()?;
            let meta = &trees[0].1;
            let schema = meta
                .get("schema")?
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_default();
            let keyring = std::fs::read(self.keyring.path())
                .with_context(|| format!("reading {}", self.keyring.path().display()))?;
            (
                events,
                tombstones_seq(),
                commit_seq(meta)?,
                schema,
                keyring,
                id_floor,
            )
        };
        let paused = held.elapsed().as_millis() as u64;
        // 4. The copy, brought to that moment: each tree's events after its records.
        let mut files = Vec::new();
        let mut counts = Counts::default();
        for (((name, _), copy), events) in trees.iter().zip(copies).zip(events) {
            let (entry, count) = copy.finish(name, &events)?;
            match *name {
                "vaults" => counts.vaults = count,
                "keys" => counts.keys = count,
                "memories" => counts.memories = count,
                "vectors" => counts.vectors = count,
                "pending" => counts.pending = count,
                _ => {}
            }
            files.push(entry);
        }
        files.push(write_file(&to.join("keyring"), &keyring, "keyring")?);
        crate::fsio::sync_dir(&trees_dir)?;
        let manifest = Manifest {
            format: FORMAT.to_owned(),
            version: FORMAT_VERSION,
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            created_at_ms: now_ms,
            schema,
            commit_seq,
            id_floor,
            tombstones_journal: tombstones.0,
            tombstones_seq: tombstones.1,
            writes_paused_ms: paused,
            counts,
            files,
        };
        write_manifest(to, &manifest)?;
        Ok(manifest)
    }
}

/// The trees whose sizes the manifest gives.
const COUNTED: [&str; 5] = ["vaults", "keys", "memories", "vectors", "pending"];

/// The threads gathering each tree's events; stopped and joined however the backup ends.
struct Watchers {
    stop: Arc<AtomicBool>,
    overflow: Arc<AtomicBool>,
    gathered: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Vec<sled::Event>>>,
}

impl Watchers {
    /// Stops the threads (with writes held: every event is already sent) and returns each
    /// tree's events.
    fn finish(&mut self) -> Vec<Vec<sled::Event>> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .drain(..)
            .map(|thread| thread.join().unwrap_or_default())
            .collect()
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The most change a backup holds in memory while it copies (past it, it fails).
const MAX_GATHERED_BYTES: usize = 1 << 30;

/// Gathers a tree's events until told to stop and none is left. Past the bound it keeps
/// draining (a writer must never wait on it) but drops them and says so.
fn gather(
    mut subscriber: sled::Subscriber,
    stop: &AtomicBool,
    overflow: &AtomicBool,
    gathered: &AtomicUsize,
) -> Vec<sled::Event> {
    let mut events = Vec::new();
    loop {
        // Read before the wait: a stop seen here was set with writes held, so an empty wait
        // after it means every event is in.
        let stopping = stop.load(Ordering::SeqCst);
        let wait = Duration::from_millis(if stopping { 1 } else { 20 });
        match subscriber.next_timeout(wait) {
            Ok(event) => {
                let bytes = match &event {
                    sled::Event::Insert { key, value } => key.len() + value.len(),
                    sled::Event::Remove { key } => key.len(),
                };
                if overflow.load(Ordering::SeqCst) {
                    continue;
                }
                if gathered.fetch_add(bytes, Ordering::Relaxed) + bytes > MAX_GATHERED_BYTES {
                    overflow.store(true, Ordering::SeqCst);
                    events = Vec::new();
                } else {
                    events.push(event);
                }
            }
            Err(RecvTimeoutError::Timeout) if !stopping => {}
            Err(_) => break,
        }
    }
    events
}

/// A tree's file being written: its records so far, and (for a counted tree) a hash of each
/// key, to count what the events change.
struct TreeCopy {
    out: HashingWriter,
    records: u64,
    keys: Option<Vec<u64>>,
}

fn key_hash(key: &[u8]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(key)
}

fn copy_tree(tree: &sled::Tree, path: &Path, counted: bool) -> anyhow::Result<TreeCopy> {
    let mut copy = TreeCopy {
        out: HashingWriter::create(path)?,
        records: 0,
        keys: counted.then(Vec::new),
    };
    for entry in tree.iter() {
        let (key, value) = entry.with_context(|| format!("reading {}", path.display()))?;
        copy.record(&key, Some(&value))?;
        if let Some(keys) = &mut copy.keys {
            keys.push(key_hash(&key));
        }
    }
    Ok(copy)
}

impl TreeCopy {
    /// One record: an insert (`1`, key, value) or a removal (`0`, key).
    fn record(&mut self, key: &[u8], value: Option<&[u8]>) -> anyhow::Result<()> {
        self.out.write(&[u8::from(value.is_some())])?;
        self.out.write(&(key.len() as u32).to_le_bytes())?;
        self.out.write(key)?;
        if let Some(value) = value {
            self.out.write(&(value.len() as u32).to_le_bytes())?;
            self.out.write(value)?;
        }
        self.records += 1;
        Ok(())
    }

    /// Appends the events, fsyncs; the file's entry and the tree's size at the held moment.
    fn finish(mut self, name: &str, events: &[sled::Event]) -> anyhow::Result<(FileEntry, u64)> {
        let copied = self.keys.as_ref().map_or(0, Vec::len) as i64;
        // The last event of each key says whether it is there at the end.
        let mut last: std::collections::HashMap<&[u8], bool> = std::collections::HashMap::new();
        for event in events {
            match event {
                sled::Event::Insert { key, value } => {
                    self.record(key, Some(value))?;
                    last.insert(key.as_ref(), true);
                }
                sled::Event::Remove { key } => {
                    self.record(key, None)?;
                    last.insert(key.as_ref(), false);
                }
            }
        }
        let mut count = copied;
        if let Some(keys) = &mut self.keys {
            keys.sort_unstable();
            for (key, present) in last {
                let was = keys.binary_search(&key_hash(key)).is_ok();
                count += i64::from(present) - i64::from(was);
            }
        }
        let records = self.records;
        let (bytes, sha256) = self.out.finish()?;
        let entry = FileEntry {
            path: format!("trees/{name}"),
            bytes,
            records,
            sha256,
        };
        Ok((entry, count.max(0) as u64))
    }
}

/// Reads a backup's manifest and checks every file it names against it (size, records,
/// sha256). Says what is wrong with a damaged or incomplete backup.
pub fn verify(from: &Path) -> anyhow::Result<Manifest> {
    let path = from.join("manifest.json");
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} has no manifest.json: it is not a backup, or one that was cut short (the \
             manifest is written last)",
            from.display()
        ),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a backup manifest", path.display()))?;
    if manifest.format != FORMAT {
        bail!(
            "{}: format {:?}, expected {FORMAT:?}",
            path.display(),
            manifest.format
        );
    }
    if manifest.version != FORMAT_VERSION {
        bail!(
            "{}: backup format version {}, this build reads version {FORMAT_VERSION}",
            path.display(),
            manifest.version
        );
    }
    let named: BTreeMap<&str, &FileEntry> = manifest
        .files
        .iter()
        .map(|file| (file.path.as_str(), file))
        .collect();
    for name in TREES {
        let relative = format!("trees/{name}");
        if !named.contains_key(relative.as_str()) {
            bail!("the manifest does not name {relative}: the backup is incomplete");
        }
    }
    if !named.contains_key("keyring") {
        bail!("the manifest does not name the keyring: the backup is incomplete");
    }
    for file in &manifest.files {
        if file.path.contains("..") || file.path.starts_with('/') {
            bail!("the manifest names {:?}, outside the backup", file.path);
        }
        let path = from.join(&file.path);
        let (bytes, sha256) =
            hash_file(&path).with_context(|| format!("the backup's {} is missing", file.path))?;
        if bytes != file.bytes {
            bail!(
                "the backup's {} holds {bytes} bytes, the manifest says {}: it is damaged",
                file.path,
                file.bytes
            );
        }
        if sha256 != file.sha256 {
            bail!(
                "the backup's {} does not match its sha256 in the manifest: it is damaged",
                file.path
            );
        }
    }
    Ok(manifest)
}

/// Writes a verified backup into `data_dir` (created; must not exist or be empty): the trees
/// into a new sled store, the keyring, and a ledger at the backup's commit. The store is
/// opened normally afterwards (which checks the keyring against the master key).
pub fn restore_files(from: &Path, manifest: &Manifest, data_dir: &Path) -> anyhow::Result<()> {
    prepare_empty_dir(data_dir)?;
    let store_dir = data_dir.join("store");
    std::fs::create_dir(&store_dir).with_context(|| format!("creating {}", store_dir.display()))?;
    let db = sled::Config::new()
        .path(&store_dir)
        .open()
        .with_context(|| format!("creating the store in {}", store_dir.display()))?;
    for file in &manifest.files {
        let Some(name) = file.path.strip_prefix("trees/") else {
            continue;
        };
        let tree = db.open_tree(name)?;
        let records = read_tree(&from.join(&file.path), &tree)
            .with_context(|| format!("restoring {}", file.path))?;
        if records != file.records {
            bail!(
                "the backup's {} holds {records} records, the manifest says {}",
                file.path,
                file.records
            );
        }
    }
    // The commit the backup was taken at, whatever the copy of `meta` says (the commit thread
    // writes it without the gate).
    let meta = db.open_tree("meta")?;
    meta.insert(COMMIT_SEQ, &manifest.commit_seq.to_be_bytes())?;
    meta.insert(ID_FLOOR, &manifest.id_floor.to_be_bytes())?;
    db.flush().context("flushing the restored store")?;
    File::open(store_dir.join("db"))?
        .sync_all()
        .context("fsync of the restored store")?;
    drop(meta);
    drop(db);
    // sled's threads let go of its file lock a moment after the last handle is dropped; the
    // store is opened again right after this, so wait for it.
    wait_for_unlock(&store_dir.join("db"))?;
    copy_file(&from.join("keyring"), &data_dir.join("keyring"), "keyring")?;
    Ledger::open(&data_dir.join("ledger"), manifest.commit_seq)?;
    crate::fsio::sync_dir(data_dir)?;
    Ok(())
}

/// Waits (at most 10 s) until no handle holds sled's lock on `file`.
fn wait_for_unlock(file: &Path) -> anyhow::Result<()> {
    use fs2::FileExt;
    let opened = File::options().read(true).write(true).open(file)?;
    let started = Instant::now();
    while FileExt::try_lock_exclusive(&opened).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!(
                "{} is still locked 10 s after the restore closed it",
                file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    FileExt::unlock(&opened)?;
    Ok(())
}

/// Creates `dir` (and its parents) or accepts an empty one.
fn prepare_empty_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("{} is not empty: choose a new directory", dir.display());
            }
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            crate::fsio::sync_parent(dir)
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", dir.display())),
    }
}

/// A file being written, hashed as it goes.
struct HashingWriter {
    out: BufWriter<File>,
    hash: Sha256,
    bytes: u64,
}

impl HashingWriter {
    fn create(path: &Path) -> anyhow::Result<HashingWriter> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(HashingWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            bytes: 0,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.out.write_all(bytes)?;
        self.hash.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Flushes and fsyncs; the size and the sha256.
    fn finish(self) -> anyhow::Result<(u64, String)> {
        let file = self.out.into_inner().map_err(|error| error.into_error())?;
        file.sync_all()?;
        Ok((self.bytes, hex::encode(self.hash.finalize())))
    }
}

fn read_tree(path: &Path, tree: &sled::Tree) -> anyhow::Result<u64> {
    let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut records = 0;
    let mut batch = sled::Batch::default();
    let mut batched = 0;
    loop {
        let mut op = [0u8; 1];
        if input.read(&mut op)? == 0 {
            break;
        }
        let key = read_part(&mut input)?;
        match op[0] {
            1 => batch.insert(key, read_part(&mut input)?),
            0 => batch.remove(key),
            other => bail!("a record of kind {other}: not a file this build wrote"),
        }
        batched += 1;
        records += 1;
        if batched == 4096 {
            tree.apply_batch(std::mem::take(&mut batch))?;
            batched = 0;
        }
    }
    tree.apply_batch(batch)?;
    Ok(records)
}

/// One length-prefixed part.
fn read_part(input: &mut impl Read) -> anyhow::Result<Vec<u8>> {
    let mut length = [0u8; 4];
    input
        .read_exact(&mut length)
        .context("a record is cut short")?;
    let length = u32::from_le_bytes(length);
    if length > MAX_RECORD_BYTES {
        bail!("a record of {length} bytes: not a file this build wrote");
    }
    let mut part = vec![0u8; length as usize];
    input
        .read_exact(&mut part)
        .context("a record is cut short")?;
    Ok(part)
}

fn copy_file(from: &Path, to: &Path, relative: &str) -> anyhow::Result<FileEntry> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_file(to, &bytes, relative)
}

/// A new file of `bytes` (mode 0600, fsynced), named `relative` in the manifest.
fn write_file(to: &Path, bytes: &[u8], relative: &str) -> anyhow::Result<FileEntry> {
    let mut out = HashingWriter::create(to)?;
    out.write(bytes)?;
    let (bytes, sha256) = out.finish()?;
    Ok(FileEntry {
        path: relative.to_owned(),
        bytes,
        records: 0,
        sha256,
    })
}

fn hash_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut input = File::open(path)?;
    let mut hash = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0;
    loop {
        let n = input.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hash.update(&buffer[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hex::encode(hash.finalize())))
}

fn write_manifest(to: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    let temporary: PathBuf = to.join("manifest.json.partial");
    let mut file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(&serde_json::to_vec_pretty(manifest)?)?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&temporary, to.join("manifest.json"))?;
    crate::fsio::sync_dir(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Snapshots, Vaults};

    /// Writes go on during the copy: the restored store is the state at one moment, every
    /// write whole (a vault's record and its data key together, or neither).
    #[test]
    fn a_backup_taken_under_writes_is_one_moment_of_them() {
        use crate::crypto::MasterKey;
        use crate::metrics::Metrics;
        use crate::store::SledOptions;
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::from_hex(&MasterKey::generate_hex()).unwrap();
        let options = |data: &Path| SledOptions {
            data_dir: data.to_owned(),
            cache_bytes: 1 << 20,
            accept_lost_commits: false,
        };
        let store = SledStore::open(
            &options(&dir.path().join("data")),
            &master,
            Metrics::new().unwrap(),
        )
        .unwrap();
        for _ in 0..200 {
            store.create_vault(1).unwrap();
        }
        let used = (0..5).map(|_| store.next_id().unwrap()).max().unwrap();
        let stop = AtomicBool::new(false);
        let to = dir.path().join("backup");
        let manifest = std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                let mut made = 0;
                while !stop.load(Ordering::SeqCst) {
                    let vault = store.create_vault(2).unwrap();
                    made += 1;
                    if made % 2 == 0 {
                        store.erase_vault(vault, true, 3).unwrap();
                    }
                }
                made
            });
            std::thread::sleep(Duration::from_millis(30));
            let manifest = store.backup_to(&to, &|| ("j".to_owned(), 0), 4).unwrap();
            std::thread::sleep(Duration::from_millis(30));
            stop.store(true, Ordering::SeqCst);
            assert!(writer.join().unwrap() > 10, "writes went on");
            manifest
        });
        let restored_dir = dir.path().join("restored");
        restore_files(&to, &verify(&to).unwrap(), &restored_dir).unwrap();
        let restored =
            SledStore::open(&options(&restored_dir), &master, Metrics::new().unwrap()).unwrap();
        let vaults = restored.vaults().unwrap();
        assert!(vaults.len() >= 200);
        assert_eq!(vaults.len() as u64, manifest.counts.vaults);
        for (vault, _) in &vaults {
            assert!(
                restored.cipher(*vault).is_some(),
                "{vault} without its data key"
            );
        }
        assert_eq!(
            restored.keyring.len(),
            vaults.len(),
            "a data key without its vault"
        );
        // New ids start above every id of the backup.
        assert!(manifest.id_floor > used);
        assert!(restored.next_id().unwrap() >= manifest.id_floor);
    }

    #[test]
    fn a_backup_restores_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(&dir.path().join("data"));
        store.create_vault(1).unwrap();
        let to = dir.path().join("backup");
        let manifest = store.backup_to(&to, &|| ("j".to_owned(), 7), 2).unwrap();
        assert_eq!(manifest.counts.vaults, 1);
        assert_eq!(manifest.tombstones_seq, 7);
        let verified = verify(&to).unwrap();
        restore_files(&to, &verified, &dir.path().join("restored")).unwrap();
        let restored = sled::open(dir.path().join("restored/store")).unwrap();
        assert_eq!(restored.open_tree("vaults").unwrap().len(), 1);

        let keyring = to.join("keyring");
        let mut bytes = std::fs::read(&keyring).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&keyring, bytes).unwrap();
        let error = verify(&to).unwrap_err().to_string();
        assert!(
            error.contains("keyring") && error.contains("damaged"),
            "{error}"
        );

        std::fs::remove_file(to.join("manifest.json")).unwrap();
        let error = verify(&to).unwrap_err().to_string();
        assert!(error.contains("no manifest.json"), "{error}");
        let error = restore_files(&to, &manifest, &dir.path().join("restored"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not empty"), "{error}");
    }
}
