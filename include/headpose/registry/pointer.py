"""The registry's storage: the ``latest.json`` pointer, history records, the ``latest/`` mirror.

``published/latest.json`` is the only mutable object of the registry and the source of
truth for which model is published. It is replaced with a conditional write (``If-Match``
on the ETag that was read, ``If-None-Match: *`` when there was none): S3's 412 means
someone else published meanwhile (``PointerChangedError``, a lost race), its 409
``ConditionalRequestConflict`` that a concurrent conditional write was under way, which
AWS documents as "retry" - so it is retried with backoff. ``published/history/<job>.json``
keeps every record ever published.

The ``published/latest/`` mirror, for devices that cannot read JSON, is written only
after the pointer, from the record the pointer holds, and is never read back as truth.

boto3 is never imported at module level (its errors are, where they are needed).
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from headpose.planning.layout import DEFAULT_FOLDER, POINTER_FILE, join_uri, s3_uri, split_s3_uri
from headpose.registry.record import RecordError, record_files, record_formats, record_version

POINTER_NAME = POINTER_FILE
CONFLICT_RETRIES = 5
CONFLICT_BACKOFF_SECONDS = 0.5


class PublishError(RuntimeError):
    """The published state is not what publishing or a rollback needs; the message says why."""


class PointerChangedError(PublishError):
    """``latest.json`` changed between reading it and replacing it."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _error_code(error: Exception) -> str | None:
    from botocore.exceptions import ClientError

    return error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None


def is_missing_key(error: Exception) -> bool:
    """Whether a boto3 error says the key (or object) does not exist."""
    return _error_code(error) in ("NoSuchKey", "404", "NotFound")


def is_precondition_failed(error: Exception) -> bool:
    return _error_code(error) in ("PreconditionFailed", "412")


def is_conditional_conflict(error: Exception) -> bool:
    return _error_code(error) in ("ConditionalRequestConflict", "409")


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
    repair = "repair it with `python -m headpose.registry rollback --to <training_job_name>`"
    try:
        record = json.loads(body)
    except ValueError as error:
        raise PublishError(f"{pointer_uri} is not JSON ({error}); {repair}") from None
    if not isinstance(record, dict) or not record.get("training_job_name"):
        raise PublishError(f"{pointer_uri} names no training_job_name; {repair}")
    try:
        record_version(record)
    except RecordError as error:
        raise PublishError(f"{pointer_uri}: {error}") from None
    return record, response["ETag"]


def pointer_summary(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a pointer says about the model it replaced (its ``previous``), one level deep."""
    if not record:
        return None
    frozen = record_files(record).get("frozen_model.pb", {})
    return {
        "training_job_name": record["training_job_name"],
        "published_at": record.get("published_at"),
        "frozen_model_uri": frozen.get("uri"),
        "frozen_model_sha256": frozen.get("sha256"),
        "history_record_uri": record.get("history_record_uri"),
        "accuracy": (record.get("metrics") or {}).get("accuracy"),
    }


def json_body(document: Mapping[str, Any]) -> bytes:
    """The bytes ``put_json`` stores for ``document``."""
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def record_sha256(record: Mapping[str, Any]) -> str:
    """The sha256 of a record as ``put_json`` stores it (its history record's, once published)."""
    return hashlib.sha256(json_body(record)).hexdigest()


def put_json(s3_client: Any, uri: str, document: Mapping[str, Any], **conditions: str) -> None:
    bucket, key = split_s3_uri(uri)
    body = json_body(document)
    s3_client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **conditions)


def put_pointer(
    s3_client: Any, pointer_uri: str, record: Mapping[str, Any], expected_etag: str | None,
    *, sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Replace the pointer only if it is still the one read (``expected_etag``; None: no pointer)."""
    condition = {"IfMatch": expected_etag} if expected_etag else {"IfNoneMatch": "*"}
    for attempt in range(CONFLICT_RETRIES + 1):
        try:
            put_json(s3_client, pointer_uri, record, **condition)
            return
        except Exception as error:
            if is_conditional_conflict(error) and attempt < CONFLICT_RETRIES:
                sleep(CONFLICT_BACKOFF_SECONDS * 2**attempt)
                continue
            if is_precondition_failed(error) or (expected_etag and is_missing_key(error)):
                raise PointerChangedError(
                    f"{pointer_uri} changed while this model was being published "
                    f"(expected {'ETag ' + expected_etag if expected_etag else 'no pointer'})"
                ) from None
            raise


def mirror_files(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name under latest/: {"uri", "sha256"}}``: every file of the version the record names."""
    files = dict(record_files(record))
    for fmt in record_formats(record).values():
        named = fmt.get("files") or ({fmt["uri"].rsplit("/", 1)[-1]: fmt} if fmt.get("uri") else {})
        for name, entry in named.items():
            files[f"edge/{name}"] = {"uri": entry["uri"], "sha256": entry.get("sha256")}
    return files


def sync_mirror(s3_client: Any, record: Mapping[str, Any], mirror_prefix: str) -> list[str]:
    """Make ``latest/`` hold exactly the record's files (server-side copies); the names written.

    Called after the pointer is written, and again by any later publish or rollback, so a
    mirror left half-synced by a crash is repaired by the next one.
    """
    wanted = mirror_files(record)
    bucket, key_prefix = split_s3_uri(mirror_prefix)
    for name, entry in wanted.items():
        source_bucket, source_key = split_s3_uri(entry["uri"])
        # Managed copy: server-side, and multipart for objects over 5 GB.
        s3_client.copy({"Bucket": source_bucket, "Key": source_key}, bucket, key_prefix + name)
    stale = [key for key in _keys(s3_client, bucket, key_prefix) if key[len(key_prefix):] not in wanted]
    for key in stale:
        s3_client.delete_object(Bucket=bucket, Key=key)
    return sorted(wanted)


def _keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


def published_prefix(bucket: str, folder: str = DEFAULT_FOLDER) -> str:
    return s3_uri(bucket, folder, "published/")


def history(s3_client: Any, bucket: str, folder: str = DEFAULT_FOLDER) -> list[dict[str, Any]]:
    """Every model ever published under ``folder``, oldest first (by ``published_at``)."""
    _, prefix = split_s3_uri(join_uri(published_prefix(bucket, folder), "history/"))
    records = [
        json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
        for key in _keys(s3_client, bucket, prefix) if key.endswith(".json")
    ]
    return sorted(records, key=lambda r: (r.get("published_at") or "", r.get("training_job_name", "")))


def sha256_of_object(s3_client: Any, uri: str) -> str:
    bucket, key = split_s3_uri(uri)
    digest = hashlib.sha256()
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"]
    for block in iter(lambda: body.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def verify_record_files(s3_client: Any, record: Mapping[str, Any]) -> list[str]:
    """Why the files a record names are not the ones it recorded (empty: every sha256 matches)."""
    problems = []
    for name, entry in mirror_files(record).items():
        if not entry.get("sha256"):
            continue  # version 2 records know only the frozen graph's
        try:
            actual = sha256_of_object(s3_client, entry["uri"])
        except Exception as error:
            if not is_missing_key(error):
                raise
            problems.append(f"{entry['uri']} is gone")
            continue
        if actual != entry["sha256"]:
            problems.append(f"{entry['uri']} has sha256 {actual}, the record says {entry['sha256']}")
    return problems
