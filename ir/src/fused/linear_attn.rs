//! Reference semantics of the lightning-attention composites (see `super::Fused` for each op's
//! contract): the decayed outer-product recurrence of spec §2.4.4 in its chunked form (§4.3) and
//! token by token (§4.2), and the group RMSNorm with sigmoid output gate of §2.4.5.
//!
//! Everything is computed in f64 and rounded once to the output's dtype.

use crate::graph::TensorType;
use crate::tensor::Tensor;

/// The float data of operand `name` of `op`, after checking the tensor's invariants.
pub(super) fn floats<'t>(op: &str, name: &str, t: &'t Tensor) -> Result<&'t [f32], String> {
    t.check().map_err(|m| format!("{op}: operand `{name}`: {m}"))?;
    t.as_f32()
        .ok_or_else(|| format!("{op}: operand `{name}` must be a float, got {}", t.type_str()))
}

/// Output tensor `ty` (a float type with its concrete shape) holding `data`, rounded to the dtype.
pub(super) fn float_tensor(op: &str, ty: &(TensorType, Vec<usize>), data: Vec<f32>) -> Result<Tensor, String> {
    let (ty, shape) = ty;
    if !ty.dtype.is_float() || shape.iter().product::<usize>() != data.len() {
        return Err(format!(
            "{op}: internal: {} values for an output of type {ty} = {shape:?}",
            data.len()
        ));
    }
    Ok(Tensor::from_f32(ty.dtype, shape.clone(), data))
}

/// `out` must describe exactly the given output shapes.
pub(super) fn expect_outputs(op: &str, out: &[(TensorType, Vec<usize>)], shapes: &[&[usize]]) -> Result<(), String> {
    let got: Vec<&[usize]> = out.iter().map(|(_, s)| s.as_slice()).collect();
    if got != shapes {
        return Err(format!("{op}: internal: outputs {got:?}, expected {shapes:?}"));
    }
    Ok(())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += a · x`
fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `[λ^0, λ^1, ..., λ^n]`
fn powers(lam: f64, n: usize) -> Vec<f64> {
    std::iter::successors(Some(1.0), |p| Some(p * lam))
        .take(n + 1)
        .collect()
}

/// The operands of a lightning op: `s0 [b, H, d, d]`, `q, k, v [b, T, H, d]`, `lam [H, 1, 1]`,
/// checked against each other.
struct Lightning<'a> {
    op: &'static str,
    s0: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    lam: &'a [f32],
    /// batch, tokens, heads, head dim
    b: usize,
    t: usize,
    h: usize,
    d: usize,
}

impl<'a> Lightning<'a> {
    fn new(op: &'static str, args: &[&'a Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Self, String> {
        let &[s0, q, k, v, lam] = args else {
            return Err(format!("{op} takes 5 operands, got {}", args.len()));
        };
        let &[b, t, h, d] = q.shape.as_slice() else {
            return Err(format!("{op}: q must be [b, T, H, d], got {}", q.type_str()));
        };
        if k.shape != q.shape || v.shape != q.shape {
            return Err(format!(
                "{op}: q {}, k {}, v {} differ",
                q.type_str(),
                k.type_str(),
                v.type_str()
            ));
        }
        if s0.shape != [b, h, d, d] {
            return Err(format!("{op}: state {} does not fit q {}", s0.type_str(), q.type_str()));
        }
        if lam.shape != [h, 1, 1] {
            return Err(format!("{op}: decay {} must be [{h}, 1, 1]", lam.type_str()));
        }
        expect_outputs(op, out, &[&s0.shape, &q.shape])?;
        Ok(Lightning {
            op,
            s0: floats(op, "s0", s0)?,
            q: floats(op, "q", q)?,
            k: floats(op, "k", k)?,
            v: floats(op, "v", v)?,
            lam: floats(op, "lam", lam)?,
            b,
            t,
            h,
            d,
        })
    }

    /// The tokens of `x [b, T, H, d]` for batch `bi`, head `hi`, as a row-major `T × d` matrix.
    fn head(&self, x: &[f32], bi: usize, hi: usize) -> Vec<f64> {
        let (t, h, d) = (self.t, self.h, self.d);
        (0..t)
            .flat_map(|ti| {
                let at = ((bi * t + ti) * h + hi) * d;
                x[at..at + d].iter().map(|&e| f64::from(e))
            })
            .collect()
    }

    /// Runs `step(λ, q, k, v, S)` for every (batch, head): it returns that head's `T × d`
    /// output and leaves the final state in `S` (which holds the incoming state `s0`).
    /// Assembles `(s_T, o)`.
    fn run(
        &self,
        out: &[(TensorType, Vec<usize>)],
        mut step: impl FnMut(f64, &[f64], &[f64], &[f64], &mut [f64]) -> Vec<f64>,
    ) -> Result<Vec<Tensor>, String> {
        let (t, h, d) = (self.t, self.h, self.d);
        let mut s_out = vec![0f32; self.s0.len()];
        let mut o_out = vec![0f32; self.q.len()];
        for bi in 0..self.b {
            for hi in 0..h {
                let block = (bi * h + hi) * d * d..(bi * h + hi + 1) * d * d;
                let mut s: Vec<f64> = self.s0[block.clone()].iter().map(|&e| f64::from(e)).collect();
                let (q, k, v) = (
                    self.head(self.q, bi, hi),
                    self.head(self.k, bi, hi),
                    self.head(self.v, bi, hi),
                );
                let o = step(f64::from(self.lam[hi]), &q, &k, &v, &mut s);
                for (dst, &src) in s_out[block].iter_mut().zip(&s) {
                    *dst = src as f32;
                }
                for ti in 0..t {
                    let at = ((bi * t + ti) * h + hi) * d;
                    for (dst, &src) in o_out[at..at + d].iter_mut().zip(&o[ti * d..(ti + 1) * d]) {
                        *dst = src as f32;
                    }
                }
            }
        }
        Ok(vec![
            float_tensor(self.op, &out[0], s_out)?,
            float_tensor(self.op, &out[1], o_out)?,
        ])
    }
}

/// `LinearAttnChunk`: the chunked form of spec §4.3 for every (batch, head).
pub(super) fn chunked(chunk: usize, args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    let la = Lightning::new("linear_attn_chunk", args, out)?;
    if chunk == 0 {
        return Err("linear_attn_chunk: the chunk size must be positive".into());
    }
    let (t, d) = (la.t, la.d);
    la.run(out, |lam, q, k, v, s| chunked_head(chunk, (t, d), lam, q, k, v, s))
}

/// One head in chunks of `chunk` tokens (the last one may be shorter). `q, k, v` are `T × d`,
/// `s` the `d × d` state: the incoming one on entry, the final one on return. Returns `o`.
///
/// For chunk `n` of `c` tokens, rows `i, j ∈ [0, c)`:
/// `O = ((Q Kᵀ) ⊙ M) V + diag(λ^{i+1}) Q S` with `M_ij = λ^{i−j}` for `i ≥ j`, else 0;
/// then `S ← λ^c S + (diag(λ^{c−1−j}) K)ᵀ V`. The mask is applied as whole powers of λ, never
/// factored into `λ^i · λ^{−j}`, so strong decay cannot overflow.
fn chunked_head(
    chunk: usize,
    (t, d): (usize, usize),
    lam: f64,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: &mut [f64],
) -> Vec<f64> {
    let mut o = vec![0f64; t * d];
    let row = |i: usize| i * d..(i + 1) * d;
    for start in (0..t).step_by(chunk) {
        let c = chunk.min(t - start);
        let pow = powers(lam, c);
        for i in 0..c {
            let qi = &q[row(start + i)];
            let oi = &mut o[row(start + i)];
            // inter-chunk: λ^{i+1} q_i S_{n−1}
            for (x, &qx) in qi.iter().enumerate() {
                axpy(pow[i + 1] * qx, &s[x * d..(x + 1) * d], oi);
            }
            // intra-chunk: Σ_{j ≤ i} λ^{i−j} (q_i · k_j) v_j
            for j in 0..=i {
                let a = pow[i - j] * dot(qi, &k[row(start + j)]);
                axpy(a, &v[row(start + j)], oi);
            }
        }
        // S_n = λ^c S_{n−1} + Σ_j λ^{c−1−j} k_jᵀ v_j
        s.iter_mut().for_each(|e| *e *= pow[c]);
        for j in 0..c {
            let (kj, vj) = (&k[row(start + j)], &v[row(start + j)]);
            for (x, &kx) in kj.iter().enumerate() {
                axpy(pow[c - 1 - j] * kx, vj, &mut s[x * d..(x + 1) * d]);
            }
        }
    }
    o
}

/// `LinearAttnStep`: the token recurrence `S_t = λ S_{t−1} + k_tᵀ v_t`, `o_t = q_t S_t`.
pub(super) fn stepwise(args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    let la = Lightning::new("linear_attn_step", args, out)?;
    let (t, d) = (la.t, la.d);
    la.run(out, |lam, q, k, v, s| {
        let mut o = vec![0f64; t * d];
        for ti in 0..t {
            let tok = ti * d..(ti + 1) * d;
            let (qt, kt, vt) = (&q[tok.clone()], &k[tok.clone()], &v[tok.clone()]);
            let oi = &mut o[tok];
            for (x, &kx) in kt.iter().enumerate() {
                let sx = &mut s[x * d..(x + 1) * d];
                sx.iter_mut().for_each(|e| *e *= lam);
                axpy(kx, vt, sx);
            }
            for (x, &qx) in qt.iter().enumerate() {
                axpy(qx, &s[x * d..(x + 1) * d], oi);
            }
        }
        o
    })
}

/// `GroupNormGate`: for every token, the `H·d` channels of `o` split into `groups` contiguous
/// groups, each divided by its RMS (`sqrt(mean(o²) + eps)`), then times `w` and `sigmoid(g)`.
pub(super) fn group_norm_gate(
    groups: usize,
    eps: f64,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let op = "group_norm_gate";
    let &[o, w, g] = args else {
        return Err(format!("{op} takes 3 operands, got {}", args.len()));
    };
    let &[b, s, h, d] = o.shape.as_slice() else {
        return Err(format!("{op}: o must be [b, s, H, d], got {}", o.type_str()));
    };
    let width = h * d;
    if groups == 0 || width % groups != 0 {
        return Err(format!("{op}: {groups} groups do not divide {width} channels"));
    }
    if w.shape != [width] || g.shape != [b, s, width] {
        return Err(format!(
            "{op}: w {} and g {} do not fit o {}",
            w.type_str(),
            g.type_str(),
            o.type_str()
        ));
    }
    expect_outputs(op, out, &[&g.shape])?;
    let (ov, wv, gv) = (floats(op, "o", o)?, floats(op, "w", w)?, floats(op, "g", g)?);
    let n = width / groups;
    let mut y = Vec::with_capacity(ov.len());
    for r in 0..b * s {
        for gi in 0..groups {
            let chans = gi * n..(gi + 1) * n;
            let at = r * width;
            let xs = &ov[at + chans.start..at + chans.end];
            let ms = xs.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / n as f64;
            let inv_rms = 1.0 / (ms + eps).sqrt();
            for (c, &x) in chans.zip(xs) {
                let gate = sigmoid(f64::from(gv[at + c]));
                y.push((f64::from(x) * inv_rms * f64::from(wv[c]) * gate) as f32);
            }
        }
    }
    Ok(vec![float_tensor(op, &out[0], y)?])
}

/// `LinearAttnGate`: the recurrence (`chunked` or `stepwise`), then `group_norm_gate` of its
/// `o` (kept in f32, as the unfused pair stores it) with `w` and `g`.
pub(super) fn gated(
    chunk: Option<usize>,
    groups: usize,
    eps: f64,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let op = "linear_attn_gate";
    let (&[s0, q, k, v, lam, w, g], [s_ty, y_ty]) = (args, out) else {
        return Err(format!(
            "{op} takes 7 operands and 2 outputs, got {} and {}",
            args.len(),
            out.len()
        ));
    };
    // the raw o [b, T, H, d] in f32, with q's concrete shape
    let dims = q.shape.iter().map(|&n| crate::shape::Dim::constant(n as i64)).collect();
    let o_ty = (TensorType::new(crate::DType::F32, dims), q.shape.clone());
    let scan_out = [s_ty.clone(), o_ty];
    let scan_args = [s0, q, k, v, lam];
    let mut so = match chunk {
        Some(c) => chunked(c, &scan_args, &scan_out)?,
        None => stepwise(&scan_args, &scan_out)?,
    };
    let o = so.pop().ok_or("linear_attn_gate: internal: no o")?;
    let y = group_norm_gate(groups, eps, &[&o, w, g], std::slice::from_ref(y_ty))?;
    so.extend(y);
    Ok(so)
}

/// `LinearAttnQkGate`: q and k made from their raw rows by `QkNormRope` (q then times `scale`,
/// an f32 product as the model's `q * scale`), then the gated step.
pub(super) fn qk_gated(
    (groups, eps): (usize, f64),
    (qk_eps, rotary, scale): (f64, usize, f64),
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let op = "linear_attn_step_qk_gate";
    let &[s0, qr, kr, v, lam, w, g, qw, kw, pos, inv] = args else {
        return Err(format!("{op} takes 11 operands, got {}", args.len()));
    };
    let rope = super::Fused::QkNormRope { eps: qk_eps, rotary };
    let normed = |x: &Tensor, wt: &Tensor| -> Result<Tensor, String> {
        let dims = x.shape.iter().map(|&n| crate::shape::Dim::constant(n as i64)).collect();
        let ty = (TensorType::new(crate::DType::F32, dims), x.shape.clone());
        rope.eval(&[x, wt, pos, inv], std::slice::from_ref(&ty))?
            .pop()
            .ok_or_else(|| format!("{op}: internal: no normed rows"))
    };
    let q = normed(qr, qw)?;
    let k = normed(kr, kw)?;
    let sc = scale as f32;
    let qs: Vec<f32> = q
        .as_f32()
        .ok_or_else(|| format!("{op}: q is not f32"))?
        .iter()
        .map(|&x| x * sc)
        .collect();
    let q = Tensor::from_f32(crate::DType::F32, q.shape.clone(), qs);
    gated(None, groups, eps, &[s0, &q, &k, v, lam, w, g], out)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
pub(super) mod test_support {
    //! Shared by the tests of `linear_attn` and `moe`: seeded random data, graphs of fused ops
    //! run by the interpreter, DSL programs (the unfused formulation) run by the interpreter, and
    //! the tolerance check.

    use crate::dsl::elaborate;
    use crate::graph::{Graph, IrError, Value};
    use crate::interp::{Interpreter, ParamSource};
    use crate::op::{InputKind, Op};
    use crate::shape::Dim;
    use crate::tensor::Tensor;
    use crate::tol::{check, Tol};
    use crate::{DType, ParamSpec};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashMap;

    pub fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// `n` values in `scale · ±[0.1, 2)`: never zero, random sign.
    pub fn nonzero(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let m = r.random_range(0.1f32..2.0) * scale;
                if r.random_bool(0.5) {
                    m
                } else {
                    -m
                }
            })
            .collect()
    }

    /// A random non-zero tensor of `dtype`.
    pub fn random(r: &mut ChaCha8Rng, dtype: DType, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_f32(dtype, shape.to_vec(), nonzero(r, n, scale))
    }

    /// Parameters by (pattern) name.
    pub struct Params(pub HashMap<String, Tensor>);

    impl ParamSource for Params {
        fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
            self.0
                .get(&spec.name)
                .cloned()
                .ok_or_else(|| format!("no parameter {}", spec.name))
        }
    }

    /// A graph with one input per entry of `inputs` (of its exact type) and the nodes `build`
    /// adds; the values `build` returns become outputs `out0`, `out1`, ..., returned in order.
    pub fn run_graph(
        inputs: &[(&str, &Tensor)],
        build: impl FnOnce(&mut Graph, &[Value]) -> Result<Vec<Value>, IrError>,
    ) -> Result<Vec<Tensor>, IrError> {
        let mut g = Graph::new();
        let mut vals = Vec::new();
        for (name, t) in inputs {
            let op = Op::Input {
                name: name.to_string(),
                kind: InputKind::Data,
                dtype: t.dtype,
                shape: t.shape.iter().map(|&d| Dim::constant(d as i64)).collect(),
            };
            vals.push(g.add1(op, &[], None)?);
        }
        let outs = build(&mut g, &vals)?;
        for (i, v) in outs.iter().enumerate() {
            g.add_output(&format!("out{i}"), *v, InputKind::Data);
        }
        let feed = inputs.iter().map(|(n, t)| (n.to_string(), (*t).clone())).collect();
        let mut res = Interpreter::new(&g, &Params(HashMap::new()))?.run(&feed)?;
        Ok((0..outs.len())
            .map(|i| res.remove(&format!("out{i}")).unwrap())
            .collect())
    }

    /// One node of `op` over all of `inputs`, in order.
    pub fn run_op(op: Op, inputs: &[(&str, &Tensor)]) -> Result<Vec<Tensor>, IrError> {
        run_graph(inputs, |g, vals| g.add(op, vals, None))
    }

    /// Elaborates `src` against `config` and runs it; returns every output by name.
    pub fn run_dsl(
        src: &str,
        config: serde_json::Value,
        inputs: &[(&str, &Tensor)],
        params: HashMap<String, Tensor>,
    ) -> HashMap<String, Tensor> {
        let m = elaborate("test.ring", src, &config).unwrap_or_else(|e| panic!("{e}"));
        let it = Interpreter::new(&m.graph, &Params(params)).unwrap_or_else(|e| panic!("{e}"));
        let feed = inputs.iter().map(|(n, t)| (n.to_string(), (*t).clone())).collect();
        it.run(&feed).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Checks `got` against the reference `want` in `tol`'s op tier; prints and returns the error.
    pub fn compare(what: &str, got: &Tensor, want: &Tensor, tol: Tol) -> f64 {
        assert_eq!(got.shape, want.shape, "{what}: shapes");
        assert_eq!(got.dtype, want.dtype, "{what}: dtypes");
        let (a, b) = (got.as_f32().unwrap(), want.as_f32().unwrap());
        let e = check(what, a, b, tol.op()).unwrap_or_else(|m| panic!("{m}"));
        eprintln!("{what}: relative error {e:.2e} (bound {:.0e})", tol.op());
        e
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use crate::fused::Fused;
    use crate::op::Op;
    use crate::tensor::Tensor;
    use crate::tol::Tol;
    use crate::DType;
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashMap;

    /// ring_linear.ring's `lightning`, verbatim: the unfused scan.
    const LIGHTNING: &str = r#"
        config num_attention_heads: int;
        config head_dim: int;
        let H = num_attention_heads;
        let d = head_dim;
        dim batch, seq;
        input q: f32[batch, seq, H, d];
        input k: f32[batch, seq, H, d];
        input v: f32[batch, seq, H, d];
        input lam: f32[H, 1, 1];
        input s0: f32[batch, H, d, d];

        fn lightning(q, k, v, lam, s0) {
            scan (s = s0; qt in q, kt in k, vt in v; axis = 1) {
                let s_new = lam * s + unsqueeze(kt, -1) * unsqueeze(vt, -2);
                let o = squeeze(unsqueeze(qt, -2) @ s_new, -2);
                (s_new, o)
            }
        }

        let (s1, o) = lightning(q, k, v, lam, s0);
    "#;

    /// `LIGHTNING` with its two results as outputs.
    fn lightning_program() -> String {
        format!("{LIGHTNING}\noutput \"s\" = s1;\noutput \"o\" = o;")
    }

    /// Random lightning operands `(s0, q, k, v, lam)` with the given per-head decays.
    fn lightning_inputs(r: &mut ChaCha8Rng, b: usize, t: usize, d: usize, lams: &[f32]) -> Vec<Tensor> {
        let h = lams.len();
        let f32t = |r: &mut ChaCha8Rng, shape: &[usize], scale| random(r, DType::F32, shape, scale);
        let qscale = (d as f32).powf(-0.5); // q arrives pre-scaled, as in linear_attention
        vec![
            f32t(r, &[b, h, d, d], 1.0),
            f32t(r, &[b, t, h, d], qscale),
            f32t(r, &[b, t, h, d], 1.0),
            f32t(r, &[b, t, h, d], 1.0),
            Tensor::from_f32(DType::F32, vec![h, 1, 1], lams.to_vec()),
        ]
    }

    const NAMES: [&str; 5] = ["s0", "q", "k", "v", "lam"];

    fn named(ts: &[Tensor]) -> Vec<(&str, &Tensor)> {
        NAMES.iter().copied().zip(ts).collect()
    }

    /// The scan's `(s_T, o)`.
    fn scan_reference(ins: &[Tensor]) -> (Tensor, Tensor) {
        let (h, d) = (ins[0].shape[1], ins[0].shape[2]);
        let cfg = serde_json::json!({"num_attention_heads": h, "head_dim": d});
        let mut out = run_dsl(&lightning_program(), cfg, &named(ins), HashMap::new());
        (out.remove("s").unwrap(), out.remove("o").unwrap())
    }

    fn fused(op: Fused, ins: &[Tensor]) -> (Tensor, Tensor) {
        let mut out = run_op(Op::Fused(op), &named(ins)).unwrap_or_else(|e| panic!("{e}"));
        let o = out.pop().unwrap();
        (out.pop().unwrap(), o)
    }

    const STRONG: [f32; 3] = [0.3, 0.25, 0.35];
    const WEAK: [f32; 3] = [0.999, 0.9995, 0.998];

    /// λ of layer 0 of the tiny config (4 heads): `exp(−2^{−2(h+1)} · (1 + 1e−5))`, §2.4.4.
    fn alibi() -> Vec<f32> {
        (0..4)
            .map(|h| (-(2f64.powi(-2 * (h + 1))) * (1.0 + 1e-5)).exp() as f32)
            .collect()
    }

    #[test]
    fn fused_chunked_matches_the_scan() {
        let alibi = alibi();
        let cases: &[(usize, usize, usize, usize, &[f32])] = &[
            // (batch, T, d, chunk, λ per head)
            (2, 37, 8, 16, &STRONG),
            (2, 37, 8, 16, &WEAK),
            (2, 37, 8, 64, &STRONG),
            (2, 37, 8, 64, &WEAK),
            (2, 1, 8, 16, &STRONG),
            (2, 1, 8, 16, &WEAK),
            (1, 32, 8, 16, &WEAK),
            (1, 37, 8, 1, &STRONG),
            (1, 37, 16, 5, &alibi),
            (1, 130, 16, 64, &WEAK),
            (1, 0, 8, 16, &STRONG),
        ];
        for (n, &(b, t, d, chunk, lams)) in cases.iter().enumerate() {
            let ins = lightning_inputs(&mut rng(100 + n as u64), b, t, d, lams);
            let (s_ref, o_ref) = scan_reference(&ins);
            let (s, o) = fused(Fused::LinearAttnChunk { chunk }, &ins);
            let what = format!("chunk {chunk}, b {b}, T {t}, d {d}, λ {lams:?}");
            compare(&format!("chunked o ({what})"), &o, &o_ref, Tol::F32);
            compare(&format!("chunked s_T ({what})"), &s, &s_ref, Tol::F32);
        }
    }

    #[test]
    fn fused_step_matches_the_scan() {
        let alibi = alibi();
        let cases: &[(usize, usize, usize, &[f32])] = &[
            (2, 37, 8, &STRONG),
            (2, 37, 8, &WEAK),
            (2, 1, 8, &STRONG),
            (2, 1, 8, &WEAK),
            (1, 5, 16, &alibi),
        ];
        for (n, &(b, t, d, lams)) in cases.iter().enumerate() {
            let ins = lightning_inputs(&mut rng(200 + n as u64), b, t, d, lams);
            let (s_ref, o_ref) = scan_reference(&ins);
            let (s, o) = fused(Fused::LinearAttnStep, &ins);
            let what = format!("b {b}, T {t}, d {d}, λ {lams:?}");
            compare(&format!("step o ({what})"), &o, &o_ref, Tol::F32);
            compare(&format!("step s_T ({what})"), &s, &s_ref, Tol::F32);
        }
    }

    /// Tokens `from..to` of `x [b, T, H, d]`.
    fn tokens(x: &Tensor, from: usize, to: usize) -> Tensor {
        let (b, t, rest) = (x.shape[0], x.shape[1], x.shape[2] * x.shape[3]);
        let v = x.as_f32().unwrap();
        let data = (0..b).flat_map(|bi| v[(bi * t + from) * rest..(bi * t + to) * rest].iter().copied());
        Tensor::from_f32(x.dtype, vec![b, to - from, x.shape[2], x.shape[3]], data.collect())
    }

    #[test]
    fn chunked_prefill_then_decode_steps_match_the_scan_over_all_tokens() {
        let (b, t, prefill, d) = (2, 37, 30, 8);
        for (n, lams) in [&STRONG, &WEAK].into_iter().enumerate() {
            let ins = lightning_inputs(&mut rng(300 + n as u64), b, t, d, lams);
            let (s_ref, o_ref) = scan_reference(&ins);
            let part = |from, to, s: &Tensor| {
                vec![
                    s.clone(),
                    tokens(&ins[1], from, to),
                    tokens(&ins[2], from, to),
                    tokens(&ins[3], from, to),
                    ins[4].clone(),
                ]
            };
            let (mut s, o) = fused(Fused::LinearAttnChunk { chunk: 16 }, &part(0, prefill, &ins[0]));
            let (h, d) = (o.shape[2], o.shape[3]);
            let mut os = vec![o];
            for tok in prefill..t {
                let (s1, o1) = fused(Fused::LinearAttnStep, &part(tok, tok + 1, &s));
                s = s1;
                os.push(o1);
            }
            // reassemble o [b, T, H, d] from the pieces
            let mut all = Vec::new();
            for bi in 0..b {
                for piece in &os {
                    let len = piece.shape[1] * h * d;
                    all.extend_from_slice(&piece.as_f32().unwrap()[bi * len..(bi + 1) * len]);
                }
            }
            let o = Tensor::from_f32(DType::F32, vec![b, t, h, d], all);
            compare(&format!("prefill 30 + 7 steps o (λ {lams:?})"), &o, &o_ref, Tol::F32);
            compare(&format!("prefill 30 + 7 steps s (λ {lams:?})"), &s, &s_ref, Tol::F32);
        }
    }

    #[test]
    fn zero_chunk_is_an_error() {
        let ins = lightning_inputs(&mut rng(7), 1, 3, 4, &STRONG);
        let e = run_op(Op::Fused(Fused::LinearAttnChunk { chunk: 0 }), &named(&ins)).unwrap_err();
        assert!(e.to_string().contains("chunk size must be positive"), "{e}");
    }

    /// ring_linear.ring's group norm and gate (§2.4.5), from `linear_attention`; `g` is the gate's
    /// f32 pre-activation `cast(x @ transpose(w_g), f32)`.
    const GROUP_NORM_GATE: &str = r#"
        config num_attention_heads: int;
        config head_dim: int;
        config group_norm_size: int;
        config rms_norm_eps: float;
        config torch_dtype: str;
        let H = num_attention_heads;
        let d = head_dim;
        let eps = rms_norm_eps;
        let dt = dtype(torch_dtype);
        dim batch, seq;
        input o: f32[batch, seq, H, d];
        input g_norm: dt[H * d];
        input g: f32[batch, seq, H * d];

        let og = reshape(o, [batch, seq, group_norm_size, H * d // group_norm_size]);
        let og = og * rsqrt(mean(og * og, axis = -1, keepdim = true) + eps);
        let y = reshape(og, [batch, seq, H * d]) * g_norm;
        let gate = sigmoid(g);
        output "y" = y * gate;
    "#;

    #[test]
    fn fused_group_norm_gate_matches_the_dsl() {
        let eps = 1e-6;
        // (batch, seq, H, d, groups, weight dtype)
        let cases = [
            (2, 3, 4, 8, 1, DType::F32),
            (2, 3, 4, 8, 2, DType::F32),
            (1, 5, 4, 16, 4, DType::BF16),
            (1, 7, 3, 8, 3, DType::F32),
            (2, 1, 4, 8, 8, DType::BF16),
        ];
        for (n, (b, s, h, d, groups, wdt)) in cases.into_iter().enumerate() {
            let mut r = rng(400 + n as u64);
            let o = random(&mut r, DType::F32, &[b, s, h, d], 1.0);
            let w = random(&mut r, wdt, &[h * d], 1.0);
            let g = random(&mut r, DType::F32, &[b, s, h * d], 2.0);
            let cfg = serde_json::json!({
                "num_attention_heads": h, "head_dim": d, "group_norm_size": groups,
                "rms_norm_eps": eps, "torch_dtype": wdt.name(),
            });
            let ins = [("o", &o), ("g_norm", &w), ("g", &g)];
            let want = run_dsl(GROUP_NORM_GATE, cfg, &ins, HashMap::new()).remove("y").unwrap();
            let got = run_op(Op::Fused(Fused::GroupNormGate { groups, eps }), &ins)
                .unwrap_or_else(|e| panic!("{e}"))
                .remove(0);
            compare(
                &format!("group_norm_gate (b {b}, s {s}, H {h}, d {d}, {groups} groups, w {wdt})"),
                &got,
                &want,
                Tol::F32,
            );
        }
    }

    /// `LIGHTNING` followed by §2.4.5's group norm and gate of its `o`: outputs `s` and `y`.
    fn lightning_gate_program() -> String {
        format!(
            "{LIGHTNING}
            config group_norm_size: int;
            config rms_norm_eps: float;
            input g_norm: f32[H * d];
            input g: f32[batch, seq, H * d];
            let og = reshape(o, [batch, seq, group_norm_size, H * d // group_norm_size]);
            let og = og * rsqrt(mean(og * og, axis = -1, keepdim = true) + rms_norm_eps);
            let y = reshape(og, [batch, seq, H * d]) * g_norm;
            output \"s\" = s1;
            output \"y\" = y * sigmoid(g);"
        )
    }

    #[test]
    fn fused_gated_lightning_matches_the_scan_then_the_gate() {
        let eps = 1e-6;
        // (batch, T, d, groups, λ per head, chunk: None = token recurrence)
        type Case<'a> = (usize, usize, usize, usize, &'a [f32], Option<usize>);
        let cases: &[Case] = &[
            (2, 1, 8, 3, &STRONG, None),
            (2, 5, 8, 1, &WEAK, None),
            (2, 37, 8, 3, &WEAK, Some(16)),
            (1, 19, 16, 1, &STRONG, Some(8)),
        ];
        for (n, &(b, t, d, groups, lams, chunk)) in cases.iter().enumerate() {
            let mut r = rng(500 + n as u64);
            let ins = lightning_inputs(&mut r, b, t, d, lams);
            let h = lams.len();
            let w = random(&mut r, DType::F32, &[h * d], 1.0);
            let g = random(&mut r, DType::F32, &[b, t, h * d], 2.0);
            let cfg = serde_json::json!({
                "num_attention_heads": h, "head_dim": d, "group_norm_size": groups, "rms_norm_eps": eps,
            });
            let mut named_all = named(&ins);
            named_all.push(("g_norm", &w));
            named_all.push(("g", &g));
            let mut want = run_dsl(&lightning_gate_program(), cfg, &named_all, HashMap::new());
            let mut got = run_op(Op::Fused(Fused::LinearAttnGate { chunk, groups, eps }), &named_all)
                .unwrap_or_else(|e| panic!("{e}"));
            let what = format!("b {b}, T {t}, d {d}, {groups} groups, chunk {chunk:?}");
            assert_eq!(got[1].shape, vec![b, t, h * d], "{what}");
            compare(
                &format!("gated y ({what})"),
                &got.remove(1),
                &want.remove("y").unwrap(),
                Tol::F32,
            );
            compare(
                &format!("gated s_T ({what})"),
                &got.remove(0),
                &want.remove("s").unwrap(),
                Tol::F32,
            );
        }
    }

    /// The decode step with q and k made in the op equals `QkNormRope` of each, q times the
    /// scale, then the gated step; q's weight is one row for every head, k's one per head.
    #[test]
    fn the_qk_gated_step_equals_the_norms_the_rotation_and_the_gated_step() {
        let (eps, qk_eps, rotary) = (1e-6, 1e-5, 6);
        for (n, &(b, t, d, groups)) in [(2usize, 1usize, 8usize, 3usize), (1, 3, 16, 1)].iter().enumerate() {
            let mut r = rng(900 + n as u64);
            let ins = lightning_inputs(&mut r, b, t, d, &STRONG);
            let h = STRONG.len();
            let qr = random(&mut r, DType::F32, &[b, t, h, d], 2.0);
            let kr = random(&mut r, DType::F32, &[b, t, h, d], 2.0);
            let qw = random(&mut r, DType::BF16, &[d], 1.0);
            let kw = random(&mut r, DType::BF16, &[h, d], 1.0);
            let pos = Tensor::from_i64(DType::I64, vec![t], (40..40 + t as i64).collect());
            let inv = random(&mut r, DType::F32, &[rotary / 2], 0.5);
            let w = random(&mut r, DType::F32, &[h * d], 1.0);
            let g = random(&mut r, DType::F32, &[b, t, h * d], 2.0);
            let scale = f64::from((d as f32).powf(-0.5));
            let rope = |x: &Tensor, wt: &Tensor| {
                let f = Fused::QkNormRope { eps: qk_eps, rotary };
                let named = [("x", x), ("w", wt), ("pos", &pos), ("inv", &inv)];
                run_op(Op::Fused(f), &named).unwrap().remove(0)
            };
            let q = rope(&qr, &qw);
            let q = Tensor::from_f32(
                DType::F32,
                q.shape.clone(),
                q.as_f32().unwrap().iter().map(|&x| x * scale as f32).collect(),
            );
            let k = rope(&kr, &kw);
            let gate = Fused::LinearAttnGate {
                chunk: None,
                groups,
                eps,
            };
            let step = [
                ("s0", &ins[0]),
                ("q", &q),
                ("k", &k),
                ("v", &ins[3]),
                ("lam", &ins[4]),
                ("w", &w),
                ("g", &g),
            ];
            let want = run_op(Op::Fused(gate), &step).unwrap();
            let f = Fused::LinearAttnQkGate {
                groups,
                eps,
                qk_eps,
                rotary,
                scale,
            };
            let all = [
                ("s0", &ins[0]),
                ("qr", &qr),
                ("kr", &kr),
                ("v", &ins[3]),
                ("lam", &ins[4]),
                ("w", &w),
                ("g", &g),
                ("qw", &qw),
                ("kw", &kw),
                ("pos", &pos),
                ("inv", &inv),
            ];
            let got = run_op(Op::Fused(f.clone()), &all).unwrap();
            // the same arithmetic in the same order: equal, not merely close
            assert_eq!(got, want, "b {b}, T {t}, d {d}");
            // q in bf16 is refused: the step's q is f32
            let q16 = random(&mut r, DType::BF16, &[b, t, h, d], 1.0);
            let mut bad = all;
            bad[1] = ("qr", &q16);
            let e = run_op(Op::Fused(f), &bad).unwrap_err();
            assert!(e.to_string().contains("must be f32"), "{e}");
        }
    }
}
