"""The production topology, natively: docker-compose.yaml's services as host processes.

One stack for the module (tests/native_stack.py): PostgreSQL, Redis, moto's S3 server,
airflow-init, api-server, scheduler, dag-processor, triggerer and two Celery workers.

* A run triggered through the REST API (a JWT from the auth manager's token endpoint)
  with tiny training settings succeeds, its tasks ran on both workers, handing files
  over through the shared workspace, and the frozen model is published in S3.
* The trigger form in headless Chromium (Debian's, driven by Playwright): every
  parameter shows with its title, description and default; a submitted form with a
  changed ``training_steps`` creates a run with that value.

Run without them: ``./scripts/test.sh -m "not distributed"``.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from native_compose import ROOT, WORKER_SERVICE
from native_stack import NativeStack, api_token
from test_e2e import TINY_CONF

pytestmark = pytest.mark.distributed

DAG_ID = "headpose_retraining"
ARTIFACTS = ROOT / "test-artifacts"
# The tiny settings of the end-to-end test, in the bucket airflow-init created.
CONF = {name: value for name, value in TINY_CONF.items() if name != "s3_bucket"}
RUN_TIMEOUT_SECONDS = 1800
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google's hosts, which
# this closed network refuses.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


class Api:
    """The public REST API (v2) with a bearer token, as any client would use it."""

    def __init__(self, url: str, username: str, password: str):
        self.url = url
        self.token = api_token(url, username, password)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} {path}: {error.code} {error.read()[:2000]!r}") from None
        return json.loads(text) if text else {}

    def set_paused(self, paused: bool) -> None:
        self.call("PATCH", f"/api/v2/dags/{DAG_ID}?update_mask=is_paused", {"is_paused": paused})

    def task_instances(self, run_id: str) -> list[dict]:
        return self.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]


@pytest.fixture(scope="module")
def stack(pytestconfig):
    reporter = pytestconfig.pluginmanager.getplugin("terminalreporter")
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:
        # Progress shows as it happens (CI prints it), past pytest's output capture.
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[distributed] {time.strftime('%H:%M:%S')} {line}")

    base = Path(tempfile.mkdtemp(prefix="headpose-stack-"))
    native = NativeStack(base, say=say)
    try:
        native.start()
        yield native
    finally:
        native.stop()
        # Kept for reading after a failure: every process's output and every task log.
        kept = ARTIFACTS / "distributed"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(native.logs_dir, kept / "processes", dirs_exist_ok=True)
        if native.layout and native.layout.volume("airflow-logs").exists():
            shutil.copytree(native.layout.volume("airflow-logs"), kept / "tasks", dirs_exist_ok=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def api(stack) -> Api:
    client = Api(stack.api_url, *stack.admin)
    deadline = time.monotonic() + 300
    while True:  # the dag-processor has to parse the file once before the API knows the DAG
        try:
            client.call("GET", f"/api/v2/dags/{DAG_ID}")
            return client
        except AssertionError:
            stack.check_alive()
            if time.monotonic() > deadline:
                raise
            time.sleep(3)


def _wait_for_run(api: Api, stack: NativeStack, run_id: str) -> str:
    """The run's final state; prints each task's state as it changes."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        stack.check_alive()
        for ti in api.task_instances(run_id):
            state = f"{ti['state']} on {ti['hostname']}" if ti["hostname"] else str(ti["state"])
            if seen.get(ti["task_id"]) != state:
                seen[ti["task_id"]] = state
                stack.say(f"{ti['task_id']}: {state}")
        run_state = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]
        if run_state in ("success", "failed"):
            return run_state
        time.sleep(5)
    return "timed out"


def _task_log_tails(stack: NativeStack, run_id: str) -> str:
    folder = stack.layout.volume("airflow-logs") / f"dag_id={DAG_ID}" / f"run_id={run_id}"
    tails = []
    for log in sorted(folder.rglob("*.log")):
        tails.append(f"--- {log.relative_to(folder)}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(tails)[-12000:]


def test_a_run_triggered_through_the_api_spreads_over_both_workers_and_publishes(stack, api):
    api.set_paused(False)
    try:
        run = api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": CONF})
        run_id = run["dag_run_id"]
        assert run["conf"] == CONF
        stack.say(f"triggered {run_id}")
        state = _wait_for_run(api, stack, run_id)
    finally:
        api.set_paused(True)
    assert state == "success", _task_log_tails(stack, run_id)

    task_instances = api.task_instances(run_id)
    workers = {spec.name for spec in stack.specs if spec.service == WORKER_SERVICE}
    assert {ti["hostname"] for ti in task_instances} == workers
    # Each task ran on the worker its queue names (the stack's cluster policy), so every
    # hand-over between consecutive tasks crossed workers.
    assert all(ti["hostname"] == ti["queue"] for ti in task_instances), [
        (ti["task_id"], ti["hostname"], ti["queue"]) for ti in task_instances
    ]

    job = api.call(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/plan_run/xcomEntries/training_job_name"
    )["value"]
    s3 = stack.s3_client()
    pointer = json.loads(s3.get_object(Bucket=stack.bucket, Key="headpose/published/latest.json")["Body"].read())
    assert pointer["training_job_name"] == job
    graph = s3.head_object(Bucket=stack.bucket, Key="headpose/published/latest/frozen_model.pb")
    assert graph["ContentLength"] > 0
    # cleanup ran on a worker and removed the run's folder from the shared workspace.
    assert not (stack.layout.volume("workspace") / job).exists()


@pytest.mark.browser
def test_the_trigger_form_shows_every_parameter_and_starts_a_run(stack, api):
    from headpose.planning.params import param_schemas

    # The run the form creates must not start: its other values are the tutorial's
    # (ResNet-50, 25000 steps). Paused, it is created and stays queued.
    api.set_paused(True)
    schemas = param_schemas({"HEADPOSE_S3_BUCKET": stack.bucket})
    before = {run["dag_run_id"] for run in api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")["dag_runs"]}
    ARTIFACTS.mkdir(exist_ok=True)
    created: list[str] = []
    try:
        _drive_the_form(stack, api, schemas, before, created)
        assert _new_runs(api, before) == created  # one submission, one run
    finally:
        for run_id in _new_runs(api, before):
            api.call("DELETE", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")


def _drive_the_form(stack: NativeStack, api: Api, schemas: dict, before: set[str], created: list[str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    username, password = stack.admin
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})  # the whole form
        try:
            # The 2-core machine also runs the whole stack: be patient with the page.
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            page.goto(f"{stack.api_url}/dags/{DAG_ID}")
            page.get_by_label("Username").fill(username)
            page.get_by_label("Password").fill(password)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"**/dags/{DAG_ID}**")

            page.get_by_role("button", name="Trigger").first.click()
            form = page.get_by_role("dialog")
            expect(form.get_by_text(f"Trigger Dag - {DAG_ID}")).to_be_visible()
            # For a paused DAG the form offers to unpause it, ticked by default.
            unpause = form.locator("label", has_text=f"Unpause {DAG_ID} on trigger")
            unpause.click()
            expect(unpause.locator("input")).not_to_be_checked()
            for section in dict.fromkeys(spec["section"] for spec in schemas.values()):
                form.get_by_role("button", name=section, exact=True).click()  # one open at a time
                for name, spec in schemas.items():
                    if spec["section"] == section:
                        _check_field(form, name, spec, expect)
                if section == schemas["training_steps"]["section"]:
                    _field(form, "training_steps").get_by_role("spinbutton").fill("7")
                    form.screenshot(path=str(ARTIFACTS / "trigger-form.png"))

            submit = form.get_by_role("button", name="Trigger", exact=True)
            if submit.is_disabled():
                empty = [name for name in schemas if _field(form, name).locator("input[required]").count()
                         and _field(form, name).locator("input[required]").first.input_value() == ""]
                pytest.fail(f"the form's Trigger button stays disabled; required but empty: {empty} (the UI "
                            "takes an empty string for a missing value unless the param's type allows null)")
            submit.click()
            expect(form).to_be_hidden()

            run_id = _new_run(api, before)
            created.append(run_id)
            run = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
            assert run["conf"]["training_steps"] == 7
            assert run["conf"]["resnet_size"] == schemas["resnet_size"]["default"]
            # ... and the run shows in the UI's list of runs.
            assert api.call("GET", f"/api/v2/dags/{DAG_ID}")["is_paused"]
            page.goto(f"{stack.api_url}/dags/{DAG_ID}/runs")
            expect(page.get_by_role("link", name=run_id, exact=True)).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "trigger-form-run.png"))
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "trigger-form-failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def _field(form, name: str):
    """The form row of one parameter (its label, input and description)."""
    return form.locator('[data-scope="field"][data-part="root"]').filter(
        has=form.page.locator(f'[name="element_{name}"], [id="number-input:element_{name}:inc"]')
    )


def _check_field(form, name: str, spec: dict, expect) -> None:
    row = _field(form, name)
    expect(row, f"{name} has one row in the form").to_have_count(1)
    expect(row.locator("label").first, f"{name}'s title").to_contain_text(spec["title"])
    expect(row.locator('[data-part="helper-text"]'), f"{name}'s description").to_have_text(
        re.compile(re.escape(" ".join(spec["description"].split()))))
    default = spec["default"]
    if isinstance(default, bool):
        checkbox = row.locator(f'input[name="element_{name}"]')
        (expect(checkbox).to_be_checked if default else expect(checkbox).not_to_be_checked)()
    elif row.get_by_role("spinbutton").count():
        assert float(row.get_by_role("spinbutton").input_value().replace(",", "")) == default, name
    else:
        shown = "" if default is None else str(default)  # a null default is an empty box
        assert row.locator(f'input[name="element_{name}"]').input_value() == shown, name


def _new_runs(api: Api, before: set[str]) -> list[str]:
    runs = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")["dag_runs"]
    return [run["dag_run_id"] for run in runs if run["dag_run_id"] not in before]


def _new_run(api: Api, before: set[str]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = _new_runs(api, before)
        if new:
            assert len(new) == 1, new
            return new[0]
        time.sleep(1)
    raise AssertionError("the form's run did not appear")
