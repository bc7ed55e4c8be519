//! GPU runtime and WGSL kernels for memit-wgpu.
//!
//! [`GpuContext`] opens the best wgpu adapter with its real limits and runs
//! kernels; [`Tensor`] stores row-major f32/f16 data split into chunks no larger
//! than one storage binding; the `ops` modules launch one dispatch per chunk
//! piece for each operation. The same code runs natively and on WebGPU: the
//! only `await` points are readbacks ([`GpuContext::read`], [`GpuContext::sync`]).

mod context;
mod error;
mod ops;
mod runtime;
mod shader;
mod tensor;

pub use context::{CoopShape, GpuContext, GpuOptions, SplitK, TensorCores};
pub use error::{GpuError, Result};
pub use ops::activation::Activation;
pub use ops::attention::{AttentionRows, HeadLayout, RotaryStyle};
pub use ops::elementwise::BinaryOp;
pub use ops::matmul::{Epilogue, MatmulSpec, MatrixView};
pub use ops::reduce::ReduceOp;
pub use ops::softmax::Causal;
pub use ops::solve::{SpdFactor, FACTOR_PANEL, SOLVE_BLOCK};
pub use ops::target::{LossRow, TargetHyper, TargetPlan};
pub use shader::ShaderFamily;
pub use runtime::{CostCounters, KernelTiming, Work};
pub use tensor::{DType, Indices, MemoryUsage, Tensor};
