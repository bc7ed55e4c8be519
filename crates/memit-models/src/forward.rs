//! The forward pass: padded batches in, logits and chosen hidden states out.
//! Each block is also callable on its own so MEMIT can read keys and add
//! vectors to the residual stream between blocks.

use std::sync::{Arc, OnceLock};

use memit_gpu::{AttentionRows, BinaryOp, GpuContext, HeadLayout, Indices, Tensor};

use crate::config::Residual;
use crate::error::{ModelError, Result};
use crate::model::{Block, Model};

/// Which side of a shorter sequence padding goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Right,
    Left,
}

/// Token sequences padded to a common length. Row `b·seq + t` of every
/// activation tensor is token `t` of sequence `b`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
    /// Per sequence: index of the first real token and one past the last.
    pub bounds: Vec<(u32, u32)>,
    /// Position of each row (0 at a sequence's first real token).
    pub positions: Vec<u32>,
    /// The ids, positions and bounds on the GPU, uploaded on first use and
    /// shared by every kernel of every pass over this batch.
    device: Arc<OnceLock<BatchIndices>>,
}

/// A batch's index arrays on the GPU.
#[derive(Debug)]
pub struct BatchIndices {
    pub ids: Indices,
    pub positions: Indices,
    /// (start, end, 0, 0) per sequence, flattened: attention's key bounds
    /// with queries from position 0.
    pub bounds: Indices,
}

impl PartialEq for Batch {
    fn eq(&self, other: &Batch) -> bool {
        (&self.ids, self.batch, self.seq, &self.bounds, &self.positions) == (&other.ids, other.batch, other.seq, &other.bounds, &other.positions)
    }
}

impl Batch {
    pub fn new(sequences: &[Vec<u32>], padding: Padding, pad_id: u32) -> Result<Batch> {
        if sequences.is_empty() || sequences.iter().any(|s| s.is_empty()) {
            return Err(ModelError::Input("a batch needs at least one non-empty sequence".into()));
        }
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * seq);
        let mut bounds = Vec::with_capacity(sequences.len());
        let mut positions = Vec::with_capacity(sequences.len() * seq);
        for s in sequences {
            let pad = seq - s.len();
            let start = if padding == Padding::Left { pad } else { 0 };
            bounds.push((start as u32, (start + s.len()) as u32));
            for t in 0..seq {
                let real = t >= start && t < start + s.len();
                ids.push(if real { s[t - start] } else { pad_id });
                positions.push(if real { (t - start) as u32 } else { 0 });
            }
        }
        Ok(Batch { ids, batch: sequences.len(), seq, bounds, positions, device: Arc::default() })
    }

    /// The batch's index arrays on `ctx`'s device, uploaded once.
    pub fn indices(&self, ctx: &GpuContext) -> Result<&BatchIndices> {
        if let Some(uploaded) = self.device.get() {
            return Ok(uploaded);
        }
        let flat_bounds: Vec<u32> = self.bounds.iter().flat_map(|&(s, e)| [s, e, 0, 0]).collect();
        let uploaded = BatchIndices { ids: ctx.indices(&self.ids)?, positions: ctx.indices(&self.positions)?, bounds: ctx.indices(&flat_bounds)? };
        Ok(self.device.get_or_init(|| uploaded))
    }

    /// Activation row of token `t` (counting real tokens from 0) of sequence `b`.
    pub fn row(&self, b: usize, t: usize) -> usize {
        b * self.seq + self.bounds[b].0 as usize + t
    }

    /// Activation row of the last real token of sequence `b`.
    pub fn last_row(&self, b: usize) -> usize {
        b * self.seq + self.bounds[b].1 as usize - 1
    }

    /// Rows of all real (non-padding) tokens, in order.
    pub fn real_rows(&self) -> Vec<u32> {
        (0..self.batch)
            .flat_map(|b| (self.bounds[b].0..self.bounds[b].1).map(move |t| (b * self.seq) as u32 + t))
            .collect()
    }
}

/// The rows a block pass computes.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    /// Every row of a batch.
    Full(&'a Batch),
    /// Each sequence's rows from its first changed one on, against cached
    /// keys and values of the rows before.
    Suffix(&'a SuffixPass),
}

impl Rows<'_> {
    pub(crate) fn positions(&self, ctx: &GpuContext) -> Result<&Indices> {
        Ok(match self {
            Rows::Full(batch) => &batch.indices(ctx)?.positions,
            Rows::Suffix(pass) => &pass.positions,
        })
    }

    pub(crate) fn attention(&self, ctx: &GpuContext) -> Result<AttentionRows<'_>> {
        Ok(match self {
            Rows::Full(batch) => AttentionRows { q_seq: batch.seq, kv_seq: batch.seq, bounds: &batch.indices(ctx)?.bounds },
            Rows::Suffix(pass) => AttentionRows { q_seq: pass.len, kv_seq: pass.kv_seq, bounds: &pass.bounds },
        })
    }
}

/// A batch seen from each sequence's first changed row on (MEMIT's
/// subject token, where δ is added): rows before it come out the same in
/// every later pass, so their keys and values in the blocks above are
/// computed once, and each pass runs only the rows from there on. Row
/// b·`len` + i of a suffix tensor is token `starts[b]` + i of sequence b.
#[derive(Clone)]
pub struct SuffixPass {
    first_layer: usize,
    /// Rows per sequence in suffix tensors (the longest suffix).
    pub len: usize,
    n_seqs: usize,
    kv_seq: usize,
    /// Full row of each suffix row; padding rows point at their
    /// sequence's last real row (for gathers) ...
    gather_rows: Indices,
    /// ... or nowhere (u32::MAX, for writes).
    scatter_rows: Indices,
    positions: Indices,
    bounds: Indices,
    /// Per block from `first_layer`: its keys and values of every row
    /// (fused q|k|v rows, or k and v), rewritten at the suffix rows by
    /// every pass.
    cache: Vec<(Tensor, Tensor)>,
}

impl SuffixPass {
    /// Rows of a full-batch tensor [batch rows, ..] in the suffix layout.
    pub fn gather(&self, ctx: &GpuContext, full: &Tensor) -> Result<Tensor> {
        Ok(ctx.gather_rows(full, &self.gather_rows)?)
    }

    /// Suffix row of token `t` (a real-token index at or after the start)
    /// of sequence `b`.
    pub fn row(&self, b: usize, t: usize, start: usize) -> usize {
        b * self.len + t - start
    }

    pub fn rows(&self) -> usize {
        self.n_seqs * self.len
    }

    pub fn first_layer(&self) -> usize {
        self.first_layer
    }

    /// Writes this pass's keys and values of block `layer` over the cache
    /// and returns the cache tensors attention should read.
    fn store_keys(&self, ctx: &GpuContext, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k_cache, v_cache) = &self.cache[layer - self.first_layer];
        ctx.scatter_rows_into(k, &self.scatter_rows, k_cache)?;
        if !k.same_storage(v) {
            ctx.scatter_rows_into(v, &self.scatter_rows, v_cache)?;
        }
        Ok((k_cache.clone(), v_cache.clone()))
    }
}

impl Model {
    /// Prepares passes over `batch` from `starts[b]` (a real-token index)
    /// of each sequence on, through blocks `first_layer..`: runs those
    /// blocks once over every row of `hidden` (the residual stream entering
    /// `first_layer`, unchanged) to cache their keys and values.
    pub fn suffix_pass(&self, first_layer: usize, hidden: &Tensor, batch: &Batch, starts: &[usize]) -> Result<SuffixPass> {
        let layout = SuffixLayout::new(&self.ctx, batch, starts, None)?;
        let mut cache = Vec::new();
        let mut x = hidden.clone();
        for layer in first_layer..self.config.n_layers {
            let trace = self.block_trace(layer, &x, Rows::Full(batch))?;
            cache.push((trace.attn.k.0.clone(), trace.attn.v.0.clone()));
            x = trace.out;
        }
        Ok(SuffixPass {
            first_layer,
            len: layout.len,
            n_seqs: batch.batch,
            kv_seq: batch.seq,
            gather_rows: layout.gather_rows,
            scatter_rows: layout.scatter_rows,
            positions: layout.positions,
            bounds: layout.bounds,
            cache,
        })
    }
}

/// Which rows of a batch a suffix pass computes, as GPU index arrays.
struct SuffixLayout {
    len: usize,
    gather_rows: Indices,
    scatter_rows: Indices,
    positions: Indices,
    bounds: Indices,
}

impl SuffixLayout {
    /// Rows `starts[b]..` of each sequence b: `len` of them, or to the end
    /// of the longest suffix.
    fn new(ctx: &GpuContext, batch: &Batch, starts: &[usize], len: Option<usize>) -> Result<SuffixLayout> {
        if starts.len() != batch.batch {
            return Err(ModelError::Input(format!("{} suffix starts for {} sequences", starts.len(), batch.batch)));
        }
        let lengths: Vec<usize> = (0..batch.batch).map(|b| (batch.bounds[b].1 - batch.bounds[b].0) as usize).collect();
        if let Some(b) = (0..batch.batch).find(|&b| starts[b] >= lengths[b]) {
            return Err(ModelError::Input(format!("suffix of sequence {b} starts at {} past its {} tokens", starts[b], lengths[b])));
        }
        let len = len.unwrap_or_else(|| (0..batch.batch).map(|b| lengths[b] - starts[b]).max().unwrap_or(1)).max(1);
        let (mut gather_rows, mut scatter_rows, mut positions, mut bounds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for b in 0..batch.batch {
            let first = batch.row(b, starts[b]);
            for i in 0..len {
                let real = starts[b] + i < lengths[b];
                let row = if real { first + i } else { batch.last_row(b) };
                gather_rows.push(row as u32);
                scatter_rows.push(if real { row as u32 } else { u32::MAX });
                positions.push(batch.positions[row]);
            }
            let (start, end) = batch.bounds[b];
            bounds.extend([start, end, (first - b * batch.seq) as u32, 0]);
        }
        Ok(SuffixLayout {
            len,
            gather_rows: ctx.indices(&gather_rows)?,
            scatter_rows: ctx.indices(&scatter_rows)?,
            positions: ctx.indices(&positions)?,
            bounds: ctx.indices(&bounds)?,
        })
    }
}

impl SuffixPass {
    /// The same cached keys and values, with `len` rows per sequence from
    /// new `starts` on: decoding, where each step computes the rows of the
    /// newest tokens and writes their keys and values into the cache.
    pub fn moved_to(&self, ctx: &GpuContext, batch: &Batch, starts: &[usize], len: usize) -> Result<SuffixPass> {
        if batch.batch != self.n_seqs || batch.seq != self.kv_seq {
            return Err(ModelError::Input("a suffix pass moves only within the batch it was made for".into()));
        }
        let layout = SuffixLayout::new(ctx, batch, starts, Some(len))?;
        Ok(SuffixPass {
            len: layout.len,
            gather_rows: layout.gather_rows,
            scatter_rows: layout.scatter_rows,
            positions: layout.positions,
            bounds: layout.bounds,
            ..self.clone()
        })
    }
}

/// What a block produced besides its output.
pub struct BlockOutput {
    /// The residual stream after the block, [rows, d_model].
    pub hidden: Tensor,
    /// The input of W_out (MEMIT's keys), [rows, d_ff], when requested.
    pub mlp_key: Option<Tensor>,
}

/// q, k, v (after rotary) with their head layouts.
pub(crate) struct AttentionTrace {
    pub q: (Tensor, HeadLayout),
    pub k: (Tensor, HeadLayout),
    pub v: (Tensor, HeadLayout),
}

pub(crate) struct MlpTrace {
    /// The input projection's output: [rows, d_ff], or gate | up
    /// [rows, 2·d_ff] for a gated MLP.
    pub up: Tensor,
    /// The activation (MEMIT's key, the input of W_out).
    pub key: Tensor,
}

/// A block's input, intermediates and output.
pub(crate) struct BlockTrace {
    pub x: Tensor,
    pub attn: AttentionTrace,
    /// x + attention, for sequential blocks.
    pub x1: Option<Tensor>,
    /// The MLP's input projection (gate | up for a gated MLP).
    pub up: Tensor,
    pub key: Tensor,
    pub out: Tensor,
}

/// Everything `Model::forward` was asked to return.
pub struct ForwardOutput {
    /// [rows, vocab] when requested.
    pub logits: Option<Tensor>,
    /// Per layer: block output, if that layer was listed in `capture`.
    pub hidden: Vec<Option<Tensor>>,
    /// Per layer: MLP key, if that layer was listed in `capture`.
    pub mlp_keys: Vec<Option<Tensor>>,
}

impl Model {
    /// Padded tokens one forward pass should hold: large enough that
    /// per-pass costs vanish (4,096), fewer when the widest activation row
    /// (q|k|v, the MLP's hidden layer) would not fit one storage binding.
    pub fn tokens_per_pass(&self) -> usize {
        let c = &self.config;
        let widest = 4 * c.d_ff.max((c.n_heads + 2 * c.n_kv_heads) * c.head_dim).max(c.d_model) as u64;
        ((self.ctx.chunk_bytes() / widest) as usize).clamp(1, 4096)
    }

    /// Token (and, for GPT-2, position) embeddings of a batch: [rows, d].
    pub fn embed(&self, batch: &Batch) -> Result<Tensor> {
        if batch.seq > self.config.max_positions {
            return Err(ModelError::Input(format!("sequence of {} tokens exceeds the model's {} positions", batch.seq, self.config.max_positions)));
        }
        let indices = batch.indices(self.ctx.as_ref())?;
        self.embed_at(&batch.ids, &indices.ids, &indices.positions)
    }

    /// Embeddings of `ids` (one per suffix row, in row order) at the
    /// suffix rows' positions: [pass rows, d].
    pub(crate) fn embed_suffix(&self, pass: &SuffixPass, ids: &[u32]) -> Result<Tensor> {
        self.embed_at(ids, &self.ctx.indices(ids)?, &pass.positions)
    }

    /// Token embeddings of `ids` (also on the GPU as `gpu_ids`), plus the
    /// position embeddings at `positions` for models that have them.
    fn embed_at(&self, ids: &[u32], gpu_ids: &Indices, positions: &Indices) -> Result<Tensor> {
        let ctx = &self.ctx;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(ModelError::Input(format!("token id {bad} is outside the model's vocabulary of {}", self.config.vocab_size)));
        }
        let x = ctx.gather_rows(&self.embed, gpu_ids)?;
        Ok(match &self.pos_embed {
            Some(wpe) => ctx.binary(BinaryOp::Add, &x, &ctx.gather_rows(wpe, positions)?)?,
            None => x,
        })
    }

    /// The blocks from `pass.first_layer()` on, over the suffix rows `x`.
    pub(crate) fn run_suffix(&self, pass: &SuffixPass, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in pass.first_layer..self.config.n_layers {
            x = self.block_trace(layer, &x, Rows::Suffix(pass))?.out;
        }
        Ok(x)
    }

    /// Runs block `layer` on `x` ([rows, d]).
    pub fn block(&self, layer: usize, x: &Tensor, batch: &Batch, want_key: bool) -> Result<BlockOutput> {
        let trace = self.block_trace(layer, x, Rows::Full(batch))?;
        Ok(BlockOutput { hidden: trace.out, mlp_key: want_key.then_some(trace.key) })
    }

    /// Runs block `layer` on `rows`, keeping every intermediate the backward
    /// pass needs.
    pub(crate) fn block_trace(&self, layer: usize, x: &Tensor, rows: Rows<'_>) -> Result<BlockTrace> {
        let ctx = &self.ctx;
        let block = self.block_at(layer)?;
        let a = block.ln1.forward(ctx, x)?;
        let (attn, mixed) = self.attention(layer, &a, rows)?;
        // x + attention, the residual added by the projection's epilogue.
        let x1 = block.attn_out.forward_plus(ctx, &mixed, Some(x))?;
        drop(mixed); // not kept by the trace: free it for the MLP
        let m = match self.config.residual {
            Residual::Sequential => block.ln2.as_ref().expect("sequential blocks have ln2").forward(ctx, &x1)?,
            Residual::ParallelSharedNorm => a,
            Residual::Parallel => block.ln2.as_ref().expect("parallel blocks have ln2").forward(ctx, x)?,
        };
        let mlp = self.mlp(&block, &m)?;
        // x1 + MLP: the sequential block's x + attn + MLP, or the parallel one's.
        let out = block.mlp_out.forward_plus(ctx, &mlp.key, Some(&x1))?;
        let x1 = (self.config.residual == Residual::Sequential).then_some(x1);
        Ok(BlockTrace { x: x.clone(), attn, x1, up: mlp.up, key: mlp.key, out })
    }

    fn mlp(&self, block: &Block, m: &Tensor) -> Result<MlpTrace> {
        let ctx = &self.ctx;
        // One dispatch: the product's epilogue applies the activation.
        let (up, key) = block.mlp_in.forward_activated(ctx, m, self.config.activation, block.mlp_gated)?;
        Ok(MlpTrace { up, key })
    }

    /// The attention's trace and its output before the projection.
    fn attention(&self, layer: usize, a: &Tensor, rows: Rows<'_>) -> Result<(AttentionTrace, Tensor)> {
        let ctx = &self.ctx;
        let c = &self.config;
        let block = self.block_at(layer)?;
        let hd = c.head_dim;
        let heads = |offset, head_stride, n_heads| HeadLayout { offset, head_stride, n_heads };
        let qkv = block.qkv.forward(ctx, a)?;
        let (ql, kl, vl) = if block.qkv_per_head {
            (heads(0, 3 * hd, c.n_heads), heads(hd, 3 * hd, c.n_heads), heads(2 * hd, 3 * hd, c.n_heads))
        } else {
            let (q_width, kv_width) = (c.n_heads * hd, c.n_kv_heads * hd);
            (heads(0, hd, c.n_heads), heads(q_width, hd, c.n_kv_heads), heads(q_width + kv_width, hd, c.n_kv_heads))
        };
        self.rotate_qk(&qkv, ql, kl, rows, false)?;
        let (q, k, v) = (qkv.clone(), qkv.clone(), qkv);
        // A suffix pass writes its keys and values over its rows of the
        // cache and attends to the whole cache.
        let (k, v) = match rows {
            Rows::Full(_) => (k, v),
            Rows::Suffix(pass) => pass.store_keys(ctx, layer, &k, &v)?,
        };
        let mixed = ctx.attention((&q, ql), (&k, kl), (&v, vl), hd, rows.attention(ctx)?, self.attention_scale())?;
        Ok((AttentionTrace { q: (q, ql), k: (k, kl), v: (v, vl) }, mixed))
    }

    /// Rotary embedding of the queries and keys in `x` (or its inverse, the
    /// backward pass): one dispatch when the key heads follow the query
    /// heads in the row ([q | k | v]), two otherwise.
    pub(crate) fn rotate_qk(&self, x: &Tensor, q: HeadLayout, k: HeadLayout, rows: Rows<'_>, inverse: bool) -> Result<()> {
        let Some(table) = &self.rope_table else { return Ok(()) };
        let ctx = &self.ctx;
        let (positions, c) = (rows.positions(ctx)?, &self.config);
        let layouts = if q.head_stride == k.head_stride && k.offset == q.offset + q.n_heads * q.head_stride {
            vec![HeadLayout { n_heads: q.n_heads + k.n_heads, ..q }]
        } else {
            vec![q, k]
        };
        for layout in layouts {
            if inverse {
                ctx.rotary_inverse(x, layout, c.rotary_dim, c.rotary_style, table, positions)?;
            } else {
                ctx.rotary(x, layout, c.rotary_dim, c.rotary_style, table, positions)?;
            }
        }
        Ok(())
    }

    pub(crate) fn attention_scale(&self) -> f32 {
        1.0 / (self.config.head_dim as f32).sqrt()
    }

    /// Final norm and unembedding: [rows, d] → [rows, vocab].
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let head = self.head()?;
        head.unembed.forward(&self.ctx, &head.norm.forward(&self.ctx, x)?)
    }

    /// The whole model on `batch`, keeping the block outputs and MLP keys of
    /// the layers in `capture`; logits only when `want_logits`.
    pub fn forward(&self, batch: &Batch, capture: &[usize], want_logits: bool) -> Result<ForwardOutput> {
        let n = self.config.n_layers;
        if let Some(bad) = capture.iter().find(|&&l| l >= n) {
            return Err(ModelError::Input(format!("layer {bad} does not exist (the model has {n})")));
        }
        let last_needed = if want_logits { n } else { capture.iter().map(|l| l + 1).max().unwrap_or(0) };
        let mut hidden = vec![None; n];
        let mut mlp_keys = vec![None; n];
        let mut x = self.embed(batch)?;
        for layer in 0..last_needed {
            let keep = capture.contains(&layer);
            let out = self.block(layer, &x, batch, keep)?;
            if keep {
                hidden[layer] = Some(out.hidden.clone());
                mlp_keys[layer] = out.mlp_key;
            }
            x = out.hidden;
        }
        let logits = if want_logits { Some(self.logits(&x)?) } else { None };
        Ok(ForwardOutput { logits, hidden, mlp_keys })
    }
}

