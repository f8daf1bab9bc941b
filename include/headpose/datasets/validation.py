"""Dataset validation: a dataset that cannot train a useful model is refused before training.

Every source is checked the same way before ``train`` starts: each shard's sha256
against the manifest, the record counts, all 9 classes present in both splits (with a
class-balance figure), every image's shape, and pixel statistics (no constant images, no
split that is all but black or white). A refusal says which check failed with the figures;
the figures go into the manifest of a dataset the pipeline stages, and into the run's XCom
and report either way.

A dataset validated before carries the S3 ETag of every shard in its manifest's
``validation`` section; when every ETag still matches (a list call, no download), the
earlier figures stand.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from headpose.planning.layout import file_sha256
from headpose.training import labels

Log = Callable[[str], None]
VALIDATION_VERSION = 1
IMAGE_SHAPE = (84, 84, 3)
SPLITS = ("train", "eval")
# An image whose pixels all have one value is a decoding or cropping failure, not a face.
MAX_CONSTANT_SHARE = 0.01
# A split whose mean pixel is this close to black or white is not photographs.
MEAN_PIXEL_RANGE = (8.0, 247.0)


class DatasetInvalid(ValueError):
    """The dataset fails a check; the message gives the check and its figures."""


def validate_split_files(manifest: Mapping[str, Any], folder: Path, split: str) -> dict[str, Any]:
    """The figures of one split whose shards lie in ``folder``; ``DatasetInvalid`` if a check fails."""
    listed = _listed_shards(manifest, split)
    for shard in listed:
        path = folder / shard["file"]
        if not path.is_file():
            raise DatasetInvalid(f"{split} shard {shard['file']} named in the manifest is missing")
        actual = file_sha256(path)
        if actual != shard.get("sha256"):
            raise DatasetInvalid(f"{split} shard {shard['file']} has sha256 {actual}, the manifest says {shard.get('sha256')}")
    figures = split_figures([folder / s["file"] for s in listed])
    recorded = manifest["splits"][split].get("count")
    if recorded is not None and recorded != figures["count"]:
        raise DatasetInvalid(f"the {split} shards hold {figures['count']} records, the manifest says {recorded}")
    return figures


def split_figures(paths: Iterable[Path]) -> dict[str, Any]:
    """Counts per class, shapes and pixel statistics of the records in ``paths``."""
    import numpy as np

    counts = np.zeros(labels.NUM_CLASSES, dtype=np.int64)
    bad_shapes = constant = total = 0
    pixel_sum = pixel_sq = 0.0
    for batch in _image_stats(list(paths)):
        total += len(batch["cls"])
        counts += np.bincount(batch["cls"], minlength=labels.NUM_CLASSES)
        bad_shapes += int(np.sum(~batch["shape_ok"]))
        constant += int(np.sum(batch["std"] == 0))
        pixel_sum += float(np.sum(batch["mean"]))
        pixel_sq += float(np.sum(batch["std"] ** 2 + batch["mean"] ** 2))
    mean = pixel_sum / total if total else 0.0
    present = counts[counts > 0]
    return {
        "count": int(total),
        "per_class": counts.tolist(),
        "classes_present": int(len(present)),
        "class_balance": round(float(present.min() / present.max()), 4) if len(present) else 0.0,
        "bad_shapes": bad_shapes,
        "constant_images": constant,
        "pixel_mean": round(mean, 2),
        "pixel_std": round(max(pixel_sq / total - mean**2, 0.0) ** 0.5, 2) if total else 0.0,
    }


def _image_stats(paths: list[Path]):
    import tensorflow as tf

    from headpose.training.shards import class_of

    features = {  # the shard record (training/shards.py), read without assuming its size
        "image": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "tilt": tf.io.FixedLenFeature([], tf.float32),
        "pan": tf.io.FixedLenFeature([], tf.float32),
    }

    def stats(record):
        parsed = tf.io.parse_single_example(record, features)
        pixels = tf.cast(tf.io.decode_raw(parsed["image"], tf.uint8), tf.float32)
        expected = tf.constant(IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2], tf.int32)
        shape_ok = (tf.size(pixels) == expected) & (parsed["height"] == IMAGE_SHAPE[0]) & (
            parsed["width"] == IMAGE_SHAPE[1])
        return {"cls": class_of(parsed["tilt"], parsed["pan"]), "shape_ok": shape_ok,
                "mean": tf.reduce_mean(pixels), "std": tf.math.reduce_std(pixels)}

    if not paths:
        return
    dataset = tf.data.TFRecordDataset([str(p) for p in paths]).map(stats, num_parallel_calls=tf.data.AUTOTUNE)
    for batch in dataset.batch(1024).as_numpy_iterator():
        yield batch


def problems_of(figures: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Why a dataset with these split figures cannot be trained on (empty: it can)."""
    problems = []
    for split in SPLITS:
        f = figures.get(split)
        if not f or not f["count"]:
            problems.append(f"the {split} split is empty")
            continue
        if f["classes_present"] < labels.NUM_CLASSES:
            missing = [labels.class_names()[c] for c, n in enumerate(f["per_class"]) if not n]
            problems.append(f"the {split} split lacks classes {missing} (per class {f['per_class']})")
        if f["bad_shapes"]:
            problems.append(f"{f['bad_shapes']} of {f['count']} {split} images are not {list(IMAGE_SHAPE)}")
        if f["constant_images"] > MAX_CONSTANT_SHARE * f["count"]:
            problems.append(f"{f['constant_images']} of {f['count']} {split} images are one flat colour")
        low, high = MEAN_PIXEL_RANGE
        if not low <= f["pixel_mean"] <= high:
            problems.append(f"the {split} images' mean pixel is {f['pixel_mean']} (expected {low}..{high})")
    return problems


def validation_record(
    manifest: Mapping[str, Any], figures: Mapping[str, Any], etags: Mapping[str, str],
) -> dict[str, Any]:
    """The manifest's ``validation`` section: the figures and the listed shards' ETags they hold for."""
    listed = sorted(s["file"] for split in SPLITS for s in _listed_shards(manifest, split))
    return {"version": VALIDATION_VERSION, "splits": dict(figures), "etags": {name: etags.get(name) for name in listed}}


def still_valid(manifest: Mapping[str, Any], etags: Mapping[str, str]) -> bool:
    """Whether the manifest's validation holds for shards with these ETags (nothing changed)."""
    record = manifest.get("validation") or {}
    try:
        listed = {s["file"] for split in SPLITS for s in _listed_shards(manifest, split)}
    except DatasetInvalid:
        return False
    return (
        record.get("version") == VALIDATION_VERSION
        and bool(listed)
        and record.get("etags") == {name: etags.get(name) for name in listed}
    )


def summary_line(figures: Mapping[str, Mapping[str, Any]]) -> str:
    return "; ".join(
        f"{split}: {f['count']} images, {f['classes_present']}/9 classes, balance {f['class_balance']}, "
        f"pixel mean {f['pixel_mean']} std {f['pixel_std']}"
        for split, f in figures.items()
    )


def listed_shard_files(manifest: Mapping[str, Any]) -> set[str]:
    """The file names of every shard the manifest lists (none for a split it lacks)."""
    return {
        shard["file"] for split in SPLITS
        for shard in ((manifest.get("splits") or {}).get(split) or {}).get("shards") or []
        if isinstance(shard, Mapping) and "file" in shard
    }


def _listed_shards(manifest: Mapping[str, Any], split: str) -> list[dict]:
    try:
        return list(manifest["splits"][split]["shards"])
    except (KeyError, TypeError):
        raise DatasetInvalid(f"the manifest lists no {split} shards") from None


