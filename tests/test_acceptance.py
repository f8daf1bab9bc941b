"""The acceptance gate and the champion: judged on the same images, fairly compared, every class counted."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tensorflow as tf

from headpose.registry import promotion
from headpose.artifacts.evaluate import evaluate_frozen_graph
from headpose.planning.layout import RunLayout
from headpose.training.shards import ShardWriter, shard_paths
from headpose.artifacts.acceptance import acceptance_problems, validate_frozen_model
from headpose.registry.champion import evaluate_champion

pytestmark = pytest.mark.slow

BUCKET = "validation"
JOB = "deeplens-TF-headpose-2025-01-06-03-00-00-000"
POINTER = f"s3://{BUCKET}/headpose/published/latest.json"


@pytest.fixture(scope="module")
def model(tiny_model, tmp_path_factory):
    """The session's trained model, frozen, on shards of random images of every class."""
    base = tmp_path_factory.mktemp("validation")
    rng = np.random.default_rng(5)
    with ShardWriter(base / "data", "eval", images_per_shard=16) as writer:
        for tilt, pan in [(t, p) for p in (-60, 0, 60) for t in (-30, 0, 30)] * 2:
            writer.write(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8), tilt, pan)
    return {"base": base, "shards": shard_paths(base / "data", "eval"), "saved_model": tiny_model["saved_model"],
            "pb": tiny_model["frozen"]}


EVAL_SET = {"id": "x@000", "pinned": False, "channel_order": "bgr"}
DATASET = {"dataset_id": "x", "manifest_sha256": "a" * 64}


def publish_graph(s3, graph: bytes, recorded_sha: str | None = None, **record_fields) -> None:
    s3.create_bucket(Bucket=BUCKET)
    layout = RunLayout.for_run(BUCKET, "headpose", JOB, f"s3://{BUCKET}/headpose/datasets/x/")
    s3.put_object(Bucket=BUCKET, Key=layout.frozen_model_uri.split("/", 3)[3], Body=graph)
    record = {"version": 3, "training_job_name": JOB, "channel_order": "bgr", "dataset": DATASET,
              "files": {"frozen_model.pb": {"uri": layout.frozen_model_uri,
                                            "sha256": recorded_sha or hashlib.sha256(graph).hexdigest()}},
              **record_fields}
    s3.put_object(Bucket=BUCKET, Key="headpose/published/latest.json", Body=json.dumps(record).encode())


def champion(s3, model, tmp_path, evaluation_set=EVAL_SET, dataset=DATASET):
    return evaluate_champion(s3, POINTER, model["shards"], evaluation_set, dataset, tmp_path)


def test_nothing_published_means_no_champion(model, s3_client, tmp_path):
    s3_client.create_bucket(Bucket=BUCKET)
    assert champion(s3_client, model, tmp_path) == {"present": False}


def test_the_champion_is_evaluated_on_the_same_shards(model, s3_client, tmp_path):
    publish_graph(s3_client, model["pb"].read_bytes())
    found = champion(s3_client, model, tmp_path)
    expected = evaluate_frozen_graph(model["pb"], model["shards"])
    assert found["present"] and "error" not in found
    assert found["training_job_name"] == JOB and found["comparable"] is True
    assert found["accuracy"] == expected["accuracy"] and found["images"] == 18
    assert found["pointer_etag"] == s3_client.head_object(Bucket=BUCKET, Key="headpose/published/latest.json")["ETag"]


def test_a_champion_trained_in_the_other_channel_order_is_fed_in_its_own(model, s3_client, tmp_path):
    # A version 2 record (before channel_order): an RGB model, fed the BGR evaluation set reversed.
    layout = RunLayout.for_run(BUCKET, "headpose", JOB, f"s3://{BUCKET}/headpose/datasets/x/")
    publish_graph(s3_client, model["pb"].read_bytes())
    record = {"version": 2, "training_job_name": JOB, "frozen_model_uri": layout.frozen_model_uri,
              "frozen_model_sha256": hashlib.sha256(model["pb"].read_bytes()).hexdigest()}
    s3_client.put_object(Bucket=BUCKET, Key="headpose/published/latest.json", Body=json.dumps(record).encode())
    found = champion(s3_client, model, tmp_path)
    assert found["channel_order"] == "rgb"
    assert found["accuracy"] == evaluate_frozen_graph(model["pb"], model["shards"], reverse_channels=True)["accuracy"]


@pytest.mark.parametrize("evaluation_set, dataset, comparable, words", [
    ({**EVAL_SET, "pinned": True}, {"dataset_id": "prima-2", "manifest_sha256": "b" * 64}, True,
     "pinned evaluation set x@000"),
    (EVAL_SET, DATASET, True, "eval split of x"),
    (EVAL_SET, {"dataset_id": "synthetic-9", "manifest_sha256": "c" * 64}, False,
     "validated on x, this run on synthetic-9"),
])
def test_a_champion_compares_fairly_only_on_the_same_images(model, s3_client, tmp_path, evaluation_set, dataset,
                                                             comparable, words):
    publish_graph(s3_client, model["pb"].read_bytes())
    found = champion(s3_client, model, tmp_path, evaluation_set, dataset)
    assert found["comparable"] is comparable and words in found["comparison"]
    decision = promotion.promotion_decision(found["accuracy"] + 0.5, found)
    assert decision.promote is comparable  # a better score on other images decides nothing


def test_a_champion_whose_file_changed_or_vanished_is_an_error_not_a_score(model, s3_client, tmp_path):
    publish_graph(s3_client, model["pb"].read_bytes(), recorded_sha="0" * 64)
    changed = champion(s3_client, model, tmp_path)
    assert "accuracy" not in changed and "recorded" in changed["error"]
    s3_client.delete_object(Bucket=BUCKET, Key=f"headpose/TFartifacts/{JOB}/output/frozen_model.pb")
    gone = champion(s3_client, model, tmp_path)
    assert "accuracy" not in gone and "cannot fetch" in gone["error"]
    assert promotion.promotion_decision(0.1, gone).promote  # a broken champion does not block


def test_a_champion_graph_that_does_not_run_is_an_error(model, s3_client, tmp_path):
    publish_graph(s3_client, b"not a GraphDef at all")
    broken = champion(s3_client, model, tmp_path)
    assert "does not run" in broken["error"]


def test_the_report_records_the_champion_the_evaluation_set_and_every_class(model, tmp_path):
    found = {"present": True, "training_job_name": JOB, "accuracy": 0.25}
    outcome = validate_frozen_model(
        model["pb"], model["saved_model"], model["shards"], tmp_path / "report",
        min_accuracy=0, training_job_name="deeplens-TF-headpose-2025-01-13-03-00-00-000", champion=found,
        evaluation_set=EVAL_SET, dataset=DATASET,
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["champion"] == found and outcome["champion"] == found
    assert report["evaluation_set"] == EVAL_SET and report["dataset"] == DATASET
    assert len(report["per_class"]) == 9 and set(outcome["per_class_recall"]) == {c["name"] for c in report["per_class"]}
    assert (tmp_path / "report" / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")


def test_the_champion_is_compared_image_by_image_and_the_report_page_shows_it(model, s3_client, tmp_path):
    from headpose.artifacts.report_html import render_report_html

    publish_graph(s3_client, model["pb"].read_bytes())
    found = champion(s3_client, model, tmp_path / "champion")
    assert len(found["per_image_correct"]) == found["images"] and len(found["confusion_matrix"]) == 9
    outcome = validate_frozen_model(
        model["pb"], model["saved_model"], model["shards"], tmp_path / "report", min_accuracy=0,
        training_job_name="deeplens-TF-headpose-2025-01-13-03-00-00-000", champion=found,
        evaluation_set=EVAL_SET, dataset=DATASET, promotion_rule="significantly_better",
    )
    # The same graph on the same images: no image tells them apart.
    comparison = outcome["comparison"]
    assert comparison["difference"] == 0 and comparison["champion_only"] == comparison["challenger_only"] == 0
    assert comparison["promote"] is False and comparison["rule"] == "significantly_better"
    assert "per_image_correct" not in outcome["champion"]  # XCom gets names and figures, report.json the rest
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["comparison"] == comparison and len(report["champion"]["per_image_correct"]) == report["images"]
    decision = promotion.promotion_decision(outcome["accuracy"], outcome["champion"], comparison=comparison)
    assert not decision.promote and "not significantly better" in decision.reason

    report["formats"] = {"onnx": {"accepted": True, "accuracy": 0.5, "latency_ms_b1": 1.25, "max_abs_diff": 1e-7},
                         "litert_int8": {"accepted": False, "reason": "lost 3 points <b>"}}
    page = render_report_html(report, tmp_path / "report" / "confusion_matrix.png")
    assert "deeplens-TF-headpose-2025-01-13-03-00-00-000" in page and f"published: {JOB}" in page
    assert "difference +0.0000" in page and "not significantly better" in page
    assert "pan neg / tilt ctr" in page and "No class got worse." in page
    assert "1.25" in page and "lost 3 points &lt;b&gt;" in page  # data, escaped, never markup
    assert 'src="data:image/png;base64,iVBOR' in page  # the picture travels with the page


def test_a_model_that_misses_a_class_is_refused_however_accurate_overall():
    per_class = [{"index": i, "name": f"c{i}", "count": 10, "correct": 10 if i else 0, "accuracy": 1.0 if i else 0.0}
                 for i in range(9)]
    evaluation = {"accuracy": 0.889, "per_class": per_class, "parity_max_abs_diff": 1e-7}
    assert acceptance_problems(evaluation, min_accuracy=0.8, min_class_recall=0.0) == []
    problems = acceptance_problems(evaluation, min_accuracy=0.8, min_class_recall=0.4)
    assert problems == ["recall below min_class_recall 0.40 for c0 0.00 (0/10)"]
    # A class absent from the evaluation set has no recall to fall short of.
    absent = [{**c, "count": 0, "correct": 0, "accuracy": None} if c["index"] == 0 else c for c in per_class]
    assert acceptance_problems({**evaluation, "per_class": absent}, min_accuracy=0.8, min_class_recall=0.4) == []


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
