//! The fleet against one node, in one run on one machine: prepare and ingest latency through
//! nginx (one sled node, then three nodes on PostgreSQL with a synchronous standby), the fill
//! rate with one, two and three PostgreSQL nodes, and the cost of a cold vault on a node that
//! has never served it.
//!
//! `cargo bench --bench fleet -- [--memories 2000] [--vaults 12] [--seconds 15] [--clients 4]`
//!
//! The release daemon, the real model, PostgreSQL 15 and nginx, all on loopback; the figures
//! go in docs/benchmarks.md with the machine's CPU flags. Under `cargo test` it runs a
//! smoke-sized pass.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::corpus::{ms, percentile, question, sentence, Rng};
use common::fleet::{fleet_tools_missing, free_ports, Nginx, Postgres};
use common::{skip, BenchArgs, Client, Conn, Daemon};
use serde_json::json;

struct Sizes {
    memories: usize,
    vaults: usize,
    seconds: u64,
    clients: usize,
}

fn sizes() -> Sizes {
    let args = BenchArgs::parse();
    let bench = std::env::args().any(|a| a == "--bench");
    Sizes {
        memories: args.count("memories", if bench { 2000 } else { 40 }),
        vaults: args.count("vaults", if bench { 12 } else { 2 }),
        seconds: args.count("seconds", if bench { 15 } else { 1 }) as u64,
        clients: args.count("clients", if bench { 4 } else { 2 }),
    }
}

/// A node; each client drives one key as fast as answers come, so keys are not rate-limited.
fn node(dir: &Path, store: Option<&str>) -> Daemon {
    let unlimited = ["--key-rate-per-second", "0"];
    match store {
        Some(url) => Daemon::start(dir, &[&unlimited[..], &["--store", url]].concat()),
        None => Daemon::start(dir, &unlimited),
    }
}

/// Closed-loop clients through `front`, each on its own vault: an ingest then a prepare,
/// again and again. Returns (ingest, prepare) latencies, sorted.
fn mixed(front: &Client, keys: &[String], seconds: u64) -> (Vec<Duration>, Vec<Duration>) {
    let addr = front.addr;
    let threads: Vec<_> = keys
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, key)| {
            std::thread::spawn(move || {
                let mut rng = Rng(i as u64 + 1);
                let mut conn = Conn::connect(addr).expect("a connection");
                let (mut ingests, mut prepares) = (Vec::new(), Vec::new());
                let until = Instant::now() + Duration::from_secs(seconds);
                let mut rounds = 0;
                while Instant::now() < until {
                    // A new connection now and then, outside the timing: nginx closes a
                    // client's keep-alive connection after 1,000 requests.
                    rounds += 1;
                    if rounds % 200 == 0 {
                        conn = Conn::connect(addr).expect("a connection");
                    }
                    let body =
                        json!({"messages": [{"role": "user", "content": sentence(&mut rng)}]});
                    let started = Instant::now();
                    let response = conn
                        .send(
                            "POST",
                            "/v1/memory/ingest",
                            &[
                                ("Content-Type", "application/json"),
                                ("Authorization", &format!("Bearer {key}")),
                            ],
                            body.to_string().as_bytes(),
                        )
                        .expect("an ingest");
                    assert_eq!(response.status, 202, "{}", response.text());
                    ingests.push(started.elapsed());
                    let started = Instant::now();
                    let response = conn.prepare(&key, &question(&mut rng)).expect("a prepare");
                    assert_eq!(response.status, 200, "{}", response.text());
                    prepares.push(started.elapsed());
                }
                (ingests, prepares)
            })
        })
        .collect();
    let (mut ingests, mut prepares) = (Vec::new(), Vec::new());
    for thread in threads {
        let (i, p) = thread.join().expect("a client");
        ingests.extend(i);
        prepares.extend(p);
    }
    ingests.sort();
    prepares.sort();
    (ingests, prepares)
}

fn report(what: &str, ingests: &[Duration], prepares: &[Duration]) {
    println!(
        "{what}: ingest p50 {} p99 {} | prepare p50 {} p99 {} ({} + {} requests)",
        ms(percentile(ingests, 0.50)),
        ms(percentile(ingests, 0.99)),
        ms(percentile(prepares, 0.50)),
        ms(percentile(prepares, 0.99)),
        ingests.len(),
        prepares.len(),
    );
}

/// Ingests `memories` generated memories spread over the keys through `front`, ten a request,
/// and returns the seconds until the database has nothing left to embed.
fn fill(front: &Client, keys: &[String], memories: usize, db: &Postgres, seed: u64) -> f64 {
    let started = Instant::now();
    ingest_generated(front, keys, memories, seed);
    wait_embedded(db, started);
    started.elapsed().as_secs_f64()
}

/// Ingests `memories` generated memories, ten a request, round-robin over the keys.
fn ingest_generated(front: &Client, keys: &[String], memories: usize, seed: u64) {
    let mut rng = Rng(seed);
    for batch in 0..memories.div_ceil(10) {
        let messages: Vec<_> = (0..10)
            .map(|_| json!({"role": "user", "content": sentence(&mut rng)}))
            .collect();
        front.ingest(&keys[batch % keys.len()], None, json!(messages));
    }
}

/// Waits until the database has nothing left to embed.
fn wait_embedded(db: &Postgres, started: Instant) {
    loop {
        let pending: u64 = db
            .psql("SELECT count(*) FROM pending")
            .trim()
            .parse()
            .unwrap();
        if pending == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "fill stalled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    if let Some(missing) = fleet_tools_missing() {
        return skip(&missing);
    }
    let sizes = sizes();
    let root = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let keys_for = |client: &Client, prefix: &str| -> Vec<String> {
        (0..sizes.vaults)
            .map(|i| client.mint_key(&format!("{prefix}{i}")))
            .collect()
    };

    // One node on sled, behind nginx.
    let sled = node(&root.path().join("sled"), None);
    let mut nginx = Nginx::start(root.path(), ports[2], &[sled.addr.to_string()]);
    let front = Client { addr: nginx.addr() };
    let keys = keys_for(&front, "sled");
    let (ingests, prepares) = mixed(
        &front,
        &keys[..sizes.clients.min(keys.len())],
        sizes.seconds,
    );
    report("1 node, sled, through nginx", &ingests, &prepares);
    drop(sled);

    // PostgreSQL with a synchronous standby.
    let primary = Postgres::init_primary(root.path(), ports[0]);
    let _standby = Postgres::standby_of(&primary, root.path(), ports[1], "standby1");
    let url = primary.url();
    let mut nodes: Vec<Daemon> = Vec::new();
    for count in 1..=3 {
        nodes.push(node(&root.path().join(format!("pg{count}")), Some(&url)));
        let backends: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
        nginx.reload(&backends);
        let keys = keys_for(&front, &format!("fill{count}-"));
        let seconds = fill(&front, &keys, sizes.memories, &primary, count as u64);
        println!(
            "fill, {count} node(s) on PostgreSQL: {} memories in {seconds:.1} s = {:.0} memories/s",
            sizes.memories,
            sizes.memories as f64 / seconds
        );
    }
    let keys = keys_for(&front, "mixed");
    let (ingests, prepares) = mixed(
        &front,
        &keys[..sizes.clients.min(keys.len())],
        sizes.seconds,
    );
    report(
        "3 nodes, PostgreSQL + sync standby, through nginx",
        &ingests,
        &prepares,
    );

    // A cold vault: filled through one node, first asked on a node that never served it.
    let key = nodes[0].mint_key("cold");
    ingest_generated(&nodes[0], std::slice::from_ref(&key), sizes.memories, 99);
    wait_embedded(&primary, Instant::now());
    let mut rng = Rng(99);
    let mut conn = Conn::connect(nodes[2].addr).unwrap();
    let started = Instant::now();
    assert_eq!(
        conn.prepare(&key, "where is my drawer?").unwrap().status,
        200
    );
    let cold = started.elapsed();
    let mut warm = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(conn.prepare(&key, &question(&mut rng)).unwrap().status, 200);
        warm.push(started.elapsed());
    }
    warm.sort();
    println!(
        "cold vault of {} memories on a node that never served it: first prepare {}, then p50 {}",
        sizes.memories,
        ms(cold),
        ms(percentile(&warm, 0.50))
    );
}
