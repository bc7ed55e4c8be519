//! Binary ops with broadcast, axpby, affine scale, fill and dtype casts.

use bytemuck::{Pod, Zeroable};

use super::{require_f32, same_shape, u32_of};
use crate::context::{grid_1d, GpuContext, Kernel};
use crate::error::{GpuError, Result};
use crate::shader::ShaderFamily;
use crate::tensor::{row_pieces, DType, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n: u32,
    row_len: u32,
    x_off: u32,
    y_off: u32,
    out_off: u32,
    _pad0: u32,
    alpha: f32,
    beta: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    fn expression(self) -> &'static str {
        match self {
            BinaryOp::Add => "x + y",
            BinaryOp::Sub => "x - y",
            BinaryOp::Mul => "x * y",
            BinaryOp::Div => "x / y",
        }
    }
}

/// Template values for entry points that do not use the binary op.
fn plain_defines() -> Vec<(&'static str, String)> {
    vec![("BROADCAST", "0".into()), ("OP", "x".into())]
}

fn kernel<'a>(entry: &'static str, defines: &'a [(&'static str, String)]) -> Kernel<'a> {
    Kernel { family: ShaderFamily::Elementwise, entry, defines }
}

impl GpuContext {
    /// `x op y` into a new tensor. `y` has x's shape, or x's trailing
    /// dimensions (repeated over the leading ones), or a single element.
    pub fn binary(&self, op: BinaryOp, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        require_f32("binary", &[x, y])?;
        let out = self.empty(x.shape(), DType::F32)?;
        let broadcast = if x.shape() == y.shape() {
            0
        } else if y.numel() == 1 {
            2
        } else if x.shape().ends_with(y.shape()) {
            1
        } else {
            return Err(GpuError::shape("binary", format!("cannot broadcast {:?} onto {:?}", y.shape(), x.shape())));
        };
        let defines = vec![("BROADCAST", broadcast.to_string()), ("OP", op.expression().into())];
        let pieces = if broadcast == 0 { row_pieces(&[x, &out, y]) } else { row_pieces(&[x, &out]) };
        let (y_single, y_single_off) = if broadcast == 0 { (None, 0) } else {
            let (b, o) = y.single("binary")?;
            (Some(b), o)
        };
        for piece in pieces {
            let n = piece.rows * x.row_len();
            let (y_buf, y_off) = match y_single {
                Some(b) => (b, y_single_off),
                None => (&**piece.parts[2].0, piece.parts[2].1),
            };
            let params = Params {
                n: u32_of(n, "binary")?,
                row_len: u32_of(y.numel(), "binary")?,
                x_off: u32_of(piece.parts[0].1, "binary")?,
                y_off: u32_of(y_off, "binary")?,
                out_off: u32_of(piece.parts[1].1, "binary")?,
                ..Default::default()
            };
            self.dispatch(
                kernel("binary", &defines),
                bytemuck::bytes_of(&params),
                &[(1, &piece.parts[0].0), (2, y_buf), (3, &piece.parts[1].0)],
                grid_1d(n.div_ceil(256)),
            )?;
        }
        Ok(out)
    }

    /// y ← alpha·x + beta·y, in place.
    pub fn axpby(&self, alpha: f32, x: &Tensor, beta: f32, y: &Tensor) -> Result<()> {
        require_f32("axpby", &[x, y])?;
        same_shape("axpby", x, y)?;
        self.unary_pass("axpby", x, y, alpha, beta)
    }

    /// alpha·x + beta into a new tensor.
    pub fn affine(&self, x: &Tensor, alpha: f32, beta: f32) -> Result<Tensor> {
        let out = self.empty(x.shape(), DType::F32)?;
        self.affine_into(x, alpha, beta, &out)?;
        Ok(out)
    }

    /// out ← alpha·x + beta, into an existing tensor of x's shape (whose
    /// storage may be chunked differently).
    pub fn affine_into(&self, x: &Tensor, alpha: f32, beta: f32, out: &Tensor) -> Result<()> {
        require_f32("affine", &[x, out])?;
        same_shape("affine", x, out)?;
        self.unary_pass("affine", x, out, alpha, beta)
    }

    /// Sets every element of `t` to `value`.
    pub fn fill(&self, t: &Tensor, value: f32) -> Result<()> {
        require_f32("fill", &[t])?;
        self.unary_pass("fill", t, t, value, 0.0)
    }

    /// Zeroes the first `words` 32-bit words of a reused buffer, in order
    /// with the recorded work (any dtype: zero bits are zero).
    pub(crate) fn zero_words(&self, buffer: &wgpu::Buffer, words: u64) -> Result<()> {
        let defines = plain_defines();
        let params = Params { n: u32_of(words as usize, "zeros")?, ..Default::default() };
        self.dispatch(kernel("fill", &defines), bytemuck::bytes_of(&params), &[(3, buffer)], grid_1d((words as usize).div_ceil(256)))
    }

    /// Runs an x → out entry point of the elementwise family piecewise.
    fn unary_pass(&self, entry: &'static str, x: &Tensor, out: &Tensor, alpha: f32, beta: f32) -> Result<()> {
        let defines = plain_defines();
        for piece in row_pieces(&[x, out]) {
            let n = piece.rows * x.row_len();
            let params = Params {
                n: u32_of(n, entry)?,
                x_off: u32_of(piece.parts[0].1, entry)?,
                out_off: u32_of(piece.parts[1].1, entry)?,
                alpha,
                beta,
                ..Default::default()
            };
            let bindings: &[(u32, &wgpu::Buffer)] = if entry == "fill" {
                &[(3, &piece.parts[1].0)]
            } else {
                &[(1, &piece.parts[0].0), (3, &piece.parts[1].0)]
            };
            self.dispatch(kernel(entry, &defines), bytemuck::bytes_of(&params), bindings, grid_1d(n.div_ceil(256)))?;
        }
        Ok(())
    }

    /// A copy of `x` stored as `dtype` (f32 → f16 rounds to nearest).
    pub fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let out = self.empty(x.shape(), dtype)?;
        let defines = plain_defines();
        for piece in row_pieces(&[x, &out]) {
            let n = piece.rows * x.row_len();
            let (entry, groups) = match (x.dtype(), dtype) {
                (DType::F32, DType::F16) => ("to_f16", n.div_ceil(2).div_ceil(256)),
                (DType::F16, DType::F32) => ("to_f32", n.div_ceil(256)),
                _ => ("copy", 0),
            };
            if entry == "copy" {
                let bytes = (n * dtype.size()) as u64;
                let src = (piece.parts[0].1 * dtype.size()) as u64;
                let dst = (piece.parts[1].1 * dtype.size()) as u64;
                if src % 4 != 0 || dst % 4 != 0 || bytes % 4 != 0 {
                    return Err(GpuError::shape("cast", "an f16 copy must start and end on even elements"));
                }
                self.copy(&piece.parts[0].0, src, &piece.parts[1].0, dst, bytes);
                continue;
            }
            if dtype == DType::F16 && piece.parts[1].1 % 2 != 0 {
                return Err(GpuError::shape("cast", "f16 output must start on an even element"));
            }
            let params = Params {
                n: u32_of(n, "cast")?,
                x_off: u32_of(piece.parts[0].1, "cast")?,
                out_off: u32_of(piece.parts[1].1, "cast")?,
                ..Default::default()
            };
            let bindings: [(u32, &wgpu::Buffer); 2] = if entry == "to_f16" {
                [(1, &piece.parts[0].0), (4, &piece.parts[1].0)]
            } else {
                [(5, &piece.parts[0].0), (3, &piece.parts[1].0)]
            };
            self.dispatch(kernel(entry, &defines), bytemuck::bytes_of(&params), &bindings, grid_1d(groups))?;
        }
        Ok(out)
    }
}
