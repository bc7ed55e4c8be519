//! The GPU runtime: adapter choice, device with the adapter's real limits,
//! error capture, a pipeline cache and batched command submission.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::error::{GpuError, Result};
use crate::shader::{render, ShaderFamily};
use crate::tensor::{MemoryMeter, MemoryUsage};

/// How to pick and configure the adapter.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Use the first adapter whose name contains this text (case-insensitive).
    /// `GpuContext::from_env` reads it from `MEMIT_ADAPTER`.
    pub adapter_name: Option<String>,
    /// Upper bound on the bytes of one tensor chunk, below the adapter's
    /// storage-binding limit. Tests set it tiny to exercise tiling on small shapes.
    pub max_chunk_bytes: Option<u64>,
}

/// Workgroup-count limit per dimension that every WebGPU adapter guarantees.
const MAX_GROUPS_PER_DIM: u32 = 65_535;
/// Dispatches recorded before the pending encoder is submitted, bounding the
/// memory held by per-dispatch uniform buffers.
const DISPATCHES_PER_SUBMIT: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PipelineKey {
    family: ShaderFamily,
    entry: &'static str,
    defines: Vec<(&'static str, String)>,
}

/// A compiled kernel and the bindings its source declares writable.
struct CachedPipeline {
    pipeline: wgpu::ComputePipeline,
    writable: Vec<u32>,
}

struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    dispatches: usize,
}

/// One opened GPU device plus everything needed to run kernels on it.
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    chunk_bytes: u64,
    pipelines: Mutex<HashMap<PipelineKey, Arc<CachedPipeline>>>,
    pending: Mutex<Pending>,
    error: Arc<Mutex<Option<GpuError>>>,
    meter: Arc<MemoryMeter>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext").field("adapter", &self.info.name).finish()
    }
}

/// Lower is better: real GPUs first, then software rasterisers; GL last
/// because its compute support is the weakest.
#[cfg(not(target_arch = "wasm32"))]
fn adapter_rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 | wgpu::Backend::BrowserWebGpu => 0,
        _ => 1,
    };
    (backend, kind)
}

/// The least our kernels need from an adapter (all are WebGPU defaults).
const REQUIRED_LIMITS: [(&str, fn(&wgpu::Limits) -> u64, u64); 4] = [
    ("max_storage_buffers_per_shader_stage", |l| l.max_storage_buffers_per_shader_stage as u64, 4),
    ("max_compute_invocations_per_workgroup", |l| l.max_compute_invocations_per_workgroup as u64, 256),
    ("max_compute_workgroup_storage_size", |l| l.max_compute_workgroup_storage_size as u64, 16 * 1024),
    ("max_storage_buffer_binding_size", |l| l.max_storage_buffer_binding_size, 1 << 20),
];

impl GpuContext {
    /// Opens the best adapter with options taken from the environment
    /// (`MEMIT_ADAPTER` selects an adapter by name).
    pub async fn from_env() -> Result<Arc<Self>> {
        let adapter_name = std::env::var("MEMIT_ADAPTER").ok().filter(|s| !s.is_empty());
        Self::new(GpuOptions { adapter_name, ..Default::default() }).await
    }

    pub async fn new(options: GpuOptions) -> Result<Arc<Self>> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::all(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapter = Self::pick_adapter(&instance, options.adapter_name.as_deref()).await?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        for (name, get, need) in REQUIRED_LIMITS {
            let have = get(&limits);
            if have < need {
                return Err(GpuError::LimitTooSmall { adapter: info.name.clone(), limit: name, have, need });
            }
        }
        let features = adapter.features() & wgpu::Features::SHADER_F16;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("memit-wgpu"),
                required_features: features,
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::RequestDevice(e.to_string()))?;

        let error = Arc::new(Mutex::new(None));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mapped = match e {
                wgpu::Error::OutOfMemory { .. } => GpuError::OutOfMemory { context: "running GPU work".into() },
                wgpu::Error::Validation { description, .. } => GpuError::Validation(description),
                wgpu::Error::Internal { description, .. } => GpuError::Internal(description),
            };
            let mut slot = sink.lock().unwrap();
            if slot.is_none() {
                *slot = Some(mapped);
            }
        }));

        let binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let chunk_bytes = options.max_chunk_bytes.map_or(binding, |cap| cap.min(binding)) & !15;
        Ok(Arc::new(GpuContext {
            device,
            queue,
            info,
            limits,
            features,
            chunk_bytes,
            pipelines: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending { encoder: None, dispatches: 0 }),
            error,
            meter: Arc::default(),
        }))
    }

    #[cfg(not(target_arch = "wasm32"))]
    async fn pick_adapter(instance: &wgpu::Instance, name: Option<&str>) -> Result<wgpu::Adapter> {
        let mut adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        let tried = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
            })
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(name) = name {
            let wanted = name.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&wanted));
        }
        adapters.sort_by_key(|a| adapter_rank(&a.get_info()));
        adapters.into_iter().next().ok_or_else(|| GpuError::NoAdapter {
            tried: if tried.is_empty() { "none found".into() } else { tried },
        })
    }

    #[cfg(target_arch = "wasm32")]
    async fn pick_adapter(instance: &wgpu::Instance, _name: Option<&str>) -> Result<wgpu::Adapter> {
        instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::NoAdapter { tried: format!("navigator.gpu ({e})") })
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Whether the device has native `f16` arithmetic. Kernels do not need it:
    /// f16 storage is read through `unpack2x16float`, which every adapter has.
    pub fn has_shader_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    /// Largest number of bytes one tensor chunk may hold.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Tensor memory now and at its peak (since the last reset).
    pub fn memory(&self) -> MemoryUsage {
        self.meter.usage()
    }

    /// Starts a new peak-memory measurement from what is live now.
    pub fn reset_peak_memory(&self) {
        self.meter.reset_peak();
    }

    pub(crate) fn meter(&self) -> &Arc<MemoryMeter> {
        &self.meter
    }

    pub(crate) fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Returns (and clears) the first GPU error recorded since the last check.
    pub(crate) fn take_error(&self) -> Result<()> {
        match self.error.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Like `take_error`, naming what was being done when memory ran out.
    pub(crate) fn check(&self, context: impl FnOnce() -> String) -> Result<()> {
        self.take_error().map_err(|e| match e {
            GpuError::OutOfMemory { .. } => GpuError::OutOfMemory { context: context() },
            other => other,
        })
    }

    pub(crate) fn create_buffer(&self, bytes: u64, usage: wgpu::BufferUsages, label: &str) -> Result<wgpu::Buffer> {
        if bytes > self.limits.max_buffer_size {
            return Err(GpuError::OutOfMemory {
                context: format!("allocating {label}: {bytes} bytes exceed the adapter's max buffer size {}", self.limits.max_buffer_size),
            });
        }
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage,
            mapped_at_creation: false,
        });
        self.check(|| format!("allocating {label} ({bytes} bytes)"))?;
        Ok(buffer)
    }

    fn pipeline(&self, family: ShaderFamily, entry: &'static str, defines: &[(&'static str, String)]) -> Result<Arc<CachedPipeline>> {
        let key = PipelineKey { family, entry, defines: defines.to_vec() };
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let source = render(family, defines)?;
        let writable = writable_bindings(&source);
        let label = format!("{}::{entry}", family.name());
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        self.take_error()?;
        let pipeline = Arc::new(CachedPipeline { pipeline, writable });
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// Records one kernel launch: binding 0 is the uniform `params`, the
    /// storage buffers go to the given binding numbers. Work is submitted in
    /// batches.
    pub(crate) fn dispatch(
        &self,
        kernel: Kernel<'_>,
        params: &[u8],
        buffers: &[(u32, &wgpu::Buffer)],
        groups: [u32; 3],
    ) -> Result<()> {
        if groups.iter().any(|&g| g == 0) {
            return Ok(());
        }
        if let Some(&too_many) = groups.iter().find(|&&g| g > MAX_GROUPS_PER_DIM) {
            return Err(GpuError::shape(kernel.family.name(), format!("{too_many} workgroups in one dimension (max {MAX_GROUPS_PER_DIM})")));
        }
        let pipeline = self.pipeline(kernel.family, kernel.entry, kernel.defines)?;
        // WebGPU rejects a writable storage binding that overlaps another
        // binding of the same dispatch; native wgpu does not check, so the
        // rule is enforced here and native tests catch what browsers refuse.
        for &(writable, buffer) in buffers.iter().filter(|(b, _)| pipeline.writable.contains(b)) {
            if let Some(&(other, _)) = buffers.iter().find(|&&(b, other)| b != writable && other == buffer) {
                return Err(GpuError::Validation(format!(
                    "{}::{} binds one buffer to writable binding {writable} and to binding {other} (WebGPU forbids aliasing a writable binding)",
                    kernel.family.name(),
                    kernel.entry
                )));
            }
        }
        let uniform = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: params,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() }];
        entries.extend(
            buffers
                .iter()
                .map(|&(binding, b)| wgpu::BindGroupEntry { binding, resource: b.as_entire_binding() }),
        );
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut pending = self.pending.lock().unwrap();
        let encoder = pending
            .encoder
            .get_or_insert_with(|| self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("memit") }));
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        pending.dispatches += 1;
        if pending.dispatches >= DISPATCHES_PER_SUBMIT {
            self.submit_locked(&mut pending);
        }
        drop(pending);
        self.check(|| format!("running {}::{}", kernel.family.name(), kernel.entry))
    }

    fn submit_locked(&self, pending: &mut Pending) {
        if let Some(encoder) = pending.encoder.take() {
            self.queue.submit([encoder.finish()]);
        }
        pending.dispatches = 0;
    }

    /// Submits all recorded work to the GPU without waiting for it.
    pub fn flush(&self) {
        self.submit_locked(&mut self.pending.lock().unwrap());
    }

    /// Records a buffer-to-buffer copy in order with the recorded kernels.
    pub(crate) fn copy(&self, src: &wgpu::Buffer, src_offset: u64, dst: &wgpu::Buffer, dst_offset: u64, bytes: u64) {
        let mut pending = self.pending.lock().unwrap();
        let encoder = pending
            .encoder
            .get_or_insert_with(|| self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("memit") }));
        encoder.copy_buffer_to_buffer(src, src_offset, dst, dst_offset, Some(bytes));
    }

    /// Waits until the GPU has finished everything recorded so far and reports
    /// any error it raised. Native blocks in `poll`; on the web it awaits the
    /// browser through a tiny readback.
    pub async fn sync(&self) -> Result<()> {
        let probe = self.create_buffer(4, wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ, "sync probe")?;
        self.map_read(&probe).await?;
        Ok(())
    }

    /// Submits pending work, maps `staging` for reading and returns its bytes.
    pub(crate) async fn map_read(&self, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
        self.flush();
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let mapped = rx.await.map_err(|_| GpuError::Readback("the map callback was dropped".into()))?;
        self.check(|| "finishing queued GPU work".into())?;
        mapped.map_err(|e| GpuError::Readback(e.to_string()))?;
        let bytes = {
            let view = staging.slice(..).get_mapped_range().map_err(|e| GpuError::Readback(e.to_string()))?;
            view.to_vec()
        };
        staging.unmap();
        Ok(bytes)
    }
}

/// Which compiled kernel to launch.
#[derive(Clone, Copy)]
pub(crate) struct Kernel<'a> {
    pub family: ShaderFamily,
    pub entry: &'static str,
    pub defines: &'a [(&'static str, String)],
}

/// Splits `groups` workgroups over x and y so no dimension exceeds the
/// per-dimension limit; shaders flatten with `wid.x + wid.y * nwg.x`.
pub(crate) fn grid_1d(groups: usize) -> [u32; 3] {
    let max = MAX_GROUPS_PER_DIM as usize;
    if groups <= max {
        [groups as u32, 1, 1]
    } else {
        let y = groups.div_ceil(max);
        [groups.div_ceil(y) as u32, y as u32, 1]
    }
}

/// Binding numbers that `source` declares `var<storage, read_write>`.
fn writable_bindings(source: &str) -> Vec<u32> {
    source
        .lines()
        .filter(|line| line.contains("var<storage, read_write>"))
        .filter_map(|line| {
            let rest = &line[line.find("@binding(")? + "@binding(".len()..];
            rest[..rest.find(')')?].trim().parse().ok()
        })
        .collect()
}
