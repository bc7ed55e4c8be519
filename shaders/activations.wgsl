// The activation functions and their derivatives; pasted where a family
// writes {{ACTIVATIONS}} (the elementwise activation kernels, and the
// matrix product's activated epilogue).

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const INV_SQRT_2: f32 = 0.7071067811865476;

// GPT-2's "gelu_new", the tanh approximation, written with the identity
// 0.5(1 + tanh(u)) = 1 / (1 + exp(-2u)): no cancellation for negative
// inputs and no tanh overflow on drivers that build it from exp.
fn gelu_tanh(v: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (v + 0.044715 * v * v * v);
    return v / (1.0 + exp(-2.0 * u));
}

// erfc(z) for z >= 0 with relative error < 1.2e-7 everywhere (Chebyshev
// fit from Numerical Recipes, "erfcc"); WGSL has no erf.
fn erfc_nonneg(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806
        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    return t * exp(-z * z + poly);
}

// Exact GELU (PyTorch's default, GPT-NeoX's "gelu"): 0.5v(1 + erf(v/sqrt2)),
// i.e. 0.5v * erfc(-v/sqrt2), evaluated without cancellation for v < 0.
fn gelu_erf(v: f32) -> f32 {
    let tail = erfc_nonneg(abs(v) * INV_SQRT_2);
    if (v < 0.0) {
        return 0.5 * v * tail;
    }
    return 0.5 * v * (2.0 - tail);
}

fn gelu_tanh_grad(v: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (v + 0.044715 * v * v * v);
    let s = 1.0 / (1.0 + exp(-2.0 * u));
    return s + v * 2.0 * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 0.134145 * v * v);
}

// d/dv of 0.5 v erfc(-v / sqrt2) = Phi(v) + v phi(v).
fn gelu_erf_grad(v: f32) -> f32 {
    let tail = erfc_nonneg(abs(v) * INV_SQRT_2);
    var cdf = 1.0 - 0.5 * tail;
    if (v < 0.0) {
        cdf = 0.5 * tail;
    }
    return cdf + v * exp(-0.5 * v * v) * 0.3989422804014327;
}

fn silu(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}

fn silu_grad(v: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-v));
    return s * (1.0 + v * (1.0 - s));
}

fn relu(v: f32) -> f32 {
    return max(v, 0.0);
}

fn relu_grad(v: f32) -> f32 {
    return select(0.0, 1.0, v > 0.0);
}
