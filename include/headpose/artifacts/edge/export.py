"""Every edge format of one frozen graph, and ``edge_models.json`` that lists them.

``export_edge_models`` checks the frozen graph and its metadata once, then runs each
requested converter on it. A converter that raises is recorded as refused, with its
reason, and the others still run. ``edge_models.json`` in ``out_dir`` lists every file
written (sha256, size, the format's metadata) and every refused format with its reason.

Format names (the same in ``edge_models.json``, XCom, the pointer and the edge client):

==================  ===========  =========  ====================================
format              runtime      precision  files
==================  ===========  =========  ====================================
``onnx``            onnxruntime  float32    ``model.onnx``
``litert_float32``  litert       float32    ``model.tflite``
``litert_int8``     litert       int8       ``model_int8.tflite``
``openvino_fp32``   openvino     float32    ``model.xml``, ``model.bin``
``openvino_fp16``   openvino     float16    ``model_fp16.xml``, ``model_fp16.bin``
``openvino_bf16``   openvino     bfloat16   ``openvino_fp32``'s files, bf16 hint
``openvino_int8``   openvino     int8       ``model_int8.xml``, ``model_int8.bin``
``onnx_int8``       onnxruntime  int8       ``model_int8.onnx``
==================  ===========  =========  ====================================

The three int8 formats are calibrated on the same representative training images.
TensorFlow, tf2onnx, OpenVINO, NNCF and ONNX Runtime's quantiser are imported by the
converters when they run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from headpose.artifacts.edge.converter import EdgeConverter, EdgeFormatError, EdgeModel, frozen_source
from headpose.artifacts.edge.litert import LiteRTConverter
from headpose.artifacts.edge.onnx import OnnxConverter
from headpose.artifacts.edge.onnx_int8 import OnnxInt8Converter
from headpose.artifacts.edge.openvino import OpenVINOConverter, precision_hint_variant
from headpose.artifacts.edge.openvino_int8 import OpenVINOInt8Converter

EDGE_MODELS_FILE = "edge_models.json"
MANIFEST_VERSION = 1
DEFAULT_REPRESENTATIVE_IMAGES = 200

CONVERTERS: dict[str, Callable[[Iterable[Any] | None], EdgeConverter]] = {
    "onnx": lambda images: OnnxConverter(),
    "litert_float32": lambda images: LiteRTConverter(),
    "litert_int8": lambda images: LiteRTConverter(quantization="int8", representative_images=images),
    "openvino_fp32": lambda images: OpenVINOConverter(),
    "openvino_fp16": lambda images: OpenVINOConverter(weights="float16"),
    "openvino_int8": lambda images: OpenVINOInt8Converter(representative_images=images),
    "onnx_int8": lambda images: OnnxInt8Converter(representative_images=images),
}
# Formats that are another format's files run with another precision hint: name -> (base, precision).
HINT_FORMATS = {"openvino_bf16": ("openvino_fp32", "bfloat16")}
DEFAULT_FORMATS = (*CONVERTERS, *HINT_FORMATS)


@dataclass(frozen=True)
class EdgeExport:
    models: dict[str, EdgeModel]
    refused: dict[str, str]
    manifest_path: Path
    manifest: dict = field(repr=False)


def export_edge_models(
    frozen_pb: str | Path,
    frozen_metadata: Mapping[str, Any],
    out_dir: str | Path,
    representative_images: Iterable[Any] | None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    converters: Mapping[str, EdgeConverter] | None = None,
) -> EdgeExport:
    """Convert ``frozen_pb`` into each of ``formats`` in ``out_dir``; write ``edge_models.json``.

    ``representative_images`` (float32 ``[H, W, 3]`` training images in the model's value
    range and channel order) calibrate the int8 formats; ``converters`` replaces the converter of a format.
    Raises ``ValueError`` for an unknown or inconsistent list of formats and
    ``EdgeFormatError`` when the frozen graph or its metadata is refused, before any
    conversion; a format that fails is in ``refused``.
    """
    chosen = dict(converters or {})
    names = requested_formats(formats, chosen)
    source = frozen_source(frozen_pb, frozen_metadata)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = list(representative_images) if representative_images is not None else None
    models: dict[str, EdgeModel] = {}
    refused: dict[str, str] = {}
    for name in names:
        if name in HINT_FORMATS:
            continue
        converter = chosen.get(name) or CONVERTERS[name](images)
        try:
            model = converter.convert(source, out)
        except Exception as error:  # any converter, the caller's included: record it, go on
            refused[name] = _reason(name, error)
            continue
        if model.format != name:
            refused[name] = f"{name}: the converter produced format {model.format!r}"
            continue
        models[name] = model
    for name in names:
        if name in HINT_FORMATS:
            base, precision = HINT_FORMATS[name]
            if base in models:
                models[name] = precision_hint_variant(models[base], name, precision)
            else:
                refused[name] = f"{name}: needs the files of {base}, which was refused"
    manifest = {
        "version": MANIFEST_VERSION,
        "frozen_model": {"sha256": source.sha256, "input": source.input_name, "output": source.output_name},
        "formats": {name: models[name].manifest_entry() for name in names if name in models},
        "refused": refused,
    }
    path = out / EDGE_MODELS_FILE
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    partial.replace(path)
    return EdgeExport(models, refused, path, manifest)


def requested_formats(formats: Sequence[str] | str, converters: Mapping[str, Any] | None = None) -> list[str]:
    """``formats`` as a list of names (a template renders ``"a,b"``), refused if inconsistent."""
    names = [n.strip() for n in formats.split(",")] if isinstance(formats, str) else list(formats)
    names = [n for n in names if n]
    known = {*CONVERTERS, *HINT_FORMATS, *(converters or {})}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown edge formats {unknown}; known: {sorted(known)}" if unknown
                         else "no edge formats requested")
    if len(set(names)) != len(names):
        raise ValueError(f"edge formats listed twice: {names}")
    for name in names:
        base = HINT_FORMATS.get(name, (None,))[0]
        if base and base not in names:
            raise ValueError(f"{name} runs the files of {base}: request both")
    return names


def _reason(name: str, error: Exception) -> str:
    text = str(error) if isinstance(error, EdgeFormatError) else f"{type(error).__name__}: {error}"
    return text if text.startswith(f"{name}:") else f"{name}: {text}"


def representative_images(shard_paths: Sequence[str | Path], limit: int = DEFAULT_REPRESENTATIVE_IMAGES) -> list:
    """Up to ``limit`` float32 ``[H, W, 3]`` training images, taken evenly from each shard.

    The shards hold the model's channel order and ``shards.dataset`` scales to [0, 1], so
    these are what the model saw in training, without augmentation.
    """
    from headpose.training import shards

    paths = [str(p) for p in shard_paths]
    if not paths or limit < 1:
        raise EdgeFormatError("the representative set needs at least one training shard and one image")
    per_shard = -(-limit // len(paths))
    images: list = []
    for path in paths:
        for batch, _ in shards.dataset([path], per_shard, training=False).take(1):
            images.extend(batch.numpy())
    return images[:limit]


def pointer_formats(exported: Mapping[str, Mapping[str, Any]],
                    validation: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ``formats`` of a version 3 pointer record: the accepted formats only.

    ``exported`` is ``ExportEdgeModelsOperator``'s XCom ``formats`` (S3 URIs and sha256 of
    each file), ``validation`` what ``validate_edge_models`` returned. ``uri``/``sha256``
    name the file the runtime loads; a format of several files also lists them in ``files``.
    """
    entries = {}
    for name, verdict in validation.items():
        if not verdict.get("accepted") or name not in exported:
            continue
        export = exported[name]
        files = export["files"]
        main = files[export["metadata"]["model_file"]]
        entry = {
            "uri": main["uri"], "sha256": main["sha256"],
            "runtime": export["runtime"], "precision": export["precision"],
            "accuracy": verdict["accuracy"], "max_abs_diff": verdict["max_abs_diff"],
            "latency_ms_b1": verdict["latency_ms_b1"], "metadata": export["metadata"],
        }
        if len(files) > 1:
            entry["files"] = {file: dict(value) for file, value in files.items()}
        entries[name] = entry
    return entries
