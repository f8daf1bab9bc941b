"""``sourcedir.tar.gz``: the code a training job runs, built from ``include/headpose``.

Layout (what SageMaker's TensorFlow toolkit extracts into ``/opt/ml/code``)::

    train.py                      the entry script (``sagemaker_program``)
    headpose/__init__.py
    headpose/training/*.py        model, shards, labels, export, entry point

so ``python train.py`` imports ``headpose.training`` from the code folder and nothing
else. The archive is packed by ``archive.pack_model_dir`` (sorted names, zeroed times
and owners), so the same code always gives the same bytes and sha256.

The sha256 that ``package_code`` records is the one the training code must have when it
runs: whoever can write under the bucket's folder could otherwise replace the code
between packaging and training (``verify_sourcedir``, ``verify_sourcedir_object``).
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from headpose.artifacts.archive import pack_model_dir
from headpose.planning.layout import file_sha256, split_s3_uri

# The headpose package root: this module sits in headpose/backends/.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
ENTRY_SCRIPT = "train.py"


def sourcedir_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """``{name in the archive: file}`` for every file the training job needs."""
    training = package_dir / "training"
    files = {ENTRY_SCRIPT: training / ENTRY_SCRIPT, "headpose/__init__.py": package_dir / "__init__.py"}
    for module in sorted(training.glob("*.py")):
        files[f"headpose/training/{module.name}"] = module
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"source dir files missing: {missing}")
    return files


def build_sourcedir(tar_path: str | Path, package_dir: Path = PACKAGE_DIR) -> tuple[Path, str]:
    """Write ``sourcedir.tar.gz`` to ``tar_path``; return its path and sha256."""
    with tempfile.TemporaryDirectory(prefix="sourcedir-") as staging:
        root = Path(staging)
        for name, source in sourcedir_files(package_dir).items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)  # contents only: modes and times are normalised anyway
        path = pack_model_dir(root, tar_path)
    return path, file_sha256(path)


def package_code(s3_client: Any, sourcedir_uri: str, scratch: str | Path) -> dict[str, Any]:
    """``package_code``'s work: build ``sourcedir.tar.gz`` and upload it where the request names it.

    Returns its sha256 (checked before the job is created) and each packed file's
    (``files``: checked by the entry point inside the job, before its first step).
    """
    path, sha256 = build_sourcedir(Path(scratch) / "sourcedir.tar.gz")
    bucket, key = split_s3_uri(sourcedir_uri)
    s3_client.upload_file(str(path), bucket, key)
    path.unlink()
    files = {name: file_sha256(source) for name, source in sourcedir_files().items()}
    return {"sourcedir_uri": sourcedir_uri, "sha256": sha256, "files": files}


class SourcedirMismatch(ValueError):
    """The training code is not the code ``package_code`` recorded; it must not run."""

    def __init__(self, uri: str, expected: str, actual: str):
        super().__init__(
            f"refusing to train with {uri}: its sha256 is {actual}, but package_code recorded "
            f"{expected}. The object was replaced after packaging; package the code again "
            "(clear package_code) or find out who wrote it."
        )
        self.uri, self.expected, self.actual = uri, expected, actual


def verify_sourcedir(path: str | Path, uri: str, expected_sha256: str) -> Path:
    """``path`` (the downloaded copy of ``uri``) if its sha256 is the recorded one."""
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise SourcedirMismatch(uri, expected_sha256, actual)
    return Path(path)


def verify_sourcedir_object(s3_client: Any, uri: str, expected_sha256: str) -> None:
    """Stream the object at ``uri`` through sha256; ``SourcedirMismatch`` unless it is the recorded one.

    For SageMaker, which downloads the code itself: nothing is kept here. A write after
    this check, before SageMaker's download, is not caught (S3 cannot pin a version in
    ``sagemaker_submit_directory``).
    """
    bucket, key = split_s3_uri(uri)
    digest = hashlib.sha256()
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in body.iter_chunks(chunk_size=1 << 20):
        digest.update(chunk)
    if digest.hexdigest() != expected_sha256:
        raise SourcedirMismatch(uri, expected_sha256, digest.hexdigest())
