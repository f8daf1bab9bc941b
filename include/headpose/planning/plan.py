"""A run's plan: validated parameters, job name, S3 layout and training request.

``plan_run`` is the DAG's first task and the only place these are derived; every later
task reads them from its XCom. Pure except for resolving the training image (the
sagemaker SDK's bundled tables, no network), which callers may replace.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

from headpose.artifacts.edge.export import DEFAULT_FORMATS
from headpose.datasets.settings import GENERATOR_VERSION, prima_settings, synthetic_settings
from headpose.planning.data_version import data_version_plan
from headpose.planning.governed import deployment_problems, governed_request
from headpose.planning.layout import (
    RunLayout,
    dataset_id,
    dataset_prefix_for,
    run_workspace,
    training_job_name,
)
from headpose.planning.new_data import NewData, NewDataError, choose, started_by, uploads_of_events
from headpose.planning.profile import DeploymentSettings, load_profile
from headpose.planning.release_settings import approval_time_problems, release_problems
from headpose.planning.rules import RunParamsError, validate_run_params
from headpose.planning.scheduling import run_time_problems, train_timeout
from headpose.planning.request import image_uri_for_backend, training_job_request

ImageResolver = Callable[[str, str, str], str]


def dataset_plan(params: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """The run's dataset prefix and, for a dataset staged by the run, the settings that name it."""
    source = params["dataset_source"]
    bucket, folder = params["s3_bucket"], params["headpose_folder"]
    if source == "synthetic":
        settings = synthetic_settings(params, GENERATOR_VERSION)
        return dataset_prefix_for(bucket, folder, dataset_id("synthetic", settings)), settings
    if source == "prima":
        settings = prima_settings(params)
        return dataset_prefix_for(bucket, folder, dataset_id("prima", settings)), settings
    return source.rstrip("/") + "/", None


def plan_run(
    raw_params: Mapping[str, Any],
    logical_time: datetime,
    *,
    region: str,
    dag_id: str,
    run_id: str,
    resolve_image: ImageResolver = image_uri_for_backend,
    dagrun_timeout: timedelta | None = None,
    connection_role: str | None = None,
    connection_owner: str | None = None,
    environ: Mapping[str, str] | None = None,
    run_type: str = "manual",
    triggered_by: str | None = None,
    new_data_events: list[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything later tasks need, as JSON-ready values (``RunParamsError`` if invalid).

    The deployment profile (``$HEADPOSE_RUN_DEFAULTS`` of ``environ``) gives the defaults
    and the deployment settings; ``connection_role`` is the AWS connection's
    ``sagemaker_role_arn`` extra and ``connection_owner`` its ``expected_bucket_owner``
    (the profile's wins). With ``dagrun_timeout``, a training job that could
    outlast the run is refused too. A run started by data (``run_type`` ``asset_triggered``)
    trains on the upload its ``new_data_events`` (the consumed asset events' extras) name.
    """
    profile = load_profile(environ)
    new_data = _new_data(profile.settings, run_type, new_data_events)
    if new_data is not None:  # the upload's dataset; everything else from the profile
        raw_params = {**raw_params, **new_data.params()}
    params = validate_run_params(raw_params, profile.settings, connection_role=connection_role, environ=environ)
    refused = deployment_problems(profile.settings, params, region) + release_problems(profile.settings)
    if refused:
        raise RunParamsError("invalid deployment settings:\n  - " + "\n  - ".join(refused))
    job = training_job_name(logical_time, params["base_job_name"])
    dataset_prefix, dataset_settings = dataset_plan(params)
    layout = RunLayout.for_run(params["s3_bucket"], params["headpose_folder"], job, dataset_prefix)
    try:
        image = resolve_image(params["backend"], region, params["instance_type"])
    except ValueError as error:  # the SDK's word on a type or region it has no image for
        raise RunParamsError(
            f"no TensorFlow training image for instance_type={params['instance_type']!r} "
            f"in {region}: {error}"
        ) from error
    request = training_job_request(layout, params, image, region=region, dag_id=dag_id, run_id=run_id)
    request = governed_request(request, profile.settings, layout.sourcedir_uri)
    if not request["RoleArn"]:  # backend=sagemaker without role_arn: the connection's (rules checked it)
        request["RoleArn"] = connection_role
    too_long = run_time_problems(request["StoppingCondition"], dagrun_timeout) + approval_time_problems(
        profile.settings, train_timeout(request["StoppingCondition"]), dagrun_timeout)
    if too_long:
        raise RunParamsError("invalid run parameters: " + "; ".join(too_long))
    return {
        "training_job_name": job,
        "run_params": params,
        "deployment": profile.settings.to_dict(),
        "expected_bucket_owner": profile.settings.expected_bucket_owner or connection_owner,
        "kms_key_id": profile.settings.kms_key_id,
        "profile": profile.describe(),
        "region": region,
        "dataset_settings": dataset_settings,
        "started_by": started_by(run_type, triggered_by, new_data),
        "new_data": new_data.to_dict() if new_data else None,
        # Runs started by the schedule or by data never train a version twice; a person's
        # run only where the deployment retrains on data (force_retrain overrides).
        "data_version": data_version_plan(params, dataset_settings, enforced=(
            run_type in ("scheduled", "asset_triggered") or profile.settings.watches_new_data)),
        "workspace_dir": str(run_workspace(job)),
        "training_request": request,
        # What export_edge_models converts: the deployment's formats, else every one.
        "edge_formats": list(profile.settings.edge_formats or DEFAULT_FORMATS),
        # bucket, folder and every URI, one XCom key each; RunLayout.from_dict(plan) rebuilds it.
        **layout.to_dict(),
        # The model a new one must beat: the stable channel's where a rollout moves channels
        # (publish falls back to latest.json before the channels exist).
        "champion_pointer_uri": layout.stable_pointer_uri if profile.settings.rollout else layout.published_pointer_uri,
    }


def _new_data(
    settings: DeploymentSettings, run_type: str, events: list[Mapping[str, Any]] | None,
) -> NewData | None:
    """The upload a run started by data trains on; None for any other run."""
    if run_type != "asset_triggered":
        return None
    if not settings.watches_new_data:
        raise RunParamsError("this run was started by an asset event, but the deployment does not retrain on "
                             "data (retrain_on=schedule): nothing says what to train on")
    uploads, others = uploads_of_events(events or [])
    try:
        return choose(uploads, others, settings.new_data_prefix)
    except NewDataError as error:
        raise RunParamsError(str(error)) from None
