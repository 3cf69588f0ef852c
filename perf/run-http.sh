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
#   perf/run-http.sh --scale      # bare, then first executions next to
#                                 # 0, 10^3 .. 10^7 records resident: in
#                                 # memory, and in PostgreSQL when
#                                 # DATABASE_URL is set; 64-byte bodies; a
#                                 # CSV for perf/plot-scale.py
#
# Environment (defaults in brackets):
#   CONNECTIONS [64]  DURATION [10] s  WARMUP [2] s  BODY_BYTES [1024]
#   LOADGEN_THREADS [1]  SERVER_THREADS [0 = one per core]  PORT [39180]
#   PRELOAD [1000000] (--million)  RESULTS_DIR [a new temporary directory]
#   SCALE_POINTS ["0 1000 10000 100000 1000000 10000000"] (--scale; the
#   default BODY_BYTES is then 64)  SCALE_PG_CONNECTIONS [16]: the
#   PostgreSQL rows' connections (at 64, each request queues behind the
#   others for longer than 10 ms whatever the table holds: latency is
#   connections ÷ throughput)
#   GENERATORS ["loadgen wrk"]: the load generators, each row measured by
#   each (wrk from the system's packages, installed with apt-get if
#   missing; it has no storm scenario)  WRK_THREADS [2]
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
LOADGEN_THREADS="${LOADGEN_THREADS:-1}"
SERVER_THREADS="${SERVER_THREADS:-0}"
PORT="${PORT:-39180}"
PRELOAD="${PRELOAD:-1000000}"
SCALE_POINTS="${SCALE_POINTS:-0 1000 10000 100000 1000000 10000000}"
SCALE_PG_CONNECTIONS="${SCALE_PG_CONNECTIONS:-16}"
GENERATORS="${GENERATORS:-loadgen wrk}"
WRK_THREADS="${WRK_THREADS:-2}"

million=0
scale=0
stores="redis redis-cluster redis-cluster-noack postgres postgres-async mysql sqlite dynamodb"
only=0
while [ $# -gt 0 ]; do
  arg="$1"
  shift
  case "$arg" in
    --million) million=1 ;;
    --scale) scale=1 ;;
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

# --scale defaults to small bodies: ten million records fit in memory.
if [ "$scale" = 1 ]; then BODY_BYTES="${BODY_BYTES:-64}"; else BODY_BYTES="${BODY_BYTES:-1024}"; fi

features=()
if [ "$scale" = 1 ]; then
  if [ -n "${DATABASE_URL:-}" ]; then features+=(postgres); fi
elif [ "$million" = 0 ]; then
  if [ -n "${REDIS_URL:-}${REDIS_CLUSTER_URLS:-}" ]; then features+=(redis); fi
  if [ -n "${DATABASE_URL:-}" ]; then features+=(postgres); fi
  if [ -n "${MYSQL_URL:-}" ]; then features+=(mysql); fi
  if [ -n "${AWS_ENDPOINT_URL:-}" ]; then features+=(dynamodb); fi
  features+=(sqlite)
fi
feature_list="$(IFS=,; echo "${features[*]:-}")"

if [[ " $GENERATORS " == *" wrk "* ]] && ! command -v wrk >/dev/null; then
  echo "==> installing wrk (apt-get install wrk)" >&2
  { apt-get install -y wrk >&2 || { apt-get update >&2 && apt-get install -y wrk >&2; }; } ||
    { echo "wrk is not installed and could not be: GENERATORS=loadgen to go without" >&2; exit 1; }
fi

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

field() { sed -E "s/.*\"$1\":([0-9.]+).*/\1/" <<<"$2"; }

# The server's CPU time so far (user + system), in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$server_pid/stat"; }
ticks_per_s="$(getconf CLK_TCK)"

# The server's CPU µs per request between two cpu_ticks readings.
cpu_per_request() {
  awk -v a="$1" -v b="$2" -v n="$3" -v hz="$ticks_per_s" \
    'BEGIN { printf "%.1f", (n > 0 ? (b - a) * 1e6 / hz / n : 0) }'
}

# measure_loadgen LABEL KEYS [loadgen flags...]: one loadgen run, one row.
measure_loadgen() {
  local label="$1" keys="$2"
  shift 2
  echo "==> $label: loadgen --keys $keys $*" >&2
  local out_file="$RESULTS_DIR/loadgen.out"
  "$bin/loadgen" --url "http://127.0.0.1:$PORT/orders" \
    --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" \
    --body-bytes "$BODY_BYTES" --threads "$LOADGEN_THREADS" --keys "$keys" "$@" >"$out_file" &
  local gen=$!
  # The server's CPU over the measured part only: from the end of the
  # warm-up to the end of the run.
  sleep "$WARMUP"
  local t0 t1
  t0="$(cpu_ticks)"
  wait "$gen"
  t1="$(cpu_ticks)"
  local out json
  out="$(cat "$out_file")"
  echo "$out" | tail -n 1 | sed 's/^/    /' >&2
  json="$(echo "$out" | head -n 1)"
  echo "{\"label\":\"$label\",\"generator\":\"loadgen\",\"result\":$json}" >>"$RESULTS_DIR/results.jsonl"
  local rps p50 p99 statuses errors n
  rps="$(field rps "$json")"
  p50="$(field p50 "$json")"
  p99="$(field p99 "$json")"
  errors="$(field errors "$json")"
  statuses="$(sed -E 's/.*"status":\{([^}]*)\}.*/\1/; s/"//g; s/,/ /g' <<<"$json")"
  n="$(field requests "$json")"
  raw+=("loadgen|$label|$keys|$rps|$p50|$p99|$(cpu_per_request "$t0" "$t1" "$n")|$statuses|$errors")
}

# The Lua script that makes wrk send what loadgen sends: the same JSON
# body, the same key shapes (unique, repeat, preloaded).
wrk_script="perf/wrk-orders.lua"

# wrk's latency (as in "1.23ms") in µs.
wrk_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    printf "%.0f", n * (u == "s" ? 1e6 : u == "ms" ? 1e3 : 1)
  }'
}

# measure_wrk LABEL KEYS [--key-space N]: a warm-up run, then one wrk run,
# one row. (wrk has no storm scenario: loadgen only.)
measure_wrk() {
  local label="$1" keys="$2" space=1
  if [ "${3:-}" = --key-space ]; then space="$4"; fi
  if [ "$keys" = storm ]; then return; fi
  echo "==> $label: wrk ($keys)" >&2
  local run
  run="w$(date +%s%N)"
  local common=(-t "$WRK_THREADS" -c "$CONNECTIONS" -s "$wrk_script" --latency
    "http://127.0.0.1:$PORT/orders")
  wrk -d "${WARMUP}s" "${common[@]}" -- "$keys" "$BODY_BYTES" "$run" "$space" >/dev/null
  local t0 t1 out
  t0="$(cpu_ticks)"
  out="$(wrk -d "${DURATION}s" "${common[@]}" -- "$keys" "$BODY_BYTES" "$run" "$space")"
  t1="$(cpu_ticks)"
  echo "$out" >>"$RESULTS_DIR/wrk-$(tr -c 'a-z0-9\n' '-' <<<"$label")-$keys.txt"
  local rps p50 p99 n non2xx errors
  rps="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")"
  p50="$(wrk_us "$(awk '$1 == "50%" { print $2 }' <<<"$out")")"
  p99="$(wrk_us "$(awk '$1 == "99%" { print $2 }' <<<"$out")")"
  n="$(awk '/requests in/ { print $1 }' <<<"$out")"
  non2xx="$(awk '/Non-2xx or 3xx responses:/ { print $5 }' <<<"$out")"
  errors="$(awk '/Socket errors:/ { s = 0; for (i = 3; i <= NF; i += 2) s += $(i + 1); print s }' <<<"$out")"
  echo "    $rps req/s, p50 ${p50} µs, p99 ${p99} µs, ${non2xx:-0} non-2xx" >&2
  raw+=("wrk|$label|$keys|$rps|$p50|$p99|$(cpu_per_request "$t0" "$t1" "$n")|non-2xx ${non2xx:-0}|${errors:-0}")
}

# measure LABEL KEYS [loadgen flags...]: a row per generator.
measure() {
  local g
  for g in $GENERATORS; do
    "measure_$g" "$@"
  done
}

# The table, every ratio to the mean of the same generator's bare runs
# (one first, one last: the machine's speed drifts during a run).
table() {
  printf '%s\n' "${raw[@]}" | awk -F'|' '
    { row[NR] = $0; if ($2 == "bare") { br[$1] += $4; bp[$1] += $6; bn[$1]++ } }
    END {
      for (i = 1; i <= NR; i++) {
        split(row[i], f, "|")
        g = f[1]; r = bn[g] ? br[g] / bn[g] : 0; p = bn[g] ? bp[g] / bn[g] : 0
        printf "| %s | %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f | %s | %s%s |\n",
          f[2], f[3], g, f[4], f[5] / 1000, f[6] / 1000, (r > 0 ? f[4] / r : 0),
          (p > 0 ? f[6] / p : 0), f[7], f[8], (f[9] > 0 ? sprintf(", %d errors", f[9]) : "")
      }
    }'
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"

# The reference: measured first and again last.
start_server bare bare
measure bare unique
stop_server

if [ "$scale" = 1 ]; then
  for n in $SCALE_POINTS; do
    preload=()
    if [ "$n" -gt 0 ]; then preload=(--preload "$n" --preload-body-bytes "$BODY_BYTES"); fi
    # Bounds well above what the run adds: nothing is evicted.
    start_server "memory-$n" memory "${preload[@]}" --max-entries $((n + 5000000)) --max-mib 16384
    measure "memory, $n resident" unique
    stop_server
  done
  if [ -n "${DATABASE_URL:-}" ]; then
    for n in $SCALE_POINTS; do
      # The table emptied, then `n` rows (at least the one recorded
      # through the layer that the others copy).
      start_server "postgres-$n" postgres --preload-rows $((n > 0 ? n : 1))
      CONNECTIONS="$SCALE_PG_CONNECTIONS" measure "postgres, $n resident" unique
      stop_server
    done
    # The shared database is not left holding millions of rows.
    start_server postgres-emptied postgres --preload-rows 1
    stop_server
  else
    echo "==> skipping postgres: DATABASE_URL is unset" >&2
  fi
elif [ "$million" = 1 ]; then
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
    if [ "${backend#postgres}" != "$backend" ] && [ -z "${DATABASE_URL:-}" ]; then
      echo "==> skipping $backend: DATABASE_URL is unset" >&2
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
echo "Ratios are to the mean of the same generator's two bare runs (the first and the last rows)."
echo "Server CPU is the server process's user + system time over the measured seconds (/proc/PID/stat), per request."
echo
echo "| server | keys | generator | req/s | p50 ms | p99 ms | req/s ÷ bare | p99 ÷ bare | server CPU µs/req | statuses |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---|"
rows="$(table)"
printf '%s\n' "$rows"

if [ "$scale" = 1 ]; then
  # The rows perf/plot-scale.py draws.
  {
    echo "store,records,generator,connections,rps,p99_ms,ratio"
    printf '%s\n' "$rows" | awk -F'|' -v c="$CONNECTIONS" -v pc="$SCALE_PG_CONNECTIONS" '$2 ~ /resident/ {
      split($2, l, ","); store = l[1]; gsub(/ /, "", store)
      n = l[2]; gsub(/[^0-9]/, "", n); gen = $4; gsub(/ /, "", gen)
      printf "%s,%s,%s,%s,%s,%s,%s\n", store, n, gen, (store == "postgres" ? pc : c), $5 + 0, $7 + 0, $8 + 0
    }'
  } >"$RESULTS_DIR/scale.csv"
  echo
  echo "CSV for perf/plot-scale.py: $RESULTS_DIR/scale.csv"
fi
