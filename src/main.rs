//! The `memory-sidecar` binary: flags -> Config -> tracing -> App -> serve -> exit code.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use memory_sidecar::app::App;
use memory_sidecar::auth::AdminKey;
use memory_sidecar::config::{Config, Flags, LogFormat};
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
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let path = data_dir.join("admin.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the admin key file is readable by others; chmod 600 it");
            }
            tracing::info!(path = %path.display(), "admin key read from file");
            AdminKey::new(text.trim()).with_context(|| format!("{}", path.display()))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let text = AdminKey::generate_text();
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            tracing::info!(path = %path.display(), "generated a new admin key (mode 0600)");
            AdminKey::new(&text)
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
        let metrics = Metrics::new()?;
        let listen = config.listen;
        let app = App::open(config, admin, metrics)?;
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
