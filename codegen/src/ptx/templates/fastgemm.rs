//! The fast paths of the bf16 `Gemm` template (f32 accumulation), for a weight-like `B`: a
//! rank-2 bf16 buffer broadcast over the batch dims, stored `[N, K]` (ColMajor as `[K, N]`, the
//! transposed HF weight). The rows of every batch entry are flattened, `R = Π batch · M`, and
//! one kernel holds two algorithms, chosen at run time on `R` (uniform over the grid):
//!
//! * `R <= GEMV_ROWS` (decode): a GEMV. Each warp owns `GEMV_CN` columns of `B` and streams
//!   them along K with 16-byte loads (`UNROLL` k-steps in flight); the block first stages up to
//!   `GEMV_RT` rows of `A` (through its view or prologue) in shared memory as bf16, so every
//!   loaded weight vector serves all rows; lanes reduce with shuffles.
//! * otherwise: a tensor-core GEMM, block tile 128×128×64, 8 warps of 64×32, `mma.sync
//!   m16n8k16` bf16 with f32 accumulators, operands staged in dynamic shared memory (rows padded
//!   to 144 bytes: conflict-free `ldmatrix`), three stages, `cp.async` 16-byte copies with zero fill
//!   for ragged M/N/K. An `A` with a prologue (or an unaligned view) is computed element by
//!   element into shared memory instead of copied.
//!
//! One grid serves both (`gemm_fast`): x about 8 · ceil(N/128) blocks (at least the GEMV's
//! ceil(N/16)), y ceil(R/1024); the tensor-core tiles are numbered in launch order over it and
//! the blocks past them exit at once, as do the GEMV's past N (with a folded route they skip to
//! the route's arrival count instead: `route::route_tail`). Results go through the template's
//! epilogue exactly as the SIMT path does. Anything else (f32 operands, a computed or batched
//! `B`, K not a constant multiple of 8) keeps the SIMT path. `RINGJIT_GEMM=naive` forces the
//! SIMT path everywhere.

use super::super::emit::{knob, Ck, Em, Val, R};
use super::matrix_index;
use inkwell::values::{BasicValue, BasicValueEnum, FloatValue, IntValue, PointerValue, VectorValue};
use inkwell::IntPredicate;
use ir::kernel::{
    ExprGraph, ExprId, Gemm, GridDim, IndexExpr, IndexVar, LaunchGeometry, Operand, RowNorm, ScalarOp, TemplateKernel,
    View,
};
use ir::op::BinaryOp;
use ir::op::ReduceOp;
use ir::shape::numel;
use ir::{DType, Dim};

const THREADS: u32 = 256;
const BM: i64 = 128;
const BN: i64 = 128;
const BK: i64 = 64;
/// Pipeline stages (shared-memory buffers of A and B tiles in flight).
const STAGES: i64 = 3;
/// Shared row stride of a staged tile, in bf16 elements (144 bytes: 9 16-byte units, so the 8
/// rows an `ldmatrix` reads fall in 8 different bank groups).
const LDS: i64 = BK + 8;
/// bf16 elements of one pipeline stage (the A tile, then the B tile).
const STAGE: i64 = (BM + BN) * LDS;
/// At most this many rows: the GEMV.
pub(crate) const GEMV_ROWS: i64 = 16;
/// Rows of A per GEMV pass (held in shared memory).
const GEMV_RT: i64 = 8;
/// Columns per warp in the GEMV.
const GEMV_CN: i64 = 2;
/// Columns per block in the GEMV (8 warps).
const GEMV_COLS: i64 = 8 * GEMV_CN;
/// K chunk of A staged in shared memory by the GEMV.
const GEMV_KC: i64 = 2048;
/// The one dynamic shared array, in bf16 elements: the stages, or the GEMV's A rows.
const SMEM_ELEMS: i64 = STAGES * STAGE;
/// Chunks of 8 bf16 per tile row.
const ROW_CHUNKS: i64 = BK / 8;
/// Rows of a tile one pass of the block's threads copies.
const ROWS_PER_PASS: i64 = THREADS as i64 / ROW_CHUNKS;
const _: () = assert!(GEMV_RT * GEMV_KC <= SMEM_ELEMS);
/// The GEMV's f32 slots of the rows' 1/rms (a folded norm), past its staged A rows.
const GEMV_INV: i64 = GEMV_RT * GEMV_KC / 2;
const _: () = assert!(2 * (GEMV_INV + GEMV_RT) <= SMEM_ELEMS);
/// Warp steps (256 elements of K each) whose weight loads are issued together.
const UNROLL: i64 = 4;

/// Whether the fast paths are on (`RINGJIT_GEMM=naive` turns them off).
pub(crate) fn enabled() -> bool {
    std::env::var("RINGJIT_GEMM").map(|v| v != "naive").unwrap_or(true)
}

/// Every coefficient a multiple of 8: 16-byte alignment of bf16 offsets.
fn aligned8(d: &Dim) -> bool {
    d.terms().all(|(_, c)| c % 8 == 0)
}

struct Shape {
    /// Where B's columns live (ascending, contiguous ranges of n).
    b: Vec<BPart>,
    /// Input index of A when it can be copied 16 bytes at a time (RowMajor, aligned, bf16).
    a_direct: Option<usize>,
    k: i64,
}

/// Columns from `lo` (to the next part's `lo`) of B are the rows `n + shift` of a bf16 matrix
/// with K contiguous: element (k, n) at `offset + (n + shift) · n_stride + k` of input `input`.
struct BPart {
    input: usize,
    lo: i64,
    offset: Dim,
    n_stride: Dim,
    shift: i64,
}

/// The view of input `i` when its buffer is bf16.
fn bf16_view<'k>(em: &Em<'_, 'k>, i: usize) -> Option<&'k ir::kernel::View> {
    let r = em.kernel.inputs.get(i)?;
    (em.plan.buffer(r.buffer)?.dtype == DType::BF16).then_some(&r.view)
}

/// `i` is exactly `Loop(v) + off` for a constant `off`: `Some(off)`.
fn var_plus(i: &IndexExpr, v: u32) -> Option<i64> {
    match i.terms.as_slice() {
        [(IndexVar::Loop(l), c)] if *l == v && *c == Dim::constant(1) => i.offset.as_const(),
        _ => None,
    }
}

/// B's layout as parts, when every element is a bf16 weight read in place: a rank-2 bf16
/// buffer stored `[N, K]` (viewed `[K, N]`, stride 1 along k), or a prologue over `[K, N]`
/// made of in-range loads of such matrices (`load in[i1 + c, i0]` / `load in[i0, i1 + c]`),
/// `where(i1 < c, ..)` splits along n (a concatenation of weights) and casts of bf16 values
/// (exact, so the product of the cast values is the product of the bf16 values).
fn b_parts(em: &Em, t: &TemplateKernel, g: &Gemm, k: i64) -> R<Option<Vec<BPart>>> {
    let one = Dim::constant(1);
    match t.operands.get(1) {
        Some(Operand::Buffer(b)) => {
            let Some(v) = bf16_view(em, *b) else { return Ok(None) };
            let ok = v.rank() == 2 && v.strides[0] == one && aligned8(&v.strides[1]) && aligned8(&v.offset);
            Ok(ok.then(|| {
                vec![BPart {
                    input: *b,
                    lo: 0,
                    offset: v.offset.clone(),
                    n_stride: v.strides[1].clone(),
                    shift: 0,
                }]
            }))
        }
        Some(Operand::Prologue(f)) => {
            let (Some(&root), Some(n)) = (f.stores.first(), g.n.as_const()) else {
                return Ok(None);
            };
            if f.domain.len() != 2 || f.domain[0] != g.k || f.domain[1] != g.n {
                return Ok(None);
            }
            let mut parts = Vec::new();
            let ok = prologue_parts(em, &f.exprs, root, (0, n), k, &mut parts);
            Ok((ok && !parts.is_empty()).then_some(parts))
        }
        None => Ok(None),
    }
}

/// The parts of prologue node `e` over the columns `lo..hi` (see [`b_parts`]); false when `e`
/// is anything else.
fn prologue_parts(em: &Em, x: &ExprGraph, e: ExprId, (lo, hi): (i64, i64), k: i64, out: &mut Vec<BPart>) -> bool {
    let Some(node) = x.get(e) else { return false };
    match &node.op {
        ScalarOp::Cast(a) => {
            let from = x.get(*a).map(|n| n.dtype);
            from == Some(DType::BF16)
                && matches!(node.dtype, DType::F32 | DType::BF16)
                && prologue_parts(em, x, *a, (lo, hi), k, out)
        }
        ScalarOp::Where(c, a, b) => {
            let split = match x.get(*c).map(|n| &n.op) {
                Some(ScalarOp::Binary(BinaryOp::Lt, l, r)) => {
                    match (x.get(*l).map(|n| &n.op), x.get(*r).map(|n| &n.op)) {
                        (Some(ScalarOp::Index(l)), Some(ScalarOp::Index(r))) if var_plus(l, 1) == Some(0) => {
                            r.as_const().and_then(Dim::as_const)
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            let Some(c) = split else { return false };
            let mid = c.clamp(lo, hi);
            (lo >= mid || prologue_parts(em, x, *a, (lo, mid), k, out))
                && (mid >= hi || prologue_parts(em, x, *b, (mid, hi), k, out))
        }
        ScalarOp::Load { input, index } => {
            let Some(v) = bf16_view(em, *input) else { return false };
            if node.dtype != DType::BF16 || v.rank() != 2 || index.len() != 2 {
                return false;
            }
            // which view dim runs along k (offset 0) and which along n (offset `shift`)
            let (kd, nd, shift) = match (var_plus(&index[0], 0), var_plus(&index[1], 1)) {
                (Some(0), Some(s)) => (0, 1, s),
                _ => match (var_plus(&index[1], 0), var_plus(&index[0], 1)) {
                    (Some(0), Some(s)) => (1, 0, s),
                    _ => return false,
                },
            };
            let in_range = v.shape[kd].as_const() == Some(k)
                && v.shape[nd]
                    .as_const()
                    .is_some_and(|w| lo + shift >= 0 && hi + shift <= w);
            if !(in_range && v.strides[kd] == Dim::constant(1) && aligned8(&v.strides[nd]) && aligned8(&v.offset)) {
                return false;
            }
            out.push(BPart {
                input: *input,
                lo,
                offset: v.offset.clone(),
                n_stride: v.strides[nd].clone(),
                shift,
            });
            true
        }
        _ => false,
    }
}

/// Whether A's values are bf16 values: a bf16 operand, or a prologue whose value is a bf16
/// value cast to f32 (exact). `Some(direct)`: also the input to copy A from, when A is a
/// bf16 buffer (or such a cast of an identity load of one) with 16-byte aligned rows.
fn a_form(em: &Em, t: &TemplateKernel) -> R<Option<Option<usize>>> {
    let one = Dim::constant(1);
    let direct = |i: usize, shape: &[Dim]| -> Option<usize> {
        let v = bf16_view(em, i)?;
        let r = v.rank();
        let ok = r >= 1
            && v.shape == shape
            && v.strides[r - 1] == one
            && v.strides[..r - 1].iter().all(aligned8)
            && aligned8(&v.offset);
        ok.then_some(i)
    };
    match t.operands.first() {
        Some(Operand::Buffer(a)) => {
            if em.operand_dtype(t, 0)? != DType::BF16 {
                return Ok(None);
            }
            let shape = em.kernel.inputs[*a].view.shape.clone();
            Ok(Some(direct(*a, &shape)))
        }
        Some(Operand::Prologue(f)) => {
            let Some(node) = f.stores.first().and_then(|e| f.exprs.get(*e)) else {
                return Ok(None);
            };
            if node.dtype == DType::BF16 {
                return Ok(Some(None));
            }
            let ScalarOp::Cast(x) = node.op else { return Ok(None) };
            let Some(inner) = f.exprs.get(x) else { return Ok(None) };
            if node.dtype != DType::F32 || inner.dtype != DType::BF16 {
                return Ok(None);
            }
            // an identity load of a bf16 buffer: copy it directly
            if let ScalarOp::Load { input, index } = &inner.op {
                let identity = index.len() == f.domain.len()
                    && index.iter().enumerate().all(|(d, i)| var_plus(i, d as u32) == Some(0));
                if identity {
                    return Ok(Some(direct(*input, &f.domain)));
                }
            }
            Ok(Some(None))
        }
        None => Ok(None),
    }
}

fn eligible(em: &Em, t: &TemplateKernel, g: &Gemm) -> R<Option<Shape>> {
    let k = match g.k.as_const() {
        Some(k) if k > 0 && k % 8 == 0 => k,
        _ => return Ok(None),
    };
    if g.acc != DType::F32 {
        return Ok(None);
    }
    // a folded norm: its rows are staged as bf16, so they must be bf16 values
    if g.norm.is_some_and(|r| r.dtype != DType::BF16) {
        return Ok(None);
    }
    let Some(a_direct) = a_form(em, t)? else {
        return Ok(None);
    };
    let Some(b) = b_parts(em, t, g, k)? else {
        return Ok(None);
    };
    let sa = em.operand_shape(t, 0)?;
    if sa.len() < 2 || sa.len() > g.batch.len() + 2 {
        return Ok(None);
    }
    Ok(Some(Shape { b, a_direct, k }))
}

/// The fast GEMM, or `None` when the kernel does not qualify (the caller emits the SIMT one).
pub(super) fn gemm_fast<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, g: &Gemm) -> R<Option<LaunchGeometry>> {
    if !enabled() {
        return Ok(None);
    }
    let Some(sh) = eligible(em, t, g)? else {
        return Ok(None);
    };
    let mut rows = g.batch.clone();
    rows.push(g.m.clone());
    let rows_dim = numel(&rows);
    let mut cx = Cx {
        rext: em.dims(&rows)?,
        rr: em.i64c(0),
        nn: em.dim(&g.n)?,
        kk: em.i64c(sh.k),
        sa: em.operand_shape(t, 0)?,
        nb: g.batch.len(),
        out: g.out,
        smem: dynamic_smem(em),
        sh,
        norm: g.norm,
        emit: g.norm.is_some() && t.epilogue.is_none() && g.product_outputs(em.kernel.outputs.len()) > 1,
        w_vec: match t.operands.get(2) {
            Some(Operand::Buffer(i)) => bf16_view(em, *i)
                .filter(|v| v.rank() == 1 && v.strides[0] == Dim::constant(1) && aligned8(&v.offset))
                .map(|_| *i),
            _ => None,
        },
    };
    cx.rr = em.product(&cx.rext)?;
    // prefill plans: two blocks a multiprocessor (registers capped at 128; 2 × 110 KB of
    // stages fit), measured faster on an H100 (docs/perf.md), most of all where A is computed
    // (Ring-mini's `gemm_a` then spills 4 bytes). `RINGJIT_GEMM_MINBLOCKS=1` leaves it out
    // (for A/B timing).
    let one = std::env::var("RINGJIT_GEMM_MINBLOCKS").is_ok_and(|v| v == "1");
    if em.prefill && !one {
        em.launch_bounds(THREADS, 2)?;
    }
    let small = em.icmp(IntPredicate::SLE, cx.rr, em.i64c(GEMV_ROWS))?;
    let gemv_bb = em.ctx.append_basic_block(em.f, "gemv");
    let mma_bb = em.ctx.append_basic_block(em.f, "mma");
    let done = em.ctx.append_basic_block(em.f, "gemm.done");
    em.b.build_conditional_branch(small, gemv_bb, mma_bb).ck()?;
    em.b.position_at_end(gemv_bb);
    gemv(em, t, &cx)?;
    em.b.build_unconditional_branch(done).ck()?;
    em.b.position_at_end(mma_bb);
    mma(em, t, &cx)?;
    em.b.build_unconditional_branch(done).ck()?;
    em.b.position_at_end(done);
    // x: ceil((8N + 8(BN - 1)) / BN) blocks, at least the GEMV's ceil(N / 16) and 8 · the
    // column tiles; y: ceil(rows / 8 BM), so that x · y holds every tensor-core tile (in launch
    // order, see `mma`) without a grid of mostly idle blocks
    // (stored norm rows: 8 blocks more in x, so that x · y also holds a block per row tile)
    let per = (BN / GEMV_COLS) as u32;
    let extra = if cx.emit && cx.deferred_norm() {
        per as i64 * BN
    } else {
        0
    };
    let wide =
        g.n.mul(&Dim::constant(per as i64))
            .add(&Dim::constant(per as i64 * (BN - 1) + extra));
    Ok(Some(LaunchGeometry {
        grid: [
            GridDim::blocks(wide, BN as u32),
            GridDim::blocks(rows_dim, BM as u32 * per),
            GridDim::one(),
        ],
        block: [THREADS, 1, 1],
        shared_bytes: (SMEM_ELEMS * 2) as u32,
    }))
}

/// The kernel's dynamic shared memory (`.extern .shared`), sized at launch.
fn dynamic_smem<'c>(em: &Em<'c, '_>) -> PointerValue<'c> {
    let arr = em.ctx.i16_type().array_type(0);
    let g = em.module.add_global(
        arr,
        Some(inkwell::AddressSpace::from(super::super::SHARED)),
        "ringjit_dsmem",
    );
    g.set_linkage(inkwell::module::Linkage::External);
    g.set_alignment(16);
    g.as_pointer_value()
}

struct Cx<'c> {
    /// Extents of the flattened rows: batch dims then M.
    rext: Vec<IntValue<'c>>,
    rr: IntValue<'c>,
    nn: IntValue<'c>,
    kk: IntValue<'c>,
    sa: Vec<Dim>,
    nb: usize,
    out: DType,
    smem: PointerValue<'c>,
    sh: Shape,
    /// A folded RMSNorm of A's rows (`RowNorm`), and whether the kernel stores the rows.
    norm: Option<RowNorm>,
    emit: bool,
    /// The norm's weight as a contiguous, 16-byte aligned bf16 input (8 at a load).
    w_vec: Option<usize>,
}

impl<'c> Cx<'c> {
    /// Whether the tensor-core path applies the folded norm after the fact (A copied raw and
    /// scaled by the weight in shared memory, the accumulators by 1/rms; `mma_tile`): for a
    /// direct A and a bf16 result. An f32 result (the router's logits, whose top-k a bf16
    /// rounding of a · w could flip against the reference) keeps the norm's exact roundings: A
    /// staged element by element through it.
    fn deferred_norm(&self) -> bool {
        self.norm.is_some() && self.sh.a_direct.is_some() && self.out != DType::F32
    }

    /// Operand index of A at flattened row `r`, column `k`.
    fn a_index(&self, em: &Em<'c, '_>, ri: &[IntValue<'c>], k: IntValue<'c>) -> Vec<IntValue<'c>> {
        matrix_index(&self.sa, &ri[..self.nb], ri[self.nb], k, em.i64c(0))
    }
}

/// `cp.async` of 16 bytes from global `src` to the 32-bit shared address `dst`; zero-filled
/// (nothing read) when `ok` is false.
fn cp_async16<'c>(em: &Em<'c, '_>, dst: IntValue<'c>, src: PointerValue<'c>, ok: IntValue<'c>) -> R<()> {
    let (i32t, i64t) = (em.ctx.i32_type(), em.ctx.i64_type());
    let (c16, c0) = (i32t.const_int(16, false), i32t.const_int(0, false));
    let size = em.b.build_select(ok, c16, c0, "").ck()?.into_int_value();
    let src = em.b.build_ptr_to_int(src, i64t, "").ck()?;
    em.asm_se(
        None,
        &[i32t.into(), i64t.into(), i32t.into()],
        "cp.async.cg.shared.global [$0], [$1], 16, $2;",
        "r,l,r,~{memory}",
        &[dst.into(), src.into(), size.into()],
    )?;
    Ok(())
}

fn cp_async_commit(em: &Em) -> R<()> {
    em.asm_ordered("cp.async.commit_group;")?;
    Ok(())
}

/// The first `stages - 1` K tiles of a `cp.async` pipeline in flight, one commit group each
/// (empty past `kt_n`); `load(em, kt, stage)` issues tile `kt`'s copies into `stage`.
fn pipeline_start<'c, 'a>(
    em: &mut Em<'c, 'a>,
    stages: i64,
    kt_n: IntValue<'c>,
    load: &impl Fn(&mut Em<'c, 'a>, IntValue<'c>, IntValue<'c>) -> R<()>,
) -> R<()> {
    for s0 in 0..stages - 1 {
        let kt = em.i64c(s0);
        let some = em.icmp(IntPredicate::SLT, kt, kt_n)?;
        em.if_then(some, |em| load(em, kt, kt))?;
        cp_async_commit(em)?;
    }
    Ok(())
}

/// Step `kt` of the pipeline: tile kt landed (the `stages - 2` newer groups may still fly);
/// `landed(em, stage)` then runs on this thread's own copies of it, before the barrier;
/// after the barrier every warp is done with tile kt - 1, whose buffer then receives tile
/// kt + stages - 1. Returns the stage tile kt sits in.
#[allow(clippy::type_complexity)]
fn pipeline_step<'c, 'a>(
    em: &mut Em<'c, 'a>,
    stages: i64,
    kt: IntValue<'c>,
    kt_n: IntValue<'c>,
    load: &impl Fn(&mut Em<'c, 'a>, IntValue<'c>, IntValue<'c>) -> R<()>,
    landed: Option<&dyn Fn(&mut Em<'c, 'a>, IntValue<'c>) -> R<()>>,
) -> R<IntValue<'c>> {
    let wait = format!("cp.async.wait_group {};", stages - 2);
    em.asm_ordered(&wait)?;
    let stage = em.rem(kt, em.i64c(stages))?;
    if let Some(f) = landed {
        f(em, stage)?;
    }
    em.barrier()?;
    let nxt = em.add(kt, em.i64c(stages - 1))?;
    let more = em.icmp(IntPredicate::SLT, nxt, kt_n)?;
    em.if_then(more, |em| {
        let into = em.rem(nxt, em.i64c(stages))?;
        load(em, nxt, into)
    })?;
    cp_async_commit(em)?;
    Ok(stage)
}

/// The `ldmatrix` lane addresses (tile-relative, in elements) of warp (wm, wn) over a warp
/// tile of `rows` × `cols`: A's row and column, B's n and k.
fn ldmatrix_lanes<'c>(
    em: &Em<'c, '_>,
    lane: IntValue<'c>,
    (wm, wn): (IntValue<'c>, IntValue<'c>),
    (rows, cols): (i64, i64),
) -> R<[IntValue<'c>; 4]> {
    let a_lrow = em.add(em.mul(wm, em.i64c(rows))?, em.rem(lane, em.i64c(16))?)?;
    let a_lcol = em.mul(em.div(lane, em.i64c(16))?, em.i64c(8))?;
    let b_ln = em.add(
        em.add(em.mul(wn, em.i64c(cols))?, em.rem(lane, em.i64c(8))?)?,
        em.mul(em.div(lane, em.i64c(16))?, em.i64c(8))?,
    )?;
    let b_lk = em.mul(em.rem(em.div(lane, em.i64c(8))?, em.i64c(2))?, em.i64c(8))?;
    Ok([a_lrow, a_lcol, b_ln, b_lk])
}

/// `acc[base..base + 4] += a·b` on one m16n8k16 tile.
fn mma_acc<'c>(
    em: &Em<'c, '_>,
    acc: &[PointerValue<'c>],
    base: usize,
    a: &[IntValue<'c>; 4],
    b: [IntValue<'c>; 2],
) -> R<()> {
    let mut c = [em.f32c(0.0); 4];
    for (j, cj) in c.iter_mut().enumerate() {
        *cj = em.getf(acc[base + j])?;
    }
    let c = super::tc::mma(em, a, b, c)?;
    for (j, cj) in c.into_iter().enumerate() {
        em.set(acc[base + j], cj)?;
    }
    Ok(())
}

/// The 32-bit shared-window address of bf16 element `e` of the shared array.
fn smem_addr<'c>(em: &Em<'c, '_>, cx: &Cx<'c>, e: IntValue<'c>) -> R<IntValue<'c>> {
    let p = em.shared_gep(em.ctx.i16_type().into(), cx.smem, e)?;
    em.b.build_ptr_to_int(p, em.ctx.i32_type(), "").ck()
}

/// The bf16 bits of an f32 holding a bf16 value.
fn bf16_bits<'c>(em: &Em<'c, '_>, x: FloatValue<'c>) -> R<IntValue<'c>> {
    let i32t = em.ctx.i32_type();
    let w = em.b.build_bit_cast(x, i32t, "").ck()?.into_int_value();
    let hi = em.b.build_right_shift(w, i32t.const_int(16, false), false, "").ck()?;
    em.b.build_int_truncate(hi, em.ctx.i16_type(), "").ck()
}

/// 16 bytes at `p` (aligned) as 4 × i32.
fn load_v4<'c>(em: &Em<'c, '_>, p: PointerValue<'c>) -> R<VectorValue<'c>> {
    let vt = em.ctx.i32_type().vec_type(4);
    let v = em.b.build_load(vt, p, "").ck()?;
    v.as_instruction_value()
        .expect("a load")
        .set_alignment(16)
        .map_err(|e| super::super::CodegenError(e.to_string()))?;
    Ok(v.into_vector_value())
}

/// Store a 16-byte vector at `p` (aligned).
fn store_v<'c>(em: &Em<'c, '_>, p: PointerValue<'c>, v: BasicValueEnum<'c>) -> R<()> {
    let st = em.b.build_store(p, v).ck()?;
    st.set_alignment(16)
        .map_err(|e| super::super::CodegenError(e.to_string()))?;
    Ok(())
}

/// The 8 bf16 values of a 4 × i32 vector as f32 (element order).
fn unpack8<'c>(em: &Em<'c, '_>, v: VectorValue<'c>) -> R<Vec<FloatValue<'c>>> {
    let (i32t, f32t) = (em.ctx.i32_type(), em.ctx.f32_type());
    let mut out = Vec::with_capacity(8);
    for j in 0..4 {
        let w = em.b.build_extract_element(v, em.i32c(j), "").ck()?.into_int_value();
        let lo = em.b.build_left_shift(w, i32t.const_int(16, false), "").ck()?;
        let hi = em.b.build_and(w, i32t.const_int(0xffff_0000, false), "").ck()?;
        out.push(em.b.build_bit_cast(lo, f32t, "").ck()?.into_float_value());
        out.push(em.b.build_bit_cast(hi, f32t, "").ck()?.into_float_value());
    }
    Ok(out)
}

/// B's buffer and element offset of (column `n`, k 0): the part holding column `n` (`n` in
/// range, or clamped to 0).
fn b_col<'c>(em: &Em<'c, '_>, cx: &Cx<'c>, n: IntValue<'c>) -> R<(PointerValue<'c>, IntValue<'c>)> {
    let at = |em: &Em<'c, '_>, p: &BPart| -> R<IntValue<'c>> {
        let row = em.add(n, em.i64c(p.shift))?;
        em.add(em.dim(&p.offset)?, em.mul(row, em.dim(&p.n_stride)?)?)
    };
    let first = &cx.sh.b[0];
    let (mut ptr, mut off) = (em.inputs[first.input], at(em, first)?);
    for p in &cx.sh.b[1..] {
        let here = em.icmp(IntPredicate::SGE, n, em.i64c(p.lo))?;
        ptr =
            em.b.build_select(here, em.inputs[p.input], ptr, "")
                .ck()?
                .into_pointer_value();
        off = em.select_i(here, at(em, p)?, off)?;
    }
    Ok((ptr, off))
}

/// A element offset of (flattened row index `ri`, k 0), for the directly copied A.
fn a_row<'c>(em: &Em<'c, '_>, cx: &Cx<'c>, a: usize, ri: &[IntValue<'c>]) -> R<IntValue<'c>> {
    let idx = cx.a_index(em, ri, em.i64c(0));
    em.view_offset(&em.kernel.inputs[a].view, &idx)
}

fn gep16<'c>(em: &Em<'c, '_>, base: PointerValue<'c>, e: IntValue<'c>) -> R<PointerValue<'c>> {
    // SAFETY (of the generated code): offsets are in range or clamped to an in-range element.
    unsafe { em.b.build_in_bounds_gep(em.ctx.i16_type(), base, &[e], "") }.ck()
}

/// A's elements `k .. k + 8` of flattened row `ri` (`k` a multiple of 8 below K, which is one
/// too): one 16-byte load when A is a direct bf16 buffer, else one element at a time through
/// the operand.
fn a8<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    cx: &Cx<'c>,
    ri: &[IntValue<'c>],
    k: IntValue<'c>,
) -> R<Vec<FloatValue<'c>>> {
    match cx.sh.a_direct {
        Some(a) => {
            let row = a_row(em, cx, a, ri)?;
            unpack8(em, load_v4(em, gep16(em, em.inputs[a], em.add(row, k)?)?)?)
        }
        None => (0..8)
            .map(|j| {
                let idx = cx.a_index(em, ri, em.add(k, em.i64c(j))?);
                em.ldf(t, 0, &idx)
            })
            .collect(),
    }
}

/// This thread's part of the sum of squares of A's flattened row `ri`: the 8 elements at
/// `first + step·i` for every `i` with them in K ([`a8`], 8 loads in flight).
fn row_ss_part<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    cx: &Cx<'c>,
    ri: &[IntValue<'c>],
    first: IntValue<'c>,
    step: i64,
) -> R<FloatValue<'c>> {
    let zero = em.i64c(0);
    let ss = em.fvar(em.f32c(0.0))?;
    let n_i = (cx.sh.k + step - 1) / step;
    const BATCH: i64 = 8;
    em.for_range(zero, em.i64c(n_i), em.i64c(BATCH), |em, i0| {
        let mut xs = Vec::new();
        for b in 0..BATCH {
            // K is a multiple of 8: the 8 are in K together, or (clamped to 0) not counted
            let k = em.add(first, em.mul(em.add(i0, em.i64c(b))?, em.i64c(step))?)?;
            let ok = em.icmp(IntPredicate::SLT, k, cx.kk)?;
            let kc = em.select_i(ok, k, zero)?;
            xs.push((ok, a8(em, t, cx, ri, kc)?));
        }
        let mut acc = em.getf(ss)?;
        for (ok, v) in xs {
            for x in v {
                let x = em.select_f(ok, x, em.f32c(0.0))?;
                acc = em.fma(x, x, acc)?;
            }
        }
        em.set(ss, acc)
    })?;
    em.getf(ss)
}

/// Stores a normalised element of A (at A's index) as the kernel's second output, where `c`.
fn store_row<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    cx: &Cx<'c>,
    c: IntValue<'c>,
    idx: &[IntValue<'c>],
    x: FloatValue<'c>,
) -> R<()> {
    let shape = em.result_shape(t, 1)?;
    let dt = cx.norm.map_or(DType::BF16, |r| r.dtype);
    em.if_then(c, |em| em.store_output(1, idx, &shape, Val::F(x), dt))
}

/// A's elements `k .. k + 8` of flattened row `ri` through the folded norm (`k` a multiple of
/// 8 below K, which is one too): 16-byte loads of A and of the weight where they are direct.
fn a_chunk8<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    cx: &Cx<'c>,
    ri: &[IntValue<'c>],
    k: IntValue<'c>,
    inv: FloatValue<'c>,
) -> R<Vec<FloatValue<'c>>> {
    let xs = a8(em, t, cx, ri, k)?;
    let ws = w8(em, t, cx, k)?;
    norm8(em, &xs, &ws, inv)
}

/// The folded norm's weight at `k .. k + 8` (`k` a multiple of 8 below K).
fn w8<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, cx: &Cx<'c>, k: IntValue<'c>) -> R<Vec<FloatValue<'c>>> {
    match cx.w_vec {
        Some(w) => {
            let at = em.view_offset(&em.kernel.inputs[w].view, &[k])?;
            unpack8(em, load_v4(em, gep16(em, em.inputs[w], at)?)?)
        }
        None => (0..8).map(|j| em.ldf(t, 2, &[em.add(k, em.i64c(j))?])).collect(),
    }
}

/// The norm of 8 elements with their row's `1 / rms`: `bf16(bf16(x · inv) · w)` (the norm's
/// dtype is bf16 on these paths), rounded two at a time by `cvt.rn.bf16x2`.
fn norm8<'c>(
    em: &Em<'c, '_>,
    xs: &[FloatValue<'c>],
    ws: &[FloatValue<'c>],
    inv: FloatValue<'c>,
) -> R<Vec<FloatValue<'c>>> {
    let mut n = Vec::with_capacity(xs.len());
    for x in xs {
        n.push(em.fmul(*x, inv)?);
    }
    let n = round_bf16_pairs(em, &n)?;
    let mut y = Vec::with_capacity(n.len());
    for (n, w) in n.iter().zip(ws) {
        y.push(em.fmul(*n, *w)?);
    }
    round_bf16_pairs(em, &y)
}

/// f32 values (an even count) rounded to bf16 (nearest even) two at a time, back as f32.
fn round_bf16_pairs<'c>(em: &Em<'c, '_>, xs: &[FloatValue<'c>]) -> R<Vec<FloatValue<'c>>> {
    let mut out = Vec::with_capacity(xs.len());
    for pair in xs.chunks(2) {
        let (lo, hi) = super::tc::unpack_bf16(em, super::tc::pack_bf16(em, pair[0], pair[1])?)?;
        out.push(lo);
        out.push(hi);
    }
    Ok(out)
}

/// 8 f32 values holding bf16 values as one 16-byte vector (element order).
fn pack8<'c>(em: &Em<'c, '_>, xs: &[FloatValue<'c>]) -> R<VectorValue<'c>> {
    let i16t = em.ctx.i16_type();
    let mut v = i16t.vec_type(8).const_zero();
    for (j, x) in xs.iter().enumerate() {
        let bits = bf16_bits(em, *x)?;
        v = em.b.build_insert_element(v, bits, em.i32c(j as i32), "").ck()?;
    }
    Ok(v)
}

/// The 1/rms of a tensor-core tile row, found by its 8 copying threads together (`kc8` this
/// thread's first column; rows past the last load nothing, every lane joins the butterfly).
fn tile_row_inv<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    cx: &Cx<'c>,
    a_ok: IntValue<'c>,
    a_ri: &[IntValue<'c>],
    kc8: IntValue<'c>,
) -> R<FloatValue<'c>> {
    let ss = em.fvar(em.f32c(0.0))?;
    em.if_then(a_ok, |em| {
        let part = row_ss_part(em, t, cx, a_ri, kc8, BK)?;
        em.set(ss, part)
    })?;
    row_inv(em, cx, em.bfly_reduce(ReduceOp::Sum, em.getf(ss)?, &[4, 2, 1])?)
}

/// `1 / rms` of a row from its sum of squares.
fn row_inv<'c>(em: &Em<'c, '_>, cx: &Cx<'c>, ss: FloatValue<'c>) -> R<FloatValue<'c>> {
    let eps = cx.norm.map_or(0.0, |r| r.eps);
    em.inv_rms(ss, cx.kk, eps)
}

// ---- GEMV -----------------------------------------------------------------------------------

fn gemv<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, cx: &Cx<'c>) -> R<()> {
    // the grid is sized for the tensor-core tiles as well: blocks past the columns exit (or,
    // with a folded route, skip to its arrival count)
    let past = em.mul(em.sreg("ctaid.x")?, em.i64c(GEMV_COLS))?;
    let past = em.icmp(IntPredicate::SGE, past, cx.nn)?;
    // with a folded route every block must reach the tail's arrival count: skip, not return
    let skip = match em.kernel.routes() {
        true => Some(em.skip_if(past)?),
        false => {
            em.return_if(past)?;
            None
        }
    };
    gemv_columns(em, t, cx)?;
    if let Some(end) = skip {
        em.b.build_unconditional_branch(end).ck()?;
        em.b.position_at_end(end);
    }
    Ok(())
}

/// The GEMV's columns of this block (one in range).
fn gemv_columns<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, cx: &Cx<'c>) -> R<()> {
    let (zero, one) = (em.i64c(0), em.i64c(1));
    let tid = em.sreg("tid.x")?;
    let warp = em.div(tid, em.i64c(32))?;
    let lane = em.rem(tid, em.i64c(32))?;
    let n0 = em.add(
        em.mul(em.sreg("ctaid.x")?, em.i64c(GEMV_COLS))?,
        em.mul(warp, em.i64c(GEMV_CN))?,
    )?;
    // column bases (clamped to column 0 past N: computed, never stored)
    let mut cols = Vec::new();
    for c in 0..GEMV_CN {
        let n = em.add(n0, em.i64c(c))?;
        let ok = em.icmp(IntPredicate::SLT, n, cx.nn)?;
        let nc = em.select_i(ok, n, zero)?;
        cols.push((n, ok, b_col(em, cx, nc)?));
    }
    let kc_n = em.i64c(GEMV_KC);
    em.for_range(zero, cx.rr, em.i64c(GEMV_RT), |em, r0| {
        let rows = em.imin(em.i64c(GEMV_RT), em.sub(cx.rr, r0)?)?;
        let mut acc = Vec::new();
        for _ in 0..GEMV_RT * GEMV_CN {
            acc.push(em.fvar(em.f32c(0.0))?);
        }
        if cx.norm.is_some() {
            // a folded norm: warp w finds 1/rms of row r0 + w (a shared slot past the staged
            // rows; the staging below starts with a barrier)
            let live = em.icmp(IntPredicate::SLT, warp, rows)?;
            let row = em.select_i(live, em.add(r0, warp)?, r0)?;
            let ri = em.unravel(row, &cx.rext)?;
            let first = em.mul(lane, em.i64c(8))?;
            let part = row_ss_part(em, t, cx, &ri, first, 256)?;
            let ss = em.warp_reduce(ReduceOp::Sum, part)?;
            let inv = row_inv(em, cx, ss)?;
            let st = em.and(live, em.icmp(IntPredicate::EQ, lane, zero)?)?;
            em.if_then(st, |em| {
                let p = em.shared_gep(em.ctx.f32_type().into(), cx.smem, em.add(em.i64c(GEMV_INV), warp)?)?;
                em.b.build_store(p, inv).ck()?;
                Ok(())
            })?;
        }
        em.for_range(zero, cx.kk, kc_n, |em, kc| {
            // stage rows r0.. of A, k in kc..kc+KC (zeros past K): 8 elements a thread per row
            em.barrier()?;
            em.for_range(zero, rows, one, |em, m| {
                let ri = em.unravel(em.add(r0, m)?, &cx.rext)?;
                let base = match (cx.sh.a_direct, cx.norm) {
                    (Some(a), None) => Some((a, a_row(em, cx, a, &ri)?)),
                    _ => None,
                };
                let inv = match cx.norm {
                    Some(_) => {
                        let p = em.shared_gep(em.ctx.f32_type().into(), cx.smem, em.add(em.i64c(GEMV_INV), m)?)?;
                        Some(em.b.build_load(em.ctx.f32_type(), p, "").ck()?.into_float_value())
                    }
                    None => None,
                };
                let emit = match cx.emit {
                    true => Some(em.icmp(IntPredicate::EQ, em.sreg("ctaid.x")?, zero)?),
                    false => None,
                };
                let start = em.mul(tid, em.i64c(8))?;
                em.for_range(start, kc_n, em.i64c(8 * THREADS as i64), |em, kx| {
                    let k = em.add(kc, kx)?;
                    let ok = em.icmp(IntPredicate::SLT, k, cx.kk)?;
                    let kcl = em.select_i(ok, k, zero)?;
                    let at = em.add(em.mul(m, kc_n)?, kx)?;
                    let dst = em.shared_gep(em.ctx.i16_type().into(), cx.smem, at)?;
                    match base {
                        Some((a, base)) => {
                            let v = load_v4(em, gep16(em, em.inputs[a], em.add(base, kcl)?)?)?;
                            let zv = em.ctx.i32_type().vec_type(4).const_zero();
                            let v = em.b.build_select(ok, v, zv, "").ck()?.into_vector_value();
                            store_v(em, dst, v.into())
                        }
                        None => {
                            let i16t = em.ctx.i16_type();
                            let mut v = i16t.vec_type(8).const_zero();
                            let normed = match inv {
                                Some(inv) => Some(a_chunk8(em, t, cx, &ri, kcl, inv)?),
                                None => None,
                            };
                            for j in 0..8 {
                                let kj = em.add(kcl, em.i64c(j))?;
                                let idx = cx.a_index(em, &ri, kj);
                                let x = match &normed {
                                    Some(n) => n[j as usize],
                                    None => em.ldf(t, 0, &idx)?,
                                };
                                if let Some(first) = emit {
                                    store_row(em, t, cx, em.and(first, ok)?, &idx, x)?;
                                }
                                let x = em.select_f(ok, x, em.f32c(0.0))?;
                                let bits = bf16_bits(em, x)?;
                                v = em.b.build_insert_element(v, bits, em.i32c(j as i32), "").ck()?;
                            }
                            store_v(em, dst, v.into())
                        }
                    }
                })
            })?;
            em.barrier()?;
            let kcn = em.imin(kc_n, em.sub(cx.kk, kc)?)?;
            let start = em.mul(lane, em.i64c(8))?;
            em.for_range(start, kcn, em.i64c(256 * UNROLL), |em, kx| {
                // UNROLL warp steps: every weight load issued before the first use
                let zv = em.ctx.i32_type().vec_type(4).const_zero();
                let mut steps = Vec::new();
                for u in 0..UNROLL {
                    let ku = em.add(kx, em.i64c(256 * u))?;
                    let ok = em.icmp(IntPredicate::SLT, ku, kcn)?;
                    steps.push((ok, em.select_i(ok, ku, kx)?));
                }
                let mut bv = Vec::new();
                for (_, _, (bbuf, base)) in &cols {
                    let mut per = Vec::new();
                    for (ok, ku) in &steps {
                        let v = load_v4(em, gep16(em, *bbuf, em.add(em.add(*base, kc)?, *ku)?)?)?;
                        per.push(em.b.build_select(*ok, v, zv, "").ck()?.into_vector_value());
                    }
                    bv.push(per);
                }
                let mut bf = Vec::new();
                for per in bv {
                    let mut u = Vec::new();
                    for v in per {
                        u.push(unpack8(em, v)?);
                    }
                    bf.push(u);
                }
                for m in 0..GEMV_RT {
                    let live = em.icmp(IntPredicate::SLT, em.i64c(m), rows)?;
                    let bf = &bf;
                    let acc = &acc;
                    let steps = &steps;
                    em.if_then(live, |em| {
                        let row = em.i64c(m * GEMV_KC);
                        let mut av = Vec::new();
                        for (_, ku) in steps {
                            let p = em.shared_gep(em.ctx.i16_type().into(), cx.smem, em.add(row, *ku)?)?;
                            av.push(unpack8(em, load_v4(em, p)?)?);
                        }
                        for (c, per) in bf.iter().enumerate() {
                            let slot = acc[(m * GEMV_CN) as usize + c];
                            let mut s = em.getf(slot)?;
                            for (a, b) in av.iter().zip(per) {
                                for j in 0..8 {
                                    s = em.fma(a[j], b[j], s)?;
                                }
                            }
                            em.set(slot, s)?;
                        }
                        Ok(())
                    })?;
                }
                Ok(())
            })
        })?;
        // this group of rows has read the block's weights (all of them up to 8 rows): the next
        // kernel may start launching (it still waits for this one to complete). A Ring-mini
        // decode step at batch 1 as a CUDA graph measured 1 % faster than without the release
        // on an H200; released at every kernel's entry instead, 13 % slower (docs/perf.md)
        em.release_dependents()?;
        // reduce over the lanes; lane 0 finishes each live (row, column)
        for m in 0..GEMV_RT {
            let live = em.icmp(IntPredicate::SLT, em.i64c(m), rows)?;
            let acc = &acc;
            let cols = &cols;
            em.if_then(live, |em| {
                let r = em.add(r0, em.i64c(m))?;
                for (c, (n, ok, _)) in cols.iter().enumerate() {
                    let s = em.getf(acc[(m * GEMV_CN) as usize + c])?;
                    let s = em.warp_reduce(ReduceOp::Sum, s)?;
                    let first = em.icmp(IntPredicate::EQ, lane, em.i64c(0))?;
                    let st = em.and(first, *ok)?;
                    let n = *n;
                    em.if_then(st, |em| {
                        let mut idx = em.unravel(r, &cx.rext)?;
                        idx.push(n);
                        let v = em.round(s, cx.out)?;
                        em.finish(t, 0, &idx, Val::F(v), cx.out)
                    })?;
                }
                Ok(())
            })?;
        }
        Ok(())
    })
}

// ---- tensor cores -----------------------------------------------------------------------------

/// The block's index in launch order (`ctaid.x` fastest).
fn linear_block<'c>(em: &Em<'c, '_>) -> R<IntValue<'c>> {
    em.add(em.sreg("ctaid.x")?, em.mul(em.sreg("ctaid.y")?, em.sreg("nctaid.x")?)?)
}

/// The tensor-core tiles, numbered in launch order (`ctaid.x` fastest): tile `i` is column
/// tile `i % n_tiles` of row tile `i / n_tiles` (a row tile's column tiles adjacent, sharing its
/// A rows in L2); blocks past the last tile exit at once.
fn mma<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, cx: &Cx<'c>) -> R<()> {
    let n_tiles = em.ceil_div(cx.nn, em.i64c(BN))?;
    let m_tiles = em.ceil_div(cx.rr, em.i64c(BM))?;
    let lin = linear_block(em)?;
    let tiles = em.mul(n_tiles, m_tiles)?;
    let mine = em.icmp(IntPredicate::SLT, lin, tiles)?;
    let tile_bb = em.ctx.append_basic_block(em.f, "mma.tile");
    let rest_bb = em.ctx.append_basic_block(em.f, "mma.rest");
    let done = em.ctx.append_basic_block(em.f, "mma.done");
    em.b.build_conditional_branch(mine, tile_bb, rest_bb).ck()?;
    em.b.position_at_end(tile_bb);
    let (bn, bm) = (em.rem(lin, n_tiles)?, em.div(lin, n_tiles)?);
    mma_tile(em, t, cx, bn, bm)?;
    em.b.build_unconditional_branch(done).ck()?;
    em.b.position_at_end(rest_bb);
    if cx.emit && cx.deferred_norm() {
        // a folded norm whose rows are stored: a block per row tile past the GEMM's tiles
        // stores them (the tiles scale their accumulators instead, see `mma_tile`)
        let bm = em.sub(lin, tiles)?;
        let mine = em.icmp(IntPredicate::SLT, bm, m_tiles)?;
        em.if_then(mine, |em| emit_rows(em, t, cx, bm))?;
    }
    em.b.build_unconditional_branch(done).ck()?;
    em.b.position_at_end(done);
    Ok(())
}

/// The normalised rows of row tile `bm` as the kernel's second output, exact: each row's
/// 1/rms by its 8 threads (as the tiles' copy rows), then its elements 8 at a time.
fn emit_rows<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, cx: &Cx<'c>, bm: IntValue<'c>) -> R<()> {
    let zero = em.i64c(0);
    let tid = em.sreg("tid.x")?;
    let kc8 = em.mul(em.rem(tid, em.i64c(ROW_CHUNKS))?, em.i64c(8))?;
    let row0 = em.mul(bm, em.i64c(BM))?;
    for i in 0..(BM / ROWS_PER_PASS) {
        let r = em.add(em.div(tid, em.i64c(ROW_CHUNKS))?, em.i64c(ROWS_PER_PASS * i))?;
        let ar = em.add(row0, r)?;
        let a_ok = em.icmp(IntPredicate::SLT, ar, cx.rr)?;
        let a_ri = em.unravel(em.select_i(a_ok, ar, zero)?, &cx.rext)?;
        let inv = tile_row_inv(em, t, cx, a_ok, &a_ri, kc8)?;
        em.if_then(a_ok, |em| {
            em.for_range(kc8, cx.kk, em.i64c(BK), |em, k| {
                let ys = a_chunk8(em, t, cx, &a_ri, k, inv)?;
                for (j, y) in ys.iter().enumerate() {
                    let idx = cx.a_index(em, &a_ri, em.add(k, em.i64c(j as i64))?);
                    store_row(em, t, cx, a_ok, &idx, *y)?;
                }
                Ok(())
            })
        })?;
    }
    Ok(())
}

fn mma_tile<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, cx: &Cx<'c>, bn: IntValue<'c>, bm: IntValue<'c>) -> R<()> {
    let (zero, one) = (em.i64c(0), em.i64c(1));
    let tid = em.sreg("tid.x")?;
    let warp = em.div(tid, em.i64c(32))?;
    let lane = em.rem(tid, em.i64c(32))?;
    let row0 = em.mul(bm, em.i64c(BM))?;
    let col0 = em.mul(bn, em.i64c(BN))?;
    let (wm, wn) = (em.div(warp, em.i64c(4))?, em.rem(warp, em.i64c(4))?);
    // this thread's copy assignments: chunk c = tid + 256 i → tile row c / 8, k offset (c % 8)·8
    let kc8 = em.mul(em.rem(tid, em.i64c(ROW_CHUNKS))?, em.i64c(8))?;
    struct Ld<'c> {
        r: IntValue<'c>,
        a_ok: IntValue<'c>,
        a_ri: Vec<IntValue<'c>>,
        a_base: Option<IntValue<'c>>,
        b_ok: IntValue<'c>,
        /// B's column `col0 + r` at k 0
        b_row: PointerValue<'c>,
        /// the row's 1/rms (a folded norm)
        inv: Option<FloatValue<'c>>,
    }
    let mut lds = Vec::new();
    for i in 0..(BM / ROWS_PER_PASS) {
        let r = em.add(em.div(tid, em.i64c(ROW_CHUNKS))?, em.i64c(ROWS_PER_PASS * i))?;
        let ar = em.add(row0, r)?;
        let a_ok = em.icmp(IntPredicate::SLT, ar, cx.rr)?;
        let a_ri = em.unravel(em.select_i(a_ok, ar, zero)?, &cx.rext)?;
        let a_base = match cx.sh.a_direct {
            Some(a) if cx.norm.is_none() || cx.deferred_norm() => Some(a_row(em, cx, a, &a_ri)?),
            _ => None,
        };
        // a folded norm over a computed A: the rows' 1/rms before the first tile is staged
        // (a direct A finds them once its first tiles are in flight, below)
        let inv = match (cx.norm, a_base) {
            (Some(_), None) => Some(tile_row_inv(em, t, cx, a_ok, &a_ri, kc8)?),
            _ => None,
        };
        let bn_i = em.add(col0, r)?;
        let b_ok = em.icmp(IntPredicate::SLT, bn_i, cx.nn)?;
        let (b_buf, b_base) = b_col(em, cx, em.select_i(b_ok, bn_i, zero)?)?;
        lds.push(Ld {
            r,
            a_ok,
            a_ri,
            a_base,
            b_ok,
            b_row: gep16(em, b_buf, b_base)?,
            inv,
        });
    }
    let emit = match cx.emit {
        true => Some(em.icmp(IntPredicate::EQ, bn, zero)?),
        false => None,
    };
    let load_tile = |em: &mut Em<'c, '_>, kt: IntValue<'c>, stage: IntValue<'c>| -> R<()> {
        let k = em.add(em.mul(kt, em.i64c(BK))?, kc8)?;
        let k_ok = em.icmp(IntPredicate::SLT, k, cx.kk)?;
        let kcl = em.select_i(k_ok, k, zero)?;
        let sbase = em.mul(stage, em.i64c(STAGE))?;
        for l in &lds {
            let a_at = em.add(em.add(sbase, em.mul(l.r, em.i64c(LDS))?)?, kc8)?;
            match (cx.sh.a_direct, l.a_base) {
                (Some(a), Some(base)) => {
                    let src = gep16(em, em.inputs[a], em.add(base, kcl)?)?;
                    let ok = em.and(l.a_ok, k_ok)?;
                    cp_async16(em, smem_addr(em, cx, a_at)?, src, ok)?;
                }
                _ => {
                    // computed A: eight elements through the prologue, one 16-byte store
                    let i16t = em.ctx.i16_type();
                    let mut v = i16t.vec_type(8).const_zero();
                    // a folded norm: K is a multiple of 8, so the 8 are in K together or not
                    let normed = match l.inv {
                        Some(inv) => Some(a_chunk8(em, t, cx, &l.a_ri, kcl, inv)?),
                        None => None,
                    };
                    for j in 0..8 {
                        let kj = em.add(k, em.i64c(j))?;
                        let ok = em.and(l.a_ok, em.icmp(IntPredicate::SLT, kj, cx.kk)?)?;
                        let kjc = em.select_i(ok, kj, zero)?;
                        let idx = cx.a_index(em, &l.a_ri, kjc);
                        let x = match &normed {
                            Some(n) => n[j as usize],
                            None => em.ldf(t, 0, &idx)?,
                        };
                        if let Some(first) = emit {
                            store_row(em, t, cx, em.and(first, ok)?, &idx, x)?;
                        }
                        let x = em.select_f(ok, x, em.f32c(0.0))?;
                        let bits = bf16_bits(em, x)?;
                        v = em.b.build_insert_element(v, bits, em.i32c(j as i32), "").ck()?;
                    }
                    let p = em.shared_gep(i16t.into(), cx.smem, a_at)?;
                    let st = em.b.build_store(p, v).ck()?;
                    st.set_alignment(16)
                        .map_err(|e| super::super::CodegenError(e.to_string()))?;
                }
            }
            let b_at = em.add(em.add(sbase, em.mul(em.add(l.r, em.i64c(BM))?, em.i64c(LDS))?)?, kc8)?;
            let src = gep16(em, l.b_row, kcl)?;
            let ok = em.and(l.b_ok, k_ok)?;
            cp_async16(em, smem_addr(em, cx, b_at)?, src, ok)?;
        }
        Ok(())
    };
    // 4 (m16) × 4 (n8) tiles of 4 f32 each
    let mut acc = Vec::new();
    for _ in 0..64 {
        acc.push(em.fvar(em.f32c(0.0))?);
    }
    let kt_n = em.ceil_div(cx.kk, em.i64c(BK))?;
    pipeline_start(em, STAGES, kt_n, &load_tile)?;
    // a folded norm over a direct A (`deferred`): the tiles are copied raw (`cp.async`); each
    // thread, once its own copies of a tile have landed (before the step's barrier), adds their
    // squares to its rows' sums and scales them by the norm's weight in place (bf16(x · w));
    // the rows' 1/rms multiply the accumulators at the end. The same norm up to where bf16
    // rounds (the reference rounds x · 1/rms first); the rows themselves, when stored, come
    // from blocks of their own (`mma`), exact.
    let deferred = cx.deferred_norm();
    let mut ss = Vec::new();
    if deferred {
        for _ in &lds {
            ss.push(em.fvar(em.f32c(0.0))?);
        }
    }
    // the weight's 8 elements at this thread's chunks of tile kt: with a direct weight, 16
    // bytes loaded `STAGES - 1` steps ahead into a register queue (`wq`), as its tile's copies
    // are issued; else loaded at the step
    let k_of = |em: &mut Em<'c, '_>, kt: IntValue<'c>| -> R<(IntValue<'c>, IntValue<'c>)> {
        let k = em.add(em.mul(kt, em.i64c(BK))?, kc8)?;
        let k_ok = em.icmp(IntPredicate::SLT, k, cx.kk)?;
        Ok((k_ok, em.select_i(k_ok, k, zero)?))
    };
    let w_load = |em: &mut Em<'c, '_>, kt: IntValue<'c>| -> R<VectorValue<'c>> {
        let (_, kcl) = k_of(em, kt)?;
        let w = cx.w_vec.expect("a direct weight");
        let at = em.view_offset(&em.kernel.inputs[w].view, &[kcl])?;
        load_v4(em, gep16(em, em.inputs[w], at)?)
    };
    let mut wq = Vec::new();
    if deferred && cx.w_vec.is_some() {
        for j in 0..STAGES - 1 {
            let v = w_load(em, em.i64c(j))?;
            wq.push(em.var(v.get_type().into(), v.into())?);
        }
    }
    let tile_w = |em: &mut Em<'c, '_>, kt: IntValue<'c>| -> R<(IntValue<'c>, Vec<FloatValue<'c>>)> {
        let (k_ok, kcl) = k_of(em, kt)?;
        if wq.is_empty() {
            return Ok((k_ok, w8(em, t, cx, kcl)?));
        }
        let vt = em.ctx.i32_type().vec_type(4);
        let cur = em.b.build_load(vt, wq[0], "").ck()?.into_vector_value();
        for j in 1..wq.len() {
            let v = em.b.build_load(vt, wq[j], "").ck()?;
            em.b.build_store(wq[j - 1], v).ck()?;
        }
        let next = w_load(em, em.add(kt, em.i64c(STAGES - 1))?)?;
        em.b.build_store(wq[wq.len() - 1], next).ck()?;
        Ok((k_ok, unpack8(em, cur)?))
    };
    let landed =
        |em: &mut Em<'c, '_>, stage: IntValue<'c>, (k_ok, ws): &(IntValue<'c>, Vec<FloatValue<'c>>)| -> R<()> {
            let k_ok = *k_ok;
            let sbase = em.mul(stage, em.i64c(STAGE))?;
            for (l, acc) in lds.iter().zip(&ss) {
                let live = em.and(l.a_ok, k_ok)?;
                em.if_then(live, |em| {
                    let at = em.add(em.add(sbase, em.mul(l.r, em.i64c(LDS))?)?, kc8)?;
                    let p = em.shared_gep(em.ctx.i16_type().into(), cx.smem, at)?;
                    let xs = unpack8(em, load_v4(em, p)?)?;
                    let mut sum = em.getf(*acc)?;
                    let mut ys = Vec::with_capacity(8);
                    for (x, w) in xs.iter().zip(ws) {
                        sum = em.fma(*x, *x, sum)?;
                        ys.push(em.fmul(*x, *w)?);
                    }
                    em.set(*acc, sum)?;
                    let v = pack8(em, &round_bf16_pairs(em, &ys)?)?;
                    store_v(em, p, v.into())
                })?;
            }
            Ok(())
        };
    let g = em.div(lane, em.i64c(4))?;
    let tq = em.rem(lane, em.i64c(4))?;
    let [a_lrow, a_lcol, b_ln, b_lk] = ldmatrix_lanes(em, lane, (wm, wn), (64, 32))?;
    let ldm = |em: &Em<'c, '_>, e: IntValue<'c>| -> R<[IntValue<'c>; 4]> {
        super::tc::ldmatrix(em, smem_addr(em, cx, e)?, false)
    };
    em.for_range(zero, kt_n, one, |em, kt| {
        let stage = match deferred {
            false => pipeline_step(em, STAGES, kt, kt_n, &load_tile, None)?,
            true => {
                let w = tile_w(em, kt)?;
                pipeline_step(em, STAGES, kt, kt_n, &load_tile, Some(&|em, st| landed(em, st, &w)))?
            }
        };
        let sbase = em.mul(stage, em.i64c(STAGE))?;
        for ks in 0..(BK / 16) {
            let mut af = Vec::new();
            for mi in 0..4 {
                let row = em.add(a_lrow, em.i64c(mi * 16))?;
                let col = em.add(a_lcol, em.i64c(ks * 16))?;
                let e = em.add(sbase, em.add(em.mul(row, em.i64c(LDS))?, col)?)?;
                af.push(ldm(em, e)?);
            }
            let mut bfr = Vec::new();
            for nj in 0..2 {
                let n = em.add(b_ln, em.i64c(BM + nj * 16))?;
                let k = em.add(b_lk, em.i64c(ks * 16))?;
                let e = em.add(sbase, em.add(em.mul(n, em.i64c(LDS))?, k)?)?;
                let r = ldm(em, e)?;
                bfr.push([r[0], r[1]]);
                bfr.push([r[2], r[3]]);
            }
            for (mi, a) in af.iter().enumerate() {
                for (ni, b) in bfr.iter().enumerate() {
                    mma_acc(em, &acc, (mi * 4 + ni) * 4, a, *b)?;
                }
            }
        }
        Ok(())
    })?;
    if deferred {
        // the rows' 1/rms (8 copying threads a row) to a shared slot per tile row, once every
        // warp is done with the last tile
        em.barrier()?;
        for (l, acc) in lds.iter().zip(&ss) {
            let inv = row_inv(em, cx, em.bfly_reduce(ReduceOp::Sum, em.getf(*acc)?, &[4, 2, 1])?)?;
            let first = em.icmp(IntPredicate::EQ, kc8, zero)?;
            em.if_then(first, |em| {
                let p = em.shared_gep(em.ctx.f32_type().into(), cx.smem, l.r)?;
                em.b.build_store(p, inv).ck()?;
                Ok(())
            })?;
        }
        em.barrier()?;
    }
    // results: c0, c1 at (g, 2t..2t+1), c2, c3 at (g + 8, ..)
    for mi in 0..4i64 {
        for h in 0..2i64 {
            let trow = em.add(em.mul(wm, em.i64c(64))?, em.add(em.i64c(mi * 16 + h * 8), g)?)?;
            let row = em.add(row0, trow)?;
            let ok = em.icmp(IntPredicate::SLT, row, cx.rr)?;
            let acc = &acc;
            let inv = match deferred {
                true => {
                    let p = em.shared_gep(em.ctx.f32_type().into(), cx.smem, trow)?;
                    Some(em.b.build_load(em.ctx.f32_type(), p, "").ck()?.into_float_value())
                }
                false => None,
            };
            em.if_then(ok, |em| {
                let ri = em.unravel(row, &cx.rext)?;
                for ni in 0..4i64 {
                    for e in 0..2i64 {
                        let col = em.add(
                            em.add(col0, em.mul(wn, em.i64c(32))?)?,
                            em.add(em.i64c(ni * 8 + e), em.mul(tq, em.i64c(2))?)?,
                        )?;
                        let okc = em.icmp(IntPredicate::SLT, col, cx.nn)?;
                        let slot = acc[((mi * 4 + ni) * 4 + h * 2 + e) as usize];
                        let ri = ri.clone();
                        em.if_then(okc, |em| {
                            let mut idx = ri;
                            idx.push(col);
                            let v = em.getf(slot)?;
                            let v = match inv {
                                Some(inv) => em.fmul(v, inv)?,
                                None => v,
                            };
                            let v = em.round(v, cx.out)?;
                            em.finish(t, 0, &idx, Val::F(v), cx.out)
                        })?;
                    }
                }
                Ok(())
            })?;
        }
    }
    Ok(())
}

// ---- grouped GEMM (MoE experts) -------------------------------------------------------------

/// Operand `i` is a bf16 `[E, rows, K]` buffer with K contiguous and 16-byte aligned rows.
fn experts_ok(em: &Em, t: &TemplateKernel, i: usize) -> R<Option<usize>> {
    let b = match t.operands.get(i) {
        Some(Operand::Buffer(b)) => *b,
        _ => return Ok(None),
    };
    let v = &em.kernel.inputs[b].view;
    let ok = em.operand_dtype(t, i)? == DType::BF16
        && v.rank() == 3
        && v.strides[2] == Dim::constant(1)
        && aligned8(&v.strides[0])
        && aligned8(&v.strides[1])
        && aligned8(&v.offset);
    Ok(ok.then_some(b))
}

/// The shared expert of a `CombineShared` kernel when its GEMV can run it: `hs [b, s, Is]`
/// (Is a multiple of 8) and `bs` a bf16 `[Is, D]` buffer whose columns are contiguous and
/// 16-byte aligned. Returns (bs's input, Is, the shared product's dtype).
fn shared_ok(em: &Em, t: &TemplateKernel) -> R<Option<(usize, i64, DType)>> {
    let s4 = em.operand_shape(t, 4)?;
    let is = match (s4.len(), s4.last().and_then(|d| d.as_const())) {
        (3, Some(n)) if n > 0 && n % 8 == 0 => n,
        _ => return Ok(None),
    };
    let b = match t.operands.get(5) {
        Some(Operand::Buffer(b)) => *b,
        _ => return Ok(None),
    };
    let v = &em.kernel.inputs[b].view;
    let ok = em.operand_dtype(t, 5)? == DType::BF16
        && em.operand_dtype(t, 4)? == DType::BF16
        && v.rank() == 2
        && v.strides[0] == Dim::constant(1)
        && aligned8(&v.strides[1])
        && aligned8(&v.offset);
    Ok(ok.then_some((b, is, DType::BF16)))
}

/// Element offset of row `r` of expert `e` in expert buffer input `b`.
fn expert_row<'c>(em: &Em<'c, '_>, b: usize, e: IntValue<'c>, r: IntValue<'c>) -> R<IntValue<'c>> {
    let v = &em.kernel.inputs[b].view;
    let at = em.add(em.dim(&v.offset)?, em.mul(e, em.dim(&v.strides[0])?)?)?;
    em.add(at, em.mul(r, em.dim(&v.strides[1])?)?)
}

/// Per-lane partial dot products of the bf16 vector staged in shared memory at element `sbase`
/// (`len` elements, a multiple of 8) with each global bf16 row `(buffer, element offset)`:
/// 16-byte loads along the row, `UNROLL` steps of the warp in flight. Returns one f32 slot per row.
fn lane_dots<'c>(
    em: &mut Em<'c, '_>,
    smem: PointerValue<'c>,
    rows: &[(PointerValue<'c>, IntValue<'c>)],
    sbase: IntValue<'c>,
    len: IntValue<'c>,
    lane: IntValue<'c>,
) -> R<Vec<PointerValue<'c>>> {
    let mut acc = Vec::new();
    for _ in rows {
        acc.push(em.fvar(em.f32c(0.0))?);
    }
    let start = em.mul(lane, em.i64c(8))?;
    em.for_range(start, len, em.i64c(256 * UNROLL), |em, kx| {
        let zv = em.ctx.i32_type().vec_type(4).const_zero();
        let mut steps = Vec::new();
        for u in 0..UNROLL {
            let ku = em.add(kx, em.i64c(256 * u))?;
            let ok = em.icmp(IntPredicate::SLT, ku, len)?;
            steps.push((ok, em.select_i(ok, ku, kx)?));
        }
        let mut loaded = Vec::new();
        for (buf, base) in rows {
            let mut per = Vec::new();
            for (ok, ku) in &steps {
                let v = load_v4(em, gep16(em, *buf, em.add(*base, *ku)?)?)?;
                per.push(em.b.build_select(*ok, v, zv, "").ck()?.into_vector_value());
            }
            loaded.push(per);
        }
        let i16t = em.ctx.i16_type().into();
        let mut av = Vec::new();
        for (_, ku) in &steps {
            let p = em.shared_gep(i16t, smem, em.add(sbase, *ku)?)?;
            av.push(unpack8(em, load_v4(em, p)?)?);
        }
        for (slot, per) in acc.iter().zip(loaded) {
            let mut s = em.getf(*slot)?;
            for (a, v) in av.iter().zip(per) {
                let b = unpack8(em, v)?;
                for j in 0..8 {
                    s = em.fma(a[j], b[j], s)?;
                }
            }
            em.set(*slot, s)?;
        }
        Ok(())
    })?;
    Ok(acc)
}

/// The staging buffer of a grouped kernel: with the tensor-core tiles (prefill plans), dynamic
/// shared memory of [`gb_smem_bytes`] for the tiles' stages and the GEMVs alike; otherwise the
/// GEMVs' static buffer.
fn grouped_smem<'c>(em: &Em<'c, '_>, tiles: bool) -> R<PointerValue<'c>> {
    if tiles {
        // two blocks a multiprocessor: one block's scan and epilogue overlap the other's tiles
        em.launch_bounds(THREADS, 2)?;
        Ok(dynamic_smem(em))
    } else {
        let n = (GEMV_RT * GEMV_KC) as u32;
        Ok(em.shared_array("ringjit_gemm_smem", em.ctx.i16_type().into(), n))
    }
}

/// The blocks of the expert-major tiles: E · ceil(ceil(cols / tile_w) / group), `group` column
/// tiles a block (`None` for no columns).
fn tiles_grid(experts: &Dim, cols: i64, tile_w: i64, group: i64) -> Option<Dim> {
    let tiles = (cols + tile_w - 1) / tile_w;
    (cols > 0).then(|| experts.mul(&Dim::constant((tiles + group - 1) / group)))
}

/// A grouped kernel's launch: one-dimensional over the expert-major tiles' blocks (`sized`,
/// prefill plans; the GEMVs stride over it, [`each_item`]), else the GEMVs' own grid; the
/// tiles' dynamic shared memory when the kernel has them.
fn grouped_launch(sized: Option<Dim>, gemv: [GridDim; 3], tiles: bool) -> LaunchGeometry {
    let grid = match sized {
        Some(blocks) => [GridDim::blocks(blocks, 1), GridDim::one(), GridDim::one()],
        None => gemv,
    };
    LaunchGeometry {
        grid,
        block: [THREADS, 1, 1],
        shared_bytes: if tiles { gb_smem_bytes() } else { 0 },
    }
}

/// The GEMV items of a grouped kernel: `None`, one item a block at (`ctaid.x`, `ctaid.y`); or
/// `Some((xs, ys))`, items `0..xs·ys` strided over a one-dimensional grid (the prefill plans'
/// grid, sized for the expert-major tiles), item `i` at (`i / ys`, `i % ys`). The body may
/// use barriers: the trip count is uniform across a block.
fn each_item<'c, 'a>(
    em: &mut Em<'c, 'a>,
    items: Option<(IntValue<'c>, IntValue<'c>)>,
    body: impl FnOnce(&mut Em<'c, 'a>, IntValue<'c>, IntValue<'c>) -> R<()>,
) -> R<()> {
    match items {
        None => {
            let (x, y) = (em.sreg("ctaid.x")?, em.sreg("ctaid.y")?);
            body(em, x, y)
        }
        Some((xs, ys)) => {
            let n = em.mul(xs, ys)?;
            let (first, step) = (em.sreg("ctaid.x")?, em.sreg("nctaid.x")?);
            em.for_range(first, n, step, |em, i| {
                // the previous item's warps are done with the staged activations
                em.barrier()?;
                let (x, y) = (em.div(i, ys)?, em.rem(i, ys)?);
                body(em, x, y)
            })
        }
    }
}

/// The expert chosen by flattened routing entry `p` (operand 1 `[b, s, k]` in row-major order),
/// clamped to `0..experts`. A contiguous routing buffer (the usual case) is read at `p` itself;
/// otherwise `p` is unravelled and read through the view (two run-time 64-bit divisions an
/// entry, which made the prefill scan of every entry by every block expensive).
fn expert_at<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    p: IntValue<'c>,
    ext1: &[IntValue<'c>],
    experts: &Dim,
) -> R<IntValue<'c>> {
    if let Some(Operand::Buffer(b)) = t.operands.get(1) {
        let r = &em.kernel.inputs[*b];
        if r.view.strides == View::contiguous(&r.view.shape).strides {
            let dtype = em.plan.buffer(r.buffer).map(|b| b.dtype).unwrap_or(DType::I64);
            let at = em.add(em.dim(&r.view.offset)?, p)?;
            let e = if dtype == DType::I64 {
                // one 8-byte load (buffers are 8-byte aligned; LLVM would split it in two)
                let i64t = em.ctx.i64_type();
                // SAFETY (of the generated code): `at` is an entry of the routing buffer
                let q = unsafe { em.b.build_in_bounds_gep(i64t, em.inputs[*b], &[at], "") }.ck()?;
                let ld = em.b.build_load(i64t, q, "").ck()?;
                if let Some(ins) = ld.as_instruction_value() {
                    ins.set_alignment(8)
                        .map_err(|e| super::super::CodegenError(e.to_string()))?;
                }
                ld.into_int_value()
            } else {
                let v = em.load(em.inputs[*b], at, dtype)?;
                em.as_i(v)?
            };
            let hi = em.sub(em.dim(experts)?, em.i64c(1))?;
            return em.imin(em.imax(e, em.i64c(0))?, hi);
        }
    }
    let pi = em.unravel(p, ext1)?;
    expert_of(em, t, &pi, experts)
}

/// The expert chosen in slot `idx` of operand 1, clamped to `0..experts`.
fn expert_of<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, idx: &[IntValue<'c>], experts: &Dim) -> R<IntValue<'c>> {
    let e = em.ld(t, 1, idx)?;
    let e = em.as_i(e)?;
    let hi = em.sub(em.dim(experts)?, em.i64c(1))?;
    em.imin(em.imax(e, em.i64c(0))?, hi)
}

/// MoE expert GEMMs. SwiGlu with many (token, slot) pairs (`P >= max(4E, 64)`, a run-time
/// choice) takes the expert-major tensor-core tiles of [`expert_major`], and so does the
/// WeightedCombine of prefill plans (rows to scratch, then a deterministic combine); otherwise GEMVs over the
/// routed (token, slot) rows: a
/// block per (token, slot) (SwiGlu) or per token (WeightedCombine) and 16 output columns; the
/// token's activations (all its slots' for the combine) staged in shared memory as bf16, each
/// warp streaming two weight rows per matrix with 16-byte loads. Same arithmetic order per
/// output as the SIMT version. `None`: the SIMT version (f32 operands, unaligned or computed
/// weights, activations wider than the shared buffer).
pub(super) fn grouped_fast<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    epi: ir::fused::GroupedEpilogue,
) -> R<Option<LaunchGeometry>> {
    use ir::fused::GroupedEpilogue;
    if !enabled() {
        return Ok(None);
    }
    let (s0, s1) = (em.operand_shape(t, 0)?, em.operand_shape(t, 1)?);
    let smem_cap = GEMV_RT * GEMV_KC;
    match epi {
        GroupedEpilogue::SwiGlu => {
            let s2 = em.operand_shape(t, 2)?;
            if s0.len() != 3 || s1.len() != 3 || s2.len() != 3 || em.operand_dtype(t, 0)? != DType::BF16 {
                return Ok(None);
            }
            let d = match s0[2].as_const() {
                Some(d) if d > 0 && d % 8 == 0 && d <= smem_cap => d,
                _ => return Ok(None),
            };
            let (Some(wg), Some(wu)) = (experts_ok(em, t, 2)?, experts_ok(em, t, 3)?) else {
                return Ok(None);
            };
            let dt = em.result_dtype(t, 0);
            let direct = grouped_rows_direct(em, t, 3).filter(|_| em.prefill && grouped_mma_enabled());
            let tiles = direct.is_some();
            let smem = grouped_smem(em, tiles)?;
            let done = em.ctx.append_basic_block(em.f, "grouped.done");
            // prefill plans launch exactly the expert-major blocks (E · column-tile groups), and
            // the GEMVs of a short prompt stride over them; decode plans a block per GEMV item
            let group = gb_group(false);
            let sized = direct
                .and(s2[1].as_const())
                .and_then(|i| tiles_grid(&s2[0], i, GB_N, group));
            if let Some(x) = direct {
                // many (token, slot) pairs: the expert-major tensor-core tiles
                let pairs = em.product(&em.dims(&s1)?)?;
                let need = em.imax(em.mul(em.dim(&s2[0])?, em.i64c(4))?, em.i64c(64))?;
                let big = em.icmp(IntPredicate::SGE, pairs, need)?;
                let mma_bb = em.ctx.append_basic_block(em.f, "grouped.mma");
                let gemv_bb = em.ctx.append_basic_block(em.f, "grouped.gemv");
                em.b.build_conditional_branch(big, mma_bb, gemv_bb).ck()?;
                em.b.position_at_end(mma_bb);
                expert_major(em, t, smem, x, (wg, wu), d, dt, (&s1, &s2[0], &s2[1]), group, None)?;
                em.b.build_unconditional_branch(done).ck()?;
                em.b.position_at_end(gemv_bb);
            }
            let ext1 = em.dims(&s1)?;
            let inter = em.dim(&s2[1])?;
            let items = match sized {
                Some(_) => Some((em.product(&ext1)?, em.ceil_div(inter, em.i64c(GEMV_COLS))?)),
                None => None,
            };
            each_item(em, items, |em, px, py| {
                let pi = em.unravel(px, &ext1)?;
                let (bi, si, slot) = (pi[0], pi[1], pi[2]);
                let e = expert_of(em, t, &[bi, si, slot], &s2[0])?;
                let tid = em.sreg("tid.x")?;
                let dd = em.i64c(d);
                em.for_range(tid, dd, em.i64c(THREADS as i64), |em, c| {
                    let x = em.ldf(t, 0, &[bi, si, c])?;
                    let bits = bf16_bits(em, x)?;
                    let p = em.shared_gep(em.ctx.i16_type().into(), smem, c)?;
                    em.set(p, bits)
                })?;
                em.barrier()?;
                let warp = em.div(tid, em.i64c(32))?;
                let lane = em.rem(tid, em.i64c(32))?;
                let i0 = em.add(em.mul(py, em.i64c(GEMV_COLS))?, em.mul(warp, em.i64c(GEMV_CN))?)?;
                let mut cols = Vec::new();
                let mut rows = Vec::new();
                for c in 0..GEMV_CN {
                    let i = em.add(i0, em.i64c(c))?;
                    let ok = em.icmp(IntPredicate::SLT, i, inter)?;
                    let ic = em.select_i(ok, i, em.i64c(0))?;
                    rows.push((em.inputs[wg], expert_row(em, wg, e, ic)?));
                    rows.push((em.inputs[wu], expert_row(em, wu, e, ic)?));
                    cols.push((i, ok));
                }
                let acc = lane_dots(em, smem, &rows, em.i64c(0), dd, lane)?;
                let first = em.icmp(IntPredicate::EQ, lane, em.i64c(0))?;
                for (c, (i, ok)) in cols.into_iter().enumerate() {
                    let g = em.warp_reduce(ReduceOp::Sum, em.getf(acc[2 * c])?)?;
                    let u = em.warp_reduce(ReduceOp::Sum, em.getf(acc[2 * c + 1])?)?;
                    let st = em.and(first, ok)?;
                    em.if_then(st, |em| {
                        let g = em.round(g, dt)?;
                        let u = em.round(u, dt)?;
                        let sg = em.round(em.sigmoid(g)?, dt)?;
                        let silu = em.round(em.fmul(g, sg)?, dt)?;
                        let h = em.round(em.fmul(silu, u)?, dt)?;
                        em.finish(t, 0, &[bi, si, slot, i], Val::F(h), dt)
                    })?;
                }
                Ok(())
            })?;
            em.b.build_unconditional_branch(done).ck()?;
            em.b.position_at_end(done);
            let gemv = [
                GridDim::blocks(numel(&s1), 1),
                GridDim::blocks(s2[1].clone(), GEMV_COLS as u32),
                GridDim::one(),
            ];
            Ok(Some(grouped_launch(sized, gemv, tiles)))
        }
        GroupedEpilogue::WeightedCombine | GroupedEpilogue::CombineShared => {
            let s3 = em.operand_shape(t, 3)?;
            if s0.len() != 4 || s3.len() != 3 || em.operand_dtype(t, 0)? != DType::BF16 {
                return Ok(None);
            }
            // the shared expert beside the combine: `hs` staged after the token's h rows, `bs`
            // a bf16 [Is, D] with each output column's Is weights contiguous (a transposed
            // [D, Is] weight)
            let shared = match epi {
                GroupedEpilogue::CombineShared => match shared_ok(em, t)? {
                    Some(x) => Some(x),
                    None => return Ok(None),
                },
                _ => None,
            };
            let is_n = shared.map_or(0, |(_, n, _)| n);
            let (kn, ii) = match (s0[2].as_const(), s0[3].as_const()) {
                (Some(kn), Some(ii)) if kn > 0 && ii > 0 && ii % 8 == 0 && kn * ii + is_n <= smem_cap => (kn, ii),
                _ => return Ok(None),
            };
            let Some(wd) = experts_ok(em, t, 3)? else {
                return Ok(None);
            };
            let ydt = DType::promote(em.operand_dtype(t, 0)?, em.operand_dtype(t, 3)?).unwrap_or(DType::F32);
            let dout_c = s3[1].as_const().filter(|&n| n > 0 && n % 8 == 0);
            let direct = grouped_rows_direct(em, t, 4).filter(|_| {
                em.prefill && down_mma_enabled() && ydt == DType::BF16 && epi == GroupedEpilogue::WeightedCombine
            });
            let tiles = direct.is_some() && dout_c.is_some();
            let smem = grouped_smem(em, tiles)?;
            let done = em.ctx.append_basic_block(em.f, "grouped.done");
            // prefill plans launch exactly the expert-major blocks, the GEMVs stride over them
            let group = gb_group(true);
            let sized = direct.and(dout_c).and_then(|n| tiles_grid(&s3[0], n, 2 * GB_N, group));
            if let (Some(x), Some(dout_c)) = (direct, dout_c) {
                // many (token, slot) pairs: expert-major tensor-core tiles into scratch, then
                // the combine, on a grid of E · column-tile groups blocks (`sized`)
                let col_tiles = (dout_c + 2 * GB_N - 1) / (2 * GB_N);
                let cstride = (col_tiles + 3) / 4 * 4;
                let s1 = em.operand_shape(t, 1)?;
                let tokens = numel(&s0[..2]);
                em.scratch_zero = tokens.mul(&Dim::constant(cstride * 4));
                em.scratch_bytes = tokens.mul(&Dim::constant(cstride * 4 + kn * dout_c * 2));
                let pairs = em.product(&em.dims(&s1)?)?;
                let experts = em.dim(&s3[0])?;
                let need = em.imax(em.mul(experts, em.i64c(4))?, em.i64c(64))?;
                let big = em.icmp(IntPredicate::SGE, pairs, need)?;
                let mma_bb = em.ctx.append_basic_block(em.f, "grouped.mma");
                let gemv_bb = em.ctx.append_basic_block(em.f, "grouped.gemv");
                em.b.build_conditional_branch(big, mma_bb, gemv_bb).ck()?;
                em.b.position_at_end(mma_bb);
                let layout = DownLayout { cstride };
                let (ext, ws) = ((&s1[..], &s3[0], &s3[1]), (wd, wd));
                expert_major(em, t, smem, x, ws, ii, ydt, ext, group, Some(layout))?;
                em.b.build_unconditional_branch(done).ck()?;
                em.b.position_at_end(gemv_bb);
            }
            let ext = em.dims(&s0[..2])?;
            let dout = em.dim(&s3[1])?;
            let items = match sized {
                Some(_) => Some((em.product(&ext)?, em.ceil_div(dout, em.i64c(GEMV_COLS))?)),
                None => None,
            };
            each_item(em, items, |em, tx, ty| {
                let ti = em.unravel(tx, &ext)?;
                let (bi, si) = (ti[0], ti[1]);
                let tid = em.sreg("tid.x")?;
                let (kk, iv) = (em.i64c(kn), em.i64c(ii));
                em.for_range(tid, em.i64c(kn * ii), em.i64c(THREADS as i64), |em, x| {
                    let (slot, i) = (em.div(x, iv)?, em.rem(x, iv)?);
                    let h = em.ldf(t, 0, &[bi, si, slot, i])?;
                    let bits = bf16_bits(em, h)?;
                    let p = em.shared_gep(em.ctx.i16_type().into(), smem, x)?;
                    em.set(p, bits)
                })?;
                if shared.is_some() {
                    em.for_range(tid, em.i64c(is_n), em.i64c(THREADS as i64), |em, i| {
                        let h = em.ldf(t, 4, &[bi, si, i])?;
                        let bits = bf16_bits(em, h)?;
                        let p = em.shared_gep(em.ctx.i16_type().into(), smem, em.add(i, em.i64c(kn * ii))?)?;
                        em.set(p, bits)
                    })?;
                }
                em.barrier()?;
                let warp = em.div(tid, em.i64c(32))?;
                let lane = em.rem(tid, em.i64c(32))?;
                let j0 = em.add(em.mul(ty, em.i64c(GEMV_COLS))?, em.mul(warp, em.i64c(GEMV_CN))?)?;
                let mut cols = Vec::new();
                for c in 0..GEMV_CN {
                    let j = em.add(j0, em.i64c(c))?;
                    let ok = em.icmp(IntPredicate::SLT, j, dout)?;
                    cols.push((j, ok, em.select_i(ok, j, em.i64c(0))?));
                }
                let mut ys = Vec::new();
                for _ in 0..GEMV_CN {
                    ys.push(em.fvar(em.f32c(0.0))?);
                }
                let zero = em.i64c(0);
                em.for_range(zero, kk, em.i64c(1), |em, slot| {
                    let e = expert_of(em, t, &[bi, si, slot], &s3[0])?;
                    let w = em.ldf(t, 2, &[bi, si, slot])?;
                    let mut rows = Vec::new();
                    for (_, _, jc) in &cols {
                        rows.push((em.inputs[wd], expert_row(em, wd, e, *jc)?));
                    }
                    let sbase = em.mul(slot, iv)?;
                    let acc = lane_dots(em, smem, &rows, sbase, iv, lane)?;
                    for (y, a) in ys.iter().zip(acc) {
                        let dsum = em.warp_reduce(ReduceOp::Sum, em.getf(a)?)?;
                        let down = em.round(dsum, ydt)?;
                        let s = em.fma(w, down, em.getf(*y)?)?;
                        em.set(*y, s)?;
                    }
                    Ok(())
                })?;
                if let Some((bs, is, sdt)) = shared {
                    // one more row of the sum: the shared expert, weight 1
                    let mut rows = Vec::new();
                    for (_, _, jc) in &cols {
                        let at = em.view_offset(&em.kernel.inputs[bs].view, &[zero, *jc])?;
                        rows.push((em.inputs[bs], at));
                    }
                    let acc = lane_dots(em, smem, &rows, em.i64c(kn * ii), em.i64c(is), lane)?;
                    for (y, a) in ys.iter().zip(acc) {
                        let dsum = em.warp_reduce(ReduceOp::Sum, em.getf(a)?)?;
                        let v = em.fadd(em.getf(*y)?, em.round(dsum, sdt)?)?;
                        em.set(*y, v)?;
                    }
                }
                let first = em.icmp(IntPredicate::EQ, lane, em.i64c(0))?;
                for (y, (j, ok, _)) in ys.into_iter().zip(cols) {
                    let st = em.and(first, ok)?;
                    em.if_then(st, |em| {
                        let v = em.getf(y)?;
                        em.finish(t, 0, &[bi, si, j], Val::F(v), DType::F32)
                    })?;
                }
                Ok(())
            })?;
            em.b.build_unconditional_branch(done).ck()?;
            em.b.position_at_end(done);
            let gemv = [
                GridDim::blocks(numel(&s0[..2]), 1),
                GridDim::blocks(s3[1].clone(), GEMV_COLS as u32),
                GridDim::one(),
            ];
            Ok(Some(grouped_launch(sized, gemv, tiles)))
        }
    }
}

// ---- grouped SwiGlu on tensor cores (many tokens) ---------------------------------------------

/// (token, slot) rows of one expert tile.
const GB_M: i64 = 128;
/// Intermediate columns of one tile (as many gate rows and up rows of the expert's weights).
const GB_N: i64 = 64;
/// K step of the grouped tile.
const GB_K: i64 = 32;
/// Shared row stride in bf16 elements (80 bytes: the 8 rows of an `ldmatrix` fall in 8
/// different bank groups).
const GB_LDS: i64 = GB_K + 8;
/// bf16 elements of one stage: the A rows, the gate rows, the up rows.
const GB_STAGE: i64 = (GB_M + 2 * GB_N) * GB_LDS;
/// Column tiles a SwiGlu / down expert-major block runs per batch of listed pairs (one routing
/// scan for all). Measured on an H100 (Ring-mini prefill 4096, docs/perf.md): 2 made the down
/// projection 5 % faster and the SwiGlu 6 % slower, 4 both slower.
const GB_GROUP_SWIGLU: i64 = 1;
const GB_GROUP_DOWN: i64 = 2;
/// Pipeline stages of the grouped tile (in dynamic shared memory). 4 measured 2 % faster on an
/// H100 (docs/perf.md) but spills under the two-blocks bound in small's kernels; 3 does not.
const GB_STAGES: i64 = 3;
/// Warps over the tile's rows (each 32 rows) and over its columns (each 32 of gate and of up).
const GB_WM: i64 = 4;
const GB_WN: i64 = 2;
/// Routing entries scanned per step and thread pass (one per thread).
const GB_SCAN: i64 = THREADS as i64;
/// Thread passes per scan step (one barrier per step; the step's loads in flight together).
/// 16 measured 3 % faster than 8 on an H200 (grouped GEMMs of a Ring-mini prefill); 32 spills.
const GB_SCAN_PER: i64 = 16;
/// [`GB_SCAN_PER`], or `RINGJIT_GB_SCAN_PER` (4 to 32; for measuring).
fn gb_scan_per() -> i64 {
    knob("RINGJIT_GB_SCAN_PER", 4..=32).unwrap_or(GB_SCAN_PER)
}

/// 16-byte copies of one operand row per K step, and the tile rows a pass of the block copies.
const GB_CHUNKS: i64 = GB_K / 8;
const GB_ROWS_PER_PASS: i64 = THREADS as i64 / GB_CHUNKS;
const _: () = assert!(GB_WM * GB_WN * 32 == THREADS as i64 && GB_WM * 32 == GB_M && GB_WN * 32 == GB_N);
const _: () = assert!(GB_M % GB_ROWS_PER_PASS == 0 && GB_N % GB_ROWS_PER_PASS == 0);
/// Pipeline stages of the grouped tile: [`GB_STAGES`], or `RINGJIT_GB_STAGES` (2 to 4; for
/// measuring).
fn gb_stages() -> i64 {
    knob("RINGJIT_GB_STAGES", 2..=4).unwrap_or(GB_STAGES)
}

/// Shared bytes of a grouped kernel with the tensor-core path (its GEMVs use the same buffer).
fn gb_smem_bytes() -> u32 {
    (gb_stages() * GB_STAGE * 2).max(GEMV_RT * GEMV_KC * 2) as u32
}

/// Whether the expert-major tensor-core path of the grouped SwiGlu is compiled into prefill
/// plans' kernels (decode plans never get it): on by default, `RINGJIT_GROUPED=gemv` leaves
/// only the GEMVs (`RINGJIT_GROUPED=mma` forces it on; tests force it with
/// [`force_grouped_mma`]).
fn grouped_mma_enabled() -> bool {
    if FORCE_GROUPED_MMA.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    match std::env::var("RINGJIT_GROUPED") {
        Ok(v) if v == "gemv" => false,
        Ok(v) if v == "mma" => true,
        _ => GROUPED_MMA_DEFAULT,
    }
}
const GROUPED_MMA_DEFAULT: bool = true;
static FORCE_GROUPED_MMA: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Compile the grouped SwiGlu's tensor-core path into every prefill kernel from now on, in this
/// process (tests of the generated code).
#[cfg(test)]
pub(crate) fn force_grouped_mma() {
    FORCE_GROUPED_MMA.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the down projection (WeightedCombine) takes the expert-major path in prefill plans:
/// with the SwiGlu's, and not under `RINGJIT_GROUPED=swiglu` (the SwiGlu's tiles only, the
/// down projection as GEMVs: for A/B timing).
fn down_mma_enabled() -> bool {
    if FORCE_GROUPED_MMA.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    grouped_mma_enabled() && std::env::var("RINGJIT_GROUPED").map(|v| v != "swiglu").unwrap_or(true)
}

/// Operand 0 as a bf16 buffer of `rank` axes (`[b, s, d]` activations, or `[b, s, k, i]` for
/// the down projection) whose rows can be copied 16 bytes at a time.
fn grouped_rows_direct(em: &Em, t: &TemplateKernel, rank: usize) -> Option<usize> {
    let Some(Operand::Buffer(b)) = t.operands.first() else {
        return None;
    };
    let v = bf16_view(em, *b)?;
    let ok = v.rank() == rank
        && v.strides[rank - 1] == Dim::constant(1)
        && (0..rank - 1).all(|i| aligned8(&v.strides[i]))
        && aligned8(&v.offset);
    ok.then_some(*b)
}

/// `while (cond()) body()`.
fn while_loop<'c, 'a>(
    em: &mut Em<'c, 'a>,
    cond: impl Fn(&mut Em<'c, 'a>) -> R<IntValue<'c>>,
    body: impl FnOnce(&mut Em<'c, 'a>) -> R<()>,
) -> R<()> {
    let cb = em.ctx.append_basic_block(em.f, "while.cond");
    let bb = em.ctx.append_basic_block(em.f, "while.body");
    let exit = em.ctx.append_basic_block(em.f, "while.exit");
    em.b.build_unconditional_branch(cb).ck()?;
    em.b.position_at_end(cb);
    let c = cond(em)?;
    em.b.build_conditional_branch(c, bb, exit).ck()?;
    em.b.position_at_end(bb);
    body(em)?;
    em.b.build_unconditional_branch(cb).ck()?;
    em.b.position_at_end(exit);
    Ok(())
}

#[derive(Clone)]
struct Gx<'c> {
    smem: PointerValue<'c>,
    list: PointerValue<'c>,
    x: usize,
    /// Extents of the routing operand `[b, s, k]`.
    ext1: Vec<IntValue<'c>>,
    /// Output columns of the weights (`I` for SwiGlu, `D` for the down projection).
    inter: IntValue<'c>,
    col0: IntValue<'c>,
    d: i64,
    dt: DType,
    /// The weight rows this thread copies, per half, one per pass of `GB_ROWS_PER_PASS` rows:
    /// (address of k 0, in range). SwiGlu: the gate and up rows of columns
    /// `col0 + crow + pass · GB_ROWS_PER_PASS`; down: those rows and the same `GB_N` further
    /// of the one down matrix.
    brows: [Vec<(PointerValue<'c>, IntValue<'c>)>; 2],
    /// `Some` for the down projection (A rows `h[b, s, slot, :]`, results to scratch, then the
    /// combine), `None` for SwiGlu (A rows `x[b, s, :]`).
    down: Option<Down<'c>>,
}

impl<'c> Gx<'c> {
    /// The same tile context over the list from entry `base` on.
    fn from(&self, em: &Em<'c, '_>, base: IntValue<'c>) -> R<Gx<'c>> {
        let list = em.shared_gep(em.ctx.i32_type().into(), self.list, base)?;
        Ok(Gx { list, ..self.clone() })
    }
}

/// The expert-major down projection's state: where its per-(token, slot) rows and arrival
/// counters live in scratch.
#[derive(Clone, Copy)]
struct Down<'c> {
    /// u32 counters per token (`ceil(tiles / 4) · 4`), at the start of scratch.
    cstride: i64,
    /// Shared i32 flags, one per tile row: this block completed the row's token.
    flags: PointerValue<'c>,
    /// The slots per token, when a constant.
    k: Option<i64>,
}

impl<'c> Down<'c> {
    /// Column tile index of the tile (its counter slot), recomputed where needed rather than
    /// held through the tiles (registers).
    fn tile(&self, em: &Em<'c, '_>, g: &Gx<'c>) -> R<IntValue<'c>> {
        em.div(g.col0, em.i64c(2 * GB_N))
    }

    /// bf16 element offset of the rows `[pairs, D]` in scratch (after the u32 counters).
    fn ybase(&self, em: &Em<'c, '_>, g: &Gx<'c>) -> R<IntValue<'c>> {
        let tokens = em.mul(g.ext1[0], g.ext1[1])?;
        em.mul(tokens, em.i64c(2 * self.cstride))
    }
}

/// The (token, slot) pair at list position `r` (clamped to a valid entry when `ok` is false).
fn list_pair<'c>(em: &Em<'c, '_>, g: &Gx<'c>, r: IntValue<'c>, ok: IntValue<'c>) -> R<IntValue<'c>> {
    let i32t = em.ctx.i32_type();
    let rc = em.select_i(ok, r, em.i64c(0))?;
    let p = em.shared_gep(i32t.into(), g.list, rc)?;
    let v = em.b.build_load(i32t, p, "").ck()?.into_int_value();
    let v = em.b.build_int_s_extend(v, em.ctx.i64_type(), "").ck()?;
    em.select_i(ok, v, em.i64c(0))
}

/// One `GB_M × GB_N` tile of expert rows: the first `nrows` pairs of the shared list against
/// the block's gate and up weight rows (or the down matrix's two column halves), then the
/// epilogue. Warp (wm, wn) computes rows `wm·32 ..` against columns `wn·32 ..` of both halves;
/// a warp whose rows are all past `nrows` skips its tensor-core work.
fn grouped_tile<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, g: &Gx<'c>, nrows: IntValue<'c>) -> R<()> {
    let (zero, one) = (em.i64c(0), em.i64c(1));
    let i32t = em.ctx.i32_type();
    let tid = em.sreg("tid.x")?;
    let warp = em.div(tid, em.i64c(32))?;
    let lane = em.rem(tid, em.i64c(32))?;
    let (wm, wn) = (em.div(warp, em.i64c(GB_WN))?, em.rem(warp, em.i64c(GB_WN))?);
    let crow = em.div(tid, em.i64c(GB_CHUNKS))?;
    let kc8 = em.mul(em.rem(tid, em.i64c(GB_CHUNKS))?, em.i64c(8))?;
    // this thread's A rows: the tokens of list entries crow, crow + GB_ROWS_PER_PASS, ..
    let mut arows = Vec::new();
    for pass in 0..GB_M / GB_ROWS_PER_PASS {
        let r = em.add(crow, em.i64c(pass * GB_ROWS_PER_PASS))?;
        let ok = em.icmp(IntPredicate::SLT, r, nrows)?;
        let p = list_pair(em, g, r, ok)?;
        let pi = em.unravel(p, &g.ext1)?;
        let idx = match g.down {
            Some(_) => vec![pi[0], pi[1], pi[2], zero],
            None => vec![pi[0], pi[1], zero],
        };
        let base = em.view_offset(&em.kernel.inputs[g.x].view, &idx)?;
        arows.push((r, ok, gep16(em, em.inputs[g.x], base)?));
    }
    let kk = em.i64c(g.d);
    let saddr = |em: &Em<'c, '_>, e: IntValue<'c>| -> R<IntValue<'c>> {
        let p = em.shared_gep(em.ctx.i16_type().into(), g.smem, e)?;
        em.b.build_ptr_to_int(p, i32t, "").ck()
    };
    let load_tile = |em: &mut Em<'c, '_>, kt: IntValue<'c>, stage: IntValue<'c>| -> R<()> {
        let k = em.add(em.mul(kt, em.i64c(GB_K))?, kc8)?;
        let k_ok = em.icmp(IntPredicate::SLT, k, kk)?;
        let kcl = em.select_i(k_ok, k, zero)?;
        let sbase = em.mul(stage, em.i64c(GB_STAGE))?;
        for (r, ok, row) in &arows {
            let at = em.add(em.add(sbase, em.mul(*r, em.i64c(GB_LDS))?)?, kc8)?;
            cp_async16(em, saddr(em, at)?, gep16(em, *row, kcl)?, em.and(*ok, k_ok)?)?;
        }
        for (j, rows) in g.brows.iter().enumerate() {
            for (pass, (row, ok)) in rows.iter().enumerate() {
                let r = em.add(crow, em.i64c(GB_M + GB_N * j as i64 + GB_ROWS_PER_PASS * pass as i64))?;
                let at = em.add(em.add(sbase, em.mul(r, em.i64c(GB_LDS))?)?, kc8)?;
                cp_async16(em, saddr(em, at)?, gep16(em, *row, kcl)?, em.and(*ok, k_ok)?)?;
            }
        }
        Ok(())
    };
    // (gate, up) × 2 (m16) × 4 (n8) tiles of 4 f32 each
    let mut acc = Vec::new();
    for _ in 0..64 {
        acc.push(em.fvar(em.f32c(0.0))?);
    }
    // the K steps as a value LLVM cannot see through: a short constant loop would be unrolled
    // with the pipeline, and the registers of the unrolled steps spill
    let kt_n = em
        .asm_se(
            Some(em.ctx.i64_type().into()),
            &[],
            &format!("mov.u64 $0, {};", (g.d + GB_K - 1) / GB_K),
            "=l",
            &[],
        )?
        .expect("a value")
        .into_int_value();
    let stages = gb_stages();
    pipeline_start(em, stages, kt_n, &load_tile)?;
    let gq = em.div(lane, em.i64c(4))?;
    let tq = em.rem(lane, em.i64c(4))?;
    let [a_lrow, a_lcol, b_ln, b_lk] = ldmatrix_lanes(em, lane, (wm, wn), (32, 32))?;
    let ldm =
        |em: &Em<'c, '_>, e: IntValue<'c>| -> R<[IntValue<'c>; 4]> { super::tc::ldmatrix(em, saddr(em, e)?, false) };
    let live = em.icmp(IntPredicate::SLT, em.mul(wm, em.i64c(32))?, nrows)?;
    em.for_range(zero, kt_n, one, |em, kt| {
        let stage = pipeline_step(em, stages, kt, kt_n, &load_tile, None)?;
        let sbase = em.mul(stage, em.i64c(GB_STAGE))?;
        em.if_then(live, |em| {
            for ks in 0..(GB_K / 16) {
                let mut af = Vec::new();
                for mi in 0..2 {
                    let row = em.add(a_lrow, em.i64c(mi * 16))?;
                    let col = em.add(a_lcol, em.i64c(ks * 16))?;
                    let e = em.add(sbase, em.add(em.mul(row, em.i64c(GB_LDS))?, col)?)?;
                    af.push(ldm(em, e)?);
                }
                // bfr[which][ni]: gate (0) / up (1) fragments of n8 tiles 0..4
                let mut bfr = Vec::new();
                for which in 0..2 {
                    let mut per = Vec::new();
                    for nj in 0..2 {
                        let n = em.add(b_ln, em.i64c(GB_M + which * GB_N + nj * 16))?;
                        let k = em.add(b_lk, em.i64c(ks * 16))?;
                        let e = em.add(sbase, em.add(em.mul(n, em.i64c(GB_LDS))?, k)?)?;
                        let r = ldm(em, e)?;
                        per.push([r[0], r[1]]);
                        per.push([r[2], r[3]]);
                    }
                    bfr.push(per);
                }
                for (which, bw) in bfr.iter().enumerate() {
                    for (mi, a) in af.iter().enumerate() {
                        for (ni, b) in bw.iter().enumerate() {
                            mma_acc(em, &acc, ((which * 2 + mi) * 4 + ni) * 4, a, *b)?;
                        }
                    }
                }
            }
            Ok(())
        })
    })?;
    em.asm_ordered("cp.async.wait_group 0;")?;
    // results: c0, c1 at (g, 2t..2t+1), c2, c3 at (g + 8, ..)
    let dt = g.dt;
    if let Some(dn) = g.down {
        // the down projection: each (pair, column) rounded to bf16 into scratch, two columns
        // per 32-bit store
        let acc = &acc;
        each_listed_row(em, g, (wm, gq, nrows), |em, mi, h, p| {
            let yrow = em.add(dn.ybase(em, g)?, em.mul(p, g.inter)?)?;
            for which in 0..2i64 {
                for ni in 0..4i64 {
                    let col = em.add(
                        em.add(g.col0, em.i64c(which * GB_N + ni * 8))?,
                        em.add(em.mul(wn, em.i64c(32))?, em.mul(tq, em.i64c(2))?)?,
                    )?;
                    let okc = em.icmp(IntPredicate::SLT, col, g.inter)?;
                    let at = |e2: i64| ((((which * 2 + mi) * 4 + ni) * 4) + h * 2 + e2) as usize;
                    let (a0, a1) = (acc[at(0)], acc[at(1)]);
                    em.if_then(okc, |em| {
                        let v0 = bf16_bits(em, em.round(em.getf(a0)?, dt)?)?;
                        let v1 = bf16_bits(em, em.round(em.getf(a1)?, dt)?)?;
                        let lo = em.b.build_int_z_extend(v0, i32t, "").ck()?;
                        let hi = em.b.build_int_z_extend(v1, i32t, "").ck()?;
                        let hi = em.b.build_left_shift(hi, i32t.const_int(16, false), "").ck()?;
                        let w = em.b.build_or(lo, hi, "").ck()?;
                        let ptr = gep16(em, em.scratch, em.add(yrow, col)?)?;
                        let st = em.b.build_store(ptr, w).ck()?;
                        st.set_alignment(4)
                            .map_err(|e| super::super::CodegenError(e.to_string()))?;
                        Ok(())
                    })?;
                }
            }
            Ok(())
        })?;
        return down_combine(em, t, g, dn, nrows);
    }
    let acc = &acc;
    each_listed_row(em, g, (wm, gq, nrows), |em, mi, h, p| {
        let pi = em.unravel(p, &g.ext1)?;
        for ni in 0..4i64 {
            for e2 in 0..2i64 {
                let col = em.add(
                    em.add(g.col0, em.mul(wn, em.i64c(32))?)?,
                    em.add(em.i64c(ni * 8 + e2), em.mul(tq, em.i64c(2))?)?,
                )?;
                let okc = em.icmp(IntPredicate::SLT, col, g.inter)?;
                let at = |which: i64| ((((which * 2 + mi) * 4 + ni) * 4) + h * 2 + e2) as usize;
                let (gs, us) = (acc[at(0)], acc[at(1)]);
                let pi = pi.clone();
                em.if_then(okc, |em| {
                    let gv = em.round(em.getf(gs)?, dt)?;
                    let uv = em.round(em.getf(us)?, dt)?;
                    let sg = em.round(em.sigmoid(gv)?, dt)?;
                    let silu = em.round(em.fmul(gv, sg)?, dt)?;
                    let hv = em.round(em.fmul(silu, uv)?, dt)?;
                    em.finish(t, 0, &[pi[0], pi[1], pi[2], col], Val::F(hv), dt)
                })?;
            }
        }
        Ok(())
    })
}

/// The rows of a tile this thread's accumulators hold (row groups `mi`, `h`: row
/// `wm·32 + mi·16 + h·8 + gq`), each one in range given to `f` with its listed pair.
fn each_listed_row<'c>(
    em: &mut Em<'c, '_>,
    g: &Gx<'c>,
    (wm, gq, nrows): (IntValue<'c>, IntValue<'c>, IntValue<'c>),
    mut f: impl FnMut(&mut Em<'c, '_>, i64, i64, IntValue<'c>) -> R<()>,
) -> R<()> {
    for mi in 0..2i64 {
        for h in 0..2i64 {
            let row = em.add(em.mul(wm, em.i64c(32))?, em.add(em.i64c(mi * 16 + h * 8), gq)?)?;
            let ok = em.icmp(IntPredicate::SLT, row, nrows)?;
            em.if_then(ok, |em| {
                let p = list_pair(em, g, row, ok)?;
                f(em, mi, h, p)
            })?;
        }
    }
    Ok(())
}

/// After a down tile: publish its rows, count each row's arrival on its token's counter for
/// this column tile, and for every token whose last slot this block brought, combine the
/// token's `k` rows from scratch in slot order (`y = fma(w_slot, row_slot, y)`, the GEMV's
/// order) into the output. Integer atomics only: every output is computed from the same
/// values in the same order whichever block combines it.
fn down_combine<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, g: &Gx<'c>, dn: Down<'c>, nrows: IntValue<'c>) -> R<()> {
    let zero = em.i64c(0);
    let i32t = em.ctx.i32_type();
    let tid = em.sreg("tid.x")?;
    let kk = g.ext1[2];
    super::attention::fence(em)?;
    em.barrier()?;
    let mine = em.icmp(IntPredicate::SLT, tid, em.i64c(GB_M))?;
    em.if_then(mine, |em| {
        let ok = em.icmp(IntPredicate::SLT, tid, nrows)?;
        let flag = em.ivar(zero)?;
        em.if_then(ok, |em| {
            let p = list_pair(em, g, tid, ok)?;
            let tok = em.div(p, kk)?;
            let ci = em.add(em.mul(tok, em.i64c(dn.cstride))?, dn.tile(em, g)?)?;
            // SAFETY (of the generated code): the counter region holds tokens · cstride u32.
            let cp = unsafe { em.b.build_in_bounds_gep(i32t, em.scratch, &[ci], "") }.ck()?;
            let old = em.count_arrival(cp)?;
            let k1 = em.b.build_int_truncate(em.sub(kk, em.i64c(1))?, i32t, "").ck()?;
            let last = em.icmp(IntPredicate::EQ, old, k1)?;
            em.set(flag, em.b.build_int_z_extend(last, em.ctx.i64_type(), "").ck()?)
        })?;
        let q = em.shared_gep(i32t.into(), dn.flags, tid)?;
        let f = em.b.build_int_truncate(em.geti(flag)?, i32t, "").ck()?;
        em.set(q, f)
    })?;
    super::attention::fence(em)?;
    em.barrier()?;
    // two rows at a time: threads 0..127 and 128..255, one column each
    let half = em.div(tid, em.i64c(2 * GB_N))?;
    let c = em.rem(tid, em.i64c(2 * GB_N))?;
    let col = em.add(g.col0, c)?;
    let okc = em.icmp(IntPredicate::SLT, col, g.inter)?;
    em.for_range(zero, nrows, em.i64c(2), |em, r0| {
        let r = em.add(r0, half)?;
        let inr = em.icmp(IntPredicate::SLT, r, nrows)?;
        let rc = em.select_i(inr, r, zero)?;
        let q = em.shared_gep(i32t.into(), dn.flags, rc)?;
        let f = em.b.build_load(i32t, q, "").ck()?.into_int_value();
        let f = em.icmp(IntPredicate::NE, f, i32t.const_zero())?;
        let go = em.and(em.and(inr, f)?, okc)?;
        em.if_then(go, |em| {
            let p = list_pair(em, g, rc, inr)?;
            let tok = em.div(p, kk)?;
            let ti = em.unravel(tok, &g.ext1[..2])?;
            let y = em.fvar(em.f32c(0.0))?;
            let first = em.add(dn.ybase(em, g)?, em.add(em.mul(em.mul(tok, kk)?, g.inter)?, col)?)?;
            // slot `slot`'s (weight, row value), the row read volatile (from L2: other blocks
            // wrote it)
            let slot_term = |em: &mut Em<'c, '_>, slot: IntValue<'c>| -> R<(FloatValue<'c>, FloatValue<'c>)> {
                let w = em.ldf(t, 2, &[ti[0], ti[1], slot])?;
                let at = em.add(first, em.mul(slot, g.inter)?)?;
                let ld =
                    em.b.build_load(em.ctx.i16_type(), gep16(em, em.scratch, at)?, "")
                        .ck()?;
                if let Some(ins) = ld.as_instruction_value() {
                    ins.set_volatile(true)
                        .map_err(|e| super::super::CodegenError(e.to_string()))?;
                }
                let bits = em.b.build_int_z_extend(ld.into_int_value(), i32t, "").ck()?;
                let bits = em.b.build_left_shift(bits, i32t.const_int(16, false), "").ck()?;
                let v =
                    em.b.build_bit_cast(bits, em.ctx.f32_type(), "")
                        .ck()?
                        .into_float_value();
                Ok((w, v))
            };
            match dn.k {
                // a known k: every slot's loads issued before the sums (same order of sums)
                Some(k) if k <= 16 => {
                    let mut terms = Vec::new();
                    for slot in 0..k {
                        terms.push(slot_term(em, em.i64c(slot))?);
                    }
                    for (w, v) in terms {
                        em.set(y, em.fma(w, v, em.getf(y)?)?)?;
                    }
                }
                _ => em.for_range(zero, kk, em.i64c(1), |em, slot| {
                    let (w, v) = slot_term(em, slot)?;
                    em.set(y, em.fma(w, v, em.getf(y)?)?)
                })?,
            }
            let v = em.getf(y)?;
            em.finish(t, 0, &[ti[0], ti[1], col], Val::F(v), DType::F32)
        })
    })?;
    em.barrier()
}

/// The down projection's scratch layout: u32 arrival counters per (token, column tile), then
/// the bf16 rows `[pairs, D]`.
struct DownLayout {
    /// counters per token (column tiles rounded up to 4: 16-byte rows)
    cstride: i64,
}

/// The expert-major grouped GEMM: block (expert e, group of [`gb_group`] column tiles),
/// numbered in launch order, scans the routing operand `GB_SCAN · GB_SCAN_PER` entries at a
/// time (one load an entry: [`expert_at`]), appends the (token, slot) pairs routed to e to a
/// shared list (a shared counter), and runs a tensor-core tile of each of its column tiles for
/// every GB_M pairs listed, and once more for the rest at the end. SwiGlu (`down` None): GB_N
/// intermediate columns of gate and up, finished in the tile. Down: 2·GB_N output columns,
/// rows to scratch, then [`down_combine`]. Blocks past `E · groups` exit (the callers launch
/// exactly E · groups blocks, or, when a SwiGlu's columns are not a constant, the larger GEMV
/// grid).
#[allow(clippy::too_many_arguments)]
fn expert_major<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    smem: PointerValue<'c>,
    x: usize,
    (wa, wb): (usize, usize),
    d: i64,
    dt: DType,
    (s1, experts, ncols): (&[Dim], &Dim, &Dim),
    group: i64,
    down: Option<DownLayout>,
) -> R<()> {
    let per = gb_scan_per();
    let zero = em.i64c(0);
    let i32t = em.ctx.i32_type();
    let list = em.shared_array("ringjit_grouped_list", i32t.into(), (GB_M + GB_SCAN * per) as u32);
    let ext1 = em.dims(s1)?;
    let pairs = em.product(&ext1)?;
    let experts_v = em.dim(experts)?;
    let inter = em.dim(ncols)?;
    let tile_w = if down.is_some() { 2 * GB_N } else { GB_N };
    // the first E · groups blocks in launch order work (an expert's column tiles together,
    // sharing its gathered rows in L2), each on `group` column tiles; the others exit at once
    let n_tiles = em.ceil_div(inter, em.i64c(tile_w))?;
    let n_groups = em.ceil_div(n_tiles, em.i64c(group))?;
    let lin = linear_block(em)?;
    let out = em.icmp(IntPredicate::SGE, lin, em.mul(experts_v, n_groups)?)?;
    em.return_if(out)?;
    let e = em.div(lin, n_groups)?;
    let tile0 = em.mul(em.rem(lin, n_groups)?, em.i64c(group))?;
    let tid = em.sreg("tid.x")?;
    let col0 = em.mul(tile0, em.i64c(tile_w))?;
    let brows = tile_brows(em, (wa, wb), e, col0, inter, down.is_some())?;
    let down = down.map(|l| Down {
        cstride: l.cstride,
        flags: em.shared_array("ringjit_grouped_flags", i32t.into(), GB_M as u32),
        k: s1[2].as_const(),
    });
    let g = Gx {
        smem,
        list,
        x,
        ext1: ext1.clone(),
        inter,
        col0,
        d,
        dt,
        brows,
        down,
    };
    // the routing operand, GB_SCAN_PER entries a thread per step: the pairs routed to e are
    // appended to the shared list through a shared counter (their order in the list does not
    // matter: a row's results depend on its own pair only); then a tile for every GB_M listed
    // pairs, and the rest moved to the front of the list
    let scnt = em.shared_array("ringjit_grouped_count", i32t.into(), 1);
    let first = em.icmp(IntPredicate::EQ, tid, zero)?;
    em.if_then(first, |em| em.set(scnt, i32t.const_zero()))?;
    em.barrier()?;
    let load_count = |em: &Em<'c, '_>| -> R<IntValue<'c>> {
        let c = em.b.build_load(i32t, scnt, "").ck()?.into_int_value();
        em.b.build_int_z_extend(c, em.ctx.i64_type(), "").ck()
    };
    em.for_range(zero, pairs, em.i64c(GB_SCAN * per), |em, c0| {
        // the step's loads all issued before the first append (an append between two loads
        // would make each wait for the one before)
        let mut entries = Vec::new();
        for j in 0..per {
            let p = em.add(c0, em.add(tid, em.i64c(j * GB_SCAN))?)?;
            let ok = em.icmp(IntPredicate::SLT, p, pairs)?;
            let pc = em.select_i(ok, p, zero)?;
            entries.push((p, ok, expert_at(em, t, pc, &ext1, experts)?));
        }
        for (p, ok, ep) in entries {
            let flag = em.and(ok, em.icmp(IntPredicate::EQ, ep, e)?)?;
            em.if_then(flag, |em| {
                let at = em.count_arrival(scnt)?;
                let at = em.b.build_int_z_extend(at, em.ctx.i64_type(), "").ck()?;
                let q = em.shared_gep(i32t.into(), list, at)?;
                let v = em.b.build_int_truncate(p, i32t, "").ck()?;
                em.set(q, v)
            })?;
        }
        em.barrier()?;
        let cnt = load_count(em)?;
        // every thread has read the count before the next step's appends
        em.barrier()?;
        let base = em.ivar(zero)?;
        while_loop(
            em,
            |em| {
                let left = em.sub(cnt, em.geti(base)?)?;
                em.icmp(IntPredicate::SGE, left, em.i64c(GB_M))
            },
            |em| {
                let b = em.geti(base)?;
                group_tiles(
                    em,
                    t,
                    &g.from(em, b)?,
                    (wa, wb),
                    (e, tile0, n_tiles, group),
                    em.i64c(GB_M),
                )?;
                em.set(base, em.add(b, em.i64c(GB_M))?)
            },
        )?;
        let b = em.geti(base)?;
        let moved = em.icmp(IntPredicate::SGT, b, zero)?;
        em.if_then(moved, |em| {
            let rem = em.sub(cnt, b)?;
            let has = em.icmp(IntPredicate::SLT, tid, rem)?;
            let src = em.select_i(has, em.add(tid, b)?, zero)?;
            let q = em.shared_gep(i32t.into(), list, src)?;
            let v = em.b.build_load(i32t, q, "").ck()?.into_int_value();
            em.barrier()?;
            em.if_then(has, |em| {
                let q = em.shared_gep(i32t.into(), list, tid)?;
                em.set(q, v)
            })?;
            em.if_then(first, |em| {
                let r = em.b.build_int_truncate(rem, i32t, "").ck()?;
                em.set(scnt, r)
            })?;
            em.barrier()
        })?;
        Ok(())
    })?;
    let rest = load_count(em)?;
    let some = em.icmp(IntPredicate::SGT, rest, zero)?;
    em.if_then(some, |em| {
        group_tiles(em, t, &g, (wa, wb), (e, tile0, n_tiles, group), rest)
    })
}

/// Column tiles an expert-major block runs on each batch of listed pairs, so that one routing
/// scan serves them all: [`GB_GROUP_SWIGLU`] / [`GB_GROUP_DOWN`], or `RINGJIT_GB_GROUP` (1 to 8;
/// for measuring).
fn gb_group(down: bool) -> i64 {
    knob("RINGJIT_GB_GROUP", 1..=8).unwrap_or(if down { GB_GROUP_DOWN } else { GB_GROUP_SWIGLU })
}

/// The weight rows this thread copies for the column tile at `col0` of expert `e` (see
/// [`Gx::brows`]).
fn tile_brows<'c>(
    em: &Em<'c, '_>,
    (wa, wb): (usize, usize),
    e: IntValue<'c>,
    col0: IntValue<'c>,
    inter: IntValue<'c>,
    down: bool,
) -> R<[Vec<(PointerValue<'c>, IntValue<'c>)>; 2]> {
    let crow = em.div(em.sreg("tid.x")?, em.i64c(GB_CHUNKS))?;
    let mut brows = [Vec::new(), Vec::new()];
    for (j, w) in [wa, wb].into_iter().enumerate() {
        for pass in 0..GB_N / GB_ROWS_PER_PASS {
            let shift = if down { GB_N * j as i64 } else { 0 } + pass * GB_ROWS_PER_PASS;
            let n = em.add(col0, em.add(crow, em.i64c(shift))?)?;
            let ok = em.icmp(IntPredicate::SLT, n, inter)?;
            let nc = em.select_i(ok, n, em.i64c(0))?;
            let row = gep16(em, em.inputs[w], expert_row(em, w, e, nc)?)?;
            brows[j].push((row, ok));
        }
    }
    Ok(brows)
}

/// The tiles of the block's column tiles `tile0 .. tile0 + group` (those below `n_tiles`) for
/// the first `nrows` pairs of `g`'s list.
fn group_tiles<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    g: &Gx<'c>,
    w: (usize, usize),
    (e, tile0, n_tiles, group): (IntValue<'c>, IntValue<'c>, IntValue<'c>, i64),
    nrows: IntValue<'c>,
) -> R<()> {
    if group == 1 {
        return grouped_tile(em, t, g, nrows);
    }
    let tile_w = if g.down.is_some() { 2 * GB_N } else { GB_N };
    let end = em.imin(em.add(tile0, em.i64c(group))?, n_tiles)?;
    em.for_range(tile0, end, em.i64c(1), |em, tile| {
        let col0 = em.mul(tile, em.i64c(tile_w))?;
        let brows = tile_brows(em, w, e, col0, g.inter, g.down.is_some())?;
        let gt = Gx {
            col0,
            brows,
            ..g.clone()
        };
        grouped_tile(em, t, &gt, nrows)
    })
}
