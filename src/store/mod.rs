//! The system of record: keys, vaults and their data keys, memories, vectors, the pending set
//! and the audit log, behind one interface, [`Backend`], that the app alone talks to.
//!
//! A backend is the sum of one trait per kind of record ([`Keys`], [`Vaults`], [`Memories`],
//! [`Vectors`], [`Audit`]) and [`Durability`]. The embedded backend is [`SledStore`] (sled
//! trees, the keyring file, the commit ledger); each trait sits in the file of its record kind
//! with sled's implementation of it. The fleet backend is [`PgStore`] (PostgreSQL, shared by
//! several nodes), all of it in `postgres.rs`. Every method blocks: async code reaches them through
//! `app::blocking`.
//!
//! What every backend promises:
//! 1. **Durable before `commit` returns.** A write is acknowledged only after a `commit` that
//!    began after it has returned Ok. A write not yet committed may be lost by a crash, never
//!    half-applied.
//! 2. **Atomic batches.** `insert_memories` stores all of its batch or none of it, each new
//!    memory with its pending mark and dedup digest; `delete_memories` likewise per chunk;
//!    `insert_key` stores a key and its place under its vault together.
//! 3. **The erasure order** ([`Vaults::erase_vault`]): a vault's data key is destroyed
//!    durably before any of its rows is removed, so whatever old files still hold of them can
//!    no longer be opened; every step may be repeated after a crash.
//! 4. **No plaintext at rest.** Memory text, vectors, index metadata and dedup digests reach
//!    the disk only sealed or keyed by the vault's data key; data keys only wrapped by the
//!    master key; key secrets never (only their hashes).
//! 5. **Failure is sticky and said.** After a write fails in a way that leaves later writes
//!    untrustworthy, `is_healthy` is false and every later commit fails, until a restart.

mod audit;
pub mod backup;
mod commit;
#[cfg(test)]
pub(crate) mod fixtures;
mod keys;
pub mod ledger;
mod memories;
mod postgres;
mod records;
mod sled;
mod vaults;
mod vectors;

use std::future::Future;
use std::pin::Pin;

pub use self::audit::Audit;
pub use self::backup::Snapshots;
pub use self::keys::{KeyPage, Keys};
pub use self::memories::Memories;
pub use self::postgres::{PgOptions, PgStore};
pub use self::records::{
    AuditEntry, EntryMeta, KeyRecord, KeyStatus, MemoryPage, MemoryRecord, NewMemory, Passage,
    Removed, VaultRecord, VaultVersion,
};
pub use self::sled::{data_dir_in_use, lock_data_dir, SledOptions, SledStore, Writing};
pub use self::vaults::Vaults;
pub use self::vectors::{VectorItem, Vectors};

/// A commit in flight: resolves once everything written before it was asked for is durable.
pub type CommitFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

pub trait Durability {
    /// Asks for everything written so far to be made durable (promise 1); the future says
    /// when it is. The commit is asked for when this is called, not when the future is polled.
    fn commit(&self) -> CommitFuture;

    /// Whether writes can still be made durable (promise 5).
    fn is_healthy(&self) -> bool;

    /// Takes a failed write's error into account: one that means the store is failing makes
    /// it unhealthy.
    fn note_write_error(&self, error: &anyhow::Error);

    /// Whether an error is the store's own failure (I/O), not the data's (a record that does
    /// not decrypt or parse): the first is worth retrying, the second is not.
    fn is_io_failure(&self, error: &anyhow::Error) -> bool;

    /// Makes everything written so far durable, from the calling thread (start-up).
    fn sync(&self) -> anyhow::Result<()>;

    /// Serves the commits already asked for, stops the backend's own threads, waits for them
    /// and makes everything durable. Later commits fail.
    fn close(&self) -> anyhow::Result<()>;
}

/// The one interface between the app and the system of record.
pub trait Backend:
    Keys + Vaults + Memories + Vectors + Audit + Snapshots + Durability + Send + Sync
{
}

impl<T: Keys + Vaults + Memories + Vectors + Audit + Snapshots + Durability + Send + Sync> Backend
    for T
{
}

impl Durability for SledStore {
    fn commit(&self) -> CommitFuture {
        self.committer.commit()
    }

    fn is_healthy(&self) -> bool {
        self.committer.is_healthy()
    }

    fn note_write_error(&self, error: &anyhow::Error) {
        self.committer.note_write_error(error);
    }

    fn is_io_failure(&self, error: &anyhow::Error) -> bool {
        error.downcast_ref::<::sled::Error>().is_some()
    }

    fn sync(&self) -> anyhow::Result<()> {
        self.flush_and_sync()
    }

    fn close(&self) -> anyhow::Result<()> {
        self.committer.stop()?;
        self.flush_and_sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_serves_the_commits_asked_for_then_refuses_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(store.commit()).unwrap();
        let queued = store.commit();
        store.close().unwrap();
        runtime
            .block_on(queued)
            .expect("a commit asked for before close is served");
        assert!(runtime.block_on(store.commit()).is_err());
        store.close().expect("closing twice is harmless");
    }
}
