"""Deciding a rollout from the devices' reports: promote, roll back, or wait (pure; no I/O).

Rules, in order (DESIGN.md, headpose_rollout):

1. the canary and stable channels name the same version (or there is no canary): nothing;
2. the canaries' errors on the canary version (inference errors of its totals, plus the
   times it failed to load) over at least 10 samples exceed ``max_error_rate``: roll back,
   at once, without waiting for the soak;
3. for a format both sides report, the median canary p95 over the median stable p95
   exceeds ``max_p95_latency_ratio`` with at least ``min_canaries`` canaries: roll back;
4. at least ``min_canaries`` canaries have run the canary version for ``soak_minutes`` with
   inferences, the channel moved at least ``soak_minutes`` ago, and at least 10 samples
   stay within ``max_error_rate``: promote;
5. otherwise nothing, saying what is short.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Mapping

from headpose.edge.channels import CANARY
from headpose.fleet.reports import parse_time

MIN_SAMPLES = 10
NONE, PROMOTE, ROLLBACK = "none", "promote", "rollback"


@dataclass(frozen=True)
class Assessment:
    action: str  # "none", "promote" or "rollback"
    reason: str
    rows: list[dict[str, Any]]
    figures: dict[str, Any]
    ignored: dict[str, int] = field(default_factory=dict)


def _job(record: Mapping[str, Any] | None) -> str | None:
    return (record or {}).get("training_job_name")


def _sha(record: Mapping[str, Any] | None) -> str | None:
    return (((record or {}).get("files") or {}).get("frozen_model.pb") or {}).get("sha256")


def _runs(report: Mapping[str, Any], record: Mapping[str, Any] | None) -> bool:
    """Whether the report's device runs the version ``record`` names (one of its formats' files)."""
    running = report.get("running") or {}
    formats = (record or {}).get("formats") or {}
    return bool(record) and running.get("training_job_name") == _job(record) and (
        running.get("sha256") in {entry.get("sha256") for entry in formats.values()})


def fleet_rows(
    reports: list[Mapping[str, Any]], canary: Mapping[str, Any] | None, stable: Mapping[str, Any] | None,
    rollout: Mapping[str, Any] | None, now: datetime,
) -> list[dict[str, Any]]:
    """One JSON-able row per device: what it runs, when it was last seen, its health."""
    bound = float((rollout or {}).get("max_error_rate", 0.01))
    rows = []
    for report in sorted(reports, key=lambda r: r["device_id"]):
        running, totals = report.get("running") or {}, report["version"]
        inferences, errors = totals["inferences"], totals["errors"]
        if not running:
            health = "no model"
        elif inferences and errors / inferences > bound:
            health = "erroring"
        elif report.get("last_event") == "kept":
            health = "kept (new version refused)"
        else:
            health = "ok"
        seen = parse_time(report["at"])
        rows.append({
            "device_id": report["device_id"], "channel": report["channel"],
            "training_job_name": running.get("training_job_name"), "format": running.get("format"),
            "last_seen": report["at"], "seen_seconds_ago": round((now - seen).total_seconds(), 1),
            "inferences": inferences, "errors": errors, "p95_ms": totals["latency_ms"]["p95"], "health": health,
            "runs": CANARY if _runs(report, canary) else "stable" if _runs(report, stable) else "other",
        })
    return rows


def assess(
    canary: Mapping[str, Any] | None, stable: Mapping[str, Any] | None, reports: list[Mapping[str, Any]],
    rollout: Mapping[str, Any], now: datetime, ignored: Mapping[str, int] | None = None,
) -> Assessment:
    """What to do with the canary now, and why (``Assessment``)."""
    rows = fleet_rows(reports, canary, stable, rollout, now)
    ignored = dict(ignored or {})
    if canary is None or (_job(canary), _sha(canary)) == (_job(stable), _sha(stable)):
        return Assessment(NONE, "nothing to roll out: the canary and stable channels name the same version"
                          if canary else "nothing to roll out: no canary channel yet", rows, {}, ignored)
    job, soak = _job(canary), float(rollout["soak_minutes"])
    canaries = [r for r in reports if r["channel"] == CANARY]
    on_canary = [r for r in canaries if _runs(r, canary)]
    on_stable = [r for r in reports if r["channel"] != CANARY and _runs(r, stable)]
    load_failures = sum(int(r["load_failures"].get(job, 0)) for r in canaries)
    inferences = sum(r["version"]["inferences"] for r in on_canary)
    errors = sum(r["version"]["errors"] for r in on_canary) + load_failures
    samples = inferences + load_failures
    rate = errors / samples if samples else 0.0
    soaked = [r for r in on_canary if r["version"]["inferences"] > 0
              and now - parse_time(r["running"]["since"]) >= timedelta(minutes=soak)]
    figures: dict[str, Any] = {
        "canaries": len(on_canary), "soaked": len(soaked), "inferences": inferences, "errors": errors,
        "load_failures": load_failures, "error_rate": round(rate, 6),
        "canary_p95_ms": _median_p95(on_canary), "stable_p95_ms": _median_p95(on_stable), "p95_ratio": None,
    }
    names = f"{job} (stable: {_job(stable) or 'nothing'})"
    if samples >= MIN_SAMPLES and rate > rollout["max_error_rate"]:
        return Assessment(ROLLBACK, f"roll back {names}: error rate {rate:.3f} over {samples} samples "
                          f"({errors} errors, {load_failures} failed loads) > max_error_rate "
                          f"{rollout['max_error_rate']:g}", rows, figures, ignored)
    for fmt in sorted({r["running"]["format"] for r in on_canary}):
        ours = [r for r in on_canary if r["running"]["format"] == fmt]
        theirs = [r for r in on_stable if r["running"]["format"] == fmt]
        mine, base = _median_p95(ours), _median_p95(theirs)
        if len(ours) >= rollout["min_canaries"] and mine and base:
            figures["p95_ratio"] = round(mine / base, 3)
            if mine / base > rollout["max_p95_latency_ratio"]:
                return Assessment(ROLLBACK, f"roll back {names}: {fmt} p95 {mine:.2f} ms on canaries vs {base:.2f} ms "
                                  f"on stable, ratio {mine / base:.2f} > max_p95_latency_ratio "
                                  f"{rollout['max_p95_latency_ratio']:g}", rows, figures, ignored)
    moved_at = (canary.get("channel_moved") or {}).get("at")
    channel_soaked = moved_at is None or now - parse_time(moved_at) >= timedelta(minutes=soak)
    # Never promote on too few samples: a rate over fewer than MIN_SAMPLES says nothing yet.
    healthy = samples >= MIN_SAMPLES and rate <= rollout["max_error_rate"]
    if len(soaked) >= rollout["min_canaries"] and channel_soaked and healthy:
        return Assessment(PROMOTE, f"promote {names}: {len(soaked)} canaries ran it for >= {soak:g} min, "
                          f"error rate {rate:.3f} over {samples} samples", rows, figures, ignored)
    skipped = sum(ignored.values())
    return Assessment(NONE, f"waiting: {len(soaked)} of min {rollout['min_canaries']} canaries have run {job} for "
                      f"{soak:g} min with inferences ({len(on_canary)} run it, {samples} samples, "
                      f"min {MIN_SAMPLES} at error rate <= {rollout['max_error_rate']:g}"
                      f"{'' if channel_soaked else '; the channel moved less than the soak ago'}); "
                      f"{skipped} reports ignored", rows, figures, ignored)


def _median_p95(reports: list[Mapping[str, Any]]) -> float | None:
    values = [r["version"]["latency_ms"]["p95"] for r in reports if r["version"]["latency_ms"]["p95"] is not None]
    return round(statistics.median(values), 3) if values else None


def format_table(rows: list[Mapping[str, Any]], assessment: Assessment | None = None) -> str:
    """The fleet table (Markdown): versions x devices, health; the decision under it."""
    lines = ["| device | channel | runs | version | format | inferences | errors | p95 ms | health | last seen |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['device_id']} | {r['channel']} | {r['runs']} | {r['training_job_name'] or '-'} | "
              f"{r['format'] or '-'} | {r['inferences']} | {r['errors']} | "
              f"{'-' if r['p95_ms'] is None else r['p95_ms']} | {r['health']} | {r['last_seen']} |" for r in rows]
    if assessment is not None:
        lines += ["", f"decision: **{assessment.action}** - {assessment.reason}"]
        if any(assessment.ignored.values()):
            lines.append(f"ignored reports: {assessment.ignored}")
    return "\n".join(lines)
