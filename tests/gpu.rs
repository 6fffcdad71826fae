//! Tests that need an NVIDIA GPU. They skip (pass, saying so) where there is no CUDA driver;
//! scripts/gpu-check.sh runs them on the GPU machine.

use ir::tol::Tol;
use runtime::cuda::{driver_present, Gpu};

fn gpu() -> Option<Gpu> {
    if !driver_present() {
        eprintln!("skipped: no CUDA driver on this machine");
        return None;
    }
    Some(Gpu::open(0).expect("a CUDA driver is present but GPU 0 does not open"))
}

#[test]
fn gpu_axpy_from_llvm_ptx_matches_the_host() {
    let Some(g) = gpu() else { return };
    for n in [1, 255, 256, 1000, 1 << 20] {
        let e = runtime::cuda::axpy_check(&g, n).unwrap();
        assert!(e <= Tol::F32.op(), "axpy n={n} on {}: rel err {e}", g.name);
    }
    eprintln!("gpu axpy ok on {}", g.name);
}

#[test]
fn no_driver_is_a_clear_error() {
    if driver_present() {
        return;
    }
    let e = Gpu::open(0).err().expect("no driver, no GPU");
    assert!(e.0.contains("no CUDA driver"), "{e}");
}
