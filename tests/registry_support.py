"""Building published state in moto's S3 for the registry tests, and faults at the unit level."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from headpose.planning.layout import RunLayout, dataset_prefix_for, training_job_name
from headpose.registry import pointer as pointers

BUCKET = "models"
DATASET = dataset_prefix_for(BUCKET, "headpose", "synthetic-abc")
POINTER = f"s3://{BUCKET}/headpose/published/latest.json"
MIRROR = f"s3://{BUCKET}/headpose/published/latest/"
MANIFEST = b'{"source": "synthetic", "splits": {}}'
DATASET_SECTION = {"dataset_prefix": DATASET, "dataset_id": "synthetic-abc", "manifest_uri": DATASET + "manifest.json",
                   "manifest_sha256": hashlib.sha256(MANIFEST).hexdigest(), "source": "synthetic",
                   "channel_order": "bgr"}


def layout_for(day: int) -> RunLayout:
    job = training_job_name(datetime(2025, 3, day, 3, 0, tzinfo=timezone.utc))
    return RunLayout.for_run(BUCKET, "headpose", job, DATASET)


def put(s3, uri: str, body: bytes) -> None:
    bucket, key = uri[len("s3://"):].split("/", 1)
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def get(s3, uri: str) -> bytes:
    bucket, key = uri[len("s3://"):].split("/", 1)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def published_state(s3) -> dict[str, tuple[str, bytes]]:
    """Every key under published/ with its ETag and bytes."""
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix="headpose/published/").get("Contents", [])
    return {o["Key"]: (o["ETag"], get(s3, f"s3://{BUCKET}/{o['Key']}")) for o in listing}


def version_of(s3, layout: RunLayout, graph: bytes, formats: bool = True) -> dict[str, Any]:
    """A model version as upload_frozen_model leaves it: files under output/, by URI and sha256."""
    contents = {"frozen_model.pb": graph, "frozen_model.json": b'{"graph": "%s"}' % graph,
                "report.json": b'{"accuracy": 0.5}', "confusion_matrix.png": b"\x89PNG" + graph}
    files = {}
    for name, body in contents.items():
        put(s3, layout.version_prefix + name, body)
        files[name] = {"uri": layout.version_prefix + name, "sha256": hashlib.sha256(body).hexdigest()}
    version = {"files": files, "formats": {}, "channel_order": "bgr", "version_prefix": layout.version_prefix}
    if formats:
        onnx = b"onnx:" + graph
        put(s3, layout.version_prefix + "edge/model.onnx", onnx)
        entry = {"uri": layout.version_prefix + "edge/model.onnx", "sha256": hashlib.sha256(onnx).hexdigest()}
        version["formats"]["onnx"] = {**entry, "files": {"model.onnx": entry}, "runtime": "onnxruntime",
                                      "precision": "float32", "accuracy": 0.5, "max_abs_diff": 1e-7,
                                      "latency_ms_b1": 1.0}
    return version


def report_with(accuracy: float, champion: dict | None = None) -> dict[str, Any]:
    return {"accuracy": accuracy, "images": 93, "parity_max_abs_diff": 1e-6, "min_class_recall_measured": 0.5,
            "champion": champion, "evaluation_set": {"id": "synthetic-abc@000", "pinned": False}}


def champion_of(s3, accuracy: float) -> dict:
    record, etag = pointers.read_pointer(s3, POINTER)
    if record is None:
        return {"present": False}
    return {"present": True, "training_job_name": record["training_job_name"], "accuracy": accuracy,
            "pointer_etag": etag, "comparable": True}


class ConflictOnce:
    """Answer the first conditional PUT of the pointer with S3's 409 ConditionalRequestConflict."""

    def __init__(self, s3, times: int = 1):
        self.left, self.answered = times, 0
        s3.meta.events.register("before-call.s3.PutObject", self._before_call)

    def _before_call(self, params, model, **kwargs):
        headers = params.get("headers", {})
        if self.left and params.get("url_path", "").endswith("/published/latest.json") and (
                "If-Match" in headers or "If-None-Match" in headers):
            self.left -= 1
            self.answered += 1
            body = {"Error": {"Code": "ConditionalRequestConflict", "Message": "A conflicting operation"},
                    "ResponseMetadata": {"HTTPStatusCode": 409}}
            return _Status(409), body
        return None


class _Status:
    def __init__(self, code: int):
        self.status_code, self.headers, self.content = code, {}, b""


def assert_consistent(s3) -> dict:
    """latest.json names files whose sha256 match; each mirror file is one that some record names."""
    record, _ = pointers.read_pointer(s3, POINTER)
    assert record is not None
    assert pointers.verify_record_files(s3, record) == []
    return record


def assert_mirror_equals_pointer(s3) -> None:
    record, _ = pointers.read_pointer(s3, POINTER)
    # What the record names, by its sha256 (or, for a version 2 record's unhashed files, the source's bytes).
    wanted = {name: entry["sha256"] or hashlib.sha256(get(s3, entry["uri"])).hexdigest()
              for name, entry in pointers.mirror_files(record).items()}
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix="headpose/published/latest/").get("Contents", [])
    mirrored = {o["Key"].rsplit("published/latest/", 1)[1]: hashlib.sha256(get(s3, f"s3://{BUCKET}/{o['Key']}")).hexdigest()
                for o in listing}
    assert mirrored == wanted


def record_json(s3, uri: str) -> dict:
    return json.loads(get(s3, uri))
