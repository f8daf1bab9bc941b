"""Promoting a validated frozen model, the published pointer, and rolling it back.

Publishing is ordered so that a failure at any point leaves a consistent "latest":

1. ``published/history/<job>.json``  the run's record (never overwritten by another run)
2. ``published/latest/*``            server-side copies of the run's frozen model files
3. ``published/latest.json``         the pointer, written last

Readers should start from ``latest.json``: it names the run's immutable
``TFartifacts/<job>/output/`` files and their sha256, so it is correct even if a
publish died between steps 2 and 3 (then ``latest.json`` still names the previous
model, whose immutable files are untouched).

Champion and challenger: ``validate_model`` evaluates the new model and the one
``latest.json`` names on the same held-out shards; ``promotion_decision`` says whether
the new one replaces it. The pointer is written with ``If-Match`` on the ETag that was
compared against (``If-None-Match: *`` when nothing was published), so a model published
by someone else in the meantime is never overwritten unseen.

Command line (``python -m headpose.registry.promotion --help``): ``show``, ``history`` and
``rollback --to <training_job_name>``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from headpose.planning.layout import (
    DEFAULT_FOLDER,
    MANIFEST_FILE,
    RunLayout,
    is_valid_training_job_name,
    join_uri,
    s3_uri,
    split_s3_uri,
)

RECORD_VERSION = 2
POINTER_NAME = "latest.json"
Log = Callable[[str], None]


class PublishError(RuntimeError):
    """The published state is not what publishing or a rollback needs; the message says why."""


class PointerChangedError(PublishError):
    """``latest.json`` changed between reading it and replacing it."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def is_missing_key(error: Exception) -> bool:
    """Whether a boto3 error says the key (or object) does not exist."""
    from botocore.exceptions import ClientError

    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in (
        "NoSuchKey", "404", "NotFound",
    )


def _is_precondition_failed(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in (
        "PreconditionFailed", "412",
    )


# -- reading what is published -------------------------------------------------------

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


def dataset_fingerprint(s3_client: Any, dataset_prefix: str) -> dict[str, Any]:
    """The dataset a model was trained on: its prefix, manifest URI and manifest sha256."""
    manifest_uri = join_uri(dataset_prefix, MANIFEST_FILE)
    bucket, key = split_s3_uri(manifest_uri)
    try:
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        if is_missing_key(error):
            raise PublishError(f"the dataset manifest {manifest_uri} is gone") from None
        raise
    manifest = json.loads(body)
    return {
        "dataset_prefix": dataset_prefix,
        "dataset_id": dataset_prefix.rstrip("/").rsplit("/", 1)[-1],
        "manifest_uri": manifest_uri,
        "manifest_sha256": hashlib.sha256(body).hexdigest(),
        "source": manifest.get("source"),
    }


# -- the decision ----------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def promotion_decision(
    accuracy: float,
    champion: Mapping[str, Any] | None,
    margin: float = 0.0,
    force: bool = False,
) -> Decision:
    """Whether a validated model with held-out ``accuracy`` replaces the published one.

    ``champion`` is ``validation.evaluate_champion``'s result on the same shards
    (``None`` or ``{"present": False}`` when nothing is published). The new model is
    promoted when ``accuracy >= champion accuracy - margin``, or when ``force`` is set.
    A published model that could not be evaluated (missing file, wrong checksum, broken
    graph) does not protect itself: the validated new one replaces it.
    """
    if force:
        return Decision(True, "force_publish is set")
    if not champion or not champion.get("present"):
        return Decision(True, "no model is published yet")
    if champion.get("error"):
        return Decision(True, f"the published model could not be evaluated: {champion['error']}")
    old = float(champion["accuracy"])
    if accuracy >= old - margin:
        return Decision(
            True, f"accuracy {accuracy:.4f} >= published {old:.4f} - margin {margin:g} "
            f"({champion.get('training_job_name')})",
        )
    return Decision(
        False, f"accuracy {accuracy:.4f} < published {old:.4f} - margin {margin:g} "
        f"({champion.get('training_job_name')} stays published)",
    )


# -- publishing ------------------------------------------------------------------------

def publish_record(
    layout: RunLayout,
    frozen_model_sha256: str,
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    *,
    dataset: Mapping[str, Any] | None = None,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``latest.json`` and the history record say about the published model."""
    return {
        "version": RECORD_VERSION,
        "training_job_name": layout.training_job_name,
        "published_at": _now(),
        "frozen_model_uri": layout.frozen_model_uri,
        "frozen_model_sha256": frozen_model_sha256,
        "frozen_model_json_uri": layout.frozen_model_json_uri,
        "report_uri": layout.report_uri,
        "confusion_png_uri": layout.confusion_png_uri,
        "model_artifact_uri": layout.model_artifact_uri,
        "history_record_uri": layout.history_record_uri,
        "dataset_prefix": layout.dataset_prefix,
        "dataset": dict(dataset) if dataset else None,
        "latest": {
            "frozen_model_uri": layout.published_model_uri,
            "frozen_model_json_uri": layout.published_model_json_uri,
            "report_uri": layout.published_report_uri,
            "confusion_png_uri": layout.published_confusion_png_uri,
        },
        "metrics": dict(metrics),
        "previous": pointer_summary(previous),
        **dict(extra or {}),
    }


def _put_json(s3_client: Any, uri: str, document: Mapping[str, Any], **conditions: str) -> None:
    bucket, key = split_s3_uri(uri)
    body = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    s3_client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **conditions)


def _latest_copies(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(immutable source, latest/ target)`` URI pairs of a record (older ones lack the PNG)."""
    latest = record.get("latest") or {}
    pairs = [(record.get(name), latest.get(name)) for name in (
        "frozen_model_uri", "frozen_model_json_uri", "report_uri", "confusion_png_uri",
    )]
    return [(source, target) for source, target in pairs if source and target]


def _copy_to_latest(s3_client: Any, record: Mapping[str, Any]) -> None:
    for source, target in _latest_copies(record):
        source_bucket, source_key = split_s3_uri(source)
        target_bucket, target_key = split_s3_uri(target)
        # Managed copy: server-side, and multipart for objects over 5 GB.
        s3_client.copy({"Bucket": source_bucket, "Key": source_key}, target_bucket, target_key)


def _put_pointer(s3_client: Any, pointer_uri: str, record: Mapping[str, Any], expected_etag: str | None) -> None:
    condition = {"IfMatch": expected_etag} if expected_etag else {"IfNoneMatch": "*"}
    try:
        _put_json(s3_client, pointer_uri, record, **condition)
    except Exception as error:
        if _is_precondition_failed(error) or (expected_etag and is_missing_key(error)):
            raise PointerChangedError(
                f"{pointer_uri} changed while this model was being published "
                f"(expected {'ETag ' + expected_etag if expected_etag else 'no pointer'})"
            ) from None
        raise


def publish_model(
    s3_client: Any,
    layout: RunLayout,
    record: Mapping[str, Any],
    expected_etag: str | None = None,
) -> dict[str, str]:
    """History record, then copies under ``latest/``, then the ``latest.json`` pointer.

    ``expected_etag`` is the ETag of the pointer this model was compared against
    (``None``: there was none). If the pointer changed since, ``PointerChangedError`` is
    raised and ``latest/`` is put back to the files the pointer names.
    """
    _put_json(s3_client, layout.history_record_uri, record)
    _copy_to_latest(s3_client, record)
    try:
        _put_pointer(s3_client, layout.published_pointer_uri, record, expected_etag)
    except PointerChangedError:
        winner, _ = read_pointer(s3_client, layout.published_pointer_uri)
        if winner:
            _copy_to_latest(s3_client, winner)
        raise
    return {
        "published_pointer_uri": layout.published_pointer_uri,
        "history_record_uri": layout.history_record_uri,
        "published_model_uri": layout.published_model_uri,
    }


def promote_if_better(
    s3_client: Any,
    layout: RunLayout,
    *,
    frozen_model_sha256: str,
    metrics: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    margin: float = 0.0,
    force: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Decision, dict[str, str] | None]:
    """Publish the run's validated model if ``promotion_decision`` says so.

    ``champion`` is what ``validate_model`` compared against (with the pointer's ETag
    then). Returns the decision and, when promoted, the published URIs. Safe to repeat:
    a pointer that already names this run's graph counts as published.
    """
    champion = champion or {}
    current, etag = read_pointer(s3_client, layout.published_pointer_uri)
    published = {
        "published_pointer_uri": layout.published_pointer_uri,
        "published_model_uri": layout.published_model_uri,
    }
    if current and current["training_job_name"] == layout.training_job_name and (
        current.get("frozen_model_sha256") == frozen_model_sha256
    ):
        return Decision(True, "already published (by an earlier try)"), published
    decision = promotion_decision(float(metrics["accuracy"]), champion, margin, force)
    if not decision.promote:
        return decision, None
    if etag != champion.get("pointer_etag") and not force:
        return Decision(False, (
            f"latest.json changed after the comparison (it now names "
            f"{(current or {}).get('training_job_name')}); run again to compare, or set force_publish"
        )), None
    record = publish_record(
        layout, frozen_model_sha256, metrics,
        extra={**dict(extra or {}), "promotion": {"reason": decision.reason, "champion": champion or None}},
        dataset=dataset_fingerprint(s3_client, layout.dataset_prefix), previous=current,
    )
    try:
        publish_model(s3_client, layout, record, expected_etag=etag)
    except PointerChangedError as error:
        return Decision(False, str(error)), None
    return decision, published


def run_summary(
    *,
    training_job_name: str,
    decision: Decision,
    accuracy: float,
    champion: Mapping[str, Any] | None,
    training: Mapping[str, Any],
    model_uri: str,
    published: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The one-glance account of a run for the ``publish`` log and XCom."""
    champion = champion or {}
    return {
        "training_job_name": training_job_name,
        "promoted": decision.promote,
        "reason": decision.reason,
        "accuracy_after": accuracy,
        "accuracy_before": champion.get("accuracy"),
        "previous_training_job_name": champion.get("training_job_name"),
        "billable_time_in_seconds": training.get("BillableTimeInSeconds"),
        "training_time_in_seconds": training.get("TrainingTimeInSeconds"),
        "model_uri": model_uri,
        "published_pointer_uri": (published or {}).get("published_pointer_uri"),
        "published_model_uri": (published or {}).get("published_model_uri"),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    def accuracy(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    where = (
        f"published: {summary['published_model_uri']} (pointer {summary['published_pointer_uri']})"
        if summary["promoted"] else "not published; latest.json unchanged"
    )
    return "\n".join([
        f"run summary: {summary['training_job_name']}",
        f"  accuracy: before {accuracy(summary['accuracy_before'])} "
        f"({summary['previous_training_job_name'] or 'nothing published'}), "
        f"after {accuracy(summary['accuracy_after'])}",
        f"  decision: {'promoted' if summary['promoted'] else 'kept the published model'} - {summary['reason']}",
        f"  billable seconds: {summary['billable_time_in_seconds']}, "
        f"training seconds: {summary['training_time_in_seconds']}",
        f"  model: {summary['model_uri']}",
        f"  {where}",
    ])


# -- history and rollback --------------------------------------------------------------

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


def _sha256_of_object(s3_client: Any, uri: str) -> str:
    bucket, key = split_s3_uri(uri)
    digest = hashlib.sha256()
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"]
    for block in iter(lambda: body.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


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
        actual = _sha256_of_object(s3_client, target["frozen_model_uri"])
    except Exception as error:
        if not is_missing_key(error):
            raise
        raise PublishError(f"{target['frozen_model_uri']} is gone; cannot roll back to {to_job}") from None
    if actual != target["frozen_model_sha256"]:
        raise PublishError(
            f"{target['frozen_model_uri']} has sha256 {actual}, its history record says "
            f"{target['frozen_model_sha256']}; refusing to roll back to a changed file"
        )
    now = _now()
    pointer = {
        **target,
        "published_at": now,
        "rolled_back": {"at": now, "from": (current or {}).get("training_job_name")},
        "previous": pointer_summary(current),
    }
    _copy_to_latest(s3_client, target)
    _put_pointer(s3_client, pointer_uri, pointer, etag)
    log(f"{pointer_uri} now names {to_job} (was {(current or {}).get('training_job_name')})")
    return pointer


# -- command line ----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m headpose.registry.promotion",
        description="Inspect the published head-pose model and roll it back. AWS credentials "
        "and region come from the usual boto3 sources (environment, profile, instance role).",
    )
    parser.add_argument("--bucket", required=True, help="the s3_bucket of the runs")
    parser.add_argument("--folder", default=DEFAULT_FOLDER, help="the headpose_folder (default: headpose)")
    parser.add_argument("--endpoint-url", default=None, help="an S3-compatible endpoint (e.g. moto, MinIO)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="print latest.json")
    commands.add_parser("history", help="list every published model, oldest first")
    back = commands.add_parser("rollback", help="point latest.json at an earlier published model")
    back.add_argument("--to", dest="to_job", default=None,
                      help="training_job_name to restore (default: the pointer's previous)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import boto3

    args = build_parser().parse_args(argv)
    s3_client = boto3.client("s3", endpoint_url=args.endpoint_url)
    try:
        if args.command == "show":
            record, _ = read_pointer(s3_client, join_uri(published_prefix(args.bucket, args.folder), POINTER_NAME))
            print(json.dumps(record, indent=2, sort_keys=True))
        elif args.command == "history":
            for record in history(s3_client, args.bucket, args.folder):
                accuracy = (record.get("metrics") or {}).get("accuracy")
                print(f"{record.get('published_at')}  {record['training_job_name']}  accuracy={accuracy}")
        else:
            rollback(s3_client, args.bucket, args.folder, args.to_job)
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

