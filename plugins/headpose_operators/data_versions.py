"""``claim_data_version`` and ``record_data_version``: a data version is trained once.

The Airflow shell of ``headpose.registry.data_versions``: the claim runs right after
``plan_run`` (which writes nothing, so that a refused run leaves nothing behind) as the
setup of everything that trains, and the record is settled by its teardown, which runs
however the run ends. Clearing any task between them runs the claim again, which finds
the run's own record; a run that lost its claim meanwhile trains nothing.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator

# A claim whose run Airflow does not know (another deployment's) holds this long when the
# DAG sets no dagrun_timeout: a week, the longest spot wait.
DEFAULT_LEASE = timedelta(days=7)


def _run_state(dag_id: str, run_id: str) -> str | None:
    """Airflow's state of a run, None when this Airflow does not know it (or cannot say now)."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    try:
        state = RuntimeTaskInstance.get_dagrun_state(dag_id, run_id)
    except Exception:  # not found, or the API did not answer: the claim's expiry decides
        return None
    return getattr(state, "value", state)


class ClaimDataVersionOperator(BaseOperator):
    """Claims the run's data version, or skips everything that would train it again.

    :param plan: ``plan_run``'s result (templated)
    :param aws_conn_id: the AWS connection
    :return: ``{"claimed": bool, ...}``: the version's id, record URI and sha256 when claimed
    """

    template_fields = ("plan",)
    # What the UI shows on the task unless the DAG says otherwise.
    DOC = ("Claims the run's data version (`data-versions/<id>.json`, written only if absent) before anything "
           "trains on it. A version already trained with the same settings - published or refused - is not "
           "trained again: this task and every task that would train are then skipped, and the log and XCom "
           "`summary` name the run that trained it (`force_retrain` trains it anyway). Runs of a deployment "
           "that retrains on the schedule alone claim nothing when a person starts them.")

    def __init__(self, *, plan: Any, aws_conn_id: str = "aws_default", **kwargs: Any):
        kwargs.setdefault("doc_md", self.DOC)
        super().__init__(**kwargs)
        self.plan = plan
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from headpose.registry.data_versions import DataVersionError, claim, identify
        from headpose_operators.s3 import s3_client

        plan = self.plan
        if not plan["data_version"]["enforced"]:
            print("no data version claimed: a person's run in a deployment that retrains on the schedule only")
            return {"claimed": False}
        s3 = s3_client(self.aws_conn_id, plan["expected_bucket_owner"], plan["kms_key_id"])
        run = context["dag_run"]
        try:
            version = identify(s3, plan)
            decision = claim(s3, plan, version, dag_id=run.dag_id, run_id=run.run_id, run_state=_run_state,
                             lease=context["dag"].dagrun_timeout or DEFAULT_LEASE)
        except DataVersionError as error:
            raise AirflowFailException(str(error)) from None
        print(f"data version {version['id']}: {version['kind']} {version['source_uri'] or ''} sha256 "
              f"{version['sha256']}; record {decision.uri}")
        print(decision.reason)
        if not decision.train:
            summary = {"training_job_name": plan["training_job_name"], "decision": "not trained",
                       "reason": decision.reason, "started_by": plan["started_by"], "data_version": version["id"],
                       "data_version_record": decision.uri, "trained_by_run": decision.record.get("run_id")}
            print(f"run summary: {plan['training_job_name']}\n  started by: {plan['started_by']}\n"
                  f"  decision: nothing trained - {decision.reason}")
            context["ti"].xcom_push(key="summary", value=summary)
            raise AirflowSkipException(f"nothing trained: {decision.reason}")
        return {"claimed": True, "id": version["id"], "uri": decision.uri, "sha256": version["sha256"],
                "source_uri": version["source_uri"]}


class RecordDataVersionOperator(BaseOperator):
    """Settles the run's claim with what it made of the version (the run's teardown).

    :param plan: ``plan_run``'s result (templated)
    :param claimed: ``claim_data_version``'s result (templated)
    :param aws_conn_id: the AWS connection
    """

    template_fields = ("plan", "claimed")
    DOC = ("The run's teardown: settles its data-version claim with what the run made of the version "
           "(published, not published, refused or failed), so the next run on the same data knows. "
           "It runs whatever happened before it.")

    def __init__(self, *, plan: Any, claimed: Any, aws_conn_id: str = "aws_default", **kwargs: Any):
        kwargs.setdefault("doc_md", self.DOC)
        super().__init__(**kwargs)
        self.plan = plan
        self.claimed = claimed
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> dict[str, Any] | None:
        from headpose.registry.data_versions import outcome_of, settle
        from headpose.registry.pointer import now_iso
        from headpose_operators.s3 import s3_client

        plan, claimed = self.plan, self.claimed or {}
        if not claimed.get("claimed"):
            print("no data version was claimed by this run")
            return None
        s3 = s3_client(self.aws_conn_id, plan["expected_bucket_owner"], plan["kms_key_id"])
        training = context["ti"].xcom_pull(task_ids="train") or {}
        jobs = training.get("attempts") or [plan["training_job_name"]]
        outcome = {**outcome_of(s3, plan["bucket"], plan["folder"], jobs), "settled_at": now_iso()}
        record = settle(s3, claimed["uri"], context["dag_run"].run_id, outcome)
        if record is None:
            print(f"{claimed['uri']} is no longer this run's claim; left as it is")
            return None
        print(f"data version {claimed['id']}: {outcome['status']} (jobs {', '.join(outcome['attempts'])}); {claimed['uri']}")
        return {"id": claimed["id"], "status": outcome["status"]}

