//! Encryption at rest: a data key per vault, wrapped by the operator's master key.
//!
//! Every memory's text and every vector is sealed with its vault's data key (XChaCha20-Poly1305,
//! a random 192-bit nonce per value, the vault and memory id as associated data, so a value
//! cannot be moved to another slot or vault). Data keys live in the keyring file, one fixed
//! 128-byte slot each, wrapped by the master key. Erasing a vault overwrites its slot in place
//! and fsyncs it: the old ciphertext that sled's log segments may still hold can then no longer
//! be read by anyone, the holder of the master key and every file included.
//!
//! Here, the master key and a vault's cipher; the keyring file is [`keyring`].

mod keyring;

use std::path::Path;

use anyhow::{bail, Context};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use self::keyring::{master_check, new_wrapped_key, unwrap_key, verify_master_check, Keyring};

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes added to every sealed value: the nonce in front, the tag behind.
pub const SEALED_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const KEY_LEN: usize = 32;

/// What a sealed value is, bound into its associated data.
#[derive(Clone, Copy)]
pub enum Purpose {
    Memory = 1,
    Vector = 2,
}

/// The variable that gives the master key itself, winning over its file.
pub const MASTER_KEY_ENV: &str = "MEMORY_SIDECAR_MASTER_KEY";

/// The operator's 256-bit master key. Never logged; dropped keys are not zeroed
/// (docs/operations.md).
pub struct MasterKey([u8; KEY_LEN]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// The master key from `MEMORY_SIDECAR_MASTER_KEY`, or from `file`, created with mode 0600
    /// on first start only: once `keyring` exists, a missing master key is an error, never a
    /// new key (which could not open the vaults sealed under the old one).
    pub fn load(file: &Path, keyring: &Path) -> anyhow::Result<MasterKey> {
        if let Ok(text) = std::env::var(MASTER_KEY_ENV) {
            tracing::info!("master key taken from {MASTER_KEY_ENV}");
            return MasterKey::from_hex(&text).context(MASTER_KEY_ENV);
        }
        let first_start = !keyring.exists();
        let text =
            crate::fsio::secret_file(file, "master key", first_start, MasterKey::generate_hex)
                .with_context(|| {
                    format!(
                        "the keyring {} exists, so its master key is needed: restore {} or set \
                         {MASTER_KEY_ENV}",
                        keyring.display(),
                        file.display()
                    )
                })?;
        MasterKey::from_hex(&text).with_context(|| format!("{}", file.display()))
    }

    /// The master key from `MEMORY_SIDECAR_MASTER_KEY`, or from `file`, never generated: for a
    /// node of a fleet, which must use the key the shared store was made with.
    pub fn load_existing(file: &Path) -> anyhow::Result<MasterKey> {
        if let Ok(text) = std::env::var(MASTER_KEY_ENV) {
            tracing::info!("master key taken from {MASTER_KEY_ENV}");
            return MasterKey::from_hex(&text).context(MASTER_KEY_ENV);
        }
        let text = crate::fsio::secret_file(file, "master key", false, MasterKey::generate_hex)
            .with_context(|| {
                format!(
                    "a store shared by a fleet needs the fleet's master key on every node, never \
                     one of its own: set {MASTER_KEY_ENV} or put it in {} (64 hex digits; for \
                     a new fleet, `openssl rand -hex 32`)",
                    file.display()
                )
            })?;
        MasterKey::from_hex(&text).with_context(|| format!("{}", file.display()))
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> anyhow::Result<MasterKey> {
        let mut key = [0u8; KEY_LEN];
        hex::decode_to_slice(text.trim(), &mut key)
            .map_err(|_| anyhow::anyhow!("a master key is 64 hex digits (256 bits)"))?;
        Ok(MasterKey(key))
    }

    pub fn generate_hex() -> String {
        hex::encode(rand::random::<[u8; KEY_LEN]>())
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }
}

/// One vault's data key, ready to seal and open values, and to key its dedup digests.
pub struct VaultCipher {
    aead: XChaCha20Poly1305,
    digest_key: [u8; KEY_LEN],
}

impl VaultCipher {
    pub fn new(data_key: &[u8; KEY_LEN]) -> VaultCipher {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(data_key).expect("any key length");
        mac.update(b"memory-sidecar dedup digest key");
        VaultCipher {
            aead: XChaCha20Poly1305::new(data_key.into()),
            digest_key: mac.finalize().into_bytes().into(),
        }
    }

    /// Seals `plain` as `nonce ++ ciphertext ++ tag`, bound to `purpose` and `slot`.
    pub fn seal(&self, purpose: Purpose, slot: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let aad = associated_data(purpose, slot);
        let sealed = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory sizes");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a value sealed by [`VaultCipher::seal`] for the same purpose and slot.
    pub fn open(&self, purpose: Purpose, slot: &[u8], sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        if sealed.len() < SEALED_OVERHEAD {
            bail!("sealed value of {} bytes is too short", sealed.len());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let aad = associated_data(purpose, slot);
        self.aead
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: &aad,
                },
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "a sealed value failed authentication (corrupt, or sealed by another key)"
                )
            })
    }

    /// A keyed digest of `parts` (length-prefixed), meaningless once the data key is gone.
    pub fn digest(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.digest_key).expect("any key length");
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

fn associated_data(purpose: Purpose, slot: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(1 + slot.len());
    aad.push(purpose as u8);
    aad.extend_from_slice(slot);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_open_only_in_their_own_slot_and_purpose() {
        let cipher = VaultCipher::new(&[7u8; 32]);
        let sealed = cipher.seal(Purpose::Memory, b"slot-a", b"hello");
        assert_eq!(
            cipher.open(Purpose::Memory, b"slot-a", &sealed).unwrap(),
            b"hello"
        );
        assert!(cipher.open(Purpose::Memory, b"slot-b", &sealed).is_err());
        assert!(cipher.open(Purpose::Vector, b"slot-a", &sealed).is_err());
        let other = VaultCipher::new(&[8u8; 32]);
        assert!(other.open(Purpose::Memory, b"slot-a", &sealed).is_err());
        assert!(cipher
            .open(Purpose::Memory, b"slot-a", &sealed[..10])
            .is_err());
    }

    #[test]
    fn digests_depend_on_the_data_key() {
        let (a, b) = (VaultCipher::new(&[1; 32]), VaultCipher::new(&[2; 32]));
        assert_eq!(a.digest(&[b"x", b"y"]), a.digest(&[b"x", b"y"]));
        assert_ne!(a.digest(&[b"x", b"y"]), b.digest(&[b"x", b"y"]));
        assert_ne!(a.digest(&[b"xy", b""]), a.digest(&[b"x", b"y"]));
    }
}
