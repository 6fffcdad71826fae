//! Elaboration: DSL program + HF `config.json` → graph IR.
//!
//! Everything that is not a tensor is evaluated here, at compile time: config arithmetic,
//! `for` loops (unrolled), `if` on compile-time conditions, functions (inlined), string
//! interpolation of checkpoint names. Tensor expressions become graph nodes carrying the
//! `file:line:col` of the expression that made them. A `scan` builds its body as a nested
//! graph; tensors of enclosing graphs used inside a body become captured inputs.

use super::ast::*;
use crate::dtype::DType;
use crate::graph::{Graph, IrError, SrcLoc, TensorType, Value};
use crate::op::{BinaryOp, InputKind, Op, ReduceOp, Stack, UnaryOp};
use crate::shape::{Dim, Shape};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

/// An error located in a DSL file, printed as `file:line:col: message` plus the source line.
#[derive(Clone, Debug, PartialEq)]
pub struct DslError {
    pub file: String,
    pub line: u32,
    pub col: u32,
    pub msg: String,
    pub source_line: String,
}

impl fmt::Display for DslError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.msg)?;
        if !self.source_line.is_empty() {
            let n = self.line.to_string();
            write!(
                f,
                "\n  {n} | {}\n  {} | {}^",
                self.source_line,
                " ".repeat(n.len()),
                " ".repeat(self.col.saturating_sub(1) as usize)
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for DslError {}

/// The result of elaborating a model file against a config.
#[derive(Clone, Debug)]
pub struct Model {
    pub graph: Graph,
    /// config.json keys the model file never read (HF files carry many: `auto_map`, ...)
    pub unused_config_keys: Vec<String>,
}

/// Parse and elaborate `src` (named `file` in errors) against `config` (an HF config.json).
pub fn elaborate(file: &str, src: &str, config: &serde_json::Value) -> Result<Model, DslError> {
    let lines: Vec<&str> = src.lines().collect();
    let line_of = |l: u32| {
        lines
            .get(l.saturating_sub(1) as usize)
            .copied()
            .unwrap_or("")
            .to_string()
    };
    let prog = super::parser::parse(file, src).map_err(|e| DslError {
        file: file.to_string(),
        line: e.line,
        col: e.col,
        msg: format!("expected {}, found {}", e.expected, e.found),
        source_line: line_of(e.line),
    })?;
    let empty = serde_json::Map::new();
    let cfg = config.as_object().unwrap_or(&empty);
    let mut el = Elab::new(Arc::from(file), cfg);
    let to_dsl = |e: Err0| DslError {
        file: file.to_string(),
        line: e.span.line,
        col: e.span.col,
        source_line: line_of(e.span.line),
        msg: e.msg,
    };
    el.program(&prog).map_err(to_dsl)?;
    let graph = el.graphs.pop().unwrap().graph;
    graph.validate().map_err(|e| to_dsl(el.ir_err(e, Span::default())))?;
    let mut unused: Vec<String> = cfg.keys().filter(|k| !el.used_keys.contains(*k)).cloned().collect();
    unused.sort();
    Ok(Model {
        graph,
        unused_config_keys: unused,
    })
}

/// Read a model file from disk and elaborate it.
pub fn elaborate_file(path: &std::path::Path, config: &serde_json::Value) -> Result<Model, DslError> {
    let name = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| DslError {
        file: name.clone(),
        line: 0,
        col: 0,
        msg: format!("cannot read the model file: {e}"),
        source_line: String::new(),
    })?;
    elaborate(&name, &src, config)
}

struct Err0 {
    span: Span,
    msg: String,
}

type R<T> = Result<T, Err0>;

fn err<T>(span: Span, msg: impl Into<String>) -> R<T> {
    Err(Err0 { span, msg: msg.into() })
}

/// A tensor living in graph number `graph` of the elaborator's stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct TRef {
    graph: usize,
    v: Value,
}

#[derive(Clone)]
struct FnDef {
    params: Vec<FnParam>,
    body: Block,
}

#[derive(Clone)]
enum Val {
    Unit,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    DType(DType),
    Type(TensorType),
    Dim(Dim),
    Tensor(TRef),
    List(Vec<Val>),
    Tuple(Vec<Val>),
    Fn(Rc<FnDef>),
    Json(serde_json::Value),
}

impl Val {
    fn kind(&self) -> &'static str {
        match self {
            Val::Unit => "nothing",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a float",
            Val::Bool(_) => "a bool",
            Val::Str(_) => "a string",
            Val::DType(_) => "a dtype",
            Val::Type(_) => "a tensor type",
            Val::Dim(_) => "a symbolic dimension",
            Val::Tensor(_) => "a tensor",
            Val::List(_) => "a list",
            Val::Tuple(_) => "a tuple",
            Val::Fn(_) => "a function",
            Val::Json(_) => "a JSON value",
        }
    }
}

/// A graph under construction: the model, or a scan body with its captured outer values.
struct GraphCtx {
    graph: Graph,
    /// outer tensor -> this graph's input standing for it
    captures: Vec<(TRef, Value)>,
}

struct StateDecl {
    key: String,
    ty: TensorType,
    carried: bool,
    span: Span,
}

struct Elab<'a> {
    file: Arc<str>,
    cfg: &'a serde_json::Map<String, serde_json::Value>,
    used_keys: BTreeSet<String>,
    scopes: Vec<HashMap<String, Val>>,
    graphs: Vec<GraphCtx>,
    states: HashMap<String, StateDecl>,
    /// state variable name (in the scope where it was declared) -> key; resolved by value
    state_of_value: HashMap<TRef, String>,
    outputs: BTreeSet<String>,
    depth: usize,
}

const MAX_CALL_DEPTH: usize = 64;

impl<'a> Elab<'a> {
    fn new(file: Arc<str>, cfg: &'a serde_json::Map<String, serde_json::Value>) -> Self {
        let mut globals = HashMap::new();
        for d in DType::ALL {
            globals.insert(d.name().to_string(), Val::DType(d));
        }
        globals.insert("inf".into(), Val::Float(f64::INFINITY));
        Elab {
            file,
            cfg,
            used_keys: BTreeSet::new(),
            scopes: vec![globals],
            graphs: vec![GraphCtx {
                graph: Graph::new(),
                captures: vec![],
            }],
            states: HashMap::new(),
            state_of_value: HashMap::new(),
            outputs: BTreeSet::new(),
            depth: 0,
        }
    }

    fn loc(&self, span: Span) -> Option<SrcLoc> {
        Some(SrcLoc {
            file: self.file.clone(),
            line: span.line,
            col: span.col,
        })
    }

    fn ir_err(&self, e: IrError, span: Span) -> Err0 {
        let span = e
            .loc
            .as_ref()
            .map(|l| Span {
                line: l.line,
                col: l.col,
            })
            .unwrap_or(span);
        Err0 { span, msg: e.msg }
    }

    // ---- scopes ------------------------------------------------------------------------

    fn lookup(&self, name: &str) -> Option<&Val> {
        self.scopes.iter().rev().find_map(|s| s.get(name))
    }

    fn bind(&mut self, name: &str, v: Val) {
        if name == "_" {
            return;
        }
        if let Val::Tensor(t) = &v {
            if t.graph == self.graphs.len() - 1 {
                let g = &mut self.graphs[t.graph].graph;
                g.set_label(t.v, name);
            }
        }
        self.scopes.last_mut().unwrap().insert(name.to_string(), v);
    }

    fn with_scope<T>(&mut self, vars: HashMap<String, Val>, f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        self.scopes.push(vars);
        let r = f(self);
        self.scopes.pop();
        r
    }

    // ---- graph helpers -----------------------------------------------------------------

    fn cur(&self) -> usize {
        self.graphs.len() - 1
    }

    /// The value of `t` usable in the current graph (capturing it into scan bodies).
    fn use_t(&mut self, t: TRef) -> Value {
        let cur = self.cur();
        if t.graph == cur {
            return t.v;
        }
        if let Some((_, v)) = self.graphs[cur].captures.iter().find(|(o, _)| *o == t) {
            return *v;
        }
        let ty = self.graphs[t.graph].graph.ty(t.v).clone();
        let n = self.graphs[cur].captures.len();
        let ctx = &mut self.graphs[cur];
        let v = ctx
            .graph
            .add1(
                Op::Input {
                    name: format!("capture{n}"),
                    kind: InputKind::Data,
                    dtype: ty.dtype,
                    shape: ty.shape,
                },
                &[],
                None,
            )
            .expect("inputs are always well-typed");
        ctx.captures.push((t, v));
        v
    }

    fn ty(&self, t: TRef) -> TensorType {
        self.graphs[t.graph].graph.ty(t.v).clone()
    }

    fn add(&mut self, op: Op, args: &[TRef], span: Span) -> R<Vec<TRef>> {
        let vals: Vec<Value> = args.iter().map(|t| self.use_t(*t)).collect();
        let loc = self.loc(span);
        let cur = self.cur();
        let outs = self.graphs[cur]
            .graph
            .add(op, &vals, loc)
            .map_err(|e| Err0 { span, msg: e.msg })?;
        Ok(outs.into_iter().map(|v| TRef { graph: cur, v }).collect())
    }

    fn add1(&mut self, op: Op, args: &[TRef], span: Span) -> R<TRef> {
        Ok(self.add(op, args, span)?[0])
    }

    fn constant(&mut self, value: f64, dtype: DType, span: Span) -> R<TRef> {
        self.add1(Op::Const { value, dtype }, &[], span)
    }

    /// A scalar or dim lifted to a tensor, typed to combine with a tensor of dtype `like`.
    fn lift(&mut self, v: &Val, like: Option<DType>, span: Span) -> R<TRef> {
        match v {
            Val::Tensor(t) => Ok(*t),
            Val::Int(i) => {
                let dt = match like {
                    Some(d) if d != DType::Bool => d,
                    _ => DType::I64,
                };
                self.constant(*i as f64, dt, span)
            }
            Val::Float(f) => {
                let dt = match like {
                    Some(d) if d.is_float() => d,
                    _ => DType::F32,
                };
                self.constant(*f, dt, span)
            }
            Val::Bool(b) => self.constant(if *b { 1.0 } else { 0.0 }, DType::Bool, span),
            Val::Dim(d) => match d.as_const() {
                Some(c) => self.lift(&Val::Int(c), like, span),
                None => {
                    let t = self.add1(Op::DimValue { dim: d.clone() }, &[], span)?;
                    match like {
                        Some(dt) if dt.is_float() => self.add1(Op::Cast { to: dt }, &[t], span),
                        _ => Ok(t),
                    }
                }
            },
            other => err(span, format!("expected a tensor or a number, found {}", other.kind())),
        }
    }

    fn tensor(&mut self, v: &Val, span: Span) -> R<TRef> {
        match v {
            Val::Tensor(t) => Ok(*t),
            other => err(span, format!("expected a tensor, found {}", other.kind())),
        }
    }

    // ---- statements --------------------------------------------------------------------

    fn program(&mut self, p: &Program) -> R<()> {
        for s in &p.stmts {
            self.stmt(s)?;
        }
        for (name, st) in &self.states {
            if !st.carried {
                return err(st.span, format!("state `{name}` (\"{}\") is never carried", st.key));
            }
        }
        if self.outputs.is_empty() {
            return err(Span { line: 1, col: 1 }, "the model has no `output`");
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> R<()> {
        match &s.kind {
            StmtKind::Config { name, ty, default } => self.config(name, ty, default.as_ref()),
            StmtKind::Require { cond, message } => {
                let c = self.expr(cond)?;
                let msg = self.expr(message)?;
                let msg = match msg {
                    Val::Str(m) => self.interpolate(&m, message.span, None, false)?,
                    other => {
                        return err(
                            message.span,
                            format!("require's message must be a string, found {}", other.kind()),
                        )
                    }
                };
                match c {
                    Val::Bool(true) => Ok(()),
                    Val::Bool(false) => err(cond.span, format!("requirement failed: {msg}")),
                    other => err(
                        cond.span,
                        format!("require needs a compile-time bool, found {}", other.kind()),
                    ),
                }
            }
            StmtKind::Dim { names } => {
                for n in names {
                    self.bind(&n.name, Val::Dim(Dim::sym(&n.name)));
                }
                Ok(())
            }
            StmtKind::Input { name, ty } => {
                let ty = self.type_expr(ty)?;
                if self.cur() != 0 {
                    return err(s.span, "inputs are declared outside scan bodies");
                }
                let t = self.add1(
                    Op::Input {
                        name: name.name.clone(),
                        kind: InputKind::Data,
                        dtype: ty.dtype,
                        shape: ty.shape,
                    },
                    &[],
                    name.span,
                )?;
                self.bind(&name.name, Val::Tensor(t));
                Ok(())
            }
            StmtKind::State { name, ty, key } => {
                let ty = self.type_expr(ty)?;
                let key = self.string(key, None)?;
                if self.cur() != 0 {
                    return err(s.span, "states are declared outside scan bodies");
                }
                if self.states.contains_key(&key) {
                    return err(s.span, format!("state \"{key}\" is declared twice"));
                }
                let t = self.add1(
                    Op::Input {
                        name: key.clone(),
                        kind: InputKind::State,
                        dtype: ty.dtype,
                        shape: ty.shape.clone(),
                    },
                    &[],
                    name.span,
                )?;
                self.states.insert(
                    key.clone(),
                    StateDecl {
                        key: key.clone(),
                        ty,
                        carried: false,
                        span: s.span,
                    },
                );
                self.state_of_value.insert(t, key);
                self.bind(&name.name, Val::Tensor(t));
                Ok(())
            }
            StmtKind::Param { name, ty, key, stack } => self.param(name, ty, key, stack.as_ref()),
            StmtKind::Let { pat, value } => {
                let v = self.expr(value)?;
                self.bind_pattern(pat, v)
            }
            StmtKind::Assign { name, value } => {
                let v = self.expr(value)?;
                for scope in self.scopes.iter_mut().rev() {
                    if let Some(slot) = scope.get_mut(&name.name) {
                        *slot = v;
                        return Ok(());
                    }
                }
                err(
                    name.span,
                    format!(
                        "`{}` is not defined; use `let {} = ...` to define it",
                        name.name, name.name
                    ),
                )
            }
            StmtKind::Fn { name, params, body } => {
                self.bind(
                    &name.name,
                    Val::Fn(Rc::new(FnDef {
                        params: params.clone(),
                        body: body.clone(),
                    })),
                );
                Ok(())
            }
            StmtKind::For { var, start, end, body } => {
                let a = self.int(start)?;
                let b = self.int(end)?;
                for i in a..b {
                    let vars = HashMap::from([(var.name.clone(), Val::Int(i))]);
                    self.with_scope(vars, |el| el.block(body).map(|_| ()))?;
                }
                Ok(())
            }
            StmtKind::Output { name, value } => {
                let name = self.string(name, None)?;
                let v = self.expr(value)?;
                let t = self.tensor(&v, value.span)?;
                if self.cur() != 0 {
                    return err(s.span, "outputs are declared outside scan bodies");
                }
                if !self.outputs.insert(name.clone()) {
                    return err(s.span, format!("output \"{name}\" is written twice"));
                }
                self.graphs[0].graph.add_output(&name, t.v, InputKind::Data);
                Ok(())
            }
            StmtKind::Carry { name, value } => {
                let cur = match self.lookup(&name.name) {
                    Some(Val::Tensor(t)) => *t,
                    _ => return err(name.span, format!("`{}` is not a state", name.name)),
                };
                let key = match self.state_of_value.get(&cur) {
                    Some(k) => k.clone(),
                    None => return err(name.span, format!("`{}` is not a state", name.name)),
                };
                let v = self.expr(value)?;
                let t = self.tensor(&v, value.span)?;
                if t.graph != 0 {
                    return err(s.span, "states are carried outside scan bodies");
                }
                let new_ty = self.ty(t);
                let st = self.states.get_mut(&key).unwrap();
                if st.carried {
                    return err(s.span, format!("state \"{key}\" is carried twice"));
                }
                if new_ty.dtype != st.ty.dtype || new_ty.rank() != st.ty.rank() {
                    return err(
                        value.span,
                        format!("state \"{key}\" is {} but is carried as {}", st.ty, new_ty),
                    );
                }
                st.carried = true;
                self.graphs[0].graph.add_output(&key, t.v, InputKind::State);
                Ok(())
            }
            StmtKind::Expr(e) => self.expr(e).map(|_| ()),
        }
    }

    fn config(&mut self, name: &Ident, ty: &Ident, default: Option<&Expr>) -> R<()> {
        let key = &name.name;
        self.used_keys.insert(key.clone());
        let raw = self.cfg.get(key).filter(|v| !v.is_null() || ty.name == "any");
        let v = match raw {
            None => match default {
                Some(d) => self.expr(d)?,
                None if ty.name == "any" => Val::Json(serde_json::Value::Null),
                None => {
                    return err(
                        name.span,
                        format!("config.json has no `{key}` (a required {})", ty.name),
                    )
                }
            },
            Some(j) => {
                let bad = |what: &str| err(name.span, format!("config.json's `{key}` must be {what}, found {j}"));
                match ty.name.as_str() {
                    "int" => match j
                        .as_i64()
                        .or_else(|| j.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                    {
                        Some(i) => Val::Int(i),
                        None => return bad("an integer"),
                    },
                    "float" => match j.as_f64() {
                        Some(f) => Val::Float(f),
                        None => return bad("a number"),
                    },
                    "bool" => match j.as_bool() {
                        Some(b) => Val::Bool(b),
                        None => return bad("true or false"),
                    },
                    "str" => match j.as_str() {
                        Some(s) => Val::Str(s.to_string()),
                        None => return bad("a string"),
                    },
                    "any" => Val::Json(j.clone()),
                    other => {
                        return err(
                            ty.span,
                            format!("unknown config type `{other}` (int, float, bool, str, any)"),
                        )
                    }
                }
            }
        };
        self.bind(key, v);
        Ok(())
    }

    fn param(&mut self, name: &Ident, ty: &Expr, key: &Expr, stack: Option<&StackClause>) -> R<()> {
        let ty = self.type_expr(ty)?;
        let stack = match stack {
            None => None,
            Some(sc) => {
                let a = self.int(&sc.start)?;
                let b = self.int(&sc.end)?;
                if a != 0 || b <= 0 {
                    return err(
                        sc.start.span,
                        format!("a stacked parameter runs over 0..N with N > 0, found {a}..{b}"),
                    );
                }
                Some(Stack {
                    var: sc.var.name.clone(),
                    count: b as usize,
                })
            }
        };
        let pattern = self.string(key, stack.as_ref().map(|s| s.var.as_str()))?;
        if let Some(s) = &stack {
            if !pattern.contains(&format!("{{{}}}", s.var)) {
                return err(
                    key.span,
                    format!("stacked parameter name \"{pattern}\" does not mention {{{}}}", s.var),
                );
            }
        }
        if let Some(d) = ty.shape.iter().find(|d| d.is_symbolic()) {
            return err(
                name.span,
                format!("parameter shapes are fixed by the config; `{d}` is symbolic"),
            );
        }
        let t = self.add1(
            Op::Param {
                name: pattern,
                stack,
                dtype: ty.dtype,
                shape: ty.shape,
            },
            &[],
            name.span,
        )?;
        self.bind(&name.name, Val::Tensor(t));
        Ok(())
    }

    fn bind_pattern(&mut self, pat: &Pattern, v: Val) -> R<()> {
        match pat {
            Pattern::Name(id) => {
                self.bind(&id.name, v);
                Ok(())
            }
            Pattern::Tuple(pats, pspan) => {
                let items = match v {
                    Val::Tuple(items) | Val::List(items) => items,
                    other => {
                        return err(
                            *pspan,
                            format!("cannot destructure {} into {} names", other.kind(), pats.len()),
                        )
                    }
                };
                if items.len() != pats.len() {
                    return err(
                        *pspan,
                        format!("cannot destructure {} values into {} names", items.len(), pats.len()),
                    );
                }
                for (p, item) in pats.iter().zip(items) {
                    self.bind_pattern(p, item)?;
                }
                Ok(())
            }
        }
    }

    fn block(&mut self, b: &Block) -> R<Val> {
        self.with_scope(HashMap::new(), |el| {
            for s in &b.stmts {
                el.stmt(s)?;
            }
            match &b.tail {
                Some(e) => el.expr(e),
                None => Ok(Val::Unit),
            }
        })
    }

    // ---- typed evaluation helpers ------------------------------------------------------

    fn int(&mut self, e: &Expr) -> R<i64> {
        match self.expr(e)? {
            Val::Int(i) => Ok(i),
            Val::Dim(d) if d.as_const().is_some() => Ok(d.as_const().unwrap()),
            other => err(
                e.span,
                format!("expected a compile-time integer, found {}", other.kind()),
            ),
        }
    }

    fn string(&mut self, e: &Expr, keep: Option<&str>) -> R<String> {
        match self.expr(e)? {
            Val::Str(s) => self.interpolate(&s, e.span, keep, false),
            other => err(e.span, format!("expected a string, found {}", other.kind())),
        }
    }

    /// Replace `{name}` by the value of `name` (an integer or string), leaving `{keep}` as is.
    fn interpolate(&self, s: &str, span: Span, keep: Option<&str>, lenient: bool) -> R<String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('{') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let Some(j) = after.find('}') else {
                return err(span, format!("unclosed `{{` in \"{s}\""));
            };
            let name = after[..j].trim();
            if Some(name) == keep {
                out.push_str(&format!("{{{name}}}"));
            } else {
                match self.lookup(name) {
                    Some(Val::Int(v)) => out.push_str(&v.to_string()),
                    Some(Val::Str(v)) => out.push_str(v),
                    Some(other) => return err(span, format!("cannot put {} `{name}` into a string", other.kind())),
                    None if lenient => out.push_str(&format!("{{{name}}}")),
                    None => return err(span, format!("`{name}` in \"{s}\" is not defined")),
                }
            }
            rest = &after[j + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn type_expr(&mut self, e: &Expr) -> R<TensorType> {
        match self.expr(e)? {
            Val::Type(t) => Ok(t),
            Val::DType(d) => Ok(TensorType::scalar(d)),
            other => err(
                e.span,
                format!("expected a tensor type like `f32[batch, seq]`, found {}", other.kind()),
            ),
        }
    }

    fn dim_of(&self, v: &Val, span: Span) -> R<Dim> {
        match v {
            Val::Int(i) if *i >= 0 => Ok(Dim::constant(*i)),
            Val::Dim(d) => Ok(d.clone()),
            Val::Int(i) => err(span, format!("a dimension cannot be negative ({i})")),
            other => err(span, format!("expected a dimension, found {}", other.kind())),
        }
    }

    // ---- expressions -------------------------------------------------------------------

    fn expr(&mut self, e: &Expr) -> R<Val> {
        let span = e.span;
        match &e.kind {
            ExprKind::Int(i) => Ok(Val::Int(*i)),
            ExprKind::Float(f) => Ok(Val::Float(*f)),
            // `{name}` is replaced where `name` is defined; the rest waits for the place that
            // uses the string (a parameter's `{e}` stack variable) and is checked there.
            ExprKind::Str(s) => Ok(Val::Str(self.interpolate(s, span, None, true)?)),
            ExprKind::Bool(b) => Ok(Val::Bool(*b)),
            ExprKind::Name(n) => match self.lookup(n) {
                Some(v) => Ok(v.clone()),
                None => err(span, format!("`{n}` is not defined")),
            },
            ExprKind::Unary { op, expr } => {
                let v = self.expr(expr)?;
                self.unary(*op, v, span)
            }
            ExprKind::Binary { op, lhs, rhs } => {
                // short-circuit compile-time logic
                let a = self.expr(lhs)?;
                if let (BinOp::And, Val::Bool(false)) | (BinOp::Or, Val::Bool(true)) = (op, &a) {
                    return Ok(a);
                }
                let b = self.expr(rhs)?;
                self.binary(*op, a, b, span)
            }
            ExprKind::Call { func, args } => self.call(func, args, span),
            ExprKind::Index { base, items } => {
                let b = self.expr(base)?;
                self.index(b, items, span)
            }
            ExprKind::List(items) => Ok(Val::List(items.iter().map(|x| self.expr(x)).collect::<R<_>>()?)),
            ExprKind::Tuple(items) => {
                if items.is_empty() {
                    return Ok(Val::Unit);
                }
                Ok(Val::Tuple(items.iter().map(|x| self.expr(x)).collect::<R<_>>()?))
            }
            ExprKind::If { cond, then, els } => match self.expr(cond)? {
                Val::Bool(true) => self.block(then),
                Val::Bool(false) => match els {
                    Some(e) => self.expr(e),
                    None => Ok(Val::Unit),
                },
                Val::Tensor(_) => err(
                    cond.span,
                    "`if` decides at compile time; use where(cond, a, b) to select between tensors",
                ),
                other => err(cond.span, format!("`if` needs a bool, found {}", other.kind())),
            },
            ExprKind::Block(b) => self.block(b),
            ExprKind::Scan {
                carries,
                seqs,
                axis,
                body,
            } => self.scan(carries, seqs, axis.as_deref(), body, span),
        }
    }

    fn unary(&mut self, op: UnOp, v: Val, span: Span) -> R<Val> {
        match (op, v) {
            (UnOp::Neg, Val::Int(i)) => Ok(Val::Int(-i)),
            (UnOp::Neg, Val::Float(f)) => Ok(Val::Float(-f)),
            (UnOp::Neg, Val::Dim(d)) => Ok(Val::Dim(d.neg())),
            (UnOp::Not, Val::Bool(b)) => Ok(Val::Bool(!b)),
            (UnOp::Neg, Val::Tensor(t)) => Ok(Val::Tensor(self.add1(Op::Unary(UnaryOp::Neg), &[t], span)?)),
            (UnOp::Not, Val::Tensor(t)) => Ok(Val::Tensor(self.add1(Op::Unary(UnaryOp::Not), &[t], span)?)),
            (op, v) => err(
                span,
                format!(
                    "cannot apply {} to {}",
                    if op == UnOp::Neg { "-" } else { "!" },
                    v.kind()
                ),
            ),
        }
    }

    fn binary(&mut self, op: BinOp, a: Val, b: Val, span: Span) -> R<Val> {
        if matches!(a, Val::Tensor(_)) || matches!(b, Val::Tensor(_)) {
            return self.tensor_binary(op, a, b, span).map(Val::Tensor);
        }
        use Val::*;
        let cmp = |o: std::cmp::Ordering| -> bool {
            match op {
                BinOp::Eq => o.is_eq(),
                BinOp::Ne => o.is_ne(),
                BinOp::Lt => o.is_lt(),
                BinOp::Le => o.is_le(),
                BinOp::Gt => o.is_gt(),
                BinOp::Ge => o.is_ge(),
                _ => unreachable!(),
            }
        };
        let is_cmp = matches!(
            op,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge
        );
        // constant dims behave as integers
        let norm = |v: Val| match v {
            Dim(d) if d.as_const().is_some() => Int(d.as_const().unwrap()),
            v => v,
        };
        let (a, b) = (norm(a), norm(b));
        match (a, b) {
            (Bool(x), Bool(y)) => match op {
                BinOp::And => Ok(Bool(x && y)),
                BinOp::Or => Ok(Bool(x || y)),
                BinOp::Eq => Ok(Bool(x == y)),
                BinOp::Ne => Ok(Bool(x != y)),
                _ => err(span, "bools support only &&, ||, == and !="),
            },
            (DType(x), DType(y)) => match op {
                BinOp::Eq => Ok(Bool(x == y)),
                BinOp::Ne => Ok(Bool(x != y)),
                _ => err(span, "dtypes support only == and !="),
            },
            (Str(x), Str(y)) => match op {
                BinOp::Eq => Ok(Bool(x == y)),
                BinOp::Ne => Ok(Bool(x != y)),
                BinOp::Add => Ok(Str(x + &y)),
                _ => err(span, "strings support only ==, != and +"),
            },
            (Int(x), Int(y)) => {
                if is_cmp {
                    return Ok(Bool(cmp(x.cmp(&y))));
                }
                match op {
                    BinOp::Add => Ok(Int(x + y)),
                    BinOp::Sub => Ok(Int(x - y)),
                    BinOp::Mul => Ok(Int(x * y)),
                    BinOp::Div => {
                        if y == 0 {
                            return err(span, "division by zero");
                        }
                        Ok(Float(x as f64 / y as f64))
                    }
                    BinOp::FloorDiv | BinOp::Mod => {
                        if y == 0 {
                            return err(span, "division by zero");
                        }
                        // Python semantics: floor division, remainder takes the divisor's sign
                        let q = x / y - i64::from(x % y != 0 && ((x < 0) != (y < 0)));
                        Ok(if op == BinOp::FloorDiv { Int(q) } else { Int(x - q * y) })
                    }
                    BinOp::Pow => {
                        if y >= 0 {
                            Ok(Int(x.pow(y as u32)))
                        } else {
                            Ok(Float((x as f64).powf(y as f64)))
                        }
                    }
                    _ => err(span, format!("{op:?} is not defined on integers")),
                }
            }
            (x @ (Int(_) | Float(_)), y @ (Int(_) | Float(_))) => {
                let f = |v: &Val| match v {
                    Int(i) => *i as f64,
                    Float(f) => *f,
                    _ => unreachable!(),
                };
                let (x, y) = (f(&x), f(&y));
                if is_cmp {
                    return Ok(Bool(cmp(x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Less))));
                }
                match op {
                    BinOp::Add => Ok(Float(x + y)),
                    BinOp::Sub => Ok(Float(x - y)),
                    BinOp::Mul => Ok(Float(x * y)),
                    BinOp::Div => Ok(Float(x / y)),
                    BinOp::FloorDiv => Ok(Float((x / y).floor())),
                    BinOp::Pow => Ok(Float(x.powf(y))),
                    _ => err(span, format!("{op:?} is not defined on floats")),
                }
            }
            (x @ (Int(_) | Dim(_)), y @ (Int(_) | Dim(_))) => {
                let dx = self.dim_or_int(&x);
                let dy = self.dim_or_int(&y);
                match op {
                    BinOp::Add => Ok(Dim(dx.add(&dy))),
                    BinOp::Sub => Ok(Dim(dx.sub(&dy))),
                    BinOp::Mul => Ok(Dim(dx.mul(&dy))),
                    BinOp::FloorDiv => match (dy.as_const(), dx.div_const(dy.as_const().unwrap_or(0))) {
                        (Some(_), Some(q)) => Ok(Dim(q)),
                        _ => err(span, format!("`{dx}` is not divisible by `{dy}` at compile time")),
                    },
                    BinOp::Eq => Ok(Bool(dx == dy)),
                    BinOp::Ne => Ok(Bool(dx != dy)),
                    _ => err(
                        span,
                        format!("{op:?} is not defined on symbolic dimensions (they are only known at run time)"),
                    ),
                }
            }
            (x, y) => err(span, format!("cannot apply {op:?} to {} and {}", x.kind(), y.kind())),
        }
    }

    fn dim_or_int(&self, v: &Val) -> Dim {
        match v {
            Val::Int(i) => Dim::constant(*i),
            Val::Dim(d) => d.clone(),
            _ => unreachable!(),
        }
    }

    /// Tensor arithmetic. Scalars take the tensor's dtype; an integer tensor meeting a float
    /// is cast to f32 (or the float tensor's dtype) first.
    fn tensor_binary(&mut self, op: BinOp, a: Val, b: Val, span: Span) -> R<TRef> {
        if op == BinOp::MatMul {
            let x = self.tensor(&a, span)?;
            let y = self.tensor(&b, span)?;
            return self.add1(Op::Matmul, &[x, y], span);
        }
        let dt_of = |el: &Self, v: &Val| match v {
            Val::Tensor(t) => Some(el.ty(*t).dtype),
            _ => None,
        };
        let (da, db) = (dt_of(self, &a), dt_of(self, &b));
        let scalar_is_float = |v: &Val| matches!(v, Val::Float(_));
        let mut x = self.lift(&a, db, span)?;
        let mut y = self.lift(&b, da, span)?;
        // int/float mixing: cast the int side
        let (tx, ty) = (self.ty(x).dtype, self.ty(y).dtype);
        if tx.is_int() && (ty.is_float() || scalar_is_float(&b)) {
            let to = if ty.is_float() { ty } else { DType::F32 };
            x = self.add1(Op::Cast { to }, &[x], span)?;
            if !ty.is_float() {
                y = self.lift(&b, Some(to), span)?;
            }
        } else if ty.is_int() && (tx.is_float() || scalar_is_float(&a)) {
            let to = if tx.is_float() { tx } else { DType::F32 };
            y = self.add1(Op::Cast { to }, &[y], span)?;
            if !tx.is_float() {
                x = self.lift(&a, Some(to), span)?;
            }
        }
        let bop = match op {
            BinOp::Add => BinaryOp::Add,
            BinOp::Sub => BinaryOp::Sub,
            BinOp::Mul => BinaryOp::Mul,
            BinOp::Div => {
                // true division: integer tensors divide as f32
                if self.ty(x).dtype.is_int() && self.ty(y).dtype.is_int() {
                    x = self.add1(Op::Cast { to: DType::F32 }, &[x], span)?;
                    y = self.add1(Op::Cast { to: DType::F32 }, &[y], span)?;
                }
                BinaryOp::Div
            }
            BinOp::FloorDiv => {
                if !(self.ty(x).dtype.is_int() && self.ty(y).dtype.is_int()) {
                    return err(span, "`//` on tensors is defined for integers only");
                }
                BinaryOp::Div
            }
            BinOp::Mod => BinaryOp::Mod,
            BinOp::Pow => BinaryOp::Pow,
            BinOp::Eq => BinaryOp::Eq,
            BinOp::Ne => BinaryOp::Ne,
            BinOp::Lt => BinaryOp::Lt,
            BinOp::Le => BinaryOp::Le,
            BinOp::Gt => BinaryOp::Gt,
            BinOp::Ge => BinaryOp::Ge,
            BinOp::And => BinaryOp::And,
            BinOp::Or => BinaryOp::Or,
            BinOp::MatMul => unreachable!(),
        };
        self.add1(Op::Binary(bop), &[x, y], span)
    }

    fn index(&mut self, base: Val, items: &[IndexItem], span: Span) -> R<Val> {
        match base {
            Val::DType(dt) => {
                let mut shape = Vec::new();
                for it in items {
                    match it {
                        IndexItem::Expr(e) => {
                            let v = self.expr(e)?;
                            shape.push(self.dim_of(&v, e.span)?);
                        }
                        _ => return err(span, "a tensor type lists dimensions: `f32[batch, seq, 64]`"),
                    }
                }
                Ok(Val::Type(TensorType::new(dt, shape)))
            }
            Val::Tensor(t) => self.slice_tensor(t, items, span).map(Val::Tensor),
            Val::List(v) | Val::Tuple(v) => {
                if items.len() != 1 {
                    return err(span, "a list takes one index");
                }
                let IndexItem::Expr(e) = &items[0] else {
                    return err(span, "lists cannot be sliced");
                };
                let i = self.int(e)?;
                let n = v.len() as i64;
                let j = if i < 0 { i + n } else { i };
                if j < 0 || j >= n {
                    return err(e.span, format!("index {i} is out of range for {n} items"));
                }
                Ok(v[j as usize].clone())
            }
            other => err(span, format!("cannot index {}", other.kind())),
        }
    }

    fn slice_tensor(&mut self, t: TRef, items: &[IndexItem], span: Span) -> R<TRef> {
        let ty = self.ty(t);
        let rank = ty.rank();
        let n_ell = items.iter().filter(|i| matches!(i, IndexItem::Ellipsis)).count();
        if n_ell > 1 {
            return err(span, "at most one `...` in an index");
        }
        let explicit = items.len() - n_ell;
        if explicit > rank {
            return err(span, format!("{explicit} indices for a tensor of rank {rank}"));
        }
        let mut axis = 0usize;
        let mut cur = t;
        let mut remove = Vec::new();
        for it in items {
            match it {
                IndexItem::Ellipsis => axis += rank - explicit,
                IndexItem::Expr(e) => {
                    let v = self.expr(e)?;
                    let d = ty.shape[axis].clone();
                    let i = self.bound(&v, &d, e.span)?;
                    cur = self.add1(
                        Op::Slice {
                            axis,
                            start: i.clone(),
                            end: i.add(&Dim::constant(1)),
                        },
                        &[cur],
                        span,
                    )?;
                    remove.push(axis);
                    axis += 1;
                }
                IndexItem::Slice { start, end } => {
                    let d = ty.shape[axis].clone();
                    let s = match start {
                        Some(e) => {
                            let v = self.expr(e)?;
                            self.bound(&v, &d, e.span)?
                        }
                        None => Dim::constant(0),
                    };
                    let en = match end {
                        Some(e) => {
                            let v = self.expr(e)?;
                            self.bound(&v, &d, e.span)?
                        }
                        None => d.clone(),
                    };
                    if s != Dim::constant(0) || en != d {
                        cur = self.add1(
                            Op::Slice {
                                axis,
                                start: s,
                                end: en,
                            },
                            &[cur],
                            span,
                        )?;
                    }
                    axis += 1;
                }
            }
        }
        if !remove.is_empty() {
            let shape: Shape = self
                .ty(cur)
                .shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !remove.contains(i))
                .map(|(_, d)| d.clone())
                .collect();
            cur = self.add1(Op::Reshape { shape }, &[cur], span)?;
        }
        Ok(cur)
    }

    /// A slice bound: negative integers count from the end of a constant dimension.
    fn bound(&self, v: &Val, dim: &Dim, span: Span) -> R<Dim> {
        match v {
            Val::Int(i) if *i < 0 => match dim.as_const() {
                Some(n) => Ok(Dim::constant(n + i)),
                None => Ok(dim.add(&Dim::constant(*i))),
            },
            v => self.dim_of(v, span),
        }
    }

    fn scan(
        &mut self,
        carries: &[ScanBinding],
        seqs: &[ScanBinding],
        axis: Option<&Expr>,
        body: &Block,
        span: Span,
    ) -> R<Val> {
        let mut inits = Vec::new();
        for c in carries {
            let v = self.expr(&c.value)?;
            inits.push(self.tensor(&v, c.value.span)?);
        }
        let mut seq_ts = Vec::new();
        for s in seqs {
            let v = self.expr(&s.value)?;
            seq_ts.push(self.tensor(&v, s.value.span)?);
        }
        let rank = self.ty(seq_ts[0]).rank();
        let axis = match axis {
            Some(e) => {
                let a = self.int(e)?;
                norm_axis(a, rank)
                    .ok_or(())
                    .or_else(|_| err(e.span, format!("axis {a} out of range for rank {rank}")))?
            }
            None => 0,
        };
        // the body graph
        self.graphs.push(GraphCtx {
            graph: Graph::new(),
            captures: vec![],
        });
        let body_id = self.cur();
        let mut vars = HashMap::new();
        for (c, t) in carries.iter().zip(&inits) {
            let ty = self.ty(*t);
            vars.insert(c.name.name.clone(), self.body_input(body_id, &c.name, ty));
        }
        for (s, t) in seqs.iter().zip(&seq_ts) {
            let mut ty = self.ty(*t);
            if axis >= ty.rank() {
                self.graphs.pop();
                return err(s.value.span, format!("scan axis {axis} is out of range for {ty}"));
            }
            ty.shape.remove(axis);
            vars.insert(s.name.name.clone(), self.body_input(body_id, &s.name, ty));
        }
        let result = self.with_scope(vars, |el| el.block(body));
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.graphs.pop();
                return Err(e);
            }
        };
        let items = match result {
            Val::Tuple(items) => items,
            Val::Tensor(t) => vec![Val::Tensor(t)],
            other => {
                self.graphs.pop();
                return err(
                    body.span,
                    format!(
                        "a scan body returns (new carries..., outputs...), found {}",
                        other.kind()
                    ),
                );
            }
        };
        if items.len() <= carries.len() {
            self.graphs.pop();
            return err(
                body.span,
                format!(
                    "a scan body returns its {} carries then at least one output; it returned {} values",
                    carries.len(),
                    items.len()
                ),
            );
        }
        let mut outs = Vec::new();
        for it in &items {
            match it {
                Val::Tensor(t) => outs.push(self.use_t(*t)),
                other => {
                    self.graphs.pop();
                    return err(
                        body.span,
                        format!("a scan body returns tensors, found {}", other.kind()),
                    );
                }
            }
        }
        for (i, v) in outs.iter().enumerate() {
            let name = if i < carries.len() {
                carries[i].name.name.clone()
            } else {
                format!("out{}", i - carries.len())
            };
            self.graphs[body_id].graph.add_output(&name, *v, InputKind::Data);
        }
        let ctx = self.graphs.pop().unwrap();
        let mut args = inits;
        args.extend(seq_ts);
        args.extend(ctx.captures.iter().map(|(o, _)| *o));
        let op = Op::Scan {
            body: Box::new(ctx.graph),
            axis,
            n_carry: carries.len(),
            n_seq: seqs.len(),
        };
        let res = self.add(op, &args, span)?;
        Ok(Val::Tuple(res.into_iter().map(Val::Tensor).collect()))
    }

    /// An input of the scan body under construction, named after its DSL binding.
    fn body_input(&mut self, body_id: usize, name: &Ident, ty: TensorType) -> Val {
        let loc = self.loc(name.span);
        let op = Op::Input {
            name: name.name.clone(),
            kind: InputKind::Data,
            dtype: ty.dtype,
            shape: ty.shape,
        };
        let v = self.graphs[body_id]
            .graph
            .add1(op, &[], loc)
            .expect("inputs are always well-typed");
        Val::Tensor(TRef { graph: body_id, v })
    }

    // ---- calls -------------------------------------------------------------------------

    fn call(&mut self, func: &Ident, args: &[Arg], span: Span) -> R<Val> {
        if let Some(Val::Fn(f)) = self.lookup(&func.name).cloned() {
            return self.call_user(&func.name, &f, args, span);
        }
        let mut pos = Vec::new();
        let mut kw: Vec<(String, Val, Span)> = Vec::new();
        for a in args {
            let v = self.expr(&a.value)?;
            match &a.name {
                None => {
                    if !kw.is_empty() {
                        return err(a.value.span, "positional argument after a keyword argument");
                    }
                    pos.push(Some((v, a.value.span)))
                }
                Some(n) => kw.push((n.name.clone(), v, n.span)),
            }
        }
        let mut a = Args {
            name: func.name.clone(),
            pos,
            kw,
            span,
        };
        let v = self.builtin(&mut a, span)?;
        a.finish()?;
        Ok(v)
    }

    fn call_user(&mut self, name: &str, f: &FnDef, args: &[Arg], span: Span) -> R<Val> {
        if self.depth >= MAX_CALL_DEPTH {
            return err(
                span,
                format!("calls nested deeper than {MAX_CALL_DEPTH} (recursion in `{name}`?)"),
            );
        }
        let mut vals: Vec<Option<Val>> = vec![None; f.params.len()];
        let mut next = 0;
        for a in args {
            let v = self.expr(&a.value)?;
            let i = match &a.name {
                None => {
                    let i = next;
                    next += 1;
                    if i >= f.params.len() {
                        return err(a.value.span, format!("`{name}` takes {} arguments", f.params.len()));
                    }
                    i
                }
                Some(n) => match f.params.iter().position(|p| p.name.name == n.name) {
                    Some(i) => i,
                    None => return err(n.span, format!("`{name}` has no parameter `{}`", n.name)),
                },
            };
            if vals[i].is_some() {
                return err(a.value.span, format!("`{}` given twice", f.params[i].name.name));
            }
            vals[i] = Some(v);
        }
        // the body sees the globals and its parameters (not the caller's locals)
        let saved = self.scopes.split_off(1);
        let mut frame = HashMap::new();
        let mut result = Ok(());
        for (p, v) in f.params.iter().zip(vals) {
            let v = match v {
                Some(v) => v,
                None => match &p.default {
                    Some(d) => match self.expr(d) {
                        Ok(v) => v,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    },
                    None => {
                        result = err(span, format!("`{name}` needs its argument `{}`", p.name.name));
                        break;
                    }
                },
            };
            frame.insert(p.name.name.clone(), v);
        }
        let out = result.and_then(|_| {
            self.depth += 1;
            let r = self.with_scope(frame, |el| el.block(&f.body));
            self.depth -= 1;
            r
        });
        self.scopes.extend(saved);
        out
    }

    fn unary_fn(&mut self, a: &mut Args, op: UnaryOp, f: fn(f64) -> f64) -> R<Val> {
        let (v, sp) = a.req(0, "x")?;
        match v {
            Val::Int(i) => Ok(Val::Float(f(i as f64))),
            Val::Float(x) => Ok(Val::Float(f(x))),
            v => {
                let t = self.tensor(&v, sp)?;
                Ok(Val::Tensor(self.add1(Op::Unary(op), &[t], a.span)?))
            }
        }
    }

    fn axis_arg(&mut self, a: &mut Args, i: usize, rank: usize, default: Option<i64>) -> R<usize> {
        let (v, sp) = match (a.opt(i, "axis"), default) {
            (Some(x), _) => x,
            (None, Some(d)) => (Val::Int(d), a.span),
            (None, None) => return err(a.span, format!("`{}` needs `axis`", a.name)),
        };
        let ax = match v {
            Val::Int(x) => x,
            other => return err(sp, format!("axis must be an integer, found {}", other.kind())),
        };
        norm_axis(ax, rank)
            .ok_or(())
            .or_else(|_| err(sp, format!("axis {ax} is out of range for rank {rank}")))
    }

    fn axes_arg(&mut self, a: &mut Args, rank: usize) -> R<Vec<usize>> {
        match a.opt(1, "axis") {
            None => Ok((0..rank).collect()),
            Some((Val::Int(x), sp)) => Ok(vec![norm_axis(x, rank)
                .ok_or(())
                .or_else(|_| err(sp, format!("axis {x} is out of range for rank {rank}")))?]),
            Some((Val::List(xs), sp)) => xs
                .iter()
                .map(|x| match x {
                    Val::Int(x) => norm_axis(*x, rank)
                        .ok_or(())
                        .or_else(|_| err(sp, format!("axis {x} is out of range for rank {rank}"))),
                    _ => err(sp, "axes must be integers"),
                })
                .collect(),
            Some((other, sp)) => err(sp, format!("axis must be an integer or a list, found {}", other.kind())),
        }
    }

    fn bool_kw(&mut self, a: &mut Args, i: usize, name: &str, default: bool) -> R<bool> {
        match a.opt(i, name) {
            None => Ok(default),
            Some((Val::Bool(b), _)) => Ok(b),
            Some((other, sp)) => err(sp, format!("`{name}` must be true or false, found {}", other.kind())),
        }
    }

    fn reduce(&mut self, a: &mut Args, op: ReduceOp, mean: bool) -> R<Val> {
        let (v, sp) = a.req(0, "x")?;
        let t = self.tensor(&v, sp)?;
        let ty = self.ty(t);
        let axes = self.axes_arg(a, ty.rank())?;
        let keepdim = self.bool_kw(a, 2, "keepdim", false)?;
        let span = a.span;
        let r = self.add1(
            Op::Reduce {
                op,
                axes: axes.clone(),
                keepdim,
            },
            &[t],
            span,
        )?;
        if !mean {
            return Ok(Val::Tensor(r));
        }
        if !ty.dtype.is_float() {
            return err(span, "mean of a non-float tensor; cast it first");
        }
        let n = axes.iter().fold(Dim::constant(1), |acc, &i| acc.mul(&ty.shape[i]));
        let nv = self.lift(&Val::Dim(n), Some(ty.dtype), span)?;
        Ok(Val::Tensor(self.add1(Op::Binary(BinaryOp::Div), &[r, nv], span)?))
    }

    fn builtin(&mut self, a: &mut Args, span: Span) -> R<Val> {
        let name = a.name.clone();
        match name.as_str() {
            "exp" => self.unary_fn(a, UnaryOp::Exp, f64::exp),
            "log" => self.unary_fn(a, UnaryOp::Log, f64::ln),
            "sqrt" => self.unary_fn(a, UnaryOp::Sqrt, f64::sqrt),
            "rsqrt" => self.unary_fn(a, UnaryOp::Rsqrt, |x| 1.0 / x.sqrt()),
            "recip" => self.unary_fn(a, UnaryOp::Recip, |x| 1.0 / x),
            "sigmoid" => self.unary_fn(a, UnaryOp::Sigmoid, |x| 1.0 / (1.0 + (-x).exp())),
            "tanh" => self.unary_fn(a, UnaryOp::Tanh, f64::tanh),
            "sin" => self.unary_fn(a, UnaryOp::Sin, f64::sin),
            "cos" => self.unary_fn(a, UnaryOp::Cos, f64::cos),
            "abs" => self.unary_fn(a, UnaryOp::Abs, f64::abs),
            "pow" => {
                let (x, _) = a.req(0, "x")?;
                let (y, _) = a.req(1, "y")?;
                self.binary(BinOp::Pow, x, y, span)
            }
            "maximum" | "minimum" => {
                let (x, _) = a.req(0, "x")?;
                let (y, _) = a.req(1, "y")?;
                let like = match (&x, &y) {
                    (Val::Tensor(t), _) | (_, Val::Tensor(t)) => Some(self.ty(*t).dtype),
                    _ => None,
                };
                let tx = self.lift(&x, like, span)?;
                let ty = self.lift(&y, like, span)?;
                let op = if name == "maximum" {
                    BinaryOp::Max
                } else {
                    BinaryOp::Min
                };
                Ok(Val::Tensor(self.add1(Op::Binary(op), &[tx, ty], span)?))
            }
            "where" => {
                let (c, sc) = a.req(0, "cond")?;
                let (x, _) = a.req(1, "a")?;
                let (y, _) = a.req(2, "b")?;
                let c = self.tensor(&c, sc)?;
                let like = match (&x, &y) {
                    (Val::Tensor(t), _) | (_, Val::Tensor(t)) => Some(self.ty(*t).dtype),
                    _ => None,
                };
                let tx = self.lift(&x, like, span)?;
                let ty = self.lift(&y, like, span)?;
                Ok(Val::Tensor(self.add1(Op::Where, &[c, tx, ty], span)?))
            }
            "sum" => self.reduce(a, ReduceOp::Sum, false),
            "mean" => self.reduce(a, ReduceOp::Sum, true),
            "max" | "min" => {
                // max(tensor, axis=..) reduces; max(a, b) of numbers is compile-time
                let first = a.peek(0);
                if matches!(first, Some(Val::Tensor(_))) {
                    if name == "min" {
                        return err(span, "min over a tensor axis: write -max(-x, axis)");
                    }
                    return self.reduce(a, ReduceOp::Max, false);
                }
                let (x, sx) = a.req(0, "a")?;
                let (y, _) = a.req(1, "b")?;
                let gt = matches!(self.binary(BinOp::Gt, x.clone(), y.clone(), sx)?, Val::Bool(true));
                Ok(if (name == "max") == gt { x } else { y })
            }
            "reshape" | "expand" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                let (s, ss) = a.req(1, "shape")?;
                let shape = match s {
                    Val::List(items) => items.iter().map(|v| self.dim_of(v, ss)).collect::<R<Vec<_>>>()?,
                    other => return err(ss, format!("shape must be a list, found {}", other.kind())),
                };
                let op = if name == "reshape" {
                    Op::Reshape { shape }
                } else {
                    Op::Expand { shape }
                };
                Ok(Val::Tensor(self.add1(op, &[t], span)?))
            }
            "permute" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                let rank = self.ty(t).rank();
                let (p, sp) = a.req(1, "perm")?;
                let perm = match p {
                    Val::List(items) => items
                        .iter()
                        .map(|v| match v {
                            Val::Int(i) => norm_axis(*i, rank)
                                .ok_or(())
                                .or_else(|_| err(sp, format!("axis {i} out of range"))),
                            _ => err(sp, "perm must list integers"),
                        })
                        .collect::<R<Vec<_>>>()?,
                    other => return err(sp, format!("perm must be a list, found {}", other.kind())),
                };
                Ok(Val::Tensor(self.add1(Op::Permute { perm }, &[t], span)?))
            }
            "transpose" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                let rank = self.ty(t).rank();
                if rank < 2 {
                    return err(sx, "transpose needs rank >= 2");
                }
                let i = match a.opt(1, "a") {
                    Some((Val::Int(i), sp)) => {
                        norm_axis(i, rank).ok_or(()).or_else(|_| err(sp, "axis out of range"))?
                    }
                    None => rank - 2,
                    Some((_, sp)) => return err(sp, "axes must be integers"),
                };
                let j = match a.opt(2, "b") {
                    Some((Val::Int(j), sp)) => {
                        norm_axis(j, rank).ok_or(()).or_else(|_| err(sp, "axis out of range"))?
                    }
                    None => rank - 1,
                    Some((_, sp)) => return err(sp, "axes must be integers"),
                };
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.swap(i, j);
                Ok(Val::Tensor(self.add1(Op::Permute { perm }, &[t], span)?))
            }
            "unsqueeze" | "squeeze" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                let mut shape = self.ty(t).shape;
                let rank = shape.len() + usize::from(name == "unsqueeze");
                let ax = self.axis_arg(a, 1, rank, None)?;
                if name == "unsqueeze" {
                    shape.insert(ax, Dim::constant(1));
                } else {
                    if shape[ax] != Dim::constant(1) {
                        return err(span, format!("cannot squeeze axis {ax} of size {}", shape[ax]));
                    }
                    shape.remove(ax);
                }
                Ok(Val::Tensor(self.add1(Op::Reshape { shape }, &[t], span)?))
            }
            "slice" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                let ty = self.ty(t);
                let axis = self.axis_arg(a, 1, ty.rank(), None)?;
                let (s, ss) = a.req(2, "start")?;
                let (e, se) = a.req(3, "end")?;
                let start = self.bound(&s, &ty.shape[axis], ss)?;
                let end = self.bound(&e, &ty.shape[axis], se)?;
                Ok(Val::Tensor(self.add1(Op::Slice { axis, start, end }, &[t], span)?))
            }
            "concat" => {
                let (xs, sx) = a.req(0, "xs")?;
                let items = match xs {
                    Val::List(items) | Val::Tuple(items) => items,
                    other => return err(sx, format!("concat takes a list of tensors, found {}", other.kind())),
                };
                if items.is_empty() {
                    return err(sx, "concat of an empty list");
                }
                let ts = items.iter().map(|v| self.tensor(v, sx)).collect::<R<Vec<_>>>()?;
                let rank = self.ty(ts[0]).rank();
                let axis = self.axis_arg(a, 1, rank, None)?;
                Ok(Val::Tensor(self.add1(Op::Concat { axis }, &ts, span)?))
            }
            "take" | "gather" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                let (i, si) = a.req(1, "idx")?;
                let idx = self.tensor(&i, si)?;
                let rank = self.ty(t).rank();
                let axis = self.axis_arg(a, 2, rank, if name == "take" { Some(0) } else { None })?;
                let op = if name == "take" {
                    Op::IndexSelect { axis }
                } else {
                    Op::GatherAlong { axis }
                };
                Ok(Val::Tensor(self.add1(op, &[t, idx], span)?))
            }
            "scatter_add" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                let (i, si) = a.req(1, "idx")?;
                let idx = self.tensor(&i, si)?;
                let (s, ss) = a.req(2, "src")?;
                let src = self.tensor(&s, ss)?;
                let rank = self.ty(t).rank();
                let axis = self.axis_arg(a, 3, rank, None)?;
                Ok(Val::Tensor(self.add1(
                    Op::ScatterAddAlong { axis },
                    &[t, idx, src],
                    span,
                )?))
            }
            "topk" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                let (k, sk) = a.req(1, "k")?;
                let k = match k {
                    Val::Int(k) if k > 0 => k as usize,
                    other => return err(sk, format!("k must be a positive integer, found {}", other.kind())),
                };
                let rank = self.ty(t).rank();
                let axis = self.axis_arg(a, 2, rank, Some(-1))?;
                let outs = self.add(Op::TopK { k, axis }, &[t], span)?;
                Ok(Val::Tuple(outs.into_iter().map(Val::Tensor).collect()))
            }
            "argmax" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                let rank = self.ty(t).rank();
                let axis = self.axis_arg(a, 1, rank, Some(-1))?;
                Ok(Val::Tensor(self.add1(Op::ArgMax { axis }, &[t], span)?))
            }
            "matmul" => {
                let (x, _) = a.req(0, "a")?;
                let (y, _) = a.req(1, "b")?;
                self.tensor_binary(BinOp::MatMul, x, y, span).map(Val::Tensor)
            }
            "cast" => {
                let (x, sx) = a.req(0, "x")?;
                let (d, sd) = a.req(1, "dtype")?;
                let to = match d {
                    Val::DType(d) => d,
                    other => return err(sd, format!("expected a dtype, found {}", other.kind())),
                };
                let t = self.lift(&x, Some(to), sx)?;
                if self.ty(t).dtype == to {
                    return Ok(Val::Tensor(t));
                }
                Ok(Val::Tensor(self.add1(Op::Cast { to }, &[t], span)?))
            }
            "arange" => {
                let (n, sn) = a.req(0, "n")?;
                let len = self.dim_of(&n, sn)?;
                let dtype = match a.opt(1, "dtype") {
                    None => DType::I64,
                    Some((Val::DType(d), _)) => d,
                    Some((other, sp)) => return err(sp, format!("expected a dtype, found {}", other.kind())),
                };
                Ok(Val::Tensor(self.add1(Op::Iota { len, dtype }, &[], span)?))
            }
            "full" => {
                let (v, sv) = a.req(0, "value")?;
                let (d, sd) = a.req(1, "dtype")?;
                let dtype = match d {
                    Val::DType(d) => d,
                    other => return err(sd, format!("expected a dtype, found {}", other.kind())),
                };
                let value = match v {
                    Val::Int(i) => i as f64,
                    Val::Float(f) => f,
                    Val::Bool(b) => f64::from(u8::from(b)),
                    other => return err(sv, format!("expected a number, found {}", other.kind())),
                };
                let c = self.constant(value, dtype, span)?;
                match a.opt(2, "shape") {
                    None => Ok(Val::Tensor(c)),
                    Some((Val::List(items), ss)) => {
                        let shape = items.iter().map(|v| self.dim_of(v, ss)).collect::<R<Vec<_>>>()?;
                        Ok(Val::Tensor(self.add1(Op::Expand { shape }, &[c], span)?))
                    }
                    Some((other, ss)) => err(ss, format!("shape must be a list, found {}", other.kind())),
                }
            }
            "shape" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                let ty = self.ty(t);
                let ax = self.axis_arg(a, 1, ty.rank(), None)?;
                let d = ty.shape[ax].clone();
                Ok(d.as_const().map(Val::Int).unwrap_or(Val::Dim(d)))
            }
            "rank" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                Ok(Val::Int(self.ty(t).rank() as i64))
            }
            "dtype_of" => {
                let (x, sx) = a.req(0, "x")?;
                let t = self.tensor(&x, sx)?;
                Ok(Val::DType(self.ty(t).dtype))
            }
            "dtype" => {
                let (s, ss) = a.req(0, "name")?;
                match s {
                    Val::Str(n) => DType::from_torch(&n)
                        .or_else(|| DType::from_name(&n))
                        .map(Val::DType)
                        .ok_or(())
                        .or_else(|_| err(ss, format!("`{n}` is not a dtype (float32, bfloat16, float16)"))),
                    Val::DType(d) => Ok(Val::DType(d)),
                    other => err(ss, format!("expected a dtype name, found {}", other.kind())),
                }
            }
            "int" | "float" | "floor" | "ceil" | "log2" => {
                let (v, sv) = a.req(0, "x")?;
                let f = match v {
                    Val::Int(i) => i as f64,
                    Val::Float(f) => f,
                    Val::Bool(b) if name == "int" => f64::from(u8::from(b)),
                    other => return err(sv, format!("`{name}` needs a number, found {}", other.kind())),
                };
                Ok(match name.as_str() {
                    "int" => Val::Int(f.trunc() as i64),
                    "float" => Val::Float(f),
                    "floor" => Val::Float(f.floor()),
                    "ceil" => Val::Float(f.ceil()),
                    _ => Val::Float(f.log2()),
                })
            }
            "len" => {
                let (v, sv) = a.req(0, "x")?;
                match v {
                    Val::List(x) | Val::Tuple(x) => Ok(Val::Int(x.len() as i64)),
                    Val::Str(s) => Ok(Val::Int(s.chars().count() as i64)),
                    other => err(sv, format!("len of {}", other.kind())),
                }
            }
            "is_null" => {
                let (v, _) = a.req(0, "x")?;
                Ok(Val::Bool(matches!(v, Val::Json(serde_json::Value::Null))))
            }
            _ => err(
                a.span,
                format!("`{name}` is not a function (see docs/dsl.md for the built-ins)"),
            ),
        }
    }
}

fn norm_axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let x = if a < 0 { a + r } else { a };
    (0..r).contains(&x).then_some(x as usize)
}

/// Arguments of a built-in call, consumed by position or keyword; leftovers are an error.
struct Args {
    name: String,
    pos: Vec<Option<(Val, Span)>>,
    kw: Vec<(String, Val, Span)>,
    span: Span,
}

impl Args {
    fn take(&mut self, i: usize, name: &str) -> Option<(Val, Span)> {
        if let Some(k) = self.kw.iter().position(|(n, _, _)| n == name) {
            let (_, v, s) = self.kw.remove(k);
            return Some((v, s));
        }
        self.pos.get_mut(i).and_then(Option::take)
    }

    fn peek(&self, i: usize) -> Option<&Val> {
        self.pos.get(i).and_then(|p| p.as_ref()).map(|(v, _)| v)
    }

    fn req(&mut self, i: usize, name: &str) -> R<(Val, Span)> {
        let span = self.span;
        let f = self.name.clone();
        self.take(i, name)
            .ok_or(())
            .or_else(|_| err(span, format!("`{f}` needs its argument `{name}`")))
    }

    fn opt(&mut self, i: usize, name: &str) -> Option<(Val, Span)> {
        self.take(i, name)
    }

    /// Any argument not consumed is a mistake worth reporting.
    fn finish(&self) -> R<()> {
        if let Some((n, _, s)) = self.kw.first() {
            return err(*s, format!("`{}` has no argument `{n}`", self.name));
        }
        if let Some((_, s)) = self.pos.iter().flatten().next() {
            return err(*s, format!("too many arguments to `{}`", self.name));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "elab_tests.rs"]
mod tests;
