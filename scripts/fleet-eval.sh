#!/usr/bin/env bash
# The autoscaler against fixed keep-alive and the hybrid-histogram policy on generated fleets:
# one markdown table row per seed (the README's fleet table), from `ember simulate --generate
# fleet` with its defaults and whatever extra flags are given.
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
echo "| seed | functions | invocations | ember cold starts | idle clone-s | keep-alive 10 min cold starts | idle clone-s | hybrid cold starts | idle clone-s | met |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for seed in "${seeds[@]}"; do
  out=$(target/release/ember simulate --generate fleet --seed "$seed" "$@" --per-function /dev/stdout)
  # The per-function CSV comes first (functions invoked), then the report.
  functions=$(grep -c '^[a-z].*-[0-9]*,' <<<"$out" || true)
  invocations=$(sed -n 's/^ember simulate:.*(\([0-9]*\) invocations).*/\1/p' <<<"$out")
  awk -v seed="$seed" -v fns="$functions" -v inv="$invocations" '
    /^ember autoscaler / { ec = $3; er = $4; ei = $5 }
    /^keep-alive / { kc = $4; kr = $5; ki = $6 }
    /^hybrid histogram / { hc = $3; hr = $4; hi = $5 }
    END {
      met = (ec / inv < 1e-4 && ei < ki && ei < hi) ? "yes" : "no"
      printf "| %s | %s | %d | %d (%s) | %.0f | %d (%s) | %.0f | %d (%s) | %.0f | %s |\n",
        seed, fns, inv, ec, er, ei, kc, kr, ki, hc, hr, hi, met
    }' <<<"$out"
done
