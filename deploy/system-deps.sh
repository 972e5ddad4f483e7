#!/bin/sh
# Installs the Debian packages execbroker needs: busybox-static (the busybox instance image), util-linux
# (nsenter, for the benchmark baseline); with --test also lxd-client (the real `lxc` client the tests
# drive). Idempotent: installs only what is missing. Needs root.
set -eu
pkgs="busybox-static util-linux"
[ "${1:-}" = "--test" ] && pkgs="$pkgs lxd-client"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: need root to install:$missing" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $missing >/dev/null
