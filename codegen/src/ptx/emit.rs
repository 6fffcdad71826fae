//! The kernel builder shared by the loop and template generators: the ABI parameters
//! (docs/kernel-abi.md), symbolic dims evaluated in-kernel, counted loops, loads and stores of
//! every storage dtype, the rounding that storage emulation needs (`DType::round`), the
//! transcendental functions NVPTX can lower, and a block-wide reduction (warp shuffles, then
//! shared memory).
//!
//! Values travel in two register kinds only: floats as f32 (rounded to their dtype after every
//! node), integers and bools as i64 (bools 0 or 1). Loop-carried state lives in `alloca`s that
//! LLVM's SROA turns back into registers, which keeps the generators free of phi bookkeeping.

use super::{CodegenError, GLOBAL, PTX_KERNEL_CC, SHARED};
use inkwell::basic_block::BasicBlock;
use inkwell::builder::{Builder, BuilderError};
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::types::{BasicMetadataTypeEnum, BasicType, BasicTypeEnum, FunctionType};
use inkwell::values::{BasicMetadataValueEnum, BasicValueEnum, FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};
use ir::kernel::{IndexExpr, IndexVar, Kernel, KernelPlan, View};
use ir::op::ReduceOp;
use ir::{DType, Dim};
use std::collections::HashMap;

pub(crate) type R<T> = Result<T, CodegenError>;

pub(crate) trait Ck<T> {
    fn ck(self) -> R<T>;
}

impl<T> Ck<T> for Result<T, BuilderError> {
    fn ck(self) -> R<T> {
        self.map_err(|e| CodegenError(format!("LLVM builder: {e}")))
    }
}

/// The integer value of the environment variable `name` when it lies in `range`: the codegen
/// tuning knobs kept for A/B timing on the GPU machine (`RINGJIT_GB_STAGES`, `RINGJIT_LA_CB`, ..).
pub(crate) fn knob(name: &str, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
    let v = std::env::var(name).ok()?.parse::<i64>().ok()?;
    range.contains(&v).then_some(v)
}

pub(crate) fn err<T>(msg: impl Into<String>) -> R<T> {
    Err(CodegenError(msg.into()))
}

/// A scalar in registers: an f32 (every float dtype) or an i64 (ints, bools as 0/1).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Val<'c> {
    F(FloatValue<'c>),
    I(IntValue<'c>),
}

/// Whether a dtype travels as f32.
pub(crate) fn is_f(d: DType) -> bool {
    d.is_float()
}

pub(crate) struct Em<'c, 'a> {
    pub ctx: &'c Context,
    pub module: Module<'c>,
    pub b: Builder<'c>,
    pub f: FunctionValue<'c>,
    pub kernel: &'a Kernel,
    pub plan: &'a KernelPlan,
    syms: HashMap<String, IntValue<'c>>,
    pub inputs: Vec<PointerValue<'c>>,
    pub outputs: Vec<PointerValue<'c>>,
    /// The per-launch workspace (docs/kernel-abi.md), `scratch_bytes` long.
    pub scratch: PointerValue<'c>,
    /// Bytes of scratch the kernel needs (set by the generators that use it; 0 otherwise).
    pub scratch_bytes: Dim,
    /// Leading bytes of scratch the runtime zeroes before each launch (arrival counters that
    /// must start at 0 whatever an earlier kernel left there).
    pub scratch_zero: Dim,
    /// The scratch is self-resetting arrival counters only (`PtxKernel::scratch_counters`).
    pub scratch_counters: bool,
    entry: BasicBlock<'c>,
    red_smem: Option<PointerValue<'c>>,
    /// [`super::PtxOptions::prefill`]
    pub prefill: bool,
    /// programmatic dependent launch (sm_90 targets): [`Em::grid_dependency`] and
    /// [`Em::release_dependents`] emit their instructions
    pub pdl: bool,
}

impl<'c, 'a> Em<'c, 'a> {
    /// The module and `.entry` of `kernel` with its ABI parameters.
    pub fn new(ctx: &'c Context, plan: &'a KernelPlan, kernel: &'a Kernel) -> R<Em<'c, 'a>> {
        let module = ctx.create_module(super::ENTRY);
        let gptr = ctx.ptr_type(AddressSpace::from(GLOBAL));
        let symbols = plan.symbols();
        let n_ptr = kernel.inputs.len() + kernel.outputs.len();
        // buffers, then one pointer to the symbols' values (i64 each, in `symbols` order), then
        // the scratch pointer (docs/kernel-abi.md)
        let params: Vec<BasicMetadataTypeEnum> = vec![gptr.into(); n_ptr + 2];
        let f = module.add_function(super::ENTRY, ctx.void_type().fn_type(&params, false), None);
        f.set_call_conventions(PTX_KERNEL_CC);
        let entry = ctx.append_basic_block(f, "entry");
        let b = ctx.create_builder();
        b.position_at_end(entry);
        let p = |i: usize| f.get_nth_param(i as u32).expect("declared above");
        let inputs = (0..kernel.inputs.len()).map(|i| p(i).into_pointer_value()).collect();
        let outputs = (0..kernel.outputs.len())
            .map(|i| p(kernel.inputs.len() + i).into_pointer_value())
            .collect();
        let sym_ptr = p(n_ptr).into_pointer_value();
        let i64t = ctx.i64_type();
        let mut syms = HashMap::new();
        for (i, s) in symbols.iter().enumerate() {
            // SAFETY: in bounds of the symbol array the runtime passes (one i64 per symbol)
            let at =
                unsafe { b.build_in_bounds_gep(i64t, sym_ptr, &[i64t.const_int(i as u64, false)], "symp") }.ck()?;
            let ld = b.build_load(i64t, at, &format!("sym_{s}")).ck()?;
            if let Some(inst) = ld.into_int_value().as_instruction() {
                // the values do not change during a launch: cacheable, hoistable loads
                let md = ctx.metadata_node(&[]);
                inst.set_metadata(md, ctx.get_kind_id("invariant.load"))
                    .map_err(|e| CodegenError(format!("LLVM: {e}")))?;
                inst.set_alignment(8).map_err(|e| CodegenError(format!("LLVM: {e}")))?;
            }
            syms.insert(s.clone(), ld.into_int_value());
        }
        let scratch = p(n_ptr + 1).into_pointer_value();
        for i in 0..params.len() {
            p(i).set_name(&format!("p{i}"));
        }
        Ok(Em {
            ctx,
            module,
            b,
            f,
            kernel,
            plan,
            syms,
            inputs,
            outputs,
            scratch,
            scratch_bytes: Dim::constant(0),
            scratch_zero: Dim::constant(0),
            scratch_counters: false,
            entry,
            red_smem: None,
            prefill: true,
            pdl: false,
        })
    }

    /// Programmatic dependent launch (sm_90): `griddepcontrol.wait` holds the kernel until the
    /// kernel before it in the stream has completed and its writes are visible (a no-op when it
    /// was launched without the programmatic attribute). Emitted at the entry, before any access
    /// to a buffer: only the launch parameters and the symbols (written by the host before the
    /// step) are read ahead of it. The next kernel is released when this one's blocks exit,
    /// or earlier where a template says so ([`Em::release_dependents`]: the GEMV, once a group
    /// of rows has streamed its weights). Released at every kernel's entry, the next kernel's blocks sat resident beside
    /// this one's and a Ring-mini decode step as a CUDA graph measured 13 % slower on an H200
    /// (docs/perf.md); as it is, the driver prepares the next launch while this kernel runs.
    pub fn grid_dependency(&self) -> R<()> {
        if !self.pdl {
            return Ok(());
        }
        self.asm_ordered("griddepcontrol.wait;")
    }

    /// `griddepcontrol.launch_dependents`: this block no longer holds back the launch of the
    /// next kernel, which is released once every block has said so or exited (the next kernel
    /// still waits for this one to complete, [`Em::grid_dependency`]). Only the GEMV says it,
    /// once a group of up to 8 rows has streamed its weights. Nothing below sm_90.
    pub fn release_dependents(&self) -> R<()> {
        if !self.pdl {
            return Ok(());
        }
        self.asm_ordered("griddepcontrol.launch_dependents;")
    }

    pub fn ret(&self) -> R<()> {
        self.b.build_return(None).ck()?;
        Ok(())
    }

    // ---- constants and integer arithmetic (i64) -------------------------------------------

    pub fn i64c(&self, v: i64) -> IntValue<'c> {
        self.ctx.i64_type().const_int(v as u64, true)
    }
    pub fn i32c(&self, v: i32) -> IntValue<'c> {
        self.ctx.i32_type().const_int(v as u64, true)
    }
    pub fn f32c(&self, v: f64) -> FloatValue<'c> {
        self.ctx.f32_type().const_float(v as f32 as f64)
    }
    pub fn add(&self, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        self.b.build_int_add(a, b, "").ck()
    }
    pub fn sub(&self, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        self.b.build_int_sub(a, b, "").ck()
    }
    pub fn mul(&self, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        self.b.build_int_mul(a, b, "").ck()
    }
    pub fn div(&self, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        self.b.build_int_signed_div(a, b, "").ck()
    }
    pub fn rem(&self, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        self.b.build_int_signed_rem(a, b, "").ck()
    }
    pub fn icmp(&self, p: IntPredicate, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        self.b.build_int_compare(p, a, b, "").ck()
    }
    pub fn and(&self, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        self.b.build_and(a, b, "").ck()
    }
    pub fn imin(&self, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        let c = self.icmp(IntPredicate::SLT, a, b)?;
        Ok(self.b.build_select(c, a, b, "").ck()?.into_int_value())
    }
    pub fn imax(&self, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        let c = self.icmp(IntPredicate::SGT, a, b)?;
        Ok(self.b.build_select(c, a, b, "").ck()?.into_int_value())
    }
    pub fn ceil_div(&self, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        let t = self.add(a, self.sub(b, self.i64c(1))?)?;
        self.div(t, b)
    }
    pub fn select_f(&self, c: IntValue<'c>, a: FloatValue<'c>, b: FloatValue<'c>) -> R<FloatValue<'c>> {
        Ok(self.b.build_select(c, a, b, "").ck()?.into_float_value())
    }
    pub fn select_i(&self, c: IntValue<'c>, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        Ok(self.b.build_select(c, a, b, "").ck()?.into_int_value())
    }

    // ---- float arithmetic (f32) ----------------------------------------------------------------

    pub fn fadd(&self, a: FloatValue<'c>, b: FloatValue<'c>) -> R<FloatValue<'c>> {
        self.b.build_float_add(a, b, "").ck()
    }
    pub fn fsub(&self, a: FloatValue<'c>, b: FloatValue<'c>) -> R<FloatValue<'c>> {
        self.b.build_float_sub(a, b, "").ck()
    }
    pub fn fmul(&self, a: FloatValue<'c>, b: FloatValue<'c>) -> R<FloatValue<'c>> {
        self.b.build_float_mul(a, b, "").ck()
    }
    pub fn fdiv(&self, a: FloatValue<'c>, b: FloatValue<'c>) -> R<FloatValue<'c>> {
        self.b.build_float_div(a, b, "").ck()
    }
    pub fn fcmp(&self, p: FloatPredicate, a: FloatValue<'c>, b: FloatValue<'c>) -> R<IntValue<'c>> {
        self.b.build_float_compare(p, a, b, "").ck()
    }
    pub fn fmax(&self, a: FloatValue<'c>, b: FloatValue<'c>) -> R<FloatValue<'c>> {
        let f = self.ctx.f32_type();
        Ok(self
            .call(
                "llvm.maxnum.f32",
                f.into(),
                &[f.into(), f.into()],
                &[a.into(), b.into()],
            )?
            .into_float_value())
    }
    pub fn fmin(&self, a: FloatValue<'c>, b: FloatValue<'c>) -> R<FloatValue<'c>> {
        let f = self.ctx.f32_type();
        Ok(self
            .call(
                "llvm.minnum.f32",
                f.into(),
                &[f.into(), f.into()],
                &[a.into(), b.into()],
            )?
            .into_float_value())
    }
    pub fn fabs(&self, a: FloatValue<'c>) -> R<FloatValue<'c>> {
        let f = self.ctx.f32_type();
        Ok(self
            .call("llvm.fabs.f32", f.into(), &[f.into()], &[a.into()])?
            .into_float_value())
    }
    pub fn fma(&self, a: FloatValue<'c>, b: FloatValue<'c>, c: FloatValue<'c>) -> R<FloatValue<'c>> {
        let f = self.ctx.f32_type();
        Ok(self
            .call(
                "llvm.fma.f32",
                f.into(),
                &[f.into(), f.into(), f.into()],
                &[a.into(), b.into(), c.into()],
            )?
            .into_float_value())
    }
    pub fn sitofp(&self, a: IntValue<'c>) -> R<FloatValue<'c>> {
        self.b.build_signed_int_to_float(a, self.ctx.f32_type(), "").ck()
    }
    pub fn fptosi(&self, a: FloatValue<'c>) -> R<IntValue<'c>> {
        self.b.build_float_to_signed_int(a, self.ctx.i64_type(), "").ck()
    }
    pub fn bool_to_i64(&self, c: IntValue<'c>) -> R<IntValue<'c>> {
        self.b.build_int_z_extend(c, self.ctx.i64_type(), "").ck()
    }

    /// A call to an intrinsic or other declared function, declared on first use.
    pub fn call(
        &self,
        name: &str,
        ret: BasicTypeEnum<'c>,
        params: &[BasicMetadataTypeEnum<'c>],
        args: &[BasicMetadataValueEnum<'c>],
    ) -> R<BasicValueEnum<'c>> {
        let f = self
            .module
            .get_function(name)
            .unwrap_or_else(|| self.module.add_function(name, ret.fn_type(params, false), None));
        Ok(self
            .b
            .build_call(f, args, "")
            .ck()?
            .try_as_basic_value()
            .expect_basic("a value"))
    }

    fn call_void(
        &self,
        name: &str,
        params: &[BasicMetadataTypeEnum<'c>],
        args: &[BasicMetadataValueEnum<'c>],
    ) -> R<()> {
        let f = self.module.get_function(name).unwrap_or_else(|| {
            self.module
                .add_function(name, self.ctx.void_type().fn_type(params, false), None)
        });
        self.b.build_call(f, args, "").ck()?;
        Ok(())
    }

    /// Inline PTX: `text` with `constraints` (LLVM syntax), returning one value of `ret`.
    pub fn asm(
        &self,
        ret: BasicTypeEnum<'c>,
        params: &[BasicMetadataTypeEnum<'c>],
        text: &str,
        constraints: &str,
        args: &[BasicMetadataValueEnum<'c>],
    ) -> R<BasicValueEnum<'c>> {
        let ty: FunctionType = ret.fn_type(params, false);
        let p = self
            .ctx
            .create_inline_asm(ty, text.to_string(), constraints.to_string(), false, false, None, false);
        Ok(self
            .b
            .build_indirect_call(ty, p, args, "")
            .ck()?
            .try_as_basic_value()
            .expect_basic("a value"))
    }

    /// Inline PTX with side effects (and whatever `constraints` clobber), returning `ret` or
    /// nothing: LLVM neither drops it nor, with a `~{memory}` clobber, moves memory accesses
    /// across it.
    pub fn asm_se(
        &self,
        ret: Option<BasicTypeEnum<'c>>,
        params: &[BasicMetadataTypeEnum<'c>],
        text: &str,
        constraints: &str,
        args: &[BasicMetadataValueEnum<'c>],
    ) -> R<Option<BasicValueEnum<'c>>> {
        let ty = match ret {
            Some(r) => r.fn_type(params, false),
            None => self.ctx.void_type().fn_type(params, false),
        };
        let p = self
            .ctx
            .create_inline_asm(ty, text.to_string(), constraints.to_string(), true, false, None, false);
        let c = self.b.build_indirect_call(ty, p, args, "").ck()?;
        Ok(c.try_as_basic_value().basic())
    }

    /// One instruction with no operands that orders memory (a fence, `griddepcontrol`): inline
    /// PTX with side effects and a memory clobber, so no load or store moves across it.
    pub fn asm_ordered(&self, instr: &str) -> R<()> {
        self.asm_se(None, &[], instr, "~{memory}", &[]).map(|_| ())
    }

    // ---- special registers, dims ----------------------------------------------------------------

    /// A PTX special register (`tid.x`, `ctaid.x`, `ntid.x`, `nctaid.x`, `laneid`) as i64.
    pub fn sreg(&self, reg: &str) -> R<IntValue<'c>> {
        let i32t = self.ctx.i32_type();
        let v = self
            .call(&format!("llvm.nvvm.read.ptx.sreg.{reg}"), i32t.into(), &[], &[])?
            .into_int_value();
        self.b.build_int_z_extend(v, self.ctx.i64_type(), reg).ck()
    }

    /// The value of a symbolic dim, from the symbol parameters.
    pub fn dim(&self, d: &Dim) -> R<IntValue<'c>> {
        let mut acc: Option<IntValue> = None;
        for (mono, c) in d.terms() {
            let mut t = self.i64c(c);
            for s in mono {
                let v = *self
                    .syms
                    .get(s)
                    .ok_or_else(|| CodegenError(format!("symbol `{s}` is not a symbol of the plan")))?;
                t = self.mul(t, v)?;
            }
            acc = Some(match acc {
                None => t,
                Some(a) => self.add(a, t)?,
            });
        }
        Ok(acc.unwrap_or_else(|| self.i64c(0)))
    }

    pub fn dims(&self, ds: &[Dim]) -> R<Vec<IntValue<'c>>> {
        ds.iter().map(|d| self.dim(d)).collect()
    }

    pub fn product(&self, ds: &[IntValue<'c>]) -> R<IntValue<'c>> {
        let mut p = self.i64c(1);
        for d in ds {
            p = self.mul(p, *d)?;
        }
        Ok(p)
    }

    /// Row-major multi-index of `lin` in a box of `extents`.
    pub fn unravel(&self, lin: IntValue<'c>, extents: &[IntValue<'c>]) -> R<Vec<IntValue<'c>>> {
        let mut out = vec![self.i64c(0); extents.len()];
        let mut rest = lin;
        for d in (0..extents.len()).rev() {
            if d == 0 {
                out[0] = rest;
            } else {
                out[d] = self.rem(rest, extents[d])?;
                rest = self.div(rest, extents[d])?;
            }
        }
        Ok(out)
    }

    // ---- mutable variables and control flow -----------------------------------------------

    /// A stack slot (SROA promotes it) holding `init`.
    pub fn var(&self, ty: BasicTypeEnum<'c>, init: BasicValueEnum<'c>) -> R<PointerValue<'c>> {
        let eb = self.ctx.create_builder();
        match self.entry.get_first_instruction() {
            Some(i) => eb.position_before(&i),
            None => eb.position_at_end(self.entry),
        }
        let p = eb.build_alloca(ty, "v").ck()?;
        self.b.build_store(p, init).ck()?;
        Ok(p)
    }
    pub fn fvar(&self, init: FloatValue<'c>) -> R<PointerValue<'c>> {
        self.var(self.ctx.f32_type().into(), init.into())
    }
    pub fn ivar(&self, init: IntValue<'c>) -> R<PointerValue<'c>> {
        self.var(init.get_type().into(), init.into())
    }
    pub fn getf(&self, p: PointerValue<'c>) -> R<FloatValue<'c>> {
        Ok(self.b.build_load(self.ctx.f32_type(), p, "").ck()?.into_float_value())
    }
    pub fn geti(&self, p: PointerValue<'c>) -> R<IntValue<'c>> {
        Ok(self.b.build_load(self.ctx.i64_type(), p, "").ck()?.into_int_value())
    }
    pub fn set(&self, p: PointerValue<'c>, v: impl inkwell::values::BasicValue<'c>) -> R<()> {
        self.b.build_store(p, v).ck()?;
        Ok(())
    }

    /// `for (i = lo; i < hi; i += step) body(i)`.
    pub fn for_range(
        &mut self,
        lo: IntValue<'c>,
        hi: IntValue<'c>,
        step: IntValue<'c>,
        body: impl FnOnce(&mut Self, IntValue<'c>) -> R<()>,
    ) -> R<()> {
        let iv = self.ivar(lo)?;
        let cond = self.ctx.append_basic_block(self.f, "for.cond");
        let bb = self.ctx.append_basic_block(self.f, "for.body");
        let exit = self.ctx.append_basic_block(self.f, "for.exit");
        self.b.build_unconditional_branch(cond).ck()?;
        self.b.position_at_end(cond);
        let i = self.geti(iv)?;
        let c = self.icmp(IntPredicate::SLT, i, hi)?;
        self.b.build_conditional_branch(c, bb, exit).ck()?;
        self.b.position_at_end(bb);
        body(self, i)?;
        let next = self.add(i, step)?;
        self.set(iv, next)?;
        self.b.build_unconditional_branch(cond).ck()?;
        self.b.position_at_end(exit);
        Ok(())
    }

    /// `if (c) body()`.
    pub fn if_then(&mut self, c: IntValue<'c>, body: impl FnOnce(&mut Self) -> R<()>) -> R<()> {
        let then = self.ctx.append_basic_block(self.f, "then");
        let done = self.ctx.append_basic_block(self.f, "endif");
        self.b.build_conditional_branch(c, then, done).ck()?;
        self.b.position_at_end(then);
        body(self)?;
        self.b.build_unconditional_branch(done).ck()?;
        self.b.position_at_end(done);
        Ok(())
    }

    /// `if (c) return;` (for a block whose whole work is out of range: uniform across the
    /// block, so no barrier is skipped by part of it).
    pub fn return_if(&mut self, c: IntValue<'c>) -> R<()> {
        let early = self.ctx.append_basic_block(self.f, "early_exit");
        let go = self.ctx.append_basic_block(self.f, "in_range");
        self.b.build_conditional_branch(c, early, go).ck()?;
        self.b.position_at_end(early);
        self.b.build_return(None).ck()?;
        self.b.position_at_end(go);
        Ok(())
    }

    /// `if (c) goto end;`: returns `end`, where the caller branches and continues after the
    /// skipped code (for blocks that must still reach a later arrival count).
    pub fn skip_if(&mut self, c: IntValue<'c>) -> R<inkwell::basic_block::BasicBlock<'c>> {
        let end = self.ctx.append_basic_block(self.f, "skip_end");
        let go = self.ctx.append_basic_block(self.f, "in_range");
        self.b.build_conditional_branch(c, end, go).ck()?;
        self.b.position_at_end(go);
        Ok(end)
    }

    // ---- memory ---------------------------------------------------------------------------------

    fn gep(&self, elem: BasicTypeEnum<'c>, base: PointerValue<'c>, idx: IntValue<'c>) -> R<PointerValue<'c>> {
        // SAFETY (of the generated code): callers pass in-range element offsets (or offsets
        // clamped to 0 when the access is predicated off).
        unsafe { self.b.build_in_bounds_gep(elem, base, &[idx], "") }.ck()
    }

    /// Element `idx` (in elements) of a buffer of `dtype` at `base`.
    pub fn load(&self, base: PointerValue<'c>, idx: IntValue<'c>, dtype: DType) -> R<Val<'c>> {
        let c = self.ctx;
        Ok(match dtype {
            DType::F32 => {
                let p = self.gep(c.f32_type().into(), base, idx)?;
                Val::F(self.b.build_load(c.f32_type(), p, "").ck()?.into_float_value())
            }
            DType::BF16 => {
                let p = self.gep(c.i16_type().into(), base, idx)?;
                let h = self.b.build_load(c.i16_type(), p, "").ck()?.into_int_value();
                Val::F(self.bf16_bits_to_f32(h)?)
            }
            DType::F16 => {
                let p = self.gep(c.f16_type().into(), base, idx)?;
                let h = self.b.build_load(c.f16_type(), p, "").ck()?.into_float_value();
                Val::F(self.b.build_float_ext(h, c.f32_type(), "").ck()?)
            }
            DType::F8E4M3 | DType::F8E5M2 => {
                let p = self.gep(c.i8_type().into(), base, idx)?;
                let q = self.b.build_load(c.i8_type(), p, "").ck()?.into_int_value();
                Val::F(self.fp8_to_f32(q, dtype)?)
            }
            DType::I32 => {
                let p = self.gep(c.i32_type().into(), base, idx)?;
                let v = self.b.build_load(c.i32_type(), p, "").ck()?.into_int_value();
                Val::I(self.b.build_int_s_extend(v, c.i64_type(), "").ck()?)
            }
            DType::I64 => {
                let p = self.gep(c.i64_type().into(), base, idx)?;
                Val::I(self.b.build_load(c.i64_type(), p, "").ck()?.into_int_value())
            }
            DType::Bool => {
                let p = self.gep(c.i8_type().into(), base, idx)?;
                let v = self.b.build_load(c.i8_type(), p, "").ck()?.into_int_value();
                let nz = self.icmp(IntPredicate::NE, v, c.i8_type().const_zero())?;
                Val::I(self.bool_to_i64(nz)?)
            }
        })
    }

    /// Store `v` (a value of dtype `from`) as element `idx` of a buffer of `dtype`.
    pub fn store(&self, base: PointerValue<'c>, idx: IntValue<'c>, v: Val<'c>, from: DType, dtype: DType) -> R<()> {
        let c = self.ctx;
        let v = self.convert(v, from, dtype)?;
        match (dtype, v) {
            (DType::F32, Val::F(x)) => {
                let p = self.gep(c.f32_type().into(), base, idx)?;
                self.b.build_store(p, x).ck()?;
            }
            (DType::BF16, Val::F(x)) => {
                let bits = self.b.build_bit_cast(x, c.i32_type(), "").ck()?.into_int_value();
                let hi = self
                    .b
                    .build_right_shift(bits, c.i32_type().const_int(16, false), false, "")
                    .ck()?;
                let h = self.b.build_int_truncate(hi, c.i16_type(), "").ck()?;
                let p = self.gep(c.i16_type().into(), base, idx)?;
                self.b.build_store(p, h).ck()?;
            }
            (DType::F16, Val::F(x)) => {
                let h = self.b.build_float_trunc(x, c.f16_type(), "").ck()?;
                let p = self.gep(c.f16_type().into(), base, idx)?;
                self.b.build_store(p, h).ck()?;
            }
            (DType::F8E4M3 | DType::F8E5M2, Val::F(x)) => {
                let q = self.f32_to_fp8(x, dtype)?;
                let p = self.gep(c.i8_type().into(), base, idx)?;
                self.b.build_store(p, q).ck()?;
            }
            (DType::I32, Val::I(x)) => {
                let t = self.b.build_int_truncate(x, c.i32_type(), "").ck()?;
                let p = self.gep(c.i32_type().into(), base, idx)?;
                self.b.build_store(p, t).ck()?;
            }
            (DType::I64, Val::I(x)) => {
                let p = self.gep(c.i64_type().into(), base, idx)?;
                self.b.build_store(p, x).ck()?;
            }
            (DType::Bool, Val::I(x)) => {
                let t = self.b.build_int_truncate(x, c.i8_type(), "").ck()?;
                let p = self.gep(c.i8_type().into(), base, idx)?;
                self.b.build_store(p, t).ck()?;
            }
            _ => return err(format!("cannot store a {from} value as {dtype}")),
        }
        Ok(())
    }

    /// Element offset of view index `idx`, and whether every index is inside the view's shape
    /// (`None` when `in_range` says the caller proved it).
    pub fn view_offset(&self, view: &View, idx: &[IntValue<'c>]) -> R<IntValue<'c>> {
        let mut a = self.dim(&view.offset)?;
        for (i, s) in idx.iter().zip(&view.strides) {
            if s.as_const() == Some(0) {
                continue;
            }
            let s = self.dim(s)?;
            a = self.add(a, self.mul(*i, s)?)?;
        }
        Ok(a)
    }

    /// Load view element `idx` of a buffer of `dtype`; `check[d]` asks for a range check of
    /// index `d` (out of range reads 0, `ScalarOp::Load`).
    pub fn load_view(
        &self,
        base: PointerValue<'c>,
        view: &View,
        idx: &[IntValue<'c>],
        check: &[bool],
        dtype: DType,
    ) -> R<Val<'c>> {
        let mut ok: Option<IntValue> = None;
        for (d, i) in idx.iter().enumerate() {
            if !check.get(d).copied().unwrap_or(true) {
                continue;
            }
            let n = self.dim(&view.shape[d])?;
            // unsigned compare: negative indices are huge
            let c = self.icmp(IntPredicate::ULT, *i, n)?;
            ok = Some(match ok {
                None => c,
                Some(o) => self.and(o, c)?,
            });
        }
        let a = self.view_offset(view, idx)?;
        match ok {
            None => self.load(base, a, dtype),
            Some(ok) => {
                let a = self.select_i(ok, a, self.i64c(0))?;
                let v = self.load(base, a, dtype)?;
                Ok(match v {
                    Val::F(x) => Val::F(self.select_f(ok, x, self.f32c(0.0))?),
                    Val::I(x) => Val::I(self.select_i(ok, x, self.i64c(0))?),
                })
            }
        }
    }

    // ---- dtype conversion and storage rounding ----------------------------------------------

    fn bf16_bits_to_f32(&self, h: IntValue<'c>) -> R<FloatValue<'c>> {
        let c = self.ctx;
        let w = self.b.build_int_z_extend(h, c.i32_type(), "").ck()?;
        let s = self.b.build_left_shift(w, c.i32_type().const_int(16, false), "").ck()?;
        Ok(self.b.build_bit_cast(s, c.f32_type(), "").ck()?.into_float_value())
    }

    fn fp8_to_f32(&self, q: IntValue<'c>, dtype: DType) -> R<FloatValue<'c>> {
        let c = self.ctx;
        let kind = if dtype == DType::F8E4M3 { "e4m3x2" } else { "e5m2x2" };
        let h = self.b.build_int_z_extend(q, c.i16_type(), "").ck()?;
        let text = format!(
            "{{ .reg .b32 t; .reg .b16 lo, hi; cvt.rn.f16x2.{kind} t, $1; mov.b32 {{lo, hi}}, t; cvt.f32.f16 $0, lo; }}"
        );
        Ok(self
            .asm(c.f32_type().into(), &[c.i16_type().into()], &text, "=f,h", &[h.into()])?
            .into_float_value())
    }

    fn f32_to_fp8(&self, x: FloatValue<'c>, dtype: DType) -> R<IntValue<'c>> {
        let c = self.ctx;
        let kind = if dtype == DType::F8E4M3 { "e4m3x2" } else { "e5m2x2" };
        // the second source lands in the low byte
        let text = format!("cvt.rn.satfinite.{kind}.f32 $0, $1, $2;");
        let h = self
            .asm(
                c.i16_type().into(),
                &[c.f32_type().into(), c.f32_type().into()],
                &text,
                "=h,f,f",
                &[self.f32c(0.0).into(), x.into()],
            )?
            .into_int_value();
        self.b.build_int_truncate(h, c.i8_type(), "").ck()
    }

    /// `DType::round`: the f32 value as stored in `dtype` and read back.
    pub fn round(&self, x: FloatValue<'c>, dtype: DType) -> R<FloatValue<'c>> {
        let c = self.ctx;
        match dtype {
            DType::BF16 => {
                // round to nearest even on the bits; NaN stays NaN
                let i32t = c.i32_type();
                let bits = self.b.build_bit_cast(x, i32t, "").ck()?.into_int_value();
                let lsb = self
                    .b
                    .build_right_shift(bits, i32t.const_int(16, false), false, "")
                    .ck()?;
                let lsb = self.b.build_and(lsb, i32t.const_int(1, false), "").ck()?;
                let bias = self.b.build_int_add(lsb, i32t.const_int(0x7fff, false), "").ck()?;
                let r = self.b.build_int_add(bits, bias, "").ck()?;
                let r = self.b.build_and(r, i32t.const_int(0xffff_0000, false), "").ck()?;
                let rf = self.b.build_bit_cast(r, c.f32_type(), "").ck()?.into_float_value();
                let nan = self.fcmp(FloatPredicate::UNO, x, x)?;
                self.select_f(nan, x, rf)
            }
            DType::F16 => {
                let h = self.b.build_float_trunc(x, c.f16_type(), "").ck()?;
                self.b.build_float_ext(h, c.f32_type(), "").ck()
            }
            DType::F8E4M3 | DType::F8E5M2 => {
                let q = self.f32_to_fp8(x, dtype)?;
                self.fp8_to_f32(q, dtype)
            }
            _ => Ok(x),
        }
    }

    /// The interpreter's `cast` from `from` to `to` (and the storage rounding of `to`).
    pub fn convert(&self, v: Val<'c>, from: DType, to: DType) -> R<Val<'c>> {
        Ok(match (v, is_f(to)) {
            (Val::F(x), true) => Val::F(if from == to { x } else { self.round(x, to)? }),
            (Val::I(x), true) => Val::F(self.round(self.sitofp(x)?, to)?),
            (Val::F(x), false) => {
                if to == DType::Bool {
                    let nz = self.fcmp(FloatPredicate::UNE, x, self.f32c(0.0))?;
                    Val::I(self.bool_to_i64(nz)?)
                } else {
                    Val::I(self.int_wrap(self.fptosi(x)?, to)?)
                }
            }
            (Val::I(x), false) => {
                if to == DType::Bool && from != DType::Bool {
                    let nz = self.icmp(IntPredicate::NE, x, self.i64c(0))?;
                    Val::I(self.bool_to_i64(nz)?)
                } else if to == DType::I32 && from != DType::I32 {
                    Val::I(self.int_wrap(x, to)?)
                } else {
                    Val::I(x)
                }
            }
        })
    }

    /// An i64 wrapped to `dtype`'s range (i32 wraps; i64 as is).
    pub fn int_wrap(&self, x: IntValue<'c>, dtype: DType) -> R<IntValue<'c>> {
        if dtype == DType::I32 {
            let t = self.b.build_int_truncate(x, self.ctx.i32_type(), "").ck()?;
            self.b.build_int_s_extend(t, self.ctx.i64_type(), "").ck()
        } else {
            Ok(x)
        }
    }

    pub fn as_f(&self, v: Val<'c>) -> R<FloatValue<'c>> {
        match v {
            Val::F(x) => Ok(x),
            Val::I(x) => self.sitofp(x),
        }
    }
    pub fn as_i(&self, v: Val<'c>) -> R<IntValue<'c>> {
        match v {
            Val::I(x) => Ok(x),
            Val::F(x) => self.fptosi(x),
        }
    }

    // ---- transcendental functions ---------------------------------------------------------------

    fn nvvm_f(&self, name: &str, x: FloatValue<'c>) -> R<FloatValue<'c>> {
        let f = self.ctx.f32_type();
        Ok(self.call(name, f.into(), &[f.into()], &[x.into()])?.into_float_value())
    }

    /// 2^x (`ex2.approx`, about 2 ulp).
    pub fn exp2(&self, x: FloatValue<'c>) -> R<FloatValue<'c>> {
        self.nvvm_f("llvm.nvvm.ex2.approx.f", x)
    }
    /// e^x = 2^(x·log2 e): relative error about (|x| + 2)·6e-8, exact 0 at −∞.
    pub fn exp(&self, x: FloatValue<'c>) -> R<FloatValue<'c>> {
        self.exp2(self.fmul(x, self.f32c(std::f64::consts::LOG2_E))?)
    }
    pub fn log(&self, x: FloatValue<'c>) -> R<FloatValue<'c>> {
        let l2 = self.nvvm_f("llvm.nvvm.lg2.approx.f", x)?;
        self.fmul(l2, self.f32c(std::f64::consts::LN_2))
    }
    pub fn sqrt(&self, x: FloatValue<'c>) -> R<FloatValue<'c>> {
        self.nvvm_f("llvm.nvvm.sqrt.rn.f", x)
    }
    pub fn sigmoid(&self, x: FloatValue<'c>) -> R<FloatValue<'c>> {
        let neg = self.b.build_float_neg(x, "").ck()?;
        let e = self.exp(neg)?;
        let one = self.f32c(1.0);
        self.fdiv(one, self.fadd(one, e)?)
    }
    pub fn tanh(&self, x: FloatValue<'c>) -> R<FloatValue<'c>> {
        // sign(x)·(1 − e)/(1 + e) with e = exp(−2|x|): no overflow, absolute error ~1e-7
        let a = self.fabs(x)?;
        let e = self.exp(self.fmul(a, self.f32c(-2.0))?)?;
        let one = self.f32c(1.0);
        let t = self.fdiv(self.fsub(one, e)?, self.fadd(one, e)?)?;
        let neg = self.fcmp(FloatPredicate::OLT, x, self.f32c(0.0))?;
        let nt = self.b.build_float_neg(t, "").ck()?;
        self.select_f(neg, nt, t)
    }
    /// sin / cos: reduced to [−π, π] in two steps (Cody–Waite), then `sin.approx` / `cos.approx`
    /// (absolute error about 2^-21 there).
    pub fn sincos(&self, x: FloatValue<'c>, cos: bool) -> R<FloatValue<'c>> {
        let two_pi = std::f64::consts::TAU;
        let c1 = two_pi as f32 as f64;
        let c2 = two_pi - c1;
        let k = self.nvvm_f("llvm.rint.f32", self.fmul(x, self.f32c(1.0 / two_pi))?)?;
        let nk = self.b.build_float_neg(k, "").ck()?;
        let r = self.fma(nk, self.f32c(c1), x)?;
        let r = self.fma(nk, self.f32c(c2), r)?;
        self.nvvm_f(
            if cos {
                "llvm.nvvm.cos.approx.f"
            } else {
                "llvm.nvvm.sin.approx.f"
            },
            r,
        )
    }
    /// x^y for y integral or x > 0 (the graphs' uses), via exp2(y·log2|x|) and the sign rule.
    pub fn pow(&self, x: FloatValue<'c>, y: FloatValue<'c>) -> R<FloatValue<'c>> {
        let a = self.fabs(x)?;
        let l = self.nvvm_f("llvm.nvvm.lg2.approx.f", a)?;
        let r = self.exp2(self.fmul(y, l)?)?;
        // negative base with an odd integer exponent: negative result
        let half = self.fmul(y, self.f32c(0.5))?;
        let odd = self.fcmp(FloatPredicate::ONE, self.nvvm_f("llvm.floor.f32", half)?, half)?;
        let neg = self.fcmp(FloatPredicate::OLT, x, self.f32c(0.0))?;
        let flip = self.and(odd, neg)?;
        let nr = self.b.build_float_neg(r, "").ck()?;
        let r = self.select_f(flip, nr, r)?;
        // y == 0 gives 1 even for x == 0
        let y0 = self.fcmp(FloatPredicate::OEQ, y, self.f32c(0.0))?;
        self.select_f(y0, self.f32c(1.0), r)
    }

    // ---- block-wide cooperation ---------------------------------------------------------------

    pub fn barrier(&self) -> R<()> {
        self.call_void("llvm.nvvm.barrier0", &[], &[])
    }

    /// `atom.add` of 1 on the u32 arrival counter at `counter` (relaxed: the callers fence
    /// around it); returns the count before this arrival.
    pub fn count_arrival(&self, counter: PointerValue<'c>) -> R<IntValue<'c>> {
        let i32t = self.ctx.i32_type();
        let old = self
            .b
            .build_atomicrmw(
                inkwell::AtomicRMWBinOp::Add,
                counter,
                i32t.const_int(1, false),
                inkwell::AtomicOrdering::Monotonic,
            )
            .ck()?;
        Ok(old)
    }

    /// Launch bounds of the kernel (`.maxntid threads`, `.minnctapersm blocks`): ptxas keeps
    /// its registers within what `blocks` blocks of `threads` a multiprocessor leave.
    pub fn launch_bounds(&self, threads: u32, blocks: u32) -> R<()> {
        let i32t = self.ctx.i32_type();
        let f = self.f.as_global_value().as_pointer_value();
        let md = self.ctx.metadata_node(&[
            f.into(),
            self.ctx.metadata_string("maxntidx").into(),
            i32t.const_int(threads as u64, false).into(),
            self.ctx.metadata_string("minctasm").into(),
            i32t.const_int(blocks as u64, false).into(),
        ]);
        self.module
            .add_global_metadata("nvvm.annotations", &md)
            .map_err(|e| CodegenError(e.to_string()))
    }

    /// Counts the block's arrival at `counter` and tells every thread whether the block was the
    /// last to arrive (the count before its arrival equals `last_old`, an i32): thread 0 counts,
    /// with `fence` emitted just before and after its count, and hands the answer over through
    /// the shared flag `flag`; barriers after the count and after the hand-over, so the result
    /// is uniform across the block (callers branch on it around barriers).
    pub fn block_arrives_last(
        &mut self,
        flag: &str,
        counter: PointerValue<'c>,
        last_old: IntValue<'c>,
        fence: impl Fn(&Em<'c, 'a>) -> R<()>,
    ) -> R<IntValue<'c>> {
        let i32t = self.ctx.i32_type();
        let last = self.shared_array(flag, i32t.into(), 1);
        let first = self.icmp(IntPredicate::EQ, self.sreg("tid.x")?, self.i64c(0))?;
        self.if_then(first, |em| {
            fence(em)?;
            let old = em.count_arrival(counter)?;
            fence(em)?;
            let is_last = em.icmp(IntPredicate::EQ, old, last_old)?;
            let f = em.b.build_int_z_extend(is_last, i32t, "").ck()?;
            em.set(last, f)
        })?;
        self.barrier()?;
        let f = self.b.build_load(i32t, last, "").ck()?.into_int_value();
        self.icmp(IntPredicate::NE, f, i32t.const_zero())
    }

    /// Puts the arrival counter at `counter` back to zero (a volatile store: the next launch's
    /// first arrival must find it so).
    pub fn reset_counter(&self, counter: PointerValue<'c>) -> R<()> {
        let st = self.b.build_store(counter, self.ctx.i32_type().const_zero()).ck()?;
        st.set_volatile(true).map_err(|e| CodegenError(e.to_string()))?;
        Ok(())
    }

    /// A shared-memory array of `n` elements of `ty` (static shared memory).
    pub fn shared_array(&self, name: &str, ty: BasicTypeEnum<'c>, n: u32) -> PointerValue<'c> {
        let arr = ty.array_type(n);
        let g = self.module.add_global(arr, Some(AddressSpace::from(SHARED)), name);
        g.set_linkage(Linkage::Internal);
        g.set_initializer(&arr.get_undef());
        g.set_alignment(16);
        g.as_pointer_value()
    }

    pub fn shared_gep(&self, ty: BasicTypeEnum<'c>, base: PointerValue<'c>, i: IntValue<'c>) -> R<PointerValue<'c>> {
        self.gep(ty, base, i)
    }

    fn combine(&self, op: ReduceOp, a: FloatValue<'c>, b: FloatValue<'c>) -> R<FloatValue<'c>> {
        match op {
            ReduceOp::Sum => self.fadd(a, b),
            ReduceOp::Max => self.fmax(a, b),
        }
    }

    pub fn identity(&self, op: ReduceOp) -> FloatValue<'c> {
        match op {
            ReduceOp::Sum => self.f32c(0.0),
            ReduceOp::Max => self.ctx.f32_type().const_float(f64::NEG_INFINITY),
        }
    }

    /// Butterfly reduction over the 32 lanes of a warp: every lane ends with the result.
    pub fn warp_reduce(&self, op: ReduceOp, v: FloatValue<'c>) -> R<FloatValue<'c>> {
        self.bfly_reduce(op, v, &[16, 8, 4, 2, 1])
    }

    /// `op` over the lanes that differ in the bits of `offsets` (xor butterflies, in that
    /// order): every one of them gets it. Every lane of the warp calls.
    pub fn bfly_reduce(&self, op: ReduceOp, v: FloatValue<'c>, offsets: &[i32]) -> R<FloatValue<'c>> {
        let (f, i32t) = (self.ctx.f32_type(), self.ctx.i32_type());
        let mut v = v;
        for &off in offsets {
            let o = self
                .call(
                    "llvm.nvvm.shfl.sync.bfly.f32",
                    f.into(),
                    &[i32t.into(), f.into(), i32t.into(), i32t.into()],
                    &[
                        self.i32c(-1).into(),
                        v.into(),
                        self.i32c(off).into(),
                        self.i32c(31).into(),
                    ],
                )?
                .into_float_value();
            v = self.combine(op, v, o)?;
        }
        Ok(v)
    }

    /// Reduction over the whole block (blockDim.x a multiple of 32, at most 1024, every thread
    /// arriving): each warp reduces with shuffles, lane 0 of each writes a shared slot, and
    /// every warp then reduces the slots, so every thread holds the result (no broadcast step).
    pub fn block_reduce(&mut self, op: ReduceOp, v: FloatValue<'c>) -> R<FloatValue<'c>> {
        let f = self.ctx.f32_type();
        let smem = match self.red_smem {
            Some(p) => p,
            None => {
                let p = self.shared_array("ringjit_reduce", f.into(), 32);
                self.red_smem = Some(p);
                p
            }
        };
        let w = self.warp_reduce(op, v)?;
        let tid = self.sreg("tid.x")?;
        let lane = self.rem(tid, self.i64c(32))?;
        let warp = self.div(tid, self.i64c(32))?;
        // protect the slots from the previous reduction's readers
        self.barrier()?;
        let is0 = self.icmp(IntPredicate::EQ, lane, self.i64c(0))?;
        self.if_then(is0, |em| {
            let p = em.shared_gep(f.into(), smem, warp)?;
            em.set(p, w)
        })?;
        self.barrier()?;
        let nw = self.div(self.sreg("ntid.x")?, self.i64c(32))?;
        let has = self.icmp(IntPredicate::SLT, lane, nw)?;
        let slot = self.select_i(has, lane, self.i64c(0))?;
        let p = self.shared_gep(f.into(), smem, slot)?;
        let x = self.b.build_load(f, p, "").ck()?.into_float_value();
        let x = self.select_f(has, x, self.identity(op))?;
        self.warp_reduce(op, x)
    }
}

/// Whether index `i` provably lies in `0..extent` given the loop variables' extents.
pub(crate) fn provably_in(i: &IndexExpr, extent: &Dim, loops: &HashMap<u32, Dim>) -> bool {
    if let Some(c) = i.as_const() {
        return matches!((c.as_const(), extent.as_const()), (Some(c), Some(n)) if 0 <= c && c < n);
    }
    if i.offset != Dim::constant(0) || i.terms.len() != 1 {
        return false;
    }
    match &i.terms[0] {
        (IndexVar::Loop(v), c) if *c == Dim::constant(1) => loops.get(v) == Some(extent),
        _ => false,
    }
}
