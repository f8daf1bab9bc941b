"""``headpose_rollout`` run whole by ``airflow dags test`` (tests/dag_batch.py), on channels and device
reports seeded as data: a healthy canary promoted, an erroring one rolled back with an alert, and a
run with nothing to decide that stays green, skips ``act`` and says why."""
from __future__ import annotations

import pytest

from dag_batch import BY_NAME
from fleet_support import channel_jobs
from headpose.fleet.rollout import last_decision

pytestmark = pytest.mark.slow


def _run(dag_batch, kind: str):
    scenario = BY_NAME[f"rollout {kind}"]
    seeded = dag_batch.run(f"{scenario.name}: seed")
    assert seeded.exit_code == 0, seeded.output[-4000:]
    return scenario, dag_batch.run(scenario.name)


def test_a_healthy_canary_is_promoted_and_the_decision_recorded(dag_batch):
    scenario, result = _run(dag_batch, "promote")
    assert result.exit_code == 0, result.output[-6000:]
    s3 = dag_batch.s3()
    jobs = channel_jobs(s3, scenario.bucket)
    assert jobs["stable"] == jobs["canary"] == jobs["latest"]
    decision = last_decision(s3, scenario.bucket)
    assert decision["action"] == "promote" and decision["dag_run"]["dag_id"] == "headpose_rollout"
    assert {row["device_id"] for row in decision["fleet"]} == {"cam-1", "cam-2", "cam-3", "cam-4"}
    assert "| cam-1 | canary | canary |" in result.output and "decision: promote" in result.output


def test_an_erroring_canary_is_rolled_back_and_alerted(dag_batch):
    scenario, result = _run(dag_batch, "rollback")
    assert result.exit_code == 0, result.output[-6000:]
    jobs = channel_jobs(dag_batch.s3(), scenario.bucket)
    assert jobs["canary"] == jobs["stable"] == jobs["latest"]
    assert "HEADPOSE ALERT rollout dag=headpose_rollout" in result.output and "rolled back" in result.output
    assert "error rate 0.250 over 40 samples" in result.output


def test_a_run_with_nothing_to_decide_stays_green_skips_act_and_says_why(dag_batch):
    scenario, result = _run(dag_batch, "nothing to decide")
    assert result.exit_code == 0, result.output[-6000:]
    assert "nothing to roll out: the canary and stable channels name the same version" in result.output
    assert "HEADPOSE ALERT" not in result.output
    assert last_decision(dag_batch.s3(), scenario.bucket)["by"] == "seed"  # no record of its own
