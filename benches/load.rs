//! Load driver over HTTP: concurrent prepare and ingest against the real daemon.
//!
//! `cargo bench --bench load -- [--clients 16] [--seconds 20] [--vaults 16]
//!  [--memories 1000] [--ingest-fraction 0.2] [--rate 0] [--daemon-args "--embed-workers 2"]`
//!
//! It starts the release daemon on a temp dir, fills `--vaults` vaults with `--memories`
//! generated memories each (varied sentences, through the public ingest API), waits until they
//! are embedded, then drives the mix for `--seconds`. With `--rate N` (requests/s in total)
//! requests are sent on a fixed schedule and latency is measured from the scheduled time
//! (coordinated-omission corrected); with 0 each client sends as fast as answers come back.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::corpus::{cpu_seconds, ms, peak_rss_mb, percentile, question, sentence, Rng};
use common::{Conn, Daemon};
use serde_json::json;

struct Options {
    clients: usize,
    seconds: u64,
    vaults: usize,
    memories: usize,
    ingest_fraction: f64,
    rate: f64,
    daemon_args: Vec<String>,
}

fn options() -> Options {
    let mut options = Options {
        clients: 16,
        seconds: 20,
        vaults: 16,
        memories: 1000,
        ingest_fraction: 0.2,
        rate: 0.0,
        daemon_args: Vec::new(),
    };
    let args: Vec<String> = std::env::args().collect();
    // Under `cargo test` (no `--bench` argument) run a smoke-sized pass, so the driver is
    // exercised by `make test` without taking its time.
    if !args.iter().any(|a| a == "--bench") {
        options = Options {
            clients: 4,
            seconds: 2,
            vaults: 2,
            memories: 50,
            ingest_fraction: 0.2,
            rate: 0.0,
            daemon_args: Vec::new(),
        };
    }
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        let parsed = || {
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--clients" => options.clients = parsed() as usize,
            "--seconds" => options.seconds = parsed() as u64,
            "--vaults" => options.vaults = parsed() as usize,
            "--memories" => options.memories = parsed() as usize,
            "--ingest-fraction" => options.ingest_fraction = parsed(),
            "--rate" => options.rate = parsed(),
            "--daemon-args" => {
                options.daemon_args = value.split_whitespace().map(str::to_owned).collect()
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    options
}

fn main() {
    let options = options();
    let dir = tempfile::tempdir().unwrap();
    // No per-key rate limit: this measures the daemon, not the limiter.
    let mut args = vec!["--max-inflight", "1024", "--key-rate-per-second", "0"];
    args.extend(options.daemon_args.iter().map(String::as_str));
    let daemon = Daemon::start(dir.path(), &args);
    let keys: Vec<String> = (0..options.vaults)
        .map(|i| daemon.mint_key(&format!("load:{i}")))
        .collect();

    // Fill: batches of 50 messages per ingest, spread over the clients.
    let fill_started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let batches_per_vault = options.memories.div_ceil(50);
    let total_batches = batches_per_vault * options.vaults;
    std::thread::scope(|scope| {
        for client in 0..options.clients.min(8) {
            let (keys, next, addr) = (&keys, next.clone(), daemon.addr);
            scope.spawn(move || {
                let mut conn = Conn::connect(addr).unwrap();
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1));
                loop {
                    let batch = next.fetch_add(1, Ordering::Relaxed);
                    if batch >= total_batches {
                        break;
                    }
                    let key = &keys[batch % keys.len()];
                    let messages: Vec<_> = (0..50)
                        .map(|_| json!({"role": "user", "content": sentence(&mut rng)}))
                        .collect();
                    let body = json!({"messages": messages}).to_string();
                    let auth = format!("Bearer {key}");
                    let headers = [
                        ("Content-Type", "application/json"),
                        ("Authorization", auth.as_str()),
                    ];
                    let response = conn
                        .send("POST", "/v1/memory/ingest", &headers, body.as_bytes())
                        .unwrap();
                    assert_eq!(response.status, 202, "{}", response.text());
                }
            });
        }
    });
    let acked = fill_started.elapsed();
    daemon.wait_indexed_within(Duration::from_secs(3600));
    let indexed = fill_started.elapsed();
    let filled = total_batches * 50;
    println!(
        "fill: {filled} memories in {} vaults; acknowledged in {:.1} s ({:.0} messages/s), embedded and indexed in {:.1} s ({:.0} memories/s)",
        options.vaults,
        acked.as_secs_f64(),
        filled as f64 / acked.as_secs_f64(),
        indexed.as_secs_f64(),
        filled as f64 / indexed.as_secs_f64()
    );

    // The bare model on the same corpus, in this process, while the daemon is idle: the
    // embedding-efficiency ratio is the fill's embedding rate through the daemon over this,
    // once against a plain loop and once against the daemon's own batching done bare.
    let through_daemon = filled as f64 / indexed.as_secs_f64();
    let (plain, sorted) = bare_model_texts_per_second(&mut Rng(0x0B00_B1E5));
    println!(
        "embedding efficiency: {through_daemon:.0} memories/s embedded through the daemon during the fill / {plain:.0} texts/s from the bare model (batches of 32 in corpus order, same corpus, this run) = {:.2}",
        through_daemon / plain
    );
    println!(
        "  against the bare model batching as the daemon does (windows of {BARE_WINDOW} sorted by length, batches of {BARE_BATCH}): {sorted:.0} texts/s, so the daemon keeps {:.2} of it",
        through_daemon / sorted
    );

    // The first prepare of each vault loads its index from the store (decrypting vectors and
    // terms, building the BM25 windows): timed apart, so the mix below measures steady state.
    let mut first = Vec::new();
    for key in &keys {
        let body = json!({"messages": [{"role": "user", "content": "what do I like to do?"}]});
        let started = Instant::now();
        let response = daemon.post_json("/v1/memory/prepare", Some(key), None, &body);
        first.push(started.elapsed());
        assert_eq!(response.status, 200, "{}", response.text());
    }
    first.sort();
    println!(
        "first prepare of each vault (index load): p50 {:.1} ms, max {:.1} ms",
        percentile(&first, 0.5).as_secs_f64() * 1000.0,
        percentile(&first, 1.0).as_secs_f64() * 1000.0
    );

    // Drive.
    let prepare_latencies = Arc::new(Mutex::new(Vec::new()));
    let ingest_latencies = Arc::new(Mutex::new(Vec::new()));
    let prepare_breakdowns = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicUsize::new(0));
    let duration = Duration::from_secs(options.seconds);
    let per_client_interval = (options.rate > 0.0)
        .then(|| Duration::from_secs_f64(options.clients as f64 / options.rate));
    let cpu_before = cpu_seconds(daemon.pid());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..options.clients {
            let (keys, addr) = (&keys, daemon.addr);
            let (prepare_latencies, ingest_latencies, prepare_breakdowns, errors) = (
                prepare_latencies.clone(),
                ingest_latencies.clone(),
                prepare_breakdowns.clone(),
                errors.clone(),
            );
            let ingest_fraction = options.ingest_fraction;
            scope.spawn(move || {
                let mut conn = Conn::connect(addr).unwrap();
                let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (client as u64 + 7));
                let (mut prepares, mut ingests, mut breakdowns) =
                    (Vec::new(), Vec::new(), Vec::new());
                let mut scheduled = started
                    + per_client_interval
                        .map_or(Duration::ZERO, |i| i.mul_f64(client as f64 / 16.0));
                while started.elapsed() < duration {
                    if per_client_interval.is_some() {
                        let now = Instant::now();
                        if scheduled > now {
                            std::thread::sleep(scheduled - now);
                        }
                    } else {
                        scheduled = Instant::now();
                    }
                    let key = &keys[(rng.next() % keys.len() as u64) as usize];
                    let auth = format!("Bearer {key}");
                    let headers = [
                        ("Content-Type", "application/json"),
                        ("Authorization", auth.as_str()),
                    ];
                    let is_ingest = rng.unit() < ingest_fraction;
                    let (path, body, expected) = if is_ingest {
                        let body = json!({"messages": [
                            {"role": "user", "content": sentence(&mut rng)},
                            {"role": "assistant", "content": sentence(&mut rng)},
                        ]});
                        ("/v1/memory/ingest", body, 202)
                    } else {
                        let question = question(&mut rng);
                        (
                            "/v1/memory/prepare",
                            json!({"messages": [{"role": "user", "content": question}]}),
                            200,
                        )
                    };
                    let sent = Instant::now();
                    let ok = match conn.send("POST", path, &headers, body.to_string().as_bytes()) {
                        Ok(response) if response.status == expected => {
                            if !is_ingest {
                                breakdowns.push(Breakdown::of(sent.elapsed(), &response));
                            }
                            true
                        }
                        Ok(_) => false,
                        Err(_) => {
                            conn = Conn::connect(addr).unwrap();
                            false
                        }
                    };
                    let latency = scheduled.elapsed();
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    } else if is_ingest {
                        ingests.push(latency);
                    } else {
                        prepares.push(latency);
                    }
                    if let Some(interval) = per_client_interval {
                        scheduled += interval;
                    }
                }
                prepare_latencies.lock().unwrap().extend(prepares);
                prepare_breakdowns.lock().unwrap().extend(breakdowns);
                ingest_latencies.lock().unwrap().extend(ingests);
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let daemon_cores = (cpu_seconds(daemon.pid()) - cpu_before) / elapsed;

    let mode = if options.rate > 0.0 {
        format!(
            "fixed rate {} req/s (latency from scheduled send time)",
            options.rate
        )
    } else {
        "closed loop (saturation)".to_owned()
    };
    println!(
        "\n{} clients, {} vaults x {} memories, {:.0}% ingest, {mode}, {:.0} s; errors: {}; daemon peak RSS {:.0} MiB; daemon CPU {daemon_cores:.2} cores\n",
        options.clients,
        options.vaults,
        options.memories,
        options.ingest_fraction * 100.0,
        elapsed,
        errors.load(Ordering::Relaxed),
        peak_rss_mb(daemon.pid())
    );
    println!("| operation | requests | throughput (req/s) | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    for (name, latencies) in [
        ("prepare", prepare_latencies),
        ("ingest (2 messages)", ingest_latencies),
    ] {
        let mut latencies = latencies.lock().unwrap().clone();
        latencies.sort();
        println!(
            "| {name} | {} | {:.0} | {} | {} | {} | {} |",
            latencies.len(),
            latencies.len() as f64 / elapsed,
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.90)),
            ms(percentile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default()),
        );
    }
    Breakdown::report(&prepare_breakdowns.lock().unwrap());
}

/// Where one prepare's time went: the round trip from the actual send, and the daemon's
/// `Server-Timing` (queue wait, model run, search).
struct Breakdown {
    round_trip: Duration,
    queue: Duration,
    model: Duration,
    search: Duration,
}

impl Breakdown {
    fn of(round_trip: Duration, response: &common::Response) -> Breakdown {
        let timing = response.server_timing();
        let part = |name: &str| {
            timing
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, ms)| Duration::from_secs_f64(ms / 1000.0))
                .unwrap_or_else(|| panic!("no {name} in Server-Timing {timing:?}"))
        };
        Breakdown {
            round_trip,
            queue: part("queue"),
            model: part("model"),
            search: part("search"),
        }
    }

    /// Prints percentiles of each part, and of the daemon's own time: the round trip less the
    /// model and the wait for it (HTTP on loopback, parsing, authentication, search, rendering).
    fn report(all: &[Breakdown]) {
        if all.is_empty() {
            return;
        }
        println!(
            "\nprepare, where the time went (ms; round trip from the actual send, the rest from Server-Timing):\n"
        );
        println!("| part | p50 | p90 | p99 |");
        println!("|---|---|---|---|");
        let column = |part: fn(&Breakdown) -> Duration| all.iter().map(part).collect::<Vec<_>>();
        let parts = [
            ("round trip", column(|b| b.round_trip)),
            ("queue wait for the model", column(|b| b.queue)),
            ("model run", column(|b| b.model)),
            ("search", column(|b| b.search)),
            (
                "daemon overhead (round trip - queue - model)",
                column(|b| b.round_trip.saturating_sub(b.queue + b.model)),
            ),
        ];
        for (name, mut values) in parts {
            values.sort();
            println!(
                "| {name} | {} | {} | {} |",
                ms(percentile(&values, 0.5)),
                ms(percentile(&values, 0.9)),
                ms(percentile(&values, 0.99))
            );
        }
    }
}

/// The daemon's background batching: windows of this many texts, sorted by length...
const BARE_WINDOW: usize = 64;
/// ...and run in batches of this many (its `--embed-background-batch-texts` default).
const BARE_BATCH: usize = 8;

/// Texts per second from one bare ONNX Runtime session (the daemon's embedding settings) over generated sentences, for a few seconds each: in batches of 32 in corpus
/// order, then batching as the daemon's indexer does.
fn bare_model_texts_per_second(rng: &mut Rng) -> (f64, f64) {
    use memory_sidecar::config::Config;
    use memory_sidecar::embed::{load_session, load_tokenizer, run_batch, TOKENIZER_FILE};
    let models = common::models_dir();
    // The model run as the daemon runs it (threads, graph level, spinning), so that the
    // efficiency ratios compare like with like.
    let embed = Config::from_environment().expect("configuration").embed;
    let tokenizer =
        load_tokenizer(&models.join(TOKENIZER_FILE), embed.max_text_tokens).expect("tokenizer");
    let mut session = load_session(&models, &embed).expect("model");
    let tokens: Vec<Vec<u32>> = (0..256)
        .map(|_| {
            let text = sentence(rng);
            tokenizer
                .encode(text.as_str(), true)
                .unwrap()
                .get_ids()
                .to_vec()
        })
        .collect();
    let plain: Vec<Vec<&[u32]>> = tokens
        .chunks(32)
        .map(|batch| batch.iter().map(Vec::as_slice).collect())
        .collect();
    let sorted: Vec<Vec<&[u32]>> = tokens
        .chunks(BARE_WINDOW)
        .flat_map(|window| {
            let mut window: Vec<&[u32]> = window.iter().map(Vec::as_slice).collect();
            window.sort_by_key(|t| t.len());
            window
                .chunks(BARE_BATCH)
                .map(<[&[u32]]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect();
    let mut rate = |batches: &[Vec<&[u32]>]| {
        let started = Instant::now();
        let mut texts = 0;
        for batch in batches.iter().cycle() {
            if started.elapsed() >= Duration::from_secs(3) {
                break;
            }
            run_batch(&mut session, batch).unwrap();
            texts += batch.len();
        }
        texts as f64 / started.elapsed().as_secs_f64()
    };
    (rate(&plain), rate(&sorted))
}
