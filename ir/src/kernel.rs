//! The kernel IR (design.md, "Kernel IR"): what `passes::partition` makes of a graph and what
//! the code generators (`codegen::ptx`, `codegen::cpu`) consume.
//!
//! A [`KernelPlan`] is a list of [`Kernel`]s in execution order over a table of [`Buffer`]s.
//! A buffer is a graph value that lives in memory: an input, a parameter, a carried state, a
//! graph output, or an intermediate that one kernel writes and later kernels read (only the
//! intermediates go to the arena of `passes::memplan`). Every buffer is stored contiguously,
//! row-major, in its dtype.
//!
//! A kernel is one of
//! - a **loop kernel** ([`LoopKernel`]): an iteration domain (a shape: one loop variable per
//!   axis) and, per output, a scalar expression evaluated at every domain index. Expressions
//!   form a DAG ([`ExprGraph`]) of elementwise ops over indexed loads; movement ops (reshape of
//!   contiguous data, permute, expand, slice) are folded into the loads' [`View`]s and
//!   [`IndexExpr`]s, concat into a `where` on the index, gathers into data-dependent indices.
//!   [`ScalarOp::Reduce`] sums or maxes a sub-expression over extra loop variables, so a norm
//!   or a softmax is one loop kernel: the reductions depend only on the first
//!   [`LoopKernel::outer`] axes and are computed once per outer index.
//! - a **template kernel** ([`TemplateKernel`]): a hand-structured algorithm (GEMM, grouped
//!   GEMM, attention, linear-attention chunk/step, routing top-k, FP8 quantisation, ...) with
//!   tuning parameters, whose operands may be computed on load by an elementwise prologue and
//!   whose result may be finished by an elementwise epilogue ([`Fusion`]) — bias, activation,
//!   residual add, cast.
//! - a **scan kernel** ([`ScanKernel`]): a recurrence the rewrite passes did not replace; it
//!   wraps the kernel plan of its body, which the runtime runs once per step.
//!
//! Symbolic dimensions (`batch`, `seq`, `past`) stay symbolic everywhere here: one plan serves
//! every binding, and [`LaunchGeometry::eval`] / [`Buffer::size_bytes`] take a [`DimEnv`].

use crate::dtype::DType;
use crate::fused::GroupedEpilogue;
use crate::graph::Value;
use crate::op::{BinaryOp, InputKind, ReduceOp, UnaryOp};
use crate::shape::{numel, shape_str, Dim, DimEnv, Shape};
use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;

/// Graph node ids, as [`Kernel::nodes`] lists them.
pub use petgraph::stable_graph::NodeIndex;

// ---- buffers ------------------------------------------------------------------------------------

/// Index into [`KernelPlan::buffers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(pub u32);

impl fmt::Display for BufferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

/// Where a buffer's memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BufferKind {
    /// A data input of the step (token ids).
    Input,
    /// A carried state read by the step (KV cache, linear-attention state).
    State,
    /// A weight.
    Param,
    /// Written by one kernel, read by later ones, dead after the step: lives in the arena.
    Intermediate,
    /// A graph output (logits, the new value of a carried state): handed to the caller.
    Output,
}

impl BufferKind {
    /// Only intermediates are placed in the arena; everything else is owned by the caller.
    pub fn in_arena(self) -> bool {
        self == BufferKind::Intermediate
    }

    pub fn name(self) -> &'static str {
        match self {
            BufferKind::Input => "input",
            BufferKind::State => "state",
            BufferKind::Param => "param",
            BufferKind::Intermediate => "temp",
            BufferKind::Output => "output",
        }
    }
}

/// A graph value held in memory, contiguous and row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    /// `%12 qkv` (node and DSL label), or the input's / parameter's name.
    pub name: String,
    pub kind: BufferKind,
    pub dtype: DType,
    pub shape: Shape,
    /// The graph value it holds (in a scan body's plan, a value of the body graph).
    pub value: Value,
}

impl Buffer {
    pub fn numel(&self) -> Dim {
        numel(&self.shape)
    }

    /// Size in bytes under `env`.
    pub fn size_bytes(&self, env: &DimEnv) -> Result<u64, String> {
        let n = self.numel().eval(env)?;
        let n = u64::try_from(n).map_err(|_| format!("buffer {} has {n} elements", self.name))?;
        n.checked_mul(self.dtype.size_bytes() as u64)
            .ok_or_else(|| format!("buffer {} overflows", self.name))
    }
}

/// An affine strided view of a buffer: element `(i_0, .., i_{r-1})` of the view is element
/// `offset + Σ i_d · strides[d]` of the buffer's storage. A stride of 0 broadcasts. This is how
/// movement ops cost nothing: a chain of permute / slice / expand / reshape over a buffer
/// becomes one view, as long as every reshape only splits or merges dims that are contiguous
/// with each other (otherwise the partitioner materialises a copy first).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct View {
    pub shape: Shape,
    pub strides: Vec<Dim>,
    pub offset: Dim,
}

impl View {
    /// The whole of a contiguous row-major buffer of `shape`.
    pub fn contiguous(shape: &[Dim]) -> View {
        let mut strides = vec![Dim::constant(1); shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1].mul(&shape[i + 1]);
        }
        View {
            shape: shape.to_vec(),
            strides,
            offset: Dim::constant(0),
        }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// True when this is exactly the whole contiguous buffer of its shape.
    pub fn is_contiguous(&self) -> bool {
        *self == View::contiguous(&self.shape)
    }

    /// `permute(perm)`; None when `perm` is not a permutation of the axes.
    pub fn permute(&self, perm: &[usize]) -> Option<View> {
        let mut seen = vec![false; self.rank()];
        for &p in perm {
            if p >= self.rank() || std::mem::replace(&mut seen[p], true) {
                return None;
            }
        }
        if perm.len() != self.rank() {
            return None;
        }
        Some(View {
            shape: perm.iter().map(|&p| self.shape[p].clone()).collect(),
            strides: perm.iter().map(|&p| self.strides[p].clone()).collect(),
            offset: self.offset.clone(),
        })
    }

    /// `x[start:end]` along `axis`.
    pub fn slice(&self, axis: usize, start: &Dim, end: &Dim) -> Option<View> {
        if axis >= self.rank() {
            return None;
        }
        let mut v = self.clone();
        v.offset = v.offset.add(&start.mul(&v.strides[axis]));
        v.shape[axis] = end.sub(start);
        Some(v)
    }

    /// Broadcast to `shape` (numpy rules, right-aligned): new and size-1 dims get stride 0.
    pub fn expand(&self, shape: &[Dim]) -> Option<View> {
        if shape.len() < self.rank() {
            return None;
        }
        let lead = shape.len() - self.rank();
        let one = Dim::constant(1);
        let mut strides = Vec::with_capacity(shape.len());
        for (i, d) in shape.iter().enumerate() {
            if i < lead {
                strides.push(Dim::constant(0));
                continue;
            }
            let (old, s) = (&self.shape[i - lead], &self.strides[i - lead]);
            if old == d {
                strides.push(s.clone());
            } else if *old == one {
                strides.push(Dim::constant(0));
            } else {
                return None;
            }
        }
        Some(View {
            shape: shape.to_vec(),
            strides,
            offset: self.offset.clone(),
        })
    }

    /// The same elements in row-major order under a new shape, when that is a strided view:
    /// every group of old dims that merges into new dims must be contiguous within itself.
    /// None otherwise (the caller materialises the data first).
    pub fn reshape(&self, shape: &[Dim]) -> Option<View> {
        let mut strides = vec![Dim::constant(0); shape.len()];
        for (olds, news) in reshape_groups(&self.shape, shape)? {
            // the old dims of a group must form one contiguous block ...
            for w in olds.windows(2) {
                if self.strides[w[0]] != self.strides[w[1]].mul(&self.shape[w[1]]) {
                    return None;
                }
            }
            // ... which the new dims then split row-major
            let mut stride = self.strides[*olds.last()?].clone();
            for &axis in news.iter().rev() {
                strides[axis] = stride.clone();
                stride = stride.mul(&shape[axis]);
            }
        }
        Some(View {
            shape: shape.to_vec(),
            strides,
            offset: self.offset.clone(),
        })
    }

    /// Element offset of view index `index` as an index expression.
    pub fn address(&self, index: &[IndexExpr]) -> IndexExpr {
        let mut a = IndexExpr::constant(self.offset.clone());
        for (i, s) in index.iter().zip(&self.strides) {
            a = a.add(&i.scale(s));
        }
        a
    }
}

/// A size comparison for symbolic products: every symbol valued 1009 (a prime larger than any
/// small constant dim). Only used to decide which side of a reshape group to grow; the group
/// closes on exact equality, so a wrong guess only makes a reshape fall back to a copy.
fn probe(d: &Dim) -> Option<i128> {
    let env: DimEnv = d.symbols().map(|s| (s.to_string(), 1009)).collect();
    d.eval(&env).ok().map(i128::from)
}

/// How a reshape from `old` to `new` regroups dims: pairs (old axes, new axes) of consecutive
/// axes holding the same number of elements, in order. Size-1 axes carry no data and are left
/// out of every group. None when the sizes do not line up.
pub fn reshape_groups(old: &[Dim], new: &[Dim]) -> Option<Vec<(Vec<usize>, Vec<usize>)>> {
    let one = Dim::constant(1);
    if numel(old) != numel(new) {
        return None;
    }
    let olds: Vec<usize> = (0..old.len()).filter(|&i| old[i] != one).collect();
    let news: Vec<usize> = (0..new.len()).filter(|&i| new[i] != one).collect();
    let mut groups = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < olds.len() && j < news.len() {
        // grow [i, i2) x [j, j2) until both sides hold the same number of elements
        let (mut i2, mut j2) = (i + 1, j + 1);
        let mut p_old = old[olds[i]].clone();
        let mut p_new = new[news[j]].clone();
        while p_old != p_new {
            let (a, b) = (probe(&p_old)?, probe(&p_new)?);
            if a < b && i2 < olds.len() {
                p_old = p_old.mul(&old[olds[i2]]);
                i2 += 1;
            } else if b <= a && j2 < news.len() {
                p_new = p_new.mul(&new[news[j2]]);
                j2 += 1;
            } else {
                return None;
            }
        }
        groups.push((olds[i..i2].to_vec(), news[j..j2].to_vec()));
        i = i2;
        j = j2;
    }
    (i == olds.len() && j == news.len()).then_some(groups)
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let strides: Vec<String> = self.strides.iter().map(|s| s.to_string()).collect();
        write!(f, "{} strides [{}]", shape_str(&self.shape), strides.join(", "))?;
        if self.offset != Dim::constant(0) {
            write!(f, " offset {}", self.offset)?;
        }
        Ok(())
    }
}

/// A buffer as one kernel argument sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BufferRef {
    pub buffer: BufferId,
    pub view: View,
}

// ---- scalar expressions -------------------------------------------------------------------------

/// Index into an [`ExprGraph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExprId(pub u32);

impl fmt::Display for ExprId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// What an index expression is affine in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IndexVar {
    /// A loop variable: `0..rank` are the domain's axes (outermost first), higher numbers the
    /// variables of reductions.
    Loop(u32),
    /// An integer read from data, the value of an (i64) expression of the same graph: a
    /// gather's index.
    Data(ExprId),
}

/// `Σ coeff · var + offset`, coefficients and offset symbolic. Invariant (kept by the
/// constructors): terms sorted by variable, each variable once, no zero coefficient.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IndexExpr {
    pub terms: Vec<(IndexVar, Dim)>,
    pub offset: Dim,
}

impl IndexExpr {
    pub fn constant(offset: Dim) -> IndexExpr {
        IndexExpr {
            terms: Vec::new(),
            offset,
        }
    }

    pub fn zero() -> IndexExpr {
        IndexExpr::constant(Dim::constant(0))
    }

    pub fn var(v: IndexVar) -> IndexExpr {
        IndexExpr {
            terms: vec![(v, Dim::constant(1))],
            offset: Dim::constant(0),
        }
    }

    pub fn loop_var(v: u32) -> IndexExpr {
        IndexExpr::var(IndexVar::Loop(v))
    }

    /// The identity index of a domain of rank `rank`: `[i0, i1, ..]`.
    pub fn identity(rank: usize) -> Vec<IndexExpr> {
        (0..rank as u32).map(IndexExpr::loop_var).collect()
    }

    pub fn add(&self, o: &IndexExpr) -> IndexExpr {
        let mut terms: BTreeMap<IndexVar, Dim> = self.terms.iter().cloned().collect();
        for (v, c) in &o.terms {
            let e = terms.entry(*v).or_insert_with(|| Dim::constant(0));
            *e = e.add(c);
        }
        IndexExpr {
            terms: terms.into_iter().filter(|(_, c)| *c != Dim::constant(0)).collect(),
            offset: self.offset.add(&o.offset),
        }
    }

    pub fn add_const(&self, d: &Dim) -> IndexExpr {
        self.add(&IndexExpr::constant(d.clone()))
    }

    pub fn scale(&self, c: &Dim) -> IndexExpr {
        if *c == Dim::constant(0) {
            return IndexExpr::zero();
        }
        IndexExpr {
            terms: self.terms.iter().map(|(v, k)| (*v, k.mul(c))).collect(),
            offset: self.offset.mul(c),
        }
    }

    /// The value when no variable appears.
    pub fn as_const(&self) -> Option<&Dim> {
        self.terms.is_empty().then_some(&self.offset)
    }

    /// The loop variables it reads directly (not through data terms).
    pub fn loop_vars(&self) -> impl Iterator<Item = u32> + '_ {
        self.terms.iter().filter_map(|(v, _)| match v {
            IndexVar::Loop(l) => Some(*l),
            IndexVar::Data(_) => None,
        })
    }

    /// The expressions whose values it reads.
    pub fn data_terms(&self) -> impl Iterator<Item = ExprId> + '_ {
        self.terms.iter().filter_map(|(v, _)| match v {
            IndexVar::Data(e) => Some(*e),
            IndexVar::Loop(_) => None,
        })
    }
}

impl fmt::Display for IndexExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .terms
            .iter()
            .map(|(v, c)| {
                let v = match v {
                    IndexVar::Loop(l) => format!("i{l}"),
                    IndexVar::Data(e) => format!("[{e}]"),
                };
                if *c == Dim::constant(1) {
                    v
                } else if c.as_const().is_some() || c.as_sym().is_some() {
                    format!("{c}*{v}")
                } else {
                    format!("({c})*{v}")
                }
            })
            .collect();
        if self.offset != Dim::constant(0) || parts.is_empty() {
            parts.push(self.offset.to_string());
        }
        f.write_str(&parts.join(" + "))
    }
}

/// An f64 constant stored by its bits, so that expressions can be hashed and compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConstValue(u64);

impl ConstValue {
    pub fn new(v: f64) -> ConstValue {
        ConstValue(v.to_bits())
    }
    pub fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

/// One node of a scalar expression. Operands are earlier nodes of the same [`ExprGraph`].
/// Semantics are those of the graph op of the same name (ir::interp), on one element; the
/// node's dtype is the graph node's, and a float result is rounded to it (storage emulation).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ScalarOp {
    /// Element `index` (one expression per view dim) of the view `Kernel::inputs[input]`.
    /// An index outside the view's shape (some `index[d]` not in `0..shape[d]`) reads zero:
    /// the unselected branch of a concat's `where`, or a reduction hoisted out of it, may
    /// compute such indices, so code generators predicate loads they cannot prove in range.
    Load {
        input: usize,
        index: Vec<IndexExpr>,
    },
    /// The template's result (`port`) at the current index: epilogues only.
    Result {
        port: usize,
    },
    Const(ConstValue),
    /// The value of an index expression (as i64): iota, `past`, a concat's bounds.
    Index(IndexExpr),
    Unary(UnaryOp, ExprId),
    Binary(BinaryOp, ExprId, ExprId),
    /// `where(c, a, b)`. Both branches may be evaluated (out-of-range loads read zero), so a
    /// code generator is free to compute them eagerly.
    Where(ExprId, ExprId, ExprId),
    /// Conversion to the node's dtype (the interpreter's `cast`).
    Cast(ExprId),
    /// `op` of `body` over the reduction variables `vars` (variable, extent). The result may
    /// depend on domain variables only (never on an enclosing reduction's variables), so code
    /// generators compute it once per distinct value of those.
    Reduce {
        op: ReduceOp,
        vars: Vec<(u32, Dim)>,
        body: ExprId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExprNode {
    pub op: ScalarOp,
    pub dtype: DType,
}

/// A DAG of scalar expressions, topologically ordered: every operand id is smaller than the
/// id of its user. Shared sub-expressions appear once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExprGraph {
    pub nodes: Vec<ExprNode>,
}

impl ExprGraph {
    pub fn get(&self, e: ExprId) -> Option<&ExprNode> {
        self.nodes.get(e.0 as usize)
    }

    /// The operands of `e` (index data terms included).
    pub fn operands(&self, e: ExprId) -> Vec<ExprId> {
        let Some(n) = self.get(e) else { return Vec::new() };
        match &n.op {
            ScalarOp::Load { index, .. } => index.iter().flat_map(|i| i.data_terms()).collect(),
            ScalarOp::Index(i) => i.data_terms().collect(),
            ScalarOp::Result { .. } | ScalarOp::Const(_) => Vec::new(),
            ScalarOp::Unary(_, a) | ScalarOp::Cast(a) => vec![*a],
            ScalarOp::Binary(_, a, b) => vec![*a, *b],
            ScalarOp::Where(c, a, b) => vec![*c, *a, *b],
            ScalarOp::Reduce { body, .. } => vec![*body],
        }
    }

    /// Whether any node is a reduction.
    pub fn has_reduce(&self) -> bool {
        self.nodes.iter().any(|n| matches!(n.op, ScalarOp::Reduce { .. }))
    }

    fn write_text(&self, out: &mut String, pad: &str, inputs: &[BufferRef]) {
        for (i, n) in self.nodes.iter().enumerate() {
            let body = match &n.op {
                ScalarOp::Load { input, index } => {
                    let idx: Vec<String> = index.iter().map(|x| x.to_string()).collect();
                    let buf = inputs.get(*input).map(|r| r.buffer.to_string()).unwrap_or_default();
                    format!("load in{input}({buf})[{}]", idx.join(", "))
                }
                ScalarOp::Result { port } => format!("result {port}"),
                ScalarOp::Const(c) => format!("const {}", c.get()),
                ScalarOp::Index(x) => format!("index {x}"),
                ScalarOp::Unary(u, a) => format!("{u} {a}"),
                ScalarOp::Binary(b, x, y) => format!("{} {x}, {y}", format!("{b:?}").to_lowercase()),
                ScalarOp::Where(c, a, b) => format!("where {c}, {a}, {b}"),
                ScalarOp::Cast(a) => format!("cast {a}"),
                ScalarOp::Reduce { op, vars, body } => {
                    let v: Vec<String> = vars.iter().map(|(v, n)| format!("i{v} < {n}")).collect();
                    format!(
                        "reduce_{} over {} of {body}",
                        format!("{op:?}").to_lowercase(),
                        v.join(", ")
                    )
                }
            };
            let _ = writeln!(out, "{pad}e{i} = {body} : {}", n.dtype);
        }
    }
}

// ---- loop kernels -------------------------------------------------------------------------------

/// Elementwise / reduction / norm- and softmax-shaped work: every output `o` stores
/// `exprs[stores[o]]` at every index of `domain` (through the output's view).
#[derive(Clone, Debug, PartialEq)]
pub struct LoopKernel {
    /// One loop variable per axis, `Loop(0)` outermost.
    pub domain: Shape,
    /// Every reduction depends only on the first `outer` domain axes: a code generator maps
    /// one outer index to a cooperating group of threads (a row), computes each reduction
    /// once per row and broadcasts it over the inner axes. 0 when there is no reduction, or
    /// when every reduction is over the whole domain (one row).
    pub outer: usize,
    pub exprs: ExprGraph,
    /// `stores[o]`: the value written to `Kernel::outputs[o]`.
    pub stores: Vec<ExprId>,
}

// ---- template kernels ---------------------------------------------------------------------------

/// An elementwise function over a domain, spliced into a template: a prologue computes one
/// operand element (at operand index = domain index, one store) as it is loaded; an epilogue
/// finishes the template's result (read with [`ScalarOp::Result`]) into the kernel's outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Fusion {
    pub domain: Shape,
    pub exprs: ExprGraph,
    /// A prologue's single value, or the value of each of the kernel's outputs.
    pub stores: Vec<ExprId>,
}

/// Where a template finds an operand.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    /// In memory: `Kernel::inputs[i]`, whose view gives the layout.
    Buffer(usize),
    /// Computed element by element on load.
    Prologue(Fusion),
}

/// How a GEMM operand's two matrix dims are laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatrixLayout {
    /// Last dim contiguous (`[.., rows, cols]` row-major).
    RowMajor,
    /// Second-to-last dim contiguous: the transpose of a row-major matrix (an HF weight
    /// `[N, K]` used as `[K, N]`).
    ColMajor,
    /// Neither dim has stride 1.
    Strided,
    /// Produced by a prologue: the template chooses.
    Computed,
}

impl MatrixLayout {
    /// The layout of the last two dims of `view`.
    pub fn of(view: &View) -> MatrixLayout {
        let r = view.rank();
        let one = Dim::constant(1);
        if r >= 1 && view.strides[r - 1] == one {
            MatrixLayout::RowMajor
        } else if r >= 2 && view.strides[r - 2] == one {
            MatrixLayout::ColMajor
        } else {
            MatrixLayout::Strided
        }
    }
}

/// `C[batch.., m, n] = Σ_k A[batch.., m, k] · B[batch.., k, n]`; operand batch dims broadcast.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    pub batch: Shape,
    pub m: Dim,
    pub n: Dim,
    pub k: Dim,
    pub a: MatrixLayout,
    pub b: MatrixLayout,
    /// Accumulator dtype (f32: design.md, "Precision").
    pub acc: DType,
    /// Result dtype (before any epilogue).
    pub out: DType,
    /// An RMSNorm of A's rows folded in (`Fused::NormMatmul`): see [`RowNorm`].
    pub norm: Option<RowNorm>,
    /// The routing of the router logits in result 0, folded in: see [`RouteTail`].
    pub route: Option<Box<RouteTail>>,
}

impl Gemm {
    /// The kernel outputs of the product itself (result 0 and a folded norm's rows): all but
    /// the two a folded route adds.
    pub fn product_outputs(&self, outputs: usize) -> usize {
        outputs.saturating_sub(if self.route.is_some() { 2 } else { 0 })
    }
}

/// The parameters of group-limited top-k routing (`Fused::RouteTopK`'s), shared by the
/// standalone template ([`TemplateOp::RouteTopK`]) and the route a GEMM folds ([`RouteTail`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Routing {
    pub k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub scale: f64,
    pub normalize: bool,
    pub biased: bool,
}

impl Routing {
    /// The routing of a `Fused::RouteTopK`, None for another op.
    pub fn of_fused(f: &crate::fused::Fused) -> Option<Routing> {
        match *f {
            crate::fused::Fused::RouteTopK {
                k,
                n_group,
                topk_group,
                scale,
                normalize,
                biased,
            } => Some(Routing {
                k,
                n_group,
                topk_group,
                scale,
                normalize,
                biased,
            }),
            _ => None,
        }
    }

    /// The composite op with this routing (its reference semantics).
    pub fn fused(&self) -> crate::fused::Fused {
        crate::fused::Fused::RouteTopK {
            k: self.k,
            n_group: self.n_group,
            topk_group: self.topk_group,
            scale: self.scale,
            normalize: self.normalize,
            biased: self.biased,
        }
    }
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "k={} groups={} keep={} scale={} normalize={} biased={}",
            self.k, self.n_group, self.topk_group, self.scale, self.normalize, self.biased
        )
    }
}

/// Group-limited routing (`Fused::RouteTopK`'s arithmetic) folded into the GEMM that computes
/// the router's logits (`passes::routegemm`, the decode plans whose GEMMs fold their norms).
/// Once every block of the kernel has stored result 0, the last block to finish routes every
/// row: its probabilities are result 0's columns `col .. col + experts` as stored, through a
/// sigmoid when `sigmoid`; the last operand is the selection bias when `biased`; the experts
/// (i64) and weights (f32) go to the kernel's last two outputs, `[rows.., k]` each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteTail {
    pub routing: Routing,
    pub experts: i64,
    pub col: i64,
    pub sigmoid: bool,
}

impl RouteTail {
    /// Most experts a folded route may have (the GPU keeps `experts / 32` keys a lane).
    pub const MAX_EXPERTS: i64 = 1024;

    /// The tail of a `RouteTopK` template whose probabilities are result 0's columns
    /// `col ..` (through a sigmoid when `sigmoid`); None for another template or a symbolic
    /// expert count.
    pub fn of(op: &TemplateOp, col: i64, sigmoid: bool) -> Option<RouteTail> {
        let TemplateOp::RouteTopK { routing, experts, .. } = op else {
            return None;
        };
        Some(RouteTail {
            routing: *routing,
            experts: experts.as_const()?,
            col,
            sigmoid,
        })
    }

    /// Whether a GEMM can route so: the limits of the GPU's tail (a warp a row: at most
    /// [`Self::MAX_EXPERTS`] experts in at most 63 equal groups, 1 to 32 chosen from the kept
    /// groups). `passes::routegemm` folds only what passes; the PTX backend refuses the rest.
    pub fn check(&self) -> Result<(), String> {
        let Routing { k, topk_group, .. } = self.routing;
        let (e, g) = (self.experts, self.routing.n_group as i64);
        if e <= 0 || e > Self::MAX_EXPERTS || g == 0 || g > 63 || e % g != 0 {
            return Err(format!("{e} experts in {g} groups cannot be routed in a GEMM's tail"));
        }
        let per = e / g;
        if k == 0 || k > 32 || topk_group as i64 > g || k as i64 > topk_group as i64 * per {
            return Err(format!(
                "cannot choose {k} experts from {topk_group} of {g} groups of {per} in a GEMM's tail"
            ));
        }
        Ok(())
    }

    /// The standalone template with this routing, over `tokens` rows.
    pub fn template(&self, tokens: Dim) -> TemplateOp {
        TemplateOp::RouteTopK {
            routing: self.routing,
            tokens,
            experts: Dim::constant(self.experts),
        }
    }
}

/// The RMSNorm a GEMM applies to the rows of A as it reads them (`Fused::NormMatmul`; decode
/// plans, `passes::normgemm`). Operand 2 is the weight `w [K]`. The GEMM multiplies
/// `round(round(a · r, A's dtype) · w[k], dtype)` where `r = 1 / sqrt(Σ_k a² / K + eps)` is
/// the row's statistic in f32 (`Fused::RmsNorm`'s arithmetic). With a second kernel output
/// (and no epilogue) the kernel also stores those normalised rows there. A backend may instead
/// multiply `round(a · w[k])` and scale each row's dot products by `r` (the GPU's tensor-core
/// path): the same norm up to bf16 rounding, within the dtype's tier.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowNorm {
    pub eps: f64,
    /// The normalised value's dtype (the RMSNorm's result type).
    pub dtype: DType,
}

/// The group RMSNorm and sigmoid output gate folded into a lightning template
/// (`Fused::LinearAttnGate`): operands 5 and 6 are `w [H·d]` and `g [b, T, H·d]`, and result 1
/// is the gated `[b, T, H·d]` (f32) instead of the raw `o`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GateNorm {
    pub groups: usize,
    pub eps: f64,
}

/// q's and k's per-head RMSNorm and RoPE made by the lightning step itself
/// (`Fused::LinearAttnQkGate`): operands 1 and 2 are the raw `q`, `k` rows (f32 `[b, T, H, d]`),
/// operands 7 and 8 their norm weights (`[d]` or `[H, d]`), 9 the positions `[T]` (i64) and 10
/// `inv_freq [rotary/2]`; the step uses `QkNormRope(q) · scale` and `QkNormRope(k)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QkPrelude {
    pub eps: f64,
    pub rotary: usize,
    pub scale: f64,
}

/// The algorithm a template kernel runs, with the sizes it was instantiated for. Operands are
/// in the order of the graph op (ir::op / ir::fused document each).
#[derive(Clone, Debug, PartialEq)]
pub enum TemplateOp {
    Gemm(Gemm),
    /// RMSNorm whose output is quantised to E4M3 in 1×128 tiles in the same kernel
    /// (`Fused::RmsNormQuantFp8`; with the residual add first when `residual`).
    RmsNormQuantFp8 {
        eps: f64,
        width: Dim,
        residual: bool,
    },
    /// SwiGLU whose output is quantised to E4M3 in 1×128 tiles (`Fused::SwiGluQuantFp8`).
    SwiGluQuantFp8 {
        width: Dim,
    },
    /// Expert GEMMs over the chosen experts only (`Fused::GroupedMatmul`): `tokens` rows each
    /// routed to `top_k` of `experts`, weights `[experts, n, k]`.
    GroupedGemm {
        epilogue: GroupedEpilogue,
        tokens: Dim,
        top_k: Dim,
        experts: Dim,
        n: Dim,
        k: Dim,
    },
    /// Causal GQA flash attention (`Fused::FlashAttention`).
    Attention {
        scale: f64,
        batch: Dim,
        kv_heads: Dim,
        group: Dim,
        q_len: Dim,
        kv_len: Dim,
        head_dim: Dim,
    },
    /// The lightning recurrence in chunked form (`Fused::LinearAttnChunk`).
    LinearAttnChunk {
        chunk: usize,
        batch: Dim,
        len: Dim,
        heads: Dim,
        head_dim: Dim,
        gate: Option<GateNorm>,
    },
    /// The lightning recurrence token by token (`Fused::LinearAttnStep`).
    LinearAttnStep {
        batch: Dim,
        len: Dim,
        heads: Dim,
        head_dim: Dim,
        gate: Option<GateNorm>,
        /// q and k normed and rotated in the kernel (`Fused::LinearAttnQkGate`; with `gate`)
        qk: Option<QkPrelude>,
    },
    /// Group-limited routing top-k (`Fused::RouteTopK`) over `tokens` rows of `experts` scores.
    RouteTopK {
        routing: Routing,
        tokens: Dim,
        experts: Dim,
    },
    QuantizeFp8 {
        rows: usize,
        cols: usize,
    },
    DequantizeFp8 {
        rows: usize,
        cols: usize,
        to: DType,
    },
    /// Block-scaled FP8 GEMM (`Fused::ScaledMatmulFp8`).
    ScaledGemmFp8 {
        m: Dim,
        n: Dim,
        k: Dim,
        out: DType,
    },
    /// Row-wise composites over rows of `width` elements (`Fused::RmsNorm`, ...).
    RmsNorm {
        eps: f64,
        width: Dim,
    },
    AddRmsNorm {
        eps: f64,
        width: Dim,
    },
    Softmax {
        width: Dim,
    },
    /// Operands `x [.., seq, heads, d]`, weight, `pos [seq]`, `inv_freq [rotary/2]`. The weight
    /// is `[d]` (every head) or `[heads, d]` (one row per head: q's and k's heads of a layer in
    /// one kernel, `fuse-qknorm-rope-pair-*`; it then arrives as a prologue selecting q's or
    /// k's norm weight by head).
    QkNormRope {
        eps: f64,
        rotary: usize,
        head_dim: Dim,
    },
    GroupNormGate {
        groups: usize,
        eps: f64,
        width: Dim,
    },
    /// Primitive selections and scatters (ir::op): values and indices of the `k` largest.
    TopK {
        k: usize,
        axis: usize,
    },
    ArgMax {
        axis: usize,
    },
    ScatterAdd {
        axis: usize,
    },
}

impl TemplateOp {
    pub fn name(&self) -> &'static str {
        match self {
            TemplateOp::Gemm(_) => "gemm",
            TemplateOp::RmsNormQuantFp8 { residual: false, .. } => "rms_norm_quant_fp8",
            TemplateOp::RmsNormQuantFp8 { residual: true, .. } => "add_rms_norm_quant_fp8",
            TemplateOp::SwiGluQuantFp8 { .. } => "swiglu_quant_fp8",
            TemplateOp::GroupedGemm { .. } => "grouped_gemm",
            TemplateOp::Attention { .. } => "attention",
            TemplateOp::LinearAttnChunk { gate: None, .. } => "linear_attn_chunk",
            TemplateOp::LinearAttnChunk { gate: Some(_), .. } => "linear_attn_chunk_gate",
            TemplateOp::LinearAttnStep { qk: Some(_), .. } => "linear_attn_step_qk_gate",
            TemplateOp::LinearAttnStep { gate: None, .. } => "linear_attn_step",
            TemplateOp::LinearAttnStep {
                gate: Some(_),
                qk: None,
                ..
            } => "linear_attn_step_gate",
            TemplateOp::RouteTopK { .. } => "route_topk",
            TemplateOp::QuantizeFp8 { .. } => "quantize_fp8",
            TemplateOp::DequantizeFp8 { .. } => "dequantize_fp8",
            TemplateOp::ScaledGemmFp8 { .. } => "scaled_gemm_fp8",
            TemplateOp::RmsNorm { .. } => "rms_norm",
            TemplateOp::AddRmsNorm { .. } => "add_rms_norm",
            TemplateOp::Softmax { .. } => "softmax",
            TemplateOp::QkNormRope { .. } => "qk_norm_rope",
            TemplateOp::GroupNormGate { .. } => "group_norm_gate",
            TemplateOp::TopK { .. } => "topk",
            TemplateOp::ArgMax { .. } => "argmax",
            TemplateOp::ScatterAdd { .. } => "scatter_add",
        }
    }

    /// Whether operand `slot` may be computed by an elementwise prologue instead of read from
    /// memory. Templates that stream an operand through registers accept one; those that
    /// index it irregularly (selections, scatters) or quantise from raw blocks do not.
    pub fn accepts_prologue(&self, slot: usize) -> bool {
        match self {
            // A, B (and a folded norm's weight); a folded norm reads A from memory (its row
            // statistics come from vector loads of A, before or during the K loop)
            TemplateOp::Gemm(g) => slot < 3 && !(slot == 0 && g.norm.is_some()),
            // the token activations (and the routing weights of the combine, and the shared
            // expert's activations beside it)
            TemplateOp::GroupedGemm { .. } => slot == 0 || slot == 2 || slot == 4,
            TemplateOp::Attention { .. }
            | TemplateOp::LinearAttnChunk { .. }
            | TemplateOp::LinearAttnStep { .. }
            | TemplateOp::RouteTopK { .. }
            | TemplateOp::QuantizeFp8 { .. }
            | TemplateOp::RmsNormQuantFp8 { .. }
            | TemplateOp::SwiGluQuantFp8 { .. }
            | TemplateOp::RmsNorm { .. }
            | TemplateOp::AddRmsNorm { .. }
            | TemplateOp::Softmax { .. }
            | TemplateOp::QkNormRope { .. }
            | TemplateOp::GroupNormGate { .. } => true,
            TemplateOp::DequantizeFp8 { .. }
            | TemplateOp::ScaledGemmFp8 { .. }
            | TemplateOp::TopK { .. }
            | TemplateOp::ArgMax { .. }
            | TemplateOp::ScatterAdd { .. } => false,
        }
    }

    /// Whether an elementwise epilogue may finish the result: single-result templates that
    /// produce each output element in registers.
    pub fn accepts_epilogue(&self) -> bool {
        matches!(
            self,
            TemplateOp::Gemm(_)
                | TemplateOp::GroupedGemm { .. }
                | TemplateOp::Attention { .. }
                | TemplateOp::DequantizeFp8 { .. }
                | TemplateOp::ScaledGemmFp8 { .. }
                | TemplateOp::RmsNorm { .. }
                | TemplateOp::Softmax { .. }
                | TemplateOp::QkNormRope { .. }
                | TemplateOp::GroupNormGate { .. }
        )
    }

    fn attrs(&self) -> String {
        match self {
            TemplateOp::RmsNormQuantFp8 { eps, width, residual } => {
                format!("eps={eps:e} width={width} residual={residual} block=1x128")
            }
            TemplateOp::SwiGluQuantFp8 { width } => format!("width={width} block=1x128"),
            TemplateOp::Gemm(g) => format!(
                "batch={} m={} n={} k={} a={:?} b={:?} acc={} out={}{}{}",
                shape_str(&g.batch),
                g.m,
                g.n,
                g.k,
                g.a,
                g.b,
                g.acc,
                g.out,
                match &g.norm {
                    Some(r) => format!(" norm(eps={:e}, {})", r.eps, r.dtype),
                    None => String::new(),
                },
                match &g.route {
                    Some(r) => format!(
                        " route({} experts={} col={}{})",
                        r.routing,
                        r.experts,
                        r.col,
                        if r.sigmoid { " sigmoid" } else { "" }
                    ),
                    None => String::new(),
                }
            ),
            TemplateOp::GroupedGemm {
                epilogue,
                tokens,
                top_k,
                experts,
                n,
                k,
            } => format!("epilogue={epilogue:?} tokens={tokens} top_k={top_k} experts={experts} n={n} k={k}"),
            TemplateOp::Attention {
                scale,
                batch,
                kv_heads,
                group,
                q_len,
                kv_len,
                head_dim,
            } => format!(
                "scale={scale} batch={batch} kv_heads={kv_heads} group={group} q_len={q_len} kv_len={kv_len} d={head_dim}"
            ),
            TemplateOp::LinearAttnChunk {
                chunk,
                batch,
                len,
                heads,
                head_dim,
                gate,
            } => format!("chunk={chunk} batch={batch} len={len} heads={heads} d={head_dim}{}", gate_str(gate)),
            TemplateOp::LinearAttnStep {
                batch,
                len,
                heads,
                head_dim,
                gate,
                qk,
            } => format!(
                "batch={batch} len={len} heads={heads} d={head_dim}{}{}",
                gate_str(gate),
                match qk {
                    Some(p) => format!(" qk_eps={:e} rotary={} scale={}", p.eps, p.rotary, p.scale),
                    None => String::new(),
                }
            ),
            TemplateOp::RouteTopK {
                routing,
                tokens,
                experts,
            } => format!("{routing} tokens={tokens} experts={experts}"),
            TemplateOp::QuantizeFp8 { rows, cols } => format!("block={rows}x{cols}"),
            TemplateOp::DequantizeFp8 { rows, cols, to } => format!("block={rows}x{cols} to={to}"),
            TemplateOp::ScaledGemmFp8 { m, n, k, out } => format!("m={m} n={n} k={k} out={out}"),
            TemplateOp::RmsNorm { eps, width } | TemplateOp::AddRmsNorm { eps, width } => {
                format!("eps={eps:e} width={width}")
            }
            TemplateOp::Softmax { width } => format!("width={width}"),
            TemplateOp::QkNormRope { eps, rotary, head_dim } => format!("eps={eps:e} rotary={rotary} d={head_dim}"),
            TemplateOp::GroupNormGate { groups, eps, width } => format!("groups={groups} eps={eps:e} width={width}"),
            TemplateOp::TopK { k, axis } => format!("k={k} axis={axis}"),
            TemplateOp::ArgMax { axis } | TemplateOp::ScatterAdd { axis } => format!("axis={axis}"),
        }
    }
}

fn gate_str(gate: &Option<GateNorm>) -> String {
    match gate {
        Some(g) => format!(" gate_groups={} eps={:e}", g.groups, g.eps),
        None => String::new(),
    }
}

/// Tuning parameters of a template. The defaults are reasonable starting points for Hopper;
/// an autotuner may replace them per shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TemplateParams {
    pub tile_m: u32,
    pub tile_n: u32,
    pub tile_k: u32,
    pub warps: u32,
    /// Software-pipelining depth (shared-memory buffers in flight).
    pub stages: u32,
}

impl TemplateParams {
    /// Defaults per algorithm.
    pub fn default_for(op: &TemplateOp) -> TemplateParams {
        let p = |tile_m, tile_n, tile_k, warps, stages| TemplateParams {
            tile_m,
            tile_n,
            tile_k,
            warps,
            stages,
        };
        match op {
            TemplateOp::Gemm(_) | TemplateOp::ScaledGemmFp8 { .. } => p(128, 128, 64, 8, 3),
            TemplateOp::GroupedGemm { .. } => p(64, 128, 64, 4, 3),
            TemplateOp::Attention { .. } => p(64, 64, 64, 4, 2),
            TemplateOp::LinearAttnChunk { chunk, .. } => p((*chunk).clamp(1, 256) as u32, 64, 64, 4, 2),
            TemplateOp::LinearAttnStep { .. } => p(1, 64, 64, 4, 1),
            // row-wise: one row per block, `warps` warps per row
            _ => p(1, 1, 1, 4, 1),
        }
    }
}

/// A template kernel: `op` over `operands`, optionally finished by `epilogue`. Without an
/// epilogue, `Kernel::outputs[p]` is the op's result `p`; with one, the epilogue's stores.
#[derive(Clone, Debug, PartialEq)]
pub struct TemplateKernel {
    pub op: TemplateOp,
    pub params: TemplateParams,
    /// One per operand of the op.
    pub operands: Vec<Operand>,
    pub epilogue: Option<Fusion>,
}

// ---- scans --------------------------------------------------------------------------------------

/// A recurrence (`Op::Scan`) kept as such: the runtime runs `body` once per step `t` in
/// `0..length`. Body input `i` is bound to `Kernel::inputs[i]`: carries (the first `n_carry`)
/// to the current carry, sequences (the next `n_seq`) to their slice `t` along `axis`, captured
/// values as they are. Body output `i < n_carry` becomes the next carry (the runtime
/// double-buffers carries in the scan's scratch space; the last step writes
/// `Kernel::outputs[i]`); per-step output `j` is written to slice `t` of
/// `Kernel::outputs[n_carry + j]`. Each body kernel is launched once per step.
#[derive(Clone, Debug, PartialEq)]
pub struct ScanKernel {
    pub axis: usize,
    pub length: Dim,
    pub n_carry: usize,
    pub n_seq: usize,
    pub body: Box<KernelPlan>,
}

// ---- kernels ------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub enum KernelKind {
    Loop(LoopKernel),
    Template(TemplateKernel),
    Scan(ScanKernel),
}

/// One grid axis: `ceil(extent / per_block)` blocks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GridDim {
    pub extent: Dim,
    pub per_block: u32,
}

impl GridDim {
    pub fn blocks(extent: Dim, per_block: u32) -> GridDim {
        GridDim {
            extent,
            per_block: per_block.max(1),
        }
    }
    pub fn one() -> GridDim {
        GridDim::blocks(Dim::constant(1), 1)
    }
}

/// Launch geometry in terms of the symbolic dims. For a scan, `grid[0]` counts the steps (a
/// host-side loop) and the body's kernels carry their own geometry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LaunchGeometry {
    pub grid: [GridDim; 3],
    pub block: [u32; 3],
    /// Static shared memory per block.
    pub shared_bytes: u32,
}

impl LaunchGeometry {
    /// Concrete grid under `env`.
    pub fn eval(&self, env: &DimEnv) -> Result<[u64; 3], String> {
        let mut out = [0u64; 3];
        for (o, g) in out.iter_mut().zip(&self.grid) {
            let e = g.extent.eval(env)?;
            let e = u64::try_from(e).map_err(|_| format!("grid extent {} = {e} < 0", g.extent))?;
            *o = e.div_ceil(u64::from(g.per_block));
        }
        Ok(out)
    }
}

impl fmt::Display for LaunchGeometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g: Vec<String> = self
            .grid
            .iter()
            .map(|g| {
                if g.per_block == 1 {
                    g.extent.to_string()
                } else {
                    format!("ceil(({})/{})", g.extent, g.per_block)
                }
            })
            .collect();
        write!(
            f,
            "grid [{}] block [{}, {}, {}] smem {}",
            g.join(", "),
            self.block[0],
            self.block[1],
            self.block[2],
            self.shared_bytes
        )
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// `k12_gemm_qkv`: position, kind, and the DSL label of what it computes.
    pub name: String,
    pub kind: KernelKind,
    /// Buffers read. A buffer may appear more than once under different views.
    pub inputs: Vec<BufferRef>,
    /// Buffers written (their views give where each domain index lands).
    pub outputs: Vec<BufferRef>,
    /// The graph nodes it evaluates (views folded into it included), for `ringjit ptx` headers.
    pub nodes: Vec<NodeIndex>,
    pub launch: LaunchGeometry,
}

impl Kernel {
    /// The GEMM of a GEMM template kernel.
    pub fn gemm(&self) -> Option<&Gemm> {
        match &self.kind {
            KernelKind::Template(TemplateKernel {
                op: TemplateOp::Gemm(g),
                ..
            }) => Some(g),
            _ => None,
        }
    }

    /// Whether the kernel is a GEMM that routes its rows (`Gemm.route`).
    pub fn routes(&self) -> bool {
        self.gemm().is_some_and(|g| g.route.is_some())
    }

    /// Short kind: `loop`, `scan`, or the template's name.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            KernelKind::Loop(_) => "loop",
            KernelKind::Template(t) => t.op.name(),
            KernelKind::Scan(_) => "scan",
        }
    }
}

/// A graph output and the buffer holding it: its elements in row-major order. `shape` is the
/// output's own shape, which differs from the buffer's when the output is a reshape of it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanOutput {
    pub name: String,
    pub buffer: BufferId,
    pub kind: InputKind,
    pub shape: Shape,
}

/// A whole graph as kernels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelPlan {
    pub buffers: Vec<Buffer>,
    /// In execution order: a kernel reads only buffers that are not intermediates or that an
    /// earlier kernel wrote.
    pub kernels: Vec<Kernel>,
    /// The buffer of each graph input, in `Graph::inputs` order (scan bodies bind by it).
    pub inputs: Vec<BufferId>,
    pub outputs: Vec<PlanOutput>,
}

/// Kernel counts of a plan (see [`KernelPlan::counts`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// Loop + template kernels, scan bodies included: the launches of one step when every
    /// scan runs one iteration (decode). Scan wrappers are host loops and not counted.
    pub total: usize,
    pub loops: usize,
    pub templates: usize,
    /// Scan wrappers.
    pub scans: usize,
    /// Per kind name (`loop`, `gemm`, `topk`, ..., `scan`), scan bodies included.
    pub by_kind: BTreeMap<String, usize>,
}

impl KernelPlan {
    pub fn buffer(&self, id: BufferId) -> Option<&Buffer> {
        self.buffers.get(id.0 as usize)
    }

    /// The symbolic dims of the plan, sorted by name: the order in which a compiled kernel
    /// receives their values (docs/kernel-abi.md). Every symbol a kernel uses appears in some
    /// buffer's shape (the graph's inputs, states and parameters introduce them), scan bodies
    /// included.
    pub fn symbols(&self) -> Vec<String> {
        let mut set = std::collections::BTreeSet::new();
        self.collect_symbols(&mut set);
        set.into_iter().collect()
    }

    fn collect_symbols(&self, set: &mut std::collections::BTreeSet<String>) {
        for b in &self.buffers {
            for d in &b.shape {
                set.extend(d.symbols().map(str::to_string));
            }
        }
        for k in &self.kernels {
            if let KernelKind::Scan(s) = &k.kind {
                set.extend(s.length.symbols().map(str::to_string));
                s.body.collect_symbols(set);
            }
        }
    }

    /// Kernels launched per step (see [`KernelCounts::total`]).
    pub fn kernel_count(&self) -> usize {
        self.counts().total
    }

    pub fn counts(&self) -> KernelCounts {
        let mut c = KernelCounts::default();
        self.add_counts(&mut c);
        c
    }

    fn add_counts(&self, c: &mut KernelCounts) {
        for k in &self.kernels {
            *c.by_kind.entry(k.kind_name().to_string()).or_insert(0) += 1;
            match &k.kind {
                KernelKind::Loop(_) => {
                    c.loops += 1;
                    c.total += 1;
                }
                KernelKind::Template(_) => {
                    c.templates += 1;
                    c.total += 1;
                }
                KernelKind::Scan(s) => {
                    c.scans += 1;
                    s.body.add_counts(c);
                }
            }
        }
    }

    /// Text form: the buffers, then one block per kernel listing its graph nodes.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        self.write_text(&mut s, "");
        s
    }

    fn write_text(&self, out: &mut String, pad: &str) {
        let _ = writeln!(out, "{pad}buffers {{");
        for (i, b) in self.buffers.iter().enumerate() {
            let _ = writeln!(
                out,
                "{pad}  b{i} = {} {}{} \"{}\"",
                b.kind.name(),
                b.dtype,
                shape_str(&b.shape),
                b.name
            );
        }
        let _ = writeln!(out, "{pad}}}");
        for k in &self.kernels {
            write_kernel(k, out, pad);
        }
        for o in &self.outputs {
            let kw = if o.kind == InputKind::State { "carry" } else { "output" };
            let _ = writeln!(out, "{pad}{kw} \"{}\" = {}", o.name, o.buffer);
        }
    }
}

fn write_refs(out: &mut String, pad: &str, what: &str, refs: &[BufferRef]) {
    for (i, r) in refs.iter().enumerate() {
        let _ = writeln!(out, "{pad}  {what}{i} = {} {}", r.buffer, r.view);
    }
}

fn write_fusion(out: &mut String, pad: &str, title: &str, f: &Fusion, inputs: &[BufferRef]) {
    let stores: Vec<String> = f.stores.iter().map(|e| e.to_string()).collect();
    let _ = writeln!(
        out,
        "{pad}  {title} over {} -> {} {{",
        shape_str(&f.domain),
        stores.join(", ")
    );
    f.exprs.write_text(out, &format!("{pad}    "), inputs);
    let _ = writeln!(out, "{pad}  }}");
}

fn write_kernel(k: &Kernel, out: &mut String, pad: &str) {
    let nodes: Vec<String> = k.nodes.iter().map(|n| format!("%{}", n.index())).collect();
    let _ = writeln!(out, "{pad}kernel {} {{  # nodes {}", k.name, nodes.join(" "));
    let _ = writeln!(out, "{pad}  launch {}", k.launch);
    write_refs(out, pad, "in", &k.inputs);
    match &k.kind {
        KernelKind::Loop(l) => {
            let _ = writeln!(out, "{pad}  loop over {} outer {}", shape_str(&l.domain), l.outer);
            l.exprs.write_text(out, &format!("{pad}  "), &k.inputs);
            for (o, e) in l.stores.iter().enumerate() {
                let _ = writeln!(out, "{pad}  out{o} <- {e}");
            }
        }
        KernelKind::Template(t) => {
            let p = &t.params;
            let _ = writeln!(
                out,
                "{pad}  {} {} tile {}x{}x{} warps {} stages {}",
                t.op.name(),
                t.op.attrs(),
                p.tile_m,
                p.tile_n,
                p.tile_k,
                p.warps,
                p.stages
            );
            for (i, o) in t.operands.iter().enumerate() {
                match o {
                    Operand::Buffer(b) => {
                        let _ = writeln!(out, "{pad}  operand {i} = in{b}");
                    }
                    Operand::Prologue(f) => write_fusion(out, pad, &format!("operand {i} = prologue"), f, &k.inputs),
                }
            }
            if let Some(e) = &t.epilogue {
                write_fusion(out, pad, "epilogue", e, &k.inputs);
            }
        }
        KernelKind::Scan(s) => {
            let _ = writeln!(
                out,
                "{pad}  scan axis={} length={} carries={} seqs={} body {{",
                s.axis, s.length, s.n_carry, s.n_seq
            );
            s.body.write_text(out, &format!("{pad}    "));
            let _ = writeln!(out, "{pad}  }}");
        }
    }
    write_refs(out, pad, "out", &k.outputs);
    let _ = writeln!(out, "{pad}}}");
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        write_kernel(self, &mut s, "");
        f.write_str(&s)
    }
}

impl fmt::Display for KernelPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(v: &[i64]) -> Shape {
        v.iter().map(|&x| Dim::constant(x)).collect()
    }

    #[test]
    fn views_fold_movement_ops() {
        let seq = Dim::sym("seq");
        let base = View::contiguous(&[Dim::sym("batch"), seq.clone(), Dim::constant(192)]);
        // slice the k part of a fused qkv projection and split heads: still a strided view
        let k = base.slice(2, &Dim::constant(64), &Dim::constant(128)).unwrap();
        let k = k
            .reshape(&[Dim::sym("batch"), seq.clone(), Dim::constant(4), Dim::constant(16)])
            .unwrap();
        assert_eq!(k.offset, Dim::constant(64));
        assert_eq!(k.strides[1], Dim::constant(192));
        assert_eq!(k.strides[2], Dim::constant(16));
        // heads first, then merge heads back: [b, 4, seq, 16] -> [b, seq, 64] is not strided
        let p = k.permute(&[0, 2, 1, 3]).unwrap();
        let merged = p.permute(&[0, 2, 1, 3]).unwrap();
        assert!(merged
            .reshape(&[Dim::sym("batch"), seq.clone(), Dim::constant(64)])
            .is_some());
        assert!(p
            .reshape(&[Dim::sym("batch"), Dim::constant(4).mul(&seq), Dim::constant(16)])
            .is_none());
        // transpose of a weight: column-major
        let w = View::contiguous(&dims(&[192, 64])).permute(&[1, 0]).unwrap();
        assert_eq!(MatrixLayout::of(&w), MatrixLayout::ColMajor);
        // expand keeps the data, adds stride-0 dims
        let e = View::contiguous(&dims(&[3, 1])).expand(&dims(&[2, 3, 5])).unwrap();
        assert_eq!(e.strides, dims(&[0, 1, 0]));
        assert!(View::contiguous(&dims(&[3, 2])).expand(&dims(&[3, 5])).is_none());
        // unit dims are free
        let u = View::contiguous(&dims(&[4, 1, 8])).reshape(&dims(&[1, 32])).unwrap();
        assert_eq!(u.strides, dims(&[0, 1]));
    }

    #[test]
    fn index_exprs_stay_normalised() {
        let i = IndexExpr::loop_var(0)
            .scale(&Dim::constant(3))
            .add(&IndexExpr::loop_var(1));
        let j = i
            .add(&IndexExpr::loop_var(0).scale(&Dim::constant(-3)))
            .add_const(&Dim::sym("past"));
        assert_eq!(j.terms, vec![(IndexVar::Loop(1), Dim::constant(1))]);
        assert_eq!(j.to_string(), "i1 + past");
        let v = View::contiguous(&dims(&[5, 7]));
        assert_eq!(v.address(&IndexExpr::identity(2)).to_string(), "7*i0 + i1");
        assert_eq!(IndexExpr::zero().to_string(), "0");
    }

    #[test]
    fn launch_geometry_evaluates() {
        let l = LaunchGeometry {
            grid: [
                GridDim::blocks(Dim::sym("seq").mul(&Dim::constant(64)), 256),
                GridDim::one(),
                GridDim::blocks(Dim::sym("batch"), 1),
            ],
            block: [256, 1, 1],
            shared_bytes: 0,
        };
        let env: DimEnv = [("seq".to_string(), 5), ("batch".to_string(), 3)].into();
        assert_eq!(l.eval(&env).unwrap(), [2, 1, 3]);
        assert!(l.to_string().starts_with("grid [ceil((64*seq)/256), 1, batch]"));
    }
}
