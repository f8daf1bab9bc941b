"""The run summary: one account of a run, at the end of ``publish``'s log (or ``record_release``'s) and in its XCom.

Job, accuracy before and after on the evaluation set, the paired comparison, the approval,
the decision, the edge formats, the training cost and where the model went.
"""
from __future__ import annotations

from typing import Any, Mapping

from headpose.registry.approval import approval_summary


def run_summary(
    *,
    training_job_name: str,
    decision: Any,  # promotion.Decision (promotion imports this module)
    report: Mapping[str, Any],
    training: Mapping[str, Any],
    model_uri: str,
    published: Mapping[str, Any] | None,
    approval: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The one-glance account of a run for the ``publish`` (or ``record_release``) log and XCom."""
    champion = report.get("champion") or {}
    return {
        "training_job_name": training_job_name,
        "promoted": decision.promote,
        "reason": decision.reason,
        "accuracy_after": report["accuracy"],
        "accuracy_before": champion.get("accuracy"),
        "previous_training_job_name": champion.get("training_job_name"),
        "evaluation_set": (report.get("evaluation_set") or {}).get("id"),
        "comparison": report.get("comparison"),
        "approval": {**approval_summary(approval), "reason": (approval or {}).get("reason")},
        "formats": sorted(name for name, f in (report.get("formats") or {}).items() if f.get("accepted")),
        "billable_time_in_seconds": training.get("BillableTimeInSeconds"),
        "training_time_in_seconds": training.get("TrainingTimeInSeconds"),
        "model_uri": model_uri,
        "published_pointer_uri": (published or {}).get("published_pointer_uri"),
        "published_model_uri": (published or {}).get("published_model_uri"),
        "channel": (published or {}).get("channel"),
        "stable_training_job_name": (published or {}).get("stable_training_job_name"),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    from headpose.artifacts.comparison import describe

    def accuracy(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    where = (
        f"published: {summary['published_model_uri']} (pointer {summary['published_pointer_uri']})"
        if summary["promoted"] else "not published; latest.json unchanged"
    )
    if summary["promoted"] and summary.get("channel") == "canary":
        where = (f"published to the canary channel: {summary['published_model_uri']} (pointer "
                 f"{summary['published_pointer_uri']}); stable ({summary.get('stable_training_job_name') or 'nothing'}) "
                 "moves when the canaries are healthy (headpose_rollout)")
    approval = summary.get("approval") or {}
    lines = [
        f"run summary: {summary['training_job_name']}",
        f"  accuracy on {summary.get('evaluation_set') or 'the evaluation set'}: before "
        f"{accuracy(summary['accuracy_before'])} ({summary['previous_training_job_name'] or 'nothing published'}), "
        f"after {accuracy(summary['accuracy_after'])}",
    ]
    if summary.get("comparison"):
        lines.append(f"  paired comparison: {describe(summary['comparison'])}")
    if approval.get("required"):
        lines.append(f"  approval: {approval.get('reason') or approval.get('decision')}")
    return "\n".join(lines + [
        f"  decision: {'promoted' if summary['promoted'] else 'kept the published model'} - {summary['reason']}",
        f"  edge formats: {', '.join(summary.get('formats') or []) or 'none'}",
        f"  billable seconds: {summary['billable_time_in_seconds']}, "
        f"training seconds: {summary['training_time_in_seconds']}",
        f"  model: {summary['model_uri']}",
        f"  {where}",
    ])
