//! Embedding throughput by batch size: the bare model (tokenized input, one ONNX session),
//! and tokenization alone. `cargo bench --bench embedding`.

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use memory_sidecar::config::GraphOptimization;
use memory_sidecar::embed::{load_session, load_tokenizer, run_batch, TOKENIZER_FILE};

/// 20-40-token sentences of the kind a chat produces.
const SENTENCES: &[&str] = &[
    "I just got back from a week of hiking in the Dolomites with my sister and her two kids.",
    "Can you remind me which restaurant we picked for my parents' anniversary dinner next month?",
    "My manager wants the quarterly report by Friday, but the data team still hasn't sent the numbers.",
    "I've been trying to cut down on coffee, so I'm switching to green tea in the afternoons.",
    "The vet said our dog needs a special diet because of his kidney problems, which is expensive.",
    "We're thinking about moving to Lisbon next year if my partner's remote job allows it.",
    "I started learning Japanese on an app, and I practise for twenty minutes every morning on the train.",
    "Last Tuesday I finally fixed the leaking kitchen tap myself after watching a couple of videos.",
];

fn models() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models"))
}

fn bench(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tokenizer = load_tokenizer(&models().join(TOKENIZER_FILE), 256).expect("tokenizer");
    let mut session = load_session(models(), threads, GraphOptimization::Basic, true)
        .expect("model (run `make models`)");
    let tokens: Vec<Vec<u32>> = SENTENCES
        .iter()
        .map(|s| tokenizer.encode(*s, true).unwrap().get_ids().to_vec())
        .collect();

    let mut group = c.benchmark_group("embed_batch");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(6));
    for batch in [1usize, 4, 8, 16, 32, 64] {
        let texts: Vec<&[u32]> = (0..batch)
            .map(|i| tokens[i % tokens.len()].as_slice())
            .collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &texts, |b, texts| {
            b.iter(|| run_batch(&mut session, texts).unwrap())
        });
    }
    group.finish();

    // ONNX Runtime options: graph optimisation level x intra-op threads, at batch 1 and 32.
    let mut group = c.benchmark_group("embed_options");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for level in [
        GraphOptimization::Basic,
        GraphOptimization::Extended,
        GraphOptimization::All,
    ] {
        for option_threads in [1, threads] {
            let mut session = load_session(models(), option_threads, level, true).expect("model");
            for batch in [1usize, 32] {
                let texts: Vec<&[u32]> = (0..batch)
                    .map(|i| tokens[i % tokens.len()].as_slice())
                    .collect();
                group.throughput(Throughput::Elements(batch as u64));
                let id = format!("{level:?}/threads={option_threads}/batch={batch}").to_lowercase();
                group.bench_function(id, |b| b.iter(|| run_batch(&mut session, &texts).unwrap()));
            }
        }
    }
    group.finish();

    let mut group = c.benchmark_group("tokenize");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_sentence", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            tokenizer
                .encode(SENTENCES[i % SENTENCES.len()], true)
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
