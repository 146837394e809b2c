//! Retrieval benchmark on LoCoMo-format conversations, through the public API only.
//!
//! `cargo bench --bench locomo -- [--data ../shared/bench/locomo_dev.json] [--out FILE]
//!  [--addr HOST:PORT] [--daemon-args "--dense-weight 1"] [--interleave]`
//!
//! It starts the release daemon on a temp dir (or, with `--addr`, uses a running one and the
//! admin key in `MEMORY_SIDECAR_ADMIN_KEY`), mints one key per conversation, ingests every turn
//! as `"Speaker: text"` dated by its session, waits until all are embedded, then asks every
//! question that has evidence (categories 1-4) through `POST /v1/memory/prepare` with
//! `limit` = k for k in 5, 10, 25, 50. It scores turn-level evidence recall@k (the mean fraction
//! of a question's evidence turns returned), overall and per category, the context tokens per
//! question, ingest throughput and prepare latency, prints a markdown table and writes a JSON
//! result. Under `cargo test` it runs on a tiny synthetic file of the same shape.
//!
//! `--interleave` fills the way a gateway does: a prepare after every ingest, so each vault's
//! index is loaded while its turns are still being embedded (in length order, not turn order)
//! and takes them in as they come; the questions are scored once everything is embedded, as
//! without it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Client, Daemon};
use serde_json::{json, Value};

const KS: [usize; 4] = [5, 10, 25, 50];
/// Turns per ingest call (all from one session, in order).
const INGEST_BATCH: usize = 50;

struct Options {
    data: PathBuf,
    out: PathBuf,
    addr: Option<SocketAddr>,
    daemon_args: Vec<String>,
    interleave: bool,
}

fn options() -> Options {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut options = Options {
        data: if smoke {
            root.join("benches/data/locomo_synthetic.json")
        } else {
            root.join("../shared/bench/locomo_dev.json")
        },
        out: root.join(if smoke {
            "target/locomo-smoke.json"
        } else {
            "target/locomo-result.json"
        }),
        addr: None,
        daemon_args: Vec::new(),
        interleave: args.iter().any(|a| a == "--interleave"),
    };
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--data" => options.data = PathBuf::from(value),
            "--out" => options.out = PathBuf::from(value),
            "--addr" => options.addr = Some(value.parse().expect("--addr takes HOST:PORT")),
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

/// `1:56 pm on 8 May, 2023` -> milliseconds since the epoch (UTC).
fn session_date_ms(text: &str) -> i64 {
    let (clock, date) = text
        .split_once(" on ")
        .expect("LoCoMo date: TIME on DAY MONTH, YEAR");
    let (hm, half) = clock.trim().split_once(' ').expect("h:mm am|pm");
    let (hour, minute) = hm.split_once(':').expect("h:mm");
    let mut hour: i64 = hour.parse().expect("hour");
    let minute: i64 = minute.parse().expect("minute");
    if half.eq_ignore_ascii_case("pm") && hour != 12 {
        hour += 12;
    }
    if half.eq_ignore_ascii_case("am") && hour == 12 {
        hour = 0;
    }
    let date = date.replace(',', "");
    let parts: Vec<&str> = date.split_whitespace().collect();
    let day: u8 = parts[0].parse().expect("day");
    let month: time::Month = match &parts[1][..3] {
        "Jan" => time::Month::January,
        "Feb" => time::Month::February,
        "Mar" => time::Month::March,
        "Apr" => time::Month::April,
        "May" => time::Month::May,
        "Jun" => time::Month::June,
        "Jul" => time::Month::July,
        "Aug" => time::Month::August,
        "Sep" => time::Month::September,
        "Oct" => time::Month::October,
        "Nov" => time::Month::November,
        "Dec" => time::Month::December,
        other => panic!("unknown month {other}"),
    };
    let year: i32 = parts[2].parse().expect("year");
    let date = time::Date::from_calendar_date(year, month, day).expect("a calendar date");
    let midnight = date.midnight().assume_utc().unix_timestamp();
    (midnight + hour * 3600 + minute * 60) * 1000
}

struct Turn {
    dia_id: String,
    text: String,
    session: usize,
    at_ms: i64,
}

struct Question {
    text: String,
    category: u64,
    evidence: Vec<String>,
}

fn conversation(sample: &Value) -> (Vec<Turn>, Vec<Question>) {
    let conv = &sample["conversation"];
    let mut turns = Vec::new();
    let mut session = 1;
    while let Some(list) = conv[format!("session_{session}")].as_array() {
        let at = session_date_ms(
            conv[format!("session_{session}_date_time")]
                .as_str()
                .unwrap(),
        );
        for (i, turn) in list.iter().enumerate() {
            turns.push(Turn {
                dia_id: turn["dia_id"].as_str().unwrap().to_owned(),
                text: format!(
                    "{}: {}",
                    turn["speaker"].as_str().unwrap(),
                    turn["text"].as_str().unwrap()
                ),
                session,
                // A second apart, so that turns keep their order and repeats stay distinct.
                at_ms: at + i as i64 * 1000,
            });
        }
        session += 1;
    }
    let questions = sample["qa"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["category"].as_u64() != Some(5))
        .filter_map(|q| {
            let evidence: Vec<String> = q["evidence"]
                .as_array()?
                .iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect();
            (!evidence.is_empty()).then(|| Question {
                text: q["question"].as_str().unwrap().to_owned(),
                category: q["category"].as_u64().unwrap_or(0),
                evidence,
            })
        })
        .collect();
    (turns, questions)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

fn main() {
    let options = options();
    let samples: Vec<Value> = serde_json::from_slice(
        &std::fs::read(&options.data)
            .unwrap_or_else(|e| panic!("reading {}: {e}", options.data.display())),
    )
    .expect("a LoCoMo-format JSON array");
    let dir = tempfile::tempdir().unwrap();
    let daemon_args: Vec<&str> = ["--key-rate-per-second", "0"]
        .into_iter()
        .chain(options.daemon_args.iter().map(String::as_str))
        .collect();
    let (_daemon, client, admin_key) = match options.addr {
        Some(addr) => (
            None,
            Client { addr },
            std::env::var("MEMORY_SIDECAR_ADMIN_KEY")
                .expect("--addr needs MEMORY_SIDECAR_ADMIN_KEY"),
        ),
        None => {
            let daemon = Daemon::start(dir.path(), &daemon_args);
            let client = Client { addr: daemon.addr };
            (Some(daemon), client, common::ADMIN_KEY.to_owned())
        }
    };

    // Load: one key per conversation; turns in session order, through ingest.
    let load_started = Instant::now();
    let mut loaded = Vec::new();
    let mut turn_count = 0;
    for (index, sample) in samples.iter().enumerate() {
        let (turns, questions) = conversation(sample);
        let minted = client.post_json(
            "/v1/keys",
            Some(&admin_key),
            None,
            &json!({"name": format!("locomo {index}")}),
        );
        assert_eq!(minted.status, 201, "{}", minted.text());
        let key = minted.json()["key"].as_str().unwrap().to_owned();
        let mut dia_of: HashMap<String, String> = HashMap::new();
        for group in turns.chunk_by(|a, b| a.session == b.session) {
            for batch in group.chunks(INGEST_BATCH) {
                let messages: Vec<Value> = batch
                    .iter()
                    .map(|t| json!({"role": "user", "content": t.text, "timestamp": t.at_ms}))
                    .collect();
                let session = format!("session_{}", batch[0].session);
                let answer = client.post_json(
                    "/v1/memory/ingest",
                    Some(&key),
                    Some(&session),
                    &json!({"messages": messages}),
                );
                assert_eq!(answer.status, 202, "{}", answer.text());
                let ids = answer.json()["ids"].as_array().unwrap().clone();
                for (turn, id) in batch.iter().zip(ids) {
                    dia_of.insert(id.as_str().unwrap().to_owned(), turn.dia_id.clone());
                }
                if options.interleave {
                    // The next model call's prepare, while this exchange is being embedded.
                    let asked = questions
                        .first()
                        .map_or("What happened?", |q| q.text.as_str());
                    let body = json!({"messages": [{"role": "user", "content": asked}]});
                    let answer = client.post_json("/v1/memory/prepare", Some(&key), None, &body);
                    assert_eq!(answer.status, 200, "{}", answer.text());
                }
            }
        }
        turn_count += turns.len();
        loaded.push((key, dia_of, questions));
    }
    let acknowledged = load_started.elapsed();
    client.wait_indexed_within(Duration::from_secs(3600));
    let indexed = load_started.elapsed();

    // Ask: every question at every k.
    let mut latencies = Vec::new();
    let mut totals = [0f64; KS.len()];
    let mut tokens = [0f64; KS.len()];
    let mut per_category: BTreeMap<u64, ([f64; KS.len()], usize)> = BTreeMap::new();
    let mut asked = 0;
    for (key, dia_of, questions) in &loaded {
        for question in questions {
            let mut recalls = [0f64; KS.len()];
            for (slot, k) in KS.iter().enumerate() {
                let body = json!({
                    "messages": [{"role": "user", "content": question.text}],
                    "limit": k,
                    "context_tokens": 16000,
                });
                let started = Instant::now();
                let answer = client.post_json("/v1/memory/prepare", Some(key), None, &body);
                latencies.push(started.elapsed());
                assert_eq!(answer.status, 200, "{}", answer.text());
                let answer = answer.json();
                let returned: Vec<&str> = answer["memories"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|m| dia_of.get(m["id"].as_str().unwrap()).map(String::as_str))
                    .collect();
                let found = question
                    .evidence
                    .iter()
                    .filter(|e| returned.contains(&e.as_str()))
                    .count();
                recalls[slot] = found as f64 / question.evidence.len() as f64;
                tokens[slot] += answer["tokens"].as_f64().unwrap_or(0.0);
            }
            let entry = per_category
                .entry(question.category)
                .or_insert(([0.0; KS.len()], 0));
            for (slot, recall) in recalls.iter().enumerate() {
                totals[slot] += recall;
                entry.0[slot] += recall;
            }
            entry.1 += 1;
            asked += 1;
        }
    }
    latencies.sort();
    let n = asked.max(1) as f64;
    let recall: Vec<f64> = totals.iter().map(|t| t / n).collect();
    let context_tokens: Vec<f64> = tokens.iter().map(|t| t / n).collect();
    let categories: BTreeMap<String, Value> = per_category
        .iter()
        .map(|(category, (sums, count))| {
            let values: Vec<f64> = sums.iter().map(|s| s / *count as f64).collect();
            (
                category.to_string(),
                json!({"questions": count, "recall": values}),
            )
        })
        .collect();
    let result = json!({
        "data": options.data.display().to_string(),
        "daemon_args": options.daemon_args,
        "interleave": options.interleave,
        "conversations": samples.len(),
        "turns": turn_count,
        "questions": asked,
        "ks": KS,
        "recall": recall,
        "per_category": categories,
        "context_tokens": context_tokens,
        "ingest": {
            "acknowledged_seconds": acknowledged.as_secs_f64(),
            "acknowledged_turns_per_second": turn_count as f64 / acknowledged.as_secs_f64(),
            "indexed_seconds": indexed.as_secs_f64(),
            "indexed_turns_per_second": turn_count as f64 / indexed.as_secs_f64(),
        },
        "prepare_ms": {
            "calls": latencies.len(),
            "p50": percentile(&latencies, 0.50),
            "p90": percentile(&latencies, 0.90),
            "p99": percentile(&latencies, 0.99),
            "max": percentile(&latencies, 1.0),
        },
    });
    if let Some(parent) = options.out.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&options.out, serde_json::to_vec_pretty(&result).unwrap()).unwrap();

    println!(
        "fill: {}",
        if options.interleave {
            "interleaved with prepares (the index loaded while turns are embedded)"
        } else {
            "every turn embedded before the first prepare"
        }
    );
    println!(
        "LoCoMo retrieval: {} conversations, {turn_count} turns, {asked} questions (categories 1-4); daemon args {:?}",
        samples.len(),
        options.daemon_args
    );
    println!();
    println!("| questions | recall@5 | recall@10 | recall@25 | recall@50 |");
    println!("|---|---|---|---|---|");
    let row = |label: String, values: &[f64]| {
        let cells: Vec<String> = values.iter().map(|v| format!("{v:.3}")).collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    row(format!("all ({asked})"), &recall);
    for (category, (sums, count)) in &per_category {
        let values: Vec<f64> = sums.iter().map(|s| s / *count as f64).collect();
        row(format!("category {category} ({count})"), &values);
    }
    row("context tokens".to_owned(), &context_tokens);
    println!();
    println!(
        "ingest: {turn_count} turns acknowledged in {:.1} s ({:.0} turns/s), embedded and indexed in {:.1} s; prepare over {} calls: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        acknowledged.as_secs_f64(),
        turn_count as f64 / acknowledged.as_secs_f64(),
        indexed.as_secs_f64(),
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
    println!("result written to {}", options.out.display());
}
