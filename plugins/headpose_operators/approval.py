"""``ReleaseApprovalOperator``: a person approves a model in the Airflow UI before devices get it.

The standard provider's ``ApprovalOperator`` (Human-in-the-loop: options Approve and
Reject, answered on the UI's *Required Actions* page or with the REST API's
``PATCH .../hitlDetails``), which this subclass only feeds: whether to ask at all and what
the request says come from ``headpose.registry.approval`` and ``promotion.pending_decision``.
Airflow 3.3 parks the task in ``awaiting_input`` (no worker slot, no triggerer); an answer
through the API server, or the scheduler's sweep at the deadline, resumes it in
``execute_complete``. The deadline answers the default, Reject: a timeout is a rejection,
not a task failure.

It asks only where the deployment requires an approval and ``publish`` would promote the
version; before asking it registers the version in SageMaker's Model Registry as
``PendingManualApproval``. A rejection skips ``publish`` (only that task: ``record_release``,
which runs whatever happened, records the answer: ``RecordReleaseOperator``). The answer is
this task's XCom ``approval`` - pushed before the skip, which ends the task without a return value.
"""
from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Sequence

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import BaseOperator, Param
from airflow.sdk.definitions.param import ParamsDict

from headpose_operators.notify import ReleaseRequestNotifier

if TYPE_CHECKING:
    from airflow.sdk import Context

APPROVAL_KEY = "approval"
REQUEST_KEY = "request"


class ReleaseApprovalOperator(ApprovalOperator):
    """Ask a person to approve the run's model version before ``publish`` promotes it.

    :param plan: ``plan_run``'s XCom: the deployment's ``release_approval``, ``approvers``,
        ``approval_timeout`` and ``model_package_group`` (templated).
    :param training: ``train``'s XCom (templated).
    :param dataset: ``stage_dataset``'s XCom (templated).
    :param report: ``validate_model``'s XCom: accuracy, recall, comparison, formats, links (templated).
    :param version: ``upload_frozen_model``'s XCom: the version's files (templated).
    :param skip_on_reject: the downstream tasks a rejection skips (default ``publish``).
    :param aws_conn_id: the Airflow AWS connection (S3 and SageMaker).
    :param response_timeout: the parse-time wait; the run's plan sets the one in force.
    :param assigned_users: the parse-time approvers; the run's plan sets the ones in force.
    :return: the approval record ``{"required", "asked", "decision", "by", "at", "comment", "reason", ...}``,
        also in the XCom ``approval``.
    """

    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "plan", "training", "dataset", "report",
                                      "version")
    ui_color = "#fdebd0"

    def __init__(
        self, *, plan: Any, training: Any, dataset: Any, report: Any, version: Any,
        skip_on_reject: Sequence[str] = ("publish",), aws_conn_id: str = "aws_default", **kwargs: Any,
    ) -> None:
        kwargs.setdefault("subject", "Release a new head-pose model?")
        # Airflow hands every operator the DAG's params too (source "dag"), which the provider leaves
        # out of the request; the comment is the task's own.
        params = ParamsDict(kwargs.pop("params", None))
        comment = ParamsDict({"comment": Param(None, type=["null", "string"], title="Comment",
                                               description="Why (kept with the version's evidence)")})
        comment._fill_missing_param_source("task")
        params.update(comment)
        super().__init__(defaults=ApprovalOperator.REJECT, notifiers=[ReleaseRequestNotifier()], params=params,
                         **kwargs)
        self.plan, self.training, self.dataset, self.report, self.version = plan, training, dataset, report, version
        self.skip_on_reject = tuple(skip_on_reject)
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Context) -> Any:
        from headpose.registry.pointer import now_iso
        from headpose.registry.release import prepare_request
        from headpose_operators.s3 import s3_client
        from headpose_operators.sagemaker import model_registry

        plan = self.plan
        s3 = s3_client(self.aws_conn_id, plan.get("expected_bucket_owner"), plan.get("kms_key_id"))
        request = prepare_request(s3, plan, self.training, self.dataset, self.report, self.version,
                                  self.report.get("links") or {}, model_registry(self.aws_conn_id, plan))
        if not request["ask"]:
            self.log.info("%s", request["approval"]["reason"])
            context["ti"].xcom_push(key=APPROVAL_KEY, value=request["approval"])
            return request["approval"]
        self.subject, self.body = request["subject"], request["body"]
        self.assigned_users = request["assigned_users"]
        self.response_timeout = timedelta(seconds=request["timeout_seconds"])
        try:
            link = self.generate_link_to_ui(task_instance=context["ti"])
        except ValueError:  # no [api] base_url
            link = None
        context["ti"].xcom_push(key=REQUEST_KEY, value={
            "asked_at": now_iso(), "link": link, "timeout": plan["deployment"]["approval_timeout"]})
        self.log.info("asking %s: %s", [u["name"] for u in self.assigned_users or []] or "any user allowed to "
                      "answer Human-in-the-loop requests", self.subject)
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        from headpose.registry.approval import APPROVED, answer

        # The Human-in-the-loop checks of the answer, without ApprovalOperator's skipping of every
        # downstream task: record_release must run after a rejection.
        HITLOperator.execute_complete(self, context, event)
        request = context["ti"].xcom_pull(task_ids=self.task_id, key=REQUEST_KEY) or {}
        result = answer(event, asked_at=request.get("asked_at"), timeout=request.get("timeout") or "-",
                        link=request.get("link"))
        self.log.info("%s", result["reason"])
        context["ti"].xcom_push(key=APPROVAL_KEY, value=result)
        if result["decision"] != APPROVED:
            refused = [t for t in context["task"].get_direct_relatives(upstream=False) if t.task_id in self.skip_on_reject]
            self.skip(ti=context["ti"], tasks=refused)  # ends the task here (DownstreamTasksSkipped)
        return result


class RecordReleaseOperator(BaseOperator):
    """Whatever happened to the request: the answer kept with the version's evidence, a refusal in the Model Registry.

    Runs ``all_done`` beside ``publish`` (not after it, so that a failed run stays failed, and a
    rejection, which skips ``publish``, is still recorded): adds the answer to the version's
    ``approval.json``, marks a refused version ``Rejected`` in SageMaker's Model Registry, and
    ends a refused run with its summary (who, when, why; nothing under ``published/`` changed).
    Its inputs are pulled, not templated: an upstream task that failed leaves nothing to record.

    :param approval_task_id: the ``ReleaseApprovalOperator``'s task.
    :param aws_conn_id: the Airflow AWS connection (S3 and SageMaker).
    :return: the run summary of a refused release (XCom ``summary`` too); None otherwise.
    """

    ui_color = "#fdebd0"
    # What the UI shows on the task unless the DAG says otherwise.
    DOC = ("Runs whatever happened to the release request: keeps the answer (approved, rejected with its comment, "
           "or no answer in time) in the version's `approval.json`, marks a refused version `Rejected` in SageMaker's "
           "Model Registry, and ends a refused run with its summary (who, when, why; nothing under `published/` "
           "changed). Beside `publish`, not after it, so that a failed run stays failed.")

    def __init__(self, *, approval_task_id: str = "approve_release", aws_conn_id: str = "aws_default",
                 **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "all_done")
        kwargs.setdefault("doc_md", self.DOC)
        super().__init__(**kwargs)
        self.approval_task_id = approval_task_id
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Context) -> Any:
        from headpose.registry.release import record_release
        from headpose.registry.summary import format_summary
        from headpose_operators.s3 import s3_client
        from headpose_operators.sagemaker import model_registry

        ti = context["ti"]
        approval = ti.xcom_pull(task_ids=self.approval_task_id, key=APPROVAL_KEY)
        if approval is None:
            self.log.info("no release decision to record: %s did not finish (an earlier task's log says why)",
                          self.approval_task_id)
            return None
        plan = ti.xcom_pull(task_ids="plan_run")
        s3 = s3_client(self.aws_conn_id, plan.get("expected_bucket_owner"), plan.get("kms_key_id"))
        inputs = (ti.xcom_pull(task_ids=t) for t in ("train", "stage_dataset", "validate_model", "upload_frozen_model"))
        summary = record_release(s3, plan, *inputs, approval, model_registry(self.aws_conn_id, plan), log=print)
        if summary:
            print(format_summary(summary))
            ti.xcom_push(key="summary", value=summary)
        return summary
