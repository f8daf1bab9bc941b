#!/usr/bin/env bash
# Install what the tests need, then run them. Two tiers:
#   ./scripts/test.sh          the whole suite (what CI runs)
#   ./scripts/test.sh quick    no whole-DAG run and no native stack: for use while editing
# Extra arguments go to pytest, e.g. `./scripts/test.sh quick -k registry`.
#
# The whole suite is two pytest sessions side by side: the native stack's tests (marked
# `distributed`) in one, everything else in the other. Each spends most of its time waiting
# on processes of its own - the stack's services and the runs they execute; the batch of
# whole-DAG runs, trainings and conversions - so together they keep both cores busy. The
# stack session's output follows the other's, then one line counts both. Arguments that
# choose marks themselves (`-m ...`) run as one session.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
pytest=(.venv/bin/python -m pytest)
if [ "${1:-}" = quick ]; then
  shift
  exec "${pytest[@]}" -m "not e2e and not distributed" "$@"
fi
for arg in "$@"; do
  case "$arg" in -m|-m*) exec "${pytest[@]}" "$@" ;; esac
done

# One render cache for both sessions (each synthetic dataset is rendered once).
if [ -z "${HEADPOSE_SYNTHETIC_CACHE:-}" ]; then
  HEADPOSE_SYNTHETIC_CACHE=$(mktemp -d -t headpose-synthetic-cache-XXXXXX)
  export HEADPOSE_SYNTHETIC_CACHE
  trap 'rm -rf "$HEADPOSE_SYNTHETIC_CACHE"' EXIT
fi
mkdir -p test-artifacts
stack_log=test-artifacts/stack-session.log
main_log=test-artifacts/main-session.log
"${pytest[@]}" -m distributed "$@" >"$stack_log" 2>&1 &
stack_pid=$!
set +e
"${pytest[@]}" -m "not distributed" "$@" 2>&1 | tee "$main_log"
main_rc=${PIPESTATUS[0]}
wait "$stack_pid"
stack_rc=$?
set -e
echo
echo "=============== the native stack's session (tests marked distributed) ==============="
cat "$stack_log"
exec .venv/bin/python scripts/test_summary.py "$main_log" "$main_rc" "$stack_log" "$stack_rc"
