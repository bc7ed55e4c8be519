//! `memit-bench profile`: GPU time per kernel, from timestamp queries around
//! every dispatch, for one forward pass and for one target-vector step, and
//! the achieved GFLOP/s of every matrix-product shape they ran.
//!
//! One step is measured as the difference between a 2-step and a 1-step
//! target-vector run on the same requests (early stopping off), so the
//! one-time work of a batch (prefix pass, reference distributions) cancels.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use memit_core::{compute_targets_with, Hparams, TargetOptions};
use memit_gpu::{KernelTiming, Work};
use memit_models::{load_model_path, Batch, LoadOptions, Model, Padding};
use serde::Serialize;

use crate::{adapter_report, memit::requests, write_report, AdapterReport};

pub struct Options {
    pub model: PathBuf,
    pub cases: PathBuf,
    pub n_edits: usize,
    pub batch: usize,
    pub seq: usize,
    pub out: PathBuf,
}

/// One kernel's total over a profiled run.
#[derive(Serialize, Clone, Default)]
struct KernelRow {
    kernel: String,
    dispatches: i64,
    ms: f64,
    percent: f64,
}

/// One matrix-product shape's total and its rate.
#[derive(Serialize)]
struct ShapeRow {
    kernel: String,
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    dispatches: usize,
    ms: f64,
    gflops: f64,
}

#[derive(Serialize)]
struct Section {
    what: String,
    gpu_ms: f64,
    dispatches: i64,
    kernels: Vec<KernelRow>,
    shapes: Vec<ShapeRow>,
}

#[derive(Serialize)]
struct Report {
    adapter: AdapterReport,
    model: String,
    forward: Section,
    /// Absent for a model without a tokenizer.
    target_step: Option<Section>,
}

/// Per-kernel totals, largest first.
fn by_kernel(timings: &[KernelTiming]) -> BTreeMap<String, (i64, f64)> {
    let mut rows = BTreeMap::new();
    for t in timings {
        let row = rows.entry(t.kernel.clone()).or_insert((0i64, 0.0f64));
        row.0 += 1;
        row.1 += t.nanos;
    }
    rows
}

fn kernel_rows(totals: BTreeMap<String, (i64, f64)>) -> Vec<KernelRow> {
    let all: f64 = totals.values().map(|&(_, ns)| ns).sum();
    let mut rows: Vec<KernelRow> = totals
        .into_iter()
        .map(|(kernel, (dispatches, ns))| KernelRow { kernel, dispatches, ms: ns / 1e6, percent: if all > 0.0 { 100.0 * ns / all } else { 0.0 } })
        .collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    rows
}

/// Per-shape totals of the dispatches that reported their work.
fn shape_rows<'a>(timings: impl Iterator<Item = &'a KernelTiming>) -> Vec<ShapeRow> {
    let mut shapes: BTreeMap<(String, u32, u32, u32, u32), (usize, f64, u64)> = BTreeMap::new();
    for t in timings {
        if let Some(Work { m, n, k, batch, flops }) = t.work {
            let row = shapes.entry((t.kernel.clone(), m, n, k, batch)).or_default();
            row.0 += 1;
            row.1 += t.nanos;
            row.2 += flops;
        }
    }
    let mut rows: Vec<ShapeRow> = shapes
        .into_iter()
        .map(|((kernel, m, n, k, batch), (dispatches, ns, flops))| ShapeRow { kernel, m, n, k, batch, dispatches, ms: ns / 1e6, gflops: if ns > 0.0 { flops as f64 / ns } else { 0.0 } })
        .collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    rows
}

fn section(what: String, kernels: Vec<KernelRow>, shapes: Vec<ShapeRow>) -> Section {
    Section { what, gpu_ms: kernels.iter().map(|k| k.ms).sum(), dispatches: kernels.iter().map(|k| k.dispatches).sum(), kernels, shapes }
}

fn print(s: &Section) {
    eprintln!("\n{}: {:.1} ms of GPU time in {} dispatches", s.what, s.gpu_ms, s.dispatches);
    eprintln!("  {:<34} {:>10} {:>10} {:>6}", "kernel", "dispatches", "ms", "%");
    for k in &s.kernels {
        eprintln!("  {:<34} {:>10} {:>10.2} {:>6.1}", k.kernel, k.dispatches, k.ms, k.percent);
    }
    eprintln!("  {:<20} {:>22} {:>10} {:>10} {:>9}", "product", "m x n x k (batch)", "dispatches", "ms", "GFLOP/s");
    for r in s.shapes.iter().take(12) {
        let shape = format!("{}x{}x{} ({})", r.m, r.n, r.k, r.batch);
        eprintln!("  {:<20} {:>22} {:>10} {:>10.2} {:>9.2}", r.kernel, shape, r.dispatches, r.ms, r.gflops);
    }
}

/// A target-vector run of `steps` steps over `requests`, profiled.
fn profiled_targets(model: &Model, tok: &memit_models::TextTokenizer, requests: &[memit_core::EditRequest], hp: &Hparams, steps: usize) -> Result<Vec<KernelTiming>> {
    let hp = Hparams { v_num_grad_steps: steps, v_loss_threshold: 0.0, ..hp.clone() };
    let templates = ["{}".to_string()];
    model.ctx.start_profiling()?;
    pollster::block_on(compute_targets_with(model, tok, requests, &hp, &templates, &TargetOptions::default(), &mut |_| {}))?;
    Ok(model.ctx.finish_profiling()?)
}

pub fn run(o: Options) -> Result<()> {
    let ctx = pollster::block_on(memit_gpu::GpuContext::from_env()).context("opening a GPU adapter")?;
    let loaded = load_model_path(ctx.clone(), &o.model, LoadOptions::default()).with_context(|| format!("loading {}", o.model.display()))?;
    let model = loaded.model;
    eprintln!("adapter: {}; model {}", ctx.adapter_info().name, o.model.display());

    // Forward: deterministic token ids, one unprofiled run to compile the kernels.
    let vocab = model.config.vocab_size as u64;
    let sequences: Vec<Vec<u32>> = (0..o.batch).map(|b| (0..o.seq).map(|t| ((b * 7919 + t * 104_729) as u64 % vocab) as u32).collect()).collect();
    let batch = Batch::new(&sequences, Padding::Right, 0)?;
    let run_forward = || -> Result<()> {
        let out = model.forward(&batch, &[], true)?;
        drop(out);
        pollster::block_on(ctx.sync())?;
        Ok(())
    };
    run_forward()?;
    ctx.start_profiling()?;
    run_forward()?;
    let forward_timings = ctx.finish_profiling()?;
    let forward = section(
        format!("forward, {} x {} tokens, with logits", o.batch, o.seq),
        kernel_rows(by_kernel(&forward_timings)),
        shape_rows(forward_timings.iter()),
    );
    print(&forward);

    // One target-vector step: 2 steps minus 1 step.
    let Some(tok) = loaded.tokenizer else {
        eprintln!("{} has no tokenizer: no target-vector step", o.model.display());
        return write_report(&o.out, &Report { adapter: adapter_report(&ctx), model: o.model.display().to_string(), forward, target_step: None });
    };
    let requests = requests(&o.cases, o.n_edits)?;
    let hp = Hparams::for_model(&model.config);
    profiled_targets(&model, &tok, &requests, &hp, 1)?; // warm-up: compiles every kernel
    let one = profiled_targets(&model, &tok, &requests, &hp, 1)?;
    let two = profiled_targets(&model, &tok, &requests, &hp, 2)?;
    let mut step = by_kernel(&two);
    for (kernel, (count, ns)) in by_kernel(&one) {
        let row = step.entry(kernel).or_insert((0, 0.0));
        row.0 -= count;
        row.1 -= ns;
    }
    step.retain(|_, (count, _)| *count != 0);
    // The step's products are the 2-step run's dispatches beyond the 1-step
    // run's, in order (both runs record the same sequence up to there).
    let step_section = section(
        format!("one target-vector step, {} requests (2-step run minus 1-step run)", requests.len()),
        kernel_rows(step),
        shape_rows(extra_dispatches(&one, &two)),
    );
    print(&step_section);
    write_report(&o.out, &Report { adapter: adapter_report(&ctx), model: o.model.display().to_string(), forward, target_step: Some(step_section) })
}

/// The dispatches of `longer` that `shorter` lacks, matching kernels and
/// shapes as multisets (the runs interleave one-time and per-step work).
fn extra_dispatches<'a>(shorter: &[KernelTiming], longer: &'a [KernelTiming]) -> impl Iterator<Item = &'a KernelTiming> {
    let mut have: BTreeMap<(String, Option<(u32, u32, u32, u32)>), usize> = BTreeMap::new();
    let key = |t: &KernelTiming| (t.kernel.clone(), t.work.map(|w| (w.m, w.n, w.k, w.batch)));
    for t in shorter {
        *have.entry(key(t)).or_default() += 1;
    }
    longer.iter().filter(move |t| match have.get_mut(&key(t)) {
        Some(left) if *left > 0 => {
            *left -= 1;
            false
        }
        _ => true,
    })
}
