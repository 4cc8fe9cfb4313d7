#!/usr/bin/env bash
# One command from a fresh machine to a booted guest:
#   installs the Debian packages ember needs, builds the guest kernel (cached under ~/.cache/ember),
#   the initramfs and ember, then boots the guest once as a demo.
#
#   scripts/setup.sh [--no-demo]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
log() { printf '[setup] %s\n' "$*" >&2; }

# erofs-utils: mkfs.erofs builds function layers (`ember image build`, `ember serve`).
# nftables (libnftables) and iproute2: clones' networks (`ember serve`, tests/network.rs).
# curl: the README's quickstart talks to the daemon with it.
packages=(linux-source-6.1 build-essential flex bison bc libelf-dev cpio file xz-utils erofs-utils nftables iproute2 curl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[[ -e /dev/kvm ]] || log "warning: /dev/kvm is missing: ember can build but not boot guests here"

scripts/build-kernel.sh
scripts/build-initramfs.sh
# ember's python3 runtime layer (Debian's packages, extracted; cached under ~/.cache/ember/python).
scripts/build-python-layer.sh
log "building ember (release)"
cargo build --release -q
log "ember is at target/release/ember"

if [[ ${1:-} != --no-demo && -e /dev/kvm ]]; then
  log "demo: booting the guest (on hosts whose KVM emulates guest kernel mode this takes ~30-40 s)"
  target/release/ember run --kernel images/vmlinux --initrd images/initramfs.cpio --timeout 300
  log "the guest booted to its init and powered off"
fi
