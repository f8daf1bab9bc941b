"""What SageMaker's platform prepares in a training container before the toolkit starts.

The job's folders under its root (``/opt/ml`` in a container), the three config files
written from the CreateTrainingJob request, and the environment in which the SageMaker
training toolkit (``sagemaker-training``, whose ``train`` command SageMaker's training
images run) is started. Everything after that - reading the configs, the ``SM_*``
variables, extracting the code, the ``--key value`` arguments, starting the program,
the ``failure`` file for an error the program did not report - is the toolkit's own.

A job of several instances is several such containers, ``algo-1``, ``algo-2``, ...: here
each host has its own root (``host_root``), configs naming it as the current host, and,
when the request enables ``MultiWorkerMirroredStrategy``, the ``TF_CONFIG`` that
SageMaker's TensorFlow image would write, with loopback addresses instead of host names
(``loopback_tf_config``): the hosts are processes of this machine.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Mapping

from headpose.planning.request import hyperparameter
from headpose.training.cluster import MULTI_WORKER_FLAG

CURRENT_HOST = "algo-1"  # the first host, SageMaker's name for it; the chief of a cluster
SUBMIT_DIRECTORY = "sagemaker_submit_directory"
# The toolkit's command (its ``train`` console script). SageMaker's TensorFlow image also
# names a framework module (SAGEMAKER_TRAINING_MODULE, from sagemaker-tensorflow-training)
# that the toolkit hands over to; that package is not a dependency here, so the toolkit
# runs the program itself, as it does for any script-mode image without one.
TOOLKIT_MODULE = "sagemaker_training.cli.train"


def make_dirs(root: Path) -> dict[str, Path]:
    """The job's folders, empty; ``output/intermediate`` too.

    That folder is made here, as SageMaker's platform does, because the toolkit only
    starts its own S3 sync of it (with the worker's credentials) when it is missing.
    """
    dirs = {
        "input": root / "input",
        "config": root / "input" / "config",
        "data": root / "input" / "data",
        "model": root / "model",
        "output": root / "output",
        "output_data": root / "output" / "data",
        "intermediate": root / "output" / "intermediate",
        "code": root / "code",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return dirs


def host_names(request: Mapping[str, Any]) -> list[str]:
    """``algo-1`` .. ``algo-<InstanceCount>``, as SageMaker names a job's hosts."""
    return [f"algo-{index}" for index in range(1, int(request["ResourceConfig"].get("InstanceCount", 1)) + 1)]


def host_root(root: Path, host: str) -> Path:
    """The folder that is ``host``'s ``/opt/ml``: the job's root for the first host, as
    for a job of one; ``<root>/hosts/<host>`` for the others."""
    return root if host == CURRENT_HOST else root / "hosts" / host


def multi_worker(request: Mapping[str, Any]) -> bool:
    """Whether the request enables MultiWorkerMirroredStrategy as SageMaker's TensorFlow image reads it."""
    return hyperparameter(request, MULTI_WORKER_FLAG) is True


def loopback_tf_config(hosts: list[str], current_host: str) -> dict[str, str]:
    """``{host: TF_CONFIG}``: every host a worker on a free port of this machine."""
    ports = []
    for _ in hosts:
        # Bound then released: the port stays free until the worker binds it, unless another
        # program takes it in between, which fails the job's start, never its result.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    workers = [f"127.0.0.1:{port}" for port in ports]
    return {
        host: json.dumps({"cluster": {"worker": workers}, "environment": "cloud",
                          "task": {"type": "worker", "index": index}})
        for index, host in enumerate(hosts)
    }


def write_configs(
    config_dir: Path, request: Mapping[str, Any], sourcedir: Path, current_host: str = CURRENT_HOST,
) -> None:
    """``hyperparameters.json``, ``inputdataconfig.json``, ``resourceconfig.json`` of the request.

    The hyperparameters are the request's, except that ``sagemaker_submit_directory``
    names ``sourcedir``, the local, verified copy of the code: the toolkit extracts a
    local tarball as it would download an ``s3://`` one, so it never reads S3 itself.
    (A ``file://`` URI is not accepted by the toolkit; a plain path is.)
    """
    hyperparameters = dict(request.get("HyperParameters") or {})
    hyperparameters[SUBMIT_DIRECTORY] = json.dumps(str(sourcedir))
    files = {
        "hyperparameters.json": hyperparameters,
        "inputdataconfig.json": input_data_config(request),
        "resourceconfig.json": resource_config(request, current_host),
    }
    for name, content in files.items():
        (config_dir / name).write_text(json.dumps(content, indent=2))


def resource_config(request: Mapping[str, Any], current_host: str = CURRENT_HOST) -> dict[str, Any]:
    instance_type = request["ResourceConfig"]["InstanceType"]
    hosts = host_names(request)
    return {
        "current_host": current_host,
        "current_instance_type": instance_type,
        "current_group_name": "homogeneousCluster",
        "hosts": hosts,
        "instance_groups": [
            {"instance_group_name": "homogeneousCluster", "instance_type": instance_type, "hosts": hosts}
        ],
        "network_interface_name": "eth0",
    }


def input_data_config(request: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    config = {}
    for channel in request.get("InputDataConfig", []):
        entry = {
            "TrainingInputMode": channel.get("InputMode")
            or request["AlgorithmSpecification"].get("TrainingInputMode", "File"),
            "S3DistributionType": channel["DataSource"]["S3DataSource"].get(
                "S3DataDistributionType", "FullyReplicated"
            ),
            "RecordWrapperType": channel.get("RecordWrapperType", "None"),
        }
        if channel.get("ContentType"):
            entry["ContentType"] = channel["ContentType"]
        config[channel["ChannelName"]] = entry
    return config


def toolkit_environment(
    root: Path, job: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment the toolkit starts in: this process's, cleaned, plus the platform's.

    Airflow's variables (connections, secrets) are dropped because SageMaker's container
    would not have them; ``PYTHONPATH`` because the program must import its code from the
    source dir alone (the toolkit puts the code folder first on the path); ``SM_*`` and
    ``SAGEMAKER_*`` because the toolkit reads some of them (``SAGEMAKER_PROGRAM``,
    ``SM_CURRENT_HOST``...) before the configs, so a value left in the worker's
    environment would override the request; ``TF_CONFIG`` because it would make one host
    of a cluster it is not in.
    """
    base = dict(os.environ if environ is None else environ)
    env = {
        key: value for key, value in base.items()
        if not key.startswith(("AIRFLOW", "SM_", "SAGEMAKER_")) and key not in ("PYTHONPATH", "TF_CONFIG")
    }
    env.update({
        "SAGEMAKER_BASE_DIR": str(root),  # the toolkit's stand-in for /opt/ml
        # The toolkit otherwise waits up to 15 minutes for the host name algo-1 to resolve.
        "SM_STUDIO_LOCAL_MODE": "true",
        "TRAINING_JOB_NAME": job,  # set by SageMaker's platform in the container
        "PYTHONUNBUFFERED": "1",  # lines reach the log as they are printed
    })
    return env
