#!/usr/bin/env bash
# Property-based run of the Firecracker door's OpenAPI document (src/firecracker/openapi.json)
# against live `ember firecracker` processes (schemathesis, from PyPI): every check, phases
# examples, coverage, fuzzing and stateful (the document's links: boot source, machine, drive,
# InstanceStart, pause, snapshot, resume). A process serves a Unix socket; socat bridges it to a
# loopback TCP port for the tool.
#
#   scripts/fc-api-check.sh [--max-examples N] [OPTION...]   (needs /dev/kvm and setup.sh's images)
#
# OPTIONs go to `schemathesis run` (e.g. --report har). EMBER_BIN=path/to/ember: that binary
# instead of building one. FC_CHECK_RUNS="PHASE:STATE ...": only those runs (see `runs` below).
#
# Firecracker's API is stateful: configuration is pre-boot only, InstanceStart happens once, and
# pause, snapshots and PATCH of devices come after it. So examples, coverage and fuzzing run twice,
# each time on a fresh process: once before InstanceStart, once on a microVM this script has
# configured and started (a drive `scratch`, an interface `eth0`, a vsock device); the stateful
# phase starts from a fresh process and boots through the links. Within a phase a case may leave
# the microVM configured, started or paused, and the next case is answered accordingly (every such
# answer is documented: 400 with a fault_message).
#
# The request bodies name host files (a kernel, drives, a log, snapshots) that the process opens or
# creates as asked. So that made-up paths touch nothing of this machine's, each process runs in
# mount and network namespaces of its own, in which every file system is read-only except this
# run's scratch folder; its working folder (where relative paths land) is a small tmpfs, and its
# address space is capped (a made-up mem_size_mib cannot take the host's memory).
#
# A guest that powers off ends its process, as in Firecracker (status 0), and so does a snapshot
# load that failed past its checks (status 1); the process is started again (and configured again),
# and counted. The run fails if a process ended otherwise (a panic, a signal), logged a panic, or
# stopped answering.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
log() { printf '[fc-api-check] %s\n' "$*" >&2; }
examples=25
if [[ ${1:-} == --max-examples ]]; then
  examples=${2:?--max-examples needs a number}
  shift 2
fi

if [[ -n ${EMBER_BIN:-} ]]; then
  bin=$(realpath "$EMBER_BIN")
else
  cargo build -q
  bin=$root/target/debug/ember
fi
[[ -x $bin ]] || { log "no ember binary at $bin"; exit 1; }
for f in images/vmlinux images/initramfs.cpio; do
  [[ -e $f ]] || { log "$f is missing: run scripts/setup.sh"; exit 1; }
done

command -v schemathesis >/dev/null || { log "installing schemathesis"; python3 -m pip install -q schemathesis; }
command -v socat >/dev/null || {
  sudo=""; [[ $(id -u) == 0 ]] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq socat >/dev/null
}

work=$(realpath "$(mktemp -d)")
mkdir -p "$work/files" "$work/run"
port=$((20000 + RANDOM % 20000))
api=http://127.0.0.1:$port
sock=$work/fc.sock
supervisor="" bridge=""

# Ends the process (and the loop that starts it again) for good.
stop_ember() {
  [[ -n $supervisor ]] || return 0
  touch "$work/stop"
  [[ -s $work/ember.pid ]] && { kill "$(cat "$work/ember.pid")" 2>/dev/null || true; }
  wait "$supervisor" 2>/dev/null || true
  supervisor=""
  rm -f "$work/stop" "$work/ember.pid"
}
cleanup() {
  stop_ember
  [[ -n $bridge ]] && { kill "$bridge" 2>/dev/null || true; }
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The files the examples and links name: the guest's kernel and initramfs, and two scratch drives
# (a drive, and the file PATCH /drives switches it to).
truncate -s 1M "$work/files/scratch.ext4" "$work/files/scratch-2.ext4"

# The tool's copy of the document, whose example and link paths (/srv/microvm/NAME) are real ones:
# the images, the scratch drives, and for what the process creates (the vsock socket, the log,
# metrics, snapshots) names in its working folder. The document served at GET /openapi.json stays
# as written.
python3 - "$root/src/firecracker/openapi.json" "$work/openapi.json" "$root/images" "$work/files" "$work/run" <<'PY'
import json, sys
src, dst, images, files, run = sys.argv[1:]
real = {"vmlinux": f"{images}/vmlinux", "initramfs.cpio": f"{images}/initramfs.cpio",
        "scratch.ext4": f"{files}/scratch.ext4", "scratch-2.ext4": f"{files}/scratch-2.ext4"}
prefix = "/srv/microvm/"
def walk(v):
    if isinstance(v, dict):
        return {k: walk(x) for k, x in v.items()}
    if isinstance(v, list):
        return [walk(x) for x in v]
    if isinstance(v, str) and v.startswith(prefix):
        return real.get(v[len(prefix):], run + "/" + v[len(prefix):])
    return v
json.dump(walk(json.load(open(src))), open(dst, "w"), indent=1)
PY

# One process at a time, in its namespaces (see the top), started again whenever it ended as
# Firecracker's process does (status 0 or 1, see the top), until stop_ember; each exit status is appended to $work/exits. With `started`,
# each process is configured and booted first.
cat >"$work/supervise.sh" <<'SUPERVISE'
set -u
work=$1 bin=$2 images=$3 state=$4
mount --bind "$work" "$work"
mount -t tmpfs -o size=1g,mode=0755 ember-run "$work/run"
mounts=$(awk '{print $5}' /proc/self/mountinfo)
while read -r mp; do
  mp=${mp//\\040/ }
  case $mp in "$work" | "$work"/*) continue ;; esac
  mount -o remount,bind,ro "$mp" 2>/dev/null || echo "warning: $mp stays writable" >&2
done <<<"$mounts"
# Guest memory is mapped into the process: a cap on its address space caps the guests it boots.
ulimit -v $((8 << 20))
cd "$work/run"

request() { # METHOD PATH BODY: one request of the setup, which must succeed (204)
  local code
  code=$(curl -s -o "$work/setup.out" -w '%{http_code}' --unix-socket "$work/fc.sock" \
    -X "$1" "http://localhost$2" -H 'Content-Type: application/json' -d "$3")
  [[ $code == 204 ]] || { echo "setup: $1 $2 answered $code $(cat "$work/setup.out")" >&2; return 1; }
}
# A kernel, a drive, an interface on a TAP of the namespace's own, and a vsock device (with which
# the guest agent serves instead of powering off once ready); then InstanceStart.
boot() {
  for _ in $(seq 100); do [[ -S $work/fc.sock ]] && break; sleep 0.05; done
  request PUT /boot-source "{\"kernel_image_path\": \"$images/vmlinux\", \"initrd_path\": \"$images/initramfs.cpio\"}" &&
    request PUT /drives/scratch "{\"drive_id\": \"scratch\", \"path_on_host\": \"$work/files/scratch.ext4\", \"is_root_device\": false}" &&
    request PUT /network-interfaces/eth0 '{"iface_id": "eth0", "host_dev_name": "tap0"}' &&
    request PUT /vsock "{\"guest_cid\": 3, \"uds_path\": \"$work/run/setup.vsock\"}" &&
    request PUT /actions '{"action_type": "InstanceStart"}'
}

while :; do
  find "$work/run" -mindepth 1 -delete
  "$bin" firecracker --api-sock "$work/fc.sock" --id check >>"$work/console.log" 2>>"$work/ember.log" &
  pid=$!
  echo "$pid" >"$work/ember.pid"
  if [[ $state == started ]] && ! boot; then
    kill "$pid"
    exit 3
  fi
  wait "$pid"
  rc=$?
  [[ -e $work/stop ]] && exit 0
  echo "$rc" >>"$work/exits"
  # 0: the guest powered off or rebooted; 1: Firecracker's generic error (a snapshot load that
  # failed ends the process, as in Firecracker). Anything else (a panic's 101, a signal) ends the run.
  [[ $rc == 0 || $rc == 1 ]] || exit "$rc"
done
SUPERVISE
sandbox=(unshare --mount --propagation private --net --)
[[ $(id -u) == 0 ]] || sandbox=(unshare --user --map-root-user --mount --propagation private --net --)

start_ember() { # fresh | started
  rm -f "$sock" "$work/exits"
  : >"$work/ember.log"
  "${sandbox[@]}" bash "$work/supervise.sh" "$work" "$bin" "$root/images" "$1" &
  supervisor=$!
  local want='"state":"Not started"'
  [[ $1 == started ]] && want='"state":"Running"'
  for _ in $(seq 100); do
    curl -sf --max-time 5 "$api/" 2>/dev/null | grep -q "$want" && return 0
    kill -0 "$supervisor" 2>/dev/null || break
    sleep 0.1
  done
  log "the process did not come up $1"
  tail -20 "$work/ember.log" >&2
  stop_ember
  return 1
}

# The bridge retries while a process is being started again (its socket is briefly missing).
# (socat's complaints about clients that hang up early are noise here.)
socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$sock,retry=100,interval=0.05" 2>/dev/null &
bridge=$!

status=0
# The document served is the file in the tree.
if start_ember fresh; then
  curl -s --max-time 5 "$api/openapi.json" >"$work/served.json" || true
  python3 -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])) != json.load(open(sys.argv[2])))' \
    "$work/served.json" src/firecracker/openapi.json 2>/dev/null ||
    { log "GET /openapi.json does not answer src/firecracker/openapi.json: $(head -c 200 "$work/served.json")"; status=1; }
  stop_ember
else
  status=1
fi

# Every check is on (schemathesis's default; scripts/fc-schemathesis.toml turns some off on some
# operations, each with its reason, and a --checks option would override it).
runs=${FC_CHECK_RUNS:-examples:fresh coverage:fresh fuzzing:fresh examples:started coverage:started fuzzing:started stateful:fresh}
for run in $runs; do
  phase=${run%:*} state=${run#*:}
  log "schemathesis, phase $phase on a $state process: every check, $examples examples per operation"
  start_ember "$state" || { status=1; continue; }
  failed=0
  schemathesis --config-file scripts/fc-schemathesis.toml run "$work/openapi.json" --url "$api" \
    --max-examples "$examples" --phases "$phase" --workers 1 --seed 1 --no-color "$@" || failed=1
  # The process must still be there, answering, and every process of the run must have ended only
  # because its guest did.
  curl -sf --max-time 10 "$api/" >/dev/null || { log "$run: the process stopped answering"; failed=1; }
  kill -0 "$supervisor" 2>/dev/null || { log "$run: the process died"; failed=1; }
  log "$run: $(grep -c 'microVM started' "$work/ember.log" || true) boot(s), $(grep -c 'snapshot created' "$work/ember.log" || true) snapshot(s) in the run's processes"
  restarts=0
  [[ -s $work/exits ]] && restarts=$(grep -c '^[01]$' "$work/exits" || true)
  ((restarts == 0)) || log "$run: $restarts process(es) ended (a guest powered off, or a load failed); started again"
  if [[ -s $work/exits ]] && grep -qv '^[01]$' "$work/exits"; then
    log "$run: a process ended with status $(grep -v '^[01]$' "$work/exits" | head -1) (a crash or a signal)"
    failed=1
  fi
  grep -q panicked "$work/ember.log" && { log "$run: the process panicked"; failed=1; }
  if ((failed)); then
    status=1
    log "$run: the process's warnings and errors:"
    grep -aE "WARN|ERROR|panicked" "$work/ember.log" | tail -30 >&2 || true
  fi
  stop_ember
done
exit $status
