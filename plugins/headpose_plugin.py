"""Registers the ``train`` task's console links and the fleet view with Airflow (``airflow plugins`` lists them).

How Airflow 3 shows them: the operator declares ``operator_extra_links``; after the task
runs, the worker stores each finished URL in XCom under the link's ``xcom_key``; the
serialized DAG keeps only ``{name: xcom_key}``, and the API server reads that XCom.

The links are registered without ``operators = [...]`` on purpose: a plugin link bound
to an operator replaces the XCom reader in the API server, and ``BaseAwsLink.get_link``
reads its fields through the Task SDK, which exists only inside a running task - there
the link would come out empty.

This file sits at the top of ``plugins/`` because ``.airflowignore`` keeps the plugin
loader out of the ``headpose_operators`` package (it is imported by name).
"""
from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from headpose_operators.fleet_view import EXTERNAL_VIEW, FASTAPI_APP
from headpose_operators.links import TRAINING_LINKS


class HeadposePlugin(AirflowPlugin):
    name = "headpose"
    operator_extra_links = list(TRAINING_LINKS)
    # The fleet view (Browse > Fleet): its app is built on the API server's first request to it.
    fastapi_apps = [FASTAPI_APP]
    external_views = [EXTERNAL_VIEW]
