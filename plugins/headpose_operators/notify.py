"""Failure alerts: one line naming the failed task, the training job and the reason.

Two callbacks, one alert:

* every task's ``on_failure_callback`` logs the ``HEADPOSE FAILURE`` line at the end of
  the failed task's log - outside the collapsed "Post Execute" group, where the log
  viewer shows it and its search finds it - and records it for the run;
* the DAG's ``on_failure_callback`` sends the alert, once per failed run: the recorded
  line of the task that failed, or, for a run that timed out, a line of its own.

``HEADPOSE_NOTIFIER=log`` (the default) sends the alert to the log as a ``HEADPOSE ALERT``
line. Any Airflow notifier class can send it instead, with its arguments; the line is in
the template context as ``headpose_failure_line``::

    HEADPOSE_NOTIFIER=airflow.providers.slack.notifications.slack.SlackNotifier
    HEADPOSE_NOTIFIER_KWARGS='{"slack_conn_id": "slack", "channel": "#ml-ops",
                               "text": "{{ headpose_failure_line }}"}'

The same notifier carries release approval requests (``ReleaseRequestNotifier``): a
``HEADPOSE APPROVAL REQUEST`` line with the link to the page where it is answered. Both
lines are in the context as ``headpose_line`` (the failure line also as
``headpose_failure_line``, the request as ``headpose_approval_line``), so one
``HEADPOSE_NOTIFIER_KWARGS`` template serves both.

A notifier that fails to send is logged, never raised: an alert must not turn into a
second failure, nor a request into a failed task.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.notifier import BaseNotifier

if TYPE_CHECKING:
    from airflow.sdk import Context

NOTIFIER_ENV = "HEADPOSE_NOTIFIER"
NOTIFIER_KWARGS_ENV = "HEADPOSE_NOTIFIER_KWARGS"
LINE_KEY = "headpose_failure_line"
ANY_LINE_KEY = "headpose_line"
APPROVAL_LINE_KEY = "headpose_approval_line"
_MAX_REASON = 500


def failure_line(context: Context) -> str:
    """``HEADPOSE FAILURE dag=... run=... task=... training_job_name=... reason=...``."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag = context.get("dag")
    task_id = getattr(ti, "task_id", None) or "-"
    run_id = getattr(dag_run, "run_id", None) or context.get("run_id") or "-"
    reason = context.get("exception")
    if reason is None:  # the DAG's callback: the run failed ("task_failure") or timed out
        why = context.get("reason") or "failed"
        # For "task_failure" Airflow hands the callback the task instance that failed last
        # (its model there carries no state); for a timeout, whichever ran last.
        state = str(getattr(ti, "state", None) or "failed").rsplit(".", 1)[-1].lower()
        if why != "task_failure" or state != "failed":
            task_id = "-"
        reason = f"run {why} (the task's log has the error)" if task_id != "-" else f"run {why}"
    text = _summary(str(reason))
    if isinstance(reason, BaseException):
        text = f"{type(reason).__name__}: {text}"
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return (
        f"HEADPOSE FAILURE dag={getattr(dag, 'dag_id', None) or getattr(ti, 'dag_id', '-')} "
        f"run={run_id} task={task_id} training_job_name={_job_name(ti) or '-'} reason={text}"
    )


def _summary(message: str) -> str:
    """The error's first line, with the reasons it lists, on one line.

    A refusal such as ``invalid run parameters:`` lists its reasons as ``- ...`` lines after
    it; the alert needs them. Anything else after the first line (a traceback, details)
    stays in the task log.
    """
    first, *rest = message.strip().splitlines() or [""]
    items = []
    for line in rest:
        if not line.strip().startswith("- "):
            break
        items.append(line.strip())
    return " ".join([first.strip(), *items])


def _job_name(ti: Any) -> str | None:
    if ti is None:
        return None
    try:
        return ti.xcom_pull(task_ids="plan_run", key="training_job_name")
    except Exception:  # a callback outside a task (the DAG processor) may not reach XCom
        return None


class HeadposeFailureNotifier(BaseNotifier):
    """A task's failure: the line, visible at the end of its log, and recorded for the run's alert."""

    def notify(self, context: Context) -> None:
        line = failure_line(context)
        # Airflow runs failure callbacks inside the collapsed "Post Execute" group of the
        # task log. Closing it first puts the line where the log viewer shows it; the new
        # group swallows what Airflow logs afterwards and the runner's own endgroup closes it.
        self.log.info("::endgroup::")
        self.log.error("%s", line)
        self.log.info("::group::After the failure")
        ti = context.get("ti")
        try:
            ti.xcom_push(key=LINE_KEY, value=line)
        except Exception:  # the alert falls back to a line of its own
            self.log.warning("could not record the failure line for the run's alert")


class HeadposeRunAlert(BaseNotifier):
    """A run's failure (a task's, or the run's timeout): one alert, to the log or a notifier."""

    def __init__(self, forward: BaseNotifier | None = None):
        super().__init__()
        self.forward = forward

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        """Nothing to render: the alert has no templates of its own.

        ``BaseNotifier`` builds a Jinja environment from ``dag.get_template_env`` first, which
        the serialized DAG that ``airflow dags test`` hands to DAG callbacks does not have:
        the alert would fail there before sending anything. A forwarded notifier still
        renders its own templates, with the failure line in the context.
        """

    def notify(self, context: Context) -> None:
        line = _recorded_line(context) or failure_line(context)
        if self.forward is None:
            self.log.error("HEADPOSE ALERT %s", line)
            return
        try:
            self.forward({**context, LINE_KEY: line, ANY_LINE_KEY: line})
        except Exception:
            self.log.exception("the %s notifier could not send the failure line", type(self.forward).__name__)


class ReleaseRequestNotifier(BaseNotifier):
    """A release approval request: the line with the page where it is answered, to the log or a notifier.

    One of the Human-in-the-loop operator's ``notifiers``: called once the request is written.
    """

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        """Nothing to render: the line is made from the request itself (see ``HeadposeRunAlert``)."""

    def notify(self, context: Context) -> None:
        line = approval_request_line(context)
        forward = forwarded_notifier()
        self.log.info("%s", line)
        if forward is None:
            return
        try:
            forward({**context, APPROVAL_LINE_KEY: line, ANY_LINE_KEY: line})
        except Exception:
            self.log.exception("the %s notifier could not send the approval request", type(forward).__name__)


def approval_request_line(context: Context) -> str:
    """``HEADPOSE APPROVAL REQUEST dag=... run=... training_job_name=... answer at <url>: <subject>``."""
    from airflow.providers.standard.operators.hitl import HITLOperator

    ti, task = context.get("ti"), context.get("task")
    try:
        link = HITLOperator.generate_link_to_ui_from_context(context=context)
    except ValueError:  # no [api] base_url: the page is under the UI's Required Actions
        link = "the Airflow UI's Required Actions (set AIRFLOW__API__BASE_URL for a link)"
    return (f"HEADPOSE APPROVAL REQUEST dag={getattr(ti, 'dag_id', '-')} run={getattr(ti, 'run_id', '-')} "
            f"training_job_name={_job_name(ti) or '-'} answer at {link}: {getattr(task, 'subject', '')}")


def _recorded_line(context: Context) -> str | None:
    """The line the failed task recorded, if a task failed (not when the run timed out)."""
    ti, dag = context.get("ti"), context.get("dag")
    if ti is None or dag is None:
        return None
    try:
        lines = ti.xcom_pull(task_ids=list(dag.task_ids), key=LINE_KEY)
    except Exception:
        return None
    found = [line for line in (lines or []) if line]
    return found[0] if found else None


def rollout_alert(context: Context, line: str, log: Any) -> None:
    """A rollback decided by ``headpose_rollout``: ``HEADPOSE ALERT <line>`` in the log, and to
    ``$HEADPOSE_NOTIFIER`` where one is set. The run itself stays green: it did its job."""
    log.error("HEADPOSE ALERT %s", line)
    forward = forwarded_notifier()
    if forward is None:
        return
    try:
        forward({**context, LINE_KEY: line, ANY_LINE_KEY: line})
    except Exception:
        log.exception("the %s notifier could not send the rollout alert", type(forward).__name__)


def failure_notifier() -> HeadposeFailureNotifier:
    """Every task's ``on_failure_callback``: the line in the task's log."""
    return HeadposeFailureNotifier()


def run_alert(environ: dict[str, str] | None = None) -> HeadposeRunAlert:
    """The DAG's ``on_failure_callback``: the alert ``$HEADPOSE_NOTIFIER`` selects."""
    return HeadposeRunAlert(forward=forwarded_notifier(environ))


def forwarded_notifier(environ: dict[str, str] | None = None) -> BaseNotifier | None:
    """The notifier ``$HEADPOSE_NOTIFIER`` names, with ``$HEADPOSE_NOTIFIER_KWARGS`` (None: the log)."""
    env = os.environ if environ is None else environ
    choice = env.get(NOTIFIER_ENV, "").strip() or "log"
    if choice == "log":
        return None
    module, _, name = choice.rpartition(".")
    forward_class = getattr(importlib.import_module(module), name)
    return forward_class(**json.loads(env.get(NOTIFIER_KWARGS_ENV) or "{}"))
