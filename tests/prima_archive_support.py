"""Prima archives made here: the tar.gz writer, and an archive in the real database's layout.

The real layout, as the database's page and the tutorial's preprocessing script describe it:

* ``PersonPP/`` folders, two series of 93 images each; image ``II`` of a series is pose
  ``II`` of the grid below (tilt -90, then tilt -60 at every pan from -90 to +90, ...,
  then tilt +90), named ``personPPSII<tilt><pan>.jpg`` with signed angles;
* beside each image a 7-line ``.txt``: file name, empty line, ``Face``, centre x, centre y,
  width, height;
* ``Front/`` with frontal images named ``personne...``; 384 x 288 JPEG images.

The heads are drawn by the synthetic dataset's renderer, scaled into the face box of a
384 x 288 frame, so a model can learn pose from the crops. Written independently of the
converter: the box extents follow the tutorial's arithmetic, not ``FaceBox``.
"""
from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from headpose.datasets.rendering import generate_image

WIDTH, HEIGHT = 384, 288
TILTS = (-90, -60, -30, -15, 0, 15, 30, 60, 90)
PANS = (-90, -75, -60, -45, -30, -15, 0, 15, 30, 45, 60, 75, 90)
# The database's index order: tilt by tilt from -90, pan by pan from -90; tilt +-90 only
# look straight down or up (pan 0). 1 + 7 * 13 + 1 = 93 poses.
POSE_GRID: tuple[tuple[int, int], ...] = (
    ((-90, 0),) + tuple((t, p) for t in TILTS[1:-1] for p in PANS) + ((90, 0),)
)
FRONT_INDEX = POSE_GRID.index((0, 0))  # 46: the Front/ images are frontal

# A file's name and bytes; a TarInfo instead of bytes stands for a member without data
# (a link), added as it is.
Member = tuple[str, "bytes | tarfile.TarInfo"]


@dataclass(frozen=True)
class RealLayout:
    """What the generated archive holds. Defaults: 2 persons, one trains, one is held out."""

    persons: tuple[int, ...] = (1, 5)
    series: tuple[int, ...] = (1, 2)
    # Images whose face box reaches past the frame's top and left edges, in every series.
    off_edge: tuple[int, ...] = (0, FRONT_INDEX, 92)
    front: bool = True
    strays: tuple[str, ...] = ("README", ".DS_Store", "Person01/.DS_Store",
                               "Person05/._person05100-90+0.jpg", "Scripts/browse.c")
    seed: int = 0


def file_stem(person: int, series: int, index: int, prefix: str = "person") -> str:
    """``person01157+15-30`` for person 1, series 1, image 57."""
    tilt, pan = POSE_GRID[index]
    return f"{prefix}{person:02d}{series}{index:02d}{tilt:+d}{pan:+d}"


def annotation(image_name: str, box: tuple[int, int, int, int], crlf: bool = False) -> bytes:
    """The 7-line ``.txt`` of one image; ``box`` is (centre x, centre y, width, height)."""
    lines = [image_name, "", "Face", *(str(v) for v in box)]
    end = "\r\n" if crlf else "\n"
    return (end.join(lines) + end).encode()


def head_frame(rng: np.random.Generator, tilt: int, pan: int,
               box: tuple[int, int, int, int]) -> np.ndarray:
    """A 288 x 384 RGB frame: a rendered head scaled into ``box``, a plain wall around it.

    The part of the box outside the frame is cut off, as in a photo where the head
    reaches the edge.
    """
    centre_x, centre_y, width, height = box
    wall = rng.uniform(120, 200) + rng.uniform(-12, 12, 3)
    frame = np.broadcast_to(wall, (HEIGHT, WIDTH, 3)).copy()
    head = generate_image(rng, tilt, pan)
    scaled = tf.image.resize(head, (height, width), method="bilinear").numpy()
    # The tutorial's extents: half sizes rounded down.
    left, top = centre_x - width // 2, centre_y - height // 2
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, WIDTH), min(top + height, HEIGHT)
    frame[y0:y1, x0:x1] = scaled[y0 - top:y1 - top, x0 - left:x1 - left]
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(image, quality=90).numpy()


def face_box(rng: np.random.Generator, off_edge: bool) -> tuple[int, int, int, int]:
    """(centre x, centre y, width, height): inside the frame, or past its top-left corner."""
    width = int(rng.integers(96, 124))
    height = int(width * rng.uniform(1.1, 1.3))
    if off_edge:
        return width // 2 - int(rng.integers(4, 16)), height // 2 - int(rng.integers(4, 16)), width, height
    centre_x = int(rng.integers(width // 2 + 20, WIDTH - width // 2 - 20))
    centre_y = int(rng.integers(height // 2 + 10, HEIGHT - height // 2 - 10))
    return centre_x, centre_y, width, height


def series_members(layout: RealLayout, person: int, series: int) -> list[Member]:
    """The 93 images of one series with their annotations, in index order.

    Odd-numbered annotations end their lines in CRLF, the others in LF.
    """
    members = []
    for index, (tilt, pan) in enumerate(POSE_GRID):
        rng = np.random.default_rng(np.random.SeedSequence([layout.seed, person, series, index]))
        box = face_box(rng, index in layout.off_edge)
        stem = f"Person{person:02d}/{file_stem(person, series, index)}"
        members.append((stem + ".jpg", jpeg(head_frame(rng, tilt, pan, box))))
        members.append((stem + ".txt", annotation(Path(stem).name + ".jpg", box, crlf=index % 2 == 1)))
    return members


def front_members(layout: RealLayout) -> list[Member]:
    """``Front/personne...``: one frontal image (and its ``.txt``) per person and series."""
    members = []
    for person in layout.persons:
        for series in layout.series:
            rng = np.random.default_rng(np.random.SeedSequence([layout.seed, person, series, 999]))
            box = face_box(rng, off_edge=False)
            stem = "Front/" + file_stem(person, series, FRONT_INDEX, prefix="personne")
            members.append((stem + ".jpg", jpeg(head_frame(rng, 0, 0, box))))
            members.append((stem + ".txt", annotation(Path(stem).name + ".jpg", box)))
    return members


def real_layout_members(layout: RealLayout = RealLayout()) -> list[Member]:
    """Every file of the archive in a plausible tar order: Person folders, Front/ among them."""
    members: list[Member] = [(name, b"stray\n") for name in layout.strays]
    for number, person in enumerate(layout.persons):
        for series in layout.series:
            members += series_members(layout, person, series)
        if number == 0 and layout.front:
            members += front_members(layout)
    return members


def tar_bytes(members: list[Member], directories: bool = True) -> bytes:
    """An uncompressed GNU tar of ``members``, each folder's entry before its first file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        seen = set()
        for name, data in members:
            folder = name.rpartition("/")[0]
            if directories and folder and folder not in seen:
                seen.add(folder)
                info = tarfile.TarInfo(folder)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def link(name: str, target: str, hard: bool = False) -> Member:
    """A symbolic (or hard) link member ``name`` pointing at ``target``."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return name, info


def write_archive(path: Path, members: list[Member]) -> Path:
    """``members`` as a ``.tar.gz`` at ``path`` (fixed gzip time: the same bytes every run)."""
    path.write_bytes(gzip.compress(tar_bytes(members), mtime=0))
    return path
