"""The local backend's half of ``HeadposeTrainingOperator``: the request run on this worker.

A mixin, so that the operator module stays about the SageMaker path and its attempts;
it uses the operator's ``config``, ``local_work_dir``, ``_expected_sha256``, ``_s3_client``
and ``_result``.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from airflow.providers.amazon.aws.operators.sagemaker import serialize
from airflow.sdk.exceptions import AirflowFailException


class LocalTrainingMixin:
    """``backend="local"``: ``headpose.backends.local`` with the connection's S3 client; stoppable."""

    _processes: list[subprocess.Popen] | None = None  # one toolkit a host

    def _execute_local(self) -> dict:
        from headpose.backends.local import run_local_training_job
        from headpose.backends.sourcedir import SourcedirMismatch
        from headpose.planning.layout import run_workspace

        job = self.config["TrainingJobName"]
        work_dir = Path(self.local_work_dir) if self.local_work_dir else run_workspace(job) / "local-training"
        expected = self._expected_sha256()
        self.log.info("Running training job %s with the local backend in %s", job, work_dir)
        try:
            description = run_local_training_job(
                self.config, self._s3_client(), work_dir, self.log.info,
                sourcedir_sha256=expected, on_start=self._remember_process,
            )
        except SourcedirMismatch as error:
            raise AirflowFailException(str(error)) from None
        finally:
            # The job's outputs are in S3 by now (or it failed): its root is scratch. A task
            # killed before this leaves it to the next try (which empties it) or to cleanup.
            shutil.rmtree(work_dir, ignore_errors=True)
        return self._result(serialize(description))

    def _remember_process(self, process: subprocess.Popen) -> None:
        self._processes = [*(self._processes or []), process]

    def on_kill(self) -> None:
        from headpose.backends.process import stop_process

        for process in self._processes or []:
            self.log.info("Stopping the local training process %s", process.pid)
            stop_process(process)
        super().on_kill()
