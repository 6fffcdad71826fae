//! Reference semantics of composite ops (see `super::Fused` for each op's contract).

use crate::graph::TensorType;
use crate::tensor::Tensor;

pub(super) fn chunked(chunk: usize, args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    let _ = (chunk, args, out);
    Err("chunked: no reference semantics yet".into())
}

pub(super) fn stepwise(args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    let _ = (args, out);
    Err("stepwise: no reference semantics yet".into())
}

pub(super) fn group_norm_gate(
    groups: usize,
    eps: f64,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let _ = (groups, eps, args, out);
    Err("group_norm_gate: no reference semantics yet".into())
}
