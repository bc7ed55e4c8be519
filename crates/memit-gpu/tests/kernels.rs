//! Every kernel against an independent CPU reference, on random shapes that
//! include sizes that are not multiples of the tiles, and on tensors split
//! into many storage chunks.

mod common;

use common::*;
use memit_gpu::{Activation, AttentionRows, BinaryOp, Causal, DType, Epilogue, GpuContext, GpuError, GpuOptions, MatmulSpec, ReduceOp, TensorCores};

const SHAPES: [(usize, usize, usize); 10] =
    [(1, 1, 1), (3, 5, 7), (64, 64, 64), (65, 17, 130), (100, 257, 33), (128, 16, 1), (7, 300, 129), (70, 36, 132), (33, 128, 12), (36, 44, 68)];

fn stored_shape(rows: usize, cols: usize, trans: bool) -> [usize; 2] {
    if trans { [cols, rows] } else { [rows, cols] }
}

fn check_matmul(ctx: &GpuContext, m: usize, k: usize, n: usize, ta: bool, tb: bool, dtypes: (DType, DType), seed: u64) {
    let mut rng = Rng::new(seed);
    let a = rng.vec(m * k, 1.0);
    let b = rng.vec(k * n, 1.0);
    let ga = ctx.upload(&stored_shape(m, k, ta), &a, dtypes.0).unwrap();
    let gb = ctx.upload(&stored_shape(k, n, tb), &b, dtypes.1).unwrap();
    let c = ctx.matmul(&ga, &gb, ta, tb).unwrap();
    assert_eq!(c.shape(), &[m, n]);
    let a_ref = if dtypes.0 == DType::F16 { f16_round(&a) } else { a };
    let b_ref = if dtypes.1 == DType::F16 { f16_round(&b) } else { b };
    let (want, mag) = cpu_matmul(&a_ref, &b_ref, m, k, n, ta, tb);
    assert_dot_close(&read(ctx, &c), &want, &mag, k, &format!("matmul {m}x{k}x{n} ta={ta} tb={tb} {dtypes:?}"));
}

/// The adapter's own kernels, the other variants (GPU-style on a CPU
/// adapter, CPU-style on a GPU), the barrier-free `matmul_direct` and
/// `matmul_wide`, and the GPUs' `matmul_big` at every row count, whole and
/// split along K, so every product kernel is checked on any machine.
fn kernel_variants() -> [std::sync::Arc<GpuContext>; 6] {
    [ctx(), other_kernels_ctx(), direct_kernels_ctx(), wide_kernels_ctx(), big_kernels_ctx(), split_kernels_ctx()]
}

#[test]
fn matmul_all_transposes_f32() {
    for ctx in kernel_variants() {
        for (i, &(m, k, n)) in SHAPES.iter().enumerate() {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                check_matmul(&ctx, m, k, n, ta, tb, (DType::F32, DType::F32), i as u64);
            }
        }
    }
}

/// f16 weights in both layouts: the direct kernel reads them a word (two
/// values) at a time where the column count allows (a multiple of four, B
/// not transposed) and falls back to the other kernels where it does not.
#[test]
fn matmul_f16_storage_accumulates_in_f32() {
    for ctx in kernel_variants() {
        for (i, &(m, k, n)) in SHAPES.iter().chain(&[(9, 13, 132), (70, 66, 8)]).enumerate() {
            check_matmul(&ctx, m, k, n, false, true, (DType::F32, DType::F16), 100 + i as u64);
            check_matmul(&ctx, m, k, n, false, false, (DType::F32, DType::F16), 300 + i as u64);
            check_matmul(&ctx, m, k, n, true, false, (DType::F16, DType::F16), 200 + i as u64);
        }
    }
}

/// f16 · f16 products on tensor cores, where the adapter has cooperative
/// matrices (a workstation GPU's 16×16 fragments, or lavapipe's 8×8 from
/// Mesa 25.1 on, which tests/run.sh runs it on through
/// `scripts/mesa-coop.sh`; elsewhere this prints that it has nothing to
/// check), with the staged kernel on, with only the one-subgroup kernel,
/// and with tensors in 4 KiB chunks (operands at offsets, C written in
/// column blocks): shapes of whole workgroup tiles (8 fragments: the
/// staged kernel), of whole subgroup tiles only (4 fragments: the other),
/// K of an odd number of fragments (the staged kernel's half slab), long
/// K, both layouts of B, and shapes off the tiles, which take the portable
/// kernels. Where the adapter has timestamps, the kernels each product ran
/// are checked against the ones its shape should take.
#[test]
fn matmul_f16_on_tensor_cores() {
    let ctx = ctx();
    let expected = std::env::var_os("MEMIT_EXPECT_TENSOR_CORES").is_some();
    let Some(shape) = ctx.coop_shape() else {
        // tests/run.sh sets this where it runs the test on lavapipe with
        // cooperative matrices, which must then be there.
        assert!(!expected, "MEMIT_EXPECT_TENSOR_CORES is set but {} has no cooperative matrices", ctx.adapter_info().name);
        eprintln!("{}: no cooperative matrices, nothing to check", ctx.adapter_info().name);
        return;
    };
    let f = shape.fragment as usize;
    eprintln!("{}: fragments {f}×{f}, subgroups of {}", ctx.adapter_info().name, shape.subgroup);
    assert!(shape.staged);
    let options = |tensor_cores, max_chunk_bytes| GpuOptions { adapter_name: std::env::var("MEMIT_ADAPTER").ok(), tensor_cores: Some(tensor_cores), max_chunk_bytes, ..Default::default() };
    let one_subgroup = pollster::block_on(GpuContext::new(options(TensorCores::SubgroupTiles, None))).unwrap();
    assert_eq!(one_subgroup.coop_shape().map(|s| s.staged), Some(false));
    let chunked = pollster::block_on(GpuContext::new(options(TensorCores::Staged, Some(4096)))).unwrap();
    let shapes = [
        (8 * f, f, 8 * f),
        (8 * f, 3 * f, 16 * f),
        (16 * f, 16 * f, 8 * f),
        (4 * f, 64 * f, 4 * f),
        (12 * f, 5 * f, 4 * f),
        (4 * f + 1, f, 4 * f),
        (4 * f, f + 4, 4 * f),
    ];
    let mut ran_coop = 0;
    for (name, ctx) in [("staged", &ctx), ("one subgroup", &one_subgroup), ("4 KiB chunks", &chunked)] {
        for (i, &(m, k, n)) in shapes.iter().enumerate() {
            for tb in [false, true] {
                let profiled = ctx.start_profiling().is_ok();
                check_matmul(ctx, m, k, n, false, tb, (DType::F16, DType::F16), 700 + i as u64);
                if !profiled {
                    continue;
                }
                let kernels: Vec<String> = ctx.finish_profiling().unwrap().into_iter().map(|t| t.kernel).filter(|k| k.starts_with("matmul")).collect();
                let coop: Vec<&String> = kernels.iter().filter(|k| k.starts_with("matmul_coop::")).collect();
                ran_coop += coop.len();
                if name == "4 KiB chunks" {
                    continue;
                }
                // The kernel this shape should take: whole tiles, K and
                // every stride a whole number of fragments and 16-byte words.
                let unit = f.max(8);
                let aligned = k.is_multiple_of(unit) && n.is_multiple_of(unit);
                let want = if !aligned {
                    None
                } else if name == "staged" && m.is_multiple_of(8 * f) && n.is_multiple_of(8 * f) {
                    Some("matmul_coop::matmul_coop_staged")
                } else if m.is_multiple_of(4 * f) && n.is_multiple_of(4 * f) {
                    Some("matmul_coop::matmul_coop")
                } else {
                    None
                };
                match want {
                    Some(entry) => assert_eq!(kernels, [entry], "{name}: {m}x{k}x{n} tb={tb}"),
                    None => assert!(coop.is_empty(), "{name}: {m}x{k}x{n} tb={tb} took {coop:?}"),
                }
            }
        }
    }
    eprintln!("{ran_coop} tensor-core dispatches checked by kernel name");
    assert!(!expected || ran_coop > 0, "MEMIT_EXPECT_TENSOR_CORES is set but no product was seen on tensor cores (timestamps needed)");
}

/// Products with at most 8 rows of A take the one-column-per-invocation
/// kernel on a GPU (the direct kernel on a CPU adapter): every row count up
/// to 8 (and 9, back on the tiles), columns across several workgroups and a
/// ragged end, both layouts of B, f16 B, K = 1, and alpha/beta accumulation.
#[test]
fn matmul_with_few_rows() {
    for ctx in kernel_variants() {
        check_few_rows(&ctx);
    }
}

fn check_few_rows(ctx: &GpuContext) {
    for m in 1..=9 {
        for (k, n) in [(77, 200), (1, 65), (300, 3)] {
            for tb in [false, true] {
                check_matmul(&ctx, m, k, n, false, tb, (DType::F32, DType::F32), (m * 1000 + k + n) as u64);
            }
            check_matmul(&ctx, m, k, n, false, true, (DType::F32, DType::F16), (m * 2000 + k) as u64);
        }
    }
    // K = 4100 (an unembedding's backward): a GPU splits such products
    // along K (`matmul_big`).
    for m in [1, 8] {
        check_matmul(&ctx, m, 4100, 70, false, false, (DType::F32, DType::F32), m as u64);
    }
    let (m, k, n) = (5, 40, 130);
    let mut rng = Rng::new(8);
    let (a, b, c0) = (rng.vec(m * k, 1.0), rng.vec(n * k, 1.0), rng.vec(m * n, 1.0));
    let ga = ctx.upload(&[m, k], &a, DType::F32).unwrap();
    let gb = ctx.upload(&[n, k], &b, DType::F32).unwrap();
    let gc = ctx.upload(&[m, n], &c0, DType::F32).unwrap();
    ctx.matmul_into(&ga, &gb, &gc, MatmulSpec { trans_b: true, alpha: 1.5, beta: -1.0, ..Default::default() }).unwrap();
    let (prod, mag) = cpu_matmul(&a, &b, m, k, n, false, true);
    let want: Vec<f64> = prod.iter().zip(&c0).map(|(p, &c)| 1.5 * p - c as f64).collect();
    let mag: Vec<f64> = mag.iter().zip(&c0).map(|(g, &c)| 1.5 * g + (c as f64).abs()).collect();
    assert_dot_close(&read(&ctx, &gc), &want, &mag, k + 1, "few rows, alpha/beta");
}

#[test]
fn matmul_alpha_beta_accumulate() {
    for ctx in kernel_variants() {
        check_alpha_beta(&ctx);
    }
}

fn check_alpha_beta(ctx: &GpuContext) {
    let (m, k, n) = (37, 45, 70);
    let mut rng = Rng::new(7);
    let (a, b, c0) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0), rng.vec(m * n, 1.0));
    let ga = ctx.upload(&[m, k], &a, DType::F32).unwrap();
    let gb = ctx.upload(&[k, n], &b, DType::F32).unwrap();
    let gc = ctx.upload(&[m, n], &c0, DType::F32).unwrap();
    ctx.matmul_into(&ga, &gb, &gc, MatmulSpec { alpha: -0.5, beta: 2.0, ..Default::default() }).unwrap();
    let (prod, mag) = cpu_matmul(&a, &b, m, k, n, false, false);
    let want: Vec<f64> = prod.iter().zip(&c0).map(|(p, &c)| -0.5 * p + 2.0 * c as f64).collect();
    let mag: Vec<f64> = mag.iter().zip(&c0).map(|(g, &c)| 0.5 * g + 2.0 * (c as f64).abs()).collect();
    assert_dot_close(&read(&ctx, &gc), &want, &mag, k + 1, "alpha/beta");
}

#[test]
fn matmul_batched_and_shared_weight() {
    let ctx = ctx();
    let (batch, m, k, n) = (5, 19, 33, 21);
    let mut rng = Rng::new(11);
    let a = rng.vec(batch * m * k, 1.0);
    let b = rng.vec(batch * n * k, 1.0);
    let ga = ctx.upload(&[batch, m, k], &a, DType::F32).unwrap();
    let gb = ctx.upload(&[batch, n, k], &b, DType::F32).unwrap();
    let c = read(&ctx, &ctx.matmul(&ga, &gb, false, true).unwrap());
    for z in 0..batch {
        let (want, mag) = cpu_matmul(&a[z * m * k..][..m * k], &b[z * n * k..][..n * k], m, k, n, false, true);
        assert_dot_close(&c[z * m * n..][..m * n], &want, &mag, k, &format!("batch item {z}"));
    }
    // A weight [k, n] shared by every batch item.
    let w = rng.vec(k * n, 1.0);
    let gw = ctx.upload(&[k, n], &w, DType::F32).unwrap();
    let c = read(&ctx, &ctx.matmul(&ga, &gw, false, false).unwrap());
    let (want, mag) = cpu_matmul(&a, &w, batch * m, k, n, false, false);
    assert_dot_close(&c, &want, &mag, k, "shared weight");
}

#[test]
fn matmul_over_many_chunks() {
    let ctx = tiny_chunk_ctx();
    // 4 KiB chunks: a [300, 50] f32 operand spans 15 buffers.
    let probe = ctx.zeros(&[300, 50], DType::F32).unwrap();
    assert!(probe.n_chunks() > 10, "expected tiling, got {} chunks", probe.n_chunks());
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        check_matmul(&ctx, 300, 50, 70, ta, tb, (DType::F32, DType::F32), 31);
        check_matmul(&ctx, 45, 300, 50, ta, tb, (DType::F32, DType::F32), 32);
        check_matmul(&ctx, 20, 41, 300, ta, tb, (DType::F16, DType::F16), 33);
    }
    let (batch, m, k, n) = (9, 13, 20, 11);
    let mut rng = Rng::new(34);
    let a = rng.vec(batch * m * k, 1.0);
    let b = rng.vec(batch * k * n, 1.0);
    let ga = ctx.upload(&[batch, m, k], &a, DType::F32).unwrap();
    let gb = ctx.upload(&[batch, k, n], &b, DType::F32).unwrap();
    assert!(ga.n_chunks() > 1);
    let c = read(&ctx, &ctx.matmul(&ga, &gb, false, false).unwrap());
    for z in 0..batch {
        let (want, mag) = cpu_matmul(&a[z * m * k..][..m * k], &b[z * k * n..][..k * n], m, k, n, false, false);
        assert_dot_close(&c[z * m * n..][..m * n], &want, &mag, k, &format!("chunked batch item {z}"));
    }
}

/// x·op(W) + bias + residual with both sums in the product's epilogue: the
/// tiled and few-row kernels, both weight layouts, f16 weights, K split
/// across chunks (the epilogue must be added once) and residuals whose
/// storage chunks differ from the output's.
#[test]
fn linear_epilogue_adds_bias_and_residual_once() {
    for ctx in [ctx(), other_kernels_ctx(), direct_kernels_ctx(), wide_kernels_ctx(), big_kernels_ctx(), split_kernels_ctx(), tiny_chunk_ctx()] {
        for (i, &(m, k, n)) in [(70, 33, 130), (5, 17, 3), (1, 64, 65), (8, 300, 20), (130, 300, 7), (70, 36, 132)].iter().enumerate() {
            for (tb, w_dtype) in [(true, DType::F32), (false, DType::F32), (true, DType::F16)] {
                let mut rng = Rng::new(500 + i as u64);
                let (x, w, bias, residual) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0), rng.vec(n, 1.0), rng.vec(m * n, 1.0));
                let gx = ctx.upload(&[m, k], &x, DType::F32).unwrap();
                let gw = ctx.upload(&stored_shape(k, n, tb), &w, w_dtype).unwrap();
                let gbias = ctx.upload(&[n], &bias, DType::F32).unwrap();
                let gres = ctx.upload(&[m, n], &residual, DType::F32).unwrap();
                let w_ref = if w_dtype == DType::F16 { f16_round(&w) } else { w.clone() };
                let (prod, mag) = cpu_matmul(&x, &w_ref, m, k, n, false, tb);
                for (with_bias, with_residual) in [(true, false), (false, true), (true, true)] {
                    let epilogue = Epilogue { bias: with_bias.then_some(&gbias), residual: with_residual.then_some(&gres) };
                    let got = read(&ctx, &ctx.linear(&gx, &gw, tb, epilogue).unwrap());
                    let extra = |j: usize| (if with_bias { bias[j % n] as f64 } else { 0.0 }) + (if with_residual { residual[j] as f64 } else { 0.0 });
                    let want: Vec<f64> = prod.iter().enumerate().map(|(j, p)| p + extra(j)).collect();
                    let mag: Vec<f64> = mag.iter().enumerate().map(|(j, g)| g + extra(j).abs()).collect();
                    assert_dot_close(&got, &want, &mag, k + 2, &format!("linear {m}x{k}x{n} tb={tb} {w_dtype:?} bias={with_bias} residual={with_residual}"));
                }
            }
        }
    }
}

/// An MLP's input projection with its activation in the epilogue: the
/// pre-activations against a float64 product, the activations against the
/// reference formula applied to them; gated (gate | up rows, act(gate)·up)
/// and plain, tiled and few-row kernels, both weight layouts, f16 weights,
/// bias, 3-D inputs, feature counts that are not tile multiples, and
/// weights that span several bindings (the two-dispatch fallback). The
/// fused path takes one dispatch.
#[test]
fn activated_linear_matches_product_then_activation() {
    // A context of its own: tests running beside this one would add their
    // dispatches to a shared context's counters.
    let own = pollster::block_on(GpuContext::new(Default::default())).expect("a GPU adapter");
    let own_other = pollster::block_on(GpuContext::new(other_kernels_options())).expect("a GPU adapter");
    let own_direct = pollster::block_on(GpuContext::new(direct_kernels_options())).expect("a GPU adapter");
    let own_wide = pollster::block_on(GpuContext::new(wide_kernels_options())).expect("a GPU adapter");
    let own_big = pollster::block_on(GpuContext::new(big_kernels_options())).expect("a GPU adapter");
    let own_split = pollster::block_on(GpuContext::new(split_kernels_options())).expect("a GPU adapter");
    // (weights over several bindings, products split along K, context)
    for (chunked, split, ctx) in [(false, false, own), (false, false, own_other), (false, false, own_direct), (false, false, own_wide), (false, false, own_big), (false, true, own_split), (true, false, tiny_chunk_ctx())] {
        for (i, &(batch, m, k, n)) in [(1, 70, 33, 130), (1, 5, 17, 6), (1, 1, 64, 66), (1, 8, 300, 20), (1, 130, 30, 14), (3, 9, 40, 200), (1, 70, 36, 132), (1, 20, 300, 40)].iter().enumerate() {
            if chunked && batch > 1 {
                continue; // a [9, 200] output row is wider than a 4 KiB chunk
            }
            for (tb, w_dtype, with_bias) in [(true, DType::F32, false), (false, DType::F32, true), (true, DType::F16, true)] {
                for (gated, act, f) in [(true, Activation::Silu, cpu_silu as fn(f64) -> f64), (false, Activation::GeluTanh, cpu_gelu_tanh)] {
                    let what = format!("activated {batch}x{m}x{k}x{n} tb={tb} {w_dtype:?} bias={with_bias} gated={gated} chunked={chunked}");
                    let rows = batch * m;
                    let mut rng = Rng::new(900 + i as u64);
                    let (x, w, bias) = (rng.vec(rows * k, 1.0), rng.vec(k * n, 1.0), rng.vec(n, 1.0));
                    let x_shape = if batch > 1 { vec![batch, m, k] } else { vec![m, k] };
                    let gx = ctx.upload(&x_shape, &x, DType::F32).unwrap();
                    let gw = ctx.upload(&stored_shape(k, n, tb), &w, w_dtype).unwrap();
                    let gbias = ctx.upload(&[n], &bias, DType::F32).unwrap();
                    let before = ctx.counters().dispatches;
                    let (pre, keys) = ctx.linear_activated(&gx, &gw, tb, with_bias.then_some(&gbias), act, gated).unwrap();
                    let dispatches = ctx.counters().dispatches - before;
                    let width = if gated { n / 2 } else { n };
                    let mut want_shape = x_shape.clone();
                    *want_shape.last_mut().unwrap() = width;
                    assert_eq!(keys.shape(), &want_shape[..], "{what}");
                    if !chunked {
                        // A split product: its partial sums, then their sum with the epilogue.
                        let want = if split && rows > 8 && k >= 128 { 2 } else { 1 };
                        assert_eq!(dispatches, want, "{what}: fused dispatches");
                    }
                    let w_ref = if w_dtype == DType::F16 { f16_round(&w) } else { w.clone() };
                    let (prod, mag) = cpu_matmul(&x, &w_ref, rows, k, n, false, tb);
                    let extra = |j: usize| if with_bias { bias[j % n] as f64 } else { 0.0 };
                    let want: Vec<f64> = prod.iter().enumerate().map(|(j, p)| p + extra(j)).collect();
                    let mag: Vec<f64> = mag.iter().enumerate().map(|(j, g)| g + extra(j).abs()).collect();
                    let got_pre = read(&ctx, &pre);
                    assert_dot_close(&got_pre, &want, &mag, k + 1, &what);
                    let want_keys: Vec<f64> = (0..rows * width)
                        .map(|j| {
                            let (r, c) = (j / width, j % width);
                            let at = |col: usize| got_pre[r * n + col] as f64;
                            if gated { f(at(c)) * at(c + width) } else { f(at(c)) }
                        })
                        .collect();
                    assert_close(&read(&ctx, &keys), &want_keys, 2e-6, 2e-7, &what);
                }
            }
        }
    }
}

/// Rows of several tensors copied after one another, across storage
/// chunks, in f32 and f16.
#[test]
fn concat_rows_copies_every_row_in_order() {
    for ctx in [ctx(), tiny_chunk_ctx()] {
        for dtype in [DType::F32, DType::F16] {
            let mut rng = Rng::new(77);
            let shapes = [(70, 18), (1, 18), (200, 18)];
            let hosts: Vec<Vec<f32>> = shapes.iter().map(|&(r, c)| rng.vec(r * c, 2.0)).collect();
            let parts: Vec<_> = shapes.iter().zip(&hosts).map(|(&(r, c), h)| ctx.upload(&[r, c], h, dtype).unwrap()).collect();
            let joined = ctx.concat_rows(&parts.iter().collect::<Vec<_>>()).unwrap();
            assert_eq!(joined.shape(), &[271, 18]);
            let all: Vec<f32> = hosts.concat();
            let want: Vec<f64> = if dtype == DType::F16 { f16_round(&all) } else { all }.iter().map(|&v| v as f64).collect();
            assert_close(&read(&ctx, &joined), &want, 0.0, 0.0, &format!("concat {dtype:?}"));
        }
        let a = ctx.zeros(&[3, 4], DType::F32).unwrap();
        let b = ctx.zeros(&[3, 5], DType::F32).unwrap();
        assert!(matches!(ctx.concat_rows(&[&a, &b]), Err(GpuError::Shape { .. })));
        let odd = ctx.zeros(&[3, 3], DType::F16).unwrap();
        assert!(matches!(ctx.concat_rows(&[&odd, &odd]), Err(GpuError::Shape { .. })));
    }
}

#[test]
fn row_views_across_chunks() {
    let ctx = tiny_chunk_ctx();
    let (rows, k, n) = (200, 30, 9);
    let mut rng = Rng::new(41);
    let a = rng.vec(rows * k, 1.0);
    let b = rng.vec(k * n, 1.0);
    let ga = ctx.upload(&[rows, k], &a, DType::F32).unwrap();
    let gb = ctx.upload(&[k, n], &b, DType::F32).unwrap();
    let view = ga.slice_rows(25..173).unwrap();
    assert!(view.n_chunks() > 1);
    assert_eq!(read(&ctx, &view), a[25 * k..173 * k].to_vec());
    let c = read(&ctx, &ctx.matmul(&view, &gb, false, false).unwrap());
    let (want, mag) = cpu_matmul(&a[25 * k..173 * k], &b, 148, k, n, false, false);
    assert_dot_close(&c, &want, &mag, k, "matmul of a view");
}

fn cpu_gram(keys: &[f32], n: usize, d: usize) -> Vec<f64> {
    let mut c = vec![0.0; d * d];
    for t in 0..n {
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] += keys[t * d + i] as f64 * keys[t * d + j] as f64;
            }
        }
    }
    c
}

/// Also through `matmul_wide` (d a multiple of 4): slabs of whole groups of
/// four tokens, the tiles taking the rest (17, 57 and 97 tokens per call;
/// 300 for more than one slab).
#[test]
fn syrk_accumulates_gram_matrix() {
    for (ctx, d, batches) in [(ctx(), 70, 3), (tiny_chunk_ctx(), 90, 2), (ctx(), 1, 2), (ctx(), 130, 1), (wide_kernels_ctx(), 68, 3), (ctx(), 132, 2), (wide_kernels_ctx(), 36, 8)] {
        let mut rng = Rng::new(d as u64);
        let c = ctx.zeros(&[d, d], DType::F32).unwrap();
        let comp = ctx.zeros(&[d, d], DType::F32).unwrap();
        let mut all = Vec::new();
        for batch in 0..batches {
            let n = if batch == 7 { 300 } else { 17 + 40 * (batch % 3) };
            let keys = rng.vec(n * d, 1.0);
            let gk = ctx.upload(&[n, d], &keys, DType::F32).unwrap();
            ctx.syrk_accumulate(&c, &comp, &gk, 1.0).unwrap();
            all.extend(keys);
        }
        ctx.mirror_upper(&c).unwrap();
        let n_total = all.len() / d;
        let want = cpu_gram(&all, n_total, d);
        let mag = cpu_gram(&all.iter().map(|v| v.abs()).collect::<Vec<_>>(), n_total, d);
        assert_dot_close(&read(&ctx, &c), &want, &mag, n_total, &format!("gram d={d} chunks={}", c.n_chunks()));
    }
}

#[test]
fn syrk_kahan_keeps_small_increments() {
    // 1 + 3000 increments of 4.9e-7: plain f32 addition drifts by ~4e-5
    // (each increment rounds to 4 ulps of 1.0); compensated sums do not.
    // C[0][0] of a 1×1 C by the tiles, and of a 4×4 C by `matmul_wide`
    // (keys of four tokens, one of them non-zero).
    for (ctx, d) in [(ctx(), 1), (wide_kernels_ctx(), 4)] {
        let c = ctx.zeros(&[d, d], DType::F32).unwrap();
        let comp = ctx.zeros(&[d, d], DType::F32).unwrap();
        let first_only = |v: f32| {
            let mut keys = vec![0.0f32; d * d];
            keys[0] = v;
            ctx.upload(&[d, d], &keys, DType::F32).unwrap()
        };
        ctx.syrk_accumulate(&c, &comp, &first_only(1.0), 1.0).unwrap();
        let small = first_only(0.0007);
        let steps = 3000;
        let mut naive = 1.0f32;
        for _ in 0..steps {
            ctx.syrk_accumulate(&c, &comp, &small, 1.0).unwrap();
            naive += 0.0007f32 * 0.0007f32;
        }
        let exact = 1.0 + steps as f64 * (0.0007f32 as f64 * 0.0007f32 as f64);
        assert!((naive as f64 - exact).abs() > 1e-5, "the test needs a case plain f32 gets wrong");
        let got = read(&ctx, &c)[0] as f64;
        assert!((got - exact).abs() < 2e-7, "d = {d}: compensated sum {got} vs exact {exact}");
    }
}

#[test]
fn binary_ops_with_broadcast() {
    for ctx in [ctx(), tiny_chunk_ctx()] {
        let mut rng = Rng::new(51);
        let shape = [37, 3, 29];
        let n = 37 * 3 * 29;
        let x = rng.vec(n, 2.0);
        let gx = ctx.upload(&shape, &x, DType::F32).unwrap();
        let same = rng.vec(n, 2.0).iter().map(|v| v + 3.0).collect::<Vec<_>>();
        let row = rng.vec(29, 2.0);
        let plane = rng.vec(3 * 29, 2.0);
        let cases: [(Vec<usize>, &Vec<f32>, fn(usize) -> usize); 3] = [
            (shape.to_vec(), &same, |i| i),
            (vec![29], &row, |i| i % 29),
            (vec![3, 29], &plane, |i| i % 87),
        ];
        for (yshape, y, index) in cases {
            let gy = ctx.upload(&yshape, y, DType::F32).unwrap();
            for (op, f) in [
                (BinaryOp::Add, (|a, b| a + b) as fn(f64, f64) -> f64),
                (BinaryOp::Sub, |a, b| a - b),
                (BinaryOp::Mul, |a, b| a * b),
                (BinaryOp::Div, |a, b| a / b),
            ] {
                let out = read(&ctx, &ctx.binary(op, &gx, &gy).unwrap());
                let want: Vec<f64> = (0..n).map(|i| f(x[i] as f64, y[index(i)] as f64)).collect();
                assert_close(&out, &want, 1e-6, 1e-6, &format!("{op:?} with y {yshape:?}"));
            }
        }
        let scalar = ctx.upload(&[1], &[0.25], DType::F32).unwrap();
        let out = read(&ctx, &ctx.binary(BinaryOp::Mul, &gx, &scalar).unwrap());
        assert_close(&out, &x.iter().map(|&v| v as f64 * 0.25).collect::<Vec<_>>(), 1e-7, 0.0, "scalar");
        let bad = ctx.upload(&[28], &vec![0.0; 28], DType::F32).unwrap();
        assert!(matches!(ctx.binary(BinaryOp::Add, &gx, &bad), Err(GpuError::Shape { .. })));
    }
}

#[test]
fn axpby_affine_fill_and_casts() {
    for ctx in [ctx(), tiny_chunk_ctx()] {
        let mut rng = Rng::new(61);
        let n = 2501;
        let (x, y) = (rng.vec(n, 3.0), rng.vec(n, 3.0));
        let gx = ctx.upload(&[n], &x, DType::F32).unwrap();
        let gy = ctx.upload(&[n], &y, DType::F32).unwrap();
        ctx.axpby(1.5, &gx, -0.5, &gy).unwrap();
        let want: Vec<f64> = x.iter().zip(&y).map(|(&a, &b)| 1.5 * a as f64 - 0.5 * b as f64).collect();
        assert_close(&read(&ctx, &gy), &want, 1e-6, 1e-6, "axpby");
        let aff = ctx.affine(&gx, 2.0, 1.0).unwrap();
        assert_close(&read(&ctx, &aff), &x.iter().map(|&v| 2.0 * v as f64 + 1.0).collect::<Vec<_>>(), 1e-6, 1e-6, "affine");
        ctx.fill(&aff, -7.5).unwrap();
        assert!(read(&ctx, &aff).iter().all(|&v| v == -7.5));

        let half = ctx.cast(&gx, DType::F16).unwrap();
        assert_eq!(half.dtype(), DType::F16);
        let rounded = f16_round(&x);
        assert_eq!(read(&ctx, &half), rounded, "f32 -> f16 rounds to nearest like `half`");
        let back = ctx.cast(&half, DType::F32).unwrap();
        assert_eq!(read(&ctx, &back), rounded);
        let uploaded_half = ctx.upload(&[n], &x, DType::F16).unwrap();
        assert_eq!(read(&ctx, &uploaded_half), rounded);
    }
}

fn cpu_silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// GPT-2's tanh-approximated GELU.
fn cpu_gelu_tanh(v: f64) -> f64 {
    0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
}

fn cpu_erf(z: f64) -> f64 {
    let a = z.abs();
    let value = if a < 2.5 {
        // Maclaurin series; converges to f64 precision for |z| < 2.5.
        let (mut term, mut sum, mut k) = (a, a, 0.0);
        while term.abs() > 1e-18 {
            k += 1.0;
            term *= -a * a / k;
            sum += term / (2.0 * k + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction for erfc, evaluated bottom-up.
        let mut frac = a;
        for n in (1..80).rev() {
            frac = a + (n as f64 / 2.0) / frac;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * frac)
    };
    value.copysign(z)
}

#[test]
fn activations_match_reference_formulas() {
    let ctx = ctx();
    let mut rng = Rng::new(71);
    let mut x = rng.vec(3001, 6.0);
    x.extend([0.0, 1e-4, -1e-4, 30.0, -30.0, 100.0, -100.0]);
    let gx = ctx.upload(&[x.len()], &x, DType::F32).unwrap();
    let erf_gelu = |v: f64| 0.5 * v * (1.0 + cpu_erf(v / std::f64::consts::SQRT_2));
    let relu = |v: f64| v.max(0.0);
    let cases: [(Activation, &dyn Fn(f64) -> f64); 4] =
        [(Activation::GeluTanh, &cpu_gelu_tanh), (Activation::GeluErf, &erf_gelu), (Activation::Silu, &cpu_silu), (Activation::Relu, &relu)];
    for (act, f) in cases {
        let got = read(&ctx, &ctx.activation(&gx, act).unwrap());
        let want: Vec<f64> = x.iter().map(|&v| f(v as f64)).collect();
        assert_close(&got, &want, 2e-6, 2e-7, &format!("{act:?}"));
    }
    // SwiGLU from rows of gate | up: 8 rows of 376.
    let (rows, f) = (8, x.len() / 8);
    let up = rng.vec(x.len(), 2.0);
    let gate_up: Vec<f32> = (0..rows).flat_map(|r| x[r * f..(r + 1) * f].iter().chain(&up[r * f..(r + 1) * f]).copied()).collect();
    let g_gate_up = ctx.upload(&[rows, 2 * f], &gate_up, DType::F32).unwrap();
    let got = read(&ctx, &ctx.gated_activation(&g_gate_up, Activation::Silu).unwrap());
    let want: Vec<f64> = x.iter().zip(&up).map(|(&g, &u)| cpu_silu(g as f64) * u as f64).collect();
    assert_close(&got, &want, 2e-6, 2e-7, "swiglu");
}

/// lavapipe has subgroups (8 wide), so there the default context's row
/// reductions must take them: the subgroup path is then what every
/// reduction test below checks beside `tree_reductions_ctx`.
#[test]
fn row_reductions_take_subgroups_on_lavapipe() {
    let ctx = ctx();
    if ctx.adapter_info().name.contains("llvmpipe") && std::env::var("MEMIT_SUBGROUPS").as_deref() != Ok("0") {
        assert!(ctx.subgroup_reductions(), "lavapipe reports subgroups, but row reductions do not use them");
    }
}

#[test]
fn reductions_over_last_dim() {
    for ctx in [ctx(), tiny_chunk_ctx(), tree_reductions_ctx()] {
        for (rows, len) in [(1, 1), (5, 255), (33, 257), (4, 1000), (300, 3)] {
            let mut rng = Rng::new((rows * len) as u64);
            let x = rng.vec(rows * len, 4.0);
            let gx = ctx.upload(&[rows, len], &x, DType::F32).unwrap();
            let row = |r: usize| &x[r * len..(r + 1) * len];
            let sum = read(&ctx, &ctx.reduce_last(&gx, ReduceOp::Sum, 1.0 / len as f32).unwrap());
            let max = read(&ctx, &ctx.reduce_last(&gx, ReduceOp::Max, 1.0).unwrap());
            let ssq = read(&ctx, &ctx.reduce_last(&gx, ReduceOp::SumOfSquares, 1.0).unwrap());
            let mean_want: Vec<f64> = (0..rows).map(|r| row(r).iter().map(|&v| v as f64).sum::<f64>() / len as f64).collect();
            let max_want: Vec<f64> = (0..rows).map(|r| row(r).iter().fold(f64::MIN, |m, &v| m.max(v as f64))).collect();
            let ssq_want: Vec<f64> = (0..rows).map(|r| row(r).iter().map(|&v| (v as f64).powi(2)).sum()).collect();
            assert_close(&sum, &mean_want, 1e-5, 1e-5, "mean");
            assert_close(&max, &max_want, 0.0, 0.0, "max");
            assert_close(&ssq, &ssq_want, 1e-5, 1e-5, "sum of squares");
        }
    }
}

fn cpu_softmax(row: &[f32], visible: usize, log: bool) -> Vec<f64> {
    let max = row[..visible].iter().fold(f64::MIN, |m, &v| m.max(v as f64));
    let total: f64 = row[..visible].iter().map(|&v| (v as f64 - max).exp()).sum();
    (0..row.len())
        .map(|j| match (j < visible, log) {
            (true, true) => row[j] as f64 - max - total.ln(),
            (true, false) => (row[j] as f64 - max).exp() / total,
            (false, true) => f64::NEG_INFINITY,
            (false, false) => 0.0,
        })
        .collect()
}

#[test]
fn softmax_and_log_softmax() {
    for ctx in [ctx(), tiny_chunk_ctx(), tree_reductions_ctx()] {
        for (rows, len) in [(1, 1), (7, 300), (40, 33), (3, 1025)] {
            if (len * 4) as u64 > ctx.chunk_bytes() {
                continue;
            }
            let mut rng = Rng::new(len as u64);
            // Large logits: a naive exp would overflow.
            let x = rng.vec(rows * len, 80.0);
            let gx = ctx.upload(&[rows, len], &x, DType::F32).unwrap();
            for log in [false, true] {
                let got = read(&ctx, &ctx.softmax(&gx, log, None).unwrap());
                let want: Vec<f64> = (0..rows).flat_map(|r| cpu_softmax(&x[r * len..][..len], len, log)).collect();
                assert_close(&got, &want, 1e-5, 1e-6, &format!("softmax log={log} {rows}x{len}"));
            }
        }
    }
}

#[test]
fn causal_softmax_masks_future_keys() {
    for ctx in [ctx(), tiny_chunk_ctx(), tree_reductions_ctx()] {
        // [batch*heads = 6, queries = 5, keys = 8]: 3 cached positions.
        let (blocks, queries, past) = (6, 5, 3);
        let keys = queries + past;
        let mut rng = Rng::new(81);
        let x = rng.vec(blocks * queries * keys, 3.0);
        let gx = ctx.upload(&[blocks, queries, keys], &x, DType::F32).unwrap();
        for log in [false, true] {
            let got = read(&ctx, &ctx.softmax(&gx, log, Some(Causal { queries, past })).unwrap());
            let want: Vec<f64> = (0..blocks * queries)
                .flat_map(|r| cpu_softmax(&x[r * keys..][..keys], r % queries + past + 1, log))
                .collect();
            assert_close(&got, &want, 1e-5, 1e-6, &format!("causal log={log}"));
        }
    }
}

#[test]
fn layer_norm_and_rms_norm() {
    for ctx in [ctx(), tiny_chunk_ctx(), other_kernels_ctx(), tree_reductions_ctx()] {
        for (rows, len) in [(1, 1), (9, 64), (17, 257), (3, 1600), (300, 24)] {
            if (len * 4) as u64 > ctx.chunk_bytes() {
                continue;
            }
            let mut rng = Rng::new(len as u64 + 5);
            let x: Vec<f32> = rng.vec(rows * len, 3.0).iter().map(|v| v + 10.0).collect();
            let (g, b) = (rng.vec(len, 1.0), rng.vec(len, 1.0));
            let gx = ctx.upload(&[rows, len], &x, DType::F32).unwrap();
            let gg = ctx.upload(&[len], &g, DType::F32).unwrap();
            let gb = ctx.upload(&[len], &b, DType::F32).unwrap();
            let eps = 1e-5;
            let ln = read(&ctx, &ctx.layer_norm(&gx, &gg, &gb, eps).unwrap());
            let rms = read(&ctx, &ctx.rms_norm(&gx, &gg, eps).unwrap());
            let mut ln_want = Vec::new();
            let mut rms_want = Vec::new();
            for r in 0..rows {
                let row: Vec<f64> = x[r * len..][..len].iter().map(|&v| v as f64).collect();
                let mean = row.iter().sum::<f64>() / len as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / len as f64;
                let ms = row.iter().map(|v| v * v).sum::<f64>() / len as f64;
                for j in 0..len {
                    ln_want.push((row[j] - mean) / (var + eps as f64).sqrt() * g[j] as f64 + b[j] as f64);
                    rms_want.push(row[j] / (ms + eps as f64).sqrt() * g[j] as f64);
                }
            }
            assert_close(&ln, &ln_want, 1e-4, 1e-4, &format!("layer_norm {rows}x{len}"));
            assert_close(&rms, &rms_want, 1e-5, 1e-5, &format!("rms_norm {rows}x{len}"));
        }
    }
}

#[test]
fn embedding_gathers_rows_from_chunked_tables() {
    for ctx in [ctx(), tiny_chunk_ctx()] {
        let (vocab, dim) = (503, 37);
        let mut rng = Rng::new(91);
        let table = rng.vec(vocab * dim, 1.0);
        let ids: Vec<u32> = (0..211).map(|_| rng.below(vocab) as u32).chain([0, vocab as u32 - 1]).collect();
        for dtype in [DType::F32, DType::F16] {
            let gt = ctx.upload(&[vocab, dim], &table, dtype).unwrap();
            let got = read(&ctx, &ctx.embedding(&gt, &ids).unwrap());
            let source = if dtype == DType::F16 { f16_round(&table) } else { table.clone() };
            let want: Vec<f32> = ids.iter().flat_map(|&id| source[id as usize * dim..][..dim].to_vec()).collect();
            assert_eq!(got, want, "{dtype:?} table in {} chunks", gt.n_chunks());
        }
        let gt = ctx.upload(&[vocab, dim], &table, DType::F32).unwrap();
        let err = ctx.embedding(&gt, &[5, vocab as u32]).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }
}

#[test]
fn shape_errors_are_reported_not_run() {
    let ctx = ctx();
    let a = ctx.zeros(&[4, 5], DType::F32).unwrap();
    let b = ctx.zeros(&[6, 7], DType::F32).unwrap();
    let err = ctx.matmul(&a, &b, false, false).unwrap_err();
    assert!(matches!(err, GpuError::Shape { op: "matmul", .. }), "{err}");
    assert!(err.to_string().contains("inner dimensions"), "{err}");
    assert!(a.reshape(&[3, 7]).is_err());
    assert!(a.slice_rows(2..9).is_err());
    let half = ctx.zeros(&[4, 5], DType::F16).unwrap();
    assert!(matches!(ctx.softmax(&half, false, None), Err(GpuError::Dtype { .. })));
    assert!(ctx.upload(&[2, 2], &[1.0; 3], DType::F32).is_err());
}

/// [positions, half, 2] table of (cos, sin) for inv_freq_i = base^(-2i/rot).
fn rope_table(max_pos: usize, rot: usize, base: f64) -> Vec<f32> {
    let mut t = Vec::new();
    for p in 0..max_pos {
        for i in 0..rot / 2 {
            let angle = p as f64 * base.powf(-2.0 * i as f64 / rot as f64);
            t.extend([angle.cos() as f32, angle.sin() as f32]);
        }
    }
    t
}

#[test]
fn rotary_both_styles_on_strided_heads() {
    let ctx = ctx();
    let (rows, heads, head_dim, rot, stride, offset, width) = (6, 3, 10, 6, 12, 5, 42);
    let layout = memit_gpu::HeadLayout { offset, head_stride: stride, n_heads: heads };
    let table = rope_table(16, rot, 10000.0);
    let gtable = ctx.upload(&[16, rot / 2, 2], &table, DType::F32).unwrap();
    let positions: Vec<u32> = vec![0, 1, 2, 7, 3, 15];
    for style in [memit_gpu::RotaryStyle::Interleaved, memit_gpu::RotaryStyle::Half] {
        let mut rng = Rng::new(5);
        let x = rng.vec(rows * width, 1.0);
        let gx = ctx.upload(&[rows, width], &x, DType::F32).unwrap();
        ctx.rotary(&gx, layout, rot, style, &gtable, &ctx.indices(&positions).unwrap()).unwrap();
        let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for r in 0..rows {
            for h in 0..heads {
                let base = r * width + offset + h * stride;
                for i in 0..rot / 2 {
                    let (c, s) = (table[(positions[r] as usize * rot / 2 + i) * 2] as f64, table[(positions[r] as usize * rot / 2 + i) * 2 + 1] as f64);
                    let (i1, i2) = match style {
                        memit_gpu::RotaryStyle::Interleaved => (base + 2 * i, base + 2 * i + 1),
                        memit_gpu::RotaryStyle::Half => (base + i, base + i + rot / 2),
                    };
                    let (x1, x2) = (x[i1] as f64, x[i2] as f64);
                    want[i1] = x1 * c - x2 * s;
                    want[i2] = x2 * c + x1 * s;
                }
                let _ = head_dim;
            }
        }
        assert_close(&read(&ctx, &gx), &want, 1e-6, 1e-6, &format!("{style:?}"));
    }
}

#[test]
fn attention_causal_padded_grouped() {
    for ctx in [ctx(), other_kernels_ctx()] {
        check_attention(&ctx);
    }
}

#[test]
fn attention_of_later_queries_against_all_keys() {
    // Queries from position 2 (sequence 0) and 1 (sequence 1) on, in their
    // own rows, against every key: the rows of the whole-batch result.
    for ctx in [ctx(), other_kernels_ctx()] {
        check_later_queries(ctx.as_ref(), (7, 4, 2, 8), &[(0, 7), (0, 5)], [2, 1], 6, 11);
    }
}

/// More keys than the backward pass allows (2,048): the forward kernels
/// take the softmax online, over 66 tiles of a GPU workgroup here.
#[test]
fn attention_over_more_than_2048_keys() {
    for ctx in [ctx(), other_kernels_ctx()] {
        check_later_queries(ctx.as_ref(), (2100, 2, 1, 8), &[(5, 2100), (0, 2083)], [2070, 2060], 30, 12);
    }
}

/// Queries from key position `starts[b]` on, `q_seq` rows of their own,
/// against all keys of two sequences of `seq` slots whose real keys are
/// `bounds`: the matching rows of the whole-batch float64 reference.
fn check_later_queries(ctx: &GpuContext, (seq, heads, kv_heads, hd): (usize, usize, usize, usize), bounds: &[(u32, u32); 2], starts: [usize; 2], q_seq: usize, seed: u64) {
    let width = (heads + 2 * kv_heads) * hd;
    let mut rng = Rng::new(seed);
    let x = rng.vec(2 * seq * width, 1.0);
    let mut q_rows = vec![0.0f32; 2 * q_seq * width];
    for b in 0..2 {
        for i in 0..q_seq.min(seq - starts[b]) {
            let from = (b * seq + starts[b] + i) * width;
            q_rows[(b * q_seq + i) * width..][..width].copy_from_slice(&x[from..from + width]);
        }
    }
    let gx = ctx.upload(&[2 * seq, width], &x, DType::F32).unwrap();
    let gq = ctx.upload(&[2 * q_seq, width], &q_rows, DType::F32).unwrap();
    let layout = |offset, n_heads| memit_gpu::HeadLayout { offset, head_stride: hd, n_heads };
    let flat: Vec<u32> = (0..2).flat_map(|b| [bounds[b].0, bounds[b].1, starts[b] as u32, 0]).collect();
    let rows = AttentionRows { q_seq, kv_seq: seq, bounds: &ctx.indices(&flat).unwrap() };
    let scale = 1.0 / (hd as f32).sqrt();
    let out = read(ctx, &ctx.attention((&gq, layout(0, heads)), (&gx, layout(heads * hd, kv_heads)), (&gx, layout((heads + kv_heads) * hd, kv_heads)), hd, rows, scale).unwrap());
    let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let full = cpu_attention(&xs, width, seq, heads, kv_heads, hd, bounds, scale as f64);
    let out_width = heads * hd;
    for b in 0..2 {
        for i in 0..q_seq.min(bounds[b].1 as usize - starts[b]) {
            let got = &out[(b * q_seq + i) * out_width..][..out_width];
            let want = &full[(b * seq + starts[b] + i) * out_width..][..out_width];
            assert_close(got, want, 1e-5, 1e-6, &format!("{seq} keys: query {i} of sequence {b} (CPU-style kernels: {})", ctx.cpu_kernels()));
        }
    }
}

/// Sequences longer than a GPU workgroup's 16 queries and its tiles of
/// keys (32 keys at head_dim 64, 16 at 96, 8 at 256), with padding inside
/// tiles: several query workgroups per sequence, the online softmax across
/// tiles, tiles a query sees none of, and the widest heads.
#[test]
fn attention_over_many_query_and_key_tiles() {
    for ctx in [ctx(), other_kernels_ctx()] {
        for (seq, heads, kv_heads, hd, bounds) in [(45, 2, 1, 64, [(3u32, 45u32), (0u32, 30u32)]), (37, 2, 2, 96, [(0, 37), (17, 36)]), (21, 1, 1, 256, [(1, 21), (0, 9)])] {
            check_attention_shape(ctx.as_ref(), (seq, heads, kv_heads, hd), &bounds, seq as u64);
        }
    }
}

fn check_attention(ctx: &std::sync::Arc<memit_gpu::GpuContext>) {
    // 2 sequences of 7 slots: the first left-padded (starts at 2), the
    // second right-padded (ends at 5). 4 query heads share 2 kv heads.
    check_attention_shape(ctx.as_ref(), (7, 4, 2, 8), &[(2, 7), (0, 5)], 9);
}

/// Attention over two sequences of `seq` slots whose real keys are
/// `bounds`, against the float64 reference.
fn check_attention_shape(ctx: &GpuContext, (seq, heads, kv_heads, hd): (usize, usize, usize, usize), bounds: &[(u32, u32); 2], seed: u64) {
    let rows = 2 * seq;
    let mut rng = Rng::new(seed);
    // One fused row per token: [q heads | k heads | v heads].
    let width = (heads + 2 * kv_heads) * hd;
    let x = rng.vec(rows * width, 1.0);
    let gx = ctx.upload(&[rows, width], &x, DType::F32).unwrap();
    let q = memit_gpu::HeadLayout { offset: 0, head_stride: hd, n_heads: heads };
    let k = memit_gpu::HeadLayout { offset: heads * hd, head_stride: hd, n_heads: kv_heads };
    let v = memit_gpu::HeadLayout { offset: (heads + kv_heads) * hd, head_stride: hd, n_heads: kv_heads };
    let scale = 1.0 / (hd as f32).sqrt();
    let out = read(ctx, &ctx.attention((&gx, q), (&gx, k), (&gx, v), hd, AttentionRows { q_seq: seq, kv_seq: seq, bounds: &key_bounds(ctx, bounds) }, scale).unwrap());
    let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let want = cpu_attention(&xs, width, seq, heads, kv_heads, hd, bounds, scale as f64);
    assert_close(&out, &want, 1e-5, 1e-6, &format!("attention {seq}×{heads}×{hd} (CPU-style kernels: {})", ctx.cpu_kernels()));
}
