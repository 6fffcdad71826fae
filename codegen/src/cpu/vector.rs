//! Generated row kernels for the non-GEMM templates (norms, softmax, RoPE, gates, attention,
//! linear attention, SwiGLU, FP8 quantisation): each is one Cranelift function over `n`
//! contiguous elements (f32, or E4M3 bytes), an f32x4 loop over the whole vectors then a
//! scalar loop over the tail, both emitted from one body description. The host drivers
//! (`rows.rs`, `quant.rs`) cut the template into rows and spread them over the threads; every
//! element of a template's arithmetic runs in these functions. Scalar kernels serve the
//! selections (`argmax` over f32 or i64, top-k and routing by repeated selection) and the
//! scatter-add.
//!
//! Numerics: f32 arithmetic (the reference accumulates in f64; the difference is inside the
//! f32 tier for the row lengths of the models). Rounding points (RMSNorm's normalised value,
//! sums, SwiGLU's intermediates, outputs) round in the kernel to the dtype named by a rounding
//! code (`round_code`: f32, bf16, f16, E4M3, E5M2), bit-exact with `DType::round`:
//! round-to-nearest-even on the bits in the normal range, by adding and subtracting a magic
//! number below it, saturating (FP8) or overflowing to infinity (bf16, f16) above it. E4M3
//! bytes are encoded and decoded bit-exactly with `DType::encode_float`/`decode_float`. `exp`
//! is a degree-6 polynomial after range reduction by `ln 2` (relative error ~2e-7).

use super::expr::Jit;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, AbiParam, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;
use cranelift_module::{FuncId, Module};
use ir::DType;

/// `dot(n, x, y) = Σ x·y`
pub type DotFn = unsafe extern "C" fn(i64, *const f32, *const f32) -> f32;
/// `maxv(n, x) = max x` (NaN-propagating; -inf for n = 0)
pub type MaxFn = unsafe extern "C" fn(i64, *const f32) -> f32;
/// `rms(n, x, w, y, inv, rn, ro)`: `y = r_o(r_n(x·inv)·w)`, `r_*` rounds to the dtype of its
/// rounding code (`round_code`)
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
/// `amax(n, x) = max |x|` (NaN-propagating; -inf for n = 0)
pub type AmaxFn = unsafe extern "C" fn(i64, *const f32) -> f32;
/// `quant(n, x, q, scale)`: `q = E4M3(x / scale)` as bytes (round to nearest even, saturating)
pub type QuantFn = unsafe extern "C" fn(i64, *const f32, *mut u8, f32);
/// `dequant(n, q, y, scale, ro)`: `y = r_o(decode(q) · scale)`; returns `Σ decode(q)·0`, NaN
/// exactly when a byte is E4M3's NaN
pub type DequantFn = unsafe extern "C" fn(i64, *const u8, *mut f32, f32, i64) -> f32;
/// `swiglu(n, g, u, y, rg, ro)`: `s = r_g(sigmoid(g))`, `y = r_o(r_g(g·s)·u)` (ir::fused::norm)
pub type SwiGluFn = unsafe extern "C" fn(i64, *const f32, *const f32, *mut f32, i64, i64);

/// `argmax(n, v, taken)`: the index of the greatest `v[i]` with `taken[i] == 0` (NaN above
/// everything, the lowest index among equals: the order of `ir::fused::moe`'s stable
/// descending sort), marked taken; -1 when every entry is taken.
pub type ArgmaxFn = unsafe extern "C" fn(i64, *const f32, *mut u8) -> i64;
/// The same selection over i64 values.
pub type ArgmaxI64Fn = unsafe extern "C" fn(i64, *const i64, *mut u8) -> i64;

/// `scatter(m, idx, src, acc, post, n)`: for `j < m`, `acc[idx[j·post]·post] += src[j·post]`
/// (f32 sources summed in f64, in order of `j`); returns -1, or the first `j` whose index is
/// outside `0..n` (nothing after it is added).
pub type ScatterF64Fn = unsafe extern "C" fn(i64, *const i64, *const f32, *mut f64, i64, i64) -> i64;
/// The same with i64 sources and wrapping i64 sums.
pub type ScatterI64Fn = unsafe extern "C" fn(i64, *const i64, *const i64, *mut i64, i64, i64) -> i64;

/// `gemv(k, w, m, q, q_rs, x, x_rs, scales, s_rs, acc, acc_rs)`: for `p < k`,
/// `b = decode(q[p·q_rs + j]) · scales[(p / 128)·s_rs]` for `j < w`, and
/// `acc[i·acc_rs + j] += x[i·x_rs + p] · b` for `i < m` (strides in elements). The `_x4` form
/// takes `w` a multiple of 4.
pub type GemvFp8Fn =
    unsafe extern "C" fn(i64, i64, i64, *const u8, i64, *const f32, i64, *const f32, i64, *mut f32, i64);

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
    pub argmax_i64: ArgmaxI64Fn,
    pub amax: AmaxFn,
    pub quant: QuantFn,
    pub dequant: DequantFn,
    pub swiglu: SwiGluFn,
    pub scatter_f64: ScatterF64Fn,
    pub scatter_i64: ScatterI64Fn,
    pub gemv_fp8_x4: GemvFp8Fn,
    pub gemv_fp8_x1: GemvFp8Fn,
}

/// Function ids before finalisation, in [`VecKernels`] field order.
pub(crate) struct VecIds([FuncId; 18]);

/// The rounding code of `d` for the kernels' rounding points (their i64 arguments): 0 keeps
/// f32, 1 bf16, 2 f16, 3 E4M3, 4 E5M2; `None` for integers and bools.
pub fn round_code(d: DType) -> Option<i64> {
    Some(match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        DType::F8E4M3 => 3,
        DType::F8E5M2 => 4,
        _ => return None,
    })
}

/// (shift, smallest normal, magic number, largest finite value, overflow value): see
/// `round_consts`.
type RoundConsts = (i32, f32, f32, f32, f32);

/// The constants of rounding code `code`: (23 − mantissa bits, the smallest normal value, the
/// magic number `2^(emin − mbits + 23)` whose ulp is the subnormal quantum, the largest finite
/// value, what larger results become: ∞ for bf16 and f16, the largest finite value for the
/// saturating FP8 formats). Code 0 (f32) keeps its value; its constants are bf16's, unused.
fn round_consts(code: i64) -> RoundConsts {
    let pow2 = |e: i32| f32::from_bits(((127 + e) as u32) << 23);
    match code {
        2 => (13, pow2(-14), pow2(-1), 65504.0, f32::INFINITY),
        3 => (20, pow2(-6), pow2(14), 448.0, 448.0),
        4 => (21, pow2(-14), pow2(7), 57344.0, 57344.0),
        _ => (16, pow2(-126), pow2(-110), f32::from_bits(0x7f7f_0000), f32::INFINITY),
    }
}

/// A rounding point's constants as values of the body's type (`shift` is a scalar i32).
#[derive(Clone, Copy)]
struct Round {
    /// all ones when the value is kept (f32)
    keep: Value,
    shift: Value,
    /// `2^(shift−1) − 1` and the mask of the kept bits
    half: Value,
    mask: Value,
    min_normal: Value,
    magic: Value,
    max: Value,
    ovf: Value,
}

impl Round {
    /// The constants of the rounding code held by the i64 `code` (scalars; call in the entry
    /// block, then `splat` for the vector body).
    fn dynamic(b: &mut FunctionBuilder, code: Value) -> Round {
        let consts: Vec<_> = (0..5).map(round_consts).collect();
        let pick_i = |b: &mut FunctionBuilder, f: &dyn Fn(&RoundConsts) -> i32| {
            let mut v = b.ins().iconst(types::I32, i64::from(f(&consts[4])));
            for c in (0..4).rev() {
                let is = b.ins().icmp_imm_s(IntCC::Equal, code, c as i64);
                let k = b.ins().iconst(types::I32, i64::from(f(&consts[c])));
                v = b.ins().select(is, k, v);
            }
            v
        };
        let pick_f = |b: &mut FunctionBuilder, f: &dyn Fn(&RoundConsts) -> f32| {
            let mut v = b.ins().f32const(f(&consts[4]));
            for c in (0..4).rev() {
                let is = b.ins().icmp_imm_s(IntCC::Equal, code, c as i64);
                let k = b.ins().f32const(f(&consts[c]));
                v = b.ins().select(is, k, v);
            }
            v
        };
        let is_f32 = b.ins().icmp_imm_s(IntCC::Equal, code, 0);
        Round {
            keep: b.ins().bmask(types::I32, is_f32),
            shift: pick_i(b, &|c| c.0),
            half: pick_i(b, &|c| (1 << (c.0 - 1)) - 1),
            mask: pick_i(b, &|c| !((1 << c.0) - 1)),
            min_normal: pick_f(b, &|c| c.1),
            magic: pick_f(b, &|c| c.2),
            max: pick_f(b, &|c| c.3),
            ovf: pick_f(b, &|c| c.4),
        }
    }

    /// The constants of a code known when the kernel is generated, in type `ty`.
    fn constant(b: &mut FunctionBuilder, ty: Type, code: i64) -> Round {
        let (shift, min_normal, magic, max, ovf) = round_consts(code);
        Round {
            keep: ki(b, ty, if code == 0 { -1 } else { 0 }),
            shift: b.ins().iconst(types::I32, i64::from(shift)),
            half: ki(b, ty, (1 << (shift - 1)) - 1),
            mask: ki(b, ty, !((1 << shift) - 1)),
            min_normal: kf(b, ty, min_normal),
            magic: kf(b, ty, magic),
            max: kf(b, ty, max),
            ovf: kf(b, ty, ovf),
        }
    }

    /// The scalar constants splatted to `ty` (f32x4).
    fn splat(&self, b: &mut FunctionBuilder, ty: Type) -> Round {
        let it = int_ty(ty);
        Round {
            keep: b.ins().splat(it, self.keep),
            shift: self.shift,
            half: b.ins().splat(it, self.half),
            mask: b.ins().splat(it, self.mask),
            min_normal: b.ins().splat(ty, self.min_normal),
            magic: b.ins().splat(ty, self.magic),
            max: b.ins().splat(ty, self.max),
            ovf: b.ins().splat(ty, self.ovf),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Red {
    None,
    Sum,
    Max,
}

/// What a body sees: element addresses, f32 scalars (splatted to `ty`), the rounding points
/// of its i64 arguments (rounding codes).
struct Args {
    ptrs: Vec<Value>,
    f: Vec<Value>,
    rounds: Vec<Round>,
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

/// A comparison as a lane mask (all ones where true), of type `int_ty(ty)`.
fn fmask(b: &mut FunctionBuilder, ty: Type, cc: FloatCC, x: Value, y: Value) -> Value {
    let c = b.ins().fcmp(cc, x, y);
    if ty.is_vector() {
        c
    } else {
        b.ins().bmask(types::I32, c)
    }
}

/// The same for integer lanes (`ty` the float type of the body).
fn imask(b: &mut FunctionBuilder, ty: Type, cc: IntCC, x: Value, y: Value) -> Value {
    let c = b.ins().icmp(cc, x, y);
    if ty.is_vector() {
        c
    } else {
        b.ins().bmask(types::I32, c)
    }
}

/// `v` rounded as `DType::round` rounds to the dtype of `r`: NaN kept, the sign put back on
/// the rounded magnitude (so ±0 stay).
fn round_to(b: &mut FunctionBuilder, ty: Type, v: Value, r: &Round) -> Value {
    let it = int_ty(ty);
    let bits = b.ins().bitcast(it, le(), v);
    let sign_bit = ki(b, ty, i32::MIN);
    let sign = b.ins().band(bits, sign_bit);
    let abs_bits = ki(b, ty, i32::MAX);
    let abits = b.ins().band(bits, abs_bits);
    // normal range: to nearest even on the bits (a carry into the exponent is right)
    let lsb = b.ins().ushr(abits, r.shift);
    let one = ki(b, ty, 1);
    let lsb = b.ins().band(lsb, one);
    let rn = b.ins().iadd(abits, r.half);
    let rn = b.ins().iadd(rn, lsb);
    let rn = b.ins().band(rn, r.mask);
    // below the smallest normal: the FPU's nearest-even addition to the magic number leaves a
    // multiple of the subnormal quantum
    let a = b.ins().bitcast(ty, le(), abits);
    let rs = b.ins().fadd(a, r.magic);
    let rs = b.ins().fsub(rs, r.magic);
    let rs = b.ins().bitcast(it, le(), rs);
    let small = fmask(b, ty, FloatCC::LessThan, a, r.min_normal);
    let res = b.ins().bitselect(small, rs, rn);
    let resf = b.ins().bitcast(ty, le(), res);
    let over = fmask(b, ty, FloatCC::GreaterThan, resf, r.max);
    let ovf = b.ins().bitcast(it, le(), r.ovf);
    let res = b.ins().bitselect(over, ovf, res);
    let res = b.ins().bor(res, sign);
    let nan = fmask(b, ty, FloatCC::Unordered, v, v);
    let keep = b.ins().bor(nan, r.keep);
    let out = b.ins().bitselect(keep, bits, res);
    b.ins().bitcast(ty, le(), out)
}

/// The E4M3 byte (in an i32 lane) of `v`, a value already rounded to E4M3: bit-exact with
/// `DType::F8E4M3.encode_float` (NaN is 0x7f, -0 is 0x80).
fn encode_e4m3(b: &mut FunctionBuilder, ty: Type, v: Value) -> Value {
    let it = int_ty(ty);
    let bits = b.ins().bitcast(it, le(), v);
    let sign_bit = ki(b, ty, i32::MIN);
    let sign = b.ins().band(bits, sign_bit);
    let s24 = b.ins().iconst(types::I32, 24);
    let sign = b.ins().ushr(sign, s24);
    let abs_bits = ki(b, ty, i32::MAX);
    let abits = b.ins().band(bits, abs_bits);
    // normal: the exponent (rebiased from 127 to 7) and the top 3 mantissa bits
    let s20 = b.ins().iconst(types::I32, 20);
    let normal = b.ins().ushr(abits, s20);
    let rebias = ki(b, ty, (127 - 7) << 3);
    let normal = b.ins().isub(normal, rebias);
    // subnormal: a multiple of 2^-9
    let a = b.ins().bitcast(ty, le(), abits);
    let k = kf(b, ty, 512.0);
    let m = b.ins().fmul(a, k);
    let sub = b.ins().fcvt_to_sint_sat(it, m);
    let min_normal = kf(b, ty, 1.0 / 64.0);
    let small = fmask(b, ty, FloatCC::LessThan, a, min_normal);
    let mag = b.ins().bitselect(small, sub, normal);
    let byte = b.ins().bor(mag, sign);
    let nan = fmask(b, ty, FloatCC::Unordered, v, v);
    let nan_code = ki(b, ty, 0x7f);
    b.ins().bitselect(nan, nan_code, byte)
}

/// The value of E4M3 bytes held in i32 lanes: bit-exact with `DType::F8E4M3.decode_float`.
fn decode_e4m3(b: &mut FunctionBuilder, ty: Type, byte: Value) -> Value {
    let it = int_ty(ty);
    let k7f = ki(b, ty, 0x7f);
    let mag = b.ins().band(byte, k7f);
    let k80 = ki(b, ty, 0x80);
    let sign = b.ins().band(byte, k80);
    let s24 = b.ins().iconst(types::I32, 24);
    let sign = b.ins().ishl(sign, s24);
    let s20 = b.ins().iconst(types::I32, 20);
    let normal = b.ins().ishl(mag, s20);
    let rebias = ki(b, ty, (127 - 7) << 23);
    let normal = b.ins().iadd(normal, rebias);
    let m = b.ins().fcvt_from_sint(ty, mag);
    let q = kf(b, ty, 1.0 / 512.0);
    let sub = b.ins().fmul(m, q);
    let sub = b.ins().bitcast(it, le(), sub);
    let eight = ki(b, ty, 8);
    let small = imask(b, ty, IntCC::UnsignedLessThan, mag, eight);
    let v = b.ins().bitselect(small, sub, normal);
    let v = b.ins().bor(v, sign);
    let nan = imask(b, ty, IntCC::Equal, mag, k7f);
    let nan_bits = ki(b, ty, 0x7fc0_0000);
    let v = b.ins().bitselect(nan, nan_bits, v);
    b.ins().bitcast(ty, le(), v)
}

/// One (f32x4) or four (f32x4) E4M3 bytes at pointer `k` of the body, as i32 lanes.
fn load_bytes(b: &mut FunctionBuilder, a: &Args, k: usize) -> Value {
    load_bytes_at(b, a.ty, a.ptrs[k])
}

/// One (f32) or four (f32x4) bytes at `p` as i32 lanes.
fn load_bytes_at(b: &mut FunctionBuilder, ty: Type, p: Value) -> Value {
    let fl = MemFlagsData::trusted();
    if ty.is_vector() {
        let w = b.ins().load(types::I32, fl, p, 0);
        let v = b.ins().scalar_to_vector(types::I32X4, w);
        let v = b.ins().bitcast(types::I8X16, le(), v);
        let v = b.ins().uwiden_low(v);
        b.ins().uwiden_low(v)
    } else {
        b.ins().uload8(types::I32, fl, p, 0)
    }
}

/// Stores bytes held in i32 lanes (0..=255) at pointer `k` of the body.
fn store_bytes(b: &mut FunctionBuilder, a: &Args, k: usize, v: Value) {
    let fl = MemFlagsData::trusted();
    if a.ty.is_vector() {
        let h = b.ins().unarrow(v, v);
        let q = b.ins().unarrow(h, h);
        let w = b.ins().bitcast(types::I32X4, le(), q);
        let w = b.ins().extractlane(w, 0);
        b.ins().store(fl, w, a.ptrs[k], 0);
    } else {
        b.ins().istore8(fl, v, a.ptrs[k], 0);
    }
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

/// Element sizes of a kernel's pointers: `log2` of the bytes per element.
const F32: i64 = 2;
const BYTE: i64 = 0;

/// One kernel: `fn(n, ptrs.., f32s.., i64s..) [-> f32]`, body applied to f32x4 then f32.
/// Pointer `k` advances by `1 << ptrs[k]` bytes per element; the i64 arguments are rounding
/// codes, their constants selected once per call.
fn build(
    jit: &mut Jit,
    name: &str,
    (ptrs, nf, ni): (&[i64], usize, usize),
    red: Red,
    body: &Body,
) -> Result<FuncId, String> {
    let nptr = ptrs.len();
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
    let fma = jit.has_fma;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut jit.fbc);
        let v4 = types::F32X4;
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let n = p[0];
        let bases = p[1..1 + nptr].to_vec();
        let fs = p[1 + nptr..1 + nptr + nf].to_vec();
        let rounds: Vec<Round> = p[1 + nptr + nf..].iter().map(|&c| Round::dynamic(&mut b, c)).collect();
        let rounds4: Vec<Round> = rounds.iter().map(|r| r.splat(&mut b, v4)).collect();
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
            bases
                .iter()
                .zip(ptrs)
                .map(|(&p, &sh)| {
                    let off = if sh == 0 { i } else { b.ins().ishl_imm_u(i, sh) };
                    b.ins().iadd(p, off)
                })
                .collect()
        };

        b.switch_to_block(h1);
        let i4 = b.ins().iadd_imm_s(i, 4);
        let go = b.ins().icmp(IntCC::SignedLessThanOrEqual, i4, n);
        b.ins().brif(go, b1, &[], mid, &[]);

        b.switch_to_block(b1);
        let args = Args {
            ptrs: addrs(&mut b, i),
            f: fs4,
            rounds: rounds4,
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
            rounds,
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
    jit.define_local(name, id, ctx)
}

/// The selection kernel of top-k, argmax and the routing top-k (scalar: one pass per chosen
/// index), over f32 values (`I64` false: NaN above everything) or i64 values.
fn build_argmax(jit: &mut Jit, name: &str, i64_values: bool) -> Result<FuncId, String> {
    let ptr = jit.module.target_config().pointer_type();
    let mut sig = jit.module.make_signature();
    sig.params.push(AbiParam::new(types::I64));
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(ptr));
    sig.returns.push(AbiParam::new(types::I64));
    let (id, mut ctx) = jit.declare_local(name, sig)?;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut jit.fbc);
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
        let vt = if i64_values { types::I64 } else { types::F32 };
        let bv = b.append_block_param(head, vt);
        let zero = b.ins().iconst(types::I64, 0);
        let none = b.ins().iconst(types::I64, -1);
        let z = if i64_values {
            b.ins().iconst(types::I64, 0)
        } else {
            b.ins().f32const(0.0)
        };
        b.ins().jump(head, &[zero.into(), none.into(), z.into()]);

        b.switch_to_block(head);
        let go = b.ins().icmp(IntCC::SignedLessThan, i, n);
        b.ins().brif(go, body, &[], exit, &[]);

        b.switch_to_block(body);
        let off = b.ins().ishl_imm_u(i, if i64_values { 3 } else { 2 });
        let a = b.ins().iadd(v, off);
        let x = b.ins().load(vt, fl, a, 0);
        let ta = b.ins().iadd(taken, i);
        let t = b.ins().uload8(types::I32, fl, ta, 0);
        let free = b.ins().icmp_imm_s(IntCC::Equal, t, 0);
        let first = b.ins().icmp_imm_s(IntCC::SignedLessThan, bi, 0);
        let over = if i64_values {
            b.ins().icmp(IntCC::SignedGreaterThan, x, bv)
        } else {
            let best_nan = b.ins().fcmp(FloatCC::Unordered, bv, bv);
            let x_nan = b.ins().fcmp(FloatCC::Unordered, x, x);
            let gt = b.ins().fcmp(FloatCC::GreaterThan, x, bv);
            let over = b.ins().bor(x_nan, gt);
            let not_best_nan = b.ins().bxor_imm_u(best_nan, 1);
            b.ins().band(over, not_best_nan)
        };
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
    jit.define_local(name, id, ctx)
}

/// The scatter-add kernel of one (outer, inner) column (`ScatterF64Fn` with `f64_acc`, else
/// `ScatterI64Fn`): a scalar loop in order of the source index.
fn build_scatter(jit: &mut Jit, name: &str, f64_acc: bool) -> Result<FuncId, String> {
    let ptr = jit.module.target_config().pointer_type();
    let mut sig = jit.module.make_signature();
    sig.params.push(AbiParam::new(types::I64));
    for _ in 0..3 {
        sig.params.push(AbiParam::new(ptr));
    }
    sig.params.push(AbiParam::new(types::I64));
    sig.params.push(AbiParam::new(types::I64));
    sig.returns.push(AbiParam::new(types::I64));
    let (id, mut ctx) = jit.declare_local(name, sig)?;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut jit.fbc);
        let fl = MemFlagsData::trusted();
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let (m, idx, src, acc, post, n) = (p[0], p[1], p[2], p[3], p[4], p[5]);
        let head = b.create_block();
        let body = b.create_block();
        let add = b.create_block();
        let bad = b.create_block();
        let done = b.create_block();
        let j = b.append_block_param(head, types::I64);
        let zero = b.ins().iconst(types::I64, 0);
        b.ins().jump(head, &[zero.into()]);

        b.switch_to_block(head);
        let go = b.ins().icmp(IntCC::SignedLessThan, j, m);
        b.ins().brif(go, body, &[], done, &[]);

        b.switch_to_block(body);
        let at = b.ins().imul(j, post);
        let off = b.ins().ishl_imm_u(at, 3);
        let ia = b.ins().iadd(idx, off);
        let i = b.ins().load(types::I64, fl, ia, 0);
        // one unsigned comparison refuses negative indices too
        let ok = b.ins().icmp(IntCC::UnsignedLessThan, i, n);
        b.ins().brif(ok, add, &[], bad, &[]);

        b.switch_to_block(add);
        let dst = b.ins().imul(i, post);
        let dst = b.ins().ishl_imm_u(dst, 3);
        let da = b.ins().iadd(acc, dst);
        if f64_acc {
            let so = b.ins().ishl_imm_u(at, 2);
            let sa = b.ins().iadd(src, so);
            let x = b.ins().load(types::F32, fl, sa, 0);
            let x = b.ins().fpromote(types::F64, x);
            let old = b.ins().load(types::F64, fl, da, 0);
            let new = b.ins().fadd(old, x);
            b.ins().store(fl, new, da, 0);
        } else {
            let sa = b.ins().iadd(src, off);
            let x = b.ins().load(types::I64, fl, sa, 0);
            let old = b.ins().load(types::I64, fl, da, 0);
            let new = b.ins().iadd(old, x);
            b.ins().store(fl, new, da, 0);
        }
        let j1 = b.ins().iadd_imm_s(j, 1);
        b.ins().jump(head, &[j1.into()]);

        b.switch_to_block(bad);
        b.ins().return_(&[j]);

        b.switch_to_block(done);
        let none = b.ins().iconst(types::I64, -1);
        b.ins().return_(&[none]);
        b.seal_all_blocks();
        b.finalize(jit.module.target_config());
    }
    jit.define_local(name, id, ctx)
}

/// The few-rows scaled FP8 GEMM over one strip of columns (`GemvFp8Fn`): for each row `p` of
/// B, its strip decoded (four columns a step, or one with `vector` false) and scaled by the
/// block's scale, then `acc[i] += x[i, p] · b` for every row `i` of A, in order of `p`.
fn build_gemv_fp8(jit: &mut Jit, name: &str, vector: bool) -> Result<FuncId, String> {
    let ptr = jit.module.target_config().pointer_type();
    let mut sig = jit.module.make_signature();
    // k, w, m, q, q_row_stride, x, x_row_stride, scales, scale_stride, acc, acc_row_stride
    for t in [
        types::I64,
        types::I64,
        types::I64,
        ptr,
        types::I64,
        ptr,
        types::I64,
        ptr,
        types::I64,
        ptr,
        types::I64,
    ] {
        sig.params.push(AbiParam::new(t));
    }
    let (id, mut ctx) = jit.declare_local(name, sig)?;
    let fma = jit.has_fma;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut jit.fbc);
        let fl = MemFlagsData::trusted();
        let (ty, lanes) = if vector { (types::F32X4, 4) } else { (types::F32, 1) };
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let (k, w, m, q, qs, x, xs, sc, ss, acc, accs) =
            (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10]);
        let (hp, bp, hj, bj, hi, bi, ej, ep, done) = (
            b.create_block(),
            b.create_block(),
            b.create_block(),
            b.create_block(),
            b.create_block(),
            b.create_block(),
            b.create_block(),
            b.create_block(),
            b.create_block(),
        );
        let zero = b.ins().iconst(types::I64, 0);
        // rows of B
        let pv = b.append_block_param(hp, types::I64);
        b.ins().jump(hp, &[zero.into()]);
        b.switch_to_block(hp);
        let go = b.ins().icmp(IntCC::SignedLessThan, pv, k);
        b.ins().brif(go, bp, &[], done, &[]);
        b.switch_to_block(bp);
        let blk = b.ins().ushr_imm_u(pv, 7);
        let so = b.ins().imul(blk, ss);
        let so = b.ins().ishl_imm_u(so, 2);
        let sa = b.ins().iadd(sc, so);
        let s = b.ins().load(types::F32, fl, sa, 0);
        let s = if vector { b.ins().splat(ty, s) } else { s };
        let qo = b.ins().imul(pv, qs);
        let qrow = b.ins().iadd(q, qo);
        let xo = b.ins().ishl_imm_u(pv, 2);
        let xcol = b.ins().iadd(x, xo);
        // column groups of the strip
        let jv = b.append_block_param(hj, types::I64);
        b.ins().jump(hj, &[zero.into()]);
        b.switch_to_block(hj);
        let go = b.ins().icmp(IntCC::SignedLessThan, jv, w);
        b.ins().brif(go, bj, &[], ep, &[]);
        b.switch_to_block(bj);
        let qa = b.ins().iadd(qrow, jv);
        let bytes = load_bytes_at(&mut b, ty, qa);
        let d = decode_e4m3(&mut b, ty, bytes);
        let d = b.ins().fmul(d, s);
        let jo = b.ins().ishl_imm_u(jv, 2);
        let acol = b.ins().iadd(acc, jo);
        // rows of A
        let iv = b.append_block_param(hi, types::I64);
        b.ins().jump(hi, &[zero.into()]);
        b.switch_to_block(hi);
        let go = b.ins().icmp(IntCC::SignedLessThan, iv, m);
        b.ins().brif(go, bi, &[], ej, &[]);
        b.switch_to_block(bi);
        let xo = b.ins().imul(iv, xs);
        let xo = b.ins().ishl_imm_u(xo, 2);
        let xa = b.ins().iadd(xcol, xo);
        let xv = b.ins().load(types::F32, fl, xa, 0);
        let xv = if vector { b.ins().splat(ty, xv) } else { xv };
        let ao = b.ins().imul(iv, accs);
        let ao = b.ins().ishl_imm_u(ao, 2);
        let aa = b.ins().iadd(acol, ao);
        let old = b.ins().load(ty, fl, aa, 0);
        let new = mul_add(&mut b, fma, xv, d, old);
        b.ins().store(fl, new, aa, 0);
        let i1 = b.ins().iadd_imm_s(iv, 1);
        b.ins().jump(hi, &[i1.into()]);
        b.switch_to_block(ej);
        let j1 = b.ins().iadd_imm_s(jv, lanes);
        b.ins().jump(hj, &[j1.into()]);
        b.switch_to_block(ep);
        let p1 = b.ins().iadd_imm_s(pv, 1);
        b.ins().jump(hp, &[p1.into()]);
        b.switch_to_block(done);
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(jit.module.target_config());
    }
    jit.define_local(name, id, ctx)
}

fn ld(b: &mut FunctionBuilder, a: &Args, k: usize) -> Value {
    b.ins().load(a.ty, MemFlagsData::trusted(), a.ptrs[k], 0)
}

fn st(b: &mut FunctionBuilder, a: &Args, k: usize, v: Value) {
    b.ins().store(MemFlagsData::trusted(), v, a.ptrs[k], 0);
}

/// Generates every row kernel into the plan's module.
pub(crate) fn compile(jit: &mut Jit) -> Result<VecIds, String> {
    let dot = build(jit, "rj_row_dot", (&[F32, F32], 0, 0), Red::Sum, &|b, a| {
        let (x, y) = (ld(b, a, 0), ld(b, a, 1));
        Some(b.ins().fmul(x, y))
    })?;
    let maxv = build(jit, "rj_row_max", (&[F32], 0, 0), Red::Max, &|b, a| Some(ld(b, a, 0)))?;
    let rms = build(jit, "rj_row_rms", (&[F32, F32, F32], 1, 2), Red::None, &|b, a| {
        let (x, w) = (ld(b, a, 0), ld(b, a, 1));
        let v = b.ins().fmul(x, a.f[0]);
        let v = round_to(b, a.ty, v, &a.rounds[0]);
        let v = b.ins().fmul(v, w);
        let v = round_to(b, a.ty, v, &a.rounds[1]);
        st(b, a, 2, v);
        None
    })?;
    let add = build(jit, "rj_row_add", (&[F32, F32, F32], 0, 1), Red::None, &|b, a| {
        let (x, y) = (ld(b, a, 0), ld(b, a, 1));
        let v = b.ins().fadd(x, y);
        let v = round_to(b, a.ty, v, &a.rounds[0]);
        st(b, a, 2, v);
        None
    })?;
    let axpby = build(jit, "rj_row_axpby", (&[F32, F32], 2, 0), Red::None, &|b, a| {
        let (x, y) = (ld(b, a, 0), ld(b, a, 1));
        let cy = b.ins().fmul(a.f[1], y);
        let v = mul_add(b, a.fma, a.f[0], x, cy);
        st(b, a, 1, v);
        None
    })?;
    let expf = build(jit, "rj_row_exp", (&[F32, F32], 2, 0), Red::Sum, &|b, a| {
        let x = ld(b, a, 0);
        let v = mul_add(b, a.fma, a.f[0], x, a.f[1]);
        let e = exp(b, a.ty, a.fma, v);
        st(b, a, 1, e);
        Some(e)
    })?;
    let gate = build(jit, "rj_row_gate", (&[F32, F32, F32, F32], 1, 0), Red::None, &|b, a| {
        let (x, w, e) = (ld(b, a, 0), ld(b, a, 1), ld(b, a, 2));
        let v = b.ins().fmul(x, a.f[0]);
        let v = b.ins().fmul(v, w);
        let one = kf(b, a.ty, 1.0);
        let d = b.ins().fadd(one, e);
        let v = b.ins().fdiv(v, d);
        st(b, a, 3, v);
        None
    })?;
    let rope = build(jit, "rj_row_rope", (&[F32, F32, F32, F32], 0, 1), Red::None, &|b, a| {
        let (x1, x2, c, s) = (ld(b, a, 0), ld(b, a, 1), ld(b, a, 2), ld(b, a, 3));
        let x1c = b.ins().fmul(x1, c);
        let x2s = b.ins().fmul(x2, s);
        let y1 = b.ins().fsub(x1c, x2s);
        let x2c = b.ins().fmul(x2, c);
        let x1s = b.ins().fmul(x1, s);
        let y2 = b.ins().fadd(x2c, x1s);
        let y1 = round_to(b, a.ty, y1, &a.rounds[0]);
        let y2 = round_to(b, a.ty, y2, &a.rounds[0]);
        st(b, a, 0, y1);
        st(b, a, 1, y2);
        None
    })?;
    let argmax = build_argmax(jit, "rj_row_argmax", false)?;
    let argmax_i64 = build_argmax(jit, "rj_row_argmax_i64", true)?;
    let amax = build(jit, "rj_row_amax", (&[F32], 0, 0), Red::Max, &|b, a| {
        let x = ld(b, a, 0);
        Some(b.ins().fabs(x))
    })?;
    let quant = build(jit, "rj_row_quant_e4m3", (&[F32, BYTE], 1, 0), Red::None, &|b, a| {
        // the reference's f32 division by the scale, then E4M3's rounding (saturating)
        let x = ld(b, a, 0);
        let v = b.ins().fdiv(x, a.f[0]);
        let e4m3 = Round::constant(b, a.ty, 3);
        let v = round_to(b, a.ty, v, &e4m3);
        let q = encode_e4m3(b, a.ty, v);
        store_bytes(b, a, 1, q);
        None
    })?;
    let dequant = build(jit, "rj_row_dequant_e4m3", (&[BYTE, F32], 1, 1), Red::Sum, &|b, a| {
        let q = load_bytes(b, a, 0);
        let d = decode_e4m3(b, a.ty, q);
        let y = b.ins().fmul(d, a.f[0]);
        let y = round_to(b, a.ty, y, &a.rounds[0]);
        st(b, a, 1, y);
        let zero = kf(b, a.ty, 0.0);
        Some(b.ins().fmul(d, zero))
    })?;
    let swiglu = build(jit, "rj_row_swiglu", (&[F32, F32, F32], 0, 2), Red::None, &|b, a| {
        let (g, u) = (ld(b, a, 0), ld(b, a, 1));
        let ng = b.ins().fneg(g);
        let e = exp(b, a.ty, a.fma, ng);
        let one = kf(b, a.ty, 1.0);
        let d = b.ins().fadd(one, e);
        let s = b.ins().fdiv(one, d);
        let s = round_to(b, a.ty, s, &a.rounds[0]);
        let v = b.ins().fmul(g, s);
        let v = round_to(b, a.ty, v, &a.rounds[0]);
        let y = b.ins().fmul(v, u);
        let y = round_to(b, a.ty, y, &a.rounds[1]);
        st(b, a, 2, y);
        None
    })?;
    let scatter_f64 = build_scatter(jit, "rj_scatter_add_f64", true)?;
    let scatter_i64 = build_scatter(jit, "rj_scatter_add_i64", false)?;
    let gemv_fp8_x4 = build_gemv_fp8(jit, "rj_gemv_fp8_x4", true)?;
    let gemv_fp8_x1 = build_gemv_fp8(jit, "rj_gemv_fp8_x1", false)?;
    Ok(VecIds([
        dot,
        maxv,
        rms,
        add,
        axpby,
        expf,
        gate,
        rope,
        argmax,
        argmax_i64,
        amax,
        quant,
        dequant,
        swiglu,
        scatter_f64,
        scatter_i64,
        gemv_fp8_x4,
        gemv_fp8_x1,
    ]))
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
                argmax_i64: std::mem::transmute::<*const u8, ArgmaxI64Fn>(f(9)),
                amax: std::mem::transmute::<*const u8, AmaxFn>(f(10)),
                quant: std::mem::transmute::<*const u8, QuantFn>(f(11)),
                dequant: std::mem::transmute::<*const u8, DequantFn>(f(12)),
                swiglu: std::mem::transmute::<*const u8, SwiGluFn>(f(13)),
                scatter_f64: std::mem::transmute::<*const u8, ScatterF64Fn>(f(14)),
                scatter_i64: std::mem::transmute::<*const u8, ScatterI64Fn>(f(15)),
                gemv_fp8_x4: std::mem::transmute::<*const u8, GemvFp8Fn>(f(16)),
                gemv_fp8_x1: std::mem::transmute::<*const u8, GemvFp8Fn>(f(17)),
            }
        }
    }
}
