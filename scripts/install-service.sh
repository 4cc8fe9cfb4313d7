#!/usr/bin/env bash
# Installs `ember serve` as a systemd service: the release binary at /usr/local/bin/ember, the
# unit (contrib/systemd/ember.service, Type=notify) at /etc/systemd/system/ember.service, and,
# unless one exists, the settings /etc/ember/ember.toml (the API socket /run/ember/api.sock, the
# state under /var/lib/ember, this checkout's images/ as the image directory); then enables and
# starts it where systemd runs. Run as root after scripts/setup.sh.
#
#   scripts/install-service.sh [--no-start]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '[install-service] %s\n' "$*" >&2; }
[[ $(id -u) == 0 ]] || { log "run as root"; exit 1; }
[[ -x $root/target/release/ember ]] || { log "no target/release/ember: run scripts/setup.sh first"; exit 1; }
install -m 0755 "$root/target/release/ember" /usr/local/bin/ember
install -m 0644 "$root/contrib/systemd/ember.service" /etc/systemd/system/ember.service
install -d -m 0755 /etc/ember /run/ember
if [[ ! -e /etc/ember/ember.toml ]]; then
  cat > /etc/ember/ember.toml <<TOML
# ember serve's settings (every flag of \`ember serve --help\` has a key; \`ember serve --config
# /etc/ember/ember.toml --print-config\` shows what is in effect).
socket = "/run/ember/api.sock"
state_dir = "/var/lib/ember"
images = ["$root/images"]
TOML
  log "wrote /etc/ember/ember.toml"
fi
/usr/local/bin/ember serve --config /etc/ember/ember.toml --print-config >/dev/null
if [[ ${1:-} != --no-start && -d /run/systemd/system ]]; then
  systemctl daemon-reload
  systemctl enable --now ember.service
  log "ember.service started: systemctl status ember"
else
  log "installed; start it with: systemctl enable --now ember.service"
fi
