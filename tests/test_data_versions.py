"""New data and data versions: what an upload trains on, what a data version is, and that it is trained once.

Runs are planned by the real ``plan_run``; claims and records go to moto's server through
real boto3 clients; the watcher's trigger reads a real queue that moto's S3 notifies.
"""
from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime, timedelta, timezone

import boto3
import airflow_support  # noqa: F401  (plugins/ on sys.path: the watcher's trigger)
import pytest

from headpose.planning.new_data import Upload, choose, kind_of, uploads_of_events, uploads_of_messages
from headpose.planning.plan import plan_run
from headpose.planning.profile import ProfileError, load_profile
from headpose.planning.rules import RunParamsError
from headpose.registry import data_versions as dv

BUCKET = "headpose-data"
PREFIX = f"s3://{BUCKET}/headpose/incoming/"
QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/headpose-new-data"
PROFILE = {"HEADPOSE_RUN_DEFAULTS": json.dumps({"retrain_on": "either", "new_data_prefix": PREFIX,
                                                "new_data_queue": QUEUE})}
WHEN = datetime(2025, 3, 3, 3, tzinfo=timezone.utc)


def _plan(conf=None, *, run_type="manual", events=None, environ=PROFILE, day=0):
    return plan_run({"s3_bucket": BUCKET, **(conf or {})}, WHEN + timedelta(days=day), region="us-east-1",
                    dag_id="headpose_retraining", run_id=f"{run_type}__{day}", environ=environ, run_type=run_type,
                    new_data_events=events)


def _event(key, etag="e1", time="2025-03-03T03:00:00.000Z", name="ObjectCreated:Put", bucket=BUCKET):
    """The asset event's extra for one notification, as the watcher's trigger makes it."""
    record = {"eventTime": time, "eventName": name,
              "s3": {"bucket": {"name": bucket}, "object": {"key": key, "eTag": etag, "size": 3}}}
    return {"from_trigger": True, "payload": uploads_of_messages([{"MessageId": "m", "Body": json.dumps({"Records": [record]})}])}


# -- what an upload trains on -----------------------------------------------------------

def test_an_upload_trains_on_its_archive_or_manifest_and_everything_else_from_the_profile():
    plan = _plan(run_type="asset_triggered", events=[_event("headpose%2Fincoming%2Fprima%2B2025.tar.gz")])
    assert plan["run_params"]["dataset_source"] == "prima"
    assert plan["run_params"]["prima_archive_uri"] == PREFIX + "prima+2025.tar.gz"  # S3 sends keys URL-encoded
    assert plan["started_by"] == f"new data: {PREFIX}prima+2025.tar.gz"
    assert plan["run_params"]["training_steps"] == 1000  # the profile's (here the built-in default)
    staged = _plan(run_type="asset_triggered", events=[_event("headpose/incoming/set-7/manifest.json")])
    assert staged["run_params"]["dataset_source"] == PREFIX + "set-7/"
    assert staged["data_version"]["source_uri"] == PREFIX + "set-7/manifest.json"


def test_events_outside_the_prefix_or_of_unknown_kind_are_refused_before_anything_is_written():
    for key, reason in [("headpose/elsewhere/a.tar.gz", "outside new_data_prefix"),
                        ("headpose/incoming/notes.txt", "of unknown kind"),
                        ("headpose/incoming/a.zip", "of unknown kind")]:
        with pytest.raises(RunParamsError, match=reason):
            _plan(run_type="asset_triggered", events=[_event(key)])
    with pytest.raises(RunParamsError, match="not an object creation"):
        _plan(run_type="asset_triggered", events=[_event("headpose/incoming/a.tar.gz", name="ObjectRemoved:Delete")])
    with pytest.raises(RunParamsError, match="another bucket|outside new_data_prefix"):
        _plan(run_type="asset_triggered", events=[_event("headpose/incoming/a.tar.gz", bucket="other-bucket")])
    # A deployment that does not retrain on data has nothing to train an asset event on.
    with pytest.raises(RunParamsError, match="does not retrain on data"):
        _plan(run_type="asset_triggered", events=[_event("headpose/incoming/a.tar.gz")], environ={})


def test_of_several_queued_uploads_the_newest_is_trained_and_every_other_is_accounted_for():
    messages = [{"MessageId": "t", "Body": json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})},
                {"MessageId": "x", "Body": "not json"}]
    extras = [_event("headpose/incoming/a.tar.gz", "e1", "2025-03-03T03:00:00.000Z"),
              _event("headpose/incoming/b.tar.gz", "e2", "2025-03-03T04:00:00.000Z"),
              _event("headpose/incoming/b.tar.gz", "e2", "2025-03-03T04:00:00.000Z"),  # a repeated notification
              _event("headpose/incoming/readme.txt", "e3", "2025-03-03T05:00:00.000Z"),
              {"payload": uploads_of_messages(messages)}]
    uploads, others = uploads_of_events(extras)
    chosen = choose(uploads, others, PREFIX)
    assert chosen.chosen.uri == PREFIX + "b.tar.gz"
    assert [d["uri"] for d in chosen.duplicates] == [PREFIX + "b.tar.gz"]
    assert [s["uri"] for s in chosen.superseded] == [PREFIX + "a.tar.gz"]
    assert [r["uri"] for r in chosen.refused] == [PREFIX + "readme.txt"]
    assert [m["reason"] for m in chosen.other_messages] == ["S3's test event", "the body is not JSON"]
    assert len(chosen.describe()) == 6  # every upload and message has its line in plan_run's log
    assert kind_of(Upload(PREFIX + "x/manifest.json", "e", 1, "t", "ObjectCreated:Copy"), PREFIX)[0] == "manifest"


# -- the data version's identity ---------------------------------------------------------

@pytest.fixture()
def s3(s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    return s3_client


def _version(s3, conf=None, key="headpose/incoming/a.tar.gz", body=b"archive-1", **kw):
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    plan = _plan(run_type="asset_triggered", events=[_event(key)], **kw) if conf is None else \
        _plan({"dataset_source": "prima", "prima_archive_uri": f"s3://{BUCKET}/{key}", **conf}, **kw)
    return dv.identify(s3, plan)["id"]


def test_the_data_version_is_the_datas_bytes_with_the_settings_that_shape_dataset_and_model(s3):
    first = _version(s3)
    assert _version(s3, key="headpose/incoming/copy.tar.gz") == first  # the same bytes under another key
    assert _version(s3, {}, run_type="scheduled") == first  # a tick on the profile's same archive
    # Not shaping what is learnt: where and how fast it trains, how it is judged.
    for conf in ({"min_accuracy": 0.9, "promotion_margin": 0.1, "force_publish": True}, {"evaluation_steps": 5},
                 {"mixed_precision": "on", "xla": "on"}, {"max_run_seconds": 9000, "volume_size_gb": 7}):
        assert _version(s3, conf) == first, conf
    # New bytes, or a setting that changes the dataset or the training: a new version.
    assert _version(s3, body=b"archive-2") != first
    changed = {_version(s3, conf) for conf in ({"training_steps": 999}, {"resnet_size": 18}, {"seed": 1},
                                               {"batch_size": 32}, {"channel_order": "rgb"}, {"prima_num_data_aug": 3})}
    assert len(changed) == 6 and first not in changed


def test_a_synthetic_version_is_its_generators_settings():
    plan = _plan({"dataset_source": "synthetic"})
    same = dv.identify(None, _plan({"dataset_source": "synthetic", "min_accuracy": 0.1}))["id"]
    assert dv.identify(None, plan)["id"] == same
    assert dv.identify(None, _plan({"dataset_source": "synthetic", "synthetic_train_per_pose": 2}))["id"] != same


def test_the_profile_needs_the_prefix_and_queue_to_retrain_on_data_and_a_conf_may_not_set_them():
    with pytest.raises(ProfileError, match="needs new_data_prefix and new_data_queue"):
        load_profile({"HEADPOSE_RUN_DEFAULTS": '{"retrain_on": "data"}'})
    with pytest.raises(ProfileError, match="new_data_queue"):
        load_profile({"HEADPOSE_RUN_DEFAULTS": json.dumps({"retrain_on": "data", "new_data_prefix": PREFIX,
                                                           "new_data_queue": "headpose-new-data"})})
    for name in ("retrain_on", "new_data_prefix", "new_data_queue"):
        with pytest.raises(RunParamsError, match="deployment setting"):
            _plan({name: "data"})


# -- claimed once ---------------------------------------------------------------------

def _claim(s3, plan, run_id, states=None, now=None):
    version = dv.identify(s3, plan)
    return dv.claim(s3, plan, version, dag_id="headpose_retraining", run_id=run_id,
                    run_state=lambda dag, run: (states or {}).get(run), lease=timedelta(hours=1),
                    **({"now": now} if now else {}))


def _archive_plan(s3, **conf):
    s3.put_object(Bucket=BUCKET, Key="headpose/incoming/a.tar.gz", Body=b"archive-1")
    return _plan({"dataset_source": "prima", "prima_archive_uri": PREFIX + "a.tar.gz", **conf}, run_type="scheduled")


def test_two_runs_that_start_together_cannot_both_train_a_version(s3, s3_endpoint):
    plan, results = _archive_plan(s3), {}

    def run(name):
        client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        results[name] = _claim(client, plan, name, states={"run-a": "running", "run-b": "running"})
    threads = [threading.Thread(target=run, args=(name,)) for name in ("run-a", "run-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(d.train for d in results.values()) == [False, True]
    loser = next(d for d in results.values() if not d.train)
    assert "is training data version" in loser.reason
    assert _claim(s3, plan, next(n for n, d in results.items() if d.train)).train  # its own claim, on a retry


def test_a_trained_version_is_skipped_unless_forced_and_the_record_keeps_who_trained_it(s3):
    plan = _archive_plan(s3)
    first = _claim(s3, plan, "run-a")
    s3.put_object(Bucket=BUCKET, Key=f"headpose/published/history/{plan['training_job_name']}.json", Body=b"{}")
    settled = dv.settle(s3, first.uri, "run-a", dv.outcome_of(s3, BUCKET, "headpose", [plan["training_job_name"]]))
    assert settled["status"] == "published"
    again = _claim(s3, plan, "run-b", states={"run-a": "success"})
    assert not again.train and "was trained by run run-a (published" in again.reason
    forced = _claim(s3, _archive_plan(s3, force_retrain=True), "run-c", states={"run-a": "success"})
    assert forced.train and "forced" in forced.reason
    record, _ = dv.read_record(s3, first.uri)
    assert record["run_id"] == "run-c" and record["forced"] and record["earlier"][0]["run_id"] == "run-a"
    assert dv.settle(s3, first.uri, "run-a", {"status": "failed"}) is None  # no longer run-a's to settle


def test_a_claim_left_by_a_run_that_died_does_not_block_the_data(s3):
    plan = _archive_plan(s3)
    job = plan["training_job_name"]
    _claim(s3, plan, "run-a")  # run-a dies: its teardown never settles the claim
    assert not _claim(s3, plan, "run-b", states={"run-a": "running"}).train  # while it runs, it holds
    taken = _claim(s3, plan, "run-b", states={"run-a": "failed"})  # it failed before a model was judged
    assert taken.train and "ended failed" in taken.reason
    # A run that died after validate_model refused its model (a second attempt's report):
    # settled from that evidence, and the version counts as trained.
    s3.put_object(Bucket=BUCKET, Key=f"headpose/TFartifacts/{job}-2/rejected/report.json", Body=b"{}")
    skipped = _claim(s3, plan, "run-c", states={"run-b": "failed"})
    assert not skipped.train and "(refused" in skipped.reason
    record, _ = dv.read_record(s3, taken.uri)
    assert record["attempts"] == [job, f"{job}-2"] and record["settled_by"] == "run-c"
    # Another deployment's claim (a run this Airflow does not know) holds until it expires.
    other = _plan({"dataset_source": "prima", "prima_archive_uri": PREFIX + "a.tar.gz", "seed": 7}, run_type="scheduled",
                  day=1)
    _claim(s3, other, "elsewhere")
    assert not _claim(s3, other, "run-d").train
    later = lambda: datetime.now(timezone.utc) + timedelta(hours=2)  # noqa: E731
    assert _claim(s3, other, "run-d", now=later).train


def test_the_watchers_trigger_turns_an_upload_into_an_event_and_ignores_s3s_test_event(s3_endpoint, monkeypatch):
    """NewDataTrigger against moto: S3's own notification reaches the queue, the trigger names the upload."""
    from headpose.planning.new_data_setup import set_up_new_data
    from headpose_operators.new_data import NewDataTrigger

    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "login": "testing", "password": "testing",
         "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}))
    kw = dict(endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
              aws_secret_access_key="testing")
    s3, sqs = boto3.client("s3", **kw), boto3.client("sqs", **kw)
    s3.create_bucket(Bucket=BUCKET)
    settings = load_profile(PROFILE).settings
    set_up_new_data(s3, sqs, settings, log=lambda line: None)
    set_up_new_data(s3, sqs, settings, log=lambda line: None)  # converges: one notification, one queue
    assert len(s3.get_bucket_notification_configuration(Bucket=BUCKET)["QueueConfigurations"]) == 1
    s3.put_object(Bucket=BUCKET, Key="headpose/elsewhere/x.tar.gz", Body=b"x")  # not notified: outside
    s3.put_object(Bucket=BUCKET, Key="headpose/incoming/new.tar.gz", Body=b"x")
    trigger = NewDataTrigger(sqs_queue=QUEUE, aws_conn_id="aws_default", region_name="us-east-1",
                             wait_time_seconds=1, waiter_delay=0)

    async def first_event():
        async for event in trigger.run():
            return event.payload
    payload = asyncio.run(asyncio.wait_for(first_event(), timeout=60))
    assert [u["uri"] for u in payload["uploads"]] == [PREFIX + "new.tar.gz"]
    assert sqs.receive_message(QueueUrl=QUEUE, WaitTimeSeconds=0).get("Messages") is None  # received and deleted


# -- the operators: a scheduled run on unchanged data ------------------------------------

class _TaskInstance:
    """The ``ti`` of a task's context: the XComs the operators push and pull."""

    def __init__(self, pulled=None):
        self.pushed, self.pulled = {}, pulled or {}

    def xcom_push(self, key, value):
        self.pushed[key] = value

    def xcom_pull(self, task_ids):
        return self.pulled.get(task_ids)


def _context(run_id, ti):
    from types import SimpleNamespace

    return {"dag_run": SimpleNamespace(dag_id="headpose_retraining", run_id=run_id),
            "dag": SimpleNamespace(dagrun_timeout=timedelta(hours=192)), "ti": ti}


def test_a_scheduled_run_on_unchanged_data_trains_nothing_and_says_why(s3, s3_endpoint, monkeypatch):
    """The logic of the dags-test batch's scheduled tick, at operator level: tick 1 claims and
    settles, tick 2 on the same data is skipped with the reason in its summary."""
    from airflow.sdk.exceptions import AirflowSkipException
    from headpose_operators import ClaimDataVersionOperator, RecordDataVersionOperator

    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "login": "testing", "password": "testing",
         "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}))
    s3.put_object(Bucket=BUCKET, Key="headpose/datasets/set-1/manifest.json", Body=b'{"splits": {}}')
    conf = {"dataset_source": f"s3://{BUCKET}/headpose/datasets/set-1/"}
    first, second = (_plan(conf, run_type="scheduled", environ={}, day=day) for day in (0, 7))
    claim_ti = _TaskInstance()
    claimed = ClaimDataVersionOperator(task_id="claim_data_version", plan=first).execute(_context("tick-1", claim_ti))
    assert claimed["claimed"] and claimed["source_uri"].endswith("set-1/manifest.json")
    # Tick 1 trained and validate_model refused its model.
    s3.put_object(Bucket=BUCKET, Key=f"headpose/TFartifacts/{first['training_job_name']}/rejected/report.json", Body=b"{}")
    recorded = RecordDataVersionOperator(task_id="record_data_version", plan=first, claimed=claimed).execute(
        _context("tick-1", _TaskInstance({"train": {"attempts": [first["training_job_name"]]}})))
    assert recorded["status"] == "refused"
    ti = _TaskInstance()
    with pytest.raises(AirflowSkipException, match="nothing trained: data version .* was trained by run tick-1"):
        ClaimDataVersionOperator(task_id="claim_data_version", plan=second).execute(_context("tick-2", ti))
    assert ti.pushed["summary"]["decision"] == "not trained" and ti.pushed["summary"]["started_by"] == "the schedule"
    # A person's run in this schedule-only deployment trains as asked, claiming nothing.
    manual = _plan(conf, environ={}, day=8)
    assert ClaimDataVersionOperator(task_id="claim_data_version", plan=manual).execute(
        _context("manual-1", _TaskInstance())) == {"claimed": False}


# -- whole runs, in the suite's batch -------------------------------------------------------

@pytest.mark.e2e
def test_a_second_run_on_unchanged_data_trains_nothing_and_says_which_run_did(dag_batch):
    from airflow_support import run_id_of, task_states, xcom
    from dag_batch import BY_NAME
    from fault_support import keys

    first, second = BY_NAME["data version: first run"], BY_NAME["data version: unchanged"]
    assert dag_batch.run(first.name).exit_code == 0, dag_batch.run(first.name).output[-6000:]
    result = dag_batch.run(second.name)
    home, s3 = dag_batch.home, dag_batch.s3()
    first_run, second_run = run_id_of(home, first.when), run_id_of(home, second.when)
    assert task_states(home, first_run)["claim_data_version"] == "success"
    assert task_states(home, first_run)["record_data_version"] == "success"
    claimed = xcom(home, "claim_data_version", run_id=first_run)
    assert claimed["claimed"] is True
    record = json.loads(s3.get_object(Bucket=first.bucket,
                                      Key=f"headpose/data-versions/{claimed['id']}.json")["Body"].read())
    assert record["run_id"] == first_run and record["status"] in ("published", "not published", "refused")

    assert result.exit_code == 0, result.output[-6000:]
    states = task_states(home, second_run)
    for task_id in ("claim_data_version", "stage_dataset", "train", "publish", "record_data_version"):
        assert states[task_id] == "skipped", states
    assert states["cleanup"] == "success"
    assert f"was trained by run {first_run}" in result.output
    assert xcom(home, "claim_data_version", "summary", run_id=second_run)["decision"] == "not trained"
    assert not keys(s3, first.bucket, f"headpose/TFartifacts/{second.job}")
