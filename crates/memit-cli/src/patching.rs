//! `edit`, `apply`, `revert`, `diff` and `generate`: making patches and
//! moving models between their original and edited states.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use memit_core::{apply_memit, context_templates, EditRequest, Patch};
use memit_models::{write_hf_dir, GenerateOptions, Model, Sampling, StoredTensor, TextTokenizer};
use serde::Serialize;

use crate::session::{describe_phases, spinner, write_atomic, EditProgress, ModelArgs, Session, StatsArgs};

/// Context templates for target vectors.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Templates {
    /// The plain prompt only.
    Plain,
    /// The prompt after short texts the model generates (MEMIT's default).
    Generated,
}

#[derive(clap::Args)]
pub struct EditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// [{"prompt": "... {} ...", "subject": "...", "target_new": {"str": "..."}}, ...]
    #[arg(long)]
    pub requests: PathBuf,
    #[command(flatten)]
    pub stats: StatsArgs,
    /// A preset name (gpt2-xl, gpt-j-6b, ...) or a JSON file overriding the
    /// model's preset.
    #[arg(long)]
    pub hparams: Option<String>,
    #[arg(long, value_enum, default_value_t = Templates::Generated)]
    pub templates: Templates,
    /// Edited model folder to write (default: <model>-edited). Only for
    /// safetensors models; GGUF models get the patch file only.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Patch file to write (default: memit-patch.safetensors inside the
    /// edited folder, or <model>.patch.safetensors for GGUF).
    #[arg(long)]
    pub patch: Option<PathBuf>,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// Edit in memory and show the predictions only; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Where `apply` / `revert` write.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct Destination {
    /// Write the result as a new model folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Rewrite the model's own safetensors files (atomically, file by file).
    #[arg(long)]
    pub in_place: bool,
}

#[derive(Serialize)]
struct Prediction {
    token: String,
    prob: f32,
}

#[derive(Serialize)]
struct RequestReport {
    prompt: String,
    target_new: String,
    before: Vec<Prediction>,
    after: Vec<Prediction>,
}

/// The `k` most likely next tokens after `prompt`.
fn top_predictions(model: &Model, tok: &TextTokenizer, prompt: &str, k: usize) -> Result<Vec<Prediction>> {
    let logits = pollster::block_on(model.last_token_logits(&[tok.encode(prompt)?]))?.remove(0);
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let total: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.iter().take(k).map(|&i| Ok(Prediction { token: tok.decode(&[i as u32])?, prob: (logits[i] - max).exp() / total })).collect()
}

/// Requests whose optimised target vector still gives the new target a low
/// probability: (index, probability).
pub fn weak_targets(targets: &[memit_core::TargetVector]) -> Vec<(usize, f32)> {
    targets.iter().enumerate().filter_map(|(i, t)| t.losses.last().map(|l| (i, l.target_prob))).filter(|&(_, p)| p < 0.1).collect()
}

fn read_requests(path: &Path) -> Result<Vec<EditRequest>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let requests: Vec<EditRequest> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JSON list of MEMIT requests ({{\"prompt\", \"subject\", \"target_new\": {{\"str\"}}}})", path.display()))?;
    ensure!(!requests.is_empty(), "{} holds no requests", path.display());
    Ok(requests)
}

fn show(preds: &[Prediction]) -> String {
    preds.iter().map(|p| format!("{:?} {:.1}%", p.token, 100.0 * p.prob)).collect::<Vec<_>>().join(", ")
}

fn print_requests(rows: &[RequestReport]) {
    for r in rows {
        println!("{:?} -> {:?}\n  before: {}\n  after:  {}", r.prompt, r.target_new, show(&r.before), show(&r.after));
    }
}

fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf")
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Writes `src` with `tensors` replaced to `out`, replacing an existing
/// `out` only when `force` (the new folder is complete before the old one
/// goes).
fn write_folder(src: &Path, out: &Path, tensors: &[StoredTensor], force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!("{} already exists; pass --force to replace it, or choose another --out", out.display());
    }
    let fresh = if out.exists() { sibling(out, ".new") } else { out.to_path_buf() };
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh).with_context(|| format!("removing {}", fresh.display()))?;
    }
    write_hf_dir(src, &fresh, tensors).with_context(|| format!("writing {}", fresh.display()))?;
    if fresh != out {
        std::fs::remove_dir_all(out).with_context(|| format!("removing the old {}", out.display()))?;
        std::fs::rename(&fresh, out).with_context(|| format!("renaming {} to {}", fresh.display(), out.display()))?;
    }
    Ok(())
}

pub fn edit(args: EditArgs, json: bool) -> Result<()> {
    let requests = read_requests(&args.requests)?;
    let session = Session::open(&args.model)?;
    let Session { model, tokenizer: tok, .. } = &session;
    for (i, r) in requests.iter().enumerate() {
        r.prepare(i, tok).with_context(|| format!("in {}", args.requests.display()))?;
    }
    let gguf = is_gguf(&session.path);
    let out = match (&args.out, gguf, args.dry_run) {
        (_, _, true) => None,
        (Some(out), true, _) => bail!("--out {}: edited GGUF files are not written; use the patch file with `generate --patch` or `diff`", out.display()),
        (None, true, _) => None,
        (out, false, _) => Some(out.clone().unwrap_or_else(|| sibling(&session.path, "-edited"))),
    };
    if let Some(out) = &out {
        ensure!(args.force || !out.exists(), "{} already exists; pass --force to replace it, or choose another --out", out.display());
    }
    let hp = session.hparams(args.hparams.as_deref())?;
    let (covariances, stats_path) = session.covariances(&hp, &args.stats)?;
    let templates = match args.templates {
        Templates::Plain => vec!["{}".to_string()],
        Templates::Generated => {
            let s = spinner("generating context templates");
            let t = pollster::block_on(context_templates(model, tok, hp.context_template_length, 0))?;
            s.finish_and_clear();
            t
        }
    };
    let prompts: Vec<String> = requests.iter().map(|r| r.prompt.replace("{}", &r.subject)).collect();
    let before = prompts.iter().map(|p| top_predictions(model, tok, p, 3)).collect::<Result<Vec<_>>>()?;
    let mut edited_model = model.clone();
    let mut progress = EditProgress::new();
    let start = Instant::now();
    let outcome = pollster::block_on(apply_memit(&mut edited_model, tok, &requests, &hp, &templates, &covariances, &mut |p| progress.report(p)))?;
    progress.finish();
    let edit_seconds = start.elapsed().as_secs_f64();
    let weak = weak_targets(&outcome.targets);
    for &(i, p) in &weak {
        eprintln!(
            "warning: request {i} ({:?}): the target vector reached only p = {p:.3} for {:?}; this edit will likely not take (try more v_num_grad_steps, a larger clamp_norm_factor, or other layers)",
            requests[i].subject, requests[i].target_new.text
        );
    }
    for u in outcome.updates.iter().filter(|u| u.solve_shift > 0.0) {
        eprintln!(
            "note: layer {}: λC + KKᵀ was numerically singular in f32 (statistics from little or repetitive text); factored with a diagonal shift of {:e} of its mean diagonal and refined in float64 against λC + KKᵀ + 1e-7·(mean diagonal)·I ({} steps)",
            u.layer, u.solve_shift, u.solve_refinements
        );
    }
    let after = prompts.iter().map(|p| top_predictions(&edited_model, tok, p, 3)).collect::<Result<Vec<_>>>()?;
    let rows: Vec<RequestReport> = prompts
        .into_iter()
        .zip(&requests)
        .zip(before.into_iter().zip(after))
        .map(|((prompt, r), (before, after))| RequestReport { prompt, target_new: r.target_new.text.clone(), before, after })
        .collect();

    let mut written = serde_json::Map::new();
    if !args.dry_run {
        let originals = hp.layers.iter().map(|&l| session.stored_mlp_out(l)).collect::<Result<Vec<_>>>()?;
        let layout = model.blocks[hp.layers[0]].mlp_out.layout;
        let (patch, edited) = Patch::build(session.fingerprint.clone(), requests.clone(), serde_json::to_value(&hp)?, &outcome.updates, &originals, layout)?;
        let patch_path = args.patch.clone().unwrap_or_else(|| match &out {
            Some(_) => PathBuf::from("memit-patch.safetensors"),
            None => sibling(&session.path, ".patch.safetensors"),
        });
        if let Some(out) = &out {
            write_folder(&session.path, out, &edited, args.force)?;
            written.insert("model".into(), out.display().to_string().into());
        }
        // A bare file name goes inside the edited folder.
        let patch_path = match (&out, patch_path.parent().is_none_or(|p| p.as_os_str().is_empty())) {
            (Some(out), true) => out.join(patch_path),
            _ => patch_path,
        };
        write_atomic(&patch_path, &patch.to_bytes()?)?;
        written.insert("patch".into(), patch_path.display().to_string().into());
    }
    if json {
        let report = serde_json::json!({
            "layers": hp.layers, "stats": stats_path, "edit_seconds": edit_seconds,
            "phases": outcome.phases,
            "counters": outcome.phases.counters(),
            "solve_shifts": outcome.updates.iter().map(|u| serde_json::json!({"layer": u.layer, "relative_shift": u.solve_shift})).collect::<Vec<_>>(),
            "solves": outcome.updates.iter().map(|u| serde_json::json!({"layer": u.layer, "relative_shift": u.solve_shift, "refinements": u.solve_refinements, "last_correction": u.solve_correction})).collect::<Vec<_>>(),
            "written": written, "edits": rows,
            "weak_targets": weak.iter().map(|&(i, p)| serde_json::json!({"request": i, "target_prob": p})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_requests(&rows);
        println!("edited layers {:?} with {} request(s) in {edit_seconds:.1} s ({})", hp.layers, requests.len(), describe_phases(&outcome.phases));
        for (what, path) in &written {
            println!("wrote {what}: {}", path.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// Whether the model holds a patch's original or edited weights.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Original,
    Edited,
}

/// Reads a patch and checks it against the model's weights.
fn open_patch(session: &Session, path: &Path) -> Result<(Patch, Vec<StoredTensor>, State)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading the patch {}", path.display()))?;
    let patch = Patch::from_bytes(&bytes).with_context(|| format!("patch {}", path.display()))?;
    let current = patch.layers.iter().map(|l| session.stored_mlp_out(l.layer)).collect::<Result<Vec<_>>>()?;
    let all = |f: &dyn Fn(&memit_core::PatchLayer, &str) -> bool| patch.layers.iter().zip(&current).all(|(l, t)| f(l, &t.sha256()));
    let state = if all(&|l, sha| l.base_sha256 == sha) {
        State::Original
    } else if all(&|l, sha| l.edited_sha256 == sha) {
        State::Edited
    } else {
        bail!(
            "patch {} does not fit the model at {}: its weights are neither the ones the patch was made from nor the edited ones (another model, or edited since)",
            path.display(),
            session.path.display()
        );
    };
    Ok((patch, current, state))
}

fn default_patch(model: &Path, patch: Option<PathBuf>) -> PathBuf {
    patch.unwrap_or_else(|| if model.is_dir() { model.join("memit-patch.safetensors") } else { sibling(model, ".patch.safetensors") })
}

/// `apply` (forward) and `revert` (backward).
pub fn apply_or_revert(model: ModelArgs, patch: Option<PathBuf>, dest: Destination, forward: bool, json: bool) -> Result<()> {
    ensure!(!is_gguf(&model.model), "apply/revert rewrite safetensors model folders; for GGUF models use `generate --patch`");
    let patch_path = default_patch(&model.model, patch);
    let session = Session::open(&model)?;
    let (patch, current, state) = open_patch(&session, &patch_path)?;
    let wanted = if forward { State::Original } else { State::Edited };
    if state != wanted {
        bail!("the model at {} {}", session.path.display(), if forward { "already has this patch applied" } else { "does not have this patch applied" });
    }
    let tensors = current.iter().map(|t| if forward { patch.apply_to(t) } else { patch.revert(t) }).collect::<memit_core::Result<Vec<_>>>()?;
    let target = match (&dest.out, dest.in_place) {
        (Some(out), _) => {
            write_folder(&session.path, out, &tensors, false)?;
            out.clone()
        }
        (None, _) => {
            write_hf_dir(&session.path, &session.path, &tensors)?;
            session.path.clone()
        }
    };
    let verb = if forward { "applied" } else { "reverted" };
    if json {
        println!("{}", serde_json::json!({"action": verb, "patch": patch_path, "model": target, "layers": patch.layers.iter().map(|l| l.layer).collect::<Vec<_>>()}));
    } else {
        println!("{verb} {} ({} layer(s), {} request(s)) -> {}", patch_path.display(), patch.layers.len(), patch.requests.len(), target.display());
    }
    Ok(())
}

pub fn diff(model: ModelArgs, patch: Option<PathBuf>, json: bool) -> Result<()> {
    let patch_path = default_patch(&model.model, patch);
    let session = Session::open(&model)?;
    let (patch, current, state) = open_patch(&session, &patch_path)?;
    let originals = match state {
        State::Original => current.clone(),
        State::Edited => current.iter().map(|t| patch.revert(t)).collect::<memit_core::Result<Vec<_>>>()?,
    };
    let edited = match state {
        State::Original => current.iter().map(|t| patch.apply_to(t)).collect::<memit_core::Result<Vec<_>>>()?,
        State::Edited => current.clone(),
    };
    let mut before_model = session.model.clone();
    let mut after_model = session.model.clone();
    for (l, (o, e)) in patch.layers.iter().zip(originals.iter().zip(&edited)) {
        before_model.set_mlp_out(l.layer, &o.to_host())?;
        after_model.set_mlp_out(l.layer, &e.to_host())?;
    }
    let changes = patch.changes(&originals);
    let rows = patch
        .requests
        .iter()
        .map(|r| {
            let prompt = r.prompt.replace("{}", &r.subject);
            Ok(RequestReport {
                before: top_predictions(&before_model, &session.tokenizer, &prompt, 3)?,
                after: top_predictions(&after_model, &session.tokenizer, &prompt, 3)?,
                prompt,
                target_new: r.target_new.text.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if json {
        let report = serde_json::json!({"patch": patch_path, "model_state": format!("{state:?}").to_lowercase(), "hparams": patch.hparams, "layers": changes, "requests": rows});
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("patch {} — the model at {} is {}", patch_path.display(), session.path.display(), if state == State::Edited { "edited" } else { "original" });
        for c in &changes {
            println!("  layer {:>3} {}: rank ≤ {}, ‖ΔW‖ = {:.4}, ‖W‖ = {:.4} ({:.3}%)", c.layer, c.tensor, c.rank_bound, c.delta_norm, c.weight_norm, 100.0 * c.delta_norm / c.weight_norm);
        }
        print_requests(&rows);
    }
    Ok(())
}

pub fn generate(model: ModelArgs, prompt: &str, max_new_tokens: usize, patch: Option<PathBuf>, json: bool) -> Result<()> {
    let mut session = Session::open(&model)?;
    if let Some(path) = &patch {
        let (patch, current, state) = open_patch(&session, path)?;
        if state == State::Original {
            for (l, t) in patch.layers.iter().zip(&current) {
                let edited = patch.apply_to(t)?;
                session.model.set_mlp_out(l.layer, &edited.to_host())?;
            }
        } else {
            eprintln!("note: the model already has {} applied", path.display());
        }
    }
    let tok = &session.tokenizer;
    let ids = tok.encode(prompt)?;
    ensure!(!ids.is_empty(), "the prompt tokenises to nothing");
    let options = GenerateOptions { max_new_tokens, sampling: Sampling::Greedy, stop_at_eos: true };
    let new = pollster::block_on(session.model.generate(&[ids], options))?.remove(0);
    let text = tok.decode(&new)?;
    if json {
        println!("{}", serde_json::json!({"prompt": prompt, "continuation": text, "token_ids": new}));
    } else {
        println!("{prompt}{text}");
    }
    Ok(())
}
