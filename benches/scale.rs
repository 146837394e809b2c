//! Scale: many memories across many vaults on one node. How long the daemon takes from start to
//! ready, how much memory it holds, and how fast prepare answers, with every vault on disk.
//!
//! `cargo bench --bench scale -- [--memories 1000000] [--vaults 10000] [--touch 500]
//!  [--clients 16] [--seconds 20]`
//! (under `cargo test`: 2,000 memories in 20 vaults, as a smoke test of the driver).
//!
//! Embedding a million texts would take this machine about 100 minutes, so the data directory
//! is written through the library, by the daemon's own code (`Store`, `Keyring`, sealing,
//! `lexical::terms`): each memory's text is one of 2,000 generated sentences with a unique
//! note number, and its vector is the real model's vector of that sentence, nudged by a little
//! noise so that no two memories share one exactly. What this measures
//! is size, start-up, memory and latency; retrieval quality is `benches/locomo.rs`'s.
//! Then the release daemon is started on it (the restart), `--touch` vaults get their first
//! prepare (the index load), and a fixed-rate prepare mix runs over those vaults.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::corpus::{dir_bytes, ms, percentile, proc_status_mb, question, sentence, Rng};
use common::{Conn, Daemon};
use memory_sidecar::auth::NewKey;
use memory_sidecar::config::Config;
use memory_sidecar::crypto::MasterKey;
use memory_sidecar::embed::{
    fingerprint, load_session, load_tokenizer, run_batch, MODEL_FILE, TOKENIZER_FILE,
};
use memory_sidecar::ids::Scope;
use memory_sidecar::index::terms;
use memory_sidecar::metrics::Metrics;
use memory_sidecar::store::{
    Durability, EntryMeta, KeyRecord, Keys, Memories, MemoryRecord, NewMemory, SledOptions,
    SledStore, Vaults, Vectors,
};
use memory_sidecar::vector::UnitVector;
use serde_json::json;

struct Options {
    memories: usize,
    vaults: usize,
    touch: usize,
    clients: usize,
    seconds: f64,
}

fn options() -> Options {
    let args = common::BenchArgs::parse();
    let smoke = args.smoke;
    let vaults = args.count("vaults", if smoke { 20 } else { 10_000 }).max(1);
    let touch = args.count("touch", if smoke { 10 } else { 500 });
    Options {
        memories: args
            .count("memories", if smoke { 2_000 } else { 1_000_000 })
            .max(vaults),
        vaults,
        touch: touch.clamp(1, vaults),
        clients: args.count("clients", if smoke { 2 } else { 16 }),
        seconds: args.number("seconds", if smoke { 1.0 } else { 20.0 }),
    }
}

/// 2,000 sentences and the real model's vector of each.
fn sentence_pool(rng: &mut Rng) -> Vec<(String, Vec<f32>)> {
    let models = common::models_dir();
    // The model run as the daemon runs it.
    let embed = Config::from_environment().expect("configuration").embed;
    let tokenizer =
        load_tokenizer(&models.join(TOKENIZER_FILE), embed.max_text_tokens).expect("tokenizer");
    let mut session = load_session(&models, &embed).expect("model");
    let texts: Vec<String> = (0..2000).map(|_| sentence(rng)).collect();
    let mut pool = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        let tokens: Vec<Vec<u32>> = chunk
            .iter()
            .map(|t| {
                tokenizer
                    .encode(t.as_str(), true)
                    .unwrap()
                    .get_ids()
                    .to_vec()
            })
            .collect();
        let slices: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
        let vectors = run_batch(&mut session, &slices).unwrap();
        pool.extend(chunk.iter().cloned().zip(vectors));
    }
    pool
}

/// Writes `vaults` vaults of `memories / vaults` memories each, with one key per vault;
/// returns the keys' texts.
fn write_data_dir(data: &Path, options: &Options, rng: &mut Rng) -> Vec<String> {
    let pool = sentence_pool(rng);
    let master = MasterKey::from_hex(common::MASTER_KEY).unwrap();
    let options_store = SledOptions {
        data_dir: data.to_owned(),
        cache_bytes: 256 << 20,
        accept_lost_commits: false,
    };
    let store = SledStore::open(&options_store, &master, Metrics::new().unwrap()).unwrap();
    let per_vault = options.memories / options.vaults;
    let now = 1_790_000_000_000i64;
    let mut keys = Vec::with_capacity(options.vaults);
    for v in 0..options.vaults {
        let vault = store.create_vault(now).unwrap();
        let cipher = store.cipher(vault).unwrap();
        let key = NewKey::generate();
        store
            .insert_key(&KeyRecord {
                id: key.id.clone(),
                name: format!("scale:{v}"),
                hash: key.hash.clone(),
                vault,
                scopes: Scope::DEFAULT.to_vec(),
                created_at_ms: now,
                expires_days: None,
                expires_at_ms: None,
                revoked_at_ms: None,
                deprecated_at_ms: None,
                auto_revoke_at_ms: None,
                rotated_to: None,
                rotated_from: None,
                session_isolation: false,
            })
            .unwrap();
        keys.push(key.full);
        for chunk_start in (0..per_vault).step_by(500) {
            let picks: Vec<(usize, usize)> = (chunk_start..(chunk_start + 500).min(per_vault))
                .map(|n| (n, (rng.next() % pool.len() as u64) as usize))
                .collect();
            let memories: Vec<NewMemory> = picks
                .iter()
                .map(|(n, pick)| NewMemory {
                    record: MemoryRecord {
                        content: format!("{} (note {n})", pool[*pick].0),
                        role: "user".into(),
                        session_id: Some(format!("session-{}", n / 20)),
                        created_at_ms: now + *n as i64 * 60_000,
                        model: None,
                        tags: Vec::new(),
                        digest: String::new(),
                        passage: None,
                        superseded_by: None,
                    },
                    explicit_timestamp: false,
                })
                .collect();
            let ids = store.insert_memories(vault, &cipher, &memories).unwrap();
            let items: Vec<_> = ids
                .iter()
                .zip(&memories)
                .zip(&picks)
                .map(|(((id, _), memory), (_, pick))| {
                    let meta = EntryMeta {
                        created_at_ms: memory.record.created_at_ms,
                        session_id: memory.record.session_id.clone(),
                        tags: Vec::new(),
                        terms: terms(&memory.record.content),
                        terms_version: memory_sidecar::index::TERMS_VERSION,
                    };
                    // The sentence's vector, nudged so that no two memories share one
                    // exactly (two different texts never do; exact twins by the tens of
                    // thousands are not what an HNSW graph is built for).
                    let mut vector = pool[*pick].1.clone();
                    for x in vector.iter_mut() {
                        *x += (rng.unit() as f32 - 0.5) * 0.01;
                    }
                    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
                    vector.iter_mut().for_each(|x| *x /= norm);
                    (*id, UnitVector::new(vector).unwrap(), meta)
                })
                .collect();
            store.insert_vectors(vault, &cipher, &items).unwrap();
        }
    }
    // The vectors are the real model's: say so, as the daemon does for what it embeds.
    let models = common::models_dir();
    let model = fingerprint(&models.join(MODEL_FILE), &models.join(TOKENIZER_FILE)).unwrap();
    store.set_embedding_model(&model, false).unwrap();
    store.close().unwrap();
    keys
}

fn main() {
    let options = options();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut rng = Rng(0x5ca1e);
    let started = Instant::now();
    let keys = write_data_dir(&data, &options, &mut rng);
    println!(
        "scale: wrote {} memories in {} vaults through the library in {:.0} s; data directory {:.0} MiB",
        options.memories / options.vaults * options.vaults,
        options.vaults,
        started.elapsed().as_secs_f64(),
        dir_bytes(&data) as f64 / f64::from(1u32 << 20)
    );

    let started = Instant::now();
    let daemon = Daemon::start(&data, &["--key-rate-per-second", "0"]);
    let ready = started.elapsed();
    let rss_ready = proc_status_mb(daemon.pid(), "VmRSS:");
    println!(
        "start to ready: {:.2} s; RSS at ready {rss_ready:.0} MiB",
        ready.as_secs_f64()
    );
    for line in daemon.stderr().lines() {
        if ["store open", "memories counted", "model loaded", "ready"]
            .iter()
            .any(|needle| line.contains(needle))
        {
            println!("  daemon: {}", line.trim());
        }
    }

    // Each touched vault's first prepare loads its index.
    let touched: Vec<&String> = keys
        .iter()
        .step_by(keys.len() / options.touch)
        .take(options.touch)
        .collect();
    let mut first = Vec::new();
    for key in &touched {
        let body =
            json!({"messages": [{"role": "user", "content": "what did I note about the garden?"}]});
        let t = Instant::now();
        let response = daemon.post_json("/v1/memory/prepare", Some(key), None, &body);
        first.push(t.elapsed());
        assert_eq!(response.status, 200, "{}", response.text());
    }
    first.sort();
    let rss_touched = proc_status_mb(daemon.pid(), "VmRSS:");
    let metrics = daemon.request("GET", "/metrics", &[], b"").text();
    println!(
        "indexes held in memory: {} memories (--max-loaded-memories bounds it)",
        common::metric_value(&metrics, "memory_sidecar_index_loaded_memories").unwrap_or(-1.0)
    );
    println!(
        "first prepare of {} vaults (index load): p50 {} ms, p99 {} ms; RSS after {rss_touched:.0} MiB",
        touched.len(),
        ms(percentile(&first, 0.5)),
        ms(percentile(&first, 0.99))
    );

    // A vault past the HNSW threshold builds its graph in the background after its first
    // query: measure the steady state after that, and say how long it took.
    if options.memories / options.vaults >= 50_000 {
        let started = Instant::now();
        loop {
            let metrics = daemon.request("GET", "/metrics", &[], b"").text();
            let built = common::metric_value(&metrics, "memory_sidecar_index_graphs_built_total");
            if built.unwrap_or(0.0) >= touched.len() as f64 {
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                println!("no HNSW graph within 600 s: measuring with the exact scan");
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        println!(
            "waited {:.0} s after the first prepare for the HNSW graph",
            started.elapsed().as_secs_f64()
        );
    }

    // Fixed-rate prepare over the touched vaults, latency from the scheduled time.
    let rate = 60.0;
    let interval = Duration::from_secs_f64(options.clients as f64 / rate);
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let run_started = Instant::now();
    let total = Duration::from_secs_f64(options.seconds);
    std::thread::scope(|scope| {
        for client in 0..options.clients {
            let (touched, latencies) = (&touched, latencies.clone());
            let addr = daemon.addr;
            scope.spawn(move || {
                let mut rng = Rng(0x51de ^ (client as u64 + 1));
                let mut conn = Conn::connect(addr).unwrap();
                let mut scheduled =
                    run_started + interval.mul_f64(client as f64 / options.clients as f64);
                while run_started.elapsed() < total {
                    let now = Instant::now();
                    if scheduled > now {
                        std::thread::sleep(scheduled - now);
                    }
                    let key = touched[(rng.next() % touched.len() as u64) as usize];
                    let response = conn.prepare(key, &question(&mut rng)).unwrap();
                    assert_eq!(response.status, 200);
                    latencies.lock().unwrap().push(scheduled.elapsed());
                    scheduled += interval;
                }
            });
        }
    });
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    println!(
        "prepare, {} clients at {rate} req/s over those vaults: {} requests, p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; peak RSS {:.0} MiB",
        options.clients,
        latencies.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.9)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap_or(&Duration::ZERO)),
        proc_status_mb(daemon.pid(), "VmHWM:")
    );

    // An online backup while a client keeps ingesting: how long writes wait (the manifest's
    // `writes_paused_ms`), what the client saw, and the backup's size.
    let done = std::sync::atomic::AtomicBool::new(false);
    let waits = Mutex::new(Vec::new());
    let (answer, took) = std::thread::scope(|scope| {
        scope.spawn(|| {
            let key = touched[0];
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let body = json!({"messages": [{"role": "user", "content": format!("backup-time note {n}")}]});
                let t = Instant::now();
                let response = daemon.post_json("/v1/memory/ingest", Some(key), None, &body);
                assert_eq!(response.status, 202, "{}", response.text());
                waits.lock().unwrap().push(t.elapsed());
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let answer = daemon.post_json(
            "/v1/admin/backup",
            Some(common::ADMIN_KEY),
            None,
            &json!({"name": "scale"}),
        );
        let took = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (answer, took)
    });
    assert_eq!(answer.status, 201, "{}", answer.text());
    let manifest = answer.json();
    let backup = Path::new(manifest["path"].as_str().expect("the backup's path")).to_owned();
    let mut waits = waits.into_inner().unwrap();
    waits.sort();
    println!(
        "online backup of {} memories: {:.1} s, writes paused {} ms, {:.0} MiB; ingests meanwhile: {} (p50 {} ms, max {} ms)",
        manifest["counts"]["memories"],
        took.as_secs_f64(),
        manifest["writes_paused_ms"],
        dir_bytes(&backup) as f64 / f64::from(1u32 << 20),
        waits.len(),
        ms(percentile(&waits, 0.5)),
        ms(*waits.last().unwrap_or(&Duration::ZERO)),
    );
}
