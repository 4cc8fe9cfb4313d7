#!/usr/bin/env bash
# Build ember's guest initramfs: the statically linked ember-agent as /init, in an uncompressed cpio
# (decompressing in the guest is slow on hosts whose KVM emulates guest kernel mode).
#
#   scripts/build-initramfs.sh            -> images/initramfs.cpio
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=x86_64-unknown-linux-gnu
log() { printf '[build-initramfs] %s\n' "$*" >&2; }

log "building ember-agent (static, $target)"
# A separate target directory: static-linking flags must not invalidate the host build's cache.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --manifest-path "$root/Cargo.toml" \
  --release -p ember-agent --target "$target" --target-dir "$root/target/guest" -q
agent=$root/target/guest/$target/release/ember-agent
file "$agent" 2>/dev/null | grep -q "static" || { ldd "$agent" 2>&1 | grep -q "not a dynamic" || { log "error: $agent is not statically linked"; exit 1; }; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{dev,proc,sys,tmp,etc}
install -m 0755 "$agent" "$stage/init"
strip --strip-all "$stage/init"
# The image's function runtime (guest/agent/src/functions.rs): `reverse`, the agent's example runtime.
mkdir -p "$stage/etc/ember"
echo "reverse /init --example-runtime" > "$stage/etc/ember/runtime"
mkdir -p "$root/images"
# The example code layer (tests, benchmarks, the README's walk-through): the `files` runtime, which
# reads and writes files in the function's root. `ember image build images/examples/files` makes
# it a layer.
code=$root/images/examples/files
rm -rf "$code" && mkdir -p "$code/bin" "$code/etc/ember"
install -m 0755 "$stage/init" "$code/bin/ember-files"
echo "files /bin/ember-files --files-runtime" > "$code/etc/ember/runtime"
# The example of ember's `exec` runtime (runtime protocol 2): a code layer whose program is the
# agent under the name ember-exec-example.
exec_code=$root/images/examples/exec
rm -rf "$exec_code" && mkdir -p "$exec_code/bin"
install -m 0755 "$stage/init" "$exec_code/bin/ember-exec-example"
out=$root/images/initramfs.cpio
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) > "$out.tmp"
mv "$out.tmp" "$out"
log "images/examples/files ready (the example code layer's tree)"
log "images/initramfs.cpio ready ($(du -h "$out" | cut -f1), uncompressed)"
