//! Memories: the backend's part for memory records, their dedup digests and the pending set
//! (stored, not yet embedded), and sled's implementation of it.
//!
//! A memory's text is sealed with its vault's data key; its dedup digest is keyed by it too,
//! so nothing derived from a memory's text is readable once the key is gone.

use std::collections::HashSet;
use std::ops::Bound;

use anyhow::Context;
use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

use super::records::{MemoryPage, MemoryRecord, NewMemory};
use super::sled::{
    memory_key, settle, split_memory_key, transaction_result, SledStore, ERASE_BATCH,
};
use crate::crypto::{Purpose, VaultCipher};
use crate::ids::{MemoryId, VaultId};

pub trait Memories {
    /// How many of a vault's new memories are not already stored (by their dedup digest).
    fn count_new(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        memories: &[NewMemory],
    ) -> anyhow::Result<usize>;

    /// Stores a batch of messages atomically, each marked pending. Returns each message's id
    /// and whether it is new (an identical message stored before keeps its first id). Durable
    /// with the next commit.
    fn insert_memories(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        memories: &[NewMemory],
    ) -> anyhow::Result<Vec<(MemoryId, bool)>>;

    fn memory(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        id: MemoryId,
    ) -> anyhow::Result<Option<MemoryRecord>>;

    fn contains_memory(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool>;

    /// A vault's memories in id (that is, storage) order, after `after`, that `keep` accepts:
    /// at most `limit`, and the cursor to continue from when there are more.
    fn memories_page(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        after: Option<MemoryId>,
        limit: usize,
        keep: &mut dyn FnMut(&MemoryRecord) -> bool,
    ) -> anyhow::Result<MemoryPage>;

    /// Deletes memories of one vault, with their vectors, marks and digests, atomically per
    /// chunk. Returns the ids that existed, and how many were still pending. Durable with the
    /// next commit.
    fn delete_memories(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        ids: &[MemoryId],
    ) -> anyhow::Result<(Vec<MemoryId>, usize)>;

    /// Marks memories of one vault as replaced by the memory `by`: each keeps its text, with
    /// `superseded_by` set, and loses its vector and its pending mark, atomically per memory. Its
    /// dedup digest stays: a gateway resending the conversation does not bring it back. Returns the ids marked now (not those
    /// missing or already superseded) and how many of them were still pending. The caller holds
    /// the vault's lock exclusively; durable with the next commit.
    fn supersede(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        ids: &[MemoryId],
        by: MemoryId,
    ) -> anyhow::Result<(Vec<MemoryId>, usize)>;

    /// Whether a memory still waits for its vector (stored, not embedded, not set aside).
    fn is_pending(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool>;

    /// How many memories one vault holds (nothing decrypted).
    fn vault_memory_count(&self, vault: VaultId) -> usize;

    /// How many memories the store holds (a whole scan: a second or more at a million).
    fn memory_count(&self) -> usize;

    /// Up to `limit` memories stored but not yet embedded, in store order (ids only), from the
    /// first one after `after` (from the start when `None`).
    fn pending_after(
        &self,
        after: Option<(VaultId, MemoryId)>,
        limit: usize,
    ) -> anyhow::Result<Vec<(VaultId, MemoryId)>>;

    fn pending_count(&self) -> usize;

    /// How many of one vault's memories wait for their vector.
    fn vault_pending_count(&self, vault: VaultId) -> usize;

    /// Drops a pending mark whose memory is gone. Whether there was one.
    fn clear_pending(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool>;

    /// Takes a memory that cannot be embedded out of the pending set, so that it does not
    /// block the memories behind it. The memory itself stays stored. Whether it was pending.
    fn set_unembeddable(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool>;
}

/// The dedup digest of a message: keyed by the vault's data key, so it means nothing without it.
pub(super) fn digest(cipher: &VaultCipher, memory: &NewMemory) -> [u8; 16] {
    let record = &memory.record;
    let timestamp = memory
        .explicit_timestamp
        .then(|| record.created_at_ms.to_be_bytes());
    let mut parts: Vec<&[u8]> = vec![
        record.session_id.as_deref().unwrap_or("").as_bytes(),
        record.role.as_bytes(),
        record.content.as_bytes(),
        timestamp.as_ref().map_or(&[][..], |t| &t[..]),
    ];
    // A passage is told apart from a message of the same words by where it sits (only then:
    // the digests of memories stored before passages existed stay what they were).
    let place = record
        .passage
        .map(|p| [p.index.to_be_bytes(), p.count.to_be_bytes()].concat());
    if let Some(place) = &place {
        parts.push(place);
    }
    let full = cipher.digest(&parts);
    full[..16].try_into().expect("32 >= 16")
}

fn dedup_key(vault: VaultId, digest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + digest.len());
    key.extend_from_slice(&vault.0);
    key.extend_from_slice(digest);
    key
}

pub(super) fn open_record(
    cipher: &VaultCipher,
    key: &[u8],
    sealed: &[u8],
) -> anyhow::Result<MemoryRecord> {
    let (_, id) = split_memory_key(key)?;
    let plain = cipher
        .open(Purpose::Memory, key, sealed)
        .with_context(|| format!("memory {id}"))?;
    serde_json::from_slice(&plain).with_context(|| format!("memory {id} is corrupt"))
}

impl Memories for SledStore {
    fn count_new(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        memories: &[NewMemory],
    ) -> anyhow::Result<usize> {
        let mut seen = HashSet::new();
        let mut fresh = 0;
        for memory in memories {
            let key = dedup_key(vault, &digest(cipher, memory));
            if seen.insert(key.clone()) && !self.dedup.contains_key(&key)? {
                fresh += 1;
            }
        }
        Ok(fresh)
    }

    fn insert_memories(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        memories: &[NewMemory],
    ) -> anyhow::Result<Vec<(MemoryId, bool)>> {
        let _writing = self.writing();
        let mut prepared = Vec::with_capacity(memories.len());
        // Imported already superseded: kept for export, never embedded.
        let mut superseded = HashSet::new();
        for memory in memories {
            let id = MemoryId(self.next_id()?);
            let digest = digest(cipher, memory);
            let mut record = memory.record.clone();
            record.digest = hex::encode(digest);
            let key = memory_key(vault, id);
            let sealed = cipher.seal(Purpose::Memory, &key, &serde_json::to_vec(&record)?);
            prepared.push((id, dedup_key(vault, &digest), sealed));
            if memory.record.superseded_by.is_some() {
                superseded.insert(id);
            }
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
                    if !superseded.contains(id) {
                        pending.insert(&key, &[])?;
                    }
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

    fn memory(
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

    fn contains_memory(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        Ok(self.memories.contains_key(memory_key(vault, id))?)
    }

    fn memories_page(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        after: Option<MemoryId>,
        limit: usize,
        keep: &mut dyn FnMut(&MemoryRecord) -> bool,
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

    fn delete_memories(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        ids: &[MemoryId],
    ) -> anyhow::Result<(Vec<MemoryId>, usize)> {
        let _writing = self.writing();
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

    fn supersede(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        ids: &[MemoryId],
        by: MemoryId,
    ) -> anyhow::Result<(Vec<MemoryId>, usize)> {
        let _writing = self.writing();
        let mut marked = Vec::new();
        let mut were_pending = 0;
        for id in ids {
            let key = memory_key(vault, *id);
            let Some(mut record) = self.memory(vault, cipher, *id)? else {
                continue;
            };
            if record.superseded_by.is_some() {
                continue;
            }
            record.superseded_by = Some(by.to_string());
            let sealed = cipher.seal(Purpose::Memory, &key, &serde_json::to_vec(&record)?);
            let result = (&self.memories, &self.vectors, &self.pending).transaction(
                |(memories, vectors, pending)| {
                    memories.insert(&key, sealed.as_slice())?;
                    vectors.remove(&key)?;
                    Ok(pending.remove(&key)?.is_some())
                },
            );
            were_pending += usize::from(transaction_result(result)?);
            marked.push(*id);
        }
        Ok((marked, were_pending))
    }

    fn is_pending(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        Ok(self.pending.contains_key(memory_key(vault, id))?)
    }

    fn vault_memory_count(&self, vault: VaultId) -> usize {
        self.memories.scan_prefix(vault.0).keys().count()
    }

    fn memory_count(&self) -> usize {
        self.memories.len()
    }

    fn pending_after(
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

    fn pending_count(&self) -> usize {
        self.pending.len()
    }

    fn vault_pending_count(&self, vault: VaultId) -> usize {
        self.pending.scan_prefix(vault.0).keys().count()
    }

    fn clear_pending(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        let _writing = self.writing();
        Ok(self.pending.remove(memory_key(vault, id))?.is_some())
    }

    fn set_unembeddable(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        let _writing = self.writing();
        let key = memory_key(vault, id);
        self.unembeddable.insert(key, &[])?;
        Ok(self.pending.remove(key)?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::fixtures::message;
    use crate::store::{Vaults, Vectors};

    fn cipher(seed: u8) -> VaultCipher {
        VaultCipher::new(&[seed; 32])
    }

    #[test]
    fn identical_messages_are_stored_once_per_vault() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
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
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        let vault = VaultId::generate();
        let ids = store
            .insert_memories(vault, &cipher(1), &[message("private")])
            .unwrap();
        let record = store.memory(vault, &cipher(1), ids[0].0).unwrap().unwrap();
        assert_eq!(record.content, "private");
        assert!(store.memory(vault, &cipher(9), ids[0].0).is_err());
    }

    #[test]
    fn a_deleted_memory_frees_its_digest_and_leaves_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
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
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        let (a, b) = (
            store.create_vault(0).unwrap(),
            store.create_vault(0).unwrap(),
        );
        let (ca, cb) = (store.cipher(a).unwrap(), store.cipher(b).unwrap());
        let many: Vec<NewMemory> = (0..2500).map(|i| message(&format!("m{i}"))).collect();
        store.insert_memories(a, &ca, &many).unwrap();
        store.insert_memories(b, &cb, &[message("b")]).unwrap();
        assert_eq!(
            store.erase_vault(a, false, 0).unwrap(),
            crate::store::Removed {
                memories: 2500,
                pending: 2500
            }
        );
        assert_eq!(store.vault_memory_count(a), 0);
        assert_eq!(store.vault_memory_count(b), 1);
        assert_eq!(store.pending_count(), 1);
        assert!(
            !Arc::ptr_eq(&ca, &store.cipher(a).unwrap()),
            "a fresh data key"
        );
        assert!(store.vault(a).unwrap().is_some(), "the vault stays");
        store.erase_vault(b, true, 0).unwrap();
        assert!(store.vault(b).unwrap().is_none() && store.cipher(b).is_none());
        assert!(store.vault_vectors(b, &cb).unwrap().is_empty());
    }

    #[test]
    fn pages_follow_storage_order_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        let vault = VaultId::generate();
        let key = cipher(1);
        let many: Vec<NewMemory> = (0..25).map(|i| message(&format!("m{i}"))).collect();
        store.insert_memories(vault, &key, &many).unwrap();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = store
                .memories_page(vault, &key, cursor, 10, &mut |r| r.content != "m3")
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
}
