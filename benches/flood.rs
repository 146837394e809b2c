//! Floods against a working client: how much slower does a well-behaved gateway's prepare get
//! while the daemon is under each kind of abuse?
//!
//! One good client calls prepare at a fixed rate on a keep-alive connection, against a vault of
//! 1,000 memories, through a baseline phase and then one phase per flood: thousands of idle
//! connections, slowloris heads, brute-forced keys, oversized bodies, deeply nested JSON and
//! huge `limit` values. Each phase prints the good client's p50/p99/max and errors, and what
//! the abusers got back.
//!
//! `cargo bench --bench flood -- [--seconds 20] [--rate 20] [--idle 2000]`
//! (under `cargo test`: a second a phase, as a smoke test of the driver).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::corpus::{ms, percentile, question, sentence, Rng};
use common::{Conn, Daemon};
use serde_json::json;

struct Options {
    seconds: f64,
    rate: f64,
    idle: usize,
}

fn options() -> Options {
    let args = common::BenchArgs::parse();
    let smoke = args.smoke;
    Options {
        seconds: args.number("seconds", if smoke { 1.0 } else { 20.0 }),
        rate: args.number("rate", 20.0),
        idle: args.count("idle", if smoke { 50 } else { 2000 }),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Flood {
    None,
    IdleConnections,
    Slowloris,
    BruteForce,
    Oversized,
    DeepJson,
    HugeLimit,
}

impl Flood {
    fn label(self) -> &'static str {
        match self {
            Flood::None => "baseline (no flood)",
            Flood::IdleConnections => "idle connections",
            Flood::Slowloris => "slowloris: 200 heads, a byte every 0.5 s",
            Flood::BruteForce => "brute force: 4 clients, wrong keys",
            Flood::Oversized => "oversized bodies: 2 clients, 4 MiB each",
            Flood::DeepJson => "deep JSON: 2 clients, 100k levels",
            Flood::HugeLimit => "huge limit: 2 clients, limit 10^12",
        }
    }
}

/// The answers the abusers got, by status.
type Tally = Arc<Mutex<BTreeMap<u16, usize>>>;

fn count(tally: &Tally, status: u16) {
    *tally.lock().unwrap().entry(status).or_default() += 1;
}

/// The abusers come from another loopback address than the good client, as another host
/// would: the failed-authentication budget is per address.
const ABUSER: [u8; 4] = [127, 0, 0, 2];

fn connect_as_abuser(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((ABUSER, 0)).into())?;
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

/// Sends one request on a fresh connection and reads the status (0 if the connection failed).
fn abuse_once(addr: SocketAddr, head: &str, body: &[u8]) -> u16 {
    let Ok(mut stream) = connect_as_abuser(addr) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    // The daemon may answer (413) and close before the whole body is sent: read its answer
    // whatever the write says.
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body));
    common::read_response(&mut stream).map_or(0, |r| r.status)
}

/// `abuser_key`: a valid key of the abusers' own vault, so their bodies reach the parsers (the
/// daemon runs without a per-key rate here, the worst case).
fn run_flood(
    flood: Flood,
    addr: SocketAddr,
    stop: &AtomicBool,
    tally: &Tally,
    idle: usize,
    abuser_key: &str,
) {
    let post = |path: &str, key: &str, length: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
             Authorization: Bearer {key}\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    std::thread::scope(|scope| match flood {
        Flood::None => {}
        Flood::IdleConnections => {
            // Open them all and say nothing; each is cut at the header timeout and reopened.
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                held.retain(|s: &TcpStream| {
                    let mut probe = [0u8; 1];
                    s.set_nonblocking(true).ok();
                    let open = !matches!(std::io::Read::read(&mut &*s, &mut probe), Ok(0));
                    if !open {
                        count(tally, 0);
                    }
                    open
                });
                while held.len() < idle {
                    match connect_as_abuser(addr) {
                        Ok(stream) => held.push(stream),
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Flood::Slowloris => {
            for _ in 0..4 {
                scope.spawn(|| {
                    let mut streams: Vec<TcpStream> = (0..50)
                        .filter_map(|_| connect_as_abuser(addr).ok())
                        .collect();
                    for s in &mut streams {
                        let _ = s.write_all(b"POST /v1/memory/prepare HTTP/1.1\r\n");
                    }
                    while !stop.load(Ordering::Relaxed) {
                        for s in &mut streams {
                            if s.write_all(b"X").is_err() {
                                count(tally, 0);
                                *s = match connect_as_abuser(addr) {
                                    Ok(mut fresh) => {
                                        let _ = fresh.write_all(b"POST / HTTP/1.1\r\n");
                                        fresh
                                    }
                                    Err(_) => continue,
                                };
                            }
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                });
            }
        }
        Flood::BruteForce => {
            for worker in 0..4u64 {
                scope.spawn(move || {
                    let mut rng = Rng(0xbad_c0de ^ worker);
                    let body = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("{:016x}", rng.next());
                        let guess = memory_sidecar::auth::compose_key(&id, &"Q".repeat(32));
                        let head = post("/v1/memory/prepare", &guess, body.len());
                        count(tally, abuse_once(addr, &head, body));
                    }
                });
            }
        }
        Flood::Oversized => {
            for _ in 0..2 {
                scope.spawn(|| {
                    let body = vec![b' '; 4 << 20];
                    while !stop.load(Ordering::Relaxed) {
                        let head = post("/v1/memory/ingest", abuser_key, body.len());
                        count(tally, abuse_once(addr, &head, &body));
                    }
                });
            }
        }
        Flood::DeepJson => {
            for _ in 0..2 {
                scope.spawn(|| {
                    let mut body = vec![b'['; 100_000];
                    body.extend(vec![b']'; 100_000]);
                    while !stop.load(Ordering::Relaxed) {
                        let head = post("/v1/memory/search", abuser_key, body.len());
                        count(tally, abuse_once(addr, &head, &body));
                    }
                });
            }
        }
        Flood::HugeLimit => {
            for _ in 0..2 {
                scope.spawn(|| {
                    let body =
                        br#"{"messages":[{"role":"user","content":"hi"}],"limit":1000000000000}"#;
                    while !stop.load(Ordering::Relaxed) {
                        let head = post("/v1/memory/prepare", abuser_key, body.len());
                        count(tally, abuse_once(addr, &head, body));
                    }
                });
            }
        }
    });
}

fn main() {
    let options = options();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--key-rate-per-second", "0"]);
    let key = daemon.mint_key("flood: the good client");
    let abuser_key = daemon.mint_key("flood: an abusive client");
    let mut rng = Rng(0xf100d);
    let lines: String = (0..1000)
        .map(|_| format!("{}\n", json!({"content": sentence(&mut rng)})))
        .collect();
    let auth = format!("Bearer {key}");
    let upload = daemon.request(
        "POST",
        "/v1/memory/upload",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/x-ndjson"),
        ],
        lines.as_bytes(),
    );
    assert_eq!(upload.status, 200, "{}", upload.text());
    daemon.wait_indexed_within(Duration::from_secs(600));

    println!(
        "flood: one good client, prepare at {} req/s on a keep-alive connection (vault of 1,000), {:.0} s a phase\n",
        options.rate, options.seconds
    );
    println!(
        "| flood | good p50 ms | good p99 ms | good max ms | good errors | abusers' answers |"
    );
    println!("|---|---|---|---|---|---|");
    let phases = [
        Flood::None,
        Flood::IdleConnections,
        Flood::Slowloris,
        Flood::Oversized,
        Flood::DeepJson,
        Flood::HugeLimit,
        // Last: it spends the abusers' address's failed-authentication budget.
        Flood::BruteForce,
    ];
    let mut conn = Conn::connect(daemon.addr).unwrap();
    // The vault's first prepare loads its index: not part of any phase.
    for _ in 0..5 {
        let warm = conn.prepare(&key, "warming up");
        assert_eq!(warm.unwrap().status, 200);
    }
    for flood in phases {
        let stop = AtomicBool::new(false);
        let tally: Tally = Arc::default();
        let (latencies, errors) = std::thread::scope(|scope| {
            scope.spawn(|| run_flood(flood, daemon.addr, &stop, &tally, options.idle, &abuser_key));
            // Let the flood build up before measuring.
            std::thread::sleep(Duration::from_millis(if flood == Flood::None {
                0
            } else {
                500
            }));
            let interval = Duration::from_secs_f64(1.0 / options.rate);
            let started = Instant::now();
            let mut scheduled = started;
            let mut latencies = Vec::new();
            let mut errors = 0;
            while started.elapsed() < Duration::from_secs_f64(options.seconds) {
                let now = Instant::now();
                if scheduled > now {
                    std::thread::sleep(scheduled - now);
                }
                // Latency from the scheduled time: a stall counts in full (no coordinated
                // omission).
                match conn.prepare(&key, &question(&mut rng)) {
                    Ok(response) if response.status == 200 => {}
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        conn = Conn::connect(daemon.addr).unwrap();
                    }
                }
                latencies.push(scheduled.elapsed());
                scheduled += interval;
            }
            stop.store(true, Ordering::Relaxed);
            (latencies, errors)
        });
        let mut sorted = latencies.clone();
        sorted.sort();
        let answers: Vec<String> = tally
            .lock()
            .unwrap()
            .iter()
            .map(|(status, n)| {
                if *status == 0 {
                    format!("{n} connections cut")
                } else {
                    format!("{n}× {status}")
                }
            })
            .collect();
        let label = if flood == Flood::IdleConnections {
            format!("{} idle connections (limit 1024)", options.idle)
        } else {
            flood.label().to_owned()
        };
        println!(
            "| {label} | {} | {} | {} | {errors} | {} |",
            ms(percentile(&sorted, 0.50)),
            ms(percentile(&sorted, 0.99)),
            ms(*sorted.last().unwrap_or(&Duration::ZERO)),
            if answers.is_empty() {
                "-".to_owned()
            } else {
                answers.join(", ")
            }
        );
    }
    assert!(daemon.request("GET", "/readyz", &[], b"").status == 200);
}
