"""Shared fixtures: the import path, a real moto server on loopback, a migrated Airflow DB."""
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

from support import MotoServer  # noqa: E402


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
def airflow_db_template(tmp_path_factory):
    """One migrated Airflow metadata database per session; tests copy it (about a minute saved each)."""
    from airflow_support import migrate

    return migrate(tmp_path_factory.mktemp("airflow-template"))
