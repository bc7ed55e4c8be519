//! What every subcommand shares: opening the GPU and a model, resolving
//! hyperparameters, the covariance statistics (cached, resumable), progress
//! bars and crash-safe file writes.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
use memit_core::{load_cache, EditMethod, Hparams, LayerCovariance, PhaseCounters, Phases, Progress, StatsAccumulator, StatsIdentity};
use memit_gpu::{DType, GpuContext};
use memit_models::{finish_interrupted_rewrite, SplitMix64, load_model_path, mlp_out_name, resolve_name, LoadOptions, Model, ModelConfig, Recovery, SharedSource, StoredTensor, TextTokenizer};
use sha2::{Digest, Sha256};

/// `--model` and how to hold its weights.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json, tokenizer.json,
    /// safetensors), a llama-architecture .gguf file, or a repo id
    /// (ORG/NAME) already in the Hugging Face cache.
    #[arg(long, value_parser = model_location)]
    pub model: PathBuf,
    /// Keep weight matrices in f16 on the GPU (half the memory; arithmetic
    /// stays f32).
    #[arg(long)]
    pub f16: bool,
    /// Keep the model's top N blocks off the GPU, uploaded from the
    /// checkpoint each time they run (for a model whose weights do not fit
    /// the GPU; slower, and MEMIT cannot edit those layers).
    #[arg(long, default_value_t = 0)]
    pub stream_blocks: usize,
}

/// Where the covariance statistics come from.
#[derive(clap::Args, Clone)]
pub struct StatsArgs {
    /// Statistics cache file. Made (and resumed) here when missing; default:
    /// a file per model, corpus and layer set under --stats-dir.
    #[arg(long)]
    pub stats: Option<PathBuf>,
    /// Folder for statistics caches (default: $MEMIT_CACHE, else
    /// $XDG_CACHE_HOME/memit-wgpu, else ~/.cache/memit-wgpu).
    #[arg(long)]
    pub stats_dir: Option<PathBuf>,
    /// Text for the statistics: a file (one text per line) or a folder of
    /// .txt files. Default: the model folder's train.txt.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Use at most this many texts, sampled from the whole corpus (default:
    /// the hyperparameters' mom2_n_samples).
    #[arg(long)]
    pub n_texts: Option<usize>,
    /// Seed of that sample (the same seed and corpus give the same texts).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Truncate each text to this many tokens (default: the model's context
    /// length, as the MEMIT authors do, at most the tokens of one GPU pass).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Texts read per step (the unit of progress, checkpoints and
    /// --stop-after-batches); the GPU runs them in passes of about 4,096
    /// tokens of similar length whatever this is.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Write a resumable checkpoint every this many batches.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
}

pub struct Session {
    pub path: PathBuf,
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub source: SharedSource,
    /// SHA-256 of the weights.
    pub fingerprint: String,
}

impl Session {
    pub fn open(args: &ModelArgs) -> Result<Session> {
        Self::open_checked(args, None, |_| Ok(()))
    }

    /// As `open`, running `check` with the GPU before any weight is loaded
    /// (the memory plan), and loading only blocks `0..n` when
    /// `prefix_blocks` is `Some(n)` (statistics; `load_remaining` adds the
    /// rest later).
    pub fn open_checked(args: &ModelArgs, prefix_blocks: Option<usize>, check: impl FnOnce(&GpuContext) -> Result<()>) -> Result<Session> {
        if args.model.is_dir() {
            let what = |files: &[String]| files.join(", ");
            match finish_interrupted_rewrite(&args.model).with_context(|| format!("finishing an interrupted rewrite of {}", args.model.display()))? {
                Recovery::Clean => {}
                Recovery::Completed(files) => eprintln!("note: {} had an interrupted in-place apply/revert; it was completed ({})", args.model.display(), what(&files)),
                Recovery::RolledBack(files) => eprintln!("note: {} had an interrupted in-place apply/revert that had not started replacing files; its partial files were removed ({})", args.model.display(), what(&files)),
            }
        }
        let ctx = open_gpu()?;
        check(&ctx)?;
        let options = LoadOptions { matrix_dtype: if args.f16 { DType::F16 } else { DType::F32 }, prefix_blocks, streamed_blocks: args.stream_blocks };
        let what = match prefix_blocks {
            Some(n) => format!("loading blocks 0..{n} of {}", args.model.display()),
            None => format!("loading {}", args.model.display()),
        };
        let spinner = spinner(&what);
        let loaded = load_model_path(ctx, &args.model, options).with_context(|| format!("loading the model at {}", args.model.display()))?;
        let tokenizer = loaded.tokenizer.with_context(|| format!("{} has no tokenizer.json", args.model.display()))?;
        spinner.set_message("fingerprinting the weights");
        let fingerprint = loaded.source.fingerprint();
        spinner.finish_and_clear();
        Ok(Session { path: args.model.clone(), model: loaded.model, tokenizer, source: loaded.source, fingerprint })
    }

    /// Loads what a prefix model lacks (the blocks above it and the head).
    pub fn load_remaining(&mut self) -> Result<()> {
        if self.model.head.is_some() {
            return Ok(());
        }
        let spinner = spinner(&format!("loading blocks {}..{} of {}", self.model.blocks.len(), self.model.config.n_layers, self.path.display()));
        self.model.load_remaining(self.source.as_ref()).with_context(|| format!("loading the rest of {}", self.path.display()))?;
        spinner.finish_and_clear();
        Ok(())
    }

    /// The model's preset, or `spec`: a preset name or a JSON file of
    /// overrides.
    pub fn hparams(&self, spec: Option<&str>) -> Result<Hparams> {
        resolve_hparams(&self.model.config, spec)
    }

    /// W_out of `layer` exactly as stored in the checkpoint.
    pub fn stored_mlp_out(&self, layer: usize) -> Result<StoredTensor> {
        let want = mlp_out_name(self.model.config.arch, layer);
        let name = resolve_name(self.source.as_ref(), &want)?.with_context(|| format!("the checkpoint has no `{want}`"))?;
        self.source.stored(&name)?.with_context(|| format!("the checkpoint has no `{name}`"))
    }

    /// The covariance statistics for `hp.layers`: from the cache when it
    /// exists and matches, else collected now (resuming an interrupted run)
    /// and cached.
    pub fn covariances(&self, hp: &Hparams, args: &StatsArgs) -> Result<(Vec<LayerCovariance>, PathBuf)> {
        match self.collect_stats(hp, args, None)? {
            StatsOutcome::Done { covariances, path, .. } => Ok((covariances, path)),
            StatsOutcome::Paused { .. } => unreachable!("no batch limit"),
        }
    }

    pub fn collect_stats(&self, hp: &Hparams, args: &StatsArgs, stop_after_batches: Option<usize>) -> Result<StatsOutcome> {
        let n_texts = args.n_texts.unwrap_or(hp.mom2_n_samples);
        let corpus = match &args.corpus {
            Some(corpus) => corpus.clone(),
            None if self.path.is_dir() => self.path.join("train.txt"),
            None => bail!("{} is a single file with no corpus beside it: pass --corpus (a text file, one text per line, or a folder of .txt files); it is read even with --stats, to check the cache was made from the same texts", self.path.display()),
        };
        let texts = read_corpus(&corpus, n_texts, args.seed)?;
        let max_len = args.max_len.unwrap_or_else(|| self.model.config.max_positions.min(self.model.tokens_per_pass()));
        ensure!(max_len > 0, "--max-len is 0: texts need at least one token");
        let identity = StatsIdentity { model_id: self.fingerprint.clone(), corpus_id: corpus_fingerprint(&texts), layers: hp.layers.clone(), max_len };
        let path = match &args.stats {
            Some(p) => p.clone(),
            None => stats_dir(args)?.join(format!(
                "stats-{}-{}-L{}-len{}.safetensors",
                &identity.model_id[..16],
                &identity.corpus_id[..16],
                hp.layers.iter().map(usize::to_string).collect::<Vec<_>>().join("_"),
                max_len
            )),
        };
        let d_ff = self.model.config.d_ff;
        if path.exists() {
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let covariances = load_cache(&bytes, &identity, d_ff).with_context(|| format!("statistics cache {}", path.display()))?;
            return Ok(StatsOutcome::Done { n_tokens: covariances[0].n_tokens, covariances, path, seconds: 0.0, from_cache: true, counters: PhaseCounters::default() });
        }
        // Found out now rather than after the whole corpus has been read.
        check_writable(&path, "statistics cache")?;
        let partial = partial_path(&path);
        let mut acc = if partial.exists() {
            let bytes = std::fs::read(&partial).with_context(|| format!("reading {}", partial.display()))?;
            let acc = StatsAccumulator::resume(&self.model, identity, &bytes).with_context(|| format!("resuming from {} (delete it to start over)", partial.display()))?;
            eprintln!("resuming statistics from {} ({} texts, {} tokens done)", partial.display(), acc.texts_done, acc.n_tokens);
            acc
        } else {
            StatsAccumulator::new(&self.model, identity)?
        };
        let bar = progress_bar(texts.len() as u64, "statistics", "texts");
        bar.set_position(acc.texts_done);
        let start = Instant::now();
        let counters_before = self.model.ctx.counters();
        let passes_before = acc.passes;
        let tokens_before = acc.n_tokens;
        let mut batches = 0;
        while (acc.texts_done as usize) < texts.len() {
            let from = acc.texts_done as usize;
            let batch = &texts[from..(from + args.batch_size.max(1)).min(texts.len())];
            let passes = acc.passes;
            acc.add_texts(&self.model, &self.tokenizer, batch)?;
            if acc.passes > passes {
                // Show texts the GPU has finished, not texts queued for it
                // (one host wait per pass of ~4k tokens).
                pollster::block_on(self.model.ctx.sync())?;
            }
            batches += 1;
            bar.set_position(acc.texts_done);
            bar.set_message(format!("{} tokens", acc.n_tokens));
            let finished = acc.texts_done as usize >= texts.len();
            let pause = stop_after_batches.is_some_and(|n| batches >= n);
            if !finished && (pause || batches % args.checkpoint_every.max(1) == 0) {
                write_atomic(&partial, &pollster::block_on(acc.checkpoint_bytes(&self.model))?)?;
            }
            if pause && !finished {
                bar.abandon_with_message("paused");
                return Ok(StatsOutcome::Paused { partial, texts_done: acc.texts_done, total: texts.len() as u64 });
            }
        }
        // The last pass runs here, so the time is taken after it.
        bar.set_message(format!("{} tokens, running the last pass", acc.n_tokens));
        let (covariances, cache) = pollster::block_on(acc.finish(&self.model))?;
        bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        let new_tokens = acc.n_tokens - tokens_before;
        eprintln!("statistics: {} tokens from {} texts in {seconds:.1} s ({:.0} tokens/s)", acc.n_tokens, texts.len(), new_tokens as f64 / seconds.max(1e-9));
        write_atomic(&path, &cache)?;
        if partial.exists() {
            std::fs::remove_file(&partial).with_context(|| format!("removing {}", partial.display()))?;
        }
        let counters = PhaseCounters { gpu: self.model.ctx.counters().since(&counters_before), steps: acc.passes - passes_before, ..Default::default() };
        Ok(StatsOutcome::Done { n_tokens: acc.n_tokens, covariances, path, seconds, from_cache: false, counters })
    }
}

/// The preset for `config`, or `spec`: a preset name or a JSON file of
/// overrides; validated against the model.
pub fn resolve_hparams(config: &ModelConfig, spec: Option<&str>) -> Result<Hparams> {
    let base = Hparams::for_model(config);
    let hp = match spec {
        None => base,
        Some(s) if Path::new(s).is_file() => {
            let text = std::fs::read_to_string(s).with_context(|| format!("reading {s}"))?;
            let overrides: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{s} is not valid JSON"))?;
            base.with_overrides(&overrides)?
        }
        Some(name) => Hparams::preset(name).with_context(|| format!("--hparams {name:?} is neither a file nor a preset name"))?,
    };
    hp.validate(config)?;
    Ok(hp)
}

pub enum StatsOutcome {
    /// `counters.steps` counts the forward passes over the corpus.
    Done { covariances: Vec<LayerCovariance>, path: PathBuf, n_tokens: u64, seconds: f64, from_cache: bool, counters: PhaseCounters },
    Paused { partial: PathBuf, texts_done: u64, total: u64 },
}

fn stats_dir(args: &StatsArgs) -> Result<PathBuf> {
    if let Some(dir) = &args.stats_dir {
        return Ok(dir.clone());
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("MEMIT_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("memit-wgpu")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/memit-wgpu")))
        .context("no cache folder: set --stats-dir or MEMIT_CACHE")
}

/// `cache.safetensors` → `cache.safetensors.partial`.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// `limit` texts drawn uniformly from the non-empty lines of a file, or of
/// every .txt file in a folder (sorted by name), by a seeded reservoir: the
/// corpus is read once, line by line, holding only the sample. The texts
/// come back in corpus order, so a limit at or above the corpus size takes
/// all of it, in order; the same seed and corpus give the same texts.
pub fn read_corpus(path: &Path, limit: usize, seed: u64) -> Result<Vec<String>> {
    use std::io::BufRead;
    ensure!(limit > 0, "--n-texts (or mom2_n_samples) is 0: the statistics need at least one text");
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("the corpus folder {} has no .txt files", path.display());
        }
        files
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        bail!("statistics corpus {} not found: pass a text file or folder with --corpus", path.display());
    };
    let mut rng = SplitMix64(seed);
    let mut sample: Vec<(usize, String)> = Vec::new();
    let mut seen = 0usize;
    for file in files {
        let reader = std::io::BufReader::new(std::fs::File::open(&file).with_context(|| format!("reading {}", file.display()))?);
        for line in reader.lines() {
            let line = line.with_context(|| format!("reading {} (is it UTF-8 text?)", file.display()))?;
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            if sample.len() < limit {
                sample.push((seen, text.to_string()));
            } else {
                let slot = rng.below(seen + 1);
                if slot < limit {
                    sample[slot] = (seen, text.to_string());
                }
            }
            seen += 1;
        }
    }
    if sample.is_empty() {
        bail!("the statistics corpus {} holds no text", path.display());
    }
    sample.sort_by_key(|&(at, _)| at);
    Ok(sample.into_iter().map(|(_, text)| text).collect())
}

fn corpus_fingerprint(texts: &[String]) -> String {
    let mut h = Sha256::new();
    for t in texts {
        h.update(t.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over
/// `path`: readers see the old file or the new one, never half of one. The
/// temporary name is fixed and ours (`.<name>.memit-tmp`), so one left by a
/// killed run is overwritten by the next instead of piling up, and no file
/// of the user's is taken for it.
/// Fails before any work when `path` (a file or folder still to be
/// written) could not be created: its nearest existing folder must take a
/// new file (not a read-only file system, not without permission). Probes
/// with a file of its own name, removed at once; creates no folder.
pub fn check_writable(path: &Path, what: &str) -> Result<()> {
    let absolute = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().context("the working directory")?.join(path) };
    let dir = absolute.ancestors().skip(1).find(|d| d.is_dir()).context("no existing folder above the path")?;
    let probe = dir.join(format!(".memit-write-probe-{}", std::process::id()));
    std::fs::File::create(&probe).with_context(|| format!("{what} {}: its folder {} cannot take new files", path.display(), dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file_name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let mut name = std::ffi::OsString::from(".");
    name.push(file_name);
    name.push(".memit-tmp");
    let tmp = path.with_file_name(name);
    let written = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no progress output.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// How progress reaches the user: bars on a terminal, a plain line every
/// `LOG_EVERY` in logs (CI, nohup, notebooks), nothing with `--quiet`.
#[derive(PartialEq)]
enum ProgressMode {
    Bars,
    Lines,
    Quiet,
}

fn progress_mode() -> ProgressMode {
    if QUIET.load(Ordering::Relaxed) {
        ProgressMode::Quiet
    } else if std::io::stderr().is_terminal() {
        ProgressMode::Bars
    } else {
        ProgressMode::Lines
    }
}

const LOG_EVERY: Duration = Duration::from_secs(10);

/// A "terminal" that prints each progress redraw as a plain stderr line, at
/// most one per `LOG_EVERY` (the first at once).
#[derive(Debug, Default)]
struct LogLines {
    last: Mutex<Option<Instant>>,
}

impl LogLines {
    fn emit(&self, line: &str) -> std::io::Result<()> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if !line.trim().is_empty() && last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            eprintln!("{}", line.trim_end());
            *last = Some(Instant::now());
        }
        Ok(())
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        200
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.emit(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.emit(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn progress_bar(len: u64, prefix: &str, unit: &str) -> ProgressBar {
    let mode = progress_mode();
    let (target, template) = match mode {
        ProgressMode::Bars => (ProgressDrawTarget::stderr(), format!("{{prefix:>14}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} (ETA {{eta}}) {{msg}}")),
        ProgressMode::Lines => (ProgressDrawTarget::term_like(Box::new(LogLines::default())), format!("{{prefix}}: {{pos}}/{{len}} {unit} after {{elapsed}} ({{rate}} {unit}/s, ETA {{eta}}) {{msg}}")),
        ProgressMode::Quiet => (ProgressDrawTarget::hidden(), String::new()),
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    let style = ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> ");
    // Rates with a sensible precision ("3.2", not "3.2184").
    let style = style.with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
        let rate = state.per_sec();
        let _ = if rate >= 100.0 { write!(w, "{rate:.0}") } else { write!(w, "{rate:.2}") };
    });
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    if mode == ProgressMode::Lines {
        // Redraws (and so log lines) keep coming while one step runs long.
        bar.enable_steady_tick(LOG_EVERY);
    }
    bar
}

pub fn spinner(message: &str) -> ProgressBar {
    match progress_mode() {
        ProgressMode::Bars => {
            let bar = ProgressBar::new_spinner();
            bar.set_message(message.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        }
        ProgressMode::Lines => {
            eprintln!("{message} …");
            ProgressBar::hidden()
        }
        ProgressMode::Quiet => ProgressBar::hidden(),
    }
}

/// The GPU adapter from the environment (`MEMIT_BACKEND`, `MEMIT_ADAPTER`),
/// named on stderr first, with a word on speed when it is a software one.
pub fn open_gpu() -> Result<Arc<GpuContext>> {
    let ctx = pollster::block_on(GpuContext::from_env()).context("opening a GPU adapter")?;
    let info = ctx.adapter_info();
    if info.device_type == wgpu::DeviceType::Cpu {
        eprintln!(
            "adapter: {} ({:?}), a software renderer on the CPU: correct but slow. On a machine with a GPU, install its Vulkan driver (or pick it with MEMIT_ADAPTER=<name>); `memit-wgpu info` shows the adapter in use",
            info.name, info.backend
        );
    } else if progress_mode() != ProgressMode::Quiet {
        eprintln!("adapter: {} ({:?}, {:?})", info.name, info.backend, info.device_type);
    }
    Ok(ctx)
}

/// Turns `apply_memit`'s progress reports into a bar per stage.
pub struct EditProgress {
    bar: Option<(ProgressBar, &'static str)>,
}

impl EditProgress {
    pub fn new() -> EditProgress {
        EditProgress { bar: None }
    }

    pub fn report(&mut self, p: Progress) {
        if self.bar.as_ref().is_none_or(|(_, stage)| *stage != p.stage) {
            self.finish();
            let unit = match p.stage {
                "layers" | "null-space projectors" => "layers",
                "target vectors" => "steps",
                _ => "requests",
            };
            self.bar = Some((progress_bar(p.total as u64, p.stage, unit), p.stage));
        }
        if let Some((bar, _)) = &self.bar {
            bar.set_position(p.done as u64);
        }
    }

    pub fn finish(&mut self) {
        if let Some((bar, _)) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// "target vectors 1.2 s (peak 3 MiB), keys …" for text output.
/// `--model`: a path as given, or, for a repo id (`ORG/NAME`) that is not a
/// path here, its snapshot in the Hugging Face cache (`$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`): the revision
/// `refs/main` names, or the newest snapshot. Nothing is downloaded.
pub fn model_location(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    let repo_id = text.split('/').count() == 2 && !text.starts_with('.') && !text.ends_with(".gguf") && text.split('/').all(|p| !p.is_empty());
    if path.exists() || !repo_id {
        return Ok(path);
    }
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let hub = env("HF_HUB_CACHE")
        .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| env("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/huggingface/hub")));
    let Some(entry) = hub.map(|hub| hub.join(format!("models--{}", text.replace('/', "--")))) else {
        return Ok(path);
    };
    let snapshots = entry.join("snapshots");
    let pinned = std::fs::read_to_string(entry.join("refs/main")).ok().map(|r| snapshots.join(r.trim())).filter(|p| p.is_dir());
    let newest = || {
        std::fs::read_dir(&snapshots).ok()?.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok()).map(|e| e.path())
    };
    match pinned.or_else(newest) {
        Some(snapshot) => Ok(snapshot),
        None if entry.exists() => Err(format!("{text}: the Hugging Face cache entry {} has no snapshot (this tool never downloads; fetch it with huggingface-cli first)", entry.display())),
        None => Ok(path),
    }
}

/// `--method`: how each layer's update is solved.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum MethodArg {
    /// MEMIT: each edit against the preserved statistics alone.
    Memit,
    /// MEMIT whose solve also keeps the keys of the earlier edits of a
    /// sequential run (eval --mode sequential).
    MemitSeq,
    /// AlphaEdit: updates projected onto the null space of the preserved
    /// keys (hparams nullspace_threshold, l2), earlier edits' keys kept.
    Alphaedit,
}

impl MethodArg {
    pub fn method(self) -> EditMethod {
        match self {
            MethodArg::Memit => EditMethod::Memit,
            MethodArg::MemitSeq => EditMethod::MemitSeq,
            MethodArg::Alphaedit => EditMethod::AlphaEdit,
        }
    }
}

pub fn describe_phases(p: &Phases) -> String {
    [("target vectors", p.target_vectors), ("keys", p.keys), ("solve", p.solve), ("update", p.update)]
        .iter()
        .map(|(name, c)| format!("{name} {:.2} s, peak {:.1} MiB", c.seconds, c.peak_bytes as f64 / (1 << 20) as f64))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::read_corpus;

    fn corpus(lines: usize) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("memit-corpus-{lines}-{}.txt", std::process::id()));
        let text: String = (0..lines).map(|i| format!("text {i}\n\n")).collect();
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn corpus_samples_are_seeded_uniform_and_in_corpus_order() {
        let ten = corpus(10);
        let all: Vec<String> = (0..10).map(|i| format!("text {i}")).collect();
        assert_eq!(read_corpus(&ten, 10, 3).unwrap(), all, "a limit at the corpus size takes it all, in order");
        assert_eq!(read_corpus(&ten, 50, 3).unwrap(), all);
        let a = read_corpus(&ten, 4, 1).unwrap();
        assert_eq!(a, read_corpus(&ten, 4, 1).unwrap(), "same seed, same sample");
        let index = |t: &String| t[5..].parse::<usize>().unwrap();
        assert!(a.windows(2).all(|w| index(&w[0]) < index(&w[1])), "{a:?} in corpus order");
        // One text of ten over 2,000 seeds: each is drawn about 200 times
        // (binomial sd ≈ 13; the bounds are ±5 sd).
        let mut counts = [0usize; 10];
        for seed in 0..2000 {
            counts[index(&read_corpus(&ten, 1, seed).unwrap()[0])] += 1;
        }
        assert!(counts.iter().all(|&c| (135..=265).contains(&c)), "{counts:?}");
        assert!(read_corpus(&ten, 0, 0).unwrap_err().to_string().contains("is 0"));
        std::fs::remove_file(ten).ok();
    }
}
