"""SageMaker's Model Registry as the tasks reach it: the provider's hook, the deployment's group.

The client is ``SageMakerHook``'s, so the connection's credentials, region and
``endpoint_url`` (moto's server in the embedded default, which serves SageMaker too) apply
as they do to ``train``.
"""
from __future__ import annotations

from typing import Any, Mapping

from headpose.registry.model_packages import ModelRegistry


def model_registry(aws_conn_id: str, plan: Mapping[str, Any]) -> ModelRegistry | None:
    """The deployment's model package group, None where ``model_package_group`` is empty (no Model Registry)."""
    group = (plan.get("deployment") or {}).get("model_package_group")
    if not group:
        return None
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    from headpose.planning.request import inference_image_uri

    region = plan["region"]
    return ModelRegistry(SageMakerHook(aws_conn_id=aws_conn_id).conn, group, lambda: inference_image_uri(region))
