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

import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from headpose.artifacts.archive import pack_model_dir, safe_extract
from headpose.backends.container import decoded_hyperparameters, make_dirs, to_cmd_args, training_environment, write_configs
from headpose.backends.job_record import completed_description, job_record_uri, model_artifact_uri, recorded_result, write_record
from headpose.backends.process import MetricCollector, recording_pid, run_program, stop_previous_program
from headpose.planning.layout import file_sha256, split_s3_uri

Log = Callable[[str], None]


class LocalTrainingError(RuntimeError):
    """The training program failed; the message carries its ``output/failure`` text."""


# -- the job's own S3 keys -----------------------------------------------------------


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
    recorded = recorded_result(request, s3_client)
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
    dirs = make_dirs(root, request)
    hyperparameters = dict(request.get("HyperParameters") or {})
    framework = decoded_hyperparameters({k: v for k, v in hyperparameters.items() if k.startswith("sagemaker_")})
    user_hps = decoded_hyperparameters({k: v for k, v in hyperparameters.items() if not k.startswith("sagemaker_")})

    log(f"training job {job}: downloading input channels")
    for channel in request.get("InputDataConfig", []):
        count = _download_channel(s3_client, channel, dirs["data"] / channel["ChannelName"])
        log(f"channel {channel['ChannelName']}: {count} files")
    _fetch_code(s3_client, framework, root, dirs["code"], log)
    write_configs(dirs["config"], request, hyperparameters)

    program = str(framework.get("sagemaker_program") or "")
    if not program or not (dirs["code"] / program).is_file():
        raise LocalTrainingError(f"sagemaker_program {program!r} is not in the extracted source dir")
    args = to_cmd_args(user_hps)
    env = training_environment(request, dirs, user_hps, framework, args, environ)
    metrics = MetricCollector(request["AlgorithmSpecification"].get("MetricDefinitions", []))
    log(f"running: python {program} {' '.join(args)}")
    started = _now()
    exit_code, timed_out = run_program(
        [python, program, *args], dirs["code"], env, metrics, log,
        request["StoppingCondition"]["MaxRuntimeInSeconds"], recording_pid(root, on_start),
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

    result = completed_description(request, framework, created, started, ended, metrics.final(ended))
    result["LocalBackend"] = {"ArtifactSha256": artifact_sha256, "ExitCode": exit_code}
    write_record(request, s3_client, result)
    log(f"training job {job} completed in {result['TrainingTimeInSeconds']} s; "
        f"final metrics: {metrics.summary()}")
    return result


# -- the toolkit's contract ------------------------------------------------------------


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


def _failure_text(output_dir: Path) -> str:
    failure = output_dir / "failure"
    if not failure.is_file():
        return ""
    return failure.read_text(errors="replace").strip()[:4096]


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- retry record ----------------------------------------------------------------------
