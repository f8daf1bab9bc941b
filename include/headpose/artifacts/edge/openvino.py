"""OpenVINO IR (``model.xml`` + ``model.bin``), FP32 and FP16 weights, checked in OpenVINO.

The batch dimension stays dynamic, as in the frozen graph. The FP16 IR
(``compress_to_fp16``) halves the weights file; its inputs and outputs stay float32.

Precision at run time is a setting, not a file: OpenVINO's CPU plugin runs float32 IRs
in bf16 wherever the CPU has bf16 units (AVX512_BF16, AMX) unless told
``INFERENCE_PRECISION_HINT=f32``; on this project's test machine that default was 2e-3
off TensorFlow. So every IR's metadata names the hint it was validated with
(``runtime_settings``), and ``openvino_bf16`` is the FP32 files again with the hint
``bf16`` (``precision_hint_variant``), judged by accuracy like the other reduced formats.
On a CPU without bf16 units the hint falls back to f32.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from headpose.artifacts.edge.converter import (
    EdgeConverter,
    EdgeFormatError,
    EdgeModel,
    FrozenSource,
    package_versions,
    require_io,
    require_probabilities,
    tensor_entry,
)
from headpose.edge.runtimes import import_openvino

PRECISION_HINTS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


class OpenVINOConverter(EdgeConverter):
    """Frozen graph -> OpenVINO IR with float32 or (``weights="float16"``) compressed weights."""

    runtime = "openvino"

    def __init__(self, weights: str = "float32", format: str | None = None):
        if weights not in ("float32", "float16"):
            raise ValueError(f"weights must be 'float32' or 'float16', got {weights!r}")
        self.precision = weights
        self.format = format or ("openvino_fp32" if weights == "float32" else "openvino_fp16")
        self.stem = "model" if weights == "float32" else "model_fp16"

    def _convert(self, source: FrozenSource, scratch: Path) -> dict[str, Path]:
        openvino = import_openvino()  # without the converter's telemetry
        model = openvino.convert_model(str(source.pb_path))
        xml = scratch / f"{self.stem}.xml"
        openvino.save_model(model, str(xml), compress_to_fp16=self.precision == "float16")
        return {xml.name: xml, f"{self.stem}.bin": xml.with_suffix(".bin")}

    def _validate_output(self, written: dict[str, Path], source: FrozenSource) -> dict[str, Any]:
        import numpy as np

        openvino = import_openvino()
        core = openvino.Core()
        model = core.read_model(str(written[f"{self.stem}.xml"]), str(written[f"{self.stem}.bin"]))
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise EdgeFormatError(f"the IR has {len(model.inputs)} inputs and {len(model.outputs)} outputs, "
                                  "expected one each")
        height, width = source.image_size
        entries = []
        for role, port, expected in (("input", model.inputs[0], [None, height, width, 3]),
                                     ("output", model.outputs[0], [None, source.num_classes])):
            shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
            dtype = np.dtype(port.get_element_type().to_dtype()).name
            require_io(f"{role} {port.get_any_name()!r}", shape, dtype, expected, "float32")
            entries.append(tensor_entry(port.get_any_name(), shape, dtype))
        settings = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS["float32"]}
        compiled = core.compile_model(model, "CPU", settings)
        zeros = np.zeros([1, height, width, 3], np.float32)
        require_probabilities(compiled(zeros)[compiled.output(0)], source.num_classes)
        return self.metadata(source, f"{self.stem}.xml", [entries[0]], [entries[1]],
                             runtime_settings=settings, converter=package_versions("openvino"))


def precision_hint_variant(base: EdgeModel, format: str = "openvino_bf16",
                           precision: str = "bfloat16") -> EdgeModel:
    """The IR files of ``base`` again, as a format that runs them with another precision hint."""
    if base.runtime != "openvino":
        raise EdgeFormatError(f"{format}: a precision hint needs an OpenVINO IR, {base.format} is {base.runtime}")
    if precision not in PRECISION_HINTS:
        raise EdgeFormatError(f"{format}: no OpenVINO hint for precision {precision!r}")
    metadata = copy.deepcopy(base.metadata)
    metadata.update(format=format, precision=precision,
                    runtime_settings={"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]})
    return EdgeModel(format, base.runtime, precision, base.files, metadata)
