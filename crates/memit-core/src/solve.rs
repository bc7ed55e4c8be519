//! Step 3b: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ for one layer.

use crate::error::{MemitError, Result};

/// Solves (λC + KᵀK) X = Kᵀ for X ([n, d_ff] row-major, one row per
/// request) in float64 by Cholesky, as the reference implementation does.
/// `cov` is C ([d_ff, d_ff]), `keys` is K ([n, d_ff]).
pub fn solve_keys(cov: &[f32], keys: &[f32], n: usize, d_ff: usize, lambda: f32) -> Result<Vec<f32>> {
    let mut a: Vec<f64> = cov.iter().map(|&c| lambda as f64 * c as f64).collect();
    for r in 0..n {
        let k = &keys[r * d_ff..][..d_ff];
        for i in 0..d_ff {
            let ki = k[i] as f64;
            if ki == 0.0 {
                continue;
            }
            let row = &mut a[i * d_ff..][..d_ff];
            for (j, &kj) in k.iter().enumerate().take(i + 1) {
                row[j] += ki * kj as f64;
            }
        }
    }
    // In-place lower Cholesky factor.
    for j in 0..d_ff {
        let mut diag = a[j * d_ff + j];
        for p in 0..j {
            diag -= a[j * d_ff + p] * a[j * d_ff + p];
        }
        if diag <= 0.0 || !diag.is_finite() {
            return Err(MemitError::Hparams(format!(
                "λC + KKᵀ is not positive definite (pivot {j}): the covariance statistics are degenerate; collect more text or raise mom2_update_weight"
            )));
        }
        let l_jj = diag.sqrt();
        a[j * d_ff + j] = l_jj;
        for i in j + 1..d_ff {
            let mut s = a[i * d_ff + j];
            for p in 0..j {
                s -= a[i * d_ff + p] * a[j * d_ff + p];
            }
            a[i * d_ff + j] = s / l_jj;
        }
    }
    let mut x = vec![0.0f32; n * d_ff];
    for r in 0..n {
        let mut y: Vec<f64> = keys[r * d_ff..][..d_ff].iter().map(|&v| v as f64).collect();
        for i in 0..d_ff {
            let mut s = y[i];
            for p in 0..i {
                s -= a[i * d_ff + p] * y[p];
            }
            y[i] = s / a[i * d_ff + i];
        }
        for i in (0..d_ff).rev() {
            let mut s = y[i];
            for p in i + 1..d_ff {
                s -= a[p * d_ff + i] * y[p];
            }
            y[i] = s / a[i * d_ff + i];
        }
        for (dst, v) in x[r * d_ff..][..d_ff].iter_mut().zip(&y) {
            *dst = *v as f32;
        }
    }
    Ok(x)
}
