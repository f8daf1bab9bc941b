"""Versions published through the channels, and device reports, for the fleet tests and crash points.

The runs are test_crash_points' candidates (their files in moto's S3, the XComs naming
them) planned by the real ``plan_run`` with a ``rollout`` in the profile; reports are
built as ``edge.reporting.status_record`` writes them.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from headpose.planning.plan import plan_run
from headpose.registry import channels
from headpose.registry.pointer import read_pointer
from test_crash_points import FIRST_RUN, Run, candidate, publish, upload

ROLLOUT = {"canary_devices": ["cam-1", "cam-2"], "min_canaries": 2, "soak_minutes": 0.05, "max_error_rate": 0.01,
           "max_p95_latency_ratio": 1.5}


def rollout_plan(bucket: str, day: int, rollout: dict | None = ROLLOUT, mirror: bool = True) -> dict[str, Any]:
    """A run's plan with ``rollout`` in the deployment profile (None: no channels)."""
    when = FIRST_RUN + timedelta(days=day)
    profile: dict[str, Any] = {"publish_latest_mirror": mirror}
    if rollout:
        profile["rollout"] = rollout
    return plan_run({"s3_bucket": bucket, "backend": "local"}, when, region="us-east-1",
                    dag_id="headpose_retraining", run_id=f"scheduled__{when.isoformat()}",
                    environ={"HEADPOSE_RUN_DEFAULTS": json.dumps(profile)})


def channel_candidate(s3, bucket: str, day: int, rollout: dict | None = ROLLOUT, mirror: bool = True) -> Run:
    return candidate(s3, bucket, day, plan=rollout_plan(bucket, day, rollout, mirror))


def champion_on_channels(s3, run: Run) -> dict[str, Any]:
    """What validate_model records of the champion: the stable channel's model, else latest.json's."""
    record, etag = read_pointer(s3, run.plan["champion_pointer_uri"])
    if record is None:
        record, etag = read_pointer(s3, run.plan["published_pointer_uri"])
    if record is None:
        return {"present": False}
    return {"present": True, "training_job_name": record["training_job_name"], "accuracy": 0.5,
            "pointer_etag": etag, "comparable": True,
            "frozen_model_sha256": record["files"]["frozen_model.pb"]["sha256"]}


def publish_to_canary(s3, run: Run, accuracy: float = 0.9) -> dict[str, Any]:
    """Compare with the champion, upload the version, publish (the canary, with a rollout); the version."""
    run.report = {**run.report, "accuracy": accuracy, "champion": champion_on_channels(s3, run)}
    version = upload(s3, run)
    publish(s3, run, version)
    return version


def device_report(
    device_id: str, channel: str, record: dict | None, *, at: datetime, since: datetime | None = None,
    fmt: str = "onnx", inferences: int = 20, errors: int = 0, p95: float | None = 5.0,
    load_failures: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A report as ``edge.reporting.status_record`` writes it, running ``record``'s ``fmt``."""
    since = since or at - timedelta(minutes=10)
    running = None if record is None else {
        "training_job_name": record["training_job_name"], "format": fmt,
        "sha256": record["formats"][fmt]["sha256"],
        "since": since.isoformat()}
    tally = {"since": since.isoformat(), "inferences": inferences, "errors": errors,
             "latency_ms": {"p50": None if p95 is None else p95 / 2, "p95": p95},
             "classes": {"4": inferences - errors} if inferences > errors else {}}
    return {"report_version": 1, "device_id": device_id, "at": at.isoformat(), "channel": channel,
            "pointer": f"s3://b/headpose/published/channels/{channel}.json", "running": running,
            "verified": running is not None, "last_event": "unchanged", "last_error": None,
            "window": dict(tally), "version": dict(tally), "load_failures": dict(load_failures or {}),
            "client": {"version": "headpose-edge 1", "runtime": "onnxruntime 1.20.0"}}


def put_report(s3, bucket: str, device_id: str, report: dict | bytes, folder: str = "headpose") -> None:
    body = report if isinstance(report, bytes) else json.dumps(report).encode()
    s3.put_object(Bucket=bucket, Key=f"{folder}/devices/{device_id}/status.json", Body=body)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def channel_jobs(s3, bucket: str) -> dict[str, str | None]:
    """``{"canary", "stable", "latest"}``: the training job each pointer names (None: absent)."""
    uris = channels.channel_uris(bucket, "headpose")
    return {name: (read_pointer(s3, uri)[0] or {}).get("training_job_name") for name, uri in uris.items()}
