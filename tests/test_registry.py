"""Champion/challenger decisions, the conditional pointer, history and rollback, on moto's S3."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from headpose.registry import pointer as pointers, promotion, rollback as rollbacks
from headpose.planning.layout import RunLayout, dataset_prefix_for, training_job_name
from support import ROOT

BUCKET = "models"
DATASET = dataset_prefix_for(BUCKET, "headpose", "synthetic-abc")
POINTER = f"s3://{BUCKET}/headpose/published/latest.json"


def layout_for(day: int) -> RunLayout:
    job = training_job_name(datetime(2025, 3, day, 3, 0, tzinfo=timezone.utc))
    return RunLayout.for_run(BUCKET, "headpose", job, DATASET)


def put(s3, uri: str, body: bytes) -> None:
    bucket, key = uri[len("s3://"):].split("/", 1)
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def get(s3, uri: str) -> bytes:
    bucket, key = uri[len("s3://"):].split("/", 1)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def published_state(s3) -> dict[str, tuple[str, bytes]]:
    """Every key under published/ with its ETag and bytes."""
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix="headpose/published/").get("Contents", [])
    return {o["Key"]: (o["ETag"], get(s3, f"s3://{BUCKET}/{o['Key']}")) for o in listing}


def upload_run(s3, layout: RunLayout, graph: bytes) -> str:
    """What upload_frozen_model leaves beside the artifact; returns the graph's sha256."""
    put(s3, layout.frozen_model_uri, graph)
    put(s3, layout.frozen_model_json_uri, b'{"graph": "%s"}' % graph)
    put(s3, layout.report_uri, b'{"accuracy": 0.5}')
    put(s3, layout.confusion_png_uri, b"\x89PNG" + graph)
    return hashlib.sha256(graph).hexdigest()


def publish_run(s3, layout: RunLayout, graph: bytes, accuracy: float = 0.5) -> dict:
    sha = upload_run(s3, layout, graph)
    current, etag = pointers.read_pointer(s3, POINTER)
    record = promotion.publish_record(
        layout, sha, {"accuracy": accuracy},
        dataset=promotion.dataset_fingerprint(s3, layout.dataset_prefix), previous=current,
    )
    promotion.publish_model(s3, layout, record, expected_etag=etag)
    return record


@pytest.fixture()
def s3(s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    put(s3_client, DATASET + "manifest.json", b'{"source": "synthetic", "splits": {}}')
    return s3_client


# -- the decision --------------------------------------------------------------------

@pytest.mark.parametrize("accuracy, champion, margin, force, promote, words", [
    (0.5, None, 0.0, False, True, "no model is published"),
    (0.5, {"present": False}, 0.0, False, True, "no model is published"),
    (0.80, {"present": True, "accuracy": 0.80, "training_job_name": "old"}, 0.0, False, True, ">= published"),
    (0.79, {"present": True, "accuracy": 0.80, "training_job_name": "old"}, 0.0, False, False, "old stays published"),
    (0.79, {"present": True, "accuracy": 0.80, "training_job_name": "old"}, 0.02, False, True, "margin 0.02"),
    (0.10, {"present": True, "accuracy": 0.80, "training_job_name": "old"}, 0.0, True, True, "force_publish"),
    (0.10, {"present": True, "error": "sha256 differs", "training_job_name": "old"}, 0.0, False, True,
     "could not be evaluated"),
])
def test_promotion_decision(accuracy, champion, margin, force, promote, words):
    decision = promotion.promotion_decision(accuracy, champion, margin, force)
    assert decision.promote is promote
    assert words in decision.reason


# -- publishing ----------------------------------------------------------------------

def test_the_pointer_records_job_metrics_sha_dataset_time_and_previous(s3):
    first, second = layout_for(1), layout_for(8)
    publish_run(s3, first, b"graph-1", accuracy=0.6)
    publish_run(s3, second, b"graph-2", accuracy=0.7)

    pointer = json.loads(get(s3, POINTER))
    assert pointer["training_job_name"] == second.training_job_name
    assert pointer["metrics"] == {"accuracy": 0.7}
    assert pointer["frozen_model_sha256"] == hashlib.sha256(b"graph-2").hexdigest()
    assert pointer["dataset"]["manifest_uri"] == DATASET + "manifest.json"
    assert pointer["dataset"]["manifest_sha256"] == hashlib.sha256(
        b'{"source": "synthetic", "splits": {}}').hexdigest()
    assert datetime.fromisoformat(pointer["published_at"]).tzinfo is not None
    assert pointer["previous"]["training_job_name"] == first.training_job_name
    assert pointer["previous"]["accuracy"] == 0.6
    assert "previous" not in pointer["previous"]  # one level: the chain lives in history/
    # latest/ holds this run's files, the PNG included; the previous model stays addressable.
    assert get(s3, second.published_model_uri) == b"graph-2"
    assert get(s3, second.published_confusion_png_uri) == b"\x89PNGgraph-2"
    assert get(s3, first.frozen_model_uri) == b"graph-1"
    assert json.loads(get(s3, first.history_record_uri))["training_job_name"] == first.training_job_name


def test_a_pointer_changed_since_the_comparison_is_not_overwritten(s3):
    first, second, third = layout_for(1), layout_for(8), layout_for(15)
    publish_run(s3, first, b"graph-1")
    _, compared_etag = pointers.read_pointer(s3, POINTER)
    publish_run(s3, second, b"graph-2")  # someone else published in between
    before = json.loads(get(s3, POINTER))

    sha = upload_run(s3, third, b"graph-3")
    record = promotion.publish_record(third, sha, {"accuracy": 0.9})
    with pytest.raises(pointers.PointerChangedError):
        promotion.publish_model(s3, third, record, expected_etag=compared_etag)
    assert json.loads(get(s3, POINTER)) == before
    # latest/ was put back to the files the pointer names.
    assert get(s3, third.published_model_uri) == b"graph-2"
    assert get(s3, third.published_confusion_png_uri) == b"\x89PNGgraph-2"


def test_a_first_publish_refuses_to_overwrite_a_pointer_that_appeared(s3):
    publish_run(s3, layout_for(1), b"graph-1")
    layout = layout_for(8)
    record = promotion.publish_record(layout, upload_run(s3, layout, b"graph-2"), {"accuracy": 1.0})
    with pytest.raises(pointers.PointerChangedError):
        promotion.publish_model(s3, layout, record, expected_etag=None)  # it saw no pointer
    assert json.loads(get(s3, POINTER))["training_job_name"] == layout_for(1).training_job_name


def test_a_corrupt_pointer_is_an_error_that_says_how_to_repair_it(s3):
    put(s3, POINTER, b"{not json")
    with pytest.raises(pointers.PublishError, match="rollback --to"):
        pointers.read_pointer(s3, POINTER)


def test_nothing_published_reads_as_none(s3):
    assert pointers.read_pointer(s3, POINTER) == (None, None)


def test_the_run_summary_names_everything_ops_ask_for():
    summary = promotion.run_summary(
        training_job_name="job-b", decision=promotion.Decision(False, "accuracy 0.7 < published 0.8"),
        accuracy=0.7, champion={"present": True, "accuracy": 0.8, "training_job_name": "job-a"},
        training={"BillableTimeInSeconds": 120, "TrainingTimeInSeconds": 130},
        model_uri="s3://b/headpose/TFartifacts/job-b/output/frozen_model.pb", published=None,
    )
    assert summary["accuracy_before"] == 0.8 and summary["accuracy_after"] == 0.7
    assert summary["promoted"] is False and summary["billable_time_in_seconds"] == 120
    text = promotion.format_summary(summary)
    for words in ("job-b", "before 0.8000 (job-a)", "after 0.7000", "billable seconds: 120",
                  "TFartifacts/job-b/output/frozen_model.pb", "latest.json unchanged"):
        assert words in text


# -- rollback ------------------------------------------------------------------------

def test_rollback_restores_the_previous_model(s3):
    first, second = layout_for(1), layout_for(8)
    publish_run(s3, first, b"graph-1")
    publish_run(s3, second, b"graph-2")

    pointer = rollbacks.rollback(s3, BUCKET, log=lambda line: None)
    assert pointer["training_job_name"] == first.training_job_name
    stored = json.loads(get(s3, POINTER))
    assert stored["training_job_name"] == first.training_job_name
    assert stored["rolled_back"]["from"] == second.training_job_name
    assert stored["previous"]["training_job_name"] == second.training_job_name
    assert get(s3, first.published_model_uri) == b"graph-1"
    assert get(s3, first.published_model_json_uri) == b'{"graph": "graph-1"}'
    # Rolling back again goes forward to the model it replaced.
    rollbacks.rollback(s3, BUCKET, log=lambda line: None)
    assert json.loads(get(s3, POINTER))["training_job_name"] == second.training_job_name


def test_rollback_refuses_an_unknown_job_or_a_changed_file_and_changes_nothing(s3):
    first, second = layout_for(1), layout_for(8)
    publish_run(s3, first, b"graph-1")
    publish_run(s3, second, b"graph-2")
    before = published_state(s3)

    with pytest.raises(pointers.PublishError, match="never published") as refused:
        rollbacks.rollback(s3, BUCKET, to_job=layout_for(20).training_job_name)
    assert first.training_job_name in str(refused.value)  # lists what can be restored
    put(s3, first.frozen_model_uri, b"tampered")
    with pytest.raises(pointers.PublishError, match="refusing to roll back"):
        rollbacks.rollback(s3, BUCKET, to_job=first.training_job_name)
    with pytest.raises(pointers.PublishError, match="not a training job name"):
        rollbacks.rollback(s3, BUCKET, to_job="../../etc")
    assert published_state(s3) == before


def test_rollback_without_a_previous_model_says_so(s3):
    publish_run(s3, layout_for(1), b"graph-1")
    with pytest.raises(pointers.PublishError, match="no previous model"):
        rollbacks.rollback(s3, BUCKET)


def test_the_rollback_command(s3, s3_endpoint):
    first, second = layout_for(1), layout_for(8)
    publish_run(s3, first, b"graph-1")
    publish_run(s3, second, b"graph-2")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "headpose.registry", "--endpoint-url", s3_endpoint, "--bucket", BUCKET, *args],
            env=env, capture_output=True, text=True, timeout=120,
        )

    listed = cli("history")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.index(first.training_job_name) < listed.stdout.index(second.training_job_name)
    done = cli("rollback", "--to", first.training_job_name)
    assert done.returncode == 0, done.stderr
    assert json.loads(cli("show").stdout)["training_job_name"] == first.training_job_name
    refused = cli("rollback", "--to", "deeplens-TF-headpose-1999-01-01-00-00-00-000")
    assert refused.returncode == 1 and "never published" in refused.stderr


# -- promote_if_better: what the publish task does -------------------------------------

def champion_of(s3) -> dict:
    record, etag = pointers.read_pointer(s3, POINTER)
    return {"present": True, "training_job_name": record["training_job_name"], "accuracy": 0.6,
            "pointer_etag": etag}


def promote(s3, layout, graph: bytes, accuracy: float, champion: dict, **options):
    return promotion.promote_if_better(
        s3, layout, frozen_model_sha256=upload_run(s3, layout, graph), metrics={"accuracy": accuracy},
        champion=champion, **options,
    )


def test_a_better_model_is_promoted_with_its_reason_recorded(s3):
    publish_run(s3, layout_for(1), b"graph-1", accuracy=0.6)
    decision, published = promote(s3, layout_for(8), b"graph-2", 0.7, champion_of(s3), extra={"run_id": "r"})
    assert decision.promote and published["published_pointer_uri"] == POINTER
    pointer = json.loads(get(s3, POINTER))
    assert pointer["training_job_name"] == layout_for(8).training_job_name and pointer["run_id"] == "r"
    assert ">= published 0.6000" in pointer["promotion"]["reason"]
    assert pointer["dataset"]["manifest_uri"] == DATASET + "manifest.json"


def test_a_worse_model_changes_nothing(s3):
    publish_run(s3, layout_for(1), b"graph-1", accuracy=0.6)
    before = published_state(s3)
    decision, published = promote(s3, layout_for(8), b"graph-2", 0.5, champion_of(s3))
    assert not decision.promote and published is None and "stays published" in decision.reason
    assert published_state(s3) == before


def test_a_pointer_that_moved_after_the_comparison_is_not_replaced(s3):
    publish_run(s3, layout_for(1), b"graph-1")
    compared = champion_of(s3)
    publish_run(s3, layout_for(8), b"graph-2")
    before = published_state(s3)
    decision, _ = promote(s3, layout_for(15), b"graph-3", 0.9, compared)
    assert not decision.promote and "changed after the comparison" in decision.reason
    assert published_state(s3) == before
    forced, _ = promote(s3, layout_for(15), b"graph-3", 0.1, compared, force=True)
    assert forced.promote and json.loads(get(s3, POINTER))["training_job_name"] == layout_for(15).training_job_name


def test_promoting_again_after_a_crash_past_the_pointer_is_a_no_op(s3):
    publish_run(s3, layout_for(1), b"graph-1", accuracy=0.6)
    champion = champion_of(s3)
    assert promote(s3, layout_for(8), b"graph-2", 0.7, champion)[0].promote
    before = published_state(s3)
    again, published = promote(s3, layout_for(8), b"graph-2", 0.7, champion)  # the retried task
    assert again.promote and "already published" in again.reason and published
    assert published_state(s3) == before
