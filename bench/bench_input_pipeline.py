"""Training input pipeline: images/s fed by ``shards.dataset`` over images/s on a batch in memory.

Both sides train the same compiled Keras model the way ``training/entry.py`` does
(``model.fit`` with SGD + momentum, sparse categorical cross-entropy, accuracy), in one
process. They alternate in segments (ABBA order): each segment is one ``fit`` of
``--steps`` steps whose first ``--warmup`` steps are excluded (iterator start, shuffle
buffer fill, tracing). The figure is the median over pairs of
``images/s(shards) / images/s(in-memory batch)``; the in-memory side is
``tf.data.Dataset.from_tensors(batch).repeat()``, one real batch from the shards, i.e.
the compute limit of this machine.

Profile (always reported, it explains a miss): the pipeline alone, drained without
training, gives its capacity in images/s and in CPU-seconds per image (process CPU time
over the drain, all threads); the in-memory training gives the model's CPU-seconds per
image. On a machine with few cores both draw on the same cores, so the expected ratio
is about ``compute / (compute + pipeline)`` CPU per image when both saturate the CPU.
``--variants`` also measures a vectorised prototype of the pipeline (batch first, then
one ``parse_example`` + ``decode_raw`` + flip per batch), the change proposed for
``shards.py`` if the figure misses.

Usage: ``python bench/bench_input_pipeline.py [--pairs 6] [--variants]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import INCLUDE, emit, progress, ratio_of_pairs, spread, versions  # noqa: E402

sys.path.insert(0, str(INCLUDE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the CPU figure; the GPU has its own bench

TARGET = 0.95


def write_shards(directory: Path, per_pose: int, images_per_shard: int) -> dict:
    try:
        from headpose.datasets.synthetic import write_synthetic_dataset
    except ImportError:  # before the synthetic module existed: random images
        return _write_random(directory, per_pose * 93, images_per_shard)
    manifest = write_synthetic_dataset(directory, per_pose, 1, seed=0,
                                       images_per_shard=images_per_shard)
    return {"source": "headpose.datasets.synthetic", "train": manifest["splits"]["train"]["count"]}


def _write_random(directory: Path, count: int, images_per_shard: int) -> dict:
    import numpy as np

    from headpose.training.shards import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(directory, "train", images_per_shard) as writer:
        for _ in range(count):
            writer.write(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8),
                         float(rng.choice([-30, 0, 30])), float(rng.choice([-30, 0, 30])))
    return {"source": "random ShardWriter", "train": count}


def vectorised_dataset(paths, batch_size: int, seed: int | None = None,
                       shuffle_buffer: int = 2048, image_size: int = 84):
    """Prototype of the proposed ``shards.dataset(training=True)``: per-batch parsing.

    Same files, shuffling, augmentation and output as ``shards.dataset``; the per-record
    ``map`` calls (three of them, each a function call and a small tensor per image)
    become one ``map`` over a batch of serialised records.
    """
    import tensorflow as tf

    from headpose.training import shards

    files = [str(p) for p in paths]
    autotune = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                       num_parallel_calls=autotune, deterministic=False)
    ds = ds.shuffle(shuffle_buffer, seed=seed)
    ds = ds.batch(batch_size, drop_remainder=True)

    def parse_batch(records):
        parsed = tf.io.parse_example(records, shards._FEATURES)
        images = tf.reshape(tf.io.decode_raw(parsed["image"], tf.uint8),
                            [-1, image_size, image_size, 3])
        flip = tf.random.uniform([tf.shape(images)[0]]) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
        pan = tf.where(flip, -parsed["pan"], parsed["pan"])
        return tf.cast(images, tf.float32) / 255.0, shards.class_of(parsed["tilt"], pan)

    return ds.map(parse_batch, num_parallel_calls=autotune).prefetch(autotune)


def build_model(resnet_size: int, base_filters: int, batch_size: int):
    import tensorflow as tf

    from headpose.training import model

    net = model.build_resnet(resnet_size, base_filters)
    net.compile(
        optimizer=tf.keras.optimizers.SGD(learning_rate=0.1 * batch_size / 128, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return net


def timed_fit(net, dataset, steps: int, warmup: int, batch_size: int) -> float:
    """images/s of one ``fit`` over steps ``warmup+1 .. steps``."""
    import tensorflow as tf

    stamps: list[float] = []

    class Stamp(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

    net.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[Stamp()])
    return (steps - warmup) * batch_size / (stamps[-1] - stamps[warmup - 1])


def drain(dataset, batches: int, warmup: int, batch_size: int) -> dict:
    """The pipeline alone: images/s and process CPU-seconds per image."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images_per_s": batches * batch_size / wall,
            "cpu_s_per_image": cpu / (batches * batch_size)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6, help="ABBA pairs of segments (default 6)")
    parser.add_argument("--steps", type=int, default=32, help="steps per segment (default 32)")
    parser.add_argument("--warmup", type=int, default=6, help="excluded steps per segment (default 6)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resnet-size", type=int, default=10)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--per-pose", type=int, default=12,
                        help="synthetic training images per pose (93 poses; default 12)")
    parser.add_argument("--images-per-shard", type=int, default=256)
    parser.add_argument("--variants", action="store_true",
                        help="also measure the vectorised prototype pipeline")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error("need 1 <= --warmup < --steps")

    import tensorflow as tf

    from headpose.training import shards

    with tempfile.TemporaryDirectory(prefix="bench-input-") as scratch:
        progress("writing shards")
        data = write_shards(Path(scratch), args.per_pose, args.images_per_shard)
        paths = shards.shard_paths(scratch, "train")
        pipeline = shards.dataset(paths, args.batch_size, training=True, seed=0)
        batch = next(iter(pipeline))
        in_memory = tf.data.Dataset.from_tensors(batch).repeat()
        sources = {"shards": pipeline, "in_memory": in_memory}
        if args.variants:
            sources["vectorised"] = vectorised_dataset(paths, args.batch_size, seed=0)

        tf.keras.utils.set_random_seed(0)
        net = build_model(args.resnet_size, args.base_filters, args.batch_size)
        progress("warming up (tracing the train step)")
        timed_fit(net, in_memory, args.warmup + 2, args.warmup, args.batch_size)

        rates: dict[str, list[float]] = {name: [] for name in sources}
        for pair in range(args.pairs):
            order = list(sources) if pair % 2 == 0 else list(reversed(sources))
            for name in order:
                rates[name].append(timed_fit(net, sources[name], args.steps, args.warmup,
                                             args.batch_size))
            progress(f"pair {pair + 1}/{args.pairs}: " + ", ".join(
                f"{name} {values[-1]:.1f} img/s" for name, values in rates.items()))

        progress("profiling: pipeline alone, and compute CPU per image")
        drain_batches = max(20, args.steps)
        capacity = {name: drain(sources[name], drain_batches, args.warmup, args.batch_size)
                    for name in sources if name != "in_memory"}
        cpu = time.process_time()
        wall = time.perf_counter()
        compute_rate = timed_fit(net, in_memory, args.steps, args.warmup, args.batch_size)
        compute_cpu_per_image = (time.process_time() - cpu) / (args.steps * args.batch_size)
        wall = time.perf_counter() - wall

    ratio = ratio_of_pairs(rates["shards"], rates["in_memory"])
    profile = {
        "compute_cpu_s_per_image": round(compute_cpu_per_image, 6),
        "compute_cpu_utilisation": round(compute_cpu_per_image * args.steps * args.batch_size
                                         / wall / (os.cpu_count() or 1), 3),
    }
    for name, values in capacity.items():
        profile[f"{name}_alone_images_per_s"] = round(values["images_per_s"], 1)
        profile[f"{name}_cpu_s_per_image"] = round(values["cpu_s_per_image"], 6)
        profile[f"{name}_predicted_ratio_if_cpu_bound"] = round(
            compute_cpu_per_image / (compute_cpu_per_image + values["cpu_s_per_image"]), 3)
    result = {
        "benchmark": "input_pipeline",
        "method": "same process, same compiled model, model.fit segments alternating ABBA; "
                  f"first {args.warmup} of {args.steps} steps of each segment excluded",
        "figure": "shards_over_in_memory",
        "shards_over_in_memory": ratio,
        "target_min": TARGET,
        "meets_target": ratio["median"] >= TARGET,
        "images_per_s": {name: spread(values, 1) for name, values in rates.items()},
        "profile": profile,
        "settings": {"resnet_size": args.resnet_size, "base_filters": args.base_filters,
                     "batch_size": args.batch_size, "data": data,
                     "shards": len(paths), "tf_threads_intra_inter": [
                         tf.config.threading.get_intra_op_parallelism_threads(),
                         tf.config.threading.get_inter_op_parallelism_threads()]},
        "versions": {"tensorflow": tf.__version__, **versions("keras")},
    }
    if args.variants:
        result["vectorised_over_in_memory"] = ratio_of_pairs(rates["vectorised"], rates["in_memory"])
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
