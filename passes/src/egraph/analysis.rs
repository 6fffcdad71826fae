//! The e-class analysis: every e-class carries its output types (TENSAT's `TensorAnalysis`),
//! inferred by the IR's own [`ir::graph::infer`] / [`ir::fused::Fused::infer`], or the attribute
//! value it holds, and scalar constant values. The same conversion from an e-node to an
//! [`Op`] serves type inference here and graph reconstruction in `bridge.rs`.

use super::lang::{Attr, Rl};
use egg::{Analysis, DidMerge, EGraph, Id, Language};
use ir::fused::{Fused, GroupedEpilogue};
use ir::graph::{infer, TensorType};
use ir::op::{BinaryOp, Op, ReduceOp, UnaryOp};
use std::collections::BTreeMap;

/// What an e-class holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// An attribute leaf.
    Attr(Attr),
    /// Tensor value(s): one type per output (a tuple when more than one).
    Value(ValueData),
    /// An e-node that does not type-check (never produced by the bridge or a typed applier;
    /// kept, rather than panicking, so that a bad hand-written e-graph is reported).
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValueData {
    pub tys: Vec<TensorType>,
    /// The value of a scalar constant (`(const v t)`).
    pub konst: Option<f64>,
}

impl Data {
    pub fn attr(&self) -> Option<&Attr> {
        match self {
            Data::Attr(a) => Some(a),
            _ => None,
        }
    }

    /// The type of a single-output value.
    pub fn ty(&self) -> Option<&TensorType> {
        match self {
            Data::Value(v) if v.tys.len() == 1 => Some(&v.tys[0]),
            _ => None,
        }
    }

    pub fn tys(&self) -> Option<&[TensorType]> {
        match self {
            Data::Value(v) => Some(&v.tys),
            _ => None,
        }
    }

    pub fn konst(&self) -> Option<f64> {
        match self {
            Data::Value(v) => v.konst,
            _ => None,
        }
    }
}

/// One opaque leaf of the side table: the op (Input, Param, Literal, Iota, DimValue or Scan),
/// its output types, and where the DSL wrote it (restored by the reconstruction).
#[derive(Clone, Debug)]
pub struct LeafEntry {
    pub op: Op,
    pub tys: Vec<TensorType>,
    pub loc: Option<ir::graph::SrcLoc>,
    pub label: Option<String>,
}

/// The side table of `(leaf N)` and `(scan ... N)` entries.
#[derive(Clone, Debug, Default)]
pub struct Leaves {
    pub entries: Vec<LeafEntry>,
}

/// Counters kept while the runner works (test-only-style counters, style.md 15, but always on:
/// they cost a map increment).
#[derive(Clone, Debug, Default)]
pub struct RuleStats {
    /// rule name -> instantiations that changed the e-graph
    pub fired: BTreeMap<String, usize>,
    /// rule name -> instantiations refused because a new node did not type-check
    pub refused: BTreeMap<String, usize>,
    /// the first refusal message per rule (for the report and for debugging rules)
    pub refusal_example: BTreeMap<String, String>,
    /// merges of e-classes whose types disagreed (a wrong rule; should stay 0)
    pub type_conflicts: usize,
}

/// The analysis: the side table, and the counters the typed applier updates.
#[derive(Clone, Debug, Default)]
pub struct TypeAnalysis {
    pub leaves: Leaves,
    pub stats: RuleStats,
}

pub type RlGraph = EGraph<Rl, TypeAnalysis>;

impl Analysis<Rl> for TypeAnalysis {
    type Data = Data;

    fn make(egraph: &mut RlGraph, enode: &Rl, _id: Id) -> Data {
        let kids: Vec<&Data> = enode.children().iter().map(|&c| &egraph[c].data).collect();
        node_data(enode, &kids, &egraph.analysis.leaves)
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        match (&mut *a, b) {
            (Data::Value(x), Data::Value(y)) => {
                if x.tys != y.tys {
                    self.stats.type_conflicts += 1;
                    return DidMerge(false, true);
                }
                match (x.konst, y.konst) {
                    (None, Some(k)) => {
                        x.konst = Some(k);
                        DidMerge(true, false)
                    }
                    (Some(_), None) => DidMerge(false, true),
                    _ => DidMerge(false, false),
                }
            }
            (Data::Invalid(_), b @ Data::Value(_)) => {
                *a = b;
                DidMerge(true, false)
            }
            (Data::Value(_), Data::Invalid(_)) => DidMerge(false, true),
            (x, y) => {
                if *x != y {
                    self.stats.type_conflicts += 1;
                    DidMerge(false, true)
                } else {
                    DidMerge(false, false)
                }
            }
        }
    }
}

/// The data of `enode` given its children's data: attribute, inferred types, or why not.
pub fn node_data(enode: &Rl, kids: &[&Data], leaves: &Leaves) -> Data {
    match node_data_result(enode, kids, leaves) {
        Ok(d) => d,
        Err(m) => Data::Invalid(m),
    }
}

fn node_data_result(enode: &Rl, kids: &[&Data], leaves: &Leaves) -> Result<Data, String> {
    if let Some(bad) = kids.iter().find_map(|k| match k {
        Data::Invalid(m) => Some(m),
        _ => None,
    }) {
        return Err(format!("operand is ill-typed: {bad}"));
    }
    match enode {
        Rl::Attr(a) => Ok(Data::Attr(a.clone())),
        Rl::Proj([_, _]) => {
            let tys = kids[0].tys().ok_or("proj of a non-value")?;
            let port = kids[1]
                .attr()
                .and_then(Attr::as_usize)
                .ok_or("proj port must be an integer")?;
            let t = tys
                .get(port)
                .ok_or_else(|| format!("proj {port} of a node with {} outputs", tys.len()))?;
            Ok(value(vec![t.clone()], None))
        }
        Rl::Const([_, _]) => {
            let v = kids[0]
                .attr()
                .and_then(Attr::as_f64)
                .ok_or("const value must be a number")?;
            let dt = kids[1]
                .attr()
                .and_then(Attr::as_dtype)
                .ok_or("const dtype must be a dtype")?;
            Ok(value(vec![TensorType::scalar(dt)], Some(v)))
        }
        Rl::Leaf([_]) => {
            let e = leaf_entry(kids[0], leaves)?;
            Ok(value(e.tys.clone(), None))
        }
        Rl::Scan(_) => {
            let (last, operands) = kids.split_last().ok_or("scan without a side-table index")?;
            let e = leaf_entry(last, leaves)?;
            let tys = value_types(operands)?;
            let out = infer(&e.op, &tys)?;
            Ok(value(out, None))
        }
        _ => {
            let (op, operands) = to_op(enode, kids)?;
            let tys = value_types(&operands)?;
            Ok(value(infer(&op, &tys)?, None))
        }
    }
}

fn value(tys: Vec<TensorType>, konst: Option<f64>) -> Data {
    Data::Value(ValueData { tys, konst })
}

fn leaf_entry<'a>(d: &Data, leaves: &'a Leaves) -> Result<&'a LeafEntry, String> {
    let n = d
        .attr()
        .and_then(Attr::as_usize)
        .ok_or("leaf index must be an integer")?;
    leaves
        .entries
        .get(n)
        .ok_or_else(|| format!("leaf {n} is not in the side table"))
}

fn value_types<'a>(operands: &[&'a Data]) -> Result<Vec<&'a TensorType>, String> {
    operands
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Data::Value(v) if v.tys.len() == 1 => Ok(&v.tys[0]),
            Data::Value(v) => Err(format!(
                "operand {i} is a tuple of {} values; select one with proj",
                v.tys.len()
            )),
            Data::Attr(a) => Err(format!("operand {i} is the attribute `{a}`, not a tensor")),
            Data::Invalid(m) => Err(m.clone()),
        })
        .collect()
}

/// The IR op of a non-leaf e-node and its tensor operands' data (in operand order), reading
/// the attribute children from `kids`. Leaves, scans, consts, projs and attributes are not
/// ops of this kind and are refused.
pub fn to_op<'a>(enode: &Rl, kids: &[&'a Data]) -> Result<(Op, Vec<&'a Data>), String> {
    let attr = |i: usize| -> Result<&Attr, String> {
        kids.get(i)
            .and_then(|d| d.attr())
            .ok_or_else(|| format!("{} expects an attribute as child {i}", enode))
    };
    let usize_at = |i: usize| {
        attr(i)?
            .as_usize()
            .ok_or_else(|| format!("{enode}: child {i} must be an integer"))
    };
    let f64_at = |i: usize| {
        attr(i)?
            .as_f64()
            .ok_or_else(|| format!("{enode}: child {i} must be a number"))
    };
    let bool_at = |i: usize| {
        attr(i)?
            .as_bool()
            .ok_or_else(|| format!("{enode}: child {i} must be a bool"))
    };
    let dtype_at = |i: usize| {
        attr(i)?
            .as_dtype()
            .ok_or_else(|| format!("{enode}: child {i} must be a dtype"))
    };
    let list_at = |i: usize| {
        attr(i)?
            .as_list()
            .map(|l| l.to_vec())
            .ok_or_else(|| format!("{enode}: child {i} must be a list"))
    };
    let usizes_at = |i: usize| {
        attr(i)?
            .as_usizes()
            .ok_or_else(|| format!("{enode}: child {i} must be a list of integers"))
    };
    let dim_at = |i: usize| {
        attr(i)?
            .as_dim()
            .ok_or_else(|| format!("{enode}: child {i} must be a dim"))
    };
    let ops = |n: usize| kids[..n].to_vec();
    let un = |u: UnaryOp| Ok((Op::Unary(u), ops(1)));
    let bin = |b: BinaryOp| Ok((Op::Binary(b), ops(2)));
    let fused = |f: Fused, n: usize| Ok((Op::Fused(f), ops(n)));
    match enode {
        Rl::Neg(_) => un(UnaryOp::Neg),
        Rl::Exp(_) => un(UnaryOp::Exp),
        Rl::Log(_) => un(UnaryOp::Log),
        Rl::Sqrt(_) => un(UnaryOp::Sqrt),
        Rl::Rsqrt(_) => un(UnaryOp::Rsqrt),
        Rl::Recip(_) => un(UnaryOp::Recip),
        Rl::Sigmoid(_) => un(UnaryOp::Sigmoid),
        Rl::Tanh(_) => un(UnaryOp::Tanh),
        Rl::Sin(_) => un(UnaryOp::Sin),
        Rl::Cos(_) => un(UnaryOp::Cos),
        Rl::Abs(_) => un(UnaryOp::Abs),
        Rl::Not(_) => un(UnaryOp::Not),
        Rl::Add(_) => bin(BinaryOp::Add),
        Rl::Sub(_) => bin(BinaryOp::Sub),
        Rl::Mul(_) => bin(BinaryOp::Mul),
        Rl::Div(_) => bin(BinaryOp::Div),
        Rl::Max(_) => bin(BinaryOp::Max),
        Rl::Min(_) => bin(BinaryOp::Min),
        Rl::Pow(_) => bin(BinaryOp::Pow),
        Rl::Mod(_) => bin(BinaryOp::Mod),
        Rl::Lt(_) => bin(BinaryOp::Lt),
        Rl::Le(_) => bin(BinaryOp::Le),
        Rl::Gt(_) => bin(BinaryOp::Gt),
        Rl::Ge(_) => bin(BinaryOp::Ge),
        Rl::Eq(_) => bin(BinaryOp::Eq),
        Rl::Ne(_) => bin(BinaryOp::Ne),
        Rl::And(_) => bin(BinaryOp::And),
        Rl::Or(_) => bin(BinaryOp::Or),
        Rl::Where(_) => Ok((Op::Where, ops(3))),
        Rl::Sum(_) | Rl::Amax(_) => {
            let op = if matches!(enode, Rl::Sum(_)) {
                ReduceOp::Sum
            } else {
                ReduceOp::Max
            };
            Ok((
                Op::Reduce {
                    op,
                    axes: usizes_at(1)?,
                    keepdim: bool_at(2)?,
                },
                ops(1),
            ))
        }
        Rl::Reshape(_) => Ok((Op::Reshape { shape: list_at(1)? }, ops(1))),
        Rl::Permute(_) => Ok((Op::Permute { perm: usizes_at(1)? }, ops(1))),
        Rl::Expand(_) => Ok((Op::Expand { shape: list_at(1)? }, ops(1))),
        Rl::Slice(_) => Ok((
            Op::Slice {
                axis: usize_at(1)?,
                start: dim_at(2)?,
                end: dim_at(3)?,
            },
            ops(1),
        )),
        Rl::Concat(ch) => {
            if ch.len() < 2 {
                return Err("concat needs operands and an axis".into());
            }
            let n = ch.len() - 1;
            Ok((Op::Concat { axis: usize_at(n)? }, ops(n)))
        }
        Rl::Take(_) => Ok((Op::IndexSelect { axis: usize_at(2)? }, ops(2))),
        Rl::Gather(_) => Ok((Op::GatherAlong { axis: usize_at(2)? }, ops(2))),
        Rl::ScatterAdd(_) => Ok((Op::ScatterAddAlong { axis: usize_at(3)? }, ops(3))),
        Rl::TopK(_) => Ok((
            Op::TopK {
                k: usize_at(1)?,
                axis: usize_at(2)?,
            },
            ops(1),
        )),
        Rl::ArgMax(_) => Ok((Op::ArgMax { axis: usize_at(1)? }, ops(1))),
        Rl::Matmul(_) => Ok((Op::Matmul, ops(2))),
        Rl::Cast(_) => Ok((Op::Cast { to: dtype_at(1)? }, ops(1))),
        Rl::RmsNorm(_) => fused(Fused::RmsNorm { eps: f64_at(2)? }, 2),
        Rl::AddRmsNorm(_) => fused(Fused::AddRmsNorm { eps: f64_at(3)? }, 3),
        Rl::NormMatmul(_) => fused(
            Fused::NormMatmul {
                eps: f64_at(3)?,
                emit_norm: bool_at(4)?,
            },
            3,
        ),
        Rl::SwiGlu(_) => fused(Fused::SwiGlu, 2),
        Rl::Softmax(_) => fused(Fused::Softmax, 1),
        Rl::QkNormRope(_) => fused(
            Fused::QkNormRope {
                eps: f64_at(4)?,
                rotary: usize_at(5)?,
            },
            4,
        ),
        Rl::FlashAttention(_) => fused(Fused::FlashAttention { scale: f64_at(4)? }, 4),
        Rl::LinearAttnChunk(_) => fused(Fused::LinearAttnChunk { chunk: usize_at(5)? }, 5),
        Rl::LinearAttnStep(_) => fused(Fused::LinearAttnStep, 5),
        Rl::GroupNormGate(_) => fused(
            Fused::GroupNormGate {
                groups: usize_at(3)?,
                eps: f64_at(4)?,
            },
            3,
        ),
        Rl::LinearAttnChunkGate(_) => fused(
            Fused::LinearAttnGate {
                chunk: Some(usize_at(7)?),
                groups: usize_at(8)?,
                eps: f64_at(9)?,
            },
            7,
        ),
        Rl::LinearAttnStepGate(_) => fused(
            Fused::LinearAttnGate {
                chunk: None,
                groups: usize_at(7)?,
                eps: f64_at(8)?,
            },
            7,
        ),
        Rl::LinearAttnStepQkGate(_) => fused(
            Fused::LinearAttnQkGate {
                groups: usize_at(11)?,
                eps: f64_at(12)?,
                qk_eps: f64_at(13)?,
                rotary: usize_at(14)?,
                scale: f64_at(15)?,
            },
            11,
        ),
        Rl::RouteTopK(ch) => {
            let n_ops = match ch.len() {
                7 => 1,
                8 => 2,
                n => return Err(format!("route_topk takes 7 or 8 children, got {n}")),
            };
            let biased = bool_at(n_ops + 5)?;
            if biased != (n_ops == 2) {
                return Err("route_topk: `biased` must say whether a bias operand is given".into());
            }
            fused(
                Fused::RouteTopK {
                    k: usize_at(n_ops)?,
                    n_group: usize_at(n_ops + 1)?,
                    topk_group: usize_at(n_ops + 2)?,
                    scale: f64_at(n_ops + 3)?,
                    normalize: bool_at(n_ops + 4)?,
                    biased,
                },
                n_ops,
            )
        }
        Rl::GroupedMatmulSwiGlu(_) => fused(
            Fused::GroupedMatmul {
                epilogue: GroupedEpilogue::SwiGlu,
            },
            4,
        ),
        Rl::GroupedMatmulCombine(_) => fused(
            Fused::GroupedMatmul {
                epilogue: GroupedEpilogue::WeightedCombine,
            },
            4,
        ),
        Rl::GroupedMatmulCombineShared(_) => fused(
            Fused::GroupedMatmul {
                epilogue: GroupedEpilogue::CombineShared,
            },
            6,
        ),
        Rl::QuantizeFp8(_) => fused(
            Fused::QuantizeFp8 {
                rows: usize_at(1)?,
                cols: usize_at(2)?,
            },
            1,
        ),
        Rl::DequantizeFp8(_) => fused(
            Fused::DequantizeFp8 {
                rows: usize_at(2)?,
                cols: usize_at(3)?,
                to: dtype_at(4)?,
            },
            2,
        ),
        Rl::ScaledMatmulFp8(_) => fused(Fused::ScaledMatmulFp8 { out: dtype_at(4)? }, 4),
        Rl::RmsNormQuantFp8(_) => fused(Fused::RmsNormQuantFp8 { eps: f64_at(2)? }, 2),
        Rl::AddRmsNormQuantFp8(_) => fused(Fused::AddRmsNormQuantFp8 { eps: f64_at(3)? }, 3),
        Rl::SwiGluQuantFp8(_) => fused(Fused::SwiGluQuantFp8, 2),
        Rl::Scan(_) | Rl::Leaf(_) | Rl::Const(_) | Rl::Proj(_) | Rl::Attr(_) => {
            Err(format!("internal: `{enode}` is not an op with operands"))
        }
    }
}
