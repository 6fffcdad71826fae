//! The typed applier and the side-condition builders rules are written with.
//!
//! [`typed`] wraps a right-hand side: it instantiates the pattern *on paper* first, inferring
//! the type of every new e-node from its operands' e-class data, and refuses (counting the
//! refusal under the rule's name) when a node does not type-check or when the new value's type
//! differs from the matched e-class's type. Only then are the nodes added and the union made —
//! an ill-typed node never enters the e-graph (style.md 6).
//!
//! [`tuple`] does the same for a multi-output right-hand side: it builds the tuple once and
//! unions `(proj tuple i)` with the e-class named for port `i` (the matched root, or an
//! existing subterm found by look-up, never added).

use super::analysis::{node_data, Data, RlGraph};
use super::lang::{Attr, Rl};
use egg::{Applier, ENodeOrVar, Id, Language, Pattern, PatternAst, Searcher, Subst, Symbol, Var};
use ir::graph::TensorType;
use ir::shape::Dim;
use ir::DType;

/// Where the i-th output of a tuple right-hand side goes.
#[derive(Clone, Debug)]
pub enum Port {
    /// Unioned with the matched e-class.
    Root,
    /// Unioned with the e-class of this (existing) term; skipped when the term is not present.
    Existing(PatternAst<Rl>),
    /// Not unioned with anything.
    Unused,
}

/// A right-hand side that is type-checked before it is added.
#[derive(Clone, Debug)]
pub struct Typed {
    rhs: PatternAst<Rl>,
    ports: Vec<Port>,
}

/// A single-output right-hand side, e.g. `typed("(rms_norm ?x ?w ?eps)")`. When the matched
/// e-class is a tuple (a multi-output node such as a scan), the right-hand side may be a tuple
/// of exactly the same types, unioned with it as a whole:
/// `typed("(linear_attn_step ?s0 ?q ?k ?v ?lam)")` on `(scan ?s0 ?q ?k ?v ?lam ?n)`.
///
/// # Panics
/// On a pattern that does not parse: rule tables are code, and a typo must fail the first test.
pub fn typed(rhs: &str) -> Typed {
    Typed {
        rhs: parse(rhs),
        ports: Vec::new(),
    }
}

/// A multi-output right-hand side: `ports[i]` is `"root"`, `"_"` (unused) or a pattern of an
/// existing term, e.g. `tuple("(add_rms_norm ?h ?a ?w ?eps)", &["(add ?h ?a)", "root"])`.
///
/// # Panics
/// On a pattern that does not parse.
pub fn tuple(rhs: &str, ports: &[&str]) -> Typed {
    Typed {
        rhs: parse(rhs),
        ports: ports
            .iter()
            .map(|p| match *p {
                "root" => Port::Root,
                "_" => Port::Unused,
                p => Port::Existing(parse(p)),
            })
            .collect(),
    }
}

fn parse(p: &str) -> PatternAst<Rl> {
    match p.parse::<PatternAst<Rl>>() {
        Ok(ast) => ast,
        Err(e) => panic!("rule pattern `{p}` does not parse: {e}"),
    }
}

fn pattern_vars(ast: &PatternAst<Rl>, out: &mut Vec<Var>) {
    for n in ast.as_ref() {
        if let ENodeOrVar::Var(v) = n {
            if !out.contains(v) {
                out.push(*v);
            }
        }
    }
}

/// Record a refusal under `rule`.
fn refuse(eg: &mut RlGraph, rule: Symbol, why: String) -> Vec<Id> {
    let stats = &mut eg.analysis.stats;
    *stats.refused.entry(rule.to_string()).or_default() += 1;
    stats.refusal_example.entry(rule.to_string()).or_insert(why);
    Vec::new()
}

impl Typed {
    /// The data every node of the right-hand side would get, or why one is ill-typed.
    fn check(&self, eg: &RlGraph, subst: &Subst) -> Result<Vec<Data>, String> {
        let nodes = self.rhs.as_ref();
        let mut datas: Vec<Data> = Vec::with_capacity(nodes.len());
        for n in nodes {
            let d = match n {
                ENodeOrVar::Var(v) => {
                    let id = *subst.get(*v).ok_or_else(|| format!("{v} is not bound"))?;
                    eg[id].data.clone()
                }
                ENodeOrVar::ENode(e) => {
                    let kids: Vec<&Data> = e.children().iter().map(|&c| &datas[usize::from(c)]).collect();
                    match node_data(e, &kids, &eg.analysis.leaves) {
                        Data::Invalid(m) => return Err(format!("`{e}` does not type-check: {m}")),
                        d => d,
                    }
                }
            };
            datas.push(d);
        }
        Ok(datas)
    }

    /// Adds the (checked) right-hand side; returns the id of every pattern node.
    fn add(&self, eg: &mut RlGraph, subst: &Subst) -> Vec<Id> {
        let mut ids: Vec<Id> = Vec::with_capacity(self.rhs.as_ref().len());
        for n in self.rhs.as_ref() {
            let id = match n {
                ENodeOrVar::Var(v) => subst[*v],
                ENodeOrVar::ENode(e) => eg.add(e.clone().map_children(|c| ids[usize::from(c)])),
            };
            ids.push(id);
        }
        ids
    }
}

/// Finds the e-class of `ast` under `subst` without adding anything.
pub fn lookup(eg: &RlGraph, ast: &PatternAst<Rl>, subst: &Subst) -> Option<Id> {
    let mut ids: Vec<Id> = Vec::with_capacity(ast.as_ref().len());
    for n in ast.as_ref() {
        let id = match n {
            ENodeOrVar::Var(v) => eg.find(*subst.get(*v)?),
            ENodeOrVar::ENode(e) => eg.lookup(e.clone().map_children(|c| ids[usize::from(c)]))?,
        };
        ids.push(id);
    }
    ids.last().copied()
}

fn tys_str(d: &Data) -> String {
    match d {
        Data::Value(v) => v.tys.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "),
        Data::Attr(a) => format!("attribute {a}"),
        Data::Invalid(m) => format!("invalid ({m})"),
    }
}

impl Applier<Rl, super::analysis::TypeAnalysis> for Typed {
    fn apply_one(
        &self,
        eg: &mut RlGraph,
        eclass: Id,
        subst: &Subst,
        _searcher_ast: Option<&PatternAst<Rl>>,
        rule: Symbol,
    ) -> Vec<Id> {
        let datas = match self.check(eg, subst) {
            Ok(d) => d,
            Err(m) => return refuse(eg, rule, m),
        };
        let Some(root) = datas.last() else {
            return Vec::new();
        };
        // Where each produced value goes, checked against the target's type before anything is
        // added: (port or None for the single root value, target class).
        let mut targets: Vec<(Option<usize>, Id)> = Vec::new();
        if self.ports.is_empty() {
            // one value into a value class, or a whole tuple into a tuple class of the same
            // types (a multi-output op replaced as a whole: a scan by `linear_attn_chunk`)
            if root.tys().is_none() || root.tys() != eg[eclass].data.tys() {
                let why = format!(
                    "the right-hand side is {} but the matched class is {}",
                    tys_str(root),
                    tys_str(&eg[eclass].data)
                );
                return refuse(eg, rule, why);
            }
            targets.push((None, eclass));
        } else {
            let Some(tys) = root.tys() else {
                return refuse(eg, rule, "the right-hand side of a tuple rule is not a value".into());
            };
            if tys.len() != self.ports.len() {
                let why = format!(
                    "the tuple has {} outputs, the rule names {}",
                    tys.len(),
                    self.ports.len()
                );
                return refuse(eg, rule, why);
            }
            for (i, p) in self.ports.iter().enumerate() {
                let target = match p {
                    Port::Root => Some(eclass),
                    Port::Existing(ast) => lookup(eg, ast, subst),
                    Port::Unused => None,
                };
                if let Some(t) = target {
                    if eg[t].data.tys() != Some(std::slice::from_ref(&tys[i])) {
                        let why = format!(
                            "tuple output {i} is {} but its target class is {}",
                            tys[i],
                            tys_str(&eg[t].data)
                        );
                        return refuse(eg, rule, why);
                    }
                    targets.push((Some(i), t));
                }
            }
        }
        let ids = self.add(eg, subst);
        let new_root = *ids.last().expect("a pattern has a root");
        let mut changed = Vec::new();
        for (port, target) in targets {
            let v = match port {
                None => new_root,
                Some(i) => {
                    let p = eg.add(Rl::Attr(Attr::Int(i as i64)));
                    eg.add(Rl::Proj([new_root, p]))
                }
            };
            if eg.union(target, v) {
                changed.push(eg.find(target));
            }
        }
        if !changed.is_empty() {
            *eg.analysis.stats.fired.entry(rule.to_string()).or_default() += 1;
        }
        changed
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = Vec::new();
        pattern_vars(&self.rhs, &mut v);
        for p in &self.ports {
            if let Port::Existing(ast) = p {
                pattern_vars(ast, &mut v);
            }
        }
        v
    }
}

/// An attribute a right-hand side needs but the left-hand side cannot bind (egg variables bind
/// whole e-classes, never an element of a list): computed from the match by [`with_attrs`].
#[derive(Clone, Copy, Debug)]
pub enum Derive {
    /// one dim, as an integer (or symbolic dim) attribute
    Dim(S),
    /// a shape, as a list attribute (a reshape or expand target)
    Shape(&'static [S]),
    /// the sum of two dims (the end of the second of two adjacent slices)
    Sum(S, S),
}

/// A [`typed`] or [`tuple`] right-hand side with attributes derived from the match first, e.g.
/// the group count of a reshape target `?gs = [batch,seq,4,2]`:
/// `with_attrs(typed("(route_topk ?p ?k ?ng ..)"), &[("?ng", Derive::Dim(S::ElemOf("?gs", 2)))])`.
/// A derived attribute that cannot be computed refuses the instantiation (counted like an
/// ill-typed one); the rest is [`Typed`]'s check-then-add.
#[derive(Clone, Debug)]
pub struct WithAttrs {
    inner: Typed,
    attrs: Vec<(Var, Derive)>,
}

/// See [`WithAttrs`].
///
/// # Panics
/// On a name that is not a pattern variable.
pub fn with_attrs(inner: Typed, attrs: &[(&str, Derive)]) -> WithAttrs {
    WithAttrs {
        inner,
        attrs: attrs.iter().map(|(v, d)| (var(v), *d)).collect(),
    }
}

impl Applier<Rl, super::analysis::TypeAnalysis> for WithAttrs {
    fn apply_one(
        &self,
        eg: &mut RlGraph,
        eclass: Id,
        subst: &Subst,
        searcher_ast: Option<&PatternAst<Rl>>,
        rule: Symbol,
    ) -> Vec<Id> {
        let mut values = Vec::with_capacity(self.attrs.len());
        for (v, d) in &self.attrs {
            let a = match d {
                Derive::Dim(e) => resolve_dim(eg, subst, *e).map(|d| Attr::dim(&d)),
                Derive::Shape(spec) => resolve_shape(eg, subst, spec).map(Attr::List),
                Derive::Sum(x, y) => resolve_dim(eg, subst, *x)
                    .zip(resolve_dim(eg, subst, *y))
                    .map(|(x, y)| Attr::dim(&x.add(&y))),
            };
            match a {
                Some(a) => values.push((*v, a)),
                None => return refuse(eg, rule, format!("the attribute {v} cannot be derived from the match")),
            }
        }
        let mut subst = subst.clone();
        for (v, a) in values {
            let id = eg.add(Rl::Attr(a));
            subst.insert(v, id);
        }
        self.inner.apply_one(eg, eclass, &subst, searcher_ast, rule)
    }

    fn vars(&self) -> Vec<Var> {
        let derived: Vec<Var> = self.attrs.iter().map(|(v, _)| *v).collect();
        self.inner.vars().into_iter().filter(|v| !derived.contains(v)).collect()
    }
}

// ---- side conditions ---------------------------------------------------------------------------
//
// Each builder returns a closure egg's `rewrite!` accepts after `if`. They read the e-class data
// (types, attributes, constants) of bound variables and never modify the e-graph.

/// A condition usable in `rewrite!(...; ... if cond)`.
pub trait Cond: Fn(&mut RlGraph, Id, &Subst) -> bool + Send + Sync + 'static {}
impl<F: Fn(&mut RlGraph, Id, &Subst) -> bool + Send + Sync + 'static> Cond for F {}

fn var(v: &str) -> Var {
    match v.parse() {
        Ok(v) => v,
        Err(e) => panic!("`{v}` is not a pattern variable: {e}"),
    }
}

/// The single type bound to `v`.
pub fn ty_of<'a>(eg: &'a RlGraph, s: &Subst, v: Var) -> Option<&'a TensorType> {
    eg[*s.get(v)?].data.ty()
}

/// The attribute bound to `v`.
pub fn attr_of<'a>(eg: &'a RlGraph, s: &Subst, v: Var) -> Option<&'a Attr> {
    eg[*s.get(v)?].data.attr()
}

/// A number bound to `v`: a numeric attribute or a scalar constant.
pub fn number_of(eg: &RlGraph, s: &Subst, v: Var) -> Option<f64> {
    let d = &eg[*s.get(v)?].data;
    d.attr().and_then(Attr::as_f64).or_else(|| d.konst())
}

/// `v` is a scalar constant (`(const ..)`) or a numeric attribute.
pub fn is_const(v: &str) -> impl Cond {
    let v = var(v);
    move |eg, _, s| number_of(eg, s, v).is_some()
}

/// `a` and `b` are values of the same dtype and shape.
pub fn same_type(a: &str, b: &str) -> impl Cond {
    let (a, b) = (var(a), var(b));
    move |eg, _, s| matches!((ty_of(eg, s, a), ty_of(eg, s, b)), (Some(x), Some(y)) if x == y)
}

/// `a` and `b` have the same shape (dtypes may differ).
pub fn same_shape(a: &str, b: &str) -> impl Cond {
    let (a, b) = (var(a), var(b));
    move |eg, _, s| matches!((ty_of(eg, s, a), ty_of(eg, s, b)), (Some(x), Some(y)) if x.shape == y.shape)
}

/// `x` is a value of rank `r`.
pub fn rank_is(x: &str, r: usize) -> impl Cond {
    let x = var(x);
    move |eg, _, s| ty_of(eg, s, x).is_some_and(|t| t.rank() == r)
}

/// `t` is the dtype attribute equal to `x`'s dtype.
pub fn dtype_of(t: &str, x: &str) -> impl Cond {
    let (t, x) = (var(t), var(x));
    move |eg, _, s| match (attr_of(eg, s, t).and_then(Attr::as_dtype), ty_of(eg, s, x)) {
        (Some(d), Some(ty)) => d == ty.dtype,
        _ => false,
    }
}

/// `x` has dtype `d`.
pub fn dtype_is(x: &str, d: DType) -> impl Cond {
    let x = var(x);
    move |eg, _, s| ty_of(eg, s, x).is_some_and(|t| t.dtype == d)
}

/// `axes` is the list `[rank(x) - 1]`: a reduction over the last axis of `x`.
pub fn last_axis(axes: &str, x: &str) -> impl Cond {
    let (axes, x) = (var(axes), var(x));
    move |eg, _, s| match (attr_of(eg, s, axes).and_then(Attr::as_usizes), ty_of(eg, s, x)) {
        (Some(a), Some(t)) => t.rank() > 0 && a == [t.rank() - 1],
        _ => false,
    }
}

/// `axis` is the integer `rank(x) - 1` (a concat or slice along the last axis of `x`).
pub fn is_last_axis(axis: &str, x: &str) -> impl Cond {
    let (axis, x) = (var(axis), var(x));
    move |eg, _, s| match (attr_of(eg, s, axis).and_then(Attr::as_usize), ty_of(eg, s, x)) {
        (Some(a), Some(t)) => t.rank() > 0 && a == t.rank() - 1,
        _ => false,
    }
}

/// The number bound to `n` equals the (constant) size of `x`'s last axis: `sum(..) / n` is a
/// mean over it.
pub fn is_last_dim_size(n: &str, x: &str) -> impl Cond {
    let (n, x) = (var(n), var(x));
    move |eg, _, s| match (number_of(eg, s, n), ty_of(eg, s, x)) {
        (Some(v), Some(t)) => t.shape.last().and_then(Dim::as_const).is_some_and(|d| d as f64 == v),
        _ => false,
    }
}

/// `v` is a permutation attribute equal to `perm`.
pub fn perm_is(v: &str, perm: &[usize]) -> impl Cond {
    let v = var(v);
    let perm = perm.to_vec();
    move |eg, _, s| attr_of(eg, s, v).and_then(Attr::as_usizes).is_some_and(|p| p == perm)
}

/// `x` is an `iota` leaf (0, 1, 2, ...).
pub fn is_iota(x: &str) -> impl Cond {
    let x = var(x);
    move |eg, _, s| {
        let Some(&id) = s.get(x) else { return false };
        eg[id].nodes.iter().any(|n| match n {
            Rl::Leaf([i]) => eg[*i]
                .data
                .attr()
                .and_then(Attr::as_usize)
                .and_then(|k| eg.analysis.leaves.entries.get(k))
                .is_some_and(|e| matches!(e.op, ir::Op::Iota { .. })),
            _ => false,
        })
    }
}

/// The side-table index of the parameter leaf (a checkpoint weight) in the e-class bound to `v`.
fn param_leaf(eg: &RlGraph, s: &Subst, v: Var) -> Option<usize> {
    let &id = s.get(v)?;
    eg[id].nodes.iter().find_map(|n| match n {
        Rl::Leaf([i]) => eg[*i].data.attr().and_then(Attr::as_usize).filter(|&k| {
            eg.analysis
                .leaves
                .entries
                .get(k)
                .is_some_and(|e| matches!(e.op, ir::Op::Param { .. }))
        }),
        _ => None,
    })
}

/// `a` and `b` are parameters (checkpoint weights, fixed for every step), `a` declared first: an
/// order on pairs, so a rule over two weights fires once per pair, not once per ordering.
pub fn params_in_order(a: &str, b: &str) -> impl Cond {
    let (a, b) = (var(a), var(b));
    move |eg, _, s| matches!((param_leaf(eg, s, a), param_leaf(eg, s, b)), (Some(x), Some(y)) if x < y)
}

/// `n` is the side-table index of a scan (`(scan operands... ?n)`) whose op satisfies `pred`:
/// the predicate sees the whole `Op::Scan` (body graph, axis, carry and sequence counts), so a
/// rule can recognise what a scan computes, which no pattern over the outer graph can see.
pub fn scan_is(n: &str, pred: fn(&ir::Op) -> bool) -> impl Cond {
    let n = var(n);
    move |eg, _, s| {
        attr_of(eg, s, n)
            .and_then(Attr::as_usize)
            .and_then(|i| eg.analysis.leaves.entries.get(i))
            .is_some_and(|e| matches!(e.op, ir::Op::Scan { .. }) && pred(&e.op))
    }
}

/// One element of a shape described by [`shape_is`] / [`type_shape_is`].
#[derive(Clone, Copy, Debug)]
pub enum S {
    /// exactly this constant
    Lit(i64),
    /// the value of an integer attribute variable
    Attr(&'static str),
    /// dimension `axis` of a bound value's type (negative counts from the end)
    DimOf(&'static str, i64),
    /// element `i` of a bound list attribute, e.g. a reshape target (negative counts from the end)
    ElemOf(&'static str, i64),
    /// the index of the last axis of a bound value's type (its rank − 1)
    LastAxisOf(&'static str),
    /// element `i` of one list attribute plus element `i` of another (two reshape targets
    /// side by side: `[b, s, 16, d]` and `[b, s, 4, d]` make 20 heads)
    ElemSum(&'static str, &'static str, i64),
}

/// The `i`-th of `n` things, `i` negative counting from the end.
fn index_from_end(i: i64, n: usize) -> Option<usize> {
    let a = if i < 0 { n as i64 + i } else { i };
    usize::try_from(a).ok().filter(|&a| a < n)
}

fn resolve_dim(eg: &RlGraph, s: &Subst, e: S) -> Option<Dim> {
    match e {
        S::Lit(c) => Some(Dim::constant(c)),
        S::Attr(v) => attr_of(eg, s, var(v)).and_then(Attr::as_dim),
        S::DimOf(v, axis) => {
            let t = ty_of(eg, s, var(v))?;
            index_from_end(axis, t.rank()).map(|a| t.shape[a].clone())
        }
        S::ElemOf(v, i) => {
            let l = attr_of(eg, s, var(v)).and_then(Attr::as_list)?;
            index_from_end(i, l.len()).map(|a| l[a].clone())
        }
        S::ElemSum(a, b, i) => {
            let (x, y) = (
                resolve_dim(eg, s, S::ElemOf(a, i))?,
                resolve_dim(eg, s, S::ElemOf(b, i))?,
            );
            Some(x.add(&y))
        }
        S::LastAxisOf(v) => {
            let r = ty_of(eg, s, var(v))?.rank();
            r.checked_sub(1).map(|a| Dim::constant(a as i64))
        }
    }
}

fn resolve_shape(eg: &RlGraph, s: &Subst, spec: &[S]) -> Option<Vec<Dim>> {
    spec.iter().map(|&e| resolve_dim(eg, s, e)).collect()
}

/// The list attribute bound to `v` (a reshape/expand target) equals `spec`.
pub fn shape_is(v: &'static str, spec: &'static [S]) -> impl Cond {
    let vv = var(v);
    move |eg, _, s| match (attr_of(eg, s, vv).and_then(Attr::as_list), resolve_shape(eg, s, spec)) {
        (Some(l), Some(want)) => l == want.as_slice(),
        _ => false,
    }
}

/// The value bound to `v` has shape `spec`.
pub fn type_shape_is(v: &'static str, spec: &'static [S]) -> impl Cond {
    let vv = var(v);
    move |eg, _, s| match (ty_of(eg, s, vv), resolve_shape(eg, s, spec)) {
        (Some(t), Some(want)) => t.shape == want,
        _ => false,
    }
}

/// Integer attributes: `lo * 2 == hi` (a rotary split `0:h`, `h:r` with `r = 2h`), and
/// `hi <= last dim of x`.
pub fn rotary_halves(lo: &str, hi: &str, x: &str) -> impl Cond {
    let (lo, hi, x) = (var(lo), var(hi), var(x));
    move |eg, _, s| {
        let (Some(h), Some(r)) = (
            attr_of(eg, s, lo).and_then(Attr::as_int),
            attr_of(eg, s, hi).and_then(Attr::as_int),
        ) else {
            return false;
        };
        let d = ty_of(eg, s, x).and_then(|t| t.shape.last().and_then(Dim::as_const));
        h > 0 && 2 * h == r && d.is_some_and(|d| r <= d)
    }
}

/// The integer attribute `v` equals the constant size of `x`'s last axis.
pub fn is_last_dim(v: &str, x: &str) -> impl Cond {
    let (v, x) = (var(v), var(x));
    move |eg, _, s| {
        let d = ty_of(eg, s, x).and_then(|t| t.shape.last().and_then(Dim::as_const));
        matches!((attr_of(eg, s, v).and_then(Attr::as_int), d), (Some(a), Some(d)) if a == d)
    }
}

/// The list attribute `gs` splits the last axis of `x` in two: `gs = x.shape[..-1] ++ [g, n]`
/// with constants `g · n` = the (constant) last dim of `x`, e.g. `[batch,seq,4,2]` for
/// `[batch, seq, 8]`: `g` contiguous groups of `n`.
pub fn splits_last_dim(gs: &str, x: &str) -> impl Cond {
    let (gs, x) = (var(gs), var(x));
    move |eg, _, s| {
        let (Some(l), Some(t)) = (attr_of(eg, s, gs).and_then(Attr::as_list), ty_of(eg, s, x)) else {
            return false;
        };
        let Some((last, lead)) = t.shape.split_last() else {
            return false;
        };
        let [.., g, n] = l else { return false };
        l.len() == t.rank() + 1
            && l[..lead.len()] == *lead
            && matches!((g.as_const(), n.as_const(), last.as_const()), (Some(g), Some(n), Some(e)) if g > 0 && n > 0 && g * n == e)
    }
}

/// The integer attribute `v` equals `min(c, d)` for the constant dim `d`, e.g. the width of a
/// "top-2 of each group" that a group of one expert shrinks to top-1.
pub fn int_is_min(v: &str, c: i64, d: S) -> impl Cond {
    let v = var(v);
    move |eg, _, s| {
        let want = resolve_dim(eg, s, d).and_then(|d| d.as_const()).map(|d| d.min(c));
        matches!((attr_of(eg, s, v).and_then(Attr::as_int), want), (Some(a), Some(w)) if a == w)
    }
}

/// The integer attribute `v` is at most `a · b` (both constant dims), e.g. k experts chosen from
/// the `topk_group · experts_per_group` the kept groups hold.
pub fn int_at_most_product(v: &str, a: S, b: S) -> impl Cond {
    let v = var(v);
    move |eg, _, s| {
        let bound = match (resolve_dim(eg, s, a), resolve_dim(eg, s, b)) {
            (Some(a), Some(b)) => a.as_const().zip(b.as_const()).map(|(a, b)| a * b),
            _ => None,
        };
        matches!((attr_of(eg, s, v).and_then(Attr::as_int), bound), (Some(x), Some(m)) if x <= m)
    }
}

/// The dtype attribute bound to `t` is a float dtype (e.g. the result of a cast that a GEMM's
/// epilogue can write).
pub fn is_float_dtype(t: &str) -> impl Cond {
    let t = var(t);
    move |eg, _, s| attr_of(eg, s, t).and_then(Attr::as_dtype).is_some_and(DType::is_float)
}

/// A boxed condition, for [`all`].
pub type BoxedCond = Box<dyn Fn(&mut RlGraph, Id, &Subst) -> bool + Send + Sync>;

/// Every condition holds (checked in order, stopping at the first that fails): name a group of
/// conditions that together describe one layout, e.g. `fn rope_layout() -> impl Cond`.
pub fn all(conds: Vec<BoxedCond>) -> impl Cond {
    move |eg: &mut RlGraph, id: Id, s: &Subst| conds.iter().all(|c| c(eg, id, s))
}

/// Matches of `pattern` in `eg` (for tests and "present" checks).
pub fn count_matches(eg: &RlGraph, pattern: &str) -> usize {
    let p: Pattern<Rl> = match pattern.parse() {
        Ok(p) => p,
        Err(_) => return 0,
    };
    p.search(eg).iter().map(|m| m.substs.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egraph::{saturate, to_egraph};
    use crate::testing::{dsl, test_limits};
    use egg::rewrite;

    #[test]
    fn the_typed_applier_refuses_ill_typed_instantiations() {
        let g = dsl("dim b, s; input x: f32[b, s, 8]; input y: f32[b, s, 8]; output \"z\" = x * y;");
        let (eg, _) = to_egraph(&g).unwrap();
        let before = eg.total_number_of_nodes();
        let rules: Vec<crate::egraph::Rule> = vec![
            // [b, s, 8] @ [b, s, 8]: the inner dimensions differ
            rewrite!("test-mul-as-matmul"; "(mul ?a ?b)" => { typed("(matmul ?a ?b)") }),
            // well-typed on its own, but a bf16 value cannot join an f32 e-class
            rewrite!("test-mul-as-cast"; "(mul ?a ?b)" => { typed("(cast ?a bf16)") }),
            // a tuple whose port type differs from its target
            rewrite!("test-mul-as-topk"; "(mul ?a ?b)" => { tuple("(topk ?a 2 2)", &["root", "_"]) }),
        ];
        let (eg, sat) = saturate(eg, &rules, &test_limits());
        assert_eq!(sat.stop_reason, crate::egraph::StopReason::Saturated);
        assert!(sat.fired.is_empty(), "{:?}", sat.fired);
        for r in ["test-mul-as-matmul", "test-mul-as-cast", "test-mul-as-topk"] {
            assert_eq!(sat.refused.get(r), Some(&1), "{r}: {:?}", sat.refused);
        }
        assert!(sat.refusal_example["test-mul-as-matmul"].contains("inner dimensions differ"));
        assert!(sat.refusal_example["test-mul-as-cast"].contains("matched class is f32"));
        // nothing entered the e-graph
        assert_eq!(eg.total_number_of_nodes(), before);
        assert_eq!(count_matches(&eg, "(matmul ?a ?b)"), 0);
        assert_eq!(count_matches(&eg, "(cast ?a ?t)"), 0);
    }

    #[test]
    fn conditions_read_types_and_attributes() {
        let g = dsl(
            "dim b; input x: f32[b, 4, 8]; output \"y\" = sum(x, axis = -1, keepdim = true);
                     output \"z\" = sum(x, axis = 1, keepdim = true);",
        );
        let (eg, _) = to_egraph(&g).unwrap();
        // (not a valid identity: a probe that only the last-axis sum may take)
        let rules: Vec<crate::egraph::Rule> = vec![
            rewrite!("test-last"; "(sum ?x ?ax true)" => { typed("(amax ?x ?ax true)") } if last_axis("?ax", "?x")),
        ];
        let (eg, sat) = saturate(eg, &rules, &test_limits());
        assert_eq!(sat.fired.get("test-last"), Some(&1));
        assert_eq!(count_matches(&eg, "(amax ?x [2] true)"), 1);
        assert_eq!(count_matches(&eg, "(amax ?x [1] true)"), 0);
    }
}
