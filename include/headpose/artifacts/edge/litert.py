"""``model.tflite`` (float32) and ``model_int8.tflite`` (full-integer), checked in LiteRT.

Both files have a fixed batch of one: TensorFlow Lite Micro and most phone delegates
(NNAPI, GPU, Hexagon) plan memory for static shapes, and a camera gives one frame at a
time. A runtime that allows it can still run a batch with ``resize_tensor_input``.

``model_int8.tflite`` is full-integer post-training quantisation calibrated on training
images, with **int8 input and output**. Integer-only targets (microcontrollers, the Edge
TPU, phone NPUs) then run the whole graph; with float I/O the first and last op would be
float Quantize/Dequantize steps that such targets run on a slower core or not at all.
The input's scale and zero point are in the metadata: ``q = round(x / scale) + zero_point``.
Calibration on images in [0, 1] gives a scale of about 1/255 and a zero point of -128,
so a uint8 pixel p becomes ``p - 128``, no float arithmetic needed on the device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from headpose.artifacts.edge.converter import (
    EdgeConverter,
    EdgeFormatError,
    FrozenSource,
    calibration_images,
    package_versions,
    require_io,
    require_probabilities,
    tensor_entry,
)
from headpose.edge.runtimes import dequantize, quantize

FLOAT32_FILE = "model.tflite"
INT8_FILE = "model_int8.tflite"


class LiteRTConverter(EdgeConverter):
    """Frozen graph -> a LiteRT flatbuffer, float32 or (``quantization="int8"``) full-integer.

    :param quantization: ``None`` for float32, ``"int8"`` for full-integer quantisation.
    :param representative_images: float32 arrays ``[H, W, 3]`` or ``[N, H, W, 3]`` in the
        model's value range (training images), required for int8; read once.
    """

    runtime = "litert"

    def __init__(self, quantization: str | None = None,
                 representative_images: Iterable[Any] | None = None, format: str | None = None):
        if quantization not in (None, "int8"):
            raise ValueError(f"quantization must be None or 'int8', got {quantization!r}")
        self.quantization = quantization
        self.precision = "int8" if quantization else "float32"
        self.format = format or f"litert_{self.precision}"
        self.model_file = INT8_FILE if quantization else FLOAT32_FILE
        self._images_given = representative_images
        self._calibration: list = []

    def _validate_input(self, source: FrozenSource) -> None:
        if self.quantization:
            self._calibration = calibration_images(self._images_given, source)

    def _convert(self, source: FrozenSource, scratch: Path) -> dict[str, Path]:
        import tensorflow as tf

        height, width = source.image_size
        converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
            str(source.pb_path), [source.input_name], [source.output_name],
            input_shapes={source.input_name: [1, height, width, 3]},
        )
        if self.quantization:
            images = self._calibration
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([image] for image in images)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        path = scratch / self.model_file
        path.write_bytes(converter.convert())
        return {self.model_file: path}

    def _validate_output(self, written: dict[str, Path], source: FrozenSource) -> dict[str, Any]:
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(written[self.model_file]))
        interpreter.allocate_tensors()
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise EdgeFormatError(f"the model has {len(inputs)} inputs and {len(outputs)} outputs, expected one each")
        height, width = source.image_size
        dtype = "int8" if self.quantization else "float32"
        entries = []
        for role, detail, expected in (("input", inputs[0], [1, height, width, 3]),
                                       ("output", outputs[0], [1, source.num_classes])):
            shape = [None if d < 0 else int(d) for d in detail["shape_signature"]]
            require_io(f"{role} {detail['name']!r}", shape, np.dtype(detail["dtype"]).name, expected, dtype)
            entries.append(tensor_entry(detail["name"], shape, dtype, _quantization(detail, self.quantization)))
        zeros = np.zeros([1, height, width, 3], np.float32)
        interpreter.set_tensor(inputs[0]["index"], quantize(zeros, entries[0]["quantization"]))
        interpreter.invoke()
        output = interpreter.get_tensor(outputs[0]["index"])
        require_probabilities(dequantize(output, entries[1]["quantization"]), source.num_classes)
        return self.metadata(source, self.model_file, [entries[0]], [entries[1]],
                             calibration_images=len(self._calibration) or None,
                             converter=package_versions("tensorflow", "ai-edge-litert"))


def _quantization(detail: dict, quantization: str | None) -> dict[str, float] | None:
    scale, zero_point = detail["quantization"]
    if not quantization:
        return None
    if not scale > 0:
        raise EdgeFormatError(f"{detail['name']!r} has quantisation scale {scale}, expected > 0")
    return {"scale": float(scale), "zero_point": int(zero_point)}

