//! The restore drill and the operator's command line, through the real binary: an online
//! backup under load, erasures, deletions and revocations after it, a restore that applies
//! the tombstone journal, and the restored daemon checked by its own `check`; damaged and
//! incomplete backups refused; the master key rewrapped; the subcommands on a stopped data
//! directory and against a running daemon.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::{Daemon, ADMIN_KEY, MASTER_KEY};
use serde_json::{json, Value};

struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs a subcommand of the daemon's binary with the harness's keys in its environment.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut command = Command::new(env!("CARGO_BIN_EXE_memory-sidecar"));
    for (name, _) in std::env::vars() {
        if name.starts_with("MEMORY_SIDECAR_") {
            command.env_remove(name);
        }
    }
    let output = command
        .env("MEMORY_SIDECAR_ADMIN_KEY", ADMIN_KEY)
        .env("MEMORY_SIDECAR_MASTER_KEY", MASTER_KEY)
        .env("MEMORY_SIDECAR_MODELS_DIR", common::models_dir())
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("running memory-sidecar");
    Ran {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn json_of(ran: &Ran) -> Value {
    assert!(ran.ok, "stdout:\n{}\nstderr:\n{}", ran.stdout, ran.stderr);
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", ran.stdout))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn contents(daemon: &Daemon, key: &str) -> HashSet<String> {
    daemon
        .export(key)
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

/// A key's id (the 16 hex digits after `mk_`) and its vault.
fn key_id(daemon: &Daemon, key: &str) -> (String, String) {
    let id = key[3..19].to_owned();
    let info = daemon.call("GET", &format!("/v1/keys/{id}"), ADMIN_KEY, None, None);
    assert_eq!(info.status, 200, "{}", info.text());
    let vault = info.json()["vault_id"].as_str().unwrap().to_owned();
    (id, vault)
}

#[test]
fn the_restore_drill_keeps_every_acknowledged_memory_and_every_erasure() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The journal on "another volume": outside the data directory.
    let journal = dir.path().join("elsewhere/tombstones");
    std::fs::create_dir_all(journal.parent().unwrap()).unwrap();
    let journal_flag = ["--tombstone-log", path(&journal)];
    let backups_flag = path(&dir.path().join("backups")).to_owned();
    let daemon = Daemon::start(
        &data,
        &[
            journal_flag[0],
            journal_flag[1],
            "--backup-dir",
            &backups_flag,
            "--key-rate-per-second",
            "0",
        ],
    );

    let alice = daemon.mint_key("alice");
    let bob = daemon.mint_key("bob");
    let carol = daemon.mint_key("carol");
    let (_, carol_vault) = key_id(&daemon, &carol);
    let carol_second = daemon
        .post_json(
            "/v1/keys",
            Some(ADMIN_KEY),
            None,
            &json!({"name": "carol's phone", "vault_id": carol_vault}),
        )
        .json()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (carol_second_id, _) = key_id(&daemon, &carol_second);
    let (_, bob_vault) = key_id(&daemon, &bob);
    let forgotten = daemon.ingest(
        &alice,
        None,
        json!([{"role": "user", "content": "alice's note to forget: the locker code is 4471"}]),
    );
    let forgotten_id = common::first_id(&forgotten);
    daemon.ingest(
        &bob,
        None,
        json!([{"role": "user", "content": "bob plays the cello"}]),
    );
    daemon.ingest(
        &carol,
        Some("trip"),
        json!([{"role": "user", "content": "carol's trip to Oslo in March"}]),
    );
    daemon.ingest(
        &carol,
        Some("home"),
        json!([{"role": "user", "content": "carol repainted the kitchen green"}]),
    );

    // Load: alice ingests throughout; what was acknowledged before the backup began must be
    // in the restore.
    let acknowledged = Mutex::new(Vec::new());
    let backup_started = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let backups = dir.path().join("backups");
    let backup = backups.join("first");
    let before_backup = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let text = format!("alice's running note number {n}");
                daemon.ingest(&alice, None, json!([{"role": "user", "content": text}]));
                let before = !backup_started.load(Ordering::SeqCst);
                acknowledged.lock().unwrap().push((text, before));
            }
        });
        while acknowledged.lock().unwrap().len() < 20 {
            std::thread::sleep(Duration::from_millis(10));
        }
        backup_started.store(true, Ordering::SeqCst);
        let listen = daemon.addr.to_string();
        let ran = cli(
            &[
                "backup",
                "--to",
                path(&backup),
                "--data-dir",
                path(&data),
                "--listen",
                &listen,
                "--backup-dir",
                &backups_flag,
                "--json",
            ],
            &[],
        );
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        let made = json_of(&ran);
        assert_eq!(made["path"], path(&backup));
        let elsewhere = cli(
            &[
                "backup",
                "--to",
                path(&dir.path().join("elsewhere/b")),
                "--data-dir",
                path(&data),
                "--listen",
                &listen,
                "--backup-dir",
                &backups_flag,
            ],
            &[],
        );
        assert!(
            !elsewhere.ok && elsewhere.stderr.contains("--backup-dir"),
            "{}",
            elsewhere.stderr
        );
        assert!(made["counts"]["memories"].as_u64().unwrap() >= 24, "{made}");
        assert!(made["writes_paused_ms"].is_u64(), "{made}");
        made
    });
    let before: Vec<String> = acknowledged
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, before)| *before)
        .map(|(text, _)| text.clone())
        .collect();
    assert!(before.len() >= 20);

    // After the backup: bob leaves, carol's second key is revoked, alice forgets a note, carol
    // deletes a session; and a memory only the old store holds.
    assert_eq!(
        daemon
            .call(
                "DELETE",
                &format!("/v1/vaults/{bob_vault}"),
                ADMIN_KEY,
                None,
                None
            )
            .status,
        200
    );
    let revoked = daemon.call(
        "DELETE",
        &format!("/v1/keys/{carol_second_id}"),
        ADMIN_KEY,
        None,
        None,
    );
    assert_eq!(revoked.status, 204, "{}", revoked.text());
    let deleted = daemon.call(
        "DELETE",
        &format!("/v1/memory/{forgotten_id}"),
        &alice,
        None,
        None,
    );
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    let session = daemon.call("DELETE", "/v1/memory", &carol, Some("trip"), None);
    assert_eq!(session.status, 200, "{}", session.text());
    daemon.sigterm();
    let mut daemon = daemon;
    assert!(daemon.wait_exit().success());

    // A damaged backup and an incomplete one are refused, and touch nothing.
    let damaged = dir.path().join("damaged");
    copy_dir(&backup, &damaged);
    let memories = damaged.join("trees/memories");
    let mut bytes = std::fs::read(&memories).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&memories, bytes).unwrap();
    let refused = restore_into(&damaged, &dir.path().join("x"));
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("trees/memories") && refused.stderr.contains("damaged"),
        "{}",
        refused.stderr
    );
    assert!(!dir.path().join("x").exists());
    std::fs::remove_file(damaged.join("manifest.json")).unwrap();
    let refused = restore_into(&damaged, &dir.path().join("x"));
    assert!(
        refused.stderr.contains("no manifest.json"),
        "{}",
        refused.stderr
    );

    // Without the journal a restore is refused, unless asked for in words; then it holds
    // what the backup held (as documented).
    let plain = dir.path().join("plain");
    let refused = restore_into(&backup, &plain);
    assert!(
        !refused.ok && refused.stderr.contains("--without-tombstones"),
        "{}",
        refused.stderr
    );
    assert!(!plain.exists());
    let restored = json_of(&cli(
        &[
            "restore",
            "--from",
            path(&backup),
            "--data-dir",
            path(&plain),
            "--without-tombstones",
            "--json",
        ],
        &[],
    ));
    assert_eq!(restored["restore"]["tombstone_log"], Value::Null);
    assert_eq!(restored["check"]["ok"], true, "{restored}");
    assert_eq!(restored["check"]["vaults"], 3);

    // With it: everything erased or revoked after the backup stays so.
    let new = dir.path().join("new");
    let restored = json_of(&cli(
        &[
            "restore",
            "--from",
            path(&backup),
            "--data-dir",
            path(&new),
            "--tombstone-log",
            path(&journal),
            "--json",
        ],
        &[],
    ));
    let report = &restored["restore"];
    assert_eq!(report["journal_matches"], true);
    assert_eq!(report["vaults_erased"], 1, "{report}");
    assert_eq!(report["keys_revoked"], 1, "{report}");
    assert_eq!(report["memories_deleted"], 2, "{report}");
    assert_eq!(restored["check"]["ok"], true, "{restored}");
    assert_eq!(restored["check"]["vaults"], 2);

    let daemon = Daemon::start(&new, &journal_flag);
    // New memories after a restore take new ids: none overwrites a restored one.
    for n in 0..30 {
        let text = format!("alice's note {n} after the restore");
        daemon.ingest(&alice, None, json!([{"role": "user", "content": text}]));
    }
    let alice_now = contents(&daemon, &alice);
    assert!(alice_now.contains("alice's note 29 after the restore"));
    for text in &before {
        assert!(
            alice_now.contains(text),
            "{text} was acknowledged before the backup"
        );
    }
    assert!(!alice_now.iter().any(|t| t.contains("locker code")));
    assert_eq!(
        daemon
            .call("POST", "/v1/memory/search", &bob, None, Some(&json!({})))
            .error_code(),
        "key_revoked"
    );
    assert_eq!(
        daemon
            .call(
                "GET",
                &format!("/v1/vaults/{bob_vault}"),
                ADMIN_KEY,
                None,
                None
            )
            .error_code(),
        "vault_not_found"
    );
    assert_eq!(
        daemon
            .call(
                "POST",
                "/v1/memory/search",
                &carol_second,
                None,
                Some(&json!({}))
            )
            .error_code(),
        "key_revoked"
    );
    let carol_now = contents(&daemon, &carol);
    assert!(carol_now.contains("carol repainted the kitchen green"));
    assert!(!carol_now.iter().any(|t| t.contains("Oslo")));
    // The restored daemon is served and passes its own check, asked over the admin API.
    let checked = json_of(&cli(
        &[
            "check",
            "--data-dir",
            path(&new),
            "--listen",
            &daemon.addr.to_string(),
            "--json",
        ],
        &[],
    ));
    assert_eq!(checked["ok"], true, "{checked}");
    assert!(checked["tombstones"].as_u64().unwrap() >= 4);
    assert_eq!(before_backup["tombstones_seq"], 0);
}

#[test]
fn the_command_line_works_on_a_stopped_data_directory_and_rewraps_the_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut daemon = Daemon::start(&data, &[]);
    let key = daemon.mint_key("first");
    daemon.ingest(
        &key,
        None,
        json!([{"role": "user", "content": "my bicycle is a blue Gazelle"}]),
    );
    daemon.wait_indexed();
    daemon.sigterm();
    assert!(daemon.wait_exit().success());
    let d = ["--data-dir", path(&data)];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter().chain(d.iter()).map(|s| s.to_string()).collect()
    };
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let args = with(args);
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>(), env)
    };

    // Offline: the command opens the directory itself.
    let minted = json_of(&run(&["keys", "mint", "--name", "second", "--json"], &[]));
    let vault = minted["key_info"]["vault_id"].as_str().unwrap().to_owned();
    let second = minted["key"].as_str().unwrap().to_owned();
    let listed = json_of(&run(&["keys", "list", "--json"], &[]));
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let human = run(&["keys", "list"], &[]);
    assert!(
        human.ok && human.stdout.starts_with("id\tvault_id\tstatus"),
        "{}",
        human.stdout
    );
    assert!(
        !listed.to_string().contains(&second),
        "never a secret in a list"
    );
    let second_id = minted["key_info"]["id"].as_str().unwrap().to_owned();
    let shown = json_of(&run(&["keys", "show", &second_id, "--json"], &[]));
    assert_eq!(shown["name"], "second");
    assert_eq!(shown["status"], "active");
    let rotated = json_of(&run(&["keys", "rotate", &second_id, "--json"], &[]));
    let second = rotated["key"].as_str().unwrap().to_owned();
    let shown = json_of(&run(&["keys", "show", &second_id, "--json"], &[]));
    assert_ne!(shown["status"], "active", "{shown}");
    let revoked = json_of(&run(&["keys", "revoke", &second_id, "--json"], &[]));
    assert_eq!(revoked["revoked"], second_id.as_str());
    let vaults = json_of(&run(&["vaults", "list", "--json"], &[]));
    assert_eq!(vaults.as_array().unwrap().len(), 2);
    let export = dir.path().join("export.jsonl");
    let first_vault = vaults
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["memories"] == 1)
        .unwrap()["vault_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        run(
            &["vaults", "export", &first_vault, "--out", path(&export)],
            &[]
        )
        .ok
    );
    let imported = json_of(&run(
        &["vaults", "import", &vault, path(&export), "--json"],
        &[],
    ));
    assert_eq!(imported["stored"], 1, "{imported}");
    let stats = json_of(&run(&["vaults", "stats", &vault, "--json"], &[]));
    assert_eq!(stats["memories"], 1);
    assert!(json_of(&run(&["check", "--json"], &[]))["ok"] == true);
    let offline = dir.path().join("offline/b1");
    let taken = json_of(&run(&["backup", "--to", path(&offline), "--json"], &[]));
    assert_eq!(taken["counts"]["memories"], 2, "{taken}");
    assert!(offline.join("manifest.json").exists());
    let config = run(&["config", "check"], &[]);
    assert!(config.ok, "{}", config.stderr);
    assert!(!config.stdout.contains(MASTER_KEY) && !config.stdout.contains(ADMIN_KEY));
    let refused = run(&["vaults", "erase", &vault], &[]);
    assert!(!refused.ok && refused.stderr.contains("--yes"));

    // Rewrap: the old master key no longer opens the keyring, the new one opens everything.
    let new_key = dir.path().join("new-master.key");
    let rewrapped = json_of(&run(
        &[
            "master-key",
            "rewrap",
            "--new-key-file",
            path(&new_key),
            "--json",
        ],
        &[],
    ));
    assert_eq!(rewrapped["rewrapped"], 2);
    let new_hex = std::fs::read_to_string(&new_key).unwrap();
    let old = Daemon::try_spawn(&data, &[]);
    assert!(old.is_err(), "the old master key must be refused");
    let daemon =
        Daemon::spawn_with_env(&data, &[], &[("MEMORY_SIDECAR_MASTER_KEY", new_hex.trim())]);
    daemon.wait_ready();
    let search = json!({"query": "what bicycle do I have?"});
    let found = daemon.call("POST", "/v1/memory/search", &second, None, Some(&search));
    assert!(found.text().contains("Gazelle"), "{}", found.text());

    // While the daemon runs, a command that would open the directory talks to it instead,
    // and one that needs it stopped says so.
    let online = run(
        &[
            "vaults",
            "list",
            "--json",
            "--listen",
            &daemon.addr.to_string(),
        ],
        &[("MEMORY_SIDECAR_MASTER_KEY", new_hex.trim())],
    );
    assert_eq!(json_of(&online).as_array().unwrap().len(), 2);
    let busy = run(
        &[
            "master-key",
            "rewrap",
            "--new-key-file",
            path(&dir.path().join("k3")),
        ],
        &[("MEMORY_SIDECAR_MASTER_KEY", new_hex.trim())],
    );
    assert!(
        !busy.ok && busy.stderr.contains("stop the daemon"),
        "{}",
        busy.stderr
    );
}

fn restore_into(from: &Path, data_dir: &Path) -> Ran {
    cli(
        &[
            "restore",
            "--from",
            path(from),
            "--data-dir",
            path(data_dir),
        ],
        &[],
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
