"""The registry on moto's S3: decisions, version 3 records, the conditional pointer, the mirror,
and rollback (what a crash at any call leaves behind is test_crash_points')."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime

import pytest

from headpose.registry import pointer as pointers, promotion, rollback as rollbacks, summary as summaries
from registry_support import (
    BUCKET,
    DATASET,
    DATASET_SECTION,
    MANIFEST,
    MIRROR,
    POINTER,
    ConflictOnce,
    assert_consistent,
    assert_mirror_equals_pointer,
    champion_of,
    get,
    layout_for,
    published_state,
    put,
    record_json,
    report_with,
    version_of,
)
from support import ROOT


def publish_run(s3, layout, graph: bytes, accuracy: float = 0.5, **options) -> tuple:
    """promote_if_better as the publish task calls it, forced (the decision is tested apart)."""
    return promotion.promote_if_better(
        s3, layout, version=version_of(s3, layout, graph), report=report_with(accuracy, champion_of(s3, 0.5)),
        force=True, dataset=DATASET_SECTION, **options,
    )


@pytest.fixture()
def s3(s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    put(s3_client, DATASET + "manifest.json", MANIFEST)
    return s3_client


# -- the decision --------------------------------------------------------------------

OLD = {"present": True, "accuracy": 0.80, "training_job_name": "old", "comparable": True}


@pytest.mark.parametrize("accuracy, champion, margin, force, promote, words", [
    (0.5, None, 0.0, False, True, "no model is published"),
    (0.5, {"present": False}, 0.0, False, True, "no model is published"),
    (0.80, OLD, 0.0, False, True, ">= published"),
    (0.79, OLD, 0.0, False, False, "old stays published"),
    (0.79, OLD, 0.02, False, True, "margin 0.02"),
    (0.10, OLD, 0.0, True, True, "force_publish"),
    (0.10, {**OLD, "accuracy": None, "error": "sha256 differs"}, 0.0, False, True, "could not be evaluated"),
    (0.99, {**OLD, "comparable": False, "comparison": "validated on prima-1, this run on synthetic-2"}, 0.0, False,
     False, "not compared: validated on prima-1"),
    (0.10, {**OLD, "comparable": False, "comparison": "other data"}, 0.0, True, True, "force_publish"),
])
def test_promotion_decision(accuracy, champion, margin, force, promote, words):
    decision = promotion.promotion_decision(accuracy, champion, margin, force)
    assert decision.promote is promote
    assert words in decision.reason


# -- publishing ----------------------------------------------------------------------

def test_the_record_names_every_file_of_the_version_by_uri_and_sha256(s3):
    first, second = layout_for(1), layout_for(8)
    publish_run(s3, first, b"graph-1", accuracy=0.6)
    publish_run(s3, second, b"graph-2", accuracy=0.7, attempts=[second.training_job_name])

    pointer = record_json(s3, POINTER)
    assert pointer["version"] == 3 and pointer["training_job_name"] == second.training_job_name
    assert pointer["files"]["frozen_model.pb"] == {
        "uri": second.version_prefix + "frozen_model.pb", "sha256": hashlib.sha256(b"graph-2").hexdigest()}
    assert set(pointer["files"]) == {"frozen_model.pb", "frozen_model.json", "report.json", "confusion_matrix.png"}
    assert pointer["formats"]["onnx"]["runtime"] == "onnxruntime"
    assert pointer["metrics"]["accuracy"] == 0.7 and pointer["channel_order"] == "bgr"
    assert pointer["dataset"]["manifest_sha256"] == hashlib.sha256(MANIFEST).hexdigest()
    assert pointer["evaluation_set"]["id"] == "synthetic-abc@000"
    assert pointer["attempts"] == [second.training_job_name]
    assert datetime.fromisoformat(pointer["published_at"]).tzinfo is not None
    assert pointer["previous"]["training_job_name"] == first.training_job_name
    assert pointer["previous"]["accuracy"] == 0.6 and "previous" not in pointer["previous"]
    assert record_json(s3, first.history_record_uri)["training_job_name"] == first.training_job_name
    # The mirror holds exactly the pointer's files, edge formats under edge/.
    assert_mirror_equals_pointer(s3)
    assert get(s3, MIRROR + "frozen_model.pb") == b"graph-2" and get(s3, MIRROR + "edge/model.onnx") == b"onnx:graph-2"


def test_without_the_mirror_nothing_is_written_under_latest(s3):
    publish_run(s3, layout_for(1), b"graph-1", mirror=False)
    assert not [k for k in published_state(s3) if "/published/latest/" in k]
    assert_consistent(s3)


def test_a_pointer_changed_since_the_comparison_is_not_overwritten(s3):
    first, second, third = layout_for(1), layout_for(8), layout_for(15)
    publish_run(s3, first, b"graph-1")
    _, compared_etag = pointers.read_pointer(s3, POINTER)
    publish_run(s3, second, b"graph-2")  # someone else published in between
    before = {k: v for k, v in published_state(s3).items() if "/history/" not in k}

    record = promotion.publish_record(third, version_of(s3, third, b"graph-3"), report_with(0.9))
    with pytest.raises(pointers.PointerChangedError):
        promotion.publish_model(s3, third, record, expected_etag=compared_etag)
    # Neither the pointer nor the mirror moved: the mirror is only written after the pointer.
    assert {k: v for k, v in published_state(s3).items() if "/history/" not in k} == before


def test_a_409_on_the_pointer_is_retried_and_a_412_is_a_lost_race(s3):
    first, second = layout_for(1), layout_for(8)
    publish_run(s3, first, b"graph-1")
    conflict = ConflictOnce(s3, times=2)
    publish_run(s3, second, b"graph-2")
    assert conflict.answered == 2  # answered 409 twice, then the real conditional write went through
    assert record_json(s3, POINTER)["training_job_name"] == second.training_job_name
    assert_consistent(s3)
    record = promotion.publish_record(layout_for(15), version_of(s3, layout_for(15), b"graph-3"), report_with(0.9))
    with pytest.raises(pointers.PointerChangedError):
        promotion.publish_model(s3, layout_for(15), record, expected_etag=None)  # 412: it saw no pointer


def test_a_corrupt_pointer_is_an_error_that_says_how_to_repair_it(s3):
    put(s3, POINTER, b"{not json")
    with pytest.raises(pointers.PublishError, match="rollback --to"):
        pointers.read_pointer(s3, POINTER)


def test_nothing_published_reads_as_none(s3):
    assert pointers.read_pointer(s3, POINTER) == (None, None)


def test_the_run_summary_names_everything_ops_ask_for():
    champion = {"present": True, "accuracy": 0.8, "training_job_name": "job-a"}
    summary = summaries.run_summary(
        training_job_name="job-b", decision=promotion.Decision(False, "accuracy 0.7 < published 0.8"),
        report={**report_with(0.7, champion), "formats": {"onnx": {"accepted": True}, "litert_int8": {}}},
        training={"BillableTimeInSeconds": 120, "TrainingTimeInSeconds": 130},
        model_uri="s3://b/headpose/TFartifacts/job-b/output/frozen_model.pb", published=None,
    )
    assert summary["accuracy_before"] == 0.8 and summary["accuracy_after"] == 0.7
    assert summary["promoted"] is False and summary["billable_time_in_seconds"] == 120
    text = summaries.format_summary(summary)
    for words in ("job-b", "on synthetic-abc@000: before 0.8000 (job-a)", "after 0.7000", "billable seconds: 120",
                  "edge formats: onnx", "TFartifacts/job-b/output/frozen_model.pb", "latest.json unchanged"):
        assert words in text


# -- promote_if_better: what the publish task does -------------------------------------

def test_a_better_model_is_promoted_with_its_reason_recorded(s3):
    publish_run(s3, layout_for(1), b"graph-1", accuracy=0.6)
    layout = layout_for(8)
    decision, published = promotion.promote_if_better(
        s3, layout, version=version_of(s3, layout, b"graph-2"), report=report_with(0.7, champion_of(s3, 0.6)),
        extra={"run_id": "r"}, dataset=DATASET_SECTION)
    assert decision.promote and published["published_pointer_uri"] == POINTER
    pointer = record_json(s3, POINTER)
    assert pointer["training_job_name"] == layout.training_job_name and pointer["run_id"] == "r"
    assert ">= published 0.6000" in pointer["promotion"]["reason"]


def test_a_worse_model_changes_nothing(s3):
    publish_run(s3, layout_for(1), b"graph-1", accuracy=0.6)
    before = published_state(s3)
    layout = layout_for(8)
    decision, published = promotion.promote_if_better(
        s3, layout, version=version_of(s3, layout, b"graph-2"), report=report_with(0.5, champion_of(s3, 0.6)))
    assert not decision.promote and published is None and "stays published" in decision.reason
    assert published_state(s3) == before


def test_a_pointer_that_moved_after_the_comparison_is_not_replaced(s3):
    publish_run(s3, layout_for(1), b"graph-1")
    compared = champion_of(s3, 0.5)
    publish_run(s3, layout_for(8), b"graph-2")
    before = published_state(s3)
    layout = layout_for(15)
    version = version_of(s3, layout, b"graph-3")
    decision, _ = promotion.promote_if_better(s3, layout, version=version, report=report_with(0.9, compared))
    assert not decision.promote and "changed after the comparison" in decision.reason
    assert published_state(s3) == before
    forced, _ = promotion.promote_if_better(s3, layout, version=version, report=report_with(0.1, compared), force=True)
    assert forced.promote and record_json(s3, POINTER)["training_job_name"] == layout.training_job_name


# -- existing buckets: version 2 records ------------------------------------------------

def version_2_record(s3, layout, graph: bytes) -> dict:
    """A record as the previous release wrote it: flat URIs, the frozen graph's sha256 only."""
    put(s3, layout.frozen_model_uri, graph)
    put(s3, layout.frozen_model_json_uri, b"{}")
    record = {"version": 2, "training_job_name": layout.training_job_name, "published_at": "2025-01-01T00:00:00+00:00",
              "frozen_model_uri": layout.frozen_model_uri, "frozen_model_sha256": hashlib.sha256(graph).hexdigest(),
              "frozen_model_json_uri": layout.frozen_model_json_uri, "metrics": {"accuracy": 0.6},
              "history_record_uri": layout.history_record_uri, "previous": None}
    put(s3, layout.history_record_uri, json.dumps(record).encode())
    put(s3, POINTER, json.dumps(record).encode())
    return record


def test_a_bucket_with_a_version_2_pointer_publishes_a_version_3_one_and_can_roll_back_to_it(s3):
    old, new = layout_for(1), layout_for(8)
    version_2_record(s3, old, b"graph-v2")
    publish_run(s3, new, b"graph-3")
    pointer = record_json(s3, POINTER)
    assert pointer["version"] == 3 and pointer["previous"]["training_job_name"] == old.training_job_name
    assert pointer["previous"]["frozen_model_sha256"] == hashlib.sha256(b"graph-v2").hexdigest()
    rolled = rollbacks.rollback(s3, BUCKET, log=lambda line: None)
    assert rolled["version"] == 2 and rolled["training_job_name"] == old.training_job_name
    assert_consistent(s3)
    assert_mirror_equals_pointer(s3)  # frozen_model.pb and frozen_model.json of the old model


# -- rollback ------------------------------------------------------------------------

def test_rollback_moves_the_pointer_back_and_the_mirror_after_it(s3):
    first, second = layout_for(1), layout_for(8)
    publish_run(s3, first, b"graph-1")
    publish_run(s3, second, b"graph-2")
    pointer = rollbacks.rollback(s3, BUCKET, log=lambda line: None)
    assert pointer["training_job_name"] == first.training_job_name
    stored = record_json(s3, POINTER)
    assert stored["rolled_back"]["from"] == second.training_job_name
    assert stored["previous"]["training_job_name"] == second.training_job_name
    assert stored["formats"]["onnx"]["sha256"] == hashlib.sha256(b"onnx:graph-1").hexdigest()  # formats move too
    assert_mirror_equals_pointer(s3)
    rollbacks.rollback(s3, BUCKET, log=lambda line: None)  # again: forward to the model it replaced
    assert record_json(s3, POINTER)["training_job_name"] == second.training_job_name


def test_rollback_refuses_an_unknown_job_or_a_changed_file_and_changes_nothing(s3):
    first, second = layout_for(1), layout_for(8)
    publish_run(s3, first, b"graph-1")
    publish_run(s3, second, b"graph-2")
    before = published_state(s3)
    with pytest.raises(pointers.PublishError, match="never published") as refused:
        rollbacks.rollback(s3, BUCKET, to_job=layout_for(20).training_job_name)
    assert first.training_job_name in str(refused.value)  # lists what can be restored
    put(s3, first.version_prefix + "edge/model.onnx", b"tampered")  # any file of the version, not only the graph
    with pytest.raises(pointers.PublishError, match="refusing to roll back"):
        rollbacks.rollback(s3, BUCKET, to_job=first.training_job_name)
    with pytest.raises(pointers.PublishError, match="not a training job name"):
        rollbacks.rollback(s3, BUCKET, to_job="../../etc")
    assert published_state(s3) == before


def test_rollback_without_a_previous_model_says_so(s3):
    publish_run(s3, layout_for(1), b"graph-1")
    with pytest.raises(pointers.PublishError, match="no previous model"):
        rollbacks.rollback(s3, BUCKET)


def test_the_registry_command(s3, s3_endpoint):
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
    # ... and SageMaker's Model Registry after the pointer (moto serves it at the same endpoint).
    from release_support import packages, sagemaker

    statuses = {prefix: p["ModelApprovalStatus"] for prefix, p in packages(sagemaker(s3_endpoint)).items()}
    assert statuses == {first.version_prefix: "Approved", second.version_prefix: "Rejected"}
    refused = cli("rollback", "--to", "deeplens-TF-headpose-1999-01-01-00-00-00-000")
    assert refused.returncode == 1 and "never published" in refused.stderr
