//! The model itself: its files, the tokenizer (padding off, explicit truncation), the one ONNX
//! Runtime environment, a session, and one padded batch run with mean pooling.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
use tokenizers::{Tokenizer, TruncationParams};

use crate::config::{EmbedConfig, GraphOptimization};
use crate::vector::DIM;

pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";
pub const MODEL_FILE: &str = "model.onnx";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The files the daemon needs in its models directory, each checked before anything loads.
pub fn model_files(models_dir: &Path) -> anyhow::Result<[PathBuf; 3]> {
    let files = [ORT_LIBRARY, MODEL_FILE, TOKENIZER_FILE].map(|name| models_dir.join(name));
    for file in &files {
        if !file.is_file() {
            bail!(
                "missing {}: run `make models` (or `scripts/fetch-models.sh {}`) to fetch the pinned, \
                 checksummed files, or point --models-dir / MEMORY_SIDECAR_MODELS_DIR at a directory holding them",
                file.display(),
                models_dir.display()
            );
        }
    }
    Ok(files)
}

/// `sha256:` and the hex sha256 of the model file's bytes followed by the tokenizer file's:
/// what a sentence vector depends on besides the text (and the truncation length).
pub fn fingerprint(model: &Path, tokenizer: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for path in [model, tokenizer] {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        std::io::copy(&mut file, &mut hasher)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn ort_error<R>(error: ort::Error<R>) -> anyhow::Error {
    anyhow!("onnx runtime: {error}")
}

/// Loads the tokenizer with padding off (batches pad to their longest member) and an explicit
/// truncation to `max_tokens` word pieces.
pub fn load_tokenizer(path: &Path, max_tokens: usize) -> anyhow::Result<Tokenizer> {
    let mut tokenizer =
        Tokenizer::from_file(path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..TruncationParams::default()
        }))
        .map_err(|e| anyhow!("configuring truncation: {e}"))?;
    Ok(tokenizer)
}

/// The process's one ONNX Runtime environment (the runtime allows no second one), loaded from
/// `library` on first use.
fn environment(library: &Path) -> anyhow::Result<Environment> {
    static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);
    let mut slot = ENVIRONMENT.lock().expect("environment lock");
    if let Some(environment) = slot.as_ref() {
        return Ok(environment.clone());
    }
    let environment = ort::init_from(library)
        .map_err(|e| anyhow!("loading {}: {e}", library.display()))?
        .with_name("memory-sidecar")
        .build()
        .map_err(ort_error)?;
    *slot = Some(environment.clone());
    Ok(environment)
}

/// Opens an ONNX Runtime session for the model as `config` says: its intra-op threads, graph
/// optimisation and whether the threads spin between runs. Benchmarks open their bare-model
/// baselines through this too, with the daemon's own [`EmbedConfig`], so that both run alike.
pub fn load_session(models_dir: &Path, config: &EmbedConfig) -> anyhow::Result<Session> {
    let EmbedConfig {
        threads,
        optimization,
        spin,
        ..
    } = *config;
    let [library, model, _] = model_files(models_dir)?;
    let environment = environment(&library)?;
    let session = Session::builder(&environment)
        .map_err(ort_error)?
        .with_optimization_level(match optimization {
            GraphOptimization::Disable => GraphOptimizationLevel::Disable,
            GraphOptimization::Basic => GraphOptimizationLevel::Level1,
            GraphOptimization::Extended => GraphOptimizationLevel::Level2,
            GraphOptimization::All => GraphOptimizationLevel::All,
        })
        .map_err(ort_error)?
        .with_intra_threads(threads)
        .map_err(ort_error)?
        .with_intra_op_spinning(spin)
        .map_err(ort_error)?
        .with_inter_threads(1)
        .map_err(ort_error)?
        .commit_from_file(&model)
        .map_err(ort_error)
        .with_context(|| format!("loading {}", model.display()))?;
    Ok(session)
}

/// Runs one padded batch and returns one unit vector per text.
pub fn run_batch(session: &mut Session, texts: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
    let rows = texts.len();
    let width = texts.iter().map(|t| t.len()).max().unwrap_or(0);
    if rows == 0 || width == 0 {
        bail!("empty batch");
    }
    let mut input_ids = vec![0i64; rows * width];
    let mut attention = vec![0i64; rows * width];
    for (row, ids) in texts.iter().enumerate() {
        for (col, &id) in ids.iter().enumerate() {
            input_ids[row * width + col] = i64::from(id);
            attention[row * width + col] = 1;
        }
    }
    let shape = [rows, width];
    let ids_tensor = Tensor::from_array((shape, input_ids)).map_err(ort_error)?;
    let mask_tensor = Tensor::from_array((shape, attention.clone())).map_err(ort_error)?;
    let types_tensor = Tensor::from_array((shape, vec![0i64; rows * width])).map_err(ort_error)?;
    let outputs = session
        .run(ort::inputs![
            "input_ids" => ids_tensor,
            "attention_mask" => mask_tensor,
            "token_type_ids" => types_tensor,
        ])
        .map_err(ort_error)?;
    let (out_shape, hidden) = outputs[0].try_extract_tensor::<f32>().map_err(ort_error)?;
    if out_shape.len() != 3
        || out_shape[0] as usize != rows
        || out_shape[1] as usize != width
        || out_shape[2] as usize != DIM
    {
        bail!("model output shape {out_shape:?}, expected [{rows}, {width}, {DIM}]");
    }
    let mut vectors = Vec::with_capacity(rows);
    for row in 0..rows {
        let mut pooled = vec![0f32; DIM];
        let mut count = 0f32;
        for col in 0..width {
            if attention[row * width + col] == 0 {
                continue;
            }
            count += 1.0;
            let offset = (row * width + col) * DIM;
            for (sum, value) in pooled.iter_mut().zip(&hidden[offset..offset + DIM]) {
                *sum += value;
            }
        }
        let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt() / count;
        if !norm.is_finite() || norm == 0.0 {
            bail!("model produced a zero or non-finite vector");
        }
        // Mean then normalise: dividing by count is absorbed into the norm.
        let scale = 1.0 / (norm * count);
        pooled.iter_mut().for_each(|x| *x *= scale);
        vectors.push(pooled);
    }
    Ok(vectors)
}
