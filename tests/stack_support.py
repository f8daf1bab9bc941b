"""What tests/test_distributed.py uses to talk to the native stack: its REST API as a
client would, and its UI in headless Chromium (Debian's, driven by Playwright)."""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from native_compose import ROOT
from native_stack import NativeStack, api_token

DAG_ID = "headpose_retraining"
ARTIFACTS = ROOT / "test-artifacts"
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

    def _request(self, method: str, path: str, body: dict | None) -> urllib.request.Request:
        return urllib.request.Request(
            f"{self.url}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            with urllib.request.urlopen(self._request(method, path, body), timeout=60) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} {path}: {error.code} {error.read()[:2000]!r}") from None
        return json.loads(text) if text else {}

    def status(self, method: str, path: str, body: dict | None = None) -> int:
        """The HTTP status alone: for requests that are meant to be refused."""
        try:
            with urllib.request.urlopen(self._request(method, path, body), timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def set_paused(self, paused: bool) -> None:
        self.call("PATCH", f"/api/v2/dags/{DAG_ID}?update_mask=is_paused", {"is_paused": paused})

    def task_instances(self, run_id: str) -> list[dict]:
        return self.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def run_ids(self) -> set[str]:
        return {run["dag_run_id"] for run in self.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")["dag_runs"]}


def wait_for_run(api: Api, stack: NativeStack, run_id: str) -> str:
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


def task_log_tails(stack: NativeStack, run_id: str) -> str:
    folder = stack.layout.volume("airflow-logs") / f"dag_id={DAG_ID}" / f"run_id={run_id}"
    tails = []
    for log in sorted(folder.rglob("*.log")):
        tails.append(f"--- {log.relative_to(folder)}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(tails)[-12000:]


def new_runs(api: Api, before: set[str]) -> list[str]:
    return sorted(api.run_ids() - before)


def new_run(api: Api, before: set[str]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = new_runs(api, before)
        if new:
            assert len(new) == 1, new
            return new[0]
        time.sleep(1)
    raise AssertionError("the form's run did not appear")


# -- the UI ----------------------------------------------------------------------------

@contextmanager
def browser_page(failure_screenshot: Path) -> Iterator:
    """A page in headless Chromium; on any failure a full-page screenshot is kept."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})  # the whole form
        try:
            # The 2-core machine also runs the whole stack: be patient with the page.
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            yield page
        except BaseException:
            page.screenshot(path=str(failure_screenshot), full_page=True)
            raise
        finally:
            browser.close()


def log_in(page, stack: NativeStack, who: str, path: str = f"/dags/{DAG_ID}") -> None:
    """Opens ``path`` as ``who`` would: the UI sends the browser to FAB's login page, the
    login form sends it back."""
    username, password = stack.login(who)
    page.goto(f"{stack.api_url}{path}")
    page.wait_for_url("**/auth/login/**")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign In", exact=True).click()
    page.wait_for_url(f"**{path}**")


def open_trigger_form(page):
    """The DAG page's trigger form, with "unpause on trigger" unticked: the run a test
    creates must stay queued (its defaults are the tutorial's: ResNet-50, 25000 steps)."""
    from playwright.sync_api import expect

    page.get_by_role("button", name="Trigger").first.click()
    form = page.get_by_role("dialog")
    expect(form.get_by_text(f"Trigger Dag - {DAG_ID}")).to_be_visible()
    unpause = form.locator("label", has_text=f"Unpause {DAG_ID} on trigger")  # ticked by default
    unpause.click()
    expect(unpause.locator("input")).not_to_be_checked()
    return form


def field(form, name: str):
    """The form row of one parameter (its label, input and description)."""
    return form.locator('[data-scope="field"][data-part="root"]').filter(
        has=form.page.locator(f'[name="element_{name}"], [id="number-input:element_{name}:inc"]')
    )


def check_field(form, name: str, spec: dict) -> None:
    from playwright.sync_api import expect

    row = field(form, name)
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
