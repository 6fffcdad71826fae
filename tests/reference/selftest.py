#!/usr/bin/env python3
"""Self-test of ring_ref.py (no Rust needed; numpy only).

Writes a random tiny checkpoint (config models/configs/tiny.json) with its own
safetensors writer and checks, in float64, the properties listed in the README.
Prints PASS/FAIL lines; exits non-zero on any failure.

    python3 selftest.py [--config PATH] [--keep DIR]
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, HERE)
import ring_ref as rr  # noqa: E402

DEFAULT_CONFIG = os.path.join(HERE, "..", "..", "models", "configs", "tiny.json")

FAILS = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}: {name}" + (f"  ({detail})" if detail else ""))
    if not ok:
        FAILS.append(name)
    return ok


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ---------------------------------------------------------------------------
# minimal safetensors writer + random checkpoint
# ---------------------------------------------------------------------------

def _encode(a, dtype):
    a = np.ascontiguousarray(a)
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    if dtype == "BF16":  # round-to-nearest-even to the top 16 bits of fp32
        u = a.astype("<f4").view("<u4").astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype("<u2").tobytes()
    raise ValueError(dtype)


def write_safetensors(path, tensors, dtype="F32"):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        b = _encode(tensors[name], dtype)
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    hj = json.dumps(header).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(hj).to_bytes(8, "little"))
        f.write(hj)
        for b in blobs:
            f.write(b)


def random_weights(cfg, rng):
    """Tensors named as spec §3; matrices ~ N(0, 1/fan_in), norms ~ 1 + noise."""
    c = rr.RingConfig(cfg)
    D, H, Hkv, d, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    W = {}

    def mat(name, o, i):
        W[name] = (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)

    def norm(name, n):
        W[name] = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    W["model.word_embeddings.weight"] = rng.standard_normal((V, D)).astype(np.float32)
    norm("model.norm.weight", D)
    mat("lm_head.weight", V, D)
    for l in range(c.num_layers):
        p = f"model.layers.{l}."
        norm(p + "input_layernorm.weight", D)
        norm(p + "post_attention_layernorm.weight", D)
        norm(p + "attention.query_layernorm.weight", d)
        norm(p + "attention.key_layernorm.weight", d)
        mat(p + "attention.dense.weight", D, H * d)
        if c.is_softmax_layer(l):
            mat(p + "attention.query_key_value.weight", (H + 2 * Hkv) * d, D)
        else:
            mat(p + "attention.query_key_value.weight", 3 * H * d, D)
            mat(p + "attention.g_proj.weight", H * d, D)
            norm(p + "attention.g_norm.weight", H * d)
        if c.is_dense_mlp(l):
            I = c.intermediate_size
            mat(p + "mlp.gate_proj.weight", I, D)
            mat(p + "mlp.up_proj.weight", I, D)
            mat(p + "mlp.down_proj.weight", D, I)
        else:
            E, Im = c.num_experts, c.moe_intermediate_size
            Is = c.num_shared_experts * c.moe_shared_intermediate_size
            mat(p + "mlp.gate.weight", E, D)
            W[p + "mlp.gate.expert_bias"] = (0.3 * rng.standard_normal(E)).astype(np.float32)
            for e in range(E):
                mat(p + f"mlp.experts.{e}.gate_proj.weight", Im, D)
                mat(p + f"mlp.experts.{e}.up_proj.weight", Im, D)
                mat(p + f"mlp.experts.{e}.down_proj.weight", D, Im)
            mat(p + "mlp.shared_experts.gate_proj.weight", Is, D)
            mat(p + "mlp.shared_experts.up_proj.weight", Is, D)
            mat(p + "mlp.shared_experts.down_proj.weight", D, Is)
    return W


def write_model(dirpath, cfg, weights, dtype="F32", shards=0):
    os.makedirs(dirpath, exist_ok=True)
    with open(os.path.join(dirpath, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if shards == 0:
        write_safetensors(os.path.join(dirpath, "model.safetensors"), weights, dtype)
        return
    names = sorted(weights)
    wmap = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        write_safetensors(os.path.join(dirpath, fn), part, dtype)
        wmap.update({n: fn for n in part})
    with open(os.path.join(dirpath, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wmap}, f, indent=1)



# ---------------------------------------------------------------------------
# independent loop-based forward (per token, per head, plain python routing),
# used to cross-check the vectorised model code
# ---------------------------------------------------------------------------

def naive_forward(cfg, W, toks, conv="A"):
    c = rr.RingConfig(cfg)
    D, H, Hkv, d, r = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rotary_dim
    eps = c.rms_norm_eps
    W = {n: a.astype(np.float64) for n, a in W.items()}
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731

    def rms(x, w):
        return w * x / math.sqrt(float(np.mean(x * x)) + eps)

    def rope(x, p):
        y = x.copy()
        for i in range(r // 2):
            a = p * c.rope_theta ** (-2.0 * i / r)
            y[i] = x[i] * math.cos(a) - x[i + r // 2] * math.sin(a)
            y[i + r // 2] = x[i + r // 2] * math.cos(a) + x[i] * math.sin(a)
        return y

    def mlp(x, pre):
        g, u, dn = (W[pre + n + "_proj.weight"] for n in ("gate", "up", "down"))
        a = g @ x
        return dn @ (a * sig(a) * (u @ x))

    T = len(toks)
    hs = [W["model.word_embeddings.weight"][t].copy() for t in toks]
    for l in range(c.num_layers):
        p = f"model.layers.{l}."
        xs = [rms(h, W[p + "input_layernorm.weight"]) for h in hs]
        qn, kn = W[p + "attention.query_layernorm.weight"], W[p + "attention.key_layernorm.weight"]
        soft = c.is_softmax_layer(l)
        nkv = Hkv if soft else H
        qs, ks, vs = [], [], []
        for t, x in enumerate(xs):
            qkv = W[p + "attention.query_key_value.weight"] @ x
            qs.append([rope(rms(qkv[h * d:(h + 1) * d], qn), t) for h in range(H)])
            ks.append([rope(rms(qkv[(H + h) * d:(H + h + 1) * d], kn), t) for h in range(nkv)])
            vs.append([qkv[(H + nkv + h) * d:(H + nkv + h + 1) * d] for h in range(nkv)])
        for t in range(T):
            heads = []
            for h in range(H):
                if soft:
                    kvh = h // (H // Hkv)
                    s = np.array([qs[t][h] @ ks[j][kvh] / math.sqrt(d) for j in range(t + 1)])
                    pr = np.exp(s - s.max())
                    pr /= pr.sum()
                    heads.append(sum(pr[j] * vs[j][kvh] for j in range(t + 1)))
                else:
                    lam = math.exp(-rr.alibi_slopes(H)[h] * rr.decay_layer_factor(l, c.num_layers, conv))
                    heads.append(sum(lam ** (t - j) * (qs[t][h] @ ks[j][h]) * vs[j][h]
                                     for j in range(t + 1)) / math.sqrt(d))
            o = np.concatenate(heads)
            if not soft:
                gsz = H * d // c.group_norm_size
                o = np.concatenate([o[i:i + gsz] / math.sqrt(float(np.mean(o[i:i + gsz] ** 2)) + eps)
                                    for i in range(0, H * d, gsz)])
                o = o * W[p + "attention.g_norm.weight"] * sig(W[p + "attention.g_proj.weight"] @ xs[t])
            hs[t] = hs[t] + W[p + "attention.dense.weight"] @ o
        for t in range(T):
            x = rms(hs[t], W[p + "post_attention_layernorm.weight"])
            if c.is_dense_mlp(l):
                hs[t] = hs[t] + mlp(x, p + "mlp.")
                continue
            E, G = c.num_experts, c.n_group
            epg = E // G
            sc = sig(W[p + "mlp.gate.weight"] @ x)
            b = sc + W[p + "mlp.gate.expert_bias"]
            gscore = [sum(sorted(b[g * epg:(g + 1) * epg], reverse=True)[:2]) for g in range(G)]
            keep = sorted(range(G), key=lambda g: (-gscore[g], g))[:c.topk_group]
            cand = [e for e in range(E) if e // epg in keep]
            sel = sorted(cand, key=lambda e: (-b[e], e))[:c.top_k]
            tot = sum(sc[e] for e in sel) + 1e-20
            m = sum(c.routed_scaling_factor * sc[e] / tot * mlp(x, p + f"mlp.experts.{e}.")
                    for e in sel)
            hs[t] = hs[t] + m + mlp(x, p + "mlp.shared_experts.")
    return np.array([W["lm_head.weight"] @ rms(h, W["model.norm.weight"]) for h in hs])

# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------

def test_slopes():
    s16 = rr.alibi_slopes(16)
    check("slopes H=16 = spec (0.70711, 0.5, 0.35355, 0.25, ..., 0.0039063)",
          len(s16) == 16 and np.allclose(s16[:4], [0.70711, 0.5, 0.35355, 0.25], atol=5e-6)
          and abs(s16[-1] - 0.0039063) < 5e-7
          and np.allclose(s16, 2.0 ** (-0.5 * np.arange(1, 17)), rtol=1e-15))
    s32 = rr.alibi_slopes(32)
    check("slopes H=32 = spec (0.84090, 0.70711, 0.59460, 0.5, ..., 0.0039063)",
          len(s32) == 32 and np.allclose(s32[:4], [0.84090, 0.70711, 0.59460, 0.5], atol=5e-6)
          and abs(s32[-1] - 0.0039063) < 5e-7)
    check("slopes H=4 = spec §6 (0.25, 0.0625, 0.015625, 0.00390625)",
          np.array_equal(rr.alibi_slopes(4), [0.25, 0.0625, 0.015625, 0.00390625]))
    # non-power-of-two rule: p-list then entries 0,2,4,... of the 2p list
    s6, s12 = rr.alibi_slopes(6), rr.alibi_slopes(12)
    exp6 = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    exp12 = [2.0 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    for H, s, e in ((6, s6, exp6), (12, s12, exp12)):
        sane = (len(s) == H and np.all((s > 0) & (s < 1)) and len(np.unique(s)) == H)
        check(f"slopes H={H} sane and follow the non-power-of-two rule",
              sane and np.allclose(s, e, rtol=1e-15), f"{np.round(s, 5).tolist()}")


def test_schedule_and_decay(cfg):
    c = rr.RingConfig(cfg)
    soft = [l for l in range(c.num_layers) if c.is_softmax_layer(l)]
    check("tiny schedule: softmax {2,5}, linear {0,1,3,4}", soft == [2, 5], str(soft))
    check("mini schedule 20/5 -> softmax 4,9,14,19",
          [l for l in range(20) if rr.is_softmax_layer(l, 20, 5)] == [4, 9, 14, 19])
    check("flash schedule 32/8 -> softmax 7,15,23,31",
          [l for l in range(32) if rr.is_softmax_layer(l, 32, 8)] == [7, 15, 23, 31])
    check("trailing rule 7/3 -> softmax 2,5,6",
          [l for l in range(7) if rr.is_softmax_layer(l, 7, 3)] == [2, 5, 6])
    fa = [rr.decay_layer_factor(l, 6, "A") for l in (0, 1, 3, 4)]
    fb = [rr.decay_layer_factor(l, 6, "B") for l in (0, 1, 3, 4)]
    check("tiny f(l) convention A = 1, .8, .4, .2 (+1e-5)",
          np.allclose(fa, np.array([1, .8, .4, .2]) + 1e-5, rtol=0, atol=1e-14))
    check("tiny f(l) convention B = 1.2, 1.0, .6, .4 (+1e-5)",
          np.allclose(fb, np.array([1.2, 1.0, .6, .4]) + 1e-5, rtol=0, atol=1e-14))
    lA0, lB0 = rr.linear_decay(16, 0, 20, "A")[0], rr.linear_decay(16, 0, 20, "B")[0]
    lA18, lB18 = rr.linear_decay(16, 18, 20, "A")[0], rr.linear_decay(16, 18, 20, "B")[0]
    check("mini lambda(h=0): layer0 A .493/B .475, layer18 A .963/B .928",
          np.allclose([lA0, lB0, lA18, lB18], [.493, .475, .963, .928], atol=6e-4),
          f"{lA0:.4f} {lB0:.4f} {lA18:.4f} {lB18:.4f}")


def test_lightning(cfg, rng):
    c = rr.RingConfig(cfg)
    T, H, d = 37, c.num_heads, c.head_dim
    for conv in ("A", "B"):
        for l in [l for l in range(c.num_layers) if not c.is_softmax_layer(l)]:
            lam = rr.linear_decay(H, l, c.num_layers, conv)
            q = rng.standard_normal((T, H, d)) / math.sqrt(d)
            k = rng.standard_normal((T, H, d))
            v = rng.standard_normal((T, H, d))
            S0 = rng.standard_normal((H, d, d))
            o_r, S_r = rr.lightning_attention_recurrent(q, k, v, lam, S0)
            o_c, S_c = rr.lightning_attention_chunked(q, k, v, lam, S0, chunk_size=16)
            e = max(rel_err(o_c, o_r), rel_err(S_c, S_r))
            check(f"chunked(C=16) == recurrence, T=37, S0!=0, conv {conv}, layer {l}",
                  e < 1e-12, f"rel err {e:.2e}")
    # other chunk sizes incl. 1 and > T; closed form o_t = q_t(lam^{t+1} S0 + sum lam^{t-j} k_j^T v_j)
    lam = rr.linear_decay(H, 1, c.num_layers, "A")
    q, k, v = (rng.standard_normal((T, H, d)) for _ in range(3))
    S0 = rng.standard_normal((H, d, d))
    o_ref = np.empty((T, H, d))
    for t in range(T):
        for h in range(H):
            St = lam[h] ** (t + 1) * S0[h]
            for j in range(t + 1):
                St = St + lam[h] ** (t - j) * np.outer(k[j, h], v[j, h])
            o_ref[t, h] = q[t, h] @ St
    o_r, _ = rr.lightning_attention_recurrent(q, k, v, lam, S0)
    check("recurrence == closed form sum", rel_err(o_r, o_ref) < 1e-12,
          f"{rel_err(o_r, o_ref):.2e}")
    errs = [rel_err(rr.lightning_attention_chunked(q, k, v, lam, S0, C)[0], o_ref)
            for C in (1, 5, 16, 37, 64)]
    check("chunked == closed form for C in {1,5,16,37,64}", max(errs) < 1e-12,
          f"max {max(errs):.2e}")
    # split prefill: chunked(first 20) then chunked(rest, incoming state)
    o1, S1 = rr.lightning_attention_chunked(q[:20], k[:20], v[:20], lam, S0, 16)
    o2, _ = rr.lightning_attention_chunked(q[20:], k[20:], v[20:], lam, S1, 16)
    check("chunked with carried state (20 + 17) == closed form",
          rel_err(np.concatenate([o1, o2]), o_ref) < 1e-12)


def test_softmax_attention(rng):
    T0, T, H, Hkv, d = 5, 7, 4, 2, 16
    q = rng.standard_normal((T, H, d))
    k = rng.standard_normal((T0 + T, Hkv, d))
    v = rng.standard_normal((T0 + T, Hkv, d))
    o = rr.softmax_attention(q, k, v, T0)
    ref = np.empty_like(o)
    for t in range(T):
        for h in range(H):
            kv = h // (H // Hkv)
            s = np.array([q[t, h] @ k[j, kv] / math.sqrt(d) for j in range(T0 + t + 1)])
            p = np.exp(s - s.max())
            p /= p.sum()
            ref[t, h] = p @ v[:T0 + t + 1, kv]
    check("softmax GQA attention (kv head = h // (H/Hkv), causal w/ offset) == loop",
          rel_err(o, ref) < 1e-13)


def test_rope(rng):
    x = rng.standard_normal((3, 2, 16))
    pos = np.array([0, 1, 7])
    y = rr.apply_rope(x, pos, 8, 10000.0)
    ok = np.array_equal(y[0], x[0]) and np.array_equal(y[:, :, 8:], x[:, :, 8:])
    ok &= np.allclose(np.linalg.norm(y[:, :, :8], axis=-1), np.linalg.norm(x[:, :, :8], axis=-1))
    th = 10000.0 ** (-2 * 1 / 8)  # i = 1
    a = 7 * th
    ok &= np.isclose(y[2, 0, 1], x[2, 0, 1] * math.cos(a) - x[2, 0, 5] * math.sin(a))
    ok &= np.isclose(y[2, 0, 5], x[2, 0, 5] * math.cos(a) + x[2, 0, 1] * math.sin(a))
    check("partial NeoX RoPE (pos 0 identity, pass-through tail, hand value)", bool(ok))


def test_routing(cfg, rng):
    c = rr.RingConfig(cfg)
    E, G, TG, K = c.num_experts, c.n_group, c.topk_group, c.top_k
    epg = E // G
    N, D = 4000, c.hidden_size
    x = rng.standard_normal((N, D))
    wg = rng.standard_normal((E, D)) / math.sqrt(D)
    bias = 0.3 * rng.standard_normal(E)
    idx, w, kept = rr.moe_route(x, wg, bias, G, TG, K, True, c.routed_scaling_factor)
    check("routing: never selects experts from dropped groups",
          bool(np.all(np.take_along_axis(kept, idx // epg, axis=1))))
    sig = rr.sigmoid(x @ wg.T)
    b = sig + bias
    gs = np.sort(b.reshape(N, G, epg), axis=-1)[..., -2:].sum(-1)
    kth = -np.sort(-gs, axis=-1)[:, TG - 1:TG]
    check("routing: kept groups are the topk_group best by top-2-sum score",
          bool(np.all(kept.sum(1) == TG) and np.all(gs[kept] >= np.repeat(kth, TG, 0)[:, 0])))
    # group limitation must actually bite (some dropped expert beats a selected one)
    masked_out = np.where(np.repeat(kept, epg, 1), -np.inf, b)
    bites = np.any(masked_out.max(1) > np.take_along_axis(b, idx, 1).min(1))
    check("routing: group limit is active on some input (test is meaningful)", bool(bites))
    exp_w = c.routed_scaling_factor * np.take_along_axis(sig, idx, 1) / (
        np.take_along_axis(sig, idx, 1).sum(1, keepdims=True) + 1e-20)
    check("routing: weights = RSF * unbiased sigma / sum (bias not in weights)",
          np.allclose(w, exp_w, rtol=1e-14, atol=0))
    idx0, _, _ = rr.moe_route(x, wg, None, G, TG, K, True, c.routed_scaling_factor)
    changed = np.any(np.sort(idx, 1) != np.sort(idx0, 1), axis=1)
    check("routing: non-zero expert_bias changes the selection on some input",
          bool(changed.any()), f"{int(changed.sum())}/{N} rows differ")
    # tie-break: equal scores -> lower index
    zx = np.zeros((1, D))
    i_t, w_t, k_t = rr.moe_route(zx, np.zeros((E, D)), None, G, TG, K, True, 1.0)
    check("routing: ties -> lowest group / expert indices",
          list(i_t[0]) == list(range(K)) and list(np.nonzero(k_t[0])[0]) == list(range(TG)))


def test_model(tmp, cfg, rng):
    W = random_weights(cfg, rng)
    single = os.path.join(tmp, "single")
    write_model(single, cfg, W)
    m = rr.RingLinearModel.from_dir(single)
    T = 42
    toks = rng.integers(0, cfg["vocab_size"], T).tolist()
    t0 = time.perf_counter()
    full = m.forward(toks)
    dt = time.perf_counter() - t0
    check("42-token forward takes < 1 s", dt < 1.0, f"{dt * 1000:.1f} ms")
    e = rel_err(naive_forward(cfg, W, toks[:20]), full[:20])
    check("vectorised forward == independent per-token/per-head loop forward (T=20)",
          e < 1e-11, f"{e:.2e}")
    check("logits shape [T, vocab] and finite",
          full.shape == (T, cfg["vocab_size"]) and bool(np.all(np.isfinite(full))))
    for N in (1, 20, 37):
        inc = rr.run_tokens(m, toks, decode_from=N)
        e = rel_err(inc, full)
        check(f"prefill({N}) + decode == full forward (T=42), conv A", e < 1e-11, f"{e:.2e}")
    for C in (1, 5, 64):
        e = rel_err(m.forward(toks, chunk_size=C), full)
        check(f"full forward independent of chunk size ({C} vs 16)", e < 1e-11, f"{e:.2e}")
    # causality: prefix logits do not depend on later tokens
    e = rel_err(m.forward(toks[:30]), full[:30])
    check("causal: forward(prefix 30) == first 30 rows", e < 1e-11, f"{e:.2e}")
    # convention B
    cfgB = dict(cfg, ringjit_decay_convention="B")
    dirB = os.path.join(tmp, "convB")
    write_model(dirB, cfgB, W)
    mB = rr.RingLinearModel.from_dir(dirB)
    fullB = mB.forward(toks)
    e = rel_err(naive_forward(cfgB, W, toks[:20], "B"), fullB[:20])
    check("conv B: vectorised forward == loop forward (T=20)", e < 1e-11, f"{e:.2e}")
    check("convention B changes the logits", rel_err(fullB, full) > 1e-6)
    eB = max(rel_err(rr.run_tokens(mB, toks, decode_from=N), fullB) for N in (1, 20, 37))
    check("prefill(N) + decode == full forward (T=42), conv B, N in {1,20,37}",
          eB < 1e-11, f"{eB:.2e}")
    # expert_bias changes logits through selection
    cfgNB = dict(cfg, moe_router_enable_expert_bias=False)
    dirNB = os.path.join(tmp, "nobias")
    write_model(dirNB, cfgNB, W)
    check("model: disabling expert_bias changes the logits",
          rel_err(rr.RingLinearModel.from_dir(dirNB).forward(toks), full) > 1e-6)
    # sharded == single
    sh = os.path.join(tmp, "sharded")
    write_model(sh, cfg, W, shards=3)
    st1, st3 = rr.TensorStore(single), rr.TensorStore(sh)
    same = st1.names() == st3.names() and all(
        np.array_equal(st1.get(n), st3.get(n)) for n in st1.names())
    e = np.max(np.abs(rr.RingLinearModel.from_dir(sh).forward(toks) - full))
    check("sharded (index.json, 3 shards) loads identical tensors and logits",
          same and e == 0.0, f"max diff {e}")
    # BF16 / F16 decoding: store rounded weights as F32 and as BF16/F16 -> identical
    for dt_name in ("BF16", "F16"):
        Wr = {}
        for n, a in W.items():
            raw = _encode(a, dt_name)
            Wr[n] = rr.decode_safetensor(raw, dt_name, list(a.shape)).astype(np.float32)
        ok = all(np.allclose(Wr[n], W[n], rtol=1e-2 if dt_name == "BF16" else 1e-3, atol=1e-3)
                 for n in W)
        d1, d2 = os.path.join(tmp, dt_name + "_as_f32"), os.path.join(tmp, dt_name)
        write_model(d1, cfg, Wr, "F32")
        write_model(d2, cfg, W, dt_name)
        e = np.max(np.abs(rr.RingLinearModel.from_dir(d1).forward(toks)
                          - rr.RingLinearModel.from_dir(d2).forward(toks)))
        check(f"{dt_name} checkpoint decodes correctly", ok and e == 0.0, f"max diff {e}")
    # CLI end-to-end
    out = os.path.join(tmp, "cli.npy")
    r = subprocess.run([sys.executable, os.path.join(HERE, "ring_ref.py"), "--model", single,
                        "--tokens", ",".join(map(str, toks)), "--decode-from", "37",
                        "--out", out], capture_output=True, text=True)
    ok = r.returncode == 0 and os.path.exists(out)
    if ok:
        a = np.load(out)
        ok = a.dtype == np.float32 and a.shape == full.shape and np.allclose(
            a, full.astype(np.float32), rtol=1e-5, atol=1e-5)
    check("CLI --decode-from 37 writes float32 [T, vocab] matching in-process", ok, r.stderr[-300:])
    return W


def test_config_errors(tmp, cfg, W):
    def cli_err(cfg_mod, needle):
        dd = tempfile.mkdtemp(dir=tmp)
        write_model(dd, cfg_mod, {"x": np.zeros(1, np.float32)})
        r = subprocess.run([sys.executable, os.path.join(HERE, "ring_ref.py"), "--model", dd,
                            "--tokens", "1,2", "--out", os.path.join(dd, "o.npy")],
                           capture_output=True, text=True)
        return r.returncode != 0 and needle in r.stderr, r.stderr.strip()
    bad = dict(cfg)
    del bad["n_group"]
    ok, msg = cli_err(bad, "n_group")
    check("missing required key -> clear error naming it", ok, msg)
    ok, msg = cli_err(dict(cfg, ringjit_decay_convention="C"), "ringjit_decay_convention")
    check("ringjit_decay_convention not in {A,B} -> error", ok, msg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--keep", default=None, help="write the checkpoints here and keep them")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    cfg.pop("ringjit_decay_convention", None)  # default (A) unless a test sets it
    rng = np.random.default_rng(args.seed)
    tmp = args.keep or tempfile.mkdtemp(prefix="ring_ref_selftest_")
    os.makedirs(tmp, exist_ok=True)
    try:
        test_slopes()
        test_schedule_and_decay(cfg)
        test_rope(rng)
        test_softmax_attention(rng)
        test_lightning(cfg, rng)
        test_routing(cfg, rng)
        W = test_model(tmp, cfg, rng)
        test_config_errors(tmp, cfg, W)
    except Exception as e:  # any crash is a failure
        import traceback
        traceback.print_exc()
        check("selftest ran without exceptions", False, repr(e))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'FAILED: ' + str(len(FAILS)) + ' check(s)' if FAILS else 'ALL PASSED'}")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
