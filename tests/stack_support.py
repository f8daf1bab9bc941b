"""What the tests of the native stack use: the stack itself (one per session, started in the
background), its REST API as a client would call it, and its UI in headless Chromium
(Debian's, driven by Playwright)."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote, unquote

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


def start_native_stack(say: Callable[[str], None]) -> tuple[NativeStack, Callable[[], None]]:
    """docker-compose.yaml's topology with Flower, up, and the DAG known to its API; and
    what stops it. Every process's output and every task log are kept under
    ``test-artifacts/distributed/`` when it stops (or fails to start)."""
    base = Path(tempfile.mkdtemp(prefix="headpose-stack-"))
    native = NativeStack(base, profiles=["flower"], say=say)

    def close() -> None:
        native.stop()
        kept = ARTIFACTS / "distributed"
        shutil.rmtree(kept, ignore_errors=True)
        if native.logs_dir.exists():
            shutil.copytree(native.logs_dir, kept / "processes", dirs_exist_ok=True)
        if native.layout and native.layout.volume("airflow-logs").exists():
            shutil.copytree(native.layout.volume("airflow-logs"), kept / "tasks", dirs_exist_ok=True)
        shutil.rmtree(base, ignore_errors=True)

    try:
        native.start()
        admin = Api(native.api_url, *native.login("admin"))
        deadline = time.monotonic() + 300
        while True:  # the dag-processor has to parse the file once before the API knows the DAG
            try:
                admin.call("GET", f"/api/v2/dags/{DAG_ID}")
                break
            except AssertionError:
                native.check_alive()
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        say(f"native stack: the API knows {DAG_ID}")
    except BaseException:
        close()
        raise
    return native, close


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

    def xcom_path(self, run_id: str, task_id: str, key: str) -> str:
        return f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"

    def xcom(self, run_id: str, task_id: str, key: str):
        return self.call("GET", self.xcom_path(run_id, task_id, key))["value"]


def run_to_end(api: Api, stack: NativeStack, conf: dict) -> tuple[str, str]:
    """``(run_id, final state)`` of one run triggered through the API; the DAG is unpaused
    only while it runs, so nothing else starts meanwhile."""
    api.set_paused(False)
    try:
        run_id = api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]
        stack.say(f"triggered {run_id}")
        return run_id, wait_for_run(api, stack, run_id)
    finally:
        api.set_paused(True)


def accepted_run(api: Api, stack: NativeStack, conf: dict) -> str:
    """A run whose ``validate_model`` accepted its model and recorded its links: an earlier
    one (the module's run test leaves one), else a new run with ``conf``."""
    for run in api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?state=success")["dag_runs"]:
        if api.status("GET", api.xcom_path(run["dag_run_id"], "validate_model", "links")) == 200:
            return run["dag_run_id"]
    run_id, state = run_to_end(api, stack, conf)
    assert state == "success", task_log_tails(stack, run_id)
    return run_id


def stored_object(stack: NativeStack, address: str) -> bytes:
    """The object an ``s3://`` URI, or a (presigned) URL at the stack's S3 endpoint, names;
    read with the bucket's credentials, whatever the URL's signature says."""
    if address.startswith("s3://"):
        bucket, _, key = address.removeprefix("s3://").partition("/")
    else:
        endpoint = stack.layout.object_store.rstrip("/") + "/"
        assert address.startswith(endpoint), f"{address} is not at the stack's S3 endpoint {endpoint}"
        bucket, _, key = unquote(address.removeprefix(endpoint).split("?", 1)[0]).partition("/")
    return stack.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def same_link(opened: str, given: str) -> bool:
    """Whether the browser opened the URL it was given: the same address and query values
    (the UI's editor may re-encode them, e.g. ``%2F`` as ``/``)."""
    from urllib.parse import parse_qs, urlsplit

    a, b = urlsplit(opened), urlsplit(given)
    return (a.scheme, a.netloc, unquote(a.path)) == (b.scheme, b.netloc, unquote(b.path)) \
        and parse_qs(a.query) == parse_qs(b.query)


def wait_for_run(api: Api, stack: NativeStack, run_id: str, approver: Api | None = None) -> str:
    """The run's final state; prints each task's state as it changes. The stack's profile requires
    a release approval: ``approver`` approves the run's request through the REST API when it
    waits for one (without, it waits for the request's timeout, a rejection)."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        stack.check_alive()
        for ti in api.task_instances(run_id):
            state = f"{ti['state']} on {ti['hostname']}" if ti["hostname"] else str(ti["state"])
            if seen.get(ti["task_id"]) != state:
                seen[ti["task_id"]] = state
                stack.say(f"{ti['task_id']}: {state}")
            if approver and ti["task_id"] == APPROVAL_TASK and ti["state"] == AWAITING_INPUT:
                assert answer_release(approver, run_id, "Approve") == 200
                stack.say(f"{APPROVAL_TASK}: approved through the REST API")
        run_state = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]
        if run_state in ("success", "failed"):
            return run_state
        time.sleep(5)
    return "timed out"


# -- release approval requests -----------------------------------------------------------

APPROVAL_TASK = "approve_release"
AWAITING_INPUT = "awaiting_input"


def hitl_path(run_id: str) -> str:
    """The REST API's address of the run's release request (Human-in-the-loop detail)."""
    return f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{APPROVAL_TASK}/-1/hitlDetails"


def answer_release(api: Api, run_id: str, option: str, comment: str | None = None) -> int:
    """Answers the run's release request as ``api``'s user; the HTTP status (200, or 403 for one who may not)."""
    return api.status("PATCH", hitl_path(run_id), {"chosen_options": [option], "params_input": {"comment": comment}})


def task_states(api: Api, run_id: str) -> dict[str, str | None]:
    return {ti["task_id"]: ti["state"] for ti in api.task_instances(run_id)}


def wait_for_task(api: Api, stack: NativeStack, run_id: str, task_id: str, states: set[str],
                  timeout: float = 300) -> float:
    """Waits until ``task_id`` of the run is in one of ``states``; the monotonic time it was seen so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        if task_states(api, run_id).get(task_id) in states:
            return time.monotonic()
        time.sleep(1)
    raise AssertionError(f"{task_id} of {run_id} is {task_states(api, run_id).get(task_id)}, not in {states}, "
                         f"after {timeout}s:\n{task_log_tails(stack, run_id)}")


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
        # A context of its own, so a test can open a second tab in the same logged-in session.
        page = browser.new_context(viewport={"width": 1400, "height": 1800}).new_page()  # the whole form
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


def ui_path(run_id: str, task_id: str | None = None, tab: str | None = None) -> str:
    """The UI's page of a run, or of one of its task instances (``tab``: ``xcom``...; none is its log)."""
    path = f"/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"
    if task_id:
        path += f"/tasks/{task_id}"
    return f"{path}/{tab}" if tab else path


def task_row(page, task_id: str):
    """The row of one task instance in the run page's table."""
    return page.locator("tbody tr").filter(has=page.get_by_role("link", name=task_id, exact=True))


def ui_state(state: str) -> str:
    """How the UI labels a task instance state: ``upstream_failed`` -> ``Upstream Failed``."""
    return state.replace("_", " ").title()


def search_log(page, text: str):
    """Types ``text`` into the log viewer's search box; returns its match count (``1 of 1``)."""
    page.get_by_placeholder("Search logs...").fill(text)
    return page.get_by_text(re.compile(r"^(\d+ of \d+|No matches)$"))


def wrap_log(page) -> None:
    """Turns on the log viewer's line wrapping, so a long line shows whole."""
    from playwright.sync_api import expect

    page.get_by_role("button", name="Log Settings").click()
    page.get_by_role("menuitem", name="Wrap").click()
    expect(page.get_by_role("menu")).to_be_hidden()  # closed, not fading over the log


def xcom_link(page, key: str, name: str):
    """The link the XCom view shows for ``name`` inside the JSON value of ``key``, unfolded:
    its first segment (the editor wraps a long URL over several lines, one link)."""
    from playwright.sync_api import expect

    row = page.locator("tbody tr").filter(has=page.get_by_role("cell", name=key, exact=True))
    expect(row).to_have_count(1)
    page.get_by_role("button", name="Expand all extra JSON").click()
    return row.locator(".view-line").filter(has_text=f'"{name}":').locator(".detected-link").first


def follow_link(page, link, target: str):
    """Opens ``target``, the URL the editor shows as ``link``, in a new tab of the logged-in
    session: ``(tab, url, HTTP status, the content type the tab shows)``.

    The editor must show ``target`` as a link (its first wrapped segment is a prefix of it). The
    tab is opened by the test rather than by Ctrl+clicking the editor: that gesture is the
    editor's own (it redraws the link under the pointer and opens it from a timer), and under
    load it sometimes opened nothing; what the contract covers is where the link goes and what
    the browser gets there."""
    shown = unquote(link.inner_text().strip().strip('"'))
    assert shown and unquote(target).startswith(shown), (shown, target)
    tab = page.context.new_page()
    response = tab.goto(target)
    tab.wait_for_load_state()
    return tab, tab.url, response.status, tab.evaluate("() => document.contentType")
