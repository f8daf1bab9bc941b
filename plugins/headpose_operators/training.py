"""``HeadposeTrainingOperator``: one CreateTrainingJob request, two backends.

``backend="sagemaker"`` is the Amazon provider's ``SageMakerTrainingOperator``
unchanged. ``backend="local"`` hands the same request to
``headpose.local_backend.run_local_training_job`` with the S3 client of the same AWS
connection, and returns the provider's XCom shape (``{"Training": <describe dict>}``),
so the tasks after ``train`` do not know which backend ran.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator, serialize
from airflow.sdk.exceptions import AirflowException

if TYPE_CHECKING:
    from airflow.sdk import Context

BACKENDS = ("local", "sagemaker")


class HeadposeTrainingOperator(SageMakerTrainingOperator):
    """Run a SageMaker training request on SageMaker or on this worker.

    :param config: the CreateTrainingJob request (templated; usually an XComArg).
    :param backend: ``"local"`` or ``"sagemaker"`` (templated).
    :param local_work_dir: with ``backend="local"``, the folder that plays ``/opt/ml``
        (templated); it is emptied first. Default: ``<workspace>/<job>/local-training``.
    :param action_if_job_exists: as the provider's, but ``"fail"`` by default: the job
        name is the run's, so an existing job is this run's own and must never be
        duplicated with a timestamped name.
    """

    template_fields: Sequence[str] = (
        *SageMakerTrainingOperator.template_fields, "backend", "local_work_dir",
    )
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        backend: str = "sagemaker",
        local_work_dir: str | None = None,
        action_if_job_exists: str = "fail",
        **kwargs: Any,
    ):
        super().__init__(action_if_job_exists=action_if_job_exists, **kwargs)
        self.backend = backend
        self.local_work_dir = local_work_dir
        self._process: subprocess.Popen | None = None

    def execute(self, context: Context) -> dict:
        if self.backend == "sagemaker":
            return super().execute(context)
        if self.backend == "local":
            return self._execute_local()
        raise AirflowException(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def _execute_local(self) -> dict:
        from headpose.layout import run_workspace
        from headpose.local_backend import run_local_training_job

        job = self.config["TrainingJobName"]
        work_dir = Path(self.local_work_dir) if self.local_work_dir else run_workspace(job) / "local-training"
        s3_client = S3Hook(
            aws_conn_id=self.aws_conn_id, region_name=self.region_name, verify=self.verify,
            config=self.botocore_config,
        ).get_conn()
        self.log.info("Running training job %s with the local backend in %s", job, work_dir)
        description = run_local_training_job(
            self.config, s3_client, work_dir, self.log.info, on_start=self._remember_process,
        )
        self.serialized_training_data = serialize(description)
        return {"Training": self.serialized_training_data}

    def _remember_process(self, process: subprocess.Popen) -> None:
        self._process = process

    def on_kill(self) -> None:
        if self._process is not None:
            from headpose.local_backend import stop_process

            self.log.info("Stopping the local training process %s", self._process.pid)
            stop_process(self._process)
        super().on_kill()
