"""The ``local`` training backend: a CreateTrainingJob request honoured on this machine.

It does what SageMaker and its training toolkit do for a script-mode TensorFlow job,
with the same inputs and outputs, so that every task after ``train`` is identical for
both backends:

1. channels (``S3Prefix``) are downloaded to ``<root>/input/data/<channel>/`` and
   ``sourcedir.tar.gz`` is extracted (hostile-archive safe) into ``<root>/code/``;
2. ``<root>/input/config/{hyperparameters,inputdataconfig,resourceconfig}.json`` are
   written, and ``SM_*`` variables set, as the toolkit sets them;
3. ``python <sagemaker_program> --key value ...`` runs in ``<root>/code`` (hyperparameters
   other than ``sagemaker_*``, JSON-decoded, sorted by name), its output streamed line by
   line to ``log`` and matched against the ``MetricDefinitions``;
4. on failure the text of ``<root>/output/failure`` is raised; on success ``<root>/model``
   is packed into ``<S3OutputPath>/<TrainingJobName>/output/model.tar.gz``.

The result is shaped like ``describe_training_job``. A ``local-job.json`` record written
beside the artifact, last, marks the job completed: a retried task finds it and returns
the recorded result instead of training again (as a retried SageMaker task must attach
to its job rather than start a second one).

Plain Python: the boto3 S3 client is passed in (the operator takes it from the Airflow
connection), so tests can point it at any endpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from headpose.artifacts.archive import pack_model_dir, safe_extract
from headpose.planning.layout import LOCAL_JOB_RECORD_FILE, file_sha256, join_uri, split_s3_uri

Log = Callable[[str], None]
CURRENT_HOST = "algo-1"
RECORD_VERSION = 1
_FAKE_ACCOUNT = "000000000000"


class LocalTrainingError(RuntimeError):
    """The training program failed; the message carries its ``output/failure`` text."""


# -- the job's own S3 keys -----------------------------------------------------------

def job_output_prefix(request: Mapping[str, Any]) -> str:
    """``<S3OutputPath>/<TrainingJobName>/output`` (where SageMaker puts model.tar.gz)."""
    return join_uri(request["OutputDataConfig"]["S3OutputPath"], f"{request['TrainingJobName']}/output")


def model_artifact_uri(request: Mapping[str, Any]) -> str:
    return join_uri(job_output_prefix(request), "model.tar.gz")


def job_record_uri(request: Mapping[str, Any]) -> str:
    return join_uri(job_output_prefix(request), LOCAL_JOB_RECORD_FILE)


# -- entry point -----------------------------------------------------------------------

def run_local_training_job(
    request: Mapping[str, Any],
    s3_client: Any,
    work_root: str | Path,
    log: Log,
    *,
    python: str = sys.executable,
    environ: Mapping[str, str] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> dict[str, Any]:
    """Run ``request`` here; return a ``describe_training_job``-shaped dict (status Completed).

    ``on_start`` receives the training process as soon as it runs, so that a caller
    being killed (Airflow's ``on_kill``) can stop it with ``stop_process``.
    """
    job = request["TrainingJobName"]
    recorded = _recorded_result(request, s3_client)
    if recorded is not None:
        log(f"training job {job} already completed (found {job_record_uri(request)}); "
            "returning its recorded result without training again")
        return recorded

    _check_supported(request)
    created = _now()
    root = Path(work_root)
    if root.exists():
        stop_previous_program(root, log)
        shutil.rmtree(root)  # a previous, unfinished try: start from nothing, like a new container
    dirs = _make_dirs(root, request)
    hyperparameters = dict(request.get("HyperParameters") or {})
    framework = _decoded({k: v for k, v in hyperparameters.items() if k.startswith("sagemaker_")})
    user_hps = _decoded({k: v for k, v in hyperparameters.items() if not k.startswith("sagemaker_")})

    log(f"training job {job}: downloading input channels")
    for channel in request.get("InputDataConfig", []):
        count = _download_channel(s3_client, channel, dirs["data"] / channel["ChannelName"])
        log(f"channel {channel['ChannelName']}: {count} files")
    _fetch_code(s3_client, framework, root, dirs["code"], log)
    _write_configs(dirs["config"], request, hyperparameters)

    program = str(framework.get("sagemaker_program") or "")
    if not program or not (dirs["code"] / program).is_file():
        raise LocalTrainingError(f"sagemaker_program {program!r} is not in the extracted source dir")
    args = to_cmd_args(user_hps)
    env = training_environment(request, dirs, user_hps, framework, args, environ)
    metrics = MetricCollector(request["AlgorithmSpecification"].get("MetricDefinitions", []))
    log(f"running: python {program} {' '.join(args)}")
    started = _now()
    exit_code, timed_out = _run(
        [python, program, *args], dirs["code"], env, metrics, log,
        request["StoppingCondition"]["MaxRuntimeInSeconds"], _recording_pid(root, on_start),
    )
    ended = _now()
    if timed_out:
        raise LocalTrainingError(
            f"training job {job} stopped: it ran past MaxRuntimeInSeconds="
            f"{request['StoppingCondition']['MaxRuntimeInSeconds']}"
        )
    if exit_code != 0:
        failure = _failure_text(dirs["output"])
        raise LocalTrainingError(
            f"training job {job} failed (exit code {exit_code}): "
            f"{failure or 'the program wrote no output/failure file; see the log above'}"
        )

    artifact = pack_model_dir(dirs["model"], root / "model.tar.gz")
    artifact_sha256 = file_sha256(artifact)
    bucket, key = split_s3_uri(model_artifact_uri(request))
    log(f"uploading {artifact.stat().st_size} bytes to {model_artifact_uri(request)}")
    s3_client.upload_file(str(artifact), bucket, key)
    if any(dirs["output_data"].iterdir()):
        data_archive = pack_model_dir(dirs["output_data"], root / "output.tar.gz")
        s3_client.upload_file(str(data_archive), bucket, key.rsplit("/", 1)[0] + "/output.tar.gz")

    result = _description(request, framework, created, started, ended, metrics.final(ended))
    result["LocalBackend"] = {"ArtifactSha256": artifact_sha256, "ExitCode": exit_code}
    _write_record(request, s3_client, result)
    log(f"training job {job} completed in {result['TrainingTimeInSeconds']} s; "
        f"final metrics: {metrics.summary()}")
    return result


# -- the toolkit's contract ------------------------------------------------------------

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


def _decoded(hyperparameters: Mapping[str, str]) -> dict[str, Any]:
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


# -- steps -----------------------------------------------------------------------------

def _check_supported(request: Mapping[str, Any]) -> None:
    if int(request["ResourceConfig"].get("InstanceCount", 1)) != 1:
        raise LocalTrainingError("the local backend runs one host: InstanceCount must be 1")
    mode = request["AlgorithmSpecification"].get("TrainingInputMode", "File")
    for channel in request.get("InputDataConfig", []):
        source = channel["DataSource"].get("S3DataSource")
        if not source or source.get("S3DataType", "S3Prefix") != "S3Prefix":
            raise LocalTrainingError(
                f"channel {channel['ChannelName']!r}: the local backend supports S3Prefix sources only"
            )
        if (channel.get("InputMode") or mode) != "File":
            raise LocalTrainingError(
                f"channel {channel['ChannelName']!r}: the local backend supports File input mode only"
            )


def _make_dirs(root: Path, request: Mapping[str, Any]) -> dict[str, Path]:
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


def _download_channel(s3_client: Any, channel: Mapping[str, Any], dest: Path) -> int:
    """Every object under the channel's prefix, at its path relative to the prefix."""
    uri = channel["DataSource"]["S3DataSource"]["S3Uri"]
    bucket, prefix = split_s3_uri(uri)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix):].lstrip("/")
            if not relative or relative.endswith("/"):
                continue  # "folder" placeholder objects
            target = (dest / relative).resolve()
            # Keys are data from the bucket: one with ".." must not write outside the channel.
            if not target.is_relative_to(dest.resolve()):
                raise LocalTrainingError(f"refusing S3 key {obj['Key']!r}: it leaves the channel folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3_client.download_file(bucket, obj["Key"], str(target))
            count += 1
    if count == 0:
        raise LocalTrainingError(f"channel {channel['ChannelName']!r}: no objects under {uri}")
    return count


def _fetch_code(s3_client: Any, framework: Mapping[str, Any], root: Path, code_dir: Path, log: Log) -> None:
    uri = str(framework.get("sagemaker_submit_directory") or "")
    if not uri.startswith("s3://"):
        raise LocalTrainingError(f"sagemaker_submit_directory must be an s3:// URI, got {uri!r}")
    bucket, key = split_s3_uri(uri)
    archive = root / "sourcedir.tar.gz"
    s3_client.download_file(bucket, key, str(archive))
    safe_extract(archive, code_dir)
    log(f"source dir {uri} extracted to {code_dir}")


def _write_configs(config_dir: Path, request: Mapping[str, Any], hyperparameters: Mapping[str, str]) -> None:
    (config_dir / "hyperparameters.json").write_text(json.dumps(dict(hyperparameters), indent=2))
    (config_dir / "inputdataconfig.json").write_text(json.dumps(_input_data_config(request), indent=2))
    (config_dir / "resourceconfig.json").write_text(json.dumps(_resource_config(request), indent=2))


class MetricCollector:
    """The last value each ``MetricDefinitions`` regex matched, as SageMaker reports them."""

    def __init__(self, definitions: list[Mapping[str, str]]):
        self.patterns = [(d["Name"], re.compile(d["Regex"])) for d in definitions]
        self.values: dict[str, float] = {}

    def feed(self, line: str) -> None:
        for name, pattern in self.patterns:
            match = pattern.search(line)
            if match:
                try:
                    self.values[name] = float(match.group(1))
                except (IndexError, ValueError):
                    pass

    def final(self, when: datetime) -> list[dict[str, Any]]:
        return [{"MetricName": n, "Value": v, "Timestamp": when} for n, v in self.values.items()]

    def summary(self) -> str:
        return ", ".join(f"{n}={v:g}" for n, v in self.values.items()) or "none"


def _run(
    command: list[str], cwd: Path, env: dict[str, str], metrics: MetricCollector, log: Log,
    max_runtime: int, on_start: Callable[[subprocess.Popen], None] | None,
) -> tuple[int, bool]:
    """Run ``command``, each output line to ``log`` as it comes; stop it after ``max_runtime`` s."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, encoding="utf-8", errors="replace", bufsize=1,
        start_new_session=True,  # its own process group, so a stop reaches its children too
    )
    if on_start is not None:
        on_start(process)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        stop_process(process)

    timer = threading.Timer(max_runtime, stop)
    timer.daemon = True
    timer.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            log(line)
            metrics.feed(line)
        exit_code = process.wait()
    except BaseException:
        # The task itself is being stopped (timeout, kill): do not leave training behind.
        stop_process(process)
        process.wait()
        raise
    finally:
        timer.cancel()
    return exit_code, timed_out.is_set()


PID_FILE = "training.pid"


def _recording_pid(
    root: Path, on_start: Callable[[subprocess.Popen], None] | None
) -> Callable[[subprocess.Popen], None]:
    def started(process: subprocess.Popen) -> None:
        (root / PID_FILE).write_text(str(process.pid))
        if on_start is not None:
            on_start(process)
    return started


def stop_previous_program(root: Path, log: Log) -> bool:
    """Kill the training program a previous try left running in ``root``; whether there was one.

    The program leads its own process group (so that a stop reaches its children), which
    also means it outlives a task process killed with SIGKILL (an OOM kill, a lost
    worker container): on_kill never runs then. Left alone, it would train beside the
    retry in the folder the retry is about to empty. The pid is only trusted if that
    process still works in this folder (``/proc/<pid>/cwd``), so a recycled pid is spared.
    """
    try:
        pid = int((root / PID_FILE).read_text())
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError):
        return False
    if cwd != (root / "code").resolve():
        return False
    log(f"stopping the training program {pid} that a previous try left running")
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    for _ in range(100):  # it is reaped by init; wait until /proc no longer shows it working here
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            break
        time.sleep(0.1)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM the training process and its children (it leads its own process group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _failure_text(output_dir: Path) -> str:
    failure = output_dir / "failure"
    if not failure.is_file():
        return ""
    return failure.read_text(errors="replace").strip()[:4096]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _description(
    request: Mapping[str, Any],
    framework: Mapping[str, Any],
    created: datetime,
    started: datetime,
    ended: datetime,
    final_metrics: list[dict[str, Any]],
) -> dict[str, Any]:
    job = request["TrainingJobName"]
    region = str(framework.get("sagemaker_region") or "us-east-1")
    return {
        "TrainingJobName": job,
        # Formatted like SageMaker's (which lower-cases the name); the account is a placeholder.
        "TrainingJobArn": f"arn:aws:sagemaker:{region}:{_FAKE_ACCOUNT}:training-job/{job.lower()}",
        "ModelArtifacts": {"S3ModelArtifacts": model_artifact_uri(request)},
        "TrainingJobStatus": "Completed",
        "SecondaryStatus": "Completed",
        "HyperParameters": dict(request.get("HyperParameters") or {}),
        "AlgorithmSpecification": dict(request["AlgorithmSpecification"]),
        "RoleArn": request.get("RoleArn", ""),
        "InputDataConfig": list(request.get("InputDataConfig", [])),
        "OutputDataConfig": dict(request["OutputDataConfig"]),
        "ResourceConfig": dict(request["ResourceConfig"]),
        "StoppingCondition": dict(request["StoppingCondition"]),
        "CreationTime": created,
        "TrainingStartTime": started,
        "TrainingEndTime": ended,
        "LastModifiedTime": ended,
        "SecondaryStatusTransitions": [
            {"Status": "Downloading", "StartTime": created, "EndTime": started,
             "StatusMessage": "Downloading input data and the source dir"},
            {"Status": "Training", "StartTime": started, "EndTime": ended,
             "StatusMessage": "Training on the Airflow worker (local backend)"},
            {"Status": "Completed", "StartTime": ended, "EndTime": ended,
             "StatusMessage": "Training job completed"},
        ],
        "FinalMetricDataList": final_metrics,
        "TrainingTimeInSeconds": max(1, round((ended - started).total_seconds())),
        # Nothing is billed: it ran on the worker.
        "BillableTimeInSeconds": 0,
        "EnableNetworkIsolation": bool(request.get("EnableNetworkIsolation", False)),
        "EnableManagedSpotTraining": False,
    }


# -- retry record ----------------------------------------------------------------------

_TIME_FIELDS = ("CreationTime", "TrainingStartTime", "TrainingEndTime", "LastModifiedTime")


def _write_record(request: Mapping[str, Any], s3_client: Any, result: Mapping[str, Any]) -> None:
    bucket, key = split_s3_uri(job_record_uri(request))
    body = json.dumps({"version": RECORD_VERSION, "result": result}, default=_iso, indent=2)
    s3_client.put_object(Bucket=bucket, Key=key, Body=body.encode(), ContentType="application/json")


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot record {type(value).__name__}")


def _recorded_result(request: Mapping[str, Any], s3_client: Any) -> dict[str, Any] | None:
    """The recorded result of this job if it completed and its artifact is still there."""
    from botocore.exceptions import ClientError

    record_bucket, record_key = split_s3_uri(job_record_uri(request))
    artifact_bucket, artifact_key = split_s3_uri(model_artifact_uri(request))
    try:
        body = s3_client.get_object(Bucket=record_bucket, Key=record_key)["Body"].read()
        s3_client.head_object(Bucket=artifact_bucket, Key=artifact_key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    record = json.loads(body)
    result = record.get("result") or {}
    if record.get("version") != RECORD_VERSION or result.get("TrainingJobStatus") != "Completed":
        return None
    for name in _TIME_FIELDS:
        if isinstance(result.get(name), str):
            result[name] = datetime.fromisoformat(result[name])
    for transition in result.get("SecondaryStatusTransitions", []):
        for name in ("StartTime", "EndTime"):
            if isinstance(transition.get(name), str):
                transition[name] = datetime.fromisoformat(transition[name])
    for metric in result.get("FinalMetricDataList", []):
        if isinstance(metric.get("Timestamp"), str):
            metric["Timestamp"] = datetime.fromisoformat(metric["Timestamp"])
    return result
