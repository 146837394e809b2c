//! In-process: `serve` answers 503 `not_ready` until the app has replayed and become ready.

mod common;

use common::InProcess;

#[test]
fn requests_before_ready_get_503_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = InProcess::open(dir.path(), &[]);
    let ready = daemon.request("GET", "/readyz", &[], b"");
    assert_eq!(
        (ready.status, ready.error_code().as_str()),
        (503, "not_ready")
    );
    assert_eq!(ready.header("retry-after"), Some("1"));
    let headers = [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer x"),
    ];
    let prepare = daemon.request(
        "POST",
        "/v1/memory/prepare",
        &headers,
        br#"{"messages": []}"#,
    );
    assert_eq!(
        (prepare.status, prepare.error_code().as_str()),
        (503, "not_ready")
    );
    assert_eq!(
        daemon.request("GET", "/healthz", &[], b"").status,
        200,
        "alive while not ready"
    );

    daemon.app.start().unwrap();
    daemon.wait_ready();
}
