//! `memit-bench stats` and `memit-bench edits`: covariance accumulation
//! tokens/s, and edits/s for batches of edits split by phase (target
//! vectors, keys, solve, update) with peak GPU tensor memory per phase —
//! beside the same work in PyTorch (tests/bench/torch_memit.py) when a
//! Python with torch is given.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use memit_core::{compute_targets_with, spread_over_layers, EditState, EditRequest, Hparams, Phases, Progress, StatsAccumulator, StatsIdentity, TargetOptions, TargetText};
use memit_gpu::{CostCounters, DType, GpuContext};
use memit_models::{load_model_path, LoadOptions, Model, TextTokenizer};
use serde::Serialize;

use crate::{adapter_report, write_report, AdapterReport};

pub struct Options {
    pub model: PathBuf,
    pub corpus: PathBuf,
    pub texts: usize,
    pub max_len: usize,
    /// Edit requests: a MEMIT-format CounterFact file.
    pub cases: PathBuf,
    pub sizes: Vec<usize>,
    /// Run every prompt row in every target-vector step.
    pub no_prefix_cache: bool,
    /// Keep stopped requests in their batch to its last step.
    pub no_regroup: bool,
    /// The model's top blocks streamed from the checkpoint.
    pub stream_blocks: usize,
    /// JSON overrides over the model's preset.
    pub hparams: Option<String>,
    /// Weight matrices in f16.
    pub f16: bool,
    pub torch_python: Option<PathBuf>,
    pub out: PathBuf,
}

#[derive(Serialize)]
struct StatsResult {
    layers: Vec<usize>,
    texts: usize,
    tokens: u64,
    seconds: f64,
    tokens_per_s: f64,
    /// tokens/s × layers: how fast one layer's C grows.
    layer_tokens_per_s: f64,
    peak_mib: f64,
    counters: CostCounters,
    torch_tokens_per_s: Option<f64>,
    ratio_to_torch: Option<f64>,
}

#[derive(Serialize)]
struct EditResult {
    edits: usize,
    seconds: f64,
    edits_per_s: f64,
    phases: Phases,
    /// Optimisation steps each request needed, summed: the fewest request
    /// steps (`phases.target_vectors.counters.request_steps`) could be.
    own_steps: usize,
    torch: Option<serde_json::Value>,
    ratio_to_torch: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    adapter: AdapterReport,
    model: String,
    f16: bool,
    streamed_blocks: usize,
    load_seconds: f64,
    /// GPU tensor bytes of the loaded weights.
    weights_mib: f64,
    hparams: Hparams,
    stats: StatsResult,
    edits: Vec<EditResult>,
    /// Where the PyTorch reference ran (its GPU when it sees one).
    torch_device: Option<String>,
    torch_error: Option<String>,
}

fn load(path: &Path, f16: bool, streamed_blocks: usize) -> Result<(Model, TextTokenizer)> {
    let ctx = pollster::block_on(GpuContext::from_env()).context("opening a GPU adapter")?;
    let options = LoadOptions { matrix_dtype: if f16 { DType::F16 } else { DType::F32 }, streamed_blocks, ..Default::default() };
    let loaded = load_model_path(ctx, path, options).with_context(|| format!("loading {}", path.display()))?;
    let tokenizer = loaded.tokenizer.with_context(|| format!("{} has no tokenizer", path.display()))?;
    Ok((loaded.model, tokenizer))
}

/// Requests from a MEMIT-format CounterFact file (first `n`).
pub(crate) fn requests(path: &Path, n: usize) -> Result<Vec<EditRequest>> {
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)?;
    ensure!(cases.len() >= n, "{} has {} cases, {n} needed", path.display(), cases.len());
    cases
        .iter()
        .take(n)
        .map(|c| {
            let r = &c["requested_rewrite"];
            Ok(EditRequest {
                case_id: c["case_id"].as_u64(),
                prompt: r["prompt"].as_str().context("prompt")?.into(),
                subject: r["subject"].as_str().context("subject")?.into(),
                target_new: TargetText { text: r["target_new"]["str"].as_str().context("target_new")?.into() },
                target_true: None,
            })
        })
        .collect()
}

/// Runs tests/bench/torch_memit.py with the same model, texts, requests and
/// hyperparameters; returns its JSON report.
fn torch_reference(python: &Path, o: &Options, hp: &Hparams, texts_file: &Path) -> Result<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/bench/torch_memit.py");
    let sizes = o.sizes.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let out = Command::new(python)
        .arg(&script)
        .arg(&o.model)
        .arg(texts_file)
        .arg(&o.cases)
        .args(["--max-len", &o.max_len.to_string(), "--sizes", &sizes, "--hparams", &serde_json::to_string(hp)?])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn run(o: Options) -> Result<()> {
    let load_start = Instant::now();
    let (model, tok) = load(&o.model, o.f16, o.stream_blocks)?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let weights_mib = model.ctx.memory().live_bytes as f64 / (1 << 20) as f64;
    let mut hp = Hparams::for_model(&model.config);
    if let Some(json) = &o.hparams {
        hp = hp.with_overrides(&serde_json::from_str(json).context("--hparams is not JSON")?)?;
        hp.validate(&model.config)?;
    }
    let texts: Vec<String> = std::fs::read_to_string(&o.corpus)
        .with_context(|| format!("reading {}", o.corpus.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(o.texts)
        .map(String::from)
        .collect();
    let texts_file = std::env::temp_dir().join(format!("memit-bench-texts-{}.txt", std::process::id()));
    std::fs::write(&texts_file, texts.join("\n"))?;

    // Statistics: one warm-up batch, then the whole corpus, timed.
    let identity = StatsIdentity { model_id: "bench".into(), corpus_id: "bench".into(), layers: hp.layers.clone(), max_len: o.max_len };
    let mut warm = StatsAccumulator::new(&model, identity.clone())?;
    warm.add_texts(&model, &tok, &texts[..texts.len().min(8)])?;
    // The accumulator holds texts until a pass is full: reading its sums
    // runs them, so the timed run below compiles no pipeline.
    pollster::block_on(warm.covariances(&model))?;
    drop(warm);
    model.ctx.reset_peak_memory();
    let start = Instant::now();
    let counters_before = model.ctx.counters();
    let mut acc = StatsAccumulator::new(&model, identity)?;
    for batch in texts.chunks(8) {
        acc.add_texts(&model, &tok, batch)?;
    }
    let covariances = pollster::block_on(acc.covariances(&model))?;
    let seconds = start.elapsed().as_secs_f64();
    let tokens_per_s = acc.n_tokens as f64 / seconds;
    eprintln!("stats: {} tokens, layers {:?}: {tokens_per_s:.0} tokens/s", acc.n_tokens, hp.layers);
    let mut stats = StatsResult {
        layers: hp.layers.clone(),
        texts: texts.len(),
        tokens: acc.n_tokens,
        seconds,
        tokens_per_s,
        layer_tokens_per_s: tokens_per_s * hp.layers.len() as f64,
        peak_mib: model.ctx.memory().peak_bytes as f64 / (1 << 20) as f64,
        counters: model.ctx.counters().since(&counters_before),
        torch_tokens_per_s: None,
        ratio_to_torch: None,
    };
    // The accumulator's sums (C and its compensation per layer) would
    // otherwise stay on the GPU through the edits' peaks.
    drop(acc);

    let all = requests(&o.cases, o.sizes.iter().copied().max().unwrap_or(1))?;
    let mut edits = Vec::new();
    for &n in &o.sizes {
        let mut edited = model.clone();
        let start = Instant::now();
        let templates = ["{}".to_string()];
        let options = TargetOptions { prefix_cache: !o.no_prefix_cache, regroup: !o.no_regroup, ..Default::default() };
        let mut log = ProgressLog::new();
        let (prepared, targets, target_cost) = pollster::block_on(compute_targets_with(&edited, &tok, &all[..n], &hp, &templates, &options, &mut |p| log.report(p)))?;
        let (_, mut phases) = pollster::block_on(spread_over_layers(&mut edited, &tok, &prepared, &targets, &hp, &templates, &covariances, &mut EditState::memit(), &mut |p| log.report(p)))?;
        phases.target_vectors = target_cost;
        let own_steps = targets.iter().map(|t| t.losses.len()).sum();
        let seconds = start.elapsed().as_secs_f64();
        eprintln!("edits: {n:>4} in {seconds:8.2} s = {:8.3} edits/s", n as f64 / seconds);
        edits.push(EditResult { edits: n, seconds, edits_per_s: n as f64 / seconds, phases, own_steps, torch: None, ratio_to_torch: None });
    }

    let (mut torch_error, mut torch_device) = (None, None);
    if let Some(python) = &o.torch_python {
        match torch_reference(python, &o, &hp, &texts_file) {
            Ok(t) => {
                torch_device = t["device"].as_str().map(String::from);
                if let Some(rate) = t["stats"]["tokens_per_s"].as_f64() {
                    stats.torch_tokens_per_s = Some(rate);
                    stats.ratio_to_torch = Some(stats.tokens_per_s / rate);
                }
                for e in &mut edits {
                    let row = t["edits"].as_array().and_then(|rows| rows.iter().find(|r| r["edits"].as_u64() == Some(e.edits as u64))).cloned();
                    e.ratio_to_torch = row.as_ref().and_then(|r| r["edits_per_s"].as_f64()).map(|rate| e.edits_per_s / rate);
                    e.torch = row;
                }
            }
            Err(e) => {
                eprintln!("PyTorch reference skipped: {e:#}");
                torch_error = Some(format!("{e:#}"));
            }
        }
    }
    let _ = std::fs::remove_file(&texts_file);
    print_table(&stats, &edits);
    let report = Report { adapter: adapter_report(&model.ctx), model: o.model.display().to_string(), f16: o.f16, streamed_blocks: o.stream_blocks, load_seconds, weights_mib, hparams: hp, stats, edits, torch_device, torch_error };
    write_report(&o.out, &report)
}

fn print_table(stats: &StatsResult, edits: &[EditResult]) {
    let ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.3}"));
    println!("| work | WGSL | PyTorch | ratio |\n|---|---|---|---|");
    println!(
        "| statistics, layers {:?} | {:.0} tokens/s | {} | {} |",
        stats.layers,
        stats.tokens_per_s,
        stats.torch_tokens_per_s.map_or("-".into(), |t| format!("{t:.0} tokens/s")),
        ratio(stats.ratio_to_torch)
    );
    for e in edits {
        let torch = e.torch.as_ref().and_then(|t| t["edits_per_s"].as_f64()).map_or("-".into(), |t| format!("{t:.3} edits/s"));
        println!("| {} edit(s) | {:.3} edits/s | {torch} | {} |", e.edits, e.edits_per_s, ratio(e.ratio_to_torch));
    }
    println!("\n| edits | target vectors s (MiB) | keys s (MiB) | solve s (MiB) | update s (MiB) |\n|---|---|---|---|---|");
    for e in edits {
        let p = &e.phases;
        let cell = |c: memit_core::PhaseCost| format!("{:.2} ({:.1})", c.seconds, c.peak_bytes as f64 / (1 << 20) as f64);
        println!("| {} | {} | {} | {} | {} |", e.edits, cell(p.target_vectors), cell(p.keys), cell(p.solve), cell(p.update));
    }
    println!("\n| work | dispatches | submits | host waits | bytes to GPU | bytes from GPU | buffers created | steps (request steps of at least, regroups) |\n|---|---|---|---|---|---|---|---|");
    let row = |what: String, c: &CostCounters, steps: String| {
        println!("| {what} | {} | {} | {} | {} | {} | {} | {steps} |", c.dispatches, c.submits, c.host_waits, c.bytes_to_device, c.bytes_from_device, c.buffers_created);
    };
    row("statistics".into(), &stats.counters, "-".into());
    for e in edits {
        let p = &e.phases;
        for (name, phase) in [("target vectors", p.target_vectors), ("keys", p.keys), ("solve", p.solve), ("update", p.update)] {
            let c = phase.counters;
            let steps = if name == "target vectors" { format!("{} ({} of at least {}, {})", c.steps, c.request_steps, e.own_steps, c.regroups) } else { c.steps.to_string() };
            row(format!("{} edit(s): {name}", e.edits), &c.gpu, steps);
        }
    }
}

/// Progress of a long edit on stderr: each stage as it starts, then at most
/// one line every ten seconds.
struct ProgressLog {
    stage: &'static str,
    last: Instant,
    start: Instant,
}

impl ProgressLog {
    fn new() -> ProgressLog {
        ProgressLog { stage: "", last: Instant::now(), start: Instant::now() }
    }

    fn report(&mut self, p: Progress) {
        if p.stage != self.stage || self.last.elapsed().as_secs() >= 10 {
            eprintln!("  {} {}/{} after {:.0} s", p.stage, p.done, p.total, self.start.elapsed().as_secs_f64());
            self.stage = p.stage;
            self.last = Instant::now();
        }
    }
}
