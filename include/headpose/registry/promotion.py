"""Promoting a validated model version: the decision, the record, the ordered writes.

Publishing writes, in this order, so that a crash at any point leaves the old model or the
new one published, never a mix:

1. ``published/history/<job>.json``  the version's record (names every file by URI and sha256)
2. ``published/latest.json``         the pointer: the record again, conditional on the one read
3. ``published/latest/*``            the optional mirror, copied from what the pointer names

The files the record names are the version's immutable ``TFartifacts/<job>/output/``
objects, written by ``upload_frozen_model`` before; nothing published is overwritten.

Champion and challenger: ``validate_model`` scores the new model and the published one on
the same images (``registry.champion``); ``promotion_decision`` says whether the new one
replaces it, and refuses a comparison that would not be fair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from headpose.planning.layout import RunLayout
from headpose.registry.pointer import (
    PointerChangedError,
    now_iso,
    pointer_summary,
    put_json,
    put_pointer,
    read_pointer,
    sync_mirror,
)
from headpose.registry.record import RECORD_VERSION, record_files


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
    """Whether a validated model with ``accuracy`` on the evaluation set replaces the published one.

    ``champion`` is ``champion.evaluate_champion``'s result on the same images. The new
    model is promoted when ``accuracy >= champion accuracy - margin`` and the comparison
    is fair (``comparable``), or when ``force`` is set. A published model that could not
    be evaluated (missing file, wrong checksum, broken graph) does not protect itself.
    """
    if force:
        return Decision(True, "force_publish is set")
    if not champion or not champion.get("present"):
        return Decision(True, "no model is published yet")
    if champion.get("error"):
        return Decision(True, f"the published model could not be evaluated: {champion['error']}")
    if not champion.get("comparable", True):
        return Decision(False, f"not compared: {champion.get('comparison')} "
                        f"({champion.get('training_job_name')} stays published; force_publish replaces it)")
    old = float(champion["accuracy"])
    if accuracy >= old - margin:
        return Decision(True, f"accuracy {accuracy:.4f} >= published {old:.4f} - margin {margin:g} "
                        f"({champion.get('training_job_name')})")
    return Decision(False, f"accuracy {accuracy:.4f} < published {old:.4f} - margin {margin:g} "
                    f"({champion.get('training_job_name')} stays published)")


def publish_record(
    layout: RunLayout,
    version: Mapping[str, Any],
    report: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    *,
    dataset: Mapping[str, Any] | None = None,
    previous: Mapping[str, Any] | None = None,
    attempts: list[str] | None = None,
) -> dict[str, Any]:
    """The version 3 record of ``layout``'s model version (``upload_frozen_model``'s ``version``)."""
    return {
        "version": RECORD_VERSION,
        "training_job_name": layout.training_job_name,
        "published_at": now_iso(),
        "attempts": list(attempts or [layout.training_job_name]),
        "files": {name: dict(entry) for name, entry in version["files"].items()},
        "formats": {name: dict(entry) for name, entry in (version.get("formats") or {}).items()},
        "evaluation_set": report.get("evaluation_set"),
        "dataset": dict(dataset) if dataset else None,
        "metrics": {
            "accuracy": report["accuracy"], "images": report["images"],
            "min_class_recall": report.get("min_class_recall_measured"),
            "parity_max_abs_diff": report["parity_max_abs_diff"],
        },
        "channel_order": version["channel_order"],
        "model_artifact_uri": layout.model_artifact_uri,
        "history_record_uri": layout.history_record_uri,
        "previous": pointer_summary(previous),
        **dict(extra or {}),
    }


def publish_model(
    s3_client: Any,
    layout: RunLayout,
    record: Mapping[str, Any],
    expected_etag: str | None = None,
    *,
    mirror: bool = True,
) -> dict[str, Any]:
    """History record, then the ``latest.json`` pointer, then (``mirror``) ``latest/``.

    ``expected_etag`` is the ETag of the pointer this model was compared against
    (``None``: there was none). If the pointer changed since, ``PointerChangedError`` is
    raised and nothing the pointer names changed (the history record is this version's own).
    """
    put_json(s3_client, layout.history_record_uri, record)
    put_pointer(s3_client, layout.published_pointer_uri, record, expected_etag)
    mirrored = sync_mirror(s3_client, record, layout.published_mirror_prefix) if mirror else []
    return _published(layout, mirrored)


def _published(layout: RunLayout, mirrored: list[str]) -> dict[str, Any]:
    return {
        "published_pointer_uri": layout.published_pointer_uri,
        "history_record_uri": layout.history_record_uri,
        "published_model_uri": layout.frozen_model_uri,
        "mirror_prefix": layout.published_mirror_prefix if mirrored else None,
    }


def promote_if_better(
    s3_client: Any,
    layout: RunLayout,
    *,
    version: Mapping[str, Any],
    report: Mapping[str, Any],
    margin: float = 0.0,
    force: bool = False,
    mirror: bool = True,
    extra: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    attempts: list[str] | None = None,
) -> tuple[Decision, dict[str, Any] | None]:
    """Publish the run's validated version if ``promotion_decision`` says so.

    ``report`` is ``validate_model``'s outcome, with the champion it compared against (and
    the pointer's ETag then). Returns the decision and, when promoted, the published URIs.
    Safe to repeat: a pointer that already names this version counts as published, and
    the mirror is synced again (a crash may have left it half-written).
    """
    champion = report.get("champion") or {}
    current, etag = read_pointer(s3_client, layout.published_pointer_uri)
    frozen_sha = version["files"]["frozen_model.pb"]["sha256"]
    if current and current["training_job_name"] == layout.training_job_name and (
        record_files(current)["frozen_model.pb"]["sha256"] == frozen_sha
    ):
        mirrored = sync_mirror(s3_client, current, layout.published_mirror_prefix) if mirror else []
        return Decision(True, "already published (by an earlier try)"), _published(layout, mirrored)
    decision = promotion_decision(float(report["accuracy"]), champion, margin, force)
    if not decision.promote:
        return decision, None
    if etag != champion.get("pointer_etag") and not force:
        return Decision(False, (
            f"latest.json changed after the comparison (it now names "
            f"{(current or {}).get('training_job_name')}); run again to compare, or set force_publish"
        )), None
    record = publish_record(
        layout, version, report,
        extra={**dict(extra or {}), "promotion": {"reason": decision.reason, "champion": champion or None}},
        dataset=dataset, previous=current, attempts=attempts,
    )
    try:
        return decision, publish_model(s3_client, layout, record, expected_etag=etag, mirror=mirror)
    except PointerChangedError as error:
        return Decision(False, str(error)), None


def run_summary(
    *,
    training_job_name: str,
    decision: Decision,
    report: Mapping[str, Any],
    training: Mapping[str, Any],
    model_uri: str,
    published: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The one-glance account of a run for the ``publish`` log and XCom."""
    champion = report.get("champion") or {}
    return {
        "training_job_name": training_job_name,
        "promoted": decision.promote,
        "reason": decision.reason,
        "accuracy_after": report["accuracy"],
        "accuracy_before": champion.get("accuracy"),
        "previous_training_job_name": champion.get("training_job_name"),
        "evaluation_set": (report.get("evaluation_set") or {}).get("id"),
        "formats": sorted(name for name, f in (report.get("formats") or {}).items() if f.get("accepted")),
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
        f"  accuracy on {summary.get('evaluation_set') or 'the evaluation set'}: before "
        f"{accuracy(summary['accuracy_before'])} ({summary['previous_training_job_name'] or 'nothing published'}), "
        f"after {accuracy(summary['accuracy_after'])}",
        f"  decision: {'promoted' if summary['promoted'] else 'kept the published model'} - {summary['reason']}",
        f"  edge formats: {', '.join(summary.get('formats') or []) or 'none'}",
        f"  billable seconds: {summary['billable_time_in_seconds']}, "
        f"training seconds: {summary['training_time_in_seconds']}",
        f"  model: {summary['model_uri']}",
        f"  {where}",
    ])


def publish_run(
    s3_client: Any,
    plan: Mapping[str, Any],
    training: Mapping[str, Any],
    dataset: Mapping[str, Any],
    report: Mapping[str, Any],
    version: Mapping[str, Any],
    *,
    dag_id: str,
    run_id: str,
) -> tuple[Decision, dict[str, Any]]:
    """``publish``'s work: promote the run's model version or keep the published one; the summary."""
    description = training["Training"]
    layout = RunLayout.from_dict(plan).for_job(training["training_job_name"])
    decision, published = promote_if_better(
        s3_client, layout, version=version, report=report,
        margin=plan["run_params"]["promotion_margin"], force=plan["run_params"]["force_publish"],
        mirror=plan["deployment"]["publish_latest_mirror"], dataset=_dataset_fingerprint(dataset),
        attempts=training.get("attempts"),
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
        training_job_name=layout.training_job_name, decision=decision, report=report,
        training=description, model_uri=layout.frozen_model_uri, published=published,
    )
    return decision, summary


def _dataset_fingerprint(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset a model was trained on, as its record keeps it."""
    return {key: dataset.get(key) for key in (
        "dataset_prefix", "dataset_id", "manifest_uri", "manifest_sha256", "source", "channel_order",
    )}
