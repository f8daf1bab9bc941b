"""The rollout's decision on reports (``fleet.decision.assess``) and the reading of reports, which are
never trusted (``fleet.reports``): promote, roll back on errors, failed loads or latency; wait for
too few canaries, the soak, or nothing to roll out; malformed, foreign and stale reports counted."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest

from fleet_support import ROLLOUT, device_report, now_utc, put_report
from headpose.edge.channels import is_canary
from headpose.fleet import decision as decisions
from headpose.fleet.reports import classify, read_reports
from headpose.planning.rollout_settings import rollout_in_force

NOW = now_utc().replace(microsecond=0)
MOVED = NOW - timedelta(minutes=30)
SHA = {"A": "a" * 64, "B": "b" * 64}


def record(job: str, frozen: str, moved_at=MOVED) -> dict:
    return {"training_job_name": job, "files": {"frozen_model.pb": {"uri": "s3://b/x", "sha256": SHA[frozen]}},
            "formats": {"onnx": {"sha256": SHA[frozen][::-1].replace("a", "c").replace("b", "d")},
                        "openvino_fp32": {"sha256": "e" * 64 if frozen == "A" else "f" * 64}},
            "channel_moved": {"at": moved_at.isoformat()}}


STABLE, CANARY = record("job-a", "A"), record("job-b", "B")
BOUNDS = rollout_in_force({**ROLLOUT, "soak_minutes": 10})


def fleet(canary_kwargs=({}, {}), stable_kwargs=({}, {})) -> list[dict]:
    """cam-1/cam-2 on the canary, cam-3/cam-4 on stable, each with its own overrides."""
    reports = [device_report(f"cam-{i + 1}", "canary", CANARY, at=NOW, **kw) for i, kw in enumerate(canary_kwargs)]
    reports += [device_report(f"cam-{i + 3}", "stable", STABLE, at=NOW, **kw) for i, kw in enumerate(stable_kwargs)]
    return reports


@pytest.mark.parametrize("name, reports, action, words", [
    ("healthy", fleet(), "promote", "promote job-b (stable: job-a): 2 canaries ran it for >= 10 min"),
    ("errors", fleet(({"errors": 1}, {})), "rollback", "error rate 0.025 over 40 samples"),
    ("failed loads", fleet(({"load_failures": {"job-b": 12}}, {})), "rollback", "12 failed loads"),
    ("latency", fleet(({"p95": 9.0}, {"p95": 9.0})), "rollback", "onnx p95 9.00 ms on canaries vs 5.00 ms on stable"),
    ("too few canaries", fleet(({},)), "none", "waiting: 1 of min 2 canaries"),
    ("soak not reached", fleet(({"since": NOW - timedelta(minutes=2)}, {})), "none", "waiting: 1 of min 2"),
    ("no inferences", fleet(({"inferences": 0}, {"inferences": 0})), "none", "waiting: 0 of min 2"),
    ("errors under 10 samples", fleet(({"inferences": 3, "errors": 3}, {"inferences": 3})), "none", "waiting"),
])
def test_the_decision_on_recorded_reports(name, reports, action, words):
    assessment = decisions.assess(CANARY, STABLE, reports, BOUNDS, NOW)
    assert (assessment.action, words in assessment.reason) == (action, True), assessment.reason
    assert {row["device_id"] for row in assessment.rows} == {r["device_id"] for r in reports}


def test_nothing_to_roll_out_when_both_channels_name_one_version():
    assessment = decisions.assess(STABLE, STABLE, fleet(), BOUNDS, NOW)
    assert assessment.action == "none" and "nothing to roll out" in assessment.reason


def test_a_channel_that_moved_less_than_the_soak_ago_waits():
    canary = record("job-b", "B", moved_at=NOW - timedelta(minutes=3))
    reports = [device_report(f"cam-{i}", "canary", canary, at=NOW) for i in (1, 2)]
    assessment = decisions.assess(canary, STABLE, reports, BOUNDS, NOW)
    assert assessment.action == "none" and "moved less than the soak ago" in assessment.reason


def test_the_fleet_table_names_each_device_its_version_and_health():
    reports = fleet(({"errors": 5}, {}))
    assessment = decisions.assess(CANARY, STABLE, reports, BOUNDS, NOW)
    table = decisions.format_table(assessment.rows, assessment)
    assert "| cam-1 | canary | canary | job-b | onnx | 20 | 5 |" in table and "erroring" in table
    assert "| cam-3 | stable | stable | job-a |" in table and "decision: **rollback**" in table
    assert set(assessment.rows[0]) >= {"device_id", "channel", "training_job_name", "format", "last_seen",
                                       "inferences", "errors", "p95_ms", "health"}


def _body(report: dict) -> bytes:
    return json.dumps(report).encode()


@pytest.mark.parametrize("key_device, body, kind", [
    ("cam-1", b"not json", "malformed"),
    ("cam-1", b"{" + b" " * 17000 + b"}", "malformed"),
    ("cam-1", _body({**device_report("cam-1", "canary", CANARY, at=NOW), "extra": 1}), "malformed"),
    ("cam-1", _body(device_report("cam-1", "canary", CANARY, at=NOW + timedelta(minutes=10))), "malformed"),
    ("cam-1", _body({**device_report("cam-1", "canary", CANARY, at=NOW), "at": "2026-01-01T00:00:00"}), "malformed"),
    ("cam-1", _body(device_report("cam-9", "canary", CANARY, at=NOW)), "foreign"),
    ("cam-3", _body(device_report("cam-3", "canary", CANARY, at=NOW)), "foreign"),
    ("cam-1", _body(device_report("cam-1", "canary", CANARY, at=MOVED - timedelta(seconds=1))), "stale"),
    ("cam-1", _body(device_report("cam-1", "canary", CANARY, at=NOW)), None),
])
def test_a_report_is_checked_before_it_counts(key_device, body, kind):
    found, report, why = classify(key_device, body, BOUNDS, MOVED, NOW)
    assert found == kind, why
    assert (report is None) == (kind is not None)


def test_reports_are_read_from_s3_and_the_ignored_are_counted_with_a_warning(s3_client):
    s3_client.create_bucket(Bucket="fleet-reports")
    for report in fleet():
        put_report(s3_client, "fleet-reports", report["device_id"], report)
    put_report(s3_client, "fleet-reports", "cam-5", b"garbage")
    put_report(s3_client, "fleet-reports", "cam-6", device_report("cam-1", "stable", STABLE, at=NOW))
    s3_client.put_object(Bucket="fleet-reports", Key="headpose/devices/cam-7/other.json", Body=b"{}")
    lines: list[str] = []
    reports, ignored = read_reports(s3_client, "fleet-reports", "headpose", BOUNDS, moved_at=MOVED.isoformat(),
                                    now=NOW, log=lines.append)
    assert sorted(r["device_id"] for r in reports) == ["cam-1", "cam-2", "cam-3", "cam-4"]
    assert ignored == {"malformed": 1, "foreign": 1, "stale": 0}
    assert any("devices/cam-5/status.json" in line and "malformed" in line for line in lines)


def test_canary_share_membership_is_deterministic_and_about_the_share():
    rollout = {"canary_share": 0.25}
    ids = [f"thing-{n}" for n in range(10_000)]
    members = [device for device in ids if is_canary(device, rollout)]
    assert members == [device for device in ids if is_canary(device, dict(rollout))]
    assert 0.23 <= len(members) / len(ids) <= 0.27
    assert is_canary("cam-1", {"canary_devices": ["cam-1"]}) and not is_canary("cam-1", None)
