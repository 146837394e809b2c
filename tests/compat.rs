//! What MemoryRouter's clients rely on, through the real daemon: long messages stored as
//! passages and found in their middle, sessions shared by default and isolated on request,
//! header fallbacks, MemoryRouter's field names. (`tests/clients.rs` runs the clients
//! themselves against the daemon; these checks need no Python.)

mod common;

use common::{first_id, memory_ids, Client, Daemon, ADMIN_KEY};
use serde_json::{json, Value};

fn user(content: &str) -> Value {
    json!({"role": "user", "content": content})
}

/// Filler sentences of a pasted document, none about the fact asked for.
fn filler(sentences: usize, seed: usize) -> String {
    const TOPICS: &[&str] = &[
        "The quarterly report covers revenue in the northern region",
        "Our team reviewed the onboarding checklist for new engineers",
        "The weather in the valley stayed mild through the autumn",
        "A committee will decide the budget for the library renovation",
        "The train timetable changes twice a year in spring and autumn",
        "Several volunteers painted the fence around the community garden",
    ];
    (0..sentences)
        .map(|n| format!("{} (note {}).", TOPICS[(n + seed) % TOPICS.len()], n + seed))
        .collect::<Vec<_>>()
        .join(" ")
}

fn mint(daemon: &Client, body: Value) -> (String, Value) {
    let response = daemon.post_json("/v1/keys", Some(ADMIN_KEY), None, &body);
    assert_eq!(response.status, 201, "{}", response.text());
    let answer = response.json();
    (answer["key"].as_str().unwrap().to_owned(), answer)
}

#[test]
fn a_fact_in_the_middle_of_a_long_message_is_found_and_shown_as_its_passage() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let (key, _) = mint(&daemon, json!({"name": "user:long"}));
    let fact = "My passport number is stored in the blue folder under the piano bench.";
    let document = format!("{} {fact} {}", filler(25, 0), filler(25, 3));
    assert!(document.chars().count() > 2500);
    let system = format!(
        "You are a careful assistant. {}",
        "Follow the rules. ".repeat(2500)
    );
    let reply = format!("```\n{}\n```", "let x = compute(y);\n".repeat(1500));
    let stored = daemon.ingest(
        &key,
        Some("paste"),
        json!([
            {"role": "system", "content": system},
            user(&document),
            {"role": "assistant", "content": reply},
        ]),
    );
    let stored_count = stored["stored"].as_u64().unwrap();
    assert!(
        stored_count > 10,
        "the document and the reply, as passages: {stored}"
    );
    daemon.wait_indexed();
    let answer = daemon.prepare(&key, None, "Where is my passport number kept?");
    let context = answer["context"].as_str().unwrap_or_default();
    assert!(
        context.contains("blue folder under the piano bench"),
        "{answer}"
    );
    assert!(context.contains("of a longer message"), "{context}");
    let top = &answer["memories"][0];
    assert!(
        top["content"].as_str().unwrap().contains("piano bench"),
        "{answer}"
    );
    assert!(top["part"]["count"].as_u64().unwrap() > 2, "{top}");
    assert!(
        top["content"].as_str().unwrap().chars().count() <= 1000,
        "the passage, not the document: {top}"
    );
    assert_eq!(
        answer["memories_found"],
        answer["memories"].as_array().unwrap().len()
    );
    // The system prompt was never stored.
    let export = daemon.export(&key);
    assert!(export.iter().all(|m| m["role"] != "system"));
    assert_eq!(export.len() as u64, stored_count);
    // Retried whole, the long message is stored once.
    let again = daemon.ingest(&key, Some("paste"), json!([user(&document)]));
    assert_eq!(again["stored"], 0, "{again}");
}

#[test]
fn sessions_are_shared_by_default_and_isolated_on_request_or_by_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let question = "What is my locker combination?";
    let fact = "My gym locker combination is 4417.";
    for (name, isolated_key) in [("shared", false), ("isolated", true)] {
        let (key, _) = mint(
            &daemon,
            json!({"name": name, "session_isolation": isolated_key}),
        );
        let id = first_id(&daemon.ingest(&key, Some("session-a"), json!([user(fact)])));
        daemon.wait_indexed();
        let in_a = daemon.prepare(&key, Some("session-a"), question);
        assert!(memory_ids(&in_a).contains(&id), "{name}: {in_a}");
        let in_b = daemon.prepare(&key, Some("session-b"), question);
        assert_eq!(
            memory_ids(&in_b).contains(&id),
            !isolated_key,
            "{name}: session b {in_b}"
        );
        // The request's own say wins over the key's default, either way.
        let flipped = if isolated_key { "off" } else { "on" };
        let body = json!({"messages": [user(question)]});
        let headers = [
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Bearer {key}")),
            ("X-Session-ID", "session-b"),
            ("X-Session-Isolation", flipped),
        ];
        let answer = daemon
            .request(
                "POST",
                "/v1/memory/prepare",
                &headers,
                body.to_string().as_bytes(),
            )
            .json();
        assert_eq!(
            memory_ids(&answer).contains(&id),
            isolated_key,
            "{name} flipped"
        );
        // Search honours the header too; a confined search cannot ask for another session.
        let search = json!({"query": question, "limit": 5});
        let found = daemon.call(
            "POST",
            "/v1/memory/search",
            &key,
            Some("session-b"),
            Some(&search),
        );
        let ids: Vec<String> = memory_ids(&found.json());
        assert_eq!(ids.contains(&id), !isolated_key, "{name} search");
        if isolated_key {
            let other = json!({"query": question, "session_id": "session-a"});
            let refused = daemon.call(
                "POST",
                "/v1/memory/search",
                &key,
                Some("session-b"),
                Some(&other),
            );
            assert_eq!(refused.error_code(), "invalid_request");
        }
    }
}

#[test]
fn memoryrouter_requests_and_fields_are_understood() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    // A key minted with no name and no scopes: named New Key, and able to erase its own data.
    let minted = daemon.post_json("/v1/keys", Some(ADMIN_KEY), None, &json!({}));
    assert_eq!(minted.status, 201, "{}", minted.text());
    let minted = minted.json();
    assert_eq!(minted["name"], "New Key");
    assert!(minted["created_at"].is_string());
    assert_eq!(
        minted["key_info"]["scopes"],
        json!(["read", "write", "delete"])
    );
    let key = minted["key"].as_str().unwrap().to_owned();

    // An empty X-Memory-Key falls through to Authorization; a provider key in X-Memory-Key
    // falls through to x-api-key.
    let body = json!({"messages": [user("I keep bees on the roof.")]}).to_string();
    let bearer = format!("Bearer {key}");
    let headers = [("X-Memory-Key", ""), ("Authorization", bearer.as_str())];
    let stored = daemon.request("POST", "/v1/memory/ingest", &headers, body.as_bytes());
    assert_eq!(
        stored.status,
        202,
        "no Content-Type is JSON: {}",
        stored.text()
    );
    let headers = [
        ("X-Memory-Key", "sk-provider-key"),
        ("x-api-key", key.as_str()),
    ];
    let answered = daemon.request("POST", "/v1/memory/prepare", &headers, body.as_bytes());
    assert_eq!(answered.status, 200, "{}", answered.text());

    // X-Memory-Mode read and X-Memory-Store false store nothing.
    for (name, value) in [("X-Memory-Mode", "read"), ("X-Memory-Store", "false")] {
        let json_headers = [
            ("Content-Type", "application/json"),
            ("Authorization", bearer.as_str()),
            (name, value),
        ];
        let body = json!({"messages": [user(&format!("Never store this ({name}).") )]});
        let answer = daemon.request(
            "POST",
            "/v1/memory/ingest",
            &json_headers,
            body.to_string().as_bytes(),
        );
        assert_eq!(answer.status, 202);
        assert_eq!(answer.json()["stored"], 0, "{name}: {value}");
    }

    // Upload as MemoryRouter's Open WebUI uploader sends it: text/plain, system lines taken.
    let lines = [
        json!({"content": "I moved to Porto in 2024.", "role": "user", "timestamp": 1_717_000_000_000u64}),
        json!({"content": "Always answer in Portuguese.", "role": "system"}),
    ]
    .map(|l| l.to_string())
    .join("\n");
    let upload_headers = [
        ("Content-Type", "text/plain"),
        ("Authorization", bearer.as_str()),
    ];
    let uploaded = daemon.request(
        "POST",
        "/v1/memory/upload",
        &upload_headers,
        lines.as_bytes(),
    );
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    let uploaded = uploaded.json();
    assert_eq!(uploaded["status"], "complete", "{uploaded}");
    assert_eq!(uploaded["stats"]["stored"], 2);
    let untyped = daemon.request(
        "POST",
        "/v1/memory/upload",
        &[("Authorization", bearer.as_str())],
        b"{\"content\": \"I play the cello on Sundays.\"}",
    );
    assert_eq!(untyped.json()["stats"]["stored"], 1, "{}", untyped.text());

    // Stats, warmup and health answer MemoryRouter's fields.
    daemon.wait_indexed();
    let stats = daemon
        .call("GET", "/v1/memory/stats", &key, None, None)
        .json();
    assert_eq!(stats["memories"], stats["count"]);
    assert!(stats["total_tokens"].as_u64().unwrap() > 10, "{stats}");
    let warm = daemon
        .call("POST", "/v1/memory/warmup", &key, None, None)
        .json();
    assert_eq!(warm["status"], "warm");
    assert_eq!(warm["memories"], stats["count"]);
    let health = daemon.request("GET", "/health", &[], b"").json();
    assert_eq!(health["status"], "healthy");

    // context_limit is the memory count; a forwarded max_tokens does not shrink the context;
    // density scales the count (low halves the default 10, xhigh quadruples it).
    let hobbies: Vec<Value> = [
        "painting",
        "chess",
        "cycling",
        "baking",
        "hiking",
        "knitting",
        "climbing",
        "pottery",
        "surfing",
        "gardening",
        "archery",
        "origami",
    ]
    .iter()
    .map(|hobby| {
        user(&format!(
            "One of my hobbies is {hobby}, which I do every weekend."
        ))
    })
    .collect();
    daemon.ingest(&key, None, Value::Array(hobbies));
    daemon.wait_indexed();
    let prepare = |extra: Value| {
        let mut body = json!({"messages": [user("What hobbies do I do every weekend?")]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        daemon
            .call("POST", "/v1/memory/prepare", &key, None, Some(&body))
            .json()
    };
    let one = prepare(json!({"context_limit": 1, "max_tokens": 4}));
    assert_eq!(one["memories_found"], 1, "{one}");
    let low = prepare(json!({"density": "low"}))["memories_found"]
        .as_u64()
        .unwrap();
    let high = prepare(json!({"density": "xhigh"}))["memories_found"]
        .as_u64()
        .unwrap();
    assert!(low <= 5 && high > 10, "low {low}, xhigh {high}");

    // Account deletion as documented: the user's own key, and reset=true.
    let erased = daemon.call("DELETE", "/v1/memory?reset=true", &key, Some("any"), None);
    assert_eq!(erased.status, 200, "{}", erased.text());
    assert!(erased.json()["deleted"].as_u64().unwrap() >= 16);
    assert!(daemon.export(&key).is_empty());
}

#[test]
fn a_memory_key_mints_only_into_its_own_vault_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let (account, answer) = mint(
        &daemon,
        json!({"name": "account", "scopes": ["read", "write", "delete", "admin"]}),
    );
    let refused = daemon.post_json("/v1/keys", Some(&account), None, &json!({"name": "user:1"}));
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (400, "vault_id_required"),
        "{}",
        refused.text()
    );
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("admin key"));
    let vault = answer["key_info"]["vault_id"].clone();
    let own = daemon.post_json(
        "/v1/keys",
        Some(&account),
        None,
        &json!({"name": "user:1", "vault_id": vault}),
    );
    assert_eq!(own.status, 201, "{}", own.text());
    // Two users minted by the admin key are two vaults.
    let (a, a_info) = mint(&daemon, json!({"name": "user:a"}));
    let (b, b_info) = mint(&daemon, json!({"name": "user:b"}));
    assert_ne!(
        a_info["key_info"]["vault_id"],
        b_info["key_info"]["vault_id"]
    );
    let id = first_id(&daemon.ingest(&a, None, json!([user("My cat is called Miso.")])));
    daemon.wait_indexed();
    assert!(!memory_ids(&daemon.prepare(&b, None, "What is my cat called?")).contains(&id));
}
