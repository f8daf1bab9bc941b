"""The acceptance gate: the champion's evaluation on the same shards, and graphs that break the contract."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tensorflow as tf

from headpose.registry import promotion
from headpose.artifacts.evaluate import evaluate_frozen_graph
from headpose.artifacts.freeze import freeze_saved_model
from headpose.planning.layout import RunLayout
from headpose.training.export import export_saved_model
from headpose.training.model import build_resnet
from headpose.training.shards import ShardWriter, shard_paths
from headpose.artifacts.acceptance import validate_frozen_model
from headpose.registry.champion import evaluate_champion

pytestmark = pytest.mark.slow

BUCKET = "validation"
JOB = "deeplens-TF-headpose-2025-01-06-03-00-00-000"
POINTER = f"s3://{BUCKET}/headpose/published/latest.json"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("validation")
    rng = np.random.default_rng(5)
    with ShardWriter(base / "data", "eval", images_per_shard=16) as writer:
        for tilt, pan in [(t, p) for p in (-60, 0, 60) for t in (-30, 0, 30)] * 2:
            writer.write(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8), tilt, pan)
    tf.keras.utils.set_random_seed(5)
    saved_model = export_saved_model(build_resnet(10, base_filters=4), base / "model")
    frozen = freeze_saved_model(saved_model, base / "frozen")
    return {"base": base, "shards": shard_paths(base / "data", "eval"), "saved_model": saved_model,
            "pb": frozen.pb_path}


def publish_graph(s3, graph: bytes, recorded_sha: str | None = None) -> None:
    s3.create_bucket(Bucket=BUCKET)
    layout = RunLayout.for_run(BUCKET, "headpose", JOB, f"s3://{BUCKET}/headpose/datasets/x/")
    s3.put_object(Bucket=BUCKET, Key=layout.frozen_model_uri.split("/", 3)[3], Body=graph)
    record = promotion.publish_record(layout, recorded_sha or hashlib.sha256(graph).hexdigest(), {"accuracy": 0.5})
    s3.put_object(Bucket=BUCKET, Key="headpose/published/latest.json", Body=json.dumps(record).encode())


def test_nothing_published_means_no_champion(model, s3_client, tmp_path):
    s3_client.create_bucket(Bucket=BUCKET)
    assert evaluate_champion(s3_client, POINTER, model["shards"], tmp_path) == {"present": False}


def test_the_champion_is_evaluated_on_the_same_shards(model, s3_client, tmp_path):
    publish_graph(s3_client, model["pb"].read_bytes())
    champion = evaluate_champion(s3_client, POINTER, model["shards"], tmp_path)
    expected = evaluate_frozen_graph(model["pb"], model["shards"])
    assert champion["present"] and "error" not in champion
    assert champion["training_job_name"] == JOB
    assert champion["accuracy"] == expected["accuracy"] and champion["images"] == 18
    assert champion["pointer_etag"] == s3_client.head_object(Bucket=BUCKET, Key="headpose/published/latest.json")["ETag"]


def test_a_champion_whose_file_changed_or_vanished_is_an_error_not_a_score(model, s3_client, tmp_path):
    publish_graph(s3_client, model["pb"].read_bytes(), recorded_sha="0" * 64)
    changed = evaluate_champion(s3_client, POINTER, model["shards"], tmp_path)
    assert "accuracy" not in changed and "latest.json records" in changed["error"]
    s3_client.delete_object(Bucket=BUCKET, Key=f"headpose/TFartifacts/{JOB}/output/frozen_model.pb")
    gone = evaluate_champion(s3_client, POINTER, model["shards"], tmp_path)
    assert "accuracy" not in gone and "cannot fetch" in gone["error"]
    assert promotion.promotion_decision(0.1, gone).promote  # a broken champion does not block


def test_a_champion_graph_that_does_not_run_is_an_error(model, s3_client, tmp_path):
    publish_graph(s3_client, b"not a GraphDef at all")
    broken = evaluate_champion(s3_client, POINTER, model["shards"], tmp_path)
    assert "does not run" in broken["error"]


def test_the_report_records_the_champion(model, tmp_path):
    champion = {"present": True, "training_job_name": JOB, "accuracy": 0.25}
    outcome = validate_frozen_model(
        model["pb"], model["saved_model"], model["shards"], tmp_path / "report",
        min_accuracy=0, training_job_name="deeplens-TF-headpose-2025-01-13-03-00-00-000", champion=champion,
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["champion"] == champion and outcome["champion"] == champion
    assert (tmp_path / "report" / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")


def graph_without(pb_path, node: str) -> bytes:
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(pb_path.read_bytes())
    kept = [n for n in graph_def.node if n.name != node]
    del graph_def.node[:]
    graph_def.node.extend(kept)
    return graph_def.SerializeToString()


@pytest.mark.parametrize("node", ["softmax_tensor", "inputs"])
def test_a_frozen_graph_without_the_contract_nodes_is_refused(model, tmp_path, node):
    broken = tmp_path / "frozen_model.pb"
    broken.write_bytes(graph_without(model["pb"], node))
    with pytest.raises(ValueError, match=node):
        validate_frozen_model(
            broken, model["saved_model"], model["shards"], tmp_path / "report",
            min_accuracy=0, training_job_name=JOB,
        )
    assert not (tmp_path / "report" / "report.json").exists()
