//! The records the store keeps, with typed fields. Each serialises as JSON in the shape earlier
//! builds wrote (ids as their text), so a data directory reads back across versions.

use serde::{Deserialize, Serialize};

use crate::ids::{KeyId, MemoryId, Scope, VaultId};

/// A memory key as stored: never the key itself, only a hash of its secret.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: KeyId,
    pub name: String,
    /// SHA-256 of the key's id and secret; the key itself is never stored.
    pub hash: String,
    pub vault: VaultId,
    pub scopes: Vec<Scope>,
    pub created_at_ms: i64,
    /// The lifetime asked for at minting; a rotation gives the new key the same.
    #[serde(default)]
    pub expires_days: Option<u32>,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    #[serde(default)]
    pub revoked_at_ms: Option<i64>,
    /// Set when the key was rotated: it keeps working until `auto_revoke_at_ms`.
    #[serde(default)]
    pub deprecated_at_ms: Option<i64>,
    #[serde(default)]
    pub auto_revoke_at_ms: Option<i64>,
    /// The key that replaced this one, and the key this one replaced.
    #[serde(default)]
    pub rotated_to: Option<KeyId>,
    #[serde(default)]
    pub rotated_from: Option<KeyId>,
    /// Requests with a session see only that session's memories unless they say otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub session_isolation: bool,
}

/// Whether a key may be used at a given moment, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
    /// Rotated, and the grace period is over.
    Rotated,
    Expired,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Rotated => "rotated",
            KeyStatus::Expired => "expired",
        }
    }
}

impl KeyRecord {
    pub fn status(&self, now_ms: i64) -> KeyStatus {
        if self.revoked_at_ms.is_some_and(|at| at <= now_ms) {
            KeyStatus::Revoked
        } else if self.auto_revoke_at_ms.is_some_and(|at| at <= now_ms) {
            KeyStatus::Rotated
        } else if self.expires_at_ms.is_some_and(|at| at <= now_ms) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaultRecord {
    pub created_at_ms: i64,
    /// Set while an erasure is under way; an erasure cut short by a crash is finished at start.
    #[serde(default)]
    pub erasing: bool,
    /// With `erasing`: the vault itself goes too (its keys revoked), not only its contents.
    #[serde(default)]
    pub removing: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MemoryRecord {
    pub content: String,
    pub role: String,
    #[serde(default)]
    pub session_id: Option<String>,
    pub created_at_ms: i64,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The dedup digest (hex), so that deleting the memory can free it.
    #[serde(default)]
    pub digest: String,
    /// Set when this memory is one passage of a longer message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passage: Option<Passage>,
    /// Set when a later memory replaced this one (its id, as text: an imported memory keeps
    /// the id it had where it was exported). A superseded memory is kept for export, with no
    /// vector: prepare and search never see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
}

/// Where a passage sits in the message it was cut from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Passage {
    /// Shared by the passages of one message (random; not a memory id).
    pub message: u64,
    /// From 0.
    pub index: u16,
    pub count: u16,
}

/// What the index keeps beside each vector, so that filters need no record reads. Sealed
/// beside the vector in the store.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EntryMeta {
    #[serde(rename = "t")]
    pub created_at_ms: i64,
    #[serde(rename = "s", default)]
    pub session_id: Option<String>,
    #[serde(rename = "g", default)]
    pub tags: Vec<String>,
    /// The memory's own lexical terms and counts (`index::terms`).
    #[serde(rename = "w", default)]
    pub terms: Vec<(String, u32)>,
    /// The version of `index::terms` that made `terms` (1: before versions were written).
    #[serde(rename = "v", default = "first_terms_version")]
    pub terms_version: u8,
}

fn first_terms_version() -> u8 {
    1
}

/// Where a vault's rows stand, for a node that keeps its index: `seq` grows with every write
/// of its vectors, `removals` with every removal (a delete, a supersede, an erasure).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VaultVersion {
    pub seq: i64,
    pub removals: i64,
}

/// What an erasure removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub memories: usize,
    /// Of them, how many were still waiting for their vector.
    pub pending: usize,
}

/// A page of memories, and the id to continue after when there are more.
pub type MemoryPage = (Vec<(MemoryId, MemoryRecord)>, Option<MemoryId>);

/// A memory to store, with the fields that make it a duplicate of an earlier one.
pub struct NewMemory {
    pub record: MemoryRecord,
    /// Whether the caller gave the timestamp (back-filled history): then it is part of identity.
    pub explicit_timestamp: bool,
}

/// One line of the audit log: who did what to which key or vault, and how it ended. Never a
/// secret, never memory text.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// `admin`, or the id of the memory key that acted.
    pub actor: String,
    pub action: String,
    /// The key acted on: its id, or `<invalid>` when the request named no well-formed id.
    #[serde(default)]
    pub key_id: Option<String>,
    #[serde(default)]
    pub vault: Option<VaultId>,
    /// `ok`, or the error code the operation ended with.
    pub outcome: String,
    /// Counts and other non-secret details.
    #[serde(default)]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_status_follows_the_clock() {
        let mut record =
            crate::store::fixtures::key_record("00112233aabbccdd", VaultId([1; 16]), "k");
        record.expires_at_ms = Some(100);
        record.auto_revoke_at_ms = Some(50);
        assert_eq!(record.status(10), KeyStatus::Active);
        assert_eq!(record.status(50), KeyStatus::Rotated);
        record.auto_revoke_at_ms = None;
        assert_eq!(record.status(100), KeyStatus::Expired);
    }

    #[test]
    fn a_key_record_written_by_an_earlier_build_reads_back() {
        // The shape schema 2 wrote: ids as plain strings, optional fields absent.
        let vault = VaultId([7; 16]);
        let stored = format!(
            r#"{{"id":"00112233aabbccdd","name":"n","hash":"h","vault":"{vault}","scopes":["read","write"],"created_at_ms":5,"rotated_from":"0011223344556677"}}"#
        );
        let record: KeyRecord = serde_json::from_str(&stored).unwrap();
        assert_eq!(record.vault, vault);
        assert_eq!(record.id.as_str(), "00112233aabbccdd");
        assert_eq!(
            record.rotated_from.as_ref().map(KeyId::as_str),
            Some("0011223344556677")
        );
        let again = serde_json::to_value(&record).unwrap();
        assert_eq!(again["vault"], vault.to_string());
        assert_eq!(again["id"], "00112233aabbccdd");
    }
}
