//! The reference interpreter: the executable definition of what a graph means (design.md,
//! "Three ways to run a graph, one answer").
//!
//! It evaluates the graph op by op with plain loops. Floats are computed in f32 (f64 where it
//! is cheap: sums, matmul dot products, scatter-add) and every float result is rounded once to
//! its node's dtype with [`DType::round`], which emulates bf16/f16/fp8 storage. Integers are
//! computed on i64 (wrapping on overflow), bools as bools.
//!
//! [`Interpreter::new`] validates the graph, loads every parameter once and compiles the graph
//! (and every scan body) into a `Plan`: the live nodes in topological order, each reading
//! and writing numbered value slots, with the slots each step is the last reader of. A run
//! binds the symbolic dimensions from the inputs' shapes, evaluates every node's type under
//! that binding and checks each computed value against it.

use crate::dtype::DType;
use crate::graph::{Graph, IrError, SrcLoc, TensorType};
use crate::op::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::param::ParamSpec;
use crate::shape::{eval_shape, DimEnv, Shape};
use crate::tensor::{row_major_strides, Data, Tensor};
use petgraph::stable_graph::NodeIndex;
use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

/// Where parameters come from: a checkpoint, random weights, a test's table.
pub trait ParamSource {
    /// The tensor for `spec`: of `spec.dtype` and `spec.shape`. For a stacked spec, the whole
    /// stacked `[count, ...]` tensor.
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String>;
}

/// A graph ready to run: validated, compiled, with its parameters loaded.
pub struct Interpreter {
    plan: Plan,
    params: Vec<std::sync::Arc<Tensor>>,
    inputs: Vec<InputDecl>,
    output_names: Vec<String>,
}

/// A graph input as declared: what the caller must pass under `name`.
struct InputDecl {
    name: String,
    dtype: DType,
    shape: Shape,
    node: String,
    loc: Option<SrcLoc>,
}

impl InputDecl {
    fn err(&self, msg: String) -> IrError {
        IrError {
            msg,
            loc: self.loc.clone(),
            node: Some(self.node.clone()),
        }
    }
}

/// A graph compiled for evaluation. Every output port of every live node owns one value slot;
/// steps are in topological order, so a step's operand slots are filled before it runs.
struct Plan {
    steps: Vec<Step>,
    n_slots: usize,
    /// Slot of each graph input, in `graph.inputs` order.
    inputs: Vec<usize>,
    /// Slot of each graph output, in `graph.outputs` order.
    outputs: Vec<usize>,
}

struct Step {
    kind: Kind,
    /// Operand slots in operand order.
    args: Vec<usize>,
    /// The slot of output port 0; port `p` is `out + p`.
    out: usize,
    /// The node's output types (symbolic); every computed value is checked against them.
    types: Vec<TensorType>,
    loc: Option<SrcLoc>,
    /// `%12 (matmul)`, for errors.
    name: String,
    /// Slots whose last reader is this step (or that nobody reads): dropped after it runs.
    frees: Vec<usize>,
}

enum Kind {
    /// The value is placed in the slot before the plan runs.
    Input,
    /// Index into `Interpreter::params`.
    Param(usize),
    Scan {
        body: Box<Plan>,
        axis: usize,
        n_carry: usize,
        n_seq: usize,
    },
    /// Every other op: a pure function of its operands (and the dimension binding).
    Compute(Op),
}

impl Step {
    fn err(&self, msg: impl Into<String>) -> IrError {
        IrError {
            msg: msg.into(),
            loc: self.loc.clone(),
            node: Some(self.name.clone()),
        }
    }
}

/// Concrete shapes of every step's outputs under one binding: `[step][port]`.
type Shapes = Vec<Vec<Vec<usize>>>;

fn node_name(n: NodeIndex, op: &Op) -> String {
    format!("%{} ({})", n.index(), op.name())
}

impl Interpreter {
    /// Validates `graph`, loads each of its parameters once from `params` (checking dtype and
    /// shape), and compiles the graph and its scan bodies.
    pub fn new(graph: &Graph, params: &dyn ParamSource) -> Result<Interpreter, IrError> {
        Self::with_shared(graph, params, &mut HashMap::new())
    }

    /// [`Interpreter::new`], taking each parameter from `shared` when an earlier interpreter
    /// loaded it (the same spec), and leaving the ones it loads there: interpreters of several
    /// graphs of one model (prefill, decode) hold its weights once.
    pub fn with_shared(
        graph: &Graph,
        params: &dyn ParamSource,
        shared: &mut HashMap<ParamSpec, std::sync::Arc<Tensor>>,
    ) -> Result<Interpreter, IrError> {
        graph.validate()?;
        let specs = graph.params().map_err(IrError::new)?;
        let mut loaded = Vec::with_capacity(specs.len());
        let mut index = HashMap::new();
        for spec in specs {
            let t = match shared.get(&spec) {
                Some(t) => t.clone(),
                None => {
                    let t = std::sync::Arc::new(load_param(&spec, params)?);
                    shared.insert(spec.clone(), t.clone());
                    t
                }
            };
            index.insert(spec, loaded.len());
            loaded.push(t);
        }
        let plan = compile(graph, &index)?;
        let inputs = graph
            .inputs
            .iter()
            .map(|&n| match &graph.node(n).op {
                Op::Input { name, dtype, shape, .. } => Ok(InputDecl {
                    name: name.clone(),
                    dtype: *dtype,
                    shape: shape.clone(),
                    node: node_name(n, &graph.node(n).op),
                    loc: graph.node(n).loc.clone(),
                }),
                op => Err(IrError::new(format!(
                    "graph input {} is not an input node",
                    node_name(n, op)
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output_names = graph.outputs.iter().map(|o| o.name.clone()).collect();
        Ok(Interpreter {
            plan,
            params: loaded,
            inputs,
            output_names,
        })
    }

    /// Evaluates the graph on `inputs` (by input name) and returns every graph output by name.
    pub fn run(&self, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, IrError> {
        let env = self.bind(inputs)?;
        let shapes = resolve(&self.plan, &env)?;
        let mut values = Vec::with_capacity(self.inputs.len());
        for decl in &self.inputs {
            let t = inputs
                .get(&decl.name)
                .ok_or_else(|| decl.err(format!("missing input `{}`", decl.name)))?;
            values.push(conform(t));
        }
        let outs = self.exec(&self.plan, &shapes, &env, values)?;
        Ok(self.output_names.iter().cloned().zip(outs).collect())
    }

    /// The values of the symbolic dimensions under which `inputs` fit the graph's input
    /// declarations. A declared dim that is exactly one symbol binds it; constant dims and
    /// dims that are expressions are checked (the latter once every symbol is bound). Errors
    /// name the input: missing, unknown, of the wrong dtype or rank, or inconsistent.
    pub fn bind(&self, inputs: &HashMap<String, Tensor>) -> Result<DimEnv, IrError> {
        let mut unknown: Vec<&String> = inputs
            .keys()
            .filter(|k| !self.inputs.iter().any(|d| &d.name == *k))
            .collect();
        unknown.sort();
        if let Some(k) = unknown.first() {
            let expected: Vec<&str> = self.inputs.iter().map(|d| d.name.as_str()).collect();
            return Err(IrError::new(format!(
                "unknown input `{k}` (the graph's inputs are: {})",
                expected.join(", ")
            )));
        }
        let mut env = DimEnv::new();
        // symbol -> the input that bound it, for the error message
        let mut bound_by: HashMap<String, &str> = HashMap::new();
        for d in &self.inputs {
            let declared = TensorType::new(d.dtype, d.shape.clone());
            let t = inputs
                .get(&d.name)
                .ok_or_else(|| d.err(format!("missing input `{}` ({declared})", d.name)))?;
            t.check().map_err(|m| d.err(format!("input `{}`: {m}", d.name)))?;
            if t.dtype != d.dtype || t.shape.len() != d.shape.len() {
                return Err(d.err(format!("input `{}` must be {declared} but is {}", d.name, t.type_str())));
            }
            for (i, (dim, &size)) in d.shape.iter().zip(&t.shape).enumerate() {
                let size = size as i64;
                if let Some(c) = dim.as_const() {
                    if c != size {
                        return Err(d.err(format!("input `{}`: dimension {i} is {size}, expected {c}", d.name)));
                    }
                } else if let Some(sym) = dim.as_sym() {
                    match env.get(sym) {
                        Some(&v) if v != size => {
                            return Err(d.err(format!(
                                "input `{}`: dimension {i} gives `{sym}` = {size}, but input `{}` gave `{sym}` = {v}",
                                d.name, bound_by[sym]
                            )))
                        }
                        Some(_) => {}
                        None => {
                            env.insert(sym.to_string(), size);
                            bound_by.insert(sym.to_string(), &d.name);
                        }
                    }
                }
            }
        }
        for d in &self.inputs {
            let t = &inputs[&d.name];
            for (i, (dim, &size)) in d.shape.iter().zip(&t.shape).enumerate() {
                if dim.as_const().is_some() || dim.as_sym().is_some() {
                    continue;
                }
                let want = dim
                    .eval(&env)
                    .map_err(|m| d.err(format!("input `{}`: dimension {i} ({dim}): {m}", d.name)))?;
                if want != size as i64 {
                    return Err(d.err(format!(
                        "input `{}`: dimension {i} is {size}, but {dim} = {want}",
                        d.name
                    )));
                }
            }
        }
        Ok(env)
    }

    /// Runs `plan` on `inputs` (one per plan input, in order) and returns its outputs.
    fn exec<'a>(
        &'a self,
        plan: &'a Plan,
        shapes: &Shapes,
        env: &DimEnv,
        inputs: Vec<Cow<'a, Tensor>>,
    ) -> Result<Vec<Tensor>, IrError> {
        if inputs.len() != plan.inputs.len() {
            return Err(IrError::new(format!(
                "internal: {} inputs for a plan of {}",
                inputs.len(),
                plan.inputs.len()
            )));
        }
        let mut vals: Vec<Option<Cow<'a, Tensor>>> = Vec::new();
        vals.resize_with(plan.n_slots, || None);
        for (&slot, t) in plan.inputs.iter().zip(inputs) {
            vals[slot] = Some(t);
        }
        for (step, out_shapes) in plan.steps.iter().zip(shapes) {
            let results: Vec<Cow<'a, Tensor>> = {
                let args = step
                    .args
                    .iter()
                    .map(|&s| {
                        vals[s]
                            .as_deref()
                            .ok_or_else(|| step.err("internal: operand not available"))
                    })
                    .collect::<Result<Vec<&Tensor>, _>>()?;
                match &step.kind {
                    Kind::Input => {
                        let t = vals[step.out]
                            .as_deref()
                            .ok_or_else(|| step.err("internal: input not placed"))?;
                        check_value(step, 0, t, &out_shapes[0])?;
                        Vec::new()
                    }
                    Kind::Param(i) => vec![Cow::Borrowed(&*self.params[*i])],
                    Kind::Scan {
                        body,
                        axis,
                        n_carry,
                        n_seq,
                    } => {
                        let spec = ScanSpec {
                            body,
                            axis: *axis,
                            n_carry: *n_carry,
                            n_seq: *n_seq,
                        };
                        self.scan(step, &spec, &args, out_shapes, env)?
                            .into_iter()
                            .map(Cow::Owned)
                            .collect()
                    }
                    Kind::Compute(op) => eval(op, &args, &step.types, out_shapes, env)
                        .map_err(|m| step.err(m))?
                        .into_iter()
                        .map(Cow::Owned)
                        .collect(),
                }
            };
            if !matches!(step.kind, Kind::Input) && results.len() != step.types.len() {
                return Err(step.err(format!(
                    "internal: produced {} values for {} outputs",
                    results.len(),
                    step.types.len()
                )));
            }
            for (p, t) in results.into_iter().enumerate() {
                check_value(step, p, &t, &out_shapes[p])?;
                vals[step.out + p] = Some(t);
            }
            for &s in &step.frees {
                vals[s] = None;
            }
        }
        let mut outs = Vec::with_capacity(plan.outputs.len());
        for (i, &s) in plan.outputs.iter().enumerate() {
            let v = if plan.outputs[i + 1..].contains(&s) {
                vals[s].clone()
            } else {
                vals[s].take()
            };
            let v = v.ok_or_else(|| IrError::new("internal: graph output not computed"))?;
            outs.push(v.into_owned());
        }
        Ok(outs)
    }

    /// Runs a scan node: the body once per position along `axis` of the sequences.
    fn scan(
        &self,
        step: &Step,
        spec: &ScanSpec,
        args: &[&Tensor],
        out_shapes: &[Vec<usize>],
        env: &DimEnv,
    ) -> Result<Vec<Tensor>, IrError> {
        let &ScanSpec {
            body,
            axis,
            n_carry,
            n_seq,
        } = spec;
        let nest = |e: IrError, t: Option<usize>| IrError {
            msg: match t {
                Some(t) => format!("{} (scan step {t})", e.msg),
                None => e.msg,
            },
            loc: e.loc.or_else(|| step.loc.clone()),
            node: Some(match e.node {
                Some(inner) => format!("{} body {inner}", step.name),
                None => step.name.clone(),
            }),
        };
        if args.len() < n_carry + n_seq || n_seq == 0 {
            return Err(step.err("internal: scan operands do not match its carries and sequences"));
        }
        let body_shapes = resolve(body, env).map_err(|e| nest(e, None))?;
        let seqs = &args[n_carry..n_carry + n_seq];
        let len = match seqs[0].shape.get(axis) {
            Some(&l) => l,
            None => return Err(step.err(format!("scan axis {axis} out of range for a sequence"))),
        };
        if seqs.iter().any(|s| s.shape.get(axis) != Some(&len)) {
            return Err(step.err("scan sequences differ in length"));
        }
        let mut stacked: Vec<Tensor> = step.types[n_carry..]
            .iter()
            .zip(&out_shapes[n_carry..])
            .map(|(ty, shape)| Tensor::zeros(ty.dtype, shape.clone()))
            .collect();
        let mut carries: Vec<Cow<Tensor>> = args[..n_carry].iter().map(|&t| Cow::Borrowed(t)).collect();
        for t in 0..len {
            let mut ins: Vec<Cow<Tensor>> = carries.iter().map(|c| Cow::Borrowed(&**c)).collect();
            for s in seqs {
                ins.push(Cow::Owned(take_step(s, axis, t).map_err(|m| step.err(m))?));
            }
            ins.extend(args[n_carry + n_seq..].iter().map(|&c| Cow::Borrowed(c)));
            let mut outs = self.exec(body, &body_shapes, env, ins).map_err(|e| nest(e, Some(t)))?;
            if outs.len() != n_carry + stacked.len() {
                return Err(step.err("internal: scan body returned the wrong number of values"));
            }
            let per_step = outs.split_off(n_carry);
            carries = outs.into_iter().map(Cow::Owned).collect();
            for (dst, y) in stacked.iter_mut().zip(&per_step) {
                put_step(dst, axis, t, y).map_err(|m| step.err(m))?;
            }
        }
        let mut results: Vec<Tensor> = carries.into_iter().map(Cow::into_owned).collect();
        results.extend(stacked);
        Ok(results)
    }
}

/// The attributes of a scan node, as the interpreter needs them.
struct ScanSpec<'p> {
    body: &'p Plan,
    axis: usize,
    n_carry: usize,
    n_seq: usize,
}

/// Loads one parameter and checks that the source returned what the spec asks for.
fn load_param(spec: &ParamSpec, source: &dyn ParamSource) -> Result<Tensor, IrError> {
    let err = |m: String| IrError::new(format!("parameter `{}`: {m}", spec.name));
    let t = source.load(spec).map_err(err)?;
    t.check().map_err(err)?;
    if t.dtype != spec.dtype || t.shape != spec.shape {
        let dims: Vec<String> = spec.shape.iter().map(|d| d.to_string()).collect();
        return Err(err(format!(
            "the source returned {}, expected {}[{}]",
            t.type_str(),
            spec.dtype,
            dims.join(", ")
        )));
    }
    Ok(conform(&t).into_owned())
}

/// `t` with narrow floats rounded to its dtype (the [`Tensor`] invariant); borrowed unless a
/// value actually needed rounding.
fn conform(t: &Tensor) -> Cow<'_, Tensor> {
    match &t.data {
        Data::F32(v) if t.dtype != DType::F32 => {
            let off = |x: f32| !x.is_nan() && t.dtype.round(x) != x;
            if v.iter().any(|&x| off(x)) {
                let mut r = t.clone();
                if let Data::F32(w) = &mut r.data {
                    round_all(t.dtype, w);
                }
                Cow::Owned(r)
            } else {
                Cow::Borrowed(t)
            }
        }
        _ => Cow::Borrowed(t),
    }
}

/// The spec of a parameter node, as [`Graph::params`] lists it.
fn param_spec(op: &Op) -> Option<ParamSpec> {
    match op {
        Op::Param {
            name,
            stack,
            dtype,
            shape,
        } => Some(ParamSpec {
            name: name.clone(),
            stack: stack.clone(),
            dtype: *dtype,
            shape: shape
                .iter()
                .map(|d| d.as_const().map(|c| c as usize))
                .collect::<Option<Vec<_>>>()?,
        }),
        _ => None,
    }
}

/// Compiles a (validated) graph: its live nodes in topological order, with value slots and
/// the slots to free after each step. A node is live when a graph output depends on it;
/// inputs are always live (every declared input is bound and checked).
fn compile(graph: &Graph, params: &HashMap<ParamSpec, usize>) -> Result<Plan, IrError> {
    let mut live: HashSet<NodeIndex> = HashSet::new();
    let mut stack: Vec<NodeIndex> = graph.outputs.iter().map(|o| o.value.node).collect();
    stack.extend(graph.inputs.iter().copied());
    for &n in &stack {
        if !graph.g.contains_node(n) {
            return Err(IrError::new(format!("graph refers to a removed node %{}", n.index())));
        }
    }
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(graph.operands(n).iter().map(|v| v.node));
        }
    }
    let mut base: HashMap<NodeIndex, usize> = HashMap::new();
    let mut steps = Vec::new();
    let mut n_slots = 0;
    let mut inputs = vec![usize::MAX; graph.inputs.len()];
    for n in graph.topo_order() {
        if !live.contains(&n) {
            continue;
        }
        let node = graph.node(n);
        let name = node_name(n, &node.op);
        let err = |msg: String| IrError {
            msg,
            loc: node.loc.clone(),
            node: Some(name.clone()),
        };
        let args = graph
            .operands(n)
            .iter()
            .map(|v| base.get(&v.node).map(|b| b + v.port as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| err("internal: operand not yet computed".into()))?;
        let kind = match &node.op {
            Op::Input { .. } => {
                let pos = graph
                    .inputs
                    .iter()
                    .position(|&i| i == n)
                    .ok_or_else(|| err("input node missing from the graph's input list".into()))?;
                inputs[pos] = n_slots;
                Kind::Input
            }
            op @ Op::Param { .. } => {
                let i = param_spec(op)
                    .and_then(|s| params.get(&s).copied())
                    .ok_or_else(|| err("parameter was not loaded".into()))?;
                Kind::Param(i)
            }
            Op::Scan {
                body,
                axis,
                n_carry,
                n_seq,
            } => Kind::Scan {
                body: Box::new(compile(body, params).map_err(|e| err(format!("in scan body: {e}")))?),
                axis: *axis,
                n_carry: *n_carry,
                n_seq: *n_seq,
            },
            op => Kind::Compute(op.clone()),
        };
        base.insert(n, n_slots);
        steps.push(Step {
            kind,
            args,
            out: n_slots,
            types: node.outputs.clone(),
            loc: node.loc.clone(),
            name,
            frees: Vec::new(),
        });
        n_slots += node.outputs.len();
    }
    if inputs.contains(&usize::MAX) {
        return Err(IrError::new("internal: an input was not compiled"));
    }
    let outputs = graph
        .outputs
        .iter()
        .map(|o| {
            let n_ports = graph.node(o.value.node).outputs.len();
            if (o.value.port as usize) < n_ports {
                Ok(base[&o.value.node] + o.value.port as usize)
            } else {
                Err(IrError::new(format!("output `{}` refers to a missing port", o.name)))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Liveness: each slot is freed after its last reader, or right after its producer when
    // nothing reads it; graph outputs are never freed.
    let mut last_use: Vec<usize> = Vec::with_capacity(n_slots);
    for (i, s) in steps.iter().enumerate() {
        last_use.extend(std::iter::repeat_n(i, s.types.len()));
    }
    for (i, s) in steps.iter().enumerate() {
        for &a in &s.args {
            last_use[a] = last_use[a].max(i);
        }
    }
    for (slot, &i) in last_use.iter().enumerate() {
        if !outputs.contains(&slot) {
            steps[i].frees.push(slot);
        }
    }
    Ok(Plan {
        steps,
        n_slots,
        inputs,
        outputs,
    })
}

/// Every step's concrete output shapes under `env`.
fn resolve(plan: &Plan, env: &DimEnv) -> Result<Shapes, IrError> {
    plan.steps
        .iter()
        .map(|s| {
            s.types
                .iter()
                .map(|t| eval_shape(&t.shape, env).map_err(|m| s.err(m)))
                .collect()
        })
        .collect()
}

/// The debug check: a computed value has its node's dtype and (under the binding) shape.
fn check_value(step: &Step, port: usize, t: &Tensor, shape: &[usize]) -> Result<(), IrError> {
    let ty = &step.types[port];
    let layout = t.check();
    if t.dtype != ty.dtype || t.shape != shape || layout.is_err() {
        return Err(step.err(format!(
            "value {} (port {port}) does not match the node's type {} = {}{:?}{}",
            t.type_str(),
            ty,
            ty.dtype,
            shape,
            layout.err().map(|m| format!(": {m}")).unwrap_or_default()
        )));
    }
    Ok(())
}

// ---- evaluation of the pure ops ---------------------------------------------------------------

/// Evaluates a pure op. `types`/`shapes` are the node's output types and their concrete shapes.
fn eval(
    op: &Op,
    args: &[&Tensor],
    types: &[TensorType],
    shapes: &[Vec<usize>],
    env: &DimEnv,
) -> Result<Vec<Tensor>, String> {
    let dtype = types[0].dtype;
    let shape = &shapes[0];
    let arity = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!("{} takes {n} operand(s), got {}", op.name(), args.len()))
        }
    };
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Const { value, dtype } => one(Tensor::scalar(*dtype, *value)),
        Op::DimValue { dim } => one(Tensor::from_i64(DType::I64, vec![], vec![dim.eval(env)?])),
        Op::Iota { .. } => one(iota(dtype, shape[0])),
        Op::Literal { value } => one((**value).clone()),
        Op::Unary(u) => {
            arity(1)?;
            one(unary(*u, args[0], dtype)?)
        }
        Op::Binary(b) => {
            arity(2)?;
            one(binary(*b, args[0], args[1], dtype, shape)?)
        }
        Op::Where => {
            arity(3)?;
            one(select(args[0], args[1], args[2], dtype, shape)?)
        }
        Op::Reduce { op, axes, .. } => {
            arity(1)?;
            one(reduce(*op, args[0], axes, dtype, shape)?)
        }
        Op::Reshape { .. } => {
            arity(1)?;
            one(reshape(args[0], shape)?)
        }
        Op::Permute { perm } => {
            arity(1)?;
            one(permute(args[0], perm)?)
        }
        Op::Expand { .. } => {
            arity(1)?;
            one(expand(args[0], shape)?)
        }
        Op::Slice { axis, start, end } => {
            arity(1)?;
            one(slice(args[0], *axis, start.eval(env)?, end.eval(env)?)?)
        }
        Op::Concat { axis } => one(concat(args, *axis, shape)?),
        Op::IndexSelect { axis } => {
            arity(2)?;
            one(index_select(args[0], args[1], *axis)?)
        }
        Op::GatherAlong { axis } => {
            arity(2)?;
            one(gather_along(args[0], args[1], *axis)?)
        }
        Op::ScatterAddAlong { axis } => {
            arity(3)?;
            one(scatter_add_along(args[0], args[1], args[2], *axis)?)
        }
        Op::TopK { k, axis } => {
            arity(1)?;
            topk(args[0], *k, *axis)
        }
        Op::ArgMax { axis } => {
            arity(1)?;
            one(argmax(args[0], *axis)?)
        }
        Op::Matmul => {
            arity(2)?;
            one(matmul(args[0], args[1], dtype, shape)?)
        }
        Op::Cast { to } => {
            arity(1)?;
            one(cast(args[0], *to))
        }
        Op::Fused(f) => {
            let out: Vec<(TensorType, Vec<usize>)> = types.iter().cloned().zip(shapes.iter().cloned()).collect();
            f.eval(args, &out)
        }
        Op::Input { .. } | Op::Param { .. } | Op::Scan { .. } => {
            Err(format!("internal: {} is not a pure op", op.name()))
        }
    }
}

/// Element types of [`Data`], for code written once for all of them.
trait Elem: Copy + Default + PartialOrd + 'static {
    fn view(d: &Data) -> Option<&[Self]>;
    /// A total order for TopK and ArgMax: for floats, NaN ranks above every number (as in
    /// torch) and -0 equals +0.
    fn order(a: Self, b: Self) -> Ordering;
}

impl Elem for f32 {
    fn view(d: &Data) -> Option<&[f32]> {
        match d {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }
    fn order(a: f32, b: f32) -> Ordering {
        match (a.is_nan(), b.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
        }
    }
}

impl Elem for i64 {
    fn view(d: &Data) -> Option<&[i64]> {
        match d {
            Data::I64(v) => Some(v),
            _ => None,
        }
    }
    fn order(a: i64, b: i64) -> Ordering {
        a.cmp(&b)
    }
}

impl Elem for bool {
    fn view(d: &Data) -> Option<&[bool]> {
        match d {
            Data::Bool(v) => Some(v),
            _ => None,
        }
    }
    fn order(a: bool, b: bool) -> Ordering {
        a.cmp(&b)
    }
}

/// `t`'s elements as the same element type as `like` (an operand whose data kind must match).
fn same_as<'t, T: Elem>(_like: &[T], t: &'t Tensor) -> Result<&'t [T], String> {
    T::view(&t.data).ok_or_else(|| format!("operands of different kinds ({})", t.dtype))
}

/// Applies `$body` (with `$v` bound to the elements of `$data`) and wraps the resulting
/// vector back into the same `Data` variant.
macro_rules! each_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            Data::F32($v) => Data::F32($body),
            Data::I64($v) => Data::I64($body),
            Data::Bool($v) => Data::Bool($body),
        }
    };
}

fn floats(t: &Tensor) -> Result<&[f32], String> {
    t.as_f32()
        .ok_or_else(|| format!("expected a float operand, got {}", t.dtype))
}

fn ints(t: &Tensor) -> Result<&[i64], String> {
    t.as_i64()
        .ok_or_else(|| format!("expected an integer operand, got {}", t.dtype))
}

fn bools(t: &Tensor) -> Result<&[bool], String> {
    t.as_bool()
        .ok_or_else(|| format!("expected a bool operand, got {}", t.dtype))
}

fn round_all(dtype: DType, v: &mut [f32]) {
    if dtype != DType::F32 {
        for x in v {
            *x = dtype.round(*x);
        }
    }
}

/// A result tensor of `dtype`. Float values are rounded to it here: the single rounding every
/// float result gets (storage emulation of bf16/f16/fp8).
fn finish(dtype: DType, shape: Vec<usize>, mut data: Data) -> Tensor {
    if let Data::F32(v) = &mut data {
        round_all(dtype, v);
    }
    Tensor { dtype, shape, data }
}

fn product(dims: &[usize]) -> usize {
    dims.iter().product()
}

/// `shape` around `axis`: (product before it, its size, product after it).
fn split_at_axis(shape: &[usize], axis: usize) -> Result<(usize, usize, usize), String> {
    if axis >= shape.len() {
        return Err(format!("axis {axis} is out of range for rank {}", shape.len()));
    }
    Ok((product(&shape[..axis]), shape[axis], product(&shape[axis + 1..])))
}

// ---- strided traversal ------------------------------------------------------------------------

/// A row-major walk over `shape` that reads several operands, operand `o` at
/// `base[o] + Σ idx[d]·stride[o][d]`. Size-1 dims are dropped and adjacent dims merged where
/// every operand is contiguous across them, so the innermost run (a "row") is as long as
/// possible. Rows come in row-major order: the k-th element visited is element k of a
/// contiguous result of `shape`.
struct Walk {
    /// Coalesced dims, rank >= 1.
    shape: Vec<usize>,
    /// `[operand][dim]`, same rank as `shape`.
    strides: Vec<Vec<usize>>,
    bases: Vec<usize>,
    numel: usize,
}

impl Walk {
    fn new(shape: &[usize], operands: &[(usize, Vec<usize>)]) -> Walk {
        let mut dims: Vec<usize> = Vec::new();
        let mut strides: Vec<Vec<usize>> = vec![Vec::new(); operands.len()];
        for (d, &size) in shape.iter().enumerate() {
            if size == 1 {
                continue;
            }
            // The previous (outer) dim merges with this one when, for every operand, stepping
            // it once equals stepping this one `size` times.
            let mergeable = operands
                .iter()
                .zip(&strides)
                .all(|((_, s), acc)| acc.last() == Some(&(s[d] * size)));
            match dims.last_mut() {
                Some(last) if mergeable => {
                    *last *= size;
                    for (acc, (_, s)) in strides.iter_mut().zip(operands) {
                        if let Some(l) = acc.last_mut() {
                            *l = s[d];
                        }
                    }
                }
                _ => {
                    dims.push(size);
                    for (acc, (_, s)) in strides.iter_mut().zip(operands) {
                        acc.push(s[d]);
                    }
                }
            }
        }
        if dims.is_empty() {
            dims.push(1);
            for acc in &mut strides {
                acc.push(0);
            }
        }
        Walk {
            numel: product(shape),
            shape: dims,
            strides,
            bases: operands.iter().map(|o| o.0).collect(),
        }
    }

    /// Length of a row.
    fn len(&self) -> usize {
        self.shape[self.shape.len() - 1]
    }

    /// Operand `o`'s stride along a row.
    fn inner(&self, o: usize) -> usize {
        self.strides[o][self.shape.len() - 1]
    }

    /// Calls `f` with every operand's offset at the start of each row, in row-major order.
    fn rows(&self, mut f: impl FnMut(&[usize])) {
        if self.numel == 0 {
            return;
        }
        let outer = self.shape.len() - 1;
        let mut idx = vec![0usize; outer];
        let mut offs = self.bases.clone();
        loop {
            f(&offs);
            // odometer over the outer dims
            let mut d = outer;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                for (off, s) in offs.iter_mut().zip(&self.strides) {
                    *off += s[d];
                }
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
                for (off, s) in offs.iter_mut().zip(&self.strides) {
                    *off -= s[d] * self.shape[d];
                }
            }
        }
    }

    /// Calls `f` with every operand's offset at each element, in row-major order.
    fn each(&self, mut f: impl FnMut(&[usize])) {
        let len = self.len();
        let inner: Vec<usize> = (0..self.strides.len()).map(|o| self.inner(o)).collect();
        let mut at = vec![0; inner.len()];
        self.rows(|offs| {
            for j in 0..len {
                for ((a, &o), &s) in at.iter_mut().zip(offs).zip(&inner) {
                    *a = o + j * s;
                }
                f(&at);
            }
        });
    }

    /// `[f(a[i]) for each position]` with `a` as operand 0.
    fn map1<A: Copy, O>(&self, a: &[A], f: impl Fn(A) -> O) -> Vec<O> {
        let (len, sa) = (self.len(), self.inner(0));
        let mut out = Vec::with_capacity(self.numel);
        self.rows(|o| {
            let pa = o[0];
            if sa == 1 {
                out.extend(a[pa..pa + len].iter().map(|&x| f(x)));
            } else {
                out.extend((0..len).map(|j| f(a[pa + j * sa])));
            }
        });
        out
    }

    /// `[f(a[i], b[i]) for each position]` with `a`, `b` as operands 0 and 1.
    fn map2<A: Copy, B: Copy, O>(&self, a: &[A], b: &[B], f: impl Fn(A, B) -> O) -> Vec<O> {
        let (len, sa, sb) = (self.len(), self.inner(0), self.inner(1));
        let mut out = Vec::with_capacity(self.numel);
        self.rows(|o| {
            let (pa, pb) = (o[0], o[1]);
            // the common stride patterns get slice loops (bounds checks hoisted, vectorisable)
            match (sa, sb) {
                (1, 1) => out.extend(a[pa..pa + len].iter().zip(&b[pb..pb + len]).map(|(&x, &y)| f(x, y))),
                (1, 0) => {
                    let y = b[pb];
                    out.extend(a[pa..pa + len].iter().map(|&x| f(x, y)));
                }
                (0, 1) => {
                    let x = a[pa];
                    out.extend(b[pb..pb + len].iter().map(|&y| f(x, y)));
                }
                _ => out.extend((0..len).map(|j| f(a[pa + j * sa], b[pb + j * sb]))),
            }
        });
        out
    }

    /// `[f(a[i], b[i], c[i]) for each position]` with `a`, `b`, `c` as operands 0, 1, 2.
    fn map3<A: Copy, B: Copy, C: Copy, O>(&self, a: &[A], b: &[B], c: &[C], f: impl Fn(A, B, C) -> O) -> Vec<O> {
        let (len, sa, sb, sc) = (self.len(), self.inner(0), self.inner(1), self.inner(2));
        let mut out = Vec::with_capacity(self.numel);
        self.rows(|o| {
            out.extend((0..len).map(|j| f(a[o[0] + j * sa], b[o[1] + j * sb], c[o[2] + j * sc])));
        });
        out
    }
}

/// Strides that read a contiguous tensor of shape `src` broadcast (numpy rules) to `out`:
/// 0 along the dims it is broadcast over.
fn broadcast_strides(src: &[usize], out: &[usize]) -> Result<Vec<usize>, String> {
    let fail = || format!("shape {src:?} does not broadcast to {out:?}");
    if src.len() > out.len() {
        return Err(fail());
    }
    let natural = row_major_strides(src);
    let lead = out.len() - src.len();
    out.iter()
        .enumerate()
        .map(|(i, &o)| {
            if i < lead {
                return Ok(0);
            }
            let j = i - lead;
            if src[j] == o {
                Ok(natural[j])
            } else if src[j] == 1 {
                Ok(0)
            } else {
                Err(fail())
            }
        })
        .collect()
}

// ---- defines ------------------------------------------------------------------------------------

fn iota(dtype: DType, len: usize) -> Tensor {
    let data = if dtype.is_float() {
        Data::F32((0..len).map(|i| i as f32).collect())
    } else {
        Data::I64((0..len as i64).collect())
    };
    finish(dtype, vec![len], data)
}

// ---- elementwise ------------------------------------------------------------------------------

fn sigmoid(x: f32) -> f32 {
    // never exp of a large positive number: no overflow, no cancellation
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Max/min that propagate NaN (as torch.maximum does; `f32::max` would drop it).
fn max_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

fn min_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.min(b)
    }
}

fn unary(op: UnaryOp, x: &Tensor, dtype: DType) -> Result<Tensor, String> {
    let undefined = || Err(format!("{op} is not defined on {}", x.dtype));
    let data = match &x.data {
        Data::F32(v) => {
            let f: fn(f32) -> f32 = match op {
                UnaryOp::Neg => |a| -a,
                UnaryOp::Exp => f32::exp,
                UnaryOp::Log => f32::ln,
                UnaryOp::Sqrt => f32::sqrt,
                UnaryOp::Rsqrt => |a| (1.0 / f64::from(a).sqrt()) as f32,
                UnaryOp::Recip => |a| 1.0 / a,
                UnaryOp::Sigmoid => sigmoid,
                UnaryOp::Tanh => f32::tanh,
                UnaryOp::Sin => f32::sin,
                UnaryOp::Cos => f32::cos,
                UnaryOp::Abs => f32::abs,
                UnaryOp::Not => return undefined(),
            };
            Data::F32(v.iter().map(|&a| f(a)).collect())
        }
        Data::I64(v) => match op {
            UnaryOp::Neg => Data::I64(v.iter().map(|a| a.wrapping_neg()).collect()),
            UnaryOp::Abs => Data::I64(v.iter().map(|a| a.wrapping_abs()).collect()),
            _ => return undefined(),
        },
        Data::Bool(v) => match op {
            UnaryOp::Not => Data::Bool(v.iter().map(|a| !a).collect()),
            _ => return undefined(),
        },
    };
    Ok(finish(dtype, x.shape.clone(), data))
}

/// The comparison `op` as a function, or None when `op` is not a comparison.
fn comparison<T: PartialOrd>(op: BinaryOp) -> Option<fn(T, T) -> bool> {
    Some(match op {
        BinaryOp::Lt => |a, b| a < b,
        BinaryOp::Le => |a, b| a <= b,
        BinaryOp::Gt => |a, b| a > b,
        BinaryOp::Ge => |a, b| a >= b,
        BinaryOp::Eq => |a, b| a == b,
        BinaryOp::Ne => |a, b| a != b,
        _ => return None,
    })
}

/// Integer division rounding toward -inf (Python's `//`); `b != 0`.
fn floor_div(a: i64, b: i64) -> i64 {
    let q = a.wrapping_div(b);
    if a.wrapping_rem(b) != 0 && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    }
}

/// Remainder with the sign of the divisor (Python's `%`), so `a == b * (a // b) + a % b`.
fn floor_mod(a: i64, b: i64) -> i64 {
    let r = a.wrapping_rem(b);
    if r != 0 && ((r < 0) != (b < 0)) {
        r + b
    } else {
        r
    }
}

fn binary(op: BinaryOp, a: &Tensor, b: &Tensor, dtype: DType, shape: &[usize]) -> Result<Tensor, String> {
    let walk = Walk::new(
        shape,
        &[
            (0, broadcast_strides(&a.shape, shape)?),
            (0, broadcast_strides(&b.shape, shape)?),
        ],
    );
    let undefined = || Err(format!("{op:?} is not defined on {} and {}", a.dtype, b.dtype));
    let data = match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => {
            if let Some(f) = comparison::<f32>(op) {
                Data::Bool(walk.map2(x, y, f))
            } else {
                Data::F32(match op {
                    BinaryOp::Add => walk.map2(x, y, |p, q| p + q),
                    BinaryOp::Sub => walk.map2(x, y, |p, q| p - q),
                    BinaryOp::Mul => walk.map2(x, y, |p, q| p * q),
                    BinaryOp::Div => walk.map2(x, y, |p, q| p / q),
                    BinaryOp::Max => walk.map2(x, y, max_nan),
                    BinaryOp::Min => walk.map2(x, y, min_nan),
                    BinaryOp::Pow => walk.map2(x, y, |p, q| f64::from(p).powf(f64::from(q)) as f32),
                    _ => return undefined(),
                })
            }
        }
        (Data::I64(x), Data::I64(y)) => {
            if let Some(f) = comparison::<i64>(op) {
                Data::Bool(walk.map2(x, y, f))
            } else {
                // every element of `y` is read when the result is not empty
                let divides = matches!(op, BinaryOp::Div | BinaryOp::Mod);
                if divides && walk.numel > 0 && y.contains(&0) {
                    return Err("integer division by zero".into());
                }
                if op == BinaryOp::Pow && walk.numel > 0 && y.iter().any(|&e| e < 0) {
                    return Err("integer power with a negative exponent".into());
                }
                Data::I64(match op {
                    BinaryOp::Add => walk.map2(x, y, i64::wrapping_add),
                    BinaryOp::Sub => walk.map2(x, y, i64::wrapping_sub),
                    BinaryOp::Mul => walk.map2(x, y, i64::wrapping_mul),
                    BinaryOp::Div => walk.map2(x, y, floor_div),
                    BinaryOp::Mod => walk.map2(x, y, floor_mod),
                    BinaryOp::Max => walk.map2(x, y, i64::max),
                    BinaryOp::Min => walk.map2(x, y, i64::min),
                    BinaryOp::Pow => walk.map2(x, y, |p, q| p.wrapping_pow(q.min(u32::MAX as i64) as u32)),
                    _ => return undefined(),
                })
            }
        }
        (Data::Bool(x), Data::Bool(y)) => Data::Bool(match op {
            BinaryOp::And => walk.map2(x, y, |p, q| p && q),
            BinaryOp::Or => walk.map2(x, y, |p, q| p || q),
            _ => match comparison::<bool>(op) {
                Some(f) => walk.map2(x, y, f),
                None => return undefined(),
            },
        }),
        _ => return undefined(),
    };
    Ok(finish(dtype, shape.to_vec(), data))
}

/// `where(cond, a, b)` with broadcasting.
fn select(cond: &Tensor, a: &Tensor, b: &Tensor, dtype: DType, shape: &[usize]) -> Result<Tensor, String> {
    let walk = Walk::new(
        shape,
        &[
            (0, broadcast_strides(&cond.shape, shape)?),
            (0, broadcast_strides(&a.shape, shape)?),
            (0, broadcast_strides(&b.shape, shape)?),
        ],
    );
    let c = bools(cond)?;
    let data = each_data!(&a.data, x => walk.map3(c, x, same_as(x, b)?, |c, p, q| if c { p } else { q }));
    Ok(finish(dtype, shape.to_vec(), data))
}

// ---- reduce -----------------------------------------------------------------------------------

/// Folds `x` (operand 0 of `walk`) into `n_out` accumulators (operand 1, stride 0 along the
/// reduced dims), starting from `init`.
fn fold<A: Copy, S: Copy>(walk: &Walk, x: &[A], n_out: usize, init: S, f: impl Fn(S, A) -> S) -> Vec<S> {
    let mut acc = vec![init; n_out];
    let (len, si, so) = (walk.len(), walk.inner(0), walk.inner(1));
    walk.rows(|o| {
        let (pi, po) = (o[0], o[1]);
        if so == 0 {
            // a row reduced into one accumulator: sequential, in index order
            let mut s = acc[po];
            for j in 0..len {
                s = f(s, x[pi + j * si]);
            }
            acc[po] = s;
        } else {
            for j in 0..len {
                acc[po + j * so] = f(acc[po + j * so], x[pi + j * si]);
            }
        }
    });
    acc
}

fn reduce(op: ReduceOp, x: &Tensor, axes: &[usize], dtype: DType, shape: &[usize]) -> Result<Tensor, String> {
    let mut kept = x.shape.clone();
    for &a in axes {
        *kept
            .get_mut(a)
            .ok_or_else(|| format!("axis {a} is out of range for rank {}", x.shape.len()))? = 1;
    }
    let n_out = product(&kept);
    if op == ReduceOp::Max && n_out > 0 && axes.iter().any(|&a| x.shape[a] == 0) {
        return Err("max over an empty axis".into());
    }
    let mut out_strides = row_major_strides(&kept);
    for &a in axes {
        out_strides[a] = 0;
    }
    let walk = Walk::new(&x.shape, &[(0, x.strides()), (0, out_strides)]);
    let data = match (&x.data, op) {
        (Data::F32(v), ReduceOp::Sum) => {
            let acc = fold(&walk, v, n_out, 0f64, |s, a| s + f64::from(a));
            Data::F32(acc.into_iter().map(|s| s as f32).collect())
        }
        (Data::F32(v), ReduceOp::Max) => Data::F32(fold(&walk, v, n_out, f32::NEG_INFINITY, max_nan)),
        (Data::I64(v), ReduceOp::Sum) => Data::I64(fold(&walk, v, n_out, 0, i64::wrapping_add)),
        (Data::I64(v), ReduceOp::Max) => Data::I64(fold(&walk, v, n_out, i64::MIN, i64::max)),
        (Data::Bool(_), _) => return Err(format!("reduce {op:?} is not defined on bool")),
    };
    if n_out != product(shape) {
        return Err(format!(
            "internal: reduce result of {n_out} elements for shape {shape:?}"
        ));
    }
    Ok(finish(dtype, shape.to_vec(), data))
}

// ---- movement ---------------------------------------------------------------------------------

fn reshape(x: &Tensor, shape: &[usize]) -> Result<Tensor, String> {
    if product(shape) != x.numel() {
        return Err(format!("cannot reshape {} into {shape:?}", x.type_str()));
    }
    Ok(Tensor {
        dtype: x.dtype,
        shape: shape.to_vec(),
        data: x.data.clone(),
    })
}

/// A strided copy of `x`: the contiguous result of `shape` reading `x` at `base + Σ idx·strides`.
fn gather_strided(x: &Tensor, shape: Vec<usize>, base: usize, strides: Vec<usize>) -> Tensor {
    let walk = Walk::new(&shape, &[(base, strides)]);
    let data = each_data!(&x.data, v => walk.map1(v, |e| e));
    Tensor {
        dtype: x.dtype,
        shape,
        data,
    }
}

fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor, String> {
    let mut sorted = perm.to_vec();
    sorted.sort_unstable();
    if sorted != (0..x.shape.len()).collect::<Vec<_>>() {
        return Err(format!("{perm:?} is not a permutation of {} axes", x.shape.len()));
    }
    let strides = x.strides();
    let shape = perm.iter().map(|&p| x.shape[p]).collect();
    Ok(gather_strided(x, shape, 0, perm.iter().map(|&p| strides[p]).collect()))
}

fn expand(x: &Tensor, shape: &[usize]) -> Result<Tensor, String> {
    Ok(gather_strided(
        x,
        shape.to_vec(),
        0,
        broadcast_strides(&x.shape, shape)?,
    ))
}

fn slice(x: &Tensor, axis: usize, start: i64, end: i64) -> Result<Tensor, String> {
    let (_, n, _) = split_at_axis(&x.shape, axis)?;
    if start < 0 || end < start || end > n as i64 {
        return Err(format!("slice {start}..{end} is out of range for dimension {n}"));
    }
    let strides = x.strides();
    let mut shape = x.shape.clone();
    shape[axis] = (end - start) as usize;
    Ok(gather_strided(x, shape, start as usize * strides[axis], strides))
}

fn concat(xs: &[&Tensor], axis: usize, shape: &[usize]) -> Result<Tensor, String> {
    let first = xs.first().ok_or("concat of nothing")?;
    let (outer, _, inner) = split_at_axis(shape, axis)?;
    for x in xs {
        let same_elsewhere = x.shape.len() == shape.len()
            && x.shape
                .iter()
                .zip(shape)
                .enumerate()
                .all(|(i, (a, b))| i == axis || a == b);
        if !same_elsewhere {
            return Err(format!(
                "cannot concat {} into {shape:?} along axis {axis}",
                x.type_str()
            ));
        }
    }
    let data = each_data!(&first.data, v => concat_t(v, xs, axis, outer, inner)?);
    if data_len(&data) != product(shape) {
        return Err("internal: concat sizes do not add up".into());
    }
    Ok(Tensor {
        dtype: first.dtype,
        shape: shape.to_vec(),
        data,
    })
}

fn concat_t<T: Elem>(like: &[T], xs: &[&Tensor], axis: usize, outer: usize, inner: usize) -> Result<Vec<T>, String> {
    let parts = xs
        .iter()
        .map(|x| Ok((same_as(like, x)?, x.shape[axis] * inner)))
        .collect::<Result<Vec<_>, String>>()?;
    let mut out = Vec::with_capacity(outer * parts.iter().map(|p| p.1).sum::<usize>());
    for o in 0..outer {
        for &(v, chunk) in &parts {
            out.extend_from_slice(&v[o * chunk..(o + 1) * chunk]);
        }
    }
    Ok(out)
}

fn data_len(d: &Data) -> usize {
    match d {
        Data::F32(v) => v.len(),
        Data::I64(v) => v.len(),
        Data::Bool(v) => v.len(),
    }
}

// ---- indexing ---------------------------------------------------------------------------------

/// Checks that every index lies in `0..n`.
fn check_indices(ids: &[i64], n: usize, axis: usize) -> Result<(), String> {
    match ids.iter().find(|&&i| i < 0 || i as u64 >= n as u64) {
        Some(i) => Err(format!("index {i} is out of range for axis {axis} of size {n}")),
        None => Ok(()),
    }
}

/// `take(x, idx, axis)`: out shape `x[..axis] ++ idx ++ x[axis+1..]`.
fn index_select(x: &Tensor, idx: &Tensor, axis: usize) -> Result<Tensor, String> {
    let ids = ints(idx)?;
    let (outer, n, inner) = split_at_axis(&x.shape, axis)?;
    check_indices(ids, n, axis)?;
    let mut shape = x.shape[..axis].to_vec();
    shape.extend_from_slice(&idx.shape);
    shape.extend_from_slice(&x.shape[axis + 1..]);
    let data = each_data!(&x.data, v => {
        let mut out = Vec::with_capacity(outer * ids.len() * inner);
        for o in 0..outer {
            for &i in ids {
                let at = (o * n + i as usize) * inner;
                out.extend_from_slice(&v[at..at + inner]);
            }
        }
        out
    });
    Ok(Tensor {
        dtype: x.dtype,
        shape,
        data,
    })
}

/// Shapes of x and idx for the along-axis ops: (pre, n, m, post) where x is [pre, n, post] and
/// idx is [pre, m, post] around `axis`.
fn along_dims(x: &Tensor, idx: &Tensor, axis: usize) -> Result<(usize, usize, usize, usize), String> {
    let (pre, n, post) = split_at_axis(&x.shape, axis)?;
    let agree = idx.shape.len() == x.shape.len()
        && x.shape
            .iter()
            .zip(&idx.shape)
            .enumerate()
            .all(|(i, (a, b))| i == axis || a == b);
    if !agree {
        return Err(format!(
            "indices {} do not fit {} along axis {axis}",
            idx.type_str(),
            x.type_str()
        ));
    }
    Ok((pre, n, idx.shape[axis], post))
}

/// `take_along_axis(x, idx, axis)`: `out[p, j, q] = x[p, idx[p, j, q], q]`.
fn gather_along(x: &Tensor, idx: &Tensor, axis: usize) -> Result<Tensor, String> {
    let ids = ints(idx)?;
    let (pre, n, m, post) = along_dims(x, idx, axis)?;
    check_indices(ids, n, axis)?;
    let data = each_data!(&x.data, v => {
        let mut out = Vec::with_capacity(ids.len());
        for p in 0..pre {
            for j in 0..m {
                for q in 0..post {
                    let i = ids[(p * m + j) * post + q] as usize;
                    out.push(v[(p * n + i) * post + q]);
                }
            }
        }
        out
    });
    Ok(Tensor {
        dtype: x.dtype,
        shape: idx.shape.clone(),
        data,
    })
}

/// `out = x; out[p, idx[p, j, q], q] += src[p, j, q]`; float sums in f64, rounded once.
fn scatter_add_along(x: &Tensor, idx: &Tensor, src: &Tensor, axis: usize) -> Result<Tensor, String> {
    let ids = ints(idx)?;
    let (pre, n, m, post) = along_dims(x, idx, axis)?;
    if src.shape != idx.shape {
        return Err(format!(
            "scatter source {} must have the indices' shape",
            src.type_str()
        ));
    }
    check_indices(ids, n, axis)?;
    // (destination offset in x, source offset) for every source element
    let pairs = (0..pre).flat_map(|p| {
        (0..m * post).map(move |jq| {
            let s = p * m * post + jq;
            ((p * n + ids[s] as usize) * post + jq % post, s)
        })
    });
    let data = match (&x.data, &src.data) {
        (Data::F32(v), Data::F32(s)) => {
            let mut acc: Vec<f64> = v.iter().map(|&a| f64::from(a)).collect();
            for (d, i) in pairs {
                acc[d] += f64::from(s[i]);
            }
            Data::F32(acc.into_iter().map(|a| a as f32).collect())
        }
        (Data::I64(v), Data::I64(s)) => {
            let mut acc = v.clone();
            for (d, i) in pairs {
                acc[d] = acc[d].wrapping_add(s[i]);
            }
            Data::I64(acc)
        }
        _ => return Err(format!("scatter-add is not defined on {} and {}", x.dtype, src.dtype)),
    };
    Ok(finish(x.dtype, x.shape.clone(), data))
}

/// The `k` largest along `axis`, descending, ties to the lower index: (values, i64 indices).
fn topk(x: &Tensor, k: usize, axis: usize) -> Result<Vec<Tensor>, String> {
    let (pre, n, post) = split_at_axis(&x.shape, axis)?;
    if k > n {
        return Err(format!("top-{k} of a dimension of {n}"));
    }
    let mut shape = x.shape.clone();
    shape[axis] = k;
    let mut ids = vec![0i64; pre * k * post];
    let values = each_data!(&x.data, v => topk_t(v, (pre, n, post), k, &mut ids));
    Ok(vec![
        Tensor {
            dtype: x.dtype,
            shape: shape.clone(),
            data: values,
        },
        Tensor {
            dtype: DType::I64,
            shape,
            data: Data::I64(ids),
        },
    ])
}

fn topk_t<T: Elem>(v: &[T], (pre, n, post): (usize, usize, usize), k: usize, ids: &mut [i64]) -> Vec<T> {
    let mut vals = vec![T::default(); pre * k * post];
    let mut order: Vec<usize> = Vec::with_capacity(n);
    for p in 0..pre {
        for q in 0..post {
            let at = |i: usize| v[(p * n + i) * post + q];
            // a strict total order: larger first, then lower index first
            let cmp = |&i: &usize, &j: &usize| T::order(at(j), at(i)).then(i.cmp(&j));
            order.clear();
            order.extend(0..n);
            if k > 0 && k < n {
                order.select_nth_unstable_by(k - 1, cmp);
            }
            order[..k].sort_unstable_by(cmp);
            for (r, &i) in order[..k].iter().enumerate() {
                let o = (p * k + r) * post + q;
                vals[o] = at(i);
                ids[o] = i as i64;
            }
        }
    }
    vals
}

/// Index of the largest element along `axis` (the first of equals); the axis is removed.
fn argmax(x: &Tensor, axis: usize) -> Result<Tensor, String> {
    let (pre, n, post) = split_at_axis(&x.shape, axis)?;
    if n == 0 && pre * post > 0 {
        return Err("argmax over an empty axis".into());
    }
    let ids = match &x.data {
        Data::F32(v) => argmax_t(v, pre, n, post),
        Data::I64(v) => argmax_t(v, pre, n, post),
        Data::Bool(v) => argmax_t(v, pre, n, post),
    };
    let mut shape = x.shape.clone();
    shape.remove(axis);
    Ok(Tensor {
        dtype: DType::I64,
        shape,
        data: Data::I64(ids),
    })
}

fn argmax_t<T: Elem>(v: &[T], pre: usize, n: usize, post: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(pre * post);
    for p in 0..pre {
        for q in 0..post {
            let at = |i: usize| v[(p * n + i) * post + q];
            let mut best = 0;
            for i in 1..n {
                if T::order(at(i), at(best)) == Ordering::Greater {
                    best = i;
                }
            }
            out.push(best as i64);
        }
    }
    out
}

// ---- matmul / cast ----------------------------------------------------------------------------

/// `[.., M, K] @ [.., K, N]` with broadcast batch dims; dot products accumulate in f64 and each
/// result is rounded once (to f32, then to `dtype`).
pub(crate) fn matmul(a: &Tensor, b: &Tensor, dtype: DType, shape: &[usize]) -> Result<Tensor, String> {
    let (x, y) = (floats(a)?, floats(b)?);
    let (ra, rb, r) = (a.shape.len(), b.shape.len(), shape.len());
    if ra < 2 || rb < 2 || r < 2 {
        return Err("matmul needs rank >= 2 operands".into());
    }
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let (kb, n) = (b.shape[rb - 2], b.shape[rb - 1]);
    if k != kb || shape[r - 2] != m || shape[r - 1] != n {
        return Err(format!(
            "matmul of {} and {} into {shape:?}",
            a.type_str(),
            b.type_str()
        ));
    }
    let batch = &shape[..r - 2];
    let scale = |s: Vec<usize>, by: usize| s.into_iter().map(|v| v * by).collect::<Vec<_>>();
    let sa = scale(broadcast_strides(&a.shape[..ra - 2], batch)?, m * k);
    let sb = scale(broadcast_strides(&b.shape[..rb - 2], batch)?, k * n);
    let mut out = vec![0f32; product(shape)];
    let mut c = 0;
    Walk::new(batch, &[(0, sa), (0, sb)]).each(|o| {
        gemm(
            &x[o[0]..o[0] + m * k],
            &y[o[1]..o[1] + k * n],
            (m, k, n),
            &mut out[c..c + m * n],
        );
        c += m * n;
    });
    Ok(finish(dtype, shape.to_vec(), Data::F32(out)))
}

/// `c[m×n] = a[m×k] · b[k×n]`, all row-major, f64 accumulation.
///
/// Loop order: column panels of `b` (converted to f64 once, sized to stay in L2) × groups of
/// four rows of `a` × k × the panel's columns. Each loaded element of `b` serves four rows,
/// and the innermost loops run over contiguous memory, so they vectorise.
fn gemm(a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize), c: &mut [f32]) {
    const ROWS: usize = 4;
    const PANEL_BYTES: usize = 512 * 1024;
    if m == 0 || n == 0 {
        return;
    }
    let width = (PANEL_BYTES / (8 * k.max(1))).clamp(16, 1024).min(n);
    let mut panel: Vec<f64> = Vec::with_capacity(k * width);
    let mut acc = vec![0f64; ROWS * width];
    for j0 in (0..n).step_by(width) {
        let w = width.min(n - j0);
        panel.clear();
        for kk in 0..k {
            panel.extend(b[kk * n + j0..kk * n + j0 + w].iter().map(|&v| f64::from(v)));
        }
        for i0 in (0..m).step_by(ROWS) {
            let rows = ROWS.min(m - i0);
            let acc = &mut acc[..rows * w];
            acc.fill(0.0);
            if rows == ROWS {
                let (r0, rest) = acc.split_at_mut(w);
                let (r1, rest) = rest.split_at_mut(w);
                let (r2, r3) = rest.split_at_mut(w);
                for kk in 0..k {
                    let brow = &panel[kk * w..(kk + 1) * w];
                    let av = |r: usize| f64::from(a[(i0 + r) * k + kk]);
                    let (a0, a1, a2, a3) = (av(0), av(1), av(2), av(3));
                    for (j, &bv) in brow.iter().enumerate() {
                        r0[j] += a0 * bv;
                        r1[j] += a1 * bv;
                        r2[j] += a2 * bv;
                        r3[j] += a3 * bv;
                    }
                }
            } else {
                for kk in 0..k {
                    let brow = &panel[kk * w..(kk + 1) * w];
                    for (r, row) in acc.chunks_exact_mut(w).enumerate() {
                        let av = f64::from(a[(i0 + r) * k + kk]);
                        for (s, &bv) in row.iter_mut().zip(brow) {
                            *s += av * bv;
                        }
                    }
                }
            }
            for (r, row) in acc.chunks_exact(w).enumerate() {
                let dst = &mut c[(i0 + r) * n + j0..(i0 + r) * n + j0 + w];
                for (d, &s) in dst.iter_mut().zip(row) {
                    *d = s as f32;
                }
            }
        }
    }
}

/// Float → int truncates toward zero, saturating like `as` (NaN → 0; i32 to its range);
/// int → float rounds to the dtype; bool ↔ number: nonzero is true, true is 1.
fn cast(x: &Tensor, to: DType) -> Tensor {
    let data = match &x.data {
        Data::F32(v) => match to {
            d if d.is_float() => Data::F32(v.clone()),
            DType::I32 => Data::I64(v.iter().map(|&f| f as i32 as i64).collect()),
            DType::I64 => Data::I64(v.iter().map(|&f| f as i64).collect()),
            _ => Data::Bool(v.iter().map(|&f| f != 0.0).collect()),
        },
        Data::I64(v) => match to {
            d if d.is_float() => Data::F32(v.iter().map(|&i| i as f32).collect()),
            DType::I32 => Data::I64(v.iter().map(|&i| i as i32 as i64).collect()),
            DType::I64 => Data::I64(v.clone()),
            _ => Data::Bool(v.iter().map(|&i| i != 0).collect()),
        },
        Data::Bool(v) => match to {
            d if d.is_float() => Data::F32(v.iter().map(|&t| if t { 1.0 } else { 0.0 }).collect()),
            d if d.is_int() => Data::I64(v.iter().map(|&t| t as i64).collect()),
            _ => Data::Bool(v.clone()),
        },
    };
    finish(to, x.shape.clone(), data)
}

// ---- scan helpers -----------------------------------------------------------------------------

/// `x[.., t, ..]` along `axis`, the axis removed.
fn take_step(x: &Tensor, axis: usize, t: usize) -> Result<Tensor, String> {
    let (pre, len, post) = split_at_axis(&x.shape, axis)?;
    if t >= len {
        return Err(format!("internal: scan step {t} of {len}"));
    }
    let mut shape = x.shape.clone();
    shape.remove(axis);
    let data = each_data!(&x.data, v => {
        let mut out = Vec::with_capacity(pre * post);
        for p in 0..pre {
            let at = (p * len + t) * post;
            out.extend_from_slice(&v[at..at + post]);
        }
        out
    });
    Ok(Tensor {
        dtype: x.dtype,
        shape,
        data,
    })
}

/// Writes one step's output `y` at position `t` of `out`, which stacks steps along `axis`.
fn put_step(out: &mut Tensor, axis: usize, t: usize, y: &Tensor) -> Result<(), String> {
    let (pre, len, post) = split_at_axis(&out.shape, axis)?;
    let mut expect = out.shape.clone();
    expect.remove(axis);
    if y.shape != expect || y.dtype != out.dtype || t >= len {
        return Err(format!(
            "internal: scan step output {} does not fit {}",
            y.type_str(),
            out.type_str()
        ));
    }
    fn put<T: Copy>(dst: &mut [T], src: &[T], (pre, len, post): (usize, usize, usize), t: usize) {
        for p in 0..pre {
            let at = (p * len + t) * post;
            dst[at..at + post].copy_from_slice(&src[p * post..(p + 1) * post]);
        }
    }
    match (&mut out.data, &y.data) {
        (Data::F32(d), Data::F32(s)) => put(d, s, (pre, len, post), t),
        (Data::I64(d), Data::I64(s)) => put(d, s, (pre, len, post), t),
        (Data::Bool(d), Data::Bool(s)) => put(d, s, (pre, len, post), t),
        _ => return Err("internal: scan step output of the wrong kind".into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Value;
    use crate::op::{InputKind, Stack};
    use crate::shape::Dim;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    // ---- helpers ------------------------------------------------------------------------------

    struct NoParams;
    impl ParamSource for NoParams {
        fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
            Err(format!("no parameter `{}`", spec.name))
        }
    }

    /// Parameters by (pattern) name.
    struct Table(HashMap<String, Tensor>);
    impl ParamSource for Table {
        fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
            self.0
                .get(&spec.name)
                .cloned()
                .ok_or_else(|| format!("not in the table: {}", spec.name))
        }
    }

    fn dims(v: &[i64]) -> Shape {
        v.iter().map(|&d| Dim::constant(d)).collect()
    }

    fn sym(s: &str) -> Dim {
        Dim::sym(s)
    }

    fn input(g: &mut Graph, name: &str, dtype: DType, shape: Shape) -> Value {
        g.add1(
            Op::Input {
                name: name.into(),
                kind: InputKind::Data,
                dtype,
                shape,
            },
            &[],
            None,
        )
        .unwrap()
    }

    /// An unstacked parameter `name` of `dtype` and `shape`.
    fn param(g: &mut Graph, name: &str, dtype: DType, shape: Shape) -> Value {
        let op = Op::Param {
            name: name.into(),
            stack: None,
            dtype,
            shape,
        };
        g.add1(op, &[], None).unwrap()
    }

    fn node(g: &mut Graph, op: Op, args: &[Value]) -> Value {
        g.add1(op, args, None).unwrap()
    }

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Values in ±[0.1, 2): never zero, random sign.
    fn nonzero(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let m = r.random_range(0.1f32..2.0);
                if r.random_bool(0.5) {
                    m
                } else {
                    -m
                }
            })
            .collect()
    }

    fn positive(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| r.random_range(0.1f32..3.0)).collect()
    }

    fn ft(shape: &[usize], data: Vec<f32>) -> Tensor {
        Tensor::from_f32(DType::F32, shape.to_vec(), data)
    }

    fn it(shape: &[usize], data: Vec<i64>) -> Tensor {
        Tensor::from_i64(DType::I64, shape.to_vec(), data)
    }

    fn feed(ins: Vec<(&str, Tensor)>) -> HashMap<String, Tensor> {
        ins.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    fn run(g: &Graph, ins: Vec<(&str, Tensor)>) -> Result<HashMap<String, Tensor>, IrError> {
        Interpreter::new(g, &NoParams)?.run(&feed(ins))
    }

    /// Makes `v` the output `y`, runs, returns `y`.
    fn eval1(g: &Graph, v: Value, ins: Vec<(&str, Tensor)>) -> Tensor {
        let mut g = g.clone();
        g.outputs.clear();
        g.add_output("y", v, InputKind::Data);
        run(&g, ins).unwrap().remove("y").unwrap()
    }

    fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
        let mut idx = vec![0; shape.len()];
        for d in (0..shape.len()).rev() {
            idx[d] = flat % shape[d];
            flat /= shape[d];
        }
        idx
    }

    fn ravel(idx: &[usize], shape: &[usize]) -> usize {
        idx.iter().zip(shape).fold(0, |f, (&i, &s)| f * s + i)
    }

    /// Flat index into an operand of `shape` read broadcast at output position `out_idx`.
    fn bidx(out_idx: &[usize], shape: &[usize]) -> usize {
        let lead = out_idx.len() - shape.len();
        let idx: Vec<usize> = shape
            .iter()
            .enumerate()
            .map(|(j, &s)| if s == 1 { 0 } else { out_idx[lead + j] })
            .collect();
        ravel(&idx, shape)
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "lengths differ");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = (f64::from(g) - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan());
            assert!(ok, "element {i}: got {g}, want {w}");
        }
    }

    fn f(t: &Tensor) -> &[f32] {
        t.as_f32().unwrap()
    }

    fn i(t: &Tensor) -> &[i64] {
        t.as_i64().unwrap()
    }

    fn b(t: &Tensor) -> &[bool] {
        t.as_bool().unwrap()
    }

    // ---- elementwise --------------------------------------------------------------------------

    #[test]
    fn unary_float_ops() {
        let mut r = rng(1);
        let xs = nonzero(&mut r, 15);
        let xp = positive(&mut r, 15);
        type F = fn(f64) -> f64;
        let cases: [(UnaryOp, F, bool); 11] = [
            (UnaryOp::Neg, |x| -x, false),
            (UnaryOp::Exp, f64::exp, false),
            (UnaryOp::Log, f64::ln, true),
            (UnaryOp::Sqrt, f64::sqrt, true),
            (UnaryOp::Rsqrt, |x| 1.0 / x.sqrt(), true),
            (UnaryOp::Recip, |x| 1.0 / x, false),
            (UnaryOp::Sigmoid, |x| 1.0 / (1.0 + (-x).exp()), false),
            (UnaryOp::Tanh, f64::tanh, false),
            (UnaryOp::Sin, f64::sin, false),
            (UnaryOp::Cos, f64::cos, false),
            (UnaryOp::Abs, f64::abs, false),
        ];
        for (op, reference, needs_positive) in cases {
            let data = if needs_positive { xp.clone() } else { xs.clone() };
            let mut g = Graph::new();
            let x = input(&mut g, "x", DType::F32, dims(&[3, 5]));
            let y = node(&mut g, Op::Unary(op), &[x]);
            let got = eval1(&g, y, vec![("x", ft(&[3, 5], data.clone()))]);
            let want: Vec<f64> = data.iter().map(|&v| reference(f64::from(v))).collect();
            assert_eq!(got.shape, vec![3, 5]);
            assert_close(f(&got), &want, 1e-6);
        }
        // sigmoid far out on both sides: finite, no overflow
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[4]));
        let y = node(&mut g, Op::Unary(UnaryOp::Sigmoid), &[x]);
        let got = eval1(&g, y, vec![("x", ft(&[4], vec![-100.0, -20.0, 20.0, 100.0]))]);
        let want: Vec<f64> = [-100.0f64, -20.0, 20.0, 100.0]
            .iter()
            .map(|x| 1.0 / (1.0 + (-x).exp()))
            .collect();
        assert!(f(&got).iter().all(|v| v.is_finite()));
        assert!((f64::from(f(&got)[0]) - want[0]).abs() < 1e-45 && f(&got)[0] > 0.0);
        assert_close(f(&got), &want, 1e-7);
        // bf16: computed in f32, rounded once to bf16
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::BF16, dims(&[15]));
        let y = node(&mut g, Op::Unary(UnaryOp::Exp), &[x]);
        let xb = Tensor::from_f32(DType::BF16, vec![15], xs.clone());
        let got = eval1(&g, y, vec![("x", xb.clone())]);
        assert_eq!(got.dtype, DType::BF16);
        let want: Vec<f32> = f(&xb).iter().map(|&v| DType::BF16.round(v.exp())).collect();
        assert_eq!(f(&got), &want[..]);
    }

    #[test]
    fn int_and_bool_unary() {
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::I64, dims(&[4]));
        let neg = node(&mut g, Op::Unary(UnaryOp::Neg), &[x]);
        let abs = node(&mut g, Op::Unary(UnaryOp::Abs), &[x]);
        let xv = vec![3, -4, 7, i64::MIN];
        assert_eq!(
            i(&eval1(&g, neg, vec![("x", it(&[4], xv.clone()))])),
            &[-3, 4, -7, i64::MIN]
        );
        assert_eq!(i(&eval1(&g, abs, vec![("x", it(&[4], xv))])), &[3, 4, 7, i64::MIN]);
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::Bool, dims(&[3]));
        let y = node(&mut g, Op::Unary(UnaryOp::Not), &[x]);
        let got = eval1(&g, y, vec![("x", Tensor::from_bool(vec![3], vec![true, false, true]))]);
        assert_eq!(b(&got), &[false, true, false]);
    }

    #[test]
    fn binary_float_ops_broadcast() {
        let mut r = rng(2);
        let (sa, sb, so) = ([2usize, 3, 1, 5], [4usize, 1], [2usize, 3, 4, 5]);
        let av = nonzero(&mut r, 30);
        let mut bv = nonzero(&mut r, 4);
        bv[0] = av[0]; // one equal pair, so Eq/Le/Ge see a tie
        let n: usize = so.iter().product();
        let pairs: Vec<(f64, f64)> = (0..n)
            .map(|k| {
                let idx = unravel(k, &so);
                (f64::from(av[bidx(&idx, &sa)]), f64::from(bv[bidx(&idx, &sb)]))
            })
            .collect();
        type F = fn(f64, f64) -> f64;
        let arith: [(BinaryOp, F); 7] = [
            (BinaryOp::Add, |x, y| x + y),
            (BinaryOp::Sub, |x, y| x - y),
            (BinaryOp::Mul, |x, y| x * y),
            (BinaryOp::Div, |x, y| x / y),
            (BinaryOp::Max, f64::max),
            (BinaryOp::Min, f64::min),
            (BinaryOp::Pow, |x, y| x.abs().powf(y)),
        ];
        for (op, reference) in arith {
            let mut g = Graph::new();
            let mut a = input(&mut g, "a", DType::F32, dims(&[2, 3, 1, 5]));
            let bb = input(&mut g, "b", DType::F32, dims(&[4, 1]));
            if op == BinaryOp::Pow {
                a = node(&mut g, Op::Unary(UnaryOp::Abs), &[a]);
            }
            let y = node(&mut g, Op::Binary(op), &[a, bb]);
            let got = eval1(&g, y, vec![("a", ft(&sa, av.clone())), ("b", ft(&sb, bv.clone()))]);
            assert_eq!(got.shape, so.to_vec(), "{op:?}");
            let want: Vec<f64> = pairs.iter().map(|&(x, y)| reference(x, y)).collect();
            assert_close(f(&got), &want, 1e-6);
        }
        type C = fn(f64, f64) -> bool;
        let cmps: [(BinaryOp, C); 6] = [
            (BinaryOp::Lt, |x, y| x < y),
            (BinaryOp::Le, |x, y| x <= y),
            (BinaryOp::Gt, |x, y| x > y),
            (BinaryOp::Ge, |x, y| x >= y),
            (BinaryOp::Eq, |x, y| x == y),
            (BinaryOp::Ne, |x, y| x != y),
        ];
        for (op, reference) in cmps {
            let mut g = Graph::new();
            let a = input(&mut g, "a", DType::F32, dims(&[2, 3, 1, 5]));
            let bb = input(&mut g, "b", DType::F32, dims(&[4, 1]));
            let y = node(&mut g, Op::Binary(op), &[a, bb]);
            let got = eval1(&g, y, vec![("a", ft(&sa, av.clone())), ("b", ft(&sb, bv.clone()))]);
            assert_eq!(got.dtype, DType::Bool);
            let want: Vec<bool> = pairs.iter().map(|&(x, y)| reference(x, y)).collect();
            assert_eq!(b(&got), &want[..], "{op:?}");
        }
        // a scalar constant broadcasts; bf16 + f32 promotes to f32 without rounding to bf16
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::BF16, dims(&[2, 3]));
        let c = node(
            &mut g,
            Op::Const {
                value: 0.001,
                dtype: DType::F32,
            },
            &[],
        );
        let y = node(&mut g, Op::Binary(BinaryOp::Add), &[x, c]);
        let xb = Tensor::from_f32(DType::BF16, vec![2, 3], av[..6].to_vec());
        let got = eval1(&g, y, vec![("x", xb.clone())]);
        assert_eq!(got.dtype, DType::F32);
        let want: Vec<f32> = f(&xb).iter().map(|&v| v + 0.001f32).collect();
        assert_eq!(f(&got), &want[..]);
    }

    #[test]
    fn int_floor_div_and_mod_signs() {
        let a = vec![7, -7, 7, -7, 6, -6, 1, i64::MIN];
        let d = vec![2, 2, -2, -2, 3, 3, 5, -1];
        let mut g = Graph::new();
        let x = input(&mut g, "a", DType::I32, dims(&[8]));
        let y = input(&mut g, "b", DType::I32, dims(&[8]));
        let div = node(&mut g, Op::Binary(BinaryOp::Div), &[x, y]);
        let rem = node(&mut g, Op::Binary(BinaryOp::Mod), &[x, y]);
        let i32t = |v: Vec<i64>| Tensor::from_i64(DType::I32, vec![8], v);
        let ins = || vec![("a", i32t(a.clone())), ("b", i32t(d.clone()))];
        let q = eval1(&g, div, ins());
        let m = eval1(&g, rem, ins());
        assert_eq!(q.dtype, DType::I32);
        assert_eq!(i(&q), &[3, -4, -4, 3, 2, -2, 0, i64::MIN]); // the last wraps, no panic
        assert_eq!(i(&m), &[1, 1, -1, -1, 0, 0, 1, 0]);
        for k in 0..7 {
            assert_eq!(d[k] * i(&q)[k] + i(&m)[k], a[k], "a == b*(a//b) + a%b");
        }
        // other int ops, broadcast [3,1] with [4]
        let mut r = rng(3);
        let av: Vec<i64> = (0..3).map(|_| r.random_range(-9i64..=9)).collect();
        let bv: Vec<i64> = (0..4).map(|_| r.random_range(1i64..=4)).collect();
        type F = fn(i64, i64) -> i64;
        let ops: [(BinaryOp, F); 6] = [
            (BinaryOp::Add, |x, y| x + y),
            (BinaryOp::Sub, |x, y| x - y),
            (BinaryOp::Mul, |x, y| x * y),
            (BinaryOp::Max, |x, y| x.max(y)),
            (BinaryOp::Min, |x, y| x.min(y)),
            (BinaryOp::Pow, |x, y| x.pow(y as u32)),
        ];
        for (op, reference) in ops {
            let mut g = Graph::new();
            let x = input(&mut g, "a", DType::I64, dims(&[3, 1]));
            let y = input(&mut g, "b", DType::I64, dims(&[4]));
            let z = node(&mut g, Op::Binary(op), &[x, y]);
            let got = eval1(&g, z, vec![("a", it(&[3, 1], av.clone())), ("b", it(&[4], bv.clone()))]);
            let want: Vec<i64> = (0..12).map(|k| reference(av[k / 4], bv[k % 4])).collect();
            assert_eq!(i(&got), &want[..], "{op:?}");
        }
        let mut g = Graph::new();
        let x = input(&mut g, "a", DType::I64, dims(&[3, 1]));
        let y = input(&mut g, "b", DType::I64, dims(&[4]));
        let z = node(&mut g, Op::Binary(BinaryOp::Ge), &[x, y]);
        let got = eval1(&g, z, vec![("a", it(&[3, 1], av.clone())), ("b", it(&[4], bv.clone()))]);
        let want: Vec<bool> = (0..12).map(|k| av[k / 4] >= bv[k % 4]).collect();
        assert_eq!(b(&got), &want[..]);
        // division by zero is an error naming the node, not a panic
        let mut g = Graph::new();
        let x = input(&mut g, "a", DType::I64, dims(&[2]));
        let y = input(&mut g, "b", DType::I64, dims(&[2]));
        let z = g
            .add1(
                Op::Binary(BinaryOp::Div),
                &[x, y],
                Some(SrcLoc {
                    file: "m.ring".into(),
                    line: 4,
                    col: 2,
                }),
            )
            .unwrap();
        g.add_output("y", z, InputKind::Data);
        let e = run(&g, vec![("a", it(&[2], vec![1, 2])), ("b", it(&[2], vec![1, 0]))]).unwrap_err();
        assert_eq!(e.node.as_deref(), Some("%2 (div)"));
        assert!(
            e.to_string()
                .starts_with("m.ring:4:2: %2 (div): integer division by zero"),
            "{e}"
        );
    }

    #[test]
    fn bool_logic_and_comparisons() {
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::Bool, dims(&[2, 1]));
        let y = input(&mut g, "y", DType::Bool, dims(&[2]));
        let and = node(&mut g, Op::Binary(BinaryOp::And), &[x, y]);
        let or = node(&mut g, Op::Binary(BinaryOp::Or), &[x, y]);
        let lt = node(&mut g, Op::Binary(BinaryOp::Lt), &[x, y]);
        let eq = node(&mut g, Op::Binary(BinaryOp::Eq), &[x, y]);
        let ins = || {
            vec![
                ("x", Tensor::from_bool(vec![2, 1], vec![false, true])),
                ("y", Tensor::from_bool(vec![2], vec![false, true])),
            ]
        };
        // rows: x = false, true; columns: y = false, true
        assert_eq!(b(&eval1(&g, and, ins())), &[false, false, false, true]);
        assert_eq!(b(&eval1(&g, or, ins())), &[false, true, true, true]);
        assert_eq!(b(&eval1(&g, lt, ins())), &[false, true, false, false]);
        assert_eq!(b(&eval1(&g, eq, ins())), &[true, false, false, true]);
    }

    #[test]
    fn where_broadcasts_three_ways() {
        let mut r = rng(4);
        let mut g = Graph::new();
        let c = input(&mut g, "c", DType::Bool, dims(&[3, 1]));
        let a = input(&mut g, "a", DType::F32, dims(&[1, 4]));
        let k = node(
            &mut g,
            Op::Const {
                value: -5.0,
                dtype: DType::F32,
            },
            &[],
        );
        let y = node(&mut g, Op::Where, &[c, a, k]);
        let cv = vec![true, false, true];
        let av = nonzero(&mut r, 4);
        let got = eval1(
            &g,
            y,
            vec![
                ("c", Tensor::from_bool(vec![3, 1], cv.clone())),
                ("a", ft(&[1, 4], av.clone())),
            ],
        );
        assert_eq!(got.shape, vec![3, 4]);
        let want: Vec<f64> = (0..12)
            .map(|k| if cv[k / 4] { f64::from(av[k % 4]) } else { -5.0 })
            .collect();
        assert_close(f(&got), &want, 0.0);
    }

    // ---- reduce -------------------------------------------------------------------------------

    /// Naive reduction: every element folded into the output position with `axes` removed.
    fn naive_reduce(x: &[f32], shape: &[usize], axes: &[usize], max: bool) -> Vec<f64> {
        let kept: Vec<usize> = (0..shape.len()).filter(|d| !axes.contains(d)).collect();
        let out_shape: Vec<usize> = kept.iter().map(|&d| shape[d]).collect();
        let init = if max { f64::NEG_INFINITY } else { 0.0 };
        let mut out = vec![init; out_shape.iter().product()];
        for (k, &v) in x.iter().enumerate() {
            let idx = unravel(k, shape);
            let o = ravel(&kept.iter().map(|&d| idx[d]).collect::<Vec<_>>(), &out_shape);
            out[o] = if max {
                out[o].max(f64::from(v))
            } else {
                out[o] + f64::from(v)
            };
        }
        out
    }

    #[test]
    fn reduce_sum_and_max_over_axes_with_keepdim() {
        let mut r = rng(5);
        let shape = [3usize, 4, 5];
        let xv = nonzero(&mut r, 60);
        let cases: [(&[usize], bool, &[usize]); 7] = [
            (&[0, 2], true, &[1, 4, 1]),
            (&[0, 2], false, &[4]),
            (&[1], false, &[3, 5]),
            (&[2], true, &[3, 4, 1]),
            (&[2, 0], false, &[4]),
            (&[0, 1, 2], false, &[]),
            (&[], false, &[3, 4, 5]),
        ];
        for (axes, keepdim, out_shape) in cases {
            for op in [ReduceOp::Sum, ReduceOp::Max] {
                let mut g = Graph::new();
                let x = input(&mut g, "x", DType::F32, dims(&[3, 4, 5]));
                let y = node(
                    &mut g,
                    Op::Reduce {
                        op,
                        axes: axes.to_vec(),
                        keepdim,
                    },
                    &[x],
                );
                let got = eval1(&g, y, vec![("x", ft(&shape, xv.clone()))]);
                assert_eq!(got.shape, out_shape.to_vec(), "{op:?} {axes:?}");
                assert_close(f(&got), &naive_reduce(&xv, &shape, axes, op == ReduceOp::Max), 1e-6);
            }
        }
        // ints
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::I64, dims(&[2, 3]));
        let s = node(
            &mut g,
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![1],
                keepdim: false,
            },
            &[x],
        );
        let m = node(
            &mut g,
            Op::Reduce {
                op: ReduceOp::Max,
                axes: vec![0],
                keepdim: true,
            },
            &[x],
        );
        let xi = it(&[2, 3], vec![4, -2, 9, -7, 5, 1]);
        assert_eq!(i(&eval1(&g, s, vec![("x", xi.clone())])), &[11, -1]);
        let got = eval1(&g, m, vec![("x", xi)]);
        assert_eq!((got.shape.clone(), i(&got).to_vec()), (vec![1, 3], vec![4, 5, 9]));
        // bf16: accumulated wide, rounded once
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::BF16, dims(&[60]));
        let s = node(
            &mut g,
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![0],
                keepdim: false,
            },
            &[x],
        );
        let xb = Tensor::from_f32(DType::BF16, vec![60], xv.clone());
        let got = eval1(&g, s, vec![("x", xb.clone())]);
        let exact: f64 = f(&xb).iter().map(|&v| f64::from(v)).sum();
        assert_eq!(f(&got), &[DType::BF16.round(exact as f32)]);
        // sum over an empty axis is zero
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, vec![sym("n"), Dim::constant(3)]);
        let s = node(
            &mut g,
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![0],
                keepdim: false,
            },
            &[x],
        );
        let got = eval1(&g, s, vec![("x", ft(&[0, 3], vec![]))]);
        assert_eq!(f(&got), &[0.0, 0.0, 0.0]);
    }

    #[test]
    fn sums_accumulate_in_f64_and_max_propagates_nan() {
        // in f32, 1e8 + 1 == 1e8: an f32 accumulator would return 1, not 2
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[2, 4]));
        let s = node(
            &mut g,
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![1],
                keepdim: false,
            },
            &[x],
        );
        let s0 = node(
            &mut g,
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![0],
                keepdim: false,
            },
            &[x],
        );
        let m = node(
            &mut g,
            Op::Reduce {
                op: ReduceOp::Max,
                axes: vec![1],
                keepdim: false,
            },
            &[x],
        );
        let mx = node(&mut g, Op::Binary(BinaryOp::Max), &[x, x]);
        let xv = vec![1e8, 1.0, -1e8, 1.0, 2.0, f32::NAN, 3.0, -1.0];
        let ins = || vec![("x", ft(&[2, 4], xv.clone()))];
        let got = eval1(&g, s, ins());
        assert_eq!(f(&got)[0], 2.0);
        assert!(f(&got)[1].is_nan());
        // column sums go through the strided (non-row) accumulation path
        let mut g2 = Graph::new();
        let y = input(&mut g2, "x", DType::F32, dims(&[4, 2]));
        let c = node(
            &mut g2,
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![0],
                keepdim: false,
            },
            &[y],
        );
        let got = eval1(
            &g2,
            c,
            vec![("x", ft(&[4, 2], vec![1e8, 0.5, 1.0, 0.5, -1e8, 0.5, 1.0, 0.5]))],
        );
        assert_eq!(f(&got), &[2.0, 2.0]);
        assert!(f(&eval1(&g, s0, ins()))[1].is_nan());
        let got = eval1(&g, m, ins());
        assert_eq!(f(&got)[0], 1e8);
        assert!(f(&got)[1].is_nan(), "max over a row with NaN is NaN");
        assert!(f(&eval1(&g, mx, ins()))[5].is_nan());
    }

    // ---- movement -----------------------------------------------------------------------------

    #[test]
    fn permute_rank4_reshape_expand() {
        let mut r = rng(6);
        let shape = [2usize, 3, 4, 5];
        let perm = [2usize, 0, 3, 1];
        let xv = nonzero(&mut r, 120);
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[2, 3, 4, 5]));
        let p = node(&mut g, Op::Permute { perm: perm.to_vec() }, &[x]);
        let got = eval1(&g, p, vec![("x", ft(&shape, xv.clone()))]);
        let out_shape: Vec<usize> = perm.iter().map(|&q| shape[q]).collect();
        assert_eq!(got.shape, out_shape);
        for (k, &v) in f(&got).iter().enumerate() {
            let o = unravel(k, &out_shape);
            let mut src = [0usize; 4];
            for d in 0..4 {
                src[perm[d]] = o[d];
            }
            assert_eq!(v, xv[ravel(&src, &shape)], "at {o:?}");
        }
        // reshape keeps row-major order
        let rs = node(&mut g, Op::Reshape { shape: dims(&[6, 20]) }, &[x]);
        let got = eval1(&g, rs, vec![("x", ft(&shape, xv.clone()))]);
        assert_eq!((got.shape.clone(), f(&got)), (vec![6, 20], &xv[..]));
        // expand [3, 1] -> [2, 3, 4]
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::I64, dims(&[3, 1]));
        let e = node(
            &mut g,
            Op::Expand {
                shape: dims(&[2, 3, 4]),
            },
            &[x],
        );
        let got = eval1(&g, e, vec![("x", it(&[3, 1], vec![7, -8, 9]))]);
        let want: Vec<i64> = (0..24).map(|k| [7, -8, 9][(k / 4) % 3]).collect();
        assert_eq!(i(&got), &want[..]);
        // permute of ints (a transpose)
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::I64, dims(&[2, 3]));
        let t = node(&mut g, Op::Permute { perm: vec![1, 0] }, &[x]);
        let got = eval1(&g, t, vec![("x", it(&[2, 3], vec![1, 2, 3, 4, 5, 6]))]);
        assert_eq!(i(&got), &[1, 4, 2, 5, 3, 6]);
    }

    #[test]
    fn slice_with_symbolic_end() {
        let mut g = Graph::new();
        let n = sym("n");
        let x = input(&mut g, "x", DType::F32, vec![n.clone(), Dim::constant(3)]);
        let rows = node(
            &mut g,
            Op::Slice {
                axis: 0,
                start: Dim::constant(1),
                end: n.sub(&Dim::constant(1)),
            },
            &[x],
        );
        let y = node(
            &mut g,
            Op::Slice {
                axis: 1,
                start: Dim::constant(1),
                end: Dim::constant(3),
            },
            &[rows],
        );
        let mut r = rng(7);
        let xv = nonzero(&mut r, 18);
        let got = eval1(&g, y, vec![("x", ft(&[6, 3], xv.clone()))]);
        assert_eq!(got.shape, vec![4, 2]);
        let want: Vec<f64> = (1..5)
            .flat_map(|i| (1..3).map(move |j| (i, j)))
            .map(|(i, j)| f64::from(xv[i * 3 + j]))
            .collect();
        assert_close(f(&got), &want, 0.0);
        // n = 2: an empty slice
        let got = eval1(&g, y, vec![("x", ft(&[2, 3], xv[..6].to_vec()))]);
        assert_eq!(got.shape, vec![0, 2]);
        // n = 1: the end precedes the start
        let mut g2 = g.clone();
        g2.add_output("y", y, InputKind::Data);
        let e = run(&g2, vec![("x", ft(&[1, 3], xv[..3].to_vec()))]).unwrap_err();
        assert!(
            e.to_string().contains("< 0") || e.to_string().contains("out of range"),
            "{e}"
        );
    }

    /// A KV cache: `cache ++ new` along the sequence axis, then attention-like scores over it.
    /// With `past = 0` the cache is empty.
    #[test]
    fn kv_cache_concat_with_zero_length_past() {
        let (past, seq) = (sym("past"), sym("seq"));
        let total = past.add(&seq);
        let mut g = Graph::new();
        let cache = g
            .add1(
                Op::Input {
                    name: "cache".into(),
                    kind: InputKind::State,
                    dtype: DType::F32,
                    shape: vec![past.clone(), Dim::constant(4)],
                },
                &[],
                None,
            )
            .unwrap();
        let new = input(&mut g, "new", DType::F32, vec![seq.clone(), Dim::constant(4)]);
        let cat = node(&mut g, Op::Concat { axis: 0 }, &[cache, new]);
        let kt = node(&mut g, Op::Permute { perm: vec![1, 0] }, &[cat]);
        let scores = node(&mut g, Op::Matmul, &[new, kt]);
        let sums = node(
            &mut g,
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![1],
                keepdim: false,
            },
            &[scores],
        );
        let len = node(&mut g, Op::DimValue { dim: total.clone() }, &[]);
        let latest = node(
            &mut g,
            Op::Slice {
                axis: 0,
                start: past.clone(),
                end: total.clone(),
            },
            &[cat],
        );
        g.add_output("cache", cat, InputKind::State);
        g.add_output("scores", scores, InputKind::Data);
        g.add_output("sums", sums, InputKind::Data);
        g.add_output("len", len, InputKind::Data);
        g.add_output("latest", latest, InputKind::Data);
        let interp = Interpreter::new(&g, &NoParams).unwrap();
        let mut r = rng(8);
        for p in [0usize, 2] {
            let cv = nonzero(&mut r, p * 4);
            let nv = nonzero(&mut r, 3 * 4);
            let out = interp
                .run(&feed(vec![
                    ("cache", ft(&[p, 4], cv.clone())),
                    ("new", ft(&[3, 4], nv.clone())),
                ]))
                .unwrap();
            let all: Vec<f32> = cv.iter().chain(&nv).copied().collect();
            assert_eq!(out["cache"].shape, vec![p + 3, 4]);
            assert_eq!(f(&out["cache"]), &all[..]);
            assert_eq!(f(&out["latest"]), &nv[..]);
            assert_eq!(i(&out["len"]), &[(p + 3) as i64]);
            let mut want = vec![0f64; 3 * (p + 3)];
            for s in 0..3 {
                for t in 0..p + 3 {
                    want[s * (p + 3) + t] = (0..4)
                        .map(|c| f64::from(nv[s * 4 + c]) * f64::from(all[t * 4 + c]))
                        .sum();
                }
            }
            assert_close(f(&out["scores"]), &want, 1e-6);
            let row_sums: Vec<f64> = want.chunks(p + 3).map(|c| c.iter().sum()).collect();
            assert_close(f(&out["sums"]), &row_sums, 1e-5);
        }
        // a zero-length operand in the middle, along a non-leading axis
        let mut g = Graph::new();
        let a = input(&mut g, "a", DType::I64, dims(&[2, 1]));
        let z = input(&mut g, "z", DType::I64, vec![Dim::constant(2), sym("e")]);
        let c = input(&mut g, "c", DType::I64, dims(&[2, 2]));
        let cat = node(&mut g, Op::Concat { axis: 1 }, &[a, z, c]);
        let got = eval1(
            &g,
            cat,
            vec![
                ("a", it(&[2, 1], vec![1, 2])),
                ("z", it(&[2, 0], vec![])),
                ("c", it(&[2, 2], vec![3, 4, 5, 6])),
            ],
        );
        assert_eq!(
            (got.shape.clone(), i(&got).to_vec()),
            (vec![2, 3], vec![1, 3, 4, 2, 5, 6])
        );
    }

    // ---- indexing -----------------------------------------------------------------------------

    #[test]
    fn index_select_embedding_and_inner_axis() {
        let mut r = rng(9);
        let ev = nonzero(&mut r, 20);
        let mut g = Graph::new();
        let emb = input(&mut g, "emb", DType::F32, dims(&[5, 4]));
        let ids = input(&mut g, "ids", DType::I64, dims(&[2, 3]));
        let y = node(&mut g, Op::IndexSelect { axis: 0 }, &[emb, ids]);
        let idv = vec![4, 0, 2, 2, 1, 3];
        let got = eval1(
            &g,
            y,
            vec![("emb", ft(&[5, 4], ev.clone())), ("ids", it(&[2, 3], idv.clone()))],
        );
        assert_eq!(got.shape, vec![2, 3, 4]);
        let want: Vec<f64> = (0..24)
            .map(|k| f64::from(ev[idv[k / 4] as usize * 4 + k % 4]))
            .collect();
        assert_close(f(&got), &want, 0.0);
        // along axis 1 of [3, 5] with 4 (i32) indices: out [3, 4]
        let xv = nonzero(&mut r, 15);
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[3, 5]));
        let ids = input(&mut g, "ids", DType::I32, dims(&[4]));
        let y = node(&mut g, Op::IndexSelect { axis: 1 }, &[x, ids]);
        let idv = vec![4, 4, 0, 3];
        let got = eval1(
            &g,
            y,
            vec![
                ("x", ft(&[3, 5], xv.clone())),
                ("ids", Tensor::from_i64(DType::I32, vec![4], idv.clone())),
            ],
        );
        let want: Vec<f64> = (0..12)
            .map(|k| f64::from(xv[(k / 4) * 5 + idv[k % 4] as usize]))
            .collect();
        assert_eq!(got.shape, vec![3, 4]);
        assert_close(f(&got), &want, 0.0);
    }

    #[test]
    fn index_errors_name_the_node() {
        let mut g = Graph::new();
        let emb = input(&mut g, "emb", DType::F32, dims(&[5, 4]));
        let ids = input(&mut g, "ids", DType::I64, dims(&[3]));
        let loc = SrcLoc {
            file: "m.ring".into(),
            line: 12,
            col: 9,
        };
        let y = g
            .add1(Op::IndexSelect { axis: 0 }, &[emb, ids], Some(loc.clone()))
            .unwrap();
        let gather_ids = input(&mut g, "gids", DType::I64, dims(&[5, 2]));
        let ga = node(&mut g, Op::GatherAlong { axis: 1 }, &[emb, gather_ids]);
        g.add_output("y", y, InputKind::Data);
        g.add_output("g", ga, InputKind::Data);
        let interp = Interpreter::new(&g, &NoParams).unwrap();
        let emb_t = ft(&[5, 4], vec![1.0; 20]);
        let ok_g = it(&[5, 2], vec![0, 3, 1, 2, 3, 3, 0, 0, 1, 1]);
        for (bad, shown) in [
            (vec![1, 5, 0], "index 5"),
            (vec![1, -1, 0], "index -1"),
            (vec![i64::MIN, 0, 0], "index -9223372036854775808"),
        ] {
            let e = interp
                .run(&feed(vec![
                    ("emb", emb_t.clone()),
                    ("ids", it(&[3], bad)),
                    ("gids", ok_g.clone()),
                ]))
                .unwrap_err();
            assert_eq!(e.loc.as_ref(), Some(&loc));
            assert_eq!(e.node.as_deref(), Some("%2 (index_select)"));
            assert!(
                e.msg
                    .starts_with(&format!("{shown} is out of range for axis 0 of size 5")),
                "{e}"
            );
        }
        let bad_g = it(&[5, 2], vec![0, 3, 1, 2, 3, 4, 0, 0, 1, 1]);
        let e = interp
            .run(&feed(vec![
                ("emb", emb_t),
                ("ids", it(&[3], vec![0, 1, 2])),
                ("gids", bad_g),
            ]))
            .unwrap_err();
        assert_eq!(e.node.as_deref(), Some("%4 (gather)"));
        assert!(e.msg.contains("index 4 is out of range for axis 1 of size 4"), "{e}");
    }

    #[test]
    fn gather_and_scatter_add_along_both_axes() {
        let mut r = rng(10);
        let xv = nonzero(&mut r, 15);
        let sv = nonzero(&mut r, 12);
        // axis 1: x [3, 5], idx [3, 4] with repeats
        let idv: Vec<i64> = vec![4, 4, 0, 2, 1, 1, 1, 3, 0, 2, 4, 2];
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[3, 5]));
        let idx = input(&mut g, "idx", DType::I64, dims(&[3, 4]));
        let src = input(&mut g, "src", DType::F32, dims(&[3, 4]));
        let ga = node(&mut g, Op::GatherAlong { axis: 1 }, &[x, idx]);
        let sc = node(&mut g, Op::ScatterAddAlong { axis: 1 }, &[x, idx, src]);
        let ins = || {
            vec![
                ("x", ft(&[3, 5], xv.clone())),
                ("idx", it(&[3, 4], idv.clone())),
                ("src", ft(&[3, 4], sv.clone())),
            ]
        };
        let want_g: Vec<f64> = (0..12).map(|k| f64::from(xv[(k / 4) * 5 + idv[k] as usize])).collect();
        assert_close(f(&eval1(&g, ga, ins())), &want_g, 0.0);
        let mut want_s: Vec<f64> = xv.iter().map(|&v| f64::from(v)).collect();
        for k in 0..12 {
            want_s[(k / 4) * 5 + idv[k] as usize] += f64::from(sv[k]);
        }
        assert_close(f(&eval1(&g, sc, ins())), &want_s, 1e-6);
        // axis 0: x [3, 5], idx [2, 5]
        let idv0: Vec<i64> = vec![2, 0, 1, 1, 2, 2, 2, 0, 1, 0];
        let sv0 = nonzero(&mut r, 10);
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[3, 5]));
        let idx = input(&mut g, "idx", DType::I64, dims(&[2, 5]));
        let src = input(&mut g, "src", DType::F32, dims(&[2, 5]));
        let ga = node(&mut g, Op::GatherAlong { axis: 0 }, &[x, idx]);
        let sc = node(&mut g, Op::ScatterAddAlong { axis: 0 }, &[x, idx, src]);
        let ins = || {
            vec![
                ("x", ft(&[3, 5], xv.clone())),
                ("idx", it(&[2, 5], idv0.clone())),
                ("src", ft(&[2, 5], sv0.clone())),
            ]
        };
        let want_g: Vec<f64> = (0..10).map(|k| f64::from(xv[idv0[k] as usize * 5 + k % 5])).collect();
        assert_close(f(&eval1(&g, ga, ins())), &want_g, 0.0);
        let mut want_s: Vec<f64> = xv.iter().map(|&v| f64::from(v)).collect();
        for k in 0..10 {
            want_s[idv0[k] as usize * 5 + k % 5] += f64::from(sv0[k]);
        }
        assert_close(f(&eval1(&g, sc, ins())), &want_s, 1e-6);
        // ints (routing counts): scatter ones into a histogram
        let mut g = Graph::new();
        let h = input(&mut g, "h", DType::I64, dims(&[1, 4]));
        let idx = input(&mut g, "idx", DType::I64, dims(&[1, 6]));
        let ones = input(&mut g, "ones", DType::I64, dims(&[1, 6]));
        let sc = node(&mut g, Op::ScatterAddAlong { axis: 1 }, &[h, idx, ones]);
        let got = eval1(
            &g,
            sc,
            vec![
                ("h", it(&[1, 4], vec![10, 20, 30, 40])),
                ("idx", it(&[1, 6], vec![3, 1, 3, 3, 0, 1])),
                ("ones", it(&[1, 6], vec![1; 6])),
            ],
        );
        assert_eq!(i(&got), &[11, 22, 30, 43]);
    }

    #[test]
    fn topk_ties_prefer_the_lower_index_and_argmax() {
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[2, 5]));
        let tk = g.add(Op::TopK { k: 3, axis: 1 }, &[x], None).unwrap();
        let am = node(&mut g, Op::ArgMax { axis: 1 }, &[x]);
        g.add_output("v", tk[0], InputKind::Data);
        g.add_output("i", tk[1], InputKind::Data);
        g.add_output("am", am, InputKind::Data);
        let xv = vec![1.0, 3.0, 3.0, 2.0, 3.0, 5.0, -1.0, 5.0, 0.5, 5.0];
        let out = run(&g, vec![("x", ft(&[2, 5], xv))]).unwrap();
        assert_eq!(f(&out["v"]), &[3.0, 3.0, 3.0, 5.0, 5.0, 5.0]);
        assert_eq!(i(&out["i"]), &[1, 2, 4, 0, 2, 4]);
        assert_eq!(out["i"].dtype, DType::I64);
        assert_eq!(i(&out["am"]), &[1, 0]);
        // along axis 0 of random data (with forced ties) against a naive stable sort
        let mut r = rng(11);
        let mut xv = nonzero(&mut r, 7 * 3);
        xv[3] = xv[12]; // column 0: rows 1 and 4 tie
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[7, 3]));
        let tk = g.add(Op::TopK { k: 4, axis: 0 }, &[x], None).unwrap();
        let am = node(&mut g, Op::ArgMax { axis: 0 }, &[x]);
        g.add_output("v", tk[0], InputKind::Data);
        g.add_output("i", tk[1], InputKind::Data);
        g.add_output("am", am, InputKind::Data);
        let out = run(&g, vec![("x", ft(&[7, 3], xv.clone()))]).unwrap();
        assert_eq!(out["v"].shape, vec![4, 3]);
        for q in 0..3 {
            let mut order: Vec<usize> = (0..7).collect();
            order.sort_by(|&a, &b| xv[b * 3 + q].partial_cmp(&xv[a * 3 + q]).unwrap()); // stable
            for rnk in 0..4 {
                assert_eq!(i(&out["i"])[rnk * 3 + q], order[rnk] as i64);
                assert_eq!(f(&out["v"])[rnk * 3 + q], xv[order[rnk] * 3 + q]);
            }
            assert_eq!(i(&out["am"])[q], order[0] as i64);
        }
        // ints; and NaN ranks above every number
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::I64, dims(&[6]));
        let tk = g.add(Op::TopK { k: 2, axis: 0 }, &[x], None).unwrap();
        let got = eval1(&g, tk[1], vec![("x", it(&[6], vec![4, 9, -3, 9, 9, 1]))]);
        assert_eq!(i(&got), &[1, 3]);
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[3]));
        let tk = g.add(Op::TopK { k: 1, axis: 0 }, &[x], None).unwrap();
        let am = node(&mut g, Op::ArgMax { axis: 0 }, &[x]);
        assert_eq!(
            i(&eval1(&g, tk[1], vec![("x", ft(&[3], vec![1.0, f32::NAN, 3.0]))])),
            &[1]
        );
        assert_eq!(i(&eval1(&g, am, vec![("x", ft(&[3], vec![1.0, f32::NAN, 3.0]))])), &[1]);
    }

    // ---- matmul / cast ------------------------------------------------------------------------

    fn naive_matmul(a: &[f32], sa: &[usize], b: &[f32], sb: &[usize], so: &[usize]) -> Vec<f64> {
        let (m, k, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 1]);
        let batch = &so[..so.len() - 2];
        let (ba, bb) = (&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
        let nb: usize = batch.iter().product();
        let mut out = Vec::new();
        for bi in 0..nb {
            let idx = unravel(bi, batch);
            let (oa, ob) = (bidx(&idx, ba) * m * k, bidx(&idx, bb) * k * n);
            for i in 0..m {
                for j in 0..n {
                    out.push(
                        (0..k)
                            .map(|p| f64::from(a[oa + i * k + p]) * f64::from(b[ob + p * n + j]))
                            .sum(),
                    );
                }
            }
        }
        out
    }

    fn matmul_case(sa: &[usize], sb: &[usize], so: &[usize], seed: u64) {
        let mut r = rng(seed);
        let av = nonzero(&mut r, sa.iter().product());
        let bv = nonzero(&mut r, sb.iter().product());
        let to = |s: &[usize]| s.iter().map(|&d| Dim::constant(d as i64)).collect::<Shape>();
        let mut g = Graph::new();
        let a = input(&mut g, "a", DType::F32, to(sa));
        let b = input(&mut g, "b", DType::F32, to(sb));
        let y = node(&mut g, Op::Matmul, &[a, b]);
        let got = eval1(&g, y, vec![("a", ft(sa, av.clone())), ("b", ft(sb, bv.clone()))]);
        assert_eq!(got.shape, so.to_vec());
        assert_close(f(&got), &naive_matmul(&av, sa, &bv, sb, so), 1e-6);
    }

    #[test]
    fn matmul_broadcast_batch_odd_and_empty_sizes() {
        matmul_case(&[2, 1, 3, 5], &[4, 5, 6], &[2, 4, 3, 6], 12);
        matmul_case(&[7, 13], &[13, 5], &[7, 5], 13);
        matmul_case(&[3, 7, 13], &[13, 5], &[3, 7, 5], 14);
        matmul_case(&[1, 2, 3], &[4, 3, 2], &[4, 2, 2], 15);
        // several column panels with a ragged last one, and a tail of rows
        matmul_case(&[37, 300], &[300, 1100], &[37, 1100], 16);
        matmul_case(&[0, 4], &[4, 3], &[0, 3], 17);
        matmul_case(&[2, 4], &[4, 0], &[2, 0], 18);
        matmul_case(&[0, 2, 4], &[4, 3], &[0, 2, 3], 19);
        // K = 0: all zeros
        let mut g = Graph::new();
        let a = input(&mut g, "a", DType::F32, vec![Dim::constant(2), sym("k")]);
        let b = input(&mut g, "b", DType::F32, vec![sym("k"), Dim::constant(3)]);
        let y = node(&mut g, Op::Matmul, &[a, b]);
        let got = eval1(&g, y, vec![("a", ft(&[2, 0], vec![])), ("b", ft(&[0, 3], vec![]))]);
        assert_eq!((got.shape.clone(), f(&got).to_vec()), (vec![2, 3], vec![0.0; 6]));
    }

    #[test]
    fn bf16_matmul_rounds_the_result_once() {
        let mut r = rng(20);
        let (m, k, n) = (5, 64, 3);
        let av: Vec<f32> = nonzero(&mut r, m * k)
            .into_iter()
            .map(|v| DType::BF16.round(v))
            .collect();
        let bv: Vec<f32> = nonzero(&mut r, k * n)
            .into_iter()
            .map(|v| DType::BF16.round(v))
            .collect();
        let mut g = Graph::new();
        let a = input(&mut g, "a", DType::BF16, dims(&[5, 64]));
        let b = input(&mut g, "b", DType::BF16, dims(&[64, 3]));
        let y = node(&mut g, Op::Matmul, &[a, b]);
        let bf = |s: &[usize], v: &[f32]| Tensor::from_f32(DType::BF16, s.to_vec(), v.to_vec());
        let got = eval1(&g, y, vec![("a", bf(&[m, k], &av)), ("b", bf(&[k, n], &bv))]);
        assert_eq!(got.dtype, DType::BF16);
        let exact = naive_matmul(&av, &[m, k], &bv, &[k, n], &[m, n]);
        let want: Vec<f32> = exact.iter().map(|&s| DType::BF16.round(s as f32)).collect();
        assert_eq!(f(&got), &want[..]);
        // ... which differs from rounding after every multiply-add
        let stepwise: Vec<f32> = (0..m * n)
            .map(|o| {
                let (i, j) = (o / n, o % n);
                (0..k).fold(0f32, |s, p| DType::BF16.round(s + av[i * k + p] * bv[p * n + j]))
            })
            .collect();
        assert_ne!(f(&got), &stepwise[..]);
    }

    #[test]
    fn cast_semantics() {
        let xv = vec![-2.7f32, -0.5, 0.5, 2.7, 3e9, f32::NAN, 0.0, 257.0];
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[8]));
        let to_i64 = node(&mut g, Op::Cast { to: DType::I64 }, &[x]);
        let to_i32 = node(&mut g, Op::Cast { to: DType::I32 }, &[x]);
        let to_bool = node(&mut g, Op::Cast { to: DType::Bool }, &[x]);
        let to_bf16 = node(&mut g, Op::Cast { to: DType::BF16 }, &[x]);
        let ins = || vec![("x", ft(&[8], xv.clone()))];
        assert_eq!(i(&eval1(&g, to_i64, ins())), &[-2, 0, 0, 2, 3_000_000_000, 0, 0, 257]);
        let got = eval1(&g, to_i32, ins());
        assert_eq!(got.dtype, DType::I32);
        assert_eq!(i(&got), &[-2, 0, 0, 2, i32::MAX as i64, 0, 0, 257]);
        assert_eq!(
            b(&eval1(&g, to_bool, ins())),
            &[true, true, true, true, true, true, false, true]
        );
        let got = eval1(&g, to_bf16, ins());
        assert_eq!(f(&got)[7], 256.0);
        assert_eq!(f(&got)[0], DType::BF16.round(-2.7));
        // int -> float/bool/i32, bool -> numbers
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::I64, dims(&[4]));
        let xf = node(&mut g, Op::Cast { to: DType::BF16 }, &[x]);
        let xb = node(&mut g, Op::Cast { to: DType::Bool }, &[x]);
        let x32 = node(&mut g, Op::Cast { to: DType::I32 }, &[x]);
        let bi = node(&mut g, Op::Cast { to: DType::I64 }, &[xb]);
        let bfl = node(&mut g, Op::Cast { to: DType::F32 }, &[xb]);
        let ins = || vec![("x", it(&[4], vec![257, 0, -3, 1 << 32]))];
        assert_eq!(f(&eval1(&g, xf, ins())), &[256.0, 0.0, -3.0, 4294967296.0]);
        assert_eq!(b(&eval1(&g, xb, ins())), &[true, false, true, true]);
        assert_eq!(i(&eval1(&g, x32, ins())), &[257, 0, -3, 0]);
        assert_eq!(i(&eval1(&g, bi, ins())), &[1, 0, 1, 1]);
        assert_eq!(f(&eval1(&g, bfl, ins())), &[1.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn const_dim_value_and_iota() {
        let seq = sym("seq");
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::I64, vec![seq.clone()]);
        let c_bf = node(
            &mut g,
            Op::Const {
                value: 1.0 / 3.0,
                dtype: DType::BF16,
            },
            &[],
        );
        let c_i32 = node(
            &mut g,
            Op::Const {
                value: -2.7,
                dtype: DType::I32,
            },
            &[],
        );
        let c_b = node(
            &mut g,
            Op::Const {
                value: 2.0,
                dtype: DType::Bool,
            },
            &[],
        );
        let dv = node(
            &mut g,
            Op::DimValue {
                dim: seq.mul(&Dim::constant(2)).add(&Dim::constant(1)),
            },
            &[],
        );
        let io = node(
            &mut g,
            Op::Iota {
                len: seq.clone(),
                dtype: DType::I64,
            },
            &[],
        );
        let io_f = node(
            &mut g,
            Op::Iota {
                len: Dim::constant(300),
                dtype: DType::BF16,
            },
            &[],
        );
        let sum = node(&mut g, Op::Binary(BinaryOp::Add), &[x, io]);
        let ins = || vec![("x", it(&[4], vec![10, 20, 30, 40]))];
        assert_eq!(f(&eval1(&g, c_bf, ins())), &[DType::BF16.round(1.0 / 3.0)]);
        assert_eq!(i(&eval1(&g, c_i32, ins())), &[-2]);
        assert_eq!(b(&eval1(&g, c_b, ins())), &[true]);
        let got = eval1(&g, dv, ins());
        assert_eq!((got.shape.clone(), i(&got).to_vec()), (vec![], vec![9]));
        assert_eq!(i(&eval1(&g, sum, ins())), &[10, 21, 32, 43]);
        let got = eval1(&g, io_f, ins());
        assert_eq!(f(&got)[255], 255.0);
        assert_eq!(f(&got)[257], 256.0); // 257 is not a bf16
    }

    // ---- scan ---------------------------------------------------------------------------------

    const H: usize = 2;
    const D: usize = 3;

    /// A scan whose body computes `S' = λ·S + kᵀv` (per head), `o = q·S'`. Sequences are
    /// `[seq, H, D]` (axis 0) or `[H, seq, D]` (axis 1); λ `[H]` is captured from outside.
    fn decayed_outer_product_graph(axis: usize) -> Graph {
        let (h, d) = (H as i64, D as i64);
        let mut body = Graph::new();
        let s = input(&mut body, "S", DType::F32, dims(&[h, d, d]));
        let q = input(&mut body, "q", DType::F32, dims(&[h, d]));
        let k = input(&mut body, "k", DType::F32, dims(&[h, d]));
        let v = input(&mut body, "v", DType::F32, dims(&[h, d]));
        let lam = input(&mut body, "lam", DType::F32, dims(&[h]));
        let lam3 = node(
            &mut body,
            Op::Reshape {
                shape: dims(&[h, 1, 1]),
            },
            &[lam],
        );
        let decayed = node(&mut body, Op::Binary(BinaryOp::Mul), &[lam3, s]);
        let k3 = node(
            &mut body,
            Op::Reshape {
                shape: dims(&[h, d, 1]),
            },
            &[k],
        );
        let v3 = node(
            &mut body,
            Op::Reshape {
                shape: dims(&[h, 1, d]),
            },
            &[v],
        );
        let kv = node(&mut body, Op::Binary(BinaryOp::Mul), &[k3, v3]);
        let s2 = node(&mut body, Op::Binary(BinaryOp::Add), &[decayed, kv]);
        let q3 = node(
            &mut body,
            Op::Reshape {
                shape: dims(&[h, 1, d]),
            },
            &[q],
        );
        let o3 = node(&mut body, Op::Matmul, &[q3, s2]);
        let o = node(&mut body, Op::Reshape { shape: dims(&[h, d]) }, &[o3]);
        body.add_output("S", s2, InputKind::Data);
        body.add_output("o", o, InputKind::Data);

        let seq_shape = if axis == 0 {
            vec![sym("seq"), Dim::constant(h), Dim::constant(d)]
        } else {
            vec![Dim::constant(h), sym("seq"), Dim::constant(d)]
        };
        let mut g = Graph::new();
        let s0 = input(&mut g, "S0", DType::F32, dims(&[h, d, d]));
        let q = input(&mut g, "q", DType::F32, seq_shape.clone());
        let k = input(&mut g, "k", DType::F32, seq_shape.clone());
        let v = input(&mut g, "v", DType::F32, seq_shape);
        let lam = input(&mut g, "lam", DType::F32, dims(&[h]));
        let outs = g
            .add(
                Op::Scan {
                    body: Box::new(body),
                    axis,
                    n_carry: 1,
                    n_seq: 3,
                },
                &[s0, q, k, v, lam],
                None,
            )
            .unwrap();
        g.add_output("S", outs[0], InputKind::Data);
        g.add_output("o", outs[1], InputKind::Data);
        g
    }

    #[test]
    fn scan_decayed_outer_product_recurrence() {
        for axis in [0usize, 1] {
            let g = decayed_outer_product_graph(axis);
            let interp = Interpreter::new(&g, &NoParams).unwrap();
            let t_len = 5;
            let mut r = rng(21 + axis as u64);
            let s0 = nonzero(&mut r, H * D * D);
            let (q, k, v) = (
                nonzero(&mut r, t_len * H * D),
                nonzero(&mut r, t_len * H * D),
                nonzero(&mut r, t_len * H * D),
            );
            let lam: Vec<f32> = (0..H).map(|_| r.random_range(0.5f32..0.99)).collect();
            // element (t, h, i) of a sequence in its layout
            let at = |x: &[f32], t: usize, h: usize, i: usize| -> f64 {
                f64::from(if axis == 0 {
                    x[(t * H + h) * D + i]
                } else {
                    x[(h * t_len + t) * D + i]
                })
            };
            let seq_shape = if axis == 0 {
                vec![t_len, H, D]
            } else {
                vec![H, t_len, D]
            };
            let out = interp
                .run(&feed(vec![
                    ("S0", ft(&[H, D, D], s0.clone())),
                    ("q", ft(&seq_shape, q.clone())),
                    ("k", ft(&seq_shape, k.clone())),
                    ("v", ft(&seq_shape, v.clone())),
                    ("lam", ft(&[H], lam.clone())),
                ]))
                .unwrap();
            // the direct double loop
            let mut s: Vec<f64> = s0.iter().map(|&x| f64::from(x)).collect();
            let mut o = vec![0f64; t_len * H * D];
            for t in 0..t_len {
                for h in 0..H {
                    for i in 0..D {
                        for j in 0..D {
                            let c = (h * D + i) * D + j;
                            s[c] = f64::from(lam[h]) * s[c] + at(&k, t, h, i) * at(&v, t, h, j);
                        }
                    }
                    for j in 0..D {
                        let val: f64 = (0..D).map(|i| at(&q, t, h, i) * s[(h * D + i) * D + j]).sum();
                        let pos = if axis == 0 {
                            (t * H + h) * D + j
                        } else {
                            (h * t_len + t) * D + j
                        };
                        o[pos] = val;
                    }
                }
            }
            assert_eq!(out["o"].shape, seq_shape);
            assert_eq!(out["S"].shape, vec![H, D, D]);
            assert_close(f(&out["S"]), &s, 1e-5);
            assert_close(f(&out["o"]), &o, 1e-5);
        }
    }

    #[test]
    fn scan_of_length_zero_returns_the_initial_carry() {
        let g = decayed_outer_product_graph(0);
        let mut r = rng(23);
        let s0 = nonzero(&mut r, H * D * D);
        let empty = || ft(&[0, H, D], vec![]);
        let out = run(
            &g,
            vec![
                ("S0", ft(&[H, D, D], s0.clone())),
                ("q", empty()),
                ("k", empty()),
                ("v", empty()),
                ("lam", ft(&[H], vec![0.9, 0.8])),
            ],
        )
        .unwrap();
        assert_eq!(f(&out["S"]), &s0[..]);
        assert_eq!(out["o"].shape, vec![0, H, D]);
        assert!(f(&out["o"]).is_empty());
    }

    #[test]
    fn errors_inside_a_scan_body_name_the_step_and_both_nodes() {
        // body: carry + table[i_t]; the index at step 2 is out of range
        let mut body = Graph::new();
        let c = input(&mut body, "c", DType::F32, dims(&[2]));
        let idx = input(&mut body, "i", DType::I64, dims(&[1]));
        let table = input(&mut body, "table", DType::F32, dims(&[3, 2]));
        let loc = SrcLoc {
            file: "body.ring".into(),
            line: 2,
            col: 5,
        };
        let row = body
            .add1(Op::IndexSelect { axis: 0 }, &[table, idx], Some(loc.clone()))
            .unwrap();
        let row = node(&mut body, Op::Reshape { shape: dims(&[2]) }, &[row]);
        let c2 = node(&mut body, Op::Binary(BinaryOp::Add), &[c, row]);
        body.add_output("c", c2, InputKind::Data);
        let mut g = Graph::new();
        let c0 = input(&mut g, "c0", DType::F32, dims(&[2]));
        let ids = input(&mut g, "ids", DType::I64, vec![sym("seq"), Dim::constant(1)]);
        let table = input(&mut g, "table", DType::F32, dims(&[3, 2]));
        let outs = g
            .add(
                Op::Scan {
                    body: Box::new(body),
                    axis: 0,
                    n_carry: 1,
                    n_seq: 1,
                },
                &[c0, ids, table],
                None,
            )
            .unwrap();
        g.add_output("c", outs[0], InputKind::Data);
        let interp = Interpreter::new(&g, &NoParams).unwrap();
        let ins = |ids: Vec<i64>| {
            let n = ids.len();
            feed(vec![
                ("c0", ft(&[2], vec![0.5, 0.25])),
                ("ids", it(&[n, 1], ids)),
                ("table", ft(&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            ])
        };
        let out = interp.run(&ins(vec![2, 0, 2])).unwrap();
        assert_eq!(f(&out["c"]), &[11.5, 14.25]);
        let e = interp.run(&ins(vec![2, 0, 3])).unwrap_err();
        assert_eq!(e.loc.as_ref(), Some(&loc));
        assert_eq!(e.node.as_deref(), Some("%3 (scan) body %3 (index_select)"));
        assert!(
            e.msg.contains("index 3 is out of range") && e.msg.ends_with("(scan step 2)"),
            "{e}"
        );
    }

    /// Interpreters of two graphs of one model made with one share table hold each parameter
    /// once (loaded once, the same tensor), and each computes with it.
    #[test]
    fn interpreters_share_their_parameters() {
        struct Counting(std::cell::Cell<usize>);
        impl ParamSource for Counting {
            fn load(&self, _spec: &ParamSpec) -> Result<Tensor, String> {
                self.0.set(self.0.get() + 1);
                Ok(Tensor::from_f32(DType::F32, vec![2], vec![3.0, -0.5]))
            }
        }
        let graph = |op: BinaryOp| {
            let mut g = Graph::new();
            let x = input(&mut g, "x", DType::F32, dims(&[2]));
            let w = param(&mut g, "w", DType::F32, dims(&[2]));
            let y = node(&mut g, Op::Binary(op), &[x, w]);
            g.add_output("y", y, InputKind::Data);
            g
        };
        let src = Counting(std::cell::Cell::new(0));
        let mut shared = HashMap::new();
        let a = Interpreter::with_shared(&graph(BinaryOp::Mul), &src, &mut shared).unwrap();
        let b = Interpreter::with_shared(&graph(BinaryOp::Add), &src, &mut shared).unwrap();
        assert_eq!(src.0.get(), 1, "loaded once");
        assert!(std::sync::Arc::ptr_eq(&a.params[0], &b.params[0]));
        let x: HashMap<String, Tensor> =
            [("x".to_string(), Tensor::from_f32(DType::F32, vec![2], vec![2.0, 4.0]))].into();
        assert_eq!(a.run(&x).unwrap()["y"].as_f32().unwrap(), &[6.0, -2.0]);
        assert_eq!(b.run(&x).unwrap()["y"].as_f32().unwrap(), &[5.0, 3.5]);
        // without the table, each loads its own
        Interpreter::new(&graph(BinaryOp::Mul), &src).unwrap();
        assert_eq!(src.0.get(), 2);
    }

    #[test]
    fn scan_body_may_read_parameters() {
        // c_t = c_{t-1} * w + x_t, with w a parameter used only inside the body
        let mut body = Graph::new();
        let c = input(&mut body, "c", DType::F32, dims(&[2]));
        let x = input(&mut body, "x", DType::F32, dims(&[2]));
        let w = param(&mut body, "w", DType::F32, dims(&[2]));
        let cw = node(&mut body, Op::Binary(BinaryOp::Mul), &[c, w]);
        let c2 = node(&mut body, Op::Binary(BinaryOp::Add), &[cw, x]);
        body.add_output("c", c2, InputKind::Data);
        body.add_output("seen", c2, InputKind::Data);
        let mut g = Graph::new();
        let c0 = input(&mut g, "c0", DType::F32, dims(&[2]));
        let xs = input(&mut g, "xs", DType::F32, vec![sym("seq"), Dim::constant(2)]);
        let scan = Op::Scan {
            body: Box::new(body),
            axis: 0,
            n_carry: 1,
            n_seq: 1,
        };
        let outs = g.add(scan, &[c0, xs], None).unwrap();
        g.add_output("c", outs[0], InputKind::Data);
        g.add_output("seen", outs[1], InputKind::Data);
        let params = Table([("w".to_string(), ft(&[2], vec![0.5, -2.0]))].into());
        let interp = Interpreter::new(&g, &params).unwrap();
        let xv = vec![1.0, 2.0, 3.0, -1.0, 0.25, 0.5];
        let out = interp
            .run(&feed(vec![
                ("c0", ft(&[2], vec![4.0, 1.0])),
                ("xs", ft(&[3, 2], xv.clone())),
            ]))
            .unwrap();
        let (mut c, mut seen) = ([4.0f64, 1.0], Vec::new());
        for t in 0..3 {
            for j in 0..2 {
                c[j] = c[j] * [0.5, -2.0][j] + f64::from(xv[t * 2 + j]);
            }
            seen.extend_from_slice(&c);
        }
        assert_close(f(&out["c"]), &c, 0.0);
        assert_close(f(&out["seen"]), &seen, 0.0);
    }

    // ---- binding, params, outputs -----------------------------------------------------------------

    #[test]
    fn dim_binding_errors_name_the_input() {
        let (seq, batch) = (sym("seq"), sym("batch"));
        let mut g = Graph::new();
        let a = input(&mut g, "a", DType::F32, vec![batch.clone(), seq.clone()]);
        let b = input(&mut g, "b", DType::F32, vec![seq.clone()]);
        let c = input(
            &mut g,
            "c",
            DType::I64,
            vec![seq.add(&Dim::constant(1)), Dim::constant(2)],
        );
        let y = node(&mut g, Op::Binary(BinaryOp::Add), &[a, b]);
        g.add_output("y", y, InputKind::Data);
        g.add_output("c", c, InputKind::Data);
        let interp = Interpreter::new(&g, &NoParams).unwrap();
        let good = || {
            vec![
                ("a", ft(&[2, 3], vec![1.0; 6])),
                ("b", ft(&[3], vec![2.0; 3])),
                ("c", it(&[4, 2], vec![1; 8])),
            ]
        };
        let env = interp.bind(&feed(good())).unwrap();
        assert_eq!((env["seq"], env["batch"]), (3, 2));
        assert_eq!(f(&interp.run(&feed(good())).unwrap()["y"]), &[3.0; 6]);
        let err = |ins: Vec<(&str, Tensor)>| interp.run(&feed(ins)).unwrap_err().to_string();
        let mut ins = good();
        ins.remove(1);
        assert!(err(ins).contains("missing input `b` (f32[seq])"));
        let mut ins = good();
        ins[1].1 = ft(&[4], vec![2.0; 4]);
        let e = err(ins);
        assert!(
            e.contains("input `b`: dimension 0 gives `seq` = 4, but input `a` gave `seq` = 3"),
            "{e}"
        );
        let mut ins = good();
        ins[1].1 = it(&[3], vec![2; 3]);
        assert!(err(ins).contains("input `b` must be f32[seq] but is i64[3]"));
        let mut ins = good();
        ins[1].1 = ft(&[3, 1], vec![2.0; 3]);
        assert!(err(ins).contains("input `b` must be f32[seq] but is f32[3, 1]"));
        let mut ins = good();
        ins[2].1 = it(&[3, 2], vec![1; 6]);
        let e = err(ins);
        assert!(e.contains("input `c`: dimension 0 is 3, but seq + 1 = 4"), "{e}");
        let mut ins = good();
        ins[2].1 = it(&[4, 3], vec![1; 12]);
        assert!(err(ins).contains("input `c`: dimension 1 is 3, expected 2"));
        let mut ins = good();
        ins.push(("tokens", it(&[1], vec![1])));
        assert!(err(ins).contains("unknown input `tokens` (the graph's inputs are: a, b, c)"));
        // a hand-built tensor whose data does not fit its shape is an error, not a panic
        let mut ins = good();
        ins[1].1 = Tensor {
            dtype: DType::F32,
            shape: vec![3],
            data: Data::F32(vec![1.0; 2]),
        };
        assert!(err(ins).contains("input `b`: f32[3] holds 2 elements, expected 3"));
        let mut ins = good();
        ins[1].1 = Tensor {
            dtype: DType::F32,
            shape: vec![3],
            data: Data::I64(vec![1; 3]),
        };
        assert!(err(ins).contains("wrong kind of data"));
        // the error carries the input node's name
        let mut ins = good();
        ins[1].1 = ft(&[4], vec![2.0; 4]);
        assert_eq!(interp.run(&feed(ins)).unwrap_err().node.as_deref(), Some("%1 (input)"));
    }

    #[test]
    fn params_load_once_with_checks_including_stacks() {
        let mut g = Graph::new();
        let w = g
            .add1(
                Op::Param {
                    name: "layers.{i}.w".into(),
                    stack: Some(Stack {
                        var: "i".into(),
                        count: 2,
                    }),
                    dtype: DType::BF16,
                    shape: dims(&[2, 3]),
                },
                &[],
                None,
            )
            .unwrap();
        let bias = param(&mut g, "bias", DType::F32, dims(&[3]));
        let x = input(&mut g, "x", DType::F32, dims(&[3]));
        let y = node(&mut g, Op::Binary(BinaryOp::Mul), &[w, x]);
        let y = node(&mut g, Op::Binary(BinaryOp::Add), &[y, bias]);
        g.add_output("y", y, InputKind::Data);
        g.add_output("w", w, InputKind::Data);
        let wv = vec![1.5f32, -2.0, 0.25, 3.0, 1.0 / 3.0, -1.0];
        let table = |w: Tensor| {
            Table(
                [
                    ("layers.{i}.w".to_string(), w),
                    ("bias".to_string(), ft(&[3], vec![0.5, 0.5, 0.5])),
                ]
                .into(),
            )
        };
        let interp = Interpreter::new(&g, &table(Tensor::from_f32(DType::BF16, vec![2, 3], wv.clone()))).unwrap();
        let out = interp.run(&feed(vec![("x", ft(&[3], vec![2.0, 4.0, -1.0]))])).unwrap();
        let wb: Vec<f32> = wv.iter().map(|&v| DType::BF16.round(v)).collect();
        assert_eq!(f(&out["w"]), &wb[..]);
        let want: Vec<f32> = (0..6).map(|k| wb[k] * [2.0, 4.0, -1.0][k % 3] + 0.5).collect();
        assert_eq!(f(&out["y"]), &want[..]);
        // what the source returns is checked
        let e = Interpreter::new(&g, &table(Tensor::from_f32(DType::BF16, vec![3, 2], wv.clone())))
            .err()
            .unwrap();
        assert_eq!(
            e.msg,
            "parameter `layers.{i}.w`: the source returned bf16[3, 2], expected bf16[2, 3]"
        );
        let e = Interpreter::new(&g, &table(Tensor::from_f32(DType::F32, vec![2, 3], wv)))
            .err()
            .unwrap();
        assert!(e.msg.contains("returned f32[2, 3], expected bf16[2, 3]"), "{e}");
        let e = Interpreter::new(&g, &NoParams).err().unwrap();
        assert_eq!(e.msg, "parameter `bias`: no parameter `bias`");
    }

    #[test]
    fn zero_size_tensors_flow_through_every_op_family() {
        let n = sym("n");
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, vec![n.clone(), Dim::constant(4)]);
        let ids = input(&mut g, "ids", DType::I64, vec![n.clone()]);
        let e = node(&mut g, Op::Unary(UnaryOp::Exp), &[x]);
        let row = input(&mut g, "row", DType::F32, dims(&[4]));
        let s = node(&mut g, Op::Binary(BinaryOp::Add), &[e, row]);
        let p = node(&mut g, Op::Permute { perm: vec![1, 0] }, &[s]);
        let red = node(
            &mut g,
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![1],
                keepdim: true,
            },
            &[p],
        );
        let tk = g.add(Op::TopK { k: 2, axis: 1 }, &[x], None).unwrap();
        let am = node(&mut g, Op::ArgMax { axis: 1 }, &[x]);
        let sel = node(&mut g, Op::IndexSelect { axis: 0 }, &[row, ids]);
        let ids2 = node(
            &mut g,
            Op::Reshape {
                shape: vec![n.clone(), Dim::constant(1)],
            },
            &[ids],
        );
        let ga = node(&mut g, Op::GatherAlong { axis: 1 }, &[x, ids2]);
        let c = node(&mut g, Op::Cast { to: DType::BF16 }, &[x]);
        for (name, v) in [
            ("p", p),
            ("red", red),
            ("tv", tk[0]),
            ("ti", tk[1]),
            ("am", am),
            ("sel", sel),
            ("ga", ga),
            ("c", c),
        ] {
            g.add_output(name, v, InputKind::Data);
        }
        let out = run(
            &g,
            vec![
                ("x", ft(&[0, 4], vec![])),
                ("ids", it(&[0], vec![])),
                ("row", ft(&[4], vec![1.0; 4])),
            ],
        )
        .unwrap();
        assert_eq!(out["p"].shape, vec![4, 0]);
        assert_eq!(
            (out["red"].shape.clone(), f(&out["red"]).to_vec()),
            (vec![4, 1], vec![0.0; 4])
        );
        assert_eq!(out["tv"].shape, vec![0, 2]);
        assert_eq!(out["ti"].shape, vec![0, 2]);
        assert_eq!(out["am"].shape, vec![0]);
        assert_eq!(out["sel"].shape, vec![0]);
        assert_eq!(out["ga"].shape, vec![0, 1]);
        assert_eq!(out["c"].shape, vec![0, 4]);
    }

    #[test]
    fn dead_nodes_are_not_evaluated_and_outputs_may_share_a_value() {
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::F32, dims(&[5]));
        // dead: indices 0..9 into 5 rows would fail if evaluated
        let bad = node(
            &mut g,
            Op::Iota {
                len: Dim::constant(9),
                dtype: DType::I64,
            },
            &[],
        );
        let _dead = node(&mut g, Op::IndexSelect { axis: 0 }, &[x, bad]);
        let y = node(&mut g, Op::Unary(UnaryOp::Neg), &[x]);
        g.add_output("y", y, InputKind::Data);
        g.add_output("y_again", y, InputKind::Data);
        g.add_output("x", x, InputKind::Data);
        let xv = vec![1.0, -2.0, 3.0, -4.0, 5.0];
        let out = run(&g, vec![("x", ft(&[5], xv.clone()))]).unwrap();
        assert_eq!(f(&out["y"]), &[-1.0, 2.0, -3.0, 4.0, -5.0]);
        assert_eq!(out["y"], out["y_again"]);
        assert_eq!(f(&out["x"]), &xv[..]);
    }

    #[test]
    fn narrow_float_inputs_are_rounded_to_their_dtype() {
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::BF16, dims(&[2]));
        let y = node(&mut g, Op::Unary(UnaryOp::Neg), &[x]);
        let raw = Tensor {
            dtype: DType::BF16,
            shape: vec![2],
            data: Data::F32(vec![1.0 + 1.0 / 512.0, 1.0 / 3.0]),
        };
        let got = eval1(&g, y, vec![("x", raw)]);
        assert_eq!(f(&got), &[-1.0, -DType::BF16.round(1.0 / 3.0)]);
    }

    #[test]
    fn interpreter_is_sync_and_send() {
        fn assert_sync<T: Sync + Send>() {}
        assert_sync::<Interpreter>();
        // and shared across threads
        let g = decayed_outer_product_graph(0);
        let interp = Interpreter::new(&g, &NoParams).unwrap();
        let ins = feed(vec![
            ("S0", ft(&[H, D, D], vec![0.5; H * D * D])),
            ("q", ft(&[2, H, D], vec![1.0; 2 * H * D])),
            ("k", ft(&[2, H, D], vec![1.0; 2 * H * D])),
            ("v", ft(&[2, H, D], vec![1.0; 2 * H * D])),
            ("lam", ft(&[H], vec![0.5, 0.25])),
        ]);
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2).map(|_| s.spawn(|| interp.run(&ins).unwrap())).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results[0], results[1]);
    }

    /// Timing of a model-sized matmul (no assertion on time; `cargo test -- --nocapture`).
    #[test]
    fn matmul_4096x256x768_timing() {
        let (m, k, n) = (4096usize, 256usize, 768usize);
        let mut r = rng(30);
        let av = nonzero(&mut r, m * k);
        let bv = nonzero(&mut r, k * n);
        let mut g = Graph::new();
        let a = input(&mut g, "a", DType::F32, dims(&[m as i64, k as i64]));
        let b = input(&mut g, "b", DType::F32, dims(&[k as i64, n as i64]));
        let y = node(&mut g, Op::Matmul, &[a, b]);
        g.add_output("y", y, InputKind::Data);
        let interp = Interpreter::new(&g, &NoParams).unwrap();
        let ins = feed(vec![("a", ft(&[m, k], av.clone())), ("b", ft(&[k, n], bv.clone()))]);
        let t0 = std::time::Instant::now();
        let out = interp.run(&ins).unwrap();
        let dt = t0.elapsed();
        println!(
            "matmul [{m},{k}]@[{k},{n}] f32: {:.3} s ({:.2} GFLOP/s)",
            dt.as_secs_f64(),
            2.0 * (m * k * n) as f64 / dt.as_secs_f64() / 1e9
        );
        // spot-check a few entries against the direct dot product
        let y = f(&out["y"]);
        for &(i, j) in &[(0usize, 0usize), (4095, 767), (1234, 567)] {
            let want: f64 = (0..k)
                .map(|p| f64::from(av[i * k + p]) * f64::from(bv[p * n + j]))
                .sum();
            assert!((f64::from(y[i * n + j]) - want).abs() <= 1e-6 * (1.0 + want.abs()));
        }
    }
}
