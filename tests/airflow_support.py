"""Loading the project's DAG in tests, with Airflow pointed at a throw-away home."""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
PLUGINS = ROOT / "plugins"
INCLUDE = ROOT / "include"
DAG_ID = "headpose_retraining"

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
