"""The production topology, natively: docker-compose.yaml's services as host processes.

One stack for the whole session (conftest's ``native_stack``, tests/native_stack.py):
PostgreSQL, Redis, moto's S3 server, airflow-init, api-server, scheduler, dag-processor,
triggerer, two Celery workers and Flower (the compose file's ``flower`` profile).

* A run triggered through the REST API (a JWT from FAB's token endpoint) with tiny
  training settings succeeds, its tasks ran on both workers, handing files over through
  the shared workspace, and the frozen model is published in S3.
* Roles: each login from .env (admin, operator, viewer) may do through the API what its
  FAB role allows and is refused the rest; in the UI a viewer's trigger is refused and an
  operator's creates a run. Re-running airflow-init keeps the users and takes a changed
  password.
* Closed dashboards: Flower answers only with its .env login, and the api-server and
  Flower listen on loopback only, as the compose file publishes them.
* After a run whose model is refused, an operator sees in the UI which task failed, finds
  the ``HEADPOSE FAILURE`` line on screen in its log (and with the log's search), and the
  report links of an accepted run in its XCom; the refused report the line names is in S3.
* The trigger form in headless Chromium: every parameter shows with its title,
  description and default; a submitted form with a changed ``training_steps`` creates a
  run with that value.

Run without them: ``./scripts/test.sh -m "not distributed"``.
"""
from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from native_compose import INIT_SERVICE, ROOT, WORKER_SERVICE
from native_stack import NativeStack, api_token, caller_env
from stack_support import (
    ARTIFACTS, DAG_ID, Api, accepted_run, browser_page, check_field, field, follow_link, log_in, new_run, new_runs,
    open_trigger_form, run_to_end, same_link, search_log, stored_object, task_log_tails, task_row, ui_path, ui_state,
    wait_for_run, wrap_log, xcom_link,
)
from dag_batch import TINY_CONF

pytestmark = pytest.mark.distributed

# The tiny settings of the end-to-end test, in the bucket airflow-init created; enough
# synthetic rounds (4 + 2) that the render pool has work for both of its processes.
CONF = {**TINY_CONF, "synthetic_train_per_pose": 4, "synthetic_eval_per_pose": 2}
# (method, path, body, the logins FAB's roles allow it); every other login gets 403.
# Only requests that change nothing: a dry-run clear, pausing the paused DAG.
ACCESS = [
    ("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", None, {"admin", "operator", "viewer"}),
    ("GET", f"/api/v2/dags/{DAG_ID}/tasks", None, {"admin", "operator", "viewer"}),
    ("POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances", {"dry_run": True, "only_failed": False},
     {"admin", "operator"}),
    ("PATCH", f"/api/v2/dags/{DAG_ID}?update_mask=is_paused", {"is_paused": True}, {"admin", "operator"}),
    ("GET", "/api/v2/connections", None, {"admin", "operator"}),
    ("GET", "/api/v2/variables", None, {"admin", "operator"}),
    ("GET", "/auth/fab/v1/users", None, {"admin"}),
    ("GET", "/auth/fab/v1/roles", None, {"admin"}),
]
LOGINS = ("admin", "operator", "viewer")


def test_a_run_triggered_through_the_api_spreads_over_both_workers_and_publishes(native_stack, stack_api):
    stack_api.set_paused(False)
    try:
        run = stack_api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": CONF})
        run_id = run["dag_run_id"]
        assert run["conf"] == CONF
        native_stack.say(f"triggered {run_id}")
        # The stack's profile requires a release approval: the operator gives it through the REST API.
        operator = Api(native_stack.api_url, *native_stack.login("operator"))
        state = wait_for_run(stack_api, native_stack, run_id, approver=operator)
    finally:
        stack_api.set_paused(True)
    assert state == "success", task_log_tails(native_stack, run_id)

    task_instances = stack_api.task_instances(run_id)
    workers = {spec.name for spec in native_stack.specs if spec.service == WORKER_SERVICE}
    assert {ti["hostname"] for ti in task_instances} == workers
    # Each task ran on the worker its queue names (the stack's cluster policy), so every
    # hand-over between consecutive tasks crossed workers.
    assert all(ti["hostname"] == ti["queue"] for ti in task_instances), [
        (ti["task_id"], ti["hostname"], ti["queue"]) for ti in task_instances
    ]

    job = stack_api.call(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/plan_run/xcomEntries/training_job_name"
    )["value"]
    s3 = native_stack.s3_client()
    # The stack's profile has a rollout: the approved model went to the canary channel only,
    # with its decision record first; the stable channel, latest.json and the mirror move
    # when headpose_rollout finds the canaries healthy (test_fleet_view promotes one).
    pointer = json.loads(s3.get_object(Bucket=native_stack.bucket,
                                       Key="headpose/published/channels/canary.json")["Body"].read())
    assert (pointer["training_job_name"], pointer["channel"]) == (job, "canary") and set(pointer["formats"])
    assert (pointer["approval"]["decision"], pointer["approval"]["by"]) == ("approved", native_stack.login("operator")[0])
    assert pointer["channel_moved"]["decision_uri"].endswith(f"/published/rollouts/publish-{job}.json")
    s3.head_object(Bucket=native_stack.bucket, Key=f"headpose/published/rollouts/publish-{job}.json")
    for key in ("headpose/published/latest.json", "headpose/published/channels/stable.json"):
        try:
            named = json.loads(s3.get_object(Bucket=native_stack.bucket, Key=key)["Body"].read())["training_job_name"]
        except s3.exceptions.NoSuchKey:
            continue
        assert named != job, key
    assert "published to the canary channel" in task_log(native_stack, run_id, "publish")
    # Rendering ran in a pool of two processes inside a Celery prefork worker (a daemonic
    # process, which may not start one itself).
    assert "rendered 6 rounds of 93 poses in 2 processes" in task_log(native_stack, run_id, "stage_dataset")
    # Each worker has its own scratch, and no worker kept anything of the run in it.
    for worker in workers:
        assert not (native_stack.layout.scratch(worker) / job).exists(), worker

    # An operator clears validate_model after the run (and its teardown) ended: it runs again,
    # on the other worker, from S3 alone, and the run ends green again.
    first = {ti["task_id"]: ti["hostname"] for ti in task_instances}
    stack_api.call("POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances", {
        "dry_run": False, "task_ids": ["validate_model"], "dag_run_id": run_id, "only_failed": False,
        "include_downstream": False, "reset_dag_runs": True, "run_on_latest_version": True})
    stack_api.set_paused(False)
    try:
        assert wait_for_run(stack_api, native_stack, run_id) == "success", task_log_tails(native_stack, run_id)
    finally:
        stack_api.set_paused(True)
    rerun = {ti["task_id"]: ti for ti in stack_api.task_instances(run_id)}["validate_model"]
    assert rerun["try_number"] == 2 and rerun["state"] == "success"
    assert rerun["hostname"] != first["validate_model"], (rerun["hostname"], first["validate_model"])


def task_log(native_stack, run_id: str, task_id: str) -> str:
    folder = native_stack.layout.volume("airflow-logs") / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
    return "\n".join(log.read_text(errors="replace") for log in sorted(folder.rglob("*.log")))


@pytest.mark.browser
def test_an_operator_sees_why_a_run_failed_and_reaches_the_report(native_stack, stack_api):
    accepted = accepted_run(stack_api, native_stack, CONF)  # the run test's, when it ran first
    started = time.monotonic()
    # Refused after training. force_retrain: the test stack retrains on data, and CONF's data
    # version was trained by the run test's run.
    run_id, state = run_to_end(stack_api, native_stack, {**CONF, "min_accuracy": 1, "force_retrain": True})
    states = {ti["task_id"]: ti["state"] for ti in stack_api.task_instances(run_id)}
    assert (state, states["validate_model"], states["cleanup"]) == ("failed", "failed", "success"), states
    assert states["upload_frozen_model"] == states["publish"] == "upstream_failed", states
    job = stack_api.xcom(run_id, "plan_run", "training_job_name")
    browsing = time.monotonic()
    with browser_page(ARTIFACTS / "ui-failure.png") as page:
        from playwright.sync_api import expect

        log_in(page, native_stack, "operator", ui_path(run_id))
        for task_id in ("validate_model", "upload_frozen_model", "publish", "cleanup"):
            expect(task_row(page, task_id)).to_contain_text(ui_state(states[task_id]))
        page.screenshot(path=str(ARTIFACTS / "failed-run.png"))

        page.goto(native_stack.api_url + ui_path(run_id, "validate_model"))  # its log, as it opens
        line = page.get_by_text("HEADPOSE FAILURE")
        expect(line).to_have_count(1)
        expect(line).to_be_visible()  # outside every collapsed group...
        expect(line).to_be_in_viewport()  # ... and on screen without scrolling
        expect(line).to_contain_text(f"run={run_id} task=validate_model training_job_name={job} reason=")
        message = line.inner_text()
        # The search also finds (and opens) a line inside a collapsed group: it comes second.
        expect(search_log(page, "HEADPOSE FAILURE")).to_have_text("1 of 1")
        wrap_log(page)
        page.screenshot(path=str(ARTIFACTS / "failed-task-log.png"))

        links = stack_api.xcom(accepted, "validate_model", "links")
        page.goto(native_stack.api_url + ui_path(accepted, "validate_model", "xcom"))
        link = xcom_link(page, "links", "report")
        page.screenshot(path=str(ARTIFACTS / "report-link.png"))
        tab, url, status, content_type = follow_link(page, link, links["report"])
        tab.screenshot(path=str(ARTIFACTS / "report-link-opened.png"))
    native_stack.say(f"failed run {browsing - started:.0f}s, browser {time.monotonic() - browsing:.0f}s; "
              f"the report link opened in the browser: HTTP {status}")
    # The tab opened the link the XCom holds, and got the report itself: presigned, so the
    # browser needs no credentials; stored as JSON, so the tab shows it rather than downloading it.
    assert same_link(url, links["report"]), (url, links["report"])
    assert (status, content_type) == (200, "application/json")
    assert json.loads(stored_object(native_stack, url))["accepted"] is True
    with urllib.request.urlopen(stack_api.xcom(run_id, "validate_model", "links")["report"]) as refused:
        assert json.loads(refused.read())["accepted"] is False  # the refused model's, one click away

    # The failure line names the refused model's evidence, kept under rejected/.
    evidence = re.search(r"Report: (s3://\S+/rejected/report\.json), confusion matrix: (s3://\S+\.png)", message)
    assert evidence and f"/TFartifacts/{job}/rejected/" in evidence[1], message
    report = json.loads(stored_object(native_stack, evidence[1]))
    assert report["accepted"] is False and report["problems"], report
    assert any("below min_accuracy 1.0000" in problem for problem in report["problems"]), report["problems"]
    assert stored_object(native_stack, evidence[2]).startswith(b"\x89PNG"), evidence[2]


def test_each_login_may_do_what_its_role_allows_and_nothing_else(native_stack, stack_api):
    clients = {who: Api(native_stack.api_url, *native_stack.login(who)) for who in LOGINS}
    stack_api.set_paused(True)
    refused = {}
    for method, path, body, allowed in ACCESS:
        for who, client in clients.items():
            status = client.status(method, path, body)
            if status != (200 if who in allowed else 403):
                refused[(who, method, path)] = status
    assert not refused, refused
    # The viewer's trigger is refused and creates nothing.
    before = stack_api.run_ids()
    assert clients["viewer"].status("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None}) == 403
    assert stack_api.run_ids() == before
    # A wrong password gets no token at all.
    with pytest.raises(urllib.error.HTTPError) as wrong:
        api_token(native_stack.api_url, native_stack.login("viewer")[0], "not-the-password")
    assert wrong.value.code == 401


@pytest.mark.browser
def test_a_viewer_sees_the_dag_but_its_trigger_is_refused(native_stack, stack_api):
    stack_api.set_paused(True)
    before = stack_api.run_ids()
    try:
        with browser_page(ARTIFACTS / "viewer-failure.png") as page:
            from playwright.sync_api import expect

            log_in(page, native_stack, "viewer")
            # The DAG page, rendered (its labels translated) and with the DAG's tasks.
            expect(page.get_by_text("Active Runs")).to_be_visible()
            expect(page.get_by_text("plan_run").first).to_be_visible()
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(ARTIFACTS / "viewer-dag-page.png"))
            # The UI offers the button to everyone and leaves the refusal to the API.
            form = open_trigger_form(page)
            form.get_by_role("button", name="Trigger", exact=True).click()
            expect(form.get_by_text("403 Forbidden")).to_be_visible()
            expect(page.get_by_text("You do not have permission to perform this action.").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "viewer-trigger-refused.png"))
        assert stack_api.run_ids() == before
    finally:
        for run_id in new_runs(stack_api, before):
            stack_api.call("DELETE", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")


@pytest.mark.browser
def test_an_operator_triggers_a_run_from_the_ui(native_stack, stack_api):
    stack_api.set_paused(True)  # created, the run stays queued
    before = stack_api.run_ids()
    try:
        with browser_page(ARTIFACTS / "operator-failure.png") as page:
            from playwright.sync_api import expect

            log_in(page, native_stack, "operator")
            form = open_trigger_form(page)
            form.get_by_role("button", name="Trigger", exact=True).click()
            expect(form).to_be_hidden()
            run_id = new_run(stack_api, before)
            page.goto(f"{native_stack.api_url}/dags/{DAG_ID}/runs")
            expect(page.get_by_role("link", name=run_id, exact=True)).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "operator-trigger.png"))
        run = stack_api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
        assert (run["triggered_by"], run["triggering_user_name"]) == ("ui", native_stack.login("operator")[0])
        assert run["state"] == "queued" and stack_api.call("GET", f"/api/v2/dags/{DAG_ID}")["is_paused"]
    finally:
        for run_id in new_runs(stack_api, before):
            stack_api.call("DELETE", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")


def _flower_status(native_stack: NativeStack, path: str, login: tuple[str, str] | None) -> tuple[int, bytes]:
    headers = {}
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    request = urllib.request.Request(f"{native_stack.flower_url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_flower_answers_only_with_its_login(native_stack):
    user, password = native_stack.flower_login
    for path in ("/", "/workers", "/api/workers", "/api/tasks"):
        assert _flower_status(native_stack, path, None)[0] == 401, path
        assert _flower_status(native_stack, path, (user, "not-the-password"))[0] == 401, path
        assert _flower_status(native_stack, path, (user, password))[0] == 200, path
    # With the login it sees both workers through the broker; its health check needs none.
    status, body = _flower_status(native_stack, "/api/workers?refresh=1", (user, password))
    workers = {f"celery@{spec.name}" for spec in native_stack.specs if spec.service == WORKER_SERVICE}
    assert status == 200 and workers <= set(json.loads(body)), body[:500]
    assert _flower_status(native_stack, "/healthcheck", None) == (200, b"OK")


def test_the_api_server_and_flower_listen_on_loopback_only(native_stack):
    # The whole of 127.0.0.0/8 reaches this host: a server on every interface answers on
    # 127.0.0.2 too, one bound to 127.0.0.1 (the compose file's default) does not.
    for port in (native_stack.layout.api, native_stack.layout.flower):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=10)


@pytest.mark.browser
def test_the_trigger_form_shows_every_parameter_and_starts_a_run(native_stack, stack_api):
    from headpose.planning.params import param_schemas

    stack_api.set_paused(True)  # created, the run stays queued
    schemas = param_schemas({"HEADPOSE_S3_BUCKET": native_stack.bucket,  # as the stack's processes have it
                             "HEADPOSE_RUN_DEFAULTS": native_stack.variables["HEADPOSE_RUN_DEFAULTS"]})
    before = stack_api.run_ids()
    created: list[str] = []
    try:
        with browser_page(ARTIFACTS / "trigger-form-failure.png") as page:
            _drive_the_form(page, native_stack, stack_api, schemas, before, created)
        assert new_runs(stack_api, before) == created  # one submission, one run
    finally:
        for run_id in new_runs(stack_api, before):
            stack_api.call("DELETE", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")


def _drive_the_form(page, native_stack: NativeStack, stack_api: Api, schemas: dict, before: set[str], created: list[str]) -> None:
    from playwright.sync_api import expect

    log_in(page, native_stack, "admin")
    form = open_trigger_form(page)
    for section in dict.fromkeys(spec["section"] for spec in schemas.values()):
        form.get_by_role("button", name=section, exact=True).click()  # one open at a time
        for name, spec in schemas.items():
            if spec["section"] == section:
                check_field(form, name, spec)
        if section == schemas["training_steps"]["section"]:
            field(form, "training_steps").get_by_role("spinbutton").fill("7")
            form.screenshot(path=str(ARTIFACTS / "trigger-form.png"))

    submit = form.get_by_role("button", name="Trigger", exact=True)
    if submit.is_disabled():
        empty = [name for name in schemas if field(form, name).locator("input[required]").count()
                 and field(form, name).locator("input[required]").first.input_value() == ""]
        pytest.fail(f"the form's Trigger button stays disabled; required but empty: {empty} (the UI "
                    "takes an empty string for a missing value unless the param's type allows null)")
    submit.click()
    expect(form).to_be_hidden()

    run_id = new_run(stack_api, before)
    created.append(run_id)
    run = stack_api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
    assert run["conf"]["training_steps"] == 7
    assert run["conf"]["resnet_size"] == schemas["resnet_size"]["default"]
    # ... and the run shows in the UI's list of runs.
    assert stack_api.call("GET", f"/api/v2/dags/{DAG_ID}")["is_paused"]
    page.goto(f"{native_stack.api_url}/dags/{DAG_ID}/runs")
    expect(page.get_by_role("link", name=run_id, exact=True)).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "trigger-form-run.png"))


def test_re_running_airflow_init_keeps_the_logins_and_takes_a_changed_password(native_stack, stack_api):
    """Last in the module: the viewer's password changes for good (as in .env)."""
    init = next(spec for spec in native_stack.specs if spec.service == INIT_SERVICE)
    viewer, old_password = native_stack.login("viewer")
    new_password = secrets.token_urlsafe(24)
    result = subprocess.run(init.argv, env={**caller_env(), **init.env, "AIRFLOW_VIEWER_PASSWORD": new_password},
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    native_stack.variables["AIRFLOW_VIEWER_PASSWORD"] = new_password

    assert api_token(native_stack.api_url, viewer, new_password)
    with pytest.raises(urllib.error.HTTPError) as refused:
        api_token(native_stack.api_url, viewer, old_password)
    assert refused.value.code == 401
    users = stack_api.call("GET", "/auth/fab/v1/users?limit=100")["users"]
    roles = {user["username"]: sorted(role["name"] for role in user["roles"]) for user in users}
    assert roles == {native_stack.login("admin")[0]: ["Admin"], native_stack.login("operator")[0]: ["Op"], viewer: ["Viewer"]}
    for who in ("admin", "operator"):
        assert api_token(native_stack.api_url, *native_stack.login(who))
