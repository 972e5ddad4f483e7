#!/bin/sh
# Installs what execbroker needs from Debian: runc (the OCI runtime every instance runs under, as an
# unprivileged container), busybox-static (the busybox instance image), mmdebstrap (builds the debian
# image from this machine's Debian mirror on first use), util-linux (nsenter, setpriv), redis-server (the
# head's store for Ray's cluster state with `execbroker up --redis local`; Debian's own redis service is
# neither started nor enabled by this install); with --test also lxd-client (the real `lxc` client the tests drive), acl (tests
# let one test uid reach a socket with setfacl, never every user), tcpdump and iproute2 (the two-host test
# builds network namespaces and captures member-to-member traffic).
# Creates the `execbroker` group: root and its members have full access to the unix socket; and delegates
# a range of host ids to execbroker in /etc/subuid and /etc/subgid (each instance's root maps into it).
# Idempotent: installs only what is missing. Needs root.
set -eu
pkgs="runc busybox-static mmdebstrap util-linux redis-server"
[ "${1:-}" = "--test" ] && pkgs="$pkgs lxd-client acl tcpdump iproute2"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ "$(id -u)" != 0 ]; then
  [ -z "$missing" ] && exit 0
  echo "system-deps: need root to install:$missing" >&2
  exit 1
fi
getent group execbroker >/dev/null || groupadd --system execbroker
# the host ids instances map to: a range of /etc/subuid and /etc/subgid of execbroker's own
python3 "$(dirname "$0")/../node_agent/runtime/idranges.py" claim >/dev/null
[ -z "$missing" ] && exit 0
export DEBIAN_FRONTEND=noninteractive
if [ ! -e /usr/sbin/policy-rc.d ]; then  # no service starts during the install (redis-server's would)
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  trap 'rm -f /usr/sbin/policy-rc.d; exit 130' INT TERM HUP
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends $missing >/dev/null
case " $missing " in  # execbroker runs its own Redis: Debian's default one (no password) stays off at boot too
  *" redis-server "*) command -v systemctl >/dev/null 2>&1 && systemctl disable redis-server >/dev/null 2>&1 || true ;;
esac
