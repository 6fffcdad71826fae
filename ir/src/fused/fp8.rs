//! Reference semantics of composite ops (see `super::Fused` for each op's contract).

use crate::dtype::DType;
use crate::graph::TensorType;
use crate::tensor::Tensor;

pub(super) fn quantize(
    rows: usize,
    cols: usize,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let _ = (rows, cols, args, out);
    Err("quantize: no reference semantics yet".into())
}

pub(super) fn dequantize(
    rows: usize,
    cols: usize,
    to: DType,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let _ = (rows, cols, to, args, out);
    Err("dequantize: no reference semantics yet".into())
}

pub(super) fn scaled_matmul(
    to: DType,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let _ = (to, args, out);
    Err("scaled_matmul: no reference semantics yet".into())
}
