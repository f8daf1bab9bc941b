"""Freeze a SavedModel into one portable ``frozen_model.pb`` plus ``frozen_model.json``.

The frozen graph is what edge runtimes (OpenCV DNN, TF1 C API, TFLite converters) load:
variables become constants, the input is the ``Placeholder`` ``inputs`` (or the
tutorial's ``Const_1`` when asked) and the output the Softmax node ``softmax_tensor``, as
in the tutorial's graph; ``softmax_tensor`` stands for the signature's ``probabilities``
(``headpose.training.serving.NODE_ALIASES``). The steps, TF's own tools first:

1. ``convert_variables_to_constants_v2`` on the signature's concrete function;
2. the inputs and the signature outputs get the requested node names (after conversion
   an output sits behind ``StatefulPartitionedCall/...`` and a chain of ``Identity`` nodes);
3. ``optimize_for_inference`` (strip unused nodes, remove training nodes, fold
   ``FusedBatchNorm`` into convolutions where a graph has those);
4. Grappler constant folding + arithmetic simplification. Keras 3 writes batch norm as
   unfused ``Rsqrt``/``Mul``/``Sub``/``AddV2`` on what are now constants, which step 3
   does not recognise; Grappler folds those to one scale and one shift per channel and
   pushes a scale that follows a convolution into its weights. The CPU-specific
   remapper (``_FusedConv2D``...) is deliberately not run: the graph must stay portable;
5. the one pass TF lacks, below: a constant per-channel ``AddV2`` after a convolution
   becomes a ``BiasAdd``.

``freeze_graph(model_dir, 'Const_1', 'softmax_tensor')`` is the tutorial's call. The
channel order the model was trained on is read from the SavedModel's
``assets.extra/preprocessing.json`` and written into ``frozen_model.json``. Command line:
``python -m headpose.artifacts.freeze --help`` (``freeze_cli.py``).
"""
from __future__ import annotations

import collections
import hashlib
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from headpose.artifacts.archive import SAVED_MODEL_FILE, find_saved_model, safe_extract
from headpose.artifacts.graph_names import (
    GraphNameError, check_class_outputs, name_inputs, name_outputs, rename_outputs,
)
from headpose.artifacts.graph_passes import conv_add_to_bias_add, grappler_fold_constants
from headpose.artifacts.metadata import build_metadata
from headpose.planning.layout import FROZEN_MODEL_FILE, FROZEN_MODEL_JSON_FILE
from headpose.training.serving import CHANNEL_ORDERS, DEFAULT_CHANNEL_ORDER, PREPROCESSING_RECORD

# TensorFlow is imported inside the functions that run it: importing this module (an
# Airflow operator does, at DAG-parse time) or asking the CLI for --help stays instant.
if TYPE_CHECKING:
    from tensorflow.core.framework.graph_pb2 import GraphDef

DEFAULT_INPUTS = ("inputs",)
DEFAULT_OUTPUTS = ("softmax_tensor",)
DEFAULT_SIGNATURE = "serving_default"
DEFAULT_PARITY_TOLERANCE = 1e-4
_MAX_RECORD_BYTES = 64 * 1024  # a preprocessing record is a few bytes; more is not one

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
    channel_order: str
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
    channel_order: str | None = None,
) -> FreezeResult:
    """Freeze ``saved_model_dir`` into ``output_dir/frozen_model.{pb,json}``.

    ``input_node_names`` are placeholder names, or ``Const_1`` (the tutorial's), which
    renames the placeholder of the signature's ``inputs``. ``output_node_names`` are
    signature output keys or their tutorial names (the node gets that name) or names of
    nodes in the converted graph. With ``parity_tolerance`` set, the frozen graph is run
    on a small fixed random batch and must match the SavedModel that closely.
    ``channel_order`` (``bgr`` | ``rgb``): None reads the SavedModel's record, else
    ``bgr``; a value that contradicts the record is refused.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tensorflow.python.tools import optimize_for_inference_lib

    order = resolve_channel_order(saved_model_dir, channel_order)
    loaded, function = _load_signature(saved_model_dir, signature_key)  # ``loaded`` owns the variables
    converted = convert_variables_to_constants_v2(function)
    graph_def = converted.graph.as_graph_def()
    node_count_before = len(graph_def.node)
    input_names, output_names = list(input_node_names), list(output_node_names)
    try:
        graph_def, input_keys = name_inputs(graph_def, function, converted, input_names)
        outputs, output_keys = name_outputs(graph_def, function, converted, output_names)
        check_class_outputs(function, output_keys)
        graph_def = rename_outputs(graph_def, outputs)
    except GraphNameError as error:
        raise FreezeError(str(error)) from None
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
        parity = _parity(function, graph_def, input_keys, output_keys, signature_key)
        if parity is not None and parity > parity_tolerance:
            raise FreezeError(
                f"frozen graph differs from the SavedModel by {parity:.3g} (> {parity_tolerance})"
            )
    names = {**input_keys, **output_keys}
    return _write(graph_def, Path(output_dir), input_names, output_names, function,
                  signature_key, node_count_before, parity, names, order)


def freeze_graph(
    model_dir: str | Path,
    input_node_names: str | Sequence[str],
    output_node_names: str | Sequence[str],
    output_dir: str | Path = ".",
    **options,
) -> FreezeResult:
    """The tutorial's call: ``freeze_graph(model_dir, 'Const_1', 'softmax_tensor')``.

    ``model_dir`` is the SavedModel itself or a folder holding one under ``export/*/*``
    (an extracted ``model.tar.gz``); names may be comma-separated, as the tutorial's were.
    ``frozen_model.pb`` goes to ``output_dir`` (the current folder, as in the tutorial).
    """
    root = Path(model_dir)
    saved_model = root if (root / SAVED_MODEL_FILE).is_file() else find_saved_model(root)
    return freeze_saved_model(
        saved_model, output_dir, node_names(input_node_names), node_names(output_node_names), **options
    )


def node_names(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b"]`` -> ``("a", "b")`` (templates and the tutorial give strings)."""
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    return tuple(value)


def resolve_channel_order(saved_model_dir: str | Path, asked: str | None) -> str:
    """The channel order to record: ``asked``, else the SavedModel's record, else ``bgr``."""
    recorded = recorded_channel_order(saved_model_dir)
    if asked is None:
        return recorded or DEFAULT_CHANNEL_ORDER
    if asked not in CHANNEL_ORDERS:
        raise FreezeError(f"channel_order must be one of {CHANNEL_ORDERS}, got {asked!r}")
    if recorded is not None and recorded != asked:
        raise FreezeError(
            f"channel_order={asked!r} contradicts the SavedModel, which records that it was "
            f"trained on {recorded!r} images ({PREPROCESSING_RECORD})"
        )
    return asked


def recorded_channel_order(saved_model_dir: str | Path) -> str | None:
    """What the entry point recorded in ``assets.extra/preprocessing.json``; None if nothing."""
    record = Path(saved_model_dir) / PREPROCESSING_RECORD
    if not record.is_file():
        return None
    try:
        if record.stat().st_size > _MAX_RECORD_BYTES:
            raise ValueError(f"{record.stat().st_size} bytes")
        order = json.loads(record.read_text(encoding="utf-8"))["channel_order"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise FreezeError(f"{record} is not a preprocessing record: {type(error).__name__}: {error}") from None
    if order not in CHANNEL_ORDERS:
        raise FreezeError(f"{record} records channel_order {order!r}, not one of {CHANNEL_ORDERS}")
    return order


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


def _parity(function, graph_def, input_keys: Mapping[str, str | None],
            output_keys: Mapping[str, str | None], signature_key: str) -> float | None:
    """Largest absolute output difference on a fixed random batch of two images.

    ``None`` when no requested output is a signature output (nothing to compare with).
    """
    import numpy as np
    import tensorflow as tf

    feeds = {}
    rng = np.random.default_rng(0)
    for name, key in input_keys.items():
        if key is None:
            raise FreezeError(
                f"input {name!r} is not an input of signature {signature_key!r}, cannot check parity"
            )
        spec = function.structured_input_signature[1][key]
        shape = [2 if d is None else d for d in spec.shape.as_list()]
        feeds[name] = rng.random(shape, dtype=np.float32)
    expected = function(**{input_keys[name]: tf.constant(v) for name, v in feeds.items()})
    frozen = run_graph_def(graph_def, feeds, list(output_keys))
    diffs = []
    for key, value in zip(output_keys.values(), frozen):
        if key is not None:
            reference = expected[key].numpy().astype(np.float64)
            diffs.append(float(np.max(np.abs(value.astype(np.float64) - reference))))
    return max(diffs) if diffs else None


def _write(graph_def, output_dir: Path, input_names, output_names, function,
           signature_key: str, node_count_before: int, parity: float | None,
           signature_names: Mapping[str, str | None], channel_order: str) -> FreezeResult:
    output_dir.mkdir(parents=True, exist_ok=True)
    pb_path = output_dir / FROZEN_MODEL_FILE
    data = graph_def.SerializeToString(deterministic=True)
    _write_atomically(pb_path, data)
    sha256 = hashlib.sha256(data).hexdigest()
    metadata = build_metadata(
        graph_def, input_names, output_names, function, signature_key,
        sha256, len(data), node_count_before, parity,
        signature_names=signature_names, channel_order=channel_order,
    )
    json_path = output_dir / FROZEN_MODEL_JSON_FILE
    _write_atomically(json_path, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())
    return FreezeResult(
        pb_path=pb_path, json_path=json_path, sha256=sha256, size_bytes=len(data),
        node_count=len(graph_def.node), node_count_before=node_count_before,
        input_names=tuple(input_names), output_names=tuple(output_names),
        parity_max_abs_diff=parity, channel_order=channel_order, metadata=metadata,
    )


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers (an upload, a retried task) never see a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


if __name__ == "__main__":  # ``python -m headpose.artifacts.freeze``, as before the CLI moved
    from headpose.artifacts.freeze_cli import main

    sys.exit(main())
