//! The WGSL backward pass through whole models against torch autograd
//! (tests/fixtures/make_grad_goldens.py): d(Σ W·logits)/d(output of block 0)
//! for every tiny fixture, plus a finite-difference check of the same
//! gradient through the GPU forward pass.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use memit_gpu::{DType, GpuContext};
use memit_models::{load_hf_dir, Batch, LoadOptions, Model, Padding};
use safetensors::SafeTensors;

fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(format!("tiny-{name}"))
}

fn values(st: &SafeTensors, key: &str) -> Vec<f32> {
    st.tensor(key).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn ints(st: &SafeTensors, key: &str) -> Vec<i32> {
    st.tensor(key).unwrap().data().chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect()
}

struct Case {
    model: Model,
    batch: Batch,
    real: Vec<usize>,
    weights: Vec<f32>,
    want_grad: Vec<f32>,
}

fn case(name: &str) -> Case {
    case_loaded(name, LoadOptions::default())
}

fn case_loaded(name: &str, options: LoadOptions) -> Case {
    let model = load_hf_dir(ctx(), &fixture(name), options).unwrap().model;
    let golden_bytes = std::fs::read(fixture(name).join("golden.safetensors")).unwrap();
    let golden = SafeTensors::deserialize(&golden_bytes).unwrap();
    let grad_bytes = std::fs::read(fixture(name).join("grad-golden.safetensors")).unwrap();
    let grads = SafeTensors::deserialize(&grad_bytes).unwrap();
    let (ids, mask) = (ints(&golden, "right.input_ids"), ints(&golden, "right.attention_mask"));
    let t = golden.tensor("right.input_ids").unwrap().shape()[1];
    let sequences: Vec<Vec<u32>> = (0..2).map(|b| (0..t).filter(|&j| mask[b * t + j] > 0).map(|j| ids[b * t + j] as u32).collect()).collect();
    Case {
        model,
        batch: Batch::new(&sequences, Padding::Right, 0).unwrap(),
        real: (0..2 * t).filter(|&r| mask[r] > 0).collect(),
        weights: values(&grads, "logit_weights"),
        want_grad: values(&grads, "grad.block.0"),
    }
}

/// d(Σ W·logits)/dh for h = output of block 0, by the WGSL backward pass.
fn gpu_grad(c: &Case, h: &memit_gpu::Tensor) -> Vec<f32> {
    let (_, trace) = c.model.forward_traced(1, h, &c.batch, None).unwrap();
    let vocab = c.model.config.vocab_size;
    let d_logits = c.model.ctx.upload(&[c.weights.len() / vocab, vocab], &c.weights, DType::F32).unwrap();
    let d_h = c.model.backward(&trace, &d_logits, &c.batch).unwrap();
    pollster::block_on(c.model.ctx.read(&d_h)).unwrap()
}

fn block0(c: &Case) -> memit_gpu::Tensor {
    c.model.forward(&c.batch, &[0], false).unwrap().hidden[0].clone().unwrap()
}

fn check_against_torch(name: &str) {
    check_loaded_against_torch(name, LoadOptions::default());
}

fn check_loaded_against_torch(name: &str, options: LoadOptions) {
    let c = case_loaded(name, options);
    let got = gpu_grad(&c, &block0(&c));
    let d = c.model.config.d_model;
    for &r in &c.real {
        let (g, w) = (&got[r * d..][..d], &c.want_grad[r * d..][..d]);
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = g.iter().zip(w).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 2e-4 * scale, "{name}: row {r}: max error {err:e} vs scale {scale:e}");
    }
}

#[test]
fn gpt2_gradient_matches_torch_autograd() {
    check_against_torch("gpt2");
}

#[test]
fn gptj_gradient_matches_torch_autograd() {
    check_against_torch("gptj");
}

#[test]
fn gpt_neox_gradients_match_torch_autograd() {
    check_against_torch("gpt-neox");
    check_against_torch("gpt-neox-sequential");
}

#[test]
fn llama_gradient_matches_torch_autograd() {
    check_against_torch("llama");
}

#[test]
fn gradients_through_streamed_blocks_match_torch_autograd() {
    // Every block uploaded from the checkpoint when it runs: the backward
    // pass reads the same weights as the forward pass did (Llama: q, k, v
    // and gate, up joined at each upload; GPT-2: stored [in, out]).
    for name in ["llama", "gpt2"] {
        check_loaded_against_torch(name, LoadOptions { streamed_blocks: 3, ..Default::default() });
    }
}

#[test]
fn gradient_matches_finite_differences_of_the_gpu_forward() {
    // A directional derivative: (L(h + εu) − L(h − εu)) / 2ε = ⟨∇L, u⟩.
    let c = case("llama");
    let h = block0(&c);
    let h_values = pollster::block_on(c.model.ctx.read(&h)).unwrap();
    let grad = gpu_grad(&c, &h);
    let loss = |values: &[f32]| -> f64 {
        let shifted = c.model.ctx.upload(h.shape(), values, DType::F32).unwrap();
        let (logits, _) = c.model.forward_traced(1, &shifted, &c.batch, None).unwrap();
        let logits = pollster::block_on(c.model.ctx.read(&logits)).unwrap();
        logits.iter().zip(&c.weights).map(|(&l, &w)| l as f64 * w as f64).sum()
    };
    let d = c.model.config.d_model;
    // Perturb one real row (the last token of sequence 0) along a fixed direction.
    let row = c.real[5];
    let direction: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0).collect();
    let eps = 1e-2f32;
    let (mut up, mut down) = (h_values.clone(), h_values.clone());
    for i in 0..d {
        up[row * d + i] += eps * direction[i];
        down[row * d + i] -= eps * direction[i];
    }
    let numeric = (loss(&up) - loss(&down)) / (2.0 * eps as f64);
    let analytic: f64 = (0..d).map(|i| grad[row * d + i] as f64 * direction[i] as f64).sum();
    assert!((numeric - analytic).abs() <= 2e-3 * analytic.abs().max(1.0), "numeric {numeric} vs analytic {analytic}");
}

#[test]
fn logits_of_chosen_rows_give_the_same_logits_and_gradient() {
    // Unembedding only the rows a loss reads must change nothing for them.
    let c = case("gpt2");
    let ctx = &c.model.ctx;
    let vocab = c.model.config.vocab_size;
    let h = block0(&c);
    let chosen: Vec<u32> = [c.real[1], c.real[4], *c.real.last().unwrap()].iter().map(|&r| r as u32).collect();
    let ids = ctx.indices(&chosen).unwrap();
    let (all_logits, full_trace) = c.model.forward_traced(1, &h, &c.batch, None).unwrap();
    let (some_logits, trace) = c.model.forward_traced(1, &h, &c.batch, Some(&ids)).unwrap();
    let all_logits = pollster::block_on(ctx.read(&all_logits)).unwrap();
    let some_logits = pollster::block_on(ctx.read(&some_logits)).unwrap();
    let mut masked = vec![0.0f32; c.weights.len()];
    let mut gathered = Vec::new();
    for (i, &r) in chosen.iter().enumerate() {
        let row = &c.weights[r as usize * vocab..][..vocab];
        masked[r as usize * vocab..][..vocab].copy_from_slice(row);
        gathered.extend_from_slice(row);
        assert_eq!(&some_logits[i * vocab..][..vocab], &all_logits[r as usize * vocab..][..vocab], "logits of row {r}");
    }
    let full = c.model.backward(&full_trace, &ctx.upload(&[c.weights.len() / vocab, vocab], &masked, DType::F32).unwrap(), &c.batch).unwrap();
    let some = c.model.backward(&trace, &ctx.upload(&[chosen.len(), vocab], &gathered, DType::F32).unwrap(), &c.batch).unwrap();
    let (full, some) = (pollster::block_on(ctx.read(&full)).unwrap(), pollster::block_on(ctx.read(&some)).unwrap());
    let scale = full.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    for (i, (a, b)) in full.iter().zip(&some).enumerate() {
        assert!((a - b).abs() <= 1e-5 * scale, "element {i}: {a} vs {b}");
    }
}

/// A pass over each sequence's rows from a start on, against cached keys
/// and values of the earlier rows, gives the full pass's logits and
/// gradients at those rows.
fn check_suffix_pass(name: &str) {
    let c = case(name);
    let ctx = &c.model.ctx;
    let vocab = c.model.config.vocab_size;
    let h = block0(&c);
    let starts = [2usize, 1];
    let lengths: Vec<usize> = c.batch.bounds.iter().map(|&(s, e)| (e - s) as usize).collect();
    let pass = c.model.suffix_pass(1, &h, &c.batch, &starts).unwrap();
    // Every suffix row's logits, in both layouts.
    let (mut full_rows, mut suffix_rows) = (Vec::new(), Vec::new());
    for b in 0..2 {
        for t in starts[b]..lengths[b] {
            full_rows.push(c.batch.row(b, t) as u32);
            suffix_rows.push(pass.row(b, t, starts[b]) as u32);
        }
    }
    let (full_logits, full_trace) = c.model.forward_traced(1, &h, &c.batch, Some(&ctx.indices(&full_rows).unwrap())).unwrap();
    let hs = pass.gather(ctx, &h).unwrap();
    let (suffix_logits, suffix_trace) = c.model.forward_traced_suffix(&pass, &hs, Some(&ctx.indices(&suffix_rows).unwrap())).unwrap();
    let (a, b) = (pollster::block_on(ctx.read(&full_logits)).unwrap(), pollster::block_on(ctx.read(&suffix_logits)).unwrap());
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale), "{name}: suffix logits differ");

    let weights: Vec<f32> = full_rows.iter().flat_map(|&r| c.weights[r as usize * vocab..][..vocab].to_vec()).collect();
    let d_logits = ctx.upload(&[full_rows.len(), vocab], &weights, DType::F32).unwrap();
    let full = pollster::block_on(ctx.read(&c.model.backward(&full_trace, &d_logits, &c.batch).unwrap())).unwrap();
    let suffix = pollster::block_on(ctx.read(&c.model.backward(&suffix_trace, &d_logits, &c.batch).unwrap())).unwrap();
    let d = c.model.config.d_model;
    let scale = full.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    for (&fr, &sr) in full_rows.iter().zip(&suffix_rows) {
        for i in 0..d {
            let (x, y) = (full[fr as usize * d + i], suffix[sr as usize * d + i]);
            assert!((x - y).abs() <= 1e-5 * scale, "{name}: gradient at row {fr} element {i}: {x} vs {y}");
        }
    }
}

#[test]
fn suffix_passes_match_full_passes() {
    for name in ["gpt2", "gptj", "gpt-neox", "gpt-neox-sequential", "llama"] {
        check_suffix_pass(name);
    }
}
