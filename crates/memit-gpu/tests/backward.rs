//! Backward kernels against central differences of CPU forward passes in f64.

mod common;

use common::*;
use memit_gpu::{Activation, AttentionRows, DType, GpuContext, HeadLayout, RotaryStyle};

/// Central-difference gradient of a scalar function of `x`, in f64.
fn numeric_grad(x: &[f32], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let h = 1e-6;
    (0..xs.len())
        .map(|i| {
            let orig = xs[i];
            xs[i] = orig + h;
            let up = f(&xs);
            xs[i] = orig - h;
            let down = f(&xs);
            xs[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// max |got − want| ≤ rel · max |want| (whole tensor).
fn assert_grad_close(got: &[f32], want: &[f64], rel: f64, what: &str) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-9);
    let err = got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    assert!(err <= rel * scale, "{what}: max error {err:e}, scale {scale:e}");
}

fn dot(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, &y)| x * y as f64).sum()
}

#[test]
fn norm_backward_matches_numeric_gradient() {
    for ctx in [ctx(), other_kernels_ctx(), tree_reductions_ctx()] {
        check_norm_backward(&ctx);
    }
}

fn check_norm_backward(ctx: &std::sync::Arc<memit_gpu::GpuContext>) {
    let (rows, len, eps) = (5, 37, 1e-5);
    let mut rng = Rng::new(3);
    let x: Vec<f32> = rng.vec(rows * len, 2.0).iter().map(|v| v + 0.5).collect();
    let g: Vec<f32> = rng.vec(len, 1.0).iter().map(|v| v + 1.0).collect();
    let dy = rng.vec(rows * len, 1.0);
    let (gx, gg, gdy) = (ctx.upload(&[rows, len], &x, DType::F32).unwrap(), ctx.upload(&[len], &g, DType::F32).unwrap(), ctx.upload(&[rows, len], &dy, DType::F32).unwrap());
    let layer_norm = |xs: &[f64]| -> f64 {
        let mut out = Vec::new();
        for r in 0..rows {
            let row = &xs[r * len..][..len];
            let mean = row.iter().sum::<f64>() / len as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / len as f64;
            out.extend((0..len).map(|j| (row[j] - mean) / (var + eps).sqrt() * g[j] as f64));
        }
        dot(&out, &dy)
    };
    let rms_norm = |xs: &[f64]| -> f64 {
        let mut out = Vec::new();
        for r in 0..rows {
            let row = &xs[r * len..][..len];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / len as f64;
            out.extend((0..len).map(|j| row[j] / (ms + eps).sqrt() * g[j] as f64));
        }
        dot(&out, &dy)
    };
    let got = read(&ctx, &ctx.layer_norm_backward(&gx, &gg, &gdy, eps as f32).unwrap());
    assert_grad_close(&got, &numeric_grad(&x, layer_norm), 1e-4, "layer_norm_backward");
    let got = read(&ctx, &ctx.rms_norm_backward(&gx, &gg, &gdy, eps as f32).unwrap());
    assert_grad_close(&got, &numeric_grad(&x, rms_norm), 1e-4, "rms_norm_backward");
}

fn erf(z: f64) -> f64 {
    // Maclaurin series (inputs here are small).
    let (mut term, mut sum, mut k) = (z, z, 0.0);
    while term.abs() > 1e-17 {
        k += 1.0;
        term *= -z * z / k;
        sum += term / (2.0 * k + 1.0);
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn activation_backward_matches_numeric_gradient() {
    let ctx = ctx();
    let mut rng = Rng::new(8);
    let n = 301;
    let x = rng.vec(n, 4.0);
    let dy = rng.vec(n, 1.0);
    let gx = ctx.upload(&[n], &x, DType::F32).unwrap();
    let gdy = ctx.upload(&[n], &dy, DType::F32).unwrap();
    let tanh_gelu = |v: f64| 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh());
    let erf_gelu = |v: f64| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2));
    let silu = |v: f64| v / (1.0 + (-v).exp());
    let cases: [(Activation, &dyn Fn(f64) -> f64); 3] = [(Activation::GeluTanh, &tanh_gelu), (Activation::GeluErf, &erf_gelu), (Activation::Silu, &silu)];
    for (act, f) in cases {
        let got = read(&ctx, &ctx.activation_backward(&gx, &gdy, act).unwrap());
        let want = numeric_grad(&x, |xs| xs.iter().zip(&dy).map(|(&v, &d)| f(v) * d as f64).sum());
        assert_grad_close(&got, &want, 1e-5, &format!("{act:?} backward"));
    }
    // SwiGLU: L = Σ dy · silu(gate) · up, over 7 rows of gate | up (43 each).
    let (rows, f) = (7, 43);
    let up = rng.vec(n, 2.0);
    let gate_up: Vec<f32> = (0..rows).flat_map(|r| x[r * f..(r + 1) * f].iter().chain(&up[r * f..(r + 1) * f]).copied()).collect();
    let g_gate_up = ctx.upload(&[rows, 2 * f], &gate_up, DType::F32).unwrap();
    let g_dy = ctx.upload(&[rows, f], &dy, DType::F32).unwrap();
    let d_gate_up = read(&ctx, &ctx.gated_activation_backward(&g_gate_up, &g_dy, Activation::Silu).unwrap());
    let half = |h: usize| -> Vec<f32> { (0..rows).flat_map(|r| d_gate_up[r * 2 * f + h * f..r * 2 * f + (h + 1) * f].to_vec()).collect() };
    let want_gate = numeric_grad(&x, |xs| (0..n).map(|i| silu(xs[i]) * up[i] as f64 * dy[i] as f64).sum());
    let want_up = numeric_grad(&up, |us| (0..n).map(|i| silu(x[i] as f64) * us[i] * dy[i] as f64).sum());
    assert_grad_close(&half(0), &want_gate, 1e-5, "swiglu d_gate");
    assert_grad_close(&half(1), &want_up, 1e-5, "swiglu d_up");
}

#[test]
fn rotary_inverse_undoes_rotary() {
    let ctx = ctx();
    let (rows, width) = (5, 24);
    let layout = HeadLayout { offset: 0, head_stride: 12, n_heads: 2 };
    let table: Vec<f32> = (0..8 * 4).flat_map(|i| [((i as f32) * 0.3).cos(), ((i as f32) * 0.3).sin()]).collect();
    let gtable = ctx.upload(&[8, 4, 2], &table, DType::F32).unwrap();
    let x = Rng::new(2).vec(rows * width, 1.0);
    for style in [RotaryStyle::Half, RotaryStyle::Interleaved] {
        let gx = ctx.upload(&[rows, width], &x, DType::F32).unwrap();
        ctx.rotary(&gx, layout, 8, style, &gtable, &ctx.indices(&[0, 3, 1, 7, 2]).unwrap()).unwrap();
        assert_ne!(read(&ctx, &gx), x);
        ctx.rotary_inverse(&gx, layout, 8, style, &gtable, &ctx.indices(&[0, 3, 1, 7, 2]).unwrap()).unwrap();
        assert_close(&read(&ctx, &gx), &x.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-6, 1e-6, "round trip");
    }
}

#[test]
fn attention_backward_matches_numeric_gradient() {
    for ctx in [ctx(), other_kernels_ctx(), tree_reductions_ctx()] {
        check_attention_backward(&ctx);
    }
}

fn check_attention_backward(ctx: &GpuContext) {
    let (seq, heads, kv_heads, hd) = (6, 4, 2, 5);
    let bounds = [(1u32, 6u32), (0u32, 4u32)];
    let rows = 2 * seq;
    let width = (heads + 2 * kv_heads) * hd;
    let mut rng = Rng::new(12);
    let x = rng.vec(rows * width, 1.0);
    let d_out = rng.vec(rows * heads * hd, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let gx = ctx.upload(&[rows, width], &x, DType::F32).unwrap();
    let gd = ctx.upload(&[rows, heads * hd], &d_out, DType::F32).unwrap();
    let grad = ctx.zeros(&[rows, width], DType::F32).unwrap();
    let q = HeadLayout { offset: 0, head_stride: hd, n_heads: heads };
    let k = HeadLayout { offset: heads * hd, head_stride: hd, n_heads: kv_heads };
    let v = HeadLayout { offset: (heads + kv_heads) * hd, head_stride: hd, n_heads: kv_heads };
    ctx.attention_backward((&gx, q), (&gx, k), (&gx, v), &gd, (&grad, &grad, &grad), hd, AttentionRows { q_seq: seq, kv_seq: seq, bounds: &key_bounds(&ctx, &bounds) }, scale).unwrap();
    let want = numeric_grad(&x, |xs| dot(&cpu_attention(xs, width, seq, heads, kv_heads, hd, &bounds, scale as f64), &d_out));
    assert_grad_close(&read(ctx, &grad), &want, 1e-4, &format!("attention backward (dq, dk, dv; CPU-style kernels: {})", ctx.cpu_kernels()));
}
