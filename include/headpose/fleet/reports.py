"""Reading the devices' reports (``devices/<device id>/status.json``): data, never trusted.

A device writes its own report (``edge.reporting``); anything under ``devices/`` may be
wrong, old or written by someone else, so every report is checked before it counts:

* **malformed**: not JSON, over 16 KiB, refused by ``REPORT_SCHEMA``, or dated more than
  5 minutes in the future (a clock that far off says nothing reliable about soak time);
* **foreign**: the key's device id is not the report's ``device_id``, or it claims the
  canary channel while the rollout does not make it a canary;
* **stale**: dated before the canary channel last moved (it describes another rollout).

Each of those is counted in ``ignored`` with a warning naming its key, and not used.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

from headpose.edge.channels import CANARY, DEVICE_ID_PATTERN, is_canary
from headpose.edge.reporting import MAX_REPORT_BYTES
from headpose.planning.layout import DEFAULT_FOLDER, s3_uri, split_s3_uri

MAX_DEVICES = 5000
FUTURE_SLACK = timedelta(minutes=5)
IGNORED_KINDS = ("malformed", "foreign", "stale")

_TIME = {"type": "string", "maxLength": 40}
_COUNT = {"type": "integer", "minimum": 0}
_LATENCY = {"type": ["number", "null"], "minimum": 0}
_TALLY = {
    "type": "object", "additionalProperties": False,
    "required": ["since", "inferences", "errors", "latency_ms", "classes"],
    "properties": {
        "since": {"type": ["string", "null"], "maxLength": 40}, "inferences": _COUNT, "errors": _COUNT,
        "latency_ms": {"type": "object", "additionalProperties": False, "required": ["p50", "p95"],
                       "properties": {"p50": _LATENCY, "p95": _LATENCY}},
        "classes": {"type": "object", "propertyNames": {"pattern": "^[0-8]$"}, "additionalProperties": _COUNT},
    },
}
REPORT_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["report_version", "device_id", "at", "channel", "pointer", "running", "verified", "last_event",
                 "last_error", "window", "version", "load_failures", "client"],
    "properties": {
        "report_version": {"const": 1},
        "device_id": {"type": "string", "pattern": DEVICE_ID_PATTERN},
        "at": _TIME,
        "channel": {"enum": ["canary", "stable", "latest"]},
        "pointer": {"type": "string", "maxLength": 1024},
        "running": {"oneOf": [{"type": "null"}, {
            "type": "object", "additionalProperties": False,
            "required": ["training_job_name", "format", "sha256", "since"],
            "properties": {"training_job_name": {"type": "string", "maxLength": 63},
                           "format": {"type": "string", "maxLength": 64},
                           "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "since": _TIME}}]},
        "verified": {"type": "boolean"},
        "last_event": {"enum": ["loaded", "switched", "unchanged", "kept", "waiting"]},
        "last_error": {"type": ["string", "null"], "maxLength": 300},
        "window": _TALLY, "version": _TALLY,
        "load_failures": {"type": "object", "maxProperties": 20, "additionalProperties": _COUNT},
        "client": {"type": "object", "additionalProperties": False, "required": ["version", "runtime"],
                   "properties": {"version": {"type": "string", "maxLength": 64},
                                  "runtime": {"type": ["string", "null"], "maxLength": 64}}},
    },
}


def devices_prefix(bucket: str, folder: str = DEFAULT_FOLDER) -> str:
    return s3_uri(bucket, folder, "devices/")


def parse_time(value: str) -> datetime:
    """An ISO time with its zone (a report without one is malformed)."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"{value} has no time zone")
    return parsed


def classify(
    key_device: str, body: bytes, rollout: Mapping[str, Any] | None, moved_at: datetime | None, now: datetime,
) -> tuple[str | None, dict[str, Any] | None, str]:
    """``(ignored kind or None, report, why)`` of one report's bytes."""
    import jsonschema

    if len(body) > MAX_REPORT_BYTES:
        return "malformed", None, f"over {MAX_REPORT_BYTES} bytes"
    try:
        report = json.loads(body)
        jsonschema.validate(report, REPORT_SCHEMA)
        at = parse_time(report["at"])
    except (ValueError, jsonschema.ValidationError) as error:
        return "malformed", None, getattr(error, "message", str(error))[:200]
    if at > now + FUTURE_SLACK:
        return "malformed", None, f"dated {report['at']}, in the future"
    if report["device_id"] != key_device:
        return "foreign", None, f"it names device {report['device_id']!r}"
    if report["channel"] == CANARY and not is_canary(key_device, rollout):
        return "foreign", None, "it claims the canary channel, but the rollout does not make it a canary"
    if moved_at is not None and at < moved_at:
        return "stale", None, f"dated {report['at']}, before the canary moved"
    return None, report, ""


def read_reports(
    s3_client: Any, bucket: str, folder: str, rollout: Mapping[str, Any] | None, *,
    moved_at: str | None = None, now: datetime | None = None, log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``(valid reports, {"malformed", "foreign", "stale": count})`` of every device under ``devices/``.

    ``moved_at`` is the canary's ``channel_moved.at`` (None: read ``canary.json``'s).
    """
    from headpose.registry.channels import channel_uris
    from headpose.registry.pointer import read_pointer, now_iso

    now = now or parse_time(now_iso())
    if moved_at is None:
        canary, _ = read_pointer(s3_client, channel_uris(bucket, folder)[CANARY])
        moved_at = ((canary or {}).get("channel_moved") or {}).get("at")
    moved = parse_time(moved_at) if moved_at else None
    reports, ignored = [], dict.fromkeys(IGNORED_KINDS, 0)
    for key in _report_keys(s3_client, bucket, folder):
        device = key.rsplit("/", 2)[-2]
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read(MAX_REPORT_BYTES + 1)
        kind, report, why = classify(device, body, rollout, moved, now)
        if kind:
            ignored[kind] += 1
            log(f"warning: ignored {kind} report s3://{bucket}/{key}: {why}")
            continue
        reports.append(report)
    return reports, ignored


def _report_keys(s3_client: Any, bucket: str, folder: str) -> list[str]:
    """``devices/<id>/status.json`` keys, at most ``MAX_DEVICES`` (a flood of keys cannot stall a decision)."""
    _, prefix = split_s3_uri(devices_prefix(bucket, folder))
    keys = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            parts = item["Key"][len(prefix):].split("/")
            if len(parts) == 2 and parts[1] == "status.json":
                keys.append(item["Key"])
            if len(keys) >= MAX_DEVICES:
                return keys
    return keys
