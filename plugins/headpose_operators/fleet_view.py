"""The fleet view: a page in the Airflow UI (Browse > Fleet) over ``headpose.fleet.overview``.

Airflow mounts a plugin's FastAPI app on the API server and authorises none of its routes,
so every route here checks the auth manager itself (``requires``): reading is "may read the
``headpose_rollout`` DAG" (Viewer and up), acting - promote or roll back the canary by hand,
through ``fleet.rollout.act_by_hand``, the code the rollout DAG applies its decisions with -
is "may run it" (FAB's Op, Admin and User roles; never Viewer). The user comes from the
bearer header or the UI's ``_token`` cookie (``get_user``), so the page in the UI's iframe
and the REST client both work.

The auth manager is looked up on each request (``get_auth_manager``): plugins are mounted
before it exists, and ``request.app`` is this sub-app, not Airflow's. The app is built on its
first request (``LazyApp``): the scheduler, workers and DAG processor import plugins too and
must not pay for FastAPI, boto3 or the fleet code.
"""
# No ``from __future__ import annotations``: FastAPI reads the routes' annotations
# (``GetUserDep``, imported inside ``create_app`` to keep the plugin light) when they are made.
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

URL_PREFIX = "/headpose-fleet"
PAGE = Path(__file__).with_name("fleet_view.html")
AWS_CONN_ID = "aws_default"


class LazyApp:
    """An ASGI app made by ``factory`` on its first request."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory, self._app = factory, None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self._app is None:
            self._app = self._factory()
        await self._app(scope, receive, send)


@dataclass(frozen=True)
class FleetLocation:
    """Where the fleet's pointers and reports are, and how to reach them."""

    s3_client: Any
    bucket: str
    folder: str
    rollout: dict[str, Any] | None
    mirror: bool


def deployment_location() -> FleetLocation:
    """The deployment's bucket and folder (profile, else ``$HEADPOSE_S3_BUCKET``), read with the workers' connection."""
    from headpose.planning.params import param_schemas
    from headpose.planning.profile import load_profile
    from headpose_operators.s3 import s3_client

    settings, schemas = load_profile().settings, param_schemas()
    bucket = schemas["s3_bucket"].get("default")
    if not bucket:
        raise LookupError("no bucket: the deployment profile names no s3_bucket and $HEADPOSE_S3_BUCKET is not set")
    return FleetLocation(s3_client(AWS_CONN_ID, settings.expected_bucket_owner, settings.kms_key_id), bucket,
                         schemas["headpose_folder"]["default"], settings.rollout, settings.publish_latest_mirror)


def may(user: Any, method: str, access_entity: Any = None) -> bool:
    """Whether the auth manager lets ``user`` do ``method`` on the rollout DAG (``access_entity`` of it)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    from headpose.fleet.overview import ROLLOUT_DAG_ID

    return get_auth_manager().is_authorized_dag(method=method, access_entity=access_entity,
                                                details=DagDetails(id=ROLLOUT_DAG_ID), user=user)


def create_app(location: Callable[[], FleetLocation] = deployment_location) -> Any:
    """The view's FastAPI app; ``location`` is called per request (a profile change needs no restart)."""
    from fastapi import Body, Depends, FastAPI, HTTPException
    from fastapi.responses import HTMLResponse
    from pydantic import BaseModel, ConfigDict, Field

    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import GetUserDep

    from headpose.fleet import overview, rollout
    from headpose.registry.pointer import PublishError

    def requires(method: str, access_entity: Any = None) -> Callable[..., None]:
        def check(user: GetUserDep) -> None:  # no token: get_user's 401; a bad one: its 403
            if not may(user, method, access_entity):
                raise HTTPException(403, "Forbidden: the fleet view's " +
                                    ("actions need permission to run headpose_rollout" if method != "GET"
                                     else "page needs permission to read headpose_rollout"))
        return check

    read, act = Depends(requires("GET")), Depends(requires("POST", DagAccessEntity.RUN))

    class Action(BaseModel):
        model_config = ConfigDict(extra="forbid")
        comment: str = Field("", max_length=500)
        expected_canary: str | None = Field(None, max_length=63)

    # No /docs, /redoc or /openapi.json: routes FastAPI adds would have no auth check.
    app = FastAPI(title="headpose fleet", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse, dependencies=[read])
    def page() -> str:
        return PAGE.read_text()

    @app.get("/api/fleet", dependencies=[read])
    def fleet(user: GetUserDep) -> dict[str, Any]:
        where = location()
        return {**overview.overview(where.s3_client, bucket=where.bucket, folder=where.folder, rollout=where.rollout),
                "user": user.get_name(), "can_act": may(user, "POST", DagAccessEntity.RUN)}

    @app.get("/api/decisions/{decision_id}", dependencies=[read])
    def decision(decision_id: str) -> dict[str, Any]:
        where = location()
        found = overview.read_decision(where.s3_client, where.bucket, where.folder, decision_id)
        if found is None:
            raise HTTPException(404, f"no decision {decision_id!r}")
        return found

    def by_hand(action: str, request: Action, user: Any) -> dict[str, Any]:
        where = location()
        try:
            return rollout.act_by_hand(
                where.s3_client, bucket=where.bucket, folder=where.folder, action=action, by=user.get_name(),
                comment=request.comment, expected_canary=request.expected_canary, rollout=where.rollout,
                mirror=where.mirror)
        except (rollout.NothingToRollOut, rollout.StaleCanary, PublishError) as error:
            raise HTTPException(409, str(error)) from None

    @app.post("/api/promote", dependencies=[act])
    def promote(user: GetUserDep, request: Action = Body()) -> dict[str, Any]:
        return by_hand(rollout.PROMOTE, request, user)

    @app.post("/api/rollback", dependencies=[act])
    def rollback(user: GetUserDep, request: Action = Body()) -> dict[str, Any]:
        return by_hand(rollout.ROLLBACK, request, user)

    return app


app = LazyApp(create_app)
# What headpose_plugin.py registers: the app under its prefix, and the page in the UI's Browse menu.
FASTAPI_APP = {"name": "headpose_fleet", "app": app, "url_prefix": URL_PREFIX}
EXTERNAL_VIEW = {"name": "Fleet", "href": URL_PREFIX.lstrip("/") + "/", "url_route": "headpose-fleet",
                 "destination": "nav", "category": "browse"}
