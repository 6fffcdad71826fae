//! The passes on the Ring-linear graphs: the bridge round trip, the cleanup passes, the fuse
//! family's counters on tiny (f32) and small (bf16) in prefill and decode mode, limits and
//! fallbacks, dumps, and (ignored) the compile time of ring-mini-linear-2.0.
//!
//! Tests named `fused_eval_*` evaluate fused graphs and so need the composite ops' reference
//! semantics (ir/src/fused/*.rs); until those land they fail with "no reference semantics yet".

use ir::graph::Graph;
use ir::shape::DimEnv;
use ir::tol::Tol;
use passes::egraph::{self, Limits, StopReason};
use passes::testing::{compare, count_ops, env, model, model_with, opts};
use passes::{compile, CompileOptions, Family, Mode};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Grouped down projections that carry their layer's shared expert (`fold-shared-expert`).
fn combine_shared(g: &Graph) -> usize {
    use ir::fused::{Fused, GroupedEpilogue};
    g.g.node_weights()
        .filter(|n| {
            n.op == ir::op::Op::Fused(Fused::GroupedMatmul {
                epilogue: GroupedEpilogue::CombineShared,
            })
        })
        .count()
}

#[test]
fn bridge_round_trip_without_rules_equals_the_input() {
    let g = model("tiny");
    let (eg, bridge) = egraph::to_egraph(&g).unwrap();
    let limits = Limits {
        node_limit: 100_000,
        iter_limit: 4,
        time_limit: Duration::from_secs(10),
    };
    let (eg, sat) = egraph::saturate(eg, &[], &limits);
    assert_eq!(sat.stop_reason, StopReason::Saturated);
    let ex = passes::extract::extract(&eg, &bridge.roots(&eg), &Mode::Prefill.cost_model(), None);
    let back = egraph::to_graph(&eg, &bridge, &ex.choice).unwrap();
    back.validate().unwrap();
    // hash-consing merges the duplicated RoPE tables, nothing else changes
    assert!(back.node_count() <= g.node_count());
    assert_eq!(g.inputs.len(), back.inputs.len());
    for e in [env(1, 5, 0), env(2, 1, 4)] {
        compare(&g, &back, &e, 7, Tol::F32.op()).unwrap();
    }
    // the DSL locations and let names survive
    assert!(back.to_text().contains("# inv_freq @ models/ring_linear.ring:108:20"));
}

#[test]
fn cleanup_shrinks_the_tiny_model_and_keeps_its_meaning() {
    let g = model("tiny");
    let o = CompileOptions {
        fuse: false,
        ..opts(Mode::Prefill)
    };
    let (c, report) = compile(&g, &o).unwrap();
    let names: Vec<&str> = report.passes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["validate", "dce", "cse", "const-fold", "cse", "dce"]);
    assert!(
        c.node_count() < g.node_count() * 3 / 4,
        "{} -> {}",
        g.node_count(),
        c.node_count()
    );
    // inv_freq (one per RoPE, CSE'd into one) and the decay λ of each linear layer are literals
    let text = c.to_text();
    assert!(text.contains("literal [1, 0.1, 0.01, 0.001]"), "{text}");
    assert_eq!(count_ops(&c, "pow"), 0, "{text}");
    assert!(count_ops(&c, "literal") >= 3, "{text}");
    for e in [env(1, 6, 0), env(1, 1, 5)] {
        compare(&g, &c, &e, 11, Tol::F32.op()).unwrap();
    }
}

/// The fuse rules and how often each fires on `config` (every mode gives the same counts: the
/// graph is the same).
fn fuse_counts(config: &str, mode: Mode) -> (Graph, passes::PassReport) {
    let g = model(config);
    let (c, report) = compile(&g, &opts(mode)).unwrap();
    let e = report.egraph.as_ref().unwrap();
    assert_eq!(e.stop_reason, "saturated", "{report}");
    assert_eq!(e.type_conflicts, 0, "{report}");
    assert!(e.fell_back.is_none(), "{report}");
    assert!(e.cost_after_us < e.cost_before_us, "{report}");
    assert!(
        report.rules_refused.is_empty(),
        "{report}\n{:?}",
        report.refusal_examples
    );
    println!("{config} {}: {report}", mode.name());
    (c, report)
}

#[test]
fn fuse_rules_fire_on_tiny_prefill_and_decode() {
    for mode in [Mode::Prefill, Mode::Decode] {
        let (c, r) = fuse_counts("tiny", mode);
        // 6 layers: 2 norms each + the final norm; 4 linear + 2 softmax layers with q and k norms
        assert_eq!(r.fired("fuse-rmsnorm"), 13 + 12, "{r}");
        assert_eq!(r.fired("fuse-add-rmsnorm"), 12, "{r}");
        assert_eq!(r.fired("fuse-qknorm-rope"), 12, "{r}");
        assert_eq!(r.fired("fuse-softmax"), 2, "{r}");
        assert_eq!(r.fired("fuse-flash-attention"), 2, "{r}");
        // dense MLP + (shared expert + routed experts) in 5 MoE layers
        assert_eq!(r.fired("fuse-swiglu"), 11, "{r}");
        // q's and k's heads of every layer in one kernel
        assert_eq!(r.fired("fuse-qknorm-rope-pair-first"), 6, "{r}");
        assert_eq!(r.fired("fuse-qknorm-rope-pair-second"), 6, "{r}");
        // pairs of GEMMs of one input: the qkv and g projections of the 4 linear layers, the
        // gate and up projections of the dense MLP, and in the 5 MoE layers the router with
        // each of the shared expert's gate and up and those two (tiny is f32 throughout, so the
        // router reads the same input; small's f32 router reads a cast)
        assert_eq!(r.fired("fuse-concat-gemms-first"), 4 + 1 + 3 * 5, "{r}");
        assert_eq!(r.fired("fuse-concat-gemms-second"), 4 + 1 + 3 * 5, "{r}");
        assert_eq!(count_ops(&c, "flash_attention"), 2);
        // at decode the 4 linear layers' q/k norms are made by their steps (fold-qk-norm-step)
        let decode = usize::from(mode == Mode::Decode);
        assert_eq!(count_ops(&c, "qk_norm_rope"), 6 - 4 * decode, "{}", c.to_text());
        assert_eq!(count_ops(&c, "linear_attn_step_qk_gate"), 4 * decode, "{}", c.to_text());
        // per layer: the wide input GEMM, the output GEMM, the MLP's wide and down GEMMs (the
        // routed experts' are grouped), the 5 routers and the LM head; at decode every norm is
        // folded into the GEMM that reads it (fold-norm-gemm: 13 of them, each then a norm_matmul)
        // (and at decode the 5 shared experts' down GEMMs join their layers' combines:
        // fold-shared-expert)
        assert_eq!(
            count_ops(&c, "matmul") + count_ops(&c, "norm_matmul"),
            6 * 4 + 5 + 1 - 5 * decode,
            "{}",
            c.to_text()
        );
        assert_eq!(combine_shared(&c), 5 * decode, "{}", c.to_text());
        assert_eq!(count_ops(&c, "norm_matmul"), 13 * decode, "{}", c.to_text());
        assert_eq!(count_ops(&c, "add_rms_norm"), 12 * (1 - decode));
        assert_eq!(
            count_ops(&c, "rms_norm"),
            1 - decode,
            "the first input norm has no residual add"
        );
        // the dense MLP and the shared experts; the routed ones are inside the grouped GEMMs
        assert_eq!(count_ops(&c, "swiglu"), 6);
        assert_eq!(count_ops(&c, "grouped_matmul"), 10);
        assert_eq!(count_ops(&c, "softmax"), 0, "inside flash attention");
        assert_eq!(
            count_ops(&c, "rsqrt"),
            0,
            "the linear layers' group norms are the scan family's group_norm_gate"
        );
    }
}

/// A backend without the step's q/k prelude (the PTX simple kernels) compiles with the fold off.
#[test]
fn the_qk_norm_fold_can_be_turned_off() {
    let g = model("tiny");
    let o = CompileOptions {
        fold_qk_norms: false,
        ..opts(Mode::Decode)
    };
    let (c, _) = compile(&g, &o).unwrap();
    assert_eq!(count_ops(&c, "linear_attn_step_qk_gate"), 0, "{}", c.to_text());
    assert_eq!(count_ops(&c, "linear_attn_step_gate"), 4, "{}", c.to_text());
    assert_eq!(count_ops(&c, "qk_norm_rope"), 6, "{}", c.to_text());
}

#[test]
fn fuse_rules_fire_on_small_bf16_prefill_and_decode() {
    for mode in [Mode::Prefill, Mode::Decode] {
        let (c, r) = fuse_counts("small", mode);
        assert!(r.family_fired("fuse") > 0);
        // 8 layers (6 linear, 2 softmax): bf16 residual norms and softmax-layer q/k norms are
        // the narrow forms; the linear layers' q/k are f32 after their qkv cast
        assert_eq!(r.fired("fuse-rmsnorm-narrow"), 17 + 4, "{r}");
        assert_eq!(r.fired("fuse-rmsnorm"), 12, "{r}");
        assert_eq!(r.fired("fuse-add-rmsnorm"), 16, "{r}");
        assert_eq!(r.fired("fuse-qknorm-rope"), 12, "{r}");
        assert_eq!(r.fired("fuse-qknorm-rope-narrow"), 4, "{r}");
        assert_eq!(r.fired("fuse-softmax"), 2, "{r}");
        assert_eq!(r.fired("fuse-flash-attention-narrow"), 2, "{r}");
        assert_eq!(r.fired("fuse-swiglu"), 15, "{r}");
        assert_eq!(r.fired("fuse-qknorm-rope-pair-first"), 8, "{r}");
        assert_eq!(r.fired("fuse-concat-gemms-first"), 6 + 1 + 7, "{r}");
        assert_eq!(count_ops(&c, "flash_attention"), 2);
        // at decode the 6 linear layers' q/k norms are made by their steps
        let qk = if mode == Mode::Decode { 6 } else { 0 };
        assert_eq!(count_ops(&c, "qk_norm_rope"), 8 - qk);
        assert_eq!(count_ops(&c, "linear_attn_step_qk_gate"), qk);
        // and at decode `merge-router-gemm` puts each of the 7 MoE layers' routers beside its
        // shared expert's gate/up GEMM
        let merged = if mode == Mode::Decode { 7 } else { 0 };
        // and `fold-norm-gemm` each of the 17 norms into the GEMM after it
        let folded = if mode == Mode::Decode { 17 } else { 0 };
        // and `fold-shared-expert` each shared expert's down GEMM into its layer's combine
        let shared = merged;
        assert_eq!(count_ops(&c, "norm_matmul"), folded);
        assert_eq!(count_ops(&c, "matmul") + folded, 8 * 4 + 7 + 1 - merged - shared);
        assert_eq!(combine_shared(&c), shared, "{}", c.to_text());
    }
}

#[test]
fn a_graph_with_nothing_to_fuse_compiles_unfused_and_runs() {
    let g = passes::testing::dsl(
        "dim b, s; input x: f32[b, s, 8]; param w: f32[8, 8] = \"w\";
         output \"y\" = tanh(x @ w) + x * 0.5;",
    );
    let (c, report) = compile(&g, &opts(Mode::Prefill)).unwrap();
    let e = report.egraph.as_ref().unwrap();
    assert!(e.families.is_empty(), "no family present: {report}");
    assert!(report.rules_fired.is_empty());
    let bs: DimEnv = [("b".to_string(), 2), ("s".to_string(), 3)].into();
    compare(&g, &c, &bs, 3, Tol::F32.op()).unwrap();
    // a near miss: RMSNorm with the wrong divisor still compiles, unfused, and runs
    let g = passes::testing::dsl(
        "dim b, s; input x: f32[b, s, 8]; param w: f32[8] = \"w\";
         output \"y\" = x * rsqrt(sum(x * x, axis = -1, keepdim = true) / 7.0 + 1e-6) * w;",
    );
    let (c, report) = compile(&g, &opts(Mode::Decode)).unwrap();
    assert_eq!(report.family_fired("fuse"), 0, "{report}");
    assert_eq!(count_ops(&c, "rsqrt"), 1);
    compare(&g, &c, &bs, 5, Tol::F32.op()).unwrap();
}

#[test]
fn a_runner_at_its_node_limit_reports_it_and_still_yields_the_input() {
    let g = model("tiny");
    let o = CompileOptions {
        limits: Limits {
            node_limit: 50,
            iter_limit: 100,
            time_limit: Duration::from_secs(30),
        },
        ..opts(Mode::Prefill)
    };
    let t = Instant::now();
    let (c, report) = compile(&g, &o).unwrap();
    assert!(t.elapsed() < Duration::from_secs(30));
    let e = report.egraph.as_ref().unwrap();
    assert!(e.hit_limit && e.stop_reason.starts_with("node limit"), "{report}");
    assert!(e.iterations <= 1, "{report}");
    c.validate().unwrap();
    compare(&g, &c, &env(1, 4, 2), 9, Tol::F32.op()).unwrap();
    // and an iteration limit of 1: the first wave of rules only, still a valid graph
    let o = CompileOptions {
        limits: Limits {
            iter_limit: 1,
            ..o.limits
        },
        ..opts(Mode::Prefill)
    };
    let o = CompileOptions {
        limits: Limits {
            node_limit: 100_000,
            ..o.limits
        },
        ..o
    };
    let (c, report) = compile(&g, &o).unwrap();
    let e = report.egraph.as_ref().unwrap();
    assert_eq!(e.stop_reason, "iteration limit (1)", "{report}");
    assert_eq!(
        report.fired("fuse-flash-attention"),
        0,
        "needs the softmax first: {report}"
    );
    c.validate().unwrap();
    // and no time at all
    let o = CompileOptions {
        limits: Limits {
            node_limit: 100_000,
            iter_limit: 100,
            time_limit: Duration::ZERO,
        },
        ..opts(Mode::Decode)
    };
    let (c, report) = compile(&g, &o).unwrap();
    let e = report.egraph.as_ref().unwrap();
    assert!(e.stop_reason.starts_with("time limit"), "{report}");
    compare(&g, &c, &env(1, 1, 3), 9, Tol::F32.op()).unwrap();
}

#[test]
fn dumps_one_numbered_file_per_pass() {
    let dir = std::env::temp_dir().join(format!("ringjit-passes-dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let g = model("tiny");
    let o = CompileOptions {
        dump_dir: Some(dir.clone()),
        ..opts(Mode::Decode)
    };
    let (c, report) = compile(&g, &o).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let want = [
        "00-input",
        "01-after-validate",
        "02-after-dce",
        "03-after-cse",
        "04-after-const-fold",
        "05-after-cse",
        "06-after-dce",
        "07-after-fuse",
        "08-after-dce",
        "09-after-merge-router-gemm",
        "10-after-fold-shared-expert",
        "11-after-fold-qk-norm-step",
        "12-after-fold-norm-gemm",
        "13-after-validate",
    ];
    let mut expected: Vec<String> = want
        .iter()
        .flat_map(|s| [format!("{s}.dot"), format!("{s}.txt")])
        .collect();
    expected.push("07-after-fuse.report.json".into());
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(
        std::fs::read_to_string(dir.join("13-after-validate.txt")).unwrap(),
        c.to_text()
    );
    assert_eq!(report.passes.len(), 13);
    let json = report.to_json();
    assert_eq!(json["egraph"]["stop_reason"], "saturated");
    assert!(json["rules_fired"]["fuse-flash-attention"].as_u64().unwrap() == 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compiling_a_compiled_graph_changes_nothing_more() {
    // every pass handles the composite ops it made
    let g = model("small");
    let (once, _) = compile(&g, &opts(Mode::Decode)).unwrap();
    let (twice, report) = compile(&once, &opts(Mode::Decode)).unwrap();
    assert!(report.rules_fired.is_empty(), "{report}");
    assert_eq!(once.node_count(), twice.node_count());
    let e = report.egraph.as_ref().unwrap();
    assert!(
        (e.cost_before_us - e.cost_after_us).abs() < 1e-6 * e.cost_before_us,
        "{report}"
    );
}

#[test]
fn families_can_be_switched_off() {
    let g = model("tiny");
    let o = CompileOptions {
        families: vec![Family::Scan, Family::Moe],
        ..opts(Mode::Prefill)
    };
    let (c, report) = compile(&g, &o).unwrap();
    assert_eq!(report.family_fired("fuse"), 0, "{report}");
    assert!(report.family_fired("moe") > 0, "{report}");
    assert_eq!(report.egraph.as_ref().unwrap().families, ["scan", "moe"]);
    compare(&g, &c, &env(1, 3, 0), 2, Tol::F32.op()).unwrap();
}

fn compile_time(config: &str) {
    let t = Instant::now();
    let g = model(config);
    let elaborate = t.elapsed();
    for mode in [Mode::Prefill, Mode::Decode] {
        let t = Instant::now();
        let (c, report) = compile(&g, &opts(mode)).unwrap();
        let took = t.elapsed();
        println!(
            "{config} {}: elaborate {:.2} s, compile {:.2} s, {} -> {} nodes\n{report}",
            mode.name(),
            elaborate.as_secs_f64(),
            took.as_secs_f64(),
            g.node_count(),
            c.node_count()
        );
        assert!(took < Duration::from_secs(5), "compile took {took:?}");
        assert!(report.family_fired("fuse") > 0);
        assert_eq!(report.egraph.as_ref().unwrap().stop_reason, "saturated");
    }
}

#[test]
#[ignore = "elaborates ring-mini-linear-2.0 (20 layers, 256 experts); run with --ignored --nocapture"]
fn compile_time_of_ring_mini() {
    compile_time("ring-mini-linear-2.0");
}

#[test]
#[ignore = "elaborates ring-flash-linear-2.0 (32 layers, 256 experts); run with --ignored --nocapture"]
fn compile_time_of_ring_flash() {
    compile_time("ring-flash-linear-2.0");
}

/// Kernels per step of a big model, as `ringjit compile` reports them; with
/// `RINGJIT_KERNELS_OUT=FILE` the kernel plan's text is written there.
fn kernels_per_layer(config: &str, layers: usize) {
    for mode in [Mode::Prefill, Mode::Decode] {
        let g = model(config);
        let t = Instant::now();
        let (c, _) = compile(&g, &opts(mode)).unwrap();
        let plan = passes::partition::partition(&c).unwrap();
        let took = t.elapsed();
        let n = plan.counts();
        println!(
            "{config} {}: {} unfused -> {} kernels ({:.2} per layer; {} loop, {} template, {} scan), compile + partition {:.2} s",
            mode.name(),
            passes::partition::partition_unfused_count(&g),
            n.total,
            n.total as f64 / layers as f64,
            n.loops,
            n.templates,
            n.scans,
            took.as_secs_f64()
        );
        if let Ok(p) = std::env::var("RINGJIT_KERNELS_OUT") {
            std::fs::write(format!("{p}.{}", mode.name()), plan.to_text()).unwrap();
        }
    }
}

#[test]
#[ignore = "elaborates ring-mini-linear-2.0; run with --ignored --nocapture"]
fn kernels_per_layer_of_ring_mini() {
    kernels_per_layer("ring-mini-linear-2.0", 20);
}

// ---- need the composite ops' reference semantics (ir/src/fused/*.rs) -----------------------------

fn fused_eval(g: &Graph, what: &str, tol: Tol) {
    let mut worst: HashMap<&str, f64> = HashMap::new();
    for (mode, e) in [(Mode::Prefill, env(1, 6, 0)), (Mode::Decode, env(1, 1, 5))] {
        let (c, _) = compile(g, &opts(mode)).unwrap();
        let err = compare(g, &c, &e, 21, tol.model()).unwrap();
        worst.insert(mode.name(), err);
    }
    println!("{what}: worst relative error {worst:?}");
}

#[test]
fn fused_eval_tiny_compiled_equals_unfused() {
    fused_eval(&model("tiny"), "tiny", Tol::F32);
}

/// bf16: a composite op may round once where the primitives round after every op (1 ulp), and
/// a top-k routing decision turns 1 ulp into a different expert. With every expert chosen
/// (K = E, every group kept) the routed sum is continuous in its inputs, so the comparison
/// measures the fused kernels, not the router's discontinuity.
#[test]
fn fused_eval_small_compiled_equals_unfused() {
    let g = model_with("small", &[("num_experts_per_tok", 16.into()), ("topk_group", 4.into())]);
    fused_eval(&g, "small (all experts routed)", Tol::BF16);
}
