//! A user's whole life through the front door: keys minted, scoped, rotated, expired and
//! revoked; memories exported, imported, deleted and erased for good. Time-dependent cases run
//! in process on a manual clock; the rest run the real binary.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Client, Daemon, InProcess, Response, ADMIN_KEY, MASTER_KEY};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

impl Client {
    /// Mints a key as the admin; returns the key and its `key_info`.
    fn mint(&self, body: Value) -> (String, Value) {
        self.mint_as(ADMIN_KEY, body)
    }

    fn mint_as(&self, manager: &str, body: Value) -> (String, Value) {
        let response = self.call("POST", "/v1/keys", manager, None, Some(&body));
        assert_eq!(response.status, 201, "{}", response.text());
        let answer = response.json();
        (
            answer["key"].as_str().unwrap().to_owned(),
            answer["key_info"].clone(),
        )
    }

    fn upload(&self, key: &str, body: &str) -> Response {
        let auth = format!("Bearer {key}");
        let headers = [
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/x-ndjson"),
        ];
        self.request("POST", "/v1/memory/upload", &headers, body.as_bytes())
    }

    fn status_of(&self, key: &str) -> (u16, String) {
        let body = json!({"messages": [{"role": "user", "content": "anything?"}]});
        let response = self.call("POST", "/v1/memory/prepare", key, None, Some(&body));
        let code = if response.status == 200 {
            String::new()
        } else {
            response.error_code()
        };
        (response.status, code)
    }
}

fn contents(memories: &[Value]) -> Vec<String> {
    memories
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

// ---- scopes

#[derive(Clone, Copy, Debug)]
enum Needs {
    /// 403 only when the key lacks the scope; the suffix turns the call into a no-op.
    ScopeOnly(&'static str),
    /// 403 when the key lacks the scope or its suffix leaves it out.
    Effective(&'static str),
}

#[test]
fn every_endpoint_checks_every_scope_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let (stranger, stranger_info) = daemon.mint(json!({"name": "someone else"}));
    let stranger_id = stranger_info["id"].as_str().unwrap().to_owned();
    drop(stranger);
    let revoke_stranger = format!("/v1/keys/{stranger_id}");
    let endpoints: Vec<(&str, &str, &str, Option<Value>, Needs)> = vec![
        (
            "prepare",
            "POST",
            "/v1/memory/prepare",
            Some(json!({"messages": [{"role": "user", "content": "what do I like?"}]})),
            Needs::ScopeOnly("read"),
        ),
        (
            "ingest",
            "POST",
            "/v1/memory/ingest",
            Some(json!({"messages": [{"role": "user", "content": "I like tea."}]})),
            Needs::ScopeOnly("write"),
        ),
        (
            "search",
            "POST",
            "/v1/memory/search",
            Some(json!({})),
            Needs::Effective("read"),
        ),
        (
            "stats",
            "GET",
            "/v1/memory/stats",
            None,
            Needs::Effective("read"),
        ),
        (
            "upload",
            "POST",
            "/v1/memory/upload",
            None,
            Needs::Effective("write"),
        ),
        (
            "delete one",
            "DELETE",
            "/v1/memory/mem_00000000000000ff",
            None,
            Needs::Effective("delete"),
        ),
        (
            "delete session",
            "DELETE",
            "/v1/memory",
            None,
            Needs::Effective("delete"),
        ),
        (
            "list keys",
            "GET",
            "/v1/keys",
            None,
            Needs::Effective("admin"),
        ),
        (
            "show key",
            "GET",
            "/v1/keys/0000000000000000",
            None,
            Needs::Effective("admin"),
        ),
        (
            "mint",
            "POST",
            "/v1/keys",
            Some(json!({"name": "child", "scopes": ["admin"]})),
            Needs::Effective("admin"),
        ),
        (
            "rotate",
            "POST",
            "/v1/keys/0000000000000000/rotate",
            Some(json!({})),
            Needs::Effective("admin"),
        ),
        (
            "revoke other vault's key",
            "DELETE",
            &revoke_stranger,
            None,
            Needs::Effective("admin"),
        ),
        ("audit", "GET", "/v1/audit", None, Needs::Effective("audit")),
    ];
    let scope_sets: [&[&str]; 5] = [
        &["read"],
        &["write"],
        &["delete"],
        &["admin"],
        &["read", "write", "delete", "admin"],
    ];
    let mut checked = 0;
    for scopes in scope_sets {
        let (key, _) = daemon.mint(json!({"name": "matrix", "scopes": scopes}));
        for suffix in ["", ":read", ":write", ":off"] {
            let presented = format!("{key}{suffix}");
            let mode_allows = |scope: &str| match suffix {
                "" => true,
                ":read" => scope == "read",
                ":write" => scope == "write",
                _ => false,
            };
            for (name, method, path, body, needs) in &endpoints {
                let response = if *name == "upload" {
                    daemon.upload(&presented, "{\"content\": \"uploaded\"}\n")
                } else {
                    // The session header makes the vault-wide delete a session delete, so the
                    // matrix leaves each vault in place.
                    let session = (*name == "delete session").then_some("no-such-session");
                    daemon.call(method, path, &presented, session, body.as_ref())
                };
                let (allowed, scope) = match needs {
                    Needs::ScopeOnly(scope) => (scopes.contains(scope), *scope),
                    Needs::Effective("audit") => (false, "audit"),
                    Needs::Effective(scope) => {
                        (scopes.contains(scope) && mode_allows(scope), *scope)
                    }
                };
                let what = format!("{name} with scopes {scopes:?} and suffix {suffix:?}");
                if scope == "audit" {
                    assert_eq!(
                        (response.status, response.error_code()),
                        (403, "admin_key_required".to_owned()),
                        "{what}"
                    );
                } else if allowed {
                    assert_ne!(response.status, 403, "{what}: {}", response.text());
                    assert!(response.status < 500, "{what}: {}", response.text());
                } else {
                    assert_eq!(
                        (response.status, response.error_code()),
                        (403, format!("{scope}_scope_required")),
                        "{what}: {}",
                        response.text()
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 5 * 4 * endpoints.len());
    // A key-managing memory key cannot reach another vault's keys: they do not exist for it.
    let (manager, _) = daemon.mint(json!({"name": "manager", "scopes": ["admin", "read"]}));
    let response = daemon.call(
        "DELETE",
        &format!("/v1/keys/{stranger_id}"),
        &manager,
        None,
        None,
    );
    assert_eq!(
        (response.status, response.error_code()),
        (404, "key_not_found".to_owned())
    );
    // Nor mint a key with more than it holds.
    let response = daemon.call(
        "POST",
        "/v1/keys",
        &manager,
        None,
        Some(&json!({"name": "x", "scopes": ["write"]})),
    );
    assert_eq!(
        (response.status, response.error_code()),
        (403, "write_scope_required".to_owned())
    );
    // Nor take over a stronger key of its own vault by rotating or revoking it.
    let own_vault =
        daemon.call("GET", "/v1/keys", &manager, None, None).json()["keys"][0]["vault_id"].clone();
    let (strong, strong_info) = daemon.mint(json!({
        "name": "full", "scopes": ["read", "write", "delete"], "vault_id": own_vault,
    }));
    let strong_id = strong_info["id"].as_str().unwrap();
    for (method, path) in [
        ("POST", format!("/v1/keys/{strong_id}/rotate")),
        ("DELETE", format!("/v1/keys/{strong_id}")),
    ] {
        let response = daemon.call(method, &path, &manager, None, None);
        assert_eq!(response.status, 403, "{method} {path}: {}", response.text());
    }
    assert_eq!(daemon.status_of(&strong).0, 200);
    let (child, child_info) = daemon.mint_as(
        &manager,
        json!({"name": "reader", "scopes": ["read"], "vault_id": own_vault}),
    );
    assert_eq!(daemon.status_of(&child).0, 200);
    let listed = daemon.call("GET", "/v1/keys", &manager, None, None).json();
    let ids: Vec<&str> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "only its own vault's keys: {listed}");
    assert!(ids.contains(&child_info["id"].as_str().unwrap()));
}

// ---- isolation

#[test]
fn randomised_vaults_never_cross_and_deleting_one_leaves_the_others_identical() {
    let seed: u64 = common::env_or("ISOLATION_SEED", 20261123);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // No request rate limit here: the export loops are fast.
    let daemon = Daemon::start(dir.path(), &["--key-rate-per-second", "0"]);
    let vaults: Vec<String> = (0..6)
        .map(|i| {
            daemon
                .mint(json!({"name": format!("user {i}"), "scopes": ["read", "write", "delete"]}))
                .0
        })
        .collect();
    // The model: what each vault must hold, by id.
    let mut model: Vec<BTreeMap<String, String>> = vec![BTreeMap::new(); vaults.len()];
    let topics = [
        "tea", "hiking", "chess", "violin", "sailing", "pottery", "birds", "trains",
    ];
    for step in 0..160 {
        let v = rng.random_range(0..vaults.len());
        let key = &vaults[v];
        match rng.random_range(0..10) {
            0..=6 => {
                let session = format!("s{}", rng.random_range(0..3));
                let text = format!(
                    "User {v} says at step {step}: I really enjoy {} on weekends.",
                    topics[rng.random_range(0..topics.len())]
                );
                let answer = daemon.ingest(
                    key,
                    Some(&session),
                    json!([{"role": "user", "content": text}]),
                );
                model[v].insert(answer["ids"][0].as_str().unwrap().to_owned(), text);
            }
            7 => {
                let Some(id) = model[v]
                    .keys()
                    .nth(rng.random_range(0..model[v].len().max(1)))
                    .cloned()
                else {
                    continue;
                };
                let response = daemon.call("DELETE", &format!("/v1/memory/{id}"), key, None, None);
                assert_eq!(response.status, 204, "{}", response.text());
                model[v].remove(&id);
                // Another vault's memory cannot be deleted through this key: it is not there.
                if let Some(id) = model[(v + 1) % vaults.len()].keys().next() {
                    let response =
                        daemon.call("DELETE", &format!("/v1/memory/{id}"), key, None, None);
                    assert_eq!(
                        response.status, 404,
                        "vault {v} deleted another vault's memory"
                    );
                }
            }
            8 => {
                let session = format!("s{}", rng.random_range(0..3));
                let exported = daemon.export_paged(key, 7);
                let response = daemon.call("DELETE", "/v1/memory", key, Some(&session), None);
                assert_eq!(response.status, 200, "{}", response.text());
                let doomed: Vec<String> = exported
                    .iter()
                    .filter(|m| m["session_id"] == session.as_str())
                    .map(|m| m["id"].as_str().unwrap().to_owned())
                    .collect();
                assert_eq!(response.json()["deleted"], doomed.len());
                for id in doomed {
                    model[v].remove(&id);
                }
            }
            _ => {
                let exported = daemon.export_paged(key, 7);
                let got: BTreeMap<String, String> = exported
                    .iter()
                    .map(|m| {
                        (
                            m["id"].as_str().unwrap().to_owned(),
                            m["content"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect();
                assert_eq!(got, model[v], "vault {v} at step {step} (seed {seed})");
            }
        }
    }
    daemon.wait_indexed();
    let before: Vec<Vec<Value>> = vaults.iter().map(|k| daemon.export_paged(k, 7)).collect();
    for (v, key) in vaults.iter().enumerate() {
        let got: Vec<String> = contents(&before[v]);
        assert_eq!(
            got,
            model[v].values().cloned().collect::<Vec<_>>(),
            "vault {v} (seed {seed})"
        );
        // Ranked search sees only the vault's own memories.
        let body = json!({"query": "What do I enjoy on weekends?", "limit": 50});
        let found = daemon
            .call("POST", "/v1/memory/search", key, None, Some(&body))
            .json();
        for memory in found["memories"].as_array().unwrap() {
            let text = memory["content"].as_str().unwrap();
            assert!(
                text.starts_with(&format!("User {v} says")),
                "vault {v} saw {text:?} (seed {seed})"
            );
        }
    }
    let victim = rng.random_range(0..vaults.len());
    let response = daemon.call("DELETE", "/v1/memory", &vaults[victim], None, None);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["deleted"], model[victim].len());
    for (v, key) in vaults.iter().enumerate() {
        let after = daemon.export_paged(key, 7);
        if v == victim {
            assert!(after.is_empty());
        } else {
            assert_eq!(
                after, before[v],
                "vault {v} changed when vault {victim} was erased (seed {seed})"
            );
        }
    }
}

// ---- time: expiry, grace periods, rate limits (manual clock)

#[test]
fn expiry_and_rotation_grace_follow_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = InProcess::start(dir.path(), &[]);
    let (expiring, info) = daemon.mint(json!({"name": "trial", "expires_days": 3}));
    assert_eq!(info["expires_at"], "2027-01-18T08:00:00Z");
    daemon.advance_days(2);
    assert_eq!(daemon.status_of(&expiring).0, 200);
    daemon.advance_days(1);
    assert_eq!(daemon.status_of(&expiring), (401, "key_expired".to_owned()));

    let (old, old_info) = daemon.mint(json!({"name": "user 7", "scopes": ["read", "write"]}));
    let id = old_info["id"].as_str().unwrap();
    daemon.ingest(
        &old,
        None,
        json!([{"role": "user", "content": "My cat is called Miso."}]),
    );
    let response = daemon.call(
        "POST",
        &format!("/v1/keys/{id}/rotate"),
        ADMIN_KEY,
        None,
        Some(&json!({"grace_days": 2})),
    );
    assert_eq!(response.status, 201, "{}", response.text());
    let rotated = response.json();
    let new = rotated["key"].as_str().unwrap().to_owned();
    assert_eq!(
        rotated["key_info"]["vault_id"], old_info["vault_id"],
        "the vault follows the user"
    );
    assert_eq!(rotated["key_info"]["rotated_from"], id);
    let shown = daemon
        .call("GET", &format!("/v1/keys/{id}"), ADMIN_KEY, None, None)
        .json();
    assert_eq!(shown["deprecated_at"], "2027-01-18T08:00:00Z");
    assert_eq!(shown["auto_revoke_at"], "2027-01-20T08:00:00Z");
    assert_eq!(shown["is_active"], true);
    assert!(shown.get("key").is_none() && !shown.to_string().contains(&old[20..]));
    // Both work during the grace period, on the same memories.
    assert_eq!(daemon.status_of(&old).0, 200);
    assert_eq!(
        contents(&daemon.export_paged(&new, 7)),
        ["My cat is called Miso."]
    );
    let again = daemon.call(
        "POST",
        &format!("/v1/keys/{id}/rotate"),
        ADMIN_KEY,
        None,
        Some(&json!({})),
    );
    assert_eq!(
        (again.status, again.error_code()),
        (409, "key_inactive".to_owned())
    );
    daemon.advance_days(2);
    assert_eq!(daemon.status_of(&old), (401, "key_rotated".to_owned()));
    assert_eq!(daemon.status_of(&new).0, 200);
    let shown = daemon
        .call("GET", &format!("/v1/keys/{id}"), ADMIN_KEY, None, None)
        .json();
    assert_eq!(
        (shown["is_active"].clone(), shown["status"].clone()),
        (json!(false), json!("rotated"))
    );

    // No grace: the old key stops at once.
    let new_id = rotated["key_info"]["id"].as_str().unwrap();
    let response = daemon.call(
        "POST",
        &format!("/v1/keys/{new_id}/rotate"),
        ADMIN_KEY,
        None,
        None,
    );
    assert_eq!(response.status, 201, "{}", response.text());
    assert_eq!(daemon.status_of(&new), (401, "key_rotated".to_owned()));
    let bad = daemon.call(
        "POST",
        &format!("/v1/keys/{id}/rotate"),
        ADMIN_KEY,
        None,
        Some(&json!({"grace_days": 31})),
    );
    assert_eq!(bad.status, 400);

    // A key minted by an expiring key expires with it; a rotated one manages nothing.
    let (manager, manager_info) =
        daemon.mint(json!({"name": "app", "scopes": ["admin", "read"], "expires_days": 10}));
    let (_, child) = daemon.mint_as(
        &manager,
        json!({"name": "child", "scopes": ["read"], "vault_id": manager_info["vault_id"]}),
    );
    assert_eq!(child["expires_at"], manager_info["expires_at"]);
    let auth = format!("Bearer {ADMIN_KEY}");
    let child_id = child["id"].as_str().unwrap();
    let rotated = daemon.request(
        "POST",
        &format!("/v1/keys/{child_id}/rotate"),
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        b"",
    );
    assert_eq!(
        rotated.status,
        201,
        "an empty body is an empty object: {}",
        rotated.text()
    );
    let manager_id = manager_info["id"].as_str().unwrap();
    let rotated = daemon.call(
        "POST",
        &format!("/v1/keys/{manager_id}/rotate"),
        ADMIN_KEY,
        None,
        Some(&json!({"grace_days": 5})),
    );
    assert_eq!(
        rotated.json()["key_info"]["expires_at"],
        "2027-01-30T08:00:00Z"
    );
    let refused = daemon.call("GET", "/v1/keys", &manager, None, None);
    assert_eq!(
        (refused.status, refused.error_code()),
        (403, "admin_scope_required".to_owned())
    );
    assert_eq!(
        daemon.status_of(&manager).0,
        200,
        "it still reads during its grace period"
    );
}

#[test]
fn a_key_over_its_rate_waits_as_long_as_retry_after_says() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = InProcess::start(
        dir.path(),
        &["--key-rate-per-second", "0.5", "--key-burst", "2"],
    );
    let (key, _) = daemon.mint(json!({"name": "busy"}));
    assert_eq!(daemon.status_of(&key).0, 200);
    assert_eq!(daemon.status_of(&key).0, 200);
    let body = json!({"messages": [{"role": "user", "content": "x"}]});
    let limited = daemon.call("POST", "/v1/memory/prepare", &key, None, Some(&body));
    assert_eq!(
        (limited.status, limited.error_code()),
        (429, "rate_limited".to_owned())
    );
    assert_eq!(limited.header("retry-after"), Some("2"));
    let (other, _) = daemon.mint(json!({"name": "calm"}));
    assert_eq!(
        daemon.status_of(&other).0,
        200,
        "each key has its own budget"
    );
    daemon.clock.advance_ms(2000);
    assert_eq!(daemon.status_of(&key).0, 200);
}

// ---- revocation

#[test]
fn a_revoked_key_stays_revoked_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let (key, info) = daemon.mint(json!({"name": "leaver"}));
    let (kept, _) = daemon.mint(json!({"name": "stayer"}));
    let id = info["id"].as_str().unwrap().to_owned();
    let response = daemon.call("DELETE", &format!("/v1/keys/{id}"), ADMIN_KEY, None, None);
    assert_eq!(response.status, 204);
    assert_eq!(daemon.status_of(&key), (401, "key_revoked".to_owned()));
    daemon.kill9();

    let daemon = Daemon::start(dir.path(), &[]);
    assert_eq!(daemon.status_of(&key), (401, "key_revoked".to_owned()));
    assert_eq!(daemon.status_of(&kept).0, 200);
    // A wrong secret for a real id looks exactly like an id never minted.
    let mut forged = memory_sidecar::auth::NewKey::generate().full;
    forged.replace_range(3..19, &id);
    let forged_status = daemon.status_of(&forged);
    assert!(
        forged_status == (401, "invalid_key".to_owned())
            || forged_status == (401, "unknown_key".to_owned())
    );
    let listed = daemon.call("GET", "/v1/keys", ADMIN_KEY, None, None).json();
    assert!(
        !listed.to_string().contains(&id),
        "revoked keys are hidden by default"
    );
    let listed = daemon
        .call(
            "GET",
            "/v1/keys?include_revoked=true",
            ADMIN_KEY,
            None,
            None,
        )
        .json();
    let shown = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap();
    assert_eq!(shown["status"], "revoked");
    assert!(!shown["revoked_at"].is_null());
    let typo = daemon.call("GET", "/v1/keys?include_revoked=yes", ADMIN_KEY, None, None);
    assert_eq!(typo.status, 400);
    let unknown = daemon.call("GET", "/v1/keys?includ_revoked=true", ADMIN_KEY, None, None);
    assert_eq!(unknown.status, 400);
}

// ---- erasure on disk

/// Whether `needle` occurs in any file under `dir`.
fn found_on_disk(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

#[test]
fn an_erased_vault_cannot_be_read_back_from_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data, &[]);
    let marker = format!("zanzibar-{:016x}", rand::random::<u64>());
    let (leaving, info) =
        daemon.mint(json!({"name": "leaving", "scopes": ["read", "write", "delete"]}));
    let (staying, _) = daemon.mint(json!({"name": "staying"}));
    daemon.ingest(
        &leaving,
        Some("s"),
        json!([{"role": "user", "content": format!("My secret word is {marker}.")}]),
    );
    daemon.ingest(
        &staying,
        None,
        json!([{"role": "user", "content": "I keep bees in the garden."}]),
    );
    daemon.wait_indexed();
    assert_eq!(contents(&daemon.export_paged(&leaving, 7)).len(), 1);
    let staying_before = daemon.export_paged(&staying, 7);
    daemon.kill9();
    // Encrypted at rest: not even a live vault's text is in the files.
    assert!(found_on_disk(&data, marker.as_bytes()).is_empty());
    assert!(found_on_disk(&data, b"I keep bees").is_empty());

    // The vault's wrapped data key, as the keyring holds it now.
    let vault_hex = info["vault_id"]
        .as_str()
        .unwrap()
        .strip_prefix("vlt_")
        .unwrap()
        .to_owned();
    let vault_bytes = hex::decode(&vault_hex).unwrap();
    let keyring = std::fs::read(data.join("keyring")).unwrap();
    let slot = keyring
        .chunks(128)
        .find(|slot| slot[0] == 1 && slot[1..17] == vault_bytes[..])
        .expect("the vault's slot")
        .to_vec();

    let daemon = Daemon::start(&data, &[]);
    let response = daemon.call("DELETE", "/v1/memory", &leaving, None, None);
    assert_eq!(
        (response.status, response.json()["deleted"].clone()),
        (200, json!(1))
    );
    assert!(daemon.export_paged(&leaving, 7).is_empty());
    assert_eq!(
        daemon.status_of(&leaving).0,
        200,
        "the key still works, on an empty vault"
    );
    daemon.kill9();
    assert!(found_on_disk(&data, marker.as_bytes()).is_empty());
    assert!(
        found_on_disk(&data, &slot[17..89]).is_empty(),
        "the old wrapped data key is gone from every file"
    );
    let daemon = Daemon::start(&data, &[]);
    assert!(
        daemon.export_paged(&leaving, 7).is_empty(),
        "it does not come back after a restart"
    );
    assert_eq!(daemon.export_paged(&staying, 7), staying_before);

    // The operator's erase removes the vault and its keys.
    let vault = info["vault_id"].as_str().unwrap();
    let response = daemon.call(
        "DELETE",
        &format!("/v1/vaults/{vault}"),
        ADMIN_KEY,
        None,
        None,
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(daemon.status_of(&leaving), (401, "key_revoked".to_owned()));
    let again = daemon.call(
        "DELETE",
        &format!("/v1/vaults/{vault}"),
        ADMIN_KEY,
        None,
        None,
    );
    assert_eq!(
        (again.status, again.error_code()),
        (404, "vault_not_found".to_owned())
    );
    assert_eq!(daemon.export_paged(&staying, 7), staying_before);
}

// ---- import, tags, stats, limits, audit

#[test]
fn upload_reports_bad_lines_and_never_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--passage-chars",
            "200",
            "--passage-overlap-chars",
            "0",
            "--max-passages-per-message",
            "1",
            "--max-upload-bytes",
            "4096",
        ],
    );
    let (key, _) = daemon.mint(json!({"name": "importer"}));
    let long = "x".repeat(201);
    let body = [
        r#"{"content": "Caroline: I went to the LGBTQ support group yesterday.", "timestamp": "2023-05-08T13:56:00Z", "session_id": "session_1", "tags": ["locomo"]}"#.to_owned(),
        r#"{"content": "Melanie: That sounds wonderful!", "role": "assistant", "timestamp": 1683554200000, "session_id": "session_1"}"#.to_owned(),
        String::new(),
        "{not json".to_owned(),
        format!(r#"{{"content": "{long}"}}"#),
        r#"{"content": "tool output", "role": "tool"}"#.to_owned(),
        r#"{"content": 42}"#.to_owned(),
        r#"{"content": "bad date", "timestamp": "soon"}"#.to_owned(),
        r#"{"content": "Caroline: I went to the LGBTQ support group yesterday.", "timestamp": "2023-05-08T13:56:00Z", "session_id": "session_1", "tags": ["locomo"]}"#.to_owned(),
    ]
    .join("\n");
    let response = daemon.upload(&key, &body);
    assert_eq!(response.status, 200, "{}", response.text());
    let answer = response.json();
    assert_eq!(answer["status"], "partial");
    assert_eq!(
        answer["stats"],
        json!({"total": 8, "processed": 3, "failed": 5, "stored": 2, "duplicates": 1})
    );
    let errors: Vec<(u64, &str)> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        errors,
        [
            (4, "invalid_json"),
            (5, "message_too_long"),
            (6, "invalid_request"),
            (7, "invalid_request"),
            (8, "invalid_request")
        ]
    );
    let again = daemon.upload(&key, &body).json();
    assert_eq!(
        again["stats"]["stored"], 0,
        "a repeated upload stores nothing new: {again}"
    );
    assert_eq!(daemon.export_paged(&key, 7).len(), 2);

    let too_big = daemon.upload(&key, &"{\"content\": \"a\"}\n".repeat(400));
    assert_eq!(
        (too_big.status, too_big.error_code()),
        (413, "body_too_large".to_owned())
    );
    let bearer = format!("Bearer {key}");
    let wrong_type = daemon.request(
        "POST",
        "/v1/memory/upload",
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", "multipart/form-data"),
        ],
        b"{\"content\": \"a\"}",
    );
    assert_eq!(
        (wrong_type.status, wrong_type.error_code()),
        (415, "unsupported_media_type".to_owned())
    );
    let empty = daemon.upload(&key, "\n\n");
    assert_eq!(empty.status, 400);

    // Tags filter search and prepare; stats count what is there.
    let exported = daemon.export_paged(&key, 7);
    assert_eq!(exported[0]["tags"], json!(["locomo"]));
    assert_eq!(exported[0]["created_at"], "2023-05-08T13:56:00Z");
    let tagged = daemon
        .call(
            "POST",
            "/v1/memory/search",
            &key,
            None,
            Some(&json!({"tags": ["locomo"]})),
        )
        .json();
    assert_eq!(tagged["memories"].as_array().unwrap().len(), 1);
    let since = daemon
        .call(
            "POST",
            "/v1/memory/search",
            &key,
            None,
            Some(&json!({"since": "2023-05-08T13:56:30Z"})),
        )
        .json();
    assert_eq!(
        contents(since["memories"].as_array().unwrap()),
        ["Melanie: That sounds wonderful!"]
    );
    daemon.wait_indexed();
    let prepare = json!({"messages": [{"role": "user", "content": "Where did Caroline go yesterday?"}], "tags": ["locomo"]});
    let found = daemon
        .call("POST", "/v1/memory/prepare", &key, None, Some(&prepare))
        .json();
    let found = found["memories"].as_array().unwrap();
    assert!(
        !found.is_empty() && found.iter().all(|m| m["tags"] == json!(["locomo"])),
        "{found:?}"
    );
    let stats = daemon
        .call("GET", "/v1/memory/stats", &key, None, None)
        .json();
    assert_eq!(stats["count"], 2);
    assert_eq!(stats["sessions"], 1);
    assert_eq!(stats["oldest"], "2023-05-08T13:56:00Z");
    assert_eq!(stats["newest"], "2023-05-08T13:56:40Z");
    assert_eq!(stats["pending"], 0);
}

#[test]
fn a_full_vault_refuses_more_until_something_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--max-vault-memories", "3"]);
    let (key, _) = daemon.mint(json!({"name": "small", "scopes": ["read", "write", "delete"]}));
    let ids: Vec<String> = (0..3)
        .map(|i| {
            daemon.ingest(
                &key,
                None,
                json!([{"role": "user", "content": format!("fact {i}")}]),
            )["ids"][0]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    // An empty id is a missing memory, never the whole vault.
    let slash = daemon.call("DELETE", "/v1/memory/", &key, None, None);
    assert_eq!(
        (slash.status, slash.error_code()),
        (404, "memory_not_found".to_owned())
    );
    assert_eq!(daemon.export_paged(&key, 7).len(), 3);
    let body = json!({"messages": [{"role": "user", "content": "fact 3"}]});
    let full = daemon.call("POST", "/v1/memory/ingest", &key, None, Some(&body));
    assert_eq!(
        (full.status, full.error_code()),
        (409, "vault_full".to_owned())
    );
    // A duplicate still answers: it takes no room.
    assert_eq!(
        daemon.ingest(&key, None, json!([{"role": "user", "content": "fact 0"}]))["stored"],
        0
    );
    assert_eq!(
        daemon
            .call(
                "DELETE",
                &format!("/v1/memory/{}", ids[0]),
                &key,
                None,
                None
            )
            .status,
        204
    );
    assert_eq!(
        daemon
            .call("POST", "/v1/memory/ingest", &key, None, Some(&body))
            .status,
        202
    );
    let missing = daemon.call(
        "DELETE",
        &format!("/v1/memory/{}", ids[0]),
        &key,
        None,
        None,
    );
    assert_eq!(
        (missing.status, missing.error_code()),
        (404, "memory_not_found".to_owned())
    );
}

#[test]
fn the_audit_log_records_every_operation_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let (key, info) =
        daemon.mint(json!({"name": "audited", "scopes": ["read", "write", "delete"]}));
    let id = info["id"].as_str().unwrap();
    daemon.upload(&key, "{\"content\": \"I was born in Lisbon.\"}\n");
    daemon.call("DELETE", "/v1/memory", &key, Some("s"), None);
    daemon.call("DELETE", "/v1/memory", &key, None, None);
    let rotated = daemon.call(
        "POST",
        &format!("/v1/keys/{id}/rotate"),
        ADMIN_KEY,
        None,
        Some(&json!({"grace_days": 1})),
    );
    let new_key = rotated.json()["key"].as_str().unwrap().to_owned();
    daemon.call("DELETE", &format!("/v1/keys/{id}"), ADMIN_KEY, None, None);
    daemon.call("DELETE", "/v1/keys/00000000000000ff", ADMIN_KEY, None, None);
    // A key pasted where its id belongs is refused, and the audit log does not keep it.
    daemon.call(
        "DELETE",
        &format!("/v1/keys/{new_key}"),
        ADMIN_KEY,
        None,
        None,
    );

    let log = daemon.call("GET", "/v1/audit?limit=100", ADMIN_KEY, None, None);
    assert_eq!(log.status, 200, "{}", log.text());
    let log = log.json();
    let actions: Vec<(String, String)> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("mint", "ok"),
        ("upload", "ok"),
        ("delete_session", "ok"),
        ("erase_contents", "ok"),
        ("rotate", "ok"),
        ("revoke", "ok"),
        ("revoke", "key_not_found"),
        ("revoke", "key_not_found"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, o)| (a.to_string(), o.to_string()))
        .collect();
    assert_eq!(actions, expected);
    assert_eq!(log["entries"][7]["key_id"], "<invalid>");
    let text = log.to_string();
    for secret in [&key[19..51], &new_key[19..51], "Lisbon", ADMIN_KEY] {
        assert!(
            !text.contains(secret),
            "the audit log holds a secret or memory text"
        );
    }
    assert_eq!(log["entries"][0]["actor"], "admin");
    assert_eq!(log["entries"][1]["actor"], id);
    let paged = daemon
        .call("GET", "/v1/audit?limit=3&cursor=", ADMIN_KEY, None, None)
        .json();
    let cursor = paged["next_cursor"].as_str().unwrap();
    let rest = daemon
        .call(
            "GET",
            &format!("/v1/audit?limit=100&cursor={cursor}"),
            ADMIN_KEY,
            None,
            None,
        )
        .json();
    assert_eq!(
        rest["entries"].as_array().unwrap().len(),
        expected.len() - 3
    );
}

#[test]
fn an_erasure_cut_short_is_finished_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let (key, info) = {
        let daemon = InProcess::start(dir.path(), &[]);
        let (key, info) = daemon.mint(json!({"name": "half-erased"}));
        daemon.ingest(
            &key,
            None,
            json!([{"role": "user", "content": "I play the oboe."}]),
        );
        (key, info)
    };
    // As if the daemon died right after making the erasure mark durable.
    {
        use memory_sidecar::store::{Durability, SledOptions, SledStore, Vaults};
        let options = SledOptions {
            data_dir: dir.path().to_owned(),
            cache_bytes: 1 << 20,
            accept_lost_commits: false,
        };
        let master = memory_sidecar::crypto::MasterKey::from_hex(MASTER_KEY).unwrap();
        let metrics = memory_sidecar::metrics::Metrics::new().unwrap();
        // sled lets go of its file lock when its background flusher notices the close.
        let started = std::time::Instant::now();
        let store = loop {
            match SledStore::open(&options, &master, metrics.clone()) {
                Ok(store) => break store,
                Err(error) if started.elapsed() < std::time::Duration::from_secs(30) => {
                    let _ = error;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(error) => panic!("{error:#}"),
            }
        };
        let vault = info["vault_id"].as_str().unwrap().parse().unwrap();
        let mut record = store.vault(vault).unwrap().unwrap();
        record.erasing = true;
        store.set_vault(vault, &record).unwrap();
        store.close().unwrap();
    }
    let daemon = InProcess::start(dir.path(), &[]);
    assert!(
        daemon.export_paged(&key, 7).is_empty(),
        "the erasure was finished"
    );
    assert_eq!(daemon.status_of(&key).0, 200, "and the vault kept, empty");
    daemon.ingest(
        &key,
        None,
        json!([{"role": "user", "content": "I play the oboe."}]),
    );
    assert_eq!(
        contents(&daemon.export_paged(&key, 7)),
        ["I play the oboe."]
    );
}

// ---- concurrency and budgets

#[test]
fn concurrent_mints_never_pass_a_vaults_limit_of_active_keys() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = InProcess::start(dir.path(), &["--key-rate-per-second", "0"]);
    let (manager, info) = daemon.mint(json!({
        "name": "owner", "scopes": ["read", "write", "delete", "admin"]
    }));
    // 99 active keys in the vault, then sixteen mints at once for the last place.
    let vault = info["vault_id"].as_str().unwrap();
    for n in 1..99 {
        daemon.mint_as(
            &manager,
            json!({"name": format!("key {n}"), "vault_id": vault}),
        );
    }
    let client: &Client = &daemon;
    let statuses: Vec<(u16, String)> = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..16)
            .map(|n| {
                let manager = &manager;
                scope.spawn(move || {
                    let body = json!({"name": format!("racer {n}"), "vault_id": vault});
                    let response = client.call("POST", "/v1/keys", manager, None, Some(&body));
                    let code = if response.status == 201 {
                        String::new()
                    } else {
                        response.error_code()
                    };
                    (response.status, code)
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|(status, _)| *status == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(statuses
        .iter()
        .all(|(status, code)| *status == 201 || code == "too_many_keys"));
    let listed = daemon
        .call(
            "GET",
            &format!("/v1/keys?vault_id={vault}&limit=1000"),
            ADMIN_KEY,
            None,
            None,
        )
        .json();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 100);
}

#[test]
fn a_memory_key_told_it_is_not_the_admin_key_keeps_its_request_budget() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = InProcess::start(
        dir.path(),
        &["--key-rate-per-second", "0.001", "--key-burst", "1"],
    );
    let (key, info) = daemon.mint(json!({"name": "user:budget"}));
    let audit = daemon.call("GET", "/v1/audit", &key, None, None);
    assert_eq!(audit.error_code(), "admin_key_required");
    let vault = info["vault_id"].as_str().unwrap();
    let erase = daemon.call("DELETE", &format!("/v1/vaults/{vault}"), &key, None, None);
    assert_eq!(erase.error_code(), "admin_key_required");
    assert_eq!(
        daemon.status_of(&key),
        (200, String::new()),
        "its one request was left"
    );
    assert_eq!(daemon.status_of(&key).1, "rate_limited");
}

#[test]
fn close_waits_for_the_indexer_so_nothing_runs_after_the_last_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let key = {
        let mut daemon = InProcess::start(dir.path(), &[]);
        let (key, _) = daemon.mint(json!({"name": "user:close"}));
        let messages: Vec<Value> = (0..64)
            .map(|n| json!({"role": "user", "content": format!("Note {n}: the blue folder holds receipt {n}.")}))
            .collect();
        daemon.ingest(&key, None, Value::Array(messages));
        // The indexer is embedding those now; close must wait for it, and for every thread
        // that holds the app, before it returns.
        daemon.close().unwrap();
        assert_eq!(
            std::sync::Arc::strong_count(&daemon.app),
            1,
            "a thread still holds the app after close"
        );
        key
    };
    let daemon = InProcess::start(dir.path(), &[]);
    assert_eq!(daemon.export(&key).len(), 64);
}

// ---- change: supersedes and corrections

fn context_of(daemon: &Daemon, key: &str, question: &str) -> String {
    daemon.wait_indexed();
    let answer = daemon.prepare(key, None, question);
    answer["context"].as_str().unwrap_or_default().to_owned()
}

fn first_id(answer: &Value) -> String {
    answer["ids"][0].as_str().unwrap().to_owned()
}

/// What changed replaces what was: a superseded memory is never shown again (also after a
/// restart), is kept in the export with `superseded_by`, and survives an import as such.
#[test]
fn a_superseded_memory_is_never_shown_but_kept_for_export() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let key = daemon.mint_key("change");
    let user = |text: &str| json!([{"role": "user", "content": text}]);
    let berlin = first_id(&daemon.ingest(&key, None, user("I live in Berlin, near the Spree.")));
    daemon.ingest(&key, None, user("My cat is called Pixel and she is grey."));
    assert!(context_of(&daemon, &key, "Where do I live?").contains("Berlin"));

    // A wrong id refuses the exchange, storing nothing.
    let before = daemon.export(&key).len();
    let body =
        json!({"messages": user("I live in Lisbon now."), "supersedes": ["mem_00000000deadbeef"]});
    let refused = daemon.post_json("/v1/memory/ingest", Some(&key), None, &body);
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (404, "memory_not_found")
    );
    let body = json!({"messages": user("I live in Lisbon now."), "supersedes": ["Berlin"]});
    let refused = daemon.post_json("/v1/memory/ingest", Some(&key), None, &body);
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (400, "invalid_request")
    );
    assert_eq!(daemon.export(&key).len(), before);

    let body = json!({"messages": user("I moved: I live in Lisbon now, in Alfama."), "supersedes": [berlin]});
    let moved = daemon.post_json("/v1/memory/ingest", Some(&key), None, &body);
    assert_eq!(moved.status, 202, "{}", moved.text());
    let lisbon = first_id(&moved.json());
    let context = context_of(&daemon, &key, "Where do I live? Berlin or Lisbon?");
    assert!(
        context.contains("Lisbon") && !context.contains("Berlin"),
        "{context}"
    );

    // A correction: the new text supersedes the old; the old one cannot be corrected again.
    let path = format!("/v1/memory/{lisbon}");
    let body = json!({"content": "I live in Porto now, by the river."});
    let corrected = daemon.call("PATCH", &path, &key, None, Some(&body));
    assert_eq!(corrected.status, 200, "{}", corrected.text());
    let porto = corrected.json();
    assert_eq!(porto["supersedes"], lisbon.as_str());
    let porto = porto["id"].as_str().unwrap().to_owned();
    let context = context_of(&daemon, &key, "Where do I live? Lisbon or Porto?");
    assert!(
        context.contains("Porto") && !context.contains("Lisbon"),
        "{context}"
    );
    let again = daemon.call("PATCH", &path, &key, None, Some(&body));
    assert_eq!(
        (again.status, again.error_code().as_str()),
        (409, "memory_superseded")
    );
    let missing = daemon.call(
        "PATCH",
        "/v1/memory/mem_00000000deadbeef",
        &key,
        None,
        Some(&body),
    );
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "memory_not_found")
    );
    let empty = daemon.call("PATCH", &path, &key, None, Some(&json!({"content": " "})));
    assert_eq!(empty.status, 400);
    let search = daemon.call(
        "POST",
        "/v1/memory/search",
        &key,
        None,
        Some(&json!({"query": "Where do I live? Berlin Lisbon Porto"})),
    );
    let found = search.json()["memories"].to_string();
    assert!(
        !found.contains("Berlin") && !found.contains("Lisbon"),
        "{found}"
    );

    // The export keeps all three, the old ones marked.
    let exported = daemon.export(&key);
    let by_id = |id: &str| exported.iter().find(|m| m["id"] == id).cloned().unwrap();
    assert_eq!(by_id(&berlin)["superseded_by"], lisbon.as_str());
    assert_eq!(by_id(&lisbon)["superseded_by"], porto.as_str());
    assert!(by_id(&porto).get("superseded_by").is_none());

    // A gateway resending the conversation does not bring the old one back; saying it again
    // in another conversation is a new memory, shown again.
    let resent = daemon.ingest(&key, None, user("I live in Berlin, near the Spree."));
    assert_eq!(
        (resent["stored"].as_u64(), resent["ids"][0].as_str()),
        (Some(0), Some(berlin.as_str()))
    );
    let context = context_of(&daemon, &key, "Where do I live? Berlin or Porto?");
    assert!(!context.contains("Berlin"), "{context}");
    let same = json!({"content": "I live in Porto now, by the river."});
    let unchanged = daemon.call(
        "PATCH",
        &format!("/v1/memory/{porto}"),
        &key,
        None,
        Some(&same),
    );
    assert_eq!(unchanged.status, 400, "{}", unchanged.text());
    daemon.ingest(
        &key,
        Some("back"),
        user("I live in Berlin, near the Spree."),
    );
    assert!(context_of(&daemon, &key, "Where do I live?").contains("Berlin"));

    // After a restart the index is built from the store: still hidden.
    drop(daemon);
    let daemon = Daemon::start(dir.path(), &[]);
    let context = context_of(&daemon, &key, "Do I live in Lisbon? Alfama?");
    assert!(!context.contains("Lisbon"), "{context}");

    // An import keeps a superseded line superseded: stored, exported, never shown.
    let other = daemon.mint_key("imported");
    let lines = [
        json!({"content": "I work at the harbour office.", "superseded_by": "mem_0000000000000001"}),
        json!({"content": "I work at the city library now."}),
    ];
    let body: Vec<String> = lines.iter().map(Value::to_string).collect();
    let uploaded = daemon.upload(&other, &body.join("\n"));
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    assert_eq!(uploaded.json()["stats"]["stored"], 2);
    let context = context_of(&daemon, &other, "Where do I work? harbour office?");
    assert!(
        context.contains("library") && !context.contains("harbour"),
        "{context}"
    );
    let exported = daemon.export(&other);
    assert_eq!(exported.len(), 2);
    assert_eq!(exported[0]["superseded_by"], "mem_0000000000000001");

    // An upload line may supersede, as an ingest does.
    let library = exported[1]["id"].as_str().unwrap();
    let line =
        json!({"content": "I work at the university lab these days.", "supersedes": [library]});
    let uploaded = daemon.upload(&other, &line.to_string());
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    let context = context_of(&daemon, &other, "Where do I work? library or lab?");
    assert!(
        context.contains("university lab") && !context.contains("library"),
        "{context}"
    );
}
