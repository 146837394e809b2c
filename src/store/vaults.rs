//! Vaults and their data keys: the backend's part for a vault's life, from creation to
//! erasure, and sled's implementation of it (records in the `vaults` tree, data keys in the
//! keyring file).
//!
//! The erasure order, which every backend keeps: the data key is destroyed durably first, so
//! that whatever the store's files still hold of the old rows can no longer be opened; only
//! then are the rows removed, and, for a vault being removed, its keys revoked and its record
//! deleted. Each step may be repeated, so an erasure cut short by a crash is finished at start.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{bail, Context};

use super::keys::Keys;
use super::records::{Removed, VaultRecord};
use super::sled::{SledStore, ERASE_BATCH};
use crate::crypto::VaultCipher;
use crate::ids::{KeyId, VaultId};

pub trait Vaults {
    /// Creates a new, empty vault with a fresh data key: the data key first, durably, then
    /// the record (a crash between them leaves an orphan key, dropped by
    /// [`Vaults::reconcile_data_keys`]). The record is durable with the next commit.
    fn create_vault(&self, created_at_ms: i64) -> anyhow::Result<VaultId>;

    fn vault(&self, vault: VaultId) -> anyhow::Result<Option<VaultRecord>>;

    /// Replaces a vault's record (its erasure marks).
    fn set_vault(&self, vault: VaultId, record: &VaultRecord) -> anyhow::Result<()>;

    /// Every vault and its record.
    fn vaults(&self) -> anyhow::Result<Vec<(VaultId, VaultRecord)>>;

    fn vault_count(&self) -> usize;

    /// The vault's cipher, if the vault has a data key. Never waits for a data key's write.
    fn cipher(&self, vault: VaultId) -> Option<Arc<VaultCipher>>;

    /// The steps of an erasure after its mark is durable, in the erasure order: the data key
    /// destroyed durably (`removing`) or replaced by a fresh one, every row of the vault's
    /// memories removed, then either the vault removed and each of its keys revoked at
    /// `now_ms` (`removing`) or the mark cleared. The rows are durable with the next commit.
    fn erase_vault(&self, vault: VaultId, removing: bool, now_ms: i64) -> anyhow::Result<Removed>;

    /// At start-up: destroys data keys whose vault does not exist (a crash mid-mint) and
    /// returns how many vaults have no data key (their memories cannot be read).
    fn reconcile_data_keys(&self) -> anyhow::Result<usize>;

    /// Where the data keys are kept, for messages.
    fn data_keys_location(&self) -> String;
}

impl Vaults for SledStore {
    fn create_vault(&self, created_at_ms: i64) -> anyhow::Result<VaultId> {
        let _writing = self.writing();
        let vault = VaultId::generate();
        self.keyring.replace(vault)?;
        let record = VaultRecord {
            created_at_ms,
            erasing: false,
            removing: false,
        };
        let previous = self.vaults.compare_and_swap(
            vault.0,
            None::<&[u8]>,
            Some(serde_json::to_vec(&record)?),
        )?;
        if previous.is_err() {
            bail!("vault {vault} already exists");
        }
        Ok(vault)
    }

    fn vault(&self, vault: VaultId) -> anyhow::Result<Option<VaultRecord>> {
        match self.vaults.get(vault.0)? {
            None => Ok(None),
            Some(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("vault record {vault} is corrupt")
                })?))
            }
        }
    }

    fn set_vault(&self, vault: VaultId, record: &VaultRecord) -> anyhow::Result<()> {
        let _writing = self.writing();
        self.vaults.insert(vault.0, serde_json::to_vec(record)?)?;
        Ok(())
    }

    fn vaults(&self) -> anyhow::Result<Vec<(VaultId, VaultRecord)>> {
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

    fn vault_count(&self) -> usize {
        self.vaults.len()
    }

    fn cipher(&self, vault: VaultId) -> Option<Arc<VaultCipher>> {
        self.keyring.cipher(vault)
    }

    fn erase_vault(&self, vault: VaultId, removing: bool, now_ms: i64) -> anyhow::Result<Removed> {
        let _writing = self.writing();
        // 1. Destroy the data key, durably: from here on the old rows cannot be opened.
        if removing {
            self.keyring.remove(vault)?;
        } else {
            self.keyring.replace(vault)?;
        }
        // 2. Remove the rows.
        let removed = self.erase_rows(vault)?;
        // 3. Remove the vault and revoke its keys, or clear the mark.
        if removing {
            let mut cursor: Option<KeyId> = None;
            loop {
                let (page, next) =
                    self.vault_keys_page(vault, cursor.as_ref(), 1000, &mut |_| true)?;
                for key in page {
                    self.update_key(&key.id, &mut |r| {
                        r.revoked_at_ms.get_or_insert(now_ms);
                    })?;
                }
                match next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            self.vaults.remove(vault.0)?;
        } else if let Some(mut record) = self.vault(vault)? {
            record.erasing = false;
            record.removing = false;
            self.set_vault(vault, &record)?;
        }
        Ok(removed)
    }

    fn reconcile_data_keys(&self) -> anyhow::Result<usize> {
        let _writing = self.writing();
        let live: HashSet<VaultId> = self.vaults()?.into_iter().map(|(v, _)| v).collect();
        for vault in self.keyring.vaults() {
            if !live.contains(&vault) {
                self.keyring.remove(vault)?;
            }
        }
        Ok(live
            .iter()
            .filter(|v| self.keyring.cipher(**v).is_none())
            .count())
    }

    fn data_keys_location(&self) -> String {
        format!("the keyring {}", self.keyring.path().display())
    }
}

impl SledStore {
    /// Deletes every row of a vault's memories, vectors, marks and digests, in batches.
    fn erase_rows(&self, vault: VaultId) -> anyhow::Result<Removed> {
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
}
