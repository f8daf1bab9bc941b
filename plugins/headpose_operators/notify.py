"""Failure alerts: one line naming the failed task, the training job and the reason.

``failure_notifier()`` is what the DAG registers as its task and DAG
``on_failure_callback``. The line is always logged (``HEADPOSE_NOTIFIER=log``, the
default). To send it somewhere too, name any Airflow notifier class and its arguments;
the line is in the template context as ``headpose_failure_line``::

    HEADPOSE_NOTIFIER=airflow.providers.slack.notifications.slack.SlackNotifier
    HEADPOSE_NOTIFIER_KWARGS='{"slack_conn_id": "slack", "channel": "#ml-ops",
                               "text": "{{ headpose_failure_line }}"}'

A notifier that fails to send is logged, never raised: an alert must not turn into a
second failure.
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
        reason = f"run {context.get('reason') or 'failed'}"
        if str(getattr(ti, "state", "")) not in ("failed", "TaskInstanceState.FAILED"):
            task_id = "-"  # the run's last task instance, not necessarily the one that failed
    # The first line of the error says what broke; tracebacks belong in the task log.
    text = (str(reason).strip().splitlines() or [""])[0]
    if isinstance(reason, BaseException):
        text = f"{type(reason).__name__}: {text}"
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return (
        f"HEADPOSE FAILURE dag={getattr(dag, 'dag_id', None) or getattr(ti, 'dag_id', '-')} "
        f"run={run_id} task={task_id} training_job_name={_job_name(ti) or '-'} reason={text}"
    )


def _job_name(ti: Any) -> str | None:
    if ti is None:
        return None
    try:
        return ti.xcom_pull(task_ids="plan_run", key="training_job_name")
    except Exception:  # a callback outside a task (the DAG processor) may not reach XCom
        return None


class HeadposeFailureNotifier(BaseNotifier):
    """Logs the failure line and hands it to an optional second notifier."""

    def __init__(self, forward: BaseNotifier | None = None):
        super().__init__()
        self.forward = forward

    def notify(self, context: Context) -> None:
        line = failure_line(context)
        self.log.error("%s", line)
        if self.forward is None:
            return
        try:
            self.forward({**context, LINE_KEY: line})
        except Exception:
            self.log.exception("the %s notifier could not send the failure line", type(self.forward).__name__)


def failure_notifier(environ: dict[str, str] | None = None) -> HeadposeFailureNotifier:
    """The notifier ``$HEADPOSE_NOTIFIER`` selects (``log``, or a notifier class path)."""
    env = os.environ if environ is None else environ
    choice = env.get(NOTIFIER_ENV, "").strip() or "log"
    if choice == "log":
        return HeadposeFailureNotifier()
    module, _, name = choice.rpartition(".")
    forward_class = getattr(importlib.import_module(module), name)
    kwargs = json.loads(env.get(NOTIFIER_KWARGS_ENV) or "{}")
    return HeadposeFailureNotifier(forward=forward_class(**kwargs))
