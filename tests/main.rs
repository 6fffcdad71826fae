//! Whole-pipeline tests: DSL → graph → interpreter on the Ring-linear configs, checkpoints,
//! parity with the independent numpy reference, and the CLI. One test binary (LLVM-linked
//! binaries are large; see shared/toolchain.md).

mod common;

mod cli;
mod cpu;
mod gpu;
mod model;
mod parity;
