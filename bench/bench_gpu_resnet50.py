"""ResNet-50 training throughput, mixed precision + XLA, against the tutorial's K80 figure.

The tutorial trained 25000 steps of batch 200 in 6.7 hours on one K80:
25000 * 200 / (6.7 * 3600) = 207 images/s. Here the project's model
(``build_resnet(50, base_filters=64)``, 84x84x3 inputs, 9 classes) is compiled as the
entry point compiles it (SGD + momentum, sparse categorical cross-entropy), once under
the ``mixed_float16`` policy with ``jit_compile=True`` (XLA) and once in float32 without
XLA (the in-process baseline), and stepped with ``model.fit`` on one batch held on the
device (``Dataset.from_tensors(batch).repeat()``: the compute figure, not the input
pipeline). Segments alternate between the two; warm-up (tracing, XLA compilation,
autotuning) is excluded; figures are medians over segments.

Runs on whatever device is present: not part of ``run_all.sh``'s default set
(``run_all.sh --gpu``). On a CPU it still works with a smaller ``--batch-size`` for a
smoke test, but the figure is only meaningful on a GPU.

Usage: ``python bench/bench_gpu_resnet50.py [--batch-size 200] [--steps 50] [--segments 3]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import INCLUDE, emit, progress, ratio_of_pairs, spread, versions  # noqa: E402

sys.path.insert(0, str(INCLUDE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TUTORIAL_IMAGES_PER_S = 25000 * 200 / (6.7 * 3600)


def device_description() -> dict:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return {"type": "CPU", "name": "CPU", "count": 0}
    details = tf.config.experimental.get_device_details(gpus[0])
    return {"type": "GPU", "name": details.get("device_name", gpus[0].name), "count": len(gpus),
            "compute_capability": details.get("compute_capability")}


def build(policy: str, jit_compile: bool, batch_size: int):
    import tensorflow as tf

    from headpose.training import model

    tf.keras.mixed_precision.set_global_policy(policy)
    net = model.build_resnet(50, base_filters=64)
    net.compile(
        optimizer=tf.keras.optimizers.SGD(learning_rate=0.1 * batch_size / 128, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        jit_compile=jit_compile,
    )
    tf.keras.mixed_precision.set_global_policy("float32")
    return net


def segment(net, data, steps: int, warmup: int, batch_size: int) -> float:
    import tensorflow as tf

    stamps: list[float] = []

    class Stamp(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

    # steps_per_execution=1 and a per-batch callback: each step ends before its stamp.
    net.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[Stamp()])
    return (steps - warmup) * batch_size / (stamps[-1] - stamps[warmup - 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50, help="steps per segment (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="excluded steps per segment")
    parser.add_argument("--segments", type=int, default=3, help="segments per variant (default 3)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the float32 / no-XLA baseline (halves the run time)")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    device = device_description()
    progress(f"device: {device}")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random([args.batch_size, 84, 84, 3], dtype=np.float32))
    classes = tf.constant(rng.integers(0, 9, args.batch_size, dtype=np.int32))
    data = tf.data.Dataset.from_tensors((images, classes)).repeat().prefetch(2)
    if device["type"] == "GPU":
        data = data.apply(tf.data.experimental.prefetch_to_device("/GPU:0"))

    variants = {"mixed_float16_xla": build("mixed_float16", True, args.batch_size)}
    if not args.no_baseline:
        variants["float32_no_xla"] = build("float32", False, args.batch_size)
    for name, net in variants.items():
        progress(f"warming up {name} (tracing{', XLA compile' if name.endswith('_xla') and 'no_xla' not in name else ''})")
        segment(net, data, args.warmup + 2, args.warmup, args.batch_size)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(args.segments):
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for name in order:
            rates[name].append(segment(variants[name], data, args.steps, args.warmup,
                                       args.batch_size))
        progress(f"segment {index + 1}/{args.segments}: " + ", ".join(
            f"{n} {v[-1]:.0f} img/s" for n, v in rates.items()))

    best = spread(rates["mixed_float16_xla"], 1)
    result = {
        "benchmark": "gpu_resnet50",
        "device": device,
        "figure": "mixed_xla_over_tutorial_k80",
        "images_per_s": {name: spread(values, 1) for name, values in rates.items()},
        "tutorial_k80_images_per_s": round(TUTORIAL_IMAGES_PER_S, 1),
        "mixed_xla_over_tutorial_k80": round(best["median"] / TUTORIAL_IMAGES_PER_S, 3),
        "projected_hours_for_25000_steps_of_200": round(25000 * 200 / best["median"] / 3600, 2),
        "settings": {"model": "build_resnet(50, base_filters=64)", "batch_size": args.batch_size,
                     "steps_per_segment": args.steps, "warmup": args.warmup,
                     "segments": args.segments},
        "versions": {"tensorflow": tf.__version__, **versions("keras")},
    }
    if "float32_no_xla" in rates:
        result["mixed_xla_over_float32"] = ratio_of_pairs(rates["mixed_float16_xla"],
                                                          rates["float32_no_xla"], 3)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
