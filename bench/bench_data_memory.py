"""Peak memory of the data path at 1x and 4x the data size; prints JSON.

Measured, each in a fresh process:

* ``conversion``: ``python -m headpose.datasets.prima`` on a fabricated archive in the Prima layout
  (15 persons, 2 series, ``--images-per-series`` images each at 1x, four times as many
  at 4x);
* ``training_epoch``: the SageMaker entry point ``include/headpose/training/train.py``
  (``SM_CHANNEL_TRAINING``/``SM_MODEL_DIR``/``SM_OUTPUT_DIR`` set, tiny ResNet) for one
  epoch of the shards that conversion wrote.

Peak memory is the child's RSS high-water mark from ``os.wait4`` (``ru_maxrss``), so
nothing samples and nothing is missed. Streaming means the 4x/1x ratios stay near 1.
Usage: ``python bench/bench_data_memory.py [--images-per-series 6] [--scale 4]``.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))

PERSONS = range(1, 16)
WIDTH, HEIGHT = 384, 288


def fabricate_archive(path: Path, images_per_series: int, seed: int = 0) -> int:
    """A Prima-layout ``.tar.gz`` of drawn images, written one member at a time."""
    import numpy as np
    import tensorflow as tf

    from headpose.datasets.synthetic import prima_poses

    if not 1 <= images_per_series <= 93:
        raise ValueError("the Prima naming allows 1..93 images per series")
    poses = prima_poses()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    with tarfile.open(path, "w:gz") as tar:
        for person in PERSONS:
            folder = tarfile.TarInfo(f"Person{person:02d}")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            for series in (1, 2):
                for index in range(images_per_series):
                    tilt, pan = poses[(index + 31 * series + 7 * person) % len(poses)]
                    width, height = (int(v) for v in rng.integers(50, 110, size=2))
                    cx = int(rng.integers(width // 2 + 10, WIDTH - width // 2 - 10))
                    cy = int(rng.integers(height // 2 + 10, HEIGHT - height // 2 - 10))
                    image = (rng.random(3) * 120 + 40 + 20 * np.sin(xx / 17.0 + person)[..., None]
                             + 10 * np.cos(yy / 11.0)[..., None])
                    inside = (np.abs(xx - cx) <= width // 2) & (np.abs(yy - cy) <= height // 2)
                    image[inside] = rng.random(3) * 80 + 170
                    jpeg = tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8)).numpy()
                    stem = f"Person{person:02d}/person{person:02d}{series}{index:02d}{tilt:+d}{pan:+d}"
                    text = f"{Path(stem).name}.jpg\n\nFace\n{cx}\n{cy}\n{width}\n{height}\n".encode()
                    for name, data in ((stem + ".jpg", jpeg), (stem + ".txt", text)):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def peak_rss(command: list[str], env: dict[str, str], log_path: Path) -> dict:
    """Run ``command``; its exit code, wall time and RSS high-water mark (MiB)."""
    start = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives the rusage of this one child (ru_maxrss in KiB on Linux).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    result = {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
              "wall_s": round(time.monotonic() - start, 1), "exit_code": process.returncode}
    if process.returncode:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{tail}")
    return result


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    env.update(extra)
    return env


def bench(images_per_series: int, scale: int, batch_size: int, num_data_aug: int,
          workdir: Path) -> dict:
    results: dict = {"conversion": {}, "training_epoch": {}}
    for label, per_series in (("1x", images_per_series), (f"{scale}x", images_per_series * scale)):
        case = workdir / label
        case.mkdir()
        archive = case / "HeadPoseImageDatabase.tar.gz"
        archive_bytes = fabricate_archive(archive, per_series)
        shards = case / "shards"
        run = peak_rss(
            [sys.executable, "-m", "headpose.datasets.prima", "--archive", str(archive), "--out", str(shards),
             "--num-data-aug", str(num_data_aug)], _env(), case / "convert.log")
        manifest = json.loads((shards / "manifest.json").read_text())
        train_count = manifest["splits"]["train"]["count"]
        eval_count = manifest["splits"]["eval"]["count"]
        results["conversion"][label] = {
            **run, "source_images": sum(manifest["source_images"].values()),
            "archive_bytes": archive_bytes, "records": train_count + eval_count,
            "shard_bytes": sum(p.stat().st_size for p in shards.glob("*.tfrecord")),
        }
        steps = max(1, train_count // batch_size)
        run = peak_rss(
            [sys.executable, str(ROOT / "include/headpose/training/train.py"),
             "--training_steps", str(steps), "--evaluation_steps", str(math.ceil(eval_count / batch_size)),
             "--batch_size", str(batch_size), "--resnet_size", "10", "--base_filters", "8",
             "--log_every", str(steps)],
            _env(SM_CHANNEL_TRAINING=str(shards), SM_MODEL_DIR=str(case / "model"),
                 SM_OUTPUT_DIR=str(case / "output")),
            case / "train.log")
        results["training_epoch"][label] = {**run, "train_records": train_count,
                                            "steps": steps, "batch_size": batch_size}
    for part in ("conversion", "training_epoch"):
        small, large = results[part]["1x"], results[part][f"{scale}x"]
        results[part][f"ratio_{scale}x_over_1x"] = round(large["peak_rss_mib"] / small["peak_rss_mib"], 3)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-series", type=int, default=6,
                        help="images per person and series at 1x (default 6: 180 images)")
    parser.add_argument("--scale", type=int, default=4, help="the larger size, as a multiple (default 4)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    parser.add_argument("--num-data-aug", type=int, default=15, help="crops per training image (default 15)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        results = bench(args.images_per_series, args.scale, args.batch_size, args.num_data_aug, workdir)
    results["settings"] = {"images_per_series_1x": args.images_per_series, "scale": args.scale,
                           "batch_size": args.batch_size, "num_data_aug": args.num_data_aug,
                           "model": "resnet_size 10, base_filters 8", "cpus": os.cpu_count()}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
