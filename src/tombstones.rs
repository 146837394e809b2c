//! The tombstone journal: an append-only, fsynced file of erasures and revocations (vault
//! erased or emptied, memories deleted, key revoked or set to stop), ids and times only, never
//! a secret or a text. A restore applies every entry newer than its backup, so that a backup
//! taken before a user left, or a key was revoked, does not bring them back.
//!
//! One JSON object per line: a header naming the journal (a random id, so that a restore knows
//! whether a backup's `tombstones_seq` counts in this journal), then entries numbered from 1. An entry is written (and fsynced) before the
//! store is changed, with writes held off a backup's copy (`Snapshots::hold_writes`) across
//! both, so a backup either holds the change and an entry at or below its `tombstones_seq`, or
//! neither. A crash after the entry and before the change leaves an entry for an erasure that
//! was never acknowledged: a restore then erases what the user asked to erase anyway.
//!
//! The operator can keep it on another volume than the data directory (`--tombstone-log`):
//! a restore after the loss of the data directory's disk needs it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Memory ids in one entry; a larger deletion writes several.
pub const MAX_IDS_PER_ENTRY: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Tombstone {
    /// The vault and its keys removed (the user left).
    VaultErased { vault: String },
    /// Every memory of the vault erased; the vault and its keys stay.
    VaultEmptied { vault: String },
    /// These memories of the vault deleted (one, or a session's).
    MemoriesDeleted {
        vault: String,
        memories: Vec<String>,
    },
    /// The key stops working at `effective_at_ms` (now for a revocation, the end of the grace
    /// period for a rotation).
    KeyRevoked { key: String, effective_at_ms: i64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub at_ms: i64,
    #[serde(flatten)]
    pub tombstone: Tombstone,
}

/// The first line of a journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub journal: String,
    pub created_at_ms: i64,
}

pub struct Journal {
    path: PathBuf,
    id: String,
    state: Mutex<State>,
}

struct State {
    file: File,
    /// The last entry's number.
    last: u64,
    /// The file's length after the last whole entry.
    len: u64,
    /// A failed append: the journal refuses more until a restart (its end may be torn).
    failed: bool,
}

impl Journal {
    /// Opens the journal at `path`, creating it (and its directory entry, durably) if missing.
    /// A last line cut short by a crash is dropped; any other damage refuses to start.
    pub fn open(path: &Path, now_ms: i64) -> anyhow::Result<Journal> {
        let existed = path.exists();
        let (header, entries, good_len) = read_entries(path)?;
        let mut file = File::options()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening the tombstone journal {}", path.display()))?;
        let len = file.metadata()?.len();
        if len != good_len {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = len - good_len,
                "the tombstone journal's last line was cut short (a crash while it was written); dropped it"
            );
            file.set_len(good_len)?;
            file.sync_all()?;
        }
        let header = match header {
            Some(header) => header,
            None => {
                let header = Header {
                    journal: format!("{:016x}", rand::random::<u64>()),
                    created_at_ms: now_ms,
                };
                let mut line = serde_json::to_vec(&header)?;
                line.push(b'\n');
                file.write_all(&line)?;
                file.sync_all()?;
                header
            }
        };
        if !existed {
            crate::fsio::sync_parent(path)?;
        }
        let last = entries.last().map_or(0, |entry| entry.seq);
        let len = file.metadata()?.len();
        Ok(Journal {
            path: path.to_owned(),
            id: header.journal,
            state: Mutex::new(State {
                file,
                last,
                len,
                failed: false,
            }),
        })
    }

    /// The journal's id (its header's).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last entry's number (0 for an empty journal).
    pub fn last_seq(&self) -> u64 {
        self.state.lock().last
    }

    /// Appends an entry, durably; its number. After a failed write the journal is cut back to
    /// its last whole entry and refuses appends until a restart.
    pub fn append(&self, at_ms: i64, tombstone: Tombstone) -> anyhow::Result<u64> {
        let mut state = self.state.lock();
        if state.failed {
            bail!(
                "the tombstone journal {} failed a write earlier; restart the daemon",
                self.path.display()
            );
        }
        let entry = Entry {
            seq: state.last + 1,
            at_ms,
            tombstone,
        };
        let mut line = serde_json::to_vec(&entry)?;
        line.push(b'\n');
        let file = &mut state.file;
        let written = file.write_all(&line).and_then(|()| file.sync_data());
        if let Err(error) = written {
            state.failed = true;
            let len = state.len;
            let _ = state.file.set_len(len).and_then(|()| state.file.sync_all());
            return Err(error)
                .with_context(|| format!("writing the tombstone journal {}", self.path.display()));
        }
        state.last = entry.seq;
        state.len += line.len() as u64;
        Ok(entry.seq)
    }

    /// The journal at `path`: its header and every entry, oldest first (`None` if there is no
    /// file).
    pub fn read(path: &Path) -> anyhow::Result<Option<(Header, Vec<Entry>)>> {
        if !path.exists() {
            return Ok(None);
        }
        let (header, entries, _) = read_entries(path)?;
        let header = header
            .with_context(|| format!("the tombstone journal {} has no header", path.display()))?;
        Ok(Some((header, entries)))
    }
}

/// The header, the entries, and the length of the file up to the last whole line.
fn read_entries(path: &Path) -> anyhow::Result<(Option<Header>, Vec<Entry>, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok((None, Vec::new(), 0))
        }
        Err(error) => {
            return Err(error)
                .with_context(|| format!("reading the tombstone journal {}", path.display()))
        }
    };
    let mut header = None;
    let mut entries: Vec<Entry> = Vec::new();
    let mut offset = 0;
    let mut number = 0;
    while offset < bytes.len() {
        let Some(end) = bytes[offset..].iter().position(|&b| b == b'\n') else {
            // The last line, without its newline: an append cut short.
            break;
        };
        let line = &bytes[offset..offset + end];
        number += 1;
        if number == 1 {
            header = Some(serde_json::from_slice::<Header>(line).with_context(|| {
                format!(
                    "{} does not begin with a tombstone journal's header: is it one?",
                    path.display()
                )
            })?);
            offset += end + 1;
            continue;
        }
        let entry: Entry = serde_json::from_slice(line).with_context(|| {
            format!(
                "line {number} of the tombstone journal {} is damaged; restore the journal from \
                 its own backup (never edit it: a lost line is an erasure forgotten)",
                path.display()
            )
        })?;
        let expected = entries.last().map_or(1, |last| last.seq + 1);
        if entry.seq != expected {
            bail!(
                "line {number} of the tombstone journal {} is entry {}, expected {expected}: the \
                 journal is damaged or two were joined",
                path.display(),
                entry.seq
            );
        }
        entries.push(entry);
        offset += end + 1;
    }
    Ok((header, entries, offset as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_numbered_kept_and_a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tombstones");
        let journal = Journal::open(&path, 1).unwrap();
        let id = journal.id().to_owned();
        let vault = Tombstone::VaultErased { vault: "v1".into() };
        assert_eq!(journal.append(5, vault.clone()).unwrap(), 1);
        let key = Tombstone::KeyRevoked {
            key: "k1".into(),
            effective_at_ms: 6,
        };
        assert_eq!(journal.append(6, key).unwrap(), 2);
        drop(journal);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"seq\":3,\"at")
            .unwrap();
        let journal = Journal::open(&path, 2).unwrap();
        assert_eq!(journal.id(), id, "the header is kept");
        assert_eq!(journal.last_seq(), 2);
        assert_eq!(journal.append(7, vault).unwrap(), 3);
        let (header, entries) = Journal::read(&path).unwrap().unwrap();
        assert_eq!(header.journal, id);
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(!std::fs::read_to_string(&path).unwrap().contains("\"at{"));

        let header = format!("{{\"journal\":\"{id}\",\"created_at_ms\":1}}\n");
        let damaged = format!("{header}{{\"seq\":1,\"at_ms\":1,\"kind\":\"nonsense\"}}\n");
        std::fs::write(&path, damaged).unwrap();
        let error = format!("{:#}", Journal::open(&path, 3).err().unwrap());
        assert!(
            error.contains("line 2") && error.contains("damaged"),
            "{error}"
        );
        std::fs::write(&path, b"{\"seq\":1}\n").unwrap();
        let error = format!("{:#}", Journal::open(&path, 3).err().unwrap());
        assert!(error.contains("header"), "{error}");
    }
}
