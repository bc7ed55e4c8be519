use thiserror::Error;

/// Everything that can go wrong between the MEMIT math and the GPU.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum GpuError {
    #[error("no usable GPU adapter found (tried: {tried}). On a machine without a GPU install a software Vulkan driver (Debian: `apt-get install mesa-vulkan-drivers`) and, if several drivers exist, pin it with VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json; for a GPU that only has OpenGL, set MEMIT_BACKEND=gl")]
    NoAdapter { tried: String },

    #[error("the only adapter is `{adapter}`, a software OpenGL renderer, about 10x slower than software Vulkan and not used: install Mesa's software Vulkan driver (Debian: `apt-get install mesa-vulkan-drivers`) or a GPU's Vulkan driver")]
    SoftwareOpenGl { adapter: String },

    #[error("MEMIT_BACKEND / --backend {0:?} is not a backend: use vulkan, metal, dx12 or gl")]
    UnknownBackend(String),

    #[error("MEMIT_CPU_KERNELS is {0:?}: use 1 (CPU kernel variants) or 0 (GPU variants), or unset it to let the adapter decide")]
    UnknownKernelChoice(String),

    #[error("MEMIT_BIG_PRODUCT_GROUPS is {0:?}: use a whole number of workgroups, or unset it to let the adapter decide")]
    BadBigProductGroups(String),

    #[error("MEMIT_TENSOR_CORES is {0:?}: use 1 (tensor cores where the adapter has them), subgroup (only the one-subgroup tile kernel) or 0 (portable kernels only)")]
    UnknownTensorCoreChoice(String),
    #[error("MEMIT_SUBGROUPS is {0:?}: use 1 (row reductions within subgroups where the adapter has them) or 0 (through workgroup memory only)")]
    UnknownSubgroupChoice(String),

    #[error("adapter `{adapter}` limit `{limit}` is {have}, but memit-wgpu needs at least {need}")]
    LimitTooSmall { adapter: String, limit: &'static str, have: u64, need: u64 },

    #[error("could not open the GPU device: {0}")]
    RequestDevice(String),

    #[error("GPU out of memory while {context}; try a smaller batch or fewer layers at once")]
    OutOfMemory { context: String },

    #[error("a tensor row of {row_bytes} bytes does not fit in one storage binding ({max_binding} bytes on this adapter)")]
    RowTooLarge { row_bytes: u64, max_binding: u64 },

    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },

    #[error("{op} does not support dtype {dtype:?} here: {detail}")]
    Dtype { op: &'static str, dtype: crate::DType, detail: &'static str },

    #[error("matrix is not positive definite (pivot {pivot} is not positive); the statistics may be degenerate or too few")]
    NotPositiveDefinite { pivot: usize },

    #[error("GPU validation error (a bug in memit-wgpu, please report it): {0}")]
    Validation(String),

    #[error("GPU internal error: {0}")]
    Internal(String),

    #[error("adapter `{adapter}` cannot time kernels: it has no timestamp queries{detail}")]
    NoTimestamps { adapter: String, detail: &'static str },

    #[error("reading a buffer back from the GPU failed: {0}")]
    Readback(String),

    #[error("shader template `{shader}` is missing a value for `{key}`")]
    Template { shader: &'static str, key: String },
}

impl GpuError {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        GpuError::Shape { op, detail: detail.into() }
    }
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;
