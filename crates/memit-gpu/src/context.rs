//! The GPU runtime: adapter choice, device with the adapter's real limits,
//! error capture, a pipeline cache and batched command submission.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use crate::error::{GpuError, Result};
use crate::ops::matmul::CoopSizes;
use crate::runtime::{size_class, CostCounters, Counters, KernelTiming, Profiler, Recorder, Runtime, Work, PARAMS_SLOT};
use crate::shader::{flag, render, ShaderFamily};
use crate::tensor::{MemoryUsage, PooledBuffer};

/// How to pick and configure the adapter.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Use the first adapter whose name contains this text (case-insensitive).
    /// `GpuContext::from_env` reads it from `MEMIT_ADAPTER`.
    pub adapter_name: Option<String>,
    /// Upper bound on the bytes of one tensor chunk, below the adapter's
    /// storage-binding limit. Tests set it tiny to exercise tiling on small shapes.
    pub max_chunk_bytes: Option<u64>,
    /// Most bytes of released buffers kept for reuse (default 1 GiB).
    pub pool_bytes: Option<u64>,
    /// Force the kernel variants made for CPU adapters (`Some(true)`) or
    /// for GPUs (`Some(false)`); by default the adapter type decides.
    /// Tests use it to check both variants on one adapter.
    pub cpu_kernels: Option<bool>,
    /// The most rows a matrix product may have to take the barrier-free
    /// `matmul_direct` kernel instead of the tiled one; by default the
    /// adapter decides (see [`GpuContext::direct_product_rows`]). Tests set
    /// it to check that kernel at every shape.
    pub direct_product_rows: Option<usize>,
    /// Products with more rows than this take `matmul_wide` (32×32 blocks
    /// of C per invocation, operands read four values per load) where their
    /// layout allows; by default the adapter decides (see
    /// [`GpuContext::wide_product_rows`]). Tests set it to check that kernel.
    pub wide_product_rows: Option<usize>,
    /// Products whose `matmul_big` grid (128×128 tiles of C) has at least
    /// this many workgroups take it instead of the 64×64 tiles; by default
    /// the adapter decides (see [`GpuContext::big_product_groups`]). Tests
    /// set it to 0 to check that kernel at every shape.
    pub big_product_groups: Option<usize>,
    /// When `matmul_big` products are split along K; by default the adapter
    /// decides (see [`GpuContext::split_k`]). Tests set it to split small
    /// products.
    pub split_k: Option<SplitK>,
    /// Which tensor-core kernels f16 · f16 products may take where the
    /// adapter has cooperative matrices; by default
    /// [`TensorCores::Staged`]. `GpuContext::from_env` reads
    /// `MEMIT_TENSOR_CORES=0|1|subgroup` (off, staged, one subgroup per
    /// tile).
    pub tensor_cores: Option<TensorCores>,
    /// Whether row reductions (norms, softmax, the target-vector loss,
    /// attention's backward) may reduce within subgroups, where the adapter
    /// has them (native only; browsers keep the portable path): `Some(false)`
    /// keeps the workgroup-memory trees everywhere. By default on.
    /// `GpuContext::from_env` reads `MEMIT_SUBGROUPS=0|1`.
    pub subgroups: Option<bool>,
    /// Backends to consider. Default: Vulkan, Metal, DX12 (and WebGPU in a
    /// browser); OpenGL only when asked for, and never a software OpenGL
    /// renderer. `GpuContext::from_env` reads it from `MEMIT_BACKEND`.
    pub backends: Option<wgpu::Backends>,
}

/// The tensor-core product kernels a context may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorCores {
    /// Every product on the portable kernels.
    Off,
    /// `matmul_coop` alone: one subgroup per tile of 4×4 fragments,
    /// loading its fragments from the operands in memory.
    SubgroupTiles,
    /// `matmul_coop_staged` where a product is whole workgroup tiles (four
    /// subgroups sharing each k slab of A and B through workgroup memory),
    /// `matmul_coop` where it is whole subgroup tiles.
    Staged,
}

/// The adapter's cooperative matrices as the tensor-core kernels use them:
/// square f16 fragments of `fragment` (16 on NVIDIA, 8 on lavapipe) into
/// f32, run by subgroups of `subgroup` invocations, and whether the staged
/// kernel is on (asked for, and within the device's limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CoopShape {
    pub fragment: u32,
    pub subgroup: u32,
    pub staged: bool,
}

/// When a `matmul_big` product is split along K (its partial sums written
/// by one dispatch and added by another): when its grid has fewer than
/// `target_groups` workgroups, into enough slabs of at least `min_chunk`
/// k each to reach that many (a GPU has ~100 multiprocessors to occupy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitK {
    pub target_groups: usize,
    pub min_chunk: usize,
}

/// The backends named by `MEMIT_BACKEND` / `--backend`.
fn parse_backend(name: &str) -> Result<wgpu::Backends> {
    match name.to_lowercase().as_str() {
        "vulkan" => Ok(wgpu::Backends::VULKAN),
        "metal" => Ok(wgpu::Backends::METAL),
        "dx12" => Ok(wgpu::Backends::DX12),
        "gl" | "opengl" => Ok(wgpu::Backends::GL),
        _ => Err(GpuError::UnknownBackend(name.to_string())),
    }
}

/// Workgroup-count limit per dimension that every WebGPU adapter guarantees.
const MAX_GROUPS_PER_DIM: u32 = 65_535;
/// Dispatches recorded before the pending encoder is submitted: the size of
/// the parameter ring, and how much work the GPU may wait for while the
/// host records.
const DISPATCHES_PER_SUBMIT: usize = 256;
const DEFAULT_POOL_BYTES: u64 = 1 << 30;
/// The fewest workgroups of `matmul_big` for which a GPU takes it.
/// Measured on an H200 (`memit-bench kernels`, 2026-12-04, unsplit): it
/// beats the 64×64 tiles at every shape, 5 workgroups included
/// (128×1536×576: 0.70 against 0.14 TFLOP/s; 2048×1536×576, 80
/// workgroups: 11.9 against 1.5).
const DEFAULT_BIG_PRODUCT_GROUPS: usize = 0;
/// A GPU's split along K: at least 128 workgroups, slabs of ≥ 256 k.
const DEFAULT_SPLIT_K: SplitK = SplitK { target_groups: 128, min_chunk: 256 };

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PipelineKey {
    family: ShaderFamily,
    entry: &'static str,
    defines: Vec<(&'static str, String)>,
}

/// A compiled kernel, its bind group layout and the bindings its source
/// declares writable.
struct CachedPipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    writable: Vec<u32>,
}

/// One opened GPU device plus everything needed to run kernels on it.
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    chunk_bytes: u64,
    cpu_kernels: bool,
    direct_product_rows: usize,
    wide_product_rows: usize,
    big_product_groups: usize,
    split_k: SplitK,
    coop_shape: Option<CoopShape>,
    /// The device has wgpu's subgroup operations and the row reductions
    /// use them (`GpuOptions::subgroups`).
    subgroup_reductions: bool,
    pipelines: Mutex<HashMap<PipelineKey, Arc<CachedPipeline>>>,
    runtime: Arc<Runtime>,
    /// Every dispatch's parameters, one `PARAMS_SLOT` each, rewritten
    /// before each submit.
    params_ring: wgpu::Buffer,
    error: Arc<Mutex<Option<GpuError>>>,
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
    /// (`MEMIT_ADAPTER` selects an adapter by name; `MEMIT_CPU_KERNELS=1|0`
    /// forces the CPU or the GPU kernel variants,
    /// `MEMIT_BIG_PRODUCT_GROUPS=<n>` the fewest workgroups that take
    /// `matmul_big` and `MEMIT_TENSOR_CORES=0|1|subgroup` whether f16 · f16
    /// products may take tensor cores, and which kernels, for comparing
    /// them).
    pub async fn from_env() -> Result<Arc<Self>> {
        let var = |key: &str| std::env::var(key).ok().filter(|s| !s.is_empty());
        let backends = var("MEMIT_BACKEND").map(|b| parse_backend(&b)).transpose()?;
        let cpu_kernels = match var("MEMIT_CPU_KERNELS").as_deref() {
            None => None,
            Some("1") => Some(true),
            Some("0") => Some(false),
            Some(other) => return Err(GpuError::UnknownKernelChoice(other.to_string())),
        };
        let big_product_groups = var("MEMIT_BIG_PRODUCT_GROUPS")
            .map(|v| v.parse::<usize>().map_err(|_| GpuError::BadBigProductGroups(v)))
            .transpose()?;
        let tensor_cores = match var("MEMIT_TENSOR_CORES").as_deref() {
            None => None,
            Some("1") => Some(TensorCores::Staged),
            Some("subgroup") => Some(TensorCores::SubgroupTiles),
            Some("0") => Some(TensorCores::Off),
            Some(other) => return Err(GpuError::UnknownTensorCoreChoice(other.to_string())),
        };
        let subgroups = match var("MEMIT_SUBGROUPS").as_deref() {
            None => None,
            Some("1") => Some(true),
            Some("0") => Some(false),
            Some(other) => return Err(GpuError::UnknownSubgroupChoice(other.to_string())),
        };
        Self::new(GpuOptions { adapter_name: var("MEMIT_ADAPTER"), backends, cpu_kernels, big_product_groups, tensor_cores, subgroups, ..Default::default() }).await
    }

    pub async fn new(options: GpuOptions) -> Result<Arc<Self>> {
        // Only the backends asked for are initialised (OpenGL's EGL probes
        // display servers and prints to stderr when there is none).
        let backends = options.backends.unwrap_or(wgpu::Backends::PRIMARY);
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor { backends, ..wgpu::InstanceDescriptor::new_without_display_handle() });
        let adapter = Self::pick_adapter(&instance, backends, options.adapter_name.as_deref()).await?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        for (name, get, need) in REQUIRED_LIMITS {
            let have = get(&limits);
            if have < need {
                return Err(GpuError::LimitTooSmall { adapter: info.name.clone(), limit: name, have, need });
            }
        }
        // Timestamps only serve `start_profiling`; asking for them changes
        // nothing else. Subgroups serve the row reductions, native only: a
        // browser's WGSL compiler would need `enable subgroups;`, which
        // naga's does not take.
        let subgroups = !cfg!(target_arch = "wasm32") && options.subgroups != Some(false);
        let wanted = wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY | if subgroups { wgpu::Features::SUBGROUP } else { wgpu::Features::empty() };
        let features = adapter.features() & wanted;
        let coop = features | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SUBGROUP;
        // Tensor cores (wgpu's experimental cooperative matrices, native
        // only) where the adapter has square f16 products into f32 (16×16×16
        // preferred, else 8×8×8) and one subgroup size (the kernels' workgroup
        // sizes are made of whole subgroups); a device that refuses them is
        // asked again without.
        let choice = options.tensor_cores.unwrap_or(TensorCores::Staged);
        let coop_shape = [16u32, 8]
            .into_iter()
            .find(|&f| {
                adapter.cooperative_matrix_properties().iter().any(|c| {
                    (c.m_size, c.n_size, c.k_size) == (f, f, f) && c.ab_type == wgpu::CooperativeScalarType::F16 && c.cr_type == wgpu::CooperativeScalarType::F32
                })
            })
            .filter(|_| {
                choice != TensorCores::Off
                    && features.contains(wgpu::Features::SHADER_F16)
                    && adapter.features().contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SUBGROUP)
                    && info.subgroup_min_size == info.subgroup_max_size
                    && info.subgroup_max_size > 0
            })
            .map(|fragment| {
                let subgroup = info.subgroup_max_size;
                let staged = choice == TensorCores::Staged && CoopSizes::new(fragment as usize, subgroup as usize).staged_fits(&limits);
                CoopShape { fragment, subgroup, staged }
            });
        let tensor_cores = coop_shape.is_some();
        let request = |required_features: wgpu::Features| {
            adapter.request_device(&wgpu::DeviceDescriptor {
                label: Some("memit-wgpu"),
                required_features,
                required_limits: limits.clone(),
                // SAFETY: the only experimental feature asked for is the
                // cooperative matrices, used by the tensor-core kernels
                // alone (`matmul_coop`, `matmul_coop_staged`), whose loads
                // and stores stay inside shapes the host checks.
                experimental_features: if required_features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) { unsafe { wgpu::ExperimentalFeatures::enabled() } } else { wgpu::ExperimentalFeatures::disabled() },
                ..Default::default()
            })
        };
        let with_coop = if tensor_cores { request(coop).await.ok() } else { None };
        let ((device, queue), features, coop_shape) = match with_coop {
            Some(pair) => (pair, coop, coop_shape),
            None => (request(features).await.map_err(|e| GpuError::RequestDevice(e.to_string()))?, features, None),
        };

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
        let runtime = Arc::new(Runtime::new(options.pool_bytes.unwrap_or(DEFAULT_POOL_BYTES)));
        let params_ring = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params ring"),
            size: DISPATCHES_PER_SUBMIT as u64 * PARAMS_SLOT,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Counters::bump(&runtime.counters.buffers_created, 1);
        let name = info.name.to_lowercase();
        let cpu_kernels = options.cpu_kernels.unwrap_or(info.device_type == wgpu::DeviceType::Cpu || name.contains("swiftshader"));
        let direct_product_rows = options.direct_product_rows.unwrap_or(match (cpu_kernels, name.contains("llvmpipe")) {
            (false, _) => 0,
            // Measured (`memit-bench kernels`/`profile`, 2-core host): on
            // lavapipe the 64x64 tiles win from ~48 rows, and lose below by
            // the rows they leave empty (0.3 against 0.9 GFLOP/s at 16 rows).
            (true, true) => 32,
            // SwiftShader (a browser's fallback adapter) runs workgroup
            // barriers as fibre switches: the tiles run at 0.1-0.3 GFLOP/s,
            // the direct kernel at 0.8-1.5, at every shape measured.
            (true, false) => usize::MAX,
        });
        // Measured (`memit-bench kernels`, 2-core host): lavapipe runs each
        // invocation's loads lane by lane, so a kernel that loads 64 values
        // per 1,024 multiply-adds reaches 7-9 GFLOP/s where the 64x64 tiles
        // (their 8x8 blocks through workgroup memory) reach 1.3.
        let wide_product_rows = options.wide_product_rows.unwrap_or(if cpu_kernels && name.contains("llvmpipe") { direct_product_rows } else { usize::MAX });
        // A GPU's products take 128×128 tiles (split along K where they
        // are few); CPU adapters never (their kernels above).
        let big_product_groups = options.big_product_groups.unwrap_or(if cpu_kernels { usize::MAX } else { DEFAULT_BIG_PRODUCT_GROUPS });
        let split_k = options.split_k.unwrap_or(if cpu_kernels { SplitK { target_groups: 0, min_chunk: 0 } } else { DEFAULT_SPLIT_K });
        Ok(Arc::new(GpuContext {
            device,
            queue,
            info,
            limits,
            features,
            chunk_bytes,
            cpu_kernels,
            direct_product_rows,
            wide_product_rows,
            big_product_groups,
            split_k,
            coop_shape,
            subgroup_reductions: subgroups && features.contains(wgpu::Features::SUBGROUP),
            pipelines: Mutex::new(HashMap::new()),
            runtime,
            params_ring,
            error,
        }))
    }

    #[cfg(not(target_arch = "wasm32"))]
    async fn pick_adapter(instance: &wgpu::Instance, backends: wgpu::Backends, name: Option<&str>) -> Result<wgpu::Adapter> {
        let mut adapters = instance.enumerate_adapters(backends).await;
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
        let best = adapters.into_iter().next().ok_or_else(|| GpuError::NoAdapter {
            tried: if tried.is_empty() { format!("none found among {backends:?}") } else { tried },
        })?;
        let info = best.get_info();
        if info.backend == wgpu::Backend::Gl && info.device_type == wgpu::DeviceType::Cpu {
            return Err(GpuError::SoftwareOpenGl { adapter: info.name });
        }
        Ok(best)
    }

    #[cfg(target_arch = "wasm32")]
    async fn pick_adapter(instance: &wgpu::Instance, _backends: wgpu::Backends, _name: Option<&str>) -> Result<wgpu::Adapter> {
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

    /// Whether products of f16 operands may take tensor cores
    /// (`matmul_coop`, `matmul_coop_staged`): the device has wgpu's
    /// cooperative matrices, square f16 fragments into f32.
    pub fn has_tensor_cores(&self) -> bool {
        self.coop_shape.is_some()
    }

    /// The cooperative matrices the tensor-core kernels use, where they are on.
    pub fn coop_shape(&self) -> Option<CoopShape> {
        self.coop_shape
    }

    /// Whether row reductions run within subgroups (one barrier to combine
    /// the subgroups' results) instead of as a tree through workgroup
    /// memory (ten barriers).
    pub fn subgroup_reductions(&self) -> bool {
        self.subgroup_reductions
    }

    /// Whether kernels take their variants made for CPU adapters
    /// (lavapipe, SwiftShader, WARP), where every invocation and barrier
    /// costs far more than on a GPU: row kernels then give each invocation
    /// a whole row, attention a whole query.
    pub fn cpu_kernels(&self) -> bool {
        self.cpu_kernels
    }

    /// The most rows (of A, not transposed) a matrix product may have to
    /// take `matmul_direct`, which reads its operands straight from storage
    /// with no workgroup memory or barriers: 0 on a GPU, 32 on lavapipe,
    /// unbounded on other CPU adapters (SwiftShader); `GpuOptions` can set it.
    pub fn direct_product_rows(&self) -> usize {
        self.direct_product_rows
    }

    /// When `matmul_big` products are split along K: GPUs' default, never
    /// on CPU adapters; `GpuOptions` can set it.
    pub fn split_k(&self) -> SplitK {
        self.split_k
    }

    /// Products whose `matmul_big` grid has at least this many workgroups
    /// take it: a GPU's default, none on CPU adapters; `GpuOptions` can set it.
    pub fn big_product_groups(&self) -> usize {
        self.big_product_groups
    }

    /// Products with more rows than this take `matmul_wide` where their
    /// operands' layout allows (A f32 and not transposed, offsets, strides,
    /// K and N in whole groups of four): those above `direct_product_rows`
    /// on lavapipe, none elsewhere; `GpuOptions` can set it.
    pub fn wide_product_rows(&self) -> usize {
        self.wide_product_rows
    }

    /// Invocations that cooperate on one row in row-wise kernels (norms,
    /// softmax): the whole 256-wide workgroup on a GPU, one on a CPU.
    pub(crate) fn row_lanes(&self) -> usize {
        if self.cpu_kernels { 1 } else { 256 }
    }

    /// Largest number of bytes one tensor chunk may hold.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Tensor memory now and at its peak (since the last reset), and what
    /// the buffer pool holds for reuse.
    pub fn memory(&self) -> MemoryUsage {
        let mut usage = self.runtime.meter.usage();
        usage.pooled_bytes = self.runtime.pool.lock().unwrap().idle_bytes();
        usage
    }

    /// Starts a new peak-memory measurement from what is live now.
    pub fn reset_peak_memory(&self) {
        self.runtime.meter.reset_peak();
    }

    /// Frees every buffer the pool keeps for reuse (after a phase whose
    /// shapes will not come back).
    pub fn release_pooled_buffers(&self) {
        self.runtime.pool.lock().unwrap().clear();
    }

    /// The cost counters so far; subtract an earlier snapshot with
    /// [`CostCounters::since`] to measure a phase.
    pub fn counters(&self) -> CostCounters {
        self.runtime.counters.snapshot()
    }

    /// Writes host bytes into `buffer` at `offset`. Work recorded earlier
    /// runs first: pending commands are submitted before the write when
    /// `after_pending` (the buffer may be read by them), since a queue write
    /// would otherwise land before them.
    pub(crate) fn write_bytes(&self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8], after_pending: bool) {
        if bytes.is_empty() {
            return;
        }
        if after_pending {
            self.flush();
        }
        self.queue.write_buffer(buffer, offset, bytes);
        Counters::bump(&self.runtime.counters.bytes_to_device, bytes.len() as u64);
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

    /// A buffer of at least `bytes` from the pool, or a new one. `metered`
    /// buffers count as tensor memory while alive. With `host_write` the
    /// buffer is one no unsubmitted command uses (pending work is
    /// submitted if needed), so a queue write cannot overtake earlier
    /// commands. Returns the buffer and whether it is new (zero-filled).
    pub(crate) fn alloc(&self, bytes: u64, usage: wgpu::BufferUsages, label: &str, metered: bool, host_write: bool) -> Result<(PooledBuffer, bool)> {
        let max = self.limits.max_buffer_size;
        if bytes > max {
            return Err(GpuError::OutOfMemory { context: format!("allocating {label}: {bytes} bytes exceed the adapter's max buffer size {max}") });
        }
        let cap = if usage.contains(wgpu::BufferUsages::STORAGE) { self.limits.max_storage_buffer_binding_size.min(max) } else { max };
        let size = size_class(bytes, cap);
        let metered_bytes = if metered { bytes.max(4).next_multiple_of(4) } else { 0 };
        let submits = self.runtime.submits_done();
        let reused = self.runtime.pool.lock().unwrap().take(size, usage, submits, host_write);
        if let Some((buffer, cold)) = reused {
            if host_write && !cold {
                self.flush();
            }
            return Ok((PooledBuffer::new(buffer, usage, metered_bytes, self.runtime.clone()), false));
        }
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage, mapped_at_creation: false });
        Counters::bump(&self.runtime.counters.buffers_created, 1);
        if let Err(e) = self.check(|| format!("allocating {label} ({bytes} bytes)")) {
            // A failed allocation may have been caused by idle buffers: free them for the caller's retry.
            self.release_pooled_buffers();
            return Err(e);
        }
        Ok((PooledBuffer::new(buffer, usage, metered_bytes, self.runtime.clone()), true))
    }

    fn pipeline(&self, family: ShaderFamily, entry: &'static str, defines: &[(&'static str, String)]) -> Result<Arc<CachedPipeline>> {
        let mut defines = defines.to_vec();
        if self.subgroup_reductions {
            defines.push(("SUBGROUPS", flag(true)));
        }
        let key = PipelineKey { family, entry, defines };
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let source = render(family, entry, &key.defines)?;
        let writable = writable_bindings(&source);
        let label = format!("{}::{entry}", family.name());
        let descriptor = wgpu::ShaderModuleDescriptor { label: Some(&label), source: wgpu::ShaderSource::Wgsl(source.into()) };
        let module = if family.audited(entry) {
            // SAFETY: `ShaderFamily::audited` lists the families whose every
            // buffer index is bounded by parameters the host validates and
            // whose every loop has a parameter bound; browsers keep their
            // own checks regardless.
            unsafe { self.device.create_shader_module_trusted(descriptor, wgpu::ShaderRuntimeChecks::unchecked()) }
        } else {
            self.device.create_shader_module(descriptor)
        };
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        self.take_error()?;
        let layout = pipeline.get_bind_group_layout(0);
        let pipeline = Arc::new(CachedPipeline { pipeline, layout, writable });
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// Every kernel this context has compiled, as `family::entry` and the
    /// WGSL it compiled, sorted: to check the kernels a workload used
    /// against other shader compilers (naga's Metal and DX12 writers) on a
    /// machine that has neither.
    pub fn compiled_kernels(&self) -> Result<Vec<(String, String)>> {
        let keys: Vec<PipelineKey> = self.pipelines.lock().unwrap().keys().cloned().collect();
        let mut kernels = keys
            .iter()
            .map(|k| Ok((format!("{}::{}", k.family.name(), k.entry), render(k.family, k.entry, &k.defines)?)))
            .collect::<Result<Vec<_>>>()?;
        kernels.sort();
        Ok(kernels)
    }

    /// Starts timing every dispatch on the GPU (timestamp queries around
    /// each one) until `finish_profiling`. Each submit then waits for the
    /// GPU, so profiled runs are slower than normal ones; the per-kernel
    /// times are what they measure. Native only.
    pub fn start_profiling(&self) -> Result<()> {
        if cfg!(target_arch = "wasm32") || !self.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            let detail = if cfg!(target_arch = "wasm32") { " readable without blocking (profiling is native only)" } else { "" };
            return Err(GpuError::NoTimestamps { adapter: self.info.name.clone(), detail });
        }
        self.flush();
        let queries = 2 * DISPATCHES_PER_SUBMIT as u32;
        let bytes = 8 * queries as u64;
        let buffer = |label, usage| self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: bytes, usage, mapped_at_creation: false });
        let profiler = Profiler {
            query_set: self.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("kernel timestamps"), ty: wgpu::QueryType::Timestamp, count: queries }),
            resolve: buffer("timestamp resolve", wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            readback: buffer("timestamp readback", wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ),
            period: self.queue.get_timestamp_period() as f64,
            pending: Vec::new(),
            timings: Vec::new(),
            failure: None,
        };
        self.runtime.recorder.lock().unwrap().profiler = Some(profiler);
        self.take_error()
    }

    /// Stops profiling and returns the GPU time of every dispatch since
    /// `start_profiling`, in order.
    pub fn finish_profiling(&self) -> Result<Vec<KernelTiming>> {
        self.flush();
        let profiler = self.runtime.recorder.lock().unwrap().profiler.take();
        self.take_error()?;
        match profiler {
            Some(Profiler { failure: Some(e), .. }) => Err(GpuError::Readback(format!("kernel timestamps: {e}"))),
            Some(p) => Ok(p.timings),
            None => Ok(Vec::new()),
        }
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
        self.dispatch_work(kernel, params, buffers, groups, None)
    }

    /// `dispatch`, telling a profile what the kernel computes.
    pub(crate) fn dispatch_work(
        &self,
        kernel: Kernel<'_>,
        params: &[u8],
        buffers: &[(u32, &wgpu::Buffer)],
        groups: [u32; 3],
        work: Option<Work>,
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
        if params.len() as u64 > PARAMS_SLOT {
            return Err(GpuError::Internal(format!("{}::{} parameters exceed {PARAMS_SLOT} bytes", kernel.family.name(), kernel.entry)));
        }
        let mut recorder = self.runtime.recorder.lock().unwrap();
        let offset = recorder.params.len() as u64;
        recorder.params.extend_from_slice(params);
        recorder.params.resize((offset + PARAMS_SLOT) as usize, 0);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: &self.params_ring, offset, size: NonZeroU64::new(PARAMS_SLOT) }),
        }];
        entries.extend(buffers.iter().map(|&(binding, b)| wgpu::BindGroupEntry { binding, resource: b.as_entire_binding() }));
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipeline.layout, entries: &entries });
        let pass = recorder.pass(&self.device);
        pass.set_pipeline(&pipeline.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        if let Some(profiler) = recorder.profiler.as_mut() {
            profiler.pending.push((format!("{}::{}", kernel.family.name(), kernel.entry), work));
        }
        recorder.dispatches += 1;
        Counters::bump(&self.runtime.counters.dispatches, 1);
        if recorder.dispatches >= DISPATCHES_PER_SUBMIT {
            self.submit_locked(&mut recorder);
        }
        drop(recorder);
        self.check(|| format!("running {}::{}", kernel.family.name(), kernel.entry))
    }

    /// Ends the open pass, writes the recorded dispatches' parameters into
    /// the ring and submits.
    fn submit_locked(&self, recorder: &mut Recorder) {
        recorder.pass = None;
        let timed = recorder.profiler.as_ref().map_or(0, |p| p.pending.len() as u32);
        if let Some(mut encoder) = recorder.encoder.take() {
            if !recorder.params.is_empty() {
                self.queue.write_buffer(&self.params_ring, 0, &recorder.params);
                Counters::bump(&self.runtime.counters.bytes_to_device, recorder.params.len() as u64);
            }
            if let (Some(p), true) = (recorder.profiler.as_ref(), timed > 0) {
                encoder.resolve_query_set(&p.query_set, 0..2 * timed, &p.resolve, 0);
                encoder.copy_buffer_to_buffer(&p.resolve, 0, &p.readback, 0, Some(16 * timed as u64));
            }
            self.queue.submit([encoder.finish()]);
            Counters::bump(&self.runtime.counters.submits, 1);
        }
        recorder.params.clear();
        recorder.dispatches = 0;
        if let (Some(p), true) = (recorder.profiler.as_mut(), timed > 0) {
            self.read_timestamps(p);
        }
    }

    /// Waits for the submit just made and turns its timestamps into
    /// per-dispatch times (not counted as host waits: profiling only).
    #[cfg(not(target_arch = "wasm32"))]
    fn read_timestamps(&self, p: &mut Profiler) {
        let timed = p.pending.len();
        let slice = p.readback.slice(..16 * timed as u64);
        slice.map_async(wgpu::MapMode::Read, |_| ());
        let read = self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| e.to_string()).and_then(|_| slice.get_mapped_range().map_err(|e| e.to_string()));
        match read {
            Ok(view) => {
                for (i, (kernel, work)) in p.pending.drain(..).enumerate() {
                    let tick = |j: usize| u64::from_le_bytes(view[8 * j..8 * j + 8].try_into().expect("8 bytes"));
                    let nanos = tick(2 * i + 1).saturating_sub(tick(2 * i)) as f64 * p.period;
                    p.timings.push(KernelTiming { kernel, work, nanos });
                }
            }
            // Kept for `finish_profiling`: a profile missing dispatches must not pass as whole.
            Err(e) => p.failure = p.failure.take().or(Some(e)),
        }
        p.pending.clear();
        p.readback.unmap();
    }

    /// The web cannot wait for a readback here, so a profile there fails
    /// clearly rather than passing with dispatches missing.
    #[cfg(target_arch = "wasm32")]
    fn read_timestamps(&self, p: &mut Profiler) {
        p.pending.clear();
        p.failure.get_or_insert_with(|| "kernel timestamps are read back on native only".into());
    }

    /// Submits all recorded work to the GPU without waiting for it.
    pub fn flush(&self) {
        let mut recorder = self.runtime.recorder.lock().unwrap();
        if !recorder.is_empty() {
            self.submit_locked(&mut recorder);
        }
    }

    /// Records a buffer-to-buffer copy in order with the recorded kernels.
    pub(crate) fn copy(&self, src: &wgpu::Buffer, src_offset: u64, dst: &wgpu::Buffer, dst_offset: u64, bytes: u64) {
        let mut recorder = self.runtime.recorder.lock().unwrap();
        recorder.encoder(&self.device).copy_buffer_to_buffer(src, src_offset, dst, dst_offset, Some(bytes));
    }

    /// Waits until the GPU has finished everything recorded so far and reports
    /// any error it raised. Native blocks in `poll`; on the web it awaits the
    /// browser through a tiny readback.
    pub async fn sync(&self) -> Result<()> {
        let (probe, _) = self.alloc(4, wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ, "sync probe", false, false)?;
        self.map_read(&probe, 0).await?;
        Ok(())
    }

    /// Submits pending work, waits for it, maps `staging` for reading and
    /// returns its first `len` bytes.
    pub(crate) async fn map_read(&self, staging: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        self.flush();
        Counters::bump(&self.runtime.counters.host_waits, 1);
        Counters::bump(&self.runtime.counters.bytes_from_device, len);
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
            view[..len as usize].to_vec()
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
