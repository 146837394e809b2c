//! Embedding throughput by batch size: the bare model (tokenized input, one ONNX session),
//! and tokenization alone. `cargo bench --bench embedding`.
//!
//! `BENCH_OTHER_MODELS_DIR=DIR` adds the group `embed_model_ab`: this models directory's model
//! and DIR's (another `model.onnx` beside the same runtime and tokenizer), both run the daemon's
//! way, one after the other at each batch size in one process, so that their ratio is measured in
//! one run.

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use memory_sidecar::config::{Config, EmbedConfig, GraphOptimization};
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
    // The model run as the daemon runs it; the option sweep below varies one setting at a time.
    let daemon = Config::from_environment().expect("configuration").embed;
    let threads = daemon.threads;
    let tokenizer =
        load_tokenizer(&models().join(TOKENIZER_FILE), daemon.max_text_tokens).expect("tokenizer");
    let mut session = load_session(models(), &daemon).expect("model (run `make models`)");
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
            let options = EmbedConfig {
                threads: option_threads,
                optimization: level,
                ..daemon.clone()
            };
            let mut session = load_session(models(), &options).expect("model");
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

    // Batching by padded tokens: 64 texts, 4 of them long (256 word pieces), in arrival order.
    // Batches of 32 pad every row to the long ones; a budget of 2,048 padded tokens (the
    // daemon's `--embed-batch-tokens` default) cuts a batch before a long text would; sorting
    // by length first (as the daemon's indexer does with background work) puts the long ones
    // together.
    let long = tokenizer
        .encode(SENTENCES.concat().repeat(2), true)
        .unwrap()
        .get_ids()
        .to_vec();
    let mixed: Vec<&[u32]> = (0..64)
        .map(|i| {
            if i % 16 == 7 {
                long.as_slice()
            } else {
                tokens[i % tokens.len()].as_slice()
            }
        })
        .collect();
    let mut group = c.benchmark_group("embed_mixed_lengths");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(6))
        .throughput(Throughput::Elements(mixed.len() as u64));
    let mut sorted = mixed.clone();
    sorted.sort_by_key(|t| t.len());
    for (name, texts, budget) in [
        ("batches_of_32", &mixed, usize::MAX),
        ("budget_2048_tokens", &mixed, 2048),
        ("sorted_then_budget_2048_tokens", &sorted, 2048),
    ] {
        let batches = split_by_budget(texts, 32, budget);
        group.bench_function(name, |b| {
            b.iter(|| {
                for batch in &batches {
                    run_batch(&mut session, batch).unwrap();
                }
            })
        });
    }
    group.finish();

    if let Some(other) = std::env::var_os("BENCH_OTHER_MODELS_DIR") {
        let other = Path::new(&other);
        let mut sessions = [
            ("this", load_session(models(), &daemon).expect("model")),
            (
                "other",
                load_session(other, &daemon).expect("the other model"),
            ),
        ];
        let mut group = c.benchmark_group("embed_model_ab");
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(6));
        for batch in [1usize, 8, 32] {
            let texts: Vec<&[u32]> = (0..batch)
                .map(|i| tokens[i % tokens.len()].as_slice())
                .collect();
            group.throughput(Throughput::Elements(batch as u64));
            for (name, session) in &mut sessions {
                group.bench_function(format!("{name}/batch={batch}"), |b| {
                    b.iter(|| run_batch(session, &texts).unwrap())
                });
            }
        }
        let batches = split_by_budget(&sorted, 32, 2048);
        for (name, session) in &mut sessions {
            group.bench_function(format!("{name}/mixed_sorted_budget_2048"), |b| {
                b.iter(|| {
                    for batch in &batches {
                        run_batch(session, batch).unwrap();
                    }
                })
            });
        }
        group.finish();
    }

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

/// Cuts texts, in order, into batches of at most `max_texts` whose padded size (rows times the
/// longest row) stays within `budget` (a batch always takes at least one text), as the daemon's
/// queue does.
fn split_by_budget<'a>(
    texts: &[&'a [u32]],
    max_texts: usize,
    budget: usize,
) -> Vec<Vec<&'a [u32]>> {
    let mut batches: Vec<Vec<&[u32]>> = Vec::new();
    let mut current: Vec<&[u32]> = Vec::new();
    let mut width = 0;
    for text in texts {
        let padded = (current.len() + 1) * width.max(text.len());
        if !current.is_empty() && (current.len() == max_texts || padded > budget) {
            batches.push(std::mem::take(&mut current));
            width = 0;
        }
        width = width.max(text.len());
        current.push(text);
    }
    batches.push(current);
    batches
}

criterion_group!(benches, bench);
criterion_main!(benches);
