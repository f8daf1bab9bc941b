"""The project's dataset shard format: TFRecord files of raw uint8 images.

Why TFRecord and not ``.npz``: ``tf.data`` reads TFRecord natively and in parallel,
streaming one record at a time, so memory stays flat whatever the dataset size (the
original tutorial loaded a 6.7 GB pickle into memory). Images are stored as raw uint8
bytes - four times smaller than float32, no codec to decode.

One record (a ``tf.train.Example``):

===========  ========  ==============================================
key          type      meaning
===========  ========  ==============================================
``image``    bytes     ``height * width * 3`` uint8, row-major, channels last
``height``   int64     image height in pixels
``width``    int64     image width in pixels
``tilt``     float     tilt in degrees / 90 (tutorial convention)
``pan``      float     pan in degrees / 90
===========  ========  ==============================================

Files are named ``<split>-<index:05d>.tfrecord`` (``train`` and ``eval`` splits).

Channel order: a record does not say in which order its three channels are. The
dataset's ``manifest.json`` does, as ``"channel_order"`` (``"bgr"``, the default and what
the tutorial trained on, or ``"rgb"``); training passes the pixels through as stored, so
the model expects the dataset's order.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import tensorflow as tf

from headpose.training import labels
from headpose.training.checksums import file_sha256  # noqa: F401  (part of this module's API)

IMAGE_SIZE = 84
SHARD_SUFFIX = ".tfrecord"
SPLITS = ("train", "eval")

_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "tilt": tf.io.FixedLenFeature([], tf.float32),
    "pan": tf.io.FixedLenFeature([], tf.float32),
}


def shard_paths(directory: str | Path, split: str) -> list[Path]:
    """The shards of one split in a folder, in index order."""
    return sorted(Path(directory).glob(f"{split}-*{SHARD_SUFFIX}"))


class ShardWriter:
    """Writes one split as shards of at most ``images_per_shard`` records, streaming.

    Only the record being written is held in memory. ``summary()`` gives what a
    dataset manifest needs: counts per class and each shard's checksum.
    """

    def __init__(self, directory: str | Path, split: str, images_per_shard: int = 1000):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if images_per_shard < 1:
            raise ValueError("images_per_shard must be at least 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.images_per_shard = images_per_shard
        self._writer: tf.io.TFRecordWriter | None = None
        self._in_shard = 0
        self._shards: list[dict] = []
        self._per_class: Counter[int] = Counter()

    def write(self, image: np.ndarray, tilt_degrees: float, pan_degrees: float) -> None:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 HxWx3 (in the dataset's channel_order), "
                             f"got {image.dtype} {image.shape}")
        if self._writer is None or self._in_shard == self.images_per_shard:
            self._open_next_shard()
        tilt, pan = labels.normalise(tilt_degrees), labels.normalise(pan_degrees)
        self._writer.write(_example(image, tilt, pan))
        self._in_shard += 1
        self._shards[-1]["count"] += 1
        self._per_class[labels.class_index(tilt, pan)] += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            for shard in self._shards:
                shard.setdefault("sha256", file_sha256(self.directory / shard["file"]))

    def summary(self) -> dict:
        """Counts and checksums of what was written (call after ``close``)."""
        return {
            "count": sum(s["count"] for s in self._shards),
            "per_class": [self._per_class[c] for c in range(labels.NUM_CLASSES)],
            "shards": list(self._shards),
        }

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _open_next_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._shards[-1]["sha256"] = file_sha256(self.directory / self._shards[-1]["file"])
        name = f"{self.split}-{len(self._shards):05d}{SHARD_SUFFIX}"
        self._writer = tf.io.TFRecordWriter(str(self.directory / name))
        self._shards.append({"file": name, "count": 0})
        self._in_shard = 0


def _example(image: np.ndarray, tilt: float, pan: float) -> bytes:
    height, width, _ = image.shape
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[height])),
        "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[width])),
        "tilt": tf.train.Feature(float_list=tf.train.FloatList(value=[tilt])),
        "pan": tf.train.Feature(float_list=tf.train.FloatList(value=[pan])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def class_of(tilt: tf.Tensor, pan: tf.Tensor) -> tf.Tensor:
    """``labels.class_index`` as a TensorFlow op, for use inside ``tf.data``."""
    low, high = labels.BIN_THRESHOLDS

    def bin_of(angle: tf.Tensor) -> tf.Tensor:
        return tf.cast(angle >= low, tf.int32) + tf.cast(angle >= high, tf.int32)

    return bin_of(pan) * labels.NUM_BINS + bin_of(tilt)


def _parse(record: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    parsed = tf.io.parse_single_example(record, _FEATURES)
    image = tf.io.decode_raw(parsed["image"], tf.uint8)
    image = tf.reshape(image, [image_size, image_size, 3])
    return image, parsed["tilt"], parsed["pan"]


def _mirror_half(image: tf.Tensor, tilt: tf.Tensor, pan: tf.Tensor):
    """Mirror augmentation as in the tutorial: flip horizontally and negate pan."""
    flip = tf.random.uniform([]) < 0.5
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    pan = tf.where(flip, -pan, pan)
    return image, tilt, pan


def _to_model_inputs(image: tf.Tensor, tilt: tf.Tensor, pan: tf.Tensor):
    return tf.cast(image, tf.float32) / 255.0, class_of(tilt, pan)


def dataset(
    paths: Iterable[str | Path],
    batch_size: int,
    training: bool,
    image_size: int = IMAGE_SIZE,
    shuffle_buffer: int = 2048,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Batches of ``(float32 [B, H, W, 3] in [0, 1], int32 class)`` streamed from shards.

    Training data is shuffled (files and a bounded buffer), mirrored at random and
    repeated forever; evaluation data is read once, in order. Memory is bounded by the
    shuffle buffer and the prefetch depth, not by the dataset size.
    """
    files = [str(p) for p in paths]
    if not files:
        raise ValueError("no shard files given")
    autotune = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
        ds = ds.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(4, len(files)),
            num_parallel_calls=autotune,
            deterministic=False,
        )
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    else:
        ds = ds.flat_map(tf.data.TFRecordDataset)
    ds = ds.map(lambda r: _parse(r, image_size), num_parallel_calls=autotune)
    if training:
        ds = ds.map(_mirror_half, num_parallel_calls=autotune)
    ds = ds.map(_to_model_inputs, num_parallel_calls=autotune)
    return ds.batch(batch_size, drop_remainder=training).prefetch(autotune)
