"""Extra links on the ``train`` task: the job in the SageMaker console, its logs, its artifact.

The provider's ``BaseAwsLink`` pattern: ``persist(...)`` stores the link's fields in XCom
while the task runs; after the task, Airflow 3 calls ``get_link`` on the worker and
stores the finished URL under the link's ``xcom_key``, which is what the UI reads.
"""
from __future__ import annotations

from urllib.parse import quote, quote_plus

from airflow.providers.amazon.aws.links.base_aws import BASE_AWS_CONSOLE_LINK, BaseAwsLink

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"


class SageMakerTrainingJobLink(BaseAwsLink):
    """The training job's page in the SageMaker console."""

    name = "SageMaker Training Job"
    key = "headpose_sagemaker_training_job"
    format_str = BASE_AWS_CONSOLE_LINK + "/sagemaker/home?region={region_name}#/jobs/{job_name}"

    def format_link(self, **kwargs) -> str:
        return super().format_link(**{**kwargs, "job_name": quote(kwargs.get("job_name", ""), safe="")})


class SageMakerTrainingLogsLink(BaseAwsLink):
    """The job's CloudWatch log streams (``<job>/algo-1-<epoch>``, one per instance).

    The stream names are only known once the container logs, so this filters the log
    group on the job name, as the sagemaker SDK's own console link does (the console's
    fragment wants ``$`` where a URL has ``%``).
    """

    name = "SageMaker Training Logs"
    key = "headpose_sagemaker_training_logs"
    format_str = (
        BASE_AWS_CONSOLE_LINK
        + "/cloudwatch/home?region={region_name}#logsV2:log-groups/log-group/{log_group}"
        + "$3FlogStreamNameFilter$3D{job_name}"
    )

    def format_link(self, **kwargs) -> str:
        group = quote_plus(kwargs.get("log_group", TRAINING_LOG_GROUP)).replace("%", "$25")
        job = quote_plus(kwargs.get("job_name", ""))
        return super().format_link(**{**kwargs, "log_group": group, "job_name": job})


class S3ModelArtifactLink(BaseAwsLink):
    """``model.tar.gz`` of the run: a presigned URL at the store's own endpoint when the
    connection names one (MinIO, moto; ``s3.object_links``), the S3 console otherwise."""

    name = "Model Artifact (S3)"
    key = "headpose_model_artifact"
    format_str = BASE_AWS_CONSOLE_LINK + "/s3/object/{bucket_name}?region={region_name}&prefix={key}"

    def format_link(self, **kwargs) -> str:
        if kwargs.get("url"):
            return kwargs["url"]
        return super().format_link(**{**kwargs, "key": quote(kwargs.get("key", ""), safe="/")})


TRAINING_LINKS = (SageMakerTrainingJobLink(), SageMakerTrainingLogsLink(), S3ModelArtifactLink())


def persist_training_links(operator, context, request: dict, on_sagemaker: bool) -> None:
    """Store the ``train`` task's links: the artifact always, the job and its logs on SageMaker."""
    from headpose.planning.layout import join_uri, split_s3_uri

    job = request["TrainingJobName"]
    try:
        where = {"context": context, "operator": operator, "region_name": operator.hook.conn_region_name,
                 "aws_partition": operator.hook.conn_partition}
        artifact = join_uri(request["OutputDataConfig"]["S3OutputPath"], f"{job}/output/model.tar.gz")
        bucket, key = split_s3_uri(artifact)
        url = ""
        if operator.hook.conn_config.endpoint_url:
            from headpose_operators.s3 import object_links

            url = object_links(operator.aws_conn_id, {"artifact": artifact}, where["region_name"])["artifact"]
    except Exception as error:  # a link is a convenience: it must never fail the training
        operator.log.warning("No console links for %s: %s", job, error)
        return
    S3ModelArtifactLink.persist(**where, bucket_name=bucket, key=key, url=url)
    if on_sagemaker:
        SageMakerTrainingJobLink.persist(**where, job_name=job)
        SageMakerTrainingLogsLink.persist(**where, job_name=job, log_group=TRAINING_LOG_GROUP)
    else:
        # No SageMaker job or CloudWatch log exists for a local run. An empty entry makes
        # the link blank; a missing one has Airflow log "XCom not found" at ERROR in the
        # task's log after every local run, where the ops team looks for real errors.
        for link in (SageMakerTrainingJobLink, SageMakerTrainingLogsLink):
            context["ti"].xcom_push(key=link.key, value={})
