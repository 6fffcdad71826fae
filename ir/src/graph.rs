//! The graph IR: a petgraph `StableGraph` whose nodes are ops with typed outputs.
//!
//! Every node is type-checked when it is added ([`Graph::add`]); [`Graph::validate`] re-checks
//! a whole graph (after a pass) and names the offending node and its DSL source location.

use crate::dtype::DType;
use crate::op::{BinaryOp, InputKind, Op, ReduceOp, UnaryOp};
use crate::shape::{broadcast, numel, shape_str, Dim, Shape};
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use std::fmt;
use std::fmt::Write as _;
use std::sync::Arc;

/// Where a node came from in a DSL file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SrcLoc {
    pub file: Arc<str>,
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for SrcLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> Self {
        TensorType { dtype, shape }
    }
    pub fn scalar(dtype: DType) -> Self {
        TensorType { dtype, shape: vec![] }
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, shape_str(&self.shape))
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub outputs: Vec<TensorType>,
    pub loc: Option<SrcLoc>,
    /// The DSL binding this value was given (`let q = ...`), for readable dumps.
    pub label: Option<String>,
}

/// One output (`port`) of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeIndex,
    pub port: u32,
}

/// Edge weight: the consumer's operand slot and the producer's output port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub slot: u32,
    pub port: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub name: String,
    pub value: Value,
    pub kind: InputKind,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub g: StableGraph<Node, Operand>,
    /// Input nodes in declaration order (the order matters for scan bodies).
    pub inputs: Vec<NodeIndex>,
    pub outputs: Vec<Output>,
}

/// An IR error, naming the node and where the DSL wrote it.
#[derive(Clone, Debug, PartialEq)]
pub struct IrError {
    pub msg: String,
    pub loc: Option<SrcLoc>,
    pub node: Option<String>,
}

impl IrError {
    pub fn new(msg: impl Into<String>) -> Self {
        IrError {
            msg: msg.into(),
            loc: None,
            node: None,
        }
    }
}

impl fmt::Display for IrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.loc {
            write!(f, "{l}: ")?;
        }
        if let Some(n) = &self.node {
            write!(f, "{n}: ")?;
        }
        f.write_str(&self.msg)
    }
}

impl std::error::Error for IrError {}

impl PartialEq for Graph {
    /// Structural equality through the canonical text form.
    fn eq(&self, other: &Self) -> bool {
        self.to_text() == other.to_text()
    }
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.g[n]
    }

    pub fn ty(&self, v: Value) -> &TensorType {
        &self.g[v.node].outputs[v.port as usize]
    }

    /// Operands of `n` in slot order.
    pub fn operands(&self, n: NodeIndex) -> Vec<Value> {
        let mut ops: Vec<(u32, Value)> = self
            .g
            .edges_directed(n, Direction::Incoming)
            .map(|e| {
                (
                    e.weight().slot,
                    Value {
                        node: e.source(),
                        port: e.weight().port,
                    },
                )
            })
            .collect();
        ops.sort_by_key(|(s, _)| *s);
        ops.into_iter().map(|(_, v)| v).collect()
    }

    /// Add a node after checking its operand types; returns its outputs.
    pub fn add(&mut self, op: Op, args: &[Value], loc: Option<SrcLoc>) -> Result<Vec<Value>, IrError> {
        let tys: Vec<&TensorType> = args.iter().map(|v| self.ty(*v)).collect();
        let outputs = infer(&op, &tys).map_err(|msg| IrError {
            msg,
            loc: loc.clone(),
            node: Some(format!("{} {}", op.name(), op.attrs()).trim().to_string()),
        })?;
        let is_input = matches!(op, Op::Input { .. });
        let n_out = outputs.len();
        let idx = self.g.add_node(Node {
            op,
            outputs,
            loc,
            label: None,
        });
        for (slot, a) in args.iter().enumerate() {
            self.g.add_edge(
                a.node,
                idx,
                Operand {
                    slot: slot as u32,
                    port: a.port,
                },
            );
        }
        if is_input {
            self.inputs.push(idx);
        }
        Ok((0..n_out)
            .map(|p| Value {
                node: idx,
                port: p as u32,
            })
            .collect())
    }

    /// [`Graph::add`] for single-output ops.
    pub fn add1(&mut self, op: Op, args: &[Value], loc: Option<SrcLoc>) -> Result<Value, IrError> {
        let outs = self.add(op, args, loc)?;
        debug_assert_eq!(outs.len(), 1);
        Ok(outs[0])
    }

    /// Declare an input (always well-typed, so this cannot fail).
    pub fn add_input(&mut self, name: &str, kind: InputKind, dtype: DType, shape: Shape) -> Value {
        let op = Op::Input {
            name: name.to_string(),
            kind,
            dtype,
            shape,
        };
        self.add1(op, &[], None).expect("inputs are always well-typed")
    }

    pub fn set_label(&mut self, v: Value, label: &str) {
        if self.g[v.node].label.is_none() {
            self.g[v.node].label = Some(label.to_string());
        }
    }

    pub fn add_output(&mut self, name: &str, value: Value, kind: InputKind) {
        self.outputs.push(Output {
            name: name.to_string(),
            value,
            kind,
        });
    }

    pub fn output(&self, name: &str) -> Option<&Output> {
        self.outputs.iter().find(|o| o.name == name)
    }

    /// Nodes in a topological order (operands before users; ties by index, so deterministic).
    pub fn topo_order(&self) -> Vec<NodeIndex> {
        let mut indeg: std::collections::HashMap<NodeIndex, usize> = self.g.node_indices().map(|n| (n, 0)).collect();
        for e in self.g.edge_references() {
            *indeg.get_mut(&e.target()).unwrap() += 1;
        }
        let mut ready: std::collections::BTreeSet<NodeIndex> =
            indeg.iter().filter(|(_, d)| **d == 0).map(|(n, _)| *n).collect();
        let mut order = Vec::with_capacity(self.g.node_count());
        while let Some(n) = ready.pop_first() {
            order.push(n);
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).unwrap();
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        order
    }

    /// Re-check every node's types, the graph's acyclicity and its outputs.
    pub fn validate(&self) -> Result<(), IrError> {
        let order = self.topo_order();
        if order.len() != self.g.node_count() {
            return Err(IrError::new("graph has a cycle"));
        }
        for n in order {
            let node = &self.g[n];
            let err = |msg: String| IrError {
                msg,
                loc: node.loc.clone(),
                node: Some(format!("%{} ({})", n.index(), node.op.name())),
            };
            let args = self.operands(n);
            for (i, a) in args.iter().enumerate() {
                if (a.port as usize) >= self.g[a.node].outputs.len() {
                    return Err(err(format!("operand {i} refers to a missing output port")));
                }
            }
            let tys: Vec<&TensorType> = args.iter().map(|v| self.ty(*v)).collect();
            let inferred = infer(&node.op, &tys).map_err(&err)?;
            if inferred != node.outputs {
                return Err(err(format!(
                    "stored type {} disagrees with inferred {}",
                    types_str(&node.outputs),
                    types_str(&inferred)
                )));
            }
            if let Op::Scan { body, .. } = &node.op {
                body.validate().map_err(|e| err(format!("in scan body: {e}")))?;
            }
        }
        for o in &self.outputs {
            if !self.g.contains_node(o.value.node) {
                return Err(IrError::new(format!("output `{}` refers to a removed node", o.name)));
            }
            if o.kind == InputKind::State {
                let matching = self.inputs.iter().any(
                    |&i| matches!(&self.g[i].op, Op::Input { name, kind: InputKind::State, .. } if *name == o.name),
                );
                if !matching {
                    return Err(IrError::new(format!(
                        "state output `{}` has no state input of the same name",
                        o.name
                    )));
                }
            }
        }
        Ok(())
    }

    fn value_ref(&self, v: Value) -> String {
        if self.g[v.node].outputs.len() == 1 {
            format!("%{}", v.node.index())
        } else {
            format!("%{}.{}", v.node.index(), v.port)
        }
    }

    fn write_text(&self, out: &mut String, indent: usize) {
        let pad = " ".repeat(indent);
        for n in self.topo_order() {
            let node = &self.g[n];
            let args: Vec<String> = self.operands(n).iter().map(|v| self.value_ref(*v)).collect();
            let _ = write!(out, "{pad}%{} = {}", n.index(), node.op.name());
            let attrs = node.op.attrs();
            if !attrs.is_empty() {
                let _ = write!(out, " {attrs}");
            }
            if !args.is_empty() {
                let _ = write!(out, " {}", args.join(", "));
            }
            let _ = write!(out, " : {}", types_str(&node.outputs));
            match (&node.label, &node.loc) {
                (Some(l), Some(loc)) => {
                    let _ = write!(out, "  # {l} @ {loc}");
                }
                (Some(l), None) => {
                    let _ = write!(out, "  # {l}");
                }
                (None, Some(loc)) => {
                    let _ = write!(out, "  # {loc}");
                }
                (None, None) => {}
            }
            out.push('\n');
            if let Op::Scan { body, .. } = &node.op {
                let _ = writeln!(out, "{pad}  body {{");
                body.write_text(out, indent + 4);
                let _ = writeln!(out, "{pad}  }}");
            }
        }
        for o in &self.outputs {
            let kw = if o.kind == InputKind::State { "carry" } else { "output" };
            let _ = writeln!(out, "{pad}{kw} \"{}\" = {}", o.name, self.value_ref(o.value));
        }
    }

    /// Text form: one line per node in topological order, with types and DSL locations.
    pub fn to_text(&self) -> String {
        let mut s = String::from("graph {\n");
        self.write_text(&mut s, 2);
        s.push_str("}\n");
        s
    }

    /// Graphviz DOT with the value's type on every edge.
    pub fn to_dot(&self) -> String {
        let mut s = String::from("digraph ringjit {\n  node [shape=box, fontname=monospace];\n");
        for n in self.g.node_indices() {
            let node = &self.g[n];
            let mut label = format!("%{} {}", n.index(), node.op.name());
            let attrs = node.op.attrs();
            if !attrs.is_empty() {
                label.push_str(&format!("\\n{attrs}"));
            }
            if let Some(l) = &node.label {
                label.push_str(&format!("\\n{l}"));
            }
            let label = label.replace('"', "\\\"").replace("\\\\\"", "\\\"");
            let _ = writeln!(s, "  n{} [label=\"{}\"];", n.index(), label);
        }
        for e in self.g.edge_references() {
            let t = &self.g[e.source()].outputs[e.weight().port as usize];
            let _ = writeln!(
                s,
                "  n{} -> n{} [label=\"{}\"];",
                e.source().index(),
                e.target().index(),
                t
            );
        }
        for (i, o) in self.outputs.iter().enumerate() {
            let _ = writeln!(s, "  out{i} [label=\"{}\", shape=oval];", o.name);
            let _ = writeln!(s, "  n{} -> out{i};", o.value.node.index());
        }
        s.push_str("}\n");
        s
    }
}

fn types_str(t: &[TensorType]) -> String {
    if t.len() == 1 {
        t[0].to_string()
    } else {
        let p: Vec<String> = t.iter().map(|x| x.to_string()).collect();
        format!("({})", p.join(", "))
    }
}

fn check_axis(axis: usize, rank: usize) -> Result<(), String> {
    if axis >= rank {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    } else {
        Ok(())
    }
}

fn expect_args(op: &Op, tys: &[&TensorType], n: usize) -> Result<(), String> {
    if tys.len() != n {
        Err(format!("{} takes {n} operand(s), got {}", op.name(), tys.len()))
    } else {
        Ok(())
    }
}

/// Output types of `op` applied to operands of types `tys`, or why the op is ill-typed.
pub fn infer(op: &Op, tys: &[&TensorType]) -> Result<Vec<TensorType>, String> {
    let one = |t: TensorType| Ok(vec![t]);
    match op {
        Op::Input { dtype, shape, .. } | Op::Param { dtype, shape, .. } => {
            expect_args(op, tys, 0)?;
            if let Op::Param { stack: Some(s), .. } = op {
                if shape.first().and_then(|d| d.as_const()) != Some(s.count as i64) {
                    return Err(format!(
                        "stacked parameter's leading dim {} must equal its count {}",
                        shape.first().map(|d| d.to_string()).unwrap_or_default(),
                        s.count
                    ));
                }
            }
            one(TensorType::new(*dtype, shape.clone()))
        }
        Op::Const { dtype, .. } => {
            expect_args(op, tys, 0)?;
            one(TensorType::scalar(*dtype))
        }
        Op::DimValue { .. } => {
            expect_args(op, tys, 0)?;
            one(TensorType::scalar(DType::I64))
        }
        Op::Literal { value } => {
            expect_args(op, tys, 0)?;
            value.check()?;
            one(TensorType::new(
                value.dtype,
                value.shape.iter().map(|&d| Dim::constant(d as i64)).collect(),
            ))
        }
        Op::Iota { len, dtype } => {
            expect_args(op, tys, 0)?;
            if dtype == &DType::Bool {
                return Err("iota needs a numeric dtype".into());
            }
            one(TensorType::new(*dtype, vec![len.clone()]))
        }
        Op::Unary(u) => {
            expect_args(op, tys, 1)?;
            let t = tys[0];
            let ok = match u {
                UnaryOp::Not => t.dtype == DType::Bool,
                UnaryOp::Neg | UnaryOp::Abs => t.dtype != DType::Bool,
                _ => t.dtype.is_float(),
            };
            if !ok {
                return Err(format!("{u} is not defined on {}", t.dtype));
            }
            one(t.clone())
        }
        Op::Binary(b) => {
            expect_args(op, tys, 2)?;
            let (x, y) = (tys[0], tys[1]);
            let shape = broadcast(&x.shape, &y.shape).ok_or_else(|| {
                format!(
                    "shapes {} and {} do not broadcast",
                    shape_str(&x.shape),
                    shape_str(&y.shape)
                )
            })?;
            let dtype = if b.is_logical() {
                if x.dtype != DType::Bool || y.dtype != DType::Bool {
                    return Err(format!("{b:?} needs bool operands, got {} and {}", x.dtype, y.dtype));
                }
                DType::Bool
            } else {
                let p = DType::promote(x.dtype, y.dtype)
                    .ok_or_else(|| format!("operand dtypes {} and {} do not mix; cast one", x.dtype, y.dtype))?;
                if b.is_comparison() {
                    DType::Bool
                } else {
                    if p == DType::Bool {
                        return Err(format!("{b:?} is not defined on bool"));
                    }
                    if *b == BinaryOp::Mod && !p.is_int() {
                        return Err("% is defined on integers only".into());
                    }
                    p
                }
            };
            one(TensorType::new(dtype, shape))
        }
        Op::Where => {
            expect_args(op, tys, 3)?;
            if tys[0].dtype != DType::Bool {
                return Err(format!("where's condition must be bool, got {}", tys[0].dtype));
            }
            let dtype = DType::promote(tys[1].dtype, tys[2].dtype)
                .ok_or_else(|| format!("where's branches {} and {} do not mix", tys[1].dtype, tys[2].dtype))?;
            let s = broadcast(&tys[0].shape, &tys[1].shape)
                .and_then(|s| broadcast(&s, &tys[2].shape))
                .ok_or("where's operands do not broadcast")?;
            one(TensorType::new(dtype, s))
        }
        Op::Reduce { op: r, axes, keepdim } => {
            expect_args(op, tys, 1)?;
            let t = tys[0];
            if t.dtype == DType::Bool {
                return Err(format!("reduce {r:?} is not defined on bool"));
            }
            let mut seen = vec![false; t.rank()];
            for &a in axes {
                check_axis(a, t.rank())?;
                if std::mem::replace(&mut seen[a], true) {
                    return Err(format!("axis {a} repeated"));
                }
            }
            if *r == ReduceOp::Max {
                for &a in axes {
                    if t.shape[a].as_const() == Some(0) {
                        return Err("max over an empty axis".into());
                    }
                }
            }
            let mut shape = Vec::new();
            for (i, d) in t.shape.iter().enumerate() {
                if seen[i] {
                    if *keepdim {
                        shape.push(Dim::constant(1));
                    }
                } else {
                    shape.push(d.clone());
                }
            }
            one(TensorType::new(t.dtype, shape))
        }
        Op::Reshape { shape } => {
            expect_args(op, tys, 1)?;
            if numel(&tys[0].shape) != numel(shape) {
                return Err(format!(
                    "cannot reshape {} into {}: element counts differ",
                    shape_str(&tys[0].shape),
                    shape_str(shape)
                ));
            }
            one(TensorType::new(tys[0].dtype, shape.clone()))
        }
        Op::Permute { perm } => {
            expect_args(op, tys, 1)?;
            let t = tys[0];
            let mut sorted = perm.clone();
            sorted.sort();
            if sorted != (0..t.rank()).collect::<Vec<_>>() {
                return Err(format!("{perm:?} is not a permutation of {} axes", t.rank()));
            }
            one(TensorType::new(
                t.dtype,
                perm.iter().map(|&p| t.shape[p].clone()).collect(),
            ))
        }
        Op::Expand { shape } => {
            expect_args(op, tys, 1)?;
            match broadcast(&tys[0].shape, shape) {
                Some(s) if &s == shape => one(TensorType::new(tys[0].dtype, shape.clone())),
                _ => Err(format!(
                    "cannot expand {} to {}",
                    shape_str(&tys[0].shape),
                    shape_str(shape)
                )),
            }
        }
        Op::Slice { axis, start, end } => {
            expect_args(op, tys, 1)?;
            let t = tys[0];
            check_axis(*axis, t.rank())?;
            let len = end.sub(start);
            if let (Some(s), Some(e)) = (start.as_const(), end.as_const()) {
                if s < 0 || e < s {
                    return Err(format!("slice {s}..{e} is empty or reversed"));
                }
                if let Some(n) = t.shape[*axis].as_const() {
                    if e > n {
                        return Err(format!("slice {s}..{e} exceeds dimension {n}"));
                    }
                }
            }
            let mut shape = t.shape.clone();
            shape[*axis] = len;
            one(TensorType::new(t.dtype, shape))
        }
        Op::Concat { axis } => {
            if tys.is_empty() {
                return Err("concat of nothing".into());
            }
            let t0 = tys[0];
            check_axis(*axis, t0.rank())?;
            let mut total = Dim::constant(0);
            for t in tys {
                if t.dtype != t0.dtype || t.rank() != t0.rank() {
                    return Err(format!("concat of {} and {}", t0, t));
                }
                for i in 0..t.rank() {
                    if i != *axis && t.shape[i] != t0.shape[i] {
                        return Err(format!("concat of {} and {}: axis {i} differs", t0, t));
                    }
                }
                total = total.add(&t.shape[*axis]);
            }
            let mut shape = t0.shape.clone();
            shape[*axis] = total;
            one(TensorType::new(t0.dtype, shape))
        }
        Op::IndexSelect { axis } => {
            expect_args(op, tys, 2)?;
            let (x, idx) = (tys[0], tys[1]);
            check_axis(*axis, x.rank())?;
            if !idx.dtype.is_int() {
                return Err(format!("indices must be integers, got {}", idx.dtype));
            }
            let mut shape = x.shape[..*axis].to_vec();
            shape.extend(idx.shape.iter().cloned());
            shape.extend(x.shape[axis + 1..].iter().cloned());
            one(TensorType::new(x.dtype, shape))
        }
        Op::GatherAlong { axis } => {
            expect_args(op, tys, 2)?;
            let (x, idx) = (tys[0], tys[1]);
            check_along(x, idx, *axis)?;
            one(TensorType::new(x.dtype, idx.shape.clone()))
        }
        Op::ScatterAddAlong { axis } => {
            expect_args(op, tys, 3)?;
            let (x, idx, src) = (tys[0], tys[1], tys[2]);
            check_along(x, idx, *axis)?;
            if src.shape != idx.shape || src.dtype != x.dtype {
                return Err(format!(
                    "scatter source {src} must have the indices' shape and {}'s dtype",
                    x
                ));
            }
            one(x.clone())
        }
        Op::TopK { k, axis } => {
            expect_args(op, tys, 1)?;
            let x = tys[0];
            check_axis(*axis, x.rank())?;
            if let Some(n) = x.shape[*axis].as_const() {
                if *k as i64 > n {
                    return Err(format!("top-{k} of a dimension of {n}"));
                }
            }
            let mut shape = x.shape.clone();
            shape[*axis] = Dim::constant(*k as i64);
            Ok(vec![
                TensorType::new(x.dtype, shape.clone()),
                TensorType::new(DType::I64, shape),
            ])
        }
        Op::ArgMax { axis } => {
            expect_args(op, tys, 1)?;
            let x = tys[0];
            check_axis(*axis, x.rank())?;
            let mut shape = x.shape.clone();
            shape.remove(*axis);
            one(TensorType::new(DType::I64, shape))
        }
        Op::Matmul => {
            expect_args(op, tys, 2)?;
            let (a, b) = (tys[0], tys[1]);
            if a.rank() < 2 || b.rank() < 2 {
                return Err(format!("matmul needs rank >= 2 operands, got {a} and {b}"));
            }
            let (m, ka) = (&a.shape[a.rank() - 2], &a.shape[a.rank() - 1]);
            let (kb, n) = (&b.shape[b.rank() - 2], &b.shape[b.rank() - 1]);
            if ka != kb {
                return Err(format!("matmul inner dimensions differ: {a} @ {b}"));
            }
            let batch = broadcast(&a.shape[..a.rank() - 2], &b.shape[..b.rank() - 2])
                .ok_or_else(|| format!("matmul batch dimensions do not broadcast: {a} @ {b}"))?;
            let dtype = DType::promote(a.dtype, b.dtype)
                .filter(|d| d.is_float())
                .ok_or_else(|| format!("matmul needs float operands, got {} and {}", a.dtype, b.dtype))?;
            let mut shape = batch;
            shape.push(m.clone());
            shape.push(n.clone());
            one(TensorType::new(dtype, shape))
        }
        Op::Cast { to } => {
            expect_args(op, tys, 1)?;
            one(TensorType::new(*to, tys[0].shape.clone()))
        }
        Op::Scan {
            body,
            axis,
            n_carry,
            n_seq,
        } => infer_scan(body, *axis, *n_carry, *n_seq, tys),
        Op::Fused(f) => f.infer(tys),
    }
}

fn check_along(x: &TensorType, idx: &TensorType, axis: usize) -> Result<(), String> {
    check_axis(axis, x.rank())?;
    if !idx.dtype.is_int() {
        return Err(format!("indices must be integers, got {}", idx.dtype));
    }
    if idx.rank() != x.rank() {
        return Err(format!("indices {idx} must have the rank of {x}"));
    }
    for i in 0..x.rank() {
        if i != axis && idx.shape[i] != x.shape[i] {
            return Err(format!("indices {idx} and {x} differ on axis {i}"));
        }
    }
    Ok(())
}

fn infer_scan(
    body: &Graph,
    axis: usize,
    n_carry: usize,
    n_seq: usize,
    tys: &[&TensorType],
) -> Result<Vec<TensorType>, String> {
    if body.inputs.len() != tys.len() {
        return Err(format!(
            "scan body takes {} inputs but the scan passes {}",
            body.inputs.len(),
            tys.len()
        ));
    }
    if tys.len() < n_carry + n_seq || n_seq == 0 {
        return Err("scan needs at least one sequence".into());
    }
    let body_in: Vec<&TensorType> = body.inputs.iter().map(|&n| &body.g[n].outputs[0]).collect();
    let mut len: Option<Dim> = None;
    for i in 0..tys.len() {
        let expect = if i >= n_carry && i < n_carry + n_seq {
            let t = tys[i];
            check_axis(axis, t.rank())?;
            match &len {
                None => len = Some(t.shape[axis].clone()),
                Some(l) if *l != t.shape[axis] => {
                    return Err(format!("scan sequences differ in length: {l} vs {}", t.shape[axis]))
                }
                _ => {}
            }
            let mut s = t.shape.clone();
            s.remove(axis);
            TensorType::new(t.dtype, s)
        } else {
            tys[i].clone()
        };
        if *body_in[i] != expect {
            return Err(format!("scan body input {i} is {} but receives {}", body_in[i], expect));
        }
    }
    let outs: Vec<&TensorType> = body.outputs.iter().map(|o| body.ty(o.value)).collect();
    if outs.len() < n_carry {
        return Err("scan body must return its carries first".into());
    }
    let mut result = Vec::new();
    for i in 0..n_carry {
        if outs[i] != tys[i] {
            return Err(format!(
                "scan carry {i} enters as {} but the body returns {}",
                tys[i], outs[i]
            ));
        }
        result.push(tys[i].clone());
    }
    let len = len.unwrap();
    for t in &outs[n_carry..] {
        if axis > t.rank() {
            return Err(format!("scan axis {axis} cannot stack outputs of rank {}", t.rank()));
        }
        let mut s = t.shape.clone();
        s.insert(axis, len.clone());
        result.push(TensorType::new(t.dtype, s));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(dims: &[i64]) -> Shape {
        dims.iter().map(|&d| Dim::constant(d)).collect()
    }

    #[test]
    fn construction_checks_types_and_names_the_location() {
        let mut g = Graph::new();
        let loc = SrcLoc {
            file: "m.ring".into(),
            line: 3,
            col: 7,
        };
        let a = g.add_input("a", InputKind::Data, DType::F32, f32s(&[2, 3]));
        let b = g.add_input("b", InputKind::Data, DType::F32, f32s(&[4, 5]));
        let e = g.add1(Op::Matmul, &[a, b], Some(loc)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("m.ring:3:7: matmul: matmul inner dimensions differ"),
            "{e}"
        );
        let c = g.add1(Op::Binary(BinaryOp::Add), &[a, a], None).unwrap();
        g.add_output("c", c, InputKind::Data);
        g.validate().unwrap();
        assert!(g.to_text().contains("add %0, %0 : f32[2, 3]"));
        assert!(g.to_dot().contains("label=\"f32[2, 3]\""));
    }

    #[test]
    fn validate_finds_a_corrupted_node() {
        let mut g = Graph::new();
        let a = g.add_input("a", InputKind::Data, DType::F32, f32s(&[2, 3]));
        let s = g
            .add1(
                Op::Unary(UnaryOp::Exp),
                &[a],
                Some(SrcLoc {
                    file: "x.ring".into(),
                    line: 9,
                    col: 1,
                }),
            )
            .unwrap();
        g.g[s.node].outputs[0].shape = f32s(&[3, 2]);
        let e = g.validate().unwrap_err();
        assert!(e.to_string().starts_with("x.ring:9:1: %1 (exp): stored type"), "{e}");
    }
}
