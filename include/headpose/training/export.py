"""SavedModel export in the layout the tutorial's freeze step looks for.

``<model_dir>/export/Servo/<unix-timestamp>/`` holds a SavedModel whose
``serving_default`` signature is the tutorial's (``headpose.training.serving``): it takes
``inputs`` and returns ``probabilities`` and ``classes``. The channel order the model was
trained on is recorded beside it, in ``assets.extra/preprocessing.json``, where freezing
reads it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import tensorflow as tf

from headpose.training.model import INPUT_SHAPE
from headpose.training.serving import (
    CHANNEL_ORDERS,
    CLASSES_KEY,
    DEFAULT_CHANNEL_ORDER,
    INPUT_KEY,
    PREPROCESSING_RECORD,
    PROBABILITIES_KEY,
    SIGNATURE_KEY,
)


def export_dir_for(model_dir: str | Path, timestamp: int | None = None) -> Path:
    """A fresh ``export/Servo/<timestamp>`` folder under ``model_dir``."""
    stamp = int(time.time()) if timestamp is None else timestamp
    base = Path(model_dir) / "export" / "Servo"
    while (base / str(stamp)).exists():
        stamp += 1
    return base / str(stamp)


def export_saved_model(
    model: tf.keras.Model, model_dir: str | Path, channel_order: str = DEFAULT_CHANNEL_ORDER
) -> Path:
    """Write ``model`` as a SavedModel with the serving contract above; returns its folder."""
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
    path = export_dir_for(model_dir)
    spec = tf.TensorSpec([None, *INPUT_SHAPE], tf.float32, name=INPUT_KEY)

    @tf.function(input_signature=[spec])
    def serve(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = model(inputs, training=False)
        classes = tf.argmax(probabilities, axis=1, output_type=tf.int64)
        return {PROBABILITIES_KEY: probabilities, CLASSES_KEY: classes}

    module = tf.Module()
    module.model = model  # tracked so that the variables are saved
    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={SIGNATURE_KEY: serve})
    record = path / PREPROCESSING_RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"channel_order": channel_order}, indent=2) + "\n")
    return path
