"""``stage_dataset``: the run's dataset in S3, validated, in the run's channel order.

Synthetic and Prima datasets are made by the run the first time their settings are seen
(their prefix is named by a hash of the settings) and found again afterwards; an
``s3://`` source is taken as it is. Either way the dataset is validated
(``datasets.validation``) before ``train`` may use it, and refused with the figures when
a check fails - a bad dataset is seen in minutes, not after hours of training.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from headpose.datasets.store import (
    SHARD_SUFFIX,
    SPLITS,
    DatasetError,
    manifest_channel_order,
    list_dataset,
    object_etag,
    read_manifest,
    require_bucket,
    shard_etags,
    upload_manifest,
    upload_shards,
)
from headpose.datasets.validation import (
    DatasetInvalid,
    listed_shard_files,
    problems_of,
    still_valid,
    summary_line,
    validate_split_files,
    validation_record,
)
from headpose.planning.layout import MANIFEST_FILE, dataset_id, file_sha256, join_uri, split_s3_uri

Log = Callable[[str], None]
# A folder where rendered synthetic datasets are kept between runs (unset: none kept).
SYNTHETIC_CACHE_ENV = "HEADPOSE_SYNTHETIC_CACHE"


def stage_dataset(
    s3_client: Any, plan: Mapping[str, Any], log: Log, scratch_root: str | Path | None = None,
) -> dict[str, Any]:
    """``stage_dataset``'s work for any ``dataset_source``: the validated dataset's summary for XCom."""
    require_bucket(s3_client, plan["bucket"])
    source, prefix = plan["run_params"]["dataset_source"], plan["dataset_prefix"]
    if source == "synthetic":
        summary = stage_synthetic_dataset(
            s3_client, prefix, plan["dataset_settings"], log,
            scratch_root=scratch_root, cache_root=synthetic_cache_root(),
        )
    elif source == "prima":
        summary = stage_prima_dataset(s3_client, prefix, plan["dataset_settings"], log, scratch_root=scratch_root)
    else:
        summary = check_dataset_prefix(s3_client, prefix, log, scratch_root=scratch_root)
    hosts = int(plan["run_params"].get("instance_count", 1))
    if summary["train_shards"] < hosts:
        # Each host reads its own share of the shards (training.distribution): none may go without.
        raise DatasetError(
            f"{prefix} has {summary['train_shards']} training shard(s) for instance_count={hosts}: every "
            "host needs one of its own. Write the dataset with more shards (images_per_shard), or train "
            "on fewer instances"
        )
    wanted = plan["run_params"]["channel_order"]
    if summary["channel_order"] != wanted:
        raise DatasetError(
            f"{prefix} holds {summary['channel_order'].upper()} images but this run's channel_order is "
            f"{wanted!r}: set channel_order={summary['channel_order']!r}, or use a dataset in {wanted.upper()}"
        )
    return summary


def synthetic_cache_root() -> Path | None:
    """``$HEADPOSE_SYNTHETIC_CACHE`` as a folder, or None (no render cache) when unset."""
    value = os.environ.get(SYNTHETIC_CACHE_ENV, "").strip()
    return Path(value) if value else None


def stage_synthetic_dataset(
    s3_client: Any,
    prefix_uri: str,
    settings: Mapping[str, Any],
    log: Log,
    scratch_root: str | Path | None = None,
    cache_root: str | Path | None = None,
) -> dict[str, Any]:
    """Generate the synthetic dataset of ``settings`` into ``prefix_uri`` unless it is there.

    With ``cache_root``, rendered datasets are kept there by settings hash and uploaded
    again from disk when S3 lacks them (the embedded S3 forgets everything when it
    stops). Returns the summary, with ``staged`` saying whether it was staged now.
    """
    existing, sha256 = read_manifest(s3_client, prefix_uri)
    if existing is not None:
        log(f"dataset already staged at {prefix_uri} (manifest present); skipping generation")
        return _reused(s3_client, prefix_uri, existing, sha256, log, scratch_root)

    from headpose.datasets.settings import GENERATOR_VERSION

    if settings["generator_version"] != GENERATOR_VERSION:
        raise DatasetError(
            f"settings name generator version {settings['generator_version']}, "
            f"this code has {GENERATOR_VERSION}"
        )
    if cache_root is None:
        with tempfile.TemporaryDirectory(prefix="synthetic-", dir=scratch_root) as scratch:
            _render_synthetic(Path(scratch), settings, log)
            return _staged_folder(s3_client, Path(scratch), prefix_uri, log)
    return _staged_folder(s3_client, _cached_synthetic(Path(cache_root), settings, log), prefix_uri, log)


def _render_synthetic(folder: Path, settings: Mapping[str, Any], log: Log) -> None:
    """Render in a child interpreter, which renders in a pool of its own.

    Why a child: a Celery prefork worker (the production stack's) is a daemonic process,
    and a daemonic process may not start a process pool; the child is not daemonic, so
    rendering uses every CPU on every executor alike.
    """
    from headpose.datasets.synthetic import default_workers

    workers = default_workers()
    command = [
        sys.executable, "-m", "headpose.datasets.synthetic", "--out", str(folder),
        "--train-per-pose", str(settings["train_per_pose"]), "--eval-per-pose", str(settings["eval_per_pose"]),
        "--seed", str(settings["seed"]), "--images-per-shard", str(settings["images_per_shard"]),
        "--workers", str(workers),
    ]
    if "channel_order" in settings:
        command += ["--channel-order", settings["channel_order"]]
    log(f"generating the synthetic dataset {dict(settings)} in {workers} processes")
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    _run_logged(command, env, log)


def _run_logged(command: list[str], env: Mapping[str, str], log: Log) -> None:
    process = subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log(line.rstrip("\n"))
        code = process.wait()
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)  # the task is being stopped: so is the render
        process.wait()
        raise
    if code != 0:
        raise DatasetError(f"rendering the synthetic dataset failed (exit code {code}); see the log above")


def _cached_synthetic(cache_root: Path, settings: Mapping[str, Any], log: Log) -> Path:
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
    with tempfile.TemporaryDirectory(prefix=".rendering-", dir=cache_root, ignore_cleanup_errors=True) as scratch:
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


def _staged_folder(s3_client: Any, folder: Path, prefix_uri: str, log: Log) -> dict[str, Any]:
    """Validate a dataset made on this worker, then upload it: shards, then the manifest."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    figures = _checked(lambda split: validate_split_files(manifest, folder, split), prefix_uri, "nothing was uploaded")
    etags = upload_shards(s3_client, folder, prefix_uri)
    manifest["validation"] = validation_record(manifest, figures, etags)
    sha256 = upload_manifest(s3_client, manifest, prefix_uri)
    log(f"uploaded {len(etags)} shards and {MANIFEST_FILE} to {prefix_uri}")
    log(f"dataset validation: {summary_line(figures)}")
    return _summary(prefix_uri, manifest, sha256, figures, staged=True)


def _reused(
    s3_client: Any, prefix_uri: str, manifest: Mapping[str, Any], sha256: str, log: Log,
    scratch_root: str | Path | None,
) -> dict[str, Any]:
    """A dataset already in S3, validated: by its recorded figures while its shards' ETags hold."""
    listing = list_dataset(s3_client, prefix_uri)
    missing = [f"{split}-*{SHARD_SUFFIX}" for split in SPLITS if not listing[split]]
    if missing:
        raise DatasetError(f"dataset prefix {prefix_uri} has no {', no '.join(missing)}")
    unlisted = sorted(set(shard_etags(listing)) - listed_shard_files(manifest))
    if unlisted:
        # The training channel is an S3Prefix: the job gets every shard under the prefix
        # and reads them all, so a shard the manifest does not name would train unvalidated.
        raise DatasetError(
            f"dataset {prefix_uri} is refused (training was not started): {', '.join(unlisted)} "
            f"under the prefix {'is' if len(unlisted) == 1 else 'are'} not in {MANIFEST_FILE}; "
            "training reads every shard there. Remove them or add them to the manifest."
        )
    if still_valid(manifest, shard_etags(listing)):
        figures = manifest["validation"]["splits"]
        log(f"dataset validation: unchanged since it was validated (every shard's ETag matches): {summary_line(figures)}")
        return _summary(prefix_uri, manifest, sha256, figures, staged=False)
    log(f"validating {prefix_uri}: downloading its shards and checking them against {MANIFEST_FILE}")
    with tempfile.TemporaryDirectory(prefix="validate-", dir=scratch_root) as scratch:
        def validate(split: str) -> dict:
            from headpose.datasets.store import download_split

            folder = Path(scratch) / split
            download_split(s3_client, prefix_uri, split, folder)
            figures = validate_split_files(manifest, folder, split)
            shutil.rmtree(folder)  # one split on disk at a time
            return figures
        figures = _checked(validate, prefix_uri, "training was not started")
    log(f"dataset validation: {summary_line(figures)}")
    return _summary(prefix_uri, manifest, sha256, figures, staged=False)


def _checked(validate_split: Callable[[str], dict], prefix_uri: str, consequence: str) -> dict[str, dict]:
    try:
        figures = {split: validate_split(split) for split in SPLITS}
    except DatasetInvalid as error:
        raise DatasetError(f"dataset {prefix_uri} is refused ({consequence}): {error}") from None
    problems = problems_of(figures)
    if problems:
        raise DatasetError(
            f"dataset {prefix_uri} is refused ({consequence}): " + "; ".join(problems)
            + f". Figures: {json.dumps(figures, sort_keys=True)}"
        )
    return figures


def _summary(
    prefix_uri: str, manifest: Mapping[str, Any], sha256: str, figures: Mapping[str, Any], *, staged: bool,
) -> dict[str, Any]:
    return {
        "dataset_prefix": prefix_uri,
        "manifest_uri": join_uri(prefix_uri, MANIFEST_FILE),
        "manifest_sha256": sha256,
        "dataset_id": prefix_uri.rstrip("/").rsplit("/", 1)[-1],
        "source": manifest.get("source", "unknown"),
        "staged": staged,
        "channel_order": manifest_channel_order(manifest),
        "train_count": figures["train"]["count"],
        "eval_count": figures["eval"]["count"],
        **{f"{split}_shards": len(manifest["splits"][split]["shards"]) for split in SPLITS},
        "validation": dict(figures),
    }


def check_dataset_prefix(
    s3_client: Any, prefix_uri: str, log: Log, scratch_root: str | Path | None = None,
) -> dict[str, Any]:
    """A given ``s3://`` dataset prefix, validated; ``DatasetError`` naming what is missing or wrong."""
    manifest, sha256 = read_manifest(s3_client, prefix_uri)
    if manifest is None:
        listing = list_dataset(s3_client, prefix_uri)
        missing = [f"{split}-*{SHARD_SUFFIX}" for split in SPLITS if not listing[split]] + [MANIFEST_FILE]
        raise DatasetError(f"dataset prefix {prefix_uri} has no {', no '.join(missing)}")
    return _reused(s3_client, prefix_uri, manifest, sha256, log, scratch_root)


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

    archive_uri = settings["archive_uri"]
    try:
        etag = object_etag(s3_client, archive_uri)
    except DatasetError:
        raise DatasetError(f"the Prima archive {archive_uri} does not exist") from None
    converter_settings = {k: v for k, v in settings.items() if k != "archive_uri"}
    existing, sha256 = read_manifest(s3_client, prefix_uri)
    if existing and existing.get("source_etag") == etag and prima.manifest_matches(
        existing, existing.get("source_sha256", ""), converter_settings
    ):
        log(f"dataset already staged at {prefix_uri} from {archive_uri}; skipping conversion")
        return _reused(s3_client, prefix_uri, existing, sha256, log, scratch_root)

    with tempfile.TemporaryDirectory(prefix="prima-", dir=scratch_root) as scratch:
        archive = Path(scratch) / "HeadPoseImageDatabase.tar.gz"
        log(f"downloading {archive_uri}")
        bucket, key = split_s3_uri(archive_uri)
        s3_client.download_file(bucket, key, str(archive))
        out_dir = Path(scratch) / "shards"
        try:
            manifest = prima.convert_archive(archive, out_dir, converter_settings)
        except prima.PrimaFormatError as error:
            raise DatasetError(f"{archive_uri}: {error}") from None
        archive.unlink()  # the shards are what is left to upload
        manifest.update(source_uri=archive_uri, source_etag=etag)
        (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return _staged_folder(s3_client, out_dir, prefix_uri, log)
