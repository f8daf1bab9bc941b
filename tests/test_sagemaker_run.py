"""The whole DAG with backend=sagemaker, against moto's SageMaker API (the batch's run).

moto's training jobs run no code, so the batch put the artifact where SageMaker would have
uploaded it; everything from ``download_artifact`` on runs as after a real job.
"""
from __future__ import annotations

import hashlib
import json
import urllib.request

import pytest


@pytest.mark.e2e
def test_a_sagemaker_run_reaches_download_artifact_with_the_artifact_sagemaker_wrote(dag_batch):
    """The batch's "sagemaker backend" run: train deferred to the provider's trigger, against
    moto's SageMaker; moto's job runs no code, so the artifact was put where SageMaker
    would upload it (the job name derives from the logical date alone)."""
    from airflow_support import DAG_ID, db, run_id_of, xcom
    from dag_batch import BY_NAME

    scenario = BY_NAME["sagemaker backend"]
    result = dag_batch.run(scenario.name)
    assert result.exit_code == 0, result.output[-6000:]
    home, job, sagemaker, s3 = dag_batch.home, scenario.job, dag_batch.client("sagemaker"), dag_batch.s3()
    run_id = run_id_of(home, scenario.when)
    archive = s3.get_object(Bucket=scenario.bucket, Key=f"headpose/TFartifacts/{job}/output/model.tar.gz")["Body"].read()

    jobs = [j["TrainingJobName"] for j in sagemaker.list_training_jobs()["TrainingJobSummaries"]]
    assert jobs.count(job) == 1
    created = sagemaker.describe_training_job(TrainingJobName=job)
    assert created["RoleArn"] == scenario.conf["role_arn"]
    assert created["AlgorithmSpecification"]["TrainingImage"].endswith("tensorflow-training:2.21-gpu-py312")
    assert "train completed successfully." in result.output  # the provider's deferrable path ran

    training = xcom(home, "train", run_id=run_id)
    assert training["training_job_name"] == training["Training"]["TrainingJobName"] == job
    assert training["final_metrics"] == {"train:progress": 100.0}
    download = xcom(home, "download_artifact", run_id=run_id)
    assert download["artifact_uri"] == f"s3://{scenario.bucket}/headpose/TFartifacts/{job}/output/model.tar.gz"
    assert download["sha256"] == hashlib.sha256(archive).hexdigest()

    # The console links the UI shows: URLs the task stored in XCom under each link's key.
    with db(home) as conn:
        rows = conn.execute(
            "SELECT key, value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = 'train' AND key LIKE '_link_%'",
            (DAG_ID, run_id),
        ).fetchall()
    links = {key: json.loads(value) for key, value in rows}
    assert links["_link_SageMakerTrainingJobLink"].endswith(f"#/jobs/{job}")
    assert f"logStreamNameFilter$3D{job}" in links["_link_SageMakerTrainingLogsLink"]
    with urllib.request.urlopen(links["_link_S3ModelArtifactLink"]) as opened:  # moto's, presigned: no credentials
        assert opened.read() == archive
