"""The SageMaker training container's contract, as the training toolkit implements it.

The folders under the job's root (``/opt/ml`` in a container), the config files the
toolkit reads, the ``SM_*`` environment and the ``--key value`` arguments a script-mode
program is started with.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping


CURRENT_HOST = "algo-1"


def to_cmd_args(hyperparameters: Mapping[str, Any]) -> list[str]:
    """``--key value`` pairs sorted by key, as the training toolkit's ``to_cmd_args`` builds them.

    One-letter keys get a single dash; dict values become ``k=v,k=v``; ``None`` an empty string.
    """
    args: list[str] = []
    for key in sorted(hyperparameters):
        value = hyperparameters[key]
        args.append(f"--{key}" if len(key) > 1 else f"-{key}")
        if isinstance(value, Mapping):
            args.append(",".join(f"{k}={v}" for k, v in sorted(value.items())))
        else:
            args.append("" if value is None else str(value))
    return args


def decoded_hyperparameters(hyperparameters: Mapping[str, str]) -> dict[str, Any]:
    """Each value JSON-decoded where it parses, else kept as the string (the toolkit's rule)."""
    decoded = {}
    for key, value in hyperparameters.items():
        try:
            decoded[key] = json.loads(value)
        except (TypeError, ValueError):
            decoded[key] = value
    return decoded


def _env_value(value: Any) -> str:
    # The toolkit's mapping.to_env_vars: strings as they are, everything else as compact JSON.
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def training_environment(
    request: Mapping[str, Any],
    dirs: Mapping[str, Path],
    user_hps: Mapping[str, Any],
    framework: Mapping[str, Any],
    args: list[str],
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The training process's environment: this process's, minus Airflow's, plus ``SM_*``.

    Airflow variables (connections, secrets) are dropped because SageMaker's container
    would not have them, and ``PYTHONPATH`` because the program must import its code
    from the source dir alone, as it will in the container.
    """
    base = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in base.items() if not k.startswith("AIRFLOW") and k != "PYTHONPATH"}
    channels = {c["ChannelName"]: str(dirs["data"] / c["ChannelName"]) for c in request.get("InputDataConfig", [])}
    resource = _resource_config(request)
    input_data_config = _input_data_config(request)
    program = str(framework.get("sagemaker_program", ""))
    sm = {
        "model_dir": str(dirs["model"]),
        "channels": sorted(channels),
        "output_dir": str(dirs["output"]),
        "output_data_dir": str(dirs["output_data"]),
        "output_intermediate_dir": str(dirs["output"] / "intermediate"),
        "input_dir": str(dirs["input"]),
        "input_config_dir": str(dirs["config"]),
        "hosts": resource["hosts"],
        "current_host": resource["current_host"],
        "current_instance_type": resource["current_instance_type"],
        "network_interface_name": resource["network_interface_name"],
        "hps": dict(user_hps),
        "framework_params": {k: v for k, v in framework.items() if k not in _TOOLKIT_KEYS},
        "resource_config": resource,
        "input_data_config": input_data_config,
        "num_cpus": os.cpu_count() or 1,
        "num_gpus": _num_gpus(),
        "module_name": program[:-3] if program.endswith(".py") else program,
        "user_entry_point": program,
        "module_dir": str(framework.get("sagemaker_submit_directory", "")),
        "log_level": framework.get("sagemaker_container_log_level", 20),
        "user_args": args,
    }
    sm.update({f"channel_{name}": path for name, path in channels.items()})
    sm.update({f"hp_{key}": value for key, value in user_hps.items()})
    sm["training_env"] = {k: v for k, v in sm.items() if not k.startswith(("channel_", "hp_"))}
    sm["training_env"]["channel_input_dirs"] = channels
    sm["training_env"]["job_name"] = request["TrainingJobName"]
    env.update({f"SM_{key.upper()}": _env_value(value) for key, value in sm.items()})
    env["TRAINING_JOB_NAME"] = request["TrainingJobName"]
    env["SAGEMAKER_REGION"] = str(framework.get("sagemaker_region", ""))
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are printed
    return env


_TOOLKIT_KEYS = {
    "sagemaker_program", "sagemaker_submit_directory", "sagemaker_region", "sagemaker_job_name",
    "sagemaker_container_log_level", "sagemaker_enable_cloudwatch_metrics",
}


def _resource_config(request: Mapping[str, Any]) -> dict[str, Any]:
    instance_type = request["ResourceConfig"]["InstanceType"]
    hosts = [CURRENT_HOST]
    return {
        "current_host": CURRENT_HOST,
        "current_instance_type": instance_type,
        "current_group_name": "homogeneousCluster",
        "hosts": hosts,
        "instance_groups": [
            {"instance_group_name": "homogeneousCluster", "instance_type": instance_type, "hosts": hosts}
        ],
        "network_interface_name": "eth0",
    }


def _input_data_config(request: Mapping[str, Any]) -> dict[str, dict[str, str]]:
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


def _num_gpus() -> int:
    # The toolkit's own method: count the lines of ``nvidia-smi --list-gpus``.
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def make_dirs(root: Path, request: Mapping[str, Any]) -> dict[str, Path]:
    dirs = {
        "input": root / "input",
        "config": root / "input" / "config",
        "data": root / "input" / "data",
        "model": root / "model",
        "output": root / "output",
        "output_data": root / "output" / "data",
        "code": root / "code",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    (dirs["output"] / "intermediate").mkdir(exist_ok=True)
    return dirs


def write_configs(config_dir: Path, request: Mapping[str, Any], hyperparameters: Mapping[str, str]) -> None:
    (config_dir / "hyperparameters.json").write_text(json.dumps(dict(hyperparameters), indent=2))
    (config_dir / "inputdataconfig.json").write_text(json.dumps(_input_data_config(request), indent=2))
    (config_dir / "resourceconfig.json").write_text(json.dumps(_resource_config(request), indent=2))
