//! The memory plan: pinned for GPT-J 6B and GPT-NeoX 20B (10,000 requests,
//! f16, a 48 GiB budget) from formulas written out here by hand, and
//! checked against the peaks the GPU runtime measures when the phases
//! really run on the bundled world model.

use std::path::PathBuf;

use memit_core::{apply_memit, gib, DeviceLimits, EditMethod, EditRequest, Hparams, MemoryPlan, PlanError, PlanOptions, RequestShape, StatsAccumulator, StatsIdentity, TargetOptions, TargetText};
use memit_gpu::{DType, GpuContext};
use memit_models::{load_hf_dir, read_config, LoadOptions, ModelConfig};

const GIB: u64 = 1 << 30;

/// wgpu's default limits (what `plan` assumes without an adapter).
const WGPU_DEFAULTS: DeviceLimits = DeviceLimits { max_storage_buffer_binding_size: 128 << 20, max_buffer_size: 256 << 20 };

const GPTJ_6B: &str = r#"{
  "model_type": "gptj", "activation_function": "gelu_new", "n_embd": 4096, "n_layer": 28, "n_head": 16,
  "rotary_dim": 64, "n_positions": 2048, "vocab_size": 50400, "n_inner": null, "layer_norm_epsilon": 1e-05,
  "tie_word_embeddings": false, "bos_token_id": 50256, "eos_token_id": 50256
}"#;

const NEOX_20B: &str = r#"{
  "model_type": "gpt_neox", "hidden_act": "gelu_fast", "hidden_size": 6144, "num_hidden_layers": 44,
  "num_attention_heads": 64, "intermediate_size": 24576, "vocab_size": 50432, "max_position_embeddings": 2048,
  "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": true, "layer_norm_eps": 1e-05,
  "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 0
}"#;

fn config(json: &str) -> ModelConfig {
    ModelConfig::from_hf_json(&serde_json::from_str(json).unwrap()).unwrap()
}

fn options(n: usize, templates: usize, requests: RequestShape) -> PlanOptions {
    PlanOptions {
        matrix_dtype: DType::F16,
        n_requests: n,
        requests,
        templates,
        limits: WGPU_DEFAULTS,
        target: TargetOptions::default(),
        stats_max_len: None,
        keep_original_weights: true,
        method: EditMethod::Memit,
        streamed_blocks: 0,
    }
}

/// The per-phase tensor peaks written out by hand for a GPT-J-shaped model
/// (shared norm, q/k/v without biases, MLP biases, untied unembedding with
/// a bias) or a GPT-NeoX-shaped one (parallel residual with its own ln2)
/// with f16 matrices. Every model computes q|k|v with one projection (one
/// [rows, q + 2kv] tensor) and adds biases and residuals in the products'
/// epilogues (one tensor per linear); `t` tokens per statistics
/// pass, `n` requests whose target batches hold one request of 6
/// templates + a KL prompt, each `seq` tokens long with a suffix of
/// `suffix`, `loss` loss rows per request.
struct Hand {
    d: u64,
    ff: u64,
    vocab: u64,
    layers: u64,
    /// Edited layers, the last one, and blocks above it.
    r: u64,
    last: u64,
    above: u64,
    q: u64,
    kv: u64,
    heads: u64,
    /// Extra d-wide tensors of a block's peak: GPT-J's shared norm has
    /// none, NeoX's parallel residual ln2(x).
    extra_d: u64,
    /// Weight bytes (computed separately per model), and those of the
    /// blocks through the last edited layer with the embeddings, which the
    /// statistics load.
    weights: u64,
    prefix_weights: u64,
}

impl Hand {
    /// Peak of one forward block beyond its input, per row, in floats.
    /// a, q|k|v, mixed and x1 = x + attention are live at once; mixed goes
    /// before the MLP, so the peak is at its end: a, q|k|v, x1, [ln2 out],
    /// up, key, out (which takes the larger: mixed is q wide, the MLP's
    /// extra 2·d_ff + d).
    fn block_peak(&self) -> u64 {
        let qkv = self.q + 2 * self.kv;
        let attention = self.d + qkv + self.q + self.d;
        let mlp = self.d + qkv + self.d + self.extra_d + self.ff + self.ff + self.d;
        attention.max(mlp)
    }

    /// The larger of a pass and forming C at the end, beside the sums.
    fn stats(&self, t: u64) -> u64 {
        let sums = 2 * self.r * self.ff * self.ff * 4;
        let batch = 2 * t * 4 + 16;
        // Blocks up to the last edited one; the earlier edited layers keep
        // their output and key (the last block's input among them).
        let pass = batch + t * 4 * ((self.r - 1) * (self.d + self.ff) + self.block_peak());
        let finish = self.ff * self.ff * 4;
        self.prefix_weights + sums + pass.max(finish)
    }

    /// λC + KKᵀ (K beside it while it is formed, then gone), the factor's
    /// block inverses with its scratch (a 256-column panel and a diagonal
    /// block, gone once factored), then a right-hand side and one scratch.
    fn solve(&self, n: u64) -> u64 {
        let ff = self.ff;
        let scratch = ff * ff.min(256) * 4 + 64 * 64 * 4;
        let kept = ff.div_ceil(64) * 64 * 64 * 4 + 4;
        self.weights + (self.r - 1) * self.d * self.ff * 2 + ff * ff * 4 + (n * ff * 4).max(kept + scratch).max(kept + 2 * n * ff * 4)
    }

    /// AlphaEdit's solve: P and S·P beside S while P·S·P is formed (then
    /// the same factor and right-hand sides as MEMIT's, B = P·Kᵀ coming
    /// from the host).
    fn alphaedit_solve(&self, n: u64) -> u64 {
        let ff = self.ff;
        let scratch = ff * ff.min(256) * 4 + 64 * 64 * 4;
        let kept = ff.div_ceil(64) * 64 * 64 * 4 + 4;
        self.weights + (self.r - 1) * self.d * self.ff * 2 + ff * ff * 4 + (2 * ff * ff * 4).max(kept + scratch).max(kept + 2 * n * ff * 4)
    }

    fn update(&self, n: u64) -> u64 {
        // Factors, ΔW, W_out in f32, W_out + ΔW, cast back to f16; the
        // earlier updated W_out beside the originals.
        self.weights + (self.r - 1) * self.d * self.ff * 2 + n * (self.d + self.ff) * 4 + 3 * self.d * self.ff * 4 + self.d * self.ff * 2
    }

    /// Keys: passes of `per` prompts of `len` tokens through the last
    /// edited layer, keeping both captured layers; then the gathered rows.
    fn keys(&self, per: u64, len: u64) -> u64 {
        let rows = per * len;
        let batch = 2 * rows * 4 + 16 * per;
        // The first edited layer's output and key, the block input, the block.
        let last_block = (self.d + self.ff) + self.d + self.block_peak();
        self.weights + (self.r - 1) * self.d * self.ff * 2 + batch + rows * 4 * last_block
    }

    /// Target vectors for a batch of `k` requests of `per` prompts each
    /// (`loss` loss rows each): the suffix cache and the traced blocks
    /// above the last edited layer, logits of the loss rows and the top
    /// block's backward pass.
    fn targets(&self, k: u64, per: u64, seq: u64, suffix: u64, loss: u64, steps: u64) -> u64 {
        let (d, ff) = (self.d, self.ff);
        let (seqs, loss) = (k * per, k * loss);
        let rows = seqs * seq;
        let s = seqs * suffix;
        let qkv = self.q + 2 * self.kv;
        let batch = 2 * rows * 4 + 16 * seqs;
        let layout = 3 * s * 4 + 16 * seqs;
        // The cache's k and v are the prefix pass's q|k|v tensors, kept whole.
        let cache = self.above * rows * qkv * 4;
        let held = batch + rows * d * 4 + layout + cache + k * d * 4 + s * d * 4 + (3 * loss + 4 * k + seqs + s) * 4 + loss * 4 + k * 3 * d * 4 + k * self.vocab * 4 + k * (1 + steps * 4) * 4;
        // A traced block keeps q|k|v, [x1: sequential blocks only, neither
        // here], up, key, out.
        let trace_row = qkv + ff + ff + d;
        let traces = s * d * 4 + self.above * s * trace_row * 4;
        let logits = loss * d * 4 + 3 * loss * self.vocab * 4 + loss * 2 * 4;
        // The top block's backward: d_normed and the gradient, then the
        // larger of the attention backward (d_mixed and one d_qkv, with the
        // scores scratch twice, then d_a once the scratch is gone) and the
        // MLP backward beside the attention's result (d_a, d_key, d_up,
        // d_m).
        let scores = 2 * seqs * self.heads * suffix * seq * 4;
        let attention = (s * (self.q + qkv) * 4 + scores).max(s * (self.q + qkv + d) * 4);
        let mlp = s * (2 * d + 2 * ff) * 4;
        let backward = loss * d * 4 + s * d * 4 + attention.max(mlp);
        self.weights + held + traces + logits + backward
    }
}
fn phase(plan: &MemoryPlan, name: &str) -> u64 {
    plan.phases.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no phase {name}")).gpu_bytes
}

fn print(plan: &MemoryPlan) {
    eprintln!("{}", plan.summary(Some(48 * GIB)));
}

#[test]
fn gpt_j_6b_with_10000_requests_in_f16_fits_48_gib() {
    let config = config(GPTJ_6B);
    let hp = Hparams::preset("gpt-j-6b").unwrap();
    assert_eq!(hp.layers, [3, 4, 5, 6, 7, 8]);
    let shape = RequestShape::typical(12);
    let plan = MemoryPlan::new(&config, &hp, &options(10_000, 6, shape)).unwrap();
    print(&plan);
    let (d, ff, v) = (4096u64, 16384u64, 50400u64);
    // Per layer: the joined q|k|v [3d, d], W_in [ff, d] and its bias, ln1
    // (weight, bias), the attention projection [d, d], W_out [d, ff] and
    // its bias.
    let per_layer = 3 * d * d * 2 + d * ff * 2 + ff * 4 + 2 * d * 4 + d * d * 2 + d * ff * 2 + d * 4;
    let weights = 28 * per_layer + 2 * v * d * 2 + v * 4 + 2048 * 64 * 4 + 2 * d * 4;
    assert_eq!(plan.weight_bytes, weights);
    // q, k, v are stored apart: each layer uploads the three [d, d] parts,
    // joins them into [3d, d] and drops them, before its other weights.
    // The last layer's join is the largest transient (27 layers, parts and
    // join), under the final weights (its other weights and the
    // embeddings come after).
    let load_transient = 27 * per_layer + v * d * 2 + 2048 * 64 * 4 + 3 * d * d * 2 + 3 * d * d * 2;
    assert!(load_transient < weights);
    // The statistics load layers 0..=8, the token embedding and the rotary
    // table; the other 19 layers and the head come after them.
    let prefix_weights = 9 * per_layer + v * d * 2 + 2048 * 64 * 4;
    let hand = Hand { d, ff, vocab: v, layers: 28, r: 6, last: 8, above: 19, q: d, kv: d, heads: 16, extra_d: 0, weights, prefix_weights };
    assert_eq!(hand.layers - hand.last - 1, hand.above);
    // 128 MiB bindings / 64 KiB rows of the MLP's hidden layer.
    assert_eq!(plan.stats_tokens_per_pass, 2048);
    assert_eq!(phase(&plan, "load"), weights);
    assert_eq!(phase(&plan, "statistics"), hand.stats(2048));
    // Each request's estimate is ~480 MB of the 1 GiB target batch budget.
    assert_eq!(plan.target_batch, 2);
    assert_eq!(phase(&plan, "target vectors"), hand.targets(2, 7, 25, 5, 13, 25));
    // Key prompts of 24 tokens: 85 per 2048-token pass.
    assert_eq!(phase(&plan, "keys"), hand.keys(85, 24));
    assert_eq!(phase(&plan, "solve"), hand.solve(10_000));
    assert_eq!(phase(&plan, "update"), hand.update(10_000));
    // Today's peak is the statistics (all six layers' C and compensation).
    assert_eq!(plan.peak().name, "statistics");
    assert!(plan.fits(48 * GIB), "GPT-J peak {}", gib(plan.peak().gpu_buffer_bytes));
    plan.check(48 * GIB, &config, &hp, &options(10_000, 6, shape)).unwrap();

    // AlphaEdit: three d_ff² iterates for the projectors, P beside the solve.
    let alpha = PlanOptions { method: EditMethod::AlphaEdit, ..options(10_000, 6, shape) };
    let plan = MemoryPlan::new(&config, &hp, &alpha).unwrap();
    assert_eq!(phase(&plan, "projectors"), weights + 3 * ff * ff * 4);
    assert_eq!(phase(&plan, "solve"), hand.alphaedit_solve(10_000));
    assert!(plan.fits(48 * GIB), "GPT-J AlphaEdit peak {}", gib(plan.peak().gpu_buffer_bytes));
}

#[test]
fn gpt_neox_20b_with_10000_requests_in_f16_fits_48_gib() {
    let config = config(NEOX_20B);
    // The MEMIT authors' layers for GPT-NeoX 20B.
    let hp = Hparams::preset("gpt-neox-20b").unwrap().with_overrides(&serde_json::json!({"layers": [13, 14, 15, 16, 17]})).unwrap();
    let shape = RequestShape::typical(12);
    let o = options(10_000, 6, shape);
    let plan = MemoryPlan::new(&config, &hp, &o).unwrap();
    print(&plan);
    let (d, ff, v) = (6144u64, 24576u64, 50432u64);
    let qkv = 3 * d;
    let per_layer = 4 * d * 4 + d * qkv * 2 + qkv * 4 + d * d * 2 + d * 4 + 2 * d * ff * 2 + ff * 4 + d * 4;
    let weights = 44 * per_layer + 2 * v * d * 2 + 2048 * 24 * 4 + 2 * d * 4;
    assert_eq!(plan.weight_bytes, weights);
    // The statistics hold 18 of the 44 blocks.
    let prefix_weights = 18 * per_layer + v * d * 2 + 2048 * 24 * 4;
    let hand = Hand { d, ff, vocab: v, layers: 44, r: 5, last: 17, above: 26, q: d, kv: d, heads: 64, extra_d: d, weights, prefix_weights };
    assert_eq!(hand.layers - hand.last - 1, hand.above);
    // 128 MiB bindings / 96 KiB rows.
    assert_eq!(plan.stats_tokens_per_pass, 1365);
    assert_eq!(phase(&plan, "load"), weights);
    assert_eq!(phase(&plan, "statistics"), hand.stats(1365));
    assert_eq!(plan.target_batch, 1);
    assert_eq!(phase(&plan, "target vectors"), hand.targets(1, 7, 25, 5, 13, 25));
    // 56 key prompts of 24 tokens per 1365-token pass.
    assert_eq!(phase(&plan, "keys"), hand.keys(56, 24));
    assert_eq!(phase(&plan, "solve"), hand.solve(10_000));
    assert_eq!(phase(&plan, "update"), hand.update(10_000));

    // The weights alone are 38.6 GiB; the statistics (18 blocks and C with
    // its compensation for five 24576² layers, 22.5 GiB) and the solve
    // (λC + KKᵀ and two K-sized tensors beside all the weights) now fit
    // 48 GiB with the pool's reserve.
    assert!(plan.fits(48 * GIB), "NeoX peak {} in {}", gib(plan.peak().gpu_buffer_bytes), plan.peak().name);
    plan.check(48 * GIB, &config, &hp, &o).unwrap();

    // In f32 the weights alone (77 GiB) do not fit: the error names the
    // phase and --f16.
    let f32_options = PlanOptions { matrix_dtype: DType::F32, ..o };
    let f32_plan = MemoryPlan::new(&config, &hp, &f32_options).unwrap();
    match f32_plan.check(48 * GIB, &config, &hp, &f32_options) {
        Err(PlanError::DoesNotFit { advice, .. }) => assert!(advice.contains("--f16"), "{advice}"),
        other => panic!("expected DoesNotFit, got {other:?}"),
    }

    // On 44 GiB the solve is over; streaming the top five blocks from the
    // checkpoint (two of them on the GPU at a time) makes room.
    match plan.check(44 * GIB, &config, &hp, &o) {
        Err(PlanError::DoesNotFit { phase: "solve", advice, .. }) => assert!(advice.contains("--stream-blocks 5`: then it fits"), "{advice}"),
        other => panic!("expected the solve not to fit, got {other:?}"),
    }
    let streaming = |k: usize| MemoryPlan::new(&config, &hp, &PlanOptions { streamed_blocks: k, ..o }).unwrap();
    let (four, five) = (streaming(4), streaming(5));
    assert_eq!(five.weight_bytes, weights - 3 * per_layer);
    assert_eq!(phase(&five, "solve"), phase(&plan, "solve") - 3 * per_layer);
    assert!(five.fits(44 * GIB) && !four.fits(44 * GIB));
    // Only blocks above the last edited layer can stream.
    let err = MemoryPlan::new(&config, &hp, &PlanOptions { streamed_blocks: 27, ..o }).err().unwrap().to_string();
    assert!(err.contains("at most 26"), "{err}");
}

/// Runs the statistics and an edit of 300 requests on the world model and
/// compares each phase's measured peak with the plan.
#[test]
fn planned_peaks_match_the_measured_ones_on_the_world_model() {
    check_planned_peaks(0);
}

/// The same with the top three blocks streamed from the checkpoint: fewer
/// weights on the GPU, two streamed blocks uploaded at a time.
#[test]
fn planned_peaks_match_the_measured_ones_with_streamed_blocks() {
    check_planned_peaks(3);
}

fn check_planned_peaks(streamed_blocks: usize) {
    let ctx = pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/world-gpt2");
    let overrides: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("memit-hparams.json")).unwrap()).unwrap();
    let hp = Hparams::for_model(&read_config(&dir).unwrap()).with_overrides(&overrides).unwrap().with_overrides(&serde_json::json!({"v_num_grad_steps": 3})).unwrap();
    // As `edit` runs: the blocks through the last edited layer for the
    // statistics, then the rest of the model.
    let loaded = load_hf_dir(ctx.clone(), &dir, LoadOptions { prefix_blocks: Some(hp.last_layer() + 1), streamed_blocks, ..Default::default() }).unwrap();
    let (mut model, tok) = (loaded.model, loaded.tokenizer.unwrap());
    assert!(model.blocks.len() < model.config.n_layers && model.head.is_none());
    let facts: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("facts.json")).unwrap()).unwrap();
    let cities: Vec<&str> = facts["relations"]["city"]["objects"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let requests: Vec<EditRequest> = facts["people"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| EditRequest {
            case_id: None,
            prompt: "The home of {} is in".into(),
            subject: p["subject"].as_str().unwrap().into(),
            target_new: TargetText { text: cities[(cities.iter().position(|&c| c == p["city"]).unwrap() + 1 + i % 5) % cities.len()].into() },
            target_true: None,
        })
        .collect();
    let limits = DeviceLimits { max_storage_buffer_binding_size: ctx.limits().max_storage_buffer_binding_size, max_buffer_size: ctx.limits().max_buffer_size };
    let o = PlanOptions {
        matrix_dtype: DType::F32,
        n_requests: requests.len(),
        requests: RequestShape::measure(&tok, &requests, 0).unwrap(),
        templates: 1,
        limits,
        target: TargetOptions::default(),
        stats_max_len: None,
        keep_original_weights: false,
        method: EditMethod::Memit,
        streamed_blocks,
    };
    let plan = MemoryPlan::new(&model.config, &hp, &o).unwrap();
    eprintln!("{}", plan.summary(None));

    let max_len = model.config.max_positions.min(model.tokens_per_pass());
    let identity = StatsIdentity { model_id: "world".into(), corpus_id: "train".into(), layers: hp.layers.clone(), max_len };
    let mut acc = StatsAccumulator::new(&model, identity).unwrap();
    // Enough texts for several full passes of 4,096 tokens.
    let texts: Vec<String> = std::fs::read_to_string(dir.join("train.txt")).unwrap().lines().take(1500).map(String::from).collect();
    for chunk in texts.chunks(64) {
        acc.add_texts(&model, &tok, chunk).unwrap();
    }
    let (covariances, _) = pollster::block_on(acc.finish(&model)).unwrap();
    let stats_peak = ctx.memory().peak_bytes;
    drop(acc);
    ctx.reset_peak_memory();
    model.load_remaining(loaded.source.as_ref()).unwrap();
    let load_peak = ctx.memory().peak_bytes;

    let templates = vec!["{}".to_string()];
    let outcome = pollster::block_on(apply_memit(&mut model, &tok, &requests, &hp, &templates, &covariances, &mut |_| {})).unwrap();
    let p = &outcome.phases;
    let measured = [
        ("load", load_peak),
        ("statistics", stats_peak),
        ("target vectors", p.target_vectors.peak_bytes),
        ("keys", p.keys.peak_bytes),
        ("solve", p.solve.peak_bytes),
        ("update", p.update.peak_bytes),
    ];
    let mut worst: f64 = 0.0;
    for (name, got) in measured {
        let planned = phase(&plan, name);
        let error = (planned as f64 - got as f64) / got as f64;
        eprintln!("{name:<15} planned {planned:>10} measured {got:>10} ({:+.1}%)", 100.0 * error);
        worst = worst.max(error.abs());
    }
    assert!(worst <= 0.10, "a planned peak is {:.1}% off the measured one", 100.0 * worst);
}
