#!/usr/bin/env bash
# HTTP benchmarks over loopback: bench-server under loadgen, one server per
# row, and a markdown table of req/s and latency with ratios to `bare`.
#
#   perf/run-http.sh              # bare; memory unique/repeat/storm;
#                                 # memory bounded to 20,000 entries;
#                                 # redis, postgres, mysql and sqlite
#                                 # unique/repeat
#   perf/run-http.sh --stores "redis redis-cluster"
#                                 # bare and the named store rows only
#   perf/run-http.sh --million    # bare, then memory preloaded with
#                                 # 1,000,000 records: replays and first
#                                 # executions on top of them; then first
#                                 # executions into a store full at 1,000,000
#
# Environment (defaults in brackets):
#   CONNECTIONS [64]  DURATION [10] s  WARMUP [2] s  BODY_BYTES [1024]
#   LOADGEN_THREADS [1]  SERVER_THREADS [0 = one per core]  PORT [39180]
#   PRELOAD [1000000] (--million)  RESULTS_DIR [a new temporary directory]
#   REDIS_URL, DATABASE_URL, MYSQL_URL: the redis, postgres and mysql rows
#   run only when set; REDIS_CLUSTER_URLS (comma-separated nodes): the
#   redis-cluster rows, with and without replica acknowledgement (PG_POOL [16]: the server's SQL pool size). The sqlite
#   row runs on a fresh file in the temporary directory (SQLITE_PATH).
#   AWS_ENDPOINT_URL: the dynamodb rows (a DynamoDB emulator's latency is
#   not DynamoDB's).
#
# The load generator and the server share the machine's cores: the figures
# are for comparing rows of one run, not absolute capacity. Every load run
# stops by itself; the script kills each server it starts.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS="${CONNECTIONS:-64}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
BODY_BYTES="${BODY_BYTES:-1024}"
LOADGEN_THREADS="${LOADGEN_THREADS:-1}"
SERVER_THREADS="${SERVER_THREADS:-0}"
PORT="${PORT:-39180}"
PRELOAD="${PRELOAD:-1000000}"

million=0
stores="redis redis-cluster redis-cluster-noack postgres mysql sqlite dynamodb"
only=0
while [ $# -gt 0 ]; do
  arg="$1"
  shift
  case "$arg" in
    --million) million=1 ;;
    --stores)
      stores="${1:?--stores needs a list}"
      only=1
      shift
      ;;
    -h | --help)
      awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (try --help)" >&2
      exit 2
      ;;
  esac
done

features=()
if [ "$million" = 0 ]; then
  if [ -n "${REDIS_URL:-}${REDIS_CLUSTER_URLS:-}" ]; then features+=(redis); fi
  if [ -n "${DATABASE_URL:-}" ]; then features+=(postgres); fi
  if [ -n "${MYSQL_URL:-}" ]; then features+=(mysql); fi
  if [ -n "${AWS_ENDPOINT_URL:-}" ]; then features+=(dynamodb); fi
  features+=(sqlite)
fi
feature_list="$(IFS=,; echo "${features[*]:-}")"

echo "==> cargo build --release -p tower-idempotency-perf --features '$feature_list'" >&2
cargo build --release -p tower-idempotency-perf --features "$feature_list" >&2
bin="${CARGO_TARGET_DIR:-target}/release"

RESULTS_DIR="${RESULTS_DIR:-$(mktemp -d)}"
mkdir -p "$RESULTS_DIR"
echo "==> raw results in $RESULTS_DIR" >&2

server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# start_server NAME MODE [bench-server flags...]: waits for "listening".
start_server() {
  local name="$1" mode="$2"
  shift 2
  local log="$RESULTS_DIR/server-$name.log"
  "$bin/bench-server" --port "$PORT" --mode "$mode" --threads "$SERVER_THREADS" \
    --exit-after 3600 "$@" >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 3000); do
    if grep -q '^listening' "$log"; then
      grep -v '^listening' "$log" | sed 's/^/    /' >&2 || true
      return 0
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "bench-server --mode $mode did not start:" >&2
      sed 's/^/    /' "$log" >&2
      server_pid=""
      return 1
    fi
    sleep 0.2
  done
  echo "bench-server --mode $mode not listening after 600 s" >&2
  return 1
}

raw=()
bare_rps=()
bare_p99=()

field() { sed -E "s/.*\"$1\":([0-9.]+).*/\1/" <<<"$2"; }

# measure LABEL KEYS [loadgen flags...]: one loadgen run, one table row.
measure() {
  local label="$1" keys="$2"
  shift 2
  echo "==> $label: loadgen --keys $keys $*" >&2
  local out
  out="$("$bin/loadgen" --url "http://127.0.0.1:$PORT/orders" \
    --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" \
    --body-bytes "$BODY_BYTES" --threads "$LOADGEN_THREADS" --keys "$keys" "$@")"
  echo "$out" | tail -n 1 | sed 's/^/    /' >&2
  local json
  json="$(echo "$out" | head -n 1)"
  echo "{\"label\":\"$label\",\"result\":$json}" >>"$RESULTS_DIR/results.jsonl"
  local rps p50 p99 statuses errors
  rps="$(field rps "$json")"
  p50="$(field p50 "$json")"
  p99="$(field p99 "$json")"
  errors="$(field errors "$json")"
  statuses="$(sed -E 's/.*"status":\{([^}]*)\}.*/\1/; s/"//g; s/,/ /g' <<<"$json")"
  if [ "$label" = bare ]; then
    bare_rps+=("$rps")
    bare_p99+=("$p99")
  fi
  raw+=("$label|$keys|$rps|$p50|$p99|$statuses|$errors")
}

# The table, every ratio to the mean of the bare runs (one first, one
# last: the machine's speed drifts during a run).
table() {
  local br bp
  br="$(printf '%s\n' "${bare_rps[@]}" | awk '{ s += $1 } END { print (NR ? s / NR : 0) }')"
  bp="$(printf '%s\n' "${bare_p99[@]}" | awk '{ s += $1 } END { print (NR ? s / NR : 0) }')"
  printf '%s\n' "${raw[@]}" | awk -F'|' -v br="$br" -v bp="$bp" '{
    printf "| %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f | %s%s |\n",
      $1, $2, $3, $4 / 1000, $5 / 1000, (br > 0 ? $3 / br : 0), (bp > 0 ? $5 / bp : 0),
      $6, ($7 > 0 ? sprintf(", %d errors", $7) : "")
  }'
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"

# The reference: measured first and again last.
start_server bare bare
measure bare unique
stop_server

if [ "$million" = 1 ]; then
  start_server million memory --preload "$PRELOAD" --preload-body-bytes "$BODY_BYTES"
  measure "memory, $PRELOAD preloaded" preloaded --key-space "$PRELOAD"
  measure "memory, $PRELOAD preloaded" repeat
  measure "memory, $PRELOAD preloaded" unique
  stop_server
  # Full at the same million: every first execution evicts the oldest.
  start_server million-full memory --preload "$PRELOAD" --preload-body-bytes "$BODY_BYTES" \
    --max-entries "$PRELOAD"
  measure "memory, $PRELOAD preloaded, $PRELOAD max" unique
  stop_server
else
  if [ "$only" = 0 ]; then
    start_server memory memory
    measure memory unique
    measure memory repeat
    measure memory storm
    stop_server
    # A store at its bound: the oldest records make room, so it stops
    # growing (the steady state of a long-running server).
    start_server memory-bounded memory --max-entries 20000
    measure "memory, 20,000 max" unique
    stop_server
  fi
  for backend in $stores; do
    if [ "$backend" = redis ] && [ -z "${REDIS_URL:-}" ]; then
      echo "==> skipping redis: REDIS_URL is unset" >&2
      continue
    fi
    if [ "${backend#redis-cluster}" != "$backend" ] && [ -z "${REDIS_CLUSTER_URLS:-}" ]; then
      echo "==> skipping $backend: REDIS_CLUSTER_URLS is unset" >&2
      continue
    fi
    if [ "$backend" = postgres ] && [ -z "${DATABASE_URL:-}" ]; then
      echo "==> skipping postgres: DATABASE_URL is unset" >&2
      continue
    fi
    if [ "$backend" = dynamodb ] && [ -z "${AWS_ENDPOINT_URL:-}" ]; then
      echo "==> skipping dynamodb: AWS_ENDPOINT_URL is unset" >&2
      continue
    fi
    if [ "$backend" = mysql ] && [ -z "${MYSQL_URL:-}" ]; then
      echo "==> skipping mysql: MYSQL_URL is unset" >&2
      continue
    fi
    if start_server "$backend" "$backend"; then
      measure "$backend" unique
      measure "$backend" repeat
      stop_server
    else
      echo "==> skipping $backend: the server did not start" >&2
    fi
  done
fi

start_server bare-again bare
measure bare unique
stop_server

load_after="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"

echo
echo "$CONNECTIONS connections, ${DURATION} s after ${WARMUP} s warm-up, ${BODY_BYTES}-byte JSON body," \
  "$(nproc) cores shared by server and load generator (loadgen threads: $LOADGEN_THREADS);" \
  "load average (1, 5, 15 min) $load_before before, $load_after after"
echo
echo "Ratios are to the mean of the two bare runs (the first and the last row)."
echo
echo "| server | keys | req/s | p50 ms | p99 ms | req/s ÷ bare | p99 ÷ bare | statuses |"
echo "|---|---|---:|---:|---:|---:|---:|---|"
table
