//! Test harness: the real `memory-sidecar` binary on 127.0.0.1:0 with a temp data dir and the
//! real model, plus a small blocking HTTP/1.1 client that can also send malformed or slow
//! requests. No fixed ports; readiness is polled, never slept for.

#![allow(dead_code)]

pub mod corpus;
pub mod fleet;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdefghijklmnopqrstuvwxyz";
pub const MASTER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// Where the manual clock of an in-process daemon starts: 2027-01-15T08:00:00Z.
/// Daemon flags that leave the dense side alone in the ranking (the model's cosine only).
pub const DENSE_ONLY: &[&str] = &[
    "--dense-weight",
    "1",
    "--neighbour-weight",
    "0",
    "--min-lexical",
    "1000",
];
pub const CLOCK_START_MS: i64 = 1_800_000_000_000;
const DEADLINE: Duration = Duration::from_secs(60);

pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// The daemon's HTTP API, wherever it runs (a child process or in this process).
pub struct Client {
    pub addr: SocketAddr,
}

pub struct Daemon {
    child: Child,
    client: Client,
    pub data_dir: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl std::ops::Deref for Daemon {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `Server-Timing` header's metrics, as (name, milliseconds), in order; empty when
    /// there is none. Panics on a malformed one.
    pub fn server_timing(&self) -> Vec<(String, f64)> {
        let Some(timing) = self.header("server-timing") else {
            return Vec::new();
        };
        timing
            .split(", ")
            .map(|part| {
                let (name, dur) = part
                    .split_once(";dur=")
                    .unwrap_or_else(|| panic!("Server-Timing {timing:?}: expected name;dur=ms"));
                let ms = dur.parse().unwrap_or_else(|_| {
                    panic!("Server-Timing {timing:?}: {dur:?} is not a number")
                });
                (name.to_owned(), ms)
            })
            .collect()
    }

    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Where the daemon's stdout goes.
#[derive(Clone, Copy)]
enum Stdout {
    /// To the harness, which reads the address line and then drains it.
    Piped,
    /// Into a pipe whose reader is closed.
    Closed,
}

impl Daemon {
    /// Starts the daemon and waits until `/readyz` answers 200.
    pub fn start(data_dir: &Path, args: &[&str]) -> Daemon {
        let daemon = Daemon::spawn(data_dir, args);
        daemon.wait_ready();
        daemon
    }

    /// Starts the daemon and returns once it listens (it may still be replaying).
    pub fn spawn(data_dir: &Path, args: &[&str]) -> Daemon {
        Daemon::try_spawn(data_dir, args).unwrap_or_else(|stderr| {
            panic!("the daemon exited instead of listening; stderr:\n{stderr}")
        })
    }

    /// [`Daemon::spawn`], or the daemon's stderr if it exits before it listens (a refused
    /// start-up).
    pub fn try_spawn(data_dir: &Path, args: &[&str]) -> Result<Daemon, String> {
        Daemon::launch(data_dir, args, &[], Stdout::Piped)
    }

    /// [`Daemon::spawn`] with extra environment variables (e.g. systemd's `NOTIFY_SOCKET`).
    pub fn spawn_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::launch(data_dir, args, env, Stdout::Piped).unwrap_or_else(|stderr| {
            panic!("the daemon exited instead of listening; stderr:\n{stderr}")
        })
    }

    /// Starts the daemon with its stdout a pipe nobody reads (the reader is closed), so every
    /// write to it fails, and finds its address in its log instead; waits until ready.
    pub fn start_with_closed_stdout(data_dir: &Path, args: &[&str]) -> Daemon {
        let daemon = Daemon::launch(data_dir, args, &[], Stdout::Closed).unwrap_or_else(|stderr| {
            panic!("the daemon exited instead of listening; stderr:\n{stderr}")
        });
        daemon.wait_ready();
        daemon
    }

    fn launch(
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        stdout: Stdout,
    ) -> Result<Daemon, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_memory-sidecar"));
        for (name, _) in std::env::vars() {
            if name.starts_with("MEMORY_SIDECAR_") {
                command.env_remove(name);
            }
        }
        command
            .env("MEMORY_SIDECAR_ADMIN_KEY", ADMIN_KEY)
            .env("MEMORY_SIDECAR_MASTER_KEY", MASTER_KEY)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir);
        if !args.contains(&"--models-dir") {
            command.arg("--models-dir").arg(models_dir());
        }
        command
            .envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        match stdout {
            Stdout::Piped => command.stdout(Stdio::piped()),
            Stdout::Closed => {
                let (reader, writer) = std::io::pipe().expect("a pipe");
                drop(reader);
                command.arg("--log-format").arg("json").stdout(writer)
            }
        };
        let mut child = command.spawn().expect("spawning memory-sidecar");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let err_pipe = child.stderr.take().expect("stderr piped");
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match stdout {
            Stdout::Piped => {
                let mut stdout = BufReader::new(child.stdout.take().expect("stdout piped"));
                let mut line = String::new();
                stdout
                    .read_line(&mut line)
                    .expect("reading the daemon's stdout");
                let Some(addr) = line
                    .trim()
                    .strip_prefix("memory-sidecar listening on http://")
                else {
                    // stdout closed: the daemon is exiting; collect all it said.
                    child.wait().expect("reaping the daemon");
                    reader.join().expect("the stderr reader");
                    return Err(format!(
                        "stdout {line:?}, stderr:\n{}",
                        stderr.lock().unwrap().join("\n")
                    ));
                };
                let addr = addr.parse().expect("a socket address");
                // Keep reading stdout: a closed pipe would make any later print in the daemon
                // (a library's println!) fail, and Rust's print panics on a write error.
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut stdout, &mut std::io::sink());
                });
                addr
            }
            Stdout::Closed => {
                let started = Instant::now();
                loop {
                    let listening = stderr.lock().unwrap().iter().find_map(|line| {
                        let event: Value = serde_json::from_str(line).ok()?;
                        if event["message"] != "listening" {
                            return None;
                        }
                        let address = event["address"].as_str()?;
                        let address = address.strip_prefix("http://").unwrap_or(address);
                        address.parse::<SocketAddr>().ok()
                    });
                    if let Some(addr) = listening {
                        break addr;
                    }
                    if child.try_wait().expect("try_wait").is_some() || started.elapsed() > DEADLINE
                    {
                        let _ = child.kill();
                        child.wait().expect("reaping the daemon");
                        reader.join().expect("the stderr reader");
                        return Err(format!(
                            "no listening line; stderr:\n{}",
                            stderr.lock().unwrap().join("\n")
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        Ok(Daemon {
            child,
            client: Client { addr },
            data_dir: data_dir.to_owned(),
            stderr,
        })
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits for a line containing `needle` on the daemon's stderr.
    pub fn wait_for_log(&self, needle: &str) {
        let started = Instant::now();
        while !self.stderr().contains(needle) {
            assert!(
                started.elapsed() < DEADLINE,
                "no log line with {needle:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping");
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(status.success());
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(started.elapsed() < DEADLINE, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A benchmark's command line: whether it runs as a smoke test (under `cargo test`, which
/// passes no `--bench`), and its `--name number` flags.
pub struct BenchArgs {
    pub smoke: bool,
    numbers: std::collections::HashMap<String, f64>,
}

impl BenchArgs {
    pub fn parse() -> BenchArgs {
        let args: Vec<String> = std::env::args().collect();
        let mut numbers = std::collections::HashMap::new();
        for pair in args.windows(2) {
            if let (Some(name), Ok(value)) = (pair[0].strip_prefix("--"), pair[1].parse()) {
                numbers.insert(name.to_owned(), value);
            }
        }
        BenchArgs {
            smoke: !args.iter().any(|a| a == "--bench"),
            numbers,
        }
    }

    /// `--name`'s number, or `default`.
    pub fn number(&self, name: &str, default: f64) -> f64 {
        self.numbers.get(name).copied().unwrap_or(default)
    }

    /// `--name`'s number as a count, or `default`.
    pub fn count(&self, name: &str, default: usize) -> usize {
        self.numbers.get(name).map_or(default, |v| *v as usize)
    }
}

/// Says why a test cannot run here and returns, or, under CI (`CI=true`), fails: CI installs
/// the tools and has the permissions, so a skip there would be a test passing untested.
pub fn skip(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason}; under CI=true this test must run, not skip");
    }
    eprintln!("SKIPPED: {reason}");
}

/// A number from the environment, or `default` when it is unset or not a number (seeds and
/// sizes of the randomised tests).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Client {
    /// A request with a memory or admin key, an optional session and an optional JSON body.
    pub fn try_call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        session: Option<&str>,
        body: Option<&Value>,
    ) -> std::io::Result<Response> {
        let auth = format!("Bearer {key}");
        let mut headers = vec![("Authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        if let Some(session) = session {
            headers.push(("X-Session-ID", session));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        try_request(self.addr, method, path, &headers, body.as_bytes())
    }

    /// [`Client::try_call`], for a daemon that is up.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        session: Option<&str>,
        body: Option<&Value>,
    ) -> Response {
        self.try_call(method, path, key, session, body)
            .expect("HTTP request")
    }

    pub fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            if let Ok(response) = try_request(self.addr, "GET", "/readyz", &[], b"") {
                if response.status == 200 {
                    return;
                }
            }
            assert!(
                started.elapsed() < DEADLINE,
                "daemon not ready within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        try_request(self.addr, method, path, headers, body).expect("HTTP request")
    }

    pub fn post_json(
        &self,
        path: &str,
        key: Option<&str>,
        session: Option<&str>,
        body: &Value,
    ) -> Response {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth.as_str()));
        }
        if let Some(session) = session {
            headers.push(("X-Session-ID", session));
        }
        self.request("POST", path, &headers, body.to_string().as_bytes())
    }

    pub fn mint_key(&self, name: &str) -> String {
        let response = self.post_json("/v1/keys", Some(ADMIN_KEY), None, &json!({"name": name}));
        assert_eq!(response.status, 201, "{}", response.text());
        response.json()["key"].as_str().expect("a key").to_owned()
    }

    pub fn ingest(&self, key: &str, session: Option<&str>, messages: Value) -> Value {
        let response = self.post_json(
            "/v1/memory/ingest",
            Some(key),
            session,
            &json!({"messages": messages}),
        );
        assert_eq!(response.status, 202, "{}", response.text());
        response.json()
    }

    /// Every memory of the key's vault, in storage order (the paged export).
    pub fn export(&self, key: &str) -> Vec<Value> {
        self.export_paged(key, 1000)
    }

    /// [`Client::export`], `page` memories at a time.
    pub fn export_paged(&self, key: &str, page: usize) -> Vec<Value> {
        let mut memories = Vec::new();
        let mut cursor = Value::Null;
        loop {
            let body = json!({"limit": page, "cursor": cursor});
            let response = self.call("POST", "/v1/memory/search", key, None, Some(&body));
            assert_eq!(response.status, 200, "{}", response.text());
            let page = response.json();
            memories.extend(page["memories"].as_array().unwrap().iter().cloned());
            cursor = page["next_cursor"].clone();
            if cursor.is_null() {
                return memories;
            }
        }
    }

    pub fn prepare(&self, key: &str, session: Option<&str>, question: &str) -> Value {
        let body = json!({"messages": [{"role": "user", "content": question}], "limit": 10});
        let response = self.post_json("/v1/memory/prepare", Some(key), session, &body);
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()
    }

    /// Prepares until `id` is among the memories returned (it is embedded in the background
    /// after the 202), and returns that answer.
    pub fn prepare_until_found(
        &self,
        key: &str,
        session: Option<&str>,
        question: &str,
        id: &str,
    ) -> Value {
        let started = Instant::now();
        loop {
            let answer = self.prepare(key, session, question);
            if memory_ids(&answer).iter().any(|found| found == id) {
                return answer;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{id} never returned for {question:?}; last answer {answer}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until nothing is left to embed (the pending gauge is zero).
    pub fn wait_indexed(&self) {
        self.wait_indexed_within(DEADLINE);
    }

    pub fn wait_indexed_within(&self, deadline: Duration) {
        let started = Instant::now();
        loop {
            let metrics = self.request("GET", "/metrics", &[], b"").text();
            if metric_value(&metrics, "memory_sidecar_embed_pending_memories") == Some(0.0) {
                return;
            }
            assert!(
                started.elapsed() < deadline,
                "memories never finished embedding"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// The daemon in this process, on a manual clock, for tests that move time: the same `App` and
/// `serve` the binary runs, on a runtime of its own.
pub struct InProcess {
    client: Client,
    pub app: Arc<memory_sidecar::app::App>,
    pub clock: Arc<memory_sidecar::clock::ManualClock>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl std::ops::Deref for InProcess {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl InProcess {
    /// Opens the app and serves it, without starting the indexer (so not yet ready).
    pub fn open(data_dir: &Path, args: &[&str]) -> InProcess {
        use clap::Parser;
        let models = models_dir();
        let mut argv: Vec<&std::ffi::OsStr> = vec![
            "memory-sidecar".as_ref(),
            "--data-dir".as_ref(),
            data_dir.as_os_str(),
            "--models-dir".as_ref(),
            models.as_os_str(),
        ];
        argv.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        let config = memory_sidecar::config::Flags::try_parse_from(argv)
            .unwrap()
            .validate()
            .unwrap();
        let clock = Arc::new(memory_sidecar::clock::ManualClock::new(CLOCK_START_MS));
        // A store closed a moment ago may still be locked until sled's flusher lets go.
        let started = Instant::now();
        let app = loop {
            let opened = memory_sidecar::app::App::open(
                config.clone(),
                memory_sidecar::auth::AdminKey::new(ADMIN_KEY).unwrap(),
                memory_sidecar::crypto::MasterKey::from_hex(MASTER_KEY).unwrap(),
                memory_sidecar::metrics::Metrics::new().unwrap(),
                clock.clone(),
            );
            match opened {
                Ok(app) => break app,
                Err(error)
                    if format!("{error:#}").contains("could not acquire lock")
                        && started.elapsed() < DEADLINE =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => panic!("{error:#}"),
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = app.clone();
        let http = config.http.clone();
        let server = std::thread::spawn(move || {
            runtime
                .block_on(memory_sidecar::http::serve(served, listener, http, async {
                    let _ = stopped.await;
                }))
                .unwrap();
        });
        InProcess {
            client: Client { addr },
            app,
            clock,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Opens, starts and waits until ready.
    pub fn start(data_dir: &Path, args: &[&str]) -> InProcess {
        let daemon = InProcess::open(data_dir, args);
        daemon.app.start().unwrap();
        daemon.wait_ready();
        daemon
    }

    pub fn advance_days(&self, days: i64) {
        self.clock.advance_ms(days * 86_400_000);
    }
}

impl InProcess {
    /// Stops serving (draining in-flight requests) and closes the app, as the binary does at
    /// SIGTERM. Dropping does this too.
    pub fn close(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        self.app.close()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.close();
        // The store is released (its file lock too) once the indexer thread lets go of the app.
        let started = Instant::now();
        while Arc::strong_count(&self.app) > 1 && started.elapsed() < DEADLINE {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn memory_ids(answer: &Value) -> Vec<String> {
    answer["memories"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub fn first_id(ingested: &Value) -> String {
    ingested["ids"][0].as_str().expect("an id").to_owned()
}

/// The value of one series, written exactly as rendered (`name` or `name{label="v",...}`).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Writes a raw request and reads the whole response (the connection is closed after it).
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    read_response(&mut stream)
}

pub fn read_response(stream: &mut TcpStream) -> std::io::Result<Response> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "no header end in {:?}",
                String::from_utf8_lossy(&raw)
            ))
        })?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

/// A prepare whose head and first five body bytes are sent, the rest held back: the daemon
/// is left working on it. Finish it with [`finish_slow_prepare`].
pub fn start_slow_prepare(addr: SocketAddr, key: &str, body: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    write!(
        stream,
        "POST /v1/memory/prepare HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         X-Memory-Key: {key}\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..5]
    )
    .expect("writing the head");
    stream.flush().expect("flushing");
    stream
}

pub fn finish_slow_prepare(mut stream: TcpStream, body: &str) -> Response {
    stream
        .write_all(&body.as_bytes()[5..])
        .expect("writing the rest");
    read_response(&mut stream).expect("reading the response")
}

/// A keep-alive HTTP/1.1 connection, for load drivers.
pub struct Conn {
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(DEADLINE))?;
        Ok(Conn {
            reader: BufReader::new(stream),
            addr,
        })
    }

    /// One prepare of a single user message with a memory key.
    pub fn prepare(&mut self, key: &str, message: &str) -> std::io::Result<Response> {
        let auth = format!("Bearer {key}");
        let headers = [
            ("Content-Type", "application/json"),
            ("Authorization", auth.as_str()),
        ];
        let body = json!({"messages": [{"role": "user", "content": message}]});
        self.send(
            "POST",
            "/v1/memory/prepare",
            &headers,
            body.to_string().as_bytes(),
        )
    }

    /// Sends one request and reads its response by its Content-Length.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line)?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().map_err(std::io::Error::other)?;
                }
                headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body)?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}
