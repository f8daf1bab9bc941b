"""Release governance at unit level, on moto's S3 and SageMaker: who is asked, what they see, what an
answer leaves, and SageMaker's Model Registry following the pointer (the native stack plays the
Human-in-the-loop requests themselves: tests/test_approval.py)."""
from __future__ import annotations

import hashlib
import itertools
import json

import pytest

from headpose.artifacts.comparison import paired_comparison
from headpose.planning.layout import split_s3_uri
from headpose.registry import pointer as pointers
from headpose.registry.approval import APPROVE_OPTION, REJECT_OPTION, answer, not_asked
from headpose.registry.model_packages import metadata_value, package_metadata
from headpose.registry.promotion import publish_run
from headpose.registry.release import prepare_request, record_release
from headpose.registry.rollback import rollback
from release_support import (
    CHAMPION_RECALL, IMAGE, answered, governed_candidate, model_registry, packages, sagemaker, status_of,
)
from support import ROOT
from test_crash_points import champion_of, published, upload

ARTIFACTS = ROOT / "test-artifacts"

REQUIRED = {"release_approval": "required", "approvers": ["alice"], "approval_timeout": "3d"}
_buckets = itertools.count()


@pytest.fixture()
def store(s3_client, s3_endpoint):
    bucket = f"release-{next(_buckets)}"
    s3_client.create_bucket(Bucket=bucket)
    return s3_client, bucket, sagemaker(s3_endpoint), s3_endpoint


def champion_and_candidate(s3, bucket, profile, accuracy=0.9):
    """A published champion (accuracy 0.5 on the same images) and the next run's uploaded candidate."""
    published(s3, governed_candidate(s3, bucket, 0, profile), accuracy=0.5)
    run = governed_candidate(s3, bucket, 7, profile, accuracy=accuracy)
    run.report["champion"] = {**champion_of(s3, run), "images": 93, "per_class_recall": CHAMPION_RECALL}
    return run, upload(s3, run)


def publish(s3, run, version, approval, registry):
    return publish_run(s3, run.plan, run.training, run.dataset, run.report, version, dag_id="d", run_id="r",
                       approval=approval, model_registry=registry)


def request(s3, run, version, registry):
    return prepare_request(s3, run.plan, run.training, run.dataset, run.report, version, run.report["links"], registry)


def test_release_approval_none_asks_nobody_and_publishes_as_before(store):
    s3, bucket, sm, endpoint = store
    run, version = champion_and_candidate(s3, bucket, {"release_approval": "none"})
    asked = request(s3, run, version, model_registry(endpoint))
    assert asked == {"ask": False, "approval": not_asked(False, "release_approval is 'none'")}
    decision, summary = publish(s3, run, version, asked["approval"], model_registry(endpoint))
    assert decision.promote and summary["promoted"]
    pointer, _ = pointers.read_pointer(s3, run.plan["published_pointer_uri"])
    assert pointer["approval"] == {"required": False, "decision": "not_required", "by": None, "at": None,
                                   "comment": None}
    assert status_of(sm, run) == "Approved"


def test_a_model_that_does_not_beat_the_champion_is_put_to_nobody(store):
    s3, bucket, sm, endpoint = store
    run, version = champion_and_candidate(s3, bucket, REQUIRED, accuracy=0.4)
    asked = request(s3, run, version, model_registry(endpoint))
    assert asked["ask"] is False and asked["approval"]["decision"] == "not_asked"
    assert "nobody asked: accuracy 0.4000 < published 0.5000" in asked["approval"]["reason"]
    assert status_of(sm, run) is None  # never pending: nobody was asked
    decision, _ = publish(s3, run, version, asked["approval"], model_registry(endpoint))
    assert not decision.promote and status_of(sm, run) == "Rejected"  # accepted, registered, not promoted


def test_the_request_shows_what_the_decision_rests_on_and_the_version_waits_in_the_model_registry(store):
    s3, bucket, sm, endpoint = store
    run, version = champion_and_candidate(s3, bucket, REQUIRED)
    asked = request(s3, run, version, model_registry(endpoint))
    assert asked["ask"] is True and asked["assigned_users"] == [{"id": "alice", "name": "alice"}]
    assert asked["timeout_seconds"] == 3 * 86400 and run.job in asked["subject"]
    body = asked["body"]
    for words in (f"**{run.job}**", "accuracy on `synthetic-abc@000`", "before: 0.5000", "**after: 0.9000**",
                  "| pan neg / tilt neg | 0.850 | 0.900 | +0.050 |",
                  "| pan ctr / tilt ctr | 0.900 | 0.800 | **-0.100 (worst)** |",
                  "| onnx | 0.9000 | 1.25 |", "`synthetic-abc`", "558 training, 93 evaluation images",
                  "3312 billable seconds", "[Report](https://s3.example/report.html?X-Amz-Signature=1)",
                  "[Confusion matrices](https://s3.example/confusion_matrix.png", "within 3d"):
        assert words in body, words
    assert "litert_int8" not in body  # only the formats that passed
    package = packages(sm)[run.plan["version_prefix"]]
    assert package["ModelApprovalStatus"] == "PendingManualApproval"


def test_an_approval_publishes_and_the_record_names_the_approver_and_the_comparison(store):
    s3, bucket, sm, endpoint = store
    run, version = champion_and_candidate(s3, bucket, REQUIRED)
    run.report["comparison"] = paired_comparison("1" * 84 + "0" * 9, "1" * 47 + "0" * 46)  # 0.9 against 0.5
    registry = model_registry(endpoint)
    assert request(s3, run, version, registry)["ask"]
    approval = answer(answered(APPROVE_OPTION, "alice", "looks right"), asked_at="t0", timeout="3d", link="L")
    decision, summary = publish(s3, run, version, approval, registry)
    assert decision.promote and summary["approval"]["by"] == "alice"
    pointer, _ = pointers.read_pointer(s3, run.plan["published_pointer_uri"])
    assert pointer["approval"] == {"required": True, "decision": "approved", "by": "alice",
                                   "at": "2025-03-08T09:30:00+00:00", "comment": "looks right"}
    assert pointer["comparison"] == run.report["comparison"] and pointer["comparison"]["verdict"] == "better"
    assert "difference +0.3978" in pointer["promotion"]["reason"]
    package = packages(sm)[run.plan["version_prefix"]]
    assert package["ModelApprovalStatus"] == "Approved" and pointer["model_package"]["arn"] == package["ModelPackageArn"]
    ARTIFACTS.mkdir(exist_ok=True)  # one version's Model Registry record, as DescribeModelPackage gives it
    (ARTIFACTS / "model-package.json").write_text(json.dumps(package, indent=2, default=str) + "\n")
    history_bucket, history_key = split_s3_uri(run.plan["history_record_uri"])
    history = s3.get_object(Bucket=history_bucket, Key=history_key)["Body"].read()
    metadata = package["CustomerMetadataProperties"]
    assert metadata["published_record_uri"] == run.plan["history_record_uri"]
    assert metadata["published_record_sha256"] == hashlib.sha256(history).hexdigest()
    assert metadata["frozen_model_sha256"] == version["files"]["frozen_model.pb"]["sha256"]
    assert (metadata["evaluation_accuracy"], metadata["evaluation_set"], metadata["channel_order"]) == (
        "0.9", "synthetic-abc@000", "bgr")
    container = package["InferenceSpecification"]["Containers"][0]
    assert (container["Image"], container["ModelDataUrl"]) == (IMAGE, pointer["model_artifact_uri"])
    assert package["InferenceSpecification"]["SupportedContentTypes"] == ["application/json"]
    assert package["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"] == version["files"]["report.json"]["uri"]
    # A retried publish finds the version published and its package approved: nothing new.
    publish(s3, run, version, approval, registry)
    assert len(packages(sm)) == 1 and packages(sm)[run.plan["version_prefix"]]["ModelApprovalStatus"] == "Approved"


@pytest.mark.parametrize("event, words", [
    (answered(REJECT_OPTION, "alice", "class pan ctr got worse"), "rejected by alice at 2025-03-08T09:30:00+00:00: "
                                                                  "class pan ctr got worse"),
    (answered(REJECT_OPTION, None), "no answer within 3d (a timeout is a rejection)"),
], ids=["rejected", "timed-out"])
def test_a_refusal_publishes_nothing_and_is_kept_with_the_versions_evidence(store, event, words):
    s3, bucket, sm, endpoint = store
    run, version = champion_and_candidate(s3, bucket, REQUIRED)
    registry = model_registry(endpoint)
    assert request(s3, run, version, registry)["ask"]
    before = {k: v for k, v in pointers.read_pointer(s3, run.plan["published_pointer_uri"])[0].items()}
    refusal = answer(event, asked_at="2025-03-07T09:00:00+00:00", timeout="3d", link="https://airflow/required")
    assert refusal["decision"] == "rejected" and words in refusal["reason"]
    assert refusal["timed_out"] is (event["responded_by_user"] is None)
    decision, _ = publish(s3, run, version, refusal, registry)  # were it run anyway
    assert not decision.promote and decision.reason.startswith("not approved: ")
    for _ in range(2):  # a cleared record_release keeps the answer once
        summary = record_release(s3, run.plan, run.training, run.dataset, run.report, version, refusal, registry,
                                 log=lambda line: None)
    assert summary["promoted"] is False and summary["approval"]["decision"] == "rejected"
    assert pointers.read_pointer(s3, run.plan["published_pointer_uri"])[0] == before
    evidence = json.loads(s3.get_object(Bucket=bucket, Key=split_s3_uri(run.plan["version_prefix"])[1]
                                        + "approval.json")["Body"].read())
    assert [(a["decision"], a["by"], a["comment"]) for a in evidence["answers"]] == [
        ("rejected", refusal["by"], refusal["comment"])]
    package = packages(sm)[run.plan["version_prefix"]]
    assert package["ModelApprovalStatus"] == "Rejected" and words in package["ApprovalDescription"]


def test_a_rollback_moves_the_pointer_then_the_model_registry_and_a_rerun_repairs_only(store):
    s3, bucket, sm, endpoint = store
    registry = model_registry(endpoint)
    run, version = champion_and_candidate(s3, bucket, {"release_approval": "none"})
    publish(s3, run, version, None, registry)
    first = governed_candidate(s3, bucket, 0, {})
    assert status_of(sm, run) == "Approved"
    rollback(s3, bucket, to_job=first.job, log=lambda line: None, model_registry=registry)
    assert (status_of(sm, first), status_of(sm, run)) == ("Approved", "Rejected")
    assert "rolled back from" in packages(sm)[run.plan["version_prefix"]]["ApprovalDescription"]
    _, etag = pointers.read_pointer(s3, run.plan["published_pointer_uri"])
    rollback(s3, bucket, to_job=first.job, log=lambda line: None, model_registry=registry)  # interrupted, run again
    assert pointers.read_pointer(s3, run.plan["published_pointer_uri"])[1] == etag  # the pointer did not move
    assert (status_of(sm, first), status_of(sm, run)) == ("Approved", "Rejected")


def test_customer_metadata_keeps_sagemakers_rules():
    assert metadata_value('a "b" {c}, d') == "a -b- -c-- d"
    assert metadata_value("s3://bucket/headpose/x.json") == "s3://bucket/headpose/x.json"
    assert len(metadata_value("x" * 300)) == 256
    record = {"version": 3, "training_job_name": "job", "files": {"frozen_model.pb": {"uri": "s3://b/f.pb", "sha256": "ab"}},
              "metrics": {"accuracy": 0.81}, "evaluation_set": {"id": "set@1,2"}, "dataset": None,
              "channel_order": "bgr"}
    metadata = package_metadata(record, {"uri": "s3://b/h.json", "sha256": "cd"})
    assert metadata == {"training_job_name": "job", "frozen_model_sha256": "ab", "evaluation_accuracy": "0.81",
                        "evaluation_set": "set@1-2", "channel_order": "bgr", "published_record_uri": "s3://b/h.json",
                        "published_record_sha256": "cd"}
    assert all(not set('"{},') & set(value) and 0 < len(value) <= 256 for value in metadata.values())


# -- the Airflow operator around it ---------------------------------------------------------

class TaskInstance:
    """What the operator touches of its task instance: XCom, by key."""

    def __init__(self, xcoms: dict | None = None):
        self.xcoms, self.map_index = dict(xcoms or {}), -1

    def xcom_push(self, key: str, value: object) -> None:
        self.xcoms[key] = value

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> object:
        return self.xcoms.get(key)


@pytest.fixture(scope="module")
def approve_release():
    from airflow_support import load_dag

    return load_dag().task_dict["approve_release"]


@pytest.mark.parametrize("event, decision", [
    (answered(APPROVE_OPTION, "alice"), "approved"),
    (answered(REJECT_OPTION, "alice", "no"), "rejected"),
    (answered(REJECT_OPTION, None), "rejected"),
], ids=["approve", "reject", "timeout"])
def test_the_operator_keeps_the_answer_and_a_refusal_skips_publish_alone(approve_release, event, decision):
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    ti = TaskInstance({"request": {"asked_at": "t0", "link": "https://airflow/required_actions", "timeout": "90s"}})
    context = {"ti": ti, "task": approve_release}
    if decision == "approved":
        assert approve_release.execute_complete(context, event)["decision"] == "approved"
    else:
        with pytest.raises(DownstreamTasksSkipped) as skipped:  # record_release still runs: it is not skipped
            approve_release.execute_complete(context, event)
        assert skipped.value.tasks == ["publish"]
    kept = ti.xcoms["approval"]  # pushed before the skip ends the task without a return value
    assert (kept["decision"], kept["by"], kept["request_link"]) == (decision, event["responded_by_user"] and "alice",
                                                                   "https://airflow/required_actions")
    assert kept["timed_out"] is (event["responded_by_user"] is None)


def test_the_operator_asks_nobody_where_the_deployment_does_not_require_it(approve_release, store, monkeypatch):
    import copy

    from support import aws_env

    s3, bucket, sm, endpoint = store
    for name, value in aws_env(endpoint).items():
        monkeypatch.setenv(name, value)
    run, version = champion_and_candidate(s3, bucket, {"release_approval": "none", "model_package_group": ""})
    operator = copy.copy(approve_release)  # as rendered for the run: its templated fields hold the XComs
    operator.plan, operator.training, operator.dataset, operator.report, operator.version = (
        run.plan, run.training, run.dataset, run.report, version)
    ti = TaskInstance()
    result = operator.execute({"ti": ti, "task": operator})
    assert result == ti.xcoms["approval"] and result["decision"] == "not_required" and not result["asked"]
    assert packages(sm) == {}  # model_package_group '' turns the Model Registry off


class Recorded:
    """A notifier as $HEADPOSE_NOTIFIER names one (any BaseNotifier class); keeps what it was sent."""

    sent: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __call__(self, context: dict) -> None:
        Recorded.sent.append({**self.kwargs, "line": context["headpose_line"]})


def test_the_request_goes_to_the_notifier_with_the_page_where_it_is_answered(approve_release, monkeypatch):
    from headpose_operators.notify import ReleaseRequestNotifier

    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com")
    monkeypatch.setenv("HEADPOSE_NOTIFIER", f"{__name__}.Recorded")
    monkeypatch.setenv("HEADPOSE_NOTIFIER_KWARGS", '{"channel": "#ml-ops"}')
    ti = TaskInstance({"training_job_name": "job-b"})
    ti.dag_id, ti.run_id, ti.task_id = "headpose_retraining", "manual__2025-03-08", "approve_release"
    Recorded.sent.clear()
    ReleaseRequestNotifier().notify({"ti": ti, "task_instance": ti, "task": approve_release})
    [sent] = Recorded.sent
    assert sent["channel"] == "#ml-ops"
    assert sent["line"].startswith("HEADPOSE APPROVAL REQUEST dag=headpose_retraining run=manual__2025-03-08 "
                                   "training_job_name=job-b answer at https://airflow.example.com/dags/"
                                   "headpose_retraining/runs/manual__2025-03-08/tasks/approve_release/required_actions")
