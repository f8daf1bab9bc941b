"""Release approval on the native stack: requests answered through the API server, timed out by the scheduler.

``airflow dags test`` cannot play a Human-in-the-loop request (the API server records the
answer, the scheduler's sweep the timeout), so these run on the session's native stack,
whose profile requires an approval from ``native_compose.TEST_APPROVER`` (the operator)
within ``TEST_APPROVAL_TIMEOUT_SECONDS``. The candidate is prebuilt rather than trained:
one run, created through the REST API, whose tasks up to ``upload_frozen_model`` are marked
done with their XComs and whose version's files are in the stack's S3 (under a folder of
its own, so the published model of ``test_distributed``'s run is not touched). Then the
real ``approve_release``, ``publish`` and ``record_release`` run on the workers, three times
(clearing ``approve_release`` asks again):

1. nobody answers: the viewer (role) and the admin (not an approver) are refused by the API
   server and in the UI, the request goes out with its link, and the scheduler's timeout
   rejects it - nothing published, the refusal kept, the Model Registry says Rejected;
2. the operator rejects it in the UI with a comment - nothing published, who/when/why kept;
3. the operator approves it in the UI - published, the record names the approver, the
   Model Registry says Approved.

(One approval through the REST API happens inside ``test_distributed``'s run.)
Screenshots: ``test-artifacts/approval-*.png``.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from headpose.planning.layout import split_s3_uri
from headpose.planning.plan import plan_run
from headpose.registry.versions import make_version
from native_compose import TEST_APPROVAL_TIMEOUT_SECONDS, TEST_APPROVER
from release_support import CHAMPION_RECALL, RECALL, packages, sagemaker
from stack_support import (
    APPROVAL_TASK, ARTIFACTS, AWAITING_INPUT, DAG_ID, Api, answer_release, browser_page, hitl_path, log_in,
    task_states, wait_for_run, wait_for_task,
)
from fleet_support import champion_on_channels
from test_crash_points import candidate

pytestmark = pytest.mark.distributed

FOLDER = "approval-tests"
CHAMPION_DAY = datetime(2025, 1, 6, 3, tzinfo=timezone.utc)
UPSTREAM = ("plan_run", "claim_data_version", "stage_dataset", "package_code", "train", "download_artifact",
            "freeze_graph", "export_edge_models", "validate_model", "upload_frozen_model")


@pytest.fixture(scope="module")
def prebuilt(native_stack, stack_api):
    """The run at ``approve_release``: its candidate version in S3, every task before it done."""
    stack_api.set_paused(True)
    run = stack_api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                         {"logical_date": None, "conf": {"headpose_folder": FOLDER}})
    run_id = run["dag_run_id"]
    environ = {k: v for k, v in native_stack.variables.items() if k.startswith("HEADPOSE_")}
    plan = plan_run({"headpose_folder": FOLDER}, datetime.fromisoformat(run["run_after"]), region="us-east-1",
                    dag_id=DAG_ID, run_id=run_id, environ=environ)
    # Nothing trains here, so there is no data version to claim; clearing approve_release clears its
    # setup, the claim, which then runs again and claims nothing.
    plan["data_version"]["enforced"] = False
    s3 = native_stack.s3_client()
    _publish_champion(s3, plan, environ)
    built = _candidate(s3, plan)
    version = make_version(s3, plan, built.frozen, built.report, built.edge)
    xcoms = {"plan_run": plan, "claim_data_version": {"claimed": False}, "stage_dataset": built.dataset,
             "train": built.training, "validate_model": built.report, "upload_frozen_model": version}
    for task_id, value in xcoms.items():
        stack_api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries",
                       {"key": "return_value", "value": value})
    for task_id in UPSTREAM:
        stack_api.call("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}",
                       {"new_state": "success"})
    operator = Api(native_stack.api_url, *native_stack.login("operator"))
    state = {"run_id": run_id, "plan": plan, "version": version, "operator": operator, "asked": [],
             "published": published(native_stack, plan)}
    yield state
    # Whatever happened, the run ends and the DAG is paused again: test_distributed runs next.
    if task_states(stack_api, run_id).get(APPROVAL_TASK) == AWAITING_INPUT:
        answer_release(operator, run_id, "Reject", "the test module ended")
    stack_api.set_paused(False)
    try:
        wait_for_run(stack_api, native_stack, run_id)
    finally:
        stack_api.set_paused(True)


def _publish_champion(s3, plan: dict[str, Any], environ: dict[str, str]) -> None:
    """The model the candidate is compared with, published in the folder before the deployment had
    a rollout; the channels then start from it, as they do on a deployment's first rollout."""
    from headpose.registry.channels import ensure_channels
    from test_crash_points import published as publish_cleanly

    defaults = {k: v for k, v in json.loads(environ["HEADPOSE_RUN_DEFAULTS"]).items() if k != "rollout"}
    before = plan_run({"headpose_folder": FOLDER}, CHAMPION_DAY, region="us-east-1", dag_id=DAG_ID,
                      run_id="scheduled__champion", environ={**environ, "HEADPOSE_RUN_DEFAULTS": json.dumps(defaults)})
    champion = candidate(s3, plan["bucket"], 0, plan=before)
    champion.report["per_class_recall"] = CHAMPION_RECALL
    publish_cleanly(s3, champion, accuracy=0.5)
    ensure_channels(s3, plan["bucket"], plan["folder"], plan["deployment"]["rollout"])


def _candidate(s3, plan: dict[str, Any]):
    """``test_crash_points.candidate`` for this plan, with what the approver's page shows and its links."""
    built = candidate(s3, plan["bucket"], 0, plan=plan)
    bucket, folder = split_s3_uri(plan["candidate_prefix"])
    page = b"<!doctype html><title>report</title><h1>%s</h1>" % plan["training_job_name"].encode()
    s3.put_object(Bucket=bucket, Key=folder + "report.html", Body=page, ContentType="text/html")
    links = {name: s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": folder + file},
                                             ExpiresIn=3600)
             for name, file in (("report_page", "report.html"), ("confusion_matrix", "confusion_matrix.png"),
                                ("report", "report.json"))}
    built.report.update(report_html_uri=plan["candidate_prefix"] + "report.html",
                        report_html_sha256=hashlib.sha256(page).hexdigest(), per_class_recall=RECALL, links=links)
    # As validate_model leaves it when it scored a published model on the same images (that model
    # is described, not published: this folder's published/ stays empty until the approval).
    built.report["champion"] = {**champion_on_channels(s3, built), "images": 93, "per_class_recall": CHAMPION_RECALL}
    built.dataset.update(train_count=558, eval_count=93)
    built.training["Training"]["BillableTimeInSeconds"] = 42
    return built


def ask(native_stack, stack_api, prebuilt: dict) -> float:
    """Runs approve_release (again, after the first time: cleared with what follows it) until it waits."""
    run_id = prebuilt["run_id"]
    if prebuilt["asked"]:
        stack_api.call("POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances", {
            "dry_run": False, "task_ids": [APPROVAL_TASK], "dag_run_id": run_id, "only_failed": False,
            "include_downstream": True, "reset_dag_runs": True})
    stack_api.set_paused(False)
    asked = wait_for_task(stack_api, native_stack, run_id, APPROVAL_TASK, {AWAITING_INPUT}, timeout=300)
    prebuilt["asked"].append(asked)
    return asked


def finish(native_stack, stack_api, prebuilt: dict) -> dict[str, str | None]:
    run_id = prebuilt["run_id"]
    try:
        assert wait_for_run(stack_api, native_stack, run_id) == "success"
    finally:
        stack_api.set_paused(True)
    return task_states(stack_api, run_id)


def answered(api: Api, run_id: str, timeout: float = 60) -> dict:
    """The request once the API server has recorded its answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = api.call("GET", hitl_path(run_id))
        if request["response_received"]:
            return request
        time.sleep(1)
    raise AssertionError(f"the request of {run_id} was not answered in {timeout}s")


def stored(native_stack, uri: str) -> Any:
    bucket, key = split_s3_uri(uri)
    return json.loads(native_stack.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())


def published(native_stack, plan: dict) -> dict[str, str]:
    """``{key: ETag}`` under the folder's ``published/``."""
    bucket, prefix = split_s3_uri(plan["published_prefix"])
    listed = native_stack.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listed}


def package_status(native_stack, plan: dict) -> dict[str, Any]:
    client = sagemaker(native_stack.layout.object_store)
    return packages(client, plan["deployment"]["model_package_group"])[plan["version_prefix"]]


def request_page(run_id: str) -> str:
    return f"/dags/{DAG_ID}/runs/{run_id}/tasks/{APPROVAL_TASK}/required_actions"


def refused_in_the_browser(native_stack, run_id: str, who: str, screenshot: str) -> None:
    """``who`` opens the request and presses Approve; the UI says no, and nothing was answered."""
    from playwright.sync_api import expect

    with browser_page(ARTIFACTS / f"approval-{who}-failure.png") as page:
        log_in(page, native_stack, who, request_page(run_id))
        page.get_by_role("button", name="Approve", exact=True).click()
        expect(page.get_by_text("You do not have permission to perform this action.").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)


def test_only_the_named_approver_may_answer_and_no_answer_is_a_rejection(native_stack, stack_api, prebuilt):
    run_id, plan = prebuilt["run_id"], prebuilt["plan"]
    asked = ask(native_stack, stack_api, prebuilt)
    request = stack_api.call("GET", hitl_path(run_id))
    assert request["assigned_users"] == [{"id": TEST_APPROVER, "name": TEST_APPROVER}]
    assert request["defaults"] == ["Reject"] and request["options"] == ["Approve", "Reject"]
    for words in (plan["training_job_name"], "before: 0.5000", "**after: 0.9000**", "**-0.100 (worst)**",
                  "| onnx | 0.9000 | 1.00 |",
                  "558 training, 93 evaluation images", "42 billable seconds", "[Report](http"):
        assert words in request["body"], words
    assert package_status(native_stack, plan)["ModelApprovalStatus"] == "PendingManualApproval"
    # Refused by the API server: the viewer for its role, the admin for not being the approver.
    viewer, admin = (Api(native_stack.api_url, *native_stack.login(who)) for who in ("viewer", "admin"))
    assert answer_release(viewer, run_id, "Approve") == 403
    assert answer_release(admin, run_id, "Approve") == 403
    refused_in_the_browser(native_stack, run_id, "viewer", "approval-viewer-refused.png")
    refused_in_the_browser(native_stack, run_id, "admin", "approval-admin-not-an-approver.png")
    browsed = time.monotonic() - asked
    assert task_states(stack_api, run_id)[APPROVAL_TASK] == AWAITING_INPUT, (
        f"the refusals took {browsed:.0f}s of the {TEST_APPROVAL_TIMEOUT_SECONDS}s the request waits")
    states = finish(native_stack, stack_api, prebuilt)
    waited = time.monotonic() - asked
    native_stack.say(f"approval request 1: browser {browsed:.0f}s, rejected by the timeout after {waited:.0f}s")
    assert (states[APPROVAL_TASK], states["publish"], states["record_release"]) == ("success", "skipped", "success")
    assert waited >= TEST_APPROVAL_TIMEOUT_SECONDS
    summary = stack_api.xcom(run_id, "record_release", "summary")
    assert summary["promoted"] is False
    assert f"no answer within {TEST_APPROVAL_TIMEOUT_SECONDS}s (a timeout is a rejection)" in summary["reason"]
    answers = stored(native_stack, plan["version_prefix"] + "approval.json")["answers"]
    assert [(a["decision"], a["by"], a["timed_out"]) for a in answers] == [("rejected", None, True)]
    link = f"{native_stack.api_url}{request_page(run_id)}?map_index=-1"
    assert answers[0]["request_link"] == link
    logs = native_stack.layout.volume("airflow-logs") / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={APPROVAL_TASK}"
    assert f"HEADPOSE APPROVAL REQUEST" in (text := "".join(p.read_text() for p in logs.rglob("*.log")))
    assert f"answer at {link}" in text  # the line $HEADPOSE_NOTIFIER sends (the stack's: the log)
    assert published(native_stack, plan) == prebuilt["published"]
    assert package_status(native_stack, plan)["ModelApprovalStatus"] == "Rejected"


def test_a_rejection_in_the_ui_publishes_nothing_and_keeps_who_when_and_why(native_stack, stack_api, prebuilt):
    from playwright.sync_api import expect

    run_id, plan = prebuilt["run_id"], prebuilt["plan"]
    ask(native_stack, stack_api, prebuilt)
    with browser_page(ARTIFACTS / "approval-reject-failure.png") as page:
        log_in(page, native_stack, "operator", request_page(run_id))
        expect(page.get_by_text(f"Release {plan['training_job_name']} to the devices?")).to_be_visible()
        expect(page.get_by_text("-0.100 (worst)")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "approval-request.png"), full_page=True)  # what an approver sees
        report = page.context.browser.new_page()  # its link opens the report: presigned, no login needed
        report.goto(page.get_by_role("link", name="Report", exact=True).get_attribute("href"))
        expect(report.get_by_role("heading", name=plan["training_job_name"])).to_be_visible()
        report.close()
        page.locator('[name="element_comment"]').fill("recall of pan ctr / tilt ctr fell by 0.1")
        page.get_by_role("button", name="Reject", exact=True).click()
        answered(stack_api, run_id)
        page.screenshot(path=str(ARTIFACTS / "approval-rejected.png"), full_page=True)
    states = finish(native_stack, stack_api, prebuilt)
    assert (states[APPROVAL_TASK], states["publish"], states["record_release"]) == ("success", "skipped", "success")
    answers = stored(native_stack, plan["version_prefix"] + "approval.json")["answers"]
    assert [(a["decision"], a["by"], a["comment"]) for a in answers[1:]] == [
        ("rejected", TEST_APPROVER, "recall of pan ctr / tilt ctr fell by 0.1")]
    assert published(native_stack, plan) == prebuilt["published"]
    package = package_status(native_stack, plan)
    assert package["ModelApprovalStatus"] == "Rejected" and "fell by 0.1" in package["ApprovalDescription"]


def test_an_approval_in_the_ui_publishes_and_the_record_names_the_approver(native_stack, stack_api, prebuilt):
    from playwright.sync_api import expect

    run_id, plan = prebuilt["run_id"], prebuilt["plan"]
    ask(native_stack, stack_api, prebuilt)
    with browser_page(ARTIFACTS / "approval-approve-failure.png") as page:
        log_in(page, native_stack, "operator", request_page(run_id))
        page.locator('[name="element_comment"]').fill("checked the report")
        page.get_by_role("button", name="Approve", exact=True).click()
        answered(stack_api, run_id)
        page.screenshot(path=str(ARTIFACTS / "approval-approved.png"), full_page=True)
    states = finish(native_stack, stack_api, prebuilt)
    assert (states[APPROVAL_TASK], states["publish"], states["record_release"]) == ("success", "success", "success")
    # The stack's profile has a rollout: an approval moves the canary channel, nothing else.
    pointer = stored(native_stack, plan["canary_pointer_uri"])
    assert (pointer["training_job_name"], pointer["channel"]) == (plan["training_job_name"], "canary")
    unmoved = {key: etag for key, etag in prebuilt["published"].items() if key.endswith(("/latest.json", "/stable.json"))}
    assert unmoved and {key: published(native_stack, plan)[key] for key in unmoved} == unmoved
    assert (pointer["approval"]["decision"], pointer["approval"]["by"], pointer["approval"]["comment"]) == (
        "approved", TEST_APPROVER, "checked the report")
    package = package_status(native_stack, plan)
    assert package["ModelApprovalStatus"] == "Approved" and pointer["model_package"]["arn"] == package["ModelPackageArn"]
    assert package["CustomerMetadataProperties"]["published_record_uri"] == plan["history_record_uri"]
    answers = stored(native_stack, plan["version_prefix"] + "approval.json")["answers"]
    assert [a["decision"] for a in answers] == ["rejected", "rejected", "approved"]  # every answer stays on file
