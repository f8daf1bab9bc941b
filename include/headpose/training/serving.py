"""The serving contract's names, standard library only.

The exported SavedModel's ``serving_default`` signature is the tutorial's: input
``inputs`` (float32 ``[N, 84, 84, 3]``, values in [0, 1]), outputs ``probabilities``
(float32 ``[N, 9]``) and ``classes`` (int64 ``[N]``), which TF Serving and SageMaker
endpoint clients written for the tutorial read. Its frozen graph named the same tensors
after their graph nodes: the placeholder ``Const_1`` and the Softmax ``softmax_tensor``.
``NODE_ALIASES`` maps those graph names to the signature's keys, so that freezing and
evaluation accept either.

Here, not in ``export.py``, because the freezing and evaluation code imports these names
while TensorFlow must stay unloaded (an Airflow operator imports it at DAG-parse time).
"""
from __future__ import annotations

from typing import Iterable

SIGNATURE_KEY = "serving_default"
INPUT_KEY = "inputs"
PROBABILITIES_KEY = "probabilities"
CLASSES_KEY = "classes"

# The tutorial's graph node names (tensorflow_resnet_headpose_for_deeplens.ipynb).
SOFTMAX_NODE = "softmax_tensor"
TUTORIAL_INPUT_NODE = "Const_1"
NODE_ALIASES = {SOFTMAX_NODE: PROBABILITIES_KEY, TUTORIAL_INPUT_NODE: INPUT_KEY}

CHANNEL_ORDERS = ("bgr", "rgb")
DEFAULT_CHANNEL_ORDER = "bgr"
# Beside the SavedModel, where TF Serving keeps files that are not part of the graph.
PREPROCESSING_RECORD = "assets.extra/preprocessing.json"


def signature_key_for(name: str, keys: Iterable[str]) -> str | None:
    """The signature key ``name`` stands for: itself, or the key its tutorial alias names."""
    available = set(keys)
    if name in available:
        return name
    alias = NODE_ALIASES.get(name)
    return alias if alias in available else None
