"""Run-scoped names: the training job name, the S3 layout, the workspace checks."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from headpose.planning import layout
from headpose.planning.layout import RunLayout


def test_job_name_is_deterministic_valid_and_utc():
    moment = datetime(2024, 3, 5, 7, 8, 9, 123456, tzinfo=timezone.utc)
    name = layout.training_job_name(moment)
    assert name == "deeplens-TF-headpose-2024-03-05-07-08-09-123"
    assert layout.training_job_name(moment) == name  # a retry computes the same name
    same_instant = moment.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert layout.training_job_name(same_instant) == name
    assert layout.training_job_name(moment.replace(tzinfo=None)) == name
    assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name)
    assert len(name) <= 63


def test_job_names_of_different_runs_differ():
    first = datetime(2024, 3, 5, tzinfo=timezone.utc)
    assert layout.training_job_name(first) != layout.training_job_name(first + timedelta(milliseconds=1))


def test_job_name_refuses_a_base_that_breaks_sagemaker_rules():
    with pytest.raises(ValueError, match="not a valid SageMaker"):
        layout.training_job_name(datetime(2024, 1, 1), base="bad_name")
    with pytest.raises(ValueError):
        layout.training_job_name(datetime(2024, 1, 1), base="x" * 50)


@pytest.mark.parametrize("name", ["headpose-models", "abc", "a.b-c", "my.bucket.01", "a" * 63])
def test_valid_bucket_names(name):
    assert layout.is_valid_bucket_name(name)


@pytest.mark.parametrize("name", [
    "ab", "a" * 64, "Headpose", "head_pose", "-abc", "abc-", "a..b", "192.168.1.1",
    "xn--abc", "sthree-abc", "abc-s3alias", "abc--ol-s3", "a.-b", "head pose", "",
])
def test_invalid_bucket_names(name):
    assert not layout.is_valid_bucket_name(name)


def test_s3_uri_helpers():
    assert layout.s3_uri("b", "headpose", "TFartifacts") == "s3://b/headpose/TFartifacts"
    assert layout.s3_uri("b", "headpose/", "datasets", "x/") == "s3://b/headpose/datasets/x/"
    assert layout.split_s3_uri("s3://b-1/a/b.txt") == ("b-1", "a/b.txt")
    assert layout.split_s3_uri("s3://b-1") == ("b-1", "")
    for bad in ("http://b/a", "s3://Bad/a", "b/a"):
        with pytest.raises(ValueError):
            layout.split_s3_uri(bad)


def test_run_layout_follows_the_tutorial_and_names_the_job_everywhere():
    job = "deeplens-TF-headpose-2024-03-05-07-08-09-123"
    run = RunLayout.for_run("bkt", "headpose", job, "s3://bkt/headpose/datasets/synthetic-abc")
    assert run.dataset_prefix == "s3://bkt/headpose/datasets/synthetic-abc/"
    assert run.sourcedir_uri == f"s3://bkt/headpose/customTFcodes/{job}/source/sourcedir.tar.gz"
    assert run.output_path == "s3://bkt/headpose/TFartifacts"
    assert run.model_artifact_uri == f"s3://bkt/headpose/TFartifacts/{job}/output/model.tar.gz"
    assert run.frozen_model_uri == f"s3://bkt/headpose/TFartifacts/{job}/output/frozen_model.pb"
    assert run.frozen_model_json_uri == f"s3://bkt/headpose/TFartifacts/{job}/output/frozen_model.json"
    assert run.report_uri == f"s3://bkt/headpose/TFartifacts/{job}/output/report.json"
    assert run.published_pointer_uri == "s3://bkt/headpose/published/latest.json"
    assert run.candidate_prefix == f"s3://bkt/headpose/TFartifacts/{job}/candidate/"
    assert run.rejected_prefix == f"s3://bkt/headpose/TFartifacts/{job}/rejected/"
    assert run.published_mirror_prefix == "s3://bkt/headpose/published/latest/"
    assert run.history_record_uri == f"s3://bkt/headpose/published/history/{job}.json"
    assert run.canary_pointer_uri == "s3://bkt/headpose/published/channels/canary.json"
    assert run.stable_pointer_uri == "s3://bkt/headpose/published/channels/stable.json"
    assert run.decisions_prefix == "s3://bkt/headpose/published/rollouts/"
    assert run.devices_prefix == "s3://bkt/headpose/devices/"
    shared = ("channels_prefix", "canary_pointer_uri", "stable_pointer_uri", "decisions_prefix", "devices_prefix")
    run_owned = [v for k, v in run.to_dict().items()
                 if k.endswith(("_uri", "_prefix")) and not k.startswith(("published_", "dataset_")) and k not in shared]
    assert all(job in uri for uri in run_owned)
    assert RunLayout.from_dict(run.to_dict()) == run
    # A later attempt's job: every job-scoped URI follows it, the run's code stays.
    second = run.for_job(job + "-2")
    assert second.model_artifact_uri == f"s3://bkt/headpose/TFartifacts/{job}-2/output/model.tar.gz"
    assert second.history_record_uri.endswith(f"/history/{job}-2.json")
    assert second.sourcedir_uri == run.sourcedir_uri and second.dataset_prefix == run.dataset_prefix


@pytest.mark.parametrize("bucket, folder, job, prefix", [
    ("Bad_Bucket", "headpose", "job-1", "s3://b/d/"),
    ("bkt", "a/b", "job-1", "s3://b/d/"),
    ("bkt", "..", "job-1", "s3://b/d/"),
    ("bkt", "headpose", "job_1", "s3://b/d/"),
    ("bkt", "headpose", "job-1", "/local/path"),
])
def test_run_layout_refuses_bad_parts(bucket, folder, job, prefix):
    with pytest.raises(ValueError):
        RunLayout.for_run(bucket, folder, job, prefix)


def test_dataset_id_depends_on_every_setting():
    settings = {"generator_version": 1, "train_per_pose": 4, "eval_per_pose": 2, "seed": 0,
                "images_per_shard": 100}
    base = layout.dataset_id("synthetic", settings)
    assert re.fullmatch(r"synthetic-[0-9a-f]{12}", base)
    assert layout.dataset_id("synthetic", dict(reversed(settings.items()))) == base
    for key in settings:
        assert layout.dataset_id("synthetic", {**settings, key: settings[key] + 1}) != base


def test_workspace_root_and_run_folder(tmp_path):
    assert layout.workspace_root({"HEADPOSE_WORKSPACE": str(tmp_path)}) == tmp_path
    assert layout.workspace_root({"AIRFLOW_HOME": "/srv/af"}) == layout.Path("/srv/af/headpose-workspace")
    assert layout.run_workspace("job-1", {"HEADPOSE_WORKSPACE": str(tmp_path)}) == tmp_path / "job-1"
    with pytest.raises(ValueError):
        layout.run_workspace("../etc", {"HEADPOSE_WORKSPACE": str(tmp_path)})


def test_a_tasks_scratch_is_gone_when_the_try_ends_however_it_ends(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADPOSE_WORKSPACE", str(tmp_path))
    job = "deeplens-TF-headpose-2024-03-05-07-08-09-123"
    with layout.task_scratch(job, "freeze_graph") as scratch:
        (scratch / "model.tar.gz").write_bytes(b"x")
        assert scratch.parent == tmp_path / job and scratch.name.startswith("freeze_graph-")
    assert not scratch.exists()
    with pytest.raises(RuntimeError):
        with layout.task_scratch(job, "freeze_graph") as scratch:
            raise RuntimeError("the task failed")
    assert not scratch.exists()
    layout.remove_run_workspace(job)
    assert not (tmp_path / job).exists()

