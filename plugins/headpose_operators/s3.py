"""The S3 client every task and operator of the pipeline uses.

One place, so that each S3 call goes through the Airflow connection and carries what the
deployment asks of it (``headpose.planning.s3_calls``): ``ExpectedBucketOwner`` when it
names the bucket's owner, SSE-KMS with its key when it names one.
"""
from __future__ import annotations

from typing import Any

# The connection extra that names the bucket's owner when the profile does not.
OWNER_EXTRA = "expected_bucket_owner"


def s3_client(
    aws_conn_id: str, expected_bucket_owner: str | None = None, kms_key_id: str | None = None, **hook_kwargs: Any,
) -> Any:
    """A boto3 S3 client from ``aws_conn_id``, pinned to ``expected_bucket_owner`` and writing
    with SSE-KMS under ``kms_key_id``, each where given."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return governed(S3Hook(aws_conn_id=aws_conn_id, **hook_kwargs).get_conn(), expected_bucket_owner, kms_key_id)


def governed(client: Any, expected_bucket_owner: str | None, kms_key_id: str | None) -> Any:
    """``client`` (any S3 client, the provider's hooks' too) with the deployment's owner and key."""
    from headpose.planning.s3_calls import encrypt_with_kms, pin_bucket_owner

    return encrypt_with_kms(pin_bucket_owner(client, expected_bucket_owner), kms_key_id)


# SigV4's longest validity: a link in the UI opens its object for a week after the run.
PRESIGNED_SECONDS = 7 * 24 * 3600


def object_links(aws_conn_id: str, uris: dict[str, str | None], region: str) -> dict[str, str]:
    """``{name: url}`` where a person opens each ``s3://`` object from the UI.

    At a store with its own endpoint (MinIO, moto) a presigned GET URL: the buckets are
    private, so a plain object URL answers 403 to a browser, which sends no credentials.
    On AWS the S3 console, which signs the person in itself. A missing URI is left out.
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from headpose.planning.s3_calls import viewable_type
    from headpose.planning.layout import object_urls, split_s3_uri

    hook = S3Hook(aws_conn_id=aws_conn_id)
    if not hook.conn_config.endpoint_url:
        return object_urls(uris, None, region)
    from botocore.config import Config

    # SigV4 explicitly: botocore may presign in the deprecated SigV2 at a custom endpoint.
    client = S3Hook(aws_conn_id=aws_conn_id, config=Config(signature_version="s3v4")).get_conn()
    links = {}
    for name, uri in uris.items():
        if uri:
            bucket, key = split_s3_uri(uri)
            params = {"Bucket": bucket, "Key": key}
            if viewable_type(key):  # shown in the tab, also for an object stored without its type
                params["ResponseContentType"] = viewable_type(key)
            links[name] = client.generate_presigned_url("get_object", Params=params, ExpiresIn=PRESIGNED_SECONDS)
    return links
