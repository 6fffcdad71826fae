#!/usr/bin/env python3
"""Independent float64 numpy reference ("oracle") for Ring-linear 2.0.

Model: Ring-mini-linear-2.0 / Ring-flash-linear-2.0, HF model_type
`bailing_moe_linear` (BailingMoeLinearV2ForCausalLM).

Written only from the project spec /work/shared/spec/ring-linear.md; section
numbers in comments (e.g. "§2.4.4") refer to that document.  The only
third-party dependency is numpy.  All arithmetic is float64.

CLI:
    python3 ring_ref.py --model DIR --tokens 3,17,5 [--decode-from N]
                        [--chunk-size C] --out FILE.npy

writes float32 logits for every position, shape [T, vocab_size].

Without --decode-from: one causal forward over all T tokens (linear layers use
the chunked form of §4.3).  With --decode-from N (1 <= N <= T): the first N
tokens are a prefill that produces per-layer state (recurrent state S [H,d,d]
for linear layers, KV cache of post-QK-norm/post-RoPE keys and values for
softmax layers); the remaining T-N tokens are then fed one at a time through
that state (recurrent step of §4.2, attention over the cache).  The output is
the concatenation of prefill logits and each decode step's logits.
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np


class RefError(Exception):
    """A user-facing error (bad config, missing tensor, bad arguments)."""


# ---------------------------------------------------------------------------
# safetensors reader (own implementation)
#   file = u64 little-endian header length N | N bytes JSON header | raw data
#   header: {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}
#   offsets are relative to the first byte after the header.
# ---------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),  # decoded as (uint16 << 16) viewed as float32
}


def read_safetensors_header(path):
    """Return (header_dict_without_metadata, data_start_byte)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise RefError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        hdr = f.read(n)
        if len(hdr) != n:
            raise RefError(f"{path}: truncated safetensors header")
    header = json.loads(hdr.decode("utf-8"))
    header.pop("__metadata__", None)
    return header, 8 + n


def decode_safetensor(raw_bytes, dtype, shape):
    """Decode raw little-endian bytes of one tensor to a float32/float64 array."""
    if dtype not in _ST_DTYPES:
        raise RefError(f"unsupported safetensors dtype {dtype!r} "
                       f"(supported: {sorted(_ST_DTYPES)})")
    np_dtype, size = _ST_DTYPES[dtype]
    count = int(np.prod(shape)) if len(shape) else 1
    if len(raw_bytes) != count * size:
        raise RefError(f"tensor byte size {len(raw_bytes)} does not match "
                       f"shape {shape} x {dtype}")
    a = np.frombuffer(raw_bytes, dtype=np_dtype)
    if dtype == "BF16":
        a = (a.astype(np.uint32) << 16).view(np.float32)
    elif dtype == "F16":
        a = a.astype(np.float32)
    return a.reshape(shape)


def load_safetensors(path):
    """Load every tensor of one .safetensors file -> {name: ndarray}."""
    header, start = read_safetensors_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            b, e = info["data_offsets"]
            f.seek(start + b)
            out[name] = decode_safetensor(f.read(e - b), info["dtype"], info["shape"])
    return out


class TensorStore:
    """Lazy tensor access for a model directory.

    Supports a single `model.safetensors`, or a sharded checkpoint described
    by `model.safetensors.index.json` ({"weight_map": {name: shard_file}}).
    Tensors are returned as float64 and cached.
    """

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self._where = {}   # name -> (path, info, data_start)
        self._cache = {}
        single = os.path.join(model_dir, "model.safetensors")
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(single):
            files = [single]
            wanted = None
        elif os.path.exists(index):
            with open(index) as f:
                wmap = json.load(f).get("weight_map")
            if not isinstance(wmap, dict):
                raise RefError(f"{index}: no 'weight_map' object")
            files = sorted({os.path.join(model_dir, v) for v in wmap.values()})
            wanted = {k: os.path.join(model_dir, v) for k, v in wmap.items()}
        else:
            raise RefError(f"{model_dir}: neither model.safetensors nor "
                           f"model.safetensors.index.json found")
        for path in files:
            header, start = read_safetensors_header(path)
            for name, info in header.items():
                if wanted is not None and wanted.get(name) != path:
                    continue  # index is authoritative for sharded checkpoints
                self._where[name] = (path, info, start)
        if wanted is not None:
            missing = [k for k in wanted if k not in self._where]
            if missing:
                raise RefError(f"index.json lists tensors absent from their shard: "
                               f"{missing[:5]}")

    def names(self):
        return sorted(self._where)

    def has(self, name):
        return name in self._where

    def get(self, name, shape=None):
        """Tensor `name` as float64; optionally check its shape."""
        if name not in self._cache:
            if name not in self._where:
                raise RefError(f"checkpoint has no tensor {name!r}")
            path, info, start = self._where[name]
            b, e = info["data_offsets"]
            with open(path, "rb") as f:
                f.seek(start + b)
                raw = f.read(e - b)
            self._cache[name] = decode_safetensor(
                raw, info["dtype"], info["shape"]).astype(np.float64)
        t = self._cache[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise RefError(f"tensor {name!r} has shape {list(t.shape)}, "
                           f"expected {list(shape)} from config.json")
        return t


# ---------------------------------------------------------------------------
# Config (§1, §6).  Every size comes from config.json.
# ---------------------------------------------------------------------------

class RingConfig:
    REQUIRED = [
        "vocab_size", "hidden_size", "num_hidden_layers", "layer_group_size",
        "num_attention_heads", "num_key_value_heads", "partial_rotary_factor",
        "rope_theta", "rms_norm_eps", "group_norm_size", "first_k_dense_replace",
        "intermediate_size", "num_experts", "n_group", "topk_group",
        "num_experts_per_tok", "num_shared_experts", "moe_intermediate_size",
        "moe_shared_expert_intermediate_size", "routed_scaling_factor",
        "norm_topk_prob",
    ]

    def __init__(self, cfg):
        def req(key):
            if key not in cfg or cfg[key] is None:
                raise RefError(f"config.json: missing required key {key!r}")
            return cfg[key]

        for k in self.REQUIRED:
            req(k)
        self.raw = cfg
        self.vocab_size = int(cfg["vocab_size"])
        self.hidden_size = int(cfg["hidden_size"])
        self.num_layers = int(cfg["num_hidden_layers"])
        self.layer_group_size = int(cfg["layer_group_size"])
        self.num_heads = int(cfg["num_attention_heads"])
        self.num_kv_heads = int(cfg["num_key_value_heads"])
        # head_dim: if absent, the usual HF fallback hidden_size // heads.
        self.head_dim = int(cfg.get("head_dim") or self.hidden_size // self.num_heads)
        self.partial_rotary_factor = float(cfg["partial_rotary_factor"])
        self.rope_theta = float(cfg["rope_theta"])
        self.rms_norm_eps = float(cfg["rms_norm_eps"])
        self.group_norm_size = int(cfg["group_norm_size"])
        self.first_k_dense_replace = int(cfg["first_k_dense_replace"])
        self.intermediate_size = int(cfg["intermediate_size"])
        self.num_experts = int(cfg["num_experts"])
        self.n_group = int(cfg["n_group"])
        self.topk_group = int(cfg["topk_group"])
        self.top_k = int(cfg["num_experts_per_tok"])
        self.num_shared_experts = int(cfg["num_shared_experts"])
        self.moe_intermediate_size = int(cfg["moe_intermediate_size"])
        self.moe_shared_intermediate_size = int(cfg["moe_shared_expert_intermediate_size"])
        self.routed_scaling_factor = float(cfg["routed_scaling_factor"])
        self.norm_topk_prob = bool(cfg["norm_topk_prob"])
        # Optional keys with the spec's values as defaults.
        self.use_qk_norm = bool(cfg.get("use_qk_norm", True))
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.use_expert_bias = bool(cfg.get("moe_router_enable_expert_bias", True))

        conv = cfg.get("ringjit_decay_convention", "A")
        if conv is None:
            conv = "A"
        if conv not in ("A", "B"):
            raise RefError(f"config.json: ringjit_decay_convention must be \"A\" or "
                           f"\"B\" (got {conv!r})")
        self.decay_convention = conv

        # Features the spec does not define for this model -> refuse, don't guess.
        if cfg.get("rope_scaling") not in (None, {}):
            raise RefError("config.json: rope_scaling is not null; only plain RoPE "
                           "(§2.5) is implemented")
        if cfg.get("linear_silu", False):
            raise RefError("config.json: linear_silu=true is not supported "
                           "(§2.4.2: behaviour differs between implementations)")
        if cfg.get("use_bias", False) or cfg.get("use_qkv_bias", False):
            raise RefError("config.json: use_bias/use_qkv_bias=true not supported")
        if cfg.get("score_function", "sigmoid") != "sigmoid":
            raise RefError("config.json: only score_function 'sigmoid' is supported")

        # Derived sizes and sanity checks.
        rd = self.head_dim * self.partial_rotary_factor
        if abs(rd - round(rd)) > 1e-9:
            raise RefError("head_dim * partial_rotary_factor is not an integer")
        self.rotary_dim = int(round(rd))
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise RefError(f"rotary_dim {self.rotary_dim} must be even and <= head_dim")
        if self.num_heads % self.num_kv_heads:
            raise RefError("num_attention_heads must be a multiple of num_key_value_heads")
        if (self.num_heads * self.head_dim) % self.group_norm_size:
            raise RefError("group_norm_size must divide num_attention_heads*head_dim")
        if self.layer_group_size < 1:
            raise RefError("layer_group_size must be >= 1")
        if any(not self.is_dense_mlp(l) for l in range(self.num_layers)):
            if self.num_experts % self.n_group:
                raise RefError("num_experts must be divisible by n_group")
            if not 1 <= self.topk_group <= self.n_group:
                raise RefError("topk_group must be in [1, n_group]")
            epg = self.num_experts // self.n_group
            if self.top_k > self.topk_group * epg:
                raise RefError("num_experts_per_tok > topk_group * experts per group")

    # §1.3 layer schedule
    def is_softmax_layer(self, l):
        return is_softmax_layer(l, self.num_layers, self.layer_group_size)

    def is_dense_mlp(self, l):
        return l < self.first_k_dense_replace


def is_softmax_layer(l, num_layers, group_size):
    """§1.3: softmax iff (l+1) % G == 0, or l is a trailing layer >= floor(L/G)*G."""
    return (l + 1) % group_size == 0 or l >= (num_layers // group_size) * group_size


# ---------------------------------------------------------------------------
# Decay (§2.4.4)
# ---------------------------------------------------------------------------

def _pow2_slopes(n):
    # base_h = 2^(-8(h+1)/n), h = 0..n-1   (start = ratio = 2^(-8/n))
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]


def alibi_slopes(num_heads):
    """ALiBi-style power-law slopes base_h (§2.4.4), incl. non-power-of-two rule.

    Non-power-of-two H: the p = 2^floor(log2 H) list, then entries 0,2,4,... of
    the 2p list until H entries.
    """
    if num_heads < 1:
        raise RefError("num_heads must be >= 1")
    p = 1 << (num_heads.bit_length() - 1)  # 2^floor(log2 H)
    slopes = _pow2_slopes(p)
    if p != num_heads:
        slopes += _pow2_slopes(2 * p)[0::2][: num_heads - p]
    return np.array(slopes, dtype=np.float64)


def decay_layer_factor(l, num_layers, convention="A"):
    """f(l) of §2.4.4.  (A) 1 - l/(L-1) + 1e-5 ; (B) 1 - (l-1)/(L-1) + 1e-5.
    For L <= 1 both give 1 + 1e-5 (spec states this for A; B extended likewise)."""
    if convention not in ("A", "B"):
        raise RefError(f"decay convention must be 'A' or 'B', got {convention!r}")
    if num_layers <= 1:
        return 1.0 + 1e-5
    if convention == "A":
        return 1.0 - l / (num_layers - 1) + 1e-5
    return 1.0 - (l - 1) / (num_layers - 1) + 1e-5


def linear_decay(num_heads, l, num_layers, convention="A"):
    """lambda_h = exp(-base_h * f(l)) for every head h of layer l."""
    return np.exp(-alibi_slopes(num_heads) * decay_layer_factor(l, num_layers, convention))


# ---------------------------------------------------------------------------
# Elementary ops
# ---------------------------------------------------------------------------

def rms_norm(x, w, eps):
    """§2.2  w * x / sqrt(mean(x^2) + eps) over the last axis."""
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def group_rms_norm(x, w, num_groups, eps):
    """§2.4.5  RMS-normalise each of `num_groups` contiguous channel groups of
    the last axis independently, then multiply by the full-width weight."""
    shp = x.shape
    xg = x.reshape(shp[:-1] + (num_groups, shp[-1] // num_groups))
    xg = xg / np.sqrt(np.mean(xg * xg, axis=-1, keepdims=True) + eps)
    return w * xg.reshape(shp)


def sigmoid(z):
    """Numerically safe logistic function."""
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def silu(z):
    return z * sigmoid(z)


def swiglu(x, w_gate, w_up, w_down):
    """§2.6/§2.7  down( silu(gate x) * (up x) ), no bias."""
    return (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def apply_rope(x, positions, rotary_dim, theta):
    """§2.5  NeoX (rotate-half) RoPE on the first rotary_dim dims of each head.

    x: [T, heads, d]; positions: [T] absolute token positions.
    theta_i = base^(-2i/r), i = 0..r/2-1.
    """
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    inv_freq = theta ** (-2.0 * np.arange(half, dtype=np.float64) / rotary_dim)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, r/2]
    cos = np.cos(ang)[:, None, :]
    sin = np.sin(ang)[:, None, :]
    x1 = x[..., :half]
    x2 = x[..., half:rotary_dim]
    out = x.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:rotary_dim] = x2 * cos + x1 * sin
    return out


# ---------------------------------------------------------------------------
# Lightning attention (§2.4.4, §4.2, §4.3)
#   q, k: [T, H, d]   v: [T, H, dv]   (q ALREADY scaled by s_q = d^-1/2)
#   lam: [H] decay in (0, 1];  S: [H, d, dv]
# ---------------------------------------------------------------------------

def lightning_decode_step(q_t, k_t, v_t, lam, S):
    """§4.2 one token:  S <- lam S + k^T v ;  o = q S.   q_t,k_t: [H,d], v_t: [H,dv].
    Returns (o_t [H, dv], new S)."""
    S = lam[:, None, None] * S + k_t[:, :, None] * v_t[:, None, :]
    o = np.einsum("hd,hde->he", q_t, S)
    return o, S


def lightning_attention_recurrent(q, k, v, lam, S0=None):
    """Plain token recurrence (§2.4.4): loop of lightning_decode_step.
    Returns (o [T, H, dv], final S [H, d, dv])."""
    T, H, d = q.shape
    dv = v.shape[-1]
    S = np.zeros((H, d, dv)) if S0 is None else np.array(S0, dtype=np.float64)
    out = np.empty((T, H, dv))
    for t in range(T):
        out[t], S = lightning_decode_step(q[t], k[t], v[t], lam, S)
    return out, S


def lightning_attention_chunked(q, k, v, lam, S0=None, chunk_size=16):
    """§4.3 chunked (parallel) form; ragged last chunk; optional incoming state.

    Per chunk n of length c (c = chunk_size except possibly the last), rows i,j:
        M_ij    = lam^(i-j) if i >= j else 0
        O_intra = ((Q K^T) * M) V
        O_inter = diag(lam^(i+1)) Q S_prev
        S_new   = lam^c S_prev + (diag(lam^(c-1-j)) K)^T V
    Returns (o [T, H, dv], final S [H, d, dv]).
    """
    if chunk_size < 1:
        raise RefError("chunk_size must be >= 1")
    T, H, d = q.shape
    dv = v.shape[-1]
    lam = np.asarray(lam, dtype=np.float64)
    S = np.zeros((H, d, dv)) if S0 is None else np.array(S0, dtype=np.float64)
    out = np.empty((T, H, dv))
    for n0 in range(0, T, chunk_size):
        c = min(chunk_size, T - n0)
        Qn = q[n0:n0 + c].transpose(1, 0, 2)  # [H, c, d]
        Kn = k[n0:n0 + c].transpose(1, 0, 2)  # [H, c, d]
        Vn = v[n0:n0 + c].transpose(1, 0, 2)  # [H, c, dv]
        i = np.arange(c)
        diff = i[:, None] - i[None, :]                                  # i - j
        M = np.where(diff >= 0,
                     lam[:, None, None] ** np.maximum(diff, 0)[None], 0.0)  # [H, c, c]
        o_intra = ((Qn @ Kn.transpose(0, 2, 1)) * M) @ Vn
        o_inter = (lam[:, None] ** (i + 1)[None, :])[:, :, None] * (Qn @ S)
        out[n0:n0 + c] = (o_intra + o_inter).transpose(1, 0, 2)
        k_dec = (lam[:, None] ** (c - 1 - i)[None, :])[:, :, None] * Kn  # [H, c, d]
        S = (lam ** c)[:, None, None] * S + k_dec.transpose(0, 2, 1) @ Vn
    return out, S


# ---------------------------------------------------------------------------
# Softmax attention (§2.3): causal GQA SDPA, scale d^-1/2.
# ---------------------------------------------------------------------------

def softmax_attention(q, k, v, q_start):
    """q: [T, H, d]; k, v: [Tk, Hkv, d] (cache incl. current tokens, key j at
    position j); query i is at absolute position q_start + i and sees keys
    j <= q_start + i.  Query head h uses kv head h // (H / Hkv)."""
    T, H, d = q.shape
    Tk, Hkv, _ = k.shape
    rep = H // Hkv
    kv_of_head = np.arange(H) // rep
    kh = k[:, kv_of_head, :]  # [Tk, H, d]
    vh = v[:, kv_of_head, :]
    scores = np.einsum("thd,shd->hts", q, kh) / math.sqrt(d)
    qpos = q_start + np.arange(T)
    mask = np.arange(Tk)[None, :] <= qpos[:, None]  # [T, Tk]
    scores = np.where(mask[None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, vh)


# ---------------------------------------------------------------------------
# MoE router (§2.6), float64.
# ---------------------------------------------------------------------------

def moe_route(x, w_gate, expert_bias, n_group, topk_group, top_k,
              norm_topk_prob, routed_scaling_factor):
    """Group-limited sigmoid routing with aux-loss-free bias.

    x: [T, D]; w_gate: [E, D]; expert_bias: [E] or None.
    Returns (idx [T, K] int, weights [T, K], kept_groups [T, n_group] bool).
    Ties: lower expert / group index wins (stable sort on negated score).
    """
    scores = sigmoid(x @ w_gate.T)                      # unbiased sigma, [T, E]
    biased = scores if expert_bias is None else scores + expert_bias[None, :]
    T, E = scores.shape
    epg = E // n_group
    grouped = biased.reshape(T, n_group, epg)
    # 1. group score = sum of the top-2 biased scores in each group
    group_scores = -np.sort(-grouped, axis=-1)[..., :min(2, epg)].sum(axis=-1)
    # 2. keep topk_group best groups, other experts -> -inf
    top_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
    kept = np.zeros((T, n_group), dtype=bool)
    np.put_along_axis(kept, top_groups, True, axis=-1)
    masked = np.where(np.repeat(kept, epg, axis=1), biased, -np.inf)
    # 3. top-k experts by biased score among remaining
    idx = np.argsort(-masked, axis=-1, kind="stable")[:, :top_k]
    # weights from UNBIASED scores
    w = np.take_along_axis(scores, idx, axis=-1)
    if norm_topk_prob:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return idx, w * routed_scaling_factor, kept


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

class RingLinearModel:
    """float64 Ring-linear 2.0 forward.

    State (from new_state): {"pos": int, "layers": [per-layer dict]} where a
    linear layer holds {"S": [H, d, d]} and a softmax layer holds
    {"k": [Tc, Hkv, d], "v": [Tc, Hkv, d]} (post-QK-norm, post-RoPE keys).
    """

    def __init__(self, cfg, store):
        self.cfg = cfg
        self.store = store
        c = cfg
        D, H, Hkv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.emb = store.get("model.word_embeddings.weight", (c.vocab_size, D))
        self.final_norm = store.get("model.norm.weight", (D,))
        if store.has("lm_head.weight") or not c.tie_word_embeddings:
            self.lm_head = store.get("lm_head.weight", (c.vocab_size, D))
        else:
            self.lm_head = self.emb
        self.layers = []
        for l in range(c.num_layers):
            p = f"model.layers.{l}."
            g = lambda n, shape: store.get(p + n, shape)  # noqa: E731
            L = {"in_norm": g("input_layernorm.weight", (D,)),
                 "post_norm": g("post_attention_layernorm.weight", (D,))}
            if c.use_qk_norm:
                L["q_norm"] = g("attention.query_layernorm.weight", (d,))
                L["k_norm"] = g("attention.key_layernorm.weight", (d,))
            if c.is_softmax_layer(l):
                L["kind"] = "softmax"
                L["qkv"] = g("attention.query_key_value.weight", ((H + 2 * Hkv) * d, D))
                L["dense"] = g("attention.dense.weight", (D, H * d))
            else:
                L["kind"] = "linear"  # MHA: K,V have H heads (§2.4)
                L["qkv"] = g("attention.query_key_value.weight", (3 * H * d, D))
                L["g_proj"] = g("attention.g_proj.weight", (H * d, D))
                L["g_norm"] = g("attention.g_norm.weight", (H * d,))
                L["dense"] = g("attention.dense.weight", (D, H * d))
                L["lam"] = linear_decay(H, l, c.num_layers, c.decay_convention)
            if c.is_dense_mlp(l):
                I = c.intermediate_size
                L["mlp"] = (g("mlp.gate_proj.weight", (I, D)), g("mlp.up_proj.weight", (I, D)),
                            g("mlp.down_proj.weight", (D, I)))
            else:
                Im, E = c.moe_intermediate_size, c.num_experts
                L["router"] = g("mlp.gate.weight", (E, D))
                L["expert_bias"] = (g("mlp.gate.expert_bias", (E,))
                                    if c.use_expert_bias else None)
                L["experts"] = [(g(f"mlp.experts.{e}.gate_proj.weight", (Im, D)),
                                 g(f"mlp.experts.{e}.up_proj.weight", (Im, D)),
                                 g(f"mlp.experts.{e}.down_proj.weight", (D, Im)))
                                for e in range(E)]
                Is = c.num_shared_experts * c.moe_shared_intermediate_size
                L["shared"] = None if Is == 0 else (
                    g("mlp.shared_experts.gate_proj.weight", (Is, D)),
                    g("mlp.shared_experts.up_proj.weight", (Is, D)),
                    g("mlp.shared_experts.down_proj.weight", (D, Is)))
            self.layers.append(L)

    @classmethod
    def from_dir(cls, model_dir):
        path = os.path.join(model_dir, "config.json")
        if not os.path.exists(path):
            raise RefError(f"{path} not found")
        with open(path) as f:
            cfg = RingConfig(json.load(f))
        return cls(cfg, TensorStore(model_dir))

    # -- state ---------------------------------------------------------------
    def new_state(self):
        c = self.cfg
        layers = []
        for L in self.layers:
            if L["kind"] == "linear":
                layers.append({"S": np.zeros((c.num_heads, c.head_dim, c.head_dim))})
            else:
                z = np.zeros((0, c.num_kv_heads, c.head_dim))
                layers.append({"k": z, "v": z.copy()})
        return {"pos": 0, "layers": layers}

    # -- attention blocks ----------------------------------------------------
    def _qk_norm_rope(self, L, q, k, positions):
        c = self.cfg
        if c.use_qk_norm:  # per-head RMSNorm over d, weight shared by heads
            q = rms_norm(q, L["q_norm"], c.rms_norm_eps)
            k = rms_norm(k, L["k_norm"], c.rms_norm_eps)
        q = apply_rope(q, positions, c.rotary_dim, c.rope_theta)
        k = apply_rope(k, positions, c.rotary_dim, c.rope_theta)
        return q, k

    def _softmax_attn(self, L, x, positions, st):
        """§2.3; appends this block's keys/values to the layer's KV cache."""
        c = self.cfg
        T, H, Hkv, d = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        qkv = x @ L["qkv"].T                       # [Q_all | K_all | V_all]
        q = qkv[:, :H * d].reshape(T, H, d)
        k = qkv[:, H * d:(H + Hkv) * d].reshape(T, Hkv, d)
        v = qkv[:, (H + Hkv) * d:].reshape(T, Hkv, d)
        q, k = self._qk_norm_rope(L, q, k, positions)
        st["k"] = np.concatenate([st["k"], k], axis=0)
        st["v"] = np.concatenate([st["v"], v], axis=0)
        o = softmax_attention(q, st["k"], st["v"], int(positions[0]))
        return o.reshape(T, H * d) @ L["dense"].T

    def _linear_attn(self, L, x, positions, st, decode, chunk_size):
        """§2.4; updates the layer's recurrent state."""
        c = self.cfg
        T, H, d = x.shape[0], c.num_heads, c.head_dim
        qkv = x @ L["qkv"].T                       # [Q_all | K_all | V_all], MHA
        q = qkv[:, :H * d].reshape(T, H, d)
        k = qkv[:, H * d:2 * H * d].reshape(T, H, d)
        v = qkv[:, 2 * H * d:].reshape(T, H, d)
        q, k = self._qk_norm_rope(L, q, k, positions)   # §2.4.3: QK-norm then RoPE
        q = q / math.sqrt(d)                            # s_q = d^-1/2
        if decode:   # §4.2 recurrent step(s)
            o, st["S"] = lightning_attention_recurrent(q, k, v, L["lam"], st["S"])
        else:        # §4.3 chunked form
            o, st["S"] = lightning_attention_chunked(q, k, v, L["lam"], st["S"], chunk_size)
        o = o.reshape(T, H * d)                                        # head-major
        y = group_rms_norm(o, L["g_norm"], c.group_norm_size, c.rms_norm_eps)  # §2.4.5
        y = y * sigmoid(x @ L["g_proj"].T)              # gate from normed layer input
        return y @ L["dense"].T

    # -- MLP blocks ----------------------------------------------------------
    def _moe(self, L, x):
        """§2.6: routed experts + shared expert."""
        c = self.cfg
        idx, w, _ = moe_route(x, L["router"], L["expert_bias"], c.n_group, c.topk_group,
                              c.top_k, c.norm_topk_prob, c.routed_scaling_factor)
        out = np.zeros_like(x)
        for e in np.unique(idx):
            rows, slots = np.nonzero(idx == e)
            out[rows] += w[rows, slots][:, None] * swiglu(x[rows], *L["experts"][e])
        if L["shared"] is not None:
            out += swiglu(x, *L["shared"])
        return out

    # -- forward over a block of tokens --------------------------------------
    def forward_block(self, tokens, state, decode=False, chunk_size=16):
        """Run `tokens` (positions state["pos"] ...) through the model, updating
        `state` in place; returns logits [T, vocab] (float64).
        decode=True uses the token recurrence for linear layers (§4.2)."""
        c = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise RefError("need a non-empty 1-D token list")
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise RefError(f"token id out of range [0, {c.vocab_size})")
        positions = state["pos"] + np.arange(len(tokens))
        h = self.emb[tokens]                               # §2.1, no scale
        for L, st in zip(self.layers, state["layers"]):
            x = rms_norm(h, L["in_norm"], c.rms_norm_eps)
            if L["kind"] == "softmax":
                a = self._softmax_attn(L, x, positions, st)
            else:
                a = self._linear_attn(L, x, positions, st, decode, chunk_size)
            h = h + a
            x = rms_norm(h, L["post_norm"], c.rms_norm_eps)
            h = h + (swiglu(x, *L["mlp"]) if "mlp" in L else self._moe(L, x))
        state["pos"] += len(tokens)
        return rms_norm(h, self.final_norm, c.rms_norm_eps) @ self.lm_head.T

    def forward(self, tokens, chunk_size=16):
        """One full causal forward; logits [T, vocab]."""
        return self.forward_block(tokens, self.new_state(), False, chunk_size)

    def prefill(self, tokens, chunk_size=16, state=None):
        """Returns (logits, state)."""
        state = self.new_state() if state is None else state
        return self.forward_block(tokens, state, False, chunk_size), state

    def decode_step(self, token, state):
        """One token through the state; logits [vocab]."""
        return self.forward_block([token], state, decode=True)[0]


def run_tokens(model, tokens, decode_from=None, chunk_size=16):
    """Logits [T, vocab] (float64): full forward, or prefill(N) + decode steps."""
    tokens = list(tokens)
    if decode_from is None:
        return model.forward(tokens, chunk_size)
    if not 1 <= decode_from <= len(tokens):
        raise RefError(f"--decode-from must be in [1, {len(tokens)}]")
    logits, state = model.prefill(tokens[:decode_from], chunk_size)
    rows = [logits] + [model.decode_step(t, state)[None] for t in tokens[decode_from:]]
    return np.concatenate(rows, axis=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory (config.json + safetensors)")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--decode-from", type=int, default=None,
                    help="prefill the first N tokens, then decode the rest one by one")
    ap.add_argument("--chunk-size", type=int, default=16,
                    help="chunk size of the chunked lightning attention (default 16)")
    ap.add_argument("--out", required=True, help="output .npy (float32 [T, vocab])")
    args = ap.parse_args(argv)
    try:
        try:
            tokens = [int(t) for t in args.tokens.replace(" ", "").split(",") if t != ""]
        except ValueError:
            raise RefError(f"bad --tokens {args.tokens!r}")
        model = RingLinearModel.from_dir(args.model)
        logits = run_tokens(model, tokens, args.decode_from, args.chunk_size)
    except RefError as e:
        print(f"ring_ref: error: {e}", file=sys.stderr)
        return 2
    np.save(args.out, logits.astype(np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
