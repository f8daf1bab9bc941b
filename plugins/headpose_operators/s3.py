"""The S3 client every task and operator of the pipeline uses.

One place, so that each S3 call goes through the Airflow connection and, when the
deployment names the bucket's owner, carries ``ExpectedBucketOwner``.
"""
from __future__ import annotations

from typing import Any

# The connection extra that names the bucket's owner when the profile does not.
OWNER_EXTRA = "expected_bucket_owner"


def s3_client(aws_conn_id: str, expected_bucket_owner: str | None = None, **hook_kwargs: Any) -> Any:
    """A boto3 S3 client from ``aws_conn_id``, pinned to ``expected_bucket_owner`` if one is given."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from headpose.planning.handoff import pin_bucket_owner

    return pin_bucket_owner(S3Hook(aws_conn_id=aws_conn_id, **hook_kwargs).get_conn(), expected_bucket_owner)
