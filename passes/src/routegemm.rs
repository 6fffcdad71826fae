//! Routing folded into the router's GEMM: a `route_topk` template kernel whose probabilities
//! are (the sigmoid of) a column range of one GEMM's result is removed, and that GEMM routes
//! its rows itself once every block has stored them (`ir::kernel::RouteTail`).
//!
//! In a decode step the routing is a few microseconds of work on `batch` rows, and as its own
//! kernel it costs a launch and a dependency gap per MoE layer. Folded, the GEMM's last block
//! to finish (an arrival counter) reads the router's columns back and routes every row, a warp
//! a row on the GPU. That block works alone, so the fold could pay only where rows are few: it
//! is done for the GEMMs that fold their RMSNorm (`passes::normgemm`), which exist only in
//! decode plans for small batches (the cuda device's plan up to `FOLD_BATCH` rows, the cpu's).
//!
//! It is **off by default** ([`enabled`], `RINGJIT_FOLD_ROUTE=1` turns it on): on an H200 the
//! folded Ring-mini decode step measured slower at batches 1, 8 and 16 (the tail costs about
//! 13 µs a layer against 7 µs for the routing kernel it replaces; docs/perf.md). The tests run
//! it through [`crate::partition::partition_with`].
//!
//! Like [`crate::copies`], this is a kernel-level pass: it runs on the kernel plan after the
//! partition and changes where work runs, not what the graph computes, so the graph dumps of
//! `--dump` do not show it and the kernels' dump (`kernels.txt`) does (`gemm ... route(..)`).

use ir::kernel::{
    BufferId, IndexExpr, IndexVar, Kernel, KernelKind, KernelPlan, Operand, RouteTail, Routing, ScalarOp, TemplateOp,
};
use ir::op::UnaryOp;
use ir::{DType, Dim};

/// Whether [`crate::partition::partition`] folds the routes: `RINGJIT_FOLD_ROUTE=1`. Off by
/// default: on an H200 the folded Ring-mini decode step measured slower (docs/perf.md).
pub fn enabled() -> bool {
    std::env::var("RINGJIT_FOLD_ROUTE").is_ok_and(|v| v == "1")
}

/// Fold every qualifying routing kernel of `plan` into its GEMM; returns how many went.
pub fn fold_routes(plan: &mut KernelPlan) -> usize {
    let mut n = 0;
    while let Some((gemm, route, tail)) = find(plan) {
        let r = plan.kernels.remove(route);
        let g = &mut plan.kernels[gemm];
        let KernelKind::Template(t) = &mut g.kind else {
            unreachable!("find returns a template")
        };
        let TemplateOp::Gemm(gm) = &mut t.op else {
            unreachable!("find returns a gemm")
        };
        gm.route = Some(Box::new(tail));
        if tail.routing.biased {
            let KernelKind::Template(rt) = &r.kind else {
                unreachable!("find returns a template")
            };
            let Some(Operand::Buffer(i)) = rt.operands.get(1) else {
                unreachable!("find checks the bias operand")
            };
            g.inputs.push(r.inputs[*i].clone());
            t.operands.push(Operand::Buffer(g.inputs.len() - 1));
        }
        g.outputs.extend(r.outputs);
        g.nodes.extend(r.nodes);
        n += 1;
    }
    n
}

/// (GEMM kernel, route kernel, the tail) of the first qualifying pair.
fn find(plan: &KernelPlan) -> Option<(usize, usize, RouteTail)> {
    for (ri, rk) in plan.kernels.iter().enumerate() {
        let Some((input, sigmoid, op)) = route_of(rk) else {
            continue;
        };
        let src = &rk.inputs[input];
        let writers: Vec<usize> = (0..plan.kernels.len())
            .filter(|&i| plan.kernels[i].outputs.iter().any(|o| o.buffer == src.buffer))
            .collect();
        let &[gi] = writers.as_slice() else { continue };
        if gi >= ri {
            continue;
        }
        let gk = &plan.kernels[gi];
        let Some(gm) = gk.gemm() else { continue };
        // the GEMMs of small-batch decode plans only (see the module doc)
        if gm.norm.is_none() || gm.route.is_some() {
            continue;
        }
        if gk.outputs[0].buffer != src.buffer || plan.buffer(src.buffer).map(|b| b.dtype) != Some(DType::F32) {
            continue;
        }
        let Some(col) = column_slice(&gk.outputs[0].view, &src.view) else {
            continue;
        };
        // within what a GEMM's tail routes (otherwise the routing kernel stays)
        let Some(tail) = RouteTail::of(op, col, sigmoid).filter(|t| t.check().is_ok()) else {
            continue;
        };
        if src.view.shape.last().and_then(Dim::as_const) != Some(tail.experts) {
            continue;
        }
        // the route's results move up to the GEMM: nothing in between may touch them, and
        // nothing in between may write what the route reads
        let moved: Vec<BufferId> = rk.outputs.iter().map(|o| o.buffer).collect();
        let read: Vec<BufferId> = rk.inputs.iter().map(|o| o.buffer).collect();
        let clash = plan.kernels[gi + 1..ri].iter().any(|k| {
            k.inputs.iter().chain(&k.outputs).any(|b| moved.contains(&b.buffer))
                || k.outputs.iter().any(|b| read.contains(&b.buffer))
        });
        if clash {
            continue;
        }
        return Some((gi, ri, tail));
    }
    None
}

/// A routing kernel whose probabilities are `p = x` or `p = sigmoid(x)` of one input read
/// element for element, with its bias (if any) a plain buffer operand: (that input, whether a
/// sigmoid, the op).
fn route_of(k: &Kernel) -> Option<(usize, bool, &TemplateOp)> {
    let KernelKind::Template(t) = &k.kind else { return None };
    let TemplateOp::RouteTopK {
        routing: Routing { biased, .. },
        ..
    } = &t.op
    else {
        return None;
    };
    if t.epilogue.is_some() || k.outputs.len() != 2 || t.operands.len() != 1 + usize::from(*biased) {
        return None;
    }
    if *biased && !matches!(t.operands[1], Operand::Buffer(_)) {
        return None;
    }
    let Operand::Prologue(f) = &t.operands[0] else {
        return None;
    };
    let (load, sigmoid) = match f.exprs.nodes.as_slice() {
        [l] => (l, false),
        [l, s] => match &s.op {
            ScalarOp::Unary(UnaryOp::Sigmoid, a) if a.0 == 0 && s.dtype == DType::F32 => (l, true),
            _ => return None,
        },
        _ => return None,
    };
    if f.stores.len() != 1 || f.stores[0].0 as usize != f.exprs.nodes.len() - 1 || load.dtype != DType::F32 {
        return None;
    }
    let ScalarOp::Load { input, index } = &load.op else {
        return None;
    };
    // element for element (an axis of one element may read its index 0 as a constant)
    let one = Dim::constant(1);
    let identity = index.len() == f.domain.len()
        && index.iter().enumerate().all(|(a, e)| {
            *e == IndexExpr::var(IndexVar::Loop(a as u32)) || (f.domain[a] == one && *e == IndexExpr::zero())
        });
    let src = k.inputs.get(*input)?;
    (identity && src.view.shape == f.domain).then_some((*input, sigmoid, &t.op))
}

/// The first column of `part` within `whole` when `part` is `whole` narrowed to a constant
/// range of its last (contiguous) dim; None otherwise.
fn column_slice(whole: &ir::kernel::View, part: &ir::kernel::View) -> Option<i64> {
    let r = whole.rank();
    if r == 0 || part.rank() != r || whole.strides != part.strides || whole.strides[r - 1] != Dim::constant(1) {
        return None;
    }
    if whole.shape[..r - 1] != part.shape[..r - 1] {
        return None;
    }
    let (n, e) = (whole.shape[r - 1].as_const()?, part.shape[r - 1].as_const()?);
    let (o0, o1) = (whole.offset.as_const()?, part.offset.as_const()?);
    let col = o1 - o0;
    (col >= 0 && col + e <= n).then_some(col)
}

#[cfg(test)]
mod tests {
    use crate::testing::{model, opts};
    use crate::{compile, CompileOptions, Mode};
    use ir::kernel::{KernelKind, KernelPlan, TemplateOp};

    /// (route_topk kernels, GEMMs that route) of a plan.
    fn routes(plan: &KernelPlan) -> (usize, usize) {
        let count = |f: fn(&ir::kernel::Kernel) -> bool| plan.kernels.iter().filter(|k| f(k)).count();
        (count(|k| k.kind_name() == "route_topk"), count(|k| k.routes()))
    }

    fn d(c: i64) -> ir::Dim {
        ir::Dim::constant(c)
    }

    #[test]
    fn a_column_slice_is_a_constant_range_of_the_whole_rows() {
        let whole = ir::kernel::View::contiguous(&[ir::Dim::sym("b"), d(272)]);
        let mut part = whole.clone();
        part.shape[1] = d(16);
        part.offset = d(256);
        assert_eq!(super::column_slice(&whole, &part), Some(256));
        // past the row, another row stride, a symbolic offset, a strided last dim
        part.offset = d(257);
        assert_eq!(super::column_slice(&whole, &part), None);
        let mut p2 = part.clone();
        p2.offset = d(0);
        p2.strides[0] = d(16);
        assert_eq!(super::column_slice(&whole, &p2), None);
        let mut p3 = part.clone();
        p3.offset = ir::Dim::sym("b");
        assert_eq!(super::column_slice(&whole, &p3), None);
        let mut w2 = whole.clone();
        w2.strides = vec![d(1), ir::Dim::sym("b")];
        let mut p4 = w2.clone();
        p4.shape[1] = d(16);
        assert_eq!(super::column_slice(&w2, &p4), None);
    }

    /// The small decode plan's routes, each made unfit in one way, stay kernels.
    #[test]
    fn routes_that_are_not_a_plain_read_of_the_gemm_columns_stay_apart() {
        let g = model("small");
        let plan = crate::partition::partition_with(&compile(&g, &opts(Mode::Decode)).unwrap().0, false).unwrap();
        let (moe, 0) = routes(&plan) else {
            panic!("no route folded yet")
        };
        let route_ids: Vec<usize> = (0..plan.kernels.len())
            .filter(|&i| matches!(&plan.kernels[i].kind, KernelKind::Template(t) if matches!(t.op, TemplateOp::RouteTopK { .. })))
            .collect();
        let spoil = |how: &dyn Fn(&mut ir::kernel::Kernel)| {
            let mut p = plan.clone();
            for &i in &route_ids {
                how(&mut p.kernels[i]);
            }
            super::fold_routes(&mut p)
        };
        // as they are: every one folds
        assert_eq!(spoil(&|_| {}), moe);
        // an epilogue on the route's results
        assert_eq!(
            spoil(&|k| {
                if let KernelKind::Template(t) = &mut k.kind {
                    t.epilogue = Some(ir::kernel::Fusion {
                        domain: vec![],
                        exprs: Default::default(),
                        stores: vec![],
                    });
                }
            }),
            0
        );
        // the probabilities read through another row stride than the GEMM's result
        assert_eq!(
            spoil(&|k| {
                let v = &mut k.inputs[0].view;
                v.strides[0] = v.strides[0].mul(&d(2));
            }),
            0
        );
        // a prologue that does more than a sigmoid of the load
        assert_eq!(
            spoil(&|k| {
                if let KernelKind::Template(t) = &mut k.kind {
                    if let ir::kernel::Operand::Prologue(f) = &mut t.operands[0] {
                        let last = ir::kernel::ExprId(f.exprs.nodes.len() as u32 - 1);
                        f.exprs.nodes.push(ir::kernel::ExprNode {
                            op: ir::kernel::ScalarOp::Unary(ir::op::UnaryOp::Sigmoid, last),
                            dtype: ir::DType::F32,
                        });
                        f.stores = vec![ir::kernel::ExprId(f.exprs.nodes.len() as u32 - 1)];
                    }
                }
            }),
            0
        );
    }

    #[test]
    fn small_batch_decode_plans_route_in_the_router_gemm_and_others_apart() {
        // MoE layers: all but the first (dense) layer
        for (config, moe) in [("tiny", 5), ("small", 7)] {
            let g = model(config);
            let plan = |o: CompileOptions| crate::partition::partition_with(&compile(&g, &o).unwrap().0, true).unwrap();
            let folded = plan(opts(Mode::Decode));
            assert_eq!(routes(&folded), (0, moe), "{config} decode");
            for k in &folded.kernels {
                let Some((gm, r)) = k.gemm().and_then(|g| Some((g, g.route.as_ref()?))) else {
                    continue;
                };
                // the router's columns beside the shared expert's gate and up; the experts
                // and weights as the last two outputs
                assert!(r.sigmoid && r.routing.biased, "{config}: {k}");
                assert!(gm.n.as_const().is_some_and(|n| n > r.experts), "{config}: {k}");
                let dt = |o: usize| folded.buffer(k.outputs[o].buffer).unwrap().dtype;
                let n = k.outputs.len();
                assert_eq!(
                    (dt(n - 2), dt(n - 1)),
                    (ir::DType::I64, ir::DType::F32),
                    "{config}: {k}"
                );
            }
            let apart = plan(CompileOptions {
                fold_norms: false,
                ..opts(Mode::Decode)
            });
            assert_eq!(routes(&apart), (moe, 0), "{config} decode, norms apart");
            assert_eq!(routes(&plan(opts(Mode::Prefill))), (moe, 0), "{config} prefill");
        }
    }
}
