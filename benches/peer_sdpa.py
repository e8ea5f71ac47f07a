#!/usr/bin/env python3
"""Peer baseline: PyTorch's scaled_dot_product_attention, causal, on the shapes `entropy-kernels
bench` uses (BSND inputs transposed to the [B, H, L, D] layout SDPA expects, GQA via enable_gqa).

    pip install torch numpy          # the CPU path needs no CUDA libraries
    python3 benches/peer_sdpa.py --lengths 8192,16384 --q-heads 8 --kv-heads 2 --head-dim 128
    python3 benches/peer_sdpa.py --device cuda --dtype bf16 --lengths 16384 --q-heads 32 --kv-heads 8

FLOPs are counted like the crate counts them: 2·L²·D·Hq for a causal prefill.
"""
import argparse
import statistics
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
    a = ap.parse_args()
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    print(f"torch {torch.__version__}, device {a.device}, {torch.get_num_threads()} threads, {a.dtype}")
    print("| tokens | op | ms | GFLOP/s |")
    print("|---:|---:|---:|---:|")
    for length in [int(x) for x in a.lengths.split(",")]:
        g = torch.Generator().manual_seed(length)
        q = torch.randn(1, a.q_heads, length, a.head_dim, generator=g).to(a.device, dtype)
        k = torch.randn(1, a.kv_heads, length, a.head_dim, generator=g).to(a.device, dtype)
        v = torch.randn(1, a.kv_heads, length, a.head_dim, generator=g).to(a.device, dtype)

        def run():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out

        run()
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        flops = 2.0 * length * length * a.head_dim * a.q_heads
        print(f"| {length} | torch SDPA causal | {s * 1e3:.1f} | {flops / s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
