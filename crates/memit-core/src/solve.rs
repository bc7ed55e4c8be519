//! Step 3's linear system per layer: X = (λC + KᵀK)⁻¹Kᵀ, factored in f32 on
//! the GPU and refined against float64 residuals computed on the host
//! (preconditioned conjugate gradients), so the update ΔW = R·Xᵀ matches a
//! float64 solve to f32 precision; MEMIT systems up to 512 wide that are
//! comfortably definite are solved in float64 on the host outright.
//! C goes to the GPU once per factorisation, already scaled into λC + KKᵀ's
//! storage; refinements run against the host's C.

use std::sync::Arc;

use memit_gpu::{DType, GpuContext, GpuError, MatmulSpec, SpdFactor, Tensor};
use memit_models::Model;

use crate::edit::LayerCovariance;
use crate::error::{MemitError, Result};

/// Diagonal shifts tried, relative to the mean diagonal, when λC + KKᵀ is
/// numerically indefinite in f32; beyond the last the statistics are too
/// degenerate to trust.
const SOLVE_SHIFTS: [f32; 12] = [0.0, 1e-7, 2e-7, 5e-7, 1e-6, 2e-6, 5e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3];

/// The ridge (relative to the mean diagonal) kept in the refined system
/// when the f32 factorisation needed a shift: about the rounding level of
/// C's f32 entries, far below the shift itself (unless that system is
/// indefinite in f64; see `LayerSolve::ridge`).
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
    /// float64 refinement.
    pub shift: f32,
    /// The ridge (relative to the same mean diagonal) of the system refined
    /// in float64: 0 without a shift; with one, 1e-7 (C's f32 precision),
    /// or s itself where λC + KKᵀ + 1e-7·I is indefinite in float64 (C's
    /// f32 rounding below that: a covariance of rank far below d_ff).
    pub ridge: f64,
    /// Refinement iterations run, and the relative size of the last
    /// correction (an estimate of X's remaining error).
    pub refinements: usize,
    pub last_correction: f64,
}

/// Rows of λC computed on the host per upload (bounds the scratch).
const C_ROWS_PER_UPLOAD: usize = 1024;

/// One layer's linear system A·X = B, by editing method:
/// - MEMIT: A = λC + KᵀK, B = Kᵀ;
/// - MEMIT with accumulated keys: A = λC + Σ earlier KᵀK + KᵀK, B = Kᵀ;
/// - AlphaEdit: A = P(Σ earlier KᵀK + KᵀK)P + l2·I, B = P·Kᵀ, with P the
///   projector onto C's null space. The authors solve the unsymmetric
///   (P·S + l2·I)·X = P·Kᵀ; its solution lies in P's range (multiply by
///   I − P), where it equals that of this symmetric, definite system.
#[derive(Debug, Clone, Copy)]
pub struct LayerSystem<'a> {
    pub layer: usize,
    /// C ([d_ff, d_ff]) and its weight λ, for the MEMIT methods.
    pub covariance: Option<(&'a [f32], f32)>,
    /// The keys of earlier edits, Σ KᵀK ([d_ff, d_ff]).
    pub accumulated: Option<&'a [f32]>,
    /// P ([d_ff, d_ff], symmetric) for AlphaEdit.
    pub projector: Option<&'a [f32]>,
    /// The weight of I (AlphaEdit's L2).
    pub identity: f32,
}

impl<'a> LayerSystem<'a> {
    /// MEMIT's λC + KᵀK for `cov`.
    pub fn memit(cov: &'a LayerCovariance, lambda: f32) -> LayerSystem<'a> {
        LayerSystem { layer: cov.layer, covariance: Some((&cov.matrix, lambda)), accumulated: None, projector: None, identity: 0.0 }
    }
}

/// Solves layer `cov.layer`'s MEMIT system λC + KᵀK for `keys` ([n, d_ff]).
pub async fn solve_layer(model: &Model, cov: &LayerCovariance, keys: &[f32], n: usize, lambda: f32) -> Result<LayerSolve> {
    solve_system(&model.ctx, model.config.d_ff, &LayerSystem::memit(cov, lambda), keys, n).await
}

/// The widest MEMIT system (no projector) solved on the host where it is
/// comfortably definite in float64 (the case with statistics over more
/// tokens than d_ff): a float64
/// Cholesky of d = 512 is ~22 M multiply-adds (milliseconds), where the
/// GPU's blocked factorisation and its refinement are ~150 dispatches and
/// several host waits a layer (0.09 s on lavapipe, most of a 10-edit
/// edit of the bundled model).
pub const HOST_SOLVE_MAX_WIDTH: usize = 512;

/// Solves `system` for `keys` ([n, d]): MEMIT systems up to
/// [`HOST_SOLVE_MAX_WIDTH`] wide that are definite in float64 exactly on
/// the host ([`solve_definite_on_host`]), the rest on the GPU refined to
/// float64 accuracy ([`solve_system_on_gpu`]).
pub async fn solve_system(ctx: &Arc<GpuContext>, d: usize, system: &LayerSystem<'_>, keys: &[f32], n: usize) -> Result<LayerSolve> {
    if d <= HOST_SOLVE_MAX_WIDTH && system.projector.is_none() {
        if let Some(solved) = solve_definite_on_host(d, system, keys, n)? {
            return Ok(solved);
        }
    }
    solve_system_on_gpu(ctx, d, system, keys, n).await
}

/// Checks `system`'s shapes and returns B ([d, n] in f64: Kᵀ, or P·Kᵀ) and
/// the mean diagonal of A, which scales shifts and ridges.
fn right_hand_side(d: usize, system: &LayerSystem<'_>, keys: &[f32], n: usize) -> Result<(Vec<f64>, f64)> {
    let layer = system.layer;
    let square = [system.covariance.map(|c| c.0), system.accumulated, system.projector];
    if keys.len() != n * d || square.iter().flatten().any(|m| m.len() != d * d) {
        return Err(MemitError::Hparams(format!("solve of layer {layer}: {} keys for {n} requests of width {d}, or a matrix that is not {d}x{d}", keys.len())));
    }
    let mut k_t = vec![0.0f64; d * n];
    for r in 0..n {
        for i in 0..d {
            k_t[i * n + r] = keys[r * d + i] as f64;
        }
    }
    let b = match system.projector {
        None => k_t,
        Some(p) => {
            let mut b = vec![0.0f64; d * n];
            multiply_streamed(p, 1.0, &k_t, n, &mut b);
            b
        }
    };
    let diagonal = |m: &[f32], w: f64| (0..d).map(|i| w * m[i * d + i] as f64).sum::<f64>();
    let trace = system.covariance.map_or(0.0, |(c, l)| diagonal(c, l as f64))
        + system.accumulated.map_or(0.0, |a| diagonal(a, 1.0))
        + keys.iter().map(|&v| v as f64 * v as f64).sum::<f64>()
        + system.identity as f64 * d as f64;
    Ok((b, trace / d as f64))
}

/// Solves a MEMIT `system` (λC + Σ earlier KᵀK + KᵀK) for `keys` ([n, d])
/// exactly in float64 on the host: A from the matrices as stored, its
/// Cholesky factor, two triangular solves. None for a projected (AlphaEdit)
/// system, and where A is not comfortably definite in float64 (a pivot
/// below [`HOST_PIVOT_FLOOR`] of its mean diagonal: a covariance of rank
/// far below d, whose f32 rounding the GPU's factorisation would meet with
/// a shift): how much ridge such a system keeps decides how much its
/// weakest directions move, and the GPU path's shift ladder and
/// refinement decide that as they always have.
pub fn solve_definite_on_host(d: usize, system: &LayerSystem<'_>, keys: &[f32], n: usize) -> Result<Option<LayerSolve>> {
    if system.projector.is_some() {
        return Ok(None);
    }
    let (b, mean_diagonal) = right_hand_side(d, system, keys, n)?;
    // The lower triangle of A (without its identity term), row-major.
    let mut a = vec![0.0f64; d * d];
    for i in 0..d {
        let row = &mut a[i * d..i * d + i + 1];
        if let Some((c, lambda)) = system.covariance {
            row.iter_mut().zip(&c[i * d..]).for_each(|(o, &v)| *o = lambda as f64 * v as f64);
        }
        if let Some(acc) = system.accumulated {
            row.iter_mut().zip(&acc[i * d..]).for_each(|(o, &v)| *o += v as f64);
        }
    }
    for key in keys.chunks_exact(d) {
        for (i, &ki) in key.iter().enumerate() {
            let ki = ki as f64;
            a[i * d..i * d + i + 1].iter_mut().zip(key).for_each(|(o, &kj)| *o += ki * kj as f64);
        }
    }
    let Ok(l) = cholesky_lower(&a, d, system.identity as f64, HOST_PIVOT_FLOOR * mean_diagonal) else {
        return Ok(None);
    };
    let x = cholesky_solve(&l, d, &b, n);
    Ok(Some(LayerSolve { x: transposed_f32(&x, d, n), shift: 0.0, ridge: 0.0, refinements: 0, last_correction: 0.0 }))
}

/// X [d, n] in f64 as [n, d] in f32 (row r: request r's solution).
fn transposed_f32(x: &[f64], d: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * d];
    for i in 0..d {
        for r in 0..n {
            out[r * d + i] = x[i * n + r] as f32;
        }
    }
    out
}

/// The smallest pivot, relative to A's mean diagonal, that the host's
/// factorisation accepts: about what f32 rounding of a 512-wide system
/// reaches (d·ε_f32), so the host takes only systems the GPU's f32
/// factorisation would take without a shift.
const HOST_PIVOT_FLOOR: f64 = 1e-5;

/// The Cholesky factor L (lower, row-major) of the lower triangle of `a`
/// plus `diagonal`·I, or the first pivot not above `floor`.
fn cholesky_lower(a: &[f64], d: usize, diagonal: f64, floor: f64) -> std::result::Result<Vec<f64>, usize> {
    let mut l = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let dot: f64 = l[i * d..i * d + j].iter().zip(&l[j * d..j * d + j]).map(|(x, y)| x * y).sum();
            let v = a[i * d + j] - dot;
            if i == j {
                let pivot = v + diagonal;
                if !(pivot > floor) {
                    return Err(i);
                }
                l[i * d + i] = pivot.sqrt();
            } else {
                l[i * d + j] = v / l[j * d + j];
            }
        }
    }
    Ok(l)
}

/// X = (L·Lᵀ)⁻¹·B for B, X [d, n] row-major.
fn cholesky_solve(l: &[f64], d: usize, b: &[f64], n: usize) -> Vec<f64> {
    let mut y = b.to_vec();
    // L·Y = B, row by row.
    for i in 0..d {
        let (done, rest) = y.split_at_mut(i * n);
        let row = &mut rest[..n];
        for k in 0..i {
            let lik = l[i * d + k];
            row.iter_mut().zip(&done[k * n..k * n + n]).for_each(|(o, &v)| *o -= lik * v);
        }
        row.iter_mut().for_each(|o| *o /= l[i * d + i]);
    }
    // Lᵀ·X = Y, from the last row up: each solved row is subtracted from
    // the rows above it (row i of L holds column i of Lᵀ).
    for i in (0..d).rev() {
        let (above, rest) = y.split_at_mut(i * n);
        let row = &mut rest[..n];
        row.iter_mut().for_each(|o| *o /= l[i * d + i]);
        for k in 0..i {
            let lik = l[i * d + k];
            above[k * n..k * n + n].iter_mut().zip(row.iter()).for_each(|(o, &v)| *o -= lik * v);
        }
    }
    y
}

/// Solves `system` for `keys` ([n, d]) on the GPU. The GPU holds at most A
/// (built in the solver's layout, then factored in place) with K beside it
/// while it is formed (and, for AlphaEdit, P and one product), then two
/// [d, n] tensors per solve: the right-hand side (B from the host's float64
/// copy), overwritten by the solution, and one scratch. No d×d matrix is
/// on the GPU twice.
pub async fn solve_system_on_gpu(ctx: &Arc<GpuContext>, d: usize, system: &LayerSystem<'_>, keys: &[f32], n: usize) -> Result<LayerSolve> {
    let layer = system.layer;
    // B in f64 (Kᵀ, or P·Kᵀ), and rounded to f32 for the first solve.
    let (b, mean_diagonal) = right_hand_side(d, system, keys, n)?;
    let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
    let mut first_failure = None;
    for relative in SOLVE_SHIFTS {
        let shift = relative as f64 * mean_diagonal;
        let a = assemble_system(ctx, d, system, keys, n)?;
        // A matrix that is not definite in f32 fails here at the cost of
        // the columns up to its bad pivot (or, for small systems, below
        // with the first solution's status).
        let factor = match ctx.factor_spd_checked(a, (shift + system.identity as f64) as f32).await {
            Ok(factor) => factor,
            Err(GpuError::NotPositiveDefinite { pivot }) => {
                first_failure.get_or_insert(pivot);
                continue;
            }
            Err(other) => return Err(other.into()),
        };
        let x0 = ctx.solver_rhs(&factor, n)?;
        ctx.write(&x0, &b32)?;
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
        // Refined in float64. A shift means C, known to f32 precision, has
        // directions below that precision, so a ridge at that precision is
        // kept; where C as stored is indefinite even with it (its f32
        // rounding negative beyond the ridge: little text behind a wide
        // C), the system refined is the shifted one the factor is of.
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
        let refine = |ridge: f64, x0: Vec<f64>| {
            let exact = System { terms: system, identity: system.identity as f64 + ridge * mean_diagonal, keys, n, d };
            let (b, precondition) = (&b, &precondition);
            async move { conjugate_gradients(&exact, b, x0, n, precondition).await }
        };
        let (ridge, refined) = if relative > 0.0 {
            match refine(RIDGE, x0.clone()).await? {
                refined if refined.indefinite => (relative as f64, refine(relative as f64, x0).await?),
                refined => (RIDGE, refined),
            }
        } else {
            (0.0, refine(0.0, x0).await?)
        };
        let Refined { x, iterations: refinements, last_correction, .. } = refined;
        return Ok(LayerSolve { x: transposed_f32(&x, d, n), shift: relative, ridge, refinements, last_correction });
    }
    let advice = if system.projector.is_some() { "raise l2" } else { "collect statistics over more text or raise mom2_update_weight" };
    Err(MemitError::Stats(format!(
        "the system of layer {layer} is not positive definite (pivot {}, still with a diagonal shift of {:e} of its mean diagonal): {advice}",
        first_failure.unwrap_or_default(),
        SOLVE_SHIFTS[SOLVE_SHIFTS.len() - 1]
    )))
}

/// A of `system` (without its identity term, which the factorisation
/// adds as a shift) on the GPU in the solver's layout, ready for
/// `factor_spd`: λC (+ Σ earlier KᵀK) rounded to f32 on the host, as a GPU
/// product would round it, then KᵀK added on the GPU (its lower triangle
/// only, which is all the factorisation reads); for AlphaEdit the whole
/// sum, then sandwiched by P.
pub fn assemble_system(ctx: &Arc<GpuContext>, d: usize, system: &LayerSystem<'_>, keys: &[f32], n: usize) -> Result<Tensor> {
    let a = ctx.solver_matrix(d, d)?;
    if system.covariance.is_some() || system.accumulated.is_some() {
        for row0 in (0..d).step_by(C_ROWS_PER_UPLOAD) {
            let rows = C_ROWS_PER_UPLOAD.min(d - row0);
            let span = row0 * d..(row0 + rows) * d;
            let mut block = vec![0.0f32; rows * d];
            if let Some((c, lambda)) = system.covariance {
                block.iter_mut().zip(&c[span.clone()]).for_each(|(o, &v)| *o = lambda * v);
            }
            if let Some(acc) = system.accumulated {
                block.iter_mut().zip(&acc[span]).for_each(|(o, &v)| *o += v);
            }
            ctx.write(&a.slice_rows(row0..row0 + rows)?, &block)?;
        }
    }
    let k = ctx.upload(&[n, d], keys, DType::F32)?;
    let Some(p) = system.projector else {
        // The factorisation reads the lower triangle alone.
        ctx.add_gram_lower(&a, &k, 1.0)?;
        return Ok(a);
    };
    ctx.matmul_into(&k, &k, &a, MatmulSpec { trans_a: true, beta: 1.0, ..Default::default() })?;
    drop(k);
    let p = ctx.upload(&[d, d], p, DType::F32)?;
    let sp = ctx.matmul(&a, &p, false, false)?;
    ctx.matmul_into(&p, &sp, &a, MatmulSpec::default())?;
    Ok(a)
}

/// What [`conjugate_gradients`] reached.
struct Refined {
    x: Vec<f64>,
    iterations: usize,
    /// The relative size of the last correction.
    last_correction: f64,
    /// Stopped because the system is not definite along a search
    /// direction (in f64).
    indefinite: bool,
}

/// Conjugate gradients preconditioned by the f32 factor on the n columns of A·X = B at once
/// (each column with its own step sizes), from `x`, in f64, with
/// `precondition(r)` ≈ A⁻¹r. Flexible (Polak–Ribière) updates, since the
/// preconditioner rounds its input to f32.
async fn conjugate_gradients<F, Fut>(system: &System<'_>, b: &[f64], mut x: Vec<f64>, n: usize, precondition: F) -> Result<Refined>
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
    let (mut iterations, mut last_correction, mut indefinite) = (0, f64::INFINITY, false);
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
            indefinite = true;
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
    Ok(Refined { x, iterations, last_correction, indefinite })
}

/// A of a [`LayerSystem`] plus `identity`·I (the AlphaEdit weight and any
/// ridge), with its matrices as stored in f32 and K [n, d], evaluated in
/// f64.
struct System<'a> {
    terms: &'a LayerSystem<'a>,
    identity: f64,
    keys: &'a [f32],
    n: usize,
    d: usize,
}

/// Rows of a d×d matrix converted to f64 per product, bounding the scratch.
const C_ROWS_PER_BLOCK: usize = 256;

/// out += w·M·X for M [d, d] in f32 (streamed in row blocks) and X, out
/// [d, n] in f64.
fn multiply_streamed(m: &[f32], w: f64, x: &[f64], n: usize, out: &mut [f64]) {
    let d = x.len() / n.max(1);
    let mut block = vec![0.0f64; C_ROWS_PER_BLOCK * d];
    for row0 in (0..d).step_by(C_ROWS_PER_BLOCK) {
        let rows = C_ROWS_PER_BLOCK.min(d - row0);
        for (dst, &src) in block.iter_mut().zip(&m[row0 * d..(row0 + rows) * d]) {
            *dst = src as f64;
        }
        dgemm(rows, d, n, w, (&block[..rows * d], d, 1), (x, n, 1), 1.0, (&mut out[row0 * n..(row0 + rows) * n], n));
    }
}

impl System<'_> {
    /// B − A·X for B, X [d, n], in f64.
    fn residual(&self, b: &[f64], x: &[f64]) -> Vec<f64> {
        let mut r = self.apply(x);
        r.iter_mut().zip(b).for_each(|(r, b)| *r = b - *r);
        r
    }

    /// A·X.
    fn apply(&self, x: &[f64]) -> Vec<f64> {
        let (n, d) = (self.n, self.d);
        // AlphaEdit: P·(S·(P·X)) + l2·X.
        let projected;
        let y = match self.terms.projector {
            Some(p) => {
                let mut px = vec![0.0; x.len()];
                multiply_streamed(p, 1.0, x, n, &mut px);
                projected = px;
                &projected
            }
            None => x,
        };
        let mut s = vec![0.0; x.len()];
        if let Some((c, lambda)) = self.terms.covariance {
            multiply_streamed(c, lambda as f64, y, n, &mut s);
        }
        if let Some(acc) = self.terms.accumulated {
            multiply_streamed(acc, 1.0, y, n, &mut s);
        }
        // + Kᵀ·(K·Y).
        let k: Vec<f64> = self.keys.iter().map(|&v| v as f64).collect();
        let mut ky = vec![0.0f64; n * n];
        dgemm(n, d, n, 1.0, (&k, d, 1), (y, n, 1), 0.0, (&mut ky, n));
        dgemm(d, n, n, 1.0, (&k, 1, d), (&ky, n, 1), 1.0, (&mut s, n));
        let mut out = match self.terms.projector {
            Some(p) => {
                let mut ps = vec![0.0; x.len()];
                multiply_streamed(p, 1.0, &s, n, &mut ps);
                ps
            }
            None => s,
        };
        for (o, xi) in out.iter_mut().zip(x) {
            *o += self.identity * xi;
        }
        out
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
        let terms = LayerSystem { layer: 0, covariance: Some((&c, 2.5)), accumulated: None, projector: None, identity: 0.0 };
        let system = System { terms: &terms, identity: 0.125, keys: &keys, n, d };
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
