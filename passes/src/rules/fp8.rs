//! The fp8 family: the quantize/dequantize pairs of the FP8 precision pass
//! ([`crate::precision`]) become scaled FP8 GEMMs, and each activation's quantisation moves into
//! the kernel that produces the activation (spec §5.2: "quantization fusion").
//!
//! The starting point is what `precision::fp8_matmuls` writes for a weight matmul `y`:
//! `(cast (matmul (dequantize_fp8 (proj ?qa 0) (proj ?qa 1) 1 128 f32) (dequantize_fp8 (proj ?qw 0)
//! (proj ?qw 1) 128 128 f32)) ?t)` (no cast when `y` is f32), with `?qa = (quantize_fp8 ?x 1 128)`
//! and `?qw = (quantize_fp8 (permute ?w [1,0]) 128 128)`. The folds make that one
//! `(scaled_matmul_fp8 .. ?t)`, each an equality of values (up to f32 rounding); the producer
//! rules then replace `(quantize_fp8 (rms_norm ..) 1 128)` (and the SwiGLU and residual-norm
//! forms) by one composite op whose outputs are the E4M3 values and their scales.
//!
//! Staging: the family runs only when the graph holds quantize/dequantize ops
//! ([`super::Family::present`]): never in bf16 mode. The producer rules match the composite
//! nodes the fuse family made (`rms_norm`, `swiglu`), so they fire one iteration after those.
//!
//! Layout conventions (ir/src/fused/fp8.rs): activations `[.., M, K]` in 1×128 tiles, the
//! weight as the GEMM reads it, `Wᵀ [K, N]`, in 128×128 blocks.

use super::{is_float_dtype, rank_is, same_type, tuple, typed};
use crate::egraph::Rule;
use egg::rewrite;

/// The fp8 rule table.
#[rustfmt::skip]
pub fn fp8_rules() -> Vec<Rule> {
    vec![
        // A matmul of two dequantised operands is one scaled FP8 GEMM: Hopper's FP8 MMA (wgmma
        // with E4M3 operands) multiplies the raw E4M3 values into f32 accumulators and the scales
        // are applied per 128-wide K block as the partial sums are promoted, so the dequantised
        // f32 copies never reach HBM. Hardware constraints it encodes: both operands FP8 (an FP8
        // MMA takes FP8 pairs only, never FP8 × bf16); the operands K-major ("TN": the activation
        // [M, K] row-major, the weight read as Wᵀ from the checkpoint's [N, K] rows), which is why
        // B must be one 2-D weight shared by every row of A; scales on the same K blocks, 1×128
        // for A and 128×128 for B (the block shapes are literals of the pattern).
        rewrite!("fp8-fold-dequant-into-matmul"; "(matmul (dequantize_fp8 ?aq ?as 1 128 f32) (dequantize_fp8 ?bq ?bs 128 128 f32))" => { typed("(scaled_matmul_fp8 ?aq ?as ?bq ?bs f32)") } if rank_is("?bq", 2)),
        // The rounding of the f32 accumulators to the product's dtype is the GEMM's epilogue: the
        // bf16 result is written straight from the registers (a separate cast kernel would read
        // and write the whole product again).
        rewrite!("fp8-fold-cast-into-scaled-matmul"; "(cast (scaled_matmul_fp8 ?aq ?as ?bq ?bs f32) ?t)" => { typed("(scaled_matmul_fp8 ?aq ?as ?bq ?bs ?t)") } if is_float_dtype("?t")),
        // RMSNorm + quantisation in one kernel (linghe's "RMSNorm+quant", 2.2× in §5.2): a row of
        // D channels is already in registers for the norm's statistics, so its 1×128 tiles' amax
        // and E4M3 values come for free and the bf16 normalised activation is never written.
        // The tile is one row by 128 channels so that one thread block owns whole tiles.
        rewrite!("fp8-fuse-rmsnorm-quant"; "(proj (quantize_fp8 (rms_norm ?x ?w ?eps) 1 128) 0)" => { tuple("(rms_norm_quant_fp8 ?x ?w ?eps)", &["root", "(proj (quantize_fp8 (rms_norm ?x ?w ?eps) 1 128) 1)"]) }),
        // The same after a residual add (every norm of the Ring decoder but the first): one pass
        // reads h and a, writes the new residual stream h + a and the FP8 tiles of its norm.
        rewrite!("fp8-fuse-add-rmsnorm-quant"; "(proj (quantize_fp8 (rms_norm (add ?h ?a) ?w ?eps) 1 128) 0)" => { tuple("(add_rms_norm_quant_fp8 ?h ?a ?w ?eps)", &["(add ?h ?a)", "root", "(proj (quantize_fp8 (rms_norm (add ?h ?a) ?w ?eps) 1 128) 1)"]) } if same_type("?h", "?a")),
        // SwiGLU + quantisation (linghe's "SiLU+quant", 2.5×): the MLP's widest activation, the
        // down projection's operand, goes from the gate/up products straight to E4M3 tiles.
        rewrite!("fp8-fuse-swiglu-quant"; "(proj (quantize_fp8 (swiglu ?g ?u) 1 128) 0)" => { tuple("(swiglu_quant_fp8 ?g ?u)", &["root", "(proj (quantize_fp8 (swiglu ?g ?u) 1 128) 1)"]) }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egraph::rewrite::count_matches;
    use crate::egraph::{saturate, to_egraph, Limits, Saturation};
    use crate::precision::fp8_matmuls;
    use crate::rules::fuse_rules;
    use crate::testing::{check_rewrite, dsl, test_limits};
    use ir::fused::Fused;
    use ir::graph::{Graph, Value};
    use ir::op::{InputKind, Op, UnaryOp};
    use ir::shape::Dim;
    use ir::DType;

    const NORM: &str = "
        fn rms_norm(x, w) {
            let xf = cast(x, f32);
            let n = xf * rsqrt(mean(xf * xf, axis = -1, keepdim = true) + 1e-6);
            cast(n, dtype_of(x)) * w
        }";

    /// The fp8 and fuse families together, as `compile` runs them.
    fn rules() -> Vec<Rule> {
        let mut r = fp8_rules();
        r.extend(fuse_rules());
        r
    }

    /// Limits of these tests, explicit (style.md 7): the graphs are a dozen nodes, the rules
    /// saturate in 3 iterations.
    fn limits() -> Limits {
        Limits {
            iter_limit: 6,
            ..test_limits()
        }
    }

    /// `src` after the FP8 precision pass, saturated; the goal must be in `output`'s class.
    fn case(src: &str, output: &str, goal: &str) -> Saturation {
        let g = fp8_matmuls(dsl(&format!("{NORM}\n{src}"))).unwrap();
        match check_rewrite(&g, output, goal, &rules(), &limits()) {
            Ok((_, sat)) => {
                println!("stop: {}", sat.stop_reason);
                assert!(!sat.stop_reason.hit_limit(), "{}", sat.stop_reason);
                assert!(sat.refused.is_empty(), "{:?} {:?}", sat.refused, sat.refusal_example);
                sat
            }
            Err(e) => panic!("{e}\n{}", g.to_text()),
        }
    }

    /// The activation's and the weight's (q, scales) as a goal's operands.
    fn operands(x: &str, w: &str) -> String {
        let qa = format!("(quantize_fp8 {x} 1 128)");
        let qw = format!("(quantize_fp8 (permute {w} [1,0]) 128 128)");
        format!("(proj {qa} 0) (proj {qa} 1) (proj {qw} 0) (proj {qw} 1)")
    }

    #[test]
    fn fold_dequant_into_matmul() {
        // K = 200 and N = 72: ragged tiles and blocks; bf16 operands give a bf16 GEMM
        let sat = case(
            "dim b, s; input x: bf16[b, s, 200]; param w: bf16[72, 200] = \"w\";
             output \"y\" = tanh(x @ transpose(w));",
            "y",
            &format!("(tanh (scaled_matmul_fp8 {} bf16))", operands("{x}", "{w}")),
        );
        assert_eq!(sat.fired["fp8-fold-dequant-into-matmul"], 1);
        assert_eq!(sat.fired["fp8-fold-cast-into-scaled-matmul"], 1);
        // f32 activations with a bf16 weight (`ringjit_compute_dtype = float32`): an f32 GEMM
        let sat = case(
            "dim b, s; input x: f32[b, s, 128]; param w: bf16[64, 128] = \"w\";
             output \"y\" = tanh(x @ transpose(w));",
            "y",
            &format!("(tanh (scaled_matmul_fp8 {} f32))", operands("{x}", "{w}")),
        );
        assert_eq!(sat.fired["fp8-fold-dequant-into-matmul"], 1);
        assert!(!sat.fired.contains_key("fp8-fold-cast-into-scaled-matmul"));
    }

    #[test]
    fn fuse_rmsnorm_quant() {
        let sat = case(
            "dim b, s; input x: bf16[b, s, 256]; param g: bf16[256] = \"g\"; param w: bf16[64, 256] = \"w\";
             output \"y\" = tanh(rms_norm(x, g) @ transpose(w));",
            "y",
            "(tanh (scaled_matmul_fp8 (proj (rms_norm_quant_fp8 {x} {g} 1e-6) 0) (proj (rms_norm_quant_fp8 {x} {g} 1e-6) 1) ?bq ?bs bf16))",
        );
        assert_eq!(sat.fired["fuse-rmsnorm-narrow"], 1);
        assert_eq!(sat.fired["fp8-fuse-rmsnorm-quant"], 1);
        assert_eq!(sat.fired["fp8-fold-dequant-into-matmul"], 1);
    }

    #[test]
    fn fuse_add_rmsnorm_quant() {
        let src = "dim b, s; input h: bf16[b, s, 64]; input a: bf16[b, s, 64]; param g: bf16[64] = \"g\";
            param w: bf16[32, 64] = \"w\";
            let r = h + a; output \"y\" = tanh(rms_norm(r, g) @ transpose(w)); output \"r\" = r;";
        let arnq = "(add_rms_norm_quant_fp8 {h} {a} {g} 1e-6)";
        let sat = case(
            src,
            "y",
            &format!("(tanh (scaled_matmul_fp8 (proj {arnq} 1) (proj {arnq} 2) ?bq ?bs bf16))"),
        );
        assert_eq!(sat.fired["fp8-fuse-add-rmsnorm-quant"], 1);
        // the plain norm + quant fires on the same norm too (over the sum): extraction chooses
        assert_eq!(sat.fired["fp8-fuse-rmsnorm-quant"], 1);
        case(src, "r", &format!("(proj {arnq} 0)"));
    }

    #[test]
    fn fuse_swiglu_quant() {
        let sat = case(
            "dim b, s; input x: bf16[b, s, 64]; param wg: bf16[96, 64] = \"wg\"; param wu: bf16[96, 64] = \"wu\";
             param wd: bf16[64, 96] = \"wd\";
             let g = x @ transpose(wg);
             output \"y\" = tanh((g * sigmoid(g) * (x @ transpose(wu))) @ transpose(wd));",
            "y",
            "(tanh (scaled_matmul_fp8 (proj (swiglu_quant_fp8 ?g ?u) 0) (proj (swiglu_quant_fp8 ?g ?u) 1) ?bq ?bs bf16))",
        );
        assert_eq!(sat.fired["fuse-swiglu"], 1);
        assert_eq!(sat.fired["fp8-fuse-swiglu-quant"], 1);
        // the gate, up and down products
        assert_eq!(sat.fired["fp8-fold-dequant-into-matmul"], 3);
    }

    // ---- limits: what the rules leave alone ------------------------------------------------------

    /// `tanh(dequantize(quantize(x, a_block), to) @ dequantize(quantize(w, w_block), to))` built
    /// by hand (the precision pass only writes the recipe's form), saturated with the fp8 rules.
    fn hand_built(
        x_ty: (DType, &[i64]),
        w_ty: (DType, &[i64]),
        a_block: (usize, usize),
        w_block: (usize, usize),
        to: DType,
    ) -> Saturation {
        let dims = |s: &[i64]| s.iter().map(|&d| Dim::constant(d)).collect::<Vec<_>>();
        let mut g = Graph::new();
        let x = g.add_input("x", InputKind::Data, x_ty.0, dims(x_ty.1));
        let w = g
            .add1(
                Op::Param {
                    name: "w".into(),
                    stack: None,
                    dtype: w_ty.0,
                    shape: dims(w_ty.1),
                },
                &[],
                None,
            )
            .unwrap();
        let fp8 = |g: &mut Graph, v: Value, (rows, cols): (usize, usize)| {
            let qs = g.add(Op::Fused(Fused::QuantizeFp8 { rows, cols }), &[v], None).unwrap();
            g.add1(Op::Fused(Fused::DequantizeFp8 { rows, cols, to }), &qs, None)
                .unwrap()
        };
        let a8 = fp8(&mut g, x, a_block);
        let w8 = fp8(&mut g, w, w_block);
        let m = g.add1(Op::Matmul, &[a8, w8], None).unwrap();
        let y = g.add1(Op::Unary(UnaryOp::Tanh), &[m], None).unwrap();
        g.add_output("y", y, InputKind::Data);
        let (eg, _) = to_egraph(&g).unwrap();
        let (eg, sat) = saturate(eg, &fp8_rules(), &limits());
        assert!(!sat.stop_reason.hit_limit(), "{}", sat.stop_reason);
        assert!(sat.refused.is_empty(), "{:?} {:?}", sat.refused, sat.refusal_example);
        assert_eq!(
            count_matches(&eg, "(scaled_matmul_fp8 ?a ?b ?c ?d ?t)"),
            sat.fired.get("fp8-fold-dequant-into-matmul").copied().unwrap_or(0)
        );
        sat
    }

    #[test]
    fn the_fold_needs_the_gemm_blocks_a_2d_weight_and_f32_operands() {
        let (bf16, f32) = (DType::BF16, DType::F32);
        // the recipe's form: folded (the probe that the hand-built graph is right)
        let sat = hand_built((bf16, &[2, 3, 256]), (bf16, &[256, 64]), (1, 128), (128, 128), f32);
        assert_eq!(sat.fired.get("fp8-fold-dequant-into-matmul"), Some(&1));
        // activation in 128×128 blocks, or the weight in 1×128 tiles: not what the GEMM applies
        for (a, w) in [((128, 128), (128, 128)), ((1, 128), (1, 128))] {
            let sat = hand_built((bf16, &[2, 3, 256]), (bf16, &[256, 64]), a, w, f32);
            assert!(sat.fired.is_empty(), "{a:?} {w:?}: {:?}", sat.fired);
        }
        // a stack of weights [E, K, N] (the routed experts): no 2-D B operand
        let sat = hand_built(
            (bf16, &[2, 1, 3, 256]),
            (bf16, &[4, 256, 64]),
            (1, 128),
            (128, 128),
            f32,
        );
        assert!(sat.fired.is_empty(), "{:?}", sat.fired);
        // operands dequantised to bf16: their products are rounded before the sum, which an FP8
        // GEMM does not do
        let sat = hand_built((bf16, &[2, 3, 256]), (bf16, &[256, 64]), (1, 128), (128, 128), bf16);
        assert!(sat.fired.is_empty(), "{:?}", sat.fired);
    }

    #[test]
    fn producers_quantized_in_other_blocks_are_not_fused() {
        // an RMSNorm whose output is quantised in 128×128 blocks (as a weight would be) is not
        // the 1×128 epilogue the fused producer writes
        let mut g = dsl(&format!(
            "{NORM}\ndim b; input x: f32[b, 256, 256]; param g: f32[256] = \"g\"; output \"y\" = rms_norm(x, g);"
        ));
        let y = g.outputs[0].value;
        let qs = g
            .add(Op::Fused(Fused::QuantizeFp8 { rows: 128, cols: 128 }), &[y], None)
            .unwrap();
        g.add_output("q", qs[0], InputKind::Data);
        g.add_output("s", qs[1], InputKind::Data);
        let (eg, _) = to_egraph(&g).unwrap();
        let (eg, sat) = saturate(eg, &rules(), &limits());
        assert_eq!(sat.fired.get("fuse-rmsnorm"), Some(&1), "{:?}", sat.fired);
        assert!(!sat.fired.contains_key("fp8-fuse-rmsnorm-quant"), "{:?}", sat.fired);
        assert_eq!(count_matches(&eg, "(rms_norm_quant_fp8 ?x ?w ?e)"), 0);
    }
}
