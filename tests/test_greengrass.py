"""The Greengrass V2 component of a model version: its recipe, its artifacts' digests, its requests.

moto has no Greengrass V2 and botocore sees the inline recipe as an opaque blob, so: the
recipe is checked against a JSON schema written from AWS's recipe reference
(``tests/schemas/greengrass-recipe.schema.json``); each artifact is fetched from S3 and its
digest computed as the nucleus does (base64 of the raw SHA-256); the requests go through a
real ``greengrassv2`` client (its parameter validation, with ``Stubber`` answering in the
service's output shape) and through ``service_model_check`` for max, pattern and enum.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from jsonschema import Draft202012Validator

from headpose.fleet import greengrass as gg
from headpose.planning.layout import split_s3_uri
from service_model_check import request_problems
from test_crash_points import candidate, upload

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "greengrass-recipe.schema.json").read_text())
REGION, ACCOUNT = "eu-west-1", "123456789012"
GROUP_ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/headpose-cameras"


def _get(s3, uri: str) -> bytes:
    bucket, key = split_s3_uri(uri)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture()
def version(s3_client):
    s3_client.create_bucket(Bucket="gg-tests")
    run = candidate(s3_client, "gg-tests", 0)
    run.plan["deployment"]["rollout"] = {"canary_devices": ["cam-1"], "min_canaries": 1, "soak_minutes": 0}
    made = upload(s3_client, run)
    return {"run": run, "version": made,
            "recipe": json.loads(_get(s3_client, made["files"]["greengrass/recipe.json"]["uri"]))}


@pytest.fixture()
def greengrass():
    client = boto3.client("greengrassv2", region_name=REGION, aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def test_recipe_matches_the_schema_and_its_digests_are_the_files(s3_client, version):
    recipe, made = version["recipe"], version["version"]
    assert not sorted(e.message for e in Draft202012Validator(SCHEMA).iter_errors(recipe))
    assert recipe["ComponentVersion"] == "20250301.30000000.0" == made["greengrass"]["component_version"]
    artifacts = recipe["Manifests"][0]["Artifacts"]
    for artifact in artifacts:  # as the nucleus checks a download
        data = _get(s3_client, artifact["Uri"])
        assert artifact["Digest"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    onnx = made["formats"]["onnx"]["files"]["model.onnx"]  # what the pointer will give
    assert {a["Uri"]: a["Digest"] for a in artifacts}[onnx["uri"]] == base64.b64encode(
        bytes.fromhex(onnx["sha256"])).decode()
    assert [a["Unarchive"] for a in artifacts] == ["ZIP", "NONE"]  # the client, then the ONNX file
    for name in ("greengrass/recipe.json", "greengrass/headpose-edge-client.zip"):
        entry = made["files"][name]
        assert hashlib.sha256(_get(s3_client, entry["uri"])).hexdigest() == entry["sha256"]
    config = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    assert config["ChannelsPrefix"] == "s3://gg-tests/headpose/published/channels/"
    assert "--channels '{configuration:/ChannelsPrefix}'" in recipe["Manifests"][0]["Lifecycle"]["Run"]["Script"]
    assert upload(s3_client, version["run"]) == made  # a re-run finds the same bytes


def test_the_schema_refuses_what_greengrass_would(version):
    """The schema can fail: a hex digest, a version that is not semver, an unknown step."""
    recipe = json.loads(json.dumps(version["recipe"]))
    recipe["ComponentVersion"] = "2024.01.01"
    recipe["Manifests"][0]["Artifacts"][0]["Digest"] = "ab" * 32
    recipe["Manifests"][0]["Lifecycle"]["Start"] = "python3 -m headpose.edge"
    errors = {tuple(e.absolute_path) for e in Draft202012Validator(SCHEMA).iter_errors(recipe)}
    assert errors == {("ComponentVersion",), ("Manifests", 0, "Artifacts", 0, "Digest"), ("Manifests", 0, "Lifecycle")}


def test_client_zip_is_deterministic_and_self_contained():
    first, second = gg.client_zip(), gg.client_zip()
    assert first == second
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert {"headpose/__init__.py", "headpose/edge/__main__.py", "headpose/edge/client.py",
            "headpose/registry/record.py", "requirements.txt"} <= set(names)
    assert not [n for n in names if n.startswith(("headpose/planning", "headpose/artifacts", "headpose/training"))]


@pytest.mark.parametrize("job, expected", [
    ("deeplens-TF-headpose-2025-03-03-03-00-00-000", "20250303.30000000.0"),
    ("deeplens-TF-headpose-2025-03-03-03-00-00-000-2", "20250303.30000000.2"),
    ("my-base-2025-12-31-23-59-59-999", "20251231.235959999.0"),
])
def test_component_version(job, expected):
    assert gg.component_version(job) == expected


def test_requests_are_accepted_by_the_service_model(greengrass, version, capsys):
    from headpose.fleet.__main__ import main

    client, stubber = greengrass
    recipe = version["recipe"]
    request = gg.create_request(recipe)
    arn = f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:{recipe['ComponentName']}:versions:20250301.30000000.0"
    stubber.add_response("create_component_version", {
        "arn": arn, "componentName": recipe["ComponentName"], "componentVersion": recipe["ComponentVersion"],
        "creationTimestamp": "2024-01-01T00:00:00Z", "status": {"componentState": "REQUESTED"},
    }, expected_params=request)
    assert gg.create_component(client, recipe, REGION, ACCOUNT) == {"arn": arn, "status": "REQUESTED",
                                                                    "created": True}
    assert request_problems("greengrassv2", "CreateComponentVersion", request) == []
    assert main(["greengrass-deployment", "--job", version["run"].job, "--target-arn", GROUP_ARN,
                 "--interval-seconds", "30"]) == 0  # what the README sends with the AWS CLI
    deployment = json.loads(capsys.readouterr().out)
    assert deployment["components"] == {recipe["ComponentName"]: {
        "componentVersion": recipe["ComponentVersion"], "configurationUpdate": {"merge": '{"IntervalSeconds": 30.0}'}}}
    stubber.add_response("create_deployment", {"deploymentId": "d-1", "iotJobId": "j-1"}, expected_params=deployment)
    client.create_deployment(**deployment)
    assert request_problems("greengrassv2", "CreateDeployment", deployment) == []


def test_the_shape_walk_refuses_what_botocore_leaves_to_the_service(greengrass):
    """botocore's own validator passes these (type and min only); the service model's max, pattern and enum do not."""
    client, stubber = greengrass
    bad = gg.deployment_request(target_arn="arn:aws:iot:eu-west-1:123:device/cam", component_name="c",
                                version="1.0.0")
    bad["deploymentPolicies"]["failureHandlingPolicy"] = "UNDO"
    bad["iotJobConfiguration"]["jobExecutionsRolloutConfig"]["exponentialRate"]["incrementFactor"] = 9.0
    bad["components"]["c"]["componentVersion"] = "1" * 65
    stubber.add_response("create_deployment", {"deploymentId": "d-1"}, expected_params=bad)
    client.create_deployment(**bad)
    problems = request_problems("greengrassv2", "CreateDeployment", bad)
    assert {p.split(":")[0] for p in problems} == {
        "CreateDeployment.targetArn", "CreateDeployment.components['c'].componentVersion",
        "CreateDeployment.deploymentPolicies.failureHandlingPolicy",
        "CreateDeployment.iotJobConfiguration.jobExecutionsRolloutConfig.exponentialRate.incrementFactor",
    }
    assert request_problems("greengrassv2", "CreateComponentVersion",
                            {"inlineRecipe": b"{}", "clientToken": "not_a_token"}) == [
        "CreateComponentVersion.clientToken: 'not_a_token' does not match ^[a-zA-Z0-9-]+$"]


def test_create_is_idempotent_on_conflict(greengrass, version):
    client, stubber = greengrass
    recipe = version["recipe"]
    arn = f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:{recipe['ComponentName']}:versions:20250301.30000000.0"
    held = {"recipeOutputFormat": "JSON", "recipe": gg.recipe_bytes(recipe)}
    stubber.add_client_error("create_component_version", "ConflictException", http_status_code=409)
    stubber.add_response("get_component", held, expected_params={"arn": arn, "recipeOutputFormat": "JSON"})
    assert gg.create_component(client, recipe, REGION, ACCOUNT) == {"arn": arn, "status": "EXISTS",
                                                                    "created": False}
    changed = {**recipe, "ComponentDescription": "other bytes"}
    stubber.add_client_error("create_component_version", "ConflictException", http_status_code=409)
    stubber.add_response("get_component", held, expected_params={"arn": arn, "recipeOutputFormat": "JSON"})
    with pytest.raises(gg.GreengrassError, match="another recipe"):
        gg.create_component(client, changed, REGION, ACCOUNT)
    stubber.add_client_error("create_component_version", "AccessDeniedException", http_status_code=403)
    with pytest.raises(Exception, match="AccessDenied"):
        gg.create_component(client, recipe, REGION, ACCOUNT)



def test_publish_creates_the_component_where_the_deployment_says_so(s3_client, greengrass):
    import airflow_support  # noqa: F401  (plugins/ on the path)
    from headpose_operators.greengrass import greengrass_component

    from headpose.registry.promotion import publish_run
    from test_crash_points import champion_of

    client, stubber = greengrass
    s3_client.create_bucket(Bucket="gg-tests")
    run = candidate(s3_client, "gg-tests", 0)
    assert greengrass_component("aws_default", run.plan) is None  # create_component is off by default
    run.plan["deployment"]["greengrass"] = {"create_component": True}
    assert callable(greengrass_component("aws_default", run.plan))
    run.report = {**run.report, "champion": champion_of(s3_client, run)}
    version = upload(s3_client, run)
    recipe = json.loads(_get(s3_client, version["files"]["greengrass/recipe.json"]["uri"]))
    stubber.add_response("create_component_version", {
        "arn": "arn:aws:greengrass:eu-west-1:123456789012:components:com.headpose.EdgeClient:versions:1.0.0",
        "componentName": recipe["ComponentName"], "componentVersion": recipe["ComponentVersion"],
        "creationTimestamp": "2025-03-01T04:00:00Z", "status": {"componentState": "REQUESTED"},
    }, expected_params=gg.create_request(recipe))
    decision, summary = publish_run(
        s3_client, run.plan, run.training, run.dataset, run.report, version, dag_id="headpose_retraining",
        run_id="gg", greengrass=lambda document: gg.create_component(client, document, REGION, ACCOUNT))
    assert decision.promote
    assert summary["greengrass_component"]["component_version"] == "20250301.30000000.0"
    assert summary["greengrass_component"]["created"] is True


# -- the recipe run as the nucleus would, against moto ------------------------------------

def _real_onnx(s3, run, models) -> None:
    """Give ``run``'s candidate the session's real ONNX model (files in S3, accepted by validation)."""
    entry = models["manifest"]["formats"]["onnx"]
    prefix = run.plan["candidate_prefix"] + "edge/"
    files = {}
    for file, ref in entry["files"].items():
        s3.upload_file(str(models["edge_dir"] / file), *split_s3_uri(prefix + file))
        files[file] = {"uri": prefix + file, "sha256": ref["sha256"]}
    run.edge = {"formats": {"onnx": {"runtime": entry["runtime"], "precision": entry["precision"],
                                     "metadata": entry["metadata"], "files": files}}}
    run.report = {**run.report, "formats": {"onnx": {"accepted": True, "accuracy": 0.9, "max_abs_diff": 0.0,
                                                     "latency_ms_b1": 1.0}}}
    run.frozen = {**run.frozen, "channel_order": entry["metadata"]["preprocessing"]["channel_order"]}


def _nucleus(s3, recipe: dict, root: Path, thing: str, merge: dict) -> tuple[dict, dict[str, str]]:
    """Download and check the artifacts as the nucleus does, unpack the ZIP, and the recipe variables."""
    import zipfile

    artifacts, unpacked = root / "artifacts", root / "decompressed"
    artifacts.mkdir(parents=True)
    for artifact in recipe["Manifests"][0]["Artifacts"]:
        data = _get(s3, artifact["Uri"])
        assert base64.b64encode(hashlib.sha256(data).digest()).decode() == artifact["Digest"]
        path = artifacts / artifact["Uri"].rsplit("/", 1)[1]
        path.write_bytes(data)
        if artifact["Unarchive"] == "ZIP":
            zipfile.ZipFile(path).extractall(unpacked / path.name[:-len(".zip")])
    config = {**recipe["ComponentConfiguration"]["DefaultConfiguration"], **merge}
    variables = {"{artifacts:path}": str(artifacts), "{artifacts:decompressedPath}": str(unpacked),
                 "{work:path}": str(root / "work"), "{iot:thingName}": thing,
                 **{"{configuration:/%s}" % key: str(value) for key, value in config.items()}}
    return config, variables


def _substitute(text: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        text = text.replace(name, value)
    assert "{" not in text, f"a recipe variable is left: {text}"
    return text


def _events(process, until, deadline_s: float = 120.0) -> list[dict]:
    """The follow events printed until ``until(event)`` holds (or the process ends, or the deadline)."""
    import select
    import time

    seen, end = [], time.monotonic() + deadline_s
    while time.monotonic() < end:
        ready, _, _ = select.select([process.stdout], [], [], end - time.monotonic())
        line = process.stdout.readline() if ready else ""
        if not line:
            break
        if line.startswith('{"event"'):
            seen.append(json.loads(line))
            if until(seen[-1]):
                return seen
    raise AssertionError(f"no such event; saw {seen}; stderr: {process.stderr.read() if process.poll() is not None else ''}")


@pytest.mark.slow
def test_the_recipe_runs_follow_on_the_devices_channel(s3_client, s3_endpoint, tiny_edge_models, tmp_path):
    """Install and Run of the recipe, variables substituted, with only the client zip on PYTHONPATH: the
    canary device loads the canary channel's version, reports it to moto, and switches when the channel moves."""
    import os
    import subprocess
    import sys

    from fleet_support import channel_candidate, publish_to_canary

    s3_client.create_bucket(Bucket="gg-tests")
    first = channel_candidate(s3_client, "gg-tests", 0)
    _real_onnx(s3_client, first, tiny_edge_models)
    version = publish_to_canary(s3_client, first)
    recipe = json.loads(_get(s3_client, version["files"]["greengrass/recipe.json"]["uri"]))
    merge = json.loads(gg.deployment_request(target_arn=GROUP_ARN, component_name=recipe["ComponentName"],
                                             version=recipe["ComponentVersion"], configuration={"IntervalSeconds": 1})
                       ["components"][recipe["ComponentName"]]["configurationUpdate"]["merge"])
    config, variables = _nucleus(s3_client, recipe, tmp_path, "cam-1", merge)
    lifecycle = recipe["Manifests"][0]["Lifecycle"]
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    subprocess.run(["sh", "-c", _substitute(lifecycle["Install"]["Script"], variables)], env=env, check=True,
                   timeout=lifecycle["Install"]["Timeout"])
    seeded = tmp_path / "work" / "cache" / version["formats"]["onnx"]["sha256"]
    assert sorted(p.name for p in seeded.iterdir()) == sorted(version["formats"]["onnx"]["files"])
    run_env = {**env, **{k: _substitute(v, variables) for k, v in lifecycle["Run"]["Setenv"].items()}}
    assert run_env["PYTHONPATH"] == str(tmp_path / "decompressed" / "headpose-edge-client")
    process = subprocess.Popen(["sh", "-c", "exec " + _substitute(lifecycle["Run"]["Script"], variables)],
                               env=run_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        loaded = _events(process, lambda event: event["event"] == "loaded")[-1]
        assert (loaded["training_job_name"], loaded["channel"]) == (first.job, "canary")
        _events(process, lambda event: True)  # the next poll: the first report is written by now
        report = json.loads(_get(s3_client, config["ReportPrefix"] + "cam-1/status.json"))
        assert (report["device_id"], report["channel"], report["running"]["training_job_name"]) == (
            "cam-1", "canary", first.job)
        second = channel_candidate(s3_client, "gg-tests", 7)
        _real_onnx(s3_client, second, tiny_edge_models)
        publish_to_canary(s3_client, second)
        switched = _events(process, lambda event: event["event"] not in ("unchanged",))[-1]
        assert (switched["event"], switched["training_job_name"]) == ("switched", second.job)
    finally:
        process.terminate()
        process.wait(timeout=30)
