//! Template kernels on the CPU: a host driver per algorithm around generated code.
//!
//! Every operand is first made dense (row-major over its shape): a buffer operand is read
//! through its view with its dtype converted, a prologue operand is computed by its generated
//! function into an f32 buffer; E4M3 operands are read as their bytes (in place when the view
//! is dense). The algorithm then produces dense results rounded to their dtypes (or writes
//! them in their storage format straight into the kernel's buffer when its view is dense); an
//! epilogue (a generated function reading the dense result) or a strided store writes the
//! kernel's outputs.
//!
//! Algorithms, all on generated code: GEMM runs the generated micro-kernel (gemm.rs) over cache
//! blocks; the grouped expert GEMM of MoE layers runs the same GEMM per chosen expert on the
//! rows routed to it. The row-wise templates (norms, softmax, QK-norm + RoPE, group-norm gate),
//! attention and linear attention and the routing top-k run the generated row kernels
//! (vector.rs) through the drivers of rows.rs; the FP8 templates (quantise, dequantise, the
//! fused norm/SwiGLU quantisation, the block-scaled GEMM) those of quant.rs; top-k, argmax and
//! scatter-add those of select.rs. No template evaluates its reference semantics.

use super::expr::{Jit, LoopSpec, Sink};
use super::gemm::{gemm_batched, Fp8Mat, GemmKernels, MatRef};
use super::host::{load_elem, read_view, read_view_f32, store_elem, write_view, ConcreteView};
use super::vector::VecKernels;
use super::{add_function, parallel_axes, sources, BufPtr, KernelFn, Launch, LoopFn, ParFor};
use ir::fused::GroupedEpilogue;
use ir::kernel::{BufferKind, Gemm, Kernel, KernelPlan, Operand, ScalarOp, TemplateKernel, TemplateOp, View};
use ir::shape::{eval_shape, Dim};
use ir::DType;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A dense result, row-major over the output's shape.
enum Dense {
    /// values (rounded to the output's dtype, or rounded by the store)
    F32(Vec<f32>),
    /// exact integers (indices, integer sums)
    I64(Vec<i64>),
    /// the output's storage bytes (its dtype's encoding), to be copied through its view
    Raw(Arc<Vec<u8>>),
    /// already written into the output buffer by the driver
    Stored,
}

impl Dense {
    fn len(&self, dtype: DType) -> Option<usize> {
        match self {
            Dense::F32(v) => Some(v.len()),
            Dense::I64(v) => Some(v.len()),
            Dense::Raw(b) => Some(b.len() / dtype.size_bytes()),
            Dense::Stored => None,
        }
    }

    /// The values as f32, for an epilogue (`ScalarOp::Result` reads f32).
    fn into_f32(self, dtype: DType) -> Vec<f32> {
        match self {
            Dense::F32(v) => v,
            Dense::I64(v) => v.into_iter().map(|x| x as f32).collect(),
            Dense::Raw(b) => (0..b.len() / dtype.size_bytes())
                // SAFETY: element i of the row-major bytes.
                .map(|i| unsafe { load_elem(b.as_ptr(), dtype, i) } as f32)
                .collect(),
            Dense::Stored => Vec::new(),
        }
    }
}

/// A parameter's E4M3 bytes and scales.
type Quantized = (Arc<Vec<u8>>, Arc<Vec<f32>>);

/// A dense operand: shape, elements (f32), dtype.
type DenseOperand = (Vec<usize>, Arc<Vec<f32>>, DType);

/// Where a driver writes output elements of type `T` (the output's storage format): the
/// kernel's buffer itself when its view is dense row-major and no epilogue reads the result,
/// else a staging vector stored through the view by `finish`.
enum OutBuf<T> {
    Direct(*mut T, usize),
    Staged(Vec<T>),
}

impl<T> OutBuf<T> {
    fn slice(&mut self) -> &mut [T] {
        match self {
            // SAFETY: `OutBuf::direct` checked that the buffer holds these elements.
            OutBuf::Direct(p, n) => unsafe { std::slice::from_raw_parts_mut(*p, *n) },
            OutBuf::Staged(v) => v,
        }
    }
}

/// The offset (in elements) of a view that is dense row-major, else `None`.
fn dense_offset(cv: &ConcreteView) -> Option<usize> {
    let mut want = 1i64;
    for (&n, &s) in cv.shape.iter().zip(&cv.strides).rev() {
        if n > 1 && s != want {
            return None;
        }
        want *= n as i64;
    }
    usize::try_from(cv.offset).ok()
}

/// A parameter's f32 form under one view: its name, dtype, the concrete view, and whether it
/// is the transposed (storage-order) form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WeightKey {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<i64>,
    offset: i64,
    transposed: bool,
}

impl WeightKey {
    fn new(name: &str, dtype: DType, cv: &ConcreteView, transposed: bool) -> WeightKey {
        WeightKey {
            name: name.to_string(),
            dtype,
            shape: cv.shape.clone(),
            strides: cv.strides.clone(),
            offset: cv.offset,
            transposed,
        }
    }
}

/// Parameters converted to f32 by the template kernels, shared between the plans of one model
/// ([`super::CpuPlan::share_weights`]): each weight is converted and held once.
#[derive(Clone, Default)]
pub struct WeightCache(Arc<Mutex<HashMap<WeightKey, Arc<Vec<f32>>>>>);

impl WeightCache {
    /// How many parameter forms the cache holds.
    pub fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

enum OperandExec {
    Buffer {
        input: usize,
        view: View,
        dtype: DType,
        /// a parameter under a fixed view: converted once per plan (and shared between plans
        /// through [`WeightCache`])
        param: bool,
        /// the buffer's name (a parameter's checkpoint name)
        name: String,
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
    /// parameter operands converted to f32 once (they never change within a plan)
    weights: Mutex<HashMap<usize, Arc<Vec<f32>>>>,
    /// the same conversions shared with the other plans of a model ([`TemplateExec::share_weights`])
    shared: Option<WeightCache>,
    /// the quantisation of a parameter (bytes and scales), computed once per plan
    quantized: Mutex<Option<Quantized>>,
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
                        name: b.name.clone(),
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
            weights: Mutex::new(HashMap::new()),
            shared: None,
            quantized: Mutex::new(None),
        })
    }

    /// Takes parameter conversions from `cache` (and leaves its own there), so that the plans
    /// of one model (prefill, decode) convert and hold each weight once.
    pub(crate) fn share_weights(&mut self, cache: &WeightCache) {
        self.shared = Some(cache.clone());
    }

    /// A parameter operand's f32 form: this kernel's own, else the shared cache's, else
    /// `convert()`'s (then kept in both).
    fn param_f32(
        &self,
        local: usize,
        key: WeightKey,
        convert: impl FnOnce() -> Vec<f32>,
    ) -> Result<Arc<Vec<f32>>, String> {
        if let Some(w) = self.weights.lock().map_err(|e| e.to_string())?.get(&local) {
            return Ok(w.clone());
        }
        let shared = match &self.shared {
            Some(c) => c.0.lock().map_err(|e| e.to_string())?.get(&key).cloned(),
            None => None,
        };
        let data = match shared {
            Some(w) => w,
            None => {
                let w = Arc::new(convert());
                if let Some(c) = &self.shared {
                    c.0.lock().map_err(|e| e.to_string())?.insert(key, w.clone());
                }
                w
            }
        };
        self.weights
            .lock()
            .map_err(|e| e.to_string())?
            .insert(local, data.clone());
        Ok(data)
    }

    /// Whether the template runs generated code: every kind does (GEMMs on the micro-kernel,
    /// the others on the row kernels of vector.rs); none falls back to its reference semantics.
    pub fn is_generated(&self) -> bool {
        true
    }

    fn operand_dtype(&self, i: usize) -> Option<DType> {
        match self.operands.get(i)? {
            OperandExec::Buffer { dtype, .. } | OperandExec::Prologue { dtype, .. } => Some(*dtype),
        }
    }

    /// For a template that `rows.rs` generates: (the dtype its normalised values are rounded
    /// to, its result dtype), floats; `None` for the others.
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
        (a.is_float() && b.is_float()).then_some((a, b))
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
                name,
            } => {
                let cv = ConcreteView::new(view, l.env)?;
                // SAFETY: the runtime hands the buffer the view was made for.
                let read = || unsafe { read_view_f32(l.bufs[*input].0, *dtype, &cv) };
                if *param {
                    let data = self.param_f32(i, WeightKey::new(name, *dtype, &cv, false), read)?;
                    return Ok((cv.shape, data, *dtype));
                }
                let data = Arc::new(read());
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
        let (input, view, dtype, param, name) = match &self.operands[i] {
            OperandExec::Buffer {
                input,
                view,
                dtype,
                param,
                name,
            } => (input, view, dtype, param, name),
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
        // SAFETY: the runtime hands the buffer the view was made for.
        let read = || unsafe { read_view_f32(l.bufs[*input].0, *dtype, &cv) };
        let data = match param {
            true => self.param_f32(usize::MAX - i, WeightKey::new(name, *dtype, &cv, true), read)?,
            false => Arc::new(read()),
        };
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

    /// Operand `i` as exact i64 (integer and bool buffers read in their dtype; others
    /// through f64).
    fn operand_i64(&self, i: usize, l: &Launch) -> Result<(Vec<usize>, Vec<i64>), String> {
        if let OperandExec::Buffer { input, view, dtype, .. } = &self.operands[i] {
            if !dtype.is_float() {
                let cv = ConcreteView::new(view, l.env)?;
                let p = l.bufs[*input].0 as *const u8;
                let mut out = vec![0i64; cv.numel()];
                // SAFETY: the runtime hands the buffer the view was made for.
                cv.for_each(|lin, a| {
                    out[lin] = unsafe {
                        match dtype {
                            DType::I64 => *(p as *const i64).add(a),
                            DType::I32 => i64::from(*(p as *const i32).add(a)),
                            _ => i64::from(*p.add(a)),
                        }
                    }
                });
                return Ok((cv.shape, out));
            }
        }
        let (s, d, _) = self.operand_exact(i, l)?;
        Ok((s, d.iter().map(|&x| x as i64).collect()))
    }

    /// Operand `i` as E4M3 bytes, row-major: the buffer itself when its view is dense, else
    /// gathered through the view (a prologue's values are encoded).
    fn operand_bytes<'l>(&self, i: usize, l: &Launch<'l>) -> Result<(Vec<usize>, Cow<'l, [u8]>), String> {
        match &self.operands[i] {
            OperandExec::Buffer { input, view, dtype, .. } if *dtype == DType::F8E4M3 => {
                let cv = ConcreteView::new(view, l.env)?;
                let p = l.bufs[*input].0 as *const u8;
                if let Some(off) = dense_offset(&cv) {
                    // SAFETY: the view's elements (dense, one byte each) lie in the buffer.
                    let b = unsafe { std::slice::from_raw_parts(p.add(off), cv.numel()) };
                    return Ok((cv.shape, Cow::Borrowed(b)));
                }
                let mut out = vec![0u8; cv.numel()];
                // SAFETY: as above, element by element.
                cv.for_each(|lin, a| out[lin] = unsafe { *p.add(a) });
                Ok((cv.shape, Cow::Owned(out)))
            }
            _ => {
                let (s, d, _) = self.operand(i, l)?;
                let bytes = d.iter().map(|&x| DType::F8E4M3.encode_float(x) as u8).collect();
                Ok((s, Cow::Owned(bytes)))
            }
        }
    }

    /// Where to write output `o` (`numel` elements of `T`, its storage type).
    fn out_buf<T: Default + Clone>(&self, o: usize, numel: usize, l: &Launch) -> Result<OutBuf<T>, String> {
        let (view, dtype) = &self.outputs[o];
        if std::mem::size_of::<T>() != dtype.size_bytes() {
            return Err(format!("output {o} is {dtype}"));
        }
        let cv = ConcreteView::new(view, l.env)?;
        if cv.numel() != numel {
            return Err(format!("output {o}: {numel} results for a view of {}", cv.numel()));
        }
        match dense_offset(&cv) {
            Some(off) if self.epilogue.is_none() => {
                // SAFETY: the view's dense elements lie in the buffer the runtime hands us.
                let p = unsafe { (l.bufs[self.n_inputs + o].0 as *mut T).add(off) };
                Ok(OutBuf::Direct(p, numel))
            }
            _ => Ok(OutBuf::Staged(vec![T::default(); numel])),
        }
    }

    fn f32_result(b: OutBuf<f32>) -> Dense {
        match b {
            OutBuf::Direct(..) => Dense::Stored,
            OutBuf::Staged(v) => Dense::F32(v),
        }
    }

    fn byte_result(b: OutBuf<u8>) -> Dense {
        match b {
            OutBuf::Direct(..) => Dense::Stored,
            OutBuf::Staged(v) => Dense::Raw(Arc::new(v)),
        }
    }

    /// Whether operand `i` depends only on parameters (its value never changes in a plan).
    fn is_constant(&self, i: usize) -> bool {
        matches!(
            &self.operands[i],
            OperandExec::Buffer { param: true, .. } | OperandExec::Prologue { constant: true, .. }
        )
    }

    fn vk(&self) -> Result<&VecKernels, String> {
        self.vk
            .as_ref()
            .ok_or_else(|| "the row kernels are not linked".to_string())
    }

    pub fn run(&self, l: &Launch) -> Result<(), String> {
        let results: Vec<Dense> = match &self.op {
            TemplateOp::Gemm(g) => self.gemm(g, l)?,
            TemplateOp::GroupedGemm { epilogue, .. } => vec![self.grouped_gemm(*epilogue, l)?],
            TemplateOp::QuantizeFp8 { rows, cols } => self.quantize(*rows, *cols, l)?,
            TemplateOp::DequantizeFp8 { rows, cols, to } => vec![self.dequantize(*rows, *cols, *to, l)?],
            TemplateOp::ScaledGemmFp8 { out, .. } => vec![self.scaled_gemm(*out, l)?],
            TemplateOp::RmsNormQuantFp8 { eps, residual, .. } => self.rms_norm_quant(*eps, *residual, l)?,
            TemplateOp::SwiGluQuantFp8 { .. } => self.swiglu_quant(l)?,
            TemplateOp::TopK { k, axis } => self.topk(*k, *axis, l)?,
            TemplateOp::ArgMax { axis } => self.argmax(*axis, l)?,
            TemplateOp::ScatterAdd { axis } => vec![self.scatter_add(*axis, l)?],
            _ => self.by_rows(l)?,
        };
        self.finish(results, l)?;
        match &self.op {
            TemplateOp::Gemm(Gemm { route: Some(r), .. }) => self.route_tail(r, l),
            _ => Ok(()),
        }
    }

    /// A GEMM's folded route (`ir::kernel::RouteTail`): the routing rows of result 0 as
    /// stored, through the standalone kernel's row kernel, into the last two outputs.
    fn route_tail(&self, r: &ir::kernel::RouteTail, l: &Launch) -> Result<(), String> {
        let vk = self.vk()?;
        let (view, dtype) = &self.outputs[0];
        let cv = ConcreteView::new(view, l.env)?;
        // SAFETY: the runtime hands the buffer the view was made for.
        let y = unsafe { read_view_f32(l.bufs[self.n_inputs].0, *dtype, &cv) };
        let n = *cv.shape.last().ok_or("a gemm result of rank 0")?;
        let (col, e) = (r.col as usize, r.experts as usize);
        if col + e > n {
            return Err(format!("route columns {col}..{} past the result's {n}", col + e));
        }
        // the standalone kernel's prologue: an f64 sigmoid rounded to f32
        let p: Vec<f32> = y
            .chunks(n)
            .flat_map(|row| row[col..col + e].iter())
            .map(|&x| {
                if r.sigmoid {
                    super::host::rj_sigmoid(f64::from(x)) as f32
                } else {
                    x
                }
            })
            .collect();
        let bias = match r.routing.biased {
            true => Some(self.operand(self.operands.len() - 1, l)?.1),
            false => None,
        };
        let (chosen, weights) =
            super::rows::route_topk(vk, &p, bias.as_deref().map(|b| b.as_slice()), e, &r.routing, l.par)?;
        let first = self.outputs.len() - 2;
        self.store_result(first, &Dense::F32(chosen), l)?;
        self.store_result(first + 1, &Dense::F32(weights), l)
    }

    fn finish(&self, mut results: Vec<Dense>, l: &Launch) -> Result<(), String> {
        if let Some(e) = &self.epilogue {
            let r = std::mem::replace(results.first_mut().ok_or("no result for the epilogue")?, Dense::Stored);
            let mut data = r.into_f32(self.outputs.first().map_or(DType::F32, |o| o.1));
            let mut bufs: Vec<BufPtr> = l.bufs.to_vec();
            bufs.push(BufPtr(data.as_mut_ptr() as *mut u8));
            return e.call(&bufs, l.syms, l.env, l.par);
        }
        // a folded route's outputs are written after these (`route_tail`)
        let n = match &self.op {
            TemplateOp::Gemm(g) => g.product_outputs(self.outputs.len()),
            _ => self.outputs.len(),
        };
        for o in 0..n {
            let r = results.get(o).ok_or_else(|| format!("{}: no result {o}", self.name))?;
            self.store_result(o, r, l)?;
        }
        Ok(())
    }

    /// Writes result `r` through output `o`'s view.
    fn store_result(&self, o: usize, r: &Dense, l: &Launch) -> Result<(), String> {
        let (view, dtype) = &self.outputs[o];
        let cv = ConcreteView::new(view, l.env)?;
        if let Some(n) = r.len(*dtype) {
            if cv.numel() != n {
                return Err(format!("result {o} has {n} elements for a view of {}", cv.numel()));
            }
        }
        let p = l.bufs[self.n_inputs + o].0;
        let size = dtype.size_bytes();
        // SAFETY: the runtime hands the buffer the view was made for.
        unsafe {
            // storage-format results into a dense view: one copy
            let dense = dense_offset(&cv).map(|off| p.add(off * size));
            match (r, dense) {
                (Dense::Raw(b), Some(d)) => {
                    std::ptr::copy_nonoverlapping(b.as_ptr(), d, b.len());
                    return Ok(());
                }
                (Dense::F32(v), Some(d)) if *dtype == DType::F32 => {
                    std::ptr::copy_nonoverlapping(v.as_ptr(), d as *mut f32, v.len());
                    return Ok(());
                }
                _ => {}
            }
            match r {
                Dense::F32(v) => write_view(p, *dtype, &cv, |i| f64::from(v[i])),
                Dense::I64(v) if dtype.is_float() => write_view(p, *dtype, &cv, |i| v[i] as f64),
                Dense::I64(v) => cv.for_each(|lin, a| match dtype {
                    DType::I64 => *(p as *mut i64).add(a) = v[lin],
                    DType::I32 => *(p as *mut i32).add(a) = v[lin] as i32,
                    _ => store_elem(p, *dtype, a, v[lin] as f64),
                }),
                Dense::Raw(b) => {
                    cv.for_each(|lin, a| {
                        std::ptr::copy_nonoverlapping(b.as_ptr().add(lin * size), p.add(a * size), size)
                    });
                }
                Dense::Stored => {}
            }
        }
        Ok(())
    }

    /// `QuantizeFp8 { rows, cols }`; a parameter's quantisation is computed once per plan.
    fn quantize(&self, rows: usize, cols: usize, l: &Launch) -> Result<Vec<Dense>, String> {
        let vk = self.vk()?;
        let cached = self.quantized.lock().map_err(|e| e.to_string())?.clone();
        if let Some((q, s)) = cached {
            return Ok(vec![Dense::Raw(q), Dense::F32(s.as_ref().clone())]);
        }
        let (shape, x, _) = self.operand(0, l)?;
        let r = shape.len();
        if r < 2 {
            return Err(format!("quantize_fp8 needs a tensor of rank >= 2, got shape {shape:?}"));
        }
        let (batch, rr, c): (usize, usize, usize) = (shape[..r - 2].iter().product(), shape[r - 2], shape[r - 1]);
        let n_s = batch * rr.div_ceil(rows.max(1)) * c.div_ceil(cols.max(1));
        if self.is_constant(0) {
            let (mut q, mut s) = (vec![0u8; x.len()], vec![0f32; n_s]);
            super::quant::quantize(vk, &x, (batch, rr, c), (rows, cols), &mut q, &mut s, l.par)?;
            let (q, s) = (Arc::new(q), Arc::new(s));
            *self.quantized.lock().map_err(|e| e.to_string())? = Some((q.clone(), s.clone()));
            return Ok(vec![Dense::Raw(q), Dense::F32(s.as_ref().clone())]);
        }
        let mut q = self.out_buf::<u8>(0, x.len(), l)?;
        let mut s = self.out_buf::<f32>(1, n_s, l)?;
        super::quant::quantize(vk, &x, (batch, rr, c), (rows, cols), q.slice(), s.slice(), l.par)?;
        Ok(vec![Self::byte_result(q), Self::f32_result(s)])
    }

    /// `DequantizeFp8 { rows, cols, to }`.
    fn dequantize(&self, rows: usize, cols: usize, to: DType, l: &Launch) -> Result<Dense, String> {
        let vk = self.vk()?;
        let (shape, q) = self.operand_bytes(0, l)?;
        let (_, s, _) = self.operand(1, l)?;
        let r = shape.len();
        if r < 2 {
            return Err(format!(
                "dequantize_fp8 needs a tensor of rank >= 2, got shape {shape:?}"
            ));
        }
        let dims = (shape[..r - 2].iter().product(), shape[r - 2], shape[r - 1]);
        if !to.is_float() {
            return Err(format!("dequantize_fp8 to {to}: the result must be a float"));
        }
        let mut y = if to == DType::F32 {
            self.out_buf::<f32>(0, q.len(), l)?
        } else {
            OutBuf::Staged(vec![0f32; q.len()])
        };
        super::quant::dequantize(vk, (&q, &s), dims, (rows, cols), to, y.slice(), l.par)?;
        Ok(Self::f32_result(y))
    }

    /// `ScaledGemmFp8`: `a_q [.., M, K]`, `a_s [.., M, K/128]`, `b_q [K, N]`, `b_s [K/128, N/128]`.
    fn scaled_gemm(&self, out: DType, l: &Launch) -> Result<Dense, String> {
        let (gk, vk) = (self.kernels.ok_or("the GEMM kernels are not linked")?, self.vk()?);
        let (sa, aq) = self.operand_bytes(0, l)?;
        let (ss, a_s, _) = self.operand(1, l)?;
        let (_, b_s, _) = self.operand(3, l)?;
        let ra = sa.len();
        if ra < 2 {
            return Err(format!("scaled_matmul_fp8 of a_q {sa:?}"));
        }
        let k = sa[ra - 1];
        let rows = aq.len() / k.max(1);
        let mut want_s = sa.clone();
        want_s[ra - 1] = k.div_ceil(super::gemm::FP8_BLOCK);
        if ss != want_s {
            return Err(format!(
                "scaled_matmul_fp8: a's scales {ss:?} are not its 1x128 blocks' (expected {want_s:?})"
            ));
        }
        // B in place through its view when it is a buffer, else its bytes row-major
        let owned;
        let (bq, base, rs, cs, kb, n) = match &self.operands[2] {
            OperandExec::Buffer { input, view, dtype, .. } if *dtype == DType::F8E4M3 && view.rank() == 2 => {
                let cv = ConcreteView::new(view, l.env)?;
                let (rs, cs) = (cv.strides[0], cv.strides[1]);
                let (kk, n) = (cv.shape[0], cv.shape[1]);
                if cv.offset < 0 || rs < 0 || cs < 0 {
                    return Err("scaled_matmul_fp8: a negative stride of b".into());
                }
                let last = cv.offset as usize + kk.saturating_sub(1) * rs as usize + n.saturating_sub(1) * cs as usize;
                let len = if kk * n == 0 { 0 } else { last + 1 };
                // SAFETY: every element of the view lies in the buffer the runtime hands us.
                let q = unsafe { std::slice::from_raw_parts(l.bufs[*input].0 as *const u8, len) };
                (q, cv.offset as usize, rs as usize, cs as usize, kk, n)
            }
            _ => {
                let (sb, b) = self.operand_bytes(2, l)?;
                if sb.len() != 2 {
                    return Err(format!("scaled_matmul_fp8 of b_q {sb:?}"));
                }
                owned = b.into_owned();
                (&owned[..], 0, sb[1], 1, sb[0], sb[1])
            }
        };
        if kb != k {
            return Err(format!("scaled_matmul_fp8 of a_q {sa:?} and b_q [{kb}, {n}]"));
        }
        let b = Fp8Mat {
            q: bq,
            base,
            rs,
            cs,
            scales: &b_s,
            scale_cols: n.div_ceil(super::gemm::FP8_BLOCK),
        };
        let mut c = vec![0f32; rows * n];
        super::quant::scaled_gemm(gk, vk, (&aq, &a_s), b, (rows, n, k), &mut c, l.par)?;
        round_all(&mut c, out);
        Ok(Dense::F32(c))
    }

    /// `RmsNormQuantFp8` (with the residual add first when `residual`): outputs
    /// `([sum,] q, scales)`.
    fn rms_norm_quant(&self, eps: f64, residual: bool, l: &Launch) -> Result<Vec<Dense>, String> {
        let vk = self.vk()?;
        let (sh, h, hdt) = self.operand(0, l)?;
        let d = sh.last().copied().unwrap_or(0);
        let tiles = h.len() / d.max(1) * d.div_ceil(super::gemm::FP8_BLOCK);
        let (a, (_, w, wdt)) = if residual {
            (Some(self.operand(1, l)?.1), self.operand(2, l)?)
        } else {
            (None, self.operand(1, l)?)
        };
        let normed = DType::promote(hdt, wdt)
            .filter(|d| d.is_float())
            .ok_or("rms_norm_quant_fp8 of non-floats")?;
        let qi = usize::from(residual);
        let mut sum = if residual {
            let sum_dt = self.outputs[0].1;
            Some((sum_dt, self.out_buf_f32_rounded(0, h.len(), l)?))
        } else {
            None
        };
        let norm_dt = sum.as_ref().map_or(hdt, |s| s.0);
        let mut q = self.out_buf::<u8>(qi, h.len(), l)?;
        let mut s = self.out_buf::<f32>(qi + 1, tiles, l)?;
        super::quant::rms_norm_quant(
            vk,
            (&h, a.as_deref().map(|a| a.as_slice()), &w),
            d,
            eps,
            (norm_dt, normed),
            sum.as_mut().map(|s| s.1.slice()),
            q.slice(),
            s.slice(),
            l.par,
        )?;
        let mut out = Vec::new();
        if let Some((_, sb)) = sum {
            out.push(Self::f32_result(sb));
        }
        out.push(Self::byte_result(q));
        out.push(Self::f32_result(s));
        Ok(out)
    }

    /// An f32 output written directly when it is f32 and dense, else staged (values already
    /// rounded to its dtype, which the store keeps).
    fn out_buf_f32_rounded(&self, o: usize, numel: usize, l: &Launch) -> Result<OutBuf<f32>, String> {
        if self.outputs[o].1 == DType::F32 {
            self.out_buf::<f32>(o, numel, l)
        } else {
            Ok(OutBuf::Staged(vec![0f32; numel]))
        }
    }

    /// `SwiGluQuantFp8`: outputs `(q, scales)`.
    fn swiglu_quant(&self, l: &Launch) -> Result<Vec<Dense>, String> {
        let vk = self.vk()?;
        let (sg, g, gdt) = self.operand(0, l)?;
        let (su, u, udt) = self.operand(1, l)?;
        if sg != su {
            return Err(format!("swiglu_quant_fp8 of {sg:?} and {su:?}"));
        }
        let ydt = DType::promote(gdt, udt)
            .filter(|d| d.is_float())
            .ok_or("swiglu_quant_fp8 of non-floats")?;
        let d = sg.last().copied().unwrap_or(0);
        let tiles = g.len() / d.max(1) * d.div_ceil(super::gemm::FP8_BLOCK);
        let mut q = self.out_buf::<u8>(0, g.len(), l)?;
        let mut s = self.out_buf::<f32>(1, tiles, l)?;
        super::quant::swiglu_quant(vk, (&g, &u), d, (gdt, ydt), q.slice(), s.slice(), l.par)?;
        Ok(vec![Self::byte_result(q), Self::f32_result(s)])
    }

    /// `(pre, n, post)` around `axis` of `shape`.
    fn around(shape: &[usize], axis: usize) -> Result<(usize, usize, usize), String> {
        if axis >= shape.len() {
            return Err(format!("axis {axis} is out of range for rank {}", shape.len()));
        }
        Ok((
            shape[..axis].iter().product(),
            shape[axis],
            shape[axis + 1..].iter().product(),
        ))
    }

    /// `TopK { k, axis }`: (values, i64 indices).
    fn topk(&self, k: usize, axis: usize, l: &Launch) -> Result<Vec<Dense>, String> {
        let vk = *self.vk()?;
        let mut ids = vec![0i64; 0];
        let dims;
        let values = match self.operand_dtype(0) {
            Some(d) if d.is_float() => {
                let (shape, x, _) = self.operand(0, l)?;
                dims = Self::around(&shape, axis)?;
                ids.resize(dims.0 * k * dims.2, 0);
                let mut vals = vec![0f32; ids.len()];
                let select = move |n: usize, v: *const f32, t: *mut u8| unsafe { (vk.argmax)(n as i64, v, t) };
                super::select::topk(&x, dims, k, &select, Some(&mut vals), &mut ids, l.par)?;
                Dense::F32(vals)
            }
            _ => {
                let (shape, x) = self.operand_i64(0, l)?;
                dims = Self::around(&shape, axis)?;
                ids.resize(dims.0 * k * dims.2, 0);
                let mut vals = vec![0i64; ids.len()];
                let select = move |n: usize, v: *const i64, t: *mut u8| unsafe { (vk.argmax_i64)(n as i64, v, t) };
                super::select::topk(&x, dims, k, &select, Some(&mut vals), &mut ids, l.par)?;
                Dense::I64(vals)
            }
        };
        Ok(vec![values, Dense::I64(ids)])
    }

    /// `ArgMax { axis }`: the first index of the greatest value along the axis (removed).
    fn argmax(&self, axis: usize, l: &Launch) -> Result<Vec<Dense>, String> {
        let vk = *self.vk()?;
        let float = self.operand_dtype(0).is_some_and(|d| d.is_float());
        let (xf, xi, shape) = if float {
            let (s, x, _) = self.operand(0, l)?;
            (Some(x), None, s)
        } else {
            let (s, x) = self.operand_i64(0, l)?;
            (None, Some(x), s)
        };
        let (pre, n, post) = Self::around(&shape, axis)?;
        if n == 0 && pre * post > 0 {
            return Err("argmax over an empty axis".into());
        }
        let mut ids = vec![0i64; pre * post];
        if let Some(x) = xf {
            let select = move |n: usize, v: *const f32, t: *mut u8| unsafe { (vk.argmax)(n as i64, v, t) };
            super::select::topk(&x, (pre, n, post), 1.min(n), &select, None, &mut ids, l.par)?;
        } else if let Some(x) = xi {
            let select = move |n: usize, v: *const i64, t: *mut u8| unsafe { (vk.argmax_i64)(n as i64, v, t) };
            super::select::topk(&x, (pre, n, post), 1.min(n), &select, None, &mut ids, l.par)?;
        }
        Ok(vec![Dense::I64(ids)])
    }

    /// `ScatterAdd { axis }`: `x` with `src` added at `idx` along the axis.
    fn scatter_add(&self, axis: usize, l: &Launch) -> Result<Dense, String> {
        let vk = *self.vk()?;
        let (si, idx) = self.operand_i64(1, l)?;
        let xdt = self.operand_dtype(0).ok_or("scatter-add without x")?;
        let sdt = self.operand_dtype(2).ok_or("scatter-add without a source")?;
        let shape_x = match &self.operands[0] {
            OperandExec::Buffer { view, .. } => eval_shape(&view.shape, l.env)?,
            OperandExec::Prologue { domain, .. } => eval_shape(domain, l.env)?,
        };
        let (pre, n, post) = Self::around(&shape_x, axis)?;
        let agree = si.len() == shape_x.len()
            && shape_x
                .iter()
                .zip(&si)
                .enumerate()
                .all(|(i, (a, b))| i == axis || a == b);
        if !agree {
            return Err(format!("indices {si:?} do not fit {shape_x:?} along axis {axis}"));
        }
        let m = si[axis];
        if xdt.is_float() && sdt.is_float() {
            let (_, x, _) = self.operand(0, l)?;
            let (ss, src, _) = self.operand(2, l)?;
            if ss != si {
                return Err(format!("scatter source {ss:?} must have the indices' shape"));
            }
            let mut acc: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            let scatter = move |m: usize, i: *const i64, s: *const f32, a: *mut f64, post: usize, n: usize| unsafe {
                (vk.scatter_f64)(m as i64, i, s, a, post as i64, n as i64)
            };
            super::select::scatter_add(&mut acc, &idx, &src, (pre, n, m, post), axis, &scatter, l.par)?;
            // one rounding: to f32, then to x's dtype
            Ok(Dense::F32(acc.iter().map(|&v| xdt.round(v as f32)).collect()))
        } else if !xdt.is_float() && !sdt.is_float() {
            let (_, mut acc) = self.operand_i64(0, l)?;
            let (ss, src) = self.operand_i64(2, l)?;
            if ss != si {
                return Err(format!("scatter source {ss:?} must have the indices' shape"));
            }
            let scatter = move |m: usize, i: *const i64, s: *const i64, a: *mut i64, post: usize, n: usize| unsafe {
                (vk.scatter_i64)(m as i64, i, s, a, post as i64, n as i64)
            };
            super::select::scatter_add(&mut acc, &idx, &src, (pre, n, m, post), axis, &scatter, l.par)?;
            Ok(Dense::I64(acc))
        } else {
            Err(format!("scatter-add is not defined on {xdt} and {sdt}"))
        }
    }

    /// `Gemm`, with a folded RMSNorm of A's rows first (`RowNorm`): the normalised rows are
    /// the GEMM's A, and its second result when the kernel stores them.
    fn gemm(&self, g: &Gemm, l: &Launch) -> Result<Vec<Dense>, String> {
        let micro = self.kernels.ok_or("the GEMM kernels are not linked")?;
        let (sa, a, adt) = self.operand(0, l)?;
        let normed = match g.norm {
            Some(r) => Some(norm_rows(&a, &self.operand(2, l)?.1, r, adt)?),
            None => None,
        };
        let a: &[f32] = normed.as_deref().unwrap_or(&a);
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
                    data: a,
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
        let mut out = vec![Dense::F32(c)];
        if let Some(n) = normed.filter(|_| self.epilogue.is_none() && g.product_outputs(self.outputs.len()) > 1) {
            out.push(Dense::F32(n));
        }
        Ok(out)
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
            GroupedEpilogue::WeightedCombine | GroupedEpilogue::CombineShared => sw2[0],
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
                // each expert's results at `at[e]`: gate m×I, then up m×I
                let row = |t: usize, _| &x[t * d..(t + 1) * d];
                let mats = |e| [wt(w1.as_slice(), e, inter, d), wt(w2.as_slice(), e, inter, d)];
                let (at, c) = expert_gemms(micro, &rows, (d, inter), row, mats, l.par);
                for (e, rs) in rows.iter().enumerate() {
                    let (m, c) = (rs.len(), &c[at[e]..]);
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
                Ok(Dense::F32(h))
            }
            GroupedEpilogue::WeightedCombine | GroupedEpilogue::CombineShared => {
                // h [.., K, I], weights [.., K] f32, w_down [E, D, I]: Σ_k w_k · (h_k · W_downᵀ)
                let weights = &w1;
                let (d, inter) = (sw2[1], sw2[2]);
                let hdt = xdt;
                let prod_dt = DType::promote(hdt, w2dt).unwrap_or(DType::F32);
                let mut y = vec![0f64; tokens * d];
                // each expert's results at `at[e]`, m×D
                let row = |t: usize, s: usize| &x[(t * top_k + s) * inter..(t * top_k + s + 1) * inter];
                let mats = |e| [wt(w2.as_slice(), e, d, inter)];
                let (at, c) = expert_gemms(micro, &rows, (inter, d), row, mats, l.par);
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
                            let p = prod_dt.round(c[at[e] + r * d + j]);
                            y[t * d + j] += f64::from(w * p);
                        }
                    }
                }
                let mut y: Vec<f32> = y.iter().map(|&v| v as f32).collect();
                if epi == GroupedEpilogue::CombineShared {
                    // + hs [.., Is] · bs [Is, D], rounded to its matmul's dtype, added in f32
                    let (shs, hs, hsdt) = self.operand(4, l)?;
                    let (sbs, bs, bsdt) = self.operand(5, l)?;
                    let is = *shs.last().ok_or("shared activations without dims")?;
                    if sbs != [is, d] || hs.len() != tokens * is {
                        return Err(format!(
                            "grouped_gemm: shared {shs:?} · {sbs:?} does not fit {d} outputs"
                        ));
                    }
                    let sdt = DType::promote(hsdt, bsdt).unwrap_or(DType::F32);
                    let all: Vec<Vec<(usize, usize)>> = vec![(0..tokens).map(|t| (t, 0)).collect()];
                    let row = |t: usize, _| &hs[t * is..(t + 1) * is];
                    let mats = |_| {
                        [MatRef {
                            data: bs.as_slice(),
                            base: 0,
                            rs: d,
                            cs: 1,
                        }]
                    };
                    let (_, c) = expert_gemms(micro, &all, (is, d), row, mats, l.par);
                    for (v, p) in y.iter_mut().zip(&c) {
                        *v += sdt.round(*p);
                    }
                }
                Ok(Dense::F32(y))
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
                vec![Dense::F32(y)]
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
                vec![Dense::F32(s), Dense::F32(y)]
            }
            TemplateOp::Softmax { .. } => {
                let (sx, x, _) = self.operand(0, l)?;
                let mut y = zeros(x.len());
                rows::softmax(vk, &x, last(&sx), &mut y, l.par)?;
                round_all(&mut y, out_dt);
                vec![Dense::F32(y)]
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
                vec![Dense::F32(y)]
            }
            TemplateOp::GroupNormGate { groups, eps, .. } => {
                let (_, o, _) = self.operand(0, l)?;
                let (_, w, _) = self.operand(1, l)?;
                let (_, g, _) = self.operand(2, l)?;
                let mut y = zeros(g.len());
                rows::group_norm_gate(vk, (&o, &w, &g), *groups, *eps, &mut y, l.par)?;
                vec![Dense::F32(y)]
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
                vec![Dense::F32(y)]
            }
            TemplateOp::LinearAttnChunk { gate, .. } | TemplateOp::LinearAttnStep { gate, .. } => {
                let (_, s0, _) = self.operand(0, l)?;
                let (sq, mut q, _) = self.operand(1, l)?;
                let (_, mut k, _) = self.operand(2, l)?;
                let (_, v, _) = self.operand(3, l)?;
                let (_, lam, _) = self.operand(4, l)?;
                let &[b, t, h, d] = sq.as_slice() else {
                    return Err(format!("linear attention of q {sq:?}"));
                };
                // q and k normed and rotated first, as `QkNormRope` of each (q then scaled)
                if let TemplateOp::LinearAttnStep { qk: Some(p), .. } = &self.op {
                    let (_, pos, _) = self.operand_exact(9, l)?;
                    let (_, inv, _) = self.operand(10, l)?;
                    for (x, w_slot, scale) in [(&mut q, 7, p.scale as f32), (&mut k, 8, 1.0)] {
                        let (_, w, _) = self.operand(w_slot, l)?;
                        let mut y = zeros(x.len());
                        let dts = (DType::F32, DType::F32);
                        rows::qk_norm_rope(vk, (x, &w, &pos, &inv), (t, h, d), p.eps, dts, &mut y, l.par)?;
                        y.iter_mut().for_each(|e| *e *= scale);
                        *x = y.into();
                    }
                }
                let (mut s, mut o) = (zeros(s0.len()), zeros(q.len()));
                rows::linear_attn(vk, [&s0, &q, &k, &v, &lam], (b, t, h, d), &mut s, &mut o, l.par)?;
                match gate {
                    None => vec![Dense::F32(s), Dense::F32(o)],
                    // the folded group norm and gate: the same row kernel, on o still in memory
                    Some(gn) => {
                        let (_, w, _) = self.operand(5, l)?;
                        let (_, g, _) = self.operand(6, l)?;
                        let mut y = zeros(g.len());
                        rows::group_norm_gate(vk, (&o, &w, &g), gn.groups, gn.eps, &mut y, l.par)?;
                        vec![Dense::F32(s), Dense::F32(y)]
                    }
                }
            }
            TemplateOp::RouteTopK { routing, .. } => {
                let (sp, p, _) = self.operand(0, l)?;
                let bias = if routing.biased {
                    Some(self.operand(1, l)?.1)
                } else {
                    None
                };
                let (chosen, weights) =
                    rows::route_topk(vk, &p, bias.as_deref().map(|b| b.as_slice()), last(&sp), routing, l.par)?;
                vec![Dense::F32(chosen), Dense::F32(weights)]
            }
            op => return Err(format!("{} is not generated", op.name())),
        })
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

/// The expert GEMMs of a grouped kernel: each expert's routed rows (`rows[e]`, row `(t, s)`
/// read by `row`, `k` wide) gathered and multiplied by each of its matrices (`mats(e)`, `k × n`),
/// every expert with the same number of rows in one GEMM call (in decode every chosen expert has
/// one row: one parallel pass). Returns where each expert's results start and the results: an
/// expert's `m × n` blocks, one per matrix, one after the other.
fn expert_gemms<'w, const M: usize>(
    micro: GemmKernels,
    rows: &[Vec<(usize, usize)>],
    (k, n): (usize, usize),
    row: impl Fn(usize, usize) -> &'w [f32],
    mats: impl Fn(usize) -> [MatRef<'w>; M],
    par: &dyn ParFor,
) -> (Vec<usize>, Vec<f32>) {
    let gathered: Vec<Vec<f32>> = rows
        .iter()
        .map(|rs| rs.iter().flat_map(|&(t, s)| row(t, s).iter().copied()).collect())
        .collect();
    let mut at = Vec::with_capacity(rows.len());
    let mut total = 0;
    for rs in rows {
        at.push(total);
        total += rs.len() * M * n;
    }
    let mut by_count = std::collections::BTreeMap::<usize, Vec<usize>>::new();
    for (e, rs) in rows.iter().enumerate().filter(|(_, rs)| !rs.is_empty()) {
        by_count.entry(rs.len()).or_default().push(e);
    }
    let mut c = vec![0f32; total];
    for (m, es) in by_count {
        let jobs: Vec<_> = es
            .iter()
            .flat_map(|&e| {
                let a = MatRef {
                    data: &gathered[e],
                    base: 0,
                    rs: k,
                    cs: 1,
                };
                let at = at[e];
                mats(e)
                    .into_iter()
                    .enumerate()
                    .map(move |(j, b)| (a, b, at + j * m * n))
            })
            .collect();
        gemm_batched(micro, &jobs, &mut c, (m, n, k), par);
    }
    (at, c)
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

/// The rows of `x` (rows of `w.len()` values, stored as `xdt`) normalised as `RowNorm` says:
/// `round(round(x · r, xdt) · w, r.dtype)` with `r = 1 / sqrt(mean(x²) + eps)` (f64 sums).
fn norm_rows(x: &[f32], w: &[f32], r: ir::kernel::RowNorm, xdt: DType) -> Result<Vec<f32>, String> {
    let d = w.len();
    if d == 0 || !x.len().is_multiple_of(d) {
        return Err(format!("row norm: {} values in rows of {d}", x.len()));
    }
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + r.eps).sqrt();
        for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            let normed = xdt.round((f64::from(xv) * inv) as f32);
            *yv = r.dtype.round(normed * wv);
        }
    }
    Ok(y)
}
