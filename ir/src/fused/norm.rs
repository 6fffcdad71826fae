//! Reference semantics of composite ops (see `super::Fused` for each op's contract).

use crate::graph::TensorType;
use crate::tensor::Tensor;

pub(super) fn rms_norm(eps: f64, args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    let _ = (eps, args, out);
    Err("rms_norm: no reference semantics yet".into())
}

pub(super) fn add_rms_norm(
    eps: f64,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let _ = (eps, args, out);
    Err("add_rms_norm: no reference semantics yet".into())
}

pub(super) fn swiglu(args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    let _ = (args, out);
    Err("swiglu: no reference semantics yet".into())
}

pub(super) fn softmax(args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
    let _ = (args, out);
    Err("softmax: no reference semantics yet".into())
}

pub(super) fn qk_norm_rope(
    eps: f64,
    rotary: usize,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let _ = (eps, rotary, args, out);
    Err("qk_norm_rope: no reference semantics yet".into())
}
