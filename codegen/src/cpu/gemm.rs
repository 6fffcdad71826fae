//! The CPU GEMM: a Cranelift-generated SIMD micro-kernel over packed operands, driven by a
//! cache-blocked loop nest on the host.
//!
//! The micro-kernel computes an `MR × NR` tile of C over `kc` steps of K with f32x4 vectors:
//! 4 rows × 2 vectors of 4 columns = 8 accumulator registers, B's two vectors loaded once per
//! step, each A element broadcast (fused multiply-add where the host has FMA). Operands are
//! packed per (`MC × KC`, `KC × NC`) block into panels of `MR` rows / `NR` columns, zero-padded
//! at the edges, so the micro-kernel never branches. Accumulation is f32; the result is rounded
//! to the GEMM's output dtype by the caller.

use super::expr::Jit;
use super::{ParFor, Shared};
use cranelift_codegen::ir::{types, AbiParam, InstBuilder, MemFlagsData};
use cranelift_frontend::FunctionBuilder;
use cranelift_module::{FuncId, Module};

pub const MR: usize = 4;
pub const NR: usize = 8;
const KC: usize = 256;
const MC: usize = 64;
const NC_MAX: usize = 512;

/// `micro(kc, a_panel, b_panel, c_tile)`: `c_tile[MR][NR] += a_panel[kc][MR] · b_panel[kc][NR]`.
pub type MicroKernel = unsafe extern "C" fn(i64, *const f32, *const f32, *mut f32);

/// `dot(n8, x, y)`: `Σ_{i < 8·n8} x[i]·y[i]` with f32x4 accumulators (the GEMV path).
pub type DotKernel = unsafe extern "C" fn(i64, *const f32, *const f32) -> f32;

/// The generated kernels the GEMM drivers run.
#[derive(Clone, Copy)]
pub struct GemmKernels {
    pub micro: MicroKernel,
    pub dot: DotKernel,
}

/// Generates the dot kernel: two f32x4 accumulators over 8 elements per step.
pub(crate) fn compile_dot_kernel(jit: &mut Jit) -> Result<FuncId, String> {
    let name = "rj_dot_f32x4";
    let ptr = jit.module.target_config().pointer_type();
    let mut sig = jit.module.make_signature();
    sig.params.push(AbiParam::new(types::I64));
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(ptr));
    sig.returns.push(AbiParam::new(types::F32));
    let (id, mut ctx) = jit.declare_local(name, sig)?;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut jit.fbc);
        let fl = MemFlagsData::trusted();
        let v4 = types::F32X4;
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let (n8, x0, y0) = (p[0], p[1], p[2]);
        let zero = b.ins().f32const(0.0);
        let z4 = b.ins().splat(v4, zero);
        let header = b.create_block();
        let body = b.create_block();
        let exit = b.create_block();
        let i = b.append_block_param(header, types::I64);
        let px = b.append_block_param(header, ptr);
        let py = b.append_block_param(header, ptr);
        let a0 = b.append_block_param(header, v4);
        let a1 = b.append_block_param(header, v4);
        let izero = b.ins().iconst(types::I64, 0);
        b.ins()
            .jump(header, &[izero.into(), x0.into(), y0.into(), z4.into(), z4.into()]);
        b.switch_to_block(header);
        let go = b
            .ins()
            .icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, i, n8);
        b.ins().brif(go, body, &[], exit, &[]);
        b.switch_to_block(body);
        let x_lo = b.ins().load(v4, fl, px, 0);
        let x_hi = b.ins().load(v4, fl, px, 16);
        let y_lo = b.ins().load(v4, fl, py, 0);
        let y_hi = b.ins().load(v4, fl, py, 16);
        let (n0, n1) = if jit.has_fma {
            (b.ins().fma(x_lo, y_lo, a0), b.ins().fma(x_hi, y_hi, a1))
        } else {
            let m0 = b.ins().fmul(x_lo, y_lo);
            let m1 = b.ins().fmul(x_hi, y_hi);
            (b.ins().fadd(m0, a0), b.ins().fadd(m1, a1))
        };
        let i2 = b.ins().iadd_imm_s(i, 1);
        let px2 = b.ins().iadd_imm_s(px, 32);
        let py2 = b.ins().iadd_imm_s(py, 32);
        b.ins()
            .jump(header, &[i2.into(), px2.into(), py2.into(), n0.into(), n1.into()]);
        b.switch_to_block(exit);
        let s = b.ins().fadd(a0, a1);
        let mut total = b.ins().extractlane(s, 0);
        for lane in 1..4u8 {
            let l = b.ins().extractlane(s, lane);
            total = b.ins().fadd(total, l);
        }
        b.ins().return_(&[total]);
        b.seal_all_blocks();
        b.finalize(jit.module.target_config());
    }
    jit.define_local(name, id, ctx)
}

/// Few rows (decode) and both operands contiguous along K: one dot product per output
/// element, the columns spread over the threads; no packing.
fn gemv(
    dot: DotKernel,
    jobs: &[(MatRef, MatRef, usize)],
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    par: &dyn ParFor,
) {
    let cptr = Shared(c.as_mut_ptr());
    let k8 = k / 8;
    let items = jobs.len() * n;
    let body = |lo: usize, hi: usize| {
        for item in lo..hi {
            let (job, j) = (item / n, item % n);
            let (a, b, off) = jobs[job];
            let y = &b.data[b.base + j * b.cs..b.base + j * b.cs + k];
            for i in 0..m {
                let x = &a.data[a.base + i * a.rs..a.base + i * a.rs + k];
                // SAFETY: x and y hold k >= 8·k8 elements.
                let mut s = unsafe { dot(k8 as i64, x.as_ptr(), y.as_ptr()) };
                for p in k8 * 8..k {
                    s += x[p] * y[p];
                }
                // SAFETY: element (i, j) of job `job`'s disjoint C block.
                unsafe { *cptr.get().add(off + i * n + j) = s };
            }
        }
    };
    // a GEMV this small finishes on this thread before the pool's threads would wake
    if items * m * k <= GEMV_INLINE_MACS {
        body(0, items)
    } else {
        par.run(items, &body)
    }
}

/// Multiply-adds under which [`gemv`] runs on the calling thread.
const GEMV_INLINE_MACS: usize = 1 << 17;

/// Generates the micro-kernel into the plan's module.
pub(crate) fn compile_micro_kernel(jit: &mut Jit) -> Result<FuncId, String> {
    let name = "rj_gemm_micro_4x8";
    let ptr = jit.module.target_config().pointer_type();
    let mut sig = jit.module.make_signature();
    sig.params.push(AbiParam::new(types::I64));
    for _ in 0..3 {
        sig.params.push(AbiParam::new(ptr));
    }
    let (id, mut ctx) = jit.declare_local(name, sig)?;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut jit.fbc);
        let fl = MemFlagsData::trusted();
        let v4 = types::F32X4;
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let (kc, a0, b0, c) = (p[0], p[1], p[2], p[3]);
        let mut acc = Vec::new();
        for r in 0..MR {
            for h in 0..NR / 4 {
                let var = b.declare_var(v4);
                let x = b.ins().load(v4, fl, c, ((r * NR + h * 4) * 4) as i32);
                b.def_var(var, x);
                acc.push(var);
            }
        }
        let header = b.create_block();
        let body = b.create_block();
        let exit = b.create_block();
        let i = b.append_block_param(header, types::I64);
        let pa = b.append_block_param(header, ptr);
        let pb = b.append_block_param(header, ptr);
        let zero = b.ins().iconst(types::I64, 0);
        b.ins().jump(header, &[zero.into(), a0.into(), b0.into()]);
        b.switch_to_block(header);
        let go = b
            .ins()
            .icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, i, kc);
        b.ins().brif(go, body, &[], exit, &[]);
        b.switch_to_block(body);
        let bv: Vec<_> = (0..NR / 4).map(|h| b.ins().load(v4, fl, pb, (h * 16) as i32)).collect();
        for r in 0..MR {
            let a = b.ins().load(types::F32, fl, pa, (r * 4) as i32);
            let a = b.ins().splat(v4, a);
            for (h, bh) in bv.iter().enumerate() {
                let var = acc[r * (NR / 4) + h];
                let old = b.use_var(var);
                let new = if jit.has_fma {
                    b.ins().fma(a, *bh, old)
                } else {
                    let m = b.ins().fmul(a, *bh);
                    b.ins().fadd(m, old)
                };
                b.def_var(var, new);
            }
        }
        let i2 = b.ins().iadd_imm_s(i, 1);
        let pa2 = b.ins().iadd_imm_s(pa, (MR * 4) as i64);
        let pb2 = b.ins().iadd_imm_s(pb, (NR * 4) as i64);
        b.ins().jump(header, &[i2.into(), pa2.into(), pb2.into()]);
        b.switch_to_block(exit);
        for r in 0..MR {
            for h in 0..NR / 4 {
                let x = b.use_var(acc[r * (NR / 4) + h]);
                b.ins().store(fl, x, c, ((r * NR + h * 4) * 4) as i32);
            }
        }
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(jit.module.target_config());
    }
    jit.define_local(name, id, ctx)
}

/// Where a GEMM operand's elements are: `x[i, j]` at `data[base + i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub base: usize,
    pub rs: usize,
    pub cs: usize,
}

impl MatRef<'_> {
    #[inline]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.base + i * self.rs + j * self.cs]
    }
}

/// A B operand the blocked driver packs into `kc × NR` panels.
trait PackB: Copy + Sync {
    /// Panels of `NR` columns `j0..j0 + ncw` (zero-padded), rows `p0..p0 + kc`, into `dst`.
    fn pack(&self, p0: usize, kc: usize, j0: usize, ncw: usize, dst: &mut [f32]);
}

impl PackB for MatRef<'_> {
    fn pack(&self, p0: usize, kc: usize, j0: usize, ncw: usize, dst: &mut [f32]) {
        for pj in 0..ncw.div_ceil(NR) {
            let dst = &mut dst[pj * kc * NR..(pj + 1) * kc * NR];
            for p in 0..kc {
                for jj in 0..NR {
                    let j = pj * NR + jj;
                    dst[p * NR + jj] = if j < ncw { self.at(p0 + p, j0 + j) } else { 0.0 };
                }
            }
        }
    }
}

/// Edge of the square weight blocks of the scaled FP8 GEMM (ir::fused::fp8).
pub const FP8_BLOCK: usize = 128;

/// A `K × N` E4M3 operand with one f32 scale per 128×128 block: `x[i, j]` is
/// `decode(q[base + i·rs + j·cs]) · scales[(i / 128)·scale_cols + j / 128]`, one f32 product,
/// computed as the panels are packed (never stored as an f32 copy).
#[derive(Clone, Copy)]
pub struct Fp8Mat<'a> {
    pub q: &'a [u8],
    pub base: usize,
    pub rs: usize,
    pub cs: usize,
    pub scales: &'a [f32],
    pub scale_cols: usize,
}

/// The value of every E4M3 byte (`DType::F8E4M3.decode_float`, so bit-exact by construction).
pub fn e4m3_values() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| ir::DType::F8E4M3.decode_float(b as u32)))
}

impl PackB for Fp8Mat<'_> {
    fn pack(&self, p0: usize, kc: usize, j0: usize, ncw: usize, dst: &mut [f32]) {
        let lut = e4m3_values();
        for pj in 0..ncw.div_ceil(NR) {
            let dst = &mut dst[pj * kc * NR..(pj + 1) * kc * NR];
            // a panel of NR columns never straddles a block edge: NR divides 128 and j0
            let col0 = j0 + pj * NR;
            let cols = NR.min(ncw - pj * NR);
            for p in 0..kc {
                let i = p0 + p;
                let scale = self.scales[(i / FP8_BLOCK) * self.scale_cols + col0 / FP8_BLOCK];
                let row = self.base + i * self.rs + col0 * self.cs;
                let d = &mut dst[p * NR..(p + 1) * NR];
                for (jj, x) in d.iter_mut().enumerate() {
                    *x = if jj < cols {
                        lut[usize::from(self.q[row + jj * self.cs])] * scale
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// `c[m×n] (row-major, ldc = n) = a[m×k] · b[k×n]` for each of `jobs` independent products,
/// over all threads of `par`.
/// Job `j` writes `c[off_j .. off_j + m·n]`; the offsets must not overlap.
pub fn gemm_batched(
    kernels: GemmKernels,
    jobs: &[(MatRef, MatRef, usize)],
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    par: &dyn ParFor,
) {
    if m == 0 || n == 0 {
        return;
    }
    for j in jobs {
        assert!(j.2 + m * n <= c.len(), "gemm: C too small");
    }
    if m <= 16 && jobs.iter().all(|(a, b, _)| a.cs == 1 && b.rs == 1) {
        return gemv(kernels.dot, jobs, c, (m, n, k), par);
    }
    blocked(kernels.micro, jobs, c, (m, n, k), par);
}

/// `c[m×n] = a[m×k] · b[k×n]` with the E4M3 B operand dequantised as it is packed (the scaled
/// FP8 GEMM; `a` already dequantised), over all threads of `par`.
pub fn gemm_fp8_b(
    kernels: GemmKernels,
    a: MatRef,
    b: Fp8Mat,
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    par: &dyn ParFor,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(m * n <= c.len(), "gemm: C too small");
    blocked(kernels.micro, &[(a, b, 0)], c, (m, n, k), par);
}

/// The cache-blocked driver: (job, M block, N block) tiles over the threads, B packed per
/// `KC × NC` block, A per `MC × KC` block, the micro-kernel per `MR × NR` tile.
fn blocked<B: PackB>(
    micro: MicroKernel,
    jobs: &[(MatRef, B, usize)],
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    par: &dyn ParFor,
) {
    let threads = par.threads().max(1);
    let mb = m.div_ceil(MC);
    // enough column blocks for every thread when the rows are few (decode)
    let want = (threads * 2).div_ceil(mb * jobs.len().max(1)).max(1);
    let nc = (n.div_ceil(want)).div_ceil(NR) * NR;
    let nc = nc.clamp(NR, NC_MAX);
    let nb = n.div_ceil(nc);
    let items = jobs.len() * mb * nb;
    let cptr = Shared(c.as_mut_ptr());
    par.run(items, &|lo, hi| {
        let mut apack = vec![0f32; MC * KC];
        let mut bpack = vec![0f32; KC * NC_MAX];
        let mut tile = [0f32; MR * NR];
        for item in lo..hi {
            let (job, rest) = (item / (mb * nb), item % (mb * nb));
            let (ib, jb) = (rest / nb, rest % nb);
            let (a, b) = (jobs[job].0, jobs[job].1);
            let c = unsafe { cptr.get().add(jobs[job].2) };
            let (i0, j0) = (ib * MC, jb * nc);
            let (mc, ncw) = (MC.min(m - i0), nc.min(n - j0));
            // zero this block of C first: the K blocks accumulate into it
            for i in 0..mc {
                for j in 0..ncw {
                    unsafe { *c.add((i0 + i) * n + j0 + j) = 0.0 };
                }
            }
            let mut p0 = 0;
            while p0 < k {
                let kc = KC.min(k - p0);
                // pack B: panels of NR columns, kc rows each
                let panels_n = ncw.div_ceil(NR);
                b.pack(p0, kc, j0, ncw, &mut bpack);
                let panels_m = mc.div_ceil(MR);
                for pi in 0..panels_m {
                    let dst = &mut apack[pi * kc * MR..(pi + 1) * kc * MR];
                    for p in 0..kc {
                        for ii in 0..MR {
                            let i = pi * MR + ii;
                            dst[p * MR + ii] = if i < mc { a.at(i0 + i, p0 + p) } else { 0.0 };
                        }
                    }
                }
                for pj in 0..panels_n {
                    for pi in 0..panels_m {
                        let rows = MR.min(mc - pi * MR);
                        let cols = NR.min(ncw - pj * NR);
                        let cbase = unsafe { c.add((i0 + pi * MR) * n + j0 + pj * NR) };
                        for r in 0..MR {
                            for q in 0..NR {
                                tile[r * NR + q] = if r < rows && q < cols {
                                    unsafe { *cbase.add(r * n + q) }
                                } else {
                                    0.0
                                };
                            }
                        }
                        unsafe {
                            micro(
                                kc as i64,
                                apack[pi * kc * MR..].as_ptr(),
                                bpack[pj * kc * NR..].as_ptr(),
                                tile.as_mut_ptr(),
                            )
                        };
                        for r in 0..rows {
                            for q in 0..cols {
                                unsafe { *cbase.add(r * n + q) = tile[r * NR + q] };
                            }
                        }
                    }
                }
                p0 += kc;
            }
        }
    });
}
