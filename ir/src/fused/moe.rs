//! Reference semantics of the MoE composites (see `super::Fused` for each op's contract): the
//! group-limited top-k router of spec §2.6 and the expert GEMMs over the chosen experts only.
//!
//! Both follow the arithmetic of the unfused formulation in `models/ring_linear.ring` (`moe`):
//! the router makes the same f32 operations in the same order, so it chooses the same experts
//! even at ties; the expert GEMMs round each matmul and elementwise result to the dtype where
//! the unfused graph does.

use super::linear_attn::{expect_outputs, float_tensor, floats};
use super::GroupedEpilogue;
use crate::dtype::DType;
use crate::graph::TensorType;
use crate::tensor::Tensor;
use std::cmp::Ordering;

/// `RouteTopK` for every row of `probs [.., E]`:
/// 1. selection scores `σ̃ = probs + bias` (f32; `probs` when not `biased`);
/// 2. `n_group` contiguous groups of `E / n_group` experts; a group scores the sum of its
///    `min(2, E / n_group)` best σ̃;
/// 3. the `topk_group` best groups are kept, the other experts' σ̃ become −∞;
/// 4. the `k` best experts by σ̃ are chosen (descending);
/// 5. their weights are the *unbiased* `probs`, divided by `Σ probs + 1e−20` when `normalize`,
///    times `scale`.
///
/// Every top-k ranks larger first, NaN above every number, ties to the lower index (the order
/// of the interpreter's `TopK`).
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
    let op = "route_topk";
    if args.len() != 1 + usize::from(biased) {
        return Err(format!(
            "{op} takes {} operands, got {}",
            1 + usize::from(biased),
            args.len()
        ));
    }
    let probs = floats(op, "probs", args[0])?;
    let (&e, lead) = args[0]
        .shape
        .split_last()
        .ok_or_else(|| format!("{op}: probs must be [.., E], got {}", args[0].type_str()))?;
    if n_group == 0 || e % n_group != 0 {
        return Err(format!("{op}: {e} experts do not split into {n_group} groups"));
    }
    let per = e / n_group;
    if topk_group > n_group || k > topk_group * per {
        return Err(format!(
            "{op}: cannot choose {k} experts from {topk_group} of {n_group} groups of {per}"
        ));
    }
    let bias = if biased {
        let b = floats(op, "bias", args[1])?;
        if args[1].shape != [e] {
            return Err(format!("{op}: bias {} for {e} experts", args[1].type_str()));
        }
        Some(b)
    } else {
        None
    };
    let shape: Vec<usize> = lead.iter().copied().chain([k]).collect();
    expect_outputs(op, out, &[&shape, &shape])?;

    let rows: usize = lead.iter().product();
    let mut chosen = Vec::with_capacity(rows * k);
    let mut weights = Vec::with_capacity(rows * k);
    let mut sel = vec![0f32; e];
    for p in (0..rows).map(|r| &probs[r * e..(r + 1) * e]) {
        for (i, s) in sel.iter_mut().enumerate() {
            *s = p[i] + bias.map_or(0.0, |b| b[i]);
        }
        let group_scores: Vec<f32> = (0..n_group)
            .map(|g| {
                let grp = &sel[g * per..(g + 1) * per];
                top(grp, per.min(2))
                    .iter()
                    .fold(0f64, |acc, &i| acc + f64::from(grp[i])) as f32
            })
            .collect();
        let mut masked = vec![f32::NEG_INFINITY; e];
        for g in top(&group_scores, topk_group) {
            let experts = g * per..(g + 1) * per;
            masked[experts.clone()].copy_from_slice(&sel[experts]);
        }
        let best = top(&masked, k);
        let mut w: Vec<f32> = best.iter().map(|&i| p[i]).collect();
        if normalize {
            // the sum accumulates in f64 and is rounded to f32; 1e-20 is an f32 constant
            let total = w.iter().fold(0f64, |acc, &x| acc + f64::from(x)) as f32 + 1e-20f64 as f32;
            w.iter_mut().for_each(|x| *x /= total);
        }
        weights.extend(w.iter().map(|&x| x * scale as f32));
        chosen.extend(best.iter().map(|&i| i as i64));
    }
    Ok(vec![
        Tensor::from_i64(DType::I64, shape, chosen),
        float_tensor(op, &out[1], weights)?,
    ])
}

/// Indices of the `n` largest of `v`, largest first; NaN ranks above every number, ties go to
/// the lower index.
fn top(v: &[f32], n: usize) -> Vec<usize> {
    let rank = |a: f32, b: f32| match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    };
    let mut idx: Vec<usize> = (0..v.len()).collect();
    // a stable sort keeps equal values in index order
    idx.sort_by(|&i, &j| rank(v[j], v[i]));
    idx.truncate(n);
    idx
}

/// `GroupedMatmul`: the expert GEMMs of the chosen experts only.
pub(super) fn grouped_matmul(
    epilogue: GroupedEpilogue,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    match (epilogue, args) {
        (GroupedEpilogue::SwiGlu, &[x, chosen, wg, wu]) => swiglu_experts(x, chosen, wg, wu, out),
        (GroupedEpilogue::WeightedCombine, &[h, chosen, w, wd]) => combine_experts(h, chosen, w, wd, out),
        (GroupedEpilogue::CombineShared, &[h, chosen, w, wd, hs, bs]) => {
            let mut y = combine_experts(h, chosen, w, wd, out)?;
            add_shared(&mut y[0], hs, bs)?;
            Ok(y)
        }
        _ => Err(format!(
            "grouped_matmul({epilogue:?}) takes {} operands, got {}",
            epilogue.operands(),
            args.len()
        )),
    }
}

/// `y += f32(hs @ bs)` over `y [b, s, D]`, `hs [b, s, Is]`, `bs [Is, D]`: the shared expert's
/// down projection, each element a matmul's (f64 dot, rounded to the promoted dtype).
fn add_shared(y: &mut Tensor, hs: &Tensor, bs: &Tensor) -> Result<(), String> {
    let op = "grouped_matmul(combine_shared)";
    let (&[b, s, is], &[ki, dm]) = (hs.shape.as_slice(), bs.shape.as_slice()) else {
        return Err(format!(
            "{op}: hs {} must be [b, s, Is] and bs {} [Is, D]",
            hs.type_str(),
            bs.type_str()
        ));
    };
    if ki != is || y.shape != [b, s, dm] {
        return Err(format!(
            "{op}: hs {}, bs {} do not fit {}",
            hs.type_str(),
            bs.type_str(),
            y.type_str()
        ));
    }
    let dt = DType::promote(hs.dtype, bs.dtype)
        .ok_or_else(|| format!("{op}: hs {} and bs {} do not mix", hs.dtype, bs.dtype))?;
    let (xs, ws) = (floats(op, "hs", hs)?, floats(op, "bs", bs)?);
    // bs's columns as rows, for matmul_elem
    let mut cols = vec![0f32; is * dm];
    for k in 0..is {
        for j in 0..dm {
            cols[j * is + k] = ws[k * dm + j];
        }
    }
    let crate::tensor::Data::F32(ys) = &mut y.data else {
        return Err(format!("{op}: the output must be f32"));
    };
    for tok in 0..b * s {
        let row = &xs[tok * is..(tok + 1) * is];
        for j in 0..dm {
            ys[tok * dm + j] += matmul_elem(row, &cols[j * is..(j + 1) * is], dt);
        }
    }
    Ok(())
}

/// The integer data of operand `name` of `op`.
fn ints<'t>(op: &str, name: &str, t: &'t Tensor) -> Result<&'t [i64], String> {
    t.check().map_err(|m| format!("{op}: operand `{name}`: {m}"))?;
    t.as_i64()
        .ok_or_else(|| format!("{op}: operand `{name}` must be an integer, got {}", t.type_str()))
}

/// Expert `ids[slot]` of token `tok` (of a `[b, s, K]` tensor with `s` positions per batch),
/// checked against the `n` experts.
fn expert(ids: &[i64], (tok, slot, k, s): (usize, usize, usize, usize), n: usize) -> Result<usize, String> {
    let e = ids[tok * k + slot];
    usize::try_from(e).ok().filter(|&e| e < n).ok_or_else(|| {
        format!(
            "grouped_matmul: expert index {e} (batch {}, position {}, slot {slot}) is out of range for {n} experts",
            tok / s.max(1),
            tok % s.max(1)
        )
    })
}

/// One element of a matmul as the interpreter computes it: the dot product in f64, rounded to
/// f32, then to `dtype`.
fn matmul_elem(a: &[f32], b: &[f32], dtype: DType) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    dtype.round(dot as f32)
}

/// The interpreter's sigmoid (f32, never `exp` of a large positive number).
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `h[b, s, k] = silu(x · W_gate[e]ᵀ) ⊙ (x · W_up[e]ᵀ)` for `e = chosen[b, s, k]`, every result
/// rounded to the output dtype where the unfused graph rounds it: both matmuls, the sigmoid, the
/// silu product and the final product.
fn swiglu_experts(
    x: &Tensor,
    chosen: &Tensor,
    w_gate: &Tensor,
    w_up: &Tensor,
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let op = "grouped_matmul(swiglu)";
    let (&[b, s, dm], &[cb, cs, k], &[n, inter, dw]) =
        (x.shape.as_slice(), chosen.shape.as_slice(), w_gate.shape.as_slice())
    else {
        return Err(format!(
            "{op}: x {}, chosen {}, w_gate {} must have rank 3",
            x.type_str(),
            chosen.type_str(),
            w_gate.type_str()
        ));
    };
    if (cb, cs) != (b, s) || dw != dm || w_up.shape != w_gate.shape {
        return Err(format!(
            "{op}: x {}, chosen {}, w_gate {}, w_up {} do not fit",
            x.type_str(),
            chosen.type_str(),
            w_gate.type_str(),
            w_up.type_str()
        ));
    }
    expect_outputs(op, out, &[&[b, s, k, inter]])?;
    let (xs, ids) = (floats(op, "x", x)?, ints(op, "chosen", chosen)?);
    let (wg, wu) = (floats(op, "w_gate", w_gate)?, floats(op, "w_up", w_up)?);
    let dt = out[0].0.dtype;
    let mut h = Vec::with_capacity(b * s * k * inter);
    for tok in 0..b * s {
        let xrow = &xs[tok * dm..(tok + 1) * dm];
        for slot in 0..k {
            let e = expert(ids, (tok, slot, k, s), n)?;
            for i in 0..inter {
                let row = (e * inter + i) * dm..(e * inter + i + 1) * dm;
                let gate = matmul_elem(xrow, &wg[row.clone()], dt);
                let up = matmul_elem(xrow, &wu[row], dt);
                let silu = dt.round(gate * dt.round(sigmoid(gate)));
                h.push(dt.round(silu * up));
            }
        }
    }
    Ok(vec![float_tensor(op, &out[0], h)?])
}

/// `y[b, s] = Σ_k weights[b, s, k] · (h[b, s, k] · W_down[e]ᵀ)` for `e = chosen[b, s, k]`: each
/// down projection is a matmul rounded to its dtype (that of `h` and `w_down` together), as the
/// unfused graph's `h @ transpose(ed)`; the weighted products are f32 and their sum is
/// accumulated in f64, rounded once to f32.
fn combine_experts(
    h: &Tensor,
    chosen: &Tensor,
    weights: &Tensor,
    w_down: &Tensor,
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let op = "grouped_matmul(combine)";
    let (&[b, s, k, inter], &[n, dm, wi]) = (h.shape.as_slice(), w_down.shape.as_slice()) else {
        return Err(format!(
            "{op}: h {} must be [b, s, K, I] and w_down {} [E, D, I]",
            h.type_str(),
            w_down.type_str()
        ));
    };
    if chosen.shape != [b, s, k] || weights.shape != chosen.shape || wi != inter {
        return Err(format!(
            "{op}: h {}, chosen {}, weights {}, w_down {} do not fit",
            h.type_str(),
            chosen.type_str(),
            weights.type_str(),
            w_down.type_str()
        ));
    }
    expect_outputs(op, out, &[&[b, s, dm]])?;
    let ydt = DType::promote(h.dtype, w_down.dtype)
        .ok_or_else(|| format!("{op}: h {} and w_down {} do not mix", h.dtype, w_down.dtype))?;
    let (hs, ids) = (floats(op, "h", h)?, ints(op, "chosen", chosen)?);
    let (ws, wd) = (floats(op, "weights", weights)?, floats(op, "w_down", w_down)?);
    let mut y = Vec::with_capacity(b * s * dm);
    let mut acc = vec![0f64; dm];
    for tok in 0..b * s {
        acc.fill(0.0);
        for slot in 0..k {
            let e = expert(ids, (tok, slot, k, s), n)?;
            let hrow = &hs[(tok * k + slot) * inter..(tok * k + slot + 1) * inter];
            let w = ws[tok * k + slot];
            for (j, a) in acc.iter_mut().enumerate() {
                let down = matmul_elem(hrow, &wd[(e * dm + j) * inter..(e * dm + j + 1) * inter], ydt);
                *a += f64::from(w * down);
            }
        }
        y.extend(acc.iter().map(|&a| a as f32));
    }
    Ok(vec![float_tensor(op, &out[0], y)?])
}

#[cfg(test)]
mod tests {
    use super::super::linear_attn::test_support::*;
    use super::super::{Fused, GroupedEpilogue};
    use crate::op::Op;
    use crate::tensor::Tensor;
    use crate::tol::Tol;
    use crate::DType;
    use rand::seq::SliceRandom;
    use rand::Rng;
    use std::collections::HashMap;

    /// The routing half of ring_linear.ring's `moe`, verbatim up to `route_weights`.
    const ROUTE: &str = r#"
        config hidden_size: int;
        config num_experts: int;
        config n_group: int = 1;
        config topk_group: int = 1;
        config num_experts_per_tok: int;
        config moe_router_enable_expert_bias: bool = true;
        config norm_topk_prob: bool = true;
        config routed_scaling_factor: float = 1.0;
        config torch_dtype: str = "bfloat16";
        let D = hidden_size;
        let E = num_experts;
        let K = num_experts_per_tok;
        let dt = dtype(torch_dtype);
        dim batch, seq;
        input x: dt[batch, seq, D];

        fn route(x, l) {
            let p = "model.layers.{l}.mlp";
            param w_router: dt[E, D] = "{p}.gate.weight";
            let router_probs = sigmoid(cast(x, f32) @ transpose(cast(w_router, f32)));   # [batch, seq, E], f32
            let biased = if moe_router_enable_expert_bias {
                param bias: f32[E] = "{p}.gate.expert_bias";
                router_probs + bias                                                 # selection only
            } else {
                router_probs
            };
            # group-limited top-k: a group scores the sum of its two best experts; keep topk_group groups
            let per = E // n_group;
            let grouped = reshape(biased, [batch, seq, n_group, per]);
            let (best, _) = topk(grouped, min(2, per), axis = -1);
            let (_, keep) = topk(sum(best, axis = -1), topk_group, axis = -1);       # [batch, seq, topk_group]
            let kept = sum(cast(unsqueeze(keep, -1) == arange(n_group), f32), axis = -2) > 0.0;
            let masked = where(unsqueeze(kept, -1), grouped, -inf);                  # -inf, not 0: §6
            let (_, chosen) = topk(reshape(masked, [batch, seq, E]), K, axis = -1);  # [batch, seq, K]
            # weights from the unbiased probabilities
            let w = gather(router_probs, chosen, axis = -1);
            let w = if norm_topk_prob { w / (sum(w, axis = -1, keepdim = true) + 1e-20) } else { w };
            let route_weights = w * routed_scaling_factor;
            (router_probs, chosen, route_weights)
        }

        let (probs, chosen, weights) = route(x, 1);
        output "probs" = probs;
        output "chosen" = chosen;
        output "weights" = weights;
    "#;

    /// Routes `x` with the DSL, then the DSL's probabilities with the fused op; compares.
    /// Returns the chosen experts.
    fn route_case(
        seed: u64,
        (e, n_group, topk_group, k): (usize, usize, usize, usize),
        biased: bool,
        normalize: bool,
        zero_x: bool,
    ) -> Vec<i64> {
        let (b, s, dm, scale) = (2, 9, 16, 2.5);
        let mut r = rng(seed);
        let x = if zero_x {
            Tensor::zeros(DType::F32, vec![b, s, dm])
        } else {
            random(&mut r, DType::F32, &[b, s, dm], 1.0)
        };
        // small router weights keep the sigmoid away from saturation (no accidental ties)
        let w_router = random(&mut r, DType::F32, &[e, dm], 0.1);
        let bias = random(&mut r, DType::F32, &[e], 0.2);
        let params = HashMap::from([
            ("model.layers.1.mlp.gate.weight".to_string(), w_router),
            ("model.layers.1.mlp.gate.expert_bias".to_string(), bias.clone()),
        ]);
        let cfg = serde_json::json!({
            "hidden_size": dm, "num_experts": e, "n_group": n_group, "topk_group": topk_group,
            "num_experts_per_tok": k, "moe_router_enable_expert_bias": biased,
            "norm_topk_prob": normalize, "routed_scaling_factor": scale, "torch_dtype": "float32",
        });
        let want = run_dsl(ROUTE, cfg, &[("x", &x)], params);
        let probs = &want["probs"];
        let op = Op::Fused(Fused::RouteTopK {
            k,
            n_group,
            topk_group,
            scale,
            normalize,
            biased,
        });
        let ins: Vec<(&str, &Tensor)> = if biased {
            vec![("probs", probs), ("bias", &bias)]
        } else {
            vec![("probs", probs)]
        };
        let got = run_op(op, &ins).unwrap_or_else(|err| panic!("{err}"));
        let what = format!("E {e}, {n_group} groups, keep {topk_group}, k {k}, biased {biased}, normalize {normalize}");
        assert_eq!(got[0], want["chosen"], "chosen experts ({what})");
        compare(
            &format!("route_topk weights ({what})"),
            &got[1],
            &want["weights"],
            Tol::F32,
        );
        got[0].as_i64().unwrap().to_vec()
    }

    #[test]
    fn fused_route_topk_matches_the_dsl_routing() {
        // (experts, groups, groups kept, k)
        let sizes = [(8, 4, 2, 2), (16, 4, 2, 4), (6, 6, 3, 2), (8, 1, 1, 3), (16, 4, 4, 8)];
        for (n, &size) in sizes.iter().enumerate() {
            for normalize in [true, false] {
                let seed = 500 + n as u64;
                let plain = route_case(seed, size, false, normalize, false);
                let biased = route_case(seed, size, true, normalize, false);
                // same probabilities, so the bias alone changed the selection somewhere
                assert_ne!(plain, biased, "the bias never changed the selection for {size:?}");
            }
        }
    }

    #[test]
    fn fused_route_topk_breaks_ties_like_the_dsl() {
        // x = 0: every probability is 0.5, every group and expert ties
        for size in [(8, 4, 2, 2), (16, 4, 2, 4)] {
            let chosen = route_case(600, size, false, true, true);
            let (per, k) = (size.0 / size.1, size.3);
            let lowest: Vec<i64> = (0..k as i64).collect();
            assert!(per * size.2 >= k);
            assert_eq!(&chosen[..k], lowest.as_slice());
        }
    }

    #[test]
    fn route_topk_refuses_more_experts_than_the_kept_groups_hold() {
        let probs = Tensor::from_f32(DType::F32, vec![1, 8], vec![0.5; 8]);
        let op = Op::Fused(Fused::RouteTopK {
            k: 5,
            n_group: 4,
            topk_group: 2,
            scale: 1.0,
            normalize: true,
            biased: false,
        });
        let e = run_op(op, &[("probs", &probs)]).unwrap_err();
        assert!(e.to_string().contains("cannot choose 5 experts"), "{e}");
    }

    /// The expert half of ring_linear.ring's `moe`, verbatim from `combine` to `routed`, with
    /// the routing as inputs and no shared expert.
    const EXPERTS: &str = r#"
        config hidden_size: int;
        config num_experts: int;
        config num_experts_per_tok: int;
        config moe_intermediate_size: int;
        config torch_dtype: str;
        let D = hidden_size;
        let E = num_experts;
        let K = num_experts_per_tok;
        let dt = dtype(torch_dtype);
        dim batch, seq;
        input x: dt[batch, seq, D];
        input chosen: i64[batch, seq, K];
        input route_weights: f32[batch, seq, K];

        fn silu(x) { x * sigmoid(x) }

        fn experts(x, l, chosen, route_weights) {
            let p = "model.layers.{l}.mlp";
            # dense combine weights [batch, seq, E]: zero for experts not chosen
            let combine = sum(unsqueeze(route_weights, -1) * cast(unsqueeze(chosen, -1) == arange(E), f32), axis = -2);
            let I = moe_intermediate_size;
            param eg: dt[E, I, D] = "{p}.experts.{e}.gate_proj.weight" for e in 0..E;
            param eu: dt[E, I, D] = "{p}.experts.{e}.up_proj.weight" for e in 0..E;
            param ed: dt[E, D, I] = "{p}.experts.{e}.down_proj.weight" for e in 0..E;
            let xe = unsqueeze(x, 1);                                                # [batch, 1, seq, D]
            let h = silu(xe @ transpose(eg)) * (xe @ transpose(eu));                # [batch, E, seq, I]
            let y = h @ transpose(ed);                                               # [batch, E, seq, D]
            sum(cast(y, f32) * unsqueeze(permute(combine, [0, 2, 1]), -1), axis = 1)
        }

        output "routed" = experts(x, 1, chosen, route_weights);
    "#;

    /// Inputs of the expert GEMMs: x, chosen (distinct experts per token), weights, and the
    /// stacked `w_gate`, `w_up`, `w_down`.
    fn expert_inputs(
        seed: u64,
        dt: DType,
        (b, s, dm, inter, e, k): (usize, usize, usize, usize, usize, usize),
    ) -> [Tensor; 6] {
        let mut r = rng(seed);
        let x = random(&mut r, dt, &[b, s, dm], 1.0);
        let mut ids = Vec::new();
        for _ in 0..b * s {
            let mut all: Vec<i64> = (0..e as i64).collect();
            all.shuffle(&mut r);
            ids.extend_from_slice(&all[..k]);
        }
        let chosen = Tensor::from_i64(DType::I64, vec![b, s, k], ids);
        let weights: Vec<f32> = (0..b * s * k).map(|_| r.random_range(0.05f32..1.5)).collect();
        let weights = Tensor::from_f32(DType::F32, vec![b, s, k], weights);
        let wscale = (dm as f32).powf(-0.5);
        let w_gate = random(&mut r, dt, &[e, inter, dm], wscale);
        let w_up = random(&mut r, dt, &[e, inter, dm], wscale);
        let w_down = random(&mut r, dt, &[e, dm, inter], (inter as f32).powf(-0.5));
        [x, chosen, weights, w_gate, w_up, w_down]
    }

    /// SwiGlu then WeightedCombine, two fused nodes, run by the interpreter.
    fn fused_experts(ins: &[Tensor; 6]) -> Result<Tensor, crate::graph::IrError> {
        let [x, chosen, weights, w_gate, w_up, w_down] = ins;
        let named = [
            ("x", x),
            ("chosen", chosen),
            ("weights", weights),
            ("w_gate", w_gate),
            ("w_up", w_up),
            ("w_down", w_down),
        ];
        let grouped = |epilogue| Op::Fused(Fused::GroupedMatmul { epilogue });
        let mut out = run_graph(&named, |g, v| {
            let h = g.add1(grouped(GroupedEpilogue::SwiGlu), &[v[0], v[1], v[3], v[4]], None)?;
            g.add(grouped(GroupedEpilogue::WeightedCombine), &[h, v[1], v[2], v[5]], None)
        })?;
        Ok(out.remove(0))
    }

    #[test]
    fn fused_expert_gemms_match_the_dense_moe() {
        // (batch, seq, D, I, experts, k)
        let sizes = [(2, 3, 16, 8, 8, 2), (1, 7, 32, 24, 16, 4), (2, 5, 24, 12, 6, 6)];
        for (n, &size) in sizes.iter().enumerate() {
            for (dt, tol) in [(DType::F32, Tol::F32), (DType::BF16, Tol::BF16)] {
                let ins = expert_inputs(700 + n as u64, dt, size);
                let [x, chosen, weights, w_gate, w_up, w_down] = &ins;
                let (_, _, dm, inter, e, k) = size;
                let p = "model.layers.1.mlp.experts.{e}";
                let params = HashMap::from([
                    (format!("{p}.gate_proj.weight"), w_gate.clone()),
                    (format!("{p}.up_proj.weight"), w_up.clone()),
                    (format!("{p}.down_proj.weight"), w_down.clone()),
                ]);
                let cfg = serde_json::json!({
                    "hidden_size": dm, "num_experts": e, "num_experts_per_tok": k,
                    "moe_intermediate_size": inter, "torch_dtype": dt.name(),
                });
                let ins_dsl = [("x", x), ("chosen", chosen), ("route_weights", weights)];
                let want = run_dsl(EXPERTS, cfg, &ins_dsl, params).remove("routed").unwrap();
                let got = fused_experts(&ins).unwrap_or_else(|err| panic!("{err}"));
                compare(
                    &format!("grouped swiglu + combine ({dt}, size {size:?})"),
                    &got,
                    &want,
                    tol,
                );
            }
        }
    }

    /// The operands of a `CombineShared` node, named.
    fn shared_inputs(ts: [&Tensor; 6]) -> [(&'static str, &Tensor); 6] {
        let names = ["h", "chosen", "weights", "w_down", "hs", "bs"];
        std::array::from_fn(|i| (names[i], ts[i]))
    }

    #[test]
    fn combine_shared_matches_the_combine_plus_the_shared_gemm() {
        use crate::op::BinaryOp;
        // (batch, seq, D, I, experts, k), and the shared expert's Is
        let sizes = [((2, 3, 16, 8, 8, 2), 24), ((1, 5, 32, 24, 16, 4), 40)];
        for (n, &(size, is)) in sizes.iter().enumerate() {
            for (dt, tol) in [(DType::F32, Tol::F32), (DType::BF16, Tol::BF16)] {
                let [_, chosen, weights, _, _, w_down] = expert_inputs(900 + n as u64, dt, size);
                let (b, s, dm, inter, _, k) = size;
                let mut r = rng(950 + n as u64);
                let h = random(&mut r, dt, &[b, s, k, inter], 1.0);
                let hs = random(&mut r, dt, &[b, s, is], 1.0);
                let bs = random(&mut r, dt, &[is, dm], (is as f32).powf(-0.5));
                let named = shared_inputs([&h, &chosen, &weights, &w_down, &hs, &bs]);
                let grouped = |epilogue| Op::Fused(Fused::GroupedMatmul { epilogue });
                let want = run_graph(&named, |g, v| {
                    let routed = g.add1(grouped(GroupedEpilogue::WeightedCombine), &v[..4], None)?;
                    let shared = g.add1(Op::Matmul, &[v[4], v[5]], None)?;
                    g.add(Op::Binary(BinaryOp::Add), &[routed, shared], None)
                })
                .unwrap();
                let got = run_graph(&named, |g, v| g.add(grouped(GroupedEpilogue::CombineShared), v, None)).unwrap();
                assert_eq!(got[0].dtype, DType::F32);
                compare(
                    &format!("combine + shared ({dt}, size {size:?}, Is {is})"),
                    &got[0],
                    &want[0],
                    tol,
                );
            }
        }
        // operands that do not fit are refused with what they are
        let [_, chosen, weights, _, _, w_down] = expert_inputs(990, DType::F32, (1, 2, 8, 4, 4, 2));
        let h = Tensor::from_f32(DType::F32, vec![1, 2, 2, 4], vec![0.5; 16]);
        let hs = Tensor::from_f32(DType::F32, vec![1, 2, 6], vec![0.5; 12]);
        let bs = Tensor::from_f32(DType::F32, vec![5, 8], vec![0.5; 40]);
        let named = shared_inputs([&h, &chosen, &weights, &w_down, &hs, &bs]);
        let op = Op::Fused(Fused::GroupedMatmul {
            epilogue: GroupedEpilogue::CombineShared,
        });
        let e = run_graph(&named, |g, v| g.add(op, v, None)).unwrap_err().to_string();
        assert!(e.contains("combine_shared") && e.contains("do not fit"), "{e}");
    }

    #[test]
    fn expert_index_out_of_range_is_an_error() {
        let mut ins = expert_inputs(800, DType::F32, (1, 2, 8, 4, 4, 2));
        for bad in [4i64, -1] {
            let ids = vec![0, 1, 2, bad];
            ins[1] = Tensor::from_i64(DType::I64, vec![1, 2, 2], ids);
            let e = fused_experts(&ins).unwrap_err().to_string();
            assert!(
                e.contains(&format!("expert index {bad} (batch 0, position 1, slot 1)")),
                "{e}"
            );
            assert!(e.contains("out of range for 4 experts"), "{e}");
        }
        // WeightedCombine alone checks its indices too
        let h = Tensor::from_f32(DType::F32, vec![1, 2, 2, 4], vec![0.5; 16]);
        let named = [
            ("h", &h),
            ("chosen", &ins[1]),
            ("weights", &ins[2]),
            ("w_down", &ins[5]),
        ];
        let op = Op::Fused(Fused::GroupedMatmul {
            epilogue: GroupedEpilogue::WeightedCombine,
        });
        let e = run_op(op, &named).unwrap_err().to_string();
        assert!(e.contains("expert index -1"), "{e}");
    }
}
