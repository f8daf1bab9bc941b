"""``model_int8.onnx``: static int8 quantisation (QDQ) by ONNX Runtime's quantiser, checked in ONNX Runtime.

The float32 ONNX model (``OnnxConverter``) is quantised with
``onnxruntime.quantization.quantize_static``, calibrated on training images in the
model's channel order, in the QDQ format (QuantizeLinear/DequantizeLinear pairs around
float ops; ONNX Runtime's CPU provider fuses each pair into an integer kernel). Inputs
and outputs stay float32, so a device feeds it exactly what it feeds ``model.onnx``.

Settings, after ONNX Runtime's own guidance for x86 CPUs:

* uint8 activations, int8 weights per output channel (per-channel keeps ResNet's
  convolutions, whose channels vary widely, within the accuracy tolerance);
* ``reduce_range``: 7-bit weights. One file serves every x86 CPU, and on those without
  VNNI (AVX2 only) the u8 x s8 kernels sum pairs of products into 16 bits
  (``vpmaddubsw``), which 8-bit weights can overflow; VNNI CPUs lose nothing by it;
* the node that writes the model's output (the softmax) stays float: its probabilities
  quantised to 1/255 steps would tie classes and change the arg max.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from headpose.artifacts.edge.converter import EdgeFormatError, FrozenSource, calibration_images, package_versions
from headpose.artifacts.edge.onnx import MODEL_FILE as FLOAT32_FILE
from headpose.artifacts.edge.onnx import OnnxConverter

MODEL_FILE = "model_int8.onnx"
SETTINGS = {"format": "QDQ", "activation_type": "uint8", "weight_type": "int8", "per_channel": True,
            "reduce_range": True, "calibrate_method": "MinMax"}
# Calibration keeps every intermediate tensor of this many images before it folds them into
# ranges: a bound on its memory (a ResNet-50's tensors are megabytes per image).
_RANGES_EVERY = 16


class OnnxInt8Converter(OnnxConverter):
    """Frozen graph -> ``model_int8.onnx`` (QDQ int8, float32 input and output, NHWC).

    :param representative_images: float32 ``[H, W, 3]`` (or ``[N, H, W, 3]``) training
        images in the model's channel order and value range; read once.
    """

    precision = "int8"
    model_file = MODEL_FILE

    def __init__(self, representative_images: Iterable[Any] | None = None, format: str = "onnx_int8", **options):
        super().__init__(format=format, **options)
        self._images_given = representative_images
        self._calibration: list = []

    def _validate_input(self, source: FrozenSource) -> None:
        self._calibration = calibration_images(self._images_given, source)

    def _convert(self, source: FrozenSource, scratch: Path) -> dict[str, Path]:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        float32 = super()._convert(source, scratch)[FLOAT32_FILE]
        prepared = scratch / "prepared.onnx"
        quant_pre_process(str(float32), str(prepared))  # shapes and folded constants, as the quantiser asks
        graph = onnx.load(str(prepared)).graph
        input_name, output_name = graph.input[0].name, graph.output[0].name
        softmax = [node.name for node in graph.node if output_name in node.output]
        path = scratch / MODEL_FILE
        quantize_static(
            str(prepared), str(path), _Reader(input_name, self._calibration), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=SETTINGS["per_channel"],
            reduce_range=SETTINGS["reduce_range"], calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=softmax, extra_options={"CalibMaxIntermediateOutputs": _RANGES_EVERY},
        )
        return {MODEL_FILE: path}

    def _validate_output(self, written: dict[str, Path], source: FrozenSource) -> dict[str, Any]:
        import onnx

        metadata = super()._validate_output(written, source)
        graph = onnx.load(str(written[MODEL_FILE])).graph
        int8_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
        convolutions = [n for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
        producers = {output: node for node in graph.node for output in node.output}
        float_ones = [n.name for n in convolutions if not _dequantized_int8(n.input[1], producers, int8_weights)]
        if not convolutions or float_ones:
            raise EdgeFormatError(f"{len(float_ones)} of {len(convolutions)} convolutions and matrix products "
                                  f"keep float weights: {float_ones[:5]}")
        metadata.update(quantization={**SETTINGS, "calibration_images": len(self._calibration),
                                      "int8_weight_tensors": len(int8_weights)},
                        converter=package_versions("tf2onnx", "onnx", "onnxruntime"))
        return metadata


def _dequantized_int8(tensor: str, producers: dict, int8_weights: set[str]) -> bool:
    """Whether ``tensor`` is an int8 initializer through a DequantizeLinear (a quantised weight)."""
    node = producers.get(tensor)
    return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in int8_weights


class _Reader:
    """``CalibrationDataReader``: one ``{input: [1, H, W, 3]}`` feed per representative image."""

    def __init__(self, input_name: str, images: list):
        self._feeds = iter([{input_name: image} for image in images])

    def get_next(self):
        return next(self._feeds, None)
