"""What the store must do before a version is made: honour conditional writes; lock where asked.

Publishing moves ``latest.json`` with ``If-Match`` / ``If-None-Match`` (``pointer.put_pointer``):
two runs publishing at once must not overwrite each other unseen. A store that ignores
those headers (older MinIO releases and other S3-compatible stores do) accepts both
writes, silently. ``require_conditional_writes`` finds out with a write that must fail,
once per run (``upload_frozen_model``, before anything is published), and refuses a store
that lets it through, naming the store and what it lacks.

``object_lock_retention`` and ``lock_object`` keep a published version's files in S3 Object Lock governance mode
for the deployment's ``object_lock_days`` where the bucket has Object Lock: nobody without
``s3:BypassGovernanceRetention`` can delete or overwrite them. Only the version files:
``latest.json``, the channels and the history must stay writable.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from headpose.planning.layout import split_s3_uri
from headpose.registry.pointer import PublishError, is_conditional_conflict, is_precondition_failed

PROBE_BODY = b"conditional-write probe of headpose's upload_frozen_model; safe to delete\n"
# An ETag no object has: S3's are hex digests, maybe with a part count.
NO_SUCH_ETAG = '"conditional-write-probe-never-matches"'


def store_name(s3_client: Any, bucket: str) -> str:
    return f"bucket {bucket} at {s3_client.meta.endpoint_url}"


def require_conditional_writes(s3_client: Any, probe_uri: str) -> None:
    """Refuse (``PublishError``) a store that lets a conditional write through that must fail.

    ``probe_uri`` is written plainly, then twice with a condition it does not meet
    (``If-None-Match: *`` on an existing key, ``If-Match`` with an ETag it does not have);
    each must be answered 412 (or 409, a concurrent conditional write). Then it is removed.
    """
    bucket, key = split_s3_uri(probe_uri)
    s3_client.put_object(Bucket=bucket, Key=key, Body=PROBE_BODY)
    lacks = [
        header for header, condition in (("If-None-Match", {"IfNoneMatch": "*"}), ("If-Match", {"IfMatch": NO_SUCH_ETAG}))
        if _accepted(s3_client, bucket, key, condition)
    ]
    s3_client.delete_object(Bucket=bucket, Key=key)
    if lacks:
        raise PublishError(
            f"the store ({store_name(s3_client, bucket)}) ignores {' and '.join(lacks)} on PutObject: a "
            f"conditional write that must fail ({probe_uri}) succeeded. Publishing moves latest.json with "
            "conditional writes so that two runs cannot overwrite each other unseen; nothing is published "
            "to a store without them (upgrade it: MinIO has them since RELEASE.2024-08-12)"
        )


def _accepted(s3_client: Any, bucket: str, key: str, condition: dict[str, str]) -> bool:
    try:
        s3_client.put_object(Bucket=bucket, Key=key, Body=PROBE_BODY, **condition)
    except Exception as error:
        if is_precondition_failed(error) or is_conditional_conflict(error):
            return False
        raise
    return True


def object_lock_retention(s3_client: Any, bucket: str, days: int, now: datetime | None = None) -> dict[str, Any] | None:
    """The ``Retention`` that locks a version file for ``days`` in governance mode; None for none.

    ``days`` > 0 on a bucket without Object Lock is refused rather than ignored: the
    deployment asked for protection the store cannot give.
    """
    if days <= 0:
        return None
    try:
        configuration = s3_client.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    except Exception as error:
        if "ObjectLockConfigurationNotFound" not in str(error):
            raise
        configuration = {}
    if configuration.get("ObjectLockEnabled") != "Enabled":
        raise PublishError(
            f"object_lock_days={days}, but the {store_name(s3_client, bucket)} has no Object Lock: create the "
            "bucket with Object Lock enabled (airflow-init does when object_lock_days is set), or set "
            "object_lock_days to 0"
        )
    return {"Mode": "GOVERNANCE", "RetainUntilDate": (now or datetime.now(timezone.utc)) + timedelta(days=days)}


def lock_object(s3_client: Any, uri: str, retention: dict[str, Any] | None) -> None:
    """Put ``uri`` under ``retention`` (PutObjectRetention: S3 asks a checksum of a write that locks,
    which a server-side copy has no body for)."""
    if retention:
        bucket, key = split_s3_uri(uri)
        s3_client.put_object_retention(Bucket=bucket, Key=key, Retention=retention)
