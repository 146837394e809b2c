//! What durability costs: one small write made durable by sled's own `flush` (which is
//! `sync_file_range`, not an fsync: FACTS.md), by that flush plus the `fdatasync` the group
//! commit adds, and the commit ledger's `pwrite` on top. `cargo bench --bench commit`.
//!
//! The group commit shares one flush and one fdatasync among every request waiting when it
//! starts, so under load the per-request cost is this figure divided by the batch.

use std::fs::File;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use memory_sidecar::store::ledger::Ledger;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("store"))
        .open()
        .unwrap();
    let tree = db.open_tree("memories").unwrap();
    let file = File::open(dir.path().join("store/db")).unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger"), 0).unwrap();
    let value = vec![0x42u8; 1024];
    let mut n: u64 = 0;

    let mut group = c.benchmark_group("durable_write_1kib");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(8));
    group.bench_function("sled_flush_only", |b| {
        b.iter(|| {
            n += 1;
            tree.insert(n.to_be_bytes(), value.as_slice()).unwrap();
            db.flush().unwrap();
        })
    });
    group.bench_function("sled_flush_and_fdatasync", |b| {
        b.iter(|| {
            n += 1;
            tree.insert(n.to_be_bytes(), value.as_slice()).unwrap();
            db.flush().unwrap();
            file.sync_data().unwrap();
        })
    });
    group.bench_function("sled_flush_fdatasync_and_ledger", |b| {
        b.iter(|| {
            n += 1;
            tree.insert(n.to_be_bytes(), value.as_slice()).unwrap();
            db.flush().unwrap();
            file.sync_data().unwrap();
            ledger.record(n).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
