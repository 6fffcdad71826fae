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

use crate::normgemm::renumber;
use crate::precision::replace_value;
use crate::PassError;
use ir::fused::{Fused, GroupedEpilogue};
use ir::graph::{Graph, Value};
use ir::op::{BinaryOp, Op};
use petgraph::stable_graph::NodeIndex;
use petgraph::Direction;
use std::collections::HashMap;

const PASS: &str = "fold-shared-expert";

/// How many operand slots read `v` (over all its users).
fn uses(g: &Graph, v: Value) -> usize {
    g.g.edges_directed(v.node, Direction::Outgoing)
        .filter(|e| e.weight().port == v.port)
        .count()
}

/// `v` is the combine of a grouped down projection, read only once: its node.
fn combine(g: &Graph, v: Value) -> Option<NodeIndex> {
    let ok = matches!(
        g.node(v.node).op,
        Op::Fused(Fused::GroupedMatmul {
            epilogue: GroupedEpilogue::WeightedCombine
        })
    );
    (ok && v.port == 0 && uses(g, v) == 1).then_some(v.node)
}

/// `v` is `hs @ bs` with `hs [b, s, Is]` and a matrix `bs [Is, D]`, read only once: `(hs, bs)`.
fn shared_gemm(g: &Graph, v: Value) -> Option<(Value, Value)> {
    if !matches!(g.node(v.node).op, Op::Matmul) || uses(g, v) != 1 {
        return None;
    }
    let [hs, bs] = g.operands(v.node)[..] else { return None };
    (g.ty(hs).rank() == 3 && g.ty(bs).rank() == 2).then_some((hs, bs))
}

/// Folds each shared expert's down projection into the combine beside it.
pub fn fold_shared_experts(mut g: Graph) -> Result<Graph, PassError> {
    let ir = |e| PassError::ir(PASS, e);
    let pos: HashMap<NodeIndex, u64> = g
        .topo_order()
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, 2 * i as u64 + 1))
        .collect();
    let mut anchor: HashMap<NodeIndex, u64> = HashMap::new();
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
        // the sum stays the combine's f32 [b, s, D] (no broadcast, no other dtype)
        if g.ty(out) != g.ty(r) {
            continue;
        }
        let mut ops = g.operands(c);
        ops.extend([hs, bs]);
        let f = Fused::GroupedMatmul {
            epilogue: GroupedEpilogue::CombineShared,
        };
        let new = g.add1(Op::Fused(f), &ops, g.node(c).loc.clone()).map_err(ir)?;
        anchor.insert(new.node, pos[&n] - 1);
        if let Some(l) = g.node(c).label.clone() {
            g.set_label(new, &l);
        }
        replace_value(&mut g, out, new);
    }
    if anchor.is_empty() {
        return Ok(g);
    }
    let g = crate::cleanup::dce(g)?;
    Ok(renumber(&g, |n| {
        anchor.get(&n).or_else(|| pos.get(&n)).copied().unwrap_or(u64::MAX)
    }))
}
