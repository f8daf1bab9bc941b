"""Evaluate a frozen graph on evaluation shards: accuracy, confusion, SavedModel parity.

The graph is run the way a consumer would run the published file - imported from the
``.pb`` alone - so what is measured is what gets published.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from headpose.training import labels
from headpose.training.serving import signature_key_for

# numpy and TensorFlow are imported where used, so that importing this module (an
# Airflow operator may, at DAG-parse time) stays light.
if TYPE_CHECKING:
    import numpy as np
    from tensorflow.core.framework.graph_pb2 import GraphDef

DEFAULT_BATCH_SIZE = 64


class FrozenGraph:
    """A frozen GraphDef as a callable: ``float32 [N, H, W, 3]`` images -> ``[N, C]`` outputs.

    Built with ``tf.compat.v1.wrap_function`` (TF2's way to run a TF1 graph without a
    session to manage) and pruned to the one feed and fetch.
    """

    def __init__(self, graph_def: GraphDef, input_node: str, output_node: str):
        import tensorflow as tf

        names = {node.name for node in graph_def.node}
        for role, name in (("input", input_node), ("output", output_node)):
            if name not in names:
                raise ValueError(f"{role} node {name!r} not in the frozen graph")
        self.graph_def = graph_def
        self.input_node = input_node
        self.output_node = output_node

        def import_graph() -> None:
            tf.compat.v1.import_graph_def(graph_def, name="")

        wrapped = tf.compat.v1.wrap_function(import_graph, [])
        self._run = wrapped.prune(
            feeds=wrapped.graph.get_tensor_by_name(f"{input_node}:0"),
            fetches=wrapped.graph.get_tensor_by_name(f"{output_node}:0"),
        )

    def __call__(self, images) -> np.ndarray:
        """``images``: array or tensor, float32 ``[N, H, W, 3]``; returns a numpy array."""
        import tensorflow as tf

        return self._run(tf.convert_to_tensor(images, tf.float32)).numpy()


def load_frozen_graph(
    pb_path: str | Path, input_node: str = "inputs", output_node: str = "softmax_tensor"
) -> FrozenGraph:
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(Path(pb_path).read_bytes())
    except Exception as error:  # protobuf's DecodeError is not exported in a stable place
        raise ValueError(f"{pb_path} is not a binary GraphDef: {error}") from error
    return FrozenGraph(graph_def, input_node, output_node)


def _saved_model_runner(saved_model_dir: str | Path, output_key: str, signature_key: str):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model_dir))
    function = loaded.signatures[signature_key]
    keys = sorted(function.structured_outputs)
    # The frozen graph's node name stands for a signature key (softmax_tensor: probabilities).
    key = signature_key_for(output_key, keys) or (keys[0] if len(keys) == 1 else None)
    if key is None:
        raise ValueError(f"signature {signature_key!r} has no output {output_key!r}; it has {keys}")
    input_key = next(iter(function.structured_input_signature[1]))

    def run(images) -> np.ndarray:
        _ = loaded  # the loaded object owns the variables; keep it alive with the function
        return function(**{input_key: images})[key].numpy()

    return run


def evaluate_frozen_graph(
    pb_path: str | Path,
    eval_shard_paths: Iterable[str | Path],
    saved_model_dir: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    input_node: str = "inputs",
    output_node: str = "softmax_tensor",
    signature_key: str = "serving_default",
    reverse_channels: bool = False,
) -> dict:
    """Accuracy and 9x9 confusion (rows = true class) of the frozen graph on the shards.

    ``per_image_correct`` has one character per image, in the shards' order: ``1`` where
    the top class is the true one. Two models scored on the same shards are compared
    image by image with it (``artifacts.comparison``); ``labels_sha256`` (of the true
    classes in that order) tells that the images were the same. With ``saved_model_dir``, the SavedModel runs on the same batches and
    ``parity_max_abs_diff`` is the largest absolute difference between the two outputs.
    ``reverse_channels`` feeds the images BGR<->RGB swapped: for a model trained in the
    other channel order than the shards hold (a champion from before BGR, say).
    """
    import numpy as np

    from headpose.training import shards  # imports TensorFlow

    graph = load_frozen_graph(pb_path, input_node, output_node)
    reference = (
        _saved_model_runner(saved_model_dir, output_node, signature_key) if saved_model_dir else None
    )
    confusion = np.zeros((labels.NUM_CLASSES, labels.NUM_CLASSES), dtype=np.int64)
    parity = 0.0
    correct, truth = [], hashlib.sha256()
    for images, classes in shards.dataset(list(eval_shard_paths), batch_size, training=False):
        if reverse_channels:
            images = images[..., ::-1]
        probabilities = graph(images)
        if probabilities.ndim != 2 or probabilities.shape[1] != labels.NUM_CLASSES:
            raise ValueError(
                f"{output_node} gives shape {probabilities.shape}, expected [N, {labels.NUM_CLASSES}]"
            )
        true, predicted = classes.numpy(), probabilities.argmax(axis=1)
        np.add.at(confusion, (true, predicted), 1)
        correct.append(true == predicted)
        truth.update(true.astype(np.int8).tobytes())
        if reference is not None:
            parity = max(parity, float(np.max(np.abs(probabilities - reference(images)))))
    report = _report(confusion, parity if reference is not None else None)
    hits = np.concatenate(correct) if correct else np.zeros(0, dtype=bool)
    return {**report, "per_image_correct": "".join("1" if hit else "0" for hit in hits),
            "labels_sha256": truth.hexdigest()}


def _report(confusion: np.ndarray, parity: float | None) -> dict:
    import numpy as np

    total = int(confusion.sum())
    if total == 0:
        raise ValueError("the evaluation shards hold no images")
    correct = np.diag(confusion)
    per_class_total = confusion.sum(axis=1)
    names = labels.class_names()
    return {
        "images": total,
        "correct": int(correct.sum()),
        "accuracy": float(correct.sum() / total),
        "per_class": [
            {
                "index": i,
                "name": names[i],
                "count": int(per_class_total[i]),
                "correct": int(correct[i]),
                "predicted": int(confusion[:, i].sum()),
                "accuracy": float(correct[i] / per_class_total[i]) if per_class_total[i] else None,
            }
            for i in range(labels.NUM_CLASSES)
        ],
        "confusion_matrix": confusion.tolist(),
        "confusion_rows": "true class",
        "confusion_columns": "predicted class",
        "parity_max_abs_diff": parity,
    }

