"""A procedural head-pose dataset: the embedded default for demos and tests.

Heads come from ``headpose.datasets.rendering``. Poses are the Prima Head Pose grid (tilt
+-90 only with pan 0), so the nine classes are imbalanced the way the real data set's are.

Each round (one image of every pose) draws from its own random stream, so rounds render
in parallel processes with the same bytes as in one, and a split streams through
``ShardWriter`` a round at a time. The renderer draws RGB; pixels are stored in
``channel_order`` (default ``bgr``, like every dataset writer), recorded in the manifest.

Measured difficulty (60 training images per pose): ResNet-10 with 8 base filters, batch
64, SGD momentum 0.9 at 0.05 divided by 10 at epochs 8 and 10, batch-norm momentum 0.9,
1000 steps reaches 0.92-0.93 held-out accuracy in a few CPU minutes.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import multiprocessing
import os
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from headpose.datasets.rendering import DEFAULT_SIZE, generate_image
from headpose.datasets.settings import (
    CHANNEL_ORDERS,
    DEFAULT_CHANNEL_ORDER,
    GENERATOR_VERSION,
    checked_channel_order,
    from_rgb,
)
from headpose.training.labels import prima_poses

log = logging.getLogger(__name__)


SPLITS = ("train", "eval")


def render_round(seed: int, split: str, round_index: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One image of every pose, (poses, size, size, 3) uint8, from the round's own stream.

    Each (seed, split, round) has its own random stream, so rounds can be rendered in any
    order and by any number of processes with the same result, and eval images are never
    train images.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), round_index]))
    return np.stack([generate_image(rng, tilt, pan, size) for tilt, pan in prima_poses()])


def default_workers() -> int:
    """The CPUs this process may use: rendering is CPU-bound numpy."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _round_in_worker(seed: int, split: str, round_index: int) -> tuple[int, np.ndarray]:
    """A round, with the id of the process that rendered it (for the log line that says how many did)."""
    return os.getpid(), render_round(seed, split, round_index)


def _rendered_rounds(
    pool: Executor | None, workers: int, seed: int, split: str, rounds: int, renderers: set[int],
) -> Iterator[np.ndarray]:
    """The split's rounds in order, at most two per worker rendered ahead (bounded memory)."""
    if pool is None:
        renderers.add(os.getpid())
        yield from (render_round(seed, split, index) for index in range(rounds))
        return
    ahead = 2 * workers
    pending: collections.deque = collections.deque()
    submitted = 0
    while pending or submitted < rounds:
        while submitted < rounds and len(pending) < ahead:
            pending.append(pool.submit(_round_in_worker, seed, split, submitted))
            submitted += 1
        pid, images = pending.popleft().result()
        renderers.add(pid)
        yield images


@contextlib.contextmanager
def _render_pool(workers: int) -> Iterator[Executor | None]:
    if workers <= 1:
        yield None
        return
    # spawn, not fork: the parent may have imported TensorFlow, whose threads a fork
    # would copy in whatever state they were in.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def write_synthetic_dataset(
    out_dir: str | Path,
    train_per_pose: int,
    eval_per_pose: int,
    seed: int = 0,
    images_per_shard: int = 1000,
    workers: int | None = None,
    channel_order: str = DEFAULT_CHANNEL_ORDER,
) -> dict:
    """Write ``train-*.tfrecord``, ``eval-*.tfrecord`` and ``manifest.json``; return the manifest.

    Images are written round by round (one image of every pose, then the next round), so
    every shard holds every class and a bounded shuffle buffer mixes well. Rounds render
    in ``workers`` processes (default: every CPU this process may use); the bytes written
    do not depend on how many. Pixels are stored in ``channel_order`` (``bgr`` or ``rgb``).
    """
    from headpose.training.shards import ShardWriter  # TensorFlow only when writing

    if train_per_pose < 1 or eval_per_pose < 1:
        raise ValueError("train_per_pose and eval_per_pose must be at least 1")
    checked_channel_order(channel_order)
    out = Path(out_dir)
    poses = prima_poses()
    workers = min(workers or default_workers(), max(train_per_pose, eval_per_pose))
    splits = {}
    renderers: set[int] = set()
    with _render_pool(workers) as pool:
        for split, per_pose in zip(SPLITS, (train_per_pose, eval_per_pose)):
            with ShardWriter(out, split, images_per_shard) as writer:
                for images in _rendered_rounds(pool, workers, seed, split, per_pose, renderers):
                    for image, (tilt, pan) in zip(from_rgb(images, channel_order), poses):
                        writer.write(image, tilt, pan)
            splits[split] = writer.summary()
    manifest = {
        "source": "synthetic",
        "settings": {
            "generator_version": GENERATOR_VERSION,
            "train_per_pose": train_per_pose,
            "eval_per_pose": eval_per_pose,
            "seed": seed,
            "images_per_shard": images_per_shard,
            "image_size": DEFAULT_SIZE,
            "poses": len(poses),
            "channel_order": channel_order,
        },
        "channel_order": channel_order,
        "image": {"height": DEFAULT_SIZE, "width": DEFAULT_SIZE, "channels": channel_order.upper(),
                  "dtype": "uint8", "angle_scale_degrees": 90},
        "splits": splits,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("rendered %d rounds of %d poses in %d processes", train_per_pose + eval_per_pose, len(poses),
             len(renderers))
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m headpose.datasets.synthetic",
        description="Write a synthetic head-pose data set (TFRecord shards + manifest.json) "
        f"on the Prima pose grid ({len(prima_poses())} poses).",
    )
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder for train-*.tfrecord, eval-*.tfrecord and manifest.json")
    parser.add_argument("--train-per-pose", required=True, type=int,
                        help="training images per (tilt, pan) pose")
    parser.add_argument("--eval-per-pose", required=True, type=int,
                        help="held-out evaluation images per (tilt, pan) pose")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed writes identical images (default 0)")
    parser.add_argument("--images-per-shard", type=int, default=1000,
                        help="most records in one .tfrecord file (default 1000)")
    parser.add_argument("--workers", type=int, default=None,
                        help="rendering processes (default: the CPUs available); "
                        "the output does not depend on it")
    parser.add_argument("--channel-order", choices=CHANNEL_ORDERS, default=DEFAULT_CHANNEL_ORDER,
                        help="channel order of the pixels written, recorded in manifest.json "
                        f"(default {DEFAULT_CHANNEL_ORDER}, as the tutorial trained)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    manifest = write_synthetic_dataset(
        args.out, args.train_per_pose, args.eval_per_pose, args.seed, args.images_per_shard,
        args.workers, args.channel_order,
    )
    counts = {split: summary["count"] for split, summary in manifest["splits"].items()}
    print(json.dumps({"out": str(args.out), "counts": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
