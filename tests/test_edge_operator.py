"""``ExportEdgeModelsOperator`` against moto's S3: templates, the whole export, refused inputs."""
from __future__ import annotations

import hashlib
import json

import pytest

import airflow_support  # noqa: F401  (a throw-away AIRFLOW_HOME before airflow is imported)
from headpose.artifacts.edge.export import DEFAULT_FORMATS
from headpose.planning.layout import split_s3_uri
from support import aws_env

pytestmark = pytest.mark.slow
BUCKET = "edge-export"
JOB = "deeplens-TF-headpose-2025-01-02-03-04-05-000"
OUTPUT = f"s3://{BUCKET}/headpose/TFartifacts/{JOB}/output/"
DATASET = f"s3://{BUCKET}/headpose/datasets/tiny/"
EDGE = OUTPUT + "edge/"


@pytest.fixture(scope="module")
def models(tiny_edge_models):
    return tiny_edge_models


@pytest.fixture()
def staged(s3_endpoint, s3_client, monkeypatch, models) -> dict:
    """The frozen graph, its metadata and the tiny dataset in moto; ``aws_default`` points there."""
    for name, value in aws_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    s3_client.create_bucket(Bucket=BUCKET)
    for path, uri in ((models["frozen"], OUTPUT + "frozen_model.pb"),
                      (models["frozen_json"], OUTPUT + "frozen_model.json")):
        s3_client.upload_file(str(path), *split_s3_uri(uri))
    for path in sorted(models["data"].iterdir()):
        s3_client.upload_file(str(path), *split_s3_uri(DATASET + path.name))
    return {
        "frozen_model_uri": OUTPUT + "frozen_model.pb",
        "frozen_model_sha256": hashlib.sha256(models["frozen"].read_bytes()).hexdigest(),
        "frozen_model_json_uri": OUTPUT + "frozen_model.json",
        "frozen_model_json_sha256": hashlib.sha256(models["frozen_json"].read_bytes()).hexdigest(),
        "dataset_prefix": DATASET, "output_prefix": EDGE,
    }


def _operator(**arguments):
    from headpose_operators import ExportEdgeModelsOperator

    return ExportEdgeModelsOperator(task_id="export_edge_models", **arguments)


def _keys(s3_client, uri: str) -> list[str]:
    bucket, prefix = split_s3_uri(uri)
    return sorted(o["Key"][len(prefix):] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_every_templated_argument_renders():
    operator = _operator(
        frozen_model_uri="{{ params.output }}frozen_model.pb", frozen_model_sha256="{{ params.sha }}",
        frozen_model_json_uri="{{ params.output }}frozen_model.json", frozen_model_json_sha256="{{ params.sha }}",
        dataset_prefix="{{ params.dataset }}", output_prefix="{{ params.output }}edge/",
        formats="{{ params.formats }}", expected_bucket_owner="{{ params.owner }}", kms_key_id="{{ params.key }}",
    )
    operator.render_template_fields({"params": {"output": OUTPUT, "sha": "ab" * 32, "dataset": DATASET,
                                                "formats": "onnx,litert_int8", "owner": "123456789012",
                                                "key": "arn:aws:kms:us-east-1:123456789012:key/k"}})
    rendered = {field: getattr(operator, field) for field in operator.template_fields}
    assert rendered == {
        "frozen_model_uri": OUTPUT + "frozen_model.pb", "frozen_model_sha256": "ab" * 32,
        "frozen_model_json_uri": OUTPUT + "frozen_model.json", "frozen_model_json_sha256": "ab" * 32,
        "dataset_prefix": DATASET, "output_prefix": EDGE, "formats": "onnx,litert_int8",
        "expected_bucket_owner": "123456789012", "kms_key_id": "arn:aws:kms:us-east-1:123456789012:key/k",
    }


def test_the_task_exports_every_format_to_s3_and_returns_uris_and_checksums(staged, s3_client, tmp_path, models):
    from headpose.artifacts.edge.transfer import download_edge_models
    from headpose.artifacts.edge.validate import validate_edge_models

    result = _operator(**staged, formats="onnx,litert_float32,litert_int8,openvino_fp32,openvino_fp16,"
                                         "openvino_bf16,openvino_int8,onnx_int8").execute({})
    json.dumps(result)  # XCom: plain JSON
    assert sorted(result) == ["edge_models_json_sha256", "edge_models_json_uri", "formats", "refused"]
    assert result["refused"] == {} and sorted(result["formats"]) == sorted(DEFAULT_FORMATS)
    for name, entry in result["formats"].items():
        assert sorted(entry) == ["files", "metadata", "precision", "runtime"]
        assert entry["metadata"]["format"] == name
        for file, ref in entry["files"].items():
            body = s3_client.get_object(Bucket=BUCKET, Key=split_s3_uri(ref["uri"])[1])["Body"].read()
            assert ref["uri"] == EDGE + file and hashlib.sha256(body).hexdigest() == ref["sha256"]
    assert result["edge_models_json_uri"] == EDGE + "edge_models.json"
    assert _keys(s3_client, EDGE) == sorted(["edge_models.json", "model.onnx", "model.tflite", "model_int8.tflite",
                                             "model.xml", "model.bin", "model_fp16.xml", "model_fp16.bin",
                                             "model_int8.xml", "model_int8.bin", "model_int8.onnx"])
    # The next task's side of the hand-off: everything back from S3, checked, and validated.
    manifest = download_edge_models(s3_client, result["edge_models_json_uri"], tmp_path,
                                    result["edge_models_json_sha256"])
    verdicts = validate_edge_models(manifest, tmp_path, models["frozen"], models["train"])
    assert all(v["accepted"] for v in verdicts.values()), {n: v["reason"] for n, v in verdicts.items()}


def test_a_wrong_checksum_fails_the_task_and_uploads_nothing(staged, s3_client):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="edge export refused: .*frozen_model.pb has sha256"):
        _operator(**{**staged, "frozen_model_sha256": "0" * 64}).execute({})
    assert _keys(s3_client, EDGE) == []


def test_a_dataset_without_training_shards_fails_the_task(staged, s3_client):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="no train-\\*.tfrecord shards listed in s3://edge-export/nothing/manifest.json"):
        _operator(**{**staged, "dataset_prefix": f"s3://{BUCKET}/nothing/"}).execute({})
    assert _keys(s3_client, EDGE) == []


def test_a_tampered_training_shard_is_refused(staged, s3_client):
    from airflow.sdk.exceptions import AirflowFailException

    s3_client.put_object(Bucket=BUCKET, Key=split_s3_uri(DATASET + "train-00000.tfrecord")[1], Body=b"tampered")
    with pytest.raises(AirflowFailException, match="train-00000.tfrecord does not have the sha256 its manifest records"):
        _operator(**staged).execute({})
