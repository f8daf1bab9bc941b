"""Rolling the published model back: the pointer moves to an earlier history record.

Only the pointer changes (and then the mirror follows it); every file of the target
version is checked against the sha256 its record holds first, so a rollback never points
devices at changed or missing files.
"""
from __future__ import annotations

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
) -> dict[str, Any]:
    """Point ``latest.json`` back at an earlier published model, then sync the mirror.

    ``to_job`` defaults to the current pointer's ``previous``. The target's history
    record must exist and every file it names must still have its recorded sha256; the
    new pointer is that record with ``rolled_back`` and ``previous`` set.
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
    target = _history_record(s3_client, bucket, folder, to_job)
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
    if mirror:
        sync_mirror(s3_client, pointer, join_uri(prefix, "latest/"))
    log(f"{pointer_uri} now names {to_job} (was {(current or {}).get('training_job_name')})")
    return pointer


def _history_record(s3_client: Any, bucket: str, folder: str, job: str) -> dict[str, Any]:
    record_uri = join_uri(published_prefix(bucket, folder), f"history/{job}.json")
    record_bucket, record_key = split_s3_uri(record_uri)
    try:
        return json.loads(s3_client.get_object(Bucket=record_bucket, Key=record_key)["Body"].read())
    except Exception as error:
        if not is_missing_key(error):
            raise
    known = [r["training_job_name"] for r in history(s3_client, bucket, folder)]
    raise PublishError(f"{job} was never published (no {record_uri}); published: {known}")
