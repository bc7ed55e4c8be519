//! Softmax and log-softmax over the last dimension, with an optional causal
//! mask for attention scores.

use bytemuck::{Pod, Zeroable};

use super::{as_rows, last_dim_rows, require_f32, u32_of};
use crate::context::{grid_1d, GpuContext, Kernel};
use crate::error::{GpuError, Result};
use crate::shader::{flag, ShaderFamily};
use crate::tensor::{row_pieces, DType, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    rows: u32,
    row_len: u32,
    x_off: u32,
    out_off: u32,
    block: u32,
    shift: u32,
    row_base: u32,
    _pad: u32,
}

/// Causal masking of attention scores laid out as blocks of `queries` rows
/// (one block per batch item and head): query q sees keys 0 ..= q + `past`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Causal {
    pub queries: usize,
    pub past: usize,
}

impl GpuContext {
    /// softmax (or log-softmax with `log`) over the last dimension.
    pub fn softmax(&self, x: &Tensor, log: bool, causal: Option<Causal>) -> Result<Tensor> {
        require_f32("softmax", &[x])?;
        let (len, per_row) = last_dim_rows(x);
        let shape = x.shape().to_vec();
        let x = as_rows(x)?;
        let out = self.empty(x.shape(), DType::F32)?;
        if let Some(c) = causal {
            if c.queries == 0 {
                return Err(GpuError::shape("softmax", "causal mask with zero queries per block"));
            }
        }
        let defines = [("LOG", flag(log)), ("CAUSAL", flag(causal.is_some()))];
        for piece in row_pieces(&[&x, &out]) {
            let rows = piece.rows * per_row;
            let params = Params {
                rows: u32_of(rows, "softmax")?,
                row_len: u32_of(len, "softmax")?,
                x_off: u32_of(piece.parts[0].1, "softmax")?,
                out_off: u32_of(piece.parts[1].1, "softmax")?,
                block: u32_of(causal.map_or(1, |c| c.queries), "softmax")?,
                shift: u32_of(causal.map_or(0, |c| c.past), "softmax")?,
                row_base: u32_of(piece.row0 * per_row, "softmax")?,
                _pad: 0,
            };
            self.dispatch(
                Kernel { family: ShaderFamily::Softmax, entry: "main", defines: &defines },
                bytemuck::bytes_of(&params),
                &[(1, &piece.parts[0].0), (2, &piece.parts[1].0)],
                grid_1d(rows),
            )?;
        }
        out.reshape(&shape)
    }
}
