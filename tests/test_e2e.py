"""Whole DAG runs with ``airflow dags test`` against moto's S3 server: the model learns.

The learning run (``dag_batch``'s "learning") trains a small ResNet for a few hundred steps
on synthetic data, freezes it, judges it through the frozen graph on the held-out split with
a meaningful ``min_accuracy`` and publishes it. Many checks share that one run: the published
pointer and the files it names, every S3 key the run wrote, the tutorial Lambda's
preprocessing (BGR frame, resize to 84x84, / 255) reaching the validated accuracy, and each
edge format published (and loaded in its own runtime) or withheld with its figures. A bad
conf given to the same command is refused before a run (and so any task) exists; a model
below min_accuracy leaves its evidence under rejected/ and nothing published changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from airflow_support import DAG_ID, run_id_of, task_states
from airflow_support import db as _db
from airflow_support import xcom as _xcom
from dag_batch import BY_NAME, LEARNING_CONF

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
LEARNING = BY_NAME["learning"]
BUCKET = LEARNING.bucket
CHANCE = 1 / 9


def _get(s3, uri: str) -> bytes:
    bucket, key = uri[len("s3://"):].split("/", 1)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def learned(dag_batch):
    """The shared learning run: its output, job name, pointer and S3 keys."""
    result = dag_batch.run(LEARNING.name)
    assert result.exit_code == 0, result.output[-8000:]
    s3, home = dag_batch.s3(), dag_batch.home
    run_id = run_id_of(home, LEARNING.when)
    job = _xcom(home, "plan_run", "training_job_name", run_id=run_id)
    pointer = json.loads(_get(s3, f"s3://{BUCKET}/headpose/published/latest.json"))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    return {"s3": s3, "output": result.output, "job": job, "pointer": pointer, "keys": keys, "home": home,
            "run_id": run_id, "endpoint": dag_batch.endpoint}


def test_a_bad_conf_is_refused_before_any_task_runs(dag_batch):
    scenario = BY_NAME["bad conf"]
    result = dag_batch.run(scenario.name)
    assert result.exit_code != 0
    assert "Invalid input for param training_steps" in result.output
    assert run_id_of(dag_batch.home, scenario.when) is None  # no run, so no task, exists


def test_the_model_learns_through_the_whole_path(learned):
    report = _xcom(learned["home"], "validate_model", run_id=learned["run_id"])
    assert report["accepted"] and report["images"] == 4 * 93
    # Measured through the frozen graph by validate_model, the gate a publish depends on.
    assert report["accuracy"] >= LEARNING_CONF["min_accuracy"] > 3 * CHANCE
    assert learned["pointer"]["metrics"]["accuracy"] == report["accuracy"]
    assert "validate_model's gate: accuracy" in learned["output"]
    # Trained on two local hosts: both hosts' output reached the task log, the chief's steps
    # are 300 of the global batch (600 one-replica steps of 16), and the worker exported nothing.
    output = learned["output"]
    assert "distribution: strategy=MultiWorkerMirroredStrategy hosts=2 replicas=2" in output
    assert "[algo-1] progress: step=300/300" in output
    assert "[algo-2] worker 1: trained; the chief evaluates and writes the model" in output
    training = _xcom(learned["home"], "train", run_id=learned["run_id"])
    assert training["Training"]["ResourceConfig"]["InstanceCount"] == 2


def test_a_successful_run_logs_no_errors_and_its_train_links_fit_a_local_job(learned):
    # An ERROR line in a green run sends the ops team looking for a fault that is not there.
    errors = [line for line in learned["output"].splitlines() if "[error" in line]
    assert errors == []
    with _db(learned["home"]) as db:
        links = dict(db.execute("SELECT key, value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = 'train' "
                                "AND key LIKE '_link_%'", (DAG_ID, learned["run_id"])).fetchall())
    # At moto's endpoint, presigned: it opens with no credentials, as from a browser.
    with urllib.request.urlopen(json.loads(links["_link_S3ModelArtifactLink"])) as opened:
        assert opened.read() == _get(learned["s3"], f"s3://{BUCKET}/headpose/TFartifacts/{learned['job']}/output/model.tar.gz")
    # No SageMaker job or CloudWatch log exists for a local run: those links are blank.
    assert json.loads(links["_link_SageMakerTrainingJobLink"]) == ""
    assert json.loads(links["_link_SageMakerTrainingLogsLink"]) == ""


def test_the_pointer_names_the_runs_immutable_version_and_the_mirror_equals_it(learned):
    s3, job, pointer = learned["s3"], learned["job"], learned["pointer"]
    assert pointer["version"] == 3 and pointer["training_job_name"] == job and pointer["channel_order"] == "bgr"
    version = f"s3://{BUCKET}/headpose/TFartifacts/{job}/output/"
    for name, entry in pointer["files"].items():
        assert entry["uri"] == version + name
        assert hashlib.sha256(_get(s3, entry["uri"])).hexdigest() == entry["sha256"]
        assert _get(s3, f"s3://{BUCKET}/headpose/published/latest/{name}") == _get(s3, entry["uri"])
    metadata = json.loads(_get(s3, pointer["files"]["frozen_model.json"]["uri"]))
    assert metadata["sha256"] == pointer["files"]["frozen_model.pb"]["sha256"]
    assert metadata["preprocessing"]["channel_order"] == "bgr"
    assert pointer["dataset"]["manifest_sha256"] == hashlib.sha256(_get(s3, pointer["dataset"]["manifest_uri"])).hexdigest()
    assert pointer["evaluation_set"]["pinned"] is False and pointer["attempts"] == [job]


def test_two_hosts_leave_one_model_archive_with_one_export(learned, tmp_path):
    import tarfile

    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(_get(learned["s3"], f"s3://{BUCKET}/headpose/TFartifacts/{learned['job']}/output/model.tar.gz"))
    with tarfile.open(archive) as tar:
        exports = {name.split("/")[2] for name in tar.getnames() if name.startswith("export/Servo/") and
                   name.count("/") >= 2}
    assert len(exports) == 1, exports


def test_every_key_the_run_wrote_carries_its_job_name(learned):
    job, keys = learned["job"], learned["keys"]
    shared = [k for k in keys if k.startswith(("headpose/datasets/", "headpose/published/latest"))]
    run_keys = sorted(set(keys) - set(shared))
    assert all(job in key for key in run_keys), run_keys
    assert {
        f"headpose/customTFcodes/{job}/source/sourcedir.tar.gz",
        f"headpose/TFartifacts/{job}/output/model.tar.gz",
        f"headpose/TFartifacts/{job}/candidate/frozen_model.pb",
        f"headpose/TFartifacts/{job}/output/frozen_model.pb",
        f"headpose/TFartifacts/{job}/output/report.json",
        f"headpose/TFartifacts/{job}/output/confusion_matrix.png",
        f"headpose/published/history/{job}.json",
    } <= set(run_keys)
    plan = _xcom(learned["home"], "plan_run", run_id=learned["run_id"])
    # Pointers and channels under published/ are every run's; everything else is the run's own.
    own = [uri for key, uri in plan.items() if key.endswith("_uri") and not uri.startswith(plan["published_prefix"])]
    assert own and all(job in uri for uri in own), own
    # The worker's scratch is gone: every hand-off went through S3.
    assert not (learned["home"] / "workspace" / job).exists()


def test_the_tutorial_lambdas_preprocessing_reaches_the_validated_accuracy(learned, tmp_path):
    """An OpenCV-style BGR frame, resized to 84x84 and divided by 255, fed to the published graph."""
    s3, pointer = learned["s3"], learned["pointer"]
    graph = tmp_path / "frozen_model.pb"
    graph.write_bytes(_get(s3, f"s3://{BUCKET}/headpose/published/latest/frozen_model.pb"))
    shards = []
    for key in learned["keys"]:
        if key.startswith("headpose/datasets/") and "/eval-" in key:
            shards.append(tmp_path / key.rsplit("/", 1)[1])
            s3.download_file(BUCKET, key, str(shards[-1]))
    probe = f"""
import json
import numpy as np, tensorflow as tf
from headpose.training import shards
fed, labels = [], []
for images, classes in shards.dataset({[str(p) for p in shards]!r}, 64, training=False):
    # A camera frame as OpenCV gives it: BGR uint8 (the shards hold BGR), larger than 84x84.
    frames = tf.image.resize(tf.cast(tf.round(images * 255.0), tf.uint8), [252, 252], method="nearest")
    # The Lambda: cv2.resize(frame, (84, 84)), then / 255, no colour conversion.
    fed.append(tf.image.resize(tf.cast(frames, tf.float32), [84, 84], method="bilinear",
                               antialias=False).numpy() / 255.0)
    labels.append(classes.numpy())
graph_def = tf.compat.v1.GraphDef()
graph_def.ParseFromString(open({str(graph)!r}, "rb").read())
correct = total = 0
with tf.Graph().as_default() as graph:
    tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        for batch, classes in zip(fed, labels):
            out = session.run("softmax_tensor:0", {{"inputs:0": batch}})
            correct += int((out.argmax(axis=1) == classes).sum()); total += len(out)
print(json.dumps({{"accuracy": correct / total, "images": total}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    ran = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    answer = json.loads(ran.stdout.strip().splitlines()[-1])
    assert answer["images"] == pointer["metrics"]["images"]
    assert answer["accuracy"] >= pointer["metrics"]["accuracy"] - 0.03  # the validated figure, within resampling


def test_a_run_below_min_accuracy_fails_keeps_its_evidence_and_leaves_latest_alone(dag_batch):
    scenario = BY_NAME["below min_accuracy"]
    result = dag_batch.run(scenario.name)
    s3, home, bucket = dag_batch.s3(), dag_batch.home, scenario.bucket

    def published() -> dict:
        return {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="headpose/published/")["Contents"]}

    output = result.output
    assert result.exit_code != 0  # the run is failed, though its cleanup teardown succeeded
    run_id = run_id_of(home, scenario.when)
    states = task_states(home, run_id)
    assert states["validate_model"] == "failed"
    assert states["upload_frozen_model"] == states["publish"] == "upstream_failed"
    assert states["cleanup"] == "success"
    job = _xcom(home, "plan_run", "training_job_name", run_id=run_id)
    rejected = f"s3://{bucket}/headpose/TFartifacts/{job}/rejected/report.json"
    assert "is below min_accuracy 1.0000" in output and f"Report: {rejected}" in output
    report = json.loads(_get(s3, rejected))
    assert report["accepted"] is False and report["problems"]
    stored = s3.head_object(Bucket=bucket, Key=f"headpose/TFartifacts/{job}/rejected/report.json")
    assert stored["ContentType"] == "application/json"  # the S3 console's Open shows it too
    # The UI's way to it: a link in validate_model's XCom, written before the task failed.
    links = _xcom(home, "validate_model", "links", run_id=run_id)
    with urllib.request.urlopen(links["report"]) as opened:
        assert json.loads(opened.read()) == report
        assert opened.headers["Content-Type"] == "application/json"  # shown in the tab, not downloaded
    with urllib.request.urlopen(links["confusion_matrix"]) as opened:
        assert opened.headers["Content-Type"] == "image/png" and opened.read().startswith(b"\x89PNG")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"headpose/TFartifacts/{job}/rejected/confusion_matrix.png" in keys
    assert not any(job in k and ("/output/frozen_model" in k or "published/" in k) for k in keys)
    before = {key: etag for key, (etag, _) in dag_batch.prepared["before"][scenario.name].items()}
    assert published() == before


def test_each_edge_format_is_published_and_runs_from_s3_or_is_withheld_with_its_figures(learned, tmp_path,
                                                                                         monkeypatch):
    """The contract, whatever this CPU makes of a briefly trained model: every float32
    format is published (it matches TensorFlow); a reduced-precision one is published, or
    withheld with its figures in the report (an int8 format can lose a few images here;
    test_edge_formats proves each holds on a model trained long enough)."""
    import numpy as np
    from PIL import Image

    from headpose.artifacts.edge.export import DEFAULT_FORMATS
    from headpose.artifacts.evaluate import load_frozen_graph
    from headpose.datasets.rendering import generate_image
    from headpose.edge.client import default_fetch, load_model

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    pointer, s3 = learned["pointer"], learned["s3"]
    report = json.loads(_get(s3, pointer["files"]["report.json"]["uri"]))
    assert set(report["formats"]) == set(DEFAULT_FORMATS)  # every format was judged
    for name, verdict in report["formats"].items():
        if verdict["precision"] == "float32":
            assert verdict["accepted"], (name, verdict)
        if verdict["accepted"]:
            assert name in pointer["formats"], name
        else:  # withheld, with what it scored against the frozen graph and why
            assert name not in pointer["formats"], name
            assert verdict["accuracy"] is not None and verdict["reason"].startswith(name + ":"), (name, verdict)
    rgb = generate_image(np.random.default_rng(7), 15, -60)  # a face the model has not seen
    Image.fromarray(rgb).save(tmp_path / "face.png")
    graph = tmp_path / "frozen_model.pb"
    graph.write_bytes(_get(s3, pointer["files"]["frozen_model.pb"]["uri"]))
    expected = int(load_frozen_graph(graph)(rgb[None, ..., ::-1].astype(np.float32) / 255.0).argmax())
    fetch = default_fetch(learned["endpoint"])
    for name, entry in pointer["formats"].items():
        model = load_model(fetch, pointer, tmp_path / "cache", name)  # downloaded, sha256-checked, opened
        assert model.format == name and model.sha256 == entry["sha256"]
        prediction = model.predict(tmp_path / "face.png")
        if entry["precision"] == "float32":
            assert prediction.class_index == expected, name
        assert abs(sum(prediction.probabilities.values()) - 1) < 0.02, name
