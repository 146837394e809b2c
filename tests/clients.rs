//! MemoryRouter's own Python clients, unchanged, against the real daemon: `langchain-memoryrouter`
//! (its client, LangGraph nodes, store and tools), `hermes-memoryrouter`, MemoryRouter's Open
//! WebUI upload request; and the official MCP Python SDK against `POST /mcp`. The scripts are
//! in `tests/clients/`; `make pyenv` installs their pinned packages into `target/pyenv`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, ADMIN_KEY};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The virtual environment's Python, or `None` (said, and a failure under CI) without it.
fn python() -> Option<PathBuf> {
    let python = root().join("target/pyenv/bin/python");
    if python.exists() {
        Some(python)
    } else {
        common::skip("target/pyenv is missing: run `make pyenv` (make test does)");
        None
    }
}

/// Runs one of the scripts against a fresh daemon and fails with its output unless every
/// check passed.
fn run_script(script: &str) {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--key-rate-per-second", "0"]);
    let mut child = Command::new(python)
        .arg(root().join("tests/clients").join(script))
        .env("MR_BASE_URL", format!("http://{}", daemon.addr))
        .env("MR_ADMIN_KEY", ADMIN_KEY)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the script");
    let started = Instant::now();
    let deadline = Duration::from_secs(600);
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{said}");
    assert!(
        output.status.success(),
        "{script} failed (or ran past {deadline:?}):\n{said}\ndaemon:\n{}",
        daemon.stderr()
    );
}

#[test]
fn memoryrouter_clients_run_unchanged() {
    run_script("memoryrouter_clients.py");
}

#[test]
fn the_mcp_sdk_lists_calls_and_is_refused_by_scope() {
    run_script("mcp_client.py");
}
