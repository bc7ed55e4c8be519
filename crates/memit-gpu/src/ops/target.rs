//! MEMIT's target-vector optimisation step for many requests at once, on
//! the GPU: δ added to the residual stream, the NLL and KL terms with their
//! gradients w.r.t. the logits, and per-request Adam steps with weight
//! decay, the norm clamp and early stopping (shaders/target.wgsl).

use bytemuck::{Pod, Zeroable};

use super::{require_f32, u32_of};
use crate::context::{grid_1d, GpuContext, Kernel};
use crate::error::{GpuError, Result};
use crate::shader::ShaderFamily;
use crate::tensor::{DType, Indices, Tensor};

const NONE: u32 = u32::MAX;

/// One row whose log-probabilities the loss reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossRow {
    pub request: u32,
    /// The new object's token this row must predict, or `None` for the
    /// request's KL row.
    pub token: Option<u32>,
    /// Weight of the row's NLL term (1 / (target tokens × prompts)).
    pub weight: f32,
}

/// The tables of one batch of requests on the GPU.
#[derive(Debug, Clone)]
pub struct TargetPlan {
    plan: Indices,
    n: usize,
    d: usize,
    vocab: usize,
    n_loss: usize,
    rows: usize,
    meta_off: u32,
    ranges_off: u32,
    lookups_off: u32,
    owner_off: u32,
}

impl TargetPlan {
    pub fn requests(&self) -> usize {
        self.n
    }

    pub fn loss_rows(&self) -> usize {
        self.n_loss
    }
}

/// Hyperparameters of the optimisation (MEMIT's v_* settings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetHyper {
    pub kl_factor: f32,
    /// A request stops once its total loss falls below this.
    pub loss_threshold: f32,
    pub weight_decay: f32,
    pub lr: f32,
    /// ‖δ‖ ≤ clamp·‖target_init‖.
    pub clamp: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n: u32,
    d: u32,
    vocab: u32,
    n_loss: u32,
    rows: u32,
    meta_off: u32,
    ranges_off: u32,
    lookups_off: u32,
    owner_off: u32,
    step: u32,
    last_step: u32,
    record_init: u32,
    kl_factor: f32,
    threshold: f32,
    weight_decay: f32,
    lr: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    bias1: f32,
    bias2: f32,
    clamp: f32,
    _pad: [u32; 3],
}

fn kernel(entry: &'static str) -> Kernel<'static> {
    Kernel { family: ShaderFamily::Target, entry, defines: &[] }
}

impl GpuContext {
    /// Uploads the tables of a batch: `loss` rows grouped by request (in
    /// request order), and per request the activation rows of its subject's
    /// last token (`lookups`), for activations of `rows` rows of width `d`
    /// and logits of width `vocab`.
    pub fn target_plan(&self, d: usize, vocab: usize, rows: usize, loss: &[LossRow], lookups: &[Vec<u32>]) -> Result<TargetPlan> {
        let n = lookups.len();
        let fail = |detail: String| GpuError::shape("target_plan", detail);
        if loss.windows(2).any(|w| w[1].request < w[0].request) || loss.iter().any(|r| r.request as usize >= n) {
            return Err(fail("loss rows must be grouped by request, in order".into()));
        }
        if let Some(r) = loss.iter().find(|r| r.token.is_some_and(|t| t as usize >= vocab)) {
            return Err(fail(format!("target token {:?} outside the vocabulary of {vocab}", r.token)));
        }
        let mut owners = vec![NONE; rows];
        for (j, rows_of_j) in lookups.iter().enumerate() {
            for &r in rows_of_j {
                let slot = owners.get_mut(r as usize).ok_or_else(|| fail(format!("lookup row {r} outside {rows} rows")))?;
                if *slot != NONE {
                    return Err(fail(format!("activation row {r} is the subject row of two prompts")));
                }
                *slot = j as u32;
            }
        }
        let mut table = Vec::with_capacity(3 * loss.len() + 4 * n + rows);
        for r in loss {
            table.extend([r.request, r.token.unwrap_or(NONE), r.weight.to_bits()]);
        }
        let ranges_off = table.len();
        let (mut lookup_at, mut loss_at) = (0usize, 0usize);
        for (j, rows_of_j) in lookups.iter().enumerate() {
            let count = loss[loss_at..].iter().take_while(|r| r.request as usize == j).count();
            table.extend([loss_at as u32, (loss_at + count) as u32, lookup_at as u32, (lookup_at + rows_of_j.len()) as u32]);
            loss_at += count;
            lookup_at += rows_of_j.len();
        }
        let lookups_off = table.len();
        table.extend(lookups.iter().flatten());
        let owner_off = table.len();
        table.extend(&owners);
        Ok(TargetPlan {
            plan: self.indices(&table)?,
            n,
            d,
            vocab,
            n_loss: loss.len(),
            rows,
            meta_off: 0,
            ranges_off: u32_of(ranges_off, "target_plan")?,
            lookups_off: u32_of(lookups_off, "target_plan")?,
            owner_off: u32_of(owner_off, "target_plan")?,
        })
    }

    fn target_params(&self, plan: &TargetPlan) -> Result<Params> {
        Ok(Params {
            n: u32_of(plan.n, "target")?,
            d: u32_of(plan.d, "target")?,
            vocab: u32_of(plan.vocab, "target")?,
            n_loss: u32_of(plan.n_loss, "target")?,
            rows: u32_of(plan.rows, "target")?,
            meta_off: plan.meta_off,
            ranges_off: plan.ranges_off,
            lookups_off: plan.lookups_off,
            owner_off: plan.owner_off,
            ..Default::default()
        })
    }

    /// `base` [rows, d] with each request's δ (row 0 of its [3, d] block in
    /// `state`, shaped [n, 3, d]) added at its subject rows.
    pub fn target_add_delta(&self, plan: &TargetPlan, base: &Tensor, state: &Tensor) -> Result<Tensor> {
        require_f32("target_add_delta", &[base, state])?;
        expect("target_add_delta", base, &[plan.rows, plan.d])?;
        expect("target_add_delta", state, &[plan.n, 3, plan.d])?;
        let out = self.empty(base.shape(), DType::F32)?;
        let (base_buf, base_off) = base.single("target_add_delta")?;
        let (state_buf, state_off) = state.single("target_add_delta")?;
        let (out_buf, _) = out.single("target_add_delta")?;
        whole("target_add_delta", &[base_off, state_off])?;
        let params = self.target_params(plan)?;
        self.dispatch(
            kernel("add_delta"),
            bytemuck::bytes_of(&params),
            &[(1, &plan.plan.buffer), (2, base_buf), (3, out_buf), (13, state_buf)],
            grid_1d((plan.rows * plan.d).div_ceil(256)),
        )?;
        Ok(out)
    }

    /// Loss terms and logit gradients from `log_probs` [loss rows, vocab]:
    /// returns (d_logits [loss rows, vocab], per-row (loss, probability)
    /// [loss rows, 2]). With `record_init` the KL rows' log-probabilities
    /// are stored in `kl_init` [n, vocab] as the reference distribution.
    pub fn target_loss(&self, plan: &TargetPlan, log_probs: &Tensor, kl_init: &Tensor, kl_factor: f32, record_init: bool) -> Result<(Tensor, Tensor)> {
        require_f32("target_loss", &[log_probs, kl_init])?;
        expect("target_loss", log_probs, &[plan.n_loss, plan.vocab])?;
        expect("target_loss", kl_init, &[plan.n, plan.vocab])?;
        let d_logits = self.empty(log_probs.shape(), DType::F32)?;
        let row_loss = self.empty(&[plan.n_loss, 2], DType::F32)?;
        let (lp_buf, lp_off) = log_probs.single("target_loss")?;
        let (init_buf, init_off) = kl_init.single("target_loss")?;
        let (grad_buf, _) = d_logits.single("target_loss")?;
        let (loss_buf, _) = row_loss.single("target_loss")?;
        whole("target_loss", &[lp_off, init_off])?;
        let params = Params { kl_factor, record_init: record_init as u32, ..self.target_params(plan)? };
        self.dispatch(
            kernel("loss_rows"),
            bytemuck::bytes_of(&params),
            &[(1, &plan.plan.buffer), (4, lp_buf), (5, init_buf), (6, grad_buf), (7, loss_buf)],
            grid_1d(plan.n_loss),
        )?;
        Ok((d_logits, row_loss))
    }

    /// Step `step` (0-based) of every request still optimising: records its
    /// loss in `record` ([n + steps·n·4]: stop markers, then (nll, kl,
    /// weight decay, probability) per step and request), stops it when the
    /// loss is below the threshold or `last_step`, otherwise updates its δ
    /// and Adam moments in `state` [n, 3, d] from `d_hidden` [rows, d] (the
    /// loss gradient w.r.t. the residual stream; unused on the last step).
    #[allow(clippy::too_many_arguments)]
    pub fn target_step(
        &self,
        plan: &TargetPlan,
        hyper: &TargetHyper,
        step: usize,
        last_step: bool,
        state: &Tensor,
        record: &Tensor,
        row_loss: &Tensor,
        d_hidden: Option<&Tensor>,
        target_init: &Tensor,
    ) -> Result<()> {
        require_f32("target_step", &[state, record, row_loss, target_init])?;
        expect("target_step", state, &[plan.n, 3, plan.d])?;
        expect("target_step", row_loss, &[plan.n_loss, 2])?;
        expect("target_step", target_init, &[plan.n, plan.d])?;
        if record.numel() < plan.n + (step + 1) * plan.n * 4 {
            return Err(GpuError::shape("target_step", format!("record of {} values holds no step {step}", record.numel())));
        }
        if d_hidden.is_none() && !last_step {
            return Err(GpuError::shape("target_step", "only the last step may run without a gradient"));
        }
        let (beta1, beta2) = (0.9f32, 0.999f32);
        let t = step as i32 + 1;
        let params = Params {
            step: u32_of(step, "target_step")?,
            last_step: last_step as u32,
            kl_factor: hyper.kl_factor,
            threshold: hyper.loss_threshold,
            weight_decay: hyper.weight_decay,
            lr: hyper.lr,
            one_minus_beta1: 1.0 - beta1,
            one_minus_beta2: 1.0 - beta2,
            bias1: 1.0 - beta1.powi(t),
            bias2: 1.0 - beta2.powi(t),
            clamp: hyper.clamp,
            ..self.target_params(plan)?
        };
        // The last step reads no gradient; the row losses stand in for it.
        let grad = match d_hidden {
            Some(g) => {
                expect("target_step", g, &[plan.rows, plan.d])?;
                g
            }
            None => row_loss,
        };
        let parts = [state.single("target_step")?, record.single("target_step")?, row_loss.single("target_step")?, grad.single("target_step")?, target_init.single("target_step")?];
        whole("target_step", &parts.iter().map(|p| p.1).collect::<Vec<_>>())?;
        self.dispatch(
            kernel("step"),
            bytemuck::bytes_of(&params),
            &[(1, &plan.plan.buffer), (8, parts[0].0), (9, parts[1].0), (10, parts[3].0), (11, parts[4].0), (12, parts[2].0)],
            grid_1d(plan.n),
        )
    }
}

fn expect(op: &'static str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(GpuError::shape(op, format!("operand has shape {:?}, expected {shape:?}", t.shape())));
    }
    Ok(())
}

/// The kernels index whole tensors from element 0.
fn whole(op: &'static str, offsets: &[usize]) -> Result<()> {
    if offsets.iter().any(|&o| o != 0) {
        return Err(GpuError::shape(op, "operands must be whole tensors, not views"));
    }
    Ok(())
}
