//! Search latency by vault size, all through the ranking prepare uses
//! (`VaultIndex::search_hybrid`): dense similarity alone (weight 1, no neighbour lift) by exact
//! scan and by HNSW, and the full hybrid (BM25 over session windows + fusion) by both.
//! `cargo bench --bench index`. Also prints HNSW recall@10 against the exact scan, so speed is
//! not bought with misses.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use memory_sidecar::ids::MemoryId;
use memory_sidecar::index::{HybridParams, Ranked, VaultIndex};
use memory_sidecar::store::EntryMeta;
use memory_sidecar::vector::{UnitVector, DIM};

/// Deterministic pseudo-random unit vectors, clustered a little like real sentence embeddings
/// (a shared component plus noise), so that neighbours are not all equidistant.
fn vectors(count: usize, seed: u64) -> Vec<UnitVector> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let centres: Vec<Vec<f32>> = (0..64)
        .map(|_| (0..DIM).map(|_| next()).collect())
        .collect();
    (0..count)
        .map(|i| {
            let centre = &centres[i % centres.len()];
            let mut v: Vec<f32> = centre.iter().map(|c| c + 0.8 * next()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            UnitVector::new(v).expect("normalised")
        })
        .collect()
}

/// Dense similarity alone, through the public ranking: the exact scan, or the graph's.
const DENSE: HybridParams = HybridParams {
    dense_weight: 1.0,
    neighbour_weight: 0.0,
    min_similarity: f32::NEG_INFINITY,
    min_lexical: f32::NEG_INFINITY,
};

fn dense(index: &VaultIndex, query: &UnitVector) -> Vec<Ranked> {
    index.search_hybrid(query, &[], 10, &DENSE, None)
}

/// A word of a 5,000-word vocabulary, with a skew (low ranks are common, as in text).
fn word(seed: usize) -> String {
    let rank = (seed.wrapping_mul(2654435761) % 5000) * (seed % 7 + 1) / 7;
    format!("w{rank}")
}

fn bench(c: &mut Criterion) {
    let queries = vectors(64, 99);
    let mut group = c.benchmark_group("search_top10");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    // INDEX_BENCH_SIZES=20000,50000 narrows the run; under `cargo test` one small size only.
    let under_test = !std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = std::env::var("INDEX_BENCH_SIZES")
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|_| {
            if under_test {
                vec![1_000]
            } else {
                vec![1_000, 5_000, 10_000, 20_000, 50_000]
            }
        });
    let params = HybridParams {
        dense_weight: 0.6,
        neighbour_weight: 0.35,
        min_similarity: 0.25,
        min_lexical: 1.0,
    };
    let query_terms: Vec<Vec<(String, u32)>> = (0..64)
        .map(|i| {
            vec![
                (word(i * 7), 1),
                (word(i * 13 + 5), 1),
                (word(i * 31 + 2), 1),
            ]
        })
        .collect();
    for size in sizes {
        let mut index = VaultIndex::new();
        for (i, v) in vectors(size, size as u64).iter().enumerate() {
            // Sessions of 20 turns, 8-15 terms each from a 5,000-word vocabulary.
            let terms = (0..8 + i % 8)
                .map(|j| (word(i * 17 + j * 101), 1))
                .collect();
            let meta = EntryMeta {
                session_id: Some(format!("s{}", i / 20)),
                terms,
                ..EntryMeta::default()
            };
            index.insert_with_meta(MemoryId(i as u64), v, meta);
        }
        let mut q = 0;
        group.bench_with_input(BenchmarkId::new("hybrid", size), &index, |b, index| {
            b.iter(|| {
                q += 1;
                let at = q % queries.len();
                index.search_hybrid(&queries[at], &query_terms[at], 10, &params, None)
            })
        });
        group.bench_with_input(BenchmarkId::new("exact", size), &index, |b, index| {
            b.iter(|| {
                q += 1;
                dense(index, &queries[q % queries.len()])
            })
        });
        let exact: Vec<_> = queries.iter().map(|q| dense(&index, q)).collect();
        let started = Instant::now();
        index.build_graph_now();
        let build = started.elapsed();
        let mut found = 0;
        for (q, truth) in queries.iter().zip(&exact) {
            let got = dense(&index, q);
            found += truth
                .iter()
                .filter(|t| got.iter().any(|g| g.id == t.id))
                .count();
        }
        println!(
            "hnsw size={size}: build {:.2} s, recall@10 vs exact {:.3}",
            build.as_secs_f64(),
            found as f64 / (10 * queries.len()) as f64
        );
        group.bench_with_input(BenchmarkId::new("hnsw", size), &index, |b, index| {
            b.iter(|| {
                q += 1;
                dense(index, &queries[q % queries.len()])
            })
        });
        group.bench_with_input(BenchmarkId::new("hybrid_hnsw", size), &index, |b, index| {
            b.iter(|| {
                q += 1;
                let at = q % queries.len();
                index.search_hybrid(&queries[at], &query_terms[at], 10, &params, None)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
