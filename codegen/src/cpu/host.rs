//! Host-side pieces of the CPU backend: the math and conversion functions that generated code
//! calls (registered as JIT symbols), and element access through views for the template
//! drivers. Every conversion matches `DType::round` (ir/src/dtype.rs), so compiled kernels
//! round exactly as the reference evaluator does.

use ir::kernel::View;
use ir::shape::{eval_shape, DimEnv};
use ir::DType;

// ---- functions called from generated code ------------------------------------------------------
// Values travel as f64 (the evaluator's representation); the transcendental functions compute
// in f32 where `ir::kernel_eval` does, so results agree bit for bit before rounding.

pub extern "C" fn rj_exp(x: f64) -> f64 {
    f64::from((x as f32).exp())
}
pub extern "C" fn rj_log(x: f64) -> f64 {
    f64::from((x as f32).ln())
}
pub extern "C" fn rj_tanh(x: f64) -> f64 {
    f64::from((x as f32).tanh())
}
pub extern "C" fn rj_sin(x: f64) -> f64 {
    f64::from((x as f32).sin())
}
pub extern "C" fn rj_cos(x: f64) -> f64 {
    f64::from((x as f32).cos())
}
pub extern "C" fn rj_sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}
pub extern "C" fn rj_pow(x: f64, y: f64) -> f64 {
    x.powf(y)
}
pub extern "C" fn rj_round_f16(x: f64) -> f64 {
    f64::from(DType::F16.round(x as f32))
}
pub extern "C" fn rj_round_e4m3(x: f64) -> f64 {
    f64::from(DType::F8E4M3.round(x as f32))
}
pub extern "C" fn rj_round_e5m2(x: f64) -> f64 {
    f64::from(DType::F8E5M2.round(x as f32))
}
pub extern "C" fn rj_load_f16(bits: i32) -> f64 {
    f64::from(half::f16::from_bits(bits as u16).to_f32())
}
pub extern "C" fn rj_load_e4m3(bits: i32) -> f64 {
    f64::from(DType::F8E4M3.decode_float(bits as u32 & 0xff))
}
pub extern "C" fn rj_load_e5m2(bits: i32) -> f64 {
    f64::from(DType::F8E5M2.decode_float(bits as u32 & 0xff))
}
pub extern "C" fn rj_store_f16(x: f64) -> i32 {
    i32::from(half::f16::from_f32(x as f32).to_bits())
}
pub extern "C" fn rj_store_e4m3(x: f64) -> i32 {
    DType::F8E4M3.encode_float(x as f32) as i32
}
pub extern "C" fn rj_store_e5m2(x: f64) -> i32 {
    DType::F8E5M2.encode_float(x as f32) as i32
}

/// (name, address, number of f64 parameters or -1 for an i32 parameter, returns i32)
pub(crate) struct HelperFn {
    pub name: &'static str,
    pub addr: *const u8,
    /// parameter types: true = f64, false = i32
    pub params: &'static [bool],
    /// return type: true = f64, false = i32
    pub ret_f64: bool,
}

pub(crate) fn helper_fns() -> Vec<HelperFn> {
    let f1 = &[true][..];
    let f2 = &[true, true][..];
    let i1 = &[false][..];
    vec![
        HelperFn {
            name: "rj_exp",
            addr: rj_exp as *const u8,
            params: f1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_log",
            addr: rj_log as *const u8,
            params: f1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_tanh",
            addr: rj_tanh as *const u8,
            params: f1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_sin",
            addr: rj_sin as *const u8,
            params: f1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_cos",
            addr: rj_cos as *const u8,
            params: f1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_sigmoid",
            addr: rj_sigmoid as *const u8,
            params: f1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_pow",
            addr: rj_pow as *const u8,
            params: f2,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_round_f16",
            addr: rj_round_f16 as *const u8,
            params: f1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_round_e4m3",
            addr: rj_round_e4m3 as *const u8,
            params: f1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_round_e5m2",
            addr: rj_round_e5m2 as *const u8,
            params: f1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_load_f16",
            addr: rj_load_f16 as *const u8,
            params: i1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_load_e4m3",
            addr: rj_load_e4m3 as *const u8,
            params: i1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_load_e5m2",
            addr: rj_load_e5m2 as *const u8,
            params: i1,
            ret_f64: true,
        },
        HelperFn {
            name: "rj_store_f16",
            addr: rj_store_f16 as *const u8,
            params: f1,
            ret_f64: false,
        },
        HelperFn {
            name: "rj_store_e4m3",
            addr: rj_store_e4m3 as *const u8,
            params: f1,
            ret_f64: false,
        },
        HelperFn {
            name: "rj_store_e5m2",
            addr: rj_store_e5m2 as *const u8,
            params: f1,
            ret_f64: false,
        },
    ]
}

// ---- element access through views (template drivers) ------------------------------------------

/// Element `i` (in elements) of a buffer of `dtype` at `ptr`, as f64.
///
/// # Safety
/// `ptr` must hold at least `i + 1` elements of `dtype`.
pub unsafe fn load_elem(ptr: *const u8, dtype: DType, i: usize) -> f64 {
    match dtype {
        DType::F32 => f64::from(*(ptr as *const f32).add(i)),
        DType::BF16 => f64::from(half::bf16::from_bits(*(ptr as *const u16).add(i)).to_f32()),
        DType::F16 => f64::from(half::f16::from_bits(*(ptr as *const u16).add(i)).to_f32()),
        DType::F8E4M3 => f64::from(DType::F8E4M3.decode_float(u32::from(*ptr.add(i)))),
        DType::F8E5M2 => f64::from(DType::F8E5M2.decode_float(u32::from(*ptr.add(i)))),
        DType::I32 => f64::from(*(ptr as *const i32).add(i)),
        DType::I64 => *(ptr as *const i64).add(i) as f64,
        DType::Bool => f64::from(*ptr.add(i)),
    }
}

/// Stores `x` (already rounded to `dtype` or not: this rounds) as element `i`.
///
/// # Safety
/// `ptr` must hold at least `i + 1` elements of `dtype`.
pub unsafe fn store_elem(ptr: *mut u8, dtype: DType, i: usize, x: f64) {
    match dtype {
        DType::F32 => *(ptr as *mut f32).add(i) = x as f32,
        DType::BF16 => *(ptr as *mut u16).add(i) = half::bf16::from_f32(x as f32).to_bits(),
        DType::F16 => *(ptr as *mut u16).add(i) = half::f16::from_f32(x as f32).to_bits(),
        DType::F8E4M3 => *ptr.add(i) = DType::F8E4M3.encode_float(x as f32) as u8,
        DType::F8E5M2 => *ptr.add(i) = DType::F8E5M2.encode_float(x as f32) as u8,
        DType::I32 => *(ptr as *mut i32).add(i) = x as i64 as i32,
        DType::I64 => *(ptr as *mut i64).add(i) = x as i64,
        DType::Bool => *ptr.add(i) = u8::from(x != 0.0),
    }
}

/// A view evaluated under one binding: shape, strides and offset in elements.
#[derive(Clone, Debug)]
pub struct ConcreteView {
    pub shape: Vec<usize>,
    pub strides: Vec<i64>,
    pub offset: i64,
}

impl ConcreteView {
    pub fn new(v: &View, env: &DimEnv) -> Result<ConcreteView, String> {
        Ok(ConcreteView {
            shape: eval_shape(&v.shape, env)?,
            strides: v.strides.iter().map(|s| s.eval(env)).collect::<Result<_, _>>()?,
            offset: v.offset.eval(env)?,
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Storage offsets of the view's elements in row-major order.
    pub fn for_each(&self, mut f: impl FnMut(usize, usize)) {
        let n = self.numel();
        if n == 0 {
            return;
        }
        let r = self.shape.len();
        let mut idx = vec![0usize; r];
        let mut addr = self.offset;
        for lin in 0..n {
            f(lin, addr as usize);
            for d in (0..r).rev() {
                idx[d] += 1;
                addr += self.strides[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                addr -= self.strides[d] * self.shape[d] as i64;
                idx[d] = 0;
            }
        }
    }
}

/// The elements of a view of a buffer, row-major, as f64.
///
/// # Safety
/// `ptr` must be the buffer the view was made for.
pub unsafe fn read_view(ptr: *const u8, dtype: DType, view: &ConcreteView) -> Vec<f64> {
    let mut out = vec![0.0; view.numel()];
    view.for_each(|lin, a| out[lin] = load_elem(ptr, dtype, a));
    out
}

/// Same as [`read_view`], as f32.
///
/// # Safety
/// `ptr` must be the buffer the view was made for.
pub unsafe fn read_view_f32(ptr: *const u8, dtype: DType, view: &ConcreteView) -> Vec<f32> {
    let mut out = vec![0.0f32; view.numel()];
    match dtype {
        DType::F32 => view.for_each(|lin, a| out[lin] = *(ptr as *const f32).add(a)),
        DType::BF16 => view.for_each(|lin, a| out[lin] = f32::from_bits(u32::from(*(ptr as *const u16).add(a)) << 16)),
        _ => view.for_each(|lin, a| out[lin] = load_elem(ptr, dtype, a) as f32),
    }
    out
}

/// Writes `data` (row-major over the view's shape) through the view, rounding to `dtype`.
///
/// # Safety
/// `ptr` must be the buffer the view was made for.
pub unsafe fn write_view(ptr: *mut u8, dtype: DType, view: &ConcreteView, data: impl Fn(usize) -> f64) {
    view.for_each(|lin, a| store_elem(ptr, dtype, a, data(lin)));
}
