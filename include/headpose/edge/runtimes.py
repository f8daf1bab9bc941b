"""Each edge format in its own runtime: float32 images in, float32 probabilities out.

An adapter imports its runtime when it opens a model, so a device needs only the
runtime of the format it runs (and numpy), never TensorFlow. Everything an adapter
needs - tensor names, int8 scale and zero point, OpenVINO's precision hint - comes from
the format's metadata, as the exporter read it back from the file.

``threads`` is the runtime's intra-op thread count; without it each runtime gets
``DEFAULT_THREADS``, chosen from ``bench/bench_edge.py`` on a 2-core machine shared
with other work: ONNX Runtime and LiteRT one thread (ResNet-50 at batch 1: ONNX Runtime
1.56x TensorFlow's speed with one thread, 0.79x with two; LiteRT int8 8.2x against
6.5x, float32 no gain), OpenVINO its own default (all cores, latency hint), which made
it the fastest float32 runtime there. A device with cores to itself may do better with
more threads: ``--threads`` on the command line.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from headpose.edge.errors import EdgeClientError

if TYPE_CHECKING:
    import numpy as np

# runtime name in the metadata -> (module to import, package to install)
RUNTIMES = {
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "litert": ("ai_edge_litert", "ai-edge-litert"),
    "openvino": ("openvino", "openvino"),
}

Runner = Callable[["np.ndarray"], "np.ndarray"]
# runtime -> intra-op threads when none are asked for (None: the runtime's own default)
DEFAULT_THREADS: dict[str, int | None] = {"onnxruntime": 1, "litert": 1, "openvino": None}


def import_openvino():
    """``openvino``, with its usage telemetry left out: import it through here, first.

    OpenVINO's converter reports each conversion to Google Analytics from a process forked
    off the caller (``openvino_telemetry``, on unless ``~/intel/openvino_telemetry`` opts
    out). Forked from a task process with TensorFlow's threads running, that child can
    deadlock on a lock some thread held, and the task process then waits for it at exit:
    an Airflow task that never ends. Workers and devices have no business phoning home
    anyway. OpenVINO falls back to its own no-op stub when the package cannot be imported,
    so it is kept out of ``sys.modules`` before OpenVINO's first import in the process.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None: the import raises ImportError
    import openvino

    return openvino


def runtime_available(runtime: str) -> bool:
    """Whether ``runtime``'s module is installed (found, not imported)."""
    module = RUNTIMES.get(runtime, (None,))[0]
    return module is not None and importlib.util.find_spec(module) is not None


def open_runner(metadata: Mapping[str, Any], model_dir: str | Path, threads: int | None = None) -> Runner:
    """A callable running the format described by ``metadata`` from the files in ``model_dir``.

    ``threads``: the runtime's intra-op threads (default ``DEFAULT_THREADS``).
    """
    runtime = metadata.get("runtime")
    if runtime not in RUNTIMES:
        raise EdgeClientError(f"format {metadata.get('format')!r} needs runtime {runtime!r}, "
                              f"which this client does not know (it knows {sorted(RUNTIMES)})")
    if not runtime_available(runtime):
        raise EdgeClientError(f"format {metadata.get('format')!r} runs in {runtime}: "
                              f"pip install {RUNTIMES[runtime][1]}")
    path = Path(model_dir) / metadata["model_file"]
    if not path.is_file():
        raise EdgeClientError(f"no {metadata['model_file']} in {model_dir}")
    adapter = {"onnxruntime": OnnxRunner, "litert": LiteRTRunner, "openvino": OpenVINORunner}[runtime]
    try:
        return adapter(metadata, path, threads or DEFAULT_THREADS[runtime])
    except EdgeClientError:
        raise
    except Exception as error:  # each runtime has its own loader errors
        raise EdgeClientError(f"{runtime} cannot load {path.name}: {type(error).__name__}: {error}") from None


class OnnxRunner:
    def __init__(self, metadata: Mapping[str, Any], path: Path, threads: int | None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = metadata["inputs"][0]["name"]
        self.output_name = metadata["outputs"][0]["name"]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import numpy as np

        feed = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: feed})[0]


class LiteRTRunner:
    """LiteRT interpreter; a fixed batch-1 file runs a batch after ``resize_tensor_input``."""

    def __init__(self, metadata: Mapping[str, Any], path: Path, threads: int | None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self.input_quantization = metadata["inputs"][0].get("quantization")
        self.output_quantization = metadata["outputs"][0].get("quantization")
        self.batch = int(self.interpreter.get_input_details()[0]["shape"][0])
        self.per_image = False

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import numpy as np

        if images.shape[0] != self.batch and not self.per_image:
            self._resize(images.shape)
        if self.per_image and images.shape[0] != self.batch:
            return np.concatenate([self(images[i:i + 1]) for i in range(images.shape[0])])
        self.interpreter.set_tensor(self.input_index, quantize(images, self.input_quantization))
        self.interpreter.invoke()
        return dequantize(self.interpreter.get_tensor(self.output_index), self.output_quantization)

    def _resize(self, shape: tuple[int, ...]) -> None:
        try:
            self.interpreter.resize_tensor_input(self.input_index, list(shape), strict=False)
            self.interpreter.allocate_tensors()
            self.batch = int(shape[0])
        except (RuntimeError, ValueError):
            # Some graphs fix their batch in a Reshape; those run one image at a time.
            self.interpreter.resize_tensor_input(self.input_index, [1, *shape[1:]], strict=False)
            self.interpreter.allocate_tensors()
            self.batch, self.per_image = 1, True


class OpenVINORunner:
    """OpenVINO on the CPU with the format's ``runtime_settings`` (its precision hint)."""

    def __init__(self, metadata: Mapping[str, Any], path: Path, threads: int | None):
        openvino = import_openvino()
        settings = dict(metadata.get("runtime_settings") or {})
        if threads:
            settings["INFERENCE_NUM_THREADS"] = threads
        self.compiled = openvino.Core().compile_model(str(path), "CPU", settings)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import numpy as np

        result = self.request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return np.array(result[self.output], dtype=np.float32)

    def precision(self) -> str:
        """The precision OpenVINO actually runs at (a hint the CPU lacks falls back to f32)."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def quantize(values: np.ndarray, quantization: Mapping[str, float] | None) -> np.ndarray:
    """Float values -> int8 with the tensor's scale and zero point (unchanged when float)."""
    import numpy as np

    if not quantization:
        return np.ascontiguousarray(values, dtype=np.float32)
    q = np.round(values / quantization["scale"]) + quantization["zero_point"]
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize(values: np.ndarray, quantization: Mapping[str, float] | None) -> np.ndarray:
    """int8 values -> float32 with the tensor's scale and zero point (unchanged when float)."""
    import numpy as np

    if not quantization:
        return np.asarray(values, dtype=np.float32)
    return ((values.astype(np.float32) - quantization["zero_point"]) * quantization["scale"]).astype(np.float32)
