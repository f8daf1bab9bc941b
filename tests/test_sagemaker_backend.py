"""The sagemaker backend against moto's SageMaker API over HTTP; Stubber only for states moto cannot play.

moto's training jobs run no code: ``CreateTrainingJob`` stores the request and the job
reports ``Completed`` at once, with ``ModelArtifacts`` at
``<S3OutputPath>/<job>/output/model.tar.gz`` and no billable or training time. The
Failed, Stopped and InProgress states are played by botocore's ``Stubber`` on the
operator's own SageMaker client, from a description moto returned for the same request.
"""
from __future__ import annotations

import copy
import hashlib
import json
from datetime import datetime, timezone

import boto3
import pytest
from botocore.stub import Stubber

import airflow_support  # noqa: F401  (a throw-away AIRFLOW_HOME before airflow is imported)
from headpose.planning.layout import split_s3_uri, training_job_name
from headpose.planning.plan import plan_run
from headpose.planning.training_job import Step, foreign_job_problems, next_step, training_summary
from support import aws_env

ARN = "arn:aws:iam::123456789012:role/SageMakerRole"
BUCKET = "headpose-sm"
LOGICAL = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
JOB = training_job_name(LOGICAL)
CODE = b"stands for sourcedir.tar.gz: SageMaker's job in moto runs no code"
CODE_SHA256 = hashlib.sha256(CODE).hexdigest()


# -- the decision, without AWS or Airflow ---------------------------------------------

@pytest.mark.parametrize("status, step", [
    ("InProgress", Step.WAIT), ("Stopping", Step.WAIT), ("Completed", Step.DONE),
    ("Failed", Step.FAIL), ("Stopped", Step.FAIL),
])
def test_every_status_has_one_step(status, step):
    assert next_step({"TrainingJobName": JOB, "TrainingJobStatus": status}) is step
    assert next_step(None) is Step.CREATE


def test_an_unknown_status_is_neither_created_nor_waited_for():
    from headpose.planning.training_job import TrainingJobError

    with pytest.raises(TrainingJobError, match="'Exploded'"):
        next_step({"TrainingJobName": JOB, "TrainingJobStatus": "Exploded"})


def test_the_summary_has_times_metrics_and_the_documented_spot_saving():
    summary = training_summary({
        "TrainingJobName": JOB, "TrainingJobStatus": "Completed", "EnableManagedSpotTraining": True,
        "BillableTimeInSeconds": 100, "TrainingTimeInSeconds": 500,
        "FinalMetricDataList": [{"MetricName": "eval:accuracy", "Value": 0.9}],
    })
    assert summary["spot_savings_percent"] == 80.0  # the DescribeTrainingJob docs' own example
    assert summary["final_metrics"] == {"eval:accuracy": 0.9}
    on_demand = training_summary({"TrainingJobName": JOB, "BillableTimeInSeconds": 500,
                                  "TrainingTimeInSeconds": 500})
    assert on_demand["spot_savings_percent"] is None and on_demand["managed_spot_training"] is False


# -- the operator against moto --------------------------------------------------------

@pytest.fixture()
def aws(s3_endpoint, monkeypatch):
    """moto emptied, ``aws_default`` pointing at it, the run's bucket and dataset in place."""
    for name, value in aws_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    s3 = _client("s3", s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    plan = _plan()
    bucket, prefix = split_s3_uri(plan["dataset_prefix"])
    s3.put_object(Bucket=bucket, Key=prefix + "train-00000.tfrecord", Body=b"records")
    # What package_code leaves: the code in S3 and its sha256 in XCom.
    _, code_key = split_s3_uri(plan["sourcedir_uri"])
    s3.put_object(Bucket=bucket, Key=code_key, Body=CODE)
    return {"endpoint": s3_endpoint, "sagemaker": _client("sagemaker", s3_endpoint), "plan": plan,
            "s3": s3, "code_key": code_key}


def _client(service: str, endpoint: str):
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _plan(**params) -> dict:
    return plan_run({"backend": "sagemaker", "role_arn": ARN, "s3_bucket": BUCKET, **params},
                    LOGICAL, region="us-east-1", dag_id="headpose_retraining", run_id="manual__t")


RETRIES = 3


class RecordingTaskInstance:
    """The parts of a task's context the operator uses: ``ti.xcom_push`` (for links), and
    the try numbers Airflow keeps (by default an automatic retry, the second try)."""

    def __init__(self, try_number: int = 2, max_tries: int = RETRIES):
        self.xcoms: dict[str, object] = {}
        self.try_number, self.max_tries = try_number, max_tries

    def xcom_push(self, key: str, value: object) -> None:
        self.xcoms[key] = value


def _operator(request: dict, **kwargs):
    from headpose_operators import HeadposeTrainingOperator

    options = {"backend": "sagemaker", "aws_conn_id": "aws_default", "print_log": False,
               "check_interval": 0, "deferrable": False, "sourcedir_sha256": CODE_SHA256, "retries": RETRIES,
               **kwargs}
    return HeadposeTrainingOperator(task_id="train", config=copy.deepcopy(request), **options)


def _job_count(sagemaker) -> int:
    return len(sagemaker.list_training_jobs()["TrainingJobSummaries"])


def test_a_retried_train_attaches_and_creates_no_second_job(aws):
    request = aws["plan"]["training_request"]
    context = {"ti": RecordingTaskInstance()}
    assert _job_count(aws["sagemaker"]) == 0
    first = _operator(request, print_log=True).execute(context)
    assert _job_count(aws["sagemaker"]) == 1

    retry = _operator(request, print_log=True).execute({"ti": RecordingTaskInstance()})
    assert _job_count(aws["sagemaker"]) == 1  # attached, not created again
    names = [j["TrainingJobName"] for j in aws["sagemaker"].list_training_jobs()["TrainingJobSummaries"]]
    assert names == [JOB]  # and not renamed with a timestamp, as the provider would
    for result in (first, retry):
        assert result["Training"]["TrainingJobName"] == result["training_job_name"] == JOB
        assert result["Training"]["ModelArtifacts"]["S3ModelArtifacts"] == aws["plan"]["model_artifact_uri"]
        assert result["training_job_status"] == "Completed"
        assert result["final_metrics"] == {"train:progress": 100.0}  # what moto reports
        assert set(result) >= {"billable_time_in_seconds", "training_time_in_seconds", "spot_savings_percent"}


def test_the_console_links_name_the_job_its_logs_and_its_artifact(aws):
    from headpose_operators.links import TRAINING_LINKS

    ti = RecordingTaskInstance()
    _operator(aws["plan"]["training_request"]).execute({"ti": ti})
    urls = {link.name: link.format_link(**ti.xcoms[link.key]) for link in TRAINING_LINKS}
    artifact = urls.pop("Model Artifact (S3)")
    # The store here is moto's: the artifact opens at its own endpoint, presigned for a week.
    assert artifact.startswith(f"{aws['endpoint']}/{BUCKET}/headpose/TFartifacts/{JOB}/output/model.tar.gz?")
    assert "X-Amz-Expires=604800" in artifact and "X-Amz-Signature=" in artifact
    assert urls == {
        "SageMaker Training Job":
            f"https://console.aws.amazon.com/sagemaker/home?region=us-east-1#/jobs/{JOB}",
        "SageMaker Training Logs":
            "https://console.aws.amazon.com/cloudwatch/home?region=us-east-1#logsV2:log-groups/log-group/"
            f"$252Faws$252Fsagemaker$252FTrainingJobs$3FlogStreamNameFilter$3D{JOB}",
    }


def test_the_ui_reads_the_train_links_from_the_xcom_the_task_stores():
    # What the API server gets from the serialized DAG: one XCom reader per link.
    from airflow_support import load_dag, scheduler_dag

    task = scheduler_dag(load_dag()).get_task("train")
    assert {link.name: link.xcom_key for link in task.operator_extra_links} == {
        "SageMaker Training Job": "_link_SageMakerTrainingJobLink",
        "SageMaker Training Logs": "_link_SageMakerTrainingLogsLink",
        "Model Artifact (S3)": "_link_S3ModelArtifactLink",
    }


def test_a_job_of_the_same_name_from_another_request_is_refused(aws):
    from airflow.sdk.exceptions import AirflowFailException

    other = _plan(training_steps=7)["training_request"]
    aws["sagemaker"].create_training_job(**other)
    with pytest.raises(AirflowFailException, match=r"not started with this run's request.*training_steps"):
        _operator(aws["plan"]["training_request"]).execute({"ti": RecordingTaskInstance()})
    assert foreign_job_problems(aws["sagemaker"].describe_training_job(TrainingJobName=JOB),
                                other) == []


def test_the_role_comes_from_the_connection_when_the_param_is_empty(aws, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    # plan_run refuses a run without any role; a request that reaches train without one (an
    # older plan, a hand-made request) is still refused there, before any job starts.
    request = {**_plan()["training_request"], "RoleArn": ""}
    with pytest.raises(AirflowFailException, match="sagemaker_role_arn"):
        _operator(request).execute({"ti": RecordingTaskInstance()})
    assert _job_count(aws["sagemaker"]) == 0

    role = "arn:aws:iam::123456789012:role/FromTheConnection"
    connection = {"conn_type": "aws", "extra": {"endpoint_url": aws["endpoint"], "region_name": "us-east-1",
                                                "sagemaker_role_arn": role}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
    _operator(request).execute({"ti": RecordingTaskInstance()})
    assert aws["sagemaker"].describe_training_job(TrainingJobName=JOB)["RoleArn"] == role


def test_a_request_without_the_recorded_sha256_is_not_sent(aws):
    from airflow.sdk.exceptions import AirflowFailException

    for missing in (None, "", "None", "abc"):  # unset, or a template of an unset value
        with pytest.raises(AirflowFailException, match="cannot be verified is not run"):
            _operator(aws["plan"]["training_request"], sourcedir_sha256=missing).execute(
                {"ti": RecordingTaskInstance()})
    assert _job_count(aws["sagemaker"]) == 0


# -- states moto cannot play: Stubber on the operator's own client ---------------------

@pytest.fixture()
def described(aws):
    """``described(status, **fields)``: moto's description of the run's job, in that state."""
    aws["sagemaker"].create_training_job(**aws["plan"]["training_request"])
    real = aws["sagemaker"].describe_training_job(TrainingJobName=JOB)
    real.pop("ResponseMetadata")

    def make(status: str, **fields) -> dict:
        return {**copy.deepcopy(real), "TrainingJobStatus": status, "SecondaryStatus": status, **fields}

    return make


def _stubbed(operator, *descriptions: dict, missing: str | None = None) -> Stubber:
    """Stubber answering DescribeTrainingJob with ``descriptions`` in turn (each for its own job name),
    then ``missing`` (a job name SageMaker does not know) if given."""
    stubber = Stubber(operator.hook.conn)
    for description in descriptions:
        stubber.add_response("describe_training_job", description,
                             {"TrainingJobName": description.get("TrainingJobName", JOB)})
    if missing:
        stubber.add_client_error("describe_training_job", service_error_code="ValidationException",
                                 service_message="Requested resource not found.",
                                 expected_params={"TrainingJobName": missing})
    stubber.activate()
    return stubber


REASON = "AlgorithmError: ValueError: no eval-*.tfrecord shards in /opt/ml/input/data/training"


@pytest.mark.parametrize("deferrable", [False, True])
def test_a_failed_jobs_reason_is_the_tasks_error(aws, described, deferrable):
    from airflow.sdk.exceptions import AirflowException

    operator = _operator(aws["plan"]["training_request"], deferrable=deferrable)
    # Stubber refuses any call not queued: a CreateTrainingJob here would fail the test.
    stubber = _stubbed(operator, described("Failed", FailureReason=REASON), missing=JOB + "-2")
    with pytest.raises(AirflowException) as failed:
        operator.execute({"ti": RecordingTaskInstance()})  # an automatic retry: no new job for this reason
    assert REASON in str(failed.value) and "Failed" in str(failed.value)
    assert "clear train to try another job" in str(failed.value)
    stubber.assert_no_pending_responses()


def test_a_stopped_job_fails_the_task_too(aws, described):
    from airflow.sdk.exceptions import AirflowException

    operator = _operator(aws["plan"]["training_request"])
    stubber = _stubbed(operator, described("Stopped", FailureReason="Stopped by the user"), missing=JOB + "-2")
    with pytest.raises(AirflowException, match="is Stopped: Stopped by the user"):
        operator.execute({"ti": RecordingTaskInstance()})
    stubber.assert_no_pending_responses()


def test_a_running_job_is_waited_for_then_its_result_taken(aws, described):
    operator = _operator(aws["plan"]["training_request"])
    done = described("Completed", BillableTimeInSeconds=120, TrainingTimeInSeconds=300,
                     EnableManagedSpotTraining=True,
                     FinalMetricDataList=[{"MetricName": "eval:accuracy", "Value": 0.93,
                                           "Timestamp": datetime(2024, 5, 6, tzinfo=timezone.utc)}])
    # attach (InProgress), the wait's polls (InProgress, Completed), the final read.
    stubber = _stubbed(operator, described("InProgress"), described("InProgress"), done, done)
    result = operator.execute({"ti": RecordingTaskInstance()})
    stubber.assert_no_pending_responses()
    assert result["training_job_status"] == "Completed"
    assert result["billable_time_in_seconds"] == 120 and result["training_time_in_seconds"] == 300
    assert result["spot_savings_percent"] == 60.0
    assert result["final_metrics"] == {"eval:accuracy": 0.93}


def test_a_running_job_that_fails_while_waited_for_reports_its_reason(aws, described):
    from airflow.sdk.exceptions import AirflowException

    operator = _operator(aws["plan"]["training_request"])
    stubber = _stubbed(operator, described("InProgress"), described("Failed", FailureReason=REASON))
    with pytest.raises(AirflowException, match="no eval-"):
        operator.execute({"ti": RecordingTaskInstance()})
    stubber.assert_no_pending_responses()


@pytest.mark.slow
def test_the_wait_streams_the_jobs_cloudwatch_log(aws, described, capfd):
    # The provider's log tailing re-reads the job status every 30 s (fixed in the hook):
    # this test waits that long once.
    logs = _client("logs", aws["endpoint"])
    group, stream = "/aws/sagemaker/TrainingJobs", f"{JOB}/algo-1-1715000000"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName=stream)
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
        {"timestamp": now, "message": "progress: step=1/2 (50.0%) images_per_sec=3.0"},
        {"timestamp": now + 1, "message": "metric: eval_loss=0.3456 eval_accuracy=0.9100"},
    ])
    operator = _operator(aws["plan"]["training_request"], print_log=True, check_interval=5)
    done = described("Completed")
    stubber = _stubbed(operator, described("InProgress"), described("InProgress"), done, done)
    result = operator.execute({"ti": RecordingTaskInstance()})
    stubber.assert_no_pending_responses()
    assert result["training_job_status"] == "Completed"
    captured = capfd.readouterr()
    assert "metric: eval_loss=0.3456 eval_accuracy=0.9100" in captured.out + captured.err


def test_a_running_job_is_deferred_to_the_providers_trigger_and_resumed(aws, described):
    from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger
    from airflow.sdk.exceptions import AirflowException, TaskDeferred

    operator = _operator(aws["plan"]["training_request"], deferrable=True, check_interval=60)
    stubber = _stubbed(operator, described("InProgress"))
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({"ti": RecordingTaskInstance()})
    stubber.assert_no_pending_responses()
    trigger = deferred.value.trigger
    assert isinstance(trigger, SageMakerTrigger) and deferred.value.method_name == "execute_complete"
    assert trigger.job_name == JOB and trigger.job_type == "Training"
    # Polls for the whole StoppingCondition (432000 s) plus an hour, not the provider's 30 minutes.
    assert trigger.attempts == (432000 + 3600) // 60

    # The triggerer's answer comes back; the job's own state decides.
    stubber.add_response("describe_training_job", described("InProgress"), {"TrainingJobName": JOB})
    with pytest.raises(AirflowException, match="still InProgress.*attaches to it again"):
        operator.execute_complete({}, {"status": "timeout", "job_name": JOB, "message": "max attempts"})
    stubber.add_response("describe_training_job", described("Failed", FailureReason=REASON),
                         {"TrainingJobName": JOB})
    with pytest.raises(AirflowException, match="no eval-"):
        operator.execute_complete({}, {"status": "failed", "job_name": JOB, "message": REASON})
    stubber.add_response("describe_training_job", described("Completed"), {"TrainingJobName": JOB})
    result = operator.execute_complete({}, {"status": "success", "job_name": JOB})
    assert result["training_job_status"] == "Completed" and result["training_job_name"] == JOB
    stubber.assert_no_pending_responses()


def test_code_replaced_after_packaging_is_never_sent_to_sagemaker(aws):
    from airflow.sdk.exceptions import AirflowFailException

    tampered = CODE + b" and something else"
    aws["s3"].put_object(Bucket=BUCKET, Key=aws["code_key"], Body=tampered)
    operator = _operator(aws["plan"]["training_request"])
    # Only the "no such job" answer is queued: a CreateTrainingJob would fail the stubber.
    stubber = Stubber(operator.hook.conn)
    stubber.add_client_error("describe_training_job", "ValidationException", "Requested resource not found.")
    stubber.activate()
    with pytest.raises(AirflowFailException) as refused:
        operator.execute({"ti": RecordingTaskInstance()})
    stubber.assert_no_pending_responses()
    message = str(refused.value)
    assert CODE_SHA256 in message and hashlib.sha256(tampered).hexdigest() in message
    assert aws["plan"]["sourcedir_uri"] in message
    assert _job_count(aws["sagemaker"]) == 0


def test_a_new_job_is_deferred_after_its_creation(aws, described):
    from airflow.sdk.exceptions import TaskDeferred

    operator = _operator(aws["plan"]["training_request"], deferrable=True)
    stubber = Stubber(operator.hook.conn)
    stubber.add_client_error("describe_training_job", "ValidationException", "Requested resource not found.")
    stubber.add_response("create_training_job", {
        "TrainingJobArn": described("InProgress")["TrainingJobArn"],
        "ResponseMetadata": {"HTTPStatusCode": 200},  # the provider checks it
    })
    stubber.add_response("describe_training_job", described("InProgress"), {"TrainingJobName": JOB})
    stubber.activate()
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({"ti": RecordingTaskInstance()})
    stubber.assert_no_pending_responses()
    assert deferred.value.trigger.job_name == JOB
