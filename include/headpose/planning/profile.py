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

PROFILE_ENV = "HEADPOSE_RUN_DEFAULTS"
# Training images/s of the entry point's model on the 2-core CPU this project is built on,
# at 64 base filters and batch 64 (bench/bench_local_throughput.py, 2026-12-01, with other
# work on the machine: bench/recorded/local_throughput-cpu-2026-12-01.json). A deployment's
# own workers override them with local_images_per_second.
MEASURED_IMAGES_PER_SECOND = {"10": 185.0, "18": 96.0, "34": 25.0, "50": 25.0}

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
}


class ProfileError(ValueError):
    """``$HEADPOSE_RUN_DEFAULTS`` cannot be used; the message names the key and the rule."""


@dataclass(frozen=True)
class DeploymentSettings:
    """The deployment settings in force (the profile's, over these defaults)."""

    evaluation_set: str | None = None
    expected_bucket_owner: str | None = None
    local_images_per_second: dict[str, float] = field(default_factory=lambda: dict(MEASURED_IMAGES_PER_SECOND))
    publish_latest_mirror: bool = True

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
    if not problems:
        # The profile's instance count must work with its own backend, type and dataset, or
        # every scheduled run would be refused in plan_run.
        from headpose.planning.rules import instance_problems

        problems = instance_problems({name: params.get(name, schema["default"]) for name, schema in schemas.items()})
    if problems:
        raise ProfileError(f"${PROFILE_ENV} is refused:\n  - " + "\n  - ".join(problems))
    if "local_images_per_second" in settings:
        settings["local_images_per_second"] = {**MEASURED_IMAGES_PER_SECOND, **settings["local_images_per_second"]}
    return params, settings


def _rule(error: Any, schema: Mapping[str, Any]) -> str:
    if error.validator in ("pattern", "not", "propertyNames", "additionalProperties"):
        return f"{error.message} (expected {schema.get('description', 'see the parameter')})"
    return error.message
