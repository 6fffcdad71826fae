//! Rewrite rules, one table per family (style.md 5): `scan_rules()`, `fp8_rules()`,
//! `moe_rules()`, `fuse_rules()`; every rule is named `<family>-<what>`.
//!
//! # How to write a rule
//!
//! One `rewrite!` per line in the family's table (under `#[rustfmt::skip]`), with a comment
//! above it saying why the rule exists and which hardware constraint it encodes:
//!
//! ```text
//! rewrite!("fuse-swiglu"; "(mul (mul ?g (sigmoid ?g)) ?u)" => { typed("(swiglu ?g ?u)") } if same_shape("?g", "?u")),
//! ```
//!
//! **Left-hand side**: an egg pattern over the language [`crate::egraph::lang::Rl`]. Tensor
//! operands come first, attributes last, in the order of the `ir::Op` fields:
//!
//! | IR op | pattern |
//! | --- | --- |
//! | unary | `(neg x)` `(exp x)` `(log x)` `(sqrt x)` `(rsqrt x)` `(recip x)` `(sigmoid x)` `(tanh x)` `(sin x)` `(cos x)` `(abs x)` `(not x)` |
//! | binary (broadcasting) | `(add a b)` `sub` `mul` `div` `max` `min` `pow` `mod` `lt` `le` `gt` `ge` `eq` `ne` `and` `or` |
//! | `Where` | `(where c a b)` |
//! | `Reduce` | `(sum x axes keepdim)`, `(amax x axes keepdim)`, e.g. `(sum ?x [3] true)` |
//! | `Reshape` / `Expand` | `(reshape x shape)`, `(expand x shape)`, shape e.g. `[batch,seq,4,16]` |
//! | `Permute` | `(permute x perm)`, e.g. `(permute ?k [0,1,3,2])` |
//! | `Slice` | `(slice x axis start end)`, e.g. `(slice ?x 3 0 ?h)`; symbolic ends like `past+seq` |
//! | `Concat` | `(concat x0 x1 ... axis)` |
//! | `IndexSelect` / `GatherAlong` | `(take x idx axis)`, `(gather x idx axis)` |
//! | `ScatterAddAlong` | `(scatter_add x idx src axis)` |
//! | `TopK` | `(topk x k axis)`: a tuple; `(proj (topk ?x 2 3) 1)` are the indices |
//! | `ArgMax` | `(argmax x axis)` |
//! | `Matmul` / `Cast` | `(matmul a b)`, `(cast x dtype)`, e.g. `(cast ?x f32)` |
//! | `Const` | `(const value dtype)`, e.g. `(const ?eps ?t)`, `(const -inf f32)` |
//! | inputs, params, literals, iota, dim values | `(leaf N)`: match them with a variable and test them with a condition (e.g. [`is_iota`]) |
//! | `Scan` | `(scan operands... N)`; the body lives in the side table under N |
//! | composite ops | `(rms_norm x w eps)`, `(add_rms_norm h a w eps)` (tuple: `h + a`, normed), `(swiglu g u)`, `(softmax x)`, `(qk_norm_rope x w pos inv_freq eps rotary)`, `(flash_attention q k v pos scale)`, `(linear_attn_chunk s0 q k v lam chunk)` (tuple: state, o), `(linear_attn_step s0 q k v lam)` (tuple), `(group_norm_gate o w g groups eps)`, `(linear_attn_chunk_gate s0 q k v lam w g chunk groups eps)` and `(linear_attn_step_gate s0 q k v lam w g groups eps)` (tuples: state, gated output), `(route_topk probs [bias] k n_group topk_group scale normalize biased)` (tuple: chosen, weights), `(grouped_matmul_swiglu x chosen w_gate w_up)`, `(grouped_matmul_combine h chosen weights w_down)`, `(quantize_fp8 x rows cols)` (tuple: q, scales), `(dequantize_fp8 q scales rows cols to)`, `(scaled_matmul_fp8 a_q a_s b_q b_s out)`, `(rms_norm_quant_fp8 x w eps)` (tuple: q, scales), `(add_rms_norm_quant_fp8 h a w eps)` (tuple: `h + a`, q, scales), `(swiglu_quant_fp8 g u)` (tuple: q, scales) |
//!
//! Attribute literals: integers `3`, floats `0.25` / `1e-6` / `-inf` (a graph constant's value
//! is always a float attribute: `(const 64.0 f32)`, so bind it with a variable and test it),
//! booleans `true`/`false`, dtypes `f32` `bf16` `f8e4m3` `i64` ..., lists `[0,2,1,3]` /
//! `[batch,seq,4,16]` (no spaces), symbolic dims `past+seq`. A constant dim is always an integer.
//!
//! **Right-hand side**: always through the typed applier, so an ill-typed instantiation is
//! refused (and counted in the report) before it enters the e-graph:
//! - `{ typed("(rms_norm ?x ?w ?eps)") }`: one value, unioned with the matched e-class. The new
//!   value's type must equal the matched class's type exactly. On a tuple class (a scan) the
//!   right-hand side may be a tuple of the same types, unioned as a whole (`scan.rs`).
//! - `{ tuple("(add_rms_norm ?h ?a ?w ?eps)", &["(add ?h ?a)", "root"]) }`: a multi-output node;
//!   entry `i` says which e-class gets `(proj tuple i)`: `"root"` (the matched class), `"_"`
//!   (none), or a pattern of an existing term (looked up, never added; skipped when absent).
//!
//! A composite op on the right-hand side is written with the same names as in the table above;
//! its attributes are usually variables bound on the left (`?eps` from `(const ?eps ?t)`, `?r`
//! from a slice bound), or literals.
//!
//! **Conditions** (`if cond` after the right-hand side; all in [`crate::egraph::rewrite`]):
//! [`is_const`]`("?v")`, [`same_type`]`("?a","?b")`, [`same_shape`], [`rank_is`]`("?w", 1)`,
//! [`dtype_of`]`("?t","?x")` (attribute `?t` is `?x`'s dtype), [`dtype_is`]`("?x", DType::F32)`,
//! [`last_axis`]`("?axes","?x")` (`[rank-1]`), [`is_last_axis`]`("?axis","?x")` (integer form),
//! [`is_last_dim_size`]`("?n","?x")` (a number equal to the last dim: a mean's divisor),
//! [`is_last_dim`]`("?d","?x")`, [`perm_is`]`("?p", &[0,1,3,2])`, [`is_iota`]`("?i")`,
//! [`shape_is`]`("?s", &[S::Lit(1), S::DimOf("?k", 2)])` (a shape attribute; `S::Attr("?h")`
//! reads an integer attribute), [`type_shape_is`] (the same for a value's type),
//! [`rotary_halves`]`("?h","?r","?x")`, [`is_float_dtype`]`("?t")` (a dtype attribute),
//! [`scan_is`](crate::egraph::rewrite::scan_is)`("?n", pred)` (what a scan's body computes, e.g.
//! `scan.rs`'s `is_lightning`); [`all`]`(vec![Box::new(..), ..])` names a group of them
//! that describes one layout (`fuse.rs`'s `rope_layout()`). Write a new predicate as a small builder next to them
//! (`fn name(..) -> impl Cond`), not as an inline closure.
//!
//! **Attributes the left-hand side cannot bind** (a count inside a shape, a derived shape):
//! wrap the applier, `with_attrs(typed("(route_topk ?p ?b ?k ?ng ..)"), &[("?ng",
//! Derive::Dim(S::ElemOf("?gs", 2)))])`; `S::ElemOf(var, i)` is the i-th element of a list
//! attribute. The moe family also uses [`splits_last_dim`](crate::egraph::rewrite::splits_last_dim)`("?gs","?x")`,
//! [`int_is_min`](crate::egraph::rewrite::int_is_min)`("?v", c, S::..)` and [`int_at_most_product`](crate::egraph::rewrite::int_at_most_product)`("?v", S::.., S::..)`; the scan
//! family inspects a scan body with [`scan_is`](crate::egraph::rewrite::scan_is)`("?n", pred)`.
//!
//! **Staging** (style.md 9): a family's rules are only run when its `present` check finds the
//! ops it rewrites in the graph ([`Family::present`]); keep those checks cheap.
//!
//! **Tests**: every rule gets a start ⇒ goal case with explicit runner limits (see
//! `fuse.rs`'s tests and [`crate::testing`]).

pub mod fp8;
pub mod fuse;
pub mod moe;
pub mod scan;

pub use crate::egraph::rewrite::{
    all, dtype_is, dtype_of, is_const, is_float_dtype, is_iota, is_last_axis, is_last_dim, is_last_dim_size, last_axis,
    perm_is, rank_is, rotary_halves, same_shape, same_type, shape_is, tuple, type_shape_is, typed, S,
};
pub use fp8::fp8_rules;
pub use fuse::fuse_rules;
pub use moe::moe_rules;
pub use scan::scan_rules;

use crate::egraph::Rule;
use ir::graph::Graph;
use ir::op::{Op, UnaryOp};

/// A rule family: one table, one name prefix, one "present" check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// linear-attention scans → chunked / stepwise kernels
    Scan,
    /// FP8 casts and scaled GEMMs
    Fp8,
    /// MoE gating → routed top-k and grouped GEMMs
    Moe,
    /// norms, RoPE, SwiGLU, softmax, attention
    Fuse,
}

impl Family {
    pub const ALL: [Family; 4] = [Family::Scan, Family::Fp8, Family::Moe, Family::Fuse];

    /// The rule-name prefix (`scan-…`).
    pub fn name(self) -> &'static str {
        match self {
            Family::Scan => "scan",
            Family::Fp8 => "fp8",
            Family::Moe => "moe",
            Family::Fuse => "fuse",
        }
    }

    pub fn from_name(s: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == s)
    }

    /// The family's rule table.
    pub fn rules(self) -> Vec<Rule> {
        match self {
            Family::Scan => scan_rules(),
            Family::Fp8 => fp8_rules(),
            Family::Moe => moe_rules(),
            Family::Fuse => fuse_rules(),
        }
    }

    /// The family of a rule, by its name's prefix.
    pub fn of_rule(name: &str) -> Option<Family> {
        Family::from_name(name.split('-').next()?)
    }

    /// A cheap check that the graph holds what the family rewrites, so its patterns never
    /// scan graphs without it (luminal's staging).
    pub fn present(self, g: &Graph) -> bool {
        let any = |f: &dyn Fn(&Op) -> bool| g.g.node_weights().any(|n| f(&n.op));
        match self {
            // only the lightning recurrence: its structural check reads a 13-node body
            Family::Scan => any(&scan::is_lightning),
            Family::Fp8 => any(&|op| match op {
                Op::Cast { to } => matches!(to, ir::DType::F8E4M3 | ir::DType::F8E5M2),
                // the pairs the FP8 precision pass inserts (`crate::precision`)
                Op::Fused(ir::fused::Fused::QuantizeFp8 { .. } | ir::fused::Fused::DequantizeFp8 { .. }) => true,
                Op::Param { dtype, .. } | Op::Input { dtype, .. } => {
                    matches!(dtype, ir::DType::F8E4M3 | ir::DType::F8E5M2)
                }
                _ => false,
            }),
            // a top-k (the router) and stacked rank-3 weights (the experts): both, in one pass
            Family::Moe => {
                let (mut topk, mut experts) = (false, false);
                for n in g.g.node_weights() {
                    match &n.op {
                        Op::TopK { .. } => topk = true,
                        Op::Param { stack: Some(_), .. } => experts |= n.outputs.first().is_some_and(|t| t.rank() == 3),
                        _ => {}
                    }
                    if topk && experts {
                        return true;
                    }
                }
                false
            }
            Family::Fuse => any(&|op| matches!(op, Op::Unary(UnaryOp::Rsqrt | UnaryOp::Exp | UnaryOp::Sigmoid))),
        }
    }
}
