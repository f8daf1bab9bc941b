"""The channels on moto's S3: publish with a rollout moves the canary only; promote and roll back
by hand move stable (then latest.json and the mirror) or the canary; the rollout setting is checked.

Crash points of the same operations are test_crash_points_channels'.
"""
from __future__ import annotations

import itertools
import json

import pytest

from fleet_support import ROLLOUT, channel_candidate, channel_jobs, publish_to_canary
from headpose.planning.rules import RunParamsError
from headpose.planning.plan import plan_run
from headpose.planning.profile import ProfileError, load_profile
from headpose.registry import channels
from headpose.registry.pointer import read_pointer
from headpose.registry.summary import format_summary
from headpose.fleet.rollout import NothingToRollOut, StaleCanary, act_by_hand, last_decision
from test_crash_points import FIRST_RUN, publish, published, upload
from crash_points import listing

_buckets = itertools.count()


@pytest.fixture()
def bucket(s3_client) -> str:
    name = f"channels-{next(_buckets)}"
    s3_client.create_bucket(Bucket=name)
    return name


def untouched(s3, bucket: str) -> dict[str, str]:
    """ETags of what a canary move must not touch: latest.json, stable.json, the mirror."""
    return {key: etag for key, etag in listing(s3, bucket).items()
            if key.endswith(("published/latest.json", "channels/stable.json")) or "/published/latest/" in key}


def test_first_publish_with_a_rollout_moves_only_the_canary(s3_client, bucket):
    run = channel_candidate(s3_client, bucket, 0)
    publish_to_canary(s3_client, run)
    assert channel_jobs(s3_client, bucket) == {"canary": run.job, "stable": None, "latest": None}
    assert not [key for key in listing(s3_client, bucket) if "/published/latest/" in key]
    canary, _ = read_pointer(s3_client, run.plan["canary_pointer_uri"])
    assert canary["channel"] == "canary" and canary["rollout"]["canary_devices"] == ["cam-1", "cam-2"]
    decision = channels.read_decision(s3_client, canary["channel_moved"]["decision_uri"])
    assert decision["id"] == f"publish-{run.job}" and decision["action"] == "canary"
    assert decision["canary"] == channels.version_of(canary) and decision["stable"] is None
    assert read_pointer(s3_client, run.plan["history_record_uri"])[0]["training_job_name"] == run.job


def test_channels_start_from_latest_and_a_publish_leaves_stable_latest_and_mirror_alone(s3_client, bucket):
    before = channel_candidate(s3_client, bucket, 0, rollout=None)
    published(s3_client, before, accuracy=0.5)  # a deployment that published before it had a rollout
    kept = untouched(s3_client, bucket)
    run = channel_candidate(s3_client, bucket, 7)
    publish_to_canary(s3_client, run)
    assert channel_jobs(s3_client, bucket) == {"canary": run.job, "stable": before.job, "latest": before.job}
    stable, _ = read_pointer(s3_client, run.plan["stable_pointer_uri"])
    assert stable["channel_moved"]["by"] == "bootstrap" and stable["channel"] == "stable"
    assert {k: v for k, v in untouched(s3_client, bucket).items() if "stable.json" not in k} == kept
    canary, _ = read_pointer(s3_client, run.plan["canary_pointer_uri"])
    assert canary["previous"]["training_job_name"] == before.job


def test_the_champion_is_the_stable_channel_and_a_moved_stable_refuses_the_publish(s3_client, bucket):
    first = channel_candidate(s3_client, bucket, 0)
    publish_to_canary(s3_client, first)
    act_by_hand(s3_client, bucket=bucket, folder="headpose", action="promote", by="ops", comment="",
                expected_canary=first.job, mirror=True, rollout=ROLLOUT)
    run = channel_candidate(s3_client, bucket, 7)
    assert run.plan["champion_pointer_uri"] == run.plan["stable_pointer_uri"]
    run.report = {**run.report, "champion": {"present": True, "training_job_name": "someone-else", "accuracy": 0.5,
                                             "comparable": True, "frozen_model_sha256": "0" * 64}}
    version = upload(s3_client, run)
    from headpose.registry.promotion import publish_run

    decision, summary = publish_run(s3_client, run.plan, run.training, run.dataset, run.report, version,
                                    dag_id="headpose_retraining", run_id="r")
    assert not decision.promote and "the stable channel changed after the comparison" in decision.reason
    assert channel_jobs(s3_client, bucket)["canary"] == first.job


def test_promote_and_rollback_by_hand_move_the_channels_and_record_who(s3_client, bucket):
    first = channel_candidate(s3_client, bucket, 0)
    publish_to_canary(s3_client, first)
    promoted = act_by_hand(s3_client, bucket=bucket, folder="headpose", action="promote", by="alice",
                           comment="looks fine", expected_canary=first.job, mirror=True, rollout=ROLLOUT)
    assert channel_jobs(s3_client, bucket) == {"canary": first.job, "stable": first.job, "latest": first.job}
    mirrored = sorted(k.rsplit("/published/latest/", 1)[1] for k in listing(s3_client, bucket) if "/published/latest/" in k)
    assert "frozen_model.pb" in mirrored and "edge/model.onnx" in mirrored
    latest, _ = read_pointer(s3_client, first.plan["published_pointer_uri"])
    assert latest["channel"] == "stable" and latest["channel_moved"]["by"] == "alice"
    assert promoted["comment"] == "looks fine" and last_decision(s3_client, bucket)["id"] == promoted["id"]
    with pytest.raises(NothingToRollOut):
        act_by_hand(s3_client, bucket=bucket, folder="headpose", action="promote", by="alice", comment="",
                    expected_canary=None, mirror=True, rollout=ROLLOUT)

    second = channel_candidate(s3_client, bucket, 7)
    publish_to_canary(s3_client, second)
    summary_line = channel_jobs(s3_client, bucket)
    assert summary_line == {"canary": second.job, "stable": first.job, "latest": first.job}
    with pytest.raises(StaleCanary):
        act_by_hand(s3_client, bucket=bucket, folder="headpose", action="rollback", by="bob", comment="",
                    expected_canary=first.job, mirror=True, rollout=ROLLOUT)
    act_by_hand(s3_client, bucket=bucket, folder="headpose", action="rollback", by="bob", comment="slow",
                expected_canary=second.job, mirror=True, rollout=ROLLOUT)
    canary, _ = read_pointer(s3_client, second.plan["canary_pointer_uri"])
    assert canary["training_job_name"] == first.job and canary["rolled_back"]["from"] == second.job
    assert channel_jobs(s3_client, bucket)["latest"] == first.job


def test_the_publish_summary_says_the_canary_moved_and_stable_waits(s3_client, bucket):
    before = channel_candidate(s3_client, bucket, 0, rollout=None)
    published(s3_client, before, accuracy=0.5)
    run = channel_candidate(s3_client, bucket, 7)
    from fleet_support import champion_on_channels
    from headpose.registry.promotion import publish_run

    run.report = {**run.report, "champion": champion_on_channels(s3_client, run)}
    decision, summary = publish_run(s3_client, run.plan, run.training, run.dataset, run.report,
                                    upload(s3_client, run), dag_id="headpose_retraining", run_id="r")
    text = format_summary(summary)
    assert decision.promote and "published to the canary channel" in text
    assert f"stable ({before.job}) moves when the canaries are healthy (headpose_rollout)" in text
    again, _ = publish_run(s3_client, run.plan, run.training, run.dataset, run.report,
                           upload(s3_client, run), dag_id="headpose_retraining", run_id="r")
    assert again.promote and "already published to a channel" in again.reason


@pytest.mark.parametrize("rollout, words", [
    ({"canary_share": 0.1, "canary_devices": ["cam-1"]}, "not valid under any"),
    ({"min_canaries": 2}, "not valid under any"),
    ({"canary_share": 1.5}, "greater than the maximum"),
    ({"canary_devices": ["bad/name"]}, "does not match"),
    ({"canary_share": 0.1, "soak": 3}, "Additional properties"),
    ({"canary_share": 0.1, "max_p95_latency_ratio": 0.5}, "less than the minimum"),
])
def test_a_bad_rollout_setting_is_refused_with_the_rule(rollout, words):
    with pytest.raises(ProfileError, match=words):
        load_profile({"HEADPOSE_RUN_DEFAULTS": json.dumps({"rollout": rollout})})


def test_rollout_is_a_deployment_setting_no_conf_may_carry():
    with pytest.raises(RunParamsError, match="rollout"):
        plan_run({"s3_bucket": "models", "backend": "local", "rollout": {"canary_share": 1}}, FIRST_RUN,
                 region="us-east-1", dag_id="headpose_retraining", run_id="manual", environ={})
