"""Where the time of an int8 model goes, and what bounds it (used by ``bench_edge.py``).

* ``openvino_layers``: OpenVINO's own per-layer counters (``PERF_COUNT``): time by layer
  type and by the kernel that ran it (``brgconv_avx512_core_vnni_I8`` says VNNI int8,
  ``..._amx_..`` AMX, ``jit_avx2_..`` AVX2), the share of the call the layers account for;
* ``onnxruntime_layers``: ONNX Runtime's profiler, kernel time by operator type;
* ``macs``: multiply-accumulates per image of every convolution and matrix product;
* ``sustained``: the rate the int8 model keeps up with big batches, every core and the
  throughput hint; ``bounds``: the floor a batch-1 call cannot go below on this machine,
  ``2 * MACs`` at the best rate measured per core times the cores.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path


def macs(xml_path: Path, height: int, width: int) -> int:
    """MACs per image of the IR's convolutions and matrix products, at batch 1."""
    from headpose.edge.runtimes import import_openvino

    openvino = import_openvino()
    model = openvino.Core().read_model(str(xml_path))
    model.reshape({model.inputs[0].get_any_name(): [1, height, width, 3]})
    total = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        out = list(op.get_output_partial_shape(0).to_shape())
        weights = list(op.input(1).get_partial_shape().to_shape())
        if kind == "MatMul":
            total += _product(out) * weights[0 if weights[-1] == out[-1] else -1]
        elif kind == "Convolution":  # weights [C_out, C_in, kH, kW]
            total += _product(out) * _product(weights[1:])
        else:  # [groups, C_out/g, C_in/g, kH, kW]
            total += _product(out) * _product(weights[2:])
    return total


def openvino_layers(xml_path: Path, settings: dict, image, calls: int = 50) -> dict:
    """Per-layer time of ``calls`` batch-1 calls (median call), by layer type and kernel."""
    from headpose.edge.runtimes import import_openvino

    openvino = import_openvino()
    compiled = openvino.Core().compile_model(str(xml_path), "CPU", {**settings, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    for _ in range(5):
        request.infer({0: image})
    runs = []
    for _ in range(calls):
        start = time.perf_counter()
        request.infer({0: image})
        wall = time.perf_counter() - start
        runs.append((wall, request.get_profiling_info()))
    runs.sort(key=lambda run: run[0])
    wall, layers = runs[len(runs) // 2]
    by_type, by_kernel = defaultdict(float), defaultdict(float)
    for layer in layers:
        if layer.status != layer.Status.EXECUTED:
            continue
        ms = layer.real_time.total_seconds() * 1e3
        by_type[layer.node_type] += ms
        by_kernel[layer.exec_type] += ms
    layer_ms = sum(by_type.values())
    return {"call_ms": round(wall * 1e3, 3), "layers_ms": round(layer_ms, 3),
            "outside_layers_ms": round(wall * 1e3 - layer_ms, 3),
            "by_layer_type_ms": _top(by_type), "by_kernel_ms": _top(by_kernel),
            "runtime_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()}


def onnxruntime_layers(onnx_path: Path, threads: int, image, calls: int = 50) -> dict:
    """ONNX Runtime's profiler over ``calls`` batch-1 calls: kernel time per call by operator."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(onnx_path.parent / "ort-profile")
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: image})
    start = time.perf_counter()
    for _ in range(calls):
        session.run(None, {name: image})
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op, runs = defaultdict(float), 0
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs += 1
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_op[event["args"].get("op_name", "?")] += event["dur"] / 1e3
    per_call = {op: ms / max(runs, 1) for op, ms in by_op.items()}
    kernels_ms = sum(per_call.values())
    return {"call_ms": round(wall_ms, 3), "layers_ms": round(kernels_ms, 3),
            "outside_layers_ms": round(wall_ms - kernels_ms, 3), "by_operator_ms": _top(per_call)}


def sustained(xml_path: Path, settings: dict, images, threads: int, seconds: float = 3.0) -> dict:
    """Images/s of the IR at batch 1 and batch 32, throughput hint, ``threads`` threads, async."""
    from headpose.edge.runtimes import import_openvino

    openvino = import_openvino()
    core = openvino.Core()
    result = {}
    for batch in (1, 32):
        compiled = core.compile_model(str(xml_path), "CPU", {**settings, "PERFORMANCE_HINT": "THROUGHPUT",
                                                              "INFERENCE_NUM_THREADS": threads})
        jobs = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        queue = openvino.AsyncInferQueue(compiled, jobs)
        feed = images[:batch] if len(images) >= batch else images[[i % len(images) for i in range(batch)]]
        for _ in range(jobs):  # warm-up
            queue.start_async({0: feed})
        queue.wait_all()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(jobs):
                queue.start_async({0: feed})
            queue.wait_all()
            done += jobs * batch
        result[f"batch_{batch}_images_per_s"] = round(done / (time.perf_counter() - start), 1)
        result[f"batch_{batch}_requests"] = jobs
    return result


def bounds(profile: dict, gmac: float, tf_ms: float, target: float, cores: int) -> dict:
    """The batch-1 figure against the int8 rates measured here: what a call cannot go below.

    The floor assumes every core at the best rate one thread reached at batch 1 (perfect
    scaling, no other tenant): no batch-1 call on this machine's cores is faster.
    """
    ops = 2 * gmac * 1e9
    one_thread = ops / (profile["openvino_1_thread"]["call_ms"] / 1e3) / 1e9
    all_threads = ops / (profile["openvino"]["call_ms"] / 1e3) / 1e9
    sustained = max(v for k, v in profile["sustained"].items() if k.endswith("images_per_s")) * ops / 1e9
    floor_ms = ops / (max(one_thread, sustained / cores) * cores * 1e9) * 1e3
    return {
        "gmac_per_image": round(gmac, 3),
        "batch_1_gops_1_thread": round(one_thread, 1),
        "batch_1_gops_all_threads": round(all_threads, 1),
        "sustained_gops_all_threads": round(sustained, 1),
        "floor_ms_every_core_at_best_rate": round(floor_ms, 3),
        "tensorflow_batch_1_ms": round(tf_ms, 3),
        "ms_needed_for_target": round(tf_ms / target, 3),
        "gops_needed_for_target": round(ops / (tf_ms / target / 1e3) / 1e9, 1),
        "speedup_at_floor": round(tf_ms / floor_ms, 2),
    }


def _top(values: dict, count: int = 12) -> dict:
    return {k: round(v, 3) for k, v in sorted(values.items(), key=lambda kv: -kv[1])[:count]}


def _product(values) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result
