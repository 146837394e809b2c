//! Faults: the disk filling up under the real daemon.
//!
//! Each test puts the data directory on a small tmpfs of its own and fills it with a file, so
//! the disk is really full: sled and the keyring meet real `ENOSPC`s, nothing is simulated.
//! Mounting needs root (or CAP_SYS_ADMIN), as in CI; elsewhere the tests say so and return,
//! except under `CI=true`, where not being able to mount fails them.
//!
//! - With the reserve (`--min-free-mb`), a filling disk stops new memories with 503
//!   `disk_full` before sled ever meets a full disk; reads, deletes and revocations go on;
//!   freeing space is all it takes to recover.
//! - Without it, sled's writes fail: the ingest gets 503 `storage_unavailable`, nothing
//!   acknowledged is lost, reads go on, `/readyz` says the store is down, and a restart once
//!   space is back serves everything that was acknowledged.

mod common;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{metric_value, Client, Daemon, ADMIN_KEY};
use serde_json::{json, Value};

/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    mount: tempfile::TempDir,
    filler: PathBuf,
}

impl SmallDisk {
    /// `None`, with the reason on stderr, where this process may not mount.
    fn mount(megabytes: u64) -> Option<SmallDisk> {
        let mount = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(mount.path())
            .output();
        match output {
            Ok(output) if output.status.success() => Some(SmallDisk {
                filler: mount.path().join("filler"),
                mount,
            }),
            Ok(output) => {
                common::skip(&format!(
                    "cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
                None
            }
            Err(error) => {
                common::skip(&format!("cannot run mount: {error}"));
                None
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.mount.path().join("data")
    }

    fn free(&self) -> u64 {
        fs2::available_space(self.mount.path()).unwrap()
    }

    /// Grows the filler file until at most `leave` bytes are free (0: until the disk is full).
    fn fill(&self, leave: u64) {
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(&self.filler)
            .unwrap();
        let chunk = vec![0x5a_u8; 64 * 1024];
        loop {
            let free = self.free();
            if free <= leave {
                break;
            }
            let take = (free - leave).min(chunk.len() as u64) as usize;
            match file.write(&chunk[..take]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(28) => break,
                Err(error) => panic!("filling the disk: {error}"),
            }
        }
        file.sync_all().ok();
    }

    fn empty(&self) {
        std::fs::remove_file(&self.filler).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount.path()).status();
    }
}

fn exchange(n: usize, padding: usize) -> Value {
    let filler = "and the garden was quiet that evening ".repeat(padding);
    json!([
        {"role": "user", "content": format!("Note {n}: my locker number at the pool is {}. {filler}", 1000 + n)},
        {"role": "assistant", "content": format!("Noted: locker {} for note {n}.", 1000 + n)},
    ])
}

fn ingest(client: &Client, key: &str, messages: Value) -> common::Response {
    client.post_json(
        "/v1/memory/ingest",
        Some(key),
        None,
        &json!({"messages": messages}),
    )
}

fn ids(answer: &Value) -> Vec<String> {
    answer["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect()
}

fn exported_ids(client: &Client, key: &str) -> Vec<String> {
    let mut ids: Vec<String> = client
        .export(key)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

fn assert_all_kept(client: &Client, key: &str, acked: &[String], what: &str) {
    let stored = exported_ids(client, key);
    let missing: Vec<&String> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{what}: acknowledged memories missing: {missing:?}"
    );
}

/// prepare finds note `n`'s locker number.
fn assert_recalls_locker(client: &Client, key: &str, n: usize) {
    let question = format!("What is my locker number at the pool for note {n}?");
    let answer = client.prepare(key, None, &question);
    let context = answer["context"].as_str().unwrap_or("");
    assert!(context.contains(&(1000 + n).to_string()), "{answer}");
}

fn data_args(disk: &SmallDisk) -> (PathBuf, Vec<String>) {
    (
        disk.data_dir(),
        vec!["--cache-bytes".into(), "8388608".into()],
    )
}

fn start(data: &Path, extra: &[String], more: &[&str]) -> Daemon {
    let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
    args.extend_from_slice(more);
    Daemon::start(data, &args)
}

#[test]
fn a_filling_disk_stops_new_memories_and_recovers_when_space_returns() {
    let Some(disk) = SmallDisk::mount(64) else {
        return;
    };
    let (data, args) = data_args(&disk);
    let daemon = start(&data, &args, &["--min-free-mb", "16"]);
    let body = json!({"name": "pool", "scopes": ["read", "write", "delete"]});
    let minted = daemon.post_json("/v1/keys", Some(ADMIN_KEY), None, &body);
    assert_eq!(minted.status, 201, "{}", minted.text());
    let key = minted.json()["key"].as_str().unwrap().to_owned();
    let minted = daemon.post_json("/v1/keys", Some(ADMIN_KEY), None, &json!({"name": "spare"}));
    assert_eq!(minted.status, 201, "{}", minted.text());
    let spare = minted.json()["key"].as_str().unwrap().to_owned();
    let spare_id = minted.json()["key_info"]["id"].as_str().unwrap().to_owned();
    let mut acked = Vec::new();
    for n in 0..20 {
        acked.extend(ids(&daemon.ingest(&key, None, exchange(n, 1))));
    }
    daemon.wait_indexed();

    disk.fill(8 << 20);
    let refused = ingest(&daemon, &key, exchange(100, 1));
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.error_code(), "disk_full");
    assert_eq!(refused.header("retry-after"), Some("10"));
    assert!(
        refused.text().contains("--min-free-mb"),
        "{}",
        refused.text()
    );
    // A retry of an exchange already stored is answered as before: nothing new to write.
    let retried = ingest(&daemon, &key, exchange(3, 1));
    assert_eq!(retried.status, 202, "{}", retried.text());
    assert_eq!(retried.json()["stored"], 0);
    let upload = daemon.request(
        "POST",
        "/v1/memory/upload",
        &[
            ("Authorization", &format!("Bearer {key}")),
            ("Content-Type", "application/x-ndjson"),
        ],
        b"{\"content\": \"an imported note\"}\n",
    );
    // An import is answered line by line: each line not stored says why.
    let report = upload.json();
    assert_eq!(report["errors"][0]["code"], "disk_full", "{report}");
    assert_eq!(report["stats"]["stored"], 0, "{report}");
    let mint = daemon.post_json("/v1/keys", Some(ADMIN_KEY), None, &json!({"name": "new"}));
    assert_eq!(mint.error_code(), "disk_full", "{}", mint.text());

    // Reads, deletes and revocations go on, on the reserve.
    assert_recalls_locker(&daemon, &key, 7);
    assert_all_kept(&daemon, &key, &acked, "while the disk is full");
    let deleted = acked.pop().unwrap();
    let response = daemon.call("DELETE", &format!("/v1/memory/{deleted}"), &key, None, None);
    assert_eq!(response.status, 204, "{}", response.text());
    let revoke = daemon.call(
        "DELETE",
        &format!("/v1/keys/{spare_id}"),
        ADMIN_KEY,
        None,
        None,
    );
    assert_eq!(revoke.status, 204, "{}", revoke.text());
    let metrics = daemon.request("GET", "/metrics", &[], b"").text();
    let free = metric_value(&metrics, "memory_sidecar_disk_free_bytes").unwrap();
    assert!(free < (16 << 20) as f64, "disk_free_bytes {free}");
    assert_eq!(daemon.request("GET", "/readyz", &[], b"").status, 200);

    // Space returns: writes resume with nothing else done.
    disk.empty();
    acked.extend(ids(&daemon.ingest(&key, None, exchange(200, 1))));
    assert_all_kept(&daemon, &key, &acked, "after space returned");
    daemon.kill9();
    let daemon = start(&data, &args, &["--min-free-mb", "16"]);
    assert_all_kept(&daemon, &key, &acked, "after a restart");
    assert!(!exported_ids(&daemon, &key).contains(&deleted));
    let refused = daemon.call("POST", "/v1/memory/search", &spare, None, Some(&json!({})));
    assert_eq!(refused.error_code(), "key_revoked");
}

#[test]
fn a_write_that_fails_loses_nothing_acknowledged_and_reads_go_on() {
    let Some(disk) = SmallDisk::mount(64) else {
        return;
    };
    let (data, args) = data_args(&disk);
    // No reserve: sled itself meets the full disk. Kept up after the failure, to look at it.
    let daemon = start(
        &data,
        &args,
        &["--min-free-mb", "0", "--keep-serving-after-storage-failure"],
    );
    let key = daemon.mint_key("pool");
    let idle = daemon.mint_key("idle");
    let mut acked = Vec::new();
    for n in 0..20 {
        acked.extend(ids(&daemon.ingest(&key, None, exchange(n, 1))));
    }
    daemon.ingest(&idle, None, exchange(7, 1));
    daemon.wait_indexed();
    // The vault is in use: its index is loaded. (A vault first read after the failure may get
    // 503 storage_unavailable instead: sled splits nodes lazily, on the next read, and a split
    // is a write it then refuses. The idle vault, never queried, checks that.)
    assert_recalls_locker(&daemon, &key, 3);

    disk.fill(0);
    // sled may still have room in a segment it already holds; large exchanges use it up.
    let mut failure = None;
    for n in 100..400 {
        let response = ingest(&daemon, &key, exchange(n, 40));
        match response.status {
            202 => acked.extend(ids(&response.json())),
            503 => {
                failure = Some(response);
                break;
            }
            other => panic!("ingest on a full disk: {other} {}", response.text()),
        }
    }
    let failure = failure.expect("300 large ingests on a full 64 MiB disk never failed");
    eprintln!(
        "{} memories acknowledged, the last of them on the full disk, before a write failed",
        acked.len()
    );
    assert_eq!(
        failure.error_code(),
        "storage_unavailable",
        "{}",
        failure.text()
    );
    // Every later write is refused as well, until a restart.
    let again = ingest(&daemon, &key, exchange(500, 1));
    assert_eq!(
        again.error_code(),
        "storage_unavailable",
        "{}",
        again.text()
    );
    let ready = daemon.request("GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.error_code(), "storage_unavailable");
    let alive = daemon.request("GET", "/healthz", &[], b"");
    assert_eq!(
        alive.status, 503,
        "a store that needs a restart is not healthy"
    );
    assert_eq!(alive.error_code(), "storage_unavailable");
    let metrics = daemon.request("GET", "/metrics", &[], b"").text();
    assert_eq!(
        metric_value(&metrics, "memory_sidecar_storage_healthy"),
        Some(0.0)
    );

    // Reads go on.
    assert_recalls_locker(&daemon, &key, 3);
    let body =
        json!({"messages": [{"role": "user", "content": "What is my locker number for note 7?"}]});
    let first_read = daemon.call("POST", "/v1/memory/prepare", &idle, None, Some(&body));
    eprintln!(
        "an idle vault's first read after the failure: {}",
        first_read.status
    );
    // It finds the memory, or says it could not read it: left out and counted, or a 503.
    let unreadable = || {
        let metrics = daemon.request("GET", "/metrics", &[], b"").text();
        metric_value(&metrics, "memory_sidecar_unreadable_hits_total").unwrap_or(0.0)
    };
    match first_read.status {
        200 => assert!(
            first_read.text().contains("1007") || unreadable() > 0.0,
            "{}",
            first_read.text()
        ),
        _ => assert_eq!(
            first_read.error_code(),
            "storage_unavailable",
            "{}",
            first_read.text()
        ),
    }
    // Export goes on too, or says the store cannot serve it until the restart.
    let page = json!({"limit": 1000});
    let export = daemon.call("POST", "/v1/memory/search", &key, None, Some(&page));
    eprintln!("an export after the failure: {}", export.status);
    match export.status {
        200 => assert_all_kept(&daemon, &key, &acked, "after the failed write"),
        _ => assert_eq!(
            export.error_code(),
            "storage_unavailable",
            "{}",
            export.text()
        ),
    }

    // Space back, restart: everything acknowledged is there, and writes work again.
    daemon.kill9();
    disk.empty();
    let daemon = start(&data, &args, &["--min-free-mb", "0"]);
    assert_all_kept(&daemon, &key, &acked, "after the restart");
    let more = daemon.ingest(&key, None, exchange(600, 1));
    acked.extend(ids(&more));
    daemon.wait_indexed();
    assert_all_kept(&daemon, &key, &acked, "after a new ingest");
    assert_recalls_locker(&daemon, &key, 600);
}

/// Without `--keep-serving-after-storage-failure`, a store that needs a restart makes the
/// daemon drain and exit with code 3, which `Restart=on-failure` acts on; the restart (with room
/// again) finds every acknowledged memory.
#[test]
fn a_failed_store_makes_the_daemon_exit_with_code_3_for_a_restart() {
    let Some(disk) = SmallDisk::mount(64) else {
        return;
    };
    let (data, args) = data_args(&disk);
    let mut daemon = start(&data, &args, &["--min-free-mb", "0"]);
    let key = daemon.mint_key("pool");
    let mut acked = Vec::new();
    for n in 0..10 {
        acked.extend(ids(&daemon.ingest(&key, None, exchange(n, 1))));
    }
    disk.fill(0);
    let mut failed = false;
    for n in 100..400 {
        let Ok(response) = daemon.try_call(
            "POST",
            "/v1/memory/ingest",
            &key,
            None,
            Some(&json!({"messages": exchange(n, 40)})),
        ) else {
            failed = true; // already gone
            break;
        };
        match response.status {
            202 => acked.extend(ids(&response.json())),
            503 => {
                failed = true;
                break;
            }
            other => panic!("ingest on a full disk: {other} {}", response.text()),
        }
    }
    assert!(
        failed,
        "300 large ingests on a full 64 MiB disk never failed"
    );
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(3), "{}", daemon.stderr());
    assert!(
        daemon.stderr().contains("exiting with code 3"),
        "{}",
        daemon.stderr()
    );

    disk.empty();
    let daemon = start(&data, &args, &["--min-free-mb", "0"]);
    assert_all_kept(&daemon, &key, &acked, "after the restart");
}
