"""The CreateTrainingJob request of a run, built once for both training backends.

The dict is exactly what ``SageMakerTrainingOperator(config=...)`` (and boto3's
``create_training_job``) takes. The ``sagemaker`` backend sends it to SageMaker; the
``local`` backend (``headpose.backends.local``) hands the same fields to the SageMaker
training toolkit on the worker. Hyperparameters follow the toolkit's script mode: every
value is a JSON string, ``sagemaker_*`` keys configure the toolkit, and the rest become
``--key value`` arguments of ``train.py``.

On GPU instance types the request trains in mixed precision with XLA unless the run's
``mixed_precision`` / ``xla`` parameters say ``off`` (``speed_hyperparameters``); the
entry point exports a float32 model either way.

``RoleArn`` is the ``role_arn`` param; left empty for ``backend=sagemaker``, the ``train``
task fills it from the AWS connection (``HeadposeTrainingOperator``), because only the
worker can read the connection.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

from headpose.planning.layout import RunLayout, join_uri
from headpose.training.cluster import MULTI_WORKER_FLAG
from headpose.training.entry import METRIC_REGEXES  # entry.py imports TF only inside functions
from headpose.training.serving import DEFAULT_CHANNEL_ORDER

TF_FRAMEWORK_VERSION = "2.21"
TF_PY_VERSION = "py312"
ENTRY_POINT = "train.py"
TRAINING_CHANNEL = "training"
# The local backend runs the entry point in the worker's own Python, not in an image. It
# names none rather than look one up: the lookup imports the sagemaker SDK, seconds that
# every local run's plan_run would pay for a value nothing reads.
LOCAL_TRAINING_IMAGE = "local"
# CreateTrainingJob needs a role even when nothing is sent to SageMaker; this one is
# never used, and its account id (all zeros) cannot exist.
LOCAL_ROLE_ARN = "arn:aws:iam::000000000000:role/headpose-local-backend"
# Where SageMaker syncs /opt/ml/checkpoints for managed spot training, under the job's prefix.
CHECKPOINT_FOLDER = "checkpoints"
# SageMaker's default local path, named so that the entry point is told the same folder.
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
# Model hyperparameters the entry point takes, in the order they appear in the request.
MODEL_HYPERPARAMETERS = (
    "training_steps", "evaluation_steps", "batch_size", "resnet_size", "base_filters", "seed",
    "batch_norm_momentum",
)
# SageMaker's GPU instance families: G (g4dn, g5, g6, ...) and P (p3, p4d, p5, ...).
GPU_INSTANCE_TYPE = re.compile(r"^ml\.[gp]\d")
# What mixed precision means on those GPUs: float16 compute, float32 variables.
MIXED_PRECISION_POLICY = "mixed_float16"


def metric_definitions() -> list[dict[str, str]]:
    """SageMaker ``MetricDefinitions`` for the entry point's ``metric:`` log lines."""
    return [{"Name": name, "Regex": regex} for name, regex in METRIC_REGEXES.items()]


def training_image_uri(region: str, instance_type: str) -> str:
    """The SageMaker TensorFlow 2.21 training image for the region and instance type.

    The sagemaker SDK is imported here, not at module level: it is heavy, and the DAG
    file must not load it while being parsed.
    """
    from sagemaker.core import image_uris

    return image_uris.retrieve(
        "tensorflow",
        region=region,
        version=TF_FRAMEWORK_VERSION,
        instance_type=instance_type,
        image_scope="training",
        py_version=TF_PY_VERSION,
    )


# The newest TensorFlow Serving image the pinned sagemaker SDK knows (it has none for 2.21);
# Serving loads SavedModels of the next minor version unless they use ops added there, and a
# ResNet uses none. CPU instances: the edge-sized model needs no GPU to serve.
TF_INFERENCE_VERSION = "2.20"
INFERENCE_INSTANCE_TYPE = "ml.m5.large"


def inference_image_uri(region: str) -> str:
    """SageMaker's TensorFlow Serving image that a Model Registry package names (sagemaker SDK, no network)."""
    from sagemaker.core import image_uris

    return image_uris.retrieve("tensorflow", region=region, version=TF_INFERENCE_VERSION,
                               instance_type=INFERENCE_INSTANCE_TYPE, image_scope="inference")


def image_uri_for_backend(backend: str, region: str, instance_type: str) -> str:
    """The image the request names: the instance type's with SageMaker, none locally."""
    if backend == "sagemaker":
        return training_image_uri(region, instance_type)
    return LOCAL_TRAINING_IMAGE


# Characters a SageMaker tag value may hold; Airflow run ids can hold others.
_TAG_VALUE_UNSAFE = re.compile(r"[^\w .:/=+@-]")


def _tag_value(value: str) -> str:
    return _TAG_VALUE_UNSAFE.sub("_", value)[:256]


def _hp(value: Any) -> str:
    # The sagemaker SDK json.dumps every hyperparameter; the toolkit json.loads them back.
    return json.dumps(value)


def hyperparameter(request: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """A request's hyperparameter decoded as the toolkit decodes it (not JSON: the string itself)."""
    encoded = (request.get("HyperParameters") or {}).get(name)
    if encoded is None:
        return default
    try:
        return json.loads(encoded)
    except (TypeError, ValueError):
        return encoded


def training_job_request(
    layout: RunLayout,
    params: Mapping[str, Any],
    image_uri: str,
    *,
    region: str,
    dag_id: str = "headpose_retraining",
    run_id: str = "",
) -> dict[str, Any]:
    """The CreateTrainingJob request for ``layout``'s run with validated ``params``."""
    job = layout.training_job_name
    hyperparameters = {
        "sagemaker_program": _hp(ENTRY_POINT),
        "sagemaker_submit_directory": _hp(layout.sourcedir_uri),
        "sagemaker_region": _hp(region),
        "sagemaker_job_name": _hp(job),
        "sagemaker_container_log_level": _hp(20),
        # No model_dir, which the sagemaker SDK passes TensorFlow scripts: the entry point
        # writes to SM_MODEL_DIR (uploaded as model.tar.gz), and with an S3 model_dir the
        # TensorFlow image's framework module calls s3:GetBucketLocation at start.
        **{name: _hp(params[name]) for name in MODEL_HYPERPARAMETERS},
        "decay_epochs": _hp(params["learning_rate_decay_epochs"]),
        "channel_order": _hp(params.get("channel_order") or DEFAULT_CHANNEL_ORDER),
        **speed_hyperparameters(params),
        **cluster_hyperparameters(params),
    }
    tags = [
        {"Key": "airflow-dag-id", "Value": _tag_value(dag_id)},
        {"Key": "training-job-name", "Value": job},
    ]
    if run_id:
        tags.append({"Key": "airflow-run-id", "Value": _tag_value(run_id)})
    request: dict[str, Any] = {
        "TrainingJobName": job,
        "AlgorithmSpecification": {
            "TrainingImage": image_uri,
            "TrainingInputMode": "File",
            "MetricDefinitions": metric_definitions(),
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters": hyperparameters,
        "RoleArn": _role_arn(params),
        "InputDataConfig": [
            {
                "ChannelName": TRAINING_CHANNEL,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": layout.dataset_prefix,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "ContentType": "application/x-tfrecord",
                "CompressionType": "None",
                "InputMode": "File",
            }
        ],
        "OutputDataConfig": {"S3OutputPath": layout.output_path},
        "ResourceConfig": {
            "InstanceType": params["instance_type"],
            "InstanceCount": int(params["instance_count"]),
            "VolumeSizeInGB": int(params["volume_size_gb"]),
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": int(params["max_run_seconds"])},
        "EnableNetworkIsolation": False,
        "Tags": tags,
    }
    if params.get("use_spot_instances"):
        request["EnableManagedSpotTraining"] = True
        request["CheckpointConfig"] = {
            "S3Uri": checkpoint_uri(layout), "LocalPath": CHECKPOINT_LOCAL_PATH,
        }
        # An interrupted spot job restarts the program with the folder restored from S3. Every
        # host of a cluster syncs its folder to this one URI and restores all of it; only the
        # chief writes checkpoints (training.distribution.checkpoint_write_dir).
        hyperparameters["checkpoint_dir"] = _hp(CHECKPOINT_LOCAL_PATH)
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = int(params["max_wait_seconds"])
    return request


def is_gpu_instance_type(instance_type: str) -> bool:
    return bool(GPU_INSTANCE_TYPE.match(instance_type))


def speed_switch(mode: str, params: Mapping[str, Any]) -> bool:
    """Whether an ``"auto" | "on" | "off"`` parameter is on for this run.

    ``auto`` is on where SageMaker trains on a GPU instance type; the local backend
    trains on whatever the worker has, so there it stays off unless asked for.
    """
    if mode == "auto":
        return params.get("backend") == "sagemaker" and is_gpu_instance_type(params["instance_type"])
    return mode == "on"


def speed_hyperparameters(params: Mapping[str, Any]) -> dict[str, str]:
    """The entry point's ``dtype_policy`` and ``jit_compile`` from ``mixed_precision`` and ``xla``."""
    mixed = speed_switch(params.get("mixed_precision", "auto"), params)
    xla = speed_switch(params.get("xla", "auto"), params)
    return {
        "dtype_policy": _hp(MIXED_PRECISION_POLICY if mixed else "float32"),
        "jit_compile": _hp(int(xla)),
    }


def cluster_hyperparameters(params: Mapping[str, Any]) -> dict[str, str]:
    """With several instances, the flag on which SageMaker's TensorFlow image writes ``TF_CONFIG``.

    The toolkit hands it to the program too (``SM_FRAMEWORK_PARAMS``), which builds the
    same ``TF_CONFIG`` itself where no image wrote one (``training.cluster``).
    """
    if int(params.get("instance_count", 1)) > 1:
        return {MULTI_WORKER_FLAG: _hp(True)}
    return {}


def checkpoint_uri(layout: RunLayout) -> str:
    """``<S3OutputPath>/<job>/checkpoints``: the job's spot checkpoints, beside its output."""
    return join_uri(layout.output_path, f"{layout.training_job_name}/{CHECKPOINT_FOLDER}")


def _role_arn(params: Mapping[str, Any]) -> str:
    if params.get("role_arn"):
        return params["role_arn"]
    # sagemaker: resolved from the connection by the train task; local: never used.
    return "" if params.get("backend") == "sagemaker" else LOCAL_ROLE_ARN
