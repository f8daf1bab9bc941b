"""Crash points of the channels: publishing to the canary, bootstrapping the channels, a rollout's
promote and rollback - every S3 call failed in turn (``crash_points.enumerate_crash_points``).

After each step, besides test_crash_points' rules for what is published:

* ``canary.json``, ``stable.json`` and ``latest.json`` each name the old or the new version
  (or, where the operation creates it, nothing yet);
* every file a pointer names exists with its sha256, and the history has its record;
* what the operation must not touch keeps its keys and ETags (a canary move leaves
  ``stable.json``, ``latest.json`` and the mirror alone; a promote leaves the canary);
* after the re-run: the operation's target on its channel, ``latest.json`` = stable, the
  mirror = ``latest.json``, and the decision record present.
"""
from __future__ import annotations

import itertools
from typing import Any

import pytest

from crash_points import Operation, Store, enumerate_crash_points, table
from fleet_support import ROLLOUT, channel_candidate, publish_to_canary
from headpose.fleet.rollout import apply
from headpose.planning.layout import split_s3_uri
from headpose.registry import channels
from headpose.registry import pointer as pointers
from support import ROOT
from test_crash_points import _s3, mirror_problems, published, published_files, upload, publish

ARTIFACTS = ROOT / "test-artifacts"
_buckets = itertools.count()
_rows: dict[str, dict] = {}
POINTERS = ("canary", "stable", "latest")


def pointer_problems(store: Store, bucket: str, state: dict[str, Any], rerun: bool) -> list[str]:
    """Each pointer names an allowed version whose files and record are there; the untouched are untouched."""
    uris = channels.channel_uris(bucket, "headpose")
    problems, records = [], {}
    for name in POINTERS:
        record, _ = pointers.read_pointer(store.s3, uris[name])
        records[name] = record
        named = (record or {}).get("training_job_name")
        if rerun and named != state["final"][name]:
            problems.append(f"{name} names {named}, the re-run should have left {state['final'][name]}")
        elif named not in state["allowed"][name]:
            problems.append(f"{name} names {named}, none of {state['allowed'][name]}")
        if record is None:
            continue
        for entry in pointers.mirror_files(record).values():
            if store.sha256(split_s3_uri(entry["uri"])[1]) != entry["sha256"]:
                problems.append(f"{name} names {entry['uri']}, which does not hold sha256 {entry['sha256']}")
        if f"headpose/published/history/{named}.json" not in store.keys:
            problems.append(f"{name} names {named}, which has no history record")
    problems += [f"{key} was overwritten or is gone" for key, sha256 in state["published_before"].items()
                 if store.sha256(key) != sha256]
    problems += [f"{key} changed, which this operation must not touch" for key, etag in state["untouched"].items()
                 if store.keys.get(key) != etag]
    if rerun:
        if records["stable"] and not channels.same_version(records["stable"], records["latest"]):
            problems.append("after the re-run latest.json is not the stable channel's version")
        if records["latest"] and not state.get("no_mirror"):
            problems += mirror_problems(store, state["plan"], records["latest"])
        if f"headpose/published/rollouts/{state['decision_id']}.json" not in store.keys:
            problems.append(f"no decision record {state['decision_id']}")
    return problems


def _untouched(s3, bucket: str, what: tuple[str, ...]) -> dict[str, str]:
    keys = {"stable": "headpose/published/channels/stable.json", "latest": "headpose/published/latest.json",
            "canary": "headpose/published/channels/canary.json"}
    listed = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="headpose/published/"):
        listed.update({obj["Key"]: obj["ETag"] for obj in page.get("Contents", [])})
    found = {keys[name]: listed[keys[name]] for name in what if name in keys and keys[name] in listed}
    if "mirror" in what:
        found.update({key: etag for key, etag in listed.items() if key.startswith("headpose/published/latest/")})
    return found


def operations(endpoint: str) -> list[Operation]:
    def clients() -> dict[str, Any]:
        return {"s3": _s3(endpoint)}

    def fresh_bucket(s3) -> str:
        bucket = f"crash-channels-{next(_buckets)}"
        s3.create_bucket(Bucket=bucket)
        return bucket

    def publish_op(start: str) -> Operation:
        def prepare(c):
            s3 = c["s3"]
            bucket = fresh_bucket(s3)
            stable = pending = None
            if start in ("latest", "pending"):
                stable = channel_candidate(s3, bucket, 0, rollout=None)
                published(s3, stable, accuracy=0.5)  # latest.json (and its mirror), no channels yet
            if start == "pending":
                pending = channel_candidate(s3, bucket, 3)
                publish_to_canary(s3, pending)  # the channels exist; a canary waits for its devices
            run = channel_candidate(s3, bucket, 7)
            run.report = {**run.report, "champion": _champion(s3, run)}
            version = upload(s3, run)
            old = stable.job if stable else None
            allowed = {"canary": (pending.job if pending else old, run.job), "stable": (old,), "latest": (old,)}
            if start == "latest":
                allowed["canary"] = (None, old, run.job)
                allowed["stable"] = (None, old)
            return bucket, {"run": run, "version": version, "plan": run.plan, "allowed": allowed,
                            "final": {"canary": run.job, "stable": old, "latest": old},
                            "published_before": published_files(s3, run), "decision_id": f"publish-{run.job}",
                            "untouched": _untouched(s3, bucket, ("latest", "mirror") + (("stable",) if pending else ()))}

        names = {"first": "first canary", "latest": "channels bootstrapped from latest.json",
                 "pending": "replacing a pending canary"}
        return Operation(f"publish with a rollout ({names[start]})", clients, prepare,
                         lambda c, state: publish(c["s3"], state["run"], state["version"]),
                         lambda store, state, rerun: pointer_problems(store, state["plan"]["bucket"], state, rerun),
                         must_call="s3.PutObject")

    def rollout_op(action: str) -> Operation:
        def prepare(c):
            s3 = c["s3"]
            bucket = fresh_bucket(s3)
            stable = channel_candidate(s3, bucket, 0)
            publish_to_canary(s3, stable)
            first = channels.decision_record("first", "promote", "first", at="2025-03-01T00:00:00+00:00", by="t",
                                             canary=channels.read_channels(s3, bucket)["canary"], stable=None,
                                             rollout=ROLLOUT)
            apply(s3, bucket, "headpose", first)
            canary = channel_candidate(s3, bucket, 7)
            publish_to_canary(s3, canary)
            state = channels.read_channels(s3, bucket)
            decision = channels.decision_record(
                f"scheduled__2025-03-09T00-00-00-{action}", action, f"{action} (recorded assessment)",
                at="2025-03-09T00:00:00+00:00", by="headpose_rollout", canary=state["canary"], stable=state["stable"],
                rollout=ROLLOUT, figures={"canaries": 2, "soaked": 2}, dag_run={"dag_id": "headpose_rollout",
                                                                             "run_id": "scheduled__2025-03-09"})
            jobs = (stable.job, canary.job)
            if action == "promote":
                allowed = {"canary": (canary.job,), "stable": jobs, "latest": jobs}
                final = {"canary": canary.job, "stable": canary.job, "latest": canary.job}
                untouched = _untouched(s3, bucket, ("canary",))
            else:
                allowed = {"canary": jobs, "stable": (stable.job,), "latest": (stable.job,)}
                final = {"canary": stable.job, "stable": stable.job, "latest": stable.job}
                untouched = _untouched(s3, bucket, ("stable", "latest", "mirror"))
            return bucket, {"decision": decision, "plan": canary.plan, "allowed": allowed, "final": final,
                            "published_before": published_files(s3, canary), "decision_id": decision["id"],
                            "untouched": untouched}

        return Operation(f"rollout {action}", clients, prepare,
                         lambda c, state: apply(c["s3"], state["plan"]["bucket"], "headpose", state["decision"]),
                         lambda store, state, rerun: pointer_problems(store, state["plan"]["bucket"], state, rerun),
                         must_call="s3.PutObject")

    return [publish_op("first"), publish_op("latest"), publish_op("pending"),
            rollout_op("promote"), rollout_op("rollback")]


def _champion(s3, run) -> dict[str, Any]:
    from fleet_support import champion_on_channels

    return champion_on_channels(s3, run)


OPERATION_NAMES = [op.name for op in operations("http://127.0.0.1:9")]


@pytest.mark.parametrize("name", OPERATION_NAMES)
def test_every_crash_point_of_a_channel_move_leaves_consistent_channels(name, s3_endpoint):
    operation = next(op for op in operations(s3_endpoint) if op.name == name)
    report = enumerate_crash_points(operation)
    _rows[name] = report.row()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "crash-points-channels.md").write_text(table(_rows[n] for n in OPERATION_NAMES if n in _rows) + "\n")
    assert report.inconsistent == [], "\n".join(report.inconsistent[:20])
