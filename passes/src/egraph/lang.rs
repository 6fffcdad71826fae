//! The egg language of the graph IR: one e-node per primitive op, per composite op and per
//! graph leaf, with attributes (axes, shapes, dtypes, constants) as leaf e-nodes of their own,
//! TENSAT style, so that a rule can bind them to pattern variables (`(sum ?x ?axes ?keep)`) or
//! spell them literally (`(cast ?x f32)`, `(const -inf ?t)`).
//!
//! Conventions (also documented for rule writers in `rules/mod.rs`): tensor operands come first,
//! attributes last, in the order of the [`ir::Op`] fields. A multi-output node is one e-class
//! holding a tuple; `(proj ?t i)` is its i-th output. Leaves that carry data too big or too
//! opaque to be attributes (inputs, params, literals, iota, dim values) are `(leaf N)`, N an
//! index into the [`super::analysis::Leaves`] side table; a scan is `(scan operands... N)`.

use egg::{define_language, Id};
use ir::shape::Dim;
use ir::DType;
use std::fmt;
use std::str::FromStr;

define_language! {
    /// Ring-linear graph IR as an egg language (`Rl`).
    pub enum Rl {
        // ---- unary: (op x) ------------------------------------------------------------------
        "neg" = Neg([Id; 1]),
        "exp" = Exp([Id; 1]),
        "log" = Log([Id; 1]),
        "sqrt" = Sqrt([Id; 1]),
        "rsqrt" = Rsqrt([Id; 1]),
        "recip" = Recip([Id; 1]),
        "sigmoid" = Sigmoid([Id; 1]),
        "tanh" = Tanh([Id; 1]),
        "sin" = Sin([Id; 1]),
        "cos" = Cos([Id; 1]),
        "abs" = Abs([Id; 1]),
        "not" = Not([Id; 1]),
        // ---- binary: (op a b), numpy broadcasting --------------------------------------------
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "max" = Max([Id; 2]),
        "min" = Min([Id; 2]),
        "pow" = Pow([Id; 2]),
        "mod" = Mod([Id; 2]),
        "lt" = Lt([Id; 2]),
        "le" = Le([Id; 2]),
        "gt" = Gt([Id; 2]),
        "ge" = Ge([Id; 2]),
        "eq" = Eq([Id; 2]),
        "ne" = Ne([Id; 2]),
        "and" = And([Id; 2]),
        "or" = Or([Id; 2]),
        // ---- ternary -------------------------------------------------------------------------
        "where" = Where([Id; 3]),
        // ---- reduce: (op x axes keepdim) -------------------------------------------------------
        "sum" = Sum([Id; 3]),
        "amax" = Amax([Id; 3]),
        // ---- movement --------------------------------------------------------------------------
        "reshape" = Reshape([Id; 2]),     // x shape
        "permute" = Permute([Id; 2]),     // x perm
        "expand" = Expand([Id; 2]),       // x shape
        "slice" = Slice([Id; 4]),         // x axis start end
        "concat" = Concat(Vec<Id>),       // x0 x1 ... axis
        // ---- indexing --------------------------------------------------------------------------
        "take" = Take([Id; 3]),           // x idx axis (index_select)
        "gather" = Gather([Id; 3]),       // x idx axis
        "scatter_add" = ScatterAdd([Id; 4]), // x idx src axis
        "topk" = TopK([Id; 3]),           // x k axis: a tuple (values, indices)
        "argmax" = ArgMax([Id; 2]),       // x axis
        // ---- matmul / cast ---------------------------------------------------------------------
        "matmul" = Matmul([Id; 2]),
        "cast" = Cast([Id; 2]),           // x dtype
        // ---- control and leaves ----------------------------------------------------------------
        "scan" = Scan(Vec<Id>),           // operands... N (side-table index of body and attributes)
        "leaf" = Leaf([Id; 1]),           // N (side-table index)
        "const" = Const([Id; 2]),         // value dtype
        "proj" = Proj([Id; 2]),           // tuple port
        // ---- composite ops (ir::fused::Fused), operands then attributes --------------------------
        "rms_norm" = RmsNorm([Id; 3]),                 // x w eps
        "add_rms_norm" = AddRmsNorm([Id; 4]),          // h a w eps: tuple (h + a, normed)
        "norm_matmul" = NormMatmul([Id; 5]),           // x b w eps emit_norm: tuple (c[, normed])
        "swiglu" = SwiGlu([Id; 2]),                    // g u
        "softmax" = Softmax([Id; 1]),                  // x (last axis)
        "qk_norm_rope" = QkNormRope([Id; 6]),          // x w pos inv_freq eps rotary
        "flash_attention" = FlashAttention([Id; 5]),   // q k v pos scale
        "linear_attn_chunk" = LinearAttnChunk([Id; 6]), // s0 q k v lam chunk: tuple (s_T, o)
        "linear_attn_step" = LinearAttnStep([Id; 5]),  // s0 q k v lam: tuple (s_T, o)
        "group_norm_gate" = GroupNormGate([Id; 5]),    // o w g groups eps
        "linear_attn_chunk_gate" = LinearAttnChunkGate([Id; 10]), // s0 q k v lam w g chunk groups eps: tuple (s_T, y)
        "linear_attn_step_gate" = LinearAttnStepGate([Id; 9]),    // s0 q k v lam w g groups eps: tuple (s_T, y)
        "linear_attn_step_qk_gate" = LinearAttnStepQkGate([Id; 16]), // s0 q_raw k_raw v lam w g qw kw pos inv_freq groups eps qk_eps rotary scale: tuple (s_T, y)
        "route_topk" = RouteTopK(Vec<Id>),             // probs [bias] k n_group topk_group scale normalize biased: tuple
        "grouped_matmul_swiglu" = GroupedMatmulSwiGlu([Id; 4]),   // x chosen w_gate w_up
        "grouped_matmul_combine" = GroupedMatmulCombine([Id; 4]), // h chosen weights w_down
        "grouped_matmul_combine_shared" = GroupedMatmulCombineShared([Id; 6]), // h chosen weights w_down hs bs
        "quantize_fp8" = QuantizeFp8([Id; 3]),         // x rows cols: tuple (q, scales)
        "dequantize_fp8" = DequantizeFp8([Id; 5]),     // q scales rows cols to
        "scaled_matmul_fp8" = ScaledMatmulFp8([Id; 5]), // a_q a_s b_q b_s out
        "rms_norm_quant_fp8" = RmsNormQuantFp8([Id; 3]),          // x w eps: tuple (q, scales)
        "add_rms_norm_quant_fp8" = AddRmsNormQuantFp8([Id; 4]),   // h a w eps: tuple (h + a, q, scales)
        "swiglu_quant_fp8" = SwiGluQuantFp8([Id; 2]),             // g u: tuple (q, scales)
        // ---- attribute leaves (must stay last: any other token parses as one) --------------------
        Attr(Attr),
    }
}

/// An attribute value: a leaf e-node of its own.
///
/// Text forms (what patterns write and dumps print; no spaces, the s-expression reader splits
/// on them): integers `3`, floats with a point or exponent `0.25`, `1e-6`, `-inf`, `NaN`
/// (`Float`), booleans `true`/`false`, dtypes by IR name `f32`, `bf16`, ..., lists of dims
/// `[0,2,1,3]` or `[batch,seq,4,16]` (axes, permutations and shapes alike), and a symbolic
/// dim expression `past+seq` (a constant dim is always an `Int`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attr {
    Int(i64),
    Float(F64),
    Bool(bool),
    DType(DType),
    /// A non-constant dimension expression (constants are `Int`).
    Dim(Dim),
    List(Vec<Dim>),
}

/// An f64 with a total order and bitwise equality (so it can live in an e-node).
#[derive(Clone, Copy, Debug)]
pub struct F64(pub f64);

impl PartialEq for F64 {
    fn eq(&self, o: &Self) -> bool {
        self.0.to_bits() == o.0.to_bits()
    }
}
impl Eq for F64 {}
impl std::hash::Hash for F64 {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.to_bits().hash(h)
    }
}
impl PartialOrd for F64 {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for F64 {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

impl Attr {
    /// A dim as an attribute: `Int` when constant.
    pub fn dim(d: &Dim) -> Attr {
        match d.as_const() {
            Some(c) => Attr::Int(c),
            None => Attr::Dim(d.clone()),
        }
    }

    pub fn list<I: IntoIterator<Item = usize>>(v: I) -> Attr {
        Attr::List(v.into_iter().map(|x| Dim::constant(x as i64)).collect())
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Attr::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_usize(&self) -> Option<usize> {
        self.as_int().and_then(|i| usize::try_from(i).ok())
    }

    /// A number (`Int` or `Float`) as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Attr::Int(i) => Some(*i as f64),
            Attr::Float(f) => Some(f.0),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Attr::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_dtype(&self) -> Option<DType> {
        match self {
            Attr::DType(d) => Some(*d),
            _ => None,
        }
    }

    /// A dim (`Int` or `Dim`).
    pub fn as_dim(&self) -> Option<Dim> {
        match self {
            Attr::Int(i) => Some(Dim::constant(*i)),
            Attr::Dim(d) => Some(d.clone()),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&[Dim]> {
        match self {
            Attr::List(v) => Some(v),
            _ => None,
        }
    }

    /// A list of constant non-negative integers (axes, a permutation).
    pub fn as_usizes(&self) -> Option<Vec<usize>> {
        self.as_list()?
            .iter()
            .map(|d| d.as_const().and_then(|c| usize::try_from(c).ok()))
            .collect()
    }
}

/// A dim without spaces: `past+seq`, `-seq+3`, `2*batch`.
pub fn dim_text(d: &Dim) -> String {
    d.to_string().replace(' ', "")
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Int(i) => write!(f, "{i}"),
            // Debug always shows a point, an exponent, `inf` or `NaN`: never reads as an Int.
            Attr::Float(x) => write!(f, "{:?}", x.0),
            Attr::Bool(b) => write!(f, "{b}"),
            Attr::DType(d) => write!(f, "{d}"),
            Attr::Dim(d) => f.write_str(&dim_text(d)),
            Attr::List(v) => {
                let parts: Vec<String> = v.iter().map(dim_text).collect();
                write!(f, "[{}]", parts.join(","))
            }
        }
    }
}

impl FromStr for Attr {
    type Err = String;
    fn from_str(s: &str) -> Result<Attr, String> {
        if s.is_empty() || s.starts_with('?') {
            return Err("not an attribute".into());
        }
        if let Ok(i) = s.parse::<i64>() {
            return Ok(Attr::Int(i));
        }
        match s {
            "true" => return Ok(Attr::Bool(true)),
            "false" => return Ok(Attr::Bool(false)),
            _ => {}
        }
        if let Some(d) = DType::from_name(s) {
            return Ok(Attr::DType(d));
        }
        let first = s.chars().next().unwrap_or(' ');
        if first.is_ascii_digit() || first == '-' || first == '.' || s == "inf" || s == "NaN" {
            if let Ok(x) = s.parse::<f64>() {
                return Ok(Attr::Float(F64(x)));
            }
        }
        if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            if inner.is_empty() {
                return Ok(Attr::List(Vec::new()));
            }
            return inner
                .split(',')
                .map(parse_dim)
                .collect::<Result<Vec<_>, _>>()
                .map(Attr::List);
        }
        let d = parse_dim(s)?;
        Ok(Attr::dim(&d))
    }
}

/// Parses a dim polynomial as [`dim_text`] writes it: `+`/`-` separated terms, each a `*`
/// product of integers and symbol names.
pub fn parse_dim(s: &str) -> Result<Dim, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty dimension".into());
    }
    let mut total = Dim::constant(0);
    let mut term = String::new();
    let mut sign = 1i64;
    let flush = |term: &str, sign: i64, total: &mut Dim| -> Result<(), String> {
        if term.is_empty() {
            return Err(format!("dangling sign in dimension `{s}`"));
        }
        let mut prod = Dim::constant(sign);
        for factor in term.split('*') {
            let f = if let Ok(c) = factor.parse::<i64>() {
                Dim::constant(c)
            } else if !factor.is_empty()
                && factor
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && factor.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                Dim::sym(factor)
            } else {
                return Err(format!("`{factor}` is not a number or a dimension name (in `{s}`)"));
            };
            prod = prod.mul(&f);
        }
        *total = total.add(&prod);
        Ok(())
    };
    for (i, c) in s.chars().enumerate() {
        match c {
            '+' | '-' => {
                if i == 0 {
                    sign = if c == '-' { -1 } else { 1 };
                    continue;
                }
                flush(&term, sign, &mut total)?;
                term.clear();
                sign = if c == '-' { -1 } else { 1 };
            }
            ' ' => {}
            _ => term.push(c),
        }
    }
    flush(&term, sign, &mut total)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_text_round_trips() {
        let cases = [
            Attr::Int(3),
            Attr::Int(-2),
            Attr::Float(F64(0.25)),
            Attr::Float(F64(1e-6)),
            Attr::Float(F64(64.0)),
            Attr::Float(F64(f64::NEG_INFINITY)),
            Attr::Bool(true),
            Attr::DType(DType::BF16),
            Attr::Dim(Dim::sym("past").add(&Dim::sym("seq"))),
            Attr::Dim(Dim::constant(3).sub(&Dim::sym("seq"))),
            Attr::Dim(Dim::sym("batch").mul(&Dim::sym("seq")).mul(&Dim::constant(2))),
            Attr::list([0, 2, 1, 3]),
            Attr::List(vec![
                Dim::sym("batch"),
                Dim::sym("seq"),
                Dim::constant(4),
                Dim::constant(16),
            ]),
            Attr::List(vec![]),
        ];
        for a in cases {
            let text = a.to_string();
            assert!(!text.contains(' '), "{text}");
            assert_eq!(text.parse::<Attr>().unwrap(), a, "{text}");
        }
        assert!("?x".parse::<Attr>().is_err());
        assert!("[a,+]".parse::<Attr>().is_err());
    }

    #[test]
    fn patterns_parse_with_attributes() {
        let p: egg::Pattern<Rl> = "(sum (mul ?x ?x) [3] true)".parse().unwrap();
        assert_eq!(p.to_string(), "(sum (mul ?x ?x) [3] true)");
        let p: egg::Pattern<Rl> = "(where ?c ?s (const -inf f32))".parse().unwrap();
        assert_eq!(p.to_string(), "(where ?c ?s (const -inf f32))");
    }
}
