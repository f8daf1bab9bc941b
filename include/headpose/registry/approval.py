"""A person's approval of a release: when to ask, what they are shown, what their answer leaves.

Where the deployment sets ``release_approval=required``, ``approve_release`` asks - through
the standard provider's Human-in-the-loop operator, answered in the Airflow UI or its REST
API - only when ``publish`` would promote the version (``promotion.pending_decision``): a
model that does not beat the champion is put to nobody. The request shows, without opening
anything else, the job, the accuracy before and after on the evaluation set with its id,
the paired comparison, each class's recall before and after with the worst change marked,
the edge formats that passed with their accuracy and speed, the dataset, the training cost,
and links to the report page and the confusion matrices.

An answer (or the timeout, whose default answer is Reject) becomes the approval record
``{"required", "decision", "by", "at", "comment"}`` that the published record carries, and
is kept with the version's evidence in ``TFartifacts/<job>/output/approval.json`` - every
answer the version got, so a refusal stays on file after a later approval.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping

from headpose.planning.layout import split_s3_uri

APPROVED, REJECTED = "approved", "rejected"
NOT_REQUIRED, NOT_ASKED = "not_required", "not_asked"
APPROVAL_FILE = "approval.json"
APPROVE_OPTION, REJECT_OPTION = "Approve", "Reject"  # the ApprovalOperator's options


def approval_refusal(approval: Mapping[str, Any] | None) -> str | None:
    """Why a version may not be published for want of a person's approval (None: it may)."""
    if not approval or not approval.get("required") or approval.get("decision") == APPROVED:
        return None
    return f"not approved: {approval.get('reason') or approval.get('decision')}"


def approval_summary(approval: Mapping[str, Any] | None) -> dict[str, Any]:
    """The record's ``approval``: ``{"required", "decision", "by", "at", "comment"}``."""
    approval = approval or {}
    if not approval.get("required"):
        return {"required": False, "decision": NOT_REQUIRED, "by": None, "at": None, "comment": None}
    return {key: approval.get(key) for key in ("required", "decision", "by", "at", "comment")}


def not_asked(required: bool, reason: str) -> dict[str, Any]:
    """The approval task's answer when nobody is asked: none required, or nothing to publish."""
    return {"required": required, "asked": False, "decision": NOT_ASKED if required else NOT_REQUIRED,
            "by": None, "at": None, "comment": None, "reason": reason}


def answer(event: Mapping[str, Any], *, asked_at: str | None, timeout: str, link: str | None) -> dict[str, Any]:
    """The approval record of a Human-in-the-loop answer (the operator's resume event).

    A timeout answers the request's default, Reject, with nobody as its author: a
    rejection, kept as such (``timed_out``), never a task failure.
    """
    chosen = list(event.get("chosen_options") or [])
    responded = event.get("responded_at")
    at = responded.isoformat() if isinstance(responded, datetime) else responded
    user = event.get("responded_by_user") or {}
    comment = ((event.get("params_input") or {}).get("comment") or "").strip() or None
    timed_out = bool(event.get("timedout")) or not user
    decision = APPROVED if chosen == [APPROVE_OPTION] and not timed_out else REJECTED
    if timed_out:
        reason = f"no answer within {timeout} (a timeout is a rejection)"
    else:
        reason = f"{decision} by {user.get('name')} at {at}" + (f": {comment}" if comment else "")
    return {"required": True, "asked": True, "decision": decision, "by": None if timed_out else user.get("name"),
            "at": at, "comment": comment, "timed_out": timed_out, "reason": reason, "asked_at": asked_at,
            "request_link": link}


def request_subject(training_job_name: str) -> str:
    return f"Release {training_job_name} to the devices?"


def request_body(
    *, plan: Mapping[str, Any], training: Mapping[str, Any], dataset: Mapping[str, Any],
    report: Mapping[str, Any], decision_reason: str, links: Mapping[str, str],
) -> str:
    """What the approver reads (Markdown): everything the decision rests on, and where the evidence is."""
    from headpose.artifacts.comparison import describe
    from headpose.artifacts.confusion_plot import recall_changes

    champion = report.get("champion") or {}
    evaluation_set = report.get("evaluation_set") or {}
    description = training.get("Training") or {}
    job = training["training_job_name"]
    set_name = f"`{evaluation_set.get('id')}`" + (" (pinned by the deployment)" if evaluation_set.get("pinned") else "")
    lines = [
        f"**{job}** would replace the published model for every device: {decision_reason}.", "",
        f"| accuracy on {set_name} | model | images |", "|---|---|---|",
        f"| before: {_figure(champion.get('accuracy'))} | {champion.get('training_job_name') or 'nothing published'} "
        f"| {champion.get('images') or '-'} |",
        f"| **after: {_figure(report['accuracy'])}** | {job} | {report['images']} |", "",
    ]
    if report.get("comparison"):
        lines += [f"Paired comparison on the same images: {describe(report['comparison'])}.", ""]
    lines += ["| class (pan / tilt) | before | after | change |", "|---|---|---|---|"]
    for row in recall_changes(report.get("per_class_recall") or {}, champion.get("per_class_recall")):
        change = "-" if row["change"] is None else f"{row['change']:+.3f}"
        lines.append(f"| {row['label']} | {_figure(row['before'], 3)} | {_figure(row['after'], 3)} | "
                     + (f"**{change} (worst)**" if row["worst"] else change) + " |")
    formats = {name: f for name, f in (report.get("formats") or {}).items() if f.get("accepted")}
    lines += ["", "| edge format (passed) | accuracy | batch-1 latency (ms) |", "|---|---|---|"]
    lines += [f"| {name} | {_figure(f.get('accuracy'))} | {_figure(f.get('latency_ms_b1'), 2)} |"
              for name, f in sorted(formats.items())] or ["| none | - | - |"]
    lines += [
        "",
        f"Dataset: `{dataset.get('dataset_id')}` ({dataset.get('source')}"
        + (f"; {dataset['train_count']} training, {dataset.get('eval_count')} evaluation images"
           if dataset.get("train_count") else "") + f") at `{dataset.get('dataset_prefix')}`.",
        f"Training: {description.get('BillableTimeInSeconds')} billable seconds "
        f"({description.get('TrainingTimeInSeconds')} s of training, {plan['run_params']['backend']} backend).",
        "",
        " · ".join(f"[{title}]({links[key]})" for key, title in (
            ("report_page", "Report"), ("confusion_matrix", "Confusion matrices"), ("report", "report.json"))
            if links.get(key)),
        "",
        "Approve publishes it; Reject (a comment is kept with the version's evidence) leaves the published model "
        f"as it is. Without an answer within {plan['deployment']['approval_timeout']} the request is rejected.",
    ]
    return "\n".join(lines)


def _figure(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def evidence_uri(version_prefix: str) -> str:
    """Where a version's approval answers are kept, beside its report."""
    return version_prefix + APPROVAL_FILE


def record_answer(s3_client: Any, version_prefix: str, training_job_name: str, approval: Mapping[str, Any]) -> str:
    """Add ``approval`` to the version's ``approval.json`` (once: a re-run adds nothing); its URI."""
    from headpose.registry.pointer import is_missing_key, put_json

    uri = evidence_uri(version_prefix)
    bucket, key = split_s3_uri(uri)
    try:
        document = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception as error:
        if not is_missing_key(error):
            raise
        document = {"training_job_name": training_job_name, "answers": []}
    entry = {k: approval.get(k) for k in ("decision", "by", "at", "comment", "timed_out", "asked_at", "request_link")}
    if entry not in document["answers"]:
        document["answers"] = sorted([*document["answers"], entry], key=lambda a: a.get("at") or "")
        put_json(s3_client, uri, document)
    return uri
