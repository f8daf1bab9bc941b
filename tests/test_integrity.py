"""Checks where the code runs: the entry point verifies its code and every shard before its first step.

The jobs here run the real entry point under the real SageMaker training toolkit (the
local backend), from a real ``sourcedir.tar.gz``; each is refused before TensorFlow is
imported, so a run takes seconds. The reason is the one SageMaker would show: the
program's ``output/failure`` file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from headpose.backends.local import LocalTrainingError, run_local_training_job
from headpose.backends.sourcedir import PACKAGE_DIR, build_sourcedir, package_code, sourcedir_files
from headpose.planning.governed import with_checksums
from headpose.planning.layout import RunLayout, split_s3_uri
from headpose.planning.request import training_job_request
from headpose.planning.rules import validate_run_params
from headpose.training import integrity

BUCKET = "headpose-integrity"
JOB = "deeplens-TF-headpose-2024-05-06-07-08-09-010"
SHARDS = {"train-00000.tfrecord": b"train records", "eval-00000.tfrecord": b"eval records"}


def _manifest() -> bytes:
    splits = {split: {"shards": [{"file": name, "sha256": hashlib.sha256(data).hexdigest()}
                                 for name, data in SHARDS.items() if name.startswith(split)]}
              for split in ("train", "eval")}
    return json.dumps({"splits": splits}).encode()


@pytest.fixture()
def staged(s3_client, tmp_path):
    """A dataset (shards and manifest) and the project's real code in S3, as the tasks before train leave them."""
    s3_client.create_bucket(Bucket=BUCKET)
    layout = RunLayout.for_run(BUCKET, "headpose", JOB, f"s3://{BUCKET}/headpose/datasets/tiny/")
    _, prefix = split_s3_uri(layout.dataset_prefix)
    for name, data in {**SHARDS, "manifest.json": _manifest()}.items():
        s3_client.put_object(Bucket=BUCKET, Key=prefix + name, Body=data)
    code = package_code(s3_client, layout.sourcedir_uri, tmp_path)
    request = training_job_request(layout, validate_run_params({"s3_bucket": BUCKET}), "image", region="us-east-1")
    request = with_checksums(request, hashlib.sha256(_manifest()).hexdigest(), code["files"])
    return {"layout": layout, "prefix": prefix, "request": request, "code": code, "root": tmp_path / "opt-ml"}


def _refusal(staged, s3_client, sourcedir_sha256: str) -> str:
    lines: list[str] = []
    with pytest.raises(LocalTrainingError) as failed:
        run_local_training_job(staged["request"], s3_client, staged["root"], lines.append,
                               sourcedir_sha256=sourcedir_sha256)
    assert not any("precision:" in line for line in lines)  # refused before the model was built
    return str(failed.value)


def test_a_tampered_shard_is_refused_inside_the_job(staged, s3_client):
    # Replaced after stage_dataset validated it: the worker's checks are long past.
    s3_client.put_object(Bucket=BUCKET, Key=staged["prefix"] + "train-00000.tfrecord", Body=b"other records")
    message = _refusal(staged, s3_client, staged["code"]["sha256"])
    assert "IntegrityError: shard train-00000.tfrecord has sha256" in message
    assert hashlib.sha256(b"other records").hexdigest() in message and "the manifest records" in message


def test_a_tampered_source_file_is_refused_by_the_entry_point(staged, tmp_path):
    # The code object is replaced after the worker checked it, before SageMaker downloaded it
    # (S3 cannot pin a version in sagemaker_submit_directory): the job gets other code. Run as
    # the toolkit runs it (python train.py --<hyperparameters> in the code folder), without
    # the toolkit's own start (it imports TensorFlow: the shard test above pays that once).
    package = tmp_path / "package"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    model = package / "training" / "model.py"
    model.write_text(model.read_text() + "\nBACKDOOR = True\n")
    tampered, _ = build_sourcedir(tmp_path / "tampered.tar.gz", package)
    with tarfile.open(tampered) as tar:
        tar.extractall(tmp_path / "code", filter="data")
    output = tmp_path / "output"
    hyperparameter = json.loads(staged["request"]["HyperParameters"]["source_sha256s"])  # as the toolkit decodes it
    done = subprocess.run([sys.executable, "train.py", "--source_sha256s", hyperparameter],
                          cwd=tmp_path / "code", env={**os.environ, "SM_OUTPUT_DIR": str(output), "PYTHONPATH": ""},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    failure = (output / "failure").read_text()  # what SageMaker shows as the job's FailureReason
    assert failure.startswith("IntegrityError: source file headpose/training/model.py has sha256")
    assert staged["code"]["files"]["headpose/training/model.py"] in failure
    assert "tensorflow" not in done.stdout + done.stderr  # refused before the model was built


def test_the_packed_code_verifies_against_what_package_code_recorded(tmp_path):
    archive, _ = build_sourcedir(tmp_path / "sourcedir.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "code", filter="data")
    recorded = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in sourcedir_files().items()}
    assert integrity.verify_sources(json.dumps(recorded), tmp_path / "code") == len(recorded) > 5
    # What SageMaker takes as one hyperparameter value: at most 2500 characters.
    request = with_checksums({"HyperParameters": {}}, "0" * 64, recorded)
    assert all(len(value) <= 2500 for value in request["HyperParameters"].values())


def test_a_tampered_manifest_or_an_unlisted_shard_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b'{"splits": {}}')
    with pytest.raises(integrity.IntegrityError, match="manifest.json has sha256 .* but stage_dataset recorded"):
        integrity.verify_dataset(hashlib.sha256(_manifest()).hexdigest(), str(tmp_path))
    (tmp_path / "manifest.json").write_bytes(_manifest())  # as staged
    for name, data in {**SHARDS, "train-00001.tfrecord": b"smuggled"}.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(integrity.IntegrityError, match=r"\['train-00001.tfrecord'\] are in the channel but not"):
        integrity.verify_dataset(hashlib.sha256(_manifest()).hexdigest(), str(tmp_path))
    (tmp_path / "train-00001.tfrecord").unlink()
    assert integrity.verify_dataset(hashlib.sha256(_manifest()).hexdigest(), str(tmp_path)) == 2
