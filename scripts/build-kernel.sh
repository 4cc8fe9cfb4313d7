#!/usr/bin/env bash
# Build ember's guest kernel (vmlinux, entered through PVH) from Debian's linux-source-6.1.
#
#   scripts/build-kernel.sh [--force]
#
# tinyconfig + guest/kernel/ember.config + guest/kernel/patches/*.patch. The result is cached under
# ${EMBER_CACHE:-~/.cache/ember}/kernel/<hash>, the hash covering the kernel source version, the config
# fragment, the patches and RECIPE below, so a repeat run with nothing changed takes a second.
# The result is copied to images/vmlinux.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${EMBER_CACHE:-$HOME/.cache/ember}
tarball=/usr/src/linux-source-6.1.tar.xz
fragment=$root/guest/kernel/ember.config
patches=("$root"/guest/kernel/patches/*.patch)
# Bump when a change to this script changes what it builds.
RECIPE=1
force=0
[[ ${1:-} == --force ]] && force=1

log() { printf '[build-kernel] %s\n' "$*" >&2; }
die() { printf '[build-kernel] error: %s\n' "$*" >&2; exit 1; }

[[ -r $tarball ]] || die "$tarball not found: install Debian's linux-source-6.1 (scripts/setup.sh does)"
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %s "$tarball")
hash=$( { echo "$src_version $RECIPE"; cat "$fragment" "${patches[@]}"; } | sha256sum | cut -c1-16)
out=$cache/kernel/$hash
mkdir -p "$root/images"

if [[ $force == 0 && -f $out/vmlinux ]]; then
  log "cached kernel $hash (source $src_version)"
  cp -f "$out/vmlinux" "$out/System.map" "$out/config" "$root/images/"
  exit 0
fi

# A pristine source tree, extracted once per source version.
pristine=$cache/src/$src_version
if [[ ! -f $pristine/.complete ]]; then
  log "extracting $tarball (once per source version, ~1-2 min)"
  rm -rf "$pristine" && mkdir -p "$pristine"
  tar -xf "$tarball" -C "$pristine" --strip-components=1
  touch "$pristine/.complete"
fi

# The build tree: a hard-linked copy of the pristine tree (cheap), patched. Files a patch touches are
# unlinked first so the pristine tree never changes.
work=$out.build
rm -rf "$work" && mkdir -p "$cache/kernel"
log "preparing build tree $work"
cp -al "$pristine" "$work"
rm -f "$work/.complete"
for p in "${patches[@]}"; do
  while read -r f; do
    if [[ -e $work/$f ]]; then cp --remove-destination "$pristine/$f" "$work/$f"; fi
  done < <(sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$p")
  log "applying $(basename "$p")"
  patch -d "$work" -p1 --quiet --forward < "$p" || die "patch $(basename "$p") does not apply"
done

cd "$work"
log "configuring: tinyconfig + $(basename "$fragment")"
make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m -O . .config "$fragment" >/dev/null
make -s olddefconfig >/dev/null
# Every option of the fragment must have stuck (a dependency may silently drop one).
missing=0
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Z0-9_]+)=(.*)$ ]]; then
    grep -qx "${BASH_REMATCH[1]}=${BASH_REMATCH[2]}" .config || { log "option did not stick: $line"; missing=1; }
  elif [[ $line =~ ^#\ (CONFIG_[A-Z0-9_]+)\ is\ not\ set$ ]]; then
    if grep -q "^${BASH_REMATCH[1]}=" .config; then log "option is still set: ${BASH_REMATCH[1]}"; missing=1; fi
  fi
done < "$fragment"
[[ $missing == 0 ]] || die "the config fragment does not apply cleanly to this kernel"

jobs=$(nproc)
log "building vmlinux with $jobs jobs (a few minutes on 2 cores; progress below)"
start=$SECONDS
progress() {
  local n=0 l
  while IFS= read -r l; do
    case $l in
      *" error: "*|*"Error "*) printf '%s\n' "$l" >&2 ;;
      *" CC "*|*" LD "*|*" AR "*) n=$((n + 1)); if (( n % 200 == 0 )); then log "... $n objects, $((SECONDS - start)) s"; fi ;;
    esac
  done
}
if ! make -j"$jobs" vmlinux 2>&1 | progress || [[ ! -f vmlinux ]]; then
  die "kernel build failed (rerun: make -C $work vmlinux)"
fi
log "built in $((SECONDS-start)) s"

mkdir -p "$out"
cp vmlinux System.map "$out/"
cp .config "$out/config"
cp -f "$out/vmlinux" "$out/System.map" "$out/config" "$root/images/"
log "kernel $hash ready: images/vmlinux ($(du -h "$root/images/vmlinux" | cut -f1))"
