//! `memit-bench`: measures memit-wgpu on whatever adapter is present and
//! writes a JSON report plus a short table.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use memit_gpu::{DType, GpuContext, MatmulSpec, Tensor};
use serde::Serialize;

mod counterfact;
mod forward;
mod memit;
mod profile;
mod shaped;
mod solve;

#[derive(Parser)]
#[command(about = "Benchmark memit-wgpu kernels on the current adapter")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Matmul GFLOP/s (f32 and f16 storage) against a CPU sgemm on this machine.
    Kernels {
        /// Square sizes to measure.
        #[arg(long, value_delimiter = ',', default_values_t = [256usize, 512, 1024])]
        sizes: Vec<usize>,
        /// Further product shapes MxKxN (C is M×N), such as a layer's
        /// 150x576x1536 in a target-vector step.
        #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
        shapes: Vec<[usize; 3]>,
        /// Minimum measuring time per case, in seconds.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Where to write the JSON report.
        #[arg(long, default_value = "target/bench/kernels.json")]
        out: PathBuf,
    },
    /// Forward (prefill) tokens/s for the tiny fixtures and SmolLM2-135M,
    /// beside PyTorch on the same machine when a Python with torch is given.
    Forward {
        /// Model folders or .gguf files; default: tests/fixtures/tiny-* and
        /// target/models/SmolLM2-135M-Instruct.Q4_1.gguf if present.
        models: Vec<PathBuf>,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 32)]
        seq: usize,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Python interpreter with torch + transformers (+ gguf, accelerate
        /// for .gguf) to run tests/bench/torch_forward.py; omitted: no ratio.
        #[arg(long)]
        torch_python: Option<PathBuf>,
        #[arg(long, default_value = "target/bench/forward.json")]
        out: PathBuf,
    },
    /// Covariance statistics tokens/s and edits/s for batches of edits, by
    /// phase with peak GPU memory, beside PyTorch when a Python with torch
    /// is given.
    Memit {
        /// Model folder (GPT-2 style for the PyTorch reference) or .gguf.
        #[arg(long, default_value = "tests/fixtures/facts-gpt2")]
        model: PathBuf,
        /// Text for the statistics, one text per line.
        #[arg(long, default_value = "tests/fixtures/facts-gpt2/train.txt")]
        corpus: PathBuf,
        #[arg(long, default_value_t = 400)]
        texts: usize,
        #[arg(long, default_value_t = 64)]
        max_len: usize,
        /// MEMIT-format CounterFact cases to edit (the first N).
        #[arg(long, default_value = "tests/fixtures/facts-gpt2/counterfact.json")]
        cases: PathBuf,
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10, 100])]
        sizes: Vec<usize>,
        /// Run every prompt row in every target-vector step (to measure
        /// what caching the rows before each subject saves).
        #[arg(long)]
        no_prefix_cache: bool,
        /// Keep stopped requests in their batch to its last step (to
        /// measure what dropping them saves).
        #[arg(long)]
        no_regroup: bool,
        /// Keep the model's top N blocks off the GPU, uploaded from the
        /// checkpoint each time they run.
        #[arg(long, default_value_t = 0)]
        stream_blocks: usize,
        /// Hyperparameter overrides over the model's preset, as JSON (e.g.
        /// '{"layers": [0, 1], "v_num_grad_steps": 2}').
        #[arg(long)]
        hparams: Option<String>,
        /// Weight matrices in f16 on the GPU.
        #[arg(long)]
        f16: bool,
        #[arg(long)]
        torch_python: Option<PathBuf>,
        #[arg(long, default_value = "target/bench/memit.json")]
        out: PathBuf,
    },
    /// Writes a randomly initialised model with GPT-J 6B's widths and a few
    /// layers (f16 safetensors, the GPT-2 tokenizer), for `memit` runs on
    /// real shapes.
    MakeGptj {
        /// The new model folder (must not exist).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3)]
        layers: usize,
        #[arg(long, default_value_t = 4096)]
        d_model: usize,
        #[arg(long, default_value_t = 16384)]
        d_ff: usize,
        #[arg(long, default_value_t = 16)]
        heads: usize,
        #[arg(long, default_value_t = 50400)]
        vocab: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// GPU time per kernel (timestamp queries) for one forward pass and one
    /// target-vector step, and the GFLOP/s of every matrix-product shape.
    Profile {
        /// Model folder or .gguf file.
        #[arg(long, default_value = "target/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        model: PathBuf,
        /// MEMIT-format CounterFact cases (the first --n-edits are edited).
        #[arg(long, default_value = "tests/fixtures/datasets/counterfact-20.json")]
        cases: PathBuf,
        #[arg(long, default_value_t = 4)]
        n_edits: usize,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 32)]
        seq: usize,
        #[arg(long, default_value = "target/bench/profile.json")]
        out: PathBuf,
    },
    /// One layer's MEMIT solve (λC + KᵀK, float64-refined) without a model:
    /// C from random keys, full rank or of the rank a short corpus leaves.
    Solve {
        /// Widths d_ff.
        #[arg(long, value_delimiter = ',', default_value = "512,2048")]
        widths: Vec<usize>,
        /// Requests (keys) per solve.
        #[arg(long, default_value_t = 100)]
        n: usize,
        /// Tokens behind C; 0 means 2·d_ff (full rank).
        #[arg(long, value_delimiter = ',', default_value = "0")]
        tokens: Vec<usize>,
        /// λ (GPT-J's preset: 15,000).
        #[arg(long, default_value_t = 15000.0)]
        lambda: f32,
        /// Time the solve alone: no separate factorisation timing and
        /// profile (each a whole factorisation more).
        #[arg(long)]
        solve_only: bool,
        #[arg(long, default_value = "target/bench/solve.json")]
        out: PathBuf,
    },
    /// Everything on the defaults: kernels, forward and memit, one JSON each
    /// under target/bench/ and their tables.
    All {
        #[arg(long)]
        torch_python: Option<PathBuf>,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Covariance statistics, N CounterFact edits in one batch and the
    /// paper's scores before/after, timed by phase.
    Counterfact {
        /// Model folder or .gguf file.
        #[arg(long, default_value = "target/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        model: PathBuf,
        #[arg(long, default_value = "../shared/data/datasets/counterfact_21919_memitlike.json")]
        dataset: PathBuf,
        /// Plain text, one text per line, for the statistics.
        #[arg(long, default_value = "../shared/data/corpus/valid.detok.txt")]
        corpus: PathBuf,
        #[arg(long, default_value_t = 10)]
        n_edits: usize,
        /// Skip this many cases first.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Covariance weights λ to compare (the target vectors are shared);
        /// default: the model's preset.
        #[arg(long, value_delimiter = ',')]
        lambdas: Vec<f32>,
        #[arg(long, default_value_t = 200)]
        stats_texts: usize,
        #[arg(long, default_value_t = 128)]
        max_len: usize,
        /// Run every prompt row in every target-vector step (to measure
        /// what caching the rows before each subject saves).
        #[arg(long)]
        no_prefix_cache: bool,
        #[arg(long, default_value = "target/bench/counterfact.json")]
        out: PathBuf,
    },
}

#[derive(Serialize)]
pub(crate) struct AdapterReport {
    name: String,
    backend: String,
    device_type: String,
    driver: String,
    max_storage_buffer_binding_size: u64,
    shader_f16: bool,
}

#[derive(Serialize)]
struct MatmulCase {
    /// C is m × n, the inner dimension k.
    m: usize,
    k: usize,
    n: usize,
    layout: &'static str,
    dtype_a: &'static str,
    dtype_b: &'static str,
    gpu_gflops: f64,
    /// Share of the adapter's dense f32 (non-tensor-core) peak, where known.
    percent_of_peak: Option<f64>,
    cpu_gflops: f64,
    gpu_over_cpu: f64,
    iterations: usize,
}

#[derive(Serialize)]
struct KernelReport {
    adapter: AdapterReport,
    /// The vendor's dense f32 peak for this adapter, where known.
    peak_f32_gflops: Option<f64>,
    /// Whether f16 · f16 products ran on tensor cores (`matmul_coop`,
    /// `matmul_coop_staged`).
    tensor_cores: bool,
    /// Their fragments' side (16 on NVIDIA, 8 on lavapipe), where they ran.
    coop_fragment: Option<u32>,
    /// Whether whole workgroup tiles took `matmul_coop_staged` (off with
    /// `MEMIT_TENSOR_CORES=subgroup`), where they ran.
    coop_staged: Option<bool>,
    cpu_reference: &'static str,
    cpu_threads: usize,
    matmul: Vec<MatmulCase>,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Kernels { sizes, shapes, seconds, out } => {
            let shapes: Vec<[usize; 3]> = sizes.iter().map(|&n| [n, n, n]).chain(shapes).collect();
            kernels(&shapes, Duration::from_secs_f64(seconds), &out)
        }
        Command::Forward { models, batch, seq, seconds, torch_python, out } => {
            forward::run(models, batch, seq, Duration::from_secs_f64(seconds), torch_python, &out)
        }
        Command::Memit { model, corpus, texts, max_len, cases, sizes, no_prefix_cache, no_regroup, stream_blocks, hparams, f16, torch_python, out } => {
            memit::run(memit::Options { model, corpus, texts, max_len, cases, sizes, no_prefix_cache, no_regroup, stream_blocks, hparams, f16, torch_python, out })
        }
        Command::MakeGptj { out, layers, d_model, d_ff, heads, vocab, seed } => shaped::run(shaped::Options { out, layers, d_model, d_ff, heads, vocab, seed }),
        Command::All { torch_python, seconds } => {
            let budget = Duration::from_secs_f64(seconds);
            kernels(&[[256; 3], [512; 3], [1024; 3]], budget, &PathBuf::from("target/bench/kernels.json"))?;
            forward::run(Vec::new(), 4, 32, budget, torch_python.clone(), &PathBuf::from("target/bench/forward.json"))?;
            memit::run(memit::Options {
                model: "tests/fixtures/facts-gpt2".into(),
                corpus: "tests/fixtures/facts-gpt2/train.txt".into(),
                texts: 400,
                max_len: 64,
                cases: "tests/fixtures/facts-gpt2/counterfact.json".into(),
                sizes: vec![1, 10, 100],
                no_prefix_cache: false,
                no_regroup: false,
                stream_blocks: 0,
                hparams: None,
                f16: false,
                torch_python,
                out: "target/bench/memit.json".into(),
            })
        }
        Command::Solve { widths, n, tokens, lambda, solve_only, out } => solve::run(solve::Options { widths, n, tokens, lambda, solve_only, out }),
        Command::Profile { model, cases, n_edits, batch, seq, out } => profile::run(profile::Options { model, cases, n_edits, batch, seq, out }),
        Command::Counterfact { model, dataset, corpus, n_edits, offset, lambdas, stats_texts, max_len, no_prefix_cache, out } => {
            counterfact::run(counterfact::Options { model, dataset, corpus, n_edits, offset, lambdas, stats_texts, max_len, no_prefix_cache, out })
        }
    }
}

pub(crate) fn adapter_report(ctx: &GpuContext) -> AdapterReport {
    let info = ctx.adapter_info();
    AdapterReport {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info),
        max_storage_buffer_binding_size: ctx.limits().max_storage_buffer_binding_size,
        shader_f16: ctx.has_shader_f16(),
    }
}

/// Runs `step` repeatedly for at least `budget` (after one warm-up) and
/// returns (iterations, seconds).
pub(crate) fn time_loop(budget: Duration, mut step: impl FnMut() -> Result<()>) -> Result<(usize, f64)> {
    step()?;
    let start = Instant::now();
    let mut iterations = 0;
    while start.elapsed() < budget || iterations == 0 {
        step()?;
        iterations += 1;
    }
    Ok((iterations, start.elapsed().as_secs_f64()))
}

/// Values in [-0.5, 0.5) for benchmark operands.
fn operand(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn gpu_matmul_gflops(ctx: &GpuContext, [m, k, n]: [usize; 3], trans_b: bool, dtypes: (DType, DType), budget: Duration) -> Result<(f64, usize)> {
    let a = ctx.upload(&[m, k], &operand(m * k), dtypes.0)?;
    let b_shape = if trans_b { [n, k] } else { [k, n] };
    let b = ctx.upload(&b_shape, &operand(k * n), dtypes.1)?;
    let c: Tensor = ctx.zeros(&[m, n], DType::F32)?;
    let spec = MatmulSpec { trans_b, ..Default::default() };
    // Each timed step queues several products and waits once, the way a
    // forward pass uses the GPU.
    let flops_each = 2.0 * (m * k * n) as f64;
    let per_sync = ((64 << 30) as f64 / flops_each).clamp(1.0, 16.0) as usize;
    let (iterations, secs) = time_loop(budget, || {
        for _ in 0..per_sync {
            ctx.matmul_into(&a, &b, &c, spec)?;
        }
        pollster::block_on(ctx.sync())?;
        Ok(())
    })?;
    Ok((flops_each * (iterations * per_sync) as f64 / secs / 1e9, iterations * per_sync))
}

fn cpu_matmul_gflops([m, k, n]: [usize; 3], budget: Duration) -> f64 {
    let a = operand(m * k);
    let b = operand(k * n);
    let mut c = vec![0.0f32; m * n];
    let (iterations, secs) = time_loop(budget, || {
        // SAFETY: a is m×k, b k×n and c m×n, row-major with the strides given.
        unsafe {
            matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, 0.0, c.as_mut_ptr(), n as isize, 1);
        }
        Ok(())
    })
    .expect("cpu loop cannot fail");
    2.0 * (m * k * n) as f64 * iterations as f64 / secs / 1e9
}

/// Vendors' dense f32 peaks (boost clock, no tensor cores), GFLOP/s, by
/// adapter-name substring; the first match wins, so longer names go first.
const F32_PEAKS: [(&str, f64); 10] = [
    ("H100 PCIe", 51_200.0),
    ("H100", 66_900.0),
    ("H200", 66_900.0),
    ("A100", 19_500.0),
    ("L40S", 91_600.0),
    ("A40", 37_400.0),
    ("RTX 4090", 82_600.0),
    ("RTX 3090", 35_600.0),
    ("A10", 31_200.0),
    ("Apple M2 Max", 13_600.0),
];

fn peak_f32_gflops(adapter_name: &str) -> Option<f64> {
    F32_PEAKS.iter().find(|(name, _)| adapter_name.contains(name)).map(|&(_, peak)| peak)
}

/// "MxKxN" as [M, K, N].
fn parse_shape(text: &str) -> std::result::Result<[usize; 3], String> {
    let dims: Vec<usize> = text.split('x').map(|d| d.trim().parse::<usize>()).collect::<std::result::Result<_, _>>().map_err(|e| format!("{text:?}: {e}"))?;
    match dims[..] {
        [m, k, n] if m > 0 && k > 0 && n > 0 => Ok([m, k, n]),
        _ => Err(format!("{text:?} is not MxKxN with three positive sizes")),
    }
}

fn kernels(shapes: &[[usize; 3]], budget: Duration, out: &PathBuf) -> Result<()> {
    let ctx = pollster::block_on(GpuContext::from_env()).context("opening a GPU adapter")?;
    let adapter = adapter_report(&ctx);
    let peak = peak_f32_gflops(&adapter.name);
    eprintln!("adapter: {} ({}, {})", adapter.name, adapter.backend, adapter.device_type);
    let mut cases = Vec::new();
    for &shape in shapes {
        let [m, k, n] = shape;
        let cpu = cpu_matmul_gflops(shape, budget);
        for (layout, trans_b, dtypes, names) in [
            ("A·B", false, (DType::F32, DType::F32), ("f32", "f32")),
            ("A·Bᵀ", true, (DType::F32, DType::F32), ("f32", "f32")),
            ("A·Bᵀ", true, (DType::F32, DType::F16), ("f32", "f16")),
            // Both operands f16: tensor cores where the adapter has them.
            ("A·Bᵀ", true, (DType::F16, DType::F16), ("f16", "f16")),
        ] {
            let (gpu, iterations) = gpu_matmul_gflops(&ctx, shape, trans_b, dtypes, budget)?;
            // The f32 peak bounds the portable kernels, not tensor cores.
            let percent_of_peak = peak.filter(|_| dtypes.0 == DType::F32 || !ctx.has_tensor_cores()).map(|p| 100.0 * gpu / p);
            let of_peak = percent_of_peak.map_or(String::new(), |p| format!(", {p:.1}% of peak"));
            eprintln!("matmul {:>16} {layout:<5} {}x{}: {gpu:8.2} GFLOP/s{of_peak}  (cpu sgemm {cpu:8.2}, ratio {:.2})", format!("{m}x{k}x{n}"), names.0, names.1, gpu / cpu);
            cases.push(MatmulCase {
                m,
                k,
                n,
                layout,
                dtype_a: names.0,
                dtype_b: names.1,
                gpu_gflops: gpu,
                percent_of_peak,
                cpu_gflops: cpu,
                gpu_over_cpu: gpu / cpu,
                iterations,
            });
        }
    }
    let report = KernelReport {
        adapter,
        peak_f32_gflops: peak,
        tensor_cores: ctx.has_tensor_cores(),
        coop_fragment: ctx.coop_shape().map(|c| c.fragment),
        coop_staged: ctx.coop_shape().map(|c| c.staged),
        cpu_reference: "matrixmultiply::sgemm (threading feature)",
        cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        matmul: cases,
    };
    write_report(out, &report)
}

/// Writes a JSON report, creating its folder.
pub(crate) fn write_report(out: &std::path::Path, report: &impl Serialize) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_string_pretty(report)?).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_shape;

    #[test]
    fn shapes_are_read_as_m_k_n() {
        assert_eq!(parse_shape("160x576x1536"), Ok([160, 576, 1536]));
        assert_eq!(parse_shape(" 1 x2x 3"), Ok([1, 2, 3]));
        for bad in ["160x576", "1x2x3x4", "0x2x3", "ax2x3", ""] {
            assert!(parse_shape(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
