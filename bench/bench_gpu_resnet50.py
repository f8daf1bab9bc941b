"""ResNet-50 training throughput, mixed precision + XLA, against the tutorial's K80 figure.

The tutorial trained 25000 steps of batch 200 in 6.7 hours on one K80:
25000 * 200 / (6.7 * 3600) = 207 images/s. Here the project's model
(``build_resnet(50, base_filters=64)``, 84x84x3 inputs, 9 classes) is compiled as the
entry point compiles it (SGD + momentum, sparse categorical cross-entropy) under a
mixed-precision policy with XLA, and under float32 as the in-process baseline, and
stepped with ``model.fit`` on one batch of random images (the compute figure, not the
input pipeline). Variants alternate segment by segment; XLA compilation and autotuning
are excluded.

The script speaks Keras 3 only, so it runs on the backend ``KERAS_BACKEND`` names:

- ``tensorflow`` (the training entry point's): the batch sits on the device
  (``Dataset.from_tensors(batch).repeat()``), ``jit_compile`` turns XLA on and off, so
  the float32 baseline runs without XLA;
- ``jax``: where TensorFlow's GPU build cannot be installed (its CUDA wheels are
  gigabytes), the very same model definition runs on JAX. Every JAX step is
  XLA-compiled, so the float32 baseline has XLA too, and the batch is fed from host
  memory through Keras' one-batch-ahead device transfer, as a real input pipeline is.

A segment times a short ``fit`` and a long one back to back and divides the extra
images by the extra time, which cancels ``fit``'s fixed start-up cost and needs no
per-step synchronisation (JAX dispatches steps asynchronously).

Not part of ``run_all.sh``'s default set (``run_all.sh --gpu``). On a CPU it works with
``--batch-size 8 --resnet-size 10`` as a smoke test; the figure means something only on
a GPU.

Usage: ``python bench/bench_gpu_resnet50.py [--batch-size 200] [--steps 60] [--segments 3]``.
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
# variant -> (Keras dtype policy, XLA requested)
VARIANTS = {
    "mixed_float16_xla": ("mixed_float16", True),
    "mixed_bfloat16_xla": ("mixed_bfloat16", True),
    "float32": ("float32", False),
}


def device_description(backend: str) -> dict:
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return {"type": device.platform.upper(), "name": device.device_kind,
                "count": len(jax.devices())}
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return {"type": "CPU", "name": "CPU", "count": 0}
    details = tf.config.experimental.get_device_details(gpus[0])
    return {"type": "GPU", "name": details.get("device_name", gpus[0].name), "count": len(gpus),
            "compute_capability": details.get("compute_capability")}


def build(policy: str, xla: bool, args: argparse.Namespace):
    import keras

    from headpose.training import model

    keras.mixed_precision.set_global_policy(policy)
    try:
        net = model.build_resnet(args.resnet_size, base_filters=args.base_filters)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    net.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1 * args.batch_size / 128, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        # Under JAX every step is XLA-compiled whatever this says.
        jit_compile=True if keras.backend.backend() == "jax" else xla,
    )
    return net


def same_batch_data(images, classes, backend: str, steps: int):
    """``steps`` or more copies of one batch: on the device for TF, from host memory for JAX."""
    if backend == "tensorflow":
        import tensorflow as tf

        data = tf.data.Dataset.from_tensors((images, classes)).repeat()
        if tf.config.list_physical_devices("GPU"):
            return data.apply(tf.data.experimental.prefetch_to_device("/GPU:0"))
        return data.prefetch(2)

    import keras

    class SameBatch(keras.utils.PyDataset):
        def __len__(self) -> int:
            # Keras builds an index per step, so a huge length would cost memory.
            return steps

        def __getitem__(self, index: int):
            return images, classes

    return SameBatch()


def segment(net, data, short: int, long: int, batch_size: int) -> float:
    """Images/s of the ``long - short`` extra steps of a long fit over a short one."""
    timings = []
    for steps in (short, long):
        start = time.perf_counter()
        # fit returns host floats of the last step's loss, so each call ends synchronised.
        net.fit(data, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
        timings.append(time.perf_counter() - start)
    return (long - short) * batch_size / (timings[1] - timings[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--steps", type=int, default=60,
                        help="extra steps of a segment's long fit over its short one (default 60)")
    parser.add_argument("--short", type=int, default=5, help="steps of the short fit (default 5)")
    parser.add_argument("--segments", type=int, default=3, help="segments per variant (default 3)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        default=list(VARIANTS), help="first one is the headline figure")
    parser.add_argument("--resnet-size", type=int, default=50, help="smaller only for a smoke test")
    parser.add_argument("--base-filters", type=int, default=64)
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    backend = keras.backend.backend()
    device = device_description(backend)
    progress(f"backend {backend}, device: {device}")
    rng = np.random.default_rng(0)
    images = rng.random([args.batch_size, 84, 84, 3], dtype=np.float32)
    classes = rng.integers(0, 9, args.batch_size, dtype=np.int32)
    data = same_batch_data(images, classes, backend, args.short + args.steps)

    nets = {}
    for name in args.variants:
        policy, xla = VARIANTS[name]
        start = time.perf_counter()
        nets[name] = build(policy, xla, args)
        nets[name].fit(data, epochs=1, steps_per_epoch=args.short, shuffle=False, verbose=0)
        progress(f"{name}: built, traced and compiled in {time.perf_counter() - start:.1f} s")
    rates: dict[str, list[float]] = {name: [] for name in nets}
    for index in range(args.segments):
        order = list(nets) if index % 2 == 0 else list(reversed(nets))
        for name in order:
            rates[name].append(segment(nets[name], data, args.short,
                                       args.short + args.steps, args.batch_size))
        progress(f"segment {index + 1}/{args.segments}: " + ", ".join(
            f"{n} {v[-1]:.0f} img/s" for n, v in rates.items()))

    headline = args.variants[0]
    best = spread(rates[headline], 1)
    result = {
        "benchmark": "gpu_resnet50",
        "backend": backend,
        "device": device,
        "figure": "headline_over_tutorial_k80",
        "headline_variant": headline,
        "images_per_s": {name: spread(values, 1) for name, values in rates.items()},
        "tutorial_k80_images_per_s": round(TUTORIAL_IMAGES_PER_S, 1),
        "headline_over_tutorial_k80": round(best["median"] / TUTORIAL_IMAGES_PER_S, 2),
        "over_float32": {name: ratio_of_pairs(rates[name], rates["float32"], 3)
                         for name in rates if name != "float32" and "float32" in rates},
        "projected_hours_for_25000_steps_of_200": round(25000 * 200 / best["median"] / 3600, 3),
        "settings": {"model": f"build_resnet({args.resnet_size}, base_filters={args.base_filters})",
                     "batch_size": args.batch_size, "short_fit_steps": args.short,
                     "extra_steps": args.steps, "segments": args.segments,
                     "xla": "always (jax)" if backend == "jax" else "per variant"},
        "versions": versions("keras", "tensorflow", "jax", "jaxlib"),
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
