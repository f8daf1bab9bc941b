"""A dataset prefix in S3: ``train-*.tfrecord``, ``eval-*.tfrecord`` and ``manifest.json``.

The manifest is uploaded after every shard, so its presence means the prefix is
complete; every shard it lists is named with its sha256, so whoever downloads a shard can
tell it is the one the manifest describes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from headpose.planning.layout import MANIFEST_FILE, file_sha256, join_uri, split_s3_uri

SHARD_SUFFIX = ".tfrecord"
SPLITS = ("train", "eval")
# Manifests written before channel_order was recorded describe RGB shards.
LEGACY_CHANNEL_ORDER = "rgb"


class DatasetError(RuntimeError):
    """A dataset that cannot be trained or evaluated on; the message says why."""


def require_bucket(s3_client: Any, bucket: str) -> None:
    """``DatasetError`` unless ``bucket`` exists and these credentials can reach it.

    The pipeline does not create buckets: where they live, who owns them and their
    policies are decisions for whoever runs it, not side effects of a run. With an
    expected bucket owner set, a bucket of another account answers 403 here.
    """
    from botocore.exceptions import ClientError

    try:
        s3_client.head_bucket(Bucket=bucket)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code")
        if code in ("404", "NoSuchBucket"):
            raise DatasetError(f"S3 bucket {bucket!r} does not exist; create it first") from None
        if code in ("403", "AccessDenied"):
            raise DatasetError(
                f"S3 bucket {bucket!r} is not accessible with this connection, or is owned by "
                "another account than the expected bucket owner"
            ) from None
        raise


def read_manifest(s3_client: Any, prefix_uri: str) -> tuple[dict | None, str | None]:
    """``(manifest, its sha256)`` of a dataset prefix; ``(None, None)`` when it has none."""
    from botocore.exceptions import ClientError

    uri = join_uri(prefix_uri, MANIFEST_FILE)
    bucket, key = split_s3_uri(uri)
    try:
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None, None
        raise
    try:
        manifest = json.loads(body)
    except ValueError as error:
        raise DatasetError(f"{uri} is not JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise DatasetError(f"{uri} is not a JSON object")
    return manifest, hashlib.sha256(body).hexdigest()


def manifest_channel_order(manifest: Mapping[str, Any]) -> str:
    """The channel order the dataset's shards hold (older manifests: RGB)."""
    order = manifest.get("channel_order") or str((manifest.get("image") or {}).get("channels", "")).lower()
    return order if order in ("bgr", "rgb") else LEGACY_CHANNEL_ORDER


def list_dataset(s3_client: Any, prefix_uri: str) -> dict[str, dict[str, str]]:
    """``{"train"|"eval"|"manifest": {file name: ETag}}`` of the objects directly under the prefix."""
    bucket, key_prefix = split_s3_uri(prefix_uri)
    found: dict[str, dict[str, str]] = {"train": {}, "eval": {}, "manifest": {}}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(key_prefix):]
            if "/" in name:
                continue
            if name == MANIFEST_FILE:
                found["manifest"][name] = obj["ETag"]
            for split in SPLITS:
                if name.startswith(f"{split}-") and name.endswith(SHARD_SUFFIX):
                    found[split][name] = obj["ETag"]
    return {kind: dict(sorted(entries.items())) for kind, entries in found.items()}


def shard_etags(listing: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    return {name: etag for split in SPLITS for name, etag in listing[split].items()}


def upload_shards(s3_client: Any, folder: Path, prefix_uri: str) -> dict[str, str]:
    """Upload a folder's shards under the prefix; their ETags as S3 now lists them."""
    bucket, key_prefix = split_s3_uri(prefix_uri)
    for shard in sorted(folder.glob(f"*{SHARD_SUFFIX}")):
        s3_client.upload_file(str(shard), bucket, key_prefix + shard.name)
    return shard_etags(list_dataset(s3_client, prefix_uri))


def upload_manifest(s3_client: Any, manifest: Mapping[str, Any], prefix_uri: str) -> str:
    """Write the manifest, last: its presence says every shard it lists is complete. Its sha256."""
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    bucket, key = split_s3_uri(join_uri(prefix_uri, MANIFEST_FILE))
    s3_client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
    return hashlib.sha256(body).hexdigest()


def download_split(
    s3_client: Any, prefix_uri: str, split: str, dest: str | Path, manifest: Mapping[str, Any] | None = None,
) -> list[Path]:
    """The ``split`` shards of the dataset in ``dest``, in order.

    With ``manifest``, exactly the shards it lists, each refused unless it has the
    manifest's sha256; without, whatever the prefix holds.
    """
    bucket, key_prefix = split_s3_uri(prefix_uri)
    if manifest is not None:
        listed = {s["file"]: s.get("sha256") for s in (manifest.get("splits", {}).get(split) or {}).get("shards", [])}
    else:
        listed = {name: None for name in list_dataset(s3_client, prefix_uri)[split]}
    if not listed:
        raise DatasetError(f"no {split}-*{SHARD_SUFFIX} under {prefix_uri}")
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sha256 in listed.items():
        path = folder / name
        s3_client.download_file(bucket, key_prefix + name, str(path))
        if sha256 is not None and file_sha256(path) != sha256:
            raise DatasetError(f"{prefix_uri}{name} does not have the sha256 its manifest records ({sha256})")
        paths.append(path)
    return paths


def object_etag(s3_client: Any, uri: str) -> str:
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    try:
        return s3_client.head_object(Bucket=bucket, Key=key)["ETag"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise DatasetError(f"{uri} does not exist") from None
        raise
