//! The `memory-sidecar` binary: flags -> Config -> tracing -> App -> serve -> close -> exit code.

use std::io::Write;
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

/// Opens the app, serves until SIGTERM or SIGINT, then closes the app whatever happened.
fn run(config: Config) -> anyhow::Result<()> {
    let admin = AdminKey::load(&config.data_dir)?;
    let master = MasterKey::load(&config.master_key_file, &config.data_dir.join("keyring"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("http")
        .build()
        .context("starting the async runtime")?;
    let (listen, http) = (config.listen, config.http.clone());
    let app = App::open(
        config,
        admin,
        master,
        Metrics::new()?,
        Arc::new(SystemClock),
    )?;
    let served = runtime.block_on(async {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let address = listener.local_addr()?;
        tracing::info!(%address, "listening");
        // A machine-readable line on stdout, for scripts and tests that asked for port 0. A
        // closed stdout is no reason to stop: the log above says the same.
        if let Err(error) = writeln!(
            std::io::stdout().lock(),
            "memory-sidecar listening on http://{address}"
        ) {
            tracing::warn!(%error, "could not write the listening address to stdout");
        }
        app.start()?;
        memory_sidecar::http::serve(app.clone(), listener, http, shutdown_signal()).await
    });
    // Off the runtime: closing joins threads and fsyncs.
    let closed = app.close();
    served?;
    closed?;
    tracing::info!("stopped cleanly");
    Ok(())
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
