"""What the fleet view shows: the channels and the version each names, the devices, the last decision.

Read-only and plain Python (the Airflow plugin in ``plugins/headpose_operators/fleet_view.py``
is its web shell). The devices' rows and the pending verdict come from the same code as
``headpose_rollout``'s ``assess`` task, so the page and the DAG never disagree on who is
healthy; reports are read as that task reads them (validated, the ignored ones counted).
"""
from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable, Mapping
from urllib.parse import quote

from headpose.edge.channels import CANARY, LATEST, STABLE
from headpose.fleet.decision import fleet_rows
from headpose.fleet.reports import read_reports
from headpose.fleet.rollout import assess_now, last_decision
from headpose.planning.rollout_settings import rollout_in_force
from headpose.registry import channels
from headpose.registry.pointer import read_pointer

ROLLOUT_DAG_ID = "headpose_rollout"
# Decision ids as fleet.rollout.decision_id makes them: safe as a key part and a URL segment.
DECISION_ID_PATTERN = r"^[A-Za-z0-9._-]{1,200}$"
_DECISION_ID = re.compile(DECISION_ID_PATTERN)


def overview(
    s3_client: Any, *, bucket: str, folder: str, rollout: Mapping[str, Any] | None, now: datetime | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """The page's data: ``channels``, ``devices`` (rows), ``versions`` (devices per version), ``ignored``,
    ``pending`` (what the rollout DAG would decide now) and ``decision`` (the last one, with its link)."""
    now = now or datetime.now(timezone.utc)
    rollout = rollout_in_force(rollout)
    uris = channels.channel_uris(bucket, folder)
    state = channels.read_channels(s3_client, bucket, folder)
    state[LATEST] = read_pointer(s3_client, uris[LATEST])[0]
    if rollout:
        assessment = assess_now(s3_client, bucket, folder, rollout, now, log)
        rows, ignored = assessment["rows"], assessment["ignored"]
        pending = {key: assessment[key] for key in ("action", "reason", "figures")}
    else:  # no channels: every device follows latest.json
        reports, ignored = read_reports(s3_client, bucket, folder, None, now=now, log=log)
        rows, pending = fleet_rows(reports, None, state[LATEST], None, now), None
    return {
        "bucket": bucket, "folder": folder, "rollout": rollout, "at": now.isoformat(),
        "channels": {name: channel_summary(state[name], uris[name]) for name in (CANARY, STABLE, LATEST)},
        "devices": rows,
        "versions": dict(sorted(Counter(str(row["training_job_name"]) for row in rows).items())),
        "ignored": ignored,
        "pending": pending,
        "decision": decision_summary(last_decision(s3_client, bucket, folder)),
    }


def channel_summary(record: Mapping[str, Any] | None, uri: str) -> dict[str, Any] | None:
    """A pointer as the page lists it; None where the pointer does not exist."""
    if record is None:
        return None
    return {
        "uri": uri, "training_job_name": record.get("training_job_name"), "published_at": record.get("published_at"),
        "accuracy": (record.get("metrics") or {}).get("accuracy"), "formats": sorted(record.get("formats") or {}),
        "moved": record.get("channel_moved"), "rolled_back": record.get("rolled_back"),
    }


def decision_summary(decision: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The last decision with its link: the page of the run that made it, or the record of a person's move."""
    if decision is None:
        return None
    run = decision.get("dag_run") or {}
    link = (f"/dags/{quote(str(run['dag_id']), safe='')}/runs/{quote(str(run['run_id']), safe='')}"
            if run.get("dag_id") and run.get("run_id") else f"api/decisions/{decision['id']}")
    return {key: decision.get(key) for key in ("id", "action", "reason", "at", "by", "comment")} | {
        "canary": (decision.get("canary") or {}).get("training_job_name"),
        "stable": (decision.get("stable") or {}).get("training_job_name"), "link": link}


def read_decision(s3_client: Any, bucket: str, folder: str, decision_id: str) -> dict[str, Any] | None:
    """One decision record by id; None for an id that is not one (never a key outside ``rollouts/``)."""
    if not _DECISION_ID.match(decision_id) or decision_id in (".", ".."):
        return None
    return channels.read_decision(s3_client, channels.decision_uri(bucket, folder, decision_id))
