#!/usr/bin/env bash
# A DynamoDB-compatible server for the DynamoDB store's tests: moto in server
# mode, installed into a virtual environment under target/tools/moto, and
# served one request at a time (scripts/moto-serial.py says why).
#
#   scripts/dynamodb-emulator.sh start    install if missing, start, wait until it answers
#   scripts/dynamodb-emulator.sh stop     stop the server started by `start` (by its PID file)
#   scripts/dynamodb-emulator.sh status   exit 0 and print the endpoint if it answers
#   scripts/dynamodb-emulator.sh install  only create the virtual environment
#
# The port is ${DYNAMODB_PORT:-8000}. `start` prints AWS_ENDPOINT_URL=... on
# its last line, for `eval` or a CI log. Every command is idempotent.
set -euo pipefail

MOTO_VERSION="5.2.6"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/target/tools"
VENV="$TOOLS/moto"
PORT="${DYNAMODB_PORT:-8000}"
HOST="127.0.0.1"
PID_FILE="$TOOLS/moto-$PORT.pid"
LOG_FILE="$TOOLS/moto-$PORT.log"
ENDPOINT="http://$HOST:$PORT"

# True when something on the port answers like a moto server.
answers() {
    "$VENV/bin/python" - "$ENDPOINT" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/moto-api/", timeout=1) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

# moto loads its DynamoDB backend on the first DynamoDB request, which can
# take a second on a busy machine: make that request here, so the first
# test's calls are not the ones that wait (the server answers one request
# at a time, and the tests bound each call to 1 s).
warm_up() {
    "$VENV/bin/python" - "$ENDPOINT" <<'PY'
import sys, urllib.request
req = urllib.request.Request(
    sys.argv[1] + "/",
    data=b"{}",
    headers={
        "Content-Type": "application/x-amz-json-1.0",
        "X-Amz-Target": "DynamoDB_20120810.ListTables",
        "Authorization": "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/"
        "dynamodb/aws4_request, SignedHeaders=host, Signature=0",
    },
)
with urllib.request.urlopen(req, timeout=60) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}

install() {
    if [ -x "$VENV/bin/moto_server" ] \
        && "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '$MOTO_VERSION')" 2>/dev/null; then
        return 0
    fi
    mkdir -p "$TOOLS"
    echo "dynamodb-emulator: installing moto $MOTO_VERSION into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "moto[dynamodb,server]==$MOTO_VERSION"
}

running_pid() {
    if [ -f "$PID_FILE" ]; then
        local pid
        pid="$(cat "$PID_FILE")"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            echo "$pid"
            return 0
        fi
    fi
    return 1
}

start() {
    install
    if running_pid >/dev/null && answers; then
        echo "AWS_ENDPOINT_URL=$ENDPOINT"
        return 0
    fi
    if answers; then
        echo "dynamodb-emulator: something else already answers on $ENDPOINT; not starting another" >&2
        echo "AWS_ENDPOINT_URL=$ENDPOINT"
        return 0
    fi
    rm -f "$PID_FILE"
    nohup "$VENV/bin/python" "$ROOT/scripts/moto-serial.py" "$HOST" "$PORT" >"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    for _ in $(seq 1 150); do
        if answers; then
            if ! warm_up; then
                echo "dynamodb-emulator: the moto server does not answer DynamoDB requests" >&2
                stop
                return 1
            fi
            echo "AWS_ENDPOINT_URL=$ENDPOINT"
            return 0
        fi
        if ! running_pid >/dev/null; then
            echo "dynamodb-emulator: the moto server exited; its log:" >&2
            cat "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            return 1
        fi
        sleep 0.2
    done
    echo "dynamodb-emulator: the moto server did not answer on $ENDPOINT within 30 s" >&2
    stop
    return 1
}

stop() {
    local pid
    if pid="$(running_pid)"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
}

status() {
    if [ -x "$VENV/bin/python" ] && answers; then
        echo "AWS_ENDPOINT_URL=$ENDPOINT"
        return 0
    fi
    echo "dynamodb-emulator: nothing answers on $ENDPOINT" >&2
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    install) install ;;
    *)
        echo "usage: $0 start|stop|status|install" >&2
        exit 2
        ;;
esac
