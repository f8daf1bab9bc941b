"""The deployment profile ($HEADPOSE_RUN_DEFAULTS): what a scheduled run of a deployment does.

A profile replaces the Params' built-in defaults (so scheduled runs and the trigger form
use it), a bad one is a DAG import error that names the variable, the key and the rule, and
deployment settings in it can never come from a trigger's conf.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from airflow_support import ROOT, load_dag, load_dagbag, scheduler_dag
from headpose.planning.plan import plan_run
from headpose.planning.profile import PROFILE_ENV, ProfileError, load_profile
from headpose.planning.rules import RunParamsError, validate_run_params

PRODUCTION = ROOT / "deploy" / "profiles" / "production.json"
WHEN = datetime(2026, 3, 2, 3, tzinfo=timezone.utc)


def production_profile() -> str:
    return json.dumps(json.loads(PRODUCTION.read_text()))


def test_a_profile_is_what_a_scheduled_run_and_the_trigger_form_start_from(monkeypatch):
    monkeypatch.setenv(PROFILE_ENV, production_profile())
    params = scheduler_dag(load_dag()).params  # as the scheduler creates a scheduled run
    defaults = params.deep_merge({}).validate()
    assert defaults["backend"] == "sagemaker" and defaults["resnet_size"] == 50
    assert defaults["training_steps"] == 25000 and defaults["batch_size"] == 200
    assert defaults["dataset_source"].endswith("/datasets/prima-v1/")
    assert defaults["min_accuracy"] == 0.78
    # The deployment settings are not parameters: the form cannot show or change them.
    assert "evaluation_set" not in defaults and "expected_bucket_owner" not in defaults
    assert "prima-persons-05-10-15" in load_dag().doc_md  # the DAG's docs show the profile in force


def test_the_documented_production_profile_is_the_tutorials_run_on_sagemaker(monkeypatch):
    monkeypatch.setenv(PROFILE_ENV, production_profile())
    plan = plan_run({}, WHEN, region="eu-west-1", dag_id="d", run_id="scheduled__x",
                    resolve_image=lambda *a: "image", environ={PROFILE_ENV: production_profile()})
    request = plan["training_request"]
    assert request["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert request["EnableManagedSpotTraining"] is True
    assert request["HyperParameters"]["resnet_size"] == "50"
    assert request["HyperParameters"]["training_steps"] == "25000"
    assert request["RoleArn"].endswith(":role/HeadposeSageMakerExecution")
    assert plan["deployment"]["evaluation_set"].endswith("/prima-persons-05-10-15/")
    assert plan["expected_bucket_owner"] == "123456789012"
    assert plan["profile"].startswith(f"deployment profile ${PROFILE_ENV}")
    # Production: a person approves each release within 3 days; every version is in the Model Registry.
    assert plan["deployment"]["release_approval"] == "required" and plan["deployment"]["approval_timeout"] == "3d"
    assert plan["deployment"]["model_package_group"] == "headpose"


@pytest.mark.parametrize("profile, words", [
    ('{"resnet_size": 50', "is not valid JSON"),
    ('["resnet_size", 50]', "must be a JSON object"),
    ('{"resnet_szie": 50}', "'resnet_szie' is not a run parameter or deployment setting"),
    ('{"resnet_size": 20}', "resnet_size=20: 20 is not one of [10, 18, 34, 50]"),
    ('{"backend": "kubernetes"}', "backend='kubernetes'"),
    ('{"min_accuracy": 2}', "min_accuracy=2: 2 is greater than the maximum of 1"),
    ('{"evaluation_set": "eval/"}', "evaluation_set='eval/'"),
    ('{"expected_bucket_owner": "me"}', "expected_bucket_owner='me'"),
    ('{"local_images_per_second": {"51": 3}}', "local_images_per_second"),
    ('{"release_approval": "maybe"}', "release_approval='maybe': 'maybe' is not one of ['none', 'required']"),
    ('{"approval_timeout": "3 days"}', "approval_timeout='3 days'"),
    ('{"approvers": "alice"}', "approvers='alice'"),
    ('{"model_package_group": "head pose"}', "model_package_group='head pose'"),
    ('{"backend": "sagemaker", "instance_count": 4, "instance_type": "ml.c5.18xlarge"}',
     "instance_count=4 with instance_type='ml.c5.18xlarge', which has no GPU"),
    ('{"instance_count": 2, "synthetic_train_per_pose": 5}', "needs a training shard per host"),
    ('{"edge_formats": ["tensorrt"]}', "edge_formats=['tensorrt']: unknown edge formats ['tensorrt']"),
    ('{"edge_formats": ["openvino_bf16"]}', "openvino_bf16 runs the files of openvino_fp32: request both"),
    ('{"edge_formats": []}', "edge_formats=[]"),
])
def test_a_bad_profile_is_an_import_error_naming_the_variable_the_key_and_the_rule(monkeypatch, profile, words):
    monkeypatch.setenv(PROFILE_ENV, profile)
    bag = load_dagbag()
    assert not bag.dags
    error = "\n".join(str(e) for e in bag.import_errors.values())
    assert f"${PROFILE_ENV}" in error and words in error, error


def test_deployment_settings_are_refused_in_a_trigger_conf():
    with pytest.raises(RunParamsError) as refused:
        validate_run_params({"evaluation_set": "s3://someone-else/eval/", "expected_bucket_owner": "999999999999"})
    message = str(refused.value)
    assert "['evaluation_set', 'expected_bucket_owner'] are deployment settings" in message
    assert f"${PROFILE_ENV}" in message
    # A person allowed to trigger cannot skip the approval, name the approvers or move the Model Registry.
    with pytest.raises(RunParamsError) as refused:
        validate_run_params({"release_approval": "none", "approvers": ["me"], "approval_timeout": "1m",
                             "model_package_group": ""})
    assert ("['approval_timeout', 'approvers', 'model_package_group', 'release_approval'] are deployment settings"
            in str(refused.value))


@pytest.mark.parametrize("profile, words", [
    ({"approvers": ["alice"]}, "approvers are named but release_approval is 'none'"),
    ({"release_approval": "required", "approval_timeout": "30s"}, "approval_timeout='30s' is shorter than 60 s"),
])
def test_release_settings_that_cannot_work_are_refused_before_anything_is_written(profile, words):
    with pytest.raises(RunParamsError, match="invalid deployment settings") as refused:
        plan_run({"s3_bucket": "bkt"}, WHEN, region="us-east-1", dag_id="d", run_id="r",
                 environ={PROFILE_ENV: json.dumps(profile)})
    assert words in str(refused.value)


def test_a_run_waits_for_an_approval_only_inside_its_own_timeout(monkeypatch):
    from datetime import timedelta

    from headpose.planning.scheduling import dagrun_timeout

    required = {PROFILE_ENV: json.dumps({"release_approval": "required", "approval_timeout": "3d"})}
    # By default the run's timeout grows by the wait; a deployment's own timeout is checked against it.
    assert dagrun_timeout(required) == timedelta(hours=192 + 72)
    assert dagrun_timeout({}) == timedelta(hours=192)
    plan = plan_run({"s3_bucket": "bkt"}, WHEN, region="us-east-1", dag_id="d", run_id="r", environ=required,
                    dagrun_timeout=dagrun_timeout(required))
    assert plan["deployment"]["release_approval"] == "required" and plan["deployment"]["approval_timeout"] == "3d"
    with pytest.raises(RunParamsError) as refused:
        plan_run({"s3_bucket": "bkt", "max_run_seconds": 4 * 86400}, WHEN, region="us-east-1", dag_id="d", run_id="r",
                 environ=required, dagrun_timeout=timedelta(hours=120))
    assert "the approval may wait 3 days, 0:00:00 (approval_timeout=3d)" in str(refused.value)


def test_a_local_run_that_cannot_finish_in_time_is_refused_with_the_estimate():
    conf = {"backend": "local", "resnet_size": 50, "base_filters": 64, "training_steps": 25000,
            "batch_size": 200, "max_run_seconds": 86400}
    with pytest.raises(RunParamsError) as refused:
        validate_run_params(conf, load_profile({PROFILE_ENV: '{"local_images_per_second": {"50": 20}}'}).settings)
    message = str(refused.value)
    # 25000 * 200 images at 20 images/s: 250000 s, about 3 days.
    assert "a local ResNet-50 run of 25000 steps of 200 takes about 3 days" in message
    assert "20 images/s" in message and "max_run_seconds=86400" in message
    # The same run fits a faster worker, and a short one fits this one.
    validate_run_params(conf, load_profile({PROFILE_ENV: '{"local_images_per_second": {"50": 100}}'}).settings)
    validate_run_params({**conf, "training_steps": 200}, load_profile({}).settings)


def test_no_profile_means_the_built_in_defaults():
    profile = load_profile({})
    assert profile.params == {} and profile.settings.evaluation_set is None
    assert "built-in defaults" in profile.describe()
    with pytest.raises(ProfileError):
        load_profile({PROFILE_ENV: "{}x"})


def test_a_deployment_converts_only_the_edge_formats_its_devices_run():
    profile = {PROFILE_ENV: json.dumps({"edge_formats": ["openvino_int8", "onnx"]})}
    plan = plan_run({"s3_bucket": "b-headpose"}, WHEN, region="us-east-1", dag_id="d", run_id="r", environ=profile)
    assert plan["edge_formats"] == ["openvino_int8", "onnx"]
    everything = plan_run({"s3_bucket": "b-headpose"}, WHEN, region="us-east-1", dag_id="d", run_id="r", environ={})
    assert "openvino_bf16" in everything["edge_formats"] and "litert_int8" in everything["edge_formats"]
    with pytest.raises(RunParamsError, match=r"\['edge_formats'\] is a deployment setting"):
        validate_run_params({"edge_formats": ["onnx"]})
