"""SavedModel export in the layout the tutorial's freeze step looks for.

``<model_dir>/export/Servo/<unix-timestamp>/`` holds a SavedModel whose
``serving_default`` signature takes ``inputs`` (float32 ``[N, 84, 84, 3]`` RGB in
[0, 1]) and returns ``softmax_tensor`` (float32 ``[N, 9]`` probabilities). The graph
nodes carry those same names, so the frozen graph's input and output node names are
stable whatever Keras names its layers.
"""
from __future__ import annotations

import time
from pathlib import Path

import tensorflow as tf

from headpose.training.model import INPUT_SHAPE, OUTPUT_NAME

INPUT_NAME = "inputs"
SIGNATURE_KEY = "serving_default"


def export_dir_for(model_dir: str | Path, timestamp: int | None = None) -> Path:
    """A fresh ``export/Servo/<timestamp>`` folder under ``model_dir``."""
    stamp = int(time.time()) if timestamp is None else timestamp
    base = Path(model_dir) / "export" / "Servo"
    while (base / str(stamp)).exists():
        stamp += 1
    return base / str(stamp)


def export_saved_model(model: tf.keras.Model, model_dir: str | Path) -> Path:
    """Write ``model`` as a SavedModel with the serving contract above; returns its folder."""
    path = export_dir_for(model_dir)
    spec = tf.TensorSpec([None, *INPUT_SHAPE], tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = model(inputs, training=False)
        return {OUTPUT_NAME: tf.identity(probabilities, name=OUTPUT_NAME)}

    module = tf.Module()
    module.model = model  # tracked so that the variables are saved
    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={SIGNATURE_KEY: serve})
    return path
