"""Faults and hostile input, through real ``airflow dags test`` runs against moto's S3.

Every run starts from a bucket where a model is already published (the champion) and
the test checks that nothing under ``published/`` changed - keys, ETags and bytes -
except where publishing is the point. Runs are kept cheap:

* one tiny synthetic dataset, staged once per module in its own bucket, named by the
  runs as an ``s3://`` dataset prefix;
* a migrated Airflow database copied per test (``conftest.airflow_db_template``);
* where training is not what is under test, the training job's output is placed in S3
  beforehand (``place_training_result``): ``train`` returns it as the local backend
  returns a job it already completed, and the run goes on from ``download_artifact``
  exactly as after real training;
* runs that need no interference while they run go through ``dags_test_batch.py``: the
  real ``airflow dags test`` command, several times in one interpreter.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import boto3
import pytest

from airflow_support import (
    DAG_ID,
    ROOT,
    TINY_TRAINING,
    cli_env,
    dags_test,
    dags_test_command,
    db,
    last_run,
    new_airflow_home,
    task_states,
    try_numbers,
    xcom,
)
from dags_test_batch import split_output
from fault_support import (
    CuttingProxy,
    StreamedRun,
    file_member,
    find_descendant,
    huge_member_tar_gz,
    keys,
    link_member,
    place_training_result,
    published_state,
    tar_gz,
)
from headpose.planning.layout import training_job_name

pytestmark = pytest.mark.e2e

DATA_BUCKET = "headpose-faults-data"
DATASET = f"s3://{DATA_BUCKET}/headpose/datasets/tiny/"
CORRUPT_DATASET = f"s3://{DATA_BUCKET}/headpose/datasets/corrupt/"
CHAMPION_JOB = "deeplens-TF-headpose-2024-06-03-03-00-00-000"
CONF = {"backend": "local", "dataset_source": DATASET, **TINY_TRAINING}
# Retries stay on, a second apart: `dags test` waits out retry delays for real.
FAST_RETRIES = {"HEADPOSE_RETRY_DELAY_SECONDS": "1", "HEADPOSE_AWS_RETRIES": "1"}
DOWNSTREAM_OF_FREEZE = ("export_edge_models", "validate_model", "upload_frozen_model", "publish")


def logical(day: int, hour: int = 3) -> datetime:
    return datetime(2025, 3, 1, hour, tzinfo=timezone.utc) + timedelta(days=day)


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(moto_server):
    return boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def dataset(s3, tmp_path_factory) -> dict:
    """The tiny synthetic dataset (93 training and 93 held-out images), staged once, and a
    copy whose training shard is corrupt (its manifest and eval split are fine)."""
    from headpose.datasets import settings as dataset_settings, staging, store
    from headpose.datasets.settings import GENERATOR_VERSION

    s3.create_bucket(Bucket=DATA_BUCKET)
    settings = dataset_settings.synthetic_settings(
        {"synthetic_train_per_pose": 1, "synthetic_eval_per_pose": 1, "seed": 0, "images_per_shard": 128},
        GENERATOR_VERSION,
    )
    staging.stage_synthetic_dataset(s3, DATASET, settings, print, scratch_root=tmp_path_factory.mktemp("stage"))
    shards = store.download_split(s3, DATASET, "eval", tmp_path_factory.mktemp("eval"))
    manifest = s3.get_object(Bucket=DATA_BUCKET, Key="headpose/datasets/tiny/manifest.json")["Body"].read()
    corrupt = "headpose/datasets/corrupt/"
    s3.put_object(Bucket=DATA_BUCKET, Key=corrupt + "train-00000.tfrecord", Body=b"\x00garbage, not TFRecord" * 64)
    s3.put_object(Bucket=DATA_BUCKET, Key=corrupt + shards[0].name, Body=shards[0].read_bytes())
    s3.put_object(Bucket=DATA_BUCKET, Key=corrupt + "manifest.json", Body=manifest)
    return {"eval_shards": shards, "per_class": json.loads(manifest)["splits"]["eval"]["per_class"]}


def _biased_model(favourite: int, classes: int = 9, **build):
    """ResNet-10 whose logits are dominated by a bias towards class ``favourite``: its
    held-out accuracy is known in advance (that class's share of the held-out split)."""
    import numpy as np
    import tensorflow as tf

    from headpose.training.model import build_resnet

    tf.keras.utils.set_random_seed(favourite)
    model = build_resnet(10, base_filters=4, **build)
    logits = [layer for layer in model.layers if getattr(layer, "bias", None) is not None][-1]
    kernel, bias = logits.get_weights()
    bias = np.zeros_like(bias)
    bias[favourite] = 30.0
    logits.set_weights([kernel * 1e-3, bias])
    return model


def _export_with_input_name(model, model_dir: Path, input_name: str) -> None:
    """A SavedModel like export_saved_model's, but whose input is called ``input_name``."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, 84, 84, 3], tf.float32, name=input_name)

    @tf.function(input_signature=[spec])
    def serve(images):
        return {"softmax_tensor": tf.identity(model(images, training=False), name="softmax_tensor")}

    module = tf.Module()
    module.model, module.serve = model, serve
    tf.saved_model.save(module, str(model_dir / "export" / "Servo" / "1700000000"),
                        signatures={"serving_default": serve})


def _five_class_model():
    import tensorflow as tf

    inputs = tf.keras.Input((84, 84, 3), name="inputs")
    pooled = tf.keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = tf.keras.layers.Dense(5, activation="softmax", name="softmax_tensor")(pooled)
    return tf.keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def models(dataset, tmp_path_factory) -> dict:
    """model.tar.gz files: ``good`` and ``poor`` (known accuracies), ``wrong_input`` and
    ``five_classes`` (contract breakers); and the good model's frozen graph."""
    from headpose.artifacts.archive import pack_model_dir
    from headpose.artifacts.freeze import freeze_model_archive
    from headpose.training.export import export_saved_model

    counts = dataset["per_class"]
    best = max(range(9), key=lambda c: counts[c])
    worst = min(range(9), key=lambda c: counts[c])
    assert counts[best] > counts[worst]
    base = tmp_path_factory.mktemp("models")
    exports: dict[str, Callable[[Path], object]] = {
        "good": lambda d: export_saved_model(_biased_model(best), d),
        "poor": lambda d: export_saved_model(_biased_model(worst), d),
        "wrong_input": lambda d: _export_with_input_name(_biased_model(best), d, "images"),
        "five_classes": lambda d: export_saved_model(_five_class_model(), d),
    }
    built: dict = {"good_accuracy": counts[best] / sum(counts), "poor_accuracy": counts[worst] / sum(counts)}
    for name, export in exports.items():
        export(base / name / "model")
        built[name] = pack_model_dir(base / name / "model", base / name / "model.tar.gz").read_bytes()
    frozen = freeze_model_archive(base / "good" / "model.tar.gz", base / "good" / "frozen", work_dir=base)
    built["good_frozen"] = frozen.pb_path.read_bytes()
    built["good_frozen_json"] = frozen.json_path.read_bytes()
    return built


def seed_champion(s3, bucket: str, models: dict) -> dict:
    """A bucket where the good model is published as an earlier run would have left it."""
    from headpose.datasets.store import read_manifest
    from headpose.planning.layout import RunLayout
    from headpose.registry import promotion

    s3.create_bucket(Bucket=bucket)
    layout = RunLayout.for_run(bucket, "headpose", CHAMPION_JOB, DATASET)
    files = {}
    for name, body in (("frozen_model.pb", models["good_frozen"]), ("frozen_model.json", models["good_frozen_json"]),
                       ("report.json", b"{}"), ("confusion_matrix.png", b"\x89PNG")):
        s3.put_object(Bucket=bucket, Key=(layout.version_prefix + name).split("/", 3)[3], Body=body)
        files[name] = {"uri": layout.version_prefix + name, "sha256": hashlib.sha256(body).hexdigest()}
    _, manifest_sha256 = read_manifest(s3, DATASET)
    record = promotion.publish_record(
        layout, {"files": files, "formats": {}, "channel_order": "bgr"},
        {"accuracy": models["good_accuracy"], "images": 93, "parity_max_abs_diff": 0.0},
        dataset={"dataset_prefix": DATASET, "dataset_id": "tiny", "manifest_uri": DATASET + "manifest.json",
                 "manifest_sha256": manifest_sha256, "channel_order": "bgr"},
    )
    promotion.publish_model(s3, layout, record)
    return published_state(s3, bucket)


def failure_lines(output: str, task_id: str) -> list[str]:
    """The failed task's own line (not the run's alert, which repeats it)."""
    return [line for line in output.splitlines()
            if "HEADPOSE FAILURE" in line and f"task={task_id} " in line and "HEADPOSE ALERT" not in line]


def alerts(output: str) -> list[str]:
    return [line for line in output.splitlines() if "HEADPOSE ALERT" in line]


def run_of(home: Path, when: datetime) -> tuple[str, str]:
    """``(run_id, state)`` of the run with logical date ``when``."""
    with db(home) as conn:
        for run_id, state, logical_date in conn.execute(
            "SELECT run_id, state, logical_date FROM dag_run WHERE dag_id = ?", (DAG_ID,)
        ):
            if logical_date and datetime.fromisoformat(str(logical_date)).replace(tzinfo=timezone.utc) == when:
                return run_id, state
    raise AssertionError(f"no run at {when}")


# -- the batch of runs that need no interference ---------------------------------------

@dataclass
class Case:
    name: str
    when: datetime
    bucket: str
    prepare: Callable[[object, dict, "Case"], dict | None]  # returns the published state before
    conf: dict = field(default_factory=dict)

    @property
    def job(self) -> str:
        return training_job_name(self.when)


def with_artifact(artifact: Callable[[dict], bytes]) -> Callable:
    """Prepare a champion, and ``artifact`` as the output of the run's training job."""
    def prepare(s3, models, case):
        before = seed_champion(s3, case.bucket, models)
        place_training_result(s3, case.bucket, case.job, artifact(models))
        return before
    return prepare


SAVED_MODEL = "export/Servo/1700000000/saved_model.pb"
# name: (model.tar.gz, the task that must refuse it, words of the reason)
HOSTILE = {
    "parent traversal": (lambda m: tar_gz([file_member(SAVED_MODEL), file_member("../../escaped.txt", b"pwned")]),
                         "freeze_graph", "'../../escaped.txt'"),
    "absolute path": (lambda m: tar_gz([file_member(SAVED_MODEL), file_member("/tmp/headpose-absolute.txt", b"x")]),
                      "freeze_graph", "absolute path"),
    "symlink out": (lambda m: tar_gz([file_member(SAVED_MODEL),
                                      link_member("export/Servo/1700000000/variables", "../../../../../etc")]),
                    "freeze_graph", "'export/Servo/1700000000/variables'"),
    "hard link out": (lambda m: tar_gz([link_member(SAVED_MODEL, "/etc/passwd", tarfile.LNKTYPE)]),
                      "freeze_graph", "refusing archive member"),
    "huge member": (lambda m: huge_member_tar_gz(SAVED_MODEL, 5 * 1024**4), "freeze_graph", "over the"),
    "no export folder": (lambda m: tar_gz([file_member("model/saved_model.pb")]),
                         "freeze_graph", "no export/*/*/saved_model.pb"),
    "two exports": (lambda m: tar_gz([file_member(SAVED_MODEL), file_member("export/Servo/1700000001/saved_model.pb")]),
                    "freeze_graph", "expected one SavedModel"),
    "not a tarball": (lambda m: b"PK\x03\x04 a zip, not a gzip tar", "freeze_graph", "not a readable tar archive"),
    "corrupt saved_model.pb": (lambda m: tar_gz([file_member(SAVED_MODEL, b"\x08\x96\x01 not a protobuf")]),
                               "freeze_graph", "cannot load the SavedModel"),
    "input node missing": (lambda m: m["wrong_input"], "freeze_graph", "'inputs'"),
    "output of the wrong shape": (lambda m: m["five_classes"], "freeze_graph", "5 scores per image"),
}

CASES = [
    Case(name, logical(i), f"faults-hostile-{i}", with_artifact(artifact))
    for i, (name, (artifact, _, _)) in enumerate(HOSTILE.items())
] + [
    Case("challenger worse", logical(20), "faults-champion", with_artifact(lambda m: m["poor"])),
    Case("forced", logical(21), "faults-forced", with_artifact(lambda m: m["poor"]), {"force_publish": True}),
    Case("corrupt dataset", logical(22), "faults-crash", lambda s3, m, case: seed_champion(s3, case.bucket, m),
         {"dataset_source": CORRUPT_DATASET}),
    # Refused by plan_run: a SageMaker run with no role anywhere (the connection has none).
    Case("role-less sagemaker", logical(23), "faults-roleless", lambda s3, m, case: _empty_bucket(s3, case.bucket),
         {"backend": "sagemaker", "role_arn": None}),
]


def _empty_bucket(s3, bucket: str) -> dict:
    s3.create_bucket(Bucket=bucket)
    return {}
CASES_BY_NAME = {case.name: case for case in CASES}


@pytest.fixture(scope="module")
def batch(s3, models, airflow_db_template, tmp_path_factory) -> dict:
    """Runs every Case once, in one ``dags_test_batch.py`` process; what each left behind."""
    home = new_airflow_home(airflow_db_template, tmp_path_factory.mktemp("batch-airflow"))
    before = {case.name: case.prepare(s3, models, case) for case in CASES}
    spec = home / "runs.json"
    spec.write_text(json.dumps([
        {"name": c.name, "logical_date": c.when.isoformat(), "conf": {**CONF, "s3_bucket": c.bucket, **c.conf}}
        for c in CASES
    ]))
    env = cli_env(home, s3.meta.endpoint_url, FAST_RETRIES)
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "dags_test_batch.py"), str(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
    (home / "batch.log").write_text(result.stdout)
    outputs = split_output(result.stdout)
    assert set(outputs) == set(CASES_BY_NAME), f"runs missing; see {home / 'batch.log'}"
    return {"home": home, "outputs": outputs, "before": before}


@pytest.mark.parametrize("case_name", list(HOSTILE))
def test_a_hostile_artifact_is_refused_and_nothing_is_published(case_name, batch, s3):
    case = CASES_BY_NAME[case_name]
    _, task_id, reason = HOSTILE[case_name]
    output, exit_code = batch["outputs"][case_name]
    home = batch["home"]
    run_id, state = run_of(home, case.when)
    states = task_states(home, run_id)
    assert exit_code != 0 and state == "failed", (state, states)
    assert states[task_id] == "failed", states
    assert try_numbers(home, run_id)[task_id] == 1  # refused, not retried: it would be refused again
    after = DOWNSTREAM_OF_FREEZE[DOWNSTREAM_OF_FREEZE.index(task_id) + 1:] if task_id in DOWNSTREAM_OF_FREEZE \
        else DOWNSTREAM_OF_FREEZE
    assert all(states[t] == "upstream_failed" for t in after), states
    assert states["cleanup"] == "success"
    lines = failure_lines(output, task_id)
    assert len(lines) == 1 and f"training_job_name={case.job}" in lines[0] and reason in lines[0], lines
    # One alert for the failed run, naming the task that failed.
    assert len(alerts(output)) == 1 and f"task={task_id} " in alerts(output)[0], alerts(output)
    assert published_state(s3, case.bucket) == batch["before"][case_name]
    assert not [k for k in keys(s3, case.bucket, f"headpose/TFartifacts/{case.job}/output/") if "frozen_model" in k]
    # Nothing landed outside the run's workspace, and cleanup removed that.
    assert not list(home.rglob("escaped.txt")) and not Path("/tmp/headpose-absolute.txt").exists()
    assert not (home / "workspace" / case.job).exists()


def test_a_less_accurate_model_is_not_published_and_the_run_says_why(batch, s3, models):
    case = CASES_BY_NAME["challenger worse"]
    output, exit_code = batch["outputs"][case.name]
    run_id, state = run_of(batch["home"], case.when)
    states = task_states(batch["home"], run_id)
    assert exit_code == 0 and state == "success", (state, states)
    assert states["publish"] == "skipped" and states["upload_frozen_model"] == "success"
    summary = xcom(batch["home"], "publish", "summary", run_id=run_id)
    assert summary["promoted"] is False and "stays published" in summary["reason"]
    assert summary["accuracy_before"] == pytest.approx(models["good_accuracy"])
    assert summary["accuracy_after"] == pytest.approx(models["poor_accuracy"])
    assert summary["previous_training_job_name"] == CHAMPION_JOB
    assert "run summary: " + case.job in output and "kept the published model" in output
    assert "train execution_timeout: 5 days, 1:00:00" in output  # max_run_seconds + 1 h, set per run
    # The model, its metrics and confusion matrix stay beside the artifact, unpublished.
    report = json.loads(s3.get_object(
        Bucket=case.bucket, Key=f"headpose/TFartifacts/{case.job}/output/report.json")["Body"].read())
    assert report["champion"]["training_job_name"] == CHAMPION_JOB
    assert report["champion"]["accuracy"] == pytest.approx(models["good_accuracy"])
    assert f"headpose/TFartifacts/{case.job}/output/confusion_matrix.png" in keys(s3, case.bucket)
    assert published_state(s3, case.bucket) == batch["before"][case.name]


def test_force_publish_promotes_it_and_the_pointer_records_everything(batch, s3, models):
    case = CASES_BY_NAME["forced"]
    _, exit_code = batch["outputs"][case.name]
    run_id, state = run_of(batch["home"], case.when)
    assert exit_code == 0 and state == "success"
    assert task_states(batch["home"], run_id)["publish"] == "success"
    summary = xcom(batch["home"], "publish", run_id=run_id)
    assert summary["promoted"] is True and summary["reason"] == "force_publish is set"
    assert summary["billable_time_in_seconds"] == 0  # the local backend bills nothing

    pointer = json.loads(s3.get_object(Bucket=case.bucket, Key="headpose/published/latest.json")["Body"].read())
    assert pointer["training_job_name"] == case.job
    assert pointer["metrics"]["accuracy"] == pytest.approx(models["poor_accuracy"])
    assert pointer["previous"]["training_job_name"] == CHAMPION_JOB
    manifest = s3.get_object(Bucket=DATA_BUCKET, Key="headpose/datasets/tiny/manifest.json")["Body"].read()
    assert pointer["dataset"]["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    latest = s3.get_object(Bucket=case.bucket, Key="headpose/published/latest/frozen_model.pb")["Body"].read()
    assert hashlib.sha256(latest).hexdigest() == pointer["files"]["frozen_model.pb"]["sha256"]
    with db(batch["home"]) as conn:  # an asset event for the promoted model only
        events = conn.execute("SELECT extra FROM asset_event").fetchall()
    assert [json.loads(e[0])["training_job_name"] for e in events] == [case.job]


def test_rollback_puts_the_previous_model_back(batch, s3, models):
    assert json.loads(s3.get_object(Bucket="faults-forced", Key="headpose/published/latest.json")["Body"].read())[
        "training_job_name"] == CASES_BY_NAME["forced"].job
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    done = subprocess.run(
        [sys.executable, "-m", "headpose.registry", "--endpoint-url", s3.meta.endpoint_url,
         "--bucket", "faults-forced", "rollback"], env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    pointer = json.loads(s3.get_object(Bucket="faults-forced", Key="headpose/published/latest.json")["Body"].read())
    assert pointer["training_job_name"] == CHAMPION_JOB
    assert pointer["rolled_back"]["from"] == CASES_BY_NAME["forced"].job
    latest = s3.get_object(Bucket="faults-forced", Key="headpose/published/latest/frozen_model.pb")["Body"].read()
    assert latest == models["good_frozen"]


def test_a_corrupt_dataset_is_refused_before_training_and_nothing_trains(batch, s3):
    # Its training shard would crash the training program (DataLossError) after the job
    # started; stage_dataset checks it against the manifest first. (A crash inside the
    # program, and its reason as train's error, is test_local_backend's.)
    case = CASES_BY_NAME["corrupt dataset"]
    output, exit_code = batch["outputs"][case.name]
    run_id, state = run_of(batch["home"], case.when)
    states = task_states(batch["home"], run_id)
    assert exit_code != 0 and state == "failed"
    assert states["stage_dataset"] == "failed", states
    assert try_numbers(batch["home"], run_id)["stage_dataset"] == 1  # refused, not retried
    for task_id in ("train", "download_artifact", "freeze_graph", *DOWNSTREAM_OF_FREEZE):
        assert states[task_id] == "upstream_failed", states
    lines = failure_lines(output, "stage_dataset")
    assert len(lines) == 1 and f"training_job_name={case.job}" in lines[0]
    assert "training was not started" in lines[0] and "train shard train-00000.tfrecord has sha256" in lines[0]
    assert len(alerts(output)) == 1 and "task=stage_dataset " in alerts(output)[0]
    assert published_state(s3, case.bucket) == batch["before"][case.name]
    assert not keys(s3, case.bucket, f"headpose/TFartifacts/{case.job}/")


# -- faults while a run is running -------------------------------------------------------

@pytest.fixture()
def home(airflow_db_template, tmp_path) -> Path:
    return new_airflow_home(airflow_db_template, tmp_path / "airflow")


@pytest.mark.parametrize("task_id, request_line", [
    ("download_artifact", r"^GET /[^ ]*/output/model\.tar\.gz"),
    ("upload_frozen_model", r"^PUT /[^ ]*/output/frozen_model\.pb"),
])
def test_the_s3_endpoint_going_away_fails_the_task_after_its_retries(task_id, request_line, s3, models,
                                                                      moto_server, home):
    bucket = f"faults-outage-{task_id.replace('_', '-')}"
    when = logical(30)
    job = training_job_name(when)
    before = seed_champion(s3, bucket, models)
    place_training_result(s3, bucket, job, models["good"])
    proxy = CuttingProxy(moto_server.port, request_line)  # Airflow reaches S3 only through it

    result = dags_test(home, proxy.endpoint, {**CONF, "s3_bucket": bucket}, "run.log", logical_date=when,
                       extra_env={"HEADPOSE_RETRY_DELAY_SECONDS": "1", "HEADPOSE_AWS_RETRIES": "2"})

    output = result.stdout + result.stderr
    assert proxy.cut.is_set(), f"the endpoint never went away; requests: {proxy.relayed[-5:]}"
    run_id, state = run_of(home, when)
    states = task_states(home, run_id)
    assert result.returncode != 0 and state == "failed", states
    assert states[task_id] == "failed"
    assert try_numbers(home, run_id)[task_id] == 3  # the first try and both retries
    assert states["publish"] == "upstream_failed" and states["cleanup"] == "success"
    lines = failure_lines(output, task_id)
    assert len(lines) == 1 and f"training_job_name={job}" in lines[0]
    assert "Could not connect to the endpoint URL" in lines[0], lines[0]
    assert published_state(s3, bucket) == before


def test_a_worker_killed_during_train_and_then_during_freeze_graph_leaves_one_job(s3, models, home):
    """kill -9 of the whole worker (the `dags test` process and the training program under it),
    first while it trains, then while it freezes; each time the run is started again for the
    same logical date, as a retry would be, and it must finish with the same single job."""
    bucket = "faults-worker-killed"
    when = logical(40)
    job = training_job_name(when)
    before = seed_champion(s3, bucket, models)
    conf = {**CONF, "s3_bucket": bucket}
    env = cli_env(home, s3.meta.endpoint_url, FAST_RETRIES)
    artifact_key = f"headpose/TFartifacts/{job}/output/model.tar.gz"

    def job_keys() -> list[str]:
        return keys(s3, bucket, "headpose/TFartifacts/")

    first = StreamedRun(dags_test_command(conf, when), env, home / "killed-in-train.log")
    first.wait_for(r"running the SageMaker training toolkit")
    trainer = find_descendant(first.process.pid, "train.py")
    first.wait_for(r"data: \d+ training images")  # the training program is under way
    killed = first.kill_worker()
    assert trainer.pid in killed
    assert published_state(s3, bucket) == before
    assert not [k for k in job_keys() if k.endswith("model.tar.gz")]  # it died before any artifact

    second = StreamedRun(dags_test_command(conf, when), env, home / "killed-in-freeze.log")
    second.wait_for(r"\[DAG TEST\] starting task_id=freeze_graph")
    artifact = s3.head_object(Bucket=bucket, Key=artifact_key)
    second.wait_for(r"Freezing ")
    second.kill_worker()
    assert published_state(s3, bucket) == before
    assert f"training_job_name: {job}" in first.output and f"training_job_name: {job}" in second.output

    third = StreamedRun(dags_test_command(conf, when), env, home / "finished.log")
    assert third.wait() == 0, f"see {third.log_path}"
    run_id, state = run_of(home, when)
    assert state == "success"
    # The retried train found the job it had completed instead of training a second one.
    assert f"training job {job} already completed" in third.output
    assert "running the SageMaker training toolkit" not in third.output
    assert s3.head_object(Bucket=bucket, Key=artifact_key)["ETag"] == artifact["ETag"]
    assert [k for k in job_keys() if k.endswith("model.tar.gz")] == [artifact_key]
    assert {k.split("/")[2] for k in job_keys()} == {CHAMPION_JOB, job}
    summary = xcom(home, "publish", "summary", run_id=run_id)
    assert summary["training_job_name"] == job


def test_two_runs_at_once_keep_to_their_own_names_and_keys(s3, dataset, airflow_db_template, tmp_path):
    """Two runs of different logical dates, started together against the same bucket (from
    two Airflow homes: one home's max_active_runs=1 would queue the second)."""
    bucket = "faults-concurrent"
    s3.create_bucket(Bucket=bucket)
    whens = [logical(50), logical(50, hour=4)]
    jobs = [training_job_name(w) for w in whens]
    homes = [new_airflow_home(airflow_db_template, tmp_path / f"airflow-{i}") for i in range(2)]
    workspace = tmp_path / "shared-workspace"  # one workspace, as several workers share one
    runs = [
        StreamedRun(dags_test_command({**CONF, "s3_bucket": bucket}, when),
                    cli_env(home, s3.meta.endpoint_url, {**FAST_RETRIES, "HEADPOSE_WORKSPACE": str(workspace)}),
                    home / "run.log")
        for home, when in zip(homes, whens)
    ]
    assert [run.wait() for run in runs] == [0, 0], [str(run.log_path) for run in runs]

    assert len(set(jobs)) == 2
    for home, job, other in ((homes[0], jobs[0], jobs[1]), (homes[1], jobs[1], jobs[0])):
        run_id, state = last_run(home)
        assert state == "success"
        plan = xcom(home, "plan_run", run_id=run_id)
        assert plan["training_job_name"] == job
        uris = [v for k, v in plan.items() if k.endswith("_uri") and not k.startswith("published_")]
        assert all(job in uri and other not in uri for uri in uris), uris
        frozen = xcom(home, "freeze_graph", run_id=run_id)
        stored = s3.get_object(Bucket=bucket, Key=f"headpose/TFartifacts/{job}/output/frozen_model.pb")["Body"].read()
        assert hashlib.sha256(stored).hexdigest() == frozen["frozen_model_sha256"]
        assert xcom(home, "train", run_id=run_id)["Training"]["TrainingJobName"] == job
    run_keys = [k for k in keys(s3, bucket) if not k.startswith(("headpose/datasets/", "headpose/published/"))]
    assert all((jobs[0] in k) != (jobs[1] in k) for k in run_keys), run_keys
    # Whatever the interleaving, the pointer names one of them, and latest/ holds that one's files.
    pointer = json.loads(s3.get_object(Bucket=bucket, Key="headpose/published/latest.json")["Body"].read())
    assert pointer["training_job_name"] in jobs
    latest = s3.get_object(Bucket=bucket, Key="headpose/published/latest/frozen_model.pb")["Body"].read()
    assert hashlib.sha256(latest).hexdigest() == pointer["files"]["frozen_model.pb"]["sha256"]
    for job in jobs:
        history = keys(s3, bucket, f"headpose/published/history/{job}.json")
        if history:
            record = json.loads(s3.get_object(Bucket=bucket, Key=history[0])["Body"].read())
            assert record["training_job_name"] == job and job in record["files"]["frozen_model.pb"]["uri"]
    assert not workspace.exists() or not any(workspace.iterdir())  # each cleanup removed its own folder


# -- clearing: every task runs again alone, after the run failed and its teardown ran ---

CLEARED = ("download_artifact", "freeze_graph", "export_edge_models", "validate_model", "upload_frozen_model",
           "publish")


def test_after_a_failed_run_each_task_cleared_runs_again_alone_and_publishes_a_consistent_model(
        s3, models, moto_server, home):
    """The endpoint goes away at publish's first write, so the run fails and its teardown
    runs; then each task from download_artifact on is run again alone (``airflow tasks
    test`` of the run: a fresh process with the run's XComs and no scratch of the first
    try), in order, as a person clearing them one by one would have them run."""
    from headpose.registry import pointer as pointers

    bucket = "faults-cleared"
    when = logical(60)
    job = training_job_name(when)
    seed_champion(s3, bucket, models)
    place_training_result(s3, bucket, job, models["good"])
    proxy = CuttingProxy(moto_server.port, r"^PUT /[^ ]*/published/history/")
    failed = dags_test(home, proxy.endpoint, {**CONF, "s3_bucket": bucket, "force_publish": True}, "failed.log",
                       logical_date=when, extra_env=FAST_RETRIES)
    run_id, state = run_of(home, when)
    assert proxy.cut.is_set() and failed.returncode != 0 and state == "failed"
    states = task_states(home, run_id)
    assert states["publish"] == "failed" and states["cleanup"] == "success", states
    assert not (home / "workspace" / job).exists()  # the teardown removed the scratch

    spec = home / "cleared.json"
    spec.write_text(json.dumps([{"name": task_id, "argv": ["tasks", "test", DAG_ID, task_id, run_id]}
                                for task_id in CLEARED]))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "dags_test_batch.py"), str(spec)],
                            env=cli_env(home, s3.meta.endpoint_url, FAST_RETRIES), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=1800)
    (home / "cleared.log").write_text(result.stdout)
    outputs = split_output(result.stdout)
    assert set(outputs) == set(CLEARED), f"see {home / 'cleared.log'}"
    states = task_states(home, run_id)
    assert all(states[task_id] == "success" for task_id in CLEARED), (states, f"see {home / 'cleared.log'}")
    record, _ = pointers.read_pointer(s3, f"s3://{bucket}/headpose/published/latest.json")
    assert record["training_job_name"] == job and record["previous"]["training_job_name"] == CHAMPION_JOB
    assert pointers.verify_record_files(s3, record) == []
    mirrored = {key.rsplit("published/latest/", 1)[1]: hashlib.sha256(
        s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()
        for key in keys(s3, bucket, "headpose/published/latest/")}
    assert mirrored == {name: entry["sha256"] for name, entry in pointers.mirror_files(record).items()}



def test_a_sagemaker_run_without_a_role_is_refused_by_plan_run_before_anything_is_written(batch, s3):
    case = CASES_BY_NAME["role-less sagemaker"]
    output, exit_code = batch["outputs"][case.name]
    run_id, state = run_of(batch["home"], case.when)
    states = task_states(batch["home"], run_id)
    assert exit_code != 0 and state == "failed" and states["plan_run"] == "failed", states
    assert try_numbers(batch["home"], run_id)["plan_run"] == 1  # refused, not retried
    assert all(states[t] == "upstream_failed" for t in ("stage_dataset", "package_code", "train")), states
    lines = failure_lines(output, "plan_run")
    assert len(lines) == 1 and "needs the SageMaker execution role" in lines[0], lines
    assert keys(s3, case.bucket) == []  # 0 objects written
