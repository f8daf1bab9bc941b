"""
### Head-pose retraining

Trains the head-pose ResNet (9 classes: pan bin x tilt bin) the way the original
SageMaker tutorial did, freezes it into `frozen_model.pb`, checks it on the held-out
split and publishes it under a stable key - one task per step:

`plan_run` -> `stage_dataset` -> `package_code` -> `train` -> `download_artifact` ->
`freeze_graph` -> `validate_model` -> `upload_frozen_model` -> `publish` -> `cleanup`

* **plan_run** derives the run's `training_job_name` (`deeplens-TF-headpose-<logical time>`,
  the same on a retry), every S3 URI and the CreateTrainingJob request; XCom carries them on.
* **train** runs that request on SageMaker (`backend=sagemaker`) or on the worker
  (`backend=local`), writing `.../TFartifacts/<training_job_name>/output/model.tar.gz`.
* **validate_model** fails the run below `min_accuracy`; **publish** then never runs, and
  `published/latest.json` keeps naming the last good model.

Files pass between tasks through the workspace (`$HEADPOSE_WORKSPACE`, default
`$AIRFLOW_HOME/headpose-workspace`): with several workers it must be one volume mounted
on all of them. Each task checks the sha256 the previous one recorded and says so if the
file is missing or different.
"""
from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import Asset, Param, chain, dag, get_current_context, task, teardown

try:
    import headpose  # noqa: F401
except ImportError:  # a checkout run without PYTHONPATH=include: the package sits beside dags/
    sys.path.append(str(Path(__file__).resolve().parents[1] / "include"))

from headpose.params import param_schemas  # noqa: E402
from headpose_operators import FreezeGraphOperator, HeadposeTrainingOperator  # noqa: E402

DAG_ID = "headpose_retraining"
AWS_CONN_ID = "aws_default"
# The bucket is a run parameter, so the asset is named rather than addressed; each
# event's extra carries the pointer's actual URI and the training job name.
PUBLISHED_MODEL = Asset(name="headpose_frozen_model")


def _params() -> dict[str, Param]:
    params = {}
    for name, spec in param_schemas().items():
        schema = dict(spec)
        default, description = schema.pop("default"), schema.pop("description")
        params[name] = Param(default, description=description, **schema)
    return params


def _s3_hook():
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=AWS_CONN_ID)


def _fail(message: str):
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    params=_params(),
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    tags=["headpose", "sagemaker", "tensorflow"],
    doc_md=__doc__,
)
def headpose_retraining():
    @task(multiple_outputs=True)
    def plan_run() -> dict:
        """Validate the parameters, derive the job name, S3 layout and training request."""
        from headpose.params import RunParamsError
        from headpose.plan import plan_run as make_plan

        context = get_current_context()
        dag_run = context["dag_run"]
        logical_time = dag_run.logical_date or dag_run.run_after
        region = _s3_hook().conn_region_name or "us-east-1"
        try:
            plan = make_plan(
                dict(context["params"]), logical_time, region=region, dag_id=DAG_ID, run_id=dag_run.run_id,
            )
        except RunParamsError as error:
            raise _fail(str(error)) from None
        print(f"training_job_name: {plan['training_job_name']}")
        return plan

    @task
    def stage_dataset(plan: dict) -> dict:
        """Put the run's dataset under its S3 prefix (or check that it is there)."""
        from headpose import staging

        source = plan["run_params"]["dataset_source"]
        s3 = _s3_hook().get_conn()
        try:
            staging.require_bucket(s3, plan["bucket"])
            if source == "synthetic":
                return staging.stage_synthetic_dataset(
                    s3, plan["dataset_prefix"], plan["dataset_settings"], print,
                    scratch_root=_scratch(plan),
                )
            if source == "prima":
                raise _fail("dataset_source=prima is not yet supported; use synthetic or an s3:// prefix")
            return staging.check_dataset_prefix(s3, plan["dataset_prefix"])
        except staging.DatasetError as error:
            raise _fail(str(error)) from None

    @task
    def package_code(plan: dict) -> dict:
        """Build sourcedir.tar.gz from include/headpose and upload it where the request says."""
        from headpose.layout import split_s3_uri
        from headpose.sourcedir import build_sourcedir

        path, sha256 = build_sourcedir(Path(_scratch(plan)) / "sourcedir.tar.gz")
        bucket, key = split_s3_uri(plan["sourcedir_uri"])
        _s3_hook().load_file(str(path), key, bucket_name=bucket, replace=True)
        path.unlink()
        return {"sourcedir_uri": plan["sourcedir_uri"], "sha256": sha256}

    @task(multiple_outputs=True)
    def download_artifact(plan: dict, training: dict) -> dict:
        """Copy the job's model.tar.gz into the run's workspace; record its sha256."""
        from headpose.layout import file_sha256, split_s3_uri

        description = training["Training"]
        artifact_uri = description["ModelArtifacts"]["S3ModelArtifacts"]
        if artifact_uri != plan["model_artifact_uri"]:
            raise _fail(f"training job {description['TrainingJobName']} wrote {artifact_uri}, "
                        f"expected {plan['model_artifact_uri']}")
        target = Path(plan["workspace_dir"]) / "model.tar.gz"
        target.unlink(missing_ok=True)  # a previous try's copy: the hook refuses to overwrite
        bucket, key = split_s3_uri(artifact_uri)
        path = _s3_hook().download_file(
            key, bucket_name=bucket, local_path=str(target.parent),
            preserve_file_name=True, use_autogenerated_subdir=False,
        )
        sha256 = file_sha256(path)
        expected = description.get("LocalBackend", {}).get("ArtifactSha256")
        if expected and expected != sha256:
            raise _fail(f"{artifact_uri} has sha256 {sha256}, the training job recorded {expected}")
        return {"path": path, "sha256": sha256, "artifact_uri": artifact_uri,
                "training_job_name": description["TrainingJobName"]}

    @task
    def validate_model(plan: dict, frozen: dict) -> dict:
        """Accuracy and SavedModel parity of the frozen graph on the held-out split."""
        from headpose import staging
        from headpose.layout import require_workspace_file
        from headpose.validation import validate_frozen_model

        pb_path = require_workspace_file(frozen["frozen_model_path"], frozen["frozen_model_sha256"])
        workspace = Path(plan["workspace_dir"])
        eval_shards = staging.download_split(
            _s3_hook().get_conn(), plan["dataset_prefix"], "eval", workspace / "eval-data"
        )
        min_accuracy = plan["run_params"]["min_accuracy"]
        outcome = validate_frozen_model(
            pb_path, frozen["saved_model_dir"], eval_shards, workspace / "report",
            min_accuracy=min_accuracy, training_job_name=plan["training_job_name"],
            input_node_names=frozen["input_node_names"], output_node_names=frozen["output_node_names"],
        )
        print(f"held-out accuracy: {outcome['accuracy']:.4f} on {outcome['images']} images "
              f"(min_accuracy {min_accuracy}); parity max abs diff: {outcome['parity_max_abs_diff']}")
        if outcome["problems"]:
            raise _fail("the frozen model is not published: " + "; ".join(outcome["problems"]))
        return outcome

    @task
    def upload_frozen_model(plan: dict, frozen: dict, report: dict) -> dict:
        """frozen_model.pb, its metadata and the report to .../TFartifacts/<job>/output/."""
        from headpose.layout import require_workspace_file, split_s3_uri

        files = [
            (frozen["frozen_model_path"], frozen["frozen_model_sha256"], plan["frozen_model_uri"]),
            (frozen["frozen_model_json_path"], frozen["frozen_model_json_sha256"], plan["frozen_model_json_uri"]),
            (report["report_path"], report["report_sha256"], plan["report_uri"]),
        ]
        if report.get("confusion_png_path"):
            files.append((report["confusion_png_path"], None, plan["confusion_png_uri"]))
        hook = _s3_hook()
        uploaded = {}
        for path, sha256, uri in files:
            require_workspace_file(path, sha256)
            bucket, key = split_s3_uri(uri)
            hook.load_file(path, key, bucket_name=bucket, replace=True)
            uploaded[Path(path).name] = uri
        return uploaded

    @task(outlets=[PUBLISHED_MODEL])
    def publish(plan: dict, training: dict, frozen: dict, report: dict, uploaded: dict) -> dict:
        """History record, latest/ copies, then the latest.json pointer (last)."""
        from headpose.layout import RunLayout
        from headpose.publish import publish_model, publish_record

        layout = RunLayout.from_dict(plan)
        context = get_current_context()
        record = publish_record(
            layout, frozen["frozen_model_sha256"],
            {"accuracy": report["accuracy"], "parity_max_abs_diff": report["parity_max_abs_diff"]},
            extra={
                "dag_id": DAG_ID,
                "run_id": context["dag_run"].run_id,
                "training_job_arn": training["Training"].get("TrainingJobArn"),
                "billable_time_in_seconds": training["Training"].get("BillableTimeInSeconds"),
                "training_time_in_seconds": training["Training"].get("TrainingTimeInSeconds"),
                "final_metrics": {
                    m["MetricName"]: m["Value"] for m in training["Training"].get("FinalMetricDataList", [])
                },
            },
        )
        result = publish_model(_s3_hook().get_conn(), layout, record)
        context["outlet_events"][PUBLISHED_MODEL].extra = {
            "uri": layout.published_pointer_uri, "training_job_name": layout.training_job_name,
        }
        print(f"published {layout.frozen_model_uri} as {layout.published_model_uri}")
        return result

    @teardown
    def cleanup() -> None:
        """Remove the run's workspace folder, whatever happened before."""
        import shutil

        from headpose.layout import run_workspace

        job = get_current_context()["ti"].xcom_pull(task_ids="plan_run", key="training_job_name")
        if job:
            shutil.rmtree(run_workspace(job), ignore_errors=True)

    plan = plan_run()
    dataset = stage_dataset(plan)
    code = package_code(plan)
    train = HeadposeTrainingOperator(
        task_id="train",
        config=plan["training_request"],
        backend="{{ params.backend }}",
        aws_conn_id=AWS_CONN_ID,
        print_log=True,
        check_interval=30,
    )
    download = download_artifact(plan, train.output)
    freeze = FreezeGraphOperator(
        task_id="freeze_graph",
        training_job_name=plan["training_job_name"],
        artifact_path=download["path"],
        artifact_sha256=download["sha256"],
        output_dir=plan["workspace_dir"],
    )
    report = validate_model(plan, freeze.output)
    uploaded = upload_frozen_model(plan, freeze.output, report)
    published = publish(plan, train.output, freeze.output, report, uploaded)
    chain(plan, dataset, code, train, download, freeze, report, uploaded, published, cleanup())


def _scratch(plan: dict) -> str:
    folder = Path(plan["workspace_dir"]) / "scratch"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


headpose_retraining()
