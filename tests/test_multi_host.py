"""Training past one device, for real: the entry point on two hosts and on one host over two devices.

The local backend runs the real entry point from the real ``sourcedir.tar.gz`` through the
SageMaker training toolkit, as two hosts (``MultiWorkerMirroredStrategy``) and as one host
over two logical CPU devices (``MirroredStrategy``), at the same global batch; and the
replicated training loop is held against ``Model.fit``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import textwrap
from pathlib import Path

import pytest

from headpose.artifacts.archive import find_saved_model, safe_extract
from headpose.backends.local import LocalTrainingError, run_local_training_job
from headpose.backends.sourcedir import build_sourcedir
from headpose.planning.layout import RunLayout, split_s3_uri
from headpose.planning.request import training_job_request
from headpose.planning.rules import validate_run_params

from test_local_backend import BUCKET as LOCAL_BUCKET, NO_S3, _alive, _sourcedir_bytes, job  # noqa: F401  (a fixture)

BUCKET = "multi-host-test"
JOB = "deeplens-TF-headpose-2024-05-06-07-08-09"

# -- the real entry point on two hosts -----------------------------------------------------
#
# Each training shard holds copies of one mirror-symmetric image at pan 0, so that the
# random flip changes nothing and every batch of a shard is the same: the steps depend on
# which replica reads which shard and how the replicas combine their gradients, not on
# the order in which the shuffle happens to draw. Two one-device hosts (each reading one
# shard) and one host over two devices (one shard each, MirroredStrategy) then compute the
# same steps, and a checkpoint restore in between changes nothing.

PER_REPLICA_BATCH = 4


def _symmetric_shards(folder: Path) -> None:
    import numpy as np

    from headpose.training.shards import ShardWriter

    rng = np.random.default_rng(7)
    for split, tilts in (("train", (-60, 60)), ("eval", (-60, 60))):
        with ShardWriter(folder, split, images_per_shard=PER_REPLICA_BATCH) as writer:
            for tilt in tilts:
                half = rng.integers(0, 256, (84, 42, 3), dtype=np.uint8)
                image = np.concatenate([half, half[:, ::-1]], axis=1)
                for _ in range(PER_REPLICA_BATCH):
                    writer.write(image, tilt, 0)


def _variables(archive: Path, folder: Path) -> dict:
    import tensorflow as tf

    saved_model = find_saved_model(safe_extract(archive, folder))
    reader = tf.train.load_checkpoint(str(saved_model / "variables" / "variables"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("model/")}


@pytest.fixture(scope="module")
def two_hosts_and_one(moto_server, tmp_path_factory):
    """The real entry point through the real toolkit: one host over two CPU devices for 6
    steps (checkpoints at 3 and 6), then two hosts at the same global batch that resume from
    its step-3 checkpoint to 6, as the hosts of a restarted SageMaker job all do from the one
    checkpoint URI."""
    import boto3

    work = tmp_path_factory.mktemp("two-hosts")
    moto_server.reset()
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    _symmetric_shards(work / "shards")
    prefix = "headpose/datasets/symmetric/"
    for shard in sorted((work / "shards").glob("*.tfrecord")):
        s3.upload_file(str(shard), BUCKET, prefix + shard.name)
    sourcedir, sha256 = build_sourcedir(work / "sourcedir.tar.gz")

    def run(name: str, hosts: int, **hyperparameters) -> dict:
        job = f"{JOB}-{name}"
        params = validate_run_params({
            "s3_bucket": BUCKET, "instance_count": hosts, "training_steps": 12, "evaluation_steps": 1,
            "batch_size": PER_REPLICA_BATCH, "resnet_size": 10, "base_filters": 8, "min_accuracy": 0,
        })
        layout = RunLayout.for_run(BUCKET, "headpose", job, f"s3://{BUCKET}/{prefix}")
        s3.upload_file(str(sourcedir), BUCKET, split_s3_uri(layout.sourcedir_uri)[1])
        request = training_job_request(layout, params, "local", region="us-east-1")
        settings = {"log_every": 1, "checkpoint_every": 3, **hyperparameters}
        request["HyperParameters"].update({k: json.dumps(v) for k, v in settings.items()})
        lines: list[str] = []
        run_local_training_job(request, s3, work / name, lines.append, sourcedir_sha256=sha256)
        archive = work / f"{name}.tar.gz"
        s3.download_file(BUCKET, split_s3_uri(layout.model_artifact_uri)[1], str(archive))
        return {"lines": lines, "archive": archive, "variables": _variables(archive, work / f"{name}-model")}

    one_host = run("one-host", 1, cpu_devices=2, checkpoint_dir=str(work / "one-host-checkpoints"))
    shared = work / "checkpoints"  # every host's /opt/ml/checkpoints, restored from one S3 URI
    shared.mkdir()
    for part in (work / "one-host-checkpoints").glob("ckpt-3.*"):
        shutil.copy(part, shared)
    (shared / "checkpoint").write_text('model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')
    # How far steps 4 to 6 moved the one host's weights (checkpoints name them their own way).
    moved = {name: abs(value - at_step_3) for name, value, at_step_3 in _pairs(
        _checkpoint_variables(work / "one-host-checkpoints" / "ckpt-6"), _checkpoint_variables(shared / "ckpt-3"))}
    two_hosts = run("two-hosts", 2, checkpoint_dir=str(shared))
    return {"one_host": one_host, "two_hosts": two_hosts, "moved": moved, "checkpoints": shared}


def _pairs(left: dict, right: dict) -> list:
    assert left.keys() == right.keys()
    return [(name, left[name], right[name]) for name in left]


def _checkpoint_variables(prefix: Path) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("model/")}


@pytest.mark.slow
def test_two_hosts_and_one_host_at_the_same_global_batch_agree(two_hosts_and_one):
    import numpy as np

    two, one = two_hosts_and_one["two_hosts"]["variables"], two_hosts_and_one["one_host"]["variables"]
    assert len(two) > 40
    difference = max(float(np.max(np.abs(a - b))) for _, a, b in _pairs(two, one))
    moved = max(float(np.max(change)) for change in two_hosts_and_one["moved"].values())
    # Steps 4 to 6 moved the weights this much; the two layouts differ by float rounding only.
    assert difference < 1e-5 < moved / 100, (difference, moved)
    for name in ("two_hosts", "one_host"):
        assert any("distribution: strategy=" in line and "replicas=2" in line and "batch 4 per replica, 8 global"
                   in line for line in two_hosts_and_one[name]["lines"])


@pytest.mark.slow
def test_a_two_host_job_resumes_on_every_host_and_only_the_chief_writes(two_hosts_and_one):
    lines = two_hosts_and_one["two_hosts"]["lines"]
    assert any(line.startswith("[algo-1] distribution: strategy=MultiWorkerMirroredStrategy hosts=2") for line in lines)
    # Both hosts restore the one checkpoint and go on from its step.
    for host in ("algo-1", "algo-2"):
        assert any(re.match(rf"\[{host}\] resumed from \S+/checkpoints/ckpt-3 at step 3$", line) for line in lines)
    assert "[algo-2] worker 1: trained; the chief evaluates and writes the model" in lines
    # SageMaker reads metrics from the chief's lines; the worker prints none.
    assert "[algo-1] progress: step=6/6 (100.0%)" in " ".join(lines)
    assert not [line for line in lines if line.startswith("[algo-2] metric:")]
    # Only the chief writes to the folder every host syncs; one model.
    assert sorted(p.name.split(".")[0] for p in two_hosts_and_one["checkpoints"].iterdir()) == [
        "checkpoint", "ckpt-3", "ckpt-3", "ckpt-6", "ckpt-6"]
    with tarfile.open(two_hosts_and_one["two_hosts"]["archive"]) as tar:
        exports = {m.name.split("/")[2] for m in tar.getmembers() if m.name.startswith("export/Servo/")}
    assert len(exports) == 1, exports


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_the_replicated_training_loop_takes_the_steps_model_fit_takes(policy):
    """The loop that trains every layout of several replicas (Keras' fit cannot under
    MultiWorkerMirroredStrategy) against ``fit`` itself, on one device: the same loss with
    its L2 term, the same optimizer steps (with mixed precision, the same loss scaling),
    the same running logs."""
    import numpy as np
    import tensorflow as tf

    from headpose.training import distribution, model
    from headpose.training.cluster import Cluster

    rng = np.random.default_rng(5)
    images, labels = rng.random((8, 84, 84, 3), dtype=np.float32), rng.integers(0, 9, 8).astype(np.int32)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()

    def compiled():
        tf.keras.utils.set_random_seed(3)
        tf.keras.mixed_precision.set_global_policy(policy)
        net = model.build_resnet(10, 4, 1e-2, 0.9)
        tf.keras.mixed_precision.set_global_policy("float32")
        net.compile(optimizer=tf.keras.optimizers.SGD(0.05, momentum=0.9), loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"], jit_compile=False)
        return net

    class Logs(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_end(self, batch, logs=None):
            self.seen.append((batch, float(logs["loss"]), float(logs["accuracy"])))

    by_fit, fit_logs = compiled(), Logs()
    by_fit.fit(data, epochs=1, steps_per_epoch=3, verbose=0, callbacks=[fit_logs])
    by_loop, loop_logs = compiled(), Logs()
    layout = distribution.Layout(tf.distribute.get_strategy(), Cluster(("algo-1",), "algo-1", None), "one device")
    distribution.train_replicated(by_loop, layout, data, 3, 8, False, [loop_logs])

    assert int(by_loop.optimizer.iterations.numpy()) == 3 and by_loop.dtype_policy.name == policy
    for ours, theirs in zip(by_loop.weights, by_fit.weights):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5, err_msg=ours.path)
    np.testing.assert_allclose(np.array(loop_logs.seen), np.array(fit_logs.seen), rtol=1e-4)


# -- the local backend's two hosts, as processes ------------------------------------------

# What a host of a cluster sees; the worker then fails while the chief waits for it.
HOST_PROGRAM = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path

    host, hosts = os.environ["SM_CURRENT_HOST"], json.loads(os.environ["SM_HOSTS"])
    root = Path(os.environ["SM_MODEL_DIR"]).parent
    root.joinpath("seen.json").write_text(json.dumps({
        "hosts": hosts, "current_host": host, "tf_config": json.loads(os.environ.get("TF_CONFIG") or "null"),
        "channel_files": sorted(os.listdir(os.environ["SM_CHANNEL_TRAINING"])), "cwd": os.getcwd()}))
    root.joinpath("program.pid").write_text(str(os.getpid()))
    print(f"hello from {host}", flush=True)
    if host != hosts[0]:
        Path(os.environ["SM_OUTPUT_DIR"], "failure").write_text("RuntimeError: lost the chief")
        sys.exit(1)
    time.sleep(600)  # the chief, waiting for its worker in a collective step
''')


def test_two_hosts_run_as_two_processes_under_the_contract_and_one_failing_stops_the_other(job, s3_client):
    s3_client.put_object(Bucket=LOCAL_BUCKET, Key=job["code_key"], Body=_sourcedir_bytes(HOST_PROGRAM))
    request = {**job["request"], "ResourceConfig": {**job["request"]["ResourceConfig"], "InstanceCount": 2}}
    request["HyperParameters"] = {**request["HyperParameters"],
                                  "sagemaker_multi_worker_mirrored_strategy_enabled": "true"}
    lines: list[str] = []
    started: list[subprocess.Popen] = []
    # A TF_CONFIG in the worker's environment must not reach a host: it names another cluster.
    environ = {**os.environ, **NO_S3, "TF_CONFIG": '{"cluster": {"worker": ["elsewhere:1"]}}'}
    with pytest.raises(LocalTrainingError) as failed:
        run_local_training_job(request, s3_client, job["root"], lines.append, environ=environ,
                               sourcedir_sha256=hashlib.sha256(_sourcedir_bytes(HOST_PROGRAM)).hexdigest(),
                               on_start=started.append)
    assert len(started) == 2 and started[0].pid != started[1].pid
    roots = {"algo-1": job["root"], "algo-2": job["root"] / "hosts" / "algo-2"}
    seen = {host: json.loads((root / "seen.json").read_text()) for host, root in roots.items()}
    workers = seen["algo-1"]["tf_config"]["cluster"]["worker"]
    assert len(set(workers)) == 2 and all(worker.startswith("127.0.0.1:") for worker in workers)
    for index, (host, root) in enumerate(roots.items()):
        assert seen[host]["hosts"] == ["algo-1", "algo-2"] and seen[host]["current_host"] == host
        assert seen[host]["tf_config"] == {"cluster": {"worker": workers}, "environment": "cloud",
                                           "task": {"type": "worker", "index": index}}
        assert Path(seen[host]["cwd"]) == root / "code"
        assert seen[host]["channel_files"] == ["eval-00000.tfrecord", "manifest.json", "nested", "train-00000.tfrecord"]
    assert "[algo-1] hello from algo-1" in lines and "[algo-2] hello from algo-2" in lines
    # The worker failed: the job fails with its reason, and the chief, which would wait for
    # it forever, is stopped.
    message = str(failed.value)
    assert "on algo-2 (exit code 1): RuntimeError: lost the chief" in message
    assert "on algo-1 (exit code" in message and "stopped after algo-2 failed" in message
    assert not _alive(int((job["root"] / "program.pid").read_text()))
    bucket, key = split_s3_uri(job["layout"].model_artifact_uri)
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket, Prefix=key.rsplit("/", 1)[0])
