//! `memit-wgpu plan`, and the plan `edit` and `stats` print (and enforce
//! with `--gpu-memory`) before they load any weights: peak GPU and host
//! memory of every phase from the model's config alone.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memit_core::{gib, DeviceLimits, EditMethod, EditRequest, Hparams, MemoryPlan, PlanOptions, RequestShape, TargetOptions};
use memit_gpu::{DType, GpuContext};
use memit_models::{read_config, GgufSource, TextTokenizer};

use crate::patching::Templates;
use crate::session::{resolve_hparams, MethodArg};

#[derive(clap::Args)]
pub struct PlanArgs {
    /// A Hugging Face model folder (config.json is enough), a .gguf file,
    /// or a repo id in the Hugging Face cache.
    #[arg(long, value_parser = crate::session::model_location)]
    pub model: PathBuf,
    /// Requests edited at once.
    #[arg(long)]
    pub n_requests: usize,
    /// Plan for weight matrices in f16 on the GPU.
    #[arg(long)]
    pub f16: bool,
    /// Plan for the model's top N blocks streamed from the checkpoint (as
    /// `edit --stream-blocks`).
    #[arg(long, default_value_t = 0)]
    pub stream_blocks: usize,
    /// GPU memory budget (e.g. 48GiB, 80GB, 512MiB); without it the peaks
    /// are printed and nothing is decided.
    #[arg(long)]
    pub gpu_memory: Option<String>,
    /// A preset name or a JSON file overriding the model's preset.
    #[arg(long)]
    pub hparams: Option<String>,
    #[arg(long, value_enum, default_value_t = Templates::Generated)]
    pub templates: Templates,
    /// Truncation of statistics texts (as `stats --max-len`).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// GPU memory for one batch of target-vector optimisation (as `edit
    /// --target-batch-memory`).
    #[arg(long, default_value = "1GiB")]
    pub target_batch_memory: String,
    /// Use this machine's GPU adapter's limits instead of wgpu's defaults.
    #[arg(long)]
    pub adapter: bool,
    /// The editing method (AlphaEdit holds more).
    #[arg(long, value_enum, default_value_t = MethodArg::Memit)]
    pub method: MethodArg,
}

/// "48GiB", "80 GB", "512MiB", "1.5TiB" or plain bytes.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => (1u64 << 20) as f64,
        "gib" => (1u64 << 30) as f64,
        "tib" => (1u64 << 40) as f64,
        _ => bail!("--gpu-memory {text:?}: unknown unit {unit:?} (use e.g. 48GiB, 80GB, 512MiB)"),
    };
    let value: f64 = number.parse().with_context(|| format!("--gpu-memory {text:?} is not a size such as 48GiB"))?;
    let bytes = value * scale;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        bail!("--gpu-memory {text:?} is not a usable size");
    }
    Ok(bytes as u64)
}

/// The limits a plan depends on, from an adapter's (or wgpu's defaults,
/// what every WebGPU adapter offers).
fn device_limits(l: &wgpu::Limits) -> DeviceLimits {
    DeviceLimits { max_storage_buffer_binding_size: l.max_storage_buffer_binding_size, max_buffer_size: l.max_buffer_size }
}

/// Templates per request and the tokens each adds before a prompt.
fn template_counts(templates: Templates, hp: &Hparams) -> (usize, usize) {
    match templates {
        Templates::Plain => (1, 0),
        // "{}" plus five generated texts: a prefix word, the generated
        // tokens and ". ".
        Templates::Generated => (6, hp.context_template_length + 2),
    }
}

pub fn plan(args: PlanArgs, json: bool) -> Result<()> {
    let config = read_config(&args.model).with_context(|| format!("reading the config of {}", args.model.display()))?;
    let hp = resolve_hparams(&config, args.hparams.as_deref())?;
    let limits = if args.adapter { device_limits(crate::session::open_gpu()?.limits()) } else { device_limits(&wgpu::Limits::default()) };
    let (templates, template_tokens) = template_counts(args.templates, &hp);
    let options = PlanOptions {
        matrix_dtype: if args.f16 { DType::F16 } else { DType::F32 },
        n_requests: args.n_requests,
        requests: RequestShape::typical(template_tokens),
        templates,
        limits,
        target: target_options(&args.target_batch_memory)?,
        stats_max_len: args.max_len,
        keep_original_weights: false,
        method: args.method.method(),
        streamed_blocks: args.stream_blocks,
    };
    let plan = MemoryPlan::new(&config, &hp, &options)?;
    let budget = args.gpu_memory.as_deref().map(parse_bytes).transpose()?;
    let verdict = budget.map(|b| plan.check(b, &config, &hp, &options));
    if json {
        let mut value = serde_json::to_value(&plan)?;
        let extra = serde_json::json!({
            "fits": budget.map(|b| plan.fits(b)),
            "budget_bytes": budget,
            "peak_phase": plan.peak().name,
            "peak_gpu_buffer_bytes": plan.peak().gpu_buffer_bytes,
            "pool_reserve_bytes": plan.pool_reserve(),
            "limits": limits,
            "request_shape": options.requests,
            "problem": verdict.as_ref().and_then(|v| v.as_ref().err()).map(|e| e.to_string()),
        });
        value.as_object_mut().expect("a plan is an object").extend(extra.as_object().expect("an object").clone());
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("{}", plan.summary(budget));
        if !args.adapter {
            println!("  (limits: wgpu defaults, {} per binding; --adapter uses this machine's GPU)", gib(limits.max_storage_buffer_binding_size));
        }
    }
    if let Some(Err(e)) = verdict {
        return Err(e.into());
    }
    Ok(())
}

/// Target-vector batching with a `--target-batch-memory` budget.
pub fn target_options(batch_memory: &str) -> Result<TargetOptions> {
    let batch_bytes = parse_bytes(batch_memory).context("--target-batch-memory")?;
    ensure!(batch_bytes > 0, "--target-batch-memory must be more than 0");
    Ok(TargetOptions { batch_bytes, ..TargetOptions::default() })
}

/// The hyperparameters for the model at `model` (its preset, or `spec`),
/// from its config alone.
pub fn hparams_of(model: &Path, spec: Option<&str>) -> Result<Hparams> {
    let config = read_config(model).with_context(|| format!("reading the config of {}", model.display()))?;
    resolve_hparams(&config, spec)
}

/// What `edit` and `stats` plan before loading weights.
pub struct Preflight<'a> {
    pub model: &'a Path,
    pub f16: bool,
    pub streamed_blocks: usize,
    pub hparams: Option<&'a str>,
    pub gpu_memory: Option<&'a str>,
    /// How the target vectors are batched (`--target-batch-memory`).
    pub target: TargetOptions,
    pub max_len: Option<usize>,
    /// The requests and their templates (`edit`); None plans the
    /// statistics only (`stats`).
    pub requests: Option<(&'a [EditRequest], Templates)>,
    pub method: EditMethod,
}

/// Prints the plan (stderr) and refuses a run that does not fit
/// `--gpu-memory`. Without a budget nothing is refused; shapes beyond the
/// adapter's binding size are warned about.
pub fn preflight(p: &Preflight<'_>, ctx: &GpuContext) -> Result<()> {
    let config = read_config(p.model).with_context(|| format!("reading the config of {}", p.model.display()))?;
    let hp = resolve_hparams(&config, p.hparams)?;
    let (n_requests, requests, templates) = match p.requests {
        Some((requests, kind)) => {
            let (templates, template_tokens) = template_counts(kind, &hp);
            let shape = match open_tokenizer(p.model) {
                Some(tok) => RequestShape::measure(&tok, requests, template_tokens)?,
                None => RequestShape::typical(template_tokens),
            };
            (requests.len().max(1), shape, templates)
        }
        None => (1, RequestShape::typical(0), 1),
    };
    let options = PlanOptions {
        matrix_dtype: if p.f16 { DType::F16 } else { DType::F32 },
        n_requests,
        requests,
        templates,
        limits: device_limits(ctx.limits()),
        target: p.target,
        stats_max_len: p.max_len,
        keep_original_weights: false,
        method: p.method,
        streamed_blocks: p.streamed_blocks,
    };
    let mut plan = MemoryPlan::new(&config, &hp, &options)?;
    if p.requests.is_none() {
        plan.phases.retain(|ph| ph.name == "statistics");
    }
    let budget = p.gpu_memory.map(parse_bytes).transpose()?;
    eprintln!("{}", plan.summary(budget));
    if let Some(budget) = budget {
        plan.check(budget, &config, &hp, &options).context("the memory plan does not fit --gpu-memory; nothing was loaded")?;
    }
    Ok(())
}

/// The tokenizer without the weights, when the model has one.
fn open_tokenizer(model: &Path) -> Option<TextTokenizer> {
    if model.extension().is_some_and(|e| e == "gguf") {
        return GgufSource::open(model).ok()?.tokenizer().ok();
    }
    TextTokenizer::from_file(&model.join("tokenizer.json")).ok()
}
