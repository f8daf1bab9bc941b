"""Faults and hostile input: whole DAG runs where Airflow itself is under test, the rest at task level.

Every run starts from a bucket where a model is already published (the champion), and the
test checks that nothing under ``published/`` changed - keys, ETags and bytes - except where
publishing is the point.

* Runs that need nothing done to them while they run are scenarios of the suite's batch
  (``dag_batch``): a hostile archive end to end, a worse challenger, a forced one (then
  rolled back), a corrupt dataset, a SageMaker run without a role, the endpoint going
  away inside a task (retries, then the failure), and every task cleared and run again
  alone after a failed run's teardown.
* Each of the eleven hostile or broken archives is refused by ``freeze_graph`` itself (no retry).
* Runs that something happens to while they run are their own processes: the worker
  killed during ``train`` and then during ``freeze_graph``, and two runs at once.

What a crash at each S3 call of the tasks that publish leaves is test_crash_points'.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from airflow_support import (
    ROOT,
    cli_env,
    dags_test_command,
    db,
    last_run,
    new_airflow_home,
    run_id_of,
    task_states,
    try_numbers,
    xcom,
)
from batch_prepare import ARCHIVES
from dag_batch import (
    BY_NAME,
    CHAMPION_JOB,
    CLEARED_TASKS,
    FAST_RETRIES,
    FIRST_DAY,
    ONNX_ONLY,
    PREPARED_DATA_CONF,
    Scenario,
)
from fault_support import StreamedRun, find_descendant, keys, published_state

pytestmark = pytest.mark.e2e

DOWNSTREAM_OF_FREEZE = ("export_edge_models", "validate_model", "upload_frozen_model", "publish")
HOSTILE = {
    # archive: words of the reason freeze_graph gives
    "parent traversal": "'../../escaped.txt'",
    "absolute path": "absolute path",
    "symlink out": "'export/Servo/1700000000/variables'",
    "hard link out": "refusing archive member",
    "huge member": "over the",
    "no export folder": "no export/*/*/saved_model.pb",
    "two exports": "expected one SavedModel",
    "not a tarball": "not a readable tar archive",
    "corrupt saved_model.pb": "cannot load the SavedModel",
    "input node missing": "'inputs'",
    "output of the wrong shape": "5 scores per image",
}


def failure_lines(output: str, task_id: str) -> list[str]:
    """The failed task's own line (not the run's alert, which repeats it)."""
    return [line for line in output.splitlines()
            if "HEADPOSE FAILURE" in line and f"task={task_id} " in line and "HEADPOSE ALERT" not in line]


def alerts(output: str) -> list[str]:
    return [line for line in output.splitlines() if "HEADPOSE ALERT" in line]


def finished(dag_batch, scenario: Scenario) -> tuple[str, int, str, dict[str, str]]:
    """``(output, exit code, run_id, task states)`` of a batch scenario, once it ended."""
    result = dag_batch.run(scenario.name)
    run_id = run_id_of(dag_batch.home, scenario.when)
    assert run_id, f"no run of {scenario.name}; see {dag_batch.log}"
    return result.output, result.exit_code, run_id, task_states(dag_batch.home, run_id)


def published_before(dag_batch, scenario: Scenario) -> dict:
    return {key: tuple(value) for key, value in dag_batch.prepared["before"][scenario.name].items()}


# -- the batch's runs -------------------------------------------------------------------

def test_a_hostile_archive_fails_the_run_at_freeze_graph_without_a_retry_and_alerts_once(dag_batch):
    scenario = BY_NAME["hostile archive"]
    output, exit_code, run_id, states = finished(dag_batch, scenario)
    home, s3 = dag_batch.home, dag_batch.s3()
    assert exit_code != 0 and states["freeze_graph"] == "failed", states
    assert try_numbers(home, run_id)["freeze_graph"] == 1  # refused, not retried: it would be refused again
    assert all(states[t] == "upstream_failed" for t in DOWNSTREAM_OF_FREEZE), states
    assert states["cleanup"] == "success"
    lines = failure_lines(output, "freeze_graph")
    assert len(lines) == 1 and f"training_job_name={scenario.job}" in lines[0], lines
    assert HOSTILE["parent traversal"] in lines[0], lines
    # One alert for the failed run, naming the task that failed.
    assert len(alerts(output)) == 1 and "task=freeze_graph " in alerts(output)[0], alerts(output)
    assert published_state(s3, scenario.bucket) == published_before(dag_batch, scenario)
    assert not [k for k in keys(s3, scenario.bucket, f"headpose/TFartifacts/{scenario.job}/") if "frozen_model" in k]
    # Nothing landed outside the run's workspace, and cleanup removed that.
    assert not list(home.rglob("escaped.txt"))
    assert not (home / "workspace" / scenario.job).exists()


def test_a_less_accurate_model_is_not_published_and_the_run_says_why(dag_batch):
    scenario = BY_NAME["challenger worse"]
    output, exit_code, run_id, states = finished(dag_batch, scenario)
    home, s3, prepared = dag_batch.home, dag_batch.s3(), dag_batch.prepared
    assert exit_code == 0, states
    assert states["publish"] == "skipped" and states["upload_frozen_model"] == "success"
    summary = xcom(home, "publish", "summary", run_id=run_id)
    assert summary["promoted"] is False and "stays published" in summary["reason"]
    assert summary["accuracy_before"] == pytest.approx(prepared["good_accuracy"])
    assert summary["accuracy_after"] == pytest.approx(prepared["poor_accuracy"])
    assert summary["previous_training_job_name"] == CHAMPION_JOB
    assert "run summary: " + scenario.job in output and "kept the published model" in output
    assert "train execution_timeout: 5 days, 1:00:00" in output  # max_run_seconds + 1 h, set per run
    # The model, its metrics and confusion matrix stay beside the artifact, unpublished.
    report = json.loads(s3.get_object(
        Bucket=scenario.bucket, Key=f"headpose/TFartifacts/{scenario.job}/output/report.json")["Body"].read())
    assert report["champion"]["training_job_name"] == CHAMPION_JOB
    assert report["champion"]["accuracy"] == pytest.approx(prepared["good_accuracy"])
    assert f"headpose/TFartifacts/{scenario.job}/output/confusion_matrix.png" in keys(s3, scenario.bucket)
    assert published_state(s3, scenario.bucket) == published_before(dag_batch, scenario)
    with db(home) as conn:  # a skipped publish emits no asset event: nothing downstream reloads
        assert conn.execute("SELECT COUNT(*) FROM asset_event WHERE source_run_id = ?", (run_id,)).fetchone()[0] == 0


def test_force_publish_promotes_it_and_the_pointer_records_everything(dag_batch):
    scenario = BY_NAME["forced"]
    _, exit_code, run_id, states = finished(dag_batch, scenario)
    home, s3, prepared = dag_batch.home, dag_batch.s3(), dag_batch.prepared
    assert exit_code == 0 and states["publish"] == "success", states
    summary = xcom(home, "publish", run_id=run_id)
    assert summary["promoted"] is True and summary["reason"] == "force_publish is set"
    assert summary["billable_time_in_seconds"] == 0  # the local backend bills nothing

    pointer = json.loads(s3.get_object(Bucket=scenario.bucket, Key="headpose/published/latest.json")["Body"].read())
    assert pointer["training_job_name"] == scenario.job
    assert pointer["metrics"]["accuracy"] == pytest.approx(prepared["poor_accuracy"])
    assert pointer["previous"]["training_job_name"] == CHAMPION_JOB
    assert pointer["dataset"]["manifest_sha256"] == prepared["manifest_sha256"]
    latest = s3.get_object(Bucket=scenario.bucket, Key="headpose/published/latest/frozen_model.pb")["Body"].read()
    assert hashlib.sha256(latest).hexdigest() == pointer["files"]["frozen_model.pb"]["sha256"]
    with db(home) as conn:  # the asset event names the promoted model
        events = conn.execute("SELECT extra FROM asset_event WHERE source_run_id = ?", (run_id,)).fetchall()
    assert [json.loads(e[0])["training_job_name"] for e in events] == [scenario.job]


def test_rollback_puts_the_previous_model_back(dag_batch):
    scenario = BY_NAME["forced"]
    finished(dag_batch, scenario)
    s3, bucket = dag_batch.s3(), scenario.bucket
    assert json.loads(s3.get_object(Bucket=bucket, Key="headpose/published/latest.json")["Body"].read())[
        "training_job_name"] == scenario.job
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    done = subprocess.run(
        [sys.executable, "-m", "headpose.registry", "--endpoint-url", dag_batch.endpoint,
         "--bucket", bucket, "rollback"], env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    pointer = json.loads(s3.get_object(Bucket=bucket, Key="headpose/published/latest.json")["Body"].read())
    assert pointer["training_job_name"] == CHAMPION_JOB
    assert pointer["rolled_back"]["from"] == scenario.job
    latest = s3.get_object(Bucket=bucket, Key="headpose/published/latest/frozen_model.pb")["Body"].read()
    assert hashlib.sha256(latest).hexdigest() == dag_batch.prepared["good_frozen_sha256"]


def test_a_corrupt_dataset_is_refused_before_training_and_nothing_trains(dag_batch):
    # Its training shard would crash the training program (DataLossError) after the job
    # started; stage_dataset checks it against the manifest first. (A crash inside the
    # program, and its reason as train's error, is test_local_backend's.)
    scenario = BY_NAME["corrupt dataset"]
    output, exit_code, run_id, states = finished(dag_batch, scenario)
    s3 = dag_batch.s3()
    assert exit_code != 0 and states["stage_dataset"] == "failed", states
    assert try_numbers(dag_batch.home, run_id)["stage_dataset"] == 1  # refused, not retried
    for task_id in ("train", "download_artifact", "freeze_graph", *DOWNSTREAM_OF_FREEZE):
        assert states[task_id] == "upstream_failed", states
    lines = failure_lines(output, "stage_dataset")
    assert len(lines) == 1 and f"training_job_name={scenario.job}" in lines[0]
    assert "training was not started" in lines[0] and "train shard train-00000.tfrecord has sha256" in lines[0]
    assert len(alerts(output)) == 1 and "task=stage_dataset " in alerts(output)[0]
    assert published_state(s3, scenario.bucket) == published_before(dag_batch, scenario)
    assert not keys(s3, scenario.bucket, f"headpose/TFartifacts/{scenario.job}/")


def test_a_sagemaker_run_without_a_role_is_refused_by_plan_run_before_anything_is_written(dag_batch):
    scenario = BY_NAME["role-less sagemaker"]
    output, exit_code, run_id, states = finished(dag_batch, scenario)
    assert exit_code != 0 and states["plan_run"] == "failed", states
    assert try_numbers(dag_batch.home, run_id)["plan_run"] == 1  # refused, not retried
    assert all(states[t] == "upstream_failed" for t in ("stage_dataset", "package_code", "train")), states
    lines = failure_lines(output, "plan_run")
    assert len(lines) == 1 and "needs the SageMaker execution role" in lines[0], lines
    assert keys(dag_batch.s3(), scenario.bucket) == []  # 0 objects written


@pytest.mark.parametrize("task_id", ["download_artifact", "upload_frozen_model"])
def test_the_s3_endpoint_going_away_fails_the_task_after_its_retries(task_id, dag_batch):
    scenario = BY_NAME[f"outage in {task_id}"]
    output, exit_code, run_id, states = finished(dag_batch, scenario)
    relay = dag_batch.relays[scenario.name]
    assert relay.cut.is_set(), f"the endpoint never went away; requests: {relay.relayed[-5:]}"
    assert exit_code != 0 and states[task_id] == "failed", states
    assert try_numbers(dag_batch.home, run_id)[task_id] == 3  # the first try and both retries
    assert states["publish"] == "upstream_failed" and states["cleanup"] == "success"
    lines = failure_lines(output, task_id)
    assert len(lines) == 1 and f"training_job_name={scenario.job}" in lines[0]
    assert "Could not connect to the endpoint URL" in lines[0], lines[0]
    assert published_state(dag_batch.s3(), scenario.bucket) == published_before(dag_batch, scenario)


def test_after_a_failed_run_each_task_cleared_runs_again_alone_and_publishes_a_consistent_model(dag_batch):
    """The endpoint went away at publish's first write, so the run failed and its teardown
    ran; then each task from download_artifact on ran again alone (``airflow tasks test``
    of the run: its XComs, none of the first try's scratch), in order, as a person
    clearing them one by one would have them run."""
    from headpose.registry import pointer as pointers

    scenario = BY_NAME["cleared after a failed publish"]
    home, s3 = dag_batch.home, dag_batch.s3()
    result = dag_batch.run(scenario.name)
    run_id = run_id_of(home, scenario.when)
    assert dag_batch.relays[scenario.name].cut.is_set() and result.exit_code != 0
    assert len(failure_lines(result.output, "publish")) == 1
    cleared = {task_id: dag_batch.run(f"{scenario.name}: {task_id}") for task_id in CLEARED_TASKS}
    assert all(r.exit_code == 0 for r in cleared.values()), {t: r.output[-2000:] for t, r in cleared.items()
                                                             if r.exit_code}
    states = task_states(home, run_id)
    assert all(states[task_id] == "success" for task_id in CLEARED_TASKS), states
    assert states["cleanup"] == "success"  # the failed run's teardown, before the clearing
    record, _ = pointers.read_pointer(s3, f"s3://{scenario.bucket}/headpose/published/latest.json")
    assert record["training_job_name"] == scenario.job and record["previous"]["training_job_name"] == CHAMPION_JOB
    assert pointers.verify_record_files(s3, record) == []
    mirrored = {key.rsplit("published/latest/", 1)[1]: hashlib.sha256(
        s3.get_object(Bucket=scenario.bucket, Key=key)["Body"].read()).hexdigest()
        for key in keys(s3, scenario.bucket, "headpose/published/latest/")}
    assert mirrored == {name: entry["sha256"] for name, entry in pointers.mirror_files(record).items()}


# -- every archive, refused by the task itself ------------------------------------------

@pytest.fixture(scope="module")
def contract_breakers(tmp_path_factory) -> dict[str, bytes]:
    """The two archives that need TensorFlow to make: an input of another name, five classes."""
    from batch_prepare import _export_with_input_name, biased_model
    from headpose.artifacts.archive import pack_model_dir
    from headpose.training.export import export_saved_model

    work = tmp_path_factory.mktemp("contract-breakers")
    _export_with_input_name(biased_model(0, input_name="images"), work / "wrong_input", "images")
    export_saved_model(biased_model(0, classes=5), work / "five_classes")
    return {name: pack_model_dir(work / name, work / f"{name}.tar.gz").read_bytes()
            for name in ("wrong_input", "five_classes")}


@pytest.mark.parametrize("archive", list(HOSTILE))
def test_every_hostile_or_broken_archive_is_refused_by_freeze_graph_and_nothing_is_written(
        archive, contract_breakers, s3_client, s3_endpoint, tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from headpose_operators import FreezeGraphOperator
    from support import aws_env

    for name, value in {**aws_env(s3_endpoint), "HEADPOSE_WORKSPACE": str(tmp_path / "workspace")}.items():
        monkeypatch.setenv(name, value)
    job = "deeplens-TF-headpose-2025-03-01-03-00-00-000"
    body = ARCHIVES[archive](contract_breakers)
    s3_client.create_bucket(Bucket="hostile")
    s3_client.put_object(Bucket="hostile", Key=f"headpose/TFartifacts/{job}/output/model.tar.gz", Body=body)
    operator = FreezeGraphOperator(
        task_id="freeze_graph", training_job_name=job, artifact_sha256=hashlib.sha256(body).hexdigest(),
        artifact_uri=f"s3://hostile/headpose/TFartifacts/{job}/output/model.tar.gz",
        output_prefix=f"s3://hostile/headpose/TFartifacts/{job}/candidate/")
    # AirflowFailException: the task fails without its retries, which would refuse it again.
    with pytest.raises(AirflowFailException, match=f"model artifact of {job} refused") as refused:
        operator.execute({})
    assert HOSTILE[archive] in str(refused.value)
    assert keys(s3_client, "hostile") == [f"headpose/TFartifacts/{job}/output/model.tar.gz"]  # nothing written
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/headpose-absolute.txt").exists()
    assert not (tmp_path / "workspace" / job / "freeze_graph").exists()  # its scratch is gone


# -- faults while a run is running: processes of their own --------------------------------

@pytest.fixture()
def home(airflow_db_template, tmp_path) -> Path:
    return new_airflow_home(airflow_db_template, tmp_path / "airflow")


def test_a_worker_killed_during_train_and_then_during_freeze_graph_leaves_one_job(dag_batch, home):
    """kill -9 of the whole worker (the `dags test` process and the training program under it),
    first while it trains, then while it freezes; each time the run is started again for the
    same logical date, as a retry would be, and it must finish with the same single job."""
    from headpose.planning.layout import training_job_name

    scenario = Scenario("worker killed", 40, "faults-worker-killed", PREPARED_DATA_CONF)
    s3 = dag_batch.s3()
    before = dag_batch.seed_champion(scenario.bucket)
    job = training_job_name(scenario.when)
    conf = scenario.run_conf()
    env = cli_env(home, dag_batch.endpoint, {**FAST_RETRIES, **ONNX_ONLY})
    artifact_key = f"headpose/TFartifacts/{job}/output/model.tar.gz"

    def job_keys() -> list[str]:
        return keys(s3, scenario.bucket, "headpose/TFartifacts/")

    first = StreamedRun(dags_test_command(conf, scenario.when), env, home / "killed-in-train.log")
    first.wait_for(r"running the SageMaker training toolkit")
    trainer = find_descendant(first.process.pid, "train.py")
    first.wait_for(r"data: \d+ training images")  # the training program is under way
    killed = first.kill_worker()
    assert trainer.pid in killed
    assert published_state(s3, scenario.bucket) == before
    assert not [k for k in job_keys() if k.endswith("model.tar.gz")]  # it died before any artifact

    second = StreamedRun(dags_test_command(conf, scenario.when), env, home / "killed-in-freeze.log")
    second.wait_for(r"\[DAG TEST\] starting task_id=freeze_graph")
    artifact = s3.head_object(Bucket=scenario.bucket, Key=artifact_key)
    second.wait_for(r"Freezing ")
    second.kill_worker()
    assert published_state(s3, scenario.bucket) == before
    assert f"training_job_name: {job}" in first.output and f"training_job_name: {job}" in second.output

    third = StreamedRun(dags_test_command(conf, scenario.when), env, home / "finished.log")
    assert third.wait() == 0, f"see {third.log_path}"
    run_id = run_id_of(home, scenario.when)
    assert task_states(home, run_id)["freeze_graph"] == "success"
    # The retried train found the job it had completed instead of training a second one.
    assert f"training job {job} already completed" in third.output
    assert "running the SageMaker training toolkit" not in third.output
    assert s3.head_object(Bucket=scenario.bucket, Key=artifact_key)["ETag"] == artifact["ETag"]
    assert [k for k in job_keys() if k.endswith("model.tar.gz")] == [artifact_key]
    assert {k.split("/")[2] for k in job_keys()} == {CHAMPION_JOB, job}
    summary = xcom(home, "publish", "summary", run_id=run_id)
    assert summary["training_job_name"] == job


def test_two_runs_at_once_keep_to_their_own_names_and_keys(dag_batch, airflow_db_template, tmp_path):
    """Two runs of different logical dates, started together against the same bucket (from
    two Airflow homes: one home's max_active_runs=1 would queue the second)."""
    from headpose.planning.layout import training_job_name

    conf = {**PREPARED_DATA_CONF, "s3_bucket": "faults-concurrent"}
    s3 = dag_batch.s3()
    s3.create_bucket(Bucket="faults-concurrent")
    whens = [FIRST_DAY + timedelta(days=50), FIRST_DAY + timedelta(days=50, hours=1)]
    jobs = [training_job_name(w) for w in whens]
    homes = [new_airflow_home(airflow_db_template, tmp_path / f"airflow-{i}") for i in range(2)]
    workspace = tmp_path / "shared-workspace"  # one workspace, as several workers share one
    runs = [
        StreamedRun(dags_test_command(conf, when),
                    cli_env(home, dag_batch.endpoint,
                            {**FAST_RETRIES, **ONNX_ONLY, "HEADPOSE_WORKSPACE": str(workspace)}),
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
        uris = [v for k, v in plan.items() if k.endswith("_uri") and not v.startswith(plan["published_prefix"])]
        assert all(job in uri and other not in uri for uri in uris), uris
        frozen = xcom(home, "freeze_graph", run_id=run_id)
        stored = s3.get_object(Bucket="faults-concurrent",
                               Key=f"headpose/TFartifacts/{job}/output/frozen_model.pb")["Body"].read()
        assert hashlib.sha256(stored).hexdigest() == frozen["frozen_model_sha256"]
        assert xcom(home, "train", run_id=run_id)["Training"]["TrainingJobName"] == job
    run_keys = [k for k in keys(s3, "faults-concurrent") if not k.startswith(("headpose/datasets/", "headpose/published/"))]
    assert all((jobs[0] in k) != (jobs[1] in k) for k in run_keys), run_keys
    # Whatever the interleaving, the pointer names one of them, and latest/ holds that one's files.
    pointer = json.loads(s3.get_object(Bucket="faults-concurrent", Key="headpose/published/latest.json")["Body"].read())
    assert pointer["training_job_name"] in jobs
    latest = s3.get_object(Bucket="faults-concurrent", Key="headpose/published/latest/frozen_model.pb")["Body"].read()
    assert hashlib.sha256(latest).hexdigest() == pointer["files"]["frozen_model.pb"]["sha256"]
    for job in jobs:
        history = keys(s3, "faults-concurrent", f"headpose/published/history/{job}.json")
        if history:
            record = json.loads(s3.get_object(Bucket="faults-concurrent", Key=history[0])["Body"].read())
            assert record["training_job_name"] == job and job in record["files"]["frozen_model.pb"]["uri"]
    assert not workspace.exists() or not any(workspace.iterdir())  # each cleanup removed its own folder
