"""Reading the Prima archive as a stream: member names, face boxes and image/annotation pairs.

The archive is hostile data until proven otherwise: every member is checked by name and
size before it is read, and one pass front to back yields each image with its face box
(``iter_image_pairs``). Only ``PersonNN/personNN...`` images and their ``.txt`` are read;
the ``Front/`` folder and anything else are skipped and counted (``SkippedMembers``).
The layout itself is described in ``headpose.datasets.prima``.
"""
from __future__ import annotations

import gzip
import hashlib
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, Iterator

from headpose.training import labels


_FILE_NAME = re.compile(
    r"person(?P<person>\d{2})(?P<series>[12])(?P<index>\d{2})"
    r"(?P<tilt>[+-]\d{1,2})(?P<pan>[+-]\d{1,2})\.(?P<kind>jpg|txt)"
)


# What a Person image's name starts and ends with. A member inside a Person folder that
# looks like this but does not parse is refused, not skipped: it is an image of the
# database that cannot be labelled, and skipping it would lose it silently. The Front/
# folder's "personne..." names do not match (a letter follows "person").
_IMAGE_LIKE = re.compile(r"person\d.*\.(jpg|txt)")


_FOLDER_NAME = re.compile(r"Person(?P<person>\d{2})")


IMAGE, FRONT, OTHER = "image", "Front/", "other"


_IMAGES_PER_SERIES = 93


_HEADER_LINES = 3


_MAX_JPEG_BYTES = 8 * 1024**2


_MAX_TXT_BYTES = 4 * 1024


DEFAULT_MAX_PENDING_BYTES = 64 * 1024**2


_HASH_BLOCK = 1 << 20


# Skipped names go into logs and the manifest: a few, cut short, are enough to see what
# the archive held besides the Person folders.
_EXAMPLES_KEPT = 3
_EXAMPLE_CHARS = 120


class PrimaFormatError(ValueError):
    """The archive is not a readable Prima database; the message names the member."""

    def __init__(self, member: str | None, reason: str):
        where = f"archive member {member!r}: " if member else ""
        super().__init__(where + reason)
        self.member = member
        self.reason = reason


@dataclass(frozen=True, order=True)
class ImageKey:
    """Which image of the database a member belongs to, from its file name."""

    person: int
    series: int
    index: int
    tilt: int  # degrees
    pan: int  # degrees


@dataclass(frozen=True)
class FaceBox:
    """The annotated face: centre and size in pixels, as in the ``.txt`` file."""

    centre_x: int
    centre_y: int
    width: int
    height: int

    # Extents as the tutorial computes them (half sizes rounded down, both ends inclusive).
    @property
    def left(self) -> int:
        return self.centre_x - self.width // 2

    @property
    def right(self) -> int:
        return self.centre_x + self.width // 2

    @property
    def top(self) -> int:
        return self.centre_y - self.height // 2

    @property
    def bottom(self) -> int:
        return self.centre_y + self.height // 2

    def reaches_past(self, image_width: int, image_height: int) -> bool:
        """Whether the box extends beyond an image of this size (crops clip it to the image)."""
        return (self.left < 0 or self.top < 0
                or self.right >= image_width or self.bottom >= image_height)


@dataclass
class SkippedMembers:
    """Members that are not Person images: how many of each kind, and a few of their names."""

    counts: dict[str, int] = field(default_factory=lambda: {FRONT: 0, OTHER: 0})
    examples: dict[str, list[str]] = field(default_factory=lambda: {FRONT: [], OTHER: []})

    def add(self, kind: str, name: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < _EXAMPLES_KEPT:
            self.examples[kind].append(name[:_EXAMPLE_CHARS])

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def member_kind(name: str) -> str:
    """``IMAGE`` for a member to read (``PersonNN/personNN...jpg|txt``), else ``FRONT`` or ``OTHER``."""
    path = PurePosixPath(name)
    if "Front" in path.parent.parts:
        return FRONT
    if _FOLDER_NAME.fullmatch(path.parent.name) and _IMAGE_LIKE.fullmatch(path.name):
        return IMAGE
    return OTHER


def parse_member_name(name: str) -> tuple[ImageKey, str]:
    """``Person01/person01100-90+0.jpg`` -> (ImageKey, ``"jpg"``); PrimaFormatError if not."""
    path = PurePosixPath(name)
    match = _FILE_NAME.fullmatch(path.name)
    if not match:
        raise PrimaFormatError(
            name, "not a Prima file name personPPSII<tilt><pan>.jpg/.txt "
            "(e.g. Person01/person01100-90+0.jpg)"
        )
    key = ImageKey(*(int(match.group(g)) for g in ("person", "series", "index", "tilt", "pan")))
    folder = _FOLDER_NAME.fullmatch(path.parent.name)
    if not folder or int(folder.group("person")) != key.person:
        raise PrimaFormatError(name, f"expected inside folder Person{key.person:02d}/")
    if key.index >= _IMAGES_PER_SERIES:
        raise PrimaFormatError(name, f"image index {key.index} is not in 00..92")
    if key.tilt not in labels.TILT_ANGLES or key.pan not in labels.PAN_ANGLES:
        raise PrimaFormatError(name, f"tilt {key.tilt} / pan {key.pan} is not a Prima pose")
    return key, match.group("kind")


def parse_face_box(text: bytes, member: str) -> FaceBox:
    """The face box from a ``.txt`` annotation (3 header lines, then x, y, width, height).

    Lines may end in LF or CRLF; only lines 4-7 are read, as the tutorial does.
    """
    lines = text.decode("latin-1").splitlines()
    values = lines[_HEADER_LINES:_HEADER_LINES + 4]
    try:
        if len(values) != 4:
            raise ValueError(f"{len(lines)} lines")
        box = FaceBox(*(int(v.strip()) for v in values))
    except ValueError as error:
        raise PrimaFormatError(
            member, f"expected 3 header lines then face centre x, y, width, height ({error})"
        ) from None
    if box.width <= 0 or box.height <= 0:
        raise PrimaFormatError(member, f"face box has no area: {box}")
    return box


class HashingReader:
    """A read-only file wrapper that hashes every byte read, so one pass gives the sha256."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(_HASH_BLOCK):
            pass


@dataclass
class _Pending:
    jpeg: bytes | None = None
    jpeg_member: str | None = None
    box: FaceBox | None = None
    txt_member: str | None = None


@dataclass
class _Pairing:
    """Images and annotations read so far that still wait for their partner."""

    max_pending_bytes: int
    pending: dict[tuple[int, int, int], _Pending] = field(default_factory=dict)
    pending_bytes: int = 0
    done: set[tuple[int, int, int]] = field(default_factory=set)

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo):
        """Read one Person member; ``(key, jpeg, box, jpg member)`` once its pair is complete."""
        key, kind = parse_member_name(member.name)
        if not member.isfile():
            raise PrimaFormatError(member.name, "not a regular file (link or device)")
        ident = (key.person, key.series, key.index)
        if ident in self.done:
            raise PrimaFormatError(member.name, "a second file for an image already read")
        entry = self.pending.setdefault(ident, _Pending())
        if kind == "jpg":
            if entry.jpeg is not None:
                raise PrimaFormatError(member.name, f"duplicate of {entry.jpeg_member!r}")
            entry.jpeg, entry.jpeg_member = _read_member(tar, member, _MAX_JPEG_BYTES), member.name
            self.pending_bytes += len(entry.jpeg)
        else:
            if entry.box is not None:
                raise PrimaFormatError(member.name, f"duplicate of {entry.txt_member!r}")
            entry.box = parse_face_box(_read_member(tar, member, _MAX_TXT_BYTES), member.name)
            entry.txt_member = member.name
        _check_partner(entry, key, member.name)
        if entry.jpeg is not None and entry.box is not None:
            del self.pending[ident]
            self.done.add(ident)
            self.pending_bytes -= len(entry.jpeg)
            return key, entry.jpeg, entry.box, entry.jpeg_member
        if self.pending_bytes > self.max_pending_bytes:
            raise PrimaFormatError(
                member.name, f"more than {self.max_pending_bytes} bytes of images wait for "
                "their .txt partner: the archive's .jpg/.txt pairs are too far apart"
            )
        return None

    def check_complete(self) -> None:
        if self.pending:
            entry = next(iter(self.pending.values()))
            member = entry.jpeg_member or entry.txt_member
            partner = ".txt annotation" if entry.jpeg is not None else ".jpg image"
            raise PrimaFormatError(member, f"has no {partner} beside it ({len(self.pending)} "
                                   "unmatched images in all)")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise PrimaFormatError(member.name, f"{member.size} bytes, more than the {limit} allowed")
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise PrimaFormatError(member.name, f"truncated: {len(data)} of {member.size} bytes")
    return data


def iter_image_pairs(
    fileobj: IO[bytes],
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    skipped: SkippedMembers | None = None,
) -> Iterator[tuple[ImageKey, bytes, FaceBox, str]]:
    """Stream ``(key, jpeg bytes, face box, jpg member name)`` from a ``.tar.gz`` file object.

    The archive is read once, front to back. Members that are not Person images are
    counted in ``skipped`` and never read. A ``.jpg`` and its ``.txt`` may come in any
    order and far apart; members waiting for their partner are held (still encoded) up to
    ``max_pending_bytes``. Raises ``PrimaFormatError`` naming the member for Person
    members with unexpected names, duplicates, orphans, and truncated or corrupt archives.
    """
    skipped = SkippedMembers() if skipped is None else skipped
    # gzip.GzipFile rather than tarfile's own "r|gz": it checks the gzip trailer (CRC and
    # length), which is what catches an archive cut short by a partial download.
    compressed = gzip.GzipFile(fileobj=fileobj, mode="rb")
    pairing = _Pairing(max_pending_bytes)
    last, current = None, None
    try:
        with tarfile.open(fileobj=compressed, mode="r|") as tar:
            while (member := tar.next()) is not None:
                # Stream mode never seeks back, so the member list it keeps is dead weight.
                tar.members = []
                current = member.name
                kind = None if member.isdir() else member_kind(member.name)
                if kind == IMAGE:
                    pair = pairing.add(tar, member)
                    if pair is not None:
                        last, current = current, None
                        yield pair
                elif kind is not None:
                    skipped.add(kind, member.name)
                last, current = current or last, None
            _check_end_marker(tar, last)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as error:
        where = current or last
        raise PrimaFormatError(
            where, f"the archive is truncated or corrupt {'in' if current else 'after'} this "
            f"member: {type(error).__name__}: {error}"
        ) from error
    pairing.check_complete()


def _check_end_marker(tar: tarfile.TarFile, last: str | None) -> None:
    # Python's tarfile ends quietly when the data stops at a member boundary; a complete
    # tar has a second zero block after the one that ended the loop.
    tail = 0
    while chunk := tar.fileobj.read(_HASH_BLOCK):
        tail += len(chunk)
    if tail < tarfile.BLOCKSIZE:
        raise PrimaFormatError(last, "the archive ends without the end-of-archive "
                               "marker after this member: it is truncated")


def _check_partner(entry: _Pending, key: ImageKey, member: str) -> None:
    # A .jpg and .txt of the same image must agree on the pose in their names.
    if entry.jpeg_member and entry.txt_member:
        other = entry.txt_member if member == entry.jpeg_member else entry.jpeg_member
        if parse_member_name(other)[0] != key:
            raise PrimaFormatError(member, f"pose in the name differs from {other!r}")
