//! LayerNorm and RMSNorm over the last dimension.

use bytemuck::{Pod, Zeroable};

use super::{as_rows, last_dim_rows, require_f32, u32_of};
use crate::context::{grid_1d, GpuContext, Kernel};
use crate::error::{GpuError, Result};
use crate::shader::ShaderFamily;
use crate::tensor::{row_pieces, DType, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    rows: u32,
    row_len: u32,
    x_off: u32,
    out_off: u32,
    eps: f32,
    dy_off: u32,
    _pad: [u32; 2],
}

impl GpuContext {
    /// (x − mean)/√(var + eps)·gain + bias over the last dimension.
    pub fn layer_norm(&self, x: &Tensor, gain: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
        self.norm("layer_norm", x, gain, Some(bias), eps)
    }

    /// x/√(mean(x²) + eps)·gain over the last dimension (Llama).
    pub fn rms_norm(&self, x: &Tensor, gain: &Tensor, eps: f32) -> Result<Tensor> {
        self.norm("rms_norm", x, gain, None, eps)
    }

    /// Gradient w.r.t. the input of `layer_norm(x, gain, _, eps)` given the
    /// output gradient `dy`.
    pub fn layer_norm_backward(&self, x: &Tensor, gain: &Tensor, dy: &Tensor, eps: f32) -> Result<Tensor> {
        self.norm_backward("layer_norm_backward", x, gain, dy, eps)
    }

    /// Gradient w.r.t. the input of `rms_norm(x, gain, eps)`.
    pub fn rms_norm_backward(&self, x: &Tensor, gain: &Tensor, dy: &Tensor, eps: f32) -> Result<Tensor> {
        self.norm_backward("rms_norm_backward", x, gain, dy, eps)
    }

    fn norm_backward(&self, entry: &'static str, x: &Tensor, gain: &Tensor, dy: &Tensor, eps: f32) -> Result<Tensor> {
        super::same_shape(entry, x, dy)?;
        self.norm_pass(entry, x, gain, None, Some(dy), eps)
    }

    fn norm(&self, entry: &'static str, x: &Tensor, gain: &Tensor, bias: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        self.norm_pass(entry, x, gain, bias, None, eps)
    }

    /// One row-wise pass of the norm family: forward (with optional bias) or
    /// backward (with the output gradient `dy`).
    fn norm_pass(&self, entry: &'static str, x: &Tensor, gain: &Tensor, bias: Option<&Tensor>, dy: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        require_f32(entry, &[x, gain])?;
        if let Some(d) = dy {
            require_f32(entry, &[d])?;
        }
        let (len, per_row) = last_dim_rows(x);
        for v in std::iter::once(gain).chain(bias) {
            require_f32(entry, &[v])?;
            if v.numel() != len {
                return Err(GpuError::shape(entry, format!("weight of {} elements for rows of {len}", v.numel())));
            }
        }
        let (gain_buf, gain_off) = gain.single(entry)?;
        let bias_buf = bias.map(|b| b.single(entry)).transpose()?;
        if gain_off != 0 || bias_buf.is_some_and(|(_, off)| off != 0) {
            return Err(GpuError::shape(entry, "norm weights must be whole tensors, not views"));
        }
        let shape = x.shape().to_vec();
        let x = as_rows(x)?;
        let dy = dy.map(as_rows).transpose()?;
        let out = self.empty(x.shape(), DType::F32)?;
        let operands: Vec<&Tensor> = [&x, &out].into_iter().chain(dy.as_ref()).collect();
        for piece in row_pieces(&operands) {
            let rows = piece.rows * per_row;
            let params = Params {
                rows: u32_of(rows, entry)?,
                row_len: u32_of(len, entry)?,
                x_off: u32_of(piece.parts[0].1, entry)?,
                out_off: u32_of(piece.parts[1].1, entry)?,
                eps,
                dy_off: u32_of(piece.parts.get(2).map_or(0, |p| p.1), entry)?,
                ..Default::default()
            };
            let mut bindings: Vec<(u32, &wgpu::Buffer)> = vec![(1, &piece.parts[0].0), (2, gain_buf), (4, &piece.parts[1].0)];
            if let Some((b, _)) = bias_buf {
                bindings.push((3, b));
            }
            if let Some(part) = piece.parts.get(2) {
                bindings.push((5, &*part.0));
            }
            let lanes = self.row_lanes();
            self.dispatch(
                Kernel { family: ShaderFamily::Norm, entry, defines: &[("LANES", lanes.to_string())] },
                bytemuck::bytes_of(&params),
                &bindings,
                grid_1d(rows.div_ceil(256 / lanes)),
            )?;
        }
        out.reshape(&shape)
    }
}
