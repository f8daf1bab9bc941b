"""Retraining on new data, on the native stack: an upload starts one run, the same data never trains twice.

The session's stack (tests/native_stack.py) retrains on data (``native_compose.TEST_ENV``'s
profile: ``retrain_on=either``, uploads under ``headpose/incoming/``, its queue in moto):
airflow-init made the queue, its policy and the bucket's notification; moto's S3 sends
its own notifications to moto's SQS; the triggerer runs the training data's watcher.

* Uploading a Prima-layout archive under the prefix creates exactly one run, which trains
  on it (plan_run's choice, the claim, stage_dataset's conversion, the settled record);
  the run's upstream asset events and the Assets view name the object.
* The same archive uploaded again, and the first upload's notification delivered twice,
  start runs that train nothing: their claim finds the version trained, every task that
  would train is skipped, and the summary names the run that trained it.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from urllib.parse import quote_plus

import boto3
import pytest

from native_compose import NEW_DATA_FOLDER, NEW_DATA_QUEUE
from stack_support import ARTIFACTS, DAG_ID, Api, task_log_tails, wait_for_run

pytestmark = pytest.mark.distributed

ASSET = "headpose_training_data"
KEY = NEW_DATA_FOLDER + "prima-upload-1.tar.gz"
WAIT_SECONDS = 300


def _until(what: str, check, stack, timeout: float = WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        found = check()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout} s")


def _asset(api) -> dict:
    assets = api.call("GET", f"/api/v2/assets?name_pattern={ASSET}")["assets"]
    return next(a for a in assets if a["name"] == ASSET)


def _data_runs(api, before: set[str]) -> list[dict]:
    runs = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?order_by=run_after")["dag_runs"]
    return [run for run in runs if run["dag_run_id"] not in before]


def _uploads(api, run_id: str) -> list[str]:
    events = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"]
    return [u["uri"] for e in events for u in e["extra"]["payload"]["uploads"]]


@pytest.fixture(scope="module")
def archive() -> bytes:
    from prima_archive_support import RealLayout, real_layout_members, tar_bytes
    import gzip

    return gzip.compress(tar_bytes(real_layout_members(RealLayout(persons=(1, 5), series=(1,)))), mtime=0)


def test_an_upload_trains_once_and_the_same_data_again_trains_nothing(native_stack, stack_api, archive):
    s3 = native_stack.s3_client()
    sqs = boto3.client("sqs", endpoint_url=native_stack.layout.object_store, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    uri = f"s3://{native_stack.bucket}/{KEY}"
    before = stack_api.run_ids()
    stack_api.set_paused(False)  # a paused DAG's assets have no watcher running
    try:
        _until("the training data's watcher", lambda: _asset(stack_api)["watchers"], native_stack)
        uploaded = datetime.now(timezone.utc)
        put = s3.put_object(Bucket=native_stack.bucket, Key=KEY, Body=archive)
        run = _until("a run started by the upload", lambda: _data_runs(stack_api, before), native_stack)[0]
        run_id = run["dag_run_id"]
        native_stack.say(f"new data: {KEY} started {run_id}")
        # The stack's profile requires a release approval: the operator gives it through the REST API.
        state = wait_for_run(stack_api, native_stack, run_id, approver=Api(native_stack.api_url,
                                                                           *native_stack.login("operator")))
        assert state in ("success", "failed"), state
        tis = {ti["task_id"]: ti for ti in stack_api.task_instances(run_id)}
        first_task = datetime.fromisoformat(tis["plan_run"]["start_date"])
        latency = {"upload_to_run_created_s": (datetime.fromisoformat(run["queued_at"]) - uploaded).total_seconds(),
                   "upload_to_first_task_s": (first_task - uploaded).total_seconds()}
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "new-data-latency.json").write_text(json.dumps(latency, indent=2) + "\n")
        native_stack.say(f"new data latency: {latency}")

        # Exactly one run, started by the asset, and it trained on the upload.
        assert [r["dag_run_id"] for r in _data_runs(stack_api, before)] == [run_id]
        assert run["run_type"] == "asset_triggered"
        assert _uploads(stack_api, run_id) == [uri]  # the run's page: what started it
        events = stack_api.call("GET", f"/api/v2/assets/events?asset_id={_asset(stack_api)['id']}")["asset_events"]
        assert uri in [u["uri"] for e in events for u in e["extra"]["payload"]["uploads"]]  # the Assets view
        assert stack_api.xcom(run_id, "plan_run", "new_data")["chosen"]["uri"] == uri
        assert stack_api.xcom(run_id, "plan_run", "run_params")["prima_archive_uri"] == uri
        claimed = stack_api.xcom(run_id, "claim_data_version", "return_value")
        assert claimed["claimed"] and claimed["source_uri"] == uri, task_log_tails(native_stack, run_id)
        assert tis["stage_dataset"]["state"] == tis["train"]["state"] == "success", task_log_tails(native_stack, run_id)
        record = json.loads(stored(s3, claimed["uri"]))
        assert record["run_id"] == run_id and record["status"] in ("published", "not published", "refused")
        assert record["source_uri"] == uri and record["kind"] == "prima_archive"

        # The same archive again, and the first notification delivered twice: nothing trains.
        seen = stack_api.run_ids()
        s3.put_object(Bucket=native_stack.bucket, Key=KEY, Body=archive)
        sqs.send_message(QueueUrl=NEW_DATA_QUEUE, MessageBody=json.dumps({"Records": [{
            "eventTime": uploaded.isoformat(), "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": native_stack.bucket},
                   "object": {"key": quote_plus(KEY), "eTag": put["ETag"].strip('"'), "size": len(archive)}}}]}))

        def both_consumed_and_done():
            runs = _data_runs(stack_api, seen)
            consumed = [u for r in runs for u in _uploads(stack_api, r["dag_run_id"])]
            done = all(r["state"] in ("success", "failed") for r in runs)
            return runs if len(consumed) >= 2 and done else None
        again = _until("the runs of the second upload and the duplicate", both_consumed_and_done, native_stack)
        for later in again:
            later_id = later["dag_run_id"]
            states = {ti["task_id"]: ti["state"] for ti in stack_api.task_instances(later_id)}
            assert later["state"] == "success", task_log_tails(native_stack, later_id)
            assert states["claim_data_version"] == states["stage_dataset"] == states["train"] == "skipped", states
            summary = stack_api.xcom(later_id, "claim_data_version", "summary")
            assert summary["decision"] == "not trained" and summary["trained_by_run"] == run_id, summary
        assert json.loads(stored(s3, claimed["uri"]))["run_id"] == run_id
    finally:
        stack_api.set_paused(True)


def stored(s3, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
