//! `memit-bench solve`: one layer's MEMIT system λC + KᵀK solved for n
//! keys at widths d (the step-3 solve alone, without a model), with C the
//! second moment of T random keys: full rank when T ≥ d, rank T below it,
//! as statistics over a short corpus leave it (the GPT-J-shaped bench's 252
//! tokens for d_ff = 16384). Reports time, the diagonal shift the f32
//! factorisation needed, the refinement steps and the cost counters.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use memit_core::{assemble_system, solve_system, LayerCovariance, LayerSystem};
use memit_gpu::{CostCounters, GpuContext, Tensor};
use memit_models::SplitMix64;
use serde::Serialize;

use crate::{adapter_report, write_report, AdapterReport};

pub struct Options {
    pub widths: Vec<usize>,
    pub n: usize,
    /// Tokens behind C per width; 0 means 2·d (full rank).
    pub tokens: Vec<usize>,
    pub lambda: f32,
    /// Skip the separate factorisation timing and profile (each costs a
    /// whole factorisation: long at d_ff = 16384 on a CPU adapter).
    pub solve_only: bool,
    pub out: PathBuf,
}

#[derive(Serialize)]
struct SolveCase {
    d: usize,
    n: usize,
    tokens: usize,
    lambda: f32,
    seconds: f64,
    /// The f32 factorisation of λC + KᵀK alone (assembled as the solve
    /// does, timed from the factor's first dispatch to its completion), and
    /// its rate at Cholesky's d³/3 flops.
    factor_seconds: Option<f64>,
    factor_gflops: Option<f64>,
    /// One forward and backward substitution for the n columns.
    substitution_seconds: Option<f64>,
    /// GPU time of the factorisation by kernel (timestamp queries, a
    /// second factorisation; empty where the adapter has none).
    factor_kernels: Vec<KernelShare>,
    shift: f32,
    refinements: usize,
    last_correction: f64,
    counters: CostCounters,
}

#[derive(Serialize)]
struct KernelShare {
    kernel: String,
    dispatches: usize,
    seconds: f64,
    gflops: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    adapter: AdapterReport,
    cases: Vec<SolveCase>,
}

/// [rows, d] keys with a decaying spectrum (column j scaled by
/// 1/√(1 + j/8)), like the MLP keys of a trained model, row-major.
fn random_keys(rows: usize, d: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let scale: Vec<f32> = (0..d).map(|j| 1.0 / (1.0 + j as f32 / 8.0).sqrt()).collect();
    (0..rows * d).map(|i| rng.normals().0 as f32 * scale[i % d]).collect()
}

/// C = XᵀX / T for X [T, d].
fn second_moment(x: &[f32], tokens: usize, d: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; d * d];
    // SAFETY: x holds tokens·d and c d·d elements with the strides given.
    unsafe {
        matrixmultiply::sgemm(d, tokens, d, 1.0 / tokens as f32, x.as_ptr(), 1, d as isize, x.as_ptr(), d as isize, 1, 0.0, c.as_mut_ptr(), d as isize, 1);
    }
    c
}

/// λC + KᵀK in the solver's layout, as `solve_system` assembles it, with
/// the uploads done.
fn assemble(ctx: &Arc<GpuContext>, cov: &LayerCovariance, lambda: f32, keys: &[f32], n: usize, d: usize) -> Result<Tensor> {
    let a = assemble_system(ctx, d, &LayerSystem::memit(cov, lambda), keys, n)?;
    pollster::block_on(ctx.sync())?;
    Ok(a)
}

/// The factorisation's GPU time per kernel, where the adapter has
/// timestamp queries.
fn profile_factor(ctx: &Arc<GpuContext>, cov: &LayerCovariance, lambda: f32, keys: &[f32], n: usize, d: usize) -> Result<Vec<KernelShare>> {
    let a = assemble(ctx, cov, lambda, keys, n, d)?;
    if ctx.start_profiling().is_err() {
        return Ok(Vec::new());
    }
    let factor = ctx.factor_spd(a, 0.0)?;
    let timings = ctx.finish_profiling()?;
    drop(factor);
    let mut shares: Vec<(KernelShare, u64)> = Vec::new();
    for t in timings {
        let i = match shares.iter().position(|(s, _)| s.kernel == t.kernel) {
            Some(i) => i,
            None => {
                shares.push((KernelShare { kernel: t.kernel.clone(), dispatches: 0, seconds: 0.0, gflops: None }, 0));
                shares.len() - 1
            }
        };
        shares[i].0.dispatches += 1;
        shares[i].0.seconds += t.nanos / 1e9;
        shares[i].1 += t.work.map_or(0, |w| w.flops);
    }
    Ok(shares
        .into_iter()
        .map(|(mut s, flops)| {
            s.gflops = (flops > 0).then(|| flops as f64 / s.seconds / 1e9);
            s
        })
        .collect())
}

/// Seconds for factoring λC + KᵀK (whatever its pivots) and for one
/// substitution with the factor, each waited for on its own.
fn time_factor_and_substitution(ctx: &Arc<GpuContext>, cov: &LayerCovariance, lambda: f32, keys: &[f32], n: usize, d: usize) -> Result<(f64, f64)> {
    let a = assemble(ctx, cov, lambda, keys, n, d)?;
    let start = Instant::now();
    let factor = ctx.factor_spd(a, 0.0)?;
    pollster::block_on(ctx.sync())?;
    let factor_seconds = start.elapsed().as_secs_f64();
    let rhs = ctx.solver_rhs(&factor, n)?;
    pollster::block_on(ctx.sync())?;
    let start = Instant::now();
    ctx.solve_factored_in_place(&factor, &rhs)?;
    pollster::block_on(ctx.sync())?;
    Ok((factor_seconds, start.elapsed().as_secs_f64()))
}

pub fn run(options: Options) -> Result<()> {
    let ctx = pollster::block_on(GpuContext::from_env()).context("opening a GPU adapter")?;
    let adapter = adapter_report(&ctx);
    eprintln!("adapter: {} ({}, {})", adapter.name, adapter.backend, adapter.device_type);
    let mut cases = Vec::new();
    for &d in &options.widths {
        for &tokens in &options.tokens {
            let tokens = if tokens == 0 { 2 * d } else { tokens };
            let mut rng = SplitMix64(d as u64 * 7919 + tokens as u64);
            let cov = LayerCovariance { layer: 0, matrix: second_moment(&random_keys(tokens, d, &mut rng), tokens, d), n_tokens: tokens as u64 };
            let keys = random_keys(options.n, d, &mut rng);
            let (factor_seconds, substitution_seconds, factor_kernels) = if options.solve_only {
                (None, None, Vec::new())
            } else {
                let (factor, substitution) = time_factor_and_substitution(&ctx, &cov, options.lambda, &keys, options.n, d)?;
                (Some(factor), Some(substitution), profile_factor(&ctx, &cov, options.lambda, &keys, options.n, d)?)
            };
            for k in &factor_kernels {
                eprintln!("    {:<28} {:>6} dispatches {:>9.3} s  {}", k.kernel, k.dispatches, k.seconds, k.gflops.map_or(String::new(), |g| format!("{g:.2} GFLOP/s")));
            }
            let system = LayerSystem::memit(&cov, options.lambda);
            let before = ctx.counters();
            let start = Instant::now();
            let solved = pollster::block_on(solve_system(&ctx, d, &system, &keys, options.n))?;
            let seconds = start.elapsed().as_secs_f64();
            let case = SolveCase {
                d,
                n: options.n,
                tokens,
                lambda: options.lambda,
                seconds,
                factor_seconds,
                factor_gflops: factor_seconds.map(|s| (d as f64).powi(3) / 3.0 / s / 1e9),
                substitution_seconds,
                factor_kernels,
                shift: solved.shift,
                refinements: solved.refinements,
                last_correction: solved.last_correction,
                counters: ctx.counters().since(&before),
            };
            let alone = match (case.factor_seconds, case.factor_gflops, case.substitution_seconds) {
                (Some(f), Some(rate), Some(sub)) => format!(" (factor alone {f:.2} s, {rate:.2} GFLOP/s; substitution {sub:.2} s)"),
                _ => String::new(),
            };
            eprintln!(
                "d {d:>6}  n {:>5}  C from {tokens:>6} tokens: {seconds:>8.2} s{alone}  shift {:e}  {} refinements (last {:.1e})  {} dispatches, {} submits, {} host waits",
                options.n, case.shift, case.refinements, case.last_correction, case.counters.dispatches, case.counters.submits, case.counters.host_waits
            );
            cases.push(case);
        }
    }
    write_report(&options.out, &Report { adapter, cases })
}
