"""What a finished local training job leaves in S3, shaped like SageMaker's description.

``local-job.json`` beside the artifact, written last, marks the job completed: a retried
task finds it and returns the recorded result instead of training again.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping

from headpose.planning.layout import LOCAL_JOB_RECORD_FILE, join_uri, split_s3_uri
from headpose.planning.request import hyperparameter


RECORD_VERSION = 1


_FAKE_ACCOUNT = "000000000000"


def job_output_prefix(request: Mapping[str, Any]) -> str:
    """``<S3OutputPath>/<TrainingJobName>/output`` (where SageMaker puts model.tar.gz)."""
    return join_uri(request["OutputDataConfig"]["S3OutputPath"], f"{request['TrainingJobName']}/output")


def model_artifact_uri(request: Mapping[str, Any]) -> str:
    return join_uri(job_output_prefix(request), "model.tar.gz")


def job_record_uri(request: Mapping[str, Any]) -> str:
    return join_uri(job_output_prefix(request), LOCAL_JOB_RECORD_FILE)


def completed_description(
    request: Mapping[str, Any],
    created: datetime,
    started: datetime,
    ended: datetime,
    final_metrics: list[dict[str, Any]],
) -> dict[str, Any]:
    job = request["TrainingJobName"]
    region = str(hyperparameter(request, "sagemaker_region") or "us-east-1")
    return {
        "TrainingJobName": job,
        # Formatted like SageMaker's (which lower-cases the name); the account is a placeholder.
        "TrainingJobArn": f"arn:aws:sagemaker:{region}:{_FAKE_ACCOUNT}:training-job/{job.lower()}",
        "ModelArtifacts": {"S3ModelArtifacts": model_artifact_uri(request)},
        "TrainingJobStatus": "Completed",
        "SecondaryStatus": "Completed",
        "HyperParameters": dict(request.get("HyperParameters") or {}),
        "AlgorithmSpecification": dict(request["AlgorithmSpecification"]),
        "RoleArn": request.get("RoleArn", ""),
        "InputDataConfig": list(request.get("InputDataConfig", [])),
        "OutputDataConfig": dict(request["OutputDataConfig"]),
        "ResourceConfig": dict(request["ResourceConfig"]),
        "StoppingCondition": dict(request["StoppingCondition"]),
        "CreationTime": created,
        "TrainingStartTime": started,
        "TrainingEndTime": ended,
        "LastModifiedTime": ended,
        "SecondaryStatusTransitions": [
            {"Status": "Downloading", "StartTime": created, "EndTime": started,
             "StatusMessage": "Downloading input data and the source dir"},
            {"Status": "Training", "StartTime": started, "EndTime": ended,
             "StatusMessage": "Training on the Airflow worker (local backend, SageMaker training toolkit)"},
            {"Status": "Completed", "StartTime": ended, "EndTime": ended,
             "StatusMessage": "Training job completed"},
        ],
        "FinalMetricDataList": final_metrics,
        "TrainingTimeInSeconds": max(1, round((ended - started).total_seconds())),
        # Nothing is billed: it ran on the worker.
        "BillableTimeInSeconds": 0,
        "EnableNetworkIsolation": bool(request.get("EnableNetworkIsolation", False)),
        "EnableManagedSpotTraining": False,
    }


_TIME_FIELDS = ("CreationTime", "TrainingStartTime", "TrainingEndTime", "LastModifiedTime")


def write_record(request: Mapping[str, Any], s3_client: Any, result: Mapping[str, Any]) -> None:
    bucket, key = split_s3_uri(job_record_uri(request))
    body = json.dumps({"version": RECORD_VERSION, "result": result}, default=_iso, indent=2)
    s3_client.put_object(Bucket=bucket, Key=key, Body=body.encode(), ContentType="application/json")


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot record {type(value).__name__}")


def recorded_result(request: Mapping[str, Any], s3_client: Any) -> dict[str, Any] | None:
    """The recorded result of this job if it completed and its artifact is still there."""
    from botocore.exceptions import ClientError

    record_bucket, record_key = split_s3_uri(job_record_uri(request))
    artifact_bucket, artifact_key = split_s3_uri(model_artifact_uri(request))
    try:
        body = s3_client.get_object(Bucket=record_bucket, Key=record_key)["Body"].read()
        s3_client.head_object(Bucket=artifact_bucket, Key=artifact_key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    record = json.loads(body)
    result = record.get("result") or {}
    if record.get("version") != RECORD_VERSION or result.get("TrainingJobStatus") != "Completed":
        return None
    for name in _TIME_FIELDS:
        if isinstance(result.get(name), str):
            result[name] = datetime.fromisoformat(result[name])
    for transition in result.get("SecondaryStatusTransitions", []):
        for name in ("StartTime", "EndTime"):
            if isinstance(transition.get(name), str):
                transition[name] = datetime.fromisoformat(transition[name])
    for metric in result.get("FinalMetricDataList", []):
        if isinstance(metric.get("Timestamp"), str):
            metric["Timestamp"] = datetime.fromisoformat(metric["Timestamp"])
    return result
