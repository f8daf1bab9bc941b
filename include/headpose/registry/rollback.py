"""Rolling the published model back: the pointer moves to an earlier history record.

With channels (a ``rollout`` configured) ``rollback_channel`` moves ``stable.json`` (then
``latest.json`` and the mirror follow) or ``canary.json``, each move a decision record.

Only the pointer changes (and then the mirror and SageMaker's Model Registry follow it);
every file of the target version is checked against the sha256 its record holds first, so
a rollback never points devices at changed or missing files. Running the same rollback
again after an interruption repairs what followed the pointer and moves nothing.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

from headpose.planning.layout import DEFAULT_FOLDER, is_valid_training_job_name, join_uri, split_s3_uri
from headpose.registry.pointer import (
    POINTER_NAME,
    PublishError,
    history,
    is_missing_key,
    now_iso,
    pointer_summary,
    published_prefix,
    put_pointer,
    read_pointer,
    sync_mirror,
    verify_record_files,
)
from headpose.edge.channels import CANARY, STABLE
from headpose.registry import channels
from headpose.registry.model_packages import APPROVED, REJECTED, ModelRegistry, sync_package
from headpose.registry.record import RecordError, record_files

Log = Callable[[str], None]


def rollback(
    s3_client: Any,
    bucket: str,
    folder: str = DEFAULT_FOLDER,
    to_job: str | None = None,
    log: Log = print,
    *,
    mirror: bool = True,
    model_registry: ModelRegistry | None = None,
) -> dict[str, Any]:
    """Point ``latest.json`` back at an earlier published model, then sync the mirror and the Model Registry.

    ``to_job`` defaults to the current pointer's ``previous``. The target's history
    record must exist and every file it names must still have its recorded sha256; the
    new pointer is that record with ``rolled_back`` and ``previous`` set. When the pointer
    already names ``to_job`` (this rollback ran before and was interrupted after its pointer
    write), only the mirror and the Model Registry are brought in line with it.
    """
    prefix = published_prefix(bucket, folder)
    pointer_uri = join_uri(prefix, POINTER_NAME)
    current, etag = read_pointer(s3_client, pointer_uri)
    if to_job is None:
        to_job = ((current or {}).get("previous") or {}).get("training_job_name")
        if not to_job:
            raise PublishError(f"{pointer_uri} names no previous model; pass --to <training_job_name>")
    if not is_valid_training_job_name(to_job):
        raise PublishError(f"{to_job!r} is not a training job name")
    if current and current["training_job_name"] == to_job:
        pointer = current
        log(f"{pointer_uri} names {to_job} already; bringing the mirror and the Model Registry in line")
    else:
        pointer = _move_pointer(s3_client, bucket, folder, pointer_uri, to_job, current, etag)
        log(f"{pointer_uri} now names {to_job} (was {(current or {}).get('training_job_name')})")
    if mirror:
        sync_mirror(s3_client, pointer, join_uri(prefix, "latest/"))
    if model_registry:
        _sync_model_registry(s3_client, model_registry, bucket, folder, pointer)
    return pointer


def rollback_channel(
    s3_client: Any,
    bucket: str,
    folder: str = DEFAULT_FOLDER,
    channel: str = STABLE,
    to_job: str | None = None,
    log: Log = print,
    *,
    by: str = "rollback",
    mirror: bool = True,
    model_registry: ModelRegistry | None = None,
) -> dict[str, Any]:
    """With channels: move ``channel`` back to ``to_job`` (default: its ``previous``), as a decision.

    Stable: ``stable.json``, then ``latest.json`` and the mirror; the canary follows when it
    named the version rolled back from (no device keeps running it). Canary: ``canary.json``
    only (default target: the stable version). Run again after an interruption, it finds its
    pointer moved and brings what follows it in line.
    """
    uris = channels.channel_uris(bucket, folder)
    current, etag = read_pointer(s3_client, uris[channel])
    if current is None:
        raise PublishError(f"{uris[channel]} does not exist: nothing to roll back")
    if to_job is None:
        fallback = read_pointer(s3_client, uris[STABLE])[0] if channel == CANARY else None
        to_job = (fallback or {}).get("training_job_name") or (current.get("previous") or {}).get("training_job_name")
        if not to_job:
            raise PublishError(f"{uris[channel]} names no previous model; pass --to <training_job_name>")
    if not is_valid_training_job_name(to_job):
        raise PublishError(f"{to_job!r} is not a training job name")
    pointer = current
    if current["training_job_name"] != to_job:
        target = channels.history_version(s3_client, bucket, folder, to_job)
        now = now_iso()
        decision = channels.write_decision(s3_client, bucket, folder, channels.decision_record(
            channels.decision_id(f"manual-{now[:19].replace(':', '').replace('-', '')}-{by}-{channel}-to-{to_job}"),
            "rollback",
            f"{channel} rolled back from {current['training_job_name']} to {to_job} ({by})", at=now, by=by,
            canary=current if channel == CANARY else None, stable=current if channel == STABLE else None,
            rollout=current.get("rollout")))
        rolled_back = {"at": now, "from": current["training_job_name"], "decision_id": decision["id"]}
        pointer = channels.move_channel(s3_client, bucket, folder, channel, target, current, etag, decision,
                                        current.get("rollout"), rolled_back)
        log(f"{uris[channel]} now names {to_job} (was {current['training_job_name']})")
    if channel == STABLE:
        channels.follow_stable(s3_client, bucket, folder, pointer, mirror=mirror)
        canary, canary_etag = read_pointer(s3_client, uris[CANARY])
        rolled_from = (pointer.get("rolled_back") or {}).get("from")
        if canary and rolled_from and canary["training_job_name"] == rolled_from:
            decision = channels.read_decision(s3_client, pointer["channel_moved"]["decision_uri"])
            channels.move_channel(s3_client, bucket, folder, CANARY, pointer, canary, canary_etag, decision,
                                  canary.get("rollout"), pointer.get("rolled_back"))
            log(f"{uris[CANARY]} followed: it named {rolled_from}")
        if model_registry:
            _sync_model_registry(s3_client, model_registry, bucket, folder, pointer)
    return pointer


def _move_pointer(
    s3_client: Any, bucket: str, folder: str, pointer_uri: str, to_job: str, current: dict | None, etag: str | None,
) -> dict[str, Any]:
    target, _ = _history_record(s3_client, bucket, folder, to_job)
    try:
        record_files(target)
    except RecordError as error:
        raise PublishError(f"cannot roll back to {to_job}: {error}") from None
    problems = verify_record_files(s3_client, target)
    if problems:
        raise PublishError(f"refusing to roll back to {to_job}: " + "; ".join(problems))
    now = now_iso()
    pointer = {
        **target,
        "published_at": now,
        "rolled_back": {"at": now, "from": (current or {}).get("training_job_name")},
        "previous": pointer_summary(current),
    }
    put_pointer(s3_client, pointer_uri, pointer, etag)
    return pointer


def _sync_model_registry(
    s3_client: Any, model_registry: ModelRegistry, bucket: str, folder: str, pointer: dict[str, Any],
) -> None:
    """After the pointer: the version it names ``Approved``, the one it was rolled back from ``Rejected``."""
    job = pointer["training_job_name"]
    target, sha256 = _history_record(s3_client, bucket, folder, job)
    sync_package(model_registry, target, APPROVED, f"rolled back to: latest.json names {job} again",
                 published={"uri": _history_uri(bucket, folder, job), "sha256": sha256})
    left = (pointer.get("rolled_back") or {}).get("from")
    if left and left != job:
        try:
            record, sha256 = _history_record(s3_client, bucket, folder, left)
            record_files(record)
        except (PublishError, RecordError):  # published before records named every file: nothing to mark
            return
        sync_package(model_registry, record, REJECTED,
                     f"rolled back from at {pointer['rolled_back']['at']}: latest.json names {job}",
                     published={"uri": _history_uri(bucket, folder, left), "sha256": sha256})


def _history_uri(bucket: str, folder: str, job: str) -> str:
    return join_uri(published_prefix(bucket, folder), f"history/{job}.json")


def _history_record(s3_client: Any, bucket: str, folder: str, job: str) -> tuple[dict[str, Any], str]:
    """A version's history record and the sha256 of its bytes."""
    record_uri = _history_uri(bucket, folder, job)
    record_bucket, record_key = split_s3_uri(record_uri)
    try:
        body = s3_client.get_object(Bucket=record_bucket, Key=record_key)["Body"].read()
    except Exception as error:
        if not is_missing_key(error):
            raise
    else:
        return json.loads(body), hashlib.sha256(body).hexdigest()
    known = [r["training_job_name"] for r in history(s3_client, bucket, folder)]
    raise PublishError(f"{job} was never published (no {record_uri}); published: {known}")
