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
use crate::weights::{FileBytes, SafetensorsSource, SharedSource, StoredDtype, StoredTensor, WeightSource};

pub struct LoadedModel {
    pub model: Model,
    /// Present when the folder has a `tokenizer.json`.
    pub tokenizer: Option<TextTokenizer>,
    /// The checkpoint the weights came from, for exact rewriting.
    pub source: SharedSource,
}

/// Loads `config.json`, the safetensors weights (memory-mapped) and, if
/// present, `tokenizer.json` from a model folder.
pub fn load_hf_dir(ctx: Arc<GpuContext>, dir: &Path, options: LoadOptions) -> Result<LoadedModel> {
    if !dir.is_dir() {
        return Err(ModelError::Io { path: dir.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found") });
    }
    let config = read_config(dir)?;
    let source: SharedSource = Arc::new(SafetensorsSource::open_dir(dir)?);
    let model = Model::load_shared(ctx, config, source.clone(), options)?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() { Some(TextTokenizer::from_file(&tokenizer_path)?) } else { None };
    Ok(LoadedModel { model, tokenizer, source })
}

/// The shapes of the model at `path` without its weights: a `.gguf`
/// file's header, or a Hugging Face folder's `config.json` (enough on its
/// own, e.g. to plan memory for a model not downloaded yet).
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    if is_gguf(path) {
        return GgufSource::open(path)?.config();
    }
    let config_path = path.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io { path: config_path.clone(), source })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json { path: config_path.clone(), source })?;
    ModelConfig::from_hf_json(&json)
}

/// Whether `path` names a GGUF file (by its extension, as `--model` does).
fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf")
}

/// Loads a `.gguf` file (with its embedded tokenizer) or a Hugging Face
/// model folder, whichever `path` is.
pub fn load_model_path(ctx: Arc<GpuContext>, path: &Path, options: LoadOptions) -> Result<LoadedModel> {
    if is_gguf(path) {
        let source = GgufSource::open(path)?;
        let tokenizer = Some(source.tokenizer()?);
        let config = source.config()?;
        let source: SharedSource = Arc::new(source);
        let model = Model::load_shared(ctx, config, source.clone(), options)?;
        Ok(LoadedModel { model, tokenizer, source })
    } else {
        load_hf_dir(ctx, path, options)
    }
}

/// Writes the model folder `src` with `replacements` swapped in, to `dst`:
/// a new folder (which must not exist yet), or `src` itself to rewrite it in
/// place. Everything is written under temporary names and renamed at the
/// end, so an interrupted run never leaves a half-written checkpoint.
/// `extra_files` (name, contents) are added to a new folder before that
/// rename: a patch written with its model appears with it, or not at all.
pub fn write_hf_dir(src: &Path, dst: &Path, replacements: &[StoredTensor], extra_files: &[(&str, &[u8])]) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let in_place = dst.exists() && std::fs::canonicalize(dst).map_err(io(dst))? == std::fs::canonicalize(src).map_err(io(src))?;
    if in_place {
        if !extra_files.is_empty() {
            return Err(ModelError::Input("extra files are written to new folders only".into()));
        }
        return stage_in_place(src, replacements)?.commit();
    }
    let by_file = files_of(src, replacements)?;
    if dst.exists() {
        return Err(ModelError::Input(format!("{} already exists; choose a new output folder or remove it", dst.display())));
    }
    let name = dst.file_name().ok_or_else(|| ModelError::Input(format!("{} is not a folder path", dst.display())))?;
    // A name only this function makes: a leftover of an interrupted run is
    // the one thing it removes.
    let partial = dst.with_file_name(format!(".{}.memit-partial", name.to_string_lossy()));
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
        for (name, bytes) in extra_files {
            let out = partial.join(name);
            std::fs::write(&out, bytes).map_err(io(&out))?;
        }
        std::fs::rename(&partial, dst).map_err(io(dst))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    written
}

/// The journal of an in-place rewrite: the checkpoint files whose new
/// versions (`<file>.memit-staged`) are all complete and waiting to be
/// moved over the originals.
pub const REWRITE_JOURNAL: &str = ".memit-rewrite-journal";
const STAGED: &str = ".memit-staged";

fn staged_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(STAGED);
    file.with_file_name(name)
}

/// Held while a rewrite of a folder is staged, committed or recovered:
/// holds the PID of the process doing it. One whose process is gone (a
/// crash, a kill) is stale and taken over.
const REWRITE_LOCK: &str = ".memit-rewrite-lock";

struct RewriteLock {
    path: PathBuf,
}

impl RewriteLock {
    fn acquire(dir: &Path) -> Result<RewriteLock> {
        use std::io::Write;
        let path = dir.join(REWRITE_LOCK);
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    write!(file, "{}", std::process::id()).map_err(|source| ModelError::Io { path: path.clone(), source })?;
                    return Ok(RewriteLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if let Some(pid) = live_holder(&path) {
                        return Err(ModelError::Input(format!(
                            "another memit-wgpu command (process {pid}) is rewriting {} right now; run this again when it is done (or remove {} if no such process runs)",
                            dir.display(),
                            path.display()
                        )));
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(source) => return Err(ModelError::Io { path, source }),
            }
        }
        Err(ModelError::Input(format!("could not take {}: another command keeps taking it", path.display())))
    }
}

impl Drop for RewriteLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The process holding the lock at `path`, while it runs.
fn live_holder(path: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    process_runs(pid).then_some(pid)
}

#[cfg(target_os = "linux")]
fn process_runs(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Without /proc a lock is never judged stale: the message says how to
/// remove it by hand.
#[cfg(not(target_os = "linux"))]
fn process_runs(_pid: u32) -> bool {
    true
}

/// An in-place rewrite of a model folder's checkpoint files, all of them
/// written and recorded in the journal; `commit` moves them into place.
/// Interrupted anywhere, the folder is recovered whole by
/// `finish_interrupted_rewrite`: before the journal exists the originals
/// are untouched (the staged files are dropped), after it every staged
/// file is complete (the moves are finished).
pub struct StagedRewrite {
    dir: PathBuf,
    files: Vec<String>,
    _lock: RewriteLock,
}

/// The checkpoint file of `dir` holding each replacement.
fn files_of<'a>(dir: &Path, replacements: &'a [StoredTensor]) -> Result<HashMap<PathBuf, Vec<&'a StoredTensor>>> {
    let source = SafetensorsSource::open_dir(dir)?;
    let mut by_file: HashMap<PathBuf, Vec<&StoredTensor>> = HashMap::new();
    for t in replacements {
        let file = source.file_of(&t.name).ok_or_else(|| ModelError::MissingTensor { name: t.name.clone(), source_desc: source.describe() })?;
        by_file.entry(PathBuf::from(file)).or_default().push(t);
    }
    Ok(by_file)
}

/// First half of rewriting `dir`'s checkpoint in place with `replacements`:
/// writes the new version of every affected file beside it, then the
/// journal naming them (atomically). Refuses while an earlier rewrite is
/// unfinished, since its new weights would be stale.
pub fn stage_in_place(dir: &Path, replacements: &[StoredTensor]) -> Result<StagedRewrite> {
    let lock = RewriteLock::acquire(dir)?;
    let journal = dir.join(REWRITE_JOURNAL);
    if journal.exists() {
        return Err(ModelError::Input(format!("{} holds an unfinished rewrite ({REWRITE_JOURNAL}); open the model again to finish it first", dir.display())));
    }
    let by_file = files_of(dir, replacements)?;
    let mut files = Vec::new();
    for (file, tensors) in &by_file {
        let staged = staged_path(file);
        let name = file.file_name().and_then(|n| n.to_str()).map(String::from);
        let written = rewrite_safetensors(file, &tensors[..], &staged).and_then(|()| name.ok_or_else(|| ModelError::Input(format!("{} has no UTF-8 file name", file.display()))));
        match written {
            Ok(name) => files.push(name),
            Err(e) => {
                // Nothing is in place yet: drop what was staged.
                let _ = std::fs::remove_file(&staged);
                for name in &files {
                    let _ = std::fs::remove_file(staged_path(&dir.join(name)));
                }
                return Err(e);
            }
        }
    }
    files.sort();
    let tmp = dir.join(format!("{REWRITE_JOURNAL}.tmp"));
    let written = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(files.join("\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &journal)
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        for name in &files {
            let _ = std::fs::remove_file(staged_path(&dir.join(name)));
        }
        return Err(ModelError::Io { path: journal, source });
    }
    Ok(StagedRewrite { dir: dir.to_path_buf(), files, _lock: lock })
}

impl StagedRewrite {
    /// Moves every staged file over its original, then drops the journal.
    /// Checks first that every staged file is still there (another process
    /// opening the folder meanwhile may have rolled the staging back): if
    /// one is missing, nothing is moved and the rewrite is abandoned.
    pub fn commit(self) -> Result<()> {
        if let Some(missing) = self.files.iter().find(|name| !staged_path(&self.dir.join(name)).exists()) {
            let _ = std::fs::remove_file(self.dir.join(REWRITE_JOURNAL));
            for name in &self.files {
                let _ = std::fs::remove_file(staged_path(&self.dir.join(name)));
            }
            return Err(ModelError::Input(format!(
                "the new version of {missing} disappeared before it was moved into place (another memit-wgpu command opened {} meanwhile?); the model was left as it was: run the command again",
                self.dir.display()
            )));
        }
        self.finish()
    }

    /// Moves the staged files that are still there (after a crash, the
    /// ones moved before it are gone) and drops the journal.
    fn finish(self) -> Result<()> {
        for name in &self.files {
            let file = self.dir.join(name);
            let staged = staged_path(&file);
            if staged.exists() {
                std::fs::rename(&staged, &file).map_err(|source| ModelError::Io { path: file.clone(), source })?;
            }
        }
        let journal = self.dir.join(REWRITE_JOURNAL);
        std::fs::remove_file(&journal).map_err(|source| ModelError::Io { path: journal, source })
    }
}

/// What `finish_interrupted_rewrite` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was interrupted.
    Clean,
    /// A rewrite stopped after all its files were written: these were moved
    /// into place, so the model is whole in its new state.
    Completed(Vec<String>),
    /// A rewrite stopped while writing: its partial files were removed and
    /// the model is whole in its old state.
    RolledBack(Vec<String>),
}

/// Finishes or undoes an in-place rewrite of `dir` that a crash, kill or
/// full disk interrupted, so the folder holds one consistent checkpoint.
/// Only files this crate names (`*.memit-staged`, the journal) are touched,
/// and a journal naming anything but plain file names is refused.
pub fn finish_interrupted_rewrite(dir: &Path) -> Result<Recovery> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let journal = dir.join(REWRITE_JOURNAL);
    let leftover = |name: &str| name.ends_with(STAGED) || name == format!("{REWRITE_JOURNAL}.tmp");
    let names: Vec<String> = std::fs::read_dir(dir).map_err(io(dir))?.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    // A run killed between taking the lock and staging its first file
    // leaves only the lock, whose process is gone.
    let stale_lock = names.iter().any(|n| n == REWRITE_LOCK) && live_holder(&dir.join(REWRITE_LOCK)).is_none();
    if !journal.exists() && !stale_lock && !names.iter().any(|n| leftover(n)) {
        // Nothing to do, and nothing written: the folder may be read-only.
        return Ok(Recovery::Clean);
    }
    let lock = RewriteLock::acquire(dir)?;
    if journal.exists() {
        let text = std::fs::read_to_string(&journal).map_err(io(&journal))?;
        let files: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(String::from).collect();
        if let Some(bad) = files.iter().find(|f| Path::new(f).file_name().and_then(|n| n.to_str()) != Some(f.as_str())) {
            return Err(ModelError::Input(format!("{} names {bad:?}, not a file of this folder; remove the journal by hand after checking the folder", journal.display())));
        }
        StagedRewrite { dir: dir.to_path_buf(), files: files.clone(), _lock: lock }.finish()?;
        return Ok(Recovery::Completed(files));
    }
    let mut removed = Vec::new();
    for name in names.into_iter().filter(|n| leftover(n)) {
        let path = dir.join(&name);
        std::fs::remove_file(&path).map_err(io(&path))?;
        removed.push(name);
    }
    drop(lock);
    if stale_lock {
        removed.push(REWRITE_LOCK.to_string());
    }
    removed.sort();
    Ok(if removed.is_empty() { Recovery::Clean } else { Recovery::RolledBack(removed) })
}

/// Copies the safetensors file `path` to `out` with `replacements` (same
/// names, dtypes and shapes) in place of the stored tensors; the header
/// metadata and the file's permissions are kept, and `out` is synced to
/// disk before this returns.
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
    })?;
    let finish = || -> std::io::Result<()> {
        std::fs::set_permissions(out, std::fs::metadata(path)?.permissions())?;
        std::fs::File::open(out)?.sync_all()
    };
    finish().map_err(|source| ModelError::Io { path: out.to_path_buf(), source })
}
