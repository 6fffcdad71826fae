//! The moe family: the MoE block of spec §2.6 as `models/ring_linear.ring`'s `moe` writes it —
//! routing from primitives, then the *dense* definition (every expert over every token, weighted
//! by a dense `combine [b, s, E]` that is zero for the experts not chosen) — becomes
//! `route_topk` and two grouped GEMMs over the chosen experts only.
//!
//! Staging (style.md 9). The whole family only runs when [`super::Family::present`] finds a
//! `topk` and a stacked rank-3 parameter (the expert weights), so dense models never see these
//! patterns. Inside it, the expert rewrite is two exact identities, the second searched only
//! from the `gather` e-classes the first one creates:
//! 1. `moe-grouped-combine`: `Σ_e combine[b,s,e] · (h[b,e,s] · W_down[e]ᵀ)`, with `combine` the
//!    one-hot of `chosen` times the routing weights, is `grouped_matmul_combine` of the rows of
//!    `h` the chosen experts own (`gather(permute(h), chosen)`); this holds whatever `h` is,
//!    because `combine` weights the other experts by 0.
//! 2. `moe-grouped-swiglu`: those gathered rows of the dense expert SwiGLU `silu(x W_gateᵀ) ⊙
//!    (x W_upᵀ)` (fused to `swiglu` by the fuse family or not) are `grouped_matmul_swiglu`.
//!
//! The routing rules produce the tuple `(chosen, weights)` at once; the chosen port joins the
//! `topk` indices' e-class, so the expert rules (which match on those indices) keep working and
//! extraction picks either producer.
//!
//! The shared expert is untouched here: the fuse family turns it into the fused SwiGLU MLP,
//! whose kernels run beside the grouped GEMMs in the same layer.
//!
//! Every pattern is for `probs [batch, seq, E]` (the DSL's routing and `GroupedMatmul` are
//! rank 3), so reduction and top-k axes are written as literals; the sizes are checked by the
//! named layouts below.

use super::{all, dtype_is, is_iota, is_last_dim, rank_is, same_type, shape_is, tuple, type_shape_is, typed, S};
use crate::egraph::lang::Rl;
use crate::egraph::rewrite::{int_at_most_product, int_is_min, splits_last_dim, with_attrs, Cond, Derive, WithAttrs};
use crate::egraph::Rule;
use egg::{rewrite, Pattern};
use ir::DType;

fn pat(s: &str) -> Pattern<Rl> {
    match s.parse() {
        Ok(p) => p,
        Err(e) => panic!("moe pattern `{s}` does not parse: {e}"),
    }
}

/// The routing of §2.6 on `probs [b, s, E]` up to `chosen`: selection scores (`probs + bias`
/// when `biased`) split into groups (`?gs = [b,s,n_group,per]`); a group scores the sum of its
/// `min(2, per)` best; `?tg` groups kept as a one-hot over `arange(n_group)`; the others masked
/// to −∞; the `?k` best experts' indices.
fn chosen(biased: bool) -> String {
    let sel = if biased { "(add ?probs ?bias)" } else { "?probs" };
    let grouped = format!("(reshape {sel} ?gs)");
    let group_scores = format!("(sum (proj (topk {grouped} ?two 3) 0) [3] false)");
    let keep = format!("(reshape (proj (topk {group_scores} ?tg 2) 1) ?ks)");
    let kept = format!("(gt (sum (cast (eq {keep} ?io) f32) [2] false) (const 0.0 f32))");
    let masked = format!("(where (reshape {kept} ?ms) {grouped} (const -inf f32))");
    format!("(proj (topk (reshape {masked} ?es) ?k 2) 1)")
}

/// The routing weights: the unbiased `probs` of the chosen experts, divided by their sum
/// `+ 1e-20` when `normalize`, times `?scale`.
fn route_weights(biased: bool, normalize: bool) -> Pattern<Rl> {
    let w = format!("(gather ?probs {} 2)", chosen(biased));
    let w = if normalize {
        format!("(div {w} (add (sum {w} [2] true) (const 1e-20 f32)))")
    } else {
        w
    };
    pat(&format!("(mul {w} (const ?scale f32))"))
}

/// `(route_topk ..)` for a routing variant; its `chosen` output joins the `topk` indices, its
/// weights the matched class. `n_group` is the third entry of the group reshape's target.
fn route_topk(biased: bool, normalize: bool) -> WithAttrs {
    let bias = if biased { " ?bias" } else { "" };
    let rhs = format!("(route_topk ?probs{bias} ?k ?ng ?tg ?scale {normalize} {biased})");
    let n_group = [("?ng", Derive::Dim(S::ElemOf("?gs", 2)))];
    let chosen = chosen(biased);
    with_attrs(tuple(&rhs, &[chosen.as_str(), "root"]), &n_group)
}

// shapes the routing rules check, on probs [b, s, E] and the group reshape ?gs = [b, s, G, n]
const KEEP_COL: &[S] = &[S::DimOf("?probs", 0), S::DimOf("?probs", 1), S::Attr("?tg"), S::Lit(1)];
const GROUPS: &[S] = &[S::ElemOf("?gs", 2)];
const GROUP_COL: &[S] = &[
    S::DimOf("?probs", 0),
    S::DimOf("?probs", 1),
    S::ElemOf("?gs", 2),
    S::Lit(1),
];
const PROBS: &[S] = &[S::DimOf("?probs", 0), S::DimOf("?probs", 1), S::DimOf("?probs", 2)];
const EXPERTS: &[S] = &[S::DimOf("?probs", 2)];

/// The layout `moe` builds its routing with: f32 `probs [b, s, E]` split into `G` contiguous
/// groups of `n` (`?gs`); group scores from the `min(2, n)` best; the kept groups' indices as a
/// column `[b, s, tg, 1]` against `arange(G)`; the mask as `[b, s, G, 1]`; back to `[b, s, E]`
/// for the top-k; `k` experts that fit in the kept groups (the fused router's contract, which
/// the DSL's `require` also states).
fn route_layout() -> impl Cond {
    all(vec![
        Box::new(rank_is("?probs", 3)),
        Box::new(dtype_is("?probs", DType::F32)),
        Box::new(splits_last_dim("?gs", "?probs")),
        Box::new(int_is_min("?two", 2, S::ElemOf("?gs", 3))),
        Box::new(shape_is("?ks", KEEP_COL)),
        Box::new(is_iota("?io")),
        Box::new(type_shape_is("?io", GROUPS)),
        Box::new(shape_is("?ms", GROUP_COL)),
        Box::new(shape_is("?es", PROBS)),
        Box::new(int_at_most_product("?k", S::Attr("?tg"), S::ElemOf("?gs", 3))),
    ])
}

/// [`route_layout`] and an f32 expert bias `[E]`.
fn biased_route_layout() -> impl Cond {
    all(vec![
        Box::new(route_layout()),
        Box::new(type_shape_is("?bias", EXPERTS)),
        Box::new(dtype_is("?bias", DType::F32)),
    ])
}

/// The routed output of the dense definition: `Σ_e y[b,e,s,:] · combine[b,s,e]` over the
/// experts axis, `y = h @ W_downᵀ` per expert (cast to f32 when `narrow`), `combine` the sum
/// over the K slots of `route_weights · one_hot(chosen, E)`, `chosen` the indices of a top-k.
fn dense_combine(narrow: bool) -> Pattern<Rl> {
    let y = "(matmul ?h (permute ?wd [0,2,1]))";
    let y = if narrow {
        format!("(cast {y} f32)")
    } else {
        y.to_string()
    };
    let one_hot = "(cast (eq (reshape (proj (topk ?sc ?k 2) 1) ?cs) ?io) f32)";
    let combine = format!("(sum (mul (reshape ?rw ?rs) {one_hot}) [2] false)");
    pat(&format!(
        "(sum (mul {y} (reshape (permute {combine} [0,2,1]) ?ce)) [1] false)"
    ))
}

/// `grouped_matmul_combine` over the rows of the dense `h [b, E, s, I]` that the chosen experts
/// own: `gather(h as [b, s, E, I], chosen expanded to [b, s, K, I], axis 2)`.
fn grouped_combine() -> WithAttrs {
    let chosen = "(proj (topk ?sc ?k 2) 1)";
    let rows = format!("(gather (permute ?h [0,2,1,3]) (expand (reshape {chosen} ?cs) ?ex) 2)");
    let rhs = format!("(grouped_matmul_combine {rows} {chosen} ?rw ?wd)");
    with_attrs(typed(&rhs), &[("?ex", Derive::Shape(CHOSEN_ROWS))])
}

// shapes the combine rules check: weights ?rw [b, s, K], h [b, E, s, I], w_down [E, D, I]
const SLOT_COL: &[S] = &[S::DimOf("?rw", 0), S::DimOf("?rw", 1), S::DimOf("?rw", 2), S::Lit(1)];
const CHOSEN_ROWS: &[S] = &[
    S::DimOf("?rw", 0),
    S::DimOf("?rw", 1),
    S::DimOf("?rw", 2),
    S::DimOf("?h", 3),
];
const DENSE_H: &[S] = &[
    S::DimOf("?rw", 0),
    S::DimOf("?wd", 0),
    S::DimOf("?rw", 1),
    S::DimOf("?wd", 2),
];
const SCORES: &[S] = &[S::DimOf("?rw", 0), S::DimOf("?rw", 1), S::DimOf("?wd", 0)];
const ALL_EXPERTS: &[S] = &[S::DimOf("?wd", 0)];
const EXPERT_COL: &[S] = &[S::DimOf("?h", 0), S::DimOf("?wd", 0), S::DimOf("?h", 2), S::Lit(1)];

/// The layout `moe` builds its dense combine with: f32 weights `[b, s, K]` and the indices of
/// a top-K over E scores (distinct experts in `0..E`: what makes the one-hot sum a selection),
/// both as columns `[b, s, K, 1]` against `arange(E)`; `h [b, E, s, I]`, `w_down [E, D, I]`;
/// `combine` back as `[b, E, s, 1]`.
fn combine_layout() -> impl Cond {
    all(vec![
        Box::new(rank_is("?rw", 3)),
        Box::new(dtype_is("?rw", DType::F32)),
        Box::new(rank_is("?wd", 3)),
        Box::new(type_shape_is("?h", DENSE_H)),
        Box::new(type_shape_is("?sc", SCORES)),
        Box::new(is_last_dim("?k", "?rw")),
        Box::new(shape_is("?rs", SLOT_COL)),
        Box::new(shape_is("?cs", SLOT_COL)),
        Box::new(is_iota("?io")),
        Box::new(type_shape_is("?io", ALL_EXPERTS)),
        Box::new(shape_is("?ce", EXPERT_COL)),
    ])
}

/// Rows `chosen` of the dense expert SwiGLU `silu(xe · W_gateᵀ) ⊙ (xe · W_upᵀ)` over
/// `xe = unsqueeze(x, 1)`, in the layout [`grouped_combine`] gathers them in; the SwiGLU either
/// as the fuse family's `(swiglu g u)` or as the DSL wrote it.
fn gathered_swiglu(fused: bool) -> Pattern<Rl> {
    let g = "(matmul (reshape ?x ?xs) (permute ?wg [0,2,1]))";
    let u = "(matmul (reshape ?x ?xs) (permute ?wu [0,2,1]))";
    let h = if fused {
        format!("(swiglu {g} {u})")
    } else {
        format!("(mul (mul {g} (sigmoid {g})) {u})")
    };
    pat(&format!(
        "(gather (permute {h} [0,2,1,3]) (expand (reshape ?chosen ?cs) ?ex) 2)"
    ))
}

const X_UNSQUEEZED: &[S] = &[S::DimOf("?x", 0), S::Lit(1), S::DimOf("?x", 1), S::DimOf("?x", 2)];
const CHOSEN_COL: &[S] = &[
    S::DimOf("?chosen", 0),
    S::DimOf("?chosen", 1),
    S::DimOf("?chosen", 2),
    S::Lit(1),
];
const CHOSEN_EXPANDED: &[S] = &[
    S::DimOf("?chosen", 0),
    S::DimOf("?chosen", 1),
    S::DimOf("?chosen", 2),
    S::DimOf("?wg", 1),
];

/// `x [b, s, D]` as `[b, 1, s, D]` against stacked `w_gate`, `w_up [E, I, D]` of one type; i64
/// `chosen [b, s, K]` as `[b, s, K, 1]`, expanded over the I columns of a row.
fn swiglu_layout() -> impl Cond {
    all(vec![
        Box::new(rank_is("?x", 3)),
        Box::new(shape_is("?xs", X_UNSQUEEZED)),
        Box::new(rank_is("?wg", 3)),
        Box::new(same_type("?wg", "?wu")),
        Box::new(rank_is("?chosen", 3)),
        Box::new(dtype_is("?chosen", DType::I64)),
        Box::new(shape_is("?cs", CHOSEN_COL)),
        Box::new(shape_is("?ex", CHOSEN_EXPANDED)),
    ])
}

/// The moe rule table.
#[rustfmt::skip]
pub fn moe_rules() -> Vec<Rule> {
    vec![
        // The router as one kernel per token row (§2.6): E ≤ 256 scores sit in one thread block's
        // registers / shared memory, where the group scores, the group mask, the top-k and the
        // normalisation run without ~20 launches and [b, s, E] round trips through HBM; it
        // emits the i64 indices the grouped GEMMs gather weight tiles by. Four variants, as the
        // config drives ring_linear.ring (expert bias on/off, norm_topk_prob on/off).
        rewrite!("moe-route-topk"; { route_weights(true, true) } => { route_topk(true, true) } if biased_route_layout()),
        rewrite!("moe-route-topk-unbiased"; { route_weights(false, true) } => { route_topk(false, true) } if route_layout()),
        rewrite!("moe-route-topk-unnormalized"; { route_weights(true, false) } => { route_topk(true, false) } if biased_route_layout()),
        rewrite!("moe-route-topk-unbiased-unnormalized"; { route_weights(false, false) } => { route_topk(false, false) } if route_layout()),
        // The down projection over the chosen experts only, with the routing-weighted sum in
        // the epilogue (f32 accumulators in registers): decode is weight-bandwidth bound and
        // reads only the K chosen experts' W_down tiles instead of all E; prefill does
        // tokens·K GEMM rows instead of tokens·E, and [b, E, s, D] never reaches HBM. Its
        // operand is the gather of h's chosen rows: exact for any h, and the small e-class the
        // swiglu rules below start from (stage 1 of 2).
        rewrite!("moe-grouped-combine"; { dense_combine(false) } => { grouped_combine() } if combine_layout()),
        rewrite!("moe-grouped-combine-narrow"; { dense_combine(true) } => { grouped_combine() } if combine_layout()),
        // Gate and up as one grouped GEMM over the chosen experts (both weight tiles streamed
        // against one read of each token's x row), SiLU · up in the epilogue: h [b, s, K, I] is
        // written once, in the activation dtype, instead of three [b, E, s, I] tensors.
        // Listed before the unfused form: in a full compile the fuse family's `swiglu` is
        // already in the e-class, and the first rule to apply is the one counted.
        rewrite!("moe-grouped-swiglu"; { gathered_swiglu(true) } => { typed("(grouped_matmul_swiglu ?x ?chosen ?wg ?wu)") } if swiglu_layout()),
        rewrite!("moe-grouped-swiglu-unfused"; { gathered_swiglu(false) } => { typed("(grouped_matmul_swiglu ?x ?chosen ?wg ?wu)") } if swiglu_layout()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egraph::{saturate, to_egraph};
    use crate::rules::fuse_rules;
    use crate::testing::{check_rewrite, dsl, test_limits};

    /// ring_linear.ring's routing for E = 8 experts in 4 groups of 2, 2 groups kept, K = 2,
    /// `bias`/`normalize` as the config switches would set them; outputs `chosen`, `weights`.
    fn route_src(biased: bool, normalize: bool) -> String {
        let sel = if biased { "probs + bias" } else { "probs" };
        let w = if normalize {
            "w / (sum(w, axis = -1, keepdim = true) + 1e-20)"
        } else {
            "w"
        };
        format!(
            "dim b, s;
            input x: f32[b, s, 16];
            param w_router: f32[8, 16] = \"router\";
            param bias: f32[8] = \"bias\";
            let probs = sigmoid(x @ transpose(w_router));
            let grouped = reshape({sel}, [b, s, 4, 2]);
            let (best, _) = topk(grouped, min(2, 2), axis = -1);
            let (_, keep) = topk(sum(best, axis = -1), 2, axis = -1);
            let kept = sum(cast(unsqueeze(keep, -1) == arange(4), f32), axis = -2) > 0.0;
            let masked = where(unsqueeze(kept, -1), grouped, -inf);
            let (_, chosen) = topk(reshape(masked, [b, s, 8]), 2, axis = -1);
            let w = gather(probs, chosen, axis = -1);
            let w = {w};
            output \"chosen\" = chosen;
            output \"weights\" = w * 2.5;"
        )
    }

    fn route_case(biased: bool, normalize: bool, rule: &str) {
        let g = dsl(&route_src(biased, normalize));
        let bias = if biased { " {bias}" } else { "" };
        let rt = format!("(route_topk (sigmoid ?z){bias} 2 4 2 2.5 {normalize} {biased})");
        for (output, port) in [("weights", 1), ("chosen", 0)] {
            let goal = format!("(proj {rt} {port})");
            let (_, sat) = check_rewrite(&g, output, &goal, &moe_rules(), &test_limits())
                .unwrap_or_else(|e| panic!("{rule}: {e}\n{}", g.to_text()));
            assert!(!sat.stop_reason.hit_limit(), "{}", sat.stop_reason);
            assert_eq!(sat.fired.get(rule), Some(&1), "{:?}", sat.fired);
            assert_eq!(sat.fired.len(), 1, "only {rule}: {:?}", sat.fired);
            assert!(sat.refused.is_empty(), "{:?}", sat.refusal_example);
        }
    }

    #[test]
    fn route_topk_biased_normalized() {
        route_case(true, true, "moe-route-topk");
    }

    #[test]
    fn route_topk_unbiased() {
        route_case(false, true, "moe-route-topk-unbiased");
    }

    #[test]
    fn route_topk_unnormalized() {
        route_case(true, false, "moe-route-topk-unnormalized");
    }

    #[test]
    fn route_topk_unbiased_unnormalized() {
        route_case(false, false, "moe-route-topk-unbiased-unnormalized");
    }

    /// Rules that must not fire on `src`.
    fn fired(src: &str) -> std::collections::BTreeMap<String, usize> {
        let g = dsl(src);
        let (eg, _) = to_egraph(&g).unwrap();
        let (_, sat) = saturate(eg, &moe_rules(), &test_limits());
        assert!(!sat.stop_reason.hit_limit(), "{}", sat.stop_reason);
        sat.fired
    }

    #[test]
    fn near_misses_of_the_routing_are_left_alone() {
        let src = route_src(true, true);
        let misses = [
            // the mask zeroes instead of −∞ (mlx's form; differs when scores can be negative)
            ("grouped, -inf)", "grouped, 0.0)"),
            // a group scores its best expert only
            ("topk(grouped, min(2, 2)", "topk(grouped, 1"),
            // the groups are not contiguous: [b, s, 2, 4] would pair them differently
            ("arange(4)", "(3 - arange(4))"),
            // another epsilon than the fused router's 1e-20
            ("+ 1e-20", "+ 1e-6"),
        ];
        for (from, to) in misses {
            assert!(src.contains(from), "{from}");
            let f = fired(&src.replace(from, to));
            assert!(f.is_empty(), "{to}: {f:?}");
        }
        // weights from the selection scores too: an unbiased router over the scores `probs + bias`
        let f = fired(&src.replace("gather(probs, chosen", "gather(probs + bias, chosen"));
        assert_eq!(f.keys().collect::<Vec<_>>(), ["moe-route-topk-unbiased"], "{f:?}");
        // k larger than the kept groups hold: the DSL picks −∞ experts, the fused router refuses
        let wide = src.replace("reshape(masked, [b, s, 8]), 2,", "reshape(masked, [b, s, 8]), 5,");
        let f = fired(&wide);
        assert!(!f.keys().any(|r| r.starts_with("moe-route")), "{f:?}");
        // and k = 4, all that the two kept groups of two hold, is routed
        let full = src.replace("reshape(masked, [b, s, 8]), 2,", "reshape(masked, [b, s, 8]), 4,");
        assert_eq!(fired(&full).get("moe-route-topk"), Some(&1));
    }

    /// ring_linear.ring's dense experts (E = 8, I = 4, D = 16) over the indices of a top-2 and
    /// given weights; output `routed`.
    fn experts_src(dt: &str) -> String {
        let y = if dt == "f32" { "y" } else { "cast(y, f32)" };
        format!(
            "fn silu(x) {{ x * sigmoid(x) }}
            dim b, s;
            input x: {dt}[b, s, 16];
            input scores: f32[b, s, 8];
            input rw: f32[b, s, 2];
            let (_, chosen) = topk(scores, 2, axis = -1);
            let combine = sum(unsqueeze(rw, -1) * cast(unsqueeze(chosen, -1) == arange(8), f32), axis = -2);
            param eg: {dt}[8, 4, 16] = \"eg.{{e}}\" for e in 0..8;
            param eu: {dt}[8, 4, 16] = \"eu.{{e}}\" for e in 0..8;
            param ed: {dt}[8, 16, 4] = \"ed.{{e}}\" for e in 0..8;
            let xe = unsqueeze(x, 1);
            let h = silu(xe @ transpose(eg)) * (xe @ transpose(eu));
            let y = h @ transpose(ed);
            output \"routed\" = sum({y} * unsqueeze(permute(combine, [0, 2, 1]), -1), axis = 1);"
        )
    }

    /// (stacked parameters are named by their per-expert pattern, `eg.{e}`)
    const GROUPED: &str = "(grouped_matmul_combine (grouped_matmul_swiglu {x} ?c {eg.{e}} {eu.{e}}) ?c {rw} {ed.{e}})";

    fn experts_case(dt: &str, rules: &[Rule]) -> crate::egraph::Saturation {
        let g = dsl(&experts_src(dt));
        let (_, sat) = check_rewrite(&g, "routed", GROUPED, rules, &test_limits())
            .unwrap_or_else(|e| panic!("{e}\n{}", g.to_text()));
        assert!(!sat.stop_reason.hit_limit(), "{}", sat.stop_reason);
        assert!(sat.refused.is_empty(), "{:?}", sat.refusal_example);
        sat
    }

    #[test]
    fn grouped_experts_f32_from_the_unfused_swiglu() {
        let sat = experts_case("f32", &moe_rules());
        assert_eq!(sat.fired.get("moe-grouped-combine"), Some(&1), "{:?}", sat.fired);
        assert_eq!(sat.fired.get("moe-grouped-swiglu-unfused"), Some(&1), "{:?}", sat.fired);
        assert_eq!(sat.fired.len(), 2, "{:?}", sat.fired);
    }

    #[test]
    fn grouped_experts_narrow_from_the_fused_swiglu() {
        // with the fuse family, `swiglu` is in h's e-class before the gather appears
        let rules: Vec<Rule> = moe_rules().into_iter().chain(fuse_rules()).collect();
        let sat = experts_case("bf16", &rules);
        assert_eq!(sat.fired.get("moe-grouped-combine-narrow"), Some(&1), "{:?}", sat.fired);
        assert_eq!(sat.fired.get("moe-grouped-swiglu"), Some(&1), "{:?}", sat.fired);
        assert_eq!(sat.fired.get("moe-grouped-swiglu-unfused"), None, "{:?}", sat.fired);
    }

    #[test]
    fn the_combine_stage_holds_for_any_dense_expert_output() {
        // h is not a SwiGLU (tanh): only stage 1 applies, over the gathered rows of h
        let src = experts_src("f32").replace(
            "silu(xe @ transpose(eg)) * (xe @ transpose(eu))",
            "tanh(xe @ transpose(eg))",
        );
        let g = dsl(&src);
        let goal = "(grouped_matmul_combine (gather (permute ?h [0,2,1,3]) ?rows 2) ?c {rw} {ed.{e}})";
        let (_, sat) = check_rewrite(&g, "routed", goal, &moe_rules(), &test_limits()).unwrap();
        assert_eq!(sat.fired.get("moe-grouped-combine"), Some(&1), "{:?}", sat.fired);
        assert_eq!(sat.fired.len(), 1, "{:?}", sat.fired);
    }

    #[test]
    fn the_cost_model_reads_only_the_chosen_experts_weights() {
        use crate::CostModel;
        use ir::fused::{Fused, GroupedEpilogue};
        use ir::graph::TensorType;
        use ir::op::Op;
        use ir::shape::Dim;
        // ring-mini's sizes: 256 experts of [512, 2048], 8 chosen per token
        let (b, s, c) = (Dim::sym("batch"), Dim::sym("seq"), Dim::constant);
        let x = TensorType::new(DType::BF16, vec![b.clone(), s.clone(), c(2048)]);
        let chosen = TensorType::new(DType::I64, vec![b.clone(), s.clone(), c(8)]);
        let w = TensorType::new(DType::BF16, vec![c(256), c(512), c(2048)]);
        let h = TensorType::new(DType::BF16, vec![b, s, c(8), c(512)]);
        let op = Op::Fused(Fused::GroupedMatmul {
            epilogue: GroupedEpilogue::SwiGlu,
        });
        let all_weights_us = |m: &CostModel| 2.0 * 256.0 * 512.0 * 2048.0 * 2.0 / m.bandwidth;
        // decode: one token, the gate and up weights of its 8 experts (and a launch)
        let decode = CostModel::decode();
        let cost = decode.op_cost(&op, &[&x, &chosen, &w, &w], std::slice::from_ref(&h));
        let chosen_us = all_weights_us(&decode) * 8.0 / 256.0;
        assert!(
            cost > chosen_us && cost < chosen_us + decode.launch_us + 1.0,
            "{cost} vs {chosen_us}"
        );
        // prefill: 4096 tokens · 8 slots touch every expert, each read once
        let prefill = CostModel::prefill();
        let cost = prefill.op_cost(&op, &[&x, &chosen, &w, &w], std::slice::from_ref(&h));
        assert!(cost > all_weights_us(&prefill), "{cost}");
    }

    #[test]
    fn present_needs_a_top_k_and_stacked_expert_weights() {
        use crate::rules::Family;
        // the router alone (a top-k, no stacked weights), the experts alone (stacked weights,
        // no top-k), both
        assert!(!Family::Moe.present(&dsl(&route_src(true, true))));
        let experts = experts_src("f32").replace(
            "let (_, chosen) = topk(scores, 2, axis = -1);",
            "input chosen: i64[b, s, 2];",
        );
        assert!(!Family::Moe.present(&dsl(&experts)));
        assert!(Family::Moe.present(&dsl(&experts_src("f32"))));
    }

    #[test]
    fn near_misses_of_the_dense_experts_are_left_alone() {
        let src = experts_src("f32");
        let misses = [
            // the one-hot against reversed expert ids: expert e gets the weight of slot 7 - e
            ("== arange(8)", "== (7 - arange(8))"),
            // indices that are not a top-k (may repeat or leave 0..E)
            (
                "let (_, chosen) = topk(scores, 2, axis = -1);",
                "input chosen: i64[b, s, 2];",
            ),
            // the sum over the wrong axis
            ("-1), axis = 1)", "-1), axis = 2)"),
        ];
        for (from, to) in misses {
            assert!(src.contains(from), "{from}");
            let f = fired(&src.replace(from, to));
            assert!(!f.keys().any(|r| r.starts_with("moe-grouped")), "{to}: {f:?}");
        }
    }
}
