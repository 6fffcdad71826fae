//! The CUDA side of the runtime (cudarc, driver API loaded at run time).
//!
//! Machines without an NVIDIA driver get a clear error, never a panic: cudarc panics when
//! libcuda is absent, so its presence is checked first (shared/toolchain.md).

use crate::{err, Error, Result};
use cudarc::driver::{CudaContext, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// One GPU and the stream all of ringjit's work on it goes through.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
}

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only probes for the shared library; nothing is called through it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether a CUDA driver is here and sees at least one GPU.
pub fn gpu_present() -> bool {
    driver_present() && matches!(CudaContext::device_count(), Ok(n) if n > 0)
}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !driver_present() {
            return err(
                "no CUDA driver on this machine (libcuda.so could not be loaded); use --device cpu or reference",
            );
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error(format!("GPU {ordinal}: {e}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        // one stream of our own: a CUDA graph cannot be captured on the legacy default stream;
        // all work goes through it, so cudarc's cross-stream event tracking is not needed
        // SAFETY: no other stream of this context touches our allocations.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| Error(format!("GPU {ordinal}: creating a stream: {e}")))?;
        Ok(Gpu { ctx, stream, name })
    }

    /// Load PTX text; a PTX the driver refuses is reported with ptxas's log when ptxas is here.
    pub fn load_ptx(&self, ptx: &str) -> Result<Arc<CudaModule>> {
        self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| {
            let log = match codegen::ptxas::check(ptx) {
                Err(l) => format!("\n{l}"),
                Ok(_) => String::new(),
            };
            Error(format!("the driver could not load the PTX: {e}{log}"))
        })
    }
}

/// Run the axpy kernel emitted by `codegen::ptx` on `n` random-ish values and return the
/// largest relative error against the host (a smoke test of LLVM → PTX → driver → launch).
pub fn axpy_check(gpu: &Gpu, n: usize) -> Result<f64> {
    let ptx = codegen::ptx::axpy_ptx(&codegen::ptx::GpuTarget::default()).map_err(|e| Error(e.0))?;
    let module = gpu.load_ptx(&ptx)?;
    let f = module.load_function("axpy").map_err(|e| Error(format!("axpy: {e}")))?;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0).collect();
    let y: Vec<f32> = (0..n).map(|i| ((i * 104729 % 997) as f32 - 498.0) / 100.0).collect();
    let a = 1.5f32;
    let s = &gpu.stream;
    let dx = s.clone_htod(&x).map_err(|e| Error(format!("copy to GPU: {e}")))?;
    let mut dy = s.clone_htod(&y).map_err(|e| Error(format!("copy to GPU: {e}")))?;
    let nn = n as i32;
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = s.launch_builder(&f);
    b.arg(&a).arg(&dx).arg(&mut dy).arg(&nn);
    // SAFETY: the kernel reads n floats of x and y and writes n floats of y; both hold n.
    unsafe { b.launch(cfg) }.map_err(|e| Error(format!("launching axpy: {e}")))?;
    let out = s.clone_dtoh(&dy).map_err(|e| Error(format!("copy from GPU: {e}")))?;
    let want: Vec<f32> = x.iter().zip(&y).map(|(x, y)| a * x + y).collect();
    Ok(ir::tol::rel_err(&out, &want))
}

/// Which cuda decode plans fold each RMSNorm into the GEMM that reads it (`passes::normgemm`).
/// On an H200 a Ring-mini decode step is 7–8 % faster folded at batch 1 (the GEMV paths) but
/// 3–7 % slower at batch 64 (the tensor-core paths, where the residual adds moved into GEMM
/// epilogues cost more than the norm kernels saved; docs/perf.md). The cpu device always folds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldNorms {
    /// Two decode plans: folded for batches up to [`FOLD_BATCH`], norms apart above (default).
    SmallBatches,
    /// Every decode plan folded (`RINGJIT_FOLD_NORM=1`).
    Always,
    /// No decode plan folded (`RINGJIT_FOLD_NORM=0`).
    Never,
}

/// The largest decode batch that runs the folded plan under [`FoldNorms::SmallBatches`]: the
/// GEMMs' rows up to here take the GEMV paths.
pub const FOLD_BATCH: usize = codegen::ptx::GEMV_ROWS as usize;

/// `RINGJIT_FOLD_NORM`: `1` always, `0` never, unset (or anything else) for small batches.
pub fn fold_policy() -> FoldNorms {
    match std::env::var("RINGJIT_FOLD_NORM").as_deref() {
        Ok("1") => FoldNorms::Always,
        Ok("0") => FoldNorms::Never,
        _ => FoldNorms::SmallBatches,
    }
}

/// Whether the main cuda decode plan (every batch under `Always`, the batches above
/// [`FOLD_BATCH`] otherwise) folds its norms.
pub fn fold_norms() -> bool {
    fold_policy() == FoldNorms::Always
}

/// Whether a second, folded decode plan serves the batches up to [`FOLD_BATCH`].
pub fn fold_small_batches() -> bool {
    fold_policy() == FoldNorms::SmallBatches
}
