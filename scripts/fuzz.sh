#!/usr/bin/env bash
# A short run of every cargo-fuzz target (fuzz/fuzz_targets), each from its corpus in
# fuzz/corpus/<target> (kept between runs, not committed). cargo-fuzz needs nightly flags: the
# stable toolchain, which ships the sanitizer runtimes, takes them with RUSTC_BOOTSTRAP=1.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 20; long runs: hours, one target at a time,
#                                             `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET`)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-20}
log() { printf '[fuzz] %s\n' "$*" >&2; }
command -v cargo-fuzz >/dev/null || { log "installing cargo-fuzz"; cargo install cargo-fuzz --locked -q; }
export RUSTC_BOOTSTRAP=1
cd "$root/fuzz"
out=$(mktemp)
# The targets' own files (a drive, staging directories) go to a directory of this run's, removed
# with it: a fuzzer ends by exit(), so the targets cannot clean up after themselves.
scratch=$(mktemp -d)
trap 'rm -f "$out"; rm -rf "$scratch"' EXIT
log "building the targets"
cargo fuzz build -O >"$out" 2>&1 || { cat "$out" >&2; exit 1; }
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  if ! TMPDIR="$scratch" cargo fuzz run -O "$target" "corpus/$target" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$out" 2>&1; then
    tail -n 60 "$out" >&2
    log "$target failed (the input that did it is under fuzz/artifacts/$target)"
    exit 1
  fi
  log "$target: $(grep -E '^Done [0-9]+ runs' "$out" | tail -n 1)"
done
log "no target found a crash"
