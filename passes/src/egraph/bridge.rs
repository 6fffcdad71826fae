//! Graph IR ⇄ e-graph.
//!
//! [`to_egraph`] adds every node of a graph (in topological order) as an e-node; a value
//! `Value{node, port}` of a multi-output node is `(proj class port)`. [`to_graph`] rebuilds a
//! graph from one chosen e-node per e-class (the extractor's selection), keeping the DSL
//! location and `let` label of the original node of each e-class, and the graph inputs in
//! their original order.

use super::analysis::{Data, LeafEntry, RlGraph, TypeAnalysis};
use super::lang::{Attr, Rl, F64};
use egg::{Id, Language};
use ir::fused::{Fused, GroupedEpilogue};
use ir::graph::{Graph, SrcLoc, TensorType, Value};
use ir::op::{BinaryOp, InputKind, Op, ReduceOp, UnaryOp};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;

/// Where a value came from in the DSL: its location and `let` name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Provenance {
    pub loc: Option<SrcLoc>,
    pub label: Option<String>,
}

/// What the reconstruction needs besides the e-graph: the graph's outputs and inputs as
/// e-classes, and the provenance of the original e-classes.
#[derive(Clone, Debug, Default)]
pub struct Bridge {
    /// (name, e-class, kind) of each graph output, in order.
    pub outputs: Vec<(String, Id, InputKind)>,
    /// The side-table index of each graph input, in declaration order.
    pub inputs: Vec<usize>,
    /// e-class (as added) -> where its first original node came from
    pub provenance: Vec<(Id, Provenance)>,
    /// every e-node the input graph contributed (projections included), with its e-class:
    /// the selection that rebuilds the input, always acyclic
    pub original: Vec<(Id, Rl)>,
}

impl Bridge {
    /// The e-classes every extraction must compute: the outputs (inputs are leaves).
    pub fn roots(&self, egraph: &RlGraph) -> Vec<Id> {
        self.outputs.iter().map(|(_, id, _)| egraph.find(*id)).collect()
    }

    /// The selection that rebuilds the input graph (canonical ids, after any saturation).
    pub fn original_choice(&self, egraph: &RlGraph) -> Choice {
        let mut c = Choice::new();
        for (id, node) in &self.original {
            let node = node.clone().map_children(|k| egraph.find(k));
            c.entry(egraph.find(*id)).or_insert(node);
        }
        c
    }
}

/// Adds `g` to a fresh e-graph. Errors only on a malformed graph (a node the language cannot
/// express), naming the node.
pub fn to_egraph(g: &Graph) -> Result<(RlGraph, Bridge), String> {
    let mut eg = RlGraph::new(TypeAnalysis::default());
    let mut bridge = Bridge::default();
    let mut class_of: HashMap<NodeIndex, Id> = HashMap::new();
    let mut leaf_of: HashMap<NodeIndex, usize> = HashMap::new();
    for n in g.topo_order() {
        let node = g.node(n);
        let operands: Vec<Id> = g
            .operands(n)
            .iter()
            .map(|v| value_class(&mut eg, &mut bridge, g, &class_of, *v))
            .collect::<Result<_, _>>()?;
        let side = |eg: &mut RlGraph, leaf_of: &mut HashMap<NodeIndex, usize>| {
            let idx = eg.analysis.leaves.entries.len();
            eg.analysis.leaves.entries.push(LeafEntry {
                op: node.op.clone(),
                tys: node.outputs.clone(),
                loc: node.loc.clone(),
                label: node.label.clone(),
            });
            leaf_of.insert(n, idx);
            idx
        };
        let enode = match &node.op {
            Op::Input { .. } | Op::Param { .. } | Op::Literal { .. } | Op::Iota { .. } | Op::DimValue { .. } => {
                let idx = side(&mut eg, &mut leaf_of);
                let a = attr(&mut eg, Attr::Int(idx as i64));
                Rl::Leaf([a])
            }
            Op::Scan { .. } => {
                let idx = side(&mut eg, &mut leaf_of);
                let mut kids = operands.clone();
                kids.push(attr(&mut eg, Attr::Int(idx as i64)));
                Rl::Scan(kids)
            }
            op => op_to_enode(&mut eg, op, &operands).map_err(|m| format!("%{} ({}): {m}", n.index(), op.name()))?,
        };
        let id = eg.add(enode.clone());
        bridge.original.push((id, enode));
        if let Data::Invalid(m) = &eg[id].data {
            return Err(format!(
                "%{} ({}): the e-graph does not type it: {m}",
                n.index(),
                node.op.name()
            ));
        }
        if eg[id].data.tys() != Some(&node.outputs[..]) {
            return Err(format!(
                "%{} ({}): e-graph type {:?} differs from the node's",
                n.index(),
                node.op.name(),
                eg[id].data.tys()
            ));
        }
        class_of.insert(n, id);
        bridge.provenance.push((
            id,
            Provenance {
                loc: node.loc.clone(),
                label: node.label.clone(),
            },
        ));
    }
    for &i in &g.inputs {
        let idx = *leaf_of.get(&i).ok_or("a graph input is not in the graph")?;
        bridge.inputs.push(idx);
    }
    for o in &g.outputs {
        let id = value_class(&mut eg, &mut bridge, g, &class_of, o.value)?;
        bridge.outputs.push((o.name.clone(), id, o.kind));
    }
    eg.rebuild();
    Ok((eg, bridge))
}

fn value_class(
    eg: &mut RlGraph,
    bridge: &mut Bridge,
    g: &Graph,
    class_of: &HashMap<NodeIndex, Id>,
    v: Value,
) -> Result<Id, String> {
    let c = *class_of
        .get(&v.node)
        .ok_or_else(|| format!("%{} is used before it is defined", v.node.index()))?;
    if g.node(v.node).outputs.len() == 1 {
        Ok(c)
    } else {
        let p = attr(eg, Attr::Int(i64::from(v.port)));
        let node = Rl::Proj([c, p]);
        let id = eg.add(node.clone());
        bridge.original.push((id, node));
        Ok(id)
    }
}

pub fn attr(eg: &mut RlGraph, a: Attr) -> Id {
    eg.add(Rl::Attr(a))
}

/// The e-node of a non-leaf op over operand classes `x` (attributes added as leaves).
pub fn op_to_enode(eg: &mut RlGraph, op: &Op, x: &[Id]) -> Result<Rl, String> {
    let arity = |n: usize| -> Result<(), String> {
        if x.len() == n {
            Ok(())
        } else {
            Err(format!("takes {n} operands, got {}", x.len()))
        }
    };
    let mut a = |v: Attr| attr(eg, v);
    Ok(match op {
        Op::Const { value, dtype } => Rl::Const([a(Attr::Float(F64(*value))), a(Attr::DType(*dtype))]),
        Op::Unary(u) => {
            arity(1)?;
            let k = [x[0]];
            match u {
                UnaryOp::Neg => Rl::Neg(k),
                UnaryOp::Exp => Rl::Exp(k),
                UnaryOp::Log => Rl::Log(k),
                UnaryOp::Sqrt => Rl::Sqrt(k),
                UnaryOp::Rsqrt => Rl::Rsqrt(k),
                UnaryOp::Recip => Rl::Recip(k),
                UnaryOp::Sigmoid => Rl::Sigmoid(k),
                UnaryOp::Tanh => Rl::Tanh(k),
                UnaryOp::Sin => Rl::Sin(k),
                UnaryOp::Cos => Rl::Cos(k),
                UnaryOp::Abs => Rl::Abs(k),
                UnaryOp::Not => Rl::Not(k),
            }
        }
        Op::Binary(b) => {
            arity(2)?;
            let k = [x[0], x[1]];
            match b {
                BinaryOp::Add => Rl::Add(k),
                BinaryOp::Sub => Rl::Sub(k),
                BinaryOp::Mul => Rl::Mul(k),
                BinaryOp::Div => Rl::Div(k),
                BinaryOp::Max => Rl::Max(k),
                BinaryOp::Min => Rl::Min(k),
                BinaryOp::Pow => Rl::Pow(k),
                BinaryOp::Mod => Rl::Mod(k),
                BinaryOp::Lt => Rl::Lt(k),
                BinaryOp::Le => Rl::Le(k),
                BinaryOp::Gt => Rl::Gt(k),
                BinaryOp::Ge => Rl::Ge(k),
                BinaryOp::Eq => Rl::Eq(k),
                BinaryOp::Ne => Rl::Ne(k),
                BinaryOp::And => Rl::And(k),
                BinaryOp::Or => Rl::Or(k),
            }
        }
        Op::Where => {
            arity(3)?;
            Rl::Where([x[0], x[1], x[2]])
        }
        Op::Reduce { op, axes, keepdim } => {
            arity(1)?;
            let k = [x[0], a(Attr::list(axes.iter().copied())), a(Attr::Bool(*keepdim))];
            match op {
                ReduceOp::Sum => Rl::Sum(k),
                ReduceOp::Max => Rl::Amax(k),
            }
        }
        Op::Reshape { shape } => {
            arity(1)?;
            Rl::Reshape([x[0], a(Attr::List(shape.clone()))])
        }
        Op::Permute { perm } => {
            arity(1)?;
            Rl::Permute([x[0], a(Attr::list(perm.iter().copied()))])
        }
        Op::Expand { shape } => {
            arity(1)?;
            Rl::Expand([x[0], a(Attr::List(shape.clone()))])
        }
        Op::Slice { axis, start, end } => {
            arity(1)?;
            Rl::Slice([x[0], a(Attr::Int(*axis as i64)), a(Attr::dim(start)), a(Attr::dim(end))])
        }
        Op::Concat { axis } => {
            let mut k = x.to_vec();
            k.push(a(Attr::Int(*axis as i64)));
            Rl::Concat(k)
        }
        Op::IndexSelect { axis } => {
            arity(2)?;
            Rl::Take([x[0], x[1], a(Attr::Int(*axis as i64))])
        }
        Op::GatherAlong { axis } => {
            arity(2)?;
            Rl::Gather([x[0], x[1], a(Attr::Int(*axis as i64))])
        }
        Op::ScatterAddAlong { axis } => {
            arity(3)?;
            Rl::ScatterAdd([x[0], x[1], x[2], a(Attr::Int(*axis as i64))])
        }
        Op::TopK { k, axis } => {
            arity(1)?;
            Rl::TopK([x[0], a(Attr::Int(*k as i64)), a(Attr::Int(*axis as i64))])
        }
        Op::ArgMax { axis } => {
            arity(1)?;
            Rl::ArgMax([x[0], a(Attr::Int(*axis as i64))])
        }
        Op::Matmul => {
            arity(2)?;
            Rl::Matmul([x[0], x[1]])
        }
        Op::Cast { to } => {
            arity(1)?;
            Rl::Cast([x[0], a(Attr::DType(*to))])
        }
        Op::Fused(f) => fused_to_enode(f, x, &mut a)?,
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Literal { .. }
        | Op::Iota { .. }
        | Op::DimValue { .. }
        | Op::Scan { .. } => return Err("internal: leaves are side-table entries".into()),
    })
}

fn fused_to_enode(f: &Fused, x: &[Id], a: &mut impl FnMut(Attr) -> Id) -> Result<Rl, String> {
    let n = |k: usize| -> Result<(), String> {
        if x.len() == k {
            Ok(())
        } else {
            Err(format!("{} takes {k} operands, got {}", f.name(), x.len()))
        }
    };
    let fl = |v: f64| Attr::Float(F64(v));
    let int = |v: usize| Attr::Int(v as i64);
    Ok(match f {
        Fused::NormMatmul { eps, emit_norm } => {
            n(3)?;
            Rl::NormMatmul([x[0], x[1], x[2], a(fl(*eps)), a(Attr::Bool(*emit_norm))])
        }
        Fused::RmsNorm { eps } => {
            n(2)?;
            Rl::RmsNorm([x[0], x[1], a(fl(*eps))])
        }
        Fused::AddRmsNorm { eps } => {
            n(3)?;
            Rl::AddRmsNorm([x[0], x[1], x[2], a(fl(*eps))])
        }
        Fused::SwiGlu => {
            n(2)?;
            Rl::SwiGlu([x[0], x[1]])
        }
        Fused::Softmax => {
            n(1)?;
            Rl::Softmax([x[0]])
        }
        Fused::QkNormRope { eps, rotary } => {
            n(4)?;
            Rl::QkNormRope([x[0], x[1], x[2], x[3], a(fl(*eps)), a(int(*rotary))])
        }
        Fused::FlashAttention { scale } => {
            n(4)?;
            Rl::FlashAttention([x[0], x[1], x[2], x[3], a(fl(*scale))])
        }
        Fused::LinearAttnChunk { chunk } => {
            n(5)?;
            Rl::LinearAttnChunk([x[0], x[1], x[2], x[3], x[4], a(int(*chunk))])
        }
        Fused::LinearAttnStep => {
            n(5)?;
            Rl::LinearAttnStep([x[0], x[1], x[2], x[3], x[4]])
        }
        Fused::GroupNormGate { groups, eps } => {
            n(3)?;
            Rl::GroupNormGate([x[0], x[1], x[2], a(int(*groups)), a(fl(*eps))])
        }
        Fused::LinearAttnGate {
            chunk: Some(chunk),
            groups,
            eps,
        } => {
            n(7)?;
            Rl::LinearAttnChunkGate([
                x[0],
                x[1],
                x[2],
                x[3],
                x[4],
                x[5],
                x[6],
                a(int(*chunk)),
                a(int(*groups)),
                a(fl(*eps)),
            ])
        }
        Fused::LinearAttnGate {
            chunk: None,
            groups,
            eps,
        } => {
            n(7)?;
            Rl::LinearAttnStepGate([x[0], x[1], x[2], x[3], x[4], x[5], x[6], a(int(*groups)), a(fl(*eps))])
        }
        Fused::LinearAttnQkGate {
            groups,
            eps,
            qk_eps,
            rotary,
            scale,
        } => {
            n(11)?;
            let mut ch = [x[0]; 16];
            ch[..11].copy_from_slice(&x[..11]);
            ch[11] = a(int(*groups));
            ch[12] = a(fl(*eps));
            ch[13] = a(fl(*qk_eps));
            ch[14] = a(int(*rotary));
            ch[15] = a(fl(*scale));
            Rl::LinearAttnStepQkGate(ch)
        }
        Fused::RouteTopK {
            k,
            n_group,
            topk_group,
            scale,
            normalize,
            biased,
        } => {
            n(1 + usize::from(*biased))?;
            let mut kids = x.to_vec();
            kids.extend([
                a(int(*k)),
                a(int(*n_group)),
                a(int(*topk_group)),
                a(fl(*scale)),
                a(Attr::Bool(*normalize)),
                a(Attr::Bool(*biased)),
            ]);
            Rl::RouteTopK(kids)
        }
        Fused::GroupedMatmul { epilogue } => {
            n(epilogue.operands())?;
            match epilogue {
                GroupedEpilogue::SwiGlu => Rl::GroupedMatmulSwiGlu([x[0], x[1], x[2], x[3]]),
                GroupedEpilogue::WeightedCombine => Rl::GroupedMatmulCombine([x[0], x[1], x[2], x[3]]),
                GroupedEpilogue::CombineShared => Rl::GroupedMatmulCombineShared([x[0], x[1], x[2], x[3], x[4], x[5]]),
            }
        }
        Fused::QuantizeFp8 { rows, cols } => {
            n(1)?;
            Rl::QuantizeFp8([x[0], a(int(*rows)), a(int(*cols))])
        }
        Fused::DequantizeFp8 { rows, cols, to } => {
            n(2)?;
            Rl::DequantizeFp8([x[0], x[1], a(int(*rows)), a(int(*cols)), a(Attr::DType(*to))])
        }
        Fused::ScaledMatmulFp8 { out } => {
            n(4)?;
            Rl::ScaledMatmulFp8([x[0], x[1], x[2], x[3], a(Attr::DType(*out))])
        }
        Fused::RmsNormQuantFp8 { eps } => {
            n(2)?;
            Rl::RmsNormQuantFp8([x[0], x[1], a(fl(*eps))])
        }
        Fused::AddRmsNormQuantFp8 { eps } => {
            n(3)?;
            Rl::AddRmsNormQuantFp8([x[0], x[1], x[2], a(fl(*eps))])
        }
        Fused::SwiGluQuantFp8 => {
            n(2)?;
            Rl::SwiGluQuantFp8([x[0], x[1]])
        }
    })
}

/// One chosen e-node per (canonical) e-class; classes not needed may be absent.
pub type Choice = HashMap<Id, Rl>;

/// Rebuilds a graph from `choice`. Every graph input is kept (in order) even if unused.
/// The result is validated; errors name the e-class and node.
pub fn to_graph(eg: &RlGraph, bridge: &Bridge, choice: &Choice) -> Result<Graph, String> {
    let mut prov: HashMap<Id, Provenance> = HashMap::new();
    for (id, p) in &bridge.provenance {
        prov.entry(eg.find(*id)).or_insert_with(|| p.clone());
    }
    let mut g = Graph::new();
    let mut built: HashMap<Id, Vec<Value>> = HashMap::new();
    let mut leaf_built: HashMap<usize, Vec<Value>> = HashMap::new();
    let leaves = &eg.analysis.leaves.entries;
    // inputs first, in declaration order (scan bodies and state carries rely on it)
    for &idx in &bridge.inputs {
        let e = leaves.get(idx).ok_or("input leaf missing from the side table")?;
        let outs = g.add(e.op.clone(), &[], e.loc.clone()).map_err(|e| e.to_string())?;
        if let (Some(l), Some(v)) = (&e.label, outs.first()) {
            g.set_label(*v, l);
        }
        leaf_built.insert(idx, outs);
    }
    let mut inherited: HashMap<Id, Provenance> = HashMap::new();
    // iterative post-order over the chosen nodes (graphs are thousands of nodes deep)
    let mut stack: Vec<(Id, bool)> = bridge.roots(eg).into_iter().rev().map(|r| (r, false)).collect();
    let mut on_path: std::collections::HashSet<Id> = std::collections::HashSet::new();
    while let Some((c, expanded)) = stack.pop() {
        let c = eg.find(c);
        if built.contains_key(&c) {
            continue;
        }
        let node = choice
            .get(&c)
            .ok_or_else(|| format!("no e-node chosen for e-class {c}"))?;
        let tensor_kids: Vec<Id> = node
            .children()
            .iter()
            .map(|&k| eg.find(k))
            .filter(|&k| !matches!(eg[k].data, Data::Attr(_)))
            .collect();
        if !expanded {
            if !on_path.insert(c) {
                return Err(format!("the selection is cyclic at e-class {c}"));
            }
            stack.push((c, true));
            let p = prov.get(&c).or_else(|| inherited.get(&c)).cloned().unwrap_or_default();
            for &k in tensor_kids.iter().rev() {
                if !built.contains_key(&k) {
                    if on_path.contains(&k) {
                        return Err(format!("the selection is cyclic at e-class {k}"));
                    }
                    inherited.entry(k).or_insert_with(|| p.clone());
                    stack.push((k, false));
                }
            }
            continue;
        }
        on_path.remove(&c);
        let p = prov.get(&c).or_else(|| inherited.get(&c)).cloned().unwrap_or_default();
        let outs = build_node(eg, &mut g, node, &built, &mut leaf_built, &p)
            .map_err(|m| format!("e-class {c} (`{node}`): {m}"))?;
        built.insert(c, outs);
    }
    for (name, id, kind) in &bridge.outputs {
        let v = built
            .get(&eg.find(*id))
            .and_then(|v| (v.len() == 1).then_some(v[0]))
            .ok_or_else(|| format!("output `{name}` was not built as a single value"))?;
        g.add_output(name, v, *kind);
    }
    g.validate().map_err(|e| e.to_string())?;
    Ok(g)
}

fn build_node(
    eg: &RlGraph,
    g: &mut Graph,
    node: &Rl,
    built: &HashMap<Id, Vec<Value>>,
    leaf_built: &mut HashMap<usize, Vec<Value>>,
    p: &Provenance,
) -> Result<Vec<Value>, String> {
    let kid_data: Vec<&Data> = node.children().iter().map(|&k| &eg[k].data).collect();
    let value_of = |k: Id| -> Result<Value, String> {
        let v = built.get(&eg.find(k)).ok_or("operand not built")?;
        if v.len() == 1 {
            Ok(v[0])
        } else {
            Err("a tuple used as an operand (missing proj)".into())
        }
    };
    let side_index = |d: &Data| d.attr().and_then(Attr::as_usize).ok_or("bad side-table index");
    let add = |g: &mut Graph, op: Op, args: &[Value]| -> Result<Vec<Value>, String> {
        let outs = g.add(op, args, p.loc.clone()).map_err(|e| e.to_string())?;
        if let (Some(l), Some(v)) = (&p.label, outs.first()) {
            g.set_label(*v, l);
        }
        Ok(outs)
    };
    match node {
        Rl::Attr(_) => Err("internal: an attribute is not a value".into()),
        Rl::Proj([t, port]) => {
            let tuple = built.get(&eg.find(*t)).ok_or("tuple not built")?;
            let i = eg[*port].data.attr().and_then(Attr::as_usize).ok_or("bad proj port")?;
            let v = *tuple.get(i).ok_or("proj port out of range")?;
            Ok(vec![v])
        }
        Rl::Leaf([i]) => {
            let idx = side_index(&eg[*i].data)?;
            if let Some(v) = leaf_built.get(&idx) {
                return Ok(v.clone());
            }
            let e = eg.analysis.leaves.entries.get(idx).ok_or("leaf not in side table")?;
            let outs = g.add(e.op.clone(), &[], e.loc.clone()).map_err(|e| e.to_string())?;
            if let (Some(l), Some(v)) = (&e.label, outs.first()) {
                g.set_label(*v, l);
            }
            leaf_built.insert(idx, outs.clone());
            Ok(outs)
        }
        Rl::Scan(kids) => {
            let (last, operands) = kids.split_last().ok_or("scan without index")?;
            let idx = side_index(&eg[*last].data)?;
            let e = eg.analysis.leaves.entries.get(idx).ok_or("scan not in side table")?;
            let args = operands.iter().map(|&k| value_of(k)).collect::<Result<Vec<_>, _>>()?;
            add(g, e.op.clone(), &args)
        }
        Rl::Const([v, t]) => {
            let value = eg[*v].data.attr().and_then(Attr::as_f64).ok_or("bad const value")?;
            let dtype = eg[*t].data.attr().and_then(Attr::as_dtype).ok_or("bad const dtype")?;
            add(g, Op::Const { value, dtype }, &[])
        }
        _ => {
            let (op, _) = super::analysis::to_op(node, &kid_data)?;
            let args: Vec<Value> = node
                .children()
                .iter()
                .filter(|&&k| !matches!(eg[k].data, Data::Attr(_)))
                .map(|&k| value_of(k))
                .collect::<Result<_, _>>()?;
            add(g, op, &args)
        }
    }
}

/// The single type of a value class (for rules and costs).
pub fn class_ty(eg: &RlGraph, id: Id) -> Option<&TensorType> {
    eg[id].data.ty()
}
