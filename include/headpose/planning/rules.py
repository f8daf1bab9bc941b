"""The rules a run's parameters must keep: each value's schema, then the rules across fields.

``validate_run_params`` is what ``plan_run`` calls before anything touches S3 or AWS. It
checks every value against its schema again (a conf can reach a task without passing
the trigger form), refuses unknown names (a misspelt ``trainig_steps`` would silently run
with the default) and deployment settings (``planning.profile``: not a trigger's to
change), then the rules a per-field schema cannot state. Every problem is listed at once.

Standard library only at import time (jsonschema is imported when validating).
"""
from __future__ import annotations

import copy
import math
import re
from typing import Any, Mapping

from headpose.planning.layout import is_valid_bucket_name, split_s3_uri
from headpose.planning.params import BUCKET_ENV, LOCAL_MAX_INSTANCE_COUNT, param_schemas
from headpose.planning.profile import DEPLOYMENT_SETTINGS, PROFILE_ENV, DeploymentSettings
from headpose.planning.request import is_gpu_instance_type
from headpose.training.labels import prima_poses

# SageMaker's TensorFlow 2.12+ images refuse P2 instances (the sagemaker SDK's image_uris
# raises for them), so the tutorial's ml.p2.xlarge only works with the local backend.
_DEPRECATED_INSTANCE_RE = re.compile(r"^ml\.p2\.")


class RunParamsError(ValueError):
    """Run parameters that cannot work together; the message says which and why."""


def validate_run_params(
    params: Mapping[str, Any],
    deployment: DeploymentSettings | None = None,
    *,
    connection_role: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The run's parameters with this deployment's defaults filled in, or ``RunParamsError``.

    ``connection_role`` is the AWS connection's ``sagemaker_role_arn`` extra, the role a
    ``backend=sagemaker`` run uses when ``role_arn`` is empty; ``environ`` holds the
    profile whose defaults fill in what ``params`` leaves out.
    """
    import jsonschema  # light, and only needed at run time

    deployment = deployment or DeploymentSettings()
    schemas = param_schemas(environ)
    problems: list[str] = []
    settings = sorted(set(params) & set(DEPLOYMENT_SETTINGS))
    if settings:
        problems.append(
            f"{settings} {'is a deployment setting' if len(settings) == 1 else 'are deployment settings'}: "
            f"set in ${PROFILE_ENV} for every run of this deployment, never in a trigger's conf"
        )
    unknown = sorted(set(params) - set(schemas) - set(DEPLOYMENT_SETTINGS))
    if unknown:
        problems.append(f"unknown parameter(s) {unknown}; known: {sorted(schemas)}")
    values = {name: copy.deepcopy(params.get(name, spec["default"])) for name, spec in schemas.items()}
    for name, spec in schemas.items():
        schema = {k: v for k, v in spec.items() if k not in ("default", "title", "section")}
        try:
            jsonschema.validate(values[name], schema)
        except jsonschema.ValidationError as error:
            problems.append(f"{name}={values[name]!r}: {schema_problem(name, spec, error)}")
    if not problems:
        problems.extend(cross_field_problems(values, deployment, connection_role))
    if problems:
        raise RunParamsError("invalid run parameters:\n  - " + "\n  - ".join(problems))
    return values


def schema_problem(name: str, spec: Mapping[str, Any], error: Any) -> str:
    """A schema refusal in words a person triggering a run can act on."""
    if error.validator in ("pattern", "not"):  # a regex or sub-schema means nothing to a user
        return f"breaks the naming rules: {spec['description']}"
    return error.message


def cross_field_problems(
    values: Mapping[str, Any], deployment: DeploymentSettings, connection_role: str | None,
) -> list[str]:
    problems = []
    if not values["s3_bucket"]:
        problems.append(
            f"no S3 bucket: set s3_bucket in the trigger's conf or in ${PROFILE_ENV}, or "
            f"${BUCKET_ENV} for every Airflow component; there is no built-in bucket"
        )
    elif not is_valid_bucket_name(values["s3_bucket"]):
        problems.append(
            f"s3_bucket={values['s3_bucket']!r} breaks S3's naming rules: no '..', '.-' or '-.', not "
            "shaped like an IP address, none of the reserved prefixes (xn--, sthree-, amzn-s3-demo-) "
            "or suffixes (-s3alias, --ol-s3, --x-s3)"
        )
    if values["dataset_source"] == "prima" and not values["prima_archive_uri"]:
        problems.append("dataset_source=prima needs prima_archive_uri (the archive's s3:// URI)")
    if values["backend"] == "sagemaker":
        problems.extend(_sagemaker_problems(values, connection_role))
    else:
        problems.extend(_local_problems(values, deployment))
    if values["use_spot_instances"] and values["max_wait_seconds"] < values["max_run_seconds"]:
        problems.append(
            f"max_wait_seconds={values['max_wait_seconds']} is less than max_run_seconds="
            f"{values['max_run_seconds']}: SageMaker needs MaxWaitTimeInSeconds >= "
            "MaxRuntimeInSeconds for spot training (the wait includes the run)"
        )
    problems.extend(instance_problems(values))
    source = values["dataset_source"]
    if source.startswith("s3://"):
        try:
            split_s3_uri(source)
        except ValueError as error:
            problems.append(f"dataset_source={source!r}: {error}")
    return problems


def instance_problems(values: Mapping[str, Any]) -> list[str]:
    """The rules on ``instance_count``, for a run and for a deployment profile's defaults.

    Several hosts need GPUs (with ``backend=sagemaker``), at most ``LOCAL_MAX_INSTANCE_COUNT``
    of them with the local backend, and a training shard each: a synthetic dataset's shards
    are known from its settings (``stage_dataset`` counts any other's and refuses it alike).
    """
    hosts = values["instance_count"]
    if hosts == 1:
        return []
    problems = []
    if values["backend"] == "sagemaker" and not is_gpu_instance_type(values["instance_type"]):
        problems.append(
            f"instance_count={hosts} with instance_type={values['instance_type']!r}, which has no GPU: "
            "several hosts train together to use more GPUs; one larger instance trains faster than CPU "
            "hosts that exchange their gradients over the network (GPU types: ml.g*, ml.p*)"
        )
    if values["backend"] != "sagemaker" and hosts > LOCAL_MAX_INSTANCE_COUNT:
        problems.append(
            f"instance_count={hosts}: the local backend runs at most {LOCAL_MAX_INSTANCE_COUNT} hosts, "
            "as processes of this worker (they share its CPU); train on SageMaker for more"
        )
    if values["dataset_source"] != "synthetic":
        return problems
    images = values["synthetic_train_per_pose"] * len(prima_poses())
    shards = math.ceil(images / values["images_per_shard"])
    if shards < hosts:
        problems.append(
            f"instance_count={hosts} needs a training shard per host, but the synthetic dataset's "
            f"{images} training images make {shards} shard(s) of images_per_shard={values['images_per_shard']}: "
            f"set images_per_shard to at most {images // hosts}"
        )
    return problems


def _sagemaker_problems(values: Mapping[str, Any], connection_role: str | None) -> list[str]:
    problems = []
    if _DEPRECATED_INSTANCE_RE.match(values["instance_type"]):
        problems.append(
            f"instance_type={values['instance_type']!r}: SageMaker's TensorFlow 2.21 training images "
            "do not run on P2 instances; use e.g. ml.g4dn.xlarge, ml.p3.2xlarge or ml.m5.xlarge"
        )
    if not (values["role_arn"] or connection_role):
        problems.append(
            "backend=sagemaker needs the SageMaker execution role: set role_arn (trigger or "
            "profile), or 'sagemaker_role_arn' in the extra of the AWS connection"
        )
    problems.extend(_role_readable_dataset_problems(values))
    return problems


def _role_readable_dataset_problems(values: Mapping[str, Any]) -> list[str]:
    """A given dataset prefix the execution role may read (deploy/iam: ``<folder>/datasets/*``).

    Outside it, SageMaker's download of the channel fails with AccessDenied inside the job,
    after the wait for an instance; here it is refused before anything starts.
    """
    source = values["dataset_source"]
    readable = f"s3://{values['s3_bucket']}/{values['headpose_folder']}/datasets/"
    if not source.startswith("s3://") or not values["s3_bucket"] or source.startswith(readable):
        return []
    return [
        f"dataset_source={source!r}: with backend=sagemaker the execution role reads datasets under "
        f"{readable} only (deploy/iam/sagemaker-execution-role-policy.json); copy the dataset there"
    ]


def _local_problems(values: Mapping[str, Any], deployment: DeploymentSettings) -> list[str]:
    problems = []
    if values["use_spot_instances"]:
        problems.append("use_spot_instances needs backend=sagemaker (the local backend has no spot capacity)")
    estimate = local_training_seconds(values, deployment)
    if estimate is not None and estimate > values["max_run_seconds"]:
        rate = local_images_per_second(values, deployment)
        problems.append(
            f"a local ResNet-{values['resnet_size']} run of {values['training_steps']} steps of "
            f"{values['batch_size']} takes about {_duration(estimate)} on this worker ({rate:.3g} "
            f"images/s at {values['base_filters']} base filters), more than max_run_seconds="
            f"{values['max_run_seconds']} ({_duration(values['max_run_seconds'])}); train on "
            "SageMaker, or fewer steps"
        )
    return problems


def local_images_per_second(values: Mapping[str, Any], deployment: DeploymentSettings) -> float | None:
    """Training throughput of this worker's CPU for the run's model, from the deployment's figures.

    The figures are measured at the tutorial's width (64 base filters); a network's compute
    grows with the square of its width, so a narrower one is taken to be that much faster.
    Small networks are slower than that in practice (fixed costs per step), so the estimate
    errs towards letting a run go, never towards refusing one that fits.
    """
    measured = deployment.local_images_per_second.get(str(values["resnet_size"]))
    if not measured:
        return None
    return measured * (64 / values["base_filters"]) ** 2


def local_training_seconds(values: Mapping[str, Any], deployment: DeploymentSettings) -> float | None:
    rate = local_images_per_second(values, deployment)
    if rate is None:
        return None
    return values["training_steps"] * values["batch_size"] / rate


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{math.ceil(hours / 24)} days"
