"""The suite's whole-DAG runs that need nothing done to them while they run, in one process.

Each ``Scenario`` is one real ``airflow dags test`` run: the learning run, a model below
``min_accuracy``, a refused conf, the SageMaker backend on moto, a hostile archive, a
worse challenger and a forced one, a corrupt dataset, a SageMaker run without a role,
the endpoint going away during a task, a failed run whose tasks are then cleared one by
one (``airflow tasks test`` of each). They run in ``dags_test_batch.py``, one interpreter
that imports Airflow and TensorFlow once, against the batch's own moto server (other
tests reset theirs), in one Airflow home.

The session starts the batch in the background when its test loop begins (conftest's
``dag_batch``): moto, a migrated database, the relays of the outage scenarios, then the
process, whose first step (``batch_prepare.prepare``) builds the datasets, models and
champions the runs expect. A test waits only for the run it checks (``DagBatch.run``).

Scenarios whose tasks are not what is under test convert the frozen graph to ONNX only
(the deployment setting ``edge_formats``): the learning run converts and checks every format.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from airflow_support import DAG_ID, ROOT, TINY_TRAINING, cli_env, migrate

PREPARED_FILE = "prepared.json"
DATA_BUCKET = "headpose-batch-data"
DATASET = f"s3://{DATA_BUCKET}/headpose/datasets/tiny/"
CORRUPT_DATASET = f"s3://{DATA_BUCKET}/headpose/datasets/corrupt/"
CHAMPION_JOB = "deeplens-TF-headpose-2024-06-03-03-00-00-000"
ROLE_ARN = "arn:aws:iam::123456789012:role/SageMakerRole"
FIRST_DAY = datetime(2025, 3, 1, 3, tzinfo=timezone.utc)

# The tiny synthetic dataset staged by the run itself, and a tiny model trained on it.
TINY_CONF = {
    "backend": "local", "dataset_source": "synthetic", "synthetic_train_per_pose": 1, "synthetic_eval_per_pose": 1,
    "images_per_shard": 64, **TINY_TRAINING,
}
# Enough to learn: ~1100 training images, 300 steps of 32, a meaningful gate. Label, colour
# or bin mismatches between training and evaluation leave the accuracy near chance (1/9).
# On two local hosts (MultiWorkerMirroredStrategy): batch_size is per replica and
# training_steps counts one-replica steps, so 600 of 16 are 300 steps of 32 over both hosts.
LEARNING_CONF = {
    "backend": "local", "dataset_source": "synthetic", "instance_count": 2,
    "synthetic_train_per_pose": 12, "synthetic_eval_per_pose": 4, "images_per_shard": 500,
    "resnet_size": 10, "base_filters": 8, "batch_size": 16, "training_steps": 600, "evaluation_steps": 4,
    "learning_rate_decay_epochs": "6,8", "batch_norm_momentum": 0.9,
    "min_accuracy": 0.45, "min_class_recall": 0.0,
}
# The prepared dataset (staged once by batch_prepare) instead of one the run stages.
PREPARED_DATA_CONF = {"backend": "local", "dataset_source": DATASET, **TINY_TRAINING}
ONNX_ONLY = {"HEADPOSE_RUN_DEFAULTS": json.dumps({"edge_formats": ["onnx"]})}
# Retries stay on, a second apart: `dags test` waits out retry delays for real.
FAST_RETRIES = {"HEADPOSE_RETRY_DELAY_SECONDS": "1", "HEADPOSE_AWS_RETRIES": "1"}
CLEARED_TASKS = ("download_artifact", "freeze_graph", "export_edge_models", "validate_model", "upload_frozen_model",
                 "publish")


@dataclass(frozen=True)
class Scenario:
    """One whole-DAG run of the batch.

    ``champion``: the good model is published in ``bucket`` first. ``artifact``: the
    run's training job already completed with that ``batch_prepare.ARCHIVES`` model, so
    ``train`` returns it and the run goes on from ``download_artifact`` exactly as after
    real training. ``cut``: the run reaches S3 through a relay that goes away at the
    first request matching it. ``then_clear``: afterwards each task is run again alone.
    ``as_worker``: the run reaches a moto server that enforces IAM, as a principal holding only
    the worker policy (``iam_support``).
    """

    name: str
    day: int
    bucket: str
    conf: dict[str, Any]
    champion: bool = False
    artifact: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cut: str | None = None
    then_clear: tuple[str, ...] = ()
    dag_id: str = DAG_ID
    seed: str | None = None
    seed_kwargs: dict[str, Any] = field(default_factory=dict)
    as_worker: bool = False

    @property
    def when(self) -> datetime:
        return FIRST_DAY + timedelta(days=self.day)

    @property
    def job(self) -> str:
        from headpose.planning.layout import training_job_name

        return training_job_name(self.when)

    def run_conf(self) -> dict[str, Any]:
        return {**self.conf, "s3_bucket": self.bucket}


SCENARIOS = [
    # tests/test_e2e.py
    Scenario("learning", 0, "headpose-e2e", LEARNING_CONF),
    Scenario("below min_accuracy", 1, "headpose-e2e-refused", {**TINY_CONF, "min_accuracy": 1}, champion=True,
             artifact="good", env=ONNX_ONLY),
    Scenario("bad conf", 2, "headpose-e2e-bad-conf", {**TINY_CONF, "training_steps": 0}),
    # tests/test_sagemaker_run.py: moto's job runs no code; its artifact is where SageMaker puts it.
    Scenario("sagemaker backend", 3, "headpose-sm-e2e", {**TINY_CONF, "backend": "sagemaker", "role_arn": ROLE_ARN},
             artifact="good", env=ONNX_ONLY),
    # tests/test_faults.py
    Scenario("hostile archive", 10, "faults-hostile", PREPARED_DATA_CONF, champion=True, artifact="parent traversal",
             env=FAST_RETRIES),
    Scenario("challenger worse", 11, "faults-champion", PREPARED_DATA_CONF, champion=True, artifact="poor",
             env={**FAST_RETRIES, **ONNX_ONLY}),
    Scenario("forced", 12, "faults-forced", {**PREPARED_DATA_CONF, "force_publish": True}, champion=True,
             artifact="poor", env={**FAST_RETRIES, **ONNX_ONLY}),
    Scenario("corrupt dataset", 13, "faults-crash", {**PREPARED_DATA_CONF, "dataset_source": CORRUPT_DATASET},
             champion=True, env=FAST_RETRIES),
    # Refused by plan_run: a SageMaker run with no role anywhere (the connection has none).
    Scenario("role-less sagemaker", 14, "faults-roleless", {**PREPARED_DATA_CONF, "backend": "sagemaker",
                                                             "role_arn": None}),
    Scenario("outage in download_artifact", 15, "faults-outage-download", PREPARED_DATA_CONF, champion=True,
             artifact="good", cut=r"^GET /[^ ]*/output/model\.tar\.gz",
             env={"HEADPOSE_RETRY_DELAY_SECONDS": "1", "HEADPOSE_AWS_RETRIES": "2", **ONNX_ONLY}),
    Scenario("outage in upload_frozen_model", 16, "faults-outage-upload", PREPARED_DATA_CONF, champion=True,
             artifact="good", cut=r"^PUT /[^ ]*/output/frozen_model\.pb",
             env={"HEADPOSE_RETRY_DELAY_SECONDS": "1", "HEADPOSE_AWS_RETRIES": "2", **ONNX_ONLY}),
    # The endpoint goes away at publish's first write, so the run fails and its teardown
    # runs; then each task from download_artifact on is run again alone, in order, as a
    # person clearing them one by one would have them run.
    Scenario("cleared after a failed publish", 17, "faults-cleared", {**PREPARED_DATA_CONF, "force_publish": True},
             champion=True, artifact="good", cut=r"^PUT /[^ ]*/published/history/",
             env={**FAST_RETRIES, **ONNX_ONLY}, then_clear=CLEARED_TASKS),
]
# tests/test_data_versions.py: a deployment that retrains on data (or the schedule); the
# second run, on the same data and settings, trains nothing - a weekly tick cannot be awaited.
RETRAINS_ON_DATA = {"HEADPOSE_RUN_DEFAULTS": json.dumps({
    "retrain_on": "either", "new_data_prefix": "s3://headpose-data-versions/headpose/incoming/",
    "new_data_queue": "https://sqs.us-east-1.amazonaws.com/123456789012/headpose-new-data",
    "edge_formats": ["onnx"]})}
SCENARIOS += [
    Scenario("data version: first run", 20, "headpose-data-versions", PREPARED_DATA_CONF, artifact="good",
             env={**FAST_RETRIES, **RETRAINS_ON_DATA}),
    Scenario("data version: unchanged", 21, "headpose-data-versions", PREPARED_DATA_CONF,
             env={**FAST_RETRIES, **RETRAINS_ON_DATA}),
]
# tests/test_iam.py: the whole run, staging its data included, with only the worker policy.
SCENARIOS += [
    Scenario("least privilege", 22, "headpose-least-privilege", TINY_CONF, as_worker=True,
             env={**FAST_RETRIES, **ONNX_ONLY}),
]
# tests/test_rollout_dag.py: headpose_rollout on channels and device reports seeded as data.
ROLLOUT_PROFILE = {"HEADPOSE_RUN_DEFAULTS": json.dumps({"rollout": {
    "canary_devices": ["cam-1", "cam-2"], "min_canaries": 2, "soak_minutes": 0, "max_error_rate": 0.05}})}
SCENARIOS += [
    Scenario(f"rollout {kind}", 30 + number, f"headpose-rollout-{number}", {}, env={**ROLLOUT_PROFILE, **FAST_RETRIES},
             dag_id="headpose_rollout", seed="fleet_support:seed_rollout", seed_kwargs={"kind": kind})
    for number, kind in enumerate(("promote", "rollback", "nothing to decide"))
]
BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}


def selected_scenarios() -> list[Scenario]:
    """The scenarios this session runs: all of them, or the names in ``$HEADPOSE_BATCH_ONLY``
    (comma-separated), for working on a few without waiting for the rest."""
    only = {name.strip() for name in os.environ.get("HEADPOSE_BATCH_ONLY", "").split(",") if name.strip()}
    unknown = only - BY_NAME.keys()
    if unknown:
        raise ValueError(f"HEADPOSE_BATCH_ONLY names no scenario: {sorted(unknown)}")
    return [scenario for scenario in SCENARIOS if not only or scenario.name in only]


@dataclass
class RunResult:
    output: str
    exit_code: int


class DagBatch:
    """The running (or finished) batch: its home, its store, and each run's output once it ended."""

    def __init__(self, home: Path, endpoint: str, relays: dict[str, Any], process: subprocess.Popen, log: Path,
                 names: set[str], enforcing: Any = None, worker: Any = None):
        self.home, self.endpoint, self.relays, self.names = home, endpoint, relays, names
        # The IAM-enforcing server and the worker principal of the ``as_worker`` runs.
        self.enforcing, self.worker = enforcing, worker
        self.process, self.log = process, log
        self._lines: dict[str, list[str]] = {}
        self._done: dict[str, threading.Event] = {}
        self._results: dict[str, RunResult] = {}
        self._current: str | None = None
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        from dags_test_batch import BEGIN, END

        assert self.process.stdout is not None
        with open(self.log, "w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                if line.startswith(BEGIN + " "):
                    self._current = line.split(" ", 1)[1].strip()
                    self._lines[self._current] = []
                elif line.startswith(END + " ") and self._current is not None:
                    result = RunResult("".join(self._lines[self._current]), int(line.rsplit("exit=", 1)[1]))
                    with self._lock:
                        self._results[self._current] = result
                        self._event(self._current).set()
                    self._current = None
                elif self._current is not None:
                    self._lines[self._current].append(line)
        self.process.wait()
        with self._lock:
            for event in self._done.values():
                event.set()  # whatever has not ended never will: its run() fails

    def _event(self, name: str) -> threading.Event:
        return self._done.setdefault(name, threading.Event())

    def run(self, name: str, timeout: float = 3600) -> RunResult:
        """The output and exit code of run ``name``, once it has ended."""
        if name != "prepare" and not any(name == n or name.startswith(n + ": ") for n in self.names):
            import pytest

            pytest.skip(f"the batch run {name!r} is not in $HEADPOSE_BATCH_ONLY")
        with self._lock:
            event = self._event(name)
        if not event.wait(timeout) or name not in self._results:
            raise AssertionError(f"the batch's run {name!r} did not end (batch exit code "
                                 f"{self.process.poll()}); see {self.log}")
        return self._results[name]

    @property
    def prepared(self) -> dict[str, Any]:
        result = self.run("prepare")
        assert result.exit_code == 0, f"the batch's preparation failed; see {self.log}"
        return json.loads((self.home / PREPARED_FILE).read_text())

    def seed_champion(self, bucket: str) -> dict[str, tuple[str, str]]:
        """A new ``bucket`` with the prepared good model published; its published state."""
        from batch_prepare import seed_champion
        from fault_support import published_state

        prepared, archives = self.prepared, self.home / "archives"
        models = {"good_frozen": (archives / "good_frozen.pb").read_bytes(),
                  "good_frozen_json": (archives / "good_frozen.json").read_bytes(),
                  "good_accuracy": prepared["good_accuracy"]}
        s3 = self.s3()
        s3.create_bucket(Bucket=bucket)
        seed_champion(s3, bucket, models, prepared["manifest_sha256"])
        return published_state(s3, bucket)

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def client(self, service: str):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


def batch_entries(scenarios: list[Scenario], endpoints: dict[str, str], work: Path, moto_endpoint: str,
                  worker_env: dict[str, str] | None = None) -> list[dict]:
    """``dags_test_batch.py``'s spec: the preparation, then every scenario in order."""
    from support import aws_env

    entries: list[dict[str, Any]] = []
    if any(scenario.dag_id == DAG_ID for scenario in scenarios):  # the retraining runs' datasets and models
        entries.append({"name": "prepare", "call": "batch_prepare:prepare",
                        "kwargs": {"endpoint": moto_endpoint, "work": str(work)}})
    for scenario in scenarios:
        env = dict(scenario.env)
        if scenario.name in endpoints:
            env.update(aws_env(endpoints[scenario.name]))
        if scenario.as_worker:
            assert worker_env, "an as_worker scenario needs the enforcing server's worker"
            env.update(worker_env)
        if scenario.seed:
            entries.append({"name": f"{scenario.name}: seed", "call": scenario.seed, "kwargs": {
                "endpoint": moto_endpoint, "bucket": scenario.bucket, **scenario.seed_kwargs}})
        entries.append({"name": scenario.name, "dag_id": scenario.dag_id, "logical_date": scenario.when.isoformat(),
                        "conf": scenario.run_conf(), "env": env})
        for task_id in scenario.then_clear:
            entries.append({"name": f"{scenario.name}: {task_id}", "env": scenario.env,
                            "argv": ["tasks", "test", scenario.dag_id, task_id, scenario.when.isoformat()]})
    return entries


def start_dag_batch(say: Callable[[str], None]) -> tuple[DagBatch, Callable[[], None]]:
    """The batch's store, home and relays, and its process, started; and what stops it all."""
    from embedded import EmbeddedS3
    from fault_support import CuttingProxy

    home = Path(tempfile.mkdtemp(prefix="headpose-batch-"))
    moto = EmbeddedS3.start()
    say(f"batch: moto on {moto.endpoint}, Airflow home {home}")
    migrate(home)
    say("batch: database migrated")
    scenarios = selected_scenarios()
    relays = {s.name: CuttingProxy(moto.port, s.cut) for s in scenarios if s.cut}
    enforcing = worker = None
    workers = {s.bucket for s in scenarios if s.as_worker}
    if workers:
        from iam_support import EnforcingMoto, worker_for_dag_run

        enforcing = EnforcingMoto.start_enforcing(home / "iam-trace.jsonl")
        (bucket,) = workers  # one principal, one bucket: its trace is the whole proof
        worker = worker_for_dag_run(enforcing, bucket)
        say(f"batch: IAM-enforcing moto on {enforcing.endpoint}, worker principal {worker.name}")
    spec = home / "runs.json"
    spec.write_text(json.dumps(batch_entries(scenarios, {n: r.endpoint for n, r in relays.items()}, home,
                                             moto.endpoint, worker.airflow_env() if worker else None), indent=2))
    env = cli_env(home, moto.endpoint, {"AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True"})
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "dags_test_batch.py"), str(spec)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               start_new_session=True)
    log = ROOT / "test-artifacts" / "background" / "dag-batch-runs.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = DagBatch(home, moto.endpoint, relays, process, log, {s.name for s in scenarios}, enforcing, worker)
    say(f"batch: {len(scenarios)} runs under way; their output: {log}")

    def close() -> None:
        if process.poll() is None:
            process.kill()
        process.wait()
        for relay in relays.values():
            relay.go_away()
        if enforcing is not None:
            enforcing.stop()
        moto.stop()
        if os.environ.get("HEADPOSE_KEEP_TEST_HOMES") != "1":
            shutil.rmtree(home, ignore_errors=True)

    return handle, close
