"""Child of ``bench_edge.py``: the OpenVINO formats with oneDNN held to an older instruction set.

OpenVINO's CPU plugin (and TensorFlow's oneDNN ops) pick their kernels from the CPU's
instruction sets, up to ``ONEDNN_MAX_CPU_ISA`` when it is set before the process starts
(``AVX2``: a CPU without AVX-512 or VNNI; ``AVX512_CORE``: AVX-512 without VNNI). So one
machine gives the figures of the older CPUs for these runtimes. ONNX Runtime (MLAS) and
LiteRT (XNNPACK) have no such cap: they always use everything this CPU has, and are
left out here; so is ``openvino_bf16``: OpenVINO still sees this CPU's bf16 units and asks
oneDNN for bf16 kernels it then lacks (a CPU without them runs the bf16 hint as f32, which
is ``openvino_fp32``'s figure). Prints one JSON object: batch-1 latencies and the speed-up over TensorFlow
(median of per-repetition ratios, as ``bench_edge.py`` computes them).

Usage: ``ONEDNN_MAX_CPU_ISA=AVX2 python bench/_edge_isa.py EDGE_DIR FROZEN_PB REPS THREADS``
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import INCLUDE, ratio_of_pairs, spread  # noqa: E402

sys.path.insert(0, str(INCLUDE))
FORMATS = ("openvino_fp32", "openvino_int8")
CALLS = 10


def main(edge_dir: str, pb_path: str, reps: int, threads: int) -> dict:
    import numpy as np

    from headpose.artifacts.evaluate import load_frozen_graph
    from headpose.edge.runtimes import open_runner

    manifest = json.loads((Path(edge_dir) / "edge_models.json").read_text())
    found = {"tensorflow_frozen": load_frozen_graph(pb_path)}
    kernels = {}
    for name in FORMATS:
        runner = open_runner(manifest["formats"][name]["metadata"], edge_dir, threads)
        found[name] = runner
        kernels[name] = sorted({str(op.get_rt_info()["layerType"].astype(str)) + ":" +
                                str(op.get_rt_info()["primitiveType"].astype(str))
                                for op in runner.compiled.get_runtime_model().get_ops()
                                if "primitiveType" in op.get_rt_info()
                                and op.get_rt_info()["layerType"].astype(str) == "Convolution"})
    image = np.random.default_rng(0).random((1, 84, 84, 3), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in found}
    for run in found.values():
        for _ in range(3):
            run(image)
    names = list(found)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            for _ in range(CALLS):
                found[name](image)
            times[name].append((time.perf_counter() - start) / CALLS)
    base = times["tensorflow_frozen"]
    return {
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "threads": threads,
        "latency_ms_batch_1": {n: spread([t * 1e3 for t in times[n]], 3)["median"] for n in names},
        "speedup_over_tensorflow_batch_1": {n: ratio_of_pairs(base, times[n], 3)["median"] for n in FORMATS},
        "convolution_kernels": kernels,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
