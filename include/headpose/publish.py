"""Accepting and publishing a validated frozen model.

Publishing is ordered so that a failure at any point leaves a consistent "latest":

1. ``published/history/<job>.json``  the run's record (never overwritten by another run)
2. ``published/latest/*``            server-side copies of the run's frozen model files
3. ``published/latest.json``         the pointer, written last

Readers should start from ``latest.json``: it names the run's immutable
``TFartifacts/<job>/output/`` files and their sha256, so it is correct even if a
publish died between steps 2 and 3 (then ``latest.json`` still names the previous
model, whose immutable files are untouched).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Mapping

from headpose.layout import RunLayout, split_s3_uri

RECORD_VERSION = 1


def publish_record(
    layout: RunLayout,
    frozen_model_sha256: str,
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``latest.json`` and the history record say about the published model."""
    return {
        "version": RECORD_VERSION,
        "training_job_name": layout.training_job_name,
        "published_at": datetime.now(timezone.utc).isoformat(),
        "frozen_model_uri": layout.frozen_model_uri,
        "frozen_model_sha256": frozen_model_sha256,
        "frozen_model_json_uri": layout.frozen_model_json_uri,
        "report_uri": layout.report_uri,
        "model_artifact_uri": layout.model_artifact_uri,
        "dataset_prefix": layout.dataset_prefix,
        "latest": {
            "frozen_model_uri": layout.published_model_uri,
            "frozen_model_json_uri": layout.published_model_json_uri,
            "report_uri": layout.published_report_uri,
        },
        "metrics": dict(metrics),
        **dict(extra or {}),
    }


def _put_json(s3_client: Any, uri: str, document: Mapping[str, Any]) -> None:
    bucket, key = split_s3_uri(uri)
    body = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    s3_client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")


def publish_model(s3_client: Any, layout: RunLayout, record: Mapping[str, Any]) -> dict[str, str]:
    """History record, then copies under ``latest/``, then the ``latest.json`` pointer."""
    _put_json(s3_client, layout.history_record_uri, record)
    for source, target in (
        (layout.frozen_model_uri, layout.published_model_uri),
        (layout.frozen_model_json_uri, layout.published_model_json_uri),
        (layout.report_uri, layout.published_report_uri),
    ):
        source_bucket, source_key = split_s3_uri(source)
        target_bucket, target_key = split_s3_uri(target)
        # Managed copy: server-side, and multipart for objects over 5 GB.
        s3_client.copy({"Bucket": source_bucket, "Key": source_key}, target_bucket, target_key)
    _put_json(s3_client, layout.published_pointer_uri, record)
    return {
        "published_pointer_uri": layout.published_pointer_uri,
        "history_record_uri": layout.history_record_uri,
        "published_model_uri": layout.published_model_uri,
    }
