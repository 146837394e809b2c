//! The OpenAPI 3.1 document (`docs/openapi.json`, served at `GET /openapi.json`) against the
//! router: every route, method and status the router can answer is in it, and nothing else;
//! it validates; and a bounded property-based run of schemathesis finds every real answer in it.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{Daemon, ADMIN_KEY};
use memory_sidecar::http::Route;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn document() -> Value {
    let text = std::fs::read_to_string(root().join("docs/openapi.json")).unwrap();
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

#[test]
fn the_document_lists_every_route_method_and_status_and_nothing_else() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().expect("paths");
    let mut expected: BTreeSet<(String, String)> = BTreeSet::new();
    let mut wrong = Vec::new();
    for route in Route::ALL {
        let path = route.template().expect("a routed path");
        for method in route.allowed().split(", ") {
            expected.insert((path.to_owned(), method.to_lowercase()));
            let operation = &doc["paths"][path][method.to_lowercase()];
            let Some(responses) = operation["responses"].as_object() else {
                wrong.push(format!("{method} {path} is not in the document"));
                continue;
            };
            let documented: BTreeSet<u16> = responses
                .keys()
                .map(|code| {
                    code.parse()
                        .unwrap_or_else(|_| panic!("{method} {path}: {code}"))
                })
                .collect();
            let answered: BTreeSet<u16> = route.statuses(method).iter().copied().collect();
            if documented != answered {
                wrong.push(format!(
                    "{method} {path}: the router answers {answered:?}, the document lists {documented:?}"
                ));
            }
        }
    }
    let listed: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .map(move |method| (path.clone(), method.clone()))
        })
        .collect();
    for extra in listed.difference(&expected) {
        wrong.push(format!(
            "{} {} is documented but not routed",
            extra.1, extra.0
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The virtual environment's Python tools, or `None` (said, and a failure under CI).
fn tool(name: &str) -> Option<PathBuf> {
    let path = root().join("target/pyenv/bin").join(name);
    if path.exists() {
        Some(path)
    } else {
        common::skip("target/pyenv is missing: run `make pyenv` (make test does)");
        None
    }
}

#[test]
fn the_daemon_serves_the_document_and_it_validates() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let served = daemon.request("GET", "/openapi.json", &[], b"");
    assert_eq!(served.status, 200);
    assert_eq!(served.header("content-type"), Some("application/json"));
    assert_eq!(served.json(), document());
    let Some(validator) = tool("openapi-spec-validator") else {
        return;
    };
    let output = Command::new(validator)
        .arg(root().join("docs/openapi.json"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn schemathesis_finds_every_answer_in_the_document() {
    let Some(schemathesis) = tool("schemathesis") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--key-rate-per-second",
            "0",
            "--auth-failures-per-second",
            "0",
        ],
    );
    let minted = daemon.post_json(
        "/v1/keys",
        Some(ADMIN_KEY),
        None,
        &json!({"name": "schemathesis", "scopes": ["read", "write", "delete", "admin"]}),
    );
    let key = minted.json()["key"].as_str().unwrap().to_owned();
    daemon.ingest(
        &key,
        None,
        json!([{"role": "user", "content": "I grow tomatoes."}]),
    );
    let seconds: u64 = common::env_or("SCHEMATHESIS_SECONDS", 60);
    // With a memory key holding every scope: every route (the admin ones say 403).
    run_schemathesis(&schemathesis, &daemon, &key, None, seconds);
    // With the admin key: the routes it alone, or it too, may use.
    let admin = "^/v1/(keys|vaults|audit)";
    run_schemathesis(&schemathesis, &daemon, ADMIN_KEY, Some(admin), seconds / 2);
}

/// A bounded schemathesis run against the daemon with `key`, over the paths `only` matches
/// (every path when `None`); fails with its report unless every answer is in the document.
fn run_schemathesis(
    schemathesis: &std::path::Path,
    daemon: &Daemon,
    key: &str,
    only: Option<&str>,
    seconds: u64,
) {
    let mut command = Command::new(schemathesis);
    command
        .arg("run")
        .arg(format!("http://{}/openapi.json", daemon.addr))
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args(["--max-time", &seconds.max(1).to_string()])
        .args(["--workers", "1", "--request-timeout", "30"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--suppress-health-check", "all"])
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
        .env("PYTHONPATH", root().join("tests/clients"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    if let Some(only) = only {
        command.args(["--include-path-regex", only]);
    }
    let output = command.output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{said}");
    assert!(
        output.status.success(),
        "schemathesis ({only:?}):\n{said}\ndaemon:\n{}",
        daemon.stderr()
    );
}
