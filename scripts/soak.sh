#!/usr/bin/env bash
# Soak mode: the randomised tests on many fresh seeds, to find tolerance and decision edges before
# users do. ENTROPY_KERNELS_SOAK=N runs every case of the matrix, the conformance cases' random
# twins and the checks' power tests on N seeds in one process; the other seeded tests (invariants,
# the fuzz harness, the Ascend emulator's tests) are rerun with fresh seeds, one round per ten.
# Every failure names its case and seed; replay one with ENTROPY_KERNELS_SEED=<seed>.
#
# Usage: scripts/soak.sh [N=50]   (FEATURES=ascend-emu by default; eval "$(scripts/test-env.sh)"
# first for the conformance cases; several hours at N=50 on 2 cores with the emulators)
set -uo pipefail
cd "$(dirname "$0")/.."
n="${1:-50}"
features="${FEATURES:-ascend-emu}"
log="target/soak-$(date +%Y%m%d-%H%M%S).log"
mkdir -p target
failed=0
run() {
  echo "== $*" | tee -a "$log"
  "$@" >>"$log" 2>&1 || { failed=1; echo "   FAILED (see $log)"; }
}
run env ENTROPY_KERNELS_SOAK="$n" cargo test --release --features "$features" --test matrix --test check_power --test conformance
extra=()
[[ "$features" == *ascend-emu* ]] && extra+=(--test ascend_emu)
for _ in $(seq $(((n + 9) / 10))); do
  run cargo test --release --features "$features" --test invariants --test fuzz "${extra[@]}"
done
grep -E "panicked at|FINDING|replay|with seed" "$log" | sort | uniq | head -50
exit $failed
