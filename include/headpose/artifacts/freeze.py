"""Freeze a SavedModel into one portable ``frozen_model.pb`` plus ``frozen_model.json``.

The frozen graph is what edge runtimes (OpenCV DNN, TF1 C API, TFLite converters) load:
variables become constants, the input is the ``Placeholder`` ``inputs`` and the output
the node ``softmax_tensor``, as in the tutorial's graph. The steps, TF's own tools first:

1. ``convert_variables_to_constants_v2`` on the signature's concrete function;
2. the signature output gets the requested node name (after conversion it sits behind
   ``StatefulPartitionedCall/softmax_tensor`` and a chain of ``Identity`` nodes);
3. ``optimize_for_inference`` (strip unused nodes, remove training nodes, fold
   ``FusedBatchNorm`` into convolutions where a graph has those);
4. Grappler constant folding + arithmetic simplification. Keras 3 writes batch norm as
   unfused ``Rsqrt``/``Mul``/``Sub``/``AddV2`` on what are now constants, which step 3
   does not recognise; Grappler folds those to one scale and one shift per channel and
   pushes a scale that follows a convolution into its weights. The CPU-specific
   remapper (``_FusedConv2D``...) is deliberately not run: the graph must stay portable;
5. the one pass TF lacks, below: a constant per-channel ``AddV2`` after a convolution
   becomes a ``BiasAdd``.

Command line: ``python -m headpose.artifacts.freeze --help``.
"""
from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import json
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from headpose.artifacts.archive import find_saved_model, safe_extract
from headpose.artifacts.graph_passes import (
    DT_FLOAT,
    conv_add_to_bias_add,
    grappler_fold_constants,
    node_of,
    split_tensor,
)
from headpose.artifacts.metadata import build_metadata
from headpose.planning.layout import FROZEN_MODEL_FILE, FROZEN_MODEL_JSON_FILE

# TensorFlow is imported inside the functions that run it: importing this module (an
# Airflow operator does, at DAG-parse time) or asking the CLI for --help stays instant.
if TYPE_CHECKING:
    from tensorflow.core.framework.graph_pb2 import GraphDef

DEFAULT_INPUTS = ("inputs",)
DEFAULT_OUTPUTS = ("softmax_tensor",)
DEFAULT_SIGNATURE = "serving_default"
DEFAULT_PARITY_TOLERANCE = 1e-4

# Ops that must not survive freezing: variables and their reads, function calls that
# would hide un-inlined bodies, and unfolded batch-norm arithmetic.
FORBIDDEN_OPS = frozenset({
    "VarHandleOp", "ReadVariableOp", "VariableV2", "Variable", "AssignVariableOp",
    "Assign", "AssignSub", "AssignAdd", "StatefulPartitionedCall", "PartitionedCall",
    "SaveV2", "RestoreV2", "NoOp", "Rsqrt", "RandomUniform", "RandomStandardNormal",
})


class FreezeError(ValueError):
    """The SavedModel cannot be frozen as asked (unreadable, wrong names, bad result)."""


@dataclass(frozen=True)
class FreezeResult:
    pb_path: Path
    json_path: Path
    sha256: str
    size_bytes: int
    node_count: int
    node_count_before: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    parity_max_abs_diff: float | None
    metadata: dict = field(repr=False)

    def summary(self) -> dict:
        """JSON-ready fields (for XCom or the command line), without the metadata."""
        out = asdict(self)
        out.pop("metadata")
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def freeze_saved_model(
    saved_model_dir: str | Path,
    output_dir: str | Path,
    input_node_names: Sequence[str] = DEFAULT_INPUTS,
    output_node_names: Sequence[str] = DEFAULT_OUTPUTS,
    signature_key: str = DEFAULT_SIGNATURE,
    parity_tolerance: float | None = DEFAULT_PARITY_TOLERANCE,
) -> FreezeResult:
    """Freeze ``saved_model_dir`` into ``output_dir/frozen_model.{pb,json}``.

    ``output_node_names`` are signature output keys (the node gets that name) or names of
    nodes in the converted graph. With ``parity_tolerance`` set, the frozen graph is run
    on a small fixed random batch and must match the SavedModel that closely.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tensorflow.python.tools import optimize_for_inference_lib

    loaded, function = _load_signature(saved_model_dir, signature_key)  # ``loaded`` owns the variables
    converted = convert_variables_to_constants_v2(function)
    graph_def = converted.graph.as_graph_def()
    node_count_before = len(graph_def.node)
    outputs = _named_outputs(graph_def, function, converted, output_node_names)
    graph_def = _rename_outputs(graph_def, outputs)
    input_names = list(input_node_names)
    _check_inputs(graph_def, input_names)
    output_names = list(output_node_names)
    dtypes = [_placeholder_dtype(graph_def, name) for name in input_names]
    graph_def = optimize_for_inference_lib.optimize_for_inference(
        graph_def, input_names, output_names, dtypes
    )
    graph_def = grappler_fold_constants(graph_def, input_names, output_names)
    graph_def = conv_add_to_bias_add(graph_def)
    graph_def = tf.compat.v1.graph_util.extract_sub_graph(graph_def, output_names)
    for node in graph_def.node:
        node.device = ""  # no placement tied to the freezing machine
    _verify(graph_def, input_names, output_names, node_count_before)

    parity = None
    if parity_tolerance is not None:
        parity = _parity(function, graph_def, input_names, output_names, signature_key)
        if parity is not None and parity > parity_tolerance:
            raise FreezeError(
                f"frozen graph differs from the SavedModel by {parity:.3g} (> {parity_tolerance})"
            )
    return _write(graph_def, Path(output_dir), input_names, output_names, function,
                  signature_key, node_count_before, parity)


def freeze_model_archive(
    tar_path: str | Path,
    output_dir: str | Path,
    work_dir: str | Path | None = None,
    **options,
) -> FreezeResult:
    """Safely extract a ``model.tar.gz``, find its one SavedModel and freeze it."""
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="freeze-") as scratch:
        extracted = safe_extract(tar_path, Path(scratch) / "model")
        return freeze_saved_model(find_saved_model(extracted), output_dir, **options)


def _load_signature(saved_model_dir: str | Path, signature_key: str) -> tuple[object, object]:
    import tensorflow as tf

    path = Path(saved_model_dir)
    if not (path / "saved_model.pb").is_file():
        raise FreezeError(f"no saved_model.pb in {path}")
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as error:  # TF raises a zoo of types for a damaged SavedModel
        raise FreezeError(
            f"cannot load the SavedModel in {path}: {type(error).__name__}: {error}"
        ) from error
    signatures = dict(loaded.signatures)
    if signature_key not in signatures:
        raise FreezeError(
            f"signature {signature_key!r} not in the SavedModel; it has {sorted(signatures)}"
        )
    return loaded, signatures[signature_key]


def _named_outputs(graph_def, function, converted, requested: Sequence[str]) -> dict[str, str]:
    """Requested output name -> tensor name in the converted graph."""
    # Signature functions return a flat dict; TF flattens dicts in sorted key order.
    keys = sorted(function.structured_outputs)
    by_key = {key: tensor.name for key, tensor in zip(keys, converted.outputs)}
    nodes = {node.name for node in graph_def.node}
    resolved = {}
    for name in requested:
        if name in by_key:
            resolved[name] = by_key[name]
        elif name in nodes:
            resolved[name] = f"{name}:0"
        else:
            raise FreezeError(
                f"output node {name!r} is neither an output of the signature nor a node; "
                f"candidates: {_output_candidates(graph_def, keys)}"
            )
    return resolved


def _output_candidates(graph_def, signature_keys: Sequence[str]) -> list[str]:
    """Signature output keys, then nodes that look like outputs (softmax, graph sinks)."""
    consumed = {node_of(i) for node in graph_def.node for i in node.input}
    likely = [
        node.name for node in graph_def.node
        if node.op in ("Softmax", "Sigmoid")
        or (node.op == "Identity" and node.name not in consumed)
    ]
    return list(signature_keys) + likely


def _rename_outputs(graph_def: GraphDef, outputs: dict[str, str]) -> GraphDef:
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
            raise FreezeError(f"cannot name the output {wanted!r}: a different node has that name")
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


def _check_inputs(graph_def, input_names: Sequence[str]) -> None:
    placeholders = [node.name for node in graph_def.node if node.op == "Placeholder"]
    for name in input_names:
        if name not in placeholders:
            raise FreezeError(f"input node {name!r} is not a placeholder; placeholders: {placeholders}")


def _placeholder_dtype(graph_def, name: str) -> int:
    return next(node.attr["dtype"].type for node in graph_def.node if node.name == name)


def _verify(graph_def: GraphDef, input_names, output_names, node_count_before: int) -> None:
    import tensorflow as tf

    counts = collections.Counter(node.op for node in graph_def.node)
    bad = sorted(op for op in counts if op in FORBIDDEN_OPS or op.startswith("_"))
    if bad:
        raise FreezeError(f"frozen graph still has ops that do not belong: {bad}")
    if graph_def.library.function:
        raise FreezeError("frozen graph still holds a function library")
    if len(graph_def.node) >= node_count_before:
        raise FreezeError(
            f"freezing did not shrink the graph ({node_count_before} -> {len(graph_def.node)})"
        )
    placeholders = sorted(node.name for node in graph_def.node if node.op == "Placeholder")
    if placeholders != sorted(input_names):
        raise FreezeError(
            f"frozen graph placeholders {placeholders} are not the inputs {list(input_names)}"
        )
    names = {node.name for node in graph_def.node}
    missing = [name for name in output_names if name not in names]
    if missing:
        raise FreezeError(f"outputs {missing} missing from the frozen graph")
    with tf.Graph().as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")  # raises on a malformed graph


def run_graph_def(graph_def: GraphDef, feeds: dict, fetches: Sequence[str]) -> list:
    """Run a frozen GraphDef once in a plain TF1 session (how consumers will run it)."""
    import tensorflow as tf

    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run(
                [f"{name}:0" for name in fetches], {f"{k}:0": v for k, v in feeds.items()}
            )


def _parity(function, graph_def, input_names, output_names, signature_key) -> float | None:
    """Largest absolute output difference on a fixed random batch of two images.

    ``None`` when no requested output is a signature output (nothing to compare with).
    """
    import numpy as np
    import tensorflow as tf

    feeds = {}
    rng = np.random.default_rng(0)
    for name in input_names:
        spec = function.structured_input_signature[1].get(name)
        if spec is None:
            raise FreezeError(
                f"input {name!r} is not an input of signature {signature_key!r}, cannot check parity"
            )
        shape = [2 if d is None else d for d in spec.shape.as_list()]
        feeds[name] = rng.random(shape, dtype=np.float32)
    expected = function(**{k: tf.constant(v) for k, v in feeds.items()})
    frozen = run_graph_def(graph_def, feeds, output_names)
    diffs = []
    for name, value in zip(output_names, frozen):
        if name in expected:
            diffs.append(float(np.max(np.abs(value - expected[name].numpy()))))
    return max(diffs) if diffs else None


def _write(graph_def, output_dir: Path, input_names, output_names, function,
           signature_key: str, node_count_before: int, parity: float | None) -> FreezeResult:
    output_dir.mkdir(parents=True, exist_ok=True)
    pb_path = output_dir / FROZEN_MODEL_FILE
    data = graph_def.SerializeToString(deterministic=True)
    _write_atomically(pb_path, data)
    sha256 = hashlib.sha256(data).hexdigest()
    metadata = build_metadata(
        graph_def, input_names, output_names, function, signature_key,
        sha256, len(data), node_count_before, parity,
    )
    json_path = output_dir / FROZEN_MODEL_JSON_FILE
    _write_atomically(json_path, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())
    return FreezeResult(
        pb_path=pb_path, json_path=json_path, sha256=sha256, size_bytes=len(data),
        node_count=len(graph_def.node), node_count_before=node_count_before,
        input_names=tuple(input_names), output_names=tuple(output_names),
        parity_max_abs_diff=parity, metadata=metadata,
    )


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers (an upload, a retried task) never see a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m headpose.artifacts.freeze",
        description=(
            "Freeze a TensorFlow SavedModel (or a SageMaker model.tar.gz holding one under "
            "export/*/*) into frozen_model.pb plus frozen_model.json metadata. Prints a JSON "
            "summary (paths, sha256, node counts, parity) on stdout."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--saved-model-dir", type=Path,
                        help="folder holding saved_model.pb and variables/")
    source.add_argument("--model-tar", type=Path,
                        help="model.tar.gz to extract safely (path-traversal and size checks) "
                             "and search for its one export/*/* SavedModel")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help=f"folder for {FROZEN_MODEL_FILE} and {FROZEN_MODEL_JSON_FILE} (created)")
    parser.add_argument("--input-node", action="append", dest="input_nodes", metavar="NAME",
                        help="input placeholder name; repeat for several (default: inputs)")
    parser.add_argument("--output-node", action="append", dest="output_nodes", metavar="NAME",
                        help="output node name: a signature output key or a graph node; "
                             "repeat for several (default: softmax_tensor)")
    parser.add_argument("--signature-key", default=DEFAULT_SIGNATURE,
                        help="SavedModel signature to freeze (default: %(default)s)")
    parser.add_argument("--parity-tolerance", type=float, default=DEFAULT_PARITY_TOLERANCE,
                        help="fail if the frozen graph's outputs differ from the SavedModel's "
                             "by more than this on a fixed random batch; negative skips the "
                             "check (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where --model-tar is extracted (default: the system temp folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {
        "input_node_names": tuple(args.input_nodes or DEFAULT_INPUTS),
        "output_node_names": tuple(args.output_nodes or DEFAULT_OUTPUTS),
        "signature_key": args.signature_key,
        "parity_tolerance": None if args.parity_tolerance < 0 else args.parity_tolerance,
    }
    try:
        if args.model_tar is not None:
            result = freeze_model_archive(args.model_tar, args.output_dir, args.work_dir, **options)
        else:
            result = freeze_saved_model(args.saved_model_dir, args.output_dir, **options)
    except (ValueError, FileNotFoundError) as error:  # FreezeError and ArchiveError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
