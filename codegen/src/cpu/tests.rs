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

/// The kernel kinds that run generated code (loops, GEMMs, the row kernels of rows.rs).
const GENERATED: [&str; 12] = [
    "route_topk",
    "loop",
    "gemm",
    "grouped_gemm",
    "rms_norm",
    "add_rms_norm",
    "softmax",
    "qk_norm_rope",
    "group_norm_gate",
    "attention",
    "linear_attn_chunk",
    "linear_attn_step",
];

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
        // the templates the backend generates must not fall back to their reference semantics
        if GENERATED.contains(&k.kind_name()) {
            assert!(
                ck.is_generated(),
                "{} ({}) runs its reference semantics",
                k.name,
                k.kind_name()
            );
        }
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
    eprintln!("kernel kinds of the tiny model: {kinds:?}");
    for kind in [
        "loop",
        "gemm",
        "grouped_gemm",
        "attention",
        "rms_norm",
        "add_rms_norm",
        "qk_norm_rope",
        "group_norm_gate",
        "linear_attn_chunk",
        "linear_attn_step",
        "route_topk",
    ] {
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

fn vec_kernels() -> (expr::Jit, vector::VecKernels) {
    let mut jit = expr::Jit::new().unwrap();
    let ids = vector::compile(&mut jit).unwrap();
    jit.module.finalize_definitions().unwrap();
    let vk = ids.resolve(&jit);
    (jit, vk)
}

/// Deterministic values in about [-scale, scale], none of them zero.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f32) / (1u64 << 24) as f32; // [0, 1)
            (u * 2.0 - 1.0) * scale + if u < 0.5 { -1e-3 } else { 1e-3 }
        })
        .collect()
}

#[test]
fn the_row_kernels_match_scalar_arithmetic_at_ragged_lengths() {
    let (_jit, vk) = vec_kernels();
    for n in [0usize, 1, 3, 4, 5, 8, 13, 37, 128, 130] {
        let x = values(n, n as u64, 3.0);
        let w = values(n, 100 + n as u64, 1.5);
        // dot and max
        let want: f64 = x.iter().zip(&w).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
        let got = unsafe { (vk.dot)(n as i64, x.as_ptr(), w.as_ptr()) };
        assert!(
            (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "dot n={n}: {got} vs {want}"
        );
        let m = unsafe { (vk.maxv)(n as i64, x.as_ptr()) };
        assert_eq!(m, x.iter().copied().fold(f32::NEG_INFINITY, f32::max), "max n={n}");
        // rms-apply with every rounding combination: bit-exact with DType::round
        for (rn, ro) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            let mut y = vec![0f32; n];
            unsafe { (vk.rms)(n as i64, x.as_ptr(), w.as_ptr(), y.as_mut_ptr(), 0.37, rn, ro) };
            let r = |v: f32, f: i64| if f == 1 { DType::BF16.round(v) } else { v };
            let want: Vec<f32> = x.iter().zip(&w).map(|(&a, &b)| r(r(a * 0.37, rn) * b, ro)).collect();
            assert_eq!(y, want, "rms n={n} rn={rn} ro={ro}");
        }
        // axpby
        let mut y = w.clone();
        unsafe { (vk.axpby)(n as i64, x.as_ptr(), y.as_mut_ptr(), 0.5, -2.0) };
        for i in 0..n {
            assert!(
                (y[i] - (-2.0 * w[i] + 0.5 * x[i])).abs() <= 1e-5 * (1.0 + y[i].abs()),
                "axpby n={n}"
            );
        }
        // exp: relative error and the sum
        let xs = values(n, 7 + n as u64, 40.0);
        let mut e = vec![0f32; n];
        let sum = unsafe { (vk.exp)(n as i64, xs.as_ptr(), e.as_mut_ptr(), 1.0, -1.0) };
        let mut want_sum = 0f64;
        for i in 0..n {
            // the argument is formed in f32, as in the kernel
            let want = f64::from(xs[i] - 1.0).exp();
            want_sum += want;
            assert!(
                ((f64::from(e[i]) - want) / want).abs() < 1e-6,
                "exp({}) = {} vs {want}",
                xs[i] - 1.0,
                e[i]
            );
        }
        assert!(
            (f64::from(sum) - want_sum).abs() <= 1e-5 * want_sum.max(1e-30),
            "exp sum n={n}"
        );
    }
    // argmax: NaN first, then descending, ties by the lowest index (a stable descending sort)
    let v = [1.0f32, 3.0, f32::NAN, 3.0, -0.0, 0.0, f32::NEG_INFINITY, f32::NAN];
    let mut taken = [0u8; 8];
    let order: Vec<i64> = (0..9)
        .map(|_| unsafe { (vk.argmax)(8, v.as_ptr(), taken.as_mut_ptr()) })
        .collect();
    assert_eq!(order, [2, 7, 1, 3, 0, 4, 5, 6, -1]);
    // exp at the clamps and NaN
    let xs = [-1000.0f32, -87.0, 0.0, 88.0, f32::NAN];
    let mut e = [0f32; 5];
    unsafe { (vk.exp)(5, xs.as_ptr(), e.as_mut_ptr(), 1.0, 0.0) };
    assert!(
        e[0] >= 0.0 && e[0] < 1e-37 && e[2] == 1.0 && e[3].is_finite() && e[4].is_nan(),
        "{e:?}"
    );
}

#[test]
fn the_generated_softmax_matches_the_reference() {
    // softmax is in no compiled model plan of the tests: checked here against ir::fused's
    // arithmetic (f64 exponentials and sum) at ragged row lengths
    let (_jit, vk) = vec_kernels();
    for n in [1usize, 3, 4, 7, 64, 65, 257] {
        let rows = 5;
        let x = values(rows * n, 3 + n as u64, 8.0);
        let mut y = vec![0f32; x.len()];
        rows::softmax(&vk, &x, n, &mut y, &Serial).unwrap();
        let mut want = vec![0f32; x.len()];
        for (xr, wr) in x.chunks(n).zip(want.chunks_mut(n)) {
            let m = xr.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let e: Vec<f64> = xr.iter().map(|&v| (f64::from(v) - m).exp()).collect();
            let s: f64 = e.iter().sum();
            for (w, v) in wr.iter_mut().zip(&e) {
                *w = (v / s) as f32;
            }
        }
        let err = rel_err(&y, &want);
        assert!(err <= Tol::F32.op(), "softmax n={n}: error {err:.3e}");
    }
    // a row holding NaN gives NaN, as the reference does
    let x = [1.0f32, f32::NAN, 2.0, 0.5, 3.0];
    let mut y = [0f32; 5];
    rows::softmax(&vk, &x, 5, &mut y, &Serial).unwrap();
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
}
