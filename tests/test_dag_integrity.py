"""The DAG file parses cleanly, wires the tasks in order and stays light to import."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from airflow_support import DAGS, INCLUDE, PLUGINS, load_dag, load_dagbag

TASKS = [
    "plan_run", "claim_data_version", "stage_dataset", "package_code", "train", "download_artifact", "freeze_graph",
    "export_edge_models", "validate_model", "upload_frozen_model", "approve_release", "publish", "record_data_version",
    "cleanup",
]


@pytest.fixture(scope="module")
def dag():
    return load_dag()


def test_the_dag_folder_imports_without_errors():
    bag = load_dagbag()
    assert bag.import_errors == {}
    assert sorted(bag.dags) == ["headpose_retraining", "headpose_rollout"]


def test_tasks_run_in_the_documented_order(dag):
    assert sorted(dag.task_ids) == sorted([*TASKS, "record_release"])
    for before, after in zip(TASKS, TASKS[1:]):
        assert before in dag.task_dict[after].upstream_task_ids, f"{before} -> {after}"
    order = [t.task_id for t in dag.topological_sort() if t.task_id != "record_release"]
    assert order == TASKS


def test_the_release_decision_is_recorded_whatever_happened_without_turning_a_failed_run_green(dag):
    from headpose_operators import ReleaseApprovalOperator

    approve, record = dag.task_dict["approve_release"], dag.task_dict["record_release"]
    assert isinstance(approve, ReleaseApprovalOperator)
    assert approve.defaults == ["Reject"] and approve.options == ["Approve", "Reject"]  # a timeout rejects
    assert approve.skip_on_reject == ("publish",)
    assert set(approve.serialized_params) == {"comment"}  # the request's form: the run's params stay out of it
    assert record.trigger_rule == "all_done" and record.upstream_task_ids == {"approve_release"}
    # Beside publish, not after it: a leaf of its own (only teardowns follow either), so a failed
    # publish (or a failed upstream that leaves publish upstream_failed) still fails the run.
    assert "record_release" not in dag.task_dict["publish"].upstream_task_ids
    for task_id in ("record_release", "publish"):
        assert all(dag.task_dict[t].is_teardown for t in dag.task_dict[task_id].downstream_task_ids), task_id


def test_operators_and_failure_handling(dag):
    from headpose_operators import FreezeGraphOperator, HeadposeTrainingOperator

    assert isinstance(dag.task_dict["train"], HeadposeTrainingOperator)
    assert isinstance(dag.task_dict["freeze_graph"], FreezeGraphOperator)
    # cleanup runs whatever happened, and as a teardown it cannot turn a failed run green.
    assert dag.task_dict["cleanup"].is_teardown
    # The data version's claim is the setup of everything that trains; its record, their teardown.
    claim, record = dag.task_dict["claim_data_version"], dag.task_dict["record_data_version"]
    assert claim.is_setup and record.is_teardown and "claim_data_version" in record.upstream_task_ids
    assert dag.task_dict["publish"].outlets[0].name == "headpose_frozen_model"


def test_templated_fields_of_the_custom_operators():
    from headpose_operators import (
        ClaimDataVersionOperator, ExportEdgeModelsOperator, FreezeGraphOperator, HeadposeTrainingOperator,
        RecordDataVersionOperator, ReleaseApprovalOperator,
    )

    assert set(ClaimDataVersionOperator.template_fields) == {"plan"}
    assert set(RecordDataVersionOperator.template_fields) == {"plan", "claimed"}
    assert {"training_job_name", "artifact_uri", "artifact_sha256", "output_prefix", "input_node_names",
            "output_node_names", "channel_order", "expected_bucket_owner", "kms_key_id"} <= set(
        FreezeGraphOperator.template_fields)
    assert {"config", "backend", "sourcedir_sha256", "max_training_attempts", "expected_bucket_owner", "kms_key_id",
            "manifest_sha256", "source_sha256s"} <= set(HeadposeTrainingOperator.template_fields)
    assert {"frozen_model_uri", "frozen_model_sha256", "frozen_model_json_uri", "frozen_model_json_sha256",
            "dataset_prefix", "output_prefix", "formats", "kms_key_id"} <= set(ExportEdgeModelsOperator.template_fields)
    assert {"plan", "training", "dataset", "report", "version", "subject", "body"} <= set(
        ReleaseApprovalOperator.template_fields)


@pytest.mark.parametrize("dag_file", ["headpose_retraining.py", "headpose_rollout.py"])
def test_importing_the_dag_loads_no_tensorflow_numpy_sagemaker_or_plotting(dag_file):
    # A fresh interpreter: this test process has imported those modules already.
    script = f"""
import json, sys, importlib.util
sys.path[:0] = [{str(INCLUDE)!r}, {str(PLUGINS)!r}]
spec = importlib.util.spec_from_file_location("headpose_dag", {str(DAGS / dag_file)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("tensorflow", "numpy", "sagemaker", "keras", "matplotlib", "scipy"))
print(json.dumps(heavy))
"""
    import os
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_plugin_loader_does_not_execute_the_operator_package():
    # plugins/.airflowignore keeps Airflow from importing each operator file as a top-level
    # module; the loader sees only the plugin that registers the extra links.
    from airflow._shared.module_loading import find_path_from_directory

    found = list(find_path_from_directory(str(PLUGINS), ".airflowignore", "glob"))
    assert found == [str(PLUGINS / "headpose_plugin.py")]


def test_the_parse_benchmarks_baseline_has_the_dags_shape(dag):
    # bench/bench_parse.py times this DAG against an EmptyOperator twin generated from it;
    # a DAG change the generator does not follow would break the benchmark unnoticed.
    from airflow_support import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_parse
    finally:
        sys.path.remove(str(ROOT / "bench"))
    namespace: dict = {}
    exec(compile(bench_parse.baseline_source(bench_parse._describe(dag)), "baseline.py", "exec"),
         namespace)
    twin = namespace["dag"]

    def shape(d):
        return {t.task_id: (sorted(t.upstream_task_ids), t.retries, t.retry_delay, t.is_teardown)
                for t in d.tasks}

    assert shape(twin) == shape(dag)
    assert {t.operator_name for t in twin.tasks} == {"EmptyOperator"}
    assert set(twin.params.keys()) == set(dag.params.keys())


def test_the_rollout_dag_assesses_then_acts_and_runs_on_its_schedule_only_with_a_rollout(monkeypatch):
    bag = load_dagbag()
    rollout = bag.dags["headpose_rollout"]
    assert rollout.task_dict["assess_rollout"].downstream_task_ids == {"act"}
    assert set(rollout.params.keys()) == {"s3_bucket", "headpose_folder"}
    monkeypatch.delenv("HEADPOSE_RUN_DEFAULTS", raising=False)
    assert load_dagbag().dags["headpose_rollout"].schedule is None  # no rollout: never by itself
    monkeypatch.setenv("HEADPOSE_RUN_DEFAULTS", json.dumps({"rollout": {"canary_share": 0.1}}))
    assert load_dagbag().dags["headpose_rollout"].schedule == "*/15 * * * *"
    monkeypatch.setenv("HEADPOSE_ROLLOUT_SCHEDULE", "none")
    assert load_dagbag().dags["headpose_rollout"].schedule is None
