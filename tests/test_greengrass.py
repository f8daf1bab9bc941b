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


def test_requests_are_accepted_by_the_service_model(greengrass, version):
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
    deployment = gg.deployment_request(target_arn=GROUP_ARN, component_name=recipe["ComponentName"],
                                       version=recipe["ComponentVersion"], configuration={"IntervalSeconds": 30})
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
