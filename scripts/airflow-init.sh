#!/usr/bin/env bash
# The stack's one-off start-up step: docker-compose.yaml's airflow-init service runs it
# in the container, and tests/native_stack.py runs it on the host, with the same
# environment. Safe to repeat: every step converges.
set -euo pipefail
: "${AIRFLOW_ADMIN_PASSWORD:?the admin password (from .env)}"
: "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?where the auth manager reads passwords}"
: "${HEADPOSE_S3_BUCKET:?the bucket the DAG writes to}"
: "${HEADPOSE_WORKSPACE:?the workspace shared by the workers}"

echo "airflow-init: migrating the metadata database"
airflow db migrate

echo "airflow-init: admin password file, bucket s3://${HEADPOSE_S3_BUCKET}"
# SimpleAuthManager keeps passwords in a JSON file ({"user": "password"}) and would
# generate and print random ones; writing it from .env makes the login known and stable.
python - <<'PY'
import json
import os
from pathlib import Path

users = [entry.split(":")[0] for entry in os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin").split(",")]
path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
path.parent.mkdir(parents=True, exist_ok=True)
path.touch(mode=0o600)
path.write_text(json.dumps({users[0]: os.environ["AIRFLOW_ADMIN_PASSWORD"]}))

# Through the DAG's own connection, so that a wrong endpoint or key fails here, at start.
from airflow.providers.amazon.aws.hooks.s3 import S3Hook

hook = S3Hook(aws_conn_id="aws_default")
bucket = os.environ["HEADPOSE_S3_BUCKET"]
if not hook.check_for_bucket(bucket):
    hook.create_bucket(bucket_name=bucket)
PY

mkdir -p "$HEADPOSE_WORKSPACE"
# Named volumes start out owned by root; the Airflow containers run as AIRFLOW_UID.
if [ "$(id -u)" = 0 ] && [ -n "${AIRFLOW_UID:-}" ]; then
  chown -R "${AIRFLOW_UID}:0" "$HEADPOSE_WORKSPACE" "$(dirname "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")" \
    "${AIRFLOW__LOGGING__BASE_LOG_FOLDER:-${AIRFLOW_HOME:-/opt/airflow}/logs}"
fi
echo "airflow-init: done"
