"""One whole DAG run with ``airflow dags test`` against moto's S3 server, tiny settings.

A real model is trained (by the local backend), frozen, validated and published; the
test then reads the published frozen graph back from S3 and runs it, and checks that
the ``training_job_name`` in XCom names every S3 key the run wrote. A bad conf given to
the same command is refused before a run (and so any task) exists.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from airflow_support import DAG_ID, TINY_TRAINING, new_airflow_home
from airflow_support import dags_test as _dags_test
from airflow_support import db as _db
from airflow_support import xcom as _xcom

pytestmark = pytest.mark.e2e

BUCKET = "headpose-e2e"
TINY_CONF = {
    "s3_bucket": BUCKET,
    "backend": "local",
    "dataset_source": "synthetic",
    "synthetic_train_per_pose": 1,
    "synthetic_eval_per_pose": 1,
    "images_per_shard": 64,
    **TINY_TRAINING,
}


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory, airflow_db_template):
    return new_airflow_home(airflow_db_template, tmp_path_factory.mktemp("airflow-home"))


def test_a_bad_conf_is_refused_before_any_task_runs(airflow_home, moto_server):
    result = _dags_test(airflow_home, moto_server.endpoint, {**TINY_CONF, "training_steps": 0}, "bad-conf.log")
    assert result.returncode != 0
    assert "Invalid input for param training_steps" in result.stdout + result.stderr
    with _db(airflow_home) as db:
        assert db.execute("SELECT COUNT(*) FROM dag_run WHERE dag_id = ?", (DAG_ID,)).fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM task_instance WHERE dag_id = ?", (DAG_ID,)).fetchone()[0] == 0


def test_a_full_run_publishes_a_frozen_graph_that_runs(airflow_home, moto_server, tmp_path):
    endpoint = moto_server.endpoint
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)

    result = _dags_test(airflow_home, endpoint, TINY_CONF, "run.log")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]

    job = _xcom(airflow_home, "plan_run", "training_job_name")
    assert job.startswith("deeplens-TF-headpose-")
    training = _xcom(airflow_home, "train")["Training"]
    assert training["TrainingJobName"] == job and training["TrainingJobStatus"] == "Completed"
    assert "progress: step=3/3" in result.stdout + result.stderr  # training output reached the task log

    # The published pointer names this run and its immutable frozen graph.
    pointer = json.loads(s3.get_object(Bucket=BUCKET, Key="headpose/published/latest.json")["Body"].read())
    assert pointer["training_job_name"] == job
    assert pointer["frozen_model_uri"] == f"s3://{BUCKET}/headpose/TFartifacts/{job}/output/frozen_model.pb"
    graph_path = tmp_path / "frozen_model.pb"
    s3.download_file(BUCKET, "headpose/published/latest/frozen_model.pb", str(graph_path))
    metadata = json.loads(s3.get_object(Bucket=BUCKET, Key="headpose/published/latest/frozen_model.json")["Body"].read())
    assert metadata["sha256"] == pointer["frozen_model_sha256"]

    # Every S3 key the run wrote carries its job name; only the shared dataset (named by
    # its settings) and the stable "latest" keys do not.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    shared = [k for k in keys if k.startswith("headpose/datasets/") or k.startswith("headpose/published/latest")]
    run_keys = sorted(set(keys) - set(shared))
    assert all(job in key for key in run_keys), run_keys
    expected = {
        f"headpose/customTFcodes/{job}/source/sourcedir.tar.gz",
        f"headpose/TFartifacts/{job}/output/model.tar.gz",
        f"headpose/TFartifacts/{job}/output/frozen_model.pb",
        f"headpose/TFartifacts/{job}/output/frozen_model.json",
        f"headpose/TFartifacts/{job}/output/report.json",
        f"headpose/published/history/{job}.json",
    }
    assert expected <= set(run_keys)
    plan = _xcom(airflow_home, "plan_run")
    assert all(job in uri for k, uri in plan.items() if k.endswith("_uri") and not k.startswith("published_"))

    report = json.loads(s3.get_object(Bucket=BUCKET, Key=f"headpose/TFartifacts/{job}/output/report.json")["Body"].read())
    assert report["accepted"] and report["parity_max_abs_diff"] <= 1e-4
    assert report["images"] == 93  # the Prima grid, one held-out image per pose

    # The run's workspace was removed by cleanup.
    assert not (airflow_home / "workspace" / job).exists()

    # Run the published graph on held-out images, as a consumer would: the .pb alone.
    eval_key = next(k for k in keys if k.startswith("headpose/datasets/") and "/eval-" in k)
    shard = tmp_path / "eval-00000.tfrecord"
    s3.download_file(BUCKET, eval_key, str(shard))
    probe = f"""
import json, sys
import numpy as np, tensorflow as tf
from headpose.training import shards
graph_def = tf.compat.v1.GraphDef()
graph_def.ParseFromString(open({str(graph_path)!r}, "rb").read())
images, classes = next(iter(shards.dataset([{str(shard)!r}], 8, training=False)))
with tf.Graph().as_default() as graph:
    tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        out = session.run("softmax_tensor:0", {{"inputs:0": images.numpy()}})
print(json.dumps({{"shape": list(out.shape), "sums": out.sum(axis=1).tolist()}}))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "include"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    ran = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    answer = json.loads(ran.stdout.strip().splitlines()[-1])
    assert answer["shape"] == [8, 9]
    assert all(abs(s - 1) < 1e-4 for s in answer["sums"])


def test_a_run_below_min_accuracy_fails_and_leaves_latest_alone(airflow_home, moto_server):
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)

    def latest() -> bytes | None:
        try:
            return s3.get_object(Bucket=BUCKET, Key="headpose/published/latest.json")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None

    before = latest()
    result = _dags_test(airflow_home, moto_server.endpoint, {**TINY_CONF, "min_accuracy": 1}, "below-min.log")
    output = result.stdout + result.stderr
    assert result.returncode != 0  # the run is failed, though its cleanup teardown succeeded
    assert "is below min_accuracy 1.0000" in output
    assert latest() == before
    with _db(airflow_home) as db:
        run_id, state = db.execute(
            "SELECT run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (DAG_ID,)
        ).fetchone()
        states = dict(db.execute(
            "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", (DAG_ID, run_id)
        ).fetchall())
        job = json.loads(db.execute(
            "SELECT value FROM xcom WHERE run_id = ? AND task_id = 'plan_run' AND key = 'training_job_name'",
            (run_id,),
        ).fetchone()[0])
    assert state == "failed"
    assert states["validate_model"] == "failed"
    assert states["upload_frozen_model"] == states["publish"] == "upstream_failed"
    assert states["cleanup"] == "success"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert not any(job in k and ("frozen_model" in k or "published/" in k) for k in keys)
    assert not (airflow_home / "workspace" / job).exists()
