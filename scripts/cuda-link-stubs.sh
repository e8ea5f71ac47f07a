#!/usr/bin/env bash
# A CUDA_HOME for building and linking `--features candle-cuda` on a machine without a GPU driver
# or a full toolkit (CI, this repository's dev machines): nvcc, headers, cudart and NVRTC from the
# pip CUDA 13.0 packages, plus link stubs for the libraries candle-core links and pip does not give
# here — libcuda (driver), cuBLAS, cuBLASLt, cuRAND. Every stub function returns
# CUDA_ERROR_STUB_LIBRARY (34), like the toolkit's own lib64/stubs/libcuda.so: a binary linked
# against them starts, finds no device (cuInit fails) and the GPU tests print their skip. On a
# GPU machine the real libraries (same SONAMEs) are found first and the stubs are never loaded.
#
# Usage: scripts/cuda-link-stubs.sh [DIR]   (default: target/cuda-stubs) — prints DIR; then
#   export CUDA_HOME=DIR PATH=DIR/bin:$PATH LD_LIBRARY_PATH=DIR/lib64:$LD_LIBRARY_PATH CUDA_COMPUTE_CAP=80
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$root/target/cuda-stubs}"
cu13="$(python3 -c 'import os, nvidia; print(os.path.join(nvidia.__path__[0], "cu13"))')"
[ -x "$cu13/bin/nvcc" ] || { echo "no pip CUDA 13.0 nvcc in $cu13 (pip install \"cuda-toolkit[nvrtc,cudart,crt,cccl,nvcc,nvvm]==13.0.2\")" >&2; exit 1; }
# The symbol names come from the cudarc sources cargo fetched for this lock file.
cudarc="$(cd "$root" && cargo metadata --format-version 1 --locked --features candle-cuda 2>/dev/null \
  | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')"
mkdir -p "$dir/lib64" "$dir/src"
ln -sfn "$cu13/bin" "$dir/bin"
ln -sfn "$cu13/include" "$dir/include"
ln -sfn "$cu13/nvvm" "$dir/nvvm"
ln -sf "$cu13/lib/libcudart.so.13" "$dir/lib64/libcudart.so"
ln -sf "$cu13/lib/libnvrtc.so.13" "$dir/lib64/libnvrtc.so"
# stub LIB SONAME PREFIX SYS_MODULE
stub() {
  local lib=$1 soname=$2 prefix=$3 module=$4 c="$dir/src/$1.c"
  grep -ohE "fn ${prefix}[A-Za-z0-9_]*\(" "$cudarc/src/$module/sys/"*.rs | sed -E 's/^fn (.*)\($/\1/' | sort -u \
    | awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$c"
  cc -shared -fPIC -o "$dir/lib64/$lib.so" -Wl,-soname,"$soname" "$c"
  ln -sf "$lib.so" "$dir/lib64/$soname"
}
stub libcuda libcuda.so.1 cu driver
stub libcublas libcublas.so.13 cublas cublas
stub libcublasLt libcublasLt.so.13 cublasLt cublaslt
stub libcurand libcurand.so.10 curand curand
echo "$dir"
