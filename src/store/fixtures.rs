//! Records for the store's unit tests.

use super::{KeyRecord, MemoryRecord, NewMemory};
use crate::ids::{Scope, VaultId};
use crate::vector::{UnitVector, DIM};

/// A user message with no session, stored at 1 ms.
pub fn message(content: &str) -> NewMemory {
    NewMemory {
        record: MemoryRecord {
            content: content.into(),
            role: "user".into(),
            session_id: None,
            created_at_ms: 1,
            model: None,
            tags: Vec::new(),
            digest: String::new(),
            passage: None,
            superseded_by: None,
        },
        explicit_timestamp: false,
    }
}

/// An active read key with this id in this vault.
pub fn key_record(id: &str, vault: VaultId, name: &str) -> KeyRecord {
    KeyRecord {
        id: id.parse().expect("a key id"),
        name: name.into(),
        hash: "h".into(),
        vault,
        scopes: vec![Scope::Read],
        created_at_ms: 1,
        expires_days: None,
        expires_at_ms: None,
        revoked_at_ms: None,
        deprecated_at_ms: None,
        auto_revoke_at_ms: None,
        rotated_to: None,
        rotated_from: None,
        session_isolation: false,
    }
}

/// A unit vector that depends on `seed`.
pub fn unit_vector(seed: usize) -> UnitVector {
    let mut v: Vec<f32> = (0..DIM)
        .map(|i| ((i * 31 + seed * 7) % 17) as f32 + 1.0)
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    UnitVector::new(v).expect("normalised")
}
