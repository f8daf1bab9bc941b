"""The CreateTrainingJob request: accepted by a real SageMaker API endpoint, toolkit-shaped."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone

import boto3
import pytest

from headpose.planning.layout import RunLayout
from headpose.planning.rules import validate_run_params
from headpose.planning.plan import plan_run
from headpose.planning.request import (
    LOCAL_ROLE_ARN,
    LOCAL_TRAINING_IMAGE,
    image_uri_for_backend,
    metric_definitions,
    training_image_uri,
    training_job_request,
)

from support import ROOT

ARN = "arn:aws:iam::123456789012:role/SageMakerRole"
LOGICAL = datetime(2024, 5, 6, 7, 8, 9, 10_000, tzinfo=timezone.utc)
JOB = "deeplens-TF-headpose-2024-05-06-07-08-09-010"


def _sagemaker(endpoint: str):
    return boto3.client(
        "sagemaker", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


@pytest.fixture(scope="module")
def sagemaker_plan():
    # The tutorial's run: ResNet-50, 25000 steps of 200 (the documented production profile's values).
    return plan_run(
        {"backend": "sagemaker", "role_arn": ARN, "instance_type": "ml.g4dn.xlarge", "s3_bucket": "bkt",
         "resnet_size": 50, "base_filters": 64, "training_steps": 25000, "batch_size": 200,
         "evaluation_steps": 700},
        LOGICAL, region="us-east-1", dag_id="headpose_retraining",
        run_id="manual__2024-05-06T07:08:09.010000+00:00",
    )


def test_the_request_is_accepted_by_create_training_job(s3_endpoint, sagemaker_plan):
    request = sagemaker_plan["training_request"]
    client = _sagemaker(s3_endpoint)
    # Real HTTP to moto's server: botocore validates the request against the API model first.
    arn = client.create_training_job(**request)["TrainingJobArn"]
    assert arn.endswith(f"training-job/{JOB}")
    described = client.describe_training_job(TrainingJobName=JOB)
    assert described["HyperParameters"] == request["HyperParameters"]
    assert described["ResourceConfig"] == request["ResourceConfig"]
    assert described["InputDataConfig"][0]["DataSource"] == request["InputDataConfig"][0]["DataSource"]
    assert described["ModelArtifacts"]["S3ModelArtifacts"] == sagemaker_plan["model_artifact_uri"]
    assert described["AlgorithmSpecification"]["TrainingImage"] == request["AlgorithmSpecification"]["TrainingImage"]
    tags = client.list_tags(ResourceArn=arn)["Tags"]
    assert {"Key": "airflow-dag-id", "Value": "headpose_retraining"} in tags
    assert any(t["Key"] == "airflow-run-id" and t["Value"].startswith("manual__2024-05-06") for t in tags)


def test_the_request_follows_the_tutorial_and_the_toolkit(sagemaker_plan):
    request = sagemaker_plan["training_request"]
    layout = RunLayout.from_dict(sagemaker_plan)
    assert request["TrainingJobName"] == JOB == sagemaker_plan["training_job_name"]
    assert request["OutputDataConfig"] == {"S3OutputPath": "s3://bkt/headpose/TFartifacts"}
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 432000}
    assert request["ResourceConfig"] == {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100}
    assert request["RoleArn"] == ARN
    channel = request["InputDataConfig"][0]
    assert channel["ChannelName"] == "training"
    assert channel["DataSource"]["S3DataSource"]["S3DataType"] == "S3Prefix"
    assert channel["DataSource"]["S3DataSource"]["S3Uri"] == layout.dataset_prefix
    assert request["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    hps = request["HyperParameters"]
    assert all(isinstance(v, str) for v in hps.values())
    decoded = {k: json.loads(v) for k, v in hps.items()}  # every value is a JSON document
    assert decoded["sagemaker_program"] == "train.py"
    assert decoded["sagemaker_submit_directory"] == layout.sourcedir_uri
    assert decoded["sagemaker_region"] == "us-east-1"
    assert "model_dir" not in decoded  # an S3 model_dir makes the TF image call s3:GetBucketLocation
    assert {k: decoded[k] for k in ("training_steps", "evaluation_steps", "batch_size", "resnet_size",
                                    "base_filters")} == {
        "training_steps": 25000, "evaluation_steps": 700, "batch_size": 200, "resnet_size": 50,
        "base_filters": 64,
    }


def test_the_job_name_is_in_every_run_owned_uri(sagemaker_plan):
    shared = ("canary_pointer_uri", "stable_pointer_uri", "champion_pointer_uri")  # the channels: every run's
    for key, value in sagemaker_plan.items():
        if key.endswith("_uri") and not key.startswith("published_") and key not in shared:
            assert JOB in value, key


def test_metric_definitions_read_the_entry_points_log_lines():
    lines = [
        "metric: step=100 train_loss=1.2345 train_accuracy=0.5000",
        "metric: eval_loss=0.3456 eval_accuracy=0.9100",
        "metric: step=5 train_loss=nan train_accuracy=1e-05",
    ]
    found = {}
    for definition in metric_definitions():
        for line in lines:
            match = re.search(definition["Regex"], line)
            if match:
                found.setdefault(definition["Name"], []).append(match.group(1))
    assert found == {
        "train:loss": ["1.2345"],  # "nan" is no number to SageMaker either
        "train:accuracy": ["0.5000", "1e-05"],
        "eval:loss": ["0.3456"],
        "eval:accuracy": ["0.9100"],
    }


def test_training_images_are_tensorflow_2_21_for_the_instance_type():
    gpu = training_image_uri("us-east-1", "ml.g4dn.xlarge")
    cpu = training_image_uri("eu-west-1", "ml.m5.xlarge")
    assert re.search(r"/tensorflow-training:2\.21[.\d]*-gpu-py312", gpu), gpu
    assert re.search(r"/tensorflow-training:2\.21[.\d]*-cpu-py312", cpu), cpu
    assert ".eu-west-1." in cpu
    assert image_uri_for_backend("sagemaker", "us-east-1", "ml.g4dn.xlarge") == gpu


def test_local_backend_plans_without_importing_the_sagemaker_sdk(tmp_path):
    # plan_run is the first task of every run; for the local backend it must not pay
    # the SDK's import (seconds) for an image URI that nothing uses.
    script = (
        "import sys; from datetime import datetime, timezone\n"
        "from headpose.planning.plan import plan_run\n"
        "plan = plan_run({'backend': 'local'}, datetime(2026, 1, 2, tzinfo=timezone.utc),\n"
        "                region='us-east-1', dag_id='d', run_id='r')\n"
        "print(plan['training_request']['AlgorithmSpecification']['TrainingImage'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sagemaker'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "include"), "HEADPOSE_WORKSPACE": str(tmp_path)},
    )
    assert done.stdout.splitlines() == [LOCAL_TRAINING_IMAGE, "[]"], done.stdout


def test_local_backend_request_needs_no_role():
    params = validate_run_params({})
    layout = RunLayout.for_run("bkt", "headpose", JOB, "s3://bkt/headpose/datasets/x/")
    request = training_job_request(layout, params, "image", region="us-east-1")
    assert request["RoleArn"] == LOCAL_ROLE_ARN


def test_run_ids_with_odd_characters_become_valid_tags():
    params = validate_run_params({})
    layout = RunLayout.for_run("bkt", "headpose", JOB, "s3://bkt/headpose/datasets/x/")
    request = training_job_request(layout, params, "image", region="us-east-1", run_id="api run #1 (retry)")
    value = next(t["Value"] for t in request["Tags"] if t["Key"] == "airflow-run-id")
    assert re.fullmatch(r"[\w .:/=+\-@]*", value)


def test_a_region_without_an_image_is_a_parameter_error_not_a_crash():
    from headpose.planning.rules import RunParamsError

    with pytest.raises(RunParamsError, match="no TensorFlow training image"):
        plan_run({"backend": "sagemaker", "role_arn": ARN, "instance_type": "ml.g4dn.xlarge"},
                 LOGICAL, region="xx-nowhere-1", dag_id="d", run_id="r")


def test_the_spot_request_is_accepted_by_create_training_job(s3_endpoint):
    plan = plan_run(
        {"backend": "sagemaker", "role_arn": ARN, "s3_bucket": "bkt", "use_spot_instances": True,
         "max_run_seconds": 7200, "max_wait_seconds": 10800},
        LOGICAL, region="us-east-1", dag_id="headpose_retraining", run_id="r",
    )
    request = plan["training_request"]
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 10800}
    # Checkpoints live under the job's own prefix, beside its output, and the entry point
    # is told the local folder SageMaker syncs with it.
    assert request["CheckpointConfig"] == {
        "S3Uri": f"s3://bkt/headpose/TFartifacts/{JOB}/checkpoints", "LocalPath": "/opt/ml/checkpoints",
    }
    assert json.loads(request["HyperParameters"]["checkpoint_dir"]) == "/opt/ml/checkpoints"
    client = _sagemaker(s3_endpoint)
    client.create_training_job(**request)
    described = client.describe_training_job(TrainingJobName=JOB)
    assert described["EnableManagedSpotTraining"] is True
    assert described["CheckpointConfig"]["S3Uri"] == request["CheckpointConfig"]["S3Uri"]
    assert described["StoppingCondition"]["MaxWaitTimeInSeconds"] == 10800


def test_without_spot_the_request_has_no_spot_fields(sagemaker_plan):
    request = sagemaker_plan["training_request"]
    assert "EnableManagedSpotTraining" not in request and "CheckpointConfig" not in request
    assert "checkpoint_dir" not in request["HyperParameters"]
    assert "MaxWaitTimeInSeconds" not in request["StoppingCondition"]


def test_the_default_instance_type_has_a_tensorflow_2_21_gpu_image():
    plan = plan_run({"backend": "sagemaker", "role_arn": ARN}, LOGICAL, region="us-east-1",
                    dag_id="d", run_id="r")
    request = plan["training_request"]
    assert request["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert re.search(r"/tensorflow-training:2\.21[.\d]*-gpu-py312", request["AlgorithmSpecification"]["TrainingImage"])


def test_without_role_arn_the_request_takes_the_connections_role_and_without_either_plan_run_refuses():
    role = "arn:aws:iam::123456789012:role/FromTheConnection"
    plan = plan_run({"backend": "sagemaker"}, LOGICAL, region="us-east-1", dag_id="d", run_id="r",
                    connection_role=role)
    assert plan["training_request"]["RoleArn"] == role
    from headpose.planning.rules import RunParamsError

    with pytest.raises(RunParamsError, match="needs the SageMaker execution role"):
        plan_run({"backend": "sagemaker"}, LOGICAL, region="us-east-1", dag_id="d", run_id="r")


def _speed(**params) -> dict:
    plan = plan_run({"role_arn": ARN, **params}, LOGICAL, region="us-east-1", dag_id="d", run_id="r")
    hps = plan["training_request"]["HyperParameters"]
    return {"dtype_policy": json.loads(hps["dtype_policy"]), "jit_compile": json.loads(hps["jit_compile"])}


@pytest.mark.parametrize("instance_type", ["ml.g4dn.xlarge", "ml.g5.2xlarge", "ml.p3.2xlarge", "ml.p4d.24xlarge"])
def test_gpu_instance_types_train_in_mixed_precision_with_xla_by_default(instance_type):
    assert _speed(backend="sagemaker", instance_type=instance_type) == {
        "dtype_policy": "mixed_float16", "jit_compile": 1}


@pytest.mark.parametrize("params", [
    {"backend": "sagemaker", "instance_type": "ml.m5.xlarge"},  # a CPU type
    {"backend": "sagemaker", "instance_type": "ml.c5.4xlarge"},
    {"backend": "local", "instance_type": "ml.g4dn.xlarge"},  # the worker's own hardware
])
def test_elsewhere_auto_means_float32_without_xla(params):
    assert _speed(**params) == {"dtype_policy": "float32", "jit_compile": 0}


def test_only_the_g_and_p_families_count_as_gpu_types():
    from headpose.planning.request import is_gpu_instance_type

    assert [t for t in ("ml.g4dn.xlarge", "ml.g6e.xlarge", "ml.p5.48xlarge", "ml.m5.xlarge",
                        "ml.trn1.2xlarge", "ml.inf2.xlarge", "ml.c7i.large") if is_gpu_instance_type(t)] == [
        "ml.g4dn.xlarge", "ml.g6e.xlarge", "ml.p5.48xlarge"]


def test_each_speed_switch_is_turned_on_or_off_by_its_own_parameter():
    gpu = {"backend": "sagemaker", "instance_type": "ml.g5.xlarge"}
    assert _speed(**gpu, mixed_precision="off") == {"dtype_policy": "float32", "jit_compile": 1}
    assert _speed(**gpu, xla="off") == {"dtype_policy": "mixed_float16", "jit_compile": 0}
    assert _speed(backend="local", mixed_precision="on", xla="on") == {
        "dtype_policy": "mixed_float16", "jit_compile": 1}
    from headpose.planning.rules import RunParamsError

    with pytest.raises(RunParamsError, match="mixed_precision='yes'"):
        _speed(backend="local", mixed_precision="yes")


def test_the_speed_and_channel_order_hyperparameters_are_ones_the_entry_point_takes():
    from headpose.training.entry import argument_parser

    plan = plan_run({"backend": "sagemaker", "role_arn": ARN}, LOGICAL, region="us-east-1", dag_id="d", run_id="r")
    hps = plan["training_request"]["HyperParameters"]
    parser = argument_parser()
    choices = {action.dest: action.choices for action in parser._actions}
    for name in ("dtype_policy", "jit_compile", "channel_order"):
        assert json.loads(hps[name]) in choices[name], name
    assert json.loads(hps["channel_order"]) == "bgr"


def test_the_channel_order_param_reaches_the_request():
    # The channel_order run parameter belongs to the datasets; whatever it says is trained on.
    params = {**validate_run_params({}), "channel_order": "rgb"}
    layout = RunLayout.for_run("bkt", "headpose", JOB, "s3://bkt/headpose/datasets/x/")
    request = training_job_request(layout, params, "image", region="us-east-1")
    assert json.loads(request["HyperParameters"]["channel_order"]) == "rgb"


@pytest.mark.parametrize("params", [
    # Every GPU of four g5.12xlarge hosts (16 A10G), on spot, checkpoints shared by the hosts.
    {"instance_type": "ml.g5.12xlarge", "instance_count": 4, "use_spot_instances": True,
     "max_run_seconds": 7200, "max_wait_seconds": 10800},
    {"instance_type": "ml.p4d.24xlarge", "instance_count": 2, "images_per_shard": 500},
])
def test_multi_instance_requests_are_accepted_by_create_training_job(s3_endpoint, params):
    plan = plan_run({"backend": "sagemaker", "role_arn": ARN, "s3_bucket": "bkt", **params},
                    LOGICAL, region="us-east-1", dag_id="headpose_retraining", run_id="r")
    request = plan["training_request"]
    assert request["ResourceConfig"]["InstanceCount"] == params["instance_count"]
    # The flag SageMaker's TensorFlow image writes TF_CONFIG on, JSON-encoded like every value;
    # test_entry_point checks what the toolkit hands the program for it.
    assert json.loads(request["HyperParameters"]["sagemaker_multi_worker_mirrored_strategy_enabled"]) is True
    # Every host gets the whole channel and reads its own share of the shards.
    assert request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3DataDistributionType"] == "FullyReplicated"
    client = _sagemaker(s3_endpoint)
    client.create_training_job(**request)  # botocore validates the request against the service model first
    described = client.describe_training_job(TrainingJobName=JOB)
    assert described["ResourceConfig"] == request["ResourceConfig"]
    assert described["HyperParameters"] == request["HyperParameters"]


def test_one_instance_requests_do_not_carry_the_multi_worker_flag(sagemaker_plan):
    assert "sagemaker_multi_worker_mirrored_strategy_enabled" not in sagemaker_plan["training_request"]["HyperParameters"]
