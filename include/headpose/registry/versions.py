"""``upload_frozen_model``: an accepted candidate becomes an immutable model version.

The frozen graph, its metadata, the report (JSON and HTML), the confusion matrix and the edge formats that
passed their runtime's check are copied (server-side) from the run's ``candidate/``
prefix to ``TFartifacts/<job>/output/``, beside ``model.tar.gz`` as the tutorial keeps
them. Each source is checked against the sha256 its task recorded first, and each copy
carries that sha256 in its metadata. A version that a history record already references
is never overwritten: its files must be the same bytes, or the task refuses.
Beside them go the version's Greengrass component recipe and the edge client zip it names
(``output/greengrass/``, ``headpose.fleet.greengrass``), made here and kept under the same rule.

Before the first copy the store is checked (``store_checks``): it must honour conditional
writes, and where the deployment sets ``object_lock_days`` the copies are locked.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

from headpose.planning.layout import (
    CONFUSION_PNG_FILE,
    FROZEN_MODEL_FILE,
    FROZEN_MODEL_JSON_FILE,
    REPORT_FILE,
    REPORT_HTML_FILE,
    RunLayout,
    split_s3_uri,
)
from headpose.registry.pointer import PublishError, is_missing_key, sha256_of_object
from headpose.registry.store_checks import lock_object, object_lock_retention, require_conditional_writes

PROBE_FILE = "conditional-write-probe"

SHA256_METADATA = "sha256"


def make_version(
    s3_client: Any, plan: Mapping[str, Any], frozen: Mapping[str, Any], report: Mapping[str, Any],
    edge: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Copy the accepted candidate's files to the version prefix; what the published record names."""
    layout = RunLayout.from_dict(plan).for_job(frozen["training_job_name"])
    require_conditional_writes(s3_client, layout.candidate_prefix + PROBE_FILE)
    lock = object_lock_retention(s3_client, layout.bucket, int((plan.get("deployment") or {}).get("object_lock_days") or 0))
    referenced = _exists(s3_client, layout.history_record_uri)
    sources = {
        FROZEN_MODEL_FILE: (frozen["frozen_model_uri"], frozen["frozen_model_sha256"]),
        FROZEN_MODEL_JSON_FILE: (frozen["frozen_model_json_uri"], frozen["frozen_model_json_sha256"]),
        REPORT_FILE: (report["report_uri"], report["report_sha256"]),
        CONFUSION_PNG_FILE: (report["confusion_png_uri"], report["confusion_png_sha256"]),
    }
    if report.get("report_html_uri"):  # the page people read; reports from before it have none
        sources[REPORT_HTML_FILE] = (report["report_html_uri"], report["report_html_sha256"])
    files = {
        name: {"uri": _copy_verified(s3_client, uri, sha256, layout.version_prefix + name, referenced, lock),
               "sha256": sha256}
        for name, (uri, sha256) in sources.items()
    }
    formats = {}
    for name, fmt in _accepted_formats(edge or {}, report).items():
        copied = {
            file: {"uri": _copy_verified(s3_client, entry["uri"], entry["sha256"],
                                         layout.version_prefix + "edge/" + file, referenced, lock),
                   "sha256": entry["sha256"]}
            for file, entry in fmt["files"].items()
        }
        primary = copied.get((fmt.get("metadata") or {}).get("model_file")) or next(iter(copied.values()))
        formats[name] = {**{k: v for k, v in fmt.items() if k != "files"}, "uri": primary["uri"],
                         "sha256": primary["sha256"], "files": copied}
    greengrass = _greengrass_files(s3_client, plan, layout, formats, referenced, lock)
    files.update(greengrass.pop("files", {}))
    return {"files": files, "formats": formats, "channel_order": frozen["channel_order"],
            "version_prefix": layout.version_prefix, **greengrass}


def _greengrass_files(
    s3_client: Any, plan: Mapping[str, Any], layout: RunLayout, formats: Mapping[str, Any], referenced: bool,
    lock: dict[str, Any] | None,
) -> dict[str, Any]:
    """The version's Greengrass component: the client zip, then the recipe naming it (``output/greengrass/``)."""
    from headpose.fleet import greengrass as gg

    if not formats:  # nothing a device could run
        return {}
    deployment = plan.get("deployment") or {}
    settings = gg.greengrass_settings(deployment)
    folder = layout.version_prefix + "greengrass/"
    client = gg.client_zip()
    client_sha256 = hashlib.sha256(client).hexdigest()
    client_uri = _put_verified(s3_client, client, client_sha256, folder + gg.CLIENT_ZIP_FILE, referenced, lock)
    channels = bool(deployment.get("rollout"))
    recipe = gg.recipe(
        training_job_name=layout.training_job_name, formats=formats, client_zip_uri=client_uri,
        client_zip_sha256=client_sha256, channels=channels,
        follow_uri=layout.channels_prefix if channels else layout.published_pointer_uri,
        report_prefix=layout.devices_prefix, settings=settings,
    )
    body = gg.recipe_bytes(recipe)
    recipe_sha256 = hashlib.sha256(body).hexdigest()
    recipe_uri = _put_verified(s3_client, body, recipe_sha256, folder + gg.RECIPE_FILE, referenced, lock)
    return {
        "files": {f"greengrass/{gg.CLIENT_ZIP_FILE}": {"uri": client_uri, "sha256": client_sha256},
                  f"greengrass/{gg.RECIPE_FILE}": {"uri": recipe_uri, "sha256": recipe_sha256}},
        "greengrass": {"component_name": recipe["ComponentName"], "component_version": recipe["ComponentVersion"]},
    }


def _put_verified(
    s3_client: Any, data: bytes, sha256: str, target_uri: str, referenced: bool, lock: dict[str, Any] | None,
) -> str:
    """``_copy_verified``'s rule for bytes made here: equal bytes are left, a referenced version is never changed."""
    existing = _recorded_sha256(s3_client, target_uri)
    if existing != sha256:
        if existing is not None and referenced:
            raise PublishError(
                f"{target_uri} is part of a published version and holds other bytes (sha256 {existing}) than "
                f"this run's {sha256}; a published version is never overwritten"
            )
        bucket, key = split_s3_uri(target_uri)
        s3_client.put_object(Bucket=bucket, Key=key, Body=data, Metadata={SHA256_METADATA: sha256})
    lock_object(s3_client, target_uri, lock)
    return target_uri


def _accepted_formats(edge: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The exported formats that passed validation, with the figures validation measured."""
    figures = report.get("formats") or {}
    accepted = {}
    for name, fmt in (edge.get("formats") or {}).items():
        verdict = figures.get(name) or {}
        if verdict.get("accepted"):
            accepted[name] = {
                "files": fmt["files"], "runtime": fmt.get("runtime"), "precision": fmt.get("precision"),
                "metadata": fmt.get("metadata"),
                **{k: verdict.get(k) for k in ("accuracy", "max_abs_diff", "latency_ms_b1")},
            }
    return accepted


def _copy_verified(
    s3_client: Any, source_uri: str, sha256: str, target_uri: str, referenced: bool, lock: dict[str, Any] | None,
) -> str:
    existing = _recorded_sha256(s3_client, target_uri)
    if existing == sha256:
        lock_object(s3_client, target_uri, lock)  # a retry, or a re-run after a clear: already in place
        return target_uri
    if existing is not None and referenced:
        raise PublishError(
            f"{target_uri} is part of a published version and holds other bytes (sha256 {existing}) than "
            f"this run's {sha256}; a published version is never overwritten"
        )
    actual = sha256_of_object(s3_client, source_uri)
    if actual != sha256:
        raise PublishError(f"{source_uri} has sha256 {actual}, the task that wrote it recorded {sha256}")
    source_bucket, source_key = split_s3_uri(source_uri)
    bucket, key = split_s3_uri(target_uri)
    s3_client.copy({"Bucket": source_bucket, "Key": source_key}, bucket, key,
                   ExtraArgs={"Metadata": {SHA256_METADATA: sha256}, "MetadataDirective": "REPLACE"})
    lock_object(s3_client, target_uri, lock)
    return target_uri


def _recorded_sha256(s3_client: Any, uri: str) -> str | None:
    """The sha256 of an object at ``uri`` (its metadata, else its bytes); None when there is none."""
    bucket, key = split_s3_uri(uri)
    try:
        head = s3_client.head_object(Bucket=bucket, Key=key)
    except Exception as error:
        if is_missing_key(error):
            return None
        raise
    return head.get("Metadata", {}).get(SHA256_METADATA) or sha256_of_object(s3_client, uri)


def _exists(s3_client: Any, uri: str) -> bool:
    bucket, key = split_s3_uri(uri)
    try:
        s3_client.head_object(Bucket=bucket, Key=key)
    except Exception as error:
        if is_missing_key(error):
            return False
        raise
    return True
