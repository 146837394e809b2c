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
    let dense_only = [
        "--dense-weight",
        "1",
        "--neighbour-weight",
        "0",
        "--min-lexical",
        "1000",
    ];
    let lexical_only = [
        "--dense-weight",
        "0",
        "--neighbour-weight",
        "0",
        "--min-score",
        "1",
    ];
    let mut found = Vec::new();
    for args in [&dense_only[..], &lexical_only[..], &[]] {
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
