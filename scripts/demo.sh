#!/usr/bin/env bash
# The whole pipeline on the embedded default: installs what it needs, starts moto's S3
# server on 127.0.0.1, runs one DAG run with `airflow dags test`, copies the published
# model to ./demo-output, and stops the server. Extra arguments are trigger params as
# key=value, e.g. `./scripts/demo.sh training_steps=800`.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
./scripts/bootstrap.sh
export HEADPOSE_INSTALL_SECONDS=$(( $(date +%s) - start ))
source scripts/airflow-env.sh
export AIRFLOW_HOME="$PWD/.demo/airflow" HEADPOSE_WORKSPACE="$PWD/.demo/workspace"
# The embedded S3 forgets its data when it stops; keep the rendered synthetic set on disk
# so that the next demo uploads it again instead of rendering it (minutes) again.
export HEADPOSE_SYNTHETIC_CACHE="${HEADPOSE_SYNTHETIC_CACHE:-$PWD/.demo/synthetic-cache}"
exec .venv/bin/python scripts/demo.py "$@"
