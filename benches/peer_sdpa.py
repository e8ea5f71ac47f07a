#!/usr/bin/env python3
"""Peer baseline: PyTorch's scaled_dot_product_attention, causal, on the shapes `entropy-kernels
bench` uses (BSND inputs transposed to the [B, H, L, D] layout SDPA expects, GQA via enable_gqa).

    pip install torch numpy          # the CPU path needs no CUDA libraries
    python3 benches/peer_sdpa.py --lengths 8192,16384 --q-heads 8 --kv-heads 2 --head-dim 128
    python3 benches/peer_sdpa.py --device cuda --dtype bf16 --lengths 16384 --q-heads 32 --kv-heads 8

FLOPs are counted like the crate counts them: 2·L²·D·Hq for a causal prefill.

With --ours BINARY (a built `entropy-kernels` CLI) it runs `BINARY bench --ops dense` on the same
shapes right after each peer measurement and prints one table, the peer's and our GFLOP/s side by
side per dtype and head dim, under the CPU model, its AMX/AVX-512 flags and our backend's ISA
path; with --gemm it also measures the machine's f32 and bf16 GEMM rate (torch.matmul, 4096³):

    python3 benches/peer_sdpa.py --ours target/release/entropy-kernels --dtypes f32,f16,bf16 \
        --head-dims 64,128 --lengths 8192,16384 --gemm

With --blocks DIR (written by `entropy-kernels bench-device --dump-blocks DIR`), it also times the
reference pipeline of the sparse prefill on those block lists: for every (kv head, segment), gather
the selected blocks' keys and values, append the segment's own keys, and call SDPA for the
group's query heads with the causal mask on the own part (dense segments: causal over the prefix).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384")
    ap.add_argument("--q-heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--blocks", default=None, help="directory of blocks-<L>.json from bench-device --dump-blocks")
    ap.add_argument("--ours", default=None, help="entropy-kernels binary: side-by-side table (CPU)")
    ap.add_argument("--dtypes", default=None, help="with --ours: comma-separated dtypes (default: --dtype)")
    ap.add_argument("--head-dims", default=None, help="with --ours: comma-separated head dims (default: --head-dim)")
    ap.add_argument("--gemm", action="store_true", help="with --ours: each row's GEMM rate and our share of it")
    a = ap.parse_args()
    if a.ours:
        return side_by_side(a)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    print(f"torch {torch.__version__}, device {a.device}, {torch.get_num_threads()} threads, {a.dtype}")
    print("| tokens | op | ms | GFLOP/s |")
    print("|---:|---:|---:|---:|")
    for length in [int(x) for x in a.lengths.split(",")]:
        g = torch.Generator().manual_seed(length)
        q = torch.randn(1, a.q_heads, length, a.head_dim, generator=g).to(a.device, dtype)
        k = torch.randn(1, a.kv_heads, length, a.head_dim, generator=g).to(a.device, dtype)
        v = torch.randn(1, a.kv_heads, length, a.head_dim, generator=g).to(a.device, dtype)

        def dense():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        s = timed(dense, a.reps, a.device)
        flops = 2.0 * length * length * a.head_dim * a.q_heads
        print(f"| {length} | torch SDPA causal | {s * 1e3:.1f} | {flops / s / 1e9:.1f} |")
        path = os.path.join(a.blocks, f"blocks-{length}.json") if a.blocks else None
        if path and os.path.exists(path):
            with open(path) as f:
                lists = json.load(f)
            pipeline = reference_pipeline(q, k, v, lists)
            s = timed(pipeline, a.reps, a.device)
            print(f"| {length} | reference pipeline (per-segment gather + SDPA) | {s * 1e3:.1f} | - |")


def cpu_model():
    """The CPU's model name and the SIMD/AMX flags that pick our kernels."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16"]
    return model, [f for f in wanted if f in flags]


def ours(binary, length, hq, hkv, d, dtype, reps):
    """(backend line, dense prefill GFLOP/s) from `entropy-kernels bench`."""
    cmd = [binary, "bench", "--ops", "dense", "--lengths", str(length), "--q-heads", str(hq),
           "--kv-heads", str(hkv), "--head-dim", str(d), "--dtype", dtype, "--reps", str(reps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    backend = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("backend:")), "?")
    row = next(l for l in out.splitlines() if "dense prefill" in l)
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    return backend, float(cells[3])


def gemm_rate(dtype, n=4096, reps=3):
    """GFLOP/s of an n³ torch.matmul in dtype (the machine's GEMM rate)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    s = timed(lambda: a @ b, reps, "cpu")
    return 2.0 * n**3 / s / 1e9


def side_by_side(a):
    model, flags = cpu_model()
    dtypes = (a.dtypes or a.dtype).split(",")
    dims = [int(x) for x in (a.head_dims or str(a.head_dim)).split(",")]
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    rows, backend = [], "?"
    for length in [int(x) for x in a.lengths.split(",")]:
        for d in dims:
            for dt in dtypes:
                g = torch.Generator().manual_seed(length)
                q = torch.randn(1, a.q_heads, length, d, generator=g).to(torch_dtype[dt])
                k = torch.randn(1, a.kv_heads, length, d, generator=g).to(torch_dtype[dt])
                v = torch.randn(1, a.kv_heads, length, d, generator=g).to(torch_dtype[dt])
                sec = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                            a.reps, "cpu")
                peer = 2.0 * length * length * d * a.q_heads / sec / 1e9
                del q, k, v
                backend, mine = ours(a.ours, length, a.q_heads, a.kv_heads, d, dt, a.reps)
                # The GEMM right after: a shared machine's rate drifts by ±10% within a run.
                gemm = gemm_rate(torch_dtype[dt], reps=a.reps) if a.gemm else None
                rows.append((length, d, dt, peer, mine, gemm))
    print(f"CPU: {model} ({os.cpu_count()} threads; {', '.join(flags) or 'no AVX2/AVX-512/AMX'})")
    print(f"peer: torch {torch.__version__} scaled_dot_product_attention, causal, "
          f"{torch.get_num_threads()} threads; ours: {backend}")
    print(f"GQA {a.q_heads}/{a.kv_heads}, median of {a.reps}; FLOPs 2·L²·D·Hq")
    if a.gemm:
        print("GEMM: torch.matmul 4096³ in the row's dtype, measured right after our run of the row")
    print()
    gemm_head = " GEMM GFLOP/s | ours / GEMM |" if a.gemm else ""
    print(f"| tokens | D | dtype | PyTorch SDPA GFLOP/s | entropy-kernels GFLOP/s | ratio |{gemm_head}")
    print("|---:|---:|---|---:|---:|---:|" + ("---:|---:|" if a.gemm else ""))
    for length, d, dt, peer, mine, gemm in rows:
        tail = f" {gemm:.0f} | {100 * mine / gemm:.0f}% |" if gemm else ""
        print(f"| {length} | {d} | {dt} | {peer:.1f} | {mine:.1f} | {mine / peer:.2f}× |{tail}")


def timed(fn, reps, device):
    """Median seconds of fn(), after one warm-up call."""

    def run():
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def reference_pipeline(q, k, v, lists):
    """The sparse prefill as per-(kv head, segment) gathers and SDPA calls; q [1, Hq, L, D], k and v
    [1, Hkv, L, D]; batch 1. The sparse units' index tensors and masks are built once, outside the
    timed call."""
    dims = lists["dims"]
    length, seg, blk = dims["seq_len"], dims["segment_size"], dims["block_size"]
    hkv, nseg = dims["kv_heads"], dims["segments"]
    assert dims["batch"] == 1 and q.shape[2] == length and k.shape[1] == hkv
    group = q.shape[1] // hkv
    dev = q.device
    steps = []
    for h in range(hkv):
        for s in range(nseg):
            u = h * nseg + s
            t0, t1 = s * seg, min((s + 1) * seg, length)
            rows = torch.arange(t0, t1, device=dev)[:, None]
            if lists["dense"][u]:
                # Causal over the whole prefix; the mask is built in the call (it can be large).
                keys, mask = None, None
            else:
                sel = torch.tensor(lists["indices"][lists["indptr"][u] : lists["indptr"][u + 1]], device=dev)
                keys = (sel[:, None] * blk + torch.arange(blk, device=dev)[None, :]).flatten()
                own = torch.arange(t0, t1, device=dev)[None, :] <= rows
                mask = torch.cat([torch.ones(t1 - t0, keys.numel(), dtype=torch.bool, device=dev), own], dim=1)
            steps.append((h, t0, t1, keys, mask))

    def run():
        out = torch.empty_like(q)
        for h, t0, t1, keys, mask in steps:
            qs = q[:, h * group : (h + 1) * group, t0:t1]
            if keys is None:
                ks, vs = k[:, h : h + 1, :t1], v[:, h : h + 1, :t1]
                mask = torch.arange(t1, device=q.device)[None, :] <= torch.arange(t0, t1, device=q.device)[:, None]
            else:
                ks = torch.cat([k[:, h : h + 1, keys], k[:, h : h + 1, t0:t1]], dim=2)
                vs = torch.cat([v[:, h : h + 1, keys], v[:, h : h + 1, t0:t1]], dim=2)
            ks, vs = ks.expand(-1, group, -1, -1), vs.expand(-1, group, -1, -1)
            out[:, h * group : (h + 1) * group, t0:t1] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        return out

    return run


if __name__ == "__main__":
    main()
