//! `edit`, `apply`, `revert`, `diff` and `generate`: making patches and
//! moving models between their original and edited states.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use memit_core::{apply_edit, context_templates, parse_requests, EditRequest, EditState, Patch};
use memit_eval::target_nll;
use memit_models::{write_hf_dir, GenerateOptions, Model, Sampling, StoredTensor, TextTokenizer};
use serde::Serialize;

use crate::plan::{self, Preflight};
use crate::session::{check_writable, describe_phases, spinner, write_atomic, EditProgress, MethodArg, ModelArgs, Session, StatsArgs};

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
    /// How each layer's update is solved. In one edit memit-seq equals
    /// memit (it differs from the second edit of a sequential run on).
    #[arg(long, value_enum, default_value_t = MethodArg::Memit)]
    pub method: MethodArg,
    /// Edited model folder to write (default: <model>-edited). Only for
    /// safetensors models; GGUF models get the patch file only.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Patch file to write (default: memit-patch.safetensors inside the
    /// edited folder, or <model>.patch.safetensors for GGUF).
    #[arg(long)]
    pub patch: Option<PathBuf>,
    /// Replace an existing output folder that an earlier `edit` wrote.
    #[arg(long)]
    pub force: bool,
    /// Replace an existing patch file given by --patch.
    #[arg(long)]
    pub replace_patch: bool,
    /// Edit in memory and show the predictions only; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// GPU memory budget (e.g. 48GiB): stop before loading when the
    /// memory plan does not fit it.
    #[arg(long)]
    pub gpu_memory: Option<String>,
    /// GPU memory one batch of target-vector optimisation may use
    /// (activations, logits and their gradients); smaller means fewer
    /// requests per batch, the same results.
    #[arg(long, default_value = "1GiB")]
    pub target_batch_memory: String,
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

/// Whether one edit took, by CounterFact's efficacy test: after the edit,
/// the new object is more likely than the original one (`target_true`, or
/// the model's own first prediction when the request does not name it).
/// Probabilities are per token (exp of the mean NLL), as in the paper.
#[derive(Serialize)]
struct Outcome {
    took: bool,
    original: String,
    p_new_before: f32,
    p_new_after: f32,
    p_original_after: f32,
}

/// The efficacy test of every request: P(new target) against P(original)
/// after each prompt, scored on the model before and after the edit.
struct EfficacyTests {
    /// The original answer of each request: its `target_true`, else the
    /// unedited model's top prediction.
    originals: Vec<String>,
    /// (prompt, new target), (prompt, original) for each request.
    pairs: Vec<(String, String)>,
}

impl EfficacyTests {
    fn new(requests: &[EditRequest], prompts: &[String], before: &[Vec<Prediction>]) -> EfficacyTests {
        let originals: Vec<String> = requests.iter().zip(before).map(|(r, b)| r.target_true.as_ref().map_or_else(|| b[0].token.clone(), |t| t.text.clone())).collect();
        let pairs = prompts.iter().zip(requests.iter().zip(&originals)).flat_map(|(p, (r, o))| [(p.clone(), r.target_new.text.clone()), (p.clone(), o.clone())]).collect();
        EfficacyTests { originals, pairs }
    }

    /// The outcomes from the pairs' mean NLL per token before and after.
    fn outcomes(self, requests: &[EditRequest], nll_before: &[f32], nll_after: &[f32]) -> Vec<Outcome> {
        let p = |nll: f32| (-nll).exp();
        self.originals
            .into_iter()
            .zip(requests)
            .enumerate()
            .map(|(i, (original, r))| {
                let same = original.trim() == r.target_new.text.trim();
                Outcome { took: same || nll_after[2 * i] < nll_after[2 * i + 1], original, p_new_before: p(nll_before[2 * i]), p_new_after: p(nll_after[2 * i]), p_original_after: p(nll_after[2 * i + 1]) }
            })
            .collect()
    }
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
    let requests = parse_requests(&text).with_context(|| format!("{} is not a JSON list of MEMIT requests ({{\"prompt\", \"subject\", \"target_new\": {{\"str\"}}}}) or EasyEdit's lists", path.display()))?;
    ensure!(!requests.is_empty(), "{} holds no requests", path.display());
    Ok(requests)
}

fn show(preds: &[Prediction]) -> String {
    preds.iter().map(|p| format!("{:?} {:.1}%", p.token, 100.0 * p.prob)).collect::<Vec<_>>().join(", ")
}

fn print_request(r: &RequestReport) {
    println!("{:?} -> {:?}\n  before: {}\n  after:  {}", r.prompt, r.target_new, show(&r.before), show(&r.after));
}

fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf")
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// The file `edit` leaves in every folder it writes: `--force` replaces
/// only folders that hold it, never one the user made.
const EDIT_MARKER: &str = ".memit-wgpu-edit";

/// `path` with `..`, `.` and symlinks resolved as far as it exists (a path
/// that does not exist yet resolves through its parent).
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => resolved(parent).join(name),
        _ => absolute,
    }
}

/// Checks, before any work, that `edit` may write the folder `out` for the
/// model at `model`: a new path, or (with `force`) a folder an earlier
/// `edit` wrote that neither is nor contains the model.
fn check_edit_out(model: &Path, out: &Path, force: bool) -> Result<()> {
    let (model, target) = (resolved(model), resolved(out));
    if out.file_name().is_none() || std::env::current_dir().is_ok_and(|cwd| resolved(&cwd).starts_with(&target)) {
        bail!("--out {} is the working directory or a folder above it; name a new folder", out.display());
    }
    if model == target {
        bail!("--out {} is the input model: an edit never replaces its own input", out.display());
    }
    if model.starts_with(&target) {
        bail!("--out {} is a folder holding the input model: an edit never replaces its own input", out.display());
    }
    if !out.exists() {
        return Ok(());
    }
    if !force {
        bail!("{} already exists; pass --force to replace a folder an earlier edit wrote, or choose another --out", out.display());
    }
    if !out.join(EDIT_MARKER).is_file() {
        bail!("--force replaces only folders that `memit-wgpu edit` wrote (they hold {EDIT_MARKER}); {} is not one: choose another --out", out.display());
    }
    Ok(())
}

/// Where a patch may be written: never over a file of the input model, and
/// over an existing patch only when `replace` (a file that is not a patch
/// is never replaced).
fn check_patch_path(model: &Path, patch: &Path, replace: bool) -> Result<()> {
    let (model, target) = (resolved(model), resolved(patch));
    if target == model || (model.is_dir() && target.starts_with(&model)) {
        bail!("--patch {} is inside the input model; write the patch elsewhere", patch.display());
    }
    if patch.exists() {
        if !is_patch_file(patch) {
            bail!("--patch {} exists and is not a patch file; it is never overwritten: choose another --patch", patch.display());
        }
        if !replace {
            bail!("the patch {} already exists (it may be the only way back from an earlier edit); pass --replace-patch to replace it, or choose another --patch", patch.display());
        }
    }
    Ok(())
}

/// Whether `path` is a regular file whose safetensors header names a
/// memit-wgpu patch format (read from the header alone, whatever the size).
fn is_patch_file(path: &Path) -> bool {
    use std::io::Read;
    let header = || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(path)?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len).min(1 << 24) as usize;
        let mut header = vec![0u8; len];
        f.read_exact(&mut header)?;
        Ok(header)
    };
    path.is_file() && header().is_ok_and(|h| String::from_utf8_lossy(&h).contains("\"memit-wgpu-patch-v"))
}

/// The names `write_folder` swaps a replaced `out` through: the complete
/// new folder, then the old one moved aside. Fixed names (no PID), so a run
/// killed between the renames is finished by the next one.
fn swap_names(out: &Path) -> (PathBuf, PathBuf) {
    let name = out.file_name().unwrap_or_default().to_string_lossy().to_string();
    (out.with_file_name(format!(".{name}.memit-new")), out.with_file_name(format!(".{name}.memit-old")))
}

/// Finishes a replacement of `out` that a killed `edit --force` left:
/// with `out` gone, the complete new folder (it holds the marker) goes into
/// place, else the old one comes back; then the leftovers are removed
/// (only folders of these names that hold the marker: ours). Returns what
/// it did, for a note.
fn finish_interrupted_swap(out: &Path) -> Result<Option<String>> {
    let (fresh, old) = swap_names(out);
    let ours = |p: &Path| p.join(EDIT_MARKER).is_file();
    let mut done = None;
    if !out.exists() {
        for (from, what) in [(&fresh, "the new edited folder moved into place"), (&old, "the previous edited folder restored")] {
            if ours(from) {
                std::fs::rename(from, out).with_context(|| format!("moving {} to {}", from.display(), out.display()))?;
                done = Some(format!("an interrupted `edit --force` into {} was finished: {what}", out.display()));
                break;
            }
        }
    }
    for leftover in [&fresh, &old] {
        if ours(leftover) {
            std::fs::remove_dir_all(leftover).with_context(|| format!("removing the leftover {}", leftover.display()))?;
        }
    }
    Ok(done)
}

/// Writes `src` with `tensors` replaced, and `extra_files`, to the new
/// folder `out`; with `replace`, an existing `out` is swapped out only once
/// the new folder is complete, so one of the two is always whole on disk
/// (and `finish_interrupted_swap` puts it in place after a kill).
fn write_folder(src: &Path, out: &Path, tensors: &[StoredTensor], extra_files: &[(&str, &[u8])], replace: bool) -> Result<()> {
    if !replace {
        ensure!(!out.exists(), "{} already exists; choose another --out", out.display());
        return write_hf_dir(src, out, tensors, extra_files).with_context(|| format!("writing {}", out.display()));
    }
    let (fresh, old) = swap_names(out);
    write_hf_dir(src, &fresh, tensors, extra_files).with_context(|| format!("writing {}", fresh.display()))?;
    std::fs::rename(out, &old).with_context(|| format!("moving the old {} aside", out.display()))?;
    std::fs::rename(&fresh, out).with_context(|| format!("renaming {} to {} (the old folder is at {})", fresh.display(), out.display(), old.display()))?;
    std::fs::remove_dir_all(&old).with_context(|| format!("removing the old {}", old.display()))
}

pub fn edit(args: EditArgs, json: bool) -> Result<()> {
    let requests = read_requests(&args.requests)?;
    let planned = Preflight {
        model: &args.model.model,
        f16: args.model.f16,
        streamed_blocks: args.model.stream_blocks,
        hparams: args.hparams.as_deref(),
        gpu_memory: args.gpu_memory.as_deref(),
        target: plan::target_options(&args.target_batch_memory)?,
        max_len: args.stats.max_len,
        requests: Some((&requests, args.templates)),
        method: args.method.method(),
    };
    // Statistics run on the blocks up to the last edited layer; the rest of
    // the model is loaded once they are at hand.
    let hp = plan::hparams_of(&args.model.model, args.hparams.as_deref())?;
    let mut session = Session::open_checked(&args.model, Some(hp.last_layer() + 1), |ctx| plan::preflight(&planned, ctx))?;
    let tok = &session.tokenizer;
    for (i, r) in requests.iter().enumerate() {
        r.prepare(i, tok).with_context(|| format!("in {}", args.requests.display()))?;
    }
    let gguf = is_gguf(&session.path);
    let out = match (&args.out, gguf, args.dry_run) {
        (_, _, true) => None,
        (Some(out), true, _) => bail!("--out {}: edited GGUF files are not written; use the patch file with `generate --patch` or `diff`", out.display()),
        (None, true, _) => None,
        (out, false, _) => Some(out.clone().unwrap_or_else(|| sibling(&resolved(&session.path), "-edited"))),
    };
    // The patch goes inside the edited folder unless --patch names a path
    // with a folder; a GGUF model gets it beside the file.
    let patch_path = match (&args.patch, &out) {
        (Some(p), Some(out)) if p.parent().is_none_or(|d| d.as_os_str().is_empty()) => out.join(p),
        (Some(p), _) => p.clone(),
        (None, Some(out)) => out.join(PATCH_NAME),
        (None, None) => sibling(&session.path, ".patch.safetensors"),
    };
    // Everything about where the edit writes is settled here, before any
    // work: the patch's name when it goes inside the edited folder, and
    // whether that folder already exists (and so is replaced).
    let mut patch_inside: Option<String> = None;
    let mut out_existed = false;
    if !args.dry_run {
        if let Some(out) = &out {
            if let Some(note) = finish_interrupted_swap(out)? {
                eprintln!("note: {note}");
            }
            check_edit_out(&session.path, out, args.force)?;
            check_writable(out, "--out")?;
            out_existed = out.exists();
            let (out_at, patch_at) = (resolved(out), resolved(&patch_path));
            if patch_at.starts_with(&out_at) {
                ensure!(patch_at.parent() == Some(out_at.as_path()), "--patch {}: a patch inside --out goes directly in it, not in a subfolder", patch_path.display());
                let name = patch_at.file_name().and_then(|n| n.to_str()).context("--patch needs a file name")?.to_string();
                let inherited_patch = name == PATCH_NAME && is_patch_file(&session.path.join(&name));
                if name == EDIT_MARKER || (session.path.join(&name).exists() && !inherited_patch) || stack_level(&name).is_some_and(|n| n > 0) {
                    bail!("--patch {name} would overwrite a file of the edited model or of its patch stack; choose another name");
                }
                patch_inside = Some(name);
            }
            // Replacing the folder drops the patches in it.
            if out_existed && !args.replace_patch {
                let held = std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))?.filter_map(|e| e.ok().map(|e| e.path())).find(|p| is_patch_file(p));
                if let Some(held) = held {
                    bail!("{} holds the patch {} (it may be the only way back from that edit); pass --replace-patch with --force to replace the folder and its patch, or choose another --out", out.display(), held.display());
                }
            }
        }
        if patch_inside.is_none() {
            check_patch_path(&session.path, &patch_path, args.replace_patch)?;
            check_writable(&patch_path, "--patch")?;
        }
    }
    let (covariances, stats_path) = session.covariances(&hp, &args.stats)?;
    session.load_remaining()?;
    let (model, tok) = (&session.model, &session.tokenizer);
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
    // Scored before the edit, which then runs on the model in place: the
    // unedited W_out are not held beside the new ones.
    let tests = EfficacyTests::new(&requests, &prompts, &before);
    let nll_before = pollster::block_on(target_nll(model, tok, &tests.pairs))?;
    let mut progress = EditProgress::new();
    let start = Instant::now();
    let method = args.method.method();
    let mut state = pollster::block_on(EditState::new(&session.model.ctx, method, &hp, &covariances, &mut |p| progress.report(p)))?;
    let outcome = pollster::block_on(apply_edit(&mut session.model, tok, &requests, &hp, &templates, &covariances, &mut state, &planned.target, &mut |p| progress.report(p)))?;
    let edited_model = &session.model;
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
            "note: layer {}: λC + KKᵀ was numerically singular in f32 (statistics from little or repetitive text); factored with a diagonal shift of {:e} of its mean diagonal and refined in float64 against λC + KKᵀ + {:e}·(mean diagonal)·I ({} steps)",
            u.layer, u.solve_shift, u.solve_ridge, u.solve_refinements
        );
    }
    let after = prompts.iter().map(|p| top_predictions(edited_model, tok, p, 3)).collect::<Result<Vec<_>>>()?;
    let nll_after = pollster::block_on(target_nll(edited_model, tok, &tests.pairs))?;
    let outcomes = tests.outcomes(&requests, &nll_before, &nll_after);
    for (i, o) in outcomes.iter().enumerate().filter(|(_, o)| !o.took) {
        eprintln!(
            "warning: request {i} ({:?} -> {:?}) did not take: after the edit P({:?}) = {:.3} per token, below P({:?}) = {:.3}. Causes seen: a large mom2_update_weight (λ), too few v_num_grad_steps or a tight clamp_norm_factor, generated context templates that dilute the prompt, or layers where this model does not store the fact",
            requests[i].subject, requests[i].target_new.text, requests[i].target_new.text, o.p_new_after, o.original, o.p_original_after
        );
    }
    let rows: Vec<RequestReport> = prompts
        .into_iter()
        .zip(&requests)
        .zip(before.into_iter().zip(after))
        .map(|((prompt, r), (before, after))| RequestReport { prompt, target_new: r.target_new.text.clone(), before, after })
        .collect();

    let mut written = serde_json::Map::new();
    if !args.dry_run {
        let originals = hp.layers.iter().map(|&l| session.stored_mlp_out(l)).collect::<Result<Vec<_>>>()?;
        let layout = edited_model.blocks[hp.layers[0]].mlp_out.layout;
        let mut recorded = serde_json::to_value(&hp)?;
        recorded["method"] = method.name().into();
        let (patch, edited) = Patch::build(session.fingerprint.clone(), requests.clone(), recorded, &outcome.updates, &originals, layout)?;
        let patch_bytes = patch.to_bytes()?;
        // A patch outside the folder is written first: a folder never
        // appears on disk without the patch that undoes it.
        if patch_inside.is_none() {
            write_atomic(&patch_path, &patch_bytes)?;
        }
        if let Some(out) = &out {
            // The folder may not have changed state during the edit.
            if out.exists() != out_existed || (out_existed && !out.join(EDIT_MARKER).is_file()) {
                bail!("{} changed while the edit ran (it appeared, vanished or lost its {EDIT_MARKER}); nothing was written there", out.display());
            }
            let marker = format!("written by memit-wgpu edit from {}\n", resolved(&session.path).display());
            // An edited folder edited again keeps the patches it holds, one
            // level down the stack, under the new one.
            let stack = if patch_inside.as_deref() == Some(PATCH_NAME) { pushed_stack(&session.path)? } else { Vec::new() };
            let mut extra: Vec<(&str, &[u8])> = vec![(EDIT_MARKER, marker.as_bytes())];
            extra.extend(stack.iter().map(|(name, bytes)| (name.as_str(), bytes.as_slice())));
            extra.extend(patch_inside.as_deref().map(|name| (name, patch_bytes.as_slice())));
            write_folder(&session.path, out, &edited, &extra, out_existed)?;
            written.insert("model".into(), out.display().to_string().into());
        }
        written.insert("patch".into(), patch_path.display().to_string().into());
    }
    if json {
        let report = serde_json::json!({
            "method": method.name(), "null_space_dimensions": state.null_space_dimensions(), "layers": hp.layers, "stats": stats_path, "edit_seconds": edit_seconds,
            "phases": outcome.phases,
            "counters": outcome.phases.counters(),
            "solve_shifts": outcome.updates.iter().map(|u| serde_json::json!({"layer": u.layer, "relative_shift": u.solve_shift})).collect::<Vec<_>>(),
            "solves": outcome.updates.iter().map(|u| serde_json::json!({"layer": u.layer, "relative_shift": u.solve_shift, "relative_ridge": u.solve_ridge, "refinements": u.solve_refinements, "last_correction": u.solve_correction})).collect::<Vec<_>>(),
            "written": written, "edits": rows,
            "weak_targets": weak.iter().map(|&(i, p)| serde_json::json!({"request": i, "target_prob": p})).collect::<Vec<_>>(),
            "outcomes": outcomes,
            "took": outcomes.iter().filter(|o| o.took).count(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (r, o) in rows.iter().zip(&outcomes) {
            print_request(r);
            let verdict = if o.took { "took" } else { "DID NOT TAKE" };
            println!("  {verdict}: P(new) {:.3} -> {:.3} per token; P({:?}) after {:.3}", o.p_new_before, o.p_new_after, o.original, o.p_original_after);
        }
        let took = outcomes.iter().filter(|o| o.took).count();
        println!("{took} of {} edit(s) took; {} edited layers {:?} in {edit_seconds:.1} s ({})", requests.len(), method.name(), hp.layers, describe_phases(&outcome.phases));
        for (layer, dimension) in state.null_space_dimensions() {
            println!("layer {layer}: null space of {dimension:.0} dimensions (eigenvalues of C under {:e})", hp.nullspace_threshold);
        }
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

/// A patch, the model's current weights of its layers, and which of the
/// patch's two sides they are (None: neither).
type PatchFit = (Patch, Vec<StoredTensor>, Option<State>);

fn read_patch(session: &Session, path: &Path) -> Result<PatchFit> {
    let bytes = std::fs::read(path).with_context(|| format!("reading the patch {}", path.display()))?;
    let patch = Patch::from_bytes(&bytes).with_context(|| format!("patch {}", path.display()))?;
    let current = patch.layers.iter().map(|l| session.stored_mlp_out(l.layer)).collect::<Result<Vec<_>>>()?;
    let all = |f: &dyn Fn(&memit_core::PatchLayer, &str) -> bool| patch.layers.iter().zip(&current).all(|(l, t)| f(l, &t.sha256()));
    let state = if all(&|l, sha| l.base_sha256 == sha) {
        Some(State::Original)
    } else if all(&|l, sha| l.edited_sha256 == sha) {
        Some(State::Edited)
    } else {
        None
    };
    Ok((patch, current, state))
}

/// Reads a patch and checks it against the model's weights.
fn open_patch(session: &Session, path: &Path) -> Result<(Patch, Vec<StoredTensor>, State)> {
    match read_patch(session, path)? {
        (patch, current, Some(state)) => Ok((patch, current, state)),
        (_, _, None) => bail!(
            "patch {} does not fit the model at {}: its weights are neither the ones the patch was made from nor the edited ones (another model, or edited since)",
            path.display(),
            session.path.display()
        ),
    }
}

/// The patch file an edit writes into its folder; the top of the stack.
const PATCH_NAME: &str = "memit-patch.safetensors";

/// Level of a stack file: 0 for `memit-patch.safetensors`, n for
/// `memit-patch.n.safetensors` (the patch n edits below the newest).
fn stack_level(name: &str) -> Option<usize> {
    if name == PATCH_NAME {
        return Some(0);
    }
    name.strip_prefix("memit-patch.")?.strip_suffix(".safetensors")?.parse().ok().filter(|&n| n > 0)
}

fn stack_name(level: usize) -> String {
    if level == 0 { PATCH_NAME.to_string() } else { format!("memit-patch.{level}.safetensors") }
}

/// The patch stack of a model folder, newest first: the patches of the
/// edits that led to it, each made on the model the one after it left.
fn patch_stack(dir: &Path) -> Vec<PathBuf> {
    (0..).map(|level| dir.join(stack_name(level))).take_while(|p| p.is_file()).collect()
}

/// The stack of `dir` one level down (each file's new name and bytes),
/// making room for a new patch on top.
fn pushed_stack(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    patch_stack(dir)
        .iter()
        .enumerate()
        .map(|(level, path)| Ok((stack_name(level + 1), std::fs::read(path).with_context(|| format!("reading the patch {}", path.display()))?)))
        .collect()
}

fn default_patch(model: &Path, patch: Option<PathBuf>) -> PathBuf {
    patch.unwrap_or_else(|| if model.is_dir() { model.join(PATCH_NAME) } else { sibling(model, ".patch.safetensors") })
}

/// The patch `apply`/`revert` use without `--patch`: in a folder whose
/// stack holds several, `revert` undoes the newest one still applied and
/// `apply` redoes the oldest one not applied, so repeated calls walk the
/// stack in order.
fn stack_patch(session: &Session, model: &Path, forward: bool) -> Result<PathBuf> {
    let stack = if model.is_dir() { patch_stack(model) } else { Vec::new() };
    if stack.len() < 2 {
        return Ok(default_patch(model, None));
    }
    let wanted = if forward { State::Original } else { State::Edited };
    let order: Vec<&PathBuf> = if forward { stack.iter().rev().collect() } else { stack.iter().collect() };
    for path in order {
        if read_patch(session, path)?.2 == Some(wanted) {
            return Ok(path.clone());
        }
    }
    bail!(
        "none of the {} patches of {}'s stack {} (the weights match no step of it)",
        stack.len(),
        model.display(),
        if forward { "can be applied: they are all applied" } else { "is applied: the model is the original one" }
    )
}

/// `apply` (forward) and `revert` (backward).
pub fn apply_or_revert(model: ModelArgs, patch: Option<PathBuf>, dest: Destination, forward: bool, json: bool) -> Result<()> {
    ensure!(!is_gguf(&model.model), "apply/revert rewrite safetensors model folders; for GGUF models use `generate --patch`");
    let session = Session::open(&model)?;
    let patch_path = match patch {
        Some(path) => path,
        None => stack_patch(&session, &model.model, forward)?,
    };
    let (patch, current, state) = open_patch(&session, &patch_path)?;
    let wanted = if forward { State::Original } else { State::Edited };
    if state != wanted {
        bail!("the model at {} {}", session.path.display(), if forward { "already has this patch applied" } else { "does not have this patch applied" });
    }
    let tensors = current.iter().map(|t| if forward { patch.apply_to(t) } else { patch.revert(t) }).collect::<memit_core::Result<Vec<_>>>()?;
    let target = match (&dest.out, dest.in_place) {
        (Some(out), _) => {
            write_folder(&session.path, out, &tensors, &[], false)?;
            out.clone()
        }
        (None, _) => {
            write_hf_dir(&session.path, &session.path, &tensors, &[])?;
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
        rows.iter().for_each(print_request);
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
