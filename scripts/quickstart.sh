#!/usr/bin/env bash
# Runs the README's quickstart exactly as written (the ```sh blocks each preceded by a
# `<!-- quickstart -->` line, in order, in one shell in the repository root), then checks what it
# printed: the front door cannot rot. Needs what scripts/setup.sh built (target/release/ember,
# images/, the python3 layer's tree) and curl.
#
#   scripts/quickstart.sh [TIMEOUT_S]     (default 600)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
log() { printf '[quickstart] %s\n' "$*" >&2; }

blocks=$(awk '
  /^<!-- quickstart -->$/ { want = 1; next }
  want && /^```sh$/ { inside = 1; want = 0; n++; next }
  inside && /^```$/ { inside = 0; print ""; next }
  inside { print }
  END { if (n == 0) exit 1 }
' README.md) || { log "README.md has no quickstart blocks"; exit 1; }

command -v curl >/dev/null || { log "curl is missing (apt-get install curl)"; exit 1; }
rm -rf /tmp/ember-quickstart
out=$(mktemp)
trap 'rm -f "$out"; rm -rf /tmp/ember-quickstart' EXIT
# The daemon the quickstart starts in the background goes when the shell that runs it ends.
script=$(printf '%s\n' "set -euo pipefail" "trap 'kill \$(jobs -p) 2>/dev/null || true; wait' EXIT" "$blocks")
log "running the README's quickstart ($(grep -c . <<<"$blocks") lines)"
if ! timeout "${1:-600}" bash -c "$script" >"$out" 2>&1; then
  cat "$out" >&2
  log "the quickstart failed"
  exit 1
fi
cat "$out"
grep -q 'hello, world' "$out" || { log "the invocation did not answer \"hello, world\""; exit 1; }
grep -Eq '^ember_invocations_total\{function="hello"\} 1$' "$out" || { log "/metrics did not count the invocation"; exit 1; }
log "the quickstart works as written"
