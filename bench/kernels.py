#!/usr/bin/env python3
"""Per-kernel PyTorch baselines for ringjit at Ring-mini-linear-2.0 shapes (bf16).

  * torch.matmul (cuBLAS): y = x @ W^T, W N x K in {6144x2048 (linear-layer QKV),
    2048x2048, 512x2048 (expert gate/up), 2048x512 (expert down), 157184x2048 (LM head)},
    M in {1, 64, 4096}: TFLOP/s and GB/s;
  * torch SDPA: causal GQA prefill (B1, T 4096) and decode (q_len 1 over a 4K cache,
    B 1 and 64), heads / KV heads / head dim read from the config;
  * fla chunk_simple_gla (T 4096, B 1 and 8) and fused_recurrent_simple_gla (one token,
    B 1 and 64) at the linear-layer shape (H heads, d 128, constant per-head decay).

Inputs are random (never zeros) and rotated among enough copies that one cycle
exceeds the L2 cache (>= 3 x 50 MB).  Times: CUDA events, warm-up first, median
of many runs.  Prints a table and writes JSON (--json).

Importable: `time_cuda(fn, n_sets, ...)` and `rotation_sets(bytes_per_set)` are the
timing helpers, so ringjit kernels can be timed the same way.
"""

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
L2_BYTES = 50 * 2**20          # H100 50 MB, H200 60 MB: rotate past 3x that
ROTATE_BYTES = 3 * 60 * 2**20


def rotation_sets(bytes_per_set, max_sets=256):
    """How many input copies so a full cycle exceeds ROTATE_BYTES."""
    return int(max(1, min(max_sets, math.ceil(ROTATE_BYTES / max(1, bytes_per_set)))))


def time_cuda(fn, n_sets=1, warmup=10, iters=100, min_time_ms=None):
    """Time fn(i) (i = index of the input set to use, rotating over n_sets) with
    CUDA events around each call.  Returns dict(median_ms, min_ms, max_ms, p10_ms,
    p90_ms, n).  Warm-up calls first (autotuning, handles, caches)."""
    for i in range(warmup):
        fn(i % n_sets)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return {"median_ms": statistics.median(ts), "min_ms": ts[0], "max_ms": ts[-1],
            "p10_ms": q(0.1), "p90_ms": q(0.9), "n": iters}


def rand(shape, dtype=torch.bfloat16, std=1.0, device="cuda"):
    return (torch.randn(shape, dtype=torch.float32, device=device) * std).to(dtype)


ROWS = []


def record(group, name, t, flops=None, nbytes=None, extra=None):
    r = {"group": group, "name": name, **t}
    if flops:
        r["flops"] = flops
        r["TFLOPs"] = flops / (t["median_ms"] * 1e-3) / 1e12
    if nbytes:
        r["bytes"] = nbytes
        r["GBs"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
    if extra:
        r.update(extra)
    ROWS.append(r)
    tf = f"{r['TFLOPs']:8.1f}" if "TFLOPs" in r else f"{'':8s}"
    gb = f"{r['GBs']:8.0f}" if "GBs" in r else f"{'':8s}"
    print(f"{group:10s} {name:48s} {t['median_ms'] * 1e3:10.1f} us  [{t['p10_ms'] * 1e3:9.1f} ..{t['p90_ms'] * 1e3:9.1f}]"
          f"  {tf} TFLOP/s {gb} GB/s", flush=True)
    return r


# ---------------------------------------------------------------------------
def bench_matmul(cfg, Ms, iters):
    D = cfg["hidden_size"]
    H, d = cfg["num_attention_heads"], cfg.get("head_dim") or D // cfg["num_attention_heads"]
    Im = cfg["moe_intermediate_size"]
    shapes = [("qkv linear layer", 3 * H * d, D), ("HxD (dense / g_proj)", D, H * d),
              ("expert gate|up", Im, D), ("expert down", D, Im), ("lm head", cfg["vocab_size"], D)]
    for label, N, K in shapes:
        for M in Ms:
            per_set = (M * K + N * K + M * N) * 2
            n = rotation_sets(per_set)
            # weights rotated too (a decode step reads each weight once, from HBM)
            Ws = [rand((N, K), std=0.02) for _ in range(n)]
            Xs = [rand((M, K)) for _ in range(n)]
            Ys = [torch.empty(M, N, dtype=torch.bfloat16, device="cuda") for _ in range(n)]
            t = time_cuda(lambda i: torch.matmul(Xs[i], Ws[i].t(), out=Ys[i]), n, iters=iters)
            record("matmul", f"{label} N{N} K{K} M{M}", t, 2 * M * N * K, per_set,
                   {"M": M, "N": N, "K": K, "rotation_sets": n})
            del Ws, Xs, Ys
    torch.cuda.empty_cache()


def bench_sdpa(cfg, T, dec_batches, ctx, iters):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // H
    backends = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    # prefill, causal, batch 1
    per_set = (2 * 1 * H * T * d + 2 * 1 * Hkv * T * d) * 2
    n = rotation_sets(per_set)
    Q = [rand((1, H, T, d)) for _ in range(n)]
    K = [rand((1, Hkv, T, d)) for _ in range(n)]
    V = [rand((1, Hkv, T, d)) for _ in range(n)]
    flops = 4 * H * d * T * (T + 1) / 2
    for bname, be in backends:
        def f(i):
            return F.scaled_dot_product_attention(Q[i], K[i], V[i], is_causal=True, enable_gqa=True)
        try:
            if be is None:
                t = time_cuda(f, n, iters=iters)
            else:
                with sdpa_kernel(be):
                    t = time_cuda(f, n, iters=iters)
            record("sdpa", f"prefill causal GQA B1 T{T} H{H}/{Hkv} d{d} [{bname}]", t, flops, per_set,
                   {"backend": bname})
        except Exception as e:
            print(f"sdpa       prefill [{bname}]: not available ({type(e).__name__}: {str(e)[:120]})")
    del Q, K, V
    # decode: q_len 1 over ctx cached keys
    for B in dec_batches:
        per_set = (2 * B * Hkv * ctx * d + 2 * B * H * d) * 2
        n = rotation_sets(per_set)
        Q = [rand((B, H, 1, d)) for _ in range(n)]
        K = [rand((B, Hkv, ctx, d)) for _ in range(n)]
        V = [rand((B, Hkv, ctx, d)) for _ in range(n)]
        for bname, be in backends:
            def f(i):
                return F.scaled_dot_product_attention(Q[i], K[i], V[i], enable_gqa=True)
            try:
                if be is None:
                    t = time_cuda(f, n, iters=iters)
                else:
                    with sdpa_kernel(be):
                        t = time_cuda(f, n, iters=iters)
                record("sdpa", f"decode GQA B{B} ctx{ctx} H{H}/{Hkv} d{d} [{bname}]", t,
                       4 * B * H * d * ctx, per_set, {"backend": bname})
            except Exception as e:
                print(f"sdpa       decode B{B} [{bname}]: not available ({type(e).__name__}: {str(e)[:120]})")
        del Q, K, V
    torch.cuda.empty_cache()


def bench_fla(cfg, T, chunk_batches, rec_batches, iters):
    sys.path.insert(0, HERE)
    import torch_ring as tr
    H = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // H
    c = tr.Cfg(cfg)
    g_gamma = torch.tensor(c.log_decay(0), dtype=torch.float32, device="cuda")  # strongest-decay layer
    scale = d ** -0.5
    have = tr.try_import_fla()
    print(f"# lightning attention: {'fla ' + str(tr.FLA['version']) if have else 'fla unavailable (' + tr.FLA['why'] + '): timing the pure-PyTorch fallback'}")

    def qk(B, T_):   # unit-RMS q/k like after QK-norm, v ~ N(0,1)
        return rand((B, T_, H, d)), rand((B, T_, H, d)), rand((B, T_, H, d))

    # correctness of what we time, against the pure-PyTorch chunked form (f32)
    if have:
        q, k, v = qk(2, 300)
        S0 = torch.randn(2, H, d, d, device="cuda") * 0.05
        o, ht = tr.FLA["chunk"](q, k, v, g_gamma=g_gamma, scale=scale, initial_state=S0, output_final_state=True)
        o_r, S_r = tr.lightning_chunked_torch(q.float(), k.float(), v.float(), g_gamma, scale, S0)
        e1 = ((o.float() - o_r).norm() / o_r.norm()).item()
        e2 = ((ht - S_r).norm() / S_r.norm()).item()
        S1 = S0.clone()
        o1 = tr.FLA["recurrent"](q[:, :1], k[:, :1], v[:, :1], g_gamma=g_gamma, scale=scale,
                                 initial_state=S0, output_final_state=True)
        o1r = tr.lightning_recurrent_torch_(q[:, :1], k[:, :1], v[:, :1], g_gamma, scale, S1)
        e3 = ((o1[0].float() - o1r.float()).norm() / o1r.float().norm()).item()
        e4 = ((o1[1] - S1).norm() / S1.norm()).item()
        print(f"# fla vs pure-PyTorch: chunk o {e1:.2e} state {e2:.2e}; recurrent o {e3:.2e} state {e4:.2e}")
        if not max(e1, e2, e3, e4) < 3e-2:
            raise RuntimeError("fla output does not match the pure-PyTorch lightning attention")
        chunk_fn = lambda q, k, v: tr.FLA["chunk"](q, k, v, g_gamma=g_gamma, scale=scale,  # noqa: E731
                                                   output_final_state=True)
        rec_fn = lambda q, k, v, S: tr.FLA["recurrent"](q, k, v, g_gamma=g_gamma, scale=scale,  # noqa: E731
                                                        initial_state=S, output_final_state=True)
        tag = "fla"
    else:
        chunk_fn = lambda q, k, v: tr.lightning_chunked_torch(q, k, v, g_gamma, scale)  # noqa: E731
        rec_fn = lambda q, k, v, S: tr.lightning_recurrent_torch_(q, k, v, g_gamma, scale, S)  # noqa: E731
        tag = "torch-fallback"

    for B in chunk_batches:
        per_set = 4 * B * T * H * d * 2 + B * H * d * d * 4
        n = rotation_sets(per_set)
        sets = [qk(B, T) for _ in range(n)]
        t = time_cuda(lambda i: chunk_fn(*sets[i]), n, iters=iters)
        flops = B * T * H * (2 * 2 * d * 64 / 2 + 4 * d * d)
        record("lightning", f"{tag} chunk_simple_gla B{B} T{T} H{H} d{d}", t, flops, per_set, {"impl": tag})
        del sets
    for B in rec_batches:
        per_set = 4 * B * H * d * 2 + 2 * B * H * d * d * 4     # q,k,v,o + state read + write
        n = rotation_sets(per_set)
        sets = [(*qk(B, 1), torch.randn(B, H, d, d, device="cuda") * 0.05) for _ in range(n)]
        t = time_cuda(lambda i: rec_fn(*sets[i]), n, iters=iters)
        record("lightning", f"{tag} fused_recurrent_simple_gla 1 token B{B} H{H} d{d}", t,
               B * H * 4 * d * d, per_set, {"impl": tag})
        del sets
    torch.cuda.empty_cache()


def copy_bandwidth():
    n = 1 << 29
    a = rand((n,))
    b = torch.empty_like(a)
    t = time_cuda(lambda i: b.copy_(a), 1, warmup=3, iters=20)
    return 2 * n * 2 / (t["median_ms"] * 1e-3) / 1e9


def main():
    ap = argparse.ArgumentParser(description="per-kernel PyTorch baselines (Ring-mini shapes)")
    ap.add_argument("--config", default=os.path.join(HERE, "..", "models", "configs", "ring-mini-linear-2.0.json"))
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--only", nargs="*", choices=["matmul", "sdpa", "fla"], default=["matmul", "sdpa", "fla"])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 64, 4096])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels.py: error: needs a CUDA device", file=sys.stderr)
        sys.exit(2)
    with open(args.config) as f:
        cfg = json.load(f)
    props = torch.cuda.get_device_properties(0)
    info = {"card": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "config": os.path.basename(args.config)}
    try:
        import subprocess
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        info["driver"] = "?"
    torch.manual_seed(0)
    info["copy_bw_GBs"] = copy_bandwidth()
    print(f"# card {props.name}  torch {torch.__version__}  driver {info['driver']}  "
          f"D2D copy {info['copy_bw_GBs']:.0f} GB/s (read+write)")
    print(f"{'group':10s} {'kernel':48s} {'median':>13s}  {'[p10 .. p90] us':>22s}  {'TFLOP/s':>8s} {'GB/s':>13s}")
    with torch.no_grad():
        if "matmul" in args.only:
            bench_matmul(cfg, args.ms, args.iters)
        if "sdpa" in args.only:
            bench_sdpa(cfg, args.T, [1, 64], args.ctx, args.iters)
        if "fla" in args.only:
            bench_fla(cfg, args.T, [1, 8], [1, 64], args.iters)
    info["rows"] = ROWS
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
