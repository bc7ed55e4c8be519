//! A memory plan for a MEMIT edit, made from the model's shapes alone (a
//! `config.json` is enough): the peak GPU tensor bytes and host bytes of
//! each phase — load, statistics, target vectors, keys, solve, update — and
//! whether they fit a budget.
//!
//! Each phase replays, allocation by allocation, what today's code asks the
//! GPU for (`Model::load` of the blocks through the last edited layer for
//! the statistics, then `Model::load_remaining`, with q/k/v, and a gated
//! MLP's gate and up, concatenated at load when a checkpoint stores them
//! apart; `Model::forward`/`block_trace`, where biases and residuals are
//! added in the products' epilogues, and the backward pass; the statistics
//! accumulator, `optimise_batch`, `solve_layer`, `apply_update`),
//! so the plan is of what the code *does*, including terms a leaner layout
//! would not need:
//! - statistics hold C and its Kahan compensation for every edited layer at
//!   once (2·|R|·d_ff²·4 bytes), and keep every edited layer's keys and
//!   block output of a pass until the pass ends;
//! - the target step keeps the full-batch residual stream after gathering
//!   its suffix rows, and the suffix cache keeps all of q|k|v (the one
//!   projection's output) where only k and v are read;
//! - a caller that keeps the unedited model (`keep_original_weights`: the
//!   browser page, for its revert) holds each updated W_out twice; the
//!   CLI's `edit` does not.
//!
//! Tensor bytes are what `GpuContext::memory().peak_bytes` measures; buffer
//! bytes add the buffer pool's size classes (≤ 25% per buffer); a budget
//! must also hold the released buffers the pool keeps for reuse
//! (`MemoryPlan::pool_reserve`).

use memit_gpu::DType;
use memit_models::{Arch, ModelConfig, Residual, TextTokenizer};
use serde::Serialize;
use thiserror::Error;

use crate::edit::EditMethod;
use crate::error::MemitError;
use crate::hparams::Hparams;
use crate::request::{subject_last_index, EditRequest};
use crate::target::TargetOptions;

/// Released buffers the GPU runtime keeps for reuse (its default cap).
pub const POOL_BYTES: u64 = 1 << 30;
/// Tokens one forward pass holds at most (`Model::tokens_per_pass`).
const MAX_TOKENS_PER_PASS: usize = 4096;
/// Most requests a plan is made for: far beyond any edit that fits a GPU,
/// and small enough that no byte count overflows.
const MAX_REQUESTS: usize = 10_000_000;
/// Row block of the blocked Cholesky factorisation (`SOLVE_BLOCK`), and
/// the width of its column scratch (`FACTOR_PANEL`).
const SOLVE_BLOCK: usize = memit_gpu::SOLVE_BLOCK;
const FACTOR_PANEL: usize = memit_gpu::FACTOR_PANEL;

#[derive(Debug, Error)]
pub enum PlanError {
    #[error("memory plan: {0}")]
    Input(String),
    #[error(transparent)]
    Memit(#[from] MemitError),
    #[error("{phase} needs {} of GPU memory and {} for the buffer pool, over the {} budget by {}: {advice}", gib(*needed), gib(*pool), gib(*budget), gib(needed + pool - budget))]
    DoesNotFit { phase: &'static str, needed: u64, pool: u64, budget: u64, advice: String },
}

/// Bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The adapter limits the plan depends on: tensors are split into chunks
/// of at most one storage binding, and passes are sized to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceLimits {
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
}

impl DeviceLimits {
    /// Largest tensor chunk, as `GpuContext` computes it.
    fn chunk_bytes(&self) -> u64 {
        self.max_storage_buffer_binding_size.min(self.max_buffer_size) & !15
    }
}

/// The token lengths of a batch of requests (each the longest over the
/// requests, since a batch is padded to its longest prompt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RequestShape {
    /// Tokens of a rewriting prompt: context template, prompt, all but the
    /// last target token.
    pub rewrite_tokens: usize,
    /// Of those, the subject's last token and the ones after it.
    pub rewrite_suffix: usize,
    /// Tokens of the KL prompt "{subject} is a", and from its subject's
    /// last token on.
    pub kl_tokens: usize,
    pub kl_suffix: usize,
    pub target_tokens: usize,
    /// Tokens of a key prompt (context template and prompt).
    pub key_tokens: usize,
}

impl RequestShape {
    /// CounterFact-like requests (a 12-token prompt ending 3 tokens after
    /// the subject, a 4-token subject, 2 target tokens), each context
    /// template adding `template_tokens` before the prompt.
    pub fn typical(template_tokens: usize) -> RequestShape {
        RequestShape { rewrite_tokens: template_tokens + 13, rewrite_suffix: 5, kl_tokens: 6, kl_suffix: 3, target_tokens: 2, key_tokens: template_tokens + 12 }
    }

    /// The shape of `requests` as `tokenizer` splits them, each context
    /// template adding at most `template_tokens` before the prompt.
    pub fn measure(tokenizer: &TextTokenizer, requests: &[EditRequest], template_tokens: usize) -> Result<RequestShape, PlanError> {
        let mut shape = RequestShape { rewrite_tokens: 1, rewrite_suffix: 1, kl_tokens: 1, kl_suffix: 1, target_tokens: 1, key_tokens: 1 };
        for (i, r) in requests.iter().enumerate() {
            let prepared = r.prepare(i, tokenizer)?;
            let n_target = prepared.target_ids.len();
            let target_prefix = tokenizer.decode(&prepared.target_ids[..n_target - 1]).map_err(MemitError::from)?;
            let filled = r.prompt.replace("{}", &r.subject);
            let rewrite = tokenizer.encode(&(filled.clone() + &target_prefix)).map_err(MemitError::from)?.len();
            let lookup = subject_last_index(&r.prompt, &r.subject, tokenizer)?;
            let kl_template = "{} is a";
            let kl = tokenizer.encode(&kl_template.replace("{}", &r.subject)).map_err(MemitError::from)?.len();
            let kl_lookup = subject_last_index(kl_template, &r.subject, tokenizer)?;
            let key = tokenizer.encode(&filled).map_err(MemitError::from)?.len();
            shape.rewrite_tokens = shape.rewrite_tokens.max(rewrite + template_tokens);
            shape.rewrite_suffix = shape.rewrite_suffix.max(rewrite.saturating_sub(lookup));
            shape.kl_tokens = shape.kl_tokens.max(kl);
            shape.kl_suffix = shape.kl_suffix.max(kl.saturating_sub(kl_lookup));
            shape.target_tokens = shape.target_tokens.max(n_target);
            shape.key_tokens = shape.key_tokens.max(key + template_tokens);
        }
        Ok(shape)
    }
}

/// What is planned besides the model and hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanOptions {
    /// Storage of weight matrices (`--f16`: F16).
    pub matrix_dtype: DType,
    pub n_requests: usize,
    pub requests: RequestShape,
    /// Context templates per request (1 plain, 6 generated).
    pub templates: usize,
    pub limits: DeviceLimits,
    pub target: TargetOptions,
    /// Statistics texts are truncated to this many tokens (default: the
    /// context length, at most one pass, as `stats` does).
    pub stats_max_len: Option<usize>,
    /// The caller keeps the unedited model alive during the edit (the CLI's
    /// `edit` does, to compare predictions), so updated W_out are extra.
    pub keep_original_weights: bool,
    /// memit-seq holds Σ KᵀK per layer on the host; AlphaEdit also its
    /// projectors, computed on the GPU before the edit and multiplied into
    /// each solve.
    pub method: EditMethod,
    /// The model's highest blocks kept off the GPU and uploaded from the
    /// checkpoint when they run (`LoadOptions::streamed_blocks`); the two
    /// uploaded last stay on the GPU.
    pub streamed_blocks: usize,
}

/// One phase's peaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhasePlan {
    pub name: &'static str,
    /// Peak bytes of live tensors (what the runtime's meter reports).
    pub gpu_bytes: u64,
    /// Peak bytes of the buffers holding them (pool size classes).
    pub gpu_buffer_bytes: u64,
    /// Estimated peak host heap (memory-mapped checkpoints not counted).
    pub host_bytes: u64,
    /// The terms behind the peak, for people.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    pub n_requests: usize,
    pub layers: Vec<usize>,
    pub f16: bool,
    /// Weights on the GPU (with two streamed blocks, when blocks stream).
    pub weight_bytes: u64,
    pub streamed_blocks: usize,
    /// Tokens of one statistics pass.
    pub stats_tokens_per_pass: usize,
    /// Requests per target-vector batch, and batches.
    pub target_batch: usize,
    pub target_batches: usize,
    pub phases: Vec<PhasePlan>,
    /// Shapes that exceed one storage binding: the run would fail there
    /// whatever the memory.
    pub binding_problems: Vec<String>,
}

impl MemoryPlan {
    pub fn new(config: &ModelConfig, hp: &Hparams, options: &PlanOptions) -> Result<MemoryPlan, PlanError> {
        hp.validate(config)?;
        if !(1..=MAX_REQUESTS).contains(&options.n_requests) {
            return Err(PlanError::Input(format!("{} requests: plan for 1 to {MAX_REQUESTS}", options.n_requests)));
        }
        if !(1..=64).contains(&options.templates) {
            return Err(PlanError::Input(format!("{} context templates: plan for 1 to 64", options.templates)));
        }
        let streamable = hp.streamable_blocks(config);
        if options.streamed_blocks > streamable {
            return Err(PlanError::Input(format!(
                "{} streamed blocks: at most {streamable} (the blocks above the last edited layer {}) can be",
                options.streamed_blocks,
                hp.last_layer()
            )));
        }
        let m = Shape::of(config, options.matrix_dtype);
        let mut sim = Sim::new(options.limits);
        // Statistics run on the blocks through the last edited layer; the
        // rest of the model is loaded after them, and of streamed blocks
        // the two uploaded last.
        let prefix_blocks = hp.last_layer() + 1;
        m.load_prefix(&mut sim, prefix_blocks);
        let (stats, tokens) = stats_phase(&m, hp, options, &mut sim);
        m.load_rest(&mut sim, prefix_blocks, config.n_layers - options.streamed_blocks);
        let mut weight_bytes = sim.live;
        let mut phases = vec![stats];
        phases.push(sim.phase("load", largest_matrix(config) * (4 + m.esize) as u64, format!("weights {}", gib(weight_bytes))));
        if options.method == EditMethod::AlphaEdit {
            phases.push(projector_phase(&m, hp, options, &mut sim));
        }
        // The target vectors run the streamed blocks: two stay uploaded.
        let before_stream = sim.live;
        m.load_blocks(&mut sim, 0..options.streamed_blocks.min(2));
        weight_bytes += sim.live - before_stream;
        let (mut target, batch) = target_phase(&m, hp, options, &mut sim);
        if options.streamed_blocks > 0 {
            // Each streamed tensor passes through the host as it goes up.
            target.host_bytes += largest_matrix(config) * (4 + m.esize) as u64;
            target.detail += &format!("; {} streamed blocks uploaded every step", options.streamed_blocks);
        }
        phases.push(target);
        for phase in [keys_phase, solve_phase, update_phase] {
            phases.push(beside_originals(&m, hp, options, &mut sim, phase));
        }
        Ok(MemoryPlan {
            n_requests: options.n_requests,
            layers: hp.layers.clone(),
            f16: options.matrix_dtype == DType::F16,
            weight_bytes,
            streamed_blocks: options.streamed_blocks,
            stats_tokens_per_pass: tokens,
            target_batch: batch,
            target_batches: options.n_requests.div_ceil(batch),
            phases,
            binding_problems: sim.problems,
        })
    }

    /// The phase with the largest GPU buffer peak.
    pub fn peak(&self) -> &PhasePlan {
        self.phases.iter().max_by_key(|p| p.gpu_buffer_bytes).expect("a plan has at least its load phase")
    }

    /// Released buffers the pool may keep beside the live ones: its cap,
    /// or all a run ever allocates when that is less.
    pub fn pool_reserve(&self) -> u64 {
        POOL_BYTES.min(self.peak().gpu_buffer_bytes)
    }

    /// Whether every phase fits `budget` bytes with the pool's reserve.
    pub fn fits(&self, budget: u64) -> bool {
        self.peak().gpu_buffer_bytes + self.pool_reserve() <= budget
    }

    /// Ok when every phase fits `budget`, else the first phase that does
    /// not, with what would make it fit (`config`, `hp` and `options` are
    /// the ones the plan was made with, re-planned with each change).
    pub fn check(&self, budget: u64, config: &ModelConfig, hp: &Hparams, options: &PlanOptions) -> Result<(), PlanError> {
        let pool = self.pool_reserve();
        let Some(phase) = self.phases.iter().find(|p| p.gpu_buffer_bytes + pool > budget) else {
            return Ok(());
        };
        let fits = |o: &PlanOptions| MemoryPlan::new(config, hp, o).map(|p| p.fits(budget)).unwrap_or(false);
        let mut advice = Vec::new();
        if options.matrix_dtype == DType::F32 {
            let f16 = PlanOptions { matrix_dtype: DType::F16, ..*options };
            advice.push(if fits(&f16) { "use --f16 (weights in f16: then it fits)".to_string() } else { "use --f16 (halves the weights, not enough alone)".to_string() });
        }
        if matches!(phase.name, "target vectors") {
            let smaller = PlanOptions { target: TargetOptions { batch_bytes: options.target.batch_bytes / 4, ..options.target }, ..*options };
            if fits(&smaller) {
                advice.push(format!(
                    "fewer requests per target batch (now {}): a target batch memory of {} fits (`--target-batch-memory` in the CLI)",
                    self.target_batch,
                    gib(smaller.target.batch_bytes)
                ));
            }
        }
        if matches!(phase.name, "target vectors" | "keys" | "solve" | "update") {
            let most = largest_fitting(options.n_requests, |n| fits(&PlanOptions { n_requests: n, ..*options }));
            advice.push(match most {
                Some(n) => format!("fewer requests per edit (at most {n} fit: split the requests into several edits)"),
                None => "even one request does not fit: a GPU with more memory".to_string(),
            });
        }
        if phase.name == "statistics" {
            advice.push(format!(
                "fewer texts per pass or fewer edited layers at once (the statistics hold C and its compensation for all {} layers: {})",
                hp.layers.len(),
                gib(2 * hp.layers.len() as u64 * square_bytes(config.d_ff))
            ));
        }
        let streamed = (options.streamed_blocks + 1..=hp.streamable_blocks(config)).find(|&k| fits(&PlanOptions { streamed_blocks: k, ..*options }));
        if let Some(k) = streamed {
            advice.push(format!(
                "stream the top {k} blocks from the checkpoint (`--stream-blocks {k}`: then it fits; every target-vector step uploads them again)"
            ));
        }
        if phase.name == "load" && streamed.is_none() {
            advice.push("a GPU with more memory (the weights alone do not fit)".to_string());
        }
        if phase.name == "projectors" || (phase.name == "solve" && options.method == EditMethod::AlphaEdit) {
            let memit = PlanOptions { method: EditMethod::MemitSeq, ..*options };
            if fits(&memit) {
                advice.push("--method memit-seq (AlphaEdit holds P and a product beside the d_ff² system)".to_string());
            }
        }
        let others: Vec<&str> = self.phases.iter().filter(|p| p.name != phase.name && p.gpu_buffer_bytes + pool > budget).map(|p| p.name).collect();
        if !others.is_empty() {
            advice.push(format!("{} over the budget too", others.join(", ")));
        }
        Err(PlanError::DoesNotFit { phase: phase.name, needed: phase.gpu_buffer_bytes, pool, budget, advice: advice.join("; ") })
    }

    /// A short block for people.
    pub fn summary(&self, budget: Option<u64>) -> String {
        let mut out = format!(
            "memory plan: {} requests, layers {:?}, weights {} ({}){}\n",
            self.n_requests,
            self.layers,
            if self.f16 { "f16" } else { "f32" },
            gib(self.weight_bytes),
            if self.streamed_blocks > 0 { format!(" on the GPU, the top {} blocks streamed from the checkpoint", self.streamed_blocks) } else { String::new() }
        );
        for p in &self.phases {
            out += &format!("  {:<15} GPU {:>10} (buffers {:>10})  host {:>10}  {}\n", p.name, gib(p.gpu_bytes), gib(p.gpu_buffer_bytes), gib(p.host_bytes), p.detail);
        }
        let peak = self.peak();
        out += &format!("  peak: {} in {} (+{} buffer pool)", gib(peak.gpu_buffer_bytes), peak.name, gib(self.pool_reserve()));
        if let Some(budget) = budget {
            out += &format!("; budget {}: {}", gib(budget), if self.fits(budget) { "fits" } else { "does NOT fit" });
        }
        for problem in &self.binding_problems {
            out += &format!("\n  binding limit: {problem}");
        }
        out
    }
}

/// The largest n ≤ `below` (n < below) for which `fits(n)`, assuming
/// fitting is monotone in n.
fn largest_fitting(below: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if below <= 1 || !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1, below);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

fn square_bytes(n: usize) -> u64 {
    (n * n * 4) as u64
}

fn largest_matrix(c: &ModelConfig) -> u64 {
    let qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
    (c.vocab_size * c.d_model).max(c.d_model * c.d_ff).max(c.d_model * qkv) as u64
}

/// The allocator as the runtime sees it: tensors split into chunks of whole
/// rows, each chunk metered at its size and held in a buffer of its pool
/// size class.
struct Sim {
    chunk: u64,
    /// Largest storage buffer the pool rounds up to.
    cap: u64,
    live: u64,
    peak: u64,
    buffers_live: u64,
    buffers_peak: u64,
    /// (metered, buffer) bytes of each allocation, zeroed when freed.
    allocations: Vec<(u64, u64)>,
    problems: Vec<String>,
}

/// One simulated tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Buf(usize);

/// The runtime's pool size class: powers of two in quarter steps.
fn size_class(bytes: u64, cap: u64) -> u64 {
    let bytes = bytes.max(4).next_multiple_of(4);
    if bytes <= 256 {
        return 256.min(cap.max(bytes));
    }
    let top = 63 - (bytes - 1).leading_zeros();
    let quarter = 1u64 << (top - 2);
    let class = (bytes.div_ceil(quarter) * quarter).next_multiple_of(4);
    class.min(cap.max(bytes) & !3).max(bytes)
}

impl Sim {
    fn new(limits: DeviceLimits) -> Sim {
        Sim {
            chunk: limits.chunk_bytes().max(16),
            cap: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
            live: 0,
            peak: 0,
            buffers_live: 0,
            buffers_peak: 0,
            allocations: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// A [rows, row_len] tensor of `esize`-byte elements whose chunks hold
    /// a multiple of `row_multiple` rows.
    fn tensor_blocks(&mut self, rows: usize, row_len: usize, esize: usize, row_multiple: usize, what: &str) -> Buf {
        let row_bytes = (row_len * esize) as u64;
        let mut per_chunk = (self.chunk / row_bytes.max(1)) as usize / row_multiple * row_multiple;
        if per_chunk == 0 {
            self.problem(format!("{what}: a block of {row_multiple} rows of {row_bytes} bytes exceeds one storage binding ({} bytes)", self.chunk));
            per_chunk = row_multiple.max(1);
        }
        let (mut metered, mut buffers, mut done) = (0, 0, 0);
        while done < rows || done == 0 {
            let n = per_chunk.min(rows - done);
            let bytes = n as u64 * row_bytes;
            metered += bytes.max(4).next_multiple_of(4);
            buffers += size_class(bytes, self.cap);
            done += n.max(1);
        }
        self.add(metered, buffers)
    }

    fn tensor(&mut self, rows: usize, row_len: usize, esize: usize) -> Buf {
        self.tensor_blocks(rows, row_len, esize, 1, "a tensor row")
    }

    fn f32(&mut self, rows: usize, cols: usize) -> Buf {
        self.tensor(rows, cols, 4)
    }

    /// u32 index arrays live in one buffer.
    fn indices(&mut self, n: usize) -> Buf {
        let bytes = (n * 4) as u64;
        self.add(bytes.max(4), size_class(bytes, self.cap))
    }

    fn add(&mut self, metered: u64, buffers: u64) -> Buf {
        self.live += metered;
        self.buffers_live += buffers;
        self.peak = self.peak.max(self.live);
        self.buffers_peak = self.buffers_peak.max(self.buffers_live);
        self.allocations.push((metered, buffers));
        Buf(self.allocations.len() - 1)
    }

    fn free(&mut self, b: Buf) {
        let (metered, buffers) = std::mem::take(&mut self.allocations[b.0]);
        self.live -= metered;
        self.buffers_live -= buffers;
    }

    fn free_all(&mut self, bufs: impl IntoIterator<Item = Buf>) {
        for b in bufs {
            self.free(b);
        }
    }

    fn problem(&mut self, text: String) {
        if !self.problems.contains(&text) {
            self.problems.push(text);
        }
    }

    /// Starts a phase's peak from what is live now (`reset_peak_memory`).
    fn reset_peak(&mut self) {
        self.peak = self.live;
        self.buffers_peak = self.buffers_live;
    }

    fn phase(&mut self, name: &'static str, host_bytes: u64, detail: String) -> PhasePlan {
        let plan = PhasePlan { name, gpu_bytes: self.peak, gpu_buffer_bytes: self.buffers_peak, host_bytes, detail };
        self.reset_peak();
        plan
    }
}

/// The model's dimensions as the forward and backward passes use them.
struct Shape {
    arch: Arch,
    d: usize,
    ff: usize,
    vocab: usize,
    n_layers: usize,
    n_heads: usize,
    max_positions: usize,
    rotary_dim: usize,
    /// Widths of q and of k (and v).
    q_width: usize,
    kv_width: usize,
    /// q, k, v stored as three projections in the checkpoint (GPT-J,
    /// Llama), concatenated into one at load (the parts and the joined
    /// weight live at once).
    qkv_apart: bool,
    proj_bias: bool,
    mlp_bias: bool,
    gated: bool,
    layernorm: bool,
    residual: Residual,
    tied: bool,
    esize: usize,
}

impl Shape {
    fn of(c: &ModelConfig, dtype: DType) -> Shape {
        Shape {
            arch: c.arch,
            d: c.d_model,
            ff: c.d_ff,
            vocab: c.vocab_size,
            n_layers: c.n_layers,
            n_heads: c.n_heads,
            max_positions: c.max_positions,
            rotary_dim: c.rotary_dim,
            q_width: c.n_heads * c.head_dim,
            kv_width: c.n_kv_heads * c.head_dim,
            qkv_apart: matches!(c.arch, Arch::Gptj | Arch::Llama),
            proj_bias: matches!(c.arch, Arch::Gpt2 | Arch::GptNeox),
            mlp_bias: c.arch != Arch::Llama,
            gated: c.arch == Arch::Llama,
            layernorm: c.arch != Arch::Llama,
            residual: c.residual,
            tied: c.tie_word_embeddings,
            esize: dtype.size(),
        }
    }

    fn qkv_width(&self) -> usize {
        self.q_width + 2 * self.kv_width
    }

    /// Padded tokens per forward pass (`Model::tokens_per_pass`).
    fn tokens_per_pass(&self, chunk: u64) -> usize {
        let widest = 4 * self.ff.max(self.qkv_width()).max(self.d) as u64;
        ((chunk / widest) as usize).clamp(1, MAX_TOKENS_PER_PASS)
    }

    /// Bytes of one W_out as stored.
    fn w_out_bytes(&self) -> u64 {
        (self.d * self.ff * self.esize) as u64
    }

    /// Allocates what `Model::load` uploads for a prefix model of `blocks`
    /// blocks (matrices in the chosen dtype, vectors f32), in its order:
    /// the blocks, the token embedding, then the rotary table and learned
    /// positions. Projections a checkpoint stores apart are uploaded, joined
    /// by `concat_rows` (biases first) and dropped, so a peak may fall at a
    /// join rather than at the end.
    fn load_prefix(&self, sim: &mut Sim, blocks: usize) {
        self.load_blocks(sim, 0..blocks);
        sim.tensor(self.vocab, self.d, self.esize);
        if self.rotary_dim > 0 {
            sim.tensor(self.max_positions, self.rotary_dim, 4);
        }
        if self.arch == Arch::Gpt2 {
            sim.tensor(self.max_positions, self.d, self.esize);
        }
    }

    /// `Model::load_remaining`: the blocks `from..to` (those not streamed),
    /// then the head (the unembedding unless tied, and the final norm).
    fn load_rest(&self, sim: &mut Sim, from: usize, to: usize) {
        self.load_blocks(sim, from..to);
        if !self.tied {
            self.linear_weight(sim, self.d, self.vocab, false, self.arch == Arch::Gptj);
        }
        self.norm_weights(sim);
    }

    /// `Loader::linear`: the bias, then the weight as stored.
    fn linear_weight(&self, sim: &mut Sim, d_in: usize, d_out: usize, in_out: bool, bias: bool) -> Vec<Buf> {
        let mut bufs = Vec::new();
        if bias {
            bufs.push(sim.tensor(d_out, 1, 4));
        }
        bufs.push(if in_out { sim.tensor(d_in, d_out, self.esize) } else { sim.tensor(d_out, d_in, self.esize) });
        bufs
    }

    /// A norm's weight, and its bias for a layer norm.
    fn norm_weights(&self, sim: &mut Sim) {
        for _ in 0..if self.layernorm { 2 } else { 1 } {
            sim.tensor(self.d, 1, 4);
        }
    }

    fn load_blocks(&self, sim: &mut Sim, layers: std::ops::Range<usize>) {
        let (d, ff, e) = (self.d, self.ff, self.esize);
        // `Loader::concatenated`: the parts ([out, in]), the joined bias
        // and weight, then the parts dropped.
        let concatenated = |sim: &mut Sim, outs: &[usize], bias: bool| {
            let parts: Vec<Buf> = outs.iter().flat_map(|&o| self.linear_weight(sim, d, o, false, bias)).collect();
            let total: usize = outs.iter().sum();
            if bias {
                sim.tensor(total, 1, 4);
            }
            sim.tensor(total, d, e);
            sim.free_all(parts);
        };
        let in_out = self.arch == Arch::Gpt2;
        for _ in layers {
            if self.qkv_apart {
                concatenated(sim, &[self.q_width, self.kv_width, self.kv_width], self.proj_bias);
            } else {
                self.linear_weight(sim, d, self.qkv_width(), in_out, self.proj_bias);
            }
            if self.gated {
                concatenated(sim, &[ff, ff], self.mlp_bias);
            } else {
                self.linear_weight(sim, d, ff, in_out, self.mlp_bias);
            }
            self.norm_weights(sim);
            if self.residual != Residual::ParallelSharedNorm {
                self.norm_weights(sim);
            }
            self.linear_weight(sim, self.q_width, d, in_out, self.proj_bias);
            self.linear_weight(sim, ff, d, in_out, self.mlp_bias);
        }
    }

    /// `Linear::forward` (or `forward_plus`): one new tensor, the bias and
    /// any residual added by the product's epilogue.
    fn linear(&self, sim: &mut Sim, rows: usize, out: usize) -> Buf {
        sim.f32(rows, out)
    }

    /// Token (and learned position) embeddings of `rows` rows.
    fn embed(&self, sim: &mut Sim, rows: usize) -> Buf {
        let x = sim.f32(rows, self.d);
        if self.arch != Arch::Gpt2 {
            return x;
        }
        let p = sim.f32(rows, self.d);
        let sum = sim.f32(rows, self.d);
        sim.free_all([x, p]);
        sum
    }

    /// `Model::block_trace` over `rows` rows: a = ln1(x), q|k|v (one
    /// tensor, rotary in place; a suffix pass writes its k and v into the
    /// cache, whose tensors the trace then reads, and keeps its own q|k|v
    /// all the same), the attention's output `mixed`, x1 = x plus its
    /// projection, `mixed` dropped, m (ln2(x1), ln2(x), or GPT-J's shared
    /// a), up (gate | up for a gated MLP), key, out = W_out·key + x1; a
    /// and m live until it returns, x1 is dropped then unless sequential.
    /// The trace keeps q|k|v first, then x1 (sequential), up.
    fn block(&self, sim: &mut Sim, rows: usize) -> BlockBufs {
        let (d, ff) = (self.d, self.ff);
        let a = sim.f32(rows, d);
        let qkv = self.linear(sim, rows, self.qkv_width());
        let mixed = sim.f32(rows, self.q_width);
        let x1 = self.linear(sim, rows, d);
        sim.free(mixed);
        let m = match self.residual {
            Residual::Sequential | Residual::Parallel => Some(sim.f32(rows, d)),
            Residual::ParallelSharedNorm => None,
        };
        let up = self.linear(sim, rows, if self.gated { 2 * ff } else { ff });
        let key = sim.f32(rows, ff);
        let out = self.linear(sim, rows, d);
        sim.free(a);
        sim.free_all(m);
        let mut trace = vec![qkv];
        if self.residual == Residual::Sequential {
            trace.push(x1);
        } else {
            sim.free(x1);
        }
        trace.push(up);
        BlockBufs { trace, key, out }
    }

    /// `Model::forward` over `rows` rows through blocks `0..upto`, keeping
    /// the block output and key of the `capture` layers (returned).
    fn forward(&self, sim: &mut Sim, rows: usize, capture: &[usize], upto: usize) -> Vec<Buf> {
        let mut kept = Vec::new();
        let mut x = self.embed(sim, rows);
        let mut x_kept = false;
        for layer in 0..upto {
            let b = self.block(sim, rows);
            sim.free_all(b.trace);
            let keep = capture.contains(&layer);
            if keep {
                kept.extend([b.out, b.key]);
            } else {
                sim.free(b.key);
            }
            if !x_kept {
                sim.free(x);
            }
            (x, x_kept) = (b.out, keep);
        }
        if !x_kept {
            sim.free(x);
        }
        kept
    }

    /// `Model::block_backward` over `rows` query rows: returns the new
    /// gradient (the caller frees the old one). `scores` is the attention
    /// backward pass's scratch (probabilities and their gradient, each).
    fn block_backward(&self, sim: &mut Sim, rows: usize, scores: usize) -> Buf {
        let d = self.d;
        match self.residual {
            Residual::Sequential => {
                let d_m = self.mlp_backward(sim, rows);
                let g2 = sim.f32(rows, d);
                let d_x1 = sim.f32(rows, d);
                sim.free_all([d_m, g2]);
                let d_a = self.attention_backward(sim, rows, scores);
                let g1 = sim.f32(rows, d);
                let out = sim.f32(rows, d);
                sim.free_all([g1, d_a, d_x1]);
                out
            }
            Residual::ParallelSharedNorm => {
                let d_attn = self.attention_backward(sim, rows, scores);
                let d_mlp = self.mlp_backward(sim, rows);
                let d_a = sim.f32(rows, d);
                sim.free_all([d_attn, d_mlp]);
                let g1 = sim.f32(rows, d);
                let out = sim.f32(rows, d);
                sim.free_all([g1, d_a]);
                out
            }
            Residual::Parallel => {
                let d_a = self.attention_backward(sim, rows, scores);
                let d_m = self.mlp_backward(sim, rows);
                let g1 = sim.f32(rows, d);
                let partial = sim.f32(rows, d);
                let g2 = sim.f32(rows, d);
                let out = sim.f32(rows, d);
                sim.free_all([g1, partial, g2, d_a, d_m]);
                out
            }
        }
    }

    /// `Model::mlp_backward`: d_key, d_up (d_gate | d_up in one tensor
    /// for a gated MLP), then d_m.
    fn mlp_backward(&self, sim: &mut Sim, rows: usize) -> Buf {
        let d_key = sim.f32(rows, self.ff);
        let d_up = sim.f32(rows, if self.gated { 2 * self.ff } else { self.ff });
        let d_m = sim.f32(rows, self.d);
        sim.free_all([d_key, d_up]);
        d_m
    }

    /// `Model::attention_backward`: d_mixed, one zero-filled d_qkv laid out
    /// like q|k|v, the scores scratch, then d_a.
    fn attention_backward(&self, sim: &mut Sim, rows: usize, scores: usize) -> Buf {
        let d_mixed = sim.f32(rows, self.q_width);
        let d_qkv = sim.f32(rows, self.qkv_width());
        let probs = sim.tensor(scores.max(1), 1, 4);
        let d_scores = sim.tensor(scores.max(1), 1, 4);
        sim.free_all([probs, d_scores]);
        let d_a = sim.f32(rows, self.d);
        sim.free_all([d_mixed, d_qkv]);
        d_a
    }
}

/// A block's outputs: what a trace keeps, its MLP key and its output.
struct BlockBufs {
    trace: Vec<Buf>,
    key: Buf,
    out: Buf,
}

/// Statistics: C and its compensation for every edited layer (today: all
/// at once), one forward pass of a pass's tokens keeping every edited
/// layer's output and key, the real rows gathered per layer; at the end C
/// is formed one layer at a time.
fn stats_phase(m: &Shape, hp: &Hparams, o: &PlanOptions, sim: &mut Sim) -> (PhasePlan, usize) {
    let layers = hp.layers.len();
    let prefix_weights = sim.live;
    let tpp = m.tokens_per_pass(sim.chunk);
    let max_len = o.stats_max_len.unwrap_or(m.max_positions.min(tpp)).min(m.max_positions);
    let tokens = tpp.max(max_len);
    let sums: Vec<Buf> = (0..2 * layers).map(|_| sim.f32(m.ff, m.ff)).collect();
    let batch = [sim.indices(tokens), sim.indices(tokens), sim.indices(4 * tokens.div_ceil(max_len.max(1)))];
    let kept = m.forward(sim, tokens, &hp.layers, hp.last_layer() + 1);
    let rows = sim.indices(tokens);
    for _ in 0..layers {
        let real = sim.f32(tokens, m.ff);
        sim.free(real);
    }
    sim.free_all(kept.into_iter().chain(batch).chain([rows]));
    let c = sim.f32(m.ff, m.ff);
    sim.free(c);
    sim.free_all(sums);
    // Checkpoints hold the sums read back, their bytes and the file (3×).
    let host = 3 * 2 * layers as u64 * square_bytes(m.ff);
    let detail = format!(
        "blocks 0..{} {}, C + compensation {} (all {layers} layers at once), passes of {tokens} tokens",
        hp.last_layer() + 1,
        gib(prefix_weights),
        gib(2 * layers as u64 * square_bytes(m.ff))
    );
    (sim.phase("statistics", host, detail), tokens)
}

/// The target-vector planner's batch size for uniform requests
/// (`target::plan_batches` with its `row_costs`).
fn target_batch_size(m: &Shape, hp: &Hparams, o: &PlanOptions, sim: &mut Sim) -> usize {
    let layer = hp.last_layer();
    let above = (m.n_layers - layer - 1) as u64;
    let width = (12 * m.d + 4 * m.ff) as u64;
    let step_row = 4 * (above * width + 4 * m.d as u64);
    let batch_row = 4 * (m.d as u64 + if o.target.prefix_cache { above * m.qkv_width() as u64 } else { 0 });
    let loss_row = 16 * m.vocab as u64;
    let widest = 4 * m.d.max(m.ff).max(m.qkv_width()) as u64;
    let r = &o.requests;
    let seqs = (o.templates + 1) as u64;
    let longest = r.rewrite_tokens.max(r.kl_tokens) as u64;
    let suffix = r.rewrite_suffix.max(r.kl_suffix) as u64;
    let loss = (o.templates * r.target_tokens + 1) as u64;
    let chunk = sim.chunk;
    let binding_ok = |k: u64| {
        let rows = k * seqs * longest;
        rows * widest <= chunk && k * loss * m.vocab as u64 * 4 <= chunk && k * seqs * m.n_heads as u64 * longest * longest * 4 <= chunk
    };
    let fits = |k: u64| {
        let rows = k * seqs * longest;
        let step_rows = if o.target.prefix_cache { k * seqs * suffix } else { rows };
        rows * batch_row + step_rows * step_row + k * loss * loss_row <= o.target.batch_bytes && binding_ok(k)
    };
    if !binding_ok(1) {
        sim.problem("target vectors: one request's prompts exceed a storage binding (padded rows, logits or attention scores)".into());
    }
    let most = o.n_requests.min(o.target.max_requests).max(1);
    let mut k = 1;
    while k < most && fits(k as u64 + 1) {
        k += 1;
    }
    k
}

/// Target vectors for the largest batch: its forward pass to the last
/// edited layer, the suffix cache of the blocks above, then per step the
/// traced blocks above over the suffix rows, logits of the loss rows and
/// the backward pass.
fn target_phase(m: &Shape, hp: &Hparams, o: &PlanOptions, sim: &mut Sim) -> (PhasePlan, usize) {
    let k = target_batch_size(m, hp, o, sim);
    let layer = hp.last_layer();
    let r = &o.requests;
    let nseq = k * (o.templates + 1);
    let seq = r.rewrite_tokens.max(r.kl_tokens);
    let rows = nseq * seq;
    let prefix = o.target.prefix_cache;
    let suffix_len = if prefix { r.rewrite_suffix.max(r.kl_suffix).min(seq) } else { seq };
    let step_rows = nseq * suffix_len;
    let n_loss = k * (o.templates * r.target_tokens + 1);
    let steps = hp.v_num_grad_steps.max(1);

    let mut held = vec![sim.indices(rows), sim.indices(rows), sim.indices(4 * nseq)];
    let kept = m.forward(sim, rows, &[layer], layer + 1);
    let (base, key) = (kept[0], kept[1]);
    sim.free(key);
    held.push(base);
    if prefix {
        held.extend([sim.indices(step_rows), sim.indices(step_rows), sim.indices(step_rows), sim.indices(4 * nseq)]);
        let mut x = base;
        for _ in layer + 1..m.n_layers {
            let b = m.block(sim, rows);
            // The cache holds k and v: views of the block's q|k|v tensor.
            let mut trace = b.trace.into_iter();
            held.extend(trace.next());
            sim.free_all(trace);
            sim.free(b.key);
            if x != base {
                sim.free(x);
            }
            x = b.out;
        }
        if x != base {
            sim.free(x);
        }
    }
    let first_lookup = sim.indices(k);
    held.push(sim.f32(k, m.d));
    sim.free(first_lookup);
    if prefix {
        held.push(sim.f32(step_rows, m.d));
    }
    held.push(sim.indices(3 * n_loss + 4 * k + nseq + step_rows));
    held.push(sim.indices(n_loss));
    held.extend([sim.f32(k, 3 * m.d), sim.f32(k, m.vocab), sim.tensor(k + steps * k * 4, 1, 4)]);

    let scores = nseq * m.n_heads * suffix_len * seq;
    let mut step = vec![sim.f32(step_rows, m.d)];
    for _ in layer + 1..m.n_layers {
        let b = m.block(sim, step_rows);
        step.extend(b.trace);
        step.extend([b.key, b.out]);
    }
    step.push(sim.f32(n_loss, m.d));
    let normed = sim.f32(n_loss, m.d);
    step.push(m.linear(sim, n_loss, m.vocab));
    sim.free(normed);
    step.extend([sim.f32(n_loss, m.vocab), sim.f32(n_loss, m.vocab), sim.f32(n_loss, 2)]);
    if steps > 1 {
        let d_normed = sim.f32(n_loss, m.d);
        let mut d = sim.f32(n_loss, m.d);
        let scattered = sim.f32(step_rows, m.d);
        sim.free(d);
        d = scattered;
        for _ in layer + 1..m.n_layers {
            let next = m.block_backward(sim, step_rows, scores);
            sim.free(d);
            d = next;
        }
        sim.free_all([d, d_normed]);
    }
    sim.free_all(step);
    sim.free_all(held);
    let host = square_bytes(m.ff) * hp.layers.len() as u64 + (o.n_requests * (3 * m.d + 16 * steps)) as u64 * 4;
    let detail = format!("{} batch(es) of {k} requests: {rows} rows, {step_rows} per step, {n_loss} logit rows", o.n_requests.div_ceil(k));
    (sim.phase("target vectors", host, detail), k)
}

/// Host bytes every edit phase after statistics holds: C of every layer
/// (read for the solve) and the updates of the layers already done.
fn edit_host(m: &Shape, hp: &Hparams, o: &PlanOptions, updates_done: usize) -> u64 {
    let squares_per_layer = match o.method {
        EditMethod::Memit => 1,
        EditMethod::MemitSeq => 2,
        EditMethod::AlphaEdit => 3,
    };
    square_bytes(m.ff) * squares_per_layer * hp.layers.len() as u64 + (updates_done * o.n_requests * (m.d + m.ff) * 4) as u64
}

/// AlphaEdit's projectors (`null_space_projector`), one layer at a time
/// before the edit: the Newton–Schulz iterate, its square and the next
/// iterate, and on the host the sign read back beside P.
fn projector_phase(m: &Shape, hp: &Hparams, o: &PlanOptions, sim: &mut Sim) -> PhasePlan {
    let held: Vec<Buf> = (0..3).map(|_| sim.f32(m.ff, m.ff)).collect();
    sim.free_all(held);
    let host = edit_host(m, hp, o, 0) + 2 * square_bytes(m.ff);
    sim.phase("projectors", host, format!("3 × d_ff² {}", gib(3 * square_bytes(m.ff))))
}

/// One of the phases after the target vectors, planned with the earlier
/// layers' updated W_out held beside the originals (when `edit` keeps them).
fn beside_originals(m: &Shape, hp: &Hparams, o: &PlanOptions, sim: &mut Sim, phase: fn(&Shape, &Hparams, &PlanOptions, &mut Sim) -> PhasePlan) -> PhasePlan {
    let kept: Vec<Buf> = if o.keep_original_weights { (1..hp.layers.len()).map(|_| sim.tensor(m.d, m.ff, m.esize)).collect() } else { Vec::new() };
    sim.reset_peak();
    let plan = phase(m, hp, o, sim);
    sim.free_all(kept);
    sim.reset_peak();
    plan
}

/// Keys of the last edited layer (the largest): forward passes of the key
/// prompts through the last edited layer, keeping both layers' outputs and
/// keys, and the gathered subject rows.
fn keys_phase(m: &Shape, hp: &Hparams, o: &PlanOptions, sim: &mut Sim) -> PhasePlan {
    let texts = o.n_requests * o.templates;
    let longest = o.requests.key_tokens.max(1);
    let per_pass = (m.tokens_per_pass(sim.chunk) / longest).max(1).min(texts);
    let rows = per_pass * longest;
    let last = hp.last_layer();
    let batch = [sim.indices(rows), sim.indices(rows), sim.indices(4 * per_pass)];
    let kept = m.forward(sim, rows, &[hp.layers[0], last], last + 1);
    let gathered = [sim.indices(per_pass), sim.f32(per_pass, m.ff), sim.f32(per_pass, m.d)];
    sim.free_all(kept.into_iter().chain(batch).chain(gathered));
    let host = edit_host(m, hp, o, hp.layers.len() - 1) + ((texts + o.n_requests) * (m.ff + m.d) * 4) as u64;
    let detail = format!("{texts} prompts in passes of {per_pass}");
    sim.phase("keys", host, detail)
}

/// One layer's solve (`solve_layer`): λC + KKᵀ formed in the solver's
/// layout with K beside it, K dropped, the matrix factored in place with its
/// block inverses and panel scratch (dropped when the factor is done), then
/// each solve's right-hand side (overwritten by the solution) and one
/// scratch of the same size.
fn solve_phase(m: &Shape, hp: &Hparams, o: &PlanOptions, sim: &mut Sim) -> PhasePlan {
    let (ff, n) = (m.ff, o.n_requests);
    let a = sim.tensor_blocks(ff, ff, 4, SOLVE_BLOCK, "λC + KKᵀ");
    let k = sim.f32(n, ff);
    sim.free(k);
    let alphaedit = o.method == EditMethod::AlphaEdit;
    if alphaedit {
        // P·(S·P): P and S·P beside S.
        let (p, sp) = (sim.f32(ff, ff), sim.f32(ff, ff));
        sim.free_all([p, sp]);
    }
    let panel_rows = (((sim.chunk / (ff as u64 * 4)) as usize / SOLVE_BLOCK * SOLVE_BLOCK).max(SOLVE_BLOCK)).min(ff);
    let (block, panel) = (SOLVE_BLOCK.min(ff), FACTOR_PANEL.min(ff));
    let diag_inv = sim.f32(ff.div_ceil(SOLVE_BLOCK) * SOLVE_BLOCK, SOLVE_BLOCK);
    if (ff.div_ceil(SOLVE_BLOCK) * SOLVE_BLOCK * SOLVE_BLOCK * 4) as u64 > sim.chunk {
        sim.problem(format!("solve: the diagonal block inverses of a {ff}×{ff} system exceed one storage binding"));
    }
    let held = [a, diag_inv, sim.f32(1, 1)];
    // The factorisation's scratch, gone before the first solve.
    let mut scratch = vec![sim.f32(block, block)];
    let mut at = 0;
    while at < ff {
        let rows = panel_rows.min(ff - at);
        scratch.push(sim.f32(rows, panel));
        at += rows;
    }
    sim.free_all(scratch);
    let rhs = |sim: &mut Sim| sim.tensor_blocks(ff, n, 4, panel_rows, "solve right-hand side (fewer requests per edit)");
    let (x, scratch) = (rhs(sim), rhs(sim));
    sim.free_all([x, scratch]);
    sim.free_all(held);
    let refinement_arrays = if alphaedit { 12 } else { 10 };
    let solve_host = (n * ff * 8 * refinement_arrays + n * m.d * 4 + 256 * ff * 8) as u64 + 8 * (n as u64 * n as u64);
    let host = edit_host(m, hp, o, hp.layers.len() - 1) + solve_host;
    let detail = format!("λC + KKᵀ {}, then 2 × n·d_ff {}", gib(square_bytes(ff)), gib(2 * (n * ff * 4) as u64));
    sim.phase("solve", host, detail)
}

/// `apply_update` of the last layer: the factors, ΔW, and W_out + ΔW (cast
/// through f32 when weights are f16), beside the old W_out.
fn update_phase(m: &Shape, hp: &Hparams, o: &PlanOptions, sim: &mut Sim) -> PhasePlan {
    let n = o.n_requests;
    let (rows, cols) = if m.arch == Arch::Gpt2 { (m.ff, m.d) } else { (m.d, m.ff) };
    let mut temps = vec![sim.f32(n, m.d), sim.f32(n, m.ff), sim.f32(rows, cols)];
    if m.esize != 4 {
        temps.push(sim.f32(rows, cols));
    }
    temps.push(sim.f32(rows, cols));
    let new = if m.esize != 4 { sim.tensor(rows, cols, m.esize) } else { temps.pop().expect("updated") };
    sim.free_all(temps);
    sim.free(new);
    let host = edit_host(m, hp, o, hp.layers.len());
    let detail = if o.keep_original_weights { format!("+{} updated W_out beside the originals", gib(hp.layers.len() as u64 * m.w_out_bytes())) } else { String::new() };
    sim.phase("update", host, detail)
}
