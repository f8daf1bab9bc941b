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
    iter_image_pairs,
)
from headpose.datasets.prima_crops import augment
from headpose.training.checksums import file_sha256

log = logging.getLogger(__name__)

SOURCE = "prima"
# Bump when a change to this module changes the shards it writes: cached datasets whose
# manifest names an older version are then rebuilt instead of reused.
CONVERTER_VERSION = 1
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
            reader = HashingReader(raw)
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
        help="output WIDTHxHEIGHT: 84x84 (default) or the tutorial's 16:9 96x54; the training "
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
