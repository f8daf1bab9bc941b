"""The images every model of a run is judged on: the pinned evaluation set, verified shard by shard."""
from __future__ import annotations

import pytest

from headpose.datasets import settings as dataset_settings, staging
from headpose.datasets.evaluation_set import fetch_evaluation_set
from headpose.datasets.store import DatasetError, read_manifest

BUCKET = "evaluation"
SETTINGS = dataset_settings.synthetic_settings(
    {"synthetic_train_per_pose": 1, "synthetic_eval_per_pose": 1, "seed": 5, "images_per_shard": 64},
    dataset_settings.GENERATOR_VERSION,
)
PINNED = f"s3://{BUCKET}/headpose/evaluation/pinned/"
RUN = f"s3://{BUCKET}/headpose/datasets/run/"


@pytest.fixture(scope="module")
def staged(moto_server, tmp_path_factory):
    """Two staged datasets, once for the module (its last test tampers with one)."""
    import boto3

    moto_server.reset()
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    scratch = tmp_path_factory.mktemp("stage")
    pinned = staging.stage_synthetic_dataset(s3, PINNED, SETTINGS, print, scratch_root=scratch)
    run = staging.stage_synthetic_dataset(s3, RUN, {**SETTINGS, "seed": 6}, print, scratch_root=scratch)
    return {"s3": s3, "pinned": pinned, "run": run}


def test_a_pinned_set_is_used_whatever_the_run_trained_on(staged, tmp_path):
    evaluation_set, shards = fetch_evaluation_set(staged["s3"], PINNED, staged["run"], tmp_path / "eval")
    _, sha256 = read_manifest(staged["s3"], PINNED)
    assert evaluation_set.pinned and evaluation_set.prefix == PINNED and evaluation_set.manifest_sha256 == sha256
    assert evaluation_set.id == f"pinned@{sha256[:12]}" and evaluation_set.channel_order == "bgr"
    assert [p.name for p in shards] == [s["file"] for s in read_manifest(staged["s3"], PINNED)[0]["splits"]["eval"]["shards"]]


def test_without_a_pinned_set_the_runs_own_eval_split_as_validated(staged, tmp_path):
    evaluation_set, _ = fetch_evaluation_set(staged["s3"], None, staged["run"], tmp_path / "eval")
    assert not evaluation_set.pinned and evaluation_set.manifest_sha256 == staged["run"]["manifest_sha256"]
    changed = {**staged["run"], "manifest_sha256": "0" * 64}  # the manifest changed since stage_dataset
    with pytest.raises(DatasetError, match="changed since stage_dataset validated it"):
        fetch_evaluation_set(staged["s3"], None, changed, tmp_path / "again")


def test_a_tampered_shard_of_the_pinned_set_is_refused(staged, tmp_path):
    name = read_manifest(staged["s3"], PINNED)[0]["splits"]["eval"]["shards"][0]["file"]
    staged["s3"].put_object(Bucket=BUCKET, Key=f"headpose/evaluation/pinned/{name}", Body=b"\x00" * 32)
    with pytest.raises(DatasetError, match=f"{name} does not have the sha256 its manifest records"):
        fetch_evaluation_set(staged["s3"], PINNED, staged["run"], tmp_path / "eval")
    with pytest.raises(DatasetError, match="has no manifest.json"):
        fetch_evaluation_set(staged["s3"], f"s3://{BUCKET}/nothing/", staged["run"], tmp_path / "none")
