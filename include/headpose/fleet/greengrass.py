"""An AWS IoT Greengrass V2 component per model version: its recipe, the edge client as a zip, the requests.

A team on AWS IoT deploys the published model with the tools it already runs: the recipe names
the edge client (``headpose-edge-client.zip``) and the chosen format's files as artifacts with
their SHA-256 digests, seeds the client's cache at install and runs ``python -m headpose.edge
follow`` on the device's channel (``published/channels/`` with a rollout, else ``latest.json``).
Greengrass then decides *which devices* get the component; the channels decide *which model*.

``make_version`` writes the recipe and the zip beside the version (``output/greengrass/``);
``create_component`` creates it with ``CreateComponentVersion`` where the deployment's
``greengrass`` setting says ``create_component``. Standard library only (boto3 clients are given).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

from headpose.planning.rollout_settings import GREENGRASS_DEFAULTS

RECIPE_FILE = "recipe.json"
CLIENT_ZIP_FILE = "headpose-edge-client.zip"
# The nucleus unpacks a ZIP artifact into a folder named after the file, without ".zip".
CLIENT_FOLDER = CLIENT_ZIP_FILE[:-len(".zip")]
RECIPE_FORMAT_VERSION = "2020-01-25"
# The edge client's own order (headpose.edge.client.PREFERRED_FORMATS) decides the format when
# the setting names none; repeated here so that this module imports nothing of the client.
PREFERRED_FORMATS = ("openvino_fp32", "onnx", "litert_float32", "openvino_fp16", "openvino_int8", "onnx_int8",
                     "litert_int8", "openvino_bf16")
# What a device installs besides the runtime of its format (headpose.edge.runtimes.RUNTIMES).
CLIENT_REQUIREMENTS = ("boto3>=1.34", "numpy>=1.24", "pillow>=10")
RUNTIME_PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime"), "openvino": ("openvino", "openvino"),
                    "litert": ("ai_edge_litert", "ai-edge-litert")}
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# What the client imports: the edge package and the record's fields (registry/record.py is stdlib-only).
CLIENT_MODULES = ("__init__.py", "edge/*.py", "registry/__init__.py", "registry/record.py")
# <base>-YYYY-MM-DD-HH-MM-SS-mmm[-attempt] (headpose.planning.layout.training_job_name).
_JOB_TIME = re.compile(r"-(\d{4})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{3})(?:-(\d+))?$")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: the same bytes from every build


class GreengrassError(ValueError):
    """A component that cannot be made or created as asked; the message says why."""


def greengrass_settings(deployment: Mapping[str, Any] | None) -> dict[str, Any]:
    """The deployment's ``greengrass`` setting with every key filled in."""
    return {**GREENGRASS_DEFAULTS, **dict((deployment or {}).get("greengrass") or {})}


def component_version(training_job_name: str) -> str:
    """The job's time as a semantic version: ``...-2025-03-03-03-00-00-000-2`` is ``20250303.30000000.2``.

    Later runs get greater versions, and a retried run's job (``-N``) a greater patch, as
    Greengrass's deployments compare them. Leading zeros are not allowed in semver, hence ints.
    """
    match = _JOB_TIME.search(training_job_name)
    if not match:
        raise GreengrassError(f"{training_job_name!r} does not end in a run's time; no component version")
    year, month, day, hour, minute, second, milli, attempt = match.groups()
    return f"{int(year + month + day)}.{int(hour + minute + second + milli)}.{int(attempt or 0)}"


def client_zip(package_root: Path = _PACKAGE_ROOT) -> bytes:
    """The edge client as a zip with ``headpose/`` at its root and a ``requirements.txt``.

    Deterministic (sorted names, 1980 timestamps, fixed modes), so the same code gives the
    same bytes and sha256: a re-run finds the version's zip unchanged.
    """
    files = sorted({path for pattern in CLIENT_MODULES for path in package_root.glob(pattern) if path.is_file()})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            _add(archive, "headpose/" + path.relative_to(package_root).as_posix(), path.read_bytes())
        _add(archive, "requirements.txt", ("\n".join(CLIENT_REQUIREMENTS) + "\n").encode())
    return buffer.getvalue()


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, _ZIP_TIME)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def digest(sha256_hex: str) -> str:
    """Greengrass's ``Digest``: base64 of the raw SHA-256 (the nucleus's ArtifactDownloader compares that)."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def choose_format(formats: Mapping[str, Any], name: str | None) -> str:
    """The format the component runs: the setting's, else the edge client's first preference published."""
    if name:
        if name not in formats:
            raise GreengrassError(f"greengrass format {name!r} is not among the version's formats "
                                  f"({', '.join(sorted(formats)) or 'none'})")
        return name
    for candidate in [*PREFERRED_FORMATS, *sorted(formats)]:
        if candidate in formats:
            return candidate
    raise GreengrassError("the version has no edge format: no Greengrass component to run")


def recipe(
    *, training_job_name: str, formats: Mapping[str, Any], client_zip_uri: str, client_zip_sha256: str,
    follow_uri: str, report_prefix: str, channels: bool, settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The component recipe (RecipeFormatVersion 2020-01-25) of one version.

    ``formats`` is the version's ``formats`` (each with ``files``: uri, sha256); ``follow_uri``
    the channels prefix (``channels``) or ``latest.json``. Digests are the record's sha256s.
    """
    settings = {**GREENGRASS_DEFAULTS, **dict(settings)}
    name = choose_format(formats, settings["format"])
    entry = formats[name]
    files = entry.get("files") or {Path(entry["uri"]).name: entry}
    runtime_module, runtime_package = RUNTIME_PACKAGES.get(entry.get("runtime", ""), (None, None))
    artifacts = [_artifact(client_zip_uri, client_zip_sha256, "ZIP")]
    artifacts += [_artifact(ref["uri"], ref["sha256"], "NONE") for _, ref in sorted(files.items())]
    cache = f"{{work:path}}/cache/{entry['sha256']}"
    seed = " && ".join([f"mkdir -p '{cache}'"] + [f"cp '{{artifacts:path}}/{Path(ref['uri']).name}' '{cache}/{file}'"
                                                  for file, ref in sorted(files.items())])
    imports = ", ".join(["boto3", "numpy", "PIL", *([runtime_module] if runtime_module else [])])
    packages = " ".join(["-r '{artifacts:decompressedPath}/%s/requirements.txt'" % CLIENT_FOLDER,
                         *([runtime_package] if runtime_package else [])])
    source = "--channels '{configuration:/ChannelsPrefix}'" if channels else "--pointer '{configuration:/Pointer}'"
    run = (f"python3 -m headpose.edge follow {source} --device-id '{{iot:thingName}}' "
           "--report '{configuration:/ReportPrefix}{iot:thingName}/status.json' "
           "--format '{configuration:/Format}' --interval '{configuration:/IntervalSeconds}' "
           "--cache '{work:path}/cache'")
    return {
        "RecipeFormatVersion": RECIPE_FORMAT_VERSION,
        "ComponentName": settings["component_name"],
        "ComponentVersion": component_version(training_job_name),
        "ComponentDescription": f"Head-pose edge client following the published model ({training_job_name}, {name})",
        "ComponentPublisher": "headpose-pipeline",
        "ComponentType": "aws.greengrass.generic",
        "ComponentConfiguration": {"DefaultConfiguration": {
            ("ChannelsPrefix" if channels else "Pointer"): follow_uri, "ReportPrefix": report_prefix,
            "IntervalSeconds": settings["interval_seconds"], "Format": name,
        }},
        "Manifests": [{
            "Name": "Linux",
            "Platform": {"os": "linux"},
            "Lifecycle": {
                # The runtime once per device (pip only when an import fails), then the cache
                # seeded with the verified artifacts so that the first poll downloads nothing.
                "Install": {"Script": f"(python3 -c 'import {imports}' 2>/dev/null || python3 -m pip install --user "
                                      f"{packages}) && {seed}", "Timeout": 900},
                "Run": {"Script": run,
                        "Setenv": {"PYTHONPATH": f"{{artifacts:decompressedPath}}/{CLIENT_FOLDER}"}},
            },
            "Artifacts": artifacts,
        }],
    }


def _artifact(uri: str, sha256: str, unarchive: str) -> dict[str, Any]:
    return {"Uri": uri, "Digest": digest(sha256), "Algorithm": "SHA-256", "Unarchive": unarchive,
            "Permission": {"Read": "OWNER", "Execute": "NONE"}}


def recipe_bytes(document: Mapping[str, Any]) -> bytes:
    """The recipe as stored and sent: sorted keys, so the same recipe is the same bytes."""
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def client_token(document: Mapping[str, Any]) -> str:
    """An idempotency token of the recipe's bytes (``[a-zA-Z0-9-]{1,64}``): a retried create is the same request."""
    return hashlib.sha256(recipe_bytes(document)).hexdigest()[:64]


def create_request(document: Mapping[str, Any]) -> dict[str, Any]:
    """``CreateComponentVersion``'s parameters."""
    return {"inlineRecipe": recipe_bytes(document), "clientToken": client_token(document)}


def create_component(
    greengrass: Any, document: Mapping[str, Any], region: str, account: str | Callable[[], str],
) -> dict[str, Any]:
    """Create the component version; a version that exists with the same recipe counts as created.

    Greengrass refuses a second create of a name and version (ConflictException). A re-run
    then reads the recipe it holds and accepts it only if it is this one: a component
    version is immutable, so other contents are refused, as a published version's are.
    ``account`` may be a function: it is needed (an STS call) only for that comparison.
    """
    try:
        response = greengrass.create_component_version(**create_request(document))
        return {"arn": response["arn"], "status": response["status"]["componentState"], "created": True}
    except Exception as error:
        if _error_code(error) != "ConflictException":
            raise
    account = account() if callable(account) else account
    arn = (f"arn:aws:greengrass:{region}:{account}:components:{document['ComponentName']}"
           f":versions:{document['ComponentVersion']}")
    held = json.loads(greengrass.get_component(arn=arn, recipeOutputFormat="JSON")["recipe"])
    if held != json.loads(recipe_bytes(document)):
        raise GreengrassError(f"Greengrass already holds {document['ComponentName']} "
                              f"{document['ComponentVersion']} with another recipe; a component version "
                              "is never overwritten")
    return {"arn": arn, "status": "EXISTS", "created": False}


def create_published_component(
    s3_client: Any, version: Mapping[str, Any], create: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> dict[str, Any] | None:
    """``create`` the component of a published ``version`` from the recipe stored with it (None: it has none)."""
    entry = (version.get("files") or {}).get(f"greengrass/{RECIPE_FILE}")
    if not entry:
        return None
    bucket, _, key = entry["uri"][len("s3://"):].partition("/")
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    if hashlib.sha256(body).hexdigest() != entry["sha256"]:
        raise GreengrassError(f"{entry['uri']} does not hold the recipe the version recorded "
                              f"(sha256 {entry['sha256']})")
    return {"component_name": version["greengrass"]["component_name"],
            "component_version": version["greengrass"]["component_version"], **create(json.loads(body))}


def deployment_request(
    *, target_arn: str, component_name: str, version: str, configuration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``CreateDeployment``'s parameters: an exponential rollout that stops and rolls back on failures.

    5 devices a minute, doubling after every 10 that succeed; cancelled when more than 10 % of
    at least 20 devices fail, and each failed device rolls back to what it ran before.
    """
    component: dict[str, Any] = {"componentVersion": version}
    if configuration:
        component["configurationUpdate"] = {"merge": json.dumps(dict(configuration), sort_keys=True)}
    return {
        "targetArn": target_arn,
        "deploymentName": f"{component_name}-{version}",
        "components": {component_name: component},
        "deploymentPolicies": {
            "failureHandlingPolicy": "ROLLBACK",
            "componentUpdatePolicy": {"timeoutInSeconds": 60, "action": "NOTIFY_COMPONENTS"},
        },
        "iotJobConfiguration": {
            "jobExecutionsRolloutConfig": {"exponentialRate": {
                "baseRatePerMinute": 5, "incrementFactor": 2.0,
                "rateIncreaseCriteria": {"numberOfSucceededThings": 10},
            }},
            "abortConfig": {"criteriaList": [{
                "failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 10.0,
                "minNumberOfExecutedThings": 20,
            }]},
        },
    }


def _error_code(error: Exception) -> str | None:
    return (getattr(error, "response", None) or {}).get("Error", {}).get("Code")
