"""Training speed with mixed precision and XLA on and off, on this machine, at the demo size.

The request turns mixed precision (``mixed_float16``) and XLA (``jit_compile``) on for
SageMaker GPU instance types only (``headpose.planning.request.speed_hyperparameters``).
This measures what each switch does where the demo and the local backend train: the
demo's model (``build_resnet(10, base_filters=8)``) at batch 64, compiled as the entry
point compiles it, stepped by ``model.fit`` on one batch in memory (the compute, not the
input pipeline). Each variant's images/s is divided by the float32-without-XLA
baseline's in the same segment; variants alternate order segment by segment, and
tracing and XLA compilation are excluded (``compile_s`` reports them).

The model builder, data and timing are ``bench_gpu_resnet50``'s, so the two benchmarks
measure the same thing at different sizes.

Usage: ``python bench/bench_precision.py [--batch-size 64] [--steps 20] [--segments 5]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # the entry point's backend
from _common import emit, progress, ratio_of_pairs, spread, versions  # noqa: E402
from bench_gpu_resnet50 import build, device_description, same_batch_data, segment  # noqa: E402

# variant -> (Keras dtype policy, XLA); the first is the baseline.
VARIANTS = {
    "float32": ("float32", False),
    "float32_xla": ("float32", True),
    "mixed_float16": ("mixed_float16", False),
    "mixed_float16_xla": ("mixed_float16", True),
    "mixed_bfloat16": ("mixed_bfloat16", False),
    "mixed_bfloat16_xla": ("mixed_bfloat16", True),
}
DEFAULT_VARIANTS = ["float32", "float32_xla", "mixed_float16", "mixed_float16_xla"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20,
                        help="extra steps of a segment's long fit over its short one (default 20)")
    parser.add_argument("--short", type=int, default=3, help="steps of the short fit (default 3)")
    parser.add_argument("--segments", type=int, default=5, help="segments per variant (default 5)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=DEFAULT_VARIANTS,
                        help="float32 is always measured: it is the baseline")
    parser.add_argument("--resnet-size", type=int, default=10)
    parser.add_argument("--base-filters", type=int, default=8)
    args = parser.parse_args(argv)
    names = ["float32", *[v for v in args.variants if v != "float32"]]

    import numpy as np

    device = device_description("tensorflow")
    progress(f"device: {device}")
    rng = np.random.default_rng(0)
    images = rng.random([args.batch_size, 84, 84, 3], dtype=np.float32)
    classes = rng.integers(0, 9, args.batch_size, dtype=np.int32)
    data = same_batch_data(images, classes, "tensorflow", args.short + args.steps)

    nets, compile_s = {}, {}
    for name in names:
        policy, xla = VARIANTS[name]
        start = time.perf_counter()
        nets[name] = build(policy, xla, args)
        nets[name].fit(data, epochs=1, steps_per_epoch=args.short, shuffle=False, verbose=0)
        compile_s[name] = round(time.perf_counter() - start, 1)
        progress(f"{name}: built, traced and compiled in {compile_s[name]} s "
                 f"(jit_compile in force: {bool(nets[name].jit_compile)})")
    rates: dict[str, list[float]] = {name: [] for name in nets}
    for index in range(args.segments):
        order = names if index % 2 == 0 else list(reversed(names))
        for name in order:
            rates[name].append(segment(nets[name], data, args.short, args.short + args.steps, args.batch_size))
        progress(f"segment {index + 1}/{args.segments}: " + ", ".join(
            f"{n} {v[-1]:.0f} img/s" for n, v in rates.items()))

    emit({
        "benchmark": "precision",
        "device": device,
        "figure": "over_float32",
        "over_float32": {name: ratio_of_pairs(rates[name], rates["float32"], 3)
                         for name in names if name != "float32"},
        "images_per_s": {name: spread(values, 1) for name, values in rates.items()},
        "compile_s": compile_s,
        "jit_compile_in_force": {name: bool(net.jit_compile) for name, net in nets.items()},
        "settings": {"model": f"build_resnet({args.resnet_size}, base_filters={args.base_filters})",
                     "batch_size": args.batch_size, "short_fit_steps": args.short,
                     "extra_steps": args.steps, "segments": args.segments},
        "versions": versions("keras", "tensorflow"),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
