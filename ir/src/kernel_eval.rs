//! A reference evaluator of kernel plans for tests: runs every kernel element by element in
//! f64 (rounding each result to its dtype), so a plan can be compared with `ir::interp` on the
//! graph it came from. Templates other than GEMM run through the interpreter's own op (the
//! composite's reference semantics, `ir::fused`). It is the oracle of the code generators'
//! kernel tests (docs/kernel-abi.md): slow, simple, and independent of any backend.

use crate::graph::Graph;
use crate::interp::{Interpreter, ParamSource};
use crate::kernel::{
    BufferId, ExprGraph, ExprId, Fusion, IndexExpr, IndexVar, Kernel, KernelKind, KernelPlan, Operand, ScalarOp,
    TemplateOp, View,
};
use crate::op::{BinaryOp, InputKind, Op, ReduceOp, UnaryOp};
use crate::shape::{eval_shape, Dim, DimEnv};
use crate::{DType, ParamSpec, Tensor};
use std::collections::HashMap;

/// Buffer contents, row-major, as f64.
pub type Memory = HashMap<BufferId, Vec<f64>>;

/// A dense row-major tensor: shape and elements.
type Dense = (Vec<usize>, Vec<f64>);

fn dim(d: &Dim, env: &DimEnv) -> Result<i64, String> {
    d.eval(env)
}

fn shape_of(s: &[Dim], env: &DimEnv) -> Result<Vec<usize>, String> {
    eval_shape(s, env)
}

fn round(dtype: DType, x: f64) -> f64 {
    match dtype {
        d if d.is_float() => f64::from(d.round(x as f32)),
        DType::I32 => f64::from(x as i64 as i32),
        DType::I64 => x.trunc(),
        _ => f64::from(u8::from(x != 0.0)),
    }
}

/// Every index of `shape`, row-major.
fn indices(shape: &[usize]) -> Vec<Vec<i64>> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0i64; shape.len()];
    for _ in 0..n {
        out.push(idx.clone());
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if (idx[d] as usize) < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

fn linear(shape: &[usize], idx: &[i64]) -> usize {
    let mut a = 0usize;
    for (d, &i) in shape.iter().zip(idx) {
        a = a * d + i as usize;
    }
    a
}

/// Storage address of view element `idx`; None outside the view.
fn address(view: &View, idx: &[i64], env: &DimEnv) -> Result<Option<usize>, String> {
    let mut a = dim(&view.offset, env)?;
    for ((i, n), s) in idx.iter().zip(&view.shape).zip(&view.strides) {
        if *i < 0 || *i >= dim(n, env)? {
            return Ok(None);
        }
        a += i * dim(s, env)?;
    }
    Ok(Some(a as usize))
}

pub struct Eval<'a> {
    pub env: &'a DimEnv,
    /// parameter values by (pattern) name
    pub params: &'a HashMap<String, Vec<f64>>,
}

/// The state of one expression-graph evaluation.
struct Scope<'s> {
    g: &'s ExprGraph,
    inputs: Vec<(&'s View, &'s [f64])>,
    vars: Vec<i64>,
    /// the template's result and its shape (epilogues)
    result: Option<(&'s [usize], &'s [f64])>,
    rank: usize,
}

impl Eval<'_> {
    fn index(&self, sc: &mut Scope, i: &IndexExpr) -> Result<i64, String> {
        let mut v = dim(&i.offset, self.env)?;
        for (var, c) in &i.terms {
            let x = match var {
                IndexVar::Loop(l) => *sc.vars.get(*l as usize).ok_or("unbound loop variable")?,
                IndexVar::Data(e) => self.expr(sc, *e)? as i64,
            };
            v += dim(c, self.env)? * x;
        }
        Ok(v)
    }

    fn expr(&self, sc: &mut Scope, e: ExprId) -> Result<f64, String> {
        let node = sc.g.get(e).ok_or("bad expression id")?.clone();
        let dt = |sc: &Scope, a: ExprId| sc.g.get(a).map(|n| n.dtype).unwrap_or(DType::F32);
        let v = match &node.op {
            ScalarOp::Load { input, index } => {
                let mut idx = Vec::with_capacity(index.len());
                for i in index {
                    idx.push(self.index(sc, i)?);
                }
                let (view, data) = sc.inputs[*input];
                match address(view, &idx, self.env)? {
                    Some(a) => *data.get(a).ok_or_else(|| format!("load past the buffer ({a})"))?,
                    None => 0.0,
                }
            }
            ScalarOp::Result { .. } => {
                let (shape, data) = sc.result.ok_or("result outside an epilogue")?;
                data[linear(shape, &sc.vars[..sc.rank])]
            }
            ScalarOp::Const(c) => c.get(),
            ScalarOp::Index(i) => self.index(sc, i)? as f64,
            ScalarOp::Unary(u, a) => {
                let x = self.expr(sc, *a)?;
                let xf = x as f32;
                match u {
                    UnaryOp::Neg => -x,
                    UnaryOp::Exp => f64::from(xf.exp()),
                    UnaryOp::Log => f64::from(xf.ln()),
                    UnaryOp::Sqrt => f64::from(xf.sqrt()),
                    UnaryOp::Rsqrt => 1.0 / x.sqrt(),
                    UnaryOp::Recip => 1.0 / x,
                    UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                    UnaryOp::Tanh => f64::from(xf.tanh()),
                    UnaryOp::Sin => f64::from(xf.sin()),
                    UnaryOp::Cos => f64::from(xf.cos()),
                    UnaryOp::Abs => x.abs(),
                    UnaryOp::Not => f64::from(u8::from(x == 0.0)),
                }
            }
            ScalarOp::Binary(b, p, q) => {
                let (x, y) = (self.expr(sc, *p)?, self.expr(sc, *q)?);
                let int = dt(sc, *p).is_int();
                let t = |c: bool| f64::from(u8::from(c));
                match b {
                    BinaryOp::Add => x + y,
                    BinaryOp::Sub => x - y,
                    BinaryOp::Mul => x * y,
                    BinaryOp::Div if int => (x / y).floor(),
                    BinaryOp::Div => x / y,
                    BinaryOp::Max => x.max(y),
                    BinaryOp::Min => x.min(y),
                    BinaryOp::Pow => x.powf(y),
                    BinaryOp::Mod => x - y * (x / y).floor(),
                    BinaryOp::Lt => t(x < y),
                    BinaryOp::Le => t(x <= y),
                    BinaryOp::Gt => t(x > y),
                    BinaryOp::Ge => t(x >= y),
                    BinaryOp::Eq => t(x == y),
                    BinaryOp::Ne => t(x != y),
                    BinaryOp::And => t(x != 0.0 && y != 0.0),
                    BinaryOp::Or => t(x != 0.0 || y != 0.0),
                }
            }
            ScalarOp::Where(c, a, b) => {
                // both branches, as a code generator may do (out-of-range loads read 0)
                let (x, y) = (self.expr(sc, *a)?, self.expr(sc, *b)?);
                if self.expr(sc, *c)? != 0.0 {
                    x
                } else {
                    y
                }
            }
            ScalarOp::Cast(a) => {
                let x = self.expr(sc, *a)?;
                if dt(sc, *a).is_float() && node.dtype.is_int() {
                    (x as f32 as i64) as f64
                } else {
                    x
                }
            }
            ScalarOp::Reduce { op, vars, body } => {
                let extents: Vec<usize> = vars
                    .iter()
                    .map(|(_, n)| dim(n, self.env).map(|x| x as usize))
                    .collect::<Result<_, _>>()?;
                let mut acc = match op {
                    ReduceOp::Sum => 0.0,
                    ReduceOp::Max => f64::NEG_INFINITY,
                };
                for point in indices(&extents) {
                    for ((v, _), x) in vars.iter().zip(&point) {
                        let v = *v as usize;
                        if sc.vars.len() <= v {
                            sc.vars.resize(v + 1, 0);
                        }
                        sc.vars[v] = *x;
                    }
                    let b = self.expr(sc, *body)?;
                    acc = match op {
                        ReduceOp::Sum => acc + b,
                        ReduceOp::Max => acc.max(b),
                    };
                }
                acc
            }
        };
        Ok(round(node.dtype, v))
    }

    /// `stores` of `g` at every index of `domain`.
    fn run_exprs(
        &self,
        g: &ExprGraph,
        domain: &[usize],
        stores: &[ExprId],
        inputs: Vec<(&View, &[f64])>,
        result: Option<(&[usize], &[f64])>,
    ) -> Result<Vec<Vec<f64>>, String> {
        let n: usize = domain.iter().product();
        let mut outs = vec![Vec::with_capacity(n); stores.len()];
        let mut sc = Scope {
            g,
            inputs,
            vars: vec![0; domain.len()],
            result,
            rank: domain.len(),
        };
        for idx in indices(domain) {
            sc.vars[..domain.len()].copy_from_slice(&idx);
            for (o, &e) in outs.iter_mut().zip(stores) {
                o.push(self.expr(&mut sc, e)?);
            }
        }
        Ok(outs)
    }

    /// The elements of a view, row-major.
    fn gather(&self, view: &View, data: &[f64]) -> Result<Dense, String> {
        let shape = shape_of(&view.shape, self.env)?;
        let mut out = Vec::new();
        for idx in indices(&shape) {
            out.push(match address(view, &idx, self.env)? {
                Some(a) => *data.get(a).ok_or("view past its buffer")?,
                None => return Err("view element out of range".into()),
            });
        }
        Ok((shape, out))
    }

    fn inputs<'m>(&self, k: &'m Kernel, mem: &'m Memory) -> Result<Vec<(&'m View, &'m [f64])>, String> {
        k.inputs
            .iter()
            .map(|r| {
                mem.get(&r.buffer)
                    .map(|d| (&r.view, d.as_slice()))
                    .ok_or_else(|| format!("{}: buffer {} read before it is written", k.name, r.buffer))
            })
            .collect()
    }

    fn fusion(
        &self,
        k: &Kernel,
        f: &Fusion,
        mem: &Memory,
        result: Option<(&[usize], &[f64])>,
    ) -> Result<Vec<Vec<f64>>, String> {
        let domain = shape_of(&f.domain, self.env)?;
        self.run_exprs(&f.exprs, &domain, &f.stores, self.inputs(k, mem)?, result)
    }

    fn store(&self, plan: &KernelPlan, mem: &mut Memory, k: &Kernel, o: usize, values: &[f64]) -> Result<(), String> {
        let r = &k.outputs[o];
        let b = plan.buffer(r.buffer).ok_or("bad output buffer")?;
        let n = shape_of(&b.shape, self.env)?.iter().product();
        let shape = shape_of(&r.view.shape, self.env)?;
        let buf = mem.entry(r.buffer).or_insert_with(|| vec![0.0; n]);
        for (idx, v) in indices(&shape).into_iter().zip(values) {
            if let Some(a) = address(&r.view, &idx, self.env)? {
                buf[a] = round(b.dtype, *v);
            }
        }
        Ok(())
    }

    fn operand(&self, k: &Kernel, o: &Operand, mem: &Memory) -> Result<Dense, String> {
        match o {
            Operand::Buffer(i) => {
                let r = &k.inputs[*i];
                self.gather(&r.view, mem.get(&r.buffer).ok_or("operand not written")?)
            }
            Operand::Prologue(f) => {
                let shape = shape_of(&f.domain, self.env)?;
                Ok((shape, self.fusion(k, f, mem, None)?.remove(0)))
            }
        }
    }

    /// Runs every kernel of `plan`; `mem` holds its inputs and parameters and receives
    /// every buffer it writes.
    pub fn run(&self, plan: &KernelPlan, mem: &mut Memory) -> Result<(), String> {
        for b in plan.buffers.iter().enumerate() {
            let (i, b) = b;
            if b.kind == crate::kernel::BufferKind::Param && !mem.contains_key(&BufferId(i as u32)) {
                let p = self
                    .params
                    .get(&b.name)
                    .ok_or_else(|| format!("no parameter {}", b.name))?;
                mem.insert(BufferId(i as u32), p.clone());
            }
        }
        for k in &plan.kernels {
            self.kernel(plan, k, mem).map_err(|e| format!("{}: {e}", k.name))?;
        }
        Ok(())
    }

    /// Runs one kernel of `plan`: reads its inputs from `mem`, writes its outputs there.
    pub fn kernel(&self, plan: &KernelPlan, k: &Kernel, mem: &mut Memory) -> Result<(), String> {
        match &k.kind {
            KernelKind::Loop(l) => {
                let domain = shape_of(&l.domain, self.env)?;
                let outs = self.run_exprs(&l.exprs, &domain, &l.stores, self.inputs(k, mem)?, None)?;
                for (o, v) in outs.iter().enumerate() {
                    self.store(plan, mem, k, o, v)?;
                }
            }
            KernelKind::Template(t) => {
                let ops: Vec<Dense> = t
                    .operands
                    .iter()
                    .map(|o| self.operand(k, o, mem))
                    .collect::<Result<_, _>>()?;
                // a folded route's bias is the last operand, not the product's
                let route = k.gemm().and_then(|g| g.route.as_deref());
                let n_prod = t.operands.len() - usize::from(route.is_some_and(|r| r.routing.biased));
                let results: Vec<Dense> = match &t.op {
                    TemplateOp::Gemm(gm) if gm.norm.is_none() => vec![gemm(&ops[0], &ops[1], gm.out)?],
                    op => {
                        let mut r = self.by_interp(op, &t.operands[..n_prod], &ops[..n_prod], k, plan)?;
                        // a folded norm's rows are a result only where the kernel stores them
                        if let TemplateOp::Gemm(gm) = op {
                            if t.epilogue.is_some() || gm.product_outputs(k.outputs.len()) < 2 {
                                r.truncate(1);
                            }
                        }
                        r
                    }
                };
                match &t.epilogue {
                    Some(f) => {
                        let (shape, data) = &results[0];
                        let outs = self.fusion(k, f, mem, Some((shape, data)))?;
                        for (o, v) in outs.iter().enumerate() {
                            self.store(plan, mem, k, o, v)?;
                        }
                    }
                    None => {
                        for (o, (_, v)) in results.iter().enumerate() {
                            self.store(plan, mem, k, o, v)?;
                        }
                    }
                }
                if route.is_some() {
                    self.route_tail(plan, k, mem)?;
                }
            }
            KernelKind::Scan(s) => {
                let ops: Vec<Dense> = k
                    .inputs
                    .iter()
                    .map(|r| self.gather(&r.view, mem.get(&r.buffer).ok_or("scan operand not written")?))
                    .collect::<Result<_, _>>()?;
                let len = dim(&s.length, self.env)? as usize;
                let mut carries: Vec<Vec<f64>> = ops[..s.n_carry].iter().map(|(_, d)| d.clone()).collect();
                let n_out = k.outputs.len();
                let mut stacked: Vec<Vec<Dense>> = vec![Vec::new(); n_out - s.n_carry];
                for t in 0..len {
                    let mut body_mem = Memory::new();
                    for (i, b) in s.body.inputs.iter().enumerate() {
                        let v = if i < s.n_carry {
                            carries[i].clone()
                        } else if i < s.n_carry + s.n_seq {
                            take(&ops[i].0, &ops[i].1, s.axis, t)
                        } else {
                            ops[i].1.clone()
                        };
                        body_mem.insert(*b, v);
                    }
                    self.run(&s.body, &mut body_mem)?;
                    for (j, o) in s.body.outputs.iter().enumerate() {
                        let b = s.body.buffer(o.buffer).ok_or("bad body output")?;
                        let v = body_mem.get(&o.buffer).ok_or("body output not written")?.clone();
                        if j < s.n_carry {
                            carries[j] = v;
                        } else {
                            stacked[j - s.n_carry].push((shape_of(&b.shape, self.env)?, v));
                        }
                    }
                }
                for (j, c) in carries.iter().enumerate() {
                    self.store(plan, mem, k, j, c)?;
                }
                for (j, steps) in stacked.iter().enumerate() {
                    let out_shape = shape_of(&k.outputs[s.n_carry + j].view.shape, self.env)?;
                    let mut data = vec![0.0; out_shape.iter().product()];
                    for (t, (_, v)) in steps.iter().enumerate() {
                        let step_shape: Vec<usize> = out_shape
                            .iter()
                            .enumerate()
                            .filter(|(d, _)| *d != s.axis)
                            .map(|(_, n)| *n)
                            .collect();
                        for (idx, x) in indices(&step_shape).into_iter().zip(v) {
                            let mut full = idx.clone();
                            full.insert(s.axis, t as i64);
                            data[linear(&out_shape, &full)] = *x;
                        }
                    }
                    self.store(plan, mem, k, s.n_carry + j, &data)?;
                }
            }
        }
        Ok(())
    }

    /// A GEMM's folded route ([`crate::kernel::RouteTail`]): `RouteTopK` on result 0's
    /// columns as `mem` holds them, written to the kernel's last two outputs (nothing for
    /// another kernel). Tests call it on a backend's result 0 to check that backend's route:
    /// a result within its tier of this evaluator's may still flip a near tie.
    pub fn route_tail(&self, plan: &KernelPlan, k: &Kernel, mem: &mut Memory) -> Result<(), String> {
        let KernelKind::Template(t) = &k.kind else {
            return Ok(());
        };
        let TemplateOp::Gemm(crate::kernel::Gemm { route: Some(r), .. }) = &t.op else {
            return Ok(());
        };
        // the bias is the kernel's last operand
        let bias = match r.routing.biased {
            true => Some(self.operand(k, t.operands.last().ok_or("a route without its bias")?, mem)?),
            false => None,
        };
        let out = &k.outputs[0];
        let (shape, data) = self.gather(&out.view, mem.get(&out.buffer).ok_or("gemm result not written")?)?;
        let n = *shape.last().ok_or("a gemm result of rank 0")?;
        let (col, e) = (r.col as usize, r.experts as usize);
        if col + e > n {
            return Err(format!("route columns {col}..{} past the result's {n}", col + e));
        }
        let probs: Vec<f64> = data
            .chunks(n)
            .flat_map(|row| row[col..col + e].iter())
            // the standalone kernel's prologue: `sigmoid` evaluated as the loop kernels do
            .map(|&x| round(DType::F32, if r.sigmoid { 1.0 / (1.0 + (-x).exp()) } else { x }))
            .collect();
        let mut pshape = shape.clone();
        *pshape.last_mut().expect("rank checked") = e;
        let tokens = Dim::constant(pshape[..pshape.len() - 1].iter().product::<usize>() as i64);
        let mut ops = vec![(pshape, probs)];
        ops.extend(bias);
        let dtypes = vec![DType::F32; ops.len()];
        let res = self.by_interp_typed(&r.template(tokens), &dtypes, &ops)?;
        let first = k.outputs.len() - 2;
        for (o, (_, v)) in res.iter().enumerate() {
            self.store(plan, &mut *mem, k, first + o, v)?;
        }
        Ok(())
    }

    /// A non-GEMM template: the interpreter's op on one-node graph.
    fn by_interp(
        &self,
        op: &TemplateOp,
        operands: &[Operand],
        ops: &[Dense],
        k: &Kernel,
        plan: &KernelPlan,
    ) -> Result<Vec<Dense>, String> {
        let dtypes: Vec<DType> = operands
            .iter()
            .map(|o| operand_dtype(k, o, plan))
            .collect::<Result<_, _>>()?;
        self.by_interp_typed(op, &dtypes, ops)
    }

    /// [`Self::by_interp`] with the operands' dtypes given.
    fn by_interp_typed(&self, op: &TemplateOp, dtypes: &[DType], ops: &[Dense]) -> Result<Vec<Dense>, String> {
        let graph_op = template_graph_op(op)?;
        let mut g = Graph::new();
        let mut args = Vec::new();
        let mut feed = HashMap::new();
        for (i, (shape, data)) in ops.iter().enumerate() {
            let dtype = dtypes[i];
            let name = format!("a{i}");
            let dims = shape.iter().map(|&d| Dim::constant(d as i64)).collect();
            args.push(
                g.add1(
                    Op::Input {
                        name: name.clone(),
                        kind: InputKind::Data,
                        dtype,
                        shape: dims,
                    },
                    &[],
                    None,
                )
                .map_err(|e| e.to_string())?,
            );
            feed.insert(name, tensor(dtype, shape.clone(), data));
        }
        let outs = g.add(graph_op, &args, None).map_err(|e| e.to_string())?;
        for (i, o) in outs.iter().enumerate() {
            g.add_output(&format!("o{i}"), *o, InputKind::Data);
        }
        let interp = Interpreter::new(&g, &NoParams).map_err(|e| e.to_string())?;
        let res = interp.run(&feed).map_err(|e| e.to_string())?;
        Ok((0..outs.len())
            .map(|i| {
                let t = &res[&format!("o{i}")];
                (t.shape.clone(), t.to_f64_vec())
            })
            .collect())
    }
}

/// The graph op whose interpreter semantics a non-GEMM template has (ir::fused documents each):
/// the oracle of every backend's template kernels.
pub fn template_graph_op(op: &TemplateOp) -> Result<Op, String> {
    use crate::fused::Fused;
    let f = |x: Fused| Op::Fused(x);
    Ok(match op {
        TemplateOp::TopK { k, axis } => Op::TopK { k: *k, axis: *axis },
        TemplateOp::ArgMax { axis } => Op::ArgMax { axis: *axis },
        TemplateOp::ScatterAdd { axis } => Op::ScatterAddAlong { axis: *axis },
        TemplateOp::RmsNormQuantFp8 { eps, residual, .. } => f(if *residual {
            Fused::AddRmsNormQuantFp8 { eps: *eps }
        } else {
            Fused::RmsNormQuantFp8 { eps: *eps }
        }),
        TemplateOp::SwiGluQuantFp8 { .. } => f(Fused::SwiGluQuantFp8),
        TemplateOp::GroupedGemm { epilogue, .. } => f(Fused::GroupedMatmul { epilogue: *epilogue }),
        TemplateOp::Attention { scale, .. } => f(Fused::FlashAttention { scale: *scale }),
        TemplateOp::LinearAttnChunk { chunk, gate: None, .. } => f(Fused::LinearAttnChunk { chunk: *chunk }),
        TemplateOp::LinearAttnStep {
            gate: None, qk: None, ..
        } => f(Fused::LinearAttnStep),
        TemplateOp::LinearAttnStep {
            gate: None,
            qk: Some(_),
            ..
        } => return Err("a lightning step that norms its q and k needs its group norm and gate too".into()),
        TemplateOp::LinearAttnStep {
            gate: Some(g),
            qk: Some(p),
            ..
        } => f(Fused::LinearAttnQkGate {
            groups: g.groups,
            eps: g.eps,
            qk_eps: p.eps,
            rotary: p.rotary,
            scale: p.scale,
        }),
        TemplateOp::LinearAttnChunk {
            chunk, gate: Some(g), ..
        } => f(Fused::LinearAttnGate {
            chunk: Some(*chunk),
            groups: g.groups,
            eps: g.eps,
        }),
        TemplateOp::LinearAttnStep { gate: Some(g), .. } => f(Fused::LinearAttnGate {
            chunk: None,
            groups: g.groups,
            eps: g.eps,
        }),
        TemplateOp::RouteTopK { routing, .. } => f(routing.fused()),
        TemplateOp::QuantizeFp8 { rows, cols } => f(Fused::QuantizeFp8 {
            rows: *rows,
            cols: *cols,
        }),
        TemplateOp::DequantizeFp8 { rows, cols, to } => f(Fused::DequantizeFp8 {
            rows: *rows,
            cols: *cols,
            to: *to,
        }),
        TemplateOp::ScaledGemmFp8 { out, .. } => f(Fused::ScaledMatmulFp8 { out: *out }),
        TemplateOp::RmsNorm { eps, .. } => f(Fused::RmsNorm { eps: *eps }),
        TemplateOp::AddRmsNorm { eps, .. } => f(Fused::AddRmsNorm { eps: *eps }),
        TemplateOp::Softmax { .. } => f(Fused::Softmax),
        TemplateOp::QkNormRope { eps, rotary, .. } => f(Fused::QkNormRope {
            eps: *eps,
            rotary: *rotary,
        }),
        TemplateOp::GroupNormGate { groups, eps, .. } => f(Fused::GroupNormGate {
            groups: *groups,
            eps: *eps,
        }),
        // the normalised rows as a second result (stored where the kernel has a second output)
        TemplateOp::Gemm(crate::kernel::Gemm { norm: Some(r), .. }) => f(Fused::NormMatmul {
            eps: r.eps,
            emit_norm: true,
        }),
        TemplateOp::Gemm(_) => return Err("gemm has no single graph op: it is evaluated directly".into()),
    })
}

/// The dtype of a template operand: its buffer's, or its prologue's stored value's.
fn operand_dtype(k: &Kernel, o: &Operand, plan: &KernelPlan) -> Result<DType, String> {
    match o {
        Operand::Buffer(i) => {
            let r = k.inputs.get(*i).ok_or("operand names a missing input")?;
            Ok(plan.buffer(r.buffer).ok_or("operand names a missing buffer")?.dtype)
        }
        Operand::Prologue(f) => {
            let e = f.stores.first().ok_or("a prologue without a store")?;
            Ok(f.exprs.get(*e).ok_or("bad prologue store")?.dtype)
        }
    }
}

struct NoParams;
impl ParamSource for NoParams {
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
        Err(format!("no parameter {}", spec.name))
    }
}

pub fn tensor(dtype: DType, shape: Vec<usize>, data: &[f64]) -> Tensor {
    if dtype.is_float() {
        Tensor::from_f32(dtype, shape, data.iter().map(|&x| x as f32).collect())
    } else if dtype.is_int() {
        Tensor::from_i64(dtype, shape, data.iter().map(|&x| x as i64).collect())
    } else {
        Tensor::from_bool(shape, data.iter().map(|&x| x != 0.0).collect())
    }
}

/// Slice `t` along `axis`, the axis removed.
fn take(shape: &[usize], data: &[f64], axis: usize, t: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for idx in indices(shape) {
        if idx[axis] as usize == t {
            out.push(data[linear(shape, &idx)]);
        }
    }
    out
}

/// Batched matmul with broadcast batch dims, f64 accumulation, rounded to `out`.
fn gemm(a: &Dense, b: &Dense, out: DType) -> Result<Dense, String> {
    let (sa, sb) = (&a.0, &b.0);
    let (ra, rb) = (sa.len(), sb.len());
    let (m, kk, n) = (sa[ra - 2], sa[ra - 1], sb[rb - 1]);
    let rank = ra.max(rb) - 2;
    let mut batch = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + (ra - 2) >= rank { sa[i + ra - 2 - rank] } else { 1 };
        let db = if i + (rb - 2) >= rank { sb[i + rb - 2 - rank] } else { 1 };
        batch.push(da.max(db));
    }
    let bidx = |s: &[usize], r: usize, idx: &[i64]| -> usize {
        let lead = rank - (r - 2);
        let mut lin = 0usize;
        for d in 0..r - 2 {
            let i = if s[d] == 1 { 0 } else { idx[lead + d] as usize };
            lin = lin * s[d] + i;
        }
        lin
    };
    let mut shape = batch.clone();
    shape.extend([m, n]);
    let mut data = Vec::with_capacity(shape.iter().product());
    for idx in indices(&batch) {
        let (ba, bb) = (bidx(sa, ra, &idx), bidx(sb, rb, &idx));
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for l in 0..kk {
                    acc += a.1[(ba * m + i) * kk + l] * b.1[(bb * kk + l) * n + j];
                }
                data.push(round(out, acc));
            }
        }
    }
    Ok((shape, data))
}
