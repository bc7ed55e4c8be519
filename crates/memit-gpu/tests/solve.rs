//! The blocked Cholesky solve against a float64 CPU solve.

mod common;

use std::sync::{Arc, OnceLock};

use common::*;
use memit_gpu::{DType, GpuContext, GpuError, GpuOptions, FACTOR_PANEL, SpdFactor};

/// Panels of 64 rows for d ≈ 130, so factorisation crosses buffers.
fn panel_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::new(GpuOptions { max_chunk_bytes: Some(64 * 1024), ..Default::default() })).unwrap()).clone()
}

/// Bindings of 256 KiB: 64-row panels for d = 600, so the 256-column
/// factor panels straddle buffers.
fn wide_panel_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::new(GpuOptions { max_chunk_bytes: Some(256 * 1024), ..Default::default() })).unwrap()).clone()
}

/// A = λ·MᵀM/m + KᵀK: MEMIT's shape of system, moderately ill-conditioned
/// (m = 1.5·d samples keep the condition number in the hundreds at every d).
fn spd(d: usize, rng: &mut Rng) -> Vec<f64> {
    let m = d + 5 + d / 2;
    let mm: Vec<f32> = rng.vec(m * d, 1.0);
    let k: Vec<f32> = rng.vec(3 * d, 1.0);
    let mut a = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            let c: f64 = (0..m).map(|r| mm[r * d + i] as f64 * mm[r * d + j] as f64).sum::<f64>() / m as f64;
            let kk: f64 = (0..3).map(|r| k[r * d + i] as f64 * k[r * d + j] as f64).sum();
            a[i * d + j] = 50.0 * c + kk;
        }
    }
    a
}

fn cpu_solve(a: &[f64], b: &[f64], d: usize, n: usize) -> Vec<f64> {
    // Gaussian elimination with partial pivoting, float64.
    let mut m: Vec<f64> = a.to_vec();
    let mut x: Vec<f64> = b.to_vec();
    for col in 0..d {
        let piv = (col..d).max_by(|&i, &j| m[i * d + col].abs().total_cmp(&m[j * d + col].abs())).unwrap();
        for c in 0..d {
            m.swap(col * d + c, piv * d + c);
        }
        for c in 0..n {
            x.swap(col * n + c, piv * n + c);
        }
        for r in col + 1..d {
            let f = m[r * d + col] / m[col * d + col];
            for c in col..d {
                m[r * d + c] -= f * m[col * d + c];
            }
            for c in 0..n {
                x[r * n + c] -= f * x[col * n + c];
            }
        }
    }
    for col in (0..d).rev() {
        for c in 0..n {
            let mut s = x[col * n + c];
            for k in col + 1..d {
                s -= m[col * d + k] * x[k * n + c];
            }
            x[col * n + c] = s / m[col * d + col];
        }
    }
    x
}

#[test]
fn cholesky_solve_matches_f64_reference() {
    // Also with every trailing update and substitution product through
    // `matmul_direct` (SwiftShader's choice) and through `matmul_wide`
    // (lavapipe's above 32 rows; the backward substitution's products with
    // A transposed), lower-triangle skips included.
    let cases = [
        (ctx(), 1, 2),
        (ctx(), 63, 3),
        (ctx(), 64, 1),
        (ctx(), 65, 4),
        (ctx(), 200, 5),
        (panel_ctx(), 130, 3),
        (panel_ctx(), 250, 2),
        (ctx(), 300, 3),
        (wide_panel_ctx(), 600, 2),
        (direct_kernels_ctx(), 300, 3),
        (wide_kernels_ctx(), 300, 4),
        (wide_panel_ctx(), 600, 8),
        (big_kernels_ctx(), 300, 3),
    ];
    for (ctx, d, n) in cases {
        let mut rng = Rng::new(d as u64);
        let a = spd(d, &mut rng);
        let b: Vec<f32> = rng.vec(d * n, 1.0);
        let ga = ctx.upload(&[d, d], &a.iter().map(|&v| v as f32).collect::<Vec<_>>(), DType::F32).unwrap();
        let gb = ctx.upload(&[d, n], &b, DType::F32).unwrap();
        let x = read(&ctx, &pollster::block_on(ctx.solve_spd(&ga, &gb)).unwrap());
        let a32: Vec<f64> = a.iter().map(|&v| v as f32 as f64).collect();
        let want = cpu_solve(&a32, &b.iter().map(|&v| v as f64).collect::<Vec<_>>(), d, n);
        assert_close(&x, &want, 0.0, 1e-4 * want.iter().fold(0.0f64, |m, v| m.max(v.abs())), &format!("solve d={d} n={n} chunks={}", ga.n_chunks()));
    }
}

#[test]
fn indefinite_matrix_is_reported() {
    let ctx = ctx();
    let d = 70;
    let mut a = vec![0.0f32; d * d];
    for i in 0..d {
        a[i * d + i] = if i == 66 { -1.0 } else { 2.0 };
    }
    let ga = ctx.upload(&[d, d], &a, DType::F32).unwrap();
    let gb = ctx.upload(&[d, 1], &vec![1.0; d], DType::F32).unwrap();
    let err = pollster::block_on(ctx.solve_spd(&ga, &gb)).unwrap_err();
    assert_eq!(err, GpuError::NotPositiveDefinite { pivot: 66 });
}

/// A = MᵀM/m + KᵀK with m + 3 < d: semi-definite, so f32 rounding leaves
/// non-positive pivots (MEMIT's statistics from too little varied text).
/// With B = Kᵀ in A's range, a tiny shift still gives K·X of the exact
/// least-squares solution, which is all the weight update uses.
#[test]
fn shifted_solve_handles_a_semidefinite_matrix() {
    let ctx = panel_ctx();
    let (d, m, n) = (130, 60, 3);
    let mut rng = Rng::new(7);
    let mm: Vec<f32> = rng.vec(m * d, 1.0);
    let k: Vec<f32> = rng.vec(n * d, 1.0);
    let mut a = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            let c: f64 = (0..m).map(|r| mm[r * d + i] as f64 * mm[r * d + j] as f64).sum::<f64>() / m as f64;
            a[i * d + j] = c + (0..n).map(|r| k[r * d + i] as f64 * k[r * d + j] as f64).sum::<f64>();
        }
    }
    let k_t: Vec<f32> = (0..d * n).map(|e| k[(e % n) * d + e / n]).collect();
    let ga = ctx.upload(&[d, d], &a.iter().map(|&v| v as f32).collect::<Vec<_>>(), DType::F32).unwrap();
    let gb = ctx.upload(&[d, n], &k_t, DType::F32).unwrap();
    let unshifted = pollster::block_on(ctx.solve_spd(&ga, &gb));
    assert!(matches!(unshifted, Err(GpuError::NotPositiveDefinite { .. })), "the unshifted factorisation should meet a non-positive pivot");
    let mean_diagonal = (0..d).map(|i| a[i * d + i]).sum::<f64>() / d as f64;
    let x = read(&ctx, &pollster::block_on(ctx.solve_spd_shifted(&ga, &gb, (1e-5 * mean_diagonal) as f32)).unwrap());
    // Reference: float64 solve of A + 1e-12·I (definite in f64), projected on K.
    let mut a_reg = a.clone();
    for i in 0..d {
        a_reg[i * d + i] += 1e-12 * mean_diagonal;
    }
    let want = cpu_solve(&a_reg, &k_t.iter().map(|&v| v as f64).collect::<Vec<_>>(), d, n);
    let project = |x: &dyn Fn(usize) -> f64| -> Vec<f64> { (0..n * n).map(|e| (0..d).map(|i| k[(e / n) * d + i] as f64 * x(i * n + e % n)).sum()).collect() };
    let got = project(&|i| x[i] as f64);
    let want = project(&|i| want[i]);
    assert_close(&got.iter().map(|&v| v as f32).collect::<Vec<_>>(), &want, 1e-3, 1e-4, "K·X of the shifted solve");
}

/// A + α·KᵀK on the lower triangle, with A in 64-row bindings and K
/// spanning two bindings, against float64.
/// Also through `matmul_wide` (A transposed, lower-triangle skips).
#[test]
fn gram_of_keys_is_added_to_the_lower_triangle() {
    let wide = pollster::block_on(GpuContext::new(GpuOptions { max_chunk_bytes: Some(64 * 1024), ..wide_kernels_options() })).unwrap();
    for (ctx, d) in [(panel_ctx(), 130), (wide, 132)] {
        gram_is_added_to_the_lower_triangle(&ctx, d);
    }
}

fn gram_is_added_to_the_lower_triangle(ctx: &GpuContext, d: usize) {
    let (n, alpha) = (200, 0.75);
    let mut rng = Rng::new(11);
    let base: Vec<f32> = rng.vec(d * d, 1.0);
    let keys: Vec<f32> = rng.vec(n * d, 1.0);
    let a = ctx.solver_matrix(d, d).unwrap();
    ctx.write(&a, &base).unwrap();
    let k = ctx.upload(&[n, d], &keys, DType::F32).unwrap();
    assert!(a.n_chunks() > 1 && k.n_chunks() > 1, "A in {} and K in {} bindings", a.n_chunks(), k.n_chunks());
    ctx.add_gram_lower(&a, &k, alpha).unwrap();
    let got = read(ctx, &a);
    let (mut lower, mut want) = (Vec::new(), Vec::new());
    for i in 0..d {
        for j in 0..=i {
            let kk: f64 = (0..n).map(|r| keys[r * d + i] as f64 * keys[r * d + j] as f64).sum();
            lower.push(got[i * d + j]);
            want.push(base[i * d + j] as f64 + alpha as f64 * kk);
        }
    }
    assert_close(&lower, &want, 1e-5, 1e-4, "lower triangle of A + αKᵀK");
}

/// The checked factorisation stops at the panel holding a bad pivot (a
/// fraction of the dispatches of the whole), and factors a definite
/// matrix as the unchecked one does.
#[test]
fn checked_factorisation_stops_at_the_first_bad_pivot() {
    // A context of its own, so other tests' dispatches are not counted.
    let ctx = pollster::block_on(GpuContext::new(GpuOptions::default())).unwrap();
    let d = 1300;
    let diagonal = |bad: Option<usize>| {
        let mut a = vec![0.0f32; d * d];
        for i in 0..d {
            a[i * d + i] = if Some(i) == bad { -1.0 } else { 2.0 + (i % 7) as f32 };
        }
        ctx.upload(&[d, d], &a, DType::F32).unwrap()
    };
    let dispatches = |f: &dyn Fn() -> Result<(), GpuError>| {
        let before = ctx.counters().dispatches;
        let outcome = f();
        (outcome, ctx.counters().dispatches - before)
    };
    let (whole, all) = dispatches(&|| ctx.factor_spd(diagonal(Some(10)), 0.0).map(drop));
    whole.unwrap();
    let (checked, stopped) = dispatches(&|| pollster::block_on(ctx.factor_spd_checked(diagonal(Some(10)), 0.0)).map(drop));
    assert_eq!(checked.unwrap_err(), GpuError::NotPositiveDefinite { pivot: 10 });
    assert!(stopped * 3 < all, "stopped after {stopped} of {all} dispatches (first panel: {FACTOR_PANEL} columns)");
    let factor = pollster::block_on(ctx.factor_spd_checked(diagonal(None), 0.0)).unwrap();
    let b: Vec<f32> = (0..d).map(|i| i as f32).collect();
    let x = ctx.solve_factored(&factor, &ctx.upload(&[d, 1], &b, DType::F32).unwrap()).unwrap();
    let want: Vec<f64> = (0..d).map(|i| i as f64 / (2.0 + (i % 7) as f64)).collect();
    assert_close(&read(&ctx, &x), &want, 1e-6, 1e-6, "solve with the checked factor");
    SpdFactor::check(read(&ctx, factor.status())[0]).unwrap();
}
