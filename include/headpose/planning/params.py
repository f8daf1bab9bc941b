"""The retraining run's parameters: one JSON schema each.

``param_schemas`` is the single definition. The DAG turns each entry into an Airflow
``Param`` (so the trigger form shows a typed, described field and Airflow refuses a bad
value when the run is created, before any task runs); ``planning.rules`` checks the same
schemas again in ``plan_run``, plus the rules that tie fields together.

Built-in defaults are the embedded demo's: a small ResNet on the synthetic dataset that
trains, freezes, validates and publishes in minutes on a laptop. A deployment replaces
them with its own through ``$HEADPOSE_RUN_DEFAULTS`` (``planning.profile``); the
tutorial's settings (ResNet-50, 25000 steps of 200 on SageMaker) are such a profile. Each
description names the tutorial's value where it differs.

Standard library only at import time: the DAG file imports this module at parse time.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from headpose.planning.layout import BUCKET_NAME_SCHEMA, FOLDER_PATTERN, TRAINING_JOB_NAME_PATTERN

BACKENDS = ("local", "sagemaker")
DATASET_SOURCES = ("synthetic", "prima")
RESNET_SIZES = (10, 18, 34, 50)
BUCKET_ENV = "HEADPOSE_S3_BUCKET"

ROLE_ARN_PATTERN = r"^(|arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512})$"
DATASET_SOURCE_PATTERN = r"^(synthetic|prima|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?)$"
INSTANCE_TYPE_PATTERN = r"^ml\.[a-z0-9-]+\.[a-z0-9]+$"

DEFAULT_INSTANCE_TYPE = "ml.g4dn.xlarge"
# A bound against typos: accounts start with lower SageMaker quotas than this anyway.
MAX_INSTANCE_COUNT = 16
# Hosts the local backend runs as processes of one worker: two prove the multi-host path;
# more would only divide the same CPU between more TensorFlow runtimes.
LOCAL_MAX_INSTANCE_COUNT = 2
# Where the sagemaker backend finds the execution role when role_arn is empty.
CONNECTION_ROLE_EXTRA = "sagemaker_role_arn"
# SageMaker ends any training job 30 days after it starts, waiting included.
MAX_JOB_LIFETIME_SECONDS = 2_592_000

# SageMaker allows 63 characters in a job name; the run's suffix takes 24
# (-YYYY-MM-DD-HH-MM-SS-mmm) and an attempt suffix up to 3 (-NN).
MAX_BASE_JOB_NAME = 36
BASE_JOB_NAME_PATTERN = TRAINING_JOB_NAME_PATTERN.replace("{0,62}", "{0,%d}" % (MAX_BASE_JOB_NAME - 1))
CHANNEL_ORDERS = ("bgr", "rgb")
# How a challenger must compare with the champion (artifacts.comparison).
PROMOTION_RULES = ("not_worse", "significantly_better")
# Training jobs one run may start (the run parameter max_training_attempts); not to be
# confused with the status polls of one job's deferred wait (the operator's max_status_polls).
DEFAULT_MAX_TRAINING_ATTEMPTS = 3


def default_bucket(environ: Mapping[str, str] | None = None) -> str | None:
    """``$HEADPOSE_S3_BUCKET``, or None: there is no built-in bucket (a name anyone may create)."""
    env = os.environ if environ is None else environ
    return env.get(BUCKET_ENV) or None


def param_schemas(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The schemas with this deployment's defaults (``$HEADPOSE_RUN_DEFAULTS`` over the built-in ones).

    Raises ``profile.ProfileError`` for a profile that names an unknown parameter or a
    value its schema refuses.
    """
    from headpose.planning.profile import load_profile  # profile validates against the built-in schemas

    schemas = built_in_param_schemas(environ)
    for name, value in load_profile(environ).params.items():
        schemas[name]["default"] = value
    return schemas


def built_in_param_schemas(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {"default": ..., "type": ..., "description": ..., <JSON-schema keywords>}}``.

    ``title`` and ``description`` feed the trigger form; ``section`` groups its fields.
    """
    return {
        # -- where --------------------------------------------------------------------
        "s3_bucket": {
            "default": default_bucket(environ),
            **BUCKET_NAME_SCHEMA,
            # null: no built-in bucket; plan_run refuses a run that names none.
            "type": ["string", "null"],
            "title": "S3 bucket",
            "description": "Bucket for datasets, code, artifacts and the published model "
            f"(default: the deployment profile's, else ${BUCKET_ENV}; there is no built-in one). "
            "S3 naming rules: 3-63 lowercase letters, digits, '.' and '-', starting and ending "
            "with a letter or digit.",
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
        "base_job_name": {
            "default": "deeplens-TF-headpose",
            "type": "string",
            "pattern": BASE_JOB_NAME_PATTERN,
            "title": "Base job name",
            "description": "Training job names are <base>-<logical time> (the tutorial's "
            f"deeplens-TF-headpose); give each deployment in one account and region its own. At "
            f"most {MAX_BASE_JOB_NAME} letters, digits and single hyphens.",
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
        "channel_order": {
            "default": "bgr",
            "type": "string",
            "enum": list(CHANNEL_ORDERS),
            "title": "Channel order",
            "description": "Colour order of the shards a staged dataset is written in, and so of the "
            "model's input: 'bgr' as the tutorial trained and its DeepLens Lambda feeds (an OpenCV "
            "frame / 255), or 'rgb'. A given s3:// dataset must be in this order.",
            "section": "Training",
        },
        "training_steps": {
            "default": 1000, "type": "integer", "minimum": 1, "maximum": 10_000_000,
            "title": "Training steps",
            "description": "Steps of batch_size images, as on one GPU (tutorial: 25000); on R GPUs "
            "the job runs ceil(training_steps / R) steps of the global batch, the same images.",
            "section": "Training",
        },
        "evaluation_steps": {
            "default": 100, "type": "integer", "minimum": 1, "maximum": 1_000_000,
            "title": "Evaluation steps",
            "description": "At most this many eval batches in train's quick check after training "
            "(tutorial: 700); validate_model's gate always uses the whole evaluation set.",
            "section": "Training",
        },
        "batch_size": {
            "default": 64, "type": "integer", "minimum": 1, "maximum": 8192,
            "title": "Batch size",
            "description": "Images per step of one GPU (tutorial: 200); the global batch is this "
            "times the GPUs of all instances.",
            "section": "Training",
        },
        "resnet_size": {
            "default": 10, "type": "integer", "enum": list(RESNET_SIZES),
            "title": "ResNet depth",
            "description": "ResNet v2 depth (tutorial: 50; 10 trains fast on a CPU).",
            "section": "Training",
        },
        "base_filters": {
            "default": 8, "type": "integer", "minimum": 4, "maximum": 512,
            "title": "Base filters",
            "description": "Filters of the first ResNet stage, doubled per stage (tutorial: 64).",
            "section": "Training",
        },
        "learning_rate_decay_epochs": {
            "default": "8,10", "type": "string",
            "pattern": r"^[0-9]+(,[0-9]+)*$",
            "title": "Learning-rate decay epochs",
            "description": "Epochs at which the learning rate (0.1 * batch_size / 128) is divided "
            "by 10, comma-separated (tutorial: 100,150,200; short runs need earlier ones).",
            "section": "Training",
        },
        "batch_norm_momentum": {
            "default": 0.9, "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
            "title": "Batch-norm momentum",
            "description": "Moving-average momentum of the batch-norm statistics (tutorial: 0.99); "
            "lower values such as 0.9 suit runs of a few thousand steps.",
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
            "default": 1, "type": "integer", "minimum": 1, "maximum": MAX_INSTANCE_COUNT,
            "title": "Instance count",
            "description": "Training hosts. Above 1 they train as one (MultiWorkerMirroredStrategy, "
            "every GPU of every host): batch_size images per GPU, training_steps in images of one "
            "GPU, the learning rate scaled with the global batch; backend=sagemaker needs a GPU "
            f"instance type, backend=local runs at most {LOCAL_MAX_INSTANCE_COUNT} hosts as "
            "processes; the dataset needs a training shard per host.",
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
            "the job may wait for capacity and be interrupted). The entry point saves its state to "
            "/opt/ml/checkpoints every 500 steps, which SageMaker syncs to "
            ".../TFartifacts/<job>/checkpoints; an interrupted job resumes from the latest one.",
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
            "default": 0.75, "type": "number", "minimum": 0, "maximum": 1,
            "title": "Minimum held-out accuracy",
            "description": "The frozen model is published only if its top-1 accuracy on the evaluation "
            "set reaches this (0..1). The tutorial's own models reach 0.79-0.82 on Prima persons "
            "05/10/15.",
            "section": "Acceptance",
        },
        "min_class_recall": {
            "default": 0.4, "type": "number", "minimum": 0, "maximum": 1,
            "title": "Minimum recall of every class",
            "description": "...and only if each of the 9 classes present in the evaluation set is "
            "recognised at least this often (0..1): a model that never predicts a class fails.",
            "section": "Acceptance",
        },
        "promotion_margin": {
            "default": 0.0, "type": "number", "minimum": 0, "maximum": 1,
            "title": "Promotion margin",
            "description": "The new model replaces the published one only if its held-out accuracy is at "
            "least the published model's (on the same shards) minus this margin (0..1).",
            "section": "Acceptance",
        },
        "promotion_rule": {
            "default": "not_worse", "type": "string", "enum": list(PROMOTION_RULES),
            "title": "Promotion rule",
            "description": "How the new model must compare with the published one, both scored on the same "
            "images (McNemar's exact test on the images where they disagree, 95% confidence): "
            "'not_worse' promotes it unless it is significantly worse (or below the margin); "
            "'significantly_better' only when it is significantly better.",
            "section": "Acceptance",
        },
        "max_training_attempts": {
            "default": DEFAULT_MAX_TRAINING_ATTEMPTS, "type": "integer", "minimum": 1, "maximum": 9,
            "title": "Training jobs per run",
            "description": "backend=sagemaker: how many jobs (<job>, <job>-2, ...) one run may start "
            "when one fails for lack of capacity or an internal error, or when train is cleared "
            "after a failed or stopped job.",
            "section": "SageMaker",
        },
        "force_publish": {
            "default": False, "type": "boolean",
            "title": "Force publish",
            "description": "Publish the new model even if it is less accurate than the published "
            "one (it must still pass min_accuracy and parity).",
            "section": "Acceptance",
        },
        "force_retrain": {
            "default": False, "type": "boolean",
            "title": "Force retrain",
            "description": "Train even if a model was already trained on this data version (the same "
            "data with the same dataset and training settings, published or refused); without it such "
            "a run trains nothing and says so. Scheduled and data-started runs never set it.",
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
