//! The sequential-editing methods' linear algebra against float64
//! references written here: AlphaEdit's null-space projector against a
//! covariance whose eigendecomposition is known by construction, and the
//! memit-seq and AlphaEdit solves against the authors' formulas solved by
//! Gaussian elimination (AlphaEdit's unsymmetric system as they write it).

use std::sync::{Arc, OnceLock};

use memit_core::{null_space_projector, solve_definite_on_host, solve_system, solve_system_on_gpu, LayerCovariance, LayerSystem};
use memit_gpu::GpuContext;
use memit_models::SplitMix64;

/// `count` seeded N(0, 1) draws.
fn normals(rng: &mut SplitMix64, count: usize) -> Vec<f64> {
    (0..count.div_ceil(2)).flat_map(|_| {
        let (a, b) = rng.normals();
        [a, b]
    }).take(count).collect()
}

fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (lavapipe on CPU-only machines)")).clone()
}

/// An orthonormal basis of R^d (columns of the returned row-major matrix),
/// by Gram–Schmidt applied twice to seeded normals.
fn orthonormal_basis(d: usize, seed: u64) -> Vec<f64> {
    let mut rng = SplitMix64(seed);
    let mut columns: Vec<Vec<f64>> = Vec::new();
    for _ in 0..d {
        let mut v = normals(&mut rng, d);
        for _ in 0..2 {
            for u in &columns {
                let dot: f64 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(x, y)| *x -= dot * y);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        columns.push(v);
    }
    let mut q = vec![0.0; d * d];
    for (k, col) in columns.iter().enumerate() {
        for i in 0..d {
            q[i * d + k] = col[i];
        }
    }
    q
}

/// Q·diag(λ)·Qᵀ, and the projector onto the eigenvectors with λ < τ.
fn spectral(q: &[f64], eigenvalues: &[f64], tau: f64) -> (Vec<f64>, Vec<f64>) {
    let d = eigenvalues.len();
    let (mut c, mut p) = (vec![0.0; d * d], vec![0.0; d * d]);
    for i in 0..d {
        for j in 0..d {
            for k in 0..d {
                let outer = q[i * d + k] * q[j * d + k];
                c[i * d + j] += eigenvalues[k] * outer;
                if eigenvalues[k] < tau {
                    p[i * d + j] += outer;
                }
            }
        }
    }
    (c, p)
}

/// Eigenvalues spread over eight decades, none within a factor of two of
/// τ, a few exactly zero (directions no statistics text reached).
fn spread_spectrum(d: usize, tau: f64) -> Vec<f64> {
    (0..d)
        .map(|i| {
            if i < 3 {
                return 0.0;
            }
            let v = 10f64.powf(-6.0 + 7.7 * i as f64 / (d - 1) as f64);
            if v > tau / 2.0 && v < 2.0 * tau {
                if v < tau {
                    tau / 4.0
                } else {
                    4.0 * tau
                }
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn null_space_projector_matches_the_eigendecomposition() {
    let (d, tau) = (97, 2e-2);
    let q = orthonormal_basis(d, 7);
    let eigenvalues = spread_spectrum(d, tau);
    let (c, want) = spectral(&q, &eigenvalues, tau);
    let cov = LayerCovariance { layer: 3, matrix: c.iter().map(|&v| v as f32).collect(), n_tokens: 1000 };
    let got = pollster::block_on(null_space_projector(&ctx(), &cov, tau as f32)).unwrap();
    let null_dim = eigenvalues.iter().filter(|&&v| v < tau).count();
    let worst = got.matrix.iter().zip(&want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
    eprintln!("d = {d}: null space {null_dim}, trace(P) {:.5}, {} steps, max |P − P_exact| {worst:.2e}", got.dimension, got.steps);
    assert_eq!(got.layer, 3);
    assert!(worst < 1e-4, "max |P − P_exact| = {worst:e}");
    assert!((got.dimension - null_dim as f64).abs() < 1e-3, "trace(P) {} for a {null_dim}-dimensional null space", got.dimension);
    // A threshold under every eigenvalue but the zeros, and one over all.
    // The zeros of an f32 matrix whose largest eigenvalue is ~50 are only
    // zero to ~1e-5 (its rounding), so the first check takes a spectrum of
    // its own: the zeros and eigenvalues from 1e-2 up, the threshold
    // between them (a threshold of 1e-7 on the spectrum above passed or
    // failed with the driver's rounding: Mesa 22 and 26 differ).
    let gapped: Vec<f64> = (0..d).map(|i| if i < 3 { 0.0 } else { 10f64.powf(-2.0 + 3.7 * (i - 3) as f64 / (d - 4) as f64) }).collect();
    let (c_gapped, _) = spectral(&q, &gapped, tau);
    let cov_gapped = LayerCovariance { layer: 3, matrix: c_gapped.iter().map(|&v| v as f32).collect(), n_tokens: 1000 };
    let low = pollster::block_on(null_space_projector(&ctx(), &cov_gapped, 1e-3)).unwrap();
    assert!((low.dimension - 3.0).abs() < 1e-3, "trace {} for the three zero eigenvalues", low.dimension);
    let high = pollster::block_on(null_space_projector(&ctx(), &cov, 1e3)).unwrap();
    assert!((high.dimension - d as f64).abs() < 1e-3, "trace {} with every eigenvalue under the threshold", high.dimension);
    assert!(pollster::block_on(null_space_projector(&ctx(), &cov, 0.0)).is_err(), "a zero threshold is refused");
}

/// X solving A·X = B for a square A by Gaussian elimination with partial
/// pivoting, in f64 (B, X [d, m] row-major).
fn gaussian_solve(a: &[f64], b: &[f64], d: usize, m: usize) -> Vec<f64> {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    for col in 0..d {
        let pivot = (col..d).max_by(|&i, &j| a[i * d + col].abs().total_cmp(&a[j * d + col].abs())).unwrap();
        for k in 0..d {
            a.swap(col * d + k, pivot * d + k);
        }
        for k in 0..m {
            b.swap(col * m + k, pivot * m + k);
        }
        for row in col + 1..d {
            let f = a[row * d + col] / a[col * d + col];
            for k in col..d {
                a[row * d + k] -= f * a[col * d + k];
            }
            for k in 0..m {
                b[row * m + k] -= f * b[col * m + k];
            }
        }
    }
    let mut x = vec![0.0; d * m];
    for row in (0..d).rev() {
        for k in 0..m {
            let s: f64 = (row + 1..d).map(|j| a[row * d + j] * x[j * m + k]).sum();
            x[row * m + k] = (b[row * m + k] - s) / a[row * d + row];
        }
    }
    x
}

fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for l in 0..k {
            let av = a[i * k + l];
            for j in 0..n {
                c[i * n + j] += av * b[l * n + j];
            }
        }
    }
    c
}

fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (diff / norm).sqrt()
}

#[test]
fn sequential_solves_match_the_authors_formulas() {
    let (d, n, d_model, tau) = (70, 5, 12, 2e-2);
    let f32s = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
    let back = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
    let q = orthonormal_basis(d, 11);
    let (c, p) = spectral(&q, &spread_spectrum(d, tau), tau);
    let mut rng = SplitMix64(5);
    // Earlier edits' keys J (7 of them) and this edit's keys K, [rows, d];
    // the residuals R [n, d_model].
    let j = normals(&mut rng, 7 * d);
    let mut acc = matmul(&transpose(&j, 7, d), &j, d, 7, d);
    let (c, p, acc) = (back(&f32s(&c)), back(&f32s(&p)), {
        acc = back(&f32s(&acc));
        acc
    });
    let keys = f32s(&normals(&mut rng, n * d));
    let k = back(&keys);
    let r = normals(&mut rng, n * d_model);
    let kt = transpose(&k, n, d);
    let ktk = matmul(&kt, &k, d, n, d);
    let (c32, p32, acc32) = (f32s(&c), f32s(&p), f32s(&acc));

    // memit-seq: adj_k = (λC + Σ earlier KKᵀ + KKᵀ)⁻¹ Kᵀ (their keys are columns).
    let lambda = 3.0;
    let a: Vec<f64> = (0..d * d).map(|i| lambda * c[i] + acc[i] + ktk[i]).collect();
    let want = gaussian_solve(&a, &kt, d, n);
    let system = LayerSystem { layer: 0, covariance: Some((&c32, lambda as f32)), accumulated: Some(&acc32), projector: None, identity: 0.0 };
    // On the GPU refined to float64, and in float64 on the host (where
    // `solve_system` takes a system this narrow).
    let on_gpu = pollster::block_on(solve_system_on_gpu(&ctx(), d, &system, &keys, n)).unwrap();
    let on_host = solve_definite_on_host(d, &system, &keys, n).unwrap().expect("a definite system");
    assert_eq!(pollster::block_on(solve_system(&ctx(), d, &system, &keys, n)).unwrap(), on_host);
    for (place, got) in [("GPU", on_gpu), ("host", on_host)] {
        let got_t = transpose(&back(&got.x), n, d);
        let err = relative_error(&got_t, &want);
        eprintln!("memit-seq on the {place}: relative error {err:.2e} after {} refinements", got.refinements);
        assert!(err < 1e-6, "memit-seq solve on the {place}: relative error {err:e}");
    }

    // AlphaEdit as the authors write it: ΔWᵀ = solve(P(KKᵀ + Σ earlier KKᵀ) + L2·I, P·K·Rᵀ).
    let l2 = 10.0;
    let s: Vec<f64> = (0..d * d).map(|i| ktk[i] + acc[i]).collect();
    let mut a = matmul(&p, &s, d, d, d);
    (0..d).for_each(|i| a[i * d + i] += l2);
    let pkr = matmul(&matmul(&p, &kt, d, d, n), &r, d, n, d_model);
    let want = gaussian_solve(&a, &pkr, d, d_model);
    let system = LayerSystem { layer: 0, covariance: None, accumulated: Some(&acc32), projector: Some(&p32), identity: l2 as f32 };
    let got = pollster::block_on(solve_system(&ctx(), d, &system, &keys, n)).unwrap();
    // Our factors: ΔW = Rᵀ·X, so ΔWᵀ = Xᵀ·R.
    let delta_t = matmul(&transpose(&back(&got.x), n, d), &r, d, n, d_model);
    let err = relative_error(&delta_t, &want);
    eprintln!("AlphaEdit: relative error {err:.2e} after {} refinements", got.refinements);
    assert!(err < 1e-5, "AlphaEdit solve: relative error {err:e}");
    // The update leaves the preserved keys' directions alone: (I − P)·ΔWᵀ ≈ 0.
    let projected = matmul(&p, &delta_t, d, d, d_model);
    let leak: Vec<f64> = delta_t.iter().zip(&projected).map(|(a, b)| a - b).collect();
    let leak_norm = leak.iter().map(|v| v * v).sum::<f64>().sqrt() / want.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(leak_norm < 1e-5, "the update has {leak_norm:e} of its norm outside the null space");
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

/// A covariance of rank far below d_ff (statistics over a dozen tokens),
/// accumulated in f32 as the GPU does, so that as stored it is indefinite
/// by its rounding: the f32 factorisation needs a shift and the float64
/// refinement falls back to the shifted system, which it solves to float64
/// accuracy (against Gaussian elimination of the same system here).
#[test]
fn a_rank_deficient_covariance_is_solved_as_the_shifted_system() {
    let (d, tokens, n, lambda) = (96, 12, 4, 50.0f32);
    let mut rng = SplitMix64(23);
    // Columns of decaying scale, like an MLP's keys.
    let x: Vec<f32> = normals(&mut rng, tokens * d).iter().enumerate().map(|(i, v)| (*v / (1.0 + (i % d) as f64 / 8.0).sqrt()) as f32).collect();
    let mut c32 = vec![0.0f32; d * d];
    for i in 0..d {
        for j in 0..d {
            let sum: f32 = (0..tokens).map(|t| x[t * d + i] * x[t * d + j]).sum();
            c32[i * d + j] = sum / tokens as f32;
        }
    }
    let keys: Vec<f32> = normals(&mut rng, n * d).iter().map(|&v| v as f32).collect();
    let cov = LayerCovariance { layer: 0, matrix: c32.clone(), n_tokens: tokens as u64 };
    let got = pollster::block_on(solve_system_on_gpu(&ctx(), d, &LayerSystem::memit(&cov, lambda), &keys, n)).unwrap();
    eprintln!("shift {:e}, ridge {:e}, {} refinements, last correction {:e}", got.shift, got.ridge, got.refinements, got.last_correction);
    assert!(got.shift > 0.0, "a rank-{tokens} covariance in {d} dimensions factored without a shift");
    assert_eq!(got.ridge, got.shift as f64, "the refinement should have fallen back to the shifted system");
    assert!(got.refinements >= 1 && got.last_correction < 1e-8, "{} refinements, last correction {:e}", got.refinements, got.last_correction);

    // The same system in float64: λC (as stored) + KᵀK + ridge·(mean diagonal)·I.
    let k: Vec<f64> = keys.iter().map(|&v| v as f64).collect();
    let kt = transpose(&k, n, d);
    let ktk = matmul(&kt, &k, d, n, d);
    let mut a: Vec<f64> = (0..d * d).map(|i| lambda as f64 * c32[i] as f64 + ktk[i]).collect();
    let mean_diagonal = (0..d).map(|i| a[i * d + i]).sum::<f64>() / d as f64;
    (0..d).for_each(|i| a[i * d + i] += got.ridge * mean_diagonal);
    let want = gaussian_solve(&a, &kt, d, n);
    let got_t = transpose(&got.x.iter().map(|&v| v as f64).collect::<Vec<_>>(), n, d);
    let err = relative_error(&got_t, &want);
    assert!(err < 1e-6, "relative error {err:e} against the float64 solve of the shifted system");

    // Not definite in float64 as stored: the host declines it, so
    // `solve_system` takes the GPU path above.
    assert_eq!(solve_definite_on_host(d, &LayerSystem::memit(&cov, lambda), &keys, n).unwrap(), None);
    assert_eq!(pollster::block_on(solve_system(&ctx(), d, &LayerSystem::memit(&cov, lambda), &keys, n)).unwrap().shift, got.shift);
}
