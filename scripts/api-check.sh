#!/usr/bin/env bash
# Property-based run of ember serve's OpenAPI document against a live daemon (schemathesis, from
# PyPI): every check, including stateful links from register to acquire/invoke/release/delete.
# The daemon serves a Unix socket; socat bridges it to a loopback TCP port for the tool.
#
#   scripts/api-check.sh [--max-examples N]        (needs /dev/kvm and the images of setup.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
log() { printf '[api-check] %s\n' "$*" >&2; }
examples=${2:-25}
[[ ${1:-} == --max-examples ]] || examples=25

command -v schemathesis >/dev/null || { log "installing schemathesis"; python3 -m pip install -q schemathesis; }
command -v socat >/dev/null || {
  sudo=""; [[ $(id -u) == 0 ]] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq socat >/dev/null
}

work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
cleanup() {
  kill "${bridge:-}" "${daemon:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build -q
# As root, in a network namespace of its own: registrations the tool makes up may ask for clone
# networks, which must not touch this machine's.
netns=()
[[ $(id -u) == 0 ]] && netns=(unshare --net --)
"${netns[@]}" target/debug/ember serve --socket "$work/api.sock" --state-dir "$work/state" --images images \
  2>"$work/serve.log" &
daemon=$!
for _ in $(seq 100); do [[ -S $work/api.sock ]] && break; sleep 0.1; done
# (socat's complaints about clients that hang up early are noise here.)
socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$work/api.sock" 2>/dev/null &
bridge=$!
api=http://127.0.0.1:$port
for _ in $(seq 50); do curl -sf "$api/functions" >/dev/null && break; sleep 0.1; done

# A function whose template is ready, so that acquire, invoke and release reach a clone.
log "registering a function and booting its template"
# Room for the clones that the acquire cases take and never give back; their leases run out fast.
spec='{"kernel": "vmlinux", "initramfs": "initramfs.cpio", "pool": {"min_ready": 1, "max": 16, "lease_s": 10}}'
curl -sf -X PUT "$api/functions/f" -d "$spec" >/dev/null
for _ in $(seq 600); do
  curl -sf "$api/functions/f" | grep -q '"state":"ready"' && break
  sleep 1
done
curl -sf "$api/functions/f" | grep -q '"state":"ready"' || { log "the template never became ready"; cat "$work/serve.log" >&2; exit 1; }

# Every check is on (schemathesis's default; scripts/schemathesis.toml turns one off on one
# operation, and a --checks option would override it).
log "schemathesis: every check, $examples examples per operation, stateful links"
status=0
schemathesis --config-file scripts/schemathesis.toml run "$api/openapi.json" \
  --max-examples "$examples" --phases examples,coverage,fuzzing,stateful \
  --workers 1 --seed 1 --no-color || status=$?
# The daemon must still be there, answering.
curl -sf "$api/functions" >/dev/null || { log "the daemon stopped answering"; status=1; }
kill -0 "$daemon" || { log "the daemon died"; status=1; }
if [[ $status != 0 ]]; then
  log "the daemon's warnings and errors:"
  grep -aE "WARN|ERROR|panicked" "$work/serve.log" | tail -50 >&2 || true
fi
exit $status
