//! Loop kernels (`ir::kernel::LoopKernel`) generated from their expression graphs.
//!
//! Thread mapping:
//! - no reduction: a flat grid-stride loop over the whole domain (256 threads a block), each
//!   thread evaluating every store at its domain indices;
//! - with reductions: one block per outer index (the first `outer` axes; one block in all when
//!   `outer == 0`). Each `ScalarOp::Reduce`, in expression order (so softmax's max comes before
//!   its sum of exponentials, which reads it), is accumulated by the block's threads striding
//!   over the reduction's variables, combined with warp shuffles and a shared-memory step
//!   (`Em::block_reduce`) and then known to every thread; the threads then stride over the
//!   inner axes and store.

use super::emit::{Em, Val, R};
use super::expr::Scope;
use inkwell::IntPredicate;
use ir::kernel::{ExprGraph, ExprId, GridDim, LaunchGeometry, LoopKernel, ScalarOp};
use ir::shape::numel;
use ir::Dim;
use std::collections::HashMap;

/// Threads per block of the flat elementwise kernels.
const FLAT_BLOCK: u32 = 256;

/// Threads for rows whose widest loop is `widest` (when known): a power of two in 32..=256.
fn row_block(widest: Option<i64>) -> u32 {
    match widest {
        Some(w) => (w.max(1) as u32).next_power_of_two().clamp(32, 256),
        None => 256,
    }
}

pub(crate) fn emit(em: &mut Em, l: &LoopKernel) -> R<LaunchGeometry> {
    let g = &l.exprs;
    if !g.has_reduce() {
        let n = numel(&l.domain);
        let extents = em.dims(&l.domain)?;
        let total = em.product(&extents)?;
        let gid = em.add(em.mul(em.sreg("ctaid.x")?, em.sreg("ntid.x")?)?, em.sreg("tid.x")?)?;
        let stride = em.mul(em.sreg("ntid.x")?, em.sreg("nctaid.x")?)?;
        em.for_range(gid, total, stride, |em, i| {
            let idx = em.unravel(i, &extents)?;
            let mut sc = Scope::with_vars(&idx, &l.domain);
            store_all(em, g, &l.stores, &mut sc, &idx, &l.domain)
        })?;
        em.ret()?;
        return Ok(LaunchGeometry {
            grid: [GridDim::blocks(n, FLAT_BLOCK), GridDim::one(), GridDim::one()],
            block: [FLAT_BLOCK, 1, 1],
            shared_bytes: 0,
        });
    }
    let outer = l.outer.min(l.domain.len());
    let (outer_dims, inner_dims) = l.domain.split_at(outer);
    let reductions: Vec<(ExprId, &ScalarOp)> = g
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op, ScalarOp::Reduce { .. }))
        .map(|(i, n)| (ExprId(i as u32), &n.op))
        .collect();
    // the widest loop of a row decides the block size
    let mut widths = vec![numel(inner_dims)];
    for (_, op) in &reductions {
        if let ScalarOp::Reduce { vars, .. } = op {
            widths.push(vars.iter().fold(Dim::constant(1), |p, (_, d)| p.mul(d)));
        }
    }
    let widest = widths
        .iter()
        .map(|w| w.as_const())
        .try_fold(0i64, |m, w| w.map(|w| m.max(w)));
    let block = row_block(widest);

    let outer_ext = em.dims(outer_dims)?;
    let row = em.sreg("ctaid.x")?;
    // a grid launched for larger dims than the step's (a CUDA graph captured at the cache's
    // capacity) has blocks past the last row: they do nothing
    let rows = em.product(&outer_ext)?;
    let past_end = em.icmp(IntPredicate::UGE, row, rows)?;
    em.return_if(past_end)?;
    let outer_idx = em.unravel(row, &outer_ext)?;
    let tid = em.sreg("tid.x")?;
    let ntid = em.sreg("ntid.x")?;
    let mut known: HashMap<ExprId, Val> = HashMap::new();
    for (id, op) in &reductions {
        let ScalarOp::Reduce { op: rop, vars, body } = op else {
            continue;
        };
        let ext_dims: Vec<Dim> = vars.iter().map(|(_, d)| d.clone()).collect();
        let ext = em.dims(&ext_dims)?;
        let total = em.product(&ext)?;
        let acc = em.fvar(em.identity(*rop))?;
        let node_dtype = g.nodes[id.0 as usize].dtype;
        let body_dtype = g.get(*body).map(|n| n.dtype).unwrap_or(ir::DType::F32);
        em.for_range(tid, total, ntid, |em, j| {
            let red_idx = em.unravel(j, &ext)?;
            let mut sc = Scope::with_vars(&outer_idx, outer_dims);
            for (((v, _), d), x) in vars.iter().zip(&ext_dims).zip(&red_idx) {
                sc.vars.insert(*v, *x);
                sc.extents.insert(*v, d.clone());
            }
            sc.memo = known.clone();
            let b = em.expr(g, &mut sc, *body)?;
            let b = em.convert(b, body_dtype, ir::DType::F32)?;
            let b = em.as_f(b)?;
            let a = em.getf(acc)?;
            let r = match rop {
                ir::op::ReduceOp::Sum => em.fadd(a, b)?,
                ir::op::ReduceOp::Max => em.fmax(a, b)?,
            };
            em.set(acc, r)
        })?;
        let part = em.getf(acc)?;
        let r = em.block_reduce(*rop, part)?;
        let v = em.convert(Val::F(r), ir::DType::F32, node_dtype)?;
        known.insert(*id, v);
    }
    let inner_ext = em.dims(inner_dims)?;
    let inner_total = em.product(&inner_ext)?;
    em.for_range(tid, inner_total, ntid, |em, j| {
        let mut idx = outer_idx.clone();
        idx.extend(em.unravel(j, &inner_ext)?);
        let mut sc = Scope::with_vars(&idx, &l.domain);
        sc.memo = known.clone();
        store_all(em, g, &l.stores, &mut sc, &idx, &l.domain)
    })?;
    em.ret()?;
    Ok(LaunchGeometry {
        grid: [GridDim::blocks(numel(outer_dims), 1), GridDim::one(), GridDim::one()],
        block: [block, 1, 1],
        shared_bytes: 0,
    })
}

/// Evaluate every store at domain index `idx` and write it through the output views.
pub(crate) fn store_all<'c>(
    em: &mut Em<'c, '_>,
    g: &ExprGraph,
    stores: &[ExprId],
    sc: &mut Scope<'c>,
    idx: &[inkwell::values::IntValue<'c>],
    domain: &[Dim],
) -> R<()> {
    for (o, e) in stores.iter().enumerate() {
        let v = em.expr(g, sc, *e)?;
        let from = g.get(*e).map(|n| n.dtype).unwrap_or(ir::DType::F32);
        em.store_output(o, idx, domain, v, from)?;
    }
    Ok(())
}

impl<'c> Em<'c, '_> {
    /// Write `v` (of dtype `from`) to `Kernel::outputs[o]` at index `idx` of `domain`: through
    /// the view directly when its shape is the domain, else by row-major position.
    pub(crate) fn store_output(
        &self,
        o: usize,
        idx: &[inkwell::values::IntValue<'c>],
        domain: &[Dim],
        v: Val<'c>,
        from: ir::DType,
    ) -> R<()> {
        let r = self
            .kernel
            .outputs
            .get(o)
            .ok_or_else(|| super::CodegenError(format!("store to missing output {o}")))?;
        let dtype = self
            .plan
            .buffer(r.buffer)
            .ok_or_else(|| super::CodegenError(format!("missing buffer {}", r.buffer)))?
            .dtype;
        let at = if r.view.shape.as_slice() == domain {
            self.view_offset(&r.view, idx)?
        } else {
            let ext = self.dims(domain)?;
            let mut lin = self.i64c(0);
            for (i, n) in idx.iter().zip(&ext) {
                lin = self.add(self.mul(lin, *n)?, *i)?;
            }
            let vext = self.dims(&r.view.shape)?;
            let vidx = self.unravel(lin, &vext)?;
            self.view_offset(&r.view, &vidx)?
        };
        self.store(self.outputs[o], at, v, from, dtype)
    }
}
