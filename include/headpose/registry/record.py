"""The published record's fields, read one way by the registry, the pipeline and the edge client.

A record is what ``published/latest.json`` and ``published/history/<job>.json`` hold.
Version 3 (DESIGN.md, Publishing) names every file of a model version by URI and sha256::

    {"version": 3, "training_job_name": ..., "published_at": ..., "attempts": [...],
     "files":   {"frozen_model.pb": {"uri": ..., "sha256": ...}, "frozen_model.json": {...}, ...},
     "formats": {"<name>": {"uri": ..., "sha256": ..., "runtime": ..., "precision": ...,
                 "accuracy": ..., "max_abs_diff": ..., "latency_ms_b1": ...}},
     "evaluation_set": {...}, "dataset": {...}, "metrics": {...}, "channel_order": "bgr",
     "previous": {...}}

Version 2 records (flat ``frozen_model_uri`` / ``frozen_model_sha256``, RGB models) are
still read. Standard library only: the edge client imports this without TensorFlow, boto3
or Airflow.
"""
from __future__ import annotations

from typing import Any, Mapping

RECORD_VERSION = 3
READABLE_VERSIONS = (2, 3)
FROZEN_MODEL_FILE = "frozen_model.pb"
CHANNEL_ORDERS = ("bgr", "rgb")
# Version 2 records predate channel_order: those models were trained on RGB shards.
VERSION_2_CHANNEL_ORDER = "rgb"
_VERSION_2_FILES = {
    "frozen_model.pb": ("frozen_model_uri", "frozen_model_sha256"),
    "frozen_model.json": ("frozen_model_json_uri", None),
    "report.json": ("report_uri", None),
    "confusion_matrix.png": ("confusion_png_uri", None),
}


class RecordError(ValueError):
    """A record that names no usable model; the message says what is wrong."""


def record_version(record: Mapping[str, Any]) -> int:
    version = record.get("version")
    if version not in READABLE_VERSIONS:
        raise RecordError(f"published record version {version!r} is not one of {READABLE_VERSIONS}")
    return int(version)


def record_files(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{file name: {"uri": ..., "sha256": ...}}`` of the model version the record names.

    A version 2 record knows the sha256 of its frozen graph only; its other entries have
    ``sha256`` ``None``.
    """
    if record_version(record) == 3:
        files = record.get("files") or {}
    else:
        files = {
            name: {"uri": record.get(uri_key), "sha256": record.get(sha_key) if sha_key else None}
            for name, (uri_key, sha_key) in _VERSION_2_FILES.items() if record.get(uri_key)
        }
    frozen = files.get(FROZEN_MODEL_FILE) or {}
    if not frozen.get("uri") or not frozen.get("sha256"):
        raise RecordError(
            f"the record of {record.get('training_job_name')} names no {FROZEN_MODEL_FILE} with its sha256")
    return {name: dict(entry) for name, entry in files.items()}


def record_formats(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The edge formats the record publishes, by name (none in a version 2 record)."""
    if record_version(record) == 2:
        return {}
    return {name: dict(entry) for name, entry in (record.get("formats") or {}).items()}


def record_channel_order(record: Mapping[str, Any]) -> str:
    """The channel order the model expects (``bgr`` or ``rgb``)."""
    order = record.get("channel_order") or (VERSION_2_CHANNEL_ORDER if record_version(record) == 2 else None)
    if order not in CHANNEL_ORDERS:
        raise RecordError(f"the record of {record.get('training_job_name')} has channel_order {order!r}")
    return order
