"""The entry point started by the SageMaker training toolkit itself, as SageMaker's TensorFlow image starts it.

The toolkit (``sagemaker-training``, its ``train`` command) reads
``<base>/input/config/{hyperparameters,inputdataconfig,resourceconfig}.json`` -
``<base>`` is ``/opt/ml`` in a container, ``SAGEMAKER_BASE_DIR`` here - extracts
``sagemaker_submit_directory`` into ``<base>/code``, sets the ``SM_*`` variables and
starts ``python <sagemaker_program> --key value ...``. The configs are written from a
real plan's request (``plan_run``); what the program receives is the toolkit's doing, and
the oracle for it is the toolkit and the entry point's own parser, not the project's code.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from headpose.artifacts.archive import find_saved_model
from headpose.backends.container import make_dirs, write_configs
from headpose.backends.sourcedir import build_sourcedir
from headpose.planning.plan import plan_run

ARN = "arn:aws:iam::123456789012:role/SageMakerRole"
LOGICAL = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
TINY = {"resnet_size": 10, "base_filters": 8, "training_steps": 2, "evaluation_steps": 1, "batch_size": 8}
ROOT = Path(__file__).resolve().parents[1]
# The toolkit's console script, installed beside this interpreter.
TOOLKIT = Path(sys.executable).with_name("train")
DT_HALF = 19  # tensorflow.DataType.DT_HALF


def tiny_request(**params) -> dict:
    """The request the DAG builds for a sagemaker run (GPU type: mixed precision, XLA) of a tiny model."""
    plan = plan_run(
        {"backend": "sagemaker", "role_arn": ARN, "s3_bucket": "bkt", **TINY, **params},
        LOGICAL, region="us-east-1", dag_id="headpose_retraining", run_id="manual__test",
    )
    return plan["training_request"]


def lay_out_job(root: Path, request: dict, sourcedir: Path, channel_dir: Path) -> dict[str, Path]:
    """``root`` as SageMaker's platform leaves ``/opt/ml`` for the request before the toolkit starts."""
    dirs = make_dirs(root)
    write_configs(dirs["config"], request, sourcedir)
    (dirs["data"] / "training").symlink_to(channel_dir, target_is_directory=True)
    return dirs


def toolkit_command() -> list[str]:
    return [sys.executable, str(TOOLKIT)]


def toolkit_env(root: Path, request: dict) -> dict[str, str]:
    """What the platform sets, and nothing of this checkout: no PYTHONPATH at all."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("SM_", "SAGEMAKER_"))}
    return {**env, "SAGEMAKER_BASE_DIR": str(root), "SM_STUDIO_LOCAL_MODE": "true",
            "TRAINING_JOB_NAME": request["TrainingJobName"], "PYTHONUNBUFFERED": "1"}


def run_toolkit(request: dict, root: Path, sourcedir: Path, channel_dir: Path):
    """Lay out ``root`` and run the toolkit's ``train`` to the end; ``(process, dirs)``."""
    dirs = lay_out_job(root, request, sourcedir, channel_dir)
    process = subprocess.run(toolkit_command(), cwd=dirs["code"], env=toolkit_env(root, request),
                             capture_output=True, text=True, timeout=900)
    return process, dirs


def shards_for(work: Path) -> Path:
    from headpose.datasets.synthetic import write_synthetic_dataset

    shards = work / "shards"
    write_synthetic_dataset(shards, train_per_pose=1, eval_per_pose=1, images_per_shard=200)
    return shards


PROBE = """
import json, os, sys
from pathlib import Path
seen = {"argv": sys.argv[1:], "cwd": os.getcwd(), "files": sorted(os.listdir(".")),
        "env": {k: v for k, v in os.environ.items() if k.startswith("SM_") or k == "PYTHONPATH"}}
Path(os.environ["SM_MODEL_DIR"], "seen.json").write_text(json.dumps(seen))
"""


def probe_sourcedir(path: Path) -> Path:
    """A ``sourcedir.tar.gz`` whose ``train.py`` only records how it was started."""
    with tarfile.open(path, "w:gz") as tar:
        data = PROBE.encode()
        info = tarfile.TarInfo("train.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_the_toolkit_hands_the_entry_point_the_requests_hyperparameters(tmp_path):
    from headpose.training.entry import argument_parser

    request = tiny_request()
    channel = tmp_path / "channel"
    channel.mkdir()
    process, dirs = run_toolkit(request, tmp_path / "opt-ml", probe_sourcedir(tmp_path / "probe.tar.gz"), channel)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    seen = json.loads((dirs["model"] / "seen.json").read_text())

    # Every value in the request is a JSON document (the SDK's rule); the toolkit decodes
    # it, and the entry point's own parser must read back the same values.
    hyperparameters = {k: json.loads(v) for k, v in request["HyperParameters"].items()}
    user = {k: v for k, v in hyperparameters.items() if not k.startswith("sagemaker_")}
    assert not [a for a in seen["argv"] if a.startswith("--sagemaker_")]
    parsed = vars(argument_parser().parse_args(seen["argv"]))
    assert {k: parsed[k] for k in user} == user
    assert (parsed["dtype_policy"], parsed["jit_compile"], parsed["channel_order"]) == ("mixed_float16", 1, "bgr")

    env = seen["env"]
    assert Path(seen["cwd"]) == dirs["code"] and seen["files"] == ["train.py"]
    assert env["SM_CHANNEL_TRAINING"] == str(dirs["data"] / "training")
    assert env["SM_MODEL_DIR"] == str(dirs["model"])
    assert env["SM_OUTPUT_DATA_DIR"] == str(dirs["output_data"])
    assert json.loads(env["SM_HOSTS"]) == ["algo-1"] and env["SM_CURRENT_HOST"] == "algo-1"
    assert env["SM_CURRENT_INSTANCE_TYPE"] == request["ResourceConfig"]["InstanceType"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(dirs["code"])
    assert (dirs["output"] / "success").is_file()


@pytest.fixture(scope="module")
def toolkit_run(tmp_path_factory):
    """The real entry point, from the real ``sourcedir.tar.gz``, with the GPU request's
    mixed precision and XLA (on this CPU)."""
    work = tmp_path_factory.mktemp("toolkit")
    sourcedir, _ = build_sourcedir(work / "sourcedir.tar.gz")
    request = tiny_request()
    process, dirs = run_toolkit(request, work / "opt-ml", sourcedir, shards_for(work))
    return {"process": process, "dirs": dirs, "request": request, "output": process.stdout + process.stderr}


@pytest.mark.slow
def test_the_entry_point_trains_and_exports_under_the_toolkit(toolkit_run):
    process, dirs, output = toolkit_run["process"], toolkit_run["dirs"], toolkit_run["output"]
    assert process.returncode == 0, output[-4000:]
    assert "precision: dtype_policy=mixed_float16 jit_compile=True channel_order=bgr" in output

    exports = list((dirs["model"] / "export" / "Servo").iterdir())
    assert len(exports) == 1 and exports[0].name.isdigit()
    assert (exports[0] / "saved_model.pb").is_file()
    assert json.loads((exports[0] / "assets.extra/preprocessing.json").read_text()) == {"channel_order": "bgr"}
    metrics = json.loads((dirs["model"] / "metrics.json").read_text())
    assert metrics["training_steps"] == 2 and metrics["resnet_size"] == 10
    assert (metrics["dtype_policy"], metrics["jit_compile"], metrics["channel_order"]) == ("mixed_float16", True, "bgr")
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert json.loads((dirs["output_data"] / "metrics.json").read_text()) == metrics
    assert not (dirs["output"] / "failure").exists() and (dirs["output"] / "success").is_file()

    # SageMaker reads metrics from these lines with the request's MetricDefinitions.
    found = {d["Name"] for d in toolkit_run["request"]["AlgorithmSpecification"]["MetricDefinitions"]
             if re.search(d["Regex"], output)}
    assert found == {"train:loss", "train:accuracy", "eval:loss", "eval:accuracy"}


@pytest.mark.slow
def test_a_mixed_precision_model_freezes_to_a_float32_graph(toolkit_run, tmp_path):
    import numpy as np
    import tensorflow as tf

    from headpose.artifacts.freeze import freeze_saved_model, run_graph_def

    assert toolkit_run["process"].returncode == 0, toolkit_run["output"][-4000:]
    saved_model = find_saved_model(toolkit_run["dirs"]["model"])
    result = freeze_saved_model(saved_model, tmp_path)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(result.pb_path.read_bytes())
    half = [node.name for node in graph_def.node
            if any(value.type == DT_HALF or DT_HALF in value.list.type for value in node.attr.values())
            or any(value.tensor.dtype == DT_HALF for value in node.attr.values())]
    assert half == [] and "Cast" not in {node.op for node in graph_def.node}

    images = np.random.default_rng(3).random((4, 84, 84, 3), dtype=np.float32)
    frozen = run_graph_def(graph_def, {"inputs": images}, ["softmax_tensor"])[0]
    signature = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    served = signature(inputs=tf.constant(images))
    assert served["probabilities"].dtype == tf.float32
    assert np.max(np.abs(frozen - served["probabilities"].numpy())) < 1e-5
    assert result.parity_max_abs_diff < 1e-5


@pytest.mark.slow
def test_the_float32_twin_of_a_mixed_precision_model_has_its_weights():
    import argparse

    import numpy as np
    import tensorflow as tf

    from headpose.training import entry, model

    args = argparse.Namespace(resnet_size=10, base_filters=4, weight_decay=2e-4, batch_norm_momentum=0.9)
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        tf.keras.utils.set_random_seed(0)
        mixed = model.build_resnet(10, 4, 2e-4, 0.9)
        mixed.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
        rng = np.random.default_rng(0)
        images = rng.random((8, 84, 84, 3), dtype=np.float32)
        mixed.fit(images, rng.integers(0, 9, 8), batch_size=4, epochs=1, verbose=0)
        twin = entry.float32_twin(mixed, args, model)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert mixed.dtype_policy.name == "mixed_float16" and twin.dtype_policy.name == "float32"
    assert {layer.compute_dtype for layer in twin.layers} == {"float32"}
    assert len(twin.weights) == len(mixed.weights)
    for ours, theirs in zip(twin.weights, mixed.weights):
        assert ours.path == theirs.path and ours.dtype == "float32"
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    # The same function, computed in float32 instead of float16.
    np.testing.assert_allclose(twin(images, training=False), mixed(images, training=False), atol=2e-2)


@pytest.mark.slow
def test_the_code_folder_alone_provides_the_package(toolkit_run):
    # The toolkit prints the PYTHONPATH it gave the program: the code folder first, and
    # nothing of this checkout. With it, `headpose` resolves to the extracted copy.
    code = toolkit_run["dirs"]["code"]
    python_path = re.search(r"^PYTHONPATH=(.*)$", toolkit_run["output"], re.M)[1]
    assert python_path.split(os.pathsep)[0] == str(code)
    assert str(ROOT / "include") not in python_path.split(os.pathsep)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": python_path}
    found = subprocess.run(
        [sys.executable, "-c", "import headpose.training.entry as e; print(e.__file__)"],
        cwd=code, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert Path(found).resolve().is_relative_to(code.resolve())


def two_host_job(tmp_path: Path, request: dict, sourcedir: Path, host: str) -> tuple[dict, dict]:
    """``host``'s ``/opt/ml`` of a two-instance job as SageMaker lays it out; ``(dirs, env)``."""
    channel = tmp_path / "empty-channel"
    channel.mkdir(exist_ok=True)
    request = {**request, "ResourceConfig": {**request["ResourceConfig"], "InstanceCount": 2}}
    root = tmp_path / host
    dirs = make_dirs(root)
    write_configs(dirs["config"], request, sourcedir, current_host=host)
    (dirs["data"] / "training").symlink_to(channel, target_is_directory=True)
    return dirs, toolkit_env(root, request)


CLUSTER_PROBE = """
import json, os
from pathlib import Path
from sagemaker_training import environment
from headpose.training import cluster
env = environment.Environment()
try:
    found = cluster.from_environment()
    seen = {"tf_config": found.tf_config, "chief": found.is_chief}
except cluster.ClusterError as error:
    seen = {"refused": str(error)}
seen.update(framework_params=json.loads(os.environ["SM_FRAMEWORK_PARAMS"]),
            distribution_hosts=env.distribution_hosts,
            distributed=env.current_instance_group in env.distribution_instance_groups)
Path(os.environ["SM_MODEL_DIR"], "seen.json").write_text(json.dumps(seen))
"""


def cluster_probe_sourcedir(path: Path) -> Path:
    """A ``sourcedir.tar.gz`` whose ``train.py`` records what the toolkit and ``training.cluster`` make of a cluster."""
    from headpose.backends.sourcedir import sourcedir_files

    files = sourcedir_files()
    with tarfile.open(path, "w:gz") as tar:
        for name in ("headpose/__init__.py", "headpose/training/__init__.py", "headpose/training/cluster.py"):
            tar.add(files[name], arcname=name)
        info = tarfile.TarInfo("train.py")
        info.size = len(CLUSTER_PROBE.encode())
        tar.addfile(info, io.BytesIO(CLUSTER_PROBE.encode()))
    return path


def test_the_toolkit_hands_the_multi_worker_flag_on_as_the_tensorflow_image_reads_it(tmp_path):
    """What the request's flag becomes: the toolkit's own ``Environment`` is what SageMaker's
    TensorFlow image (sagemaker_tensorflow_container.training, which cannot be installed beside
    this toolkit version) reads; it writes ``TF_CONFIG`` from ``distribution_hosts`` with every
    worker at port 8890 when the flag is true and the host's group is a distribution group."""
    request = tiny_request(instance_count=2, synthetic_train_per_pose=20, images_per_shard=100)
    assert request["HyperParameters"]["sagemaker_multi_worker_mirrored_strategy_enabled"] == "true"
    dirs, env = two_host_job(tmp_path, request, cluster_probe_sourcedir(tmp_path / "probe.tar.gz"), "algo-2")
    process = subprocess.run(toolkit_command(), cwd=dirs["code"], env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    seen = json.loads((dirs["model"] / "seen.json").read_text())
    assert seen["framework_params"] == {"sagemaker_multi_worker_mirrored_strategy_enabled": True}
    assert seen["distributed"] is True and seen["distribution_hosts"] == ["algo-1", "algo-2"]
    # Where no image wrote TF_CONFIG, the entry point builds the one the image writes.
    assert seen["tf_config"] == {"cluster": {"worker": ["algo-1:8890", "algo-2:8890"]},
                                 "environment": "cloud", "task": {"type": "worker", "index": 1}}
    assert seen["chief"] is False


def test_a_cluster_the_request_did_not_enable_is_refused_with_a_failure_file(tmp_path):
    # Two hosts, no flag and no TF_CONFIG: each would train alone. The entry point refuses
    # before TensorFlow is imported, and its reason reaches FailureReason.
    request = tiny_request()
    assert "sagemaker_multi_worker_mirrored_strategy_enabled" not in request["HyperParameters"]
    sourcedir, _ = build_sourcedir(tmp_path / "sourcedir.tar.gz")
    dirs, env = two_host_job(tmp_path, request, sourcedir, "algo-2")
    process = subprocess.run(toolkit_command(), cwd=dirs["code"], env=env, capture_output=True, text=True,
                             timeout=900)
    assert process.returncode == 1
    failure = (dirs["output"] / "failure").read_text()
    assert "2 hosts ['algo-1', 'algo-2']" in failure
    assert "does not enable sagemaker_multi_worker_mirrored_strategy_enabled" in failure


@pytest.mark.slow
def test_a_spot_job_killed_mid_training_resumes_from_its_checkpoint(tmp_path):
    request = tiny_request(use_spot_instances=True, max_run_seconds=3600, max_wait_seconds=3600,
                           training_steps=100, mixed_precision="off", xla="off")
    assert json.loads(request["HyperParameters"]["checkpoint_dir"]) == "/opt/ml/checkpoints"
    # SageMaker restores /opt/ml/checkpoints from S3 before a restarted spot job; here the
    # folder simply survives. It stands in for /opt/ml/checkpoints, as the root does for /opt/ml.
    root, checkpoints = tmp_path / "opt-ml", tmp_path / "opt-ml" / "checkpoints"
    request["HyperParameters"].update(checkpoint_dir=json.dumps(str(checkpoints)), checkpoint_every="10")
    sourcedir, _ = build_sourcedir(tmp_path / "sourcedir.tar.gz")
    dirs = lay_out_job(root, request, sourcedir, shards_for(tmp_path))
    env = toolkit_env(root, request)

    first = subprocess.Popen(toolkit_command(), cwd=dirs["code"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (checkpoints / "checkpoint").exists() and first.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the spot interruption: the toolkit and the program, no clean-up
    first.wait()
    assert first.returncode == -signal.SIGKILL, "training ended before it could be interrupted"

    second = subprocess.run(toolkit_command(), cwd=dirs["code"], env=env, capture_output=True, text=True,
                            timeout=900)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", output)[1])
    assert 10 <= resumed < 100 and resumed % 10 == 0
    assert "progress: step=100/100" in output and "checkpoint saved at step 100" in output
    assert json.loads((dirs["model"] / "metrics.json").read_text())["training_steps"] == 100

    # Interrupted after training, before the model was uploaded: nothing is trained again.
    third = subprocess.run(toolkit_command(), cwd=dirs["code"], env=env, capture_output=True, text=True,
                           timeout=900)
    output = third.stdout + third.stderr
    assert third.returncode == 0, output[-4000:]
    assert "nothing left to train: the checkpoint is at step 100 of 100" in output
    assert "progress:" not in output
