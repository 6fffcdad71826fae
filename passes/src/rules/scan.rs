//! The scan family: the lightning recurrence of a linear-attention layer (spec §2.4.4), written
//! in the DSL as a `scan` over the sequence axis (`lightning` in `models/ring_linear.ring`),
//! becomes one kernel: `linear_attn_chunk` (the chunked form of §4.3, for prefill and training)
//! or `linear_attn_step` (the token recurrence of §4.2, for decode). Both alternatives enter the
//! e-graph; the cost model picks per mode (see `extract.rs`). The group RMSNorm, its weight and
//! the sigmoid output gate that follow the scan (§2.4.5) become `group_norm_gate`.
//!
//! A scan's body is a graph of its own, kept in the side table, so no pattern over the outer
//! graph can see what it computes: the scan rules match any 5-operand scan and ask
//! [`is_lightning`] (through [`scan_is`]) whether its body is the recurrence, structurally and
//! up to the operand order of its commutative ops. Anything else is left alone.

use super::{all, dtype_is, rank_is, same_type, tuple, type_shape_is, typed, S};
use crate::egraph::lang::{Attr, Rl};
use crate::egraph::rewrite::{attr_of, number_of, scan_is, ty_of, with_attrs, Cond, Derive};
use crate::egraph::Rule;
use egg::{rewrite, Pattern, Var};
use ir::graph::{Graph, Value};
use ir::op::{BinaryOp, Op};
use ir::shape::Dim;
use ir::DType;

/// Chunk size of `linear_attn_chunk`: fla's `chunk_simple_gla` default (spec §4.3). A 64×64
/// intra-chunk score tile fills the tensor cores' MMA shapes, even the factored mask
/// `λ^i · λ^{−j}` of §4.3 stays inside f32 for the strongest Ring decay (λ ≈ 0.47:
/// λ^{±63} ≈ 1e∓21), and a 4096-token prompt needs 64 sequential state updates instead of 4096.
pub const CHUNK: usize = 64;

// The lightning body's inputs in the scan's operand order: 1 carry, 3 sequences, 1 capture.
const STATE: usize = 0;
const Q: usize = 1;
const K: usize = 2;
const V: usize = 3;
const DECAY: usize = 4;

/// Whether `op` is the lightning recurrence of spec §2.4.4 along axis 1 of `[b, T, H, d]`
/// sequences:
///
/// ```text
/// scan (s = s0; qt in q, kt in k, vt in v; axis = 1) captures lam [H, 1, 1]
///     s_new = lam · s + kt[.., d, 1] · vt[.., 1, d]      (the outer product kᵀv)
///     o     = (qt[.., 1, d] @ s_new)[.., d]               (q against the *updated* state)
///     yields (s_new, o)
/// ```
///
/// with the state `[b, H, d, d]` and everything f32. The `mul`s and the `add` may have their
/// operands in either order; the roles may not change (k unsqueezed at -1 and v at -2 is kᵀv,
/// the other way round is its transpose; reading the old state is another recurrence).
pub fn is_lightning(op: &Op) -> bool {
    match op {
        Op::Scan {
            body,
            axis: 1,
            n_carry: 1,
            n_seq: 3,
        } => Body::new(body).is_some_and(|b| b.is_lightning()),
        _ => false,
    }
}

/// A scan body seen through its inputs' roles.
struct Body<'g> {
    g: &'g Graph,
    inputs: [Value; 5],
}

impl<'g> Body<'g> {
    fn new(g: &'g Graph) -> Option<Body<'g>> {
        let inputs: Vec<Value> = g.inputs.iter().map(|&node| Value { node, port: 0 }).collect();
        Some(Body {
            g,
            inputs: inputs.try_into().ok()?,
        })
    }

    fn shape(&self, role: usize) -> &'g [Dim] {
        &self.g.ty(self.inputs[role]).shape
    }

    fn is_lightning(&self) -> bool {
        let [s_new, o] = match self.g.outputs.as_slice() {
            [a, b] => [a.value, b.value],
            _ => return false,
        };
        self.types_fit() && self.is_update(s_new) && self.is_readout(o, s_new)
    }

    /// Rows `[b, H, d]` for q, k, v; state `[b, H, d, d]`; decay `[H, 1, 1]`; all f32.
    fn types_fit(&self) -> bool {
        let row = self.shape(Q);
        let [b, h, d] = row else { return false };
        let f32s = self.inputs.iter().all(|&v| self.g.ty(v).dtype == DType::F32);
        f32s && self.shape(K) == row
            && self.shape(V) == row
            && self.shape(STATE) == [b.clone(), h.clone(), d.clone(), d.clone()]
            && self.shape(DECAY) == [h.clone(), Dim::constant(1), Dim::constant(1)]
    }

    /// The operands of `v` when it is the binary op `op`.
    fn binary(&self, v: Value, op: BinaryOp) -> Option<(Value, Value)> {
        match &self.g.node(v.node).op {
            Op::Binary(b) if *b == op => match self.g.operands(v.node).as_slice() {
                [x, y] => Some((*x, *y)),
                _ => None,
            },
            _ => None,
        }
    }

    /// `v` is `op(a, b)` for a commutative `op`, in either order.
    fn commutes(&self, v: Value, op: BinaryOp, a: impl Fn(Value) -> bool, b: impl Fn(Value) -> bool) -> bool {
        self.binary(v, op)
            .is_some_and(|(x, y)| (a(x) && b(y)) || (a(y) && b(x)))
    }

    /// `v` is the body input of `role` reshaped to `shape`.
    fn reshaped(&self, v: Value, role: usize, shape: &[Dim]) -> bool {
        match &self.g.node(v.node).op {
            Op::Reshape { shape: to } => to == shape && self.g.operands(v.node) == [self.inputs[role]],
            _ => false,
        }
    }

    /// `row [.., d]` as a column `[.., d, 1]` (`unsqueeze(x, -1)`).
    fn column(&self, role: usize) -> Vec<Dim> {
        let mut s = self.shape(role).to_vec();
        s.push(Dim::constant(1));
        s
    }

    /// `row [.., d]` as a row matrix `[.., 1, d]` (`unsqueeze(x, -2)`).
    fn row_matrix(&self, role: usize) -> Vec<Dim> {
        let mut s = self.shape(role).to_vec();
        s.insert(s.len() - 1, Dim::constant(1));
        s
    }

    /// `s_new = lam · s + kᵀv`.
    fn is_update(&self, s_new: Value) -> bool {
        let decayed = |x: Value| {
            let (s, lam) = (self.inputs[STATE], self.inputs[DECAY]);
            self.commutes(x, BinaryOp::Mul, |a| a == lam, |b| b == s)
        };
        let (k_col, v_row) = (self.column(K), self.row_matrix(V));
        let outer = |x: Value| {
            self.commutes(
                x,
                BinaryOp::Mul,
                |a| self.reshaped(a, K, &k_col),
                |b| self.reshaped(b, V, &v_row),
            )
        };
        self.commutes(s_new, BinaryOp::Add, decayed, outer)
    }

    /// `o = squeeze(unsqueeze(q, -2) @ s_new, -2)`.
    fn is_readout(&self, o: Value, s_new: Value) -> bool {
        let Op::Reshape { shape } = &self.g.node(o.node).op else {
            return false;
        };
        let [product] = self.g.operands(o.node)[..] else {
            return false;
        };
        let q_row = self.row_matrix(Q);
        shape.as_slice() == self.shape(Q)
            && matches!(self.g.node(product.node).op, Op::Matmul)
            && matches!(self.g.operands(product.node)[..], [a, b] if self.reshaped(a, Q, &q_row) && b == s_new)
    }
}

// shapes the scan rules check, after the body (the fused ops' contract, so nothing is refused)
const STATE_SHAPE: &[S] = &[
    S::DimOf("?q", 0),
    S::DimOf("?q", 2),
    S::DimOf("?q", 3),
    S::DimOf("?q", 3),
];
const DECAY_SHAPE: &[S] = &[S::DimOf("?q", 2), S::Lit(1), S::Lit(1)];

/// The operands of a lightning scan as the fused ops take them: `s0 [b, H, d, d]`,
/// `q, k, v [b, T, H, d]` f32, `lam [H, 1, 1]`.
fn lightning_operands() -> impl Cond {
    all(vec![
        Box::new(dtype_is("?q", DType::F32)),
        Box::new(same_type("?q", "?k")),
        Box::new(same_type("?q", "?v")),
        Box::new(dtype_is("?s0", DType::F32)),
        Box::new(type_shape_is("?s0", STATE_SHAPE)),
        Box::new(type_shape_is("?lam", DECAY_SHAPE)),
    ])
}

fn lightning_scan() -> Pattern<Rl> {
    pat("(scan ?s0 ?q ?k ?v ?lam ?n)")
}

/// §2.4.5 as `linear_attention` writes it: `o [b, s, H, d]` reshaped into `groups` channel
/// groups, each divided by its RMS, flattened back to `[b, s, H·d]`, times the `g_norm` weight,
/// times `sigmoid(g)`. In a bf16 model the weight is bf16 (promoted by the multiply) and `g` is
/// `cast(x @ w_gᵀ, f32)`; both are operands here, so one pattern serves f32 and bf16.
fn group_norm_gate() -> Pattern<Rl> {
    let og = "(reshape ?o ?gs)";
    let normed =
        format!("(mul {og} (rsqrt (add (div (sum (mul {og} {og}) ?ax true) (const ?n ?tn)) (const ?eps ?te))))");
    pat(&format!("(mul (mul (reshape {normed} ?flat) ?w) (sigmoid ?g))"))
}

fn pat(s: &str) -> Pattern<Rl> {
    match s.parse() {
        Ok(p) => p,
        Err(e) => panic!("scan pattern `{s}` does not parse: {e}"),
    }
}

fn var(v: &str) -> Var {
    match v.parse() {
        Ok(v) => v,
        Err(e) => panic!("`{v}` is not a pattern variable: {e}"),
    }
}

/// The grouped layout of §2.4.5 over `o [b, s, H, d]` (f32, constant H and d): `gs` is
/// `[b, s, G, n]` with `G·n = H·d`, the mean is over axis 3 (`ax = [3]`) and divides by `n`,
/// and `flat` is `[b, s, H·d]`.
fn channel_groups(gs: &str, ax: &str, n: &str, flat: &str, o: &str) -> impl Cond {
    let (gs, ax, n, flat, o) = (var(gs), var(ax), var(n), var(flat), var(o));
    move |eg, _, s| {
        let Some(t) = ty_of(eg, s, o) else { return false };
        let [b, sq, h, d] = t.shape.as_slice() else {
            return false;
        };
        let (Some(h), Some(d)) = (h.as_const(), d.as_const()) else {
            return false;
        };
        let consts = |v: Var| -> Option<Vec<Option<i64>>> {
            let l = attr_of(eg, s, v)?.as_list()?;
            (l.len() >= 2 && l[0] == *b && l[1] == *sq).then(|| l[2..].iter().map(Dim::as_const).collect())
        };
        // channels per group, when gs splits H·d into whole groups
        let per_group = match consts(gs).as_deref() {
            Some(&[Some(g), Some(m)]) if g >= 1 && g * m == h * d => Some(m),
            _ => None,
        };
        let mean_over_group = matches!((per_group, number_of(eg, s, n)), (Some(m), Some(x)) if x == m as f64);
        let width = matches!(consts(flat).as_deref(), Some(&[Some(w)]) if w == h * d);
        let last_axis = attr_of(eg, s, ax).and_then(Attr::as_usizes).is_some_and(|a| a == [3]);
        mean_over_group && width && last_axis
    }
}

/// Everything `group_norm_gate` needs besides the pattern: the layout, f32 statistics and gate.
fn group_norm_layout() -> impl Cond {
    all(vec![
        Box::new(dtype_is("?o", DType::F32)),
        Box::new(dtype_is("?g", DType::F32)),
        Box::new(rank_is("?w", 1)),
        Box::new(channel_groups("?gs", "?ax", "?n", "?flat", "?o")),
    ])
}

/// The scan rule table.
#[rustfmt::skip]
pub fn scan_rules() -> Vec<Rule> {
    vec![
        // Prefill and training: the recurrence in chunks of CHUNK tokens (§4.3). Inside a chunk
        // the work is two C×C×d GEMMs on the tensor cores; only the d×d state crosses chunks,
        // so T/C sequential steps instead of T, and the per-step body never round-trips HBM.
        rewrite!("scan-lightning-chunk"; { lightning_scan() } => { typed(&format!("(linear_attn_chunk ?s0 ?q ?k ?v ?lam {CHUNK})")) } if scan_is("?n", is_lightning) if lightning_operands()),
        // Decode: one token (T = 1) against the cached state (§4.2) in one kernel that keeps S
        // on chip; a C-token chunk would pad one token to a whole tile and launch twice.
        rewrite!("scan-lightning-step"; { lightning_scan() } => { typed("(linear_attn_step ?s0 ?q ?k ?v ?lam)") } if scan_is("?n", is_lightning) if lightning_operands()),
        // Group RMSNorm, g_norm weight and sigmoid output gate (§2.4.5) as the epilogue of the
        // lightning output: one read of o and g, statistics per group in registers, one write,
        // instead of ten elementwise and reduction kernels over [b, s, H·d] in f32.
        rewrite!("scan-group-norm-gate"; { group_norm_gate() } => { with_attrs(typed("(group_norm_gate ?o ?w ?g ?groups ?eps)"), &[("?groups", Derive::Dim(S::ElemOf("?gs", 2)))]) } if group_norm_layout()),
        // ... and that epilogue folded into the recurrence's own kernel: the raw o never
        // reaches HBM, and the layer loses a launch (a group's heads finish in different
        // blocks, so the kernel normalises a group once all of them have written it).
        rewrite!("scan-gate-into-chunk"; "(group_norm_gate (proj (linear_attn_chunk ?s0 ?q ?k ?v ?lam ?c) 1) ?w ?g ?groups ?eps)" => { tuple("(linear_attn_chunk_gate ?s0 ?q ?k ?v ?lam ?w ?g ?c ?groups ?eps)", &["(proj (linear_attn_chunk ?s0 ?q ?k ?v ?lam ?c) 0)", "root"]) }),
        rewrite!("scan-gate-into-step"; "(group_norm_gate (proj (linear_attn_step ?s0 ?q ?k ?v ?lam) 1) ?w ?g ?groups ?eps)" => { tuple("(linear_attn_step_gate ?s0 ?q ?k ?v ?lam ?w ?g ?groups ?eps)", &["(proj (linear_attn_step ?s0 ?q ?k ?v ?lam) 0)", "root"]) }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egraph::rewrite::count_matches;
    use crate::egraph::{saturate, to_egraph};
    use crate::testing::{check_rewrite, dsl, test_limits};
    use crate::{compile, CompileOptions, Mode};

    /// `lightning` of ring_linear.ring with a replaceable body; `dim batch, seq` so that the
    /// cost models' sizes apply.
    fn lightning_src(update: &str, readout: &str) -> String {
        format!(
            "dim batch, seq;
            input q: f32[batch, seq, 4, 8];
            input k: f32[batch, seq, 4, 8];
            input v: f32[batch, seq, 4, 8];
            input lam: f32[4, 1, 1];
            input s0: f32[batch, 4, 8, 8];
            let (s1, o) = scan (s = s0; qt in q, kt in k, vt in v; axis = 1) {{
                let s_new = {update};
                let o = {readout};
                (s_new, o)
            }};
            output \"s\" = s1;
            output \"o\" = o;"
        )
    }

    const UPDATE: &str = "lam * s + unsqueeze(kt, -1) * unsqueeze(vt, -2)";
    const READOUT: &str = "squeeze(unsqueeze(qt, -2) @ s_new, -2)";

    fn lightning() -> ir::Graph {
        dsl(&lightning_src(UPDATE, READOUT))
    }

    fn saturated(g: &ir::Graph, output: &str, goal: &str) -> crate::egraph::Saturation {
        match check_rewrite(g, output, goal, &scan_rules(), &test_limits()) {
            Ok((_, sat)) => {
                assert!(!sat.stop_reason.hit_limit(), "{}", sat.stop_reason);
                assert!(sat.refused.is_empty(), "{:?}", sat.refusal_example);
                sat
            }
            Err(e) => panic!("{e}\n{}", g.to_text()),
        }
    }

    #[test]
    fn lightning_scan_to_chunk() {
        let g = lightning();
        let sat = saturated(&g, "o", "(proj (linear_attn_chunk {s0} {q} {k} {v} {lam} 64) 1)");
        assert_eq!(sat.fired["scan-lightning-chunk"], 1);
        saturated(&g, "s", "(proj (linear_attn_chunk {s0} {q} {k} {v} {lam} 64) 0)");
    }

    #[test]
    fn lightning_scan_to_step() {
        let g = lightning();
        let sat = saturated(&g, "o", "(proj (linear_attn_step {s0} {q} {k} {v} {lam}) 1)");
        assert_eq!(sat.fired["scan-lightning-step"], 1);
        saturated(&g, "s", "(proj (linear_attn_step {s0} {q} {k} {v} {lam}) 0)");
    }

    #[test]
    fn both_forms_join_the_scan_itself() {
        // the tuples are unioned with the scan's class as a whole, not port by port
        let (eg, bridge) = to_egraph(&lightning()).unwrap();
        let (eg, _) = saturate(eg, &scan_rules(), &test_limits());
        let scan = eg
            .classes()
            .find(|c| c.nodes.iter().any(|n| matches!(n, Rl::Scan(_))))
            .unwrap();
        let has = |f: fn(&Rl) -> bool| scan.nodes.iter().any(f);
        assert!(has(|n| matches!(n, Rl::LinearAttnChunk(_))), "{:?}", scan.nodes);
        assert!(has(|n| matches!(n, Rl::LinearAttnStep(_))), "{:?}", scan.nodes);
        // both outputs still project from that one class
        for (_, id, _) in &bridge.outputs {
            assert!(eg[*id]
                .nodes
                .iter()
                .any(|n| matches!(n, Rl::Proj([t, _]) if eg.find(*t) == scan.id)));
        }
    }

    #[test]
    fn lightning_with_commuted_operands() {
        let g = dsl(&lightning_src(
            "unsqueeze(vt, -2) * unsqueeze(kt, -1) + s * lam",
            READOUT,
        ));
        let sat = saturated(&g, "o", "(proj (linear_attn_chunk {s0} {q} {k} {v} {lam} 64) 1)");
        assert_eq!(sat.fired["scan-lightning-chunk"], 1);
        assert_eq!(sat.fired["scan-lightning-step"], 1);
    }

    #[test]
    fn other_scans_are_left_alone() {
        let near_misses = [
            // reads the old state: o_t = q_t S_{t-1}
            (UPDATE, "squeeze(unsqueeze(qt, -2) @ s, -2)"),
            // vᵀk: the transposed state
            ("lam * s + unsqueeze(vt, -1) * unsqueeze(kt, -2)", READOUT),
            // a non-linear state update
            ("tanh(lam * s + unsqueeze(kt, -1) * unsqueeze(vt, -2))", READOUT),
            // no decay
            ("s + unsqueeze(kt, -1) * unsqueeze(vt, -2)", READOUT),
            // S q instead of q S
            (UPDATE, "squeeze(s_new @ unsqueeze(qt, -1), -1)"),
        ];
        for (update, readout) in near_misses {
            let g = dsl(&lightning_src(update, readout));
            let (eg, _) = to_egraph(&g).unwrap();
            let (eg, sat) = saturate(eg, &scan_rules(), &test_limits());
            assert!(sat.fired.is_empty(), "{update} / {readout}: {:?}", sat.fired);
            assert!(sat.refused.is_empty(), "{update} / {readout}: {:?}", sat.refused);
            assert_eq!(count_matches(&eg, "(linear_attn_chunk ?s ?q ?k ?v ?l ?c)"), 0);
            // and the family is not even staged for such a graph
            assert!(!crate::Family::Scan.present(&g), "{update} / {readout}");
        }
        // a cumulative-sum scan of another arity
        let g = dsl("dim batch, seq; input x: f32[batch, seq, 4]; input c0: f32[batch, 4];
            let (c, ys) = scan (c = c0; xt in x; axis = 1) { let c1 = c + xt; (c1, c1 * 2.0) };
            output \"c\" = c; output \"ys\" = ys;");
        let (eg, _) = to_egraph(&g).unwrap();
        let (_, sat) = saturate(eg, &scan_rules(), &test_limits());
        assert!(sat.fired.is_empty(), "{:?}", sat.fired);
    }

    #[test]
    fn extraction_picks_the_step_in_decode_and_chunks_in_prefill() {
        let g = lightning();
        for (mode, want, other) in [
            (Mode::Decode, "linear_attn_step", "linear_attn_chunk"),
            (Mode::Prefill, "linear_attn_chunk", "linear_attn_step"),
        ] {
            let opts = CompileOptions {
                mode,
                limits: test_limits(),
                ..Default::default()
            };
            let (c, report) = compile(&g, &opts).unwrap();
            let count = |name: &str| c.g.node_weights().filter(|n| n.op.name() == name).count();
            assert_eq!(
                (count(want), count(other), count("scan")),
                (1, 0, 0),
                "{}\n{report}",
                c.to_text()
            );
        }
    }

    /// `linear_attention`'s tail (§2.4.5) over a scan output `o`; `w_dt` is the weight's dtype,
    /// `gate` the gate's pre-activation.
    fn group_norm_src(w_dt: &str, gate: &str, divisor: &str) -> String {
        format!(
            "dim batch, seq;
            input o: f32[batch, seq, 4, 8];
            input x: {w_dt}[batch, seq, 16];
            param g_norm: {w_dt}[32] = \"g_norm\";
            param w_g: {w_dt}[32, 16] = \"w_g\";
            let og = reshape(o, [batch, seq, 2, 16]);
            let og = og * rsqrt(sum(og * og, axis = -1, keepdim = true) / {divisor} + 1e-6);
            let y = reshape(og, [batch, seq, 32]) * g_norm;
            let gate = sigmoid({gate});
            output \"y\" = y * gate;"
        )
    }

    #[test]
    fn group_norm_gate_f32() {
        let g = dsl(&group_norm_src("f32", "x @ transpose(w_g)", "16"));
        let sat = saturated(
            &g,
            "y",
            "(group_norm_gate {o} {g_norm} (matmul {x} (permute {w_g} [1,0])) 2 1e-6)",
        );
        assert_eq!(sat.fired["scan-group-norm-gate"], 1);
    }

    #[test]
    fn group_norm_gate_bf16_weights_and_gate() {
        let g = dsl(&group_norm_src("bf16", "cast(x @ transpose(w_g), f32)", "16"));
        let sat = saturated(&g, "y", "(group_norm_gate {o} {g_norm} (cast ?mm f32) 2 1e-6)");
        assert_eq!(sat.fired["scan-group-norm-gate"], 1);
    }

    /// The lightning scan followed by §2.4.5's tail on its `o`: `(s, y)`.
    fn lightning_then_gate() -> ir::Graph {
        dsl("dim batch, seq;
            input q: f32[batch, seq, 4, 8];
            input k: f32[batch, seq, 4, 8];
            input v: f32[batch, seq, 4, 8];
            input lam: f32[4, 1, 1];
            input s0: f32[batch, 4, 8, 8];
            input g: f32[batch, seq, 32];
            param g_norm: f32[32] = \"g_norm\";
            let (s1, o) = scan (s = s0; qt in q, kt in k, vt in v; axis = 1) {
                let s_new = lam * s + unsqueeze(kt, -1) * unsqueeze(vt, -2);
                (s_new, squeeze(unsqueeze(qt, -2) @ s_new, -2))
            };
            let og = reshape(o, [batch, seq, 2, 16]);
            let og = og * rsqrt(sum(og * og, axis = -1, keepdim = true) / 16 + 1e-6);
            let y = reshape(og, [batch, seq, 32]) * g_norm;
            output \"s\" = s1;
            output \"y\" = y * sigmoid(g);")
    }

    #[test]
    fn gate_folds_into_the_chunked_and_the_stepped_recurrence() {
        let g = lightning_then_gate();
        let chunk = "(linear_attn_chunk_gate {s0} {q} {k} {v} {lam} {g_norm} {g} 64 2 1e-6)";
        let step = "(linear_attn_step_gate {s0} {q} {k} {v} {lam} {g_norm} {g} 2 1e-6)";
        for (fused, rule) in [(chunk, "scan-gate-into-chunk"), (step, "scan-gate-into-step")] {
            // y is the op's second result, and the state its first: one op makes both
            let sat = saturated(&g, "y", &format!("(proj {fused} 1)"));
            assert_eq!(sat.fired[rule], 1);
            saturated(&g, "s", &format!("(proj {fused} 0)"));
        }
        // extraction takes the folded step whole at decode; in prefill the chunks and the
        // group norm apart (`extract::GATE_SYNC_US` per 16-token batch)
        let decode = (
            ["linear_attn_step_gate"].as_slice(),
            ["group_norm_gate", "linear_attn_step", "linear_attn_chunk_gate"],
        );
        let prefill = (
            ["linear_attn_chunk", "group_norm_gate"].as_slice(),
            ["linear_attn_chunk_gate", "linear_attn_step", "linear_attn_step_gate"],
        );
        for (mode, (want, gone)) in [(Mode::Decode, decode), (Mode::Prefill, prefill)] {
            let opts = CompileOptions {
                mode,
                limits: test_limits(),
                ..Default::default()
            };
            let (c, report) = compile(&g, &opts).unwrap();
            let ops: Vec<String> = c.g.node_weights().map(|n| n.op.name()).collect();
            let count = |name: &str| ops.iter().filter(|n| *n == name).count();
            for w in want {
                assert_eq!(count(w), 1, "{w}: {}\n{report}", c.to_text());
            }
            for g in gone.iter().chain(&["scan"]) {
                assert_eq!(count(g), 0, "{g}: {}", c.to_text());
            }
        }
    }

    #[test]
    fn gate_is_not_folded_into_a_recurrence_whose_o_is_used_elsewhere() {
        // o is also an output: the raw o must exist, so the unfolded pair is cheaper
        let mut g = lightning_then_gate();
        let gnode = g.g.node_indices().find(|&n| g.node(n).op.name() == "scan").unwrap();
        g.add_output("o", ir::graph::Value { node: gnode, port: 1 }, ir::op::InputKind::Data);
        let (c, report) = compile(
            &g,
            &CompileOptions {
                mode: Mode::Decode,
                limits: test_limits(),
                ..Default::default()
            },
        )
        .unwrap();
        let ops: Vec<String> = c.g.node_weights().map(|n| n.op.name()).collect();
        assert!(ops.iter().any(|n| n == "linear_attn_step"), "{}\n{report}", c.to_text());
        assert!(ops.iter().any(|n| n == "group_norm_gate"), "{}", c.to_text());
        assert!(!ops.iter().any(|n| n == "linear_attn_step_gate"), "{}", c.to_text());
    }

    #[test]
    fn group_norm_gate_needs_the_mean_over_a_group() {
        // the divisor is not the group size, or the gate is in bf16: not §2.4.5 as fused
        for src in [
            group_norm_src("f32", "x @ transpose(w_g)", "32"),
            group_norm_src("bf16", "x @ transpose(w_g)", "16")
                .replace("output \"y\" = y * gate", "output \"y\" = y * cast(gate, f32)"),
        ] {
            let g = dsl(&src);
            let (eg, _) = to_egraph(&g).unwrap();
            let (eg, sat) = saturate(eg, &scan_rules(), &test_limits());
            assert!(sat.fired.is_empty(), "{:?}\n{src}", sat.fired);
            assert_eq!(count_matches(&eg, "(group_norm_gate ?o ?w ?g ?n ?e)"), 0);
        }
    }
}
