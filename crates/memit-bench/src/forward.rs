//! `memit-bench forward`: prefill tokens/s of whole models.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use memit_gpu::GpuContext;
use memit_models::{load_model_path, Batch, LoadOptions, Model, Padding};
use serde::Serialize;

use crate::{adapter_report, time_loop, write_report, AdapterReport};

#[derive(Serialize)]
struct ForwardCase {
    model: String,
    params_millions: f64,
    batch: usize,
    seq: usize,
    tokens_per_s: f64,
    torch_tokens_per_s: Option<f64>,
    ratio_to_torch: Option<f64>,
}

#[derive(Serialize)]
struct ForwardReport {
    adapter: AdapterReport,
    /// Where the PyTorch reference ran (its GPU when it sees one).
    torch_device: Option<String>,
    cases: Vec<ForwardCase>,
}

fn default_models() -> Vec<PathBuf> {
    let mut models: Vec<PathBuf> = std::fs::read_dir("tests/fixtures")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("config.json").exists()).collect())
        .unwrap_or_default();
    models.sort();
    let smollm2 = PathBuf::from("target/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if smollm2.exists() {
        models.push(smollm2);
    }
    models
}

fn parameter_count(model: &Model) -> usize {
    let c = &model.config;
    let attn = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.d_model;
    let mlp = c.d_model * c.d_ff * if c.arch == memit_models::Arch::Llama { 3 } else { 2 };
    c.n_layers * (attn + mlp) + c.vocab_size * c.d_model * if c.tie_word_embeddings { 1 } else { 2 }
}

fn torch_rates(python: &Path, models: &[PathBuf], batch: usize, seq: usize, budget: Duration) -> Result<serde_json::Value> {
    let output = std::process::Command::new(python)
        .arg("tests/bench/torch_forward.py")
        .args(["--batch", &batch.to_string(), "--seq", &seq.to_string(), "--seconds", &budget.as_secs_f64().to_string()])
        .args(models)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!("torch reference failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("parsing torch output {last:?}"))
}

pub fn run(models: Vec<PathBuf>, batch: usize, seq: usize, budget: Duration, torch_python: Option<PathBuf>, out: &Path) -> Result<()> {
    let models = if models.is_empty() { default_models() } else { models };
    let ctx = pollster::block_on(GpuContext::from_env()).context("opening a GPU adapter")?;
    let adapter = adapter_report(&ctx);
    eprintln!("adapter: {} ({}, {})", adapter.name, adapter.backend, adapter.device_type);
    let torch = match &torch_python {
        Some(python) => Some(torch_rates(python, &models, batch, seq, budget)?),
        None => None,
    };
    let mut cases = Vec::new();
    for path in &models {
        let model = load_model_path(ctx.clone(), path, LoadOptions::default()).with_context(|| format!("loading {}", path.display()))?.model;
        let vocab = model.config.vocab_size as u32;
        let sequences: Vec<Vec<u32>> = (0..batch).map(|b| (0..seq).map(|t| ((b * seq + t) as u32 * 7919) % vocab).collect()).collect();
        let input = Batch::new(&sequences, Padding::Right, 0)?;
        let (runs, secs) = time_loop(budget, || {
            let out = model.forward(&input, &[], true)?;
            pollster::block_on(ctx.read(&out.logits.expect("requested").slice_rows(0..1)?))?;
            Ok(())
        })?;
        let rate = (batch * seq * runs) as f64 / secs;
        let torch_rate = torch.as_ref().and_then(|t| t["tokens_per_s"][path.to_string_lossy().as_ref()].as_f64());
        eprintln!(
            "{:<55} {:>10.1} tok/s{}",
            path.display(),
            rate,
            torch_rate.map_or(String::new(), |t| format!("   torch {t:>10.1} tok/s   ratio {:.3}", rate / t))
        );
        cases.push(ForwardCase {
            model: path.display().to_string(),
            params_millions: parameter_count(&model) as f64 / 1e6,
            batch,
            seq,
            tokens_per_s: rate,
            torch_tokens_per_s: torch_rate,
            ratio_to_torch: torch_rate.map(|t| rate / t),
        });
    }
    let torch_device = torch.as_ref().and_then(|t| t["device"].as_str()).map(String::from);
    write_report(out, &ForwardReport { adapter, torch_device, cases })
}
