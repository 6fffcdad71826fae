//! Group-limited top-k routing (`TemplateOp::RouteTopK`, reference `ir::fused::moe::route_topk`):
//! one block per token row, the threads over the experts. A child of `templates`.
//!
//! Every selection ranks by one total order, that of the reference's stable descending sort:
//! larger first, NaN above every number (all NaNs equal), −0 equal to +0, ties to the lower
//! index. A value and its index are packed into one u64 *key* that sorts in that order
//! (`ord(v) << 32 | (2³¹ − 1 − index)`, with `ord` the usual sign-flip of the f32 bits after
//! canonicalising NaN and −0), so "best" is an unsigned maximum and keys never tie.
//!
//! No step runs serial rounds: every selection is a rank count of keys in shared memory, each
//! thread ranking its own experts.
//!
//! 1. Each thread loads its experts' probabilities (through the operand's prologue, e.g. the
//!    router's sigmoid) and the keys of their biased scores `σ̃ = p + bias` (f32) into shared
//!    memory.
//! 2. An expert's rank among its group's keys; the experts of rank 0 and 1 write the group's two
//!    best σ̃ (the stable top-2). Thread g then keys group g by their f32 sum, which equals the
//!    reference's f64 sum rounded to f32 (a double rounding of one addition through 53 bits is
//!    innocuous).
//! 3. An expert's group is kept when fewer than `topk_group` group keys beat its own; its masked
//!    key is its σ̃'s key when kept, −∞'s otherwise.
//! 4. Top k of the masked keys: each chunk of 32 experts nominates its k best (a rank count in
//!    the chunk), and a nominee's rank among all nominees is its rank overall (a key larger than
//!    a nominee's is itself a nominee, or its chunk has k nominees above the first), so the
//!    nominee of rank r < k writes slot r.
//! 5. Thread r < k writes slot r: the expert, and its weight `p / (Σ p + 1e−20) · scale` with
//!    the sum accumulated in f64 over the chosen experts in rank order and rounded to f32, as the
//!    reference does.
//!
//! The route folded into a GEMM ([`route_tail`]) computes the same selection in one warp a row,
//! by the method this kernel used before: a lane a group for steps 2–3, then k shuffle rounds of
//! a warp maximum for step 4.

use super::super::emit::{err, Ck, Em, Val, R};
use inkwell::values::{FloatValue, IntValue, PointerValue};
use inkwell::{FloatPredicate, IntPredicate};
use ir::kernel::{LaunchGeometry, TemplateKernel};
use ir::shape::numel;
use ir::{DType, Dim};

/// Threads of a block: one per expert up to this many.
const MAX_THREADS: i64 = 256;
/// The low half of a key is `LOW − index`.
const LOW: i64 = 0x7fff_ffff;
/// Experts per chunk in the top-k step (each chunk nominates its best k).
const CHUNK: i64 = 32;
/// Groups of at most this many experts are scanned by straight-line code.
const UNROLL_MAX: i64 = 64;
/// Static shared memory of the routing kernel, at most.
const ROUTE_SMEM: i64 = 48 * 1024;

pub(super) fn route_topk<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    routing: &ir::kernel::Routing,
    experts: &Dim,
) -> R<LaunchGeometry> {
    let ir::kernel::Routing {
        k,
        n_group,
        topk_group,
        scale,
        normalize,
        biased,
    } = *routing;
    let e_n = experts
        .as_const()
        .ok_or_else(|| super::super::CodegenError("route_topk: the expert count must be a constant".into()))?;
    if e_n <= 0 || e_n >= 1 << 31 || n_group == 0 || e_n % n_group as i64 != 0 || n_group > 63 {
        return err(format!("route_topk: {e_n} experts do not split into {n_group} groups"));
    }
    let per = e_n / n_group as i64;
    if k == 0 || topk_group > n_group || k as i64 > topk_group as i64 * per {
        return err(format!(
            "route_topk: cannot choose {k} experts from {topk_group} of {n_group} groups of {per}"
        ));
    }
    let chunks = (e_n + CHUNK - 1) / CHUNK;
    // the arrays below, each aligned to 16 bytes
    let r16 = |b: i64| (b + 15) / 16 * 16;
    let g = n_group as i64;
    let smem =
        r16(4 * e_n) + r16(8 * e_n) + 2 * r16(4 * g) + r16(8 * g) + r16(8 * chunks * k as i64) + r16(8 * k as i64);
    if smem > ROUTE_SMEM {
        return err(format!(
            "route_topk: {e_n} experts choosing {k} need {smem} bytes of shared memory (at most {ROUTE_SMEM})"
        ));
    }
    let threads = (e_n as u64).next_power_of_two().clamp(64, MAX_THREADS as u64) as i64;
    let per_thread = (e_n + threads - 1) / threads;
    let s0 = em.operand_shape(t, 0)?;
    let rows = numel(&s0[..s0.len().saturating_sub(1)]);

    let (i64t, f32t) = (em.ctx.i64_type(), em.ctx.f32_type());
    let probs = em.shared_array("route_probs", f32t.into(), e_n as u32);
    let keys = em.shared_array("route_keys", i64t.into(), e_n as u32);
    let g1 = em.shared_array("route_g1", f32t.into(), n_group as u32);
    let g2 = em.shared_array("route_g2", f32t.into(), n_group as u32);
    let gkeys = em.shared_array("route_gkeys", i64t.into(), n_group as u32);
    let cand = em.shared_array("route_cand", i64t.into(), (chunks * k as i64) as u32);
    let chosen = em.shared_array("route_chosen", i64t.into(), k as u32);

    let row = em.sreg("ctaid.x")?;
    let tid = em.sreg("tid.x")?;
    let zero = em.i64c(0);
    let en = em.i64c(e_n);
    let base = em.mul(row, en)?;
    let kk = em.i64c(k as i64);
    let neg_inf = f32t.const_float(f64::NEG_INFINITY);
    let lds_key =
        |em: &Em<'c, '_>, i: IntValue<'c>| -> R<IntValue<'c>> { em.geti(em.shared_gep(i64t.into(), keys, i)?) };
    // `Σ [key(i) > mine]` over the indices `lo..hi` (constants: the loop is unrolled)
    let count_above =
        |em: &Em<'c, '_>, arr: PointerValue<'c>, lo: i64, hi: i64, mine: IntValue<'c>| -> R<IntValue<'c>> {
            let mut n = em.i64c(0);
            for i in lo..hi {
                let other = em.geti(em.shared_gep(i64t.into(), arr, em.i64c(i))?)?;
                n = em.add(n, em.bool_to_i64(em.icmp(IntPredicate::UGT, other, mine)?)?)?;
            }
            Ok(n)
        };

    // this thread's experts: e = tid + j·threads (valid below E)
    let mine: Vec<(IntValue<'c>, IntValue<'c>)> = (0..per_thread)
        .map(|j| {
            let e = em.add(tid, em.i64c(j * threads))?;
            Ok((e, em.icmp(IntPredicate::SLT, e, en)?))
        })
        .collect::<R<_>>()?;

    // 1. probabilities and the selection scores' keys; the candidates' slots cleared
    em.for_range(tid, em.i64c(chunks * k as i64), em.i64c(threads), |em, i| {
        em.set(em.shared_gep(i64t.into(), cand, i)?, zero)
    })?;
    let mut sel = Vec::new();
    for &(e, valid) in &mine {
        let ec = em.select_i(valid, e, zero)?;
        let p = em.ld_lin(t, 0, em.add(base, ec)?)?;
        let s = if biased {
            let b = em.ldf(t, 1, &[ec])?;
            em.fadd(p, b)?
        } else {
            p
        };
        let ks = key(em, s, ec)?;
        em.if_then(valid, |em| {
            em.set(em.shared_gep(f32t.into(), probs, e)?, p)?;
            em.set(em.shared_gep(i64t.into(), keys, e)?, ks)
        })?;
        sel.push((s, ks));
    }
    em.barrier()?;

    // 2. each group's two best selection scores: the experts of rank 0 and 1 in their group
    for (&(e, valid), &(s, ks)) in mine.iter().zip(&sel) {
        em.if_then(valid, |em| {
            let g = em.div(e, em.i64c(per))?;
            let lo = em.mul(g, em.i64c(per))?;
            let n = if per <= UNROLL_MAX {
                let mut n = em.i64c(0);
                for i in 0..per {
                    let other = lds_key(em, em.add(lo, em.i64c(i))?)?;
                    n = em.add(n, em.bool_to_i64(em.icmp(IntPredicate::UGT, other, ks)?)?)?;
                }
                n
            } else {
                let n = em.ivar(em.i64c(0))?;
                em.for_range(lo, em.add(lo, em.i64c(per))?, em.i64c(1), |em, i| {
                    let other = lds_key(em, i)?;
                    em.set(
                        n,
                        em.add(em.geti(n)?, em.bool_to_i64(em.icmp(IntPredicate::UGT, other, ks)?)?)?,
                    )
                })?;
                em.geti(n)?
            };
            em.if_then(em.icmp(IntPredicate::EQ, n, em.i64c(0))?, |em| {
                em.set(em.shared_gep(f32t.into(), g1, g)?, s)
            })?;
            em.if_then(em.icmp(IntPredicate::EQ, n, em.i64c(1))?, |em| {
                em.set(em.shared_gep(f32t.into(), g2, g)?, s)
            })
        })?;
    }
    em.barrier()?;

    // 3. group keys; then each expert's masked key: its selection key when fewer than
    // topk_group group keys beat its group's, −∞'s otherwise (into `keys`, read by nobody since
    // the barrier)
    em.for_range(tid, em.i64c(n_group as i64), em.i64c(threads), |em, g| {
        let a = em.getf(em.shared_gep(f32t.into(), g1, g)?)?;
        let score = if per >= 2 {
            em.fadd(a, em.getf(em.shared_gep(f32t.into(), g2, g)?)?)?
        } else {
            a
        };
        em.set(em.shared_gep(i64t.into(), gkeys, g)?, key(em, score, g)?)
    })?;
    em.barrier()?;
    let mut masked = Vec::new();
    for (&(e, valid), &(_, ks)) in mine.iter().zip(&sel) {
        let ec = em.select_i(valid, e, zero)?;
        let g = em.div(ec, em.i64c(per))?;
        let gk = em.geti(em.shared_gep(i64t.into(), gkeys, g)?)?;
        let above = count_above(em, gkeys, 0, n_group as i64, gk)?;
        let kept = em.icmp(IntPredicate::SLT, above, em.i64c(topk_group as i64))?;
        let mk = em.select_i(kept, ks, key(em, neg_inf, ec)?)?;
        em.if_then(valid, |em| em.set(em.shared_gep(i64t.into(), keys, e)?, mk))?;
        masked.push(mk);
    }
    em.barrier()?;

    // 4. top k of the masked keys. A key's rank in its chunk of CHUNK experts; the chunk's
    // first k ranks are its candidates (slots never written stay 0, below every key). A key is
    // among the top k overall exactly when it is a candidate and fewer than k candidates beat
    // it (a larger key that is no candidate sits in a chunk with k larger ones), so the ranks
    // among candidates are the overall ranks.
    let mut nominated = Vec::new();
    for (&(e, valid), &mk) in mine.iter().zip(&masked) {
        let c = em.div(e, em.i64c(CHUNK))?;
        let lo = em.mul(c, em.i64c(CHUNK))?;
        let mut n = em.i64c(0);
        for i in 0..CHUNK {
            let at = em.add(lo, em.i64c(i))?;
            let inside = em.icmp(IntPredicate::SLT, at, en)?;
            let other = lds_key(em, em.select_i(inside, at, zero)?)?;
            let beats =
                em.b.build_and(inside, em.icmp(IntPredicate::UGT, other, mk)?, "")
                    .ck()?;
            n = em.add(n, em.bool_to_i64(beats)?)?;
        }
        let is_cand = em.b.build_and(valid, em.icmp(IntPredicate::SLT, n, kk)?, "").ck()?;
        em.if_then(is_cand, |em| {
            let at = em.add(em.mul(c, kk)?, n)?;
            em.set(em.shared_gep(i64t.into(), cand, at)?, mk)
        })?;
        nominated.push(is_cand);
    }
    em.barrier()?;
    for ((&(e, _), &mk), &is_cand) in mine.iter().zip(&masked).zip(&nominated) {
        em.if_then(is_cand, |em| {
            let n = em.ivar(em.i64c(0))?;
            em.for_range(zero, em.i64c(chunks), em.i64c(1), |em, c| {
                let lo = em.mul(c, kk)?;
                let mut m = em.geti(n)?;
                for i in 0..k as i64 {
                    let other = em.geti(em.shared_gep(i64t.into(), cand, em.add(lo, em.i64c(i))?)?)?;
                    m = em.add(m, em.bool_to_i64(em.icmp(IntPredicate::UGT, other, mk)?)?)?;
                }
                em.set(n, m)
            })?;
            let n = em.geti(n)?;
            em.if_then(em.icmp(IntPredicate::SLT, n, kk)?, |em| {
                em.set(em.shared_gep(i64t.into(), chosen, n)?, e)
            })
        })?;
    }
    em.barrier()?;

    // 5. weights of the chosen experts, in rank order
    let one = em.i64c(1);
    let chosen_at = |em: &Em<'c, '_>, r: IntValue<'c>| -> R<(IntValue<'c>, FloatValue<'c>)> {
        let e = em.geti(em.shared_gep(i64t.into(), chosen, r)?)?;
        let p = em.b.build_load(f32t, em.shared_gep(f32t.into(), probs, e)?, "").ck()?;
        Ok((e, p.into_float_value()))
    };
    em.for_range(tid, kk, em.i64c(threads), |em, r| {
        let (e, p) = chosen_at(em, r)?;
        let mut w = p;
        if normalize {
            let f64t = em.ctx.f64_type();
            let total = em.var(f64t.into(), f64t.const_zero().into())?;
            em.for_range(zero, kk, one, |em, r2| {
                let q = em.b.build_float_ext(chosen_at(em, r2)?.1, f64t, "").ck()?;
                let s = em.b.build_load(f64t, total, "").ck()?.into_float_value();
                em.set(total, em.b.build_float_add(s, q, "").ck()?)
            })?;
            let s = em.b.build_load(f64t, total, "").ck()?.into_float_value();
            let s = em.b.build_float_trunc(s, f32t, "").ck()?;
            let s = em.fadd(s, em.f32c(1e-20))?;
            w = em.fdiv(w, s)?;
        }
        let w = em.fmul(w, em.f32c(scale))?;
        let at = em.add(em.mul(row, kk)?, r)?;
        em.store_lin(0, at, Val::I(e), DType::I64)?;
        em.store_lin(1, at, Val::F(w), DType::F32)
    })?;
    Ok(super::rows_geo(rows, threads as u32))
}

/// The f32 `v` as a u32 (in an i32) whose unsigned order is the ranking order: NaN highest,
/// −0 as +0.
fn ord<'c>(em: &Em<'c, '_>, v: FloatValue<'c>) -> R<IntValue<'c>> {
    let i32t = em.ctx.i32_type();
    let bits = em.b.build_bit_cast(v, i32t, "").ck()?.into_int_value();
    let is_zero = em.fcmp(FloatPredicate::OEQ, v, em.f32c(0.0))?;
    let bits = em.select_i(is_zero, i32t.const_zero(), bits)?;
    let neg = em.icmp(IntPredicate::SLT, bits, i32t.const_zero())?;
    let flipped = em.b.build_not(bits, "").ck()?;
    let raised = em.b.build_or(bits, i32t.const_int(0x8000_0000, false), "").ck()?;
    let o = em.select_i(neg, flipped, raised)?;
    let nan = em.fcmp(FloatPredicate::UNO, v, v)?;
    em.select_i(nan, i32t.const_all_ones(), o)
}

/// The u64 ranking key of value `v` at index `i` (< 2³¹): larger first, ties to the lower index.
/// The low half stays below 2³¹, so no key is `u64::MAX` (the tail's first round's bound).
fn key<'c>(em: &Em<'c, '_>, v: FloatValue<'c>, i: IntValue<'c>) -> R<IntValue<'c>> {
    let i64t = em.ctx.i64_type();
    let o = em.b.build_int_z_extend(ord(em, v)?, i64t, "").ck()?;
    let hi = em.b.build_left_shift(o, i64t.const_int(32, false), "").ck()?;
    let lo = em.sub(em.i64c(LOW), i)?;
    em.b.build_or(hi, lo, "").ck()
}

fn umax<'c>(em: &Em<'c, '_>, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
    let c = em.icmp(IntPredicate::UGT, a, b)?;
    em.select_i(c, a, b)
}

/// Unsigned maximum of a u64 over the warp (butterfly on the two 32-bit halves).
fn warp_umax<'c>(em: &Em<'c, '_>, v: IntValue<'c>) -> R<IntValue<'c>> {
    let (i32t, i64t) = (em.ctx.i32_type(), em.ctx.i64_type());
    let shfl = |em: &Em<'c, '_>, x: IntValue<'c>, off: i32| -> R<IntValue<'c>> {
        Ok(em
            .call(
                "llvm.nvvm.shfl.sync.bfly.i32",
                i32t.into(),
                &[i32t.into(), i32t.into(), i32t.into(), i32t.into()],
                &[em.i32c(-1).into(), x.into(), em.i32c(off).into(), em.i32c(31).into()],
            )?
            .into_int_value())
    };
    let mut v = v;
    for off in [16, 8, 4, 2, 1] {
        let lo = em.b.build_int_truncate(v, i32t, "").ck()?;
        let hi = em.b.build_right_shift(v, i64t.const_int(32, false), false, "").ck()?;
        let hi = em.b.build_int_truncate(hi, i32t, "").ck()?;
        let (lo, hi) = (shfl(em, lo, off)?, shfl(em, hi, off)?);
        let lo = em.b.build_int_z_extend(lo, i64t, "").ck()?;
        let hi = em.b.build_int_z_extend(hi, i64t, "").ck()?;
        let hi = em.b.build_left_shift(hi, i64t.const_int(32, false), "").ck()?;
        let o = em.b.build_or(hi, lo, "").ck()?;
        v = umax(em, v, o)?;
    }
    Ok(v)
}

// ---- the tail's steps (a lane a group; rounds of a warp maximum) ------------------------------

/// Step 2 for group `g`: the sum of its two best selection scores (`sel`, shared; strict
/// improvements in index order, the stable top-2) as a ranking key, into `gkeys[g]`.
fn group_key<'c>(
    em: &mut Em<'c, '_>,
    sel: PointerValue<'c>,
    gkeys: PointerValue<'c>,
    g: IntValue<'c>,
    per: i64,
) -> R<()> {
    let (i32t, i64t, f32t) = (em.ctx.i32_type(), em.ctx.i64_type(), em.ctx.f32_type());
    let neg_inf = f32t.const_float(f64::NEG_INFINITY);
    let (m1o, m1v) = (em.var(i32t.into(), i32t.const_zero().into())?, em.fvar(neg_inf)?);
    let (m2o, m2v) = (em.var(i32t.into(), i32t.const_zero().into())?, em.fvar(neg_inf)?);
    let lo = em.mul(g, em.i64c(per))?;
    let hi = em.add(lo, em.i64c(per))?;
    em.for_range(lo, hi, em.i64c(1), |em, e| {
        let v =
            em.b.build_load(f32t, em.shared_gep(f32t.into(), sel, e)?, "")
                .ck()?
                .into_float_value();
        let o = ord(em, v)?;
        let a = em.b.build_load(i32t, m1o, "").ck()?.into_int_value();
        let b = em.b.build_load(i32t, m2o, "").ck()?.into_int_value();
        let (av, bv) = (em.getf(m1v)?, em.getf(m2v)?);
        let gt1 = em.icmp(IntPredicate::UGT, o, a)?;
        let gt2 = em.icmp(IntPredicate::UGT, o, b)?;
        // new second: the old first when v takes first place, v when it takes second
        em.set(m2o, em.select_i(gt1, a, em.select_i(gt2, o, b)?)?)?;
        em.set(m2v, em.select_f(gt1, av, em.select_f(gt2, v, bv)?)?)?;
        em.set(m1o, em.select_i(gt1, o, a)?)?;
        em.set(m1v, em.select_f(gt1, v, av)?)
    })?;
    let score = if per >= 2 {
        em.fadd(em.getf(m1v)?, em.getf(m2v)?)?
    } else {
        em.getf(m1v)?
    };
    let key = key(em, score, g)?;
    em.set(em.shared_gep(i64t.into(), gkeys, g)?, key)
}

/// The largest of `keys` below `bound` (0 when none is).
fn best_below<'c>(em: &Em<'c, '_>, keys: &[IntValue<'c>], bound: IntValue<'c>) -> R<IntValue<'c>> {
    let zero = em.i64c(0);
    let mut best = zero;
    for &kv in keys {
        let ok = em.icmp(IntPredicate::ULT, kv, bound)?;
        best = umax(em, best, em.select_i(ok, kv, zero)?)?;
    }
    Ok(best)
}

/// Step 3 for group `g`: kept (`kept[g]` = 1) when fewer than `topk_group` of the `ng` group
/// keys rank above its own.
fn group_kept<'c>(
    em: &mut Em<'c, '_>,
    gkeys: PointerValue<'c>,
    kept: PointerValue<'c>,
    g: IntValue<'c>,
    ng: IntValue<'c>,
    topk_group: usize,
) -> R<()> {
    let (i32t, i64t) = (em.ctx.i32_type(), em.ctx.i64_type());
    let (zero, one) = (em.i64c(0), em.i64c(1));
    let mine = em.geti(em.shared_gep(i64t.into(), gkeys, g)?)?;
    let rank = em.ivar(zero)?;
    em.for_range(zero, ng, one, |em, g2| {
        let other = em.geti(em.shared_gep(i64t.into(), gkeys, g2)?)?;
        let above = em.bool_to_i64(em.icmp(IntPredicate::UGT, other, mine)?)?;
        em.set(rank, em.add(em.geti(rank)?, above)?)
    })?;
    let keep = em.icmp(IntPredicate::SLT, em.geti(rank)?, em.i64c(topk_group as i64))?;
    let flag = em.b.build_int_z_extend(keep, i32t, "").ck()?;
    em.set(em.shared_gep(i32t.into(), kept, g)?, flag)
}

/// Step 4's key of expert `e`: its selection score's key when its group is kept, −∞'s
/// otherwise, and 0 (below every key) for `e` past the `en` experts.
fn masked_key<'c>(
    em: &Em<'c, '_>,
    sel: PointerValue<'c>,
    kept: PointerValue<'c>,
    e: IntValue<'c>,
    en: IntValue<'c>,
    per: i64,
) -> R<IntValue<'c>> {
    let (i32t, f32t) = (em.ctx.i32_type(), em.ctx.f32_type());
    let zero = em.i64c(0);
    let valid = em.icmp(IntPredicate::SLT, e, en)?;
    let ec = em.select_i(valid, e, zero)?;
    let g = em.div(ec, em.i64c(per))?;
    let on =
        em.b.build_load(i32t, em.shared_gep(i32t.into(), kept, g)?, "")
            .ck()?
            .into_int_value();
    let on = em.icmp(IntPredicate::NE, on, i32t.const_zero())?;
    let v =
        em.b.build_load(f32t, em.shared_gep(f32t.into(), sel, ec)?, "")
            .ck()?
            .into_float_value();
    let v = em.select_f(on, v, f32t.const_float(f64::NEG_INFINITY))?;
    let kv = key(em, v, ec)?;
    em.select_i(valid, kv, zero)
}

// ---- the route folded into the router's GEMM ---------------------------------------------------

/// Bytes of one warp's shared scratch in the tail: probabilities and selection scores (f32 per
/// expert), group keys (u64) and kept flags (u32 per group), rounded to 16.
fn tail_region(experts: i64, n_group: i64) -> i64 {
    (8 * experts + 12 * n_group + 15) / 16 * 16
}

/// Dynamic shared memory the tail needs in a block of `threads`.
pub(super) fn tail_smem(r: &ir::kernel::RouteTail, threads: i64) -> i64 {
    threads / 32 * tail_region(r.experts, r.routing.n_group as i64)
}

/// The route of a GEMM's rows (`ir::kernel::RouteTail`), emitted after the GEMM's stores of
/// result 0, which every block of the launch must reach. Each block counts its arrival; the
/// last one (an atomic counter in the kernel's scratch, fences on both sides, put back to zero
/// at the end) routes every row, a warp a row: the selection of [`route_topk`]'s steps 1–5,
/// computed with the warp's lanes in place of the block's threads and `bar.warp.sync` in place
/// of barriers: a lane a group for steps 2–3, then k rounds of a warp maximum (shuffles) below
/// the previous winner for step 4. The probabilities are read back from
/// result 0 with `ld.global.cg` (other blocks wrote them; L2, never this SM's L1).
pub(super) fn route_tail<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    r: &ir::kernel::RouteTail,
    threads: i64,
) -> R<()> {
    r.check().or_else(|e| err(format!("gemm route: {e}")))?;
    let (e_n, n_group, k) = (r.experts, r.routing.n_group as i64, r.routing.k as i64);
    let per = e_n / n_group;
    let nout = em.kernel.outputs.len();
    let (o_idx, o_w) = (nout - 2, nout - 1);
    let bias_op = t.operands.len() - 1;
    let view = em.kernel.outputs[0].view.clone();
    if view.strides.last() != Some(&Dim::constant(1)) {
        return err("gemm route: the router's columns must be contiguous");
    }
    if em.plan.buffer(em.kernel.outputs[0].buffer).map(|b| b.dtype) != Some(DType::F32) {
        return err("gemm route: the router's logits must be an f32 result");
    }
    if em.scratch_bytes != Dim::constant(0) || em.scratch_counters {
        return err("gemm route: the product already uses the kernel's scratch");
    }
    let lead = &view.shape[..view.rank() - 1];
    let rext = em.dims(lead)?;
    let rows = em.product(&rext)?;
    let (i32t, i64t, f32t) = (em.ctx.i32_type(), em.ctx.i64_type(), em.ctx.f32_type());
    let (zero, one) = (em.i64c(0), em.i64c(1));

    // every thread of the block has stored its results
    em.barrier()?;
    em.scratch_bytes = Dim::constant(16);
    em.scratch_counters = true;
    let counter = super::attention::fptr(em, em.scratch, zero)?;
    let blocks = em.mul(
        em.mul(em.sreg("nctaid.x")?, em.sreg("nctaid.y")?)?,
        em.sreg("nctaid.z")?,
    )?;
    let last_old = em.b.build_int_truncate(em.sub(blocks, one)?, i32t, "").ck()?;
    let is_last = em.block_arrives_last("ringjit_route_last", counter, last_old, super::attention::fence_acq_rel)?;
    em.if_then(is_last, |em| {
        let tid = em.sreg("tid.x")?;
        let lane = em.rem(tid, em.i64c(32))?;
        let warp = em.div(tid, em.i64c(32))?;
        let warps = em.i64c(threads / 32);
        let lanes = em.i64c(32);
        let en = em.i64c(e_n);
        let ng = em.i64c(n_group);
        // this warp's scratch: probs [E] f32, sel [E] f32, group keys [ng] u64, kept [ng] u32
        let smem = super::attention::dyn_smem(em);
        let region = em.mul(warp, em.i64c(tail_region(e_n, n_group) / 4))?;
        let probs = super::attention::fptr(em, smem, region)?;
        let sel = super::attention::fptr(em, probs, en)?;
        let gkeys = super::attention::fptr(em, sel, en)?;
        let kept = em.shared_gep(i64t.into(), gkeys, ng)?;
        // a warp a row. The code is kept small (loops, not unrolled): it runs once a launch,
        // from a cold instruction cache, after the GEMM's large body (unrolled, it measured
        // 13-18 µs a row on an H200; the loads alone are a few)
        em.for_range(warp, rows, warps, |em, row| {
            // 1. probabilities and selection scores: the lane's loads issued together
            let mut ridx = em.unravel(row, &rext)?;
            ridx.push(em.i64c(r.col));
            let at0 = em.view_offset(&view, &ridx)?;
            let mut loaded = Vec::new();
            for j in 0..(e_n + 31) / 32 {
                let e = em.add(lane, em.i64c(32 * j))?;
                let valid = em.icmp(IntPredicate::SLT, e, en)?;
                let ec = em.select_i(valid, e, zero)?;
                let x = ld_cg_f32(em, em.outputs[0], em.add(at0, ec)?)?;
                let b = if r.routing.biased {
                    Some(em.ldf(t, bias_op, &[ec])?)
                } else {
                    None
                };
                loaded.push((e, valid, x, b));
            }
            for (e, valid, x, b) in loaded {
                let p = if r.sigmoid { em.sigmoid(x)? } else { x };
                let s = match b {
                    Some(b) => em.fadd(p, b)?,
                    None => p,
                };
                em.if_then(valid, |em| {
                    em.set(em.shared_gep(f32t.into(), probs, e)?, p)?;
                    em.set(em.shared_gep(f32t.into(), sel, e)?, s)
                })?;
            }
            super::attention::warp_sync(em)?;
            // 2. group scores: the two best σ̃ of each group (stable: strict improvements)
            em.for_range(lane, ng, lanes, |em, g| group_key(em, sel, gkeys, g, per))?;
            super::attention::warp_sync(em)?;
            // 3. kept groups: fewer than topk_group keys above their own
            em.for_range(lane, ng, lanes, |em, g| {
                group_kept(em, gkeys, kept, g, ng, r.routing.topk_group)
            })?;
            super::attention::warp_sync(em)?;
            // 4. the masked keys of this lane's experts (in registers); k rounds (a loop) of a
            // warp maximum below the previous winner, lane r keeping the winner of round r
            let keys = (0..(e_n + 31) / 32)
                .map(|j| masked_key(em, sel, kept, em.add(lane, em.i64c(32 * j))?, en, per))
                .collect::<R<Vec<_>>>()?;
            let below = em.ivar(em.i64c(-1))?;
            let mine = em.ivar(zero)?;
            em.for_range(zero, em.i64c(k), one, |em, round| {
                let all = warp_umax(em, best_below(em, &keys, em.geti(below)?)?)?;
                let here = em.icmp(IntPredicate::EQ, lane, round)?;
                em.set(mine, em.select_i(here, all, em.geti(mine)?)?)?;
                em.set(below, all)
            })?;
            // 5. lane r < k: the expert of rank r and its weight (the sum of the chosen
            // probabilities in rank order, in f64, as the reference)
            let mine = em.geti(mine)?;
            let low = em.b.build_and(mine, i64t.const_int(0xffff_ffff, false), "").ck()?;
            let e_mine = em.sub(em.i64c(LOW), low)?;
            let ranked = em.icmp(IntPredicate::SLT, lane, em.i64c(k))?;
            let e_mine = em.select_i(ranked, e_mine, zero)?;
            let p_mine =
                em.b.build_load(f32t, em.shared_gep(f32t.into(), probs, e_mine)?, "")
                    .ck()?
                    .into_float_value();
            let mut w = p_mine;
            if r.routing.normalize {
                let f64t = em.ctx.f64_type();
                let total = em.var(f64t.into(), f64t.const_zero().into())?;
                em.for_range(zero, em.i64c(k), one, |em, r2| {
                    let q = shfl_idx_f32(em, p_mine, r2)?;
                    let q = em.b.build_float_ext(q, f64t, "").ck()?;
                    let s = em.b.build_load(f64t, total, "").ck()?.into_float_value();
                    em.set(total, em.b.build_float_add(s, q, "").ck()?)
                })?;
                let s = em.b.build_load(f64t, total, "").ck()?.into_float_value();
                let s = em.b.build_float_trunc(s, f32t, "").ck()?;
                let s = em.fadd(s, em.f32c(1e-20))?;
                w = em.fdiv(w, s)?;
            }
            let w = em.fmul(w, em.f32c(r.routing.scale))?;
            em.if_then(ranked, |em| {
                let at = em.add(em.mul(row, em.i64c(k))?, lane)?;
                em.store_lin(o_idx, at, Val::I(e_mine), DType::I64)?;
                em.store_lin(o_w, at, Val::F(w), DType::F32)
            })?;
            // the scratch is reused by the warp's next row
            super::attention::warp_sync(em)
        })?;
        let first = em.icmp(IntPredicate::EQ, tid, zero)?;
        em.if_then(first, |em| em.reset_counter(counter))
    })
}

/// `ld.global.cg`: an f32 another block stored in this launch (read from L2, never from this
/// multiprocessor's L1), after the arrival count's acquire. An instruction with side effects,
/// so LLVM keeps it after the barrier and fence; ptxas still overlaps the loads.
fn ld_cg_f32<'c>(em: &Em<'c, '_>, base: PointerValue<'c>, i: IntValue<'c>) -> R<FloatValue<'c>> {
    let p = super::attention::fptr(em, base, i)?;
    let i64t = em.ctx.i64_type();
    let a = em.b.build_ptr_to_int(p, i64t, "").ck()?;
    let v = em.asm_se(
        Some(em.ctx.f32_type().into()),
        &[i64t.into()],
        "ld.global.cg.f32 $0, [$1];",
        "=f,l,~{memory}",
        &[a.into()],
    )?;
    Ok(v.expect("an f32 result").into_float_value())
}

/// Lane `src`'s f32 `v`, in every lane.
fn shfl_idx_f32<'c>(em: &Em<'c, '_>, v: FloatValue<'c>, src: IntValue<'c>) -> R<FloatValue<'c>> {
    let i32t = em.ctx.i32_type();
    let bits = em.b.build_bit_cast(v, i32t, "").ck()?.into_int_value();
    let src = em.b.build_int_truncate(src, i32t, "").ck()?;
    let got = em
        .call(
            "llvm.nvvm.shfl.sync.idx.i32",
            i32t.into(),
            &[i32t.into(), i32t.into(), i32t.into(), i32t.into()],
            &[em.i32c(-1).into(), bits.into(), src.into(), em.i32c(31).into()],
        )?
        .into_int_value();
    Ok(em.b.build_bit_cast(got, em.ctx.f32_type(), "").ck()?.into_float_value())
}
