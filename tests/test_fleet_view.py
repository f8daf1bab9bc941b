"""The fleet view on the native stack: FAB's roles, the UI's iframe and cookie, the stack's object store.

The channels and the devices' reports are seeded as data in the stack's S3 (the deployment's
folder, whose published state is put back afterwards: later stack tests run on it): stable
(and latest.json) name version A, the canary B, ``stack-cam-1`` runs B and ``stack-cam-3`` A.
A viewer sees the channels and the devices and no action (the API refuses its promote, with
its token and with the UI's cookie); the operator, in the UI's Browse > Fleet, clicks Promote, and stable.json, latest.json
and the mirror then name B and the decision record names the operator. Screenshots:
``test-artifacts/fleet-view-viewer.png`` and ``fleet-view-operator.png``.
"""
from __future__ import annotations

import pytest

from fleet_support import channel_candidate, channel_jobs, device_report, now_utc, publish_to_canary, put_report
from headpose.fleet.rollout import last_decision
from headpose.registry.pointer import mirror_files, read_pointer
from native_compose import STACK_PROFILE
from stack_support import ARTIFACTS, Api, browser_page, log_in
from test_crash_points import published

pytestmark = [pytest.mark.distributed, pytest.mark.browser]

FOLDER = "headpose"  # the deployment's: the view shows the profile's folder
SEEDED = (f"{FOLDER}/published/", f"{FOLDER}/devices/")
VIEW = "/plugin/headpose-fleet"
APP = "/headpose-fleet"


def _objects(s3, bucket: str) -> dict[str, bytes]:
    found = {}
    for prefix in SEEDED:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def _replace(s3, bucket: str, objects: dict[str, bytes]) -> None:
    for key in _objects(s3, bucket):
        s3.delete_object(Bucket=bucket, Key=key)
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


@pytest.fixture(scope="module")
def fleet(native_stack):
    """Stable A, canary B, two devices reporting; the stack's published state before it put back after."""
    s3, bucket = native_stack.s3_client(), native_stack.bucket
    before = _objects(s3, bucket)
    _replace(s3, bucket, {})
    try:
        stable = channel_candidate(s3, bucket, 0, rollout=None)
        published(s3, stable, accuracy=0.5)  # published before the deployment had a rollout
        canary = channel_candidate(s3, bucket, 7, rollout=STACK_PROFILE["rollout"])
        publish_to_canary(s3, canary)
        records = {job: read_pointer(s3, f"s3://{bucket}/{FOLDER}/published/history/{job}.json")[0]
                   for job in (stable.job, canary.job)}
        for device, channel, job in (("stack-cam-1", "canary", canary.job), ("stack-cam-3", "stable", stable.job)):
            put_report(s3, bucket, device, device_report(device, channel, records[job], at=now_utc()))
        assert channel_jobs(s3, bucket) == {"canary": canary.job, "stable": stable.job, "latest": stable.job}
        yield {"s3": s3, "bucket": bucket, "stable": stable.job, "canary": canary.job}
    finally:
        _replace(s3, bucket, before)


def test_a_viewer_sees_the_fleet_and_cannot_act(native_stack, fleet):
    from playwright.sync_api import expect

    viewer = Api(native_stack.api_url, *native_stack.login("viewer"))
    assert viewer.call("GET", f"{APP}/api/fleet")["can_act"] is False
    assert viewer.status("POST", f"{APP}/api/promote", {"expected_canary": fleet["canary"]}) == 403
    with browser_page(ARTIFACTS / "fleet-view-viewer-failure.png") as page:
        # FAB's Viewer role may not list plugins (Op may), so the UI has no Browse > Fleet entry for
        # it: a viewer opens the page itself, signed in by the UI's cookie.
        log_in(page, native_stack, "viewer")
        page.goto(f"{native_stack.api_url}{APP}/")
        view = page
        for job in (fleet["canary"], fleet["stable"]):
            expect(view.locator("#channels")).to_contain_text(job)
        expect(view.locator("#devices")).to_contain_text("stack-cam-1")
        expect(view.locator("#devices")).to_contain_text("stack-cam-3")
        expect(view.locator("#promote")).to_be_hidden()
        expect(view.locator("#rollback")).to_be_hidden()
        page.screenshot(path=str(ARTIFACTS / "fleet-view-viewer.png"), full_page=True)
        refused = page.request.post(f"{native_stack.api_url}{APP}/api/rollback",  # the UI's cookie, not a token
                                    data={"expected_canary": fleet["canary"]})
        assert refused.status == 403, refused.text()
    assert channel_jobs(fleet["s3"], fleet["bucket"])["stable"] == fleet["stable"]


def test_the_operator_promotes_the_canary_from_the_page(native_stack, fleet):
    from playwright.sync_api import expect

    operator, _ = native_stack.login("operator")
    with browser_page(ARTIFACTS / "fleet-view-operator-failure.png") as page:
        log_in(page, native_stack, "operator", path=VIEW)
        view = page.frame_locator("iframe")
        expect(view.locator("#channels")).to_contain_text(fleet["canary"])
        view.locator("#comment").fill("the canaries are healthy")
        view.locator("#promote").click()
        expect(view.locator("#message")).to_contain_text("done:")
        expect(view.locator("#decision")).to_contain_text(f"promote by {operator}")
        page.screenshot(path=str(ARTIFACTS / "fleet-view-operator.png"), full_page=True)
    s3, bucket = fleet["s3"], fleet["bucket"]
    assert channel_jobs(s3, bucket) == {"canary": fleet["canary"], "stable": fleet["canary"],
                                        "latest": fleet["canary"]}
    decision = last_decision(s3, bucket, FOLDER)
    assert (decision["action"], decision["by"], decision["comment"]) == ("promote", operator,
                                                                         "the canaries are healthy")
    latest, _ = read_pointer(s3, f"s3://{bucket}/{FOLDER}/published/latest.json")
    mirrored = {key.rsplit("/published/latest/", 1)[1] for key in _objects(s3, bucket) if "/published/latest/" in key}
    assert mirrored == set(mirror_files(latest))
