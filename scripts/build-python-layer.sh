#!/usr/bin/env bash
# Build the tree of ember's `python3` runtime layer from Debian's own packages (python3-minimal,
# the standard library and the shared libraries they load), extracted with dpkg-deb: no network at
# run time, nothing installed on the host. The standard library is byte-compiled once here (by the
# layer's own interpreter, chrooted), so that importing it in a guest reads .pyc files instead of
# compiling. Cached under ~/.cache/ember/python/<hash of the package versions>.
#
#   scripts/build-python-layer.sh        -> images/layers/python3/  (a directory tree)
#
# Then make it a layer: `curl --unix-socket SOCK -X PUT localhost/layers/python3 -d
# '{"path": "<images dir>/layers/python3"}'` (or `ember image build images/layers/python3`).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '[build-python-layer] %s\n' "$*" >&2; }

packages=(python3-minimal python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
  libc6 libgcc-s1 libexpat1 zlib1g libssl3 libffi8 libbz2-1.0 liblzma5 libuuid1 media-types)

policy() { apt-cache policy "${packages[@]}" | awk '/^[^ ]/{p=$1} /Candidate:/{print p, $2}'; }
versions=$(policy)
if grep -q "(none)" <<<"$versions" || (($(wc -l <<<"$versions") < ${#packages[@]})); then
  log "package lists lack some packages: apt-get update"
  sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq || true
  versions=$(policy)
fi
if grep -q "(none)" <<<"$versions" || (($(wc -l <<<"$versions") < ${#packages[@]})); then
  log "error: a package has no candidate (apt-get update first?):"
  grep "(none)" <<<"$versions" >&2
  exit 1
fi
key=$( (echo "$versions"; cat "$0") | sha256sum | cut -c1-16)
cache=${EMBER_CACHE:-$HOME/.cache/ember}/python/$key
out=$root/images/layers/python3

if [[ ! -e $cache/done ]]; then
  log "building the python3 layer tree ($key)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -q "${packages[@]}" >/dev/null 2>&1) || {
    log "apt-get download failed (is a Debian mirror reachable? try apt-get update)"
    (cd "$work" && apt-get download "${packages[@]}") >&2 || true
    exit 1
  }
  tree=$work/root
  mkdir -p "$tree"
  for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$tree"
  done
  # Documentation, manuals and translations are not needed to run code.
  rm -rf "$tree"/usr/share/{doc,man,locale,lintian,info}
  # Where functions' files go: code (/var/task, the code layer) and shared packages (/opt/python).
  mkdir -p "$tree"/{var/task,opt/python,tmp,proc,sys,dev,run}
  chmod 1777 "$tree/tmp"
  # Byte-compile the standard library with the layer's interpreter: unchecked hashes, since the
  # layer's files all carry the same fixed timestamp.
  chroot "$tree" /usr/bin/python3 -m compileall -q --invalidation-mode unchecked-hash \
    /usr/lib/python3.11 >/dev/null || { log "error: byte-compiling the standard library failed"; exit 1; }
  chroot "$tree" /usr/bin/python3 -c 'import json, random, traceback, importlib' \
    || { log "error: the layer's interpreter does not run"; exit 1; }
  rm -rf "$cache"
  mkdir -p "$(dirname "$cache")"
  mv "$tree" "$cache"
  touch "$cache/done"
fi

rm -rf "$out"
mkdir -p "$(dirname "$out")"
cp -a "$cache" "$out"
rm -f "$out/done"
log "images/layers/python3 ready ($(du -sh "$out" | cut -f1), $(grep -m1 python3.11-minimal <<<"$versions"))"
