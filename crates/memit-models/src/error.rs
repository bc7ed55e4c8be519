use std::path::PathBuf;

use memit_gpu::GpuError;
use thiserror::Error;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path} is not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("unknown architecture `{0}`; supported: gpt2, gptj, gpt_neox, llama")]
    UnknownArchitecture(String),

    #[error("config field `{field}`: {detail}")]
    Config { field: &'static str, detail: String },

    #[error("checkpoint has no tensor `{name}` (looked in {source_desc})")]
    MissingTensor { name: String, source_desc: String },

    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },

    #[error("malformed checkpoint {path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("bad input: {0}")]
    Input(String),

    #[error(transparent)]
    Gpu(#[from] GpuError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
