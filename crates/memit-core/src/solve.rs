//! Step 3's linear system per layer: X = (λC + KᵀK)⁻¹Kᵀ, factored in f32 on
//! the GPU and refined against float64 residuals computed on the host
//! (preconditioned conjugate gradients), so the update ΔW = R·Xᵀ matches a
//! float64 solve to f32 precision.
//! C goes to the GPU once per factorisation, already scaled into λC + KKᵀ's
//! storage; refinements run against the host's C.

use memit_gpu::{DType, GpuError, MatmulSpec, SpdFactor};
use memit_models::Model;

use crate::edit::LayerCovariance;
use crate::error::{MemitError, Result};

/// Diagonal shifts tried, relative to the mean diagonal, when λC + KKᵀ is
/// numerically indefinite in f32; beyond the last the statistics are too
/// degenerate to trust.
const SOLVE_SHIFTS: [f32; 12] = [0.0, 1e-7, 2e-7, 5e-7, 1e-6, 2e-6, 5e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3];

/// The ridge (relative to the mean diagonal) kept in the refined system
/// when the f32 factorisation needed a shift: about the rounding level of
/// C's f32 entries, far below the shift itself.
const RIDGE: f64 = 1e-7;

/// Refinement stops once a correction changes X by less than this
/// (relative Frobenius norm): below f32's resolution of X itself.
const REFINE_TOLERANCE: f64 = 1e-8;
/// Enough for the unshifted factor (a few steps) and for shifted ones,
/// whose slow directions conjugate gradients remove one by one.
const MAX_REFINEMENTS: usize = 30;

/// The solution of one layer's system.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSolve {
    /// [n, d_ff]: row r is the solution for request r.
    pub x: Vec<f32>,
    /// Diagonal shift s (relative to the mean diagonal of λC + KKᵀ) the
    /// f32 factorisation needed; 0 unless f32 rounding left the matrix with
    /// a non-positive pivot. The shifted factor then only preconditions the
    /// float64 refinement of the unshifted system.
    pub shift: f32,
    /// Refinement iterations run, and the relative size of the last
    /// correction (an estimate of X's remaining error).
    pub refinements: usize,
    pub last_correction: f64,
}

/// Rows of λC computed on the host per upload (bounds the scratch).
const C_ROWS_PER_UPLOAD: usize = 1024;

/// Solves layer `cov.layer`'s system for `keys` ([n, d_ff]). The GPU holds
/// at most λC + KKᵀ (built in the solver's layout, then factored in place)
/// with K beside it while it is formed, then two [d_ff, n] tensors per
/// solve: the right-hand side, overwritten by the solution, and one
/// scratch. C itself is never on the GPU twice.
pub async fn solve_layer(model: &Model, cov: &LayerCovariance, keys: &[f32], n: usize, lambda: f32) -> Result<LayerSolve> {
    let ctx = &model.ctx;
    let d = model.config.d_ff;
    if keys.len() != n * d || cov.matrix.len() != d * d {
        return Err(MemitError::Hparams(format!("solve of layer {}: {} keys and a {}-entry C for {n} requests of width {d}", cov.layer, keys.len(), cov.matrix.len())));
    }
    let mut k_t = vec![0.0f64; d * n];
    for r in 0..n {
        for i in 0..d {
            k_t[i * n + r] = keys[r * d + i] as f64;
        }
    }
    let k_t32: Vec<f32> = k_t.iter().map(|&v| v as f32).collect();
    let trace = (0..d).map(|i| lambda as f64 * cov.matrix[i * d + i] as f64).sum::<f64>() + keys.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
    let mean_diagonal = trace / d as f64;
    let mut first_failure = None;
    for relative in SOLVE_SHIFTS {
        let shift = relative as f64 * mean_diagonal;
        // λC rounded to f32 on the host (as a GPU product would round it),
        // then KᵀK added on the GPU; K goes before the factorisation.
        let a = ctx.solver_matrix(d, d)?;
        for row0 in (0..d).step_by(C_ROWS_PER_UPLOAD) {
            let rows = C_ROWS_PER_UPLOAD.min(d - row0);
            let scaled: Vec<f32> = cov.matrix[row0 * d..(row0 + rows) * d].iter().map(|&v| lambda * v).collect();
            ctx.write(&a.slice_rows(row0..row0 + rows)?, &scaled)?;
        }
        {
            let k = ctx.upload(&[n, d], keys, DType::F32)?;
            ctx.matmul_into(&k, &k, &a, MatmulSpec { trans_a: true, beta: 1.0, ..Default::default() })?;
        }
        let factor = ctx.factor_spd(a, shift as f32)?;
        let x0 = ctx.solver_rhs(&factor, n)?;
        ctx.write(&x0, &k_t32)?;
        ctx.solve_factored_in_place(&factor, &x0)?;
        let mut read = ctx.read_all(&[&x0, factor.status()]).await?;
        drop(x0);
        match SpdFactor::check(read[1][0]) {
            Ok(()) => {}
            Err(GpuError::NotPositiveDefinite { pivot }) => {
                first_failure.get_or_insert(pivot);
                continue;
            }
            Err(other) => return Err(other.into()),
        }
        let x0: Vec<f64> = read.swap_remove(0).into_iter().map(f64::from).collect();
        // Refined in float64 against the system the factor is of. A shift
        // means C, known to f32 precision, has directions below that
        // precision (and may be indefinite there when read exactly), so the
        // smallest shift that makes it definite in f32 is kept as a ridge.
        let ridge = if relative > 0.0 { RIDGE * mean_diagonal } else { 0.0 };
        let system = System { c: &cov.matrix, lambda: lambda as f64, shift: ridge, keys, n, d };
        let factor = &factor;
        let precondition = |r: &[f64]| {
            let values: Vec<f32> = r.iter().map(|&v| v as f32).collect();
            async move {
                let r = ctx.solver_rhs(factor, n)?;
                ctx.write(&r, &values)?;
                ctx.solve_factored_in_place(factor, &r)?;
                Ok::<_, MemitError>(ctx.read(&r).await?.into_iter().map(f64::from).collect::<Vec<f64>>())
            }
        };
        let (x, refinements, last_correction) = conjugate_gradients(&system, &k_t, x0, n, precondition).await?;
        let mut out = vec![0.0f32; n * d];
        for i in 0..d {
            for r in 0..n {
                out[r * d + i] = x[i * n + r] as f32;
            }
        }
        return Ok(LayerSolve { x: out, shift: relative, refinements, last_correction });
    }
    Err(MemitError::Stats(format!(
        "λC + KKᵀ of layer {} is not positive definite (pivot {}, still with a diagonal shift of {:e} of its mean diagonal): collect statistics over more text or raise mom2_update_weight",
        cov.layer,
        first_failure.unwrap_or_default(),
        SOLVE_SHIFTS[SOLVE_SHIFTS.len() - 1]
    )))
}

/// Conjugate gradients preconditioned by the f32 factor on the n columns of A·X = B at once
/// (each column with its own step sizes), from `x`, in f64, with
/// `precondition(r)` ≈ A⁻¹r. Flexible (Polak–Ribière) updates, since the
/// preconditioner rounds its input to f32. Returns X, the iterations run
/// and the relative size of the last correction.
async fn conjugate_gradients<F, Fut>(system: &System<'_>, b: &[f64], mut x: Vec<f64>, n: usize, precondition: F) -> Result<(Vec<f64>, usize, f64)>
where
    F: Fn(&[f64]) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<f64>>>,
{
    let column_dots = |u: &[f64], v: &[f64]| -> Vec<f64> {
        let mut dots = vec![0.0; n];
        for (i, (a, b)) in u.iter().zip(v).enumerate() {
            dots[i % n] += a * b;
        }
        dots
    };
    let mut r = system.residual(b, &x);
    let (mut p, mut z_prev, mut r_prev): (Vec<f64>, Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new(), Vec::new());
    let (mut iterations, mut last_correction) = (0, f64::INFINITY);
    while iterations < MAX_REFINEMENTS {
        let z = precondition(&r).await?;
        if iterations == 0 {
            p = z.clone();
        } else {
            let diff: Vec<f64> = r.iter().zip(&r_prev).map(|(a, b)| a - b).collect();
            let (num, den) = (column_dots(&z, &diff), column_dots(&z_prev, &r_prev));
            let beta: Vec<f64> = num.iter().zip(&den).map(|(&a, &b)| if b > 0.0 { (a / b).max(0.0) } else { 0.0 }).collect();
            for (i, pi) in p.iter_mut().enumerate() {
                *pi = z[i] + beta[i % n] * *pi;
            }
        }
        let q = system.apply(&p);
        let (rz, pq) = (column_dots(&r, &z), column_dots(&p, &q));
        if pq.iter().any(|&v| !(v > 0.0)) {
            // The system is not definite along p (in f64): stop where we are.
            break;
        }
        let alpha: Vec<f64> = rz.iter().zip(&pq).map(|(&a, &b)| a / b).collect();
        let (mut change, mut size) = (0.0f64, 0.0f64);
        r_prev = r.clone();
        for i in 0..x.len() {
            let step = alpha[i % n] * p[i];
            x[i] += step;
            r[i] -= alpha[i % n] * q[i];
            change += step * step;
            size += x[i] * x[i];
        }
        z_prev = z;
        iterations += 1;
        last_correction = (change / size.max(f64::MIN_POSITIVE)).sqrt();
        if last_correction < REFINE_TOLERANCE {
            break;
        }
    }
    Ok((x, iterations, last_correction))
}

/// λC + KᵀK + sI with C in f32 (as stored) and K [n, d], evaluated in f64.
struct System<'a> {
    c: &'a [f32],
    lambda: f64,
    shift: f64,
    keys: &'a [f32],
    n: usize,
    d: usize,
}

/// Rows of C converted to f64 per product, bounding the scratch memory.
const C_ROWS_PER_BLOCK: usize = 256;

impl System<'_> {
    /// B − A·X for B, X [d, n], in f64.
    fn residual(&self, b: &[f64], x: &[f64]) -> Vec<f64> {
        let mut r = b.to_vec();
        self.subtract_product(x, &mut r);
        r
    }

    /// A·X.
    fn apply(&self, x: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        self.subtract_product(x, &mut out);
        out.iter_mut().for_each(|v| *v = -*v);
        out
    }

    /// r −= A·X.
    fn subtract_product(&self, x: &[f64], r: &mut [f64]) {
        let (n, d) = (self.n, self.d);
        for (ri, xi) in r.iter_mut().zip(x) {
            *ri -= self.shift * xi;
        }
        // r −= λ·C·X, C streamed in row blocks.
        let mut block = vec![0.0f64; C_ROWS_PER_BLOCK * d];
        for row0 in (0..d).step_by(C_ROWS_PER_BLOCK) {
            let rows = C_ROWS_PER_BLOCK.min(d - row0);
            for (dst, &src) in block.iter_mut().zip(&self.c[row0 * d..(row0 + rows) * d]) {
                *dst = src as f64;
            }
            dgemm(rows, d, n, -self.lambda, (&block[..rows * d], d, 1), (x, n, 1), 1.0, (&mut r[row0 * n..(row0 + rows) * n], n));
        }
        // r −= Kᵀ·(K·X).
        let k: Vec<f64> = self.keys.iter().map(|&v| v as f64).collect();
        let mut kx = vec![0.0f64; n * n];
        dgemm(n, d, n, 1.0, (&k, d, 1), (x, n, 1), 0.0, (&mut kx, n));
        dgemm(d, n, n, -1.0, (&k, 1, d), (&kx, n, 1), 1.0, (r, n));
    }
}

/// C = alpha·A·B + beta·C for row-major C [m, n] (leading dimension given)
/// and A [m, k], B [k, n] given with their (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn dgemm(m: usize, k: usize, n: usize, alpha: f64, a: (&[f64], usize, usize), b: (&[f64], usize, usize), beta: f64, c: (&mut [f64], usize)) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 };
    assert!(a.0.len() >= last(m, k, a.1, a.2) && b.0.len() >= last(k, n, b.1, b.2) && c.0.len() >= last(m, n, c.1, 1), "dgemm operands too short");
    // SAFETY: the assertion above keeps every index the strides reach
    // inside the slices, and C does not alias A or B (distinct borrows).
    unsafe {
        matrixmultiply::dgemm(m, k, n, alpha, a.0.as_ptr(), a.1 as isize, a.2 as isize, b.0.as_ptr(), b.1 as isize, b.2 as isize, beta, c.0.as_mut_ptr(), c.1 as isize, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_matches_a_direct_f64_evaluation() {
        let (n, d) = (3, 5);
        let c: Vec<f32> = (0..d * d).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let keys: Vec<f32> = (0..n * d).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
        let x: Vec<f64> = (0..d * n).map(|i| ((i * 3 % 7) as f64 - 3.0) / 2.0).collect();
        let b: Vec<f64> = (0..d * n).map(|i| i as f64 / 10.0).collect();
        let system = System { c: &c, lambda: 2.5, shift: 0.125, keys: &keys, n, d };
        let got = system.residual(&b, &x);
        for i in 0..d {
            for j in 0..n {
                let mut ax = 0.125 * x[i * n + j];
                for l in 0..d {
                    let kk: f64 = (0..n).map(|r| keys[r * d + i] as f64 * keys[r * d + l] as f64).sum();
                    ax += (2.5 * c[i * d + l] as f64 + kk) * x[l * n + j];
                }
                let want = b[i * n + j] - ax;
                assert!((got[i * n + j] - want).abs() < 1e-12, "({i}, {j}): {} vs {want}", got[i * n + j]);
            }
        }
    }
}
