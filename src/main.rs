//! The `memory-sidecar` binary: flags -> Config -> tracing -> App -> serve -> close -> exit code;
//! or one of the operator's subcommands (`memory_sidecar::cli`).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use memory_sidecar::app::{App, EXIT_STORAGE_FAILED};
use memory_sidecar::auth::AdminKey;
use memory_sidecar::cli::{self, Cli, Command};
use memory_sidecar::clock::SystemClock;
use memory_sidecar::config::{Config, HttpConfig, Listen, LogFormat, Surface, UnixSocket};
use memory_sidecar::http::{serve, Listener};
use memory_sidecar::metrics::Metrics;
use memory_sidecar::notify;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flags = match cli.command {
        None => cli.flags,
        Some(Command::Serve(flags)) => flags,
        Some(command) => return run_command(command),
    };
    let config = match flags.validate() {
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
        Ok(Stopped::Cleanly) => ExitCode::SUCCESS,
        Ok(Stopped::StorageFailed) => ExitCode::from(EXIT_STORAGE_FAILED),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "start-up or shutdown failed");
            eprintln!("memory-sidecar: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A subcommand other than `serve`: warnings and errors on stderr, the answer on stdout.
fn run_command(command: Command) -> ExitCode {
    let filter = EnvFilter::try_from_env("MEMORY_SIDECAR_CLI_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match cli::run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("memory-sidecar: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log)
        .with_context(|| format!("invalid --log filter {:?}", config.log))?;
    // Colours for a terminal only: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Binds every listener of a list, logs each, and prints `line` and each address on stdout,
/// for scripts and tests that asked for port 0. A closed stdout is no reason to stop: the log
/// says the same.
async fn bind(
    listens: &[Listen],
    unix: &UnixSocket,
    message: &str,
    line: &str,
) -> anyhow::Result<Vec<Listener>> {
    let mut bound = Vec::new();
    for listen in listens {
        for listener in Listener::bind(listen, unix).await? {
            let address = listener.describe();
            tracing::info!(%address, "{message}");
            if let Err(error) = writeln!(std::io::stdout().lock(), "{line} {address}") {
                tracing::warn!(%error, "could not write the listening address to stdout");
            }
            bound.push(listener);
        }
    }
    Ok(bound)
}

/// Why serving ended.
#[derive(Clone, Copy)]
enum Stopped {
    /// SIGTERM or SIGINT.
    Cleanly,
    /// The store failed in the way that needs a restart: drained, then exit code 3.
    StorageFailed,
}

/// Opens the app, serves until SIGTERM or SIGINT (or a storage failure, unless the flag keeps
/// it serving), then closes the app whatever happened.
fn run(config: Config) -> anyhow::Result<Stopped> {
    let keep_serving = config.keep_serving_after_storage_failure;
    let admin = AdminKey::load(&config.data_dir)?;
    let master = memory_sidecar::app::master_key(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("http")
        .build()
        .context("starting the async runtime")?;
    let (listen, admin_listen, unix, http) = (
        config.listen.clone(),
        config.admin_listen.clone(),
        config.unix_socket.clone(),
        config.http.clone(),
    );
    let app = App::open(
        config,
        admin,
        master,
        Metrics::new()?,
        Arc::new(SystemClock),
    )?;
    let served = runtime.block_on(async {
        let listeners = bind(&listen, &unix, "listening", "memory-sidecar listening on").await?;
        let admin_listeners = bind(
            &admin_listen,
            &unix,
            "admin listening",
            "memory-sidecar admin listening on",
        )
        .await?;
        app.start()?;
        if let Some(every) = notify::watchdog_interval() {
            tokio::spawn(watchdog(every));
        }
        // One shutdown for every listener: the first signal (or storage failure) stops all.
        let (stop, stopped) = tokio::sync::watch::channel(None::<Stopped>);
        let until_stopped = |mut stopped: tokio::sync::watch::Receiver<Option<Stopped>>| async move {
            let _ = stopped.wait_for(Option::is_some).await;
        };
        let why = {
            let app = app.clone();
            async move {
                let why = tokio::select! {
                    () = shutdown_signal() => Stopped::Cleanly,
                    () = storage_failure(app), if !keep_serving => Stopped::StorageFailed,
                };
                let _ = stop.send(Some(why));
            }
        };
        tokio::spawn(why);
        let gateway = HttpConfig {
            surface: if admin_listeners.is_empty() {
                Surface::All
            } else {
                Surface::Gateway
            },
            ..http.clone()
        };
        let admin = HttpConfig {
            surface: Surface::Admin,
            ..http
        };
        let mut served = tokio::task::JoinSet::new();
        for (listener, config) in listeners
            .into_iter()
            .map(|l| (l, gateway.clone()))
            .chain(admin_listeners.into_iter().map(|l| (l, admin.clone())))
        {
            served.spawn(serve(
                app.clone(),
                listener,
                config,
                until_stopped(stopped.clone()),
            ));
        }
        while let Some(result) = served.join_next().await {
            result.context("a listener's task")??;
        }
        let why = stopped.borrow().unwrap_or(Stopped::Cleanly);
        anyhow::Ok(why)
    });
    // Off the runtime: closing joins threads and fsyncs.
    let closed = app.close();
    match served? {
        Stopped::StorageFailed => {
            if let Err(error) = closed {
                tracing::warn!(error = %format!("{error:#}"), "closing the failed store");
            }
            tracing::error!(
                code = EXIT_STORAGE_FAILED,
                "stopped after a storage failure; a restart reopens the store"
            );
            Ok(Stopped::StorageFailed)
        }
        Stopped::Cleanly => {
            closed?;
            tracing::info!("stopped cleanly");
            Ok(Stopped::Cleanly)
        }
    }
}

/// Resolves once the store has failed in the way only a restart mends.
async fn storage_failure(app: Arc<App>) {
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        every.tick().await;
        if !app.is_healthy() {
            tracing::error!(
                "the store refuses writes until a restart: draining, then exiting with code {} \
                 (--keep-serving-after-storage-failure keeps serving reads instead)",
                EXIT_STORAGE_FAILED
            );
            return;
        }
    }
}

/// `WATCHDOG=1` from the serving runtime, so that a runtime that stops making progress ends in
/// the service manager's restart (a failed store ends in exit code 3 instead).
async fn watchdog(every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        notify::notify("WATCHDOG=1");
    }
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
