//! Vectors: the backend's part for each memory's sentence vector and index metadata, sealed
//! together with the vault's data key, and sled's implementation of it.

use anyhow::{bail, Context};

use super::records::{EntryMeta, VaultVersion};
use super::sled::{memory_key, settle, split_memory_key, SledStore, ERASE_BATCH};
use crate::crypto::{Purpose, VaultCipher};
use crate::ids::{MemoryId, VaultId};
use crate::vector::{UnitVector, ENCODED_LEN};

/// A memory's vector and what the index keeps beside it.
pub type VectorItem = (MemoryId, UnitVector, EntryMeta);

pub trait Vectors {
    /// Stores a vault's vectors (with the metadata the index filters on), then clears their
    /// pending marks. In that order: a crash in between only means the memory is embedded
    /// again. Durable with the next commit, or replayed from the pending set.
    fn insert_vectors(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        items: &[VectorItem],
    ) -> anyhow::Result<()>;

    /// Every vector of one vault, in memory-id order. Only this vault's rows are read.
    fn vault_vectors(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
    ) -> anyhow::Result<Vec<VectorItem>>;

    /// The fingerprint of the model the stored vectors come from, if one was recorded, and
    /// whether any vector is stored.
    fn embedding_model(&self) -> anyhow::Result<(Option<String>, bool)>;

    /// Records the model the vectors come from. With `reembed`, first marks every embedded
    /// memory pending again, so that the indexer embeds it anew (its old vector serves until
    /// then); returns how many were marked. Idempotent: a crash before the record is written
    /// marks them again at the next start. Durable with the next commit.
    fn set_embedding_model(&self, fingerprint: &str, reembed: bool) -> anyhow::Result<usize>;

    /// The vault's version as this process last read it from a store that other processes
    /// write too (in the round trip that authenticated a key of the vault); `None` when this
    /// process is the store's only writer, so that its loaded indexes are always current.
    fn vault_version(&self, _vault: VaultId) -> Option<VaultVersion> {
        None
    }

    /// The vault's vectors written at versions above `after` (see [`VaultVersion`]), and the
    /// highest version among them (`after` when there are none).
    fn vectors_after(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        after: i64,
    ) -> anyhow::Result<(Vec<VectorItem>, i64)> {
        let _ = (vault, cipher);
        Ok((Vec::new(), after))
    }
}

/// A vector and its index metadata, sealed together for the memory at `key`.
pub(super) fn seal_vector(
    cipher: &VaultCipher,
    key: &[u8],
    vector: &UnitVector,
    meta: &EntryMeta,
) -> anyhow::Result<Vec<u8>> {
    let mut plain = vector.encode()?;
    plain.extend_from_slice(&serde_json::to_vec(meta)?);
    Ok(cipher.seal(Purpose::Vector, key, &plain))
}

/// Opens what [`seal_vector`] sealed for the memory at `key`.
pub(super) fn open_vector(
    cipher: &VaultCipher,
    key: &[u8],
    sealed: &[u8],
) -> anyhow::Result<VectorItem> {
    let (_, id) = split_memory_key(key)?;
    let plain = cipher
        .open(Purpose::Vector, key, sealed)
        .with_context(|| format!("vector of {id}"))?;
    if plain.len() < ENCODED_LEN {
        bail!("vector of {id} is truncated");
    }
    let vector =
        UnitVector::decode(&plain[..ENCODED_LEN]).with_context(|| format!("vector of {id}"))?;
    let meta = serde_json::from_slice(&plain[ENCODED_LEN..])
        .with_context(|| format!("index metadata of {id} is corrupt"))?;
    Ok((id, vector, meta))
}

const EMBEDDING_MODEL: &str = "embedding_model";

impl Vectors for SledStore {
    fn insert_vectors(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        items: &[VectorItem],
    ) -> anyhow::Result<()> {
        let _writing = self.writing();
        let mut vectors = sled::Batch::default();
        let mut pending = sled::Batch::default();
        for (id, vector, meta) in items {
            let key = memory_key(vault, *id);
            vectors.insert(&key, seal_vector(cipher, &key, vector, meta)?);
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

    fn vault_vectors(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
    ) -> anyhow::Result<Vec<VectorItem>> {
        let mut out = Vec::new();
        for entry in self.vectors.scan_prefix(vault.0) {
            let (key, sealed) = entry?;
            out.push(open_vector(cipher, &key, &sealed)?);
        }
        Ok(out)
    }

    fn embedding_model(&self) -> anyhow::Result<(Option<String>, bool)> {
        let recorded = match self.meta.get(EMBEDDING_MODEL)? {
            Some(bytes) => Some(
                String::from_utf8(bytes.to_vec())
                    .context("the store's embedding model record is corrupt")?,
            ),
            None => None,
        };
        Ok((recorded, !self.vectors.is_empty()))
    }

    fn set_embedding_model(&self, fingerprint: &str, reembed: bool) -> anyhow::Result<usize> {
        let _writing = self.writing();
        let mut marked = 0;
        if reembed {
            let mut batch = sled::Batch::default();
            for key in self.vectors.iter().keys() {
                batch.insert(key?, &[]);
                marked += 1;
                if marked % ERASE_BATCH == 0 {
                    self.pending.apply_batch(std::mem::take(&mut batch))?;
                }
            }
            self.pending.apply_batch(batch)?;
        }
        self.meta.insert(EMBEDDING_MODEL, fingerprint.as_bytes())?;
        Ok(marked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::{message, unit_vector};
    use crate::store::Memories;

    #[test]
    fn vectors_clear_pending_and_stay_in_their_vault() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        let (a, b) = (VaultId::generate(), VaultId::generate());
        let (ca, cb) = (VaultCipher::new(&[1; 32]), VaultCipher::new(&[2; 32]));
        let ids = store.insert_memories(a, &ca, &[message("x")]).unwrap();
        store.insert_memories(b, &cb, &[message("y")]).unwrap();
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
            terms_version: 2,
        };
        store
            .insert_vectors(a, &ca, &[(ids[0].0, unit_vector(1), meta.clone())])
            .unwrap();
        assert_eq!(store.pending_count(), 1);
        let vectors = store.vault_vectors(a, &ca).unwrap();
        assert_eq!(vectors.len(), 1);
        assert_eq!(vectors[0].2, meta);
        assert!(store.vault_vectors(b, &cb).unwrap().is_empty());
    }
}
