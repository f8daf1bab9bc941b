"""Promoting a validated frozen model: the decision, the record, the ordered writes.

Publishing is ordered so that a failure at any point leaves a consistent "latest":

1. ``published/history/<job>.json``  the run's record (never overwritten by another run)
2. ``published/latest/*``            server-side copies of the run's frozen model files
3. ``published/latest.json``         the pointer, written last

Readers should start from ``latest.json``: it names the run's immutable
``TFartifacts/<job>/output/`` files and their sha256, so it is correct even if a
publish died between steps 2 and 3 (then ``latest.json`` still names the previous
model, whose immutable files are untouched).

Champion and challenger: ``validate_model`` evaluates the new model and the one
``latest.json`` names on the same held-out shards (``registry.champion``);
``promotion_decision`` says whether the new one replaces it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from headpose.planning.layout import MANIFEST_FILE, RunLayout, join_uri, split_s3_uri
from headpose.registry.pointer import (
    RECORD_VERSION,
    PointerChangedError,
    PublishError,
    is_missing_key,
    now_iso,
    pointer_summary,
    put_json,
    put_pointer,
    read_pointer,
)


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
        "published_at": now_iso(),
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


def _latest_copies(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(immutable source, latest/ target)`` URI pairs of a record (older ones lack the PNG)."""
    latest = record.get("latest") or {}
    pairs = [(record.get(name), latest.get(name)) for name in (
        "frozen_model_uri", "frozen_model_json_uri", "report_uri", "confusion_png_uri",
    )]
    return [(source, target) for source, target in pairs if source and target]


def copy_to_latest(s3_client: Any, record: Mapping[str, Any]) -> None:
    for source, target in _latest_copies(record):
        source_bucket, source_key = split_s3_uri(source)
        target_bucket, target_key = split_s3_uri(target)
        # Managed copy: server-side, and multipart for objects over 5 GB.
        s3_client.copy({"Bucket": source_bucket, "Key": source_key}, target_bucket, target_key)


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
    put_json(s3_client, layout.history_record_uri, record)
    copy_to_latest(s3_client, record)
    try:
        put_pointer(s3_client, layout.published_pointer_uri, record, expected_etag)
    except PointerChangedError:
        winner, _ = read_pointer(s3_client, layout.published_pointer_uri)
        if winner:
            copy_to_latest(s3_client, winner)
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


def publish_run(
    s3_client: Any,
    plan: Mapping[str, Any],
    training: Mapping[str, Any],
    frozen: Mapping[str, Any],
    report: Mapping[str, Any],
    *,
    dag_id: str,
    run_id: str,
) -> tuple[Decision, dict[str, Any]]:
    """``publish``'s work: promote the run's model or keep the published one; the run summary."""
    layout = RunLayout.from_dict(plan)
    description = training["Training"]
    champion = report.get("champion") or {}
    decision, published = promote_if_better(
        s3_client, layout,
        frozen_model_sha256=frozen["frozen_model_sha256"],
        metrics={"accuracy": report["accuracy"], "images": report["images"],
                 "parity_max_abs_diff": report["parity_max_abs_diff"]},
        champion=champion,
        margin=plan["run_params"]["promotion_margin"],
        force=plan["run_params"]["force_publish"],
        extra={
            "dag_id": dag_id,
            "run_id": run_id,
            "training_job_arn": description.get("TrainingJobArn"),
            "billable_time_in_seconds": description.get("BillableTimeInSeconds"),
            "training_time_in_seconds": description.get("TrainingTimeInSeconds"),
            "final_metrics": {m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList") or []},
        },
    )
    summary = run_summary(
        training_job_name=layout.training_job_name, decision=decision, accuracy=report["accuracy"],
        champion=champion, training=description, model_uri=layout.frozen_model_uri, published=published,
    )
    return decision, summary
