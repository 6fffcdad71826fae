//! `fold-norm-gemm`, after extraction (decode plans): an RMSNorm whose normalised rows a weight
//! GEMM reads becomes part of that GEMM (`Fused::NormMatmul`), which computes each row's
//! statistic itself:
//!
//! ```text
//! (s, n) = add_rms_norm(h, a, w)          s = h + a            (an add: the epilogue of a's GEMM)
//! y      = n @ B                    =>    y = norm_matmul(s, B, w)
//! ```
//!
//! and likewise for `rms_norm(x, w)` (`x` itself is read) and for a GEMM of `cast(n)` (the
//! router's f32 GEMM after `merge-router-gemm`). When other ops read `n` too (the grouped expert
//! GEMMs beside the router), the folded GEMM stores the normalised rows as a second result
//! (`emit_norm`) and they read that.
//!
//! One launch fewer per norm: at decode a norm is a latency-bound kernel of one block per token
//! (≈ 9 µs each on an H100, 40 a Ring-mini step), and the GEMM that follows reads the same rows
//! anyway. The residual add moves into the epilogue of the GEMM that makes `a` (kernel
//! partition: an elementwise consumer of a template's result). The cpu GEMM and the GPU's GEMV
//! (up to 16 rows) round as the norm does (`ir::kernel::RowNorm`); the GPU's tensor-core path
//! copies a 16-byte aligned bf16 A raw, scales it by the weight in shared memory and multiplies
//! the accumulators by 1/rms at the end when the result is bf16, so it rounds `x · w` where the
//! norm rounds `x / rms` (the bf16 tier; the stored rows stay exact; an f32 result, the
//! router's, keeps the exact roundings).
//!
//! The LM head (over [`FOLD_MAX_COLS`] columns) keeps its norm: see there.
//!
//! Why not in prefill: there every column tile of the GEMM would find the statistics of its
//! 128 rows again and rescale its A tiles in shared memory; at M = 4096 the separate norm
//! kernel costs less than that.
//!
//! Why a pass over the extracted graph and not an egg rule: the fold changes which kernel
//! stores the residual sum (the producer's epilogue instead of the norm), which the cost model,
//! costing each e-node alone, does not see. At decode it saves a launch and a write and read of
//! `n`, so it is applied to every GEMM it finds but the widest ([`FOLD_MAX_COLS`]); whether it
//! pays on a GPU at large batches depends on the epilogues that take the residual adds
//! (docs/perf.md: the cuda device keeps the norms apart by default).

use crate::rewire::{readers, replace_value, users, Placement};
use crate::PassError;
use ir::fused::Fused;
use ir::graph::{Graph, Value};
use ir::op::{BinaryOp, Op};
use petgraph::stable_graph::NodeIndex;

const PASS: &str = "fold-norm-gemm";

/// The widest GEMM (columns) that takes a norm. Wider ones (the LM head's vocabulary) keep the
/// norm apart: each block of 16 columns of the decode GEMV finds the rows' statistic again, so
/// the cost grows with N. Measured on an H200 (docs/perf.md): Ring-mini's LM head (157184
/// columns) went from 167 to 245 µs at batch 1 folded, against a 7.5 µs norm kernel; the
/// layers' GEMMs (at most 10240 columns) gained.
pub const FOLD_MAX_COLS: i64 = 32768;

/// `m` multiplies `a` (as its left operand) by a matrix `b [K, N]` (N at most
/// [`FOLD_MAX_COLS`]): `b`.
fn gemm_of(g: &Graph, m: NodeIndex, a: Value) -> Option<Value> {
    if !matches!(g.node(m).op, Op::Matmul) {
        return None;
    }
    let [x, b] = g.operands(m)[..] else { return None };
    let ty = g.ty(b);
    let narrow = ty.rank() == 2 && ty.shape[1].as_const().is_some_and(|n| n <= FOLD_MAX_COLS);
    (x == a && narrow).then_some(b)
}

/// The first GEMM that reads `n` as its left operand, directly or through a widening cast to
/// the GEMM's dtype (exact, so the matmul's own promotion does it): `(gemm, b, cast)`.
fn host(g: &Graph, n: Value) -> Option<(NodeIndex, Value, Option<NodeIndex>)> {
    for (u, slot) in users(g, n) {
        if slot != 0 {
            continue;
        }
        if let Some(b) = gemm_of(g, u, n) {
            return Some((u, b, None));
        }
        if let Op::Cast { to } = g.node(u).op {
            if ir::DType::promote(g.ty(n).dtype, to) != Some(to) {
                continue;
            }
            let c = Value { node: u, port: 0 };
            for (m, _) in users(g, c) {
                if let Some(b) = gemm_of(g, m, c).filter(|b| g.ty(*b).dtype == to) {
                    return Some((m, b, Some(u)));
                }
            }
        }
    }
    None
}

/// Folds every RMSNorm read by a weight GEMM into it.
pub fn fold_norm_gemms(mut g: Graph) -> Result<Graph, PassError> {
    let ir = |e| PassError::ir(PASS, e);
    let mut place = Placement::of(&g);
    for n in g.topo_order() {
        let (eps, add, port) = match g.node(n).op {
            Op::Fused(Fused::RmsNorm { eps }) => (eps, false, 0),
            Op::Fused(Fused::AddRmsNorm { eps }) => (eps, true, 1),
            _ => continue,
        };
        let normed = Value { node: n, port };
        let Some((m, b, cast)) = host(&g, normed) else { continue };
        let ops = g.operands(n);
        let w = ops[ops.len() - 1];
        let loc = g.node(n).loc.clone();
        let x = if add {
            let s = g.add1(Op::Binary(BinaryOp::Add), &ops[..2], loc.clone()).map_err(ir)?;
            place.before(s.node, n);
            if let Some(l) = g.node(n).label.clone() {
                g.set_label(s, &l);
            }
            replace_value(&mut g, Value { node: n, port: 0 }, s);
            s
        } else {
            ops[0]
        };
        // another reader of the rows: anything beside the GEMM (or beside its cast)
        let other = readers(&g, normed) > 1 || cast.is_some_and(|c| readers(&g, Value { node: c, port: 0 }) > 1);
        let folded = Fused::NormMatmul { eps, emit_norm: other };
        let outs = g
            .add(Op::Fused(folded), &[x, b, w], g.node(m).loc.clone())
            .map_err(ir)?;
        place.before(outs[0].node, m);
        if let Some(l) = g.node(m).label.clone() {
            g.set_label(outs[0], &l);
        }
        replace_value(&mut g, Value { node: m, port: 0 }, outs[0]);
        if other {
            // the others read the stored rows (a cast of them stays, reading those)
            replace_value(&mut g, normed, outs[1]);
        }
    }
    place.finish(g)
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

    fn compiled(g: &Graph, mode: crate::Mode) -> Graph {
        let opts = crate::CompileOptions {
            mode,
            ..Default::default()
        };
        crate::compile(g, &opts).unwrap().0
    }

    /// `got` against `want` on random inputs and weights: the worst error, in the bf16 tier.
    fn same_values(want: &Graph, got: &Graph) -> f64 {
        let env: DimEnv = [("b".to_string(), 3), ("s".to_string(), 1)].into();
        let inputs = random_inputs(want, &env, 11, 1.0, 8);
        let w = RandomWeights::new(11);
        let (a, b) = (run(want, &w, &inputs).unwrap(), run(got, &w, &inputs).unwrap());
        outputs_close(&b, &a, Tol::BF16.op()).unwrap()
    }

    /// A residual add, its norm read by a GEMM, and a second norm read by a GEMM and by an
    /// elementwise op, as a decoder layer's two norms are.
    const SRC: &str = "dim b, s; input h: bf16[b, s, 64]; input a: bf16[b, s, 64];
        param w1: bf16[64] = \"ln1\"; param w2: bf16[64] = \"ln2\";
        param q: bf16[96, 64] = \"q\"; param o: bf16[64, 96] = \"o\"; param r: bf16[8, 64] = \"r\";
        fn rms(x, w) { let x32 = cast(x, f32);
            cast(x32 * rsqrt(mean(x32 * x32, axis = -1, keepdim = true) + 1e-6), bf16) * w }
        let s = h + a;
        let y = rms(s, w1) @ transpose(q);
        let t = s + y @ transpose(o);
        let n2 = rms(t, w2);
        output \"y\" = y;
        output \"p\" = cast(n2, f32) @ transpose(cast(r, f32));
        output \"e\" = n2 * n2;
        output \"t\" = t;";

    #[test]
    fn norms_fold_into_the_gemms_that_read_them() {
        let g = dsl(SRC);
        let f = compiled(&g, crate::Mode::Decode);
        // both norms are folded: no norm kernel is left, two norm GEMMs, one storing its rows
        assert_eq!(count(&f, "add_rms_norm") + count(&f, "rms_norm"), 0, "{}", f.to_text());
        assert_eq!(count(&f, "norm_matmul"), 2, "{}", f.to_text());
        let emits: Vec<bool> =
            f.g.node_weights()
                .filter_map(|n| match n.op {
                    Op::Fused(Fused::NormMatmul { emit_norm, .. }) => Some(emit_norm),
                    _ => None,
                })
                .collect();
        assert_eq!(emits.iter().filter(|&&e| e).count(), 1, "{}", f.to_text());
        let e = same_values(&g, &f);
        println!("folded against unfused: {e:.2e}");
    }

    #[test]
    fn a_vocabulary_wide_gemm_keeps_its_norm() {
        let src = format!(
            "dim b, s; input x: bf16[b, s, 64]; param w: bf16[64] = \"ln\";
            param v: bf16[{}, 64] = \"lm_head\";
            let x32 = cast(x, f32);
            let n = cast(x32 * rsqrt(mean(x32 * x32, axis = -1, keepdim = true) + 1e-6), bf16) * w;
            output \"logits\" = n @ transpose(v);",
            FOLD_MAX_COLS + 8
        );
        let f = compiled(&dsl(&src), crate::Mode::Decode);
        assert_eq!(count(&f, "norm_matmul"), 0, "{}", f.to_text());
        assert_eq!(count(&f, "rms_norm"), 1, "{}", f.to_text());
        // at the limit it folds
        let src = src.replace(&format!("{}", FOLD_MAX_COLS + 8), &format!("{FOLD_MAX_COLS}"));
        let f = compiled(&dsl(&src), crate::Mode::Decode);
        assert_eq!(count(&f, "norm_matmul"), 1, "{}", f.to_text());
    }

    #[test]
    fn prefill_and_norms_without_a_gemm_keep_the_norm() {
        let src = SRC.replace("let y = rms(s, w1) @", "let y = (rms(s, w1) * h) @");
        let g = dsl(&src);
        let f = compiled(&g, crate::Mode::Decode);
        // the first norm feeds an elementwise op before its GEMM: not folded (the second is)
        assert_eq!(count(&f, "norm_matmul"), 1, "{}", f.to_text());
        assert_eq!(count(&f, "add_rms_norm"), 1, "{}", f.to_text());
        same_values(&g, &f);
        let p = compiled(&g, crate::Mode::Prefill);
        assert_eq!(count(&p, "norm_matmul"), 0, "{}", p.to_text());
    }
}
