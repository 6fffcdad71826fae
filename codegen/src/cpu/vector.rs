//! Generated row kernels for the non-GEMM templates (norms, softmax, RoPE, gates, attention,
//! linear attention): each is one Cranelift function over `n` contiguous f32 elements, an
//! f32x4 loop over the whole vectors then a scalar loop over the tail, both emitted from one
//! body description. The host drivers (`rows.rs`) cut the template into rows and spread them
//! over the threads; every element of a template's arithmetic runs in these functions.
//!
//! Numerics: f32 arithmetic (the reference accumulates in f64; the difference is inside the
//! f32 tier for the row lengths of the models); bf16 rounding points (RMSNorm's normalised
//! value, the output) are applied in the kernel by round-to-nearest-even on the bits; `exp` is
//! a degree-6 polynomial after range reduction by `ln 2` (relative error ~2e-7).

use super::expr::{describe, Jit};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, AbiParam, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{FuncId, Module};

/// `dot(n, x, y) = Σ x·y`
pub type DotFn = unsafe extern "C" fn(i64, *const f32, *const f32) -> f32;
/// `maxv(n, x) = max x` (NaN-propagating; -inf for n = 0)
pub type MaxFn = unsafe extern "C" fn(i64, *const f32) -> f32;
/// `rms(n, x, w, y, inv, rn, ro)`: `y = r_o(r_n(x·inv)·w)`, `r_*` rounds to bf16 when its flag is 1
pub type RmsFn = unsafe extern "C" fn(i64, *const f32, *const f32, *mut f32, f32, i64, i64);
/// `addr(n, x, y, z, rn)`: `z = r_n(x + y)`
pub type AddFn = unsafe extern "C" fn(i64, *const f32, *const f32, *mut f32, i64);
/// `axpby(n, x, y, a, c)`: `y = c·y + a·x`
pub type AxpbyFn = unsafe extern "C" fn(i64, *const f32, *mut f32, f32, f32);
/// `expv(n, x, y, a, b)`: `y = exp(a·x + b)`, returns `Σ y`
pub type ExpFn = unsafe extern "C" fn(i64, *const f32, *mut f32, f32, f32) -> f32;
/// `gate(n, x, w, e, y, inv)`: `y = x·inv·w / (1 + e)`
pub type GateFn = unsafe extern "C" fn(i64, *const f32, *const f32, *const f32, *mut f32, f32);
/// `rope(n, x1, x2, c, s, rn)`: `(x1, x2) = (r(x1·c − x2·s), r(x2·c + x1·s))` in place
pub type RopeFn = unsafe extern "C" fn(i64, *mut f32, *mut f32, *const f32, *const f32, i64);

/// `argmax(n, v, taken)`: the index of the greatest `v[i]` with `taken[i] == 0` (NaN above
/// everything, the lowest index among equals: the order of `ir::fused::moe`'s stable
/// descending sort), marked taken; -1 when every entry is taken.
pub type ArgmaxFn = unsafe extern "C" fn(i64, *const f32, *mut u8) -> i64;

/// The generated row kernels of a plan.
#[derive(Clone, Copy)]
pub struct VecKernels {
    pub dot: DotFn,
    pub maxv: MaxFn,
    pub rms: RmsFn,
    pub add: AddFn,
    pub axpby: AxpbyFn,
    pub exp: ExpFn,
    pub gate: GateFn,
    pub rope: RopeFn,
    pub argmax: ArgmaxFn,
}

/// Function ids before finalisation, in [`VecKernels`] field order.
pub(crate) struct VecIds([FuncId; 9]);

#[derive(Clone, Copy, PartialEq)]
enum Red {
    None,
    Sum,
    Max,
}

/// What a body sees: element addresses, f32 scalars (splatted to `ty`), i64 flags.
struct Args {
    ptrs: Vec<Value>,
    f: Vec<Value>,
    flags: Vec<Value>,
    ty: Type,
    fma: bool,
}

type Body = dyn Fn(&mut FunctionBuilder, &Args) -> Option<Value>;

fn kf(b: &mut FunctionBuilder, ty: Type, c: f32) -> Value {
    let s = b.ins().f32const(c);
    if ty.is_vector() {
        b.ins().splat(ty, s)
    } else {
        s
    }
}

fn int_ty(ty: Type) -> Type {
    if ty.is_vector() {
        types::I32X4
    } else {
        types::I32
    }
}

fn ki(b: &mut FunctionBuilder, ty: Type, c: i32) -> Value {
    let s = b.ins().iconst(types::I32, i64::from(c));
    if ty.is_vector() {
        b.ins().splat(int_ty(ty), s)
    } else {
        s
    }
}

fn le() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

fn mul_add(b: &mut FunctionBuilder, fma: bool, x: Value, y: Value, z: Value) -> Value {
    if fma {
        b.ins().fma(x, y, z)
    } else {
        let m = b.ins().fmul(x, y);
        b.ins().fadd(m, z)
    }
}

/// `v` rounded to bf16 (nearest-even on the bits) when `flag` (i64 0/1) is 1.
fn round_bf16(b: &mut FunctionBuilder, ty: Type, v: Value, flag: Value) -> Value {
    let it = int_ty(ty);
    let bits = b.ins().bitcast(it, le(), v);
    let s16 = b.ins().iconst(types::I32, 16);
    let lsb = b.ins().ushr(bits, s16);
    let one = ki(b, ty, 1);
    let lsb = b.ins().band(lsb, one);
    let bias = ki(b, ty, 0x7fff);
    let r = b.ins().iadd(bits, bias);
    let r = b.ins().iadd(r, lsb);
    let mask = ki(b, ty, 0xffff_0000u32 as i32);
    let r = b.ins().band(r, mask);
    let f = b.ins().ireduce(types::I32, flag);
    let f = b.ins().ineg(f);
    let f = if ty.is_vector() { b.ins().splat(it, f) } else { f };
    let sel = b.ins().bitselect(f, r, bits);
    b.ins().bitcast(ty, le(), sel)
}

/// `exp(x)`: clamp, `x = n·ln2 + r`, degree-6 polynomial in `r`, times `2^n` built in the
/// exponent bits. NaN propagates.
fn exp(b: &mut FunctionBuilder, ty: Type, fma: bool, x: Value) -> Value {
    let lo = kf(b, ty, -87.0);
    let hi = kf(b, ty, 88.0);
    let x = b.ins().fmax(x, lo);
    let x = b.ins().fmin(x, hi);
    // round x·log2(e) to an integer with the 1.5·2^23 trick: its bits hold n
    let magic = kf(b, ty, 12_582_912.0);
    let log2e = kf(b, ty, std::f32::consts::LOG2_E);
    let t = mul_add(b, fma, x, log2e, magic);
    let n = b.ins().fsub(t, magic);
    let ln2_hi = kf(b, ty, 0.693_359_4);
    let ln2_lo = kf(b, ty, -2.121_944_4e-4);
    let a = b.ins().fmul(n, ln2_hi);
    let r = b.ins().fsub(x, a);
    let a = b.ins().fmul(n, ln2_lo);
    let r = b.ins().fsub(r, a);
    let mut p = kf(b, ty, 1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        let c = kf(b, ty, c);
        p = mul_add(b, fma, p, r, c);
    }
    let it = int_ty(ty);
    let tb = b.ins().bitcast(it, le(), t);
    let off = ki(b, ty, 0x4B40_0000 - 127);
    let e = b.ins().isub(tb, off);
    let s23 = b.ins().iconst(types::I32, 23);
    let e = b.ins().ishl(e, s23);
    let scale = b.ins().bitcast(ty, le(), e);
    b.ins().fmul(p, scale)
}

/// One kernel: `fn(n, ptrs.., f32s.., i64s..) [-> f32]`, body applied to f32x4 then f32.
fn build(
    jit: &mut Jit,
    name: &str,
    (nptr, nf, ni): (usize, usize, usize),
    red: Red,
    body: &Body,
) -> Result<FuncId, String> {
    let ptr = jit.module.target_config().pointer_type();
    let mut sig = jit.module.make_signature();
    sig.params.push(AbiParam::new(types::I64));
    for _ in 0..nptr {
        sig.params.push(AbiParam::new(ptr));
    }
    for _ in 0..nf {
        sig.params.push(AbiParam::new(types::F32));
    }
    for _ in 0..ni {
        sig.params.push(AbiParam::new(types::I64));
    }
    if red != Red::None {
        sig.returns.push(AbiParam::new(types::F32));
    }
    let (id, mut ctx) = jit.declare_local(name, sig)?;
    let mut fbc = FunctionBuilderContext::new();
    let fma = jit.has_fma;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
        let v4 = types::F32X4;
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let n = p[0];
        let bases = p[1..1 + nptr].to_vec();
        let fs = p[1 + nptr..1 + nptr + nf].to_vec();
        let flags = p[1 + nptr + nf..].to_vec();
        let fs4: Vec<Value> = fs.iter().map(|&f| b.ins().splat(v4, f)).collect();
        let init = match red {
            Red::Max => f32::NEG_INFINITY,
            _ => 0.0,
        };
        let init_s = b.ins().f32const(init);
        let init_v = b.ins().splat(v4, init_s);
        let h1 = b.create_block();
        let b1 = b.create_block();
        let mid = b.create_block();
        let h2 = b.create_block();
        let b2 = b.create_block();
        let end = b.create_block();
        let i = b.append_block_param(h1, types::I64);
        let acc = b.append_block_param(h1, v4);
        let j = b.append_block_param(h2, types::I64);
        let s = b.append_block_param(h2, types::F32);
        let zero = b.ins().iconst(types::I64, 0);
        b.ins().jump(h1, &[zero.into(), init_v.into()]);

        let combine = |b: &mut FunctionBuilder, acc: Value, r: Option<Value>| match (red, r) {
            (Red::Sum, Some(r)) => b.ins().fadd(acc, r),
            (Red::Max, Some(r)) => b.ins().fmax(acc, r),
            _ => acc,
        };
        let addrs = |b: &mut FunctionBuilder, i: Value| -> Vec<Value> {
            let off = b.ins().ishl_imm_u(i, 2);
            bases.iter().map(|&p| b.ins().iadd(p, off)).collect()
        };

        b.switch_to_block(h1);
        let i4 = b.ins().iadd_imm_s(i, 4);
        let go = b.ins().icmp(IntCC::SignedLessThanOrEqual, i4, n);
        b.ins().brif(go, b1, &[], mid, &[]);

        b.switch_to_block(b1);
        let args = Args {
            ptrs: addrs(&mut b, i),
            f: fs4,
            flags: flags.clone(),
            ty: v4,
            fma,
        };
        let r = body(&mut b, &args);
        let acc2 = combine(&mut b, acc, r);
        b.ins().jump(h1, &[i4.into(), acc2.into()]);

        b.switch_to_block(mid);
        let mut total = b.ins().extractlane(acc, 0);
        for lane in 1..4u8 {
            let l = b.ins().extractlane(acc, lane);
            total = combine(&mut b, total, Some(l));
        }
        b.ins().jump(h2, &[i.into(), total.into()]);

        b.switch_to_block(h2);
        let go = b.ins().icmp(IntCC::SignedLessThan, j, n);
        b.ins().brif(go, b2, &[], end, &[]);

        b.switch_to_block(b2);
        let args = Args {
            ptrs: addrs(&mut b, j),
            f: fs,
            flags,
            ty: types::F32,
            fma,
        };
        let r = body(&mut b, &args);
        let s2 = combine(&mut b, s, r);
        let j1 = b.ins().iadd_imm_s(j, 1);
        b.ins().jump(h2, &[j1.into(), s2.into()]);

        b.switch_to_block(end);
        if red == Red::None {
            b.ins().return_(&[]);
        } else {
            b.ins().return_(&[s]);
        }
        b.seal_all_blocks();
        b.finalize(jit.module.target_config());
    }
    jit.module
        .define_function(id, &mut ctx)
        .map_err(|e| format!("{name}: cranelift: {}", describe(&e)))?;
    jit.module.clear_context(&mut ctx);
    Ok(id)
}

/// The selection kernel of the routing top-k (scalar: one pass per chosen index).
fn build_argmax(jit: &mut Jit) -> Result<FuncId, String> {
    use cranelift_codegen::ir::condcodes::FloatCC;
    let name = "rj_row_argmax";
    let ptr = jit.module.target_config().pointer_type();
    let mut sig = jit.module.make_signature();
    sig.params.push(AbiParam::new(types::I64));
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(ptr));
    sig.returns.push(AbiParam::new(types::I64));
    let (id, mut ctx) = jit.declare_local(name, sig)?;
    let mut fbc = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
        let fl = MemFlagsData::trusted();
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let (n, v, taken) = (p[0], p[1], p[2]);
        let head = b.create_block();
        let body = b.create_block();
        let exit = b.create_block();
        let mark = b.create_block();
        let done = b.create_block();
        let i = b.append_block_param(head, types::I64);
        let bi = b.append_block_param(head, types::I64);
        let bv = b.append_block_param(head, types::F32);
        let zero = b.ins().iconst(types::I64, 0);
        let none = b.ins().iconst(types::I64, -1);
        let z = b.ins().f32const(0.0);
        b.ins().jump(head, &[zero.into(), none.into(), z.into()]);

        b.switch_to_block(head);
        let go = b.ins().icmp(IntCC::SignedLessThan, i, n);
        b.ins().brif(go, body, &[], exit, &[]);

        b.switch_to_block(body);
        let off = b.ins().ishl_imm_u(i, 2);
        let a = b.ins().iadd(v, off);
        let x = b.ins().load(types::F32, fl, a, 0);
        let ta = b.ins().iadd(taken, i);
        let t = b.ins().uload8(types::I32, fl, ta, 0);
        let free = b.ins().icmp_imm_s(IntCC::Equal, t, 0);
        let first = b.ins().icmp_imm_s(IntCC::SignedLessThan, bi, 0);
        let best_nan = b.ins().fcmp(FloatCC::Unordered, bv, bv);
        let x_nan = b.ins().fcmp(FloatCC::Unordered, x, x);
        let gt = b.ins().fcmp(FloatCC::GreaterThan, x, bv);
        let over = b.ins().bor(x_nan, gt);
        let not_best_nan = b.ins().bxor_imm_u(best_nan, 1);
        let over = b.ins().band(over, not_best_nan);
        let better = b.ins().bor(first, over);
        let better = b.ins().band(better, free);
        let bi2 = b.ins().select(better, i, bi);
        let bv2 = b.ins().select(better, x, bv);
        let i1 = b.ins().iadd_imm_s(i, 1);
        b.ins().jump(head, &[i1.into(), bi2.into(), bv2.into()]);

        b.switch_to_block(exit);
        let found = b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, bi, 0);
        b.ins().brif(found, mark, &[], done, &[]);

        b.switch_to_block(mark);
        let ta = b.ins().iadd(taken, bi);
        let one = b.ins().iconst(types::I8, 1);
        b.ins().store(fl, one, ta, 0);
        b.ins().jump(done, &[]);

        b.switch_to_block(done);
        b.ins().return_(&[bi]);
        b.seal_all_blocks();
        b.finalize(jit.module.target_config());
    }
    jit.module
        .define_function(id, &mut ctx)
        .map_err(|e| format!("{name}: cranelift: {}", describe(&e)))?;
    jit.module.clear_context(&mut ctx);
    Ok(id)
}

fn ld(b: &mut FunctionBuilder, a: &Args, k: usize) -> Value {
    b.ins().load(a.ty, MemFlagsData::trusted(), a.ptrs[k], 0)
}

fn st(b: &mut FunctionBuilder, a: &Args, k: usize, v: Value) {
    b.ins().store(MemFlagsData::trusted(), v, a.ptrs[k], 0);
}

/// Generates every row kernel into the plan's module.
pub(crate) fn compile(jit: &mut Jit) -> Result<VecIds, String> {
    let dot = build(jit, "rj_row_dot", (2, 0, 0), Red::Sum, &|b, a| {
        let (x, y) = (ld(b, a, 0), ld(b, a, 1));
        Some(b.ins().fmul(x, y))
    })?;
    let maxv = build(jit, "rj_row_max", (1, 0, 0), Red::Max, &|b, a| Some(ld(b, a, 0)))?;
    let rms = build(jit, "rj_row_rms", (3, 1, 2), Red::None, &|b, a| {
        let (x, w) = (ld(b, a, 0), ld(b, a, 1));
        let v = b.ins().fmul(x, a.f[0]);
        let v = round_bf16(b, a.ty, v, a.flags[0]);
        let v = b.ins().fmul(v, w);
        let v = round_bf16(b, a.ty, v, a.flags[1]);
        st(b, a, 2, v);
        None
    })?;
    let add = build(jit, "rj_row_add", (3, 0, 1), Red::None, &|b, a| {
        let (x, y) = (ld(b, a, 0), ld(b, a, 1));
        let v = b.ins().fadd(x, y);
        let v = round_bf16(b, a.ty, v, a.flags[0]);
        st(b, a, 2, v);
        None
    })?;
    let axpby = build(jit, "rj_row_axpby", (2, 2, 0), Red::None, &|b, a| {
        let (x, y) = (ld(b, a, 0), ld(b, a, 1));
        let cy = b.ins().fmul(a.f[1], y);
        let v = mul_add(b, a.fma, a.f[0], x, cy);
        st(b, a, 1, v);
        None
    })?;
    let expf = build(jit, "rj_row_exp", (2, 2, 0), Red::Sum, &|b, a| {
        let x = ld(b, a, 0);
        let v = mul_add(b, a.fma, a.f[0], x, a.f[1]);
        let e = exp(b, a.ty, a.fma, v);
        st(b, a, 1, e);
        Some(e)
    })?;
    let gate = build(jit, "rj_row_gate", (4, 1, 0), Red::None, &|b, a| {
        let (x, w, e) = (ld(b, a, 0), ld(b, a, 1), ld(b, a, 2));
        let v = b.ins().fmul(x, a.f[0]);
        let v = b.ins().fmul(v, w);
        let one = kf(b, a.ty, 1.0);
        let d = b.ins().fadd(one, e);
        let v = b.ins().fdiv(v, d);
        st(b, a, 3, v);
        None
    })?;
    let rope = build(jit, "rj_row_rope", (4, 0, 1), Red::None, &|b, a| {
        let (x1, x2, c, s) = (ld(b, a, 0), ld(b, a, 1), ld(b, a, 2), ld(b, a, 3));
        let x1c = b.ins().fmul(x1, c);
        let x2s = b.ins().fmul(x2, s);
        let y1 = b.ins().fsub(x1c, x2s);
        let x2c = b.ins().fmul(x2, c);
        let x1s = b.ins().fmul(x1, s);
        let y2 = b.ins().fadd(x2c, x1s);
        let y1 = round_bf16(b, a.ty, y1, a.flags[0]);
        let y2 = round_bf16(b, a.ty, y2, a.flags[0]);
        st(b, a, 0, y1);
        st(b, a, 1, y2);
        None
    })?;
    let argmax = build_argmax(jit)?;
    Ok(VecIds([dot, maxv, rms, add, axpby, expf, gate, rope, argmax]))
}

impl VecIds {
    /// The finalised functions.
    pub(crate) fn resolve(&self, jit: &Jit) -> VecKernels {
        let f = |i: usize| jit.module.get_finalized_function(self.0[i]);
        // SAFETY: each function was declared with the signature of its field's type.
        unsafe {
            VecKernels {
                dot: std::mem::transmute::<*const u8, DotFn>(f(0)),
                maxv: std::mem::transmute::<*const u8, MaxFn>(f(1)),
                rms: std::mem::transmute::<*const u8, RmsFn>(f(2)),
                add: std::mem::transmute::<*const u8, AddFn>(f(3)),
                axpby: std::mem::transmute::<*const u8, AxpbyFn>(f(4)),
                exp: std::mem::transmute::<*const u8, ExpFn>(f(5)),
                gate: std::mem::transmute::<*const u8, GateFn>(f(6)),
                rope: std::mem::transmute::<*const u8, RopeFn>(f(7)),
                argmax: std::mem::transmute::<*const u8, ArgmaxFn>(f(8)),
            }
        }
    }
}
