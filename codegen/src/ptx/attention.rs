//! Causal GQA flash attention on SIMT cores (a child of `templates`: it uses the operand
//! readers `ld`/`finish` of that module).
//!
//! One block of [`NW`] warps per (batch, kv head, tile of [`BR`] query rows); the rows of a kv
//! head are its G query heads times the new tokens, numbered token-major (row = token·G + g), so
//! that the G heads of one token (same position, same mask) sit in one tile and share every K/V
//! load. Two paths, chosen at run time by the number of rows G·s of a kv head:
//!
//! - **prefill** (G·s > [`RW`]): each warp owns [`RW`] rows; the block walks the keys in tiles of
//!   32 staged through shared memory (f32, K rows padded by 4 floats so that 16-byte reads of 32
//!   different rows hit distinct banks). Scores: lanes over the tile's keys, `q` rows read as
//!   broadcast 16-byte vectors. Online softmax per row in f32 (running max, per-lane partial
//!   sums). `P·V`: the probabilities go through a per-warp shared slot, lanes over the channels
//!   (4 consecutive channels a lane, so d ≤ 128). Tiles past a warp's last visible key are skipped.
//! - **decode** (G·s ≤ [`RW`], e.g. one token of 4 query heads): the keys are split over up to
//!   [`SPLIT`] blocks per (batch, kv head) (the grid's x holds [`SPLIT`] − 1 blocks beyond the
//!   row tiles; at least [`SPLIT_MIN_KEYS`] keys a split), so a batch-1 step fills the GPU.
//!   In a block every warp takes all the rows and its own contiguous share of the block's keys,
//!   reading K/V rows straight from memory, 4 keys in flight, lanes over the channels and a
//!   butterfly for each dot product; the warps' partial (max, sum, accumulator) are combined
//!   through shared memory, and the block's partial goes to the kernel's scratch. The last
//!   block to arrive (an atomic counter per (batch, kv head), `membar.gl` on both sides, volatile
//!   reads) combines the partials, writes the rows and puts the counter back to zero (scratch is
//!   zeroed when the runtime allocates it).
//!
//! Shared memory is dynamic (the launch passes its size; the runtime raises the limit past
//! 48 KiB when needed).

use super::super::emit::{Em, Val, R};
use super::super::SHARED;
use inkwell::module::Linkage;
use inkwell::values::BasicValue;
use inkwell::values::{FloatValue, IntValue, PointerValue};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};
use ir::kernel::{GridDim, LaunchGeometry, Operand, TemplateKernel};
use ir::op::ReduceOp;
use ir::{DType, Dim};

/// Warps per block.
pub(super) const NW: i64 = 8;
/// Query rows per warp (prefill path), and the most rows the decode path takes.
pub(super) const RW: i64 = 4;
/// Query rows per block.
pub(super) const BR: i64 = NW * RW;
/// Keys per shared-memory tile (one per lane).
const KT: i64 = 32;
/// Keys in flight per warp in the decode path.
const U: i64 = 4;
/// At most this many blocks split the keys of one (batch, kv head) in the decode path.
const SPLIT: i64 = 32;
/// Fewest keys per split: shorter caches use fewer blocks.
const SPLIT_MIN_KEYS: i64 = 16;

/// f32 slots of scratch per (batch, kv head) in the decode path: a u32 arrival counter padded
/// to 16 bytes, then `SPLIT` partials of `RW` rows of `[m, l, acc[d]]`. The layout of a
/// (batch, kv head) does not depend on the batch size, so counters (left at zero by every
/// launch) never share bytes with partials, whatever the binding.
fn split_stride(d: i64) -> i64 {
    4 + SPLIT * RW * (d + 2)
}

/// Whether the fast kernels are switched off (`RINGJIT_ATTN=naive`): the simple SIMT versions
/// of `templates` are emitted instead.
pub(crate) fn naive_forced() -> bool {
    std::env::var("RINGJIT_ATTN").is_ok_and(|v| v == "naive")
}

/// The head dim the flash kernel handles: a constant multiple of 4, at most 128.
pub(super) fn flash_head_dim(em: &Em, t: &TemplateKernel) -> Option<i64> {
    if naive_forced() {
        return None;
    }
    let sq = em.operand_shape(t, 0).ok()?;
    let sk = em.operand_shape(t, 1).ok()?;
    if sq.len() != 5 || sk.len() != 4 {
        return None;
    }
    let d = sq[4].as_const()?;
    (d > 0 && d % 4 == 0 && d <= 128).then_some(d)
}

// ---- shared helpers (also used by `linear_attn`) ----------------------------------------------

/// The block's dynamic shared memory, as f32s.
pub(super) fn dyn_smem<'c>(em: &Em<'c, '_>) -> PointerValue<'c> {
    let name = "ringjit_dyn_smem";
    if let Some(g) = em.module.get_global(name) {
        return g.as_pointer_value();
    }
    let arr = em.ctx.f32_type().array_type(0);
    let g = em.module.add_global(arr, Some(AddressSpace::from(SHARED)), name);
    g.set_linkage(Linkage::External);
    g.set_alignment(16);
    g.as_pointer_value()
}

pub(super) fn fptr<'c>(em: &Em<'c, '_>, base: PointerValue<'c>, i: IntValue<'c>) -> R<PointerValue<'c>> {
    use super::super::emit::Ck;
    // SAFETY (of the generated code): callers index inside the arrays they laid out.
    unsafe { em.b.build_in_bounds_gep(em.ctx.f32_type(), base, &[i], "") }.ck()
}

/// f32 at `base[i]`.
pub(super) fn lds<'c>(em: &Em<'c, '_>, base: PointerValue<'c>, i: IntValue<'c>) -> R<FloatValue<'c>> {
    use super::super::emit::Ck;
    let p = fptr(em, base, i)?;
    Ok(em.b.build_load(em.ctx.f32_type(), p, "").ck()?.into_float_value())
}

pub(super) fn sts<'c>(em: &Em<'c, '_>, base: PointerValue<'c>, i: IntValue<'c>, v: FloatValue<'c>) -> R<()> {
    let p = fptr(em, base, i)?;
    em.set(p, v)
}

/// Four f32 at `base[i..i + 4]` (`i` a multiple of 4, the base 16-byte aligned): one 16-byte load.
pub(super) fn lds4<'c>(em: &Em<'c, '_>, base: PointerValue<'c>, i: IntValue<'c>) -> R<[FloatValue<'c>; 4]> {
    use super::super::emit::Ck;
    let p = fptr(em, base, i)?;
    let vt = em.ctx.f32_type().vec_type(4);
    let v = em.b.build_load(vt, p, "").ck()?;
    if let Some(ins) = v.as_instruction_value() {
        ins.set_alignment(16)
            .map_err(|e| super::super::CodegenError(format!("alignment: {e}")))?;
    }
    let v = v.into_vector_value();
    let mut out = [em.f32c(0.0); 4];
    for (e, o) in out.iter_mut().enumerate() {
        *o =
            em.b.build_extract_element(v, em.i32c(e as i32), "")
                .ck()?
                .into_float_value();
    }
    Ok(out)
}

/// One 16-byte store of four f32 at `base[i..i + 4]`.
pub(super) fn sts4<'c>(em: &Em<'c, '_>, base: PointerValue<'c>, i: IntValue<'c>, v: [FloatValue<'c>; 4]) -> R<()> {
    use super::super::emit::Ck;
    let p = fptr(em, base, i)?;
    let vt = em.ctx.f32_type().vec_type(4);
    let mut vec = vt.get_undef();
    for (e, x) in v.iter().enumerate() {
        vec = em.b.build_insert_element(vec, *x, em.i32c(e as i32), "").ck()?;
    }
    let st = em.b.build_store(p, vec).ck()?;
    st.set_alignment(16)
        .map_err(|e| super::super::CodegenError(format!("alignment: {e}")))?;
    Ok(())
}

/// `bar.warp.sync` over the whole warp.
pub(super) fn warp_sync(em: &Em) -> R<()> {
    use super::super::emit::Ck;
    let name = "llvm.nvvm.bar.warp.sync";
    let i32t = em.ctx.i32_type();
    let f = em.module.get_function(name).unwrap_or_else(|| {
        em.module
            .add_function(name, em.ctx.void_type().fn_type(&[i32t.into()], false), None)
    });
    em.b.build_call(f, &[em.i32c(-1).into()], "").ck()?;
    Ok(())
}

/// Whether every coefficient of `d` is a multiple of `k`.
fn dim_multiple(d: &Dim, k: i64) -> bool {
    d.terms().all(|(_, c)| c % k == 0)
}

/// Operand `i` at `prefix ++ [c + e]` for `e` in 0..4 (`c` a multiple of 4), in f32: one
/// vector load when the operand is a plain f32/bf16 buffer whose last axis is contiguous and
/// whose other strides and offset keep 4-element alignment, else four scalar reads.
pub(super) fn ld4<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    i: usize,
    prefix: &[IntValue<'c>],
    c: IntValue<'c>,
) -> R<[FloatValue<'c>; 4]> {
    use super::super::emit::Ck;
    if let Some(Operand::Buffer(b)) = t.operands.get(i) {
        let r = &em.kernel.inputs[*b];
        let dtype = em.plan.buffer(r.buffer).map(|b| b.dtype).unwrap_or(DType::F32);
        let n = r.view.strides.len();
        let vectorisable = matches!(dtype, DType::F32 | DType::BF16)
            && n == prefix.len() + 1
            && r.view.strides[n - 1].as_const() == Some(1)
            && dim_multiple(&r.view.offset, 4)
            && r.view.strides[..n - 1].iter().all(|s| dim_multiple(s, 4));
        if vectorisable {
            let view = r.view.clone();
            let base = em.inputs[*b];
            let mut idx = prefix.to_vec();
            idx.push(c);
            let at = em.view_offset(&view, &idx)?;
            let mut out = [em.f32c(0.0); 4];
            if dtype == DType::F32 {
                return lds4_global(em, base, at);
            }
            let i16t = em.ctx.i16_type();
            // SAFETY (of the generated code): the caller passes an index inside the view.
            let p = unsafe { em.b.build_in_bounds_gep(i16t, base, &[at], "") }.ck()?;
            let vt = i16t.vec_type(4);
            let v = em.b.build_load(vt, p, "").ck()?;
            if let Some(ins) = v.as_instruction_value() {
                ins.set_alignment(8)
                    .map_err(|e| super::super::CodegenError(format!("alignment: {e}")))?;
            }
            let v = v.into_vector_value();
            let i32t = em.ctx.i32_type();
            for (e, o) in out.iter_mut().enumerate() {
                let h =
                    em.b.build_extract_element(v, em.i32c(e as i32), "")
                        .ck()?
                        .into_int_value();
                let w = em.b.build_int_z_extend(h, i32t, "").ck()?;
                let s = em.b.build_left_shift(w, i32t.const_int(16, false), "").ck()?;
                *o = em.b.build_bit_cast(s, em.ctx.f32_type(), "").ck()?.into_float_value();
            }
            return Ok(out);
        }
    }
    let mut out = [em.f32c(0.0); 4];
    for (e, o) in out.iter_mut().enumerate() {
        let mut idx = prefix.to_vec();
        idx.push(em.add(c, em.i64c(e as i64))?);
        *o = em.ldf(t, i, &idx)?;
    }
    Ok(out)
}

fn lds4_global<'c>(em: &Em<'c, '_>, base: PointerValue<'c>, at: IntValue<'c>) -> R<[FloatValue<'c>; 4]> {
    lds4(em, base, at)
}

fn neg_inf<'c>(em: &Em<'c, '_>) -> FloatValue<'c> {
    em.identity(ReduceOp::Max)
}

/// The online-softmax step of one row: fold score `s` (−∞ when masked) with value weights into
/// (`m`, `l`, `acc`); returns `p` (0 when masked). `l` may be a per-lane partial sum.
fn online<'c>(
    em: &Em<'c, '_>,
    m: PointerValue<'c>,
    l: PointerValue<'c>,
    acc: &[PointerValue<'c>],
    s: FloatValue<'c>,
    tile_max: FloatValue<'c>,
) -> R<FloatValue<'c>> {
    let m_old = em.getf(m)?;
    let m_new = em.fmax(m_old, tile_max)?;
    // nothing visible yet: keep 0 as the reference so that no −∞ − −∞ appears
    let none = em.fcmp(FloatPredicate::OEQ, m_new, neg_inf(em))?;
    let m_ref = em.select_f(none, em.f32c(0.0), m_new)?;
    let corr = em.exp(em.fsub(m_old, m_ref)?)?;
    let masked = em.fcmp(FloatPredicate::OEQ, s, neg_inf(em))?;
    let p = em.exp(em.fsub(s, m_ref)?)?;
    let p = em.select_f(masked, em.f32c(0.0), p)?;
    em.set(l, em.fma(em.getf(l)?, corr, p)?)?;
    for a in acc {
        em.set(*a, em.fmul(em.getf(*a)?, corr)?)?;
    }
    em.set(m, m_new)?;
    Ok(p)
}

/// The flash kernel (see the module docs); `d` from [`flash_head_dim`].
pub(super) fn flash<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, scale: f64, d: i64) -> R<LaunchGeometry> {
    let (sq, sk) = (em.operand_shape(t, 0)?, em.operand_shape(t, 1)?);
    let ydt = em.result_dtype(t, 0);
    let (hkv, g, s, tk) = (em.dim(&sq[1])?, em.dim(&sq[2])?, em.dim(&sq[3])?, em.dim(&sk[2])?);
    let rows = em.mul(g, s)?;
    let decode = em.icmp(IntPredicate::SLE, rows, em.i64c(RW))?;
    // the row tile (always 0 in the decode path, whose blocks split the keys instead)
    let tile = em.select_i(decode, em.i64c(0), em.sreg("ctaid.x")?)?;
    let dd = em.i64c(d);
    let (zero, one) = (em.i64c(0), em.i64c(1));
    let smem = dyn_smem(em);
    // layout (f32 offsets): K tile [KT][d+4], V tile [KT][d], Q [BR][d], P [NW][RW][32]
    let kst = d + 4;
    let off_v = KT * kst;
    let off_q = off_v + KT * d;
    let off_p = off_q + BR * d;
    let total = off_p + NW * RW * 32;
    let ks = smem;
    let vs = fptr(em, smem, em.i64c(off_v))?;
    let qs = fptr(em, smem, em.i64c(off_q))?;
    let ps = fptr(em, smem, em.i64c(off_p))?;

    let tid = em.sreg("tid.x")?;
    let lane = em.rem(tid, em.i64c(32))?;
    let warp = em.div(tid, em.i64c(32))?;
    let bh = em.sreg("ctaid.y")?;
    let (bi, hk) = (em.div(bh, hkv)?, em.rem(bh, hkv)?);
    let nthreads = em.i64c(NW * 32);
    let d4 = em.i64c(d / 4);
    // this lane's 4 channels in the P·V and output steps (idle lanes when d < 128)
    let ch = em.mul(lane, em.i64c(4))?;
    let ch_ok = em.icmp(IntPredicate::SLT, ch, dd)?;
    let chc = em.select_i(ch_ok, ch, zero)?;

    // row → (g, token), clamped in range; the last key the row sees (−1: none / no row)
    let row_info =
        |em: &mut Em<'c, '_>, row: IntValue<'c>| -> R<(IntValue<'c>, IntValue<'c>, IntValue<'c>, IntValue<'c>)> {
            let valid = em.icmp(IntPredicate::SLT, row, rows)?;
            let rc = em.select_i(valid, row, em.i64c(0))?;
            let tok = em.div(rc, g)?;
            let gi = em.rem(rc, g)?;
            let p = em.ld(t, 3, &[tok])?;
            let p = em.as_i(p)?;
            let last = em.imin(p, em.sub(tk, em.i64c(1))?)?;
            let last = em.select_i(valid, last, em.i64c(-1))?;
            Ok((valid, tok, gi, last))
        };

    // the tensor-core prefill path takes ROWS rows a block and stages its own (bf16) Q
    let mma = super::attention_mma::eligible(em, t, d);
    let block_rows = if mma { super::attention_mma::ROWS } else { BR };
    let simt_q = if mma {
        decode
    } else {
        em.icmp(IntPredicate::EQ, zero, zero)?
    };

    // stage the block's query rows (pre-scaled) into Q
    let qn = em.i64c(BR * d / 4);
    em.if_then(simt_q, |em| {
        em.for_range(tid, qn, nthreads, |em, i4| {
            let r = em.div(i4, d4)?;
            let c = em.mul(em.rem(i4, d4)?, em.i64c(4))?;
            let row = em.add(em.mul(tile, em.i64c(BR))?, r)?;
            let valid = em.icmp(IntPredicate::SLT, row, rows)?;
            let rc = em.select_i(valid, row, em.i64c(0))?;
            let (tok, gi) = (em.div(rc, g)?, em.rem(rc, g)?);
            let x = ld4(em, t, 0, &[bi, hk, gi, tok], c)?;
            let mut y = [em.f32c(0.0); 4];
            for e in 0..4 {
                let v = em.fmul(x[e], em.f32c(scale))?;
                y[e] = em.select_f(valid, v, em.f32c(0.0))?;
            }
            sts4(em, qs, em.add(em.mul(r, dd)?, c)?, y)
        })
    })?;
    em.barrier()?;

    let pre_bb = em.ctx.append_basic_block(em.f, "attn.prefill");
    let dec_bb = em.ctx.append_basic_block(em.f, "attn.decode");
    let done_bb = em.ctx.append_basic_block(em.f, "attn.done");
    {
        use super::super::emit::Ck;
        em.b.build_conditional_branch(decode, dec_bb, pre_bb).ck()?;
    }

    // ---------------- prefill path ----------------
    em.b.position_at_end(pre_bb);
    if mma {
        let cx = super::attention_mma::Ctx {
            bi,
            hk,
            g,
            rows,
            tk,
            ydt,
        };
        super::attention_mma::prefill(em, t, scale, d, &cx)?;
    } else {
        let row0 = em.add(em.mul(tile, em.i64c(BR))?, em.mul(warp, em.i64c(RW))?)?;
        let mut info = Vec::new();
        let mut wmax = em.i64c(-1);
        for r in 0..RW {
            let row = em.add(row0, em.i64c(r))?;
            let ri = row_info(em, row)?;
            wmax = em.imax(wmax, ri.3)?;
            info.push(ri);
        }
        let kend_f = em.block_reduce(ReduceOp::Max, em.sitofp(em.add(wmax, one)?)?)?;
        let kend = em.fptosi(kend_f)?;
        let ninf = neg_inf(em);
        let m: Vec<_> = (0..RW).map(|_| em.fvar(ninf)).collect::<R<_>>()?;
        let l: Vec<_> = (0..RW).map(|_| em.fvar(em.f32c(0.0))).collect::<R<_>>()?;
        let acc: Vec<Vec<_>> = (0..RW)
            .map(|_| (0..4).map(|_| em.fvar(em.f32c(0.0))).collect::<R<Vec<_>>>())
            .collect::<R<_>>()?;
        em.for_range(zero, kend, em.i64c(KT), |em, j0| {
            em.barrier()?;
            let kn = em.i64c(KT * d / 4);
            em.for_range(tid, kn, nthreads, |em, i4| {
                let j = em.div(i4, d4)?;
                let c = em.mul(em.rem(i4, d4)?, em.i64c(4))?;
                let key = em.add(j0, j)?;
                let ok = em.icmp(IntPredicate::SLT, key, tk)?;
                let kc = em.select_i(ok, key, zero)?;
                let kx = ld4(em, t, 1, &[bi, hk, kc], c)?;
                let vx = ld4(em, t, 2, &[bi, hk, kc], c)?;
                let mut k0 = [em.f32c(0.0); 4];
                let mut v0 = [em.f32c(0.0); 4];
                for e in 0..4 {
                    k0[e] = em.select_f(ok, kx[e], em.f32c(0.0))?;
                    v0[e] = em.select_f(ok, vx[e], em.f32c(0.0))?;
                }
                sts4(em, ks, em.add(em.mul(j, em.i64c(kst))?, c)?, k0)?;
                sts4(em, vs, em.add(em.mul(j, dd)?, c)?, v0)
            })?;
            em.barrier()?;
            let live = em.icmp(IntPredicate::SLE, j0, wmax)?;
            em.if_then(live, |em| {
                let sv: Vec<_> = (0..RW).map(|_| em.fvar(em.f32c(0.0))).collect::<R<_>>()?;
                let krow = em.mul(lane, em.i64c(kst))?;
                em.for_range(zero, dd, em.i64c(4), |em, c| {
                    let k4 = lds4(em, ks, em.add(krow, c)?)?;
                    for r in 0..RW {
                        let qrow = em.mul(em.add(em.mul(warp, em.i64c(RW))?, em.i64c(r))?, dd)?;
                        let q4 = lds4(em, qs, em.add(qrow, c)?)?;
                        let mut a = em.getf(sv[r as usize])?;
                        for e in 0..4 {
                            a = em.fma(q4[e], k4[e], a)?;
                        }
                        em.set(sv[r as usize], a)?;
                    }
                    Ok(())
                })?;
                let key = em.add(j0, lane)?;
                for r in 0..RW {
                    let ru = r as usize;
                    let vis = em.icmp(IntPredicate::SLE, key, info[ru].3)?;
                    let sc = em.select_f(vis, em.getf(sv[ru])?, neg_inf(em))?;
                    let tmax = em.warp_reduce(ReduceOp::Max, sc)?;
                    let p = online(em, m[ru], l[ru], &acc[ru], sc, tmax)?;
                    let pi = em.add(
                        em.mul(em.add(em.mul(warp, em.i64c(RW))?, em.i64c(r))?, em.i64c(32))?,
                        lane,
                    )?;
                    sts(em, ps, pi, p)?;
                }
                warp_sync(em)?;
                em.for_range(zero, em.i64c(KT), em.i64c(4), |em, j| {
                    let mut p4 = Vec::new();
                    for r in 0..RW {
                        let pi = em.add(em.mul(em.add(em.mul(warp, em.i64c(RW))?, em.i64c(r))?, em.i64c(32))?, j)?;
                        p4.push(lds4(em, ps, pi)?);
                    }
                    for jj in 0..4 {
                        let vrow = em.mul(em.add(j, em.i64c(jj))?, dd)?;
                        let v4 = lds4(em, vs, em.add(vrow, chc)?)?;
                        for r in 0..RW as usize {
                            for e in 0..4 {
                                let a = em.fma(p4[r][jj as usize], v4[e], em.getf(acc[r][e])?)?;
                                em.set(acc[r][e], a)?;
                            }
                        }
                    }
                    Ok(())
                })?;
                Ok(())
            })
        })?;
        for r in 0..RW as usize {
            let lsum = em.warp_reduce(ReduceOp::Sum, em.getf(l[r])?)?;
            let (valid, tok, gi, _) = info[r];
            let w = em.and(valid, ch_ok)?;
            let accr = acc[r].clone();
            em.if_then(w, |em| {
                for (e, a) in accr.iter().enumerate() {
                    let y = em.round(em.fdiv(em.getf(*a)?, lsum)?, ydt)?;
                    let c = em.add(ch, em.i64c(e as i64))?;
                    em.finish(t, 0, &[bi, hk, gi, tok, c], Val::F(y), ydt)?;
                }
                Ok(())
            })?;
        }
    }
    {
        use super::super::emit::Ck;
        em.b.build_unconditional_branch(done_bb).ck()?;
    }

    // ---------------- decode path ----------------
    em.b.position_at_end(dec_bb);
    {
        let mut info = Vec::new();
        let mut kmax = em.i64c(-1);
        for r in 0..RW {
            let ri = row_info(em, em.i64c(r))?;
            kmax = em.imax(kmax, ri.3)?;
            info.push(ri);
        }
        let kend = em.add(kmax, one)?;
        // the keys split over the blocks x < nsplit (the same count in every block)
        let z = em.sreg("ctaid.x")?;
        let want = em.ceil_div(kend, em.i64c(SPLIT_MIN_KEYS))?;
        let nsplit = em.imax(one, em.imin(em.i64c(SPLIT), want)?)?;
        let active = em.icmp(IntPredicate::SLT, z, nsplit)?;
        let cx = Dec {
            d,
            bh,
            bi,
            hk,
            z,
            nsplit,
            kend,
            qs,
            ks,
            ch,
            chc,
            ch_ok,
            lane,
            warp,
            tid,
            ydt,
        };
        em.if_then(active, |em| decode_split(em, t, &cx, &info, &row_info))?;
    }
    {
        use super::super::emit::Ck;
        em.b.build_unconditional_branch(done_bb).ck()?;
    }
    em.b.position_at_end(done_bb);

    em.scratch_bytes = sq[0].mul(&sq[1]).mul(&Dim::constant(split_stride(d) * 4));
    if em.prefill {
        // a prefill plan's scratch is shared with the grouped down projection, which leaves
        // its rows there: zero the counters (the whole small region) before each launch
        em.scratch_zero = em.scratch_bytes.clone();
    }
    let smem_bytes = match mma {
        true => (total * 4).max(super::attention_mma::smem_bytes(d)),
        false => total * 4,
    };
    Ok(LaunchGeometry {
        grid: [
            // the row tiles, plus SPLIT - 1 more blocks for the decode path's key splits
            GridDim::blocks(
                sq[2].mul(&sq[3]).add(&Dim::constant((SPLIT - 1) * block_rows)),
                block_rows as u32,
            ),
            GridDim::blocks(sq[0].mul(&sq[1]), 1),
            GridDim::one(),
        ],
        block: [(NW * 32) as u32, 1, 1],
        shared_bytes: smem_bytes as u32,
    })
}

/// The decode path's values of one block (see [`decode_split`]).
struct Dec<'c> {
    d: i64,
    bh: IntValue<'c>,
    bi: IntValue<'c>,
    hk: IntValue<'c>,
    /// This block's split and the split count.
    z: IntValue<'c>,
    nsplit: IntValue<'c>,
    /// One past the last key any row sees.
    kend: IntValue<'c>,
    qs: PointerValue<'c>,
    ks: PointerValue<'c>,
    ch: IntValue<'c>,
    chc: IntValue<'c>,
    ch_ok: IntValue<'c>,
    lane: IntValue<'c>,
    warp: IntValue<'c>,
    tid: IntValue<'c>,
    ydt: DType,
}

type RowInfo<'c> = (IntValue<'c>, IntValue<'c>, IntValue<'c>, IntValue<'c>);

/// Decode attention over split `z` of the keys: the 8 warps take contiguous shares of the
/// split (4 keys in flight, lanes over channels, a butterfly per dot product), their partial
/// (max, sum, accumulator) rows are combined in shared memory, and the block's partial goes to
/// scratch. The last block of the (batch, kv head) to arrive (an atomic counter, fences on
/// both sides) combines the `nsplit` partials, writes the rows and resets the counter.
fn decode_split<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    cx: &Dec<'c>,
    info: &[RowInfo<'c>],
    row_info: &dyn Fn(&mut Em<'c, '_>, IntValue<'c>) -> R<RowInfo<'c>>,
) -> R<()> {
    use super::super::emit::Ck;
    let d = cx.d;
    let (zero, one) = (em.i64c(0), em.i64c(1));
    let (qs, ks, ch, chc, ch_ok, lane, warp) = (cx.qs, cx.ks, cx.ch, cx.chc, cx.ch_ok, cx.lane, cx.warp);
    let (bi, hk) = (cx.bi, cx.hk);
    // q rows in registers: this lane's 4 channels (0 on idle lanes)
    let mut qr = Vec::new();
    for r in 0..RW {
        let q4 = lds4(em, qs, em.add(em.i64c(r * d), chc)?)?;
        let mut x = [em.f32c(0.0); 4];
        for e in 0..4 {
            x[e] = em.select_f(ch_ok, q4[e], em.f32c(0.0))?;
        }
        qr.push(x);
    }
    let ninf = neg_inf(em);
    let m: Vec<_> = (0..RW).map(|_| em.fvar(ninf)).collect::<R<_>>()?;
    let l: Vec<_> = (0..RW).map(|_| em.fvar(em.f32c(0.0))).collect::<R<_>>()?;
    let acc: Vec<Vec<_>> = (0..RW)
        .map(|_| (0..4).map(|_| em.fvar(em.f32c(0.0))).collect::<R<Vec<_>>>())
        .collect::<R<_>>()?;
    // this block's keys zb..ze, then this warp's share kb..ke
    let span = em.ceil_div(cx.kend, cx.nsplit)?;
    let zb = em.mul(cx.z, span)?;
    let ze = em.imin(em.add(zb, span)?, cx.kend)?;
    let n = em.imax(em.sub(ze, zb)?, zero)?;
    let chunk = em.ceil_div(n, em.i64c(NW))?;
    let kb = em.add(zb, em.mul(warp, chunk)?)?;
    let ke = em.imin(em.add(kb, chunk)?, ze)?;
    em.for_range(kb, ke, em.i64c(U), |em, j| {
        let mut kk = Vec::new();
        for u in 0..U {
            let key = em.add(j, em.i64c(u))?;
            let ok = em.icmp(IntPredicate::SLT, key, ke)?;
            let kc = em.select_i(ok, key, zero)?;
            let k4 = ld4(em, t, 1, &[bi, hk, kc], chc)?;
            let v4 = ld4(em, t, 2, &[bi, hk, kc], chc)?;
            kk.push((key, ok, k4, v4));
        }
        for (key, ok, k4, v4) in kk {
            for r in 0..RW as usize {
                let mut part = em.f32c(0.0);
                for e in 0..4 {
                    part = em.fma(qr[r][e], k4[e], part)?;
                }
                let sdot = em.warp_reduce(ReduceOp::Sum, part)?;
                let vis = em.and(ok, em.icmp(IntPredicate::SLE, key, info[r].3)?)?;
                let sc = em.select_f(vis, sdot, neg_inf(em))?;
                let p = online(em, m[r], l[r], &acc[r], sc, sc)?;
                for e in 0..4 {
                    let a = em.fma(p, v4[e], em.getf(acc[r][e])?)?;
                    em.set(acc[r][e], a)?;
                }
            }
        }
        Ok(())
    })?;
    // combine the warps: slot (warp, r) = [m, l, acc[d]] over the K tile area
    let cst = d + 2;
    for r in 0..RW as usize {
        let base = em.mul(em.add(em.mul(warp, em.i64c(RW))?, em.i64c(r as i64))?, em.i64c(cst))?;
        let is0 = em.icmp(IntPredicate::EQ, lane, zero)?;
        let (mv, lv) = (em.getf(m[r])?, em.getf(l[r])?);
        em.if_then(is0, |em| {
            sts(em, ks, base, mv)?;
            sts(em, ks, em.add(base, one)?, lv)
        })?;
        let accr = acc[r].clone();
        em.if_then(ch_ok, |em| {
            for (e, a) in accr.iter().enumerate() {
                let at = em.add(em.add(base, em.i64c(2 + e as i64))?, ch)?;
                sts(em, ks, at, em.getf(*a)?)?;
            }
            Ok(())
        })?;
    }
    em.barrier()?;
    // scratch of this (batch, kv head): counter, then partial (split, row) at
    // 4 + (split·RW + row)·(d + 2)
    let scratch = em.scratch;
    let region = em.mul(cx.bh, em.i64c(split_stride(d)))?;
    let partial = |em: &Em<'c, '_>, split: IntValue<'c>, row: IntValue<'c>| -> R<IntValue<'c>> {
        let slot = em.add(em.mul(split, em.i64c(RW))?, row)?;
        em.add(region, em.add(em.i64c(4), em.mul(slot, em.i64c(cst))?)?)
    };
    // warp r < RW combines row r over the warps and stores the block's partial
    let rr = warp;
    let mine = em.icmp(IntPredicate::SLT, rr, em.i64c(RW))?;
    em.if_then(mine, |em| {
        let (m_all, l_all, a_all) = merge(em, cx.chc, em.i64c(NW), |em, w| {
            let base = em.mul(em.add(em.mul(w, em.i64c(RW))?, rr)?, em.i64c(cst))?;
            Ok((
                lds(em, ks, base)?,
                lds(em, ks, em.add(base, one)?)?,
                ks,
                em.add(base, em.i64c(2))?,
            ))
        })?;
        let at = partial(em, cx.z, rr)?;
        let is0 = em.icmp(IntPredicate::EQ, lane, zero)?;
        em.if_then(is0, |em| {
            sts(em, scratch, at, m_all)?;
            sts(em, scratch, em.add(at, one)?, l_all)
        })?;
        em.if_then(ch_ok, |em| {
            for (e, a) in a_all.iter().enumerate() {
                sts(em, scratch, em.add(em.add(at, em.i64c(2 + e as i64))?, ch)?, *a)?;
            }
            Ok(())
        })
    })?;
    // publish, then count the arrival; the last block combines
    fence(em)?;
    em.barrier()?;
    let counter = fptr(em, scratch, region)?;
    let n1 =
        em.b.build_int_truncate(em.sub(cx.nsplit, one)?, em.ctx.i32_type(), "")
            .ck()?;
    // (the fences are the block's own: before its barrier above, and in the last block below)
    let is_last = em.block_arrives_last("ringjit_attn_last", counter, n1, |_| Ok(()))?;
    let first = em.icmp(IntPredicate::EQ, cx.tid, zero)?;
    em.if_then(is_last, |em| {
        fence(em)?;
        em.if_then(mine, |em| {
            let (valid, tok, gi, _) = row_info(em, rr)?;
            let (_, lsum, a_all) = merge(em, cx.chc, cx.nsplit, |em, z| {
                let at = partial(em, z, rr)?;
                Ok((
                    ldv(em, scratch, at)?,
                    ldv(em, scratch, em.add(at, one)?)?,
                    scratch,
                    em.add(at, em.i64c(2))?,
                ))
            })?;
            let w = em.and(valid, ch_ok)?;
            em.if_then(w, |em| {
                for (e, a) in a_all.iter().enumerate() {
                    let y = em.round(em.fdiv(*a, lsum)?, cx.ydt)?;
                    let c = em.add(ch, em.i64c(e as i64))?;
                    em.finish(t, 0, &[bi, hk, gi, tok, c], Val::F(y), cx.ydt)?;
                }
                Ok(())
            })
        })?;
        em.if_then(first, |em| em.reset_counter(counter))
    })
}

/// Combine `n` partial softmax states `(m, l, acc)` (`part(i)` gives m, l and where this
/// lane's 4 accumulator channels start, at channel `chc`): the overall max `M`, and `l` and
/// `acc` rescaled by `exp(m_i − M)` and summed (a state with no visible key has m = −∞ and
/// weighs 0). Returns (M, l, acc[4]).
type Part<'c> = (FloatValue<'c>, FloatValue<'c>, PointerValue<'c>, IntValue<'c>);
fn merge<'c>(
    em: &mut Em<'c, '_>,
    chc: IntValue<'c>,
    n: IntValue<'c>,
    part: impl Fn(&mut Em<'c, '_>, IntValue<'c>) -> R<Part<'c>>,
) -> R<(FloatValue<'c>, FloatValue<'c>, [FloatValue<'c>; 4])> {
    let (zero, one) = (em.i64c(0), em.i64c(1));
    let mm = em.fvar(neg_inf(em))?;
    em.for_range(zero, n, one, |em, i| {
        let (mi, _, _, _) = part(em, i)?;
        em.set(mm, em.fmax(em.getf(mm)?, mi)?)
    })?;
    let mx = em.getf(mm)?;
    let none = em.fcmp(FloatPredicate::OEQ, mx, neg_inf(em))?;
    let mref = em.select_f(none, em.f32c(0.0), mx)?;
    let lt = em.fvar(em.f32c(0.0))?;
    let at: Vec<_> = (0..4).map(|_| em.fvar(em.f32c(0.0))).collect::<R<_>>()?;
    em.for_range(zero, n, one, |em, i| {
        let (mi, li, base, off) = part(em, i)?;
        let f = em.exp(em.fsub(mi, mref)?)?;
        em.set(lt, em.fma(li, f, em.getf(lt)?)?)?;
        for (e, a) in at.iter().enumerate() {
            let at = em.add(em.add(off, em.i64c(e as i64))?, chc)?;
            let x = if base == em.scratch {
                ldv(em, base, at)?
            } else {
                lds(em, base, at)?
            };
            em.set(*a, em.fma(x, f, em.getf(*a)?)?)?;
        }
        Ok(())
    })?;
    let mut acc = [em.f32c(0.0); 4];
    for (e, a) in at.iter().enumerate() {
        acc[e] = em.getf(*a)?;
    }
    Ok((mx, em.getf(lt)?, acc))
}

/// A volatile f32 load of `base[i]` (global memory another block wrote: never from L1).
pub(super) fn ldv<'c>(em: &Em<'c, '_>, base: PointerValue<'c>, i: IntValue<'c>) -> R<FloatValue<'c>> {
    use super::super::emit::Ck;
    let p = fptr(em, base, i)?;
    let v = em.b.build_load(em.ctx.f32_type(), p, "").ck()?;
    if let Some(ins) = v.as_instruction_value() {
        ins.set_volatile(true)
            .map_err(|e| super::super::CodegenError(e.to_string()))?;
    }
    Ok(v.into_float_value())
}

/// `membar.gl`: this thread's global writes are visible device-wide before its later ones.
pub(super) fn fence(em: &Em) -> R<()> {
    em.asm_ordered("membar.gl;")
}

/// `fence.acq_rel.gpu`: this thread's (and, cumulatively, what it has observed of its block's)
/// memory operations before it are ordered before those after it, device-wide.
pub(super) fn fence_acq_rel(em: &Em) -> R<()> {
    em.asm_ordered("fence.acq_rel.gpu;")
}
