//! `memit-bench counterfact`: statistics, a batch of CounterFact edits and
//! the paper's scores before and after, with the time of each phase. The
//! target vectors are computed once; the layer spread is repeated for each
//! λ asked for, so one run compares covariance weights.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use memit_core::{compute_targets_with, context_templates, spread_over_layers, EditState, Hparams, PhaseCounters, StatsAccumulator, StatsIdentity, TargetOptions};
use memit_eval::{score_counterfact, summarize, CounterFactCase, CounterFactSummary};
use memit_gpu::GpuContext;
use memit_models::{load_model_path, LoadOptions, Model, TextTokenizer};
use serde::Serialize;

use crate::{adapter_report, write_report, AdapterReport};

pub struct Options {
    pub model: PathBuf,
    pub dataset: PathBuf,
    pub corpus: PathBuf,
    pub n_edits: usize,
    pub offset: usize,
    /// λ values to compare; empty: the model's preset.
    pub lambdas: Vec<f32>,
    pub stats_texts: usize,
    pub max_len: usize,
    /// Run every prompt row in every target-vector step.
    pub no_prefix_cache: bool,
    pub out: PathBuf,
}

#[derive(Serialize)]
struct Report {
    adapter: AdapterReport,
    model: String,
    /// The preset; `after` rows differ from it in λ only.
    hparams: Hparams,
    cases: std::ops::Range<usize>,
    stats_tokens: u64,
    /// Mean probability of the new target under z (the last optimisation
    /// step), and how many z reached p > 0.5.
    target_prob_mean: f32,
    targets_reached: usize,
    seconds: Phases,
    /// Whether target-vector steps ran only the rows from each subject on.
    prefix_cache: bool,
    target_vector_counters: PhaseCounters,
    before: CounterFactSummary,
    after: Vec<AfterEdit>,
}

#[derive(Serialize)]
struct AfterEdit {
    mom2_update_weight: f32,
    layer_updates_seconds: f64,
    /// Keys, solve and update, by phase.
    counters: std::collections::BTreeMap<&'static str, PhaseCounters>,
    scores: CounterFactSummary,
}

#[derive(Serialize, Default)]
struct Phases {
    load: f64,
    stats: f64,
    templates: f64,
    target_vectors: f64,
    evaluation: f64,
}

fn load(ctx: &std::sync::Arc<GpuContext>, path: &Path) -> Result<(Model, TextTokenizer)> {
    let loaded = load_model_path(ctx.clone(), path, LoadOptions::default())?;
    let tokenizer = loaded.tokenizer.with_context(|| format!("{} has no tokenizer.json", path.display()))?;
    Ok((loaded.model, tokenizer))
}

pub fn run(o: Options) -> Result<()> {
    let ctx = pollster::block_on(GpuContext::from_env()).context("opening a GPU adapter")?;
    let mut phases = Phases::default();
    let t = Instant::now();
    let (model, tok) = load(&ctx, &o.model).with_context(|| format!("loading {}", o.model.display()))?;
    phases.load = t.elapsed().as_secs_f64();
    let hp = Hparams::for_model(&model.config);

    let texts: Vec<String> = std::fs::read_to_string(&o.corpus)
        .with_context(|| format!("reading {}", o.corpus.display()))?
        .lines()
        .filter(|l| l.trim().len() > 40)
        .take(o.stats_texts)
        .map(String::from)
        .collect();
    let t = Instant::now();
    let identity = StatsIdentity { model_id: o.model.display().to_string(), corpus_id: o.corpus.display().to_string(), layers: hp.layers.clone(), max_len: o.max_len };
    let mut stats = StatsAccumulator::new(&model, identity)?;
    for (i, batch) in texts.chunks(8).enumerate() {
        stats.add_texts(&model, &tok, batch)?;
        eprint!("\rstats: {}/{} texts, {} tokens", ((i + 1) * 8).min(texts.len()), texts.len(), stats.n_tokens);
    }
    let covs = pollster::block_on(stats.covariances(&model))?;
    phases.stats = t.elapsed().as_secs_f64();
    eprintln!();

    let t = Instant::now();
    let templates = pollster::block_on(context_templates(&model, &tok, hp.context_template_length, 0))?;
    phases.templates = t.elapsed().as_secs_f64();

    let cases: Vec<CounterFactCase> = serde_json::from_str::<Vec<CounterFactCase>>(&std::fs::read_to_string(&o.dataset)?)
        .with_context(|| format!("parsing {}", o.dataset.display()))?
        .into_iter()
        .skip(o.offset)
        .take(o.n_edits)
        .collect();
    let t = Instant::now();
    let before = summarize(&pollster::block_on(score_counterfact(&model, &tok, &cases))?);
    phases.evaluation = t.elapsed().as_secs_f64();

    let requests: Vec<_> = cases.iter().map(CounterFactCase::request).collect();
    let options = TargetOptions { prefix_cache: !o.no_prefix_cache, ..Default::default() };
    let (prepared, targets, cost) = pollster::block_on(compute_targets_with(&model, &tok, &requests, &hp, &templates, &options, &mut |p| {
        eprint!("\r{}: {}/{}   ", p.stage, p.done, p.total);
    }))?;
    eprintln!();
    phases.target_vectors = cost.seconds;
    let target_counters = cost.counters;
    let final_probs: Vec<f32> = targets.iter().map(|t| t.losses.last().map_or(0.0, |l| l.target_prob)).collect();
    eprintln!("before: {before:?}");

    let lambdas = if o.lambdas.is_empty() { vec![hp.mom2_update_weight] } else { o.lambdas.clone() };
    let mut after = Vec::new();
    for lambda in lambdas {
        let hp_lambda = Hparams { mom2_update_weight: lambda, ..hp.clone() };
        let mut edited = model.clone();
        let t = Instant::now();
        let (_, layer_phases) = pollster::block_on(spread_over_layers(&mut edited, &tok, &prepared, &targets, &hp_lambda, &templates, &covs, &mut EditState::memit(), &mut |_| {}))?;
        let layer_updates_seconds = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let scores = summarize(&pollster::block_on(score_counterfact(&edited, &tok, &cases))?);
        phases.evaluation += t.elapsed().as_secs_f64();
        eprintln!("after, λ = {lambda}: {scores:?}");
        after.push(AfterEdit { mom2_update_weight: lambda, layer_updates_seconds, counters: layer_phases.counters(), scores });
    }
    let report = Report {
        adapter: adapter_report(&ctx),
        model: o.model.display().to_string(),
        hparams: hp,
        cases: o.offset..o.offset + cases.len(),
        stats_tokens: stats.n_tokens,
        target_prob_mean: final_probs.iter().sum::<f32>() / final_probs.len() as f32,
        targets_reached: final_probs.iter().filter(|&&p| p > 0.5).count(),
        seconds: phases,
        prefix_cache: options.prefix_cache,
        target_vector_counters: target_counters,
        before,
        after,
    };
    write_report(&o.out, &report)
}
