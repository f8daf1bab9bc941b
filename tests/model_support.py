"""One small trained model per test session, and what the pipeline makes of it.

ResNet-10 with 8 base filters, trained for a few seconds on the 93 training images of
the tiny synthetic set (one image of every Prima pose): it learns those images by
heart, so on them it is right and confident (reduced precision must keep that), while
on the 93 held-out images its probabilities are spread out (float32 formats must match
TensorFlow's there, where small differences are not hidden by a saturated softmax).

``tiny_model`` is that model as training leaves it (``export/Servo/<ts>`` under a model
folder), packed as SageMaker packs ``model.tar.gz``, and frozen: the freeze, evaluation,
acceptance and edge tests share it (conftest's ``tiny_model`` fixture). ``tiny_edge_models``
adds every edge format of its frozen graph, and a second, untrained model - the "wrong
graph" that broken converters slip in (conftest's ``tiny_edge_models``).
"""
from __future__ import annotations

import json
from pathlib import Path

EPOCHS = 20
BASE_FILTERS = 8


def build_tiny_model(base: Path) -> dict:
    """``{"data", "train", "eval", "model_dir", "saved_model", "archive", "frozen", "frozen_json",
    "metadata", "freeze_result"}``: the trained model, exported, packed and frozen."""
    import tensorflow as tf

    from headpose.artifacts.archive import pack_model_dir
    from headpose.artifacts.freeze import freeze_saved_model
    from headpose.datasets.synthetic import write_synthetic_dataset
    from headpose.training import shards
    from headpose.training.export import export_saved_model
    from headpose.training.model import build_resnet

    write_synthetic_dataset(base / "data", 1, 1, seed=0, images_per_shard=128, workers=1)
    train, held_out = shards.shard_paths(base / "data", "train"), shards.shard_paths(base / "data", "eval")
    images, classes = next(iter(shards.dataset(train, 93, training=False)))
    tf.keras.utils.set_random_seed(0)
    model = build_resnet(10, base_filters=BASE_FILTERS, batch_norm_momentum=0.9, weight_decay=0)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(images, classes, batch_size=31, epochs=EPOCHS, verbose=0)
    saved_model = export_saved_model(model, base / "trained")
    archive = pack_model_dir(base / "trained", base / "model.tar.gz")
    frozen = freeze_saved_model(saved_model, base / "frozen")
    return {
        "base": base, "data": base / "data", "train": train, "eval": held_out,
        "model_dir": base / "trained", "saved_model": saved_model, "archive": archive,
        "frozen": frozen.pb_path, "frozen_json": frozen.json_path, "metadata": frozen.metadata,
        "freeze_result": frozen,
    }


def build_edge_models(model: dict, base: Path) -> dict:
    """``model`` with every edge format of its frozen graph, and an untrained model frozen."""
    import tensorflow as tf

    from headpose.artifacts.edge.export import export_edge_models, representative_images
    from headpose.artifacts.freeze import freeze_saved_model
    from headpose.training.export import export_saved_model
    from headpose.training.model import build_resnet

    tf.keras.utils.set_random_seed(1)
    other = freeze_saved_model(export_saved_model(build_resnet(10, base_filters=4), base / "untrained"),
                               base / "other")
    exported = export_edge_models(model["frozen"], model["metadata"], base / "edge",
                                  representative_images(model["train"], 93))
    return {**model, "other": other, "export": exported, "edge_dir": base / "edge",
            "manifest": json.loads((base / "edge" / "edge_models.json").read_text())}
