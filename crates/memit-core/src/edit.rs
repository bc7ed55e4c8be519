//! The whole MEMIT edit: target vectors at the last edited layer, then, layer
//! by layer, keys, residuals spread over the remaining layers, the solve and
//! the weight update — keys recomputed after each layer's update.

use memit_gpu::{BinaryOp, CostCounters, DType, MatmulSpec};
use serde::{Deserialize, Serialize};
use web_time::Instant;
use memit_models::{Model, TextTokenizer, WeightLayout};

use crate::error::{MemitError, Result};
use crate::hparams::Hparams;
use crate::keys::keys_and_outputs;
use crate::request::{EditRequest, PreparedRequest};
use crate::nullspace::{null_space_projector, NullSpaceProjector};
use crate::solve::{solve_system, LayerSystem};
use crate::target::{compute_target_vectors, TargetOptions, TargetVector};

/// Where a long job is; `done` of `total` units of `stage` (layers;
/// optimisation steps for "target vectors").
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
    /// The ridge of the system refined in float64, relative to the same
    /// mean diagonal (see `LayerSolve::ridge`).
    pub solve_ridge: f64,
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
    /// Target vectors: requests carried by those steps, summed over steps
    /// (stopped requests still riding in a batch included).
    #[serde(skip_serializing_if = "is_zero")]
    pub request_steps: u64,
    /// Target vectors: times a batch continued without its stopped requests.
    #[serde(skip_serializing_if = "is_zero")]
    pub regroups: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
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
    let linear = &mut model.resident_block_mut(update.layer)?.mlp_out;
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
    apply_edit(model, tokenizer, requests, hp, templates, covariances, &mut EditState::memit(), &TargetOptions::default(), progress).await
}

/// Edits `model` in place with `state`'s method, and adds these edits to
/// what `state` remembers for the next edit of the same model.
#[allow(clippy::too_many_arguments)]
pub async fn apply_edit(
    model: &mut Model,
    tokenizer: &TextTokenizer,
    requests: &[EditRequest],
    hp: &Hparams,
    templates: &[String],
    covariances: &[LayerCovariance],
    state: &mut EditState,
    options: &TargetOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<EditOutcome> {
    let (prepared, targets, target_cost) = compute_targets_with(model, tokenizer, requests, hp, templates, options, progress).await?;
    let (updates, mut phases) = spread_over_layers(model, tokenizer, &prepared, &targets, hp, templates, covariances, state, progress).await?;
    phases.target_vectors = target_cost;
    state.edits += prepared.len();
    Ok(EditOutcome { targets, updates, phases })
}

/// How each layer's update is solved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum EditMethod {
    /// MEMIT: each edit is solved against the preserved statistics alone.
    #[default]
    #[serde(rename = "memit")]
    Memit,
    /// MEMIT whose solve also holds the keys of the earlier edits of the
    /// same model (Σ KᵀK beside λC), as sequential-editing work does.
    #[serde(rename = "memit-seq")]
    MemitSeq,
    /// AlphaEdit (Fang et al., ICLR 2025): the update is projected onto the
    /// null space of the preserved keys (C's eigenvalues under
    /// `nullspace_threshold`), with the earlier edits' keys kept and an
    /// `l2`·I ridge in place of λC.
    #[serde(rename = "alphaedit")]
    AlphaEdit,
}

impl EditMethod {
    pub const ALL: [EditMethod; 3] = [EditMethod::Memit, EditMethod::MemitSeq, EditMethod::AlphaEdit];

    pub fn name(self) -> &'static str {
        match self {
            EditMethod::Memit => "memit",
            EditMethod::MemitSeq => "memit-seq",
            EditMethod::AlphaEdit => "alphaedit",
        }
    }

    pub fn parse(name: &str) -> Result<EditMethod> {
        Self::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| MemitError::Hparams(format!("unknown method `{name}` (known: memit, memit-seq, alphaedit)")))
    }
}

/// What a method carries from one edit of a model to the next: for each
/// edited layer the keys of the edits made so far (Σ KᵀK, for memit-seq and
/// AlphaEdit) and AlphaEdit's null-space projector. Host memory: one
/// d_ff² matrix per layer and kind.
pub struct EditState {
    method: EditMethod,
    layers: Vec<LayerState>,
    edits: usize,
}

struct LayerState {
    layer: usize,
    /// Σ KᵀK of earlier edits, [d_ff, d_ff]; empty before the first.
    accumulated: Vec<f32>,
    projector: Option<NullSpaceProjector>,
}

impl EditState {
    /// Plain MEMIT: nothing to remember.
    pub fn memit() -> EditState {
        EditState { method: EditMethod::Memit, layers: Vec::new(), edits: 0 }
    }

    /// A fresh state for `method` on a model not yet edited by it; AlphaEdit
    /// computes each layer's projector here (on the GPU).
    pub async fn new(ctx: &std::sync::Arc<memit_gpu::GpuContext>, method: EditMethod, hp: &Hparams, covariances: &[LayerCovariance], progress: &mut dyn FnMut(Progress)) -> Result<EditState> {
        let mut layers = Vec::new();
        if method != EditMethod::Memit {
            for (i, &layer) in hp.layers.iter().enumerate() {
                let projector = if method == EditMethod::AlphaEdit {
                    progress(Progress { stage: "null-space projectors", done: i, total: hp.layers.len() });
                    Some(null_space_projector(ctx, covariance_of(covariances, layer)?, hp.nullspace_threshold).await?)
                } else {
                    None
                };
                layers.push(LayerState { layer, accumulated: Vec::new(), projector });
            }
            if method == EditMethod::AlphaEdit {
                progress(Progress { stage: "null-space projectors", done: hp.layers.len(), total: hp.layers.len() });
            }
        }
        Ok(EditState { method, layers, edits: 0 })
    }

    pub fn method(&self) -> EditMethod {
        self.method
    }

    /// Requests edited through this state so far.
    pub fn edits(&self) -> usize {
        self.edits
    }

    /// Each layer's null-space dimension (trace of P), AlphaEdit only.
    pub fn null_space_dimensions(&self) -> Vec<(usize, f64)> {
        self.layers.iter().filter_map(|l| l.projector.as_ref().map(|p| (l.layer, p.dimension))).collect()
    }

    /// The linear system of `layer` under this method.
    fn system<'a>(&'a self, cov: &'a LayerCovariance, hp: &Hparams) -> Result<LayerSystem<'a>> {
        let layer_state = || self.layers.iter().find(|l| l.layer == cov.layer).ok_or_else(|| MemitError::Hparams(format!("the {} state has no layer {}: it was made for other hparams", self.method.name(), cov.layer)));
        let accumulated = |l: &'a LayerState| (!l.accumulated.is_empty()).then_some(&l.accumulated[..]);
        Ok(match self.method {
            EditMethod::Memit => LayerSystem::memit(cov, hp.mom2_update_weight),
            EditMethod::MemitSeq => LayerSystem { accumulated: accumulated(layer_state()?), ..LayerSystem::memit(cov, hp.mom2_update_weight) },
            EditMethod::AlphaEdit => {
                let l = layer_state()?;
                let projector = l.projector.as_ref().expect("AlphaEdit states hold projectors");
                LayerSystem { layer: cov.layer, covariance: None, accumulated: accumulated(l), projector: Some(&projector.matrix), identity: hp.l2 }
            }
        })
    }

    /// Adds one edit's keys at `layer` ([n, d_ff]) to Σ KᵀK, for the next
    /// edit. The authors read them again from the edited model once all
    /// layers are updated; a layer's keys depend only on the layers below
    /// it, so those are the keys its solve used.
    async fn remember_keys(&mut self, ctx: &std::sync::Arc<memit_gpu::GpuContext>, layer: usize, keys: &[f32], n: usize) -> Result<()> {
        let Some(l) = self.layers.iter_mut().find(|l| l.layer == layer) else { return Ok(()) };
        let d_ff = keys.len() / n.max(1);
        let sum = if l.accumulated.is_empty() { ctx.zeros(&[d_ff, d_ff], DType::F32)? } else { ctx.upload(&[d_ff, d_ff], &l.accumulated, DType::F32)? };
        let keys = ctx.upload(&[n, d_ff], keys, DType::F32)?;
        ctx.matmul_into(&keys, &keys, &sum, MatmulSpec { trans_a: true, beta: 1.0, ..Default::default() })?;
        l.accumulated = ctx.read(&sum).await?;
        Ok(())
    }

    /// Forgets the edits made so far (a fresh model, the same statistics):
    /// the projectors, which depend on C alone, are kept.
    pub fn forget_edits(&mut self) {
        self.layers.iter_mut().for_each(|l| l.accumulated.clear());
        self.edits = 0;
    }
}

fn covariance_of(covariances: &[LayerCovariance], layer: usize) -> Result<&LayerCovariance> {
    covariances.iter().find(|c| c.layer == layer).ok_or_else(|| MemitError::Hparams(format!("no covariance statistics for layer {layer}")))
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
    check_resident(model, hp)?;
    let prepared: Vec<PreparedRequest> = requests.iter().enumerate().map(|(i, r)| r.prepare(i, tokenizer)).collect::<Result<_>>()?;
    if prepared.is_empty() {
        return Err(MemitError::Request { index: 0, detail: "no requests".into() });
    }
    let mut cost = PhaseCost::default();
    let clock = PhaseClock::start(&model.ctx);
    let (targets, target_cost) =
        compute_target_vectors(model, tokenizer, &prepared, templates, hp, options, &mut |done, total| progress(Progress { stage: "target vectors", done, total })).await?;
    clock.stop(&mut cost);
    cost.counters.steps = target_cost.steps;
    cost.counters.request_steps = target_cost.request_steps;
    cost.counters.regroups = target_cost.regroups;
    Ok((prepared, targets, cost))
}

/// The edited layers must stay on the GPU: a streamed block is uploaded
/// from the checkpoint each time it runs, so an edit to it would not stay.
fn check_resident(model: &Model, hp: &Hparams) -> Result<()> {
    match model.first_streamed_layer() {
        Some(first) if hp.last_layer() >= first => Err(MemitError::Hparams(format!(
            "layer {} is edited but streamed from the checkpoint (blocks {first}..{} are): stream at most {} blocks",
            hp.last_layer(),
            model.config.n_layers,
            hp.streamable_blocks(&model.config)
        ))),
        _ => Ok(()),
    }
}

/// Step 3: spreads z − h over the layers of `hp.layers`, solving (as
/// `state`'s method does, which then remembers the keys) and updating one
/// layer at a time (keys recomputed after each update).
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
    state: &mut EditState,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Vec<LayerUpdate>, Phases)> {
    let (d, d_ff) = (model.config.d_model, model.config.d_ff);
    check_resident(model, hp)?;
    let last = hp.last_layer();
    let n = prepared.len();
    if targets.len() != n {
        return Err(MemitError::Hparams(format!("{} target vectors for {n} requests", targets.len())));
    }
    let mut phases = Phases::default();
    let mut updates = Vec::with_capacity(hp.layers.len());
    for (i, &layer) in hp.layers.iter().enumerate() {
        progress(Progress { stage: "layers", done: i, total: hp.layers.len() });
        let cov = covariance_of(covariances, layer)?;
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
        let solved = solve_system(&model.ctx, d_ff, &state.system(cov, hp)?, &ko.keys, n).await?;
        clock.stop(&mut phases.solve);
        if state.method != EditMethod::Memit {
            let clock = PhaseClock::start(&model.ctx);
            state.remember_keys(&model.ctx, layer, &ko.keys, n).await?;
            clock.stop(&mut phases.keys);
        }
        let update = LayerUpdate { layer, resid, x: solved.x, solve_shift: solved.shift, solve_ridge: solved.ridge, solve_refinements: solved.refinements, solve_correction: solved.last_correction };
        let clock = PhaseClock::start(&model.ctx);
        apply_update(model, &update)?;
        model.ctx.sync().await?;
        clock.stop(&mut phases.update);
        updates.push(update);
    }
    progress(Progress { stage: "layers", done: hp.layers.len(), total: hp.layers.len() });
    Ok((updates, phases))
}
