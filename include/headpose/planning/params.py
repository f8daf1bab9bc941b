"""The retraining run's parameters: one JSON schema each, plus the cross-field rules.

``PARAM_SCHEMAS`` is the single definition. The DAG turns each entry into an Airflow
``Param`` (so the trigger form shows a typed, described field and Airflow refuses a bad
value when the run is created, before any task runs); ``validate_run_params`` checks the
same schemas again plus the rules that tie fields together (which a per-field schema
cannot express), and ``plan_run`` calls it before any cloud call.

Defaults are the original tutorial's (``batch_size`` 200, ``training_steps`` 25000,
``evaluation_steps`` 700, ResNet-50, 100 GB volume, 432000 s), except the instance type:
the tutorial's ``ml.p2.xlarge`` has no TensorFlow 2.21 image, so ``ml.g4dn.xlarge``
(the smallest current single-GPU training type) takes its place.

Standard library only at import time: the DAG file imports this module at parse time.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Mapping

from headpose.planning.layout import FOLDER_PATTERN, split_s3_uri

BACKENDS = ("local", "sagemaker")
DATASET_SOURCES = ("synthetic", "prima")
RESNET_SIZES = (10, 18, 34, 50)
BUCKET_ENV = "HEADPOSE_S3_BUCKET"
FALLBACK_BUCKET = "headpose-models"

ROLE_ARN_PATTERN = r"^(|arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512})$"
DATASET_SOURCE_PATTERN = r"^(synthetic|prima|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?)$"
INSTANCE_TYPE_PATTERN = r"^ml\.[a-z0-9-]+\.[a-z0-9]+$"

# The rules of layout.BUCKET_NAME_PATTERN, one keyword each, so that a refusal says which
# rule was broken ("is too short") instead of printing one long regex.
BUCKET_NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 3,
    "maxLength": 63,
    "pattern": r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$",
    "not": {
        "anyOf": [
            {"pattern": r"\.\."},
            {"pattern": r"\.-|-\."},
            {"pattern": r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$"},
            {"pattern": r"^(xn--|sthree-|amzn-s3-demo-)"},
            {"pattern": r"(-s3alias|--ol-s3|--x-s3)$"},
        ]
    },
}

DEFAULT_INSTANCE_TYPE = "ml.g4dn.xlarge"
# Shown in the trigger form and in the refusal of a larger count, so the reason is given
# where the value is chosen (the entry point refuses a cluster too, in _check_cluster).
SINGLE_HOST_REASON = (
    "Training instances. Only 1: the entry point trains on one host and refuses a cluster "
    "(SM_HOSTS with more than one host) rather than train N unsynchronised copies."
)
# Where the sagemaker backend finds the execution role when role_arn is empty.
CONNECTION_ROLE_EXTRA = "sagemaker_role_arn"
# SageMaker ends any training job 30 days after it starts, waiting included.
MAX_JOB_LIFETIME_SECONDS = 2_592_000

# SageMaker's TensorFlow 2.12+ images refuse P2 instances (the sagemaker SDK's image_uris
# raises for them), so the tutorial's ml.p2.xlarge only works with the local backend.
_DEPRECATED_INSTANCE_RE = re.compile(r"^ml\.p2\.")


def default_bucket(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(BUCKET_ENV) or FALLBACK_BUCKET


def param_schemas(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {"default": ..., "type": ..., "description": ..., <JSON-schema keywords>}}``.

    ``title`` and ``description`` feed the trigger form; ``section`` groups its fields.
    """
    return {
        # -- where --------------------------------------------------------------------
        "s3_bucket": {
            "default": default_bucket(environ),
            **BUCKET_NAME_SCHEMA,
            "title": "S3 bucket",
            "description": "Bucket for datasets, code, artifacts and the published model "
            f"(default from ${BUCKET_ENV}). S3 naming rules: 3-63 lowercase letters, "
            "digits, '.' and '-', starting and ending with a letter or digit.",
            "section": "Storage",
        },
        "headpose_folder": {
            "default": "headpose",
            "type": "string",
            "pattern": FOLDER_PATTERN,
            "title": "Folder in the bucket",
            "description": "Top-level key prefix of everything the run writes (the tutorial's "
            "'headpose'); one path segment, no '/'.",
            "section": "Storage",
        },
        # -- how ----------------------------------------------------------------------
        "backend": {
            "default": "local",
            "type": "string",
            "enum": list(BACKENDS),
            "title": "Training backend",
            "description": "'local' runs the SageMaker training contract in a subprocess on "
            "the Airflow worker; 'sagemaker' starts a real SageMaker training job (needs "
            "role_arn).",
            "section": "Training",
        },
        "dataset_source": {
            "default": "synthetic",
            "type": "string",
            "pattern": DATASET_SOURCE_PATTERN,
            "examples": ["synthetic", "prima"],
            "title": "Dataset",
            "description": "'synthetic' (generated and staged to S3 once per setting), "
            "'prima' (the Prima Head Pose database archive at prima_archive_uri), or an s3:// prefix "
            "that already holds train-*.tfrecord, eval-*.tfrecord and manifest.json.",
            "section": "Training",
        },
        "training_steps": {
            "default": 25000, "type": "integer", "minimum": 1, "maximum": 10_000_000,
            "title": "Training steps",
            "description": "Optimizer steps (tutorial: 25000).",
            "section": "Training",
        },
        "evaluation_steps": {
            "default": 700, "type": "integer", "minimum": 1, "maximum": 1_000_000,
            "title": "Evaluation steps",
            "description": "At most this many eval batches after training (tutorial: 700).",
            "section": "Training",
        },
        "batch_size": {
            "default": 200, "type": "integer", "minimum": 1, "maximum": 8192,
            "title": "Batch size",
            "description": "Images per step (tutorial: 200).",
            "section": "Training",
        },
        "resnet_size": {
            "default": 50, "type": "integer", "enum": list(RESNET_SIZES),
            "title": "ResNet depth",
            "description": "ResNet v2 depth (tutorial: 50; 10 trains fast on a CPU).",
            "section": "Training",
        },
        "base_filters": {
            "default": 64, "type": "integer", "minimum": 4, "maximum": 512,
            "title": "Base filters",
            "description": "Filters of the first ResNet stage, doubled per stage (tutorial: 64).",
            "section": "Training",
        },
        "learning_rate_decay_epochs": {
            "default": "100,150,200", "type": "string",
            "pattern": r"^[0-9]+(,[0-9]+)*$",
            "title": "Learning-rate decay epochs",
            "description": "Epochs at which the learning rate (0.1 * batch_size / 128) is divided "
            "by 10, comma-separated (tutorial: 100,150,200; short runs need earlier ones).",
            "section": "Training",
        },
        "batch_norm_momentum": {
            "default": 0.99, "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
            "title": "Batch-norm momentum",
            "description": "Moving-average momentum of the batch-norm statistics; lower values "
            "(e.g. 0.9) suit runs of a few hundred steps.",
            "section": "Training",
        },
        "seed": {
            "default": 0, "type": "integer", "minimum": 0, "maximum": 2**31 - 1,
            "title": "Random seed",
            "description": "Seed for weights, data order and the synthetic dataset.",
            "section": "Training",
        },
        # -- training speed (planning.request.speed_hyperparameters) -- begin ----------
        "mixed_precision": {
            "default": "auto", "type": "string", "enum": ["auto", "on", "off"],
            "title": "Mixed precision",
            "description": "Train in mixed_float16 (float16 compute, float32 weights). 'auto': on "
            "for SageMaker GPU instance types (ml.g*, ml.p*), off otherwise and with "
            "backend=local. The exported and frozen model is float32 either way. On a CPU, "
            "only with xla=on: without XLA, float16 runs tens of times slower there.",
            "section": "Training",
        },
        "xla": {
            "default": "auto", "type": "string", "enum": ["auto", "on", "off"],
            "title": "XLA",
            "description": "Compile the training step with XLA (jit_compile). 'auto': on for "
            "SageMaker GPU instance types (ml.g*, ml.p*), off otherwise and with backend=local.",
            "section": "Training",
        },
        # -- training speed -- end -----------------------------------------------------
        # -- SageMaker resources ------------------------------------------------------
        "instance_type": {
            "default": DEFAULT_INSTANCE_TYPE,
            "type": "string",
            "pattern": INSTANCE_TYPE_PATTERN,
            "title": "Instance type",
            "description": "SageMaker training instance; a GPU type gets the GPU image, a CPU "
            "type (ml.m5.xlarge, ...) the CPU one. Default ml.g4dn.xlarge, not the tutorial's "
            "ml.p2.xlarge: SageMaker's TensorFlow 2.21 images do not run on P2.",
            "section": "SageMaker",
        },
        "instance_count": {
            "default": 1, "type": "integer", "minimum": 1, "maximum": 1,
            "title": "Instance count",
            "description": SINGLE_HOST_REASON,
            "section": "SageMaker",
        },
        "volume_size_gb": {
            "default": 100, "type": "integer", "minimum": 1, "maximum": 16384,
            "title": "Volume size (GB)",
            "description": "EBS volume per training instance (tutorial: 100).",
            "section": "SageMaker",
        },
        "max_run_seconds": {
            "default": 432000, "type": "integer", "minimum": 1, "maximum": 2_419_200,
            "title": "Max run time (s)",
            "description": "StoppingCondition.MaxRuntimeInSeconds (tutorial: 432000 = 5 days; "
            "SageMaker's limit is 28 days). The local backend stops the process too.",
            "section": "SageMaker",
        },
        "role_arn": {
            # null, not "": Airflow's trigger form treats an empty string as a missing
            # required value and would keep the Trigger button disabled for backend=local.
            "default": None,
            "type": ["string", "null"],
            "pattern": ROLE_ARN_PATTERN,
            "title": "SageMaker execution role ARN",
            "description": "arn:aws:iam::<account>:role/<name> that the training job runs as. "
            f"Empty: the AWS connection's extra '{CONNECTION_ROLE_EXTRA}' is used with "
            "backend=sagemaker; not needed with backend=local.",
            "section": "SageMaker",
        },
        "use_spot_instances": {
            "default": False,
            "type": "boolean",
            "title": "Managed spot training",
            "description": "backend=sagemaker only: train on spot capacity (often 60-90% cheaper; "
            "the job may wait for capacity and be interrupted). SageMaker syncs /opt/ml/checkpoints "
            "to .../TFartifacts/<job>/checkpoints; the entry point writes no checkpoints yet, so "
            "an interrupted job restarts training from step 0.",
            "section": "SageMaker",
        },
        "max_wait_seconds": {
            "default": 604800, "type": "integer", "minimum": 1, "maximum": MAX_JOB_LIFETIME_SECONDS,
            "title": "Max wait incl. spot waits (s)",
            "description": "With use_spot_instances: StoppingCondition.MaxWaitTimeInSeconds, the "
            "time spent waiting for spot capacity plus the run time; at least max_run_seconds "
            "(default 7 days = the 5-day max run + 2 days of waiting).",
            "section": "SageMaker",
        },
        # -- acceptance ---------------------------------------------------------------
        "min_accuracy": {
            "default": 0.9, "type": "number", "minimum": 0, "maximum": 1,
            "title": "Minimum held-out accuracy",
            "description": "The frozen model is published only if its accuracy on the held-out "
            "split reaches this (0..1).",
            "section": "Acceptance",
        },
        "promotion_margin": {
            "default": 0.0, "type": "number", "minimum": 0, "maximum": 1,
            "title": "Promotion margin",
            "description": "The new model replaces the published one if its held-out accuracy is at "
            "least the published model's (on the same shards) minus this margin (0..1).",
            "section": "Acceptance",
        },
        "force_publish": {
            "default": False, "type": "boolean",
            "title": "Force publish",
            "description": "Publish the new model even if it is less accurate than the published "
            "one (it must still pass min_accuracy and parity).",
            "section": "Acceptance",
        },
        # -- synthetic dataset --------------------------------------------------------
        "prima_archive_uri": {
            "default": None, "type": ["string", "null"],
            "pattern": r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\s]+$",
            "title": "Prima archive",
            "description": "With dataset_source=prima: s3:// URI of HeadPoseImageDatabase.tar.gz; "
            "converted once into shards (the tutorial's crops; persons 05, 10, 15 held out).",
            "section": "Prima dataset",
        },
        "prima_num_data_aug": {
            "default": 15, "type": "integer", "minimum": 1, "maximum": 100,
            "title": "Prima crops per training image",
            "description": "With dataset_source=prima: random face-containing crops per training "
            "image (tutorial: 15).",
            "section": "Prima dataset",
        },
        "prima_num_eval_aug": {
            "default": 3, "type": "integer", "minimum": 1, "maximum": 100,
            "title": "Prima crops per held-out image",
            "description": "With dataset_source=prima: crops per held-out image (tutorial: 3).",
            "section": "Prima dataset",
        },
        "synthetic_train_per_pose": {
            "default": 60, "type": "integer", "minimum": 1, "maximum": 100_000,
            "title": "Synthetic training images per pose",
            "description": "With dataset_source=synthetic: training images per (tilt, pan) pose "
            "of the 93-pose Prima grid.",
            "section": "Synthetic dataset",
        },
        "synthetic_eval_per_pose": {
            "default": 10, "type": "integer", "minimum": 1, "maximum": 100_000,
            "title": "Synthetic held-out images per pose",
            "description": "With dataset_source=synthetic: held-out evaluation images per pose.",
            "section": "Synthetic dataset",
        },
        "images_per_shard": {
            "default": 1000, "type": "integer", "minimum": 1, "maximum": 1_000_000,
            "title": "Images per shard",
            "description": "Most records in one .tfrecord file of the synthetic dataset.",
            "section": "Synthetic dataset",
        },
    }


class RunParamsError(ValueError):
    """Run parameters that cannot work together; the message says which and why."""


def validate_run_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The run's parameters with defaults filled in, or ``RunParamsError`` listing every problem.

    Checks each value against its schema (as Airflow does when a run is created) and then
    the rules across fields. Unknown names are refused too: a misspelt ``trainig_steps``
    would otherwise be ignored and the run would silently use the default.
    """
    import jsonschema  # light, and only needed at run time

    schemas = param_schemas()
    problems: list[str] = []
    unknown = sorted(set(params) - set(schemas))
    if unknown:
        problems.append(f"unknown parameter(s) {unknown}; known: {sorted(schemas)}")
    values = {name: copy.deepcopy(params.get(name, spec["default"])) for name, spec in schemas.items()}
    for name, spec in schemas.items():
        schema = {k: v for k, v in spec.items() if k not in ("default", "title", "section")}
        try:
            jsonschema.validate(values[name], schema)
        except jsonschema.ValidationError as error:
            reason = error.message
            if error.validator in ("pattern", "not"):  # a regex or sub-schema means nothing to a user
                reason = f"breaks the naming rules: {spec['description']}"
            elif name == "instance_count":
                reason = f"{reason}. {SINGLE_HOST_REASON}"
            problems.append(f"{name}={values[name]!r}: {reason}")
    if not problems:
        problems.extend(_cross_field_problems(values))
    if problems:
        raise RunParamsError("invalid run parameters:\n  - " + "\n  - ".join(problems))
    return values


def _cross_field_problems(values: Mapping[str, Any]) -> list[str]:
    problems = []
    if values["dataset_source"] == "prima" and not values["prima_archive_uri"]:
        problems.append("dataset_source=prima needs prima_archive_uri (the archive's s3:// URI)")
    if values["backend"] == "sagemaker":
        if _DEPRECATED_INSTANCE_RE.match(values["instance_type"]):
            problems.append(
                f"instance_type={values['instance_type']!r}: SageMaker's TensorFlow 2.21 "
                "training images do not run on P2 instances; use e.g. ml.g4dn.xlarge, "
                "ml.p3.2xlarge or ml.m5.xlarge"
            )
    if values["use_spot_instances"]:
        if values["backend"] != "sagemaker":
            problems.append(
                "use_spot_instances needs backend=sagemaker (the local backend has no spot capacity)"
            )
        if values["max_wait_seconds"] < values["max_run_seconds"]:
            problems.append(
                f"max_wait_seconds={values['max_wait_seconds']} is less than max_run_seconds="
                f"{values['max_run_seconds']}: SageMaker needs MaxWaitTimeInSeconds >= "
                "MaxRuntimeInSeconds for spot training (the wait includes the run)"
            )
    source = values["dataset_source"]
    if source.startswith("s3://"):
        try:
            split_s3_uri(source)
        except ValueError as error:
            problems.append(f"dataset_source={source!r}: {error}")
    return problems
