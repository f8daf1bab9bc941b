"""What the batch of whole-DAG runs finds in S3 before its first run (``dag_batch``).

Runs inside the batch's own process (``dags_test_batch.py``, a ``call`` step), which
imports TensorFlow for the runs anyway: the pytest process that runs the unit tests
meanwhile never pays for it. It stages the tiny synthetic dataset (and a copy with a
corrupt training shard), builds the prepared models, publishes a champion where a
scenario needs one and places training results where a scenario starts after training,
then writes what it made (known accuracies, the published state before each run) to
``prepared.json`` for the tests.

A prepared model is a real Keras model exported as the entry point exports its own, but
one whose prediction is known in advance: global average pooling and a dense layer whose
bias favours one class, so its held-out accuracy is that class's share of the split.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import dag_batch as batch
from fault_support import (
    file_member,
    huge_member_tar_gz,
    link_member,
    place_training_result,
    published_state,
    tar_gz,
)

SAVED_MODEL = "export/Servo/1700000000/saved_model.pb"
# name: model.tar.gz from the prepared models (``m``)
ARCHIVES: dict[str, Callable[[dict[str, bytes]], bytes]] = {
    "parent traversal": lambda m: tar_gz([file_member(SAVED_MODEL), file_member("../../escaped.txt", b"pwned")]),
    "absolute path": lambda m: tar_gz([file_member(SAVED_MODEL), file_member("/tmp/headpose-absolute.txt", b"x")]),
    "symlink out": lambda m: tar_gz([file_member(SAVED_MODEL),
                                     link_member("export/Servo/1700000000/variables", "../../../../../etc")]),
    "hard link out": lambda m: tar_gz([link_member(SAVED_MODEL, "/etc/passwd", b"1")]),
    "huge member": lambda m: huge_member_tar_gz(SAVED_MODEL, 5 * 1024**4),
    "no export folder": lambda m: tar_gz([file_member("model/saved_model.pb")]),
    "two exports": lambda m: tar_gz([file_member(SAVED_MODEL), file_member("export/Servo/1700000001/saved_model.pb")]),
    "not a tarball": lambda m: b"PK\x03\x04 a zip, not a gzip tar",
    "corrupt saved_model.pb": lambda m: tar_gz([file_member(SAVED_MODEL, b"\x08\x96\x01 not a protobuf")]),
    "input node missing": lambda m: m["wrong_input"],
    "output of the wrong shape": lambda m: m["five_classes"],
    "good": lambda m: m["good"],
    "poor": lambda m: m["poor"],
}


# -- models -----------------------------------------------------------------------------

def biased_model(favourite: int, classes: int = 9, input_name: str = "inputs"):
    """Predicts class ``favourite`` for every image (its logit's bias dwarfs the rest)."""
    import numpy as np
    import tensorflow as tf

    inputs = tf.keras.Input((84, 84, 3), name=input_name)
    pooled = tf.keras.layers.GlobalAveragePooling2D()(inputs)
    dense = tf.keras.layers.Dense(classes, activation="softmax", name="softmax_tensor")
    model = tf.keras.Model(inputs, dense(pooled))
    bias = np.zeros(classes, np.float32)
    bias[favourite % classes] = 30.0
    dense.set_weights([np.full((3, classes), 1e-3, np.float32), bias])
    return model


def _export_with_input_name(model, model_dir: Path, input_name: str) -> None:
    """A SavedModel like export_saved_model's, but whose input is called ``input_name``."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, 84, 84, 3], tf.float32, name=input_name)

    @tf.function(input_signature=[spec])
    def serve(images):
        return {"softmax_tensor": tf.identity(model(images, training=False), name="softmax_tensor")}

    module = tf.Module()
    module.model, module.serve = model, serve
    tf.saved_model.save(module, str(model_dir / "export" / "Servo" / "1700000000"),
                        signatures={"serving_default": serve})


def build_models(per_class: list[int], work: Path) -> dict[str, Any]:
    """model.tar.gz files: ``good`` and ``poor`` (known accuracies), ``wrong_input`` and
    ``five_classes`` (contract breakers); and the good model's frozen graph."""
    from headpose.artifacts.archive import pack_model_dir
    from headpose.artifacts.freeze import freeze_model_archive
    from headpose.training.export import export_saved_model

    best = max(range(9), key=lambda c: per_class[c])
    worst = min(range(9), key=lambda c: per_class[c])
    assert per_class[best] > per_class[worst], per_class
    exports = {
        "good": lambda d: export_saved_model(biased_model(best), d),
        "poor": lambda d: export_saved_model(biased_model(worst), d),
        "wrong_input": lambda d: _export_with_input_name(biased_model(best, input_name="images"), d, "images"),
        "five_classes": lambda d: export_saved_model(biased_model(0, classes=5), d),
    }
    built: dict[str, Any] = {}
    for name, export in exports.items():
        export(work / name / "model")
        built[name] = pack_model_dir(work / name / "model", work / name / "model.tar.gz").read_bytes()
    frozen = freeze_model_archive(work / "good" / "model.tar.gz", work / "good" / "frozen", work_dir=work)
    built["good_frozen"] = frozen.pb_path.read_bytes()
    built["good_frozen_json"] = frozen.json_path.read_bytes()
    built["good_accuracy"] = per_class[best] / sum(per_class)
    built["poor_accuracy"] = per_class[worst] / sum(per_class)
    return built


# -- S3 ---------------------------------------------------------------------------------

def stage_datasets(s3, work: Path) -> dict[str, Any]:
    """The tiny synthetic dataset (93 training and 93 held-out images) under ``batch.DATASET``,
    and a copy whose training shard is corrupt (its manifest and eval split are fine)."""
    from headpose.datasets import settings as dataset_settings, staging, store
    from headpose.datasets.settings import GENERATOR_VERSION

    s3.create_bucket(Bucket=batch.DATA_BUCKET)
    settings = dataset_settings.synthetic_settings(
        {"synthetic_train_per_pose": 1, "synthetic_eval_per_pose": 1, "seed": 0, "images_per_shard": 128},
        GENERATOR_VERSION,
    )
    staging.stage_synthetic_dataset(s3, batch.DATASET, settings, print, scratch_root=work / "stage",
                                    cache_root=staging.synthetic_cache_root())
    shards = store.download_split(s3, batch.DATASET, "eval", work / "eval")
    manifest = s3.get_object(Bucket=batch.DATA_BUCKET, Key="headpose/datasets/tiny/manifest.json")["Body"].read()
    corrupt = "headpose/datasets/corrupt/"
    s3.put_object(Bucket=batch.DATA_BUCKET, Key=corrupt + "train-00000.tfrecord", Body=b"\x00garbage, not TFRecord" * 64)
    s3.put_object(Bucket=batch.DATA_BUCKET, Key=corrupt + shards[0].name, Body=shards[0].read_bytes())
    s3.put_object(Bucket=batch.DATA_BUCKET, Key=corrupt + "manifest.json", Body=manifest)
    return {"per_class": json.loads(manifest)["splits"]["eval"]["per_class"],
            "manifest_sha256": hashlib.sha256(manifest).hexdigest()}


def seed_champion(s3, bucket: str, models: dict[str, Any], manifest_sha256: str) -> None:
    """``bucket`` with the good model published, as an earlier run would have left it."""
    from headpose.planning.layout import RunLayout
    from headpose.registry import promotion

    layout = RunLayout.for_run(bucket, "headpose", batch.CHAMPION_JOB, batch.DATASET)
    files = {}
    for name, body in (("frozen_model.pb", models["good_frozen"]), ("frozen_model.json", models["good_frozen_json"]),
                       ("report.json", b"{}"), ("confusion_matrix.png", b"\x89PNG")):
        s3.put_object(Bucket=bucket, Key=(layout.version_prefix + name).split("/", 3)[3], Body=body)
        files[name] = {"uri": layout.version_prefix + name, "sha256": hashlib.sha256(body).hexdigest()}
    record = promotion.publish_record(
        layout, {"files": files, "formats": {}, "channel_order": "bgr"},
        {"accuracy": models["good_accuracy"], "images": 93, "parity_max_abs_diff": 0.0},
        dataset={"dataset_prefix": batch.DATASET, "dataset_id": "tiny", "manifest_uri": batch.DATASET + "manifest.json",
                 "manifest_sha256": manifest_sha256, "channel_order": "bgr"},
    )
    promotion.publish_model(s3, layout, record)


def prepare(endpoint: str, work: str) -> None:
    """Everything every batch run expects to find; ``prepared.json`` in ``work`` says what."""
    import boto3

    work_dir = Path(work)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    data = stage_datasets(s3, work_dir / "data")
    models = build_models(data["per_class"], work_dir / "models")
    (work_dir / "archives").mkdir(exist_ok=True)
    for name in ("wrong_input", "five_classes", "good", "poor"):
        (work_dir / "archives" / f"{name}.tar.gz").write_bytes(models[name])
    # What a test needs to publish the champion in a bucket of its own (DagBatch.seed_champion).
    (work_dir / "archives" / "good_frozen.pb").write_bytes(models["good_frozen"])
    (work_dir / "archives" / "good_frozen.json").write_bytes(models["good_frozen_json"])
    before = {}
    for scenario in batch.SCENARIOS:
        s3.create_bucket(Bucket=scenario.bucket)
        if scenario.champion:
            seed_champion(s3, scenario.bucket, models, data["manifest_sha256"])
        if scenario.artifact:
            place_training_result(s3, scenario.bucket, scenario.job, ARCHIVES[scenario.artifact](models))
        before[scenario.name] = {key: list(value) for key, value in published_state(s3, scenario.bucket).items()}
    (work_dir / batch.PREPARED_FILE).write_text(json.dumps({
        "good_accuracy": models["good_accuracy"], "poor_accuracy": models["poor_accuracy"],
        "good_frozen_sha256": hashlib.sha256(models["good_frozen"]).hexdigest(),
        "manifest_sha256": data["manifest_sha256"], "per_class": data["per_class"], "before": before,
    }, indent=2))
