"""``model_int8.xml`` + ``.bin``: NNCF post-training int8 quantisation of the OpenVINO IR.

The frozen graph is converted as for ``openvino_fp32``, then ``nncf.quantize`` inserts
FakeQuantize operations calibrated on training images in the model's channel order
(the ``performance`` preset: symmetric int8 weights and activations, with NNCF's fast
bias correction; ``target_device=CPU``). OpenVINO's CPU plugin runs the quantised
convolutions with integer kernels: VNNI (AVX512/AVX-VNNI) or AMX where the CPU has
them, AVX2 otherwise. Inputs and outputs stay float32, so a device feeds it what it
feeds the FP32 IR. What is not quantised (the softmax) runs with the f32 hint, so the
file gives the same answers on CPUs with and without bf16 units.

NNCF reports usage through ``openvino_telemetry`` when that imports; it is imported
here only after ``import_openvino`` has kept the telemetry package out.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterable

from headpose.artifacts.edge.converter import EdgeFormatError, FrozenSource, calibration_images, package_versions
from headpose.artifacts.edge.openvino import OpenVINOConverter
from headpose.edge.runtimes import import_openvino

STEM = "model_int8"
SETTINGS = {"method": "nncf.quantize", "preset": "performance", "target_device": "CPU",
            "fast_bias_correction": True}
# Layers OpenVINO's CPU plugin reports as running in these precisions ran integer kernels.
_INTEGER_PRECISIONS = ("i8", "u8")


class OpenVINOInt8Converter(OpenVINOConverter):
    """Frozen graph -> OpenVINO IR quantised to int8 by NNCF (float32 input and output).

    :param representative_images: float32 ``[H, W, 3]`` (or ``[N, H, W, 3]``) training
        images in the model's channel order and value range; read once.
    """

    def __init__(self, representative_images: Iterable[Any] | None = None, format: str = "openvino_int8"):
        self.precision = "int8"
        self.format = format
        self.stem = STEM
        self._images_given = representative_images
        self._calibration: list = []

    def _validate_input(self, source: FrozenSource) -> None:
        self._calibration = calibration_images(self._images_given, source)

    def _convert(self, source: FrozenSource, scratch: Path) -> dict[str, Path]:
        openvino = import_openvino()
        import nncf  # after import_openvino: without its telemetry

        model = openvino.convert_model(str(source.pb_path))
        # NNCF draws its progress bars on stdout, which is the caller's (a benchmark's JSON):
        # they go to stderr with the other diagnostics.
        with contextlib.redirect_stdout(sys.stderr):
            quantized = nncf.quantize(
                model, nncf.Dataset(self._calibration), preset=nncf.QuantizationPreset.PERFORMANCE,
                target_device=nncf.TargetDevice.CPU, subset_size=len(self._calibration),
                fast_bias_correction=SETTINGS["fast_bias_correction"],
            )
        xml = scratch / f"{self.stem}.xml"
        openvino.save_model(quantized, str(xml), compress_to_fp16=False)
        return {xml.name: xml, f"{self.stem}.bin": xml.with_suffix(".bin")}

    def _validate_output(self, written: dict[str, Path], source: FrozenSource) -> dict[str, Any]:
        metadata = super()._validate_output(written, source)
        openvino = import_openvino()
        core = openvino.Core()
        model = core.read_model(str(written[f"{self.stem}.xml"]))
        fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
        compiled = core.compile_model(model, "CPU", metadata["runtime_settings"])
        integer_layers = integer_layer_count(compiled)
        if not fake_quantize or not integer_layers:
            raise EdgeFormatError(f"the IR has {fake_quantize} FakeQuantize operations and OpenVINO runs "
                                  f"{integer_layers} layers in int8: it is not quantised")
        metadata.update(quantization={**SETTINGS, "calibration_images": len(self._calibration),
                                      "fake_quantize_ops": fake_quantize},
                        converter=package_versions("openvino", "nncf"))
        return metadata


def integer_layer_count(compiled) -> int:
    """How many layers of a compiled model OpenVINO's CPU plugin runs with integer kernels."""
    count = 0
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        precision = str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info else ""
        count += precision.lower() in _INTEGER_PRECISIONS
    return count
