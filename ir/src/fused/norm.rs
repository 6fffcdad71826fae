//! Reference semantics of the normalisation-shaped composite ops: RMSNorm (alone, after a residual
//! add, and per head followed by RoPE), SwiGLU and softmax. See `super::Fused` for each op's contract.
//!
//! Conventions of this folder's reference code (norm, attention, fp8):
//! - statistics, sums and dot products run in f64; elementwise math on stored values in f32/f64;
//! - every output element is rounded once to its dtype (`Tensor::from_f32` rounds), and an
//!   intermediate that the contract places in a narrower dtype (RMSNorm's normalised value, §2.2)
//!   is rounded to it, as the primitive graph that the op replaces does;
//! - NaN and infinities propagate by IEEE arithmetic, as they do through the primitive ops; data
//!   that makes an op meaningless (a query that sees no key, a non-finite value to quantise, a
//!   bad scale) is an `Err`, never a panic.
//!
//! The small operand helpers below (`arity`, `floats`, `ints`, `float_out`) are shared with
//! `attention.rs` and `fp8.rs`.

use crate::dtype::DType;
use crate::graph::TensorType;
use crate::tensor::Tensor;

// ---- operand access -------------------------------------------------------------------------

/// `Err` unless `op` got exactly `n` operands.
pub(super) fn arity(op: &str, args: &[&Tensor], n: usize) -> Result<(), String> {
    if args.len() == n {
        Ok(())
    } else {
        Err(format!("{op} takes {n} operands, got {}", args.len()))
    }
}

/// The values of float operand `i`, checked to hold exactly its shape's element count (so that
/// indexing by shape cannot go out of bounds).
pub(super) fn floats<'t>(op: &str, args: &[&'t Tensor], i: usize) -> Result<&'t [f32], String> {
    let t = args.get(i).ok_or_else(|| format!("{op}: missing operand {i}"))?;
    t.check().map_err(|m| format!("{op} operand {i}: {m}"))?;
    t.as_f32()
        .ok_or_else(|| format!("{op} operand {i} must be a float tensor, got {}", t.type_str()))
}

/// The values of integer operand `i`, checked like [`floats`].
pub(super) fn ints<'t>(op: &str, args: &[&'t Tensor], i: usize) -> Result<&'t [i64], String> {
    let t = args.get(i).ok_or_else(|| format!("{op}: missing operand {i}"))?;
    t.check().map_err(|m| format!("{op} operand {i}: {m}"))?;
    t.as_i64()
        .ok_or_else(|| format!("{op} operand {i} must be an integer tensor, got {}", t.type_str()))
}

/// Dtype and concrete shape of output `i`, which must be a float equal to `want` in shape.
pub(super) fn float_out(op: &str, out: &[(TensorType, Vec<usize>)], i: usize, want: &[usize]) -> Result<DType, String> {
    let (ty, shape) = out.get(i).ok_or_else(|| format!("{op}: no type for output {i}"))?;
    if !ty.dtype.is_float() {
        return Err(format!("{op} output {i} must be a float, got {}", ty.dtype));
    }
    if shape != want {
        return Err(format!("{op} output {i} has shape {shape:?}, expected {want:?}"));
    }
    Ok(ty.dtype)
}

/// `Err` unless the RMSNorm epsilon is a non-negative number.
fn check_eps(op: &str, eps: f64) -> Result<(), String> {
    if eps >= 0.0 && eps.is_finite() {
        Ok(())
    } else {
        Err(format!("{op}: eps must be a finite non-negative number, got {eps}"))
    }
}

/// The length of `x`'s last axis, checked to equal the weight's length.
fn row_len(op: &str, x: &Tensor, w_len: usize) -> Result<usize, String> {
    match x.shape.last() {
        Some(&d) if d == w_len => Ok(d),
        _ => Err(format!("{op}: weight of {w_len} values does not fit {}", x.type_str())),
    }
}

// ---- RMSNorm ----------------------------------------------------------------------------------

/// RMSNorm of each row of `x` (rows of `w.len()` values) into `y` (spec §2.2): mean of squares
/// and `1/sqrt(ms + eps)` in f64, the normalised value rounded to `norm_dtype` (HF casts it back
/// to the input dtype before the weight), then times `w` in f32, rounded to `out_dtype`.
fn rms_rows(x: &[f32], w: &[f32], eps: f64, norm_dtype: DType, out_dtype: DType, y: &mut [f32]) {
    let d = w.len();
    if d == 0 {
        return; // rows of no values: nothing to normalise (x and y are empty too)
    }
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / d as f64;
        let inv_rms = 1.0 / (ms + eps).sqrt();
        for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            let normed = norm_dtype.round((f64::from(xv) * inv_rms) as f32);
            *yv = out_dtype.round(normed * wv);
        }
    }
}

/// `Fused::RmsNorm`: inputs `x [.., D]`, `w [D]`.
pub(super) fn rms_norm(eps: f64, args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    const OP: &str = "rms_norm";
    arity(OP, args, 2)?;
    check_eps(OP, eps)?;
    let (xs, ws) = (floats(OP, args, 0)?, floats(OP, args, 1)?);
    let x = args[0];
    row_len(OP, x, ws.len())?;
    let dtype = float_out(OP, out, 0, &x.shape)?;
    let mut y = vec![0f32; xs.len()];
    rms_rows(xs, ws, eps, x.dtype, dtype, &mut y);
    Ok(vec![Tensor::from_f32(dtype, x.shape.clone(), y)])
}

/// `Fused::AddRmsNorm`: inputs `h`, `a` (same type), `w`; outputs `(s, RmsNorm(s, w))` with
/// `s = h + a` rounded to h's dtype. The norm reads the rounded sum, as the unfused graph does.
pub(super) fn add_rms_norm(
    eps: f64,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "add_rms_norm";
    arity(OP, args, 3)?;
    check_eps(OP, eps)?;
    let (hs, as_, ws) = (floats(OP, args, 0)?, floats(OP, args, 1)?, floats(OP, args, 2)?);
    let h = args[0];
    if args[1].shape != h.shape {
        return Err(format!("{OP} adds {} and {}", h.type_str(), args[1].type_str()));
    }
    row_len(OP, h, ws.len())?;
    let sum_dtype = float_out(OP, out, 0, &h.shape)?;
    let dtype = float_out(OP, out, 1, &h.shape)?;
    let sum: Vec<f32> = hs.iter().zip(as_).map(|(&p, &q)| sum_dtype.round(p + q)).collect();
    let mut y = vec![0f32; sum.len()];
    rms_rows(&sum, ws, eps, sum_dtype, dtype, &mut y);
    Ok(vec![
        Tensor::from_f32(sum_dtype, h.shape.clone(), sum),
        Tensor::from_f32(dtype, h.shape.clone(), y),
    ])
}

/// `Fused::NormMatmul`: inputs `x [.., M, K]`, `b [.., K, N]`, `w [K]`; outputs
/// `RmsNorm(x, w) @ b` (in the promoted dtype) and, when asked for, `RmsNorm(x, w)`.
pub(super) fn norm_matmul(eps: f64, args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    const OP: &str = "norm_matmul";
    arity(OP, args, 3)?;
    let (x, b, w) = (args[0], args[1], args[2]);
    let (c_ty, c_shape) = out.first().ok_or_else(|| format!("{OP}: no type for output 0"))?;
    let n_dtype = match out.get(1) {
        Some(_) => float_out(OP, out, 1, &x.shape)?,
        None => DType::promote(x.dtype, w.dtype).ok_or_else(|| format!("{OP}: {} and {}", x.dtype, w.dtype))?,
    };
    let n_ty = TensorType::new(
        n_dtype,
        x.shape.iter().map(|&d| crate::shape::Dim::constant(d as i64)).collect(),
    );
    let normed = rms_norm(eps, &[x, w], &[(n_ty, x.shape.clone())])?.remove(0);
    let c = crate::interp::matmul(&normed, b, c_ty.dtype, c_shape)?;
    let mut outs = vec![c];
    if out.len() > 1 {
        outs.push(normed);
    }
    Ok(outs)
}

// ---- SwiGLU and softmax -----------------------------------------------------------------------

/// `1 / (1 + e^-x)` without overflow: never the exponential of a large positive number.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `Fused::SwiGlu`: `g · sigmoid(g) · u` in f64, rounded once to the output dtype.
pub(super) fn swiglu(args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    const OP: &str = "swiglu";
    arity(OP, args, 2)?;
    let (gs, us) = (floats(OP, args, 0)?, floats(OP, args, 1)?);
    let g = args[0];
    if args[1].shape != g.shape {
        return Err(format!("{OP} of {} and {}", g.type_str(), args[1].type_str()));
    }
    let dtype = float_out(OP, out, 0, &g.shape)?;
    // The same rounding points as the primitives it replaces (`g · sigmoid(g)` in g's dtype,
    // then `· u`): in bf16 a single final rounding drifts by an ulp per element, and through the
    // MoE router such drifts turn into different experts.
    let gd = g.dtype;
    let y = gs
        .iter()
        .zip(us)
        .map(|(&a, &b)| {
            let s = gd.round(sigmoid(f64::from(a)) as f32);
            gd.round(a * s) * b
        })
        .collect();
    Ok(vec![Tensor::from_f32(dtype, g.shape.clone(), y)])
}

/// `Fused::Softmax` along the last axis: `exp(x − max) / Σ exp(x − max)` with the exponentials
/// and the sum in f64. A row holding NaN or +inf, or only -inf, gives NaN (as the unfused graph).
pub(super) fn softmax(args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    const OP: &str = "softmax";
    arity(OP, args, 1)?;
    let xs = floats(OP, args, 0)?;
    let x = args[0];
    let n = *x.shape.last().ok_or_else(|| format!("{OP} of a scalar"))?;
    let dtype = float_out(OP, out, 0, &x.shape)?;
    let mut y = vec![0f32; xs.len()];
    if n > 0 {
        let mut e = vec![0f64; n];
        for (xr, yr) in xs.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            // NaN-propagating max (f64::max would skip a NaN)
            let m = xr.iter().fold(f64::NEG_INFINITY, |m, &v| {
                let v = f64::from(v);
                if m.is_nan() || v.is_nan() {
                    f64::NAN
                } else {
                    m.max(v)
                }
            });
            for (ev, &xv) in e.iter_mut().zip(xr) {
                *ev = (f64::from(xv) - m).exp(); // ≤ 1: the max subtracted, no overflow
            }
            let sum: f64 = e.iter().sum(); // ≥ 1 for a finite row: the max contributes exp(0)
            for (yv, &ev) in yr.iter_mut().zip(&e) {
                *yv = (ev / sum) as f32;
            }
        }
    }
    Ok(vec![Tensor::from_f32(dtype, x.shape.clone(), y)])
}

// ---- QK-norm + RoPE ---------------------------------------------------------------------------

/// `Fused::QkNormRope`: inputs `x [.., seq, heads, d]`, `w [d]` (every head's weight) or
/// `[heads, d]` (one weight per head: the q and k heads of a layer normed in one kernel, each
/// with its own weight), `pos [seq]` (ints), `inv_freq [rotary/2]`. Per head, RMSNorm with its
/// weight (its result rounded to the output dtype, as
/// RmsNorm's output is), then NeoX ("rotate half") RoPE on the first `rotary` dims (spec §2.5):
/// with `h = rotary/2` and angle `a_i = f32(pos) · inv_freq[i]` computed in f32 (as the model's
/// `rope` does), `y[i] = x[i]·cos a_i − x[h+i]·sin a_i`, `y[h+i] = x[h+i]·cos a_i + x[i]·sin a_i`,
/// the dims from `rotary` on unchanged; rounded to the output dtype.
pub(super) fn qk_norm_rope(
    eps: f64,
    rotary: usize,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "qk_norm_rope";
    arity(OP, args, 4)?;
    check_eps(OP, eps)?;
    let (xs, ws, pos, inv) = (
        floats(OP, args, 0)?,
        floats(OP, args, 1)?,
        ints(OP, args, 2)?,
        floats(OP, args, 3)?,
    );
    let x = args[0];
    let r = x.shape.len();
    if r < 3 {
        return Err(format!("{OP} needs x [.., seq, heads, d], got {}", x.type_str()));
    }
    let (seq, heads) = (x.shape[r - 3], x.shape[r - 2]);
    let per_head = args[1].shape.len() == 2;
    let d = if per_head {
        if args[1].shape[0] != heads {
            return Err(format!(
                "{OP}: weight {} does not fit {}",
                args[1].type_str(),
                x.type_str()
            ));
        }
        row_len(OP, x, args[1].shape[1])?
    } else {
        row_len(OP, x, ws.len())?
    };
    if !rotary.is_multiple_of(2) || rotary > d {
        return Err(format!(
            "{OP}: rotary dims {rotary} must be even and at most the head dim {d}"
        ));
    }
    let half = rotary / 2;
    if pos.len() != seq || inv.len() != half {
        return Err(format!(
            "{OP}: {} positions and {} inverse frequencies for seq {seq} and rotary {rotary}",
            pos.len(),
            inv.len()
        ));
    }
    let dtype = float_out(OP, out, 0, &x.shape)?;
    let mut y = vec![0f32; xs.len()];
    if per_head {
        // row `i` is head `i % heads`: the same arithmetic as `[d]`, with that head's weight
        for (i, (xr, yr)) in xs.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            let h = i % heads;
            rms_rows(xr, &ws[h * d..(h + 1) * d], eps, x.dtype, dtype, yr);
        }
    } else {
        rms_rows(xs, ws, eps, x.dtype, dtype, &mut y);
    }
    if y.is_empty() || half == 0 {
        return Ok(vec![Tensor::from_f32(dtype, x.shape.clone(), y)]);
    }
    // cos/sin tables [seq, half] of the f32 angles
    let (mut cos, mut sin) = (Vec::with_capacity(seq * half), Vec::with_capacity(seq * half));
    for &p in pos {
        for &f in inv {
            let angle = p as f32 * f;
            cos.push(f64::from(angle.cos()));
            sin.push(f64::from(angle.sin()));
        }
    }
    // rows of d values in [.., seq, heads] order: row `i` is token `(i / heads) % seq`
    for (i, row) in y.chunks_exact_mut(d).enumerate() {
        let t = (i / heads) % seq;
        let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        let (x1, rest) = row.split_at_mut(half);
        let x2 = &mut rest[..half];
        for j in 0..half {
            let (a, b) = (f64::from(x1[j]), f64::from(x2[j]));
            x1[j] = dtype.round((a * c[j] - b * s[j]) as f32);
            x2[j] = dtype.round((b * c[j] + a * s[j]) as f32);
        }
    }
    Ok(vec![Tensor::from_f32(dtype, x.shape.clone(), y)])
}

// ---- test harness (shared with attention.rs and fp8.rs) ----------------------------------------

/// What the tests of the composite ops share: seeded random tensors, evaluation of a fused op
/// through a one-node graph and the interpreter, evaluation of a DSL program (the unfused
/// reference), and comparison within a `Tol` tier.
#[cfg(test)]
pub(super) mod harness {
    use crate::dsl::elaborate;
    use crate::dtype::DType;
    use crate::fused::Fused;
    use crate::graph::Graph;
    use crate::interp::{Interpreter, ParamSource};
    use crate::op::{InputKind, Op};
    use crate::param::ParamSpec;
    use crate::shape::Dim;
    use crate::tensor::Tensor;
    use crate::tol::{self, Tol};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};
    use std::collections::HashMap;

    struct NoParams;
    impl ParamSource for NoParams {
        fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
            Err(format!("no parameter `{}`", spec.name))
        }
    }

    pub fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// `n` normal values of standard deviation `std`, none of them zero after rounding to
    /// `dtype` (so that no test is vacuous: an all-zero row or fp8 block would pass trivially).
    pub fn normal(r: &mut ChaCha8Rng, dtype: DType, n: usize, std: f32) -> Vec<f32> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let x: f32 = StandardNormal.sample(r);
            let x = dtype.round(x * std);
            if x != 0.0 {
                v.push(x);
            }
        }
        v
    }

    /// A `dtype` tensor of normal values of standard deviation `std` (never zero).
    pub fn randn(r: &mut ChaCha8Rng, dtype: DType, shape: &[usize], std: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_f32(dtype, shape.to_vec(), normal(r, dtype, n, std))
    }

    pub fn i64s(data: Vec<i64>) -> Tensor {
        Tensor::from_i64(DType::I64, vec![data.len()], data)
    }

    /// Evaluates `f` on `args` through a one-node graph (inputs `a0`, `a1`, ...) with the
    /// interpreter, so that `Fused::infer` and the interpreter's `Op::Fused` hook are exercised.
    /// Returns the outputs in port order, or the interpreter's error as text.
    pub fn run_fused(f: Fused, args: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        let mut g = Graph::new();
        let mut ins = Vec::new();
        let mut feed = HashMap::new();
        for (i, t) in args.iter().enumerate() {
            let name = format!("a{i}");
            let shape = t.shape.iter().map(|&s| Dim::constant(s as i64)).collect();
            let op = Op::Input {
                name: name.clone(),
                kind: InputKind::Data,
                dtype: t.dtype,
                shape,
            };
            ins.push(g.add1(op, &[], None).map_err(|e| e.to_string())?);
            feed.insert(name, (*t).clone());
        }
        let outs = g.add(Op::Fused(f), &ins, None).map_err(|e| e.to_string())?;
        for (p, &v) in outs.iter().enumerate() {
            g.add_output(&format!("o{p}"), v, InputKind::Data);
        }
        let it = Interpreter::new(&g, &NoParams).map_err(|e| e.to_string())?;
        let mut res = it.run(&feed).map_err(|e| e.to_string())?;
        Ok((0..outs.len()).map(|p| res.remove(&format!("o{p}")).unwrap()).collect())
    }

    /// Elaborates the DSL program `src` against `config` and runs it on `inputs`: the unfused
    /// reference. Returns the outputs by name; panics (a test failure) on any error.
    pub fn run_dsl(src: &str, config: serde_json::Value, inputs: &[(&str, &Tensor)]) -> HashMap<String, Tensor> {
        let m = elaborate("ref.ring", src, &config).unwrap_or_else(|e| panic!("{e}"));
        let it = Interpreter::new(&m.graph, &NoParams).unwrap_or_else(|e| panic!("{e}"));
        let feed = inputs.iter().map(|(k, t)| (k.to_string(), (*t).clone())).collect();
        it.run(&feed).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The tolerance tier of a float dtype (f16 is held to the bf16 tier).
    pub fn tier(dtype: DType) -> Tol {
        match dtype {
            DType::F32 => Tol::F32,
            DType::BF16 | DType::F16 => Tol::BF16,
            _ => Tol::FP8,
        }
    }

    /// The loosest tier of `dtypes`: that of a result computed through the narrowest of them (the
    /// unfused graph rounds intermediates to its operands' dtypes, the fused op only its result).
    pub fn loosest(dtypes: &[DType]) -> Tol {
        dtypes
            .iter()
            .map(|&d| tier(d))
            .max_by(|a, b| a.op().total_cmp(&b.op()))
            .unwrap_or(Tol::F32)
    }

    /// Checks `got` against the oracle `want`: same dtype and shape, values within `tol.op()`.
    /// Prints and returns the measured error.
    pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: Tol) -> f64 {
        assert_eq!(
            (got.dtype, &got.shape),
            (want.dtype, &want.shape),
            "{what}: type {} vs {}",
            got.type_str(),
            want.type_str()
        );
        let (a, b) = (got.as_f32().unwrap(), want.as_f32().unwrap());
        let e = tol::check(what, a, b, tol.op()).unwrap_or_else(|m| panic!("{m}"));
        println!("{what}: rel err {e:.2e} (bound {:.0e})", tol.op());
        e
    }

    /// True when every value is a number (no NaN, no infinity).
    pub fn all_finite(t: &Tensor) -> bool {
        t.as_f32().unwrap().iter().all(|v| v.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::harness::*;
    use crate::dtype::DType;
    use crate::fused::Fused;
    use crate::tensor::Tensor;
    use serde_json::json;

    const RMS_NORM_SRC: &str = r#"
        config D: int;
        config eps: float;
        config xdt: str;
        config wdt: str;
        let X = dtype(xdt);
        let W = dtype(wdt);
        dim b, s;
        input x: X[b, s, D];
        input w: W[D];
        input h: X[b, s, D];
        # §2.2, as models/ring_linear.ring writes it
        fn rms_norm(x, w) {
            let xf = cast(x, f32);
            let n = xf * rsqrt(mean(xf * xf, axis = -1, keepdim = true) + eps);
            cast(n, dtype_of(x)) * w
        }
        output "y" = rms_norm(x, w);
        let s = h + x;
        output "sum" = s;
        output "y_sum" = rms_norm(s, w);
    "#;

    #[test]
    fn rms_norm_and_add_rms_norm_match_the_unfused_graph() {
        let mut r = rng(1);
        let eps = 1e-6;
        let cases = [
            (DType::F32, DType::F32, [2, 3, 64]),
            (DType::F32, DType::F32, [1, 5, 7]),
            (DType::BF16, DType::BF16, [2, 4, 130]),
            (DType::BF16, DType::BF16, [1, 1, 2048]),
            (DType::BF16, DType::F32, [3, 2, 96]),
            (DType::F16, DType::F16, [1, 3, 33]),
        ];
        for (xdt, wdt, shape) in cases {
            let d = shape[2];
            let x = randn(&mut r, xdt, &shape, 1.5);
            let h = randn(&mut r, xdt, &shape, 3.0);
            // weights around 1, as trained norms are
            let w = Tensor::from_f32(
                wdt,
                vec![d],
                normal(&mut r, wdt, d, 0.3).iter().map(|v| 1.0 + v).collect(),
            );
            let cfg = json!({"D": d, "eps": eps, "xdt": xdt.name(), "wdt": wdt.name()});
            let want = run_dsl(RMS_NORM_SRC, cfg, &[("x", &x), ("w", &w), ("h", &h)]);
            let tag = format!("{xdt}·{wdt} {shape:?}");

            let y = run_fused(Fused::RmsNorm { eps }, &[&x, &w]).unwrap();
            assert_close(&format!("rms_norm {tag}"), &y[0], &want["y"], tier(y[0].dtype));

            let ys = run_fused(Fused::AddRmsNorm { eps }, &[&h, &x, &w]).unwrap();
            assert_close(&format!("add_rms_norm sum {tag}"), &ys[0], &want["sum"], tier(xdt));
            assert_close(
                &format!("add_rms_norm norm {tag}"),
                &ys[1],
                &want["y_sum"],
                tier(ys[1].dtype),
            );
        }
    }

    #[test]
    fn norm_matmul_matches_the_unfused_graph() {
        // the norm of x times a weight matrix, in the weight's dtype (the router's f32 GEMM of
        // bf16 rows included), and the normalised rows (`y`) as the second output
        let src = format!(
            "{RMS_NORM_SRC}
            config bdt: str;
            let B = dtype(bdt);
            input m: B[D, 24];
            output \"c\" = cast(rms_norm(x, w), B) @ m;"
        );
        let mut r = rng(7);
        for (xdt, bdt, shape) in [
            (DType::BF16, DType::BF16, [3, 1, 256]),
            (DType::BF16, DType::F32, [2, 1, 130]),
            (DType::F32, DType::F32, [1, 4, 64]),
        ] {
            let d = shape[2];
            let x = randn(&mut r, xdt, &shape, 2.0);
            let w = Tensor::from_f32(
                xdt,
                vec![d],
                normal(&mut r, xdt, d, 0.3).iter().map(|v| 1.0 + v).collect(),
            );
            let m = randn(&mut r, bdt, &[d, 24], 0.1);
            let cfg = json!({"D": d, "eps": 1e-6, "xdt": xdt.name(), "wdt": xdt.name(), "bdt": bdt.name()});
            let want = run_dsl(&src, cfg, &[("x", &x), ("w", &w), ("h", &x), ("m", &m)]);
            let tag = format!("{xdt}·{bdt} {shape:?}");
            let run = |emit_norm| run_fused(Fused::NormMatmul { eps: 1e-6, emit_norm }, &[&x, &m, &w]).unwrap();
            let (got, one) = (run(true), run(false));
            assert_eq!((got.len(), one.len()), (2, 1));
            assert_close(&format!("norm_matmul {tag}"), &got[0], &want["c"], tier(got[0].dtype));
            let rows = format!("norm_matmul rows {tag}");
            assert_close(&rows, &got[1], &want["y"], tier(got[1].dtype));
            assert_eq!(one[0].to_f64_vec(), got[0].to_f64_vec());
        }
    }

    #[test]
    fn swiglu_matches_the_unfused_graph() {
        let src = r#"
            config gdt: str;
            config udt: str;
            let G = dtype(gdt);
            let U = dtype(udt);
            dim n, f;
            input g: G[n, f];
            input u: U[n, f];
            fn silu(x) { x * sigmoid(x) }
            output "y" = silu(g) * u;
        "#;
        let mut r = rng(2);
        for (dt_g, dt_u, shape) in [
            (DType::F32, DType::F32, [4, 96]),
            (DType::F32, DType::F32, [3, 17]),
            (DType::BF16, DType::BF16, [5, 257]),
            (DType::BF16, DType::F32, [2, 64]),
        ] {
            // a wide spread of gate values: deep in both tails of the sigmoid
            let g = randn(&mut r, dt_g, &shape, 4.0);
            let u = randn(&mut r, dt_u, &shape, 1.0);
            let want = run_dsl(
                src,
                json!({"gdt": dt_g.name(), "udt": dt_u.name()}),
                &[("g", &g), ("u", &u)],
            );
            let y = run_fused(Fused::SwiGlu, &[&g, &u]).unwrap();
            // silu(g) is rounded to g's dtype in the unfused graph, not in the fused op
            let tol = loosest(&[dt_g, dt_u]);
            assert_close(&format!("swiglu {dt_g}·{dt_u} {shape:?}"), &y[0], &want["y"], tol);
        }
    }

    const SOFTMAX_SRC: &str = r#"
        config xdt: str;
        let X = dtype(xdt);
        dim n, c;
        input x: X[n, c];
        fn softmax(x, axis) {
            let m = max(x, axis = axis, keepdim = true);
            let e = exp(x - m);
            e / sum(e, axis = axis, keepdim = true)
        }
        output "y" = softmax(x, -1);
    "#;

    #[test]
    fn softmax_matches_the_unfused_graph() {
        let mut r = rng(3);
        for (dt, shape, std) in [
            (DType::F32, [4, 10], 1.0),
            (DType::F32, [3, 1], 1.0),
            (DType::F32, [2, 129], 8.0),
            (DType::BF16, [6, 50], 3.0),
            (DType::BF16, [1, 1000], 3.0),
        ] {
            let x = randn(&mut r, dt, &shape, std);
            let want = run_dsl(SOFTMAX_SRC, json!({"xdt": dt.name()}), &[("x", &x)]);
            let y = run_fused(Fused::Softmax, &[&x]).unwrap();
            assert_close(&format!("softmax {dt} {shape:?}"), &y[0], &want["y"], tier(dt));
        }
    }

    #[test]
    fn extreme_magnitudes_give_no_nan() {
        let mut r = rng(4);
        // softmax of logits near the f32 range's ends: max-subtraction keeps it finite
        for std in [1e4f32, 1e30, 1e38] {
            let mut x = randn(&mut r, DType::F32, &[4, 33], std);
            if let crate::tensor::Data::F32(v) = &mut x.data {
                v.iter_mut().for_each(|e| *e = e.clamp(-f32::MAX, f32::MAX));
                v[0] = f32::MAX; // both ends of the range in one tensor
                v[1] = -f32::MAX;
            }
            let y = run_fused(Fused::Softmax, &[&x]).unwrap();
            assert!(
                all_finite(&y[0]),
                "softmax of magnitudes {std:e} gave a non-finite value"
            );
            let want = run_dsl(SOFTMAX_SRC, json!({"xdt": "f32"}), &[("x", &x)]);
            assert_close(&format!("softmax extreme {std:e}"), &y[0], &want["y"], tier(DType::F32));
        }
        // RMSNorm of values whose squares overflow f32: the f64 statistics keep it finite, and
        // it is scale invariant (eps negligible), so it equals the norm of the unscaled values.
        let x = randn(&mut r, DType::F32, &[3, 40], 1.0);
        let w = randn(&mut r, DType::F32, &[40], 1.0);
        let big = Tensor::from_f32(
            DType::F32,
            x.shape.clone(),
            x.as_f32().unwrap().iter().map(|v| v * 1e30).collect(),
        );
        let y_big = run_fused(Fused::RmsNorm { eps: 1e-6 }, &[&big, &w]).unwrap();
        let y = run_fused(Fused::RmsNorm { eps: 1e-6 }, &[&x, &w]).unwrap();
        assert!(all_finite(&y_big[0]));
        assert_close("rms_norm of 1e30-scaled values", &y_big[0], &y[0], tier(DType::F32));
    }

    const ROPE_SRC: &str = r#"
        config D: int;
        config r: int;
        config eps: float;
        config rope_theta: float;
        config xdt: str;
        let X = dtype(xdt);
        dim b, s, nh;
        input x: X[b, s, nh, D];
        input w: X[D];
        input pos: i64[s];
        fn rms_norm(x, w) {
            let xf = cast(x, f32);
            let n = xf * rsqrt(mean(xf * xf, axis = -1, keepdim = true) + eps);
            cast(n, dtype_of(x)) * w
        }
        let h = r // 2;
        let inv_freq = pow(rope_theta, -2.0 * cast(arange(h), f32) / r);        # [h]
        # §2.5 as models/ring_linear.ring's `rope`: NeoX rotate-half on the first r dims, in f32
        fn rope(x) {
            let ang = cast(reshape(pos, [s, 1]), f32) * reshape(inv_freq, [1, h]);  # [s, h]
            let c = reshape(cos(ang), [s, 1, h]);
            let sn = reshape(sin(ang), [s, 1, h]);
            let xf = cast(x, f32);
            let x1 = xf[..., 0:h];
            let x2 = xf[..., h:r];
            let y1 = x1 * c - x2 * sn;
            let y2 = x2 * c + x1 * sn;
            let out = if r < D { concat([y1, y2, xf[..., r:]], axis = -1) } else { concat([y1, y2], axis = -1) };
            cast(out, dtype_of(x))
        }
        output "inv_freq" = inv_freq;
        output "y" = rope(rms_norm(x, w));
    "#;

    #[test]
    fn qk_norm_rope_with_a_weight_per_head_equals_one_op_per_weight() {
        // q's 3 heads and k's 2 heads in one op with weights [5, d]: each part equals its own op
        let mut r = rng(9);
        for dt in [DType::F32, DType::BF16] {
            let (b, s, d, rot) = (2, 4, 16, 8);
            let q = randn(&mut r, dt, &[b, s, 3, d], 2.0);
            let k = randn(&mut r, dt, &[b, s, 2, d], 2.0);
            let wq = randn(&mut r, dt, &[d], 1.0);
            let wk = randn(&mut r, dt, &[d], 1.0);
            let pos = i64s((7..7 + s as i64).collect());
            let inv = Tensor::from_f32(DType::F32, vec![rot / 2], vec![1.0, 0.1, 0.01, 0.001]);
            let f = Fused::QkNormRope { eps: 1e-6, rotary: rot };
            let yq = run_fused(f.clone(), &[&q, &wq, &pos, &inv]).unwrap().remove(0);
            let yk = run_fused(f.clone(), &[&k, &wk, &pos, &inv]).unwrap().remove(0);
            // x [b, s, 5, d]: per token, q's heads then k's
            let (qv, kv) = (q.as_f32().unwrap(), k.as_f32().unwrap());
            let mut xv = Vec::new();
            for t in 0..b * s {
                xv.extend_from_slice(&qv[t * 3 * d..(t + 1) * 3 * d]);
                xv.extend_from_slice(&kv[t * 2 * d..(t + 1) * 2 * d]);
            }
            let x = Tensor::from_f32(dt, vec![b, s, 5, d], xv);
            let mut wv = Vec::new();
            for h in 0..5 {
                wv.extend_from_slice(if h < 3 {
                    wq.as_f32().unwrap()
                } else {
                    wk.as_f32().unwrap()
                });
            }
            let w = Tensor::from_f32(dt, vec![5, d], wv);
            let y = run_fused(f.clone(), &[&x, &w, &pos, &inv]).unwrap().remove(0);
            let (yv, yqv, ykv) = (y.as_f32().unwrap(), yq.as_f32().unwrap(), yk.as_f32().unwrap());
            for t in 0..b * s {
                assert_eq!(
                    &yv[t * 5 * d..t * 5 * d + 3 * d],
                    &yqv[t * 3 * d..(t + 1) * 3 * d],
                    "{dt}"
                );
                assert_eq!(
                    &yv[t * 5 * d + 3 * d..(t + 1) * 5 * d],
                    &ykv[t * 2 * d..(t + 1) * 2 * d],
                    "{dt}"
                );
            }
            // a weight for another head count is refused
            let w4 = Tensor::from_f32(dt, vec![4, d], vec![1.0; 4 * d]);
            assert!(run_fused(f, &[&x, &w4, &pos, &inv]).is_err());
        }
    }

    #[test]
    fn qk_norm_rope_matches_the_unfused_graph() {
        let mut r = rng(5);
        let eps = 1e-6;
        // (dtype, batch, seq, heads, d, rotary, past): rotary < d and = d, prefill from 0,
        // prefill after a cached prefix, decode at a large position
        let cases = [
            (DType::F32, 2, 5, 3, 16, 8, 0),
            (DType::F32, 1, 7, 2, 12, 12, 3),
            (DType::F32, 1, 1, 4, 32, 16, 70_000),
            (DType::BF16, 2, 9, 4, 128, 64, 0),
            (DType::BF16, 1, 3, 2, 64, 64, 1021),
            (DType::BF16, 1, 1, 2, 128, 64, 4093),
        ];
        for (dt, b, s, nh, d, rot, past) in cases {
            let x = randn(&mut r, dt, &[b, s, nh, d], 2.0);
            let w = Tensor::from_f32(
                dt,
                vec![d],
                normal(&mut r, dt, d, 0.3).iter().map(|v| 1.0 + v).collect(),
            );
            let pos = i64s((past..past + s as i64).collect());
            let cfg = json!({"D": d, "r": rot, "eps": eps, "rope_theta": 10000.0, "xdt": dt.name()});
            let want = run_dsl(ROPE_SRC, cfg, &[("x", &x), ("w", &w), ("pos", &pos)]);
            let inv = &want["inv_freq"];
            let y = run_fused(Fused::QkNormRope { eps, rotary: rot }, &[&x, &w, &pos, inv]).unwrap();
            let tag = format!("qk_norm_rope {dt} [{b}, {s}, {nh}, {d}] rotary {rot} past {past}");
            assert_close(&tag, &y[0], &want["y"], tier(dt));
        }
    }

    #[test]
    fn bad_attributes_are_errors() {
        let mut r = rng(6);
        let x = randn(&mut r, DType::F32, &[1, 2, 2, 8], 1.0);
        let w = randn(&mut r, DType::F32, &[8], 1.0);
        let pos = i64s(vec![0, 1]);
        // an odd rotary count cannot be split in halves (infer only sees inv_freq's length)
        let inv = randn(&mut r, DType::F32, &[1], 1.0);
        let e = run_fused(Fused::QkNormRope { eps: 1e-6, rotary: 3 }, &[&x, &w, &pos, &inv]).unwrap_err();
        assert!(e.contains("must be even"), "{e}");
        // more rotary dims than the head has
        let inv = randn(&mut r, DType::F32, &[5], 1.0);
        let e = run_fused(Fused::QkNormRope { eps: 1e-6, rotary: 10 }, &[&x, &w, &pos, &inv]).unwrap_err();
        assert!(e.contains("at most the head"), "{e}");
        let e = run_fused(Fused::RmsNorm { eps: -1.0 }, &[&x, &w]).unwrap_err();
        assert!(e.contains("eps"), "{e}");
    }
}
