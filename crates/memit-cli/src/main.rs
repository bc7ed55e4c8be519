//! `memit-wgpu`: mass-edit facts in GPT-style models on any GPU wgpu reaches.

mod evaluate;
mod patching;
mod plan;
mod plot;
mod session;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde::Serialize;

use memit_core::{EditMethod, TargetOptions};

use crate::patching::Destination;
use crate::session::{ModelArgs, Session, StatsArgs, StatsOutcome};

#[derive(Parser)]
#[command(name = "memit-wgpu", version, about = "MEMIT mass model editing on WebGPU/Vulkan/Metal/DX12")]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// GPU backend: vulkan, metal, dx12 or gl (default: the best of
    /// Vulkan/Metal/DX12; also MEMIT_BACKEND). MEMIT_ADAPTER=<name part>
    /// picks among several adapters.
    #[arg(long, global = true)]
    backend: Option<String>,
    /// No progress output on stderr (warnings and errors still print).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the GPU adapter memit-wgpu would use, its limits, and optionally
    /// a model's shape.
    Info {
        #[arg(long, value_parser = session::model_location)]
        model: Option<PathBuf>,
    },
    /// Continue a prompt (greedy), optionally with a patch applied in memory.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 10)]
        max_new_tokens: usize,
        #[arg(long)]
        patch: Option<PathBuf>,
    },
    /// Build (or resume) the covariance statistics cache for the edited
    /// layers.
    Stats {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        stats: StatsArgs,
        /// A preset name or a JSON file overriding the model's preset (its
        /// `layers` are the ones collected).
        #[arg(long)]
        hparams: Option<String>,
        /// Process this many batches, checkpoint and stop (continue later by
        /// running the same command).
        #[arg(long)]
        stop_after_batches: Option<usize>,
        /// GPU memory budget (e.g. 48GiB): stop before loading when the
        /// memory plan does not fit it.
        #[arg(long)]
        gpu_memory: Option<String>,
    },
    /// Peak GPU and host memory of every phase of an edit, from the
    /// model's config alone, and whether it fits --gpu-memory.
    Plan(plan::PlanArgs),
    /// Apply a JSON file of MEMIT requests: writes an edited model folder and
    /// a patch file, and shows each prompt's predictions before and after.
    Edit(patching::EditArgs),
    /// Apply a patch file to the model it was made for.
    Apply {
        #[command(flatten)]
        model: ModelArgs,
        /// Default: the model folder's memit-patch.safetensors; in a folder
        /// edited several times (a stack memit-patch.safetensors,
        /// memit-patch.1.safetensors, …, newest first), revert undoes the
        /// newest patch still applied and apply redoes the oldest one not.
        #[arg(long)]
        patch: Option<PathBuf>,
        #[command(flatten)]
        dest: Destination,
    },
    /// Undo a patch exactly: the weights become bitwise the original ones.
    Revert {
        #[command(flatten)]
        model: ModelArgs,
        /// Default: the model folder's memit-patch.safetensors; in a folder
        /// edited several times (a stack memit-patch.safetensors,
        /// memit-patch.1.safetensors, …, newest first), revert undoes the
        /// newest patch still applied and apply redoes the oldest one not.
        #[arg(long)]
        patch: Option<PathBuf>,
        #[command(flatten)]
        dest: Destination,
    },
    /// What a patch changes: layers, ‖ΔW‖, and each request's top
    /// predictions without and with it.
    Diff {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        patch: Option<PathBuf>,
    },
    /// Edit CounterFact or zsRE cases and score them with the paper's
    /// metrics; writes a JSON report and optionally an SVG plot.
    Eval(evaluate::EvalArgs),
}

#[derive(Serialize)]
struct Info {
    adapter: String,
    backend: String,
    device_type: String,
    driver: String,
    shader_f16: bool,
    /// The cooperative matrices f16 · f16 products run on, where the
    /// device has them: fragment side, subgroup size, whether the staged
    /// kernel is on.
    tensor_cores: Option<memit_gpu::CoopShape>,
    /// Whether row reductions (norms, softmax, losses) run within
    /// subgroups, and the adapter's subgroup sizes.
    subgroup_reductions: bool,
    subgroup_sizes: [u32; 2],
    max_storage_buffer_binding_size: u64,
    max_buffer_size: u64,
    max_compute_workgroup_storage_size: u32,
    max_compute_invocations_per_workgroup: u32,
    tensor_chunk_bytes: u64,
}

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    quiet_headless_drivers();
    if let Some(backend) = &cli.backend {
        // Read by GpuContext::from_env, like the variable set by hand.
        std::env::set_var("MEMIT_BACKEND", backend);
    }
    session::set_quiet(cli.quiet);
    let result = match cli.command {
        Command::Info { model } => info(model, json),
        Command::Generate { model, prompt, max_new_tokens, patch } => patching::generate(model, &prompt, max_new_tokens, patch, json),
        Command::Stats { model, stats, hparams, stop_after_batches, gpu_memory } => stats_command(model, stats, hparams, stop_after_batches, gpu_memory, json),
        Command::Plan(args) => plan::plan(args, json),
        Command::Edit(args) => patching::edit(args, json),
        Command::Apply { model, patch, dest } => patching::apply_or_revert(model, patch, dest, true, json),
        Command::Revert { model, patch, dest } => patching::apply_or_revert(model, patch, dest, false, json),
        Command::Diff { model, patch } => patching::diff(model, patch, json),
        Command::Eval(args) => evaluate::eval(args, json),
    };
    if let Err(error) = result {
        eprintln!("error: {}", describe_error(&error));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text
/// the message already holds (library errors often show their source).
fn describe_error(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    message
}

/// Mesa's Vulkan drivers look for a Wayland display when they start and,
/// with no XDG_RUNTIME_DIR (a headless machine, CI, a container), print
/// "error: XDG_RUNTIME_DIR is invalid or not set" twice. An empty private
/// runtime folder lets them find no display quietly.
fn quiet_headless_drivers() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir()) {
        return;
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    let dir = std::env::temp_dir().join(format!("memit-wgpu-runtime-{user}"));
    #[cfg(unix)]
    let created = {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).recursive(true).create(&dir)
    };
    #[cfg(not(unix))]
    let created = std::fs::create_dir_all(&dir);
    if created.is_ok() {
        // Still one thread here: nothing else reads the environment yet.
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

fn stats_command(model: ModelArgs, stats: StatsArgs, hparams: Option<String>, stop_after_batches: Option<usize>, gpu_memory: Option<String>, json: bool) -> Result<()> {
    let preflight = plan::Preflight { model: &model.model, f16: model.f16, streamed_blocks: model.stream_blocks, hparams: hparams.as_deref(), gpu_memory: gpu_memory.as_deref(), target: TargetOptions::default(), max_len: stats.max_len, requests: None, method: EditMethod::Memit };
    let hp = plan::hparams_of(&model.model, hparams.as_deref())?;
    // The blocks above the last edited layer are not needed.
    let session = Session::open_checked(&model, Some(hp.last_layer() + 1), |ctx| plan::preflight(&preflight, ctx))?;
    match session.collect_stats(&hp, &stats, stop_after_batches)? {
        StatsOutcome::Done { path, n_tokens, seconds, from_cache, counters, .. } => {
            if json {
                println!("{}", serde_json::json!({"status": "complete", "path": path, "layers": hp.layers, "n_tokens": n_tokens, "seconds": seconds, "from_cache": from_cache, "counters": counters}));
            } else if from_cache {
                println!("statistics for layers {:?} already cached: {} ({n_tokens} tokens)", hp.layers, path.display());
            } else {
                println!("statistics for layers {:?}: {n_tokens} tokens in {seconds:.1} s -> {}", hp.layers, path.display());
            }
        }
        StatsOutcome::Paused { partial, texts_done, total } => {
            if json {
                println!("{}", serde_json::json!({"status": "paused", "checkpoint": partial, "texts_done": texts_done, "texts": total}));
            } else {
                println!("paused after {texts_done}/{total} texts; checkpoint {} (run the same command to continue)", partial.display());
            }
        }
    }
    Ok(())
}

fn info(model: Option<PathBuf>, json: bool) -> Result<()> {
    let ctx = session::open_gpu()?;
    let model_summary = match &model {
        Some(path) => {
            let session = Session::open(&ModelArgs { model: path.clone(), f16: false, stream_blocks: 0 })?;
            let c = &session.model.config;
            Some(serde_json::json!({
                "path": path, "arch": format!("{:?}", c.arch), "layers": c.n_layers, "d_model": c.d_model, "d_ff": c.d_ff,
                "heads": c.n_heads, "vocab": c.vocab_size, "max_positions": c.max_positions, "fingerprint": session.fingerprint,
                "memit_layers": session.hparams(None)?.layers,
            }))
        }
        None => None,
    };
    let adapter = ctx.adapter_info();
    let limits = ctx.limits();
    let info = Info {
        adapter: adapter.name.clone(),
        backend: format!("{:?}", adapter.backend),
        device_type: format!("{:?}", adapter.device_type),
        driver: format!("{} {}", adapter.driver, adapter.driver_info).trim().to_string(),
        shader_f16: ctx.has_shader_f16(),
        tensor_cores: ctx.coop_shape(),
        subgroup_reductions: ctx.subgroup_reductions(),
        subgroup_sizes: [adapter.subgroup_min_size, adapter.subgroup_max_size],
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_buffer_size: limits.max_buffer_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        tensor_chunk_bytes: ctx.chunk_bytes(),
    };
    if json {
        let mut value = serde_json::to_value(&info)?;
        if let Some(m) = model_summary {
            value["model"] = m;
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!("adapter          {} ({}, {})", info.adapter, info.backend, info.device_type);
        println!("driver           {}", info.driver);
        println!("shader-f16       {}", if info.shader_f16 { "yes" } else { "no (f16 weights still work, read via unpack2x16float)" });
        match info.tensor_cores {
            Some(c) => println!("tensor cores     {0}×{0} f16 fragments into f32, subgroups of {1}{2}", c.fragment, c.subgroup, if c.staged { "" } else { " (one-subgroup kernel only)" }),
            None => println!("tensor cores     no (f16 · f16 products on the portable kernels)"),
        }
        let [lo, hi] = info.subgroup_sizes;
        let sizes = if lo == hi { format!("{lo}") } else { format!("{lo}-{hi}") };
        if info.subgroup_reductions {
            println!("subgroups        {sizes} invocations (row reductions within subgroups)");
        } else {
            println!("subgroups        not used (row reductions through workgroup memory)");
        }
        println!("storage binding  {:.0} MiB (tensors larger than this are split into chunks)", mib(info.max_storage_buffer_binding_size));
        println!("max buffer       {:.0} MiB", mib(info.max_buffer_size));
        println!("workgroup memory {} KiB, {} invocations", info.max_compute_workgroup_storage_size / 1024, info.max_compute_invocations_per_workgroup);
        if let Some(m) = model_summary {
            println!("model            {} {}: {} layers, d_model {}, d_ff {}, {} heads, vocab {}", m["path"].as_str().unwrap_or_default(), m["arch"].as_str().unwrap_or_default(), m["layers"], m["d_model"], m["d_ff"], m["heads"], m["vocab"]);
            println!("MEMIT layers     {} (preset)", m["memit_layers"]);
            println!("fingerprint      {}", m["fingerprint"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}
