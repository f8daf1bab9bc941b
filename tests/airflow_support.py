"""Loading the project's DAG in tests, and running it with the ``airflow`` command.

Airflow is pointed at throw-away homes. ``airflow db migrate`` takes about a minute, so
a session migrates one template database (``conftest.airflow_db_template``) and each
end-to-end test copies it into its own home (``new_airflow_home``).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
PLUGINS = ROOT / "plugins"
INCLUDE = ROOT / "include"
DAG_ID = "headpose_retraining"
# The smallest model and run that still trains, freezes and validates for real: every
# whole-DAG test trains it, so its cost is paid many times.
TINY_TRAINING = {
    "resnet_size": 10,
    "base_filters": 8,
    "training_steps": 3,
    "evaluation_steps": 2,
    "batch_size": 16,
    "min_accuracy": 0,
    "min_class_recall": 0,
}
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
SYNTHETIC_CACHE_ENV = "HEADPOSE_SYNTHETIC_CACHE"

# Before anything imports airflow: never read or write the developer's ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="headpose-test-airflow-")
    atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], ignore_errors=True)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
for path in (INCLUDE, PLUGINS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def load_dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def load_dag():
    bag = load_dagbag()
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


def scheduler_dag(dag):
    """The DAG as the scheduler and API server see it (what ``create_dagrun`` runs on)."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))


def airflow_env(airflow_home: Path) -> dict[str, str]:
    """Environment for an ``airflow`` CLI subprocess on this project with its own home."""
    return {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PYTHONPATH": os.pathsep.join([str(INCLUDE), str(PLUGINS)]),
        "HEADPOSE_WORKSPACE": str(airflow_home / "workspace"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


# -- running the DAG with the airflow command --------------------------------------------

def migrate(airflow_home: Path) -> Path:
    """A migrated metadata database in ``airflow_home``; returns its file."""
    airflow_home.mkdir(parents=True, exist_ok=True)
    subprocess.run([AIRFLOW, "db", "migrate"], env=cli_env(airflow_home, "http://127.0.0.1:9"),
                   check=True, capture_output=True, timeout=900)
    return airflow_home / "airflow.db"


def new_airflow_home(template_db: Path, airflow_home: Path) -> Path:
    """``airflow_home`` with a copy of the migrated template database."""
    airflow_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_db, airflow_home / "airflow.db")
    return airflow_home


def cli_env(airflow_home: Path, endpoint: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment minus Airflow's, plus an ``aws_default`` connection to ``endpoint``."""
    from support import aws_env

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "HEADPOSE_"))}
    # The session's render cache (conftest): a run renders its synthetic dataset once per session.
    if os.environ.get(SYNTHETIC_CACHE_ENV):
        env[SYNTHETIC_CACHE_ENV] = os.environ[SYNTHETIC_CACHE_ENV]
    env["HEADPOSE_TRAINING_POLL_SECONDS"] = "1"  # moto's jobs end as soon as they start
    env.update(aws_env(endpoint))
    env.update(airflow_env(airflow_home))
    env.update(extra or {})
    return env


def dags_test_command(conf: Mapping[str, Any], logical_date: datetime | None = None) -> list[str]:
    command = [AIRFLOW, "dags", "test", DAG_ID]
    if logical_date is not None:
        command.append(logical_date.isoformat())
    return [*command, "-c", json.dumps(dict(conf))]


def dags_test(
    airflow_home: Path,
    endpoint: str,
    conf: Mapping[str, Any],
    log_name: str,
    *,
    logical_date: datetime | None = None,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 1800,
) -> subprocess.CompletedProcess:
    """One DAG run with ``airflow dags test``; its whole output is kept in ``<home>/<log_name>``."""
    result = subprocess.run(
        dags_test_command(conf, logical_date), env=cli_env(airflow_home, endpoint, extra_env),
        capture_output=True, text=True, timeout=timeout,
    )
    (airflow_home / log_name).write_text(result.stdout + "\n----- stderr -----\n" + result.stderr)
    return result


def db(airflow_home: Path) -> sqlite3.Connection:
    # The metadata DB of `airflow dags test` (SQLite by default): XComs are rows of `xcom`,
    # values JSON-encoded.
    return sqlite3.connect(airflow_home / "airflow.db")


def last_run(airflow_home: Path) -> tuple[str, str]:
    """``(run_id, state)`` of the newest run."""
    with db(airflow_home) as conn:
        return conn.execute(
            "SELECT run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (DAG_ID,)
        ).fetchone()


def run_id_of(airflow_home: Path, logical_date: datetime) -> str | None:
    """The run of ``logical_date`` (a home may hold many), or None when there is none."""
    with db(airflow_home) as conn:
        for run_id, stored in conn.execute("SELECT run_id, logical_date FROM dag_run WHERE dag_id = ?", (DAG_ID,)):
            if stored and datetime.fromisoformat(str(stored)).replace(tzinfo=timezone.utc) == logical_date:
                return run_id
    return None


def task_states(airflow_home: Path, run_id: str) -> dict[str, str]:
    with db(airflow_home) as conn:
        return dict(conn.execute(
            "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", (DAG_ID, run_id)
        ).fetchall())


def try_numbers(airflow_home: Path, run_id: str) -> dict[str, int]:
    with db(airflow_home) as conn:
        return dict(conn.execute(
            "SELECT task_id, try_number FROM task_instance WHERE dag_id = ? AND run_id = ?", (DAG_ID, run_id)
        ).fetchall())


def xcom(airflow_home: Path, task_id: str, key: str = "return_value", run_id: str | None = None):
    """One XCom value (of ``run_id``, or of the only run that has it)."""
    query = "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = ?"
    args: tuple = (DAG_ID, task_id, key)
    if run_id is not None:
        query, args = query + " AND run_id = ?", (*args, run_id)
    with db(airflow_home) as conn:
        rows = conn.execute(query, args).fetchall()
    assert len(rows) == 1, (task_id, key, rows)
    value = rows[0][0]
    return json.loads(value) if isinstance(value, (str, bytes)) else value
