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
use passes::{Family, Mode, Precision};
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
const GENERATED: [&str; 24] = [
    "quantize_fp8",
    "dequantize_fp8",
    "scaled_gemm_fp8",
    "rms_norm_quant_fp8",
    "add_rms_norm_quant_fp8",
    "swiglu_quant_fp8",
    "topk",
    "argmax",
    "scatter_add",
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
    "linear_attn_chunk_gate",
    "linear_attn_step_gate",
    "linear_attn_step_qk_gate",
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
        // a folded route is checked on the backend's own router logits (see Eval::route_tail)
        let routed = routed_outputs(plan, k, &mem, &eval, &host);
        for r in &k.outputs {
            let b = plan.buffer(r.buffer).unwrap();
            let want: Vec<f32> = routed
                .get(&r.buffer)
                .unwrap_or(&mem[&r.buffer])
                .iter()
                .map(|&x| x as f32)
                .collect();
            let h = &host[&r.buffer];
            let got: Vec<f32> = (0..want.len())
                .map(|i| unsafe { host::load_elem(h.as_ptr() as *const u8, b.dtype, i) } as f32)
                .collect();
            // non-finite values (a mask's -inf) must match exactly; the tier applies to the rest
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    w.is_finite() || g == w || (g.is_nan() && w.is_nan()),
                    "{} output {} element {i}: {g} for {w} at {env:?}",
                    k.name,
                    b.name
                );
            }
            let finite = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .zip(&want)
                    .map(|(&x, w)| if w.is_finite() { x } else { 0.0 })
                    .collect()
            };
            let err = rel_err(&finite(&got), &finite(&want));
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

/// The route outputs of a GEMM with a folded route as the evaluator computes them from the
/// backend's result 0 (`host`); empty for other kernels.
fn routed_outputs(
    plan: &KernelPlan,
    k: &ir::kernel::Kernel,
    mem: &Memory,
    eval: &Eval,
    host: &HashMap<BufferId, Vec<u64>>,
) -> HashMap<BufferId, Vec<f64>> {
    if !k.routes() {
        return HashMap::new();
    }
    let y = &k.outputs[0];
    let b = plan.buffer(y.buffer).unwrap();
    let h = &host[&y.buffer];
    let n = mem[&y.buffer].len();
    let mut m = mem.clone();
    m.insert(
        y.buffer,
        (0..n)
            .map(|i| unsafe { host::load_elem(h.as_ptr() as *const u8, b.dtype, i) })
            .collect(),
    );
    eval.route_tail(plan, k, &mut m).unwrap();
    k.outputs[k.outputs.len() - 2..]
        .iter()
        .map(|r| (r.buffer, m[&r.buffer].clone()))
        .collect()
}

#[test]
fn every_kernel_of_the_tiny_model_matches_the_evaluator_at_ragged_sizes() {
    let g = passes::testing::model("tiny");
    let mut kinds = std::collections::BTreeSet::new();
    // without the MoE rewrites the routing stays primitive: top-k kernels
    let no_moe = vec![Family::Scan, Family::Fp8, Family::Fuse];
    for (mode, precision, families, sizes) in [
        (
            Mode::Prefill,
            Precision::Bf16,
            Family::ALL.to_vec(),
            vec![(1, 7, 0), (2, 33, 3)],
        ),
        (
            Mode::Decode,
            Precision::Bf16,
            Family::ALL.to_vec(),
            vec![(1, 1, 5), (3, 1, 130)],
        ),
        (
            Mode::Prefill,
            Precision::Fp8,
            Family::ALL.to_vec(),
            vec![(1, 5, 0), (2, 33, 3)],
        ),
        (Mode::Decode, Precision::Fp8, Family::ALL.to_vec(), vec![(2, 1, 7)]),
        (Mode::Prefill, Precision::Bf16, no_moe.clone(), vec![(2, 9, 0)]),
        (Mode::Decode, Precision::Fp8, no_moe, vec![(3, 1, 4)]),
    ] {
        let (fused, _) = passes::compile(
            &g,
            &passes::CompileOptions {
                precision,
                families,
                ..passes::testing::opts(mode)
            },
        )
        .unwrap();
        // decode plans as they are and with each route folded into its router's GEMM
        // (passes::routegemm)
        let folds: &[bool] = if mode == Mode::Decode { &[false, true] } else { &[false] };
        for &fold in folds {
            let plan = passes::partition::partition_with(&fused, fold).unwrap();
            for k in &plan.kernels {
                kinds.insert(k.kind_name());
            }
            for (i, &(b, s, p)) in sizes.iter().enumerate() {
                let env = passes::testing::env(b, s, p);
                assert!(check_plan_kernels(&fused, &plan, &env, 11 + i as u64) > 0);
            }
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
        "linear_attn_step_qk_gate",
        "route_topk",
        "quantize_fp8",
        "scaled_gemm_fp8",
        "rms_norm_quant_fp8",
        "add_rms_norm_quant_fp8",
        "swiglu_quant_fp8",
        "topk",
    ] {
        assert!(kinds.contains(kind), "the tiny model has no {kind} kernel: {kinds:?}");
    }
    // the kinds no compiled plan holds are tested on graphs of their own below
    for kind in GENERATED {
        assert!(
            kinds.contains(kind)
                || [
                    "softmax",
                    "dequantize_fp8",
                    "argmax",
                    "scatter_add",
                    "linear_attn_step",
                    "linear_attn_chunk_gate",
                    // (at decode the steps make their own q and k: fold-qk-norm-step)
                    "linear_attn_step_gate"
                ]
                .contains(&kind),
            "{kind} is in a model plan now: drop it from the direct tests' list"
        );
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
        let folds: &[bool] = if mode == Mode::Decode { &[false, true] } else { &[false] };
        for &fold in folds {
            let plan = passes::partition::partition_with(&fused, fold).unwrap();
            check_plan_kernels(&fused, &plan, &passes::testing::env(b, s, p), 21);
        }
    }
}

#[test]
fn every_kernel_of_the_small_model_matches_the_evaluator_in_fp8() {
    let g = passes::testing::model("small");
    for (mode, (b, s, p)) in [(Mode::Prefill, (2, 9, 0)), (Mode::Decode, (2, 1, 3))] {
        let opts = passes::CompileOptions {
            precision: Precision::Fp8,
            ..passes::testing::opts(mode)
        };
        let (fused, _) = passes::compile(&g, &opts).unwrap();
        let plan = passes::partition::partition(&fused).unwrap();
        check_plan_kernels(&fused, &plan, &passes::testing::env(b, s, p), 23);
    }
}

/// A graph of primitive and composite ops on inputs of fixed shapes, for the kinds no model
/// plan contains: its plan's kernels are checked against the evaluator like a model's.
struct OpGraph {
    g: ir::graph::Graph,
    inputs: usize,
}

impl OpGraph {
    fn new() -> OpGraph {
        OpGraph {
            g: ir::graph::Graph::new(),
            inputs: 0,
        }
    }

    fn input(&mut self, dtype: DType, shape: &[i64]) -> ir::graph::Value {
        self.inputs += 1;
        let shape = shape.iter().map(|&d| ir::shape::Dim::constant(d)).collect();
        self.g
            .add_input(&format!("x{}", self.inputs), ir::op::InputKind::Data, dtype, shape)
    }

    fn op(&mut self, op: Op, args: &[ir::graph::Value]) -> Vec<ir::graph::Value> {
        self.g.add(op, args, None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn fused(&mut self, f: ir::fused::Fused, args: &[ir::graph::Value]) -> Vec<ir::graph::Value> {
        self.op(Op::Fused(f), args)
    }

    fn output(&mut self, v: ir::graph::Value) {
        let name = format!("y{}", self.g.outputs.len());
        self.g.add_output(&name, v, ir::op::InputKind::Data);
    }

    /// Partitions, checks every kernel (several seeds), returns the kernel kinds.
    fn check(&self) -> Vec<&'static str> {
        let plan = passes::partition::partition(&self.g).unwrap_or_else(|e| panic!("{e}"));
        let env = passes::testing::env(1, 1, 0);
        for seed in [31, 32] {
            assert!(check_plan_kernels(&self.g, &plan, &env, seed) > 0);
        }
        plan.kernels.iter().map(|k| k.kind_name()).collect()
    }
}

#[test]
fn fp8_templates_outside_the_models_match_the_evaluator_at_ragged_sizes() {
    use ir::fused::Fused;
    // 128×128 weight blocks of a computed (not cached) input, 1×128 tiles, dequantisation to
    // every float dtype, and the scaled GEMM over batch dims with K and N ragged in their blocks
    for (batch, m, k, n) in [(2, 17, 300, 200), (1, 3, 128, 129), (3, 1, 77, 64)] {
        for out in [DType::F32, DType::BF16] {
            let mut g = OpGraph::new();
            let x = g.input(DType::F32, &[batch, m, k]);
            let w = g.input(DType::F32, &[k, n]);
            let qa = g.fused(Fused::QuantizeFp8 { rows: 1, cols: 128 }, &[x]);
            let qb = g.fused(Fused::QuantizeFp8 { rows: 128, cols: 128 }, &[w]);
            let y = g.fused(Fused::ScaledMatmulFp8 { out }, &[qa[0], qa[1], qb[0], qb[1]]);
            g.output(y[0]);
            for to in [DType::F32, DType::BF16, DType::F16] {
                let d = g.fused(
                    Fused::DequantizeFp8 {
                        rows: 128,
                        cols: 128,
                        to,
                    },
                    &[qb[0], qb[1]],
                );
                g.output(d[0]);
            }
            let d = g.fused(
                Fused::DequantizeFp8 {
                    rows: 1,
                    cols: 128,
                    to: DType::F32,
                },
                &[qa[0], qa[1]],
            );
            g.output(d[0]);
            let kinds = g.check();
            for kind in ["quantize_fp8", "dequantize_fp8", "scaled_gemm_fp8"] {
                assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
            }
        }
    }
    // the fused producers in bf16 (their intermediates rounded to bf16 before quantising)
    for (rows, d) in [(5, 200), (1, 64), (3, 384)] {
        let mut g = OpGraph::new();
        let h = g.input(DType::BF16, &[rows, d]);
        let a = g.input(DType::BF16, &[rows, d]);
        let w = g.input(DType::BF16, &[d]);
        for y in g.fused(Fused::RmsNormQuantFp8 { eps: 1e-6 }, &[h, w]) {
            g.output(y);
        }
        for y in g.fused(Fused::AddRmsNormQuantFp8 { eps: 1e-6 }, &[h, a, w]) {
            g.output(y);
        }
        for y in g.fused(Fused::SwiGluQuantFp8, &[h, a]) {
            g.output(y);
        }
        let kinds = g.check();
        for kind in ["rms_norm_quant_fp8", "add_rms_norm_quant_fp8", "swiglu_quant_fp8"] {
            assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
        }
    }
}

/// The lightning templates with and without the folded group norm (model plans hold the folded
/// step and the chunked form apart from its group norm: `scan-gate-into-*`, `GATE_SYNC_US`),
/// with groups of several heads, of one head and of part of
/// one (H 3, d 8: 1, 3 and 6 groups), at ragged token counts.
#[test]
fn lightning_templates_with_and_without_the_gate_match_the_evaluator() {
    use ir::fused::Fused;
    for (b, t, h, d, groups) in [(2, 7, 3, 8, 3), (1, 1, 3, 8, 1), (2, 19, 4, 8, 8), (1, 33, 3, 8, 6)] {
        for chunk in [Some(16), None] {
            let mut g = OpGraph::new();
            let s0 = g.input(DType::F32, &[b, h, d, d]);
            let q = g.input(DType::F32, &[b, t, h, d]);
            let k = g.input(DType::F32, &[b, t, h, d]);
            let v = g.input(DType::F32, &[b, t, h, d]);
            let lam = g.input(DType::F32, &[h, 1, 1]);
            let w = g.input(DType::BF16, &[h * d]);
            let gate = g.input(DType::F32, &[b, t, h * d]);
            let (scan, folded) = match chunk {
                Some(c) => (Fused::LinearAttnChunk { chunk: c }, "linear_attn_chunk_gate"),
                None => (Fused::LinearAttnStep, "linear_attn_step_gate"),
            };
            let so = g.fused(scan.clone(), &[s0, q, k, v, lam]);
            let y = g.fused(Fused::GroupNormGate { groups, eps: 1e-6 }, &[so[1], w, gate]);
            g.output(so[0]);
            g.output(y[0]);
            let gated = g.fused(
                Fused::LinearAttnGate {
                    chunk,
                    groups,
                    eps: 1e-6,
                },
                &[s0, q, k, v, lam, w, gate],
            );
            g.output(gated[0]);
            g.output(gated[1]);
            let kinds = g.check();
            for kind in [scan.name(), "group_norm_gate", folded] {
                assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
            }
        }
    }
}

#[test]
fn selections_and_scatters_match_the_evaluator_at_ragged_sizes() {
    for dtype in [DType::F32, DType::BF16, DType::I64] {
        for (shape, axis, k) in [([2, 9, 37], 1usize, 5usize), ([3, 4, 130], 2, 7), ([1, 1, 3], 2, 3)] {
            let mut g = OpGraph::new();
            let x = g.input(dtype, &shape);
            let top = g.op(Op::TopK { k, axis }, &[x]);
            g.output(top[0]);
            g.output(top[1]);
            for ax in 0..3 {
                let am = g.op(Op::ArgMax { axis: ax }, &[x]);
                g.output(am[0]);
            }
            // scatter-add at the top-k indices (in range) into a longer axis
            let mut zs = shape;
            zs[axis] += 3;
            let z = g.input(dtype, &zs);
            let mut ss = shape;
            ss[axis] = k as i64;
            let src = g.input(dtype, &ss);
            let sc = g.op(Op::ScatterAddAlong { axis }, &[z, top[1], src]);
            g.output(sc[0]);
            let kinds = g.check();
            for kind in ["topk", "argmax", "scatter_add"] {
                assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
            }
        }
    }
}

#[test]
fn row_templates_in_f16_and_fp8_match_the_evaluator() {
    use ir::fused::Fused;
    for dt in [DType::F16, DType::F8E4M3, DType::F8E5M2] {
        for d in [37i64, 128] {
            let mut g = OpGraph::new();
            let x = g.input(dt, &[3, 5, d]);
            let a = g.input(dt, &[3, 5, d]);
            let w = g.input(dt, &[d]);
            let y = g.fused(Fused::RmsNorm { eps: 1e-6 }, &[x, w]);
            g.output(y[0]);
            for y in g.fused(Fused::AddRmsNorm { eps: 1e-6 }, &[x, a, w]) {
                g.output(y);
            }
            let y = g.fused(Fused::Softmax, &[x]);
            g.output(y[0]);
            let q = g.input(dt, &[2, 5, 3, 16]);
            let wq = g.input(dt, &[16]);
            let pos = g.input(DType::I64, &[5]);
            let inv = g.input(DType::F32, &[4]);
            let y = g.fused(Fused::QkNormRope { eps: 1e-6, rotary: 8 }, &[q, wq, pos, inv]);
            g.output(y[0]);
            let kinds = g.check();
            for kind in ["rms_norm", "add_rms_norm", "softmax", "qk_norm_rope"] {
                assert!(kinds.contains(&kind), "{kind} missing from {kinds:?} in {dt}");
            }
        }
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

/// f32 values that probe every rounding path: random bit patterns over the whole range,
/// values near each format's limits and ties, zeros, infinities and NaN.
fn probe_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut out: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            f32::from_bits((s >> 16) as u32)
        })
        .collect();
    for v in [
        0.0f32,
        -0.0,
        1.0,
        1.0625,
        1.07,
        -3.3,
        448.0,
        464.0,
        465.0,
        480.0,
        1000.0,
        57344.0,
        61440.0,
        65504.0,
        65519.0,
        65520.0,
        1e6,
        3.4e38,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-45,
    ] {
        out.push(v);
        out.push(-v);
    }
    // around the smallest normals and subnormals of every format, and random magnitudes
    for e in [-6, -7, -9, -10, -14, -15, -16, -17, -24, -25, -126, -133] {
        let p = 2f32.powi(e);
        out.extend([p, p * 1.5, p * 0.75, p * 1.25, p * 0.5, -p * 1.5]);
    }
    out.extend(values(200, seed, 600.0));
    out.extend(values(200, seed + 1, 0.02));
    out
}

fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn the_generated_rounding_and_fp8_kernels_are_bit_exact() {
    let (_jit, vk) = vec_kernels();
    let x = probe_values(4000, 0x5eed);
    let ones = vec![1f32; x.len()];
    for dt in [DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::F8E5M2] {
        let code = vector::round_code(dt).unwrap();
        // rms with inv = w = 1 is exactly `round(x)`; both the f32x4 body and the tail
        for n in [x.len(), x.len() - 3] {
            let mut y = vec![0f32; n];
            unsafe { (vk.rms)(n as i64, x.as_ptr(), ones.as_ptr(), y.as_mut_ptr(), 1.0, code, 0) };
            for (i, (&v, &r)) in x.iter().zip(&y).enumerate() {
                assert!(
                    same_bits(r, dt.round(v)),
                    "{dt} round({v:e}) = {r:e}, want {:e} (#{i})",
                    dt.round(v)
                );
            }
        }
    }
    // quantisation: the reference's division, E4M3 rounding and encoding, bit for bit
    let xs: Vec<f32> = x.iter().copied().filter(|v| v.is_finite()).collect();
    for scale in [1.0f32, 0.37, 3.0e-3, 1.0e30, f32::MIN_POSITIVE] {
        let mut q = vec![0u8; xs.len()];
        unsafe { (vk.quant)(xs.len() as i64, xs.as_ptr(), q.as_mut_ptr(), scale) };
        for (&v, &b) in xs.iter().zip(&q) {
            let want = DType::F8E4M3.encode_float(v / scale) as u8;
            assert_eq!(b, want, "quant({v:e} / {scale:e})");
        }
    }
    // dequantisation of every byte, to every float dtype
    let bytes: Vec<u8> = (0..=255u8).collect();
    for dt in [DType::F32, DType::BF16, DType::F16, DType::F8E4M3] {
        for scale in [1.0f32, 0.0137, 1.0e-30] {
            let mut y = vec![0f32; 256];
            let nan = unsafe {
                (vk.dequant)(
                    256,
                    bytes.as_ptr(),
                    y.as_mut_ptr(),
                    scale,
                    vector::round_code(dt).unwrap(),
                )
            };
            assert!(nan.is_nan(), "E4M3 0x7f is NaN: the kernel must say so");
            for (b, &got) in y.iter().enumerate() {
                let want = dt.round(DType::F8E4M3.decode_float(b as u32) * scale);
                assert!(
                    same_bits(got, want),
                    "dequant({b:#x}) · {scale:e} to {dt}: {got} vs {want}"
                );
            }
            let finite: Vec<u8> = bytes.iter().copied().filter(|b| b & 0x7f != 0x7f).collect();
            let nan = unsafe { (vk.dequant)(finite.len() as i64, finite.as_ptr(), y.as_mut_ptr(), scale, 0) };
            assert_eq!(nan, 0.0);
        }
    }
    // amax: NaN-propagating, |-0| = 0
    for n in [1usize, 3, 4, 9, 130] {
        let v = values(n, 40 + n as u64, 5.0);
        let m = unsafe { (vk.amax)(n as i64, v.as_ptr()) };
        assert_eq!(m, v.iter().fold(0f32, |m, x| m.max(x.abs())), "amax n={n}");
        let mut w = v.clone();
        w[n / 2] = f32::NAN;
        assert!(unsafe { (vk.amax)(n as i64, w.as_ptr()) }.is_nan());
    }
    // the i64 selection: descending, ties to the lowest index, then -1
    let v = [3i64, -7, 3, i64::MAX, i64::MIN, 0, 3];
    let mut taken = [0u8; 7];
    let order: Vec<i64> = (0..8)
        .map(|_| unsafe { (vk.argmax_i64)(7, v.as_ptr(), taken.as_mut_ptr()) })
        .collect();
    assert_eq!(order, [3, 0, 2, 6, 5, 1, 4, -1]);
}

#[test]
fn the_generated_swiglu_and_scatter_match_the_reference() {
    let (_jit, vk) = vec_kernels();
    // swiglu with its rounding points (ir::fused::norm::swiglu: sigmoid in f64)
    for (gd, od) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F32),
    ] {
        for n in [1usize, 4, 7, 130] {
            let g: Vec<f32> = values(n, 50 + n as u64, 12.0).iter().map(|&v| gd.round(v)).collect();
            let u: Vec<f32> = values(n, 60 + n as u64, 2.0).iter().map(|&v| gd.round(v)).collect();
            let mut y = vec![0f32; n];
            let codes = (vector::round_code(gd).unwrap(), vector::round_code(od).unwrap());
            unsafe { (vk.swiglu)(n as i64, g.as_ptr(), u.as_ptr(), y.as_mut_ptr(), codes.0, codes.1) };
            let want: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(&a, &b)| {
                    let s = gd.round((1.0 / (1.0 + (-f64::from(a)).exp())) as f32);
                    od.round(gd.round(a * s) * b)
                })
                .collect();
            let err = rel_err(&y, &want);
            let tier = if gd == DType::F32 {
                Tol::F32.op()
            } else {
                Tol::BF16.op()
            };
            assert!(err <= tier, "swiglu {gd}->{od} n={n}: {err:.3e}");
        }
    }
    // scatter into a column with stride: f64 sums in source order, and a bad index refused
    let (m, n, post) = (6usize, 4usize, 3usize);
    let idx: Vec<i64> = (0..m * post).map(|i| ((i * 7) % n) as i64).collect();
    let src = values(m * post, 77, 3.0);
    let mut acc = vec![0.5f64; n * post];
    let mut want = acc.clone();
    for j in 0..m {
        want[idx[j * post] as usize * post] += f64::from(src[j * post]);
    }
    let r = unsafe {
        (vk.scatter_f64)(
            m as i64,
            idx.as_ptr(),
            src.as_ptr(),
            acc.as_mut_ptr(),
            post as i64,
            n as i64,
        )
    };
    assert_eq!((r, &acc), (-1, &want));
    let bad: Vec<i64> = idx
        .iter()
        .enumerate()
        .map(|(i, &x)| if i == 2 * post { -1 } else { x })
        .collect();
    let r = unsafe {
        (vk.scatter_f64)(
            m as i64,
            bad.as_ptr(),
            src.as_ptr(),
            acc.as_mut_ptr(),
            post as i64,
            n as i64,
        )
    };
    assert_eq!(r, 2);
    let srci: Vec<i64> = (0..m * post).map(|i| i as i64 * 1_000_000_007 - 5).collect();
    let mut acci = vec![i64::MAX; n * post];
    let mut wanti = acci.clone();
    for j in 0..m {
        let d = idx[j * post] as usize * post;
        wanti[d] = wanti[d].wrapping_add(srci[j * post]);
    }
    let r = unsafe {
        (vk.scatter_i64)(
            m as i64,
            idx.as_ptr(),
            srci.as_ptr(),
            acci.as_mut_ptr(),
            post as i64,
            n as i64,
        )
    };
    assert_eq!((r, &acci), (-1, &wanti));
}

#[test]
fn the_fp8_gemm_packs_b_from_bytes_and_block_scales() {
    use super::gemm::{e4m3_values, gemm_fp8_b, Fp8Mat, MatRef, FP8_BLOCK};
    let (_jit, kernels) = gemm_kernels();
    for &(m, n, k) in &[(1, 7, 33), (5, 200, 300), (33, 129, 130), (2, 513, 257), (16, 67, 129)] {
        let a = values(m * k, 3 + m as u64, 1.0);
        let q: Vec<u8> = (0..k * n).map(|i| ((i * 37 + 11) % 256) as u8 & 0xf7).collect(); // no NaN
        let (kb, nb) = (k.div_ceil(FP8_BLOCK), n.div_ceil(FP8_BLOCK));
        let scales: Vec<f32> = values(kb * nb, 9, 1.0).iter().map(|v| v.abs() + 0.01).collect();
        let deq = |i: usize, j: usize| {
            e4m3_values()[usize::from(q[i * n + j])] * scales[(i / FP8_BLOCK) * nb + j / FP8_BLOCK]
        };
        let want: Vec<f32> = (0..m * n)
            .map(|x| {
                let (i, j) = (x / n, x % n);
                (0..k)
                    .map(|p| f64::from(a[i * k + p]) * f64::from(deq(p, j)))
                    .sum::<f64>() as f32
            })
            .collect();
        let ar = MatRef {
            data: &a,
            base: 0,
            rs: k,
            cs: 1,
        };
        let b = Fp8Mat {
            q: &q,
            base: 0,
            rs: n,
            cs: 1,
            scales: &scales,
            scale_cols: nb,
        };
        let mut c = vec![f32::NAN; m * n];
        gemm_fp8_b(kernels, ar, b, &mut c, (m, n, k), &Serial);
        let err = rel_err(&c, &want);
        assert!(err <= Tol::F32.op(), "fp8 gemm {m}x{n}x{k}: error {err:.3e}");
        // the whole scaled GEMM (A dequantised per 1×128 tile; few rows take the GEMV path)
        let (_vjit, vk) = vec_kernels();
        let aq: Vec<u8> = (0..m * k).map(|i| ((i * 53 + 7) % 256) as u8 & 0xf7).collect();
        let a_s: Vec<f32> = values(m * kb, 19, 1.0).iter().map(|v| v.abs() + 0.01).collect();
        let deq_a = |i: usize, p: usize| e4m3_values()[usize::from(aq[i * k + p])] * a_s[i * kb + p / FP8_BLOCK];
        let want: Vec<f32> = (0..m * n)
            .map(|x| {
                let (i, j) = (x / n, x % n);
                (0..k)
                    .map(|p| f64::from(deq_a(i, p)) * f64::from(deq(p, j)))
                    .sum::<f64>() as f32
            })
            .collect();
        let mut c = vec![f32::NAN; m * n];
        quant::scaled_gemm(kernels, &vk, (&aq, &a_s), b, (m, n, k), &mut c, &Serial).unwrap();
        let err = rel_err(&c, &want);
        assert!(err <= Tol::F32.op(), "scaled gemm {m}x{n}x{k}: error {err:.3e}");
    }
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
