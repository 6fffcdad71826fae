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

/// Every kernel of a compiled model, alone on the GPU, against the reference evaluator on the
/// same inputs (random weights, random tokens and states), in its dtype's tier. Integer outputs
/// (chosen experts, top-k indices) must be equal.
fn kernels_match(g: &std::sync::Arc<Gpu>, config: &str, opts: passes::CompileOptions, dims: (i64, i64, i64)) {
    use crate::common::{config as cfg, kernel_tier, trace};
    let c = cfg(config, &[]);
    let t = trace(&c, &opts, dims, 11);
    let plan = runtime::cuda_plan::CudaPlan::new(
        g.clone(),
        &t.graph,
        t.plan.clone(),
        &|name| {
            t.params
                .get(name)
                .cloned()
                .ok_or_else(|| runtime::Error(format!("no parameter {name}")))
        },
        &codegen::ptx::PtxOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{config}: {e}"));
    let mut worst: Vec<(f64, String)> = Vec::new();
    for (i, k) in t.plan.kernels.iter().enumerate() {
        let got = plan
            .run_kernel(i, &t.env, &t.before[i])
            .unwrap_or_else(|e| panic!("{config} {}: {e}", k.name));
        let tier = kernel_tier(&t.plan, k);
        for (id, want) in &t.after[i] {
            let have = &got[id];
            let b = t.plan.buffer(*id).unwrap();
            if b.dtype.is_float() {
                let e = ir::tol::rel_err(have.as_f32().unwrap(), want.as_f32().unwrap());
                assert!(
                    e <= tier.op(),
                    "{config} {} output {}: rel err {e:.3e} > {:?} tier {:.0e} on {}",
                    k.name,
                    b.name,
                    tier,
                    tier.op(),
                    g.name
                );
                worst.push((e / tier.op(), format!("{} ({:.1e})", k.name, e)));
            } else {
                assert_eq!(
                    have, want,
                    "{config} {} output {} differs on {}",
                    k.name, b.name, g.name
                );
            }
        }
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    eprintln!(
        "gpu kernels {config} {:?} b{} s{} p{}: {} kernels match; closest to the tier: {}",
        opts.mode,
        dims.0,
        dims.1,
        dims.2,
        t.plan.kernels.len(),
        worst.iter().take(3).map(|w| w.1.clone()).collect::<Vec<_>>().join(", ")
    );
}

fn opts(mode: passes::Mode, precision: passes::Precision) -> passes::CompileOptions {
    passes::CompileOptions {
        mode,
        precision,
        ..Default::default()
    }
}

#[test]
fn gpu_every_kernel_of_tiny_and_small_matches_the_evaluator() {
    use passes::{Mode, Precision};
    let Some(g) = gpu() else { return };
    let g = std::sync::Arc::new(g);
    for config in ["tiny", "small"] {
        // ragged sizes: odd token counts, a cache that is not a multiple of any tile
        kernels_match(&g, config, opts(Mode::Prefill, Precision::Bf16), (2, 37, 5));
        kernels_match(&g, config, opts(Mode::Prefill, Precision::Bf16), (1, 130, 0));
        kernels_match(&g, config, opts(Mode::Decode, Precision::Bf16), (3, 1, 77));
        kernels_match(&g, config, opts(Mode::Prefill, Precision::Fp8), (1, 33, 0));
    }
}
