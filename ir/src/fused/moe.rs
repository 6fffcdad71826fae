//! Reference semantics of composite ops (see `super::Fused` for each op's contract).

use super::GroupedEpilogue;
use crate::graph::TensorType;
use crate::tensor::Tensor;

#[allow(clippy::too_many_arguments)]
pub(super) fn route_topk(
    k: usize,
    n_group: usize,
    topk_group: usize,
    scale: f64,
    normalize: bool,
    biased: bool,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let _ = (k, n_group, topk_group, scale, normalize, biased, args, out);
    Err("route_topk: no reference semantics yet".into())
}

pub(super) fn grouped_matmul(
    epilogue: GroupedEpilogue,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let _ = (epilogue, args, out);
    Err("grouped_matmul: no reference semantics yet".into())
}
