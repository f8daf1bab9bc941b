"""The Prima Head Pose Image Database, converted to the project's TFRecord shards.

Source: ``HeadPoseImageDatabase.tar.gz`` (Gourier, Hall, Crowley, "Estimating Face
Orientation from Robust Detection of Salient Facial Features", Pointing 2004),
http://www-prima.inrialpes.fr/perso/Gourier/Faces/HPDatabase.html.

Layout, as read by the tutorial's ``preprocessingDataset_py2.py`` and by deepgaze's
Prima parser (the two agree):

* folders ``Person01`` .. ``Person15``; each holds two series of 93 images;
* image ``PersonPP/personPPSII<tilt><pan>.jpg`` - ``PP`` person, ``S`` series (1 or 2),
  ``II`` image index (00..92), then tilt and pan in degrees, each with its sign, e.g.
  ``person01100-90+0.jpg``, ``person0114+15-30.jpg``. Tilt is on
  ``labels.TILT_ANGLES`` and pan on ``labels.PAN_ANGLES``;
* beside each image ``personPPSII<tilt><pan>.txt``: three header lines (the file name,
  a blank line, ``Face``), then one integer per line - face centre x, centre y, width,
  height in pixels. Only lines 4-7 are read, as the tutorial does;
* images are 384 x 288 JPEGs.

Preprocessing is the tutorial's: each image gives ``num_data_aug`` random crops (training
persons) or ``num_eval_aug`` (held-out persons 05, 10, 15), every crop containing the face
box, resized bilinearly to ``size`` (84x84, or 96x54 for 16:9); tilt and pan are stored
normalised by 90. Two deliberate differences:

* Colour is RGB (the serving contract); the tutorial read BGR with OpenCV.
* Crops of one image are written together, in archive order, because the archive is
  streamed; the tutorial wrote augmentation round by round from memory. Training reads
  shuffle shards and records, so only the order on disk differs.

Other sizes are written as asked (each record carries its height and width), but
``shards.dataset`` and the serving contract take 84 x 84: 96x54 shards need a reader that
is given both sides.

Each image's crops come from its own random stream, seeded by ``(seed, person, series,
index)``, so the shards depend on the seed and the archive only, not on how a run went.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator

from headpose.training import labels
from headpose.training.checksums import file_sha256

log = logging.getLogger(__name__)

SOURCE = "prima"
# Bump when a change to this module changes the shards it writes: cached datasets whose
# manifest names an older version are then rebuilt instead of reused.
CONVERTER_VERSION = 1
EVAL_PERSONS: tuple[int, ...] = (5, 10, 15)
MANIFEST_NAME = "manifest.json"

_FILE_NAME = re.compile(
    r"person(?P<person>\d{2})(?P<series>[12])(?P<index>\d{2})"
    r"(?P<tilt>[+-]\d{1,2})(?P<pan>[+-]\d{1,2})\.(?P<kind>jpg|txt)"
)
_FOLDER_NAME = re.compile(r"Person(?P<person>\d{2})")
_IMAGES_PER_SERIES = 93
_HEADER_LINES = 3
# The tutorial rounds crop heights down to a multiple of 9 (its 16:9 option needs that).
_CROP_STEP = 9
# The tutorial samples crops until one fits; a cap turns a box that admits no crop into an
# error rather than an endless loop.
_MAX_CROP_ATTEMPTS = 100_000
_MAX_JPEG_BYTES = 8 * 1024**2
_MAX_TXT_BYTES = 4 * 1024
DEFAULT_MAX_PENDING_BYTES = 64 * 1024**2
_HASH_BLOCK = 1 << 20


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


@dataclass(frozen=True)
class PrimaSettings:
    """Everything that decides the shards besides the archive. JSON-friendly."""

    num_data_aug: int = 15
    num_eval_aug: int = 3
    size: str = "84x84"  # WIDTHxHEIGHT of the written images
    seed: int = 0
    images_per_shard: int = 1000
    eval_persons: tuple[int, ...] = field(default=EVAL_PERSONS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_persons", tuple(int(p) for p in self.eval_persons))
        parse_size(self.size)
        for name in ("num_data_aug", "num_eval_aug", "images_per_shard"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def width(self) -> int:
        return parse_size(self.size)[0]

    @property
    def height(self) -> int:
        return parse_size(self.size)[1]

    def as_dict(self) -> dict[str, Any]:
        """The form stored in the manifest (and compared to decide whether to re-stage)."""
        values = asdict(self)
        values["eval_persons"] = list(self.eval_persons)
        values["converter_version"] = CONVERTER_VERSION
        return values

    @classmethod
    def coerce(cls, settings: "PrimaSettings | dict[str, Any] | None") -> "PrimaSettings":
        if settings is None:
            return cls()
        if isinstance(settings, cls):
            return settings
        values = {k: v for k, v in dict(settings).items() if k != "converter_version"}
        return cls(**values)


def parse_size(size: str) -> tuple[int, int]:
    """``"84x84"`` -> ``(84, 84)``; width first, as in ``96x54``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(size))
    if not match:
        raise ValueError(f"size must be WIDTHxHEIGHT such as 84x84 or 96x54, got {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if not (8 <= width <= 1024 and 8 <= height <= 1024):
        raise ValueError(f"size {size!r} out of range: each side must be 8..1024 pixels")
    return width, height


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
    """The face box from a ``.txt`` annotation (3 header lines, then x, y, width, height)."""
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


def crop_windows(rng, image_height: int, image_width: int, box: FaceBox, count: int,
                 out_width: int, out_height: int, member: str = "") -> list[tuple[int, int, int, int]]:
    """``count`` crops ``(x, y, width, height)`` that each contain ``box``: the tutorial's sampler.

    The top-left corner is uniform between the image origin and the face's top-left
    corner; the height uniform between just covering the face and reaching the image
    bottom, rounded down to a multiple of 9; the width follows the output aspect ratio;
    draws that do not contain the face or leave the image are rejected. Boxes reaching
    past the image are first clipped to it (the tutorial would loop for ever on them).
    """
    left, top = max(box.left, 0), max(box.top, 0)
    # The tutorial's acceptance test is strict (crop end < image size), hence the -2.
    right, bottom = min(box.right, image_width - 2), min(box.bottom, image_height - 2)
    if left > right or top > bottom:
        raise PrimaFormatError(member, f"face box {box} lies outside the {image_width}x"
                               f"{image_height} image")
    windows = []
    for _ in range(count):
        for _attempt in range(_MAX_CROP_ATTEMPTS):
            x = int(rng.random() * left)
            y = int(rng.random() * top)
            min_height, max_height = bottom - y, image_height - y
            height = (min_height + int(rng.random() * (max_height - min_height))) // _CROP_STEP * _CROP_STEP
            width = height * out_width // out_height
            if right < x + width < image_width and bottom < y + height < image_height:
                windows.append((x, y, width, height))
                break
        else:
            raise PrimaFormatError(member, f"no {out_width}:{out_height} crop of the "
                                   f"{image_width}x{image_height} image contains face box {box}")
    return windows


def image_rng(seed: int, key: ImageKey):
    """The random stream of one image: independent of archive order and of other images."""
    import numpy as np

    return np.random.default_rng(np.random.SeedSequence([seed, key.person, key.series, key.index]))


def augment(image, key: ImageKey, box: FaceBox, count: int, settings: PrimaSettings,
            member: str = "") -> Iterator:
    """The ``count`` uint8 RGB crops of one decoded image (H x W x 3 uint8)."""
    import numpy as np
    import tensorflow as tf

    height, width = image.shape[:2]
    windows = crop_windows(image_rng(settings.seed, key), height, width, box, count,
                           settings.width, settings.height, member)
    for x, y, crop_width, crop_height in windows:
        # Bilinear with half-pixel centres and no antialiasing: what cv2.resize's
        # INTER_LINEAR, used by the tutorial, computes, and what tf.image.resize(...,
        # "bilinear") runs - called as the raw op because that wrapper's Python overhead
        # doubles the time per crop.
        resized = tf.raw_ops.ResizeBilinear(
            images=image[None, y:y + crop_height, x:x + crop_width],
            size=[settings.height, settings.width], half_pixel_centers=True,
        ).numpy()[0]
        yield np.clip(np.rint(resized), 0, 255).astype(np.uint8)


class _HashingReader:
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


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise PrimaFormatError(member.name, f"{member.size} bytes, more than the {limit} allowed")
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise PrimaFormatError(member.name, f"truncated: {len(data)} of {member.size} bytes")
    return data


def iter_image_pairs(
    fileobj: IO[bytes], max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
) -> Iterator[tuple[ImageKey, bytes, FaceBox, str]]:
    """Stream ``(key, jpeg bytes, face box, jpg member name)`` from a ``.tar.gz`` file object.

    The archive is read once, front to back. A ``.jpg`` and its ``.txt`` may come in any
    order and far apart; members waiting for their partner are held (still encoded) up to
    ``max_pending_bytes``. Raises ``PrimaFormatError`` naming the member for unexpected
    names, duplicates, orphans, and truncated or corrupt archives.
    """
    # gzip.GzipFile rather than tarfile's own "r|gz": it checks the gzip trailer (CRC and
    # length), which is what catches an archive cut short by a partial download.
    compressed = gzip.GzipFile(fileobj=fileobj, mode="rb")
    pending: dict[tuple[int, int, int], _Pending] = {}
    pending_bytes = 0
    done: set[tuple[int, int, int]] = set()
    last, current = None, None
    try:
        with tarfile.open(fileobj=compressed, mode="r|") as tar:
            while (member := tar.next()) is not None:
                # Stream mode never seeks back, so the member list it keeps is dead weight.
                tar.members = []
                current = member.name
                if member.isdir():
                    last, current = current, None
                    continue
                key, kind = parse_member_name(member.name)
                if not member.isfile():
                    raise PrimaFormatError(member.name, "not a regular file (link or device)")
                ident = (key.person, key.series, key.index)
                if ident in done:
                    raise PrimaFormatError(member.name, "a second file for an image already read")
                entry = pending.setdefault(ident, _Pending())
                if kind == "jpg":
                    if entry.jpeg is not None:
                        raise PrimaFormatError(member.name, f"duplicate of {entry.jpeg_member!r}")
                    entry.jpeg, entry.jpeg_member = _read_member(tar, member, _MAX_JPEG_BYTES), member.name
                    pending_bytes += len(entry.jpeg)
                else:
                    if entry.box is not None:
                        raise PrimaFormatError(member.name, f"duplicate of {entry.txt_member!r}")
                    entry.box = parse_face_box(_read_member(tar, member, _MAX_TXT_BYTES), member.name)
                    entry.txt_member = member.name
                _check_partner(entry, key, member.name)
                last, current = current, None
                if entry.jpeg is not None and entry.box is not None:
                    del pending[ident]
                    done.add(ident)
                    pending_bytes -= len(entry.jpeg)
                    yield key, entry.jpeg, entry.box, entry.jpeg_member
                elif pending_bytes > max_pending_bytes:
                    raise PrimaFormatError(
                        member.name, f"more than {max_pending_bytes} bytes of images wait for "
                        "their .txt partner: the archive's .jpg/.txt pairs are too far apart"
                    )
            # Python's tarfile ends quietly when the data stops at a member boundary; a
            # complete tar has a second zero block after the one that ended the loop.
            tail = 0
            while chunk := tar.fileobj.read(_HASH_BLOCK):
                tail += len(chunk)
            if tail < tarfile.BLOCKSIZE:
                raise PrimaFormatError(last, "the archive ends without the end-of-archive "
                                       "marker after this member: it is truncated")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as error:
        where = current or last
        raise PrimaFormatError(
            where, f"the archive is truncated or corrupt {'in' if current else 'after'} this "
            f"member: {type(error).__name__}: {error}"
        ) from error
    if pending:
        entry = next(iter(pending.values()))
        member = entry.jpeg_member or entry.txt_member
        partner = "a .txt annotation" if entry.jpeg is not None else "a .jpg image"
        raise PrimaFormatError(member, f"has no {partner} beside it ({len(pending)} "
                               "unmatched images in all)")


def _check_partner(entry: _Pending, key: ImageKey, member: str) -> None:
    # A .jpg and .txt of the same image must agree on the pose in their names.
    if entry.jpeg_member and entry.txt_member:
        other = entry.txt_member if member == entry.jpeg_member else entry.jpeg_member
        if parse_member_name(other)[0] != key:
            raise PrimaFormatError(member, f"pose in the name differs from {other!r}")


def convert_archive(
    archive_path: str | Path,
    out_dir: str | Path,
    settings: PrimaSettings | dict[str, Any] | None = None,
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
) -> dict:
    """Convert the archive into ``train-*``/``eval-*`` shards and ``manifest.json`` in ``out_dir``.

    Shards are written to a scratch folder inside ``out_dir`` and moved into place only
    when the whole archive converted, replacing earlier shards and manifest; a failure
    leaves ``out_dir`` as it was. Returns the manifest.
    """
    import tensorflow as tf

    from headpose.training.shards import ShardWriter

    settings = PrimaSettings.coerce(settings)
    archive = Path(archive_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".prima-", dir=out))
    counts = {"train": 0, "eval": 0}
    persons: dict[str, set[int]] = {"train": set(), "eval": set()}
    try:
        with open(archive, "rb") as raw:
            reader = _HashingReader(raw)
            with ShardWriter(scratch, "train", settings.images_per_shard) as train, \
                    ShardWriter(scratch, "eval", settings.images_per_shard) as evaluation:
                for key, jpeg, box, member in iter_image_pairs(reader, max_pending_bytes):
                    split = "eval" if key.person in settings.eval_persons else "train"
                    writer = evaluation if split == "eval" else train
                    count = settings.num_eval_aug if split == "eval" else settings.num_data_aug
                    image = _decode(tf, jpeg, member)
                    for crop in augment(image, key, box, count, settings, member):
                        writer.write(crop, key.tilt, key.pan)
                    counts[split] += 1
                    persons[split].add(key.person)
                    if sum(counts.values()) % 500 == 0:
                        log.info("prima: %d images converted (%s)", sum(counts.values()), counts)
            reader.drain()
        for split, number in counts.items():
            if not number:
                raise PrimaFormatError(None, f"the archive {archive} has no {split} images "
                                       f"(eval persons: {list(settings.eval_persons)})")
        manifest = {
            "source": SOURCE,
            "source_name": archive.name,
            "source_sha256": reader.sha256.hexdigest(),
            "settings": settings.as_dict(),
            "image": {"height": settings.height, "width": settings.width, "channels": "RGB",
                      "dtype": "uint8", "angle_scale_degrees": 90},
            "source_images": counts,
            "persons": {split: sorted(p) for split, p in persons.items()},
            "splits": {"train": train.summary(), "eval": evaluation.summary()},
        }
        (scratch / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_outputs(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("prima: wrote %s", {s: manifest["splits"][s]["count"] for s in ("train", "eval")})
    return manifest


def _decode(tf, jpeg: bytes, member: str):
    try:
        image = tf.io.decode_jpeg(jpeg, channels=3).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
        raise PrimaFormatError(member, f"not a readable JPEG: {error.message}") from None
    return image


def _replace_outputs(scratch: Path, out: Path) -> None:
    from headpose.training.shards import SPLITS, shard_paths

    old = [p for split in SPLITS for p in shard_paths(out, split)] + [out / MANIFEST_NAME]
    for path in old:
        path.unlink(missing_ok=True)
    for split in SPLITS:
        for path in shard_paths(scratch, split):
            os.replace(path, out / path.name)
    # The manifest last: its presence says the shards beside it are complete.
    os.replace(scratch / MANIFEST_NAME, out / MANIFEST_NAME)


def manifest_matches(
    existing_manifest: dict | None,
    source_sha256: str,
    settings: PrimaSettings | dict[str, Any] | None = None,
) -> bool:
    """Whether a dataset with this manifest was made from the same archive with the same settings.

    Light: imports neither numpy nor TensorFlow, so it can run anywhere (e.g. on a manifest
    fetched from S3 before deciding to stage).
    """
    if not isinstance(existing_manifest, dict):
        return False
    return (
        existing_manifest.get("source") == SOURCE
        and existing_manifest.get("source_sha256") == source_sha256
        and existing_manifest.get("settings") == PrimaSettings.coerce(settings).as_dict()
        and isinstance(existing_manifest.get("splits"), dict)
    )


def shards_intact(manifest: dict, directory: str | Path) -> bool:
    """Every shard the manifest lists is in ``directory`` with its recorded checksum."""
    try:
        listed = [s for split in manifest["splits"].values() for s in split["shards"]]
        return all(file_sha256(Path(directory) / s["file"]) == s["sha256"] for s in listed)
    except (KeyError, TypeError, OSError):
        return False


def stage_prima(archive_path: str | Path, out_dir: str | Path, **settings: Any) -> dict:
    """The ``stage_dataset`` step for ``dataset_source=prima``: shards + manifest in ``out_dir``.

    ``settings`` are ``PrimaSettings`` fields (``num_data_aug``, ``num_eval_aug``,
    ``size``, ``seed``, ``images_per_shard``, ``eval_persons``). When ``out_dir`` already
    holds a manifest for the same archive (sha256) and settings, and its shards are
    intact, nothing is converted and that manifest is returned.
    """
    staged = PrimaSettings.coerce(settings)
    manifest_path = Path(out_dir) / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text())
        except ValueError:
            existing = None
        if manifest_matches(existing, file_sha256(archive_path), staged) \
                and shards_intact(existing, out_dir):
            log.info("prima: %s already holds this dataset; not converting again", out_dir)
            return existing
    return convert_archive(archive_path, out_dir, staged)


def _parser() -> argparse.ArgumentParser:
    defaults = PrimaSettings()
    parser = argparse.ArgumentParser(
        prog="python -m headpose.datasets.prima",
        description="Convert the Prima Head Pose Image Database (HeadPoseImageDatabase.tar.gz) "
        "into TFRecord shards (train-*.tfrecord, eval-*.tfrecord) and manifest.json, with the "
        "tutorial's random face-containing crops. Images are uint8 RGB; tilt and pan are "
        "stored in degrees / 90.",
    )
    add = parser.add_argument
    add("--archive", required=True, type=Path,
        help="the HeadPoseImageDatabase.tar.gz archive (read as a stream, never extracted)")
    add("--out", required=True, type=Path,
        help="output folder; its earlier shards and manifest.json are replaced on success")
    add("--num-data-aug", type=int, default=defaults.num_data_aug,
        help=f"random crops per training image (default {defaults.num_data_aug})")
    add("--num-eval-aug", type=int, default=defaults.num_eval_aug,
        help=f"random crops per evaluation image (default {defaults.num_eval_aug})")
    add("--size", default=defaults.size,
        help=f"output WIDTHxHEIGHT: 84x84 (default) or the tutorial's 16:9 96x54; the training "
        "reader expects 84x84")
    add("--seed", type=int, default=defaults.seed,
        help=f"random seed; the same seed and archive give identical shards (default {defaults.seed})")
    add("--images-per-shard", type=int, default=defaults.images_per_shard,
        help=f"most records in one .tfrecord file (default {defaults.images_per_shard})")
    add("--eval-persons", default=",".join(str(p) for p in defaults.eval_persons),
        help="comma-separated person numbers held out for evaluation (default 5,10,15)")
    add("--max-pending-mib", type=int, default=DEFAULT_MAX_PENDING_BYTES // 1024**2,
        help="most MiB of images held while waiting for their .txt partner (default 64)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = PrimaSettings(
            num_data_aug=args.num_data_aug, num_eval_aug=args.num_eval_aug, size=args.size,
            seed=args.seed, images_per_shard=args.images_per_shard,
            eval_persons=tuple(int(p) for p in args.eval_persons.split(",") if p.strip()),
        )
        manifest = convert_archive(args.archive, args.out, settings,
                                   max_pending_bytes=args.max_pending_mib * 1024**2)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    counts = {split: summary["count"] for split, summary in manifest["splits"].items()}
    print(json.dumps({"out": str(args.out), "counts": counts,
                      "source_sha256": manifest["source_sha256"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
