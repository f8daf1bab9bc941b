"""The deployment profile: what a scheduled run of this deployment does.

``$HEADPOSE_RUN_DEFAULTS`` holds one JSON object, set alike for every Airflow component.
Each key is either a run parameter - its default for this deployment: scheduled runs use
it and the trigger form starts from it - or a **deployment setting**, which a person
allowed to trigger must not change and which no trigger's conf may carry:

``evaluation_set``           ``s3://`` prefix of the pinned evaluation set (``eval-*.tfrecord``
                             and ``manifest.json``): every new model and the published one are
                             scored on it
``expected_bucket_owner``    the 12-digit account that must own the bucket; sent with every
                             S3 call the pipeline makes, so a bucket of anyone else is refused
``local_images_per_second``  training images/s of this worker's CPU by ``resnet_size`` at 64
                             base filters, for refusing a local run that cannot finish in time
``publish_latest_mirror``    also copy the published files to ``published/latest/`` for devices
                             that cannot read ``latest.json`` (default true)
``edge_formats``             the edge formats this deployment's devices run (default: every
                             one); converting ResNet-50 to all of them takes minutes

and, for a governed AWS account (``planning.governed`` puts them into the request):

``vpc_subnets``, ``vpc_security_groups``  the training job's ``VpcConfig`` (both or neither)
``kms_key_id``               KMS key ARN for the job's output and volume, and SSE-KMS on every
                             S3 write the pipeline makes
``inter_container_encryption``  ``EnableInterContainerTrafficEncryption``
``network_isolation``        ``EnableNetworkIsolation``; the code then reaches the job as an
                             input channel
``object_lock_days``         published version files kept in S3 Object Lock governance mode
                             this many days, where the bucket has Object Lock (0: off)

and release governance (``planning.release_settings``; the approval task and the Model Registry):

``release_approval``         ``none`` (publish what beats the champion) or ``required`` (a person
                             approves it in the Airflow UI or API first)
``approvers``                Airflow user names who may answer; none: every user allowed to edit
                             Human-in-the-loop details
``approval_timeout``         how long a request waits (``<n>s|m|h|d``); unanswered is a rejection
``model_package_group``      SageMaker Model Registry group every accepted version is registered
                             in (default ``headpose``; empty: no Model Registry)

and, for retraining when new data arrives (``planning.new_data``):

``retrain_on``               ``schedule`` (the cron alone, the default), ``data`` (an upload under
                             ``new_data_prefix``) or ``either``
``new_data_prefix``          ``s3://`` prefix where new data is uploaded: a Prima-layout archive or
                             a staged dataset's ``manifest.json``
``new_data_queue``           URL of the SQS queue the bucket notifies of those uploads

and, for rolling a model out to a device fleet (``planning.rollout_settings``):

``rollout``                  canary share or list of devices, minimum canaries, soak time, error
                             and latency bounds; set, ``publish`` moves the canary channel only
                             and ``headpose_rollout`` decides the stable one (absent: as before)
``greengrass``               the AWS IoT Greengrass V2 component written beside each version

Precedence for a run parameter: the trigger's conf, then the profile, then the built-in
default (the embedded demo's). Checked when the DAG file is parsed: invalid JSON, an
unknown key, a value its schema refuses, or an ``instance_count`` that its own backend,
instance type or dataset cannot train with is a DAG import error naming the variable,
the key and the rule. Standard library only at import time.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from headpose.planning.rollout_settings import GREENGRASS_SCHEMA, ROLLOUT_SCHEMA, greengrass_in_force, rollout_in_force

PROFILE_ENV = "HEADPOSE_RUN_DEFAULTS"
# Training images/s of the entry point's model on the 2-core CPU this project is built on,
# at 64 base filters and batch 64 (bench/bench_local_throughput.py, 2026-12-01, with other
# work on the machine: bench/recorded/local_throughput-cpu-2026-12-01.json). A deployment's
# own workers override them with local_images_per_second.
MEASURED_IMAGES_PER_SECOND = {"10": 185.0, "18": 96.0, "34": 25.0, "50": 25.0}
RELEASE_APPROVALS = ("none", "required")
APPROVAL_TIMEOUT_PATTERN = r"^[1-9][0-9]{0,6}(s|m|h|d)$"
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Shorter waits cannot be answered: the scheduler sweeps for timed-out requests every 15 s.
MIN_APPROVAL_SECONDS = 60
RETRAIN_ON = ("schedule", "data", "either")

DEPLOYMENT_SETTINGS: dict[str, dict[str, Any]] = {
    "evaluation_set": {
        "type": ["string", "null"],
        "pattern": r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+$",
        "description": "s3:// prefix of eval-*.tfrecord shards and their manifest.json",
    },
    "expected_bucket_owner": {
        "type": ["string", "null"],
        "pattern": r"^[0-9]{12}$",
        "description": "the AWS account id (12 digits) that owns the bucket",
    },
    "local_images_per_second": {
        "type": "object",
        "propertyNames": {"enum": list(MEASURED_IMAGES_PER_SECOND)},
        "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
        "description": 'images/s by resnet_size at 64 base filters, e.g. {"50": 30}',
    },
    "publish_latest_mirror": {
        "type": "boolean",
        "description": "true or false",
    },
    "vpc_subnets": {
        "type": ["array", "null"], "minItems": 1, "maxItems": 16, "uniqueItems": True,
        "items": {"type": "string", "pattern": r"^subnet-[0-9a-f]{8,17}$"},
        "description": "1-16 subnet ids (subnet-0123456789abcdef0) the training job runs in",
    },
    "vpc_security_groups": {
        "type": ["array", "null"], "minItems": 1, "maxItems": 5, "uniqueItems": True,
        "items": {"type": "string", "pattern": r"^sg-[0-9a-f]{8,17}$"},
        "description": "1-5 security group ids (sg-0123456789abcdef0) of the training job",
    },
    "kms_key_id": {
        "type": ["string", "null"],
        "pattern": r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$",
        "description": "a KMS key ARN (arn:aws:kms:<region>:<account>:key/<uuid>): the IAM policies name it",
    },
    "inter_container_encryption": {"type": "boolean", "description": "true or false"},
    "network_isolation": {"type": "boolean", "description": "true or false"},
    "object_lock_days": {
        "type": "integer", "minimum": 0, "maximum": 36500,
        "description": "days (0-36500; 0: no Object Lock)",
    },
    "release_approval": {
        "type": "string", "enum": list(RELEASE_APPROVALS),
        "description": "'none' or 'required'",
    },
    "approvers": {
        "type": ["array", "null"], "minItems": 1, "maxItems": 100, "uniqueItems": True,
        "items": {"type": "string", "minLength": 1, "maxLength": 256},
        "description": "Airflow user names, e.g. [\"alice\", \"bob\"]",
    },
    "approval_timeout": {
        "type": "string", "pattern": APPROVAL_TIMEOUT_PATTERN,
        "description": "a duration such as 3d, 12h, 90m or 600s (at least 1 minute)",
    },
    "model_package_group": {
        "type": "string", "pattern": r"^([a-zA-Z0-9](-*[a-zA-Z0-9]){0,62})?$",
        "description": "a SageMaker model package group name (letters, digits, hyphens; at most 63), "
        "or '' for no Model Registry",
    },
    "edge_formats": {
        "type": "array", "items": {"type": "string"}, "minItems": 1,
        "description": 'edge format names, e.g. ["openvino_int8", "onnx"]',
    },
    "retrain_on": {
        "type": "string", "enum": list(RETRAIN_ON),
        "description": "schedule (the cron alone), data (an upload under new_data_prefix) or either",
    },
    "new_data_prefix": {
        "type": ["string", "null"],
        "pattern": r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/(\S+/)?$",
        "description": "an s3:// prefix ending in '/', e.g. s3://my-bucket/headpose/incoming/",
    },
    "new_data_queue": {
        "type": ["string", "null"],
        "pattern": r"^https://sqs\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[0-9]{12}/[A-Za-z0-9_-]{1,80}$",
        "description": "an SQS queue URL, https://sqs.<region>.amazonaws.com/<account>/<name>",
    },
    "rollout": ROLLOUT_SCHEMA,
    "greengrass": GREENGRASS_SCHEMA,
}


def approval_seconds(duration: str) -> int:
    """``3d`` -> 259200: an ``approval_timeout`` in seconds."""
    return int(duration[:-1]) * _SECONDS_PER_UNIT[duration[-1]]


class ProfileError(ValueError):
    """``$HEADPOSE_RUN_DEFAULTS`` cannot be used; the message names the key and the rule."""


@dataclass(frozen=True)
class DeploymentSettings:
    """The deployment settings in force (the profile's, over these defaults)."""

    evaluation_set: str | None = None
    expected_bucket_owner: str | None = None
    local_images_per_second: dict[str, float] = field(default_factory=lambda: dict(MEASURED_IMAGES_PER_SECOND))
    publish_latest_mirror: bool = True
    vpc_subnets: list[str] | None = None
    vpc_security_groups: list[str] | None = None
    kms_key_id: str | None = None
    inter_container_encryption: bool = False
    network_isolation: bool = False
    object_lock_days: int = 0
    release_approval: str = "none"
    approvers: list[str] | None = None
    approval_timeout: str = "3d"
    model_package_group: str = "headpose"
    edge_formats: list[str] | None = None  # None: every format
    retrain_on: str = "schedule"
    new_data_prefix: str | None = None
    new_data_queue: str | None = None
    rollout: dict[str, Any] | None = None  # None: no channels (rollout_in_force fills the defaults)
    greengrass: dict[str, Any] | None = None

    @property
    def approval_timeout_seconds(self) -> int:
        return approval_seconds(self.approval_timeout)

    @property
    def watches_new_data(self) -> bool:
        """Whether an upload under ``new_data_prefix`` starts a run."""
        return self.retrain_on != "schedule"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeploymentSettings":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass(frozen=True)
class Profile:
    """A parsed profile: parameter defaults and deployment settings, and where they came from."""

    params: dict[str, Any]
    settings: DeploymentSettings
    source: str  # "$HEADPOSE_RUN_DEFAULTS" or "built-in defaults"

    def describe(self) -> str:
        """One line for the plan_run log and the DAG's docs."""
        if not self.params and self.source != f"${PROFILE_ENV}":
            return "deployment profile: none (built-in defaults: the embedded demo)"
        settings = {k: v for k, v in self.settings.to_dict().items() if v != getattr(DeploymentSettings(), k)}
        return (f"deployment profile {self.source}: parameters {json.dumps(self.params, sort_keys=True)}; "
                f"settings {json.dumps(settings, sort_keys=True)}")


def load_profile(environ: Mapping[str, str] | None = None) -> Profile:
    """The profile in ``$HEADPOSE_RUN_DEFAULTS`` (none set: the built-in defaults)."""
    env = os.environ if environ is None else environ
    raw = env.get(PROFILE_ENV, "").strip()
    if not raw:
        return Profile({}, DeploymentSettings(), "built-in defaults")
    try:
        document = json.loads(raw)
    except ValueError as error:
        raise ProfileError(f"${PROFILE_ENV} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ProfileError(f"${PROFILE_ENV} must be a JSON object of parameter defaults, got {type(document).__name__}")
    params, settings = _checked(document, env)
    return Profile(params, DeploymentSettings.from_dict(settings), f"${PROFILE_ENV}")


def _checked(document: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[dict, dict]:
    import jsonschema

    from headpose.planning.params import built_in_param_schemas

    schemas = built_in_param_schemas(environ)
    problems, params, settings = [], {}, {}
    for name, value in document.items():
        if name in DEPLOYMENT_SETTINGS:
            schema, target = DEPLOYMENT_SETTINGS[name], settings
        elif name in schemas:
            schema, target = schemas[name], params
        else:
            problems.append(f"{name!r} is not a run parameter or deployment setting "
                            f"(parameters: {sorted(schemas)}; settings: {sorted(DEPLOYMENT_SETTINGS)})")
            continue
        rule = {k: v for k, v in schema.items() if k not in ("default", "title", "section", "description")}
        try:
            jsonschema.validate(value, rule)
        except jsonschema.ValidationError as error:
            problems.append(f"{name}={value!r}: {_rule(error, schema)}")
            continue
        target[name] = value
    if "edge_formats" in settings:
        from headpose.artifacts.edge.export import requested_formats  # light: converters import lazily

        try:
            requested_formats(settings["edge_formats"])
        except ValueError as error:
            problems.append(f"edge_formats={settings['edge_formats']!r}: {error}")
    if settings.get("retrain_on", "schedule") != "schedule":
        missing = [name for name in ("new_data_prefix", "new_data_queue") if not settings.get(name)]
        if missing:
            problems.append(f"retrain_on={settings['retrain_on']!r} needs {' and '.join(missing)}: where new data "
                            "is uploaded and the SQS queue its bucket notifies")
    if not problems:
        # The profile's instance count must work with its own backend, type and dataset, or
        # every scheduled run would be refused in plan_run.
        from headpose.planning.rules import instance_problems

        problems = instance_problems({name: params.get(name, schema["default"]) for name, schema in schemas.items()})
    if problems:
        raise ProfileError(f"${PROFILE_ENV} is refused:\n  - " + "\n  - ".join(problems))
    if "local_images_per_second" in settings:
        settings["local_images_per_second"] = {**MEASURED_IMAGES_PER_SECOND, **settings["local_images_per_second"]}
    settings.update({name: fill(settings[name]) for name, fill in
                     (("rollout", rollout_in_force), ("greengrass", greengrass_in_force)) if name in settings})
    return params, settings


def _rule(error: Any, schema: Mapping[str, Any]) -> str:
    if error.validator in ("pattern", "not", "oneOf", "propertyNames", "additionalProperties"):
        return f"{error.message} (expected {schema.get('description', 'see the parameter')})"
    return error.message
