//! The operator's command line: subcommands of the daemon's binary (`serve`, the default, is in
//! `main.rs`). Each one is a client of the admin API. While the daemon runs (its data
//! directory is locked) a command talks to it over its admin listener (`--admin-url`, by
//! default the `--admin-listen` or `--listen` address); when it does not, the command opens the
//! data directory itself, under the same lock, and serves the same API to itself on a private
//! loopback port for as long as it runs, with an admin key made for that run alone. So a
//! command behaves the same either way, and two processes never write one store.
//!
//! `restore` and `master-key rewrap` need the daemon stopped; `config check` reads no store.
//! Output is for people; `--json` prints what the API answered, for scripts. Exit codes: 0 done,
//! 1 refused or failed (the message says why), 2 a bad command line (clap's).

use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::app::backup::restore;
use crate::app::App;
use crate::auth::AdminKey;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Flags, HttpConfig, Listen, Surface};
use crate::crypto::{Keyring, MasterKey};
use crate::http::serve;
use crate::metrics::Metrics;
use crate::store::{data_dir_in_use, lock_data_dir};

#[derive(Parser)]
#[command(
    name = "memory-sidecar",
    version,
    about = "Retrieval-only memory sidecar for LLM gateways",
    long_about = "Retrieval-only memory sidecar for LLM gateways. Without a subcommand it serves \
                  (as `serve`); the other subcommands manage a daemon's keys, vaults and backups, \
                  through its admin listener while it runs or on its data directory when it \
                  does not.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon (what no subcommand does).
    Serve(Flags),
    /// Take a consistent backup while the daemon serves (writes pause for a moment only).
    Backup {
        /// A new or empty directory on the daemon's host (absolute when the daemon writes it).
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Restore a backup into a new data directory (`--data-dir`), applying every tombstone of
    /// `--tombstone-log` newer than the backup, then check it. The daemon must not use it.
    Restore {
        /// The backup directory (its manifest is checked first).
        #[arg(long)]
        from: PathBuf,
        /// Restore what the backup holds without a tombstone journal: vaults erased and keys
        /// revoked since the backup come back. Without it, the journal (`--tombstone-log`)
        /// must be there.
        #[arg(long)]
        without_tombstones: bool,
        #[command(flatten)]
        common: Common,
    },
    /// After PostgreSQL restored a fleet's database (a base backup, or recovery to a point in
    /// time), apply the tombstones of every node's journal written from `--since` on, so that
    /// what was erased or revoked since stays so. Run it before any node serves the database
    /// (docs/fleet.md).
    ApplyTombstones {
        /// A node's tombstone journal; give one `--journal` per node of the fleet.
        #[arg(long = "journal", required = true)]
        journals: Vec<PathBuf>,
        /// The moment the restore goes back to (RFC 3339, e.g. 2026-12-02T10:00:00Z): the
        /// base backup's start, or the recovery target time.
        #[arg(long)]
        since: String,
        #[command(flatten)]
        common: Common,
    },
    /// Verify the store, the ledger, the keyring and that every index rebuilds; exits 1 with
    /// what is wrong.
    Check {
        #[command(flatten)]
        common: Common,
    },
    /// The configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Memory keys: mint, list, show, revoke, rotate.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Vaults: list, stats, export, import, erase.
    Vaults {
        #[command(subcommand)]
        command: VaultsCommand,
    },
    /// The master key that wraps every vault's data key.
    MasterKey {
        #[command(subcommand)]
        command: MasterKeyCommand,
    },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate the flags and environment and print the effective configuration (no secret is
    /// printed: the admin and master keys are named by where they come from).
    Check {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Mint a key: for a new user's vault, or (`--vault`) another key for an existing one.
    Mint {
        /// The vault (`vlt_...`); without it a new vault is made.
        #[arg(long)]
        vault: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Comma-separated scopes (read, write, delete, admin); default: read,write,delete.
        #[arg(long, value_delimiter = ',')]
        scopes: Option<Vec<String>>,
        #[arg(long)]
        expires_days: Option<u32>,
        /// Confine each request to its own X-Session-ID.
        #[arg(long)]
        session_isolation: bool,
        #[command(flatten)]
        common: Common,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        vault: Option<String>,
        #[arg(long)]
        include_revoked: bool,
        #[command(flatten)]
        common: Common,
    },
    /// One key's record.
    Show {
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Revoke a key now.
    Revoke {
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Replace a key by a new one; the old one works for `--grace-days` more.
    Rotate {
        id: String,
        #[arg(long, default_value_t = 0)]
        grace_days: u32,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
pub enum VaultsCommand {
    /// Every vault with its counts.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// One vault's counts.
    Stats {
        vault: String,
        #[command(flatten)]
        common: Common,
    },
    /// Write every memory of a vault as JSON Lines (the upload format), to `--out` or stdout.
    Export {
        vault: String,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Upload a JSON Lines file (an export, or MemoryRouter's upload format) into a vault.
    Import {
        vault: String,
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Erase a vault: its data key destroyed, every memory removed, its keys revoked.
    Erase {
        vault: String,
        /// Say yes: an erasure cannot be undone.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
pub enum MasterKeyCommand {
    /// Wrap every data key with a new master key, in one atomic replacement of the keyring;
    /// the daemon must be stopped. Then start it with the new key.
    Rewrap {
        /// The new master key's file: read if it exists (64 hex digits), else generated there
        /// (mode 0600).
        #[arg(long)]
        new_key_file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
}

/// What every store command takes: the daemon's own flags (so the same environment file
/// serves both), where its admin API is, and the output format.
#[derive(Args)]
pub struct Common {
    #[command(flatten)]
    pub flags: Flags,
    /// The running daemon's admin API, e.g. http://127.0.0.1:8081. Default: the
    /// `--admin-listen` address, else `--listen`.
    #[arg(long, env = "MEMORY_SIDECAR_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// Print the API's JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a subcommand other than `serve`.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => unreachable!("main.rs serves"),
        Command::Config {
            command: ConfigCommand::Check { common },
        } => config_check(common),
        Command::Restore {
            from,
            without_tombstones,
            common,
        } => restore_command(&from, without_tombstones, common),
        Command::MasterKey {
            command:
                MasterKeyCommand::Rewrap {
                    new_key_file,
                    common,
                },
        } => rewrap(&new_key_file, common),
        Command::Backup { to, common } => backup(&to, common),
        Command::ApplyTombstones {
            journals,
            since,
            common,
        } => apply_tombstones_command(&journals, &since, common),
        Command::Check { common } => with_session(common, |session, json| {
            let report = session.call(Method::GET, "/v1/admin/check", None)?;
            print_check(json, &report)
        }),
        Command::Keys { command } => keys(command),
        Command::Vaults { command } => vaults(command),
    }
}

/// A backup goes where the daemon's `--backup-dir` says (the API writes nowhere else): `--to`
/// names a new directory in it. Without a running daemon, the command writes `--to` itself.
fn backup(to: &Path, mut common: Common) -> anyhow::Result<()> {
    let to = absolute(to)?;
    let (Some(parent), Some(name)) = (to.parent(), to.file_name().and_then(|n| n.to_str())) else {
        bail!("--to must name a new directory, got {}", to.display());
    };
    let config = common.flags.clone().validate()?;
    if data_dir_in_use(&config.data_dir)? {
        let root = absolute(&config.backup_dir)?;
        if different_dirs(&root, parent)? {
            bail!(
                "the running daemon writes backups under its --backup-dir {} only: pass \
                 --to {}/NAME (and the same --backup-dir or MEMORY_SIDECAR_BACKUP_DIR as the \
                 daemon's)",
                root.display(),
                root.display()
            );
        }
    } else {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        common.flags.backup_dir = Some(parent.to_owned());
    }
    let name = name.to_owned();
    with_session(common, |session, json| {
        let taken = session.call(
            Method::POST,
            "/v1/admin/backup",
            Some(json!({"name": name})),
        )?;
        print(json, &taken, |m| {
            format!(
                "backup written to {}: {} vaults, {} keys, {} memories; writes paused {} ms",
                text(&m["path"]),
                m["counts"]["vaults"],
                m["counts"]["keys"],
                m["counts"]["memories"],
                m["writes_paused_ms"]
            )
        });
        Ok(())
    })
}

/// Whether two paths name different directories (either may not exist yet).
fn different_dirs(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let resolve = |path: &Path| path.canonicalize().unwrap_or_else(|_| path.to_owned());
    Ok(resolve(a) != resolve(b))
}

fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Mint {
            vault,
            name,
            scopes,
            expires_days,
            session_isolation,
            common,
        } => with_session(common, |session, json| {
            let mut body = json!({"session_isolation": session_isolation});
            if let Some(vault) = vault {
                body["vault_id"] = json!(vault);
            }
            if let Some(name) = name {
                body["name"] = json!(name);
            }
            if let Some(scopes) = scopes {
                body["scopes"] = json!(scopes);
            }
            if let Some(days) = expires_days {
                body["expires_days"] = json!(days);
            }
            let minted = session.call(Method::POST, "/v1/keys", Some(body))?;
            print(json, &minted, |m| {
                format!(
                    "{}\nid {}  vault {}  (the key is shown once: give it to the user's gateway)",
                    text(&m["key"]),
                    text(&m["key_info"]["id"]),
                    text(&m["key_info"]["vault_id"])
                )
            });
            Ok(())
        }),
        KeysCommand::List {
            vault,
            include_revoked,
            common,
        } => with_session(common, |session, json| {
            let mut path = format!("/v1/keys?limit=1000&include_revoked={include_revoked}");
            if let Some(vault) = &vault {
                path.push_str(&format!("&vault_id={}", path_part(vault)?));
            }
            let keys = session.every_page(&path, "keys")?;
            let all = Value::Array(keys);
            print(json, &all, |keys| {
                table(
                    keys,
                    &[
                        "id",
                        "vault_id",
                        "status",
                        "name",
                        "created_at",
                        "last_used_at",
                    ],
                )
            });
            Ok(())
        }),
        KeysCommand::Show { id, common } => with_session(common, |session, json| {
            let info = session.call(Method::GET, &format!("/v1/keys/{}", path_part(&id)?), None)?;
            print(json, &info, fields);
            Ok(())
        }),
        KeysCommand::Revoke { id, common } => with_session(common, |session, json| {
            session.call(
                Method::DELETE,
                &format!("/v1/keys/{}", path_part(&id)?),
                None,
            )?;
            print(json, &json!({"revoked": id}), |_| format!("revoked {id}"));
            Ok(())
        }),
        KeysCommand::Rotate {
            id,
            grace_days,
            common,
        } => with_session(common, |session, json| {
            let minted = session.call(
                Method::POST,
                &format!("/v1/keys/{}/rotate", path_part(&id)?),
                Some(json!({"grace_days": grace_days})),
            )?;
            print(json, &minted, |m| {
                format!(
                    "{}\nid {} replaces {id}, which stops in {grace_days} days",
                    text(&m["key"]),
                    text(&m["key_info"]["id"])
                )
            });
            Ok(())
        }),
    }
}

fn vaults(command: VaultsCommand) -> anyhow::Result<()> {
    match command {
        VaultsCommand::List { common } => with_session(common, |session, json| {
            let vaults = session.every_page("/v1/vaults?limit=1000", "vaults")?;
            let all = Value::Array(vaults);
            print(json, &all, |vaults| {
                table(
                    vaults,
                    &[
                        "vault_id",
                        "memories",
                        "pending",
                        "active_keys",
                        "keys",
                        "erasing",
                    ],
                )
            });
            Ok(())
        }),
        VaultsCommand::Stats { vault, common } => with_session(common, |session, json| {
            let info = session.call(
                Method::GET,
                &format!("/v1/vaults/{}", path_part(&vault)?),
                None,
            )?;
            print(json, &info, fields);
            Ok(())
        }),
        VaultsCommand::Export { vault, out, common } => with_session(common, |session, json| {
            let mut output: Box<dyn Write> = match &out {
                // Memory text in the clear: for the operator's eyes only, and never over a file.
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::options()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(path)
                        .with_context(|| {
                            format!("creating {} (it must not exist)", path.display())
                        })?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let exported = session.with_vault_key(&vault, "export", &["read"], |key| {
                let mut count = 0u64;
                let mut cursor = Value::Null;
                loop {
                    let page = session.call_with(
                        Method::POST,
                        "/v1/memory/search",
                        Some(json!({"limit": 1000, "cursor": cursor})),
                        Some(key),
                    )?;
                    for memory in page["memories"].as_array().into_iter().flatten() {
                        serde_json::to_writer(&mut output, memory)?;
                        output.write_all(b"\n")?;
                        count += 1;
                    }
                    cursor = page["next_cursor"].clone();
                    if cursor.is_null() {
                        break;
                    }
                }
                output.flush()?;
                Ok(count)
            })?;
            if out.is_some() || json {
                let summary = json!({"vault_id": vault, "exported": exported});
                print(json, &summary, |_| {
                    format!("exported {exported} memories of {vault}")
                });
            }
            Ok(())
        }),
        VaultsCommand::Import {
            vault,
            file,
            common,
        } => with_session(common, |session, json| {
            let input = std::io::BufReader::new(
                std::fs::File::open(&file)
                    .with_context(|| format!("opening {}", file.display()))?,
            );
            let mut total = json!({"total": 0, "processed": 0, "failed": 0, "stored": 0,
                "duplicates": 0, "errors": []});
            session.with_vault_key(&vault, "import", &["write"], |key| {
                let mut batch = Vec::new();
                let (mut lines, mut first_line) = (0, 1);
                let send = |batch: &mut Vec<u8>, first_line: usize, total: &mut Value| {
                    if batch.is_empty() {
                        return anyhow::Ok(());
                    }
                    let result = session.upload(key, std::mem::take(batch))?;
                    for field in ["total", "processed", "failed", "stored", "duplicates"] {
                        let sum = total[field].as_u64().unwrap_or(0)
                            + result["stats"][field].as_u64().unwrap_or(0);
                        total[field] = json!(sum);
                    }
                    // Line numbers of the file, not of the request.
                    for error in result["errors"].as_array().into_iter().flatten() {
                        let mut error = error.clone();
                        let line = error["line"].as_u64().unwrap_or(0) + first_line as u64 - 1;
                        error["line"] = json!(line);
                        if let Some(errors) = total["errors"].as_array_mut() {
                            errors.push(error);
                        }
                    }
                    Ok(())
                };
                for (number, line) in input.lines().enumerate() {
                    let line = line.with_context(|| format!("reading {}", file.display()))?;
                    if batch.len() + line.len() > IMPORT_BATCH_BYTES || lines == IMPORT_BATCH_LINES
                    {
                        send(&mut batch, first_line, &mut total)?;
                        lines = 0;
                    }
                    if lines == 0 {
                        first_line = number + 1;
                    }
                    batch.extend_from_slice(line.as_bytes());
                    batch.push(b'\n');
                    lines += 1;
                }
                send(&mut batch, first_line, &mut total)
            })?;
            print(json, &total, |t| {
                let mut out = format!(
                    "imported into {vault}: {} of {} lines taken, {} memories stored, {} already there",
                    t["processed"], t["total"], t["stored"], t["duplicates"]
                );
                for error in t["errors"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\nline {}: {}: {}",
                        error["line"],
                        text(&error["code"]),
                        text(&error["message"])
                    ));
                }
                out
            });
            if total["failed"].as_u64().unwrap_or(0) > 0 {
                bail!(
                    "{} lines of {} were refused",
                    total["failed"],
                    file.display()
                );
            }
            Ok(())
        }),
        VaultsCommand::Erase { vault, yes, common } => {
            if !yes {
                bail!("erasing {vault} cannot be undone: add --yes");
            }
            with_session(common, |session, json| {
                let erased = session.call(
                    Method::DELETE,
                    &format!("/v1/vaults/{}", path_part(&vault)?),
                    None,
                )?;
                print(json, &erased, |e| {
                    format!(
                        "erased {vault}: {} memories, its keys revoked",
                        e["deleted"]
                    )
                });
                Ok(())
            })
        }
    }
}

/// Lines and bytes per upload request of an import (within the daemon's bounds: 10,000 lines,
/// `--max-upload-bytes` 16 MiB by default).
const IMPORT_BATCH_LINES: usize = 5_000;
const IMPORT_BATCH_BYTES: usize = 4 << 20;

/// A connection to a daemon's admin API: the running daemon's, or one this command hosts.
struct Session {
    runtime: tokio::runtime::Runtime,
    /// The admin API, and the gateway's listener (the memory routes an export or import uses
    /// with a key of the vault): the same address unless the daemon has `--admin-listen`.
    address: Endpoint,
    gateway: Endpoint,
    admin_key: String,
    hosted: Option<Hosted>,
}

/// The daemon this command runs for itself when none is running.
struct Hosted {
    app: Arc<App>,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn with_session(
    common: Common,
    work: impl FnOnce(&Session, bool) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let json = common.json;
    let session = Session::open(common)?;
    let result = work(&session, json);
    let closed = session.close();
    result.and(closed)
}

impl Session {
    fn open(common: Common) -> anyhow::Result<Session> {
        let config = common.flags.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        if data_dir_in_use(&config.data_dir)? {
            let address = admin_address(common.admin_url.as_deref(), &config)?;
            let admin_key = read_admin_key(&config.data_dir)?;
            return Ok(Session {
                runtime,
                address,
                gateway: endpoint(&config.listen[0])?,
                admin_key,
                hosted: None,
            });
        }
        if !config.data_dir.join("store").exists() {
            bail!(
                "no store in {}: the daemon has not run there (or --data-dir names another \
                 directory)",
                config.data_dir.display()
            );
        }
        let admin_key = AdminKey::generate_text();
        let master = crate::app::master_key(&config)?;
        let http = HttpConfig {
            surface: Surface::All,
            ..config.http.clone()
        };
        let app = App::open(
            config,
            AdminKey::new(&admin_key)?,
            master,
            Metrics::new()?,
            Arc::new(SystemClock),
        )?;
        app.start()?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (address, server) = runtime.block_on(async {
            let listener =
                tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
            let address = Endpoint::Tcp(listener.local_addr()?);
            let mut stopped = stopped;
            let until = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            let server = tokio::spawn(serve(app.clone(), listener, http, until));
            anyhow::Ok((address, server))
        })?;
        let started = std::time::Instant::now();
        let mut said = false;
        while !app.is_ready() {
            if !said && started.elapsed() > Duration::from_secs(2) {
                eprintln!("memory-sidecar: waiting for the store's replay to finish");
                said = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Session {
            runtime,
            gateway: address.clone(),
            address,
            admin_key,
            hosted: Some(Hosted { app, stop, server }),
        })
    }

    fn close(self) -> anyhow::Result<()> {
        let Some(hosted) = self.hosted else {
            return Ok(());
        };
        let _ = hosted.stop.send(true);
        self.runtime.block_on(hosted.server)??;
        drop(self.runtime);
        hosted.app.close()
    }

    /// Every item of a paged admin list (`field` of each page, `next_cursor` followed).
    fn every_page(&self, path: &str, field: &str) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = match &cursor {
                Some(cursor) => format!("{path}&cursor={}", path_part(cursor)?),
                None => path.to_owned(),
            };
            let page = self.call(Method::GET, &page, None)?;
            items.extend(page[field].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return Ok(items),
            }
        }
    }

    /// Calls the admin API with the admin key; the answer's JSON, or the API's error.
    fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call_with(method, path, body, None)
    }

    /// The same with another credential (a memory key).
    fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> anyhow::Result<Value> {
        let body = match body {
            Some(value) => Bytes::from(serde_json::to_vec(&value)?),
            None => Bytes::new(),
        };
        match key {
            Some(key) => self.send(method, path, body, "application/json", key),
            None => self.send(method, path, body, "application/json", &self.admin_key),
        }
    }

    fn upload(&self, key: &str, lines: Vec<u8>) -> anyhow::Result<Value> {
        self.send(
            Method::POST,
            "/v1/memory/upload",
            Bytes::from(lines),
            "application/x-ndjson",
            key,
        )
    }

    fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: &str,
        credential: &str,
    ) -> anyhow::Result<Value> {
        let address = if credential == self.admin_key {
            self.address.clone()
        } else {
            self.gateway.clone()
        };
        let host = match &address {
            Endpoint::Tcp(address) => address.to_string(),
            Endpoint::Unix(_) => "localhost".to_owned(),
        };
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {credential}"))
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(body))?;
        let (status, bytes) = self.runtime.block_on(async {
            match &address {
                Endpoint::Tcp(at) => {
                    let stream = tokio::net::TcpStream::connect(at).await;
                    exchange(stream.with_context(|| connecting(&address))?, request).await
                }
                Endpoint::Unix(at) => {
                    let stream = tokio::net::UnixStream::connect(at).await;
                    exchange(stream.with_context(|| connecting(&address))?, request).await
                }
            }
        })?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).with_context(|| {
                format!("{method} {path} answered {status} with a body that is not JSON")
            })?
        };
        if !status.is_success() {
            let code = value["error"]["code"].as_str().unwrap_or("?");
            let message = value["error"]["message"].as_str().unwrap_or("");
            if status == StatusCode::NOT_FOUND && code == "not_found" {
                bail!(
                    "{method} {path}: 404 not_found: {address} does not serve the admin API (with \
                     --admin-listen the daemon serves it there: pass --admin-url)"
                );
            }
            bail!("{method} {path}: {} {code}: {message}", status.as_u16());
        }
        Ok(value)
    }

    /// Runs `work` with a key of the vault minted for it alone, revoked afterwards whatever
    /// happened (both audited): an export or import goes through the same routes as a user's.
    fn with_vault_key<T>(
        &self,
        vault: &str,
        purpose: &str,
        scopes: &[&str],
        work: impl FnOnce(&str) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let minted = self.call(
            Method::POST,
            "/v1/keys",
            Some(json!({
                "vault_id": vault,
                "name": format!("memory-sidecar vaults {purpose}"),
                "scopes": scopes,
                "expires_days": 1,
            })),
        )?;
        let key = minted["key"].as_str().context("the minted key")?.to_owned();
        let id = minted["key_info"]["id"]
            .as_str()
            .context("the minted key's id")?
            .to_owned();
        let result = work(&key);
        let revoked = self.call(Method::DELETE, &format!("/v1/keys/{id}"), None);
        let value = result?;
        revoked.context("revoking the key minted for the command")?;
        Ok(value)
    }
}

/// Where a command reaches the daemon.
#[derive(Clone, Debug)]
enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(address) => write!(f, "http://{address}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

fn connecting(endpoint: &Endpoint) -> String {
    format!("connecting to the daemon's API at {endpoint}")
}

/// One request and its answer over a fresh connection.
async fn exchange<IO>(io: IO, request: Request<Full<Bytes>>) -> anyhow::Result<(StatusCode, Bytes)>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// The admin API's endpoint: `--admin-url` (`http://host:port` or `unix:/path`), else the first
/// admin listener, else the first listener.
fn admin_address(url: Option<&str>, config: &Config) -> anyhow::Result<Endpoint> {
    if let Some(url) = url {
        let listen: Listen = match url.strip_prefix("http://") {
            Some(rest) => rest.trim_end_matches('/').parse(),
            None => url.parse(),
        }
        .map_err(|error| anyhow::anyhow!("--admin-url: {error}"))?;
        return endpoint(&listen);
    }
    endpoint(config.admin_listen.first().unwrap_or(&config.listen[0]))
}

/// Where to connect for a listener (one on every address is reached on this host's loopback).
fn endpoint(listen: &Listen) -> anyhow::Result<Endpoint> {
    match listen {
        Listen::Unix(path) => Ok(Endpoint::Unix(path.clone())),
        Listen::Tcp(text) => {
            let mut address = text
                .to_socket_addrs()
                .with_context(|| format!("resolving {text}"))?
                .next()
                .with_context(|| format!("{text} resolves to no address"))?;
            if address.ip().is_unspecified() {
                address.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
            }
            Ok(Endpoint::Tcp(address))
        }
    }
}

/// The running daemon's admin key: `MEMORY_SIDECAR_ADMIN_KEY`, else `<data-dir>/admin.key`.
fn read_admin_key(data_dir: &Path) -> anyhow::Result<String> {
    if let Ok(text) = std::env::var("MEMORY_SIDECAR_ADMIN_KEY") {
        return Ok(text.trim().to_owned());
    }
    let path = data_dir.join("admin.key");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "the daemon runs, and its admin key is needed: set MEMORY_SIDECAR_ADMIN_KEY or run as \
             a user who can read {}",
            path.display()
        )
    })?;
    Ok(text.trim().to_owned())
}

fn config_check(common: Common) -> anyhow::Result<()> {
    let config = common.flags.validate()?;
    let admin_key = if std::env::var_os("MEMORY_SIDECAR_ADMIN_KEY").is_some() {
        "from MEMORY_SIDECAR_ADMIN_KEY".to_owned()
    } else {
        format!("file {}", config.data_dir.join("admin.key").display())
    };
    let master_key = if std::env::var_os("MEMORY_SIDECAR_MASTER_KEY").is_some() {
        "from MEMORY_SIDECAR_MASTER_KEY".to_owned()
    } else {
        format!("file {}", config.master_key_file.display())
    };
    let effective = json!({
        "valid": true,
        "admin_key": admin_key,
        "master_key": master_key,
        "config": format!("{config:#?}"),
    });
    if common.json {
        println!("{}", serde_json::to_string_pretty(&effective)?);
    } else {
        println!("configuration is valid\nadmin key: {admin_key}\nmaster key: {master_key}");
        println!("{config:#?}");
    }
    Ok(())
}

fn apply_tombstones_command(
    journals: &[PathBuf],
    since: &str,
    common: Common,
) -> anyhow::Result<()> {
    let config = common.flags.clone().validate()?;
    if matches!(config.store, crate::config::StoreConfig::Sled) {
        bail!(
            "apply-tombstones is for a store in PostgreSQL (--store postgresql://...); an embedded \
             store is restored with `restore`, which applies its journal itself"
        );
    }
    let since_ms =
        time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
            .with_context(|| format!("--since {since:?} is not an RFC 3339 time"))?
            .unix_timestamp_nanos()
            / 1_000_000;
    let master = crate::app::master_key(&config)?;
    let store = crate::app::open_store(&config, master, &Metrics::new()?)?;
    let applied = crate::app::backup::apply_tombstones(
        store.as_ref(),
        journals,
        i64::try_from(since_ms).unwrap_or(i64::MAX),
        SystemClock.now_ms(),
    )?;
    if common.json {
        println!("{}", serde_json::to_string_pretty(&applied)?);
    } else {
        println!(
            "tombstones applied from {} journal(s): {} ({} vaults erased, {} emptied, {} memories \
             deleted, {} keys revoked)",
            journals.len(),
            applied.tombstones_applied,
            applied.vaults_erased,
            applied.vaults_emptied,
            applied.memories_deleted,
            applied.keys_revoked
        );
    }
    Ok(())
}

fn restore_command(from: &Path, without_tombstones: bool, common: Common) -> anyhow::Result<()> {
    let json = common.json;
    let config = common.flags.clone().validate()?;
    let report = restore(
        from,
        &config.data_dir,
        (!without_tombstones).then_some(config.tombstone_log.as_path()),
        &config.master_key_file,
        SystemClock.now_ms(),
    )?;
    let restored = serde_json::to_value(&report)?;
    if !json {
        println!(
            "restored {} into {}: {} vaults, {} keys, {} memories",
            from.display(),
            config.data_dir.display(),
            report.manifest.counts.vaults,
            report.manifest.counts.keys,
            report.manifest.counts.memories
        );
        match (&report.tombstone_log, report.journal_matches) {
            (Some(journal), matches) => println!(
                "tombstones applied from {}: {}{} ({} vaults erased, {} emptied, {} memories \
                 deleted, {} keys revoked)",
                journal.display(),
                report.applied.tombstones_applied,
                if matches == Some(false) {
                    " (every entry: the backup counted in another journal)"
                } else {
                    ""
                },
                report.applied.vaults_erased,
                report.applied.vaults_emptied,
                report.applied.memories_deleted,
                report.applied.keys_revoked
            ),
            (None, _) => println!(
                "--without-tombstones: the restore holds what the backup held (erasures and \
                 revocations since it included)"
            ),
        }
    }
    // The restored directory is checked as the daemon would open it.
    let check = Common {
        flags: common.flags,
        admin_url: None,
        json,
    };
    with_session(check, |session, _| {
        let report = session.call(Method::GET, "/v1/admin/check", None)?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"restore": restored, "check": report}))?
            );
            if report["ok"] != Value::Bool(true) {
                bail!("the restored store failed its check");
            }
            return Ok(());
        }
        print_check(false, &report)
    })
}

fn rewrap(new_key_file: &Path, common: Common) -> anyhow::Result<()> {
    let config = common.flags.validate()?;
    // Held until the new keyring is in place: no daemon may open the old one meanwhile.
    let _lock = lock_data_dir(&config.data_dir).map_err(|_| {
        anyhow::anyhow!(
            "{} is in use: stop the daemon first (the keyring is replaced whole)",
            config.data_dir.display()
        )
    })?;
    let keyring = config.data_dir.join("keyring");
    if !keyring.exists() {
        bail!("no keyring at {}", keyring.display());
    }
    let old = MasterKey::load(&config.master_key_file, &keyring)?;
    let new_text = crate::fsio::secret_file(
        new_key_file,
        "new master key",
        true,
        MasterKey::generate_hex,
    )?;
    let new = MasterKey::from_hex(new_text.trim())
        .with_context(|| format!("{}", new_key_file.display()))?;
    let vaults = Keyring::rewrap(&keyring, &old, &new)?;
    let done = json!({"rewrapped": vaults, "new_key_file": new_key_file});
    print(common.json, &done, |_| {
        format!(
            "rewrapped {vaults} data keys with the key in {}: start the daemon with \
             --master-key-file {} (or MEMORY_SIDECAR_MASTER_KEY), then destroy the old key",
            new_key_file.display(),
            new_key_file.display()
        )
    });
    Ok(())
}

fn print_check(json: bool, report: &Value) -> anyhow::Result<()> {
    print(json, report, |r| {
        let mut out = format!(
            "{} vaults, {} keys, {} memories, {} vectors, {} pending, {} indexes rebuilt, {} \
             tombstones ({:.1} s)",
            r["vaults"],
            r["keys"],
            r["memories"],
            r["vectors"],
            r["pending"],
            r["indexes_rebuilt"],
            r["tombstones"],
            r["seconds"].as_f64().unwrap_or(0.0)
        );
        if r["ok"] == Value::Bool(true) {
            out.push_str("\nok");
        }
        for problem in r["problems"].as_array().into_iter().flatten() {
            out.push_str(&format!("\nproblem: {}", text(problem)));
        }
        out
    });
    if report["ok"] != Value::Bool(true) {
        bail!("the check found {} problems", report["problem_count"]);
    }
    Ok(())
}

fn print(json: bool, value: &Value, human: impl FnOnce(&Value) -> String) {
    let out = if json {
        serde_json::to_string_pretty(value).unwrap_or_default()
    } else {
        human(value)
    };
    println!("{out}");
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// `field: value` lines of an object.
fn fields(value: &Value) -> String {
    value
        .as_object()
        .map(|object| {
            object
                .iter()
                .map(|(key, value)| format!("{key}: {}", text(value)))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|| text(value))
}

/// A tab-separated table of some fields of each object, with a header.
fn table(rows: &Value, columns: &[&str]) -> String {
    let mut out = columns.join("\t");
    for row in rows.as_array().into_iter().flatten() {
        out.push('\n');
        let cells: Vec<String> = columns.iter().map(|c| text(&row[*c])).collect();
        out.push_str(&cells.join("\t"));
    }
    out
}

/// An id as one path segment: refused if it could reach another route.
fn path_part(id: &str) -> anyhow::Result<&str> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("{id:?} is not an id (letters, digits and `_`)");
    }
    Ok(id)
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    Ok(std::env::current_dir()?.join(path))
}
