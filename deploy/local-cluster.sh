#!/bin/sh
# An N-node execbroker cluster on this machine, for trying it out (and for the cluster tests).
#   deploy/local-cluster.sh up N [BASE]     start node1 (head) .. nodeN under BASE (default: a new private dir)
#   deploy/local-cluster.sh node K [BASE]   (re)start node K: node1 as the head again, others joining it
#   deploy/local-cluster.sh kill K [BASE]   kill node K's broker and Ray processes at once (simulated host loss)
#   deploy/local-cluster.sh down [BASE]     stop every node (instances keep running, as with `execbroker up`)
# Each node has its own data dir BASE/nodeK (socket BASE/nodeK/unix.socket, log BASE/nodeK/up.log) and its
# own loopback address 127.0.0.(K+1): members dial each other on loopback only. `up` returns once every
# member lists every other one. Without BASE, `up` makes a new directory (mktemp, owned by the caller) and
# records it in ~/.execbroker-cluster, which the other commands read. With redis-server installed the head
# runs with Ray's GCS fault tolerance (`--redis local`; LOCAL_CLUSTER_REDIS=0 turns it off): `kill 1`
# then `node 1` loses and restores the head while the other members keep serving (without Redis, `node 1`
# starts a new, empty cluster).
# Use a node with:  LXD_DIR=BASE/node2 lxc exec c1 -- hostname
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
eb=${EXECBROKER_BIN:-$here/.venv/bin/execbroker}
pointer=${HOME:-/root}/.execbroker-cluster
cmd=${1:-}
case "$cmd" in
  up|node|kill) base=${3:-} ;;
  down) base=${2:-} ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
if [ -z "$base" ] && [ "$cmd" = up ]; then
  base=$(mktemp -d "${TMPDIR:-/tmp}/execbroker-cluster.XXXXXX")
  chmod 711 "$base"
  echo "$base" >"$pointer"
elif [ -z "$base" ]; then
  [ -f "$pointer" ] || { echo "local-cluster: no cluster recorded in $pointer; give BASE" >&2; exit 2; }
  base=$(cat "$pointer")
fi
# Its pid files are fed to kill: only a directory of the caller's own that nobody else may write.
# Others pass it (instances reach their root filesystems below it); nobody lists or writes it.
[ -e "$base" ] || mkdir -m 711 "$base"
if [ -L "$base" ] || [ ! -O "$base" ] || [ -n "$(find "$base" -maxdepth 0 -perm /022)" ]; then
  echo "local-cluster: $base is not a directory of the caller's own that only the caller may write" >&2; exit 2
fi
export RAY_TMPDIR=${RAY_TMPDIR:-$base/ray}

wait_ready() {  # $1 node dir: until its log says it serves (or its broker died)
  i=0
  while ! grep -q "serving on" "$1/up.log" 2>/dev/null; do
    if ! kill -0 "$(pid_of "$1")" 2>/dev/null; then
      echo "local-cluster: $(basename "$1") failed:" >&2; tail -20 "$1/up.log" >&2; return 1
    fi
    i=$((i + 1)); [ $i -gt 1800 ] && { echo "local-cluster: $(basename "$1") not ready" >&2; return 1; }
    sleep 0.1
  done
}

start_node() {  # $1 K, $2 extra args
  dir=$base/node$1
  mkdir -p "$dir"
  : >"$dir/up.log"
  # shellcheck disable=SC2086
  # each node its own loopback address: a driver attaches to the raylet of its address, never another's
  setsid "$eb" up --dir "$dir" --node-name "node$1" --node-ip "127.0.0.$(($1 + 1))" $2 >>"$dir/up.log" 2>&1 </dev/null &
  echo $! >"$dir/up.pid"
}

head_args() {  # the head keeps Ray's cluster state in a Redis of its own when there is one to run
  if command -v redis-server >/dev/null 2>&1 && [ "${LOCAL_CLUSTER_REDIS:-1}" != 0 ]; then
    echo "--cluster --redis local"
  else
    echo "--cluster"
  fi
}

head_address() {
  sed -n 's/.*execbroker up --address \([^ ]*\).*/\1/p' "$base/node1/up.log" | tail -1
}

pid_of() {  # $1 node dir: its broker's pid, from a pid file of the caller's own
  [ -f "$1/up.pid" ] && [ -O "$1/up.pid" ] || return 1
  cat "$1/up.pid"
}

stop_node() {  # $1 node dir
  pid=$(pid_of "$1") || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  i=0
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
  kill -9 "-$pid" 2>/dev/null || true
  rm -f "$1/up.pid"
}

case "$cmd" in
  up)
    n=${2:?usage: up N [BASE]}
    mkdir -p "$base"
    start_node 1 "$(head_args)"
    wait_ready "$base/node1"
    addr=$(head_address)
    k=2  # one at a time: joins racing each other on 2 cores time out in Ray's node registration
    while [ $k -le "$n" ]; do start_node $k "--address $addr"; wait_ready "$base/node$k"; k=$((k + 1)); done
    echo "local-cluster: $n nodes up, head $addr"
    k=1
    while [ $k -le "$n" ]; do echo "  node$k: LXD_DIR=$base/node$k  (socket $base/node$k/unix.socket)"; k=$((k + 1)); done
    ;;
  node)
    k=${2:?usage: node K [BASE]}
    stop_node "$base/node$k"
    if [ "$k" = 1 ]; then start_node 1 "$(head_args)"; else start_node "$k" "--address $(head_address)"; fi
    wait_ready "$base/node$k"
    echo "local-cluster: node$k up"
    ;;
  kill)
    k=${2:?usage: kill K [BASE]}
    pid=$(pid_of "$base/node$k") || { echo "local-cluster: node$k is not running" >&2; exit 1; }
    # The broker's Ray processes run in the process group of its `ray start` child.
    for child in $(pgrep -P "$pid" 2>/dev/null); do kill -9 "-$child" 2>/dev/null || true; done
    kill -9 "-$pid" 2>/dev/null || true
    rm -f "$base/node$k/up.pid"
    ;;
  down)
    k=$(ls -d "$base"/node* 2>/dev/null | wc -l)
    while [ "$k" -ge 1 ]; do stop_node "$base/node$k"; k=$((k - 1)); done
    echo "local-cluster: down"
    ;;
esac
