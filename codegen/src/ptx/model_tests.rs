//! Emitter tests: structure of generated kernels, and the whole-model check that every kernel of
//! the Ring-linear configs assembles with ptxas (no spills in loop kernels).

use super::*;
use crate::ptxas;
use passes::testing::{model, opts};
use passes::{Mode, Precision};
use std::collections::HashMap;

/// The kernel plan of `config` in `mode` / `precision`.
fn plan_of(config: &str, mode: Mode, precision: Precision) -> KernelPlan {
    let g = model(config);
    let mut o = opts(mode);
    o.precision = precision;
    let (g, _) = passes::compile(&g, &o).unwrap_or_else(|e| panic!("{config}: {e}"));
    passes::partition::partition(&g).unwrap_or_else(|e| panic!("{config}: {e}"))
}

fn first<'p>(plan: &'p KernelPlan, pred: &dyn Fn(&Kernel) -> bool) -> Option<&'p Kernel> {
    plan.kernels.iter().find(|k| pred(k))
}

/// The same kernel in every layer is one compile: kernels that differ only in name share their
/// PTX body (entry named `ENTRY`), compiled once per process, and each kernel's own PTX is that
/// body under its name.
#[test]
fn kernels_alike_but_for_their_names_share_one_compile() {
    let plan = plan_of("small", Mode::Decode, Precision::Bf16);
    let hits = cache::memo_hits();
    let ks = compile_plan(&plan, &PtxOptions::default()).unwrap();
    let mut bodies: HashMap<&str, Vec<&PtxKernel>> = HashMap::new();
    for k in &ks {
        assert!(k.body.contains(&format!(".entry {ENTRY}(")), "{}", k.name);
        assert!(!k.body.contains(&k.name), "{}", k.name);
        let code = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(code(&k.ptx), code(&k.body.replace(ENTRY, &k.name)), "{}", k.name);
        bodies.entry(&k.body).or_default().push(k);
    }
    // small has 8 layers of two kinds: far fewer distinct bodies than kernels
    assert!(
        bodies.len() * 3 < ks.len(),
        "{} distinct bodies for {} kernels",
        bodies.len(),
        ks.len()
    );
    assert!(cache::memo_hits() >= hits + ks.len() - bodies.len());
}

#[test]
fn loop_reductions_use_shuffles_and_gemm_emits_an_entry() {
    let plan = plan_of("tiny", Mode::Prefill, Precision::Bf16);
    let o = PtxOptions::default();
    let mut seen_reduce = false;
    for k in &plan.kernels {
        let p = match &k.kind {
            KernelKind::Scan(_) => continue,
            _ => compile_kernel(&plan, k, &o).unwrap_or_else(|e| panic!("{e}")),
        };
        assert!(p.ptx.contains(&format!(".visible .entry {}(", k.name)), "{}", p.ptx);
        assert!(p.ptx.starts_with("// ringjit kernel"), "{}", p.ptx);
        assert_eq!(p.arch, "sm_90");
        assert_eq!(p.n_params, k.inputs.len() + k.outputs.len() + 2);
        if let KernelKind::Loop(l) = &k.kind {
            if l.exprs.has_reduce() {
                seen_reduce = true;
                assert!(p.ptx.contains("shfl.sync.bfly"), "{}", p.ptx);
                assert!(p.ptx.contains("bar.sync"), "{}", p.ptx);
            }
        }
        if k.kind_name() == "rms_norm" {
            assert!(p.ptx.contains("shfl.sync.bfly"), "{}", p.ptx);
        }
    }
    let _ = seen_reduce;
    let g = first(&plan, &|k| k.kind_name() == "gemm").expect("tiny has GEMMs");
    let p = compile_kernel(&plan, g, &o).unwrap();
    assert!(p.ptx.contains("fma.rn.f32"), "{}", p.ptx);
}

#[test]
fn scans_are_refused_and_fp8_kernels_convert_with_satfinite() {
    let plan = plan_of("tiny", Mode::Prefill, Precision::Fp8);
    let o = PtxOptions::default();
    let q = first(&plan, &|k| {
        k.kind_name() == "quantize_fp8" || k.kind_name().ends_with("quant_fp8")
    })
    .expect("fp8 plan quantises");
    let p = compile_kernel(&plan, q, &o).unwrap();
    assert!(p.ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), "{}", p.ptx);
    let fake = Kernel {
        kind: KernelKind::Scan(ir::kernel::ScanKernel {
            axis: 0,
            length: Dim::constant(1),
            n_carry: 0,
            n_seq: 0,
            body: Box::default(),
        }),
        ..q.clone()
    };
    let e = compile_kernel(&plan, &fake, &o).unwrap_err();
    assert!(e.0.contains("host loop"), "{e}");
}

/// Every loop and template kernel of the four configs in prefill, decode and fp8 prefill
/// assembles; loop kernels do not spill. Identical kernels (up to their names) are assembled
/// once, two ptxas processes at a time.
#[test]
fn every_model_kernel_assembles_with_ptxas() {
    if let Err(e) = ptxas::find_ptxas() {
        eprintln!("\n\n!!!!! SKIPPING the ptxas check: {e} !!!!!\n\n");
        return;
    }
    // body with the name blanked -> (name, is loop)
    let mut unique: HashMap<String, (String, bool, String)> = HashMap::new();
    let mut count = 0;
    for config in ["tiny", "small", "ring-mini-linear-2.0", "ring-flash-linear-2.0"] {
        for (mode, precision, in_place) in [
            (Mode::Prefill, Precision::Bf16, false),
            (Mode::Decode, Precision::Bf16, false),
            (Mode::Decode, Precision::Bf16, true),
            (Mode::Prefill, Precision::Fp8, false),
        ] {
            let mut plan = plan_of(config, mode, precision);
            if in_place {
                // the decode step the GPU runtime replays: KV caches appended in place
                plan = passes::inplace::append_in_place(&plan).unwrap().0;
            }
            let o = PtxOptions {
                prefill: mode == Mode::Prefill,
                ..Default::default()
            };
            let ks = compile_plan(&plan, &o).unwrap_or_else(|e| panic!("{config} {mode:?} {precision:?}: {e}"));
            if in_place {
                // the runtime lays the step out once for a capacity of many thousand tokens
                // (its paged caches' reservation): no launch may grow with the context
                for k in &ks {
                    let dims = k.launch.grid.iter().map(|g| &g.extent).chain([&k.scratch_bytes]);
                    for d in dims {
                        assert!(
                            d.symbols().all(|s| s != "past" && s != passes::inplace::CAP),
                            "{config}: {} launches over {d}",
                            k.name
                        );
                    }
                }
            }
            let mut loops = std::collections::HashSet::new();
            mark_loops(&plan, &mut loops);
            for k in ks {
                count += 1;
                let body: String = k
                    .ptx
                    .lines()
                    .filter(|l| !l.starts_with("//"))
                    .collect::<Vec<_>>()
                    .join("\n");
                let key = body.replace(&k.name, "K");
                let is_loop = loops.contains(&k.name);
                unique.entry(key).or_insert((k.name.clone(), is_loop, k.ptx.clone()));
            }
        }
    }
    let jobs: Vec<(String, bool, String)> = unique.into_values().collect();
    let results = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((name, is_loop, ptx)) = jobs.get(i) else { break };
                let r = ptxas::check(ptx);
                results.lock().unwrap().push((name.clone(), *is_loop, r));
            });
        }
    });
    let mut failures = Vec::new();
    let (mut max_regs, mut worst) = (0, String::new());
    for (name, is_loop, r) in results.into_inner().unwrap() {
        match r {
            Err(e) => failures.push(format!("{name}: {e}")),
            Ok(rep) => {
                for k in &rep.kernels {
                    if k.registers > max_regs {
                        max_regs = k.registers;
                        worst = k.name.clone();
                    }
                    if is_loop && (k.spill_stores > 0 || k.spill_loads > 0) {
                        failures.push(format!("loop or attention kernel {name} spills: {k:?}"));
                    }
                }
            }
        }
    }
    eprintln!(
        "ptxas: {count} kernels, {} distinct; max {max_regs} registers ({worst})",
        jobs.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn mark_loops(plan: &KernelPlan, out: &mut std::collections::HashSet<String>) {
    for k in &plan.kernels {
        match &k.kind {
            KernelKind::Loop(_) => {
                out.insert(k.name.clone());
            }
            KernelKind::Scan(s) => mark_loops(&s.body, out),
            KernelKind::Template(_) => {
                // the attention templates keep their state in registers: they must not spill
                if ["attention", "linear_attn_chunk", "linear_attn_step"].contains(&k.kind_name()) {
                    out.insert(k.name.clone());
                }
            }
        }
    }
}

/// The attention templates take the tiled paths: the flash kernel stages tiles in dynamic
/// shared memory and reduces with warp shuffles; the linear recurrence stages tokens in shared
/// memory and spreads each head over several blocks.
#[test]
fn attention_templates_are_tiled() {
    for (mode, want_split) in [(Mode::Prefill, true), (Mode::Decode, true)] {
        for config in ["tiny", "ring-mini-linear-2.0"] {
            let plan = plan_of(config, mode, Precision::Bf16);
            let o = PtxOptions {
                prefill: mode == Mode::Prefill,
                ..Default::default()
            };
            let a = first(&plan, &|k| k.kind_name() == "attention").expect("softmax layers");
            let p = compile_kernel(&plan, a, &o).unwrap();
            // bf16 q/k/v with d = 128 in a prefill plan: the tensor-core path (tiny is f32)
            let tensor_cores = config != "tiny" && mode == Mode::Prefill;
            assert_eq!(
                p.ptx.contains("mma.sync.aligned.m16n8k16"),
                tensor_cores,
                "{config} {mode:?}"
            );
            assert_eq!(p.ptx.contains("ldmatrix.sync.aligned.m8n8.x4.trans"), tensor_cores);
            assert!(p.ptx.contains(".extern .shared"), "{}", p.ptx);
            assert!(p.ptx.contains("shfl.sync.bfly"), "{}", p.ptx);
            assert!(p.ptx.contains("ld.shared.v4.f32"), "{}", p.ptx);
            // (the SIMT prefill path hands probabilities through shared memory per warp)
            assert!(tensor_cores || p.ptx.contains("bar.warp.sync"), "{}", p.ptx);
            assert!(p.launch.shared_bytes > 0, "{}", p.launch);
            assert_eq!(p.launch.block, [256, 1, 1]);
            // decode: the keys split over blocks, partials in scratch, the last block combines
            assert!(p.ptx.contains("atom.global.add.u32"), "{}", p.ptx);
            assert!(p.ptx.contains("membar.gl"), "{}", p.ptx);
            assert!(p.ptx.contains("ld.volatile.global.f32"), "{}", p.ptx);
            assert!(p.scratch_bytes.is_symbolic(), "{}", p.scratch_bytes);
            let l = first(&plan, &|k| k.kind_name().starts_with("linear_attn")).expect("linear layers");
            let p = compile_kernel(&plan, l, &o).unwrap();
            assert!(p.ptx.contains("st.shared.f32"), "{}", p.ptx);
            assert!(p.ptx.contains("bar.sync"), "{}", p.ptx);
            assert_eq!(p.launch.block, [256, 1, 1]);
            if config != "tiny" && want_split {
                // d = 128: four blocks of 32 columns per (batch, head) in decode, eight of 16 in
                // prefill (a batch-1 prefill gets 8 · 16 heads blocks)
                let n = if mode == Mode::Prefill { 128 } else { 64 };
                let g = p.launch.to_string();
                assert!(
                    g.contains(&format!("{n}*batch")) || g.contains(&format!("batch*{n}")),
                    "{}",
                    p.launch
                );
                assert!(p.ptx.contains("ld.shared.v4.f32"), "{}", p.ptx);
            }
        }
    }
}

/// The bf16 GEMMs of a model take the fast paths: tensor cores (`mma.sync` fed by `ldmatrix`
/// and `cp.async`) for many rows, 16-byte weight loads for the decode GEMV, in one module of
/// 256 threads that ptxas assembles without spills; a GEMM whose A is a prologue computes A
/// into shared memory (16-byte shared stores) and keeps the tensor cores.
#[test]
fn bf16_gemms_use_tensor_cores_and_vector_loads() {
    use ir::kernel::{Operand, TemplateOp};
    let plan = plan_of("small", Mode::Prefill, Precision::Bf16);
    let o = PtxOptions::default();
    let gemm = |prologue: bool| {
        first(&plan, &|k| match &k.kind {
            KernelKind::Template(t) => {
                matches!(t.op, TemplateOp::Gemm(_))
                    && matches!(t.operands[1], Operand::Buffer(_))
                    && matches!(t.operands[0], Operand::Prologue(_)) == prologue
            }
            _ => false,
        })
        .expect("small has bf16 GEMMs")
    };
    for (k, prologue) in [(gemm(false), false), (gemm(true), true)] {
        let p = compile_kernel(&plan, k, &o).unwrap();
        for want in [
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
            "cp.async.cg.shared.global",
            "ld.global.v4.u32",
            "ld.shared.v4.u32",
            "shfl.sync.bfly",
        ] {
            assert!(p.ptx.contains(want), "{}: no {want}\n{}", k.name, p.ptx);
        }
        if prologue {
            assert!(
                p.ptx.contains("st.shared.v4") || p.ptx.contains("st.shared.v8"),
                "{}",
                p.ptx
            );
        }
        assert_eq!(p.launch.block, [256, 1, 1]);
        match ptxas::check(&p.ptx) {
            Ok(r) => {
                eprintln!("{}: {:?}", k.name, r.kernels[0]);
                assert_eq!(r.kernels[0].spill_stores, 0, "{}: {r:?}", k.name);
                assert_eq!(r.kernels[0].spill_loads, 0, "{}: {r:?}", k.name);
            }
            Err(e) if e.0.contains("ptxas") && e.0.contains("not found") => eprintln!("skipped ptxas: {e}"),
            Err(e) => panic!("{}: {e}", k.name),
        }
    }
    // the MoE expert GEMMs (both epilogues) stream the expert weights with 16-byte loads
    super::templates::fastgemm::force_grouped_mma();
    let (mut grouped, mut swiglus) = (0, 0);
    for k in plan.kernels.iter().filter(|k| k.kind_name() == "grouped_gemm") {
        let p = compile_kernel(&plan, k, &o).unwrap();
        assert!(p.ptx.contains("ld.global.v4.u32"), "{}: {}", k.name, p.ptx);
        assert!(p.ptx.contains("shfl.sync.bfly"), "{}: {}", k.name, p.ptx);
        assert_eq!(p.launch.block, [256, 1, 1]);
        let swiglu = matches!(
            &k.kind,
            KernelKind::Template(t) if matches!(
                t.op,
                TemplateOp::GroupedGemm { epilogue: ir::fused::GroupedEpilogue::SwiGlu, .. }
            )
        );
        // many tokens: the expert-major tensor-core tiles, chosen at run time (both epilogues),
        // the pairs listed through a shared counter; the grid is the tiles' (E · column tiles)
        assert_eq!(
            p.launch.grid[1].extent,
            ir::Dim::constant(1),
            "{}: {}",
            k.name,
            p.launch
        );
        for want in [
            "atom.shared.add.u32",
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
            "cp.async.cg.shared.global",
        ] {
            assert!(p.ptx.contains(want), "{}: no {want}", k.name);
        }
        if swiglu {
            swiglus += 1;
            assert_eq!(p.scratch_bytes, ir::Dim::constant(0), "{}", k.name);
        } else {
            // the down projection: rows in scratch, arrival counters zeroed by the runtime
            assert!(p.ptx.contains("atom.global.add.u32"), "{}: no arrival counter", k.name);
            assert!(p.scratch_zero.is_symbolic(), "{}", p.scratch_zero);
            assert!(p.scratch_bytes.is_symbolic(), "{}", p.scratch_bytes);
        }
        match ptxas::check(&p.ptx) {
            Ok(r) => assert_eq!(r.kernels[0].spill_stores, 0, "{}: {r:?}", k.name),
            Err(e) if e.0.contains("ptxas") && e.0.contains("not found") => eprintln!("skipped ptxas: {e}"),
            Err(e) => panic!("{}: {e}", k.name),
        }
        grouped += 1;
    }
    assert!(grouped >= 2 && swiglus >= 1, "small routes experts");
}

/// The routing kernel is one block per token with the threads over the experts (no serial
/// rounds: ranks counted within a group, then within a chunk of 32 experts, then among the
/// chunks' k candidates: past 32 experts, never E compares an expert), for the models' expert counts and others
/// (odd group sizes, more experts than threads), and assembles without spills.
#[test]
fn route_topk_is_block_parallel_for_any_expert_count() {
    let o = PtxOptions::default();
    for (e, groups, keep, k) in [
        (8, 4, 2, 2),
        (16, 4, 2, 4),
        (256, 8, 4, 8),
        (96, 3, 2, 5),
        (40, 40, 7, 7),
        (126, 63, 10, 9),
        (512, 8, 4, 8),
        (1000, 10, 3, 12),
        (3, 1, 1, 3),
    ] {
        let g = passes::testing::route_graph(e, groups, keep, k);
        let plan = passes::partition::partition(&g).unwrap_or_else(|err| panic!("{e}: {err}"));
        let rk = first(&plan, &|k| k.kind_name() == "route_topk").expect("a route_topk kernel");
        let p = compile_kernel(&plan, rk, &o).unwrap_or_else(|err| panic!("E={e}: {err}"));
        assert!(p.ptx.contains("route_cand"), "E={e}\n{}", p.ptx);
        assert!(p.ptx.contains("bar.sync"), "E={e}\n{}", p.ptx);
        let want = (e as u32).next_power_of_two().clamp(64, 256);
        assert_eq!(p.launch.block, [want, 1, 1], "E={e}");
        match ptxas::check(&p.ptx) {
            Ok(r) => {
                eprintln!("route_topk E={e}: {:?}", r.kernels[0]);
                assert_eq!(r.kernels[0].spill_stores, 0, "E={e}: {r:?}");
                assert_eq!(r.kernels[0].spill_loads, 0, "E={e}: {r:?}");
            }
            Err(err) if err.0.contains("ptxas") && err.0.contains("not found") => eprintln!("skipped ptxas: {err}"),
            Err(err) => panic!("E={e}: {err}"),
        }
    }
}

/// Every GEMM of the bf16 models takes the fast paths, whatever form its operands have: the
/// LM head and the router (bf16 activations and weights cast to f32 in prologues, B read
/// transposed), the concatenated weights of the wide GEMMs (a `where` over n in B's prologue),
/// activations computed in A's prologue.
#[test]
fn every_bf16_model_gemm_takes_the_fast_path() {
    let o = PtxOptions::default();
    for config in ["small", "ring-mini-linear-2.0"] {
        for mode in [Mode::Decode, Mode::Prefill] {
            let plan = plan_of(config, mode, Precision::Bf16);
            let mut n = 0;
            for k in plan.kernels.iter().filter(|k| k.kind_name() == "gemm") {
                let p = compile_kernel(&plan, k, &o).unwrap();
                for want in ["mma.sync.aligned.m16n8k16", "ld.global.v4.u32"] {
                    assert!(p.ptx.contains(want), "{config} {mode:?} {}: no {want}", k.name);
                }
                n += 1;
            }
            assert!(n > 0, "{config} has GEMMs");
        }
    }
}

/// Every kernel waits for the kernel before it (`griddepcontrol.wait`, programmatic dependent
/// launch) before it touches memory: ahead of the wait there are only parameter loads and the
/// 64-bit loads of the symbols' values through the symbols' parameter (the one after the
/// buffers), no other load of any kind, store, atomic, copy, barrier, fence or prefetch
/// (predicated or not). Only GEMMs release their dependents early
/// (`griddepcontrol.launch_dependents`, after the wait: at every kernel's entry it measured
/// slower). Over the decode and prefill plans of small (bf16 and fp8): every kernel of them, at
/// least loops, GEMMs, grouped GEMMs, routing, attention and the FP8 GEMM.
#[test]
fn every_kernel_waits_for_its_predecessor_before_touching_memory() {
    let o = PtxOptions::default();
    let mut kinds = std::collections::BTreeSet::new();
    let mut releasing = 0;
    let memory_ops = [
        "ld",
        "st",
        "atom",
        "red",
        "cp",
        "bar",
        "fence",
        "membar",
        "mbarrier",
        "prefetch",
        "tex",
        "suld",
        "sust",
        "griddepcontrol.launch",
    ];
    for (mode, precision) in [
        (Mode::Decode, Precision::Bf16),
        (Mode::Prefill, Precision::Bf16),
        (Mode::Decode, Precision::Fp8),
        (Mode::Prefill, Precision::Fp8),
    ] {
        let plan = plan_of("small", mode, precision);
        let kind_of: HashMap<&str, &str> = plan.kernels.iter().map(|k| (k.name.as_str(), k.kind_name())).collect();
        for p in compile_plan(&plan, &o).unwrap() {
            let k = plan
                .kernels
                .iter()
                .find(|k| k.name == p.name)
                .unwrap_or_else(|| panic!("{}: not a kernel of the plan", p.name));
            let sym_param = format!("[{ENTRY}_param_{}]", k.inputs.len() + k.outputs.len());
            // instructions of the body (no directives, braces, labels or comments), predicates
            // stripped
            let code: Vec<&str> = p
                .body
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("//")
                        && !l.starts_with('.')
                        && !l.starts_with('{')
                        && !l.starts_with('}')
                        && !l.starts_with(')')
                        && !l.ends_with(':')
                })
                .map(|l| match l.strip_prefix('@') {
                    Some(rest) => rest.split_once(char::is_whitespace).map_or("", |(_, i)| i.trim()),
                    None => l,
                })
                .collect();
            let at = code
                .iter()
                .position(|l| *l == "griddepcontrol.wait;")
                .unwrap_or_else(|| panic!("{}: no griddepcontrol.wait\n{}", p.name, p.body));
            assert_eq!(
                code.iter().filter(|l| l.starts_with("griddepcontrol.wait")).count(),
                1,
                "{}",
                p.name
            );
            // the next kernel released early only after the wait, and only by GEMMs (their GEMV)
            let released: Vec<usize> = (0..code.len())
                .filter(|&i| code[i].starts_with("griddepcontrol.launch_dependents"))
                .collect();
            assert!(
                released.iter().all(|&i| i > at) && (released.is_empty() || k.kind_name() == "gemm"),
                "{}: launch_dependents at {released:?}, wait at {at}",
                p.name
            );
            releasing += usize::from(!released.is_empty());
            // registers holding the symbols' address (or derived from it)
            let mut sym_regs: Vec<String> = Vec::new();
            for l in &code[..at] {
                let (op, args) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
                let args: Vec<String> = args
                    .trim_end_matches(';')
                    .split(',')
                    .map(|a| a.trim().to_string())
                    .collect();
                let reads_sym = args[1..].iter().any(|a| {
                    a == &sym_param
                        || sym_regs
                            .iter()
                            .any(|r| a.trim_matches(['[', ']']).split('+').next() == Some(r.as_str()))
                });
                if op.starts_with("ld.param") {
                    if reads_sym {
                        sym_regs.push(args[0].clone());
                    }
                    continue;
                }
                if memory_ops.iter().any(|m| op.starts_with(m)) {
                    assert!(
                        op == "ld.global.nc.u64" && reads_sym,
                        "{}: `{l}` before the wait\n{}",
                        p.name,
                        p.body
                    );
                } else if reads_sym {
                    sym_regs.push(args[0].clone());
                }
            }
            kinds.insert(kind_of[p.name.as_str()]);
        }
    }
    for kind in [
        "loop",
        "gemm",
        "grouped_gemm",
        "route_topk",
        "attention",
        "scaled_gemm_fp8",
    ] {
        assert!(kinds.contains(kind), "{kind} not seen: {kinds:?}");
    }
    assert!(releasing > 0, "no GEMM releases the next kernel after its weights");
}
