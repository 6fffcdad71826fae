//! The scan family on the Ring-linear graphs: the lightning scans become `linear_attn_chunk` in
//! prefill and `linear_attn_step` in decode, the group norm and output gate `group_norm_gate`,
//! and that folds into the recurrence (`linear_attn_{chunk,step}_gate`), once per linear layer; the compiled graphs compute what the unfused graph computes, alone
//! and chained (prefill through the compiled prefill graph, then decode through the compiled
//! decode graph, against one unfused forward over all tokens).

use ir::checkpoint::RandomWeights;
use ir::graph::Graph;
use ir::op::{InputKind, Op};
use ir::shape::eval_shape;
use ir::tol::{check, Tol};
use ir::{DType, Tensor};
use passes::testing::{compare, count_ops, env, model, model_with, opts, run, SplitMix};
use passes::{compile, Family, Mode, PassReport};
use std::collections::HashMap;

// ---- helpers (as in ring.rs) ----------------------------------------------------------------------

/// small with every expert routed (K = E, every group kept): the routed sum is continuous in
/// its inputs, so a 1-ulp bf16 difference cannot pick another expert (see ring.rs).
fn small_all_experts() -> Graph {
    model_with("small", &[("num_experts_per_tok", 16.into()), ("topk_group", 4.into())])
}

/// Compiles `g` for `mode` and checks the run was clean: saturated, nothing refused, no type
/// conflict, no fallback, cheaper than the input.
fn compiled(g: &Graph, mode: Mode) -> (Graph, PassReport) {
    let (c, report) = compile(g, &opts(mode)).unwrap();
    let e = report.egraph.as_ref().unwrap();
    assert_eq!(e.stop_reason, "saturated", "{report}");
    assert_eq!(e.type_conflicts, 0, "{report}");
    assert!(e.fell_back.is_none(), "{report}");
    assert!(e.cost_after_us < e.cost_before_us, "{report}");
    assert!(e.families.iter().any(|f| f == "scan"), "{report}");
    assert!(
        report.rules_refused.is_empty(),
        "{report}\n{:?}",
        report.refusal_examples
    );
    (c, report)
}

/// Every scan rule fired once per linear layer, and extraction took the mode's form: at decode
/// the step with the group norm and gate folded into it, in prefill the chunked form and the
/// group norm apart (folded, a long prompt would wait for each 16-token batch's normalisation;
/// `extract::GATE_SYNC_US`).
fn check_counts(g: &Graph, what: &str, linear_layers: usize) {
    for (mode, chosen) in [
        (Mode::Prefill, ["linear_attn_chunk", "group_norm_gate"].as_slice()),
        // (and `fold-qk-norm-step` then gives each step its q/k norms and rotation)
        (Mode::Decode, ["linear_attn_step_qk_gate"].as_slice()),
    ] {
        let (c, r) = compiled(g, mode);
        println!("{what} {}: {r}", mode.name());
        for rule in [
            "scan-lightning-chunk",
            "scan-lightning-step",
            "scan-group-norm-gate",
            "scan-gate-into-chunk",
            "scan-gate-into-step",
        ] {
            assert_eq!(r.fired(rule), linear_layers, "{what} {}: {rule}\n{r}", mode.name());
        }
        let forms = [
            "linear_attn_chunk",
            "linear_attn_step",
            "group_norm_gate",
            "linear_attn_chunk_gate",
            "linear_attn_step_gate",
            "linear_attn_step_qk_gate",
            "scan",
        ];
        for form in forms {
            let want = if chosen.contains(&form) { linear_layers } else { 0 };
            assert_eq!(count_ops(&c, form), want, "{what} {}: {form}", mode.name());
        }
        // the fuse family still does its part next to the scan family
        assert!(r.family_fired("fuse") > 0, "{r}");
        if mode == Mode::Prefill {
            let text = c.to_text();
            assert!(text.contains("linear_attn_chunk chunk=64"), "{text}");
        }
    }
}

// ---- firing counts and extraction -------------------------------------------------------------------

#[test]
fn scan_rules_fire_once_per_linear_layer_on_tiny() {
    // 6 layers, softmax at 2 and 5: linear layers 0, 1, 3, 4
    check_counts(&model("tiny"), "tiny", 4);
}

#[test]
fn scan_rules_fire_once_per_linear_layer_on_small_bf16() {
    // 8 layers, softmax at 3 and 7: 6 linear layers; bf16 weights, an f32 lightning core
    check_counts(&model("small"), "small", 6);
}

#[test]
#[ignore = "elaborates ring-mini-linear-2.0 (20 layers, 256 experts); run with --ignored --nocapture"]
fn scan_rules_fire_once_per_linear_layer_on_ring_mini() {
    // 20 layers, softmax at 4, 9, 14, 19: 16 linear layers
    check_counts(&model("ring-mini-linear-2.0"), "ring-mini-linear-2.0", 16);
}

/// The two forms' costs at the sizes of tiny (H 4, d 16), small (4, 64) and Ring-mini (16, 128):
/// the step wins for one token, the chunks for a 4096-token prompt.
#[test]
fn lightning_costs_cross_over_between_decode_and_prefill() {
    use ir::fused::Fused;
    use ir::graph::TensorType;
    use ir::Dim;
    for (h, d) in [(4, 16), (4, 64), (16, 128)] {
        let t = |shape: Vec<Dim>| TensorType::new(DType::F32, shape);
        let (b, c) = (Dim::sym("batch"), Dim::constant);
        let q = t(vec![b.clone(), Dim::sym("seq"), c(h), c(d)]);
        let s = t(vec![b, c(h), c(d), c(d)]);
        let lam = t(vec![c(h), c(1), c(1)]);
        let (ins, outs) = ([&s, &q, &q, &q, &lam], [s.clone(), q.clone()]);
        for mode in [Mode::Prefill, Mode::Decode] {
            let m = mode.cost_model();
            let chunk = m.op_cost(&Op::Fused(Fused::LinearAttnChunk { chunk: 64 }), &ins, &outs);
            let step = m.op_cost(&Op::Fused(Fused::LinearAttnStep), &ins, &outs);
            println!("H {h}, d {d}, {}: chunk {chunk:.1} us, step {step:.1} us", mode.name());
            match mode {
                Mode::Prefill => assert!(chunk < step, "H {h}, d {d}: {chunk} vs {step}"),
                Mode::Decode => assert!(step < chunk, "H {h}, d {d}: {step} vs {chunk}"),
            }
        }
    }
}

#[test]
fn a_compiled_graph_offers_the_scan_family_nothing() {
    let (c, _) = compiled(&model("tiny"), Mode::Decode);
    assert!(!Family::Scan.present(&c));
}

// ---- compiled == unfused -------------------------------------------------------------------------------

/// Prefill graph on a fresh prompt of 70 tokens (two chunks, the second ragged) and on a
/// continued prompt with random incoming states; decode graph on one token after 5.
fn compiled_equals_unfused(g: &Graph, what: &str, tol: Tol) {
    let (prefill, _) = compiled(g, Mode::Prefill);
    let (decode, _) = compiled(g, Mode::Decode);
    for (c, mode, e) in [
        (&prefill, "prefill", env(1, 70, 0)),
        (&prefill, "prefill", env(2, 9, 4)),
        (&decode, "decode", env(1, 1, 5)),
        (&decode, "decode", env(2, 1, 3)),
    ] {
        let err = compare(g, c, &e, 31, tol.model()).unwrap_or_else(|m| panic!("{what} {mode} {e:?}: {m}"));
        println!("{what} {mode} {e:?}: worst relative error {err:.2e}");
    }
}

#[test]
fn compiled_tiny_equals_unfused() {
    compiled_equals_unfused(&model("tiny"), "tiny", Tol::F32);
}

#[test]
fn compiled_small_equals_unfused() {
    compiled_equals_unfused(&small_all_experts(), "small (all experts routed)", Tol::BF16);
}

// ---- prefill, then decode through the compiled decode graph --------------------------------------------

fn tokens(ids: &[i64]) -> Tensor {
    Tensor::from_i64(DType::I64, vec![1, ids.len()], ids.to_vec())
}

/// Zero states of batch 1 with nothing cached.
fn fresh_states(g: &Graph) -> HashMap<String, Tensor> {
    g.inputs
        .iter()
        .filter_map(|&i| match &g.node(i).op {
            Op::Input {
                name,
                kind: InputKind::State,
                dtype,
                shape,
            } => Some((
                name.clone(),
                Tensor::zeros(*dtype, eval_shape(shape, &env(1, 0, 0)).unwrap()),
            )),
            _ => None,
        })
        .collect()
}

/// One step of `g`: `ids` after the states `states`; returns the logits and the new states.
fn step(
    g: &Graph,
    w: &RandomWeights,
    ids: &[i64],
    states: &HashMap<String, Tensor>,
) -> (Vec<f32>, HashMap<String, Tensor>) {
    let mut inputs = states.clone();
    inputs.insert("tokens".into(), tokens(ids));
    let mut out = run(g, w, &inputs).unwrap();
    let logits = out
        .remove("logits")
        .unwrap()
        .to_f64_vec()
        .iter()
        .map(|&x| x as f32)
        .collect();
    let carried: Vec<String> = g
        .outputs
        .iter()
        .filter(|o| o.kind == InputKind::State)
        .map(|o| o.name.clone())
        .collect();
    let next = carried
        .into_iter()
        .map(|n| (n.clone(), out.remove(&n).unwrap()))
        .collect();
    (logits, next)
}

/// 67 prompt tokens through the compiled prefill graph (a full chunk and a ragged one), then 4
/// tokens one by one through the compiled decode graph (linear_attn_step on the carried
/// states), against the unfused graph's logits over all 71 tokens at once.
fn prefill_then_decode(g: &Graph, what: &str, tol: Tol, vocab: u64) {
    let (prefill, _) = compiled(g, Mode::Prefill);
    let (decode, _) = compiled(g, Mode::Decode);
    let mut rng = SplitMix(5);
    let ids: Vec<i64> = (0..71).map(|_| (rng.next_u64() % vocab) as i64).collect();
    let w = RandomWeights::new(17);
    let (want, _) = step(g, &w, &ids, &fresh_states(g));
    let (mut got, mut states) = step(&prefill, &w, &ids[..67], &fresh_states(g));
    for t in 67..71 {
        let (logits, next) = step(&decode, &w, &ids[t..t + 1], &states);
        got.extend(logits);
        states = next;
    }
    let err = check(what, &got, &want, tol.model()).unwrap_or_else(|m| panic!("{m}"));
    println!("{what}: prefill 67 + decode 4 vs forward 71: worst relative error {err:.2e}");
}

#[test]
fn tiny_prefill_then_decode_matches_one_forward() {
    prefill_then_decode(&model("tiny"), "tiny", Tol::F32, 256);
}

#[test]
fn small_prefill_then_decode_matches_one_forward() {
    prefill_then_decode(&small_all_experts(), "small (all experts routed)", Tol::BF16, 4096);
}
