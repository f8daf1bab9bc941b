"""Test support shared by several test modules."""
from __future__ import annotations

import json
from pathlib import Path

from embedded import EmbeddedS3, free_port  # noqa: F401  (re-exported for tests)

ROOT = Path(__file__).resolve().parents[1]

# Kept under its old name: tests speak of "the moto server".
MotoServer = EmbeddedS3


def aws_env(endpoint: str) -> dict[str, str]:
    """Environment that points boto3 and Airflow's ``aws_default`` at a moto endpoint."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
            {"conn_type": "aws", "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        ),
    }
