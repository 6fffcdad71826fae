//! The prefill path of the flash attention kernel on tensor cores (a child of `templates`,
//! called from `attention::flash` when q, k and v are bf16 buffers the kernel can read with
//! 16-byte loads).
//!
//! One block of [`WARPS`] warps per (batch, kv head, tile of [`ROWS`] query rows), rows
//! numbered token-major as in the SIMT kernel (row = token·G + g, so the G heads of a token
//! share the K/V tiles); each warp owns 16 rows. The block stages its Q rows (bf16) in shared
//! memory once and keeps them as `ldmatrix` fragments in registers; then, per tile of [`KT`]
//! keys (up to the last key any of its rows sees):
//!
//! 1. every thread copies its share of the K and V tiles into shared memory (16-byte loads,
//!    rows padded by 8 elements so that `ldmatrix` hits distinct banks);
//! 2. `S = Q·Kᵀ` with `mma.sync.m16n8k16` (bf16 × bf16 products are exact in f32 and the
//!    accumulation is f32: the reference's `cast(q, f32) @ cast(k, f32)` up to summation
//!    order), then `× scale`, the causal mask (key ≤ the row's last visible key) and the
//!    online softmax in f32 (row max over the 4 lanes of a quad by shuffles);
//! 3. `O += P·V` with the probabilities as A fragments straight from the score registers
//!    (the m16n8 accumulator layout of two key tiles is the m16k16 operand layout). P is f32 in
//!    the reference; it goes in as two bf16 terms (`hi = bf16(p)`, `lo = bf16(p − hi)`, two
//!    MMAs), which keeps about 16 bits of it: far inside the bf16 tier, near the f32 one.
//!
//! At the end each row is divided by its sum (the quad's partial sums added) and written through
//! the template's output view and epilogue.

use super::super::emit::{Ck, Em, Val, R};
use super::attention::dyn_smem;
use super::tc::{ldmatrix, mma, pack_bf16, unpack_bf16};
use inkwell::values::{BasicValue, FloatValue, IntValue, VectorValue};
use inkwell::{FloatPredicate, IntPredicate};
use ir::kernel::{Operand, TemplateKernel};
use ir::op::ReduceOp;
use ir::{DType, Dim};

/// Warps per block.
pub(super) const WARPS: i64 = 8;
/// Query rows per block (16 per warp).
pub(super) const ROWS: i64 = WARPS * 16;
/// Keys per shared-memory tile.
const KT: i64 = 64;

/// Shared-memory row stride in bf16 elements for rows of `d` channels (16 bytes of padding).
fn row_stride(d: i64) -> i64 {
    d + 8
}

/// Dynamic shared memory of the path: the Q rows and one K and one V tile, bf16.
pub(super) fn smem_bytes(d: i64) -> i64 {
    (ROWS + 2 * KT) * row_stride(d) * 2
}

fn multiple_of(d: &Dim, k: i64) -> bool {
    d.terms().all(|(_, c)| c % k == 0)
}

/// Whether the tensor-core path applies: head dim a multiple of 16 up to 128, and q, k, v
/// (operands 0, 1, 2) plain bf16 buffers with contiguous channels whose other strides and
/// offset keep 16-byte alignment; only in prefill plans (`PtxOptions::prefill`).
/// `RINGJIT_ATTN=simt` keeps the SIMT prefill path.
pub(super) fn eligible(em: &Em, t: &TemplateKernel, d: i64) -> bool {
    if !em.prefill || d % 16 != 0 || d > 128 || std::env::var("RINGJIT_ATTN").is_ok_and(|v| v == "simt") {
        return false;
    }
    (0..3).all(|i| match t.operands.get(i) {
        Some(Operand::Buffer(b)) => {
            let r = &em.kernel.inputs[*b];
            let n = r.view.strides.len();
            em.plan.buffer(r.buffer).map(|b| b.dtype) == Some(DType::BF16)
                && n >= 1
                && r.view.strides[n - 1].as_const() == Some(1)
                && multiple_of(&r.view.offset, 8)
                && r.view.strides[..n - 1].iter().all(|s| multiple_of(s, 8))
        }
        _ => false,
    })
}

/// What the caller already knows: the (batch, kv head) of the block and the extents.
pub(super) struct Ctx<'c> {
    pub bi: IntValue<'c>,
    pub hk: IntValue<'c>,
    /// query heads per kv head
    pub g: IntValue<'c>,
    /// rows of this kv head: g × new tokens
    pub rows: IntValue<'c>,
    /// keys (cache + new tokens)
    pub tk: IntValue<'c>,
    pub ydt: DType,
}

/// `p0, p1` as a bf16x2 pair `hi` plus the bf16x2 pair of what `hi` missed.
fn split_bf16<'c>(em: &Em<'c, '_>, p0: FloatValue<'c>, p1: FloatValue<'c>) -> R<(IntValue<'c>, IntValue<'c>)> {
    let hi = pack_bf16(em, p0, p1)?;
    let (h0, h1) = unpack_bf16(em, hi)?;
    let lo = pack_bf16(em, em.fsub(p0, h0)?, em.fsub(p1, h1)?)?;
    Ok((hi, lo))
}

/// `op` over the 4 lanes of a quad (lanes 4q..4q+3), every lane gets it.
fn quad_reduce<'c>(em: &Em<'c, '_>, op: ReduceOp, v: FloatValue<'c>) -> R<FloatValue<'c>> {
    em.bfly_reduce(op, v, &[1, 2])
}

/// 16 bytes of global memory at element `e` of the bf16 buffer `base`.
fn ld_global16<'c>(em: &Em<'c, '_>, base: inkwell::values::PointerValue<'c>, e: IntValue<'c>) -> R<VectorValue<'c>> {
    let i16t = em.ctx.i16_type();
    // SAFETY (of the generated code): callers pass an element inside the operand's view.
    let p = unsafe { em.b.build_in_bounds_gep(i16t, base, &[e], "") }.ck()?;
    let v = em.b.build_load(em.ctx.i32_type().vec_type(4), p, "").ck()?;
    v.as_instruction_value()
        .expect("a load")
        .set_alignment(16)
        .map_err(|e| super::super::CodegenError(e.to_string()))?;
    Ok(v.into_vector_value())
}

/// The tensor-core prefill path (see the module docs). Every thread of the block must arrive.
pub(super) fn prefill<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, scale: f64, d: i64, cx: &Ctx<'c>) -> R<()> {
    let i32t = em.ctx.i32_type();
    let i16t = em.ctx.i16_type();
    let v4t = i32t.vec_type(4);
    let zero = em.i64c(0);
    let st = row_stride(d);
    let chunks = d / 8; // 16-byte chunks per row
    let tid = em.sreg("tid.x")?;
    let lane = em.rem(tid, em.i64c(32))?;
    let warp = em.div(tid, em.i64c(32))?;
    let nthreads = em.i64c(WARPS * 32);
    let row0 = em.mul(em.sreg("ctaid.x")?, em.i64c(ROWS))?;
    let wrow = em.add(row0, em.mul(warp, em.i64c(16))?)?;
    let (qg, tq) = (em.div(lane, em.i64c(4))?, em.rem(lane, em.i64c(4))?);
    let smem = dyn_smem(em);
    let base32 = em.b.build_ptr_to_int(smem, i32t, "").ck()?;
    let (off_q, off_k, off_v) = (0, ROWS * st, (ROWS + KT) * st);
    // the 32-bit shared address of bf16 element `e`
    let saddr = |em: &Em<'c, '_>, e: IntValue<'c>| -> R<IntValue<'c>> {
        let b = em.b.build_int_truncate(em.mul(e, em.i64c(2))?, i32t, "").ck()?;
        em.b.build_int_add(base32, b, "").ck()
    };
    let sstore = |em: &Em<'c, '_>, e: IntValue<'c>, v: VectorValue<'c>| -> R<()> {
        let p = em.shared_gep(i16t.into(), smem, e)?;
        let s = em.b.build_store(p, v).ck()?;
        s.set_alignment(16)
            .map_err(|e| super::super::CodegenError(e.to_string()))?;
        Ok(())
    };
    let view = |i: usize| -> R<(inkwell::values::PointerValue<'c>, ir::kernel::View)> {
        match t.operands.get(i) {
            Some(Operand::Buffer(b)) => Ok((em.inputs[*b], em.kernel.inputs[*b].view.clone())),
            _ => Err(super::super::CodegenError("attention: operand is not a buffer".into())),
        }
    };
    let (qbuf, qview) = view(0)?;
    let (kbuf, kview) = view(1)?;
    let (vbuf, vview) = view(2)?;

    // this lane's two rows (g and g + 8 of the warp's 16): (valid, token, head in group, last key)
    let mut rinfo = Vec::new();
    let mut mine_last = em.i64c(-1);
    for h in 0..2 {
        let r = em.add(wrow, em.add(qg, em.i64c(8 * h))?)?;
        let valid = em.icmp(IntPredicate::SLT, r, cx.rows)?;
        let rc = em.select_i(valid, r, zero)?;
        let (tok, gi) = (em.div(rc, cx.g)?, em.rem(rc, cx.g)?);
        let p = em.ld(t, 3, &[tok])?;
        let p = em.as_i(p)?;
        let last = em.imin(p, em.sub(cx.tk, em.i64c(1))?)?;
        let last = em.select_i(valid, last, em.i64c(-1))?;
        mine_last = em.imax(mine_last, last)?;
        rinfo.push((valid, tok, gi, last));
    }
    let warp_last = em.fptosi(em.warp_reduce(ReduceOp::Max, em.sitofp(mine_last)?)?)?;
    let mine_f = em.sitofp(mine_last)?;
    let kend_f = em.block_reduce(ReduceOp::Max, mine_f)?;
    let kend = em.fptosi(kend_f)?;
    let kend = em.add(kend, em.i64c(1))?;

    // stage the block's Q rows (bf16, zeros past the last row)
    em.for_range(tid, em.i64c(ROWS * chunks), nthreads, |em, i| {
        let r = em.div(i, em.i64c(chunks))?;
        let c = em.mul(em.rem(i, em.i64c(chunks))?, em.i64c(8))?;
        let row = em.add(row0, r)?;
        let valid = em.icmp(IntPredicate::SLT, row, cx.rows)?;
        let rc = em.select_i(valid, row, zero)?;
        let (tok, gi) = (em.div(rc, cx.g)?, em.rem(rc, cx.g)?);
        let at = em.view_offset(&qview, &[cx.bi, cx.hk, gi, tok, c])?;
        let v = ld_global16(em, qbuf, at)?;
        let v =
            em.b.build_select(valid, v, v4t.const_zero(), "")
                .ck()?
                .into_vector_value();
        sstore(em, em.add(em.add(em.i64c(off_q), em.mul(r, em.i64c(st))?)?, c)?, v)
    })?;
    em.barrier()?;
    // Q fragments: rows wrow.. of the tile, 16 channels per fragment
    let a_row = em.add(em.mul(warp, em.i64c(16))?, em.rem(lane, em.i64c(16))?)?;
    let a_col = em.mul(em.div(lane, em.i64c(16))?, em.i64c(8))?;
    // (re-read from shared memory per tile rather than held: registers go to O and S)
    let q_at = em.add(em.i64c(off_q), em.add(em.mul(a_row, em.i64c(st))?, a_col)?)?;

    let ninf = em.identity(ReduceOp::Max);
    let m = [em.fvar(ninf)?, em.fvar(ninf)?];
    let l = [em.fvar(em.f32c(0.0))?, em.fvar(em.f32c(0.0))?];
    // O: d/8 tiles of 8 channels, 4 accumulators each (rows g, g+8 × two channels)
    let o: Vec<[inkwell::values::PointerValue<'c>; 4]> = (0..d / 8)
        .map(|_| -> R<_> {
            Ok([
                em.fvar(em.f32c(0.0))?,
                em.fvar(em.f32c(0.0))?,
                em.fvar(em.f32c(0.0))?,
                em.fvar(em.f32c(0.0))?,
            ])
        })
        .collect::<R<_>>()?;
    // ldmatrix lane offsets: K (non-transposed, keys as the n rows) and V (transposed)
    let k_key = em.add(
        em.rem(lane, em.i64c(8))?,
        em.mul(em.div(lane, em.i64c(16))?, em.i64c(8))?,
    )?;
    let k_ch = em.mul(em.rem(em.div(lane, em.i64c(8))?, em.i64c(2))?, em.i64c(8))?;
    let v_key = em.add(
        em.rem(lane, em.i64c(8))?,
        em.mul(em.rem(em.div(lane, em.i64c(8))?, em.i64c(2))?, em.i64c(8))?,
    )?;
    let v_ch = em.mul(em.div(lane, em.i64c(16))?, em.i64c(8))?;

    em.for_range(zero, kend, em.i64c(KT), |em, kt| {
        em.barrier()?; // every warp is done with the previous tile
        em.for_range(tid, em.i64c(KT * chunks), nthreads, |em, i| {
            let j = em.div(i, em.i64c(chunks))?;
            let c = em.mul(em.rem(i, em.i64c(chunks))?, em.i64c(8))?;
            let key = em.add(kt, j)?;
            let ok = em.icmp(IntPredicate::SLT, key, cx.tk)?;
            let kc = em.select_i(ok, key, zero)?;
            let ka = em.view_offset(&kview, &[cx.bi, cx.hk, kc, c])?;
            let va = em.view_offset(&vview, &[cx.bi, cx.hk, kc, c])?;
            let kx = ld_global16(em, kbuf, ka)?;
            let vx = ld_global16(em, vbuf, va)?;
            let kx =
                em.b.build_select(ok, kx, v4t.const_zero(), "")
                    .ck()?
                    .into_vector_value();
            let vx =
                em.b.build_select(ok, vx, v4t.const_zero(), "")
                    .ck()?
                    .into_vector_value();
            let at = em.add(em.mul(j, em.i64c(st))?, c)?;
            sstore(em, em.add(em.i64c(off_k), at)?, kx)?;
            sstore(em, em.add(em.i64c(off_v), at)?, vx)
        })?;
        em.barrier()?;
        let live = em.icmp(IntPredicate::SLE, kt, warp_last)?;
        em.if_then(live, |em| {
            // S = Q·Kᵀ over the tile: 8 tiles of 8 keys
            let mut s: Vec<[FloatValue<'c>; 4]> = vec![[em.f32c(0.0); 4]; (KT / 8) as usize];
            for kk in 0..d / 16 {
                let a = &ldmatrix(em, saddr(em, em.add(q_at, em.i64c(kk * 16))?)?, false)?;
                for nj in 0..KT / 16 {
                    let key = em.add(k_key, em.i64c(nj * 16))?;
                    let ch = em.add(k_ch, em.i64c(kk * 16))?;
                    let e = em.add(em.i64c(off_k), em.add(em.mul(key, em.i64c(st))?, ch)?)?;
                    let r = ldmatrix(em, saddr(em, e)?, false)?;
                    let n0 = (2 * nj) as usize;
                    s[n0] = mma(em, a, [r[0], r[1]], s[n0])?;
                    s[n0 + 1] = mma(em, a, [r[2], r[3]], s[n0 + 1])?;
                }
            }
            // scale, mask, online softmax per row (h: row g or g + 8)
            let mut p = s.clone();
            for h in 0..2usize {
                let last = rinfo[h].3;
                let mut tmax = ninf;
                for (ni, sv) in s.iter().enumerate() {
                    for e in 0..2usize {
                        let key = em.add(kt, em.add(em.i64c(ni as i64 * 8 + e as i64), em.mul(tq, em.i64c(2))?)?)?;
                        let vis = em.icmp(IntPredicate::SLE, key, last)?;
                        let x = em.fmul(sv[2 * h + e], em.f32c(scale))?;
                        let x = em.select_f(vis, x, ninf)?;
                        p[ni][2 * h + e] = x;
                        tmax = em.fmax(tmax, x)?;
                    }
                }
                let tmax = quad_reduce(em, ReduceOp::Max, tmax)?;
                let m_old = em.getf(m[h])?;
                let m_new = em.fmax(m_old, tmax)?;
                // nothing visible yet: 0 as the reference, so that no −∞ − −∞ appears
                let none = em.fcmp(FloatPredicate::OEQ, m_new, ninf)?;
                let m_ref = em.select_f(none, em.f32c(0.0), m_new)?;
                let corr = em.exp(em.fsub(m_old, m_ref)?)?;
                let mut psum = em.f32c(0.0);
                for pv in p.iter_mut() {
                    for e in 0..2usize {
                        let x = pv[2 * h + e];
                        let masked = em.fcmp(FloatPredicate::OEQ, x, ninf)?;
                        let y = em.exp(em.fsub(x, m_ref)?)?;
                        let y = em.select_f(masked, em.f32c(0.0), y)?;
                        pv[2 * h + e] = y;
                        psum = em.fadd(psum, y)?;
                    }
                }
                em.set(l[h], em.fma(em.getf(l[h])?, corr, psum)?)?;
                for oc in &o {
                    for e in 0..2usize {
                        em.set(oc[2 * h + e], em.fmul(em.getf(oc[2 * h + e])?, corr)?)?;
                    }
                }
                em.set(m[h], m_new)?;
            }
            // O += P·V, 16 keys at a time; P as hi + lo bf16 pairs
            for kb in 0..(KT / 16) as usize {
                let (a0h, a0l) = split_bf16(em, p[2 * kb][0], p[2 * kb][1])?;
                let (a1h, a1l) = split_bf16(em, p[2 * kb][2], p[2 * kb][3])?;
                let (a2h, a2l) = split_bf16(em, p[2 * kb + 1][0], p[2 * kb + 1][1])?;
                let (a3h, a3l) = split_bf16(em, p[2 * kb + 1][2], p[2 * kb + 1][3])?;
                let ahi = [a0h, a1h, a2h, a3h];
                let alo = [a0l, a1l, a2l, a3l];
                for nd in 0..(d / 16) as usize {
                    let key = em.add(v_key, em.i64c(kb as i64 * 16))?;
                    let ch = em.add(v_ch, em.i64c(nd as i64 * 16))?;
                    let e = em.add(em.i64c(off_v), em.add(em.mul(key, em.i64c(st))?, ch)?)?;
                    let r = ldmatrix(em, saddr(em, e)?, true)?;
                    for (half, b) in [[r[0], r[1]], [r[2], r[3]]].into_iter().enumerate() {
                        let oc = &o[2 * nd + half];
                        let mut c = [em.f32c(0.0); 4];
                        for j in 0..4 {
                            c[j] = em.getf(oc[j])?;
                        }
                        let c = mma(em, &ahi, b, c)?;
                        let c = mma(em, &alo, b, c)?;
                        for j in 0..4 {
                            em.set(oc[j], c[j])?;
                        }
                    }
                }
            }
            Ok(())
        })
    })?;

    // O / Σp, through the output view and epilogue
    for (h, (valid, tok, gi, _)) in rinfo.iter().copied().enumerate() {
        let lsum = quad_reduce(em, ReduceOp::Sum, em.getf(l[h])?)?;
        let o = &o;
        em.if_then(valid, |em| {
            for (ni, oc) in o.iter().enumerate() {
                for e in 0..2usize {
                    let c = em.add(em.i64c(ni as i64 * 8 + e as i64), em.mul(tq, em.i64c(2))?)?;
                    let y = em.round(em.fdiv(em.getf(oc[2 * h + e])?, lsum)?, cx.ydt)?;
                    em.finish(t, 0, &[cx.bi, cx.hk, gi, tok, c], Val::F(y), cx.ydt)?;
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}
