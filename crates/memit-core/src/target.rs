//! Step 2 of MEMIT: the target vector z of each request — the residual
//! stream value at the last edited layer, at the subject's last token, that
//! makes the model predict the new object. Every request keeps its own δ,
//! Adam moments, norm clamp, KL reference and stopping point, but all
//! requests of a batch share one forward and one backward pass per step,
//! and the whole optimisation stays on the GPU: the host only checks every
//! few steps whether every request has stopped.

use memit_gpu::{CostCounters, DType, Indices, LossRow, TargetHyper, TargetPlan, Tensor};
use memit_models::{Batch, Model, Padding, SuffixPass, TextTokenizer};

use crate::error::{MemitError, Result};
use crate::hparams::Hparams;
use crate::request::{subject_last_index, PreparedRequest};

/// The loss terms of one optimisation step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLoss {
    pub nll: f32,
    pub kl: f32,
    pub weight_decay: f32,
    /// Mean probability of the new target tokens across rewriting prompts.
    pub target_prob: f32,
}

impl StepLoss {
    pub fn total(&self) -> f32 {
        self.nll + self.kl + self.weight_decay
    }
}

#[derive(Debug, Clone)]
pub struct TargetVector {
    /// z = target_init + δ.
    pub z: Vec<f32>,
    /// The block output at the subject's last token before editing.
    pub target_init: Vec<f32>,
    /// The loss at every step this request ran (the last one took no step).
    pub losses: Vec<StepLoss>,
}

/// What the optimisation cost, beyond its wall time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetCost {
    /// Optimisation steps run (each one forward and backward pass over a
    /// batch of requests).
    pub steps: u64,
    /// Requests carried by those steps, summed over steps: the work done,
    /// stopped requests that still ride in a batch included.
    pub request_steps: u64,
    /// Times a batch continued without its stopped requests.
    pub regroups: u64,
    /// The GPU's cost counters over the steps after each batch's (and each
    /// regrouped batch's) first: what a steady-state step costs.
    pub after_first_step: CostCounters,
}

/// How target vectors are batched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetOptions {
    /// Estimated GPU bytes one batch of requests may use for activations,
    /// logits and their gradients.
    pub batch_bytes: u64,
    /// Most requests per batch (1 gives the one-at-a-time optimisation).
    pub max_requests: usize,
    /// Steps between the host's checks whether every request has stopped.
    pub check_every: usize,
    /// Run each step over the prompts' rows from the subject on only, with
    /// the keys and values of the rows before computed once (they do not
    /// depend on δ). Off: every step runs every row.
    pub prefix_cache: bool,
    /// Drop stopped requests from a batch (at a check that finds a quarter
    /// or more of them stopped) instead of carrying them to the end.
    pub regroup: bool,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions { batch_bytes: 1 << 30, max_requests: usize::MAX, check_every: 5, prefix_cache: true, regroup: true }
    }
}

/// One request's prompts: rewriting prompts (one per context template, the
/// prompt followed by all but the last target token) then the KL prompt
/// "{subject} is a", with the token index of the subject's last token in
/// each.
struct RequestPrompts {
    sequences: Vec<Vec<u32>>,
    lookups: Vec<usize>,
    /// Rows whose logits the loss reads.
    loss_rows: usize,
}

fn request_prompts(index: usize, req: &PreparedRequest, templates: &[String], tokenizer: &TextTokenizer) -> Result<RequestPrompts> {
    let subject = &req.request.subject;
    let target_ids = &req.target_ids[..req.target_ids.len() - 1];
    let target_prefix = tokenizer.decode(target_ids)?;
    let mut sequences = Vec::new();
    let mut lookups = Vec::new();
    for template in templates {
        let with_prompt = template.replace("{}", &req.request.prompt);
        let filled = with_prompt.replace("{}", subject);
        // As MEMIT: the prompt with the decoded target prefix, re-encoded.
        // A prefix that ends inside a character (an emoji's first byte
        // tokens) decodes to U+FFFD and re-encodes differently; then the
        // target's own tokens follow the prompt's, so the loss reads them.
        let mut sequence = tokenizer.encode(&(filled.clone() + &target_prefix))?;
        if !sequence.ends_with(target_ids) {
            sequence = tokenizer.encode(&filled)?;
            sequence.extend_from_slice(target_ids);
        }
        sequences.push(sequence);
        lookups.push(subject_last_index(&with_prompt, subject, tokenizer)?);
    }
    let kl_template = "{} is a";
    sequences.push(tokenizer.encode(&kl_template.replace("{}", subject))?);
    lookups.push(subject_last_index(kl_template, subject, tokenizer)?);
    let n_target = req.target_ids.len();
    for (i, (seq, &lookup)) in sequences.iter().zip(&lookups).enumerate() {
        if lookup >= seq.len() || (i < templates.len() && seq.len() < n_target) {
            return Err(MemitError::Request {
                index,
                detail: format!("subject {subject:?} was not found where expected in prompt {:?}", tokenizer.decode(seq)?),
            });
        }
    }
    Ok(RequestPrompts { sequences, lookups, loss_rows: templates.len() * n_target + 1 })
}

/// Rough GPU bytes of the target-vector step at `layer`: per row a step
/// runs, the trace of every block above it plus its gradients; per row of
/// the batch, its residual stream and (with the prefix cache) each block's
/// cached keys and values; per loss row, the logits, log-probabilities and
/// their gradient.
struct RowCosts {
    step_row: u64,
    batch_row: u64,
    loss_row: u64,
}

fn row_costs(model: &Model, layer: usize, prefix_cache: bool) -> RowCosts {
    let c = &model.config;
    let above = (c.n_layers - layer - 1) as u64;
    let width = (12 * c.d_model + 4 * c.d_ff) as u64;
    let kv = ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim) as u64;
    RowCosts {
        step_row: 4 * (above * width + 4 * c.d_model as u64),
        batch_row: 4 * (c.d_model as u64 + if prefix_cache { above * kv } else { 0 }),
        loss_row: 4 * 4 * c.vocab_size as u64,
    }
}

/// Splits requests into batches within `options`' memory budget and the
/// single-binding limit of the tensors the step binds whole.
fn plan_batches(model: &Model, prompts: &[RequestPrompts], layer: usize, options: &TargetOptions) -> Vec<std::ops::Range<usize>> {
    let c = &model.config;
    let costs = row_costs(model, layer, options.prefix_cache);
    let binding = model.ctx.chunk_bytes();
    let widest_row = (4 * c.d_model.max(c.d_ff).max((c.n_heads + 2 * c.n_kv_heads) * c.head_dim)) as u64;
    let mut batches = Vec::new();
    let mut start = 0;
    while start < prompts.len() {
        let (mut seqs, mut seq_len, mut suffix_len, mut loss_rows, mut end) = (0usize, 0usize, 0usize, 0usize, start);
        while end < prompts.len() && end - start < options.max_requests {
            let p = &prompts[end];
            let n_seqs = seqs + p.sequences.len();
            let longest = seq_len.max(p.sequences.iter().map(Vec::len).max().unwrap_or(0));
            let longest_suffix = suffix_len.max(p.sequences.iter().zip(&p.lookups).map(|(s, &l)| s.len() - l).max().unwrap_or(0));
            let rows = (n_seqs * longest) as u64;
            let step_rows = if options.prefix_cache { (n_seqs * longest_suffix) as u64 } else { rows };
            let n_loss = loss_rows + p.loss_rows;
            let scores = (n_seqs * c.n_heads * longest * longest * 4) as u64;
            let fits = rows * costs.batch_row + step_rows * costs.step_row + n_loss as u64 * costs.loss_row <= options.batch_bytes
                && rows * widest_row <= binding
                && n_loss as u64 * c.vocab_size as u64 * 4 <= binding
                && scores <= binding;
            if !fits && end > start {
                break;
            }
            (seqs, seq_len, suffix_len, loss_rows, end) = (n_seqs, longest, longest_suffix, n_loss, end + 1);
        }
        batches.push(start..end);
        start = end;
    }
    batches
}

/// Optimises z at layer `hp.last_layer()` for every request. `progress`
/// gets (steps done, steps at most) over all batches, so a single request's
/// optimisation moves too; a batch that stops early counts all its steps.
pub async fn compute_target_vectors(
    model: &Model,
    tokenizer: &TextTokenizer,
    requests: &[PreparedRequest],
    templates: &[String],
    hp: &Hparams,
    options: &TargetOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<TargetVector>, TargetCost)> {
    let layer = hp.last_layer();
    let prompts = requests.iter().enumerate().map(|(i, r)| request_prompts(i, r, templates, tokenizer)).collect::<Result<Vec<_>>>()?;
    // Above the model's last block only the unembedding is left: δ at the
    // subject can then change no prediction but the subject position's own.
    if layer + 1 == model.config.n_layers {
        for (index, (req, p)) in requests.iter().zip(&prompts).enumerate() {
            let n_target = req.target_ids.len();
            if let Some(b) = (0..templates.len()).find(|&b| p.lookups[b] + n_target < p.sequences[b].len()) {
                return Err(MemitError::Request {
                    index,
                    detail: format!(
                        "the last edited layer {layer} is the model's last block, so nothing can carry the edit from the subject to the prediction of {:?} in {:?}; edit lower layers (hparams `layers`) or end the prompt with the subject",
                        req.target_text,
                        templates[b].replace("{}", &req.request.prompt)
                    ),
                });
            }
        }
    }
    let mut targets = Vec::with_capacity(requests.len());
    let mut cost = TargetCost::default();
    let batches = plan_batches(model, &prompts, layer, options);
    let steps_per_batch = hp.v_num_grad_steps.max(1);
    let total = batches.len() * steps_per_batch;
    progress(0, total);
    for (i, range) in batches.into_iter().enumerate() {
        let before = i * steps_per_batch;
        let (batch_targets, batch_cost) = optimise_batch(model, &requests[range.clone()], &prompts[range.clone()], hp, options, &mut |steps| progress(before + steps, total)).await?;
        targets.extend(batch_targets);
        cost.steps += batch_cost.steps;
        cost.request_steps += batch_cost.request_steps;
        cost.regroups += batch_cost.regroups;
        cost.after_first_step.add(&batch_cost.after_first_step);
        progress(before + steps_per_batch, total);
    }
    Ok((targets, cost))
}

/// One batch: one padded batch of every request's prompts, one forward and
/// backward pass per step for all of them. When a check finds that a
/// quarter or more of the requests still in the batch have stopped (and
/// `options.regroup`), the rest continue as a smaller batch: their δ, Adam
/// moments, KL references and initial outputs move over on the GPU, and
/// only the stopped requests' results are read back.
async fn optimise_batch(
    model: &Model,
    requests: &[PreparedRequest],
    prompts: &[RequestPrompts],
    hp: &Hparams,
    options: &TargetOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<(Vec<TargetVector>, TargetCost)> {
    let ctx = &model.ctx;
    let (d, vocab) = (model.config.d_model, model.config.vocab_size);
    let n = requests.len();
    let max_steps = hp.v_num_grad_steps.max(1);
    let hyper = TargetHyper {
        kl_factor: hp.kl_factor,
        loss_threshold: hp.v_loss_threshold,
        weight_decay: hp.v_weight_decay,
        lr: hp.v_lr,
        clamp: hp.clamp_norm_factor,
    };
    let mut results: Vec<Option<TargetVector>> = vec![None; n];
    let mut losses: Vec<Vec<StepLoss>> = vec![Vec::new(); n];
    // Requests still optimising (indices into the batch), and what they
    // carry from the batch they leave: state [m, 3, d], KL references
    // [m, vocab] and initial outputs [m, d].
    let mut live: Vec<usize> = (0..n).collect();
    let mut carried: Option<(Tensor, Tensor, Tensor)> = None;
    let mut cost = TargetCost::default();
    let mut step = 0;
    while !live.is_empty() {
        let m = live.len();
        let group_requests: Vec<&PreparedRequest> = live.iter().map(|&i| &requests[i]).collect();
        let group_prompts: Vec<&RequestPrompts> = live.iter().map(|&i| &prompts[i]).collect();
        let setup = set_up_group(model, &group_requests, &group_prompts, hp.last_layer(), options, carried.is_none())?;
        let (state, kl_init, target_init) = match carried.take() {
            Some(moved) => moved,
            None => (ctx.zeros(&[m, 3, d], DType::F32)?, ctx.empty(&[m, vocab], DType::F32)?, setup.target_init.clone().expect("gathered for a batch's first group")),
        };
        let record = ctx.zeros(&[m + max_steps * m * 4], DType::F32)?;
        let first_step = step;
        let mut after_first = None;
        // At a regroup, the stop markers the check read.
        let mut regroup_markers = None;
        while step < max_steps {
            let last = step + 1 == max_steps;
            let hidden = ctx.target_add_delta(&setup.plan, &setup.base, &state)?;
            let (logits, trace) = match &setup.suffix {
                Some(pass) => model.forward_traced_suffix(pass, &hidden, Some(&setup.logit_rows))?,
                None => model.forward_traced(hp.last_layer() + 1, &hidden, &setup.batch, Some(&setup.logit_rows))?,
            };
            let log_probs = ctx.softmax(&logits, true, None)?;
            let (d_logits, row_loss) = ctx.target_loss(&setup.plan, &log_probs, &kl_init, hp.kl_factor, step == 0)?;
            let d_hidden = if last { None } else { Some(model.backward(&trace, &d_logits, &setup.batch)?) };
            ctx.target_step(&setup.plan, &hyper, step, last, &state, &record, &row_loss, d_hidden.as_ref(), &target_init)?;
            step += 1;
            cost.steps += 1;
            cost.request_steps += m as u64;
            if !last && (step - 1) % options.check_every.max(1) == 0 {
                let markers = read_stops(model, &record, m).await?;
                let stopped = markers.iter().filter(|&&s| s > 0.0).count();
                progress(step);
                if stopped == m {
                    break;
                }
                if options.regroup && 4 * stopped >= m {
                    regroup_markers = Some(markers);
                    break;
                }
            }
            after_first.get_or_insert_with(|| ctx.counters());
        }
        // The steady-state cost: this group's steps after its first
        // (not the reads and copies that end it).
        if let Some(before) = after_first {
            cost.after_first_step.add(&ctx.counters().since(&before));
        }
        // Every request has stopped unless the batch regroups.
        let stopped: Vec<usize> = match &regroup_markers {
            Some(markers) => (0..m).filter(|&j| markers[j] > 0.0).collect(),
            None => (0..m).collect(),
        };
        let continuing: Vec<usize> = (0..m).filter(|j| stopped.binary_search(j).is_err()).collect();
        // The stopped requests' δ (the first d of each [3, d] state block)
        // and initial outputs, read back; the others' state moves to the
        // next group on the GPU.
        let state_rows = state.reshape(&[m, 3 * d])?;
        let (deltas, inits) = if continuing.is_empty() {
            (state_rows, target_init)
        } else {
            let keep = ctx.indices(&continuing.iter().map(|&j| j as u32).collect::<Vec<_>>())?;
            carried = Some((
                ctx.gather_rows(&state_rows, &keep)?.reshape(&[continuing.len(), 3, d])?,
                ctx.gather_rows(&kl_init, &keep)?,
                ctx.gather_rows(&target_init, &keep)?,
            ));
            let done = ctx.indices(&stopped.iter().map(|&j| j as u32).collect::<Vec<_>>())?;
            (ctx.gather_rows(&state_rows, &done)?, ctx.gather_rows(&target_init, &done)?)
        };
        let mut read = ctx.read_all(&[&record, &deltas, &inits]).await?;
        let (inits, deltas, record) = (read.pop().expect("three"), read.pop().expect("three"), read.pop().expect("three"));
        // Stop markers (the number of steps a request ran, 0 while it
        // optimises), then the losses of step s at m + (s·m + j)·4.
        for (j, &i) in live.iter().enumerate() {
            let ran = if record[j] > 0.0 { record[j] as usize } else { step };
            losses[i].extend((first_step..ran).map(|s| {
                let at = m + (s * m + j) * 4;
                StepLoss { nll: record[at], kl: record[at + 1], weight_decay: record[at + 2], target_prob: record[at + 3] }
            }));
        }
        for (k, &j) in stopped.iter().enumerate() {
            let i = live[j];
            let target_init = inits[k * d..][..d].to_vec();
            let z = target_init.iter().zip(&deltas[k * 3 * d..][..d]).map(|(a, b)| a + b).collect();
            results[i] = Some(TargetVector { z, target_init, losses: std::mem::take(&mut losses[i]) });
        }
        cost.regroups += regroup_markers.is_some() as u64;
        live = continuing.iter().map(|&j| live[j]).collect();
    }
    Ok((results.into_iter().map(|r| r.expect("every request stopped")).collect(), cost))
}

/// A group of requests on the GPU: their prompts' batch, the residual
/// stream entering the blocks above the edited layer (in the suffix layout
/// with the prefix cache), and the loss tables.
struct Group {
    batch: Batch,
    suffix: Option<SuffixPass>,
    base: Tensor,
    plan: TargetPlan,
    logit_rows: Indices,
    /// [requests, d]: the block output at each request's first prompt's
    /// subject row, before editing (gathered only for a batch's first
    /// group: a regrouped one carries its requests' own).
    target_init: Option<Tensor>,
}

fn set_up_group(model: &Model, requests: &[&PreparedRequest], prompts: &[&RequestPrompts], layer: usize, options: &TargetOptions, initial_outputs: bool) -> Result<Group> {
    let ctx = &model.ctx;
    let (d, vocab) = (model.config.d_model, model.config.vocab_size);
    let sequences: Vec<Vec<u32>> = prompts.iter().flat_map(|p| p.sequences.iter().cloned()).collect();
    let batch = Batch::new(&sequences, Padding::Right, 0)?;
    let base = model.forward(&batch, &[layer], false)?.hidden[layer].clone().expect("captured");
    // Rows δ can change: each prompt's from its subject's last token on,
    // which is where every row the loss reads lies.
    let starts: Vec<usize> = prompts.iter().flat_map(|p| p.lookups.iter().copied()).collect();
    let reads_before_start = requests.iter().zip(prompts).any(|(req, p)| p.sequences[..p.sequences.len() - 1].iter().zip(&p.lookups).any(|(seq, &l)| seq.len() - req.target_ids.len() < l));
    let suffix = if options.prefix_cache && !reads_before_start { Some(model.suffix_pass(layer + 1, &base, &batch, &starts)?) } else { None };
    let row_of = |b: usize, t: usize| match &suffix {
        Some(pass) => pass.row(b, t, starts[b]),
        None => batch.row(b, t),
    };

    // Loss rows: each rewriting prompt's rows that predict the target
    // tokens, then the KL prompt's subject row; subject rows per request.
    let mut loss = Vec::new();
    let mut logit_rows = Vec::new();
    let mut lookups = Vec::with_capacity(requests.len());
    let mut first_lookup = Vec::with_capacity(requests.len());
    let mut b = 0;
    for (j, (req, p)) in requests.iter().zip(prompts).enumerate() {
        let n_target = req.target_ids.len();
        let n_rewrite = p.sequences.len() - 1;
        let weight = 1.0 / (n_target * n_rewrite) as f32;
        let mut rows_of_j = Vec::new();
        for (k, (seq, &lookup)) in p.sequences.iter().zip(&p.lookups).enumerate() {
            rows_of_j.push(row_of(b + k, lookup) as u32);
            if k < n_rewrite {
                for (t, &token) in req.target_ids.iter().enumerate() {
                    logit_rows.push(row_of(b + k, seq.len() - n_target + t) as u32);
                    loss.push(LossRow { request: j as u32, token: Some(token), weight });
                }
            } else {
                logit_rows.push(row_of(b + k, lookup) as u32);
                loss.push(LossRow { request: j as u32, token: None, weight: 0.0 });
            }
        }
        first_lookup.push(batch.row(b, p.lookups[0]) as u32);
        lookups.push(rows_of_j);
        b += p.sequences.len();
    }
    let target_init = if initial_outputs { Some(ctx.gather_rows(&base, &ctx.indices(&first_lookup)?)?) } else { None };
    let (base, rows) = match &suffix {
        Some(pass) => (pass.gather(ctx, &base)?, pass.rows()),
        None => (base, batch.batch * batch.seq),
    };
    let plan = ctx.target_plan(d, vocab, rows, &loss, &lookups)?;
    let logit_rows = ctx.indices(&logit_rows)?;
    Ok(Group { batch, suffix, base, plan, logit_rows, target_init })
}

/// The stop markers of the first `n` requests (0 while optimising).
async fn read_stops(model: &Model, record: &Tensor, n: usize) -> Result<Vec<f32>> {
    Ok(model.ctx.read(&record.slice_rows(0..n)?).await?)
}
