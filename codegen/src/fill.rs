//! Utility kernels the runtime needs beside the model's own: filling device memory with seeded
//! random values (benchmark weights made on the GPU, where generating 16 billion values on the
//! host would take minutes).

use crate::ptx::{add_kernel, module_to_ptx, sreg, CodegenError, GpuTarget, GLOBAL};
use inkwell::context::Context;
use inkwell::AddressSpace;

/// Entry names of [`fill_random_ptx`], by element type.
pub const FILL_F32: &str = "ringjit_fill_random_f32";
pub const FILL_BF16: &str = "ringjit_fill_random_bf16";
/// Threads per block the fill kernels are written for (one element per thread).
pub const FILL_BLOCK: u32 = 256;

/// A module with two kernels, `ringjit_fill_random_{f32,bf16}(out, n: u64, seed: u64, std: f32,
/// mean: f32)`: element `i < n` becomes `mean + std · u`, `u` uniform on [−√3, √3] (unit
/// variance) from a 64-bit mix of `seed` and `i`, so the values depend only on the seed and the
/// index, never on the launch shape. bf16 rounds to nearest even. Launch one thread per element
/// in blocks of [`FILL_BLOCK`].
pub fn fill_random_ptx(t: &GpuTarget) -> Result<String, CodegenError> {
    let ctx = Context::create();
    let module = ctx.create_module("ringjit_fill");
    let (f32t, i64t, i32t, i16t) = (ctx.f32_type(), ctx.i64_type(), ctx.i32_type(), ctx.i16_type());
    let gptr = ctx.ptr_type(AddressSpace::from(GLOBAL));
    let err = |e: inkwell::builder::BuilderError| CodegenError(format!("building the fill kernel: {e}"));
    for (name, bf16) in [(FILL_F32, false), (FILL_BF16, true)] {
        let f = add_kernel(
            &ctx,
            &module,
            name,
            &[gptr.into(), i64t.into(), i64t.into(), f32t.into(), f32t.into()],
        );
        let b = ctx.create_builder();
        let entry = ctx.append_basic_block(f, "entry");
        let body = ctx.append_basic_block(f, "body");
        let exit = ctx.append_basic_block(f, "exit");
        b.position_at_end(entry);
        let tid = sreg(&ctx, &module, &b, "tid.x");
        let bid = sreg(&ctx, &module, &b, "ctaid.x");
        let bdim = sreg(&ctx, &module, &b, "ntid.x");
        let z = |v| b.build_int_z_extend(v, i64t, "z");
        let i = b
            .build_int_add(
                b.build_int_mul(z(bid).map_err(err)?, z(bdim).map_err(err)?, "base")
                    .map_err(err)?,
                z(tid).map_err(err)?,
                "i",
            )
            .map_err(err)?;
        let p = |k: u32| f.get_nth_param(k).expect("param");
        let n = p(1).into_int_value();
        let inside = b
            .build_int_compare(inkwell::IntPredicate::ULT, i, n, "inside")
            .map_err(err)?;
        b.build_conditional_branch(inside, body, exit).map_err(err)?;
        b.position_at_end(body);
        // splitmix64 of seed + (i + 1) · golden ratio
        let c = |v: u64| i64t.const_int(v, false);
        let mut x = b
            .build_int_add(
                p(2).into_int_value(),
                b.build_int_mul(
                    b.build_int_add(i, c(1), "i1").map_err(err)?,
                    c(0x9e37_79b9_7f4a_7c15),
                    "g",
                )
                .map_err(err)?,
                "x",
            )
            .map_err(err)?;
        for (shift, mul) in [(30u64, 0xbf58_476d_1ce4_e5b9u64), (27, 0x94d0_49bb_1331_11eb)] {
            let s = b.build_right_shift(x, c(shift), false, "s").map_err(err)?;
            x = b.build_xor(x, s, "x").map_err(err)?;
            x = b.build_int_mul(x, c(mul), "x").map_err(err)?;
        }
        let s = b.build_right_shift(x, c(31), false, "s").map_err(err)?;
        x = b.build_xor(x, s, "x").map_err(err)?;
        // top 24 bits → [0, 1) → [−√3, √3)
        let top = b.build_right_shift(x, c(40), false, "top").map_err(err)?;
        let u = b.build_unsigned_int_to_float(top, f32t, "u").map_err(err)?;
        let sqrt3 = 3f32.sqrt();
        let u = b
            .build_float_mul(u, f32t.const_float(f64::from(2.0 * sqrt3 / 16_777_216.0)), "u")
            .map_err(err)?;
        let u = b
            .build_float_sub(u, f32t.const_float(f64::from(sqrt3)), "u")
            .map_err(err)?;
        let v = b.build_float_mul(u, p(3).into_float_value(), "v").map_err(err)?;
        let v = b.build_float_add(v, p(4).into_float_value(), "v").map_err(err)?;
        let out = p(0).into_pointer_value();
        if bf16 {
            // round to nearest even on the upper 16 bits
            let bits = b.build_bit_cast(v, i32t, "bits").map_err(err)?.into_int_value();
            let c32 = |v: u64| i32t.const_int(v, false);
            let lsb = b
                .build_and(
                    b.build_right_shift(bits, c32(16), false, "h").map_err(err)?,
                    c32(1),
                    "lsb",
                )
                .map_err(err)?;
            let r = b
                .build_int_add(b.build_int_add(bits, c32(0x7fff), "r").map_err(err)?, lsb, "r")
                .map_err(err)?;
            let h = b.build_right_shift(r, c32(16), false, "h").map_err(err)?;
            let h = b.build_int_truncate(h, i16t, "h16").map_err(err)?;
            // SAFETY (of the generated code): i < n and the caller passes n elements.
            let q = unsafe { b.build_in_bounds_gep(i16t, out, &[i], "q") }.map_err(err)?;
            b.build_store(q, h).map_err(err)?;
        } else {
            // SAFETY (of the generated code): as above.
            let q = unsafe { b.build_in_bounds_gep(f32t, out, &[i], "q") }.map_err(err)?;
            b.build_store(q, v).map_err(err)?;
        }
        b.build_unconditional_branch(exit).map_err(err)?;
        b.position_at_end(exit);
        b.build_return(None).map_err(err)?;
    }
    module_to_ptx(&module, t)
}

/// The value the fill kernels write at index `i` (before any bf16 rounding): the host twin,
/// for tests.
pub fn fill_value(seed: u64, i: u64, std: f32, mean: f32) -> f32 {
    let mut x = seed.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let sqrt3 = 3f32.sqrt();
    let u = (x >> 40) as f32 * (2.0 * sqrt3 / 16_777_216.0) - sqrt3;
    u * std + mean
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_kernels_assemble_and_the_host_twin_has_unit_variance() {
        let ptx = fill_random_ptx(&GpuTarget::default()).unwrap();
        assert!(ptx.contains(&format!(".visible .entry {FILL_BF16}(")), "{ptx}");
        assert!(ptx.contains(&format!(".visible .entry {FILL_F32}(")), "{ptx}");
        if let Err(e) = crate::ptxas::check(&ptx) {
            panic!("{e}");
        }
        let n = 100_000u64;
        let v: Vec<f64> = (0..n).map(|i| f64::from(fill_value(7, i, 1.0, 0.0))).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
    }
}
