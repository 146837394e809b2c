//! One reader-writer lock per vault: shared to read or add, exclusive to delete or erase. Held
//! across `.await`, so tokio's; the indexer thread takes them with `blocking_read`.
//!
//! A vault's lock exists while someone holds or waits for it; the map keeps only weak
//! references, pruned as it grows, so idle vaults cost nothing. One user's erasure blocks only
//! that user.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::RwLock;

use crate::ids::VaultId;

#[derive(Default)]
pub struct VaultLocks {
    state: Mutex<Locks>,
}

#[derive(Default)]
struct Locks {
    by_vault: HashMap<VaultId, Weak<RwLock<()>>>,
    /// Entries after the last pruning; the next one runs at twice this.
    live_after_prune: usize,
}

impl VaultLocks {
    /// The vault's lock, made if nobody holds it.
    pub fn of(&self, vault: VaultId) -> Arc<RwLock<()>> {
        let mut locks = self.state.lock().expect("vault locks");
        if let Some(lock) = locks.by_vault.get(&vault).and_then(Weak::upgrade) {
            return lock;
        }
        if locks.by_vault.len() >= 2 * locks.live_after_prune.max(512) {
            locks.by_vault.retain(|_, lock| lock.strong_count() > 0);
            locks.live_after_prune = locks.by_vault.len();
        }
        let lock = Arc::new(RwLock::new(()));
        locks.by_vault.insert(vault, Arc::downgrade(&lock));
        lock
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.state.lock().unwrap().by_vault.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_vaults_exclusive_lock_leaves_every_other_vault_free() {
        let locks = VaultLocks::default();
        // Vaults whose ids agree in their first byte (they shared a stripe of 64 before).
        let mine = VaultId([7; 16]);
        let mut neighbour = [7; 16];
        neighbour[15] = 8;
        let neighbour = VaultId(neighbour);
        let held = locks.of(mine);
        let _exclusive = held.try_write().unwrap();
        assert!(locks.of(neighbour).try_read().is_ok());
        assert!(locks.of(mine).try_read().is_err(), "the same vault waits");
    }

    #[test]
    fn locks_nobody_holds_are_forgotten() {
        let locks = VaultLocks::default();
        let kept = locks.of(VaultId([1; 16]));
        for n in 0..5000u32 {
            let mut id = [0; 16];
            id[..4].copy_from_slice(&n.to_be_bytes());
            drop(locks.of(VaultId(id)));
        }
        assert!(locks.tracked() <= 1024, "{}", locks.tracked());
        assert!(Arc::ptr_eq(&kept, &locks.of(VaultId([1; 16]))));
    }
}
