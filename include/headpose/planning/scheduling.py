"""When the retraining DAG runs and how long and how often each task may try.

Operators change these through the environment of the scheduler and workers (the same
value everywhere), not by editing the DAG:

``HEADPOSE_SCHEDULE``                 cron expression or preset; ``none`` = manual runs only
                                      (default ``@weekly``)
``HEADPOSE_AWS_RETRIES``              retries of the tasks that call AWS (default 3)
``HEADPOSE_RETRY_DELAY_SECONDS``      first retry delay; doubles per try (default 60)
``HEADPOSE_MAX_RETRY_DELAY_SECONDS``  cap of that delay (default 1800)
``HEADPOSE_DAGRUN_TIMEOUT_HOURS``     a run still going after this fails (default 192 = 8 days:
                                      the 7-day spot wait ceiling plus every other task, plus the
                                      profile's approval_timeout where it requires an approval)
``HEADPOSE_OWNER``                    the team the UI shows as the DAG's owner (default ml-platform)
``HEADPOSE_TRAINING_POLL_SECONDS``    how often ``train`` asks SageMaker for its job's status, and
                                      the provider's trigger when it defers (default 30); a store
                                      whose jobs end at once (moto) sets it low
``HEADPOSE_NEW_DATA_POLL_SECONDS``    with ``retrain_on`` data or either: the pause of the new-data
                                      watcher after a 20 s long poll of the queue found nothing
                                      (default 60, the provider's ``waiter_delay``)

``HEADPOSE_ROLLOUT_SCHEDULE``         how often ``headpose_rollout`` reads the devices' reports where the
                                      profile has a ``rollout`` (default every 15 minutes; ``none`` =
                                      manual only); without one it never runs by itself

Environment rather than an Airflow Variable: it is read at every DAG parse, and a
Variable lookup there is a metadata-database query per parse.

Standard library only: the DAG file imports this module at parse time.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Mapping

SCHEDULE_ENV = "HEADPOSE_SCHEDULE"
OWNER_ENV = "HEADPOSE_OWNER"
DEFAULT_OWNER = "ml-platform"
DEFAULT_SCHEDULE = "@weekly"
DISABLED = ("none", "off", "manual")
TRAINING_POLL_ENV = "HEADPOSE_TRAINING_POLL_SECONDS"
DEFAULT_TRAINING_POLL_SECONDS = 30
NEW_DATA_POLL_ENV = "HEADPOSE_NEW_DATA_POLL_SECONDS"
DEFAULT_NEW_DATA_POLL_SECONDS = 60

# The train task's timeout at parse time, before the run's request is known: the default
# spot wait ceiling (max_wait_seconds, 7 days). ``train_timeout`` sets the run's own.
DEFAULT_TRAIN_SECONDS = 604_800
# Beyond MaxRuntimeInSeconds, a training job needs time to get an instance, download the
# channels and upload the model (SageMaker's own stopping condition excludes some of it).
TRAIN_MARGIN = timedelta(hours=1)

# Execution timeouts sized to each job at the tutorial's scale (ResNet-50, the Prima
# database; a few GB of shards and a ~100 MB model); generous, they stop hung tasks.
TASK_TIMEOUTS: dict[str, timedelta] = {
    "plan_run": timedelta(minutes=10),
    "assess_rollout": timedelta(minutes=10),  # lists and reads at most 5000 reports of 16 KiB
    "act": timedelta(minutes=30),  # a promote copies the version's files to the mirror
    "claim_data_version": timedelta(minutes=30),  # the sha256 of the archive: streams it once
    "stage_dataset": timedelta(hours=3),  # generate / convert and upload every shard
    "package_code": timedelta(minutes=15),
    "train": timedelta(seconds=DEFAULT_TRAIN_SECONDS) + TRAIN_MARGIN,
    "download_artifact": timedelta(hours=1),
    "freeze_graph": timedelta(hours=1),
    # Seven conversions of a ResNet-50, three of them int8 with calibration: 218 s on two shared
    # cores with 93 calibration images (bench_edge.py; onnx_int8 82 s, openvino_int8 56 s); the
    # task calibrates on up to 200.
    "export_edge_models": timedelta(hours=1),
    "validate_model": timedelta(hours=3),  # two models over the whole held-out split on CPU
    "upload_frozen_model": timedelta(minutes=30),
    # The wait for a person is the operator's response_timeout (approval_timeout), not this:
    # this bounds only the work before and after it (the request, the Model Registry).
    "approve_release": timedelta(minutes=15),
    "publish": timedelta(minutes=15),
    "record_release": timedelta(minutes=15),
    "record_data_version": timedelta(minutes=15),
    "cleanup": timedelta(minutes=15),
}
# Tasks whose failures are mostly the network or AWS: these retry with backoff. The
# others retry once, for a worker that died under them.
AWS_TASKS = frozenset({
    "assess_rollout", "act",
    "claim_data_version", "record_data_version",
    "stage_dataset", "package_code", "train", "download_artifact", "freeze_graph", "export_edge_models",
    "validate_model", "upload_frozen_model", "approve_release", "publish", "record_release",
})


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${name}={raw!r} is not a number") from None
    if value < minimum:
        raise ValueError(f"${name}={raw!r} must be at least {minimum:g}")
    return value


def schedule(environ: Mapping[str, str] | None = None) -> str | None:
    """``$HEADPOSE_SCHEDULE`` (Airflow checks the expression), ``None`` when disabled."""
    value = _env(environ).get(SCHEDULE_ENV, "").strip()
    if not value:
        return DEFAULT_SCHEDULE
    if value.lower() in DISABLED:
        return None
    # Airflow checks the expression itself; this only makes a typo name the variable.
    if not value.startswith("@") and not 5 <= len(value.split()) <= 7:
        raise ValueError(f"${SCHEDULE_ENV}={value!r} is not a cron expression, a preset such as "
                         f"@weekly, or 'none'")
    return value


ROLLOUT_SCHEDULE_ENV = "HEADPOSE_ROLLOUT_SCHEDULE"
DEFAULT_ROLLOUT_SCHEDULE = "*/15 * * * *"


def rollout_schedule(has_rollout: bool, environ: Mapping[str, str] | None = None) -> str | None:
    """``headpose_rollout``'s schedule: ``$HEADPOSE_ROLLOUT_SCHEDULE`` where a rollout is configured, else None."""
    if not has_rollout:
        return None
    value = _env(environ).get(ROLLOUT_SCHEDULE_ENV, "").strip()
    if not value:
        return DEFAULT_ROLLOUT_SCHEDULE
    if value.lower() in DISABLED:
        return None
    if not value.startswith("@") and not 5 <= len(value.split()) <= 7:
        raise ValueError(f"${ROLLOUT_SCHEDULE_ENV}={value!r} is not a cron expression, a preset or 'none'")
    return value


def owner(environ: Mapping[str, str] | None = None) -> str:
    """The team shown as the DAG's owner in the UI (``$HEADPOSE_OWNER``, default ml-platform)."""
    return _env(environ).get(OWNER_ENV, "").strip() or DEFAULT_OWNER


def training_poll_seconds(environ: Mapping[str, str] | None = None) -> int:
    """Seconds between two status requests of ``train`` (its ``check_interval``).

    30 is the provider's own default: a training job takes minutes to hours, so polling
    faster only costs API calls. moto finishes a job at once, and then every run would
    wait one whole interval for nothing.
    """
    return int(_number(_env(environ), TRAINING_POLL_ENV, DEFAULT_TRAINING_POLL_SECONDS, minimum=1))


def new_data_poll_seconds(environ: Mapping[str, str] | None = None) -> int:
    """The new-data watcher's ``waiter_delay``: seconds between long polls that found nothing.

    The 20 s long poll already returns as soon as a message arrives; the pause only spaces
    the requests on an empty queue. Tests set it to 1.
    """
    return int(_number(_env(environ), NEW_DATA_POLL_ENV, DEFAULT_NEW_DATA_POLL_SECONDS, minimum=0))


def dagrun_timeout(environ: Mapping[str, str] | None = None) -> timedelta:
    """How long a run may take; it ends a stuck run, so that the next one can start.

    A run longer than the schedule's interval does not overlap the next one
    (``max_active_runs=1``): the next waits for it.
    """
    env = _env(environ)
    if env.get("HEADPOSE_DAGRUN_TIMEOUT_HOURS", "").strip():
        return timedelta(hours=_number(env, "HEADPOSE_DAGRUN_TIMEOUT_HOURS", 192, minimum=1))
    from headpose.planning.profile import load_profile
    from headpose.planning.release_settings import approval_wait

    return timedelta(hours=192) + approval_wait(load_profile(env).settings)


def retry_args(task_id: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``retries``/``retry_delay``/backoff keyword arguments for the task ``task_id``."""
    env = _env(environ)
    delay = timedelta(seconds=_number(env, "HEADPOSE_RETRY_DELAY_SECONDS", 60, minimum=0))
    if task_id not in AWS_TASKS:
        return {"retries": 1, "retry_delay": delay}
    return {
        "retries": int(_number(env, "HEADPOSE_AWS_RETRIES", 3, minimum=0)),
        "retry_delay": delay,
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(
            seconds=_number(env, "HEADPOSE_MAX_RETRY_DELAY_SECONDS", 1800, minimum=1)
        ),
    }


def task_args(task_id: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything task-specific the DAG passes to ``task_id``: timeout and retries."""
    return {"execution_timeout": TASK_TIMEOUTS[task_id], **retry_args(task_id, environ)}


def train_timeout(stopping_condition: Mapping[str, Any]) -> timedelta:
    """The train task's timeout for a request's ``StoppingCondition``.

    The job may take its ``MaxRuntimeInSeconds`` or, on spot capacity, its
    ``MaxWaitTimeInSeconds`` (waiting included), plus ``TRAIN_MARGIN``.
    """
    seconds = max(
        int(stopping_condition.get("MaxRuntimeInSeconds") or 0),
        int(stopping_condition.get("MaxWaitTimeInSeconds") or 0),
    )
    return timedelta(seconds=seconds) + TRAIN_MARGIN


def run_time_problems(stopping_condition: Mapping[str, Any], timeout: timedelta | None) -> list[str]:
    """Why a training job with this ``StoppingCondition`` cannot end inside ``dagrun_timeout``."""
    needed = train_timeout(stopping_condition)
    if timeout is None or needed < timeout:
        return []
    return [
        f"the training job may take {needed} (max_run_seconds or, with spot, max_wait_seconds, "
        f"plus {TRAIN_MARGIN} of set-up), longer than the DAG's dagrun_timeout of {timeout}; "
        "lower it or raise $HEADPOSE_DAGRUN_TIMEOUT_HOURS"
    ]
