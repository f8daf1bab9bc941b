"""Training memory: peak RSS of one entry-point run on 4x the data over the same run on 1x.

Each run is a fresh ``python include/headpose/training/train.py`` child with the SageMaker
environment (``SM_CHANNEL_TRAINING``, ``SM_MODEL_DIR``, ``SM_OUTPUT_DIR``) and a tiny
ResNet; its peak RSS is the kernel's high-water mark from ``os.wait4`` (``ru_maxrss``),
so nothing is sampled and nothing is missed.

What is held equal: the model, batch size, the number of training steps and of
evaluation batches. Both runs take ``ceil(train_4x / batch)`` steps - one epoch of the 4x
set, four of the 1x set - so both stream the same number of records through the same
pipeline and do the same compute; the only difference is how many distinct records exist
on disk. A loader that held the data set in memory (as the tutorial's pickle did) would
grow by the data size; a streaming one stays near 1. The data is sized so that the test
can tell: by default 1x is ~50 MiB of shards and 4x ~210 MiB against a ~1 GiB process,
so even a loader keeping the raw uint8 records would read about 1.15
(``sensitivity`` in the output). The shards are synthetic images rendered once and
copied under new names (``train-00000`` ...), so larger sets cost no extra rendering. Runs alternate 1x/4x in ABBA order; the figure is the median
of per-pair ratios.

``bench/bench_data_memory.py`` (another benchmark) measures the Prima conversion and one
epoch per data size; this one fixes the steps so that only the data size varies.

Usage: ``python bench/bench_training_memory.py [--pairs 2] [--scale 4]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (INCLUDE, PYTHON, ROOT, child_env, emit, progress,  # noqa: E402
                     ratio_of_pairs, spread, versions)

TARGET = 1.1
ENTRY = INCLUDE / "headpose" / "training" / "train.py"


def write_base_shards(directory: Path, per_pose: int, eval_per_pose: int,
                      images_per_shard: int) -> dict:
    """Synthetic shards in a child process, so this process never imports TensorFlow."""
    code = (
        "import json, sys\n"
        "from headpose.datasets.synthetic import write_synthetic_dataset\n"
        "m = write_synthetic_dataset(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 0, int(sys.argv[4]))\n"
        "print(json.dumps({s: m['splits'][s]['count'] for s in m['splits']}))\n"
    )
    done = subprocess.run([PYTHON, "-c", code, str(directory), str(per_pose), str(eval_per_pose),
                           str(images_per_shard)], env=child_env(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def replicate(base: Path, target: Path, scale: int) -> None:
    """``scale`` copies of every shard of ``base``, renumbered, in ``target``."""
    target.mkdir(parents=True)
    for split in ("train", "eval"):
        files = sorted(base.glob(f"{split}-*.tfrecord"))
        index = 0
        for _ in range(scale):
            for path in files:
                shutil.copyfile(path, target / f"{split}-{index:05d}.tfrecord")
                index += 1


def run_entry(data_dir: Path, work: Path, steps: int, eval_steps: int, batch_size: int,
              resnet_size: int, base_filters: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = child_env(SM_CHANNEL_TRAINING=str(data_dir), SM_MODEL_DIR=str(work / "model"),
                    SM_OUTPUT_DIR=str(work / "output"), CUDA_VISIBLE_DEVICES="")
    command = [PYTHON, str(ENTRY), "--training_steps", str(steps),
               "--evaluation_steps", str(eval_steps), "--batch_size", str(batch_size),
               "--resnet_size", str(resnet_size), "--base_filters", str(base_filters),
               "--log_every", str(steps)]
    (work / "model").mkdir()
    started = time.monotonic()
    with open(work / "train.log", "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # rusage of this one child
    code = os.waitstatus_to_exitcode(status)
    text = (work / "train.log").read_text(errors="replace")
    if code:
        raise RuntimeError(f"train.py failed ({code}):\n{text[-3000:]}")
    finished = [line for line in text.splitlines() if line.startswith("training finished:")]
    metrics = json.loads(finished[-1].split(":", 1)[1]) if finished else {}
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": time.monotonic() - started,
            "train_images": metrics.get("train_images")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="ABBA pairs of 1x/4x runs (default 2)")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--per-pose", type=int, default=6,
                        help="synthetic training images per pose at 1x (93 poses; default 6)")
    parser.add_argument("--eval-per-pose", type=int, default=1)
    parser.add_argument("--copies", type=int, default=4,
                        help="copies of the rendered shards that make the 1x set (default 4)")
    parser.add_argument("--images-per-shard", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resnet-size", type=int, default=10)
    parser.add_argument("--base-filters", type=int, default=8)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-trainmem-") as scratch:
        root = Path(scratch)
        progress("writing synthetic shards (1x)")
        counts = write_base_shards(root / "base", args.per_pose, args.eval_per_pose,
                                   args.images_per_shard)
        sizes = {"1x": root / "data-1x", f"{args.scale}x": root / f"data-{args.scale}x"}
        replicate(root / "base", sizes["1x"], args.copies)
        replicate(root / "base", sizes[f"{args.scale}x"], args.copies * args.scale)
        counts = {split: n * args.copies for split, n in counts.items()}
        large = f"{args.scale}x"
        steps = math.ceil(counts["train"] * args.scale / args.batch_size)
        eval_steps = math.ceil(counts["eval"] * args.scale / args.batch_size)
        runs: dict[str, list[dict]] = {"1x": [], large: []}
        for pair in range(args.pairs):
            order = ("1x", large) if pair % 2 == 0 else (large, "1x")
            for label in order:
                runs[label].append(run_entry(sizes[label], root / "work", steps, eval_steps,
                                             args.batch_size, args.resnet_size, args.base_filters))
                progress(f"pair {pair + 1}/{args.pairs} {label}: "
                         f"{runs[label][-1]['peak_rss_mib']:.0f} MiB in {runs[label][-1]['wall_s']:.0f}s")
        data_bytes = {label: sum(p.stat().st_size for p in path.glob("*.tfrecord"))
                      for label, path in sizes.items()}

    peaks = {label: [r["peak_rss_mib"] for r in values] for label, values in runs.items()}
    ratio = ratio_of_pairs(peaks[large], peaks["1x"])
    result = {
        "benchmark": "training_memory",
        "method": "fresh train.py child per run, peak RSS = ru_maxrss from wait4; same steps "
                  "(one epoch of the large set) and eval batches at both sizes; ABBA pairs",
        "figure": f"peak_rss_{large}_over_1x",
        f"peak_rss_{large}_over_1x": ratio,
        "target_max": TARGET,
        "meets_target": ratio["median"] <= TARGET,
        "peak_rss_mib": {label: spread(values, 1) for label, values in peaks.items()},
        "wall_s": {label: spread([r["wall_s"] for r in values], 1) for label, values in runs.items()},
        "data": {
            "train_images": {label: values[0]["train_images"] for label, values in runs.items()},
            "shard_mib": {label: round(b / 2**20, 1) for label, b in data_bytes.items()},
            "data_mib_over_1x_peak": round(data_bytes[large] / 2**20
                                           / spread(peaks["1x"])["median"], 3),
            "sensitivity": "ratio an in-memory loader of the raw records would show: "
                           + str(round((spread(peaks["1x"])["median"] + data_bytes[large] / 2**20)
                                       / (spread(peaks["1x"])["median"] + data_bytes["1x"] / 2**20), 3)),
        },
        "settings": {"copies_at_1x": args.copies, "training_steps": steps, "evaluation_steps": eval_steps,
                     "batch_size": args.batch_size, "resnet_size": args.resnet_size,
                     "base_filters": args.base_filters, "shuffle_buffer": 2048},
        "see_also": "bench/bench_data_memory.py (Prima conversion + one epoch per size)",
        "versions": versions("tensorflow", "numpy"),
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
