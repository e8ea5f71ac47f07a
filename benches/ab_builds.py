#!/usr/bin/env python3
"""Same-moment A/B of two builds of `entropy-kernels`: each round runs build A pinned to one core
and build B pinned to another *at the same time* (single-threaded `bench`), then swaps the cores
for the next round; it reports B/A per round and the median.

Why: on the shared 2-core VMs this project is measured on, one build's `bench` figure moves by
±5-10% from one minute to the next (neighbours, clocks), more than most changes worth testing.
Two builds measured in turn inherit that drift; two builds measured side by side see the same
machine at the same moment. It narrows the noise, it does not remove it: a build against itself
(2-core Xeon, 2026-12-07, 8 rounds, D 128 f32 4K) gave medians 0.999, 1.001 and 1.053 in three
runs, single rounds 0.88-1.21. Take the median of 8 or more rounds, repeat the run, and run
the build against itself in the same session to know the floor before believing a few percent.

    cargo build --release && cp target/release/entropy-kernels /tmp/ek-a
    # ... change, build again ...
    python3 benches/ab_builds.py /tmp/ek-a target/release/entropy-kernels \\
        --rounds 8 --head-dim 128 --lengths 4096 --dtype f32 --ops dense

Needs `taskset` (util-linux) and at least two cores. The figure compared is the GFLOP/s column of
the op's row (`dense prefill`, `sparse attention`) or, with --ms, its milliseconds.
"""
import argparse
import concurrent.futures as cf
import os
import statistics
import subprocess
import sys


def figure(binary, cpu, a):
    cmd = ["taskset", "-c", str(cpu), binary, "bench", "--threads", "1", "--ops", a.ops,
           "--lengths", a.lengths, "--head-dim", str(a.head_dim), "--q-heads", str(a.q_heads),
           "--kv-heads", str(a.kv_heads), "--dtype", a.dtype, "--reps", str(a.reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 4 and cells[2] == a.row:
            return float(cells[3] if a.ms else cells[4])
    sys.exit(f"no '{a.row}' row in the output of {' '.join(cmd)}:\n{out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="baseline binary")
    ap.add_argument("b", help="candidate binary")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--ops", default="dense")
    ap.add_argument("--row", default=None, help="the table row compared (default: 'dense prefill' or 'sparse attention')")
    ap.add_argument("--lengths", default="4096", help="one prompt length")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--q-heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ms", action="store_true", help="compare milliseconds (lower is better) instead of GFLOP/s")
    ap.add_argument("--cpus", default="0,1", help="the two cores to pin to")
    a = ap.parse_args()
    a.row = a.row or {"dense": "dense prefill", "sparse": "sparse attention"}.get(a.ops, a.ops)
    if "," in a.lengths:
        sys.exit("--lengths: one length (each round compares one figure)")
    cpus = [int(c) for c in a.cpus.split(",")]
    if len(cpus) != 2 or len(os.sched_getaffinity(0) & set(cpus)) != 2:
        sys.exit(f"--cpus {a.cpus}: need two cores this process may run on")
    ratios = []
    print(f"A = {a.a}\nB = {a.b}\n{a.ops} {a.dtype}, L {a.lengths}, GQA {a.q_heads}/{a.kv_heads}, D {a.head_dim}, "
          f"one thread each, {'ms' if a.ms else 'GFLOP/s'}")
    print("| round | A (core) | B (core) | B/A |\n|---:|---:|---:|---:|")
    with cf.ThreadPoolExecutor(2) as pool:
        for i in range(a.rounds):
            ca, cb = (cpus[0], cpus[1]) if i % 2 == 0 else (cpus[1], cpus[0])
            fa, fb = pool.submit(figure, a.a, ca, a), pool.submit(figure, a.b, cb, a)
            x, y = fa.result(), fb.result()
            r = x / y if a.ms else y / x
            ratios.append(r)
            print(f"| {i} | {x} ({ca}) | {y} ({cb}) | {r:.3f} |", flush=True)
    print(f"B/A (>1: B faster): median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
