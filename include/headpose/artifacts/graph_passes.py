"""Graph passes on a frozen GraphDef that TensorFlow's own tools do not run in the order we need.

``grappler_fold_constants`` runs two of Grappler's optimisers (constant folding and
arithmetic simplification) on the frozen graph; ``conv_add_to_bias_add`` is the one pass
TF lacks. Both take and return a ``GraphDef`` and import TensorFlow inside.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tensorflow.core.framework.graph_pb2 import GraphDef


CONV_OPS = ("Conv2D", "DepthwiseConv2dNative")


DT_FLOAT = 1  # tensorflow.DataType.DT_FLOAT


def grappler_fold_constants(graph_def: GraphDef, input_names, output_names) -> GraphDef:
    """Grappler's constant folding and arithmetic passes only, on the frozen graph."""
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, rewriter_config_pb2
    from tensorflow.python.grappler import tf_optimizer
    from tensorflow.python.training.saver import export_meta_graph

    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
    meta_graph = export_meta_graph(graph_def=graph_def, graph=graph)
    # Grappler keeps what the "train_op" collection names (the fetches) and the feeds.
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(list(input_names) + list(output_names))
    meta_graph.collection_def["train_op"].CopyFrom(fetch)
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.optimizers[:] = ["constfold", "arithmetic"]
    rewrite.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.TWO
    rewrite.min_graph_nodes = -1
    return tf_optimizer.OptimizeGraph(config, meta_graph, verbose=False)


def conv_add_to_bias_add(graph_def: GraphDef) -> GraphDef:
    """Turn ``AddV2(conv, per-channel constant)`` into ``BiasAdd(conv, constant)``.

    Why by hand: after Grappler has pushed the batch-norm scale into the convolution
    weights, the batch-norm shift is left as an ``AddV2``. Grappler only fuses that pair
    in its CPU remapper (into ``_FusedConv2D``, which edge runtimes cannot load), and
    ``optimize_for_inference`` only knows ``FusedBatchNorm``. ``BiasAdd`` is what
    runtimes recognise as a convolution's bias and merge into the convolution layer.
    The values are unchanged: this only retypes the node.
    """
    result = copy.deepcopy(graph_def)
    nodes = {node.name: node for node in result.node}
    for node in result.node:
        if node.op not in ("Add", "AddV2") or len(node.input) != 2:
            continue
        pair = [nodes.get(node_of(i)) for i in node.input]
        for conv_at in (0, 1):
            conv, const = pair[conv_at], pair[1 - conv_at]
            if _is_nhwc_conv(conv) and _is_vector_const(const, _channels(conv, nodes)):
                data, bias = node.input[conv_at], node.input[1 - conv_at]
                node.op = "BiasAdd"
                node.input[:] = [data, bias]
                node.attr["data_format"].s = b"NHWC"
                break
    return result


def _is_nhwc_conv(node) -> bool:
    return (
        node is not None and node.op in CONV_OPS
        and node.attr["data_format"].s in (b"", b"NHWC")
    )


def _channels(conv, nodes) -> int | None:
    weights = nodes.get(node_of(conv.input[1]))
    if weights is None or weights.op != "Const":
        return None
    shape = [d.size for d in weights.attr["value"].tensor.tensor_shape.dim]
    if len(shape) != 4:
        return None
    return shape[3] if conv.op == "Conv2D" else shape[2] * shape[3]


def _is_vector_const(node, channels: int | None) -> bool:
    if node is None or node.op != "Const" or channels is None:
        return False
    shape = [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
    return shape == [channels]


def split_tensor(name: str) -> tuple[str, int]:
    node, _, index = name.lstrip("^").partition(":")
    return node, int(index) if index else 0


def node_of(input_name: str) -> str:
    return split_tensor(input_name)[0]
