//! `fold-shared-expert`, after extraction (decode plans): the shared expert's down projection
//! joins the routed experts' down projection and combine (`GroupedMatmul { CombineShared }`):
//!
//! ```text
//! r = grouped_matmul[combine](h, chosen, weights, w_down)
//! y = r + hs @ bs                         =>    y = grouped_matmul[combine_shared](h, chosen, weights, w_down, hs, bs)
//! ```
//!
//! One launch fewer per MoE layer. At decode both are GEMVs over the same few tokens: the
//! combine already runs a block per (token, 16 output columns) and sums the token's chosen
//! experts in slot order; the shared expert is one more row of that sum, with weight 1 and its
//! own weights, and the residual add that followed the shared GEMM becomes the combine's
//! epilogue. The same roundings: the shared product is rounded to its matmul's dtype and added
//! in f32, as `routed + shared` is in the model.
//!
//! Why not in prefill: there the shared expert is a dense GEMM over every token, which the
//! tensor-core GEMM runs well, while the combine's expert-major tiles would take it as a
//! token-by-token GEMV.

use crate::rewire::{readers, replace_value, Placement};
use crate::PassError;
use ir::fused::{Fused, GroupedEpilogue};
use ir::graph::{Graph, Value};
use ir::op::{BinaryOp, Op};
use petgraph::stable_graph::NodeIndex;

const PASS: &str = "fold-shared-expert";

/// `v` is the combine of a grouped down projection, read only once: its node.
fn combine(g: &Graph, v: Value) -> Option<NodeIndex> {
    let ok = matches!(
        g.node(v.node).op,
        Op::Fused(Fused::GroupedMatmul {
            epilogue: GroupedEpilogue::WeightedCombine
        })
    );
    (ok && v.port == 0 && readers(g, v) == 1).then_some(v.node)
}

/// `v` is `hs @ bs` with `hs [b, s, Is]` and a matrix `bs [Is, D]`, read only once: `(hs, bs)`.
fn shared_gemm(g: &Graph, v: Value) -> Option<(Value, Value)> {
    if !matches!(g.node(v.node).op, Op::Matmul) || readers(g, v) != 1 {
        return None;
    }
    let [hs, bs] = g.operands(v.node)[..] else { return None };
    (g.ty(hs).rank() == 3 && g.ty(bs).rank() == 2).then_some((hs, bs))
}

/// Folds each shared expert's down projection into the combine beside it.
pub fn fold_shared_experts(mut g: Graph) -> Result<Graph, PassError> {
    let ir = |e| PassError::ir(PASS, e);
    let mut place = Placement::of(&g);
    for n in g.topo_order() {
        if !matches!(g.node(n).op, Op::Binary(BinaryOp::Add)) {
            continue;
        }
        let [x, y] = g.operands(n)[..] else { continue };
        let found = match (combine(&g, x), shared_gemm(&g, y)) {
            (Some(c), Some(s)) => Some((c, s)),
            _ => match (combine(&g, y), shared_gemm(&g, x)) {
                (Some(c), Some(s)) => Some((c, s)),
                _ => None,
            },
        };
        let Some((c, (hs, bs))) = found else { continue };
        let out = Value { node: n, port: 0 };
        let r = Value { node: c, port: 0 };
        // the sum stays the combine's f32 [b, s, D]: no broadcast of either side (the shared
        // product of the combine's shape, its rows the combine's tokens), no other dtype
        let m = if x.node == c { y } else { x };
        let h = g.operands(c)[0];
        if g.ty(out) != g.ty(r) || g.ty(m).shape != g.ty(r).shape || g.ty(hs).shape[..2] != g.ty(h).shape[..2] {
            continue;
        }
        let mut ops = g.operands(c);
        ops.extend([hs, bs]);
        let f = Fused::GroupedMatmul {
            epilogue: GroupedEpilogue::CombineShared,
        };
        let new = g.add1(Op::Fused(f), &ops, g.node(c).loc.clone()).map_err(ir)?;
        place.before(new.node, n);
        if let Some(l) = g.node(c).label.clone() {
            g.set_label(new, &l);
        }
        replace_value(&mut g, out, new);
    }
    place.finish(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{outputs_close, random_inputs, run};
    use ir::checkpoint::RandomWeights;
    use ir::op::InputKind;
    use ir::shape::{Dim, DimEnv};
    use ir::tol::Tol;
    use ir::DType;

    /// `combine(h, chosen, weights, w_down) + hs @ bs` over inputs; `hs_rows` is hs's batch
    /// (`b`, or 1 for a broadcast shared product).
    fn moe_out(hs_rows: Dim) -> Graph {
        let mut g = Graph::new();
        let (b, s) = (Dim::sym("b"), Dim::sym("s"));
        let c = |n: i64| Dim::constant(n);
        let input = |g: &mut Graph, name: &str, dtype, shape| g.add_input(name, InputKind::Data, dtype, shape);
        let h = input(&mut g, "h", DType::BF16, vec![b.clone(), s.clone(), c(2), c(8)]);
        let chosen = input(&mut g, "chosen", DType::I64, vec![b.clone(), s.clone(), c(2)]);
        let w = input(&mut g, "weights", DType::F32, vec![b.clone(), s.clone(), c(2)]);
        let wd = input(&mut g, "w_down", DType::BF16, vec![c(4), c(16), c(8)]);
        let hs = input(&mut g, "hs", DType::BF16, vec![hs_rows, s.clone(), c(24)]);
        let bs = input(&mut g, "bs", DType::BF16, vec![c(24), c(16)]);
        let f = Fused::GroupedMatmul {
            epilogue: GroupedEpilogue::WeightedCombine,
        };
        let r = g.add1(Op::Fused(f), &[h, chosen, w, wd], None).unwrap();
        let m = g.add1(Op::Matmul, &[hs, bs], None).unwrap();
        let y = g.add1(Op::Binary(BinaryOp::Add), &[m, r], None).unwrap();
        g.add_output("y", y, InputKind::Data);
        g
    }

    fn count_shared(g: &Graph) -> usize {
        let f = Fused::GroupedMatmul {
            epilogue: GroupedEpilogue::CombineShared,
        };
        g.g.node_weights().filter(|n| n.op == Op::Fused(f.clone())).count()
    }

    #[test]
    fn the_shared_down_gemm_joins_the_combine() {
        let g = moe_out(Dim::sym("b"));
        let f = fold_shared_experts(g.clone()).unwrap();
        assert_eq!(count_shared(&f), 1, "{}", f.to_text());
        assert!(!f.g.node_weights().any(|n| n.op == Op::Matmul), "{}", f.to_text());
        let env: DimEnv = [("b".to_string(), 3), ("s".to_string(), 2)].into();
        let inputs = random_inputs(&g, &env, 5, 1.0, 4);
        let w = RandomWeights::new(5);
        let (want, got) = (run(&g, &w, &inputs).unwrap(), run(&f, &w, &inputs).unwrap());
        let e = outputs_close(&got, &want, Tol::BF16.op()).unwrap();
        println!("folded against unfused: {e:.2e}");
    }

    #[test]
    fn a_broadcast_shared_product_is_left_alone() {
        // hs for one batch row added to every row's combine: not the combine's own rows
        let g = moe_out(Dim::constant(1));
        let f = fold_shared_experts(g).unwrap();
        assert_eq!(count_shared(&f), 0, "{}", f.to_text());
    }
}
