//! Code generation: kernel IR → PTX (LLVM NVPTX through inkwell) and → native code (Cranelift).

pub mod cpu;
pub mod fill;
pub mod ptx;
pub mod ptxas;
