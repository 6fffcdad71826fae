//! The GPU benchmark of a whole model (`ringjit bench --device cuda`): decode steps at given
//! batch sizes over a filled context and a prefill, each timed with CUDA events (median of
//! repeated launches of the step's kernels), with each step's physical floor and the time per
//! kernel kind. A benchmark, never a test.
//!
//! Weights are random and made on the GPU ([`GpuWeights::random`]); the KV caches and
//! linear-attention states of the context are random too (never zeros: perf.md), so the
//! attention reads a real `context` tokens without running a prefill of that length first.

use crate::cuda::Gpu;
use crate::cuda_plan::{alloc, CudaGraphs, CudaModel, CudaPlan, DeviceStates, GpuWeights, StepTiming};
use crate::{Error, Result};
use ir::op::{InputKind, Op};
use ir::{DType, DimEnv, Graph, ParamSpec, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct GpuBenchConfig {
    pub decode_batch: Vec<usize>,
    pub context: usize,
    pub prefill: Vec<usize>,
    pub repeats: usize,
    pub seed: u64,
    pub precision: passes::Precision,
    /// memory bandwidth (bytes/s) and bf16 rate (FLOP/s) the floors are computed with
    pub bandwidth: f64,
    pub peak_flops: f64,
}

/// One timed step.
#[derive(Clone, Debug)]
pub struct StepResult {
    /// `decode b64 @4096` or `prefill 4096`
    pub what: String,
    pub batch: usize,
    pub tokens: usize,
    pub ms: f64,
    pub tokens_per_s: f64,
    pub floor_ms: f64,
    /// summed kernel medians by kind (`gemm`, `attention`, `loop`, ...), ms
    pub by_kind: BTreeMap<String, f64>,
    /// every kernel in launch order with its median, ms (the JSON's `kernels_ms`)
    pub per_kernel: Vec<(String, f64)>,
    /// decode only: the median wall time of whole steps through [`CudaPlan::run`] (tokens
    /// up, the step replayed as a CUDA graph, logits down), `past` growing by one per step
    pub wall_ms: Option<f64>,
    /// decode only: the median GPU time of one replay of the step's CUDA graph (events)
    pub graph_ms: Option<f64>,
}

impl StepResult {
    /// The five slowest kernels, slowest first, ms.
    pub fn slowest(&self) -> Vec<(String, f64)> {
        let mut top = self.per_kernel.clone();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(5);
        top
    }
}

#[derive(Clone, Debug)]
pub struct GpuBenchReport {
    pub card: String,
    pub weights_bytes: u64,
    pub compile_s: f64,
    /// kernels launched as programmatic dependents (`crate::cuda_plan::pdl_enabled`)
    pub pdl: bool,
    pub steps: Vec<StepResult>,
}

/// What the floors need to know about the model.
struct Sizes {
    /// bytes of every weight outside the routed experts
    dense_bytes: f64,
    /// bytes of one routed expert of one layer, and the count per layer and layers with them
    expert_bytes: f64,
    experts: f64,
    top_k: f64,
    moe_layers: f64,
    /// active parameters per token (for FLOPs), the LM head included
    active_params: f64,
    /// the LM head's parameters (vocab × hidden)
    head_params: f64,
}

fn sizes(config: &serde_json::Value, specs: &[ParamSpec]) -> Sizes {
    let num = |k: &str| config.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    let mut dense = 0.0;
    let mut expert_total = 0.0;
    let mut total_params = 0.0;
    let mut expert_params = 0.0;
    for p in specs {
        let bytes = (p.numel() * p.dtype.size_bytes()) as f64;
        total_params += p.numel() as f64;
        if p.name.contains(".experts.") {
            expert_total += bytes;
            expert_params += p.numel() as f64;
        } else {
            dense += bytes;
        }
    }
    let experts = num("num_experts");
    let layers = num("num_hidden_layers");
    let moe_layers = (layers - num("first_k_dense_replace")).max(0.0);
    let per_expert = if experts > 0.0 && moe_layers > 0.0 {
        expert_total / (experts * moe_layers)
    } else {
        0.0
    };
    let top_k = num("num_experts_per_tok");
    let active = total_params - expert_params
        + if experts > 0.0 {
            expert_params * top_k / experts
        } else {
            0.0
        };
    Sizes {
        dense_bytes: dense,
        expert_bytes: per_expert,
        experts,
        top_k,
        moe_layers,
        active_params: active - num("vocab_size") * num("hidden_size"), // the embedding is a gather
        head_params: num("vocab_size") * num("hidden_size"),
    }
}

impl Sizes {
    /// Bytes of weights a step of `batch` tokens must read: the dense weights once, and per
    /// MoE layer the experts that random routing is expected to touch.
    fn weight_bytes(&self, tokens: usize) -> f64 {
        if self.experts == 0.0 {
            return self.dense_bytes;
        }
        let p_untouched = (1.0 - self.top_k / self.experts).powf(tokens as f64);
        self.dense_bytes + self.moe_layers * self.experts * (1.0 - p_untouched) * self.expert_bytes
    }
}

struct StateSpec {
    name: String,
    dtype: DType,
    shape: Vec<ir::Dim>,
}

fn state_specs(g: &Graph) -> Vec<StateSpec> {
    g.inputs
        .iter()
        .filter_map(|&n| match &g.node(n).op {
            Op::Input {
                name,
                kind: InputKind::State,
                dtype,
                shape,
            } => Some(StateSpec {
                name: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Random device states for `batch` sequences holding `past` tokens.
fn random_states(gpu: &Arc<Gpu>, specs: &[StateSpec], batch: usize, past: usize, seed: u64) -> Result<DeviceStates> {
    let env: DimEnv = [("batch".to_string(), batch as i64), ("past".to_string(), past as i64)].into();
    let mut bufs = HashMap::new();
    // one small random tensor per dtype, tiled: random enough for timing, cheap to make
    for (i, s) in specs.iter().enumerate() {
        let shape = ir::shape::eval_shape(&s.shape, &env).map_err(Error)?;
        let n: usize = shape.iter().product();
        let mut d = alloc(gpu, n * s.dtype.size_bytes(), &s.name)?;
        if n > 0 {
            let tile = n.min(1 << 20);
            let vals: Vec<f32> = (0..tile)
                .map(|j| codegen::fill::fill_value(seed ^ i as u64, j as u64, 0.5, 0.0))
                .collect();
            let t = Tensor::from_f32(s.dtype, vec![tile], vals).to_bytes();
            let mut at = 0;
            while at < d.bytes {
                let len = t.len().min(d.bytes - at);
                d.write_at(gpu, at, &t[..len])?;
                at += len;
            }
        }
        bufs.insert(s.name.clone(), d);
    }
    Ok(DeviceStates::new(bufs))
}

/// Compiles the model for decode and prefill, makes random weights on the GPU and times the
/// steps of `cfg`. `progress` is told what is happening.
pub fn run(
    gpu: Arc<Gpu>,
    config: &serde_json::Value,
    graph: &Graph,
    moments: &dyn Fn(&ParamSpec) -> Option<(f32, f32)>,
    cfg: &GpuBenchConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<GpuBenchReport> {
    let specs = graph.params().map_err(|e| Error(e.to_string()))?;
    let sz = sizes(config, &specs);
    progress("making random weights on the GPU");
    let weights = GpuWeights::random(gpu.clone(), &specs, cfg.seed, moments, &|_, _| {})?;
    let t0 = std::time::Instant::now();
    // the engine's plans: prefill, decode, and the decode plan of small batches (norms folded)
    progress("compiling the prefill and decode graphs");
    let graphs = CudaGraphs::compile(graph, true, cfg.precision)?;
    let model = CudaModel::new(weights, &graphs, &codegen::ptx::PtxOptions::default())?;
    model.set_graphs(false); // on only for the whole-step timing below
    let compile_s = t0.elapsed().as_secs_f64();
    let states = state_specs(graph);
    let vocab = config["vocab_size"].as_u64().unwrap_or(1) as i64;
    let last_only = crate::engine::logits_last_only(graph);
    let mut steps = Vec::new();
    let mut step = |plan: &CudaPlan, what: String, batch: usize, seq: usize, past: usize| -> Result<()> {
        progress(&what);
        let env: DimEnv = [
            ("batch".to_string(), batch as i64),
            ("seq".to_string(), seq as i64),
            ("past".to_string(), past as i64),
        ]
        .into();
        let toks: Vec<i64> = (0..batch * seq)
            .map(|i| (codegen::fill::fill_value(cfg.seed, i as u64, 1.0, 0.0).abs() * 1e6) as i64 % vocab)
            .collect();
        let inputs: HashMap<String, Tensor> = [(
            "tokens".to_string(),
            Tensor::from_i64(DType::I64, vec![batch, seq], toks),
        )]
        .into();
        let mut st = random_states(&gpu, &states, batch, past, cfg.seed)?;
        // the states the step reads (before a decode step moves its caches into pages, whose
        // reserved capacity is not traffic)
        let kv_bytes: f64 = st.bufs.values().map(|d| d.bytes as f64).sum();
        let (_, t): (_, StepTiming) = plan.run_timed(&env, &inputs, &mut st, cfg.repeats)?;
        // whole decode steps as a server runs them: three to reach the captured graphs, then timed
        let mut graph_ms = None;
        let wall_ms = match seq == 1 && plan.set_graphs(true) {
            false => None,
            true => {
                let mut st = random_states(&gpu, &states, batch, past, cfg.seed)?;
                let mut walls = Vec::new();
                for i in 0..cfg.repeats.max(8) + 3 {
                    let mut e = env.clone();
                    e.insert("past".to_string(), (past + i) as i64);
                    let t0 = std::time::Instant::now();
                    plan.run(&e, &inputs, &mut st)?;
                    if i >= 3 {
                        walls.push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                }
                graph_ms = plan.replay_ms(cfg.repeats.max(8))?;
                plan.set_graphs(false);
                walls.sort_by(f64::total_cmp);
                Some(walls[walls.len() / 2])
            }
        };
        let tokens = batch * seq;
        let floor_bytes = sz.weight_bytes(tokens) + kv_bytes;
        // the LM head runs for the positions that get logits (the last of each sequence when
        // the model makes only those: `ringjit_logits = "last"`)
        let head_rows = if last_only { batch } else { tokens };
        let floor_flops =
            2.0 * ((sz.active_params - sz.head_params) * tokens as f64 + sz.head_params * head_rows as f64);
        let floor_ms = 1e3 * (floor_bytes / cfg.bandwidth).max(floor_flops / cfg.peak_flops);
        let mut by_kind = BTreeMap::new();
        for (k, (name, ms)) in plan.step_plan().kernels.iter().zip(&t.kernels) {
            debug_assert_eq!(&k.name, name);
            *by_kind.entry(k.kind_name().to_string()).or_insert(0.0) += ms;
        }
        steps.push(StepResult {
            what,
            batch,
            tokens,
            ms: t.step_ms,
            tokens_per_s: tokens as f64 / (t.step_ms / 1e3),
            floor_ms,
            by_kind,
            per_kernel: t.kernels,
            wall_ms,
            graph_ms,
        });
        Ok(())
    };
    for &b in &cfg.decode_batch {
        step(
            model.decode_plan_for(b),
            format!("decode b{b} @{}", cfg.context),
            b,
            1,
            cfg.context,
        )?;
    }
    for &t in &cfg.prefill {
        step(model.prefill_plan(), format!("prefill {t}"), 1, t, 0)?;
    }
    Ok(GpuBenchReport {
        card: gpu.name.clone(),
        weights_bytes: model.weights.bytes,
        compile_s,
        pdl: crate::cuda_plan::pdl_enabled(),
        steps,
    })
}

impl GpuBenchReport {
    /// The table `ringjit bench --device cuda` prints.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "card {}  weights {:.2} GB  compile+load {:.1} s  launches {}",
            self.card,
            self.weights_bytes as f64 / 1e9,
            self.compile_s,
            if self.pdl {
                "programmatic (RINGJIT_PDL=0: plain)"
            } else {
                "plain (RINGJIT_PDL=0)"
            }
        );
        let _ = writeln!(
            s,
            "{:<22} {:>10} {:>12} {:>10} {:>8} {:>8}",
            "step", "ms", "tokens/s", "floor ms", "% floor", "kernels"
        );
        for r in &self.steps {
            let _ = writeln!(
                s,
                "{:<22} {:>10.3} {:>12.0} {:>10.3} {:>7.1}% {:>8}",
                r.what,
                r.ms,
                r.tokens_per_s,
                r.floor_ms,
                100.0 * r.floor_ms / r.ms,
                r.per_kernel.len()
            );
            let graph_rows = [
                (r.graph_ms, "  as a graph", "one CUDA-graph replay, GPU time"),
                (
                    r.wall_ms,
                    "  as a graph, wall",
                    "whole steps: tokens up, CUDA graph, logits down",
                ),
            ];
            for (ms, what, how) in graph_rows {
                if let Some(ms) = ms {
                    let _ = writeln!(
                        s,
                        "{what:<22} {ms:>10.3} {:>12.0} {:>10.3} {:>7.1}%   ({how})",
                        r.tokens as f64 / (ms / 1e3),
                        r.floor_ms,
                        100.0 * r.floor_ms / ms
                    );
                }
            }
            let kinds: Vec<String> = r.by_kind.iter().map(|(k, ms)| format!("{k} {ms:.3}")).collect();
            let _ = writeln!(s, "    by kind (ms): {}", kinds.join(", "));
            let top: Vec<String> = r.slowest().iter().map(|(k, ms)| format!("{k} {ms:.3}")).collect();
            let _ = writeln!(s, "    slowest: {}", top.join(", "));
        }
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "card": self.card,
            "weights_bytes": self.weights_bytes,
            "compile_s": self.compile_s,
            "programmatic_launches": self.pdl,
            "steps": self.steps.iter().map(|r| serde_json::json!({
                "what": r.what, "batch": r.batch, "tokens": r.tokens, "ms": r.ms,
                "tokens_per_s": r.tokens_per_s, "floor_ms": r.floor_ms, "kernels": r.per_kernel.len(),
                "by_kind_ms": r.by_kind, "slowest": r.slowest(), "graph_wall_ms": r.wall_ms, "graph_ms": r.graph_ms,
                "kernels_ms": r.per_kernel,
            })).collect::<Vec<_>>(),
        })
    }
}
