"""Freezing a real (tiny) trained model: archive -> SavedModel -> frozen graph -> parity."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from headpose.artifacts.archive import find_saved_model, safe_extract  # noqa: E402
from headpose.artifacts.freeze import FreezeError, freeze_graph, freeze_saved_model  # noqa: E402
from headpose.artifacts.freeze_cli import build_parser, main  # noqa: E402
from headpose.training import labels  # noqa: E402
from headpose.training.export import export_saved_model  # noqa: E402
from headpose.training.model import build_resnet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frozen(tiny_model, tmp_path_factory):
    """The session's trained model as training packs it -> safe_extract -> find_saved_model ->
    freeze, as the DAG does. Its batch norm statistics are far from the initial ones (trained
    with momentum 0.9): folding them into the graph must be exact for parity to hold."""
    base = tmp_path_factory.mktemp("freeze")
    archive = tiny_model["archive"]
    saved_model = find_saved_model(safe_extract(archive, base / "extracted"))
    result = freeze_saved_model(saved_model, base / "frozen")
    return {"base": base, "archive": archive, "saved_model": saved_model, "result": result,
            "model_dir": tiny_model["model_dir"]}


def read_graph_def(path: Path):
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(path.read_bytes())
    return graph_def


def run_plain_tf1(pb_path: Path, images: np.ndarray, feed: str = "inputs:0") -> np.ndarray:
    """How an outside consumer runs the file: import_graph_def into a graph, one session."""
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(read_graph_def(pb_path), name="")
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run("softmax_tensor:0", {feed: images})


def serve(saved_model: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """The SavedModel's serving signature, as TF Serving runs it."""
    signature = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    return {key: value.numpy() for key, value in signature(inputs=tf.constant(images)).items()}


@pytest.mark.slow
def test_frozen_graph_matches_saved_model(frozen):
    images = np.random.default_rng(7).random((5, 84, 84, 3), dtype=np.float32)
    probabilities = run_plain_tf1(frozen["result"].pb_path, images)
    expected = serve(frozen["saved_model"], images)["probabilities"]
    assert probabilities.shape == (5, labels.NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(probabilities - expected)) < 1e-5
    assert frozen["result"].parity_max_abs_diff < 1e-5


@pytest.mark.slow
def test_node_names_and_ops(frozen):
    graph_def = read_graph_def(frozen["result"].pb_path)
    nodes = {node.name: node for node in graph_def.node}
    ops = {node.op for node in graph_def.node}

    inputs = nodes["inputs"]
    assert inputs.op == "Placeholder"
    assert tf.dtypes.as_dtype(inputs.attr["dtype"].type) == tf.float32
    assert [d.size for d in inputs.attr["shape"].shape.dim] == [-1, 84, 84, 3]
    assert [n for n in nodes.values() if n.op == "Placeholder"] == [inputs]
    assert nodes["softmax_tensor"].op == "Softmax"

    assert not ops & {"Rsqrt", "VarHandleOp", "ReadVariableOp", "VariableV2", "Identity",
                      "NoOp", "StatefulPartitionedCall", "FusedBatchNormV3"}
    assert not [op for op in ops if op.startswith("_")], "CPU-only fused ops leaked in"
    assert not graph_def.library.function
    # The batch norm after each block's first convolution is folded into its weights
    # and bias: one BiasAdd per such convolution plus the logits'.
    assert sum(node.op == "BiasAdd" for node in graph_def.node) == 4 + 1
    result = frozen["result"]
    assert result.node_count == len(graph_def.node) < result.node_count_before


@pytest.mark.slow
def test_metadata(frozen):
    result = frozen["result"]
    metadata = json.loads(result.json_path.read_text())
    data = result.pb_path.read_bytes()
    assert result.json_path == result.pb_path.with_name("frozen_model.json")
    assert metadata["sha256"] == result.sha256 == hashlib.sha256(data).hexdigest()
    assert metadata["size_bytes"] == len(data)
    assert metadata["node_count"] == result.node_count
    assert metadata["inputs"] == [
        {"name": "inputs", "tensor": "inputs:0", "dtype": "float32", "shape": [None, 84, 84, 3],
         "signature_input": "inputs"}
    ]
    assert metadata["outputs"] == [
        {"name": "softmax_tensor", "tensor": "softmax_tensor:0", "dtype": "float32", "shape": [None, 9],
         "signature_output": "probabilities"}
    ]
    # What export_saved_model recorded by default; one name for it, never "colour_order".
    assert metadata["preprocessing"]["channel_order"] == "bgr" == result.channel_order
    assert "colour_order" not in metadata["preprocessing"]
    assert metadata["preprocessing"]["value_range"] == [0.0, 1.0]
    assert [c["name"] for c in metadata["classes"]] == labels.class_names()
    assert [c["index"] for c in metadata["classes"]] == list(range(9))
    assert all(c["index"] == c["pan_bin"] * 3 + c["tilt_bin"] for c in metadata["classes"])
    assert metadata["bins"]["thresholds_normalised"] == list(labels.BIN_THRESHOLDS)
    assert metadata["tensorflow_version"] == tf.__version__
    assert metadata["op_counts"]["Conv2D"] == 12


@pytest.mark.slow
def test_wrong_output_node_lists_candidates(frozen, tmp_path):
    with pytest.raises(FreezeError) as raised:
        freeze_saved_model(frozen["saved_model"], tmp_path, output_node_names=("logits",))
    message = str(raised.value)
    assert "'logits'" in message
    assert "probabilities" in message and "classes" in message and "/Softmax" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_serving_signature_is_the_tutorials(frozen):
    # What TF Serving / SageMaker endpoint clients written for the tutorial read.
    signature = tf.saved_model.load(str(frozen["saved_model"])).signatures["serving_default"]
    assert {key: (spec.dtype, spec.shape.as_list()) for key, spec in signature.structured_outputs.items()} == {
        "probabilities": (tf.float32, [None, 9]), "classes": (tf.int64, [None]),
    }
    images = np.random.default_rng(1).random((6, 84, 84, 3), dtype=np.float32)
    outputs = serve(frozen["saved_model"], images)
    np.testing.assert_array_equal(outputs["classes"], outputs["probabilities"].argmax(axis=1))


@pytest.mark.slow
def test_the_tutorials_freeze_graph_call(frozen, tmp_path, monkeypatch):
    # The tutorial: model_dir = glob('export/*/*')[0]; freeze_graph(model_dir, ...) wrote
    # frozen_model.pb in the current folder. Here model_dir is the folder above export/.
    monkeypatch.chdir(tmp_path)
    result = freeze_graph(frozen["model_dir"], "Const_1", "softmax_tensor")
    assert result.pb_path.resolve() == (tmp_path / "frozen_model.pb").resolve()
    graph_def = read_graph_def(result.pb_path)
    nodes = {node.name: node for node in graph_def.node}
    assert [n.name for n in graph_def.node if n.op == "Placeholder"] == ["Const_1"]
    assert nodes["softmax_tensor"].op == "Softmax"

    images = np.random.default_rng(5).random((3, 84, 84, 3), dtype=np.float32)
    probabilities = run_plain_tf1(result.pb_path, images, feed="Const_1:0")
    np.testing.assert_allclose(probabilities, serve(frozen["saved_model"], images)["probabilities"], atol=1e-5)
    metadata = json.loads(result.json_path.read_text())
    assert [(t["tensor"], t["signature_input"]) for t in metadata["inputs"]] == [("Const_1:0", "inputs")]
    assert [(t["tensor"], t["signature_output"]) for t in metadata["outputs"]] == [
        ("softmax_tensor:0", "probabilities")]

    # The SavedModel folder itself, and comma-separated names, as the tutorial passed them.
    both = freeze_graph(frozen["saved_model"], "inputs", "softmax_tensor,classes", tmp_path / "both")
    classes = tf.compat.v1.GraphDef()
    classes.ParseFromString(both.pb_path.read_bytes())
    assert {n.name: n.op for n in classes.node if n.name in ("softmax_tensor", "classes")} == {
        "softmax_tensor": "Softmax", "classes": "ArgMax"}
    assert both.output_names == ("softmax_tensor", "classes")


def _export_v1_signature(model, path: Path) -> Path:
    """A SavedModel as this project exported it before the tutorial's signature: one output
    ``softmax_tensor``, no preprocessing record."""
    spec = tf.TensorSpec([None, 84, 84, 3], tf.float32, name="inputs")

    @tf.function(input_signature=[spec])
    def serve_v1(inputs):
        return {"softmax_tensor": tf.identity(model(inputs, training=False), name="softmax_tensor")}

    module = tf.Module()
    module.model, module.serve = model, serve_v1
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve_v1})
    return path


@pytest.mark.slow
def test_a_saved_model_of_the_earlier_signature_still_freezes(tmp_path):
    tf.keras.utils.set_random_seed(2)
    saved_model = _export_v1_signature(build_resnet(10, base_filters=4), tmp_path / "v1")
    result = freeze_saved_model(saved_model, tmp_path / "frozen", input_node_names=("Const_1",))
    assert result.parity_max_abs_diff < 1e-5
    assert result.channel_order == "bgr"  # no record: the default
    metadata = json.loads(result.json_path.read_text())
    assert metadata["outputs"][0]["signature_output"] == "softmax_tensor"


@pytest.mark.slow
def test_the_channel_order_comes_from_the_saved_models_record(tmp_path):
    tf.keras.utils.set_random_seed(4)
    saved_model = export_saved_model(build_resnet(10, base_filters=4), tmp_path / "m", channel_order="rgb")
    assert json.loads((saved_model / "assets.extra/preprocessing.json").read_text()) == {"channel_order": "rgb"}
    result = freeze_saved_model(saved_model, tmp_path / "read", parity_tolerance=None)
    assert json.loads(result.json_path.read_text())["preprocessing"]["channel_order"] == "rgb"
    assert freeze_saved_model(saved_model, tmp_path / "same", parity_tolerance=None,
                              channel_order="rgb").channel_order == "rgb"
    with pytest.raises(FreezeError, match="channel_order='bgr' contradicts the SavedModel.*'rgb'"):
        freeze_saved_model(saved_model, tmp_path / "contradicted", channel_order="bgr")
    with pytest.raises(FreezeError, match="must be one of"):
        freeze_saved_model(saved_model, tmp_path / "unknown", channel_order="RGB")
    assert not (tmp_path / "contradicted").exists() and not (tmp_path / "unknown").exists()


@pytest.mark.slow
@pytest.mark.parametrize("record", [b"\xff\xfe not text", b'{"channel_order": "grb"}', b"[1, 2]",
                                    b"{" + b" " * 70_000 + b"}"])
def test_a_hostile_preprocessing_record_is_refused(frozen, tmp_path, record):
    copy = tmp_path / "model"
    shutil.copytree(frozen["saved_model"], copy)
    (copy / "assets.extra/preprocessing.json").write_bytes(record)
    with pytest.raises(FreezeError, match="preprocessing"):
        freeze_saved_model(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_wrong_input_node_lists_placeholders(frozen, tmp_path):
    with pytest.raises(FreezeError, match=r"'images' is not a placeholder; placeholders: \['inputs'\]"):
        freeze_saved_model(frozen["saved_model"], tmp_path, input_node_names=("images",))


@pytest.mark.slow
def test_an_output_that_is_not_one_score_per_class_is_refused(tmp_path):
    saved_model = export_saved_model(build_resnet(10, base_filters=4, num_classes=5), tmp_path / "five")
    with pytest.raises(FreezeError, match=r"has 5 scores per image; the class map has 9 head-pose classes"):
        freeze_saved_model(saved_model, tmp_path / "frozen")
    assert not (tmp_path / "frozen" / "frozen_model.pb").exists()


@pytest.mark.slow
def test_unknown_signature(frozen, tmp_path):
    with pytest.raises(FreezeError, match="serving_default"):
        freeze_saved_model(frozen["saved_model"], tmp_path, signature_key="predict")


@pytest.mark.slow
def test_corrupt_saved_model_pb(frozen, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(frozen["saved_model"], broken)
    (broken / "saved_model.pb").write_bytes(b"\x0a\xff\xff garbage, not a protobuf")
    with pytest.raises(FreezeError, match="cannot load the SavedModel"):
        freeze_saved_model(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_missing_saved_model_pb(tmp_path):
    with pytest.raises(FreezeError, match="no saved_model.pb"):
        freeze_saved_model(tmp_path, tmp_path / "out")


def test_modules_import_without_tensorflow():
    """Operators import these at DAG-parse time, where TensorFlow and numpy must not load."""
    code = (
        "import sys, headpose.artifacts.freeze, headpose.artifacts.evaluate, headpose.artifacts.archive; "
        "print(sorted(m for m in ('tensorflow', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "include")}, check=True)
    assert done.stdout.strip() == "[]"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "headpose.artifacts.freeze", *args],
        capture_output=True, text=True, env=env, check=False,
    )


def test_cli_help_describes_every_argument():
    done = cli("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--saved-model-dir", "--model-tar", "--output-dir", "--input-node",
                   "--output-node", "--signature-key", "--parity-tolerance", "--channel-order",
                   "--work-dir"):
        assert option in done.stdout
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


@pytest.mark.slow
def test_cli_freezes_a_model_archive(frozen, tmp_path):
    done = cli("--model-tar", str(frozen["archive"]), "--output-dir", str(tmp_path / "out"),
               "--work-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["sha256"] == frozen["result"].sha256  # same model, same bytes
    assert Path(summary["pb_path"]).is_file() and Path(summary["json_path"]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # extraction cleaned up


@pytest.mark.slow
def test_cli_error_is_a_message_and_exit_code(frozen, tmp_path, capsys):
    code = main(["--saved-model-dir", str(frozen["saved_model"]), "--output-dir", str(tmp_path),
                 "--output-node", "nope"])
    assert code == 2
    assert "output node 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_operator_freezes_by_the_tutorials_names_and_reports_the_channel_order(
        frozen, tmp_path, s3_client, s3_endpoint, monkeypatch):
    import airflow_support  # noqa: F401  (a throw-away AIRFLOW_HOME before airflow is imported)
    from airflow.sdk.exceptions import AirflowFailException
    from headpose_operators import FreezeGraphOperator
    from headpose.planning.layout import file_sha256
    from support import aws_env

    for name, value in aws_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HEADPOSE_WORKSPACE", str(tmp_path / "scratch"))
    s3_client.create_bucket(Bucket="freeze")
    s3_client.upload_file(str(frozen["archive"]), "freeze", "job/output/model.tar.gz")

    def operator(**kwargs):
        # Rendered templates are strings: "Const_1", "a,b", and "None" for an unset value.
        arguments = {"artifact_sha256": file_sha256(frozen["archive"]), **kwargs}
        return FreezeGraphOperator(
            task_id="freeze_graph", training_job_name="job", artifact_uri="s3://freeze/job/output/model.tar.gz",
            output_prefix="s3://freeze/job/candidate/", input_node_names="Const_1",
            output_node_names="softmax_tensor", **arguments,
        )

    assert "channel_order" in FreezeGraphOperator.template_fields
    xcom = operator(channel_order="None").execute({})
    assert xcom["input_node_names"] == ["Const_1"] and xcom["output_node_names"] == ["softmax_tensor"]
    assert xcom["channel_order"] == "bgr"  # what the export recorded
    body = s3_client.get_object(Bucket="freeze", Key="job/candidate/frozen_model.json")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == xcom["frozen_model_json_sha256"]
    metadata = json.loads(body)
    assert metadata["inputs"][0]["tensor"] == "Const_1:0"
    assert metadata["preprocessing"]["channel_order"] == "bgr"
    assert not list((tmp_path / "scratch").rglob("*.pb"))  # the scratch went with the try
    with pytest.raises(AirflowFailException, match="contradicts the SavedModel"):
        operator(channel_order="rgb").execute({})
    with pytest.raises(AirflowFailException, match="recorded"):  # an artifact replaced after download_artifact
        operator(artifact_sha256="0" * 64).execute({})
