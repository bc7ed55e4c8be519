//! Rotary position embedding and causal attention over padded batches,
//! with their backward passes.

use bytemuck::{Pod, Zeroable};

use super::{require_f32, u32_of};
use crate::context::{grid_1d, GpuContext, Kernel};
use crate::error::{GpuError, Result};
use crate::shader::ShaderFamily;
use crate::tensor::{DType, Indices, Tensor};

const MAX_KEYS: usize = 2048;
const MAX_HEAD_DIM: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct AttendParams {
    seq: u32,
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
    _pad0: u32,
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

    /// Causal softmax(q·kᵀ·scale)·v for `bounds.len() / 2` sequences of
    /// `seq` tokens each (rows b·seq .. b·seq+seq of q, k, v). Sequence b
    /// sees only keys in `bounds[2b] .. bounds[2b + 1]` (its real, unpadded
    /// tokens).
    /// Query heads share key/value heads in groups (GQA). Returns
    /// [rows, n_heads·head_dim].
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: (&Tensor, HeadLayout),
        k: (&Tensor, HeadLayout),
        v: (&Tensor, HeadLayout),
        head_dim: usize,
        seq: usize,
        bounds: &Indices,
        scale: f32,
    ) -> Result<Tensor> {
        let params = self.attention_params(q, k, v, head_dim, seq, bounds, scale)?;
        let n_seqs = bounds.len() / 2;
        let (q_buf, _) = q.0.single("attention")?;
        let (k_buf, _) = k.0.single("attention")?;
        let (v_buf, _) = v.0.single("attention")?;
        let out = self.empty(&[n_seqs * seq, q.1.n_heads * head_dim], DType::F32)?;
        let (out_buf, _) = out.single("attention")?;
        let (entry, groups) = if self.cpu_kernels() {
            ("attend_rows", [seq.div_ceil(64) as u32, q.1.n_heads as u32, n_seqs as u32])
        } else {
            ("attend", [seq as u32, q.1.n_heads as u32, n_seqs as u32])
        };
        self.dispatch(kernel(entry), bytemuck::bytes_of(&params), &[(1, q_buf), (2, k_buf), (3, v_buf), (4, &bounds.buffer), (5, out_buf)], groups)?;
        Ok(out)
    }

    /// Gradients of [`GpuContext::attention`] w.r.t. q, k and v given the
    /// output gradient `d_out`, written into `dq`, `dk`, `dv`: tensors laid
    /// out exactly like q, k, v (they may all be one fused tensor, as q, k, v
    /// may be).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        q: (&Tensor, HeadLayout),
        k: (&Tensor, HeadLayout),
        v: (&Tensor, HeadLayout),
        d_out: &Tensor,
        grads: (&Tensor, &Tensor, &Tensor),
        head_dim: usize,
        seq: usize,
        bounds: &Indices,
        scale: f32,
    ) -> Result<()> {
        let params = self.attention_params(q, k, v, head_dim, seq, bounds, scale)?;
        let n_seqs = bounds.len() / 2;
        let rows = n_seqs * seq;
        if d_out.shape() != [rows, q.1.n_heads * head_dim] {
            return Err(GpuError::shape("attention_backward", format!("output gradient has shape {:?}", d_out.shape())));
        }
        let mut bufs = Vec::new();
        for ((t, _), g) in [q, k, v].into_iter().zip([grads.0, grads.1, grads.2]) {
            require_f32("attention_backward", &[g])?;
            let (buf, off) = t.single("attention_backward")?;
            let (gbuf, goff) = g.single("attention_backward")?;
            if g.shape() != t.shape() || goff != off {
                return Err(GpuError::shape("attention_backward", "gradient tensors must be laid out like q, k, v"));
            }
            bufs.push((buf, gbuf));
        }
        let (d_out_buf, _) = d_out.single("attention_backward")?;
        let scratch = n_seqs * q.1.n_heads * seq * seq;
        let probs = self.empty(&[scratch.max(1)], DType::F32)?;
        let dscores = self.empty(&[scratch.max(1)], DType::F32)?;
        let (probs_buf, _) = probs.single("attention_backward (scores scratch too large: use smaller batches)")?;
        let (dscores_buf, _) = dscores.single("attention_backward (scores scratch too large: use smaller batches)")?;
        self.dispatch(
            kernel("attend_backward_query"),
            bytemuck::bytes_of(&params),
            &[(1, bufs[0].0), (2, bufs[1].0), (3, bufs[2].0), (4, &bounds.buffer), (9, d_out_buf), (10, bufs[0].1), (13, probs_buf), (14, dscores_buf)],
            [seq as u32, q.1.n_heads as u32, n_seqs as u32],
        )?;
        let mut key_bindings = vec![(1, bufs[0].0), (4, &*bounds.buffer), (9, d_out_buf), (11, bufs[1].1), (13, probs_buf), (14, dscores_buf)];
        // A fused dk/dv buffer is bound once (WebGPU forbids a buffer bound writably twice).
        let entry = if bufs[1].1 == bufs[2].1 {
            "attend_backward_key_fused"
        } else {
            key_bindings.push((12, bufs[2].1));
            "attend_backward_key"
        };
        self.dispatch(kernel(entry), bytemuck::bytes_of(&params), &key_bindings, [seq as u32, k.1.n_heads as u32, n_seqs as u32])
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_params(
        &self,
        q: (&Tensor, HeadLayout),
        k: (&Tensor, HeadLayout),
        v: (&Tensor, HeadLayout),
        head_dim: usize,
        seq: usize,
        bounds: &Indices,
        scale: f32,
    ) -> Result<AttendParams> {
        require_f32("attention", &[q.0, k.0, v.0])?;
        if bounds.len() % 2 != 0 {
            return Err(GpuError::shape("attention", "key bounds come in (start, end) pairs"));
        }
        let rows = bounds.len() / 2 * seq;
        for (t, name) in [(q.0, "q"), (k.0, "k"), (v.0, "v")] {
            if t.rows() != rows {
                return Err(GpuError::shape("attention", format!("{name} has {} rows, expected {rows}", t.rows())));
            }
        }
        if seq > MAX_KEYS || head_dim > MAX_HEAD_DIM {
            return Err(GpuError::shape("attention", format!("sequence {seq} / head dim {head_dim} exceed {MAX_KEYS} / {MAX_HEAD_DIM}")));
        }
        if k.1.n_heads != v.1.n_heads || k.1.n_heads == 0 || q.1.n_heads % k.1.n_heads != 0 {
            return Err(GpuError::shape("attention", format!("{} query heads cannot share {} key/value heads", q.1.n_heads, k.1.n_heads)));
        }
        if let Some((s, e)) = bounds.values().chunks_exact(2).map(|b| (b[0], b[1])).find(|(s, e)| s > e || *e as usize > seq) {
            return Err(GpuError::shape("attention", format!("key bounds {s}..{e} outside 0..{seq}")));
        }
        let (_, q_off) = q.0.single("attention")?;
        let (_, k_off) = k.0.single("attention")?;
        let (_, v_off) = v.0.single("attention")?;
        let out_row = q.1.n_heads * head_dim;
        let params = AttendParams {
            seq: u32_of(seq, "attention")?,
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
            _pad0: 0,
        };
        Ok(params)
    }
}
