//! The moe family on the Ring-linear graphs: its counters on tiny (f32) and small (bf16) in
//! prefill and decode mode, the compiled graph against the unfused one in the interpreter (with
//! a non-zero expert bias, so that selection differs from the unbiased scores), its absence on
//! a dense model, and (ignored) the cost-model effect on ring-mini-linear-2.0.

use ir::checkpoint::RandomWeights;
use ir::graph::Graph;
use ir::interp::ParamSource;
use ir::shape::DimEnv;
use ir::tol::Tol;
use ir::{DType, ParamSpec, Tensor};
use passes::testing::{count_ops, env, opts, outputs_close, random_inputs, root, run, SplitMix};
use passes::{compile, CompileOptions, Family, Mode, PassReport};

fn config(name: &str) -> serde_json::Value {
    let path = root().join(format!("models/configs/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn model_with(name: &str, overrides: &[(&str, serde_json::Value)]) -> Graph {
    let src = std::fs::read_to_string(root().join("models/ring_linear.ring")).unwrap();
    let mut cfg = config(name);
    for (k, v) in overrides {
        cfg[*k] = v.clone();
    }
    ir::dsl::elaborate("models/ring_linear.ring", &src, &cfg).unwrap().graph
}

fn model(name: &str) -> Graph {
    model_with(name, &[])
}

/// MoE layers of a config: every layer from `first_k_dense_replace` on.
fn moe_layers(name: &str) -> usize {
    let c = config(name);
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    n("num_hidden_layers") - n("first_k_dense_replace")
}

/// Random weights with a non-zero expert bias (RandomWeights makes it zero, as a fresh
/// checkpoint has it): N(0, 0.3)-ish per expert, enough to move σ̃ = σ + b across experts.
struct BiasedWeights {
    base: RandomWeights,
    seed: u64,
}

impl ParamSource for BiasedWeights {
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
        if !spec.name.ends_with("gate.expert_bias") {
            return self.base.load(spec).map_err(|e| e.to_string());
        }
        let n = *spec.shape.first().ok_or("the expert bias is [E]")?;
        let mut rng = SplitMix(self.seed ^ passes_hash(&spec.name));
        let b: Vec<f32> = (0..n).map(|_| rng.unit() * 0.5).collect();
        Ok(Tensor::from_f32(DType::F32, vec![n], b))
    }
}

/// A fixed per-name seed offset (FNV-1a), so that every layer's bias differs.
fn passes_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Compiles the model of config `name` in `mode`; checks the moe counters (once per MoE layer)
/// and the compiled graph's ops.
fn moe_counts(name: &str, g: &Graph, mode: Mode, narrow: bool) -> (Graph, PassReport) {
    let layers = moe_layers(name);
    let experts = config(name)["num_experts"].as_u64().unwrap();
    assert!(Family::Moe.present(g));
    let (c, report) = compile(g, &opts(mode)).unwrap();
    let e = report.egraph.as_ref().unwrap();
    assert_eq!(e.stop_reason, "saturated", "{report}");
    assert_eq!(e.type_conflicts, 0, "{report}");
    assert!(e.fell_back.is_none(), "{report}");
    assert!(e.families.contains(&"moe".to_string()), "{report}");
    assert!(
        report.rules_refused.is_empty(),
        "{report}\n{:?}",
        report.refusal_examples
    );
    let combine = if narrow {
        "moe-grouped-combine-narrow"
    } else {
        "moe-grouped-combine"
    };
    assert_eq!(report.fired("moe-route-topk"), layers, "{report}");
    assert_eq!(report.fired(combine), layers, "{report}");
    assert_eq!(report.fired("moe-grouped-swiglu"), layers, "{report}");
    assert_eq!(report.family_fired("moe"), 3 * layers, "no other moe rule: {report}");
    // the compiled graph routes with route_topk and runs two grouped GEMMs per MoE layer; no
    // top-k and no dense [b, E, s, ..] expert product is left
    assert_eq!(count_ops(&c, "route_topk"), layers, "{}", c.to_text());
    assert_eq!(count_ops(&c, "grouped_matmul"), 2 * layers, "{}", c.to_text());
    assert_eq!(count_ops(&c, "topk"), 0, "{}", c.to_text());
    assert_eq!(count_ops(&c, "gather"), 0, "{}", c.to_text());
    let dense_expert_products =
        c.g.node_weights()
            .filter(|n| n.op.name() == "matmul" && n.outputs[0].rank() == 4)
            .filter(|n| n.outputs[0].shape[1].as_const() == Some(experts as i64))
            .count();
    assert_eq!(dense_expert_products, 0, "{}", c.to_text());
    // the shared expert stays the fuse family's SwiGLU MLP beside the grouped GEMMs: one
    // swiglu per MoE layer, one for the dense layer-0 MLP
    assert_eq!(count_ops(&c, "swiglu"), layers + 1, "{}", c.to_text());
    println!("{name}, {layers} moe layers, {}: {report}", mode.name());
    (c, report)
}

#[test]
fn moe_rules_fire_once_per_moe_layer_on_tiny() {
    let g = model("tiny");
    for mode in [Mode::Prefill, Mode::Decode] {
        moe_counts("tiny", &g, mode, false);
    }
}

#[test]
fn moe_rules_fire_once_per_moe_layer_on_small_bf16() {
    let g = model("small");
    for mode in [Mode::Prefill, Mode::Decode] {
        moe_counts("small", &g, mode, true);
    }
}

#[test]
fn the_routing_variants_follow_the_config() {
    // expert bias off, norm_topk_prob off: the other route rules, once per MoE layer
    let cases = [
        ("moe-route-topk-unbiased", false, true),
        ("moe-route-topk-unnormalized", true, false),
        ("moe-route-topk-unbiased-unnormalized", false, false),
    ];
    for (rule, bias, norm) in cases {
        let g = model_with(
            "tiny",
            &[
                ("moe_router_enable_expert_bias", bias.into()),
                ("norm_topk_prob", norm.into()),
            ],
        );
        let (c, report) = compile(&g, &opts(Mode::Decode)).unwrap();
        assert_eq!(report.fired(rule), moe_layers("tiny"), "{rule}: {report}");
        assert_eq!(report.fired("moe-route-topk"), 0, "{rule}: {report}");
        assert_eq!(count_ops(&c, "route_topk"), moe_layers("tiny"));
        compare(&g, &c, &env(2, 5, 0), 31, Tol::F32.model()).unwrap();
    }
}

/// Both graphs on the same random inputs (tokens, states) and weights (a non-zero expert
/// bias); the worst relative error.
fn compare(a: &Graph, b: &Graph, e: &DimEnv, seed: u64, bound: f64) -> Result<f64, String> {
    let inputs = random_inputs(a, e, seed, 0.5, 200);
    let w = BiasedWeights {
        base: RandomWeights::new(seed),
        seed,
    };
    let want = run(a, &w, &inputs)?;
    let got = run(b, &w, &inputs)?;
    outputs_close(&got, &want, bound)
}

#[test]
fn fused_eval_tiny_moe_compiled_equals_unfused() {
    let g = model("tiny");
    for (mode, e) in [(Mode::Prefill, env(2, 7, 0)), (Mode::Decode, env(2, 1, 6))] {
        let (c, _) = compile(&g, &opts(mode)).unwrap();
        assert_eq!(count_ops(&c, "grouped_matmul"), 2 * moe_layers("tiny"));
        for seed in [21, 22] {
            let err = compare(&g, &c, &e, seed, Tol::F32.model()).unwrap();
            println!("tiny {}: seed {seed}, worst relative error {err:.2e}", mode.name());
        }
    }
}

#[test]
fn the_expert_bias_changes_the_routing() {
    // the same graph with a zero (RandomWeights) and a non-zero bias gives other logits: the
    // comparisons above exercise the biased selection, not a no-op bias
    let g = model("tiny");
    let e = env(1, 7, 0);
    let inputs = random_inputs(&g, &e, 21, 0.5, 200);
    let zero = run(&g, &RandomWeights::new(21), &inputs).unwrap();
    let biased = BiasedWeights {
        base: RandomWeights::new(21),
        seed: 21,
    };
    let with_bias = run(&g, &biased, &inputs).unwrap();
    assert!(outputs_close(&with_bias, &zero, Tol::F32.model()).is_err());
}

/// bf16: the composite ops upstream of a router (norms, attention) round once where the
/// primitives round after every op, and 1 ulp can flip a top-k choice. Two comparisons that
/// avoid measuring that discontinuity: every expert routed (K = E, every group kept) with all
/// families; and real top-4-of-16 routing with the moe family alone, where everything the
/// routers read is computed by the same primitives in both graphs — and where the fused router
/// and grouped GEMMs round exactly where the dense form does, so the bound is f32's, not bf16's.
#[test]
fn fused_eval_small_moe_compiled_equals_unfused() {
    let all = model_with("small", &[("num_experts_per_tok", 16.into()), ("topk_group", 4.into())]);
    let routed = model("small");
    for (mode, e) in [(Mode::Prefill, env(1, 6, 0)), (Mode::Decode, env(1, 1, 5))] {
        let (c, report) = compile(&all, &opts(mode)).unwrap();
        assert_eq!(report.fired("moe-route-topk"), moe_layers("small"), "{report}");
        let err = compare(&all, &c, &e, 21, Tol::BF16.model()).unwrap();
        println!(
            "small (all experts routed) {}: worst relative error {err:.2e}",
            mode.name()
        );

        let moe_only = CompileOptions {
            families: vec![Family::Moe],
            ..opts(mode)
        };
        let (c, report) = compile(&routed, &moe_only).unwrap();
        assert_eq!(report.fired("moe-route-topk"), moe_layers("small"), "{report}");
        assert_eq!(
            report.fired("moe-grouped-combine-narrow"),
            moe_layers("small"),
            "{report}"
        );
        assert_eq!(
            report.fired("moe-grouped-swiglu-unfused"),
            moe_layers("small"),
            "{report}"
        );
        assert_eq!(count_ops(&c, "grouped_matmul"), 2 * moe_layers("small"));
        for seed in [21, 23] {
            let err = compare(&routed, &c, &e, seed, Tol::F32.op()).unwrap();
            println!(
                "small (top-4 of 16, moe only) {}: seed {seed}, worst relative error {err:.2e}",
                mode.name()
            );
        }
    }
}

#[test]
fn the_moe_family_is_absent_on_a_dense_model() {
    // every layer a dense MLP: no router, no stacked experts
    let layers = config("tiny")["num_hidden_layers"].clone();
    let g = model_with("tiny", &[("first_k_dense_replace", layers)]);
    assert!(!Family::Moe.present(&g));
    assert!(Family::Fuse.present(&g));
    for mode in [Mode::Prefill, Mode::Decode] {
        let (c, report) = compile(&g, &opts(mode)).unwrap();
        let e = report.egraph.as_ref().unwrap();
        assert!(!e.families.contains(&"moe".to_string()), "{report}");
        assert_eq!(report.family_fired("moe"), 0, "{report}");
        assert!(report.family_fired("fuse") > 0, "{report}");
        assert_eq!(count_ops(&c, "route_topk") + count_ops(&c, "grouped_matmul"), 0);
    }
    // and the moe rules alone find nothing to rewrite in its e-graph either
    let (eg, _) = passes::egraph::to_egraph(&g).unwrap();
    let (_, sat) = passes::egraph::saturate(eg, &Family::Moe.rules(), &opts(Mode::Prefill).limits);
    assert!(sat.fired.is_empty(), "{:?}", sat.fired);
}

#[test]
fn the_grouped_form_is_cheaper_in_decode_than_the_dense_one() {
    // the same graph with and without the moe family, decode cost model: the grouped GEMMs
    // read K of E experts' weights
    let g = model("small");
    let cost = |families: Vec<Family>| {
        let o = CompileOptions {
            families,
            ..opts(Mode::Decode)
        };
        compile(&g, &o).unwrap().1.egraph.unwrap().cost_after_us
    };
    let without = cost(vec![Family::Scan, Family::Fp8, Family::Fuse]);
    let with = cost(Family::ALL.to_vec());
    assert!(with < without, "{with} vs {without}");
}

fn ring_mini_costs(mode: Mode) {
    let g = model("ring-mini-linear-2.0");
    let layers = moe_layers("ring-mini-linear-2.0");
    let run = |families: Vec<Family>| {
        let o = CompileOptions { families, ..opts(mode) };
        let t = std::time::Instant::now();
        let (c, report) = compile(&g, &o).unwrap();
        (c, report, t.elapsed())
    };
    let (_, dense, _) = run(vec![Family::Scan, Family::Fp8, Family::Fuse]);
    let (c, report, took) = run(Family::ALL.to_vec());
    let (d, e) = (dense.egraph.unwrap(), report.egraph.as_ref().unwrap());
    println!(
        "ring-mini {}: input {:.1} us; without moe {:.1} us; with moe {:.1} us ({:.2} s)\n\
         moe rules fired: {:?}\n{report}",
        mode.name(),
        e.cost_before_us,
        d.cost_after_us,
        e.cost_after_us,
        took.as_secs_f64(),
        report
            .rules_fired
            .iter()
            .filter(|(k, _)| k.starts_with("moe-"))
            .collect::<Vec<_>>(),
    );
    assert_eq!(report.fired("moe-route-topk"), layers, "{report}");
    assert_eq!(report.fired("moe-grouped-combine-narrow"), layers, "{report}");
    assert_eq!(report.fired("moe-grouped-swiglu"), layers, "{report}");
    assert_eq!(count_ops(&c, "grouped_matmul"), 2 * layers);
    assert!(e.cost_after_us < d.cost_after_us);
}

#[test]
#[ignore = "elaborates ring-mini-linear-2.0 (20 layers, 256 experts); run with --ignored --nocapture"]
fn cost_of_ring_mini_decode() {
    ring_mini_costs(Mode::Decode);
}

#[test]
#[ignore = "elaborates ring-mini-linear-2.0 (20 layers, 256 experts); run with --ignored --nocapture"]
fn cost_of_ring_mini_prefill() {
    ring_mini_costs(Mode::Prefill);
}
