"""The registry's storage: the ``latest.json`` pointer, history records, their errors.

``published/latest.json`` is the only mutable object of the registry: the source of
truth for which model is published. It is replaced with a conditional write
(``If-Match`` on the ETag that was read, ``If-None-Match: *`` when there was none), so
a pointer changed by someone else in the meantime is never overwritten unseen.
``published/history/<job>.json`` keeps every record ever published.

Standard library at import time (boto3's errors are imported where they are needed):
the edge client shares these fields.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Mapping

from headpose.planning.layout import DEFAULT_FOLDER, join_uri, s3_uri, split_s3_uri

RECORD_VERSION = 2
POINTER_NAME = "latest.json"


class PublishError(RuntimeError):
    """The published state is not what publishing or a rollback needs; the message says why."""


class PointerChangedError(PublishError):
    """``latest.json`` changed between reading it and replacing it."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def is_missing_key(error: Exception) -> bool:
    """Whether a boto3 error says the key (or object) does not exist."""
    from botocore.exceptions import ClientError

    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in (
        "NoSuchKey", "404", "NotFound",
    )


def is_precondition_failed(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in (
        "PreconditionFailed", "412",
    )


def read_pointer(s3_client: Any, pointer_uri: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, etag)`` of ``latest.json``; ``(None, None)`` when nothing is published."""
    bucket, key = split_s3_uri(pointer_uri)
    try:
        response = s3_client.get_object(Bucket=bucket, Key=key)
    except Exception as error:
        if is_missing_key(error):
            return None, None
        raise
    body = response["Body"].read()
    try:
        record = json.loads(body)
    except ValueError as error:
        raise PublishError(
            f"{pointer_uri} is not JSON ({error}); repair it with "
            "`python -m headpose.registry.promotion rollback --to <training_job_name>`"
        ) from None
    if not isinstance(record, dict) or not record.get("training_job_name"):
        raise PublishError(f"{pointer_uri} names no training_job_name")
    return record, response["ETag"]


def pointer_summary(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a pointer says about the model it replaced (its ``previous``), one level deep."""
    if not record:
        return None
    return {
        "training_job_name": record["training_job_name"],
        "published_at": record.get("published_at"),
        "frozen_model_uri": record.get("frozen_model_uri"),
        "frozen_model_sha256": record.get("frozen_model_sha256"),
        "history_record_uri": record.get("history_record_uri"),
        "accuracy": (record.get("metrics") or {}).get("accuracy"),
    }


def put_json(s3_client: Any, uri: str, document: Mapping[str, Any], **conditions: str) -> None:
    bucket, key = split_s3_uri(uri)
    body = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    s3_client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **conditions)


def put_pointer(s3_client: Any, pointer_uri: str, record: Mapping[str, Any], expected_etag: str | None) -> None:
    condition = {"IfMatch": expected_etag} if expected_etag else {"IfNoneMatch": "*"}
    try:
        put_json(s3_client, pointer_uri, record, **condition)
    except Exception as error:
        if is_precondition_failed(error) or (expected_etag and is_missing_key(error)):
            raise PointerChangedError(
                f"{pointer_uri} changed while this model was being published "
                f"(expected {'ETag ' + expected_etag if expected_etag else 'no pointer'})"
            ) from None
        raise


def published_prefix(bucket: str, folder: str = DEFAULT_FOLDER) -> str:
    return s3_uri(bucket, folder, "published/")


def history(s3_client: Any, bucket: str, folder: str = DEFAULT_FOLDER) -> list[dict[str, Any]]:
    """Every model ever published under ``folder``, oldest first (by ``published_at``)."""
    _, prefix = split_s3_uri(join_uri(published_prefix(bucket, folder), "history/"))
    records = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".json"):
                records.append(json.loads(s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()))
    return sorted(records, key=lambda r: (r.get("published_at") or "", r.get("training_job_name", "")))


def sha256_of_object(s3_client: Any, uri: str) -> str:
    bucket, key = split_s3_uri(uri)
    digest = hashlib.sha256()
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"]
    for block in iter(lambda: body.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()
