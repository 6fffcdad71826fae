//! Every CPU kernel against `ir::kernel_eval` on fresh random inputs: each kernel of the
//! compiled tiny Ring model (every loop shape and template kind the model uses, prologues and
//! epilogues included) runs in isolation on the reference evaluator's memory, at ragged sizes,
//! and its outputs are compared in the tolerance tier of their dtype.

use super::*;
use ir::checkpoint::RandomWeights;
use ir::kernel::{BufferId, KernelPlan};
use ir::kernel_eval::{Eval, Memory};
use ir::op::Op;
use ir::tol::{rel_err, Tol};
use ir::DType;
use passes::{Mode, Precision};
use std::collections::HashMap;

/// Host memory for one buffer: 8-byte aligned, `bytes` long.
fn alloc(bytes: usize) -> Vec<u64> {
    vec![0u64; bytes.div_ceil(8).max(1)]
}

fn tier(d: DType) -> Option<f64> {
    match d {
        DType::F32 => Some(Tol::F32.op()),
        DType::BF16 | DType::F16 => Some(Tol::BF16.op()),
        DType::F8E4M3 | DType::F8E5M2 => Some(Tol::FP8.op()),
        _ => None, // integers and bools: exact
    }
}

/// Runs every kernel of `plan` on the CPU and in the evaluator, from the evaluator's memory.
fn check_plan_kernels(g: &ir::graph::Graph, plan: &KernelPlan, env: &DimEnv, seed: u64) -> usize {
    let compiled = compile_plan(plan).unwrap_or_else(|e| panic!("{e}"));
    let weights = RandomWeights::new(seed);
    let mut params = HashMap::new();
    for spec in g.params().unwrap() {
        params.insert(
            spec.name.clone(),
            ir::interp::ParamSource::load(&weights, &spec).unwrap().to_f64_vec(),
        );
    }
    for b in &plan.buffers {
        if let Op::Literal { value } = &g.node(b.value.node).op {
            params.insert(b.name.clone(), value.to_f64_vec());
        }
    }
    let inputs = passes::testing::random_inputs(g, env, seed, 1.0, 200);
    let mut mem = Memory::new();
    for (&n, &b) in g.inputs.iter().zip(&plan.inputs) {
        let Op::Input { name, .. } = &g.node(n).op else {
            unreachable!()
        };
        mem.insert(b, inputs[name].to_f64_vec());
    }
    for (i, b) in plan.buffers.iter().enumerate() {
        if b.kind == ir::kernel::BufferKind::Param {
            mem.insert(BufferId(i as u32), params[&b.name].clone());
        }
    }
    let eval = Eval { env, params: &params };
    let syms: Vec<i64> = compiled.symbols.iter().map(|s| env[s]).collect();
    let mut checked = 0;
    for (k, ck) in plan.kernels.iter().zip(&compiled.kernels) {
        // the kernel's buffers in their dtypes, from the evaluator's memory
        let mut host: HashMap<BufferId, Vec<u64>> = HashMap::new();
        for r in k.inputs.iter().chain(&k.outputs) {
            let b = plan.buffer(r.buffer).unwrap();
            let n = b.numel().eval(env).unwrap() as usize;
            let mut h = alloc(n * b.dtype.size_bytes());
            if let Some(vals) = mem.get(&r.buffer) {
                for (i, x) in vals.iter().enumerate() {
                    unsafe { host::store_elem(h.as_mut_ptr() as *mut u8, b.dtype, i, *x) };
                }
            }
            host.entry(r.buffer).or_insert(h);
        }
        let bufs: Vec<BufPtr> = k
            .inputs
            .iter()
            .chain(&k.outputs)
            .map(|r| BufPtr(host.get_mut(&r.buffer).unwrap().as_mut_ptr() as *mut u8))
            .collect();
        ck.run(&Launch {
            bufs: &bufs,
            syms: &syms,
            env,
            par: &Serial,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        eval.kernel(plan, k, &mut mem).unwrap();
        for r in &k.outputs {
            let b = plan.buffer(r.buffer).unwrap();
            let want: Vec<f32> = mem[&r.buffer].iter().map(|&x| x as f32).collect();
            let h = &host[&r.buffer];
            let got: Vec<f32> = (0..want.len())
                .map(|i| unsafe { host::load_elem(h.as_ptr() as *const u8, b.dtype, i) } as f32)
                .collect();
            let err = rel_err(&got, &want);
            // the tier of the loosest float dtype the kernel touches: a kernel that rounds
            // bf16 intermediates (an expert's down projection) is in the bf16 tier even when
            // its output is f32 (as ir::fused's tests judge composites)
            let loosest = k
                .inputs
                .iter()
                .chain(&k.outputs)
                .filter_map(|r| tier(plan.buffer(r.buffer).unwrap().dtype))
                .fold(0.0f64, f64::max);
            match tier(b.dtype).map(|t| t.max(loosest)) {
                Some(bound) => assert!(
                    err <= bound,
                    "{} ({}) output {}: error {err:.3e} > {bound:.0e} at {env:?}\n{k}",
                    k.name,
                    k.kind_name(),
                    b.name
                ),
                None => assert_eq!(got, want, "{} output {} at {env:?}", k.name, b.name),
            }
            checked += 1;
        }
    }
    checked
}

#[test]
fn every_kernel_of_the_tiny_model_matches_the_evaluator_at_ragged_sizes() {
    let g = passes::testing::model("tiny");
    let mut kinds = std::collections::BTreeSet::new();
    for (mode, precision, sizes) in [
        (Mode::Prefill, Precision::Bf16, vec![(1, 7, 0), (2, 33, 3)]),
        (Mode::Decode, Precision::Bf16, vec![(1, 1, 5), (3, 1, 130)]),
        (Mode::Prefill, Precision::Fp8, vec![(1, 5, 0)]),
        (Mode::Decode, Precision::Fp8, vec![(2, 1, 7)]),
    ] {
        let (fused, _) = passes::compile(
            &g,
            &passes::CompileOptions {
                precision,
                ..passes::testing::opts(mode)
            },
        )
        .unwrap();
        let plan = passes::partition::partition(&fused).unwrap();
        for k in &plan.kernels {
            kinds.insert(k.kind_name());
        }
        for (i, (b, s, p)) in sizes.into_iter().enumerate() {
            let env = passes::testing::env(b, s, p);
            assert!(check_plan_kernels(&fused, &plan, &env, 11 + i as u64) > 0);
        }
    }
    for kind in ["loop", "gemm", "grouped_gemm", "attention"] {
        assert!(kinds.contains(kind), "the tiny model has no {kind} kernel: {kinds:?}");
    }
}

#[test]
fn a_cranelift_error_names_the_kernel() {
    let g = passes::testing::model("tiny");
    let (fused, _) = passes::compile(&g, &passes::testing::opts(Mode::Decode)).unwrap();
    let mut plan = passes::partition::partition(&fused).unwrap();
    // two functions of one name: cranelift-module refuses the second definition
    let loops: Vec<usize> = (0..plan.kernels.len())
        .filter(|&i| matches!(plan.kernels[i].kind, KernelKind::Loop(_)))
        .collect();
    let name = plan.kernels[loops[0]].name.clone();
    plan.kernels[loops[1]].name = name.clone();
    let e = compile_plan(&plan)
        .err()
        .expect("a duplicate function must not compile");
    assert!(e.starts_with(&format!("{name}: ")), "{e}");
}

#[test]
fn every_kernel_of_the_small_model_matches_the_evaluator_in_bf16() {
    let g = passes::testing::model("small");
    for (mode, (b, s, p)) in [(Mode::Prefill, (1, 5, 0)), (Mode::Decode, (2, 1, 3))] {
        let (fused, _) = passes::compile(&g, &passes::testing::opts(mode)).unwrap();
        let plan = passes::partition::partition(&fused).unwrap();
        check_plan_kernels(&fused, &plan, &passes::testing::env(b, s, p), 21);
    }
}

#[test]
fn the_gemm_matches_a_naive_product_at_ragged_sizes() {
    use super::gemm::{gemm_batched, MatRef};
    let (_jit, kernels) = gemm_kernels();
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut unit = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    for &(m, n, k) in &[
        (1, 7, 33),
        (7, 33, 130),
        (33, 130, 7),
        (130, 33, 300),
        (3, 130, 513),
        (1, 1, 1),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| unit()).collect();
        // B given transposed ([n, k], columns contiguous) and row-major ([k, n])
        let bt: Vec<f32> = (0..n * k).map(|_| unit()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| bt[(i % n) * k + i / n]).collect();
        let want: Vec<f32> = (0..m * n)
            .map(|x| {
                let (i, j) = (x / n, x % n);
                (0..k)
                    .map(|p| f64::from(a[i * k + p]) * f64::from(bt[j * k + p]))
                    .sum::<f64>() as f32
            })
            .collect();
        let ar = MatRef {
            data: &a,
            base: 0,
            rs: k,
            cs: 1,
        };
        for br in [
            MatRef {
                data: &bt,
                base: 0,
                rs: 1,
                cs: k,
            },
            MatRef {
                data: &b,
                base: 0,
                rs: n,
                cs: 1,
            },
        ] {
            let mut c = vec![f32::NAN; m * n];
            gemm_batched(kernels, &[(ar, br, 0)], &mut c, (m, n, k), &Serial);
            let err = rel_err(&c, &want);
            assert!(err <= Tol::F32.op(), "gemm {m}x{n}x{k} (rs {}): error {err:.3e}", br.rs);
        }
    }
}

/// Not a test: single-thread GEMM throughput (`cargo test -p ringjit-codegen --release
/// bench_gemm_gflops -- --ignored --nocapture`), for docs/perf.md.
#[test]
#[ignore]
fn bench_gemm_gflops() {
    use super::gemm::{gemm_batched, MatRef};
    let (_jit, kernels) = gemm_kernels();
    for &(m, n, k) in &[(512, 512, 512), (128, 1024, 512), (1, 4096, 1024)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let ar = MatRef {
            data: &a,
            base: 0,
            rs: k,
            cs: 1,
        };
        let br = MatRef {
            data: &b,
            base: 0,
            rs: 1,
            cs: k,
        };
        let reps = 5;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            gemm_batched(kernels, &[(ar, br, 0)], &mut c, (m, n, k), &Serial);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "gemm {m}x{n}x{k}: {:.2} ms, {:.1} GFLOP/s (1 thread)",
            s * 1e3,
            2.0 * (m * n * k) as f64 / s / 1e9
        );
    }
}

/// The GEMM's generated kernels, in a module the caller keeps alive.
fn gemm_kernels() -> (expr::Jit, gemm::GemmKernels) {
    let mut jit = expr::Jit::new().unwrap();
    let micro = gemm::compile_micro_kernel(&mut jit).unwrap();
    let dot = gemm::compile_dot_kernel(&mut jit).unwrap();
    jit.module.finalize_definitions().unwrap();
    // SAFETY: both were declared with exactly these signatures.
    let kernels = unsafe {
        gemm::GemmKernels {
            micro: std::mem::transmute::<*const u8, gemm::MicroKernel>(jit.module.get_finalized_function(micro)),
            dot: std::mem::transmute::<*const u8, gemm::DotKernel>(jit.module.get_finalized_function(dot)),
        }
    };
    (jit, kernels)
}
