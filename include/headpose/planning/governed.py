"""What a governed AWS account asks of a run's training job, from the deployment settings.

``governed_request`` adds to the CreateTrainingJob request (``planning.request``) what
the profile's settings say: ``VpcConfig`` (``vpc_subnets`` and ``vpc_security_groups``),
the KMS key of the output and of the training volume (``kms_key_id``), inter-container
traffic encryption, and network isolation. An isolated container reaches nothing - S3
included - so the toolkit cannot download ``sagemaker_submit_directory`` itself: the code
then comes as an input channel (``code``), which SageMaker's platform downloads with the
execution role, and ``sagemaker_submit_directory`` names the archive in it. The toolkit
extracts a local archive as it would a downloaded one.

``deployment_problems`` are the rules these settings keep, checked by ``plan_run`` with
the others. Standard library only.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any, Mapping

from headpose.planning.profile import DeploymentSettings

CODE_CHANNEL = "code"
CODE_CHANNEL_PATH = "/opt/ml/input/data/" + CODE_CHANNEL
SUBMIT_DIRECTORY = "sagemaker_submit_directory"
# Instance families with local NVMe storage: SageMaker refuses a VolumeKmsKeyId for them,
# because their volumes are encrypted by the instance's hardware (AWS's KmsKeyId docs).
INSTANCE_STORE_TYPE = re.compile(r"^ml\.(g4dn|g4ad|g5|g6|g6e|p3dn|p4d|p4de|p5|p5e|p5en|m5d|c5d|r5d|trn1|trn1n|trn2|inf2)\.")
_KMS_REGION = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):")


def governed_request(
    request: Mapping[str, Any], settings: DeploymentSettings, sourcedir_uri: str,
) -> dict[str, Any]:
    """``request`` with the deployment's VPC, KMS, encryption and isolation settings in it."""
    governed = copy.deepcopy(dict(request))
    if settings.vpc_subnets and settings.vpc_security_groups:
        governed["VpcConfig"] = {"SecurityGroupIds": list(settings.vpc_security_groups),
                                 "Subnets": list(settings.vpc_subnets)}
    if settings.kms_key_id:
        governed["OutputDataConfig"]["KmsKeyId"] = settings.kms_key_id
        if not INSTANCE_STORE_TYPE.match(governed["ResourceConfig"]["InstanceType"]):
            governed["ResourceConfig"]["VolumeKmsKeyId"] = settings.kms_key_id
    if settings.inter_container_encryption:
        governed["EnableInterContainerTrafficEncryption"] = True
    governed["EnableNetworkIsolation"] = bool(settings.network_isolation)
    if settings.network_isolation:
        folder, archive = sourcedir_uri.rsplit("/", 1)
        governed["InputDataConfig"].append({
            "ChannelName": CODE_CHANNEL,
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": folder + "/",
                                            "S3DataDistributionType": "FullyReplicated"}},
            "ContentType": "application/x-tar",
            "CompressionType": "None",
            "InputMode": "File",
        })
        governed["HyperParameters"][SUBMIT_DIRECTORY] = json.dumps(f"{CODE_CHANNEL_PATH}/{archive}")
    return governed


def code_source_uri(request: Mapping[str, Any]) -> str | None:
    """The ``s3://`` URI of the request's code: the hyperparameter, or the archive in the code channel."""
    encoded = (request.get("HyperParameters") or {}).get(SUBMIT_DIRECTORY)
    try:
        uri = json.loads(encoded) if encoded is not None else None
    except ValueError:
        uri = encoded
    if not isinstance(uri, str) or not uri.startswith(CODE_CHANNEL_PATH + "/"):
        return uri
    for channel in request.get("InputDataConfig", []):
        if channel["ChannelName"] == CODE_CHANNEL:
            return channel["DataSource"]["S3DataSource"]["S3Uri"].rstrip("/") + "/" + uri.rsplit("/", 1)[1]
    return uri


def deployment_problems(settings: DeploymentSettings, params: Mapping[str, Any], region: str) -> list[str]:
    """What in the deployment settings cannot work for this run, in words."""
    problems = []
    if bool(settings.vpc_subnets) != bool(settings.vpc_security_groups):
        problems.append(
            "vpc_subnets and vpc_security_groups go together: SageMaker's VpcConfig needs both "
            f"(the profile sets only {'vpc_subnets' if settings.vpc_subnets else 'vpc_security_groups'})"
        )
    key_region = _KMS_REGION.match(settings.kms_key_id or "")
    if key_region and params.get("backend") == "sagemaker" and key_region.group(1) != region:
        problems.append(
            f"kms_key_id {settings.kms_key_id} is a key of {key_region.group(1)}, but the training jobs run "
            f"in {region}: SageMaker and S3 use a key of the job's and the bucket's own region"
        )
    return problems


def with_checksums(
    request: Mapping[str, Any], manifest_sha256: str | None, source_sha256s: Mapping[str, str] | None,
) -> dict[str, Any]:
    """``request`` telling the entry point what to verify before its first step.

    ``manifest_sha256`` is the dataset manifest's (``stage_dataset`` recorded it; the
    manifest lists every shard's sha256), ``source_sha256s`` each file of the code
    (``package_code`` packed them). The job may start days after they were recorded (a spot
    wait), so the entry point checks what it was actually given (``training.integrity``).
    """
    checked = copy.deepcopy(dict(request))
    if manifest_sha256:
        checked["HyperParameters"]["manifest_sha256"] = json.dumps(manifest_sha256)
    if source_sha256s:
        # A JSON document inside the JSON string the toolkit decodes: the program gets it whole.
        checked["HyperParameters"]["source_sha256s"] = json.dumps(json.dumps(dict(source_sha256s), sort_keys=True))
    return checked
