"""What the ops team relies on: schedule, retries, timeouts, docs and the failure alert."""
from __future__ import annotations

from datetime import timedelta

import pytest

from airflow_support import load_dag, load_dagbag
from headpose.planning import scheduling

# Every task that reads or writes S3 (all but plan_run and cleanup, since tasks hand off through it).
AWS_TASKS = ["stage_dataset", "package_code", "train", "download_artifact", "freeze_graph", "export_edge_models",
             "validate_model", "upload_frozen_model", "publish"]


@pytest.fixture(scope="module")
def dag():
    return load_dag()


# -- schedule, retries, timeouts -------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (None, "@weekly"), ("", "@weekly"), ("none", None), ("None", None), ("0 3 * * 1", "0 3 * * 1"),
    ("@daily", "@daily"),
])
def test_the_schedule_comes_from_the_environment(value, expected):
    env = {} if value is None else {"HEADPOSE_SCHEDULE": value}
    assert scheduling.schedule(env) == expected


def test_the_dag_runs_weekly_one_at_a_time_without_catch_up(dag):
    assert dag.schedule == "@weekly"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert timedelta(days=7) < dag.dagrun_timeout <= timedelta(days=8)


def test_an_overridden_schedule_is_used_and_a_bad_one_breaks_the_dag_loudly(monkeypatch):
    monkeypatch.setenv("HEADPOSE_SCHEDULE", "30 2 * * 1")
    assert load_dag().timetable.expression == "30 2 * * 1"
    monkeypatch.setenv("HEADPOSE_SCHEDULE", "none")
    assert load_dag().schedule is None
    monkeypatch.setenv("HEADPOSE_SCHEDULE", "every tuesday")
    bag = load_dagbag()
    assert bag.import_errors and "every tuesday" in str(bag.import_errors)


def test_aws_tasks_retry_with_exponential_backoff(dag):
    for task_id in AWS_TASKS:
        task = dag.task_dict[task_id]
        assert task.retries >= 2, task_id
        assert task.retry_exponential_backoff == 2.0, task_id
        assert task.max_retry_delay == timedelta(minutes=30), task_id
    for task_id in ("plan_run", "cleanup"):  # no AWS: one retry for a lost worker
        assert dag.task_dict[task_id].retries == 1


def test_retries_are_tunable_from_the_environment():
    env = {"HEADPOSE_AWS_RETRIES": "0", "HEADPOSE_RETRY_DELAY_SECONDS": "1"}
    assert scheduling.retry_args("download_artifact", env)["retries"] == 0
    assert scheduling.retry_args("freeze_graph", env)["retry_delay"] == timedelta(seconds=1)
    with pytest.raises(ValueError, match="HEADPOSE_AWS_RETRIES"):
        scheduling.retry_args("train", {"HEADPOSE_AWS_RETRIES": "many"})


def test_every_task_has_a_timeout_sized_to_its_job(dag):
    for task in dag.tasks:
        assert task.execution_timeout is not None, task.task_id
    assert dag.task_dict["plan_run"].execution_timeout <= timedelta(minutes=10)
    assert dag.task_dict["train"].execution_timeout > dag.task_dict["freeze_graph"].execution_timeout
    # Every task at its ceiling still fits in the run's timeout.
    assert sum((t.execution_timeout for t in dag.tasks), timedelta()) < dag.dagrun_timeout


def test_train_is_timed_by_its_own_request(dag):
    train = dag.task_dict["train"]
    train.config = {"StoppingCondition": {"MaxRuntimeInSeconds": 600}}
    train.pre_execute({"task": train})
    assert train.execution_timeout == timedelta(seconds=600) + scheduling.TRAIN_MARGIN
    train.config = {"StoppingCondition": {"MaxRuntimeInSeconds": 600, "MaxWaitTimeInSeconds": 7200}}
    train.pre_execute({"task": train})
    assert train.execution_timeout == timedelta(seconds=7200) + scheduling.TRAIN_MARGIN


def test_a_job_that_cannot_end_inside_the_run_timeout_is_refused():
    assert scheduling.run_time_problems({"MaxRuntimeInSeconds": 432000}, timedelta(days=8)) == []
    problems = scheduling.run_time_problems(
        {"MaxRuntimeInSeconds": 432000, "MaxWaitTimeInSeconds": 2_592_000}, timedelta(days=8)
    )
    assert problems and "HEADPOSE_DAGRUN_TIMEOUT_HOURS" in problems[0]


# -- docs ------------------------------------------------------------------------------

def test_the_dag_and_every_task_are_documented_in_the_ui(dag):
    assert "Operating" in dag.doc_md and "rollback" in dag.doc_md
    for task in dag.tasks:
        assert task.doc_md and len(task.doc_md) > 80, task.task_id


# -- the failure alert -----------------------------------------------------------------

class FakeTI:
    task_id = "download_artifact"
    dag_id = "headpose_retraining"

    def __init__(self):
        self.pushed: dict[str, str] = {}

    def xcom_pull(self, task_ids, key):
        if key == "training_job_name":
            assert task_ids == "plan_run"
            return "deeplens-TF-headpose-2025-03-01-03-00-00-000"
        return [self.pushed.get(key)]

    def xcom_push(self, key, value):
        self.pushed[key] = value


class FakeRun:
    run_id = "scheduled__2025-03-01T03:00:00+00:00"


class RecordingNotifier:
    """Stands in for e.g. SlackNotifier: a notifier class named by HEADPOSE_NOTIFIER."""

    sent: list[str] = []

    def __init__(self, text: str):
        self.text = text

    def __call__(self, context):
        RecordingNotifier.sent.append(self.text.replace("{{ headpose_failure_line }}", context["headpose_failure_line"]))


def failure_context(error: BaseException, ti=None) -> dict:
    return {"ti": ti or FakeTI(), "dag_run": FakeRun(), "exception": error}


def test_the_failure_line_names_task_job_and_reason():
    from headpose_operators.notify import failure_line

    line = failure_line(failure_context(ConnectionError("Could not connect to the endpoint URL\nTraceback...")))
    assert line == (
        "HEADPOSE FAILURE dag=headpose_retraining run=scheduled__2025-03-01T03:00:00+00:00 "
        "task=download_artifact training_job_name=deeplens-TF-headpose-2025-03-01-03-00-00-000 "
        "reason=ConnectionError: Could not connect to the endpoint URL"
    )
    assert "\n" not in line


def test_a_refusal_keeps_the_reasons_it_lists_on_the_line():
    from headpose.planning.rules import RunParamsError
    from headpose_operators.notify import failure_line

    error = RunParamsError("invalid run parameters:\n  - backend sagemaker needs the SageMaker execution role\n"
                           "  - epochs must be at least 1\nTraceback (most recent call last):")
    line = failure_line(failure_context(error))
    assert line.endswith(
        "reason=RunParamsError: invalid run parameters: - backend sagemaker needs the SageMaker execution role"
        " - epochs must be at least 1"
    ), line


def test_the_dag_failure_line_uses_the_reason_when_there_is_no_exception():
    from headpose_operators.notify import failure_line

    line = failure_line({"run_id": "manual__x", "reason": "timed_out"})
    assert "run=manual__x" in line and "reason=run timed_out" in line and "training_job_name=-" in line
    ti = FakeTI()
    ti.state = "success"  # the run's last task instance (a teardown, say) is not the culprit
    assert " task=- " in failure_line({"ti": ti, "reason": "task_failure"})
    ti.state = "failed"
    assert " task=download_artifact " in failure_line({"ti": ti, "reason": "task_failure"})


def test_a_failed_task_logs_its_line_outside_the_collapsed_group_and_records_it(capsys):
    from headpose_operators.notify import LINE_KEY, failure_notifier

    ti = FakeTI()
    failure_notifier()(failure_context(RuntimeError("boom"), ti))
    out = capsys.readouterr().out.splitlines()
    lines = [n for n, line in enumerate(out) if "HEADPOSE FAILURE" in line]
    assert len(lines) == 1 and "reason=RuntimeError: boom" in out[lines[0]]
    # The line sits between a closed group and the next one: the log viewer shows it.
    assert "::endgroup::" in out[lines[0] - 1] and "::group::" in out[lines[0] + 1]
    assert ti.pushed[LINE_KEY] == out[lines[0]][out[lines[0]].index("HEADPOSE FAILURE"):].split(" [")[0]


def test_the_run_sends_one_alert_with_the_failed_tasks_line(dag, capsys):
    from headpose_operators.notify import failure_notifier, run_alert

    ti = FakeTI()
    failure_notifier()(failure_context(RuntimeError("boom"), ti))
    capsys.readouterr()
    last = FakeTI()  # the run's last task instance (the teardown), which did not fail
    last.state, last.pushed = "success", ti.pushed
    run_alert({})({"ti": last, "dag": dag, "run_id": FakeRun.run_id, "reason": "task_failure"})
    alerts = [line for line in capsys.readouterr().out.splitlines() if "HEADPOSE ALERT" in line]
    assert len(alerts) == 1 and "task=download_artifact" in alerts[0] and "reason=RuntimeError: boom" in alerts[0]


def test_without_xcom_the_alert_still_names_the_task_that_failed(dag, capsys):
    class NoXComTI(FakeTI):  # what `airflow dags test` hands DAG callbacks: no supervisor to ask
        def xcom_pull(self, task_ids, key):
            raise ImportError("cannot import name 'SUPERVISOR_COMMS'")

    from headpose_operators.notify import run_alert

    run_alert({})({"ti": NoXComTI(), "dag": dag, "run_id": FakeRun.run_id, "reason": "task_failure"})
    alerts = [line for line in capsys.readouterr().out.splitlines() if "HEADPOSE ALERT" in line]
    assert len(alerts) == 1 and "task=download_artifact " in alerts[0]
    assert "reason=run task_failure (the task's log has the error)" in alerts[0]


def test_a_timed_out_run_alerts_with_a_line_of_its_own(dag, capsys):
    from headpose_operators.notify import run_alert

    run_alert({})({"dag": dag, "run_id": "manual__x", "reason": "timed_out"})
    alerts = [line for line in capsys.readouterr().out.splitlines() if "HEADPOSE ALERT" in line]
    assert len(alerts) == 1 and "reason=run timed_out" in alerts[0]


def test_another_notifier_is_plugged_in_by_name(dag):
    from headpose_operators.notify import failure_notifier, run_alert

    RecordingNotifier.sent.clear()
    ti = FakeTI()
    failure_notifier()(failure_context(RuntimeError("boom"), ti))
    alert = run_alert({
        "HEADPOSE_NOTIFIER": f"{__name__}.RecordingNotifier",
        "HEADPOSE_NOTIFIER_KWARGS": '{"text": "ALERT {{ headpose_failure_line }}"}',
    })
    assert RecordingNotifier.sent == []  # the task's own callback sends nothing
    alert({"ti": ti, "dag": dag, "run_id": FakeRun.run_id, "reason": "task_failure"})
    assert len(RecordingNotifier.sent) == 1
    assert RecordingNotifier.sent[0].startswith("ALERT HEADPOSE FAILURE") and "task=download_artifact" in RecordingNotifier.sent[0]


def test_a_notifier_that_cannot_send_does_not_raise(dag, capsys):
    from headpose_operators.notify import HeadposeRunAlert

    def broken(context):
        raise OSError("slack is down")

    HeadposeRunAlert(forward=broken)({"dag": dag, "run_id": "r", "reason": "task_failure"})
    assert "could not send the failure line" in capsys.readouterr().out


def test_every_task_logs_its_failure_and_the_dag_alerts_once(dag):
    from headpose_operators.notify import HeadposeFailureNotifier, HeadposeRunAlert

    callbacks = dag.on_failure_callback
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    assert [type(c) for c in callbacks] == [HeadposeRunAlert]
    for task in dag.tasks:
        assert [type(c) for c in task.on_failure_callback] == [HeadposeFailureNotifier], task.task_id


def test_the_alert_is_sent_with_the_serialized_dag_that_dags_test_hands_to_callbacks(dag, capsys):
    from airflow.serialization.serialized_objects import DagSerialization

    from headpose_operators.notify import run_alert

    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert not hasattr(serialized, "get_template_env")  # what broke BaseNotifier's rendering
    run_alert({})({"dag": serialized, "run_id": "manual__x", "reason": "task_failure"})
    alerts = [line for line in capsys.readouterr().out.splitlines() if "HEADPOSE ALERT" in line]
    assert len(alerts) == 1 and "run=manual__x" in alerts[0]
