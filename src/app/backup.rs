//! The operator's safety net: an online backup, the restore of one (with the tombstones
//! recorded since applied, so erasures and revocations survive it), and the consistency check
//! a restored or suspect data directory is put through.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;

use super::audit::Audited;
use super::{blocking, App};
use crate::auth::Access;
use crate::crypto::MasterKey;
use crate::error::ApiError;
use crate::ids::{KeyId, MemoryId, VaultId};
use crate::index::Indexes;
use crate::metrics::Metrics;
use crate::store::backup::{self, Manifest};
use crate::store::{Backend, SledOptions, SledStore};
use crate::tombstones::{Journal, Tombstone};

/// Problems listed by a check at most (the count goes on).
const MAX_PROBLEMS: usize = 100;
/// The longest backup name accepted.
const MAX_NAME_CHARS: usize = 128;
/// Records read per page by a check.
const CHECK_PAGE: usize = 1000;

/// What a check found.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub vaults: u64,
    pub keys: u64,
    pub memories: u64,
    pub vectors: u64,
    pub pending: u64,
    pub indexes_rebuilt: u64,
    pub tombstones: u64,
    pub seconds: f64,
    /// How many problems were found; the first [`MAX_PROBLEMS`] are listed.
    pub problem_count: u64,
    pub problems: Vec<String>,
}

impl CheckReport {
    fn problem(&mut self, problem: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(problem);
        }
    }
}

/// What a restore did.
#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub manifest: Manifest,
    /// The journal applied; `None` with `--without-tombstones` (the restore holds what the
    /// backup held).
    pub tombstone_log: Option<PathBuf>,
    /// Whether the journal is the one the backup counted in (else every entry was applied).
    pub journal_matches: Option<bool>,
    /// Entries applied (newer than the backup), and what applying them did.
    #[serde(flatten)]
    pub applied: Applied,
}

/// Tombstones applied, and what applying them did.
#[derive(Debug, Default, Serialize)]
pub struct Applied {
    pub tombstones_applied: u64,
    pub vaults_erased: u64,
    pub vaults_emptied: u64,
    pub memories_deleted: u64,
    pub keys_revoked: u64,
}

/// A backup taken: where, and its manifest.
#[derive(Debug, Serialize)]
pub struct Taken {
    pub path: PathBuf,
    #[serde(flatten)]
    pub manifest: Manifest,
}

impl App {
    /// Takes a backup into `<--backup-dir>/<name>` (a new directory; the name defaults to
    /// the time) while serving: writes pause only while the copy is made consistent
    /// (`writes_paused_ms` in the manifest), reads go on.
    pub async fn backup(
        self: &Arc<Self>,
        access: &Access,
        name: Option<String>,
    ) -> Result<Taken, ApiError> {
        let mut audited = Audited::default();
        let result = self.backup_inner(name).await;
        if let Ok(taken) = &result {
            audited.detail.insert(
                "memories".into(),
                Value::from(taken.manifest.counts.memories),
            );
            audited.detail.insert(
                "writes_paused_ms".into(),
                Value::from(taken.manifest.writes_paused_ms),
            );
        }
        self.audit(access, "backup", audited, result).await
    }

    async fn backup_inner(self: &Arc<Self>, name: Option<String>) -> Result<Taken, ApiError> {
        if matches!(
            self.config.store,
            crate::config::StoreConfig::Postgres { .. }
        ) {
            return Err(ApiError::invalid(
                "this node's store is PostgreSQL, which is backed up by PostgreSQL itself \
                 (pg_basebackup, WAL archiving): see docs/fleet.md",
            ));
        }
        let name = match name {
            Some(name) => check_backup_name(&name)?,
            None => format!("backup-{}", compact_time(self.now_ms())),
        };
        let path = self.config.backup_dir.join(&name);
        if path.exists() {
            return Err(ApiError::invalid(format!(
                "a backup named {name:?} exists already: choose another `name`"
            )));
        }
        let app = self.clone();
        blocking(move || {
            let started = Instant::now();
            let manifest = app
                .store
                .backup_to(
                    &path,
                    &|| (app.tombstones.id().to_owned(), app.tombstones.last_seq()),
                    app.now_ms(),
                )
                .map_err(|error| {
                    tracing::error!(error = %format!("{error:#}"), to = %path.display(), "backup failed");
                    ApiError::BackupFailed(format!("{error:#}"))
                })?;
            tracing::info!(
                to = %path.display(),
                memories = manifest.counts.memories,
                writes_paused_ms = manifest.writes_paused_ms,
                seconds = started.elapsed().as_secs_f64(),
                "backup written"
            );
            Ok(Taken { path, manifest })
        })
        .await
    }

    /// Checks the store: every vault has its data key, every record and vector opens with it,
    /// every vector and pending mark belongs to a memory, every key to a vault, and every
    /// vault's index rebuilds from the store. Reads only.
    pub async fn check(self: &Arc<Self>) -> Result<CheckReport, ApiError> {
        let app = self.clone();
        blocking(move || {
            app.check_blocking()
                .map_err(|error| ApiError::Internal(error.context("checking the store")))
        })
        .await
    }

    pub fn check_blocking(&self) -> anyhow::Result<CheckReport> {
        let started = Instant::now();
        let store = self.store.as_ref();
        let mut report = CheckReport::default();
        let indexes = Arc::new(Indexes::new(usize::MAX, usize::MAX));
        let vaults = store.vaults()?;
        report.vaults = vaults.len() as u64;
        for (vault, record) in &vaults {
            let vault = *vault;
            // Held while the vault is compared with its rebuilt index: the indexer writes
            // vectors under the lock shared, so none lands between the two reads.
            let lock = self.locks.of(vault);
            let _exclusive = lock.blocking_write();
            if record.erasing {
                report.problem(format!("vault {vault}: an erasure is not finished"));
            }
            let Some(cipher) = store.cipher(vault) else {
                report.problem(format!("vault {vault}: no data key in the keyring"));
                continue;
            };
            let mut memories = std::collections::HashSet::new();
            let mut cursor = None;
            loop {
                match store.memories_page(vault, &cipher, cursor, CHECK_PAGE, &mut |_| true) {
                    Ok((page, next)) => {
                        memories.extend(page.into_iter().map(|(id, _)| id));
                        match next {
                            Some(next) => cursor = Some(next),
                            None => break,
                        }
                    }
                    Err(error) => {
                        report.problem(format!("vault {vault}: a memory does not open: {error:#}"));
                        break;
                    }
                }
            }
            report.memories += memories.len() as u64;
            match store.vault_vectors(vault, &cipher) {
                Ok(vectors) => {
                    report.vectors += vectors.len() as u64;
                    for (id, _, _) in &vectors {
                        if !memories.contains(id) {
                            report.problem(format!("vault {vault}: vector {id} has no memory"));
                        }
                    }
                    match indexes.with_index(store, vault, &cipher, |index| index.len()) {
                        Ok(len) if len == vectors.len() => report.indexes_rebuilt += 1,
                        Ok(len) => report.problem(format!(
                            "vault {vault}: the index rebuilt with {len} entries, the store holds {} vectors",
                            vectors.len()
                        )),
                        Err(error) => {
                            report.problem(format!("vault {vault}: the index does not rebuild: {error:#}"))
                        }
                    }
                    indexes.forget(vault);
                }
                Err(error) => {
                    report.problem(format!("vault {vault}: a vector does not open: {error:#}"))
                }
            }
        }
        let known: std::collections::HashSet<VaultId> = vaults.iter().map(|(v, _)| *v).collect();
        let mut after = None;
        loop {
            let batch = store.pending_after(after, CHECK_PAGE)?;
            let Some(last) = batch.last().copied() else {
                break;
            };
            for (vault, id) in batch {
                report.pending += 1;
                if !known.contains(&vault) || !store.contains_memory(vault, id)? {
                    report.problem(format!("vault {vault}: pending mark {id} has no memory"));
                }
            }
            after = Some(last);
        }
        let mut after: Option<KeyId> = None;
        loop {
            let (page, next) = store.keys_page(after.as_ref(), CHECK_PAGE, &mut |_| true)?;
            for key in page {
                report.keys += 1;
                if !known.contains(&key.vault) && key.revoked_at_ms.is_none() {
                    report.problem(format!(
                        "key {}: its vault {} does not exist and it is not revoked",
                        key.id, key.vault
                    ));
                }
            }
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        report.tombstones = self.tombstones.last_seq();
        report.ok = report.problem_count == 0;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// A backup's name: one path segment of letters, digits, `.`, `_` and `-`, not starting with a
/// dot.
fn check_backup_name(name: &str) -> Result<String, ApiError> {
    let fine = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !fine {
        return Err(ApiError::invalid(format!(
            "`name` must be 1 to {MAX_NAME_CHARS} letters, digits, `.`, `_` or `-`, not \
             starting with `.` (it names a directory under --backup-dir)"
        )));
    }
    Ok(name.to_owned())
}

/// `20261202T040100Z` for a time in milliseconds.
fn compact_time(ms: i64) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second()
    )
}

/// Restores the backup in `from` into `data_dir` (new or empty), then applies every entry of
/// the tombstone journal at `tombstone_log` newer than the backup (every entry, if the journal
/// is not the one the backup counted in). `None` restores what the backup holds, erasures since
/// included: the caller asked for that in words. The journal is read first, the store is
/// restored beside `data_dir` and renamed into place once the tombstones are applied, so a
/// restore that fails leaves nothing that would start. The caller then checks the result
/// (`App::check_blocking`) by opening it as the daemon would.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    tombstone_log: Option<&Path>,
    master_key_file: &Path,
    now_ms: i64,
) -> anyhow::Result<RestoreReport> {
    let manifest = backup::verify(from)?;
    let journal = match tombstone_log {
        Some(path) => Some(Journal::read(path)?.with_context(|| {
            format!(
                "no tombstone journal at {}: name the daemon's journal with --tombstone-log (it \
                 records the erasures and revocations since the backup), or pass \
                 --without-tombstones to restore what the backup holds, erased vaults and \
                 revoked keys included",
                path.display()
            )
        })?),
        None => None,
    };
    if std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        bail!(
            "{} is not empty: choose a new directory",
            data_dir.display()
        );
    }
    let partial = data_dir.with_extension("restoring");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| {
            format!(
                "removing {} (an earlier restore cut short)",
                partial.display()
            )
        })?;
    }
    let mut report = RestoreReport {
        tombstone_log: tombstone_log.map(Path::to_owned),
        journal_matches: journal
            .as_ref()
            .map(|(header, _)| header.journal == manifest.tombstones_journal),
        applied: Applied::default(),
        manifest,
    };
    backup::restore_files(from, &report.manifest, &partial)?;
    // The master key file's default is beside the data; a restore reads it from where the
    // daemon keeps it, never makes a new one.
    let master = MasterKey::load(master_key_file, &partial.join("keyring"))?;
    let options = SledOptions {
        data_dir: partial.clone(),
        cache_bytes: 64 << 20,
        accept_lost_commits: false,
    };
    let store = SledStore::open(&options, &master, Metrics::new()?)
        .context("opening the restored store (is this the master key of the backup?)")?;
    if let Some((header, entries)) = journal {
        // Entries up to the backup's place are in it, if it counted in this journal.
        let since = if header.journal == report.manifest.tombstones_journal {
            report.manifest.tombstones_seq
        } else {
            tracing::warn!(
                journal = %header.journal,
                backup = %report.manifest.tombstones_journal,
                "the tombstone journal is not the one the backup counted in: applying every entry"
            );
            0
        };
        for entry in entries.into_iter().filter(|entry| entry.seq > since) {
            report.applied.tombstones_applied += 1;
            apply(&store, &entry.tombstone, now_ms, &mut report.applied)
                .with_context(|| format!("applying tombstone {}", entry.seq))?;
        }
    }
    use crate::store::Durability;
    store.close()?;
    drop(store);
    std::fs::rename(&partial, data_dir)
        .with_context(|| format!("moving {} to {}", partial.display(), data_dir.display()))?;
    crate::fsio::sync_parent(data_dir)?;
    Ok(report)
}

/// Applies to a store shared by a fleet, restored by PostgreSQL (a base backup, or recovery to
/// a point in time), the tombstones its nodes' journals hold from `since_ms` on (the moment
/// the restore goes back to): what was erased or revoked after it stays erased or revoked.
/// Every step is idempotent, so a journal applied twice does no harm. Run it before any node
/// serves the restored database.
pub fn apply_tombstones(
    store: &dyn Backend,
    journals: &[PathBuf],
    since_ms: i64,
    now_ms: i64,
) -> anyhow::Result<Applied> {
    let mut entries = Vec::new();
    for path in journals {
        let Some((_, read)) = Journal::read(path)? else {
            bail!("no tombstone journal at {}", path.display());
        };
        entries.extend(read.into_iter().filter(|entry| entry.at_ms >= since_ms));
    }
    // The nodes' journals interleaved in time, so that a key's revocation and its later
    // replacement apply in the order they happened.
    entries.sort_by_key(|entry| entry.at_ms);
    let mut applied = Applied::default();
    for entry in entries {
        applied.tombstones_applied += 1;
        apply(store, &entry.tombstone, now_ms, &mut applied)
            .with_context(|| format!("applying the tombstone of {}", entry.at_ms))?;
    }
    Ok(applied)
}

fn apply(
    store: &dyn Backend,
    tombstone: &Tombstone,
    now_ms: i64,
    report: &mut Applied,
) -> anyhow::Result<()> {
    match tombstone {
        Tombstone::VaultErased { vault } | Tombstone::VaultEmptied { vault } => {
            let removing = matches!(tombstone, Tombstone::VaultErased { .. });
            let vault: VaultId = vault.parse().context("a vault id")?;
            if let Some(mut record) = store.vault(vault)? {
                // Marked first, as the daemon does: an erasure always runs on a marked vault.
                record.erasing = true;
                record.removing = removing;
                store.set_vault(vault, &record)?;
                store.erase_vault(vault, removing, now_ms)?;
                if removing {
                    report.vaults_erased += 1;
                } else {
                    report.vaults_emptied += 1;
                }
            }
        }
        Tombstone::MemoriesDeleted { vault, memories } => {
            let vault: VaultId = vault.parse().context("a vault id")?;
            if let Some(cipher) = store.cipher(vault) {
                let ids = memories
                    .iter()
                    .map(|id| id.parse::<MemoryId>().context("a memory id"))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let (deleted, _) = store.delete_memories(vault, &cipher, &ids)?;
                report.memories_deleted += deleted.len() as u64;
            }
        }
        Tombstone::KeyRevoked {
            key,
            effective_at_ms,
        } => {
            let id: KeyId = key.parse().context("a key id")?;
            let at = *effective_at_ms;
            let mut changed = false;
            store.update_key(&id, &mut |record| {
                if at <= now_ms {
                    if record.revoked_at_ms.is_none_or(|revoked| revoked > at) {
                        record.revoked_at_ms = Some(at);
                        changed = true;
                    }
                } else if record.auto_revoke_at_ms.is_none_or(|ends| ends > at) {
                    record.auto_revoke_at_ms = Some(at);
                    changed = true;
                }
            })?;
            if changed {
                report.keys_revoked += 1;
            }
        }
    }
    Ok(())
}
