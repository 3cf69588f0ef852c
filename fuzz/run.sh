#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 60 s each).
# Usage: fuzz/run.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Stable toolchain: no sanitizer (those need nightly); coverage guidance still works.
export RUSTC_BOOTSTRAP=1
for target in key_parser record_decode; do
  mkdir -p "corpus/$target"
  cp -n seeds/"$target"/* "corpus/$target"/ 2>/dev/null || true
  echo "== $target for ${secs}s"
  cargo fuzz run --sanitizer none "$target" "corpus/$target" -- \
    -max_total_time="$secs" -max_len=4096 2>&1 | grep -E "^#[0-9]+.*(DONE|pulse)|Done|crash|panicked|SUMMARY" || true
done
