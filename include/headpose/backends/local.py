"""The ``local`` training backend: a CreateTrainingJob request honoured on this machine.

It plays SageMaker's platform around the SageMaker training toolkit
(``sagemaker-training``, what SageMaker's TensorFlow image runs), so that every task
after ``train`` is identical for both backends:

1. channels (``S3Prefix``) are downloaded to ``<root>/input/data/<channel>/``, and
   ``sourcedir.tar.gz`` to ``<root>/sourcedir.tar.gz``, whose sha256 must be the one
   ``package_code`` recorded (``SourcedirMismatch`` otherwise: nothing runs);
2. ``<root>/input/config/{hyperparameters,inputdataconfig,resourceconfig}.json`` are
   written from the request, ``sagemaker_submit_directory`` naming that verified copy;
3. the toolkit's ``train`` runs with ``SAGEMAKER_BASE_DIR=<root>``: it extracts the code
   into ``<root>/code``, sets the ``SM_*`` variables and starts
   ``python <sagemaker_program> --key value ...``. Its output (the program's included) is
   streamed line by line to ``log`` and matched against the ``MetricDefinitions``; the
   run is stopped after ``MaxRuntimeInSeconds``;
4. on failure the text of ``<root>/output/failure`` is raised; on success ``<root>/model``
   is packed into ``<S3OutputPath>/<TrainingJobName>/output/model.tar.gz``.

With ``InstanceCount`` 2 (``LOCAL_MAX_INSTANCE_COUNT``) each host is a toolkit of its
own, started at once: ``algo-1`` in ``<root>``, ``algo-2`` in ``<root>/hosts/algo-2``,
each with configs naming it the current host, the channels of the first (each host of a
SageMaker job gets the whole channel: ``FullyReplicated``), and the ``TF_CONFIG`` that
SageMaker's TensorFlow image writes, on loopback ports. A failing host stops the
others; the job's output is the first host's (the chief's), the only one that writes it.

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

from headpose.artifacts.archive import pack_model_dir
from headpose.backends.container import (
    SUBMIT_DIRECTORY, TOOLKIT_MODULE, host_names, host_root, loopback_tf_config, make_dirs, multi_worker,
    toolkit_environment, write_configs,
)
from headpose.backends.job_record import completed_description, job_record_uri, model_artifact_uri, recorded_result, write_record
from headpose.backends.process import HostCommand, MetricCollector, recording_pid, run_hosts, stop_previous_program
from headpose.backends.sourcedir import verify_sourcedir
from headpose.planning.layout import file_sha256, split_s3_uri
from headpose.planning.params import LOCAL_MAX_INSTANCE_COUNT

Log = Callable[[str], None]


class LocalTrainingError(RuntimeError):
    """The training program failed; the message carries its ``output/failure`` text."""


def run_local_training_job(
    request: Mapping[str, Any],
    s3_client: Any,
    work_root: str | Path,
    log: Log,
    *,
    sourcedir_sha256: str,
    python: str = sys.executable,
    environ: Mapping[str, str] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> dict[str, Any]:
    """Run ``request`` here; return a ``describe_training_job``-shaped dict (status Completed).

    ``sourcedir_sha256`` is what ``package_code`` recorded: code with another checksum
    is refused (``SourcedirMismatch``) before anything of it runs. ``on_start`` receives
    each host's toolkit process as soon as it runs, so that a caller being killed
    (Airflow's ``on_kill``) can stop it and the program with ``stop_process``.
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
    hosts = host_names(request)
    if root.exists():
        for folder in [root, *sorted((root / "hosts").glob("*"))]:
            stop_previous_program(folder, log)
        shutil.rmtree(root)  # a previous, unfinished try: start from nothing, like a new container
    host_dirs = {host: make_dirs(host_root(root, host)) for host in hosts}
    dirs = host_dirs[hosts[0]]
    sourcedir = _fetch_code(s3_client, request, root / "sourcedir.tar.gz", sourcedir_sha256, log)
    log(f"training job {job}: downloading input channels")
    for channel in request.get("InputDataConfig", []):
        count = _download_channel(s3_client, channel, dirs["data"] / channel["ChannelName"])
        log(f"channel {channel['ChannelName']}: {count} files")
        for host in hosts[1:]:  # the same files, as every host of a FullyReplicated channel has
            (host_dirs[host]["data"] / channel["ChannelName"]).symlink_to(dirs["data"] / channel["ChannelName"])
    tf_configs = loopback_tf_config(hosts, hosts[0]) if len(hosts) > 1 and multi_worker(request) else {}
    runs = []
    for host in hosts:
        write_configs(host_dirs[host]["config"], request, sourcedir, current_host=host)
        env = toolkit_environment(host_root(root, host), job, environ)
        if host in tf_configs:
            env["TF_CONFIG"] = tf_configs[host]
        # The code folder as working directory, as in SageMaker's image: the toolkit runs the
        # program there, and stop_previous_program recognises a leftover by it.
        runs.append(HostCommand(host, [python, "-m", TOOLKIT_MODULE], host_dirs[host]["code"], env,
                                recording_pid(host_root(root, host), on_start)))

    metrics = MetricCollector(request["AlgorithmSpecification"].get("MetricDefinitions", []))
    log(f"running the SageMaker training toolkit on {len(hosts)} host(s) {hosts}: {' '.join(runs[0].command)} "
        f"(SAGEMAKER_BASE_DIR={root}{' and ' + str(root / 'hosts') + '/<host>' if len(hosts) > 1 else ''})")
    started = _now()
    exit_codes, timed_out = run_hosts(runs, metrics, log, request["StoppingCondition"]["MaxRuntimeInSeconds"])
    ended = _now()
    if timed_out:
        raise LocalTrainingError(
            f"training job {job} stopped: it ran past MaxRuntimeInSeconds="
            f"{request['StoppingCondition']['MaxRuntimeInSeconds']}"
        )
    failed = [(host, code) for host, code in exit_codes.items() if code != 0]
    if failed:
        raise LocalTrainingError(f"training job {job} failed " + "; ".join(
            f"{'' if len(hosts) == 1 else 'on ' + host + ' '}(exit code {code}): "
            f"{_failure_text(host_dirs[host]['output']) or _no_failure_text(host, failed[0][0])}"
            for host, code in failed))

    artifact = pack_model_dir(dirs["model"], root / "model.tar.gz")
    artifact_sha256 = file_sha256(artifact)
    bucket, key = split_s3_uri(model_artifact_uri(request))
    log(f"uploading {artifact.stat().st_size} bytes to {model_artifact_uri(request)}")
    s3_client.upload_file(str(artifact), bucket, key)
    if any(dirs["output_data"].iterdir()):
        data_archive = pack_model_dir(dirs["output_data"], root / "output.tar.gz")
        s3_client.upload_file(str(data_archive), bucket, key.rsplit("/", 1)[0] + "/output.tar.gz")

    result = completed_description(request, created, started, ended, metrics.final(ended))
    result["LocalBackend"] = {"ArtifactSha256": artifact_sha256, "ExitCode": 0, "Hosts": hosts}
    write_record(request, s3_client, result)
    log(f"training job {job} completed in {result['TrainingTimeInSeconds']} s; "
        f"final metrics: {metrics.summary()}")
    return result


def _check_supported(request: Mapping[str, Any]) -> None:
    count = int(request["ResourceConfig"].get("InstanceCount", 1))
    if not 1 <= count <= LOCAL_MAX_INSTANCE_COUNT:
        raise LocalTrainingError(
            f"the local backend runs 1 to {LOCAL_MAX_INSTANCE_COUNT} hosts on this machine: "
            f"InstanceCount={count}"
        )
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


def _fetch_code(s3_client: Any, request: Mapping[str, Any], archive: Path, sha256: str, log: Log) -> Path:
    """The request's ``sourcedir.tar.gz``, downloaded to ``archive`` and verified there.

    The copy that is checked is the copy that runs: hashing the S3 object and then
    downloading it again would leave a window for a replacement.
    """
    uri = _submit_directory(request)
    bucket, key = split_s3_uri(uri)
    s3_client.download_file(bucket, key, str(archive))
    verify_sourcedir(archive, uri, sha256)
    log(f"source dir {uri}: sha256 {sha256}, as package_code recorded")
    return archive


def _submit_directory(request: Mapping[str, Any]) -> str:
    from headpose.planning.governed import code_source_uri  # with network isolation, the code channel's

    uri = code_source_uri(request)
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise LocalTrainingError(f"{SUBMIT_DIRECTORY} must be an s3:// URI, got {uri!r}")
    return uri


def _no_failure_text(host: str, first_failed: str) -> str:
    if host != first_failed:
        return f"stopped after {first_failed} failed"
    return "the program wrote no output/failure file; see the log above"


def _failure_text(output_dir: Path) -> str:
    failure = output_dir / "failure"
    if not failure.is_file():
        return ""
    return failure.read_text(errors="replace").strip()[:4096]


def _now() -> datetime:
    return datetime.now(timezone.utc)
