//! Reductions over the last dimension.

use bytemuck::{Pod, Zeroable};

use super::{as_rows, last_dim_rows, require_f32, u32_of};
use crate::context::{grid_1d, GpuContext, Kernel};
use crate::error::Result;
use crate::shader::ShaderFamily;
use crate::tensor::{row_pieces, DType, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    rows: u32,
    row_len: u32,
    x_off: u32,
    out_off: u32,
    alpha: f32,
    _pad: [u32; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    SumOfSquares,
}

impl GpuContext {
    /// alpha · reduce(x) over the last dimension; the result drops that
    /// dimension (a 1-D input gives shape [1]). `alpha = 1/n` gives a mean.
    pub fn reduce_last(&self, x: &Tensor, op: ReduceOp, alpha: f32) -> Result<Tensor> {
        require_f32("reduce", &[x])?;
        let (len, per_row) = last_dim_rows(x);
        let x = as_rows(x)?;
        let out_shape: Vec<usize> = x.shape()[..x.shape().len() - 1].to_vec();
        let out = self.empty(&out_shape, DType::F32)?;
        let code = match op {
            ReduceOp::Sum => "0",
            ReduceOp::Max => "1",
            ReduceOp::SumOfSquares => "2",
        };
        let defines = [("OP", code.to_string())];
        for piece in row_pieces(&[&x, &out]) {
            let rows = piece.rows * per_row;
            let params = Params {
                rows: u32_of(rows, "reduce")?,
                row_len: u32_of(len, "reduce")?,
                x_off: u32_of(piece.parts[0].1, "reduce")?,
                out_off: u32_of(piece.parts[1].1, "reduce")?,
                alpha,
                ..Default::default()
            };
            self.dispatch(
                Kernel { family: ShaderFamily::Reduce, entry: "main", defines: &defines },
                bytemuck::bytes_of(&params),
                &[(1, &piece.parts[0].0), (2, &piece.parts[1].0)],
                grid_1d(rows),
            )?;
        }
        Ok(out)
    }
}
