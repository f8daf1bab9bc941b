"""DAG parse cost: ``dags/headpose_retraining.py`` over an EmptyOperator DAG of the same shape.

How Airflow 3.3's DAG processor parses a file (``airflow/dag_processing/processor.py``):
the manager imports the ``airflow.*`` modules the file names
(``[dag_processor] parsing_pre_import_modules``, on by default), then forks a child that
fills a ``BundleDagBag(dag_folder=<file>, bundle_path=..., load_op_links=False)`` and
serialises each DAG with ``DagSerialization.to_dict``. (``airflow.models.dagbag`` only
holds the database-backed ``DBDagBag`` in Airflow 3; the file-parsing bag lives in
``airflow.dag_processing.dagbag``.)

This benchmark does the same. A runner process imports Airflow and the processor module
once; for every repetition it forks a fresh child, which imports the file's ``airflow.*``
modules (untimed: the manager has them already) and then times the bag fill and the
serialisation - interpreter start and the Airflow import are never in the figure. The
baseline is generated from the real DAG (same dag_id, task ids, dependencies, teardown,
params, tags, docs) with every task an ``EmptyOperator``. The variants run in rotating
order within one invocation; the figure is the median of per-round ratios.

Profile: each child reports the modules its parse imported, by package. A third variant,
``real_operator_imports_preloaded``, parses the real file with the ``airflow.*`` modules
that ``plugins/headpose_operators`` imports also preloaded - what the manager would do if
the DAG file named them itself - to measure the fix for a parse-time import cost.

Usage: ``python bench/bench_parse.py [--rounds 8]``.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DAGS, PLUGINS, PYTHON, ROOT, child_env, emit, progress,  # noqa: E402
                     ratio_of_pairs, spread, versions)

DAG_FILE = DAGS / "headpose_retraining.py"
TARGET = 1.2
FORBIDDEN_AT_PARSE = ("tensorflow", "numpy", "sagemaker", "keras")


# ---------------------------------------------------------------- runner (forks per job)
def runner() -> None:
    """Read one JSON job per stdin line, answer one JSON line each; every job in a fork."""
    import airflow  # noqa: F401
    from airflow.dag_processing import processor  # noqa: F401  (what the manager has loaded)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the parse child, as the DAG processor's
            os.close(read_end)
            try:
                answer = _job(job)
            except BaseException as error:  # report, never fall back into the loop
                answer = {"error": f"{type(error).__name__}: {error}"}
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(answer))
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as answer_in:
            answer = answer_in.read()
        os.waitpid(pid, 0)
        print(answer, flush=True)


def _job(job: dict) -> dict:
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.file import iter_airflow_imports

    for module in [*iter_airflow_imports(job["file"]), *job.get("preload", [])]:
        importlib.import_module(module)
    before = set(sys.modules)
    t0 = time.perf_counter()
    bag = BundleDagBag(dag_folder=job["file"], bundle_path=Path(job["bundle"]),
                       bundle_name="dags-folder", load_op_links=False)
    t1 = time.perf_counter()
    serialised = [DagSerialization.to_dict(dag) for dag in bag.dags.values()]
    t2 = time.perf_counter()
    if bag.import_errors or not bag.dags:
        return {"error": f"parse failed: {bag.import_errors}"}
    if job.get("describe"):
        return _describe(next(iter(bag.dags.values())))
    new = set(sys.modules) - before
    return {
        "parse_s": t1 - t0,
        "serialise_s": t2 - t1,
        "parse_and_serialise_s": t2 - t0,
        "serialised_bytes": len(json.dumps(serialised, default=str)),
        "new_modules": len(new),
        "new_modules_by_package": dict(Counter(_package(m) for m in new).most_common(12)),
        "forbidden_imported": sorted({m.split(".")[0] for m in new} & set(FORBIDDEN_AT_PARSE)),
    }


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "airflow" and len(parts) > 2 and parts[1] == "providers":
        return ".".join(parts[:4])  # airflow.providers.amazon.aws
    return ".".join(parts[:2]) if parts[0] == "airflow" else parts[0]


def _describe(dag) -> dict:
    params = {}
    for name in dag.params.keys():
        param = dag.params.get_param(name)
        params[name] = {"default": param.value, "description": param.description,
                        "schema": {k: v for k, v in param.schema.items() if k != "description"}}
    return {
        "dag_id": dag.dag_id,
        "doc_md": dag.doc_md,
        "tags": sorted(dag.tags),
        "max_active_runs": dag.max_active_runs,
        "catchup": dag.catchup,
        "params": params,
        # Retries and their delays are set per task (headpose.planning.scheduling), so per task here.
        "tasks": [
            {"task_id": t.task_id, "upstream": sorted(t.upstream_task_ids),
             "is_teardown": bool(t.is_teardown), "has_outlets": bool(t.outlets),
             "retries": t.retries, "retry_delay_s": t.retry_delay.total_seconds()}
            for t in dag.tasks
        ],
    }


class Runner:
    """The bench's handle on the runner process."""

    def __init__(self, env: dict[str, str]):
        self.process = subprocess.Popen([PYTHON, __file__, "--runner"], env=env, cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the parse runner exited")
            if line.startswith("{"):
                answer = json.loads(line)
                if "error" in answer:
                    raise RuntimeError(answer["error"])
                return answer

    def run(self, **job) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


# ------------------------------------------------------------------------------- bench
def baseline_source(shape: dict) -> str:
    """A DAG file with the real DAG's shape and params, every task an EmptyOperator."""
    lines = [
        f"__doc__ = {shape['doc_md'] or ''!r}",
        "from datetime import datetime, timedelta, timezone",
        "",
        "from airflow.providers.standard.operators.empty import EmptyOperator",
        "from airflow.sdk import DAG, Asset, Param",
        "",
        "with DAG(",
        f"    dag_id={shape['dag_id']!r},",
        "    schedule=None,",
        "    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),",
        f"    catchup={shape['catchup']!r},",
        f"    max_active_runs={shape['max_active_runs']!r},",
        f"    tags={shape['tags']!r},",
        "    doc_md=__doc__,",
        "    params={",
    ]
    for name, param in shape["params"].items():
        lines.append(f"        {name!r}: Param({param['default']!r}, description={param['description']!r}, "
                     f"**{param['schema']!r}),")
    lines += ["    },", ") as dag:"]
    for task in shape["tasks"]:
        extra = ", outlets=[Asset(name='headpose_frozen_model')]" if task["has_outlets"] else ""
        lines.append(f"    {task['task_id']} = EmptyOperator(task_id={task['task_id']!r}, "
                     f"retries={task['retries']!r}, "
                     f"retry_delay=timedelta(seconds={task['retry_delay_s']!r}){extra})")
    for task in shape["tasks"]:
        if task["is_teardown"]:
            lines.append(f"    {task['task_id']}.as_teardown()")
        for upstream in task["upstream"]:
            lines.append(f"    {upstream} >> {task['task_id']}")
    return "\n".join(lines) + "\n"


def operator_airflow_imports() -> list[str]:
    """The top-level ``airflow.*`` imports of ``plugins/headpose_operators``."""
    modules = set()
    for path in sorted((PLUGINS / "headpose_operators").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("airflow."):
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules.update(a.name for a in node.names if a.name.startswith("airflow."))
    return sorted(modules)


def _shape_key(shape: dict):
    return ([(t["task_id"], t["upstream"], t["is_teardown"]) for t in shape["tasks"]],
            sorted(shape["params"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8,
                        help="rounds; each parses every variant once, in rotating order (default 8)")
    parser.add_argument("--runner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runner:
        runner()
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-parse-") as scratch:
        scratch_path = Path(scratch)
        env = child_env(
            AIRFLOW_HOME=str(scratch_path / "airflow"),
            AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
            AIRFLOW__CORE__PLUGINS_FOLDER=str(PLUGINS),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__UNIT_TEST_MODE="False",
        )
        progress("starting the runner (imports Airflow once)")
        run = Runner(env)
        try:
            shape = run.run(file=str(DAG_FILE), bundle=str(DAGS), describe=True)
            baseline_dir = scratch_path / "baseline_dags"
            baseline_dir.mkdir()
            baseline = baseline_dir / "headpose_retraining_empty.py"
            baseline.write_text(baseline_source(shape))
            if _shape_key(run.run(file=str(baseline), bundle=str(baseline_dir), describe=True)) \
                    != _shape_key(shape):
                raise SystemExit("the generated baseline does not have the real DAG's shape")
            preload = operator_airflow_imports()
            variants = {
                "real": {"file": str(DAG_FILE), "bundle": str(DAGS)},
                "empty": {"file": str(baseline), "bundle": str(baseline_dir)},
                "real_operator_imports_preloaded": {"file": str(DAG_FILE), "bundle": str(DAGS),
                                                    "preload": preload},
            }
            for job in variants.values():  # page cache and .pyc files warm, not measured
                run.run(**job)
            results: dict[str, list[dict]] = {name: [] for name in variants}
            names = list(variants)
            for index in range(args.rounds):
                shift = index % len(names)
                for name in names[shift:] + names[:shift]:
                    results[name].append(run.run(**variants[name]))
                progress(f"round {index + 1}/{args.rounds}: " + ", ".join(
                    f"{n} {r[-1]['parse_and_serialise_s']:.3f}s" for n, r in results.items()))
        finally:
            run.close()

    def col(name: str, key: str) -> list[float]:
        return [r[key] for r in results[name]]

    ratio = ratio_of_pairs(col("real", "parse_and_serialise_s"), col("empty", "parse_and_serialise_s"))
    fixed = "real_operator_imports_preloaded"
    result = {
        "benchmark": "dag_parse",
        "method": "runner imports Airflow + the processor module once, forks a fresh child per "
                  "parse; child imports the file's airflow.* modules untimed "
                  "(parsing_pre_import_modules), then times BundleDagBag fill + "
                  "DagSerialization.to_dict; variants in rotating order",
        "figure": "parse_and_serialise_ratio",
        "parse_and_serialise_ratio": ratio,
        "target_max": TARGET,
        "meets_target": ratio["median"] <= TARGET,
        "parse_only_ratio": ratio_of_pairs(col("real", "parse_s"), col("empty", "parse_s")),
        "seconds": {name: {key: spread(col(name, key)) for key in
                           ("parse_s", "serialise_s", "parse_and_serialise_s")}
                    for name in results},
        "new_modules_during_parse": {name: r[-1]["new_modules"] for name, r in results.items()},
        "real_new_modules_by_package": results["real"][-1]["new_modules_by_package"],
        "forbidden_imported_at_parse": results["real"][-1]["forbidden_imported"],
        "with_operator_imports_preloaded": {
            "preloaded": preload,
            "parse_and_serialise_ratio": ratio_of_pairs(col(fixed, "parse_and_serialise_s"),
                                                        col("empty", "parse_and_serialise_s")),
            "new_modules_by_package": results[fixed][-1]["new_modules_by_package"],
        },
        "tasks": len(shape["tasks"]),
        "params": len(shape["params"]),
        "versions": versions("apache-airflow", "apache-airflow-task-sdk",
                             "apache-airflow-providers-amazon"),
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
