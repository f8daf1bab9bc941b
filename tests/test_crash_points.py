"""Every call of every operation that writes what devices or people rely on, failed in turn.

``crash_points.enumerate_crash_points`` runs each operation below against moto's server
once per (call, way of failing) - an error before or after the call, or the worker dying
before or after it - then once more without faults, as a cleared or retried task does.
After each step the invariants of DESIGN.md's crash consistency must hold:

* ``latest.json`` names the old or the new version (or, before a first publish, nothing);
* every file the pointer names exists with the sha256 its record gives;
* the history has the record of the version the pointer names;
* nothing under a published version was overwritten;
* after the re-run: the operation's outcome (the new version, or the rollback's target),
  and the ``latest/`` mirror equal to the pointer.

The data-version record (``registry.data_versions``) is enumerated too: its claim, first or
taking over a failed run's, and its settling. The record is always whole JSON naming the
old or the new claimant; after the re-run the run holds it (or has settled it), and a run
that starts meanwhile on the same data is refused.

The operations are called as their tasks call them (``make_version``, ``publish_run``,
``rollback``), on a run planned by the real ``plan_run``. The table of every operation's
crash points is written to ``test-artifacts/crash-points.md``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import pytest

from crash_points import Operation, Store, enumerate_crash_points, table
from headpose.planning.layout import split_s3_uri
from headpose.planning.plan import plan_run
from headpose.registry import data_versions
from headpose.registry import pointer as pointers
from headpose.registry.promotion import publish_run
from headpose.registry.rollback import rollback
from headpose.registry.versions import make_version
from support import ROOT

ARTIFACTS = ROOT / "test-artifacts"
FIRST_RUN = datetime(2025, 3, 1, 3, tzinfo=timezone.utc)
_buckets = itertools.count()
_rows: dict[str, dict] = {}


def _s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _put(s3, uri: str, body: bytes) -> str:
    bucket, key = split_s3_uri(uri)
    s3.put_object(Bucket=bucket, Key=key, Body=body)
    return hashlib.sha256(body).hexdigest()


def _get(s3, uri: str) -> bytes:
    bucket, key = split_s3_uri(uri)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _plan(bucket: str, day: int, mirror: bool) -> dict[str, Any]:
    """A run's plan as ``plan_run`` makes it (the embedded demo's profile, this bucket)."""
    when = FIRST_RUN + timedelta(days=day)
    environ = {"HEADPOSE_RUN_DEFAULTS": json.dumps({"publish_latest_mirror": mirror})}
    return plan_run({"s3_bucket": bucket, "backend": "local"}, when, region="us-east-1",
                    dag_id="headpose_retraining", run_id=f"scheduled__{when.isoformat()}", environ=environ)


@dataclass
class Run:
    """One run's hand-offs up to ``upload_frozen_model``: its candidate files in S3 and the XComs naming them."""

    plan: dict[str, Any]
    frozen: dict[str, Any]
    report: dict[str, Any]
    edge: dict[str, Any]
    dataset: dict[str, Any]
    training: dict[str, Any]

    @property
    def job(self) -> str:
        return self.plan["training_job_name"]


def candidate(s3, bucket: str, day: int, mirror: bool = True, accuracy: float = 0.9,
              plan: dict[str, Any] | None = None) -> Run:
    """The candidate of the run of ``day`` (or of ``plan``), as freeze_graph, export_edge_models and
    validate_model leave it."""
    plan = plan or _plan(bucket, day, mirror)
    job, prefix = plan["training_job_name"], plan["candidate_prefix"]
    body = f"graph of {job}".encode()
    frozen = {
        "training_job_name": job, "channel_order": "bgr",
        "frozen_model_uri": prefix + "frozen_model.pb", "frozen_model_sha256": _put(s3, prefix + "frozen_model.pb", body),
        "frozen_model_json_uri": prefix + "frozen_model.json",
        "frozen_model_json_sha256": _put(s3, prefix + "frozen_model.json", b'{"graph": "%s"}' % body),
    }
    report = {
        "accuracy": accuracy, "images": 93, "parity_max_abs_diff": 1e-6, "min_class_recall_measured": 0.5,
        "evaluation_set": {"id": "synthetic-abc@000", "pinned": False},
        "report_uri": prefix + "report.json", "report_sha256": _put(s3, prefix + "report.json", b'{"accepted": true}'),
        "confusion_png_uri": prefix + "confusion_matrix.png",
        "confusion_png_sha256": _put(s3, prefix + "confusion_matrix.png", b"\x89PNG" + body),
        "formats": {"onnx": {"accepted": True, "accuracy": accuracy, "max_abs_diff": 1e-7, "latency_ms_b1": 1.0},
                    "litert_int8": {"accepted": False, "accuracy": 0.1}},
    }
    edge = {"formats": {
        "onnx": {"runtime": "onnxruntime", "precision": "float32", "metadata": {"model_file": "model.onnx"},
                 "files": {"model.onnx": {"uri": prefix + "edge/model.onnx",
                                          "sha256": _put(s3, prefix + "edge/model.onnx", b"onnx:" + body)}}},
        "litert_int8": {"runtime": "litert", "precision": "int8", "metadata": {},
                        "files": {"model_int8.tflite": {"uri": prefix + "edge/model_int8.tflite",
                                                        "sha256": _put(s3, prefix + "edge/model_int8.tflite", body)}}},
    }}
    manifest = plan["dataset_prefix"] + "manifest.json"
    dataset = {"dataset_prefix": plan["dataset_prefix"], "dataset_id": "synthetic-abc", "manifest_uri": manifest,
               "manifest_sha256": _put(s3, manifest, b'{"splits": {}}'), "source": "synthetic",
               "channel_order": "bgr"}
    training = {"training_job_name": job, "attempts": [job],
                "Training": {"TrainingJobName": job, "BillableTimeInSeconds": 0, "TrainingTimeInSeconds": 1}}
    return Run(plan, frozen, report, edge, dataset, training)


def champion_of(s3, run: Run) -> dict[str, Any]:
    """What validate_model records of the published model for ``run`` (the pointer's ETag then)."""
    record, etag = pointers.read_pointer(s3, run.plan["published_pointer_uri"])
    if record is None:
        return {"present": False}
    return {"present": True, "training_job_name": record["training_job_name"], "accuracy": 0.5,
            "pointer_etag": etag, "comparable": True}


def upload(s3, run: Run) -> dict[str, Any]:
    return make_version(s3, run.plan, run.frozen, run.report, run.edge)


def publish(s3, run: Run, version: dict[str, Any]) -> None:
    publish_run(s3, run.plan, run.training, run.dataset, run.report, version,
                dag_id="headpose_retraining", run_id="crash-points")


def published(s3, run: Run, accuracy: float = 0.9) -> dict[str, Any]:
    """Publish ``run`` cleanly; its version."""
    run.report = {**run.report, "accuracy": accuracy, "champion": champion_of(s3, run)}
    version = upload(s3, run)
    publish(s3, run, version)
    return version


# -- the invariants ---------------------------------------------------------------------

def published_files(s3, run: Run) -> dict[str, str]:
    """``{key: sha256}`` of every published version's files and records: none may change."""
    bucket = run.plan["bucket"]
    found = {}
    for record in pointers.history(s3, bucket, run.plan["folder"]):
        for entry in pointers.mirror_files(record).values():
            found[split_s3_uri(entry["uri"])[1]] = entry["sha256"]
        found[split_s3_uri(record["history_record_uri"])[1]] = hashlib.sha256(_get(s3, record["history_record_uri"])).hexdigest()
    return found


def pointer_problems(store: Store, plan: dict[str, Any], allowed: tuple[str | None, ...], final: str | None,
                     rerun: bool, published_before: dict[str, str]) -> list[str]:
    """The pointer names an allowed version, whose files and record are all there; nothing published changed."""
    record, _ = pointers.read_pointer(store.s3, plan["published_pointer_uri"])
    named = record["training_job_name"] if record else None
    if rerun and named != final:
        return [f"latest.json names {named}, the re-run should have left {final}"]
    if named not in allowed:
        return [f"latest.json names {named}, neither of {allowed}"]
    problems = [f"{key} was overwritten or is gone" for key, sha256 in published_before.items()
                if store.sha256(key) != sha256]
    if record is None:
        return problems
    for name, entry in pointers.mirror_files(record).items():
        if store.sha256(split_s3_uri(entry["uri"])[1]) != entry["sha256"]:
            problems.append(f"latest.json names {entry['uri']}, which does not hold sha256 {entry['sha256']}")
    if split_s3_uri(plan["published_prefix"] + f"history/{named}.json")[1] not in store.keys:
        problems.append(f"latest.json names {named}, which has no history record")
    if rerun:
        problems += mirror_problems(store, plan, record)
    return problems


def mirror_problems(store: Store, plan: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """After the re-run the mirror holds exactly the pointer's files (or nothing, without the mirror)."""
    prefix = split_s3_uri(plan["published_mirror_prefix"])[1]
    mirrored = {key[len(prefix):]: store.sha256(key) for key in store.keys if key.startswith(prefix)}
    wanted = ({name: entry["sha256"] for name, entry in pointers.mirror_files(record).items()}
              if plan["deployment"]["publish_latest_mirror"] else {})
    return [] if mirrored == wanted else [f"the mirror holds {sorted(mirrored)}, the pointer names {sorted(wanted)}"]


def version_problems(store: Store, run: Run) -> list[str]:
    """The version is whole: each accepted file under output/, holding the sha256 its task recorded."""
    expected = {"frozen_model.pb": run.frozen["frozen_model_sha256"],
                "frozen_model.json": run.frozen["frozen_model_json_sha256"],
                "report.json": run.report["report_sha256"], "confusion_matrix.png": run.report["confusion_png_sha256"]}
    for name, fmt in run.edge["formats"].items():
        if run.report["formats"][name]["accepted"]:
            expected.update({f"edge/{file}": entry["sha256"] for file, entry in fmt["files"].items()})
    prefix = split_s3_uri(run.plan["version_prefix"])[1]
    return [f"version file {name} is missing or differs" for name, sha256 in expected.items()
            if store.sha256(prefix + name) != sha256]


# -- the operations ---------------------------------------------------------------------

def operations(endpoint: str) -> list[Operation]:
    def clients() -> dict[str, Any]:
        return {"s3": _s3(endpoint)}

    def fresh_bucket(s3) -> str:
        bucket = f"crash-{next(_buckets)}"
        s3.create_bucket(Bucket=bucket)
        return bucket

    def upload_op(after_publish: bool) -> Operation:
        def prepare(c):
            s3 = c["s3"]
            bucket = fresh_bucket(s3)
            champion = candidate(s3, bucket, 0)
            published(s3, champion, accuracy=0.5)
            run = candidate(s3, bucket, 7)
            if after_publish:  # cleared after its run published: the version is referenced
                published(s3, run)
            named = run.job if after_publish else champion.job
            return bucket, {"run": run, "published_before": published_files(s3, run), "named": named}

        def check(store, state, rerun):
            run = state["run"]
            problems = pointer_problems(store, run.plan, (state["named"],), state["named"], rerun,
                                        state["published_before"])
            return problems + (version_problems(store, run) if rerun else [])

        return Operation(f"upload_frozen_model{' (version already published)' if after_publish else ''}",
                         clients, prepare, lambda c, state: upload(c["s3"], state["run"]), check,
                         must_call="s3.HeadObject" if after_publish else "s3.CopyObject")

    def publish_op(replacement: bool, mirror: bool) -> Operation:
        def prepare(c):
            s3 = c["s3"]
            bucket = fresh_bucket(s3)
            old = None
            if replacement:
                old = candidate(s3, bucket, 0, mirror)
                published(s3, old, accuracy=0.5)
            run = candidate(s3, bucket, 7, mirror)
            run.report = {**run.report, "champion": champion_of(s3, run)}
            version = upload(s3, run)
            return bucket, {"run": run, "version": version, "published_before": published_files(s3, run),
                            "allowed": (old.job if old else None, run.job)}

        def check(store, state, rerun):
            run = state["run"]
            return pointer_problems(store, run.plan, state["allowed"], run.job, rerun, state["published_before"])

        kind = "replacing a published model" if replacement else "first publish"
        return Operation(f"publish ({kind}, {'with' if mirror else 'without'} the mirror)", clients, prepare,
                         lambda c, state: publish(c["s3"], state["run"], state["version"]), check,
                         must_call="s3.PutObject")

    def rollback_op() -> Operation:
        def prepare(c):
            s3 = c["s3"]
            bucket = fresh_bucket(s3)
            first, second = candidate(s3, bucket, 0), candidate(s3, bucket, 7)
            published(s3, first, accuracy=0.5)
            published(s3, second)
            return bucket, {"run": second, "first": first.job, "published_before": published_files(s3, second)}

        def check(store, state, rerun):
            run = state["run"]
            return pointer_problems(store, run.plan, (state["first"], run.job), state["first"], rerun,
                                    state["published_before"])

        return Operation("rollback", clients, prepare,
                         lambda c, state: rollback(c["s3"], state["run"].plan["bucket"], to_job=state["first"],
                                                   log=lambda line: None), check, must_call="s3.PutObject")

    def data_version_op(kind: str) -> Operation:
        def prepare(c):
            s3 = c["s3"]
            bucket = fresh_bucket(s3)
            archive = f"s3://{bucket}/headpose/incoming/a.tar.gz"
            _put(s3, archive, b"archive")
            plan = plan_run({"s3_bucket": bucket, "backend": "local", "dataset_source": "prima",
                             "prima_archive_uri": archive}, FIRST_RUN, region="us-east-1", dag_id="headpose_retraining",
                            run_id="scheduled", environ={}, run_type="scheduled")
            version = data_versions.identify(s3, plan)
            uri = data_versions.record_uri(bucket, "headpose", version["id"])
            if kind != "first claim":  # a run that failed (takeover), or this run's own claim (settle)
                claim(s3, plan, version, "run-old" if kind == "takeover" else "run-new")
            if kind == "settle":
                _put(s3, f"s3://{bucket}/headpose/published/history/{plan['training_job_name']}.json", b"{}")
            return bucket, {"plan": plan, "version": version, "uri": uri}

        def claim(s3, plan, version, run_id):
            return data_versions.claim(s3, plan, version, dag_id="headpose_retraining", run_id=run_id,
                                       run_state=lambda dag, run: "running" if run == "run-new" else "failed",
                                       lease=timedelta(hours=1))

        def run(c, state):
            if kind == "settle":
                outcome = data_versions.outcome_of(c["s3"], state["plan"]["bucket"], "headpose",
                                                   [state["plan"]["training_job_name"]])
                return data_versions.settle(c["s3"], state["uri"], "run-new", outcome)
            return claim(c["s3"], state["plan"], state["version"], "run-new")

        def check(store, state, rerun):
            try:
                record, _ = data_versions.read_record(store.s3, state["uri"])
            except data_versions.DataVersionError as error:
                return [str(error)]
            holders = {"first claim": (None, "run-new"), "takeover": ("run-old", "run-new"), "settle": ("run-new",)}
            holder = record["run_id"] if record else None
            if holder not in holders[kind]:
                return [f"the record names {holder}, neither of {holders[kind]}"]
            if not rerun:
                return []
            wanted = "published" if kind == "settle" else "claimed"
            if holder != "run-new" or record["status"] != wanted:
                return [f"after the re-run the record is {holder}'s, {record['status']}; wanted run-new's, {wanted}"]
            other = data_versions.claim(store.s3, state["plan"], state["version"], dag_id="headpose_retraining",
                                        run_id="run-other", run_state=lambda dag, run: "running",
                                        lease=timedelta(hours=1))
            return [] if not other.train else [f"a second run was let train the version: {other.reason}"]

        return Operation(f"data-version record ({kind})", clients, prepare, run, check, must_call="s3.PutObject")

    return [upload_op(False), upload_op(True), *(publish_op(r, m) for r in (False, True) for m in (True, False)),
            rollback_op(), *(data_version_op(k) for k in ("first claim", "takeover", "settle"))]


OPERATION_NAMES = [op.name for op in operations("http://127.0.0.1:9")]


@pytest.mark.parametrize("name", OPERATION_NAMES)
def test_every_crash_point_leaves_a_consistent_published_model(name, s3_endpoint):
    operation = next(op for op in operations(s3_endpoint) if op.name == name)
    report = enumerate_crash_points(operation)
    _rows[name] = report.row()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "crash-points.md").write_text(table(_rows[n] for n in OPERATION_NAMES if n in _rows) + "\n")
    assert report.inconsistent == [], "\n".join(report.inconsistent[:20])
