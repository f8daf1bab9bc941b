"""Datasets in S3: staging the synthetic one, checking a given prefix, fetching a split.

A dataset prefix holds ``train-*.tfrecord``, ``eval-*.tfrecord`` and ``manifest.json``.
The manifest is uploaded after every shard, so its presence means the prefix is
complete; a synthetic dataset's prefix is named by a hash of its settings, so a run
whose settings were staged before skips the (slow) generation.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from headpose.planning.layout import MANIFEST_FILE, dataset_id, file_sha256, join_uri, split_s3_uri

Log = Callable[[str], None]
SHARD_SUFFIX = ".tfrecord"
# A folder where rendered synthetic datasets are kept between runs (unset: none kept).
SYNTHETIC_CACHE_ENV = "HEADPOSE_SYNTHETIC_CACHE"


class DatasetError(RuntimeError):
    """A dataset prefix that cannot be trained on; the message says what is missing."""


def stage_dataset(
    s3_client: Any, plan: Mapping[str, Any], log: Log, scratch_root: str | Path | None = None,
) -> dict[str, Any]:
    """``stage_dataset``'s work for any ``dataset_source``: the dataset's prefix in S3 and counts.

    Synthetic and Prima datasets are staged (or found staged) under the plan's
    ``dataset_prefix``; an ``s3://`` source is checked for shards and a manifest.
    """
    require_bucket(s3_client, plan["bucket"])
    source = plan["run_params"]["dataset_source"]
    if source == "synthetic":
        return stage_synthetic_dataset(
            s3_client, plan["dataset_prefix"], plan["dataset_settings"], log,
            scratch_root=scratch_root, cache_root=synthetic_cache_root(),
        )
    if source == "prima":
        return stage_prima_dataset(
            s3_client, plan["dataset_prefix"], plan["dataset_settings"], log, scratch_root=scratch_root,
        )
    return check_dataset_prefix(s3_client, plan["dataset_prefix"])


def require_bucket(s3_client: Any, bucket: str) -> None:
    """``DatasetError`` unless ``bucket`` exists and these credentials can reach it.

    The pipeline does not create buckets: where they live, who owns them and their
    policies are decisions for whoever runs it, not side effects of a run.
    """
    from botocore.exceptions import ClientError

    try:
        s3_client.head_bucket(Bucket=bucket)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code")
        if code in ("404", "NoSuchBucket"):
            raise DatasetError(f"S3 bucket {bucket!r} does not exist; create it first") from None
        if code in ("403", "AccessDenied"):
            raise DatasetError(f"S3 bucket {bucket!r} is not accessible with this connection") from None
        raise


def _read_manifest(s3_client: Any, prefix_uri: str) -> dict | None:
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(join_uri(prefix_uri, MANIFEST_FILE))
    try:
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    try:
        return json.loads(body)
    except ValueError as error:
        raise DatasetError(f"{join_uri(prefix_uri, MANIFEST_FILE)} is not JSON: {error}") from error


def _summary(prefix_uri: str, manifest: Mapping[str, Any], staged: bool) -> dict[str, Any]:
    splits = manifest.get("splits", {})
    return {
        "dataset_prefix": prefix_uri,
        "source": manifest.get("source", "unknown"),
        "staged": staged,
        "train_count": splits.get("train", {}).get("count"),
        "eval_count": splits.get("eval", {}).get("count"),
    }


def synthetic_cache_root() -> Path | None:
    """``$HEADPOSE_SYNTHETIC_CACHE`` as a folder, or None (no render cache) when unset."""
    value = os.environ.get(SYNTHETIC_CACHE_ENV, "").strip()
    return Path(value) if value else None


def stage_synthetic_dataset(
    s3_client: Any,
    prefix_uri: str,
    settings: Mapping[str, int],
    log: Log,
    scratch_root: str | Path | None = None,
    cache_root: str | Path | None = None,
) -> dict[str, Any]:
    """Generate the synthetic dataset of ``settings`` into ``prefix_uri`` unless it is there.

    With ``cache_root``, rendered datasets are kept there by settings hash and uploaded
    again from disk when S3 lacks them (the embedded S3 forgets everything when it
    stops). Returns counts and whether it was staged now (``staged``), not the data.
    """
    existing = _read_manifest(s3_client, prefix_uri)
    if existing is not None:
        log(f"dataset already staged at {prefix_uri} (manifest present); skipping generation")
        return _summary(prefix_uri, existing, staged=False)

    from headpose.datasets.settings import GENERATOR_VERSION

    if settings["generator_version"] != GENERATOR_VERSION:
        raise DatasetError(
            f"settings name generator version {settings['generator_version']}, "
            f"this code has {GENERATOR_VERSION}"
        )
    if cache_root is None:
        with tempfile.TemporaryDirectory(prefix="synthetic-", dir=scratch_root) as scratch:
            manifest = _render_synthetic(Path(scratch), settings, log)
            count = _upload_dataset(s3_client, Path(scratch), prefix_uri)
    else:
        folder = _cached_synthetic(Path(cache_root), settings, log)
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        count = _upload_dataset(s3_client, folder, prefix_uri)
    log(f"uploaded {count} shards and {MANIFEST_FILE} to {prefix_uri}")
    return _summary(prefix_uri, manifest, staged=True)


def _render_synthetic(folder: Path, settings: Mapping[str, int], log: Log) -> dict:
    from headpose.datasets.synthetic import default_workers, write_synthetic_dataset

    log(f"generating the synthetic dataset {dict(settings)} in {default_workers()} processes")
    return write_synthetic_dataset(
        folder,
        train_per_pose=settings["train_per_pose"],
        eval_per_pose=settings["eval_per_pose"],
        seed=settings["seed"],
        images_per_shard=settings["images_per_shard"],
    )


def _cached_synthetic(cache_root: Path, settings: Mapping[str, int], log: Log) -> Path:
    """The cache's folder for ``settings``, rendered now unless a verified copy is there."""
    folder = cache_root / dataset_id("synthetic", settings)
    problem = _cache_problem(folder)
    if problem is None:
        log(f"reusing the synthetic dataset rendered earlier in {folder} (checksums verified)")
        return folder
    if folder.exists():
        log(f"re-rendering the cached dataset in {folder}: {problem}")
        shutil.rmtree(folder)
    cache_root.mkdir(parents=True, exist_ok=True)
    # Rendered beside its final name and renamed into place, so that a run stopped half
    # way, or another run rendering the same settings, never leaves a partial folder.
    # (After a successful rename there is nothing left for the clean-up to remove.)
    with tempfile.TemporaryDirectory(
        prefix=".rendering-", dir=cache_root, ignore_cleanup_errors=True
    ) as scratch:
        _render_synthetic(Path(scratch), settings, log)
        try:
            os.rename(scratch, folder)
        except OSError:
            if _cache_problem(folder) is not None:
                raise
            log(f"another run rendered {folder} first; using that copy")
    return folder


def _cache_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete, intact rendered dataset, or None if it is."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"no readable {MANIFEST_FILE} ({type(error).__name__})"
    for shard in shards:
        path = folder / shard["file"]
        if not path.is_file():
            return f"{shard['file']} is missing"
        if file_sha256(path) != shard["sha256"]:
            return f"{shard['file']} does not match its sha256 in {MANIFEST_FILE}"
    return None


def _upload_dataset(s3_client: Any, folder: Path, prefix_uri: str) -> int:
    """Upload a folder's shards, then its manifest; returns the number of shards."""
    bucket, key_prefix = split_s3_uri(prefix_uri)
    shards = sorted(folder.glob(f"*{SHARD_SUFFIX}"))
    for shard in shards:
        s3_client.upload_file(str(shard), bucket, key_prefix + shard.name)
    # Last: a manifest in S3 means every shard before it is complete.
    s3_client.upload_file(str(folder / MANIFEST_FILE), bucket, key_prefix + MANIFEST_FILE)
    return len(shards)


def list_dataset(s3_client: Any, prefix_uri: str) -> dict[str, list[str]]:
    """Keys directly under the prefix, by kind: ``train``, ``eval`` shards, ``manifest``."""
    bucket, key_prefix = split_s3_uri(prefix_uri)
    found: dict[str, list[str]] = {"train": [], "eval": [], "manifest": []}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(key_prefix):]
            if "/" in name:
                continue
            if name == MANIFEST_FILE:
                found["manifest"].append(obj["Key"])
            for split in ("train", "eval"):
                if name.startswith(f"{split}-") and name.endswith(SHARD_SUFFIX):
                    found[split].append(obj["Key"])
    return {kind: sorted(keys) for kind, keys in found.items()}


def check_dataset_prefix(s3_client: Any, prefix_uri: str) -> dict[str, Any]:
    """Counts of a given dataset prefix, or ``DatasetError`` naming what is missing."""
    found = list_dataset(s3_client, prefix_uri)
    missing = [
        what for what, keys in (
            (f"train-*{SHARD_SUFFIX}", found["train"]),
            (f"eval-*{SHARD_SUFFIX}", found["eval"]),
            (MANIFEST_FILE, found["manifest"]),
        ) if not keys
    ]
    if missing:
        raise DatasetError(f"dataset prefix {prefix_uri} has no {', no '.join(missing)}")
    manifest = _read_manifest(s3_client, prefix_uri) or {}
    summary = _summary(prefix_uri, manifest, staged=False)
    summary.update(train_shards=len(found["train"]), eval_shards=len(found["eval"]))
    return summary


def download_split(s3_client: Any, prefix_uri: str, split: str, dest: str | Path) -> list[Path]:
    """The ``split`` shards of the dataset, downloaded into ``dest``, in order."""
    bucket, _ = split_s3_uri(prefix_uri)
    keys = list_dataset(s3_client, prefix_uri)[split]
    if not keys:
        raise DatasetError(f"no {split}-*{SHARD_SUFFIX} under {prefix_uri}")
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in keys:
        path = folder / key.rsplit("/", 1)[-1]
        s3_client.download_file(bucket, key, str(path))
        paths.append(path)
    return paths


def stage_prima_dataset(
    s3_client: Any,
    prefix_uri: str,
    settings: Mapping[str, Any],
    log: Log,
    scratch_root: str | Path | None = None,
) -> dict[str, Any]:
    """Convert the Prima archive at ``settings['archive_uri']`` into ``prefix_uri``.

    Skipped when the prefix's manifest was made from the same archive (its S3 ETag and
    sha256) with the same settings. The archive streams from disk through the converter,
    so memory stays bounded by a few images whatever its size.
    """
    from headpose.datasets import prima

    archive_bucket, archive_key = split_s3_uri(settings["archive_uri"])
    etag = _object_etag(s3_client, archive_bucket, archive_key, settings["archive_uri"])
    converter_settings = {k: v for k, v in settings.items() if k != "archive_uri"}
    existing = _read_manifest(s3_client, prefix_uri)
    if existing and existing.get("source_etag") == etag and prima.manifest_matches(
        existing, existing.get("source_sha256", ""), converter_settings
    ):
        log(f"dataset already staged at {prefix_uri} from {settings['archive_uri']}; skipping conversion")
        return _summary(prefix_uri, existing, staged=False)

    with tempfile.TemporaryDirectory(prefix="prima-", dir=scratch_root) as scratch:
        archive = Path(scratch) / "HeadPoseImageDatabase.tar.gz"
        log(f"downloading {settings['archive_uri']}")
        s3_client.download_file(archive_bucket, archive_key, str(archive))
        out_dir = Path(scratch) / "shards"
        try:
            manifest = prima.convert_archive(archive, out_dir, converter_settings)
        except prima.PrimaFormatError as error:
            raise DatasetError(f"{settings['archive_uri']}: {error}") from None
        manifest.update(source_uri=settings["archive_uri"], source_etag=etag)
        (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        count = _upload_dataset(s3_client, out_dir, prefix_uri)
    log(f"uploaded {count} Prima shards and {MANIFEST_FILE} to {prefix_uri}")
    return _summary(prefix_uri, manifest, staged=True)


def _object_etag(s3_client: Any, bucket: str, key: str, uri: str) -> str:
    from botocore.exceptions import ClientError

    try:
        return s3_client.head_object(Bucket=bucket, Key=key)["ETag"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise DatasetError(f"the Prima archive {uri} does not exist") from None
        raise
