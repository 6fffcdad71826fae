//! Tensor-core building blocks shared by the GEMM, grouped-GEMM and attention templates:
//! `ldmatrix` and the bf16 `mma.sync.m16n8k16` with f32 accumulators, as inline PTX.

use super::super::emit::{Ck, Em, R};
use inkwell::types::{BasicMetadataTypeEnum, BasicType, BasicTypeEnum};
use inkwell::values::{BasicMetadataValueEnum, FloatValue, IntValue};

/// `ldmatrix.x4` (optionally `.trans`) at the 32-bit shared address `a`: four b16x2 registers.
pub(super) fn ldmatrix<'c>(em: &Em<'c, '_>, a: IntValue<'c>, trans: bool) -> R<[IntValue<'c>; 4]> {
    let i32t = em.ctx.i32_type();
    let ty: BasicTypeEnum = em.ctx.struct_type(&[i32t.into(); 4], false).into();
    let text = format!(
        "ldmatrix.sync.aligned.m8n8.x4{}.shared.b16 {{$0, $1, $2, $3}}, [$4];",
        if trans { ".trans" } else { "" }
    );
    let f = ty.fn_type(&[i32t.into()], false);
    let asm = em
        .ctx
        .create_inline_asm(f, text, "=r,=r,=r,=r,r,~{memory}".to_string(), true, false, None, false);
    let s =
        em.b.build_indirect_call(f, asm, &[a.into()], "")
            .ck()?
            .try_as_basic_value()
            .expect_basic("a value")
            .into_struct_value();
    let mut out = [a; 4];
    for (j, o) in out.iter_mut().enumerate() {
        *o = em.b.build_extract_value(s, j as u32, "").ck()?.into_int_value();
    }
    Ok(out)
}

/// `c + a·b` on one m16n8k16 bf16 tile (f32 accumulators).
pub(super) fn mma<'c>(
    em: &Em<'c, '_>,
    a: &[IntValue<'c>; 4],
    b: [IntValue<'c>; 2],
    c: [FloatValue<'c>; 4],
) -> R<[FloatValue<'c>; 4]> {
    let (i32t, f32t) = (em.ctx.i32_type(), em.ctx.f32_type());
    let mut params: Vec<BasicMetadataTypeEnum> = vec![i32t.into(); 6];
    params.extend([BasicMetadataTypeEnum::from(f32t); 4]);
    let mut args: Vec<BasicMetadataValueEnum> = Vec::with_capacity(10);
    args.extend(a.iter().map(|x| BasicMetadataValueEnum::from(*x)));
    args.extend(b.iter().map(|x| BasicMetadataValueEnum::from(*x)));
    args.extend(c.iter().map(|x| BasicMetadataValueEnum::from(*x)));
    let s = em
        .asm(
            em.ctx.struct_type(&[f32t.into(); 4], false).into(),
            &params,
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, \
             {$8, $9}, {$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3",
            &args,
        )?
        .into_struct_value();
    let mut out = c;
    for (j, o) in out.iter_mut().enumerate() {
        *o = em.b.build_extract_value(s, j as u32, "").ck()?.into_float_value();
    }
    Ok(out)
}

/// Two f32 as a bf16x2 register (round to nearest even): `lo` in the low half.
pub(super) fn pack_bf16<'c>(em: &Em<'c, '_>, lo: FloatValue<'c>, hi: FloatValue<'c>) -> R<IntValue<'c>> {
    let (i32t, f32t) = (em.ctx.i32_type(), em.ctx.f32_type());
    Ok(em
        .asm(
            i32t.into(),
            &[f32t.into(), f32t.into()],
            "cvt.rn.bf16x2.f32 $0, $1, $2;",
            "=r,f,f",
            &[hi.into(), lo.into()],
        )?
        .into_int_value())
}

/// The two bf16 halves of a bf16x2 register as f32 (low, high).
pub(super) fn unpack_bf16<'c>(em: &Em<'c, '_>, w: IntValue<'c>) -> R<(FloatValue<'c>, FloatValue<'c>)> {
    let (i32t, f32t) = (em.ctx.i32_type(), em.ctx.f32_type());
    let lo = em.b.build_left_shift(w, i32t.const_int(16, false), "").ck()?;
    let hi = em.b.build_and(w, i32t.const_int(0xffff_0000, false), "").ck()?;
    Ok((
        em.b.build_bit_cast(lo, f32t, "").ck()?.into_float_value(),
        em.b.build_bit_cast(hi, f32t, "").ck()?.into_float_value(),
    ))
}
