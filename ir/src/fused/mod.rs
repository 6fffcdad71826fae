//! Composite ops: they never come from the DSL, only from the rewrite passes (design.md, "One
//! op set, closed"). Each has a reference meaning here (`eval`), written independently of the
//! primitive subgraph it replaces, so that tests comparing the two can fail.
//!
//! Conventions: attributes are plain values; inputs are listed in each variant's doc in order;
//! shapes are written with `..` for any leading dims.

mod attention;
mod fp8;
mod linear_attn;
mod moe;
mod norm;

use crate::dtype::DType;
use crate::graph::TensorType;
use crate::shape::Dim;
use crate::tensor::Tensor;
use std::fmt;

/// How a grouped GEMM finishes (the epilogue spliced into the template).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupedEpilogue {
    /// gate and up projections together: `silu(x·W_gateᵀ) ⊙ (x·W_upᵀ)` per chosen expert
    SwiGlu,
    /// down projection, then the routing-weighted sum over the chosen experts (f32)
    WeightedCombine,
    /// `WeightedCombine` plus the shared expert's down projection, added in f32 (decode plans:
    /// `passes::shared`)
    CombineShared,
}

impl GroupedEpilogue {
    /// How many operands a `GroupedMatmul` with this epilogue takes.
    pub fn operands(self) -> usize {
        match self {
            GroupedEpilogue::SwiGlu | GroupedEpilogue::WeightedCombine => 4,
            GroupedEpilogue::CombineShared => 6,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Fused {
    /// Inputs `x [.., D]`, `w [D]`. `cast(x32 · rsqrt(mean(x32², -1) + eps), x.dtype) · w`
    /// (spec §2.2: statistics in f32, the normalised value back in x's dtype, then the weight).
    RmsNorm { eps: f64 },
    /// Inputs `h`, `a`, `w`. Outputs `(h + a, RmsNorm(h + a, w))`: the residual add fused with
    /// the next norm.
    AddRmsNorm { eps: f64 },
    /// Inputs `x [.., M, K]`, `b [.., K, N]`, `w [K]`: the RMSNorm folded into the GEMM that
    /// reads it, `c = RmsNorm(x, w) @ b` (a matmul's dtype promotion; every row's statistic
    /// computed by the kernel that multiplies it). Outputs `(c)`, or `(c, RmsNorm(x, w))` when `emit_norm`
    /// (the normalised rows stored as well, for another reader).
    NormMatmul { eps: f64, emit_norm: bool },
    /// Inputs `g`, `u`: `g · sigmoid(g) · u`.
    SwiGlu,
    /// Input `x`: softmax along the last axis (max-subtracted, f64 sums).
    Softmax,
    /// Inputs `x [.., seq, heads, d]`, `w [d]`, `pos [seq]` (i64), `inv_freq [rotary/2]` (f32):
    /// per-head RmsNorm with `w`, then NeoX RoPE on the first `rotary` dims (even, ≤ d) in f32
    /// (spec §2.5); output in the normed value's dtype.
    QkNormRope { eps: f64, rotary: usize },
    /// Inputs `q [b, Hkv, G, s, d]`, `k [b, Hkv, p + s, d]`, `v [b, Hkv, p + s, d]`,
    /// `pos [s]` (i64 absolute positions of the queries, each ≥ 0): causal GQA attention,
    /// `softmax(scale · q kᵀ, masked to key j ≤ pos_i) v` in f32. Output `[b, Hkv, G, s, d]` f32.
    FlashAttention { scale: f64 },
    /// Inputs `s0 [b, H, d, d]`, `q [b, T, H, d]` (already scaled by `d^-1/2`), `k`, `v` (f32),
    /// `lam [H, 1, 1]`: the lightning recurrence of spec §2.4.4 evaluated in the chunked form of
    /// §4.3 with chunk size `chunk`.
    /// Outputs `(s_T, o [b, T, H, d])`, as the scan it replaces.
    LinearAttnChunk { chunk: usize },
    /// The same recurrence stepped token by token (decode; T is usually 1).
    LinearAttnStep,
    /// Inputs `o [b, s, H, d]` (f32), `w [H·d]`, `g [b, s, H·d]`: RMSNorm over `groups`
    /// contiguous groups of the H·d channels, times `w`, times `sigmoid(g)` (spec §2.4.5).
    /// Output f32 `[b, s, H·d]`.
    GroupNormGate { groups: usize, eps: f64 },
    /// The lightning recurrence with its group RMSNorm and sigmoid output gate folded into the
    /// same op (spec §2.4.4–§2.4.5): inputs `s0, q, k, v, lam` as `LinearAttnChunk` (`chunk:
    /// Some(c)`) or `LinearAttnStep` (`None`), then `w [H·d]`, `g [b, T, H·d]` as
    /// `GroupNormGate`. Outputs `(s_T, GroupNormGate(o, w, g))`: the raw `o` never leaves the op.
    LinearAttnGate {
        chunk: Option<usize>,
        groups: usize,
        eps: f64,
    },
    /// The decode step of `LinearAttnGate` with its q and k made in the same op from their raw
    /// rows (spec §2.4.2, §2.5): inputs `s0, q_raw, k_raw, v, lam, w, g` (`q_raw`, `k_raw` f32
    /// `[b, T, H, d]`), then `qw`, `kw` (each `[d]` or `[H, d]`), `pos [T]`, `inv_freq
    /// [rotary/2]`. `q = QkNormRope(q_raw, qw, pos, inv_freq) · scale` (an f32 product),
    /// `k = QkNormRope(k_raw, kw, pos, inv_freq)`, then `LinearAttnGate { chunk: None }`.
    /// Outputs as that op's.
    LinearAttnQkGate {
        groups: usize,
        eps: f64,
        qk_eps: f64,
        rotary: usize,
        scale: f64,
    },
    /// Inputs `probs [.., E]` (f32 sigmoid scores) and, when `biased`, `bias [E]`: group-limited
    /// top-k of spec §2.6. Outputs `(chosen [.., k] i64, weights [.., k] f32)`; weights from the
    /// unbiased probabilities, normalised when `normalize`, times `scale`.
    RouteTopK {
        k: usize,
        n_group: usize,
        topk_group: usize,
        scale: f64,
        normalize: bool,
        biased: bool,
    },
    /// Expert GEMMs over the chosen experts only.
    /// `SwiGlu`: inputs `x [b, s, D]`, `chosen [b, s, K]`, `w_gate [E, I, D]`, `w_up [E, I, D]`;
    /// output `h [b, s, K, I]` in the dtype of x and the weights promoted.
    /// `WeightedCombine`: inputs `h [b, s, K, I]`, `chosen`, `weights [b, s, K]` (f32),
    /// `w_down [E, D, I]`; output `Σ_k weights_k · (h_k · W_downᵀ)` f32 `[b, s, D]`.
    /// `CombineShared`: those four, then the shared expert's `hs [b, s, Is]` and down
    /// projection `bs [Is, D]` (a matmul's B); output `WeightedCombine + f32(hs @ bs)` f32, the
    /// shared product rounded to its matmul dtype first (as `routed + shared` in the model).
    GroupedMatmul { epilogue: GroupedEpilogue },
    /// Input `x [.., R, C]` (float): E4M3 values and f32 scales per `rows × cols` block
    /// (1×128 for activations, 128×128 for weights; spec §5.2). Outputs
    /// `(q f8e4m3 [.., R, C], scales f32 [.., ceil(R/rows), ceil(C/cols)])`, `q·scale ≈ x`,
    /// scale = block amax / 448 (1 for an all-zero block; layout in fp8.rs).
    QuantizeFp8 { rows: usize, cols: usize },
    /// Inputs `q`, `scales` (as produced by QuantizeFp8): `q · scale` in `to`.
    DequantizeFp8 { rows: usize, cols: usize, to: DType },
    /// Inputs `a_q [.., M, K]`, `a_s [.., M, ceil(K/128)]` (1×128 tiles), `b_q [K, N]` (a
    /// transposed weight `[N, K]` quantised in 128×128 blocks, given as `[K, N]`),
    /// `b_s [ceil(K/128), ceil(N/128)]` (its scales, transposed likewise): `(a_q·a_s) @ (b_q·b_s)`
    /// accumulated in f32, output in `out`.
    ScaledMatmulFp8 { out: DType },
    /// Inputs `x [.., R, D]`, `w [D]`: `QuantizeFp8 { rows: 1, cols: 128 }` of
    /// `RmsNorm { eps }(x, w)`, the normalised activation quantised in the scaled GEMM's 1×128
    /// tiles by the kernel that computes it (spec §5.2, "RMSNorm+quant"). Outputs
    /// `(q f8e4m3 [.., R, D], scales f32 [.., R, ceil(D/128)])`. The normalised value is rounded
    /// to the norm's dtype before it is quantised, as in the pair it replaces.
    RmsNormQuantFp8 { eps: f64 },
    /// Inputs `h`, `a`, `w`: the residual add fused with the next norm and its quantisation.
    /// Outputs `(h + a, q, scales)`: `AddRmsNorm`'s first output, then `QuantizeFp8` (1×128) of
    /// its second.
    AddRmsNormQuantFp8 { eps: f64 },
    /// Inputs `g`, `u`: `QuantizeFp8 { rows: 1, cols: 128 }` of `SwiGlu(g, u)` (rounded to its
    /// dtype first), the down projection's operand quantised by the kernel that makes it
    /// (spec §5.2, "SwiGLU+quant"). Outputs `(q, scales)`.
    SwiGluQuantFp8,
}

impl Fused {
    pub fn name(&self) -> &'static str {
        match self {
            Fused::RmsNorm { .. } => "rms_norm",
            Fused::AddRmsNorm { .. } => "add_rms_norm",
            Fused::NormMatmul { .. } => "norm_matmul",
            Fused::SwiGlu => "swiglu",
            Fused::Softmax => "softmax",
            Fused::QkNormRope { .. } => "qk_norm_rope",
            Fused::FlashAttention { .. } => "flash_attention",
            Fused::LinearAttnChunk { .. } => "linear_attn_chunk",
            Fused::LinearAttnStep => "linear_attn_step",
            Fused::GroupNormGate { .. } => "group_norm_gate",
            Fused::LinearAttnGate { chunk: Some(_), .. } => "linear_attn_chunk_gate",
            Fused::LinearAttnGate { chunk: None, .. } => "linear_attn_step_gate",
            Fused::LinearAttnQkGate { .. } => "linear_attn_step_qk_gate",
            Fused::RouteTopK { .. } => "route_topk",
            Fused::GroupedMatmul { .. } => "grouped_matmul",
            Fused::QuantizeFp8 { .. } => "quantize_fp8",
            Fused::DequantizeFp8 { .. } => "dequantize_fp8",
            Fused::ScaledMatmulFp8 { .. } => "scaled_matmul_fp8",
            Fused::RmsNormQuantFp8 { .. } => "rms_norm_quant_fp8",
            Fused::AddRmsNormQuantFp8 { .. } => "add_rms_norm_quant_fp8",
            Fused::SwiGluQuantFp8 => "swiglu_quant_fp8",
        }
    }

    pub fn attrs(&self) -> String {
        match self {
            Fused::RmsNorm { eps }
            | Fused::AddRmsNorm { eps }
            | Fused::RmsNormQuantFp8 { eps }
            | Fused::AddRmsNormQuantFp8 { eps } => format!("eps={eps:e}"),
            Fused::NormMatmul { eps, emit_norm } => format!("eps={eps:e} emit_norm={emit_norm}"),
            Fused::QkNormRope { eps, rotary } => format!("eps={eps:e} rotary={rotary}"),
            Fused::FlashAttention { scale } => format!("scale={scale}"),
            Fused::LinearAttnChunk { chunk } => format!("chunk={chunk}"),
            Fused::GroupNormGate { groups, eps } => format!("groups={groups} eps={eps:e}"),
            Fused::LinearAttnGate {
                chunk: Some(chunk),
                groups,
                eps,
            } => format!("chunk={chunk} groups={groups} eps={eps:e}"),
            Fused::LinearAttnGate {
                chunk: None,
                groups,
                eps,
            } => format!("groups={groups} eps={eps:e}"),
            Fused::LinearAttnQkGate {
                groups,
                eps,
                qk_eps,
                rotary,
                scale,
            } => format!("groups={groups} eps={eps:e} qk_eps={qk_eps:e} rotary={rotary} scale={scale}"),
            Fused::RouteTopK {
                k,
                n_group,
                topk_group,
                scale,
                normalize,
                biased,
            } => {
                format!("k={k} groups={n_group} keep={topk_group} scale={scale} normalize={normalize} biased={biased}")
            }
            Fused::GroupedMatmul { epilogue } => format!("epilogue={epilogue:?}"),
            Fused::QuantizeFp8 { rows, cols } => format!("block={rows}x{cols}"),
            Fused::DequantizeFp8 { rows, cols, to } => format!("block={rows}x{cols} to={to}"),
            Fused::ScaledMatmulFp8 { out } => format!("out={out}"),
            Fused::SwiGlu | Fused::Softmax | Fused::LinearAttnStep | Fused::SwiGluQuantFp8 => String::new(),
        }
    }

    /// Output types, or why the operands do not fit.
    pub fn infer(&self, tys: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let n_args = match self {
            Fused::RmsNorm { .. } | Fused::SwiGlu | Fused::RmsNormQuantFp8 { .. } | Fused::SwiGluQuantFp8 => 2,
            Fused::AddRmsNorm { .. }
            | Fused::GroupNormGate { .. }
            | Fused::AddRmsNormQuantFp8 { .. }
            | Fused::NormMatmul { .. } => 3,
            Fused::Softmax | Fused::QuantizeFp8 { .. } => 1,
            Fused::QkNormRope { .. } | Fused::FlashAttention { .. } | Fused::ScaledMatmulFp8 { .. } => 4,
            Fused::LinearAttnChunk { .. } | Fused::LinearAttnStep => 5,
            Fused::LinearAttnGate { .. } => 7,
            Fused::LinearAttnQkGate { .. } => 11,
            Fused::RouteTopK { biased, .. } => 1 + usize::from(*biased),
            Fused::GroupedMatmul { epilogue } => epilogue.operands(),
            Fused::DequantizeFp8 { .. } => 2,
        };
        if tys.len() != n_args {
            return Err(format!("{} takes {n_args} operands, got {}", self.name(), tys.len()));
        }
        let float = |i: usize| -> Result<(), String> {
            if tys[i].dtype.is_float() {
                Ok(())
            } else {
                Err(format!("{} operand {i} must be a float, got {}", self.name(), tys[i]))
            }
        };
        let last = |t: &TensorType| t.shape.last().cloned();
        let promote =
            |a: DType, b: DType| DType::promote(a, b).ok_or_else(|| format!("{} mixes {a} and {b}", self.name()));
        match self {
            Fused::RmsNorm { .. } => {
                float(0)?;
                float(1)?;
                if tys[1].rank() != 1 || last(tys[0]) != last(tys[1]) {
                    return Err(format!("rms_norm weight {} does not fit {}", tys[1], tys[0]));
                }
                Ok(vec![TensorType::new(
                    promote(tys[0].dtype, tys[1].dtype)?,
                    tys[0].shape.clone(),
                )])
            }
            Fused::AddRmsNorm { .. } => {
                if tys[0] != tys[1] {
                    return Err(format!("add_rms_norm adds {} and {}", tys[0], tys[1]));
                }
                let normed = Fused::RmsNorm { eps: 0.0 }.infer(&[tys[0], tys[2]])?;
                Ok(vec![tys[0].clone(), normed[0].clone()])
            }
            Fused::NormMatmul { emit_norm, .. } => {
                let (x, b, w) = (tys[0], tys[1], tys[2]);
                let normed = Fused::RmsNorm { eps: 0.0 }.infer(&[x, w])?;
                if x.rank() < 2 || b.rank() < 2 || !b.dtype.is_float() {
                    return Err(format!("norm_matmul of {x} and {b}"));
                }
                let mut outs = crate::graph::infer(&crate::op::Op::Matmul, &[&normed[0], b])?;
                if *emit_norm {
                    outs.push(normed[0].clone());
                }
                Ok(outs)
            }
            Fused::SwiGlu => {
                float(0)?;
                if tys[0].shape != tys[1].shape {
                    return Err(format!("swiglu of {} and {}", tys[0], tys[1]));
                }
                Ok(vec![TensorType::new(
                    promote(tys[0].dtype, tys[1].dtype)?,
                    tys[0].shape.clone(),
                )])
            }
            Fused::Softmax => {
                float(0)?;
                Ok(vec![tys[0].clone()])
            }
            Fused::QkNormRope { rotary, .. } => {
                float(0)?;
                let (x, w, pos, inv) = (tys[0], tys[1], tys[2], tys[3]);
                // one weight for every head `[d]`, or one per head `[heads, d]`
                let per_head = w.rank() == 2 && x.rank() >= 3 && w.shape[0] == x.shape[x.rank() - 2];
                if x.rank() < 3 || !(w.rank() == 1 || per_head) || last(x) != last(w) {
                    return Err(format!("qk_norm_rope of {x} with weight {w}"));
                }
                if pos.rank() != 1 || !pos.dtype.is_int() || pos.shape[0] != x.shape[x.rank() - 3] {
                    return Err(format!("qk_norm_rope positions {pos} do not fit {x}"));
                }
                if rotary % 2 != 0
                    || x.shape
                        .last()
                        .and_then(|d| d.as_const())
                        .is_some_and(|d| *rotary as i64 > d)
                {
                    return Err(format!(
                        "qk_norm_rope: rotary {rotary} must be even and at most the head size"
                    ));
                }
                if inv.shape != vec![Dim::constant((*rotary / 2) as i64)] {
                    return Err(format!("qk_norm_rope inv_freq {inv} for rotary {rotary}"));
                }
                Ok(vec![TensorType::new(promote(x.dtype, w.dtype)?, x.shape.clone())])
            }
            Fused::FlashAttention { .. } => {
                let (q, k, v, pos) = (tys[0], tys[1], tys[2], tys[3]);
                if q.rank() != 5 || k.rank() != 4 || k.shape != v.shape {
                    return Err(format!("flash_attention of q {q}, k {k}, v {v}"));
                }
                if k.shape[0] != q.shape[0] || k.shape[1] != q.shape[1] || k.shape[3] != q.shape[4] {
                    return Err(format!("flash_attention: k {k} does not fit q {q}"));
                }
                if pos.rank() != 1 || !pos.dtype.is_int() || pos.shape[0] != q.shape[3] {
                    return Err(format!("flash_attention positions {pos} do not fit q {q}"));
                }
                Ok(vec![TensorType::new(DType::F32, q.shape.clone())])
            }
            Fused::LinearAttnChunk { .. } | Fused::LinearAttnStep => {
                let (s0, q, k, v, lam) = (tys[0], tys[1], tys[2], tys[3], tys[4]);
                if q.rank() != 4
                    || q != k
                    || q != v
                    || s0.rank() != 4
                    || q.dtype != DType::F32
                    || s0.dtype != DType::F32
                {
                    return Err(format!("{} of s0 {s0}, q {q}, k {k}, v {v}", self.name()));
                }
                let (h, d) = (&q.shape[2], &q.shape[3]);
                if s0.shape != vec![q.shape[0].clone(), h.clone(), d.clone(), d.clone()] {
                    return Err(format!("{}: state {s0} does not fit q {q}", self.name()));
                }
                if lam.shape != vec![h.clone(), Dim::constant(1), Dim::constant(1)] {
                    return Err(format!("{}: decay {lam} must be [H, 1, 1]", self.name()));
                }
                Ok(vec![s0.clone(), q.clone()])
            }
            Fused::GroupNormGate { groups, .. } => {
                let (o, w, g) = (tys[0], tys[1], tys[2]);
                if o.rank() != 4 || w.rank() != 1 || g.rank() != 3 {
                    return Err(format!("group_norm_gate of {o}, {w}, {g}"));
                }
                let hd = o.shape[2].mul(&o.shape[3]);
                if w.shape[0] != hd || g.shape[2] != hd || g.shape[..2] != o.shape[..2] {
                    return Err(format!("group_norm_gate: {w} and {g} do not fit {o}"));
                }
                if *groups == 0 || hd.as_const().map(|c| c % *groups as i64 != 0).unwrap_or(true) {
                    return Err(format!("group_norm_gate: {groups} groups do not divide {hd}"));
                }
                Ok(vec![TensorType::new(DType::F32, g.shape.clone())])
            }
            Fused::LinearAttnGate { chunk, groups, eps } => {
                let scan = match chunk {
                    Some(c) => Fused::LinearAttnChunk { chunk: *c },
                    None => Fused::LinearAttnStep,
                };
                let so = scan.infer(&tys[..5])?;
                let y = Fused::GroupNormGate {
                    groups: *groups,
                    eps: *eps,
                }
                .infer(&[&so[1], tys[5], tys[6]])?;
                Ok(vec![so[0].clone(), y[0].clone()])
            }
            Fused::LinearAttnQkGate {
                groups,
                eps,
                qk_eps,
                rotary,
                ..
            } => {
                let rope = Fused::QkNormRope {
                    eps: *qk_eps,
                    rotary: *rotary,
                };
                let q = rope.infer(&[tys[1], tys[7], tys[9], tys[10]])?;
                let k = rope.infer(&[tys[2], tys[8], tys[9], tys[10]])?;
                if tys[1].dtype != DType::F32
                    || tys[2].dtype != DType::F32
                    || q[0].dtype != DType::F32
                    || k[0].dtype != DType::F32
                {
                    return Err(format!(
                        "{}: q {} and k {} must be f32 (and their norm weights no wider)",
                        self.name(),
                        tys[1],
                        tys[2]
                    ));
                }
                Fused::LinearAttnGate {
                    chunk: None,
                    groups: *groups,
                    eps: *eps,
                }
                .infer(&[tys[0], &q[0], &k[0], tys[3], tys[4], tys[5], tys[6]])
            }
            Fused::RouteTopK {
                k,
                n_group,
                topk_group,
                biased,
                ..
            } => {
                let p = tys[0];
                let e = last(p)
                    .and_then(|d| d.as_const())
                    .ok_or("route_topk needs a fixed expert count")?;
                if *n_group == 0 || e % *n_group as i64 != 0 || *topk_group > *n_group || *k as i64 > e {
                    return Err(format!(
                        "route_topk: {e} experts, {n_group} groups, keep {topk_group}, k {k}"
                    ));
                }
                if *biased && (tys[1].shape != vec![Dim::constant(e)]) {
                    return Err(format!("route_topk bias {} for {e} experts", tys[1]));
                }
                let mut s = p.shape.clone();
                *s.last_mut().unwrap() = Dim::constant(*k as i64);
                Ok(vec![
                    TensorType::new(DType::I64, s.clone()),
                    TensorType::new(DType::F32, s),
                ])
            }
            Fused::GroupedMatmul { epilogue } => match epilogue {
                GroupedEpilogue::SwiGlu => {
                    let (x, chosen, wg, wu) = (tys[0], tys[1], tys[2], tys[3]);
                    if x.rank() != 3 || chosen.rank() != 3 || !chosen.dtype.is_int() || wg.rank() != 3 || wg != wu {
                        return Err(format!("grouped_matmul(swiglu) of {x}, {chosen}, {wg}, {wu}"));
                    }
                    if wg.shape[2] != x.shape[2] || chosen.shape[..2] != x.shape[..2] {
                        return Err(format!("grouped_matmul(swiglu): {wg} does not fit {x}"));
                    }
                    let mut s = chosen.shape.clone();
                    s.push(wg.shape[1].clone());
                    Ok(vec![TensorType::new(promote(x.dtype, wg.dtype)?, s)])
                }
                GroupedEpilogue::WeightedCombine | GroupedEpilogue::CombineShared => {
                    let (h, chosen, w, wd) = (tys[0], tys[1], tys[2], tys[3]);
                    if h.rank() != 4
                        || wd.rank() != 3
                        || !chosen.dtype.is_int()
                        || w.dtype != DType::F32
                        || w.shape != chosen.shape
                        || h.shape[..3] != chosen.shape[..]
                    {
                        return Err(format!("grouped_matmul(combine) of {h}, {chosen}, {w}, {wd}"));
                    }
                    if wd.shape[2] != h.shape[3] {
                        return Err(format!("grouped_matmul(combine): {wd} does not fit {h}"));
                    }
                    if *epilogue == GroupedEpilogue::CombineShared {
                        let (hs, bs) = (tys[4], tys[5]);
                        if hs.rank() != 3
                            || bs.rank() != 2
                            || hs.shape[..2] != h.shape[..2]
                            || bs.shape[0] != hs.shape[2]
                            || bs.shape[1] != wd.shape[1]
                        {
                            return Err(format!(
                                "grouped_matmul(combine_shared): shared {hs}, {bs} do not fit {h}, {wd}"
                            ));
                        }
                        promote(hs.dtype, bs.dtype)?;
                    }
                    Ok(vec![TensorType::new(
                        DType::F32,
                        vec![h.shape[0].clone(), h.shape[1].clone(), wd.shape[1].clone()],
                    )])
                }
            },
            Fused::QuantizeFp8 { rows, cols } => {
                float(0)?;
                let x = tys[0];
                if x.rank() < 2 {
                    return Err(format!("quantize_fp8 needs rank >= 2, got {x}"));
                }
                let mut s = x.shape.clone();
                let r = x.rank();
                s[r - 2] = ceil_div(&x.shape[r - 2], *rows)?;
                s[r - 1] = ceil_div(&x.shape[r - 1], *cols)?;
                Ok(vec![
                    TensorType::new(DType::F8E4M3, x.shape.clone()),
                    TensorType::new(DType::F32, s),
                ])
            }
            Fused::DequantizeFp8 { to, .. } => {
                if tys[0].dtype != DType::F8E4M3 || tys[1].dtype != DType::F32 || !to.is_float() {
                    return Err(format!("dequantize_fp8 of {} with scales {}", tys[0], tys[1]));
                }
                Ok(vec![TensorType::new(*to, tys[0].shape.clone())])
            }
            Fused::ScaledMatmulFp8 { out } => {
                let (a, b) = (tys[0], tys[2]);
                if a.dtype != DType::F8E4M3 || b.dtype != DType::F8E4M3 || b.rank() != 2 || a.rank() < 2 {
                    return Err(format!("scaled_matmul_fp8 of {a} and {b}"));
                }
                if a.shape[a.rank() - 1] != b.shape[0] {
                    return Err(format!("scaled_matmul_fp8 inner dimensions differ: {a} @ {b}"));
                }
                let mut s = a.shape.clone();
                *s.last_mut().unwrap() = b.shape[1].clone();
                Ok(vec![TensorType::new(*out, s)])
            }
            // the producer's own type rules, then the activation tiles' quantisation of its value
            Fused::RmsNormQuantFp8 { eps } => {
                let normed = Fused::RmsNorm { eps: *eps }.infer(tys)?;
                fp8::activation_quantize().infer(&[&normed[0]])
            }
            Fused::AddRmsNormQuantFp8 { eps } => {
                let outs = Fused::AddRmsNorm { eps: *eps }.infer(tys)?;
                let mut q = fp8::activation_quantize().infer(&[&outs[1]])?;
                q.insert(0, outs[0].clone());
                Ok(q)
            }
            Fused::SwiGluQuantFp8 => {
                let y = Fused::SwiGlu.infer(tys)?;
                fp8::activation_quantize().infer(&[&y[0]])
            }
        }
    }

    /// Reference evaluation. `out` holds the output types with their concrete shapes; operands
    /// have been type-checked by `infer`, so only data-dependent problems (an expert index out
    /// of range) remain to report.
    pub fn eval(&self, args: &[&Tensor], out: &[(TensorType, Vec<usize>)]) -> Result<Vec<Tensor>, String> {
        match self {
            Fused::RmsNorm { eps } => norm::rms_norm(*eps, args, out),
            Fused::AddRmsNorm { eps } => norm::add_rms_norm(*eps, args, out),
            Fused::NormMatmul { eps, .. } => norm::norm_matmul(*eps, args, out),
            Fused::SwiGlu => norm::swiglu(args, out),
            Fused::Softmax => norm::softmax(args, out),
            Fused::QkNormRope { eps, rotary } => norm::qk_norm_rope(*eps, *rotary, args, out),
            Fused::FlashAttention { scale } => attention::flash_attention(*scale, args, out),
            Fused::LinearAttnChunk { chunk } => linear_attn::chunked(*chunk, args, out),
            Fused::LinearAttnStep => linear_attn::stepwise(args, out),
            Fused::GroupNormGate { groups, eps } => linear_attn::group_norm_gate(*groups, *eps, args, out),
            Fused::LinearAttnGate { chunk, groups, eps } => linear_attn::gated(*chunk, *groups, *eps, args, out),
            Fused::LinearAttnQkGate {
                groups,
                eps,
                qk_eps,
                rotary,
                scale,
            } => linear_attn::qk_gated((*groups, *eps), (*qk_eps, *rotary, *scale), args, out),
            Fused::RouteTopK {
                k,
                n_group,
                topk_group,
                scale,
                normalize,
                biased,
            } => moe::route_topk(*k, *n_group, *topk_group, *scale, *normalize, *biased, args, out),
            Fused::GroupedMatmul { epilogue } => moe::grouped_matmul(*epilogue, args, out),
            Fused::QuantizeFp8 { rows, cols } => fp8::quantize(*rows, *cols, args, out),
            Fused::DequantizeFp8 { rows, cols, to } => fp8::dequantize(*rows, *cols, *to, args, out),
            Fused::ScaledMatmulFp8 { out: to } => fp8::scaled_matmul(*to, args, out),
            Fused::RmsNormQuantFp8 { eps } => fp8::rms_norm_quant(*eps, args, out),
            Fused::AddRmsNormQuantFp8 { eps } => fp8::add_rms_norm_quant(*eps, args, out),
            Fused::SwiGluQuantFp8 => fp8::swiglu_quant(args, out),
        }
    }
}

/// `ceil(d / k)` of a constant dim; symbolic dims must be divisible.
fn ceil_div(d: &Dim, k: usize) -> Result<Dim, String> {
    if k == 0 {
        return Err("a block size of 0".into());
    }
    match d.as_const() {
        Some(c) => Ok(Dim::constant((c + k as i64 - 1) / k as i64)),
        None => d
            .div_const(k as i64)
            .ok_or_else(|| format!("{} is not a multiple of {k}", d)),
    }
}

impl fmt::Display for Fused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
