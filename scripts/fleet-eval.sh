#!/usr/bin/env bash
# The autoscaler against fixed keep-alive and the hybrid-histogram policy on generated fleets:
# one markdown table row per seed (the benchmarks page's fleet table), from `ember simulate
# --generate fleet --json` with its defaults and whatever extra flags are given. The last column
# says which of the issue's targets hold: cold starts under 0.01% of invocations, restores at most
# 5% of them, the peak (per function, summed) at most 1.25x keep-alive's, idle clone-seconds at
# most the hybrid policy's.
#
#   scripts/fleet-eval.sh SEED... [-- EXTRA SIMULATE FLAGS...]
#   scripts/fleet-eval.sh 101 102 103 -- --functions 400 --max-rate 30
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seeds=()
while (($#)) && [[ $1 != -- ]]; do seeds+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
((${#seeds[@]})) || { echo "usage: $0 SEED... [-- FLAGS...]" >&2; exit 2; }
cargo build -q --release
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "| seed | invocations | policy | cold starts | restores / invocation | idle clone-s | peak (per function, summed) | host peak | targets |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for seed in "${seeds[@]}"; do
  target/release/ember simulate --generate fleet --seed "$seed" "$@" --json "$tmp/$seed.json" > /dev/null
  python3 - "$seed" "$tmp/$seed.json" <<'PY'
import json, sys
seed, path = sys.argv[1], sys.argv[2]
e, k, h = json.load(open(path))["policies"]
held = {
    "cold": e["cold_start_rate"] < 1e-4,
    "restores": e["restores_per_invocation"] <= 0.05,
    "peak": e["peak_clones"] <= 1.25 * k["peak_clones"],
    "idle": e["idle_clone_seconds"] <= h["idle_clone_seconds"],
}
met = ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok in held.items())
for b, note in ((e, met), (k, ""), (h, "")):
    print(f"| {seed} | {b['invocations']} | {b['policy']} | {b['cold_starts']} ({100 * b['cold_start_rate']:.4f}%) "
          f"| {100 * b['restores_per_invocation']:.2f}% | {b['idle_clone_seconds']:.0f} | {b['peak_clones']} "
          f"| {b['host_peak_clones']} | {note} |")
PY
done
