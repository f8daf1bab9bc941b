"""SageMaker's Model Registry: every accepted model version as a package in a model package group.

Not to be confused with the rest of ``headpose.registry``, which is the S3 pointer that
devices follow and the source of truth. The Model Registry mirrors it for AWS tooling
(SageMaker Studio, EventBridge rules on ``ModelApprovalStatus``, audits), and is always
written *after* the S3 state it reflects:

``PendingManualApproval``  while a person is asked (``approve_release``)
``Approved``               once ``latest.json`` names the version (``publish``, a rollback to it)
``Rejected``               when refused (a person, a timeout), not promoted, or rolled back from

A package is found again by its description, the version's immutable prefix
(``TFartifacts/<job>/output/``), so writing the same state twice changes nothing and a
cleared or retried task brings the Model Registry back in line with the pointer. Each
package names the model (``model.tar.gz`` with SageMaker's TensorFlow Serving image),
``report.json`` as its model-quality statistics, and in ``CustomerMetadataProperties`` the
published record (URI and sha256), the frozen graph's sha256, the accuracy on the
evaluation set and its id, the dataset and the channel order.

The Amazon provider's ``SageMakerRegisterModelVersionOperator`` does not fit here: it
creates a new version at every execute (a retried task would register the model twice),
deletes the group when a create fails, and declares ``text/csv`` where TensorFlow
Serving speaks JSON. The client is the provider's ``SageMakerHook`` connection in the
tasks, boto3's in the command line; boto3 is never imported here.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from headpose.registry.record import record_files

PENDING, APPROVED, REJECTED = "PendingManualApproval", "Approved", "Rejected"
# TensorFlow Serving's REST API: JSON requests ({"instances": ...}) and responses.
CONTENT_TYPES = ["application/json"]
# SageMaker's pattern for CustomerMetadataProperties values: letters, spaces, digits, _.:/=+-@.
_METADATA_UNSAFE = re.compile(r"[^\w\s.:/=+\-@]")
MAX_METADATA_ENTRIES, MAX_METADATA_VALUE = 50, 256
MAX_APPROVAL_DESCRIPTION = 1024
_TOKENS = uuid.UUID("4f6d2c1e-9a53-4c0e-8f0d-1b2a3c4d5e6f")  # the namespace of ClientTokens


@dataclass(frozen=True)
class ModelRegistry:
    """Where packages go: a SageMaker client and the deployment's ``model_package_group``.

    ``image_uri`` resolves the inference image; it is called only when a package is created
    (the sagemaker SDK's lookup costs seconds).
    """

    client: Any
    group: str
    image_uri: Callable[[], str]


def metadata_value(value: Any) -> str:
    """``value`` as SageMaker takes it: its characters only, at most 256 (``"{},`` and the like replaced)."""
    return _METADATA_UNSAFE.sub("-", str(value)).strip()[:MAX_METADATA_VALUE]


def package_metadata(record: Mapping[str, Any], published: Mapping[str, str] | None = None) -> dict[str, str]:
    """``CustomerMetadataProperties`` of a version: what identifies it, from its (would-be) record.

    ``published`` is ``{"uri", "sha256"}`` of the history record once the version is published.
    """
    metrics = record.get("metrics") or {}
    values = {
        "training_job_name": record.get("training_job_name"),
        "frozen_model_sha256": record_files(record)["frozen_model.pb"]["sha256"],
        "evaluation_accuracy": metrics.get("accuracy"),
        "evaluation_images": metrics.get("images"),
        "evaluation_set": (record.get("evaluation_set") or {}).get("id"),
        "dataset_id": (record.get("dataset") or {}).get("dataset_id"),
        "channel_order": record.get("channel_order"),
        "published_record_uri": (published or {}).get("uri"),
        "published_record_sha256": (published or {}).get("sha256"),
    }
    cleaned = {key: metadata_value(value) for key, value in values.items() if value is not None}
    return dict(list({k: v for k, v in cleaned.items() if v}.items())[:MAX_METADATA_ENTRIES])


def package_key(record: Mapping[str, Any]) -> str:
    """The description a version's package is found by: its immutable version prefix."""
    frozen = record_files(record)["frozen_model.pb"]["uri"]
    return frozen.rsplit("/", 1)[0] + "/"


def find_package(registry: ModelRegistry, key: str) -> dict[str, Any] | None:
    """The package of the version at ``key`` (its summary: ARN and status), None if there is none."""
    return next((p for p in _packages(registry) or [] if p.get("ModelPackageDescription") == key), None)


def _packages(registry: ModelRegistry) -> list[dict[str, Any]] | None:
    """Every package summary of the group; None when the group does not exist yet."""
    try:
        registry.client.describe_model_package_group(ModelPackageGroupName=registry.group)
    except Exception as error:  # botocore's ClientError; boto3 is not imported here
        if _is_missing(error):
            return None
        raise
    paginator = registry.client.get_paginator("list_model_packages")
    return [summary for page in paginator.paginate(ModelPackageGroupName=registry.group)
            for summary in page.get("ModelPackageSummaryList", [])]


def sync_package(
    registry: ModelRegistry, record: Mapping[str, Any], status: str, reason: str,
    published: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Make the package of ``record``'s version say ``status`` (creating it if it has none).

    ``{"model_package_group", "model_package_arn", "status"}``. Idempotent: the same call
    again finds the package and sets what it already holds.
    """
    key = package_key(record)
    metadata = package_metadata(record, published)
    description = reason[:MAX_APPROVAL_DESCRIPTION]
    packages = _packages(registry)
    found = next((p for p in packages or [] if p.get("ModelPackageDescription") == key), None)
    if found is None:
        if packages is None:
            _create_group(registry)
        arn = registry.client.create_model_package(
            ModelPackageGroupName=registry.group, ModelPackageDescription=key,
            InferenceSpecification={
                "Containers": [{"Image": registry.image_uri(), "ModelDataUrl": record["model_artifact_uri"]}],
                "SupportedContentTypes": CONTENT_TYPES, "SupportedResponseMIMETypes": CONTENT_TYPES,
            },
            ModelApprovalStatus=status, CustomerMetadataProperties=metadata,
            ModelMetrics={"ModelQuality": {"Statistics": {
                "ContentType": "application/json", "S3Uri": record_files(record)["report.json"]["uri"]}}},
            # SageMaker's own idempotency, for a create whose answer was lost.
            ClientToken=str(uuid.uuid5(_TOKENS, f"{registry.group} {key}")),
        )["ModelPackageArn"]
        if status != PENDING:  # CreateModelPackage takes no ApprovalDescription
            _update(registry, arn, status, description, metadata)
    else:
        arn = found["ModelPackageArn"]
        _update(registry, arn, status, description, metadata)
    return {"model_package_group": registry.group, "model_package_arn": arn, "status": status}


def _update(registry: ModelRegistry, arn: str, status: str, description: str, metadata: dict[str, str]) -> None:
    # The whole metadata every time: SageMaker merges it, moto replaces it; both end equal.
    registry.client.update_model_package(ModelPackageArn=arn, ModelApprovalStatus=status,
                                         ApprovalDescription=description, CustomerMetadataProperties=metadata)


def _create_group(registry: ModelRegistry) -> None:
    try:
        registry.client.create_model_package_group(
            ModelPackageGroupName=registry.group,
            ModelPackageGroupDescription="head-pose models: every version the pipeline accepted")
    except Exception as error:
        if "already exists" not in str(error):  # a concurrent run made it
            raise


def _is_missing(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    message = str(response.get("Error", {}).get("Message", ""))
    return response.get("Error", {}).get("Code") == "ValidationException" and (
        "does not exist" in message or "not found" in message.lower())
