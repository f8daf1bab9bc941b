#!/usr/bin/env bash
# Install what the tests need, then run them. Extra arguments go to pytest,
# e.g. `./scripts/test.sh -m "not e2e"` for a quick run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
