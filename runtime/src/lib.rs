//! ringjit's runtime: loads a model (DSL file + config + weights), runs it on a device with
//! per-sequence inference state, samples tokens and measures speed.
//!
//! Devices: `reference` runs the graph through `ir::interp` (the oracle); `cpu` runs its kernel
//! plan as Cranelift-generated code on all cores (`cpu`, docs/cpu-backend.md) and is what `auto`
//! picks; `cuda` runs it on an NVIDIA GPU (`cuda_plan`, with the decode step's KV caches paged
//! by the GPU's virtual memory, `paged`).

pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod cuda_plan;
pub mod engine;
pub mod gpu_bench;
pub mod model;
pub mod paged;
pub mod sample;

pub use engine::{Device, Engine, EngineOptions, State};
pub use model::{LoadedModel, ModelSpec};

use std::fmt;

/// A runtime error: a message meant for the person at the terminal.
#[derive(Debug, Clone, PartialEq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<ir::IrError> for Error {
    fn from(e: ir::IrError) -> Self {
        Error(e.to_string())
    }
}

impl From<ir::dsl::elab::DslError> for Error {
    fn from(e: ir::dsl::elab::DslError) -> Self {
        Error(e.to_string())
    }
}

impl From<ir::checkpoint::CheckpointError> for Error {
    fn from(e: ir::checkpoint::CheckpointError) -> Self {
        Error(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}
