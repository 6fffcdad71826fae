//! The fuse family: composite kernels for the memory-bound parts of a Ring-linear layer.
//!
//! The patterns are the shapes `models/ring_linear.ring` elaborates to (see
//! `ringjit graph --config tiny` for f32 and `--config small` for bf16, which adds the casts of
//! §2.2's "statistics in f32"). Long patterns are assembled from named fragments below, so
//! that every rule line still reads as `lhs => rhs if conditions`.
//!
//! Staging: the RMSNorm and softmax rules fire first; the QK-norm + RoPE, residual + norm and
//! attention rules match on the composite nodes they produced (`(rms_norm ..)`,
//! `(softmax ..)`), so a 40-op attention pattern is only ever searched from `matmul` e-classes
//! and never re-derives the norm.

use super::{
    all, dtype_is, dtype_of, is_iota, is_last_axis, is_last_dim, is_last_dim_size, last_axis, perm_is, rank_is,
    rotary_halves, same_shape, same_type, shape_is, tuple, type_shape_is, typed, S,
};
use crate::egraph::lang::Rl;
use crate::egraph::rewrite::{params_in_order, with_attrs, Cond, Derive, WithAttrs};
use crate::egraph::Rule;
use egg::{rewrite, MultiPattern, Pattern};
use ir::DType;

fn pat(s: &str) -> Pattern<Rl> {
    match s.parse() {
        Ok(p) => p,
        Err(e) => panic!("fuse pattern `{s}` does not parse: {e}"),
    }
}

/// `x · rsqrt(mean(x², last axis) + eps)` over `xf` (the value the statistics are taken of).
fn normalized(xf: &str) -> String {
    format!("(mul {xf} (rsqrt (add (div (sum (mul {xf} {xf}) ?ax true) (const ?n ?tn)) (const ?eps ?te))))")
}

/// §2.2 in f32: `x · rsqrt(mean(x²) + eps) · w` (the casts of the DSL are no-ops and elided).
fn rms_norm_f32() -> Pattern<Rl> {
    pat(&format!("(mul {} ?w)", normalized("?x")))
}

/// §2.2 in a narrow dtype: statistics on `cast(x, f32)`, the result cast back to x's dtype,
/// then the weight.
fn rms_norm_narrow() -> Pattern<Rl> {
    pat(&format!("(mul (cast {} ?dt) ?w)", normalized("(cast ?x f32)")))
}

/// `exp(x - max(x)) / sum(exp(x - max(x)))` over the last axis.
fn softmax() -> Pattern<Rl> {
    let e = "(exp (sub ?x (amax ?x ?ax true)))";
    pat(&format!("(div {e} (sum {e} ?ax true))"))
}

/// §2.5 NeoX RoPE on the first `2h` dims of the QK-normed `n` (in f32 as `nf`), the rest passed
/// through: `concat(x1·c − x2·s, x2·c + x1·s, x[r:])` with `c, s` of `pos · inv_freq`.
fn rope_of(nf: &str) -> String {
    let ang = "(mul (cast (reshape ?pos ?ps) f32) (reshape ?inv ?is))";
    let c = format!("(reshape (cos {ang}) ?cs)");
    let s = format!("(reshape (sin {ang}) ?cs)");
    let x1 = format!("(slice {nf} ?ax 0 ?h)");
    let x2 = format!("(slice {nf} ?ax ?h ?r)");
    format!(
        "(concat (sub (mul {x1} {c}) (mul {x2} {s})) (add (mul {x2} {c}) (mul {x1} {s})) (slice {nf} ?ax ?r ?d) ?ax)"
    )
}

fn qk_norm_rope_f32() -> Pattern<Rl> {
    pat(&rope_of("(rms_norm ?x ?w ?eps)"))
}

fn qk_norm_rope_narrow() -> Pattern<Rl> {
    pat(&format!("(cast {} ?dt)", rope_of("(cast (rms_norm ?x ?w ?eps) f32)")))
}

/// §2.3 softmax attention: `softmax(where(causal, scale · q kᵀ, -inf)) v` with the GQA
/// layout of `softmax_attention` (k and v `[b, Hkv, n, d]` given an axis for the group).
fn attention(q: &str, kt: &str, v: &str) -> Pattern<Rl> {
    let causal = "(le (reshape ?io ?s1) (reshape ?pos ?s2))";
    let scores = format!("(mul (matmul {q} {kt}) (const ?scale ?ts))");
    pat(&format!(
        "(matmul (softmax (where {causal} {scores} (const -inf ?ti))) {v})"
    ))
}

fn attention_f32() -> Pattern<Rl> {
    attention("?q", "(reshape (permute ?k ?kp) ?ks)", "(reshape ?v ?vs)")
}

fn attention_narrow() -> Pattern<Rl> {
    attention(
        "(cast ?q f32)",
        "(cast (reshape (permute ?k ?kp) ?ks) f32)",
        "(cast (reshape ?v ?vs) f32)",
    )
}

// shapes the attention rules check
const KT_SHAPE: &[S] = &[
    S::DimOf("?k", 0),
    S::DimOf("?k", 1),
    S::Lit(1),
    S::DimOf("?k", 3),
    S::DimOf("?k", 2),
];
const V_SHAPE: &[S] = &[
    S::DimOf("?v", 0),
    S::DimOf("?v", 1),
    S::Lit(1),
    S::DimOf("?v", 2),
    S::DimOf("?v", 3),
];
const KEYS_ROW: &[S] = &[S::Lit(1), S::DimOf("?k", 2)];
const KEYS: &[S] = &[S::DimOf("?k", 2)];
const QUERIES_COL: &[S] = &[S::DimOf("?pos", 0), S::Lit(1)];
// shapes the RoPE rules check: positions [seq, 1] times frequencies [1, h], tables [seq, 1, h]
const POS_COL: &[S] = &[S::DimOf("?pos", 0), S::Lit(1)];
const FREQ_ROW: &[S] = &[S::Lit(1), S::Attr("?h")];
const TABLE: &[S] = &[S::DimOf("?pos", 0), S::Lit(1), S::Attr("?h")];

/// `sum(..) / n` is a mean over the last axis of `x`.
fn mean_over_last_axis() -> impl Cond {
    all(vec![
        Box::new(last_axis("?ax", "?x")),
        Box::new(is_last_dim_size("?n", "?x")),
        Box::new(rank_is("?w", 1)),
    ])
}

/// The layout `rope()` builds: halves `0:h`, `h:2h` of the last axis rotated, `2h:d` passed
/// through; positions `[seq, 1]` times frequencies `[1, h]`, tables `[seq, 1, h]`.
fn rope_layout() -> impl Cond {
    all(vec![
        Box::new(is_last_axis("?ax", "?x")),
        Box::new(rotary_halves("?h", "?r", "?x")),
        Box::new(is_last_dim("?d", "?x")),
        Box::new(rank_is("?pos", 1)),
        Box::new(shape_is("?ps", POS_COL)),
        Box::new(shape_is("?is", FREQ_ROW)),
        Box::new(shape_is("?cs", TABLE)),
    ])
}

/// The layout `softmax_attention` builds: `kᵀ` as `[b, Hkv, 1, d, n]` from `k [b, Hkv, n, d]`,
/// `v` as `[b, Hkv, 1, n, d]` (one KV head per query group), and the causal mask
/// `arange(n)[None, :] <= pos[:, None]` over the same n keys.
fn gqa_causal_layout() -> impl Cond {
    all(vec![
        Box::new(perm_is("?kp", &[0, 1, 3, 2])),
        Box::new(shape_is("?ks", KT_SHAPE)),
        Box::new(shape_is("?vs", V_SHAPE)),
        Box::new(is_iota("?io")),
        Box::new(type_shape_is("?io", KEYS)),
        Box::new(shape_is("?s1", KEYS_ROW)),
        Box::new(shape_is("?s2", QUERIES_COL)),
        Box::new(rank_is("?pos", 1)),
    ])
}

/// Two GEMMs of one activation `?x` by two weights (HF `[out, in]`, used transposed): `?a`
/// first, or `?b` first (a multi-pattern's rewrite applies to its first pattern's e-class).
fn gemms_sharing_input(first_a: bool) -> MultiPattern<Rl> {
    let (a, b) = (
        "?a = (matmul ?x (permute ?p1 ?t1))",
        "?b = (matmul ?x (permute ?p2 ?t2))",
    );
    let text = if first_a {
        format!("{a}, {b}")
    } else {
        format!("{b}, {a}")
    };
    match text.parse() {
        Ok(p) => p,
        Err(e) => panic!("fuse multi-pattern `{text}` does not parse: {e:?}"),
    }
}

/// Both weights are checkpoint matrices `[out, in]` read transposed, `?p1` declared first.
fn two_weights_of_one_input() -> impl Cond {
    all(vec![
        Box::new(params_in_order("?p1", "?p2")),
        Box::new(rank_is("?p1", 2)),
        Box::new(rank_is("?p2", 2)),
        Box::new(perm_is("?t1", &[1, 0])),
        Box::new(perm_is("?t2", &[1, 0])),
    ])
}

/// `?x · [W1ᵀ | W2ᵀ]`, the columns `lo..hi` of it (`first`: W1's, else W2's).
fn slice_of_concatenated_gemm(first: bool) -> WithAttrs {
    let m = "(matmul ?x (concat (permute ?p1 ?t1) (permute ?p2 ?t2) 1))";
    let rhs = if first {
        format!("(slice {m} ?ax 0 ?n1)")
    } else {
        format!("(slice {m} ?ax ?n1 ?end)")
    };
    with_attrs(
        typed(&rhs),
        &[
            ("?ax", Derive::Dim(S::LastAxisOf("?x"))),
            ("?n1", Derive::Dim(S::DimOf("?p1", 0))),
            ("?end", Derive::Sum(S::DimOf("?p1", 0), S::DimOf("?p2", 0))),
        ],
    )
}

/// QK-norm + RoPE of two adjacent column ranges of one projection (q's heads and k's heads of
/// one `qkv`), with the same positions, frequencies, eps and rotary dims: `?a` or `?b` first.
fn qk_norm_rope_pair(first_a: bool) -> MultiPattern<Rl> {
    let (a, b) = (
        "?a = (qk_norm_rope (reshape (slice ?src ?ax ?lo ?mid) ?s1) ?w1 ?pos ?inv ?eps ?r)",
        "?b = (qk_norm_rope (reshape (slice ?src ?ax ?mid ?hi) ?s2) ?w2 ?pos ?inv ?eps ?r)",
    );
    let text = if first_a {
        format!("{a}, {b}")
    } else {
        format!("{b}, {a}")
    };
    match text.parse() {
        Ok(p) => p,
        Err(e) => panic!("fuse multi-pattern `{text}` does not parse: {e:?}"),
    }
}

// shapes of the merged QK-norm + RoPE: heads of both side by side, one weight row per head
const HEADS_SUM: &[S] = &[
    S::ElemOf("?s1", 0),
    S::ElemOf("?s1", 1),
    S::ElemSum("?s1", "?s2", 2),
    S::ElemOf("?s1", 3),
];
const W1_ROW: &[S] = &[S::Lit(1), S::DimOf("?w1", 0)];
const W2_ROW: &[S] = &[S::Lit(1), S::DimOf("?w2", 0)];
const W1_HEADS: &[S] = &[S::ElemOf("?s1", 2), S::DimOf("?w1", 0)];
const W2_HEADS: &[S] = &[S::ElemOf("?s2", 2), S::DimOf("?w2", 0)];

/// Both parts are `[b, s, heads, d]` views of the last axis with one weight `[d]` each.
fn qk_pair_layout() -> impl Cond {
    all(vec![
        Box::new(is_last_axis("?ax", "?src")),
        Box::new(rank_is("?a", 4)),
        Box::new(rank_is("?b", 4)),
        Box::new(rank_is("?w1", 1)),
        Box::new(rank_is("?w2", 1)),
        Box::new(same_type("?w1", "?w2")),
    ])
}

/// Heads `lo..hi` of the merged op (`first`: `?a`'s, else `?b`'s).
fn slice_of_qk_norm_rope_pair(first: bool) -> WithAttrs {
    let w = "(concat (expand (reshape ?w1 ?w1r) ?w1h) (expand (reshape ?w2 ?w2r) ?w2h) 0)";
    let y = format!("(qk_norm_rope (reshape (slice ?src ?ax ?lo ?hi) ?s12) {w} ?pos ?inv ?eps ?r)");
    let rhs = if first {
        format!("(slice {y} 2 0 ?h1)")
    } else {
        format!("(slice {y} 2 ?h1 ?h12)")
    };
    with_attrs(
        typed(&rhs),
        &[
            ("?s12", Derive::Shape(HEADS_SUM)),
            ("?w1r", Derive::Shape(W1_ROW)),
            ("?w2r", Derive::Shape(W2_ROW)),
            ("?w1h", Derive::Shape(W1_HEADS)),
            ("?w2h", Derive::Shape(W2_HEADS)),
            ("?h1", Derive::Dim(S::ElemOf("?s1", 2))),
            ("?h12", Derive::Dim(S::ElemSum("?s1", "?s2", 2))),
        ],
    )
}

/// The fuse rule table.
#[rustfmt::skip]
pub fn fuse_rules() -> Vec<Rule> {
    vec![
        // RMSNorm as one kernel: one read of x, statistics in registers, one write (§2.2). The
        // unfused form is 7 kernels and 6 round trips of an activation through HBM.
        rewrite!("fuse-rmsnorm"; { rms_norm_f32() } => { typed("(rms_norm ?x ?w ?eps)") } if dtype_is("?x", DType::F32) if mean_over_last_axis()),
        rewrite!("fuse-rmsnorm-narrow"; { rms_norm_narrow() } => { typed("(rms_norm ?x ?w ?eps)") } if dtype_of("?dt", "?x") if mean_over_last_axis()),
        // The residual add feeding the next norm: both outputs from one pass over h and a (the
        // residual stream is the largest activation; reading it once instead of three times).
        rewrite!("fuse-add-rmsnorm"; "(rms_norm (add ?h ?a) ?w ?eps)" => { tuple("(add_rms_norm ?h ?a ?w ?eps)", &["(add ?h ?a)", "root"]) } if same_type("?h", "?a")),
        // SiLU-gated MLP product (dense MLP, shared expert, routed experts): one elementwise
        // kernel instead of three, later the epilogue of the up/gate GEMM.
        rewrite!("fuse-swiglu"; "(mul (mul ?g (sigmoid ?g)) ?u)" => { typed("(swiglu ?g ?u)") } if same_shape("?g", "?u")),
        // Softmax-shaped reduction: one row per thread block, max and sum in registers.
        rewrite!("fuse-softmax"; { softmax() } => { typed("(softmax ?x)") } if last_axis("?ax", "?x")),
        // Per-head QK-norm and partial NeoX RoPE (§2.3, §2.4.3, §2.5): cos/sin computed in the
        // kernel from pos and the folded inv_freq literal; the normed q/k never reach HBM.
        rewrite!("fuse-qknorm-rope"; { qk_norm_rope_f32() } => { typed("(qk_norm_rope ?x ?w ?pos ?inv ?eps ?r)") } if rope_layout()),
        rewrite!("fuse-qknorm-rope-narrow"; { qk_norm_rope_narrow() } => { typed("(qk_norm_rope ?x ?w ?pos ?inv ?eps ?r)") } if rope_layout()),
        // QKᵀ, scale, causal mask, softmax and PV in one kernel (GQA: the Hkv axis shared by a
        // group of query heads; decode reads the KV cache k, v = [past + seq] keys): the
        // [seq, past + seq] score matrix never reaches HBM.
        rewrite!("fuse-flash-attention"; { attention_f32() } => { typed("(flash_attention ?q ?k ?v ?pos ?scale)") } if gqa_causal_layout()),
        rewrite!("fuse-flash-attention-narrow"; { attention_narrow() } => { typed("(flash_attention ?q ?k ?v ?pos ?scale)") } if gqa_causal_layout()),
        // Two GEMMs of one activation by two weights become one GEMM by the weights side by side
        // (the linear layer's qkv and g projections, §2.4.1; the gate and up projections of the
        // dense MLP and the shared expert): one launch, the activation read once, and at decode
        // (M = 1, bandwidth-bound) one pass over both weights. The concatenation of two
        // checkpoint weights is step-independent: packed once at load (as SGLang's
        // `gate_up_proj`) or read through the GEMM's B prologue; the cost model charges nothing
        // for it. Each result is a slice of the wide one, exact: the same dot products.
        rewrite!("fuse-concat-gemms-first"; { gemms_sharing_input(true) } => { slice_of_concatenated_gemm(true) } if two_weights_of_one_input()),
        rewrite!("fuse-concat-gemms-second"; { gemms_sharing_input(false) } => { slice_of_concatenated_gemm(false) } if two_weights_of_one_input()),
        // QK-norm + RoPE of q's heads and k's heads of one qkv projection as one kernel over
        // both (each head with its own weight row, `ir::fused::norm::qk_norm_rope`): one launch
        // instead of two, the same per-head arithmetic, exact.
        rewrite!("fuse-qknorm-rope-pair-first"; { qk_norm_rope_pair(true) } => { slice_of_qk_norm_rope_pair(true) } if qk_pair_layout()),
        rewrite!("fuse-qknorm-rope-pair-second"; { qk_norm_rope_pair(false) } => { slice_of_qk_norm_rope_pair(false) } if qk_pair_layout()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_rewrite, dsl, test_limits};

    const NORM: &str = "
        fn rms_norm(x, w) {
            let xf = cast(x, f32);
            let n = xf * rsqrt(mean(xf * xf, axis = -1, keepdim = true) + 1e-6);
            cast(n, dtype_of(x)) * w
        }";

    fn case(src: &str, output: &str, goal: &str) -> crate::egraph::Saturation {
        let g = dsl(&format!("{NORM}\n{src}"));
        match check_rewrite(&g, output, goal, &fuse_rules(), &test_limits()) {
            Ok((_, sat)) => {
                assert!(!sat.stop_reason.hit_limit(), "{}", sat.stop_reason);
                sat
            }
            Err(e) => panic!("{e}\n{}", g.to_text()),
        }
    }

    #[test]
    fn rmsnorm_f32() {
        let sat = case(
            "dim b, s; input x: f32[b, s, 8]; param w: f32[8] = \"w\"; output \"y\" = rms_norm(x, w);",
            "y",
            "(rms_norm {x} {w} 1e-6)",
        );
        assert_eq!(sat.fired["fuse-rmsnorm"], 1);
    }

    #[test]
    fn rmsnorm_narrow() {
        let sat = case(
            "dim b, s; input x: bf16[b, s, 8]; param w: bf16[8] = \"w\"; output \"y\" = rms_norm(x, w);",
            "y",
            "(rms_norm {x} {w} 1e-6)",
        );
        assert_eq!(sat.fired["fuse-rmsnorm-narrow"], 1);
    }

    #[test]
    fn rmsnorm_needs_the_mean_over_the_last_axis() {
        // sum over axis 1 or a divisor that is not the axis size: not an RMSNorm
        let g = dsl("dim b; input x: f32[b, 4, 8]; param w: f32[8] = \"w\";
            output \"y\" = x * rsqrt(sum(x * x, axis = 1, keepdim = true) / 8.0 + 1e-6) * w;
            output \"z\" = x * rsqrt(sum(x * x, axis = -1, keepdim = true) / 4.0 + 1e-6) * w;");
        let (eg, bridge) = crate::egraph::to_egraph(&g).unwrap();
        let (eg, sat) = crate::egraph::saturate(eg, &fuse_rules(), &test_limits());
        assert!(sat.fired.is_empty(), "{:?}", sat.fired);
        assert_eq!(crate::egraph::rewrite::count_matches(&eg, "(rms_norm ?x ?w ?e)"), 0);
        assert_eq!(bridge.outputs.len(), 2);
    }

    #[test]
    fn add_rmsnorm() {
        let src = "dim b, s; input h: bf16[b, s, 8]; input a: bf16[b, s, 8]; param w: bf16[8] = \"w\";
            let r = h + a; output \"y\" = rms_norm(r, w); output \"r\" = r;";
        let sat = case(src, "y", "(proj (add_rms_norm {h} {a} {w} 1e-6) 1)");
        assert_eq!(sat.fired["fuse-add-rmsnorm"], 1);
        case(src, "r", "(proj (add_rms_norm {h} {a} {w} 1e-6) 0)");
    }

    #[test]
    fn add_rmsnorm_refuses_a_broadcasting_add() {
        let g = dsl(&format!(
            "{NORM}\ndim b, s; input h: f32[b, s, 8]; input a: f32[8]; param w: f32[8] = \"w\";
            output \"y\" = rms_norm(h + a, w);"
        ));
        let (eg, _) = crate::egraph::to_egraph(&g).unwrap();
        let (_, sat) = crate::egraph::saturate(eg, &fuse_rules(), &test_limits());
        assert_eq!(sat.fired.get("fuse-rmsnorm"), Some(&1));
        assert_eq!(sat.fired.get("fuse-add-rmsnorm"), None);
    }

    #[test]
    fn swiglu() {
        let sat = case(
            "dim b, s; input g: bf16[b, s, 16]; input u: bf16[b, s, 16]; output \"y\" = g * sigmoid(g) * u;",
            "y",
            "(swiglu {g} {u})",
        );
        assert_eq!(sat.fired["fuse-swiglu"], 1);
    }

    const TWO_GEMMS: &str = "dim b, s; input x: bf16[b, s, 8]; param wa: bf16[12, 8] = \"wa\";
        param wb: bf16[4, 8] = \"wb\";
        output \"ya\" = x @ transpose(wa); output \"yb\" = cast(x @ transpose(wb), f32);";

    #[test]
    fn concat_gemms_sharing_input() {
        let m = "(matmul {x} (concat (permute {wa} [1,0]) (permute {wb} [1,0]) 1))";
        let sat = case(TWO_GEMMS, "ya", &format!("(slice {m} 2 0 12)"));
        assert_eq!(sat.fired["fuse-concat-gemms-first"], 1);
        assert_eq!(sat.fired["fuse-concat-gemms-second"], 1);
        case(TWO_GEMMS, "yb", &format!("(cast (slice {m} 2 12 16) f32)"));
    }

    #[test]
    fn concat_gemms_needs_one_input_and_two_weights() {
        // other activations, or a weight that is a step input rather than a checkpoint tensor
        for src in [
            "dim b, s; input x: bf16[b, s, 8]; input y: bf16[b, s, 8]; param wa: bf16[12, 8] = \"wa\";
             param wb: bf16[4, 8] = \"wb\"; output \"ya\" = x @ transpose(wa); output \"yb\" = y @ transpose(wb);",
            "dim b, s; input x: bf16[b, s, 8]; input wa: bf16[12, 8]; param wb: bf16[4, 8] = \"wb\";
             output \"ya\" = x @ transpose(wa); output \"yb\" = x @ transpose(wb);",
            "dim b, s; input x: bf16[b, s, 8]; param wa: bf16[12, 8] = \"wa\";
             output \"ya\" = x @ transpose(wa); output \"yb\" = x @ transpose(wa) * 2.0;",
        ] {
            let g = dsl(src);
            let (eg, _) = crate::egraph::to_egraph(&g).unwrap();
            let (eg, sat) = crate::egraph::saturate(eg, &fuse_rules(), &test_limits());
            assert!(sat.fired.is_empty(), "{:?}", sat.fired);
            assert_eq!(crate::egraph::rewrite::count_matches(&eg, "(concat ?a ?b ?ax)"), 0);
        }
    }

    #[test]
    fn softmax_last_axis() {
        let sat = case(
            "dim b, s; input x: f32[b, s, 16];
             let m = max(x, axis = -1, keepdim = true); let e = exp(x - m);
             output \"y\" = e / sum(e, axis = -1, keepdim = true);",
            "y",
            "(softmax {x})",
        );
        assert_eq!(sat.fired["fuse-softmax"], 1);
    }

    const ROPE: &str = "
        fn rope(x, pos, inv_freq) {
            let ang = cast(reshape(pos, [s, 1]), f32) * reshape(inv_freq, [1, 4]);
            let c = reshape(cos(ang), [s, 1, 4]);
            let sn = reshape(sin(ang), [s, 1, 4]);
            let xf = cast(x, f32);
            let x1 = xf[..., 0:4];
            let x2 = xf[..., 4:8];
            cast(concat([x1 * c - x2 * sn, x2 * c + x1 * sn, xf[..., 8:]], axis = -1), dtype_of(x))
        }";

    #[test]
    fn qk_norm_rope_f32() {
        let sat = case(
            &format!(
                "{ROPE}\ndim b, s; input x: f32[b, s, 2, 16]; input pos: i64[s]; param w: f32[16] = \"w\";
                 param inv: f32[4] = \"inv\"; output \"y\" = rope(rms_norm(x, w), pos, inv);"
            ),
            "y",
            "(qk_norm_rope {x} {w} {pos} {inv} 1e-6 8)",
        );
        assert_eq!(sat.fired["fuse-qknorm-rope"], 1);
    }

    #[test]
    fn qk_norm_rope_narrow_with_computed_frequencies() {
        // inv_freq as the model computes it before constant folding: any value of [4] fits
        let sat = case(
            &format!(
                "{ROPE}\ndim b, s; input x: bf16[b, s, 2, 16]; input pos: i64[s]; param w: bf16[16] = \"w\";
                 let inv = pow(10000.0, -2.0 * cast(arange(4), f32) / 8);
                 output \"y\" = rope(rms_norm(x, w), pos, inv);"
            ),
            "y",
            "(qk_norm_rope {x} {w} {pos} ?inv 1e-6 8)",
        );
        assert_eq!(sat.fired["fuse-qknorm-rope-narrow"], 1);
    }

    fn qk_pair_src(k_lo: usize) -> String {
        format!(
            "{ROPE}\ndim b, s; input qkv: f32[b, s, 64]; input pos: i64[s]; param wq: f32[16] = \"wq\";
             param wk: f32[16] = \"wk\"; param inv: f32[4] = \"inv\";
             let q = reshape(qkv[..., 0:32], [b, s, 2, 16]);
             let k = reshape(qkv[..., {k_lo}:{}], [b, s, 1, 16]);
             output \"q\" = rope(rms_norm(q, wq), pos, inv); output \"k\" = rope(rms_norm(k, wk), pos, inv);",
            k_lo + 16
        )
    }

    #[test]
    fn qk_norm_rope_pair() {
        let y = "(qk_norm_rope (reshape (slice {qkv} 2 0 48) [b,s,3,16]) \
                 (concat (expand (reshape {wq} [1,16]) [2,16]) (expand (reshape {wk} [1,16]) [1,16]) 0) {pos} {inv} 1e-6 8)";
        let sat = case(&qk_pair_src(32), "q", &format!("(slice {y} 2 0 2)"));
        assert_eq!(sat.fired["fuse-qknorm-rope"], 2);
        assert_eq!(sat.fired["fuse-qknorm-rope-pair-first"], 1);
        assert_eq!(sat.fired["fuse-qknorm-rope-pair-second"], 1);
        case(&qk_pair_src(32), "k", &format!("(slice {y} 2 2 3)"));
    }

    #[test]
    fn qk_norm_rope_pair_needs_adjacent_heads() {
        // k's columns do not follow q's (a gap of 16): two separate kernels
        let g = dsl(&format!("{NORM}\n{}", qk_pair_src(48)));
        let (eg, _) = crate::egraph::to_egraph(&g).unwrap();
        let (_, sat) = crate::egraph::saturate(eg, &fuse_rules(), &test_limits());
        assert_eq!(sat.fired.get("fuse-qknorm-rope"), Some(&2), "{:?}", sat.fired);
        assert!(
            !sat.fired.contains_key("fuse-qknorm-rope-pair-first"),
            "{:?}",
            sat.fired
        );
    }

    #[test]
    fn rope_with_a_wrong_split_is_left_alone() {
        // the second half starts at 3, not at r/2: not NeoX RoPE
        let g = dsl(&format!(
            "{NORM}\ndim b, s; input x: f32[b, s, 2, 16]; input pos: i64[s]; param w: f32[16] = \"w\";
             param inv: f32[4] = \"inv\";
             let xf = rms_norm(x, w);
             let ang = cast(reshape(pos, [s, 1]), f32) * reshape(inv, [1, 4]);
             let c = reshape(cos(ang), [s, 1, 4]); let sn = reshape(sin(ang), [s, 1, 4]);
             let x1 = xf[..., 0:4]; let x2 = xf[..., 3:7];
             output \"y\" = concat([x1 * c - x2 * sn, x2 * c + x1 * sn, xf[..., 8:]], axis = -1);"
        ));
        let (eg, _) = crate::egraph::to_egraph(&g).unwrap();
        let (_, sat) = crate::egraph::saturate(eg, &fuse_rules(), &test_limits());
        assert!(!sat.fired.contains_key("fuse-qknorm-rope"), "{:?}", sat.fired);
    }

    fn attention_src(dt: &str) -> String {
        format!(
            "
            fn softmax(x, axis) {{
                let m = max(x, axis = axis, keepdim = true);
                let e = exp(x - m);
                e / sum(e, axis = axis, keepdim = true)
            }}
            dim b, s, past;
            input qh: {dt}[b, 2, 3, s, 16];
            state k_cache: {dt}[b, 2, past, 16] = \"k\";
            state v_cache: {dt}[b, 2, past, 16] = \"v\";
            input kn: {dt}[b, 2, s, 16];
            input vn: {dt}[b, 2, s, 16];
            let pos = arange(s) + past;
            let k_all = concat([k_cache, kn], axis = 2);
            let v_all = concat([v_cache, vn], axis = 2);
            let kt = unsqueeze(transpose(k_all), 2);
            let scores = (cast(qh, f32) @ cast(kt, f32)) * 16 ** -0.5;
            let causal = reshape(arange(past + s), [1, past + s]) <= reshape(pos, [s, 1]);
            let probs = softmax(where(causal, scores, -inf), -1);
            output \"o\" = probs @ cast(unsqueeze(v_all, 2), f32);
            carry k_cache = k_all;
            carry v_cache = v_all;"
        )
    }

    #[test]
    fn flash_attention_f32() {
        let g = dsl(&attention_src("f32"));
        let goal = "(flash_attention {qh} (concat {k} {kn} 2) (concat {v} {vn} 2) ?pos 0.25)";
        let (_, sat) = check_rewrite(&g, "o", goal, &fuse_rules(), &test_limits()).unwrap();
        assert_eq!(sat.fired["fuse-flash-attention"], 1);
        assert_eq!(sat.fired["fuse-softmax"], 1);
    }

    #[test]
    fn flash_attention_narrow() {
        let g = dsl(&attention_src("bf16"));
        let goal = "(flash_attention {qh} (concat {k} {kn} 2) (concat {v} {vn} 2) ?pos 0.25)";
        let (_, sat) = check_rewrite(&g, "o", goal, &fuse_rules(), &test_limits()).unwrap();
        assert_eq!(sat.fired["fuse-flash-attention-narrow"], 1);
    }

    #[test]
    fn attention_without_the_causal_mask_is_not_flash_attention() {
        // a mask on other positions (keys j < pos_i, strict) must not be taken for causal
        let src = attention_src("f32").replace("<= reshape(pos", "< reshape(pos");
        let g = dsl(&src);
        let (eg, _) = crate::egraph::to_egraph(&g).unwrap();
        let (_, sat) = crate::egraph::saturate(eg, &fuse_rules(), &test_limits());
        assert!(!sat.fired.contains_key("fuse-flash-attention"), "{:?}", sat.fired);
        assert_eq!(sat.fired.get("fuse-softmax"), Some(&1));
    }
}
