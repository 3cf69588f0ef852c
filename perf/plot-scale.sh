#!/usr/bin/env bash
# Draws perf/run-http.sh --scale results as a PNG:
#
#   perf/plot-scale.sh RESULTS_DIR/scale.csv perf/scale.png
#
# matplotlib comes from PyPI into a virtual environment under target/tools
# (made on first use), so nothing is installed system-wide.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 2 ]; then
  echo "usage: perf/plot-scale.sh SCALE_CSV OUT_PNG" >&2
  exit 2
fi
venv="${CARGO_TARGET_DIR:-target}/tools/plot"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  echo "==> matplotlib into $venv (pip, from PyPI)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'matplotlib>=3.7,<4'
fi
exec "$venv/bin/python" perf/plot-scale.py "$1" "$2"
