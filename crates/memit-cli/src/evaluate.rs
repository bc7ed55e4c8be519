//! `eval`: edit a slice of CounterFact or zsRE and score it with the MEMIT
//! paper's metrics, in batches of several sizes or sequentially, with a
//! JSON report and an SVG plot of scores against the number of edits.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use memit_core::{apply_edit, context_templates, EditMethod, EditRequest, EditState, Phases, TargetOptions};
use memit_eval::{mean_generation_entropy, score_counterfact, score_zsre, summarize, summarize_zsre, CounterFactCase, ZsreRecord, ZsreTarget};
use memit_models::{Model, TextTokenizer};
use serde::Serialize;

use crate::patching::Templates;
use crate::plot::{line_chart, Series};
use crate::session::{spinner, write_atomic, EditProgress, MethodArg, ModelArgs, Session, StatsArgs};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    Counterfact,
    Zsre,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each size in --sizes edited at once, from the unedited model.
    Batch,
    /// --chunk edits at a time, one batch after another on the same model.
    Sequential,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, value_enum)]
    pub dataset: Dataset,
    /// The dataset file (MEMIT's CounterFact records, or MEND's zsRE records).
    #[arg(long)]
    pub data: PathBuf,
    /// Number of cases to edit and score.
    #[arg(long, default_value_t = 10)]
    pub n: usize,
    /// Skip this many cases first.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    #[arg(long, value_enum, default_value_t = Mode::Batch)]
    pub mode: Mode,
    /// Batch mode: the numbers of edits to make at once (default: --n).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Sequential mode: edits per step.
    #[arg(long, default_value_t = 1)]
    pub chunk: usize,
    #[command(flatten)]
    pub stats: StatsArgs,
    /// A preset name or a JSON file overriding the model's preset.
    #[arg(long)]
    pub hparams: Option<String>,
    #[arg(long, value_enum, default_value_t = Templates::Generated)]
    pub templates: Templates,
    /// Editing methods to compare, each from the unedited model (e.g.
    /// memit,memit-seq,alphaedit); sequential mode keeps each method's
    /// state across its steps.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "memit")]
    pub method: Vec<MethodArg>,
    /// zsRE: the answer each edit teaches: `answer` (answers[0], as the
    /// MEMIT and AlphaEdit authors) or `alt` (MEND's counterfactual).
    #[arg(long, value_enum, default_value_t = ZsreTargetArg::Answer)]
    pub zsre_target: ZsreTargetArg,
    /// Tokens generated per prompt for the generation entropy (CounterFact;
    /// the paper's 100; 0 skips it).
    #[arg(long, default_value_t = 100)]
    pub gen_tokens: usize,
    /// JSON report path.
    #[arg(long, default_value = "memit-eval.json")]
    pub report: PathBuf,
    /// SVG plot of the scores against the number of edits.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ZsreTargetArg {
    Answer,
    Alt,
}

impl ZsreTargetArg {
    fn target(self) -> ZsreTarget {
        match self {
            ZsreTargetArg::Answer => ZsreTarget::Answer,
            ZsreTargetArg::Alt => ZsreTarget::Alt,
        }
    }
}

enum Cases {
    CounterFact(Vec<CounterFactCase>),
    Zsre(Vec<ZsreRecord>, ZsreTarget),
}

impl Cases {
    fn load(args: &EvalArgs) -> Result<(Cases, usize)> {
        let text = std::fs::read_to_string(&args.data).with_context(|| format!("reading {}", args.data.display()))?;
        let window = |len: usize| {
            ensure!(args.offset < len, "--offset {} is past the {len} records of {}", args.offset, args.data.display());
            Ok(args.offset..(args.offset + args.n).min(len))
        };
        Ok(match args.dataset {
            Dataset::Counterfact => {
                let all: Vec<CounterFactCase> = serde_json::from_str(&text).with_context(|| format!("{} is not a list of CounterFact records", args.data.display()))?;
                (Cases::CounterFact(all[window(all.len())?].to_vec()), 0)
            }
            Dataset::Zsre => {
                let all: Vec<ZsreRecord> = serde_json::from_str(&text).with_context(|| format!("{} is not a list of zsRE records", args.data.display()))?;
                let picked = &all[window(all.len())?];
                // MEMIT needs the subject inside the question to find its
                // tokens, and an answer to teach.
                let which = args.zsre_target.target();
                let usable: Vec<ZsreRecord> = picked.iter().filter(|r| r.request(0, which).is_some()).cloned().collect();
                let skipped = picked.len() - usable.len();
                (Cases::Zsre(usable, which), skipped)
            }
        })
    }

    fn len(&self) -> usize {
        match self {
            Cases::CounterFact(c) => c.len(),
            Cases::Zsre(r, _) => r.len(),
        }
    }

    fn requests(&self, offset: usize) -> Vec<EditRequest> {
        match self {
            Cases::CounterFact(c) => c.iter().map(CounterFactCase::request).collect(),
            Cases::Zsre(r, which) => r.iter().enumerate().map(|(i, r)| r.request((offset + i) as u64, *which).expect("filtered")).collect(),
        }
    }

    /// Which prompts the generation entropy uses, for the report.
    fn generation_source(&self) -> Option<&'static str> {
        match self {
            Cases::CounterFact(c) if c.iter().all(|c| !c.generation_prompts.is_empty()) => Some("generation prompts"),
            Cases::CounterFact(c) if c.iter().all(|c| c.generation_prompts.is_empty()) => Some("rewrite and paraphrase prompts (the data has no generation prompts)"),
            Cases::CounterFact(_) => Some("generation prompts where a case has them, else its rewrite and paraphrase prompts"),
            Cases::Zsre(..) => None,
        }
    }

    /// Scores the first `k` cases; metric name → value (%, and the
    /// generation entropy in bits ×100, as the paper's tables).
    fn score(&self, model: &Model, tok: &TextTokenizer, k: usize, gen_tokens: usize) -> Result<Vec<(String, f64)>> {
        let mut metrics = Vec::new();
        match self {
            Cases::CounterFact(c) => {
                let s = summarize(&pollster::block_on(score_counterfact(model, tok, &c[..k]))?);
                metrics.extend([
                    ("efficacy_score", s.efficacy_score),
                    ("efficacy_magnitude", s.efficacy_magnitude),
                    ("paraphrase_score", s.paraphrase_score),
                    ("paraphrase_magnitude", s.paraphrase_magnitude),
                    ("neighborhood_score", s.neighborhood_score),
                    ("neighborhood_magnitude", s.neighborhood_magnitude),
                    ("score", s.score),
                ]
                .map(|(n, v)| (n.to_string(), v as f64)));
                if gen_tokens > 0 {
                    let prompts: Vec<String> = c[..k].iter().flat_map(generation_prompts).collect();
                    metrics.push(("generation_entropy".into(), 100.0 * pollster::block_on(mean_generation_entropy(model, tok, &prompts, gen_tokens, 0))?));
                }
            }
            Cases::Zsre(r, which) => {
                let s = summarize_zsre(&pollster::block_on(score_zsre(model, tok, &r[..k], *which))?);
                metrics.extend([("efficacy", s.efficacy), ("paraphrase", s.paraphrase), ("specificity", s.specificity)].map(|(n, v)| (n.to_string(), v as f64)));
            }
        }
        Ok(metrics)
    }
}

/// A case's prompts for the fluency test: its generation prompts, or,
/// where the data has none (the MEMIT-like CounterFact copy), its rewrite
/// and paraphrase prompts.
fn generation_prompts(c: &CounterFactCase) -> Vec<String> {
    if !c.generation_prompts.is_empty() {
        return c.generation_prompts.clone();
    }
    std::iter::once(c.requested_rewrite.prompt.replace("{}", &c.requested_rewrite.subject)).chain(c.paraphrase_prompts.iter().cloned()).collect()
}

#[derive(Serialize)]
struct Point {
    method: EditMethod,
    edits: usize,
    metrics: serde_json::Map<String, serde_json::Value>,
    edit_seconds: f64,
    phases: Phases,
    score_seconds: f64,
}

fn as_map(metrics: Vec<(String, f64)>) -> serde_json::Map<String, serde_json::Value> {
    metrics.into_iter().map(|(k, v)| (k, serde_json::json!(v))).collect()
}

pub fn eval(args: EvalArgs, json: bool) -> Result<()> {
    let (cases, skipped) = Cases::load(&args)?;
    ensure!(cases.len() > 0, "no usable cases in {} at offset {} (n = {})", args.data.display(), args.offset, args.n);
    if skipped > 0 {
        eprintln!("skipped {skipped} zsRE record(s) whose question does not contain the subject or that have no answer to teach");
    }
    // Statistics on the blocks through the last edited layer, then the rest.
    let hp = crate::plan::hparams_of(&args.model.model, args.hparams.as_deref())?;
    let mut session = Session::open_checked(&args.model, Some(hp.last_layer() + 1), |_| Ok(()))?;
    let requests = cases.requests(args.offset);
    for (i, r) in requests.iter().enumerate() {
        r.prepare(i, &session.tokenizer).with_context(|| format!("case {} of {}", args.offset + i, args.data.display()))?;
    }
    let (covariances, stats_path) = session.covariances(&hp, &args.stats)?;
    session.load_remaining()?;
    let (model, tok) = (&session.model, &session.tokenizer);
    let templates = match args.templates {
        Templates::Plain => vec!["{}".to_string()],
        Templates::Generated => pollster::block_on(context_templates(model, tok, hp.context_template_length, 0))?,
    };
    let n = cases.len();
    let steps: Vec<(usize, usize)> = match args.mode {
        Mode::Batch => {
            let mut sizes = if args.sizes.is_empty() { vec![n] } else { args.sizes.clone() };
            sizes.iter_mut().for_each(|s| *s = (*s).clamp(1, n));
            sizes.sort_unstable();
            sizes.dedup();
            sizes.into_iter().map(|s| (0, s)).collect()
        }
        Mode::Sequential => (0..n).step_by(args.chunk.max(1)).map(|from| (from, (from + args.chunk.max(1)).min(n))).collect(),
    };

    let s = spinner("scoring the unedited model");
    let pre = cases.score(model, tok, n, args.gen_tokens)?;
    s.finish_and_clear();
    let mut methods: Vec<EditMethod> = Vec::new();
    for method in args.method.iter().map(|m| m.method()) {
        if !methods.contains(&method) {
            methods.push(method);
        }
    }
    let mode = if args.mode == Mode::Batch { "batch" } else { "sequential" };
    let mut points = Vec::new();
    let mut null_spaces = serde_json::Map::new();
    for &method in &methods {
        let mut state = pollster::block_on(EditState::new(&model.ctx, method, &hp, &covariances, &mut |_| {}))?;
        null_spaces.insert(method.name().into(), serde_json::json!(state.null_space_dimensions()));
        let mut current = model.clone();
        for &(from, to) in &steps {
            if args.mode == Mode::Batch {
                current = model.clone();
                state.forget_edits();
            }
            eprintln!("{}: editing cases {from}..{to} ({mode} mode)", method.name());
            let mut progress = EditProgress::new();
            let start = Instant::now();
            let outcome = pollster::block_on(apply_edit(&mut current, tok, &requests[from..to], &hp, &templates, &covariances, &mut state, &TargetOptions::default(), &mut |p| progress.report(p)))?;
            progress.finish();
            let edit_seconds = start.elapsed().as_secs_f64();
            let start = Instant::now();
            let s = spinner(&format!("scoring {to} edited case(s)"));
            let metrics = cases.score(&current, tok, to, args.gen_tokens)?;
            s.finish_and_clear();
            points.push(Point { method, edits: to, metrics: as_map(metrics), edit_seconds, phases: outcome.phases, score_seconds: start.elapsed().as_secs_f64() });
        }
    }

    let report = serde_json::json!({
        "model": session.path, "model_fingerprint": session.fingerprint, "adapter": model.ctx.adapter_info().name,
        "dataset": args.dataset, "data": args.data, "offset": args.offset, "cases": n, "skipped": skipped,
        "mode": args.mode, "methods": methods, "null_space_dimensions": null_spaces, "hparams": hp, "stats": stats_path, "n_stats_tokens": covariances[0].n_tokens,
        "unedited": as_map(pre.clone()), "points": points,
        "zsre_target": (args.dataset == Dataset::Zsre).then(|| args.zsre_target.target()),
        "generation_entropy_from": (args.gen_tokens > 0).then(|| cases.generation_source()).flatten(),
    });
    write_atomic(&args.report, serde_json::to_string_pretty(&report)?.as_bytes())?;
    if let Some(plot) = &args.plot {
        let names: Vec<String> = pre.iter().map(|(k, _)| k.clone()).filter(|k| !k.ends_with("_magnitude") && k != "generation_entropy").collect();
        let unedited = |name: &str| pre.iter().find(|(k, _)| k == name).map_or(0.0, |m| m.1);
        let series: Vec<Series> = methods
            .iter()
            .flat_map(|&method| names.iter().map(move |name| (method, name)))
            .map(|(method, name)| Series {
                name: if methods.len() > 1 { format!("{} {name}", method.name()) } else { name.clone() },
                points: std::iter::once((0.0, unedited(name)))
                    .chain(points.iter().filter(|p| p.method == method).map(|p| (p.edits as f64, p.metrics[name].as_f64().unwrap_or(0.0))))
                    .collect(),
            })
            .collect();
        let title = format!("{} on {} — {mode} mode", methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "), session.path.display());
        write_atomic(plot, line_chart(&title, "number of edits (0 = unedited)", "score (%)", &series).as_bytes())?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let row = |label: String, metrics: &[(String, f64)]| println!("{label:>10}  {}", metrics.iter().map(|(k, v)| format!("{k} {v:.1}")).collect::<Vec<_>>().join("  "));
        row("unedited".into(), &pre);
        for p in &points {
            let metrics: Vec<(String, f64)> = p.metrics.iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0))).collect();
            row(format!("{} {} edits", p.method.name(), p.edits), &metrics);
        }
        println!("report: {}{}", args.report.display(), args.plot.as_ref().map(|p| format!(", plot: {}", p.display())).unwrap_or_default());
    }
    Ok(())
}
