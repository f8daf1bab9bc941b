"""A governed AWS account: VPC, KMS, encryption and isolation in the request, refused where they cannot work.

botocore's own service model judges every request (several regions, spot and not, each
setting on and off); one is also sent to moto's SageMaker over HTTP.
"""
from __future__ import annotations

import itertools
import json
from datetime import datetime, timezone

import boto3
import pytest
from botocore.session import get_session
from botocore.validate import validate_parameters

from headpose.planning.governed import CODE_CHANNEL, code_source_uri
from headpose.planning.plan import plan_run
from headpose.planning.rules import RunParamsError

ARN = "arn:aws:iam::123456789012:role/SageMakerRole"
LOGICAL = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
SUBNETS = ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]
GROUPS = ["sg-0123456789abcdef0"]


def _key(region: str) -> str:
    return f"arn:aws:kms:{region}:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def _profile(**settings) -> dict[str, str]:
    return {"HEADPOSE_RUN_DEFAULTS": json.dumps(settings), "HEADPOSE_S3_BUCKET": "bkt"}


def _plan(region: str = "us-east-1", params: dict | None = None, **settings) -> dict:
    return plan_run({"backend": "sagemaker", "role_arn": ARN, **(params or {})}, LOGICAL, region=region,
                    dag_id="headpose_retraining", run_id="r", environ=_profile(**settings))


ALL_ON = {"vpc_subnets": SUBNETS, "vpc_security_groups": GROUPS, "inter_container_encryption": True,
          "network_isolation": True, "object_lock_days": 30}


@pytest.mark.parametrize("region, spot, on", list(itertools.product(
    ["us-east-1", "eu-west-1", "ap-southeast-2"], [False, True], [False, True])))
def test_botocores_service_model_accepts_the_request_with_every_setting_on_and_off(region, spot, on):
    settings = {**ALL_ON, "kms_key_id": _key(region)} if on else {}
    params = {"use_spot_instances": True, "max_run_seconds": 7200, "max_wait_seconds": 10800} if spot else {}
    request = _plan(region, params, **settings)["training_request"]
    shape = get_session().get_service_model("sagemaker").operation_model("CreateTrainingJob").input_shape
    validate_parameters(request, shape)  # raises ParamValidationError naming every bad field
    assert ("VpcConfig" in request) is on and request["EnableNetworkIsolation"] is on
    assert request.get("EnableInterContainerTrafficEncryption", False) is on
    assert request["OutputDataConfig"].get("KmsKeyId") == (_key(region) if on else None)
    assert ("CheckpointConfig" in request) is spot


def test_every_setting_reaches_sagemaker(s3_endpoint):
    plan = _plan("us-east-1", {"instance_type": "ml.m5.xlarge"}, **ALL_ON, kms_key_id=_key("us-east-1"))
    request = plan["training_request"]
    client = boto3.client("sagemaker", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_training_job(**request)
    described = client.describe_training_job(TrainingJobName=plan["training_job_name"])
    assert described["VpcConfig"] == {"SecurityGroupIds": GROUPS, "Subnets": SUBNETS}
    assert described["OutputDataConfig"]["KmsKeyId"] == _key("us-east-1")
    assert described["ResourceConfig"]["VolumeKmsKeyId"] == _key("us-east-1")
    assert described["EnableNetworkIsolation"] is True and described["EnableInterContainerTrafficEncryption"] is True
    assert plan["kms_key_id"] == _key("us-east-1")  # the tasks' S3 writes use it too


def test_instance_types_with_local_storage_get_no_volume_key():
    # SageMaker refuses VolumeKmsKeyId for them: their NVMe volumes are encrypted by the hardware.
    request = _plan(params={"instance_type": "ml.g4dn.xlarge"}, kms_key_id=_key("us-east-1"))["training_request"]
    assert "VolumeKmsKeyId" not in request["ResourceConfig"] and request["OutputDataConfig"]["KmsKeyId"]


def test_an_isolated_job_gets_its_code_as_an_input_channel():
    plan = _plan(network_isolation=True)
    request = plan["training_request"]
    channel = next(c for c in request["InputDataConfig"] if c["ChannelName"] == CODE_CHANNEL)
    assert channel["DataSource"]["S3DataSource"]["S3Uri"] == plan["sourcedir_uri"].rsplit("/", 1)[0] + "/"
    assert json.loads(request["HyperParameters"]["sagemaker_submit_directory"]) == \
        "/opt/ml/input/data/code/sourcedir.tar.gz"
    # What the worker verifies (and the local backend downloads) is still the packed object.
    assert code_source_uri(request) == plan["sourcedir_uri"]


@pytest.mark.parametrize("settings, params, reason", [
    ({"vpc_subnets": SUBNETS}, {}, "vpc_subnets and vpc_security_groups go together"),
    ({"kms_key_id": _key("eu-west-1")}, {}, "is a key of eu-west-1, but the training jobs run in us-east-1"),
    ({}, {"dataset_source": "s3://other-bucket/prima/"}, "the execution role reads datasets under s3://bkt/headpose/datasets/"),
])
def test_what_cannot_work_is_refused_by_plan_run(settings, params, reason):
    with pytest.raises(RunParamsError, match=reason):
        _plan(params=params, **settings)


@pytest.mark.parametrize("setting", ["vpc_subnets", "kms_key_id", "network_isolation", "object_lock_days"])
def test_the_settings_are_refused_in_a_triggers_conf(setting):
    with pytest.raises(RunParamsError, match=rf"\['{setting}'\] is a deployment setting"):
        plan_run({setting: None}, LOGICAL, region="us-east-1", dag_id="d", run_id="r")


@pytest.mark.parametrize("settings, reason", [
    ({"vpc_subnets": ["subnet-xyz"]}, "subnet ids"),
    ({"kms_key_id": "alias/headpose"}, "a KMS key ARN"),
    ({"object_lock_days": -1}, "less than the minimum"),
])
def test_a_profile_with_malformed_settings_is_refused(settings, reason):
    from headpose.planning.profile import ProfileError, load_profile

    with pytest.raises(ProfileError, match=reason):
        load_profile(_profile(**settings))


def test_a_local_run_keeps_its_dataset_anywhere():
    # The role's rule is SageMaker's; the local backend reads with the worker's credentials.
    plan = plan_run({"dataset_source": "s3://other-bucket/tiny/"}, LOGICAL, region="us-east-1", dag_id="d",
                    run_id="r", environ={"HEADPOSE_S3_BUCKET": "bkt"})
    assert plan["dataset_prefix"] == "s3://other-bucket/tiny/"
