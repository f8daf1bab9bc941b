"""``HeadposeTrainingOperator``: one CreateTrainingJob request, two backends, retry-safe.

``backend="sagemaker"`` is the Amazon provider's ``SageMakerTrainingOperator`` with one
change: before creating, it asks SageMaker for a job of the run's name and attaches to
it. The provider only knows two answers to an existing name - start another job under a
timestamped name (``action_if_job_exists="timestamp"``, a second billed job whose model
lands where this run never looks) or fail (``"fail"``, which turns a retry after a
worker crash into a failed run although the job trains on). A retry must instead wait
for the job it started, take its result, or report its ``FailureReason``
(``headpose.planning.training_job.next_step`` decides which).

``backend="local"`` hands the same request to ``headpose.backends.local`` with the S3
client of the same AWS connection; it runs the SageMaker training toolkit on the worker.

Either way the code that trains is the code ``package_code`` packed: ``sourcedir_sha256``
is checked against ``sourcedir.tar.gz`` before a job is created (sagemaker) or the code
runs (local), and a mismatch fails the task without a retry. Every S3 call, the
provider's own hook's included, carries the deployment's bucket owner (and KMS key).

The run's attempts (``<job>``, ``<job>-2``, ...) travel with the deferral (the trigger's
``kwargs``): Airflow builds a new operator for ``execute_complete``, so nothing learnt
before it may live on the instance.

Both return the provider's XCom shape (``{"Training": <describe dict>}``) plus a summary
next to the job name (times, final metrics, spot saving), so the tasks after ``train``
do not know which backend ran.
"""
from __future__ import annotations

import datetime
import math
import re
import subprocess
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from botocore.exceptions import ClientError

from airflow.providers.amazon.aws.hooks.sagemaker import LogState
from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator, serialize
from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger
from airflow.providers.amazon.aws.utils import validate_execute_complete_event
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from headpose_operators.links import TRAINING_LINKS, persist_training_links
from headpose_operators.local_training import LocalTrainingMixin

if TYPE_CHECKING:
    from airflow.sdk import Context

_SHA256 = re.compile(r"[0-9a-f]{64}")


class HeadposeTrainingOperator(LocalTrainingMixin, SageMakerTrainingOperator):
    """Run a SageMaker training request on SageMaker or on this worker; never twice.

    :param config: the CreateTrainingJob request (templated; usually an XComArg). An
        empty ``RoleArn`` is taken from the connection's extra ``sagemaker_role_arn``.
    :param backend: ``"local"`` or ``"sagemaker"`` (templated).
    :param sourcedir_sha256: the sha256 ``package_code`` recorded for the request's
        ``sagemaker_submit_directory`` (templated; its XCom ``sha256``). Required: code
        that cannot be verified is not run.
    :param local_work_dir: with ``backend="local"``, the folder that plays ``/opt/ml``
        (templated); it is emptied first. Default: ``<workspace>/<job>/local-training``.
    :param max_training_attempts: how many training jobs (``<job>``, ``<job>-2``, ...) one run
        may start (templated; the run parameter of that name, default its default): a new one
        only after a transient failure, or when a person clears ``train`` after a failed or
        stopped job - never while another attempt is in progress.
    :param expected_bucket_owner: the account that must own the bucket (templated); None: any.
    :param manifest_sha256: the dataset manifest's sha256 (templated; ``stage_dataset``'s XCom), and
    :param source_sha256s: each packed code file's sha256 (templated; ``package_code``'s XCom
        ``files``): both go to the entry point, which verifies its code and every shard before
        its first step.
    :param kms_key_id: the KMS key the local backend's S3 writes are encrypted with (SSE-KMS;
        templated); SageMaker takes it from the request's ``OutputDataConfig.KmsKeyId``.
    :param max_status_polls: status polls before a deferred wait gives up (the provider's
        ``max_attempts``); by default enough for the request's whole ``StoppingCondition``
        (the provider's default, 60 polls, is 30 minutes at the default interval: far less
        than a training run).

    Other arguments are the provider's (``deferrable``, ``print_log``, ``check_interval``,
    ...); ``check_if_job_exists``/``action_if_job_exists`` are not: the existing-job
    check is this operator's own.
    """

    template_fields: Sequence[str] = (
        *SageMakerTrainingOperator.template_fields, "backend", "sourcedir_sha256", "local_work_dir",
        "max_training_attempts", "expected_bucket_owner", "kms_key_id", "manifest_sha256", "source_sha256s",
    )
    operator_extra_links = TRAINING_LINKS
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        backend: str = "sagemaker",
        sourcedir_sha256: str | None = None,
        local_work_dir: str | None = None,
        max_training_attempts: int | str | None = None,
        expected_bucket_owner: str | None = None,
        kms_key_id: str | None = None,
        manifest_sha256: str | None = None,
        source_sha256s: dict[str, str] | None = None,
        max_status_polls: int | None = None,
        **kwargs: Any,
    ):
        # The provider's own name check is off for good: execute() checks first and
        # attaches; the provider would rename (a second job) or fail.
        super().__init__(check_if_job_exists=False, max_attempts=max_status_polls, **kwargs)
        self.backend = backend
        self.sourcedir_sha256 = sourcedir_sha256
        self.local_work_dir = local_work_dir
        self.max_training_attempts = max_training_attempts
        self.expected_bucket_owner = expected_bucket_owner
        self.kms_key_id = kms_key_id
        self.manifest_sha256 = manifest_sha256
        self.source_sha256s = source_sha256s
        self._attempts: list[str] = []
        self._status_polls_given = max_status_polls is not None
        self._processes: list[subprocess.Popen] = []  # the local backend's toolkits, one a host

    def pre_execute(self, context: Context) -> None:
        """Times the task by its own request's ``StoppingCondition``.

        Here, not in ``execute``: Airflow applies ``execution_timeout`` around ``execute``
        after this runs, and the request (an XCom of ``plan_run``) is only known now.
        """
        from headpose.planning.scheduling import train_timeout

        self.execution_timeout = train_timeout(self.config["StoppingCondition"])
        self.log.info("train execution_timeout: %s", self.execution_timeout)

    def execute(self, context: Context) -> dict:
        from headpose.planning.governed import with_checksums
        from headpose.planning.params import BACKENDS

        if self.backend not in BACKENDS:
            raise AirflowFailException(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        self.config = with_checksums(self.config, self.manifest_sha256 or None, self.source_sha256s or None)
        self._persist_links(context)
        if self.backend == "local":
            return self._execute_local()
        from headpose.planning.training_job import Step, attempt_request, is_fresh_try, next_attempt

        self._resolve_role()
        self.max_attempts = self._status_polls()
        first = self.config["TrainingJobName"]
        descriptions = self._attempt_descriptions(first)
        ti = context["ti"]
        fresh = is_fresh_try(getattr(ti, "try_number", 1), getattr(ti, "max_tries", self.retries), self.retries)
        decision = next_attempt(descriptions, first, fresh_try=fresh, max_training_attempts=self._max_training_attempts())
        job = decision.training_job_name
        self.log.info("Training job %s: %s -> %s", job, decision.reason, decision.step.value)
        self._attempts = [d["TrainingJobName"] for d in descriptions]
        if decision.step is Step.FAIL:
            raise AirflowFailException(decision.reason)
        if decision.step is Step.CREATE:
            self._verify_code()
            # A later attempt resumes the checkpoints of one that found no capacity, and
            # starts afresh after any other failure (a model that broke must not be resumed).
            self.config = attempt_request(self.config, job, descriptions[-1] if descriptions else None)
            self._attempts.append(job)
            self._govern_provider_s3()
            # The provider's create-and-wait (deferrable or not), which raises on Failed;
            # _finish also refuses Stopped, which its non-log wait lets through.
            return self._finish(super().execute(context)["Training"])
        description = descriptions[-1]
        self._check_it_is_ours(description)
        if decision.step is Step.WAIT:
            return self._wait(job, description)
        return self._finish(description)

    def _attempt_descriptions(self, first: str) -> list[dict]:
        """The run's jobs so far, attempt 1 first: each later one exists only if the one before failed."""
        from headpose.planning.training_job import FAILED_STATUSES, attempt_job_name

        found: list[dict] = []
        for number in range(1, self._max_training_attempts() + 1):
            description = self._describe_or_none(attempt_job_name(first, number))
            if description is None:
                break
            found.append(description)
            if description.get("TrainingJobStatus") not in FAILED_STATUSES:
                break
        return found

    def defer(self, *, trigger: Any, method_name: str, kwargs: dict[str, Any] | None = None,
              timeout: datetime.timedelta | None = None) -> NoReturn:
        """Defer with the run's attempts so far (the provider's own deferral included)."""
        super().defer(trigger=trigger, method_name=method_name, timeout=timeout,
                      kwargs={**(kwargs or {}), "attempts": list(self._attempts)})

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, log_positions: dict | None = None,
        attempts: list[str] | None = None,
    ) -> dict:
        """After a deferred wait: the job's result, or its ``FailureReason`` as the error.

        ``attempts`` are the run's jobs as the deferring try knew them: this operator is
        not the one that deferred.
        """
        from headpose.planning.training_job import Step, next_step

        self._attempts = list(attempts or [])
        validated = validate_execute_complete_event(event)
        job = validated.get("job_name") or self.config["TrainingJobName"]
        # The job's own state decides, not the event: a trigger that timed out or hit an
        # API error leaves a job that still runs, and must not pass for a finished one.
        description = self.hook.describe_training_job(job)
        if next_step(description) is Step.WAIT:
            raise AirflowException(
                f"stopped waiting for training job {job} ({validated.get('status')}: "
                f"{validated.get('message')}); it is still {description['TrainingJobStatus']}. "
                "A retry of this task attaches to it again."
            )
        if self.print_log:
            self._print_logs(job, description, log_positions)
        return self._finish(description)

    # -- sagemaker ---------------------------------------------------------------------

    def _verify_code(self) -> None:
        """Refuse to create a job whose ``sourcedir.tar.gz`` is not the packed one."""
        from headpose.backends.sourcedir import SourcedirMismatch, verify_sourcedir_object

        uri = self._sourcedir_uri()
        try:
            verify_sourcedir_object(self._s3_client(), uri, self._expected_sha256())
        except SourcedirMismatch as error:
            raise AirflowFailException(str(error)) from None
        self.log.info("Training code %s: sha256 %s, as package_code recorded", uri, self.sourcedir_sha256)

    def _describe_or_none(self, job: str) -> dict | None:
        try:
            return self.hook.describe_training_job(job)
        except ClientError as error:
            # SageMaker answers an unknown name with ValidationException (as the
            # provider's own existence check assumes); anything else is a real error.
            if error.response.get("Error", {}).get("Code") == "ValidationException":
                return None
            raise

    def _resolve_role(self) -> None:
        if self.config.get("RoleArn"):
            return
        from headpose.planning.params import CONNECTION_ROLE_EXTRA

        role = self.hook.conn_config.extra_config.get(CONNECTION_ROLE_EXTRA)
        if not role:
            raise AirflowFailException(
                "backend=sagemaker needs the SageMaker execution role: set the role_arn "
                f"parameter, or '{CONNECTION_ROLE_EXTRA}' in the extra of connection {self.aws_conn_id!r}"
            )
        self.config["RoleArn"] = role
        self.expand_role()  # as the provider does: a role name becomes its ARN

    def _check_it_is_ours(self, description: dict) -> None:
        from headpose.planning.training_job import foreign_job_problems

        problems = foreign_job_problems(description, self.config)
        if problems:
            raise AirflowFailException(
                f"a training job named {description['TrainingJobName']} exists but was not "
                f"started with this run's request ({'; '.join(problems)}); refusing to use its result"
            )

    def _wait(self, job: str, description: dict) -> dict:
        self.log.info("Attaching to training job %s, which a previous try started", job)
        if self.deferrable and self.wait_for_completion:
            self._defer(job, description)
        if not self.wait_for_completion:
            return self._result(serialize(description))
        if self.print_log:
            # Raises with the FailureReason if the job fails or is stopped.
            self.hook.check_training_status_with_log(
                job, self.hook.non_terminal_states, self.hook.training_failed_states,
                wait_for_completion=True, check_interval=self.check_interval,
                max_ingestion_time=self.max_ingestion_time,
            )
        else:
            self.hook.check_status(
                job, "TrainingJobStatus", self.hook.describe_training_job, self.check_interval,
                self.max_ingestion_time,
            )
        return self._finish(self.hook.describe_training_job(job))

    def _defer(self, job: str, description: dict) -> None:
        """Hand the wait to the triggerer, with the provider's trigger and arguments."""
        positions = self._print_logs(job, description) if self.print_log else {}
        timeout = self.execution_timeout
        if self.max_ingestion_time:
            timeout = datetime.timedelta(seconds=self.max_ingestion_time)
        self.defer(
            timeout=timeout,
            trigger=SageMakerTrigger(
                job_name=job,
                job_type="Training",
                waiter_delay=self.check_interval,
                waiter_max_attempts=self.max_attempts,
                aws_conn_id=self.aws_conn_id,
                region_name=self.region_name,
                verify=self.verify,
                botocore_config=self.botocore_config,
            ),
            method_name="execute_complete",
            # Where the log printed so far ends: the resumed task prints only what follows.
            kwargs={"log_positions": positions},
        )

    def _status_polls(self) -> int:
        """Status polls of a deferred wait: the given number, else enough for the whole job."""
        if self._status_polls_given:
            return self.max_attempts
        stopping = self.config.get("StoppingCondition", {})
        longest = stopping.get("MaxWaitTimeInSeconds") or stopping.get("MaxRuntimeInSeconds") or 86400
        # The job's own limit, plus an hour for SageMaker to start it and upload the model.
        return math.ceil((int(longest) + 3600) / max(1, self.check_interval))

    def _print_logs(self, job: str, description: dict, positions: dict | None = None) -> dict:
        """What the job logged after ``positions`` (a stream -> [timestamp, skip] map), once.

        The deferred wait itself cannot stream logs (the triggerer only polls the status),
        so this runs before deferring and again when the task resumes, from where the first
        call stopped: the log is printed once across the deferral. Returns the new positions.
        """
        from airflow.providers.amazon.aws.hooks.sagemaker import Position

        streams = sorted(positions or {})
        last = {name: Position(*value) for name, value in (positions or {}).items()}
        # The provider's helper moves the positions in ``last`` as it prints.
        self.hook.describe_training_job_with_log(
            job, last, streams, description["ResourceConfig"]["InstanceCount"], LogState.COMPLETE,
            description, 0.0,
        )
        return {name: [position.timestamp, position.skip] for name, position in last.items()}

    def _finish(self, description: dict) -> dict:
        from headpose.planning.training_job import Step, failure_message, is_transient_failure, next_step

        if next_step(description) is Step.FAIL:
            message = failure_message(description)
            if is_transient_failure(description) and len(self._attempts) < self._max_training_attempts():
                # Retried: the next try starts the run's next job, which may get capacity.
                raise AirflowException(f"{message}. A retry of this task starts another job.")
            raise AirflowFailException(message)
        return self._result(serialize(description))

    def _govern_provider_s3(self) -> None:
        """The provider's own S3 calls (``check_s3_url`` of the channels) pinned like ours.

        ``SageMakerHook`` makes them through an ``S3Hook`` of its own, whose client is
        created once and kept: the owner (and key) are registered on that client.
        """
        from headpose_operators.s3 import governed

        governed(self.hook.s3_hook.get_conn(), self.expected_bucket_owner or None, self.kms_key_id or None)

    # -- both backends ------------------------------------------------------------------

    def _max_training_attempts(self) -> int:
        from headpose.planning.params import DEFAULT_MAX_TRAINING_ATTEMPTS

        return int(self.max_training_attempts or DEFAULT_MAX_TRAINING_ATTEMPTS)

    def _expected_sha256(self) -> str:
        expected = (self.sourcedir_sha256 or "").strip().lower()
        if not _SHA256.fullmatch(expected):
            raise AirflowFailException(
                f"sourcedir_sha256 must be the sha256 package_code recorded for "
                f"{self._sourcedir_uri()}, got {self.sourcedir_sha256!r}: training code that "
                "cannot be verified is not run"
            )
        return expected

    def _sourcedir_uri(self) -> str:
        from headpose.planning.governed import code_source_uri  # with network isolation, the code channel's

        return str(code_source_uri(self.config) or "")

    def _s3_client(self):
        from headpose_operators.s3 import s3_client

        return s3_client(self.aws_conn_id, self.expected_bucket_owner or None, self.kms_key_id or None,
                         region_name=self.region_name, verify=self.verify, config=self.botocore_config)

    def _result(self, description: dict) -> dict:
        from headpose.planning.training_job import training_summary

        self.serialized_training_data = description
        summary = training_summary(description)
        self.log.info(
            "Training job %s: %s, training %s s, billable %s s, spot saving %s%%, final metrics %s",
            summary["training_job_name"], summary["training_job_status"],
            summary["training_time_in_seconds"], summary["billable_time_in_seconds"],
            summary["spot_savings_percent"], summary["final_metrics"],
        )
        return {"Training": description, **summary,
                "attempts": self._attempts or [description["TrainingJobName"]]}

    def _persist_links(self, context: Context) -> None:
        persist_training_links(self, context, self.config, self.backend == "sagemaker")
