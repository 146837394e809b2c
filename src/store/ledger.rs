//! The commit ledger: a 32-byte file beside the store that remembers how many group commits the
//! store has made durable, so that a store which lost some of them is noticed at start-up.
//!
//! sled checks each log message's CRC when it recovers and stops at the first bad one: a
//! truncated or garbled data file opens without complaint and simply holds less, and a missing
//! store directory opens as a new, empty one. Either way the daemon would answer with fewer
//! memories than it acknowledged, silently. So every group commit also writes its sequence
//! number into the store, and once that commit is durable the ledger is overwritten in place
//! with the same number. At start-up the store's number may be ahead of the ledger's (a crash
//! between the two writes) but never behind it: behind means acknowledged commits are gone.
//!
//! The ledger is written with `pwrite`, not fsynced on every commit: a kill leaves it in the
//! page cache, and after a power loss it can only lag (it is written after the store's fsync),
//! which weakens the check but never raises a false alarm. It is fsynced when created, when
//! reset, and at shutdown.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"MSLEDGR1";
const LEN: usize = 32;

pub struct Ledger {
    file: File,
    path: PathBuf,
}

/// What the ledger file held at start-up.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    /// No ledger file: a new data directory (or one whose ledger was removed).
    Missing,
    /// The last commit the store made durable, as far as the ledger knows.
    Commit(u64),
    /// A file of the wrong length, magic or checksum; what is wrong with it.
    Damaged(String),
}

impl Ledger {
    /// What the ledger at `path` holds, without changing anything.
    pub fn read(path: &Path) -> Recorded {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Recorded::Missing,
            Err(error) => return Recorded::Damaged(format!("it cannot be read: {error}")),
        };
        if bytes.len() != LEN {
            return Recorded::Damaged(format!("{} bytes, expected {LEN}", bytes.len()));
        }
        let seq = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        if &bytes[..8] != MAGIC || bytes[16..] != checksum(seq) {
            return Recorded::Damaged("bad magic or checksum".to_owned());
        }
        Recorded::Commit(seq)
    }

    /// Opens (or creates) the ledger and sets it to `seq`, durably.
    pub fn open(path: &Path, seq: u64) -> anyhow::Result<Ledger> {
        let existed = path.exists();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening the commit ledger {}", path.display()))?;
        let ledger = Ledger {
            file,
            path: path.to_owned(),
        };
        ledger.record(seq)?;
        ledger.file.set_len(LEN as u64)?;
        ledger.sync()?;
        if !existed {
            crate::fsio::sync_parent(path)?;
        }
        Ok(ledger)
    }

    /// Checks the store's last commit against the ledger's, before anything is served.
    /// `accept_loss` (the operator's `--accept-lost-commits`) turns a refusal into a warning.
    ///
    /// No ledger and a store that never numbered a commit is a new data directory (or one
    /// written before the ledger existed): nothing to check. No ledger beside a store that did
    /// number its commits means the ledger was lost, and with it the check.
    pub fn check(
        recorded: &Recorded,
        store_seq: u64,
        paths: (&Path, &Path),
        accept_loss: bool,
    ) -> anyhow::Result<()> {
        let (store, ledger) = (paths.0.display(), paths.1.display());
        let problem = match recorded {
            Recorded::Commit(acknowledged) if store_seq < *acknowledged => format!(
                "the store in {store} holds commits up to {store_seq}, but commit {acknowledged} \
                 was acknowledged (commit ledger {ledger}): the store's files were truncated, \
                 damaged or replaced, and acknowledged memories would be missing. Restore the \
                 whole data directory from a backup, or start with --accept-lost-commits to \
                 serve what the store still holds"
            ),
            Recorded::Missing if store_seq > 0 => format!(
                "the store in {store} has made {store_seq} commits but its commit ledger \
                 {ledger} is missing, so lost commits could not be noticed. If the data \
                 directory was copied without it, copy it too; or start with \
                 --accept-lost-commits to trust the store as it is"
            ),
            Recorded::Damaged(what) => format!(
                "the commit ledger {ledger} is damaged ({what}), so the store in {store} cannot \
                 be checked for lost commits. Restore the data directory from a backup, or \
                 start with --accept-lost-commits to trust the store as it is (the ledger is \
                 rewritten)"
            ),
            _ => return Ok(()),
        };
        if !accept_loss {
            bail!(problem);
        }
        tracing::warn!(
            problem = %problem,
            "starting anyway (--accept-lost-commits); the ledger is reset to the store"
        );
        Ok(())
    }

    /// Notes that commit `seq` is durable in the store. Not fsynced: see the module docs.
    pub fn record(&self, seq: u64) -> anyhow::Result<()> {
        self.file
            .write_all_at(&encode(seq), 0)
            .with_context(|| format!("writing the commit ledger {}", self.path.display()))
    }

    /// Sets the ledger to `seq` and fsyncs it.
    pub fn reset(&self, seq: u64) -> anyhow::Result<()> {
        self.record(seq)?;
        self.sync()
    }

    pub fn sync(&self) -> anyhow::Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("fsync of the commit ledger {}", self.path.display()))
    }
}

fn encode(seq: u64) -> [u8; LEN] {
    let mut bytes = [0u8; LEN];
    bytes[..8].copy_from_slice(MAGIC);
    bytes[8..16].copy_from_slice(&seq.to_le_bytes());
    bytes[16..].copy_from_slice(&checksum(seq));
    bytes
}

fn checksum(seq: u64) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update(MAGIC)
        .chain_update(seq.to_le_bytes())
        .finalize();
    digest[..16].try_into().expect("16 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_keeps_what_it_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        assert_eq!(Ledger::read(&path), Recorded::Missing);
        let ledger = Ledger::open(&path, 0).unwrap();
        assert_eq!(Ledger::read(&path), Recorded::Commit(0));
        ledger.record(41).unwrap();
        ledger.record(42).unwrap();
        drop(ledger);
        assert_eq!(Ledger::read(&path), Recorded::Commit(42));
    }

    #[test]
    fn a_store_behind_its_ledger_or_without_one_is_refused_unless_accepted() {
        let paths = (Path::new("/d/store"), Path::new("/d/ledger"));
        let check = |recorded, seq, accept| {
            Ledger::check(&recorded, seq, paths, accept).map_err(|e| e.to_string())
        };
        assert!(check(Recorded::Commit(10), 10, false).is_ok());
        // A crash between the store's fsync and the ledger's write leaves the store ahead.
        assert!(check(Recorded::Commit(10), 11, false).is_ok());
        let behind = check(Recorded::Commit(10), 9, false).unwrap_err();
        assert!(behind.contains("commit 10") && behind.contains("--accept-lost-commits"));
        assert!(check(Recorded::Commit(10), 9, true).is_ok());
        // A new data directory.
        assert!(check(Recorded::Missing, 0, false).is_ok());
        let missing = check(Recorded::Missing, 5, false).unwrap_err();
        assert!(missing.contains("missing"), "{missing}");
        assert!(check(Recorded::Missing, 5, true).is_ok());
        let damaged = check(Recorded::Damaged("3 bytes".into()), 0, false).unwrap_err();
        assert!(damaged.contains("damaged (3 bytes)"), "{damaged}");
        assert!(check(Recorded::Damaged("3 bytes".into()), 0, true).is_ok());
    }

    #[test]
    fn a_damaged_ledger_says_what_is_wrong_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        Ledger::open(&path, 7).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            Ledger::read(&path),
            Recorded::Damaged("bad magic or checksum".into())
        );
        std::fs::write(&path, &bytes[..20]).unwrap();
        assert_eq!(
            Ledger::read(&path),
            Recorded::Damaged("20 bytes, expected 32".into())
        );
    }
}
