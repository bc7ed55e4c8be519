//! Activation functions: GELU (tanh and exact erf), SiLU, ReLU, and gated
//! variants (SwiGLU).

use bytemuck::{Pod, Zeroable};

use super::{require_f32, same_shape, u32_of};
use crate::context::{grid_1d, GpuContext, Kernel};
use crate::error::Result;
use crate::shader::ShaderFamily;
use crate::tensor::{row_pieces, DType, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n: u32,
    x_off: u32,
    out_off: u32,
    dy_off: u32,
    /// Gated kernels: gate (and up) columns per row.
    width: u32,
    _pad: [u32; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GPT-2 / GPT-J "gelu_new": 0.5x(1 + tanh(√(2/π)(x + 0.044715x³))).
    GeluTanh,
    /// Exact GELU, 0.5x(1 + erf(x/√2)) (GPT-NeoX "gelu").
    GeluErf,
    /// x·sigmoid(x) (Llama's MLP gate).
    Silu,
    Relu,
}

impl Activation {
    pub(crate) fn wgsl_fn(self) -> &'static str {
        match self {
            Activation::GeluTanh => "gelu_tanh",
            Activation::GeluErf => "gelu_erf",
            Activation::Silu => "silu",
            Activation::Relu => "relu",
        }
    }
}

impl GpuContext {
    /// act(x) into a new tensor.
    pub fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        require_f32("activation", &[x])?;
        let out = self.empty(x.shape(), DType::F32)?;
        let defines = [("ACT", act.wgsl_fn().to_string())];
        for piece in row_pieces(&[x, &out]) {
            let n = piece.rows * x.row_len();
            let params = Params {
                n: u32_of(n, "activation")?,
                x_off: u32_of(piece.parts[0].1, "activation")?,
                out_off: u32_of(piece.parts[1].1, "activation")?,
                ..Default::default()
            };
            self.dispatch(
                Kernel { family: ShaderFamily::Activation, entry: "apply", defines: &defines },
                bytemuck::bytes_of(&params),
                &[(1, &piece.parts[0].0), (3, &piece.parts[1].0)],
                grid_1d(n.div_ceil(256)),
            )?;
        }
        Ok(out)
    }

    /// act(gate) · up into a new [rows, f] tensor from `gate_up` [rows, 2f]
    /// holding gate | up side by side (SwiGLU with `Activation::Silu`).
    pub fn gated_activation(&self, gate_up: &Tensor, act: Activation) -> Result<Tensor> {
        require_f32("gated_activation", &[gate_up])?;
        let (rows, width) = gated_width("gated_activation", gate_up)?;
        let out = self.empty(&[rows, width], DType::F32)?;
        let defines = [("ACT", act.wgsl_fn().to_string())];
        for piece in row_pieces(&[gate_up, &out]) {
            let n = piece.rows * width;
            let params = Params {
                n: u32_of(n, "gated_activation")?,
                x_off: u32_of(piece.parts[0].1, "gated_activation")?,
                out_off: u32_of(piece.parts[1].1, "gated_activation")?,
                width: u32_of(width, "gated_activation")?,
                ..Default::default()
            };
            self.dispatch(
                Kernel { family: ShaderFamily::Activation, entry: "gated", defines: &defines },
                bytemuck::bytes_of(&params),
                &[(1, &piece.parts[0].0), (3, &piece.parts[1].0)],
                grid_1d(n.div_ceil(256)),
            )?;
        }
        Ok(out)
    }

    /// dx = dy · act′(x).
    pub fn activation_backward(&self, x: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
        require_f32("activation_backward", &[x, dy])?;
        same_shape("activation_backward", x, dy)?;
        let out = self.empty(x.shape(), DType::F32)?;
        let defines = [("ACT", act.wgsl_fn().to_string())];
        for piece in row_pieces(&[x, dy, &out]) {
            let n = piece.rows * x.row_len();
            let params = Params {
                n: u32_of(n, "activation_backward")?,
                x_off: u32_of(piece.parts[0].1, "activation_backward")?,
                dy_off: u32_of(piece.parts[1].1, "activation_backward")?,
                out_off: u32_of(piece.parts[2].1, "activation_backward")?,
                ..Default::default()
            };
            self.dispatch(
                Kernel { family: ShaderFamily::Activation, entry: "apply_backward", defines: &defines },
                bytemuck::bytes_of(&params),
                &[(1, &piece.parts[0].0), (4, &piece.parts[1].0), (3, &piece.parts[2].0)],
                grid_1d(n.div_ceil(256)),
            )?;
        }
        Ok(out)
    }

    /// The gradient d_gate | d_up [rows, 2f] of `gated_activation` given
    /// its output gradient `dy` [rows, f].
    pub fn gated_activation_backward(&self, gate_up: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
        require_f32("gated_activation_backward", &[gate_up, dy])?;
        let (rows, width) = gated_width("gated_activation_backward", gate_up)?;
        if dy.shape() != [rows, width] {
            return Err(crate::GpuError::shape("gated_activation_backward", format!("gradient of shape {:?} for gate | up of shape {:?}", dy.shape(), gate_up.shape())));
        }
        let d_gate_up = self.empty(gate_up.shape(), DType::F32)?;
        let defines = [("ACT", act.wgsl_fn().to_string())];
        for piece in row_pieces(&[gate_up, dy, &d_gate_up]) {
            let n = piece.rows * width;
            let params = Params {
                n: u32_of(n, "gated_activation_backward")?,
                x_off: u32_of(piece.parts[0].1, "gated_activation_backward")?,
                dy_off: u32_of(piece.parts[1].1, "gated_activation_backward")?,
                out_off: u32_of(piece.parts[2].1, "gated_activation_backward")?,
                width: u32_of(width, "gated_activation_backward")?,
                ..Default::default()
            };
            self.dispatch(
                Kernel { family: ShaderFamily::Activation, entry: "gated_backward", defines: &defines },
                bytemuck::bytes_of(&params),
                &[(1, &piece.parts[0].0), (4, &piece.parts[1].0), (3, &piece.parts[2].0)],
                grid_1d(n.div_ceil(256)),
            )?;
        }
        Ok(d_gate_up)
    }
}

/// (rows, f) of a 2-D gate | up tensor [rows, 2f].
fn gated_width(op: &'static str, gate_up: &Tensor) -> Result<(usize, usize)> {
    let (rows, cols) = gate_up.dims2(op)?;
    if cols % 2 != 0 {
        return Err(crate::GpuError::shape(op, format!("{cols} columns cannot hold gate | up halves")));
    }
    Ok((rows, cols / 2))
}
