#!/usr/bin/env bash
# Install what the tests need, then run them. Two tiers:
#   ./scripts/test.sh          the whole suite (what CI runs): unit tests, the batch of whole
#                              DAG runs and the native stack, the last two started in the
#                              background while the unit tests run
#   ./scripts/test.sh quick    no whole-DAG run and no native stack: for use while editing
# Extra arguments go to pytest, e.g. `./scripts/test.sh quick -k registry`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
tier=()
if [ "${1:-}" = quick ]; then
  shift
  tier=(-m "not e2e and not distributed")
fi
exec .venv/bin/python -m pytest "${tier[@]}" "$@"
