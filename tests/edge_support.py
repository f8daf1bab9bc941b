"""A tiny real model with every edge format, built once per test session and shared.

ResNet-10 with 8 base filters, trained for a few seconds on the 93 training images of
the tiny synthetic set (one image of every Prima pose): it learns those images by
heart, so on them it is right and confident (reduced precision must keep that), while
on the 93 held-out images its probabilities are spread out (float32 formats must match
TensorFlow's there, where small differences are not hidden by a saturated softmax).
A second, untrained model is the "wrong graph" that broken converters slip in.
"""
from __future__ import annotations

import json
from pathlib import Path

_CACHE: dict[str, dict] = {}
EPOCHS = 20
BASE_FILTERS = 8


def tiny_edge_models(tmp_path_factory) -> dict:
    """``{"data", "train", "eval", "frozen", "metadata", "other", "export", "edge_dir"}``, built once."""
    if "models" not in _CACHE:
        _CACHE["models"] = _build(tmp_path_factory.mktemp("edge-models"))
    return _CACHE["models"]


def _build(base: Path) -> dict:
    import tensorflow as tf

    from headpose.artifacts.edge.export import export_edge_models, representative_images
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
    frozen = freeze_saved_model(export_saved_model(model, base / "trained"), base / "frozen")

    tf.keras.utils.set_random_seed(1)
    other = freeze_saved_model(export_saved_model(build_resnet(10, base_filters=4), base / "untrained"),
                               base / "other")
    exported = export_edge_models(frozen.pb_path, frozen.metadata, base / "edge", representative_images(train, 93))
    return {
        "base": base, "data": base / "data", "train": train, "eval": held_out,
        "frozen": frozen.pb_path, "frozen_json": frozen.json_path, "metadata": frozen.metadata,
        "other": other, "export": exported, "edge_dir": base / "edge",
        "manifest": json.loads((base / "edge" / "edge_models.json").read_text()),
    }
