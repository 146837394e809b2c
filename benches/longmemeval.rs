//! Retrieval benchmark on LongMemEval_S-format questions, through the public API only.
//!
//! `cargo bench --bench longmemeval -- [--data ../shared/bench/longmemeval_s_dev.json.gz]
//!  [--out FILE] [--daemon-args "--passage-chars 800"] [--interleave] [--limit 50]
//!  [--reuse DIR]`
//!
//! Each question brings its own haystack of chat sessions. For each question a fresh key; every
//! session ingested through the API as it is (one call per session, each turn dated by its
//! session's date, `X-Session-ID` = the session id); once everything is embedded, the question
//! alone asked through `POST /v1/memory/prepare` (with `now` = the question's date). Reported
//! per question type and overall: session recall_all@1/3/5/10 (all evidence sessions among the
//! top k distinct sessions of the returned memories, the official unit), turn recall@10 of the
//! turns marked `has_answer`, context tokens and prepare latency. Abstention questions
//! (`_abs`) are left out of the recall, as in the official retrieval evaluation.
//!
//! `--interleave` fills the way a gateway does (a prepare after every session's ingest).
//! `--reuse DIR` keeps the daemon's data in DIR: the first run fills it, later runs (with other
//! ranking flags in `--daemon-args`) only ask, so a sweep of ranking parameters costs minutes,
//! not a fill each (flags that change what is stored, like `--passage-chars`, need a fresh
//! DIR). Under `cargo test` it runs on a tiny synthetic file of the same shape.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Client, Daemon};
use serde_json::{json, Value};

const SESSION_KS: [usize; 4] = [1, 3, 5, 10];
const TURN_K: usize = 10;

struct Options {
    data: PathBuf,
    out: PathBuf,
    daemon_args: Vec<String>,
    interleave: bool,
    /// Memories asked for per question (the sessions are ranked from them).
    limit: usize,
    /// A data directory kept between runs: filled once, then only asked.
    reuse: Option<PathBuf>,
}

fn options() -> Options {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut options = Options {
        data: if smoke {
            root.join("benches/data/longmemeval_synthetic.json")
        } else {
            root.join("../shared/bench/longmemeval_s_dev.json.gz")
        },
        out: root.join(if smoke {
            "target/longmemeval-smoke.json"
        } else {
            "target/longmemeval-result.json"
        }),
        daemon_args: Vec::new(),
        interleave: args.iter().any(|a| a == "--interleave"),
        limit: 50,
        reuse: None,
    };
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--data" => options.data = PathBuf::from(value),
            "--out" => options.out = PathBuf::from(value),
            "--limit" => options.limit = value.parse().expect("--limit takes a count"),
            "--reuse" => options.reuse = Some(PathBuf::from(value)),
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

/// The questions, from a JSON file or its gzip.
fn read_questions(path: &PathBuf) -> Vec<Value> {
    let mut bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    if path.extension().is_some_and(|e| e == "gz") {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut plain)
            .expect("gunzip");
        bytes = plain;
    }
    serde_json::from_slice(&bytes).expect("a LongMemEval-format JSON array")
}

/// `2023/05/30 (Tue) 10:18` -> milliseconds since the epoch (UTC).
fn date_ms(text: &str) -> i64 {
    let mut parts = text.split_whitespace();
    let date = parts.next().expect("YYYY/MM/DD");
    let clock = parts.last().expect("HH:MM");
    let numbers: Vec<i64> = date
        .split('/')
        .map(|n| n.parse().expect("a date"))
        .collect();
    let (hour, minute) = clock.split_once(':').expect("HH:MM");
    let month = time::Month::try_from(numbers[1] as u8).expect("a month");
    let day = time::Date::from_calendar_date(numbers[0] as i32, month, numbers[2] as u8)
        .expect("a calendar date");
    let midnight = day.midnight().assume_utc().unix_timestamp();
    (midnight + hour.parse::<i64>().unwrap() * 3600 + minute.parse::<i64>().unwrap() * 60) * 1000
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

/// One question's vault: its key, and for each stored memory the session and turn it is.
struct Loaded<'a> {
    question: &'a Value,
    key: String,
    turn_of: HashMap<String, (String, usize)>,
    /// (session id, turn index) of every turn marked `has_answer`.
    answer_turns: HashSet<(String, usize)>,
}

#[derive(Default)]
struct Sums {
    questions: usize,
    session_recall: [f64; SESSION_KS.len()],
    turn_recall: f64,
    turn_questions: usize,
    tokens: f64,
}

impl Sums {
    fn add(&mut self, other: &Sums) {
        self.questions += other.questions;
        for (a, b) in self.session_recall.iter_mut().zip(other.session_recall) {
            *a += b;
        }
        self.turn_recall += other.turn_recall;
        self.turn_questions += other.turn_questions;
        self.tokens += other.tokens;
    }

    fn json(&self) -> Value {
        let n = self.questions.max(1) as f64;
        json!({
            "questions": self.questions,
            "session_recall_all": self.session_recall.iter().map(|s| s / n).collect::<Vec<_>>(),
            "turn_recall_at_10": self.turn_recall / self.turn_questions.max(1) as f64,
            "context_tokens": self.tokens / n,
        })
    }

    fn row(&self, label: &str) -> String {
        let n = self.questions.max(1) as f64;
        let sessions: Vec<String> = self
            .session_recall
            .iter()
            .map(|s| format!("{:.3}", s / n))
            .collect();
        format!(
            "| {label} ({}) | {} | {:.3} | {:.0} |",
            self.questions,
            sessions.join(" | "),
            self.turn_recall / self.turn_questions.max(1) as f64,
            self.tokens / n
        )
    }
}

/// A question's sessions as ingested: their ids, each turn's messages (dated by the session),
/// the turns' texts by index, and the (session, turn) of every turn marked `has_answer`.
struct Haystack {
    sessions: Vec<HaystackSession>,
    answer_turns: HashSet<(String, usize)>,
}

/// A session's id, its messages as ingested, and its turns' texts by index.
type HaystackSession = (String, Vec<Value>, Vec<(usize, String)>);

fn haystack(question: &Value) -> Haystack {
    let sessions = question["haystack_sessions"].as_array().unwrap();
    let session_ids = question["haystack_session_ids"].as_array().unwrap();
    let dates = question["haystack_dates"].as_array().unwrap();
    let mut answer_turns = HashSet::new();
    let mut out = Vec::new();
    for ((session, session_id), date) in sessions.iter().zip(session_ids).zip(dates) {
        let session_id = session_id.as_str().unwrap().to_owned();
        let at = date_ms(date.as_str().unwrap());
        let mut contents: Vec<(usize, String)> = Vec::new();
        let messages: Vec<Value> = session
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .filter_map(|(index, turn)| {
                if turn["has_answer"].as_bool() == Some(true) {
                    answer_turns.insert((session_id.clone(), index));
                }
                let content = turn["content"].as_str()?;
                if content.trim().is_empty() {
                    return None;
                }
                contents.push((index, content.to_owned()));
                Some(json!({"role": turn["role"], "content": content, "timestamp": at}))
            })
            .collect();
        if !messages.is_empty() {
            out.push((session_id, messages, contents));
        }
    }
    Haystack {
        sessions: out,
        answer_turns,
    }
}

/// What a `--reuse` directory was filled with: the data file and each question's key.
const FILLED: &str = "longmemeval-filled.json";

fn main() {
    let options = options();
    let questions = read_questions(&options.data);
    let temporary = tempfile::tempdir().unwrap();
    let dir = match &options.reuse {
        Some(dir) => {
            std::fs::create_dir_all(dir).unwrap();
            dir.clone()
        }
        None => temporary.path().to_owned(),
    };
    let filled: Option<Value> = std::fs::read(dir.join(FILLED))
        .ok()
        .map(|bytes| serde_json::from_slice(&bytes).expect("a fill record"));
    if let Some(filled) = &filled {
        assert_eq!(
            filled["data"],
            json!(options.data.display().to_string()),
            "{} was filled from another file",
            dir.display()
        );
        eprintln!(
            "reusing {} (filled with daemon args {}): asking only",
            dir.display(),
            filled["daemon_args"]
        );
    }
    let daemon_args: Vec<&str> = ["--key-rate-per-second", "0"]
        .into_iter()
        .chain(options.daemon_args.iter().map(String::as_str))
        .collect();
    let daemon = Daemon::start(&dir, &daemon_args);
    let client = Client { addr: daemon.addr };
    let admin_key = common::ADMIN_KEY;

    // Load: a key per question; its sessions, each in one ingest call.
    let started = Instant::now();
    let mut loaded = Vec::new();
    let mut turns = 0;
    let mut refused = 0;
    for (number, question) in questions.iter().enumerate() {
        let id = question["question_id"].as_str().unwrap();
        let Haystack {
            sessions,
            answer_turns,
        } = haystack(question);
        let mut sessions_turns: Vec<(String, Vec<(usize, String)>)> = Vec::new();
        let key = if let Some(filled) = &filled {
            for (session_id, messages, contents) in sessions {
                turns += messages.len();
                sessions_turns.push((session_id, contents));
            }
            filled["keys"][number]
                .as_str()
                .expect("a key per question")
                .to_owned()
        } else {
            let minted = client.post_json(
                "/v1/keys",
                Some(admin_key),
                None,
                &json!({"name": format!("longmemeval {id}")}),
            );
            assert_eq!(minted.status, 201, "{}", minted.text());
            let key = minted.json()["key"].as_str().unwrap().to_owned();
            for (session_id, messages, contents) in sessions {
                turns += messages.len();
                let answer = client.post_json(
                    "/v1/memory/ingest",
                    Some(&key),
                    Some(&session_id),
                    &json!({"messages": messages}),
                );
                if answer.status != 202 {
                    refused += 1;
                    eprintln!("a session was refused: {} {}", answer.status, answer.text());
                    continue;
                }
                sessions_turns.push((session_id, contents));
                if options.interleave {
                    let asked = question["question"].as_str().unwrap();
                    let body = json!({"messages": [{"role": "user", "content": asked}]});
                    let answer = client.post_json("/v1/memory/prepare", Some(&key), None, &body);
                    assert_eq!(answer.status, 200, "{}", answer.text());
                }
            }
            key
        };
        let turn_of = turns_of_memories(&client, &key, &sessions_turns);
        loaded.push(Loaded {
            question,
            key,
            turn_of,
            answer_turns,
        });
    }
    let acknowledged = started.elapsed();
    client.wait_indexed_within(Duration::from_secs(3 * 3600));
    let indexed = started.elapsed();
    if options.reuse.is_some() && filled.is_none() {
        let record = json!({
            "data": options.data.display().to_string(),
            "daemon_args": options.daemon_args,
            "keys": loaded.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(),
        });
        std::fs::write(dir.join(FILLED), serde_json::to_vec(&record).unwrap()).unwrap();
    }

    // Ask: each question alone, once.
    let mut latencies = Vec::new();
    let mut by_type: BTreeMap<String, Sums> = BTreeMap::new();
    for vault in &loaded {
        let question = vault.question;
        if question["question_id"].as_str().unwrap().ends_with("_abs") {
            continue;
        }
        let body = json!({
            "messages": [{"role": "user", "content": question["question"]}],
            "limit": options.limit,
            "context_tokens": 16000,
            "now": date_ms(question["question_date"].as_str().unwrap()),
        });
        let asked = Instant::now();
        let answer = client.post_json("/v1/memory/prepare", Some(&vault.key), None, &body);
        latencies.push(asked.elapsed());
        assert_eq!(answer.status, 200, "{}", answer.text());
        let answer = answer.json();
        let returned: Vec<&(String, usize)> = answer["memories"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| vault.turn_of.get(m["id"].as_str().unwrap()))
            .collect();
        let mut ranked_sessions: Vec<&str> = Vec::new();
        for (session, _) in &returned {
            if !ranked_sessions.contains(&session.as_str()) {
                ranked_sessions.push(session);
            }
        }
        let evidence: Vec<&str> = question["answer_session_ids"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let mut sums = Sums {
            questions: 1,
            tokens: answer["tokens"].as_f64().unwrap_or(0.0),
            ..Sums::default()
        };
        for (slot, k) in SESSION_KS.iter().enumerate() {
            let top = &ranked_sessions[..(*k).min(ranked_sessions.len())];
            if evidence.iter().all(|e| top.contains(e)) {
                sums.session_recall[slot] = 1.0;
            }
        }
        if !vault.answer_turns.is_empty() {
            let top: HashSet<&(String, usize)> = returned.iter().take(TURN_K).copied().collect();
            let found = vault
                .answer_turns
                .iter()
                .filter(|t| top.contains(t))
                .count();
            sums.turn_recall = found as f64 / vault.answer_turns.len() as f64;
            sums.turn_questions = 1;
        }
        let kind = question["question_type"].as_str().unwrap_or("?").to_owned();
        by_type.entry(kind).or_default().add(&sums);
    }
    latencies.sort();
    let mut all = Sums::default();
    for sums in by_type.values() {
        all.add(sums);
    }
    let result = json!({
        "data": options.data.display().to_string(),
        "daemon_args": options.daemon_args,
        "interleave": options.interleave,
        "reused": filled.is_some(),
        "limit": options.limit,
        "questions": questions.len(),
        "turns": turns,
        "sessions_refused": refused,
        "session_ks": SESSION_KS,
        "all": all.json(),
        "per_type": by_type.iter().map(|(k, v)| (k.clone(), v.json())).collect::<BTreeMap<_, _>>(),
        "ingest": {
            "acknowledged_seconds": acknowledged.as_secs_f64(),
            "indexed_seconds": indexed.as_secs_f64(),
            "indexed_turns_per_second": turns as f64 / indexed.as_secs_f64(),
        },
        "prepare_ms": {
            "calls": latencies.len(),
            "p50": percentile(&latencies, 0.50),
            "p99": percentile(&latencies, 0.99),
            "max": percentile(&latencies, 1.0),
        },
    });
    if let Some(parent) = options.out.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&options.out, serde_json::to_vec_pretty(&result).unwrap()).unwrap();

    println!(
        "LongMemEval retrieval: {} questions, {turns} turns, {refused} sessions refused; fill {}; daemon args {:?}",
        questions.len(),
        if options.interleave { "interleaved with prepares" } else { "embedded before the questions" },
        options.daemon_args
    );
    println!();
    println!("| question type | session recall_all@1 | @3 | @5 | @10 | turn recall@10 | context tokens |");
    println!("|---|---|---|---|---|---|---|");
    for (kind, sums) in &by_type {
        println!("{}", sums.row(kind));
    }
    println!("{}", all.row("all"));
    println!();
    println!(
        "ingest: {turns} turns acknowledged in {:.1} s, embedded and indexed in {:.1} s ({:.0} turns/s); prepare over {} calls: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        acknowledged.as_secs_f64(),
        indexed.as_secs_f64(),
        turns as f64 / indexed.as_secs_f64(),
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
    println!("result written to {}", options.out.display());
}

/// Each stored memory's session and turn: read back through the export, a memory being the
/// turn whose text holds it (a whole turn, or one passage of a long one).
fn turns_of_memories(
    client: &Client,
    key: &str,
    sessions: &[(String, Vec<(usize, String)>)],
) -> HashMap<String, (String, usize)> {
    let by_session: HashMap<&str, &Vec<(usize, String)>> = sessions
        .iter()
        .map(|(id, turns)| (id.as_str(), turns))
        .collect();
    let mut turn_of = HashMap::new();
    for memory in client.export(key) {
        let session = memory["session_id"].as_str().unwrap_or_default();
        let content = memory["content"].as_str().unwrap_or_default().trim();
        let Some(turns) = by_session.get(session) else {
            continue;
        };
        if let Some((index, _)) = turns.iter().find(|(_, text)| text.contains(content)) {
            let id = memory["id"].as_str().unwrap().to_owned();
            turn_of.insert(id, (session.to_owned(), *index));
        }
    }
    turn_of
}
