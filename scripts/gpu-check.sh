#!/usr/bin/env bash
# The device check: one call on a lent GPU machine (a window of at most 15 minutes, its start
# included), in at most 8 minutes, in this order:
#   open        the backend opens as `auto` would and lists each kernel's limits (cuda-info)
#   tests       conformance, the case matrix's CUDA rows, the device API tests, the smoke cases
#   sanitizer   compute-sanitizer memcheck, racecheck and synccheck over one small case per kernel
#   bench       bench-device at 16K (both prefill tiles) and 128K, then torch SDPA and the
#               per-segment gather + SDPA reference pipeline on the same block lists
# Every part prints PASS, FAIL or SKIP (with the reason) and the script goes on after a failure;
# logs and summary.md go to the output directory. Exit status: 0 only if no part failed.
#
#   scripts/gpu-build.sh                      # here: build and pack .gpu/bundle.tar.xz
#   scripts/gpu-check.sh [OUTDIR]             # on the device (carry [".gpu"]); OUTDIR: $OUT or ./gpu-out
#   scripts/gpu-build.sh --emulator && scripts/gpu-check.sh --emulator OUTDIR
#                                             # the rehearsal: the same script on the emulated driver
#
# GPU_CHECK_SECONDS (default 470) bounds the whole run: each part gets at most its own limit and
# what is left; a part that would start with under 10 s left is skipped. Name the device kind
# `nvidia-h100-x1`: compute-sanitizer has been refused on machines of the other kind (gVisor).
# The bundle embeds the nvcc fatbin (gpu-build.sh insists), so nothing compiles on the device.
set -uo pipefail
cd "$(dirname "$0")/.."
emulator=0
if [ "${1:-}" = "--emulator" ]; then emulator=1; shift; fi
out="${1:-${OUT:-gpu-out}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
# On the emulated driver every kernel runs on the host CPU: limits stretch by GPU_CHECK_EMU_SCALE.
scale=1
if [ "$emulator" = 1 ]; then scale="${GPU_CHECK_EMU_SCALE:-10}"; fi
budget="${GPU_CHECK_SECONDS:-$((470 * scale))}"
start=$(date +%s)

# gpu-build.sh packs the binaries and cases (they would not fit a call's carry unpacked).
if [ -f .gpu/bundle.tar.xz ] && [ ! -d .gpu/bin ]; then
  python3 -c 'import tarfile; tarfile.open(".gpu/bundle.tar.xz").extractall(".gpu")' || { echo "cannot unpack .gpu/bundle.tar.xz" >&2; exit 1; }
fi
[ -x .gpu/bin/entropy-kernels ] || { echo "no .gpu/bin: run scripts/gpu-build.sh first" >&2; exit 1; }
if [ "$emulator" = 1 ] && [ ! -f .gpu/emulator ]; then echo "the bundle was built without --emulator" >&2; exit 1; fi
if [ "$emulator" = 0 ] && [ -f .gpu/emulator ]; then echo "the bundle was built for the emulator" >&2; exit 1; fi
bin="$PWD/.gpu/bin"
export ENTROPY_KERNELS_CONFORMANCE="$PWD/.gpu/conformance"
export ENTROPY_KERNELS_CACHE="$PWD/.gpu/cache"
export CI=true  # a missing backend, case or library is a failure, not a skip
if [ "$emulator" = 1 ]; then
  export ENTROPY_KERNELS_CUDA_EMU=1
else
  # NVRTC (for architectures the embedded fatbin lacks): the toolkit's, else PyTorch's wheel.
  for d in /usr/local/cuda/lib64 $(python3 -c 'import os, nvidia; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
    if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; fi
  done
fi

summary="$out/summary.md"
{
  echo "# gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) ($( [ "$emulator" = 1 ] && echo "emulated driver" || echo "GPU"))"
  echo
  if [ "$emulator" = 0 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/device: /'; fi
  echo "commit: $(cat .gpu/commit 2>/dev/null || echo unknown)"
  echo
  echo "| part | result | seconds |"
  echo "|---|---|---:|"
} > "$summary"
status=0

# part NAME LIMIT CMD...: runs CMD with a time limit, its output in NAME.log.
part() {
  local name=$1 limit=$(($2 * scale)); shift 2
  local left=$((budget - ($(date +%s) - start)))
  if [ "$left" -lt 10 ]; then
    echo "| $name | SKIP: the ${budget}s budget is spent | |" >> "$summary"; echo "== $name: SKIP (out of time)"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (≤ ${limit}s): $*"
  local t0=$(date +%s) rc verdict
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  # A CUDA test that skipped did not test the GPU.
  if [ $rc -eq 0 ] && grep -qiE "SKIP.*cuda|cuda.*SKIP" "$out/$name.log"; then rc=3; fi
  case $rc in
    0) verdict=PASS ;;
    124) verdict="FAIL: timed out after ${limit}s"; status=1 ;;
    3) verdict="FAIL: the CUDA backend was skipped"; status=1 ;;
    *) verdict="FAIL: exit $rc"; status=1 ;;
  esac
  echo "| $name | $verdict | $(($(date +%s) - t0)) |" >> "$summary"
  echo "   $verdict"; tail -n 3 "$out/$name.log" | sed 's/^/   /'
}
skip() { echo "| $1 | SKIP: $2 | |" >> "$summary"; echo "== $1: SKIP ($2)"; }

# 1. Open.
part open 60 "$bin/entropy-kernels" cuda-info

# 2. Tests against the oracle (--nocapture: a skip's message reaches the log, and fails the part).
part conformance 100 "$bin/conformance" --test-threads 8 --nocapture
part matrix 90 "$bin/matrix" cuda --test-threads 8 --nocapture
part cuda-device 60 "$bin/cuda_device" --test-threads 4 --nocapture
part smoke 60 "$bin/entropy-kernels" cuda-smoke

# 3. compute-sanitizer over the smoke cases (every kernel once). Some machines' sandboxes
# (gVisor) refuse the sanitizer the device ("Device not supported"): a one-case probe tells that
# environment apart from a finding, and the parts are then skipped with its message.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ "$emulator" = 1 ]; then
  for tool in memcheck racecheck synccheck; do skip "$tool" "compute-sanitizer needs a GPU (the emulator checks bounds, barriers and shared-memory races itself)"; done
elif [ -z "$sanitizer" ]; then
  for tool in memcheck racecheck synccheck; do skip "$tool" "compute-sanitizer not found"; done
  status=1
elif ! timeout 60 "$sanitizer" --tool memcheck "$bin/entropy-kernels" cuda-smoke --only numerics > "$out/sanitizer-probe.log" 2>&1 \
     && grep -qiE "not supported|error 999|unknown error" "$out/sanitizer-probe.log"; then
  why=$(grep -m1 -iE "not supported|error 999|unknown error" "$out/sanitizer-probe.log")
  for tool in memcheck racecheck synccheck; do skip "$tool" "this machine's environment refuses compute-sanitizer: $why"; done
else
  part memcheck 60 "$sanitizer" --tool memcheck --leak-check full --error-exitcode 1 "$bin/entropy-kernels" cuda-smoke
  part racecheck 90 "$sanitizer" --tool racecheck --racecheck-report all --error-exitcode 1 "$bin/entropy-kernels" cuda-smoke
  part synccheck 60 "$sanitizer" --tool synccheck --error-exitcode 1 "$bin/entropy-kernels" cuda-smoke
fi

# 4. Benchmarks: ours on device-resident tensors, then the peers on the same shapes and lists.
if [ "$emulator" = 1 ]; then
  hq=4; hkv=2; hd=64; short=1100; long=1300
  extra=(--reps 1 --decode-batch 2 --decode-cache 300 --compact-from 300 --compact-to 64 --copy-bytes 1048576)
else
  hq=32; hkv=8; hd=128; short=16384; long=131072
  extra=()
fi
shape=(--dtype bf16 --q-heads $hq --kv-heads $hkv --head-dim $hd "${extra[@]}")
for m in 64 128; do
  ENTROPY_KERNELS_PREFILL_TILE=$m part "bench-$short-m$m" 60 "$bin/entropy-kernels" bench-device "${shape[@]}" --lengths $short --ops dense,sparse --dump-blocks "$out/blocks"
done
part "bench-$long" 120 "$bin/entropy-kernels" bench-device "${shape[@]}" --lengths $long --ops dense,sparse,compress,decode,paged-decode --dump-blocks "$out/blocks"
# Selection + in-place compaction of 64 sequences × 128K entries × 8 kv heads to 1024 (34 GB of pools in bf16).
part bench-compaction 90 "$bin/entropy-kernels" bench-device "${shape[@]}" --ops compaction
part bench-chunked 150 "$bin/entropy-kernels" bench-device "${shape[@]}" --ops chunked-prefill --chunk-prompts 4 --chunk-len 32768 --chunk 8192 --reps 2
if python3 -c 'import torch' 2>/dev/null; then
  device=cuda; [ "$emulator" = 1 ] && device=cpu
  part peer-sdpa 90 python3 benches/peer_sdpa.py --device $device --dtype bf16 --q-heads $hq --kv-heads $hkv --head-dim $hd --lengths "$short,$long" --blocks "$out/blocks"
else
  skip peer-sdpa "PyTorch not installed here"
  [ "$emulator" = 0 ] && status=1
fi

{
  echo
  echo "total: $(($(date +%s) - start)) s"
  echo
  grep -h "^|" "$out"/bench-*.log "$out"/peer-sdpa.log 2>/dev/null
} >> "$summary"
cat "$summary"
exit $status
