"""The entry point started exactly as the SageMaker TensorFlow toolkit starts it.

What the toolkit does in the container, step by step (sagemaker-training-toolkit,
``environment.read_hyperparameters`` and ``mapping.to_cmd_args``):

1. ``sourcedir.tar.gz`` (``sagemaker_submit_directory``) is extracted into ``/opt/ml/code``;
2. ``/opt/ml/input/config/hyperparameters.json`` holds the request's ``HyperParameters``,
   every value a string; each is ``json.loads``-ed where it parses;
3. ``sagemaker_*`` keys configure the toolkit; the others become ``--key value``
   arguments, sorted by key;
4. ``python <sagemaker_program> <args>`` runs with ``/opt/ml/code`` as working directory
   and the ``SM_*`` variables set.

The project's local backend implements steps 3-4 (``to_cmd_args``,
``training_environment``); here they are checked against the toolkit's documented
output and then used on the real code, with nothing from this checkout on the path.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from headpose.artifacts.archive import pack_model_dir, safe_extract
from headpose.backends.container import make_dirs, to_cmd_args, training_environment
from headpose.planning.plan import plan_run
from headpose.backends.sourcedir import build_sourcedir

ARN = "arn:aws:iam::123456789012:role/SageMakerRole"
LOGICAL = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
TINY = {"resnet_size": 10, "base_filters": 8, "training_steps": 2, "evaluation_steps": 1, "batch_size": 8}
ROOT = Path(__file__).resolve().parents[1]


def tiny_request(**params) -> dict:
    """The request the DAG builds for a sagemaker run with tiny model settings."""
    plan = plan_run(
        {"backend": "sagemaker", "role_arn": ARN, "s3_bucket": "bkt", **TINY, **params},
        LOGICAL, region="us-east-1", dag_id="headpose_retraining", run_id="manual__test",
    )
    return plan["training_request"]


def toolkit_arguments(hyperparameters_json: Path) -> tuple[dict, dict, list[str]]:
    """Steps 2-3: ``(sagemaker_* settings, user hyperparameters, argv)`` from the file."""
    stored = json.loads(hyperparameters_json.read_text())
    decoded = {}
    for key, value in stored.items():
        try:
            decoded[key] = json.loads(value)
        except (TypeError, ValueError):
            decoded[key] = value
    framework = {k: v for k, v in decoded.items() if k.startswith("sagemaker_")}
    user = {k: v for k, v in decoded.items() if not k.startswith("sagemaker_")}
    return framework, user, to_cmd_args(user)


def start_like_the_toolkit(request: dict, root: Path, channel_dir: Path, extra_env: dict | None = None):
    """Lay out ``root`` as ``/opt/ml`` for ``request`` and run its program; return the process."""
    command, dirs, args, env = toolkit_command(request, root, channel_dir, extra_env)
    process = subprocess.run(command, cwd=dirs["code"], env=env, capture_output=True, text=True,
                             timeout=900)
    return process, dirs, args, env


def toolkit_command(request: dict, root: Path, channel_dir: Path, extra_env: dict | None = None):
    """Lay out ``root`` as ``/opt/ml`` for ``request``; ``(command, dirs, args, env)`` to run."""
    dirs = make_dirs(root, request)
    sourcedir, _ = build_sourcedir(root / "sourcedir.tar.gz")
    safe_extract(sourcedir, dirs["code"])
    training = dirs["data"] / "training"
    training.symlink_to(channel_dir, target_is_directory=True)
    hyperparameters_json = dirs["config"] / "hyperparameters.json"
    hyperparameters_json.write_text(json.dumps(request["HyperParameters"]))
    framework, user, args = toolkit_arguments(hyperparameters_json)
    # The container's environment has nothing of this checkout: no PYTHONPATH at all.
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env = training_environment(request, dirs, user, framework, args, environ=base)
    env.update(extra_env or {})
    return [sys.executable, framework["sagemaker_program"], *args], dirs, args, env


def tiny_model_archive(work: Path) -> Path:
    """A real ``model.tar.gz`` as SageMaker would upload it, from a tiny toolkit-style run."""
    from headpose.datasets.synthetic import write_synthetic_dataset

    shards = work / "shards"
    write_synthetic_dataset(shards, train_per_pose=1, eval_per_pose=1, images_per_shard=200)
    process, dirs, _, _ = start_like_the_toolkit(tiny_request(), work / "opt-ml", shards)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return pack_model_dir(dirs["model"], work / "model.tar.gz")


@pytest.fixture(scope="module")
def toolkit_run(tmp_path_factory):
    from headpose.datasets.synthetic import write_synthetic_dataset

    work = tmp_path_factory.mktemp("toolkit")
    shards = work / "shards"
    write_synthetic_dataset(shards, train_per_pose=1, eval_per_pose=1, images_per_shard=200)
    request = tiny_request()
    process, dirs, args, env = start_like_the_toolkit(request, work / "opt-ml", shards)
    return {"process": process, "dirs": dirs, "args": args, "env": env, "request": request}


def test_hyperparameters_become_the_toolkits_arguments(tmp_path):
    request = tiny_request()
    stored = tmp_path / "hyperparameters.json"
    stored.write_text(json.dumps(request["HyperParameters"]))
    assert all(isinstance(v, str) for v in json.loads(stored.read_text()).values())
    framework, user, args = toolkit_arguments(stored)
    assert framework["sagemaker_program"] == "train.py"
    assert framework["sagemaker_submit_directory"].endswith("/source/sourcedir.tar.gz")
    # The toolkit's to_cmd_args: "--key value" pairs, keys sorted, values as str() of the
    # decoded JSON (so 8, not "8" with quotes; a string without its JSON quotes).
    names, values = args[0::2], args[1::2]
    assert names == sorted(names) == [f"--{k}" for k in sorted(user)]
    assert dict(zip(names, values)).items() >= {
        "--base_filters": "8", "--batch_size": "8", "--evaluation_steps": "1", "--resnet_size": "10",
        "--seed": "0", "--training_steps": "2",
        "--model_dir": "s3://bkt/headpose/TFartifacts/deeplens-TF-headpose-2024-05-06-07-08-09-000/model",
    }.items()
    assert not any(name.startswith("--sagemaker_") for name in names)
    # ... and the entry point's parser takes every one of them.
    from headpose.training.entry import argument_parser

    parsed = argument_parser().parse_args(args)
    assert (parsed.resnet_size, parsed.base_filters, parsed.training_steps) == (10, 8, 2)


@pytest.mark.slow
def test_the_entry_point_trains_and_exports_from_the_extracted_sourcedir(toolkit_run):
    process, dirs, env = toolkit_run["process"], toolkit_run["dirs"], toolkit_run["env"]
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-4000:]
    assert "PYTHONPATH" not in env
    assert env["SM_CHANNEL_TRAINING"] == str(dirs["data"] / "training")
    assert env["SM_MODEL_DIR"] == str(dirs["model"])
    assert json.loads(env["SM_HOSTS"]) == ["algo-1"]

    exports = list((dirs["model"] / "export" / "Servo").iterdir())
    assert len(exports) == 1 and exports[0].name.isdigit()
    assert (exports[0] / "saved_model.pb").is_file()
    metrics = json.loads((dirs["model"] / "metrics.json").read_text())
    assert metrics["training_steps"] == 2 and metrics["resnet_size"] == 10
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert json.loads((dirs["output_data"] / "metrics.json").read_text()) == metrics
    assert not (dirs["output"] / "failure").exists()

    # SageMaker reads metrics from these lines with the request's MetricDefinitions.
    import re

    found = {d["Name"] for d in toolkit_run["request"]["AlgorithmSpecification"]["MetricDefinitions"]
             if re.search(d["Regex"], output)}
    assert found == {"train:loss", "train:accuracy", "eval:loss", "eval:accuracy"}


@pytest.mark.slow
def test_the_code_folder_alone_provides_the_package(toolkit_run):
    # Same interpreter, folder and environment as the training run: `headpose` resolves to
    # the extracted copy, so nothing of this checkout was needed.
    code = toolkit_run["dirs"]["code"]
    found = subprocess.run(
        [sys.executable, "-c", "import headpose.training.entry as e; print(e.__file__)"],
        cwd=code, env=toolkit_run["env"], capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert Path(found).resolve().is_relative_to(code.resolve())
    assert not Path(found).resolve().is_relative_to((ROOT / "include").resolve())


def test_a_cluster_is_refused_with_a_failure_file(tmp_path):
    # Stops before TensorFlow is imported: cheap, and the reason reaches FailureReason.
    channel = tmp_path / "empty-channel"
    channel.mkdir()
    hosts = {"SM_HOSTS": json.dumps(["algo-1", "algo-2"]), "SM_CURRENT_HOST": "algo-1"}
    process, dirs, _, _ = start_like_the_toolkit(tiny_request(), tmp_path / "opt-ml", channel, hosts)
    assert process.returncode == 1
    failure = (dirs["output"] / "failure").read_text()
    assert "instance_count must be 1" in failure and "algo-2" in failure


@pytest.mark.slow
def test_a_spot_job_killed_mid_training_resumes_from_its_checkpoint(tmp_path):
    from headpose.datasets.synthetic import write_synthetic_dataset

    shards = tmp_path / "shards"
    write_synthetic_dataset(shards, train_per_pose=1, eval_per_pose=1, images_per_shard=200)
    request = tiny_request(use_spot_instances=True, max_run_seconds=3600, max_wait_seconds=3600,
                           training_steps=400)
    command, dirs, args, env = toolkit_command(request, tmp_path / "opt-ml", shards)
    # SageMaker restores /opt/ml/checkpoints from S3 before a restarted spot job; here the
    # folder simply survives. It stands in for /opt/ml/checkpoints, as dirs do for /opt/ml.
    checkpoints = tmp_path / "opt-ml" / "checkpoints"
    assert command[command.index("--checkpoint_dir") + 1] == "/opt/ml/checkpoints"
    command[command.index("--checkpoint_dir") + 1] = str(checkpoints)
    command += ["--checkpoint_every", "10"]

    first = subprocess.Popen(command, cwd=dirs["code"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (checkpoints / "checkpoint").exists() and first.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # the spot interruption: no clean-up of any kind
    first.wait()
    assert first.returncode == -signal.SIGKILL, "training ended before it could be interrupted"

    second = subprocess.run(command, cwd=dirs["code"], env=env, capture_output=True, text=True,
                            timeout=900)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", output)[1])
    assert 10 <= resumed < 400 and resumed % 10 == 0
    assert "progress: step=400/400" in output and "checkpoint saved at step 400" in output
    assert json.loads((dirs["model"] / "metrics.json").read_text())["training_steps"] == 400

    # Interrupted after training, before the model was uploaded: nothing is trained again.
    third = subprocess.run(command, cwd=dirs["code"], env=env, capture_output=True, text=True,
                           timeout=900)
    output = third.stdout + third.stderr
    assert third.returncode == 0, output[-4000:]
    assert "nothing left to train: the checkpoint is at step 400 of 400" in output
    assert "progress:" not in output
