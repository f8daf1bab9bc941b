"""Shared helpers of the benchmarks: statistics, child environments, machine facts.

Every benchmark prints one JSON object on stdout and its progress on stderr, so that
``run_all.sh`` can redirect stdout straight into ``bench/results/<name>.json``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "include"
PLUGINS = ROOT / "plugins"
DAGS = ROOT / "dags"
PYTHON = sys.executable
# Where children keep compiled bytecode. The shared development machines set
# PYTHONDONTWRITEBYTECODE, so every fresh interpreter would compile each imported module
# from source - a cost no deployment (whose images hold .pyc files) pays, and one that
# would dominate parse and start-up figures. Children write bytecode here instead of
# into the shared virtual environment.
PYCACHE = Path(os.environ.get("HEADPOSE_BENCH_PYCACHE", "/tmp/headpose-bench-pycache"))


def progress(message: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)


def spread(values: Iterable[float], digits: int = 4) -> dict:
    """Median plus the spread a reader needs to judge it: n, min, max, quartiles."""
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("no values")
    if len(data) >= 2:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    else:
        q1 = q3 = data[0]
    return {
        "median": round(statistics.median(data), digits),
        "n": len(data),
        "min": round(data[0], digits),
        "max": round(data[-1], digits),
        "q1": round(q1, digits),
        "q3": round(q3, digits),
    }


def ratio_of_pairs(numerators: list[float], denominators: list[float], digits: int = 4) -> dict:
    """Median of per-repetition ratios: each pair ran back to back, so shared noise cancels."""
    return spread([a / b for a, b in zip(numerators, denominators)], digits)


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a benchmark child: include/ and plugins/ importable, TF quiet, CPU."""
    env = bytecode_env(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join([str(INCLUDE), str(PLUGINS)])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def bytecode_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with bytecode caching on, in ``PYCACHE`` (see above)."""
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    return env


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict:
    """What the figures ran on; copied into the README table."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "load_average_1_5_15": load_average(),
    }


def cpu_flags() -> dict:
    """The /proc/cpuinfo flags that decide which int8 and bf16 kernels the runtimes pick."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "amx_tile", "amx_int8", "amx_bf16")
    return {flag: flag in flags for flag in wanted}


def versions(*modules: str) -> dict:
    """Package versions from metadata, without importing the (heavy) packages."""
    from importlib import metadata

    found = {}
    for name in modules:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def emit(result: dict) -> None:
    result.setdefault("machine", machine())
    print(json.dumps(result, indent=2, sort_keys=False))


def run_json_child(command: list[str], env: dict[str, str], cwd: Path | None = None,
                   timeout: float | None = None) -> dict:
    """Run a child that prints one JSON object as its last stdout line; return it."""
    done = subprocess.run(command, env=env, cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:3])}... failed ({done.returncode}):\n"
                           f"{done.stderr[-4000:]}\n{done.stdout[-2000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON from child:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])
