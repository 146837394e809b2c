//! The fleet backend: the system of record in PostgreSQL, shared by every node.
//!
//! Rows hold what sled's trees hold, sealed the same way (the same associated data, so a value
//! means the same in both): `keys` (hashes only), `vaults` (each with its data key wrapped by
//! the master key, its key generation, and its version), `memories` (sealed, with the keyed
//! dedup digest), `vectors` (sealed vector + index metadata, with the vault version that wrote
//! them), `pending` (with the node that holds its lease), `unembeddable`, `audit`, `meta`.
//!
//! What makes several nodes one store:
//! - **Every write is its own transaction, committed before the method returns**
//!   (`synchronous_commit=on`; with a synchronous standby, on two machines). `commit` has
//!   nothing left to do.
//! - **A vault's row orders its writes.** Every change to a vault's vectors or memories
//!   updates its row in the same transaction (`version`, and `removals` when something left):
//!   the row lock makes the versions commit in order, so a node that has read a vault's vectors
//!   up to version `v` brings its index up to date with the rows above `v`, and reloads it when
//!   `removals` moved. The version reaches the node in the query that authenticates a key
//!   ([`Keys::key`] joins the vault), so freshness costs no round trip of its own.
//! - **Data keys have generations.** Emptying a vault replaces its data key and bumps
//!   `key_gen` in the transaction that deletes its rows; every write checks, under the vault
//!   row's lock, that it seals with the current generation, so no node writes a row that no
//!   key opens.
//! - **Pending rows are leased.** The node that stores a memory holds its lease and embeds it;
//!   a lease not renewed (the node died) lets any node claim the row
//!   (`FOR UPDATE SKIP LOCKED`).
//!
//! Errors that mean the database is away (a lost connection, a server starting, stopping or
//! failing over, an exhausted pool) are [`DatabaseUnavailable`]: answered 503 with
//! `Retry-After`, never sticky. The store never turns unhealthy: once the database is back,
//! the pool connects again (to whichever host is the primary, with
//! `target_session_attrs=read-write`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use super::backup::{Manifest, Snapshots};
use super::keys::{KeyPage, Keys};
use super::memories::{digest, open_record, Memories};
use super::records::{
    AuditEntry, KeyRecord, MemoryPage, MemoryRecord, NewMemory, Removed, VaultRecord, VaultVersion,
};
use super::sled::{memory_key, Writing};
use super::vectors::{open_vector, seal_vector, VectorItem, Vectors};
use super::{Audit, CommitFuture, Durability, Vaults};
use crate::crypto::{
    master_check, new_wrapped_key, unwrap_key, verify_master_check, MasterKey, Purpose, VaultCipher,
};
use crate::error::DatabaseUnavailable;
use crate::ids::{KeyId, MemoryId, VaultId};

/// The schema this build creates and reads. A database with a newer one is refused.
const SCHEMA_VERSION: i64 = 1;
/// Serialises the migrations of nodes starting together (`pg_advisory_xact_lock`).
const MIGRATION_LOCK: i64 = 0x6d73_6964_6563_6172;
/// Rows read per round trip when a page filters as it goes.
const SCAN_CHUNK: i64 = 512;
/// Vaults whose ciphers and versions a node keeps at most (about 150 bytes each).
const MAX_CACHED_VAULTS: usize = 1_000_000;

const SCHEMA: &str = r#"
CREATE TABLE meta (name text PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE vaults (
    id bytea PRIMARY KEY,
    record text NOT NULL,
    data_key bytea,
    key_gen bigint NOT NULL DEFAULT 1,
    version bigint NOT NULL DEFAULT 0,
    removals bigint NOT NULL DEFAULT 0
);
CREATE TABLE keys (
    id text PRIMARY KEY,
    vault bytea NOT NULL,
    record text NOT NULL,
    last_used_ms bigint
);
CREATE INDEX keys_by_vault ON keys (vault, id);
CREATE SEQUENCE memory_ids;
CREATE TABLE memories (
    vault bytea NOT NULL,
    id bigint NOT NULL,
    sealed bytea NOT NULL,
    digest bytea NOT NULL,
    superseded boolean NOT NULL DEFAULT false,
    PRIMARY KEY (vault, id),
    UNIQUE (vault, digest)
);
CREATE TABLE vectors (
    vault bytea NOT NULL,
    id bigint NOT NULL,
    seq bigint NOT NULL,
    sealed bytea NOT NULL,
    PRIMARY KEY (vault, id),
    FOREIGN KEY (vault, id) REFERENCES memories ON DELETE CASCADE
);
CREATE INDEX vectors_by_seq ON vectors (vault, seq);
CREATE TABLE pending (
    vault bytea NOT NULL,
    id bigint NOT NULL,
    owner bytea,
    lease_until timestamptz,
    PRIMARY KEY (vault, id),
    FOREIGN KEY (vault, id) REFERENCES memories ON DELETE CASCADE
);
CREATE TABLE unembeddable (
    vault bytea NOT NULL,
    id bigint NOT NULL,
    PRIMARY KEY (vault, id),
    FOREIGN KEY (vault, id) REFERENCES memories ON DELETE CASCADE
);
CREATE TABLE audit (seq bigserial PRIMARY KEY, entry text NOT NULL);
"#;

/// Where the fleet backend's database is, and how the pool reaches it.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// libpq's connection string or URL (several hosts, `target_session_attrs=read-write`).
    pub url: String,
    /// Connections at most.
    pub pool_size: usize,
    /// How long a connection attempt, or a wait for a free connection, may take.
    pub connect_timeout: Duration,
    /// How long one statement may run (PostgreSQL's `statement_timeout`).
    pub statement_timeout: Duration,
    /// How long a node's claim on a pending memory lasts without being renewed: after it, a
    /// memory whose node died is embedded by another.
    pub lease: Duration,
}

/// The fleet backend (see the module).
pub struct PgStore {
    /// Runs the pool's connections; dropped in the background (see `Drop`).
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    master: MasterKey,
    /// This process, as the owner of the pending rows it leases.
    node: [u8; 16],
    /// Ciphers of the vaults this node has used, with their data key's generation.
    ciphers: RwLock<HashMap<VaultId, (i64, Arc<VaultCipher>)>>,
    /// Each vault's version as the last authentication of one of its keys read it.
    versions: Mutex<HashMap<VaultId, VaultVersion>>,
    /// Held shared by writes, as sled's (`Snapshots::hold_writes`); nothing takes it
    /// exclusively here: PostgreSQL's own backups are consistent without it.
    gate: parking_lot::RwLock<()>,
    /// Where the database is, without the password, for messages.
    location: String,
    /// `PgOptions::lease`, as SQL (`now() + interval '...'`).
    lease: String,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // A runtime may not be dropped where blocking is forbidden; this drops it anywhere.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Errors from the database client, sorted into "away" (retry) and the rest.
trait Db<T> {
    fn db(self) -> anyhow::Result<T>;
}

impl<T> Db<T> for Result<T, tokio_postgres::Error> {
    fn db(self) -> anyhow::Result<T> {
        self.map_err(classify)
    }
}

fn classify(error: tokio_postgres::Error) -> anyhow::Error {
    // Without a SQLSTATE, only a closed connection or an I/O error is the database being
    // away; a value that does not convert is this build's bug, and says so.
    let io = std::error::Error::source(&error).is_some_and(|cause| cause.is::<std::io::Error>());
    let away = error.is_closed()
        || (error.code().is_none() && io)
        || error.code().is_some_and(|code| {
            let code = code.code();
            // 08: connection; 57P: the server shutting down or starting; 53: out of resources;
            // 40001/40P01: serialization failure, deadlock (retry); 25006: a read-only server
            // (a standby reached before it was promoted).
            code.starts_with("08")
                || code.starts_with("57P")
                || code == "57014" // statement timeout
                || code == "55P03" // lock not available
                || code.starts_with("53")
                || *code == *SqlState::T_R_SERIALIZATION_FAILURE.code()
                || *code == *SqlState::T_R_DEADLOCK_DETECTED.code()
                || *code == *SqlState::READ_ONLY_SQL_TRANSACTION.code()
        });
    if away {
        anyhow::Error::new(DatabaseUnavailable(format!("PostgreSQL: {error}")))
    } else {
        anyhow::Error::new(error).context("PostgreSQL refused a statement")
    }
}

fn pool_error(error: deadpool_postgres::PoolError) -> anyhow::Error {
    match error {
        deadpool_postgres::PoolError::Backend(error) => classify(error),
        other => anyhow::Error::new(DatabaseUnavailable(format!(
            "no connection to PostgreSQL: {other}"
        ))),
    }
}

/// The error of a write that met a vault changed by another node (erased, emptied or removed)
/// after this request read it: retried, the request sees the vault as it is now.
fn vault_changed(vault: VaultId) -> anyhow::Error {
    anyhow::Error::new(DatabaseUnavailable(format!(
        "vault {vault} was erased or emptied by another node while this request ran"
    )))
}

fn id_i64(id: MemoryId) -> i64 {
    i64::try_from(id.0).unwrap_or(i64::MAX)
}

fn memory_id(id: i64) -> MemoryId {
    MemoryId(u64::try_from(id).unwrap_or(0))
}

fn vault_id(bytes: &[u8]) -> anyhow::Result<VaultId> {
    Ok(VaultId(
        bytes.try_into().context("a vault id is not 16 bytes")?,
    ))
}

fn decode_key(text: &str) -> anyhow::Result<KeyRecord> {
    serde_json::from_str(text).context("a key record is corrupt")
}

impl PgStore {
    /// Connects, migrates the schema (refusing a newer one), and checks the master key against
    /// the one the database was made with.
    pub fn open(options: &PgOptions, master: MasterKey) -> anyhow::Result<PgStore> {
        let mut config = tokio_postgres::Config::from_str(&options.url)
            .context("--store is not a PostgreSQL connection string or URL")?;
        config.connect_timeout(options.connect_timeout);
        config.keepalives_idle(Duration::from_secs(30));
        config.application_name("memory-sidecar");
        config.options(format!(
            "-c statement_timeout={} -c synchronous_commit=on",
            options.statement_timeout.as_millis()
        ));
        let location = describe(&config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("postgres")
            .enable_all()
            .build()
            .context("starting the PostgreSQL client's threads")?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(options.pool_size.max(1))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(options.connect_timeout))
                .create_timeout(Some(options.connect_timeout))
                .recycle_timeout(Some(options.connect_timeout))
                .build()
                .context("building the PostgreSQL connection pool")?
        };
        let store = PgStore {
            runtime: Some(runtime),
            pool,
            master,
            node: rand::random(),
            ciphers: RwLock::default(),
            versions: Mutex::default(),
            gate: parking_lot::RwLock::new(()),
            location,
            lease: format!("{} milliseconds", options.lease.as_millis()),
        };
        store
            .run(store.migrate())
            .with_context(|| format!("opening the store in {}", store.location))?;
        Ok(store)
    }

    /// Runs database work to its end from the calling thread (never an async worker: the app
    /// reaches the store through its blocking pool).
    fn run<T>(&self, work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the store")
            .block_on(work)
    }

    async fn client(&self) -> anyhow::Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .db()?;
        let exists: bool = tx
            .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])
            .await
            .db()?
            .get(0);
        if !exists {
            tx.batch_execute(SCHEMA).await.db()?;
            tx.execute(
                "INSERT INTO meta (name, value) VALUES ('schema', $1), ('master_check', $2)",
                &[
                    &SCHEMA_VERSION.to_string().into_bytes(),
                    &master_check(&self.master),
                ],
            )
            .await
            .db()?;
            tracing::info!(schema = SCHEMA_VERSION, "created the store's tables");
        }
        let schema = meta_value(&tx, "schema").await?.unwrap_or_default();
        let schema: i64 = String::from_utf8_lossy(&schema)
            .parse()
            .context("the store's schema version is corrupt")?;
        if schema > SCHEMA_VERSION {
            bail!(
                "the database has schema {schema}, newer than this build's {SCHEMA_VERSION}: a \
                 newer memory-sidecar migrated it. Run that version on every node (a schema is \
                 never migrated down)"
            );
        }
        let check = meta_value(&tx, "master_check")
            .await?
            .context("the store has no master key check")?;
        verify_master_check(&self.master, &check)
            .context("every node of a fleet needs the master key the database was made with")?;
        tx.commit().await.db()?;
        Ok(())
    }

    /// Remembers the version of a vault as an authentication read it, and forgets a cipher
    /// whose data key was replaced meanwhile.
    fn note_version(&self, vault: VaultId, key_gen: i64, version: VaultVersion) {
        {
            let mut versions = self.versions.lock().expect("versions lock");
            if versions.len() >= MAX_CACHED_VAULTS && !versions.contains_key(&vault) {
                versions.clear();
            }
            // Two authentications may finish in either order: a version never goes back.
            let known = versions.entry(vault).or_insert(version);
            known.seq = known.seq.max(version.seq);
            known.removals = known.removals.max(version.removals);
        }
        let stale = self
            .ciphers
            .read()
            .expect("ciphers lock")
            .get(&vault)
            .is_some_and(|(generation, _)| *generation < key_gen);
        if stale {
            self.ciphers.write().expect("ciphers lock").remove(&vault);
        }
    }

    /// Keeps the cipher of a vault's wrapped data key of generation `key_gen`, unless the one
    /// held is already of that generation; returns the one held.
    fn hold_cipher(
        &self,
        vault: VaultId,
        key_gen: i64,
        wrapped: &[u8],
    ) -> Option<Arc<VaultCipher>> {
        if let Some((generation, cipher)) = self.ciphers.read().expect("ciphers lock").get(&vault) {
            // Never back to an older generation (an authentication that read the vault
            // before it was emptied, finishing after one that read it after).
            if *generation >= key_gen {
                return (*generation == key_gen).then(|| cipher.clone());
            }
        }
        let cipher = unwrap_key(&self.master, vault, wrapped)
            .inspect_err(|error| {
                tracing::error!(error = %format!("{error:#}"), %vault, "a data key does not open");
            })
            .ok()?;
        let mut ciphers = self.ciphers.write().expect("ciphers lock");
        if ciphers.len() >= MAX_CACHED_VAULTS && !ciphers.contains_key(&vault) {
            ciphers.clear();
        }
        let held = ciphers.entry(vault).or_insert((key_gen, cipher.clone()));
        if held.0 < key_gen {
            *held = (key_gen, cipher);
        }
        Some(held.1.clone())
    }

    /// The generation of `cipher` if it is the vault's cipher this node holds.
    fn generation_of(&self, vault: VaultId, cipher: &VaultCipher) -> Option<i64> {
        let ciphers = self.ciphers.read().expect("ciphers lock");
        let (generation, held) = ciphers.get(&vault)?;
        std::ptr::eq(Arc::as_ptr(held), cipher).then_some(*generation)
    }

    /// Checks, under the vault row's lock (the caller's transaction took it: `FOR SHARE` to
    /// add, an update to change), that `cipher` is the vault's current data key: `now` is the
    /// generation the row holds, `None` when the vault is gone.
    fn check_generation(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        now: Option<i64>,
    ) -> anyhow::Result<()> {
        match now {
            Some(now) if self.generation_of(vault, cipher) == Some(now) => Ok(()),
            _ => {
                // The cipher held is stale: the next use reads the current one.
                let mut ciphers = self.ciphers.write().expect("ciphers lock");
                if ciphers
                    .get(&vault)
                    .is_some_and(|(held, _)| now.is_none_or(|now| *held < now))
                {
                    ciphers.remove(&vault);
                }
                Err(vault_changed(vault))
            }
        }
    }
}

async fn meta_value(
    tx: &deadpool_postgres::Transaction<'_>,
    name: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    Ok(tx
        .query_opt("SELECT value FROM meta WHERE name = $1", &[&name])
        .await
        .db()?
        .map(|row| row.get(0)))
}

/// The hosts and database of a connection string, never its password.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    format!(
        "PostgreSQL {} database {}",
        hosts.join(","),
        config.get_dbname().unwrap_or("(default)")
    )
}

impl Keys for PgStore {
    fn insert_key(&self, record: &KeyRecord) -> anyhow::Result<bool> {
        let _writing = Writing::hold(&self.gate);
        let text = serde_json::to_string(record)?;
        self.run(async {
            let client = self.client().await?;
            let inserted = client
                .execute(
                    "INSERT INTO keys (id, vault, record) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO NOTHING",
                    &[&record.id.as_str(), &&record.vault.0[..], &text],
                )
                .await
                .db()?;
            Ok(inserted == 1)
        })
    }

    fn key(&self, id: &KeyId) -> anyhow::Result<Option<KeyRecord>> {
        let row = self.run(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(
                    "SELECT k.record, v.key_gen, v.version, v.removals, v.data_key \
                     FROM keys k LEFT JOIN vaults v ON v.id = k.vault WHERE k.id = $1",
                )
                .await
                .db()?;
            client.query_opt(&statement, &[&id.as_str()]).await.db()
        })?;
        let Some(row) = row else { return Ok(None) };
        let record = decode_key(row.get(0))?;
        if let (Some(key_gen), Some(seq), Some(removals)) = (
            row.get::<_, Option<i64>>(1),
            row.get::<_, Option<i64>>(2),
            row.get::<_, Option<i64>>(3),
        ) {
            self.note_version(record.vault, key_gen, VaultVersion { seq, removals });
            // The vault's cipher, ready before the request needs it (`cipher` never waits).
            if let Some(wrapped) = row.get::<_, Option<Vec<u8>>>(4) {
                self.hold_cipher(record.vault, key_gen, &wrapped);
            }
        }
        Ok(Some(record))
    }

    fn update_key(
        &self,
        id: &KeyId,
        change: &mut dyn FnMut(&mut KeyRecord),
    ) -> anyhow::Result<Option<KeyRecord>> {
        let _writing = Writing::hold(&self.gate);
        self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.db()?;
            let Some(row) = tx
                .query_opt(
                    "SELECT record FROM keys WHERE id = $1 FOR UPDATE",
                    &[&id.as_str()],
                )
                .await
                .db()?
            else {
                return Ok(None);
            };
            let mut record = decode_key(row.get(0))?;
            let (key_id, vault) = (record.id.clone(), record.vault);
            change(&mut record);
            (record.id, record.vault) = (key_id, vault);
            tx.execute(
                "UPDATE keys SET record = $2 WHERE id = $1",
                &[&id.as_str(), &serde_json::to_string(&record)?],
            )
            .await
            .db()?;
            tx.commit().await.db()?;
            Ok(Some(record))
        })
    }

    fn keys_page(
        &self,
        after: Option<&KeyId>,
        limit: usize,
        keep: &mut dyn FnMut(&KeyRecord) -> bool,
    ) -> anyhow::Result<KeyPage> {
        self.key_scan(None, after, limit, keep)
    }

    fn vault_keys_page(
        &self,
        vault: VaultId,
        after: Option<&KeyId>,
        limit: usize,
        keep: &mut dyn FnMut(&KeyRecord) -> bool,
    ) -> anyhow::Result<KeyPage> {
        self.key_scan(Some(vault), after, limit, keep)
    }

    fn touch_key(&self, id: &KeyId, at_ms: i64) -> anyhow::Result<()> {
        self.run(async {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE keys SET last_used_ms = greatest(last_used_ms, $2) WHERE id = $1",
                    &[&id.as_str(), &at_ms],
                )
                .await
                .db()?;
            Ok(())
        })
    }

    fn key_last_used(&self, id: &KeyId) -> anyhow::Result<Option<i64>> {
        self.run(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT last_used_ms FROM keys WHERE id = $1",
                    &[&id.as_str()],
                )
                .await
                .db()?;
            Ok(row.and_then(|row| row.get(0)))
        })
    }
}

impl PgStore {
    /// Key records in id order after `after` (of one vault, or all), filtered by `keep`.
    fn key_scan(
        &self,
        vault: Option<VaultId>,
        after: Option<&KeyId>,
        limit: usize,
        keep: &mut dyn FnMut(&KeyRecord) -> bool,
    ) -> anyhow::Result<KeyPage> {
        let mut cursor = after.map(|id| id.as_str().to_owned()).unwrap_or_default();
        let mut page = Vec::new();
        loop {
            let rows = self.run(async {
                let client = self.client().await?;
                match vault {
                    Some(vault) => client
                        .query(
                            "SELECT id, record FROM keys WHERE vault = $1 AND id > $2 \
                             ORDER BY id LIMIT $3",
                            &[&&vault.0[..], &cursor, &SCAN_CHUNK],
                        )
                        .await
                        .db(),
                    None => client
                        .query(
                            "SELECT id, record FROM keys WHERE id > $1 ORDER BY id LIMIT $2",
                            &[&cursor, &SCAN_CHUNK],
                        )
                        .await
                        .db(),
                }
            })?;
            let done = (rows.len() as i64) < SCAN_CHUNK;
            for row in rows {
                cursor = row.get(0);
                let record = decode_key(row.get(1))?;
                if !keep(&record) {
                    continue;
                }
                if page.len() == limit {
                    let next = page.last().map(|r: &KeyRecord| r.id.clone());
                    return Ok((page, next));
                }
                page.push(record);
            }
            if done {
                return Ok((page, None));
            }
        }
    }
}

impl Vaults for PgStore {
    fn create_vault(&self, created_at_ms: i64) -> anyhow::Result<VaultId> {
        let _writing = Writing::hold(&self.gate);
        let vault = VaultId::generate();
        let (wrapped, cipher) = new_wrapped_key(&self.master, vault);
        let record = serde_json::to_string(&VaultRecord {
            created_at_ms,
            erasing: false,
            removing: false,
        })?;
        self.run(async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO vaults (id, record, data_key, key_gen) VALUES ($1, $2, $3, 1)",
                    &[&&vault.0[..], &record, &wrapped],
                )
                .await
                .db()?;
            Ok(())
        })?;
        self.ciphers
            .write()
            .expect("ciphers lock")
            .insert(vault, (1, cipher));
        Ok(vault)
    }

    fn vault(&self, vault: VaultId) -> anyhow::Result<Option<VaultRecord>> {
        let row = self.run(async {
            let client = self.client().await?;
            client
                .query_opt("SELECT record FROM vaults WHERE id = $1", &[&&vault.0[..]])
                .await
                .db()
        })?;
        row.map(|row| {
            serde_json::from_str(row.get(0)).with_context(|| format!("vault record {vault}"))
        })
        .transpose()
    }

    fn set_vault(&self, vault: VaultId, record: &VaultRecord) -> anyhow::Result<()> {
        let _writing = Writing::hold(&self.gate);
        let text = serde_json::to_string(record)?;
        self.run(async {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE vaults SET record = $2 WHERE id = $1",
                    &[&&vault.0[..], &text],
                )
                .await
                .db()?;
            Ok(())
        })
    }

    fn vaults(&self) -> anyhow::Result<Vec<(VaultId, VaultRecord)>> {
        let rows = self.run(async {
            let client = self.client().await?;
            client
                .query("SELECT id, record FROM vaults ORDER BY id", &[])
                .await
                .db()
        })?;
        rows.iter()
            .map(|row| {
                let vault = vault_id(row.get(0))?;
                let record = serde_json::from_str(row.get(1))
                    .with_context(|| format!("vault record {vault} is corrupt"))?;
                Ok((vault, record))
            })
            .collect()
    }

    fn vault_count(&self) -> usize {
        self.count("SELECT count(*) FROM vaults", None)
    }

    fn cipher(&self, vault: VaultId) -> Option<Arc<VaultCipher>> {
        if let Some((_, cipher)) = self.ciphers.read().expect("ciphers lock").get(&vault) {
            return Some(cipher.clone());
        }
        // Not read with a key's authentication (an operator's request by vault id): read now,
        // from a thread of its own, since the caller may be an async worker that must not
        // block on the runtime.
        let row = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.run(async {
                        let client = self.client().await?;
                        client
                            .query_opt(
                                "SELECT data_key, key_gen FROM vaults WHERE id = $1",
                                &[&&vault.0[..]],
                            )
                            .await
                            .db()
                    })
                })
                .join()
        })
        .ok()?
        .inspect_err(|error| {
            tracing::warn!(error = %format!("{error:#}"), "reading a vault's data key failed");
        })
        .ok()??;
        let wrapped: Option<Vec<u8>> = row.get(0);
        self.hold_cipher(vault, row.get(1), &wrapped?)
    }

    fn erase_vault(&self, vault: VaultId, removing: bool, now_ms: i64) -> anyhow::Result<Removed> {
        let _writing = Writing::hold(&self.gate);
        let fresh = (!removing).then(|| new_wrapped_key(&self.master, vault));
        let (removed, generation) = self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.db()?;
            let Some(row) = tx
                .query_opt(
                    "SELECT record FROM vaults WHERE id = $1 FOR UPDATE",
                    &[&&vault.0[..]],
                )
                .await
                .db()?
            else {
                return Ok((Removed::default(), None));
            };
            let mut record: VaultRecord = serde_json::from_str(row.get(0))
                .with_context(|| format!("vault record {vault} is corrupt"))?;
            if !record.erasing {
                // Another node finished this erasure while this one waited for the row (its
                // start-up recovery saw the mark): what was written since must stay.
                return Ok((Removed::default(), None));
            }
            let pending: i64 = tx
                .query_one(
                    "SELECT count(*) FROM pending WHERE vault = $1",
                    &[&&vault.0[..]],
                )
                .await
                .db()?
                .get(0);
            // One transaction: the data key and every row go together, on every node at once.
            let memories = tx
                .execute("DELETE FROM memories WHERE vault = $1", &[&&vault.0[..]])
                .await
                .db()?;
            let generation = if removing {
                let keys = tx
                    .query(
                        "SELECT id, record FROM keys WHERE vault = $1 FOR UPDATE",
                        &[&&vault.0[..]],
                    )
                    .await
                    .db()?;
                for row in keys {
                    let mut key = decode_key(row.get(1))?;
                    key.revoked_at_ms.get_or_insert(now_ms);
                    tx.execute(
                        "UPDATE keys SET record = $2 WHERE id = $1",
                        &[&row.get::<_, &str>(0), &serde_json::to_string(&key)?],
                    )
                    .await
                    .db()?;
                }
                tx.execute("DELETE FROM vaults WHERE id = $1", &[&&vault.0[..]])
                    .await
                    .db()?;
                None
            } else {
                record.erasing = false;
                record.removing = false;
                let (wrapped, _) = fresh.as_ref().expect("a fresh key when emptying");
                let row = tx
                    .query_one(
                        "UPDATE vaults SET record = $2, data_key = $3, key_gen = key_gen + 1, \
                         version = version + 1, removals = removals + 1 WHERE id = $1 \
                         RETURNING key_gen",
                        &[&&vault.0[..], &serde_json::to_string(&record)?, wrapped],
                    )
                    .await
                    .db()?;
                Some(row.get::<_, i64>(0))
            };
            tx.commit().await.db()?;
            Ok((
                Removed {
                    memories: memories as usize,
                    pending: pending as usize,
                },
                generation,
            ))
        })?;
        let mut ciphers = self.ciphers.write().expect("ciphers lock");
        match (generation, fresh) {
            (Some(generation), Some((_, cipher))) => {
                ciphers.insert(vault, (generation, cipher));
            }
            _ => {
                ciphers.remove(&vault);
            }
        }
        Ok(removed)
    }

    fn reconcile_data_keys(&self) -> anyhow::Result<usize> {
        // Data keys live in their vault's row: there are no orphans to drop.
        Ok(self.count("SELECT count(*) FROM vaults WHERE data_key IS NULL", None))
    }

    fn data_keys_location(&self) -> String {
        format!("the vaults table of {}", self.location)
    }
}

impl PgStore {
    /// A count, or 0 (logged) when the database cannot say: the callers are gauges.
    fn count(&self, sql: &'static str, vault: Option<VaultId>) -> usize {
        let counted = self.run(async {
            let client = self.client().await?;
            let row = match vault {
                Some(vault) => client.query_one(sql, &[&&vault.0[..]]).await.db()?,
                None => client.query_one(sql, &[]).await.db()?,
            };
            Ok(row.get::<_, i64>(0))
        });
        match counted {
            Ok(count) => usize::try_from(count).unwrap_or(0),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "counting rows failed");
                0
            }
        }
    }

    /// Bumps a vault's version in `tx` (locking its row until the commit) and returns the new
    /// version and the data key's generation; `None` if the vault is gone.
    async fn bump(
        tx: &deadpool_postgres::Transaction<'_>,
        vault: VaultId,
        removal: bool,
    ) -> anyhow::Result<Option<(i64, i64)>> {
        let row = tx
            .query_opt(
                "UPDATE vaults SET version = version + 1, \
                 removals = removals + CASE WHEN $2 THEN 1 ELSE 0 END \
                 WHERE id = $1 RETURNING version, key_gen",
                &[&&vault.0[..], &removal],
            )
            .await
            .db()?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    }
}

impl Memories for PgStore {
    fn count_new(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        memories: &[NewMemory],
    ) -> anyhow::Result<usize> {
        let digests: Vec<Vec<u8>> = {
            let mut seen = HashSet::new();
            memories
                .iter()
                .map(|memory| digest(cipher, memory).to_vec())
                .filter(|digest| seen.insert(digest.clone()))
                .collect()
        };
        let known: i64 = self.run(async {
            let client = self.client().await?;
            Ok(client
                .query_one(
                    "SELECT count(*) FROM memories WHERE vault = $1 AND digest = ANY($2)",
                    &[&&vault.0[..], &digests],
                )
                .await
                .db()?
                .get(0))
        })?;
        Ok(digests.len().saturating_sub(known as usize))
    }

    fn insert_memories(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        memories: &[NewMemory],
    ) -> anyhow::Result<Vec<(MemoryId, bool)>> {
        let _writing = Writing::hold(&self.gate);
        self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.db()?;
            let generation: Option<i64> = tx
                .query_opt(
                    "SELECT key_gen FROM vaults WHERE id = $1 FOR SHARE",
                    &[&&vault.0[..]],
                )
                .await
                .db()?
                .map(|row| row.get(0));
            self.check_generation(vault, cipher, generation)?;
            let mut ids: Vec<i64> = tx
                .query(
                    "SELECT nextval('memory_ids') FROM generate_series(1, $1::int)",
                    &[&(memories.len() as i32)],
                )
                .await
                .db()?
                .iter()
                .map(|row| row.get(0))
                .collect();
            ids.sort_unstable();
            let insert = tx
                .prepare_cached(
                    "INSERT INTO memories (vault, id, sealed, digest, superseded) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (vault, digest) DO NOTHING",
                )
                .await
                .db()?;
            let existing = tx
                .prepare_cached("SELECT id FROM memories WHERE vault = $1 AND digest = $2")
                .await
                .db()?;
            let mark = tx
                .prepare_cached(&format!(
                    "INSERT INTO pending (vault, id, owner, lease_until) \
                     VALUES ($1, $2, $3, now() + interval '{}')",
                    self.lease
                ))
                .await
                .db()?;
            let mut outcome = Vec::with_capacity(memories.len());
            for (memory, id) in memories.iter().zip(ids) {
                let digest = digest(cipher, memory);
                let mut record = memory.record.clone();
                record.digest = hex::encode(digest);
                let key = memory_key(vault, memory_id(id));
                let sealed = cipher.seal(Purpose::Memory, &key, &serde_json::to_vec(&record)?);
                let superseded = record.superseded_by.is_some();
                let inserted = tx
                    .execute(
                        &insert,
                        &[&&vault.0[..], &id, &sealed, &&digest[..], &superseded],
                    )
                    .await
                    .db()?;
                if inserted == 0 {
                    let row = tx
                        .query_one(&existing, &[&&vault.0[..], &&digest[..]])
                        .await
                        .db()?;
                    outcome.push((memory_id(row.get(0)), false));
                    continue;
                }
                if !superseded {
                    tx.execute(&mark, &[&&vault.0[..], &id, &&self.node[..]])
                        .await
                        .db()?;
                }
                outcome.push((memory_id(id), true));
            }
            tx.commit().await.db()?;
            Ok(outcome)
        })
    }

    fn memory(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        id: MemoryId,
    ) -> anyhow::Result<Option<MemoryRecord>> {
        let row = self.run(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached("SELECT sealed FROM memories WHERE vault = $1 AND id = $2")
                .await
                .db()?;
            client
                .query_opt(&statement, &[&&vault.0[..], &id_i64(id)])
                .await
                .db()
        })?;
        row.map(|row| open_record(cipher, &memory_key(vault, id), row.get(0)))
            .transpose()
    }

    fn contains_memory(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        self.exists(
            "SELECT EXISTS (SELECT 1 FROM memories WHERE vault = $1 AND id = $2)",
            vault,
            id,
        )
    }

    fn memories_page(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        after: Option<MemoryId>,
        limit: usize,
        keep: &mut dyn FnMut(&MemoryRecord) -> bool,
    ) -> anyhow::Result<MemoryPage> {
        let mut cursor = after.map_or(-1, id_i64);
        let mut page = Vec::new();
        loop {
            let rows = self.run(async {
                let client = self.client().await?;
                client
                    .query(
                        "SELECT id, sealed FROM memories WHERE vault = $1 AND id > $2 \
                         ORDER BY id LIMIT $3",
                        &[&&vault.0[..], &cursor, &SCAN_CHUNK],
                    )
                    .await
                    .db()
            })?;
            let done = (rows.len() as i64) < SCAN_CHUNK;
            for row in rows {
                cursor = row.get(0);
                let id = memory_id(cursor);
                let record = open_record(cipher, &memory_key(vault, id), row.get(1))?;
                if !keep(&record) {
                    continue;
                }
                if page.len() == limit {
                    let next = page.last().map(|(id, _): &(MemoryId, MemoryRecord)| *id);
                    return Ok((page, next));
                }
                page.push((id, record));
            }
            if done {
                return Ok((page, None));
            }
        }
    }

    fn delete_memories(
        &self,
        vault: VaultId,
        _cipher: &VaultCipher,
        ids: &[MemoryId],
    ) -> anyhow::Result<(Vec<MemoryId>, usize)> {
        let _writing = Writing::hold(&self.gate);
        let ids: Vec<i64> = ids.iter().map(|id| id_i64(*id)).collect();
        self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.db()?;
            PgStore::bump(&tx, vault, true).await?;
            let pending: i64 = tx
                .query_one(
                    "SELECT count(*) FROM pending WHERE vault = $1 AND id = ANY($2)",
                    &[&&vault.0[..], &ids],
                )
                .await
                .db()?
                .get(0);
            let mut deleted: Vec<MemoryId> = tx
                .query(
                    "DELETE FROM memories WHERE vault = $1 AND id = ANY($2) RETURNING id",
                    &[&&vault.0[..], &ids],
                )
                .await
                .db()?
                .iter()
                .map(|row| memory_id(row.get(0)))
                .collect();
            tx.commit().await.db()?;
            deleted.sort_unstable();
            Ok((deleted, pending as usize))
        })
    }

    fn supersede(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        ids: &[MemoryId],
        by: MemoryId,
    ) -> anyhow::Result<(Vec<MemoryId>, usize)> {
        let _writing = Writing::hold(&self.gate);
        self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.db()?;
            let generation = PgStore::bump(&tx, vault, true).await?.map(|(_, g)| g);
            self.check_generation(vault, cipher, generation)?;
            let mut marked = Vec::new();
            let mut were_pending = 0;
            for id in ids {
                let key = memory_key(vault, *id);
                let Some(row) = tx
                    .query_opt(
                        "SELECT sealed FROM memories WHERE vault = $1 AND id = $2 FOR UPDATE",
                        &[&&vault.0[..], &id_i64(*id)],
                    )
                    .await
                    .db()?
                else {
                    continue;
                };
                let mut record = open_record(cipher, &key, row.get(0))?;
                if record.superseded_by.is_some() {
                    continue;
                }
                record.superseded_by = Some(by.to_string());
                let sealed = cipher.seal(Purpose::Memory, &key, &serde_json::to_vec(&record)?);
                tx.execute(
                    "UPDATE memories SET sealed = $3, superseded = true \
                     WHERE vault = $1 AND id = $2",
                    &[&&vault.0[..], &id_i64(*id), &sealed],
                )
                .await
                .db()?;
                tx.execute(
                    "DELETE FROM vectors WHERE vault = $1 AND id = $2",
                    &[&&vault.0[..], &id_i64(*id)],
                )
                .await
                .db()?;
                were_pending += tx
                    .execute(
                        "DELETE FROM pending WHERE vault = $1 AND id = $2",
                        &[&&vault.0[..], &id_i64(*id)],
                    )
                    .await
                    .db()? as usize;
                marked.push(*id);
            }
            tx.commit().await.db()?;
            Ok((marked, were_pending))
        })
    }

    fn is_pending(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        self.exists(
            "SELECT EXISTS (SELECT 1 FROM pending WHERE vault = $1 AND id = $2)",
            vault,
            id,
        )
    }

    fn vault_memory_count(&self, vault: VaultId) -> usize {
        self.count(
            "SELECT count(*) FROM memories WHERE vault = $1",
            Some(vault),
        )
    }

    fn memory_count(&self) -> usize {
        self.count("SELECT count(*) FROM memories", None)
    }

    fn pending_after(
        &self,
        after: Option<(VaultId, MemoryId)>,
        limit: usize,
    ) -> anyhow::Result<Vec<(VaultId, MemoryId)>> {
        let (vault, id) = after.map_or((Vec::new(), -1), |(v, id)| (v.0.to_vec(), id_i64(id)));
        let limit = limit as i64;
        let rows = self.run(async {
            let client = self.client().await?;
            // Claims (or renews) the lease of the next pending rows that are this node's or
            // whose lease ran out: a node that died leaves its rows to the others.
            let statement = client
                .prepare_cached(&format!(
                    "WITH claimed AS ( \
                         SELECT vault, id FROM pending \
                         WHERE (vault, id) > ($1, $2) \
                           AND (owner = $3 OR owner IS NULL OR lease_until < now()) \
                         ORDER BY vault, id LIMIT $4 FOR UPDATE SKIP LOCKED) \
                     UPDATE pending p SET owner = $3, lease_until = now() + interval '{}' \
                     FROM claimed WHERE p.vault = claimed.vault AND p.id = claimed.id \
                     RETURNING p.vault, p.id",
                    self.lease
                ))
                .await
                .db()?;
            client
                .query(&statement, &[&vault, &id, &&self.node[..], &limit])
                .await
                .db()
        })?;
        let mut claimed = rows
            .iter()
            .map(|row| Ok((vault_id(row.get(0))?, memory_id(row.get(1)))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        claimed.sort_unstable_by_key(|(vault, id)| (vault.0, *id));
        // The claimed vaults' current ciphers, so that the indexer never opens a memory with a
        // data key another node replaced since this node last saw the vault.
        let mut vaults: Vec<Vec<u8>> = claimed.iter().map(|(vault, _)| vault.0.to_vec()).collect();
        vaults.dedup();
        if !vaults.is_empty() {
            let keys = self.run(async {
                let client = self.client().await?;
                client
                    .query(
                        "SELECT id, key_gen, data_key FROM vaults WHERE id = ANY($1)",
                        &[&vaults],
                    )
                    .await
                    .db()
            })?;
            for row in keys {
                if let Some(wrapped) = row.get::<_, Option<Vec<u8>>>(2) {
                    self.hold_cipher(vault_id(row.get(0))?, row.get(1), &wrapped);
                }
            }
        }
        Ok(claimed)
    }

    fn pending_count(&self) -> usize {
        self.count("SELECT count(*) FROM pending", None)
    }

    fn vault_pending_count(&self, vault: VaultId) -> usize {
        self.count("SELECT count(*) FROM pending WHERE vault = $1", Some(vault))
    }

    fn clear_pending(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        let _writing = Writing::hold(&self.gate);
        self.run(async {
            let client = self.client().await?;
            Ok(client
                .execute(
                    "DELETE FROM pending WHERE vault = $1 AND id = $2",
                    &[&&vault.0[..], &id_i64(id)],
                )
                .await
                .db()?
                == 1)
        })
    }

    fn set_unembeddable(&self, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        let _writing = Writing::hold(&self.gate);
        self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.db()?;
            tx.execute(
                "INSERT INTO unembeddable (vault, id) SELECT vault, id FROM memories \
                 WHERE vault = $1 AND id = $2 ON CONFLICT DO NOTHING",
                &[&&vault.0[..], &id_i64(id)],
            )
            .await
            .db()?;
            let was = tx
                .execute(
                    "DELETE FROM pending WHERE vault = $1 AND id = $2",
                    &[&&vault.0[..], &id_i64(id)],
                )
                .await
                .db()?;
            tx.commit().await.db()?;
            Ok(was == 1)
        })
    }
}

impl PgStore {
    fn exists(&self, sql: &'static str, vault: VaultId, id: MemoryId) -> anyhow::Result<bool> {
        self.run(async {
            let client = self.client().await?;
            Ok(client
                .query_one(sql, &[&&vault.0[..], &id_i64(id)])
                .await
                .db()?
                .get(0))
        })
    }

    /// Opens vector rows `(id, seq, sealed)`, returning them and the highest version seen.
    fn open_vectors(
        vault: VaultId,
        cipher: &VaultCipher,
        rows: &[tokio_postgres::Row],
        mut highest: i64,
    ) -> anyhow::Result<(Vec<VectorItem>, i64)> {
        let mut items = Vec::with_capacity(rows.len());
        for row in rows {
            let id = memory_id(row.get(0));
            highest = highest.max(row.get(1));
            items.push(open_vector(cipher, &memory_key(vault, id), row.get(2))?);
        }
        Ok((items, highest))
    }
}

impl Vectors for PgStore {
    fn insert_vectors(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        items: &[VectorItem],
    ) -> anyhow::Result<()> {
        let _writing = Writing::hold(&self.gate);
        let mut ids = Vec::with_capacity(items.len());
        let mut sealed = Vec::with_capacity(items.len());
        for (id, vector, meta) in items {
            ids.push(id_i64(*id));
            sealed.push(seal_vector(cipher, &memory_key(vault, *id), vector, meta)?);
        }
        self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.db()?;
            let bumped = PgStore::bump(&tx, vault, false).await?;
            self.check_generation(vault, cipher, bumped.map(|(_, g)| g))?;
            let (version, _) = bumped.expect("checked above");
            // Only for memories still there and not superseded meanwhile (on another node).
            tx.execute(
                "INSERT INTO vectors (vault, id, seq, sealed) \
                 SELECT $1, u.id, $2, u.sealed FROM unnest($3::int8[], $4::bytea[]) AS u(id, sealed) \
                 JOIN memories m ON m.vault = $1 AND m.id = u.id AND NOT m.superseded \
                 ON CONFLICT (vault, id) DO UPDATE SET seq = EXCLUDED.seq, sealed = EXCLUDED.sealed",
                &[&&vault.0[..], &version, &ids, &sealed],
            )
            .await
            .db()?;
            tx.execute(
                "DELETE FROM pending WHERE vault = $1 AND id = ANY($2)",
                &[&&vault.0[..], &ids],
            )
            .await
            .db()?;
            tx.commit().await.db()?;
            Ok(())
        })
    }

    fn vault_vectors(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
    ) -> anyhow::Result<Vec<VectorItem>> {
        Ok(self.vectors_after(vault, cipher, -1)?.0)
    }

    fn vault_version(&self, vault: VaultId) -> Option<VaultVersion> {
        self.versions
            .lock()
            .expect("versions lock")
            .get(&vault)
            .copied()
    }

    fn vectors_after(
        &self,
        vault: VaultId,
        cipher: &VaultCipher,
        after: i64,
    ) -> anyhow::Result<(Vec<VectorItem>, i64)> {
        let rows = self.run(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(
                    "SELECT id, seq, sealed FROM vectors WHERE vault = $1 AND seq > $2 \
                     ORDER BY id",
                )
                .await
                .db()?;
            client
                .query(&statement, &[&&vault.0[..], &after])
                .await
                .db()
        })?;
        PgStore::open_vectors(vault, cipher, &rows, after)
    }

    fn embedding_model(&self) -> anyhow::Result<(Option<String>, bool)> {
        self.run(async {
            let client = self.client().await?;
            let recorded: Option<Vec<u8>> = client
                .query_opt("SELECT value FROM meta WHERE name = 'embedding_model'", &[])
                .await
                .db()?
                .map(|row| row.get(0));
            let any: bool = client
                .query_one("SELECT EXISTS (SELECT 1 FROM vectors)", &[])
                .await
                .db()?
                .get(0);
            let recorded = recorded
                .map(String::from_utf8)
                .transpose()
                .context("the store's embedding model record is corrupt")?;
            Ok((recorded, any))
        })
    }

    fn set_embedding_model(&self, fingerprint: &str, reembed: bool) -> anyhow::Result<usize> {
        let _writing = Writing::hold(&self.gate);
        self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.db()?;
            let marked = if reembed {
                tx.execute(
                    "INSERT INTO pending (vault, id) SELECT vault, id FROM vectors \
                     ON CONFLICT DO NOTHING",
                    &[],
                )
                .await
                .db()?
            } else {
                0
            };
            tx.execute(
                "INSERT INTO meta (name, value) VALUES ('embedding_model', $1) \
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&fingerprint.as_bytes()],
            )
            .await
            .db()?;
            tx.commit().await.db()?;
            Ok(marked as usize)
        })
    }
}

impl Audit for PgStore {
    fn append_audit(&self, entry: &AuditEntry, max_entries: usize) -> anyhow::Result<()> {
        let _writing = Writing::hold(&self.gate);
        let text = serde_json::to_string(entry)?;
        let keep = i64::try_from(max_entries).unwrap_or(i64::MAX);
        self.run(async {
            let client = self.client().await?;
            let seq: i64 = client
                .query_one(
                    "INSERT INTO audit (entry) VALUES ($1) RETURNING seq",
                    &[&text],
                )
                .await
                .db()?
                .get(0);
            client
                .execute("DELETE FROM audit WHERE seq <= $1", &[&(seq - keep)])
                .await
                .db()?;
            Ok(())
        })
    }

    fn audit_page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> anyhow::Result<(Vec<AuditEntry>, Option<u64>)> {
        let after = after.map_or(0, |a| i64::try_from(a).unwrap_or(i64::MAX));
        let rows = self.run(async {
            let client = self.client().await?;
            client
                .query(
                    "SELECT seq, entry FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &(limit as i64 + 1)],
                )
                .await
                .db()
        })?;
        let more = rows.len() > limit;
        let mut page = Vec::with_capacity(limit);
        let mut last = None;
        for row in rows.iter().take(limit) {
            page.push(serde_json::from_str(row.get(1)).context("an audit entry is corrupt")?);
            last = Some(row.get::<_, i64>(0) as u64);
        }
        Ok((page, if more { last } else { None }))
    }
}

impl Snapshots for PgStore {
    fn hold_writes(&self) -> Writing<'_> {
        Writing::hold(&self.gate)
    }

    fn backup_to(
        &self,
        _to: &std::path::Path,
        _tombstones_seq: &dyn Fn() -> (String, u64),
        _now_ms: i64,
    ) -> anyhow::Result<Manifest> {
        bail!(
            "a store in PostgreSQL is backed up by PostgreSQL itself (pg_basebackup, with WAL \
             archiving for point-in-time recovery): see docs/fleet.md"
        )
    }
}

impl Durability for PgStore {
    fn commit(&self) -> CommitFuture {
        // Every write committed its own transaction before it returned.
        Box::pin(std::future::ready(Ok(())))
    }

    fn is_healthy(&self) -> bool {
        true
    }

    fn note_write_error(&self, _error: &anyhow::Error) {}

    fn is_io_failure(&self, error: &anyhow::Error) -> bool {
        // Any failure of the database, not only its absence, is not the memory's fault.
        error
            .chain()
            .any(|cause| cause.is::<DatabaseUnavailable>() || cause.is::<tokio_postgres::Error>())
    }

    fn sync(&self) -> anyhow::Result<()> {
        Ok(())
    }

    fn close(&self) -> anyhow::Result<()> {
        self.pool.close();
        Ok(())
    }
}
