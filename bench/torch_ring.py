#!/usr/bin/env python3
"""Strong PyTorch baseline of the Ring-linear 2.0 hybrid model (ringjit).

Written from the project spec (/work/shared/spec/ring-linear.md, section numbers
in comments).  Two modes:

  --check   tiny config, float32, pure-PyTorch path (CPU or GPU) compared with the
            numpy float64 oracle tests/reference/ring_ref.py on the same random
            weights (full forward, and prefill + token-by-token decode).  With
            CUDA available it also checks the fast path (fla kernels, grouped GEMM,
            CUDA-graph decode) in bf16 against the same oracle.
  --bench   timed baseline for a config on the GPU: decode ms/step at batch 1 and
            batch 64 with a 4K context in the KV cache / state (CUDA graph), prefill
            tokens/s at 4K tokens batch 1, each the median of many CUDA-event-timed
            runs after warm-up, with the fraction of the physical floor (perf.md).
            Writes a JSON file (--json).

Fast path (what a skilled PyTorch user runs):
  * lightning layers: fla `chunk_simple_gla` (prefill) and `fused_recurrent_simple_gla`
    (decode) with head-wise constant log-decay `g_gamma` [H], f32 state;
  * softmax layers: torch SDPA (flash) with a preallocated KV cache, GQA;
  * routed experts: torch._grouped_mm on tokens sorted by expert on the device
    (offsets via searchsorted on the device: no host synchronisation);
  * decode step captured in one torch.cuda.CUDAGraph with static buffers;
  * optional torch.compile (inductor) of the small elementwise parts (--compile).
If fla cannot be imported the script says "fla unavailable" and uses its own
pure-PyTorch chunked / recurrent lightning attention.
"""

import argparse
import json
import math
import os
import statistics
import struct
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


class BenchError(Exception):
    pass


def die(msg):
    print(f"torch_ring: error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------
# Optional fla
# ---------------------------------------------------------------------------
FLA = {"ok": False, "why": "not tried", "version": None}


def try_import_fla():
    if FLA["why"] != "not tried":
        return FLA["ok"]
    try:
        import fla  # noqa: F401
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
        FLA.update(ok=True, why="", version=getattr(fla, "__version__", "?"),
                   chunk=chunk_simple_gla, recurrent=fused_recurrent_simple_gla)
        try:  # direct kernel access for an in-place state update (no extra copy)
            from fla.ops.common import fused_recurrent as fr_mod
            FLA["fr_mod"] = fr_mod
        except Exception:  # pragma: no cover
            FLA["fr_mod"] = None
    except Exception as e:  # ImportError or triton problems
        FLA.update(ok=False, why=f"{type(e).__name__}: {e}")
    return FLA["ok"]


# ---------------------------------------------------------------------------
# Config (§1)
# ---------------------------------------------------------------------------
class Cfg:
    def __init__(self, d, num_layers=None):
        def req(k):
            if k not in d or d[k] is None:
                raise BenchError(f"config: missing key {k!r}")
            return d[k]
        self.raw = dict(d)
        self.V = int(req("vocab_size"))
        self.D = int(req("hidden_size"))
        self.L = int(req("num_hidden_layers"))
        self.G = int(req("layer_group_size"))
        self.H = int(req("num_attention_heads"))
        self.Hkv = int(req("num_key_value_heads"))
        self.d = int(d.get("head_dim") or self.D // self.H)
        self.r = int(round(self.d * float(req("partial_rotary_factor"))))
        self.theta = float(req("rope_theta"))
        self.eps = float(req("rms_norm_eps"))
        self.ngroups_norm = int(req("group_norm_size"))
        self.first_dense = int(req("first_k_dense_replace"))
        self.I = int(req("intermediate_size"))
        self.E = int(req("num_experts"))
        self.n_group = int(req("n_group"))
        self.topk_group = int(req("topk_group"))
        self.K = int(req("num_experts_per_tok"))
        self.Im = int(req("moe_intermediate_size"))
        self.Is = int(req("num_shared_experts")) * int(req("moe_shared_expert_intermediate_size"))
        self.rsf = float(req("routed_scaling_factor"))
        self.norm_topk = bool(req("norm_topk_prob"))
        self.use_qk_norm = bool(d.get("use_qk_norm", True))
        self.use_bias = bool(d.get("moe_router_enable_expert_bias", True))
        self.tied = bool(d.get("tie_word_embeddings", False))
        self.conv = d.get("ringjit_decay_convention") or "A"
        if self.conv not in ("A", "B"):
            raise BenchError("ringjit_decay_convention must be A or B")
        if d.get("rope_scaling") not in (None, {}):
            raise BenchError("rope_scaling is not supported")
        if d.get("linear_silu", False) or d.get("use_bias", False) or d.get("use_qkv_bias", False):
            raise BenchError("linear_silu / use_bias / use_qkv_bias not supported")
        if d.get("score_function", "sigmoid") != "sigmoid":
            raise BenchError("only sigmoid routing is supported")
        if self.r % 2 or self.H % self.Hkv or (self.H * self.d) % self.ngroups_norm:
            raise BenchError("bad head / rotary / group_norm_size configuration")
        self.L_full = self.L
        if num_layers is not None:
            self.L = int(num_layers)   # truncated model, same schedule and decay (of L_full)

    def is_softmax(self, l):  # §1.3
        return (l + 1) % self.G == 0 or l >= (self.L_full // self.G) * self.G

    def is_dense(self, l):
        return l < self.first_dense

    def log_decay(self, l):
        """§2.4.4 log(lambda_h) = -base_h * f(l) (float64 list)."""
        H = self.H
        p = 1 << (H.bit_length() - 1)
        base = [2.0 ** (-8.0 * (h + 1) / p) for h in range(p)]
        if p != H:
            base += [2.0 ** (-8.0 * (h + 1) / (2 * p)) for h in range(2 * p)][0::2][: H - p]
        Lf = self.L_full
        if Lf <= 1:
            f = 1.0 + 1e-5
        elif self.conv == "A":
            f = 1.0 - l / (Lf - 1) + 1e-5
        else:
            f = 1.0 - (l - 1) / (Lf - 1) + 1e-5
        return [-b * f for b in base]


# ---------------------------------------------------------------------------
# Weights: HF names (§3) -> fused runtime layout
# ---------------------------------------------------------------------------
def hf_weight_shapes(c):
    """{name: shape} of the HF checkpoint for config c (fp32 router bias)."""
    D, H, Hkv, d = c.D, c.H, c.Hkv, c.d
    s = {"model.word_embeddings.weight": (c.V, D), "model.norm.weight": (D,)}
    if not c.tied:
        s["lm_head.weight"] = (c.V, D)
    for l in range(c.L):
        p = f"model.layers.{l}."
        s[p + "input_layernorm.weight"] = (D,)
        s[p + "post_attention_layernorm.weight"] = (D,)
        if c.use_qk_norm:
            s[p + "attention.query_layernorm.weight"] = (d,)
            s[p + "attention.key_layernorm.weight"] = (d,)
        if c.is_softmax(l):
            s[p + "attention.query_key_value.weight"] = ((H + 2 * Hkv) * d, D)
        else:
            s[p + "attention.query_key_value.weight"] = (3 * H * d, D)
            s[p + "attention.g_proj.weight"] = (H * d, D)
            s[p + "attention.g_norm.weight"] = (H * d,)
        s[p + "attention.dense.weight"] = (D, H * d)
        if c.is_dense(l):
            s[p + "mlp.gate_proj.weight"] = (c.I, D)
            s[p + "mlp.up_proj.weight"] = (c.I, D)
            s[p + "mlp.down_proj.weight"] = (D, c.I)
        else:
            s[p + "mlp.gate.weight"] = (c.E, D)
            if c.use_bias:
                s[p + "mlp.gate.expert_bias"] = (c.E,)
            for e in range(c.E):
                q = p + f"mlp.experts.{e}."
                s[q + "gate_proj.weight"] = (c.Im, D)
                s[q + "up_proj.weight"] = (c.Im, D)
                s[q + "down_proj.weight"] = (D, c.Im)
            if c.Is:
                q = p + "mlp.shared_experts."
                s[q + "gate_proj.weight"] = (c.Is, D)
                s[q + "up_proj.weight"] = (c.Is, D)
                s[q + "down_proj.weight"] = (D, c.Is)
    return s


def random_hf_weights(c, seed, dtype=torch.float32, device="cpu", std=0.02):
    """HF-style random init: matrices N(0, std); norm weights 1 + N(0, 0.1);
    expert bias N(0, 0.02) (fp32)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    out = {}
    for name, shape in hf_weight_shapes(c).items():
        if name.endswith("expert_bias"):
            t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
        elif len(shape) == 1:
            t = (1.0 + 0.1 * torch.randn(shape, generator=g, device=device, dtype=torch.float32)).to(dtype)
        else:
            t = (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)
        out[name] = t
    return out


class Weights:
    """Runtime layout: fused projections, stacked experts [E, out, in]."""

    def __init__(self, c, get, dtype, device):
        """get(name) -> tensor (any dtype/device) or raises."""
        self.c = c
        cv = lambda n: get(n).to(device=device, dtype=dtype).contiguous()  # noqa: E731
        f32 = lambda n: get(n).to(device=device, dtype=torch.float32).contiguous()  # noqa: E731
        self.emb = cv("model.word_embeddings.weight")
        self.norm = cv("model.norm.weight")
        self.head = self.emb if c.tied else cv("lm_head.weight")
        self.layers = []
        for l in range(c.L):
            p = f"model.layers.{l}."
            W = {"in_norm": cv(p + "input_layernorm.weight"),
                 "post_norm": cv(p + "post_attention_layernorm.weight"),
                 "dense": cv(p + "attention.dense.weight")}
            if c.use_qk_norm:
                W["q_norm"] = cv(p + "attention.query_layernorm.weight")
                W["k_norm"] = cv(p + "attention.key_layernorm.weight")
            if c.is_softmax(l):
                W["kind"] = "softmax"
                W["qkv"] = cv(p + "attention.query_key_value.weight")
            else:
                W["kind"] = "linear"
                # one GEMM for [q | k | v | gate]
                W["qkvg"] = torch.cat([cv(p + "attention.query_key_value.weight"),
                                       cv(p + "attention.g_proj.weight")], 0).contiguous()
                W["g_norm"] = cv(p + "attention.g_norm.weight")
                W["g_gamma"] = torch.tensor(c.log_decay(l), dtype=torch.float32, device=device)
            if c.is_dense(l):
                W["mlp_gu"] = torch.cat([cv(p + "mlp.gate_proj.weight"), cv(p + "mlp.up_proj.weight")], 0)
                W["mlp_down"] = cv(p + "mlp.down_proj.weight")
            else:
                W["router"] = f32(p + "mlp.gate.weight")            # fp32 router (§2.6)
                W["bias"] = (f32(p + "mlp.gate.expert_bias") if c.use_bias
                             else torch.zeros(c.E, device=device))
                w13 = torch.empty(c.E, 2 * c.Im, c.D, dtype=dtype, device=device)
                w2 = torch.empty(c.E, c.D, c.Im, dtype=dtype, device=device)
                for e in range(c.E):
                    q = p + f"mlp.experts.{e}."
                    w13[e, :c.Im] = get(q + "gate_proj.weight").to(device=device, dtype=dtype)
                    w13[e, c.Im:] = get(q + "up_proj.weight").to(device=device, dtype=dtype)
                    w2[e] = get(q + "down_proj.weight").to(device=device, dtype=dtype)
                W["w13"], W["w2"] = w13, w2
                if c.Is:
                    q = p + "mlp.shared_experts."
                    W["sh_gu"] = torch.cat([cv(q + "gate_proj.weight"), cv(q + "up_proj.weight")], 0)
                    W["sh_down"] = cv(q + "down_proj.weight")
            self.layers.append(W)

    @classmethod
    def random_direct(cls, c, seed, dtype, device, std=0.02):
        """Random weights made directly in the runtime layout on `device`
        (for the big benchmark configs; same distribution as random_hf_weights)."""
        self = cls.__new__(cls)
        self.c = c
        g = torch.Generator(device=device)
        g.manual_seed(seed)

        def mat(*shape):
            t = torch.empty(shape, dtype=dtype, device=device)
            t.normal_(0.0, std, generator=g)
            return t

        def vec(n):
            t = torch.empty(n, dtype=torch.float32, device=device).normal_(0.0, 0.1, generator=g)
            return (t + 1.0).to(dtype)

        D, H, Hkv, d = c.D, c.H, c.Hkv, c.d
        self.emb = mat(c.V, D)
        self.norm = vec(D)
        self.head = self.emb if c.tied else mat(c.V, D)
        self.layers = []
        for l in range(c.L):
            W = {"in_norm": vec(D), "post_norm": vec(D), "dense": mat(D, H * d)}
            if c.use_qk_norm:
                W["q_norm"], W["k_norm"] = vec(d), vec(d)
            if c.is_softmax(l):
                W["kind"] = "softmax"
                W["qkv"] = mat((H + 2 * Hkv) * d, D)
            else:
                W["kind"] = "linear"
                W["qkvg"] = mat(4 * H * d, D)
                W["g_norm"] = vec(H * d)
                W["g_gamma"] = torch.tensor(c.log_decay(l), dtype=torch.float32, device=device)
            if c.is_dense(l):
                W["mlp_gu"] = mat(2 * c.I, D)
                W["mlp_down"] = mat(D, c.I)
            else:
                W["router"] = mat(c.E, D).float()
                W["bias"] = torch.empty(c.E, device=device).normal_(0.0, 0.02, generator=g)
                W["w13"] = mat(c.E, 2 * c.Im, D)
                W["w2"] = mat(c.E, D, c.Im)
                if c.Is:
                    W["sh_gu"] = mat(2 * c.Is, D)
                    W["sh_down"] = mat(D, c.Is)
            self.layers.append(W)
        return self


# ---------------------------------------------------------------------------
# safetensors (own minimal reader / writer: F32, F16, BF16)
# ---------------------------------------------------------------------------
_ST = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_INV = {v: k for k, v in _ST.items()}


def save_safetensors(tensors, path):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _ST_INV:
            t = t.float()
        b = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_INV[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_checkpoint_dir(path):
    """{name: tensor} from model.safetensors or a sharded index (HF layout)."""
    files = []
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
        raise BenchError(f"{path}: no model.safetensors(.index.json)")
    out = {}
    for fn in files:
        with open(fn, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            data = f.read()
        for name, info in header.items():
            if info["dtype"] not in _ST:
                raise BenchError(f"{fn}: unsupported dtype {info['dtype']} for {name}")
            b, e = info["data_offsets"]
            t = torch.frombuffer(bytearray(data[b:e]), dtype=torch.uint8) if e > b else torch.empty(0, dtype=torch.uint8)
            out[name] = t.view(_ST[info["dtype"]]).reshape(info["shape"]).clone()
    return out


# ---------------------------------------------------------------------------
# Elementwise pieces (optionally torch.compile'd)
# ---------------------------------------------------------------------------
def rms_norm(x, w, eps):
    """§2.2: fp32 statistics, normalized value cast back to the input dtype, times w."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * w


def add_rms_norm(h, a, w, eps):
    h = h + a
    return h, rms_norm(h, w, eps)


def rope_half(x, cos, sin, r):
    """§2.5 NeoX rotate-half on the first r dims; x [..., T, heads, d] in fp32,
    cos/sin [T, r/2] broadcast over heads."""
    half = r // 2
    x1, x2, rest = x[..., :half], x[..., half:r], x[..., r:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)


def qk_norm_rope(q, k, wq, wk, cos, sin, eps, r, use_norm):
    """§2.4.3 / §2.3: per-head RMSNorm over d then partial RoPE (fp32 math).
    q [B,T,H,d], k [B,T,Hk,d] -> contiguous, input dtype."""
    dt = q.dtype
    if use_norm:
        q, k = rms_norm(q, wq, eps), rms_norm(k, wk, eps)
    q = rope_half(q.float(), cos, sin, r).to(dt)
    k = rope_half(k.float(), cos, sin, r).to(dt)
    return q.contiguous(), k.contiguous()


def gnorm_gate(o, gate, w, groups, eps):
    """§2.4.5: GroupRMSNorm over `groups` contiguous channel groups, * w, * sigmoid(gate)."""
    shp = o.shape
    of = o.float().reshape(*shp[:-1], groups, shp[-1] // groups)
    of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps)
    y = of.reshape(shp).to(gate.dtype) * w
    return y * torch.sigmoid(gate)


def silu_mul(h):
    n = h.shape[-1] // 2
    return F.silu(h[..., :n]) * h[..., n:]


def route(x, w_router, bias, n_group, topk_group, K, norm_topk, rsf):
    """§2.6 router, fp32: sigmoid scores, bias for selection only, group-limited
    top-k (group score = sum of top-2), weights from unbiased scores."""
    T = x.shape[0]
    E = w_router.shape[0]
    s = torch.sigmoid(x.float() @ w_router.t())
    sb = s + bias
    gs = sb.view(T, n_group, E // n_group)
    gscore = gs.topk(min(2, E // n_group), dim=-1).values.sum(-1)          # [T, n_group]
    gidx = gscore.topk(topk_group, dim=-1).indices
    gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gidx, True)
    emask = gmask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
    sb = sb.masked_fill(~emask, float("-inf"))
    idx = sb.topk(K, dim=-1).indices                                       # [T, K]
    w = s.gather(1, idx)
    if norm_topk:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * rsf


FN = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "qk_norm_rope": qk_norm_rope,
      "gnorm_gate": gnorm_gate, "silu_mul": silu_mul, "route": route}
COMPILED = {"on": False, "why": "off"}


def enable_compile():
    try:
        import torch._dynamo
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        for k in list(FN):
            FN[k] = torch.compile(FN[k], dynamic=False, fullgraph=False)
        COMPILED.update(on=True, why="")
    except Exception as e:  # pragma: no cover
        COMPILED.update(on=False, why=f"{type(e).__name__}: {e}")


def disable_compile(why):
    for k, f in (("rms_norm", rms_norm), ("add_rms_norm", add_rms_norm),
                 ("qk_norm_rope", qk_norm_rope), ("gnorm_gate", gnorm_gate),
                 ("silu_mul", silu_mul), ("route", route)):
        FN[k] = f
    COMPILED.update(on=False, why=why)


# ---------------------------------------------------------------------------
# Lightning attention, pure PyTorch (§4.2, §4.3)
# ---------------------------------------------------------------------------
def lightning_chunked_torch(q, k, v, g_gamma, scale, S0=None, chunk=64):
    """q,k,v [B,T,H,d]; g_gamma [H] = log lambda; S0 [B,H,d,dv] f32 or None.
    Returns (o [B,T,H,dv] in q.dtype, S [B,H,d,dv] f32)."""
    B, T, H, d = q.shape
    dv = v.shape[-1]
    qf = q.float().transpose(1, 2) * scale
    kf = k.float().transpose(1, 2)
    vf = v.float().transpose(1, 2)
    g = g_gamma.float()
    S = torch.zeros(B, H, d, dv, dtype=torch.float32, device=q.device) if S0 is None else S0.float().clone()
    out = torch.empty(B, H, T, dv, dtype=torch.float32, device=q.device)
    for n0 in range(0, T, chunk):
        c = min(chunk, T - n0)
        i = torch.arange(c, device=q.device, dtype=torch.float32)
        diff = i[:, None] - i[None, :]
        M = torch.exp(g[:, None, None] * diff.clamp(min=0)) * (diff >= 0)           # [H,c,c]
        Qn, Kn, Vn = qf[:, :, n0:n0 + c], kf[:, :, n0:n0 + c], vf[:, :, n0:n0 + c]
        o = ((Qn @ Kn.transpose(-1, -2)) * M) @ Vn
        o = o + torch.exp(g[:, None] * (i + 1))[..., None] * (Qn @ S)
        out[:, :, n0:n0 + c] = o
        kdec = torch.exp(g[:, None] * (c - 1 - i))[..., None] * Kn
        S = torch.exp(g * c)[:, None, None] * S + kdec.transpose(-1, -2) @ Vn
    return out.transpose(1, 2).to(q.dtype), S


def lightning_recurrent_torch_(q, k, v, g_gamma, scale, S):
    """Token recurrence, S [B,H,d,dv] f32 updated IN PLACE. q,k,v [B,T,H,d]."""
    lam = torch.exp(g_gamma.float())[:, None, None]
    outs = []
    for t in range(q.shape[1]):
        kt, vt = k[:, t].float(), v[:, t].float()
        S.mul_(lam).add_(kt[..., :, None] * vt[..., None, :])
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, t].float() * scale, S))
    return torch.stack(outs, 1).to(q.dtype)


class FlaRecurrentInplace:
    """fused_recurrent_simple_gla with the final state written over the initial
    state (each Triton program reads and writes the same state tile), so the CUDA
    graph needs no extra state copy.  The first call uses the public API (it also
    autotunes with a separate output buffer) and copies."""

    def __init__(self):
        self.tuned = set()
        self.mode = "inplace" if FLA.get("fr_mod") is not None else "copy"

    def __call__(self, q, k, v, g_gamma, scale, S):
        key = (q.shape[0], q.shape[2], q.shape[3])
        if self.mode == "copy" or key not in self.tuned:
            o, ht = FLA["recurrent"](q, k, v, g_gamma=g_gamma, scale=scale,
                                     initial_state=S, output_final_state=True)
            S.copy_(ht)
            self.tuned.add(key)
            return o
        try:
            m = FLA["fr_mod"]
            B, T, H, K = k.shape
            Vd = v.shape[-1]
            BK, BV, NK, NV = m._fused_recurrent_tiling(K, Vd)
            o = q.new_empty((NK, B, T, H, Vd) if NK > 1 else (B, T, H, Vd), dtype=torch.float32)
            m.fused_recurrent_fwd_kernel[(NV * NK * B * H,)](
                q=q, k=k, v=v, g=None, g_gamma=g_gamma, gk=None, gv=None, o=o, h0=S, ht=S,
                cu_seqlens=None, scale=scale, T=T, B=B, H=H, K=K, V=Vd, BK=BK, BV=BV,
                USE_G=False, USE_G_GAMMA=True, USE_GK=False, USE_GV=False, REVERSE=False,
                STATE_V_FIRST=False)
            if NK > 1:
                o = o.sum(0)
            return o.to(q.dtype)
        except Exception as e:
            print(f"[torch_ring] in-place fla recurrent failed ({type(e).__name__}: {e}); "
                  f"using public API + state copy", flush=True)
            self.mode = "copy"
            return self(q, k, v, g_gamma, scale, S)


# ---------------------------------------------------------------------------
# Routed experts
# ---------------------------------------------------------------------------
GMM = {"impl": None, "why": "", "bmm_limit": 1 << 30}


def _gmm_grouped(x, w, offs):
    """x [M,K] sorted by expert, w [E,N,K], offs int32 [E] (cumulative ends)."""
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


def _gmm_reference(x, w, offs):
    """Per-group loop (host sync): correctness reference only."""
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e].t()
        start = end
    return out


def select_gmm(device, dtype, force=None):
    """Pick torch._grouped_mm if it exists and matches a per-group reference on
    ragged groups (incl. empty ones); else the gather + bmm fallback."""
    if force:
        GMM.update(impl=force, why="forced")
        return
    if not hasattr(torch, "_grouped_mm"):
        GMM.update(impl="bmm", why="torch._grouped_mm not available")
        return
    try:
        g = torch.Generator(device=device)
        g.manual_seed(1)
        E, K, N = 8, 64, 48
        sizes = torch.tensor([3, 0, 17, 1, 0, 9, 33, 2])
        x = torch.randn(int(sizes.sum()), K, generator=g, device=device).to(dtype)
        w = torch.randn(E, N, K, generator=g, device=device).to(dtype)
        offs = torch.cumsum(sizes, 0).to(torch.int32).to(device)
        y = _gmm_grouped(x, w, offs).float()
        ref = _gmm_reference(x.float(), w.float(), offs)
        err = ((y - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            raise BenchError(f"mismatch rel err {err:.3g}")
        GMM.update(impl="grouped_mm", why="")
    except Exception as e:
        GMM.update(impl="bmm", why=f"torch._grouped_mm unusable here ({type(e).__name__}: {e})")


def moe_experts(x, idx, w, W13, W2):
    """Routed part of §2.6 with no host sync.  x [M,D]; idx/w [M,K]."""
    M, K = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)                     # slots sorted by expert
    e_sorted = flat[order]
    tok = order // K
    xs = x[tok]                                                   # [M*K, D]
    if GMM["impl"] == "grouped_mm":
        E = W13.shape[0]
        offs = torch.searchsorted(e_sorted, torch.arange(E, device=x.device, dtype=e_sorted.dtype),
                                  right=True).to(torch.int32)
        h = _gmm_grouped(xs, W13, offs)
        y = _gmm_grouped(FN["silu_mul"](h), W2, offs)
    elif xs.shape[0] * W13[0].numel() * W13.element_size() <= GMM["bmm_limit"]:
        # fallback: gather each slot's expert weights + bmm (no host sync; small M only)
        h = torch.bmm(W13[e_sorted], xs[:, :, None]).squeeze(-1)
        y = torch.bmm(W2[e_sorted], FN["silu_mul"](h)[:, :, None]).squeeze(-1)
    else:
        # fallback for large M (prefill): per-expert loop, host sync on the offsets
        E = W13.shape[0]
        offs = torch.searchsorted(e_sorted, torch.arange(E, device=x.device, dtype=e_sorted.dtype),
                                  right=True)
        h = _gmm_reference(xs, W13, offs)
        y = _gmm_reference(FN["silu_mul"](h), W2, offs)
    y = y * w.reshape(-1)[order, None].to(y.dtype)
    out = torch.empty_like(y).index_copy_(0, order, y)            # back to [M, K] slot order
    return out.view(M, K, -1).sum(1)


def rep_heads(x, rep):
    """[B, Hkv, L, d] -> [B, Hkv*rep, L, d], kv head j serving query heads j*rep..j*rep+rep-1."""
    if rep == 1:
        return x
    B, Hk, L, d = x.shape
    return x[:, :, None].expand(B, Hk, rep, L, d).reshape(B, Hk * rep, L, d)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------
class RingModel:
    def __init__(self, c, W, device, dtype, max_len, batch, use_fla=True):
        self.c, self.W, self.dev, self.dt = c, W, device, dtype
        self.max_len, self.batch = max_len, batch
        self.use_fla = use_fla and try_import_fla() and device.type == "cuda"
        self.rec_inplace = FlaRecurrentInplace() if self.use_fla else None
        half = c.r // 2
        inv = c.theta ** (-torch.arange(half, dtype=torch.float64) * 2.0 / c.r)
        ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None, :]
        self.cos = torch.cos(ang).float().to(device)
        self.sin = torch.sin(ang).float().to(device)
        self.kv = {}
        self.S = {}
        for l in range(c.L):
            if c.is_softmax(l):
                shp = (batch, c.Hkv, max_len, c.d)
                self.kv[l] = (torch.zeros(shp, dtype=dtype, device=device),
                              torch.zeros(shp, dtype=dtype, device=device))
            else:
                self.S[l] = torch.zeros(batch, c.H, c.d, c.d, dtype=torch.float32, device=device)
        self.last_idx = {}       # layer -> routed expert ids of the last call
        self.sdpa_gqa = True

    # -- state helpers ------------------------------------------------------
    def reset(self):
        for k_, v_ in self.kv.values():
            k_.zero_(), v_.zero_()
        for s in self.S.values():
            s.zero_()

    def fill_random_context(self, ctx, seed=0):
        """Random (non-zero) KV cache for positions [0, ctx) and random f32 states,
        magnitudes like real ones (unit-RMS keys after QK-norm)."""
        g = torch.Generator(device=self.dev)
        g.manual_seed(seed)
        for k_, v_ in self.kv.values():
            k_[:, :, :ctx].normal_(0, 1, generator=g)
            v_[:, :, :ctx].normal_(0, 0.5, generator=g)
        for s in self.S.values():
            s.normal_(0, 0.05, generator=g)

    # -- attention ----------------------------------------------------------
    def _sdpa(self, q, k, v, causal):
        """q [B,H,T,d], k/v [B,Hkv,L,d]."""
        if self.sdpa_gqa:
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            except (RuntimeError, TypeError):
                self.sdpa_gqa = False
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, rep_heads(k, rep), rep_heads(v, rep), is_causal=causal)

    def _softmax_attn(self, l, W, x, pos, T, pos_t, kv_len):
        """§2.3. x [B,T,D]. pos: python int start (None in graph mode -> pos_t);
        kv_len: number of cached keys attended to (static)."""
        c = self.c
        B = x.shape[0]
        qkv = x @ W["qkv"].t()
        q = qkv[..., :c.H * c.d].view(B, T, c.H, c.d)
        k = qkv[..., c.H * c.d:(c.H + c.Hkv) * c.d].view(B, T, c.Hkv, c.d)
        v = qkv[..., (c.H + c.Hkv) * c.d:].view(B, T, c.Hkv, c.d)
        cos, sin, positions = self._rope_tables(pos, T, pos_t)
        q, k = FN["qk_norm_rope"](q, k, W.get("q_norm"), W.get("k_norm"), cos, sin, c.eps, c.r, c.use_qk_norm)
        Kc, Vc = self.kv[l]
        Kc.index_copy_(2, positions, k.transpose(1, 2))
        Vc.index_copy_(2, positions, v.transpose(1, 2))
        q = q.transpose(1, 2)
        if T == 1:
            o = self._sdpa(q, Kc[:, :, :kv_len], Vc[:, :, :kv_len], causal=False)
        elif pos == 0:
            o = self._sdpa(q, k.transpose(1, 2), v.transpose(1, 2), causal=True)
        else:  # continued prefill: explicit mask (queries at pos..pos+T-1)
            qpos = pos + torch.arange(T, device=x.device)
            mask = torch.arange(kv_len, device=x.device)[None, :] <= qpos[:, None]
            rep = c.H // c.Hkv
            o = F.scaled_dot_product_attention(q, rep_heads(Kc[:, :, :kv_len], rep),
                                               rep_heads(Vc[:, :, :kv_len], rep), attn_mask=mask)
        o = o.transpose(1, 2).reshape(B, T, c.H * c.d)
        return o @ W["dense"].t()

    def _rope_tables(self, pos, T, pos_t):
        if pos_t is not None:                       # graph mode: device position
            positions = pos_t + torch.arange(T, device=self.dev)
        else:
            positions = torch.arange(pos, pos + T, device=self.dev)
        return self.cos[positions], self.sin[positions], positions

    def _linear_attn(self, l, W, x, pos, T, pos_t):
        """§2.4. x [B,T,D]."""
        c = self.c
        B, Hd = x.shape[0], c.H * c.d
        p = x @ W["qkvg"].t()
        q = p[..., :Hd].view(B, T, c.H, c.d)
        k = p[..., Hd:2 * Hd].view(B, T, c.H, c.d)
        v = p[..., 2 * Hd:3 * Hd].view(B, T, c.H, c.d)
        gate = p[..., 3 * Hd:]
        cos, sin, _ = self._rope_tables(pos, T, pos_t)
        q, k = FN["qk_norm_rope"](q, k, W.get("q_norm"), W.get("k_norm"), cos, sin, c.eps, c.r, c.use_qk_norm)
        v = v.contiguous()
        scale = c.d ** -0.5
        S = self.S[l]
        if self.use_fla:
            if T == 1:
                o = self.rec_inplace(q, k, v, W["g_gamma"], scale, S)
            else:
                o, ht = FLA["chunk"](q, k, v, g_gamma=W["g_gamma"], scale=scale,
                                     initial_state=S if pos else None, output_final_state=True)
                S.copy_(ht)
        else:
            if T == 1:
                o = lightning_recurrent_torch_(q, k, v, W["g_gamma"], scale, S)
            else:
                o, S_new = lightning_chunked_torch(q, k, v, W["g_gamma"], scale, S if pos else None)
                S.copy_(S_new)
        o = o.reshape(B, T, Hd).to(x.dtype)
        y = FN["gnorm_gate"](o, gate, W["g_norm"], c.ngroups_norm, c.eps)
        return y @ W["dense"].t()

    def _mlp(self, l, W, x):
        c = self.c
        shp = x.shape
        x2 = x.reshape(-1, shp[-1])
        if "mlp_gu" in W:
            return (FN["silu_mul"](x2 @ W["mlp_gu"].t()) @ W["mlp_down"].t()).view(shp)
        idx, w = FN["route"](x2, W["router"], W["bias"], c.n_group, c.topk_group, c.K,
                             c.norm_topk, c.rsf)
        self.last_idx[l] = idx
        out = moe_experts(x2, idx, w, W["w13"], W["w2"])
        if c.Is:
            out = out + FN["silu_mul"](x2 @ W["sh_gu"].t()) @ W["sh_down"].t()
        return out.view(shp)

    def forward(self, ids, pos, pos_t=None, kv_len=None, last_only=False):
        """ids [B,T] -> logits [B,T,V] (or [B,V] if last_only).  pos: python start
        position (prefill/eager decode) ; graph decode passes pos_t (device tensor)
        and kv_len (static number of keys, = position + 1)."""
        c, Wt = self.c, self.W
        B, T = ids.shape
        if kv_len is None:
            kv_len = pos + T
        h = Wt.emb[ids]
        x = FN["rms_norm"](h, Wt.layers[0]["in_norm"], c.eps)
        for l, W in enumerate(Wt.layers):
            if W["kind"] == "softmax":
                a = self._softmax_attn(l, W, x, pos, T, pos_t, kv_len)
            else:
                a = self._linear_attn(l, W, x, pos, T, pos_t)
            h, x = FN["add_rms_norm"](h, a, W["post_norm"], c.eps)
            m = self._mlp(l, W, x)
            nw = Wt.layers[l + 1]["in_norm"] if l + 1 < len(Wt.layers) else Wt.norm
            h, x = FN["add_rms_norm"](h, m, nw, c.eps)
        if last_only:
            x = x[:, -1]
        return x @ Wt.head.t()


# ---------------------------------------------------------------------------
# CUDA-graph decode
# ---------------------------------------------------------------------------
class GraphDecoder:
    """One decode step (embedding .. LM head + argmax) in a CUDA graph.
    Static inputs: ids [B,1], pos_t [1]; static outputs: logits [B,V], next ids."""

    def __init__(self, model, pos, warmup=3):
        self.m = model
        B = model.batch
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=model.dev)
        self.pos_t = torch.tensor([pos], dtype=torch.long, device=model.dev)
        self.kv_len = pos + 1
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):   # compile / autotune / cuBLAS handles outside the capture
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.next_ids = self._step()
        torch.cuda.synchronize()

    def _step(self):
        logits = self.m.forward(self.ids, None, pos_t=self.pos_t, kv_len=self.kv_len)[:, 0]
        return logits, logits.argmax(-1)

    def replay(self):
        self.graph.replay()


# ---------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------
def cuda_time_ms(fn, warmup=5, iters=30):
    """Median and spread (min, max) in ms of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "n": iters}


def measure_copy_bw(device):
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 1 GiB buffers."""
    n = 1 << 29  # bf16 elements = 1 GiB
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    t = cuda_time_ms(lambda: b.copy_(a), warmup=3, iters=20)["median_ms"]
    del a, b
    return 2 * n * 2 / (t * 1e-3) / 1e9


# ---------------------------------------------------------------------------
# Floors (perf.md)
# ---------------------------------------------------------------------------
def nonexpert_weight_bytes(c, elt=2):
    """Weights every decode step reads regardless of routing (no embedding table:
    only B rows of it are read), incl. LM head, routers (fp32), norms."""
    D, H, Hkv, d = c.D, c.H, c.Hkv, c.d
    tot = (D + c.V * D) * elt                    # final norm + LM head
    for l in range(c.L):
        t = 2 * D + (2 * d if c.use_qk_norm else 0) + D * H * d
        if c.is_softmax(l):
            t += (H + 2 * Hkv) * d * D
        else:
            t += 4 * H * d * D + H * d
        if c.is_dense(l):
            t += 3 * c.I * D
        else:
            t += 3 * c.Is * D
            tot += 4 * (c.E * D + c.E)          # fp32 router + bias
        tot += t * elt
    return tot


def expert_bytes(c, elt=2):
    return 3 * c.Im * c.D * elt


def decode_floor(c, B, ctx, distinct_experts_per_layer, bw_gbs):
    w = nonexpert_weight_bytes(c) + sum(distinct_experts_per_layer) * expert_bytes(c)
    n_soft = sum(1 for l in range(c.L) if c.is_softmax(l))
    n_lin = c.L - n_soft
    kv = n_soft * B * (ctx + 1) * c.Hkv * c.d * 2 * 2
    st = n_lin * B * c.H * c.d * c.d * 4 * 2                # f32 state read + write
    total = w + kv + st
    return {"bytes": total, "weight_bytes": w, "kv_bytes": kv, "state_bytes": st,
            "floor_ms": total / (bw_gbs * 1e9) * 1e3}


def prefill_flops(c, T, lm_head_tokens=1, chunk=64):
    """Forward FLOPs for T tokens of one sequence (dense GEMMs on active params,
    causal softmax attention, chunked linear attention), LM head on the last token."""
    D, H, Hkv, d = c.D, c.H, c.Hkv, c.d
    per_tok = 0
    attn = 0
    for l in range(c.L):
        if c.is_softmax(l):
            per_tok += 2 * D * ((H + 2 * Hkv) * d + H * d)
            attn += 2 * 2 * H * d * (T * (T + 1) / 2)          # QK^T and PV, causal
        else:
            per_tok += 2 * D * (4 * H * d + H * d)
            # intra-chunk (QK^T, .V causal) + inter (Q S) + state update (K^T V)
            attn += T * H * (2 * 2 * d * chunk / 2 + 2 * d * d + 2 * d * d)
        if c.is_dense(l):
            per_tok += 2 * 3 * D * c.I
        else:
            per_tok += 2 * 3 * D * (c.K * c.Im + c.Is) + 2 * D * c.E
    return per_tok * T + attn + 2 * D * c.V * lm_head_tokens


# ---------------------------------------------------------------------------
# --check
# ---------------------------------------------------------------------------
def load_ref_module(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("ring_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def run_torch_tokens(model, tokens, decode_from=None, graph=False):
    """Logits [T, V] float64 on CPU for one sequence (batch 1)."""
    dev = model.dev
    ids = torch.tensor(tokens, dtype=torch.long, device=dev)[None]
    model.reset()
    if decode_from is None:
        return model.forward(ids, 0)[0].double().cpu()
    rows = [model.forward(ids[:, :decode_from], 0)[0].double().cpu()]
    for t in range(decode_from, len(tokens)):
        if graph:
            gd = GraphDecoder(model, t, warmup=1)  # capture per position (kv_len static)
            # capture's warm-up advanced the state: restore by re-running the prefix
            model.reset()
            model.forward(ids[:, :decode_from], 0)
            for u in range(decode_from, t):
                model.forward(ids[:, u:u + 1], u)
            gd.ids.copy_(ids[:, t:t + 1])
            gd.replay()
            torch.cuda.synchronize()
            rows.append(gd.logits.double().cpu())
        else:
            rows.append(model.forward(ids[:, t:t + 1], t)[0].double().cpu())
    return torch.cat(rows, 0)


def do_check(args):
    import tempfile
    ref_path = args.ref or os.path.join(HERE, "..", "tests", "reference", "ring_ref.py")
    if not os.path.exists(ref_path):
        raise BenchError(f"oracle not found at {ref_path} (use --ref)")
    ref = load_ref_module(ref_path)
    cfg_path = args.config or os.path.join(HERE, "..", "models", "configs", "tiny.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    if args.convention:
        cfg_json["ringjit_decay_convention"] = args.convention
    c = Cfg(cfg_json)
    tmp = tempfile.mkdtemp(prefix="torch_ring_check_")
    if args.ckpt:
        hf = load_checkpoint_dir(args.ckpt)
        with open(os.path.join(args.ckpt, "config.json")) as f:
            cfg_json = json.load(f)
        if args.convention:
            cfg_json["ringjit_decay_convention"] = args.convention
        c = Cfg(cfg_json)
        ref_dir = args.ckpt
        if args.convention:   # oracle reads config.json: give it the override
            ref_dir = tmp
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg_json, f)
            save_safetensors(hf, os.path.join(tmp, "model.safetensors"))
    else:
        hf = random_hf_weights(c, args.seed)
        ref_dir = tmp
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg_json, f)
        save_safetensors(hf, os.path.join(tmp, "model.safetensors"))
    print(f"[check] config {cfg_path if not args.ckpt else args.ckpt}  decay convention {c.conv}  "
          f"weights {'from ' + args.ckpt if args.ckpt else 'random seed %d' % args.seed}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    T, N = args.check_len, args.check_prefill
    tokens = torch.randint(0, c.V, (T,), generator=gen).tolist()
    model_ref = ref.RingLinearModel.from_dir(ref_dir)
    t0 = time.time()
    ref_full = torch.from_numpy(ref.run_tokens(model_ref, tokens, None, 16))
    ref_dec = torch.from_numpy(ref.run_tokens(model_ref, tokens, N, 16))
    print(f"[check] oracle done ({time.time() - t0:.1f}s): T={T}, prefill {N} + decode {T - N}")
    results = []
    failed = False

    def report(name, got, want, tol):
        nonlocal failed
        e = rel_err(got, want)
        agree = (got.argmax(-1) == want.argmax(-1)).double().mean().item()
        ok = e < tol
        failed |= not ok
        results.append({"case": name, "rel_err": e, "tol": tol, "argmax_agree": agree, "ok": ok})
        print(f"[check] {name:52s} rel_err {e:.3e} (tol {tol:.0e})  argmax agree {agree:.3f}  "
              f"{'OK' if ok else 'FAIL'}")

    # 1. pure-PyTorch float32 path on CPU (and on CUDA if present), both MoE impls
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devs:
        W = Weights(c, hf.__getitem__, torch.float32, dev)
        for impl in ("bmm", "grouped_mm"):
            if impl == "grouped_mm":
                select_gmm(dev, torch.float32)
                if GMM["impl"] != "grouped_mm":
                    print(f"[check] {dev}: grouped_mm path skipped: {GMM['why']}")
                    continue
            else:
                select_gmm(dev, torch.float32, force="bmm")
            m = RingModel(c, W, dev, torch.float32, max_len=T + 8, batch=1, use_fla=False)
            with torch.no_grad():
                report(f"{dev.type} f32 pure-torch moe={impl} full forward", run_torch_tokens(m, tokens), ref_full, 1e-4)
                report(f"{dev.type} f32 pure-torch moe={impl} prefill+decode", run_torch_tokens(m, tokens, N), ref_dec, 1e-4)
    # 2. fast path on CUDA: fla kernels, grouped GEMM, CUDA-graph decode with the
    #    in-place recurrent state.  Gate in float32 (fla / grouped_mm in f32 if they
    #    accept it; routing flips from bf16 rounding would make a bf16 gate flaky),
    #    then bf16 with a loose gate (report its argmax agreement).
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        if args.compile:
            enable_compile()
        have_fla = try_import_fla()
        print(f"[check] fla: {'fla ' + str(FLA['version']) if have_fla else 'fla unavailable (' + FLA['why'] + ')'}")
        for dt, tol in ((torch.float32, 5e-3), (torch.bfloat16, 1e-1)):
            select_gmm(dev, dt)
            print(f"[check] {dt}: routed experts via {GMM['impl']} {GMM['why']}")
            W = Weights(c, hf.__getitem__, dt, dev)
            m = RingModel(c, W, dev, dt, max_len=T + 8, batch=1, use_fla=True)
            tag = f"cuda {str(dt)[6:]} fla={'yes' if m.use_fla else 'no'} moe={GMM['impl']}"
            if COMPILED["on"]:
                tag += " compiled"
            with torch.no_grad():
                report(f"{tag} full", run_torch_tokens(m, tokens), ref_full, tol)
                report(f"{tag} prefill+decode", run_torch_tokens(m, tokens, N), ref_dec, tol)
                report(f"{tag} prefill+graph decode", run_torch_tokens(m, tokens, N, graph=True), ref_dec, tol)
            if m.rec_inplace is not None:
                print(f"[check] fla recurrent state update mode: {m.rec_inplace.mode}")
    else:
        print("[check] no CUDA device: fast path (fla / grouped_mm / CUDA graph) not checked")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": "check", "torch": torch.__version__, "results": results}, f, indent=1)
    if failed:
        raise BenchError("check FAILED")
    print("[check] all OK")


# ---------------------------------------------------------------------------
# --bench
# ---------------------------------------------------------------------------
def do_bench(args):
    if not torch.cuda.is_available():
        raise BenchError("--bench needs a CUDA device")
    dev = torch.device("cuda")
    cfg_path = args.config or os.path.join(HERE, "..", "models", "configs", "ring-mini-linear-2.0.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    if args.convention:
        cfg_json["ringjit_decay_convention"] = args.convention
    c = Cfg(cfg_json, args.num_layers)
    dtype = torch.bfloat16
    props = torch.cuda.get_device_properties(dev)
    info = {"card": props.name, "sm_count": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "config_path": cfg_path, "config": cfg_json, "num_layers_run": c.L,
            "dtype": "bf16", "seed": args.seed}
    try:
        import subprocess
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        info["driver"] = "?"
    have_fla = try_import_fla()
    info["fla"] = FLA["version"] if have_fla else f"fla unavailable ({FLA['why']})"
    print(f"[bench] card {props.name}  torch {torch.__version__}  driver {info['driver']}")
    print(f"[bench] lightning attention: " + (f"fla {FLA['version']} chunk_simple_gla / fused_recurrent_simple_gla"
                                                if have_fla else f"fla unavailable ({FLA['why']}): pure-PyTorch chunked/recurrent"))
    select_gmm(dev, dtype)
    info["routed_experts"] = GMM["impl"] if GMM["impl"] == "grouped_mm" else f"bmm fallback: {GMM['why']}"
    print(f"[bench] routed experts: {info['routed_experts']}")
    if args.compile:
        enable_compile()
    print(f"[bench] torch.compile of elementwise parts: {'on' if COMPILED['on'] else 'off ' + COMPILED['why']}")

    bw = measure_copy_bw(dev)
    info["copy_bw_GBs"] = bw
    print(f"[bench] measured D2D copy bandwidth {bw:.0f} GB/s (read+write)")

    t0 = time.time()
    W = Weights.random_direct(c, args.seed, dtype, dev)
    torch.cuda.synchronize()
    print(f"[bench] random bf16 weights made on the GPU in {time.time() - t0:.1f}s, "
          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated")
    ctx = args.ctx
    results = {}

    def with_fallback(fn):
        """Run fn(); if torch.compile breaks it, retry once without compile."""
        try:
            return fn()
        except BenchError:
            raise
        except Exception as e:
            if COMPILED["on"]:
                print(f"[bench] torch.compile path failed ({type(e).__name__}: {e}); retrying eager", flush=True)
                disable_compile(f"failed: {type(e).__name__}: {e}")
            elif GMM["impl"] == "grouped_mm":
                print(f"[bench] failed with torch._grouped_mm ({type(e).__name__}: {e}); "
                      f"retrying with the gather + bmm fallback", flush=True)
                GMM.update(impl="bmm", why=f"grouped_mm failed in this run: {type(e).__name__}: {e}",
                           bmm_limit=8 << 30)
                info["routed_experts"] = f"bmm fallback: {GMM['why']}"
            else:
                raise
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            return with_fallback(fn)

    # ---- decode -----------------------------------------------------------
    for B in args.batches:
        def run_decode():
            m = RingModel(c, W, dev, dtype, max_len=ctx + 2, batch=B, use_fla=True)
            m.fill_random_context(ctx, seed=args.seed + B)
            with torch.no_grad():
                gd = GraphDecoder(m, ctx, warmup=3)
                gd.ids.copy_(torch.randint(0, c.V, (B, 1), device=dev))
                gd.replay()
                torch.cuda.synchronize()
                distinct = [int(torch.unique(m.last_idx[l]).numel()) for l in sorted(m.last_idx)]
                tm = cuda_time_ms(gd.replay, warmup=10, iters=args.iters)
            if not torch.isfinite(gd.logits.float()).all():
                raise BenchError(f"decode B={B}: non-finite logits")
            return m, tm, distinct
        m, tm, distinct = with_fallback(run_decode)
        fl = decode_floor(c, B, ctx, distinct, bw)
        r = {"batch": B, "ctx": ctx, **tm, "tok_per_s": B / (tm["median_ms"] * 1e-3),
             "floor": fl, "fraction_of_floor": fl["floor_ms"] / tm["median_ms"],
             "distinct_experts_per_moe_layer": distinct,
             "fla_recurrent_state_update": (m.rec_inplace.mode if m.rec_inplace else "torch")}
        results[f"decode_b{B}"] = r
        print(f"[bench] decode B={B:3d} ctx={ctx}: {tm['median_ms']:.3f} ms/step (min {tm['min_ms']:.3f}, "
              f"max {tm['max_ms']:.3f}), {r['tok_per_s']:.0f} tok/s; floor {fl['floor_ms']:.3f} ms "
              f"({fl['bytes'] / 1e9:.2f} GB) -> {100 * r['fraction_of_floor']:.1f}% of floor")
        del m
        torch.cuda.empty_cache()

    # ---- prefill ----------------------------------------------------------
    for T in args.prefill:
        def run_prefill():
            m = RingModel(c, W, dev, dtype, max_len=T, batch=1, use_fla=True)
            gen = torch.Generator(device=dev).manual_seed(args.seed + T)
            id_sets = [torch.randint(0, c.V, (1, T), device=dev, generator=gen) for _ in range(4)]
            state = {"i": 0}

            def once():
                ids = id_sets[state["i"] % len(id_sets)]
                state["i"] += 1
                return m.forward(ids, 0, last_only=True)
            with torch.no_grad():
                out = once()
                torch.cuda.synchronize()
                if not torch.isfinite(out.float()).all():
                    raise BenchError(f"prefill T={T}: non-finite logits")
                tm = cuda_time_ms(once, warmup=3, iters=max(5, args.iters // 3))
            return tm
        tm = with_fallback(run_prefill)
        flops = prefill_flops(c, T)
        tps = T / (tm["median_ms"] * 1e-3)
        floor_ms = flops / 790e12 * 1e3
        r = {"T": T, "batch": 1, **tm, "tok_per_s": tps, "flops": flops,
             "floor_ms_at_790TFLOPs": floor_ms, "fraction_of_floor": floor_ms / tm["median_ms"],
             "achieved_TFLOPs": flops / (tm["median_ms"] * 1e-3) / 1e12}
        results[f"prefill_t{T}"] = r
        print(f"[bench] prefill T={T}: {tm['median_ms']:.2f} ms (min {tm['min_ms']:.2f}, max {tm['max_ms']:.2f}), "
              f"{tps:,.0f} tok/s, {r['achieved_TFLOPs']:.0f} TFLOP/s; floor {floor_ms:.2f} ms "
              f"-> {100 * r['fraction_of_floor']:.1f}% of floor")
        torch.cuda.empty_cache()

    info["compile"] = "on" if COMPILED["on"] else f"off {COMPILED['why']}"
    info["results"] = results
    print("\n| what | median | throughput | floor | % of floor |\n|---|---|---|---|---|")
    for k, r in results.items():
        if k.startswith("decode"):
            print(f"| decode B={r['batch']} ctx={r['ctx']} | {r['median_ms']:.3f} ms/step | {r['tok_per_s']:,.0f} tok/s "
                  f"| {r['floor']['floor_ms']:.3f} ms | {100 * r['fraction_of_floor']:.1f} % |")
        else:
            print(f"| prefill T={r['T']} B=1 | {r['median_ms']:.2f} ms | {r['tok_per_s']:,.0f} tok/s "
                  f"| {r['floor_ms_at_790TFLOPs']:.2f} ms | {100 * r['fraction_of_floor']:.1f} % |")
    print(f"(card {props.name}; lightning: {info['fla']}; experts: {info['routed_experts']}; compile: {info['compile']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1, default=str)
        print(f"[bench] wrote {args.json}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare with tests/reference/ring_ref.py (tiny config)")
    mode.add_argument("--bench", action="store_true", help="timed baseline on the GPU")
    ap.add_argument("--config", help="config.json (default: tiny for --check, ring-mini for --bench)")
    ap.add_argument("--ckpt", help="--check: HF-layout checkpoint folder (config.json + safetensors) instead of random weights")
    ap.add_argument("--ref", help="path of ring_ref.py (default ../tests/reference/ring_ref.py)")
    ap.add_argument("--convention", choices=["A", "B"], help="override ringjit_decay_convention")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-len", type=int, default=37)
    ap.add_argument("--check-prefill", type=int, default=30)
    ap.add_argument("--ctx", type=int, default=4096, help="decode context already in the cache/state")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prefill", type=int, nargs="*", default=[4096], help="prefill lengths (batch 1)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--num-layers", type=int, help="run only the first N layers (e.g. flash on one GPU)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=True,
                    help="torch.compile the elementwise parts (default on; falls back to eager on failure)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    try:
        if args.check:
            do_check(args)
        else:
            do_bench(args)
    except BenchError as e:
        die(str(e))


if __name__ == "__main__":
    main()
