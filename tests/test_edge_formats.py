"""Edge formats of a real tiny model: conversion, edge_models.json, validation in each runtime.

The session's shared model (``model_support``) is trained for seconds on the tiny synthetic set and
converted once per session into every format; tests that need other converters run
their own export on the same frozen graph.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from support import ROOT
from headpose.artifacts.edge.converter import EdgeFormatError
from headpose.artifacts.edge.export import DEFAULT_FORMATS, export_edge_models, representative_images
from headpose.artifacts.edge.litert import LiteRTConverter
from headpose.artifacts.edge.onnx import OnnxConverter
from headpose.artifacts.edge.onnx_int8 import OnnxInt8Converter
from headpose.artifacts.edge.openvino import OpenVINOConverter
from headpose.artifacts.edge.openvino_int8 import OpenVINOInt8Converter
from headpose.artifacts.edge.validate import validate_edge_models, validation_table, verdict

pytestmark = pytest.mark.slow
FLOAT32 = ("onnx", "litert_float32", "openvino_fp32")
REDUCED = ("litert_int8", "openvino_fp16", "openvino_bf16", "openvino_int8", "onnx_int8")


@pytest.fixture(scope="module")
def models(tiny_edge_models):
    return tiny_edge_models


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_format_converts_and_holds_its_tolerance_in_its_own_runtime(models):
    # On the images it learnt, the model is right and confident: reduced precision must
    # keep its accuracy (within 2 of 93 images), float32 must match it exactly.
    assert models["export"].refused == {}
    verdicts = validate_edge_models(models["manifest"], models["edge_dir"], models["frozen"], models["train"])
    assert set(verdicts) == set(DEFAULT_FORMATS)
    for name, entry in verdicts.items():
        assert entry["accepted"], entry["reason"]
        assert entry["images"] == 93 and entry["latency_ms_b1"] > 0
    assert verdicts["onnx"]["reference_accuracy"] > 0.9
    for name in FLOAT32:
        assert verdicts[name]["accuracy"] == verdicts[name]["reference_accuracy"]
    assert {verdicts[n]["runtime"] for n in DEFAULT_FORMATS} == {"onnxruntime", "litert", "openvino"}


def test_float32_formats_match_tensorflow_where_the_softmax_is_not_saturated(models):
    from headpose.artifacts.evaluate import load_frozen_graph
    from headpose.training import shards

    images, _ = next(iter(shards.dataset(models["eval"], 93, training=False)))
    top = load_frozen_graph(models["frozen"])(images).max(axis=1)
    assert np.median(top) < 0.9  # otherwise a diff of 1e-4 would say little
    verdicts = validate_edge_models(models["manifest"], models["edge_dir"], models["frozen"], models["eval"])
    for name in FLOAT32:
        assert verdicts[name]["accepted"] and verdicts[name]["max_abs_diff"] <= 1e-4, verdicts[name]
    for name in REDUCED:
        assert verdicts[name]["max_abs_diff"] is not None  # ran; judged by accuracy, not by diff


def test_edge_models_json_describes_every_file_as_its_runtime_sees_it(models):
    import onnx
    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter

    from headpose.edge.runtimes import import_openvino

    openvino = import_openvino()

    manifest, folder, frozen = models["manifest"], models["edge_dir"], models["metadata"]
    assert manifest["frozen_model"]["sha256"] == _sha256(models["frozen"])
    for name, entry in manifest["formats"].items():
        for file, ref in entry["files"].items():
            assert ref["sha256"] == _sha256(folder / file), (name, file)
        metadata = entry["metadata"]
        assert metadata["format"] == name and metadata["model_file"] in entry["files"]
        assert metadata["classes"] == frozen["classes"]
        order = frozen["preprocessing"].get("channel_order") or frozen["preprocessing"]["colour_order"]
        assert metadata["preprocessing"]["channel_order"] == order.lower()
        assert metadata["preprocessing"]["value_range"] == frozen["preprocessing"]["value_range"]

    onnx32 = manifest["formats"]["onnx"]["metadata"]
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert onnx32["inputs"][0]["name"] == session.get_inputs()[0].name
    assert onnx32["inputs"][0]["shape"] == [None, 84, 84, 3] and onnx32["inputs"][0]["batch"] == "dynamic"
    assert onnx32["opset"] == 17

    int8 = manifest["formats"]["litert_int8"]["metadata"]
    detail = Interpreter(model_path=str(folder / "model_int8.tflite")).get_input_details()[0]
    assert int8["inputs"][0]["dtype"] == "int8" and int8["inputs"][0]["batch"] == "fixed"
    assert (int8["inputs"][0]["quantization"]["scale"], int8["inputs"][0]["quantization"]["zero_point"]) == \
        pytest.approx(detail["quantization"])
    assert int8["outputs"][0]["dtype"] == "int8" and int8["calibration_images"] == 93

    fp32, bf16 = manifest["formats"]["openvino_fp32"], manifest["formats"]["openvino_bf16"]
    assert bf16["files"] == fp32["files"] and bf16["precision"] == "bfloat16"
    assert bf16["metadata"]["runtime_settings"] == {"INFERENCE_PRECISION_HINT": "bf16"}
    assert fp32["metadata"]["runtime_settings"] == {"INFERENCE_PRECISION_HINT": "f32"}
    ir = openvino.Core().read_model(str(folder / "model.xml"))
    assert fp32["metadata"]["inputs"][0]["name"] == ir.inputs[0].get_any_name()
    fp16_bin = manifest["formats"]["openvino_fp16"]["files"]["model_fp16.bin"]["size_bytes"]
    assert fp16_bin < 0.6 * fp32["files"]["model.bin"]["size_bytes"]

    # The int8 formats: float32 in and out (fed like the float32 files), int8 weights inside.
    ov8, onnx8 = manifest["formats"]["openvino_int8"], manifest["formats"]["onnx_int8"]
    assert sorted(ov8["files"]) == ["model_int8.bin", "model_int8.xml"] and list(onnx8["files"]) == ["model_int8.onnx"]
    for entry in (ov8, onnx8):
        assert entry["precision"] == "int8" and entry["metadata"]["quantization"]["calibration_images"] == 93
        assert [t["dtype"] for t in (*entry["metadata"]["inputs"], *entry["metadata"]["outputs"])] == ["float32"] * 2
    assert ov8["metadata"]["runtime_settings"] == {"INFERENCE_PRECISION_HINT": "f32"}
    ir8 = openvino.Core().read_model(str(folder / "model_int8.xml"))
    assert sum(op.get_type_name() == "FakeQuantize" for op in ir8.get_ops()) == \
        ov8["metadata"]["quantization"]["fake_quantize_ops"] > 0
    graph8 = onnx.load(str(folder / "model_int8.onnx")).graph
    int8_weights = [i for i in graph8.initializer if i.data_type == onnx.TensorProto.INT8]
    assert {n.op_type for n in graph8.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert len(int8_weights) == onnx8["metadata"]["quantization"]["int8_weight_tensors"] >= \
        sum(n.op_type == "Conv" for n in graph8.node) > 0
    assert onnx8["files"]["model_int8.onnx"]["size_bytes"] < 0.5 * manifest["formats"]["onnx"]["files"][
        "model.onnx"]["size_bytes"]


class Raising:
    format = "onnx"

    def convert(self, source, out_dir):
        raise RuntimeError("the converter crashed")


class Truncating(LiteRTConverter):
    def _convert(self, source, scratch):
        written = super()._convert(source, scratch)
        path = written[self.model_file]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        return written


def test_a_converter_that_raises_or_truncates_is_refused_and_the_others_export(models, tmp_path):
    result = export_edge_models(
        models["frozen"], models["metadata"], tmp_path, None, ("onnx", "litert_float32", "openvino_fp32"),
        converters={"onnx": Raising(), "litert_float32": Truncating()},
    )
    assert sorted(result.models) == ["openvino_fp32"]
    assert result.refused["onnx"] == "onnx: RuntimeError: the converter crashed"
    assert result.refused["litert_float32"].startswith("litert_float32: output refused: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge_models.json", "model.bin", "model.xml"]
    written = json.loads((tmp_path / "edge_models.json").read_text())
    assert written["refused"] == result.refused and list(written["formats"]) == ["openvino_fp32"]


class WrongGraphOnnx(OnnxConverter):
    """Converts another graph than the one it is given: a converter with a bug."""

    def __init__(self, other):
        super().__init__()
        self.other = other

    def _convert(self, source, scratch):
        return super()._convert(self.other, scratch)


class WrongGraphLiteRT(LiteRTConverter):
    def __init__(self, other, **options):
        super().__init__(**options)
        self.other = other

    def _convert(self, source, scratch):
        return super()._convert(self.other, scratch)


class UnquantisedOnnxInt8(OnnxInt8Converter):
    """Skips the quantiser and writes the float32 model under the int8 name: a converter with a bug."""

    def _convert(self, source, scratch):
        float32 = OnnxConverter._convert(self, source, scratch)["model.onnx"]
        return {"model_int8.onnx": float32.rename(scratch / "model_int8.onnx")}


class UnquantisedOpenVINOInt8(OpenVINOInt8Converter):
    def _convert(self, source, scratch):
        return OpenVINOConverter._convert(self, source, scratch)


def test_an_int8_format_whose_file_is_not_quantised_is_refused(models, tmp_path):
    images = representative_images(models["train"], 8)
    result = export_edge_models(
        models["frozen"], models["metadata"], tmp_path, images, ("openvino_int8", "onnx_int8"),
        converters={"openvino_int8": UnquantisedOpenVINOInt8(images), "onnx_int8": UnquantisedOnnxInt8(images)},
    )
    assert result.models == {}
    assert result.refused["openvino_int8"].startswith(
        "openvino_int8: output refused: the IR has 0 FakeQuantize operations and OpenVINO runs 0 layers in int8")
    assert re.match(r"onnx_int8: output refused: (\d+) of \1 convolutions and matrix products keep float weights",
                    result.refused["onnx_int8"]), result.refused["onnx_int8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge_models.json"]


def test_validation_withholds_wrong_graphs_and_accepts_the_other_formats(models, tmp_path):
    from headpose.artifacts.edge.converter import frozen_source

    other = frozen_source(models["other"].pb_path, models["other"].metadata)
    images = representative_images(models["train"], 32)
    result = export_edge_models(
        models["frozen"], models["metadata"], tmp_path, images,
        ("onnx", "litert_float32", "litert_int8", "openvino_fp32"),
        converters={"onnx": WrongGraphOnnx(other),
                    "litert_int8": WrongGraphLiteRT(other, quantization="int8", representative_images=images)},
    )
    assert result.refused == {}  # each file is a valid model: only running it tells
    verdicts = validate_edge_models(result.manifest, tmp_path, models["frozen"], models["train"])
    assert not verdicts["onnx"]["accepted"] and "float32 formats may differ by 0.0001" in verdicts["onnx"]["reason"]
    assert not verdicts["litert_int8"]["accepted"] and "images lost" in verdicts["litert_int8"]["reason"]
    assert verdicts["litert_float32"]["accepted"] and verdicts["openvino_fp32"]["accepted"]
    table = validation_table(verdicts).splitlines()
    assert len(table) == 2 + 4
    assert any(line.startswith("onnx") and "withheld: onnx:" in line for line in table)


def test_a_file_changed_after_export_is_withheld(models, tmp_path):
    folder = tmp_path / "edge"
    shutil.copytree(models["edge_dir"], folder)
    data = bytearray((folder / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.tflite").write_bytes(bytes(data))
    verdicts = validate_edge_models(models["manifest"], folder, models["frozen"], models["eval"])
    assert not verdicts["litert_float32"]["accepted"]
    assert "model.tflite has sha256" in verdicts["litert_float32"]["reason"]
    assert all(verdicts[n]["accepted"] for n in ("onnx", "openvino_fp32"))


def test_refused_inputs_stop_the_export_before_any_file_is_written(models, tmp_path):
    frozen, metadata = models["frozen"], models["metadata"]
    with pytest.raises(ValueError, match="unknown edge formats \\['tensorrt'\\]"):
        export_edge_models(frozen, metadata, tmp_path / "a", None, ("onnx", "tensorrt"))
    with pytest.raises(ValueError, match="openvino_bf16 runs the files of openvino_fp32"):
        export_edge_models(frozen, metadata, tmp_path / "b", None, ("openvino_bf16",))
    with pytest.raises(EdgeFormatError, match="but its metadata records"):
        export_edge_models(models["other"].pb_path, metadata, tmp_path / "c", None, ("onnx",))
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\x00not a graph" * 10)
    with pytest.raises(EdgeFormatError, match="is not a binary GraphDef"):
        export_edge_models(garbage, {**metadata, "sha256": _sha256(garbage)}, tmp_path / "d", None, ("onnx",))
    yuv = {**metadata["preprocessing"], "colour_order": "YUV", "channel_order": "YUV"}
    with pytest.raises(EdgeFormatError, match="channel order 'yuv'"):
        export_edge_models(frozen, {**metadata, "preprocessing": yuv}, tmp_path / "e", None, ("onnx",))
    assert not any((tmp_path / name).exists() for name in "abcde")
    with pytest.raises(EdgeFormatError, match="the formats were converted from"):
        validate_edge_models(models["manifest"], models["edge_dir"], models["other"].pb_path, models["eval"])


def test_bad_representative_images_refuse_int8_only(models, tmp_path):
    wrong_shape = [np.zeros((64, 64, 3), np.float32)]
    result = export_edge_models(models["frozen"], models["metadata"], tmp_path, wrong_shape,
                                ("litert_float32", "litert_int8", "openvino_int8", "onnx_int8"))
    assert list(result.models) == ["litert_float32"]
    for name in ("litert_int8", "openvino_int8", "onnx_int8"):
        assert result.refused[name] == (f"{name}: input refused: representative image 0 has shape "
                                        "(64, 64, 3), expected [84, 84, 3] or [N, 84, 84, 3]")
    none = export_edge_models(models["frozen"], models["metadata"], tmp_path / "c", None, ("openvino_int8",))
    assert none.refused["openvino_int8"] == ("openvino_int8: input refused: int8 quantisation needs "
                                             "representative images, none were given")
    out_of_range = export_edge_models(models["frozen"], models["metadata"], tmp_path / "b",
                                      [np.full((84, 84, 3), 255.0, np.float32)], ("litert_int8",))
    assert "values outside [0.0, 1.0]" in out_of_range.refused["litert_int8"]


@pytest.mark.parametrize("precision, images, correct, reference, diff, accepted", [
    ("float32", 93, 50, 50, 1e-4, True),
    ("float32", 93, 50, 50, 1.01e-4, False),
    ("float32", 93, 50, 50, math.nan, False),
    ("int8", 93, 48, 50, 0.3, True),        # tiny set: 2 images may be lost
    ("int8", 93, 47, 50, 0.3, False),
    ("float16", 1000, 890, 900, 0.0, True),  # one accuracy point of 1000 images
    ("bfloat16", 1000, 889, 900, 0.0, False),
    ("int8", 93, 60, 50, 0.3, True),        # gaining accuracy is no fault
])
def test_tolerances_are_the_designs(precision, images, correct, reference, diff, accepted):
    assert verdict(precision, images, correct, reference, diff)[0] is accepted


# Counts the processes OpenVINO's converter forks (its telemetry sends from one) while the
# project's converters run (NNCF's quantiser too, which reports through the same package);
# a fresh process, so this is OpenVINO's first import there.
_CONVERT_IN_A_FRESH_PROCESS = """
import multiprocessing, sys
from pathlib import Path
forks = []
start = multiprocessing.Process.start
multiprocessing.Process.start = lambda self: (forks.append(self), start(self))[1]
import json
from headpose.artifacts.edge.converter import frozen_source
from headpose.artifacts.edge.openvino import OpenVINOConverter
from headpose.artifacts.edge.openvino_int8 import OpenVINOInt8Converter
from headpose.artifacts.edge.export import representative_images
source = frozen_source(sys.argv[1], json.loads(Path(sys.argv[2]).read_text()))
OpenVINOConverter().convert(source, sys.argv[3])
OpenVINOInt8Converter(representative_images([sys.argv[4]], 8)).convert(source, sys.argv[3])
print("forks", len(forks), "nncf telemetry", type(sys.modules["nncf.telemetry.wrapper"].telemetry).__name__)
"""


def test_openvino_conversion_sends_no_telemetry_and_forks_nothing(models, tmp_path):
    """Outside CI, with no opt-out file, OpenVINO's converter and NNCF would report to Google
    Analytics from processes forked off the task (a fork of a threaded TF process can
    deadlock, and the task then never exits): the project's converters leave that telemetry out."""
    home = tmp_path / "home"
    home.mkdir()
    opt_outs = ("CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV")
    env = {key: value for key, value in os.environ.items() if key not in opt_outs}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(ROOT / "include"), env.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", _CONVERT_IN_A_FRESH_PROCESS, str(models["frozen"]), str(models["frozen_json"]),
         str(tmp_path), str(models["train"][0])], env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "forks 0 nncf telemetry MagicMock" in result.stdout, result.stdout  # NNCF's no-op stub
    assert (tmp_path / "model.xml").is_file() and (tmp_path / "model_int8.xml").is_file()
    assert not (home / "intel").exists()  # no client id, no usage statistics
