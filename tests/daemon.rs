//! Through the front door: the real binary, the real model, a real sled store in a temp dir.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    finish_slow_prepare, first_id, memory_ids, metric_value, start_slow_prepare, Daemon, ADMIN_KEY,
};
use serde_json::{json, Value};

fn user(content: &str) -> Value {
    json!({"role": "user", "content": content})
}

const DISTRACTORS: &[&str] = &[
    "I went hiking in the Alps with my brother last summer.",
    "My favourite programming language is Rust.",
    "I drive a blue 2015 Toyota Corolla.",
    "We adopted a grey cat called Pixel in March.",
    "I work as a nurse on the night shift at the city hospital.",
    "My daughter starts primary school in September.",
    "I'm learning to play the piano, mostly Chopin.",
];

#[test]
fn prepare_finds_the_ingested_memory_among_distractors() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--log", "debug"]);
    let key = daemon.mint_key("user:1");
    for fact in DISTRACTORS {
        daemon.ingest(&key, None, json!([user(fact)]));
    }
    let target = daemon.ingest(
        &key,
        None,
        json!([user("I am severely allergic to peanuts.")]),
    );
    let target_id = first_id(&target);
    daemon.wait_indexed();

    let answer = daemon.prepare(
        &key,
        None,
        "Which foods must I avoid because of my allergy?",
    );
    assert_eq!(memory_ids(&answer).first(), Some(&target_id), "{answer}");
    let context = answer["context"].as_str().expect("a context");
    assert!(context.contains("allergic to peanuts"), "{context}");
    assert!(
        context.contains("today"),
        "the context dates each memory: {context}"
    );
    assert!(context.starts_with("Memories about the user"), "{context}");
    assert!(answer["tokens"].as_u64().unwrap() > 0);
    let memory = &answer["memories"][0];
    assert_eq!(memory["role"], "user");
    assert!(memory["score"].as_f64().unwrap() > 0.25);
    assert!(memory["created_at"].as_str().unwrap().ends_with('Z'));

    // Nothing relevant: a null context rather than the nearest noise.
    let answer = daemon.prepare(
        &key,
        None,
        "Explain the rules of cricket's leg before wicket.",
    );
    assert!(answer["context"].is_null(), "{answer}");
    assert_eq!(answer["tokens"], 0);

    // Server-Timing splits the daemon's time: the wait for the model, the model, the search.
    let body = json!({"messages": [user("What am I allergic to?")]});
    let response = daemon.call("POST", "/v1/memory/prepare", &key, None, Some(&body));
    assert_eq!(response.status, 200);
    let timing = response.server_timing();
    let names: Vec<&str> = timing.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["queue", "model", "search"], "{timing:?}");
    assert!(timing.iter().all(|(_, ms)| *ms >= 0.0), "{timing:?}");
    assert!(timing[1].1 > 0.0, "the model took no time: {timing:?}");

    // Neither the key's secret nor any memory text reaches the logs, even at debug level.
    let logs = daemon.stderr();
    assert!(!logs.contains(&key[3..]), "the key leaked into the logs");
    assert!(
        !logs.contains(ADMIN_KEY),
        "the admin key leaked into the logs"
    );
    assert!(
        !logs.contains("peanuts"),
        "memory text leaked into the logs"
    );
}

#[test]
fn two_keys_never_see_each_others_memories() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let alice = daemon.mint_key("user:alice");
    let bob = daemon.mint_key("user:bob");
    let alice_id = first_id(&daemon.ingest(
        &alice,
        None,
        json!([user("My locker code at the gym is 4812.")]),
    ));
    let bob_id = first_id(&daemon.ingest(
        &bob,
        None,
        json!([user("My locker at the gym is number 17.")]),
    ));
    daemon.wait_indexed();

    let question = "What is my gym locker code?";
    let for_alice = daemon.prepare_until_found(&alice, None, question, &alice_id);
    let for_bob = daemon.prepare_until_found(&bob, None, question, &bob_id);
    assert!(!memory_ids(&for_alice).contains(&bob_id), "{for_alice}");
    assert!(!memory_ids(&for_bob).contains(&alice_id), "{for_bob}");
    assert!(!for_bob.to_string().contains("4812"), "{for_bob}");
    assert!(!for_alice.to_string().contains("number 17"), "{for_alice}");
}

#[test]
fn suffix_modes_switch_retrieval_and_storage() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let key = daemon.mint_key("user:modes");
    let fact = |text: &str| json!([user(text)]);

    let off = daemon.ingest(
        &format!("{key}:off"),
        None,
        fact("I collect vintage fountain pens."),
    );
    assert_eq!(off, json!({"stored": 0, "ids": []}));
    let read = daemon.ingest(
        &format!("{key}:read"),
        None,
        fact("I collect vintage fountain pens."),
    );
    assert_eq!(read["stored"], 0);
    let write = daemon.ingest(
        &format!("{key}:write"),
        None,
        fact("I collect vintage fountain pens."),
    );
    assert_eq!(write["stored"], 1);
    let id = first_id(&write);
    daemon.wait_indexed();

    let question = "What do I collect as a hobby?";
    let found = daemon.prepare_until_found(&format!("{key}:read"), None, question, &id);
    assert!(found["context"].is_string());
    let full = daemon.prepare(&key, None, question);
    assert_eq!(memory_ids(&full), vec![id.clone()]);
    for disabled in [format!("{key}:write"), format!("{key}:off")] {
        let answer = daemon.prepare(&disabled, None, question);
        assert_eq!(
            answer,
            json!({"context": null, "memories": [], "tokens": 0, "memories_found": 0}),
            "{disabled}"
        );
    }
    // An unknown suffix is not silently widened to full access.
    let response = daemon.post_json(
        "/v1/memory/prepare",
        Some(&format!("{key}:admin")),
        None,
        &json!({"messages": [user(question)]}),
    );
    assert_eq!(
        (response.status, response.error_code().as_str()),
        (401, "invalid_key")
    );
}

#[test]
fn session_memories_rank_first_and_other_sessions_are_searched_too() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let key = daemon.mint_key("user:sessions");
    let in_one = first_id(&daemon.ingest(
        &key,
        Some("s-1"),
        json!([user("My favourite colour is green.")]),
    ));
    let in_two = first_id(&daemon.ingest(
        &key,
        Some("s-2"),
        json!([user("My favourite colour is green, I think.")]),
    ));
    daemon.wait_indexed();

    let question = "What is my favourite colour?";
    let from_one = daemon.prepare(&key, Some("s-1"), question);
    assert_eq!(
        memory_ids(&from_one),
        vec![in_one.clone(), in_two.clone()],
        "{from_one}"
    );
    assert_eq!(from_one["memories"][0]["session_id"], "s-1");
    let from_two = daemon.prepare(&key, Some("s-2"), question);
    assert_eq!(memory_ids(&from_two), vec![in_two, in_one], "{from_two}");
    let without = daemon.prepare(&key, None, question);
    assert_eq!(memory_ids(&without).len(), 2);
}

#[test]
fn ingest_is_idempotent_and_keeps_only_what_should_be_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let key = daemon.mint_key("user:ingest");
    let exchange = json!([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "I moved to Porto in 2021.", "timestamp": "2023-04-05T10:00:00Z"},
        {"role": "assistant", "content": [{"type": "text", "text": "Porto is lovely in spring."}]},
        {"role": "user", "content": "Please forget this one.", "memory": false},
    ]);
    let first = daemon.ingest(&key, Some("s"), exchange.clone());
    assert_eq!(
        first["stored"], 2,
        "system and memory:false messages are not stored: {first}"
    );
    let retried = daemon.ingest(&key, Some("s"), exchange);
    assert_eq!(
        retried["stored"], 0,
        "a retried exchange is not stored twice"
    );
    assert_eq!(retried["ids"], first["ids"]);

    let moved = first["ids"][0].as_str().unwrap().to_owned();
    let answer = daemon.prepare_until_found(&key, None, "Which city did I move to?", &moved);
    let memory = answer["memories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == moved.as_str())
        .unwrap();
    assert_eq!(
        memory["created_at"], "2023-04-05T10:00:00Z",
        "back-filled timestamps are kept"
    );
    assert!(answer["context"].as_str().unwrap().contains("2023-04-05"));
    assert!(!answer.to_string().contains("helpful assistant"));
    let forgotten = daemon.prepare(&key, None, "Please forget this one.");
    assert!(
        !forgotten.to_string().contains("Please forget"),
        "{forgotten}"
    );
}

#[test]
fn every_error_has_its_status_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--max-body-bytes",
            "4096",
            "--max-messages",
            "3",
            "--passage-chars",
            "200",
            "--passage-overlap-chars",
            "20",
            "--max-passages-per-message",
            "2",
        ],
    );
    let key = daemon.mint_key("user:errors");
    let ok_body = json!({"messages": [user("hello there")]});
    let prepare =
        |key: Option<&str>, body: &Value| daemon.post_json("/v1/memory/prepare", key, None, body);
    let check = |response: common::Response, status: u16, code: &str| {
        assert_eq!(
            (response.status, response.error_code().as_str()),
            (status, code),
            "{}",
            response.text()
        );
        let message = response.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(!message.is_empty());
    };

    let json_headers = [
        ("Content-Type", "application/json"),
        ("X-Memory-Key", key.as_str()),
    ];
    check(
        daemon.request("POST", "/v1/memory/prepare", &json_headers, b"{nope"),
        400,
        "invalid_json",
    );
    check(
        prepare(Some(&key), &json!({"messages": "hi"})),
        400,
        "invalid_request",
    );
    check(
        prepare(
            Some(&key),
            &json!({"messages": [{"role": "robot", "content": "x"}]}),
        ),
        400,
        "invalid_request",
    );
    check(
        prepare(Some(&key), &json!({"messages": []})),
        400,
        "invalid_request",
    );
    check(
        prepare(Some(&key), &json!({"messages": [user("x")], "limit": 0})),
        400,
        "invalid_request",
    );
    check(
        prepare(
            Some(&key),
            &json!({"messages": [user("x")], "limit": 100000}),
        ),
        400,
        "invalid_request",
    );
    check(
        prepare(
            Some(&key),
            &json!({"messages": [user("x")], "context_tokens": -3}),
        ),
        400,
        "invalid_request",
    );
    check(
        prepare(
            Some(&key),
            &json!({"messages": [user("x")], "density": "huge"}),
        ),
        400,
        "invalid_request",
    );
    // A forwarded chat request's `max_tokens` is the model's, not ours: not refused.
    let forwarded = json!({"messages": [user("x")], "max_tokens": -3});
    assert_eq!(prepare(Some(&key), &forwarded).status, 200);
    let bad_session = [
        ("Content-Type", "application/json"),
        ("X-Memory-Key", key.as_str()),
        ("X-Session-ID", ""),
    ];
    check(
        daemon.request(
            "POST",
            "/v1/memory/ingest",
            &bad_session,
            ok_body.to_string().as_bytes(),
        ),
        400,
        "invalid_request",
    );
    check(
        daemon.post_json(
            "/v1/memory/ingest",
            Some(&key),
            None,
            &json!({"messages": [{"role": "user", "content": "x", "timestamp": "last week"}]}),
        ),
        400,
        "invalid_request",
    );

    check(prepare(None, &ok_body), 401, "missing_key");
    check(
        prepare(Some("mk_not-a-real-key"), &ok_body),
        401,
        "invalid_key",
    );
    let mut typo = key.clone().into_bytes();
    typo[30] = if typo[30] == b'A' { b'B' } else { b'A' };
    check(
        prepare(Some(std::str::from_utf8(&typo).unwrap()), &ok_body),
        401,
        "invalid_key",
    );
    let stranger = memory_sidecar::auth::NewKey::generate().full;
    check(prepare(Some(&stranger), &ok_body), 401, "unknown_key");
    check(
        daemon.post_json(
            "/v1/keys",
            Some("not-the-admin-key"),
            None,
            &json!({"name": "x"}),
        ),
        401,
        "invalid_admin_key",
    );

    check(
        daemon.post_json("/v1/keys", Some(&key), None, &json!({"name": "x"})),
        403,
        "admin_scope_required",
    );
    let bearer = format!("Bearer {key}");
    check(
        daemon.request(
            "GET",
            "/v1/audit",
            &[("Authorization", bearer.as_str())],
            b"",
        ),
        403,
        "admin_key_required",
    );
    check(
        prepare(Some(ADMIN_KEY), &ok_body),
        403,
        "memory_key_required",
    );

    check(
        daemon.request("GET", "/v1/nothing-here", &[], b""),
        404,
        "not_found",
    );
    let wrong_method = daemon.request("GET", "/v1/memory/prepare", &[], b"");
    assert_eq!(wrong_method.header("allow"), Some("POST"));
    check(wrong_method, 405, "method_not_allowed");

    let big = json!({"messages": [user(&"x".repeat(5000))]});
    check(prepare(Some(&key), &big), 413, "body_too_large");
    let many = json!({"messages": [user("a"), user("b"), user("c"), user("d")]});
    check(prepare(Some(&key), &many), 413, "too_many_messages");
    // Only a stored message has a length bound (its passages); prepare reads any.
    let long = json!({"messages": [user(&"long words here. ".repeat(40))]});
    assert_eq!(prepare(Some(&key), &long).status, 200);
    check(
        daemon.post_json("/v1/memory/ingest", Some(&key), None, &long),
        413,
        "message_too_long",
    );
    let system_prompt =
        json!({"messages": [{"role": "system", "content": "rules. ".repeat(400)}, user("hi")]});
    assert_eq!(
        daemon
            .post_json("/v1/memory/ingest", Some(&key), None, &system_prompt)
            .status,
        202,
        "a long message that is not stored is no reason to refuse"
    );

    let text_headers = [
        ("Content-Type", "text/plain"),
        ("X-Memory-Key", key.as_str()),
    ];
    check(
        daemon.request(
            "POST",
            "/v1/memory/prepare",
            &text_headers,
            ok_body.to_string().as_bytes(),
        ),
        415,
        "unsupported_media_type",
    );

    // The same bounds hold for ingest.
    check(
        daemon.post_json("/v1/memory/ingest", Some(&key), None, &many),
        413,
        "too_many_messages",
    );
    check(
        daemon.post_json("/v1/memory/ingest", None, None, &ok_body),
        401,
        "missing_key",
    );
}

#[test]
fn past_the_inflight_limit_requests_get_429() {
    let dir = tempfile::tempdir().unwrap();
    // No per-key rate limit: the loop below may send many requests before the slot is taken.
    let daemon = Daemon::start(
        dir.path(),
        &["--max-inflight", "1", "--key-rate-per-second", "0"],
    );
    let key = daemon.mint_key("user:busy");
    let body = json!({"messages": [user("what do I like?")]}).to_string();

    // A slow client holds the only slot: its headers are in, its body is not.
    let slow = start_slow_prepare(daemon.addr, &key, &body);
    // Wait until the daemon is working on it (the scrape counts itself too), so the loop
    // below cannot take the slot first and leave the slow request the one refused.
    let started = Instant::now();
    loop {
        let metrics = daemon.request("GET", "/metrics", &[], b"").text();
        if metric_value(&metrics, "memory_sidecar_http_requests_in_flight") >= Some(2.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the slow request never arrived"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let started = Instant::now();
    let rejected = loop {
        let response = daemon.post_json(
            "/v1/memory/prepare",
            Some(&key),
            None,
            &json!({"messages": [user("hi")]}),
        );
        if response.status == 429 {
            break response;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never saw 429");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(rejected.error_code(), "overloaded");
    assert_eq!(rejected.header("retry-after"), Some("1"));

    // The slow request still completes normally.
    let response = finish_slow_prepare(slow, &body);
    assert_eq!(response.status, 200, "{}", response.text());
}

#[test]
fn an_acknowledged_ingest_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let key = daemon.mint_key("user:crash");
    let mut ids = Vec::new();
    for i in 0..20 {
        let ingested = daemon.ingest(
            &key,
            None,
            json!([user(&format!(
                "Reminder number {i}: water the tomato plants."
            ))]),
        );
        ids.push(first_id(&ingested));
    }
    let last = daemon.ingest(
        &key,
        None,
        json!([user("My passport expires in June 2031.")]),
    );
    let passport = first_id(&last);
    // Killed straight after the 202: embedding may not have happened yet.
    daemon.kill9();

    let daemon = Daemon::start(dir.path(), &[]);
    let answer = daemon.prepare_until_found(&key, None, "When does my passport expire?", &passport);
    assert!(answer["context"].as_str().unwrap().contains("June 2031"));
    daemon.wait_indexed();
    let metrics = daemon.request("GET", "/metrics", &[], b"").text();
    assert_eq!(
        metric_value(&metrics, "memory_sidecar_memories"),
        Some(21.0)
    );
    let plants = daemon.post_json(
        "/v1/memory/prepare",
        Some(&key),
        None,
        &json!({"messages": [user("water the tomato plants reminder")], "limit": 50}),
    );
    let found = memory_ids(&plants.json());
    assert!(
        ids.iter().all(|id| found.contains(id)),
        "every acknowledged memory is back: {found:?}"
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), &[]);
    let key = daemon.mint_key("user:term");
    let kept = first_id(&daemon.ingest(
        &key,
        None,
        json!([user("I was born in Valparaíso, Chile.")]),
    ));

    let body = json!({"messages": [user("where was I born?")]}).to_string();
    let in_flight = start_slow_prepare(daemon.addr, &key, &body);
    // Make sure the daemon is working on that request (it and the scrape itself are in flight)
    // before the signal arrives.
    let started = Instant::now();
    while metric_value(
        &daemon.request("GET", "/metrics", &[], b"").text(),
        "memory_sidecar_http_requests_in_flight",
    ) < Some(2.0)
    {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    daemon.sigterm();
    daemon.wait_for_log("shutting down");
    let response = finish_slow_prepare(in_flight, &body);
    assert_eq!(
        (response.status, response.error_code().as_str()),
        (503, "shutting_down")
    );
    assert!(
        daemon.wait_exit().success(),
        "exit status 0 after SIGTERM:\n{}",
        daemon.stderr()
    );
    assert!(
        TcpStream::connect(daemon.addr).is_err(),
        "the listener is closed"
    );

    let daemon = Daemon::start(dir.path(), &[]);
    daemon.prepare_until_found(&key, None, "Where was I born?", &kept);
}

#[test]
fn metrics_parse_as_prometheus_text_and_move() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let key = daemon.mint_key("user:metrics");
    let scrape = || {
        let response = daemon.request("GET", "/metrics", &[], b"");
        assert_eq!(response.status, 200);
        assert!(response
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        response.text()
    };
    let before = scrape();
    check_exposition_format(&before);
    let prepared = r#"memory_sidecar_http_requests_total{route="prepare",status="2xx"}"#;
    assert_eq!(metric_value(&before, prepared), None);

    daemon.ingest(&key, None, json!([user("I play chess on Sundays.")]));
    daemon.prepare(&key, None, "What do I do on Sundays?");
    daemon.prepare(&key, None, "What do I do on Sundays?");
    daemon.wait_indexed();
    let after = scrape();
    check_exposition_format(&after);
    assert_eq!(metric_value(&after, prepared), Some(2.0));
    assert_eq!(
        metric_value(
            &after,
            r#"memory_sidecar_http_requests_total{route="ingest",status="2xx"}"#
        ),
        Some(1.0)
    );
    assert_eq!(metric_value(&after, "memory_sidecar_memories"), Some(1.0));
    assert_eq!(metric_value(&after, "memory_sidecar_vaults"), Some(1.0));
    assert_eq!(metric_value(&after, "memory_sidecar_ready"), Some(1.0));
    assert!(
        metric_value(&after, "memory_sidecar_embed_batch_duration_seconds_count").unwrap() >= 3.0
    );
    assert!(
        metric_value(&after, "memory_sidecar_store_commit_duration_seconds_count").unwrap() >= 2.0
    );
    assert!(!after.contains(&key[3..19]), "no key id in any label");
    assert!(!after.contains("vlt_"), "no vault in any label");
}

/// Every line is a comment (`# HELP` / `# TYPE name kind`) or `series value` where the series
/// is a metric name with an optional `{label="value",...}` set and the value a float.
fn check_exposition_format(text: &str) {
    let mut typed = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "{line}"
        );
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        assert!(
            name.starts_with("memory_sidecar_") || name.starts_with("process_"),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| typed.contains(*base))
            })
            .unwrap_or(name);
        assert!(
            typed.contains(family),
            "sample before its TYPE line: {line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (label, quoted) = pair.split_once('=').expect("label=value");
                    assert!(
                        label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line}"
                    );
                    assert!(quoted.starts_with('"') && quoted.ends_with('"'), "{line}");
                }
            }
        }
    }
    assert!(!typed.is_empty());
}

#[test]
fn health_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let health = daemon.request("GET", "/healthz", &[], b"");
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "ok"}))
    );
    let ready = daemon.request("GET", "/readyz", &[], b"");
    assert_eq!(
        (ready.status, ready.json()),
        (200, json!({"status": "ready"}))
    );
}

#[test]
fn a_missing_model_file_stops_start_up_and_names_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let empty_models = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_memory-sidecar"))
        .env("MEMORY_SIDECAR_ADMIN_KEY", ADMIN_KEY)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--models-dir")
        .arg(empty_models.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("libonnxruntime.so.1.31.1"), "{stderr}");
    assert!(stderr.contains("make models"), "{stderr}");
}

/// Vectors are only comparable within one model: a store made with another model file is
/// refused until `--reembed`, which embeds every memory again before the daemon is ready.
/// The second "model" here is the same model with a tokenizer.json rewritten byte for byte
/// differently (same vocabulary), so its fingerprint differs and its answers do not.
#[test]
fn a_store_from_another_model_is_refused_until_it_is_embedded_again() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[]);
    let key = daemon.mint_key("model");
    let facts = [
        "My sister Ingrid lives in Trondheim and teaches chemistry.",
        "I keep my bicycle in the shed behind the bakery.",
        "Our wedding anniversary is on the ninth of April.",
    ];
    for fact in facts {
        daemon.ingest(&key, None, json!([user(fact)]));
    }
    daemon.wait_indexed();
    stop(daemon);

    let other = tempfile::tempdir().unwrap();
    let models = common::models_dir();
    for file in ["libonnxruntime.so.1.31.1", "model.onnx"] {
        std::os::unix::fs::symlink(models.join(file), other.path().join(file)).unwrap();
    }
    let tokenizer: Value =
        serde_json::from_slice(&std::fs::read(models.join("tokenizer.json")).unwrap()).unwrap();
    std::fs::write(
        other.path().join("tokenizer.json"),
        serde_json::to_vec_pretty(&tokenizer).unwrap(),
    )
    .unwrap();
    let other_models = other.path().to_str().unwrap();

    let refused = Daemon::try_spawn(data.path(), &["--models-dir", other_models])
        .err()
        .expect("a store from another model must be refused");
    assert!(
        refused.contains("another embedding model") && refused.contains("--reembed"),
        "{refused}"
    );

    let daemon = Daemon::start(data.path(), &["--models-dir", other_models, "--reembed"]);
    assert!(
        daemon.stderr().contains("embedding every memory again"),
        "{}",
        daemon.stderr()
    );
    let metrics = daemon.request("GET", "/metrics", &[], b"").text();
    assert_eq!(
        metric_value(&metrics, "memory_sidecar_embed_pending_memories"),
        Some(0.0),
        "ready only once every memory is embedded again"
    );
    let answer = daemon.prepare(&key, None, "Where is my bicycle kept?");
    let context = answer["context"].as_str().unwrap_or_default();
    assert!(context.contains("shed behind the bakery"), "{answer}");
    stop(daemon);

    // Recorded: the next start with the new model needs no flag, and the old one is refused.
    stop(Daemon::start(data.path(), &["--models-dir", other_models]));
    let refused = Daemon::try_spawn(data.path(), &[]).err().expect("refused");
    assert!(refused.contains("another embedding model"), "{refused}");
}

/// `--admin-listen` moves the operator's routes off the gateway's port: keys, vaults, audit and
/// metrics answer there and 404 on `--listen`, which keeps prepare, ingest and the memory
/// routes; health answers on both.
#[test]
fn the_admin_listener_carries_the_operators_routes_and_the_gateway_port_the_rest() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_addr = free.local_addr().unwrap();
    drop(free);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--admin-listen", &admin_addr.to_string()]);
    let admin = common::Client { addr: admin_addr };

    let mint = json!({"name": "split"});
    let refused = daemon.post_json("/v1/keys", Some(ADMIN_KEY), None, &mint);
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (404, "not_found")
    );
    assert_eq!(daemon.request("GET", "/metrics", &[], b"").status, 404);
    assert_eq!(daemon.request("GET", "/v1/audit", &[], b"").status, 404);
    let key = admin.mint_key("split");
    assert_eq!(admin.request("GET", "/metrics", &[], b"").status, 200);

    let stored = daemon.ingest(&key, None, json!([user("My locker number is 4127.")]));
    let id = stored["ids"][0].as_str().unwrap().to_owned();
    let body = json!({"messages": [user("What is my locker number?")]});
    let on_admin = admin.post_json("/v1/memory/prepare", Some(&key), None, &body);
    assert_eq!(on_admin.status, 404, "prepare is the gateway's");
    for client in [&*daemon, &admin] {
        for path in ["/healthz", "/readyz", "/health", "/openapi.json"] {
            assert_eq!(client.request("GET", path, &[], b"").status, 200, "{path}");
        }
    }
    let found = daemon.prepare_until_found(&key, None, "What is my locker number?", &id);
    assert!(found.to_string().contains("4127"), "{found}");
}

/// A clean stop: SIGTERM, and the exit waited for (the store closed, everything committed).
fn stop(mut daemon: Daemon) {
    daemon.sigterm();
    assert!(daemon.wait_exit().success());
}

#[test]
fn invalid_configuration_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_memory-sidecar"))
        .args(["--max-limit", "5", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--max-limit"));
}

#[test]
fn a_generated_admin_key_is_kept_private_on_disk() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_memory-sidecar"));
    command.env_remove("MEMORY_SIDECAR_ADMIN_KEY");
    // The key file is written before the model loads, so an empty models dir still shows it.
    let empty_models = tempfile::tempdir().unwrap();
    let output = command
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--models-dir")
        .arg(empty_models.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let key_file = dir.path().join("admin.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert!(key.len() >= 32);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("admin.key") && !stderr.contains(key.trim()),
        "{stderr}"
    );
}

#[test]
fn the_key_is_read_from_each_documented_header() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let key = daemon.mint_key("user:headers");
    let body = json!({"messages": [user("I keep bees on my allotment.")]}).to_string();
    let via_api_key = [
        ("Content-Type", "application/json"),
        ("x-api-key", key.as_str()),
    ];
    let ingested = daemon.request("POST", "/v1/memory/ingest", &via_api_key, body.as_bytes());
    assert_eq!(ingested.status, 202, "{}", ingested.text());
    let id = first_id(&ingested.json());
    daemon.prepare_until_found(&key, None, "What animals do I keep?", &id);

    let question = json!({"messages": [user("What animals do I keep?")]}).to_string();
    let bearer = format!("Bearer {key}");
    // A gateway may keep its provider key in Authorization and send the memory key beside it.
    let header_sets: [Vec<(&str, &str)>; 3] = [
        vec![("X-Memory-Key", key.as_str())],
        vec![("Authorization", bearer.as_str())],
        vec![
            ("X-Memory-Key", key.as_str()),
            ("Authorization", "Bearer sk-provider-key-for-the-model"),
        ],
    ];
    for mut headers in header_sets {
        headers.push(("Content-Type", "application/json"));
        let response = daemon.request("POST", "/v1/memory/prepare", &headers, question.as_bytes());
        assert_eq!(response.status, 200, "{headers:?}: {}", response.text());
        assert_eq!(
            memory_ids(&response.json()),
            vec![id.clone()],
            "{headers:?}"
        );
    }
    let basic = [
        ("Content-Type", "application/json"),
        ("Authorization", "Basic dXNlcjpwYXNz"),
    ];
    let response = daemon.request("POST", "/v1/memory/prepare", &basic, question.as_bytes());
    assert_eq!(
        (response.status, response.error_code().as_str()),
        (401, "invalid_key")
    );
}

#[test]
fn slow_or_silent_clients_are_disconnected_by_the_header_timeout() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--header-timeout-ms", "300"]);
    let mut slow_head = TcpStream::connect(daemon.addr).unwrap();
    slow_head
        .write_all(b"POST /v1/memory/prepare HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut silent = TcpStream::connect(daemon.addr).unwrap();
    for stream in [&mut slow_head, &mut silent] {
        // Generous read limit: the daemon must hang up long before it, not the test give up.
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer);
        assert!(
            read.is_ok(),
            "the daemon did not close the connection: {read:?}"
        );
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    // Other clients are served as usual.
    assert_eq!(daemon.request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn two_model_workers_serve_concurrent_clients_each_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--embed-threads",
            "2",
            "--embed-workers",
            "2",
            "--embed-spin",
            "true",
            "--key-rate-per-second",
            "0",
        ],
    );
    let keys: Vec<String> = (0..4)
        .map(|i| daemon.mint_key(&format!("user:{i}")))
        .collect();
    std::thread::scope(|scope| {
        for (i, key) in keys.iter().enumerate() {
            let daemon = &daemon;
            scope.spawn(move || {
                for n in 0..10 {
                    let text = format!("User {i} keeps locker number {} at the pool.", i * 100 + n);
                    daemon.ingest(key, None, json!([user(&text)]));
                }
            });
        }
    });
    daemon.wait_indexed();
    // Concurrent queries are batched across the two workers; each gets its own vector back.
    std::thread::scope(|scope| {
        for (i, key) in keys.iter().enumerate() {
            let daemon = &daemon;
            scope.spawn(move || {
                for n in [0, 5, 9] {
                    let number = (i * 100 + n).to_string();
                    let question = format!("Which user keeps locker number {number}?");
                    let answer = daemon.prepare(key, None, &question);
                    let context = answer["context"].as_str().unwrap_or("");
                    assert!(context.contains(&number), "user {i}: {answer}");
                    assert!(
                        !context.contains(&format!("User {} ", (i + 1) % 4)),
                        "{answer}"
                    );
                }
            });
        }
    });
}

#[test]
fn a_burst_of_mixed_lengths_is_indexed_each_memory_with_its_own_vector() {
    // The indexer sorts what is pending by length and runs it in jobs across vaults; every
    // memory must still get its own vector. Dense ranking only, so that a memory's exact text
    // finds that memory through its vector, not through its words.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &["--dense-weight", "1", "--key-rate-per-second", "0"],
    );
    const ANIMALS: &[&str] = &["otter", "heron", "badger", "lynx", "gecko", "walrus"];
    const CITIES: &[&str] = &["Lisbon", "Oslo", "Quito", "Hanoi", "Perth", "Tunis", "Riga"];
    const FILLER: &str = " It came up again when we talked about the weekend, the weather and \
        what everyone had planned for the holidays";
    let keys: Vec<String> = (0..3)
        .map(|v| daemon.mint_key(&format!("user:{v}")))
        .collect();
    let stored: Vec<(String, String, String)> = std::thread::scope(|scope| {
        let workers: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(v, key)| {
                let daemon = &daemon;
                scope.spawn(move || {
                    let mut stored = Vec::new();
                    for call in 0..30 {
                        let texts: Vec<String> = (0..2)
                            .map(|m| {
                                let n = v * 1000 + call * 2 + m;
                                let mut text = format!(
                                    "Note {n}: my {} named {} lives in {}.",
                                    ANIMALS[n % ANIMALS.len()],
                                    ["Ada", "Bo", "Cy", "Di", "Ed"][n % 5],
                                    CITIES[n % CITIES.len()]
                                );
                                for _ in 0..n % 4 {
                                    text.push_str(FILLER);
                                }
                                text
                            })
                            .collect();
                        let messages: Vec<Value> = texts.iter().map(|t| user(t)).collect();
                        let ingested = daemon.ingest(key, None, json!(messages));
                        for (i, text) in texts.into_iter().enumerate() {
                            let id = ingested["ids"][i].as_str().unwrap().to_owned();
                            stored.push((key.clone(), id, text));
                        }
                    }
                    stored
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(stored.len(), 180);
    daemon.wait_indexed();
    for (key, id, text) in &stored {
        let answer = daemon.prepare(key, None, text);
        assert_eq!(
            answer["memories"][0]["id"].as_str(),
            Some(id.as_str()),
            "{text}: {answer}"
        );
    }
}

#[test]
fn a_ranked_memory_that_cannot_be_read_is_left_out_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), &[]);
    let key = daemon.mint_key("user:1");
    let damaged = first_id(&daemon.ingest(
        &key,
        None,
        json!([user("My dog Rex loves running on the beach.")]),
    ));
    let intact = first_id(&daemon.ingest(
        &key,
        None,
        json!([user("My dog Rex is afraid of thunderstorms.")]),
    ));
    daemon.wait_indexed();
    daemon.sigterm();
    assert!(daemon.wait_exit().success());

    // Damage one memory's sealed record in place; its vector stays, so search still ranks it.
    let id = u64::from_str_radix(damaged.strip_prefix("mem_").unwrap(), 16).unwrap();
    {
        let db = sled::open(dir.path().join("store")).unwrap();
        let memories = db.open_tree("memories").unwrap();
        let row = memories
            .iter()
            .keys()
            .map(Result::unwrap)
            .find(|k| k.ends_with(&id.to_be_bytes()))
            .expect("the memory's row");
        memories
            .insert(row, b"not a sealed record".as_slice())
            .unwrap();
        db.flush().unwrap();
    }

    let daemon = Daemon::start(dir.path(), &[]);
    let answer = daemon.prepare(&key, None, "Tell me about my dog Rex.");
    let ids = memory_ids(&answer);
    assert!(ids.contains(&intact), "{answer}");
    assert!(!ids.contains(&damaged), "{answer}");
    let metrics = daemon.request("GET", "/metrics", &[], b"").text();
    assert_eq!(
        metric_value(&metrics, "memory_sidecar_unreadable_hits_total"),
        Some(1.0)
    );
}

#[test]
fn a_closed_stdout_is_said_in_the_log_and_the_daemon_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with_closed_stdout(dir.path(), &[]);
    let key = daemon.mint_key("user:stdout");
    let stored = daemon.ingest(&key, None, json!([user("I collect stamps from Iceland.")]));
    assert_eq!(stored["stored"], 1);
    assert!(
        daemon
            .stderr()
            .contains("could not write the listening address to stdout"),
        "{}",
        daemon.stderr()
    );
}

/// One HTTP/1.1 request over a unix socket; the status and the body.
fn unix_request(path: &Path, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connecting");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// `--listen` and `--admin-listen` take several listeners, hostnames and `unix:` sockets (made
/// with the configured mode, a stale one replaced, removed at shutdown); the command line
/// reaches the admin API over its socket.
#[test]
fn the_daemon_listens_on_unix_sockets_hostnames_and_several_addresses() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sockets = dir.path().join("run");
    std::fs::create_dir_all(&sockets).unwrap();
    let gateway = sockets.join("gateway.sock");
    let admin = sockets.join("admin.sock");
    // A stale socket from a killed run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&admin).unwrap());
    let listen = format!("127.0.0.1:0,unix:{},localhost:0", gateway.display());
    let admin_listen = format!("unix:{}", admin.display());
    let mut daemon = Daemon::start(
        &dir.path().join("data"),
        &[
            "--listen",
            &listen,
            "--admin-listen",
            &admin_listen,
            "--unix-socket-mode",
            "600",
        ],
    );
    for socket in [&gateway, &admin] {
        let mode = std::fs::metadata(socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", socket.display());
    }
    let (status, _) = unix_request(
        &gateway,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    // The gateway's socket does not serve the operator's routes; the admin socket does.
    let keys = format!(
        "GET /v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(unix_request(&gateway, &keys).0, 404);
    let mint = format!(
        "POST /v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let (status, body) = unix_request(&admin, &mint);
    assert_eq!(status, 201, "{body}");
    let key: Value = serde_json::from_str(&body).unwrap();
    let key = key["key"].as_str().unwrap();
    // Memory routes over the gateway's socket and its TCP address alike.
    daemon.ingest(
        key,
        None,
        json!([{"role": "user", "content": "I sail a dinghy"}]),
    );
    let log = daemon.stderr();
    let hostname_bound = log.matches("listening").count();
    assert!(
        hostname_bound >= 4,
        "127.0.0.1, the socket, localhost and the admin socket:\n{log}"
    );
    // The command line reaches the admin API over the socket.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_memory-sidecar"))
        .env("MEMORY_SIDECAR_ADMIN_KEY", ADMIN_KEY)
        .env("MEMORY_SIDECAR_MASTER_KEY", common::MASTER_KEY)
        .args(["vaults", "list", "--json", "--admin-url", &admin_listen])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let vaults: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(vaults[0]["memories"], 1, "{vaults}");
    daemon.sigterm();
    assert!(daemon.wait_exit().success());
    assert!(
        !gateway.exists() && !admin.exists(),
        "socket files are removed at shutdown"
    );
}
