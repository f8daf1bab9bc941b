"""Applying rollout decisions: ``headpose_rollout``'s tick and a person's promote or rollback.

Both go through ``apply``: the decision record is written first (once: an existing record
with the same id wins), then the channel it moves (``registry.channels``). A re-run of a
rollout run finds the record its first try wrote and re-applies it rather than deciding
again on newer reports, so a retried task never moves a channel the other way.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from headpose.edge.channels import CANARY, STABLE
from headpose.fleet.decision import NONE, PROMOTE, ROLLBACK, Assessment, assess
from headpose.fleet.reports import read_reports
from headpose.planning.layout import DEFAULT_FOLDER, split_s3_uri
from headpose.planning.rollout_settings import rollout_in_force
from headpose.registry import channels
from headpose.registry.pointer import published_prefix, read_pointer

ACTIONS = (PROMOTE, ROLLBACK)


class NothingToRollOut(ValueError):
    """No rollout is configured, or the canary and stable channels name the same version."""


class StaleCanary(ValueError):
    """The canary is not the version the person acting saw."""


def decision_id(text: str) -> str:
    """An id usable as an S3 key part and a URL segment (a run id has ``:`` and ``+``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:200]


def apply(
    s3_client: Any, bucket: str, folder: str, decision: Mapping[str, Any], *, mirror: bool = True,
) -> dict[str, Any]:
    """Write ``decision`` (unless one with its id exists: that one is applied), then move its channel."""
    decision = channels.write_decision(s3_client, bucket, folder, decision)
    rollout = decision.get("bounds")
    if decision["action"] == PROMOTE:
        return channels.promote(s3_client, bucket, folder, decision, rollout, mirror=mirror)
    if decision["action"] == ROLLBACK:
        return channels.rollback_canary(s3_client, bucket, folder, decision, rollout)
    raise ValueError(f"a decision to apply is promote or rollback, not {decision['action']!r}")


def tick(
    s3_client: Any, *, bucket: str, folder: str, rollout: Mapping[str, Any], now: datetime | None = None,
    dag_run: Mapping[str, str] | None = None, mirror: bool = True, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Read the channels and reports, decide, act: ``{"action", "reason", "rows", "figures", "ignored", ...}``."""
    now = now or datetime.now(timezone.utc)
    rollout = rollout_in_force(rollout) or {}
    assessment = assess_now(s3_client, bucket, folder, rollout, now, log)
    return act(s3_client, bucket=bucket, folder=folder, rollout=rollout, assessment=assessment, now=now,
               dag_run=dag_run, mirror=mirror, log=log)




def act(
    s3_client: Any, *, bucket: str, folder: str, rollout: Mapping[str, Any], assessment: Mapping[str, Any],
    now: datetime | None = None, dag_run: Mapping[str, str] | None = None, mirror: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Apply an assessment's promote or rollback as decision ``<run id>``; a re-run re-applies its record."""
    now = now or datetime.now(timezone.utc)
    rollout = rollout_in_force(rollout) or {}
    ident = decision_id((dag_run or {}).get("run_id") or f"tick-{now.strftime('%Y%m%dT%H%M%S')}")
    uri = channels.decision_uri(bucket, folder, ident)
    earlier = channels.read_decision(s3_client, uri)
    if earlier:  # this run decided before and was interrupted: finish that, do not decide again
        log(f"decision {ident} was written by an earlier try: applying it again")
        apply(s3_client, bucket, folder, earlier, mirror=mirror)
        return {**earlier, "rows": earlier.get("fleet"), "applied": True, "reapplied": True, "decision_uri": uri}
    result = {**dict(assessment), "id": ident, "applied": False}
    if assessment["action"] == NONE:
        return result
    state = channels.read_channels(s3_client, bucket, folder)
    if channels.version_of(state[CANARY]) != assessment["canary"]:
        return {**result, "action": NONE, "reason": f"the canary changed after it was assessed (now "
                f"{(state[CANARY] or {}).get('training_job_name')}); the next run assesses it"}
    decision = channels.decision_record(
        ident, assessment["action"], assessment["reason"], at=now.isoformat(), by="headpose_rollout",
        canary=state[CANARY], stable=state[STABLE], rollout=rollout, dag_run=dag_run, figures=assessment["figures"],
        fleet=assessment["rows"], ignored=assessment["ignored"])
    apply(s3_client, bucket, folder, decision, mirror=mirror)
    return {**result, "applied": True, "decision_uri": uri, "canary": decision["canary"],
            "stable": decision["stable"]}


def assess_now(
    s3_client: Any, bucket: str, folder: str, rollout: Mapping[str, Any], now: datetime,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The assessment of the channels and reports as they are now, as JSON (the DAG's XCom):
    ``{"action", "reason", "rows", "figures", "ignored", "canary", "stable"}`` (the versions assessed)."""
    rollout = rollout_in_force(rollout) or {}
    state = channels.read_channels(s3_client, bucket, folder)
    if state[STABLE] is None:  # before the channels exist, the stable model is latest.json's
        state[STABLE] = read_pointer(s3_client, channels.channel_uris(bucket, folder)["latest"])[0]
    moved_at = ((state[CANARY] or {}).get("channel_moved") or {}).get("at")
    reports, ignored = read_reports(s3_client, bucket, folder, rollout, moved_at=moved_at, now=now, log=log)
    assessment: Assessment = assess(state[CANARY], state[STABLE], reports, rollout, now, ignored)
    return {"action": assessment.action, "reason": assessment.reason, "rows": assessment.rows,
            "figures": assessment.figures, "ignored": assessment.ignored,
            "canary": channels.version_of(state[CANARY]), "stable": channels.version_of(state[STABLE])}


def act_by_hand(
    s3_client: Any, *, bucket: str, folder: str = DEFAULT_FOLDER, action: str, by: str, comment: str,
    expected_canary: str | None, now: datetime | None = None, mirror: bool | None = None,
    rollout: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A person's promote or rollback, through ``apply``; the decision record written.

    ``rollout`` and ``mirror`` default to the deployment profile's (``$HEADPOSE_RUN_DEFAULTS``,
    set alike for every Airflow component), the rollout else to the canary pointer's.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
    if rollout is None or mirror is None:
        from headpose.planning.profile import load_profile

        settings = load_profile().settings
        rollout = rollout if rollout is not None else settings.rollout
        mirror = settings.publish_latest_mirror if mirror is None else mirror
    now = now or datetime.now(timezone.utc)
    state = channels.read_channels(s3_client, bucket, folder)
    canary, stable = state[CANARY], state[STABLE]
    rollout = rollout_in_force(rollout or (canary or {}).get("rollout"))
    if not rollout or canary is None:
        raise NothingToRollOut("no rollout is configured (no canary channel)")
    if channels.same_version(canary, stable):
        raise NothingToRollOut(f"the canary and stable channels both name {canary['training_job_name']}")
    if expected_canary is not None and expected_canary != canary["training_job_name"]:
        raise StaleCanary(f"the canary is {canary['training_job_name']} now, not {expected_canary}")
    verb = "promote" if action == PROMOTE else "roll back"
    decision = channels.decision_record(
        decision_id(f"manual-{now.strftime('%Y%m%dT%H%M%S')}-{by}"), action,
        f"{verb} {canary['training_job_name']} by hand ({by})", at=now.isoformat(), by=by,
        canary=canary, stable=stable, rollout=rollout, comment=(comment or "")[:500] or None)
    apply(s3_client, bucket, folder, decision, mirror=bool(mirror))
    return decision


def last_decision(s3_client: Any, bucket: str, folder: str = DEFAULT_FOLDER) -> dict[str, Any] | None:
    """The most recent decision record: the newest by LastModified, ties (1 s resolution) by their ``at``."""
    _, prefix = split_s3_uri(published_prefix(bucket, folder) + "rollouts/")
    newest: list[str] = []
    latest_time = None
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith(".json"):
                continue
            if latest_time is None or item["LastModified"] > latest_time:
                newest, latest_time = [item["Key"]], item["LastModified"]
            elif item["LastModified"] == latest_time:
                newest.append(item["Key"])
    records = [json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()) for key in newest]
    return max(records, key=lambda record: str(record.get("at"))) if records else None
