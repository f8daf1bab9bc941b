"""``airflow dags test`` several times in one interpreter.

Each run is the real command - the ``airflow`` CLI's own parser and ``dags test``
function - but Airflow, the sagemaker SDK and TensorFlow are imported once for all of
them instead of once per run (about a minute each on a busy two-core machine).

Usage: ``python dags_test_batch.py <runs.json>`` where the file holds
``[{"name": ..., "logical_date": <ISO>, "conf": {...}}, ...]``, or entries
``{"name": ..., "argv": [...]}`` for any other ``airflow`` command (``tasks test`` of one
task of an existing run, as a person clearing it would have it run again), or
``{"name": ..., "call": "module:function", "kwargs": {...}}`` for a Python step in this
process (preparing what the runs expect: it imports what the runs import). An entry's
``"env"`` is set for that run alone (its own AWS endpoint, profile or retry settings):
``dags test`` parses the DAG file again for every run and tasks read the environment when
they run, so each run sees its own. Each run's output is framed by ``BEGIN_RUN <name>``
and ``END_RUN <name> exit=<code>`` lines.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

# The call entries' modules import the tests' support, which needs scripts/embedded.py (as conftest does).
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "scripts"))

from airflow import configuration  # noqa: F401,E402  (first, as airflow.__main__ does)
from airflow.cli import cli_parser  # noqa: E402

BEGIN, END = "BEGIN_RUN", "END_RUN"
DAG_ID = "headpose_retraining"


@contextmanager
def environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``changes`` (None removes a name) for the block, then as before."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _call(target: str, kwargs: Mapping[str, object]) -> None:
    import importlib

    module, function = target.split(":")
    getattr(importlib.import_module(module), function)(**kwargs)


def main(spec_path: str) -> int:
    runs = json.loads(Path(spec_path).read_text())
    parser = cli_parser.get_parser()
    for run in runs:
        print(f"{BEGIN} {run['name']}", flush=True)
        argv = run.get("argv") or ["dags", "test", run.get("dag_id", DAG_ID), run.get("logical_date", ""),
                                   "-c", json.dumps(run.get("conf"))]
        with environment(run.get("env") or {}):
            try:
                if "call" in run:
                    _call(run["call"], run.get("kwargs") or {})
                else:
                    args = parser.parse_args(argv)
                    args.func(args)
                code = 0
            except SystemExit as exit_:  # "DagRun failed", or a refused conf
                code = exit_.code if isinstance(exit_.code, int) else 1
                print(exit_.code, flush=True)
            except Exception:
                traceback.print_exc()
                code = 2
        sys.stderr.flush()
        print(f"{END} {run['name']} exit={code}", flush=True)
    return 0


def split_output(output: str) -> dict[str, tuple[str, int]]:
    """``{name: (that run's output, exit code)}`` from the batch's whole output."""
    runs, name, lines = {}, None, []
    for line in output.splitlines():
        if line.startswith(BEGIN + " "):
            name, lines = line.split(" ", 1)[1], []
        elif line.startswith(END + " ") and name is not None:
            runs[name] = ("\n".join(lines), int(line.rsplit("exit=", 1)[1]))
            name = None
        elif name is not None:
            lines.append(line)
    return runs


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
