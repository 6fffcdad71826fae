//! The Ring-linear model file on the reference interpreter: shapes and sizes of every config,
//! the lightning scan against the chunked closed form, prefill+decode against the full forward,
//! MoE routing against an independent implementation, and config errors.

use crate::common::*;
use ir::checkpoint::RandomWeights;
use ir::graph::{Graph, Value};
use ir::interp::Interpreter;
use ir::op::{InputKind, Op};
use ir::tol::{check, rel_err, Tol};
use ir::{DType, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;
use runtime::model::{LoadedModel, ModelSpec};
use runtime::{Device, Engine};
use std::collections::HashMap;

fn engine(name: &str) -> Engine {
    engine_with(name, &[], Device::Reference)
}

/// The built-in config `name` with `--set` overrides, on `device` (random weights, seed 3).
fn engine_with(name: &str, overrides: &[&str], device: Device) -> Engine {
    let m = LoadedModel::load(&ModelSpec {
        config: Some(name.into()),
        seed: 3,
        overrides: overrides.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    })
    .unwrap();
    Engine::new(&m, device).unwrap()
}

#[test]
fn every_config_elaborates_with_the_spec_sizes() {
    // (config, total parameters from spec §1.2, softmax layers from spec §1.1/§6)
    let cases: [(&str, f64, Vec<usize>); 4] = [
        ("tiny", 0.0, vec![2, 5]),
        ("small", 0.0, vec![3, 7]),
        ("ring-mini-linear-2.0", 16.42e9, vec![4, 9, 14, 19]),
        ("ring-flash-linear-2.0", 104.18e9, vec![7, 15, 23, 31]),
    ];
    for (name, total, softmax_layers) in cases {
        let m = model(&config(name, &[]));
        let n: usize = m.graph.params().unwrap().iter().map(|p| p.numel()).sum();
        if total > 0.0 {
            let rel = (n as f64 - total).abs() / total;
            assert!(rel < 2e-3, "{name}: {n} parameters, spec says {total:e}");
        }
        let mut kv: Vec<usize> = m
            .graph
            .inputs
            .iter()
            .filter_map(|&i| match &m.graph.node(i).op {
                Op::Input {
                    name,
                    kind: InputKind::State,
                    ..
                } if name.ends_with(".k_cache") => name.split('.').nth(2).and_then(|l| l.parse().ok()),
                _ => None,
            })
            .collect();
        kv.sort();
        assert_eq!(kv, softmax_layers, "{name}: softmax layers");
    }
    // a real checkpoint's extra keys are accepted and reported as unused
    let mini = model(&config("ring-mini-linear-2.0", &[]));
    assert!(
        mini.unused_config_keys.contains(&"auto_map".to_string()),
        "{:?}",
        mini.unused_config_keys
    );
}

/// λ_h = exp(−base_h·f(l)) for power-of-two H (spec §2.4.4), computed here independently.
fn decay(h: usize, n_heads: usize, l: usize, n_layers: usize, conv: &str) -> f64 {
    let base = 2f64.powf(-8.0 * (h as f64 + 1.0) / n_heads as f64);
    let (l, nl) = (l as f64, n_layers as f64);
    let f = if conv == "A" {
        1.0 - l / (nl - 1.0) + 1e-5
    } else {
        1.0 - (l - 1.0) / (nl - 1.0) + 1e-5
    };
    (-base * f).exp()
}

/// Spec §4.3 chunked form in f64: per head, chunk n of length c ≤ C,
/// O = ((Q Kᵀ) ⊙ M) V + diag(λ^{i+1}) Q S,   S ← λ^c S + (diag(λ^{c−1−j}) K)ᵀ V.
#[allow(clippy::too_many_arguments)]
fn chunked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s0: &[f32],
    lam: &[f64],
    t: usize,
    h: usize,
    d: usize,
    chunk: usize,
) -> (Vec<f64>, Vec<f64>) {
    let at = |x: &[f32], tt: usize, hh: usize, i: usize| x[(tt * h + hh) * d + i] as f64;
    let mut o = vec![0.0; t * h * d];
    let mut s: Vec<f64> = s0.iter().map(|&x| x as f64).collect();
    for hh in 0..h {
        let l = lam[hh];
        let mut start = 0;
        while start < t {
            let c = chunk.min(t - start);
            for i in 0..c {
                for e in 0..d {
                    let mut acc = 0.0;
                    // intra-chunk
                    for j in 0..=i {
                        let qk: f64 = (0..d).map(|x| at(q, start + i, hh, x) * at(k, start + j, hh, x)).sum();
                        acc += l.powi((i - j) as i32) * qk * at(v, start + j, hh, e);
                    }
                    // inter-chunk: λ^{i+1} q S_prev
                    let qs: f64 = (0..d).map(|x| at(q, start + i, hh, x) * s[(hh * d + x) * d + e]).sum();
                    acc += l.powi(i as i32 + 1) * qs;
                    o[((start + i) * h + hh) * d + e] = acc;
                }
            }
            let mut next = vec![0.0; d * d];
            for a in 0..d {
                for b in 0..d {
                    let mut acc = l.powi(c as i32) * s[(hh * d + a) * d + b];
                    for j in 0..c {
                        acc += l.powi((c - 1 - j) as i32) * at(k, start + j, hh, a) * at(v, start + j, hh, b);
                    }
                    next[a * d + b] = acc;
                }
            }
            s[hh * d * d..(hh + 1) * d * d].copy_from_slice(&next);
            start += c;
        }
    }
    (o, s)
}

#[test]
fn lightning_scan_equals_the_chunked_closed_form() {
    let cfg = config("tiny", &[]);
    let g = model(&cfg).graph;
    let (h, d, n_layers, layer) = (4usize, 16usize, 6usize, 3usize);
    // the model's own scan (a linear layer's recurrence), lifted into a graph of its own
    let scan =
        g.g.node_indices()
            .find(|&n| matches!(g.node(n).op, Op::Scan { .. }))
            .expect("the model has a scan");
    let operands = g.operands(scan);
    assert_eq!(
        operands.len(),
        5,
        "scan operands: state, q, k, v, and the captured decay"
    );
    let mut t = Graph::new();
    let args: Vec<Value> = operands
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let ty = g.ty(*v);
            t.add1(
                Op::Input {
                    name: format!("in{i}"),
                    kind: InputKind::Data,
                    dtype: ty.dtype,
                    shape: ty.shape.clone(),
                },
                &[],
                None,
            )
            .unwrap()
        })
        .collect();
    let outs = t.add(g.node(scan).op.clone(), &args, None).unwrap();
    t.add_output("state", outs[0], InputKind::Data);
    t.add_output("o", outs[1], InputKind::Data);
    let interp = Interpreter::new(&t, &RandomWeights::new(0)).unwrap();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let normal = rand_distr::Normal::new(0.0f32, 1.0).unwrap();
    let mut rand_vec = |n: usize| -> Vec<f32> { (0..n).map(|_| normal.sample(&mut rng)).collect() };
    for conv in ["A", "B"] {
        for seq in [37usize, 16, 1] {
            let lam: Vec<f64> = (0..h).map(|hh| decay(hh, h, layer, n_layers, conv)).collect();
            let (q, k, v, s0) = (
                rand_vec(seq * h * d),
                rand_vec(seq * h * d),
                rand_vec(seq * h * d),
                rand_vec(h * d * d),
            );
            let inputs: HashMap<String, Tensor> = [
                ("in0", Tensor::from_f32(DType::F32, vec![1, h, d, d], s0.clone())),
                ("in1", Tensor::from_f32(DType::F32, vec![1, seq, h, d], q.clone())),
                ("in2", Tensor::from_f32(DType::F32, vec![1, seq, h, d], k.clone())),
                ("in3", Tensor::from_f32(DType::F32, vec![1, seq, h, d], v.clone())),
                (
                    "in4",
                    Tensor::from_f32(DType::F32, vec![h, 1, 1], lam.iter().map(|&x| x as f32).collect()),
                ),
            ]
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect();
            let r = interp.run(&inputs).unwrap();
            let (o_ref, s_ref) = chunked(&q, &k, &v, &s0, &lam, seq, h, d, 16);
            let o_ref: Vec<f32> = o_ref.iter().map(|&x| x as f32).collect();
            let s_ref: Vec<f32> = s_ref.iter().map(|&x| x as f32).collect();
            check(
                &format!("scan output, T={seq}, {conv}"),
                r["o"].as_f32().unwrap(),
                &o_ref,
                Tol::F32.op(),
            )
            .unwrap();
            check(
                &format!("scan final state, T={seq}, {conv}"),
                r["state"].as_f32().unwrap(),
                &s_ref,
                Tol::F32.op(),
            )
            .unwrap();
        }
    }
}

#[test]
fn prefill_then_decode_equals_forward() {
    let e = engine("tiny");
    let tokens = random_tokens(1, 42, e.vocab);
    let full = e.forward(&tokens, None).unwrap();
    for n in [37, 1, 41] {
        let dec = e.forward(&tokens, Some(n)).unwrap();
        check(
            &format!("tiny prefill {n} + decode"),
            dec.as_f32().unwrap(),
            full.as_f32().unwrap(),
            Tol::F32.model(),
        )
        .unwrap();
    }
    // chunks of prefill through the state (continued prefill) give the same logits too
    let mut st = e.new_state(1).unwrap();
    let a = e.step(&mut st, &tokens[..20], 20).unwrap();
    let b = e.step(&mut st, &tokens[20..], 22).unwrap();
    let mut both = a.as_f32().unwrap().to_vec();
    both.extend_from_slice(b.as_f32().unwrap());
    check("tiny 20 + 22 prefill", &both, full.as_f32().unwrap(), Tol::F32.model()).unwrap();

    // small (bf16 storage, 8 layers, 16 experts)
    let e = engine("small");
    let tokens = random_tokens(2, 12, e.vocab);
    let full = e.forward(&tokens, None).unwrap();
    let dec = e.forward(&tokens, Some(8)).unwrap();
    check(
        "small prefill 8 + decode 4",
        dec.as_f32().unwrap(),
        full.as_f32().unwrap(),
        Tol::BF16.model(),
    )
    .unwrap();
}

/// `ringjit_logits = "last"` (what `generate` and `bench` load): a step's logits are the last
/// position's row of every sequence, equal to that row of the all-positions model, on the
/// reference and cpu devices (compiled: the slice reaches into the final norm's prologue), in
/// prefill and decode; a forward, which needs every row, is refused with a message.
#[test]
fn last_position_logits_equal_the_last_row_of_all() {
    let all = engine_with("tiny", &["ringjit_logits=all"], Device::Reference);
    assert!(!all.last_logits_only);
    let (batch, n) = (2, 9);
    let tokens = random_tokens(5, batch * n, all.vocab);
    let v = all.vocab;
    let mut st = all.new_state(batch).unwrap();
    let want_prefill = all.step(&mut st, &tokens, n).unwrap();
    let next = random_tokens(6, batch, v);
    let want_decode = all.step(&mut st, &next, 1).unwrap();
    let rows = |t: &Tensor| -> Vec<f32> {
        let x = t.as_f32().unwrap();
        (0..batch)
            .flat_map(|b| x[(b * n + n - 1) * v..(b * n + n) * v].to_vec())
            .collect()
    };
    for device in [Device::Reference, Device::Cpu] {
        let last = engine_with("tiny", &["ringjit_logits=last"], device);
        assert!(last.last_logits_only);
        let mut st = last.new_state(batch).unwrap();
        let got = last.step(&mut st, &tokens, n).unwrap();
        assert_eq!(got.shape, vec![batch, 1, v]);
        check(
            &format!("{device} prefill, last position"),
            got.as_f32().unwrap(),
            &rows(&want_prefill),
            Tol::F32.model(),
        )
        .unwrap();
        let got = last.step(&mut st, &next, 1).unwrap();
        check(
            &format!("{device} decode"),
            got.as_f32().unwrap(),
            want_decode.as_f32().unwrap(),
            Tol::F32.model(),
        )
        .unwrap();
        let e = last.forward(&tokens[..n], None).unwrap_err();
        assert!(e.0.contains("ringjit_logits"), "{e}");
    }
}

#[test]
fn batched_sequences_are_independent() {
    let e = engine("tiny");
    let a = random_tokens(3, 9, e.vocab);
    let b = random_tokens(4, 9, e.vocab);
    let mut st = e.new_state(2).unwrap();
    let both: Vec<i64> = a.iter().chain(&b).copied().collect();
    let l = e.step(&mut st, &both, 9).unwrap();
    let la = e.forward(&a, None).unwrap();
    let lb = e.forward(&b, None).unwrap();
    let half = 9 * e.vocab;
    check(
        "batch row 0",
        &l.as_f32().unwrap()[..half],
        la.as_f32().unwrap(),
        Tol::F32.model(),
    )
    .unwrap();
    check(
        "batch row 1",
        &l.as_f32().unwrap()[half..],
        lb.as_f32().unwrap(),
        Tol::F32.model(),
    )
    .unwrap();
}

/// Values labelled `label` by the DSL (`let label = ...`), first one (layer 1's MoE) first.
fn labelled(g: &Graph, label: &str, port: u32) -> Value {
    let mut nodes: Vec<_> =
        g.g.node_indices()
            .filter(|&n| g.node(n).label.as_deref() == Some(label))
            .collect();
    nodes.sort();
    Value {
        node: *nodes.first().unwrap_or_else(|| panic!("no node labelled {label}")),
        port,
    }
}

#[test]
fn moe_routing_matches_an_independent_implementation() {
    let cfg = config("tiny", &[]);
    let (e, n_group, topk_group, k, rsf) = (8usize, 4usize, 2usize, 2usize, 2.5f64);
    let per = e / n_group;
    let mut g = model(&cfg).graph;
    let probs = labelled(&g, "router_probs", 0);
    let chosen = labelled(&g, "chosen", 1);
    let weights = labelled(&g, "route_weights", 0);
    g.add_output("probs", probs, InputKind::Data);
    g.add_output("chosen", chosen, InputKind::Data);
    g.add_output("weights", weights, InputKind::Data);
    let tokens = random_tokens(5, 96, 256);

    let run = |bias: Option<Vec<f32>>| {
        let mut replace = HashMap::new();
        if let Some(b) = bias {
            replace.insert(
                "model.layers.1.mlp.gate.expert_bias".to_string(),
                Tensor::from_f32(DType::F32, vec![e], b),
            );
        }
        let src = Patched {
            base: RandomWeights::new(8),
            replace,
        };
        let interp = Interpreter::new(&g, &src).unwrap();
        let mut inputs = HashMap::new();
        inputs.insert(
            "tokens".to_string(),
            Tensor::from_i64(DType::I64, vec![1, tokens.len()], tokens.clone()),
        );
        for &i in &g.inputs {
            if let Op::Input {
                name,
                kind: InputKind::State,
                dtype,
                shape,
            } = &g.node(i).op
            {
                let env = [("batch".to_string(), 1i64), ("past".to_string(), 0)].into();
                inputs.insert(
                    name.clone(),
                    Tensor::zeros(*dtype, ir::shape::eval_shape(shape, &env).unwrap()),
                );
            }
        }
        let r = interp.run(&inputs).unwrap();
        (
            r["probs"].as_f32().unwrap().to_vec(),
            r["chosen"].as_i64().unwrap().to_vec(),
            r["weights"].as_f32().unwrap().to_vec(),
        )
    };

    let bias: Vec<f32> = {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(77);
        let n = rand_distr::Normal::new(0.0f32, 0.3).unwrap();
        (0..e).map(|_| n.sample(&mut rng)).collect()
    };
    let (p0, c0, _) = run(None);
    let (p1, c1, w1) = run(Some(bias.clone()));
    assert_eq!(p0, p1, "the bias must not change the router probabilities");
    let (mut differs, mut group_limit_mattered) = (0, 0);
    for t in 0..tokens.len() {
        let probs = &p1[t * e..(t + 1) * e];
        let biased: Vec<f64> = probs.iter().zip(&bias).map(|(&p, &b)| p as f64 + b as f64).collect();
        // stable descending order: ties go to the lower index
        let order = |xs: &[f64]| {
            let mut idx: Vec<usize> = (0..xs.len()).collect();
            idx.sort_by(|&a, &b| xs[b].total_cmp(&xs[a]).then(a.cmp(&b)));
            idx
        };
        let group_scores: Vec<f64> = (0..n_group)
            .map(|gi| {
                let o = order(&biased[gi * per..(gi + 1) * per]);
                o.iter().take(2).map(|&i| biased[gi * per + i]).sum()
            })
            .collect();
        let kept: Vec<usize> = order(&group_scores).into_iter().take(topk_group).collect();
        let masked: Vec<f64> = (0..e)
            .map(|x| {
                if kept.contains(&(x / per)) {
                    biased[x]
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let expect: Vec<i64> = order(&masked).into_iter().take(k).map(|x| x as i64).collect();
        let got = &c1[t * k..(t + 1) * k];
        assert_eq!(got, expect.as_slice(), "token {t}: chosen experts");
        for &x in got {
            assert!(
                kept.contains(&(x as usize / per)),
                "token {t}: expert {x} from a dropped group"
            );
        }
        if order(&biased)[..k].iter().map(|&x| x as i64).collect::<Vec<_>>() != expect {
            group_limit_mattered += 1;
        }
        // weights from the unbiased probabilities, normalised and scaled (spec §2.6)
        let sum: f64 = got.iter().map(|&x| probs[x as usize] as f64).sum();
        let w_expect: Vec<f32> = got
            .iter()
            .map(|&x| (rsf * probs[x as usize] as f64 / (sum + 1e-20)) as f32)
            .collect();
        check(
            &format!("token {t} weights"),
            &w1[t * k..(t + 1) * k],
            &w_expect,
            Tol::F32.op(),
        )
        .unwrap();
        if c0[t * k..(t + 1) * k] != *got {
            differs += 1;
        }
    }
    assert!(differs > 0, "a non-zero expert bias never changed the selection");
    assert!(
        group_limit_mattered > 0,
        "the group limit never mattered: the test proves nothing"
    );
}

#[test]
fn config_mistakes_are_named() {
    let mut c = config("tiny", &[]);
    c.as_object_mut().unwrap().remove("hidden_size");
    let e = runtime::model::build_model(&c, None).unwrap_err().to_string();
    assert!(e.starts_with("models/ring_linear.ring:"), "{e}");
    assert!(e.contains("config.json has no `hidden_size`"), "{e}");

    let c = config("tiny", &[("num_experts", 10.into())]);
    let e = runtime::model::build_model(&c, None).unwrap_err().to_string();
    assert!(
        e.contains("requirement failed: num_experts (10) must be divisible by n_group (4)"),
        "{e}"
    );

    let c = config("tiny", &[("ringjit_decay_convention", "C".into())]);
    let e = runtime::model::build_model(&c, None).unwrap_err().to_string();
    assert!(e.contains("ringjit_decay_convention must be \"A\" or \"B\""), "{e}");

    let c = config("tiny", &[("hidden_size", "wide".into())]);
    let e = runtime::model::build_model(&c, None).unwrap_err().to_string();
    assert!(
        e.contains("config.json's `hidden_size` must be an integer, found \"wide\""),
        "{e}"
    );

    let c = config(
        "tiny",
        &[("rope_scaling", serde_json::json!({"type": "yarn", "factor": 4.0}))],
    );
    let e = runtime::model::build_model(&c, None).unwrap_err().to_string();
    assert!(e.contains("rope_scaling (YaRN) is not supported"), "{e}");
}

#[test]
fn decay_convention_b_changes_only_linear_layers_decay() {
    // same weights, other convention: logits differ; layer factor B > A everywhere but l = 0
    let a = engine("tiny");
    let mb = LoadedModel::load(&ModelSpec {
        config: Some("tiny".into()),
        seed: 3,
        overrides: vec!["ringjit_decay_convention=B".into()],
        ..Default::default()
    })
    .unwrap();
    let b = Engine::new(&mb, Device::Reference).unwrap();
    let tokens = random_tokens(6, 16, a.vocab);
    let la = a.forward(&tokens, None).unwrap();
    let lb = b.forward(&tokens, None).unwrap();
    // the first token sees only itself (λ^0 = 1): its logits cannot depend on the decay
    let v = a.vocab;
    assert!(rel_err(&la.as_f32().unwrap()[..v], &lb.as_f32().unwrap()[..v]) < 1e-6);
    assert!(rel_err(la.as_f32().unwrap(), lb.as_f32().unwrap()) > 1e-4);
}
