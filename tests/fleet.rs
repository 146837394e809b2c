//! The fleet for real: PostgreSQL 15 (a primary and a synchronous standby, as the `postgres`
//! user when run as root), three daemons on it, nginx in front routing by key id. The
//! scenarios of docs/fleet.md run one after the other on one fleet, under a load through nginx;
//! at the end every acknowledged ingest is read back through every node and through nginx, no
//! memory is in another vault, and each node's index holds what the store holds.
//!
//! `make test` runs it small; `FLEET_SCALE=10 cargo test --release --test fleet -- --nocapture`
//! runs it ten times longer (more keys, more load, a 10 s database outage).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fleet::{fleet_tools_missing, free_ports, multi_host_url, Nginx, Postgres};
use common::{env_or, skip, Client, Daemon, ADMIN_KEY};
use serde_json::{json, Value};

/// What the load was told: per key, every acknowledged memory id and its text.
#[derive(Default)]
struct Acked {
    memories: BTreeMap<String, BTreeMap<String, String>>,
    /// Every status the load saw, with how often.
    statuses: BTreeMap<u16, usize>,
}

impl Acked {
    fn record(&mut self, key: String, id: String, text: String) {
        self.memories.entry(key).or_default().insert(id, text);
    }
}

struct Fleet {
    root: tempfile::TempDir,
    url: String,
    nodes: Vec<Option<Daemon>>,
    nginx: Nginx,
}

impl Fleet {
    fn node_args(&self) -> Vec<String> {
        vec![
            "--store".into(),
            self.url.clone(),
            "--store-lease-ms".into(),
            "2000".into(),
            "--store-connect-timeout-ms".into(),
            "1000".into(),
        ]
    }

    fn start_node(&self, index: usize) -> Daemon {
        let dir = self.root.path().join(format!("node{index}"));
        let args = self.node_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(&dir, &args)
    }

    fn backends(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flatten()
            .map(|node| node.addr.to_string())
            .collect()
    }

    fn front(&self) -> Client {
        Client {
            addr: self.nginx.addr(),
        }
    }

    fn live(&self) -> Vec<&Daemon> {
        self.nodes.iter().flatten().collect()
    }
}

fn ingest_body(key_index: usize, n: usize) -> (Value, String) {
    let text = format!(
        "vault{key_index} fact {n}: my reference number {key_index}-{n} is kept in drawer {}",
        n % 7
    );
    (
        json!({"messages": [{"role": "user", "content": text}]}),
        text,
    )
}

/// Ingests through nginx until `stop`, round-robin over the keys, recording what was acked.
fn load(
    front: Client,
    keys: Vec<(usize, String)>,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 100_000;
        while !stop.load(Ordering::Relaxed) {
            for (index, key) in &keys {
                n += 1;
                let (body, text) = ingest_body(*index, n);
                let status =
                    match front.try_call("POST", "/v1/memory/ingest", key, None, Some(&body)) {
                        Ok(response) => {
                            if response.status == 202 {
                                let id = response.json()["ids"][0].as_str().unwrap().to_owned();
                                acked.lock().unwrap().record(key.clone(), id, text);
                            } else if response.status == 503 {
                                assert!(
                                    response.header("retry-after").is_some(),
                                    "a 503 says when to retry: {}",
                                    response.text()
                                );
                            }
                            response.status
                        }
                        Err(_) => 0,
                    };
                *acked.lock().unwrap().statuses.entry(status).or_default() += 1;
                // A prepare between ingests, as a gateway does.
                let _ = front.try_call(
                    "POST",
                    "/v1/memory/prepare",
                    key,
                    None,
                    Some(&json!({"messages": [{"role": "user", "content": "which drawer?"}]})),
                );
            }
        }
    })
}

/// Every memory of the key's vault through `client`: (id, text) pairs.
fn export(client: &Client, key: &str) -> BTreeMap<String, String> {
    client
        .export(key)
        .into_iter()
        .map(|memory| {
            (
                memory["id"].as_str().unwrap().to_owned(),
                memory["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Retries a request while the answer is 503 (the database coming back), up to a deadline.
fn until_served(what: &str, mut call: impl FnMut() -> common::Response) -> common::Response {
    let started = Instant::now();
    loop {
        let response = call();
        if response.status != 503 {
            return response;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: still 503 after 60 s: {}",
            response.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_fleet_on_postgresql_survives_losing_a_node_the_database_and_the_primary() {
    if let Some(missing) = fleet_tools_missing() {
        return skip(&missing);
    }
    let scale: usize = env_or("FLEET_SCALE", 1);
    let root = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let mut primary = Postgres::init_primary(root.path(), ports[0]);
    let standby = Postgres::standby_of(&primary, root.path(), ports[1], "standby1");
    let url = multi_host_url(&[&primary, &standby]);
    let mut fleet = Fleet {
        nginx: Nginx::start(root.path(), ports[2], &["127.0.0.1:9".to_owned()]),
        root,
        url,
        nodes: Vec::new(),
    };
    for index in 0..3 {
        let node = fleet.start_node(index);
        fleet.nodes.push(Some(node));
    }
    let backends = fleet.backends();
    fleet.nginx.reload(&backends);
    let front = fleet.front();

    // Keys minted through nginx (any node), each vault filled through nginx.
    let keys: Vec<(usize, String)> = (0..3 * scale)
        .map(|i| (i, front.mint_key(&format!("user{i}"))))
        .collect();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(
        front_client(&fleet),
        keys.clone(),
        acked.clone(),
        stop.clone(),
    );

    // 1. Baseline: a write on one node is read on another at once.
    let (body, text) = ingest_body(0, 1);
    let on_first = fleet.live()[0].post_json("/v1/memory/ingest", Some(&keys[0].1), None, &body);
    assert_eq!(on_first.status, 202, "{}", on_first.text());
    let id = on_first.json()["ids"][0].as_str().unwrap().to_owned();
    acked
        .lock()
        .unwrap()
        .record(keys[0].1.clone(), id.clone(), text);
    let found = fleet.live()[1].prepare_until_found(&keys[0].1, None, "reference number 0-1", &id);
    assert!(found["context"].as_str().unwrap().contains("0-1"));
    std::thread::sleep(Duration::from_secs(2 * scale as u64));

    // 5. A key revoked on one node is refused by another at once; a vault erased on one
    // node is gone on another at once.
    let doomed = fleet.live()[0].mint_key("doomed");
    let doomed_id = &doomed[3..19];
    assert_eq!(
        fleet.live()[2].prepare(&doomed, None, "anything")["memories"],
        json!([])
    );
    let revoked = fleet.live()[0].call(
        "DELETE",
        &format!("/v1/keys/{doomed_id}"),
        ADMIN_KEY,
        None,
        None,
    );
    assert_eq!(revoked.status, 204, "{}", revoked.text());
    let refused = fleet.live()[1].post_json(
        "/v1/memory/prepare",
        Some(&doomed),
        None,
        &json!({"messages": [{"role": "user", "content": "anything"}]}),
    );
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert_eq!(refused.error_code(), "key_revoked");
    let erased_key = fleet.live()[0].mint_key("erased");
    let (body, _) = ingest_body(99, 1);
    let stored = fleet.live()[0].post_json("/v1/memory/ingest", Some(&erased_key), None, &body);
    assert_eq!(stored.status, 202);
    let erased_id = stored.json()["ids"][0].as_str().unwrap().to_owned();
    fleet.live()[2].prepare_until_found(&erased_key, None, "reference number 99-1", &erased_id);
    let erased = fleet.live()[1].call("DELETE", "/v1/memory", &erased_key, None, None);
    assert_eq!(erased.status, 200, "{}", erased.text());
    assert!(
        fleet.live()[2].export(&erased_key).is_empty(),
        "an erased vault is empty on every node at once"
    );
    assert_eq!(
        fleet.live()[2].prepare(&erased_key, None, "reference number 99-1")["memories"],
        json!([]),
        "and its index too"
    );

    // 2. A node killed with memories it stored but had not embedded: another node embeds
    // them once its lease runs out. Restarted after; again every few seconds at a larger scale.
    for round in 0..scale {
        let victim = fleet.nodes[2].take().unwrap();
        let mut orphans = Vec::new();
        for n in 0..5 {
            let (body, text) = ingest_body(1, 50 + 10 * round + n);
            let response = victim.post_json("/v1/memory/ingest", Some(&keys[1].1), None, &body);
            assert_eq!(response.status, 202);
            let id = response.json()["ids"][0].as_str().unwrap().to_owned();
            acked
                .lock()
                .unwrap()
                .record(keys[1].1.clone(), id.clone(), text);
            orphans.push(id);
        }
        victim.kill9();
        let backends = fleet.backends();
        fleet.nginx.reload(&backends);
        let last = orphans.last().unwrap().clone();
        let question = format!("reference number 1-{}", 54 + 10 * round);
        fleet.live()[0].prepare_until_found(&keys[1].1, None, &question, &last);
        fleet.nodes[2] = Some(fleet.start_node(2));
        let backends = fleet.backends();
        fleet.nginx.reload(&backends);
    }

    // 4. A node added under load, then one removed.
    fleet.nodes.push(Some(fleet.start_node(3)));
    let backends = fleet.backends();
    fleet.nginx.reload(&backends);
    std::thread::sleep(Duration::from_secs(2 * scale as u64));
    let removed = fleet.nodes[0].take().unwrap();
    let backends = fleet.backends();
    fleet.nginx.reload(&backends);
    removed.sigterm();
    std::thread::sleep(Duration::from_secs(scale as u64));

    // 6. The database stopped: 503 with Retry-After (checked by the load), no 500, no crash;
    // service resumes by itself.
    primary.stop();
    let key = &keys[0].1;
    let away = fleet.live()[0].post_json(
        "/v1/memory/prepare",
        Some(key),
        None,
        &json!({"messages": [{"role": "user", "content": "drawer"}]}),
    );
    assert_eq!(away.status, 503, "{}", away.text());
    assert_eq!(away.error_code(), "storage_unavailable");
    assert!(away.header("retry-after").is_some());
    std::thread::sleep(Duration::from_secs(if scale > 1 { 10 } else { 3 }));
    primary.start();
    let (body, text) = ingest_body(0, 2);
    let back = until_served("an ingest after the outage", || {
        fleet.live()[0].post_json("/v1/memory/ingest", Some(key), None, &body)
    });
    assert_eq!(back.status, 202, "{}", back.text());
    let id = back.json()["ids"][0].as_str().unwrap().to_owned();
    acked.lock().unwrap().record(key.clone(), id, text);
    std::thread::sleep(Duration::from_secs(scale as u64));

    // 3. The primary killed under load, the standby promoted: the nodes follow it, and
    // nothing acknowledged is lost (the standby confirmed every commit).
    primary.kill9();
    std::thread::sleep(Duration::from_millis(500));
    standby.promote();
    until_served("a prepare after the promotion", || {
        fleet.live()[0].post_json(
            "/v1/memory/prepare",
            Some(key),
            None,
            &json!({"messages": [{"role": "user", "content": "drawer"}]}),
        )
    });
    std::thread::sleep(Duration::from_secs(2 * scale as u64));
    stop.store(true, Ordering::Relaxed);
    loader.join().expect("the load thread");

    let acked = acked.lock().unwrap();
    eprintln!("load statuses: {:?}", acked.statuses);
    for status in acked.statuses.keys() {
        assert!(
            [0, 202, 503].contains(status),
            "the load saw {status}: {:?}",
            acked.statuses
        );
    }
    assert!(acked.statuses.get(&202).copied().unwrap_or(0) > 10);

    // Every acknowledged memory, read back through every node and through nginx; nothing of
    // another vault; each node's index holding what the store holds.
    let mut clients: Vec<Client> = fleet
        .live()
        .iter()
        .map(|n| Client { addr: n.addr })
        .collect();
    clients.push(fleet.front());
    for (index, key) in &keys {
        let wanted = acked.memories.get(key).cloned().unwrap_or_default();
        let stored = until_served("an export", || {
            clients[0].call(
                "POST",
                "/v1/memory/search",
                key,
                None,
                Some(&json!({"limit": 1})),
            )
        });
        assert_eq!(stored.status, 200);
        for client in &clients {
            let exported = export(client, key);
            for (id, text) in &wanted {
                assert_eq!(
                    exported.get(id),
                    Some(text),
                    "acknowledged memory {id} of user{index} is missing through {}",
                    client.addr
                );
            }
            let marker = format!("vault{index} ");
            for text in exported.values() {
                assert!(text.starts_with(&marker), "user{index} sees {text:?}");
            }
        }
        wait_embedded(&clients[0], key);
        let count = export(&clients[0], key).len();
        for client in &clients {
            let warm = client.call("POST", "/v1/memory/warmup", key, None, Some(&json!({})));
            assert_eq!(warm.status, 200, "{}", warm.text());
            assert_eq!(
                warm.json()["memories"].as_u64(),
                Some(count as u64),
                "the index of user{index} on {} holds what the store holds",
                client.addr
            );
        }
    }
    let distinct: BTreeSet<&String> = acked.memories.values().flat_map(|m| m.keys()).collect();
    eprintln!(
        "{} acknowledged memories in {} vaults, all read back through {} nodes and nginx",
        distinct.len(),
        keys.len(),
        clients.len() - 1
    );
}

fn front_client(fleet: &Fleet) -> Client {
    fleet.front()
}

/// Waits until the vault has nothing left to embed.
fn wait_embedded(client: &Client, key: &str) {
    let started = Instant::now();
    loop {
        let warm = client.call("POST", "/v1/memory/warmup", key, None, Some(&json!({})));
        if warm.status == 200 && warm.json()["pending"] == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "still embedding after 120 s: {}",
            warm.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The operator's restore drill on PostgreSQL's own backup: a base backup taken, then a vault
/// emptied and a key revoked; the backup restored and the node's tombstones applied from the
/// backup's moment: the emptied vault stays empty, the revoked key stays refused, the rest is
/// back.
#[test]
fn a_base_backup_restored_keeps_later_erasures_and_revocations() {
    if let Some(missing) = fleet_tools_missing() {
        return skip(&missing);
    }
    let root = tempfile::tempdir().unwrap();
    let ports = free_ports(2);
    let primary = Postgres::init_primary(root.path(), ports[0]);
    let node_dir = root.path().join("node");
    let url = primary.url();
    let node = Daemon::start(&node_dir, &["--store", &url]);
    let (kept, emptied, revoked) = (
        node.mint_key("kept"),
        node.mint_key("emptied"),
        node.mint_key("revoked"),
    );
    let mut ids = BTreeMap::new();
    for (index, key) in [&kept, &emptied, &revoked].into_iter().enumerate() {
        let (body, _) = ingest_body(index, 1);
        let response = node.post_json("/v1/memory/ingest", Some(key), None, &body);
        assert_eq!(response.status, 202);
        ids.insert(
            index,
            response.json()["ids"][0].as_str().unwrap().to_owned(),
        );
    }
    let since = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let mut backup = Postgres::base_backup_of(&primary, root.path(), ports[1]);
    let emptied_now = node.call("DELETE", "/v1/memory", &emptied, None, None);
    assert_eq!(emptied_now.status, 200, "{}", emptied_now.text());
    let revoked_id = &revoked[3..19];
    let revoked_now = node.call(
        "DELETE",
        &format!("/v1/keys/{revoked_id}"),
        ADMIN_KEY,
        None,
        None,
    );
    assert_eq!(revoked_now.status, 204, "{}", revoked_now.text());
    drop(node);
    drop(primary);

    backup.start();
    let restored_url = backup.url();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_memory-sidecar"))
        .env("MEMORY_SIDECAR_MASTER_KEY", common::MASTER_KEY)
        .env("MEMORY_SIDECAR_ADMIN_KEY", ADMIN_KEY)
        .arg("apply-tombstones")
        .args(["--store", &restored_url, "--since", &since, "--json"])
        .arg("--data-dir")
        .arg(&node_dir)
        .arg("--journal")
        .arg(node_dir.join("tombstones"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "apply-tombstones: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let applied: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(applied["vaults_emptied"], 1, "{applied}");
    assert_eq!(applied["keys_revoked"], 1, "{applied}");

    let node = Daemon::start(&root.path().join("node-after"), &["--store", &restored_url]);
    assert_eq!(
        export(&node, &kept).keys().collect::<Vec<_>>(),
        [&ids[&0]],
        "what was neither erased nor revoked is back"
    );
    assert!(
        export(&node, &emptied).is_empty(),
        "the emptied vault stays empty"
    );
    let refused = node.post_json(
        "/v1/memory/prepare",
        Some(&revoked),
        None,
        &json!({"messages": [{"role": "user", "content": "anything"}]}),
    );
    assert_eq!(refused.error_code(), "key_revoked", "{}", refused.text());
}
