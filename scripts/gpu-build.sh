#!/usr/bin/env bash
# Builds, here (x86-64, no GPU needed), everything scripts/gpu-check.sh runs on a lent GPU
# machine, which has CUDA, PyTorch and compute-sanitizer but no Rust toolchain: the CUDA-enabled
# test binaries and CLI, stripped, plus the conformance cases, packed in .gpu/bundle.tar.xz
# (git-ignored; name .gpu in the device tool's `carry`), under the 64 MiB a call may carry.
#   scripts/gpu-build.sh              the bundle for a GPU (feature `cuda`)
#   scripts/gpu-build.sh --emulator   the rehearsal's bundle (`cuda,cuda-emu`: gpu-check.sh --emulator)
set -euo pipefail
cd "$(dirname "$0")/.."
features=cuda
emulator=0
if [ "${1:-}" = "--emulator" ]; then features=cuda,cuda-emu; emulator=1; fi
exclude=$(git rev-parse --git-path info/exclude)  # a fresh clone may lack .git/info
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
# The kernels must come embedded (nvcc's fatbin): NVRTC on the device would compile all of them
# inside the first part's time limit.
nvcc="${NVCC:-${CUDA_HOME:+$CUDA_HOME/bin/nvcc}}"
[ -n "$nvcc" ] || nvcc=$(command -v nvcc || true)
[ -n "$nvcc" ] && "$nvcc" --version >/dev/null 2>&1 || { echo "no nvcc (NVCC, CUDA_HOME or PATH): the bundle would compile its kernels on the device" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu/bin .gpu/conformance
cargo build --release --features "$features" --bins
cargo test --release --features "$features" --no-run --message-format=json \
  --test matrix --test conformance --test bad_input --test invariants --test cuda_device 2>/dev/null \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], ".gpu/bin/" + m["target"]["name"])
'
cp target/release/entropy-kernels .gpu/bin/
# candle on CUDA storage: linked against stubs here (scripts/cuda-link-stubs.sh); on the GPU machine
# the real libcuda, cuBLAS 13 and cuRAND (SONAMEs libcublas.so.13, libcurand.so.10) must be found.
if [ "$emulator" = 0 ] && stubs=$(scripts/cuda-link-stubs.sh); then
  CUDA_HOME="$stubs" PATH="$stubs/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" \
    cargo test --release --features candle-cuda --no-run --message-format=json --test candle_cuda 2>/dev/null \
    | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        shutil.copy(m["executable"], ".gpu/bin/candle_cuda")
'
fi
strip .gpu/bin/*
conformance="${ENTROPY_KERNELS_CONFORMANCE:-../shared/conformance}"
for f in planted_gqa_partial planted_mha_exact planted_fusion smollm2_gpl_layer14; do
  cp "$conformance/$f.safetensors" .gpu/conformance/ || { echo "missing conformance case $f in $conformance" >&2; exit 1; }
done
git rev-parse --short HEAD > .gpu/commit 2>/dev/null || echo unknown > .gpu/commit
[ "$emulator" = 1 ] && touch .gpu/emulator
# Unpacked this is ~100 MB (candle's kernels alone make candle_cuda 38 MB): over the 64 MiB a
# device call may carry. Packed with xz it is ~31 MB; gpu-check.sh unpacks it on the device.
du -sh .gpu/* >&2
tar -C .gpu -cf - bin conformance | xz -T0 -6 > .gpu-bundle.tar.xz
rm -rf .gpu/bin .gpu/conformance && mv .gpu-bundle.tar.xz .gpu/bundle.tar.xz
size=$(stat -c %s .gpu/bundle.tar.xz)
echo ".gpu/bundle.tar.xz: $((size >> 20)) MiB" >&2
[ "$size" -lt $((60 << 20)) ] || { echo "the bundle exceeds 60 MiB: the device call could not carry it" >&2; exit 1; }
