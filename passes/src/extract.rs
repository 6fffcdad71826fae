//! Extraction by cost: which e-node computes each e-class.
//!
//! Cost model: the time an H100-class GPU would spend, in microseconds, as
//! `bytes moved / bandwidth + FLOPs / peak + launches · launch cost`, with symbolic dims
//! evaluated at a representative size ([`CostModel::prefill`], [`CostModel::decode`]). Views
//! (reshape, permute, expand, slice, tuple projections) and leaves cost nothing and launch
//! nothing; every other op is one kernel reading its operands and writing its outputs (a grouped
//! GEMM reads only the chosen experts' weights, see `fused_bytes`).
//!
//! The extractor is DAG-aware (style.md 8): a value used by several consumers is computed once,
//! so the objective is the sum of the local costs of the *distinct* e-nodes a selection
//! reaches. It starts from a greedy bottom-up choice whose child costs are amortised over the
//! child's users (plain tree costs double at every residual add and overflow any comparison
//! after ~50 layers), then improves it by local search, evaluating the true DAG cost of each
//! candidate switch; switching to one output of a multi-output node switches every e-class
//! that can read another output of the same node together with it (fused add + norm).

use crate::egraph::analysis::{to_op, Data, RlGraph};
use crate::egraph::bridge::Choice;
use crate::egraph::lang::{Attr, Rl};
use egg::{Id, Language};
use ir::fused::{Fused, GroupedEpilogue};
use ir::graph::{Graph, TensorType};
use ir::op::{Op, UnaryOp};
use ir::shape::DimEnv;
use std::collections::HashMap;

/// Latency (µs) of one token step of the lightning recurrence (§4.2): each rank-1 update
/// depends on the previous state, so even with S on chip every token pays a serial chain (the
/// next k, v, q rows, d² FMAs per head, the d-wide reduction of q·S).
pub const TOKEN_STEP_US: f64 = 0.5;
/// Latency (µs) of one chunk step of the chunked form (§4.3): the state handoff between chunks
/// (a d×C by C×d MMA, the write of the chunk-boundary state).
pub const CHUNK_STEP_US: f64 = 1.0;
/// Kernels of the chunked form: a sequential pass writing the chunk-boundary states, then a
/// parallel pass computing every chunk's output (as fla's `chunk_fwd_h`, `chunk_fwd_o`).
pub const CHUNK_KERNELS: f64 = 2.0;
/// Share of [`CostModel::peak_flops`] left to work that does not map to tensor-core tiles
/// (rank-1 updates, vector × matrix): H100 SXM FP32 on CUDA cores, 67 of ~400 TFLOP/s.
pub const CUDA_CORE_SHARE: f64 = 1.0 / 6.0;

/// µs on the serial path per 16-token batch of a lightning op with the group norm folded in
/// (`Fused::LinearAttnGate`): the blocks of a head group publish and count their `o`, and the
/// last one normalises the batch before it goes on (`codegen::ptx::linear_attn`). One batch at
/// decode costs less than the separate kernel's launch; a 4096-token prompt's 256 batches cost
/// far more (measured on an H100: 6.4 ms a layer folded against 1.4 ms + 0.06 ms apart).
pub const GATE_SYNC_US: f64 = 2.0;

/// Costs of a kernel on the target, with the symbolic dims' values to evaluate shapes at.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    pub env: DimEnv,
    /// bytes per microsecond (H100 SXM HBM3: 3.35 TB/s)
    pub bandwidth: f64,
    /// FLOPs per microsecond (a nominal dense peak)
    pub peak_flops: f64,
    /// microseconds per kernel launch
    pub launch_us: f64,
}

impl CostModel {
    fn h100(env: &[(&str, i64)]) -> CostModel {
        CostModel {
            env: env.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            bandwidth: 3.35e6,
            peak_flops: 4.0e8,
            launch_us: 3.0,
        }
    }

    /// A 4096-token prompt, batch 1, empty cache.
    pub fn prefill() -> CostModel {
        CostModel::h100(&[("batch", 1), ("seq", 4096), ("past", 0)])
    }

    /// One token after 4096 cached ones, batch 1.
    pub fn decode() -> CostModel {
        CostModel::h100(&[("batch", 1), ("seq", 1), ("past", 4096)])
    }

    fn numel(&self, t: &TensorType) -> f64 {
        t.shape
            .iter()
            .map(|d| d.eval(&self.env).unwrap_or(1).max(0) as f64)
            .product()
    }

    fn bytes(&self, t: &TensorType) -> f64 {
        self.numel(t) * t.dtype.size_bytes() as f64
    }

    fn kernel(&self, bytes: f64, flops: f64) -> f64 {
        bytes / self.bandwidth + flops / self.peak_flops + self.launch_us
    }

    /// Local cost (µs) of one op with operand types `ins` and output types `outs`.
    pub fn op_cost(&self, op: &Op, ins: &[&TensorType], outs: &[TensorType]) -> f64 {
        let io: f64 = ins.iter().map(|t| self.bytes(t)).sum::<f64>() + outs.iter().map(|t| self.bytes(t)).sum::<f64>();
        let out_n = outs.first().map(|t| self.numel(t)).unwrap_or(0.0);
        let in_n = |i: usize| ins.get(i).map(|t| self.numel(t)).unwrap_or(0.0);
        let dim = |t: Option<&&TensorType>, axis_from_end: usize| -> f64 {
            t.and_then(|t| t.shape.len().checked_sub(axis_from_end).map(|a| &t.shape[a]))
                .map(|d| d.eval(&self.env).unwrap_or(1) as f64)
                .unwrap_or(1.0)
        };
        match op {
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Const { .. }
            | Op::Literal { .. }
            | Op::DimValue { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Expand { .. }
            | Op::Slice { .. } => 0.0,
            // generated from the index inside whatever kernel reads it
            Op::Iota { .. } => 0.0,
            Op::Unary(u) => {
                let w = match u {
                    UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Not => 1.0,
                    _ => 8.0,
                };
                self.kernel(io, w * out_n)
            }
            Op::Binary(_) | Op::Where | Op::Cast { .. } | Op::Concat { .. } => self.kernel(io, out_n),
            Op::Reduce { .. } | Op::ArgMax { .. } => self.kernel(io, in_n(0)),
            Op::TopK { k, .. } => self.kernel(io, in_n(0) * (*k as f64).log2().max(1.0)),
            // reads only the selected rows: output-sized traffic plus the indices
            Op::IndexSelect { .. } | Op::GatherAlong { .. } => {
                let idx = ins.get(1).map(|t| self.bytes(t)).unwrap_or(0.0);
                let out: f64 = outs.iter().map(|t| self.bytes(t)).sum();
                self.kernel(2.0 * out + idx, out_n)
            }
            Op::ScatterAddAlong { .. } => self.kernel(io, in_n(2)),
            Op::Matmul => {
                let k = dim(ins.first(), 1);
                self.kernel(io, 2.0 * out_n * k)
            }
            Op::Scan {
                body,
                axis,
                n_carry,
                n_seq,
            } => {
                // a loop of the body's kernels, one iteration per step: the length of the
                // sequences (the carries before them have no scan axis)
                let steps = ins
                    .iter()
                    .skip(*n_carry)
                    .take(*n_seq)
                    .find_map(|t| t.shape.get(*axis).map(|d| d.eval(&self.env).unwrap_or(1) as f64))
                    .unwrap_or(1.0)
                    .max(1.0);
                let body_kernels = body
                    .g
                    .node_weights()
                    .filter(|n| self.op_cost(&n.op, &[], &n.outputs) > 0.0)
                    .count() as f64;
                let carry: f64 = outs.iter().map(|t| self.numel(t)).sum();
                self.kernel(io, 4.0 * carry) + steps * body_kernels * self.launch_us
            }
            Op::Fused(
                f @ (Fused::LinearAttnChunk { .. }
                | Fused::LinearAttnStep
                | Fused::LinearAttnGate { .. }
                | Fused::LinearAttnQkGate { .. }),
            ) => self.lightning(f, ins, io),
            Op::Fused(f) => {
                let bytes = self.fused_bytes(f, ins, outs).unwrap_or(io);
                self.kernel(bytes, self.fused_flops(f, ins, out_n))
            }
        }
    }

    /// Bytes a composite kernel moves where that is not "every operand and output once".
    ///
    /// A grouped GEMM streams only the weight tiles of the experts some token chose: with
    /// `tokens · K` (token, slot) pairs over E experts, at most `min(E, tokens · K)` of the E
    /// stacked `[E, ..]` weights are read (decode: K of E; a long prefill: all of them, once).
    /// The dense formulation's matmuls read all E experts for every token.
    fn fused_bytes(&self, f: &Fused, ins: &[&TensorType], outs: &[TensorType]) -> Option<f64> {
        let Fused::GroupedMatmul { epilogue } = f else {
            return None;
        };
        // operands: SwiGlu (x, chosen, w_gate, w_up), WeightedCombine (h, chosen, weights, w_down)
        let weights: &[usize] = match epilogue {
            GroupedEpilogue::SwiGlu => &[2, 3],
            // (the shared expert's weights, operand 5, are read whole)
            GroupedEpilogue::WeightedCombine | GroupedEpilogue::CombineShared => &[3],
        };
        let pairs = self.numel(ins.get(1)?);
        let experts = ins.get(weights[0])?.shape.first()?.eval(&self.env).ok()?.max(1) as f64;
        let touched = pairs.min(experts) / experts;
        let read: f64 = ins
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let b = self.bytes(t);
                if weights.contains(&i) {
                    b * touched
                } else {
                    b
                }
            })
            .sum();
        Some(read + outs.iter().map(|t| self.bytes(t)).sum::<f64>())
    }

    /// The lightning recurrence (§2.4.4) is latency-bound where it is sequential, so its cost
    /// adds the serial chain to the usual traffic, FLOPs and launches:
    /// - step (§4.2): one kernel; T dependent token steps ([`TOKEN_STEP_US`] each), the rank-1
    ///   updates and q·S products on the CUDA cores ([`CUDA_CORE_SHARE`] of the peak);
    /// - chunked (§4.3): [`CHUNK_KERNELS`] kernels; ⌈T/C⌉ dependent chunk steps
    ///   ([`CHUNK_STEP_US`] each), the work on the tensor cores but padded to whole C-token
    ///   tiles, plus the chunk-boundary states written by the first kernel and read by the
    ///   second;
    /// - either with the group norm folded in (`LinearAttnGate`): [`GATE_SYNC_US`] more per
    ///   16-token batch.
    ///
    /// At T = 1 the step is cheaper (one launch, no padding); for a long prompt the chunked form
    /// is (⌈T/C⌉ instead of T sequential steps).
    fn lightning(&self, f: &Fused, ins: &[&TensorType], io: f64) -> f64 {
        let dim = |a: usize| -> f64 {
            ins.get(1)
                .and_then(|q| q.shape.get(a))
                .map(|x| x.eval(&self.env).unwrap_or(1).max(0) as f64)
                .unwrap_or(1.0)
        };
        let (heads, t, d) = (dim(0) * dim(2), dim(1), dim(3));
        let flops = self.fused_flops(f, ins, 0.0);
        // the folded group norm waits for each 16-token batch's normalisation
        let sync = match f {
            Fused::LinearAttnGate { .. } | Fused::LinearAttnQkGate { .. } => (t / 16.0).ceil() * GATE_SYNC_US,
            _ => 0.0,
        };
        sync + match f {
            Fused::LinearAttnChunk { chunk } | Fused::LinearAttnGate { chunk: Some(chunk), .. } => {
                let chunks = (t / (*chunk).max(1) as f64).ceil();
                let states = 2.0 * chunks * heads * d * d * 4.0;
                (io + states) / self.bandwidth
                    + flops / self.peak_flops
                    + chunks * CHUNK_STEP_US
                    + CHUNK_KERNELS * self.launch_us
            }
            _ => io / self.bandwidth + flops / (self.peak_flops * CUDA_CORE_SHARE) + t * TOKEN_STEP_US + self.launch_us,
        }
    }

    fn fused_flops(&self, f: &Fused, ins: &[&TensorType], out_n: f64) -> f64 {
        let d = |i: usize, a: usize| -> f64 {
            ins.get(i)
                .and_then(|t| t.shape.get(a))
                .map(|x| x.eval(&self.env).unwrap_or(1) as f64)
                .unwrap_or(1.0)
        };
        let n = |i: usize| ins.get(i).map(|t| self.numel(t)).unwrap_or(0.0);
        match f {
            Fused::RmsNorm { .. } | Fused::SwiGlu | Fused::Softmax => 6.0 * out_n,
            // per channel: square and sum, times 1/rms and the weight, sigmoid (8, as the unary
            // op), times the gate
            Fused::GroupNormGate { .. } => 13.0 * out_n,
            Fused::AddRmsNorm { .. } => 7.0 * n(0),
            // the norm of A's rows, then the GEMM
            Fused::NormMatmul { .. } => 6.0 * n(0) + 2.0 * out_n * d(0, ins.first().map_or(1, |t| t.rank()) - 1),
            Fused::QkNormRope { .. } => 12.0 * out_n,
            // q [b, Hkv, G, s, d] against k [b, Hkv, n, d]: QKᵀ and PV
            Fused::FlashAttention { .. } => 4.0 * out_n * d(1, 2),
            // per token and head: the d×d state update and q·S (4d²)
            Fused::LinearAttnStep => 4.0 * n(1) * d(1, 3),
            // tokens padded to whole chunks; per token and head: the intra-chunk QKᵀ and PV
            // (4Cd), the inter-chunk Q·S and the state's KᵀV (4d²)
            Fused::LinearAttnChunk { chunk } => {
                let c = (*chunk).max(1) as f64;
                let padded = (d(1, 1) / c).ceil() * c;
                let per_token = n(1) / d(1, 1).max(1.0);
                padded * per_token * (4.0 * c + 4.0 * d(1, 3))
            }
            // the recurrence, then the group norm and gate on its o (as `GroupNormGate`)
            Fused::LinearAttnGate { chunk, .. } => {
                let scan = match chunk {
                    Some(c) => Fused::LinearAttnChunk { chunk: *c },
                    None => Fused::LinearAttnStep,
                };
                self.fused_flops(&scan, ins, 0.0) + 13.0 * n(1)
            }
            // and q's and k's norms and rotations first (as `QkNormRope`)
            Fused::LinearAttnQkGate { .. } => self.fused_flops(&Fused::LinearAttnStep, ins, 0.0) + 37.0 * n(1),
            // per token row: the bias add, group scores, group and expert top-k, normalisation
            Fused::RouteTopK { .. } => 8.0 * n(0),
            // tokens · K expert rows (the dense form does tokens · E)
            Fused::GroupedMatmul { epilogue } => match epilogue {
                // h [b,s,K,I] from x [b,s,D]: the gate and the up GEMM per (token, slot)
                GroupedEpilogue::SwiGlu => 4.0 * out_n * d(0, 2),
                // h [b,s,K,I] · W_down[e]ᵀ [I, D] per (token, slot), then the weighted sum
                GroupedEpilogue::WeightedCombine => 2.0 * n(0) * d(3, 1),
                // and hs [b,s,Is] · bs [Is, D]
                GroupedEpilogue::CombineShared => 2.0 * n(0) * d(3, 1) + 2.0 * n(4) * d(5, 1),
            },
            Fused::QuantizeFp8 { .. } | Fused::DequantizeFp8 { .. } => 2.0 * n(0),
            // FP8 MMA runs at twice the bf16 rate on Hopper: half the FLOP time of a matmul
            Fused::ScaledMatmulFp8 { .. } => out_n * d(0, ins.first().map(|t| t.rank()).unwrap_or(1) - 1),
            // the producer's arithmetic, then an amax per tile and one scale per element
            Fused::RmsNormQuantFp8 { .. } | Fused::SwiGluQuantFp8 => 8.0 * n(0),
            Fused::AddRmsNormQuantFp8 { .. } => 9.0 * n(0),
        }
    }

    /// Local cost of an e-node, from the types in the e-class analysis.
    pub fn enode_cost(&self, eg: &RlGraph, class: Id, node: &Rl) -> f64 {
        match node {
            Rl::Attr(_) | Rl::Proj(_) | Rl::Const(_) | Rl::Leaf(_) => 0.0,
            Rl::Concat(kids)
                if kids[..kids.len().saturating_sub(1)]
                    .iter()
                    .all(|&k| is_weight_class(eg, k)) =>
            {
                0.0
            }
            Rl::Scan(kids) => {
                let (Some(last), operands) = (kids.last(), &kids[..kids.len().saturating_sub(1)]) else {
                    return f64::INFINITY;
                };
                let Some(e) = eg[*last]
                    .data
                    .attr()
                    .and_then(Attr::as_usize)
                    .and_then(|i| eg.analysis.leaves.entries.get(i))
                else {
                    return f64::INFINITY;
                };
                let ins: Option<Vec<&TensorType>> = operands.iter().map(|&k| eg[k].data.ty()).collect();
                match ins {
                    Some(ins) => self.op_cost(&e.op, &ins, &e.tys),
                    None => f64::INFINITY,
                }
            }
            _ => {
                let kids: Vec<&Data> = node.children().iter().map(|&k| &eg[k].data).collect();
                let Ok((op, operands)) = to_op(node, &kids) else {
                    return f64::INFINITY;
                };
                let ins: Option<Vec<&TensorType>> = operands.iter().map(|d| d.ty()).collect();
                let outs = eg[class].data.tys();
                match (ins, outs) {
                    (Some(ins), Some(outs)) => self.op_cost(&op, &ins, outs),
                    _ => f64::INFINITY,
                }
            }
        }
    }

    /// Cost of a whole graph: every live node once (µs).
    pub fn graph_cost(&self, g: &Graph) -> f64 {
        g.g.node_indices()
            .map(|n| {
                let node = g.node(n);
                if matches!(node.op, Op::Concat { .. }) && g.operands(n).iter().all(|v| is_weight_value(g, v.node)) {
                    return 0.0;
                }
                let ins: Vec<&TensorType> = g.operands(n).iter().map(|v| g.ty(*v)).collect();
                self.op_cost(&node.op, &ins, &node.outputs)
            })
            .sum()
    }
}

/// A checkpoint weight, or a view of one (`permute`, `reshape`, `expand`): its value is the same at every
/// step. A concatenation of such values ([`CostModel::enode_cost`]) is packed once when the
/// weights load, or read through the consuming GEMM's operand prologue, which picks the source
/// buffer by column: no launch and no traffic beyond the GEMM's own read of the weights.
fn is_weight_class(eg: &RlGraph, id: Id) -> bool {
    fn go(eg: &RlGraph, id: Id, depth: usize) -> bool {
        depth < 4
            && eg[id].nodes.iter().any(|n| match n {
                Rl::Leaf([i]) => eg[*i]
                    .data
                    .attr()
                    .and_then(Attr::as_usize)
                    .and_then(|k| eg.analysis.leaves.entries.get(k))
                    .is_some_and(|e| matches!(e.op, Op::Param { .. })),
                Rl::Permute([x, _]) | Rl::Reshape([x, _]) | Rl::Expand([x, _]) => go(eg, *x, depth + 1),
                _ => false,
            })
    }
    go(eg, id, 0)
}

/// [`is_weight_class`] on a graph.
fn is_weight_value(g: &Graph, n: petgraph::stable_graph::NodeIndex) -> bool {
    match &g.node(n).op {
        Op::Param { .. } => true,
        Op::Permute { .. } | Op::Reshape { .. } | Op::Expand { .. } => {
            g.operands(n).first().is_some_and(|v| is_weight_value(g, v.node))
        }
        _ => false,
    }
}

/// What extraction chose and what it costs.
#[derive(Clone, Debug)]
pub struct Extraction {
    pub choice: Choice,
    /// DAG cost of the selection (µs)
    pub cost: f64,
    /// accepted local-search switches
    pub improvements: usize,
}

/// Dense indexing of the e-graph for extraction.
struct Table {
    ids: Vec<Id>,
    index: HashMap<Id, usize>,
    /// per class: its e-nodes, with tensor-children class indices and local cost
    nodes: Vec<Vec<Cand>>,
    is_attr: Vec<bool>,
}

struct Cand {
    node: Rl,
    kids: Vec<usize>,
    local: f64,
    /// for `(proj t i)`: the tuple class
    proj_of: Option<usize>,
}

impl Table {
    fn new(eg: &RlGraph, model: &CostModel) -> Table {
        // ascending ids: an e-node's children were added before it, so this order is nearly
        // topological and the greedy fixpoint converges in a few sweeps
        let mut ids: Vec<Id> = eg.classes().map(|c| c.id).collect();
        ids.sort();
        let index: HashMap<Id, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let is_attr: Vec<bool> = ids.iter().map(|&id| matches!(eg[id].data, Data::Attr(_))).collect();
        let nodes = ids
            .iter()
            .map(|&id| {
                eg[id]
                    .nodes
                    .iter()
                    .map(|n| {
                        let kids: Vec<usize> = n
                            .children()
                            .iter()
                            .map(|&k| index[&eg.find(k)])
                            .filter(|&k| !is_attr[k])
                            .collect();
                        let valid = !matches!(eg[id].data, Data::Invalid(_));
                        Cand {
                            local: if valid {
                                model.enode_cost(eg, id, n)
                            } else {
                                f64::INFINITY
                            },
                            proj_of: match n {
                                Rl::Proj([t, _]) => Some(index[&eg.find(*t)]),
                                _ => None,
                            },
                            kids,
                            node: n.clone(),
                        }
                    })
                    .collect()
            })
            .collect();
        Table {
            ids,
            index,
            nodes,
            is_attr,
        }
    }

    /// DAG cost of `sel` from `roots`: each reached class once; infinite when cyclic or when
    /// a reached class has no finite choice.
    fn dag_cost(&self, sel: &[usize], roots: &[usize]) -> f64 {
        // 0 = unseen, 1 = on the DFS path, 2 = done
        let mut state = vec![0u8; self.ids.len()];
        let mut total = 0.0;
        let mut stack: Vec<(usize, usize)> = Vec::new();
        for &r in roots {
            if state[r] != 0 {
                continue;
            }
            state[r] = 1;
            stack.push((r, 0));
            while let Some(&mut (c, ref mut next)) = stack.last_mut() {
                let cand = match self.nodes[c].get(sel[c]) {
                    Some(x) => x,
                    None => return f64::INFINITY,
                };
                if *next < cand.kids.len() {
                    let k = cand.kids[*next];
                    *next += 1;
                    match state[k] {
                        0 => {
                            state[k] = 1;
                            stack.push((k, 0));
                        }
                        1 => return f64::INFINITY,
                        _ => {}
                    }
                } else {
                    total += cand.local;
                    state[c] = 2;
                    stack.pop();
                }
            }
        }
        total
    }
}

/// Extracts the cheapest graph the e-graph holds for `roots` under `model`.
///
/// `seed`, when given, is a known-good selection (the input graph's, see
/// [`crate::egraph::Bridge::original_choice`]): the search starts from it when the greedy choice
/// is worse or cyclic, so extraction never does worse than the input.
pub fn extract(eg: &RlGraph, roots: &[Id], model: &CostModel, seed: Option<&Choice>) -> Extraction {
    let t = Table::new(eg, model);
    let n = t.ids.len();
    let roots: Vec<usize> = roots.iter().map(|r| t.index[&eg.find(*r)]).collect();

    // users of each class (for amortising shared children in the greedy pass)
    let mut users = vec![0usize; n];
    for cands in &t.nodes {
        for c in cands {
            for &k in &c.kids {
                users[k] += 1;
            }
        }
    }
    // greedy bottom-up, amortised: cost(c) = min over nodes of local + Σ cost(kid) / users(kid)
    let mut cost = vec![f64::INFINITY; n];
    let mut sel = vec![usize::MAX; n];
    for (c, is_attr) in t.is_attr.iter().enumerate() {
        if *is_attr {
            cost[c] = 0.0;
            sel[c] = 0;
        }
    }
    for _ in 0..1000 {
        let mut changed = false;
        for c in 0..n {
            if t.is_attr[c] {
                continue;
            }
            for (i, cand) in t.nodes[c].iter().enumerate() {
                let mut v = cand.local;
                for &k in &cand.kids {
                    v += cost[k] / users[k].max(1) as f64;
                }
                if v < cost[c] - 1e-12 * cost[c].abs().max(1.0) || (sel[c] == usize::MAX && v.is_finite()) {
                    cost[c] = v;
                    sel[c] = i;
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut best = t.dag_cost(&sel, &roots);
    // Start from the seed (the input graph's own nodes) where it is cheaper, or where the
    // greedy choice is cyclic (zero-cost views can tie); the seed is acyclic by construction.
    if let Some(seed) = seed {
        let mut seeded = sel.clone();
        for (id, node) in seed {
            if let Some(&c) = t.index.get(&eg.find(*id)) {
                if let Some(i) = t.nodes[c].iter().position(|x| &x.node == node) {
                    seeded[c] = i;
                }
            }
        }
        let v = t.dag_cost(&seeded, &roots);
        if v <= best {
            best = v;
            sel = seeded;
        }
    }

    // tuple class -> (class, node index) pairs that project from it
    let mut projections: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
    for (c, cands) in t.nodes.iter().enumerate() {
        for (i, cand) in cands.iter().enumerate() {
            if let Some(tup) = cand.proj_of {
                projections.entry(tup).or_default().push((c, i));
            }
        }
    }
    // source class -> (class, node index) pairs that slice it: the parts of one wide value (two
    // GEMMs of one input computed as one, `fuse-concat-gemms-*`) pay off only when every part
    // switches to it together, as the outputs of a tuple do
    let mut slices: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
    for (c, cands) in t.nodes.iter().enumerate() {
        for (i, cand) in cands.iter().enumerate() {
            if let (Rl::Slice(_), Some(&src)) = (&cand.node, cand.kids.first()) {
                slices.entry(src).or_default().push((c, i));
            }
        }
    }
    let candidates: Vec<usize> = (0..n).filter(|&c| t.nodes[c].len() > 1 && !t.is_attr[c]).collect();
    let mut improvements = 0;
    for _ in 0..6 {
        let mut improved = false;
        for &c in &candidates {
            for i in 0..t.nodes[c].len() {
                if i == sel[c] || !t.nodes[c][i].local.is_finite() {
                    continue;
                }
                let mut trial = sel.clone();
                trial[c] = i;
                if let Some(tup) = t.nodes[c][i].proj_of {
                    for &(c2, i2) in projections.get(&tup).map(|v| v.as_slice()).unwrap_or(&[]) {
                        trial[c2] = i2;
                    }
                }
                if let (Rl::Slice(_), Some(src)) = (&t.nodes[c][i].node, t.nodes[c][i].kids.first()) {
                    for &(c2, i2) in slices.get(src).map(|v| v.as_slice()).unwrap_or(&[]) {
                        if t.nodes[c2].len() > 1 {
                            trial[c2] = i2;
                        }
                    }
                }
                let v = t.dag_cost(&trial, &roots);
                if v < best - 1e-9 * best.abs().max(1.0) {
                    best = v;
                    sel = trial;
                    improved = true;
                    improvements += 1;
                }
            }
        }
        if !improved {
            break;
        }
    }
    let choice: Choice = (0..n)
        .filter(|&c| !t.is_attr[c] && sel[c] != usize::MAX)
        .map(|c| (t.ids[c], t.nodes[c][sel[c]].node.clone()))
        .collect();
    Extraction {
        choice,
        cost: best,
        improvements,
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::dsl;
    use crate::{compile, CompileOptions};

    #[test]
    fn a_shared_value_is_paid_once_and_read_from_the_fused_node() {
        // the residual `r` is used by the norm and by the next residual add: after fusion both
        // read the add_rms_norm node (port 0 and port 1); keeping the separate add would pay
        // for r twice, which a tree-cost extractor cannot see
        let g = dsl(
            "dim b, s; input h: f32[b, s, 8]; input a: f32[b, s, 8]; param w: f32[8] = \"w\";
            let r = h + a;
            let y = r * rsqrt(sum(r * r, axis = -1, keepdim = true) / 8.0 + 1e-6) * w;
            output \"out\" = r + y;",
        );
        let (c, report) = compile(&g, &CompileOptions::default()).unwrap();
        let ops: Vec<String> = c.g.node_weights().map(|n| n.op.name()).collect();
        assert_eq!(
            ops.iter().filter(|o| *o == "add_rms_norm").count(),
            1,
            "{}",
            c.to_text()
        );
        assert_eq!(
            ops.iter().filter(|o| *o == "add").count(),
            1,
            "only the final add: {}",
            c.to_text()
        );
        let e = report.egraph.unwrap();
        assert!(e.cost_after_us < e.cost_before_us);
    }

    #[test]
    fn without_rules_the_extraction_costs_what_the_input_costs() {
        let g = dsl("dim b; input x: f32[b, 8]; param w: f32[8, 8] = \"w\"; output \"y\" = tanh(x @ w) * (x @ w);");
        let (eg, bridge) = crate::egraph::to_egraph(&g).unwrap();
        let model = crate::CostModel::prefill();
        let seed = bridge.original_choice(&eg);
        let ex = super::extract(&eg, &bridge.roots(&eg), &model, Some(&seed));
        // `x @ w` appears twice in the source but is one e-class: computed (and paid) once
        let c = crate::egraph::to_graph(&eg, &bridge, &ex.choice).unwrap();
        assert_eq!(c.g.node_weights().filter(|n| n.op.name() == "matmul").count(), 1);
        assert!((ex.cost - model.graph_cost(&c)).abs() < 1e-9);
        assert!(ex.cost < model.graph_cost(&g));
    }
}
