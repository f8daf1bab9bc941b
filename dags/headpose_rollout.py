"""
### Head-pose rollout

Moves the **stable channel** from the devices' health, where the deployment profile has a
`rollout` (DESIGN.md, Publishing): `headpose_retraining`'s `publish` puts a new model on
`published/channels/canary.json` only; this DAG reads the devices' reports
(`devices/<device id>/status.json`) and

`assess_rollout` -> `act`

* **assess_rollout** reads both channels and every report (malformed, foreign and stale
  reports are counted and ignored) and decides: **promote** the canary to stable when at
  least `min_canaries` canaries have run it for `soak_minutes` within `max_error_rate`;
  **rollback** the canary to the stable version when its error rate (inference errors and
  failed loads) or its p95 latency against stable's is over the bound; otherwise nothing,
  and the log says why. The fleet table (versions x devices, health) is in its log and XCom.
* **act** writes the decision record `published/rollouts/<run id>.json`, then moves the
  channel (a promote: stable, then `latest.json`, then the mirror). A rollback logs
  `HEADPOSE ALERT` (and `$HEADPOSE_NOTIFIER` forwards it). Nothing to do: skipped, with the
  reason. A cleared `act` re-applies its run's record; it never decides again.

Schedule: `$HEADPOSE_ROLLOUT_SCHEDULE` (default every 15 minutes; `none`: manual) where the
profile has a `rollout`; without one it never runs by itself. By hand:
`python -m headpose.registry --bucket <bucket> promote|rollback --channel canary`.
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task

try:
    import headpose  # noqa: F401
except ImportError:  # a checkout run without PYTHONPATH=include: the package sits beside dags/
    sys.path.append(str(Path(__file__).resolve().parents[1] / "include"))

from headpose.planning import scheduling  # noqa: E402
from headpose.planning.params import param_schemas  # noqa: E402
from headpose.planning.profile import load_profile  # noqa: E402
from headpose_operators.notify import failure_notifier, run_alert  # noqa: E402

DAG_ID = "headpose_rollout"
AWS_CONN_ID = "aws_default"


def _params() -> dict[str, Param]:
    """Where the channels are: the retraining DAG's bucket and folder (their defaults too)."""
    params = {}
    for name, spec in param_schemas().items():
        if name in ("s3_bucket", "headpose_folder"):
            schema = {k: v for k, v in spec.items() if k != "section"}
            params[name] = Param(schema.pop("default"), description=schema.pop("description"), **schema)
    return params


@dag(
    dag_id=DAG_ID,
    schedule=scheduling.rollout_schedule(bool(load_profile().settings.rollout)),
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    params=_params(),
    default_args={"owner": scheduling.owner(), "on_failure_callback": failure_notifier()},
    on_failure_callback=run_alert(),
    tags=["headpose", "rollout"],
    description="Promotes the canary to stable, or rolls it back, from the devices' reports",
    doc_md=__doc__,
)
def headpose_rollout():
    @task(**scheduling.task_args("assess_rollout"))
    def assess_rollout() -> dict:
        """Reads the channels and the devices' reports; decides promote, rollback or nothing (no writes)."""
        from airflow.sdk.exceptions import AirflowSkipException

        from headpose.fleet.decision import format_table
        from headpose.fleet.rollout import assess_now

        settings, (bucket, folder) = load_profile().settings, _where()
        if not settings.rollout:
            raise AirflowSkipException("no rollout in the deployment profile: publish moves latest.json directly")
        assessment = assess_now(_s3(settings), bucket, folder, settings.rollout, datetime.now(timezone.utc))
        print(format_table(assessment["rows"]))
        print(f"decision: {assessment['action']} - {assessment['reason']}")
        return assessment

    @task(**scheduling.task_args("act"))
    def act(assessment: dict) -> dict:
        """Writes the decision record, then moves the channel; alerts on a rollback; skipped when nothing to do."""
        from airflow.sdk.exceptions import AirflowSkipException

        from headpose.fleet.rollout import act as apply_assessment
        from headpose_operators.notify import rollout_alert

        context = get_current_context()
        settings, (bucket, folder) = load_profile().settings, _where()
        dag_run = {"dag_id": DAG_ID, "run_id": context["dag_run"].run_id}
        result = apply_assessment(_s3(settings), bucket=bucket, folder=folder, rollout=settings.rollout,
                                  assessment=assessment, dag_run=dag_run, mirror=settings.publish_latest_mirror)
        if not result["applied"]:
            raise AirflowSkipException(f"nothing to do: {result['reason']}")
        print(f"{result['action']}: {result['reason']} (decision {result['decision_uri']})")
        if result["action"] == "rollback":
            job = (result.get("canary") or {}).get("training_job_name")
            rollout_alert(context, f"rollout dag={DAG_ID} run={dag_run['run_id']} rolled back {job}: "
                                   f"{result['reason']}", context["ti"].log)
        return {key: result.get(key) for key in ("id", "action", "reason", "decision_uri", "figures")}

    act(assess_rollout())


def _where() -> tuple[str, str]:
    params = get_current_context()["params"]
    return params["s3_bucket"], params["headpose_folder"]


def _s3(settings):
    from headpose_operators.s3 import s3_client

    return s3_client(AWS_CONN_ID, settings.expected_bucket_owner, settings.kms_key_id)


headpose_rollout()
