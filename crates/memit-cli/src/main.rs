//! `memit-wgpu`: mass-edit facts in GPT-style models on any GPU wgpu reaches.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use memit_gpu::GpuContext;
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
    }
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
