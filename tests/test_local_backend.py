"""The local training backend, for real: moto's S3 over HTTP, the SageMaker training toolkit, real files."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from headpose.artifacts.archive import safe_extract
from headpose.backends.local import LocalTrainingError, run_local_training_job
from headpose.backends.process import stop_process
from headpose.backends.sourcedir import SourcedirMismatch, build_sourcedir
from headpose.planning.layout import RunLayout, split_s3_uri
from headpose.planning.rules import validate_run_params
from headpose.planning.request import training_job_request

ROOT = Path(__file__).resolve().parents[1]

JOB = "deeplens-TF-headpose-2024-05-06-07-08-09-010"
BUCKET = "headpose-test"

# A stand-in for train.py that records what it was started with and produces what the
# real one does: a model folder with export/Servo/<ts>/saved_model.pb and metric lines.
# It knows none of the project's code: what it sees is what the SageMaker training
# toolkit made of the request.
DUMMY_PROGRAM = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path

    from helper import MESSAGE  # the code folder is first on the path the toolkit sets
    Path(os.environ["SM_MODEL_DIR"]).parent.joinpath("program.pid").write_text(str(os.getpid()))
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
    if mode == "crash":  # dies without a word, as an out-of-memory kill would leave it
        os._exit(5)
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
        "env": {k: v for k, v in os.environ.items()
                if k.startswith("SM_") or k in ("PYTHONPATH", "TRAINING_JOB_NAME")},
        "airflow_vars": sorted(k for k in os.environ if k.startswith("AIRFLOW")),
        "channel_files": sorted(os.listdir(os.environ["SM_CHANNEL_TRAINING"])),
        "config": {name: json.loads(Path(os.environ["SM_INPUT_CONFIG_DIR"], name).read_text())
                   for name in ("hyperparameters.json", "inputdataconfig.json", "resourceconfig.json")},
    }
    (model_dir / "seen.json").write_text(json.dumps(seen))
    Path(os.environ["SM_OUTPUT_DATA_DIR"], "extra.txt").write_text("output data")
''')
# Where the toolkit would go if it reached for S3 itself: nothing listens there.
NO_S3 = {"S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}


def _sourcedir_bytes(program: str = DUMMY_PROGRAM) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in (("train.py", program), ("helper.py", "MESSAGE = 'helper imported'\n")):
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
    code = _sourcedir_bytes()
    s3_client.put_object(Bucket=BUCKET, Key=code_key, Body=code)
    request = training_job_request(layout, params, "image-uri", region="us-east-1", run_id="r1")
    return {"request": request, "layout": layout, "root": tmp_path / "opt-ml", "code_key": code_key,
            "sha256": hashlib.sha256(code).hexdigest()}


def _run(job, s3_client, mode="ok", on_start=None, **overrides):
    lines: list[str] = []
    handshake = job["root"] / "handshake"

    def log(line: str) -> None:
        lines.append(line)
        if line == "helper imported":
            handshake.touch()

    environ = {**os.environ, **NO_S3, "DUMMY_MODE": mode, "AIRFLOW_CONN_SECRET": "x",
               "PYTHONPATH": "/nowhere", "SAGEMAKER_PROGRAM": "elsewhere.py"}
    request = {**job["request"], **overrides}
    result = run_local_training_job(request, s3_client, job["root"], log, environ=environ,
                                    sourcedir_sha256=job["sha256"], on_start=on_start)
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
    # The toolkit's arguments: the hyperparameters other than sagemaker_*, JSON-decoded.
    argv = dict(zip(seen["argv"][0::2], seen["argv"][1::2]))
    assert len(argv) * 2 == len(seen["argv"])
    assert argv.items() >= {
        "--training_steps": "2", "--batch_size": "4", "--batch_norm_momentum": "0.99",
        "--decay_epochs": "100,150,200", "--dtype_policy": "float32", "--jit_compile": "0",
        "--channel_order": "bgr",
    }.items()
    assert "--model_dir" not in argv
    assert not [name for name in argv if name.startswith("--sagemaker_")]
    assert Path(seen["cwd"]) == root / "code"
    env = seen["env"]
    assert env["SM_MODEL_DIR"] == str(root / "model")
    assert env["SM_CHANNEL_TRAINING"] == str(root / "input/data/training")
    assert json.loads(env["SM_CHANNELS"]) == ["training"]
    assert env["SM_OUTPUT_DATA_DIR"] == str(root / "output/data")
    assert json.loads(env["SM_HOSTS"]) == ["algo-1"] and env["SM_CURRENT_HOST"] == "algo-1"
    assert env["SM_HP_BATCH_SIZE"] == "4"
    # The program the request names, not the SAGEMAKER_PROGRAM left in the worker's environment.
    assert env["SM_USER_ENTRY_POINT"] == "train.py"
    assert env["TRAINING_JOB_NAME"] == JOB
    # The code the toolkit extracted is the verified local copy, not the S3 object.
    assert env["SM_MODULE_DIR"] == str(root / "sourcedir.tar.gz")
    path = env["PYTHONPATH"].split(os.pathsep)
    assert Path(path[0]) == root / "code" and "/nowhere" not in path
    assert str(ROOT / "include") not in path and seen["airflow_vars"] == []
    assert seen["channel_files"] == ["eval-00000.tfrecord", "manifest.json", "nested", "train-00000.tfrecord"]
    assert (root / "input/data/training/nested/deeper.txt").read_bytes() == b"x"
    config = seen["config"]
    assert config["hyperparameters.json"] == {
        **job["request"]["HyperParameters"], "sagemaker_submit_directory": json.dumps(str(root / "sourcedir.tar.gz")),
    }
    assert config["inputdataconfig.json"]["training"]["TrainingInputMode"] == "File"
    assert config["resourceconfig.json"]["current_host"] == "algo-1"
    assert (root / "output" / "success").is_file()  # the toolkit's own report
    assert any("Invoking script with the following command" in line for line in lines)


def test_a_failing_program_raises_its_failure_text(job, s3_client):
    with pytest.raises(LocalTrainingError) as failed:
        _run(job, s3_client, mode="fail")
    message = str(failed.value)
    assert JOB in message and "exit code 1" in message
    assert "ValueError: no eval shards in the channel" in message
    bucket, key = split_s3_uri(job["layout"].model_artifact_uri)
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket, Prefix=key.rsplit("/", 1)[0])


def test_a_program_that_dies_silently_fails_with_the_toolkits_report(job, s3_client):
    with pytest.raises(LocalTrainingError) as failed:
        _run(job, s3_client, mode="crash")
    message = str(failed.value)
    # The toolkit, not the backend, wrote output/failure for a program that wrote none.
    assert "ExecuteUserScriptError" in message and "ExitCode 5" in message


def test_stopping_the_toolkit_stops_the_program_too(job, s3_client):
    """What on_kill does: SIGTERM to the toolkit's process group, the program included."""
    started: list[subprocess.Popen] = []
    outcome: dict = {}

    def run() -> None:
        try:
            _run(job, s3_client, mode="hang", on_start=started.append)
        except LocalTrainingError as error:
            outcome["error"] = str(error)

    thread = threading.Thread(target=run)
    thread.start()
    pid_file = job["root"] / "program.pid"
    deadline = time.monotonic() + 120
    while not (pid_file.is_file() and (job["root"] / "handshake").exists()):
        assert time.monotonic() < deadline and thread.is_alive(), "the program never started"
        time.sleep(0.1)
    program = int(pid_file.read_text())
    stop_process(started[0])
    thread.join(timeout=60)
    assert not thread.is_alive() and "failed (exit code" in outcome["error"]
    assert not _alive(program)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_code_replaced_after_packaging_is_not_run(job, s3_client):
    # Someone with write access under the bucket's folder swaps the code before train.
    s3_client.put_object(Bucket=BUCKET, Key=job["code_key"],
                         Body=_sourcedir_bytes("import os; os.system('echo owned')\n"))
    actual = hashlib.sha256(s3_client.get_object(Bucket=BUCKET, Key=job["code_key"])["Body"].read()).hexdigest()
    with pytest.raises(SourcedirMismatch) as refused:
        _run(job, s3_client)
    message = str(refused.value)
    assert job["sha256"] in message and actual in message and job["layout"].sourcedir_uri in message
    assert not any((job["root"] / "code").iterdir())  # nothing was extracted, let alone run
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


def test_more_hosts_than_the_local_backend_runs_are_refused(job, s3_client):
    resources = {**job["request"]["ResourceConfig"], "InstanceCount": 3}
    with pytest.raises(LocalTrainingError, match="runs 1 to 2 hosts on this machine: InstanceCount=3"):
        _run(job, s3_client, ResourceConfig=resources)


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


def test_the_train_task_fails_without_retry_when_the_code_was_replaced(job, s3_client, s3_endpoint, monkeypatch):
    import airflow_support  # noqa: F401  (a throw-away AIRFLOW_HOME before airflow is imported)
    from airflow.sdk.exceptions import AirflowFailException
    from headpose_operators import HeadposeTrainingOperator
    from support import aws_env

    for name, value in aws_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    s3_client.put_object(Bucket=BUCKET, Key=job["code_key"], Body=_sourcedir_bytes("print('not ours')\n"))
    operator = HeadposeTrainingOperator(
        task_id="train", config=job["request"], backend="local", aws_conn_id="aws_default",
        sourcedir_sha256=job["sha256"], local_work_dir=str(job["root"]),
    )

    class TaskInstance:
        def xcom_push(self, key, value):
            pass

    with pytest.raises(AirflowFailException, match=f"refusing to train with {job['layout'].sourcedir_uri}"):
        operator.execute({"ti": TaskInstance()})
