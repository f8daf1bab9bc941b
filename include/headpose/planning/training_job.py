"""What to do about a run's training job, given what SageMaker says about it.

The job name is the run's (``layout.training_job_name``), so a retried ``train`` task
finds the job its first try started. ``next_step`` turns the job's description (or its
absence) into one decision; the operator in ``plugins/`` only carries it out. Kept free
of Airflow and boto3 so that every state can be tested without either.

``training_summary`` is the part of a finished job's description that the run records
next to its name in XCom: times, final metrics and the spot saving.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Sequence

# DescribeTrainingJob's TrainingJobStatus values.
RUNNING_STATUSES = frozenset({"InProgress", "Stopping"})
FAILED_STATUSES = frozenset({"Failed", "Stopped"})
COMPLETED = "Completed"


class Step(str, Enum):
    CREATE = "create"  # no job of that name: start it
    WAIT = "wait"  # running (or stopping): attach and wait for its end
    DONE = "done"  # completed: its result is the task's
    FAIL = "fail"  # failed or stopped: report why; never start a second, billed job


class TrainingJobError(RuntimeError):
    """The run's training job cannot give this run a model; the message says why."""


def next_step(description: Mapping[str, Any] | None) -> Step:
    """The decision for a job described by ``describe_training_job`` (``None``: no such job)."""
    if description is None:
        return Step.CREATE
    status = description.get("TrainingJobStatus")
    if status in RUNNING_STATUSES:
        return Step.WAIT
    if status == COMPLETED:
        return Step.DONE
    if status in FAILED_STATUSES:
        return Step.FAIL
    # A status this code does not know: creating or waiting could both be wrong.
    raise TrainingJobError(
        f"training job {description.get('TrainingJobName')} has status {status!r}, "
        f"which this pipeline does not know how to handle"
    )


def failure_message(description: Mapping[str, Any]) -> str:
    """The error for a failed or stopped job: its status, its ``FailureReason``, what to do."""
    job = description.get("TrainingJobName", "?")
    status = description.get("TrainingJobStatus", "?")
    reason = description.get("FailureReason") or "(SageMaker gave no FailureReason)"
    return (
        f"training job {job} is {status}: {reason}. Its name belongs to this run, so it is "
        "not started again; trigger a new run to train again."
    )


def foreign_job_problems(description: Mapping[str, Any], request: Mapping[str, Any]) -> list[str]:
    """Ways in which an existing job of the run's name differs from the run's request.

    A job name is derived from the logical time only; a job with that name but other
    hyperparameters or S3 locations was not started by this run, and its artifact is
    not where this run will look for it.
    """
    # Only what the request set is compared: SageMaker's description adds defaults
    # (OutputDataConfig.CompressionType, KmsKeyId, ...) that the request left out.
    problems = []
    theirs_hps = description.get("HyperParameters") or {}
    changed = sorted(k for k, v in (request.get("HyperParameters") or {}).items() if theirs_hps.get(k) != v)
    if changed:
        problems.append(f"hyperparameters {changed} differ")
    ours_output = request.get("OutputDataConfig", {}).get("S3OutputPath")
    theirs_output = description.get("OutputDataConfig", {}).get("S3OutputPath")
    if ours_output != theirs_output:
        problems.append(f"S3OutputPath differs ({theirs_output} vs {ours_output})")
    ours = [c["DataSource"]["S3DataSource"]["S3Uri"] for c in request.get("InputDataConfig", [])]
    theirs = [c["DataSource"]["S3DataSource"]["S3Uri"] for c in description.get("InputDataConfig", [])]
    if ours != theirs:
        problems.append(f"input channels differ ({theirs} vs {ours})")
    return problems


def training_summary(description: Mapping[str, Any]) -> dict[str, Any]:
    """What the run records about a completed job, next to its name.

    ``spot_savings_percent`` follows the DescribeTrainingJob documentation:
    ``(1 - BillableTimeInSeconds / TrainingTimeInSeconds) * 100``, for managed spot
    training only. Times SageMaker did not report stay ``None`` rather than guessed.
    """
    billable = description.get("BillableTimeInSeconds")
    training = description.get("TrainingTimeInSeconds")
    spot = bool(description.get("EnableManagedSpotTraining"))
    saving = None
    if spot and billable is not None and training:
        saving = round(100.0 * (1.0 - billable / training), 1)
    return {
        "training_job_name": description["TrainingJobName"],
        "training_job_status": description.get("TrainingJobStatus"),
        "billable_time_in_seconds": billable,
        "training_time_in_seconds": training,
        "final_metrics": {
            m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList") or []
        },
        "managed_spot_training": spot,
        "spot_savings_percent": saving,
    }


# -- attempts: a new job after a failed one -----------------------------------------------

# FailureReason words of failures that another job may not meet: no capacity for the
# instance type, or SageMaker's own internal error (its documentation says to retry both).
TRANSIENT_FAILURES = ("CapacityError", "InsufficientCapacity", "InternalServerError")


# The part of those that is about capacity: the job never trained, so what its attempt
# checkpointed (or the one before it) is sound to resume from.
CAPACITY_FAILURES = ("CapacityError", "InsufficientCapacity")


def attempt_job_name(first_job: str, attempt: int) -> str:
    """The run's ``attempt``-th job name: ``<job>`` first, then ``<job>-2``, ``<job>-3``..."""
    if attempt < 1:
        raise ValueError(f"attempts count from 1, got {attempt}")
    return first_job if attempt == 1 else f"{first_job}-{attempt}"


def is_transient_failure(description: Mapping[str, Any]) -> bool:
    reason = str(description.get("FailureReason") or "")
    return any(word in reason for word in TRANSIENT_FAILURES)


def is_capacity_failure(description: Mapping[str, Any]) -> bool:
    reason = str(description.get("FailureReason") or "")
    return any(word in reason for word in CAPACITY_FAILURES)


def attempt_request(request: Mapping[str, Any], job: str, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's request for its attempt ``job``, after ``previous`` (the last attempt's description).

    Spot checkpoints are resumed only after a failure for capacity, from the checkpoints
    the previous attempt used; after any other failure (an ``AlgorithmError``, a stop, an
    internal error) the attempt starts from fresh ones under its own name, so that it
    cannot resume the state that failed.
    """
    attempt = {**request, "TrainingJobName": job}
    checkpoints = request.get("CheckpointConfig")
    if not checkpoints or previous is None:
        return attempt
    if is_capacity_failure(previous):
        uri = (previous.get("CheckpointConfig") or checkpoints)["S3Uri"]
    else:
        uri = checkpoints["S3Uri"].replace(f"/{request['TrainingJobName']}/", f"/{job}/")
    attempt["CheckpointConfig"] = {**checkpoints, "S3Uri": uri}
    return attempt


def is_fresh_try(try_number: int, max_tries: int, retries: int) -> bool:
    """Whether a task's try is the first of its sequence: a new run's, or the first after a clear.

    Airflow sets ``max_tries`` to ``retries`` for a new task instance and to
    ``try_number + retries`` when a person clears it, so the first try of either sequence
    has ``max_tries - try_number == retries - 1``; an automatic retry has less.
    """
    return max_tries - try_number >= retries - 1


@dataclass(frozen=True)
class AttemptStep:
    step: Step
    training_job_name: str
    reason: str


def next_attempt(
    descriptions: Sequence[Mapping[str, Any]], first_job: str, *, fresh_try: bool, max_training_attempts: int,
) -> AttemptStep:
    """What ``train`` does given the run's jobs so far (``descriptions`` of attempt 1, 2, ...).

    The latest attempt decides: none yet, create the first; running, wait for it; completed,
    take it. Failed or stopped: start the next attempt only when this try is a person's
    clear (``fresh_try``) or the failure is transient, and the run has attempts left - so
    an automatic retry never restarts a job that failed for a reason another job would
    meet too, and no two attempts of a run are ever in progress together.
    """
    if not descriptions:
        return AttemptStep(Step.CREATE, attempt_job_name(first_job, 1), "no training job yet")
    latest, number = descriptions[-1], len(descriptions)
    name = attempt_job_name(first_job, number)
    step = next_step(latest)
    if step is not Step.FAIL:
        return AttemptStep(step, name, f"{name} is {latest.get('TrainingJobStatus')}")
    why = f"{name} is {latest.get('TrainingJobStatus')}: {latest.get('FailureReason') or 'no FailureReason'}"
    if number >= max_training_attempts:
        return AttemptStep(Step.FAIL, name, f"{why}; the run has used its {max_training_attempts} training job(s)")
    if fresh_try:
        return AttemptStep(Step.CREATE, attempt_job_name(first_job, number + 1), f"{why}; train was cleared")
    if is_transient_failure(latest):
        return AttemptStep(Step.CREATE, attempt_job_name(first_job, number + 1), f"{why}; a transient failure")
    return AttemptStep(Step.FAIL, name, f"{why}; not started again (clear train to try another job)")
