//! Copies forwarded into their producer: a loop kernel that only copies a template's result
//! into another layout is removed, and the template stores its result in that layout itself.
//!
//! The partition folds views into indexing wherever a strided view can express them. A permute
//! followed by a reshape that merges the permuted dims cannot be: Ring's attention output
//! `[b, Hkv, G, s, d]` read as `[b, s, Hkv·G·d]` by the output projection is one such chain
//! (it merges `(Hkv, G)` after moving `s` in front of them, and `s` is symbolic). The partition
//! then stores a permuted copy, one loop kernel per attention layer. Read the other way round,
//! the same chain is a strided view of the *copy's* buffer indexed by the *producer's* result:
//! every producer axis lands on one copy axis with a multiplier (`(Hkv, G)` split out of
//! `Hkv·G`). So the producer writes the copy's buffer through that view, and the loop goes.
//!
//! Only producers whose code generators store every result element through its output view
//! (the attention template: both backends and `ir::kernel_eval` store through
//! `Kernel::outputs[port].view`) qualify; the fast GEMM paths assume contiguous rows and do not.

use ir::kernel::{
    BufferId, BufferKind, IndexExpr, IndexVar, Kernel, KernelKind, KernelPlan, ScalarOp, TemplateOp, View,
};
use ir::Dim;

/// Forward every qualifying copy of `plan` into its producer; returns how many went.
pub fn forward_copies(plan: &mut KernelPlan) -> usize {
    let mut n = 0;
    while let Some((copy, producer, port, view)) = find(plan) {
        let out = plan.kernels[copy].outputs[0].buffer;
        let gone = plan.kernels[producer].outputs[port].buffer;
        let nodes = plan.kernels[copy].nodes.clone();
        let p = &mut plan.kernels[producer];
        p.outputs[port] = ir::kernel::BufferRef { buffer: out, view };
        p.nodes.extend(nodes);
        plan.kernels.remove(copy);
        drop_buffer(plan, gone);
        n += 1;
    }
    n
}

/// (copy kernel, producer kernel, producer's output port, the producer's new output view).
fn find(plan: &KernelPlan) -> Option<(usize, usize, usize, View)> {
    for (c, k) in plan.kernels.iter().enumerate() {
        let Some((src, dst)) = pure_copy(plan, k) else { continue };
        let b = src.buffer;
        if plan.buffer(b).map(|x| x.kind) != Some(BufferKind::Intermediate) {
            continue;
        }
        // the one writer of b, before the copy; nobody else reads b
        let writers: Vec<usize> = (0..plan.kernels.len())
            .filter(|&i| plan.kernels[i].outputs.iter().any(|r| r.buffer == b))
            .collect();
        let readers = plan
            .kernels
            .iter()
            .filter(|x| x.inputs.iter().any(|r| r.buffer == b))
            .count();
        let &[p] = writers.as_slice() else { continue };
        if p >= c || readers != 1 {
            continue;
        }
        let prod = &plan.kernels[p];
        let KernelKind::Template(t) = &prod.kind else { continue };
        if !matches!(t.op, TemplateOp::Attention { .. }) {
            continue;
        }
        let Some(port) = prod.outputs.iter().position(|r| r.buffer == b) else {
            continue;
        };
        let shape = &plan.buffer(b)?.shape;
        if prod.outputs[port].view != View::contiguous(shape) {
            continue;
        }
        // nothing between the producer and the copy touches the copy's destination
        let d = dst.buffer;
        let touched = plan.kernels[p..=c].iter().enumerate().any(|(i, x)| {
            x.inputs.iter().any(|r| r.buffer == d) || (i != c - p && x.outputs.iter().any(|r| r.buffer == d))
        });
        if touched {
            continue;
        }
        if let Some(view) = compose(&src.view, &dst.view, shape) {
            return Some((c, p, port, view));
        }
    }
    None
}

/// `(source, destination)` of a loop kernel that stores one input, element for element, into
/// one output of the same dtype: `out[i] = in[i]` over its whole domain.
fn pure_copy<'a>(plan: &KernelPlan, k: &'a Kernel) -> Option<(&'a ir::kernel::BufferRef, &'a ir::kernel::BufferRef)> {
    let KernelKind::Loop(l) = &k.kind else { return None };
    if k.inputs.len() != 1 || k.outputs.len() != 1 || l.stores.len() != 1 || l.exprs.nodes.len() != 1 {
        return None;
    }
    let node = l.exprs.get(l.stores[0])?;
    let ScalarOp::Load { input: 0, index } = &node.op else {
        return None;
    };
    let identity = index.len() == l.domain.len()
        && index
            .iter()
            .enumerate()
            .all(|(a, e)| *e == IndexExpr::var(IndexVar::Loop(a as u32)));
    let (src, dst) = (&k.inputs[0], &k.outputs[0]);
    let same_type = plan.buffer(src.buffer)?.dtype == node.dtype && plan.buffer(dst.buffer)?.dtype == node.dtype;
    (identity && same_type && src.view.shape == l.domain && dst.view.shape == l.domain).then_some((src, dst))
}

/// The view over `dst`'s buffer, indexed like the contiguous buffer of `shape`, that puts each
/// element where the copy `dst[i] = src[i]` put it. Each axis of the copy's domain must read a
/// run of adjacent axes of `shape` (outer to inner, merged); None otherwise.
fn compose(src: &View, dst: &View, shape: &[Dim]) -> Option<View> {
    let one = Dim::constant(1);
    if src.offset != Dim::constant(0) {
        return None;
    }
    let cs = View::contiguous(shape).strides;
    // per axis of `shape`: (copy axis, multiplier inside that axis's index)
    let mut at: Vec<Option<(usize, Dim)>> = vec![None; shape.len()];
    for (a, (n, s)) in src.shape.iter().zip(&src.strides).enumerate() {
        if *n == one {
            continue;
        }
        // the innermost axis of the run: the one whose stride is the copy axis's stride
        let mut k = (0..shape.len()).find(|&k| shape[k] != one && cs[k] == *s && at[k].is_none())?;
        let mut covered = one.clone();
        loop {
            // the multiplier of this axis inside the copy axis: the sizes of the run inside it
            at[k] = Some((a, covered.clone()));
            covered = covered.mul(&shape[k]);
            if covered == *n {
                break;
            }
            if covered.as_const().zip(n.as_const()).is_some_and(|(c, t)| c >= t) {
                return None;
            }
            // the next axis outward (size-1 axes skipped): adjacent in memory, by contiguity
            k = (0..k).rev().find(|&j| shape[j] != one)?;
            if at[k].is_some() {
                return None;
            }
        }
    }
    let mut strides = Vec::with_capacity(shape.len());
    for (k, d) in shape.iter().enumerate() {
        match &at[k] {
            Some((a, m)) => strides.push(dst.strides[*a].mul(m)),
            None if *d == one => strides.push(Dim::constant(0)),
            None => return None,
        }
    }
    Some(View {
        shape: shape.to_vec(),
        strides,
        offset: dst.offset.clone(),
    })
}

/// Remove buffer `b` (no kernel uses it any more) and renumber the others.
fn drop_buffer(plan: &mut KernelPlan, b: BufferId) {
    let fix = |x: &mut BufferId| {
        if x.0 > b.0 {
            x.0 -= 1;
        }
    };
    plan.buffers.remove(b.0 as usize);
    for k in &mut plan.kernels {
        for r in k.inputs.iter_mut().chain(k.outputs.iter_mut()) {
            fix(&mut r.buffer);
        }
    }
    plan.inputs.iter_mut().for_each(fix);
    for o in &mut plan.outputs {
        fix(&mut o.buffer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: i64) -> Dim {
        Dim::constant(c)
    }

    /// Ring's attention output `[b, Hkv, G, s, dh]` read as `[b, s, Hkv·G, dh]`: the producer
    /// writes `[b, s, Hkv·G·dh]` rows directly.
    #[test]
    fn the_attention_permute_becomes_the_producers_output_view() {
        let (b, s) = (Dim::sym("batch"), Dim::sym("seq"));
        let shape = vec![b.clone(), d(4), d(2), s.clone(), d(8)];
        let cs = View::contiguous(&shape).strides;
        // the copy reads [b, s, 8, 8] with (Hkv, G) merged after the permute
        let src = View {
            shape: vec![b.clone(), s.clone(), d(8), d(8)],
            strides: vec![cs[0].clone(), cs[3].clone(), cs[2].clone(), d(1)],
            offset: d(0),
        };
        let dst = View::contiguous(&src.shape);
        let v = compose(&src, &dst, &shape).unwrap();
        let want = vec![s.mul(&d(64)), d(16), d(8), d(64), d(1)];
        assert_eq!(v.strides, want);
        assert_eq!(v.shape, shape);
    }

    #[test]
    fn a_copy_of_part_of_a_buffer_or_of_a_broadcast_is_not_forwarded() {
        let shape = vec![d(4), d(16)];
        let dst = View::contiguous(&[d(4), d(8)]);
        let half = View {
            shape: vec![d(4), d(8)],
            strides: vec![d(16), d(1)],
            offset: d(0),
        };
        assert_eq!(compose(&half, &dst, &shape), None);
        let shape = vec![d(4), d(8)];
        let bcast = View {
            shape: vec![d(4), d(8)],
            strides: vec![d(0), d(1)],
            offset: d(0),
        };
        assert_eq!(compose(&bcast, &dst, &shape), None);
        let shifted = View {
            offset: d(8),
            ..View::contiguous(&shape)
        };
        assert_eq!(compose(&shifted, &dst, &shape), None);
        // a plain transpose is forwarded: [4, 8] read as [8, 4]
        let t = View {
            shape: vec![d(8), d(4)],
            strides: vec![d(1), d(8)],
            offset: d(0),
        };
        let v = compose(&t, &View::contiguous(&[d(8), d(4)]), &shape).unwrap();
        assert_eq!(v.strides, vec![d(1), d(4)]);
    }
}
