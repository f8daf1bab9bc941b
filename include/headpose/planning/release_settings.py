"""Release governance settings: who approves a model before devices get it, and for how long a request waits.

The deployment profile (``planning.profile``) holds them: ``release_approval`` (``none`` |
``required``), ``approvers`` (Airflow user names) and ``approval_timeout``. The approval task
asks only where they say so; ``release_problems`` are the rules ``plan_run`` checks with
the others, before anything is written. Standard library only.
"""
from __future__ import annotations

from datetime import timedelta
from headpose.planning.profile import MIN_APPROVAL_SECONDS, DeploymentSettings

REQUIRED = "required"


def approval_required(settings: DeploymentSettings) -> bool:
    return settings.release_approval == REQUIRED


def approval_wait(settings: DeploymentSettings) -> timedelta:
    """How long a run may wait for an answer (nothing when no approval is required)."""
    return timedelta(seconds=settings.approval_timeout_seconds) if approval_required(settings) else timedelta(0)


def assigned_users(approvers: list[str] | None) -> list[dict[str, str]] | None:
    """The Human-in-the-loop operator's ``assigned_users`` for the deployment's ``approvers``.

    Airflow keys a respondent by the auth manager's user id; FAB's is a number, which a
    profile cannot know, so each approver is given by name as both id and name, and the
    stack's auth manager (``headpose_operators.auth``) also accepts a user's name.
    """
    return [{"id": name, "name": name} for name in approvers] if approvers else None


def release_problems(settings: DeploymentSettings) -> list[str]:
    """What in the release settings cannot work, in words (empty: nothing)."""
    problems = []
    if settings.approvers and not approval_required(settings):
        problems.append("approvers are named but release_approval is 'none': nobody is asked; "
                        "set release_approval to 'required' or remove approvers")
    if settings.approval_timeout_seconds < MIN_APPROVAL_SECONDS:
        problems.append(f"approval_timeout={settings.approval_timeout!r} is shorter than {MIN_APPROVAL_SECONDS} s: "
                        "nobody could answer in time")
    return problems


def approval_time_problems(
    settings: DeploymentSettings, training_time: timedelta, dagrun_timeout: timedelta | None,
) -> list[str]:
    """Why a run could time out while it waits for an answer.

    ``training_time`` is the longest the run's training job may take (``train``'s timeout):
    a run that waits for an answer after it must still end inside ``dagrun_timeout``, or the
    run would time out before the request does and the refusal would read as a failure.
    """
    wait = approval_wait(settings)
    if wait and dagrun_timeout is not None and training_time + wait >= dagrun_timeout:
        return [
            f"the training job may take {training_time} and the approval may wait {wait} "
            f"(approval_timeout={settings.approval_timeout}), longer than the DAG's dagrun_timeout of "
            f"{dagrun_timeout}; shorten approval_timeout or raise $HEADPOSE_DAGRUN_TIMEOUT_HOURS"
        ]
    return []

