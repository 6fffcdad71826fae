//! The lightning recurrence `S ← λS + kᵀv, o = q S` (spec §2.4.4) with the state in registers,
//! for both `LinearAttnStep` (decode) and `LinearAttnChunk` (prefill). A child of `templates`.
//!
//! The columns of the `[d, d]` state are independent (column j only needs `v_j` and the whole of
//! `k` and `q`), so each (batch, head) is split over `d / CB` blocks of [`CB`] columns, which
//! gives a batch-1 prefill `H · d / CB` blocks instead of `H`. In a block of 256 threads, thread
//! (row group `rg`, column `c`) owns the contiguous rows `rg·RPT .. (rg+1)·RPT` of column `c`:
//! the state is read once (a warp reads 32 consecutive columns of one row: 128 bytes) and
//! written once, whatever the number of tokens. Tokens go in batches of [`TB`]: q, k (all d) and
//! v (the block's columns) are staged in shared memory, each token updates the registers and
//! leaves one partial `q·S` per (row group, column) in shared memory, and the partials of the
//! batch are summed over the row groups and stored after a barrier.
//!
//! In f32 the recurrence and the chunked form of §4.3 differ by rounding only; the recurrence is
//! also the cheaper one on SIMT cores (2d² FMAs a token against 2d² + 2Cd), so the chunk op
//! uses it too. (A tensor-core chunked form is future work.)

use super::super::emit::{Em, Val, R};
use super::attention::{lds, lds4, naive_forced, sts};
use inkwell::types::BasicType;
use inkwell::IntPredicate;
use ir::kernel::{GridDim, LaunchGeometry, TemplateKernel};
use ir::{DType, Dim};

/// Threads per block.
const THREADS: i64 = 256;
/// Tokens staged per batch.
const TB: i64 = 16;
/// Columns per block (at most).
const CB_MAX: i64 = 32;

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
    let cb = d.min(CB_MAX);
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
    (d, cb, rgs, rpt): (i64, i64, i64, i64),
) -> R<LaunchGeometry> {
    let (s0, sq) = (em.operand_shape(t, 0)?, em.operand_shape(t, 1)?);
    let (tl, heads) = (em.dim(&sq[1])?, em.dim(&sq[2])?);
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

    em.for_range(zero, tl, em.i64c(TB), |em, t0| {
        em.barrier()?;
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
        em.barrier()?;
        let n = em.imin(em.i64c(TB), em.sub(tl, t0)?)?;
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
                let shape = em.kernel.outputs[1].view.shape.clone();
                em.store_output(1, &[bi, tok, hi, cc], &shape, Val::F(o), DType::F32)
            })
        })
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
