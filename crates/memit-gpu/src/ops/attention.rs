//! Rotary position embedding and causal attention over padded batches,
//! with their backward passes.

use bytemuck::{Pod, Zeroable};

use super::{require_f32, u32_of};
use crate::context::{grid_1d, GpuContext, Kernel};
use crate::error::{GpuError, Result};
use crate::shader::ShaderFamily;
use crate::tensor::{DType, Indices, Tensor};

/// Keys one query can attend to in the backward pass (its probabilities
/// live in workgroup memory); the forward pass has no such limit.
const MAX_KEYS: usize = 2048;
/// Queries per workgroup of the GPUs' `attend` (ATTEND_QUERIES).
const ATTEND_QUERIES: usize = 16;
const MAX_HEAD_DIM: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct AttendParams {
    q_seq: u32,
    n_heads: u32,
    kv_group: u32,
    head_dim: u32,
    q_off: u32,
    q_row: u32,
    q_head: u32,
    k_off: u32,
    k_row: u32,
    k_head: u32,
    v_off: u32,
    v_row: u32,
    v_head: u32,
    out_row: u32,
    scale: f32,
    kv_seq: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct RotaryParams {
    rows: u32,
    n_heads: u32,
    rot_half: u32,
    interleaved: u32,
    off: u32,
    row_stride: u32,
    head_stride: u32,
    inverse: u32,
}

/// Where the heads of q, k or v sit inside the rows of a [tokens, width]
/// tensor: head h of token r starts at `offset + r·width + h·head_stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    pub offset: usize,
    pub head_stride: usize,
    pub n_heads: usize,
}

/// Which dimensions rotary embedding pairs up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotaryStyle {
    /// (2i, 2i+1): GPT-J, and Llama weights as stored in GGUF.
    Interleaved,
    /// (i, i + rot/2): GPT-NeoX and Hugging Face Llama.
    Half,
}

fn kernel(entry: &'static str) -> Kernel<'static> {
    Kernel { family: ShaderFamily::Attention, entry, defines: &[] }
}

impl GpuContext {
    /// Rotates the first `rot_dim` dimensions of every head of `x` in place.
    /// `table` is [positions, rot_dim/2, 2] of (cos, sin); `positions` gives
    /// each row's position.
    pub fn rotary(&self, x: &Tensor, layout: HeadLayout, rot_dim: usize, style: RotaryStyle, table: &Tensor, positions: &Indices) -> Result<()> {
        self.rotary_pass(x, layout, rot_dim, style, table, positions, false)
    }

    /// Undoes [`GpuContext::rotary`]: rotation by the opposite angle, which
    /// is also the backward pass of a rotation (its transpose).
    pub fn rotary_inverse(&self, x: &Tensor, layout: HeadLayout, rot_dim: usize, style: RotaryStyle, table: &Tensor, positions: &Indices) -> Result<()> {
        self.rotary_pass(x, layout, rot_dim, style, table, positions, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn rotary_pass(&self, x: &Tensor, layout: HeadLayout, rot_dim: usize, style: RotaryStyle, table: &Tensor, positions: &Indices, inverse: bool) -> Result<()> {
        require_f32("rotary", &[x, table])?;
        let (rows, width) = x.dims2("rotary")?;
        if positions.len() != rows {
            return Err(GpuError::shape("rotary", format!("{} positions for {rows} rows", positions.len())));
        }
        if rot_dim == 0 || rot_dim % 2 != 0 {
            return Err(GpuError::shape("rotary", format!("rotary dimension {rot_dim} must be even and positive")));
        }
        let rot_half = rot_dim / 2;
        let max_pos = table.numel() / (2 * rot_half);
        if let Some(p) = positions.values().iter().find(|&&p| p as usize >= max_pos) {
            return Err(GpuError::shape("rotary", format!("position {p} beyond the {max_pos} positions of the rotary table")));
        }
        if layout.offset + (layout.n_heads - 1) * layout.head_stride + rot_dim > width {
            return Err(GpuError::shape("rotary", "head layout reaches past the row"));
        }
        let (buf, off) = x.single("rotary")?;
        let (table_buf, _) = table.single("rotary")?;
        let params = RotaryParams {
            rows: u32_of(rows, "rotary")?,
            n_heads: u32_of(layout.n_heads, "rotary")?,
            rot_half: u32_of(rot_half, "rotary")?,
            interleaved: (style == RotaryStyle::Interleaved) as u32,
            off: u32_of(off + layout.offset, "rotary")?,
            row_stride: u32_of(width, "rotary")?,
            head_stride: u32_of(layout.head_stride, "rotary")?,
            inverse: inverse as u32,
        };
        let work = rows * layout.n_heads * rot_half;
        self.dispatch(
            kernel("rotary"),
            bytemuck::bytes_of(&params),
            &[(6, buf), (7, table_buf), (8, &positions.buffer)],
            grid_1d(work.div_ceil(256)),
        )
    }

    /// Causal softmax(q·kᵀ·scale)·v, sequence by sequence as `rows`
    /// describes (queries and keys may have their own row layouts, for a
    /// pass over changed rows against cached keys). Query heads share
    /// key/value heads in groups (GQA). Returns [queries' rows,
    /// n_heads·head_dim].
    pub fn attention(&self, q: (&Tensor, HeadLayout), k: (&Tensor, HeadLayout), v: (&Tensor, HeadLayout), head_dim: usize, rows: AttentionRows<'_>, scale: f32) -> Result<Tensor> {
        // Both forward kernels take the softmax online: any number of keys.
        let params = self.attention_params(q, k, v, head_dim, &rows, scale, usize::MAX)?;
        let n_seqs = rows.sequences();
        let (q_buf, _) = q.0.single("attention")?;
        let (k_buf, _) = k.0.single("attention")?;
        let (v_buf, _) = v.0.single("attention")?;
        let out = self.empty(&[n_seqs * rows.q_seq, q.1.n_heads * head_dim], DType::F32)?;
        let (out_buf, _) = out.single("attention")?;
        let (entry, groups) = if self.cpu_kernels() {
            ("attend_rows", [rows.q_seq.div_ceil(64) as u32, q.1.n_heads as u32, n_seqs as u32])
        } else {
            ("attend", [rows.q_seq.div_ceil(ATTEND_QUERIES) as u32, q.1.n_heads as u32, n_seqs as u32])
        };
        self.dispatch(kernel(entry), bytemuck::bytes_of(&params), &[(1, q_buf), (2, k_buf), (3, v_buf), (4, &rows.bounds.buffer), (5, out_buf)], groups)?;
        Ok(out)
    }

    /// Gradients of [`GpuContext::attention`] w.r.t. q, and w.r.t. the
    /// keys and values at the queries' own rows, given the output gradient
    /// `d_out`, written into `dq`, `dk`, `dv`: tensors with the queries'
    /// rows, each laid out within a row like q, k, v (they may all be one
    /// fused tensor, as q, k, v may be). Keys before the queries' first
    /// position (a cache) get no gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        q: (&Tensor, HeadLayout),
        k: (&Tensor, HeadLayout),
        v: (&Tensor, HeadLayout),
        d_out: &Tensor,
        grads: (&Tensor, &Tensor, &Tensor),
        head_dim: usize,
        rows: AttentionRows<'_>,
        scale: f32,
    ) -> Result<()> {
        let params = self.attention_params(q, k, v, head_dim, &rows, scale, MAX_KEYS)?;
        let n_seqs = rows.sequences();
        let q_rows = n_seqs * rows.q_seq;
        if d_out.shape() != [q_rows, q.1.n_heads * head_dim] {
            return Err(GpuError::shape("attention_backward", format!("output gradient has shape {:?}", d_out.shape())));
        }
        let mut bufs = Vec::new();
        for ((t, _), g) in [q, k, v].into_iter().zip([grads.0, grads.1, grads.2]) {
            require_f32("attention_backward", &[g])?;
            let (buf, off) = t.single("attention_backward")?;
            let (gbuf, goff) = g.single("attention_backward")?;
            if g.shape() != [q_rows, t.row_len()] || goff != off {
                return Err(GpuError::shape("attention_backward", "gradient tensors must have the queries' rows and q, k, v's row layout"));
            }
            bufs.push((buf, gbuf));
        }
        let (d_out_buf, _) = d_out.single("attention_backward")?;
        let scratch = n_seqs * q.1.n_heads * rows.q_seq * rows.kv_seq;
        let probs = self.empty(&[scratch.max(1)], DType::F32)?;
        let dscores = self.empty(&[scratch.max(1)], DType::F32)?;
        let (probs_buf, _) = probs.single("attention_backward (scores scratch too large: use smaller batches)")?;
        let (dscores_buf, _) = dscores.single("attention_backward (scores scratch too large: use smaller batches)")?;
        let bounds = &*rows.bounds.buffer;
        let (query_entry, query_groups) = if self.cpu_kernels() {
            ("attend_backward_query_rows", [rows.q_seq.div_ceil(64) as u32, q.1.n_heads as u32, n_seqs as u32])
        } else {
            ("attend_backward_query", [rows.q_seq as u32, q.1.n_heads as u32, n_seqs as u32])
        };
        self.dispatch(
            kernel(query_entry),
            bytemuck::bytes_of(&params),
            &[(1, bufs[0].0), (2, bufs[1].0), (3, bufs[2].0), (4, bounds), (9, d_out_buf), (10, bufs[0].1), (13, probs_buf), (14, dscores_buf)],
            query_groups,
        )?;
        let mut key_bindings = vec![(1, bufs[0].0), (4, bounds), (9, d_out_buf), (11, bufs[1].1), (13, probs_buf), (14, dscores_buf)];
        // A fused dk/dv buffer is bound once (WebGPU forbids a buffer bound writably twice).
        let entry = if bufs[1].1 == bufs[2].1 {
            "attend_backward_key_fused"
        } else {
            key_bindings.push((12, bufs[2].1));
            "attend_backward_key"
        };
        self.dispatch(kernel(entry), bytemuck::bytes_of(&params), &key_bindings, [rows.q_seq as u32, k.1.n_heads as u32, n_seqs as u32])
    }

    /// The kernels' parameters, once the shapes, the key bounds and the
    /// limits (`max_keys` keys, MAX_HEAD_DIM) are checked.
    #[allow(clippy::too_many_arguments)]
    fn attention_params(&self, q: (&Tensor, HeadLayout), k: (&Tensor, HeadLayout), v: (&Tensor, HeadLayout), head_dim: usize, rows: &AttentionRows<'_>, scale: f32, max_keys: usize) -> Result<AttendParams> {
        require_f32("attention", &[q.0, k.0, v.0])?;
        if rows.bounds.len() % 4 != 0 {
            return Err(GpuError::shape("attention", "key bounds come in (start, end, query position, 0) quadruples"));
        }
        let n_seqs = rows.sequences();
        for (t, name, per_seq) in [(q.0, "q", rows.q_seq), (k.0, "k", rows.kv_seq), (v.0, "v", rows.kv_seq)] {
            if t.rows() != n_seqs * per_seq {
                return Err(GpuError::shape("attention", format!("{name} has {} rows, expected {}", t.rows(), n_seqs * per_seq)));
            }
        }
        if rows.kv_seq > max_keys || head_dim > MAX_HEAD_DIM {
            return Err(GpuError::shape("attention", format!("sequence {} / head dim {head_dim} exceed {max_keys} / {MAX_HEAD_DIM}", rows.kv_seq)));
        }
        if k.1.n_heads != v.1.n_heads || k.1.n_heads == 0 || q.1.n_heads % k.1.n_heads != 0 {
            return Err(GpuError::shape("attention", format!("{} query heads cannot share {} key/value heads", q.1.n_heads, k.1.n_heads)));
        }
        if let Some(b) = rows.bounds.values().chunks_exact(4).find(|b| b[0] > b[1] || b[1] as usize > rows.kv_seq || b[2] as usize > rows.kv_seq) {
            return Err(GpuError::shape("attention", format!("key bounds {}..{} (queries from {}) outside 0..{}", b[0], b[1], b[2], rows.kv_seq)));
        }
        let (_, q_off) = q.0.single("attention")?;
        let (_, k_off) = k.0.single("attention")?;
        let (_, v_off) = v.0.single("attention")?;
        let out_row = q.1.n_heads * head_dim;
        let params = AttendParams {
            q_seq: u32_of(rows.q_seq, "attention")?,
            n_heads: u32_of(q.1.n_heads, "attention")?,
            kv_group: u32_of(q.1.n_heads / k.1.n_heads, "attention")?,
            head_dim: u32_of(head_dim, "attention")?,
            q_off: u32_of(q_off + q.1.offset, "attention")?,
            q_row: u32_of(q.0.row_len(), "attention")?,
            q_head: u32_of(q.1.head_stride, "attention")?,
            k_off: u32_of(k_off + k.1.offset, "attention")?,
            k_row: u32_of(k.0.row_len(), "attention")?,
            k_head: u32_of(k.1.head_stride, "attention")?,
            v_off: u32_of(v_off + v.1.offset, "attention")?,
            v_row: u32_of(v.0.row_len(), "attention")?,
            v_head: u32_of(v.1.head_stride, "attention")?,
            out_row: u32_of(out_row, "attention")?,
            scale,
            kv_seq: u32_of(rows.kv_seq, "attention")?,
        };
        Ok(params)
    }
}

/// The row layouts of one attention call: sequence b's queries are rows
/// b·`q_seq` + i, its keys and values rows b·`kv_seq` + j; `bounds` holds
/// per sequence (first real key, one past the last real key, the key
/// position of query 0, 0). A whole batch has `q_seq` = `kv_seq` and query
/// positions 0.
#[derive(Debug, Clone, Copy)]
pub struct AttentionRows<'a> {
    pub q_seq: usize,
    pub kv_seq: usize,
    pub bounds: &'a Indices,
}

impl AttentionRows<'_> {
    fn sequences(&self) -> usize {
        self.bounds.len() / 4
    }
}
