//! Host drivers of the blockwise FP8 (E4M3) templates (`ir::fused::fp8`): quantisation in
//! `rows × cols` blocks, dequantisation, RMSNorm (with the residual add) and SwiGLU fused with
//! the 1×128 quantisation of their output, and the block-scaled GEMM. Every element's
//! arithmetic runs in generated code: the row kernels of `vector.rs` (`amax`, `quant`,
//! `dequant`, `add`, `dot`, `rms`, `swiglu`) and the GEMM micro-kernel, which reads B panels
//! packed straight from the E4M3 bytes times their block scale (gemm.rs, `Fp8Mat`). The host
//! computes addresses, one scale per block (`amax / 448`, clamped as the reference does) and
//! `1/sqrt(ms + eps)` per row, and spreads rows (or block rows) over the threads.
//!
//! Semantics are the reference's: the same f32 division by the scale and E4M3 rounding
//! (bit-exact), the producers' intermediates rounded to their dtype before quantisation, the
//! same errors for non-finite inputs and scales. The scaled GEMM accumulates
//! `Σ (a_q·a_s)(b_q·b_s)` in f32 where the reference sums each 128-slice of raw products in f64
//! and scales the partial sums: the same value up to f32 rounding (the f32 tier inside the
//! FP8 tier).

use super::gemm::{gemm_fp8_b, Fp8Mat, GemmKernels, MatRef, FP8_BLOCK};
use super::rows::code;
use super::vector::VecKernels;
use super::ParFor;
use super::Shared;
use ir::DType;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest finite E4M3 value: a block's amax maps to it.
const E4M3_MAX: f32 = 448.0;

/// Scale of a block whose largest magnitude is `amax` (finite): `ir::fused::fp8`'s rule.
fn block_scale(amax: f32) -> f32 {
    if amax == 0.0 {
        1.0
    } else {
        (amax / E4M3_MAX).max(f32::MIN_POSITIVE)
    }
}

fn check(what: &str, got: usize, want: usize) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: {got} elements, expected {want}"))
    }
}

/// The reference's error for a non-finite input (found again on the host: the kernels only
/// report that there is one).
fn non_finite(op: &str, what: &str, v: &[f32]) -> String {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => format!("{op}: {what} holds the non-finite value {} at index {i}", v[i]),
        None => format!("{op}: {what} holds a non-finite value"),
    }
}

/// `Err` unless every scale is finite and positive (as `quantize` makes them).
fn check_scales(op: &str, what: &str, s: &[f32]) -> Result<(), String> {
    match s.iter().position(|x| !(x.is_finite() && *x > 0.0)) {
        None => Ok(()),
        Some(i) => Err(format!("{op}: {what} scale {i} is {}, expected finite and > 0", s[i])),
    }
}

/// One row of `y.len()` values quantised in 1×`cols` tiles: bytes at `q`, one scale per tile at
/// `s`. False when a tile holds a non-finite value (nothing is scaled by it).
///
/// # Safety
/// `q` holds `y.len()` bytes and `s` `ceil(len / cols)` scales.
unsafe fn quantize_row(vk: &VecKernels, y: &[f32], cols: usize, q: *mut u8, s: *mut f32) -> bool {
    for (t, tile) in y.chunks(cols).enumerate() {
        let amax = (vk.amax)(tile.len() as i64, tile.as_ptr());
        if !amax.is_finite() {
            return false;
        }
        let scale = block_scale(amax);
        (vk.quant)(tile.len() as i64, tile.as_ptr(), q.add(t * cols), scale);
        *s.add(t) = scale;
    }
    true
}

/// `QuantizeFp8 { rows, cols }` of `x [batch, r, c]`: bytes `q [batch, r, c]` and scales
/// `[batch, ceil(r/rows), ceil(c/cols)]`; one block row (`rows` rows of the input) per
/// parallel index.
#[allow(clippy::too_many_arguments)]
pub fn quantize(
    vk: &VecKernels,
    x: &[f32],
    (batch, r, c): (usize, usize, usize),
    (rows, cols): (usize, usize),
    q: &mut [u8],
    scales: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    const OP: &str = "quantize_fp8";
    if rows == 0 || cols == 0 {
        return Err(format!("{OP}: block {rows}x{cols} must not be empty"));
    }
    let (rb, cb) = (r.div_ceil(rows), c.div_ceil(cols));
    check("quantize_fp8 input", x.len(), batch * r * c)?;
    check("quantize_fp8 q", q.len(), x.len())?;
    check("quantize_fp8 scales", scales.len(), batch * rb * cb)?;
    if x.is_empty() {
        return Ok(());
    }
    let (qo, so) = (Shared(q.as_mut_ptr()), Shared(scales.as_mut_ptr()));
    let bad = AtomicBool::new(false);
    par.run(batch * rb, &|lo, hi| {
        for unit in lo..hi {
            let (n, bi) = (unit / rb, unit % rb);
            let row0 = n * r + bi * rows;
            let nrows = rows.min(r - bi * rows);
            for bj in 0..cb {
                let (c0, w) = (bj * cols, cols.min(c - bj * cols));
                // the block's amax over its rows (NaN-propagating, as the kernel's max)
                let mut amax = 0f32;
                for i in 0..nrows {
                    let seg = &x[(row0 + i) * c + c0..][..w];
                    // SAFETY: `seg` holds w values.
                    let m = unsafe { (vk.amax)(w as i64, seg.as_ptr()) };
                    amax = if m.is_nan() { m } else { amax.max(m) };
                }
                if !amax.is_finite() {
                    bad.store(true, Ordering::Relaxed);
                    return;
                }
                let scale = block_scale(amax);
                // SAFETY: block (n, bi, bj)'s scale and bytes belong to this block row only.
                unsafe {
                    *so.at((n * rb + bi) * cb + bj) = scale;
                    for i in 0..nrows {
                        let at = (row0 + i) * c + c0;
                        (vk.quant)(w as i64, x[at..].as_ptr(), qo.at(at), scale);
                    }
                }
            }
        }
    });
    if bad.load(Ordering::Relaxed) {
        return Err(non_finite(OP, "the input", x));
    }
    Ok(())
}

/// `DequantizeFp8 { rows, cols, to }`: `y = q · scale` (one f32 product) rounded to `to`; one
/// row per parallel index.
#[allow(clippy::too_many_arguments)]
pub fn dequantize(
    vk: &VecKernels,
    (q, scales): (&[u8], &[f32]),
    (batch, r, c): (usize, usize, usize),
    (rows, cols): (usize, usize),
    to: DType,
    y: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    const OP: &str = "dequantize_fp8";
    if rows == 0 || cols == 0 {
        return Err(format!("{OP}: block {rows}x{cols} must not be empty"));
    }
    let (rb, cb) = (r.div_ceil(rows), c.div_ceil(cols));
    check("dequantize_fp8 q", q.len(), batch * r * c)?;
    check("dequantize_fp8 output", y.len(), q.len())?;
    if scales.len() != batch * rb * cb {
        return Err(format!(
            "{OP}: {} scales do not fit [{batch}, {r}, {c}] in {rows}x{cols} blocks (expected {})",
            scales.len(),
            batch * rb * cb
        ));
    }
    check_scales(OP, "the", scales)?;
    let yo = Shared(y.as_mut_ptr());
    let bad = AtomicBool::new(false);
    let ro = code(to);
    par.run(batch * r, &|lo, hi| {
        for row in lo..hi {
            let (n, i) = (row / r, row % r);
            for bj in 0..cb {
                let (at, w) = (row * c + bj * cols, cols.min(c - bj * cols));
                let s = scales[(n * rb + i / rows) * cb + bj];
                // SAFETY: w bytes and w outputs of this row.
                let nan = unsafe { (vk.dequant)(w as i64, q[at..].as_ptr(), yo.at(at), s, ro) };
                if nan.is_nan() {
                    bad.store(true, Ordering::Relaxed);
                }
            }
        }
    });
    if bad.load(Ordering::Relaxed) {
        let i = q.iter().position(|&b| b & 0x7f == 0x7f).unwrap_or(0);
        return Err(format!("{OP}: q holds the non-finite value NaN at index {i}"));
    }
    Ok(())
}

/// RMSNorm (after the residual add when `a` is given) quantised in 1×128 tiles: rows of `d`;
/// `s = r_sum(h + a)` into `sum`, the normalised value rounded to `norm_dt` and times `w`
/// rounded to `out_dt` (a per-thread row), then its tiles' amax, scales and E4M3 bytes.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_quant(
    vk: &VecKernels,
    (h, a, w): (&[f32], Option<&[f32]>, &[f32]),
    d: usize,
    eps: f64,
    (norm_dt, out_dt): (DType, DType),
    sum: Option<&mut [f32]>,
    q: &mut [u8],
    scales: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    const OP: &str = "rms_norm_quant_fp8";
    check("rms_norm_quant_fp8 weight", w.len(), d)?;
    check("rms_norm_quant_fp8 q", q.len(), h.len())?;
    if d == 0 || h.is_empty() {
        return Ok(());
    }
    let rows = h.len() / d;
    let tiles = d.div_ceil(FP8_BLOCK);
    check("rms_norm_quant_fp8 scales", scales.len(), rows * tiles)?;
    if let Some(a) = a {
        check("add_rms_norm_quant_fp8 addend", a.len(), h.len())?;
    }
    let sum = match (a, sum) {
        (Some(_), Some(s)) => {
            check("add_rms_norm_quant_fp8 sum", s.len(), h.len())?;
            Some(Shared(s.as_mut_ptr()))
        }
        (None, None) => None,
        _ => return Err(format!("{OP}: a residual sum without its addend")),
    };
    let (qo, so) = (Shared(q.as_mut_ptr()), Shared(scales.as_mut_ptr()));
    let (rn, ro) = (code(norm_dt), code(out_dt));
    let bad = AtomicBool::new(false);
    par.run(rows, &|lo, hi| {
        let mut y = vec![0f32; d];
        for r in lo..hi {
            let at = r * d;
            // SAFETY: rows of d elements inside every operand (checked above); row r of the
            // outputs belongs to this piece only.
            unsafe {
                let src = match (a, sum) {
                    (Some(a), Some(s)) => {
                        (vk.add)(d as i64, h[at..].as_ptr(), a[at..].as_ptr(), s.at(at), rn);
                        s.at(at) as *const f32
                    }
                    _ => h[at..].as_ptr(),
                };
                let ss = (vk.dot)(d as i64, src, src);
                let inv = (1.0 / (f64::from(ss) / d as f64 + eps).sqrt()) as f32;
                (vk.rms)(d as i64, src, w.as_ptr(), y.as_mut_ptr(), inv, rn, ro);
                if !quantize_row(vk, &y, FP8_BLOCK, qo.at(at), so.at(r * tiles)) {
                    bad.store(true, Ordering::Relaxed);
                }
            }
        }
    });
    if bad.load(Ordering::Relaxed) {
        return Err(format!("{OP}: the normalised value holds a non-finite value"));
    }
    Ok(())
}

/// SwiGLU (`r_y(r_g(g·r_g(sigmoid(g)))·u)`) quantised in 1×128 tiles, rows of `d`.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_quant(
    vk: &VecKernels,
    (g, u): (&[f32], &[f32]),
    d: usize,
    (g_dt, y_dt): (DType, DType),
    q: &mut [u8],
    scales: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    const OP: &str = "swiglu_quant_fp8";
    check("swiglu_quant_fp8 up", u.len(), g.len())?;
    check("swiglu_quant_fp8 q", q.len(), g.len())?;
    if d == 0 || g.is_empty() {
        return Ok(());
    }
    let rows = g.len() / d;
    let tiles = d.div_ceil(FP8_BLOCK);
    check("swiglu_quant_fp8 scales", scales.len(), rows * tiles)?;
    let (qo, so) = (Shared(q.as_mut_ptr()), Shared(scales.as_mut_ptr()));
    let (rg, ry) = (code(g_dt), code(y_dt));
    let bad = AtomicBool::new(false);
    par.run(rows, &|lo, hi| {
        let mut y = vec![0f32; d];
        for r in lo..hi {
            let at = r * d;
            // SAFETY: rows of d elements inside g, u and q; row r's scales are this piece's.
            unsafe {
                (vk.swiglu)(d as i64, g[at..].as_ptr(), u[at..].as_ptr(), y.as_mut_ptr(), rg, ry);
                if !quantize_row(vk, &y, FP8_BLOCK, qo.at(at), so.at(r * tiles)) {
                    bad.store(true, Ordering::Relaxed);
                }
            }
        }
    });
    if bad.load(Ordering::Relaxed) {
        return Err(format!("{OP}: the product holds a non-finite value"));
    }
    Ok(())
}

/// Few rows (decode): the scaled GEMM as row updates instead of packed tiles.
const GEMV_ROWS: usize = 16;

/// Columns per parallel index of the few-rows path: divides the 128-column scale blocks.
const GEMV_COLS: usize = 64;

/// `c [rows, n] = a [rows, k] @ (b_q·b_s)` for few rows and B contiguous along N: one strip
/// of `GEMV_COLS` columns per parallel index, run by the generated `gemv_fp8` kernel (each
/// B byte decoded once, times its block's scale, then `acc += a[i, p] · b` for every row, in
/// order of p); the strip's last `w % 4` columns by its one-column form.
fn gemv_fp8(
    vk: &VecKernels,
    a: &[f32],
    b: Fp8Mat,
    (rows, n, k): (usize, usize, usize),
    c: &mut [f32],
    par: &dyn ParFor,
) {
    let co = Shared(c.as_mut_ptr());
    par.run(n.div_ceil(GEMV_COLS), &|lo, hi| {
        let mut acc = vec![0f32; rows * GEMV_COLS];
        for item in lo..hi {
            let j0 = item * GEMV_COLS;
            let w = GEMV_COLS.min(n - j0);
            let w4 = w / 4 * 4;
            acc.fill(0.0);
            let q = b.q[b.base + j0..].as_ptr();
            let s = b.scales[j0 / FP8_BLOCK..].as_ptr();
            // SAFETY: k rows of w bytes of B from column j0 (stride rs), rows × k values of A,
            // one scale per 128 rows (stride scale_cols), rows × GEMV_COLS accumulators.
            unsafe {
                let (rs, sc, g) = (b.rs as i64, b.scale_cols as i64, GEMV_COLS as i64);
                let x = a.as_ptr();
                (vk.gemv_fp8_x4)(
                    k as i64,
                    w4 as i64,
                    rows as i64,
                    q,
                    rs,
                    x,
                    k as i64,
                    s,
                    sc,
                    acc.as_mut_ptr(),
                    g,
                );
                if w4 < w {
                    let (qt, at) = (q.add(w4), acc.as_mut_ptr().add(w4));
                    (vk.gemv_fp8_x1)(
                        k as i64,
                        (w - w4) as i64,
                        rows as i64,
                        qt,
                        rs,
                        x,
                        k as i64,
                        s,
                        sc,
                        at,
                        g,
                    );
                }
            }
            for i in 0..rows {
                // SAFETY: row i's columns j0..j0 + w of C belong to this item only.
                unsafe { std::ptr::copy_nonoverlapping(acc[i * GEMV_COLS..].as_ptr(), co.at(i * n + j0), w) };
            }
        }
    });
}

/// The block-scaled FP8 GEMM `c [rows, n] = (a_q·a_s) [rows, k] @ (b_q·b_s) [k, n]` in f32:
/// A dequantised per 1×128 tile by the generated `dequant` (one row per parallel index), B
/// dequantised as its panels are packed. `a_s [rows, ceil(k/128)]`; `b` carries its scales.
#[allow(clippy::too_many_arguments)]
pub fn scaled_gemm(
    gk: GemmKernels,
    vk: &VecKernels,
    (aq, a_s): (&[u8], &[f32]),
    b: Fp8Mat,
    (rows, n, k): (usize, usize, usize),
    c: &mut [f32],
    par: &dyn ParFor,
) -> Result<(), String> {
    const OP: &str = "scaled_matmul_fp8";
    let kb = k.div_ceil(FP8_BLOCK);
    check("scaled_matmul_fp8 a_q", aq.len(), rows * k)?;
    check("scaled_matmul_fp8 a's scales", a_s.len(), rows * kb)?;
    check(
        "scaled_matmul_fp8 b's scales",
        b.scales.len(),
        kb * n.div_ceil(FP8_BLOCK),
    )?;
    check("scaled_matmul_fp8 output", c.len(), rows * n)?;
    check_scales(OP, "a", a_s)?;
    check_scales(OP, "b", b.scales)?;
    let mut a = vec![0f32; rows * k];
    let ao = Shared(a.as_mut_ptr());
    let bad = AtomicBool::new(false);
    // a few rows (decode) are not worth a hand-off to the other threads
    let apar: &dyn ParFor = if rows * k <= 1 << 14 { &super::Serial } else { par };
    apar.run(rows, &|lo, hi| {
        for r in lo..hi {
            for t in 0..kb {
                let (at, w) = (r * k + t * FP8_BLOCK, FP8_BLOCK.min(k - t * FP8_BLOCK));
                // SAFETY: w bytes of row r and their w outputs.
                let nan = unsafe { (vk.dequant)(w as i64, aq[at..].as_ptr(), ao.at(at), a_s[r * kb + t], 0) };
                if nan.is_nan() {
                    bad.store(true, Ordering::Relaxed);
                }
            }
        }
    });
    if bad.load(Ordering::Relaxed) {
        let i = aq.iter().position(|&x| x & 0x7f == 0x7f).unwrap_or(0);
        return Err(format!("{OP}: a_q holds the non-finite value NaN at index {i}"));
    }
    if rows <= GEMV_ROWS && b.cs == 1 {
        gemv_fp8(vk, &a, b, (rows, n, k), c, par);
    } else {
        let ar = MatRef {
            data: &a,
            base: 0,
            rs: k,
            cs: 1,
        };
        gemm_fp8_b(gk, ar, b, c, (rows, n, k), par);
    }
    // a NaN byte of B (E4M3 has no infinity) shows as a NaN product: only then look for it
    if c.iter().any(|x| x.is_nan()) {
        for i in 0..k {
            for j in 0..n {
                if b.q[b.base + i * b.rs + j * b.cs] & 0x7f == 0x7f {
                    return Err(format!(
                        "{OP}: b_q holds the non-finite value NaN at index {}",
                        i * n + j
                    ));
                }
            }
        }
    }
    Ok(())
}
