//! `merge-router-gemm`, after extraction: the router's GEMM (f32, spec §2.6: `f32(x) · f32(W_r)ᵀ`)
//! and a bf16 GEMM of the same activation `x` by checkpoint weights (the shared expert's gate and
//! up projections, side by side after `fuse-concat-gemms-*`) become one f32 GEMM of `f32(x)` by
//! the weights side by side:
//!
//! ```text
//! W      = f32(x) @ concat(f32(B_s), B_r, axis = -1)
//! router = W[.., N_s ..]          (the same f32 dot products)
//! shared = bf16(W[.., .. N_s])    (the f32 dot products of bf16 values, rounded to bf16)
//! ```
//!
//! One launch instead of two, `x` read once, and at decode one pass over both weights. Exact up
//! to where the rounding happens: a bf16 GEMM accumulates in f32 and rounds its result to bf16,
//! which is what `bf16(W)` does (the interpreter's f64 sums round to f32 first: a double
//! rounding, within the bf16 tier). The casts of bf16 weights are exact, so the GPU's tensor
//! cores and the CPU's kernels read the bf16 weights as before (their operand prologues).
//!
//! Why a pass over the extracted graph and not an egg rule: the cost model types the weight
//! operand of the merged GEMM as f32 and charges the shared half's cast to bf16 as a kernel, so
//! the merged form ties with the pair it replaces (one launch each way) and extraction could not
//! be trusted to take it; the merge never costs more (the same weight bytes, one launch and one
//! read of `x` fewer), so it is applied to every such pair.

use crate::precision::replace_uses;
use crate::PassError;
use ir::graph::{Graph, Value};
use ir::op::Op;
use ir::shape::Dim;
use ir::DType;
use petgraph::stable_graph::NodeIndex;

const PASS: &str = "merge-router-gemm";

/// A checkpoint weight seen through views, exact casts and concatenations: the same value at
/// every step.
fn is_weight(g: &Graph, v: Value) -> bool {
    let node = g.node(v.node);
    match &node.op {
        Op::Param { .. } => true,
        Op::Permute { .. } | Op::Reshape { .. } | Op::Expand { .. } | Op::Cast { .. } => {
            g.operands(v.node).first().is_some_and(|a| is_weight(g, *a))
        }
        Op::Concat { .. } => g.operands(v.node).iter().all(|a| is_weight(g, *a)),
        _ => false,
    }
}

/// `n` is `a @ b` with a weight `b [K, N]`: `(a, b, N)`.
fn weight_gemm(g: &Graph, n: NodeIndex) -> Option<(Value, Value, Dim)> {
    if !matches!(g.node(n).op, Op::Matmul) {
        return None;
    }
    let [a, b] = g.operands(n)[..] else { return None };
    let bt = g.ty(b);
    (bt.rank() == 2 && is_weight(g, b)).then(|| (a, b, bt.shape[1].clone()))
}

/// The router-shaped GEMM `f32(x) @ W` (f32 result, `x` bf16): `(x, f32(x), W, N)`.
fn router(g: &Graph, n: NodeIndex) -> Option<(Value, Value, Value, Dim)> {
    let (a, b, nr) = weight_gemm(g, n)?;
    if g.node(n).outputs[0].dtype != DType::F32 || !matches!(g.node(a.node).op, Op::Cast { to: DType::F32 }) {
        return None;
    }
    let x = *g.operands(a.node).first()?;
    (g.ty(x).dtype == DType::BF16).then_some((x, a, b, nr))
}

/// Merges every router GEMM with the first bf16 weight GEMM of the same activation.
pub fn merge_router_gemms(mut g: Graph) -> Result<Graph, PassError> {
    let ir = |e| PassError::ir(PASS, e);
    for r in g.topo_order() {
        let Some((x, ax, br, nr)) = router(&g, r) else { continue };
        let sibling =
            g.g.node_indices()
                .filter(|&s| s != r && g.node(s).outputs.first().is_some_and(|t| t.dtype == DType::BF16))
                .filter_map(|s| weight_gemm(&g, s).map(|(a, b, n)| (s, a, b, n)))
                .find(|(_, a, b, _)| *a == x && g.ty(*b).shape[0] == g.ty(br).shape[0]);
        let Some((s, _, bs, ns)) = sibling else { continue };
        let loc = g.node(s).loc.clone();
        let bs32 = g.add1(Op::Cast { to: DType::F32 }, &[bs], loc.clone()).map_err(ir)?;
        let both = g.add1(Op::Concat { axis: 1 }, &[bs32, br], loc.clone()).map_err(ir)?;
        let wide = g.add1(Op::Matmul, &[ax, both], loc.clone()).map_err(ir)?;
        let last = g.ty(wide).rank() - 1;
        let end = ns.add(&nr);
        let r_part = Op::Slice {
            axis: last,
            start: ns.clone(),
            end,
        };
        let r_new = g.add1(r_part, &[wide], g.node(r).loc.clone()).map_err(ir)?;
        let s_part = Op::Slice {
            axis: last,
            start: Dim::constant(0),
            end: ns,
        };
        let s32 = g.add1(s_part, &[wide], loc.clone()).map_err(ir)?;
        let s_new = g.add1(Op::Cast { to: DType::BF16 }, &[s32], loc).map_err(ir)?;
        replace_uses(&mut g, r, r_new);
        replace_uses(&mut g, s, s_new);
    }
    crate::cleanup::dce(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{dsl, outputs_close, random_inputs, run};
    use ir::checkpoint::RandomWeights;
    use ir::shape::DimEnv;
    use ir::tol::Tol;

    fn count(g: &Graph, name: &str) -> usize {
        g.g.node_weights().filter(|n| n.op.name() == name).count()
    }

    /// The MoE block's GEMMs of one normed activation, as ring_linear.ring writes them: the f32
    /// router, the shared expert's gate and up side by side, and a GEMM of another activation.
    const SRC: &str = "dim b, s; input x: bf16[b, s, 64]; input z: bf16[b, s, 64];
        param wr: bf16[8, 64] = \"router\"; param wg: bf16[24, 64] = \"gate\";
        param wu: bf16[24, 64] = \"up\"; param wo: bf16[16, 64] = \"other\";
        let p = sigmoid(cast(x, f32) @ transpose(cast(wr, f32)));
        let gu = x @ concat([transpose(wg), transpose(wu)], axis = 1);
        output \"p\" = p;
        output \"h\" = gu[:, :, :24] * gu[:, :, 24:];
        output \"o\" = z @ transpose(wo);";

    #[test]
    fn router_and_shared_gemm_become_one() {
        let g = dsl(SRC);
        assert_eq!(count(&g, "matmul"), 3);
        let m = merge_router_gemms(g.clone()).unwrap();
        // the router and the gate/up GEMM are one f32 GEMM of 48 + 8 columns; the other stays
        assert_eq!(count(&m, "matmul"), 2, "{}", m.to_text());
        let wide =
            m.g.node_indices()
                .find(|&n| matches!(m.node(n).op, Op::Matmul) && m.node(n).outputs[0].dtype == DType::F32)
                .unwrap();
        assert_eq!(
            m.node(wide).outputs[0].shape.last(),
            Some(&Dim::constant(56)),
            "{}",
            m.to_text()
        );
        for o in ["p", "h", "o"] {
            let (a, b) = (g.output(o).unwrap().value, m.output(o).unwrap().value);
            assert_eq!(g.ty(a), m.ty(b), "output `{o}` changed type");
        }
        // the same values: the router's dot products exactly, the shared ones rounded to bf16
        let env: DimEnv = [("b".to_string(), 2), ("s".to_string(), 5)].into();
        let inputs = random_inputs(&g, &env, 9, 1.0, 8);
        let w = RandomWeights::new(9);
        let (want, got) = (run(&g, &w, &inputs).unwrap(), run(&m, &w, &inputs).unwrap());
        let e = outputs_close(&got, &want, Tol::BF16.op()).unwrap();
        println!("merged against unmerged: {e:.2e}");
        assert_eq!(got["p"].to_f64_vec(), want["p"].to_f64_vec());
    }

    #[test]
    fn nothing_merges_without_a_router_or_a_sibling() {
        // no f32 router GEMM of x
        let g = dsl(&SRC.replace(
            "cast(x, f32) @ transpose(cast(wr, f32))",
            "cast(z @ transpose(wr), f32)",
        ));
        assert_eq!(
            count(&merge_router_gemms(g.clone()).unwrap(), "matmul"),
            count(&g, "matmul")
        );
        // the router's activation has no bf16 GEMM beside it (the gate/up GEMM reads z)
        let g = dsl(&SRC.replace("let gu = x @", "let gu = z @"));
        let m = merge_router_gemms(g.clone()).unwrap();
        assert_eq!(count(&m, "matmul"), 3, "{}", m.to_text());
    }
}
