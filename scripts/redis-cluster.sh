#!/usr/bin/env bash
# A local Redis Cluster for the tests: 3 primaries and 3 replicas on
# loopback ports.
#
#   scripts/redis-cluster.sh start  [DIR]   start it (a no-op if it runs)
#   scripts/redis-cluster.sh stop   [DIR]   stop the nodes this script started
#   scripts/redis-cluster.sh status [DIR]   show each node's role and state
#   scripts/redis-cluster.sh restart-node PORT [DIR]
#                                           start one stopped node again
#
# DIR (default: $REDIS_CLUSTER_DIR, else /tmp/tower-idempotency-redis-cluster)
# holds each node's PID file, log and nodes-<port>.conf. Environment:
#   REDIS_CLUSTER_PORT      first port (default 7101; six ports from there)
#   REDIS_CLUSTER_NODE_TIMEOUT  cluster-node-timeout in ms (default 1000)
#   REDIS_SERVER, REDIS_CLI     the binaries (default: from PATH)
#
# `start` prints REDIS_CLUSTER_URLS=redis://127.0.0.1:7101,... on stdout.
# The cluster bus of each node listens on its port + 10000.
set -euo pipefail

cmd=${1:-}
case "$cmd" in
  restart-node) node_port=${2:?restart-node needs a port}; dir=${3:-} ;;
  *) dir=${2:-} ;;
esac
dir=${dir:-${REDIS_CLUSTER_DIR:-/tmp/tower-idempotency-redis-cluster}}
first=${REDIS_CLUSTER_PORT:-7101}
node_timeout=${REDIS_CLUSTER_NODE_TIMEOUT:-1000}
server=${REDIS_SERVER:-redis-server}
cli=${REDIS_CLI:-redis-cli}
ports=()
for i in 0 1 2 3 4 5; do ports+=($((first + i))); done

urls() {
  local out="" p
  for p in "${ports[@]}"; do out+="${out:+,}redis://127.0.0.1:$p"; done
  echo "$out"
}

# The PID in DIR/P.pid, if that process is still the redis-server this
# script started on port P.
live_pid() {
  local port=$1 pid
  [[ -f "$dir/$port.pid" ]] || return 1
  pid=$(cat "$dir/$port.pid" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "redis-server.*:$port\b\|redis-server.*--port $port\b" || return 1
  echo "$pid"
}

cli_at() { "$cli" -h 127.0.0.1 -p "$1" "${@:2}"; }

start_node() {
  local port=$1
  live_pid "$port" >/dev/null && return 0
  "$server" --port "$port" --bind 127.0.0.1 \
    --cluster-enabled yes --cluster-config-file "nodes-$port.conf" \
    --cluster-node-timeout "$node_timeout" \
    --appendonly no --save "" --repl-diskless-sync-delay 0 \
    --daemonize yes --pidfile "$dir/$port.pid" --dir "$dir" --logfile "$dir/$port.log"
  local i
  for i in $(seq 1 100); do
    cli_at "$port" ping >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "node $port did not start; see $dir/$port.log" >&2
  return 1
}

healthy() {
  local p
  for p in "${ports[@]}"; do
    cli_at "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
    if cli_at "$p" info replication 2>/dev/null | grep -q '^role:slave'; then
      cli_at "$p" info replication | grep -q '^master_link_status:up' || return 1
    fi
  done
  # Every node sees three primaries, each with a replica.
  local primaries
  primaries=$(cli_at "${ports[0]}" cluster nodes | awk '$3 ~ /master/ && $3 !~ /fail/' | wc -l)
  [[ "$primaries" -eq 3 ]] || return 1
}

wait_healthy() {
  local i
  for i in $(seq 1 300); do
    healthy && return 0
    sleep 0.1
  done
  echo "the cluster is not healthy after 30 s" >&2
  return 1
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    all_up=1
    for p in "${ports[@]}"; do live_pid "$p" >/dev/null || all_up=0; done
    if [[ $all_up -eq 1 ]] && healthy; then
      echo "REDIS_CLUSTER_URLS=$(urls)"
      exit 0
    fi
    for p in "${ports[@]}"; do start_node "$p"; done
    # A fresh cluster unless the nodes already know each other.
    if ! cli_at "${ports[0]}" cluster info | grep -q '^cluster_known_nodes:6'; then
      addrs=()
      for p in "${ports[@]}"; do addrs+=("127.0.0.1:$p"); done
      "$cli" --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 || {
        cat "$dir/create.log" >&2
        exit 1
      }
    fi
    wait_healthy
    echo "REDIS_CLUSTER_URLS=$(urls)"
    ;;
  restart-node)
    start_node "$node_port"
    ;;
  stop)
    for p in "${ports[@]}"; do
      if pid=$(live_pid "$p"); then
        kill "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
      fi
      rm -f "$dir/$p.pid" "$dir/nodes-$p.conf"
    done
    ;;
  status)
    for p in "${ports[@]}"; do
      if pid=$(live_pid "$p"); then
        role=$(cli_at "$p" info replication | tr -d '\r' | awk -F: '$1=="role"{print $2}')
        state=$(cli_at "$p" cluster info | tr -d '\r' | awk -F: '$1=="cluster_state"{print $2}')
        echo "$p pid=$pid role=$role cluster_state=$state"
      else
        echo "$p down"
      fi
    done
    if healthy; then echo "healthy"; echo "REDIS_CLUSTER_URLS=$(urls)"; else echo "not healthy"; exit 1; fi
    ;;
  *)
    echo "usage: $0 start|stop|status [DIR] | restart-node PORT [DIR]" >&2
    exit 2
    ;;
esac
