//! Template kernels (`ir::kernel::TemplateKernel`): one generator per `TemplateOp`, each a
//! simple, correct SIMT algorithm (docs/ptx-codegen.md says which are tuned). Operands are read
//! through [`Em::ld`], which evaluates a prologue `Fusion` in place of a load, and results are
//! written through [`Em::finish`], which runs the epilogue `Fusion` with `ScalarOp::Result`
//! bound to the value. Semantics follow `ir::fused` (the reference of `ir::kernel_eval`).

#[path = "attention.rs"]
pub(crate) mod attention;
#[path = "attention_mma.rs"]
mod attention_mma;
pub(crate) mod fastgemm;
#[path = "linear_attn.rs"]
mod linear_attn;
#[path = "route.rs"]
mod route;
mod tc;

use super::emit::{err, Em, Val, R};
use super::expr::Scope;
use inkwell::values::{FloatValue, IntValue};
use inkwell::{FloatPredicate, IntPredicate};
use ir::fused::GroupedEpilogue;
use ir::kernel::{GridDim, LaunchGeometry, Operand, ScalarOp, TemplateKernel, TemplateOp};
use ir::op::ReduceOp;
use ir::shape::numel;
use ir::{DType, Dim};

/// Threads of the one-thread-per-output kernels.
const FLAT_BLOCK: u32 = 128;
/// FP8 activation quantisation tile (1 × 128, spec §5.2).
const QBLOCK: i64 = 128;
const E4M3_MAX: f64 = 448.0;

pub(crate) fn emit(em: &mut Em, t: &TemplateKernel) -> R<LaunchGeometry> {
    let geo = match &t.op {
        TemplateOp::Gemm(g) => gemm(em, t, g)?,
        TemplateOp::RmsNorm { eps, width } => rms_norm(em, t, *eps, width, false)?,
        TemplateOp::AddRmsNorm { eps, width } => rms_norm(em, t, *eps, width, true)?,
        TemplateOp::Softmax { width } => softmax(em, t, width)?,
        TemplateOp::QkNormRope { eps, rotary, head_dim } => qk_norm_rope(em, t, *eps, *rotary, head_dim)?,
        TemplateOp::GroupNormGate { groups, eps, width } => group_norm_gate(em, t, *groups, *eps, width)?,
        TemplateOp::QuantizeFp8 { rows, cols } => quantize(em, t, *rows as i64, *cols as i64)?,
        TemplateOp::DequantizeFp8 { rows, cols, to } => dequantize(em, t, *rows as i64, *cols as i64, *to)?,
        TemplateOp::RmsNormQuantFp8 { eps, width, residual } => norm_quant(em, t, Some(*eps), width, *residual)?,
        TemplateOp::SwiGluQuantFp8 { width } => norm_quant(em, t, None, width, false)?,
        TemplateOp::ScaledGemmFp8 { out, .. } => scaled_gemm(em, t, *out)?,
        TemplateOp::GroupedGemm { epilogue, .. } => grouped_gemm(em, t, *epilogue)?,
        TemplateOp::Attention { scale, .. } => match attention::flash_head_dim(em, t) {
            Some(d) => attention::flash(em, t, *scale, d)?,
            None => attention(em, t, *scale)?,
        },
        TemplateOp::LinearAttnChunk { head_dim, gate, .. } => match linear_attn::plan(em, t, head_dim) {
            Some(p) => linear_attn::recurrence(em, t, (*gate, None), p)?,
            None => linear_attn(em, t, *gate, head_dim)?,
        },
        TemplateOp::LinearAttnStep { head_dim, gate, qk, .. } => match (linear_attn::plan(em, t, head_dim), qk) {
            (Some(p), _) => linear_attn::recurrence(em, t, (*gate, *qk), p)?,
            (None, None) => linear_attn(em, t, *gate, head_dim)?,
            (None, Some(_)) => {
                return err(format!(
                    "{}: the step that norms its own q and k needs the register-state kernel \
                     (head dim at most 128, not RINGJIT_ATTN=naive)",
                    t.op.name()
                ))
            }
        },
        TemplateOp::RouteTopK { routing, experts, .. } => route::route_topk(em, t, routing, experts)?,
        TemplateOp::TopK { .. } | TemplateOp::ArgMax { .. } | TemplateOp::ScatterAdd { .. } => {
            return err(format!("the {} template has no PTX generator yet", t.op.name()))
        }
    };
    em.ret()?;
    Ok(geo)
}

fn flat_geo(total: Dim) -> LaunchGeometry {
    LaunchGeometry {
        grid: [GridDim::blocks(total, FLAT_BLOCK), GridDim::one(), GridDim::one()],
        block: [FLAT_BLOCK, 1, 1],
        shared_bytes: 0,
    }
}

fn rows_geo(rows: Dim, block: u32) -> LaunchGeometry {
    LaunchGeometry {
        grid: [GridDim::blocks(rows, 1), GridDim::one(), GridDim::one()],
        block: [block, 1, 1],
        shared_bytes: 0,
    }
}

/// Threads for one row of `width` elements.
fn row_threads(width: &Dim) -> u32 {
    match width.as_const() {
        Some(w) => (w.max(1) as u32).next_power_of_two().clamp(32, 256),
        None => 256,
    }
}

impl<'c> Em<'c, '_> {
    fn operand_shape(&self, t: &TemplateKernel, i: usize) -> R<Vec<Dim>> {
        match t.operands.get(i) {
            Some(Operand::Buffer(b)) => Ok(self.kernel.inputs[*b].view.shape.clone()),
            Some(Operand::Prologue(f)) => Ok(f.domain.clone()),
            None => err(format!("{} has no operand {i}", t.op.name())),
        }
    }

    fn operand_dtype(&self, t: &TemplateKernel, i: usize) -> R<DType> {
        match t.operands.get(i) {
            Some(Operand::Buffer(b)) => Ok(self
                .plan
                .buffer(self.kernel.inputs[*b].buffer)
                .map(|b| b.dtype)
                .unwrap_or(DType::F32)),
            Some(Operand::Prologue(f)) => Ok(f
                .stores
                .first()
                .and_then(|e| f.exprs.get(*e))
                .map(|n| n.dtype)
                .unwrap_or(DType::F32)),
            None => err(format!("{} has no operand {i}", t.op.name())),
        }
    }

    /// Operand `i` at index `idx` (in the operand's dtype).
    fn ld(&mut self, t: &TemplateKernel, i: usize, idx: &[IntValue<'c>]) -> R<Val<'c>> {
        match t.operands.get(i) {
            Some(Operand::Buffer(b)) => {
                let r = &self.kernel.inputs[*b];
                let dtype = self.plan.buffer(r.buffer).map(|b| b.dtype).unwrap_or(DType::F32);
                let check = vec![false; idx.len()];
                self.load_view(self.inputs[*b], &r.view, idx, &check, dtype)
            }
            Some(Operand::Prologue(f)) => {
                let mut sc = Scope::with_vars(idx, &f.domain);
                let e = *f
                    .stores
                    .first()
                    .ok_or_else(|| super::CodegenError("a prologue without a value".into()))?;
                self.expr(&f.exprs, &mut sc, e)
            }
            None => err(format!("{} has no operand {i}", t.op.name())),
        }
    }

    fn ldf(&mut self, t: &TemplateKernel, i: usize, idx: &[IntValue<'c>]) -> R<FloatValue<'c>> {
        let v = self.ld(t, i, idx)?;
        self.as_f(v)
    }

    /// Operand `i` at row-major position `lin`.
    fn ld_lin(&mut self, t: &TemplateKernel, i: usize, lin: IntValue<'c>) -> R<FloatValue<'c>> {
        let shape = self.operand_shape(t, i)?;
        let ext = self.dims(&shape)?;
        let idx = self.unravel(lin, &ext)?;
        self.ldf(t, i, &idx)
    }

    /// The dtype of result `port` as the epilogue reads it (or as the output stores it).
    fn result_dtype(&self, t: &TemplateKernel, port: usize) -> DType {
        if let Some(f) = &t.epilogue {
            if let Some(n) = f.exprs.nodes.iter().find(|n| n.op == ScalarOp::Result { port }) {
                return n.dtype;
            }
        }
        self.kernel
            .outputs
            .get(port)
            .and_then(|r| self.plan.buffer(r.buffer))
            .map(|b| b.dtype)
            .unwrap_or(DType::F32)
    }

    /// The shape result `port` is indexed in: the epilogue's domain or the output's view.
    fn result_shape(&self, t: &TemplateKernel, port: usize) -> R<Vec<Dim>> {
        match &t.epilogue {
            Some(f) => Ok(f.domain.clone()),
            None => self
                .kernel
                .outputs
                .get(port)
                .map(|r| r.view.shape.clone())
                .ok_or_else(|| super::CodegenError(format!("no output {port}"))),
        }
    }

    /// Result `port` (dtype `vdt`) at index `idx`: through the epilogue, or stored.
    fn finish(&mut self, t: &TemplateKernel, port: usize, idx: &[IntValue<'c>], v: Val<'c>, vdt: DType) -> R<()> {
        match &t.epilogue {
            Some(f) => {
                let rdt = self.result_dtype(t, port);
                let mut sc = Scope::with_vars(idx, &f.domain);
                sc.result = Some(self.convert(v, vdt, rdt)?);
                super::loops::store_all(self, &f.exprs, &f.stores, &mut sc, idx, &f.domain)
            }
            None => {
                let shape = self.result_shape(t, port)?;
                self.store_output(port, idx, &shape, v, vdt)
            }
        }
    }

    fn finish_lin(&mut self, t: &TemplateKernel, port: usize, lin: IntValue<'c>, v: Val<'c>, vdt: DType) -> R<()> {
        let shape = self.result_shape(t, port)?;
        let ext = self.dims(&shape)?;
        let idx = self.unravel(lin, &ext)?;
        self.finish(t, port, &idx, v, vdt)
    }

    /// Grid-stride loop over `0..total` with the global thread index.
    fn flat(&mut self, total: IntValue<'c>, body: impl FnOnce(&mut Self, IntValue<'c>) -> R<()>) -> R<()> {
        let gid = self.add(
            self.mul(self.sreg("ctaid.x")?, self.sreg("ntid.x")?)?,
            self.sreg("tid.x")?,
        )?;
        let stride = self.mul(self.sreg("ntid.x")?, self.sreg("nctaid.x")?)?;
        self.for_range(gid, total, stride, body)
    }

    /// Σ (or max) of `f(c)` for `c` in `0..n` over the block's threads; every thread gets it.
    fn row_reduce(
        &mut self,
        op: ReduceOp,
        lo: IntValue<'c>,
        n: IntValue<'c>,
        f: impl FnOnce(&mut Self, IntValue<'c>) -> R<FloatValue<'c>>,
    ) -> R<FloatValue<'c>> {
        let acc = self.fvar(self.identity(op))?;
        let tid = self.sreg("tid.x")?;
        let start = self.add(lo, tid)?;
        let end = self.add(lo, n)?;
        let ntid = self.sreg("ntid.x")?;
        self.for_range(start, end, ntid, |em, c| {
            let x = f(em, c)?;
            let a = em.getf(acc)?;
            let r = match op {
                ReduceOp::Sum => em.fadd(a, x)?,
                ReduceOp::Max => em.fmax(a, x)?,
            };
            em.set(acc, r)
        })?;
        let part = self.getf(acc)?;
        self.block_reduce(op, part)
    }

    /// `1 / sqrt(ss / n + eps)` in f32.
    fn inv_rms(&self, ss: FloatValue<'c>, n: IntValue<'c>, eps: f64) -> R<FloatValue<'c>> {
        let ms = self.fdiv(ss, self.sitofp(n)?)?;
        let r = self.sqrt(self.fadd(ms, self.f32c(eps))?)?;
        self.fdiv(self.f32c(1.0), r)
    }

    /// The E4M3 block scale of `amax` (1 for an all-zero block).
    fn block_scale(&self, amax: FloatValue<'c>) -> R<FloatValue<'c>> {
        let s = self.fdiv(amax, self.f32c(E4M3_MAX))?;
        let s = self.fmax(s, self.f32c(f32::MIN_POSITIVE as f64))?;
        let zero = self.fcmp(FloatPredicate::OEQ, amax, self.f32c(0.0))?;
        self.select_f(zero, self.f32c(1.0), s)
    }
}

// ---- GEMM ---------------------------------------------------------------------------------------

/// The operand index of a batched matrix operand whose batch dims are right-aligned with
/// `batch` (size-1 dims broadcast), at matrix position (`r`, `c`).
fn matrix_index<'c>(
    shape: &[Dim],
    batch: &[IntValue<'c>],
    r: IntValue<'c>,
    c: IntValue<'c>,
    zero: IntValue<'c>,
) -> Vec<IntValue<'c>> {
    let nb = shape.len().saturating_sub(2);
    let lead = batch.len().saturating_sub(nb);
    let mut idx: Vec<IntValue> = (0..nb)
        .map(|d| {
            if shape[d] == Dim::constant(1) {
                zero
            } else {
                batch[lead + d]
            }
        })
        .collect();
    idx.push(r);
    idx.push(c);
    idx
}

/// GEMM: the bf16 fast paths of [`fastgemm`] (GEMV at small M, tensor cores otherwise) when
/// the kernel qualifies; else SIMT, one thread per output element, f32 accumulation (fma) over k.
fn gemm<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, g: &ir::kernel::Gemm) -> R<LaunchGeometry> {
    let mut geo = gemm_product(em, t, g)?;
    if let Some(r) = &g.route {
        let threads = i64::from(geo.block[0]);
        route::route_tail(em, t, r, threads)?;
        geo.shared_bytes = geo.shared_bytes.max(route::tail_smem(r, threads) as u32);
    }
    Ok(geo)
}

/// The product (and a folded norm's rows) of [`gemm`].
fn gemm_product<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, g: &ir::kernel::Gemm) -> R<LaunchGeometry> {
    if let Some(geo) = fastgemm::gemm_fast(em, t, g)? {
        return Ok(geo);
    }
    let mut shape = g.batch.clone();
    shape.extend([g.m.clone(), g.n.clone()]);
    let (sa, sb) = (em.operand_shape(t, 0)?, em.operand_shape(t, 1)?);
    let ext = em.dims(&shape)?;
    let total = em.product(&ext)?;
    let kk = em.dim(&g.k)?;
    let nb = g.batch.len();
    // a folded norm (`RowNorm`): each thread finds its row's 1/rms first; the threads of
    // column 0 store the normalised rows when the kernel has a second output
    let xdt = em.operand_dtype(t, 0)?;
    let emit = g.norm.is_some() && t.epilogue.is_none() && g.product_outputs(em.kernel.outputs.len()) > 1;
    em.flat(total, |em, lin| {
        let idx = em.unravel(lin, &ext)?;
        let (i, j) = (idx[nb], idx[nb + 1]);
        let acc = em.fvar(em.f32c(0.0))?;
        let zero = em.i64c(0);
        let inv = match g.norm {
            Some(r) => {
                let ss = em.fvar(em.f32c(0.0))?;
                em.for_range(zero, kk, em.i64c(1), |em, l| {
                    let a = em.ldf(t, 0, &matrix_index(&sa, &idx[..nb], i, l, zero))?;
                    let s = em.fma(a, a, em.getf(ss)?)?;
                    em.set(ss, s)
                })?;
                Some((r, em.inv_rms(em.getf(ss)?, kk, r.eps)?))
            }
            None => None,
        };
        let first = em.icmp(IntPredicate::EQ, j, zero)?;
        em.for_range(zero, kk, em.i64c(1), |em, l| {
            let ai = matrix_index(&sa, &idx[..nb], i, l, zero);
            let a = em.ldf(t, 0, &ai)?;
            let a = match inv {
                Some((r, inv)) => {
                    let n = em.round(em.fmul(a, inv)?, xdt)?;
                    let w = em.ldf(t, 2, &[l])?;
                    let n = em.round(em.fmul(n, w)?, r.dtype)?;
                    if emit {
                        let shape = em.result_shape(t, 1)?;
                        em.if_then(first, |em| em.store_output(1, &ai, &shape, Val::F(n), r.dtype))?;
                    }
                    n
                }
                None => a,
            };
            let b = em.ldf(t, 1, &matrix_index(&sb, &idx[..nb], l, j, zero))?;
            let s = em.fma(a, b, em.getf(acc)?)?;
            em.set(acc, s)
        })?;
        let v = em.round(em.getf(acc)?, g.out)?;
        em.finish(t, 0, &idx, Val::F(v), g.out)
    })?;
    Ok(flat_geo(numel(&shape)))
}

/// Block-scaled FP8 GEMM (`ScaledMatmulFp8`): per 128-wide k block, the f32 partial dot product
/// times the A tile scale and the B block scale; one thread per output.
fn scaled_gemm<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, out: DType) -> R<LaunchGeometry> {
    let (sa, sb) = (em.operand_shape(t, 0)?, em.operand_shape(t, 2)?);
    if sa.len() < 2 || sb.len() != 2 {
        return err("scaled_gemm_fp8: a must be [.., M, K] and b [K, N]");
    }
    let mut shape = sa.clone();
    *shape.last_mut().expect("rank >= 2") = sb[1].clone();
    let r = shape.len();
    let ext = em.dims(&shape)?;
    let total = em.product(&ext)?;
    let kk = em.dim(&sa[r - 1])?;
    em.flat(total, |em, lin| {
        let idx = em.unravel(lin, &ext)?;
        let j = idx[r - 1];
        let acc = em.fvar(em.f32c(0.0))?;
        let kb_n = em.ceil_div(kk, em.i64c(QBLOCK))?;
        let zero = em.i64c(0);
        em.for_range(zero, kb_n, em.i64c(1), |em, kb| {
            let part = em.fvar(em.f32c(0.0))?;
            let lo = em.mul(kb, em.i64c(QBLOCK))?;
            let hi = em.imin(em.add(lo, em.i64c(QBLOCK))?, kk)?;
            em.for_range(lo, hi, em.i64c(1), |em, l| {
                let mut ai = idx.clone();
                ai[r - 1] = l;
                let a = em.ldf(t, 0, &ai)?;
                let b = em.ldf(t, 2, &[l, j])?;
                let s = em.fma(a, b, em.getf(part)?)?;
                em.set(part, s)
            })?;
            let mut si = idx.clone();
            si[r - 1] = kb;
            let sa = em.ldf(t, 1, &si)?;
            let jb = em.div(j, em.i64c(QBLOCK))?;
            let sbv = em.ldf(t, 3, &[kb, jb])?;
            let p = em.fmul(em.fmul(em.getf(part)?, sa)?, sbv)?;
            let s = em.fadd(em.getf(acc)?, p)?;
            em.set(acc, s)
        })?;
        let v = em.round(em.getf(acc)?, out)?;
        em.finish(t, 0, &idx, Val::F(v), out)
    })?;
    Ok(flat_geo(numel(&shape)))
}

/// MoE expert GEMMs over the chosen experts (`GroupedMatmul`): the GEMVs of [`fastgemm`] for bf16
/// weights, else one thread per output element.
fn grouped_gemm<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, epi: GroupedEpilogue) -> R<LaunchGeometry> {
    if let Some(geo) = fastgemm::grouped_fast(em, t, epi)? {
        return Ok(geo);
    }
    let (s0, s1, s2) = (
        em.operand_shape(t, 0)?,
        em.operand_shape(t, 1)?,
        em.operand_shape(t, 2)?,
    );
    let s3 = em.operand_shape(t, 3)?;
    let zero = em.i64c(0);
    let one = em.i64c(1);
    match epi {
        GroupedEpilogue::SwiGlu => {
            // x [b, s, D], chosen [b, s, K], w_gate / w_up [E, I, D] -> h [b, s, K, I]
            if s0.len() != 3 || s1.len() != 3 || s2.len() != 3 {
                return err("grouped_gemm(swiglu): x, chosen and weights must have rank 3");
            }
            let shape = vec![s0[0].clone(), s0[1].clone(), s1[2].clone(), s2[1].clone()];
            let dt = em.result_dtype(t, 0);
            let ext = em.dims(&shape)?;
            let total = em.product(&ext)?;
            let (d, e_n) = (em.dim(&s0[2])?, em.dim(&s2[0])?);
            em.flat(total, |em, lin| {
                let idx = em.unravel(lin, &ext)?;
                let (bi, si, slot, i) = (idx[0], idx[1], idx[2], idx[3]);
                let e = em.ld(t, 1, &[bi, si, slot])?;
                let e = em.as_i(e)?;
                let e = em.imin(em.imax(e, zero)?, em.sub(e_n, one)?)?;
                let (gate, up) = (em.fvar(em.f32c(0.0))?, em.fvar(em.f32c(0.0))?);
                em.for_range(zero, d, one, |em, c| {
                    let x = em.ldf(t, 0, &[bi, si, c])?;
                    let wg = em.ldf(t, 2, &[e, i, c])?;
                    let wu = em.ldf(t, 3, &[e, i, c])?;
                    let g = em.fma(x, wg, em.getf(gate)?)?;
                    em.set(gate, g)?;
                    let u = em.fma(x, wu, em.getf(up)?)?;
                    em.set(up, u)
                })?;
                let g = em.round(em.getf(gate)?, dt)?;
                let u = em.round(em.getf(up)?, dt)?;
                let sg = em.round(em.sigmoid(g)?, dt)?;
                let silu = em.round(em.fmul(g, sg)?, dt)?;
                let h = em.round(em.fmul(silu, u)?, dt)?;
                em.finish(t, 0, &idx, Val::F(h), dt)
            })?;
            Ok(flat_geo(numel(&shape)))
        }
        GroupedEpilogue::WeightedCombine | GroupedEpilogue::CombineShared => {
            // h [b, s, K, I], chosen [b, s, K], weights [b, s, K], w_down [E, D, I] -> [b, s, D]
            // (CombineShared: + hs [b, s, Is] · bs [Is, D], rounded to its matmul dtype)
            if s0.len() != 4 || s3.len() != 3 {
                return err("grouped_gemm(combine): h must be [b, s, K, I] and w_down [E, D, I]");
            }
            let shape = vec![s0[0].clone(), s0[1].clone(), s3[1].clone()];
            let ydt = DType::promote(em.operand_dtype(t, 0)?, em.operand_dtype(t, 3)?).unwrap_or(DType::F32);
            let ext = em.dims(&shape)?;
            let total = em.product(&ext)?;
            let (kn, inter, e_n) = (em.dim(&s0[2])?, em.dim(&s0[3])?, em.dim(&s3[0])?);
            em.flat(total, |em, lin| {
                let idx = em.unravel(lin, &ext)?;
                let (bi, si, j) = (idx[0], idx[1], idx[2]);
                let acc = em.fvar(em.f32c(0.0))?;
                em.for_range(zero, kn, one, |em, slot| {
                    let e = em.ld(t, 1, &[bi, si, slot])?;
                    let e = em.as_i(e)?;
                    let e = em.imin(em.imax(e, zero)?, em.sub(e_n, one)?)?;
                    let w = em.ldf(t, 2, &[bi, si, slot])?;
                    let dot = em.fvar(em.f32c(0.0))?;
                    em.for_range(zero, inter, one, |em, i| {
                        let h = em.ldf(t, 0, &[bi, si, slot, i])?;
                        let wd = em.ldf(t, 3, &[e, j, i])?;
                        let s = em.fma(h, wd, em.getf(dot)?)?;
                        em.set(dot, s)
                    })?;
                    let down = em.round(em.getf(dot)?, ydt)?;
                    let s = em.fma(w, down, em.getf(acc)?)?;
                    em.set(acc, s)
                })?;
                let mut v = em.getf(acc)?;
                if epi == GroupedEpilogue::CombineShared {
                    let s4 = em.operand_shape(t, 4)?;
                    let is = em.dim(s4.last().ok_or_else(|| super::CodegenError("hs without dims".into()))?)?;
                    let sdt = DType::promote(em.operand_dtype(t, 4)?, em.operand_dtype(t, 5)?).unwrap_or(DType::F32);
                    let dot = em.fvar(em.f32c(0.0))?;
                    em.for_range(zero, is, one, |em, i| {
                        let h = em.ldf(t, 4, &[bi, si, i])?;
                        let b = em.ldf(t, 5, &[i, j])?;
                        let s = em.fma(h, b, em.getf(dot)?)?;
                        em.set(dot, s)
                    })?;
                    v = em.fadd(v, em.round(em.getf(dot)?, sdt)?)?;
                }
                em.finish(t, 0, &idx, Val::F(v), DType::F32)
            })?;
            Ok(flat_geo(numel(&shape)))
        }
    }
}

// ---- row-wise composites ------------------------------------------------------------------------

/// RmsNorm (x, w) or AddRmsNorm (h, a, w): one block per row.
fn rms_norm<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, eps: f64, width: &Dim, residual: bool) -> R<LaunchGeometry> {
    let s0 = em.operand_shape(t, 0)?;
    let rows = numel(&s0[..s0.len().saturating_sub(1)]);
    let wi = if residual { 2 } else { 1 };
    let (xdt, sdt) = if residual {
        let s = em.result_dtype(t, 0);
        (s, s)
    } else {
        (em.operand_dtype(t, 0)?, DType::F32)
    };
    let ydt = em.result_dtype(t, if residual { 1 } else { 0 });
    let w = em.dim(width)?;
    let row = em.sreg("ctaid.x")?;
    let base = em.mul(row, w)?;
    let zero = em.i64c(0);
    // the (rounded) input value at column c
    let value = |em: &mut Em<'c, '_>, c: IntValue<'c>| -> R<FloatValue<'c>> {
        let at = em.add(base, c)?;
        if residual {
            let h = em.ld_lin(t, 0, at)?;
            let a = em.ld_lin(t, 1, at)?;
            em.round(em.fadd(h, a)?, sdt)
        } else {
            em.ld_lin(t, 0, at)
        }
    };
    // column c of the results from its input value x and the row's 1/rms
    let finish = |em: &mut Em<'c, '_>, c: IntValue<'c>, x: FloatValue<'c>, inv: FloatValue<'c>| -> R<()> {
        let normed = em.round(em.fmul(x, inv)?, xdt)?;
        let wv = em.ldf(t, wi, &[c])?;
        let y = em.round(em.fmul(normed, wv)?, ydt)?;
        let at = em.add(base, c)?;
        if residual {
            em.finish_lin(t, 0, at, Val::F(x), sdt)?;
            em.finish_lin(t, 1, at, Val::F(y), ydt)
        } else {
            em.finish_lin(t, 0, at, Val::F(y), ydt)
        }
    };
    let threads = row_threads(width) as i64;
    // a constant row of a few values a thread: each thread's values loaded at once into
    // registers (independent loads in flight together, read once), then one block reduction
    if let Some(wc) = width
        .as_const()
        .filter(|&wc| wc > 0 && (wc + threads - 1) / threads <= 16)
    {
        let tid = em.sreg("tid.x")?;
        let ragged = wc % threads != 0;
        let mut xs = Vec::new();
        let mut ss = em.f32c(0.0);
        for j in 0..(wc + threads - 1) / threads {
            let c = em.add(tid, em.i64c(threads * j))?;
            let ok = em.icmp(IntPredicate::SLT, c, w)?;
            let c = if ragged { em.select_i(ok, c, zero)? } else { c };
            let x = value(em, c)?;
            let x = if ragged { em.select_f(ok, x, em.f32c(0.0))? } else { x };
            ss = em.fma(x, x, ss)?;
            xs.push((ok, c, x));
        }
        let ss = em.block_reduce(ReduceOp::Sum, ss)?;
        let inv = em.inv_rms(ss, w, eps)?;
        for (ok, c, x) in xs {
            if ragged {
                em.if_then(ok, |em| finish(em, c, x, inv))?;
            } else {
                finish(em, c, x, inv)?;
            }
        }
        return Ok(rows_geo(rows, threads as u32));
    }
    // SAFETY of the closure reuse: `value` is a plain fn-like closure (Copy)
    let ss = em.row_reduce(ReduceOp::Sum, zero, w, |em, c| {
        let x = value(em, c)?;
        em.fmul(x, x)
    })?;
    let inv = em.inv_rms(ss, w, eps)?;
    let tid = em.sreg("tid.x")?;
    let ntid = em.sreg("ntid.x")?;
    em.for_range(tid, w, ntid, |em, c| {
        let x = value(em, c)?;
        finish(em, c, x, inv)
    })?;
    Ok(rows_geo(rows, row_threads(width)))
}

/// Softmax along the last axis: block max, block sum of exponentials, one block per row.
fn softmax<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, width: &Dim) -> R<LaunchGeometry> {
    let s0 = em.operand_shape(t, 0)?;
    let rows = numel(&s0[..s0.len().saturating_sub(1)]);
    let ydt = em.result_dtype(t, 0);
    let w = em.dim(width)?;
    let base = em.mul(em.sreg("ctaid.x")?, w)?;
    let zero = em.i64c(0);
    let m = em.row_reduce(ReduceOp::Max, zero, w, |em, c| em.ld_lin(t, 0, em.add(base, c)?))?;
    let s = em.row_reduce(ReduceOp::Sum, zero, w, |em, c| {
        let x = em.ld_lin(t, 0, em.add(base, c)?)?;
        em.exp(em.fsub(x, m)?)
    })?;
    let (tid, ntid) = (em.sreg("tid.x")?, em.sreg("ntid.x")?);
    em.for_range(tid, w, ntid, |em, c| {
        let at = em.add(base, c)?;
        let x = em.ld_lin(t, 0, at)?;
        let y = em.round(em.fdiv(em.exp(em.fsub(x, m)?)?, s)?, ydt)?;
        em.finish_lin(t, 0, at, Val::F(y), ydt)
    })?;
    Ok(rows_geo(rows, row_threads(width)))
}

/// Per-head RMSNorm then NeoX RoPE on the first `rotary` dims: one block per (token, head) row.
fn qk_norm_rope<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    eps: f64,
    rotary: usize,
    head_dim: &Dim,
) -> R<LaunchGeometry> {
    let s0 = em.operand_shape(t, 0)?;
    let r = s0.len();
    if r < 3 {
        return err("qk_norm_rope: x must be [.., seq, heads, d]");
    }
    let rows = numel(&s0[..r - 1]);
    let xdt = em.operand_dtype(t, 0)?;
    let ydt = em.result_dtype(t, 0);
    let d = em.dim(head_dim)?;
    let (seq, heads) = (em.dim(&s0[r - 3])?, em.dim(&s0[r - 2])?);
    let row = em.sreg("ctaid.x")?;
    let base = em.mul(row, d)?;
    let tok = em.rem(em.div(row, heads)?, seq)?;
    // the weight is [d], or [heads, d] when q's and k's norms run as one kernel (one row each)
    let per_head = em.operand_shape(t, 1)?.len() == 2;
    let head = em.rem(row, heads)?;
    let zero = em.i64c(0);
    let ss = em.row_reduce(ReduceOp::Sum, zero, d, |em, c| {
        let x = em.ld_lin(t, 0, em.add(base, c)?)?;
        em.fmul(x, x)
    })?;
    let inv = em.inv_rms(ss, d, eps)?;
    let half = (rotary / 2) as i64;
    let (tid, ntid) = (em.sreg("tid.x")?, em.sreg("ntid.x")?);
    em.for_range(tid, d, ntid, |em, c| {
        let normed = |em: &mut Em<'c, '_>, c: IntValue<'c>| -> R<FloatValue<'c>> {
            let x = em.ld_lin(t, 0, em.add(base, c)?)?;
            let n = em.round(em.fmul(x, inv)?, xdt)?;
            let w = if per_head {
                em.ldf(t, 1, &[head, c])?
            } else {
                em.ldf(t, 1, &[c])?
            };
            em.round(em.fmul(n, w)?, ydt)
        };
        let y = normed(em, c)?;
        if half == 0 {
            return em.finish_lin(t, 0, em.add(base, c)?, Val::F(y), ydt);
        }
        let h = em.i64c(half);
        let first = em.icmp(IntPredicate::SLT, c, h)?;
        let rot = em.icmp(IntPredicate::SLT, c, em.i64c(rotary as i64))?;
        // partner column and frequency index (clamped to c / 0 outside the rotary dims)
        let up = em.add(c, h)?;
        let down = em.sub(c, h)?;
        let partner = em.select_i(first, up, em.select_i(rot, down, c)?)?;
        let j = em.select_i(first, c, em.select_i(rot, down, zero)?)?;
        let yp = normed(em, partner)?;
        let pos = em.ld(t, 2, &[tok])?;
        let pos = em.as_f(pos)?;
        let f = em.ldf(t, 3, &[j])?;
        let ang = em.fmul(pos, f)?;
        let (cs, sn) = (em.sincos(ang, true)?, em.sincos(ang, false)?);
        // first half: a·cos − b·sin with (a, b) = (y, y_partner); second: b·cos + a·sin
        let lo = em.fsub(em.fmul(y, cs)?, em.fmul(yp, sn)?)?;
        let hi = em.fadd(em.fmul(y, cs)?, em.fmul(yp, sn)?)?;
        let v = em.select_f(first, lo, em.select_f(rot, hi, y)?)?;
        let v = em.round(v, ydt)?;
        em.finish_lin(t, 0, em.add(base, c)?, Val::F(v), ydt)
    })?;
    Ok(rows_geo(rows, row_threads(head_dim)))
}

/// Grouped RMSNorm × w × sigmoid(g): one block per (token, group).
fn group_norm_gate<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    groups: usize,
    eps: f64,
    width: &Dim,
) -> R<LaunchGeometry> {
    let s0 = em.operand_shape(t, 0)?;
    let total = numel(&s0);
    let rows = total.div_const(1).unwrap_or(total);
    let w = em.dim(width)?;
    let ng = em.i64c(groups.max(1) as i64);
    let n = em.div(w, ng)?;
    let bid = em.sreg("ctaid.x")?;
    let (row, gi) = (em.div(bid, ng)?, em.rem(bid, ng)?);
    let base = em.add(em.mul(row, w)?, em.mul(gi, n)?)?;
    let zero = em.i64c(0);
    let ss = em.row_reduce(ReduceOp::Sum, zero, n, |em, c| {
        let x = em.ld_lin(t, 0, em.add(base, c)?)?;
        em.fmul(x, x)
    })?;
    let inv = em.inv_rms(ss, n, eps)?;
    let ydt = em.result_dtype(t, 0);
    let (tid, ntid) = (em.sreg("tid.x")?, em.sreg("ntid.x")?);
    em.for_range(tid, n, ntid, |em, c| {
        let at = em.add(base, c)?;
        let x = em.ld_lin(t, 0, at)?;
        let ch = em.add(em.mul(gi, n)?, c)?;
        let wv = em.ldf(t, 1, &[ch])?;
        let g = em.ld_lin(t, 2, at)?;
        let y = em.fmul(em.fmul(em.fmul(x, inv)?, wv)?, em.sigmoid(g)?)?;
        let y = em.round(y, ydt)?;
        em.finish_lin(t, 0, at, Val::F(y), ydt)
    })?;
    // rows × groups blocks: the row count is numel / width
    let blocks = match width.as_const() {
        Some(wc) if wc > 0 => rows.div_const(wc).map(|r| r.mul(&Dim::constant(groups as i64))),
        _ => None,
    }
    .ok_or_else(|| super::CodegenError("group_norm_gate: the width must be a constant dividing the input".into()))?;
    let per_group = width
        .as_const()
        .map(|w| Dim::constant(w / groups.max(1) as i64))
        .unwrap_or(Dim::constant(256));
    Ok(rows_geo(blocks, row_threads(&per_group)))
}

// ---- FP8 ----------------------------------------------------------------------------------------

/// Block quantisation of x [.., R, C] in `br × bc` blocks: one thread block per scale.
fn quantize<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, br: i64, bc: i64) -> R<LaunchGeometry> {
    let s0 = em.operand_shape(t, 0)?;
    let r = s0.len();
    if r < 2 {
        return err("quantize_fp8: x must have rank >= 2");
    }
    let batch = numel(&s0[..r - 2]);
    let (rr, cc) = (em.dim(&s0[r - 2])?, em.dim(&s0[r - 1])?);
    let (brv, bcv) = (em.i64c(br), em.i64c(bc));
    let (rb, cb) = (em.ceil_div(rr, brv)?, em.ceil_div(cc, bcv)?);
    let bid = em.sreg("ctaid.x")?;
    let bj = em.rem(bid, cb)?;
    let bi = em.rem(em.div(bid, cb)?, rb)?;
    let n = em.div(bid, em.mul(cb, rb)?)?;
    let zero = em.i64c(0);
    // element e of the block: (row, col, in range, linear position in x)
    let at = |em: &mut Em<'c, '_>, e: IntValue<'c>| -> R<(IntValue<'c>, IntValue<'c>)> {
        let i = em.add(em.mul(bi, brv)?, em.div(e, bcv)?)?;
        let j = em.add(em.mul(bj, bcv)?, em.rem(e, bcv)?)?;
        let ok = em.and(em.icmp(IntPredicate::SLT, i, rr)?, em.icmp(IntPredicate::SLT, j, cc)?)?;
        let lin = em.add(em.mul(em.add(em.mul(n, rr)?, i)?, cc)?, j)?;
        Ok((ok, em.select_i(ok, lin, zero)?))
    };
    let amax = em.row_reduce(ReduceOp::Max, zero, em.i64c(br * bc), |em, e| {
        let (ok, lin) = at(em, e)?;
        let x = em.ld_lin(t, 0, lin)?;
        let a = em.fabs(x)?;
        em.select_f(ok, a, em.f32c(0.0))
    })?;
    let scale = em.block_scale(amax)?;
    let (tid, ntid) = (em.sreg("tid.x")?, em.sreg("ntid.x")?);
    em.for_range(tid, em.i64c(br * bc), ntid, |em, e| {
        let (ok, lin) = at(em, e)?;
        em.if_then(ok, |em| {
            let x = em.ld_lin(t, 0, lin)?;
            let q = em.fdiv(x, scale)?;
            em.store_lin(0, lin, Val::F(q), DType::F32)
        })
    })?;
    let first = em.icmp(IntPredicate::EQ, tid, zero)?;
    em.if_then(first, |em| em.store_lin(1, bid, Val::F(scale), DType::F32))?;
    let blocks = batch.mul(&ceil_dim(&s0[r - 2], br)?).mul(&ceil_dim(&s0[r - 1], bc)?);
    Ok(rows_geo(blocks, 128))
}

/// `ceil(d / k)` as a Dim (constants only; symbolic quantised dims are refused).
fn ceil_dim(d: &Dim, k: i64) -> R<Dim> {
    match d.as_const() {
        Some(c) => Ok(Dim::constant((c + k - 1) / k)),
        None => d
            .div_const(k)
            .ok_or_else(|| super::CodegenError(format!("a quantised dim {d} that is not a multiple of {k}"))),
    }
}

impl<'c> Em<'c, '_> {
    /// Store `v` at row-major position `lin` of output `o`'s view.
    fn store_lin(&self, o: usize, lin: IntValue<'c>, v: Val<'c>, from: DType) -> R<()> {
        let shape = self.kernel.outputs[o].view.shape.clone();
        let ext = self.dims(&shape)?;
        let idx = self.unravel(lin, &ext)?;
        self.store_output(o, &idx, &shape, v, from)
    }

    /// Element `idx` of output `o` (read back, e.g. a state being updated), as f32.
    fn load_output(&self, o: usize, idx: &[IntValue<'c>]) -> R<FloatValue<'c>> {
        let r = &self.kernel.outputs[o];
        let dtype = self.plan.buffer(r.buffer).map(|b| b.dtype).unwrap_or(DType::F32);
        let at = self.view_offset(&r.view, idx)?;
        let v = self.load(self.outputs[o], at, dtype)?;
        self.as_f(v)
    }
}

/// q · scale rounded to `to`: one thread per element.
fn dequantize<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, br: i64, bc: i64, to: DType) -> R<LaunchGeometry> {
    let s0 = em.operand_shape(t, 0)?;
    let r = s0.len();
    if r < 2 {
        return err("dequantize_fp8: q must have rank >= 2");
    }
    let ext = em.dims(&s0)?;
    let total = em.product(&ext)?;
    em.flat(total, |em, lin| {
        let idx = em.unravel(lin, &ext)?;
        let q = em.ldf(t, 0, &idx)?;
        let mut si = idx.clone();
        si[r - 2] = em.div(idx[r - 2], em.i64c(br))?;
        si[r - 1] = em.div(idx[r - 1], em.i64c(bc))?;
        let s = em.ldf(t, 1, &si)?;
        let v = em.round(em.fmul(q, s)?, to)?;
        em.finish(t, 0, &idx, Val::F(v), to)
    })?;
    Ok(flat_geo(numel(&s0)))
}

/// RmsNorm(+residual)+quant (`eps` given) or SwiGLU+quant (`eps` None), quantised in 1×128
/// tiles: one block of 128 threads per (row, tile), each thread one element; the norm's row
/// statistics are recomputed by every tile's block.
fn norm_quant<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    eps: Option<f64>,
    width: &Dim,
    residual: bool,
) -> R<LaunchGeometry> {
    let s0 = em.operand_shape(t, 0)?;
    let rows = numel(&s0[..s0.len().saturating_sub(1)]);
    let w = em.dim(width)?;
    let qb = em.i64c(QBLOCK);
    let tiles = em.ceil_div(w, qb)?;
    let bid = em.sreg("ctaid.x")?;
    let (row, tile) = (em.div(bid, tiles)?, em.rem(bid, tiles)?);
    let base = em.mul(row, w)?;
    let zero = em.i64c(0);
    let tid = em.sreg("tid.x")?;
    let c = em.add(em.mul(tile, qb)?, tid)?;
    let inside = em.icmp(IntPredicate::SLT, c, w)?;
    let cc = em.select_i(inside, c, zero)?;
    let at = em.add(base, cc)?;
    // output ports: (sum,) q, scales
    let (qp, sp) = if residual { (1, 2) } else { (0, 1) };
    let y = match eps {
        Some(eps) => {
            let wi = if residual { 2 } else { 1 };
            let sdt = if residual {
                em.result_dtype(t, 0)
            } else {
                em.operand_dtype(t, 0)?
            };
            let nd = DType::promote(sdt, em.operand_dtype(t, wi)?).unwrap_or(DType::F32);
            let value = |em: &mut Em<'c, '_>, at: IntValue<'c>| -> R<FloatValue<'c>> {
                if residual {
                    let h = em.ld_lin(t, 0, at)?;
                    let a = em.ld_lin(t, 1, at)?;
                    em.round(em.fadd(h, a)?, sdt)
                } else {
                    em.ld_lin(t, 0, at)
                }
            };
            let ss = em.row_reduce(ReduceOp::Sum, zero, w, |em, c| {
                let x = value(em, em.add(base, c)?)?;
                em.fmul(x, x)
            })?;
            let inv = em.inv_rms(ss, w, eps)?;
            let x = value(em, at)?;
            if residual {
                em.if_then(inside, |em| em.store_lin(0, at, Val::F(x), sdt))?;
            }
            let normed = em.round(em.fmul(x, inv)?, sdt)?;
            let wv = em.ldf(t, wi, &[cc])?;
            em.round(em.fmul(normed, wv)?, nd)?
        }
        None => {
            let gd = em.operand_dtype(t, 0)?;
            let dt = DType::promote(gd, em.operand_dtype(t, 1)?).unwrap_or(DType::F32);
            let g = em.ld_lin(t, 0, at)?;
            let u = em.ld_lin(t, 1, at)?;
            let s = em.round(em.sigmoid(g)?, gd)?;
            let gs = em.round(em.fmul(g, s)?, gd)?;
            em.round(em.fmul(gs, u)?, dt)?
        }
    };
    let y = em.select_f(inside, y, em.f32c(0.0))?;
    let amax = em.block_reduce(ReduceOp::Max, em.fabs(y)?)?;
    let scale = em.block_scale(amax)?;
    em.if_then(inside, |em| {
        em.store_lin(qp, at, Val::F(em.fdiv(y, scale)?), DType::F32)
    })?;
    let first = em.icmp(IntPredicate::EQ, tid, zero)?;
    let s_at = em.add(em.mul(row, tiles)?, tile)?;
    em.if_then(first, |em| em.store_lin(sp, s_at, Val::F(scale), DType::F32))?;
    Ok(rows_geo(rows.mul(&ceil_dim(width, QBLOCK)?), QBLOCK as u32))
}

// ---- attention ----------------------------------------------------------------------------------

/// Causal GQA attention with an online softmax: one thread per output element (query row,
/// channel), streaming the keys its query sees.
fn attention<'c>(em: &mut Em<'c, '_>, t: &TemplateKernel, scale: f64) -> R<LaunchGeometry> {
    let (sq, sk) = (em.operand_shape(t, 0)?, em.operand_shape(t, 1)?);
    if sq.len() != 5 || sk.len() != 4 {
        return err("attention: q must be [b, Hkv, G, s, d] and k [b, Hkv, T, d]");
    }
    let ydt = em.result_dtype(t, 0);
    let ext = em.dims(&sq)?;
    let total = em.product(&ext)?;
    let (tk, d) = (em.dim(&sk[2])?, em.dim(&sq[4])?);
    let (zero, one) = (em.i64c(0), em.i64c(1));
    em.flat(total, |em, lin| {
        let idx = em.unravel(lin, &ext)?;
        let (bi, hk, gi, i, ch) = (idx[0], idx[1], idx[2], idx[3], idx[4]);
        let pos = em.ld(t, 3, &[i])?;
        let pos = em.as_i(pos)?;
        let last = em.imin(pos, em.sub(tk, one)?)?;
        let end = em.add(last, one)?;
        let m = em.fvar(em.identity(ReduceOp::Max))?;
        let l = em.fvar(em.f32c(0.0))?;
        let acc = em.fvar(em.f32c(0.0))?;
        em.for_range(zero, end, one, |em, key| {
            let dot = em.fvar(em.f32c(0.0))?;
            em.for_range(zero, d, one, |em, c| {
                let q = em.ldf(t, 0, &[bi, hk, gi, i, c])?;
                let k = em.ldf(t, 1, &[bi, hk, key, c])?;
                let s = em.fma(q, k, em.getf(dot)?)?;
                em.set(dot, s)
            })?;
            let s = em.fmul(em.getf(dot)?, em.f32c(scale))?;
            let m_old = em.getf(m)?;
            let m_new = em.fmax(m_old, s)?;
            let corr = em.exp(em.fsub(m_old, m_new)?)?;
            let p = em.exp(em.fsub(s, m_new)?)?;
            let v = em.ldf(t, 2, &[bi, hk, key, ch])?;
            let l_new = em.fma(em.getf(l)?, corr, p)?;
            let a_new = em.fma(em.getf(acc)?, corr, em.fmul(p, v)?)?;
            em.set(l, l_new)?;
            em.set(acc, a_new)?;
            em.set(m, m_new)
        })?;
        let y = em.round(em.fdiv(em.getf(acc)?, em.getf(l)?)?, ydt)?;
        em.finish(t, 0, &idx, Val::F(y), ydt)
    })?;
    Ok(flat_geo(numel(&sq)))
}

/// The lightning recurrence `S ← λS + kᵀv, o = q S` token by token (also the chunked op: the
/// same recurrence): one block per (batch, head), one thread per state column, the state kept
/// in the output state buffer.
fn linear_attn<'c>(
    em: &mut Em<'c, '_>,
    t: &TemplateKernel,
    gate: Option<ir::kernel::GateNorm>,
    head_dim: &Dim,
) -> R<LaunchGeometry> {
    let (s0, sq) = (em.operand_shape(t, 0)?, em.operand_shape(t, 1)?);
    if s0.len() != 4 || sq.len() != 4 {
        return err("linear attention: s0 must be [b, H, d, d] and q [b, T, H, d]");
    }
    let dc = head_dim
        .as_const()
        .filter(|d| (1..=1024).contains(d))
        .ok_or_else(|| super::CodegenError("linear attention: the head dim must be a constant <= 1024".into()))?;
    let (tl, heads) = (em.dim(&sq[1])?, em.dim(&sq[2])?);
    let d = em.i64c(dc);
    let (zero, one) = (em.i64c(0), em.i64c(1));
    let bid = em.sreg("ctaid.x")?;
    let (bi, hi) = (em.div(bid, heads)?, em.rem(bid, heads)?);
    let threads = ((dc + 31) / 32 * 32).max(32);
    let gate = match gate {
        Some(gn) => Some(linear_attn::Gate::new(em, t, gn, 1, threads)?),
        None => None,
    };
    let j = em.sreg("tid.x")?;
    let inside = em.icmp(IntPredicate::SLT, j, d)?;
    em.if_then(inside, |em| {
        em.for_range(zero, d, one, |em, x| {
            let s = em.ldf(t, 0, &[bi, hi, x, j])?;
            let shape = em.kernel.outputs[0].view.shape.clone();
            em.store_output(0, &[bi, hi, x, j], &shape, Val::F(s), DType::F32)
        })?;
        let lam = em.ldf(t, 4, &[hi, zero, zero])?;
        em.for_range(zero, tl, one, |em, tok| {
            let v = em.ldf(t, 3, &[bi, tok, hi, j])?;
            let o = em.fvar(em.f32c(0.0))?;
            em.for_range(zero, d, one, |em, x| {
                let s = em.load_output(0, &[bi, hi, x, j])?;
                let k = em.ldf(t, 2, &[bi, tok, hi, x])?;
                let s = em.fma(lam, s, em.fmul(k, v)?)?;
                let shape = em.kernel.outputs[0].view.shape.clone();
                em.store_output(0, &[bi, hi, x, j], &shape, Val::F(s), DType::F32)?;
                let q = em.ldf(t, 1, &[bi, tok, hi, x])?;
                let r = em.fma(q, s, em.getf(o)?)?;
                em.set(o, r)
            })?;
            let ov = em.getf(o)?;
            match &gate {
                Some(g) => g.store_o(em, [bi, tok, hi, j], ov),
                None => {
                    let shape = em.kernel.outputs[1].view.shape.clone();
                    em.store_output(1, &[bi, tok, hi, j], &shape, Val::F(ov), DType::F32)
                }
            }
        })
    })?;
    // the folded group norm: the last head of a unit to finish normalises every token
    if let Some(g) = &gate {
        g.arrive_then_normalise(em, t, bi, hi, zero, zero, tl)?;
    }
    Ok(rows_geo(s0[0].mul(&s0[1]), threads as u32))
}
