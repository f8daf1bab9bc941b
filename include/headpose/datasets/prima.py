"""The Prima Head Pose Image Database, converted to the project's TFRecord shards.

Source: ``HeadPoseImageDatabase.tar.gz`` (Gourier, Hall, Crowley, "Estimating Face
Orientation from Robust Detection of Salient Facial Features", Pointing 2004),
http://www-prima.inrialpes.fr/perso/Gourier/Faces/HPDatabase.html.

Layout, as read by the tutorial's ``preprocessingDataset_py2.py`` and by deepgaze's
Prima parser (the two agree), and as the database's own page describes it:

* folders ``Person01`` .. ``Person15``; each holds two series of 93 images;
* image ``PersonPP/personPPSII<tilt><pan>.jpg`` - ``PP`` person, ``S`` series (1 or 2),
  ``II`` image index (00..92), then tilt and pan in degrees, each with its sign, e.g.
  ``person01100-90+0.jpg``, ``person01157+15-30.jpg``. Tilt is on
  ``labels.TILT_ANGLES`` and pan on ``labels.PAN_ANGLES``; the index runs over the pose
  grid tilt by tilt from -90 to +90 and, within a tilt, pan from -90 to +90 (tilt +-90
  only with pan 0), as the database's examples ``person08123-30+45`` and
  ``personne01146+0+0`` show. The converter labels by the angles and does not rely on it;
* beside each image ``personPPSII<tilt><pan>.txt``: three header lines (the file name,
  a blank line, ``Face``), then one integer per line - face centre x, centre y, width,
  height in pixels - with LF or CRLF line ends. Only lines 4-7 are read, as the
  tutorial does. Some boxes reach past the image's top or left edge: crops clip them
  to the image, and the manifest counts them (``clipped_boxes``);
* a ``Front/`` folder of frontal images named with the French prefix ``personne``
  (``Front/personne01146+0+0.jpg``). Like the tutorial, the converter reads only the
  Person folders: ``Front/`` and any other member (a README, ``.DS_Store``, other
  folders) are skipped, counted in the log and in the manifest (``skipped``,
  ``skipped_examples``);
* images are 384 x 288 JPEGs.

Preprocessing is the tutorial's: each image gives ``num_data_aug`` random crops (training
persons) or ``num_eval_aug`` (held-out persons 05, 10, 15), every crop containing the face
box, resized bilinearly to ``size`` (84x84, or 96x54 for 16:9); tilt and pan are stored
normalised by 90. Pixels are stored in ``channel_order`` (default ``bgr``, what the
tutorial trained on: it read images with OpenCV); the manifest records it. One
deliberate difference: crops of one image are written together, in archive order,
because the archive is streamed; the tutorial wrote augmentation round by round from
memory. Training reads shuffle shards and records, so only the order on disk differs.

Other sizes are written as asked (each record carries its height and width), but
``shards.dataset`` and the serving contract take 84 x 84: 96x54 shards need a reader that
is given both sides.

Each image's crops come from its own random stream, seeded by ``(seed, person, series,
index)``, so the shards depend on the seed and the archive only, not on how a run went.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from headpose.datasets.prima_archive import (
    DEFAULT_MAX_PENDING_BYTES,
    HashingReader,
    PrimaFormatError,
    SkippedMembers,
    iter_image_pairs,
)
from headpose.datasets.prima_crops import augment
from headpose.datasets.settings import (
    CHANNEL_ORDERS,
    DEFAULT_CHANNEL_ORDER,
    checked_channel_order,
    from_rgb,
)
from headpose.training.checksums import file_sha256

log = logging.getLogger(__name__)

SOURCE = "prima"
# Bump when a change to this module changes the shards it writes: cached datasets whose
# manifest names an older version are then rebuilt instead of reused.
# 2: pixels in channel_order (default bgr; 1 wrote RGB); Front/ and stray members skipped.
CONVERTER_VERSION = 2
EVAL_PERSONS: tuple[int, ...] = (5, 10, 15)
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class PrimaSettings:
    """Everything that decides the shards besides the archive. JSON-friendly."""

    num_data_aug: int = 15
    num_eval_aug: int = 3
    size: str = "84x84"  # WIDTHxHEIGHT of the written images
    seed: int = 0
    images_per_shard: int = 1000
    eval_persons: tuple[int, ...] = field(default=EVAL_PERSONS)
    channel_order: str = DEFAULT_CHANNEL_ORDER  # of the pixels written: bgr or rgb

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_persons", tuple(int(p) for p in self.eval_persons))
        parse_size(self.size)
        checked_channel_order(self.channel_order)
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


@dataclass
class _Converted:
    """What one pass over the archive wrote, besides the shards themselves."""

    source_sha256: str = ""
    images: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})
    persons: dict[str, set[int]] = field(default_factory=lambda: {"train": set(), "eval": set()})
    splits: dict[str, dict] = field(default_factory=dict)
    skipped: SkippedMembers = field(default_factory=SkippedMembers)
    clipped_boxes: int = 0


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
    settings = PrimaSettings.coerce(settings)
    archive = Path(archive_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".prima-", dir=out))
    try:
        converted = _write_shards(archive, scratch, settings, max_pending_bytes)
        _check_usable(converted, archive, settings)
        manifest = _manifest(archive, settings, converted)
        (scratch / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_outputs(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("prima: wrote %s", {s: manifest["splits"][s]["count"] for s in ("train", "eval")})
    return manifest


def _write_shards(archive: Path, scratch: Path, settings: PrimaSettings,
                  max_pending_bytes: int) -> _Converted:
    import tensorflow as tf

    from headpose.training.shards import ShardWriter

    converted = _Converted()
    with open(archive, "rb") as raw:
        reader = HashingReader(raw)
        with ShardWriter(scratch, "train", settings.images_per_shard) as train, \
                ShardWriter(scratch, "eval", settings.images_per_shard) as evaluation:
            pairs = iter_image_pairs(reader, max_pending_bytes, converted.skipped)
            for key, jpeg, box, member in pairs:
                split = "eval" if key.person in settings.eval_persons else "train"
                writer = evaluation if split == "eval" else train
                count = settings.num_eval_aug if split == "eval" else settings.num_data_aug
                image = _decode(tf, jpeg, member)
                if box.reaches_past(image.shape[1], image.shape[0]):
                    converted.clipped_boxes += 1
                # Decoded JPEGs are RGB; the crop is per channel, so reversing before it
                # gives the same pixels as reversing every crop, once per image. Copied
                # because TensorFlow would copy the reversed view for every crop instead.
                image = from_rgb(image, settings.channel_order).copy()
                for crop in augment(image, key, box, count, settings, member):
                    writer.write(crop, key.tilt, key.pan)
                converted.images[split] += 1
                converted.persons[split].add(key.person)
                if sum(converted.images.values()) % 500 == 0:
                    log.info("prima: %d images converted (%s)", sum(converted.images.values()),
                             converted.images)
        reader.drain()
    converted.source_sha256 = reader.sha256.hexdigest()
    converted.splits = {"train": train.summary(), "eval": evaluation.summary()}
    skipped = converted.skipped
    log.info("prima: skipped %d members that are not Person images (%s; e.g. %s); "
             "%d face boxes reach past their image and were clipped", skipped.total,
             skipped.counts, skipped.examples, converted.clipped_boxes)
    return converted


def _check_usable(converted: _Converted, archive: Path, settings: PrimaSettings) -> None:
    if not sum(converted.images.values()):
        skipped = converted.skipped
        raise PrimaFormatError(
            None, f"the archive {archive} holds no usable Person images: expected "
            "PersonNN/personNNSII<tilt><pan>.jpg, each with its .txt beside it (e.g. "
            f"Person01/person01100-90+0.jpg); skipped {skipped.counts}, e.g. {skipped.examples}")
    for split, number in converted.images.items():
        if not number:
            raise PrimaFormatError(None, f"the archive {archive} has no {split} images "
                                   f"(eval persons: {list(settings.eval_persons)})")


def _manifest(archive: Path, settings: PrimaSettings, converted: _Converted) -> dict:
    return {
        "source": SOURCE,
        "source_name": archive.name,
        "source_sha256": converted.source_sha256,
        "settings": settings.as_dict(),
        "channel_order": settings.channel_order,
        "image": {"height": settings.height, "width": settings.width,
                  "channels": settings.channel_order.upper(), "dtype": "uint8",
                  "angle_scale_degrees": 90},
        "source_images": converted.images,
        "persons": {split: sorted(p) for split, p in converted.persons.items()},
        "skipped": dict(converted.skipped.counts),
        "skipped_examples": {kind: list(names) for kind, names in converted.skipped.examples.items()},
        "clipped_boxes": converted.clipped_boxes,
        "splits": converted.splits,
    }


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
    ``size``, ``seed``, ``images_per_shard``, ``eval_persons``, ``channel_order``). When ``out_dir`` already
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
        "tutorial's random face-containing crops. Only the PersonNN folders are read (Front/ "
        "and other members are skipped and counted). Images are uint8 in --channel-order; "
        "tilt and pan are stored in degrees / 90.",
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
        help="output WIDTHxHEIGHT: 84x84 (default) or the tutorial's 16:9 96x54; the training "
        "reader expects 84x84")
    add("--seed", type=int, default=defaults.seed,
        help=f"random seed; the same seed and archive give identical shards (default {defaults.seed})")
    add("--images-per-shard", type=int, default=defaults.images_per_shard,
        help=f"most records in one .tfrecord file (default {defaults.images_per_shard})")
    add("--eval-persons", default=",".join(str(p) for p in defaults.eval_persons),
        help="comma-separated person numbers held out for evaluation (default 5,10,15)")
    add("--channel-order", choices=CHANNEL_ORDERS, default=defaults.channel_order,
        help="channel order of the pixels written, recorded in manifest.json (default "
        f"{defaults.channel_order}, as the tutorial trained and its DeepLens consumer feeds)")
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
            channel_order=args.channel_order,
        )
        manifest = convert_archive(args.archive, args.out, settings,
                                   max_pending_bytes=args.max_pending_mib * 1024**2)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    counts = {split: summary["count"] for split, summary in manifest["splits"].items()}
    print(json.dumps({"out": str(args.out), "counts": counts,
                      "source_sha256": manifest["source_sha256"], "skipped": manifest["skipped"],
                      "clipped_boxes": manifest["clipped_boxes"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
