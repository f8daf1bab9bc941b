"""What every S3 call of the pipeline carries, whoever makes it.

Each setting is a botocore event hook on a client rather than an argument at each call
site, so that no call - the transfer manager's parts, paginators, server-side copies,
the Amazon provider's own hook - can be missed:

``pin_bucket_owner``   ``ExpectedBucketOwner`` (and ``ExpectedSourceBucketOwner``) on every
                       call whose API takes it: S3 refuses (403) a bucket another account owns
``encrypt_with_kms``   SSE-KMS with the deployment's key on every write that creates an object
``viewable_type``      the ``Content-Type`` of the documents people open from a link

boto3 is never imported here: the client is passed in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

# Documents a person opens from a link: S3 stores everything else as binary/octet-stream,
# which a browser downloads (and a new tab for it closes) instead of showing.
VIEWABLE_TYPES = {".json": "application/json", ".png": "image/png", ".txt": "text/plain",
                  ".html": "text/html; charset=utf-8"}


def viewable_type(key: str) -> str | None:
    """The ``Content-Type`` a browser shows ``key`` with, for the documents people open."""
    return VIEWABLE_TYPES.get(Path(key).suffix.lower())


def pin_bucket_owner(s3_client: Any, expected_bucket_owner: str | None) -> Any:
    """``s3_client``, sending ``ExpectedBucketOwner`` with every call whose API takes it.

    S3 then refuses (403) any call to a bucket another account owns - say one a stranger
    created under a name this deployment expected to own. A botocore event hook rather
    than an argument at every call site, so that no call (the transfer manager's parts,
    paginators, server-side copies) can be missed.
    """
    if not expected_bucket_owner:
        return s3_client

    def add_owner(params: dict, model: Any, **_: Any) -> None:
        members = model.input_shape.members if model.input_shape is not None else {}
        if "ExpectedBucketOwner" in members:
            params.setdefault("ExpectedBucketOwner", expected_bucket_owner)
        if "ExpectedSourceBucketOwner" in members:  # CopyObject, UploadPartCopy: the source too
            params.setdefault("ExpectedSourceBucketOwner", expected_bucket_owner)

    s3_client.meta.events.register("before-parameter-build.s3", add_owner, unique_id="headpose-bucket-owner")
    return s3_client


# The calls that create an object: each takes the SSE-KMS parameters.
_WRITES = ("PutObject", "CreateMultipartUpload", "CopyObject")


def encrypt_with_kms(s3_client: Any, kms_key_id: str | None) -> Any:
    """``s3_client``, writing every object it creates with SSE-KMS under ``kms_key_id``.

    A bucket whose policy requires the deployment's key (``s3:x-amz-server-side-encryption-aws-kms-key-id``)
    refuses a write without it, even when the bucket's default encryption names that key.
    Parts of a multipart upload inherit it from ``CreateMultipartUpload``.
    """
    if not kms_key_id:
        return s3_client

    def add_key(params: dict, **_: Any) -> None:
        params.setdefault("ServerSideEncryption", "aws:kms")
        params.setdefault("SSEKMSKeyId", kms_key_id)

    for operation in _WRITES:
        s3_client.meta.events.register(f"before-parameter-build.s3.{operation}", add_key,
                                       unique_id=f"headpose-kms-{operation}")
    return s3_client
