"""Bad trigger parameters are refused with a clear message before any task runs.

Two gates: Airflow validates each value against its ``Param`` schema when the run is
created (the trigger form, the REST API and ``airflow dags test -c`` all go through
``create_dagrun``), so a bad value never gets a run, let alone a task. Rules across
fields, which a per-field schema cannot state, are checked by ``validate_run_params``
in ``plan_run``, before any cloud call. (``test_e2e`` also refuses a bad conf through
the real ``airflow dags test`` command.)
"""
from __future__ import annotations

import re

import pytest

from airflow_support import load_dag, scheduler_dag
from headpose.planning.params import param_schemas
from headpose.planning.rules import RunParamsError, validate_run_params

ARN = "arn:aws:iam::123456789012:role/service-role/SageMakerRole"

# (case, conf, the parameter the message must name)
BAD_VALUES = [
    ("uppercase bucket", {"s3_bucket": "Headpose_Models"}, "s3_bucket"),
    ("short bucket", {"s3_bucket": "ab"}, "s3_bucket"),
    ("bucket not a string", {"s3_bucket": 12345}, "s3_bucket"),
    ("folder with a slash", {"headpose_folder": "a/b"}, "headpose_folder"),
    ("unknown backend", {"backend": "kubernetes"}, "backend"),
    ("unknown dataset source", {"dataset_source": "ftp://server/data"}, "dataset_source"),
    ("zero training steps", {"training_steps": 0}, "training_steps"),
    ("negative evaluation steps", {"evaluation_steps": -5}, "evaluation_steps"),
    ("steps as a string", {"training_steps": "100"}, "training_steps"),
    ("fractional steps", {"training_steps": 2.5}, "training_steps"),
    ("zero batch size", {"batch_size": 0}, "batch_size"),
    ("unsupported ResNet depth", {"resnet_size": 20}, "resnet_size"),
    ("too few base filters", {"base_filters": 2}, "base_filters"),
    ("instance type without ml.", {"instance_type": "p3.2xlarge"}, "instance_type"),
    ("more instances than any quota", {"instance_count": 17}, "instance_count"),
    ("zero volume", {"volume_size_gb": 0}, "volume_size_gb"),
    ("run time over 28 days", {"max_run_seconds": 3_000_000}, "max_run_seconds"),
    ("role that is not an ARN", {"role_arn": "SageMakerRole"}, "role_arn"),
    ("accuracy above 1", {"min_accuracy": 1.5}, "min_accuracy"),
    ("accuracy as text", {"min_accuracy": "high"}, "min_accuracy"),
    ("no synthetic eval images", {"synthetic_eval_per_pose": 0}, "synthetic_eval_per_pose"),
    ("spot flag as text", {"use_spot_instances": "yes"}, "use_spot_instances"),
    ("spot wait over 30 days", {"max_wait_seconds": 3_000_000}, "max_wait_seconds"),
]

# Issue 6 (operations): more formats and the acceptance parameters, all refused by Airflow
# when the run is created, so no task ever runs.
BAD_VALUES += [
    ("bucket too long", {"s3_bucket": "a" * 64}, "s3_bucket"),
    ("bucket with an underscore", {"s3_bucket": "head_pose"}, "s3_bucket"),
    ("bucket starting with a hyphen", {"s3_bucket": "-headpose"}, "s3_bucket"),
    ("folder that climbs", {"headpose_folder": ".."}, "headpose_folder"),
    ("dataset bucket in capitals", {"dataset_source": "s3://My-Bucket/datasets/"}, "dataset_source"),
    ("dataset prefix with a space", {"dataset_source": "s3://my-bucket/my data/"}, "dataset_source"),
    ("role ARN of a user", {"role_arn": "arn:aws:iam::123456789012:user/alice"}, "role_arn"),
    ("role ARN with a short account", {"role_arn": "arn:aws:iam::1234:role/SageMakerRole"}, "role_arn"),
    ("role ARN of another service", {"role_arn": "arn:aws:s3:::123456789012:role/SageMakerRole"}, "role_arn"),
    ("backend in capitals", {"backend": "LOCAL"}, "backend"),
    ("ResNet depth as text", {"resnet_size": "50"}, "resnet_size"),
    ("instance type in capitals", {"instance_type": "ML.G4DN.XLARGE"}, "instance_type"),
    ("training steps over the ceiling", {"training_steps": 10_000_001}, "training_steps"),
    ("negative seed", {"seed": -1}, "seed"),
    ("no accuracy", {"min_accuracy": None}, "min_accuracy"),
    ("negative promotion margin", {"promotion_margin": -0.1}, "promotion_margin"),
    ("promotion margin above 1", {"promotion_margin": 2}, "promotion_margin"),
    ("force_publish as text", {"force_publish": "true"}, "force_publish"),
    ("force_publish as a number", {"force_publish": 1}, "force_publish"),
    ("no images per shard", {"images_per_shard": 0}, "images_per_shard"),
]
# Names that pass the trigger form's length-and-alphabet check but break S3's other naming
# rules: plan_run refuses them, in words (as JSON-schema keywords they made Airflow's refusal
# print a page of regexes).
NAMING_RULES = [
    ("IP-shaped bucket", {"s3_bucket": "192.168.10.1"}),
    ("bucket with ..", {"s3_bucket": "head..pose"}),
    ("bucket with .-", {"s3_bucket": "head.-pose"}),
    ("reserved bucket prefix", {"s3_bucket": "xn--headpose"}),
    ("reserved bucket suffix", {"s3_bucket": "headpose-s3alias"}),
]
# Names the DAG does not have: Airflow accepts any extra conf key, so plan_run refuses them,
# before any AWS call (a misspelt name would otherwise silently run with the default).
UNKNOWN_NAMES = [{"s3bucket": "models"}, {"force": True}, {"training_steps": 5, "learning_rate": 0.1}]

GOOD_CONFS = [
    {},
    {"resnet_size": 10, "base_filters": 8, "training_steps": 5, "evaluation_steps": 2, "batch_size": 16,
     "min_accuracy": 0, "synthetic_train_per_pose": 1, "synthetic_eval_per_pose": 1},
    {"backend": "sagemaker", "role_arn": ARN, "instance_type": "ml.g4dn.xlarge"},
    {"backend": "sagemaker", "role_arn": ARN, "use_spot_instances": True, "max_run_seconds": 3600,
     "max_wait_seconds": 7200},
    {"dataset_source": "s3://my-data-bucket/headpose/datasets/prima-v1/", "s3_bucket": "my.bucket-01"},
    {"dataset_source": "prima", "prima_archive_uri": "s3://raw-data/prima/HeadPoseImageDatabase.tar.gz", "headpose_folder": "headpose_v2", "min_accuracy": 1},
]


@pytest.fixture(scope="module")
def run_params():
    """The DAG's params as ``create_dagrun`` sees them."""
    return scheduler_dag(load_dag()).params


@pytest.mark.parametrize("case, conf, name", BAD_VALUES, ids=[c for c, _, _ in BAD_VALUES])
def test_airflow_refuses_a_bad_value_when_the_run_is_created(run_params, case, conf, name):
    from airflow.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError) as refused:
        run_params.deep_merge(conf).validate()
    message = str(refused.value)
    assert f"Invalid input for param {name}" in message
    assert repr(conf[name]) in message or str(conf[name]) in message


@pytest.mark.parametrize("case, conf, name", BAD_VALUES, ids=[c for c, _, _ in BAD_VALUES])
def test_plan_run_refuses_the_same_values(case, conf, name):
    with pytest.raises(RunParamsError, match=name):
        validate_run_params(conf)


@pytest.mark.parametrize("conf", GOOD_CONFS)
def test_good_confs_are_accepted_by_both_gates(run_params, conf):
    resolved = run_params.deep_merge(conf).validate()
    assert validate_run_params(conf) == {k: resolved[k] for k in param_schemas()}


@pytest.mark.parametrize("conf, fragment", [
    ({"backend": "sagemaker", "role_arn": ARN, "instance_type": "ml.p2.xlarge"}, "P2 instances"),
    ({"backend": "local", "use_spot_instances": True}, "use_spot_instances needs backend=sagemaker"),
    ({"backend": "sagemaker", "use_spot_instances": True, "max_run_seconds": 7200, "max_wait_seconds": 3600},
     "MaxWaitTimeInSeconds >= MaxRuntimeInSeconds"),
    ({"trainig_steps": 10}, "unknown parameter(s) ['trainig_steps']"),
    ({"dataset_source": "s3://a..b/data/"}, "dataset_source"),
])
def test_cross_field_rules_are_refused_before_any_cloud_call(conf, fragment):
    with pytest.raises(RunParamsError) as refused:
        validate_run_params(conf)
    assert fragment in str(refused.value)


def test_validate_run_params_lists_every_problem_at_once():
    with pytest.raises(RunParamsError) as refused:
        validate_run_params({"training_steps": 0, "batch_size": 0, "backend": "x"})
    message = str(refused.value)
    assert "training_steps" in message and "batch_size" in message and "backend" in message


def test_built_in_defaults_are_the_embedded_demo_and_name_no_bucket(run_params, monkeypatch):
    defaults = run_params.deep_merge({}).validate()
    assert {k: defaults[k] for k in (
        "backend", "dataset_source", "resnet_size", "base_filters", "batch_size", "training_steps",
        "channel_order", "min_accuracy", "base_job_name",
    )} == {
        "backend": "local", "dataset_source": "synthetic", "resnet_size": 10, "base_filters": 8,
        "batch_size": 64, "training_steps": 1000, "channel_order": "bgr", "min_accuracy": 0.75,
        "base_job_name": "deeplens-TF-headpose",
    }
    monkeypatch.delenv("HEADPOSE_S3_BUCKET")
    assert param_schemas()["s3_bucket"]["default"] is None
    with pytest.raises(RunParamsError, match="no S3 bucket"):
        validate_run_params({})


@pytest.mark.parametrize("case, conf", NAMING_RULES, ids=[c for c, _ in NAMING_RULES])
def test_plan_run_refuses_what_the_form_lets_through_in_words(run_params, case, conf):
    run_params.deep_merge(conf).validate()  # length and alphabet are fine
    with pytest.raises(RunParamsError) as refused:
        validate_run_params(conf)
    assert f"s3_bucket={conf['s3_bucket']!r} breaks S3's naming rules" in str(refused.value)
    assert "reserved prefixes" in str(refused.value)


def test_a_refused_value_names_the_field_without_a_page_of_regexes(run_params):
    from airflow.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError) as refused:
        run_params.deep_merge({"s3_bucket": "Bad_Bucket"}).validate()
    assert "Invalid input for param s3_bucket" in str(refused.value)
    assert "anyOf" not in str(refused.value) and len(str(refused.value)) < 600


def test_a_sagemaker_run_needs_a_role_from_the_trigger_or_the_connection():
    with pytest.raises(RunParamsError, match="needs the SageMaker execution role"):
        validate_run_params({"backend": "sagemaker"})
    values = validate_run_params({"backend": "sagemaker"}, connection_role=ARN)
    assert values["role_arn"] is None  # plan_run puts the connection's role in the request


@pytest.mark.parametrize("conf, fragment", [
    # Several CPU instances: slower than one GPU, and what several hosts are for is GPUs.
    ({"backend": "sagemaker", "role_arn": ARN, "instance_count": 2, "instance_type": "ml.m5.4xlarge"},
     "instance_count=2 with instance_type='ml.m5.4xlarge', which has no GPU"),
    ({"backend": "local", "instance_count": 3}, "the local backend runs at most 2 hosts"),
    # 93 poses x 10 images = 930 training images: one shard of 1000, none for a second host.
    ({"backend": "local", "instance_count": 2, "synthetic_train_per_pose": 10},
     "needs a training shard per host, but the synthetic dataset's 930 training images make 1 shard(s) of "
     "images_per_shard=1000: set images_per_shard to at most 465"),
])
def test_instance_counts_that_cannot_work_are_refused(conf, fragment):
    with pytest.raises(RunParamsError) as refused:
        validate_run_params(conf)
    assert fragment in str(refused.value)


@pytest.mark.parametrize("conf", [
    {"backend": "sagemaker", "role_arn": ARN, "instance_count": 4, "instance_type": "ml.g5.12xlarge"},
    {"backend": "local", "instance_count": 2, "synthetic_train_per_pose": 10, "images_per_shard": 465},
    {"backend": "local", "instance_count": 2, "dataset_source": "s3://data-bucket/headpose/datasets/x/"},
])
def test_instance_counts_that_work_are_accepted(conf):
    assert validate_run_params(conf)["instance_count"] == conf["instance_count"]


def test_spot_training_is_off_by_default(run_params):
    defaults = run_params.deep_merge({}).validate()
    assert defaults["use_spot_instances"] is False
    assert defaults["max_wait_seconds"] >= defaults["max_run_seconds"]


def test_every_param_is_typed_and_described():
    dag = load_dag()
    for name in param_schemas():
        param = dag.params.get_param(name)
        assert param.schema.get("type"), name
        assert param.description and len(param.description) > 20, name
        assert param.schema.get("title"), name


def test_bucket_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("HEADPOSE_S3_BUCKET", "team-models")
    assert param_schemas()["s3_bucket"]["default"] == "team-models"
    monkeypatch.delenv("HEADPOSE_S3_BUCKET")
    assert param_schemas()["s3_bucket"]["default"] is None


@pytest.mark.parametrize("bucket", [
    "headpose-models", "abc", "a.b-c", "a" * 63, "ab", "a" * 64, "Headpose", "head_pose", "-abc",
    "abc-", "a..b", "192.168.1.1", "xn--abc", "sthree-abc", "abc-s3alias", "abc--ol-s3", "a.-b",
    "1.2.3", "amzn-s3-demo-x",
])
def test_the_form_never_refuses_a_valid_bucket_and_plan_run_refuses_every_invalid_one(bucket):
    import jsonschema

    from headpose.planning.layout import BUCKET_NAME_SCHEMA, is_valid_bucket_name

    if is_valid_bucket_name(bucket):
        assert jsonschema.Draft7Validator(BUCKET_NAME_SCHEMA).is_valid(bucket)
        validate_run_params({"s3_bucket": bucket})
    else:
        with pytest.raises(RunParamsError, match="s3_bucket"):
            validate_run_params({"s3_bucket": bucket})


@pytest.mark.parametrize("conf", UNKNOWN_NAMES)
def test_unknown_names_are_refused_by_plan_run(conf):
    unknown = sorted(set(conf) - set(param_schemas()))
    with pytest.raises(RunParamsError, match=re.escape(f"unknown parameter(s) {unknown}")):
        validate_run_params(conf)
