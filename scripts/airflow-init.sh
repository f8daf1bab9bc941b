#!/usr/bin/env bash
# The stack's one-off start-up step: docker-compose.yaml's airflow-init service runs it
# in the container, and tests/native_stack.py runs it on the host, with the same
# environment. Safe to repeat: every step converges.
set -euo pipefail
: "${HEADPOSE_S3_BUCKET:?the bucket the DAG writes to}"
: "${HEADPOSE_WORKSPACE:?the workspace shared by the workers}"
: "${AIRFLOW_ADMIN_USER:?the admin login (from .env)}" "${AIRFLOW_ADMIN_PASSWORD:?its password}"
: "${AIRFLOW_OPERATOR_USER:?the operator login (from .env)}" "${AIRFLOW_OPERATOR_PASSWORD:?its password}"
: "${AIRFLOW_VIEWER_USER:?the viewer login (from .env)}" "${AIRFLOW_VIEWER_PASSWORD:?its password}"
if [ "$AIRFLOW_ADMIN_USER" = "$AIRFLOW_OPERATOR_USER" ] || [ "$AIRFLOW_ADMIN_USER" = "$AIRFLOW_VIEWER_USER" ] \
   || [ "$AIRFLOW_OPERATOR_USER" = "$AIRFLOW_VIEWER_USER" ]; then
  echo "airflow-init: AIRFLOW_ADMIN_USER, AIRFLOW_OPERATOR_USER and AIRFLOW_VIEWER_USER must name three users" >&2
  exit 1
fi

echo "airflow-init: migrating the metadata database"
# With the FAB auth manager configured this also creates and migrates FAB's own tables
# (users, roles, permissions): Airflow runs the provider's FABDBManager as part of it.
airflow db migrate

echo "airflow-init: logins from .env"
# A missing user is created with its role; an existing one gets the .env password, so
# changing it in .env and re-running this step changes the login (roles given in the UI
# since are kept). These are the security-manager calls `airflow users create` and
# `users reset-password` make, in one process: each of those commands builds FAB's whole
# app (10-20 s on a small host), and create-or-reset of three logins would take four.
python - <<'PY'
import os
import sys

from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

LOGINS = {"Admin": "AIRFLOW_ADMIN", "Op": "AIRFLOW_OPERATOR", "Viewer": "AIRFLOW_VIEWER"}

with get_application_builder() as appbuilder:
    security = appbuilder.sm
    for role, prefix in LOGINS.items():
        username, password = os.environ[f"{prefix}_USER"], os.environ[f"{prefix}_PASSWORD"]
        user = security.find_user(username=username)
        if user is None:
            # FAB requires an address; these logins receive no mail (SSO brings real ones).
            done = security.add_user(username, username, role, f"{username}@headpose.invalid",
                                     security.find_role(role), password)
        else:
            done = security.reset_password(user.id, password)
        if not done:
            sys.exit(f"airflow-init: could not {'create' if user is None else 'update'} {prefix}_USER={username}")
        print(f"airflow-init: {prefix}_USER={username} ({role}) {'created' if user is None else 'password set'}")
PY

echo "airflow-init: bucket s3://${HEADPOSE_S3_BUCKET}"
# Through the DAG's own connection, so that a wrong endpoint or key fails here, at start.
python - <<'PY'
import os

from airflow.providers.amazon.aws.hooks.s3 import S3Hook

hook = S3Hook(aws_conn_id="aws_default")
bucket = os.environ["HEADPOSE_S3_BUCKET"]
if not hook.check_for_bucket(bucket):
    hook.create_bucket(bucket_name=bucket)
PY

mkdir -p "$HEADPOSE_WORKSPACE"
# Named volumes start out owned by root; the Airflow containers run as AIRFLOW_UID.
if [ "$(id -u)" = 0 ] && [ -n "${AIRFLOW_UID:-}" ]; then
  chown -R "${AIRFLOW_UID}:0" "$HEADPOSE_WORKSPACE" \
    "${AIRFLOW__LOGGING__BASE_LOG_FOLDER:-${AIRFLOW_HOME:-/opt/airflow}/logs}"
fi
echo "airflow-init: done"
