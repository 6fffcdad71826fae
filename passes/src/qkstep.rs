//! `fold-qk-norm-step`, after extraction (decode plans): the lightning step makes its own q and
//! k from their raw rows (`Fused::LinearAttnQkGate`):
//!
//! ```text
//! r = qk_norm_rope(x, w, pos, inv_freq)              x [b, T, 2H, d]: q's heads, then k's
//! (s, y) = linear_attn_step_gate(s0, r[:, :, :H] * scale, r[:, :, H:], v, lam, gw, g)
//!   =>  (s, y) = linear_attn_step_qk_gate(s0, x[:, :, :H], x[:, :, H:], v, lam, gw, g,
//!                                         w_q, w_k, pos, inv_freq)
//! ```
//!
//! One launch fewer per linear-attention layer (Ring-mini: 16 of 20 layers), and q and k no
//! longer go through memory in f32. The step's blocks already stage a token's whole q and k
//! rows of their head; the norm is a warp's reduction over them and the rotation pairs columns
//! of the same row, so the kernel does both on the staged rows before the recurrence. Each of
//! the head's column blocks (4 at d = 128) repeats that for its own copy: 2·d values a token,
//! against the separate kernel's store and reload of them.
//!
//! The same arithmetic as the pair it replaces: the norm and rotation of `QkNormRope` per head,
//! then q times the scale in f32.
//!
//! Why not in prefill: the chunked form's blocks each read every token of their head, so each
//! of them would repeat the norms of the whole sequence, where the separate kernel does each
//! once.

use crate::rewire::{readers, replace_value, Placement};
use crate::PassError;
use ir::fused::Fused;
use ir::graph::{Graph, Value};
use ir::op::{BinaryOp, Op};
use ir::{DType, Dim};

const PASS: &str = "fold-qk-norm-step";

/// Whether the step kernels make q and k for heads of `d`: the PTX backend's register-state
/// lightning kernel (`codegen/src/ptx/linear_attn.rs`, `plan`) takes a constant d up to 128
/// whose column blocks (`min(d, 32)` columns) tile both d and its 256 threads; its simple
/// kernel has no q/k prelude. (The cpu backend takes any d.)
pub fn step_takes_qk(d: &Dim) -> bool {
    let Some(d) = d.as_const() else { return false };
    let cb = d.min(32);
    (1..=128).contains(&d) && d % cb == 0 && 256 % cb == 0 && d % (256 / cb) == 0
}

/// `v = slice(r, axis 2, lo..lo + H)` of a `QkNormRope` result `r`, read only once: `(r, lo)`.
fn head_slice(g: &Graph, v: Value) -> Option<(Value, Dim)> {
    let Op::Slice { axis: 2, start, .. } = &g.node(v.node).op else {
        return None;
    };
    let r = g.operands(v.node)[0];
    let is_rope = matches!(g.node(r.node).op, Op::Fused(Fused::QkNormRope { .. }));
    (is_rope && readers(g, v) == 1 && g.ty(r).rank() == 4).then(|| (r, start.clone()))
}

/// `v = x * c` (either order) with `c` an f32 scalar constant and `v` of `x`'s type, read only
/// once: `(x, c)`.
fn scaled(g: &Graph, v: Value) -> Option<(Value, f64)> {
    if !matches!(g.node(v.node).op, Op::Binary(BinaryOp::Mul)) || readers(g, v) != 1 {
        return None;
    }
    let [a, b] = g.operands(v.node)[..] else { return None };
    let konst = |c: Value| match g.node(c.node).op {
        Op::Const {
            value,
            dtype: DType::F32,
        } => Some(value),
        _ => None,
    };
    let (x, c) = match (konst(a), konst(b)) {
        (None, Some(c)) => (a, c),
        (Some(c), None) => (b, c),
        _ => return None,
    };
    (g.ty(x) == g.ty(v)).then_some((x, c))
}

/// Folds the q/k norm and rotation of every lightning decode step into it.
pub fn fold_qk_norm_steps(mut g: Graph) -> Result<Graph, PassError> {
    let ir = |e| PassError::ir(PASS, e);
    let mut place = Placement::of(&g);
    for n in g.topo_order() {
        let Op::Fused(Fused::LinearAttnGate {
            chunk: None,
            groups,
            eps,
        }) = g.node(n).op
        else {
            continue;
        };
        let ops = g.operands(n);
        let (qv, scale) = scaled(&g, ops[1]).unwrap_or((ops[1], 1.0));
        let (Some((r, q_lo)), Some((rk, k_lo))) = (head_slice(&g, qv), head_slice(&g, ops[2])) else {
            continue;
        };
        let Op::Fused(Fused::QkNormRope { eps: qk_eps, rotary }) = g.node(r.node).op else {
            continue;
        };
        // the norm's result is read by these two slices only, and holds f32 rows
        if r != rk || readers(&g, r) != 2 || g.ty(r).dtype != DType::F32 {
            continue;
        }
        let h = g.ty(ops[2]).shape[2].clone();
        if !step_takes_qk(&g.ty(ops[2]).shape[3]) {
            continue;
        }
        let [x, w, pos, inv] = g.operands(r.node)[..] else {
            continue;
        };
        if g.ty(x).dtype != DType::F32 || g.ty(x).rank() != 4 {
            continue;
        }
        let loc = g.node(n).loc.clone();
        let mut slice = |g: &mut Graph, v: Value, axis: usize, lo: &Dim| {
            let op = Op::Slice {
                axis,
                start: lo.clone(),
                end: lo.add(&h),
            };
            let s = g.add1(op, &[v], loc.clone()).map_err(ir)?;
            place.before(s.node, n);
            Ok::<Value, PassError>(s)
        };
        let (q_raw, k_raw) = (slice(&mut g, x, 2, &q_lo)?, slice(&mut g, x, 2, &k_lo)?);
        // a weight for every head of x ([2H, d]) splits like x; one row ([d]) serves both
        let (qw, kw) = match g.ty(w).rank() {
            2 => (slice(&mut g, w, 0, &q_lo)?, slice(&mut g, w, 0, &k_lo)?),
            _ => (w, w),
        };
        let f = Fused::LinearAttnQkGate {
            groups,
            eps,
            qk_eps,
            rotary,
            scale,
        };
        let args = [ops[0], q_raw, k_raw, ops[3], ops[4], ops[5], ops[6], qw, kw, pos, inv];
        let outs = g.add(Op::Fused(f), &args, g.node(n).loc.clone()).map_err(ir)?;
        place.before(outs[0].node, n);
        for (port, new) in outs.into_iter().enumerate() {
            if let Some(l) = g.node(n).label.clone() {
                g.set_label(new, &l);
            }
            replace_value(
                &mut g,
                Value {
                    node: n,
                    port: port as u32,
                },
                new,
            );
        }
    }
    place.finish(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{count_ops, outputs_close, random_inputs, run};
    use ir::checkpoint::RandomWeights;
    use ir::op::InputKind;
    use ir::shape::DimEnv;
    use ir::tol::Tol;

    const H: i64 = 3;
    const D: i64 = 16;
    const ROT: usize = 8;

    /// `qk_norm_rope` of q's and k's heads in one op (a weight per head), q's slice times a
    /// scale, and the gated step, as the fused Ring decode graph has them; `extra_reader` adds
    /// an output that reads the norm's result as well.
    fn step_graph(extra_reader: bool) -> Graph {
        let mut g = Graph::new();
        let (b, t) = (Dim::sym("b"), Dim::sym("t"));
        let c = |n: i64| Dim::constant(n);
        let input = |g: &mut Graph, name: &str, dtype, shape| g.add_input(name, InputKind::Data, dtype, shape);
        let x = input(&mut g, "x", DType::F32, vec![b.clone(), t.clone(), c(2 * H), c(D)]);
        let w = input(&mut g, "w", DType::BF16, vec![c(2 * H), c(D)]);
        let pos = input(&mut g, "pos", DType::I64, vec![t.clone()]);
        let inv = input(&mut g, "inv", DType::F32, vec![c(ROT as i64 / 2)]);
        let s0 = input(&mut g, "s0", DType::F32, vec![b.clone(), c(H), c(D), c(D)]);
        let v = input(&mut g, "v", DType::F32, vec![b.clone(), t.clone(), c(H), c(D)]);
        let lam = input(&mut g, "lam", DType::F32, vec![c(H), c(1), c(1)]);
        let gw = input(&mut g, "gw", DType::F32, vec![c(H * D)]);
        let gate = input(&mut g, "g", DType::F32, vec![b.clone(), t.clone(), c(H * D)]);
        let rope = Fused::QkNormRope { eps: 1e-6, rotary: ROT };
        let r = g.add1(Op::Fused(rope), &[x, w, pos, inv], None).unwrap();
        let slice = |g: &mut Graph, lo: i64| {
            let op = Op::Slice {
                axis: 2,
                start: c(lo),
                end: c(lo + H),
            };
            g.add1(op, &[r], None).unwrap()
        };
        let (q, k) = (slice(&mut g, 0), slice(&mut g, H));
        let scale = g
            .add1(
                Op::Const {
                    value: 0.25,
                    dtype: DType::F32,
                },
                &[],
                None,
            )
            .unwrap();
        let q = g.add1(Op::Binary(BinaryOp::Mul), &[q, scale], None).unwrap();
        let f = Fused::LinearAttnGate {
            chunk: None,
            groups: 2,
            eps: 1e-6,
        };
        let outs = g.add(Op::Fused(f), &[s0, q, k, v, lam, gw, gate], None).unwrap();
        g.add_output("s", outs[0], InputKind::Data);
        g.add_output("y", outs[1], InputKind::Data);
        if extra_reader {
            g.add_output("r", r, InputKind::Data);
        }
        g
    }

    #[test]
    fn the_step_makes_its_own_q_and_k() {
        let g = step_graph(false);
        let f = fold_qk_norm_steps(g.clone()).unwrap();
        assert_eq!(count_ops(&f, "linear_attn_step_qk_gate"), 1, "{}", f.to_text());
        assert_eq!(count_ops(&f, "qk_norm_rope"), 0, "{}", f.to_text());
        let qk = f.g.node_weights().find_map(|n| match n.op {
            Op::Fused(Fused::LinearAttnQkGate { scale, rotary, .. }) => Some((scale, rotary)),
            _ => None,
        });
        assert_eq!(qk, Some((0.25, ROT)));
        for (b, t) in [(2, 1), (1, 3)] {
            let env: DimEnv = [("b".to_string(), b), ("t".to_string(), t)].into();
            let inputs = random_inputs(&g, &env, 3 + t as u64, 1.0, 5000);
            let w = RandomWeights::new(3);
            let (want, got) = (run(&g, &w, &inputs).unwrap(), run(&f, &w, &inputs).unwrap());
            let e = outputs_close(&got, &want, Tol::F32.op()).unwrap();
            println!("b {b}, t {t}: folded against unfused {e:.2e}");
        }
    }

    #[test]
    fn head_dims_the_step_kernel_takes() {
        for d in [128, 96, 64, 32, 16] {
            assert!(step_takes_qk(&Dim::constant(d)), "{d}");
        }
        // 256 threads do not tile 8 columns of 8 rows; 40 and 160 are not whole column blocks
        for d in [8, 40, 160, 256] {
            assert!(!step_takes_qk(&Dim::constant(d)), "{d}");
        }
        assert!(!step_takes_qk(&Dim::sym("d")));
    }

    #[test]
    fn a_norm_read_elsewhere_stays() {
        let f = fold_qk_norm_steps(step_graph(true)).unwrap();
        assert_eq!(count_ops(&f, "linear_attn_step_qk_gate"), 0, "{}", f.to_text());
        assert_eq!(count_ops(&f, "qk_norm_rope"), 1, "{}", f.to_text());
    }
}
