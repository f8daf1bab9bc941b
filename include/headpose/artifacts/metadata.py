"""``frozen_model.json``: what a consumer needs besides the graph.

Tensor names (and the signature keys they stand for), shapes and dtypes, the
preprocessing (layout, size, channel order ``bgr`` | ``rgb``, value range), the class
map and bins, the TensorFlow version and the graph's checksum. The edge formats carry
the same fields, so this is kept apart from the freezing itself.
"""
from __future__ import annotations

import collections
from typing import Mapping

from headpose.artifacts.graph_passes import DT_FLOAT
from headpose.planning.layout import FROZEN_MODEL_FILE
from headpose.training import labels
from headpose.training.serving import DEFAULT_CHANNEL_ORDER


def build_metadata(graph_def, input_names, output_names, function, signature_key: str,
                   sha256: str, size_bytes: int, node_count_before: int,
                   parity: float | None, *, signature_names: Mapping[str, str | None] | None = None,
                   channel_order: str = DEFAULT_CHANNEL_ORDER) -> dict:
    """What a consumer needs besides the graph: tensors, preprocessing, class map.

    ``signature_names`` maps a node name to the signature key it stands for (the
    tutorial's ``softmax_tensor`` for ``probabilities``); by default each name is its own key.
    """
    import tensorflow as tf

    keys = {name: name for name in [*input_names, *output_names]} | dict(signature_names or {})
    nodes = {node.name: node for node in graph_def.node}
    input_shapes = {name: _shape_list(nodes[name].attr["shape"].shape) for name in input_names}
    out_specs = {name: function.structured_outputs[keys[name]] for name in output_names
                 if keys[name] in function.structured_outputs}
    low, high = labels.BIN_THRESHOLDS
    names = labels.class_names()
    return {
        "format": "tensorflow frozen GraphDef (binary protobuf)",
        "graph_file": FROZEN_MODEL_FILE,
        "sha256": sha256,
        "size_bytes": size_bytes,
        "node_count": len(graph_def.node),
        "node_count_before_optimisation": node_count_before,
        "op_counts": dict(sorted(collections.Counter(n.op for n in graph_def.node).items())),
        "tensorflow_version": tf.__version__,
        "signature_key": signature_key,
        "inputs": [
            {
                "name": name,
                "tensor": f"{name}:0",
                "dtype": tf.dtypes.as_dtype(nodes[name].attr["dtype"].type).name,
                "shape": input_shapes[name],
                "signature_input": keys[name],
            }
            for name in input_names
        ],
        "outputs": [
            {
                "name": name,
                "tensor": f"{name}:0",
                "dtype": (out_specs[name].dtype if name in out_specs
                          else tf.dtypes.as_dtype(nodes[name].attr["T"].type or DT_FLOAT)).name,
                "shape": out_specs[name].shape.as_list() if name in out_specs else None,
                "signature_output": keys[name] if name in out_specs else None,
            }
            for name in output_names
        ],
        "preprocessing": {
            "layout": "NHWC",
            "image_size": (input_shapes[input_names[0]] or [None] * 4)[1:3],
            "channel_order": channel_order,
            "value_range": [0.0, 1.0],
            "scaling": "float32(uint8 pixel) / 255",
        },
        "classes": [
            {
                "index": i, "name": names[i],
                "pan_bin": i // labels.NUM_BINS, "tilt_bin": i % labels.NUM_BINS,
            }
            for i in range(labels.NUM_CLASSES)
        ],
        "class_index": "pan_bin * 3 + tilt_bin",
        "bins": {
            "angle_normalisation": "degrees / 90",
            "thresholds_normalised": [low, high],
            "thresholds_degrees": [low * 90.0, high * 90.0],
            "bin_of_angle": "0 if a < t0, 1 if t0 <= a < t1, 2 if a >= t1",
        },
        "parity_max_abs_diff": parity,
    }


def _shape_list(shape_proto) -> list[int | None] | None:
    if shape_proto.unknown_rank:
        return None
    return [None if d.size < 0 else d.size for d in shape_proto.dim]
