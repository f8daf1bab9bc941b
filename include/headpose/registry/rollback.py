"""Rolling the published model back: the pointer moves to an earlier history record."""
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
    sha256_of_object,
)
from headpose.registry.promotion import copy_to_latest

Log = Callable[[str], None]


def rollback(
    s3_client: Any,
    bucket: str,
    folder: str = DEFAULT_FOLDER,
    to_job: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Point ``latest.json`` (and ``latest/``) back at an earlier published model.

    ``to_job`` defaults to the current pointer's ``previous``. The target's history
    record must exist and its frozen graph must still have the recorded sha256; the
    new pointer is that record with ``rolled_back`` and ``previous`` set.
    """
    pointer_uri = join_uri(published_prefix(bucket, folder), POINTER_NAME)
    current, etag = read_pointer(s3_client, pointer_uri)
    if to_job is None:
        to_job = ((current or {}).get("previous") or {}).get("training_job_name")
        if not to_job:
            raise PublishError(f"{pointer_uri} names no previous model; pass --to <training_job_name>")
    if not is_valid_training_job_name(to_job):
        raise PublishError(f"{to_job!r} is not a training job name")
    record_uri = join_uri(published_prefix(bucket, folder), f"history/{to_job}.json")
    record_bucket, record_key = split_s3_uri(record_uri)
    try:
        target = json.loads(s3_client.get_object(Bucket=record_bucket, Key=record_key)["Body"].read())
    except Exception as error:
        if not is_missing_key(error):
            raise
        known = [r["training_job_name"] for r in history(s3_client, bucket, folder)]
        raise PublishError(f"{to_job} was never published (no {record_uri}); published: {known}") from None
    try:
        actual = sha256_of_object(s3_client, target["frozen_model_uri"])
    except Exception as error:
        if not is_missing_key(error):
            raise
        raise PublishError(f"{target['frozen_model_uri']} is gone; cannot roll back to {to_job}") from None
    if actual != target["frozen_model_sha256"]:
        raise PublishError(
            f"{target['frozen_model_uri']} has sha256 {actual}, its history record says "
            f"{target['frozen_model_sha256']}; refusing to roll back to a changed file"
        )
    now = now_iso()
    pointer = {
        **target,
        "published_at": now,
        "rolled_back": {"at": now, "from": (current or {}).get("training_job_name")},
        "previous": pointer_summary(current),
    }
    copy_to_latest(s3_client, target)
    put_pointer(s3_client, pointer_uri, pointer, etag)
    log(f"{pointer_uri} now names {to_job} (was {(current or {}).get('training_job_name')})")
    return pointer
