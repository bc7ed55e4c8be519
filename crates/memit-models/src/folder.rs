//! Loading a model from disk: a Hugging Face folder or a GGUF file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use memit_gpu::GpuContext;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::{LoadOptions, Model};
use crate::tokenizer::TextTokenizer;
use crate::gguf::GgufSource;
use crate::weights::{FileBytes, SafetensorsSource, StoredDtype, StoredTensor, WeightSource};

pub struct LoadedModel {
    pub model: Model,
    /// Present when the folder has a `tokenizer.json`.
    pub tokenizer: Option<TextTokenizer>,
    /// The checkpoint the weights came from, for exact rewriting.
    pub source: Box<dyn WeightSource>,
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
    Ok(LoadedModel { model, tokenizer, source: Box::new(source) })
}

/// Loads a `.gguf` file (with its embedded tokenizer) or a Hugging Face
/// model folder, whichever `path` is.
pub fn load_model_path(ctx: Arc<GpuContext>, path: &Path, options: LoadOptions) -> Result<LoadedModel> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let source = GgufSource::open(path)?;
        let tokenizer = Some(source.tokenizer()?);
        let model = Model::load(ctx, source.config()?, &source, options)?;
        Ok(LoadedModel { model, tokenizer, source: Box::new(source) })
    } else {
        load_hf_dir(ctx, path, options)
    }
}

/// Writes the model folder `src` with `replacements` swapped in, to `dst`:
/// a new folder (which must not exist yet), or `src` itself to rewrite it in
/// place. Everything is written under temporary names and renamed at the
/// end, so an interrupted run never leaves a half-written checkpoint.
pub fn write_hf_dir(src: &Path, dst: &Path, replacements: &[StoredTensor]) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let source = SafetensorsSource::open_dir(src)?;
    let mut by_file: HashMap<PathBuf, Vec<&StoredTensor>> = HashMap::new();
    for t in replacements {
        let file = source.file_of(&t.name).ok_or_else(|| ModelError::MissingTensor { name: t.name.clone(), source_desc: source.describe() })?;
        by_file.entry(PathBuf::from(file)).or_default().push(t);
    }
    let in_place = dst.exists() && std::fs::canonicalize(dst).map_err(io(dst))? == std::fs::canonicalize(src).map_err(io(src))?;
    if in_place {
        for (file, tensors) in &by_file {
            let partial = file.with_extension("safetensors.partial");
            rewrite_safetensors(file, &tensors[..], &partial)?;
            std::fs::rename(&partial, file).map_err(io(file))?;
        }
        return Ok(());
    }
    if dst.exists() {
        return Err(ModelError::Input(format!("{} already exists; choose a new output folder or remove it", dst.display())));
    }
    let name = dst.file_name().ok_or_else(|| ModelError::Input(format!("{} is not a folder path", dst.display())))?;
    let partial = dst.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    let written = (|| {
        for entry in std::fs::read_dir(src).map_err(io(src))? {
            let path = entry.map_err(io(src))?.path();
            if !path.is_file() {
                continue;
            }
            let out = partial.join(path.file_name().expect("a file has a name"));
            match by_file.iter().find(|(f, _)| std::fs::canonicalize(f).ok() == std::fs::canonicalize(&path).ok()) {
                Some((_, tensors)) => rewrite_safetensors(&path, &tensors[..], &out)?,
                None => {
                    std::fs::copy(&path, &out).map_err(io(&path))?;
                }
            }
        }
        std::fs::rename(&partial, dst).map_err(io(dst))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    written
}

/// Copies the safetensors file `path` to `out` with `replacements` (same
/// names, dtypes and shapes) in place of the stored tensors; the header
/// metadata is kept.
fn rewrite_safetensors(path: &Path, replacements: &[&StoredTensor], out: &Path) -> Result<()> {
    let bytes = FileBytes::map(path)?;
    let bad = |detail: String| ModelError::Checkpoint { path: path.to_path_buf(), detail };
    let st = SafeTensors::deserialize(bytes.bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(bytes.bytes()).map_err(|e| bad(e.to_string()))?;
    let mut views = Vec::new();
    for (name, view) in st.tensors() {
        let view = match replacements.iter().find(|t| t.name == name) {
            Some(t) => {
                let dtype = match t.dtype {
                    StoredDtype::F32 => Dtype::F32,
                    StoredDtype::F16 => Dtype::F16,
                    StoredDtype::BF16 => Dtype::BF16,
                };
                if dtype != view.dtype() || t.shape != view.shape() {
                    return Err(bad(format!("replacement for `{name}` is {dtype:?} {:?}, the file has {:?} {:?}", t.shape, view.dtype(), view.shape())));
                }
                TensorView::new(dtype, t.shape.clone(), &t.bytes).map_err(|e| bad(e.to_string()))?
            }
            None => view,
        };
        views.push((name, view));
    }
    let result = safetensors::serialize_to_file(views, header.metadata().clone(), out);
    result.map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => ModelError::Io { path: out.to_path_buf(), source },
        other => bad(other.to_string()),
    })
}
