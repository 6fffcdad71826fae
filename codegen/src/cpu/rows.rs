//! Host drivers of the generated row kernels (`vector.rs`) for the row-wise templates
//! (RMSNorm, add + RMSNorm, softmax, QK-norm + RoPE, group-norm gate), causal GQA attention and
//! the lightning linear-attention recurrence. Each driver cuts its template into independent
//! rows (or (batch, head) blocks), spreads them over the threads with [`ParFor`], and runs
//! every element's arithmetic in the generated kernels; the host only computes addresses and
//! per-row scalars (`1/sqrt(ms + eps)`, the softmax max subtraction, `1/Σ`).
//!
//! Semantics and rounding points are `ir::fused`'s (norm.rs, attention.rs, linear_attn.rs), in
//! f32 arithmetic where the reference uses f64 (the f32 tier).

use super::vector::VecKernels;
use super::ParFor;
use ir::DType;

/// A shared output that threads write disjoint parts of.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
impl Out {
    fn at(&self, i: usize) -> *mut f32 {
        // SAFETY (callers): `i` is inside the output the pointer was made from.
        unsafe { self.0.add(i) }
    }
}

/// The rounding code of the generated kernels for float dtype `d` (f32 for any other).
pub(crate) fn code(d: DType) -> i64 {
    super::vector::round_code(d).unwrap_or(0)
}

fn check(what: &str, got: usize, want: usize) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: {got} elements, expected {want}"))
    }
}

fn inv_rms(ss: f32, n: usize, eps: f64) -> f32 {
    (1.0 / (f64::from(ss) / n as f64 + eps).sqrt()) as f32
}

/// Row-wise RMSNorm of rows of `d` values; the weight of row `r` is `w[(r % w_rows)·d..]`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(
    vk: &VecKernels,
    x: &[f32],
    w: &[f32],
    d: usize,
    eps: f64,
    (norm_dt, out_dt): (DType, DType),
    y: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    check("rms_norm output", y.len(), x.len())?;
    if d == 0 || x.is_empty() {
        return Ok(());
    }
    let w_rows = w.len() / d;
    check("rms_norm weight", w.len(), w_rows.max(1) * d)?;
    let rows = x.len() / d;
    let out = Out(y.as_mut_ptr());
    let (rn, ro) = (code(norm_dt), code(out_dt));
    par.run(rows, &|lo, hi| {
        for r in lo..hi {
            let xr = x[r * d..].as_ptr();
            let wr = w[(r % w_rows) * d..].as_ptr();
            // SAFETY: rows of d elements inside x, w and y (checked above).
            unsafe {
                let ss = (vk.dot)(d as i64, xr, xr);
                (vk.rms)(d as i64, xr, wr, out.at(r * d), inv_rms(ss, d, eps), rn, ro);
            }
        }
    });
    Ok(())
}

/// `s = round(h + a)`, `y = RmsNorm(s)`.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    vk: &VecKernels,
    (h, a, w): (&[f32], &[f32], &[f32]),
    d: usize,
    eps: f64,
    (sum_dt, out_dt): (DType, DType),
    s: &mut [f32],
    y: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    check("add_rms_norm addend", a.len(), h.len())?;
    check("add_rms_norm sum", s.len(), h.len())?;
    check("add_rms_norm output", y.len(), h.len())?;
    check("add_rms_norm weight", w.len(), d)?;
    if d == 0 || h.is_empty() {
        return Ok(());
    }
    let rows = h.len() / d;
    let (so, yo) = (Out(s.as_mut_ptr()), Out(y.as_mut_ptr()));
    let (rs, ro) = (code(sum_dt), code(out_dt));
    par.run(rows, &|lo, hi| {
        for r in lo..hi {
            let at = r * d;
            // SAFETY: rows of d elements inside every operand (checked above).
            unsafe {
                (vk.add)(d as i64, h[at..].as_ptr(), a[at..].as_ptr(), so.at(at), rs);
                let sr = so.at(at) as *const f32;
                let ss = (vk.dot)(d as i64, sr, sr);
                (vk.rms)(d as i64, sr, w.as_ptr(), yo.at(at), inv_rms(ss, d, eps), rs, ro);
            }
        }
    });
    Ok(())
}

/// Softmax along rows of `n` values (f32 result; the caller rounds to the output dtype).
pub fn softmax(vk: &VecKernels, x: &[f32], n: usize, y: &mut [f32], par: &dyn ParFor) -> Result<(), String> {
    check("softmax output", y.len(), x.len())?;
    if n == 0 || x.is_empty() {
        return Ok(());
    }
    let out = Out(y.as_mut_ptr());
    par.run(x.len() / n, &|lo, hi| {
        for r in lo..hi {
            let xr = x[r * n..].as_ptr();
            // SAFETY: rows of n elements inside x and y.
            unsafe {
                let m = (vk.maxv)(n as i64, xr);
                let yr = out.at(r * n);
                let l = (vk.exp)(n as i64, xr, yr, 1.0, -m);
                (vk.axpby)(n as i64, yr, yr, 0.0, 1.0 / l);
            }
        }
    });
    Ok(())
}

/// QK-norm + NeoX RoPE: `x [.., seq, heads, d]`, `w [d]` or `[heads, d]`, `pos [seq]`,
/// `inv_freq [rotary/2]`.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope(
    vk: &VecKernels,
    (x, w, pos, inv): (&[f32], &[f32], &[f64], &[f32]),
    (seq, heads, d): (usize, usize, usize),
    eps: f64,
    (norm_dt, out_dt): (DType, DType),
    y: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    check("qk_norm_rope positions", pos.len(), seq)?;
    let half = inv.len();
    if 2 * half > d {
        return Err(format!("qk_norm_rope: {half} frequencies for head dim {d}"));
    }
    if w.len() != d && w.len() != heads * d {
        return Err(format!(
            "qk_norm_rope: a weight of {} for {heads} heads of {d}",
            w.len()
        ));
    }
    rms_norm(vk, x, w, d, eps, (norm_dt, out_dt), y, par)?;
    if half == 0 || y.is_empty() {
        return Ok(());
    }
    // the f32 angles' cos/sin tables [seq, half], as the reference computes them
    let mut cos = Vec::with_capacity(seq * half);
    let mut sin = Vec::with_capacity(seq * half);
    for &p in pos {
        for &f in inv {
            let angle = p as i64 as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let out = Out(y.as_mut_ptr());
    let ro = code(out_dt);
    par.run(y.len() / d, &|lo, hi| {
        for r in lo..hi {
            let t = (r / heads) % seq;
            let row = out.at(r * d);
            // SAFETY: the row's halves inside y; the tables' row t holds `half` values.
            unsafe {
                (vk.rope)(
                    half as i64,
                    row,
                    row.add(half),
                    cos[t * half..].as_ptr(),
                    sin[t * half..].as_ptr(),
                    ro,
                )
            };
        }
    });
    Ok(())
}

/// Group-norm gate: `o [rows, width]` normed per group of `width/groups` channels, times `w`
/// and `sigmoid(g)`; f32 result.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_gate(
    vk: &VecKernels,
    (o, w, g): (&[f32], &[f32], &[f32]),
    groups: usize,
    eps: f64,
    y: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    let width = w.len();
    check("group_norm_gate gate", g.len(), o.len())?;
    check("group_norm_gate output", y.len(), o.len())?;
    if groups == 0 || width % groups != 0 {
        return Err(format!(
            "group_norm_gate: {groups} groups do not divide {width} channels"
        ));
    }
    if width == 0 || o.is_empty() {
        return Ok(());
    }
    check("group_norm_gate rows", o.len() % width, 0)?;
    let n = width / groups;
    let out = Out(y.as_mut_ptr());
    par.run(o.len() / width, &|lo, hi| {
        let mut e = vec![0f32; width];
        for r in lo..hi {
            let at = r * width;
            // SAFETY: rows of `width` elements inside o, g and y; groups of n inside them.
            unsafe {
                (vk.exp)(width as i64, g[at..].as_ptr(), e.as_mut_ptr(), -1.0, 0.0);
                for gi in 0..groups {
                    let xs = o[at + gi * n..].as_ptr();
                    let ss = (vk.dot)(n as i64, xs, xs);
                    (vk.gate)(
                        n as i64,
                        xs,
                        w[gi * n..].as_ptr(),
                        e[gi * n..].as_ptr(),
                        out.at(at + gi * n),
                        inv_rms(ss, n, eps),
                    );
                }
            }
        }
    });
    Ok(())
}

/// Causal GQA attention: `q [b, Hkv, G, s, d]`, `k`/`v [b, Hkv, t, d]`, `pos [s]`; query `i`
/// sees keys `0..=min(pos[i], t − 1)`. One query row per parallel index: scores, max, `exp`
/// and sum, `Σ p·v`, `/ Σ`, all in the generated kernels. f32 result.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    vk: &VecKernels,
    (q, k, v, pos): (&[f32], &[f32], &[f32], &[f64]),
    (b, hkv, g, s, t, d): (usize, usize, usize, usize, usize, usize),
    scale: f64,
    y: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    check("attention q", q.len(), b * hkv * g * s * d)?;
    check("attention k", k.len(), b * hkv * t * d)?;
    check("attention v", v.len(), b * hkv * t * d)?;
    check("attention positions", pos.len(), s)?;
    check("attention output", y.len(), q.len())?;
    let mut last = Vec::with_capacity(s);
    for (i, &p) in pos.iter().enumerate() {
        if p < 0.0 || t == 0 {
            return Err(format!(
                "attention: query {i} at position {p} sees no key (of {t}): every query must see key 0"
            ));
        }
        last.push((p as u64).min(t as u64 - 1) as usize);
    }
    let out = Out(y.as_mut_ptr());
    let scale = scale as f32;
    par.run(b * hkv * g * s, &|lo, hi| {
        let mut sc = vec![0f32; t];
        for r in lo..hi {
            let head = r / (g * s);
            let nvis = last[r % s] + 1;
            let qr = q[r * d..].as_ptr();
            let kv = head * t * d;
            let yr = out.at(r * d);
            // SAFETY: rows of d elements inside q, k, v and y; nvis ≤ t scores.
            unsafe {
                for (j, x) in sc[..nvis].iter_mut().enumerate() {
                    *x = scale * (vk.dot)(d as i64, qr, k[kv + j * d..].as_ptr());
                }
                let m = (vk.maxv)(nvis as i64, sc.as_ptr());
                let l = (vk.exp)(nvis as i64, sc.as_ptr(), sc.as_mut_ptr(), 1.0, -m);
                for (j, &p) in sc[..nvis].iter().enumerate() {
                    (vk.axpby)(d as i64, v[kv + j * d..].as_ptr(), yr, p, 1.0);
                }
                (vk.axpby)(d as i64, yr, yr, 0.0, 1.0 / l);
            }
        }
    });
    Ok(())
}

/// The lightning recurrence token by token, per (batch, head) in parallel: `S ← λ·S + k vᵀ`,
/// `o = qᵀ S`. `s0`/`s [b, H, d, d]`, `q`/`k`/`v`/`o [b, T, H, d]`, `lam [H]`. Serves both
/// `LinearAttnStep` and `LinearAttnChunk` (the same recurrence; the chunked form is a
/// reordering of it).
#[allow(clippy::too_many_arguments)]
pub fn linear_attn(
    vk: &VecKernels,
    [s0, q, k, v, lam]: [&[f32]; 5],
    (b, tl, h, d): (usize, usize, usize, usize),
    s: &mut [f32],
    o: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    check("linear_attn state", s0.len(), b * h * d * d)?;
    check("linear_attn state output", s.len(), s0.len())?;
    for (what, x) in [("q", q), ("k", k), ("v", v)] {
        check(&format!("linear_attn {what}"), x.len(), b * tl * h * d)?;
    }
    check("linear_attn output", o.len(), q.len())?;
    check("linear_attn decay", lam.len(), h)?;
    s.copy_from_slice(s0);
    o.fill(0.0);
    let (so, oo) = (Out(s.as_mut_ptr()), Out(o.as_mut_ptr()));
    par.run(b * h, &|lo, hi| {
        for job in lo..hi {
            let (bi, hi_) = (job / h, job % h);
            let st = so.at(job * d * d);
            let l = lam[hi_];
            for ti in 0..tl {
                let at = ((bi * tl + ti) * h + hi_) * d;
                let (qt, kt, vt) = (&q[at..at + d], &k[at..at + d], &v[at..at + d]);
                // SAFETY: the (batch, head) block of d·d state values and the token's d
                // outputs belong to this job only.
                unsafe {
                    for (x, &kx) in kt.iter().enumerate() {
                        (vk.axpby)(d as i64, vt.as_ptr(), st.add(x * d), kx, l);
                    }
                    let ot = oo.at(at);
                    for (x, &qx) in qt.iter().enumerate() {
                        (vk.axpby)(d as i64, st.add(x * d), ot, qx, 1.0);
                    }
                }
            }
        }
    });
    Ok(())
}

/// Group-limited routing top-k (`ir::fused::moe::route_topk`), one token row per parallel
/// index: the biased scores by the generated `add`, every selection (the two best of each
/// group, the best groups, the best experts of the kept groups) by the generated `argmax`;
/// the group sums and the weight normalisation on the host, with the reference's f64/f32 steps.
/// Returns (chosen experts, weights), `[rows, k]` each.
#[allow(clippy::too_many_arguments)]
pub fn route_topk(
    vk: &VecKernels,
    probs: &[f32],
    bias: Option<&[f32]>,
    e: usize,
    routing: &ir::kernel::Routing,
    par: &dyn ParFor,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let ir::kernel::Routing {
        k,
        n_group,
        topk_group,
        scale,
        normalize,
        ..
    } = *routing;
    if e == 0 || n_group == 0 || !e.is_multiple_of(n_group) || !probs.len().is_multiple_of(e) {
        return Err(format!(
            "route_topk: {} scores in rows of {e} experts, {n_group} groups",
            probs.len()
        ));
    }
    let per = e / n_group;
    if topk_group > n_group || k > topk_group * per {
        return Err(format!(
            "route_topk: cannot choose {k} experts from {topk_group} of {n_group} groups of {per}"
        ));
    }
    if let Some(b) = bias {
        check("route_topk bias", b.len(), e)?;
    }
    let rows = probs.len() / e;
    let mut chosen = vec![0f32; rows * k];
    let mut weights = vec![0f32; rows * k];
    let (co, wo) = (Out(chosen.as_mut_ptr()), Out(weights.as_mut_ptr()));
    let zeros = vec![0f32; e];
    par.run(rows, &|lo, hi| {
        let mut sel = vec![0f32; e];
        let mut masked = vec![0f32; e];
        let mut gs = vec![0f32; n_group];
        let mut taken = vec![0u8; e];
        let mut w = vec![0f32; k];
        for r in lo..hi {
            let p = &probs[r * e..(r + 1) * e];
            // SAFETY: every pointer covers the `n` elements passed with it; row r of the
            // outputs belongs to this piece only.
            unsafe {
                (vk.add)(
                    e as i64,
                    p.as_ptr(),
                    bias.unwrap_or(&zeros).as_ptr(),
                    sel.as_mut_ptr(),
                    0,
                );
                taken.fill(0);
                for (g, s) in gs.iter_mut().enumerate() {
                    let grp = sel[g * per..].as_ptr();
                    let tk = taken[g * per..].as_mut_ptr();
                    let mut acc = 0f64;
                    for _ in 0..per.min(2) {
                        let i = (vk.argmax)(per as i64, grp, tk);
                        acc += f64::from(sel[g * per + i as usize]);
                    }
                    *s = acc as f32;
                }
                masked.fill(f32::NEG_INFINITY);
                taken[..n_group].fill(0);
                for _ in 0..topk_group {
                    let g = (vk.argmax)(n_group as i64, gs.as_ptr(), taken.as_mut_ptr()) as usize;
                    masked[g * per..(g + 1) * per].copy_from_slice(&sel[g * per..(g + 1) * per]);
                }
                taken.fill(0);
                for (j, wj) in w.iter_mut().enumerate() {
                    let i = (vk.argmax)(e as i64, masked.as_ptr(), taken.as_mut_ptr()) as usize;
                    *co.at(r * k + j) = i as f32;
                    *wj = p[i];
                }
                if normalize {
                    let total = w.iter().fold(0f64, |acc, &x| acc + f64::from(x)) as f32 + 1e-20f64 as f32;
                    w.iter_mut().for_each(|x| *x /= total);
                }
                for (j, &x) in w.iter().enumerate() {
                    *wo.at(r * k + j) = x * scale as f32;
                }
            }
        }
    });
    Ok((chosen, weights))
}
