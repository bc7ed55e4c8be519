//! The whole MEMIT edit: target vectors at the last edited layer, then, layer
//! by layer, keys, residuals spread over the remaining layers, the solve and
//! the weight update — keys recomputed after each layer's update.

use memit_gpu::{BinaryOp, CostCounters, DType};
use serde::Serialize;
use web_time::Instant;
use memit_models::{Model, TextTokenizer, WeightLayout};

use crate::error::{MemitError, Result};
use crate::hparams::Hparams;
use crate::keys::keys_and_outputs;
use crate::request::{EditRequest, PreparedRequest};
use crate::solve::solve_layer;
use crate::target::{compute_target_vectors, TargetOptions, TargetVector};

/// Where a long job is; `done` of `total` units of `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub stage: &'static str,
    pub done: usize,
    pub total: usize,
}

/// The uncentered second moment C = E[k kᵀ] of one layer's keys.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCovariance {
    pub layer: usize,
    /// [d_ff, d_ff] row-major.
    pub matrix: Vec<f32>,
    pub n_tokens: u64,
}

/// The update of one layer as low-rank factors: ΔW = residᵀ · x, i.e.
/// ΔW[o][i] = Σ_r resid[r][o] · x[r][i] in Linear ([out, in]) orientation.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerUpdate {
    pub layer: usize,
    /// [n, d_model]
    pub resid: Vec<f32>,
    /// [n, d_ff]
    pub x: Vec<f32>,
    /// Diagonal shift the solve needed, relative to the mean diagonal of
    /// λC + KKᵀ: 0 unless f32 rounding left that matrix with a
    /// non-positive pivot (statistics spanning fewer directions than d_ff).
    pub solve_shift: f32,
    /// Float64 refinement steps of the solve, and the relative size of the
    /// last correction (an estimate of x's remaining error).
    pub solve_refinements: usize,
    pub solve_correction: f64,
}

pub struct EditOutcome {
    pub targets: Vec<TargetVector>,
    pub updates: Vec<LayerUpdate>,
    pub phases: Phases,
}

/// Time, peak tensor memory and GPU cost counters of one phase, summed
/// (time, counters) and maxed (memory) over layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PhaseCost {
    pub seconds: f64,
    pub peak_bytes: u64,
    pub counters: PhaseCounters,
}

/// The machine-independent cost of a phase: what it asked of the GPU, and
/// how many optimisation steps it ran (target vectors only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PhaseCounters {
    #[serde(flatten)]
    pub gpu: CostCounters,
    pub steps: u64,
}

/// Where an edit's time and memory went: target-vector optimisation, key
/// computation, the solve, and the weight update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Phases {
    pub target_vectors: PhaseCost,
    pub keys: PhaseCost,
    pub solve: PhaseCost,
    pub update: PhaseCost,
}

impl Phases {
    /// Each phase's machine-independent counters, by phase name.
    pub fn counters(&self) -> std::collections::BTreeMap<&'static str, PhaseCounters> {
        [("target_vectors", self.target_vectors), ("keys", self.keys), ("solve", self.solve), ("update", self.update)].into_iter().map(|(name, cost)| (name, cost.counters)).collect()
    }
}

/// Measures one phase: wall time (work is complete when the phase's last
/// readback or sync returns) and peak tensor memory.
pub(crate) struct PhaseClock {
    ctx: std::sync::Arc<memit_gpu::GpuContext>,
    start: Instant,
    counters: CostCounters,
}

impl PhaseClock {
    pub(crate) fn start(ctx: &std::sync::Arc<memit_gpu::GpuContext>) -> PhaseClock {
        let ctx = ctx.clone();
        ctx.reset_peak_memory();
        PhaseClock { start: Instant::now(), counters: ctx.counters(), ctx }
    }

    pub(crate) fn stop(self, into: &mut PhaseCost) {
        into.seconds += self.start.elapsed().as_secs_f64();
        into.peak_bytes = into.peak_bytes.max(self.ctx.memory().peak_bytes);
        into.counters.gpu.add(&self.ctx.counters().since(&self.counters));
    }
}

/// Adds resid ᵀ·x to W_out of `update.layer`, respecting its storage layout
/// and dtype.
pub fn apply_update(model: &mut Model, update: &LayerUpdate) -> Result<()> {
    let ctx = model.ctx.clone();
    let (d, d_ff) = (model.config.d_model, model.config.d_ff);
    let n = update.resid.len() / d;
    let resid = ctx.upload(&[n, d], &update.resid, DType::F32)?;
    let x = ctx.upload(&[n, d_ff], &update.x, DType::F32)?;
    let linear = &mut model.blocks[update.layer].mlp_out;
    let delta = match linear.layout {
        WeightLayout::OutIn => ctx.matmul(&resid, &x, true, false)?,
        WeightLayout::InOut => ctx.matmul(&x, &resid, true, false)?,
    };
    let dtype = linear.weight.dtype();
    let current = if dtype == DType::F32 { linear.weight.clone() } else { ctx.cast(&linear.weight, DType::F32)? };
    let updated = ctx.binary(BinaryOp::Add, &current, &delta)?;
    linear.weight = if dtype == DType::F32 { updated } else { ctx.cast(&updated, dtype)? };
    Ok(())
}

/// Edits `model` in place with MEMIT and returns the per-layer factors.
/// `covariances` holds C for every layer in `hp.layers`.
#[allow(clippy::too_many_arguments)]
pub async fn apply_memit(
    model: &mut Model,
    tokenizer: &TextTokenizer,
    requests: &[EditRequest],
    hp: &Hparams,
    templates: &[String],
    covariances: &[LayerCovariance],
    progress: &mut dyn FnMut(Progress),
) -> Result<EditOutcome> {
    apply_memit_with(model, tokenizer, requests, hp, templates, covariances, &TargetOptions::default(), progress).await
}

/// As [`apply_memit`], with the target vectors batched as `options` says.
#[allow(clippy::too_many_arguments)]
pub async fn apply_memit_with(
    model: &mut Model,
    tokenizer: &TextTokenizer,
    requests: &[EditRequest],
    hp: &Hparams,
    templates: &[String],
    covariances: &[LayerCovariance],
    options: &TargetOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<EditOutcome> {
    let (prepared, targets, target_cost) = compute_targets_with(model, tokenizer, requests, hp, templates, options, progress).await?;
    let (updates, mut phases) = spread_over_layers(model, tokenizer, &prepared, &targets, hp, templates, covariances, progress).await?;
    phases.target_vectors = target_cost;
    Ok(EditOutcome { targets, updates, phases })
}

/// Step 2 for every request: its target vector z at the last edited layer.
/// Returns the prepared requests, their targets, and the phase's cost.
pub async fn compute_targets(
    model: &Model,
    tokenizer: &TextTokenizer,
    requests: &[EditRequest],
    hp: &Hparams,
    templates: &[String],
    progress: &mut dyn FnMut(Progress),
) -> Result<(Vec<PreparedRequest>, Vec<TargetVector>, PhaseCost)> {
    compute_targets_with(model, tokenizer, requests, hp, templates, &TargetOptions::default(), progress).await
}

/// As [`compute_targets`], batched as `options` says.
pub async fn compute_targets_with(
    model: &Model,
    tokenizer: &TextTokenizer,
    requests: &[EditRequest],
    hp: &Hparams,
    templates: &[String],
    options: &TargetOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Vec<PreparedRequest>, Vec<TargetVector>, PhaseCost)> {
    hp.validate(&model.config)?;
    let prepared: Vec<PreparedRequest> = requests.iter().enumerate().map(|(i, r)| r.prepare(i, tokenizer)).collect::<Result<_>>()?;
    if prepared.is_empty() {
        return Err(MemitError::Request { index: 0, detail: "no requests".into() });
    }
    let mut cost = PhaseCost::default();
    let clock = PhaseClock::start(&model.ctx);
    let total = prepared.len();
    progress(Progress { stage: "target vectors", done: 0, total });
    let (targets, target_cost) =
        compute_target_vectors(model, tokenizer, &prepared, templates, hp, options, &mut |done| progress(Progress { stage: "target vectors", done, total })).await?;
    clock.stop(&mut cost);
    cost.counters.steps = target_cost.steps;
    Ok((prepared, targets, cost))
}

/// Step 3: spreads z − h over the layers of `hp.layers`, solving and
/// updating one layer at a time (keys recomputed after each update).
/// `targets` come from [`compute_targets`] with the same `hp.layers`;
/// the returned phases leave `target_vectors` empty.
#[allow(clippy::too_many_arguments)]
pub async fn spread_over_layers(
    model: &mut Model,
    tokenizer: &TextTokenizer,
    prepared: &[PreparedRequest],
    targets: &[TargetVector],
    hp: &Hparams,
    templates: &[String],
    covariances: &[LayerCovariance],
    progress: &mut dyn FnMut(Progress),
) -> Result<(Vec<LayerUpdate>, Phases)> {
    let (d, d_ff) = (model.config.d_model, model.config.d_ff);
    let last = hp.last_layer();
    let n = prepared.len();
    if targets.len() != n {
        return Err(MemitError::Hparams(format!("{} target vectors for {n} requests", targets.len())));
    }
    let mut phases = Phases::default();
    let mut updates = Vec::with_capacity(hp.layers.len());
    for (i, &layer) in hp.layers.iter().enumerate() {
        progress(Progress { stage: "layers", done: i, total: hp.layers.len() });
        let cov = covariances.iter().find(|c| c.layer == layer).ok_or_else(|| MemitError::Hparams(format!("no covariance statistics for layer {layer}")))?;
        if cov.matrix.len() != d_ff * d_ff {
            return Err(MemitError::Hparams(format!("covariance of layer {layer} is not {d_ff}x{d_ff}")));
        }
        let clock = PhaseClock::start(&model.ctx);
        let ko = keys_and_outputs(model, tokenizer, prepared, templates, layer, last).await?;
        clock.stop(&mut phases.keys);
        let remaining = (hp.layers.len() - i) as f32;
        let mut resid = vec![0.0f32; n * d];
        for r in 0..n {
            for j in 0..d {
                resid[r * d + j] = (targets[r].z[j] - ko.outputs[r * d + j]) / remaining;
            }
        }
        let clock = PhaseClock::start(&model.ctx);
        let solved = solve_layer(model, cov, &ko.keys, n, hp.mom2_update_weight).await?;
        clock.stop(&mut phases.solve);
        let update = LayerUpdate { layer, resid, x: solved.x, solve_shift: solved.shift, solve_refinements: solved.refinements, solve_correction: solved.last_correction };
        let clock = PhaseClock::start(&model.ctx);
        apply_update(model, &update)?;
        model.ctx.sync().await?;
        clock.stop(&mut phases.update);
        updates.push(update);
    }
    progress(Progress { stage: "layers", done: hp.layers.len(), total: hp.layers.len() });
    Ok((updates, phases))
}
