//! Loading a model from disk: a Hugging Face folder or a GGUF file.

use std::path::Path;
use std::sync::Arc;

use memit_gpu::GpuContext;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::{LoadOptions, Model};
use crate::tokenizer::TextTokenizer;
use crate::gguf::GgufSource;
use crate::weights::SafetensorsSource;

pub struct LoadedModel {
    pub model: Model,
    /// Present when the folder has a `tokenizer.json`.
    pub tokenizer: Option<TextTokenizer>,
}

/// Loads `config.json`, the safetensors weights (memory-mapped) and, if
/// present, `tokenizer.json` from a model folder.
pub fn load_hf_dir(ctx: Arc<GpuContext>, dir: &Path, options: LoadOptions) -> Result<LoadedModel> {
    if !dir.is_dir() {
        return Err(ModelError::Io { path: dir.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found") });
    }
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io { path: config_path.clone(), source })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json { path: config_path.clone(), source })?;
    let config = ModelConfig::from_hf_json(&json)?;
    let source = SafetensorsSource::open_dir(dir)?;
    let model = Model::load(ctx, config, &source, options)?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() { Some(TextTokenizer::from_file(&tokenizer_path)?) } else { None };
    Ok(LoadedModel { model, tokenizer })
}

/// Loads a `.gguf` file (with its embedded tokenizer) or a Hugging Face
/// model folder, whichever `path` is.
pub fn load_model_path(ctx: Arc<GpuContext>, path: &Path, options: LoadOptions) -> Result<LoadedModel> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let source = GgufSource::open(path)?;
        let tokenizer = Some(source.tokenizer()?);
        Ok(LoadedModel { model: Model::load(ctx, source.config()?, &source, options)?, tokenizer })
    } else {
        load_hf_dir(ctx, path, options)
    }
}
