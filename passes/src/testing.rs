//! Helpers for rule and pass tests (used by this crate's tests; public so that the engineers of
//! the other rule families write their start ⇒ goal cases the same way).
//!
//! A start is a small typed [`Graph`] (leaves need types, so s-expressions alone will not do);
//! a goal is an s-expression over the language in which `{name}` stands for the leaf of the
//! input or parameter called `name`, e.g. `(rms_norm {x} {w} 1e-6)`. [`check_rewrite`] runs
//! the rules with the given (explicit) limits and asserts the goal is in the e-class of the
//! start's output — egg's `test_fn!`, typed.

use crate::egraph::lang::Rl;
use crate::egraph::{self, Limits, RlGraph, Rule, Saturation};
use crate::{CompileOptions, Mode};
use ir::checkpoint::RandomWeights;
use ir::graph::Graph;
use ir::interp::{Interpreter, ParamSource};
use ir::op::Op;
use ir::shape::{eval_shape, DimEnv};
use ir::tensor::Tensor;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// Replaces `{name}` by the `(leaf N)` of the input/param `name`.
pub fn goal_expr(eg: &RlGraph, goal: &str) -> Result<egg::RecExpr<Rl>, String> {
    let text = goal_expr_text(eg, goal)?;
    text.parse().map_err(|e| format!("goal `{text}` does not parse: {e}"))
}

fn goal_expr_text(eg: &RlGraph, goal: &str) -> Result<String, String> {
    let mut text = goal.to_string();
    for (i, e) in eg.analysis.leaves.entries.iter().enumerate() {
        let name = match &e.op {
            Op::Input { name, .. } | Op::Param { name, .. } => name,
            _ => continue,
        };
        text = text.replace(&format!("{{{name}}}"), &format!("(leaf {i})"));
    }
    if text.contains('{') {
        return Err(format!("goal `{goal}` names an unknown leaf"));
    }
    Ok(text)
}

/// Saturates `start` with `rules` within `limits`; Ok when `goal` ended up in the e-class of
/// the output `output`. Returns the e-graph and the runner's statistics for further checks.
pub fn check_rewrite(
    start: &Graph,
    output: &str,
    goal: &str,
    rules: &[Rule],
    limits: &Limits,
) -> Result<(RlGraph, Saturation), String> {
    let (eg, bridge) = egraph::to_egraph(start)?;
    let (eg, sat) = egraph::saturate(eg, rules, limits);
    let root = bridge
        .outputs
        .iter()
        .find(|(n, _, _)| n == output)
        .map(|(_, id, _)| eg.find(*id))
        .ok_or_else(|| format!("no output `{output}`"))?;
    if goal.contains('?') {
        // a goal with pattern variables: it must match in the output's e-class
        let text = goal_expr_text(&eg, goal)?;
        let p: egg::Pattern<Rl> = text.parse().map_err(|e| format!("goal `{text}` does not parse: {e}"))?;
        return match egg::Searcher::search_eclass(&p, &eg, root) {
            Some(_) => Ok((eg, sat)),
            None => Err(format!(
                "goal `{goal}` does not match `{output}` (stop: {}, fired: {:?}, refused: {:?} {:?})",
                sat.stop_reason, sat.fired, sat.refused, sat.refusal_example
            )),
        };
    }
    let expr = goal_expr(&eg, goal)?;
    match eg.lookup_expr(&expr) {
        Some(id) if eg.find(id) == root => Ok((eg, sat)),
        Some(_) => Err(format!(
            "goal `{goal}` is in the e-graph but not equal to `{output}` (stop: {}, fired: {:?}, refused: {:?} {:?})",
            sat.stop_reason, sat.fired, sat.refused, sat.refusal_example
        )),
        None => Err(format!(
            "goal `{goal}` was not reached (stop: {}, fired: {:?}, refused: {:?} {:?})",
            sat.stop_reason, sat.fired, sat.refused, sat.refusal_example
        )),
    }
}

/// A small deterministic generator (SplitMix64): test inputs without a dependency.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Random values for every input of `g` under `env`: floats uniform in [-scale, scale),
/// integers in `0..int_bound`, bools fair.
pub fn random_inputs(g: &Graph, env: &DimEnv, seed: u64, scale: f32, int_bound: i64) -> HashMap<String, Tensor> {
    let mut rng = SplitMix(seed);
    let mut out = HashMap::new();
    for &i in &g.inputs {
        if let Op::Input { name, dtype, shape, .. } = &g.node(i).op {
            let shape = eval_shape(shape, env).unwrap_or_default();
            let n: usize = shape.iter().product();
            let t = if dtype.is_float() {
                Tensor::from_f32(*dtype, shape, (0..n).map(|_| rng.unit() * scale).collect())
            } else if dtype.is_int() {
                let b = int_bound.max(1) as u64;
                Tensor::from_i64(*dtype, shape, (0..n).map(|_| (rng.next_u64() % b) as i64).collect())
            } else {
                Tensor::from_bool(shape, (0..n).map(|_| rng.next_u64() & 1 == 1).collect())
            };
            out.insert(name.clone(), t);
        }
    }
    out
}

/// Runs `g` in the interpreter.
pub fn run(
    g: &Graph,
    params: &dyn ParamSource,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, String> {
    let interp = Interpreter::new(g, params).map_err(|e| e.to_string())?;
    interp.run(inputs).map_err(|e| e.to_string())
}

/// Checks every output of `got` against `want` within `bound` (ir::tol's metric).
pub fn outputs_close(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, bound: f64) -> Result<f64, String> {
    let mut worst = 0.0f64;
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    for name in names {
        let w = &want[name];
        let g = got.get(name).ok_or_else(|| format!("output `{name}` missing"))?;
        if g.shape != w.shape || g.dtype != w.dtype {
            return Err(format!("output `{name}`: {} vs {}", g.type_str(), w.type_str()));
        }
        let a: Vec<f32> = g.to_f64_vec().iter().map(|&x| x as f32).collect();
        let b: Vec<f32> = w.to_f64_vec().iter().map(|&x| x as f32).collect();
        worst = worst.max(ir::tol::check(name, &a, &b, bound)?);
    }
    Ok(worst)
}

/// Elaborates a DSL snippet (no config) into a graph: rule tests write their start graphs in
/// the model's own language, so they have the model's exact shape.
///
/// # Panics
/// When the snippet does not elaborate (a test bug).
pub fn dsl(src: &str) -> Graph {
    match ir::dsl::elaborate("test.ring", src, &serde_json::json!({})) {
        Ok(m) => m.graph,
        Err(e) => panic!("test snippet does not elaborate: {e}"),
    }
}

/// A graph of one routing top-k (`Fused::RouteTopK`, normalised, scale 2.5) over inputs
/// `probs: f32[b, s, experts]` and `bias: f32[experts]` (inputs, so a test picks their values:
/// ties, NaN, ±0), with outputs `chosen` and `weights`: a backend's route_topk kernel alone.
pub fn route_graph(experts: usize, n_group: usize, topk_group: usize, k: usize) -> Graph {
    use ir::op::InputKind;
    use ir::{DType, Dim};
    let mut g = Graph::new();
    let input = |g: &mut Graph, name: &str, shape: Vec<Dim>| {
        g.add1(
            Op::Input {
                name: name.into(),
                kind: InputKind::Data,
                dtype: DType::F32,
                shape,
            },
            &[],
            None,
        )
        .unwrap()
    };
    let e = Dim::constant(experts as i64);
    let probs = input(&mut g, "probs", vec![Dim::sym("b"), Dim::sym("s"), e.clone()]);
    let bias = input(&mut g, "bias", vec![e]);
    let op = Op::Fused(ir::fused::Fused::RouteTopK {
        k,
        n_group,
        topk_group,
        scale: 2.5,
        normalize: true,
        biased: true,
    });
    let outs = g.add(op, &[probs, bias], None).unwrap();
    g.add_output("chosen", outs[0], InputKind::Data);
    g.add_output("weights", outs[1], InputKind::Data);
    g
}

/// Limits for rule tests: small and explicit (style.md 7).
pub fn test_limits() -> Limits {
    Limits {
        node_limit: 10_000,
        iter_limit: 8,
        time_limit: std::time::Duration::from_secs(5),
    }
}

// ---- the Ring-linear models, for the whole-model tests in passes/tests/ -------------------

/// The repository root (models/ and models/configs/ live there).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `models/ring_linear.ring` elaborated against `models/configs/<config>.json`.
pub fn model(config: &str) -> Graph {
    model_with(config, &[])
}

/// `models/configs/<config>.json`.
pub fn config_json(config: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join(format!("models/configs/{config}.json"))).unwrap())
        .unwrap()
}

/// Random weights for `models/configs/<config>.json`, initialised as HF does with the config's
/// `initializer_range` ([`RandomWeights::from_config`]).
pub fn weights(config: &str, seed: u64) -> RandomWeights {
    RandomWeights::from_config(seed, &config_json(config))
}

/// [`model`] with config entries overridden.
pub fn model_with(config: &str, overrides: &[(&str, serde_json::Value)]) -> Graph {
    let src = std::fs::read_to_string(root().join("models/ring_linear.ring")).unwrap();
    let mut cfg = config_json(config);
    for (k, v) in overrides {
        cfg[*k] = v.clone();
    }
    ir::dsl::elaborate("models/ring_linear.ring", &src, &cfg).unwrap().graph
}

/// The symbolic dims of one step.
pub fn env(batch: i64, seq: i64, past: i64) -> DimEnv {
    [
        ("batch".to_string(), batch),
        ("seq".to_string(), seq),
        ("past".to_string(), past),
    ]
    .into()
}

/// Both graphs on the same random inputs and weights; the worst relative error.
pub fn compare(a: &Graph, b: &Graph, e: &DimEnv, seed: u64, bound: f64) -> Result<f64, String> {
    let inputs = random_inputs(a, e, seed, 0.5, 200);
    let w = RandomWeights::new(seed);
    let want = run(a, &w, &inputs)?;
    let got = run(b, &w, &inputs)?;
    outputs_close(&got, &want, bound)
}

/// Compile options for tests: explicit, generous limits.
pub fn opts(mode: Mode) -> CompileOptions {
    CompileOptions {
        mode,
        limits: Limits {
            node_limit: 200_000,
            iter_limit: 12,
            time_limit: Duration::from_secs(20),
        },
        ..Default::default()
    }
}

/// How many nodes of `g` are the op called `name`.
pub fn count_ops(g: &Graph, name: &str) -> usize {
    g.g.node_weights().filter(|n| n.op.name() == name).count()
}
