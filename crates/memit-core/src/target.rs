//! Step 2 of MEMIT: the target vector z for one request — the residual
//! stream value at the last edited layer, at the subject's last token, that
//! makes the model predict the new object. δ is optimised with Adam on
//! NLL + KL + weight decay, with gradients from the WGSL backward pass
//! through every later block.

use memit_gpu::{DType, Tensor};
use memit_models::{Batch, Model, Padding, TextTokenizer};

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
    pub losses: Vec<StepLoss>,
}

/// Tokenised prompts of one request: rewriting prompts (one per context
/// template, the prompt followed by all but the last target token) then the
/// KL prompt "{subject} is a".
struct Prompts {
    batch: Batch,
    /// Activation row of the subject's last token, per prompt.
    lookup_rows: Vec<usize>,
    /// Per rewriting prompt: the rows whose logits predict each target token.
    target_rows: Vec<Vec<usize>>,
}

fn build_prompts(req: &PreparedRequest, templates: &[String], tokenizer: &TextTokenizer) -> Result<Prompts> {
    let subject = &req.request.subject;
    let target_prefix = tokenizer.decode(&req.target_ids[..req.target_ids.len() - 1])?;
    let mut sequences = Vec::new();
    let mut lookups = Vec::new();
    for template in templates {
        let with_prompt = template.replace("{}", &req.request.prompt);
        sequences.push(tokenizer.encode(&(with_prompt.replace("{}", subject) + &target_prefix))?);
        lookups.push(subject_last_index(&with_prompt, subject, tokenizer)?);
    }
    let kl_template = "{} is a";
    sequences.push(tokenizer.encode(&kl_template.replace("{}", subject))?);
    lookups.push(subject_last_index(kl_template, subject, tokenizer)?);
    let n_target = req.target_ids.len();
    for (i, (seq, &lookup)) in sequences.iter().zip(&lookups).enumerate() {
        if lookup >= seq.len() || (i < templates.len() && seq.len() < n_target) {
            return Err(MemitError::Request {
                index: 0,
                detail: format!("subject {subject:?} was not found where expected in prompt {:?}", tokenizer.decode(seq)?),
            });
        }
    }
    let batch = Batch::new(&sequences, Padding::Right, 0)?;
    let lookup_rows = lookups.iter().enumerate().map(|(b, &t)| batch.row(b, t)).collect();
    let target_rows = (0..templates.len())
        .map(|b| {
            let len = sequences[b].len();
            (len - n_target..len).map(|t| batch.row(b, t)).collect()
        })
        .collect();
    Ok(Prompts { batch, lookup_rows, target_rows })
}

/// Adam with PyTorch's defaults (β = 0.9, 0.999; ε = 1e-8).
struct Adam {
    lr: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    fn new(lr: f32, n: usize) -> Adam {
        Adam { lr, m: vec![0.0; n], v: vec![0.0; n], t: 0 }
    }

    fn step(&mut self, params: &mut [f32], grad: &[f32]) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        self.t += 1;
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for i in 0..params.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * grad[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * grad[i] * grad[i];
            params[i] -= self.lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + eps);
        }
    }
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Reads rows `rows` of a [n, width] tensor.
async fn read_rows(model: &Model, t: &Tensor, rows: &[usize]) -> Result<Vec<f32>> {
    let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Ok(model.ctx.read(&model.ctx.embedding(t, &ids)?).await?)
}

/// Optimises z for one request at layer `hp.last_layer()`.
pub async fn compute_target(model: &Model, tokenizer: &TextTokenizer, req: &PreparedRequest, templates: &[String], hp: &Hparams) -> Result<TargetVector> {
    let ctx = &model.ctx;
    let layer = hp.last_layer();
    let d = model.config.d_model;
    let vocab = model.config.vocab_size;
    let prompts = build_prompts(req, templates, tokenizer)?;
    let batch = &prompts.batch;
    let rows = batch.batch * batch.seq;
    let n_rewrite = templates.len();
    let kl_row = *prompts.lookup_rows.last().expect("KL prompt");
    // Above the model's last block only the unembedding is left: δ at the
    // subject can then change no prediction but the subject position's own.
    if layer + 1 == model.config.n_layers {
        if let Some(b) = (0..n_rewrite).find(|&b| !prompts.target_rows[b].contains(&prompts.lookup_rows[b])) {
            return Err(MemitError::Request {
                index: 0,
                detail: format!(
                    "the last edited layer {layer} is the model's last block, so nothing can carry the edit from the subject to the prediction of {:?} in {:?}; edit lower layers (hparams `layers`) or end the prompt with the subject",
                    req.target_text,
                    templates[b].replace("{}", &req.request.prompt)
                ),
            });
        }
    }

    let hidden = model.forward(batch, &[layer], false)?.hidden[layer].clone().expect("captured");
    let base = ctx.read(&hidden).await?;
    let target_init = base[prompts.lookup_rows[0] * d..][..d].to_vec();
    let init_norm_sq = target_init.iter().map(|x| x * x).sum::<f32>().max(1e-12);
    let max_norm = hp.clamp_norm_factor * init_norm_sq.sqrt();

    // Rows whose log-probabilities the loss reads: target rows, then the KL row.
    let mut loss_rows: Vec<usize> = prompts.target_rows.iter().flatten().copied().collect();
    loss_rows.push(kl_row);
    let n_target = req.target_ids.len();

    let mut delta = vec![0.0f32; d];
    let mut adam = Adam::new(hp.v_lr, d);
    let mut kl_init: Option<Vec<f32>> = None;
    let mut losses = Vec::new();
    for step in 0..hp.v_num_grad_steps.max(1) {
        let mut shifted = base.clone();
        for &r in &prompts.lookup_rows {
            for (x, dx) in shifted[r * d..][..d].iter_mut().zip(&delta) {
                *x += dx;
            }
        }
        let h = ctx.upload(&[rows, d], &shifted, DType::F32)?;
        let (logits, trace) = model.forward_traced(layer + 1, &h, batch)?;
        let log_probs = ctx.softmax(&logits, true, None)?;
        let lp = read_rows(model, &log_probs, &loss_rows).await?;

        // NLL of the new target, averaged over its tokens and the prompts.
        let mut nll = 0.0f32;
        let mut prob = 0.0f32;
        for (i, &token) in req.target_ids.iter().cycle().take(n_rewrite * n_target).enumerate() {
            let value = lp[i * vocab + token as usize];
            nll -= value / (n_target * n_rewrite) as f32;
            prob += value.exp() / (n_target * n_rewrite) as f32;
        }
        let kl_lp = &lp[n_rewrite * n_target * vocab..];
        let init = kl_init.get_or_insert_with(|| kl_lp.to_vec());
        let kl = hp.kl_factor * init.iter().zip(kl_lp).map(|(&a, &b)| a.exp() * (a - b)).sum::<f32>();
        let wd = hp.v_weight_decay * norm(&delta) / init_norm_sq;
        let loss = StepLoss { nll, kl, weight_decay: wd, target_prob: prob };
        losses.push(loss);
        if loss.total() < hp.v_loss_threshold || step + 1 == hp.v_num_grad_steps {
            break;
        }

        // dL/dlogits: softmax − one-hot for the NLL rows, p − p_init for KL.
        let mut d_logits = vec![0.0f32; rows * vocab];
        for (i, &row) in loss_rows.iter().enumerate() {
            let src = &lp[i * vocab..][..vocab];
            let dst = &mut d_logits[row * vocab..][..vocab];
            if i < n_rewrite * n_target {
                let scale = 1.0 / (n_target * n_rewrite) as f32;
                for (g, &l) in dst.iter_mut().zip(src) {
                    *g += scale * l.exp();
                }
                dst[req.target_ids[i % n_target] as usize] -= scale;
            } else {
                for ((g, &l), &l0) in dst.iter_mut().zip(src).zip(init.iter()) {
                    *g += hp.kl_factor * (l.exp() - l0.exp());
                }
            }
        }
        let d_logits = ctx.upload(&[rows, vocab], &d_logits, DType::F32)?;
        let d_hidden = model.backward(&trace, &d_logits, batch)?;
        let g_rows = read_rows(model, &d_hidden, &prompts.lookup_rows).await?;
        let mut grad = vec![0.0f32; d];
        for row in g_rows.chunks(d) {
            for (g, x) in grad.iter_mut().zip(row) {
                *g += x;
            }
        }
        let n = norm(&delta);
        if n > 0.0 {
            for (g, x) in grad.iter_mut().zip(&delta) {
                *g += hp.v_weight_decay * x / (n * init_norm_sq);
            }
        }
        adam.step(&mut delta, &grad);
        let n = norm(&delta);
        if n > max_norm {
            for x in delta.iter_mut() {
                *x *= max_norm / n;
            }
        }
    }
    let z = target_init.iter().zip(&delta).map(|(a, b)| a + b).collect();
    Ok(TargetVector { z, target_init, losses })
}
