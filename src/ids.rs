//! The shared nouns: vault, memory and key ids, a key's scopes, a message's role.
//!
//! A leaf of the module graph: it imports nothing from the crate, so every layer may use it.
//! Each id has one text form, the one the API shows, and serialises as that text, so records
//! written by earlier builds read back unchanged.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Implements `Serialize` and `Deserialize` through the type's `Display` and `FromStr`.
macro_rules! serde_as_text {
    ($type:ty, $expecting:literal) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse()
                    .map_err(|_| serde::de::Error::custom(concat!("expected ", $expecting)))
            }
        }
    };
}

/// A vault: one user's private memory space. 128 random bits, shown as `vlt_` + hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VaultId(pub [u8; 16]);

impl VaultId {
    pub fn generate() -> VaultId {
        VaultId(rand::random())
    }
}

impl fmt::Display for VaultId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vlt_{}", hex::encode(self.0))
    }
}

impl fmt::Debug for VaultId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for VaultId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<VaultId> {
        let hex_part = s
            .strip_prefix("vlt_")
            .context("a vault id starts with vlt_")?;
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(hex_part, &mut bytes).context("a vault id has 32 hex digits")?;
        Ok(VaultId(bytes))
    }
}

serde_as_text!(VaultId, "a vault id (vlt_ and 32 hex digits)");

/// A memory's id, unique across the store; shown as `mem_` + 16 hex digits. Ids grow in the
/// order memories are stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct MemoryId(pub u64);

impl fmt::Display for MemoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mem_{:016x}", self.0)
    }
}

impl FromStr for MemoryId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<MemoryId> {
        let hex_part = s
            .strip_prefix("mem_")
            .context("a memory id starts with mem_")?;
        if hex_part.len() != 16 {
            bail!("a memory id has 16 hex digits");
        }
        let id = u64::from_str_radix(hex_part, 16).context("a memory id has 16 hex digits")?;
        Ok(MemoryId(id))
    }
}

/// A memory key's public id: 16 lowercase hex digits (64 random bits), the part of a key that
/// may be logged and shown in listings.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// Digits in a key id.
    pub const LEN: usize = 16;

    pub fn generate() -> KeyId {
        KeyId(hex::encode(rand::random::<[u8; Self::LEN / 2]>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `text` has a key id's form.
    pub fn is_valid(text: &str) -> bool {
        text.len() == Self::LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for KeyId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<KeyId> {
        if !KeyId::is_valid(s) {
            bail!("a key id is 16 lowercase hex digits");
        }
        Ok(KeyId(s.to_owned()))
    }
}

serde_as_text!(KeyId, "a key id (16 lowercase hex digits)");

/// What a memory key may do at all. A call outside its scopes is refused with 403.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// prepare, search and export, stats.
    Read,
    /// ingest, upload.
    Write,
    /// delete memories, a session, the vault's contents.
    Delete,
    /// manage the keys of the key's own vault.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Write, Scope::Delete, Scope::Admin];
    pub const DEFAULT: [Scope; 2] = [Scope::Read, Scope::Write];

    pub fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Delete => "delete",
            Scope::Admin => "admin",
        }
    }
}

/// Who said a message, in the chat APIs' terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    System,
    Developer,
    Tool,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        Some(match text {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "system" => Role::System,
            "developer" => Role::Developer,
            "tool" | "function" => Role::Tool,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
            Role::Developer => "developer",
            Role::Tool => "tool",
        }
    }

    /// Only what the user and the assistant said becomes memory; instructions and tool output
    /// do not.
    pub fn is_remembered(self) -> bool {
        matches!(self, Role::User | Role::Assistant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let vault = VaultId::generate();
        assert_eq!(vault.to_string().parse::<VaultId>().unwrap(), vault);
        assert!("vlt_zz".parse::<VaultId>().is_err());
        let id = MemoryId(0xabc);
        assert_eq!(id.to_string().parse::<MemoryId>().unwrap(), id);
        assert!("mem_1".parse::<MemoryId>().is_err());
        assert!("mem_zzzzzzzzzzzzzzzz".parse::<MemoryId>().is_err());
        let key = KeyId::generate();
        assert_eq!(key.to_string().parse::<KeyId>().unwrap(), key);
        assert!("0123456789ABCDEF".parse::<KeyId>().is_err());
        assert!("0123".parse::<KeyId>().is_err());
    }

    #[test]
    fn ids_serialise_as_their_text() {
        let vault = VaultId([0xab; 16]);
        let json = serde_json::to_string(&vault).unwrap();
        assert_eq!(json, format!("\"{vault}\""));
        assert_eq!(serde_json::from_str::<VaultId>(&json).unwrap(), vault);
        assert!(serde_json::from_str::<VaultId>("\"vlt_1\"").is_err());
        let key: KeyId = "00112233aabbccdd".parse().unwrap();
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"00112233aabbccdd\"");
    }

    #[test]
    fn scopes_and_roles_parse_their_wire_names_only() {
        assert_eq!(Scope::parse("delete"), Some(Scope::Delete));
        assert_eq!(Scope::parse("Delete"), None);
        assert_eq!(Role::parse("function"), Some(Role::Tool));
        assert!(Role::User.is_remembered() && !Role::System.is_remembered());
    }
}
