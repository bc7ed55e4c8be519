//! `memit-wgpu`: mass-edit facts in GPT-style models on any GPU wgpu reaches.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use memit_core::{apply_memit, context_templates, EditRequest, Hparams, StatsAccumulator, StatsIdentity};
use memit_gpu::GpuContext;
use memit_models::{load_hf_dir, GenerateOptions, LoadOptions, Model, Sampling, TextTokenizer};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "memit-wgpu", version, about = "MEMIT mass model editing on WebGPU/Vulkan/Metal/DX12")]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the GPU adapter memit-wgpu would use and its limits.
    Info,
    /// Continue a prompt with a model (greedy).
    Generate {
        /// Hugging Face model folder (config.json, tokenizer.json, safetensors).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 10)]
        max_new_tokens: usize,
    },
    /// Apply a JSON file of MEMIT requests to a model in memory and show each
    /// prompt's top predictions before and after. (Writing the edited model
    /// and a patch file is not implemented yet.)
    Edit {
        /// Hugging Face model folder (config.json, tokenizer.json, safetensors).
        #[arg(long)]
        model: PathBuf,
        /// [{"prompt": "... {} ...", "subject": "...", "target_new": {"str": "..."}}, ...]
        #[arg(long)]
        requests: PathBuf,
        /// Text for the covariance statistics, one text per line; default:
        /// the model folder's train.txt.
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Use at most this many texts of the corpus.
        #[arg(long, default_value_t = 100_000)]
        stats_texts: usize,
        #[arg(long, default_value_t = 64)]
        max_len: usize,
        /// Context templates: the plain prompt only, or also texts the
        /// model generates (MEMIT's default).
        #[arg(long, value_enum, default_value_t = Templates::Generated)]
        templates: Templates,
        /// JSON object of hyperparameters overriding the model's preset.
        #[arg(long)]
        hparams: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Templates {
    Plain,
    Generated,
}

#[derive(Serialize)]
struct Info {
    adapter: String,
    backend: String,
    device_type: String,
    driver: String,
    shader_f16: bool,
    max_storage_buffer_binding_size: u64,
    max_buffer_size: u64,
    max_compute_workgroup_storage_size: u32,
    max_compute_invocations_per_workgroup: u32,
    tensor_chunk_bytes: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => info(cli.json),
        Command::Generate { model, prompt, max_new_tokens } => generate(&model, &prompt, max_new_tokens, cli.json),
        Command::Edit { model, requests, corpus, stats_texts, max_len, templates, hparams } => {
            edit(EditArgs { model, requests, corpus, stats_texts, max_len, templates, hparams }, cli.json)
        }
    }
}

fn load(dir: &Path) -> Result<(Model, TextTokenizer)> {
    let ctx = pollster::block_on(GpuContext::from_env()).context("opening a GPU adapter")?;
    let loaded = load_hf_dir(ctx, dir, LoadOptions::default()).with_context(|| format!("loading the model in {}", dir.display()))?;
    let tokenizer = loaded.tokenizer.with_context(|| format!("{} has no tokenizer.json", dir.display()))?;
    Ok((loaded.model, tokenizer))
}

fn generate(dir: &Path, prompt: &str, max_new_tokens: usize, json: bool) -> Result<()> {
    let (model, tok) = load(dir)?;
    let ids = tok.encode(prompt)?;
    anyhow::ensure!(!ids.is_empty(), "the prompt tokenises to nothing");
    let options = GenerateOptions { max_new_tokens, sampling: Sampling::Greedy, stop_at_eos: true };
    let new = pollster::block_on(model.generate(&[ids], options))?.remove(0);
    let text = tok.decode(&new)?;
    if json {
        println!("{}", serde_json::json!({"prompt": prompt, "continuation": text, "token_ids": new}));
    } else {
        println!("{prompt}{text}");
    }
    Ok(())
}

struct EditArgs {
    model: PathBuf,
    requests: PathBuf,
    corpus: Option<PathBuf>,
    stats_texts: usize,
    max_len: usize,
    templates: Templates,
    hparams: Option<PathBuf>,
}

/// The three most likely next tokens after `prompt`, with probabilities.
fn top_predictions(model: &Model, tok: &TextTokenizer, prompt: &str) -> Result<Vec<(String, f32)>> {
    let logits = pollster::block_on(model.last_token_logits(&[tok.encode(prompt)?]))?.remove(0);
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let total: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.iter().take(3).map(|&i| Ok((tok.decode(&[i as u32])?, (logits[i] - max).exp() / total))).collect()
}

fn edit(args: EditArgs, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(&args.requests).with_context(|| format!("reading {}", args.requests.display()))?;
    let requests: Vec<EditRequest> = serde_json::from_str(&text).with_context(|| format!("{} is not a JSON list of MEMIT requests", args.requests.display()))?;
    anyhow::ensure!(!requests.is_empty(), "{} holds no requests", args.requests.display());
    let (mut model, tok) = load(&args.model)?;
    for (i, r) in requests.iter().enumerate() {
        r.prepare(i, &tok)?;
    }
    let mut hp = Hparams::for_model(&model.config);
    if let Some(path) = &args.hparams {
        let overrides: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        hp = hp.with_overrides(&overrides)?;
    }
    hp.validate(&model.config)?;

    let corpus = args.corpus.clone().unwrap_or_else(|| args.model.join("train.txt"));
    let texts: Vec<String> = std::fs::read_to_string(&corpus)
        .with_context(|| format!("reading the statistics corpus {} (choose one with --corpus)", corpus.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(args.stats_texts)
        .map(String::from)
        .collect();
    let identity = StatsIdentity { model_id: args.model.display().to_string(), corpus_id: corpus.display().to_string(), layers: hp.layers.clone(), max_len: args.max_len };
    let mut stats = StatsAccumulator::new(&model, identity)?;
    for batch in texts.chunks(16) {
        stats.add_texts(&model, &tok, batch)?;
        eprint!("\rstatistics: {}/{} texts, {} tokens", stats.texts_done, texts.len(), stats.n_tokens);
    }
    eprintln!();
    let covariances = pollster::block_on(stats.covariances(&model))?;
    let templates = match args.templates {
        Templates::Plain => vec!["{}".to_string()],
        Templates::Generated => pollster::block_on(context_templates(&model, &tok, hp.context_template_length, 0))?,
    };
    let prompts: Vec<String> = requests.iter().map(|r| r.prompt.replace("{}", &r.subject)).collect();
    let before = prompts.iter().map(|p| top_predictions(&model, &tok, p)).collect::<Result<Vec<_>>>()?;
    pollster::block_on(apply_memit(&mut model, &tok, &requests, &hp, &templates, &covariances, &mut |p| {
        eprint!("\r{}: {}/{}   ", p.stage, p.done, p.total);
    }))?;
    eprintln!();
    let after = prompts.iter().map(|p| top_predictions(&model, &tok, p)).collect::<Result<Vec<_>>>()?;
    if json {
        let rows: Vec<_> = prompts
            .iter()
            .zip(&requests)
            .zip(before.iter().zip(&after))
            .map(|((p, r), (b, a))| serde_json::json!({"prompt": p, "target_new": r.target_new.text, "before": b, "after": a}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"layers": hp.layers, "edits": rows}))?);
    } else {
        let show = |preds: &[(String, f32)]| preds.iter().map(|(t, p)| format!("{t:?} {:.1}%", 100.0 * p)).collect::<Vec<_>>().join(", ");
        for ((p, r), (b, a)) in prompts.iter().zip(&requests).zip(before.iter().zip(&after)) {
            println!("{p:?} -> {:?}\n  before: {}\n  after:  {}", r.target_new.text, show(b), show(a));
        }
    }
    Ok(())
}

fn info(json: bool) -> Result<()> {
    let ctx = pollster::block_on(GpuContext::from_env()).context("opening a GPU adapter")?;
    let adapter = ctx.adapter_info();
    let limits = ctx.limits();
    let info = Info {
        adapter: adapter.name.clone(),
        backend: format!("{:?}", adapter.backend),
        device_type: format!("{:?}", adapter.device_type),
        driver: format!("{} {}", adapter.driver, adapter.driver_info).trim().to_string(),
        shader_f16: ctx.has_shader_f16(),
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_buffer_size: limits.max_buffer_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        tensor_chunk_bytes: ctx.chunk_bytes(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!("adapter          {} ({}, {})", info.adapter, info.backend, info.device_type);
        println!("driver           {}", info.driver);
        println!("shader-f16       {}", if info.shader_f16 { "yes" } else { "no (f16 weights still work, read via unpack2x16float)" });
        println!("storage binding  {:.0} MiB (tensors larger than this are split into chunks)", mib(info.max_storage_buffer_binding_size));
        println!("max buffer       {:.0} MiB", mib(info.max_buffer_size));
        println!("workgroup memory {} KiB, {} invocations", info.max_compute_workgroup_storage_size / 1024, info.max_compute_invocations_per_workgroup);
    }
    Ok(())
}
