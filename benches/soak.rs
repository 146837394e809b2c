//! Soak: a fixed-rate mix of prepare, ingest, search and delete for many minutes, against the
//! real daemon on a temp dir over loopback, reporting each minute's errors, latencies, memory,
//! data-directory size and open file descriptors, so that leaks and slow drifts show.
//!
//! `cargo bench --bench soak -- [--minutes 10] [--rate 40] [--vaults 8] [--memories 200]`
//! (under `cargo test`: a few seconds, as a smoke test of the driver).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::corpus::{dir_bytes, ms, percentile, proc_status_mb, question, sentence, Rng};
use common::{Conn, Daemon};
use serde_json::json;

const CLIENTS: usize = 8;

struct Options {
    minutes: f64,
    rate: f64,
    vaults: usize,
    memories: usize,
}

fn options() -> Options {
    let args = common::BenchArgs::parse();
    let smoke = args.smoke;
    Options {
        minutes: args.number("minutes", if smoke { 0.05 } else { 10.0 }),
        rate: args.number("rate", 40.0),
        vaults: args.count("vaults", 8),
        memories: args.count("memories", if smoke { 20 } else { 200 }),
    }
}

/// One window's observations.
#[derive(Default)]
struct Window {
    latencies: Vec<Duration>,
    errors: usize,
}

fn main() {
    let options = options();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--key-rate-per-second", "0"]);
    let mut rng = Rng(0x5eed_50a4);
    let mut keys = Vec::new();
    let ids: Arc<Vec<Mutex<Vec<String>>>> = Arc::new(
        (0..options.vaults)
            .map(|_| Mutex::new(Vec::new()))
            .collect(),
    );
    for vault in 0..options.vaults {
        let minted = daemon.post_json(
            "/v1/keys",
            Some(common::ADMIN_KEY),
            None,
            &json!({"name": format!("soak {vault}"), "scopes": ["read", "write", "delete"]}),
        );
        assert_eq!(minted.status, 201, "{}", minted.text());
        let key = minted.json()["key"].as_str().unwrap().to_owned();
        for _ in 0..options.memories.div_ceil(50) {
            let messages: Vec<_> = (0..50)
                .map(|_| json!({"role": "user", "content": sentence(&mut rng)}))
                .collect();
            let answer = daemon.ingest(&key, None, json!(messages));
            let new: Vec<String> = answer["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_str().unwrap().to_owned())
                .collect();
            let mut list = ids[vault].lock().unwrap();
            for id in new {
                // A repeated sentence is stored once and answers with the first id.
                if !list.contains(&id) {
                    list.push(id);
                }
            }
        }
        keys.push(key);
    }
    daemon.wait_indexed_within(Duration::from_secs(3600));

    let total = Duration::from_secs_f64(options.minutes * 60.0);
    let windows = 10usize.max(options.minutes.ceil() as usize);
    let window_length = total / windows as u32;
    let window: Arc<Mutex<Window>> = Arc::default();
    let sent = Arc::new(AtomicUsize::new(0));
    let interval = Duration::from_secs_f64(CLIENTS as f64 / options.rate);
    let started = Instant::now();
    println!(
        "soak: {CLIENTS} clients, fixed rate {} req/s (55% prepare, 20% ingest, 15% search, 10% delete), {} vaults, {:.1} min\n",
        options.rate, options.vaults, options.minutes
    );
    println!("| minute | requests | errors | p50 ms | p99 ms | max ms | RSS MiB | data dir MiB | open fds |");
    println!("|---|---|---|---|---|---|---|---|---|");
    std::thread::scope(|scope| {
        for client in 0..CLIENTS {
            let (keys, ids, window, sent) = (&keys, ids.clone(), window.clone(), sent.clone());
            let addr = daemon.addr;
            scope.spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (client as u64 + 1));
                let mut conn = Conn::connect(addr).unwrap();
                let mut scheduled = started + interval.mul_f64(client as f64 / CLIENTS as f64);
                while started.elapsed() < total {
                    let now = Instant::now();
                    if scheduled > now {
                        std::thread::sleep(scheduled - now);
                    }
                    let vault = (rng.next() % keys.len() as u64) as usize;
                    let auth = format!("Bearer {}", keys[vault]);
                    let headers = [
                        ("Content-Type", "application/json"),
                        ("Authorization", auth.as_str()),
                    ];
                    let roll = rng.unit();
                    let question = question(&mut rng);
                    let (method, path, body, expected) = if roll < 0.55 {
                        let body = json!({"messages": [{"role": "user", "content": question}]});
                        (
                            "POST",
                            "/v1/memory/prepare".to_owned(),
                            body.to_string(),
                            200,
                        )
                    } else if roll < 0.75 {
                        let body = json!({"messages": [
                            {"role": "user", "content": sentence(&mut rng)},
                            {"role": "assistant", "content": sentence(&mut rng)},
                        ]});
                        (
                            "POST",
                            "/v1/memory/ingest".to_owned(),
                            body.to_string(),
                            202,
                        )
                    } else if roll < 0.90 {
                        let body = if rng.unit() < 0.5 {
                            json!({"query": question, "limit": 10})
                        } else {
                            json!({"limit": 50})
                        };
                        (
                            "POST",
                            "/v1/memory/search".to_owned(),
                            body.to_string(),
                            200,
                        )
                    } else {
                        let taken = {
                            let mut list = ids[vault].lock().unwrap();
                            if list.is_empty() {
                                None
                            } else {
                                let at = (rng.next() % list.len() as u64) as usize;
                                Some(list.swap_remove(at))
                            }
                        };
                        match taken {
                            Some(id) => ("DELETE", format!("/v1/memory/{id}"), String::new(), 204),
                            None => {
                                scheduled += interval;
                                continue;
                            }
                        }
                    };
                    let answer = conn.send(method, &path, &headers, body.as_bytes());
                    let latency = scheduled.elapsed();
                    let ok = match &answer {
                        // Two clients can race on one id: an ingest of a repeated sentence hands
                        // back an id that another client is deleting. The daemon is right.
                        Ok(response) if expected == 204 && response.status == 404 => true,
                        Ok(response) if response.status == expected => {
                            if expected == 202 {
                                if let Some(new) = response.json()["ids"].as_array() {
                                    let mut list = ids[vault].lock().unwrap();
                                    list.extend(
                                        new.iter().filter_map(|v| v.as_str().map(str::to_owned)),
                                    );
                                }
                            }
                            true
                        }
                        Ok(response) => {
                            eprintln!("{method} {path}: {} {}", response.status, response.text());
                            false
                        }
                        Err(_) => {
                            conn = Conn::connect(addr).unwrap();
                            false
                        }
                    };
                    {
                        let mut window = window.lock().unwrap();
                        window.latencies.push(latency);
                        window.errors += usize::from(!ok);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    scheduled += interval;
                }
            });
        }
        // The reporter: one row per window.
        let pid = daemon.pid();
        let mut total_errors = 0;
        for index in 1..=windows {
            let due = started + window_length * index as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let mut taken = std::mem::take(&mut *window.lock().unwrap());
            taken.latencies.sort();
            total_errors += taken.errors;
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
            println!(
                "| {:.1} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {fds} |",
                (window_length * index as u32).as_secs_f64() / 60.0,
                taken.latencies.len(),
                taken.errors,
                ms(percentile(&taken.latencies, 0.50)),
                ms(percentile(&taken.latencies, 0.99)),
                ms(taken.latencies.last().copied().unwrap_or_default()),
                proc_status_mb(pid, "VmRSS:"),
                dir_bytes(dir.path()) as f64 / (1 << 20) as f64,
            );
        }
        println!(
            "\ntotal: {} requests, {total_errors} errors, peak RSS {:.0} MiB",
            sent.load(Ordering::Relaxed),
            proc_status_mb(pid, "VmHWM:")
        );
    });
}
