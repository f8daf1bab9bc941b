"""Run-scoped names: the training job name, every S3 URI of a run, the worker's scratch.

Everything a run writes derives from its ``training_job_name``, and that name derives
from the run's logical time (and, after a failed job, its attempt number) only, so a
retried task computes the same names and finds what the first try wrote. S3 keys follow
the original tutorial's layout::

    s3://<bucket>/<folder>/datasets/<dataset_id>/{train-*,eval-*}.tfrecord, manifest.json
    s3://<bucket>/<folder>/customTFcodes/<job>/source/sourcedir.tar.gz
    s3://<bucket>/<folder>/TFartifacts/<job>/output/model.tar.gz      (S3OutputPath = .../TFartifacts)
    s3://<bucket>/<folder>/TFartifacts/<job>/candidate/...            what tasks hand each other
    s3://<bucket>/<folder>/TFartifacts/<job>/rejected/report.json     a refused model's evidence
    s3://<bucket>/<folder>/TFartifacts/<job>/output/frozen_model.pb, frozen_model.json,
                           report.json, confusion_matrix.png, edge/*  the model version (immutable)
    s3://<bucket>/<folder>/published/latest.json                      the pointer, written last
    s3://<bucket>/<folder>/published/history/<job>.json               every published record
    s3://<bucket>/<folder>/published/latest/*                         optional mirror, after the pointer
    s3://<bucket>/<folder>/published/channels/{canary,stable}.json    with a rollout: the channels
    s3://<bucket>/<folder>/published/rollouts/<decision id>.json      each channel move, written before it
    s3://<bucket>/<folder>/devices/<device id>/status.json           the devices' reports (data, not trusted)

Standard library only: the DAG file imports this module at parse time.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from headpose.training.checksums import file_sha256  # noqa: F401  (re-exported for tasks)

BASE_JOB_NAME = "deeplens-TF-headpose"
DEFAULT_FOLDER = "headpose"

# SageMaker's TrainingJobName rule (CreateTrainingJob API reference).
TRAINING_JOB_NAME_PATTERN = r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$"
_JOB_NAME_RE = re.compile(TRAINING_JOB_NAME_PATTERN)

# S3 general-purpose bucket naming rules: 3-63 characters of lowercase letters, digits,
# dots and hyphens; starting and ending with a letter or digit; no "..", not shaped like
# an IPv4 address, none of the reserved prefixes and suffixes. Written as one regex so
# the trigger form (JSON-schema "pattern") and the code refuse the same names.
BUCKET_NAME_PATTERN = (
    r"^(?!xn--)(?!sthree-)(?!amzn-s3-demo-)(?!\d{1,3}(\.\d{1,3}){3}$)(?!.*\.\.)"
    r"(?!.*-s3alias$)(?!.*--ol-s3$)(?!.*--x-s3$)(?!.*\.-)(?!.*-\.)"
    r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
)
_BUCKET_RE = re.compile(BUCKET_NAME_PATTERN)

# What the trigger form and Airflow check of a bucket name when a run is created: its
# length and alphabet. The rest of BUCKET_NAME_PATTERN (no "..", not IP-shaped, reserved
# prefixes and suffixes) is plan_run's, whose refusal says it in words; as JSON-schema
# keywords it made Airflow's refusal print a page of regexes.
BUCKET_NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 3,
    "maxLength": 63,
    "pattern": r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$",
}

# One path segment: the folder is a key prefix, not a path, so "a/b" or ".." are refused.
FOLDER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
_FOLDER_RE = re.compile(FOLDER_PATTERN)

FROZEN_MODEL_FILE = "frozen_model.pb"
FROZEN_MODEL_JSON_FILE = "frozen_model.json"
REPORT_FILE = "report.json"
REPORT_HTML_FILE = "report.html"
CONFUSION_PNG_FILE = "confusion_matrix.png"
MODEL_ARCHIVE_FILE = "model.tar.gz"
POINTER_FILE = "latest.json"
SOURCEDIR_FILE = "sourcedir.tar.gz"
MANIFEST_FILE = "manifest.json"
LOCAL_JOB_RECORD_FILE = "local-job.json"

WORKSPACE_ENV = "HEADPOSE_WORKSPACE"


def training_job_name(logical_time: datetime, base: str = BASE_JOB_NAME) -> str:
    """``<base>-YYYY-MM-DD-HH-MM-SS-mmm`` of the run's logical time, in UTC.

    Deterministic (a retry gets the same name) and valid for SageMaker: only letters,
    digits and single hyphens, at most 63 characters. A naive time is taken as UTC.
    """
    if logical_time.tzinfo is not None:
        logical_time = logical_time.astimezone(timezone.utc)
    name = f"{base}-{logical_time.strftime('%Y-%m-%d-%H-%M-%S-%f')[:-3]}"
    if not _JOB_NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a valid SageMaker training job name")
    return name


def is_valid_training_job_name(name: str) -> bool:
    return bool(_JOB_NAME_RE.match(name))


def is_valid_bucket_name(name: str) -> bool:
    return bool(_BUCKET_RE.match(name))


def is_valid_folder(folder: str) -> bool:
    return bool(_FOLDER_RE.match(folder))


# -- S3 URIs -------------------------------------------------------------------------

def s3_uri(bucket: str, *parts: str) -> str:
    """``s3://bucket/part1/part2``; a trailing ``/`` on the last part is kept (a prefix)."""
    key = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if parts and parts[-1].endswith("/") and key:
        key += "/"
    return f"s3://{bucket}/{key}"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; refuses anything else."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not is_valid_bucket_name(bucket):
        raise ValueError(f"invalid bucket name in {uri!r}")
    return bucket, key


def object_url(uri: str, endpoint_url: str | None = None, region: str = "us-east-1") -> str:
    """Where a person opens an S3 object: the store's own endpoint when the connection names one
    (MinIO, moto), the AWS console otherwise."""
    from urllib.parse import quote

    bucket, key = split_s3_uri(uri)
    if endpoint_url:
        return f"{endpoint_url.rstrip('/')}/{bucket}/{quote(key, safe='/')}"
    return f"https://console.aws.amazon.com/s3/object/{bucket}?region={region}&prefix={quote(key, safe='/')}"


def object_urls(uris: Mapping[str, str | None], endpoint_url: str | None, region: str) -> dict[str, str]:
    """``{name: url}`` of the given ``{name: s3 uri}`` (a missing URI is left out)."""
    return {name: object_url(uri, endpoint_url, region) for name, uri in uris.items() if uri}


def join_uri(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name.lstrip("/")


def dataset_id(source: str, settings: Mapping[str, Any]) -> str:
    """``<source>-<hash>``: the same source and settings name the same S3 prefix.

    The hash covers every setting (the generator version, the Prima archive's URI...), so
    changing any of them stages a new dataset instead of silently reusing a different one.
    """
    canonical = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))
    return f"{source}-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunLayout:
    """Every S3 URI of one run. ``asdict`` of it is what ``plan_run`` puts in XCom."""

    bucket: str
    folder: str
    training_job_name: str
    dataset_prefix: str
    sourcedir_uri: str
    output_path: str
    model_artifact_uri: str
    local_job_record_uri: str
    candidate_prefix: str
    rejected_prefix: str
    version_prefix: str
    frozen_model_uri: str
    frozen_model_json_uri: str
    report_uri: str
    confusion_png_uri: str
    published_prefix: str
    published_pointer_uri: str
    published_mirror_prefix: str
    history_record_uri: str
    channels_prefix: str
    canary_pointer_uri: str
    stable_pointer_uri: str
    decisions_prefix: str
    devices_prefix: str

    @classmethod
    def for_run(
        cls, bucket: str, folder: str, training_job_name: str, dataset_prefix: str
    ) -> "RunLayout":
        """The layout of a run whose data lies under ``dataset_prefix`` (an ``s3://`` prefix)."""
        if not is_valid_bucket_name(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if not is_valid_folder(folder):
            raise ValueError(f"invalid folder {folder!r}: one path segment of letters, digits, '_.-'")
        if not is_valid_training_job_name(training_job_name):
            raise ValueError(f"invalid training job name {training_job_name!r}")
        split_s3_uri(dataset_prefix)
        sourcedir = s3_uri(bucket, folder, "customTFcodes", training_job_name, "source", SOURCEDIR_FILE)
        return cls._of_job(bucket, folder, training_job_name, dataset_prefix.rstrip("/") + "/", sourcedir)

    @classmethod
    def _of_job(cls, bucket: str, folder: str, job: str, dataset_prefix: str, sourcedir_uri: str) -> "RunLayout":
        output_path = s3_uri(bucket, folder, "TFartifacts")
        job_prefix = join_uri(output_path, job) + "/"
        version = job_prefix + "output/"
        published = s3_uri(bucket, folder, "published/")
        return cls(
            bucket=bucket,
            folder=folder,
            training_job_name=job,
            dataset_prefix=dataset_prefix,
            sourcedir_uri=sourcedir_uri,
            output_path=output_path,
            model_artifact_uri=version + MODEL_ARCHIVE_FILE,
            local_job_record_uri=version + LOCAL_JOB_RECORD_FILE,
            candidate_prefix=job_prefix + "candidate/",
            rejected_prefix=job_prefix + "rejected/",
            version_prefix=version,
            frozen_model_uri=version + FROZEN_MODEL_FILE,
            frozen_model_json_uri=version + FROZEN_MODEL_JSON_FILE,
            report_uri=version + REPORT_FILE,
            confusion_png_uri=version + CONFUSION_PNG_FILE,
            published_prefix=published,
            published_pointer_uri=published + POINTER_FILE,
            published_mirror_prefix=published + "latest/",
            history_record_uri=published + f"history/{job}.json",
            channels_prefix=published + "channels/",
            canary_pointer_uri=published + "channels/canary.json",
            stable_pointer_uri=published + "channels/stable.json",
            decisions_prefix=published + "rollouts/",
            devices_prefix=s3_uri(bucket, folder, "devices/"),
        )

    def for_job(self, training_job_name: str) -> "RunLayout":
        """The same run's layout for another of its training jobs (an attempt after a failed one).

        Every job-scoped URI follows the job; the code it runs stays the run's.
        """
        if not is_valid_training_job_name(training_job_name):
            raise ValueError(f"invalid training job name {training_job_name!r}")
        return self._of_job(self.bucket, self.folder, training_job_name, self.dataset_prefix, self.sourcedir_uri)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunLayout":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def dataset_prefix_for(bucket: str, folder: str, dataset_id: str) -> str:
    return s3_uri(bucket, folder, "datasets", dataset_id + "/")


# -- the worker's scratch ---------------------------------------------------------------

def workspace_root(environ: Mapping[str, str] | None = None) -> Path:
    """``$HEADPOSE_WORKSPACE``, else ``$AIRFLOW_HOME/headpose-workspace``: this worker's scratch.

    Nothing in it outlives the task that wrote it: tasks hand files to each other through
    S3, so workers share no folder and any task can run on any worker.
    """
    env = os.environ if environ is None else environ
    if env.get(WORKSPACE_ENV):
        return Path(env[WORKSPACE_ENV])
    airflow_home = env.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    return Path(airflow_home) / "headpose-workspace"


def run_workspace(training_job_name: str, environ: Mapping[str, str] | None = None) -> Path:
    """The run's folder in this worker's scratch (what ``cleanup`` removes on its worker)."""
    if not is_valid_training_job_name(training_job_name):
        raise ValueError(f"invalid training job name {training_job_name!r}")
    return workspace_root(environ) / training_job_name


@contextmanager
def task_scratch(training_job_name: str, task_id: str) -> Iterator[Path]:
    """A fresh scratch folder for one try of one task, removed when the try ends, however it ends."""
    import shutil
    import tempfile

    parent = run_workspace(training_job_name)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{task_id}-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            parent.rmdir()  # the run's folder, once no other try of the run uses it on this worker
        except OSError:
            pass


def remove_run_workspace(training_job_name: str) -> None:
    """``cleanup``'s work: what the run left in this worker's scratch (a killed try's), gone."""
    import shutil

    shutil.rmtree(run_workspace(training_job_name), ignore_errors=True)
