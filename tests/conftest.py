"""Shared fixtures: the import path, a real moto server on loopback, a migrated Airflow DB,
and the slow shared work (the native stack) that starts in the background with the test loop."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))  # embedded.py: the moto launcher of the demo and tests
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests' deployment bucket: there is no built-in one (plan_run refuses a run naming none;
# tests of that refusal remove this). Subprocess runs get their own environment (cli_env).
os.environ.setdefault("HEADPOSE_S3_BUCKET", "headpose-tests")
# One render of each synthetic dataset per session, shared by every run and test that
# stages it (checked by its sha256s, as the demo's cache is). A developer may point it at
# a folder that outlives the session.
if not os.environ.get("HEADPOSE_SYNTHETIC_CACHE"):
    import atexit
    import shutil
    import tempfile

    os.environ["HEADPOSE_SYNTHETIC_CACHE"] = tempfile.mkdtemp(prefix="headpose-synthetic-cache-")
    atexit.register(shutil.rmtree, os.environ["HEADPOSE_SYNTHETIC_CACHE"], ignore_errors=True)

from background import Background  # noqa: E402
from support import MotoServer  # noqa: E402

BACKGROUND = Background(ROOT / "test-artifacts" / "background")
# Fixtures made in the background: fixture name -> (work name, "module:start function").
# Their tests run after every other test, so that the work is done (or nearly) by then.
SHARED_WORK = {
    "native_stack": ("native-stack", "stack_support:start_native_stack"),
    "dag_batch": ("dag-batch", "dag_batch:start_dag_batch"),
}


def _shared_work_of(item: pytest.Item) -> list[str]:
    return [name for name in SHARED_WORK if name in item.fixturenames]


def _start_function(fixture: str):
    import importlib

    module, function = SHARED_WORK[fixture][1].split(":")
    return getattr(importlib.import_module(module), function)


@pytest.hookimpl(trylast=True)  # after -m/-k have deselected
def pytest_collection_modifyitems(config, items):
    # Stable: within each stage the modules keep their order.
    items.sort(key=lambda item: len(_shared_work_of(item)) and 1 + list(SHARED_WORK).index(_shared_work_of(item)[0]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    if not session.config.option.collectonly:
        for fixture in sorted({name for item in session.items for name in _shared_work_of(item)}):
            BACKGROUND.start(SHARED_WORK[fixture][0], _start_function(fixture))
    yield


def pytest_sessionfinish(session):
    BACKGROUND.close()


def pytest_terminal_summary(terminalreporter):
    """Seconds per test module (set-up, call and tear-down together), largest first: where
    the suite's time goes. Background work shows in the module that waited for it."""
    seconds: dict[str, float] = {}
    tests: dict[str, set[str]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call", "teardown") and hasattr(report, "duration"):
                module = report.nodeid.split("::", 1)[0]
                seconds[module] = seconds.get(module, 0.0) + report.duration
                tests.setdefault(module, set()).add(report.nodeid)
    if not seconds:
        return
    total = sum(seconds.values())
    terminalreporter.section("seconds per module")
    for module, spent in sorted(seconds.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{spent:8.1f} s {100 * spent / total:5.1f}%  {len(tests[module]):4d} tests  {module}")
    terminalreporter.write_line(f"{total:8.1f} s in all (a test's time includes waiting for background work)")


@pytest.fixture(scope="session")
def native_stack():
    """docker-compose.yaml's topology as native processes (tests/native_stack.py), one per session."""
    return BACKGROUND.result(SHARED_WORK["native_stack"][0], _start_function("native_stack"))


@pytest.fixture(scope="session")
def dag_batch():
    """The batch of whole-DAG runs (tests/dag_batch.py), one per session."""
    return BACKGROUND.result(SHARED_WORK["dag_batch"][0], _start_function("dag_batch"))


@pytest.fixture(scope="session")
def stack_api(native_stack):
    """The stack's REST API as its admin."""
    from stack_support import Api

    return Api(native_stack.api_url, *native_stack.login("admin"))


@pytest.fixture(scope="session")
def moto_server():
    """One moto server (a separate process speaking real HTTP) for the whole session."""
    server = MotoServer.start()
    yield server
    server.stop()


@pytest.fixture()
def s3_endpoint(moto_server) -> str:
    """The server's endpoint, emptied of buckets and jobs from earlier tests."""
    moto_server.reset()
    return moto_server.endpoint


@pytest.fixture()
def s3_client(s3_endpoint):
    import boto3

    return boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict:
    """The session's small trained model: exported, packed and frozen (tests/model_support.py)."""
    from model_support import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_edge_models(tiny_model, tmp_path_factory) -> dict:
    """The session's small model with every edge format of its frozen graph."""
    from model_support import build_edge_models

    return build_edge_models(tiny_model, tmp_path_factory.mktemp("tiny-edge-models"))


@pytest.fixture(scope="session")
def airflow_db_template(tmp_path_factory):
    """One migrated Airflow metadata database per session; tests copy it (about a minute saved each)."""
    from airflow_support import migrate

    return migrate(tmp_path_factory.mktemp("airflow-template"))
