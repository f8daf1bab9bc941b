"""The fleet view's FastAPI app, mounted as Airflow mounts a plugin's, with a real auth manager and real tokens.

Airflow's ``SimpleAuthManager`` issues the JWTs and answers ``is_authorized_dag`` (viewer: GET
only; op: may run DAGs), ``get_user`` reads them from the bearer header or the ``_token`` cookie
(checked against the ``revoked_token`` table, the one table created here), and the channels and
reports are in moto's S3 as ``fleet_support`` publishes them. The browser test of the page on
the native stack (FAB roles) is ``test_fleet_view``.
"""
from __future__ import annotations

import airflow_support  # noqa: F401  (a throw-away AIRFLOW_HOME before airflow is imported)

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from fleet_support import channel_candidate, channel_jobs, device_report, now_utc, publish_to_canary, put_report
from headpose_operators.fleet_view import URL_PREFIX, FleetLocation, LazyApp, create_app
from test_crash_points import published

BUCKET = "fleet-view"
SECRET = "fleet-view-tests-" + "s" * 64


@pytest.fixture(scope="module")
def auth_manager():
    """SimpleAuthManager as the API server's auth manager for this module."""
    from airflow import settings
    from airflow.api_fastapi import app as api_app
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from airflow.models.revoked_token import RevokedToken

    patch = pytest.MonkeyPatch()
    patch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", SECRET)
    before = api_app._AuthManagerState.instance
    api_app._AuthManagerState.instance = manager = SimpleAuthManager()
    RevokedToken.__table__.create(settings.engine, checkfirst=True)
    yield manager
    api_app._AuthManagerState.instance = before
    patch.undo()


def token(manager, name: str, role: str) -> str:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return manager.generate_jwt(SimpleAuthManagerUser(username=name, role=role))


@pytest.fixture()
def view(s3_client, auth_manager):
    """The app under Airflow's prefix; stable (and latest.json) name A, the canary B; three devices report."""
    s3_client.create_bucket(Bucket=BUCKET)
    before = channel_candidate(s3_client, BUCKET, 0, rollout=None)
    published(s3_client, before, accuracy=0.5)
    run = channel_candidate(s3_client, BUCKET, 7)
    publish_to_canary(s3_client, run)
    canary, stable = (channel_jobs(s3_client, BUCKET)[name] for name in ("canary", "stable"))
    records = {job: _record(s3_client, job) for job in (canary, stable)}
    for device, channel, job in (("cam-1", "canary", canary), ("cam-2", "canary", canary), ("cam-3", "stable", stable)):
        put_report(s3_client, BUCKET, device, device_report(device, channel, records[job], at=now_utc()))
    location = FleetLocation(s3_client, BUCKET, "headpose", run.plan["deployment"]["rollout"], True)
    return {**mounted(lambda: location), "canary": canary, "stable": stable, "s3": s3_client}


@pytest.fixture()
def unread(auth_manager):
    """The app where no request may reach S3: each is refused before its route runs."""
    def nowhere():
        raise AssertionError("a refused request reached the route")
    return mounted(nowhere)


def mounted(location) -> dict:
    """The app as Airflow's ``init_plugins`` mounts a plugin's, under its prefix."""
    root, app = FastAPI(), LazyApp(lambda: create_app(location))
    root.mount(URL_PREFIX, app)
    return {"client": TestClient(root), "app": app}


def _record(s3, job: str) -> dict:
    import json

    return json.loads(s3.get_object(Bucket=BUCKET, Key=f"headpose/published/history/{job}.json")["Body"].read())


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def test_every_route_checks_the_auth_manager(unread):
    assert unread["app"]._app is None  # nothing built before the first request
    unread["client"].get(URL_PREFIX + "/api/fleet")
    routes = unread["app"]._app.routes
    assert routes and all(isinstance(route, APIRoute) for route in routes), "no docs/openapi routes without a check"
    for route in routes:
        checks = [d.call for d in route.dependant.dependencies if "requires.<locals>.check" in d.call.__qualname__]
        assert checks, f"{route.path} has no auth dependency"
    assert {route.path for route in routes} == {"/", "/api/fleet", "/api/decisions/{decision_id}", "/api/promote",
                                                "/api/rollback"}


def test_a_viewer_reads_and_is_refused_acting(view, auth_manager):
    client, viewer = view["client"], bearer(token(auth_manager, "vera", "viewer"))
    page = client.get(URL_PREFIX + "/", headers=viewer)
    assert page.status_code == 200 and "<h1>Fleet</h1>" in page.text
    fleet = client.get(URL_PREFIX + "/api/fleet", headers=viewer).json()
    assert fleet["user"] == "vera" and fleet["can_act"] is False
    assert {name: (c or {}).get("training_job_name") for name, c in fleet["channels"].items()} == {
        "canary": view["canary"], "stable": view["stable"], "latest": view["stable"]}
    assert [(d["device_id"], d["training_job_name"], d["health"]) for d in fleet["devices"]] == [
        ("cam-1", view["canary"], "ok"), ("cam-2", view["canary"], "ok"), ("cam-3", view["stable"], "ok")]
    assert fleet["versions"] == {view["canary"]: 2, view["stable"]: 1}
    assert fleet["decision"]["action"] == "canary" and fleet["decision"]["canary"] == view["canary"]
    for action in ("promote", "rollback"):
        refused = client.post(f"{URL_PREFIX}/api/{action}", headers=viewer, json={"expected_canary": view["canary"]})
        assert refused.status_code == 403, refused.text
    assert channel_jobs(view["s3"], BUCKET)["stable"] == view["stable"]


def test_without_a_token_401_with_a_forged_one_403(unread, auth_manager):
    client = unread["client"]
    for method, path in (("GET", "/"), ("GET", "/api/fleet"), ("GET", "/api/decisions/x"), ("POST", "/api/promote"),
                         ("POST", "/api/rollback")):
        assert client.request(method, URL_PREFIX + path, json={}).status_code == 401, path
    forged = token(auth_manager, "mallory", "admin")[:-4] + "AAAA"
    assert client.get(URL_PREFIX + "/api/fleet", headers=bearer(forged)).status_code == 403


def test_an_operator_promotes_by_hand_and_the_decision_names_them(view, auth_manager):
    client, canary = view["client"], view["canary"]
    client.cookies.set("_token", token(auth_manager, "otto", "op"))  # the UI's cookie, as in the iframe
    assert client.get(URL_PREFIX + "/api/fleet").json()["can_act"] is True
    stale = client.post(URL_PREFIX + "/api/promote", json={"expected_canary": view["stable"]})
    assert stale.status_code == 409 and "not " + view["stable"] in stale.json()["detail"]
    assert client.post(URL_PREFIX + "/api/promote", data={"comment": "a form"}).status_code == 422  # JSON only
    done = client.post(URL_PREFIX + "/api/promote", json={"expected_canary": canary, "comment": "field is fine"})
    assert done.status_code == 200, done.text
    decision = done.json()
    assert (decision["action"], decision["by"], decision["comment"]) == ("promote", "otto", "field is fine")
    assert channel_jobs(view["s3"], BUCKET) == {"canary": canary, "stable": canary, "latest": canary}
    fleet = client.get(URL_PREFIX + "/api/fleet").json()
    assert fleet["decision"]["id"] == decision["id"] and fleet["decision"]["link"] == f"api/decisions/{decision['id']}"
    assert client.get(f"{URL_PREFIX}/{fleet['decision']['link']}").json() == decision
    assert client.get(URL_PREFIX + "/api/decisions/..%2F..%2Flatest").status_code == 404
    again = client.post(URL_PREFIX + "/api/promote", json={"expected_canary": canary})
    assert again.status_code == 409 and "both name" in again.json()["detail"]
