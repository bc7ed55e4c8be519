//! Gradients w.r.t. activations (never weights) through the blocks above a
//! layer, the final norm and the unembedding: what MEMIT's target-vector
//! optimisation needs to move the residual stream at one layer.

use memit_gpu::{BinaryOp, Indices, Tensor};

use crate::config::Residual;
use crate::error::Result;
use crate::forward::{Batch, BlockTrace, Rows, SuffixPass};
use crate::model::{Linear, Model, Norm, WeightLayout};

/// Activations recorded by [`Model::forward_traced`].
pub struct Trace {
    first_layer: usize,
    blocks: Vec<BlockTrace>,
    /// Input of the final norm (of the logit rows only, when chosen).
    last_hidden: Tensor,
    /// The rows logits were computed for, and the row count they came from.
    logit_rows: Option<(Indices, usize)>,
    /// Set when the blocks ran over a suffix of the batch.
    suffix: Option<SuffixPass>,
}

impl Trace {
    fn rows<'a>(&'a self, batch: &'a Batch) -> Rows<'a> {
        match &self.suffix {
            Some(pass) => Rows::Suffix(pass),
            None => Rows::Full(batch),
        }
    }
}

impl Linear {
    /// dL/dx of y = x·Wᵀ + b (or x·W for Conv1D storage).
    pub fn backward(&self, ctx: &memit_gpu::GpuContext, dy: &Tensor) -> Result<Tensor> {
        Ok(ctx.matmul(dy, &self.weight, false, self.layout == WeightLayout::InOut)?)
    }
}

impl Norm {
    pub fn backward(&self, ctx: &memit_gpu::GpuContext, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(_) => ctx.layer_norm_backward(x, &self.weight, dy, self.eps)?,
            None => ctx.rms_norm_backward(x, &self.weight, dy, self.eps)?,
        })
    }
}

impl Model {
    /// Runs blocks `first_layer..` on `hidden` (the residual stream entering
    /// block `first_layer`) and returns the logits and the trace for
    /// [`Model::backward`]. With `logit_rows`, logits are computed for those
    /// rows only ([ids, vocab]): the unembedding of rows nobody reads is
    /// often most of the work.
    pub fn forward_traced(&self, first_layer: usize, hidden: &Tensor, batch: &Batch, logit_rows: Option<&Indices>) -> Result<(Tensor, Trace)> {
        self.trace_blocks(first_layer, hidden, Rows::Full(batch), logit_rows, None)
    }

    /// As `forward_traced` over the suffix rows of `pass` only: `hidden` is
    /// [pass.rows(), d], `logit_rows` index suffix rows, and the gradient
    /// `backward` returns is w.r.t. the suffix rows of the residual stream.
    pub fn forward_traced_suffix(&self, pass: &SuffixPass, hidden: &Tensor, logit_rows: Option<&Indices>) -> Result<(Tensor, Trace)> {
        self.trace_blocks(pass.first_layer(), hidden, Rows::Suffix(pass), logit_rows, Some(pass.clone()))
    }

    fn trace_blocks(&self, first_layer: usize, hidden: &Tensor, rows: Rows<'_>, logit_rows: Option<&Indices>, suffix: Option<SuffixPass>) -> Result<(Tensor, Trace)> {
        let mut x = hidden.clone();
        let mut blocks = Vec::new();
        for layer in first_layer..self.config.n_layers {
            let trace = self.block_trace(layer, &x, rows)?;
            x = trace.out.clone();
            blocks.push(trace);
        }
        if let Some(ids) = logit_rows {
            x = self.ctx.gather_rows(&x, ids)?;
        }
        let logits = self.logits(&x)?;
        let logit_rows = logit_rows.map(|ids| (ids.clone(), hidden.rows()));
        Ok((logits, Trace { first_layer, blocks, last_hidden: x, logit_rows, suffix }))
    }

    /// dL/d(hidden) for the `hidden` given to `forward_traced`, from dL/dlogits.
    pub fn backward(&self, trace: &Trace, d_logits: &Tensor, batch: &Batch) -> Result<Tensor> {
        let ctx = &self.ctx;
        let head = self.head()?;
        let d_normed = head.unembed.backward(ctx, d_logits)?;
        let mut d = head.norm.backward(ctx, &trace.last_hidden, &d_normed)?;
        if let Some((ids, rows)) = &trace.logit_rows {
            d = ctx.scatter_rows(&d, ids, *rows)?;
        }
        let rows = trace.rows(batch);
        for (i, block_trace) in trace.blocks.iter().enumerate().rev() {
            d = self.block_backward(trace.first_layer + i, block_trace, &d, rows)?;
        }
        Ok(d)
    }

    fn block_backward(&self, layer: usize, t: &BlockTrace, d_out: &Tensor, rows: Rows<'_>) -> Result<Tensor> {
        let ctx = &self.ctx;
        let block = self.block_at(layer)?;
        let add = |p: &Tensor, q: &Tensor| -> Result<Tensor> { Ok(ctx.binary(BinaryOp::Add, p, q)?) };
        match self.config.residual {
            Residual::Sequential => {
                let ln2 = block.ln2.as_ref().expect("sequential blocks have ln2");
                let x1 = t.x1.as_ref().expect("sequential trace keeps x1");
                let d_x1 = add(d_out, &ln2.backward(ctx, x1, &self.mlp_backward(layer, t, d_out)?)?)?;
                let d_a = self.attention_backward(layer, t, &d_x1, rows)?;
                add(&d_x1, &block.ln1.backward(ctx, &t.x, &d_a)?)
            }
            Residual::ParallelSharedNorm => {
                let d_a = add(&self.attention_backward(layer, t, d_out, rows)?, &self.mlp_backward(layer, t, d_out)?)?;
                add(d_out, &block.ln1.backward(ctx, &t.x, &d_a)?)
            }
            Residual::Parallel => {
                let ln2 = block.ln2.as_ref().expect("parallel blocks have ln2");
                let d_a = self.attention_backward(layer, t, d_out, rows)?;
                let d_m = self.mlp_backward(layer, t, d_out)?;
                add(&add(d_out, &block.ln1.backward(ctx, &t.x, &d_a)?)?, &ln2.backward(ctx, &t.x, &d_m)?)
            }
        }
    }

    /// Gradient w.r.t. the MLP input given the gradient of its output.
    fn mlp_backward(&self, layer: usize, t: &BlockTrace, d_h: &Tensor) -> Result<Tensor> {
        let ctx = &self.ctx;
        let block = self.block_at(layer)?;
        let d_key = block.mlp_out.backward(ctx, d_h)?;
        let d_up = if block.mlp_gated {
            ctx.gated_activation_backward(&t.up, &d_key, self.config.activation)?
        } else {
            ctx.activation_backward(&t.up, &d_key, self.config.activation)?
        };
        block.mlp_in.backward(ctx, &d_up)
    }

    /// Gradient w.r.t. the attention input `a` given the gradient of the
    /// attention output (after its projection).
    fn attention_backward(&self, layer: usize, t: &BlockTrace, d_proj: &Tensor, rows: Rows<'_>) -> Result<Tensor> {
        let ctx = &self.ctx;
        let c = &self.config;
        let block = self.block_at(layer)?;
        let d_mixed = block.attn_out.backward(ctx, d_proj)?;
        let (q, k, v) = (&t.attn.q, &t.attn.k, &t.attn.v);
        // Gradients have the queries' rows (a suffix pass's keys before the
        // suffix are constants) and q, k, v's row layouts.
        // One gradient tensor laid out like q | k | v.
        let d_qkv = ctx.zeros(&[q.0.rows(), q.0.row_len()], memit_gpu::DType::F32)?;
        ctx.attention_backward((&q.0, q.1), (&k.0, k.1), (&v.0, v.1), &d_mixed, (&d_qkv, &d_qkv, &d_qkv), c.head_dim, rows.attention(ctx)?, self.attention_scale())?;
        self.rotate_qk(&d_qkv, q.1, k.1, rows, true)?;
        block.qkv.backward(ctx, &d_qkv)
    }
}
