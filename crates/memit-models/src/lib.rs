//! GPT-2, GPT-J, GPT-NeoX and Llama models for memit-wgpu: checkpoints
//! (Hugging Face folders with safetensors, GGUF files) loaded onto the GPU,
//! tokenisation, and the forward pass and generation in WGSL.

mod backward;
mod config;
mod error;
mod forward;
mod generate;
mod gguf;
mod model;
mod tokenizer;
mod weights;

pub use backward::Trace;
pub use config::{Arch, ModelConfig, Residual};
pub use error::{ModelError, Result};
pub use forward::{Batch, BatchIndices, BlockOutput, ForwardOutput, Padding, SuffixPass};
pub use gguf::{stream_gguf, GgufHeader, GgufSource, GgufValue};
pub use generate::{argmax, GenerateOptions, Sampling};
pub use rng::SplitMix64;
pub use model::{mlp_out_name, resolve_name, rope_table, Block, Head, Linear, LoadOptions, Model, Norm, WeightLayout};
pub use tokenizer::TextTokenizer;
pub use weights::{decode_safetensors, upload_weight, FileBytes, HostData, HostTensor, SafetensorsSource, SharedSource, StoredDtype, StoredTensor, WeightSource};

#[cfg(not(target_arch = "wasm32"))]
mod folder;
mod rng;
#[cfg(not(target_arch = "wasm32"))]
pub use folder::{finish_interrupted_rewrite, load_hf_dir, load_model_path, read_config, stage_in_place, write_hf_dir, LoadedModel, Recovery, StagedRewrite, REWRITE_JOURNAL};
