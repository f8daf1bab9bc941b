"""A run's candidate as the approval and the Model Registry see it, on moto's S3 and SageMaker.

``test_crash_points.candidate`` builds the candidate's files and the XComs up to
``upload_frozen_model`` from the real ``plan_run``; this adds the profile (the release
settings), the report's per-class recall, formats and links the approver's page shows, and
the SageMaker side: the Model Registry of a group, and what each version's package holds.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3

from headpose.planning.plan import plan_run
from headpose.registry.model_packages import ModelRegistry
from test_crash_points import FIRST_RUN, Run, candidate

# What the sagemaker SDK resolves for us-east-1 (planning.request.inference_image_uri), fixed
# here: the lookup imports the SDK (seconds) and is not what these tests are about.
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/tensorflow-inference:2.20-cpu-py312"
RECALL = {"pan=negative/tilt=negative": 0.9, "pan=centre/tilt=centre": 0.8, "pan=positive/tilt=positive": 0.7}
CHAMPION_RECALL = {"pan=negative/tilt=negative": 0.85, "pan=centre/tilt=centre": 0.9, "pan=positive/tilt=positive": 0.7}


def sagemaker(endpoint: str) -> Any:
    return boto3.client("sagemaker", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def model_registry(endpoint: str, group: str = "headpose", client: Any = None) -> ModelRegistry:
    return ModelRegistry(client or sagemaker(endpoint), group, lambda: IMAGE)


def packages(client: Any, group: str = "headpose") -> dict[str, dict[str, Any]]:
    """``{version prefix: the package's description}`` of every package in ``group``."""
    try:
        listed = client.list_model_packages(ModelPackageGroupName=group)["ModelPackageSummaryList"]
    except client.exceptions.ClientError:
        return {}
    return {p["ModelPackageDescription"]: client.describe_model_package(ModelPackageName=p["ModelPackageArn"])
            for p in listed}


def status_of(client: Any, run: Run, group: str = "headpose") -> str | None:
    found = packages(client, group).get(run.plan["version_prefix"])
    return found["ModelApprovalStatus"] if found else None


def governed_candidate(s3, bucket: str, day: int, profile: dict[str, Any], accuracy: float = 0.9) -> Run:
    """``candidate(...)`` planned under ``profile`` (release settings), with what the approver is shown."""
    run = candidate(s3, bucket, day, accuracy=accuracy)
    when = FIRST_RUN + timedelta(days=day)
    environ = {"HEADPOSE_RUN_DEFAULTS": json.dumps(profile)}
    run.plan = plan_run({"s3_bucket": bucket, "backend": "local"}, when, region="us-east-1",
                        dag_id="headpose_retraining", run_id=f"scheduled__{when.isoformat()}", environ=environ)
    run.dataset.update(train_count=558, eval_count=93)
    run.report.update(per_class_recall=RECALL, links={
        "report_page": "https://s3.example/report.html?X-Amz-Signature=1",
        "confusion_matrix": "https://s3.example/confusion_matrix.png?X-Amz-Signature=2"})
    run.report["formats"]["onnx"]["latency_ms_b1"] = 1.25
    run.training["Training"]["BillableTimeInSeconds"] = 3312
    return run


def answered(option: str, by: str | None = "alice", comment: str | None = None) -> dict[str, Any]:
    """The resume event of a Human-in-the-loop answer (``by=None``: the timeout's default)."""
    return {"chosen_options": [option], "params_input": {"comment": comment},
            "responded_at": datetime(2025, 3, 8, 9, 30, tzinfo=timezone.utc),
            "responded_by_user": {"id": by, "name": by} if by else None, "timedout": by is None}
