"""Naming a converted graph's inputs and outputs as the freeze step is asked to.

After ``convert_variables_to_constants_v2`` the signature's tensors sit behind generated
names (``StatefulPartitionedCall/...`` and chains of ``Identity`` nodes). The frozen
graph's consumers address them by node name, so the placeholder and the op producing
each output get the names asked for: the signature's keys, the tutorial's node names
(``Const_1``, ``softmax_tensor``; ``headpose.training.serving.NODE_ALIASES``), or nodes
of the graph by their own names.
"""
from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Sequence

from headpose.artifacts.graph_passes import DT_FLOAT, node_of, split_tensor
from headpose.training.labels import NUM_CLASSES
from headpose.training.serving import NODE_ALIASES, signature_key_for

if TYPE_CHECKING:
    from tensorflow.core.framework.graph_pb2 import GraphDef


class GraphNameError(ValueError):
    """A requested input or output name that the graph cannot be given."""


def name_inputs(graph_def, function, converted, requested: Sequence[str]):
    """``(graph_def with the inputs named as asked, {input name: signature key or None})``.

    Only the tutorial's names rename a placeholder: any other name that is not a
    placeholder is refused, so a SavedModel with an unexpected input is not frozen as if
    it met the contract.
    """
    # Signature functions take flat dicts; TF flattens them in sorted key order.
    specs = function.structured_input_signature[1]
    by_key = {key: split_tensor(t.name)[0] for key, t in zip(sorted(specs), converted.inputs)}
    placeholders = [node.name for node in graph_def.node if node.op == "Placeholder"]
    result, keys = graph_def, {}
    for name in requested:
        if name in placeholders:
            keys[name] = next((key for key, node in by_key.items() if node == name), None)
            continue
        key = NODE_ALIASES.get(name)
        if key not in by_key:
            raise GraphNameError(f"input node {name!r} is not a placeholder; placeholders: {placeholders}")
        if any(node.name == name for node in result.node):
            raise GraphNameError(f"cannot name the input {name!r}: a different node has that name")
        result = copy.deepcopy(result)
        _rename_node(result, by_key[key], name)
        keys[name] = key
    return result, keys


def name_outputs(graph_def, function, converted, requested: Sequence[str]):
    """``({output name: tensor in the converted graph}, {output name: signature key or None})``."""
    # Signature functions return a flat dict; TF flattens dicts in sorted key order.
    keys = sorted(function.structured_outputs)
    by_key = {key: tensor.name for key, tensor in zip(keys, converted.outputs)}
    nodes = {node.name for node in graph_def.node}
    resolved, signature = {}, {}
    for name in requested:
        key = signature_key_for(name, keys)
        if key is not None:
            resolved[name], signature[name] = by_key[key], key
        elif name in nodes:
            resolved[name], signature[name] = f"{name}:0", None
        else:
            raise GraphNameError(
                f"output node {name!r} is neither an output of the signature nor a node; "
                f"candidates: {_output_candidates(graph_def, keys)}"
            )
    return resolved, signature


def check_class_outputs(function, signature_keys: dict[str, str | None]) -> None:
    """Refuse an output whose last axis is not one score per head-pose class.

    The frozen model's metadata maps output index i to class i of the 3 x 3 grid; a graph
    with another width would reach validation, the edge converters and devices with
    labels that do not belong to its outputs.
    """
    for name, key in signature_keys.items():
        spec = function.structured_outputs.get(key) if key else None
        shape = getattr(spec, "shape", None)
        width = shape[-1] if shape is not None and shape.rank else None
        if width is not None and width != NUM_CLASSES:
            raise GraphNameError(
                f"output {name!r} (signature output {key!r}) has {width} scores per image; "
                f"the class map has {NUM_CLASSES} head-pose classes"
            )


def _output_candidates(graph_def, signature_keys: Sequence[str]) -> list[str]:
    """Signature output keys, then nodes that look like outputs (softmax, graph sinks)."""
    consumed = {node_of(i) for node in graph_def.node for i in node.input}
    likely = [
        node.name for node in graph_def.node
        if node.op in ("Softmax", "Sigmoid")
        or (node.op == "Identity" and node.name not in consumed)
    ]
    return list(signature_keys) + likely


def rename_outputs(graph_def: GraphDef, outputs: dict[str, str]) -> GraphDef:
    """Give each output's producing op the requested name.

    The signature's tensor is reached through ``Identity`` nodes added by the function
    call machinery; the op behind them (the ``Softmax``) is renamed, as in the tutorial's
    graph, and the now unreachable ``Identity`` chain is stripped later.
    """
    result = copy.deepcopy(graph_def)
    nodes = {node.name: node for node in result.node}
    for wanted, tensor in outputs.items():
        if split_tensor(tensor)[0] == wanted:  # a graph node asked for by its own name
            continue
        producer, index = _through_identities(nodes, tensor)
        if wanted in nodes:
            raise GraphNameError(f"cannot name the output {wanted!r}: a different node has that name")
        if index == 0:
            _rename_node(result, producer, wanted)
        else:
            alias = result.node.add(name=wanted, op="Identity", input=[f"{producer}:{index}"])
            alias.attr["T"].type = nodes[producer].attr["T"].type or DT_FLOAT
        nodes = {node.name: node for node in result.node}
    return result


def _through_identities(nodes, tensor: str) -> tuple[str, int]:
    name, index = split_tensor(tensor)
    while nodes[name].op == "Identity" and index == 0:
        data_inputs = [i for i in nodes[name].input if not i.startswith("^")]
        name, index = split_tensor(data_inputs[0])
    return name, index


def _rename_node(graph_def, old: str, new: str) -> None:
    pattern = re.compile(rf"^(\^?){re.escape(old)}(:\d+)?$")
    for node in graph_def.node:
        if node.name == old:
            node.name = new
        node.input[:] = [pattern.sub(rf"\g<1>{new}\g<2>", i) for i in node.input]
