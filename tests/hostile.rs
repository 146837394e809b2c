//! Hostile and broken input, through the front door: random bytes in every field of every
//! route give a well-formed answer with a stable error code, never a 500 or a dropped
//! connection, and the daemon keeps serving. Seeded: `HOSTILE_SEED=9 HOSTILE_CASES=5000 cargo
//! test --release --test hostile`.

mod common;

use common::corpus::proc_status_mb;
use common::{metric_value, Daemon, ADMIN_KEY};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Every code the daemon may answer with (docs/api.md, "Error codes").
const CODES: &[&str] = &[
    "invalid_json",
    "invalid_request",
    "missing_key",
    "invalid_key",
    "unknown_key",
    "key_revoked",
    "key_rotated",
    "key_expired",
    "invalid_admin_key",
    "read_scope_required",
    "write_scope_required",
    "delete_scope_required",
    "admin_scope_required",
    "admin_key_required",
    "memory_key_required",
    "not_found",
    "key_not_found",
    "memory_not_found",
    "vault_not_found",
    "method_not_allowed",
    "key_inactive",
    "too_many_keys",
    "vault_id_required",
    "vault_full",
    "body_too_large",
    "too_many_messages",
    "message_too_long",
    "too_many_lines",
    "unsupported_media_type",
    "overloaded",
    "rate_limited",
    "auth_rate_limited",
];

const PATHS: &[&str] = &[
    "/v1/memory/prepare",
    "/v1/memory/ingest",
    "/v1/memory/search",
    "/v1/memory/upload",
    "/v1/memory/stats",
    "/v1/memory/warmup",
    "/v1/memory",
    "/v1/memory/mem_0000000000000001",
    "/v1/keys",
    "/v1/keys/0123456789abcdef",
    "/v1/keys/0123456789abcdef/rotate",
    "/v1/vaults/vlt_00000000000000000000000000000000",
    "/v1/audit",
    "/mcp",
];

/// Valid bodies to mutate, so that cases reach past the JSON parser into every field.
fn seeds() -> Vec<Value> {
    vec![
        json!({"messages": [{"role": "user", "content": "hello", "timestamp": "2024-01-01T00:00:00Z", "tags": ["a"]}], "limit": 5, "context_tokens": 100, "max_tokens": 100, "tags": ["a"]}),
        json!({"messages": [{"role": "user", "content": "hello"}], "context_limit": 0, "density": "high", "session_id": "s", "session_isolation": true}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_memories", "arguments": {"query": "hello", "limit": 3}}}),
        json!({"query": "hello", "limit": 3, "cursor": "mem_0000000000000001", "session_id": "s", "tags": ["a"], "since": 0, "until": "2030-01-01T00:00:00Z"}),
        json!({"name": "k", "scopes": ["read"], "expires_days": 3, "vault_id": "vlt_00000000000000000000000000000000"}),
        json!({"grace_days": 2}),
    ]
}

/// A random JSON value, sometimes deep, sometimes huge.
fn random_value(rng: &mut StdRng, depth: usize) -> Value {
    match rng.random_range(0..if depth > 3 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<f64>() * 1e300),
        4 => Value::String(random_text(rng, 40)),
        5 => Value::String("x".repeat(rng.random_range(0..30_000))),
        6 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut map = serde_json::Map::new();
            for _ in 0..rng.random_range(0..4) {
                map.insert(random_text(rng, 8), random_value(rng, depth + 1));
            }
            Value::Object(map)
        }
    }
}

fn random_text(rng: &mut StdRng, max: usize) -> String {
    (0..rng.random_range(0..max))
        .map(|_| match rng.random_range(0..4) {
            0 => char::from(rng.random_range(0u8..128)),
            1 => char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('\u{fffd}'),
            _ => char::from(rng.random_range(b'a'..=b'z')),
        })
        .collect()
}

/// Replaces one field somewhere in `value` by a random value.
fn mutate(rng: &mut StdRng, value: &mut Value) {
    match value {
        Value::Object(map) if !map.is_empty() && rng.random_bool(0.8) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.random_range(0..keys.len())];
            mutate(rng, map.get_mut(key).unwrap());
        }
        Value::Array(list) if !list.is_empty() && rng.random_bool(0.8) => {
            let at = rng.random_range(0..list.len());
            mutate(rng, &mut list[at]);
        }
        _ => *value = random_value(rng, 0),
    }
}

fn random_body(rng: &mut StdRng, seeds: &[Value]) -> Vec<u8> {
    match rng.random_range(0..10) {
        0 => (0..rng.random_range(0..200))
            .map(|_| rng.random())
            .collect(),
        1 => format!(
            "{}{}",
            "[".repeat(rng.random_range(1..5000)),
            "]".repeat(rng.random_range(0..10))
        )
        .into_bytes(),
        2 => Vec::new(),
        3 => {
            // JSON Lines, some of them broken.
            (0..rng.random_range(1..50))
                .map(|_| {
                    if rng.random_bool(0.3) {
                        random_text(rng, 30)
                    } else {
                        json!({"content": random_text(rng, 60)}).to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes()
        }
        _ => {
            let mut value = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..4) {
                mutate(rng, &mut value);
            }
            value.to_string().into_bytes()
        }
    }
}

/// A header value: valid, random printable text, or a near-miss of a real key.
fn random_header(rng: &mut StdRng, key: &str) -> String {
    match rng.random_range(0..6) {
        0 => key.to_owned(),
        1 => format!(
            "{key}:{}",
            random_text(rng, 6).replace(|c: char| c.is_control(), "")
        ),
        2 => {
            let mut chars: Vec<char> = key.chars().collect();
            let at = rng.random_range(0..chars.len());
            chars[at] = char::from(rng.random_range(b'0'..=b'z'));
            chars.into_iter().collect()
        }
        3 => "mk_".to_owned() + &"a".repeat(rng.random_range(0..300)),
        _ => (0..rng.random_range(0..80))
            .map(|_| char::from(rng.random_range(0x20u8..0x7f)))
            .collect(),
    }
}

#[test]
fn random_input_everywhere_gets_a_stable_error_and_never_a_500() {
    let seed: u64 = common::env_or("HOSTILE_SEED", 20261123);
    let cases: usize = common::env_or("HOSTILE_CASES", 400);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--key-rate-per-second",
            "0",
            "--auth-failures-per-second",
            "0",
            "--max-body-bytes",
            "65536",
        ],
    );
    let key = daemon.mint_key("user:hostile");
    let seeds = seeds();
    let methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD"];
    let types = [
        "application/json",
        "application/x-ndjson",
        "text/plain",
        "application/json; charset=utf-8",
        "",
    ];
    let mut warm_rss_mb = 0.0;
    for case in 0..cases {
        if case == cases.min(50) - 1 {
            warm_rss_mb = proc_status_mb(daemon.pid(), "VmRSS:");
        }
        let path = PATHS[rng.random_range(0..PATHS.len())];
        let method = methods[rng.random_range(0..methods.len())];
        // Half the cases carry a working key, so they reach the body parsers and the domain.
        let credential = if rng.random_bool(0.5) {
            key.clone()
        } else if rng.random_bool(0.3) {
            ADMIN_KEY.to_owned()
        } else {
            random_header(&mut rng, &key)
        };
        let session = random_header(&mut rng, "session-1");
        let media = types[rng.random_range(0..types.len())];
        let header_name = ["Authorization", "X-Memory-Key", "x-api-key"][rng.random_range(0..3)];
        let credential = if header_name == "Authorization" && rng.random_bool(0.8) {
            format!("Bearer {credential}")
        } else {
            credential
        };
        let mut headers = vec![(header_name, credential.as_str())];
        if rng.random_bool(0.5) {
            headers.push(("X-Session-ID", session.as_str()));
        }
        if !media.is_empty() {
            headers.push(("Content-Type", media));
        }
        // Query strings of characters a URI may hold (a request line that is not HTTP at all is
        // refused by hyper's parser with a bare 400, before any route: not what this tests).
        let query = if rng.random_bool(0.2) {
            const URI: &[u8] = b"abcxyz0129=&_-.~%+";
            let text: String = (0..rng.random_range(0..20))
                .map(|_| char::from(URI[rng.random_range(0..URI.len())]))
                .collect();
            format!("?{text}")
        } else {
            String::new()
        };
        let target = format!("{path}{query}");
        let body = random_body(&mut rng, &seeds);
        let what = format!(
            "case {case} (seed {seed}): {method} {target} with {} body bytes",
            body.len()
        );
        let response = common::try_request(daemon.addr, method, &target, &headers, &body)
            .unwrap_or_else(|e| panic!("{what}: the connection failed: {e}"));
        assert!(
            response.status < 500 || response.status == 503,
            "{what}: {} {}",
            response.status,
            response.text()
        );
        if response.status >= 400 && method != "HEAD" {
            assert!(
                !response.body.is_empty(),
                "{what}: {} with no body",
                response.status
            );
            let code = response.error_code();
            assert!(
                CODES.contains(&code.as_str()) || response.status == 503,
                "{what}: code {code:?} in {}",
                response.text()
            );
            assert!(
                response.json()["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{what}"
            );
        }
    }
    // Memory stays bounded: whatever the input, nothing it leaves behind grows without limit.
    // (The bound is loose; a leak of each request's body, up to 64 KiB, would cross it.)
    let rss_mb = proc_status_mb(daemon.pid(), "VmRSS:");
    assert!(warm_rss_mb > 0.0, "could not read the daemon's RSS");
    assert!(
        rss_mb - warm_rss_mb < 96.0 + cases as f64 * 0.016,
        "RSS grew from {warm_rss_mb:.0} MiB to {rss_mb:.0} MiB over {cases} cases"
    );
    eprintln!("RSS {warm_rss_mb:.0} MiB after 50 cases, {rss_mb:.0} MiB after {cases}");
    // Still healthy, and still serving its user.
    assert_eq!(daemon.request("GET", "/readyz", &[], b"").status, 200);
    let answer = daemon.ingest(
        &key,
        None,
        json!([{"role": "user", "content": "still here"}]),
    );
    assert_eq!(answer["stored"], 1);
    assert!(!daemon.stderr().contains("panicked"), "{}", daemon.stderr());
}

#[test]
fn slow_bodies_and_idle_floods_are_cut_off_by_their_limits() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--max-connections",
            "8",
            "--header-timeout-ms",
            "400",
            "--request-timeout-ms",
            "1000",
        ],
    );
    let key = daemon.mint_key("user:slow");

    // A body that stops arriving is answered when the request time runs out.
    let mut slow = TcpStream::connect(daemon.addr).unwrap();
    let head = format!(
        "POST /v1/memory/ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"messages\""
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let response = common::read_response(&mut slow).expect("an answer, not a hang");
    assert_eq!(
        (response.status, response.error_code().as_str()),
        (503, "timeout"),
        "{}",
        response.text()
    );

    // Forty silent connections against a limit of eight: each is cut at the header timeout, and
    // a real client queued behind them is served once they are.
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(daemon.addr).unwrap())
        .collect();
    let answer = daemon.request("GET", "/healthz", &[], b"");
    assert_eq!(answer.status, 200);
    for mut stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut rest = Vec::new();
        assert!(
            stream.read_to_end(&mut rest).is_ok(),
            "an idle connection was never closed"
        );
    }
    assert_eq!(daemon.request("GET", "/readyz", &[], b"").status, 200);
}

#[test]
fn failed_authentications_reveal_nothing_are_throttled_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--auth-failure-burst",
            "10",
            "--auth-failures-per-second",
            "0.2",
            "--log",
            "debug",
            "--access-log",
        ],
    );
    let minted = daemon.post_json("/v1/keys", Some(ADMIN_KEY), None, &json!({"name": "real"}));
    assert_eq!(minted.status, 201, "{}", minted.text());
    let key = minted.json()["key"].as_str().unwrap().to_owned();
    let id = minted.json()["key_info"]["id"].as_str().unwrap().to_owned();
    let body = json!({"messages": [{"role": "user", "content": "what do I like?"}]});
    let prepare =
        |credential: &str| daemon.call("POST", "/v1/memory/prepare", credential, None, Some(&body));

    // A well-formed key with a real id and a wrong secret answers exactly like an id never
    // minted: same status, code and message.
    let secret = "Z".repeat(32);
    let forged = memory_sidecar::auth::compose_key(&id, &secret);
    let stranger = memory_sidecar::auth::compose_key("0123456789abcdef", &secret);
    let (a, b) = (prepare(&forged), prepare(&stranger));
    assert_eq!((a.status, a.error_code()), (401, "unknown_key".to_owned()));
    assert_eq!((a.status, a.text()), (b.status, b.text()));

    // Eight malformed keys spend the rest of the burst of ten; past it, failures from this
    // address are answered 429 with the time to wait, but a good key still gets through.
    let mut presented = vec![forged, stranger];
    for n in 0..8 {
        let mut typo = key.clone().into_bytes();
        typo[20 + n] = if typo[20 + n] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();
        let response = prepare(&typo);
        assert_eq!(response.error_code(), "invalid_key", "{}", response.text());
        presented.push(typo);
    }
    let refused = prepare(&presented[0]);
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.error_code(), "auth_rate_limited");
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=5).contains(&wait), "Retry-After {wait}");
    assert_eq!(prepare(&presented[5]).error_code(), "auth_rate_limited");
    assert_eq!(prepare(&key).status, 200, "a good key is never refused");
    let metrics = daemon.request("GET", "/metrics", &[], b"").text();
    let failures = |code: &str| {
        metric_value(
            &metrics,
            &format!("memory_sidecar_auth_failures_total{{code=\"{code}\"}}"),
        )
    };
    assert_eq!(failures("unknown_key"), Some(3.0));
    assert_eq!(failures("invalid_key"), Some(9.0));

    // Nothing presented, right or wrong, reached the log, even at debug level.
    let log = daemon.stderr();
    assert!(log.contains("DEBUG"), "the daemon logged at debug level");
    assert!(
        log.lines()
            .any(|l| l.contains("access") && l.contains("status=401") && l.contains("unknown_key")),
        "the access log has the refusals:\n{log}"
    );
    for credential in presented.iter().chain([&key]) {
        assert!(
            !log.contains(&credential[3..]),
            "a presented key is in the log"
        );
    }
    assert!(!log.contains(&secret));
}
