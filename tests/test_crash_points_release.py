"""Crash points of release governance: the approval record and SageMaker's Model Registry, every call failed in turn.

The operations of ``approve_release`` (the version waits in the Model Registry), ``publish``
after an approval (the pointer, then the Model Registry), ``record_release`` after a
rejection (the answer kept with the version's evidence, the package rejected) and a rollback
(the pointer, then the Model Registry) run under ``crash_points.enumerate_crash_points``:
each S3 and SageMaker call fails in each of four ways, and the operation runs again as a
cleared task would. moto's SageMaker cannot be snapshotted, so each scenario starts from a
fresh model package group that ``reset`` fills with the packages the starting state has
(a few calls); the bucket is restored from its snapshot as for the other operations.

After each step, besides the pointer invariants of ``test_crash_points``:

* a version has at most one package, and after the re-run exactly one;
* a package turns ``Approved`` only once the pointer names its version (the Model Registry
  is written after the pointer: it may lag it, never lead it);
* after the re-run the Model Registry agrees with the pointer - the version it names
  ``Approved``, one refused or rolled back from ``Rejected`` - and a refusal is in the
  version's ``approval.json`` exactly once.
"""
from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from crash_points import Operation, Store, enumerate_crash_points, table
from headpose.planning.layout import split_s3_uri
from headpose.registry import pointer as pointers
from headpose.registry.approval import APPROVE_OPTION, REJECT_OPTION, answer
from headpose.registry.model_packages import APPROVED, PENDING, sync_package
from headpose.registry.promotion import draft_record, publish_run
from headpose.registry.release import prepare_request, record_release
from headpose.registry.rollback import rollback
from release_support import answered, governed_candidate, model_registry, sagemaker
from support import ROOT
from test_crash_points import _s3, champion_of, pointer_problems, published, published_files, upload

ARTIFACTS = ROOT / "test-artifacts"
REQUIRED = {"release_approval": "required", "publish_latest_mirror": False}
_buckets, _groups = itertools.count(), itertools.count()
_rows: dict[str, dict] = {}


def statuses(client: Any, group: str) -> list[tuple[str, str]]:
    """``(version prefix, status)`` of every package of ``group``, duplicates included."""
    try:
        listed = client.list_model_packages(ModelPackageGroupName=group)["ModelPackageSummaryList"]
    except client.exceptions.ClientError:
        return []
    return [(p["ModelPackageDescription"], p["ModelApprovalStatus"]) for p in listed]


def registry_problems(client: Any, state: dict, named: str | None, rerun: bool) -> list[str]:
    """One package per version; Approved only for the version the pointer names; after the re-run, ``final``."""
    found = statuses(client, state["group"])
    problems = [f"{prefix} has {n} packages" for prefix in {p for p, _ in found}
                if (n := sum(1 for p, _ in found if p == prefix)) > 1]
    by_version = dict(found)
    for prefix, status in by_version.items():
        if status == APPROVED and not prefix.endswith(f"/{named}/output/") and prefix not in state["approved_before"]:
            problems.append(f"{prefix} is Approved while latest.json names {named}")
    if rerun:
        for prefix, status in state["final"].items():
            if by_version.get(prefix) != status:
                problems.append(f"after the re-run {prefix} is {by_version.get(prefix)}, not {status}")
    return problems


def operations(endpoint: str) -> list[Operation]:
    def clients() -> dict[str, Any]:
        return {"s3": _s3(endpoint), "sagemaker": sagemaker(endpoint)}

    def registry(c: dict, state: dict):
        return model_registry(endpoint, state["group"], c["sagemaker"])

    def fresh_group(c: dict, state: dict, packages: list[tuple[dict, str]]) -> None:
        state["group"] = f"crash-{next(_groups)}"
        state["approved_before"] = set()
        for record, status in packages:
            sync_package(registry(c, state), record, status, "the starting state")
            if status == APPROVED:
                state["approved_before"].add(record["files"]["frozen_model.pb"]["uri"].rsplit("/", 1)[0] + "/")

    def starting(c: dict, profile: dict, accuracy: float = 0.9) -> tuple[str, dict]:
        """A bucket with a published champion and the next run's candidate uploaded."""
        s3 = c["s3"]
        bucket = f"crash-release-{next(_buckets)}"
        s3.create_bucket(Bucket=bucket)
        champion = governed_candidate(s3, bucket, 0, profile)
        published(s3, champion, accuracy=0.5)
        run = governed_candidate(s3, bucket, 7, profile, accuracy=accuracy)
        run.report["champion"] = champion_of(s3, run)
        version = upload(s3, run)
        return bucket, {"run": run, "version": version, "champion": champion.job,
                        "published_before": published_files(s3, run),
                        "draft": draft_record(run.plan, run.training, run.dataset, run.report, version)}

    def pointer_named(store: Store, state: dict) -> str | None:
        record, _ = pointers.read_pointer(store.s3, state["run"].plan["published_pointer_uri"])
        return record["training_job_name"] if record else None

    def request_op() -> Operation:
        def prepare(c):
            bucket, state = starting(c, REQUIRED)
            state["final"] = {state["run"].plan["version_prefix"]: PENDING}
            return bucket, state

        def run(c, state):
            r = state["run"]
            prepare_request(c["s3"], r.plan, r.training, r.dataset, r.report, state["version"], {}, registry(c, state))

        def check(store, state, rerun):
            keep = (state["champion"],)
            return (pointer_problems(store, state["run"].plan, keep, state["champion"], rerun, state["published_before"])
                    + registry_problems(store_sagemaker, state, pointer_named(store, state), rerun))

        return Operation("approve_release (the version waits in the Model Registry)", clients, prepare, run, check,
                         must_call="sagemaker.CreateModelPackage", reset=lambda c, s: fresh_group(c, s, []))

    def publish_op() -> Operation:
        def prepare(c):
            bucket, state = starting(c, REQUIRED)
            state["approval"] = answer(answered(APPROVE_OPTION), asked_at="t0", timeout="3d", link=None)
            state["final"] = {state["run"].plan["version_prefix"]: APPROVED}
            return bucket, state

        def run(c, state):
            r = state["run"]
            publish_run(c["s3"], r.plan, r.training, r.dataset, r.report, state["version"], dag_id="d",
                        run_id="crash-points", approval=state["approval"], model_registry=registry(c, state))

        def check(store, state, rerun):
            r = state["run"]
            return (pointer_problems(store, r.plan, (state["champion"], r.job), r.job, rerun, state["published_before"])
                    + registry_problems(store_sagemaker, state, pointer_named(store, state), rerun))

        return Operation("publish after an approval (pointer, then the Model Registry)", clients, prepare, run, check,
                         must_call="sagemaker.UpdateModelPackage",
                         reset=lambda c, s: fresh_group(c, s, [(s["draft"], PENDING)]))

    def refusal_op() -> Operation:
        def prepare(c):
            bucket, state = starting(c, REQUIRED)
            state["approval"] = answer(answered(REJECT_OPTION, "alice", "no"), asked_at="t0", timeout="3d", link=None)
            state["final"] = {state["run"].plan["version_prefix"]: "Rejected"}
            return bucket, state

        def run(c, state):
            r = state["run"]
            record_release(c["s3"], r.plan, r.training, r.dataset, r.report, state["version"], state["approval"],
                           registry(c, state), log=lambda line: None)

        def check(store, state, rerun):
            r = state["run"]
            problems = (pointer_problems(store, r.plan, (state["champion"],), state["champion"], rerun,
                                         state["published_before"])
                        + registry_problems(store_sagemaker, state, pointer_named(store, state), rerun))
            key = split_s3_uri(r.plan["version_prefix"])[1] + "approval.json"
            answers = json.loads(store.s3.get_object(Bucket=store.bucket, Key=key)["Body"].read())["answers"] \
                if key in store.keys else []
            if len(answers) > 1 or (rerun and len(answers) != 1):
                problems.append(f"approval.json holds {len(answers)} answers")
            return problems

        return Operation("record_release after a rejection (evidence, then the Model Registry)", clients, prepare,
                         run, check, must_call="sagemaker.UpdateModelPackage",
                         reset=lambda c, s: fresh_group(c, s, [(s["draft"], PENDING)]))

    def rollback_op() -> Operation:
        def prepare(c):
            s3 = c["s3"]
            bucket, state = starting(c, {"publish_latest_mirror": False})
            r = state["run"]
            publish_run(s3, r.plan, r.training, r.dataset, r.report, state["version"], dag_id="d", run_id="r")
            history = {job: json.loads(s3.get_object(Bucket=bucket, Key=f"headpose/published/history/{job}.json")
                                       ["Body"].read()) for job in (state["champion"], r.job)}
            state.update(history=history, published_before=published_files(s3, r), final={
                r.plan["version_prefix"]: "Rejected",
                r.plan["version_prefix"].replace(r.job, state["champion"]): APPROVED})
            return bucket, state

        def run(c, state):
            rollback(c["s3"], state["run"].plan["bucket"], to_job=state["champion"], log=lambda line: None,
                     mirror=False, model_registry=registry(c, state))

        def check(store, state, rerun):
            r = state["run"]
            return (pointer_problems(store, r.plan, (state["champion"], r.job), state["champion"], rerun,
                                     state["published_before"])
                    + registry_problems(store_sagemaker, state, pointer_named(store, state), rerun))

        return Operation("rollback (pointer, then the Model Registry)", clients, prepare, run, check,
                         must_call="sagemaker.UpdateModelPackage",
                         reset=lambda c, s: fresh_group(c, s, [(record, APPROVED) for record in s["history"].values()]))

    store_sagemaker = sagemaker(endpoint)
    return [request_op(), publish_op(), refusal_op(), rollback_op()]


OPERATION_NAMES = [op.name for op in operations("http://127.0.0.1:9")]


@pytest.mark.parametrize("name", OPERATION_NAMES)
def test_every_crash_point_leaves_the_pointer_and_the_model_registry_in_line(name, s3_endpoint):
    operation = next(op for op in operations(s3_endpoint) if op.name == name)
    report = enumerate_crash_points(operation)
    _rows[name] = report.row()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "crash-points-release.md").write_text(
        table(_rows[n] for n in OPERATION_NAMES if n in _rows) + "\n")
    assert report.inconsistent == [], "\n".join(report.inconsistent[:20])
