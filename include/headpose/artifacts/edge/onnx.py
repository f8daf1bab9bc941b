"""``model.onnx``: the frozen graph through tf2onnx, checked in ONNX Runtime.

The batch dimension stays dynamic (``N``): ONNX Runtime runs any batch size from one file.
Opset 17 (ONNX 1.12) by default: every op of this network exists there, and it is one
below the newest opset tf2onnx 1.17 writes (18), so runtime builds a release or two
older than the pinned ONNX Runtime still load the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from headpose.artifacts.edge.converter import (
    EdgeConverter,
    EdgeFormatError,
    FrozenSource,
    package_versions,
    require_io,
    require_probabilities,
    tensor_entry,
)

DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"
# tf2onnx names unknown dimensions ``unk__<n>``, a different name for the input's and
# the output's batch; one name says that they are the same dimension.
BATCH_DIM = "N"
_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}


class OnnxConverter(EdgeConverter):
    """Frozen graph -> ``model.onnx`` (float32, NHWC as in TensorFlow)."""

    runtime = "onnxruntime"
    precision = "float32"
    model_file = MODEL_FILE

    def __init__(self, opset: int = DEFAULT_OPSET, format: str = "onnx"):
        self.opset = opset
        self.format = format

    def _convert(self, source: FrozenSource, scratch: Path) -> dict[str, Path]:
        import onnx
        import tf2onnx

        model_proto, _ = tf2onnx.convert.from_graph_def(
            source.graph_def(), input_names=[f"{source.input_name}:0"],
            output_names=[f"{source.output_name}:0"], opset=self.opset,
        )
        for value in (*model_proto.graph.input, *model_proto.graph.output):
            batch = value.type.tensor_type.shape.dim[0]
            if not batch.HasField("dim_value"):
                batch.dim_param = BATCH_DIM
        path = scratch / MODEL_FILE
        onnx.save(model_proto, str(path))
        return {MODEL_FILE: path}

    def _validate_output(self, written: dict[str, Path], source: FrozenSource) -> dict[str, Any]:
        import numpy as np
        import onnx
        import onnxruntime

        path = written[self.model_file]
        onnx.checker.check_model(str(path))
        opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx"))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise EdgeFormatError(f"the model has {len(inputs)} inputs and {len(outputs)} outputs, expected one each")
        height, width = source.image_size
        entries = []
        for role, tensor, expected in (("input", inputs[0], [None, height, width, 3]),
                                       ("output", outputs[0], [None, source.num_classes])):
            shape = [d if isinstance(d, int) else None for d in tensor.shape]
            dtype = _ONNX_DTYPES.get(tensor.type, tensor.type)
            require_io(f"{role} {tensor.name!r}", shape, dtype, expected, "float32")
            entries.append(tensor_entry(tensor.name, shape, dtype))
        zeros = np.zeros([1, height, width, 3], np.float32)
        require_probabilities(session.run(None, {inputs[0].name: zeros})[0], source.num_classes)
        return self.metadata(source, self.model_file, [entries[0]], [entries[1]], opset=opset,
                             converter=package_versions("tf2onnx", "onnx"))
