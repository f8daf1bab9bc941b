"""Training images/s of the entry point's model on this CPU, by ResNet depth, at 64 base filters.

``planning.profile.MEASURED_IMAGES_PER_SECOND`` ships these figures (a deployment's own
workers give theirs with ``local_images_per_second``), and ``plan_run`` refuses a local run
that cannot finish inside ``max_run_seconds`` at that rate. Measured like the entry point
trains: the project's ``build_resnet`` compiled with SGD, ``model.fit`` on batches held in
memory (so the input pipeline, which keeps up, is not what is timed), after warm-up steps.

Usage: ``python bench/bench_local_throughput.py [--sizes 10,18,34,50] [--batch 64] [--steps 6]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "include"), str(Path(__file__).resolve().parent)]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import machine, progress  # noqa: E402


def images_per_second(resnet_size: int, batch: int, steps: int, repeats: int) -> list[float]:
    import numpy as np
    import tensorflow as tf

    from headpose.training.model import build_resnet

    tf.keras.utils.set_random_seed(0)
    net = build_resnet(resnet_size, 64)
    net.compile(optimizer=tf.keras.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.random((batch, 84, 84, 3), dtype=np.float32)
    labels = rng.integers(0, 9, batch)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    net.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # graph building and warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        net.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
        rates.append(steps * batch / (time.perf_counter() - started))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,18,34,50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for size in (int(s) for s in args.sizes.split(",")):
        progress(f"ResNet-{size}, 64 filters, batch {args.batch}")
        rates = images_per_second(size, args.batch, args.steps, args.repeats)
        results[str(size)] = {"images_per_second_median": round(sorted(rates)[len(rates) // 2], 1),
                              "all": [round(r, 1) for r in rates]}
    print(json.dumps({"benchmark": "local_throughput", "machine": machine(), "batch": args.batch,
                      "base_filters": 64, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
