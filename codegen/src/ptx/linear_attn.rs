//! The lightning recurrence `S ← λS + kᵀv, o = q S` (spec §2.4.4) with the state in registers,
//! for both `LinearAttnStep` (decode) and `LinearAttnChunk` (prefill). A child of `templates`.
//!
//! The columns of the `[d, d]` state are independent (column j only needs `v_j` and the whole of
//! `k` and `q`), so each (batch, head) is split over `d / CB` blocks of [`CB`] columns, which
//! gives a batch-1 prefill `H · d / CB` blocks instead of `H`. In a block of 256 threads, thread
//! (row group `rg`, column `c`) owns the contiguous rows `rg·RPT .. (rg+1)·RPT` of column `c`:
//! the state is read once (a warp reads whole 32- or 16-column rows) and written once, whatever
//! the number of tokens. Tokens go in batches of [`TB`]: q, k (all d) and v (the block's
//! columns) are loaded into registers one batch ahead (the loads fly while the previous batch
//! computes) and staged in shared memory, each token updates the registers and
//! leaves one partial `q·S` per (row group, column) in shared memory, and the partials of the
//! batch are summed over the row groups and stored after a barrier.
//!
//! In f32 the recurrence and the chunked form of §4.3 differ by rounding only; the recurrence is
//! also the cheaper one on SIMT cores (2d² FMAs a token against 2d² + 2Cd), so the chunk op
//! uses it too. (A tensor-core chunked form is future work.)

use super::super::emit::{err, knob, Em, Val, R};
use super::attention::{fence_acq_rel, fptr, lds, lds4, naive_forced, sts, warp_sync};
use inkwell::types::BasicType;
use inkwell::values::{FloatValue, IntValue};
use inkwell::IntPredicate;
use ir::kernel::{GateNorm, GridDim, LaunchGeometry, QkPrelude, TemplateKernel};
use ir::op::ReduceOp;
use ir::{DType, Dim};

/// Threads per block.
const THREADS: i64 = 256;
/// Tokens staged per batch.
const TB: i64 = 16;
/// Columns per block (at most).
const CB_MAX: i64 = 32;

/// Columns per block in prefill plans: fewer columns a block give a batch-1 prefill more
/// blocks (Ring-mini: 128 instead of 64); 16 measured fastest on an H100 (docs/perf.md), and
/// `RINGJIT_LA_CB` (8, 16 or 32) overrides it for measuring. Decode plans: [`CB_MAX`].
const CB_PREFILL: i64 = 16;

fn cb_max(em: &Em) -> i64 {
    if !em.prefill {
        return CB_MAX;
    }
    knob("RINGJIT_LA_CB", 8..=32)
        .filter(|c| [8, 16, 32].contains(c))
        .unwrap_or(CB_PREFILL)
}

/// (d, columns per block, row groups, rows per thread) when the fast kernel handles `t`.
pub(super) fn plan(em: &Em, t: &TemplateKernel, head_dim: &Dim) -> Option<(i64, i64, i64, i64)> {
    if naive_forced() {
        return None;
    }
    let s0 = em.operand_shape(t, 0).ok()?;
    let sq = em.operand_shape(t, 1).ok()?;
    if s0.len() != 4 || sq.len() != 4 {
        return None;
    }
    let d = head_dim.as_const()?;
    if !(1..=128).contains(&d) {
        return None;
    }
    let cb = d.min(cb_max(em));
    if d % cb != 0 || THREADS % cb != 0 {
        return None;
    }
    let r = THREADS / cb;
    if d % r != 0 {
        return None;
    }
    Some((d, cb, r, d / r))
}

pub(super) fn recurrence<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    (gate, qk): (Option<GateNorm>, Option<QkPrelude>),
    (d, cb, rgs, rpt): (i64, i64, i64, i64),
) -> R<LaunchGeometry> {
    let (s0, sq) = (em.operand_shape(t, 0)?, em.operand_shape(t, 1)?);
    let (tl, heads) = (em.dim(&sq[1])?, em.dim(&sq[2])?);
    let gate = match gate {
        Some(gn) => Some(Gate::new(em, t, gn, d / cb, THREADS)?),
        None => None,
    };
    if qk.is_some() {
        // the prelude's registers beside the state's: keep three blocks a multiprocessor (what
        // the step without it fits), the state's loads of three blocks in flight
        em.launch_bounds(THREADS as u32, 3)?;
    }
    let f32t = em.ctx.f32_type();
    let qsm = em.shared_array("ringjit_la_q", f32t.as_basic_type_enum(), (TB * d) as u32);
    let ksm = em.shared_array("ringjit_la_k", f32t.as_basic_type_enum(), (TB * d) as u32);
    let vsm = em.shared_array("ringjit_la_v", f32t.as_basic_type_enum(), (TB * cb) as u32);
    let psm = em.shared_array("ringjit_la_p", f32t.as_basic_type_enum(), (TB * rgs * cb) as u32);
    let ncb = d / cb;
    let (zero, one) = (em.i64c(0), em.i64c(1));
    let dd = em.i64c(d);
    let cbv = em.i64c(cb);
    let nthreads = em.i64c(THREADS);

    let bid = em.sreg("ctaid.x")?;
    let cbi = em.rem(bid, em.i64c(ncb))?;
    let bh = em.div(bid, em.i64c(ncb))?;
    let (bi, hi) = (em.div(bh, heads)?, em.rem(bh, heads)?);
    let tid = em.sreg("tid.x")?;
    let cl = em.rem(tid, cbv)?;
    let rg = em.div(tid, cbv)?;
    let col = em.add(em.mul(cbi, cbv)?, cl)?;
    let row0 = em.mul(rg, em.i64c(rpt))?;

    // the state slice in registers
    let mut st = Vec::new();
    for i in 0..rpt {
        let x = em.add(row0, em.i64c(i))?;
        let v = em.ldf(t, 0, &[bi, hi, x, col])?;
        st.push(em.fvar(v)?);
    }
    let lam = em.ldf(t, 4, &[hi, zero, zero])?;

    // q, k (every row) and v (this block's columns) of a batch of TB tokens, loaded into
    // registers one batch ahead (the loads fly while the previous batch computes), then staged
    // in shared memory: element i = tid + j · THREADS of the batch's TB · d (q, k) and TB · cb (v)
    let (nqk, nv) = ((TB * d + THREADS - 1) / THREADS, (TB * cb + THREADS - 1) / THREADS);
    // (prefill plans: decode steps stage their one token directly, as before, which measured
    // faster at batch 64)
    let prefetch = em.prefill;
    let mut regs = Vec::new();
    for _ in 0..if prefetch { 2 * nqk + nv } else { 0 } {
        regs.push(em.fvar(em.f32c(0.0))?);
    }
    let fetch = |em: &mut Em<'c, '_>, t0: IntValue<'c>| -> R<()> {
        for j in 0..nqk {
            let i = em.add(tid, em.i64c(j * THREADS))?;
            let (u, x) = (em.div(i, dd)?, em.rem(i, dd)?);
            let tok = em.add(t0, u)?;
            let ok = em.and(
                em.icmp(IntPredicate::SLT, tok, tl)?,
                em.icmp(IntPredicate::SLT, i, em.i64c(TB * d))?,
            )?;
            let (tc, xc) = (em.select_i(ok, tok, zero)?, em.select_i(ok, x, zero)?);
            let q = em.ldf(t, 1, &[bi, tc, hi, xc])?;
            let k = em.ldf(t, 2, &[bi, tc, hi, xc])?;
            em.set(regs[2 * j as usize], em.select_f(ok, q, em.f32c(0.0))?)?;
            em.set(regs[2 * j as usize + 1], em.select_f(ok, k, em.f32c(0.0))?)?;
        }
        for j in 0..nv {
            let i = em.add(tid, em.i64c(j * THREADS))?;
            let (u, c) = (em.div(i, cbv)?, em.rem(i, cbv)?);
            let tok = em.add(t0, u)?;
            let ok = em.and(
                em.icmp(IntPredicate::SLT, tok, tl)?,
                em.icmp(IntPredicate::SLT, i, em.i64c(TB * cb))?,
            )?;
            let tc = em.select_i(ok, tok, zero)?;
            let cc = em.add(em.mul(cbi, cbv)?, c)?;
            let v = em.ldf(t, 3, &[bi, tc, hi, cc])?;
            em.set(regs[(2 * nqk + j) as usize], em.select_f(ok, v, em.f32c(0.0))?)?;
        }
        Ok(())
    };
    if prefetch {
        fetch(em, zero)?;
    }
    em.for_range(zero, tl, em.i64c(TB), |em, t0| {
        em.barrier()?;
        if !prefetch {
            // stage q, k (every row) and v (this block's columns) of tokens t0 .. t0 + TB
            em.for_range(tid, em.i64c(TB * d), nthreads, |em, i| {
                let u = em.div(i, dd)?;
                let x = em.rem(i, dd)?;
                let tok = em.add(t0, u)?;
                let ok = em.icmp(IntPredicate::SLT, tok, tl)?;
                let tc = em.select_i(ok, tok, zero)?;
                let q = em.ldf(t, 1, &[bi, tc, hi, x])?;
                let k = em.ldf(t, 2, &[bi, tc, hi, x])?;
                let q = em.select_f(ok, q, em.f32c(0.0))?;
                let k = em.select_f(ok, k, em.f32c(0.0))?;
                sts(em, qsm, i, q)?;
                sts(em, ksm, i, k)
            })?;
            em.for_range(tid, em.i64c(TB * cb), nthreads, |em, i| {
                let u = em.div(i, cbv)?;
                let c = em.rem(i, cbv)?;
                let tok = em.add(t0, u)?;
                let ok = em.icmp(IntPredicate::SLT, tok, tl)?;
                let tc = em.select_i(ok, tok, zero)?;
                let cc = em.add(em.mul(cbi, cbv)?, c)?;
                let v = em.ldf(t, 3, &[bi, tc, hi, cc])?;
                let v = em.select_f(ok, v, em.f32c(0.0))?;
                sts(em, vsm, i, v)
            })?;
        } else {
            for j in 0..nqk {
                let i = em.add(tid, em.i64c(j * THREADS))?;
                let inb = em.icmp(IntPredicate::SLT, i, em.i64c(TB * d))?;
                let (q, k) = (em.getf(regs[2 * j as usize])?, em.getf(regs[2 * j as usize + 1])?);
                em.if_then(inb, |em| {
                    sts(em, qsm, i, q)?;
                    sts(em, ksm, i, k)
                })?;
            }
            for j in 0..nv {
                let i = em.add(tid, em.i64c(j * THREADS))?;
                let inb = em.icmp(IntPredicate::SLT, i, em.i64c(TB * cb))?;
                let v = em.getf(regs[(2 * nqk + j) as usize])?;
                em.if_then(inb, |em| sts(em, vsm, i, v))?;
            }
            let next = em.add(t0, em.i64c(TB))?;
            let more = em.icmp(IntPredicate::SLT, next, tl)?;
            em.if_then(more, |em| fetch(em, next))?;
        }
        em.barrier()?;
        let n = em.imin(em.i64c(TB), em.sub(tl, t0)?)?;
        if let Some(p) = qk {
            qk_prelude(em, t, p, (qsm, ksm), (hi, t0, n), d)?;
            em.barrier()?;
        }
        em.for_range(zero, n, one, |em, u| {
            let vj = lds(em, vsm, em.add(em.mul(u, cbv)?, cl)?)?;
            let rbase = em.add(em.mul(u, dd)?, row0)?;
            let mut po = em.f32c(0.0);
            let mut i = 0;
            while i < rpt {
                let at = em.add(rbase, em.i64c(i))?;
                let (q, k): (Vec<_>, Vec<_>) = if rpt % 4 == 0 {
                    (lds4(em, qsm, at)?.to_vec(), lds4(em, ksm, at)?.to_vec())
                } else {
                    (vec![lds(em, qsm, at)?], vec![lds(em, ksm, at)?])
                };
                for e in 0..q.len() {
                    let sv = st[i as usize + e];
                    let s = em.fma(lam, em.getf(sv)?, em.fmul(k[e], vj)?)?;
                    em.set(sv, s)?;
                    po = em.fma(q[e], s, po)?;
                }
                i += q.len() as i64;
            }
            let pi = em.add(em.mul(em.add(em.mul(u, em.i64c(rgs))?, rg)?, cbv)?, cl)?;
            sts(em, psm, pi, po)
        })?;
        em.barrier()?;
        em.for_range(tid, em.i64c(TB * cb), nthreads, |em, i| {
            let u = em.div(i, cbv)?;
            let c = em.rem(i, cbv)?;
            let tok = em.add(t0, u)?;
            let ok = em.icmp(IntPredicate::SLT, tok, tl)?;
            em.if_then(ok, |em| {
                let mut o = em.f32c(0.0);
                for r in 0..rgs {
                    let pi = em.add(em.mul(em.add(em.mul(u, em.i64c(rgs))?, em.i64c(r))?, cbv)?, c)?;
                    o = em.fadd(o, lds(em, psm, pi)?)?;
                }
                let cc = em.add(em.mul(cbi, cbv)?, c)?;
                match &gate {
                    Some(g) => g.store_o(em, [bi, tok, hi, cc], o),
                    None => {
                        let shape = em.kernel.outputs[1].view.shape.clone();
                        em.store_output(1, &[bi, tok, hi, cc], &shape, Val::F(o), DType::F32)
                    }
                }
            })
        })?;
        // the folded group norm: the last block of the head group to finish these tokens
        // normalises them
        match &gate {
            Some(g) => {
                let slot = em.div(t0, em.i64c(TB))?;
                let n = em.imin(em.i64c(TB), em.sub(tl, t0)?)?;
                g.arrive_then_normalise(em, t, bi, hi, slot, t0, n)
            }
            None => Ok(()),
        }
    })?;
    let shape = em.kernel.outputs[0].view.shape.clone();
    for (i, sv) in st.iter().enumerate() {
        let x = em.add(row0, em.i64c(i as i64))?;
        let v = em.getf(*sv)?;
        em.store_output(0, &[bi, hi, x, col], &shape, Val::F(v), DType::F32)?;
    }
    Ok(LaunchGeometry {
        grid: [
            GridDim::blocks(s0[0].mul(&s0[1]).mul(&Dim::constant(ncb)), 1),
            GridDim::one(),
            GridDim::one(),
        ],
        block: [THREADS as u32, 1, 1],
        shared_bytes: 0,
    })
}

/// q's and k's per-head RMSNorm and RoPE (`QkPrelude`), on the raw rows of `n` tokens staged
/// in shared memory (`qsm`, `ksm`: `[TB, d]` each), in place: a warp per (token, q or k) row,
/// the q and k rows of a token on neighbouring warps at once. The arithmetic of the
/// `qk_norm_rope` template in f32: `y = (x · r) · w` with `r` the row's 1/rms, then each of the
/// first `rotary` columns rotated with its partner half a rotation away; q's rows then times
/// `scale`. Each lane holds its columns (`c = lane + 32j`) in registers; the weight, position
/// and frequencies are loaded before the row's reduction. When half the rotary dims is a
/// multiple of 32, a column's partner and its frequency belong to the same lane (`j ± half/32`),
/// so the rotation stays in registers and each lane finds one angle per frequency it uses;
/// otherwise the normed row goes through shared memory (warp-synchronised) for the partners.
fn qk_prelude<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    p: QkPrelude,
    (qsm, ksm): (inkwell::values::PointerValue<'c>, inkwell::values::PointerValue<'c>),
    (hi, t0, n): (IntValue<'c>, IntValue<'c>, IntValue<'c>),
    d: i64,
) -> R<()> {
    const WARPS: i64 = THREADS / 32;
    let tid = em.sreg("tid.x")?;
    let (warp, lane) = (em.div(tid, em.i64c(32))?, em.rem(tid, em.i64c(32))?);
    em.for_range(warp, em.mul(n, em.i64c(2))?, em.i64c(WARPS), |em, r| {
        let u = em.div(r, em.i64c(2))?;
        let odd = em.rem(r, em.i64c(2))?;
        let is_q = em.icmp(IntPredicate::EQ, odd, em.i64c(0))?;
        let is_k = em.icmp(IntPredicate::NE, odd, em.i64c(0))?;
        // warp-uniform: q's row on even warps, k's on odd ones
        em.if_then(is_q, |em| {
            qk_row(em, t, p, (qsm, 7, Some(p.scale)), (hi, t0, u, lane), d)
        })?;
        em.if_then(is_k, |em| qk_row(em, t, p, (ksm, 8, None), (hi, t0, u, lane), d))
    })
}

/// One warp's row of [`qk_prelude`]: row `u` of `sm`, its norm weight operand `wslot`.
fn qk_row<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    p: QkPrelude,
    (sm, wslot, scale): (inkwell::values::PointerValue<'c>, usize, Option<f64>),
    (hi, t0, u, lane): (IntValue<'c>, IntValue<'c>, IntValue<'c>, IntValue<'c>),
    d: i64,
) -> R<()> {
    let cols = (d + 31) / 32;
    let half = (p.rotary / 2) as i64;
    let rot = p.rotary as i64;
    let zero = em.i64c(0);
    let dd = em.i64c(d);
    let per_head = em.operand_shape(t, wslot)?.len() == 2;
    let ro = em.mul(u, dd)?;
    let col = |em: &Em<'c, '_>, j: i64| -> R<(IntValue<'c>, IntValue<'c>)> {
        let c = em.add(lane, em.i64c(32 * j))?;
        let inb = em.icmp(IntPredicate::SLT, c, dd)?;
        Ok((c, inb))
    };
    // loads that do not depend on the row's values first: the weight, position, frequencies
    let mut ws = Vec::new();
    for j in 0..cols {
        let (c, inb) = col(em, j)?;
        let cc = em.select_i(inb, c, zero)?;
        ws.push(if per_head {
            em.ldf(t, wslot, &[hi, cc])?
        } else {
            em.ldf(t, wslot, &[cc])?
        });
    }
    let in_lane = half > 0 && half % 32 == 0;
    let pos = if half > 0 {
        let v = em.ld(t, 9, &[em.add(t0, u)?])?;
        Some(em.as_f(v)?)
    } else {
        None
    };
    // (cos, sin) of each column's angle: column j of a rotary half uses frequency c − 32·(j's
    // half start); in-lane, the two halves share their lanes' angles
    let mut angles: Vec<Option<(FloatValue<'c>, FloatValue<'c>)>> = vec![None; cols as usize];
    if let Some(pos) = pos {
        for j in 0..cols {
            if 32 * j >= rot {
                break;
            }
            if in_lane && 32 * j >= half {
                angles[j as usize] = angles[(j - half / 32) as usize];
                continue;
            }
            let (c, _) = col(em, j)?;
            let first = em.icmp(IntPredicate::SLT, c, em.i64c(half))?;
            let in_rot = em.icmp(IntPredicate::SLT, c, em.i64c(rot))?;
            let fj = em.select_i(first, c, em.select_i(in_rot, em.sub(c, em.i64c(half))?, zero)?)?;
            let f = em.ldf(t, 10, &[fj])?;
            let ang = em.fmul(pos, f)?;
            angles[j as usize] = Some((em.sincos(ang, true)?, em.sincos(ang, false)?));
        }
    }
    // the row statistic: Σ x² over the warp
    let mut ss = em.f32c(0.0);
    let mut xs = Vec::new();
    for j in 0..cols {
        let (c, inb) = col(em, j)?;
        let at = em.add(ro, em.select_i(inb, c, zero)?)?;
        let x = em.select_f(inb, lds(em, sm, at)?, em.f32c(0.0))?;
        ss = em.fma(x, x, ss)?;
        xs.push(x);
    }
    let ss = em.bfly_reduce(ReduceOp::Sum, ss, &[16, 8, 4, 2, 1])?;
    let inv = em.inv_rms(ss, dd, p.eps)?;
    let mut ys: Vec<FloatValue<'c>> = Vec::new();
    for (x, w) in xs.iter().zip(&ws) {
        ys.push(em.fmul(em.fmul(*x, inv)?, *w)?);
    }
    if half > 0 {
        let normed = ys.clone();
        if !in_lane {
            // the normed row in place, for the partners in other lanes
            warp_sync(em)?;
            for (j, &y) in normed.iter().enumerate() {
                let (c, inb) = col(em, j as i64)?;
                em.if_then(inb, |em| sts(em, sm, em.add(ro, c)?, y))?;
            }
            warp_sync(em)?;
        }
        for j in 0..cols {
            let Some((cs, sn)) = angles[j as usize] else { continue };
            let (c, _) = col(em, j)?;
            let h = em.i64c(half);
            let first = em.icmp(IntPredicate::SLT, c, h)?;
            let in_rot = em.icmp(IntPredicate::SLT, c, em.i64c(rot))?;
            let y = normed[j as usize];
            let yp = if in_lane {
                // the partner column is this lane's column j ± half/32
                let hj = half / 32;
                if j < hj {
                    normed[(j + hj) as usize]
                } else {
                    normed[(j - hj) as usize]
                }
            } else {
                let partner = em.select_i(first, em.add(c, h)?, em.select_i(in_rot, em.sub(c, h)?, zero)?)?;
                lds(em, sm, em.add(ro, partner)?)?
            };
            let lo = em.fsub(em.fmul(y, cs)?, em.fmul(yp, sn)?)?;
            let hi2 = em.fadd(em.fmul(y, cs)?, em.fmul(yp, sn)?)?;
            ys[j as usize] = em.select_f(first, lo, em.select_f(in_rot, hi2, y)?)?;
        }
        if !in_lane {
            warp_sync(em)?;
        }
    }
    for (j, &y) in ys.iter().enumerate() {
        let (c, inb) = col(em, j as i64)?;
        let y = match scale {
            Some(s) => em.fmul(y, em.f32c(f64::from(s as f32)))?,
            None => y,
        };
        em.if_then(inb, |em| sts(em, sm, em.add(ro, c)?, y))?;
    }
    Ok(())
}

/// The group RMSNorm and sigmoid gate folded into the recurrence (`gate: Some(_)`,
/// `Fused::LinearAttnGate`). The channels of a group belong to several blocks (heads, and
/// column blocks of a head), so each block leaves its raw `o` in the result `y [b, T, H·d]`
/// itself and counts its arrival per (batch row, token batch, unit), a unit being the fewest
/// whole heads that hold whole groups; the block that completes a unit normalises its tokens
/// in place, the whole block on one (token, group) at a time:
/// `y = o · rsqrt(mean(o²) + eps) · w · sigmoid(g)`.
///
/// Scratch: `b·T·units` u32 counters (one per token batch at most), put back to zero by the
/// block that completes them; the runtime serves them from its zeroed counters buffer
/// (`scratch_counters`, docs/kernel-abi.md), so no launch needs a memset.
pub(super) struct Gate<'c> {
    gn: GateNorm,
    /// channels per group, heads per unit, units per row
    n: i64,
    unit_heads: i64,
    units: i64,
    d: i64,
    /// blocks that write one unit's channels of a token batch, and threads in a block
    blocks_per_unit: i64,
    threads: i64,
    tl: IntValue<'c>,
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl<'c> Gate<'c> {
    /// The layout for `t`, whose heads are each written by `col_blocks` blocks.
    pub(super) fn new(
        em: &mut Em<'c, '_>,
        t: &TemplateKernel,
        gn: GateNorm,
        col_blocks: i64,
        threads: i64,
    ) -> R<Gate<'c>> {
        let (s0, sq) = (em.operand_shape(t, 0)?, em.operand_shape(t, 1)?);
        let (Some(h), Some(d)) = (sq[2].as_const(), sq[3].as_const()) else {
            return err("linear attention with a folded group norm: heads and head dim must be constants");
        };
        let hd = h * d;
        let groups = gn.groups as i64;
        if groups < 1 || hd % groups != 0 {
            return err(format!(
                "linear attention gate: {groups} groups do not divide {hd} channels"
            ));
        }
        // the raw o waits in the result, written as f32
        let y_f32 = em
            .kernel
            .outputs
            .get(1)
            .and_then(|r| em.plan.buffer(r.buffer))
            .is_some_and(|b| b.dtype == DType::F32);
        if !y_f32 {
            return err("linear attention with a folded group norm: its result must be an f32 buffer");
        }
        let n = hd / groups;
        let unit_heads = (n / gcd(n, d) * d) / d;
        let tl = em.dim(&sq[1])?;
        let units = h / unit_heads;
        let bt = s0[0].mul(&sq[1]);
        em.scratch_bytes = bt.mul(&Dim::constant(4 * units));
        em.scratch_counters = true;
        Ok(Gate {
            gn,
            n,
            unit_heads,
            units,
            d,
            blocks_per_unit: unit_heads * col_blocks,
            threads,
            tl,
        })
    }

    /// The element offset of `y[b, tok, ch]` in result 1's buffer (f32).
    fn y_at(&self, em: &Em<'c, '_>, bi: IntValue<'c>, tok: IntValue<'c>, ch: IntValue<'c>) -> R<IntValue<'c>> {
        em.view_offset(&em.kernel.outputs[1].view, &[bi, tok, ch])
    }

    /// Raw `o[b, tok, head, col]` into its place in `y`.
    pub(super) fn store_o(
        &self,
        em: &mut Em<'c, '_>,
        [bi, tok, hi, col]: [IntValue<'c>; 4],
        v: FloatValue<'c>,
    ) -> R<()> {
        let ch = em.add(em.mul(hi, em.i64c(self.d))?, col)?;
        let at = self.y_at(em, bi, tok, ch)?;
        sts(em, em.outputs[1], at, v)
    }

    /// Called by every thread of the block after its raw `o` of tokens `tok0 .. tok0 + ntok`
    /// (counter `slot`) is stored: counts the block's arrival; the last block of the unit of
    /// head `hi` normalises those tokens.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn arrive_then_normalise(
        &self,
        em: &mut Em<'c, '_>,
        t: &TemplateKernel,
        bi: IntValue<'c>,
        hi: IntValue<'c>,
        slot: IntValue<'c>,
        tok0: IntValue<'c>,
        ntok: IntValue<'c>,
    ) -> R<()> {
        let unit = em.div(hi, em.i64c(self.unit_heads))?;
        let zero = em.i64c(0);
        let i32t = em.ctx.i32_type();
        // publish this block's o, then count it: the barrier orders the block's stores before
        // thread 0's release fence (cumulative), which orders them before its count; the block
        // that completes the count acquires with a fence of its own before the barrier that
        // lets its other threads read (one fence per block and direction, not one per thread)
        em.barrier()?;
        let ci = em.add(em.mul(em.add(em.mul(bi, self.tl)?, slot)?, em.i64c(self.units))?, unit)?;
        let counter = fptr(em, em.scratch, ci)?;
        let expect = i32t.const_int((self.blocks_per_unit - 1) as u64, false);
        let is_last = em.block_arrives_last("ringjit_la_gate_last", counter, expect, fence_acq_rel)?;
        let tid = em.sreg("tid.x")?;
        let first = em.icmp(IntPredicate::EQ, tid, zero)?;
        let per_unit = self.unit_heads * self.d;
        let gpu = per_unit / self.n;
        em.if_then(is_last, |em| {
            let (n, eps, threads) = (self.n, self.gn.eps, self.threads);
            let ragged = n % threads != 0;
            // the whole block on one (token, group) at a time: each thread's channels tid,
            // tid + threads, .. loaded before the first use, one block reduction
            em.for_range(zero, em.mul(ntok, em.i64c(gpu))?, em.i64c(1), |em, p| {
                let tok = em.add(tok0, em.div(p, em.i64c(gpu))?)?;
                let gr = em.rem(p, em.i64c(gpu))?;
                let ch0 = em.add(em.mul(unit, em.i64c(per_unit))?, em.mul(gr, em.i64c(n))?)?;
                let mut xs = Vec::new();
                let mut ss = em.f32c(0.0);
                for j in 0..(n + threads - 1) / threads {
                    let c = em.add(tid, em.i64c(threads * j))?;
                    let ok = em.icmp(IntPredicate::SLT, c, em.i64c(n))?;
                    let ch = em.add(ch0, em.select_i(ok, c, zero)?)?;
                    let x = lds(em, em.outputs[1], self.y_at(em, bi, tok, ch)?)?;
                    let x = if ragged { em.select_f(ok, x, em.f32c(0.0))? } else { x };
                    ss = em.fma(x, x, ss)?;
                    xs.push((ok, ch, x));
                }
                let tot = em.block_reduce(ReduceOp::Sum, ss)?;
                let inv = em.inv_rms(tot, em.i64c(n), eps)?;
                let shape = em.kernel.outputs[1].view.shape.clone();
                for (ok, ch, x) in xs {
                    let out = |em: &mut Em<'c, '_>| -> R<()> {
                        let w = em.ldf(t, 5, &[ch])?;
                        let g = em.ldf(t, 6, &[bi, tok, ch])?;
                        let y = em.fmul(em.fmul(em.fmul(x, inv)?, w)?, em.sigmoid(g)?)?;
                        em.store_output(1, &[bi, tok, ch], &shape, Val::F(y), DType::F32)
                    };
                    if ragged {
                        em.if_then(ok, out)?;
                    } else {
                        out(em)?;
                    }
                }
                Ok(())
            })?;
            // every block of the unit has counted: leave the counter at zero
            em.if_then(first, |em| em.reset_counter(counter))
        })
    }
}
