//! ringjit's bottom layer: the graph IR, the model DSL that builds it, the reference
//! interpreter that defines what it means, and HF checkpoints.
//!
//! Pipeline order (docs/layout.md): `dsl` → `graph` → `interp`; `checkpoint` feeds the
//! interpreter's weights; `tol` is how every numeric test compares.

pub mod checkpoint;
pub mod dsl;
pub mod dtype;
pub mod graph;
pub mod interp;
pub mod kernel;
pub mod kernel_eval;
pub mod op;
pub mod param;
pub mod shape;
pub mod tensor;
pub mod tol;

pub use dtype::DType;
pub use graph::{Graph, IrError, SrcLoc, TensorType, Value};
pub use op::Op;
pub use param::ParamSpec;
pub use shape::{Dim, DimEnv, Shape};
pub use tensor::Tensor;
pub mod fused;
