//! The keyring file: a header that proves the master key, then one fixed 128-byte slot per
//! vault holding its data key wrapped by the master key.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{bail, Context};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use super::{MasterKey, VaultCipher, KEY_LEN, NONCE_LEN, TAG_LEN};
use crate::fsio::sync_parent;
use crate::ids::VaultId;

const SLOT_LEN: usize = 128;
const MAGIC: &[u8; 16] = b"MSIDECAR-KEYRING";
const FORMAT: u8 = 1;
const HEADER_AAD: &[u8] = b"memory-sidecar keyring check v1";
const SLOT_AAD: &[u8] = b"memory-sidecar vault key v1";
const SLOT_USED: u8 = 1;

struct Slots {
    by_vault: HashMap<VaultId, (usize, Arc<VaultCipher>)>,
    free: Vec<usize>,
    len: usize,
}

/// The keyring file: a header that proves the master key, then one slot per vault.
///
/// A slot write is one 128-byte `pwrite` inside a 512-byte sector, then `fdatasync`: it is
/// either the old slot or the new one after a crash. Slots are overwritten in place, never
/// appended as new versions, so a replaced data key leaves no copy in this file.
pub struct Keyring {
    path: PathBuf,
    master: XChaCha20Poly1305,
    file: Mutex<File>,
    slots: RwLock<Slots>,
    /// Runs between a slot's write and its fsync (tests that stall an fsync).
    #[cfg(test)]
    before_sync: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl Keyring {
    /// Opens the keyring at `path`, creating it when `create` is set and it does not exist.
    pub fn open(path: &Path, master: &MasterKey, create: bool) -> anyhow::Result<Keyring> {
        let exists = path.exists();
        if !exists && !create {
            bail!(
                "the keyring {} is missing, but the store holds vaults: without it no memory can \
                 be read. Restore it from backup",
                path.display()
            );
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening the keyring {}", path.display()))?;
        let cipher = master.cipher();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("reading the keyring {}", path.display()))?;
        if bytes.is_empty() {
            if !create {
                bail!(
                    "the keyring {} is empty, but the store holds vaults: their data keys are \
                     gone and no memory can be read. Restore the keyring from backup (a new, \
                     empty keyring is only made for a store without vaults)",
                    path.display()
                );
            }
            let header = header(&cipher);
            file.write_all_at(&header, 0)?;
            file.sync_all()?;
            sync_parent(path)?;
            bytes = header.to_vec();
        }
        let partial = bytes.len() % SLOT_LEN;
        if bytes.len() > SLOT_LEN && partial != 0 {
            // A slot appended when the disk filled up: never acknowledged, so dropped.
            tracing::warn!(
                bytes = partial,
                "the keyring ends in a partial slot (an interrupted write); dropping it"
            );
            bytes.truncate(bytes.len() - partial);
            file.set_len(bytes.len() as u64)?;
            file.sync_all()?;
        }
        check_header(&cipher, &bytes).with_context(|| format!("keyring {}", path.display()))?;
        let mut slots = Slots {
            by_vault: HashMap::new(),
            free: Vec::new(),
            len: bytes.len() / SLOT_LEN - 1,
        };
        for index in 0..slots.len {
            let at = (index + 1) * SLOT_LEN;
            let slot = &bytes[at..at + SLOT_LEN];
            match unwrap_slot(&cipher, slot) {
                Some((vault, data_key)) => {
                    slots
                        .by_vault
                        .insert(vault, (index, Arc::new(VaultCipher::new(&data_key))));
                }
                None if slot[0] == SLOT_USED => {
                    // Kept as it is, never reused: restored from backup, it may yet open a vault.
                    tracing::error!(
                        slot = index,
                        "a keyring slot failed authentication (corruption); its vault cannot be \
                         read. Restore the keyring from backup"
                    );
                }
                None => slots.free.push(index),
            }
        }
        // Reuse low slots first.
        slots.free.sort_unstable_by(|a, b| b.cmp(a));
        Ok(Keyring {
            path: path.to_owned(),
            master: cipher,
            file: Mutex::new(file),
            slots: RwLock::new(slots),
            #[cfg(test)]
            before_sync: Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.slots.read().expect("keyring lock").by_vault.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn vaults(&self) -> Vec<VaultId> {
        let slots = self.slots.read().expect("keyring lock");
        slots.by_vault.keys().copied().collect()
    }

    /// The vault's cipher, if the vault has a data key.
    pub fn cipher(&self, vault: VaultId) -> Option<Arc<VaultCipher>> {
        let slots = self.slots.read().expect("keyring lock");
        slots.by_vault.get(&vault).map(|(_, c)| c.clone())
    }

    /// Gives `vault` a fresh data key, durably. An existing key is overwritten in place: that
    /// is how a vault's contents are erased.
    ///
    /// Writers take the file lock for the whole change, the slot map's lock only for a moment
    /// before and after the write: a lookup never waits for an fsync.
    pub fn replace(&self, vault: VaultId) -> anyhow::Result<Arc<VaultCipher>> {
        let data_key: [u8; KEY_LEN] = rand::random();
        let slot_bytes = wrap_slot(&self.master, vault, &data_key);
        let cipher = Arc::new(VaultCipher::new(&data_key));
        let file = self.file.lock().expect("keyring file lock");
        // Only writers change the allocation, and they are serialised by the file lock.
        let index = {
            let slots = self.slots.read().expect("keyring lock");
            match slots.by_vault.get(&vault) {
                Some((index, _)) => *index,
                None => slots.free.last().copied().unwrap_or(slots.len),
            }
        };
        self.write_slot(&file, index, &slot_bytes)?;
        let mut slots = self.slots.write().expect("keyring lock");
        if index == slots.len {
            slots.len += 1;
        }
        slots.free.retain(|i| *i != index);
        slots.by_vault.insert(vault, (index, cipher.clone()));
        Ok(cipher)
    }

    /// Rewraps every data key of the keyring at `path` from the `old` master key to `new`,
    /// writing a new file beside it and renaming it over the old one (fsynced both), so a crash
    /// leaves one keyring or the other, whole. Refuses a keyring with a damaged slot (its
    /// vault's key could not be carried over). Returns the number of data keys. The keyring
    /// must not be open.
    pub fn rewrap(path: &Path, old: &MasterKey, new: &MasterKey) -> anyhow::Result<usize> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (old, new) = (old.cipher(), new.cipher());
        check_header(&old, &bytes)
            .with_context(|| format!("keyring {} (is this its master key?)", path.display()))?;
        let mut out = header(&new).to_vec();
        let mut keys = 0;
        for (index, slot) in bytes[SLOT_LEN..].chunks_exact(SLOT_LEN).enumerate() {
            match unwrap_slot(&old, slot) {
                Some((vault, data_key)) => {
                    out.extend_from_slice(&wrap_slot(&new, vault, &data_key));
                    keys += 1;
                }
                None if slot[0] == SLOT_USED => bail!(
                    "slot {index} of the keyring {} fails authentication: restore the keyring \
                     from backup before rewrapping",
                    path.display()
                ),
                None => out.extend_from_slice(&[0u8; SLOT_LEN]),
            }
        }
        let temporary = path.with_extension("rewrap");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .with_context(|| format!("creating {}", temporary.display()))?;
        std::io::Write::write_all(&mut file, &out)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
            .with_context(|| format!("replacing {}", path.display()))?;
        sync_parent(path)?;
        Ok(keys)
    }

    /// Destroys the vault's data key, durably: its slot is zeroed in place.
    pub fn remove(&self, vault: VaultId) -> anyhow::Result<()> {
        let file = self.file.lock().expect("keyring file lock");
        let Some((index, _)) = self
            .slots
            .read()
            .expect("keyring lock")
            .by_vault
            .get(&vault)
            .cloned()
        else {
            return Ok(());
        };
        self.write_slot(&file, index, &[0u8; SLOT_LEN])?;
        let mut slots = self.slots.write().expect("keyring lock");
        slots.by_vault.remove(&vault);
        slots.free.push(index);
        Ok(())
    }

    /// Writes one slot in place and fsyncs it, with the file lock held.
    fn write_slot(&self, file: &File, index: usize, bytes: &[u8; SLOT_LEN]) -> anyhow::Result<()> {
        file.write_all_at(bytes, ((index + 1) * SLOT_LEN) as u64)
            .context("writing a keyring slot")?;
        #[cfg(test)]
        if let Some(hook) = self.before_sync.lock().expect("hook lock").as_ref() {
            hook();
        }
        file.sync_data().context("fsync of the keyring")?;
        Ok(())
    }
}

/// A fresh data key for `vault`, wrapped by the master key exactly as a keyring slot holds
/// it, and its cipher: for a backend that keeps the wrapped keys in its own tables.
pub fn new_wrapped_key(master: &MasterKey, vault: VaultId) -> (Vec<u8>, Arc<VaultCipher>) {
    let data_key: [u8; KEY_LEN] = rand::random();
    let slot = wrap_slot(&master.cipher(), vault, &data_key);
    (slot.to_vec(), Arc::new(VaultCipher::new(&data_key)))
}

/// The cipher of a data key wrapped by [`new_wrapped_key`] for `vault`.
pub fn unwrap_key(
    master: &MasterKey,
    vault: VaultId,
    wrapped: &[u8],
) -> anyhow::Result<Arc<VaultCipher>> {
    if wrapped.len() != SLOT_LEN {
        bail!(
            "the wrapped data key of vault {vault} is {} bytes, not {SLOT_LEN}",
            wrapped.len()
        );
    }
    match unwrap_slot(&master.cipher(), wrapped) {
        Some((owner, data_key)) if owner == vault => Ok(Arc::new(VaultCipher::new(&data_key))),
        _ => bail!(
            "the data key of vault {vault} fails authentication: the master key is not the one \
             it was wrapped with, or the row is corrupt"
        ),
    }
}

/// A value that proves the master key (the keyring's header), for a backend to keep beside its
/// wrapped keys, so that a node started with another master key is refused at once.
pub fn master_check(master: &MasterKey) -> Vec<u8> {
    header(&master.cipher()).to_vec()
}

/// Whether `check`, made by [`master_check`], comes from this master key.
pub fn verify_master_check(master: &MasterKey, check: &[u8]) -> anyhow::Result<()> {
    check_header(&master.cipher(), check)
}

fn header(master: &XChaCha20Poly1305) -> [u8; SLOT_LEN] {
    let mut header = [0u8; SLOT_LEN];
    header[..16].copy_from_slice(MAGIC);
    header[16] = FORMAT;
    let nonce: [u8; NONCE_LEN] = rand::random();
    let tag = master
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &[],
                aad: HEADER_AAD,
            },
        )
        .expect("encrypting an empty message cannot fail");
    header[17..17 + NONCE_LEN].copy_from_slice(&nonce);
    header[17 + NONCE_LEN..17 + NONCE_LEN + TAG_LEN].copy_from_slice(&tag);
    header
}

fn check_header(master: &XChaCha20Poly1305, bytes: &[u8]) -> anyhow::Result<()> {
    if bytes.len() < SLOT_LEN || &bytes[..16] != MAGIC {
        bail!("not a memory-sidecar keyring (bad magic); restore it from backup");
    }
    if bytes[16] != FORMAT {
        bail!(
            "keyring format {} is not supported by this build",
            bytes[16]
        );
    }
    if !bytes.len().is_multiple_of(SLOT_LEN) {
        bail!(
            "the keyring is {} bytes, not a whole number of {SLOT_LEN}-byte slots: it was \
             truncated or garbled; restore it from backup",
            bytes.len()
        );
    }
    let nonce = &bytes[17..17 + NONCE_LEN];
    let tag = &bytes[17 + NONCE_LEN..17 + NONCE_LEN + TAG_LEN];
    master
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: tag,
                aad: HEADER_AAD,
            },
        )
        .map_err(|_| {
            anyhow::anyhow!(
                "the master key does not match this keyring (was MEMORY_SIDECAR_MASTER_KEY or the \
                 master key file changed?)"
            )
        })?;
    Ok(())
}

// Slot layout: [0] used flag, [1..17] vault id, [17..41] nonce, [41..89] wrapped key + tag.
fn wrap_slot(
    master: &XChaCha20Poly1305,
    vault: VaultId,
    data_key: &[u8; KEY_LEN],
) -> [u8; SLOT_LEN] {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut aad = SLOT_AAD.to_vec();
    aad.extend_from_slice(&vault.0);
    let wrapped = master
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: data_key,
                aad: &aad,
            },
        )
        .expect("wrapping a 32-byte key cannot fail");
    let mut slot = [0u8; SLOT_LEN];
    slot[0] = SLOT_USED;
    slot[1..17].copy_from_slice(&vault.0);
    slot[17..41].copy_from_slice(&nonce);
    slot[41..41 + wrapped.len()].copy_from_slice(&wrapped);
    slot
}

fn unwrap_slot(master: &XChaCha20Poly1305, slot: &[u8]) -> Option<(VaultId, [u8; KEY_LEN])> {
    if slot[0] != SLOT_USED {
        return None;
    }
    let vault = VaultId(slot[1..17].try_into().ok()?);
    let mut aad = SLOT_AAD.to_vec();
    aad.extend_from_slice(&vault.0);
    let key = master
        .decrypt(
            XNonce::from_slice(&slot[17..41]),
            Payload {
                msg: &slot[41..41 + KEY_LEN + TAG_LEN],
                aad: &aad,
            },
        )
        .ok()?;
    Some((vault, key.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Purpose;

    fn master() -> MasterKey {
        MasterKey::from_hex(&MasterKey::generate_hex()).unwrap()
    }

    #[test]
    fn the_keyring_survives_reopening_and_erases_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        let key = master();
        let (a, b) = (VaultId::generate(), VaultId::generate());
        let sealed = {
            let ring = Keyring::open(&path, &key, true).unwrap();
            let cipher = ring.replace(a).unwrap();
            ring.replace(b).unwrap();
            cipher.seal(Purpose::Memory, b"x", b"secret")
        };
        let before = std::fs::read(&path).unwrap();
        let ring = Keyring::open(&path, &key, false).unwrap();
        assert_eq!(ring.len(), 2);
        let cipher = ring.cipher(a).unwrap();
        assert_eq!(
            cipher.open(Purpose::Memory, b"x", &sealed).unwrap(),
            b"secret"
        );

        ring.replace(a).unwrap();
        let after = std::fs::read(&path).unwrap();
        assert_eq!(before.len(), after.len(), "a replaced key reuses its slot");
        assert_ne!(
            before[SLOT_LEN..2 * SLOT_LEN],
            after[SLOT_LEN..2 * SLOT_LEN]
        );
        assert!(ring
            .cipher(a)
            .unwrap()
            .open(Purpose::Memory, b"x", &sealed)
            .is_err());

        ring.remove(b).unwrap();
        drop(ring);
        let ring = Keyring::open(&path, &key, false).unwrap();
        assert!(ring.cipher(b).is_none());
        assert!(ring.cipher(a).is_some());
    }

    #[test]
    fn a_wrong_master_key_or_a_garbled_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        Keyring::open(&path, &master(), true).unwrap();
        let error = Keyring::open(&path, &master(), false).err().unwrap();
        assert!(format!("{error:#}").contains("does not match"));

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..50]).unwrap();
        assert!(Keyring::open(&path, &master(), false).is_err());
        assert!(Keyring::open(&dir.path().join("absent"), &master(), false).is_err());
    }

    #[test]
    fn a_partial_last_slot_is_dropped_and_a_corrupt_one_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        let key = master();
        let (a, b) = (VaultId::generate(), VaultId::generate());
        {
            let ring = Keyring::open(&path, &key, true).unwrap();
            ring.replace(a).unwrap();
            ring.replace(b).unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SLOT_LEN + 50] ^= 0xff; // corrupt a's slot
        bytes.extend_from_slice(&[1u8; 40]); // and a torn append
        std::fs::write(&path, &bytes).unwrap();
        let ring = Keyring::open(&path, &key, false).unwrap();
        assert!(ring.cipher(a).is_none());
        assert!(ring.cipher(b).is_some());
        assert_eq!(std::fs::read(&path).unwrap().len(), 3 * SLOT_LEN);
        let c = VaultId::generate();
        ring.replace(c).unwrap();
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after[SLOT_LEN..2 * SLOT_LEN], bytes[SLOT_LEN..2 * SLOT_LEN]);
        assert_eq!(after.len(), 4 * SLOT_LEN, "a new slot, not the corrupt one");
    }

    #[test]
    fn an_empty_keyring_is_refused_unless_a_new_one_may_be_made() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        let key = master();
        Keyring::open(&path, &key, true)
            .unwrap()
            .replace(VaultId::generate())
            .unwrap();
        std::fs::write(&path, b"").unwrap();
        let error = Keyring::open(&path, &key, false).err().unwrap();
        assert!(format!("{error:#}").contains("is empty"), "{error:#}");
        assert!(
            std::fs::read(&path).unwrap().is_empty(),
            "the file is left as found"
        );
        assert!(Keyring::open(&path, &key, true).unwrap().is_empty());
    }

    #[test]
    fn a_lookup_does_not_wait_for_another_vaults_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Arc::new(Keyring::open(&dir.path().join("keyring"), &master(), true).unwrap());
        let known = VaultId::generate();
        ring.replace(known).unwrap();
        // Stall the next fsync until the lookup below has answered (or a minute has passed).
        let (looked_up, wait_lookup) = std::sync::mpsc::channel::<()>();
        let (stalled, wait_stall) = std::sync::mpsc::channel::<()>();
        let wait_lookup = Mutex::new(wait_lookup);
        *ring.before_sync.lock().unwrap() = Some(Box::new(move || {
            let _ = stalled.send(());
            let _ = wait_lookup
                .lock()
                .unwrap()
                .recv_timeout(std::time::Duration::from_secs(60));
        }));
        let writer = {
            let ring = ring.clone();
            std::thread::spawn(move || ring.replace(VaultId::generate()).unwrap())
        };
        wait_stall.recv().unwrap();
        let (answer, answered) = std::sync::mpsc::channel();
        let reader = {
            let ring = ring.clone();
            std::thread::spawn(move || answer.send(ring.cipher(known).is_some()).unwrap())
        };
        let found = answered.recv_timeout(std::time::Duration::from_secs(30));
        looked_up.send(()).unwrap();
        assert_eq!(found, Ok(true), "the lookup waited for the stalled fsync");
        writer.join().unwrap();
        reader.join().unwrap();
        *ring.before_sync.lock().unwrap() = None;
        assert_eq!(ring.len(), 2);
    }
}
