//! MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023)
//! on the memit-wgpu GPU stack. The same code runs natively and in the
//! browser: the only `await`s are GPU readbacks.

mod edit;
mod error;
mod hparams;
mod integrity;
mod keys;
mod nullspace;
mod patch;
mod plan;
mod request;
mod solve;
mod stats;
mod target;
mod templates;

pub use edit::{apply_edit, apply_memit, apply_update, EditMethod, EditState, compute_targets, compute_targets_with, spread_over_layers, EditOutcome, LayerCovariance, LayerUpdate, PhaseCost, PhaseCounters, Phases, Progress};
pub use error::{MemitError, Result};
pub use hparams::Hparams;
pub use patch::{LayerChange, Patch, PatchLayer};
pub use plan::{gib, DeviceLimits, MemoryPlan, PhasePlan, PlanError, PlanOptions, RequestShape, POOL_BYTES};
pub use keys::{keys_and_outputs, KeysAndOutputs};
pub use nullspace::{null_space_projector, NullSpaceProjector, RESOLVED_BAND};
pub use solve::{assemble_system, solve_layer, solve_system, solve_definite_on_host, solve_system_on_gpu, LayerSolve, LayerSystem, HOST_SOLVE_MAX_WIDTH};
pub use request::{parse_requests, requests_from_json, subject_last_index, EditRequest, PreparedRequest, TargetText};
pub use stats::{load_cache, read_cache, StatsAccumulator, StatsIdentity};
pub use target::{compute_target_vectors, StepLoss, TargetCost, TargetOptions, TargetVector};
pub use templates::context_templates;
