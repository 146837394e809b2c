//! In-process: `serve` answers 503 `not_ready` until the app has replayed and become ready.

mod common;

use std::sync::Arc;

use clap::Parser;
use memory_sidecar::app::App;
use memory_sidecar::auth::AdminKey;
use memory_sidecar::config::Flags;
use memory_sidecar::metrics::Metrics;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_ready_get_503_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::models_dir();
    let flags = Flags::try_parse_from([
        "memory-sidecar".as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
        "--models-dir".as_ref(),
        models.as_os_str(),
    ])
    .unwrap();
    let app = App::open(
        flags.validate().unwrap(),
        AdminKey::new(common::ADMIN_KEY).unwrap(),
        Metrics::new().unwrap(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(memory_sidecar::http::serve(app.clone(), listener, async {
        let _ = stopped.await;
    }));

    let get = move |path: &'static str| {
        tokio::task::spawn_blocking(move || {
            common::try_request(addr, "GET", path, &[], b"").unwrap()
        })
    };
    let ready = get("/readyz").await.unwrap();
    assert_eq!(
        (ready.status, ready.error_code().as_str()),
        (503, "not_ready")
    );
    assert_eq!(ready.header("retry-after"), Some("1"));
    let headers = [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer x"),
    ];
    let prepare = tokio::task::spawn_blocking(move || {
        common::try_request(
            addr,
            "POST",
            "/v1/memory/prepare",
            &headers,
            br#"{"messages": []}"#,
        )
        .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        (prepare.status, prepare.error_code().as_str()),
        (503, "not_ready")
    );
    assert_eq!(
        get("/healthz").await.unwrap().status,
        200,
        "alive while not ready"
    );

    Arc::clone(&app).start().unwrap();
    let started = std::time::Instant::now();
    while get("/readyz").await.unwrap().status != 200 {
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    app.close().unwrap();
}
