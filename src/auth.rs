//! Keys: their format, hashing and constant-time checks. Authentication yields an [`Access`].
//!
//! A memory key is `mk_` + 16 hex digits of public key id + 32 base62 characters of secret
//! (190 random bits) + 6 base62 characters of checksum, optionally followed by a mode suffix
//! (`:read`, `:write`, `:off`). The checksum lets a mistyped key be refused without a lookup;
//! the id lets the record be found without scanning; only SHA-256(id, secret) is ever stored.

use std::fmt;
use std::path::Path;

use anyhow::Context;
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::bounds::MIN_ADMIN_KEY_LEN;
use crate::error::ApiError;
use crate::ids::{KeyId, Scope, VaultId};

pub const KEY_PREFIX: &str = "mk_";
const ID_LEN: usize = KeyId::LEN;
const SECRET_LEN: usize = 32;
const CHECK_LEN: usize = 6;
pub const KEY_LEN: usize = KEY_PREFIX.len() + ID_LEN + SECRET_LEN + CHECK_LEN;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// The variable that gives the admin key itself, winning over `<data-dir>/admin.key`.
pub const ADMIN_KEY_ENV: &str = "MEMORY_SIDECAR_ADMIN_KEY";

/// What a key's suffix lets a request do. The suffix only ever narrows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    pub retrieve: bool,
    pub store: bool,
}

impl Mode {
    pub const FULL: Mode = Mode {
        retrieve: true,
        store: true,
    };

    /// Whether the suffix leaves `scope` in place: `:read` keeps only read, `:write` only
    /// write, `:off` nothing; without a suffix every scope of the key stays.
    pub fn allows(self, scope: Scope) -> bool {
        match scope {
            Scope::Read => self.retrieve,
            Scope::Write => self.store,
            Scope::Delete | Scope::Admin => self.retrieve && self.store,
        }
    }

    /// A mode named in full (`X-Memory-Mode`): `full` (or MemoryRouter's `on` and
    /// `default`), `read`, `write`, or `off` (or `none`).
    pub fn parse(text: &str) -> Option<Mode> {
        let (retrieve, store) = match text {
            "full" | "on" | "default" => (true, true),
            "read" => (true, false),
            "write" => (false, true),
            "off" | "none" => (false, false),
            _ => return None,
        };
        Some(Mode { retrieve, store })
    }

    /// What both modes allow: a mode only ever narrows another.
    pub fn and(self, other: Mode) -> Mode {
        Mode {
            retrieve: self.retrieve && other.retrieve,
            store: self.store && other.store,
        }
    }

    /// A label for metrics: one of four fixed values.
    pub fn label(self) -> &'static str {
        match (self.retrieve, self.store) {
            (true, true) => "full",
            (true, false) => "read",
            (false, true) => "write",
            (false, false) => "off",
        }
    }
}

/// A memory key as presented: its public id, its secret and the mode suffix.
pub struct PresentedKey {
    pub id: KeyId,
    secret: String,
    pub mode: Mode,
}

impl fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresentedKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("mode", &self.mode)
            .finish()
    }
}

impl PresentedKey {
    /// Parses `mk_...[:mode]`. Cheap: no store lookup, so brute force costs us almost nothing.
    pub fn parse(raw: &str) -> Result<PresentedKey, ApiError> {
        let (key, mode) = match raw.split_once(':') {
            None => (raw, Mode::FULL),
            Some((key, "read")) => (
                key,
                Mode {
                    retrieve: true,
                    store: false,
                },
            ),
            Some((key, "write")) => (
                key,
                Mode {
                    retrieve: false,
                    store: true,
                },
            ),
            Some((key, "off")) => (
                key,
                Mode {
                    retrieve: false,
                    store: false,
                },
            ),
            Some(_) => return Err(ApiError::InvalidKey),
        };
        if key.len() != KEY_LEN || !key.starts_with(KEY_PREFIX) || !key.is_ascii() {
            return Err(ApiError::InvalidKey);
        }
        let body = &key[KEY_PREFIX.len()..];
        let (id, rest) = body.split_at(ID_LEN);
        let (secret, check) = rest.split_at(SECRET_LEN);
        let id_ok = KeyId::is_valid(id);
        let secret_ok = secret.bytes().all(|b| b.is_ascii_alphanumeric());
        if !id_ok
            || !secret_ok
            || checksum(id, secret)
                .as_bytes()
                .ct_eq(check.as_bytes())
                .unwrap_u8()
                != 1
        {
            return Err(ApiError::InvalidKey);
        }
        Ok(PresentedKey {
            id: id.parse().map_err(|_| ApiError::InvalidKey)?,
            secret: secret.to_owned(),
            mode,
        })
    }

    /// The value stored for this key: SHA-256 over id and secret, hex.
    pub fn hash(&self) -> String {
        secret_hash(self.id.as_str(), &self.secret)
    }
}

/// A freshly minted key: the full text is shown to the caller once and never stored.
pub struct NewKey {
    pub id: KeyId,
    pub full: String,
    pub hash: String,
}

impl NewKey {
    pub fn generate() -> NewKey {
        let mut rng = rand::rng();
        let id = KeyId::generate();
        let secret: String = (0..SECRET_LEN)
            .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
            .collect();
        let full = compose_key(id.as_str(), &secret);
        let hash = secret_hash(id.as_str(), &secret);
        NewKey { id, full, hash }
    }
}

/// The text of a key from its id and secret, with the checksum that makes it well formed.
pub fn compose_key(id: &str, secret: &str) -> String {
    format!("{KEY_PREFIX}{id}{secret}{}", checksum(id, secret))
}

/// The public, loggable part of a key: `mk_` and its id.
pub fn key_prefix(id: &KeyId) -> String {
    format!("{KEY_PREFIX}{id}")
}

fn secret_hash(id: &str, secret: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"memory-sidecar key v1\0");
    hasher.update(id.as_bytes());
    hasher.update(b"\0");
    hasher.update(secret.as_bytes());
    hex::encode(hasher.finalize())
}

fn checksum(id: &str, secret: &str) -> String {
    let digest = Sha256::digest(format!("{id}{secret}").as_bytes());
    let mut value = u64::from_be_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"));
    (0..CHECK_LEN)
        .map(|_| {
            let c = BASE62[(value % 62) as usize] as char;
            value /= 62;
            c
        })
        .collect()
}

/// Constant-time equality of two hex hashes.
pub fn hashes_match(stored: &str, presented: &str) -> bool {
    stored.as_bytes().ct_eq(presented.as_bytes()).into()
}

/// The admin credential, held only as a hash so the secret is not kept in memory longer than
/// start-up needs it.
pub struct AdminKey {
    hash: [u8; 32],
}

impl fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminKey(<redacted>)")
    }
}

impl AdminKey {
    /// The admin key from `MEMORY_SIDECAR_ADMIN_KEY`, or from `<data-dir>/admin.key`, created
    /// with mode 0600 on first start. The log says where the key is, never what it is.
    pub fn load(data_dir: &Path) -> anyhow::Result<AdminKey> {
        if let Ok(text) = std::env::var(ADMIN_KEY_ENV) {
            tracing::info!("admin key taken from {ADMIN_KEY_ENV}");
            return AdminKey::new(text.trim()).context(ADMIN_KEY_ENV);
        }
        let path = data_dir.join("admin.key");
        let text = crate::fsio::secret_file(&path, "admin key", true, AdminKey::generate_text)?;
        AdminKey::new(text.trim()).with_context(|| format!("{}", path.display()))
    }

    pub fn new(secret: &str) -> anyhow::Result<AdminKey> {
        if secret.len() < MIN_ADMIN_KEY_LEN {
            anyhow::bail!("the admin key must be at least {MIN_ADMIN_KEY_LEN} characters");
        }
        if secret.starts_with(KEY_PREFIX) {
            anyhow::bail!(
                "the admin key must not start with {KEY_PREFIX:?}, which marks memory keys"
            );
        }
        Ok(AdminKey {
            hash: Sha256::digest(secret.as_bytes()).into(),
        })
    }

    /// Generates a fresh admin key text (64 base62 characters, ~380 bits).
    pub fn generate_text() -> String {
        let mut rng = rand::rng();
        (0..64)
            .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
            .collect()
    }

    pub fn matches(&self, presented: &str) -> bool {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        hash.ct_eq(&self.hash).into()
    }
}

/// Who a request is, once authenticated. Domain operations take this, never raw headers.
#[derive(Clone, Debug)]
pub enum Access {
    Admin,
    Memory(MemoryAccess),
}

/// A memory key's capability: its vault, its scopes, and what its mode allows.
#[derive(Clone, Debug)]
pub struct MemoryAccess {
    pub key_id: KeyId,
    pub vault: VaultId,
    pub scopes: Vec<Scope>,
    pub mode: Mode,
    /// Rotated, in its grace period: it still reads and writes, but manages no keys.
    pub deprecated: bool,
    /// When the key expires, if it does: no key it mints outlives it.
    pub expires_at_ms: Option<i64>,
    /// The key's default for requests with a session: see only that session's memories.
    pub session_isolation: bool,
}

impl MemoryAccess {
    /// Whether the key holds `scope` (its suffix aside).
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Refuses the call unless the key holds `scope`, whatever its suffix (prepare and ingest,
    /// where a suffix turns the operation off instead of refusing it).
    pub fn require_held(&self, scope: Scope) -> Result<(), ApiError> {
        if self.has_scope(scope) {
            Ok(())
        } else {
            self.require(scope)
        }
    }

    /// Refuses the call unless the key holds `scope` and its suffix leaves it in place.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if !self.has_scope(scope) {
            return Err(ApiError::ScopeRequired {
                scope,
                reason: "the key was not minted with it",
            });
        }
        if !self.mode.allows(scope) {
            return Err(ApiError::ScopeRequired {
                scope,
                reason: "the key's mode suffix (:read, :write or :off) leaves it out",
            });
        }
        Ok(())
    }
}

impl Access {
    /// Who acted, for the audit log: `admin` or a key id.
    pub fn actor(&self) -> String {
        match self {
            Access::Admin => "admin".to_owned(),
            Access::Memory(access) => access.key_id.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_hash_to_the_stored_value() {
        let key = NewKey::generate();
        assert_eq!(key.full.len(), KEY_LEN);
        let presented = PresentedKey::parse(&key.full).unwrap();
        assert_eq!(presented.id, key.id);
        assert_eq!(presented.mode, Mode::FULL);
        assert!(hashes_match(&key.hash, &presented.hash()));
    }

    #[test]
    fn suffixes_narrow_the_mode() {
        let key = NewKey::generate();
        let read = PresentedKey::parse(&format!("{}:read", key.full)).unwrap();
        assert_eq!(
            read.mode,
            Mode {
                retrieve: true,
                store: false
            }
        );
        let write = PresentedKey::parse(&format!("{}:write", key.full)).unwrap();
        assert_eq!(
            write.mode,
            Mode {
                retrieve: false,
                store: true
            }
        );
        let off = PresentedKey::parse(&format!("{}:off", key.full)).unwrap();
        assert_eq!(off.mode.label(), "off");
        assert!(PresentedKey::parse(&format!("{}:admin", key.full)).is_err());
    }

    #[test]
    fn a_mistyped_key_fails_its_checksum() {
        let key = NewKey::generate();
        let mut chars: Vec<char> = key.full.chars().collect();
        let at = KEY_PREFIX.len() + ID_LEN + 3;
        chars[at] = if chars[at] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        assert!(matches!(
            PresentedKey::parse(&typo),
            Err(ApiError::InvalidKey)
        ));
        assert!(matches!(
            PresentedKey::parse("mk_short"),
            Err(ApiError::InvalidKey)
        ));
        assert!(matches!(PresentedKey::parse(""), Err(ApiError::InvalidKey)));
        let non_ascii = format!("{}é", &key.full[..KEY_LEN - 2]);
        assert!(PresentedKey::parse(&non_ascii).is_err());
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let key = NewKey::generate();
        let presented = PresentedKey::parse(&key.full).unwrap();
        let secret = &key.full[KEY_PREFIX.len() + ID_LEN..KEY_PREFIX.len() + ID_LEN + SECRET_LEN];
        assert!(!format!("{presented:?}").contains(secret));
    }

    #[test]
    fn suffixes_narrow_scopes_and_never_widen_them() {
        let access = |scopes: &[Scope], suffix: &str| {
            let key = NewKey::generate();
            MemoryAccess {
                key_id: key.id.clone(),
                vault: VaultId::generate(),
                scopes: scopes.to_vec(),
                mode: PresentedKey::parse(&format!("{}{suffix}", key.full))
                    .unwrap()
                    .mode,
                deprecated: false,
                expires_at_ms: None,
                session_isolation: false,
            }
        };
        let full = access(&Scope::ALL, "");
        assert!(Scope::ALL.iter().all(|s| full.require(*s).is_ok()));
        let read = access(&Scope::ALL, ":read");
        assert!(read.require(Scope::Read).is_ok());
        for scope in [Scope::Write, Scope::Delete, Scope::Admin] {
            assert_eq!(
                read.require(scope).err().unwrap().code(),
                format!("{}_scope_required", scope.as_str())
            );
        }
        let write_only = access(&[Scope::Write], ":read");
        assert!(write_only.require(Scope::Read).is_err());
        assert!(write_only.require(Scope::Write).is_err());
        let off = access(&Scope::ALL, ":off");
        assert!(Scope::ALL.iter().all(|s| off.require(*s).is_err()));
    }

    #[test]
    fn admin_key_bounds_and_matching() {
        assert!(AdminKey::new("short").is_err());
        let text = AdminKey::generate_text();
        let admin = AdminKey::new(&text).unwrap();
        assert!(admin.matches(&text));
        assert!(!admin.matches("x"));
    }
}
