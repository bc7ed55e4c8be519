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
    up_off: u32,
    out_off: u32,
    dy_off: u32,
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
    fn wgsl_fn(self) -> &'static str {
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

    /// act(gate) * up into a new tensor (SwiGLU with `Activation::Silu`).
    pub fn gated_activation(&self, gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
        require_f32("gated_activation", &[gate, up])?;
        same_shape("gated_activation", gate, up)?;
        let out = self.empty(gate.shape(), DType::F32)?;
        let defines = [("ACT", act.wgsl_fn().to_string())];
        for piece in row_pieces(&[gate, up, &out]) {
            let n = piece.rows * gate.row_len();
            let params = Params {
                n: u32_of(n, "gated_activation")?,
                x_off: u32_of(piece.parts[0].1, "gated_activation")?,
                up_off: u32_of(piece.parts[1].1, "gated_activation")?,
                out_off: u32_of(piece.parts[2].1, "gated_activation")?,
                ..Default::default()
            };
            self.dispatch(
                Kernel { family: ShaderFamily::Activation, entry: "gated", defines: &defines },
                bytemuck::bytes_of(&params),
                &[(1, &piece.parts[0].0), (2, &piece.parts[1].0), (3, &piece.parts[2].0)],
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

    /// Gradients (d_gate, d_up) of act(gate) · up given its output gradient.
    pub fn gated_activation_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor, act: Activation) -> Result<(Tensor, Tensor)> {
        require_f32("gated_activation_backward", &[gate, up, dy])?;
        same_shape("gated_activation_backward", gate, up)?;
        same_shape("gated_activation_backward", gate, dy)?;
        let d_gate = self.empty(gate.shape(), DType::F32)?;
        let d_up = self.empty(gate.shape(), DType::F32)?;
        let defines = [("ACT", act.wgsl_fn().to_string())];
        for piece in row_pieces(&[gate, up, dy, &d_gate, &d_up]) {
            if piece.parts[3].1 != piece.parts[4].1 {
                return Err(crate::GpuError::shape("gated_activation_backward", "gradient outputs laid out differently"));
            }
            let n = piece.rows * gate.row_len();
            let params = Params {
                n: u32_of(n, "gated_activation_backward")?,
                x_off: u32_of(piece.parts[0].1, "gated_activation_backward")?,
                up_off: u32_of(piece.parts[1].1, "gated_activation_backward")?,
                dy_off: u32_of(piece.parts[2].1, "gated_activation_backward")?,
                out_off: u32_of(piece.parts[3].1, "gated_activation_backward")?,
                ..Default::default()
            };
            self.dispatch(
                Kernel { family: ShaderFamily::Activation, entry: "gated_backward", defines: &defines },
                bytemuck::bytes_of(&params),
                &[(1, &piece.parts[0].0), (2, &piece.parts[1].0), (4, &piece.parts[2].0), (3, &piece.parts[3].0), (5, &piece.parts[4].0)],
                grid_1d(n.div_ceil(256)),
            )?;
        }
        Ok((d_gate, d_up))
    }
}
