"""A device's voice: health counters of the model it runs, and the status record it writes each poll.

The record (``devices/<device id>/status.json``, ``report_version`` 1, at most 16 KiB) is
overwritten every poll, so it carries both the window since the last report and the
running version's totals: the rollout DAG sees only the latest object, and judges a
canary on its version's totals. p50/p95 come from the last 1000 latencies (bounded, so a
device that runs for months keeps a constant footprint).

A device without write access does not report: the first AccessDenied is logged once and
reporting stops, while the client keeps following. Any other put error is counted and the
next poll tries again. Standard library only (boto3 is imported on the first put).
"""
from __future__ import annotations

import json
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlparse

REPORT_VERSION = 1
CLIENT_VERSION = "headpose-edge 1"
MAX_REPORT_BYTES = 16 * 1024
MAX_ERROR_CHARS = 300
LATENCY_SAMPLES = 1000


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class Tally:
    """Inferences, errors, latencies and predicted classes since ``since``."""

    since: str = field(default_factory=utc_now)
    inferences: int = 0
    errors: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    classes: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"since": self.since, "inferences": self.inferences, "errors": self.errors,
                "latency_ms": _percentiles(list(self.latencies_ms)),
                "classes": {str(k): v for k, v in sorted(self.classes.items())}}


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    if len(values) == 1:
        return {"p50": round(values[0], 3), "p95": round(values[0], 3)}
    cuts = statistics.quantiles(values, n=20, method="inclusive")  # 5 % steps: cuts[9] p50, cuts[18] p95
    return {"p50": round(cuts[9], 3), "p95": round(cuts[18], 3)}


class HealthCounter:
    """Counts every inference of the running version: the window since the last report and the version's totals."""

    def __init__(self) -> None:
        self.window, self.version = Tally(), Tally()
        self.load_failures: Counter = Counter()

    def switched(self) -> None:
        """A new version runs: its totals start from zero."""
        self.version = Tally()

    def load_failed(self, training_job_name: str) -> None:
        self.load_failures[training_job_name] += 1

    def inferred(self, latency_ms: float, class_index: int) -> None:
        for tally in (self.window, self.version):
            tally.inferences += 1
            tally.latencies_ms.append(latency_ms)
            tally.classes[class_index] += 1

    def failed(self) -> None:
        for tally in (self.window, self.version):
            tally.inferences += 1
            tally.errors += 1

    def take_window(self) -> dict[str, Any]:
        """The window's figures, and a new window from now."""
        figures, self.window = self.window.as_dict(), Tally()
        return figures


def status_record(
    *, device_id: str, channel: str, pointer: str, running: dict[str, Any] | None, last_event: str,
    last_error: str | None, counter: HealthCounter, runtime: str | None,
) -> dict[str, Any]:
    """The report of one poll (``report_version`` 1); it takes the counter's window."""
    record = {
        "report_version": REPORT_VERSION, "device_id": device_id, "at": utc_now(), "channel": channel,
        "pointer": pointer, "running": running, "verified": running is not None, "last_event": last_event,
        "last_error": (" ".join(last_error.split())[:MAX_ERROR_CHARS] if last_error else None),
        "window": counter.take_window(), "version": counter.version.as_dict(),
        "load_failures": dict(counter.load_failures.most_common(20)),
        "client": {"version": CLIENT_VERSION, "runtime": runtime},
    }
    if running is not None:
        record["version"]["since"] = running["since"]
    return record


class Reporter:
    """Puts each status record at ``uri`` (``s3://...``, or a local path for tests and the Greengrass run)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, log: Callable[[str], None] = print):
        self.uri, self.endpoint_url, self.log = uri, endpoint_url, log
        self.enabled, self.put_errors, self._client = True, 0, None

    def put(self, record: dict[str, Any]) -> bool:
        """Whether the report was written (False when reporting stopped, or this put failed)."""
        if not self.enabled:
            return False
        body = json.dumps(record, sort_keys=True).encode()
        if len(body) > MAX_REPORT_BYTES:
            record = {**record, "load_failures": {}, "last_error": (record.get("last_error") or "")[:80] or None}
            body = json.dumps(record, sort_keys=True).encode()
        try:
            self._write(body)
        except Exception as error:  # botocore's ClientError and connection errors
            code = getattr(error, "response", {}).get("Error", {}).get("Code")
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                self.enabled = False
                self.log(f"reporting stopped: this device may not write {self.uri} ({code})")
                return False
            self.put_errors += 1
            return False
        return True

    def _write(self, body: bytes) -> None:
        parsed = urlparse(self.uri)
        if parsed.scheme != "s3":
            from pathlib import Path

            path = Path(parsed.path if parsed.scheme == "file" else self.uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial")
            partial.write_bytes(body)
            partial.replace(path)
            return
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url)
        self._client.put_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"), Body=body,
                                ContentType="application/json")
