//! Loop nests and scalar expression DAGs → Cranelift IR.
//!
//! One compiled function evaluates an [`ExprGraph`] at every index of a domain and stores
//! values through views: a loop kernel, a template's prologue (into a dense f32 buffer) or its
//! epilogue (reading the template's dense result). Values are computed in f64 and every node
//! is rounded to its dtype as `ir::kernel_eval` does (f32 nodes through an f32 round trip, bf16
//! with round-to-nearest-even on the bits), so the compiled kernel agrees with the oracle to the
//! last bit of the stored dtype in all but the transcendental-heavy cases.
//!
//! The function has the CPU kernel signature of docs/kernel-abi.md. `[begin, end)` ranges over
//! the flattened first `par` domain axes; the remaining axes are inner loops. Reductions depend
//! only on the first `LoopKernel::outer` axes (= `par` whenever there is one), so each is computed
//! once per parallel index, before the inner loops.

use super::host::helper_fns;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, AbiParam, FuncRef, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::JITModule;
use cranelift_module::{FuncId, Linkage, Module};
use ir::kernel::{ExprGraph, ExprId, IndexExpr, IndexVar, ScalarOp, View};
use ir::op::{BinaryOp, ReduceOp, UnaryOp};
use ir::shape::Dim;
use ir::DType;
use std::collections::HashMap;

/// Where `ScalarOp::Load { input: i, .. }` reads: pointer slot, view and buffer dtype.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    pub slot: usize,
    pub view: View,
    pub dtype: DType,
}

/// A stored value: `expr` written through `view` into the buffer at pointer `slot`.
#[derive(Clone, Debug)]
pub(crate) struct Sink {
    pub slot: usize,
    pub view: View,
    pub dtype: DType,
    pub expr: ExprId,
}

/// What one generated function computes.
pub(crate) struct LoopSpec<'a> {
    pub domain: &'a [Dim],
    /// The leading domain axes flattened into the parallel extent.
    pub par: usize,
    pub exprs: &'a ExprGraph,
    pub sources: Vec<Source>,
    /// Pointer slot of the template's dense f32 result over `domain` (epilogues).
    pub result_slot: Option<usize>,
    pub sinks: Vec<Sink>,
}

/// The JIT module of one plan and the state shared by its functions.
pub(crate) struct Jit {
    pub module: JITModule,
    helpers: HashMap<&'static str, FuncId>,
    pub(crate) fbc: FunctionBuilderContext,
    pub has_fma: bool,
}

pub(crate) fn kernel_signature(module: &JITModule) -> cranelift_codegen::ir::Signature {
    let ptr = module.target_config().pointer_type();
    let mut sig = module.make_signature();
    for t in [ptr, ptr, ptr, types::I64, types::I64] {
        sig.params.push(AbiParam::new(t));
    }
    sig
}

impl Jit {
    pub fn new() -> Result<Jit, String> {
        use cranelift_codegen::settings::{self, Configurable};
        let mut flags = settings::builder();
        let set =
            |f: &mut settings::Builder, k: &str, v: &str| f.set(k, v).map_err(|e| format!("cranelift flag {k}: {e}"));
        set(&mut flags, "opt_level", "speed")?;
        set(&mut flags, "use_colocated_libcalls", "false")?;
        set(&mut flags, "is_pic", "false")?;
        let isa_builder = cranelift_native::builder().map_err(|e| format!("cranelift: host not supported: {e}"))?;
        let isa = isa_builder
            .finish(settings::Flags::new(flags))
            .map_err(|e| format!("cranelift: {e}"))?;
        let has_fma = isa
            .isa_flags()
            .iter()
            .any(|f| f.name == "has_fma" && f.as_bool() == Some(true));
        let mut jb = cranelift_jit::JITBuilder::with_isa(isa, cranelift_module::default_libcall_names());
        let fns = helper_fns();
        for h in &fns {
            jb.symbol(h.name, h.addr);
        }
        let mut module = JITModule::new(jb);
        let mut helpers = HashMap::new();
        for h in &fns {
            let mut sig = module.make_signature();
            for &f in h.params {
                sig.params.push(AbiParam::new(if f { types::F64 } else { types::I32 }));
            }
            sig.returns
                .push(AbiParam::new(if h.ret_f64 { types::F64 } else { types::I32 }));
            let id = module
                .declare_function(h.name, Linkage::Import, &sig)
                .map_err(|e| e.to_string())?;
            helpers.insert(h.name, id);
        }
        Ok(Jit {
            module,
            helpers,
            fbc: FunctionBuilderContext::new(),
            has_fma,
        })
    }

    /// Declares a local function `name` of signature `sig` and returns its id with a fresh
    /// context holding the signature, ready for a `FunctionBuilder`. Errors name the function.
    pub(crate) fn declare_local(
        &mut self,
        name: &str,
        sig: cranelift_codegen::ir::Signature,
    ) -> Result<(FuncId, cranelift_codegen::Context), String> {
        let id = self
            .module
            .declare_function(name, Linkage::Local, &sig)
            .map_err(|e| format!("{name}: {e}"))?;
        let mut ctx = self.module.make_context();
        ctx.func.signature = sig;
        Ok((id, ctx))
    }

    /// Defines function `id` from its built context (the end of every hand-built function);
    /// a Cranelift error names the function.
    pub(crate) fn define_local(
        &mut self,
        name: &str,
        id: FuncId,
        mut ctx: cranelift_codegen::Context,
    ) -> Result<FuncId, String> {
        self.module
            .define_function(id, &mut ctx)
            .map_err(|e| format!("{name}: cranelift: {}", describe(&e)))?;
        self.module.clear_context(&mut ctx);
        Ok(id)
    }

    /// Compiles `spec` into a function named `name` (a kernel name, or a kernel name with a
    /// suffix for a template's fusions). Errors name the function.
    pub fn compile_loop(&mut self, name: &str, spec: &LoopSpec, symbols: &[String]) -> Result<FuncId, String> {
        let sig = kernel_signature(&self.module);
        let (id, mut ctx) = self.declare_local(name, sig)?;
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut self.fbc);
            let mut refs = HashMap::new();
            for (n, fid) in &self.helpers {
                refs.insert(*n, self.module.declare_func_in_func(*fid, b.func));
            }
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let p = b.block_params(entry).to_vec();
            let trusted = MemFlagsData::trusted();
            let plain = MemFlagsData::new();
            let ptr_ty = self.module.target_config().pointer_type();
            let mut syms = HashMap::new();
            for (i, s) in symbols.iter().enumerate() {
                let v = b.ins().load(types::I64, trusted, p[1], (i * 8) as i32);
                syms.insert(s.clone(), v);
            }
            let n_slots = spec
                .sources
                .iter()
                .map(|s| s.slot + 1)
                .chain(spec.sinks.iter().map(|s| s.slot + 1))
                .chain(spec.result_slot.map(|s| s + 1))
                .max()
                .unwrap_or(0);
            let mut ptrs = Vec::new();
            for i in 0..n_slots {
                ptrs.push(b.ins().load(ptr_ty, trusted, p[0], (i * 8) as i32));
            }
            let mut e = Emitter {
                b,
                spec,
                trusted,
                plain,
                syms,
                ptrs,
                refs,
                vars: HashMap::new(),
                extents: HashMap::new(),
                cache: HashMap::new(),
            };
            e.body(p[3], p[4])?;
            e.b.ins().return_(&[]);
            e.b.seal_all_blocks();
            e.b.finalize(self.module.target_config());
        }
        self.define_local(name, id, ctx)
    }
}

/// A module error with the verifier's detail when there is one.
pub(crate) fn describe(e: &cranelift_module::ModuleError) -> String {
    match e {
        cranelift_module::ModuleError::Compilation(c) => format!("{c:?}"),
        other => other.to_string(),
    }
}

struct Emitter<'a, 'b> {
    b: FunctionBuilder<'b>,
    spec: &'a LoopSpec<'a>,
    /// aligned, non-trapping accesses (every buffer element and argument slot)
    trusted: MemFlagsData,
    plain: MemFlagsData,
    syms: HashMap<String, Value>,
    ptrs: Vec<Value>,
    refs: HashMap<&'static str, FuncRef>,
    /// loop variables (i64) in scope
    vars: HashMap<u32, Value>,
    /// each loop variable's extent, for proving loads in range
    extents: HashMap<u32, Dim>,
    /// expressions already computed in the current block scope
    cache: HashMap<ExprId, Value>,
}

type R<T> = Result<T, String>;

impl Emitter<'_, '_> {
    fn iconst(&mut self, v: i64) -> Value {
        self.b.ins().iconst(types::I64, v)
    }

    fn fconst(&mut self, v: f64) -> Value {
        self.b.ins().f64const(v)
    }

    /// A dim's value (i64) from the symbol values.
    fn dim(&mut self, d: &Dim) -> R<Value> {
        let mut total: Option<Value> = None;
        let monos: Vec<(Vec<String>, i64)> = d.terms().map(|(m, c)| (m.to_vec(), c)).collect();
        for (m, c) in monos {
            let mut t = self.iconst(c);
            for s in &m {
                let v = *self
                    .syms
                    .get(s)
                    .ok_or_else(|| format!("dim symbol `{s}` is not a plan symbol"))?;
                t = self.b.ins().imul(t, v);
            }
            total = Some(match total {
                Some(x) => self.b.ins().iadd(x, t),
                None => t,
            });
        }
        Ok(match total {
            Some(t) => t,
            None => self.iconst(0),
        })
    }

    fn call(&mut self, name: &'static str, args: &[Value]) -> Value {
        let f = self.refs[name];
        let c = self.b.ins().call(f, args);
        self.b.inst_results(c)[0]
    }

    /// `for i in lo..hi { f(i) }`
    fn for_range(&mut self, lo: Value, hi: Value, f: &mut dyn FnMut(&mut Self, Value) -> R<()>) -> R<()> {
        let header = self.b.create_block();
        let body = self.b.create_block();
        let exit = self.b.create_block();
        let i = self.b.append_block_param(header, types::I64);
        self.b.ins().jump(header, &[lo.into()]);
        self.b.switch_to_block(header);
        let go = self.b.ins().icmp(IntCC::SignedLessThan, i, hi);
        self.b.ins().brif(go, body, &[], exit, &[]);
        self.b.switch_to_block(body);
        let saved = self.cache.clone();
        f(self, i)?;
        self.cache = saved;
        let next = self.b.ins().iadd_imm_s(i, 1);
        self.b.ins().jump(header, &[next.into()]);
        self.b.switch_to_block(exit);
        Ok(())
    }

    fn body(&mut self, begin: Value, end: Value) -> R<()> {
        let spec = self.spec;
        for (a, d) in spec.domain.iter().enumerate() {
            self.extents.insert(a as u32, d.clone());
        }
        self.for_range(begin, end, &mut |s, flat| {
            // decode the parallel index into the leading axes, innermost fastest
            let mut rest = flat;
            for a in (0..spec.par).rev() {
                if a == 0 {
                    s.vars.insert(0, rest);
                } else {
                    let n = s.dim(&spec.domain[a])?;
                    let i = s.b.ins().srem(rest, n);
                    rest = s.b.ins().sdiv(rest, n);
                    s.vars.insert(a as u32, i);
                }
            }
            // reductions, once per parallel index (topological order: nested ones first)
            for (i, n) in spec.exprs.nodes.iter().enumerate() {
                if matches!(n.op, ScalarOp::Reduce { .. }) {
                    s.expr(ExprId(i as u32))?;
                }
            }
            s.inner(spec.par)
        })
    }

    fn inner(&mut self, axis: usize) -> R<()> {
        let spec = self.spec;
        if axis >= spec.domain.len() {
            for sink in &spec.sinks {
                let v = self.expr(sink.expr)?;
                let idx: Vec<Value> = (0..spec.domain.len() as u32).map(|a| self.vars[&a]).collect();
                self.store(sink, &idx, v)?;
            }
            return Ok(());
        }
        let zero = self.iconst(0);
        let n = self.dim(&spec.domain[axis])?;
        self.for_range(zero, n, &mut |s, i| {
            s.vars.insert(axis as u32, i);
            s.inner(axis + 1)
        })
    }

    fn index(&mut self, ix: &IndexExpr) -> R<Value> {
        let mut v = self.dim(&ix.offset)?;
        for (var, c) in &ix.terms {
            let x = match var {
                IndexVar::Loop(l) => *self
                    .vars
                    .get(l)
                    .ok_or_else(|| format!("loop variable i{l} is not bound"))?,
                IndexVar::Data(e) => {
                    let f = self.expr(*e)?;
                    self.b.ins().fcvt_to_sint_sat(types::I64, f)
                }
            };
            let c = self.dim(c)?;
            let t = self.b.ins().imul(x, c);
            v = self.b.ins().iadd(v, t);
        }
        Ok(v)
    }

    /// Whether `ix` is provably inside `0..n`: a lone loop variable over exactly that extent.
    fn in_range(&self, ix: &IndexExpr, n: &Dim) -> bool {
        if let ([(IndexVar::Loop(l), c)], Some(0)) = (ix.terms.as_slice(), ix.offset.as_const()) {
            return *c == Dim::constant(1) && self.extents.get(l) == Some(n);
        }
        ix.terms.is_empty() && matches!((ix.offset.as_const(), n.as_const()), (Some(o), Some(m)) if o >= 0 && o < m)
    }

    fn address(&mut self, view: &View, idx: &[Value]) -> R<Value> {
        let mut a = self.dim(&view.offset)?;
        for (i, s) in idx.iter().zip(&view.strides) {
            if s.as_const() == Some(0) {
                continue;
            }
            let s = self.dim(s)?;
            let t = self.b.ins().imul(*i, s);
            a = self.b.ins().iadd(a, t);
        }
        Ok(a)
    }

    fn elem_ptr(&mut self, slot: usize, addr: Value, dtype: DType) -> Value {
        let shift = dtype.size_bytes().trailing_zeros() as i64;
        let off = if shift > 0 {
            self.b.ins().ishl_imm_u(addr, shift)
        } else {
            addr
        };
        self.b.ins().iadd(self.ptrs[slot], off)
    }

    /// Loads element `addr` of a buffer of `dtype` as f64.
    fn load_raw(&mut self, slot: usize, addr: Value, dtype: DType) -> Value {
        let p = self.elem_ptr(slot, addr, dtype);
        let fl = self.trusted;
        match dtype {
            DType::F32 => {
                let x = self.b.ins().load(types::F32, fl, p, 0);
                self.b.ins().fpromote(types::F64, x)
            }
            DType::BF16 => {
                let x = self.b.ins().uload16(types::I32, fl, p, 0);
                let x = self.b.ins().ishl_imm_u(x, 16);
                let x = {
                    let pl = self.plain;
                    self.b.ins().bitcast(types::F32, pl, x)
                };
                self.b.ins().fpromote(types::F64, x)
            }
            DType::F16 | DType::F8E4M3 | DType::F8E5M2 => {
                let (bits, f) = if dtype == DType::F16 {
                    (self.b.ins().uload16(types::I32, fl, p, 0), "rj_load_f16")
                } else {
                    let name = if dtype == DType::F8E4M3 {
                        "rj_load_e4m3"
                    } else {
                        "rj_load_e5m2"
                    };
                    (self.b.ins().uload8(types::I32, fl, p, 0), name)
                };
                self.call(f, &[bits])
            }
            DType::I32 => {
                let x = self.b.ins().sload32(fl, p, 0);
                self.b.ins().fcvt_from_sint(types::F64, x)
            }
            DType::I64 => {
                let x = self.b.ins().load(types::I64, fl, p, 0);
                self.b.ins().fcvt_from_sint(types::F64, x)
            }
            DType::Bool => {
                let x = self.b.ins().uload8(types::I32, fl, p, 0);
                self.b.ins().fcvt_from_uint(types::F64, x)
            }
        }
    }

    fn store(&mut self, sink: &Sink, idx: &[Value], v: Value) -> R<()> {
        let addr = self.address(&sink.view, idx)?;
        let p = self.elem_ptr(sink.slot, addr, sink.dtype);
        let fl = self.trusted;
        match sink.dtype {
            DType::F32 => {
                let x = self.b.ins().fdemote(types::F32, v);
                self.b.ins().store(fl, x, p, 0);
            }
            DType::BF16 => {
                let x = self.b.ins().fdemote(types::F32, v);
                let bits = self.bf16_bits(x);
                let hi = self.b.ins().ushr_imm_u(bits, 16);
                self.b.ins().istore16(fl, hi, p, 0);
            }
            DType::F16 => {
                let bits = self.call("rj_store_f16", &[v]);
                self.b.ins().istore16(fl, bits, p, 0);
            }
            DType::F8E4M3 | DType::F8E5M2 => {
                let f = if sink.dtype == DType::F8E4M3 {
                    "rj_store_e4m3"
                } else {
                    "rj_store_e5m2"
                };
                let bits = self.call(f, &[v]);
                self.b.ins().istore8(fl, bits, p, 0);
            }
            DType::I32 => {
                let x = self.b.ins().fcvt_to_sint_sat(types::I64, v);
                self.b.ins().istore32(fl, x, p, 0);
            }
            DType::I64 => {
                let x = self.b.ins().fcvt_to_sint_sat(types::I64, v);
                self.b.ins().store(fl, x, p, 0);
            }
            DType::Bool => {
                let z = self.fconst(0.0);
                let c = self.b.ins().fcmp(FloatCC::NotEqual, v, z);
                self.b.ins().istore8(fl, c, p, 0);
            }
        }
        Ok(())
    }

    /// The bits of an f32 rounded to nearest-even at bit 16 (bf16 in the upper half); NaN kept.
    fn bf16_bits(&mut self, x: Value) -> Value {
        let bits = self.b.ins().bitcast(types::I32, self.plain, x);
        let lsb = self.b.ins().ushr_imm_u(bits, 16);
        let lsb = self.b.ins().band_imm_s(lsb, 1);
        let bias = self.b.ins().iadd_imm_s(lsb, 0x7fff);
        let r = self.b.ins().iadd(bits, bias);
        let r = self.b.ins().band_imm_s(r, 0xffff_0000u32 as i32 as i64);
        // NaN: keep a quiet NaN instead of rounding into infinity
        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        let q = self.b.ins().bor_imm_s(bits, 0x0040_0000);
        let q = self.b.ins().band_imm_s(q, 0xffff_0000u32 as i32 as i64);
        self.b.ins().select(nan, q, r)
    }

    /// Rounds an f64 value to `dtype` (storage emulation, `kernel_eval::round`).
    fn round(&mut self, dtype: DType, v: Value) -> Value {
        match dtype {
            DType::F32 => {
                let x = self.b.ins().fdemote(types::F32, v);
                self.b.ins().fpromote(types::F64, x)
            }
            DType::BF16 => {
                let x = self.b.ins().fdemote(types::F32, v);
                let bits = self.bf16_bits(x);
                let x = self.b.ins().bitcast(types::F32, self.plain, bits);
                self.b.ins().fpromote(types::F64, x)
            }
            DType::F16 => self.call("rj_round_f16", &[v]),
            DType::F8E4M3 => self.call("rj_round_e4m3", &[v]),
            DType::F8E5M2 => self.call("rj_round_e5m2", &[v]),
            DType::I32 => {
                let x = self.b.ins().fcvt_to_sint_sat(types::I64, v);
                let x = self.b.ins().ireduce(types::I32, x);
                self.b.ins().fcvt_from_sint(types::F64, x)
            }
            DType::I64 => self.b.ins().trunc(v),
            DType::Bool => self.truth(v),
        }
    }

    /// 1.0 where `v != 0`, else 0.0.
    fn truth(&mut self, v: Value) -> Value {
        let z = self.fconst(0.0);
        let c = self.b.ins().fcmp(FloatCC::NotEqual, v, z);
        self.bool_to_f(c)
    }

    fn bool_to_f(&mut self, c: Value) -> Value {
        let one = self.fconst(1.0);
        let z = self.fconst(0.0);
        self.b.ins().select(c, one, z)
    }

    fn expr(&mut self, e: ExprId) -> R<Value> {
        if let Some(v) = self.cache.get(&e) {
            return Ok(*v);
        }
        let g = self.spec.exprs;
        let node = g.get(e).ok_or_else(|| format!("expression {e} does not exist"))?;
        let dt = |a: &ExprId| g.get(*a).map(|n| n.dtype).unwrap_or(DType::F32);
        let v = match &node.op {
            ScalarOp::Load { input, index } => {
                let src = self
                    .spec
                    .sources
                    .get(*input)
                    .ok_or_else(|| format!("load of input {input}, which the kernel does not have"))?
                    .clone();
                if index.len() != src.view.rank() {
                    return Err(format!(
                        "load of input {input} with {} indices for a rank-{} view",
                        index.len(),
                        src.view.rank()
                    ));
                }
                let mut idx = Vec::new();
                let mut ok: Option<Value> = None;
                for (ix, n) in index.iter().zip(&src.view.shape) {
                    let i = self.index(ix)?;
                    if !self.in_range(ix, n) {
                        let n = self.dim(n)?;
                        let c = self.b.ins().icmp(IntCC::UnsignedLessThan, i, n);
                        ok = Some(match ok {
                            Some(o) => self.b.ins().band(o, c),
                            None => c,
                        });
                    }
                    idx.push(i);
                }
                let mut addr = self.address(&src.view, &idx)?;
                if let Some(ok) = ok {
                    let z = self.iconst(0);
                    addr = self.b.ins().select(ok, addr, z);
                }
                let x = self.load_raw(src.slot, addr, src.dtype);
                match ok {
                    Some(ok) => {
                        let z = self.fconst(0.0);
                        self.b.ins().select(ok, x, z)
                    }
                    None => x,
                }
            }
            ScalarOp::Result { .. } => {
                let slot = self
                    .spec
                    .result_slot
                    .ok_or("a template result read outside an epilogue")?;
                let domain = self.spec.domain;
                let mut lin = self.iconst(0);
                for (a, d) in domain.iter().enumerate() {
                    let n = self.dim(d)?;
                    let t = self.b.ins().imul(lin, n);
                    lin = self.b.ins().iadd(t, self.vars[&(a as u32)]);
                }
                self.load_raw(slot, lin, DType::F32)
            }
            ScalarOp::Const(c) => {
                let x = c.get();
                let r = match node.dtype {
                    d if d.is_float() => f64::from(d.round(x as f32)),
                    DType::I32 => f64::from(x as i64 as i32),
                    DType::I64 => x.trunc(),
                    _ => f64::from(u8::from(x != 0.0)),
                };
                let v = self.fconst(r);
                self.cache.insert(e, v);
                return Ok(v);
            }
            ScalarOp::Index(ix) => {
                let i = self.index(ix)?;
                self.b.ins().fcvt_from_sint(types::F64, i)
            }
            ScalarOp::Unary(u, a) => {
                let x = self.expr(*a)?;
                match u {
                    UnaryOp::Neg => self.b.ins().fneg(x),
                    UnaryOp::Exp => self.call("rj_exp", &[x]),
                    UnaryOp::Log => self.call("rj_log", &[x]),
                    UnaryOp::Sqrt => {
                        let f = self.b.ins().fdemote(types::F32, x);
                        let f = self.b.ins().sqrt(f);
                        self.b.ins().fpromote(types::F64, f)
                    }
                    UnaryOp::Rsqrt => {
                        let s = self.b.ins().sqrt(x);
                        let one = self.fconst(1.0);
                        self.b.ins().fdiv(one, s)
                    }
                    UnaryOp::Recip => {
                        let one = self.fconst(1.0);
                        self.b.ins().fdiv(one, x)
                    }
                    UnaryOp::Sigmoid => self.call("rj_sigmoid", &[x]),
                    UnaryOp::Tanh => self.call("rj_tanh", &[x]),
                    UnaryOp::Sin => self.call("rj_sin", &[x]),
                    UnaryOp::Cos => self.call("rj_cos", &[x]),
                    UnaryOp::Abs => self.b.ins().fabs(x),
                    UnaryOp::Not => {
                        let z = self.fconst(0.0);
                        let c = self.b.ins().fcmp(FloatCC::Equal, x, z);
                        self.bool_to_f(c)
                    }
                }
            }
            ScalarOp::Binary(op, p, q) => {
                let int = dt(p).is_int();
                let (x, y) = (self.expr(*p)?, self.expr(*q)?);
                let cmp = |s: &mut Self, cc: FloatCC| {
                    let c = s.b.ins().fcmp(cc, x, y);
                    s.bool_to_f(c)
                };
                match op {
                    BinaryOp::Add => self.b.ins().fadd(x, y),
                    BinaryOp::Sub => self.b.ins().fsub(x, y),
                    BinaryOp::Mul => self.b.ins().fmul(x, y),
                    BinaryOp::Div if int => {
                        let d = self.b.ins().fdiv(x, y);
                        self.b.ins().floor(d)
                    }
                    BinaryOp::Div => self.b.ins().fdiv(x, y),
                    BinaryOp::Max => self.b.ins().fmax(x, y),
                    BinaryOp::Min => self.b.ins().fmin(x, y),
                    BinaryOp::Pow => self.call("rj_pow", &[x, y]),
                    BinaryOp::Mod => {
                        let d = self.b.ins().fdiv(x, y);
                        let f = self.b.ins().floor(d);
                        let m = self.b.ins().fmul(y, f);
                        self.b.ins().fsub(x, m)
                    }
                    BinaryOp::Lt => cmp(self, FloatCC::LessThan),
                    BinaryOp::Le => cmp(self, FloatCC::LessThanOrEqual),
                    BinaryOp::Gt => cmp(self, FloatCC::GreaterThan),
                    BinaryOp::Ge => cmp(self, FloatCC::GreaterThanOrEqual),
                    BinaryOp::Eq => cmp(self, FloatCC::Equal),
                    BinaryOp::Ne => cmp(self, FloatCC::NotEqual),
                    BinaryOp::And | BinaryOp::Or => {
                        let z = self.fconst(0.0);
                        let a = self.b.ins().fcmp(FloatCC::NotEqual, x, z);
                        let c = self.b.ins().fcmp(FloatCC::NotEqual, y, z);
                        let r = if *op == BinaryOp::And {
                            self.b.ins().band(a, c)
                        } else {
                            self.b.ins().bor(a, c)
                        };
                        self.bool_to_f(r)
                    }
                }
            }
            ScalarOp::Where(c, a, b) => {
                let (x, y) = (self.expr(*a)?, self.expr(*b)?);
                let c = self.expr(*c)?;
                let z = self.fconst(0.0);
                let t = self.b.ins().fcmp(FloatCC::NotEqual, c, z);
                self.b.ins().select(t, x, y)
            }
            ScalarOp::Cast(a) => {
                let x = self.expr(*a)?;
                if dt(a).is_float() && node.dtype.is_int() {
                    // through f32, as the evaluator does (`x as f32 as i64`)
                    let f = self.b.ins().fdemote(types::F32, x);
                    let i = self.b.ins().fcvt_to_sint_sat(types::I64, f);
                    self.b.ins().fcvt_from_sint(types::F64, i)
                } else {
                    x
                }
            }
            ScalarOp::Reduce { op, vars, body } => {
                let acc = self.b.declare_var(types::F64);
                let init = match op {
                    ReduceOp::Sum => self.fconst(0.0),
                    ReduceOp::Max => self.fconst(f64::NEG_INFINITY),
                };
                self.b.def_var(acc, init);
                for (v, n) in vars {
                    self.extents.insert(*v, n.clone());
                }
                let (op, body) = (*op, *body);
                self.reduce_loops(vars, 0, &mut |s| {
                    let x = s.expr(body)?;
                    let a = s.b.use_var(acc);
                    let r = match op {
                        ReduceOp::Sum => s.b.ins().fadd(a, x),
                        ReduceOp::Max => s.b.ins().fmax(a, x),
                    };
                    s.b.def_var(acc, r);
                    Ok(())
                })?;
                self.b.use_var(acc)
            }
        };
        let v = self.round(node.dtype, v);
        self.cache.insert(e, v);
        Ok(v)
    }

    fn reduce_loops(&mut self, vars: &[(u32, Dim)], at: usize, f: &mut dyn FnMut(&mut Self) -> R<()>) -> R<()> {
        if at == vars.len() {
            return f(self);
        }
        let (v, n) = vars[at].clone();
        let zero = self.iconst(0);
        let n = self.dim(&n)?;
        self.for_range(zero, n, &mut |s, i| {
            s.vars.insert(v, i);
            s.reduce_loops(vars, at + 1, f)
        })
    }
}
