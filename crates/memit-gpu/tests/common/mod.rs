//! Shared helpers for the kernel tests: contexts, a seeded RNG, CPU
//! references and tolerance checks.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use memit_gpu::{GpuContext, GpuOptions, SplitK, Tensor};

/// The real adapter with its real limits. Panics (failing the test) when no
/// adapter exists: a GPU-less machine needs a software Vulkan driver.
pub fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        let ctx = pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)");
        eprintln!("adapter: {:?}", ctx.adapter_info());
        ctx
    })
    .clone()
}

/// Same adapter, but tensors are split into 4 KiB chunks, so tiny shapes
/// exercise the tiling that GPT-J-sized operands need.
pub fn tiny_chunk_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        pollster::block_on(GpuContext::new(GpuOptions { max_chunk_bytes: Some(4096), ..Default::default() }))
            .expect("a GPU adapter (install mesa-vulkan-drivers)")
    })
    .clone()
}

/// Same adapter with the other kernel variants (GPU-style on a CPU
/// adapter, CPU-style on a GPU), so both are tested on any machine.
pub fn other_kernels_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::new(other_kernels_options())).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

/// The options of [`other_kernels_ctx`], for a test that needs a context
/// of its own.
pub fn other_kernels_options() -> GpuOptions {
    GpuOptions { cpu_kernels: Some(!ctx().cpu_kernels()), ..Default::default() }
}

/// Same adapter with the GPU kernel variants and the row reductions as
/// trees through workgroup memory (no subgroups), the path of browsers and
/// of adapters without subgroups; the other contexts reduce within
/// subgroups where the adapter has them.
pub fn tree_reductions_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        let options = GpuOptions { cpu_kernels: Some(false), subgroups: Some(false), ..Default::default() };
        let ctx = pollster::block_on(GpuContext::new(options)).expect("a GPU adapter (install mesa-vulkan-drivers)");
        assert!(!ctx.subgroup_reductions());
        ctx
    })
    .clone()
}

/// Same adapter with every product that `matmul_direct` can take taken by
/// it (CPU-style kernels, no row limit), so that kernel is checked at every
/// shape whichever adapter is present.
pub fn direct_kernels_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::new(direct_kernels_options())).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

/// The options of [`direct_kernels_ctx`], for a test that needs a context
/// of its own.
pub fn direct_kernels_options() -> GpuOptions {
    GpuOptions { cpu_kernels: Some(true), direct_product_rows: Some(usize::MAX), ..Default::default() }
}

/// Same adapter with every product that `matmul_wide` can take taken by it
/// (no row limit, the direct kernel off), so that kernel is checked at
/// every shape whichever adapter is present.
pub fn wide_kernels_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::new(wide_kernels_options())).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

/// The options of [`wide_kernels_ctx`], for a test that needs a context
/// of its own.
///
/// On a GPU it leaves the adapter's own kernels: GPUs never take
/// `matmul_wide`, and NVIDIA's Vulkan driver fails to create its pipeline
/// (1,024 accumulators per invocation; seen on an H200, 2026-12-04).
pub fn wide_kernels_options() -> GpuOptions {
    let wide = if ctx().cpu_kernels() { 0 } else { usize::MAX };
    GpuOptions { direct_product_rows: Some(0), wide_product_rows: Some(wide), ..Default::default() }
}

/// Same adapter with the GPU kernel variants and every product of more than
/// 8 rows taken by `matmul_big` (128×128 tiles), so that kernel is checked
/// at every shape whichever adapter is present.
pub fn big_kernels_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::new(big_kernels_options())).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

/// The options of [`big_kernels_ctx`], for a test that needs a context
/// of its own.
pub fn big_kernels_options() -> GpuOptions {
    GpuOptions { cpu_kernels: Some(false), big_product_groups: Some(0), split_k: Some(SplitK { target_groups: 0, min_chunk: 0 }), ..Default::default() }
}

/// [`big_kernels_ctx`] with every product of K ≥ 128 split along K into
/// slabs of 64 or more (the last one ragged) and added by `matmul_split_sum`.
pub fn split_kernels_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::new(split_kernels_options())).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

pub fn split_kernels_options() -> GpuOptions {
    GpuOptions { split_k: Some(SplitK { target_groups: 100_000, min_chunk: 64 }), ..big_kernels_options() }
}

/// Per-sequence (start, end) key bounds of whole sequences as the flat GPU
/// array attention reads (queries at positions from 0).
pub fn key_bounds(ctx: &GpuContext, bounds: &[(u32, u32)]) -> memit_gpu::Indices {
    ctx.indices(&bounds.iter().flat_map(|&(s, e)| [s, e, 0, 0]).collect::<Vec<_>>()).unwrap()
}

pub fn read(ctx: &GpuContext, t: &Tensor) -> Vec<f32> {
    pollster::block_on(ctx.read(t)).expect("readback")
}

/// xorshift64*: deterministic test data without extra dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Element (i, j) of a row-major matrix with `cols` columns, optionally
/// transposed (stored as [cols_of_op, rows_of_op]).
fn at(data: &[f32], trans: bool, i: usize, j: usize, stored_cols: usize) -> f64 {
    if trans { data[j * stored_cols + i] as f64 } else { data[i * stored_cols + j] as f64 }
}

/// op(A)·op(B) in f64, plus Σ|a||b| per element for the error bound.
pub fn cpu_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> (Vec<f64>, Vec<f64>) {
    let a_cols = if ta { m } else { k };
    let b_cols = if tb { k } else { n };
    let mut out = vec![0.0; m * n];
    let mut mag = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut g) = (0.0, 0.0);
            for p in 0..k {
                let v = at(a, ta, i, p, a_cols) * at(b, tb, p, j, b_cols);
                s += v;
                g += v.abs();
            }
            out[i * n + j] = s;
            mag[i * n + j] = g;
        }
    }
    (out, mag)
}

/// Checks |got − want| ≤ k·ε_f32·magnitude + abs_floor elementwise, the
/// classic bound for a length-k f32 dot product.
pub fn assert_dot_close(got: &[f32], want: &[f64], magnitude: &[f64], k: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bound = (k.max(1) as f64) * f32::EPSILON as f64;
    for (i, ((&g, &w), &mag)) in got.iter().zip(want).zip(magnitude).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= bound * mag + 1e-6, "{what}: element {i}: got {g}, want {w} (err {err:e}, bound {:e})", bound * mag + 1e-6);
    }
}

/// Relative-or-absolute closeness for elementwise results.
pub fn assert_close(got: &[f32], want: &[f64], rel: f64, abs: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= abs + rel * w.abs() || (g.is_infinite() && w.is_infinite() && g.signum() as f64 == w.signum()),
            "{what}: element {i}: got {g}, want {w} (err {err:e})"
        );
    }
}

/// Rounds through f16, as f16 storage does.
pub fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// Causal attention in f64 over rows laid out as [q heads | k heads | v heads]
/// (`width` = (heads + 2·kv_heads)·hd), sequences `seq` rows apart, each
/// seeing only keys inside its bounds. Padding queries that see nothing give 0.
#[allow(clippy::too_many_arguments)]
pub fn cpu_attention(x: &[f64], width: usize, seq: usize, heads: usize, kv_heads: usize, hd: usize, bounds: &[(u32, u32)], scale: f64) -> Vec<f64> {
    let (k_off, v_off) = (heads * hd, (heads + kv_heads) * hd);
    let mut out = vec![0.0; bounds.len() * seq * heads * hd];
    for (b, &(start, end)) in bounds.iter().enumerate() {
        for t in 0..seq {
            let r = b * seq + t;
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let keys: Vec<usize> = (start as usize..(end as usize).min(t + 1)).collect();
                if keys.is_empty() {
                    continue;
                }
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| (0..hd).map(|d| x[r * width + h * hd + d] * x[(b * seq + j) * width + k_off + kv * hd + d]).sum::<f64>() * scale)
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for d in 0..hd {
                    out[r * heads * hd + h * hd + d] =
                        keys.iter().zip(&scores).map(|(&j, s)| (s - max).exp() / total * x[(b * seq + j) * width + v_off + kv * hd + d]).sum();
                }
            }
        }
    }
    out
}
