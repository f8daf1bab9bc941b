"""Owned buckets: with an expected owner, every S3 call of the pipeline carries it, and a bucket
another account owns is refused before anything is written to it.

moto does not check ``ExpectedBucketOwner``; a relay in front of it answers as S3 does.
"""
from __future__ import annotations

import boto3
import pytest

from fault_support import OwnerCheckingRelay, keys
from headpose.datasets import settings as dataset_settings, staging
from headpose.datasets.store import DatasetError
from headpose.planning.handoff import download_verified, upload_file
from headpose.planning.s3_calls import pin_bucket_owner

BUCKET = "owned-bucket"
OWNER = "123456789012"  # moto's account: it owns every bucket it creates
SETTINGS = dataset_settings.synthetic_settings(
    {"synthetic_train_per_pose": 1, "synthetic_eval_per_pose": 1, "seed": 0, "images_per_shard": 64},
    dataset_settings.GENERATOR_VERSION,
)


@pytest.fixture()
def relay(moto_server, s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    relay = OwnerCheckingRelay(moto_server.port, OWNER)
    yield relay
    relay.close()


def _client(endpoint: str, owner: str | None):
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    return pin_bucket_owner(client, owner)


def test_every_call_carries_the_owner_and_works_on_the_owners_bucket(relay, tmp_path):
    s3 = _client(relay.endpoint, OWNER)
    summary = staging.stage_dataset(
        s3, {"bucket": BUCKET, "dataset_prefix": f"s3://{BUCKET}/headpose/datasets/x/", "dataset_settings": SETTINGS,
             "run_params": {"dataset_source": "synthetic", "channel_order": "bgr"}}, print, scratch_root=tmp_path)
    assert summary["train_count"] == 93
    source = tmp_path / "file.bin"
    source.write_bytes(b"x" * (9 * 1024 * 1024))  # large enough for the transfer manager's multipart upload
    sha256 = upload_file(s3, source, f"s3://{BUCKET}/big.bin")
    s3.copy({"Bucket": BUCKET, "Key": "big.bin"}, BUCKET, "copy.bin")
    download_verified(s3, f"s3://{BUCKET}/copy.bin", tmp_path / "back.bin", sha256)
    assert relay.unpinned == [] and relay.refused == []  # multipart parts, copies, lists and heads included


def test_a_bucket_of_another_account_is_refused_and_nothing_is_written(relay, tmp_path, s3_client):
    s3 = _client(relay.endpoint, "999999999999")
    plan = {"bucket": BUCKET, "dataset_prefix": f"s3://{BUCKET}/headpose/datasets/x/", "dataset_settings": SETTINGS,
            "run_params": {"dataset_source": "synthetic", "channel_order": "bgr"}}
    with pytest.raises(DatasetError, match="owned by another account than the expected bucket owner"):
        staging.stage_dataset(s3, plan, print, scratch_root=tmp_path)
    assert relay.refused and keys(s3_client, BUCKET) == []


def test_without_an_expected_owner_nothing_is_added(relay):
    s3 = _client(relay.endpoint, None)
    s3.put_object(Bucket=BUCKET, Key="plain", Body=b"x")
    assert relay.unpinned == [f"PUT /{BUCKET}/plain"]


def test_airflow_init_checks_and_creates_the_bucket_with_the_owner_pinned(relay, tmp_path):
    """airflow-init's bucket step (its own Python, run as the script runs it) through the owner-checking relay."""
    import json
    import os
    import re
    import subprocess
    import sys

    from support import ROOT

    script = (ROOT / "scripts" / "airflow-init.sh").read_text()
    step = re.search(r'echo "airflow-init: bucket .*?\npython - <<\'PY\'\n(.*?)\nPY\n', script, re.S).group(1)
    connection = {"conn_type": "aws", "extra": {"endpoint_url": relay.endpoint, "region_name": "us-east-1"}}
    env = {**os.environ, "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection), "AIRFLOW_HOME": str(tmp_path),
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "HEADPOSE_S3_BUCKET": "new-bucket",
           "HEADPOSE_RUN_DEFAULTS": json.dumps({"expected_bucket_owner": OWNER}), "PYTHONPATH": str(ROOT / "include")}
    done = subprocess.run([sys.executable, "-c", step], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "created s3://new-bucket" in done.stdout
    # HEAD (404), then the creation (CreateBucket has no ExpectedBucketOwner), then HEAD again: pinned.
    assert relay.unpinned == ["PUT /new-bucket"] and relay.refused == []
