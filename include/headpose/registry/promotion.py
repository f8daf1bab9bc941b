"""Promoting a validated model version: the decision, the record, the ordered writes.

Publishing writes, in this order, so that a crash at any point leaves the old model or the
new one published, never a mix:

1. ``published/history/<job>.json``  the version's record (names every file by URI and sha256)
2. ``published/latest.json``         the pointer: the record again, conditional on the one read
3. ``published/latest/*``            the optional mirror, copied from what the pointer names

The files the record names are the version's immutable ``TFartifacts/<job>/output/``
objects, written by ``upload_frozen_model`` before; nothing published is overwritten.

Champion and challenger: ``validate_model`` scores the new model and the published one on
the same images (``registry.champion``) and compares them image by image
(``artifacts.comparison``); ``promotion_decision`` says whether the new one replaces it on
that paired verdict, and refuses a comparison that would not be fair. Where the deployment
requires a person's approval (``registry.approval``), nothing is published without it.

After the pointer, SageMaker's Model Registry (``registry.model_packages``) is brought in
line: the version's package ``Approved`` when published, ``Rejected`` when not promoted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from headpose.planning.layout import RunLayout
from headpose.registry import channels
from headpose.registry.approval import approval_refusal, approval_summary
from headpose.registry.model_packages import APPROVED, PENDING, REJECTED, ModelRegistry, sync_package
from headpose.registry.pointer import (
    PointerChangedError,
    now_iso,
    pointer_summary,
    put_json,
    put_pointer,
    read_pointer,
    record_sha256,
    sync_mirror,
)
from headpose.registry.record import RECORD_VERSION, record_files
from headpose.registry.summary import run_summary


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def promotion_decision(
    accuracy: float,
    champion: Mapping[str, Any] | None,
    margin: float = 0.0,
    force: bool = False,
    comparison: Mapping[str, Any] | None = None,
) -> Decision:
    """Whether a validated model with ``accuracy`` on the evaluation set replaces the published one.

    ``champion`` is ``champion.evaluate_champion``'s result on the same images, and
    ``comparison`` the paired comparison with it (``artifacts.comparison``): its rule's
    ``promote`` decides. Without one (an evaluation with no per-image results) the new model
    is promoted when ``accuracy >= champion accuracy - margin``. A comparison that is not
    fair (``comparable`` false) decides nothing; ``force`` promotes anyway. A published
    model that could not be evaluated (missing file, wrong checksum, broken graph) does not
    protect itself.
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
    old, job = float(champion["accuracy"]), champion.get("training_job_name")
    if comparison:
        low, high = comparison["interval"]
        figures = (f"accuracy {accuracy:.4f} vs published {old:.4f}, difference {comparison['difference']:+.4f} "
                   f"({comparison['confidence']:.0%} interval {low:+.4f} to {high:+.4f})")
        if comparison["promote"]:
            return Decision(True, f"{figures}: {comparison['reason']} ({job})")
        return Decision(False, f"{figures}: {comparison['reason']} ({job} stays published)")
    if accuracy >= old - margin:
        return Decision(True, f"accuracy {accuracy:.4f} >= published {old:.4f} - margin {margin:g} ({job})")
    return Decision(False, f"accuracy {accuracy:.4f} < published {old:.4f} - margin {margin:g} ({job} stays published)")


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
        **({"greengrass": dict(version["greengrass"])} if version.get("greengrass") else {}),
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


def _publish_canary(
    s3_client: Any, layout: RunLayout, record: Mapping[str, Any], canary: tuple[dict[str, Any] | None, str | None],
    decision: Decision, rollout: Mapping[str, Any],
) -> dict[str, Any]:
    """With a rollout: history record, decision ``publish-<job>``, ``canary.json``; stable waits for the devices."""
    stable = channels.read_channels(s3_client, layout.bucket, layout.folder)["stable"]
    dag_run = {"dag_id": record.get("dag_id"), "run_id": record.get("run_id")} if record.get("run_id") else None
    moved = channels.decision_record(
        f"publish-{layout.training_job_name}", "canary", decision.reason, at=now_iso(), by="publish",
        canary=record, stable=stable, rollout=rollout, dag_run=dag_run)
    channels.publish_canary(s3_client, layout.bucket, layout.folder, record, layout.history_record_uri, canary,
                            moved, rollout)
    return {**_published(layout, [], layout.canary_pointer_uri), "channel": "canary",
            "stable_training_job_name": (stable or {}).get("training_job_name")}


def _published(layout: RunLayout, mirrored: list[str], pointer_uri: str | None = None) -> dict[str, Any]:
    return {
        "published_pointer_uri": pointer_uri or layout.published_pointer_uri,
        "history_record_uri": layout.history_record_uri,
        "published_model_uri": layout.frozen_model_uri,
        "mirror_prefix": layout.published_mirror_prefix if mirrored else None,
    }


def pending_decision(
    s3_client: Any,
    layout: RunLayout,
    version: Mapping[str, Any],
    report: Mapping[str, Any],
    margin: float = 0.0,
    force: bool = False,
    rollout: Mapping[str, Any] | None = None,
) -> tuple[Decision, dict[str, Any] | None, str | None, bool]:
    """What ``publish`` would decide now: ``(decision, pointer record, its ETag, already published)``.

    The approval task asks a person only when this promotes; ``publish`` acts on it. With a
    ``rollout`` the pointer is ``canary.json`` (what publish moves), the champion the stable
    channel, and a champion that changed is told by its version, not its pointer's ETag.
    """
    champion = report.get("champion") or {}
    frozen_sha = version["files"]["frozen_model.pb"]["sha256"]
    if rollout:
        (current, etag), stable, already = channels.pending_canary(
            s3_client, layout.bucket, layout.folder, layout.training_job_name, frozen_sha, rollout)
        if already:
            return Decision(True, "already published to a channel (by an earlier try)"), current, etag, True
        compared = {"training_job_name": champion.get("training_job_name"),
                    "frozen_sha256": champion.get("frozen_model_sha256")}
        now = channels.version_of(stable) or {}
        if compared["frozen_sha256"] is None:  # a champion whose record named no graph: its job alone
            now = {**now, "frozen_sha256": None}
        changed = bool(stable or champion.get("present")) and (now or None) != compared
    else:
        current, etag = read_pointer(s3_client, layout.published_pointer_uri)
        if current and current["training_job_name"] == layout.training_job_name and (
            record_files(current)["frozen_model.pb"]["sha256"] == frozen_sha
        ):
            return Decision(True, "already published (by an earlier try)"), current, etag, True
        stable, changed = current, etag != champion.get("pointer_etag")
    decision = promotion_decision(float(report["accuracy"]), champion, margin, force, report.get("comparison"))
    if decision.promote and changed and not force:
        decision = Decision(False, (
            f"{'the stable channel' if rollout else 'latest.json'} changed after the comparison (it now names "
            f"{(stable or {}).get('training_job_name')}); run again to compare, or set force_publish"
        ))
    return decision, current, etag, False


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
    approval: Mapping[str, Any] | None = None,
    model_registry: ModelRegistry | None = None,
    rollout: Mapping[str, Any] | None = None,
) -> tuple[Decision, dict[str, Any] | None]:
    """Publish the run's validated version if ``promotion_decision`` says so (and, where required, a person).

    ``report`` is ``validate_model``'s outcome, with the champion it compared against (and
    the pointer's ETag then); ``approval`` the approval task's answer. Returns the decision
    and, when promoted, the published URIs. Safe to repeat: a pointer that already names
    this version counts as published, and the mirror and the Model Registry are synced
    again (a crash may have left them behind the pointer).
    """
    decision, current, etag, already = pending_decision(s3_client, layout, version, report, margin, force, rollout)
    if already:
        mirrored = sync_mirror(s3_client, current, layout.published_mirror_prefix) if mirror and not rollout else []
        _sync_published(s3_client, model_registry, current, layout, read_back=True)
        if rollout:
            return decision, {**_published(layout, [], layout.canary_pointer_uri), "channel": "canary"}
        return decision, _published(layout, mirrored)
    refusal = approval_refusal(approval)
    if decision.promote and refusal:
        decision = Decision(False, refusal)
    record = publish_record(
        layout, version, report,
        extra={**dict(extra or {}), "promotion": {"reason": decision.reason, "champion": report.get("champion") or None},
               "comparison": report.get("comparison"), "approval": approval_summary(approval)},
        dataset=dataset, previous=current, attempts=attempts,
    )
    if not decision.promote:
        if model_registry and not (refusal and (approval or {}).get("asked")):  # record_release keeps a person's
            sync_package(model_registry, record, REJECTED, f"not promoted: {decision.reason}")
        return decision, None
    if model_registry:  # the package exists before the pointer names it, so that the record can name it
        package = sync_package(model_registry, record, PENDING, f"being published: {decision.reason}")
        record["model_package"] = {"group": package["model_package_group"], "arn": package["model_package_arn"],
                                   "status": APPROVED}
    try:
        if rollout:
            published = _publish_canary(s3_client, layout, record, (current, etag), decision, rollout)
        else:
            published = publish_model(s3_client, layout, record, expected_etag=etag, mirror=mirror)
    except PointerChangedError as error:
        if model_registry:
            sync_package(model_registry, record, REJECTED, f"not published: {error}")
        return Decision(False, str(error)), None
    _sync_published(s3_client, model_registry, record, layout)
    return decision, published


def _sync_published(
    s3_client: Any, model_registry: ModelRegistry | None, record: Mapping[str, Any], layout: RunLayout,
    read_back: bool = False,
) -> None:
    """The published version's package ``Approved``, naming its history record (after the pointer)."""
    if not model_registry:
        return
    if read_back:  # an earlier try wrote it: its own bytes, whatever the pointer holds now
        from headpose.registry.pointer import sha256_of_object

        sha256 = sha256_of_object(s3_client, layout.history_record_uri)
    else:
        sha256 = record_sha256(record)
    sync_package(model_registry, record, APPROVED, f"published: latest.json names {layout.training_job_name}",
                 published={"uri": layout.history_record_uri, "sha256": sha256})


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
    approval: Mapping[str, Any] | None = None,
    model_registry: ModelRegistry | None = None,
    greengrass: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> tuple[Decision, dict[str, Any]]:
    """``publish``'s work: promote the run's model version or keep the published one; the summary.

    ``greengrass`` creates the version's Greengrass component once it is published (a retry
    creates it again: ``fleet.greengrass.create_component`` is idempotent).
    """
    layout = RunLayout.from_dict(plan).for_job(training["training_job_name"])
    decision, published = promote_if_better(
        s3_client, layout, version=version, report=report,
        margin=plan["run_params"]["promotion_margin"], force=plan["run_params"]["force_publish"],
        mirror=plan["deployment"]["publish_latest_mirror"], dataset=_dataset_fingerprint(dataset),
        attempts=training.get("attempts"), extra=run_extra(training, dag_id, run_id),
        approval=approval, model_registry=model_registry, rollout=plan["deployment"].get("rollout"),
    )
    summary = run_summary(
        training_job_name=layout.training_job_name, decision=decision, report=report,
        training=training["Training"], model_uri=layout.frozen_model_uri, published=published, approval=approval,
    )
    if greengrass and decision.promote:
        from headpose.fleet.greengrass import create_published_component

        summary["greengrass_component"] = create_published_component(s3_client, version, greengrass)
    return decision, summary


def run_extra(training: Mapping[str, Any], dag_id: str, run_id: str) -> dict[str, Any]:
    """What the record keeps of the run and its training job."""
    description = training["Training"]
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "training_job_arn": description.get("TrainingJobArn"),
        "billable_time_in_seconds": description.get("BillableTimeInSeconds"),
        "training_time_in_seconds": description.get("TrainingTimeInSeconds"),
        "final_metrics": {m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList") or []},
    }


def draft_record(
    plan: Mapping[str, Any], training: Mapping[str, Any], dataset: Mapping[str, Any], report: Mapping[str, Any],
    version: Mapping[str, Any],
) -> dict[str, Any]:
    """The record the version would be published with (for the Model Registry before it is)."""
    layout = RunLayout.from_dict(plan).for_job(training["training_job_name"])
    return publish_record(layout, version, report, dataset=_dataset_fingerprint(dataset),
                          attempts=training.get("attempts"))


def _dataset_fingerprint(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset a model was trained on, as its record keeps it."""
    return {key: dataset.get(key) for key in (
        "dataset_prefix", "dataset_id", "manifest_uri", "manifest_sha256", "source", "channel_order",
    )}
