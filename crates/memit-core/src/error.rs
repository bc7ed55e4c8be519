use memit_gpu::GpuError;
use memit_models::ModelError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MemitError {
    #[error("request {index}: {detail}")]
    Request { index: usize, detail: String },

    #[error("covariance statistics: {0}")]
    Stats(String),

    #[error("patch: {0}")]
    Patch(String),

    #[error("hyperparameters: {0}")]
    Hparams(String),

    #[error(transparent)]
    Model(#[from] ModelError),

    #[error(transparent)]
    Gpu(#[from] GpuError),
}

pub type Result<T, E = MemitError> = std::result::Result<T, E>;
