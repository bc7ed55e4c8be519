//! One module per kernel family; each validates shapes, cuts operands into
//! chunk-aligned pieces and records one dispatch per piece.

pub mod activation;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod softmax;
pub mod solve;
pub mod target;

use crate::error::{GpuError, Result};
use crate::tensor::{DType, Tensor};

/// Element offsets and sizes are passed to shaders as u32.
pub(crate) fn u32_of(v: usize, op: &'static str) -> Result<u32> {
    u32::try_from(v).map_err(|_| GpuError::shape(op, format!("index {v} does not fit in 32 bits")))
}

pub(crate) fn require_f32(op: &'static str, tensors: &[&Tensor]) -> Result<()> {
    match tensors.iter().find(|t| t.dtype() != DType::F32) {
        Some(t) => Err(GpuError::Dtype { op, dtype: t.dtype(), detail: "this operand must be f32" }),
        None => Ok(()),
    }
}

pub(crate) fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(GpuError::shape(op, format!("{:?} vs {:?}", a.shape(), b.shape())));
    }
    Ok(())
}

/// For ops over the last dimension: (length of the last dimension, number of
/// such rows in one first-dimension row). A 1-D tensor is one row.
pub(crate) fn last_dim_rows(t: &Tensor) -> (usize, usize) {
    let last = *t.shape().last().expect("tensors have at least one dimension");
    if t.shape().len() == 1 {
        (last, 1)
    } else {
        (last, t.row_len() / last.max(1))
    }
}

/// A 1-D tensor viewed as a single row, so pieces never split the vector.
pub(crate) fn as_rows(t: &Tensor) -> Result<Tensor> {
    if t.shape().len() == 1 {
        t.reshape(&[1, t.numel()])
    } else {
        Ok(t.clone())
    }
}
