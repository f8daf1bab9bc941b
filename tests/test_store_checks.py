"""The store before a version is made: conditional writes honoured, version files locked where asked.

moto honours If-Match / If-None-Match on PutObject and S3 Object Lock; a relay that drops
the conditional headers plays a store that ignores them.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import boto3
import pytest

from fault_support import keys
from headpose.planning.plan import plan_run
from headpose.registry.pointer import PublishError
from headpose.registry.store_checks import require_conditional_writes
from headpose.registry.versions import make_version
from store_support import HeaderStrippingRelay

BUCKET = "headpose-store"
LOGICAL = datetime(2025, 1, 6, 3, tzinfo=timezone.utc)
FILES = {"frozen_model.pb": b"graph", "frozen_model.json": b"{}", "report.json": b"{}", "confusion_matrix.png": b"png"}


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _plan(object_lock_days: int = 0, monkeypatch=None) -> dict:
    plan = plan_run({"s3_bucket": BUCKET}, LOGICAL, region="us-east-1", dag_id="d", run_id="r")
    plan["deployment"]["object_lock_days"] = object_lock_days
    return plan


def _candidate(s3, plan: dict) -> tuple[dict, dict]:
    """The accepted candidate's files in S3, and the XComs of freeze_graph and validate_model naming them."""
    uris = {}
    for name, body in FILES.items():
        key = plan["candidate_prefix"].split(f"{BUCKET}/", 1)[1] + name
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        uris[name] = (f"s3://{BUCKET}/{key}", hashlib.sha256(body).hexdigest())
    frozen = {"training_job_name": plan["training_job_name"], "channel_order": "bgr",
              "frozen_model_uri": uris["frozen_model.pb"][0], "frozen_model_sha256": uris["frozen_model.pb"][1],
              "frozen_model_json_uri": uris["frozen_model.json"][0],
              "frozen_model_json_sha256": uris["frozen_model.json"][1]}
    report = {"report_uri": uris["report.json"][0], "report_sha256": uris["report.json"][1],
              "confusion_png_uri": uris["confusion_matrix.png"][0],
              "confusion_png_sha256": uris["confusion_matrix.png"][1]}
    return frozen, report


def test_a_store_that_ignores_conditional_writes_is_refused_before_a_version_is_made(s3_client, moto_server):
    s3_client.create_bucket(Bucket=BUCKET)
    plan = _plan()
    frozen, report = _candidate(s3_client, plan)
    before = keys(s3_client, BUCKET)
    relay = HeaderStrippingRelay(moto_server.port)
    try:
        with pytest.raises(PublishError) as refused:
            make_version(_client(relay.endpoint), plan, frozen, report)
    finally:
        relay.close()
    message = str(refused.value)
    assert f"bucket {BUCKET} at {relay.endpoint}" in message  # the store, named
    assert "ignores If-None-Match and If-Match" in message
    assert len(relay.stripped) == 2  # the two writes that had to fail
    assert keys(s3_client, BUCKET) == before  # no version file, and the probe removed


def test_moto_honours_conditional_writes_and_a_version_is_made(s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    plan = _plan()
    frozen, report = _candidate(s3_client, plan)
    require_conditional_writes(s3_client, plan["candidate_prefix"] + "probe")
    version = make_version(s3_client, plan, frozen, report)
    assert set(version["files"]) == set(FILES)
    head = s3_client.head_object(Bucket=BUCKET, Key=version["files"]["frozen_model.pb"]["uri"].split(f"{BUCKET}/", 1)[1])
    assert "ObjectLockMode" not in head  # object_lock_days 0: nothing locked


def test_version_files_are_locked_in_governance_mode_where_the_bucket_has_object_lock(s3_client):
    s3_client.create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
    plan = _plan(object_lock_days=30)
    frozen, report = _candidate(s3_client, plan)
    version = make_version(s3_client, plan, frozen, report)
    key = version["files"]["frozen_model.pb"]["uri"].split(f"{BUCKET}/", 1)[1]
    head = s3_client.head_object(Bucket=BUCKET, Key=key)
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert 29 <= (head["ObjectLockRetainUntilDate"] - datetime.now(timezone.utc)).days <= 30
    with pytest.raises(s3_client.exceptions.ClientError, match="AccessDenied"):
        s3_client.delete_object(Bucket=BUCKET, Key=key, VersionId=head["VersionId"])
    s3_client.delete_object(Bucket=BUCKET, Key=key, VersionId=head["VersionId"], BypassGovernanceRetention=True)
    # The candidate (and so the pointer, channels, history) stays writable: only versions are locked.
    candidate = frozen["frozen_model_uri"].split(f"{BUCKET}/", 1)[1]
    assert "ObjectLockMode" not in s3_client.head_object(Bucket=BUCKET, Key=candidate)


def test_object_lock_days_on_a_bucket_without_object_lock_is_refused_before_any_copy(s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    plan = _plan(object_lock_days=30)
    frozen, report = _candidate(s3_client, plan)
    before = keys(s3_client, BUCKET)
    with pytest.raises(PublishError, match="object_lock_days=30, but the bucket headpose-store .* has no Object Lock"):
        make_version(s3_client, plan, frozen, report)
    assert keys(s3_client, BUCKET) == before
