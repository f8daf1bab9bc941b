"""The local training backend, for real: moto's S3 over HTTP, a real subprocess, real files."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from headpose.artifacts.archive import safe_extract
from headpose.planning.layout import RunLayout, split_s3_uri
from headpose.backends.container import to_cmd_args
from headpose.backends.local import LocalTrainingError, run_local_training_job
from headpose.planning.rules import validate_run_params
from headpose.planning.request import training_job_request
from headpose.backends.sourcedir import build_sourcedir

JOB = "deeplens-TF-headpose-2024-05-06-07-08-09-010"
BUCKET = "headpose-test"

# A stand-in for train.py that checks the contract it is started under and produces what
# the real one does: a model folder with export/Servo/<ts>/saved_model.pb and metric lines.
DUMMY_PROGRAM = textwrap.dedent('''
    import argparse, json, os, sys, time
    from pathlib import Path

    parser = argparse.ArgumentParser()
    for name in ("training_steps", "evaluation_steps", "batch_size", "resnet_size", "base_filters", "seed"):
        parser.add_argument("--" + name, type=int, required=True)
    parser.add_argument("--batch_norm_momentum", type=float, required=True)
    parser.add_argument("--decay_epochs", type=str, required=True)
    parser.add_argument("--model_dir", required=True)
    args = parser.parse_args()

    from helper import MESSAGE  # the code folder is the working directory, first on sys.path
    print(MESSAGE, flush=True)
    # Wait until the backend has passed the line above on: proves output is streamed live.
    handshake = Path(os.environ["SM_MODEL_DIR"]).parent / "handshake"
    for _ in range(600):
        if handshake.exists():
            break
        time.sleep(0.1)
    else:
        sys.exit(3)

    mode = os.environ.get("DUMMY_MODE", "ok")
    if mode == "fail":
        Path(os.environ["SM_OUTPUT_DIR"], "failure").write_text("ValueError: no eval shards in the channel")
        print("traceback would be here", flush=True)
        sys.exit(1)
    if mode == "hang":
        time.sleep(600)

    for step in (1, 2):
        print(f"metric: step={step} train_loss={2.0 / step:.4f} train_accuracy={0.25 * step:.4f}", flush=True)
    print("metric: eval_loss=0.5000 eval_accuracy=0.7500", flush=True)
    model_dir = Path(os.environ["SM_MODEL_DIR"])
    export = model_dir / "export" / "Servo" / "1700000000"
    export.mkdir(parents=True)
    (export / "saved_model.pb").write_bytes(b"not really a graph")
    seen = {
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("SM_") or k in ("PYTHONPATH", "TRAINING_JOB_NAME")},
        "airflow_vars": sorted(k for k in os.environ if k.startswith("AIRFLOW")),
        "channel_files": sorted(os.listdir(os.environ["SM_CHANNEL_TRAINING"])),
        "config": {name: json.loads(Path(os.environ["SM_INPUT_CONFIG_DIR"], name).read_text())
                   for name in ("hyperparameters.json", "inputdataconfig.json", "resourceconfig.json")},
    }
    (model_dir / "seen.json").write_text(json.dumps(seen))
    Path(os.environ["SM_OUTPUT_DATA_DIR"], "extra.txt").write_text("output data")
''')


def _sourcedir_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in (("train.py", DUMMY_PROGRAM), ("helper.py", "MESSAGE = 'helper imported'\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture()
def job(s3_client, tmp_path):
    """A request for the dummy program, with its dataset and code in moto's S3."""
    s3_client.create_bucket(Bucket=BUCKET)
    params = validate_run_params({
        "s3_bucket": BUCKET, "training_steps": 2, "evaluation_steps": 1, "batch_size": 4,
        "resnet_size": 10, "base_filters": 8, "batch_norm_momentum": 0.99, "learning_rate_decay_epochs": "100,150,200",
    })
    layout = RunLayout.for_run(BUCKET, "headpose", JOB, f"s3://{BUCKET}/headpose/datasets/tiny/")
    _, prefix = split_s3_uri(layout.dataset_prefix)
    for name in ("train-00000.tfrecord", "eval-00000.tfrecord", "manifest.json"):
        s3_client.put_object(Bucket=BUCKET, Key=prefix + name, Body=name.encode())
    s3_client.put_object(Bucket=BUCKET, Key=prefix + "nested/deeper.txt", Body=b"x")
    _, code_key = split_s3_uri(layout.sourcedir_uri)
    s3_client.put_object(Bucket=BUCKET, Key=code_key, Body=_sourcedir_bytes())
    request = training_job_request(layout, params, "image-uri", region="us-east-1", run_id="r1")
    return {"request": request, "layout": layout, "root": tmp_path / "opt-ml"}


def _run(job, s3_client, mode="ok", **overrides):
    lines: list[str] = []
    handshake = job["root"] / "handshake"

    def log(line: str) -> None:
        lines.append(line)
        if line == "helper imported":
            handshake.touch()

    environ = {**os.environ, "DUMMY_MODE": mode, "AIRFLOW_CONN_SECRET": "x", "PYTHONPATH": "/nowhere"}
    request = {**job["request"], **overrides}
    result = run_local_training_job(request, s3_client, job["root"], log, environ=environ)
    return result, lines


def test_a_run_honours_the_request_and_uploads_model_tar_gz(job, s3_client, tmp_path):
    result, lines = _run(job, s3_client)
    layout = job["layout"]

    assert result["TrainingJobName"] == JOB
    assert result["TrainingJobStatus"] == "Completed"
    assert result["TrainingJobArn"] == f"arn:aws:sagemaker:us-east-1:000000000000:training-job/{JOB.lower()}"
    assert result["ModelArtifacts"]["S3ModelArtifacts"] == layout.model_artifact_uri
    assert result["BillableTimeInSeconds"] == 0
    assert result["HyperParameters"] == job["request"]["HyperParameters"]
    metrics = {m["MetricName"]: m["Value"] for m in result["FinalMetricDataList"]}
    assert metrics == {"train:loss": 1.0, "train:accuracy": 0.5, "eval:loss": 0.5, "eval:accuracy": 0.75}
    assert result["TrainingEndTime"] >= result["TrainingStartTime"]
    assert "helper imported" in lines and "metric: eval_loss=0.5000 eval_accuracy=0.7500" in lines

    # model.tar.gz lands at <S3OutputPath>/<job>/output/ and holds the model folder.
    bucket, key = split_s3_uri(layout.model_artifact_uri)
    archive = tmp_path / "model.tar.gz"
    s3_client.download_file(bucket, key, str(archive))
    extracted = safe_extract(archive, tmp_path / "model")
    assert (extracted / "export/Servo/1700000000/saved_model.pb").read_bytes() == b"not really a graph"
    seen = json.loads((extracted / "seen.json").read_text())
    s3_client.head_object(Bucket=bucket, Key=key.replace("model.tar.gz", "output.tar.gz"))

    root = job["root"]
    # Hyperparameters other than sagemaker_* as sorted --key value, JSON-decoded.
    assert seen["argv"] == [
        "--base_filters", "8", "--batch_norm_momentum", "0.99", "--batch_size", "4",
        "--decay_epochs", "100,150,200", "--evaluation_steps", "1",
        "--model_dir", f"s3://{BUCKET}/headpose/TFartifacts/{JOB}/model",
        "--resnet_size", "10", "--seed", "0", "--training_steps", "2",
    ]
    assert Path(seen["cwd"]) == root / "code"
    env = seen["env"]
    assert env["SM_MODEL_DIR"] == str(root / "model")
    assert env["SM_CHANNEL_TRAINING"] == str(root / "input/data/training")
    assert json.loads(env["SM_CHANNELS"]) == ["training"]
    assert env["SM_OUTPUT_DIR"] == str(root / "output")
    assert env["SM_OUTPUT_DATA_DIR"] == str(root / "output/data")
    assert env["SM_INPUT_CONFIG_DIR"] == str(root / "input/config")
    assert json.loads(env["SM_HOSTS"]) == ["algo-1"] and env["SM_CURRENT_HOST"] == "algo-1"
    assert json.loads(env["SM_HPS"])["training_steps"] == 2
    assert env["SM_HP_BATCH_SIZE"] == "4"
    assert env["SM_USER_ENTRY_POINT"] == "train.py" and env["SM_MODULE_NAME"] == "train"
    assert int(env["SM_NUM_CPUS"]) >= 1 and int(env["SM_NUM_GPUS"]) >= 0
    assert env["TRAINING_JOB_NAME"] == JOB
    assert "PYTHONPATH" not in env and seen["airflow_vars"] == []
    assert seen["channel_files"] == ["eval-00000.tfrecord", "manifest.json", "nested", "train-00000.tfrecord"]
    assert (root / "input/data/training/nested/deeper.txt").read_bytes() == b"x"
    config = seen["config"]
    assert config["hyperparameters.json"] == job["request"]["HyperParameters"]
    assert config["inputdataconfig.json"]["training"]["TrainingInputMode"] == "File"
    assert config["resourceconfig.json"]["current_host"] == "algo-1"


def test_a_failing_program_raises_its_failure_text(job, s3_client):
    with pytest.raises(LocalTrainingError) as failed:
        _run(job, s3_client, mode="fail")
    message = str(failed.value)
    assert JOB in message and "exit code 1" in message
    assert "ValueError: no eval shards in the channel" in message
    bucket, key = split_s3_uri(job["layout"].model_artifact_uri)
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket, Prefix=key.rsplit("/", 1)[0])


def test_a_retry_returns_the_recorded_result_without_training_again(job, s3_client):
    first, _ = _run(job, s3_client)
    # Anything the retry ran would need this folder again; it must not recreate it.
    import shutil

    shutil.rmtree(job["root"])
    second, lines = _run(job, s3_client, mode="fail")  # would fail if it trained again
    assert not job["root"].exists()
    assert any("already completed" in line for line in lines)
    assert not any(line.startswith("metric:") for line in lines)
    for key in ("TrainingJobName", "TrainingJobArn", "ModelArtifacts", "FinalMetricDataList",
                "TrainingStartTime", "TrainingEndTime", "HyperParameters"):
        assert second[key] == first[key], key


def test_a_run_past_max_runtime_is_stopped(job, s3_client):
    with pytest.raises(LocalTrainingError, match="MaxRuntimeInSeconds=1"):
        _run(job, s3_client, mode="hang", StoppingCondition={"MaxRuntimeInSeconds": 1})


def test_an_empty_channel_is_refused(job, s3_client):
    channel = json.loads(json.dumps(job["request"]["InputDataConfig"][0]))
    channel["DataSource"]["S3DataSource"]["S3Uri"] = f"s3://{BUCKET}/headpose/datasets/missing/"
    with pytest.raises(LocalTrainingError, match="no objects under"):
        _run(job, s3_client, InputDataConfig=[channel])


def test_more_than_one_instance_is_refused(job, s3_client):
    resources = {**job["request"]["ResourceConfig"], "InstanceCount": 2}
    with pytest.raises(LocalTrainingError, match="InstanceCount must be 1"):
        _run(job, s3_client, ResourceConfig=resources)


def test_cmd_args_match_the_training_toolkit():
    assert to_cmd_args({"b": 1, "alpha": "x", "m": {"k": 1, "a": 2}, "n": None, "flag": True}) == [
        "--alpha", "x", "-b", "1", "--flag", "True", "-m", "a=2,k=1", "-n", "",
    ]


def test_sourcedir_is_deterministic_and_self_contained(tmp_path):
    first, first_sha = build_sourcedir(tmp_path / "a" / "sourcedir.tar.gz")
    second, second_sha = build_sourcedir(tmp_path / "b" / "sourcedir.tar.gz")
    assert first.read_bytes() == second.read_bytes() and first_sha == second_sha
    with tarfile.open(first) as tar:
        names = tar.getnames()
    assert "train.py" in names and "headpose/__init__.py" in names
    assert "headpose/training/entry.py" in names and "headpose/training/model.py" in names
    assert not any("__pycache__" in n or n.startswith("headpose/training/../") for n in names)
    code = safe_extract(first, tmp_path / "code")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The container runs `python train.py` in the code folder, with nothing else on the path.
    help_text = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=code, env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert "--training_steps" in help_text


def test_a_training_program_left_by_a_killed_task_is_stopped_before_the_retry(tmp_path):
    """A task process killed with SIGKILL (OOM killer, lost container) cannot stop its
    training program, which leads its own process group; the retry must."""
    from headpose.backends.process import PID_FILE, stop_previous_program

    root = tmp_path / "local-training"
    (root / "code").mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    orphan = subprocess.Popen(sleeper, cwd=root / "code", start_new_session=True)
    stranger = subprocess.Popen(sleeper, cwd=tmp_path, start_new_session=True)
    try:
        (root / PID_FILE).write_text(str(orphan.pid))
        assert stop_previous_program(root, lambda line: None)
        assert orphan.wait(timeout=30) == -signal.SIGKILL
        (root / PID_FILE).write_text(str(stranger.pid))  # a recycled pid, working elsewhere
        assert not stop_previous_program(root, lambda line: None)
        assert stranger.poll() is None
    finally:
        for process in (orphan, stranger):
            process.kill()
            process.wait()
