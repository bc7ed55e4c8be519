//! AlphaEdit's projector onto the null space of the preserved knowledge:
//! P = Σ uᵢuᵢᵀ over the eigenvectors uᵢ of C whose eigenvalues fall under a
//! threshold τ (the authors take them from an SVD of C). On the GPU with
//! products alone, so it runs wherever the matmul does (browser included):
//! P = (I + sign(τI − C))/2, the matrix sign by the Newton–Schulz iteration
//! X ← X(3I − X²)/2 from X₀ = (τI − C)/s with s ≥ ‖τI − C‖₂. Each step
//! moves every eigenvalue of X towards ±1; an eigenvalue of C at relative
//! distance δ from τ needs about log₁.₅(s/(δτ)) steps, so the count is set
//! for δ = [`RESOLVED_BAND`]: eigenvalues closer to τ than that are
//! projected only in part, as they are by any f32 eigensolver near 1e-7·s.

use std::sync::Arc;

use memit_gpu::{DType, GpuContext, MatmulSpec};

use crate::edit::LayerCovariance;
use crate::error::{MemitError, Result};

/// Eigenvalues of C within this relative distance of the threshold may be
/// kept in part; all others are projected to f32 precision.
pub const RESOLVED_BAND: f64 = 1e-3;

/// Steps after an eigenvalue of X reaches one half: the quadratic phase
/// (error 0.31 → 0.15 → 3e-2 → 1.5e-3 → 3e-6 → 1e-11).
const CONVERGENCE_STEPS: usize = 6;
const MAX_STEPS: usize = 200;

/// One layer's null-space projector.
#[derive(Debug, Clone, PartialEq)]
pub struct NullSpaceProjector {
    pub layer: usize,
    /// [d_ff, d_ff] row-major, symmetric.
    pub matrix: Vec<f32>,
    /// trace(P): the dimension of the null space (fractional only for
    /// eigenvalues inside the band).
    pub dimension: f64,
    /// Newton–Schulz steps run.
    pub steps: usize,
}

/// The projector onto the span of C's eigenvectors with eigenvalues under
/// `threshold` (the AlphaEdit hyperparameter `nullspace_threshold`).
pub async fn null_space_projector(ctx: &Arc<GpuContext>, cov: &LayerCovariance, threshold: f32) -> Result<NullSpaceProjector> {
    let d = (cov.matrix.len() as f64).sqrt() as usize;
    if d * d != cov.matrix.len() || d == 0 {
        return Err(MemitError::Stats(format!("covariance of layer {} is not square ({} entries)", cov.layer, cov.matrix.len())));
    }
    if !(threshold.is_finite() && threshold > 0.0) {
        return Err(MemitError::Hparams(format!("nullspace_threshold = {threshold} must be a positive number")));
    }
    let tau = threshold as f64;
    let shifted = |i: usize, j: usize| if i == j { tau - cov.matrix[i * d + j] as f64 } else { -(cov.matrix[i * d + j] as f64) };
    // ‖τI − C‖_F bounds the spectral norm from above.
    let scale = (0..d).flat_map(|i| (0..d).map(move |j| (i, j))).map(|(i, j)| shifted(i, j).powi(2)).sum::<f64>().sqrt().max(tau);
    let steps = (((0.5 * scale / (RESOLVED_BAND * tau)).ln() / 1.5f64.ln()).ceil().max(0.0) as usize + CONVERGENCE_STEPS).min(MAX_STEPS);

    let mut x = ctx.empty(&[d, d], DType::F32)?;
    const ROWS: usize = 1024;
    for row0 in (0..d).step_by(ROWS) {
        let rows = ROWS.min(d - row0);
        let block: Vec<f32> = (row0..row0 + rows).flat_map(|i| (0..d).map(move |j| (i, j))).map(|(i, j)| (shifted(i, j) / scale) as f32).collect();
        ctx.write(&x.slice_rows(row0..row0 + rows)?, &block)?;
    }
    for _ in 0..steps {
        // X ← 1.5·X − 0.5·X·X²
        let square = ctx.matmul(&x, &x, false, false)?;
        let next = ctx.affine(&x, 1.5, 0.0)?;
        ctx.matmul_into(&x, &square, &next, MatmulSpec { alpha: -0.5, beta: 1.0, ..Default::default() })?;
        x = next;
    }
    let sign = ctx.read(&x).await?;
    let mut matrix = vec![0.0f32; d * d];
    for i in 0..d {
        for j in 0..d {
            let symmetric = 0.5 * (sign[i * d + j] as f64 + sign[j * d + i] as f64);
            matrix[i * d + j] = (0.5 * symmetric + if i == j { 0.5 } else { 0.0 }) as f32;
        }
    }
    if matrix.iter().any(|v| !v.is_finite()) {
        return Err(MemitError::Stats(format!("the null-space projector of layer {} is not finite: the covariance is corrupted", cov.layer)));
    }
    let dimension = (0..d).map(|i| matrix[i * d + i] as f64).sum();
    Ok(NullSpaceProjector { layer: cov.layer, matrix, dimension, steps })
}
