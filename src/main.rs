//! The `memory-sidecar` binary: flags -> Config -> tracing -> App -> serve -> exit code.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use memory_sidecar::app::App;
use memory_sidecar::auth::AdminKey;
use memory_sidecar::clock::SystemClock;
use memory_sidecar::config::{Config, Flags, LogFormat};
use memory_sidecar::crypto::MasterKey;
use memory_sidecar::metrics::Metrics;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match Flags::parse().validate() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("memory-sidecar: invalid configuration: {error:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = init_tracing(&config) {
        eprintln!("memory-sidecar: {error:#}");
        return ExitCode::from(2);
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "start-up or shutdown failed");
            eprintln!("memory-sidecar: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log)
        .with_context(|| format!("invalid --log filter {:?}", config.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// The admin key from `MEMORY_SIDECAR_ADMIN_KEY`, or from `<data-dir>/admin.key`, created with
/// mode 0600 on first start. The log says where the key is, never what it is.
fn admin_key(data_dir: &Path) -> anyhow::Result<AdminKey> {
    if let Ok(text) = std::env::var("MEMORY_SIDECAR_ADMIN_KEY") {
        tracing::info!("admin key taken from MEMORY_SIDECAR_ADMIN_KEY");
        return AdminKey::new(text.trim()).context("MEMORY_SIDECAR_ADMIN_KEY");
    }
    let path = data_dir.join("admin.key");
    let text = secret_file(&path, "admin key", true, AdminKey::generate_text)?;
    AdminKey::new(text.trim()).with_context(|| format!("{}", path.display()))
}

/// The master key from `MEMORY_SIDECAR_MASTER_KEY`, or from its file, created with mode 0600
/// on first start only: once a keyring exists, a missing master key is an error, never a new
/// key (which could not open the vaults sealed under the old one).
fn master_key(config: &Config) -> anyhow::Result<MasterKey> {
    if let Ok(text) = std::env::var("MEMORY_SIDECAR_MASTER_KEY") {
        tracing::info!("master key taken from MEMORY_SIDECAR_MASTER_KEY");
        return MasterKey::from_hex(&text).context("MEMORY_SIDECAR_MASTER_KEY");
    }
    let path = &config.master_key_file;
    let keyring = config.data_dir.join("keyring");
    let first_start = !keyring.exists();
    let text = secret_file(path, "master key", first_start, MasterKey::generate_hex).with_context(
        || {
            format!(
                "the keyring {} exists, so its master key is needed: restore {} or set \
                 MEMORY_SIDECAR_MASTER_KEY",
                keyring.display(),
                path.display()
            )
        },
    )?;
    MasterKey::from_hex(&text).with_context(|| format!("{}", path.display()))
}

/// Reads a secret file, or creates it (mode 0600, fsynced) from `generate` when `create` is set
/// and it does not exist. Warns when the file is readable by others.
fn secret_file(
    path: &Path,
    what: &str,
    create: bool,
    generate: fn() -> String,
) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the {what} file is readable by others; chmod 600 it");
            }
            tracing::info!(path = %path.display(), "{what} read from file");
            Ok(text)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && create => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let text = generate();
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            memory_sidecar::crypto::sync_parent(path)?;
            tracing::info!(path = %path.display(), "generated a new {what} (mode 0600)");
            Ok(text)
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let admin = admin_key(&config.data_dir)?;
        let master = master_key(&config)?;
        let metrics = Metrics::new()?;
        let listen = config.listen;
        let app = App::open(config, admin, master, metrics, Arc::new(SystemClock))?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let address = listener.local_addr()?;
        tracing::info!(%address, "listening");
        // A machine-readable line on stdout, for scripts and tests that asked for port 0.
        println!("memory-sidecar listening on http://{address}");
        app.start()?;
        memory_sidecar::http::serve(app.clone(), listener, shutdown_signal()).await?;
        app.close()?;
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("could not install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}
