//! The closed op set of the graph IR (design.md, "One op set, closed").
//!
//! Grouped by kind the way tinygrad groups its ops. Composite ops (fused norm, chunked linear
//! attention, grouped GEMM, ...) are *not* here: they appear only through the rewrite passes.
//! Every pass matches on [`Op`] exhaustively, so adding an op is a compile error everywhere
//! that must learn about it.

use crate::dtype::DType;
use crate::graph::Graph;
use crate::shape::{Dim, Shape};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Sigmoid,
    Tanh,
    Sin,
    Cos,
    Abs,
    /// logical not (bool only)
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
    /// Python's `%` on integers (the result takes the divisor's sign); `Div` on integers floors
    Mod,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl BinaryOp {
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Eq | BinaryOp::Ne
        )
    }
    pub fn is_logical(self) -> bool {
        matches!(self, BinaryOp::And | BinaryOp::Or)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// Whether an input is fed once (`Data`: token ids) or carried from one step's output of the
/// same name to the next step's input (`State`: KV cache, linear-attention state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputKind {
    Data,
    State,
}

/// A checkpoint tensor family stacked into one parameter: `name` holds `{var}`, and the
/// tensors for `var` in `0..count` become the leading axis.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Stack {
    pub var: String,
    pub count: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    // ---- defines -------------------------------------------------------------------------
    /// A runtime input (tokens, or a carried state when `kind == State`).
    Input {
        name: String,
        kind: InputKind,
        dtype: DType,
        shape: Shape,
    },
    /// A weight from the checkpoint; `name` is the HF tensor name (a pattern when stacked).
    Param {
        name: String,
        stack: Option<Stack>,
        dtype: DType,
        shape: Shape,
    },
    /// A scalar constant (shape []); broadcasting makes it any shape.
    Const {
        value: f64,
        dtype: DType,
    },
    /// The value of a symbolic dimension expression as an i64 scalar (`past` as a number).
    DimValue {
        dim: Dim,
    },
    /// `[0, 1, ..., len-1]`, shape [len].
    Iota {
        len: Dim,
        dtype: DType,
    },
    /// A constant tensor of fixed shape, made by constant folding (never written in the DSL).
    Literal {
        value: std::sync::Arc<crate::tensor::Tensor>,
    },
    // ---- unary / binary / ternary (elementwise, numpy broadcasting) ------------------------
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// `where(cond, a, b)`
    Where,
    // ---- reduce --------------------------------------------------------------------------
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdim: bool,
    },
    // ---- movement ------------------------------------------------------------------------
    Reshape {
        shape: Shape,
    },
    Permute {
        perm: Vec<usize>,
    },
    /// broadcast to `shape` (numpy rules)
    Expand {
        shape: Shape,
    },
    /// `x[start:end]` along `axis` (step 1)
    Slice {
        axis: usize,
        start: Dim,
        end: Dim,
    },
    Concat {
        axis: usize,
    },
    // ---- indexing ------------------------------------------------------------------------
    /// `take(x, idx, axis)`: out shape = x[..axis] ++ idx ++ x[axis+1..] (embedding lookup).
    IndexSelect {
        axis: usize,
    },
    /// `take_along_axis(x, idx, axis)`: idx has x's rank; out has idx's shape.
    GatherAlong {
        axis: usize,
    },
    /// `out = x; out[.., idx[i], ..] += src[i]` along `axis` (the derivative of GatherAlong).
    ScatterAddAlong {
        axis: usize,
    },
    /// Two outputs: values (x's dtype) and indices (i64) of the `k` largest along `axis`,
    /// descending; ties prefer the lower index (deterministic routing, spec §5.3).
    TopK {
        k: usize,
        axis: usize,
    },
    /// Index (i64) of the largest element along `axis`, ties to the lower index; axis removed.
    ArgMax {
        axis: usize,
    },
    // ---- matmul / cast -------------------------------------------------------------------
    /// `[.., M, K] @ [.., K, N] -> [.., M, N]` with broadcast batch dims; accumulation at least
    /// f32 (the interpreter uses f64), the result rounded once to the node's dtype.
    Matmul,
    Cast {
        to: DType,
    },
    // ---- control -------------------------------------------------------------------------
    /// A recurrence along `axis` of the sequence inputs. Inputs: `n_carry` initial carries,
    /// `n_seq` sequences (sliced at step t along `axis`, axis removed), then captured values.
    /// The body's inputs are in that order; its outputs are the new carries then the per-step
    /// outputs. Outputs: the final carries, then the per-step outputs stacked along `axis`.
    Scan {
        body: Box<Graph>,
        axis: usize,
        n_carry: usize,
        n_seq: usize,
    },
    // ---- composite (made only by the rewrite passes; never written in the DSL) -------------
    Fused(crate::fused::Fused),
}

/// How an op's derivative is defined (the autodiff pass will implement these rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Derivative {
    /// Defined by a rule in terms of other ops of this set.
    Rule(&'static str),
    /// A leaf or a constant: gradients stop (params and inputs receive them, constants don't).
    Leaf,
    /// Not differentiable (indices, comparisons, booleans): no gradient flows through.
    None(&'static str),
}

impl Op {
    /// Short name, as printed in the IR text and DOT.
    pub fn name(&self) -> String {
        match self {
            Op::Input {
                kind: InputKind::Data, ..
            } => "input".into(),
            Op::Input {
                kind: InputKind::State, ..
            } => "state".into(),
            Op::Param { .. } => "param".into(),
            Op::Const { .. } => "const".into(),
            Op::DimValue { .. } => "dim_value".into(),
            Op::Iota { .. } => "iota".into(),
            Op::Literal { .. } => "literal".into(),
            Op::Unary(u) => format!("{u:?}").to_lowercase(),
            Op::Binary(b) => format!("{b:?}").to_lowercase(),
            Op::Where => "where".into(),
            Op::Reduce { op, .. } => format!("reduce_{}", format!("{op:?}").to_lowercase()),
            Op::Reshape { .. } => "reshape".into(),
            Op::Permute { .. } => "permute".into(),
            Op::Expand { .. } => "expand".into(),
            Op::Slice { .. } => "slice".into(),
            Op::Concat { .. } => "concat".into(),
            Op::IndexSelect { .. } => "index_select".into(),
            Op::GatherAlong { .. } => "gather".into(),
            Op::ScatterAddAlong { .. } => "scatter_add".into(),
            Op::TopK { .. } => "topk".into(),
            Op::ArgMax { .. } => "argmax".into(),
            Op::Matmul => "matmul".into(),
            Op::Cast { .. } => "cast".into(),
            Op::Scan { .. } => "scan".into(),
            Op::Fused(f) => f.name().into(),
        }
    }

    /// Attributes as `key=value` text (for the printer); empty when none.
    pub fn attrs(&self) -> String {
        match self {
            Op::Input { name, .. } => format!("\"{name}\""),
            Op::Param { name, stack, .. } => match stack {
                Some(s) => format!("\"{name}\" for {} in 0..{}", s.var, s.count),
                None => format!("\"{name}\""),
            },
            Op::Const { value, .. } => format!("{value}"),
            Op::DimValue { dim } => format!("{dim}"),
            Op::Iota { len, .. } => format!("len={len}"),
            Op::Literal { value } => literal_attrs(value),
            Op::Reduce { axes, keepdim, .. } => format!("axes={axes:?} keepdim={keepdim}"),
            Op::Reshape { shape } => format!("to={}", crate::shape::shape_str(shape)),
            Op::Permute { perm } => format!("perm={perm:?}"),
            Op::Expand { shape } => format!("to={}", crate::shape::shape_str(shape)),
            Op::Slice { axis, start, end } => format!("axis={axis} {start}..{end}"),
            Op::Concat { axis }
            | Op::IndexSelect { axis }
            | Op::GatherAlong { axis }
            | Op::ScatterAddAlong { axis }
            | Op::ArgMax { axis } => format!("axis={axis}"),
            Op::TopK { k, axis } => format!("k={k} axis={axis}"),
            Op::Cast { to } => format!("to={to}"),
            Op::Scan {
                axis,
                n_carry,
                n_seq,
                body,
            } => format!(
                "axis={axis} carries={n_carry} seqs={n_seq} body_nodes={}",
                body.node_count()
            ),
            Op::Fused(f) => f.attrs(),
            Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Matmul => String::new(),
        }
    }

    /// The derivative rule of every op (design.md: defined or marked non-differentiable).
    pub fn derivative(&self) -> Derivative {
        use Derivative::*;
        match self {
            Op::Input { .. } | Op::Param { .. } => Leaf,
            Op::Const { .. } | Op::DimValue { .. } | Op::Iota { .. } | Op::Literal { .. } => {
                None("constant: no gradient")
            }
            Op::Unary(u) => match u {
                UnaryOp::Neg => Rule("-g"),
                UnaryOp::Exp => Rule("g*y"),
                UnaryOp::Log => Rule("g/x"),
                UnaryOp::Sqrt => Rule("g/(2y)"),
                UnaryOp::Rsqrt => Rule("-g*y^3/2"),
                UnaryOp::Recip => Rule("-g*y^2"),
                UnaryOp::Sigmoid => Rule("g*y*(1-y)"),
                UnaryOp::Tanh => Rule("g*(1-y^2)"),
                UnaryOp::Sin => Rule("g*cos(x)"),
                UnaryOp::Cos => Rule("-g*sin(x)"),
                UnaryOp::Abs => Rule("g*sign(x)"),
                UnaryOp::Not => None("boolean"),
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => Rule("(g, g) reduced to operand shapes"),
                BinaryOp::Sub => Rule("(g, -g) reduced to operand shapes"),
                BinaryOp::Mul => Rule("(g*b, g*a)"),
                BinaryOp::Div => Rule("(g/b, -g*a/b^2)"),
                BinaryOp::Max | BinaryOp::Min => Rule("g to the selected operand (ties: first)"),
                BinaryOp::Pow => Rule("(g*b*a^(b-1), g*ln(a)*a^b)"),
                BinaryOp::Mod => None("integer"),
                _ => None("comparison or logical"),
            },
            Op::Where => Rule("(none, where(c,g,0), where(c,0,g))"),
            Op::Reduce { op: ReduceOp::Sum, .. } => Rule("expand g"),
            Op::Reduce { op: ReduceOp::Max, .. } => Rule("g where x == max (first)"),
            Op::Reshape { .. } => Rule("reshape g back"),
            Op::Permute { .. } => Rule("inverse permute of g"),
            Op::Expand { .. } => Rule("sum g over broadcast axes"),
            Op::Slice { .. } => Rule("pad g with zeros (concat)"),
            Op::Concat { .. } => Rule("slice g per operand"),
            Op::IndexSelect { .. } => Rule("scatter-add g into x's shape; none for idx"),
            Op::GatherAlong { .. } => Rule("scatter_add(zeros, idx, g); none for idx"),
            Op::ScatterAddAlong { .. } => Rule("(g, none, gather(g, idx))"),
            Op::TopK { .. } => Rule("values: scatter_add g at indices; indices: none"),
            Op::ArgMax { .. } => None("indices"),
            Op::Matmul => Rule("(g @ bᵀ, aᵀ @ g) reduced over broadcast batch dims"),
            Op::Cast { to } if to.is_float() => Rule("cast g back"),
            Op::Cast { .. } => None("cast to integer or bool"),
            Op::Scan { .. } => Rule("reverse scan of the body's vector-Jacobian products"),
            Op::Fused(_) => Rule("that of the primitive subgraph it replaced (autodiff runs before fusion)"),
        }
    }
}

/// A literal's values as printed: all of them when few, else the first 8 and a hash of all, so
/// that two different literals never print alike (graph equality compares the text).
fn literal_attrs(t: &crate::tensor::Tensor) -> String {
    let v = t.to_f64_vec();
    let shown: Vec<String> = match &t.data {
        crate::tensor::Data::F32(f) => f.iter().take(8).map(|x| format!("{x}")).collect(),
        crate::tensor::Data::I64(i) => i.iter().take(8).map(|x| format!("{x}")).collect(),
        crate::tensor::Data::Bool(b) => b.iter().take(8).map(|x| format!("{x}")).collect(),
    };
    if v.len() <= 8 {
        format!("[{}]", shown.join(", "))
    } else {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for x in &v {
            for b in x.to_bits().to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        format!("[{}, ...] hash={h:016x}", shown.join(", "))
    }
}

impl fmt::Display for UnaryOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", format!("{self:?}").to_lowercase())
    }
}
