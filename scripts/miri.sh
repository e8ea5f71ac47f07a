#!/usr/bin/env bash
# Runs tests/miri.rs under Miri: every CPU-backend and oracle operation (plan with and without
# fusion, sparse/dense/combined prefill with LSE, every compression mode, decode, the observation
# window) on small shapes with strided, transposed and fused-QKV views, GQA, partial segments and
# every dtype, plus the crate's unit tests (fallible allocation helpers). Tree borrows (stacked
# borrows trips over crossbeam-epoch inside rayon); leaks ignored (rayon's global pool).
# Under Miri the CPU backend runs its portable path: the AVX-512/AVX2 kernels are outside it (the
# fuzz harness and the oracle comparisons cover them natively).
#
# Needs: rustup toolchain install nightly --component miri,rust-src
# Usage: scripts/miri.sh [extra cargo miri test args]   (about 15-30 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-tree-borrows -Zmiri-ignore-leaks -Zmiri-disable-isolation}"
# Miri's own target dir, so it never invalidates the native build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/miri}"
cargo +nightly miri setup
cargo +nightly miri test --no-default-features --lib alloc:: "$@"
cargo +nightly miri test --no-default-features --test miri "$@"
