"""Rolling the published model back: the pointer moves to an earlier history record.

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
