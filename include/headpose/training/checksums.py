"""File checksums, standard library only.

Here, in the training source folder, because the shard writer (which runs inside the
training image) needs it too; everything else imports it from here without pulling in
TensorFlow.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (memory stays flat for large archives)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
