//! What an operator sees: the access log (route, status, time, key id, vault, peer, request id,
//! trace id; never a secret or a memory's text), `X-Request-ID` echoed or made, the process
//! and build metrics, and the shipped dashboard and alert rules, which must name only metrics
//! the daemon exports and pass `promtool check rules`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::{Daemon, ADMIN_KEY};
use serde_json::json;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_access_log_says_who_asked_what_and_never_a_secret_or_a_text() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--access-log"]);
    let key = daemon.mint_key("observed");
    let text = "my passport number is X1234567";
    daemon.ingest(&key, None, json!([{"role": "user", "content": text}]));
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let auth = format!("Bearer {key}");
    let body = json!({"messages": [{"role": "user", "content": "what is my passport number?"}]});
    let answered = daemon.request(
        "POST",
        "/v1/memory/prepare",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
            ("X-Request-ID", "gw-req-42"),
            ("traceparent", traceparent.as_str()),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(answered.status, 200, "{}", answered.text());
    assert_eq!(answered.header("x-request-id"), Some("gw-req-42"));
    // One not worth echoing (too long, other characters) is replaced by a new one.
    let long = "x".repeat(300);
    let made = daemon.request("GET", "/readyz", &[("X-Request-ID", long.as_str())], b"");
    let made = made.header("x-request-id").unwrap().to_owned();
    assert_eq!(made.len(), 16, "{made}");
    assert!(made.chars().all(|c| c.is_ascii_hexdigit()));

    let id = &key[3..19];
    let log = daemon.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("request_id=gw-req-42"))
        .unwrap_or_else(|| panic!("no access line:\n{log}"));
    for field in [
        "route=\"prepare\"".to_owned(),
        "status=200".to_owned(),
        format!("key_id=\"{id}\""),
        "vault=\"vlt_".to_owned(),
        "peer=127.0.0.1".to_owned(),
        format!("trace_id=\"{trace}\""),
        "method=POST".to_owned(),
        "ms=".to_owned(),
    ] {
        assert!(line.contains(&field), "{field} missing from {line}");
    }
    assert!(log.contains("route=\"keys\"") && log.contains("key_id=\"admin\""));
    assert!(!log.contains(&key[19..]), "a key's secret is in the log");
    assert!(!log.contains(ADMIN_KEY), "the admin key is in the log");
    assert!(!log.contains("X1234567"), "a memory's text is in the log");
}

/// The metric names a dashboard expression or an alert rule uses (`memory_sidecar_*` and
/// `process_*`).
fn named_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["memory_sidecar_", "process_"] {
        for (at, _) in text.match_indices(prefix) {
            if text[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `memory_sidecar_*` in a comment is no name.
            if !name.ends_with('_') {
                names.insert(name);
            }
        }
    }
    names
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_name_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    // Traffic, so that every labelled family has a series.
    let key = daemon.mint_key("dashboard");
    daemon.ingest(
        &key,
        None,
        json!([{"role": "user", "content": "I grow tomatoes"}]),
    );
    daemon.prepare(&key, None, "what do I grow?");
    daemon.wait_indexed();
    let _ = daemon.call("POST", "/v1/memory/prepare", "mk_nonsense", None, None);
    let exported = daemon.request("GET", "/metrics", &[], b"").text();
    let series: BTreeSet<String> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    for line in exported
        .lines()
        .filter(|l| l.starts_with("memory_sidecar_build_info"))
    {
        assert!(
            line.contains("version=\"") && line.contains("model=\""),
            "{line}"
        );
    }

    let dashboard = std::fs::read_to_string(root().join("deploy/grafana/memory-sidecar.json"))
        .expect("the dashboard");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml"))
        .expect("the alert rules");
    let mut missing = Vec::new();
    let mut used = 0;
    for name in named_metrics(&dashboard)
        .into_iter()
        .chain(named_metrics(&rules))
    {
        used += 1;
        if !series.contains(&name) {
            missing.push(name);
        }
    }
    assert!(used > 20, "the files name {used} metrics");
    assert!(
        missing.is_empty(),
        "named by the dashboard or the alerts, not in /metrics: {missing:?}"
    );

    match Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(root().join("deploy/prometheus/alerts.yml"))
        .output()
    {
        Ok(output) => assert!(
            output.status.success(),
            "promtool check rules:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(_) => common::skip("promtool is not installed (Debian: prometheus)"),
    }
}
