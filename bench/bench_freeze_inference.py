"""Freeze cost of the ResNet-50 export, and frozen-graph inference against the SavedModel.

Steps (an untrained ``build_resnet(50, base_filters=64)``: freezing and latency do not
depend on the weights' values):

1. a child builds the model, gives its batch norms trained-like statistics (moving
   statistics of real activations, random gamma/beta: no shift is zero, so folding does
   real work, and the softmax is not saturated), and writes it with ``export_saved_model``;
2. freeze: ``freeze_saved_model`` (as the pipeline calls it, parity check included) in
   fresh children, alternating with control children that only import TF, load the
   SavedModel and run its signature once. Both report the time of their own work (TF
   import excluded) and their peak RSS (``ru_maxrss`` from ``os.wait4``). Figures:
   freeze peak RSS over the control's, freeze time over the SavedModel load time. The
   freeze child also records time and RSS after each freeze step (the profile);
3. sizes: ``frozen_model.pb`` over the SavedModel's ``variables/`` folder;
4. latency, in this process: batch 1 and batch 32 through
   - the SavedModel's ``serving_default`` signature (the baseline),
   - ``headpose.artifacts.evaluate.load_frozen_graph`` (``wrap_function`` + ``prune``, TF2 runtime),
   - a plain ``tf.compat.v1.Session`` over ``import_graph_def`` (how TF1/C consumers run it),
   on the same fixed inputs; runners are called in rotating order within each repetition
   and the figure per runner is the median of per-repetition ratios to the signature;
   each repetition times ``--calls-1`` calls at batch 1 and ``--calls-32`` at batch 32
   (means). Besides wall latency, the process CPU time per call (all threads) is
   reported as a second ratio: on a shared machine wall time mostly measures the other
   tenants, CPU time the work the graph itself does;
5. the largest absolute output difference of each frozen runner from the signature.

Usage: ``python bench/bench_freeze_inference.py [--reps 15] [--freeze-reps 2]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (INCLUDE, PYTHON, child_env, emit, progress, ratio_of_pairs,  # noqa: E402
                     run_json_child, spread, versions)

sys.path.insert(0, str(INCLUDE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

LATENCY_TARGET = 1.0
DIFF_TARGET = 1e-5

EXPORT_CODE = """
import json, sys
import numpy as np
import tensorflow as tf
from headpose.training.model import build_resnet
from headpose.training.export import export_saved_model
# Trained-like batch-norm statistics: with the initial ones (mean 0, variance 1, beta 0)
# every shift is zero and freezing would fold away work a trained model still has, and
# the untrained activations grow until the softmax saturates (diffs would read 0).
# Momentum 0 and one training-mode call set each moving statistic to the statistic of
# real activations, as training would; gamma and beta get small random values.
net = build_resnet(50, base_filters=64, batch_norm_momentum=0.0)
rng = np.random.default_rng(0)
net(tf.constant(rng.random([32, 84, 84, 3], dtype=np.float32)), training=True)
for layer in net.layers:
    if isinstance(layer, tf.keras.layers.BatchNormalization):
        n = layer.gamma.shape[0]
        layer.gamma.assign(rng.uniform(0.8, 1.2, n).astype("float32"))
        layer.beta.assign(rng.normal(0.0, 0.1, n).astype("float32"))
path = export_saved_model(net, sys.argv[1])
print(json.dumps({"saved_model_dir": str(path)}))
"""

FREEZE_CODE = """
import json, sys, time
import tensorflow as tf
import headpose.artifacts.freeze as freeze
from tensorflow.python.framework import convert_to_constants
from tensorflow.python.tools import optimize_for_inference_lib

steps = []

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

def traced(name, function):
    # Profile: time and RSS after each freeze step; VmHWM jumps at the step that peaks.
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        value = function(*args, **kwargs)
        steps.append({"step": name, "s": round(time.perf_counter() - t, 3),
                      **{k + "_mib": round(v, 1) for k, v in status().items()}})
        return value
    return wrapper

for owner, name in [(freeze, "_load_signature"), (convert_to_constants, "convert_variables_to_constants_v2"),
                    (freeze, "_rename_outputs"), (optimize_for_inference_lib, "optimize_for_inference"),
                    (freeze, "_grappler_fold_constants"), (freeze, "_conv_add_to_bias_add"),
                    (tf.compat.v1.graph_util, "extract_sub_graph"), (freeze, "_verify"),
                    (freeze, "_parity"), (freeze, "_write")]:
    setattr(owner, name, traced(name, getattr(owner, name)))
before = status()
t = time.perf_counter()
result = freeze.freeze_saved_model(sys.argv[1], sys.argv[2])
elapsed = time.perf_counter() - t
print(json.dumps({"work_s": elapsed, "rss_before_mib": round(before["VmRSS"], 1),
                  "steps": steps, **result.summary()}))
"""

CONTROL_CODE = """
import json, sys, time
import numpy as np
import tensorflow as tf
t = time.perf_counter()
loaded = tf.saved_model.load(sys.argv[1])
load_s = time.perf_counter() - t
out = loaded.signatures["serving_default"](inputs=tf.constant(np.zeros([2, 84, 84, 3], np.float32)))
print(json.dumps({"work_s": time.perf_counter() - t, "load_s": load_s}))
"""


def run_child(code: str, *args: str) -> dict:
    """Run ``python -c code args``; its JSON line plus its own peak RSS (MiB) from ``os.wait4``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen([PYTHON, "-c", code, *args], stdout=out, stderr=err,
                                   env=child_env(CUDA_VISIBLE_DEVICES=""))
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(), err.read().decode(errors="replace")
    if process.returncode:
        raise RuntimeError(f"child failed ({process.returncode}):\n{errors[-3000:]}")
    result = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def session_runner(graph_def):
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    session = tf.compat.v1.Session(graph=graph)
    fetch, feed = graph.get_tensor_by_name("softmax_tensor:0"), graph.get_tensor_by_name("inputs:0")
    return lambda images: session.run(fetch, {feed: images})


def signature_runner(saved_model_dir: str):
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_dir)
    function = loaded.signatures["serving_default"]

    def run(images):
        _ = loaded  # owns the variables
        return function(inputs=tf.constant(images))["probabilities"].numpy()

    return run


def time_call(run, images, calls: int) -> tuple[float, float]:
    """Mean wall seconds and process CPU seconds (all threads) per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        run(images)
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="latency repetitions (default 15)")
    parser.add_argument("--calls-1", type=int, default=8, help="batch-1 calls per repetition")
    parser.add_argument("--calls-32", type=int, default=1, help="batch-32 calls per repetition")
    parser.add_argument("--freeze-reps", type=int, default=2,
                        help="freeze children, each paired with a control child (default 2)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-freeze-") as scratch:
        root = Path(scratch)
        progress("exporting an untrained ResNet-50 (base_filters 64)")
        saved_model_dir = run_json_child([PYTHON, "-c", EXPORT_CODE, str(root / "model")],
                                         child_env(CUDA_VISIBLE_DEVICES=""))["saved_model_dir"]
        freezes, controls = [], []
        for rep in range(args.freeze_reps):
            order = ("freeze", "control") if rep % 2 == 0 else ("control", "freeze")
            for which in order:
                if which == "freeze":
                    freezes.append(run_child(FREEZE_CODE, saved_model_dir, str(root / f"frozen{rep}")))
                else:
                    controls.append(run_child(CONTROL_CODE, saved_model_dir))
            progress(f"freeze {rep + 1}/{args.freeze_reps}: {freezes[-1]['work_s']:.1f}s "
                     f"{freezes[-1]['peak_rss_mib']:.0f} MiB; control load {controls[-1]['load_s']:.1f}s "
                     f"{controls[-1]['peak_rss_mib']:.0f} MiB")
        pb_path = Path(freezes[-1]["pb_path"])
        variables_bytes = sum(p.stat().st_size for p in (Path(saved_model_dir) / "variables").iterdir())
        saved_model_pb_bytes = (Path(saved_model_dir) / "saved_model.pb").stat().st_size
        op_counts = json.loads(Path(freezes[-1]["json_path"]).read_text()).get("op_counts")

        import numpy as np
        import tensorflow as tf

        from headpose.artifacts.evaluate import load_frozen_graph

        progress("loading the three runners")
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(pb_path.read_bytes())
        runners = {
            "saved_model_signature": signature_runner(saved_model_dir),
            "frozen_wrap_function": load_frozen_graph(pb_path),
            "frozen_session": session_runner(graph_def),
        }
        rng = np.random.default_rng(0)
        inputs = {1: rng.random([1, 84, 84, 3], dtype=np.float32),
                  32: rng.random([32, 84, 84, 3], dtype=np.float32)}
        outputs = {name: {b: np.asarray(run(x)) for b, x in inputs.items()}
                   for name, run in runners.items()}
        output_max_probability = float(np.median(outputs["saved_model_signature"][32].max(axis=1)))
        max_diff = {
            name: float(max(np.max(np.abs(outputs[name][b] - outputs["saved_model_signature"][b]))
                            for b in inputs))
            for name in runners if name != "saved_model_signature"
        }
        for run in runners.values():  # warm-up: graph optimisation, allocator pools
            for _ in range(3):
                for x in inputs.values():
                    run(x)

        latency: dict[str, dict[int, list[float]]] = {n: {1: [], 32: []} for n in runners}
        cpu: dict[str, dict[int, list[float]]] = {n: {1: [], 32: []} for n in runners}
        names = list(runners)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                for batch, calls in ((1, args.calls_1), (32, args.calls_32)):
                    wall_s, cpu_s = time_call(runners[name], inputs[batch], calls)
                    latency[name][batch].append(wall_s)
                    cpu[name][batch].append(cpu_s)
            progress(f"latency rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{n} {latency[n][1][-1] * 1e3:.1f}/{latency[n][32][-1] * 1e3:.0f} ms" for n in names))

    base = latency["saved_model_signature"]
    ratios = {
        name: {f"batch_{b}": ratio_of_pairs(latency[name][b], base[b]) for b in (1, 32)}
        for name in runners if name != "saved_model_signature"
    }
    cpu_ratios = {
        name: {f"batch_{b}": ratio_of_pairs(cpu[name][b], cpu["saved_model_signature"][b])
               for b in (1, 32)}
        for name in runners if name != "saved_model_signature"
    }
    worst = max(r[k]["median"] for r in ratios.values() for k in r)
    result = {
        "benchmark": "freeze_inference",
        "figure": "frozen_over_saved_model_latency",
        "frozen_over_saved_model_latency": ratios,
        "latency_target_max": LATENCY_TARGET,
        "latency_meets_target": worst <= LATENCY_TARGET,
        "max_abs_diff": max_diff,
        "max_abs_diff_target": DIFF_TARGET,
        "median_top_probability_at_batch_32": round(output_max_probability, 4),
        "diff_meets_target": max(max_diff.values()) <= DIFF_TARGET,
        "frozen_over_saved_model_cpu_time": cpu_ratios,
        "cpu_ms_per_call": {name: {f"batch_{b}": spread([v * 1e3 for v in values[b]], 2)
                                   for b in (1, 32)} for name, values in cpu.items()},
        "latency_ms": {name: {f"batch_{b}": spread([v * 1e3 for v in values[b]], 2) for b in (1, 32)}
                       for name, values in latency.items()},
        "freeze": {
            "work_s": spread([f["work_s"] for f in freezes], 2),
            "peak_rss_mib": spread([f["peak_rss_mib"] for f in freezes], 1),
            "control_load_s": spread([c["load_s"] for c in controls], 2),
            "control_peak_rss_mib": spread([c["peak_rss_mib"] for c in controls], 1),
            "time_over_saved_model_load": ratio_of_pairs([f["work_s"] for f in freezes],
                                                         [c["load_s"] for c in controls], 2),
            "peak_rss_over_control": ratio_of_pairs([f["peak_rss_mib"] for f in freezes],
                                                    [c["peak_rss_mib"] for c in controls], 3),
            "node_count_before": freezes[-1]["node_count_before"],
            "node_count_after": freezes[-1]["node_count"],
            "parity_max_abs_diff": freezes[-1]["parity_max_abs_diff"],
            "profile_rss_before_mib": freezes[-1]["rss_before_mib"],
            "profile_steps": freezes[-1]["steps"],
            "op_counts": op_counts,
        },
        "sizes": {
            "frozen_pb_bytes": freezes[-1]["size_bytes"],
            "saved_model_variables_bytes": variables_bytes,
            "saved_model_pb_bytes": saved_model_pb_bytes,
            "frozen_over_variables": round(freezes[-1]["size_bytes"] / variables_bytes, 4),
        },
        "settings": {"model": "build_resnet(50, base_filters=64), untrained",
                     "reps": args.reps, "calls_at_batch_1": args.calls_1,
                     "calls_at_batch_32": args.calls_32,
                     "freeze_reps": args.freeze_reps},
        "versions": {"tensorflow": tf.__version__, **versions("keras")},
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
