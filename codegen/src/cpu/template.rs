//! Template kernels on the CPU: a host driver per algorithm around generated code.
//!
//! Every operand is first made dense (row-major over its shape): a buffer operand is read
//! through its view with its dtype converted, a prologue operand is computed by its generated
//! function into an f32 buffer. The algorithm then produces dense results rounded to their
//! dtypes; an epilogue (a generated function reading the dense result) or a plain strided
//! store writes the kernel's outputs.
//!
//! Algorithms: GEMM runs the generated micro-kernel (gemm.rs) over cache blocks; the grouped
//! expert GEMM of MoE layers runs the same GEMM per chosen expert on the rows routed to it.
//! The row-wise templates (norms, softmax, QK-norm + RoPE, group-norm gate), attention and
//! linear attention and the routing top-k run the generated row kernels (vector.rs) through the
//! drivers of rows.rs. The others (FP8 casts, top-k, argmax, scatter-add) currently evaluate their
//! reference semantics (`ir::fused` through `ir::kernel_eval::template_graph_op`) on the dense
//! operands: correct, single-threaded, not generated code (docs/cpu-backend.md lists this as
//! open work).

use super::expr::{Jit, LoopSpec, Sink};
use super::gemm::{gemm_batched, GemmKernels, MatRef};
use super::host::{read_view, read_view_f32, write_view, ConcreteView};
use super::vector::VecKernels;
use super::{add_function, parallel_axes, sources, BufPtr, KernelFn, Launch, LoopFn};
use ir::fused::GroupedEpilogue;
use ir::graph::Graph;
use ir::interp::{Interpreter, ParamSource};
use ir::kernel::{BufferKind, Gemm, Kernel, KernelPlan, Operand, ScalarOp, TemplateKernel, TemplateOp, View};
use ir::op::{InputKind, Op};
use ir::shape::{eval_shape, Dim};
use ir::{DType, ParamSpec, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A dense result: elements row-major (shape and dtype are the kernel's, known from its IR).
struct Dense {
    data: Vec<f32>,
}

/// A dense operand: shape, elements (f32), dtype.
type DenseOperand = (Vec<usize>, Arc<Vec<f32>>, DType);

enum OperandExec {
    Buffer {
        input: usize,
        view: View,
        dtype: DType,
        /// a parameter under a fixed view: converted once per plan
        param: bool,
    },
    Prologue {
        f: LoopFn,
        domain: Vec<Dim>,
        dtype: DType,
        /// reads only parameters over a fixed domain: computed once per plan
        constant: bool,
    },
}

pub struct TemplateExec {
    name: String,
    op: TemplateOp,
    operands: Vec<OperandExec>,
    n_inputs: usize,
    outputs: Vec<(View, DType)>,
    /// the epilogue and the shape of the result it reads
    epilogue: Option<LoopFn>,
    kernels: Option<GemmKernels>,
    /// the generated row kernels (rows.rs, vector.rs)
    vk: Option<VecKernels>,
    /// runs the generated row kernels (see `row_dtypes`), not the reference semantics
    generated: bool,
    /// parameter operands converted to f32 once (they never change within a plan)
    weights: Mutex<HashMap<usize, Arc<Vec<f32>>>>,
}

impl TemplateExec {
    pub(crate) fn compile(
        jit: &mut Jit,
        plan: &KernelPlan,
        k: &Kernel,
        t: &TemplateKernel,
        fname: &str,
        symbols: &[String],
        pending: &mut Vec<cranelift_module::FuncId>,
    ) -> Result<TemplateExec, String> {
        let n_io = k.inputs.len() + k.outputs.len();
        let mut operands = Vec::new();
        for (i, o) in t.operands.iter().enumerate() {
            operands.push(match o {
                Operand::Buffer(j) => {
                    let r = k
                        .inputs
                        .get(*j)
                        .ok_or_else(|| format!("operand {i} names a missing input"))?;
                    let b = plan.buffer(r.buffer).ok_or("operand names a missing buffer")?;
                    OperandExec::Buffer {
                        input: *j,
                        view: r.view.clone(),
                        dtype: b.dtype,
                        // cached once per plan: only when the view is the same for every binding
                        param: b.kind == BufferKind::Param
                            && r.view.offset.as_const().is_some()
                            && r.view
                                .shape
                                .iter()
                                .chain(&r.view.strides)
                                .all(|d| d.as_const().is_some()),
                    }
                }
                Operand::Prologue(f) => {
                    let store = *f.stores.first().ok_or("a prologue without a store")?;
                    let dtype = f.exprs.get(store).ok_or("bad prologue store")?.dtype;
                    let spec = LoopSpec {
                        domain: &f.domain,
                        par: parallel_axes(f.domain.len(), f.exprs.has_reduce(), 0),
                        exprs: &f.exprs,
                        sources: sources(plan, k)?,
                        result_slot: None,
                        sinks: vec![Sink {
                            slot: n_io,
                            view: View::contiguous(&f.domain),
                            dtype: DType::F32,
                            expr: store,
                        }],
                    };
                    let f2 = add_function(jit, &format!("{fname}_prologue{i}"), &spec, symbols, pending)?;
                    let constant = f.domain.iter().all(|d| d.as_const().is_some())
                        && f.exprs.nodes.iter().all(|n| match &n.op {
                            ScalarOp::Load { input, .. } => k
                                .inputs
                                .get(*input)
                                .and_then(|r| plan.buffer(r.buffer))
                                .is_some_and(|b| b.kind == BufferKind::Param),
                            ScalarOp::Index(ix) => ix.offset.as_const().is_some(),
                            _ => true,
                        });
                    OperandExec::Prologue {
                        f: f2,
                        domain: f.domain.clone(),
                        dtype,
                        constant,
                    }
                }
            });
        }
        let mut outputs = Vec::new();
        let mut sinks = Vec::new();
        for (o, r) in k.outputs.iter().enumerate() {
            let b = plan.buffer(r.buffer).ok_or("output names a missing buffer")?;
            outputs.push((r.view.clone(), b.dtype));
            if let Some(e) = &t.epilogue {
                let expr = *e.stores.get(o).ok_or("an epilogue without a store for an output")?;
                sinks.push(Sink {
                    slot: k.inputs.len() + o,
                    view: r.view.clone(),
                    dtype: b.dtype,
                    expr,
                });
            }
        }
        let epilogue = match &t.epilogue {
            Some(e) => {
                let spec = LoopSpec {
                    domain: &e.domain,
                    par: parallel_axes(e.domain.len(), e.exprs.has_reduce(), 0),
                    exprs: &e.exprs,
                    sources: sources(plan, k)?,
                    result_slot: Some(n_io),
                    sinks,
                };
                Some(add_function(
                    jit,
                    &format!("{fname}_epilogue"),
                    &spec,
                    symbols,
                    pending,
                )?)
            }
            None => None,
        };
        Ok(TemplateExec {
            name: k.name.clone(),
            op: t.op.clone(),
            operands,
            n_inputs: k.inputs.len(),
            outputs,
            epilogue,
            kernels: None,
            vk: None,
            generated: false,
            weights: Mutex::new(HashMap::new()),
        })
        .map(|mut e| {
            e.generated = e.row_dtypes().is_some();
            e
        })
    }

    /// Whether the template runs generated code (GEMMs and the row kernels of `rows.rs`)
    /// rather than its reference semantics.
    pub fn is_generated(&self) -> bool {
        matches!(self.op, TemplateOp::Gemm(_) | TemplateOp::GroupedGemm { .. }) || self.generated
    }

    fn operand_dtype(&self, i: usize) -> Option<DType> {
        match self.operands.get(i)? {
            OperandExec::Buffer { dtype, .. } | OperandExec::Prologue { dtype, .. } => Some(*dtype),
        }
    }

    /// For a template that `rows.rs` generates: (the dtype its normalised values are rounded
    /// to, its result dtype), both f32 or bf16; `None` for the others (reference semantics).
    fn row_dtypes(&self) -> Option<(DType, DType)> {
        let dt = |i: usize| self.operand_dtype(i);
        let (a, b) = match &self.op {
            TemplateOp::RmsNorm { .. } | TemplateOp::QkNormRope { .. } => (dt(0)?, DType::promote(dt(0)?, dt(1)?)?),
            TemplateOp::AddRmsNorm { .. } => {
                if dt(0)? != dt(1)? {
                    return None;
                }
                (dt(0)?, DType::promote(dt(0)?, dt(2)?)?)
            }
            TemplateOp::Softmax { .. } => (dt(0)?, dt(0)?),
            TemplateOp::RouteTopK { .. } => (DType::F32, DType::F32),
            TemplateOp::GroupNormGate { .. }
            | TemplateOp::Attention { .. }
            | TemplateOp::LinearAttnChunk { .. }
            | TemplateOp::LinearAttnStep { .. } => (DType::F32, DType::F32),
            _ => return None,
        };
        let floats = (0..self.operands.len()).all(|i| match dt(i) {
            Some(d) if d.is_float() => super::rows::rounds(d),
            Some(_) => true,
            None => false,
        });
        (floats && super::rows::rounds(a) && super::rows::rounds(b)).then_some((a, b))
    }

    pub(crate) fn link(&mut self, resolve: &mut dyn FnMut(&mut KernelFn), kernels: GemmKernels, vk: VecKernels) {
        self.vk = Some(vk);
        for o in &mut self.operands {
            if let OperandExec::Prologue { f, .. } = o {
                resolve(&mut f.func);
            }
        }
        if let Some(e) = &mut self.epilogue {
            resolve(&mut e.func);
        }
        self.kernels = Some(kernels);
    }

    fn operand(&self, i: usize, l: &Launch) -> Result<DenseOperand, String> {
        match &self.operands[i] {
            OperandExec::Buffer {
                input,
                view,
                dtype,
                param,
            } => {
                let cv = ConcreteView::new(view, l.env)?;
                if *param {
                    if let Some(w) = self.weights.lock().map_err(|e| e.to_string())?.get(&i) {
                        return Ok((cv.shape, w.clone(), *dtype));
                    }
                }
                // SAFETY: the runtime hands the buffer the view was made for.
                let data = Arc::new(unsafe { read_view_f32(l.bufs[*input].0, *dtype, &cv) });
                if *param {
                    self.weights.lock().map_err(|e| e.to_string())?.insert(i, data.clone());
                }
                Ok((cv.shape, data, *dtype))
            }
            OperandExec::Prologue {
                f,
                domain,
                dtype,
                constant,
            } => {
                let shape = eval_shape(domain, l.env)?;
                if *constant {
                    if let Some(w) = self.weights.lock().map_err(|e| e.to_string())?.get(&i) {
                        return Ok((shape, w.clone(), *dtype));
                    }
                }
                let mut data = vec![0f32; shape.iter().product()];
                let mut bufs: Vec<BufPtr> = l.bufs.to_vec();
                bufs.push(BufPtr(data.as_mut_ptr() as *mut u8));
                f.call(&bufs, l.syms, l.env, l.par)?;
                let data = Arc::new(data);
                if *constant {
                    self.weights.lock().map_err(|e| e.to_string())?.insert(i, data.clone());
                }
                Ok((shape, data, *dtype))
            }
        }
    }

    /// A column-major operand (a transposed HF weight `[.., N, K]` used as `[.., K, N]`) in its
    /// storage order: dense `[.., N, K]`, so that each column is contiguous along K. None for
    /// other layouts. Parameters are converted once.
    fn operand_transposed(&self, i: usize, l: &Launch) -> Result<Option<DenseOperand>, String> {
        let (input, view, dtype, param) = match &self.operands[i] {
            OperandExec::Buffer {
                input,
                view,
                dtype,
                param,
            } => (input, view, dtype, param),
            OperandExec::Prologue { constant: true, .. } => {
                // a parameter computed on load (a weight cast to f32): transpose it once
                let key = usize::MAX - i;
                let cached = self.weights.lock().map_err(|e| e.to_string())?.get(&key).cloned();
                if let Some(w) = cached {
                    let (mut shape, _, dtype) = self.operand(i, l)?;
                    let r = shape.len();
                    shape.swap(r - 2, r - 1);
                    return Ok(Some((shape, w, dtype)));
                }
                let (mut shape, data, dtype) = self.operand(i, l)?;
                let r = shape.len();
                if r < 2 {
                    return Ok(None);
                }
                let (rows, cols) = (shape[r - 2], shape[r - 1]);
                let mut t = vec![0f32; data.len()];
                for (bi, block) in data.chunks(rows * cols.max(1)).enumerate() {
                    let out = &mut t[bi * rows * cols..(bi + 1) * rows * cols];
                    for x in 0..rows {
                        for y in 0..cols {
                            out[y * rows + x] = block[x * cols + y];
                        }
                    }
                }
                shape.swap(r - 2, r - 1);
                let t = Arc::new(t);
                self.weights.lock().map_err(|e| e.to_string())?.insert(key, t.clone());
                return Ok(Some((shape, t, dtype)));
            }
            _ => return Ok(None),
        };
        let r = view.rank();
        if r < 2 || view.strides[r - 2] != Dim::constant(1) || view.strides[r - 1] == Dim::constant(1) {
            return Ok(None);
        }
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        let Some(tv) = view.permute(&perm) else { return Ok(None) };
        let cv = ConcreteView::new(&tv, l.env)?;
        let key = usize::MAX - i;
        if *param {
            if let Some(w) = self.weights.lock().map_err(|e| e.to_string())?.get(&key) {
                return Ok(Some((cv.shape, w.clone(), *dtype)));
            }
        }
        // SAFETY: the runtime hands the buffer the view was made for.
        let data = Arc::new(unsafe { read_view_f32(l.bufs[*input].0, *dtype, &cv) });
        if *param {
            self.weights
                .lock()
                .map_err(|e| e.to_string())?
                .insert(key, data.clone());
        }
        Ok(Some((cv.shape, data, *dtype)))
    }

    /// Operand `i` with integer and boolean data exact (f64).
    fn operand_exact(&self, i: usize, l: &Launch) -> Result<Dense64, String> {
        match &self.operands[i] {
            OperandExec::Buffer { input, view, dtype, .. } if !dtype.is_float() => {
                let cv = ConcreteView::new(view, l.env)?;
                // SAFETY: as in `operand`.
                let data = unsafe { read_view(l.bufs[*input].0, *dtype, &cv) };
                Ok((cv.shape, data, *dtype))
            }
            _ => {
                let (s, d, t) = self.operand(i, l)?;
                Ok((s, d.iter().map(|&x| f64::from(x)).collect(), t))
            }
        }
    }

    pub fn run(&self, l: &Launch) -> Result<(), String> {
        let results: Vec<Dense> = match &self.op {
            TemplateOp::Gemm(g) => vec![self.gemm(g, l)?],
            TemplateOp::GroupedGemm { epilogue, .. } => vec![self.grouped_gemm(*epilogue, l)?],
            _ if self.generated => self.by_rows(l)?,
            op => self.by_reference(op, l)?,
        };
        self.finish(results, l)
    }

    fn finish(&self, mut results: Vec<Dense>, l: &Launch) -> Result<(), String> {
        if let Some(e) = &self.epilogue {
            let r = results.first_mut().ok_or("no result for the epilogue")?;
            let mut bufs: Vec<BufPtr> = l.bufs.to_vec();
            bufs.push(BufPtr(r.data.as_mut_ptr() as *mut u8));
            return e.call(&bufs, l.syms, l.env, l.par);
        }
        for (o, (view, dtype)) in self.outputs.iter().enumerate() {
            let r = results.get(o).ok_or_else(|| format!("{}: no result {o}", self.name))?;
            let cv = ConcreteView::new(view, l.env)?;
            if cv.numel() != r.data.len() {
                return Err(format!(
                    "result {o} has {} elements for a view of {}",
                    r.data.len(),
                    cv.numel()
                ));
            }
            // SAFETY: the runtime hands the buffer the view was made for.
            unsafe { write_view(l.bufs[self.n_inputs + o].0, *dtype, &cv, |i| f64::from(r.data[i])) };
        }
        Ok(())
    }

    fn gemm(&self, g: &Gemm, l: &Launch) -> Result<Dense, String> {
        let micro = self.kernels.ok_or("the GEMM kernels are not linked")?;
        let (sa, a, _) = self.operand(0, l)?;
        // B as stored when it is a transposed weight (columns contiguous along K)
        let (sb, b, b_t) = match self.operand_transposed(1, l)? {
            Some((mut s, d, _)) => {
                let r = s.len();
                s.swap(r - 2, r - 1);
                (s, d, true)
            }
            None => {
                let (s, d, _) = self.operand(1, l)?;
                (s, d, false)
            }
        };
        let (ra, rb) = (sa.len(), sb.len());
        if ra < 2 || rb < 2 {
            return Err("gemm operands need two matrix dims".into());
        }
        let (m, k, n) = (sa[ra - 2], sa[ra - 1], sb[rb - 1]);
        if sb[rb - 2] != k {
            return Err(format!("gemm: inner dims {k} and {}", sb[rb - 2]));
        }
        let batch = eval_shape(&g.batch, l.env)?;
        let rank = batch.len();
        // the batch index of an operand under broadcasting (size-1 and missing dims repeat)
        let bidx = |s: &[usize], idx: &[usize]| -> usize {
            let r = s.len() - 2;
            let lead = rank - r.min(rank);
            let mut lin = 0;
            for d in 0..r {
                let i = if s[d] == 1 { 0 } else { idx[lead + d] };
                lin = lin * s[d] + i;
            }
            lin
        };
        let nb: usize = batch.iter().product();
        let mut jobs = Vec::with_capacity(nb);
        let mut idx = vec![0usize; rank];
        for j in 0..nb {
            let (ba, bb) = (bidx(&sa, &idx), bidx(&sb, &idx));
            jobs.push((
                MatRef {
                    data: &a,
                    base: ba * m * k,
                    rs: k,
                    cs: 1,
                },
                MatRef {
                    data: &b,
                    base: bb * k * n,
                    rs: if b_t { 1 } else { n },
                    cs: if b_t { k } else { 1 },
                },
                j * m * n,
            ));
            for d in (0..rank).rev() {
                idx[d] += 1;
                if idx[d] < batch[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        let mut c = vec![0f32; nb * m * n];
        gemm_batched(micro, &jobs, &mut c, (m, n, k), l.par);
        round_all(&mut c, g.out);
        Ok(Dense { data: c })
    }

    /// `Fused::GroupedMatmul`: the rows routed to each expert gathered, one GEMM per expert
    /// and weight, the rows scattered back (ir::fused::moe documents the rounding points).
    fn grouped_gemm(&self, epi: GroupedEpilogue, l: &Launch) -> Result<Dense, String> {
        let micro = self.kernels.ok_or("the GEMM kernels are not linked")?;
        let (_, x, xdt) = self.operand(0, l)?;
        let (sc, chosen, _) = self.operand_exact(1, l)?;
        let (sw1, w1, w1dt) = self.operand(2, l)?;
        let (sw2, w2, w2dt) = self.operand(3, l)?;
        let top_k = *sc.last().ok_or("chosen experts without dims")?;
        let tokens = chosen.len() / top_k.max(1);
        let experts = match epi {
            GroupedEpilogue::SwiGlu => sw1[0],
            GroupedEpilogue::WeightedCombine => sw2[0],
        };
        // rows per expert: (token, slot)
        let mut rows: Vec<Vec<(usize, usize)>> = vec![Vec::new(); experts];
        for t in 0..tokens {
            for s in 0..top_k {
                let e = chosen[t * top_k + s];
                let e = usize::try_from(e as i64)
                    .ok()
                    .filter(|&e| e < experts)
                    .ok_or_else(|| format!("grouped_gemm: expert index {e} out of range for {experts} experts"))?;
                rows[e].push((t, s));
            }
        }
        match epi {
            GroupedEpilogue::SwiGlu => {
                // x [.., D], w_gate / w_up [E, I, D]; h [.., K, I] in promote(x, w)
                let (inter, d) = (sw1[1], sw1[2]);
                let out = DType::promote(xdt, w1dt).unwrap_or(DType::F32);
                let mut h = vec![0f32; tokens * top_k * inter];
                for (e, rs) in rows.iter().enumerate() {
                    if rs.is_empty() {
                        continue;
                    }
                    let m = rs.len();
                    let mut xa = vec![0f32; m * d];
                    for (r, &(t, _)) in rs.iter().enumerate() {
                        xa[r * d..(r + 1) * d].copy_from_slice(&x[t * d..(t + 1) * d]);
                    }
                    let mut c = vec![0f32; 2 * m * inter];
                    let xr = MatRef {
                        data: &xa,
                        base: 0,
                        rs: d,
                        cs: 1,
                    };
                    gemm_batched(
                        micro,
                        &[
                            (xr, wt(w1.as_slice(), e, inter, d), 0),
                            (xr, wt(w2.as_slice(), e, inter, d), m * inter),
                        ],
                        &mut c,
                        (m, inter, d),
                        l.par,
                    );
                    for (r, &(t, s)) in rs.iter().enumerate() {
                        for j in 0..inter {
                            let g = out.round(c[r * inter + j]);
                            let u = out.round(c[m * inter + r * inter + j]);
                            let sg = out.round(sigmoid(g));
                            let silu = out.round(g * sg);
                            h[(t * top_k + s) * inter + j] = out.round(silu * u);
                        }
                    }
                }
                Ok(Dense { data: h })
            }
            GroupedEpilogue::WeightedCombine => {
                // h [.., K, I], weights [.., K] f32, w_down [E, D, I]: Σ_k w_k · (h_k · W_downᵀ)
                let weights = &w1;
                let (d, inter) = (sw2[1], sw2[2]);
                let hdt = xdt;
                let prod_dt = DType::promote(hdt, w2dt).unwrap_or(DType::F32);
                let mut y = vec![0f64; tokens * d];
                let mut contrib: Vec<Vec<f32>> = vec![Vec::new(); experts];
                for (e, rs) in rows.iter().enumerate() {
                    if rs.is_empty() {
                        continue;
                    }
                    let m = rs.len();
                    let mut ha = vec![0f32; m * inter];
                    for (r, &(t, s)) in rs.iter().enumerate() {
                        let src = (t * top_k + s) * inter;
                        ha[r * inter..(r + 1) * inter].copy_from_slice(&x[src..src + inter]);
                    }
                    let mut c = vec![0f32; m * d];
                    let hr = MatRef {
                        data: &ha,
                        base: 0,
                        rs: inter,
                        cs: 1,
                    };
                    let wr = MatRef {
                        data: w2.as_slice(),
                        base: e * d * inter,
                        rs: 1,
                        cs: inter,
                    };
                    gemm_batched(micro, &[(hr, wr, 0)], &mut c, (m, d, inter), l.par);
                    contrib[e] = c;
                }
                // sum over the slots in slot order, as the reference does
                let mut pos: Vec<usize> = vec![0; experts];
                let mut slot_of: Vec<(usize, usize)> = vec![(0, 0); tokens * top_k];
                for (e, rs) in rows.iter().enumerate() {
                    for &(t, s) in rs {
                        slot_of[t * top_k + s] = (e, pos[e]);
                        pos[e] += 1;
                    }
                }
                for t in 0..tokens {
                    for s in 0..top_k {
                        let (e, r) = slot_of[t * top_k + s];
                        let w = weights[t * top_k + s];
                        for j in 0..d {
                            let p = prod_dt.round(contrib[e][r * d + j]);
                            y[t * d + j] += f64::from(w * p);
                        }
                    }
                }
                Ok(Dense {
                    data: y.iter().map(|&v| v as f32).collect(),
                })
            }
        }
    }

    /// The row-wise, attention and linear-attention templates on the generated row kernels.
    fn by_rows(&self, l: &Launch) -> Result<Vec<Dense>, String> {
        use super::rows;
        let vk = self.vk.as_ref().ok_or("the row kernels are not linked")?;
        let (norm_dt, out_dt) = self.row_dtypes().ok_or("not a generated template")?;
        let last = |s: &[usize]| s.last().copied().unwrap_or(0);
        let zeros = |n: usize| vec![0f32; n];
        Ok(match &self.op {
            TemplateOp::RmsNorm { eps, .. } => {
                let (sx, x, _) = self.operand(0, l)?;
                let (_, w, _) = self.operand(1, l)?;
                let mut y = zeros(x.len());
                rows::rms_norm(vk, &x, &w, last(&sx), *eps, (norm_dt, out_dt), &mut y, l.par)?;
                vec![Dense { data: y }]
            }
            TemplateOp::AddRmsNorm { eps, .. } => {
                let (sx, h, _) = self.operand(0, l)?;
                let (_, a, _) = self.operand(1, l)?;
                let (_, w, _) = self.operand(2, l)?;
                let (mut s, mut y) = (zeros(h.len()), zeros(h.len()));
                rows::add_rms_norm(
                    vk,
                    (&h, &a, &w),
                    last(&sx),
                    *eps,
                    (norm_dt, out_dt),
                    &mut s,
                    &mut y,
                    l.par,
                )?;
                vec![Dense { data: s }, Dense { data: y }]
            }
            TemplateOp::Softmax { .. } => {
                let (sx, x, _) = self.operand(0, l)?;
                let mut y = zeros(x.len());
                rows::softmax(vk, &x, last(&sx), &mut y, l.par)?;
                round_all(&mut y, out_dt);
                vec![Dense { data: y }]
            }
            TemplateOp::QkNormRope { eps, .. } => {
                let (sx, x, _) = self.operand(0, l)?;
                let (_, w, _) = self.operand(1, l)?;
                let (_, pos, _) = self.operand_exact(2, l)?;
                let (_, inv, _) = self.operand(3, l)?;
                let r = sx.len();
                if r < 3 {
                    return Err(format!("qk_norm_rope of a rank-{r} operand"));
                }
                let mut y = zeros(x.len());
                rows::qk_norm_rope(
                    vk,
                    (&x, &w, &pos, &inv),
                    (sx[r - 3], sx[r - 2], sx[r - 1]),
                    *eps,
                    (norm_dt, out_dt),
                    &mut y,
                    l.par,
                )?;
                vec![Dense { data: y }]
            }
            TemplateOp::GroupNormGate { groups, eps, .. } => {
                let (_, o, _) = self.operand(0, l)?;
                let (_, w, _) = self.operand(1, l)?;
                let (_, g, _) = self.operand(2, l)?;
                let mut y = zeros(g.len());
                rows::group_norm_gate(vk, (&o, &w, &g), *groups, *eps, &mut y, l.par)?;
                vec![Dense { data: y }]
            }
            TemplateOp::Attention { scale, .. } => {
                let (sq, q, _) = self.operand(0, l)?;
                let (sk, k, _) = self.operand(1, l)?;
                let (_, v, _) = self.operand(2, l)?;
                let (_, pos, _) = self.operand_exact(3, l)?;
                let (&[b, hkv, g, s, d], &[_, _, t, _]) = (sq.as_slice(), sk.as_slice()) else {
                    return Err(format!("attention of q {sq:?} and k {sk:?}"));
                };
                let mut y = zeros(q.len());
                rows::attention(vk, (&q, &k, &v, &pos), (b, hkv, g, s, t, d), *scale, &mut y, l.par)?;
                vec![Dense { data: y }]
            }
            TemplateOp::LinearAttnChunk { .. } | TemplateOp::LinearAttnStep { .. } => {
                let (_, s0, _) = self.operand(0, l)?;
                let (sq, q, _) = self.operand(1, l)?;
                let (_, k, _) = self.operand(2, l)?;
                let (_, v, _) = self.operand(3, l)?;
                let (_, lam, _) = self.operand(4, l)?;
                let &[b, t, h, d] = sq.as_slice() else {
                    return Err(format!("linear attention of q {sq:?}"));
                };
                let (mut s, mut o) = (zeros(s0.len()), zeros(q.len()));
                rows::linear_attn(vk, [&s0, &q, &k, &v, &lam], (b, t, h, d), &mut s, &mut o, l.par)?;
                vec![Dense { data: s }, Dense { data: o }]
            }
            TemplateOp::RouteTopK {
                k,
                n_group,
                topk_group,
                scale,
                normalize,
                biased,
                ..
            } => {
                let (sp, p, _) = self.operand(0, l)?;
                let bias = if *biased { Some(self.operand(1, l)?.1) } else { None };
                let (chosen, weights) = rows::route_topk(
                    vk,
                    &p,
                    bias.as_deref().map(|b| b.as_slice()),
                    last(&sp),
                    (*k, *n_group, *topk_group),
                    *scale,
                    *normalize,
                    l.par,
                )?;
                vec![Dense { data: chosen }, Dense { data: weights }]
            }
            op => return Err(format!("{} is not generated", op.name())),
        })
    }

    /// The template's reference semantics on the dense operands (see the module doc).
    fn by_reference(&self, op: &TemplateOp, l: &Launch) -> Result<Vec<Dense>, String> {
        let graph_op = ir::kernel_eval::template_graph_op(op)?;
        let mut g = Graph::new();
        let mut args = Vec::new();
        let mut feed = HashMap::new();
        for i in 0..self.operands.len() {
            let (shape, data, dtype) = self.operand_exact(i, l)?;
            let name = format!("a{i}");
            let dims = shape.iter().map(|&d| Dim::constant(d as i64)).collect();
            let input = Op::Input {
                name: name.clone(),
                kind: InputKind::Data,
                dtype,
                shape: dims,
            };
            args.push(g.add1(input, &[], None).map_err(|e| e.to_string())?);
            feed.insert(name, ir::kernel_eval::tensor(dtype, shape, &data));
        }
        let outs = g.add(graph_op, &args, None).map_err(|e| e.to_string())?;
        for (i, o) in outs.iter().enumerate() {
            g.add_output(&format!("o{i}"), *o, InputKind::Data);
        }
        let interp = Interpreter::new(&g, &NoParams).map_err(|e| e.to_string())?;
        let mut res = interp.run(&feed).map_err(|e| e.to_string())?;
        (0..outs.len())
            .map(|i| {
                let t = res.remove(&format!("o{i}")).ok_or("missing result")?;
                Ok(Dense {
                    data: t.to_f64_vec().iter().map(|&x| x as f32).collect(),
                })
            })
            .collect()
    }
}

/// Expert `e` of a stacked weight `[E, rows, cols]`, transposed: `[cols, rows]`.
fn wt(w: &[f32], e: usize, rows: usize, cols: usize) -> MatRef<'_> {
    MatRef {
        data: w,
        base: e * rows * cols,
        rs: 1,
        cs: cols,
    }
}

/// `(shape, elements as f64, dtype)`
type Dense64 = (Vec<usize>, Vec<f64>, DType);

fn round_all(c: &mut [f32], dtype: DType) {
    if dtype != DType::F32 {
        for x in c {
            *x = dtype.round(*x);
        }
    }
}

/// The interpreter's sigmoid (ir::fused::moe).
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

struct NoParams;
impl ParamSource for NoParams {
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
        Err(format!("no parameter {}", spec.name))
    }
}
