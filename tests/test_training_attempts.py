"""HeadposeTrainingOperator across a deferral and between attempts; the provider's S3 calls pinned.

The same set-up as ``test_sagemaker_backend`` (moto's SageMaker over HTTP, Stubber for the
states moto cannot play), whose fixtures and helpers these tests share.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from fault_support import OwnerCheckingRelay
from support import aws_env
from botocore.stub import Stubber

from test_sagemaker_backend import (  # noqa: F401  (aws and described are fixtures)
    BUCKET, JOB, REASON, RETRIES, RecordingTaskInstance, _client, _operator, _stubbed, aws, described,
)

CAPACITY = "CapacityError: Unable to provision requested ML compute capacity."
OWNER = "123456789012"  # moto's account: the owner of every bucket it creates


@pytest.fixture()
def spot(aws):
    from test_sagemaker_backend import _plan

    return _plan(use_spot_instances=True, max_run_seconds=7200, max_wait_seconds=10800)["training_request"]


def test_the_attempts_survive_the_deferral_into_a_freshly_built_operator(aws, described):
    from airflow.sdk.exceptions import TaskDeferred

    request = aws["plan"]["training_request"]
    deferring = _operator(request, deferrable=True)
    stubber = _stubbed(deferring, described("Failed", FailureReason=CAPACITY), missing=JOB + "-2")
    _create_stubbed(stubber, JOB + "-2")
    stubber.add_response("describe_training_job", described("InProgress", TrainingJobName=JOB + "-2"),
                         {"TrainingJobName": JOB + "-2"})
    with pytest.raises(TaskDeferred) as deferred:
        deferring.execute({"ti": RecordingTaskInstance()})  # the provider's own create-and-defer
    stubber.assert_no_pending_responses()
    kwargs = json.loads(json.dumps(deferred.value.kwargs))  # what the metadata database keeps

    # Airflow resumes a deferred task on a new operator built from the DAG, not on this one.
    resumed = _operator(request, deferrable=True)
    stubber = _stubbed(resumed, described("Completed", TrainingJobName=JOB + "-2"))
    result = resumed.execute_complete({}, {"status": "success", "job_name": JOB + "-2"}, **kwargs)
    stubber.assert_no_pending_responses()
    assert result["training_job_name"] == JOB + "-2"
    assert result["attempts"] == [JOB, JOB + "-2"]  # what the published record lists


def _next_attempt_request(aws, described, request: dict, failure: str) -> dict:
    """The request the operator sends for ``<job>-2`` after ``<job>`` failed with ``failure``."""
    operator = _operator(request, wait_for_completion=False)
    first = described("Failed", FailureReason=failure, CheckpointConfig=request["CheckpointConfig"])
    stubber = _stubbed(operator, first, missing=JOB + "-2")
    sent = {}
    stubber.add_response("create_training_job", {"TrainingJobArn": f"arn:aws:sagemaker:us-east-1:1:training-job/{JOB}-2",
                                                 "ResponseMetadata": {"HTTPStatusCode": 200}})
    operator.hook.conn.meta.events.register("before-parameter-build.sagemaker.CreateTrainingJob",
                                            lambda params, **_: sent.update(params))
    stubber.add_response("describe_training_job", described("InProgress", TrainingJobName=JOB + "-2"),
                         {"TrainingJobName": JOB + "-2"})
    cleared = RecordingTaskInstance(try_number=5, max_tries=4 + 3)  # a person cleared train
    operator.execute({"ti": cleared})
    stubber.assert_no_pending_responses()
    return sent


def test_a_new_attempt_after_an_algorithm_error_starts_from_fresh_checkpoints(aws, described, spot):
    sent = _next_attempt_request(aws, described, spot, REASON)
    assert sent["TrainingJobName"] == JOB + "-2"
    assert sent["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/headpose/TFartifacts/{JOB}-2/checkpoints"
    assert spot["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/headpose/TFartifacts/{JOB}/checkpoints"


def test_only_a_capacity_failure_resumes_the_checkpoints(aws, described, spot):
    sent = _next_attempt_request(aws, described, spot, CAPACITY)
    assert sent["CheckpointConfig"]["S3Uri"] == spot["CheckpointConfig"]["S3Uri"]


def test_the_providers_s3_calls_carry_the_bucket_owner(aws, monkeypatch):
    relay = OwnerCheckingRelay(int(aws["endpoint"].rsplit(":", 1)[1]), OWNER)
    try:
        for name, value in aws_env(relay.endpoint).items():
            monkeypatch.setenv(name, value)
        checksums = {"manifest_sha256": "a" * 64, "source_sha256s": {"train.py": "b" * 64}}
        result = _operator(aws["plan"]["training_request"], expected_bucket_owner=OWNER, **checksums).execute(
            {"ti": RecordingTaskInstance()})
    finally:
        relay.close()
    s3_calls = [line for line in relay.unpinned if line.split(" ", 1)[1].startswith(f"/{BUCKET}")]
    # The provider's check_s3_url of the channel (HEAD bucket, HEAD/LIST prefix) went through too.
    assert s3_calls == [] and relay.refused == []
    assert any(line.startswith("POST /") for line in relay.unpinned)  # SageMaker's own API: no owner to carry
    hyperparameters = result["Training"]["HyperParameters"]
    assert json.loads(hyperparameters["manifest_sha256"]) == "a" * 64  # the entry point is told what to verify
    assert json.loads(json.loads(hyperparameters["source_sha256s"])) == {"train.py": "b" * 64}


def test_a_bucket_of_another_account_is_refused_by_the_providers_check_too(aws, monkeypatch):
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    relay = OwnerCheckingRelay(int(aws["endpoint"].rsplit(":", 1)[1]), OWNER)
    try:
        for name, value in aws_env(relay.endpoint).items():
            monkeypatch.setenv(name, value)
        operator = _operator(aws["plan"]["training_request"], expected_bucket_owner="999999999999")
        operator._govern_provider_s3()
        # The provider reads S3's 403 as "no such bucket": refused either way, before any job.
        with pytest.raises(Exception, match="The input S3 Bucket headpose-sm does not exist"):
            SageMakerHook.check_s3_url(operator.hook, aws["plan"]["dataset_prefix"])
    finally:
        relay.close()
    assert relay.refused and relay.refused[0].startswith(f"HEAD /{BUCKET}")


def test_an_unpinned_provider_hook_would_have_sent_none(aws, monkeypatch):
    # The check above can fail: the provider's hook alone sends no owner.
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    relay = OwnerCheckingRelay(int(aws["endpoint"].rsplit(":", 1)[1]), OWNER)
    try:
        for name, value in aws_env(relay.endpoint).items():
            monkeypatch.setenv(name, value)
        SageMakerHook(aws_conn_id="aws_default").check_s3_url(aws["plan"]["dataset_prefix"])
    finally:
        relay.close()
    assert any(line.startswith(f"HEAD /{BUCKET}") for line in relay.unpinned)


def test_the_status_polls_and_the_training_jobs_have_different_names():
    operator = _operator({"StoppingCondition": {"MaxRuntimeInSeconds": 60}}, max_status_polls=7,
                         max_training_attempts=2)
    assert operator.max_attempts == 7 and operator._max_training_attempts() == 2  # the provider's name for polls
    assert _operator({"StoppingCondition": {}})._max_training_attempts() == 3  # the run parameter's default
    with pytest.raises(TypeError):
        _operator({}, max_attempts=7)  # the ambiguous name is gone from this operator


# -- attempts: a new job after a failed one, never two at once -------------------------

def _create_stubbed(stubber: Stubber, job: str) -> None:
    stubber.add_response("create_training_job", {"TrainingJobArn": f"arn:aws:sagemaker:us-east-1:1:training-job/{job}",
                                                 "ResponseMetadata": {"HTTPStatusCode": 200}},
                         {**_request_for(job)})


def _request_for(job: str) -> dict:
    from botocore.stub import ANY

    return {"TrainingJobName": job, "AlgorithmSpecification": ANY, "HyperParameters": ANY, "RoleArn": ANY,
            "InputDataConfig": ANY, "OutputDataConfig": ANY, "ResourceConfig": ANY, "StoppingCondition": ANY,
            "EnableNetworkIsolation": ANY, "Tags": ANY}


def test_clearing_train_after_a_failed_job_starts_exactly_one_new_job_and_a_second_clear_none(aws, described):
    request = aws["plan"]["training_request"]
    cleared = RecordingTaskInstance(try_number=5, max_tries=4 + RETRIES)  # the first try after a clear
    operator = _operator(request, wait_for_completion=False)
    stubber = _stubbed(operator, described("Failed", FailureReason=REASON), missing=JOB + "-2")
    _create_stubbed(stubber, JOB + "-2")
    stubber.add_response("describe_training_job", described("InProgress", TrainingJobName=JOB + "-2"),
                         {"TrainingJobName": JOB + "-2"})
    result = operator.execute({"ti": cleared})
    stubber.assert_no_pending_responses()
    assert result["training_job_name"] == JOB + "-2" and result["attempts"] == [JOB, JOB + "-2"]

    # Cleared again while the new job runs: it waits for that one, and starts none.
    again = _operator(request, wait_for_completion=False)
    stubber = _stubbed(again, described("Failed", FailureReason=REASON),
                       described("InProgress", TrainingJobName=JOB + "-2"))
    result = again.execute({"ti": RecordingTaskInstance(try_number=7, max_tries=6 + RETRIES)})
    stubber.assert_no_pending_responses()  # no CreateTrainingJob was queued, so none was sent
    assert result["training_job_name"] == JOB + "-2"


def test_a_capacity_failure_is_retried_with_the_next_job_and_attempts_end_at_the_limit(aws, described):
    from airflow.sdk.exceptions import AirflowFailException

    capacity = "CapacityError: Unable to provision requested ML compute capacity. Please retry using a different ML instance type."
    request = aws["plan"]["training_request"]
    operator = _operator(request, wait_for_completion=False, max_training_attempts=2)
    stubber = _stubbed(operator, described("Failed", FailureReason=capacity), missing=JOB + "-2")
    _create_stubbed(stubber, JOB + "-2")
    stubber.add_response("describe_training_job", described("InProgress", TrainingJobName=JOB + "-2"),
                         {"TrainingJobName": JOB + "-2"})
    assert operator.execute({"ti": RecordingTaskInstance()})["training_job_name"] == JOB + "-2"  # an automatic retry

    # The second job fails for capacity too: the run has used its 2 jobs.
    last = _operator(request, max_training_attempts=2)
    stubber = _stubbed(last, described("Failed", FailureReason=capacity),
                       described("Failed", FailureReason=capacity, TrainingJobName=JOB + "-2"))
    with pytest.raises(AirflowFailException, match="the run has used its 2 training job"):
        last.execute({"ti": RecordingTaskInstance(try_number=3)})
    stubber.assert_no_pending_responses()


def test_the_log_printed_before_a_deferral_is_not_printed_again_when_the_task_resumes(aws, described, capfd):
    """What the job logged is printed before deferring; on resuming, only what followed."""
    logs = _client("logs", aws["endpoint"])
    group, stream = "/aws/sagemaker/TrainingJobs", f"{JOB}/algo-1-1715000000"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName=stream)
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    logs.put_log_events(logGroupName=group, logStreamName=stream,
                        logEvents=[{"timestamp": now, "message": "progress: step=1/2 before the deferral"}])
    operator = _operator(aws["plan"]["training_request"], print_log=True)
    description = described("InProgress")
    capfd.readouterr()
    positions = operator._print_logs(JOB, description)
    printed = "".join(capfd.readouterr())
    assert "before the deferral" in printed and stream in positions
    logs.put_log_events(logGroupName=group, logStreamName=stream,
                        logEvents=[{"timestamp": now + 5, "message": "metric: eval_accuracy=0.91 after it"}])
    operator._print_logs(JOB, described("Completed"), json.loads(json.dumps(positions)))  # via the trigger's kwargs
    printed = "".join(capfd.readouterr())
    assert "after it" in printed and "before the deferral" not in printed
