//! Hybrid retrieval through the front door: on one small conversation, dense-only ranking misses
//! a short answer that only its words (and its neighbour) connect to the question, lexical-only
//! ranking misses a paraphrase that shares no word with it, and the hybrid default finds both.

mod common;

use common::Daemon;
use serde_json::{json, Value};

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

/// Loads the conversation; returns the key and the ids of the two memories the questions need.
fn load(daemon: &Daemon) -> (String, String, String) {
    let key = daemon.mint_key("user:retrieval");
    let asked = daemon.ingest(
        &key,
        Some("s1"),
        json!([
            user("Did you go to the pottery workshop?"),
            user("Yes, last Tuesday!")
        ]),
    );
    let answer = asked["ids"][1].as_str().unwrap().to_owned();
    let distractors = [
        "My neighbour teaches a ceramics class on weekends.",
        "I would love to learn to make bowls out of clay.",
        "The art studio downtown runs evening workshops.",
        "We went hiking on Saturday morning.",
        "Clay mugs make great presents.",
    ];
    for (i, text) in distractors.iter().enumerate() {
        daemon.ingest(&key, Some(&format!("d{i}")), json!([user(text)]));
    }
    let puppy = daemon.ingest(
        &key,
        Some("s2"),
        json!([user("I adopted a puppy last month, she is very playful.")]),
    )["ids"][0]
        .as_str()
        .unwrap()
        .to_owned();
    daemon.wait_indexed();
    (key, answer, puppy)
}

fn top3(daemon: &Daemon, key: &str, question: &str) -> (Vec<String>, String) {
    let body = json!({"messages": [user(question)], "limit": 3});
    let response = daemon.post_json("/v1/memory/prepare", Some(key), None, &body);
    assert_eq!(response.status, 200, "{}", response.text());
    let answer = response.json();
    (
        common::memory_ids(&answer),
        answer["context"].as_str().unwrap_or_default().to_owned(),
    )
}

const WHEN: &str = "When did I go to the pottery workshop?";
const DOG: &str = "Do I have a dog?";

#[test]
fn dense_only_and_lexical_only_each_miss_what_the_hybrid_finds() {
    let lexical_only = [
        "--dense-weight",
        "0",
        "--neighbour-weight",
        "0",
        "--min-score",
        "1",
    ];
    let mut found = Vec::new();
    for args in [common::DENSE_ONLY, &lexical_only[..], &[]] {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(dir.path(), args);
        let (key, answer, puppy) = load(&daemon);
        let (when, context) = top3(&daemon, &key, WHEN);
        let (dog, _) = top3(&daemon, &key, DOG);
        found.push((when.contains(&answer), dog.contains(&puppy), context));
    }
    let [(dense_when, dense_dog, _), (lexical_when, lexical_dog, _), (hybrid_when, hybrid_dog, context)] =
        &found[..]
    else {
        unreachable!()
    };
    assert!(!dense_when && *dense_dog, "dense only: {found:?}");
    assert!(*lexical_when && !lexical_dog, "lexical only: {found:?}");
    assert!(*hybrid_when && *hybrid_dog, "hybrid: {found:?}");
    // The short answer is shown with the question it answers.
    assert!(
        context.contains(
            "Yes, last Tuesday! (replying to user: \"Did you go to the pottery workshop?\")"
        ),
        "{context}"
    );
}

/// 2024-07-17T15:00:00Z, a Wednesday: the reference time the questions below are asked at.
const NOW: &str = "2024-07-17T15:00:00Z";

/// Dinners on three days among other memories; the one the question's time names is not the
/// best match by its words and meaning alone.
fn load_dinners(daemon: &Daemon) -> (String, String, String) {
    let key = daemon.mint_key("user:time");
    let dinner = |at: &str, text: &str| {
        daemon.ingest(
            &key,
            None,
            json!([{"role": "user", "content": text, "timestamp": at}]),
        )["ids"][0]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let old = dinner(
        "2024-07-02T19:00:00Z",
        "For dinner I ate a huge bowl of ramen at the station.",
    );
    dinner(
        "2024-06-20T19:00:00Z",
        "Dinner was a plate of pasta at home.",
    );
    for (i, text) in [
        "The printer at work jams every single morning.",
        "My sister is moving to Berlin in the autumn.",
        "I have been training for a half marathon.",
        "The car needs new tyres before winter.",
        "We watched a documentary about octopuses.",
        "My manager approved the conference trip.",
        "The cat knocked a plant off the windowsill.",
        "I started reading a novel about lighthouse keepers.",
    ]
    .iter()
    .enumerate()
    {
        dinner(&format!("2024-06-{:02}T09:00:00Z", 1 + i), text);
    }
    let yesterday = dinner(
        "2024-07-16T20:00:00Z",
        "Dinner tonight: sushi with Ana down at the harbour.",
    );
    daemon.wait_indexed();
    (key, old, yesterday)
}

fn ranked(daemon: &Daemon, key: &str, body: Value) -> Vec<String> {
    let response = daemon.post_json("/v1/memory/prepare", Some(key), None, &body);
    assert_eq!(response.status, 200, "{}", response.text());
    common::memory_ids(&response.json())
}

#[test]
fn a_time_the_question_names_lifts_the_memories_from_then() {
    let question = "What did I eat for dinner yesterday?";
    let mut firsts = Vec::new();
    for args in [&["--time-window-boost", "0"][..], &[]] {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(dir.path(), args);
        let (key, old, yesterday) = load_dinners(&daemon);
        let body = json!({"messages": [user(question)], "limit": 3, "now": NOW});
        firsts.push(ranked(&daemon, &key, body)[0] == yesterday);
        if args.is_empty() {
            // Asked a week later, "yesterday" is another day: no lift for the sushi.
            let later =
                json!({"messages": [user(question)], "limit": 3, "now": "2024-07-24T15:00:00Z"});
            let later = ranked(&daemon, &key, later);
            assert_ne!(later[0], yesterday, "{later:?}");
            // An explicit window keeps only what is inside it.
            let within = json!({
                "messages": [user("What did I eat for dinner?")],
                "since": "2024-07-01T00:00:00Z",
                "until": 1_721_001_600_000i64,
            });
            assert_eq!(ranked(&daemon, &key, within), vec![old.clone()]);
            let backwards = json!({
                "messages": [user("dinner")],
                "since": "2024-07-02T00:00:00Z",
                "until": "2024-07-01T00:00:00Z",
            });
            let response = daemon.post_json("/v1/memory/prepare", Some(&key), None, &backwards);
            assert_eq!(response.status, 400);
            assert_eq!(response.error_code(), "invalid_request");
        }
    }
    assert_eq!(
        firsts,
        vec![false, true],
        "yesterday's sushi ranks first with the lift, not without it"
    );
}
