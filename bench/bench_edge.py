"""Edge formats in their own runtimes against the TensorFlow frozen graph, in one process.

For each model size (the production ResNet-50 with 64 base filters, and the demo's
ResNet-10 with 8), random weights with trained-like batch-norm statistics (as in
``bench_freeze_inference.py``: the softmax is not saturated and folding does real work):

1. ``export_saved_model`` -> ``freeze_saved_model`` -> ``export_edge_models`` (every
   format, each conversion timed; the int8 formats are calibrated on 93 rendered synthetic
   training images);
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
   models on the real evaluation set;
5. a profile of the int8 formats (``--no-profile`` skips it): OpenVINO's and ONNX
   Runtime's per-layer time at batch 1, the int8 IR's best sustained rate on this CPU,
   and from it the floor under a batch-1 call (``bench/_edge_profile.py``). ``cpu_flags``
   records the instruction sets the kernels chose from;
6. the OpenVINO formats and TensorFlow again in a child process with oneDNN held to
   ``AVX2`` and to ``AVX512_CORE`` (``--isa``; ``bench/_edge_isa.py``): the figures of
   CPUs without VNNI, measured on this one, beside the same child uncapped (``ALL``).

Runtime settings: every format at 1, 2 and all threads (``--threads``, default the CPUs
this process may use; labels ``<format>_<n>t``), OpenVINO formats under both performance
hints as well (``..._latency``, ``..._throughput``; for those also the images/s with the
hint's number of requests in flight, ``async_images_per_s_batch_1``); ``client_default``
marks the edge client's defaults (``headpose.edge.runtimes.DEFAULT_THREADS``). TensorFlow
runs with its defaults. OpenVINO formats keep their precision hint (f32 for the FP32,
FP16 and int8 IRs, bf16 for ``openvino_bf16``).

Usage: ``python bench/bench_edge.py [--models resnet50,demo] [--reps 10] [--fit-epochs 8]``;
``--models demo --reps 2`` is a one-minute smoke run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    INCLUDE, PYTHON, child_env, cpu_flags, emit, progress, ratio_of_pairs, run_json_child, spread, versions,
)

sys.path.insert(0, str(INCLUDE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

MODELS = {"resnet50": (50, 64), "demo": (10, 8)}
OPENVINO_HINTS = ("LATENCY", "THROUGHPUT")
FASTEST_TARGET = 15.0
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


def thread_counts(cpus: int) -> list[int]:
    """1, 2 and all the CPUs this process may use (fewer where they coincide)."""
    return sorted({1, min(2, cpus), cpus})


def runners(manifest: dict, folder: Path, pb_path: Path, cpus: int) -> dict[str, dict]:
    """``{label: {"run": {batch: callable}, "settings", "format", "threads", "hint"}}``, one instance per batch.

    Every format at each of ``thread_counts``; OpenVINO formats under both performance
    hints as well (``LATENCY``: one stream, every thread on the one request; ``THROUGHPUT``:
    the threads split into streams, each request on one of them).
    """
    from headpose.artifacts.evaluate import load_frozen_graph
    from headpose.edge.runtimes import DEFAULT_THREADS, open_runner

    graph = load_frozen_graph(pb_path)
    found = {BASELINE: {"run": {1: graph, 8: graph}, "settings": {"threads": "tensorflow default"},
                        "format": None, "threads": None, "hint": None, "client_default": False}}
    for name, entry in manifest["formats"].items():
        runtime = entry["metadata"]["runtime"]
        for threads in thread_counts(cpus):
            for hint in (OPENVINO_HINTS if runtime == "openvino" else (None,)):
                metadata = dict(entry["metadata"])
                label = f"{name}_{threads}t"
                if hint:
                    metadata["runtime_settings"] = {**(metadata.get("runtime_settings") or {}),
                                                    "PERFORMANCE_HINT": hint}
                    label += f"_{hint.lower()}"
                default = DEFAULT_THREADS[runtime] or cpus
                found[label] = {
                    "run": {batch: open_runner(metadata, folder, threads) for batch in (1, 8)},
                    "settings": {"threads": threads, **(metadata.get("runtime_settings") or {})},
                    "format": name, "threads": threads, "hint": hint,
                    "client_default": threads == default and hint in (None, "LATENCY"),
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


class Timed:
    """A format's converter, timed: the conversion time of each format for the JSON."""

    def __init__(self, converter, seconds: dict):
        self.converter, self.seconds = converter, seconds

    def convert(self, source, out_dir):
        start = time.perf_counter()
        try:
            return self.converter.convert(source, out_dir)
        finally:
            self.seconds[self.converter.format] = round(time.perf_counter() - start, 2)


def export(frozen, images, folder: Path):
    from headpose.artifacts.edge.export import CONVERTERS, export_edge_models

    seconds: dict[str, float] = {}
    timed = {name: Timed(make(list(images)), seconds) for name, make in CONVERTERS.items()}
    start = time.perf_counter()
    exported = export_edge_models(frozen.pb_path, frozen.metadata, folder, list(images), converters=timed)
    seconds["all"] = round(time.perf_counter() - start, 2)
    if exported.refused:
        raise RuntimeError(f"formats refused: {exported.refused}")
    return exported, seconds


def async_throughput(found: dict, image, seconds: float = 1.5) -> dict[str, float]:
    """Images/s of each OpenVINO variant at batch 1 with its hint's number of requests in flight."""
    from headpose.edge.runtimes import import_openvino

    openvino = import_openvino()
    result = {}
    for label, runner in found.items():
        compiled = getattr(runner["run"][1], "compiled", None)
        if compiled is None:
            continue
        jobs = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        queue = openvino.AsyncInferQueue(compiled, jobs)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(jobs):
                queue.start_async({0: image})
            queue.wait_all()
            done += jobs
        result[label] = round(done / (time.perf_counter() - start), 1)
    return result


def bench_model(label: str, resnet_size: int, base_filters: int, images, args, scratch: Path) -> dict:
    folder = scratch / label
    progress(f"{label}: building and freezing ResNet-{resnet_size} ({base_filters} filters)")
    frozen = frozen_model(resnet_size, base_filters, folder, images, args.fit_epochs)
    exported, export_s = export(frozen, images, folder / "edge")
    progress(f"{label}: exported every format in {export_s['all']:.1f} s ({export_s}); loading runners")
    found = runners(exported.manifest, folder / "edge", frozen.pb_path, args.threads)
    agree = agreement(found, images)
    times = latencies(found, images, args.reps, {1: args.calls_1, 8: args.calls_8})
    in_flight = async_throughput(found, images[:1])
    formats = {}
    for name, runner in found.items():
        entry = {
            "latency_ms": {f"batch_{b}": spread([t * 1e3 for t in times[name]["mean"][b]], 3) for b in (1, 8)},
            "fastest_call_ms": {f"batch_{b}": spread([t * 1e3 for t in times[name]["fastest"][b]], 3)
                                for b in (1, 8)},
            "settings": runner["settings"], "threads": runner["threads"], "hint": runner["hint"],
            "client_default": runner["client_default"], **agree[name],
        }
        if name in in_flight:
            entry["async_images_per_s_batch_1"] = in_flight[name]
        if name != BASELINE:
            for kind, key in (("mean", "speedup_over_tensorflow"), ("fastest", "fastest_call_speedup_over_tensorflow")):
                base = times[BASELINE][kind]
                entry[key] = {f"batch_{b}": ratio_of_pairs(base[b], times[name][kind][b], 3) for b in (1, 8)}
            entry["size_bytes"] = size_of(exported.manifest, runner["format"])
            entry["precision"] = exported.manifest["formats"][runner["format"]]["precision"]
        formats[name] = entry
    result = {"formats": formats, "frozen_pb_bytes": frozen.size_bytes, "export_s": export_s,
              "median_top_probability": round(agree["median_top_probability"], 4),
              "targets": targets(formats),
              "targets_by_fastest_call": targets(formats, "fastest_call_speedup_over_tensorflow")}
    if args.profile:
        tf_ms = spread([t * 1e3 for t in times[BASELINE]["mean"][1]])["median"]
        result["profile"] = profile(exported.manifest, folder / "edge", images, args.threads, tf_ms)
    for isa in filter(None, args.isa.split(",")):
        progress(f"{label}: the OpenVINO formats with oneDNN held to {isa}")
        result.setdefault("older_cpus", {})[isa] = run_json_child(
            [PYTHON, str(Path(__file__).resolve().parent / "_edge_isa.py"), str(folder / "edge"),
             str(frozen.pb_path), str(args.reps), str(args.threads)],
            child_env(ONEDNN_MAX_CPU_ISA=isa))
    return result


def profile(manifest: dict, folder: Path, images, cpus: int, tf_ms: float) -> dict:
    """Where the int8 formats' batch-1 time goes, and the floor this CPU puts under it."""
    import _edge_profile

    progress("profiling the int8 formats")
    ov = manifest["formats"]["openvino_int8"]["metadata"]
    xml = folder / ov["model_file"]
    settings = {**ov["runtime_settings"], "INFERENCE_NUM_THREADS": cpus, "PERFORMANCE_HINT": "LATENCY"}
    found = {
        "openvino": _edge_profile.openvino_layers(xml, settings, images[:1]),
        "openvino_1_thread": _edge_profile.openvino_layers(xml, {**settings, "INFERENCE_NUM_THREADS": 1},
                                                          images[:1]),
        "onnxruntime_1_thread": _edge_profile.onnxruntime_layers(
            folder / manifest["formats"]["onnx_int8"]["metadata"]["model_file"], 1, images[:1]),
        "sustained": _edge_profile.sustained(xml, ov["runtime_settings"], images, cpus),
    }
    height, width = ov["preprocessing"]["image_size"]
    gmac = _edge_profile.macs(xml, height, width) / 1e9
    found["bounds"] = _edge_profile.bounds(found, gmac, tf_ms, FASTEST_TARGET, cpus)
    return found


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
                        help="'all threads' (default: the CPUs this process may use); every format also "
                             "runs at 1 and 2")
    parser.add_argument("--isa", default="AVX2,AVX512_CORE,ALL",
                        help="also run the OpenVINO formats with oneDNN held to each of these instruction "
                             "sets (ONEDNN_MAX_CPU_ISA), as on older CPUs, and with ALL (no cap: the same "
                             "measurement on this CPU); empty: skip (default AVX2,AVX512_CORE,ALL)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the int8 formats' per-layer profile and the sustained-rate floor")
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
        "versions": versions("tensorflow", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "openvino", "nncf"),
        "cpu_flags": cpu_flags(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
