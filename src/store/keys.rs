//! Key records: the backend's part for keys, and sled's implementation of it.

use std::ops::Bound;

use anyhow::Context;
use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

use super::records::KeyRecord;
use super::sled::{transaction_result, vault_key, SledStore};
use crate::ids::{KeyId, VaultId};

/// A page of key records, and the id to continue after when there are more.
pub type KeyPage = (Vec<KeyRecord>, Option<KeyId>);

pub trait Keys {
    /// Stores a new key record; `false` if a record with that id already exists (left as is).
    /// The record is also found under its vault from then on.
    fn insert_key(&self, record: &KeyRecord) -> anyhow::Result<bool>;

    fn key(&self, id: &KeyId) -> anyhow::Result<Option<KeyRecord>>;

    /// Changes a key record atomically, so two concurrent changes never undo each other (its
    /// id and vault stay as they are). Returns the record as changed, or `None` if there is no
    /// such key.
    fn update_key(
        &self,
        id: &KeyId,
        change: &mut dyn FnMut(&mut KeyRecord),
    ) -> anyhow::Result<Option<KeyRecord>>;

    /// Every key record that `keep` accepts, in id order, after `after`, at most `limit`.
    fn keys_page(
        &self,
        after: Option<&KeyId>,
        limit: usize,
        keep: &mut dyn FnMut(&KeyRecord) -> bool,
    ) -> anyhow::Result<KeyPage>;

    /// The same for one vault's keys, reading only them.
    fn vault_keys_page(
        &self,
        vault: VaultId,
        after: Option<&KeyId>,
        limit: usize,
        keep: &mut dyn FnMut(&KeyRecord) -> bool,
    ) -> anyhow::Result<KeyPage>;

    /// Records a key's use (coarse: callers write at most about once a minute per key; not
    /// made durable by itself).
    fn touch_key(&self, id: &KeyId, at_ms: i64) -> anyhow::Result<()>;

    fn key_last_used(&self, id: &KeyId) -> anyhow::Result<Option<i64>>;
}

fn decode(id: &[u8], value: &[u8]) -> anyhow::Result<KeyRecord> {
    serde_json::from_slice(value)
        .with_context(|| format!("key record {} is corrupt", String::from_utf8_lossy(id)))
}

/// Takes records while `keep` accepts them, up to `limit`, with the cursor when more follow.
fn page(
    records: impl Iterator<Item = anyhow::Result<KeyRecord>>,
    limit: usize,
    keep: &mut dyn FnMut(&KeyRecord) -> bool,
) -> anyhow::Result<KeyPage> {
    let mut page = Vec::new();
    for record in records {
        let record = record?;
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

impl Keys for SledStore {
    fn insert_key(&self, record: &KeyRecord) -> anyhow::Result<bool> {
        let _writing = self.writing();
        let value = serde_json::to_vec(record)?;
        let id = record.id.as_str().as_bytes();
        let by_vault = vault_key(record.vault, &record.id);
        let result = (&self.keys, &self.vault_keys).transaction(|(keys, vault_keys)| {
            if keys.get(id)?.is_some() {
                return Ok(false);
            }
            keys.insert(id, value.as_slice())?;
            vault_keys.insert(by_vault.as_slice(), &[])?;
            Ok::<_, ConflictableTransactionError<String>>(true)
        });
        transaction_result(result)
    }

    fn key(&self, id: &KeyId) -> anyhow::Result<Option<KeyRecord>> {
        match self.keys.get(id.as_str().as_bytes())? {
            None => Ok(None),
            Some(bytes) => Ok(Some(decode(id.as_str().as_bytes(), &bytes)?)),
        }
    }

    fn update_key(
        &self,
        id: &KeyId,
        change: &mut dyn FnMut(&mut KeyRecord),
    ) -> anyhow::Result<Option<KeyRecord>> {
        let _writing = self.writing();
        let key = id.as_str().as_bytes();
        loop {
            let Some(current) = self.keys.get(key)? else {
                return Ok(None);
            };
            let mut record = decode(key, &current)?;
            let (id, vault) = (record.id.clone(), record.vault);
            change(&mut record);
            (record.id, record.vault) = (id, vault);
            let swapped = self.keys.compare_and_swap(
                key,
                Some(current),
                Some(serde_json::to_vec(&record)?),
            )?;
            if swapped.is_ok() {
                return Ok(Some(record));
            }
        }
    }

    fn keys_page(
        &self,
        after: Option<&KeyId>,
        limit: usize,
        keep: &mut dyn FnMut(&KeyRecord) -> bool,
    ) -> anyhow::Result<KeyPage> {
        let range = match after {
            Some(after) => self
                .keys
                .range::<&[u8], _>((Bound::Excluded(after.as_str().as_bytes()), Bound::Unbounded)),
            None => self.keys.iter(),
        };
        let records = range.map(|entry| {
            let (key, value) = entry?;
            decode(&key, &value)
        });
        page(records, limit, keep)
    }

    fn vault_keys_page(
        &self,
        vault: VaultId,
        after: Option<&KeyId>,
        limit: usize,
        keep: &mut dyn FnMut(&KeyRecord) -> bool,
    ) -> anyhow::Result<KeyPage> {
        let start = match after {
            Some(after) => Bound::Excluded(vault_key(vault, after)),
            None => Bound::Included(vault.0.to_vec()),
        };
        let mut end = vault.0.to_vec();
        end.push(0xff);
        let records = self
            .vault_keys
            .range((start, Bound::Excluded(end)))
            .keys()
            .filter_map(|entry| {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(error) => return Some(Err(error.into())),
                };
                let id = &entry[16..];
                match self.keys.get(id) {
                    Ok(Some(value)) => Some(decode(id, &value)),
                    // Indexed, but the record is gone: nothing to list.
                    Ok(None) => None,
                    Err(error) => Some(Err(error.into())),
                }
            });
        page(records, limit, keep)
    }

    fn touch_key(&self, id: &KeyId, at_ms: i64) -> anyhow::Result<()> {
        self.key_used
            .insert(id.as_str().as_bytes(), &at_ms.to_be_bytes())?;
        Ok(())
    }

    fn key_last_used(&self, id: &KeyId) -> anyhow::Result<Option<i64>> {
        Ok(self
            .key_used
            .get(id.as_str().as_bytes())?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::key_record;
    use crate::store::KeyStatus;

    #[test]
    fn a_key_id_is_never_overwritten_and_updates_are_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        let vault = VaultId::generate();
        let id: KeyId = "00112233aabbccdd".parse().unwrap();
        assert!(store
            .insert_key(&key_record(id.as_str(), vault, "first"))
            .unwrap());
        assert!(!store
            .insert_key(&key_record(id.as_str(), vault, "second"))
            .unwrap());
        assert_eq!(store.key(&id).unwrap().unwrap().name, "first");
        let updated = store
            .update_key(&id, &mut |r| r.revoked_at_ms = Some(7))
            .unwrap()
            .unwrap();
        assert_eq!(updated.status(6), KeyStatus::Active);
        assert_eq!(updated.status(7), KeyStatus::Revoked);
        let nope: KeyId = "ffffffffffffffff".parse().unwrap();
        assert!(store.update_key(&nope, &mut |_| {}).unwrap().is_none());
    }

    #[test]
    fn a_vaults_keys_are_listed_without_the_others_and_page_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        let (mine, other) = (VaultId([1; 16]), VaultId([2; 16]));
        for n in 0..5u8 {
            let id = format!("{:016x}", u64::from(n) * 2);
            store.insert_key(&key_record(&id, mine, "m")).unwrap();
            let id = format!("{:016x}", u64::from(n) * 2 + 1);
            store.insert_key(&key_record(&id, other, "o")).unwrap();
        }
        let (first, next) = store.vault_keys_page(mine, None, 3, &mut |_| true).unwrap();
        let ids: Vec<&str> = first.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["0000000000000000", "0000000000000002", "0000000000000004"]
        );
        let (rest, end) = store
            .vault_keys_page(mine, next.as_ref(), 3, &mut |_| true)
            .unwrap();
        assert_eq!(rest.len(), 2);
        assert!(end.is_none());
        assert!(rest.iter().chain(&first).all(|r| r.vault == mine));
        let (all, _) = store.keys_page(None, 100, &mut |_| true).unwrap();
        assert_eq!(all.len(), 10);
    }
}
