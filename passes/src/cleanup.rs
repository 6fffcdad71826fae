//! The graph-level cleanup passes: validation (shape/dtype re-inference), dead-code
//! elimination, common-subexpression elimination and constant folding.
//!
//! They edit the graph in place, so node numbers survive from one pass to the next and the
//! `--dump` files of neighbouring passes diff cleanly. DCE and CSE recurse into scan bodies
//! (keeping a body's inputs: they are its positional interface).

use crate::PassError;
use ir::graph::{Graph, Operand, Value};
use ir::interp::{Interpreter, ParamSource};
use ir::op::Op;
use ir::{ParamSpec, Tensor};
use petgraph::stable_graph::NodeIndex;
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Re-infers every node's types (and the scan bodies'): `Graph::validate` as a pass.
pub fn validate(g: Graph) -> Result<Graph, PassError> {
    g.validate().map_err(|e| PassError::ir("validate", e))?;
    Ok(g)
}

/// Removes every node no graph output needs. Inputs stay (a caller binds all of them).
pub fn dce(mut g: Graph) -> Result<Graph, PassError> {
    dce_in_place(&mut g);
    Ok(g)
}

fn dce_in_place(g: &mut Graph) -> usize {
    let mut live: HashSet<NodeIndex> = g.inputs.iter().copied().collect();
    let mut stack: Vec<NodeIndex> = g.outputs.iter().map(|o| o.value.node).collect();
    stack.extend(g.inputs.iter().copied());
    while let Some(n) = stack.pop() {
        if !g.g.contains_node(n) {
            continue;
        }
        live.insert(n);
        for e in g.g.edges_directed(n, Direction::Incoming) {
            if !live.contains(&e.source()) {
                stack.push(e.source());
            }
        }
    }
    let dead: Vec<NodeIndex> = g.g.node_indices().filter(|n| !live.contains(n)).collect();
    for &n in &dead {
        g.g.remove_node(n);
    }
    let mut removed = dead.len();
    for n in g.g.node_indices().collect::<Vec<_>>() {
        if let Op::Scan { body, .. } = &mut g.g[n].op {
            removed += dce_in_place(body);
        }
    }
    removed
}

/// A key equal for nodes that compute the same value from the same operands.
fn cse_key(g: &Graph, n: NodeIndex) -> Option<String> {
    let node = g.node(n);
    let op = match &node.op {
        // two inputs are never the same value, whatever they look like
        Op::Input { .. } => return None,
        Op::Scan {
            body,
            axis,
            n_carry,
            n_seq,
        } => format!("scan {axis} {n_carry} {n_seq}\n{}", structure(body)),
        op => format!("{op:?}"),
    };
    let types: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
    let args: Vec<String> = g
        .operands(n)
        .iter()
        .map(|v| format!("{}.{}", v.node.index(), v.port))
        .collect();
    Some(format!("{op} : {} <- {}", types.join(","), args.join(",")))
}

/// A scan body's text without DSL locations and labels (two bodies written on different lines
/// compute the same thing).
fn structure(body: &Graph) -> String {
    fn strip(g: &mut Graph) {
        for n in g.g.node_indices().collect::<Vec<_>>() {
            let node = &mut g.g[n];
            node.loc = None;
            node.label = None;
            if let Op::Scan { body, .. } = &mut node.op {
                strip(body);
            }
        }
    }
    let mut b = body.clone();
    strip(&mut b);
    b.to_text()
}

/// Merges nodes with equal ops (attributes, constants and scan bodies compared structurally)
/// and equal operands; the first in topological order stays.
pub fn cse(mut g: Graph) -> Result<Graph, PassError> {
    cse_in_place(&mut g);
    Ok(g)
}

fn cse_in_place(g: &mut Graph) -> usize {
    for n in g.g.node_indices().collect::<Vec<_>>() {
        if let Op::Scan { body, .. } = &mut g.g[n].op {
            cse_in_place(body);
        }
    }
    let mut seen: HashMap<String, NodeIndex> = HashMap::new();
    let mut merged = 0;
    for n in g.topo_order() {
        let Some(key) = cse_key(g, n) else { continue };
        match seen.get(&key) {
            None => {
                seen.insert(key, n);
            }
            Some(&rep) => {
                replace_uses(g, n, rep);
                g.g.remove_node(n);
                merged += 1;
            }
        }
    }
    merged
}

/// Points every use of `old`'s outputs (edges and graph outputs) at the same port of `new`.
fn replace_uses(g: &mut Graph, old: NodeIndex, new: NodeIndex) {
    let uses: Vec<(NodeIndex, Operand)> =
        g.g.edges_directed(old, Direction::Outgoing)
            .map(|e| (e.target(), *e.weight()))
            .collect();
    for (user, w) in uses {
        g.g.add_edge(new, user, w);
    }
    let old_edges: Vec<_> = g.g.edges_directed(old, Direction::Outgoing).map(|e| e.id()).collect();
    for e in old_edges {
        g.g.remove_edge(e);
    }
    for o in &mut g.outputs {
        if o.value.node == old {
            o.value = Value {
                node: new,
                port: o.value.port,
            };
        }
    }
}

/// Literals larger than this are not made (an `expand` of a constant stays an `expand`).
pub const FOLD_MAX_ELEMENTS: usize = 1 << 16;

struct NoParams;

impl ParamSource for NoParams {
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
        Err(format!("constant folding reached parameter `{}`", spec.name))
    }
}

/// Whether a node computes a compile-time constant: it has no input, parameter, symbolic
/// dimension or scan among its transitive operands.
fn is_constant_leaf(op: &Op) -> Option<bool> {
    match op {
        Op::Const { .. } | Op::Literal { .. } => Some(true),
        Op::Iota { len, .. } => Some(len.as_const().is_some()),
        Op::DimValue { dim } => Some(dim.as_const().is_some()),
        Op::Input { .. } | Op::Param { .. } | Op::Scan { .. } => Some(false),
        // composite ops get folded only once their reference semantics exist everywhere; they
        // appear after fusion, when there is nothing left to fold
        Op::Fused(_) => Some(false),
        _ => None,
    }
}

/// Evaluates every maximal constant subgraph (e.g. RoPE's inverse frequencies and the decay λ,
/// computed from config values) with the interpreter and replaces its root by an
/// `Op::Literal`, or by an `Op::Const` when the value is a scalar. Roots that are already
/// leaves (a lone `iota`, a `const`) and values above [`FOLD_MAX_ELEMENTS`] stay as they are.
/// The folded subgraph's other nodes become dead (the DCE pass removes them).
pub fn const_fold(mut g: Graph) -> Result<Graph, PassError> {
    let order = g.topo_order();
    let mut constant: HashSet<NodeIndex> = HashSet::new();
    for &n in &order {
        let node = g.node(n);
        let c = match is_constant_leaf(&node.op) {
            Some(c) => c,
            None => {
                let ops = g.operands(n);
                !ops.is_empty() && ops.iter().all(|v| constant.contains(&v.node))
            }
        };
        if c {
            constant.insert(n);
        }
    }
    let output_nodes: HashSet<NodeIndex> = g.outputs.iter().map(|o| o.value.node).collect();
    let maximal: Vec<NodeIndex> = order
        .iter()
        .copied()
        .filter(|n| constant.contains(n))
        .filter(|&n| {
            output_nodes.contains(&n)
                || g.g
                    .edges_directed(n, Direction::Outgoing)
                    .any(|e| !constant.contains(&e.target()))
        })
        .collect();
    // A view of a constant stays a view of the literal: `reshape(inv_freq, [1, h])` folds to
    // `reshape(literal [h])`, the form the RoPE rule (and a kernel's index math) reads.
    let mut roots: Vec<NodeIndex> = Vec::new();
    for mut n in maximal {
        while matches!(
            g.node(n).op,
            Op::Reshape { .. } | Op::Expand { .. } | Op::Permute { .. }
        ) {
            n = g.operands(n)[0].node;
        }
        if is_constant_leaf(&g.node(n).op).is_none() && g.node(n).outputs.len() == 1 && !roots.contains(&n) {
            roots.push(n);
        }
    }
    for n in roots {
        let ty = g.node(n).outputs[0].clone();
        let small = ty
            .shape
            .iter()
            .try_fold(1usize, |acc, d| {
                d.as_const()
                    .and_then(|c| usize::try_from(c).ok())
                    .and_then(|c| acc.checked_mul(c))
            })
            .is_some_and(|numel| numel <= FOLD_MAX_ELEMENTS);
        if !small {
            continue;
        }
        let value = eval_constant(&g, n).map_err(|msg| PassError {
            pass: "const-fold".into(),
            node: Some(format!("%{} ({})", n.index(), g.node(n).op.name())),
            loc: g.node(n).loc.clone(),
            msg,
        })?;
        let op = if value.shape.is_empty() {
            Op::Const {
                value: value.to_f64_vec()[0],
                dtype: value.dtype,
            }
        } else {
            Op::Literal { value: Arc::new(value) }
        };
        let incoming: Vec<_> = g.g.edges_directed(n, Direction::Incoming).map(|e| e.id()).collect();
        for e in incoming {
            g.g.remove_edge(e);
        }
        g.g[n].op = op;
    }
    Ok(g)
}

/// The value of constant node `n`, by the interpreter on the subgraph it depends on.
fn eval_constant(g: &Graph, n: NodeIndex) -> Result<Tensor, String> {
    let mut sub = Graph::new();
    let mut map: HashMap<NodeIndex, Vec<Value>> = HashMap::new();
    // the cone of n, in topological order
    let mut cone: HashSet<NodeIndex> = HashSet::new();
    let mut stack = vec![n];
    while let Some(m) = stack.pop() {
        if cone.insert(m) {
            stack.extend(g.operands(m).iter().map(|v| v.node));
        }
    }
    for m in g.topo_order().into_iter().filter(|m| cone.contains(m)) {
        let args: Vec<Value> = g.operands(m).iter().map(|v| map[&v.node][v.port as usize]).collect();
        let outs = sub
            .add(g.node(m).op.clone(), &args, g.node(m).loc.clone())
            .map_err(|e| e.to_string())?;
        map.insert(m, outs);
    }
    sub.add_output("value", map[&n][0], ir::op::InputKind::Data);
    let interp = Interpreter::new(&sub, &NoParams).map_err(|e| e.to_string())?;
    let mut out = interp.run(&HashMap::new()).map_err(|e| e.to_string())?;
    out.remove("value")
        .ok_or_else(|| "the folded value was not computed".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::op::{BinaryOp, InputKind, UnaryOp};
    use ir::shape::Dim;
    use ir::DType;

    fn input(g: &mut Graph, name: &str, dims: &[i64]) -> Value {
        g.add1(
            Op::Input {
                name: name.into(),
                kind: InputKind::Data,
                dtype: DType::F32,
                shape: dims.iter().map(|&d| Dim::constant(d)).collect(),
            },
            &[],
            None,
        )
        .unwrap()
    }

    fn konst(g: &mut Graph, v: f64) -> Value {
        g.add1(
            Op::Const {
                value: v,
                dtype: DType::F32,
            },
            &[],
            None,
        )
        .unwrap()
    }

    fn run(g: &Graph, x: &[f32]) -> Vec<f32> {
        let interp = Interpreter::new(g, &NoParams).unwrap();
        let t = Tensor::from_f32(DType::F32, vec![x.len()], x.to_vec());
        let out = interp.run(&[("x".to_string(), t)].into()).unwrap();
        out["y"].as_f32().unwrap().to_vec()
    }

    #[test]
    fn cse_merges_equal_subexpressions_and_dce_drops_the_rest() {
        let mut g = Graph::new();
        let x = input(&mut g, "x", &[4]);
        let a = g.add1(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let b = g.add1(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let c1 = konst(&mut g, 2.0);
        let c2 = konst(&mut g, 2.0);
        let a2 = g.add1(Op::Binary(BinaryOp::Mul), &[a, c1], None).unwrap();
        let b2 = g.add1(Op::Binary(BinaryOp::Mul), &[b, c2], None).unwrap();
        let y = g.add1(Op::Binary(BinaryOp::Add), &[a2, b2], None).unwrap();
        let _dead = g.add1(Op::Unary(UnaryOp::Sin), &[x], None).unwrap();
        g.add_output("y", y, InputKind::Data);
        let xs = [0.5, -1.0, 2.0, 0.0];
        let want = run(&g, &xs);
        let before = g.node_count();
        let g = dce(cse(g).unwrap()).unwrap();
        assert_eq!(g.node_count(), before - 4, "{}", g.to_text());
        assert_eq!(run(&g, &xs), want);
        g.validate().unwrap();
    }

    #[test]
    fn const_fold_makes_literals_and_scalars() {
        let mut g = Graph::new();
        let x = input(&mut g, "x", &[4]);
        let io = g
            .add1(
                Op::Iota {
                    len: Dim::constant(4),
                    dtype: DType::I64,
                },
                &[],
                None,
            )
            .unwrap();
        let f = g.add1(Op::Cast { to: DType::F32 }, &[io], None).unwrap();
        let c = konst(&mut g, -0.5);
        let s = g.add1(Op::Binary(BinaryOp::Mul), &[f, c], None).unwrap();
        let e = g.add1(Op::Unary(UnaryOp::Exp), &[s], None).unwrap(); // [4] literal
        let c3 = konst(&mut g, 3.0);
        let c4 = konst(&mut g, 4.0);
        let sc = g.add1(Op::Binary(BinaryOp::Mul), &[c3, c4], None).unwrap(); // scalar 12
        let t = g.add1(Op::Binary(BinaryOp::Mul), &[x, e], None).unwrap();
        let y = g.add1(Op::Binary(BinaryOp::Add), &[t, sc], None).unwrap();
        g.add_output("y", y, InputKind::Data);
        let xs = [1.0, 2.0, 3.0, 4.0];
        let want = run(&g, &xs);
        let g = dce(const_fold(g).unwrap()).unwrap();
        let text = g.to_text();
        assert!(text.contains("literal [1, 0.6065"), "{text}");
        assert!(text.contains("const 12 : f32[]"), "{text}");
        assert_eq!(g.node_count(), 5, "{text}");
        let got = run(&g, &xs);
        ir::tol::check("folded", &got, &want, ir::tol::Tol::F32.op()).unwrap();
    }

    #[test]
    fn cse_compares_scan_bodies_structurally() {
        let src = "dim b, t; input x: f32[b, t, 4]; input s0: f32[b, 4];
            let (s1, y1) = scan (s = s0; xt in x; axis = 1) { let n = s * 0.5 + xt; (n, n * 2.0) };
            let (s2, y2) = scan (s = s0; xt in x; axis = 1) { let n = s * 0.5 + xt; (n, n * 2.0) };
            let (s3, y3) = scan (s = s0; xt in x; axis = 1) { let n = s * 0.25 + xt; (n, n * 2.0) };
            output \"y\" = y1 + y2 + y3;";
        let g = crate::testing::dsl(src);
        let scans = |g: &Graph| g.g.node_weights().filter(|n| matches!(n.op, Op::Scan { .. })).count();
        assert_eq!(scans(&g), 3);
        let c = dce(cse(g.clone()).unwrap()).unwrap();
        // the first two share a body (same ops, same constants); the third's decay differs
        assert_eq!(scans(&c), 2, "{}", c.to_text());
        let env: ir::DimEnv = [("b".to_string(), 2), ("t".to_string(), 3)].into();
        let inputs = crate::testing::random_inputs(&g, &env, 4, 1.0, 1);
        let want = crate::testing::run(&g, &NoParams, &inputs).unwrap();
        let got = crate::testing::run(&c, &NoParams, &inputs).unwrap();
        crate::testing::outputs_close(&got, &want, ir::tol::Tol::F32.op()).unwrap();
    }
}
