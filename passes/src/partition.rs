//! Kernel partition (design.md pipeline: "extraction by cost → kernel partition → memory
//! plan"): every node of a graph goes to a kernel of the kernel IR ([`ir::kernel`]). Works on
//! unfused graphs (primitives only) and on graphs the rewrite passes have fused.
//!
//! Rules
//! - Leaves (inputs, states, parameters) are buffers. Literals (`const`, `dim_value`, `iota`)
//!   and elementwise functions of literals only (positions, RoPE frequencies, the causal mask)
//!   are index arithmetic: recomputed wherever they are used, never a kernel of their own
//!   unless a template reads them from memory.
//! - Views (`reshape`, `permute`, `expand`, `slice`) cost no kernel: over a stored value they
//!   fold into the reader's buffer [`View`], over a computed one into its index expressions.
//! - Elementwise ops (unary, binary, `where`, `cast`, `concat`, gathers, `swiglu`) fuse into
//!   their consumer: into a loop kernel, or into a template's prologue or epilogue. A value
//!   used by several kernels is stored once (as an extra output of one of them when it has
//!   that kernel's domain), unless it is one cheap op, which is then recomputed.
//! - A reduction fuses into its consumer loop kernel when it is evaluated once per index of
//!   that kernel's domain (norm- and softmax-shaped kernels); otherwise it is stored.
//! - `matmul`, `topk`, `argmax`, `scatter_add` and the composites are template kernels; the
//!   elementwise consumers of a template's single result become its epilogue.
//! - A `scan` that the rewrites did not replace becomes a scan kernel wrapping the partition
//!   of its body (one launch of each body kernel per step).
//!
//! Algorithm: `decide` visits the nodes consumers first and decides where each is evaluated;
//! `lower` then builds every kernel's expressions. What only shows while lowering — a reshape
//! that is no strided view, a reduction that would be recomputed inside another reduction, an
//! epilogue that reads its template at another index, a cycle between kernels — becomes a
//! hint (store this node, no epilogue for that template, no extra outputs), and `decide` runs
//! again. Every round adds a hint, so the loop ends.

use ir::fused::{Fused, GroupedEpilogue};
use ir::graph::{Graph, Value};
use ir::kernel::{
    reshape_groups, Buffer, BufferId, BufferKind, BufferRef, ConstValue, ExprGraph, ExprId, ExprNode, Fusion, GateNorm,
    Gemm, GridDim, IndexExpr, IndexVar, Kernel, KernelKind, KernelPlan, LaunchGeometry, LoopKernel, MatrixLayout,
    NodeIndex, Operand, PlanOutput, RowNorm, ScalarOp, ScanKernel, TemplateKernel, TemplateOp, TemplateParams, View,
};
use ir::op::{BinaryOp, InputKind, Op, UnaryOp};
use ir::shape::{numel, Dim, Shape};
use ir::DType;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Partition a graph into kernels. The graph is validated first; an error names what could
/// not be partitioned.
pub fn partition(graph: &Graph) -> Result<KernelPlan, String> {
    partition_with(graph, crate::routegemm::enabled())
}

/// [`partition`], with each routing kernel folded into its router's GEMM where it qualifies
/// when `fold_routes` ([`crate::routegemm`]; `partition` asks `RINGJIT_FOLD_ROUTE`).
pub fn partition_with(graph: &Graph, fold_routes: bool) -> Result<KernelPlan, String> {
    graph.validate().map_err(|e| format!("partition: {e}"))?;
    let mut plan = partition_valid(graph)?;
    if fold_routes && crate::routegemm::fold_routes(&mut plan) > 0 {
        for (i, kernel) in plan.kernels.iter_mut().enumerate() {
            kernel.name = kernel_name(i, kernel, graph);
        }
    }
    Ok(plan)
}

/// The kernel count when every non-view primitive op is its own kernel: the "before" figure.
/// Leaves and literals are not kernels; a scan counts its body (one step); a composite counts
/// one. Only nodes that reach an output count.
pub fn partition_unfused_count(graph: &Graph) -> usize {
    let live = live_nodes(graph);
    graph
        .topo_order()
        .into_iter()
        .filter(|n| live.contains(n))
        .map(|n| match &graph.node(n).op {
            Op::Scan { body, .. } => partition_unfused_count(body),
            op => match classify(op) {
                Class::Leaf | Class::Literal | Class::View => 0,
                _ => 1,
            },
        })
        .sum()
}

fn live_nodes(g: &Graph) -> HashSet<NodeIndex> {
    let mut live: HashSet<NodeIndex> = HashSet::new();
    let mut stack: Vec<NodeIndex> = g.outputs.iter().map(|o| o.value.node).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.operands(n).into_iter().map(|v| v.node));
        }
    }
    live
}

// ---- classification -----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// input, state, parameter: a buffer
    Leaf,
    /// const, dim_value, iota
    Literal,
    /// reshape, permute, expand, slice
    View,
    /// evaluable at any index from its operands at related indices
    Pointwise,
    /// a reduction: fuses only into loop kernels
    Reduce,
    /// its own template kernel
    Template,
    Scan,
}

/// `view` seen through one view op: `None` when `op` is not a view op, `Some(None)` when the
/// view cannot express it (a reshape that merges non-contiguous dims).
fn through_view(view: &View, op: &Op, out: &Shape) -> Option<Option<View>> {
    Some(match op {
        Op::Reshape { .. } => view.reshape(out),
        Op::Permute { perm } => view.permute(perm),
        Op::Expand { shape } => view.expand(shape),
        Op::Slice { axis, start, end } => view.slice(*axis, start, end),
        _ => return None,
    })
}

fn classify(op: &Op) -> Class {
    match op {
        // a folded constant tensor is data the plan holds, like a weight
        Op::Input { .. } | Op::Param { .. } | Op::Literal { .. } => Class::Leaf,
        Op::Const { .. } | Op::DimValue { .. } | Op::Iota { .. } => Class::Literal,
        Op::Reshape { .. } | Op::Permute { .. } | Op::Expand { .. } | Op::Slice { .. } => Class::View,
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Where
        | Op::Cast { .. }
        | Op::Concat { .. }
        | Op::IndexSelect { .. }
        | Op::GatherAlong { .. }
        | Op::Fused(Fused::SwiGlu) => Class::Pointwise,
        Op::Reduce { .. } => Class::Reduce,
        Op::Matmul | Op::TopK { .. } | Op::ArgMax { .. } | Op::ScatterAddAlong { .. } | Op::Fused(_) => Class::Template,
        Op::Scan { .. } => Class::Scan,
    }
}

/// The template a node becomes, sized from its operand and result types.
fn template_op(g: &Graph, n: NodeIndex) -> Result<TemplateOp, String> {
    let node = g.node(n);
    let args: Vec<Shape> = g.operands(n).iter().map(|v| g.ty(*v).shape.clone()).collect();
    let out = node.outputs.first().map(|t| t.shape.clone()).unwrap_or_default();
    let bad = || format!("%{} ({}): unexpected operand shapes", n.index(), node.op.name());
    let arg = |i: usize| args.get(i).ok_or_else(bad);
    let dim = |s: &Shape, i: usize| s.get(i).cloned().ok_or_else(bad);
    let last = |s: &Shape| s.last().cloned().ok_or_else(bad);
    let lead = |s: &Shape| numel(&s[..s.len().saturating_sub(1)]);
    Ok(match &node.op {
        // a plain GEMM, or one that normalises A's rows first (the norm's dtype: RmsNorm's)
        Op::Matmul | Op::Fused(Fused::NormMatmul { .. }) => {
            let (a, r) = (arg(0)?, out.len());
            if r < 2 {
                return Err(bad());
            }
            let norm = match &node.op {
                Op::Fused(Fused::NormMatmul { eps, .. }) => {
                    let ops = g.operands(n);
                    let (x, w) = (ops.first().ok_or_else(bad)?, ops.get(2).ok_or_else(bad)?);
                    Some(RowNorm {
                        eps: *eps,
                        dtype: DType::promote(g.ty(*x).dtype, g.ty(*w).dtype).ok_or_else(bad)?,
                    })
                }
                _ => None,
            };
            TemplateOp::Gemm(Gemm {
                batch: out[..r - 2].to_vec(),
                m: out[r - 2].clone(),
                n: out[r - 1].clone(),
                k: last(a)?,
                a: MatrixLayout::RowMajor,
                b: MatrixLayout::RowMajor,
                acc: DType::F32,
                out: node.outputs[0].dtype,
                norm,
                route: None,
            })
        }
        Op::TopK { k, axis } => TemplateOp::TopK { k: *k, axis: *axis },
        Op::ArgMax { axis } => TemplateOp::ArgMax { axis: *axis },
        Op::ScatterAddAlong { axis } => TemplateOp::ScatterAdd { axis: *axis },
        Op::Fused(f) => match f {
            Fused::RmsNormQuantFp8 { eps } => TemplateOp::RmsNormQuantFp8 {
                eps: *eps,
                width: last(arg(0)?)?,
                residual: false,
            },
            Fused::AddRmsNormQuantFp8 { eps } => TemplateOp::RmsNormQuantFp8 {
                eps: *eps,
                width: last(arg(0)?)?,
                residual: true,
            },
            Fused::SwiGluQuantFp8 => TemplateOp::SwiGluQuantFp8 { width: last(arg(0)?)? },
            Fused::RmsNorm { eps } => TemplateOp::RmsNorm {
                eps: *eps,
                width: last(arg(0)?)?,
            },
            Fused::AddRmsNorm { eps } => TemplateOp::AddRmsNorm {
                eps: *eps,
                width: last(arg(0)?)?,
            },
            Fused::Softmax => TemplateOp::Softmax { width: last(arg(0)?)? },
            Fused::QkNormRope { eps, rotary } => TemplateOp::QkNormRope {
                eps: *eps,
                rotary: *rotary,
                head_dim: last(arg(0)?)?,
            },
            Fused::FlashAttention { scale } => {
                let (q, k) = (arg(0)?, arg(1)?);
                TemplateOp::Attention {
                    scale: *scale,
                    batch: dim(q, 0)?,
                    kv_heads: dim(q, 1)?,
                    group: dim(q, 2)?,
                    q_len: dim(q, 3)?,
                    kv_len: dim(k, 2)?,
                    head_dim: dim(q, 4)?,
                }
            }
            Fused::LinearAttnChunk { chunk } => {
                let q = arg(1)?;
                TemplateOp::LinearAttnChunk {
                    chunk: *chunk,
                    batch: dim(q, 0)?,
                    len: dim(q, 1)?,
                    heads: dim(q, 2)?,
                    head_dim: dim(q, 3)?,
                    gate: None,
                }
            }
            Fused::LinearAttnStep => {
                let q = arg(1)?;
                TemplateOp::LinearAttnStep {
                    batch: dim(q, 0)?,
                    len: dim(q, 1)?,
                    heads: dim(q, 2)?,
                    head_dim: dim(q, 3)?,
                    gate: None,
                    qk: None,
                }
            }
            Fused::LinearAttnGate { chunk, groups, eps } => {
                let q = arg(1)?;
                let (batch, len, heads, head_dim) = (dim(q, 0)?, dim(q, 1)?, dim(q, 2)?, dim(q, 3)?);
                let gate = Some(GateNorm {
                    groups: *groups,
                    eps: *eps,
                });
                match chunk {
                    Some(c) => TemplateOp::LinearAttnChunk {
                        chunk: *c,
                        batch,
                        len,
                        heads,
                        head_dim,
                        gate,
                    },
                    None => TemplateOp::LinearAttnStep {
                        batch,
                        len,
                        heads,
                        head_dim,
                        gate,
                        qk: None,
                    },
                }
            }
            Fused::LinearAttnQkGate {
                groups,
                eps,
                qk_eps,
                rotary,
                scale,
            } => {
                let q = arg(1)?;
                TemplateOp::LinearAttnStep {
                    batch: dim(q, 0)?,
                    len: dim(q, 1)?,
                    heads: dim(q, 2)?,
                    head_dim: dim(q, 3)?,
                    gate: Some(GateNorm {
                        groups: *groups,
                        eps: *eps,
                    }),
                    qk: Some(ir::kernel::QkPrelude {
                        eps: *qk_eps,
                        rotary: *rotary,
                        scale: *scale,
                    }),
                }
            }
            Fused::GroupNormGate { groups, eps } => TemplateOp::GroupNormGate {
                groups: *groups,
                eps: *eps,
                width: last(arg(2)?)?,
            },
            Fused::RouteTopK { .. } => {
                let p = arg(0)?;
                TemplateOp::RouteTopK {
                    routing: ir::kernel::Routing::of_fused(f).expect("a RouteTopK"),
                    tokens: lead(p),
                    experts: last(p)?,
                }
            }
            Fused::GroupedMatmul { epilogue } => {
                let (x, chosen, w) = (arg(0)?, arg(1)?, arg(3)?);
                let tokens = numel(&chosen[..chosen.len().saturating_sub(1)]);
                let (n, k) = match epilogue {
                    GroupedEpilogue::SwiGlu => (dim(w, 1)?, last(x)?),
                    GroupedEpilogue::WeightedCombine | GroupedEpilogue::CombineShared => (dim(w, 1)?, dim(w, 2)?),
                };
                TemplateOp::GroupedGemm {
                    epilogue: *epilogue,
                    tokens,
                    top_k: last(chosen)?,
                    experts: dim(w, 0)?,
                    n,
                    k,
                }
            }
            Fused::QuantizeFp8 { rows, cols } => TemplateOp::QuantizeFp8 {
                rows: *rows,
                cols: *cols,
            },
            Fused::DequantizeFp8 { rows, cols, to } => TemplateOp::DequantizeFp8 {
                rows: *rows,
                cols: *cols,
                to: *to,
            },
            Fused::ScaledMatmulFp8 { out: to } => {
                let (a, b) = (arg(0)?, arg(2)?);
                TemplateOp::ScaledGemmFp8 {
                    m: lead(a),
                    n: last(b)?,
                    k: last(a)?,
                    out: *to,
                }
            }
            Fused::SwiGlu => return Err(format!("%{}: swiglu is elementwise, not a template", n.index())),
            Fused::NormMatmul { .. } => return Err(bad()),
        },
        op => return Err(format!("%{}: {} is not a template", n.index(), op.name())),
    })
}

// ---- graph facts ----------------------------------------------------------------------------------

/// Per-node facts computed once per graph, indexed by `NodeIndex::index()`.
struct Info {
    order: Vec<NodeIndex>,
    pos: Vec<usize>,
    class: Vec<Class>,
    /// (consumer, operand slot), in topological order of the consumers
    consumers: Vec<Vec<(NodeIndex, usize)>>,
    /// a literal or an elementwise function (or view) of literals only
    literal: Vec<bool>,
    /// some output port is a graph output
    is_output: Vec<bool>,
    templates: HashMap<NodeIndex, TemplateOp>,
}

impl Info {
    fn new(g: &Graph) -> Result<Info, String> {
        let order = g.topo_order();
        let bound = g.g.node_indices().map(|n| n.index() + 1).max().unwrap_or(0);
        let mut info = Info {
            pos: vec![usize::MAX; bound],
            class: vec![Class::Leaf; bound],
            consumers: vec![Vec::new(); bound],
            literal: vec![false; bound],
            is_output: vec![false; bound],
            templates: HashMap::new(),
            order,
        };
        for (i, &n) in info.order.iter().enumerate() {
            let op = &g.node(n).op;
            let class = classify(op);
            info.pos[n.index()] = i;
            info.class[n.index()] = class;
            let args = g.operands(n);
            for (slot, a) in args.iter().enumerate() {
                info.consumers[a.node.index()].push((n, slot));
            }
            info.literal[n.index()] = match class {
                Class::Literal => true,
                Class::Pointwise | Class::View => args.iter().all(|a| info.literal[a.node.index()]),
                _ => false,
            };
            if class == Class::Template {
                info.templates.insert(n, template_op(g, n)?);
            }
        }
        for o in &g.outputs {
            info.is_output[o.value.node.index()] = true;
        }
        Ok(info)
    }

    fn class(&self, n: NodeIndex) -> Class {
        self.class[n.index()]
    }

    fn pos(&self, n: NodeIndex) -> usize {
        self.pos[n.index()]
    }
}

// ---- decide: where each node is evaluated ---------------------------------------------------------

/// The part of a kernel a value is evaluated in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Ctx {
    /// a loop kernel's body, or a template's epilogue
    Main,
    /// the prologue of a template operand
    Prologue(usize),
    /// a template or scan operand read from memory (through a view at most)
    Operand(usize),
    /// the template or scan node of its own kernel
    Own,
    /// a graph output (no kernel)
    Output,
}

/// Where a value is needed or evaluated: a part of a kernel (draft), or a graph output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Use {
    draft: Option<usize>,
    ctx: Ctx,
}

#[derive(Clone, Debug)]
enum DraftKind {
    Loop { domain: Shape },
    Template { node: NodeIndex, epilogue: bool },
    Scan { node: NodeIndex },
}

/// A kernel being decided.
#[derive(Clone, Debug)]
struct Draft {
    kind: DraftKind,
    /// values it stores, in output order (a template without epilogue stores its results)
    roots: Vec<Value>,
    /// nodes evaluated in it
    members: Vec<NodeIndex>,
    has_reduce: bool,
    /// largest topological position of a member; smallest of a stored value
    max_pos: usize,
    min_stored_pos: usize,
}

/// What lowering found out, for the next round of `decide`.
#[derive(Default)]
struct Hints {
    /// nodes that must be stored
    store: HashSet<NodeIndex>,
    /// templates that must not take an epilogue
    no_epilogue: HashSet<NodeIndex>,
    /// never store a value as an extra output of another kernel
    no_join: bool,
}

struct Decision {
    /// where each node is evaluated (views: where they are read); empty = dead
    homes: Vec<Vec<Use>>,
    drafts: Vec<Draft>,
}

struct Decide<'a> {
    g: &'a Graph,
    info: &'a Info,
    hints: &'a Hints,
    homes: Vec<Vec<Use>>,
    /// recomputed in several kernels (a chain of such copies is cut after one op)
    duplicated: Vec<bool>,
    drafts: Vec<Draft>,
}

fn decide(g: &Graph, info: &Info, hints: &Hints) -> Decision {
    let bound = info.pos.len();
    let mut d = Decide {
        g,
        info,
        hints,
        homes: vec![Vec::new(); bound],
        duplicated: vec![false; bound],
        drafts: Vec::new(),
    };
    for &n in info.order.iter().rev() {
        match info.class(n) {
            Class::Leaf => {}
            Class::Template | Class::Scan => d.place_kernel_node(n),
            _ => d.place_value(n),
        }
    }
    Decision {
        homes: d.homes,
        drafts: d.drafts,
    }
}

impl Decide<'_> {
    /// Where `n`'s value is needed, from the decisions about its consumers.
    fn uses(&self, n: NodeIndex) -> Vec<Use> {
        let mut out = BTreeSet::new();
        for &(c, slot) in &self.info.consumers[n.index()] {
            match self.info.class(c) {
                Class::Template | Class::Scan => {
                    let Some(home) = self.homes[c.index()].first() else {
                        continue;
                    };
                    let prologue = self.info.templates.get(&c).is_some_and(|t| t.accepts_prologue(slot));
                    out.insert(Use {
                        draft: home.draft,
                        ctx: if prologue {
                            Ctx::Prologue(slot)
                        } else {
                            Ctx::Operand(slot)
                        },
                    });
                }
                _ => out.extend(self.homes[c.index()].iter().copied()),
            }
        }
        if self.info.is_output[n.index()] {
            out.insert(Use {
                draft: None,
                ctx: Ctx::Output,
            });
        }
        out.into_iter().collect()
    }

    fn draft_is_epilogue(&self, d: usize) -> bool {
        matches!(self.drafts[d].kind, DraftKind::Template { .. })
    }

    /// Whether an operand (through views) of `n` is a reduction: such a node stays in a loop
    /// kernel with it, rather than forcing the reduction out into a kernel of its own.
    fn reads_reduction(&self, n: NodeIndex) -> bool {
        self.g.operands(n).iter().any(|a| {
            let mut m = a.node;
            while self.info.class(m) == Class::View {
                match self.g.operands(m).first() {
                    Some(v) => m = v.node,
                    None => return false,
                }
            }
            self.info.class(m) == Class::Reduce
        })
    }

    /// Whether `n` can be evaluated where `u` needs it (views decide separately).
    fn absorbs(&self, n: NodeIndex, u: &Use) -> bool {
        let class = self.info.class(n);
        let elementwise = match class {
            Class::Literal => true,
            Class::Pointwise => !self.reads_reduction(n),
            _ => false,
        };
        match (u.ctx, u.draft) {
            (Ctx::Main, Some(d)) if !self.draft_is_epilogue(d) => {
                matches!(class, Class::Literal | Class::Pointwise | Class::Reduce)
            }
            (Ctx::Main, Some(_)) | (Ctx::Prologue(_), _) => elementwise,
            _ => false,
        }
    }

    fn add_home(&mut self, n: NodeIndex, u: Use) {
        self.homes[n.index()].push(u);
        if let Some(d) = u.draft {
            let pos = self.info.pos(n);
            let reduce = self.info.class(n) == Class::Reduce;
            let dr = &mut self.drafts[d];
            if !dr.members.contains(&n) {
                dr.members.push(n);
            }
            dr.max_pos = dr.max_pos.max(pos);
            dr.has_reduce |= reduce && u.ctx == Ctx::Main;
        }
    }

    fn new_draft(&mut self, kind: DraftKind, roots: Vec<Value>, stored_pos: usize) -> usize {
        self.drafts.push(Draft {
            kind,
            roots,
            members: Vec::new(),
            has_reduce: false,
            max_pos: 0,
            min_stored_pos: stored_pos,
        });
        self.drafts.len() - 1
    }

    fn shape(&self, n: NodeIndex) -> &Shape {
        &self.g.node(n).outputs[0].shape
    }

    /// A view, literal, elementwise op or reduction: inline it, or store it.
    fn place_value(&mut self, n: NodeIndex) {
        let uses = self.uses(n);
        if uses.is_empty() {
            return; // dead
        }
        let class = self.info.class(n);
        let store = self.hints.store.contains(&n);
        // views are read where their users are (an output of a view aliases or copies its base)
        if class == Class::View && !store {
            self.duplicated[n.index()] = self.consumers_duplicated(n);
            for u in uses {
                self.add_home(n, u);
            }
            return;
        }
        if !store && uses.iter().all(|u| self.absorbs(n, u)) {
            let drafts: BTreeSet<Option<usize>> = uses.iter().map(|u| u.draft).collect();
            // index arithmetic is recomputed anywhere; anything else inlines into one kernel,
            // or into several when it is a single cheap op not already part of such a copy
            let cheap = matches!(
                self.g.node(n).op,
                Op::Unary(_)
                    | Op::Binary(_)
                    | Op::Cast { .. }
                    | Op::Where
                    | Op::IndexSelect { .. }
                    | Op::GatherAlong { .. }
            );
            let inline = self.info.literal[n.index()] || drafts.len() == 1;
            let dup = !inline && cheap && !self.consumers_duplicated(n) && self.join_target(n, &uses).is_none();
            if inline || dup {
                self.duplicated[n.index()] = dup;
                for u in uses {
                    self.add_home(n, u);
                }
                return;
            }
        }
        // stored: as an extra output of a kernel that evaluates it anyway, or by its own (a
        // node that lowering asked to store could not be evaluated there: its own kernel)
        let v = Value { node: n, port: 0 };
        let pos = self.info.pos(n);
        let join = if store { None } else { self.join_target(n, &uses) };
        let d = match join {
            Some(d) => {
                self.drafts[d].roots.push(v);
                self.drafts[d].min_stored_pos = self.drafts[d].min_stored_pos.min(pos);
                d
            }
            None => self.new_draft(
                DraftKind::Loop {
                    domain: self.shape(n).clone(),
                },
                vec![v],
                pos,
            ),
        };
        self.add_home(
            n,
            Use {
                draft: Some(d),
                ctx: Ctx::Main,
            },
        );
    }

    fn consumers_duplicated(&self, n: NodeIndex) -> bool {
        self.info.consumers[n.index()]
            .iter()
            .any(|(c, _)| self.duplicated[c.index()])
    }

    /// A kernel that evaluates `n` anyway over exactly `n`'s shape and may store it as an
    /// extra output: a loop kernel, or a template's epilogue. It must not depend on any other
    /// kernel that reads `n` (that would be a cycle): every such reader stores only values
    /// that come after all of the target's members in topological order, and since nodes
    /// are placed consumers first, later members of the target come earlier still.
    fn join_target(&self, n: NodeIndex, uses: &[Use]) -> Option<usize> {
        if self.hints.no_join {
            return None;
        }
        let shape = self.shape(n);
        let fits = |d: usize| match &self.drafts[d].kind {
            DraftKind::Loop { domain } => domain == shape,
            DraftKind::Template { node, epilogue: true } => self.shape(*node) == shape,
            _ => false,
        };
        let candidates = uses.iter().filter_map(|u| match (u.ctx, u.draft) {
            (Ctx::Main, Some(d)) if fits(d) && self.absorbs(n, u) => Some(d),
            _ => None,
        });
        for d in candidates {
            let max_pos = self.drafts[d].max_pos;
            // (a template's prologue cannot read what its own epilogue stores)
            let acyclic = uses.iter().all(|u| match u.draft {
                Some(o) if o != d => self.drafts[o].min_stored_pos > max_pos,
                Some(_) => u.ctx == Ctx::Main,
                None => true,
            });
            if acyclic {
                return Some(d);
            }
        }
        None
    }

    /// A template or scan: its own kernel, or the kernel of its elementwise consumers, which
    /// become its epilogue.
    fn place_kernel_node(&mut self, n: NodeIndex) {
        let uses = self.uses(n);
        if uses.is_empty() {
            return; // dead
        }
        if let Some(d) = self.epilogue_target(n, &uses) {
            self.drafts[d].kind = DraftKind::Template {
                node: n,
                epilogue: true,
            };
            self.add_home(
                n,
                Use {
                    draft: Some(d),
                    ctx: Ctx::Own,
                },
            );
            return;
        }
        let ports = self.g.node(n).outputs.len() as u32;
        let roots = (0..ports).map(|port| Value { node: n, port }).collect();
        let kind = if self.info.class(n) == Class::Scan {
            DraftKind::Scan { node: n }
        } else {
            DraftKind::Template {
                node: n,
                epilogue: false,
            }
        };
        let d = self.new_draft(kind, roots, self.info.pos(n));
        self.add_home(
            n,
            Use {
                draft: Some(d),
                ctx: Ctx::Own,
            },
        );
    }

    /// The loop kernel that all of `n`'s users are in, when it can be `n`'s epilogue: `n` is
    /// a single-result template that accepts one, the loop kernel computes exactly `n`'s shape
    /// and has no reduction (an epilogue sees one output tile, never a whole row).
    fn epilogue_target(&self, n: NodeIndex, uses: &[Use]) -> Option<usize> {
        let op = self.info.templates.get(&n)?;
        if !op.accepts_epilogue() || self.g.node(n).outputs.len() != 1 || self.hints.no_epilogue.contains(&n) {
            return None;
        }
        let first = uses.first()?;
        let d = first.draft?;
        let same = uses.iter().all(|u| u.draft == Some(d) && u.ctx == Ctx::Main);
        let dr = &self.drafts[d];
        match &dr.kind {
            DraftKind::Loop { domain } if same && !dr.has_reduce && domain == self.shape(n) => Some(d),
            _ => None,
        }
    }
}

// ---- lower: build the kernels ---------------------------------------------------------------------

/// Why lowering a kernel stopped.
enum Stop {
    /// store this node (it cannot be computed where it was placed)
    Store(NodeIndex),
    /// this template cannot take its epilogue
    NoEpilogue(NodeIndex),
    Fatal(String),
}

type Lowered<T> = Result<T, Stop>;

fn fatal<T>(msg: impl Into<String>) -> Lowered<T> {
    Err(Stop::Fatal(msg.into()))
}

/// Builds one expression graph: hash-consed nodes, memoised values, the free loop variables of
/// every node (to keep each reduction evaluated once per domain index).
struct Exprs {
    graph: ExprGraph,
    interned: HashMap<ExprNode, ExprId>,
    /// free loop variables of each node, sorted
    free: Vec<Vec<u32>>,
    memo: HashMap<(Value, Vec<IndexExpr>), ExprId>,
    /// the domain's rank: loop variables below it are domain axes
    rank: u32,
    next_var: u32,
    draft: usize,
    ctx: Ctx,
}

impl Exprs {
    fn new(rank: usize, draft: usize, ctx: Ctx) -> Exprs {
        Exprs {
            graph: ExprGraph::default(),
            interned: HashMap::new(),
            free: Vec::new(),
            memo: HashMap::new(),
            rank: rank as u32,
            next_var: rank as u32,
            draft,
            ctx,
        }
    }

    fn index_free(&self, i: &IndexExpr, into: &mut BTreeSet<u32>) {
        into.extend(i.loop_vars());
        for e in i.data_terms() {
            if let Some(f) = self.free.get(e.0 as usize) {
                into.extend(f.iter().copied());
            }
        }
    }

    fn push(&mut self, op: ScalarOp, dtype: DType) -> ExprId {
        let node = ExprNode { op, dtype };
        if let Some(&e) = self.interned.get(&node) {
            return e;
        }
        let mut free = BTreeSet::new();
        match &node.op {
            ScalarOp::Load { index, .. } => index.iter().for_each(|i| self.index_free(i, &mut free)),
            ScalarOp::Index(i) => self.index_free(i, &mut free),
            ScalarOp::Result { .. } => free.extend(0..self.rank),
            ScalarOp::Reduce { vars, body, .. } => {
                free.extend(self.free[body.0 as usize].iter().copied());
                for (v, _) in vars {
                    free.remove(v);
                }
            }
            ScalarOp::Unary(_, a) | ScalarOp::Cast(a) => free.extend(self.free[a.0 as usize].iter().copied()),
            ScalarOp::Binary(_, a, b) => {
                for e in [a, b] {
                    free.extend(self.free[e.0 as usize].iter().copied());
                }
            }
            ScalarOp::Where(c, a, b) => {
                for e in [c, a, b] {
                    free.extend(self.free[e.0 as usize].iter().copied());
                }
            }
            ScalarOp::Const(_) => {}
        }
        let id = ExprId(self.graph.nodes.len() as u32);
        self.graph.nodes.push(node.clone());
        self.free.push(free.into_iter().collect());
        self.interned.insert(node, id);
        id
    }

    fn constant(&mut self, v: f64, dtype: DType) -> ExprId {
        self.push(ScalarOp::Const(ConstValue::new(v)), dtype)
    }

    /// The outer-axis count of a loop kernel: past every domain axis a reduction depends on.
    fn outer(&self) -> usize {
        let mut outer = 0;
        for (node, free) in self.graph.nodes.iter().zip(&self.free) {
            if matches!(node.op, ScalarOp::Reduce { .. }) {
                if let Some(&m) = free.iter().filter(|&&v| v < self.rank).max() {
                    outer = outer.max(m as usize + 1);
                }
            }
        }
        outer
    }
}

/// Per-kernel argument table.
#[derive(Default)]
struct Args {
    inputs: Vec<BufferRef>,
    index: HashMap<BufferRef, usize>,
}

impl Args {
    fn input(&mut self, r: BufferRef) -> usize {
        if let Some(&i) = self.index.get(&r) {
            return i;
        }
        self.inputs.push(r.clone());
        self.index.insert(r, self.inputs.len() - 1);
        self.inputs.len() - 1
    }
}

struct Lower<'a> {
    g: &'a Graph,
    info: &'a Info,
    dec: &'a Decision,
    buffers: Vec<Buffer>,
    buffer_of: HashMap<Value, BufferId>,
}

impl<'a> Lower<'a> {
    fn new(g: &'a Graph, info: &'a Info, dec: &'a Decision) -> Lower<'a> {
        Lower {
            g,
            info,
            dec,
            buffers: Vec::new(),
            buffer_of: HashMap::new(),
        }
    }

    fn value_name(&self, v: Value) -> String {
        let node = self.g.node(v.node);
        let id = if node.outputs.len() == 1 {
            format!("%{}", v.node.index())
        } else {
            format!("%{}.{}", v.node.index(), v.port)
        };
        match &node.label {
            Some(l) => format!("{id} {l}"),
            None => id,
        }
    }

    fn add_buffer(&mut self, v: Value, kind: BufferKind) -> BufferId {
        if let Some(&b) = self.buffer_of.get(&v) {
            return b;
        }
        let node = self.g.node(v.node);
        let name = match &node.op {
            Op::Input { name, .. } | Op::Param { name, .. } => name.clone(),
            _ => self.value_name(v),
        };
        let ty = &node.outputs[v.port as usize];
        self.buffers.push(Buffer {
            name,
            kind,
            dtype: ty.dtype,
            shape: ty.shape.clone(),
            value: v,
        });
        let id = BufferId(self.buffers.len() as u32 - 1);
        self.buffer_of.insert(v, id);
        id
    }

    /// The buffer of a stored value or a leaf.
    fn stored(&mut self, v: Value) -> Option<BufferId> {
        if let Some(&b) = self.buffer_of.get(&v) {
            return Some(b);
        }
        match &self.g.node(v.node).op {
            Op::Input {
                kind: InputKind::State, ..
            } => Some(self.add_buffer(v, BufferKind::State)),
            Op::Input { .. } => Some(self.add_buffer(v, BufferKind::Input)),
            Op::Param { .. } | Op::Literal { .. } => Some(self.add_buffer(v, BufferKind::Param)),
            _ => None,
        }
    }

    /// Whether `n` is evaluated in `x`'s kernel part.
    fn here(&self, n: NodeIndex, x: &Exprs) -> bool {
        self.dec.homes[n.index()].contains(&Use {
            draft: Some(x.draft),
            ctx: x.ctx,
        })
    }

    /// Whether `n` is the template of `x`'s kernel.
    fn is_own(&self, n: NodeIndex, x: &Exprs) -> bool {
        self.dec.homes[n.index()].contains(&Use {
            draft: Some(x.draft),
            ctx: Ctx::Own,
        })
    }

    /// `v` read through a chain of views that are evaluated in `x`'s part, down to a stored
    /// base: the base and the folded view. `Ok(None)` when the base is computed here; the
    /// node to store when a reshape of the chain is not a strided view.
    fn fold_views(&mut self, v: Value, x: &Exprs) -> Lowered<Option<(BufferId, View)>> {
        let mut chain = Vec::new();
        let mut cur = v;
        while self.info.class(cur.node) == Class::View && self.here(cur.node, x) {
            chain.push(cur.node);
            match self.g.operands(cur.node).first() {
                Some(&a) => cur = a,
                None => return fatal(format!("view %{} has no operand", cur.node.index())),
            }
        }
        // computed here (or the template's own result, in its epilogue): no buffer to fold into
        if self.here(cur.node, x) || self.is_own(cur.node, x) {
            return Ok(None);
        }
        let Some(base) = self.stored(cur) else {
            return fatal(format!(
                "%{} is neither evaluated in kernel {} nor stored",
                cur.node.index(),
                x.draft
            ));
        };
        let mut view = View::contiguous(&self.g.ty(cur).shape);
        for &n in chain.iter().rev() {
            let out = &self.g.node(n).outputs[0].shape;
            let op = &self.g.node(n).op;
            let Some(next) = through_view(&view, op, out) else {
                return fatal(format!("{} is not a view", op.name()));
            };
            match next {
                Some(nv) => view = nv,
                // store the reshape's operand: a reshape of contiguous data always folds
                None => {
                    return match self.g.operands(n).first() {
                        Some(a) => Err(Stop::Store(a.node)),
                        None => fatal(format!("view %{} has no operand", n.index())),
                    }
                }
            }
        }
        Ok(Some((base, view)))
    }

    /// Element `idx` of value `v`, evaluated in `x`'s kernel part.
    fn emit(&mut self, args: &mut Args, x: &mut Exprs, v: Value, idx: Vec<IndexExpr>) -> Lowered<ExprId> {
        let key = (v, idx);
        if let Some(&e) = x.memo.get(&key) {
            return Ok(e);
        }
        let (v, idx) = key;
        let e = self.emit_uncached(args, x, v, &idx)?;
        x.memo.insert((v, idx), e);
        Ok(e)
    }

    fn emit_uncached(&mut self, args: &mut Args, x: &mut Exprs, v: Value, idx: &[IndexExpr]) -> Lowered<ExprId> {
        let n = v.node;
        let node = self.g.node(n);
        let dtype = node.outputs[v.port as usize].dtype;
        // the template's own result, in its epilogue
        if self.is_own(n, x) {
            if x.ctx == Ctx::Main && idx == IndexExpr::identity(x.rank as usize).as_slice() {
                return Ok(x.push(ScalarOp::Result { port: v.port as usize }, dtype));
            }
            return Err(Stop::NoEpilogue(n));
        }
        if !self.here(n, x) || self.info.class(n) == Class::View {
            if let Some((buffer, view)) = self.fold_views(v, x).or_else(|s| match s {
                // a view that is not strided may still map indices (below)
                Stop::Store(_) if self.info.class(n) == Class::View => Ok(None),
                s => Err(s),
            })? {
                let input = args.input(BufferRef { buffer, view });
                return Ok(x.push(
                    ScalarOp::Load {
                        input,
                        index: idx.to_vec(),
                    },
                    dtype,
                ));
            }
        }
        let args_of = self.g.operands(n);
        let arg = |i: usize| -> Lowered<Value> {
            args_of
                .get(i)
                .copied()
                .ok_or_else(|| Stop::Fatal(format!("%{} lacks operand {i}", n.index())))
        };
        let out_shape = node.outputs[v.port as usize].shape.clone();
        match &node.op {
            Op::Reshape { .. } | Op::Permute { .. } | Op::Expand { .. } | Op::Slice { .. } => {
                let a = arg(0)?;
                match map_view_index(&node.op, &self.g.ty(a).shape, &out_shape, idx) {
                    Some(j) => self.emit(args, x, a, j),
                    None => Err(Stop::Store(a.node)),
                }
            }
            Op::Const { value, .. } => Ok(x.constant(*value, dtype)),
            Op::DimValue { dim } => Ok(x.push(ScalarOp::Index(IndexExpr::constant(dim.clone())), DType::I64)),
            Op::Iota { .. } => {
                let i = x.push(
                    ScalarOp::Index(idx.first().cloned().unwrap_or_else(IndexExpr::zero)),
                    DType::I64,
                );
                Ok(if dtype == DType::I64 {
                    i
                } else {
                    x.push(ScalarOp::Cast(i), dtype)
                })
            }
            Op::Unary(u) => {
                let a = self.emit_bcast(args, x, arg(0)?, idx)?;
                Ok(x.push(ScalarOp::Unary(*u, a), dtype))
            }
            Op::Binary(b) => {
                let p = self.emit_bcast(args, x, arg(0)?, idx)?;
                let q = self.emit_bcast(args, x, arg(1)?, idx)?;
                Ok(x.push(ScalarOp::Binary(*b, p, q), dtype))
            }
            Op::Where => {
                let c = self.emit_bcast(args, x, arg(0)?, idx)?;
                let p = self.emit_bcast(args, x, arg(1)?, idx)?;
                let q = self.emit_bcast(args, x, arg(2)?, idx)?;
                Ok(x.push(ScalarOp::Where(c, p, q), dtype))
            }
            Op::Cast { to } => {
                let a = self.emit(args, x, arg(0)?, idx.to_vec())?;
                let from = self.g.ty(arg(0)?).dtype;
                Ok(if from == *to { a } else { x.push(ScalarOp::Cast(a), *to) })
            }
            Op::Fused(Fused::SwiGlu) => {
                let gate = arg(0)?;
                let gt = self.g.ty(gate).dtype;
                let ge = self.emit(args, x, gate, idx.to_vec())?;
                let ue = self.emit(args, x, arg(1)?, idx.to_vec())?;
                let s = x.push(ScalarOp::Unary(UnaryOp::Sigmoid, ge), gt);
                let gs = x.push(ScalarOp::Binary(BinaryOp::Mul, ge, s), gt);
                Ok(x.push(ScalarOp::Binary(BinaryOp::Mul, gs, ue), dtype))
            }
            Op::Concat { axis } => {
                // nested wheres on the index along `axis`, last operand innermost
                let i = idx[*axis].clone();
                let mut offsets = Vec::with_capacity(args_of.len());
                let mut off = Dim::constant(0);
                for a in &args_of {
                    offsets.push(off.clone());
                    off = off.add(&self.g.ty(*a).shape[*axis]);
                }
                let at = |k: usize| {
                    let mut j = idx.to_vec();
                    j[*axis] = i.add_const(&offsets[k].neg());
                    j
                };
                let last = args_of.len() - 1;
                let mut acc = self.emit(args, x, args_of[last], at(last))?;
                let ii = x.push(ScalarOp::Index(i.clone()), DType::I64);
                for k in (0..last).rev() {
                    let bound = x.push(ScalarOp::Index(IndexExpr::constant(offsets[k + 1].clone())), DType::I64);
                    let cond = x.push(ScalarOp::Binary(BinaryOp::Lt, ii, bound), DType::Bool);
                    let val = self.emit(args, x, args_of[k], at(k))?;
                    acc = x.push(ScalarOp::Where(cond, val, acc), dtype);
                }
                Ok(acc)
            }
            Op::IndexSelect { axis } => {
                let (src, ids) = (arg(0)?, arg(1)?);
                let r = self.g.ty(ids).rank();
                let e = self.emit(args, x, ids, idx[*axis..*axis + r].to_vec())?;
                let mut j = idx[..*axis].to_vec();
                j.push(IndexExpr::var(IndexVar::Data(e)));
                j.extend_from_slice(&idx[*axis + r..]);
                self.emit(args, x, src, j)
            }
            Op::GatherAlong { axis } => {
                let (src, ids) = (arg(0)?, arg(1)?);
                let e = self.emit(args, x, ids, idx.to_vec())?;
                let mut j = idx.to_vec();
                j[*axis] = IndexExpr::var(IndexVar::Data(e));
                self.emit(args, x, src, j)
            }
            Op::Reduce { op, axes, keepdim } => {
                // evaluated once per domain index: its index may read domain variables only
                let mut free = BTreeSet::new();
                idx.iter().for_each(|i| x.index_free(i, &mut free));
                if free.iter().any(|&v| v >= x.rank) {
                    return Err(Stop::Store(n));
                }
                let a = arg(0)?;
                let in_shape = self.g.ty(a).shape.clone();
                let mut j = Vec::with_capacity(in_shape.len());
                let mut vars = Vec::new();
                let mut k = 0;
                for (d, extent) in in_shape.iter().enumerate() {
                    if axes.contains(&d) {
                        let var = x.next_var;
                        x.next_var += 1;
                        vars.push((var, extent.clone()));
                        j.push(IndexExpr::loop_var(var));
                        if *keepdim {
                            k += 1;
                        }
                    } else {
                        j.push(idx[k].clone());
                        k += 1;
                    }
                }
                let body = self.emit(args, x, a, j)?;
                if vars.is_empty() {
                    return Ok(body);
                }
                Ok(x.push(ScalarOp::Reduce { op: *op, vars, body }, dtype))
            }
            op => fatal(format!(
                "%{} ({}) cannot be evaluated inside kernel {}",
                n.index(),
                op.name(),
                x.draft
            )),
        }
    }

    /// Operand `a` of an elementwise op at output index `idx` (numpy broadcasting).
    fn emit_bcast(&mut self, args: &mut Args, x: &mut Exprs, a: Value, idx: &[IndexExpr]) -> Lowered<ExprId> {
        let shape = self.g.ty(a).shape.clone();
        let lead = idx.len().saturating_sub(shape.len());
        let one = Dim::constant(1);
        let j = shape
            .iter()
            .enumerate()
            .map(|(i, d)| {
                if *d == one {
                    IndexExpr::zero()
                } else {
                    idx[lead + i].clone()
                }
            })
            .collect();
        self.emit(args, x, a, j)
    }

    // ---- kernels ----

    fn lower_draft(&mut self, d: usize) -> Lowered<Kernel> {
        let draft = &self.dec.drafts[d];
        let mut nodes = draft.members.clone();
        nodes.sort();
        let mut args = Args::default();
        let (kind, outputs, launch) = match &draft.kind {
            DraftKind::Loop { domain } => {
                let mut x = Exprs::new(domain.len(), d, Ctx::Main);
                let mut stores = Vec::new();
                let mut outputs = Vec::new();
                for &r in &draft.roots {
                    stores.push(self.emit(&mut args, &mut x, r, IndexExpr::identity(domain.len()))?);
                    outputs.push(self.output_ref(r)?);
                }
                let outer = x.outer();
                let launch = loop_launch(domain, outer, x.graph.has_reduce());
                let kernel = LoopKernel {
                    domain: domain.clone(),
                    outer,
                    exprs: x.graph,
                    stores,
                };
                (KernelKind::Loop(kernel), outputs, launch)
            }
            DraftKind::Template { node, epilogue } => {
                let (node, epilogue) = (*node, *epilogue);
                let Some(mut op) = self.info.templates.get(&node).cloned() else {
                    return fatal(format!("%{} is not a template", node.index()));
                };
                let mut operands = Vec::new();
                for (slot, a) in self.g.operands(node).into_iter().enumerate() {
                    operands.push(self.operand(&mut args, &op, d, slot, a)?);
                }
                if let TemplateOp::Gemm(gemm) = &mut op {
                    let layout = |o: Option<&Operand>| match o {
                        Some(Operand::Buffer(i)) => MatrixLayout::of(&args.inputs[*i].view),
                        _ => MatrixLayout::Computed,
                    };
                    gemm.a = layout(operands.first());
                    gemm.b = layout(operands.get(1));
                }
                let mut outputs = Vec::new();
                let epilogue = if epilogue {
                    let domain = self.g.node(node).outputs[0].shape.clone();
                    let mut x = Exprs::new(domain.len(), d, Ctx::Main);
                    let mut stores = Vec::new();
                    for &r in &draft.roots {
                        stores.push(self.emit(&mut args, &mut x, r, IndexExpr::identity(domain.len()))?);
                        outputs.push(self.output_ref(r)?);
                    }
                    Some(Fusion {
                        domain,
                        exprs: x.graph,
                        stores,
                    })
                } else {
                    for &r in &draft.roots {
                        outputs.push(self.output_ref(r)?);
                    }
                    None
                };
                let in_bytes = self
                    .g
                    .operands(node)
                    .first()
                    .map(|a| self.g.ty(*a).dtype.size_bytes())
                    .unwrap_or(4);
                let params = TemplateParams::default_for(&op);
                let launch = template_launch(&op, &params, self.g, node, in_bytes);
                let kernel = TemplateKernel {
                    op,
                    params,
                    operands,
                    epilogue,
                };
                (KernelKind::Template(kernel), outputs, launch)
            }
            DraftKind::Scan { node } => {
                let node = *node;
                let Op::Scan {
                    body,
                    axis,
                    n_carry,
                    n_seq,
                } = &self.g.node(node).op
                else {
                    return fatal(format!("%{} is not a scan", node.index()));
                };
                let body_plan =
                    partition_valid(body).map_err(|e| Stop::Fatal(format!("in scan %{}: {e}", node.index())))?;
                // operands bind to body inputs by position: one argument per operand
                let mut length = Dim::constant(0);
                for (slot, a) in self.g.operands(node).into_iter().enumerate() {
                    if slot >= *n_carry && slot < n_carry + n_seq {
                        length = self.g.ty(a).shape.get(*axis).cloned().unwrap_or(length);
                    }
                    let x = Exprs::new(0, d, Ctx::Operand(slot));
                    match self.fold_views(a, &x)? {
                        Some((buffer, view)) => args.inputs.push(BufferRef { buffer, view }),
                        None => return fatal(format!("scan operand %{} is not in memory", a.node.index())),
                    }
                }
                let mut outputs = Vec::new();
                for &r in &draft.roots {
                    outputs.push(self.output_ref(r)?);
                }
                let launch = LaunchGeometry {
                    grid: [GridDim::blocks(length.clone(), 1), GridDim::one(), GridDim::one()],
                    block: [1, 1, 1],
                    shared_bytes: 0,
                };
                let kernel = ScanKernel {
                    axis: *axis,
                    length,
                    n_carry: *n_carry,
                    n_seq: *n_seq,
                    body: Box::new(body_plan),
                };
                (KernelKind::Scan(kernel), outputs, launch)
            }
        };
        Ok(Kernel {
            name: String::new(),
            kind,
            inputs: args.inputs,
            outputs,
            nodes,
            launch,
        })
    }

    fn output_ref(&mut self, r: Value) -> Lowered<BufferRef> {
        match self.buffer_of.get(&r) {
            Some(&buffer) => Ok(BufferRef {
                buffer,
                view: View::contiguous(&self.g.ty(r).shape),
            }),
            None => fatal(format!("stored value {} has no buffer", self.value_name(r))),
        }
    }

    /// Operand `slot` (value `a`) of the template of draft `d`: from memory through a folded
    /// view, or computed by a prologue where the template accepts one.
    fn operand(&mut self, args: &mut Args, op: &TemplateOp, d: usize, slot: usize, a: Value) -> Lowered<Operand> {
        let prologue = op.accepts_prologue(slot);
        let ctx = if prologue {
            Ctx::Prologue(slot)
        } else {
            Ctx::Operand(slot)
        };
        let mut x = Exprs::new(self.g.ty(a).rank(), d, ctx);
        match self.fold_views(a, &x) {
            Ok(Some((buffer, view))) => return Ok(Operand::Buffer(args.input(BufferRef { buffer, view }))),
            Err(Stop::Store(s)) if !prologue => return Err(Stop::Store(s)),
            Ok(None) if !prologue => return fatal(format!("operand {slot} of kernel {d} is not in memory")),
            Err(Stop::Fatal(m)) => return fatal(m),
            _ => {}
        }
        let domain = self.g.ty(a).shape.clone();
        let root = self.emit(args, &mut x, a, IndexExpr::identity(domain.len()))?;
        Ok(Operand::Prologue(Fusion {
            domain,
            exprs: x.graph,
            stores: vec![root],
        }))
    }
}

/// The index of `op`'s operand (of shape `in_shape`) read at output index `idx`, when it is
/// affine: permute, expand, slice, and reshapes that only split dims (merging needs div/mod).
fn map_view_index(op: &Op, in_shape: &[Dim], out_shape: &[Dim], idx: &[IndexExpr]) -> Option<Vec<IndexExpr>> {
    let one = Dim::constant(1);
    match op {
        Op::Permute { perm } => {
            let mut j = vec![IndexExpr::zero(); in_shape.len()];
            for (d, &p) in perm.iter().enumerate() {
                *j.get_mut(p)? = idx.get(d)?.clone();
            }
            Some(j)
        }
        Op::Expand { .. } => {
            let lead = out_shape.len().checked_sub(in_shape.len())?;
            let mut j = Vec::with_capacity(in_shape.len());
            for (i, d) in in_shape.iter().enumerate() {
                j.push(if *d == one {
                    IndexExpr::zero()
                } else {
                    idx.get(lead + i)?.clone()
                });
            }
            Some(j)
        }
        Op::Slice { axis, start, .. } => {
            let mut j = idx.to_vec();
            *j.get_mut(*axis)? = idx.get(*axis)?.add_const(start);
            Some(j)
        }
        Op::Reshape { .. } => {
            let mut j = vec![IndexExpr::zero(); in_shape.len()];
            for (olds, news) in reshape_groups(in_shape, out_shape)? {
                let [old] = olds[..] else { return None };
                let mut acc = IndexExpr::zero();
                let mut stride = Dim::constant(1);
                for &axis in news.iter().rev() {
                    acc = acc.add(&idx.get(axis)?.scale(&stride));
                    stride = stride.mul(&out_shape[axis]);
                }
                j[old] = acc;
            }
            Some(j)
        }
        _ => None,
    }
}

// ---- launch geometry ------------------------------------------------------------------------------

const BLOCK: u32 = 256;

fn loop_launch(domain: &[Dim], outer: usize, reduces: bool) -> LaunchGeometry {
    let grid0 = if reduces {
        // one block per row of the outer axes; its threads share the row's reductions
        GridDim::blocks(numel(&domain[..outer.min(domain.len())]), 1)
    } else {
        GridDim::blocks(numel(domain), BLOCK)
    };
    LaunchGeometry {
        grid: [grid0, GridDim::one(), GridDim::one()],
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
    }
}

fn template_launch(op: &TemplateOp, p: &TemplateParams, g: &Graph, node: NodeIndex, in_bytes: usize) -> LaunchGeometry {
    let threads = p.warps * 32;
    let rows_of = |shape: &[Dim], axis: usize| {
        let mut s = shape.to_vec();
        if axis < s.len() {
            s.remove(axis);
        }
        numel(&s)
    };
    let x_shape = g
        .operands(node)
        .first()
        .map(|a| g.ty(*a).shape.clone())
        .unwrap_or_default();
    let last_axis = x_shape.len().saturating_sub(1);
    let tile_smem = |k_bytes: usize| {
        let b = u64::from(p.stages) * u64::from(p.tile_m + p.tile_n) * u64::from(p.tile_k) * k_bytes as u64;
        u32::try_from(b).unwrap_or(u32::MAX)
    };
    let (grid, smem) = match op {
        TemplateOp::Gemm(gm) => (
            [
                GridDim::blocks(gm.n.clone(), p.tile_n),
                GridDim::blocks(gm.m.clone(), p.tile_m),
                GridDim::blocks(numel(&gm.batch), 1),
            ],
            tile_smem(in_bytes),
        ),
        TemplateOp::ScaledGemmFp8 { m, n, .. } => (
            [
                GridDim::blocks(n.clone(), p.tile_n),
                GridDim::blocks(m.clone(), p.tile_m),
                GridDim::one(),
            ],
            tile_smem(1),
        ),
        TemplateOp::GroupedGemm { tokens, top_k, n, .. } => (
            [
                GridDim::blocks(n.clone(), p.tile_n),
                GridDim::blocks(tokens.mul(top_k), p.tile_m),
                GridDim::one(),
            ],
            tile_smem(in_bytes),
        ),
        TemplateOp::Attention {
            batch,
            kv_heads,
            group,
            q_len,
            ..
        } => (
            [
                GridDim::blocks(q_len.mul(group), p.tile_m),
                GridDim::blocks(batch.mul(kv_heads), 1),
                GridDim::one(),
            ],
            tile_smem(4),
        ),
        TemplateOp::LinearAttnChunk { batch, heads, .. } | TemplateOp::LinearAttnStep { batch, heads, .. } => (
            [
                GridDim::blocks(heads.clone(), 1),
                GridDim::blocks(batch.clone(), 1),
                GridDim::one(),
            ],
            0,
        ),
        TemplateOp::RouteTopK { tokens, .. } => (
            [GridDim::blocks(tokens.clone(), p.warps), GridDim::one(), GridDim::one()],
            0,
        ),
        TemplateOp::TopK { axis, .. } | TemplateOp::ArgMax { axis } => (
            [
                GridDim::blocks(rows_of(&x_shape, *axis), 1),
                GridDim::one(),
                GridDim::one(),
            ],
            0,
        ),
        TemplateOp::ScatterAdd { .. } | TemplateOp::DequantizeFp8 { .. } => {
            let src = g
                .operands(node)
                .last()
                .map(|a| g.ty(*a).shape.clone())
                .unwrap_or_default();
            ([GridDim::blocks(numel(&src), BLOCK), GridDim::one(), GridDim::one()], 0)
        }
        TemplateOp::QuantizeFp8 { cols, .. } => (
            [
                GridDim::blocks(x_shape.last().cloned().unwrap_or(Dim::constant(1)), *cols as u32),
                GridDim::blocks(rows_of(&x_shape, last_axis), 1),
                GridDim::one(),
            ],
            0,
        ),
        TemplateOp::RmsNorm { .. }
        | TemplateOp::AddRmsNorm { .. }
        | TemplateOp::RmsNormQuantFp8 { .. }
        | TemplateOp::SwiGluQuantFp8 { .. }
        | TemplateOp::Softmax { .. }
        | TemplateOp::QkNormRope { .. }
        | TemplateOp::GroupNormGate { .. } => (
            [
                GridDim::blocks(rows_of(&x_shape, last_axis), 1),
                GridDim::one(),
                GridDim::one(),
            ],
            0,
        ),
    };
    let block = match op {
        TemplateOp::ScatterAdd { .. } | TemplateOp::DequantizeFp8 { .. } => BLOCK,
        _ => threads,
    };
    LaunchGeometry {
        grid,
        block: [block, 1, 1],
        shared_bytes: smem,
    }
}

// ---- driver ---------------------------------------------------------------------------------------

fn partition_valid(g: &Graph) -> Result<KernelPlan, String> {
    let info = Info::new(g)?;
    let mut hints = Hints::default();
    // each round adds at least one hint; there are at most two per node plus `no_join`
    for _ in 0..2 * info.order.len() + 2 {
        let dec = decide(g, &info, &hints);
        match lower(g, &info, &dec) {
            Ok(plan) => return Ok(plan),
            Err(stops) => {
                let mut progress = false;
                let mut repeated = Vec::new();
                for s in stops {
                    let new = match &s {
                        Retry::Store(n) => hints.store.insert(*n),
                        Retry::NoEpilogue(n) => hints.no_epilogue.insert(*n),
                        Retry::NoJoin => !std::mem::replace(&mut hints.no_join, true),
                        Retry::Fatal(m) => return Err(m.clone()),
                    };
                    progress |= new;
                    if !new {
                        repeated.push(match s {
                            Retry::Store(n) => format!("store %{}", n.index()),
                            Retry::NoEpilogue(n) => format!("no epilogue for %{}", n.index()),
                            _ => "no extra outputs".into(),
                        });
                    }
                }
                if !progress {
                    return Err(format!(
                        "partition: internal error: a round added no hint ({})",
                        repeated.join(", ")
                    ));
                }
            }
        }
    }
    Err("partition: did not converge".into())
}

enum Retry {
    Store(NodeIndex),
    NoEpilogue(NodeIndex),
    NoJoin,
    Fatal(String),
}

fn lower(g: &Graph, info: &Info, dec: &Decision) -> Result<KernelPlan, Vec<Retry>> {
    let mut lw = Lower::new(g, info, dec);
    // buffers: graph inputs first (scan bodies bind them by position), then stored values
    let inputs: Vec<BufferId> = g
        .inputs
        .iter()
        .filter_map(|&n| lw.stored(Value { node: n, port: 0 }))
        .collect();
    let outputs: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
    for dr in &dec.drafts {
        for &r in &dr.roots {
            let kind = if outputs.contains(&r) {
                BufferKind::Output
            } else {
                BufferKind::Intermediate
            };
            lw.add_buffer(r, kind);
        }
    }
    let mut retries = Vec::new();
    let mut kernels: Vec<(usize, Kernel)> = Vec::new();
    for d in 0..dec.drafts.len() {
        match lw.lower_draft(d) {
            Ok(k) => kernels.push((d, k)),
            // a template is always stored: what cannot read it in place is its epilogue
            Err(Stop::Store(n)) if matches!(info.class(n), Class::Template | Class::Scan) => {
                retries.push(Retry::NoEpilogue(n))
            }
            Err(Stop::Store(n)) => retries.push(Retry::Store(n)),
            Err(Stop::NoEpilogue(n)) => retries.push(Retry::NoEpilogue(n)),
            Err(Stop::Fatal(m)) => return Err(vec![Retry::Fatal(m)]),
        }
    }
    // graph outputs: a stored value, a leaf, or a view that is its base's contiguous data
    let mut plan_outputs = Vec::new();
    for o in &g.outputs {
        let found = if let Some(&b) = lw.buffer_of.get(&o.value) {
            Some(b)
        } else {
            match lw.fold_views_output(o.value) {
                Ok(Some((b, view))) if view.offset == Dim::constant(0) && view == View::contiguous(&view.shape) => {
                    Some(b)
                }
                Ok(Some(_)) | Ok(None) => {
                    retries.push(Retry::Store(o.value.node));
                    None
                }
                Err(Stop::Store(n)) => {
                    retries.push(Retry::Store(n));
                    None
                }
                Err(Stop::NoEpilogue(n)) => {
                    retries.push(Retry::NoEpilogue(n));
                    None
                }
                Err(Stop::Fatal(m)) => return Err(vec![Retry::Fatal(m)]),
            }
        };
        if let Some(buffer) = found {
            if let Some(b) = lw.buffers.get_mut(buffer.0 as usize) {
                if b.kind == BufferKind::Intermediate {
                    b.kind = BufferKind::Output;
                }
            }
            plan_outputs.push(PlanOutput {
                name: o.name.clone(),
                buffer,
                kind: o.kind,
                shape: g.ty(o.value).shape.clone(),
            });
        }
    }
    if !retries.is_empty() {
        return Err(retries);
    }
    // execution order: producers first; ties by the graph's topological order
    let Some(order) = kernel_order(&kernels, dec, info) else {
        return Err(vec![Retry::NoJoin]);
    };
    let mut ordered = Vec::with_capacity(kernels.len());
    let mut slots: Vec<Option<Kernel>> = kernels.into_iter().map(|(_, k)| Some(k)).collect();
    for k in order {
        if let Some(kernel) = slots[k].take() {
            ordered.push(kernel);
        }
    }
    let mut plan = KernelPlan {
        buffers: lw.buffers,
        kernels: merge_horizontal(ordered),
        inputs,
        outputs: plan_outputs,
    };
    crate::copies::forward_copies(&mut plan);
    for (i, kernel) in plan.kernels.iter_mut().enumerate() {
        kernel.name = kernel_name(i, kernel, g);
    }
    Ok(plan)
}

impl Lower<'_> {
    /// [`Lower::fold_views`] for a graph output: views count as evaluated "here".
    fn fold_views_output(&mut self, v: Value) -> Lowered<Option<(BufferId, View)>> {
        let mut chain = Vec::new();
        let mut cur = v;
        while self.info.class(cur.node) == Class::View && !self.buffer_of.contains_key(&cur) {
            chain.push(cur.node);
            match self.g.operands(cur.node).first() {
                Some(&a) => cur = a,
                None => return Ok(None),
            }
        }
        let Some(base) = self.stored(cur) else { return Ok(None) };
        let mut view = View::contiguous(&self.g.ty(cur).shape);
        for &n in chain.iter().rev() {
            let out = &self.g.node(n).outputs[0].shape;
            let next = through_view(&view, &self.g.node(n).op, out).flatten();
            match next {
                Some(nv) => view = nv,
                None => return Ok(None),
            }
        }
        Ok(Some((base, view)))
    }
}

/// Kahn's algorithm over "reads a buffer another kernel writes"; None on a cycle.
/// Horizontal fusion: two loop kernels next to each other in execution order over the same
/// domain, without reductions, neither reading nor writing what the other writes, become one
/// kernel storing both kernels' outputs (one launch; every index computes both values). In
/// Ring's softmax layers: the K and V cache appends.
fn merge_horizontal(kernels: Vec<Kernel>) -> Vec<Kernel> {
    let mut out: Vec<Kernel> = Vec::with_capacity(kernels.len());
    for k in kernels {
        if let Some(prev) = out.last_mut() {
            if let Some(merged) = merge_loops(prev, &k) {
                *prev = merged;
                continue;
            }
        }
        out.push(k);
    }
    out
}

/// `a` and `b` as one loop kernel, when [`merge_horizontal`] allows it.
fn merge_loops(a: &Kernel, b: &Kernel) -> Option<Kernel> {
    let (KernelKind::Loop(la), KernelKind::Loop(lb)) = (&a.kind, &b.kind) else {
        return None;
    };
    if la.domain != lb.domain || la.exprs.has_reduce() || lb.exprs.has_reduce() {
        return None;
    }
    let written = |k: &Kernel| k.outputs.iter().map(|r| r.buffer).collect::<HashSet<BufferId>>();
    let (wa, wb) = (written(a), written(b));
    let touches = |k: &Kernel, w: &HashSet<BufferId>| k.inputs.iter().chain(&k.outputs).any(|r| w.contains(&r.buffer));
    if touches(b, &wa) || touches(a, &wb) {
        return None;
    }
    // b's expressions after a's (its input slots shift), each one reusing an equal expression
    // of a's, so that shared sub-expressions still appear once (the positions, `past`, a
    // concat's bound)
    let di = a.inputs.len();
    let mut exprs = la.exprs.clone();
    let mut known: HashMap<ExprNode, ExprId> = exprs
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), ExprId(i as u32)))
        .collect();
    let mut map: Vec<ExprId> = Vec::with_capacity(lb.exprs.nodes.len());
    for n in &lb.exprs.nodes {
        let m = |e: &ExprId| map[e.0 as usize];
        let mi = |x: &IndexExpr| IndexExpr {
            terms: x
                .terms
                .iter()
                .map(|(v, c)| {
                    let v = match v {
                        IndexVar::Data(e) => IndexVar::Data(m(e)),
                        v => *v,
                    };
                    (v, c.clone())
                })
                .collect(),
            offset: x.offset.clone(),
        };
        let op = match &n.op {
            ScalarOp::Load { input, index } => ScalarOp::Load {
                input: input + di,
                index: index.iter().map(mi).collect(),
            },
            ScalarOp::Index(x) => ScalarOp::Index(mi(x)),
            ScalarOp::Unary(u, x) => ScalarOp::Unary(*u, m(x)),
            ScalarOp::Binary(o, x, y) => ScalarOp::Binary(*o, m(x), m(y)),
            ScalarOp::Where(c, x, y) => ScalarOp::Where(m(c), m(x), m(y)),
            ScalarOp::Cast(x) => ScalarOp::Cast(m(x)),
            ScalarOp::Result { .. } | ScalarOp::Const(_) | ScalarOp::Reduce { .. } => n.op.clone(),
        };
        let node = ExprNode { op, dtype: n.dtype };
        let id = *known.entry(node.clone()).or_insert_with(|| {
            exprs.nodes.push(node);
            ExprId(exprs.nodes.len() as u32 - 1)
        });
        map.push(id);
    }
    let mut stores = la.stores.clone();
    stores.extend(lb.stores.iter().map(|e| map[e.0 as usize]));
    Some(Kernel {
        name: a.name.clone(),
        kind: KernelKind::Loop(LoopKernel {
            domain: la.domain.clone(),
            outer: la.outer,
            exprs,
            stores,
        }),
        inputs: a.inputs.iter().chain(&b.inputs).cloned().collect(),
        outputs: a.outputs.iter().chain(&b.outputs).cloned().collect(),
        nodes: a.nodes.iter().chain(&b.nodes).copied().collect(),
        launch: a.launch.clone(),
    })
}

fn kernel_order(kernels: &[(usize, Kernel)], dec: &Decision, info: &Info) -> Option<Vec<usize>> {
    let mut writer: HashMap<BufferId, usize> = HashMap::new();
    for (i, (_, k)) in kernels.iter().enumerate() {
        for o in &k.outputs {
            writer.insert(o.buffer, i);
        }
    }
    let mut succ: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); kernels.len()];
    let mut indeg = vec![0usize; kernels.len()];
    for (i, (_, k)) in kernels.iter().enumerate() {
        for b in k.inputs.iter().map(|r| r.buffer) {
            if let Some(&w) = writer.get(&b) {
                if w != i && succ[w].insert(i) {
                    indeg[i] += 1;
                }
            }
        }
    }
    // priority: the earliest stored value of the kernel's draft
    let key = |i: usize| {
        let d = &dec.drafts[kernels[i].0];
        let first_root = d.roots.iter().map(|r| info.pos(r.node)).min().unwrap_or(usize::MAX);
        (d.min_stored_pos.min(first_root), i)
    };
    let mut ready: BTreeMap<(usize, usize), usize> = (0..kernels.len())
        .filter(|&i| indeg[i] == 0)
        .map(|i| (key(i), i))
        .collect();
    let mut order = Vec::with_capacity(kernels.len());
    while let Some((_, i)) = ready.pop_first() {
        order.push(i);
        for &s in &succ[i] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                ready.insert(key(s), s);
            }
        }
    }
    (order.len() == kernels.len()).then_some(order)
}

fn kernel_name(i: usize, k: &Kernel, g: &Graph) -> String {
    // name after the DSL label of the last (most downstream) node that has one
    let label = k
        .nodes
        .iter()
        .rev()
        .filter_map(|n| g.node(*n).label.clone())
        .find(|l| !l.is_empty())
        .map(|l| {
            l.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        });
    match label {
        Some(l) => format!("k{i}_{}_{l}", k.kind_name()),
        None => format!("k{i}_{}", k.kind_name()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ir::checkpoint::RandomWeights;
    use ir::interp::{Interpreter, ParamSource};
    use ir::kernel::{BufferKind, KernelCounts};
    use ir::kernel_eval::{Eval, Memory};
    use ir::shape::{eval_shape, DimEnv};
    use ir::tol::{rel_err, Tol};
    use ir::Tensor;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A graph from DSL source (no config).
    pub(crate) fn dsl(src: &str) -> Graph {
        ir::dsl::elaborate("test.ring", src, &serde_json::json!({}))
            .unwrap_or_else(|e| panic!("{e}"))
            .graph
    }

    /// The Ring-linear graph for one of `models/configs`.
    pub(crate) fn ring_graph(config: &str) -> Graph {
        let src = include_str!("../../models/ring_linear.ring");
        let path = format!("{}/../models/configs/{config}.json", env!("CARGO_MANIFEST_DIR"));
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        ir::dsl::elaborate("models/ring_linear.ring", src, &cfg).unwrap().graph
    }

    /// Random inputs for every graph input under `dims`; integer inputs in `0..int_bound`.
    fn random_inputs(g: &Graph, dims: &DimEnv, int_bound: i64, seed: u64) -> HashMap<String, Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = HashMap::new();
        for &n in &g.inputs {
            if let Op::Input { name, dtype, shape, .. } = &g.node(n).op {
                let shape = eval_shape(shape, dims).unwrap();
                let len: usize = shape.iter().product();
                let t = if dtype.is_int() {
                    Tensor::from_i64(
                        *dtype,
                        shape,
                        (0..len).map(|_| rng.random_range(0..int_bound)).collect(),
                    )
                } else {
                    Tensor::from_f32(*dtype, shape, (0..len).map(|_| rng.random_range(-1.0..1.0)).collect())
                };
                out.insert(name.clone(), t);
            }
        }
        out
    }

    /// Partitions `g`, runs the plan with the test evaluator and checks every graph output
    /// against the interpreter within `bound`.
    fn check_numerics(g: &Graph, plan: &KernelPlan, inputs: &HashMap<String, Tensor>, bound: f64) {
        let weights = RandomWeights::new(7);
        let interp = Interpreter::new(g, &weights).unwrap();
        let want = interp.run(inputs).unwrap();
        let env = interp.bind(inputs).unwrap();
        let mut params = HashMap::new();
        for spec in g.params().unwrap() {
            params.insert(
                spec.name.clone(),
                ParamSource::load(&weights, &spec).unwrap().to_f64_vec(),
            );
        }
        // folded constants are parameters whose value the graph holds
        for b in &plan.buffers {
            if let Op::Literal { value } = &g.node(b.value.node).op {
                params.insert(b.name.clone(), value.to_f64_vec());
            }
        }
        let mut mem = Memory::new();
        for (&n, &b) in g.inputs.iter().zip(&plan.inputs) {
            let Op::Input { name, .. } = &g.node(n).op else {
                unreachable!()
            };
            mem.insert(b, inputs[name].to_f64_vec());
        }
        Eval {
            env: &env,
            params: &params,
        }
        .run(plan, &mut mem)
        .unwrap_or_else(|e| panic!("{e}\n{}", plan.to_text()));
        for o in &plan.outputs {
            let got: Vec<f32> = mem[&o.buffer].iter().map(|&x| x as f32).collect();
            let want: Vec<f32> = want[&o.name].to_f64_vec().iter().map(|&x| x as f32).collect();
            let err = rel_err(&got, &want);
            assert!(
                err <= bound,
                "output {}: error {err} > {bound}\n{}",
                o.name,
                plan.to_text()
            );
        }
    }

    fn run_checked(src: &str, dims: &[(&str, i64)]) -> KernelPlan {
        let g = dsl(src);
        let plan = partition(&g).unwrap();
        let env: DimEnv = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        check_numerics(&g, &plan, &random_inputs(&g, &env, 4, 1), Tol::F32.op());
        plan
    }

    fn loop_kernel(k: &Kernel) -> &LoopKernel {
        match &k.kind {
            KernelKind::Loop(l) => l,
            _ => panic!("{} is not a loop kernel", k.name),
        }
    }

    fn template(k: &Kernel) -> &TemplateKernel {
        match &k.kind {
            KernelKind::Template(t) => t,
            _ => panic!("{} is not a template kernel", k.name),
        }
    }

    /// How many expression nodes of every loop body, prologue and epilogue satisfy `f`.
    fn count_exprs(plan: &KernelPlan, f: impl Fn(&ScalarOp) -> bool) -> usize {
        let mut graphs: Vec<&ExprGraph> = Vec::new();
        for k in &plan.kernels {
            match &k.kind {
                KernelKind::Loop(l) => graphs.push(&l.exprs),
                KernelKind::Template(t) => {
                    for o in &t.operands {
                        if let Operand::Prologue(p) = o {
                            graphs.push(&p.exprs);
                        }
                    }
                    if let Some(e) = &t.epilogue {
                        graphs.push(&e.exprs);
                    }
                }
                KernelKind::Scan(_) => {}
            }
        }
        graphs.iter().flat_map(|g| &g.nodes).filter(|n| f(&n.op)).count()
    }

    #[test]
    fn an_elementwise_chain_is_one_loop_kernel() {
        let plan = run_checked(
            "input x: f32[4, 8]; param w: f32[8] = \"w\";
             output \"y\" = cast(exp(x) * 0.5 + w, bf16) * 2.0;",
            &[],
        );
        assert_eq!(plan.kernel_count(), 1, "{plan}");
        let l = loop_kernel(&plan.kernels[0]);
        assert_eq!((l.outer, l.stores.len()), (0, 1));
        assert_eq!(
            partition_unfused_count(&dsl("input x: f32[4]; output \"y\" = exp(x) + 1.0;")),
            2
        );
    }

    #[test]
    fn matmul_with_bias_and_activation_is_one_gemm() {
        let plan = run_checked(
            "input x: f32[3, 5]; param w: f32[7, 5] = \"w\"; param b: f32[7] = \"b\";
             output \"y\" = maximum(x @ transpose(w) + b, 0.0);",
            &[],
        );
        assert_eq!(plan.kernel_count(), 1, "{plan}");
        let t = template(&plan.kernels[0]);
        let TemplateOp::Gemm(g) = &t.op else {
            panic!("not a gemm")
        };
        assert_eq!((g.a, g.b), (MatrixLayout::RowMajor, MatrixLayout::ColMajor));
        let epi = t.epilogue.as_ref().expect("an epilogue");
        assert!(epi
            .exprs
            .nodes
            .iter()
            .any(|n| matches!(n.op, ScalarOp::Result { port: 0 })));
        assert_eq!(plan.counts().by_kind.get("gemm"), Some(&1));
        // an epilogue reads its result in place only: y + yᵀ stores y, then a loop kernel
        let plan = run_checked(
            "input x: f32[4, 4]; let y = x @ x; output \"y\" = y + transpose(y);",
            &[],
        );
        assert_eq!(plan.kernel_count(), 2, "{plan}");
        assert!(template(&plan.kernels[0]).epilogue.is_none());
    }

    #[test]
    fn a_reduction_fuses_with_the_elementwise_ops_around_it() {
        // softmax and a norm: one kernel each, the reductions per row
        let plan = run_checked(
            "input x: f32[4, 8]; param w: f32[8] = \"w\";
             let m = max(x, axis = -1, keepdim = true);
             let e = exp(x - m);
             output \"p\" = e / sum(e, axis = -1, keepdim = true);
             output \"n\" = x * rsqrt(mean(x * x, axis = -1, keepdim = true) + 1e-6) * w;",
            &[],
        );
        assert_eq!(plan.kernel_count(), 2, "{plan}");
        for k in &plan.kernels {
            assert_eq!(loop_kernel(k).outer, 1, "{plan}");
        }
        // a reduction output used elementwise: stored by the kernel that uses it
        let plan = run_checked(
            "input x: f32[4, 8];
             let s = sum(x, axis = 1);
             output \"s\" = s; output \"y\" = exp(s) + 1.0;",
            &[],
        );
        assert_eq!(plan.kernel_count(), 1, "{plan}");
        assert_eq!(plan.kernels[0].outputs.len(), 2);
    }

    #[test]
    fn a_reduction_inside_another_reduction_is_stored() {
        // r1 would be recomputed for every step of r2's loop: it gets its own kernel
        let plan = run_checked(
            "input x: f32[4, 8];
             let r1 = sum(x, axis = 1, keepdim = true);
             output \"r2\" = sum(x * r1, axis = 0);",
            &[],
        );
        assert_eq!(plan.kernel_count(), 2, "{plan}");
        assert_eq!(count_exprs(&plan, |op| matches!(op, ScalarOp::Reduce { .. })), 2);
    }

    #[test]
    fn a_diamond_is_computed_once() {
        // inside one kernel: one exp, shared by both branches
        let plan = run_checked(
            "input x: f32[4, 8]; let a = exp(x); output \"y\" = (a + 1.0) * (a * 2.0);",
            &[],
        );
        assert_eq!(plan.kernel_count(), 1, "{plan}");
        assert_eq!(
            count_exprs(&plan, |op| matches!(op, ScalarOp::Unary(UnaryOp::Exp, _))),
            1
        );
        // across kernels: a single cheap op is recomputed in both GEMM prologues, what it
        // reads is stored once
        let plan = run_checked(
            "input x: f32[4, 8]; param w1: f32[8, 3] = \"w1\"; param w2: f32[8, 5] = \"w2\";
             let v = exp(sin(x));
             output \"a\" = v @ w1; output \"b\" = v @ w2;",
            &[],
        );
        assert_eq!(plan.kernel_count(), 3, "{plan}");
        assert_eq!(
            count_exprs(&plan, |op| matches!(op, ScalarOp::Unary(UnaryOp::Exp, _))),
            2
        );
        assert_eq!(
            count_exprs(&plan, |op| matches!(op, ScalarOp::Unary(UnaryOp::Sin, _))),
            1
        );
        // a value that is more than one op is stored, not recomputed
        let plan = run_checked(
            "input x: f32[4, 8]; param w1: f32[8, 3] = \"w1\"; param w2: f32[8, 5] = \"w2\";
             let v = exp(x) * sin(x) + x;
             output \"a\" = v @ w1; output \"b\" = v @ w2;",
            &[],
        );
        assert_eq!(plan.kernel_count(), 3, "{plan}");
        assert_eq!(
            count_exprs(&plan, |op| matches!(op, ScalarOp::Unary(UnaryOp::Exp, _))),
            1
        );
    }

    #[test]
    fn views_fold_into_indexing() {
        // slice + split of a projection, then a transpose: loads through one strided view
        let plan = run_checked(
            "dim seq; input x: f32[seq, 4]; param w: f32[4, 12] = \"w\";
             let qkv = x @ w;
             let k = reshape(qkv[:, 4:8], [seq, 2, 2]);
             output \"y\" = permute(k, [1, 0, 2]) * 2.0;",
            &[("seq", 3)],
        );
        assert_eq!(plan.kernel_count(), 2, "{plan}");
        let k = &plan.kernels[1];
        assert_eq!(k.inputs[0].view.offset, Dim::constant(4), "{plan}");
        // merging dims that a permute separated is no strided view: one copy kernel
        let plan = run_checked(
            "input x: f32[2, 3, 5]; param w: f32[5, 4] = \"w\"; param w2: f32[12, 6] = \"w2\";
             let p = permute(x @ w, [0, 2, 1]);
             output \"y\" = reshape(p, [2, 12]) @ w2;",
            &[],
        );
        assert_eq!(plan.kernel_count(), 3, "{plan}");
        assert_eq!(plan.counts().loops, 1);
    }

    #[test]
    fn concat_and_gathers_are_loop_kernels() {
        let plan = run_checked(
            "dim past, seq;
             input ids: i64[seq];
             param emb: f32[4, 8] = \"emb\";
             state cache: f32[2, past, 8] = \"cache\";
             let h = take(emb, ids, axis = 0);
             carry cache = concat([cache, reshape(h * 2.0, [1, seq, 8]) + cache[:, 0:1, :] * 0.0 + 1.0], axis = 1);
             output \"g\" = gather(h, reshape(ids, [seq, 1]), axis = -1);",
            &[("past", 2), ("seq", 3)],
        );
        assert_eq!(plan.kernel_count(), 2, "{plan}");
        assert_eq!(plan.counts().loops, 2);
        let data_index = count_exprs(&plan, |op| match op {
            ScalarOp::Load { index, .. } => index.iter().any(|i| i.data_terms().next().is_some()),
            _ => false,
        });
        assert!(data_index >= 2, "{plan}");
    }

    #[test]
    fn independent_loop_kernels_over_one_domain_merge() {
        // two appends to two caches (K and V of a softmax layer): one kernel, two outputs,
        // sharing the concat bound's expressions
        let plan = run_checked(
            "dim past, seq; input k: f32[2, seq, 8]; input v: f32[2, seq, 8];
             state kc: f32[2, past, 8] = \"kc\"; state vc: f32[2, past, 8] = \"vc\";
             carry kc = concat([kc, k * 2.0], axis = 1);
             carry vc = concat([vc, exp(v)], axis = 1);
             output \"s\" = v;",
            &[("past", 3), ("seq", 2)],
        );
        assert_eq!(plan.kernel_count(), 1, "{plan}");
        let l = loop_kernel(&plan.kernels[0]);
        assert_eq!((plan.kernels[0].outputs.len(), l.stores.len()), (2, 2), "{plan}");
        let mut seen = HashSet::new();
        assert!(
            l.exprs.nodes.iter().all(|n| seen.insert(n.clone())),
            "duplicate expressions: {plan}"
        );
        // different domains, or a reduction: kept apart
        let plan = run_checked(
            "dim n; input x: f32[n, 8]; input y: f32[n, 4];
             output \"a\" = x * 2.0; output \"b\" = exp(y);
             output \"c\" = y * sum(y, axis = -1, keepdim = true);",
            &[("n", 3)],
        );
        assert_eq!(plan.counts().loops, 3, "{plan}");
    }

    #[test]
    fn a_scan_wraps_the_partition_of_its_body() {
        let plan = run_checked(
            "dim seq; input xs: f32[2, seq, 3]; state s: f32[2, 3] = \"s\";
             let (s1, ys) = scan (c = s; xt in xs; axis = 1) {
                 let c2 = c * 0.5 + xt;
                 (c2, exp(c2))
             };
             carry s = s1;
             output \"ys\" = ys;",
            &[("seq", 4)],
        );
        let c = plan.counts();
        assert_eq!((c.scans, c.total), (1, 1), "{plan}");
        let KernelKind::Scan(s) = &plan.kernels[0].kind else {
            panic!("not a scan")
        };
        assert_eq!(s.body.kernels[0].outputs.len(), 2);
    }

    #[test]
    fn topk_and_argmax_are_templates() {
        let plan = run_checked(
            "input x: f32[3, 6];
             let (v, i) = topk(x * 2.0, 2, axis = -1);
             output \"v\" = v + 1.0; output \"i\" = i; output \"a\" = argmax(x, axis = 0);",
            &[],
        );
        let c = plan.counts();
        assert_eq!(
            (c.by_kind.get("topk"), c.by_kind.get("argmax")),
            (Some(&1), Some(&1)),
            "{plan}"
        );
    }

    fn add(g: &mut Graph, op: Op, args: &[Value]) -> Vec<Value> {
        g.add(op, args, None).unwrap()
    }

    fn input(g: &mut Graph, name: &str, dtype: DType, shape: &[Dim]) -> Value {
        add(
            g,
            Op::Input {
                name: name.into(),
                kind: InputKind::Data,
                dtype,
                shape: shape.to_vec(),
            },
            &[],
        )[0]
    }

    #[test]
    fn composites_become_templates_and_swiglu_a_prologue() {
        let c = |x: i64| Dim::constant(x);
        let seq = Dim::sym("seq");
        let mut g = Graph::new();
        let x = input(&mut g, "x", DType::BF16, &[c(1), seq.clone(), c(8)]);
        let w = input(&mut g, "w", DType::BF16, &[c(8)]);
        let wg = input(&mut g, "wg", DType::BF16, &[c(8), c(16)]);
        let wu = input(&mut g, "wu", DType::BF16, &[c(8), c(16)]);
        let wd = input(&mut g, "wd", DType::BF16, &[c(16), c(8)]);
        let n = add(&mut g, Op::Fused(Fused::RmsNorm { eps: 1e-6 }), &[x, w])[0];
        let gate = add(&mut g, Op::Matmul, &[n, wg])[0];
        let up = add(&mut g, Op::Matmul, &[n, wu])[0];
        let h = add(&mut g, Op::Fused(Fused::SwiGlu), &[gate, up])[0];
        let y = add(&mut g, Op::Matmul, &[h, wd])[0];
        let (hs, _) = (add(&mut g, Op::Fused(Fused::AddRmsNorm { eps: 1e-6 }), &[x, y, w]), ());
        g.add_output("h", hs[0], InputKind::Data);
        g.add_output("x", hs[1], InputKind::Data);
        // decode attention over a cache: q [1, 2, 2, seq, 4], kv [1, 2, past + seq, 4]
        let kv_len = Dim::sym("past").add(&seq);
        let q = input(&mut g, "q", DType::F32, &[c(1), c(2), c(2), seq.clone(), c(4)]);
        let k = input(&mut g, "k", DType::F32, &[c(1), c(2), kv_len.clone(), c(4)]);
        let v = input(&mut g, "v", DType::F32, &[c(1), c(2), kv_len, c(4)]);
        let pos = add(
            &mut g,
            Op::Iota {
                len: seq,
                dtype: DType::I64,
            },
            &[],
        )[0];
        let qs = add(&mut g, Op::Unary(UnaryOp::Neg), &[q])[0];
        let o = add(
            &mut g,
            Op::Fused(Fused::FlashAttention { scale: 0.5 }),
            &[qs, k, v, pos],
        )[0];
        g.add_output("o", o, InputKind::Data);
        let plan = partition(&g).unwrap();
        let c = plan.counts();
        // rms_norm, gate, up, down (swiglu in its prologue), add_rms_norm, attention (the
        // negation and the positions in its prologues)
        assert_eq!(c.total, 6, "{plan}");
        for name in ["rms_norm", "add_rms_norm", "attention"] {
            assert_eq!(c.by_kind.get(name), Some(&1), "{name}\n{plan}");
        }
        assert_eq!(c.by_kind.get("gemm"), Some(&3));
        let down = plan
            .kernels
            .iter()
            .find(|k| k.nodes.contains(&y.node))
            .expect("the down projection");
        assert!(matches!(template(down).operands[0], Operand::Prologue(_)), "{plan}");
    }

    #[test]
    fn odd_graphs_do_not_panic() {
        let sources = [
            "input x: f32[3]; output \"x\" = x;",
            "output \"c\" = cast(arange(3), f32) * 2.0;",
            "input x: f32[2, 3]; output \"r\" = reshape(x, [3, 2]);",
            "input x: f32[2, 3]; output \"t\" = transpose(x);",
            "input x: f32[2, 3]; let dead = exp(x); output \"y\" = x + 1.0;",
            "dim n; output \"i\" = arange(n) * 2;",
            "input x: f32[2, 3]; output \"a\" = x * 2.0; output \"b\" = x * 2.0;",
            // epilogues that would read the GEMM's result at another index
            "input x: f32[4, 4]; let y = x @ x; output \"y\" = y + transpose(y);",
            "input x: f32[2, 3]; param w: f32[3, 6] = \"w\"; let y = x @ w;
             output \"y\" = y + reshape(reshape(y, [3, 4]) * 2.0, [2, 6]);",
            // a reduction over everything, and a scalar
            "input x: f32[2, 3]; output \"s\" = sum(x) * 2.0;",
        ];
        for src in sources {
            let g = dsl(src);
            let plan = partition(&g).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(plan.outputs.len(), g.outputs.len(), "{src}");
            let env: DimEnv = [("n".to_string(), 5)].into();
            let inputs = random_inputs(&g, &env, 4, 3);
            if !g.inputs.is_empty() || !src.contains("dim n") {
                check_numerics(&g, &plan, &inputs, Tol::F32.op());
            }
        }
        assert!(partition(&Graph::new()).unwrap().kernels.is_empty());
    }

    /// A random graph of views, elementwise ops, reductions, concats and matmuls over small
    /// constant shapes, with a few outputs.
    fn random_graph(seed: u64) -> Graph {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let c = |x: usize| Dim::constant(x as i64);
        let mut g = Graph::new();
        let mut pool: Vec<Value> = Vec::new();
        for (i, shape) in [[2usize, 3, 4], [2, 4, 3], [3, 4, 1]].iter().enumerate() {
            let dims: Vec<Dim> = shape.iter().map(|&d| c(d)).collect();
            pool.push(input(&mut g, &format!("x{i}"), DType::F32, &dims));
        }
        let mut tries = 0;
        while g.node_count() < 30 && tries < 500 {
            tries += 1;
            let a = pool[rng.random_range(0..pool.len())];
            let b = pool[rng.random_range(0..pool.len())];
            let shape: Vec<usize> = g.ty(a).shape.iter().map(|d| d.as_const().unwrap() as usize).collect();
            let rank = shape.len();
            let axis = if rank > 0 { rng.random_range(0..rank) } else { 0 };
            let op = match rng.random_range(0..11) {
                0 => Op::Unary([UnaryOp::Sin, UnaryOp::Neg, UnaryOp::Sigmoid, UnaryOp::Tanh][rng.random_range(0..4)]),
                1 | 2 => {
                    Op::Binary([BinaryOp::Add, BinaryOp::Mul, BinaryOp::Sub, BinaryOp::Max][rng.random_range(0..4)])
                }
                3 if rank > 0 => Op::Reduce {
                    op: if rng.random_bool(0.5) {
                        ir::op::ReduceOp::Sum
                    } else {
                        ir::op::ReduceOp::Max
                    },
                    axes: vec![axis],
                    keepdim: rng.random_bool(0.5),
                },
                4 if rank > 1 => {
                    let mut perm: Vec<usize> = (0..rank).collect();
                    perm.rotate_left(1 + axis % (rank - 1));
                    Op::Permute { perm }
                }
                5 if rank > 1 => {
                    // merge two neighbouring dims, or split one
                    let mut to: Vec<Dim> = Vec::new();
                    let k = axis.min(rank - 2);
                    for (i, &d) in shape.iter().enumerate() {
                        if i == k {
                            to.push(c(d * shape[k + 1]));
                        } else if i != k + 1 {
                            to.push(c(d));
                        }
                    }
                    Op::Reshape { shape: to }
                }
                6 if rank > 0 && shape[axis] > 1 => Op::Slice {
                    axis,
                    start: c(1),
                    end: c(shape[axis]),
                },
                7 if rank < 4 => {
                    let mut to: Vec<Dim> = vec![c(2)];
                    to.extend(shape.iter().map(|&d| c(d)));
                    Op::Expand { shape: to }
                }
                8 => Op::Matmul,
                9 if rank > 0 => Op::Concat { axis },
                _ => Op::Cast { to: DType::BF16 },
            };
            let args: Vec<Value> = match &op {
                Op::Binary(_) | Op::Matmul | Op::Concat { .. } => vec![a, b],
                _ => vec![a],
            };
            // ill-typed combinations are refused by `add` before anything changes
            if let Ok(v) = g.add(op, &args, None) {
                let v = v[0];
                let numel: usize = g.ty(v).shape.iter().map(|d| d.as_const().unwrap() as usize).product();
                if numel > 0 && numel <= 512 {
                    pool.push(v);
                }
            }
        }
        // every value nobody reads is an output, so that nothing is dead
        let read: HashSet<NodeIndex> = g.g.node_indices().flat_map(|n| g.operands(n)).map(|v| v.node).collect();
        for (i, &v) in pool.iter().enumerate().skip(3) {
            if !read.contains(&v.node) {
                g.add_output(&format!("o{i}"), v, InputKind::Data);
            }
        }
        g
    }

    #[test]
    fn random_graphs_partition_and_compute_the_same() {
        for seed in 0..150 {
            let g = random_graph(seed);
            let plan = partition(&g).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", g.to_text()));
            check_coverage(&g, &plan);
            let inputs = random_inputs(&g, &DimEnv::new(), 4, seed);
            let bf16 = g.g.node_indices().any(|n| g.node(n).outputs[0].dtype == DType::BF16);
            check_numerics(&g, &plan, &inputs, if bf16 { Tol::BF16.op() } else { Tol::F32.model() });
            let mp = crate::memplan::plan(&plan, &DimEnv::new()).unwrap();
            mp.check().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }

    /// Every live node that computes something belongs to a kernel; buffers are written
    /// before they are read.
    fn check_coverage(g: &Graph, plan: &KernelPlan) {
        let live = live_nodes(g);
        let covered: HashSet<NodeIndex> = plan.kernels.iter().flat_map(|k| k.nodes.iter().copied()).collect();
        for n in g.topo_order() {
            let class = classify(&g.node(n).op);
            let computes = !matches!(class, Class::Leaf | Class::Literal | Class::View);
            if live.contains(&n) && computes {
                assert!(
                    covered.contains(&n),
                    "%{} ({}) is in no kernel",
                    n.index(),
                    g.node(n).op.name()
                );
            }
        }
        let mut written: HashSet<BufferId> = HashSet::new();
        for k in &plan.kernels {
            for r in &k.inputs {
                let b = &plan.buffers[r.buffer.0 as usize];
                assert!(
                    !b.kind.in_arena() || written.contains(&r.buffer),
                    "{} reads {} before it is written",
                    k.name,
                    b.name
                );
            }
            written.extend(k.outputs.iter().map(|r| r.buffer));
        }
    }

    /// The fused graphs (every template kind the Ring model uses, prologues and epilogues
    /// included) compute in the kernel evaluator what the interpreter computes on the graph.
    #[test]
    fn the_compiled_ring_models_compute_the_same_as_kernels() {
        use crate::testing::opts;
        use crate::{Mode, Precision};
        let (tiny, small) = (ring_graph("tiny"), ring_graph("small"));
        // decode plans also with each route folded into its router's GEMM (crate::routegemm):
        // tiny's router columns come first in the GEMM, small's after the shared expert's
        for (g, mode, precision, (batch, seq, past), fold) in [
            (&tiny, Mode::Prefill, Precision::Bf16, (2, 5, 2), false),
            (&tiny, Mode::Decode, Precision::Bf16, (2, 1, 3), false),
            (&tiny, Mode::Decode, Precision::Bf16, (2, 1, 3), true),
            (&small, Mode::Decode, Precision::Bf16, (2, 1, 3), true),
            (&tiny, Mode::Prefill, Precision::Fp8, (1, 4, 0), false),
        ] {
            let (fused, _) = crate::compile(
                g,
                &crate::CompileOptions {
                    precision,
                    ..opts(mode)
                },
            )
            .unwrap();
            let plan = partition_with(&fused, fold).unwrap();
            let routed = plan.kernels.iter().filter(|k| k.routes()).count();
            assert_eq!(routed > 0, fold, "{mode:?} fold {fold}");
            assert!(plan.counts().templates > 0);
            // the attention output's permute is no copy kernel: the attention writes the
            // projection's rows itself (crate::copies)
            let attn: Vec<&Kernel> = plan
                .kernels
                .iter()
                .filter(|k| matches!(&k.kind, KernelKind::Template(t) if matches!(t.op, TemplateOp::Attention { .. })))
                .collect();
            assert!(!attn.is_empty());
            for a in attn {
                let out = &a.outputs[0];
                assert_ne!(out.view, View::contiguous(&out.view.shape), "{}", a.name);
                let readers = plan
                    .kernels
                    .iter()
                    .filter(|k| k.inputs.iter().any(|r| r.buffer == out.buffer));
                assert!(
                    readers.into_iter().all(|k| !matches!(k.kind, KernelKind::Loop(_))),
                    "{}",
                    a.name
                );
            }
            let env: DimEnv = [("batch", batch), ("seq", seq), ("past", past)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            check_numerics(&fused, &plan, &random_inputs(&fused, &env, 256, 9), Tol::F32.model());
        }
    }

    #[test]
    fn the_tiny_ring_model_partitions_and_computes_the_same() {
        let g = ring_graph("tiny");
        let plan = partition(&g).unwrap();
        check_coverage(&g, &plan);
        let before = partition_unfused_count(&g);
        let c: KernelCounts = plan.counts();
        assert!(c.total * 3 < before, "{c:?} vs {before}");
        assert_eq!(c.scans, 4);
        // prefill after a cached prefix, then one decode step
        for (batch, seq, past) in [(2, 3, 2), (1, 1, 4)] {
            let env: DimEnv = [("batch", batch), ("seq", seq), ("past", past)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            check_numerics(&g, &plan, &random_inputs(&g, &env, 256, 5), Tol::F32.model());
        }
        assert_eq!(plan.buffers.iter().filter(|b| b.kind == BufferKind::Output).count(), 9);
    }
}
