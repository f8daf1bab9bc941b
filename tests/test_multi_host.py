"""Training past one device, for real: the entry point on two hosts and on one host over two devices.

The local backend runs the real entry point from the real ``sourcedir.tar.gz`` through the
SageMaker training toolkit, as two hosts (``MultiWorkerMirroredStrategy``) and as one host
over two logical CPU devices (``MirroredStrategy``), at the same global batch; and the
replicated training loop is held against ``Model.fit``.
"""
from __future__ import annotations

import json
import re
import tarfile
import threading
from pathlib import Path

import pytest

from headpose.artifacts.archive import find_saved_model, safe_extract
from headpose.backends.local import run_local_training_job
from headpose.backends.sourcedir import build_sourcedir
from headpose.planning.layout import RunLayout, split_s3_uri
from headpose.planning.request import training_job_request
from headpose.planning.rules import validate_run_params

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
    """Three jobs of the real entry point through the real toolkit: two hosts for 3 steps, the
    same two hosts resuming to 6 from the chief's checkpoint, and one host over two CPU devices
    for 6 steps at the same global batch."""
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
    checkpoints = work / "checkpoints"  # every host's /opt/ml/checkpoints, restored from one S3 URI

    def run(name: str, hosts: int, steps: int, **hyperparameters) -> dict:
        job = f"{JOB}-{name}"
        params = validate_run_params({
            "s3_bucket": BUCKET, "instance_count": hosts, "training_steps": steps, "evaluation_steps": 1,
            "batch_size": PER_REPLICA_BATCH, "resnet_size": 10, "base_filters": 8, "min_accuracy": 0,
        })
        layout = RunLayout.for_run(BUCKET, "headpose", job, f"s3://{BUCKET}/{prefix}")
        s3.upload_file(str(sourcedir), BUCKET, split_s3_uri(layout.sourcedir_uri)[1])
        request = training_job_request(layout, params, "local", region="us-east-1")
        request["HyperParameters"].update({k: json.dumps(v) for k, v in {"log_every": 1, **hyperparameters}.items()})
        lines: list[str] = []
        run_local_training_job(request, s3, work / name, lines.append, sourcedir_sha256=sha256)
        archive = work / f"{name}.tar.gz"
        s3.download_file(BUCKET, split_s3_uri(layout.model_artifact_uri)[1], str(archive))
        return {"lines": lines, "archive": archive, "variables": _variables(archive, work / f"{name}-model")}

    # One host over two devices runs beside the first two-host job: the machine has two cores.
    one_host: dict = {}
    beside = threading.Thread(target=lambda: one_host.update(run("one-host", 1, 12, cpu_devices=2)))
    beside.start()
    first = run("first", 2, 6, checkpoint_dir=str(checkpoints), checkpoint_every=1)
    beside.join()
    resumed = run("resumed", 2, 12, checkpoint_dir=str(checkpoints), checkpoint_every=1)
    return {"first": first, "resumed": resumed, "one_host": one_host}


@pytest.mark.slow
def test_two_hosts_and_one_host_at_the_same_global_batch_agree(two_hosts_and_one):
    import numpy as np

    two, one, first = (two_hosts_and_one[k]["variables"] for k in ("resumed", "one_host", "first"))
    assert two.keys() == one.keys() and len(two) > 40
    differences = {name: float(np.max(np.abs(two[name] - one[name]))) for name in two}
    moved = max(float(np.max(np.abs(two[name] - first[name]))) for name in two)
    # Steps 4 to 6 moved the weights this much; the two layouts differ by float rounding only.
    assert max(differences.values()) < 1e-5 < moved / 100, (max(differences.values()), moved)
    for name in ("resumed", "one_host"):
        assert any("distribution: strategy=" in line and "replicas=2" in line and "batch 4 per replica, 8 global"
                   in line for line in two_hosts_and_one[name]["lines"])


@pytest.mark.slow
def test_a_two_host_job_trains_as_one_writes_one_model_and_resumes_on_every_host(two_hosts_and_one):
    first, resumed = two_hosts_and_one["first"]["lines"], two_hosts_and_one["resumed"]["lines"]
    assert any(line.startswith("[algo-1] distribution: strategy=MultiWorkerMirroredStrategy hosts=2") for line in first)
    assert "[algo-2] worker 1: trained; the chief evaluates and writes the model" in first
    # SageMaker reads metrics from the chief's lines; the worker prints none.
    assert "[algo-1] progress: step=3/3 (100.0%)" in " ".join(first)
    assert not [line for line in first + resumed if line.startswith("[algo-2] metric:")]
    # Both hosts restore the checkpoint the chief wrote, and go on from its step.
    for host in ("algo-1", "algo-2"):
        assert any(re.match(rf"\[{host}\] resumed from \S+/checkpoints/ckpt-3 at step 3$", line) for line in resumed)
    assert "[algo-1] progress: step=6/6 (100.0%)" in " ".join(resumed)
    for name in ("first", "resumed"):
        with tarfile.open(two_hosts_and_one[name]["archive"]) as tar:
            exports = {m.name.split("/")[2] for m in tar.getmembers() if m.name.startswith("export/Servo/")}
        assert len(exports) == 1, exports


@pytest.mark.slow
def test_the_replicated_training_loop_takes_the_steps_model_fit_takes():
    """The loop that trains every layout of several replicas (Keras' fit cannot under
    MultiWorkerMirroredStrategy) against ``fit`` itself, on one device: the same loss with
    its L2 term, the same optimizer steps, the same running logs."""
    import numpy as np
    import tensorflow as tf

    from headpose.training import distribution, model
    from headpose.training.cluster import Cluster

    rng = np.random.default_rng(5)
    images, labels = rng.random((8, 84, 84, 3), dtype=np.float32), rng.integers(0, 9, 8).astype(np.int32)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()

    def compiled():
        tf.keras.utils.set_random_seed(3)
        net = model.build_resnet(10, 4, 1e-2, 0.9)
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

    assert int(by_loop.optimizer.iterations.numpy()) == 3
    for ours, theirs in zip(by_loop.weights, by_fit.weights):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5, err_msg=ours.path)
    np.testing.assert_allclose(np.array(loop_logs.seen), np.array(fit_logs.seen), rtol=1e-4)
