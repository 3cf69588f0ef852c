#!/usr/bin/env bash
# A local Redis Cluster for the Redis store's cluster tests: three primaries
# and three replicas on loopback, started with the redis-server and redis-cli
# found on PATH, state (configs, PID files, logs) under
# target/tools/redis-cluster.
#
#   scripts/redis-cluster.sh start              start six nodes, create the cluster, wait until it is healthy
#   scripts/redis-cluster.sh stop               stop the nodes started by this script (by their PID files)
#   scripts/redis-cluster.sh status             exit 0 and print the URLs if all six nodes answer and the cluster is ok
#   scripts/redis-cluster.sh restart-node PORT  start one stopped or killed node again with its cluster config
#   scripts/redis-cluster.sh pid PORT           print the PID of the node on PORT
#
# The nodes listen on ${REDIS_CLUSTER_PORT:-7000} and the next five ports,
# their cluster buses on those ports + 10000. The node timeout is 1000 ms, so
# a killed primary's replica is promoted within about 3 s; `restart-node`
# brings the killed node back, and it rejoins as a replica. `start` and
# `status` print REDIS_CLUSTER_URLS=redis://127.0.0.1:7000,... on their last
# line, for `eval` or a CI log. Every command is idempotent. Only bash,
# coreutils and redis-cli are used.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/target/tools/redis-cluster"
HOST="127.0.0.1"
BASE_PORT="${REDIS_CLUSTER_PORT:-7000}"
NODE_TIMEOUT_MS=1000
HEALTHY_WITHIN=30

if ! [[ "$BASE_PORT" =~ ^[0-9]+$ ]] || [ "$BASE_PORT" -lt 1 ] || [ "$((BASE_PORT + 5 + 10000))" -gt 65535 ]; then
    echo "redis-cluster: REDIS_CLUSTER_PORT=$BASE_PORT: need a port from 1 to 55530" >&2
    exit 2
fi
PORTS=()
for i in 0 1 2 3 4 5; do
    PORTS+=("$((BASE_PORT + i))")
done

conf_file() { echo "$STATE/nodes-$1.conf"; }
pid_file() { echo "$STATE/redis-$1.pid"; }
log_file() { echo "$STATE/redis-$1.log"; }
node_dir() { echo "$STATE/node-$1"; }

urls() {
    local port list=""
    for port in "${PORTS[@]}"; do
        list="${list:+$list,}redis://$HOST:$port"
    done
    echo "REDIS_CLUSTER_URLS=$list"
}

# redis-cli against one node, bounded in time, without the replies' CRs.
rcli() {
    local port="$1"
    shift
    timeout 3 redis-cli -h "$HOST" -p "$port" "$@" 2>/dev/null | tr -d '\r'
}

answers_ping() {
    [ "$(rcli "$1" ping)" = "PONG" ]
}

# The value of "key:value" in an INFO or CLUSTER INFO reply ($1), for key $2.
field() {
    local line
    while IFS= read -r line; do
        if [ "${line%%:*}" = "$2" ]; then
            echo "${line#*:}"
            return 0
        fi
    done <<<"$1"
    return 1
}

# True when something listens on the port (on any address), or answers on
# it on loopback.
port_busy() {
    local port="$1" hex f _sl addr _rem st _rest
    printf -v hex '%04X' "$port"
    for f in /proc/net/tcp /proc/net/tcp6; do
        [ -r "$f" ] || continue
        while read -r _sl addr _rem st _rest; do
            if [ "$st" = "0A" ] && [ "${addr##*:}" = "$hex" ]; then
                return 0
            fi
        done <"$f"
    done
    timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$port" 2>/dev/null
}

# True when PID $1 runs (a zombie, killed but not yet reaped, does not).
live() {
    local stat
    kill -0 "$1" 2>/dev/null || return 1
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != "Z" ]
}

# True when PID $1 is the redis-server this script started on port $2: its
# command line names redis-server and either the port (the process title
# redis-server sets, "redis-server 127.0.0.1:PORT [cluster]") or the node's
# cluster config file (the original arguments). A PID the kernel has given to
# another process since fails this test.
is_node() {
    local pid="$1" port="$2" cmd argv0
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    argv0="${cmd%% *}"
    [ "${argv0##*/}" = "redis-server" ] || return 1
    case "$cmd " in
        *":$port "* | *" $(conf_file "$port") "*) return 0 ;;
    esac
    return 1
}

# Prints the PID of the node on port $1 if its PID file names a live process
# that is still that node.
node_pid() {
    local port="$1" pid f
    f="$(pid_file "$port")"
    [ -f "$f" ] || return 1
    pid="$(cat "$f" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    live "$pid" || return 1
    is_node "$pid" "$port" || return 1
    echo "$pid"
}

all_running() {
    local port
    for port in "${PORTS[@]}"; do
        node_pid "$port" >/dev/null || return 1
    done
}

# Starts one node in the background with the fixed command line, keeping
# whatever nodes-PORT.conf holds (none for a fresh node).
launch_node() {
    local port="$1"
    mkdir -p "$(node_dir "$port")"
    rm -f "$(pid_file "$port")"
    redis-server \
        --port "$port" \
        --bind "$HOST" \
        --cluster-enabled yes \
        --cluster-config-file "$(conf_file "$port")" \
        --cluster-node-timeout "$NODE_TIMEOUT_MS" \
        --save "" \
        --appendonly no \
        --repl-diskless-sync-delay 0 \
        --dir "$(node_dir "$port")" \
        --daemonize yes \
        --pidfile "$(pid_file "$port")" \
        --logfile "$(log_file "$port")" \
        </dev/null >&2
}

# Waits up to $2 s until the node on port $1 answers PING and its PID file
# names it.
wait_node() {
    local port="$1" deadline=$((SECONDS + $2))
    until answers_ping "$port" && node_pid "$port" >/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# True when node $1's CLUSTER NODES shows all six nodes connected and none
# failing, three primaries with slots and three replicas, one per primary.
# Sets WHY otherwise.
view_ok() {
    local port="$1" nodes id addr flags master link slots n=0 primaries=0 m
    local -A has_slots=() replicas=()
    nodes="$(rcli "$port" cluster nodes)" || { WHY="node $port does not answer CLUSTER NODES"; return 1; }
    while read -r id addr flags master _ _ _ link slots; do
        [ -n "$id" ] || continue
        n=$((n + 1))
        addr="${addr%%@*}"
        case ",$flags," in
            *,fail,* | *,fail\?,* | *,handshake,* | *,noaddr,*)
                WHY="node $port sees $addr as $flags"
                return 1
                ;;
        esac
        if [ "$link" != "connected" ]; then
            WHY="node $port sees the link to $addr $link"
            return 1
        fi
        case ",$flags," in
            *,master,*)
                primaries=$((primaries + 1))
                if [ -n "$slots" ]; then has_slots[$id]=1; fi
                ;;
            *,slave,*) replicas[$master]=$((${replicas[$master]:-0} + 1)) ;;
        esac
    done <<<"$nodes"
    if [ "$n" -ne 6 ] || [ "$primaries" -ne 3 ] || [ "${#has_slots[@]}" -ne 3 ]; then
        WHY="node $port sees $n nodes, $primaries primaries, ${#has_slots[@]} with slots (want 6, 3, 3)"
        return 1
    fi
    for m in "${!has_slots[@]}"; do
        if [ "${replicas[$m]:-0}" -ne 1 ]; then
            WHY="node $port sees primary $m with ${replicas[$m]:-0} replicas (want 1)"
            return 1
        fi
    done
}

# True when every node answers, reports cluster_state:ok and sees the full
# topology, and every replica's link to its primary is up. Sets WHY otherwise.
healthy() {
    local port info
    WHY=""
    for port in "${PORTS[@]}"; do
        info="$(rcli "$port" cluster info)" || { WHY="node $port does not answer"; return 1; }
        if [ "$(field "$info" cluster_state || true)" != "ok" ]; then
            WHY="node $port: cluster_state is not ok"
            return 1
        fi
        view_ok "$port" || return 1
        info="$(rcli "$port" info replication)" || { WHY="node $port does not answer"; return 1; }
        if [ "$(field "$info" role || true)" = "slave" ] \
            && [ "$(field "$info" master_link_status || true)" != "up" ]; then
            WHY="replica $port: master_link_status is not up"
            return 1
        fi
    done
}

wait_healthy() {
    local deadline=$((SECONDS + $1))
    until healthy; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# Prints the end of every node's log (and of the create log) to stderr.
show_logs() {
    local f files=("$STATE/cluster-create.log") port
    for port in "${PORTS[@]}"; do
        files+=("$(log_file "$port")")
    done
    for f in "${files[@]}"; do
        [ -f "$f" ] || continue
        echo "--- $f (last 30 lines) ---" >&2
        tail -n 30 "$f" >&2 || true
    done
}

fail_start() {
    echo "redis-cluster: $1" >&2
    show_logs
    stop
    return 1
}

start() {
    local port busy=""
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
        || { echo "redis-cluster: redis-server and redis-cli must be on PATH" >&2; return 1; }
    mkdir -p "$STATE"
    if all_running; then
        if wait_healthy 5; then
            urls
            return 0
        fi
        echo "redis-cluster: the running cluster is not healthy ($WHY); starting a fresh one" >&2
    fi
    stop
    for port in "${PORTS[@]}"; do
        port_busy "$port" && busy="$busy $port"
        port_busy "$((port + 10000))" && busy="$busy $((port + 10000))"
    done
    if [ -n "$busy" ]; then
        echo "redis-cluster: port(s)$busy already in use; not starting (set REDIS_CLUSTER_PORT to use other ports)" >&2
        return 1
    fi
    local started=$SECONDS
    for port in "${PORTS[@]}"; do
        rm -rf "$(node_dir "$port")"
        rm -f "$(conf_file "$port")" "$(log_file "$port")"
        launch_node "$port" || { fail_start "redis-server on port $port did not start"; return 1; }
    done
    for port in "${PORTS[@]}"; do
        wait_node "$port" 10 || { fail_start "the node on port $port did not answer within 10 s"; return 1; }
    done
    local addrs=()
    for port in "${PORTS[@]}"; do
        addrs+=("$HOST:$port")
    done
    if ! timeout 60 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
        </dev/null >"$STATE/cluster-create.log" 2>&1; then
        fail_start "redis-cli --cluster create failed"
        return 1
    fi
    if ! wait_healthy "$HEALTHY_WITHIN"; then
        fail_start "the cluster was not healthy within $HEALTHY_WITHIN s: $WHY"
        return 1
    fi
    echo "redis-cluster: 3 primaries and 3 replicas on ports ${PORTS[0]}-${PORTS[5]} healthy after $((SECONDS - started)) s" >&2
    urls
}

# Waits up to $1 tenths of a second until none of stop's nodes (its
# `pids` and `ports`) runs.
wait_gone() {
    local i left
    for _ in $(seq 1 "$1"); do
        left=0
        for i in "${!pids[@]}"; do
            is_node "${pids[$i]}" "${ports[$i]}" && left=1
        done
        [ "$left" -eq 1 ] || return 0
        sleep 0.1
    done
}

stop() {
    local port pid f pids=() ports=() i
    for port in "${PORTS[@]}"; do
        f="$(pid_file "$port")"
        [ -f "$f" ] || continue
        pid="$(cat "$f" 2>/dev/null || true)"
        if [[ "$pid" =~ ^[0-9]+$ ]] && live "$pid"; then
            if is_node "$pid" "$port"; then
                kill -TERM "$pid" 2>/dev/null || true
                pids+=("$pid")
                ports+=("$port")
            else
                echo "redis-cluster: PID $pid (from $f) is no longer the node on port $port; leaving it alone" >&2
            fi
        fi
    done
    wait_gone 50
    for i in "${!pids[@]}"; do
        if is_node "${pids[$i]}" "${ports[$i]}"; then
            echo "redis-cluster: the node on port ${ports[$i]} (PID ${pids[$i]}) did not stop within 5 s; killing it" >&2
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
    done
    wait_gone 20
    for port in "${PORTS[@]}"; do
        rm -f "$(pid_file "$port")"
    done
}

status() {
    if healthy; then
        urls
        return 0
    fi
    echo "redis-cluster: the cluster on ports ${PORTS[0]}-${PORTS[5]} is not healthy: $WHY" >&2
    return 1
}

# The PORT argument of restart-node and pid: one of the six node ports.
node_port() {
    local port
    for port in "${PORTS[@]}"; do
        if [ "${1:-}" = "$port" ]; then
            return 0
        fi
    done
    echo "redis-cluster: '${1:-}' is not a node port (${PORTS[0]}-${PORTS[5]})" >&2
    exit 2
}

restart_node() {
    local port="$1" pid
    if [ ! -f "$(conf_file "$port")" ]; then
        echo "redis-cluster: no $(conf_file "$port"); run '$0 start' first" >&2
        return 1
    fi
    if pid="$(node_pid "$port")"; then
        if answers_ping "$port"; then
            echo "redis-cluster: the node on port $port already runs (PID $pid)" >&2
            return 0
        fi
        echo "redis-cluster: the node on port $port (PID $pid) runs but does not answer PING" >&2
        return 1
    fi
    if port_busy "$port" || port_busy "$((port + 10000))"; then
        echo "redis-cluster: port $port or $((port + 10000)) is in use by another process; not restarting" >&2
        return 1
    fi
    # A replica keeps the snapshot of its last full sync in dump.rdb: a node
    # that loaded it would bring back keys long deleted. It starts empty and
    # syncs from the node that is primary now; so restart a killed primary
    # only after its replica has taken over (else it returns as a primary
    # with nothing in it).
    rm -f "$(node_dir "$port")/dump.rdb"
    launch_node "$port" || { echo "redis-cluster: redis-server on port $port did not start" >&2; return 1; }
    if ! wait_node "$port" 10; then
        echo "redis-cluster: the node on port $port did not answer within 10 s; its log:" >&2
        tail -n 30 "$(log_file "$port")" >&2 || true
        return 1
    fi
    echo "redis-cluster: the node on port $port runs again (PID $(node_pid "$port"))" >&2
}

pid() {
    if ! node_pid "$1"; then
        echo "redis-cluster: no node started by this script runs on port $1" >&2
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart-node)
        node_port "${2:-}"
        restart_node "$2"
        ;;
    pid)
        node_port "${2:-}"
        pid "$2"
        ;;
    *)
        echo "usage: $0 start|stop|status|restart-node PORT|pid PORT" >&2
        exit 2
        ;;
esac
