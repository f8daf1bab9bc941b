"""Inside the job, before the first step: the code and the data are the ones recorded.

The worker checks ``sourcedir.tar.gz`` before it creates the job, but SageMaker downloads
the code and the channel itself, maybe days later (a spot wait): whoever can write under
the bucket's folder could replace a file in between. So the entry point is given the
sha256 of each of its source files (``--source_sha256s``, what ``package_code`` packed)
and of the dataset manifest (``--manifest_sha256``, what ``stage_dataset`` recorded; the
manifest lists every shard's sha256), and refuses to train on anything else.

Standard library only: it runs before TensorFlow is imported.
"""
from __future__ import annotations

import json
from pathlib import Path

from headpose.training.checksums import file_sha256

MANIFEST_FILE = "manifest.json"
SHARD_SUFFIX = ".tfrecord"
# The folder the code was extracted into (SageMaker's /opt/ml/code): this file is
# headpose/training/integrity.py in it.
CODE_ROOT = Path(__file__).resolve().parents[2]


class IntegrityError(Exception):
    """What the job was given is not what was recorded; the message names the file and both sha256s."""


def verify_sources(source_sha256s: str | dict | None, code_root: Path = CODE_ROOT) -> int:
    """Every recorded source file present with its sha256; how many were checked."""
    if not source_sha256s:
        return 0
    expected = json.loads(source_sha256s) if isinstance(source_sha256s, str) else dict(source_sha256s)
    for name, sha256 in sorted(expected.items()):
        path = code_root / name
        if not path.is_file():
            raise IntegrityError(f"source file {name} is missing from the code the job was given")
        actual = file_sha256(path)
        if actual != sha256:
            raise IntegrityError(
                f"source file {name} has sha256 {actual}, but package_code packed {sha256}: the code was "
                "replaced after it was checked; refusing to run it"
            )
    return len(expected)


def verify_dataset(manifest_sha256: str | None, *channels: str | None) -> int:
    """The manifest in the first channel with its sha256, every shard it lists with theirs, no other shard.

    ``channels``: the training channel, then an eval channel if the job has one (the
    manifest lists both splits; a shard is looked for in each). Returns the shards checked.
    """
    if not manifest_sha256:
        return 0
    folders = [Path(channel) for channel in channels if channel]
    if not folders:
        raise IntegrityError("no training channel to verify")
    manifest_path = folders[0] / MANIFEST_FILE
    if not manifest_path.is_file():
        raise IntegrityError(f"the training channel has no {MANIFEST_FILE} to verify its shards against")
    actual = file_sha256(manifest_path)
    if actual != manifest_sha256:
        raise IntegrityError(
            f"{MANIFEST_FILE} has sha256 {actual}, but stage_dataset recorded {manifest_sha256}: "
            "the dataset was changed after it was validated"
        )
    listed = {
        shard["file"]: shard["sha256"]
        for split in json.loads(manifest_path.read_text()).get("splits", {}).values()
        for shard in split.get("shards", [])
    }
    present = {path.name: path for folder in folders for path in folder.glob(f"*{SHARD_SUFFIX}")}
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise IntegrityError(f"shards {unlisted} are in the channel but not in the manifest; refusing to train on them")
    for name, sha256 in sorted(listed.items()):
        if name not in present:
            raise IntegrityError(f"shard {name}, listed in the manifest, is missing from the channel")
        actual = file_sha256(present[name])
        if actual != sha256:
            raise IntegrityError(f"shard {name} has sha256 {actual}, but the manifest records {sha256}")
    return len(listed)
