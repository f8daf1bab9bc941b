"""The Greengrass V2 client of ``publish``, where the deployment creates its component in AWS.

``greengrass.create_component`` is plain code over a boto3 ``greengrassv2`` client; this gives it
the connection's client (``AwsBaseHook(client_type="greengrassv2")``), its region and account.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping


def greengrass_component(aws_conn_id: str, plan: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], dict] | None:
    """``create(recipe)`` where the deployment's ``greengrass`` setting says ``create_component``; else None."""
    from headpose.fleet.greengrass import greengrass_settings

    if not greengrass_settings(plan.get("deployment")).get("create_component"):
        return None

    def create(recipe: Mapping[str, Any]) -> dict:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        from headpose.fleet.greengrass import create_component

        hook = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="greengrassv2")
        return create_component(hook.conn, recipe, hook.conn_region_name, lambda: hook.account_id)

    return create
