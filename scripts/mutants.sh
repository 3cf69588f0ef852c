#!/usr/bin/env bash
# Mutation testing with cargo-mutants: every mutant of the chosen files is
# built and the chosen tests are run against it; a mutant that no test
# catches is a gap in the suite (or an equivalent mutant, which TESTING.md
# explains). Slow on a small machine, so it is not part of .ci/run.
#
#   scripts/mutants.sh                      # the default files below
#   scripts/mutants.sh src/key.rs src/record.rs
#   MUTANTS_TIMEOUT=300 scripts/mutants.sh src/engine.rs
#   scripts/mutants.sh --iterate src/body.rs   # again, only what was missed
#   MUTANTS_TESTS="--lib --test layer" MUTANTS_FEATURES=test-util,axum \
#     scripts/mutants.sh src/service.rs
#
# Results: target/mutants/mutants.out (caught.txt, missed.txt, timeout.txt,
# unviable.txt, and one log per mutant). The Redis and PostgreSQL tests run
# against REDIS_URL and DATABASE_URL (standard local addresses by default).
set -euo pipefail
cd "$(dirname "$0")/.."

version=27.1.0
if ! cargo mutants --version 2>/dev/null | grep -q "$version"; then
  cargo install --locked "cargo-mutants@$version"
fi

# Arguments starting with "-" are cargo-mutants options (--iterate: only
# the mutants a previous run did not catch); the others are files.
files=()
options=()
for arg in "$@"; do
  case "$arg" in
    -*) options+=("$arg") ;;
    *) files+=("$arg") ;;
  esac
done
if [ ${#files[@]} -eq 0 ]; then
  files=(src/engine.rs src/service.rs src/layer.rs src/problem.rs src/body.rs
         src/future.rs src/key.rs src/fingerprint.rs src/record.rs src/config.rs
         src/store/memory/mod.rs src/store/memory/table.rs)
fi
mkdir -p target
filters=()
for f in "${files[@]}"; do filters+=(--file "$f"); done

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

# The test binaries that exercise the engine, the HTTP face and the memory
# store, plus the Redis and PostgreSQL store suites (real servers).
tests="${MUTANTS_TESTS:---lib --test layer --test faults --test body_mode --test properties --test security --test principals --test tcp --test message --test observe --test principal_warning --test redis --test postgres}"

# shellcheck disable=SC2086 # $tests is a list of cargo test arguments.
exec cargo mutants "${filters[@]}" ${options[@]+"${options[@]}"} \
  --features "${MUTANTS_FEATURES:-test-util,axum,json,metrics,utoipa,redis,postgres}" \
  --profile mutants \
  --timeout "${MUTANTS_TIMEOUT:-180}" --build-timeout 900 --jobs "${MUTANTS_JOBS:-2}" \
  --output target/mutants \
  -- $tests
