#!/usr/bin/env bash
# Mutation testing of the kernels and the planning code with cargo-mutants (crates.io:
# `cargo install cargo-mutants --locked`): each mutant of the CPU attention, decode, compression
# and planning kernels (src/cpu/{tile,attention,decode,compress,plan,plan_logits,plan_reps,simd_f64}.rs) and of the shared
# decision and selection rules (src/plan.rs, src/compress.rs) must fail the tests that compare
# with the oracle (tests/matrix.rs, tests/check_power.rs, tests/invariants.rs, tests/miri.rs,
# tests/fuzz.rs) or check validation's errors (tests/soundness.rs). The default run is one fixed
# shard (1/20 round robin, ~50 mutants: about 40 minutes on 2 cores); SHARD=k/20 runs another,
# SHARD=all every one (~1000, most of a day). Which mutants a shard holds moves with the code.
# Results: mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
shard="${SHARD:-0/20}"
args=()
[ "$shard" != all ] && args+=(--shard "$shard")
# Incremental release builds without debug info: a mutant rebuilds in ~20 s instead of ~90 s.
export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_INCREMENTAL=true CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/mutants}"
exec cargo mutants --profile release --no-shuffle --sharding round-robin "${args[@]}" \
  --file src/cpu/tile.rs --file src/cpu/attention.rs --file src/cpu/decode.rs --file src/cpu/compress.rs \
  --file src/cpu/plan.rs --file src/cpu/plan_logits.rs --file src/cpu/plan_reps.rs --file src/cpu/simd_f64.rs --file src/plan.rs --file src/compress.rs \
  --timeout-multiplier 4 --build-timeout-multiplier 4 "$@" \
  -C --test=matrix -C --test=check_power -C --test=invariants -C --test=miri -C --test=fuzz -C --test=soundness
