//! Crash loop: concurrent ingests, deletes, erasures and key revocations against the real
//! daemon, `kill -9` at a random moment, restart, and check what was acknowledged.
//!
//! After every restart: every ingest answered 202 (and not deleted since) is returned by
//! search; nothing whose delete or erasure was answered comes back; a key whose revocation was
//! answered stays revoked; no vault holds another's memory; and the index agrees with the store
//! (a ranked search returns only memories the export holds). An operation cut off by the kill
//! (no answer) may have happened or not: both are accepted.
//!
//! Seeded and replayable: `CRASH_SEED=7 CRASH_CYCLES=50 cargo test --release --test crash`.
//! `make test` runs 3 cycles.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{Client, Daemon, ADMIN_KEY};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const VAULTS: usize = 4;

/// What the test knows of one vault. Each vault is driven by one worker, so its operations
/// are sequential and the model needs no locking.
#[derive(Default, Clone)]
struct Vault {
    /// The key every check uses; never revoked.
    key: String,
    /// A second key of the same vault, revoked at some point.
    victim: String,
    victim_id: String,
    /// Acknowledged memories: id -> text.
    acked: BTreeMap<String, String>,
    /// Ingests cut off by the kill: their texts may or may not be stored.
    maybe: BTreeSet<String>,
    /// Ids whose delete (or erasure) was answered.
    deleted: BTreeSet<String>,
    /// Texts whose delete was cut off: present or not, either is fine.
    maybe_deleted: BTreeSet<String>,
    victim_revoked: bool,
    /// A revocation cut off by the kill: settled at the next check.
    victim_maybe_revoked: bool,
}

/// A call whose answer may never come (the daemon is killed): `None` then.
fn call(
    client: &Client,
    method: &str,
    path: &str,
    key: &str,
    session: Option<&str>,
    body: Option<&Value>,
) -> Option<(u16, Value)> {
    let response = client.try_call(method, path, key, session, body).ok()?;
    let json = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    Some((response.status, json))
}

/// Drives one vault until the daemon goes away. Returns the updated model.
fn drive(client: Client, mut vault: Vault, index: usize, cycle: usize, seed: u64) -> Vault {
    let mut rng = StdRng::seed_from_u64(seed);
    for step in 0.. {
        let choice = rng.random_range(0..100);
        if choice < 70 {
            let text = format!(
                "vault {index} cycle {cycle} step {step}: I like item {}",
                rng.random_range(0..1000)
            );
            let body = json!({"messages": [{"role": "user", "content": text}]});
            let session = format!("s{}", step % 3);
            match call(
                &client,
                "POST",
                "/v1/memory/ingest",
                &vault.key,
                Some(&session),
                Some(&body),
            ) {
                Some((202, answer)) => {
                    let id = answer["ids"][0].as_str().unwrap().to_owned();
                    vault.acked.insert(id, text);
                }
                Some((status, answer)) => panic!("ingest answered {status}: {answer}"),
                None => {
                    vault.maybe.insert(text);
                    return vault;
                }
            }
        } else if choice < 85 {
            let live: Vec<String> = vault
                .acked
                .keys()
                .filter(|id| !vault.deleted.contains(*id))
                .cloned()
                .collect();
            if live.is_empty() {
                continue;
            }
            let id = live[rng.random_range(0..live.len())].clone();
            match call(
                &client,
                "DELETE",
                &format!("/v1/memory/{id}"),
                &vault.key,
                None,
                None,
            ) {
                Some((204, _)) => {
                    vault.deleted.insert(id);
                }
                Some((status, answer)) => panic!("delete answered {status}: {answer}"),
                None => {
                    vault.maybe_deleted.insert(vault.acked[&id].clone());
                    return vault;
                }
            }
        } else if choice < 90 {
            // Erase the vault's whole contents.
            match call(&client, "DELETE", "/v1/memory", &vault.key, None, None) {
                Some((200, _)) => {
                    let ids: Vec<String> = vault.acked.keys().cloned().collect();
                    vault.deleted.extend(ids);
                    vault.maybe.clear();
                }
                Some((status, answer)) => panic!("erase answered {status}: {answer}"),
                None => {
                    let texts: Vec<String> = vault.acked.values().cloned().collect();
                    vault.maybe_deleted.extend(texts);
                    return vault;
                }
            }
        } else if choice < 92 && !vault.victim_revoked {
            match call(
                &client,
                "DELETE",
                &format!("/v1/keys/{}", vault.victim_id),
                ADMIN_KEY,
                None,
                None,
            ) {
                Some((204, _)) => vault.victim_revoked = true,
                Some((status, answer)) => panic!("revoke answered {status}: {answer}"),
                None => {
                    vault.victim_maybe_revoked = true;
                    return vault;
                }
            }
        } else {
            // Reads under load: the victim key works until its revocation is answered.
            let body = json!({"messages": [{"role": "user", "content": "what do I like?"}]});
            match call(
                &client,
                "POST",
                "/v1/memory/prepare",
                &vault.victim,
                None,
                Some(&body),
            ) {
                Some((200, _)) => assert!(!vault.victim_revoked, "a revoked key was served"),
                Some((401, answer)) => {
                    assert!(
                        vault.victim_revoked,
                        "the victim key was refused before revocation: {answer}"
                    );
                    assert_eq!(answer["error"]["code"], "key_revoked");
                }
                Some((status, answer)) => panic!("prepare answered {status}: {answer}"),
                None => return vault,
            }
        }
    }
    vault
}

fn verify(daemon: &Daemon, vaults: &mut [Vault], seed: u64, cycle: usize) {
    daemon.wait_indexed();
    for (index, vault) in vaults.iter_mut().enumerate() {
        let what = format!("vault {index} after cycle {cycle} (seed {seed})");
        let stored = daemon.export(&vault.key);
        let by_id: BTreeMap<String, String> = stored
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_owned(),
                    m["content"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        for (id, text) in &vault.acked {
            if vault.deleted.contains(id) || vault.maybe_deleted.contains(text) {
                continue;
            }
            assert_eq!(
                by_id.get(id),
                Some(text),
                "{what}: acknowledged {id} is missing"
            );
        }
        for id in &vault.deleted {
            assert!(!by_id.contains_key(id), "{what}: deleted {id} came back");
        }
        for (id, text) in &by_id {
            assert!(
                text.starts_with(&format!("vault {index} ")),
                "{what}: holds another vault's memory {id}: {text}"
            );
            let known = vault.acked.get(id) == Some(text) || vault.maybe.contains(text);
            assert!(
                known,
                "{what}: {id} ({text}) was never acknowledged nor in flight"
            );
        }
        // The index agrees with the store: a ranked search returns only stored memories.
        let body = json!({"query": "what do I like", "limit": 100});
        let (status, found) = call(
            daemon,
            "POST",
            "/v1/memory/search",
            &vault.key,
            None,
            Some(&body),
        )
        .unwrap();
        assert_eq!(status, 200);
        for memory in found["memories"].as_array().unwrap() {
            assert!(
                by_id.contains_key(memory["id"].as_str().unwrap()),
                "{what}: the index returned {memory} which the store does not hold"
            );
        }
        let (status, stats) =
            call(daemon, "GET", "/v1/memory/stats", &vault.key, None, None).unwrap();
        assert_eq!(
            (status, stats["count"].as_u64()),
            (200, Some(by_id.len() as u64)),
            "{what}"
        );
        let body = json!({"messages": [{"role": "user", "content": "x"}]});
        let (status, answer) = call(
            daemon,
            "POST",
            "/v1/memory/prepare",
            &vault.victim,
            None,
            Some(&body),
        )
        .unwrap();
        let revoked = (status, answer["error"]["code"].as_str()) == (401, Some("key_revoked"));
        if vault.victim_revoked {
            assert!(
                revoked,
                "{what}: a revoked key works again: {status} {answer}"
            );
        } else if !vault.victim_maybe_revoked {
            assert_eq!(
                status, 200,
                "{what}: the victim key stopped working: {answer}"
            );
        }
        vault.victim_revoked = revoked;
        vault.victim_maybe_revoked = false;
        // What is settled now is the new baseline: in-flight outcomes are known from here on.
        vault.acked = by_id;
        vault.maybe.clear();
        vault.maybe_deleted.clear();
        vault.deleted.retain(|id| !vault.acked.contains_key(id));
    }
}

#[test]
fn acknowledged_writes_survive_kill_9_at_random_moments() {
    let seed: u64 = common::env_or("CRASH_SEED", 20261123);
    let cycles: usize = common::env_or("CRASH_CYCLES", 3);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let args = ["--key-rate-per-second", "0"];
    let mut vaults: Vec<Vault> = {
        let daemon = Daemon::start(dir.path(), &args);
        (0..VAULTS)
            .map(|i| {
                let (status, minted) = call(&daemon, "POST", "/v1/keys", ADMIN_KEY, None, Some(&json!({"name": format!("crash {i}"), "scopes": ["read", "write", "delete"]}))).unwrap();
                assert_eq!(status, 201);
                let key = minted["key"].as_str().unwrap().to_owned();
                let vault_id = minted["key_info"]["vault_id"].clone();
                let (status, victim) = call(&daemon, "POST", "/v1/keys", ADMIN_KEY, None, Some(&json!({"name": format!("victim {i}"), "vault_id": vault_id}))).unwrap();
                assert_eq!(status, 201);
                Vault {
                    key,
                    victim: victim["key"].as_str().unwrap().to_owned(),
                    victim_id: victim["key_info"]["id"].as_str().unwrap().to_owned(),
                    ..Vault::default()
                }
            })
            .collect()
    };
    for cycle in 0..cycles {
        let daemon = Daemon::start(dir.path(), &args);
        let started = Instant::now();
        let workers: Vec<_> = vaults
            .iter()
            .cloned()
            .enumerate()
            .map(|(index, vault)| {
                let client = Client { addr: daemon.addr };
                let worker_seed = seed ^ ((cycle as u64) << 32) ^ index as u64;
                std::thread::spawn(move || drive(client, vault, index, cycle, worker_seed))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
        daemon.kill9();
        vaults = workers
            .into_iter()
            .map(|w| w.join().expect("a worker panicked"))
            .collect();
        let acked: usize = vaults.iter().map(|v| v.acked.len()).sum();
        let deleted: usize = vaults.iter().map(|v| v.deleted.len()).sum();
        let in_flight = vaults
            .iter()
            .filter(|v| {
                !v.maybe.is_empty() || !v.maybe_deleted.is_empty() || v.victim_maybe_revoked
            })
            .count();
        eprintln!(
            "cycle {cycle}: killed after {:?}; {acked} memories acknowledged, {deleted} deletes \
             answered, {in_flight} vaults with an operation cut off",
            started.elapsed()
        );
        let daemon = Daemon::start(dir.path(), &args);
        verify(&daemon, &mut vaults, seed, cycle);
    }
}

/// Runs the binary on `data` expecting it to refuse to start; returns its stderr.
fn refused_start(data: &std::path::Path, master_key: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_memory-sidecar"))
        .env("MEMORY_SIDECAR_ADMIN_KEY", ADMIN_KEY)
        .env("MEMORY_SIDECAR_MASTER_KEY", master_key)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--models-dir")
        .arg(common::models_dir())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "the daemon started on damaged state"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn damaged_keys_stop_start_up_with_a_clear_error_never_empty_answers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let key = {
        let daemon = Daemon::start(data, &[]);
        let key = daemon.mint_key("user:damaged");
        daemon.ingest(
            &key,
            None,
            json!([{"role": "user", "content": "I keep bees."}]),
        );
        daemon.kill9();
        key
    };
    let keyring = data.join("keyring");
    let intact = std::fs::read(&keyring).unwrap();

    let other_master = "ff".repeat(32);
    let stderr = refused_start(data, &other_master, &[]);
    assert!(stderr.contains("master key does not match"), "{stderr}");

    std::fs::write(&keyring, &intact[..50]).unwrap();
    let stderr = refused_start(data, common::MASTER_KEY, &[]);
    assert!(
        stderr.contains("keyring") && stderr.contains("restore"),
        "{stderr}"
    );

    std::fs::remove_file(&keyring).unwrap();
    let stderr = refused_start(data, common::MASTER_KEY, &[]);
    assert!(stderr.contains("is missing"), "{stderr}");

    // An empty keyring beside a store of vaults is the same loss, not a new keyring.
    std::fs::write(&keyring, b"").unwrap();
    let stderr = refused_start(data, common::MASTER_KEY, &[]);
    assert!(
        stderr.contains("is empty") && stderr.contains("Restore the keyring"),
        "{stderr}"
    );
    assert!(
        std::fs::read(&keyring).unwrap().is_empty(),
        "the empty keyring was left as found"
    );

    // Restored, everything is there again.
    std::fs::write(&keyring, &intact).unwrap();
    let daemon = Daemon::start(data, &[]);
    let stored = daemon.export(&key);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["content"], "I keep bees.");
}

/// Copies a data directory (the daemon is stopped) so each damage starts from the same state.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_damaged_store_stops_start_up_instead_of_answering_with_less() {
    let dir = tempfile::tempdir().unwrap();
    let intact = dir.path().join("intact");
    let daemon = Daemon::start(&intact, &["--key-rate-per-second", "0"]);
    let key = daemon.mint_key("user:damaged-store");
    for n in 0..120 {
        let text = format!("Fact {n}: the spare key for shed {n} hangs behind the blue door.");
        daemon.ingest(&key, None, json!([{"role": "user", "content": text}]));
    }
    daemon.wait_indexed();
    daemon.kill9();
    let damaged = |name: &str, damage: &dyn Fn(&std::path::Path)| {
        let copy = dir.path().join(name);
        copy_dir(&intact, &copy);
        damage(&copy);
        copy
    };
    let behind = |stderr: &str| {
        stderr.contains("but commit")
            && stderr.contains("was acknowledged")
            && stderr.contains("--accept-lost-commits")
    };
    // Each damage must either stop start-up with the ledger's message or leave every memory
    // served: never fewer, silently. Where sled's log is cut decides which; the cut to an
    // eighth is always past the last commits.
    let refused_or_whole = |data: &std::path::Path, what: &str| -> bool {
        match Daemon::try_spawn(data, &[]) {
            Err(stderr) => {
                assert!(behind(&stderr), "{what}: {stderr}");
                eprintln!("{what}: start-up refused");
                true
            }
            Ok(daemon) => {
                daemon.wait_ready();
                assert_eq!(daemon.export(&key).len(), 120, "{what}: started with less");
                eprintln!("{what}: every memory served");
                false
            }
        }
    };
    let mut refusals = Vec::new();
    for eighths in [1, 2, 4, 6, 7] {
        let what = format!("the log cut to {eighths}/8");
        let copy = damaged(&format!("cut-{eighths}"), &|data| {
            let db = data.join("store/db");
            let length = std::fs::metadata(&db).unwrap().len();
            let file = File::options().write(true).open(&db).unwrap();
            file.set_len(length * eighths / 8).unwrap();
        });
        if refused_or_whole(&copy, &what) {
            refusals.push(copy);
        }
        let what = format!("a garbled block at {eighths}/8 of the log");
        let copy = damaged(&format!("garbled-{eighths}"), &|data| {
            let db = data.join("store/db");
            let length = std::fs::metadata(&db).unwrap().len();
            let file = File::options().write(true).open(&db).unwrap();
            file.write_all_at(&[0xa5; 4096], length * eighths / 8)
                .unwrap();
        });
        refused_or_whole(&copy, &what);
    }
    assert!(!refusals.is_empty(), "no cut of the log lost a commit");

    // A store directory gone (a bad restore, a wrong mount) is not a new, empty store.
    let gone = damaged("gone", &|data| {
        std::fs::remove_dir_all(data.join("store")).unwrap()
    });
    assert!(refused_or_whole(&gone, "the store removed"));

    // The ledger itself missing or damaged is said as such.
    let unledgered = damaged("unledgered", &|data| {
        std::fs::remove_file(data.join("ledger")).unwrap()
    });
    let stderr = Daemon::try_spawn(&unledgered, &[]).err().unwrap();
    assert!(
        stderr.contains("ledger") && stderr.contains("is missing"),
        "{stderr}"
    );
    let garbled_ledger = damaged("garbled-ledger", &|data| {
        std::fs::write(data.join("ledger"), [0u8; 32]).unwrap()
    });
    let stderr = Daemon::try_spawn(&garbled_ledger, &[]).err().unwrap();
    assert!(
        stderr.contains("ledger") && stderr.contains("damaged"),
        "{stderr}"
    );
    // Accepted, it is rewritten from the store, which is whole here.
    let daemon = Daemon::start(&garbled_ledger, &["--accept-lost-commits"]);
    assert_eq!(daemon.export(&key).len(), 120);
    daemon.kill9();
    assert_eq!(Daemon::start(&garbled_ledger, &[]).export(&key).len(), 120);

    // The operator may choose to serve what is left: loudly, once; the ledger follows the store.
    let truncated = &refusals[0];
    let daemon = Daemon::start(truncated, &["--accept-lost-commits"]);
    assert!(
        daemon.stderr().contains("starting anyway"),
        "{}",
        daemon.stderr()
    );
    let left = left_after_loss(&daemon, &key);
    assert!(left < 120, "{left} memories after losing commits");
    daemon.kill9();
    let daemon = Daemon::start(truncated, &[]);
    assert_eq!(left_after_loss(&daemon, &key), left);
    drop(daemon);

    // The intact copy serves every memory.
    let daemon = Daemon::start(&intact, &[]);
    assert_eq!(daemon.export(&key).len(), 120);
}

/// Memories a key still reaches after lost commits: none if the key itself was lost.
fn left_after_loss(client: &Client, key: &str) -> usize {
    let body = json!({"limit": 1000});
    let response = client.call("POST", "/v1/memory/search", key, None, Some(&body));
    match response.status {
        200 => client.export(key).len(),
        401 => 0,
        other => panic!("{other}: {}", response.text()),
    }
}
