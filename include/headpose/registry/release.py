"""The release step around a person's answer: whether to ask, and what the answer leaves behind.

``prepare_request`` is ``approve_release``'s work before the Human-in-the-loop request:
nobody is asked unless the deployment requires it and ``publish`` would promote the
version now (``promotion.pending_decision``); when someone is, the version is registered in
SageMaker's Model Registry as ``PendingManualApproval`` first, and the request's subject,
body, respondents and deadline are returned. ``record_release`` is the final task's work,
whatever happened: every answer is added to the version's ``approval.json``, and a refusal
(a person's, or the timeout's) marks the version's package ``Rejected`` - nothing under
``published/`` changes.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from headpose.planning.layout import RunLayout
from headpose.planning.profile import DeploymentSettings
from headpose.planning.release_settings import approval_required, assigned_users
from headpose.registry import approval as approvals
from headpose.registry.model_packages import PENDING, REJECTED, ModelRegistry, sync_package
from headpose.registry.promotion import Decision, draft_record, pending_decision
from headpose.registry.summary import run_summary

Log = Callable[[str], None]


def prepare_request(
    s3_client: Any, plan: Mapping[str, Any], training: Mapping[str, Any], dataset: Mapping[str, Any],
    report: Mapping[str, Any], version: Mapping[str, Any], links: Mapping[str, str],
    model_registry: ModelRegistry | None = None,
) -> dict[str, Any]:
    """``{"ask": False, "approval": ...}``, or ``{"ask": True, "subject", "body", "assigned_users", "timeout_seconds"}``."""
    settings = DeploymentSettings.from_dict(plan["deployment"])
    layout = RunLayout.from_dict(plan).for_job(training["training_job_name"])
    params = plan["run_params"]
    decision, _, _, already = pending_decision(s3_client, layout, version, report, params["promotion_margin"],
                                               params["force_publish"], plan["deployment"].get("rollout"))
    if not approval_required(settings):
        return {"ask": False, "approval": approvals.not_asked(False, "release_approval is 'none'")}
    if already or not decision.promote:
        # A model that does not beat the champion is put to nobody; publish says why it keeps it.
        return {"ask": False, "approval": approvals.not_asked(True, f"nobody asked: {decision.reason}")}
    if model_registry:
        sync_package(model_registry, draft_record(plan, training, dataset, report, version), PENDING,
                     f"waiting for a person's approval: {decision.reason}"[:1024])
    return {
        "ask": True,
        "subject": approvals.request_subject(layout.training_job_name),
        "body": approvals.request_body(plan=plan, training=training, dataset=dataset, report=report,
                                       decision_reason=decision.reason, links=links),
        "assigned_users": assigned_users(settings.approvers),
        "timeout_seconds": settings.approval_timeout_seconds,
    }


def record_release(
    s3_client: Any, plan: Mapping[str, Any], training: Mapping[str, Any], dataset: Mapping[str, Any],
    report: Mapping[str, Any], version: Mapping[str, Any], approval: Mapping[str, Any],
    model_registry: ModelRegistry | None = None, *, log: Log = print,
) -> dict[str, Any] | None:
    """Keep the answer with the version's evidence; a refusal also in the Model Registry.

    Returns the run summary of a refused release (None otherwise: ``publish`` gives it).
    Safe to repeat: the same answer is kept once, the package set to what it holds.
    """
    layout = RunLayout.from_dict(plan).for_job(training["training_job_name"])
    if approval.get("asked"):
        uri = approvals.record_answer(s3_client, layout.version_prefix, layout.training_job_name, approval)
        log(f"{approval['reason']}; kept in {uri}")
    else:
        log(f"no person was asked: {approval.get('reason')}")
    refusal = approvals.approval_refusal(approval)
    if not (approval.get("asked") and refusal):
        return None
    if model_registry:
        sync_package(model_registry, draft_record(plan, training, dataset, report, version), REJECTED, refusal[:1024])
    log(f"release refused: nothing under {layout.published_prefix} changed")
    return run_summary(training_job_name=layout.training_job_name, decision=Decision(False, refusal), report=report,
                       training=training["Training"], model_uri=layout.frozen_model_uri, published=None,
                       approval=approval)
