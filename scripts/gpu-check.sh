#!/usr/bin/env bash
# One call on a lent GPU machine (see benches/RESULTS.md for what it produced). Prepare here with
# scripts/gpu-build.sh, then run through the device tool with carry [".gpu"]:
#     scripts/gpu-check.sh [all|tests|sanitize|bench]
# It runs the CUDA backend's tests, compute-sanitizer memcheck and racecheck over them, and the
# benchmarks (ours and PyTorch's SDPA), writing every log to $OUT (or ./gpu-out). A part name
# runs only that part: for sessions whose 10-minute call limit the whole script would exceed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"; mkdir -p "$out"
# gpu-build.sh packs the binaries and cases (they would not fit a call's carry unpacked).
if [ -f .gpu/bundle.tar.xz ] && [ ! -d .gpu/bin ]; then
  python3 -c 'import tarfile; tarfile.open(".gpu/bundle.tar.xz").extractall(".gpu")' || exit 1
fi
export ENTROPY_KERNELS_CONFORMANCE="$PWD/.gpu/conformance"
export ENTROPY_KERNELS_CACHE="$PWD/.gpu/cache"
# NVRTC: the toolkit's, else the pip wheel PyTorch brought.
for d in /usr/local/cuda/lib64 $(python3 -c 'import os, nvidia; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so" ] || ls "$d"/libnvrtc.so.* >/dev/null 2>&1 && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -1
  .gpu/bin/entropy-kernels backends
} 2>&1 | tee "$out/device.txt"

part="${1:-all}"
want() { [ "$part" = all ] || [ "$part" = "$1" ]; }
status=0
run() { local name=$1; shift; echo "== $name: $*"; "$@" > "$out/$name.log" 2>&1; local rc=$?; tail -5 "$out/$name.log"; [ $rc -eq 0 ] || status=1; }
# Tests of the CUDA backend against the oracle (the CPU backend's run too; they are cheap).
if want tests; then
run test-matrix .gpu/bin/matrix --test-threads 1
run test-conformance .gpu/bin/conformance --test-threads 1
run test-bad-input .gpu/bin/bad_input
run test-invariants .gpu/bin/invariants
run test-cuda-device .gpu/bin/cuda_device --test-threads 1
[ -x .gpu/bin/candle_cuda ] && run test-candle-cuda .gpu/bin/candle_cuda --test-threads 1
fi
# Memory and race checks of the CUDA tests only.
if want sanitize && command -v compute-sanitizer >/dev/null; then
  run memcheck compute-sanitizer --tool memcheck --error-exitcode 1 .gpu/bin/matrix cuda --test-threads 1
  run racecheck compute-sanitizer --tool racecheck --error-exitcode 1 .gpu/bin/matrix mha_d64::cuda --test-threads 1
fi
# Benchmarks. bench-device: the kernels on device-resident tensors (the issue's targets: dense
# TFLOP/s, sparse vs dense, planning share, kv_compress and decode against the copy bandwidth
# measured in the same run), the prefill tile both ways; bench: the host API, transfers included.
if want bench; then
for m in 64 128; do
  ENTROPY_KERNELS_PREFILL_TILE=$m run device-16k-m$m .gpu/bin/entropy-kernels bench-device --dtype bf16 --q-heads 32 --kv-heads 8 --head-dim 128 --lengths 16384 --ops dense,sparse --reps 5 --dump-blocks "$out/blocks"
done
run device-128k .gpu/bin/entropy-kernels bench-device --dtype bf16 --q-heads 32 --kv-heads 8 --head-dim 128 --lengths 131072 --ops dense,sparse,compress,decode --reps 3 --dump-blocks "$out/blocks"
run bench-16k-host .gpu/bin/entropy-kernels bench --backend cuda --dtype bf16 --q-heads 32 --kv-heads 8 --head-dim 128 --lengths 16384 --ops dense,sparse,decode --reps 3
run peer-sdpa python3 benches/peer_sdpa.py --device cuda --dtype bf16 --q-heads 32 --kv-heads 8 --head-dim 128 --lengths 16384,131072 --blocks "$out/blocks"
fi
grep -h "|" "$out"/device-*.log "$out"/bench-*.log "$out"/peer-sdpa.log > "$out/summary.md" 2>/dev/null
exit $status
