"""Evaluating a frozen graph on real shards: counts, confusion, parity with the SavedModel."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from headpose.artifacts.confusion_plot import tick_labels, write_confusion_png
from headpose.artifacts.evaluate import evaluate_frozen_graph, load_frozen_graph
from headpose.training import labels
from headpose.training.shards import ShardWriter, shard_paths

# (tilt, pan) in degrees: every class at least once; 23 images over 3 shards of 8, so
# batches of 5 cross shard ends and the last batch is short.
ANGLES = [(t, p) for p in (-60, 0, 60) for t in (-30, 0, 30)] * 2 + [
    (0, 0), (15, -90), (-90, 90), (60, 15), (-15, 0),
]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """The session's trained model, frozen, on shards of random images of ANGLES."""
    base = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(3)
    with ShardWriter(base / "data", "eval", images_per_shard=8) as writer:
        for tilt, pan in ANGLES:
            writer.write(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8), tilt, pan)
    return {
        "base": base,
        "shards": shard_paths(base / "data", "eval"),
        "summary": writer.summary(),
        "saved_model": tiny_model["saved_model"],
        "pb": tiny_model["frozen"],
    }


def saved_model_predictions(saved_model: Path, shard_files) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: true and predicted classes from the SavedModel itself."""
    from headpose.training.shards import dataset

    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    truth, predicted = [], []
    for images, classes in dataset(shard_files, 4, training=False):
        truth.append(classes.numpy())
        predicted.append(serve(inputs=images)["classes"].numpy())
    return np.concatenate(truth), np.concatenate(predicted)


@pytest.mark.slow
def test_accuracy_and_confusion(setup):
    assert len(setup["shards"]) == 3
    report = evaluate_frozen_graph(setup["pb"], setup["shards"], setup["saved_model"], batch_size=5)
    matrix = np.array(report["confusion_matrix"])

    assert report["images"] == len(ANGLES) == matrix.sum()
    assert matrix.shape == (labels.NUM_CLASSES, labels.NUM_CLASSES)
    # Rows are the true classes: their sums are what the shard writer counted.
    assert matrix.sum(axis=1).tolist() == setup["summary"]["per_class"]
    assert [c["count"] for c in report["per_class"]] == setup["summary"]["per_class"]
    assert [c["predicted"] for c in report["per_class"]] == matrix.sum(axis=0).tolist()
    assert report["correct"] == np.trace(matrix)
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / len(ANGLES))
    assert [c["name"] for c in report["per_class"]] == labels.class_names()

    truth, predicted = saved_model_predictions(setup["saved_model"], setup["shards"])
    expected = np.zeros_like(matrix)
    np.add.at(expected, (truth, predicted), 1)
    assert (matrix == expected).all()
    # One answer per image, in the shards' order: what the paired comparison pairs.
    assert report["per_image_correct"] == "".join("1" if t == p else "0" for t, p in zip(truth, predicted))
    assert report["labels_sha256"] == hashlib.sha256(truth.astype(np.int8).tobytes()).hexdigest()

    assert 0.0 <= report["parity_max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_the_tutorials_node_names_are_compared_with_the_signatures_probabilities(setup):
    # softmax_tensor is the node; the SavedModel answers with probabilities (and classes,
    # which must not be taken for it: it is the only other output).
    from headpose.artifacts.freeze import freeze_graph

    frozen = freeze_graph(setup["saved_model"], "Const_1", "softmax_tensor", setup["base"] / "tutorial")
    report = evaluate_frozen_graph(frozen.pb_path, setup["shards"], setup["saved_model"], batch_size=5,
                                   input_node="Const_1", output_node="softmax_tensor")
    reference = evaluate_frozen_graph(setup["pb"], setup["shards"], batch_size=5)
    assert report["confusion_matrix"] == reference["confusion_matrix"]
    assert 0.0 <= report["parity_max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_without_saved_model_there_is_no_parity(setup):
    report = evaluate_frozen_graph(setup["pb"], setup["shards"][:1], batch_size=64)
    assert report["images"] == 8
    assert report["parity_max_abs_diff"] is None


@pytest.mark.slow
def test_load_frozen_graph_runs_batches(setup):
    graph = load_frozen_graph(setup["pb"])
    out = graph(np.zeros((3, 84, 84, 3), np.float32))
    assert out.shape == (3, labels.NUM_CLASSES)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_wrong_node_and_bad_file(setup, tmp_path):
    with pytest.raises(ValueError, match="output node 'probabilities' not in the frozen graph"):
        load_frozen_graph(setup["pb"], output_node="probabilities")
    bad = tmp_path / "bad.pb"
    bad.write_bytes(b"\xff\xff\xff not a graph")
    with pytest.raises(ValueError, match="not a binary GraphDef"):
        load_frozen_graph(bad)


def test_the_confusion_picture_names_the_classes_and_sets_the_published_model_beside_the_new_one(tmp_path):
    from PIL import Image

    assert tick_labels()[:4] == ["pan neg / tilt neg", "pan neg / tilt ctr", "pan neg / tilt pos", "pan ctr / tilt neg"]
    matrix = np.eye(labels.NUM_CLASSES, dtype=int) * 5
    matrix[0, 1] = 5
    alone = write_confusion_png(tmp_path / "alone.png", matrix.tolist(), "new: job-b")
    paired = write_confusion_png(tmp_path / "paired.png", matrix.tolist(), "new: job-b", np.eye(9, dtype=int).tolist(),
                                 "published: job-a")
    with Image.open(alone) as one, Image.open(paired) as two:
        assert one.format == two.format == "PNG"
        assert one.height == two.height and 1.7 < two.width / one.width < 2.3  # side by side, the same scale
        assert one.width > 500  # big enough for its labels, counts and recalls (the old one was 216 px)
