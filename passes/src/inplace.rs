//! KV caches appended in place: a decode plan whose carried caches grow by `concat([cache,
//! new], axis)` rewritten so that each cache lives in one buffer laid out for a capacity of
//! [`CAP`] tokens along the growing axis, and the step writes only its new tokens into it.
//!
//! The functional plan (what `partition` makes) reads a cache `S` of `past` tokens and writes a
//! new buffer `O` of `past + seq` tokens: a copy of the whole cache every step. After
//! [`append_in_place`]:
//!
//! - `S` has the shape of the capacity (`past` replaced by the symbol [`CAP`] on its axis), and
//!   every view of `S` or of `O` in every kernel strides through that layout (same elements:
//!   token `t` of a row sits where it sat, rows are `CAP` tokens apart);
//! - the kernel that wrote `O` (a loop kernel storing `where(t < past, S[t], new[t − past])`)
//!   loops over the `seq` new tokens only, at `t + past`, and stores into `S`;
//! - the plan's carried output is `S` itself: the step updates the state in place.
//!
//! The runtime binds [`CAP`] to the capacity of the buffers it gives (≥ `past + seq`). The
//! rewritten plan computes exactly what the functional one does (`ir::kernel_eval` runs both:
//! see the tests).

use ir::kernel::{BufferId, BufferKind, IndexExpr, IndexVar, Kernel, KernelKind, KernelPlan, ScalarOp, View};
use ir::op::{BinaryOp, InputKind};
use ir::Dim;

/// The symbol of the caches' capacity (tokens) in a rewritten plan.
pub const CAP: &str = "kv_cap";

/// One cache rewritten by [`append_in_place`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InPlaceState {
    /// the carried state's name
    pub name: String,
    /// its buffer (in the rewritten plan, also the carried output)
    pub buffer: BufferId,
    /// the axis that grows by `seq` a step
    pub axis: usize,
}

fn contiguous(shape: &[Dim]) -> Vec<Dim> {
    View::contiguous(shape).strides
}

/// `view` (over a buffer laid out contiguously as `old`) re-expressed over the layout `new`:
/// each stride that is one of `old`'s strides becomes the matching stride of `new` (0 stays 0).
fn relayout(view: &View, old: &[Dim], new: &[Dim]) -> Result<View, String> {
    if view.offset.as_const() != Some(0) {
        return Err(format!("a view of a cache has an offset ({})", view.offset));
    }
    let strides = view
        .strides
        .iter()
        .map(|s| {
            if s.as_const() == Some(0) {
                return Ok(s.clone());
            }
            let hits: Vec<usize> = (0..old.len()).filter(|&k| old[k] == *s).collect();
            match hits.as_slice() {
                // a stride shared by two axes of size 1 apart: the outer one has the extent
                [k] | [k, ..] => Ok(new[*k].clone()),
                [] => Err(format!("a view of a cache strides by {s}, not along one of its axes")),
            }
        })
        .collect::<Result<_, String>>()?;
    Ok(View {
        shape: view.shape.clone(),
        strides,
        offset: view.offset.clone(),
    })
}

/// Whether `k` stores output `slot` as `where(index(t) < past, load(S)[identity], ...)` with
/// `t` the loop variable of `axis`, and input `s_slot` is the cache.
fn is_append(k: &Kernel, slot: usize, s_slot: usize, axis: usize) -> bool {
    let KernelKind::Loop(l) = &k.kind else { return false };
    if l.exprs.has_reduce() {
        return false;
    }
    let node = |e: ir::kernel::ExprId| l.exprs.get(e).map(|n| &n.op);
    let Some(ScalarOp::Where(c, x, _)) = l.stores.get(slot).and_then(|&e| node(e)) else {
        return false;
    };
    let Some(ScalarOp::Binary(BinaryOp::Lt, i, p)) = node(*c) else {
        return false;
    };
    let is_var = matches!(node(*i), Some(ScalarOp::Index(ix))
        if ix.offset.as_const() == Some(0) && ix.terms.len() == 1 && ix.terms[0] == (IndexVar::Loop(axis as u32), Dim::constant(1)));
    let is_past = matches!(node(*p), Some(ScalarOp::Index(ix)) if ix.terms.is_empty() && ix.offset == Dim::sym("past"));
    let loads_cache = matches!(node(*x), Some(ScalarOp::Load { input, index })
        if *input == s_slot
            && index.iter().enumerate().all(|(v, ix)| ix.offset.as_const() == Some(0)
                && ix.terms.len() == 1 && ix.terms[0] == (IndexVar::Loop(v as u32), Dim::constant(1))));
    is_var && is_past && loads_cache
}

/// `i` with loop variable `axis` replaced by `axis + shift`.
fn shifted(i: &IndexExpr, axis: usize, shift: &Dim) -> IndexExpr {
    let mut out = i.clone();
    for (v, c) in &i.terms {
        if *v == IndexVar::Loop(axis as u32) {
            out.offset = out.offset.add(&c.mul(shift));
        }
    }
    out
}

/// The plan with its growing caches updated in place (see the module docs), and which states
/// were rewritten; `Err` says why the plan does not fit the pattern (then use it as it is).
pub fn append_in_place(plan: &KernelPlan) -> Result<(KernelPlan, Vec<InPlaceState>), String> {
    let past = Dim::sym("past");
    let seq = Dim::sym("seq");
    let cap = Dim::sym(CAP);
    let mut out = plan.clone();
    let mut done = Vec::new();
    let mut shrunk_kernels = std::collections::HashSet::new();
    for (oi, o) in plan.outputs.iter().enumerate() {
        if o.kind != InputKind::State {
            continue;
        }
        let ob = &plan.buffers[o.buffer.0 as usize];
        let Some(si) = plan
            .buffers
            .iter()
            .position(|b| b.kind == BufferKind::State && b.name == o.name)
        else {
            continue;
        };
        let sid = BufferId(si as u32);
        let sb = &plan.buffers[si];
        if ob.kind != BufferKind::Output || sb.shape.len() != ob.shape.len() {
            continue;
        }
        // the growing axis: past in the cache, past + seq in the new one, all else equal
        let diff: Vec<usize> = (0..sb.shape.len()).filter(|&a| sb.shape[a] != ob.shape[a]).collect();
        let [axis] = diff.as_slice() else { continue };
        let axis = *axis;
        if sb.shape[axis] != past || ob.shape[axis] != past.add(&seq) {
            continue;
        }
        // its one writer: the append kernel
        let writers: Vec<usize> = (0..plan.kernels.len())
            .filter(|&k| plan.kernels[k].outputs.iter().any(|r| r.buffer == o.buffer))
            .collect();
        let [w] = writers.as_slice() else {
            return Err(format!("state {}: written by {} kernels", o.name, writers.len()));
        };
        let k = &plan.kernels[*w];
        let slot = k.outputs.iter().position(|r| r.buffer == o.buffer).expect("a writer");
        let s_slot = k
            .inputs
            .iter()
            .position(|r| r.buffer == sid)
            .ok_or_else(|| format!("state {}: its writer {} does not read the cache", o.name, k.name))?;
        if !is_append(k, slot, s_slot, axis) {
            return Err(format!("state {}: {} is not a plain append", o.name, k.name));
        }
        let KernelKind::Loop(l) = &k.kind else {
            unreachable!("is_append checked")
        };
        if l.domain != ob.shape || k.outputs[slot].view != View::contiguous(&ob.shape) {
            return Err(format!(
                "state {}: {} does not write the whole new cache",
                o.name, k.name
            ));
        }

        // the capacity layout of the cache, and every view of the cache or the new cache in it
        let mut cap_shape = sb.shape.clone();
        cap_shape[axis] = cap.clone();
        let (cs_s, cs_o, cs_cap) = (contiguous(&sb.shape), contiguous(&ob.shape), contiguous(&cap_shape));
        for (ki, kernel) in out.kernels.iter_mut().enumerate() {
            if let KernelKind::Scan(_) = kernel.kind {
                if ki == *w {
                    return Err("the append is a scan".into());
                }
                continue;
            }
            for r in kernel.inputs.iter_mut().chain(kernel.outputs.iter_mut()) {
                if r.buffer == sid {
                    r.view = relayout(&r.view, &cs_s, &cs_cap)?;
                } else if r.buffer == o.buffer {
                    r.view = relayout(&r.view, &cs_o, &cs_cap)?;
                    r.buffer = sid;
                }
            }
        }
        // the append kernel: the new tokens only, at past + t (once for a kernel appending
        // to several caches, the K and V of a layer)
        let kernel = &mut out.kernels[*w];
        let first = shrunk_kernels.insert(*w);
        if let (true, KernelKind::Loop(l)) = (first, &mut kernel.kind) {
            l.domain[axis] = seq.clone();
            for n in &mut l.exprs.nodes {
                match &mut n.op {
                    ScalarOp::Load { index, .. } => {
                        for i in index.iter_mut() {
                            *i = shifted(i, axis, &past);
                        }
                    }
                    ScalarOp::Index(i) => *i = shifted(i, axis, &past),
                    _ => {}
                }
            }
        }
        // outputs of the kernel over the same domain are appends of the same shape (K and V
        // merged): each store view starts at past along the axis; checked below per state
        let r = &mut kernel.outputs[slot];
        r.view.shape[axis] = seq.clone();
        r.view.offset = past.mul(&cs_cap[axis]);
        out.buffers[si].shape = cap_shape;
        out.outputs[oi].buffer = sid;
        done.push(InPlaceState {
            name: o.name.clone(),
            buffer: sid,
            axis,
        });
    }
    // every output of a rewritten append kernel must itself be a rewritten cache (a kernel
    // storing something else over the shrunken domain would lose elements)
    for k in &out.kernels {
        let shrunk = done.iter().any(|s| k.outputs.iter().any(|r| r.buffer == s.buffer));
        if shrunk && !k.outputs.iter().all(|r| done.iter().any(|s| s.buffer == r.buffer)) {
            return Err(format!("{} stores more than cache appends", k.name));
        }
    }
    if done.is_empty() {
        return Err("no growing cache in the plan".into());
    }
    Ok((out, done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{model, opts};
    use ir::kernel_eval::{Eval, Memory};
    use std::collections::HashMap;

    /// Decode of the tiny model: the rewritten plan on caches laid out for a capacity gives the
    /// functional plan's logits and caches exactly (`ir::kernel_eval` runs both).
    #[test]
    fn in_place_appends_compute_what_the_functional_plan_does() {
        let g = model("tiny");
        let (g, _) = crate::compile(&g, &opts(crate::Mode::Decode)).unwrap();
        let plan = crate::partition::partition(&g).unwrap();
        let (ip, states) = append_in_place(&plan).unwrap();
        assert_eq!(
            states.len(),
            4,
            "K and V of the tiny model's two softmax layers: {states:?}"
        );
        // the append kernels no longer grow with past
        for k in &ip.kernels {
            if k.outputs.iter().any(|r| states.iter().any(|s| s.buffer == r.buffer)) {
                let KernelKind::Loop(l) = &k.kind else {
                    panic!("{}", k.name)
                };
                assert!(l.domain.iter().all(|d| !d.symbols().any(|s| s == "past")), "{ip}");
            }
        }
        let (batch, past, cap) = (2i64, 5i64, 9i64);
        let env: ir::DimEnv = [("batch", batch), ("seq", 1), ("past", past)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let mut cap_env = env.clone();
        cap_env.insert(CAP.to_string(), cap);
        let mut rng = 7u64;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((rng >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
        };
        let params: HashMap<String, Vec<f64>> = plan
            .buffers
            .iter()
            .filter(|b| b.kind == BufferKind::Param)
            .map(|b| {
                let n = ir::shape::eval_shape(&b.shape, &env).unwrap().iter().product::<usize>();
                (b.name.clone(), (0..n).map(|_| next() * 0.3).collect())
            })
            .collect();
        // literal parameters: the graph's folded constants
        let mut mem: Memory = Memory::new();
        let mut mem_ip: Memory = Memory::new();
        for (i, b) in plan.buffers.iter().enumerate() {
            let id = BufferId(i as u32);
            if b.kind == BufferKind::Param {
                if let ir::Op::Literal { value } = &g.node(b.value.node).op {
                    mem.insert(id, value.to_f64_vec());
                    mem_ip.insert(id, value.to_f64_vec());
                }
                continue;
            }
            let shape = ir::shape::eval_shape(&b.shape, &env).unwrap();
            let n: usize = shape.iter().product();
            let data: Vec<f64> = match b.kind {
                BufferKind::Input => (0..n).map(|j| ((j * 7 + 3) % 50) as f64).collect(),
                BufferKind::State => (0..n).map(|_| f64::from(b.dtype.round(next() as f32))).collect(),
                _ => continue,
            };
            if let Some(s) = states.iter().find(|s| s.buffer == id) {
                // the same cache in the capacity layout: rows `cap` tokens apart, the rest junk
                let cshape = ir::shape::eval_shape(&ip.buffers[i].shape, &cap_env).unwrap();
                let inner: usize = shape[s.axis + 1..].iter().product();
                let rows: usize = shape[..s.axis].iter().product();
                let mut c = vec![1234.5; cshape.iter().product()];
                for r in 0..rows {
                    let (src, dst) = (r * past as usize * inner, r * cap as usize * inner);
                    c[dst..dst + past as usize * inner].copy_from_slice(&data[src..src + past as usize * inner]);
                }
                mem_ip.insert(id, c);
            } else {
                mem_ip.insert(id, data.clone());
            }
            mem.insert(id, data);
        }
        Eval {
            env: &env,
            params: &params,
        }
        .run(&plan, &mut mem)
        .unwrap();
        Eval {
            env: &cap_env,
            params: &params,
        }
        .run(&ip, &mut mem_ip)
        .unwrap();
        for (o, oi) in plan.outputs.iter().zip(&ip.outputs) {
            let a = &mem[&o.buffer];
            let b = &mem_ip[&oi.buffer];
            match states.iter().find(|s| s.name == o.name) {
                None => assert_eq!(a, b, "output {}", o.name),
                Some(s) => {
                    let shape = ir::shape::eval_shape(&o.shape, &env).unwrap();
                    let inner: usize = shape[s.axis + 1..].iter().product();
                    let rows: usize = shape[..s.axis].iter().product();
                    let len = (past as usize + 1) * inner;
                    for r in 0..rows {
                        let c0 = r * cap as usize * inner;
                        assert_eq!(&a[r * len..(r + 1) * len], &b[c0..c0 + len], "cache {} row {r}", o.name);
                        // nothing past the new token was touched
                        assert!(b[c0 + len..c0 + cap as usize * inner].iter().all(|&x| x == 1234.5));
                    }
                }
            }
        }
    }

    /// The runtime lays the in-place decode step's arena out once, for a capacity of many
    /// thousand tokens (the paged caches' reservation): that is only cheap if no intermediate
    /// grows with the context. Holds for tiny and small (the attention reads the caches in
    /// place; nothing of `past` size is materialised).
    #[test]
    fn in_place_decode_arena_does_not_grow_with_the_context() {
        for config in ["tiny", "small"] {
            let g = model(config);
            let (g, _) = crate::compile(&g, &opts(crate::Mode::Decode)).unwrap();
            let plan = crate::partition::partition(&g).unwrap();
            let (ip, _) = append_in_place(&plan).unwrap();
            let peak = |past: i64| {
                let env: ir::DimEnv = [("batch", 4), ("seq", 1), ("past", past), (CAP, past + 1)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                crate::memplan::plan(&ip, &env).unwrap().arena_peak_bytes
            };
            assert_eq!(peak(10), peak(65535), "{config}");
        }
    }
}
