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
# No demo in production: without a profile every scheduled run would retrain the embedded
# demo (a small model on synthetic images) and publish it into this bucket. Every service
# waits for this step, so the stack does not start until .env says which it wants.
if [ -z "${HEADPOSE_RUN_DEFAULTS:-}" ] && [ "${HEADPOSE_ALLOW_DEMO_DEFAULTS:-false}" != "true" ]; then
  echo "airflow-init: HEADPOSE_RUN_DEFAULTS (the deployment profile) is not set, so scheduled runs would" \
       "train and publish the embedded demo; set the profile in .env (README, Operating), or" \
       "HEADPOSE_ALLOW_DEMO_DEFAULTS=true to run the demo defaults on purpose" >&2
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
# Through the DAG's own connection, so that a wrong endpoint or key fails here, at start,
# and pinned to the deployment's bucket owner like every call of the pipeline: a bucket of
# that name that another account owns is refused, never used.
python - <<'PY'
import os
import sys

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError

from headpose.planning.profile import load_profile
from headpose.planning.s3_calls import pin_bucket_owner

settings = load_profile().settings
hook = S3Hook(aws_conn_id="aws_default")
owner = settings.expected_bucket_owner or hook.conn_config.extra_config.get("expected_bucket_owner")
s3 = pin_bucket_owner(hook.get_conn(), owner)
bucket = os.environ["HEADPOSE_S3_BUCKET"]
try:
    s3.head_bucket(Bucket=bucket)
except ClientError as error:
    if error.response["Error"]["Code"] not in ("404", "NoSuchBucket", "NotFound"):
        sys.exit(f"airflow-init: bucket {bucket} cannot be used ({error}); expected owner: {owner or 'any'}")
    region = s3.meta.region_name
    options = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    if settings.object_lock_days:  # only at creation: published versions are then kept locked
        options["ObjectLockEnabledForBucket"] = True
    s3.create_bucket(Bucket=bucket, **options)
    s3.head_bucket(Bucket=bucket)  # the owner, checked on the bucket just made
    print(f"airflow-init: created s3://{bucket}{' with Object Lock' if settings.object_lock_days else ''}")
PY

echo "airflow-init: new data"
# retrain_on data or either: the queue, its policy (the bucket may send to it) and the bucket's
# notification of uploads under new_data_prefix, through the same connection. Converges.
python - <<'PY'
from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

from headpose.planning.new_data_setup import set_up_new_data
from headpose.planning.profile import load_profile
from headpose.planning.s3_calls import pin_bucket_owner

settings = load_profile().settings
if not settings.watches_new_data:
    print("airflow-init: retrain_on=schedule: no new-data queue")
else:
    s3 = AwsBaseHook(aws_conn_id="aws_default", client_type="s3")
    owner = settings.expected_bucket_owner or s3.conn_config.extra_config.get("expected_bucket_owner")
    sqs = AwsBaseHook(aws_conn_id="aws_default", client_type="sqs").get_conn()
    set_up_new_data(pin_bucket_owner(s3.get_conn(), owner), sqs, settings)
PY

mkdir -p "$HEADPOSE_WORKSPACE"
# Named volumes start out owned by root; the Airflow containers run as AIRFLOW_UID.
if [ "$(id -u)" = 0 ] && [ -n "${AIRFLOW_UID:-}" ]; then
  chown -R "${AIRFLOW_UID}:0" "$HEADPOSE_WORKSPACE" \
    "${AIRFLOW__LOGGING__BASE_LOG_FOLDER:-${AIRFLOW_HOME:-/opt/airflow}/logs}"
fi
echo "airflow-init: done"
