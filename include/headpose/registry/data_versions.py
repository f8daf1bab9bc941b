"""Data-version records: a data version is trained once, whoever starts the run.

``s3://<bucket>/<folder>/data-versions/<id>.json`` is created by ``claim_data_version``
before anything is staged or trained, with ``If-None-Match: *``: of two runs that start
on the same version together, one creates it and trains, the other reads it and trains
nothing. ``record_data_version`` (the run's teardown, whatever happened) settles it with
what the run made of the version; people read it to see what was trained on what::

    claimed        a run is training it (``run_id``, ``expires_at``)
    published      trained, accepted and published             \\
    not published  trained and accepted; the champion stayed    > trained: not trained again
    refused        trained and refused by validate_model       /  unless a trigger says force_retrain
    failed         the run ended before a model was judged: the next run may take it

A claim is never a lock that outlives its run: a run finding another's claim asks
Airflow for that run's state, and only a queued or running run holds it; a claim whose
run Airflow does not know (another deployment's) holds until ``expires_at`` (its claim
time plus the DAG's ``dagrun_timeout``, which no run outlives). A claim whose run ended
without settling it (its teardown died) is settled from what the run left in S3 - a
published record, a report - before it is judged. Every write is conditional on the
record read (``If-Match``), so a takeover races no one silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping

from headpose.planning.data_version import data_version_id, synthetic_sha256
from headpose.planning.layout import s3_uri, split_s3_uri
from headpose.registry.pointer import (
    is_conditional_conflict, is_missing_key, is_precondition_failed, now_iso, put_json, sha256_of_object,
)

RECORD_VERSION = 1
TRAINED = ("published", "not published", "refused")
ACTIVE_RUN_STATES = ("queued", "running")
CLAIM_TRIES = 5
RunState = Callable[[str, str], "str | None"]  # (dag_id, run_id) -> Airflow's state, None if unknown


class DataVersionError(RuntimeError):
    """The run's data cannot be identified (its upload is gone); the message says which."""


@dataclass(frozen=True)
class Decision:
    train: bool
    reason: str
    record: dict[str, Any]
    uri: str


def record_uri(bucket: str, folder: str, version_id: str) -> str:
    return s3_uri(bucket, folder, "data-versions", f"{version_id}.json")


def identify(s3_client: Any, plan: Mapping[str, Any]) -> dict[str, Any]:
    """``{"id", "kind", "source_uri", "sha256", "settings"}`` of the run's data (reads the source once)."""
    planned = plan["data_version"]
    if planned["kind"] == "synthetic":
        sha256 = synthetic_sha256(planned["settings"])
    else:
        try:
            sha256 = sha256_of_object(s3_client, planned["source_uri"])
        except Exception as error:
            if is_missing_key(error):
                raise DataVersionError(f"{planned['source_uri']} does not exist (removed since it was uploaded?)") from None
            raise
    return {"id": data_version_id(planned["kind"], sha256, planned["settings"]), "kind": planned["kind"],
            "source_uri": planned["source_uri"], "sha256": sha256, "settings": planned["settings"]}


def claim(
    s3_client: Any, plan: Mapping[str, Any], version: Mapping[str, Any], *, dag_id: str, run_id: str,
    run_state: RunState, lease: timedelta, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> Decision:
    """Claim ``version`` for this run, or say why it must not train (a ``Decision``)."""
    uri = record_uri(plan["bucket"], plan["folder"], version["id"])
    force = plan["data_version"]["force_retrain"]
    for _ in range(CLAIM_TRIES):
        record, etag = read_record(s3_client, uri)
        mine = _claimed(plan, version, dag_id, run_id, now() + lease, record)
        if record is None:
            if _put(s3_client, uri, mine, IfNoneMatch="*"):
                return Decision(True, f"claimed data version {version['id']}", mine, uri)
            continue
        if record.get("run_id") == run_id:  # a cleared or retried task of the claiming run
            if record["status"] == "claimed" or _put(s3_client, uri, {**record, "status": "claimed"}, IfMatch=etag):
                return Decision(True, f"data version {version['id']} is this run's claim", record, uri)
            continue
        if record["status"] == "claimed":
            if _holds(record, run_state, now()):
                return Decision(False, f"run {record['run_id']} is training data version {version['id']} now "
                                f"(claimed {record['claimed_at']})", record, uri)
            # Its run ended without settling it (its teardown died): settle it from what the run left.
            outcome = outcome_of(s3_client, plan["bucket"], plan["folder"], [record["training_job_name"]],
                                 every_attempt=True)
            settled = {**record, **outcome, "settled_at": now_iso(), "settled_by": run_id}
            if not _put(s3_client, uri, settled, IfMatch=etag) or settled["status"] not in TRAINED or force:
                continue  # read again: then taken over, or judged as settled
            record = settled
        if record["status"] in TRAINED and not force:
            return Decision(False, f"data version {version['id']} was trained by run {record['run_id']} "
                            f"({record['status']}, job {record['training_job_name']}); force_retrain=true trains "
                            "it again", record, uri)
        # Failed before a model was judged, or forced: this run takes it over.
        if _put(s3_client, uri, mine, IfMatch=etag):
            why = "forced (force_retrain)" if record["status"] in TRAINED else f"run {record['run_id']} ended {record['status']}"
            return Decision(True, f"claimed data version {version['id']} ({why})", mine, uri)
    raise DataVersionError(f"{uri} kept changing while this run claimed it ({CLAIM_TRIES} tries)")


def settle(s3_client: Any, uri: str, run_id: str, outcome: Mapping[str, Any]) -> dict[str, Any] | None:
    """Write this run's outcome into its claim; None when the record is not (or no longer) this run's."""
    for _ in range(CLAIM_TRIES):
        record, etag = read_record(s3_client, uri)
        if record is None or record.get("run_id") != run_id:
            return None
        settled = {**record, **outcome}
        if settled == record or _put(s3_client, uri, settled, IfMatch=etag):
            return settled
    raise DataVersionError(f"{uri} kept changing while this run settled it ({CLAIM_TRIES} tries)")


def outcome_of(s3_client: Any, bucket: str, folder: str, jobs: list[str], every_attempt: bool = False) -> dict[str, Any]:
    """What the run's training jobs left in S3: ``{"status", "attempts"}`` (the module's table).

    ``every_attempt``: also the jobs ``<job>-N`` after each (a run whose attempts are unknown).
    One request per place a job leaves evidence, newest evidence first; no listing of a
    job's files (spot checkpoints can be thousands).
    """
    attempts = list(jobs)
    if every_attempt:
        attempts = sorted({*jobs, *(name for job in jobs for name in _job_folders(s3_client, bucket, folder, job))})
    evidence = (("published", "{folder}/published/history/{job}.json"),
                ("not published", "{folder}/TFartifacts/{job}/output/report.json"),
                ("not published", "{folder}/TFartifacts/{job}/candidate/report.json"),
                ("refused", "{folder}/TFartifacts/{job}/rejected/report.json"))
    for status, template in evidence:
        if any(_exists(s3_client, bucket, template.format(folder=folder, job=job)) for job in attempts):
            return {"status": status, "attempts": attempts}
    return {"status": "failed", "attempts": attempts}


def _job_folders(s3_client: Any, bucket: str, folder: str, job: str) -> list[str]:
    """``<job>-N`` folders beside ``<job>``'s under ``TFartifacts/`` (later attempts of the run)."""
    base = f"{folder}/TFartifacts/"
    found = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base + job, Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            name = common["Prefix"][len(base):].rstrip("/")
            if re.fullmatch(re.escape(job) + r"-[0-9]+", name):
                found.append(name)
    return found


def _exists(s3_client: Any, bucket: str, key: str) -> bool:
    try:
        s3_client.head_object(Bucket=bucket, Key=key)
        return True
    except Exception as error:
        if is_missing_key(error):
            return False
        raise


def read_record(s3_client: Any, uri: str) -> tuple[dict[str, Any] | None, str | None]:
    import json

    bucket, key = split_s3_uri(uri)
    try:
        response = s3_client.get_object(Bucket=bucket, Key=key)
    except Exception as error:
        if is_missing_key(error):
            return None, None
        raise
    try:
        record = json.loads(response["Body"].read())
    except ValueError as error:
        raise DataVersionError(f"{uri} is not JSON ({error}); remove it to let the next run claim the version") from None
    return record, response["ETag"]


def _claimed(plan: Mapping[str, Any], version: Mapping[str, Any], dag_id: str, run_id: str, expires: datetime,
             earlier: Mapping[str, Any] | None) -> dict[str, Any]:
    record = {
        "version": RECORD_VERSION, **version, "status": "claimed", "dag_id": dag_id, "run_id": run_id,
        "training_job_name": plan["training_job_name"], "started_by": plan.get("started_by"),
        "claimed_at": now_iso(), "expires_at": expires.isoformat(), "forced": bool(plan["data_version"]["force_retrain"]),
        "new_data": plan.get("new_data"),
    }
    if earlier:
        past = [*earlier.get("earlier", []), {k: earlier.get(k) for k in ("run_id", "status", "training_job_name",
                                                                          "claimed_at", "settled_at")}]
        record["earlier"] = past
    return record


def _holds(record: Mapping[str, Any], run_state: RunState, now: datetime) -> bool:
    state = run_state(record["dag_id"], record["run_id"])
    if state is not None:
        return state in ACTIVE_RUN_STATES
    return now < datetime.fromisoformat(record["expires_at"])


def _put(s3_client: Any, uri: str, record: Mapping[str, Any], **condition: str) -> bool:
    """Whether the conditional write went through (False: the record changed meanwhile)."""
    try:
        put_json(s3_client, uri, record, **condition)
        return True
    except Exception as error:
        if is_precondition_failed(error) or is_conditional_conflict(error) or is_missing_key(error):
            return False
        raise
