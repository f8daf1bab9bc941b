"""Model archives (``model.tar.gz``): safe extraction, locating the SavedModel, packing.

A ``model.tar.gz`` comes from S3 and is treated as hostile data. Extraction uses the
standard library's ``tarfile`` ``"data"`` filter (no absolute paths, no ``..``, no links
leaving the folder, no device files) and, because that filter says nothing about size,
caps the declared member sizes *before* anything is written. Extraction happens in a
scratch folder beside the destination that is renamed into place only when every member
was written, so a refused archive leaves no partial output.
"""
from __future__ import annotations

import gzip
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from pathlib import Path

DEFAULT_MAX_TOTAL_BYTES = 8 * 1024**3
DEFAULT_MAX_MEMBER_BYTES = 4 * 1024**3
DEFAULT_MAX_MEMBERS = 100_000
SAVED_MODEL_FILE = "saved_model.pb"


class ArchiveError(ValueError):
    """An archive that cannot be used: unreadable, or not laid out as expected."""


class UnsafeArchiveError(ArchiveError):
    """An archive member that would escape the folder, is a special file, or is too big."""

    def __init__(self, member: str, reason: str):
        super().__init__(f"refusing archive member {member!r}: {reason}")
        self.member = member
        self.reason = reason


def safe_extract(
    tar_path: str | Path,
    dest_dir: str | Path,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Path:
    """Extract ``tar_path`` into ``dest_dir`` (absent or empty) and return ``dest_dir``.

    Raises ``UnsafeArchiveError`` naming the first offending member, or ``ArchiveError``
    for an unreadable archive; in both cases ``dest_dir`` is left as it was.
    """
    if not Path(tar_path).is_file():
        raise FileNotFoundError(f"archive {tar_path} does not exist")
    dest = Path(dest_dir).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError(f"destination {dest} exists and is not an empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        try:
            with tarfile.open(tar_path, mode="r:*") as tar:
                members = _checked_members(tar, scratch, max_total_bytes, max_member_bytes, max_members)
                tar.extractall(scratch, members=members, filter="data")
        except tarfile.FilterError as error:  # a check above missed something: still refuse
            raise UnsafeArchiveError(getattr(error.tarinfo, "name", "?"), str(error)) from error
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise ArchiveError(f"{tar_path} is not a readable tar archive: {error}") from error
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.replace(scratch, dest)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return dest


def _checked_members(
    tar: tarfile.TarFile,
    scratch: Path,
    max_total_bytes: int,
    max_member_bytes: int,
    max_members: int,
) -> list[tarfile.TarInfo]:
    """Every member, each checked as soon as its header is read.

    Iterating (rather than ``getmembers()``) matters: ``tarfile`` skips a member's data
    only when asked for the next header, so a member declaring terabytes is refused
    before its data is ever read, let alone written.
    """
    members: list[tarfile.TarInfo] = []
    total = 0
    for member in tar:
        if len(members) >= max_members:
            raise UnsafeArchiveError(member.name, f"more than {max_members} members")
        if member.size > max_member_bytes:
            raise UnsafeArchiveError(
                member.name, f"declares {member.size} bytes, over the {max_member_bytes}-byte cap"
            )
        total += member.size
        if total > max_total_bytes:
            raise UnsafeArchiveError(
                member.name, f"brings the total to {total} bytes, over the {max_total_bytes}-byte cap"
            )
        # The "data" filter strips a leading "/" and extracts inside; a model archive never
        # has absolute names, so one is taken as hostile and refused outright.
        if member.name.startswith("/") or os.path.isabs(member.name):
            raise UnsafeArchiveError(member.name, "absolute path")
        try:
            tarfile.data_filter(member, str(scratch))
        except tarfile.FilterError as error:
            raise UnsafeArchiveError(member.name, str(error)) from error
        members.append(member)
    return members


def find_saved_model(extracted_dir: str | Path) -> Path:
    """The one ``export/*/*`` folder holding a ``saved_model.pb`` (the SageMaker TF layout)."""
    root = Path(extracted_dir)
    found = sorted(p.parent for p in root.glob(f"export/*/*/{SAVED_MODEL_FILE}") if p.is_file())
    if len(found) == 1:
        return found[0]
    if found:
        listed = ", ".join(str(p.relative_to(root)) for p in found)
        raise ArchiveError(f"expected one SavedModel under export/*/*, found {len(found)}: {listed}")
    elsewhere = sorted(str(p.relative_to(root)) for p in root.rglob(SAVED_MODEL_FILE))
    top = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise ArchiveError(
        f"no export/*/*/{SAVED_MODEL_FILE} in {root}; "
        f"{SAVED_MODEL_FILE} found at: {elsewhere or 'nowhere'}; top-level entries: {top}"
    )


def pack_model_dir(model_dir: str | Path, tar_path: str | Path) -> Path:
    """Pack ``model_dir``'s contents into a gzip tar whose bytes depend only on the contents.

    Names are sorted and relative (``export/Servo/...``, as SageMaker packs), ownership
    is dropped, times are zeroed (tar and gzip headers) and modes normalised, so the
    same model gives the same archive and the same checksum.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ArchiveError(f"model folder {root} does not exist")
    target = Path(tar_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for path in _sorted_tree(root):
                        _add(tar, path, path.relative_to(root).as_posix())
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _sorted_tree(root: Path) -> list[Path]:
    """Every entry below ``root``, each folder before its contents, siblings by name."""
    paths = [Path(current) / name for current, dirs, files in os.walk(root) for name in dirs + files]
    return sorted(paths, key=lambda p: p.relative_to(root).parts)


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    info = path.lstat()
    member = tarfile.TarInfo(arcname)
    member.mtime = 0
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    if stat.S_ISDIR(info.st_mode):
        member.type = tarfile.DIRTYPE
        member.mode = 0o755
        tar.addfile(member)
    elif stat.S_ISREG(info.st_mode):
        member.size = info.st_size
        member.mode = 0o755 if info.st_mode & stat.S_IXUSR else 0o644
        with open(path, "rb") as data:
            tar.addfile(member, data)
    else:
        # Links and special files have no place in a model folder, and would be refused
        # (or silently dereferenced) on the other side.
        raise ArchiveError(f"cannot pack {path}: not a regular file or folder")
