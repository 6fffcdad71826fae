//! Reference semantics of blockwise FP8 (E4M3) quantisation, dequantisation and the scaled GEMM
//! (see `super::Fused`; recipe in spec §5.2 and design.md "Precision").
//!
//! Layout. A tensor `x [.., R, C]` quantised in `rows × cols` blocks is the pair
//! `q f8e4m3 [.., R, C]` (same layout as `x`) and `scales f32 [.., ceil(R/rows), ceil(C/cols)]`,
//! row-major: element `(i, j)` of a batch belongs to block `(i / rows, j / cols)`. Edge blocks
//! are ragged (they cover fewer rows or columns); they are scaled by their own amax like any other.
//! `x ≈ q · scale`, with `scale = amax / 448` (448 = E4M3's largest finite value) so that the
//! block's largest magnitude maps to ±448, and `q = E4M3(x / scale)` (round to nearest even,
//! saturating). An all-zero block gets scale 1 (its q is 0). A block of tiny values
//! (amax < 448 · 2^-126 ≈ 5.3e-36) has its scale clamped to f32's smallest normal number, so that
//! the scale is never 0 or subnormal (a GPU flushing subnormals would divide by zero): such a block
//! keeps less than E4M3's precision, and nothing overflows. Scales are exact `amax / 448` (f32
//! division), not rounded to powers of two.
//!
//! The scaled GEMM works on activations in 1×128 tiles and a weight in 128×128 blocks:
//! `a_q [.., M, K]` with `a_s [.., M, ceil(K/128)]`, and `b_q [K, N]` with
//! `b_s [ceil(K/128), ceil(N/128)]`, i.e. `QuantizeFp8 { rows: 1, cols: 128 }` of the activation
//! and `QuantizeFp8 { rows: 128, cols: 128 }` of the weight as the GEMM reads it, `[K, N]`.
//! Because the blocks are square, that equals quantising the checkpoint's `[N, K]` weight and
//! transposing both `q` and the scales (a block's amax does not depend on orientation).

use super::norm::{arity, floats};
use super::Fused;
use crate::dtype::DType;
use crate::graph::TensorType;
use crate::shape::Dim;
use crate::tensor::Tensor;

/// Largest finite E4M3 value: a block's amax maps to it.
const E4M3_MAX: f32 = 448.0;

/// Block edge of the scaled GEMM: along K for both operands, along N for the weight (§5.2).
const GEMM_BLOCK: usize = 128;

/// The quantisation of a GEMM's activation operand: 1×128 tiles (one scale per row and 128
/// channels), what the fused producers (`RmsNormQuantFp8`, ...) emit.
pub(super) fn activation_quantize() -> Fused {
    Fused::QuantizeFp8 {
        rows: 1,
        cols: GEMM_BLOCK,
    }
}

/// Geometry of a tensor `[.., r, c]` cut into `rows × cols` blocks.
#[derive(Debug)]
struct Blocks {
    /// product of the leading dims
    batch: usize,
    r: usize,
    c: usize,
    rows: usize,
    cols: usize,
    /// blocks along r and along c (ragged last ones included)
    rb: usize,
    cb: usize,
}

impl Blocks {
    fn of(op: &str, shape: &[usize], rows: usize, cols: usize) -> Result<Blocks, String> {
        if rows == 0 || cols == 0 {
            return Err(format!("{op}: block {rows}x{cols} must not be empty"));
        }
        let n = shape.len();
        if n < 2 {
            return Err(format!("{op} needs a tensor of rank >= 2, got shape {shape:?}"));
        }
        let (r, c) = (shape[n - 2], shape[n - 1]);
        Ok(Blocks {
            batch: shape[..n - 2].iter().product(),
            r,
            c,
            rows,
            cols,
            rb: r.div_ceil(rows),
            cb: c.div_ceil(cols),
        })
    }

    /// Shape of the scales of a tensor of `shape` (whose last two dims are `r`, `c`).
    fn scales_shape(&self, shape: &[usize]) -> Vec<usize> {
        let mut s = shape.to_vec();
        let n = s.len();
        s[n - 2] = self.rb;
        s[n - 1] = self.cb;
        s
    }

    /// Index of element `(i, j)`'s scale within one batch's `rb × cb` scales.
    fn block_of(&self, i: usize, j: usize) -> usize {
        (i / self.rows) * self.cb + j / self.cols
    }
}

/// Scale of a block whose largest magnitude is `amax` (finite).
fn block_scale(amax: f32) -> f32 {
    if amax == 0.0 {
        1.0
    } else {
        (amax / E4M3_MAX).max(f32::MIN_POSITIVE)
    }
}

/// `Ok` when output `i` is `dtype[shape]`.
fn check_out(
    op: &str,
    out: &[(TensorType, Vec<usize>)],
    i: usize,
    dtype: DType,
    shape: &[usize],
) -> Result<(), String> {
    match out.get(i) {
        Some((ty, s)) if ty.dtype == dtype && s == shape => Ok(()),
        Some((ty, s)) => Err(format!(
            "{op} output {i} is {}{s:?}, expected {dtype}{shape:?}",
            ty.dtype
        )),
        None => Err(format!("{op}: no type for output {i}")),
    }
}

/// `Err` unless every value is finite (`what` names the operand).
fn check_finite(op: &str, what: &str, v: &[f32]) -> Result<(), String> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(format!("{op}: {what} holds the non-finite value {} at index {i}", v[i])),
    }
}

/// `Err` unless every scale is finite and positive (as `quantize` makes them).
fn check_scales(op: &str, what: &str, s: &[f32]) -> Result<(), String> {
    match s.iter().position(|x| !(x.is_finite() && *x > 0.0)) {
        None => Ok(()),
        Some(i) => Err(format!("{op}: {what} scale {i} is {}, expected finite and > 0", s[i])),
    }
}

/// `Fused::QuantizeFp8`: input `x [.., R, C]` (finite; a NaN or infinity is an error, it would
/// poison its block's scale). Outputs `(q f8e4m3 [.., R, C], scales f32 [.., ceil(R/rows),
/// ceil(C/cols)])` as laid out in the module doc.
pub(super) fn quantize(
    rows: usize,
    cols: usize,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "quantize_fp8";
    arity(OP, args, 1)?;
    let xs = floats(OP, args, 0)?;
    let x = args[0];
    let bl = Blocks::of(OP, &x.shape, rows, cols)?;
    let s_shape = bl.scales_shape(&x.shape);
    check_out(OP, out, 0, DType::F8E4M3, &x.shape)?;
    check_out(OP, out, 1, DType::F32, &s_shape)?;
    check_finite(OP, "the input", xs)?;
    let (per_x, per_s) = (bl.r * bl.c, bl.rb * bl.cb);
    let mut scales = vec![0f32; bl.batch * per_s];
    let mut q = vec![0f32; xs.len()];
    for n in 0..bl.batch {
        let xb = &xs[n * per_x..(n + 1) * per_x];
        let sb = &mut scales[n * per_s..(n + 1) * per_s];
        // amax per block, then its scale
        for (idx, &v) in xb.iter().enumerate() {
            let b = bl.block_of(idx / bl.c, idx % bl.c);
            sb[b] = sb[b].max(v.abs());
        }
        sb.iter_mut().for_each(|s| *s = block_scale(*s));
        // |v / scale| ≤ 448 up to the rounding of the scale; E4M3 rounding saturates at 448
        for (idx, (qv, &v)) in q[n * per_x..(n + 1) * per_x].iter_mut().zip(xb).enumerate() {
            *qv = DType::F8E4M3.round(v / sb[bl.block_of(idx / bl.c, idx % bl.c)]);
        }
    }
    Ok(vec![
        Tensor::from_f32(DType::F8E4M3, x.shape.clone(), q),
        Tensor::from_f32(DType::F32, s_shape, scales),
    ])
}

/// `Fused::DequantizeFp8`: inputs `q f8e4m3 [.., R, C]` and its `scales` (shape checked here:
/// infer does not). Output `q · scale` (one f32 product, exact up to f32 rounding) rounded to `to`.
/// Errors: scales of the wrong shape, non-finite or non-positive scales, non-finite q, `to` not a
/// float.
pub(super) fn dequantize(
    rows: usize,
    cols: usize,
    to: DType,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "dequantize_fp8";
    arity(OP, args, 2)?;
    let (qs, ss) = (floats(OP, args, 0)?, floats(OP, args, 1)?);
    let (q, s) = (args[0], args[1]);
    if !to.is_float() {
        return Err(format!("{OP} to {to}: the result must be a float"));
    }
    let bl = Blocks::of(OP, &q.shape, rows, cols)?;
    let s_shape = bl.scales_shape(&q.shape);
    if s.shape != s_shape {
        return Err(format!(
            "{OP}: scales {} do not fit {} in {rows}x{cols} blocks (expected {s_shape:?})",
            s.type_str(),
            q.type_str()
        ));
    }
    check_out(OP, out, 0, to, &q.shape)?;
    check_finite(OP, "q", qs)?;
    check_scales(OP, "the", ss)?;
    let (per_x, per_s) = (bl.r * bl.c, bl.rb * bl.cb);
    let y = qs
        .iter()
        .enumerate()
        .map(|(idx, &v)| {
            let (n, e) = (idx / per_x, idx % per_x);
            v * ss[n * per_s + bl.block_of(e / bl.c, e % bl.c)]
        })
        .collect();
    Ok(vec![Tensor::from_f32(to, q.shape.clone(), y)])
}

/// `Fused::ScaledMatmulFp8`: inputs `a_q [.., M, K]`, `a_s [.., M, ceil(K/128)]`, `b_q [K, N]`,
/// `b_s [ceil(K/128), ceil(N/128)]` (module doc). Computed as a blockwise FP8 GEMM does: for each
/// 128-wide slice of K, the raw products `Σ a_q · b_q` (f64: exact for E4M3 operands), then that
/// partial sum times `a_s[m, kb] · b_s[kb, n / 128]` added to an f64 accumulator; the result is
/// rounded to `out`. Mathematically `(a_q·a_s) @ (b_q·b_s)`.
pub(super) fn scaled_matmul(
    to: DType,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "scaled_matmul_fp8";
    arity(OP, args, 4)?;
    let (aq, as_, bq, bs) = (
        floats(OP, args, 0)?,
        floats(OP, args, 1)?,
        floats(OP, args, 2)?,
        floats(OP, args, 3)?,
    );
    if !to.is_float() {
        return Err(format!("{OP} to {to}: the result must be a float"));
    }
    let (a, b) = (args[0], args[2]);
    let a_bl = Blocks::of(OP, &a.shape, 1, GEMM_BLOCK)?;
    let b_bl = Blocks::of(OP, &b.shape, GEMM_BLOCK, GEMM_BLOCK)?;
    let (m, k, n) = (a_bl.r, a_bl.c, b_bl.c);
    if b.shape.len() != 2 || b_bl.r != k {
        return Err(format!("{OP} of {} and {}", a.type_str(), b.type_str()));
    }
    for (what, t, want) in [
        ("a", args[1], a_bl.scales_shape(&a.shape)),
        ("b", args[3], b_bl.scales_shape(&b.shape)),
    ] {
        if t.shape != want {
            return Err(format!(
                "{OP}: {what}'s scales {} are not its {} blocks' (expected {want:?})",
                t.type_str(),
                if what == "a" { "1x128" } else { "128x128" }
            ));
        }
    }
    let mut y_shape = a.shape.clone();
    *y_shape.last_mut().unwrap() = n; // rank >= 2: checked by Blocks::of
    check_out(OP, out, 0, to, &y_shape)?;
    check_finite(OP, "a_q", aq)?;
    check_finite(OP, "b_q", bq)?;
    check_scales(OP, "a", as_)?;
    check_scales(OP, "b", bs)?;

    let kb_count = a_bl.cb; // = b_bl.rb: both ceil(K / 128)
    let nb_count = b_bl.cb;
    let mut y = vec![0f32; a_bl.batch * m * n];
    let mut acc = vec![0f64; n];
    let mut partial = vec![0f64; n];
    // one output row per row of a (all batches): y has batch · M rows of N values
    for (row, yr) in y.chunks_exact_mut(n.max(1)).enumerate() {
        let a_row = &aq[row * k..(row + 1) * k];
        let a_scales = &as_[row * kb_count..(row + 1) * kb_count];
        acc.fill(0.0);
        for (kb, &sa) in a_scales.iter().enumerate() {
            // raw FP8 products over this K slice, unscaled, as the MMA accumulates them (here exactly)
            partial.fill(0.0);
            for kk in kb * GEMM_BLOCK..((kb + 1) * GEMM_BLOCK).min(k) {
                let av = f64::from(a_row[kk]);
                for (p, &bv) in partial.iter_mut().zip(&bq[kk * n..(kk + 1) * n]) {
                    *p += av * f64::from(bv);
                }
            }
            // promote: scale the slice's partial sums by both blocks' scales
            let b_scales = &bs[kb * nb_count..(kb + 1) * nb_count];
            for (j, (a_acc, &p)) in acc.iter_mut().zip(&partial).enumerate() {
                *a_acc += p * f64::from(sa) * f64::from(b_scales[j / GEMM_BLOCK]);
            }
        }
        for (o, &v) in yr.iter_mut().zip(&acc) {
            *o = v as f32;
        }
    }
    Ok(vec![Tensor::from_f32(to, y_shape, y)])
}

// ---- producers fused with the quantisation of their output ------------------------------------

/// The concrete type of a producer's intermediate value: `dtype` over `shape`.
fn intermediate(dtype: DType, shape: &[usize]) -> (TensorType, Vec<usize>) {
    let dims = shape.iter().map(|&d| Dim::constant(d as i64)).collect();
    (TensorType::new(dtype, dims), shape.to_vec())
}

/// `promote(a, b)` of two float operands, or why not.
fn promoted(op: &str, a: &Tensor, b: &Tensor) -> Result<DType, String> {
    DType::promote(a.dtype, b.dtype)
        .filter(|d| d.is_float())
        .ok_or_else(|| format!("{op} of {} and {}", a.type_str(), b.type_str()))
}

/// `Fused::RmsNormQuantFp8`: inputs `x [.., R, D]`, `w [D]`; the norm's value in its own dtype
/// (`promote(x, w)`, rounded there as the unfused norm rounds it), then its 1×128 quantisation.
/// Outputs `(q, scales)`.
pub(super) fn rms_norm_quant(
    eps: f64,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "rms_norm_quant_fp8";
    arity(OP, args, 2)?;
    let normed_ty = intermediate(promoted(OP, args[0], args[1])?, &args[0].shape);
    let normed = super::norm::rms_norm(eps, args, &[normed_ty])?;
    quantize(1, GEMM_BLOCK, &[&normed[0]], out)
}

/// `Fused::AddRmsNormQuantFp8`: inputs `h`, `a` (same type), `w`. Outputs
/// `(h + a, q, scales)`: the rounded sum as `AddRmsNorm` makes it, and the 1×128 quantisation
/// of its normalised value (rounded to `promote(h, w)` first).
pub(super) fn add_rms_norm_quant(
    eps: f64,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "add_rms_norm_quant_fp8";
    arity(OP, args, 3)?;
    let (sum_ty, quant_tys) = out.split_first().ok_or_else(|| format!("{OP}: no type for output 0"))?;
    let normed_ty = intermediate(promoted(OP, args[0], args[2])?, &args[0].shape);
    let mut outs = super::norm::add_rms_norm(eps, args, &[sum_ty.clone(), normed_ty])?;
    let normed = outs.pop().ok_or_else(|| format!("{OP}: the norm made no value"))?;
    let sum = outs.pop().ok_or_else(|| format!("{OP}: the add made no value"))?;
    let mut qs = quantize(1, GEMM_BLOCK, &[&normed], quant_tys)?;
    qs.insert(0, sum);
    Ok(qs)
}

/// `Fused::SwiGluQuantFp8`: inputs `g`, `u`; `SwiGlu(g, u)` rounded to `promote(g, u)`, then
/// its 1×128 quantisation. Outputs `(q, scales)`.
pub(super) fn swiglu_quant(args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    const OP: &str = "swiglu_quant_fp8";
    arity(OP, args, 2)?;
    let y_ty = intermediate(promoted(OP, args[0], args[1])?, &args[0].shape);
    let y = super::norm::swiglu(args, &[y_ty])?;
    quantize(1, GEMM_BLOCK, &[&y[0]], out)
}

#[cfg(test)]
mod tests {
    use super::super::norm::harness::*;
    use super::*;
    use crate::fused::Fused;
    use crate::tol::{rel_err, Tol};
    use serde_json::json;

    /// Blockwise quantisation in primitives: pad to whole blocks with zeros (they change no
    /// amax), amax per block, scale = amax / 448, q = cast(x / scale, f8e4m3), crop.
    const QUANTIZE_SRC: &str = r#"
        config R: int;
        config C: int;
        config br: int;
        config bc: int;
        dim n;
        input x: f32[n, R, C];
        let Rp = (R + br - 1) // br * br;
        let Cp = (C + bc - 1) // bc * bc;
        let xc = if Cp > C { concat([x, full(0.0, f32, [n, R, Cp - C])], axis = 2) } else { x };
        let xp = if Rp > R { concat([xc, full(0.0, f32, [n, Rp - R, Cp])], axis = 1) } else { xc };
        let blocks = reshape(xp, [n, Rp // br, br, Cp // bc, bc]);
        let scale = max(abs(blocks), axis = [2, 4], keepdim = true) / 448.0;
        let q = reshape(cast(blocks / scale, f8e4m3), [n, Rp, Cp]);
        output "q" = q[:, 0:R, 0:C];
        output "s" = reshape(scale, [n, Rp // br, Cp // bc]);
    "#;

    #[test]
    fn quantize_matches_the_unfused_graph_and_round_trips() {
        let mut r = rng(21);
        // (shape [n, R, C], block): activation tiles and weight blocks, whole and ragged
        let cases = [
            ([2, 3, 256], (1, 128)),
            ([1, 5, 300], (1, 128)),
            ([1, 256, 128], (128, 128)),
            ([2, 200, 130], (128, 128)),
            ([1, 7, 9], (4, 4)),
        ];
        for (shape, (br, bc)) in cases {
            let x = randn(&mut r, DType::F32, &shape, 2.0);
            let cfg = json!({"R": shape[1], "C": shape[2], "br": br, "bc": bc});
            let want = run_dsl(QUANTIZE_SRC, cfg, &[("x", &x)]);
            let qs = run_fused(Fused::QuantizeFp8 { rows: br, cols: bc }, &[&x]).unwrap();
            let tag = format!("{shape:?} in {br}x{bc}");
            // the same f32 arithmetic on both sides: equal up to f32 rounding
            assert_close(&format!("quantize q {tag}"), &qs[0], &want["q"], Tol::F32);
            assert_close(&format!("quantize scales {tag}"), &qs[1], &want["s"], Tol::F32);

            let y = run_fused(dequantize_op(br, bc, DType::F32), &[&qs[0], &qs[1]]).unwrap();
            assert_close(&format!("quantize→dequantize {tag}"), &y[0], &x, Tol::FP8);
            // quantisation really happened: the round trip is coarser than bf16
            let e = rel_err(y[0].as_f32().unwrap(), x.as_f32().unwrap());
            assert!(e > Tol::BF16.op(), "round trip {tag} lost almost nothing ({e:.2e})");
        }
    }

    /// `DequantizeFp8` of `rows × cols` blocks to `to`.
    fn dequantize_op(rows: usize, cols: usize, to: DType) -> Fused {
        Fused::DequantizeFp8 { rows, cols, to }
    }

    #[test]
    fn weight_blocks_are_orientation_free() {
        // quantising W^T [K, N] equals transposing the quantised W [N, K] and its scales
        let mut r = rng(22);
        let (n, k) = (200, 300);
        let w = randn(&mut r, DType::F32, &[n, k], 0.05);
        let wv = w.as_f32().unwrap();
        let wt = Tensor::from_f32(
            DType::F32,
            vec![k, n],
            (0..k * n).map(|i| wv[(i % n) * k + i / n]).collect(),
        );
        let op = Fused::QuantizeFp8 { rows: 128, cols: 128 };
        let qw = run_fused(op.clone(), &[&w]).unwrap();
        let qwt = run_fused(op, &[&wt]).unwrap();
        let transpose = |t: &Tensor| {
            let (a, b) = (t.shape[0], t.shape[1]);
            let v = t.as_f32().unwrap();
            Tensor::from_f32(
                t.dtype,
                vec![b, a],
                (0..a * b).map(|i| v[(i % a) * b + i / a]).collect(),
            )
        };
        assert_close(
            "quantize(Wᵀ).q vs quantize(W).qᵀ",
            &qwt[0],
            &transpose(&qw[0]),
            Tol::F32,
        );
        assert_close(
            "quantize(Wᵀ).s vs quantize(W).sᵀ",
            &qwt[1],
            &transpose(&qw[1]),
            Tol::F32,
        );
    }

    /// The references of the scaled GEMM in primitives: dequantise both operands by expanding
    /// their scales over the blocks (cropped to the ragged edges), then a plain matmul, in f32 or
    /// bf16; and the unquantised f32 product.
    const SCALED_MATMUL_SRC: &str = r#"
        config M: int;
        config K: int;
        config N: int;
        config deq_dt: str;
        let B = 128;
        let Kb = (K + B - 1) // B;
        let Nb = (N + B - 1) // B;
        let D = dtype(deq_dt);
        dim bt;
        input x: f32[bt, M, K];
        input w: f32[K, N];
        input a_q: f8e4m3[bt, M, K];
        input a_s: f32[bt, M, Kb];
        input b_q: f8e4m3[K, N];
        input b_s: f32[Kb, Nb];
        let sa = reshape(expand(unsqueeze(a_s, -1), [bt, M, Kb, B]), [bt, M, Kb * B])[..., 0:K];
        let sb = reshape(expand(reshape(b_s, [Kb, 1, Nb, 1]), [Kb, B, Nb, B]), [Kb * B, Nb * B])[0:K, 0:N];
        let a = cast(cast(a_q, f32) * sa, D);
        let b = cast(cast(b_q, f32) * sb, D);
        output "dequantized" = a @ b;
        output "exact" = x @ w;
    "#;

    #[test]
    fn scaled_matmul_matches_dequantized_and_unquantized_matmuls() {
        let mut r = rng(23);
        // (batch, M, K, N): K a multiple of 128 and not, N ragged in its blocks
        for (bt, m, k, n) in [(1, 4, 128, 128), (2, 5, 300, 200), (1, 3, 1000, 64), (1, 17, 77, 129)] {
            let x = randn(&mut r, DType::F32, &[bt, m, k], 1.0);
            let w = randn(&mut r, DType::F32, &[k, n], 0.05);
            let qa = run_fused(Fused::QuantizeFp8 { rows: 1, cols: 128 }, &[&x]).unwrap();
            let qb = run_fused(Fused::QuantizeFp8 { rows: 128, cols: 128 }, &[&w]).unwrap();
            for out in [DType::F32, DType::BF16] {
                let cfg = json!({"M": m, "K": k, "N": n, "deq_dt": out.name()});
                let ins = [
                    ("x", &x),
                    ("w", &w),
                    ("a_q", &qa[0]),
                    ("a_s", &qa[1]),
                    ("b_q", &qb[0]),
                    ("b_s", &qb[1]),
                ];
                let want = run_dsl(SCALED_MATMUL_SRC, cfg, &ins);
                let y = run_fused(Fused::ScaledMatmulFp8 { out }, &[&qa[0], &qa[1], &qb[0], &qb[1]]).unwrap();
                let tag = format!("scaled_matmul →{out} [{bt}, {m}, {k}] @ [{k}, {n}]");
                assert_close(&format!("{tag} vs dequantized"), &y[0], &want["dequantized"], tier(out));
                let y32 = Tensor::from_f32(DType::F32, y[0].shape.clone(), y[0].as_f32().unwrap().to_vec());
                assert_close(&format!("{tag} vs unquantized f32"), &y32, &want["exact"], Tol::FP8);
            }
        }
    }

    #[test]
    fn bad_data_is_an_error() {
        let mut r = rng(24);
        let x = randn(&mut r, DType::F32, &[3, 10], 1.0);
        let mut bad = x.clone();
        if let crate::tensor::Data::F32(v) = &mut bad.data {
            v[7] = f32::NAN;
        }
        let e = run_fused(Fused::QuantizeFp8 { rows: 1, cols: 4 }, &[&bad]).unwrap_err();
        assert!(e.contains("non-finite"), "{e}");

        let qs = run_fused(Fused::QuantizeFp8 { rows: 1, cols: 4 }, &[&x]).unwrap();
        // scales of another blocking (infer does not relate them to q)
        let e = run_fused(dequantize_op(2, 4, DType::F32), &[&qs[0], &qs[1]]).unwrap_err();
        assert!(e.contains("do not fit"), "{e}");
        // a result type that cannot hold the values
        let e = run_fused(dequantize_op(1, 4, DType::I64), &[&qs[0], &qs[1]]).unwrap_err();
        assert!(e.contains("dequantize_fp8 of"), "{e}"); // refused by the type check already
                                                         // a non-positive scale
        let mut s = qs[1].clone();
        if let crate::tensor::Data::F32(v) = &mut s.data {
            v[2] = 0.0;
        }
        let e = run_fused(dequantize_op(1, 4, DType::F32), &[&qs[0], &s]).unwrap_err();
        assert!(e.contains("expected finite and > 0"), "{e}");
        // GEMM scales that are not 1x128 / 128x128 blocks
        let w = randn(&mut r, DType::F32, &[10, 5], 1.0);
        let qb = run_fused(Fused::QuantizeFp8 { rows: 128, cols: 128 }, &[&w]).unwrap();
        let e = run_fused(
            Fused::ScaledMatmulFp8 { out: DType::F32 },
            &[&qs[0], &qs[1], &qb[0], &qb[1]],
        )
        .unwrap_err();
        assert!(e.contains("1x128"), "{e}");
    }

    #[test]
    fn fused_producers_equal_their_quantized_output() {
        // RmsNorm / AddRmsNorm / SwiGlu followed by the 1×128 quantisation, as two ops and as one:
        // the same values bit for bit (the intermediate rounded to its dtype in both), in f32 and
        // bf16, with whole and ragged tiles
        let mut r = rng(25);
        let act = activation_quantize();
        for (dt, shape) in [
            (DType::F32, [2, 3, 256]),
            (DType::BF16, [1, 5, 200]),
            (DType::BF16, [2, 1, 64]),
        ] {
            let d = shape[2];
            let tag = format!("{dt}{shape:?}");
            let x = randn(&mut r, dt, &shape, 1.0);
            let a = randn(&mut r, dt, &shape, 1.0);
            let w = randn(&mut r, dt, &[d], 1.0);
            let eps = 1e-6;
            let same = |what: &str, got: &[Tensor], want: &[Tensor]| {
                assert_eq!(got.len(), want.len(), "{what} {tag}");
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert_eq!(g.dtype, w.dtype, "{what} {tag} output {i}");
                    assert_eq!(g.shape, w.shape, "{what} {tag} output {i}");
                    assert_eq!(g.as_f32().unwrap(), w.as_f32().unwrap(), "{what} {tag} output {i}");
                }
            };

            let normed = run_fused(Fused::RmsNorm { eps }, &[&x, &w]).unwrap();
            let want = run_fused(act.clone(), &[&normed[0]]).unwrap();
            let got = run_fused(Fused::RmsNormQuantFp8 { eps }, &[&x, &w]).unwrap();
            same("rms_norm_quant_fp8", &got, &want);
            assert_eq!(got[1].shape, vec![shape[0], shape[1], d.div_ceil(128)]);

            let outs = run_fused(Fused::AddRmsNorm { eps }, &[&x, &a, &w]).unwrap();
            let mut want = vec![outs[0].clone()];
            want.extend(run_fused(act.clone(), &[&outs[1]]).unwrap());
            let got = run_fused(Fused::AddRmsNormQuantFp8 { eps }, &[&x, &a, &w]).unwrap();
            same("add_rms_norm_quant_fp8", &got, &want);

            let y = run_fused(Fused::SwiGlu, &[&x, &a]).unwrap();
            let want = run_fused(act.clone(), &[&y[0]]).unwrap();
            let got = run_fused(Fused::SwiGluQuantFp8, &[&x, &a]).unwrap();
            same("swiglu_quant_fp8", &got, &want);
            // and the quantisation is real: dequantised, it is an FP8-tier copy of the product
            let back = run_fused(dequantize_op(1, 128, DType::F32), &[&got[0], &got[1]]).unwrap();
            let y32 = Tensor::from_f32(DType::F32, y[0].shape.clone(), y[0].as_f32().unwrap().to_vec());
            assert_close(&format!("swiglu_quant_fp8 round trip {tag}"), &back[0], &y32, Tol::FP8);
        }
        // the producers' own type rules still apply
        let x = randn(&mut r, DType::F32, &[1, 2, 8], 1.0);
        let w = randn(&mut r, DType::F32, &[4], 1.0);
        assert!(run_fused(Fused::RmsNormQuantFp8 { eps: 1e-6 }, &[&x, &w]).is_err());
        assert!(run_fused(Fused::SwiGluQuantFp8, &[&x, &w]).is_err());
    }

    #[test]
    fn zero_and_tiny_blocks_have_usable_scales() {
        // an all-zero block, and a block so small that amax / 448 underflows f32
        let mut v = vec![0f32; 2 * 8];
        v[8..].copy_from_slice(&[1e-44, -3e-45, 0.0, 2e-44, 1e-45, 0.0, 0.0, 5e-45]);
        let x = Tensor::from_f32(DType::F32, vec![2, 8], v);
        let qs = run_fused(Fused::QuantizeFp8 { rows: 1, cols: 8 }, &[&x]).unwrap();
        assert_eq!(qs[1].as_f32().unwrap(), &[1.0, f32::MIN_POSITIVE]);
        assert!(all_finite(&qs[0]));
        let y = run_fused(dequantize_op(1, 8, DType::F32), &[&qs[0], &qs[1]]).unwrap();
        assert!(all_finite(&y[0]));
    }
}
