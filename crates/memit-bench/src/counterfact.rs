//! `memit-bench counterfact`: statistics, a batch of CounterFact edits and
//! the paper's scores before and after, with the time of each phase.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use memit_core::{apply_memit, context_templates, Hparams, StatsAccumulator, StatsIdentity};
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
    pub stats_texts: usize,
    pub max_len: usize,
    pub out: PathBuf,
}

#[derive(Serialize)]
struct Report {
    adapter: AdapterReport,
    model: String,
    hparams: Hparams,
    stats_tokens: u64,
    seconds: Phases,
    before: CounterFactSummary,
    after: CounterFactSummary,
}

#[derive(Serialize, Default)]
struct Phases {
    load: f64,
    stats: f64,
    templates: f64,
    target_vectors: f64,
    layer_updates: f64,
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
    let (mut model, tok) = load(&ctx, &o.model).with_context(|| format!("loading {}", o.model.display()))?;
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
        .take(o.n_edits)
        .collect();
    let t = Instant::now();
    let before = summarize(&pollster::block_on(score_counterfact(&model, &tok, &cases))?);
    let mut evaluation = t.elapsed().as_secs_f64();

    let requests: Vec<_> = cases.iter().map(CounterFactCase::request).collect();
    let t = Instant::now();
    let mut layers_started = None;
    pollster::block_on(apply_memit(&mut model, &tok, &requests, &hp, &templates, &covs, &mut |p| {
        eprint!("\r{}: {}/{}   ", p.stage, p.done, p.total);
        if p.stage == "layers" && layers_started.is_none() {
            layers_started = Some(Instant::now());
        }
    }))?;
    eprintln!();
    let layers_started = layers_started.unwrap_or_else(Instant::now);
    phases.target_vectors = (layers_started - t).as_secs_f64();
    phases.layer_updates = layers_started.elapsed().as_secs_f64();

    let t = Instant::now();
    let after = summarize(&pollster::block_on(score_counterfact(&model, &tok, &cases))?);
    evaluation += t.elapsed().as_secs_f64();
    phases.evaluation = evaluation;
    eprintln!("before: {before:?}\nafter:  {after:?}");
    let report = Report {
        adapter: adapter_report(&ctx),
        model: o.model.display().to_string(),
        hparams: hp,
        stats_tokens: stats.n_tokens,
        seconds: phases,
        before,
        after,
    };
    write_report(&o.out, &report)
}
