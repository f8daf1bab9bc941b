"""What every edge-format converter shares: the checked source, the result, the three steps.

A converter has the shape of TFX's rewriter (``tfx/components/trainer/rewriting/rewriter.py``):
it checks its input, converts, checks its output, and every error it raises starts with
the format's name. Options (opset, quantisation, weight precision) go to the constructor,
so one class produces several named formats.

The output check loads the written file in the format's own runtime and reads the
tensor names, shapes, dtypes and quantisation back from it: the metadata describes the
file as the runtime sees it, not what the converter meant to write. A converter works
in a scratch folder inside ``out_dir`` and moves its files into ``out_dir`` only after
that check passed, so a refused format leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from headpose.edge.preprocess import CHANNEL_ORDERS, RESIZE

# Slack on the representative images' value range: float32 rounding of p / 255.
_RANGE_SLACK = 1e-6


class EdgeFormatError(ValueError):
    """An edge format cannot be produced or loaded as asked; the message starts with its name."""


@dataclass(frozen=True)
class FrozenSource:
    """The frozen graph and the contract from ``frozen_model.json``, checked once for all formats."""

    pb_path: Path
    sha256: str
    input_name: str
    output_name: str
    image_size: tuple[int, int]
    num_classes: int
    preprocessing: dict = field(repr=False)
    classes: list = field(repr=False)
    class_index: str = "pan_bin * 3 + tilt_bin"

    def graph_def(self):
        """The parsed ``GraphDef`` (TensorFlow imported here)."""
        import tensorflow as tf

        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(self.pb_path.read_bytes())
        return graph_def


@dataclass(frozen=True)
class EdgeFile:
    name: str
    path: Path
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class EdgeModel:
    """One produced format: its files and the metadata a device needs to run them."""

    format: str
    runtime: str
    precision: str
    files: tuple[EdgeFile, ...]
    metadata: dict = field(repr=False)

    def manifest_entry(self) -> dict[str, Any]:
        """This format's entry in ``edge_models.json`` (file names, not local paths)."""
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "files": {f.name: {"sha256": f.sha256, "size_bytes": f.size_bytes} for f in self.files},
            "metadata": self.metadata,
        }


class EdgeConverter:
    """Base class: ``convert`` runs the three steps; subclasses fill in the format's parts."""

    format: str
    runtime: str
    precision: str

    def convert(self, source: FrozenSource, out_dir: str | Path) -> EdgeModel:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._step("input refused", self._validate_input, source)
        with tempfile.TemporaryDirectory(dir=out, prefix=f".{self.format}-") as scratch:
            written = self._step("conversion failed", self._convert, source, Path(scratch))
            metadata = self._step("output refused", self._validate_output, written, source)
            files = tuple(_keep(path, out / name) for name, path in written.items())
        return EdgeModel(self.format, self.runtime, self.precision, files, metadata)

    def _step(self, what: str, function, *args):
        try:
            return function(*args)
        except EdgeFormatError as error:
            raise EdgeFormatError(f"{self.format}: {what}: {error}") from error
        except Exception as error:  # each converter library raises its own zoo of types
            raise EdgeFormatError(f"{self.format}: {what}: {type(error).__name__}: {error}") from error

    def _validate_input(self, source: FrozenSource) -> None:
        """Format-specific checks of the input; the shared ones ran in ``frozen_source``."""

    def _convert(self, source: FrozenSource, scratch: Path) -> dict[str, Path]:
        """Write the format's files into ``scratch``; ``{file name: path}``."""
        raise NotImplementedError

    def _validate_output(self, written: dict[str, Path], source: FrozenSource) -> dict[str, Any]:
        """Load ``written`` in the format's runtime, check it, return its metadata."""
        raise NotImplementedError

    def metadata(self, source: FrozenSource, model_file: str, inputs: list[dict], outputs: list[dict],
                 **extra: Any) -> dict[str, Any]:
        """The metadata of a format: tensors as its runtime reports them, plus the contract."""
        return {
            "format": self.format,
            "runtime": self.runtime,
            "precision": self.precision,
            "model_file": model_file,
            "inputs": inputs,
            "outputs": outputs,
            "preprocessing": dict(source.preprocessing),
            "classes": list(source.classes),
            "class_index": source.class_index,
            "frozen_model_sha256": source.sha256,
            **extra,
        }


def _keep(path: Path, target: Path) -> EdgeFile:
    path.replace(target)
    data_sha256, size = file_digest(target)
    return EdgeFile(target.name, target, data_sha256, size)


def file_digest(path: str | Path) -> tuple[str, int]:
    """``(sha256, size in bytes)`` of a file, read in blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def package_versions(*packages: str) -> dict[str, str]:
    """Installed versions of the converter's packages, for the metadata (no import)."""
    from importlib import metadata

    return {name: metadata.version(name) for name in packages}


def tensor_entry(name: str, shape: list, dtype: str, quantization: Mapping[str, float] | None = None) -> dict:
    """One input or output as metadata; ``None`` in ``shape`` marks a dynamic dimension."""
    return {
        "name": name,
        "shape": list(shape),
        "batch": "dynamic" if shape and shape[0] is None else "fixed",
        "dtype": dtype,
        "quantization": dict(quantization) if quantization else None,
    }


def require_io(what: str, shape: list, dtype: str, expected_shape: list, expected_dtype: str) -> None:
    """Refuse a tensor whose shape (``None`` matches a dynamic dimension) or dtype is not the contract's."""
    matches = len(shape) == len(expected_shape) and all(
        want is None or got == want for got, want in zip(shape, expected_shape)
    )
    if not matches or dtype != expected_dtype:
        raise EdgeFormatError(f"{what} is {dtype} {shape}, expected {expected_dtype} {expected_shape}")


def require_probabilities(values, num_classes: int) -> None:
    """One forward pass gave ``[1, num_classes]`` finite values (a loadable, runnable file)."""
    shape = list(getattr(values, "shape", ()))
    if shape != [1, num_classes]:
        raise EdgeFormatError(f"one image gives output shape {shape}, expected [1, {num_classes}]")
    if not all(math.isfinite(float(v)) for v in values.reshape(-1)):
        raise EdgeFormatError("one image gives non-finite outputs")


def calibration_images(images: Iterable[Any] | None, source: FrozenSource) -> list:
    """The representative images as ``[1, H, W, 3]`` float32 arrays, each checked (every int8 format)."""
    import numpy as np

    if images is None:
        raise EdgeFormatError("int8 quantisation needs representative images, none were given")
    height, width = source.image_size
    low, high = source.preprocessing["value_range"]
    singles = []
    for number, image in enumerate(images):
        array = np.asarray(image, dtype=np.float32)
        batch = array[None] if array.ndim == 3 else array
        if batch.ndim != 4 or batch.shape[1:] != (height, width, 3):
            raise EdgeFormatError(f"representative image {number} has shape {array.shape}, "
                                  f"expected [{height}, {width}, 3] or [N, {height}, {width}, 3]")
        if not np.isfinite(batch).all() or batch.min() < low - _RANGE_SLACK or batch.max() > high + _RANGE_SLACK:
            raise EdgeFormatError(f"representative image {number} has values outside [{low}, {high}]")
        singles.extend(batch[i:i + 1] for i in range(batch.shape[0]))
    if not singles:
        raise EdgeFormatError("int8 quantisation needs representative images, the set is empty")
    return singles


def frozen_source(frozen_pb: str | Path, frozen_metadata: Mapping[str, Any]) -> FrozenSource:
    """The frozen graph and its ``frozen_model.json``, refused unless they fit the contract.

    The contract (DESIGN.md): one float32 NHWC input with 3 channels, one ``[N, C]`` output,
    the graph's sha256 as its metadata records it, and a class map of C entries.
    """
    pb_path = Path(frozen_pb)
    if not pb_path.is_file():
        raise EdgeFormatError(f"no frozen graph at {pb_path}")
    sha256, _ = file_digest(pb_path)
    recorded = frozen_metadata.get("sha256")
    if recorded != sha256:
        raise EdgeFormatError(f"{pb_path} has sha256 {sha256}, but its metadata records {recorded}")
    tensors = _contract_tensors(frozen_metadata)
    image_size = (int(tensors["input_shape"][1]), int(tensors["input_shape"][2]))
    source = FrozenSource(
        pb_path=pb_path, sha256=sha256, input_name=tensors["input"], output_name=tensors["output"],
        image_size=image_size, num_classes=tensors["num_classes"],
        preprocessing=edge_preprocessing(frozen_metadata.get("preprocessing") or {}, image_size),
        classes=list(frozen_metadata["classes"]),
        class_index=frozen_metadata.get("class_index", FrozenSource.class_index),
    )
    _require_nodes(source)
    return source


def _contract_tensors(frozen_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The one input and one output the metadata names, refused unless they fit the contract."""
    inputs, outputs = frozen_metadata.get("inputs") or [], frozen_metadata.get("outputs") or []
    if len(inputs) != 1 or len(outputs) != 1:
        raise EdgeFormatError(f"the metadata names {len(inputs)} inputs and {len(outputs)} outputs, expected one each")
    shape, out_shape = inputs[0].get("shape") or [], outputs[0].get("shape") or []
    if inputs[0].get("dtype") != "float32" or len(shape) != 4 or shape[3] != 3 or not all(shape[1:3]):
        raise EdgeFormatError(f"input {inputs[0].get('name')!r} is {inputs[0].get('dtype')} {shape}, "
                              "expected float32 [N, H, W, 3]")
    if len(out_shape) != 2 or not out_shape[1]:
        raise EdgeFormatError(f"output {outputs[0].get('name')!r} has shape {out_shape}, expected [N, C]")
    classes = frozen_metadata.get("classes") or []
    if len(classes) != out_shape[1]:
        raise EdgeFormatError(f"the class map has {len(classes)} entries for {out_shape[1]} outputs")
    return {"input": inputs[0]["name"], "output": outputs[0]["name"], "input_shape": shape,
            "num_classes": int(out_shape[1])}


def edge_preprocessing(preprocessing: Mapping[str, Any], image_size: tuple[int, int]) -> dict[str, Any]:
    """``frozen_model.json``'s preprocessing under the project's names, checked.

    ``channel_order`` is the one name for the channel order (today's frozen_model.json
    still writes ``colour_order``); ``resize`` says how a device resizes to ``image_size``.
    """
    result = {k: v for k, v in preprocessing.items() if k != "colour_order"}
    order = str(preprocessing.get("channel_order") or preprocessing.get("colour_order") or "").lower()
    if order not in CHANNEL_ORDERS:
        raise EdgeFormatError(f"preprocessing names channel order {order!r}, expected one of {CHANNEL_ORDERS}")
    if preprocessing.get("layout") != "NHWC":
        raise EdgeFormatError(f"preprocessing layout is {preprocessing.get('layout')!r}, expected 'NHWC'")
    if list(preprocessing.get("image_size") or []) != list(image_size):
        raise EdgeFormatError(f"preprocessing image_size {preprocessing.get('image_size')} is not the "
                              f"input's {list(image_size)}")
    value_range = preprocessing.get("value_range") or []
    if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
        raise EdgeFormatError(f"preprocessing value_range {value_range} is not [low, high]")
    result.update(channel_order=order, value_range=[float(v) for v in value_range])
    result.setdefault("resize", RESIZE)
    return result


def _require_nodes(source: FrozenSource) -> None:
    try:
        graph_def = source.graph_def()
    except Exception as error:  # protobuf's DecodeError has no stable import path
        raise EdgeFormatError(f"{source.pb_path} is not a binary GraphDef: {error}") from None
    names = {node.name for node in graph_def.node}
    missing = [n for n in (source.input_name, source.output_name) if n not in names]
    if missing:
        raise EdgeFormatError(f"nodes {missing} named by the metadata are not in the frozen graph")
