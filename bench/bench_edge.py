"""Edge formats in their own runtimes against the TensorFlow frozen graph, in one process.

For each model size (the production ResNet-50 with 64 base filters, and the demo's
ResNet-10 with 8), random weights with trained-like batch-norm statistics (as in
``bench_freeze_inference.py``: the softmax is not saturated and folding does real work):

1. ``export_saved_model`` -> ``freeze_saved_model`` -> ``export_edge_models`` (every
   format; the int8 model is calibrated on 93 rendered synthetic training images);
2. model size of each format (its files) and of the frozen graph;
3. latency at batch 1 and batch 8 of every format in its runtime and of the frozen graph
   (``load_frozen_graph``, TensorFlow's own runtime), on the same rendered images: each
   repetition times ``--calls-1`` calls at batch 1 and ``--calls-8`` at batch 8 of every
   runner, in rotating order; a runner's figure is the median of its per-repetition
   speed-ups over TensorFlow (TF time / its time), so shared-machine noise cancels.
   Each call is timed alone, and the same ratio is also given for each repetition's
   fastest call, the figure least disturbed by other tenants of a shared machine;
4. agreement with TensorFlow on 88 of those images: the largest probability difference
   and the share of images with the same top class. With random weights accuracy cannot
   be measured; a format "holds accuracy" here when at most 2 of the 88 top classes
   differ (DESIGN.md's tolerance for a tiny evaluation set). Validation judges real
   models on the real evaluation set.

Runtime settings (``threads`` = the CPUs this process may use, 2 here), each measured
so that the edge client's defaults (``headpose.edge.runtimes.DEFAULT_THREADS``) rest on it:

* TensorFlow: its defaults (intra-op threads = cores);
* ONNX Runtime: ``intra_op_num_threads`` = threads (its own default, one per physical
  core, is the same here) and the ``_1_thread`` variant, the client's default;
* LiteRT: ``num_threads`` = threads and the ``_1_thread`` variant, the client's default;
* OpenVINO: its defaults (all cores, ``PERFORMANCE_HINT=LATENCY``, one stream) with the
  format's precision hint: f32 for the FP32 and FP16 IRs, bf16 for ``openvino_bf16`` (the
  CPU plugin's own default on a CPU with bf16 units).

Usage: ``python bench/bench_edge.py [--models resnet50,demo] [--reps 10]``; ``--models demo
--reps 2`` is a 30-second smoke run.
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
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

MODELS = {"resnet50": (50, 64), "demo": (10, 8)}
FASTEST_TARGET = 5.0
FLOAT32_TARGET = 1.5
AGREEMENT_IMAGES = 88
MAX_DISAGREEING = 2
BASELINE = "tensorflow_frozen"


def frozen_model(resnet_size: int, base_filters: int, folder: Path, images=None, fit_epochs: int = 0):
    """A frozen graph of a ResNet with trained-like batch-norm statistics.

    With ``fit_epochs``, the network first learns ``images`` (the rendered poses) by heart:
    a confident model on those images, as a trained one is on its own data, so that the
    top-class agreement of reduced precision says something (a random network's nine
    probabilities are nearly equal, and any rounding reorders them).
    """
    import numpy as np
    import tensorflow as tf

    from headpose.artifacts.freeze import freeze_saved_model
    from headpose.training.export import export_saved_model
    from headpose.training.model import build_resnet

    tf.keras.utils.set_random_seed(0)
    net = build_resnet(resnet_size, base_filters=base_filters, batch_norm_momentum=0.0)
    rng = np.random.default_rng(0)
    if fit_epochs:
        net.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        net.fit(images, pose_classes(), batch_size=31, epochs=fit_epochs, verbose=0)
        net(tf.constant(images), training=True)  # momentum 0: the statistics of these images
        return freeze_saved_model(export_saved_model(net, folder / "model"), folder / "frozen")
    net(tf.constant(rng.random([32, 84, 84, 3], dtype=np.float32)), training=True)
    for layer in net.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.8, 1.2, n).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.1, n).astype("float32"))
    return freeze_saved_model(export_saved_model(net, folder / "model"), folder / "frozen")


def pose_classes():
    """The class of each rendered image (``render_round`` draws the poses in this order)."""
    import numpy as np

    from headpose.datasets.synthetic import prima_poses
    from headpose.training import labels

    return np.array([labels.class_index(labels.normalise(t), labels.normalise(p)) for t, p in prima_poses()])


def rendered_images():
    """The 93 images of the synthetic set's first training round, float32 in [0, 1]."""
    from headpose.datasets.synthetic import render_round

    return render_round(0, "train", 0).astype("float32") / 255.0


def runners(manifest: dict, folder: Path, pb_path: Path, threads: int) -> dict[str, dict]:
    """``{name: {"run": {batch: callable}, "settings": {...}, "format": ...}}``, one instance per batch size."""
    from headpose.artifacts.evaluate import load_frozen_graph
    from headpose.edge.runtimes import open_runner

    graph = load_frozen_graph(pb_path)
    found = {BASELINE: {"run": {1: graph, 8: graph}, "settings": {"threads": "tensorflow default"},
                        "format": None}}
    variants = [(name, name, threads) for name in manifest["formats"]]
    variants += [(f"{name}_1_thread", name, 1) for name in ("onnx", "litert_float32", "litert_int8")]
    for label, name, count in variants:
        metadata = manifest["formats"][name]["metadata"]
        runtime_threads = None if metadata["runtime"] == "openvino" else count
        found[label] = {
            "run": {batch: open_runner(metadata, folder, runtime_threads) for batch in (1, 8)},
            "settings": {"threads": runtime_threads or "runtime default (all cores)",
                         **(metadata.get("runtime_settings") or {})},
            "format": name,
        }
    return found


def agreement(found: dict, images) -> dict[str, dict]:
    """Largest probability difference and top-class agreement with TensorFlow, batch 8."""
    import numpy as np

    batches = [images[i:i + 8] for i in range(0, AGREEMENT_IMAGES, 8)]
    outputs = {name: np.concatenate([r["run"][8](b) for b in batches]) for name, r in found.items()}
    reference = outputs[BASELINE]
    result = {}
    for name, values in outputs.items():
        same = int((values.argmax(axis=1) == reference.argmax(axis=1)).sum())
        result[name] = {"max_abs_diff": float(np.max(np.abs(values - reference))),
                        "top1_agreement": same / len(reference),
                        "holds_accuracy": len(reference) - same <= MAX_DISAGREEING}
    result["median_top_probability"] = float(np.median(reference.max(axis=1)))
    return result


def latencies(found: dict, images, reps: int, calls: dict[int, int]) -> dict[str, dict[str, dict[int, list]]]:
    """Per repetition, each runner's mean and fastest call (s) at batch 1 and 8.

    The fastest call is the steadier figure on a shared machine: it is the call that got
    the cores it asked for, where the mean also counts the time other tenants took.
    """
    inputs = {1: images[:1], 8: images[:8]}
    for runner in found.values():  # warm-up: compilation, allocator pools, thread start-up
        for batch, x in inputs.items():
            for _ in range(3):
                runner["run"][batch](x)
    times = {name: {"mean": {1: [], 8: []}, "fastest": {1: [], 8: []}} for name in found}
    names = list(found)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            for batch, x in inputs.items():
                run, durations = found[name]["run"][batch], []
                for _ in range(calls[batch]):
                    start = time.perf_counter()
                    run(x)
                    durations.append(time.perf_counter() - start)
                times[name]["mean"][batch].append(sum(durations) / len(durations))
                times[name]["fastest"][batch].append(min(durations))
        progress(f"rep {rep + 1}/{reps}: " + ", ".join(
            f"{n} {times[n]['mean'][1][-1] * 1e3:.1f}/{times[n]['mean'][8][-1] * 1e3:.1f} ms" for n in names))
    return times


def size_of(manifest: dict, name: str) -> int:
    return sum(ref["size_bytes"] for ref in manifest["formats"][name]["files"].values())


def bench_model(label: str, resnet_size: int, base_filters: int, images, args, scratch: Path) -> dict:
    from headpose.artifacts.edge.export import export_edge_models

    folder = scratch / label
    progress(f"{label}: building and freezing ResNet-{resnet_size} ({base_filters} filters)")
    frozen = frozen_model(resnet_size, base_filters, folder, images, args.fit_epochs)
    start = time.perf_counter()
    exported = export_edge_models(frozen.pb_path, frozen.metadata, folder / "edge", list(images))
    export_s = time.perf_counter() - start
    if exported.refused:
        raise RuntimeError(f"formats refused: {exported.refused}")
    progress(f"{label}: exported every format in {export_s:.1f} s; loading runners")
    found = runners(exported.manifest, folder / "edge", frozen.pb_path, args.threads)
    agree = agreement(found, images)
    times = latencies(found, images, args.reps, {1: args.calls_1, 8: args.calls_8})
    formats = {}
    for name, runner in found.items():
        entry = {
            "latency_ms": {f"batch_{b}": spread([t * 1e3 for t in times[name]["mean"][b]], 3) for b in (1, 8)},
            "fastest_call_ms": {f"batch_{b}": spread([t * 1e3 for t in times[name]["fastest"][b]], 3)
                                for b in (1, 8)},
            "settings": runner["settings"], **agree[name],
        }
        if name != BASELINE:
            for kind, key in (("mean", "speedup_over_tensorflow"), ("fastest", "fastest_call_speedup_over_tensorflow")):
                base = times[BASELINE][kind]
                entry[key] = {f"batch_{b}": ratio_of_pairs(base[b], times[name][kind][b], 3) for b in (1, 8)}
            entry["size_bytes"] = size_of(exported.manifest, runner["format"])
            entry["precision"] = exported.manifest["formats"][runner["format"]]["precision"]
        formats[name] = entry
    return {"formats": formats, "frozen_pb_bytes": frozen.size_bytes, "export_s": round(export_s, 2),
            "median_top_probability": round(agree["median_top_probability"], 4),
            "targets": targets(formats),
            "targets_by_fastest_call": targets(formats, "fastest_call_speedup_over_tensorflow")}


def targets(formats: dict, key: str = "speedup_over_tensorflow") -> dict:
    """The fastest format that holds accuracy, the best float32 one, at batch 1, against the targets."""
    def speed(name: str) -> float:
        return formats[name][key]["batch_1"]["median"]

    candidates = [n for n in formats if n != BASELINE and formats[n]["holds_accuracy"]]
    float32 = [n for n in candidates if formats[n]["precision"] == "float32"]
    fastest = max(candidates, key=speed, default=None)
    best_float = max(float32, key=speed, default=None)
    return {
        "fastest_holding_accuracy": fastest, "fastest_speedup_batch_1": speed(fastest) if fastest else None,
        "fastest_target": FASTEST_TARGET, "fastest_meets_target": bool(fastest) and speed(fastest) >= FASTEST_TARGET,
        "best_float32": best_float, "best_float32_speedup_batch_1": speed(best_float) if best_float else None,
        "float32_target": FLOAT32_TARGET,
        "float32_meets_target": bool(best_float) and speed(best_float) >= FLOAT32_TARGET,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: resnet50, demo")
    parser.add_argument("--reps", type=int, default=10, help="latency repetitions (default 10)")
    parser.add_argument("--calls-1", type=int, default=10, help="batch-1 calls per repetition (default 10)")
    parser.add_argument("--calls-8", type=int, default=4, help="batch-8 calls per repetition (default 4)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="runtime threads for ONNX Runtime and LiteRT (default: the CPUs available)")
    parser.add_argument("--fit-epochs", type=int, default=0,
                        help="first fit the network to the rendered images for this many epochs "
                             "(default 0: random weights)")
    args = parser.parse_args(argv)
    images = rendered_images()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as scratch:
        for label in args.models.split(","):
            results[label] = bench_model(label, *MODELS[label], images, args, Path(scratch))
    headline = {label: {name: entry["speedup_over_tensorflow"]["batch_1"]["median"]
                        for name, entry in r["formats"].items() if name != BASELINE}
                for label, r in results.items()}
    emit({
        "benchmark": "edge",
        "figure": "speedup_over_tensorflow_batch_1",
        "speedup_over_tensorflow_batch_1": headline,
        "meets_target": all(r["targets"]["fastest_meets_target"] and r["targets"]["float32_meets_target"]
                            for r in results.values()),
        "models": results,
        "settings": {"reps": args.reps, "fit_epochs": args.fit_epochs, "calls_at_batch_1": args.calls_1, "calls_at_batch_8": args.calls_8,
                     "threads": args.threads, "agreement_images": AGREEMENT_IMAGES,
                     "models": {k: f"build_resnet({v[0]}, base_filters={v[1]}), "
                                   + (f"fit {args.fit_epochs} epochs to the rendered images" if args.fit_epochs
                                      else "untrained") for k, v in MODELS.items()}},
        "versions": versions("tensorflow", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "openvino"),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
