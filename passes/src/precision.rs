//! The numeric format of the weight GEMMs, chosen before equality saturation (graph in, graph
//! out).
//!
//! [`Precision::Fp8`] follows the model authors' FP8 recipe (spec §5.2, design.md "Precision"):
//! every weight matmul `y = a @ permute(W)`, `W` a 2-D checkpoint weight `[N, K]`, becomes
//!
//! ```text
//! y = cast(dequantize_fp8(quantize_fp8(a, 1×128), f32) @ dequantize_fp8(quantize_fp8(Wᵀ, 128×128), f32), y's dtype)
//! ```
//!
//! E4M3 values with f32 scales: one scale per token and 128 channels of the activation, one per
//! 128×128 block of the weight; ragged edge tiles when K or N is not a multiple of 128. The
//! product is taken in f32 and rounded once to `y`'s dtype (no cast for an f32 product), which
//! is exactly what an FP8 GEMM computes (f32 accumulators, one rounding in the epilogue) and
//! what `scaled_matmul_fp8 { out }` means, so the fp8 rule family ([`crate::rules::fp8`]) folds
//! each pair into one `scaled_matmul_fp8` without changing a value, then moves the activation's
//! quantisation into the kernel that produces it. (Dequantising to bf16 instead would round the
//! FP8 values' products once more; the fold would then change the GEMM's result at bf16
//! precision, and every later quantisation turns such differences into whole E4M3 steps for
//! the elements they push across a rounding boundary: measured on `small`, compiled and
//! unfused graphs then differ by 0.09–0.23 in the logits instead of agreeing.)
//!
//! What stays in higher precision, and why:
//! - the router GEMM (a product that reaches a top-k selection through elementwise and view ops):
//!   §5.2 keeps it in FP32, since routing is discontinuous in its logits and FP8 error there picks
//!   other experts;
//! - the LM head (a product that is a graph output): the logits are computed in f32 (§2.1, the
//!   train/inference alignment of §5.3);
//! - the routed experts' stacked weights `[E, ., .]`: the moe family turns those products into
//!   grouped GEMMs over the chosen experts, and the op set has no FP8 grouped GEMM yet, so they
//!   stay in the checkpoint's dtype (the shared expert and the dense MLP are 2-D weights and are
//!   quantised);
//! - products without a weight operand (attention scores and PV): not GEMMs of the recipe.
//!
//! In a bf16 model the router and the head are written `cast(x, f32) @ transpose(cast(w, f32))`,
//! so their weight operand is not a bare `permute(W)` and they are never candidates; in an f32
//! model the casts are elided and the two structural checks above keep them out.

use crate::rewire::replace_value;
use crate::PassError;
use ir::fused::Fused;
use ir::graph::{Graph, Value};
use ir::op::Op;
use ir::DType;
use petgraph::stable_graph::NodeIndex;
use petgraph::Direction;
use std::collections::HashMap;

/// The format of the weight GEMMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// The checkpoint's dtypes (bf16, or f32 for an f32 config): no quantisation.
    #[default]
    Bf16,
    /// E4M3 GEMMs with block scales, per the model authors' recipe (module doc).
    Fp8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }

    pub fn from_name(s: &str) -> Option<Precision> {
        match s {
            "bf16" => Some(Precision::Bf16),
            "fp8" => Some(Precision::Fp8),
            _ => None,
        }
    }
}

/// The activation operand's blocks: one scale per row and 128 channels (§5.2).
pub const ACTIVATION_BLOCK: (usize, usize) = (1, 128);
/// The weight operand's blocks: one scale per 128×128 block (§5.2).
pub const WEIGHT_BLOCK: (usize, usize) = (128, 128);

/// How many view/elementwise hops a router's logits take to their top-k (sigmoid, bias add,
/// group reshape: 3), with room to spare; bounded so that the residual stream is never walked.
const ROUTING_HOPS: usize = 6;

/// The FP8 pass: quantises the operands of every weight matmul except the router and the LM
/// head (module doc). An activation or weight feeding several products is quantised once.
pub fn fp8_matmuls(mut g: Graph) -> Result<Graph, PassError> {
    let targets: Vec<NodeIndex> = g
        .topo_order()
        .into_iter()
        .filter(|&m| is_weight_matmul(&g, m) && !is_routing_logits(&g, m) && !is_graph_output(&g, m))
        .collect();
    let mut made: HashMap<(Value, (usize, usize)), Value> = HashMap::new();
    let err = |e| PassError::ir("fp8-matmuls", e);
    for m in targets {
        let (a, b) = match g.operands(m)[..] {
            [a, b] => (a, b),
            _ => continue,
        };
        let node = g.node(m);
        let (loc, label, out) = (node.loc.clone(), node.label.clone(), node.outputs[0].dtype);
        let mut fp8 = |g: &mut Graph, v: Value, block: (usize, usize)| -> Result<Value, PassError> {
            if let Some(&d) = made.get(&(v, block)) {
                return Ok(d);
            }
            let (rows, cols) = block;
            let qs = g
                .add(Op::Fused(Fused::QuantizeFp8 { rows, cols }), &[v], loc.clone())
                .map_err(err)?;
            let to = DType::F32;
            let d = g
                .add1(Op::Fused(Fused::DequantizeFp8 { rows, cols, to }), &qs, loc.clone())
                .map_err(err)?;
            made.insert((v, block), d);
            Ok(d)
        };
        let a8 = fp8(&mut g, a, ACTIVATION_BLOCK)?;
        let b8 = fp8(&mut g, b, WEIGHT_BLOCK)?;
        // the GEMM accumulates in f32 and rounds once, to the product's own dtype
        let mut y = g.add1(Op::Matmul, &[a8, b8], loc.clone()).map_err(err)?;
        if out != DType::F32 {
            y = g.add1(Op::Cast { to: out }, &[y], loc.clone()).map_err(err)?;
        }
        if let Some(l) = &label {
            g.set_label(y, l);
        }
        replace_uses(&mut g, m, y);
        g.g.remove_node(m);
    }
    g.validate().map_err(err)?;
    Ok(g)
}

/// `a @ permute(W, [1, 0])` with `W` a float 2-D parameter (not a stack of experts) and `a` a
/// float activation of rank ≥ 2 (rows × K tiles).
pub fn is_weight_matmul(g: &Graph, m: NodeIndex) -> bool {
    if !matches!(g.node(m).op, Op::Matmul) {
        return false;
    }
    let [a, b] = g.operands(m)[..] else { return false };
    let a_ty = g.ty(a);
    if !a_ty.dtype.is_float() || a_ty.rank() < 2 {
        return false;
    }
    match &g.node(b.node).op {
        Op::Permute { perm } if perm[..] == [1, 0] => {}
        _ => return false,
    }
    let [w] = g.operands(b.node)[..] else { return false };
    matches!(&g.node(w.node).op, Op::Param { stack: None, dtype, shape, .. } if dtype.is_float() && shape.len() == 2)
}

/// The product reaches a top-k (or arg-max) through at most [`ROUTING_HOPS`] elementwise or
/// view ops: routing logits.
pub fn is_routing_logits(g: &Graph, m: NodeIndex) -> bool {
    let mut frontier = vec![m];
    for _ in 0..=ROUTING_HOPS {
        let mut next = Vec::new();
        for n in frontier {
            for user in g.g.neighbors_directed(n, Direction::Outgoing) {
                match &g.node(user).op {
                    Op::TopK { .. } | Op::ArgMax { .. } | Op::Fused(Fused::RouteTopK { .. }) => return true,
                    Op::Unary(_)
                    | Op::Binary(_)
                    | Op::Where
                    | Op::Cast { .. }
                    | Op::Reshape { .. }
                    | Op::Permute { .. }
                    | Op::Expand { .. }
                    | Op::Slice { .. } => next.push(user),
                    _ => {}
                }
            }
        }
        next.sort();
        next.dedup();
        frontier = next;
    }
    false
}

/// The product is a graph output, directly or through casts and views: the LM head's logits.
pub fn is_graph_output(g: &Graph, m: NodeIndex) -> bool {
    let mut stack = vec![m];
    let mut seen = std::collections::HashSet::new();
    while let Some(n) = stack.pop() {
        if !seen.insert(n) {
            continue;
        }
        if g.outputs.iter().any(|o| o.value.node == n) {
            return true;
        }
        for user in g.g.neighbors_directed(n, Direction::Outgoing) {
            if matches!(
                g.node(user).op,
                Op::Cast { .. } | Op::Reshape { .. } | Op::Permute { .. }
            ) {
                stack.push(user);
            }
        }
    }
    false
}

/// Points every use of `old`'s (single) output, edges and graph outputs, at `new`.
pub(crate) fn replace_uses(g: &mut Graph, old: NodeIndex, new: Value) {
    replace_value(g, Value { node: old, port: 0 }, new);
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

    fn env() -> DimEnv {
        [("b".to_string(), 2), ("s".to_string(), 3)].into()
    }

    /// `got` against `want` on the same random inputs and weights: the worst relative error.
    fn error(want: &Graph, got: &Graph, bound: f64) -> f64 {
        let inputs = random_inputs(want, &env(), 5, 1.0, 8);
        let w = RandomWeights::new(5);
        let a = run(want, &w, &inputs).unwrap();
        let b = run(got, &w, &inputs).unwrap();
        outputs_close(&b, &a, bound).unwrap()
    }

    #[test]
    fn weight_matmuls_get_quantized_operands_and_keep_their_dtype() {
        // K = 200: ragged 1×128 tiles and 128×128 blocks; the activation feeds two products and
        // is quantised once; the output is a tanh of the product, not the product
        let g = dsl("dim b, s; input x: bf16[b, s, 200]; param w1: bf16[72, 200] = \"w1\";
            param w2: bf16[72, 200] = \"w2\";
            output \"y\" = tanh(x @ transpose(w1)) * (x @ transpose(w2));");
        let q = fp8_matmuls(g.clone()).unwrap();
        assert_eq!(count(&q, "quantize_fp8"), 3, "{}", q.to_text());
        assert_eq!(count(&q, "dequantize_fp8"), 3);
        let text = q.to_text();
        assert!(text.contains("quantize_fp8 block=1x128"), "{text}");
        assert!(text.contains("quantize_fp8 block=128x128"), "{text}");
        // f32 products of the dequantised operands, rounded once to the matmuls' bf16
        assert!(text.contains("dequantize_fp8 block=1x128 to=f32"), "{text}");
        assert_eq!(count(&q, "cast"), 2, "{text}");
        assert_eq!(q.ty(q.outputs[0].value), g.ty(g.outputs[0].value));
        // FP8 really ran: within the FP8 tier of the bf16 graph, and not equal to it
        let e = error(&g, &q, Tol::FP8.op());
        assert!(e > Tol::BF16.op() / 10.0, "quantisation changed nothing ({e:.2e})");
    }

    #[test]
    fn router_head_experts_and_activation_products_stay_unquantized() {
        let g = dsl("dim b, s; input x: f32[b, s, 64]; param wr: f32[8, 64] = \"router\";
            param experts: f32[8, 16, 64] = \"e.{e}\" for e in 0..8; param head: f32[32, 64] = \"head\";
            param w: f32[64, 64] = \"w\";
            let (_, chosen) = topk(sigmoid(x @ transpose(wr)), 2, axis = -1);
            let h = unsqueeze(x, 1) @ transpose(experts);
            let att = x @ transpose(x);
            let y = x @ transpose(w);
            output \"chosen\" = chosen; output \"h\" = h; output \"att\" = att;
            output \"logits\" = y @ transpose(head);");
        let q = fp8_matmuls(g.clone()).unwrap();
        // only `x @ transpose(w)`: one product of the five reads dequantised operands
        assert_eq!(count(&q, "quantize_fp8"), 2, "{}", q.to_text());
        let reads_fp8: Vec<String> =
            q.g.node_indices()
                .filter(|&n| matches!(q.node(n).op, Op::Matmul))
                .filter(|&n| {
                    q.operands(n)
                        .iter()
                        .any(|v| q.node(v.node).op.name() == "dequantize_fp8")
                })
                .map(|n| q.node(n).outputs[0].to_string())
                .collect();
        assert_eq!(reads_fp8, ["f32[b, s, 64]"], "{}", q.to_text());
        assert_eq!(count(&q, "matmul"), 5);
        error(&g, &q, Tol::FP8.model());
    }

    #[test]
    fn precision_names_round_trip() {
        for p in [Precision::Bf16, Precision::Fp8] {
            assert_eq!(Precision::from_name(p.name()), Some(p));
        }
        assert_eq!(Precision::default(), Precision::Bf16);
    }
}
