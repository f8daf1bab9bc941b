"""The channels: ``published/channels/{canary,stable}.json``, moved one decision at a time.

With a ``rollout`` configured (DESIGN.md, Publishing) ``stable.json`` is the source of truth
for the stable model; ``latest.json`` is a copy written right after it (for devices that
know no channels) and the ``latest/`` mirror follows it. ``publish`` moves ``canary.json``
only; ``headpose_rollout`` (``fleet.rollout``) promotes the canary's version to stable, or
rolls the canary back to stable's.

Every move writes its decision record (``published/rollouts/<id>.json``) first, then the
pointer it moves; the id is deterministic (``publish-<job>``, the rollout run's id, or
``manual-<utc>-<user>``), the record is written once (``If-None-Match``) and a re-run
re-applies the record it finds. Each move is idempotent: when the pointer already names
its target, only what follows it (``latest.json``, the mirror) is brought in line.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from headpose.edge.channels import CANARY, CHANNELS, STABLE
from headpose.planning.layout import DEFAULT_FOLDER, join_uri, split_s3_uri
from headpose.registry.pointer import (
    POINTER_NAME,
    PointerChangedError,
    PublishError,
    is_missing_key,
    is_precondition_failed,
    pointer_summary,
    published_prefix,
    put_json,
    put_pointer,
    read_pointer,
    sync_mirror,
    verify_record_files,
)
from headpose.registry.record import record_files

# What a channel pointer adds to the version's history record; stripped to compare records.
CHANNEL_FIELDS = ("channel", "rollout", "channel_moved", "rolled_back")


def channel_uris(bucket: str, folder: str = DEFAULT_FOLDER) -> dict[str, str]:
    """``{"canary", "stable", "latest"}``: the URIs of the two channels and of ``latest.json``."""
    prefix = published_prefix(bucket, folder)
    return {**{channel: join_uri(prefix, f"channels/{channel}.json") for channel in CHANNELS},
            "latest": join_uri(prefix, POINTER_NAME)}


def decision_uri(bucket: str, folder: str, decision_id: str) -> str:
    return join_uri(published_prefix(bucket, folder), f"rollouts/{decision_id}.json")


def mirror_prefix(bucket: str, folder: str = DEFAULT_FOLDER) -> str:
    return join_uri(published_prefix(bucket, folder), "latest/")


def read_channels(s3_client: Any, bucket: str, folder: str = DEFAULT_FOLDER) -> dict[str, dict[str, Any] | None]:
    """``{"canary": record | None, "stable": record | None}``."""
    uris = channel_uris(bucket, folder)
    return {channel: read_pointer(s3_client, uris[channel])[0] for channel in CHANNELS}


def version_of(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{"training_job_name", "frozen_sha256"}``: what names a version (a pointer's ETag does not:
    bootstrap and rollback rewrite a pointer without changing its version)."""
    if not record:
        return None
    return {"training_job_name": record["training_job_name"],
            "frozen_sha256": record_files(record)["frozen_model.pb"]["sha256"]}


def same_version(first: Mapping[str, Any] | None, second: Mapping[str, Any] | None) -> bool:
    return bool(first and second) and version_of(first) == version_of(second)


def channel_record(
    version: Mapping[str, Any], channel: str, rollout: Mapping[str, Any] | None, moved: Mapping[str, Any],
    previous: Mapping[str, Any] | None, rolled_back: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A channel pointer: the version's record, the channel, the rollout in force, how it moved."""
    record = {key: value for key, value in version.items() if key not in CHANNEL_FIELDS}
    record.update(channel=channel, rollout=dict(rollout) if rollout else None, channel_moved=dict(moved),
                  previous=pointer_summary(previous))
    if rolled_back:
        record["rolled_back"] = dict(rolled_back)
    return record


def write_decision(s3_client: Any, bucket: str, folder: str, decision: Mapping[str, Any]) -> dict[str, Any]:
    """Write the decision record once; an existing one (an earlier try's) wins and is returned."""
    uri = decision_uri(bucket, folder, decision["id"])
    try:
        put_json(s3_client, uri, decision, IfNoneMatch="*")
    except Exception as error:
        if not is_precondition_failed(error):
            raise
        return read_decision(s3_client, uri)
    return dict(decision)


def read_decision(s3_client: Any, uri: str) -> dict[str, Any] | None:
    target_bucket, key = split_s3_uri(uri)
    try:
        return json.loads(s3_client.get_object(Bucket=target_bucket, Key=key)["Body"].read())
    except Exception as error:
        if is_missing_key(error):
            return None
        raise


def ensure_channels(s3_client: Any, bucket: str, folder: str, rollout: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{channel: (record, etag)}``: create the missing channels from ``latest.json`` (If-None-Match).

    Before the first rollout both channels start as the published model; with nothing
    published they stay absent (the first publish then moves the canary alone).
    """
    uris = channel_uris(bucket, folder)
    state = {channel: read_pointer(s3_client, uris[channel]) for channel in CHANNELS}
    latest, _ = read_pointer(s3_client, uris["latest"])
    for channel in CHANNELS:
        if state[channel][0] is not None or latest is None:
            continue
        moved = {"at": latest.get("published_at"), "by": "bootstrap", "reason": "the channels start as latest.json",
                 "decision_uri": None, "from": None}
        record = {**channel_record(latest, channel, rollout, moved, None), "previous": latest.get("previous")}
        try:
            put_pointer(s3_client, uris[channel], record, None)
        except PointerChangedError:  # another writer created it meanwhile: theirs stands
            pass
        state[channel] = read_pointer(s3_client, uris[channel])
    return state


def publish_canary(
    s3_client: Any, bucket: str, folder: str, record: Mapping[str, Any], history_uri: str,
    canary: tuple[dict[str, Any] | None, str | None], decision: Mapping[str, Any], rollout: Mapping[str, Any],
) -> dict[str, Any]:
    """``publish`` with a rollout: history record, decision record, then ``canary.json`` (If-Match).

    ``latest.json``, ``stable.json`` and the mirror are not touched: stable devices get the
    version only when ``headpose_rollout`` promotes it.
    """
    put_json(s3_client, history_uri, record)
    decision = write_decision(s3_client, bucket, folder, decision)
    current, etag = canary
    return move_channel(s3_client, bucket, folder, CANARY, record, current, etag, decision, rollout)


def move_channel(
    s3_client: Any, bucket: str, folder: str, channel: str, version: Mapping[str, Any],
    current: Mapping[str, Any] | None, etag: str | None, decision: Mapping[str, Any], rollout: Mapping[str, Any] | None,
    rolled_back: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Point ``channel`` at ``version`` as ``decision`` says (conditional on ``etag``); the new pointer."""
    moved = {"at": decision["at"], "by": decision["by"], "reason": decision["reason"],
             "decision_uri": decision_uri(bucket, folder, decision["id"]),
             "from": (current or {}).get("training_job_name")}
    pointer = channel_record(version, channel, rollout, moved, current, rolled_back)
    put_pointer(s3_client, channel_uris(bucket, folder)[channel], pointer, etag)
    return pointer


def history_version(s3_client: Any, bucket: str, folder: str, job: str) -> dict[str, Any]:
    """A published version's history record, every file it names checked against its sha256."""
    uri = join_uri(published_prefix(bucket, folder), f"history/{job}.json")
    record = read_decision(s3_client, uri)
    if record is None:
        raise PublishError(f"{job} was never published (no {uri})")
    problems = verify_record_files(s3_client, record)
    if problems:
        raise PublishError(f"refusing to move a channel to {job}: " + "; ".join(problems))
    return record


def promote(
    s3_client: Any, bucket: str, folder: str, decision: Mapping[str, Any], rollout: Mapping[str, Any] | None,
    *, mirror: bool = True,
) -> dict[str, Any]:
    """Stable to the decision's canary version, then ``latest.json`` from stable, then the mirror."""
    uris = channel_uris(bucket, folder)
    stable, etag = read_pointer(s3_client, uris[STABLE])
    target = decision["canary"]
    if version_of(stable) != target:
        version = history_version(s3_client, bucket, folder, target["training_job_name"])
        if version_of(version) != target:
            raise PublishError(f"the history record of {target['training_job_name']} names another frozen graph "
                               "than the decision")
        stable = move_channel(s3_client, bucket, folder, STABLE, version, stable, etag, decision, rollout)
    follow_stable(s3_client, bucket, folder, stable, mirror=mirror)
    return stable


def follow_stable(s3_client: Any, bucket: str, folder: str, stable: Mapping[str, Any], *, mirror: bool = True) -> None:
    """``latest.json`` (If-Match) and the mirror brought in line with the stable channel."""
    uris = channel_uris(bucket, folder)
    latest, etag = read_pointer(s3_client, uris["latest"])
    if not same_version(latest, stable):
        put_pointer(s3_client, uris["latest"], {**dict(stable), "channel": STABLE}, etag)
    if mirror:
        sync_mirror(s3_client, stable, mirror_prefix(bucket, folder))


def rollback_canary(
    s3_client: Any, bucket: str, folder: str, decision: Mapping[str, Any], rollout: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The canary back to the stable channel's version, with ``rolled_back``."""
    uris = channel_uris(bucket, folder)
    stable, _ = read_pointer(s3_client, uris[STABLE])
    canary, etag = read_pointer(s3_client, uris[CANARY])
    if stable is None:
        raise PublishError("nothing is stable to roll the canary back to: "
                           "`python -m headpose.registry rollback --channel canary --to <job>`")
    if same_version(canary, stable):
        return canary
    version = history_version(s3_client, bucket, folder, stable["training_job_name"])
    rolled_back = {"at": decision["at"], "from": (canary or {}).get("training_job_name"), "decision_id": decision["id"]}
    return move_channel(s3_client, bucket, folder, CANARY, version, canary, etag, decision, rollout, rolled_back)


def decision_record(
    decision_id: str, action: str, reason: str, *, at: str, by: str, canary: Mapping[str, Any] | None,
    stable: Mapping[str, Any] | None, rollout: Mapping[str, Any] | None, dag_run: Mapping[str, Any] | None = None,
    figures: Mapping[str, Any] | None = None, fleet: list | None = None, ignored: Mapping[str, int] | None = None,
    comment: str | None = None,
) -> dict[str, Any]:
    """A decision record (``published/rollouts/<id>.json``); ``canary``/``stable`` are records or versions."""
    def version(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if record is None:
            return None
        return dict(record) if "frozen_sha256" in record else version_of(record)

    return {"decision_version": 1, "id": decision_id, "action": action, "reason": reason, "at": at, "by": by,
            "dag_run": dict(dag_run) if dag_run else None, "canary": version(canary), "stable": version(stable),
            "figures": dict(figures or {}), "bounds": dict(rollout) if rollout else None, "fleet": list(fleet or [])[:500],
            "ignored": dict(ignored or {}), "comment": comment}


def pending_canary(
    s3_client: Any, bucket: str, folder: str, job: str, frozen_sha256: str, rollout: Mapping[str, Any],
) -> tuple[tuple[dict[str, Any] | None, str | None], dict[str, Any] | None, bool]:
    """``((canary, its ETag), the champion record, already published)`` for a publish with a rollout.

    The champion is the stable channel (``latest.json`` before the channels exist); the
    version counts as published when either channel names it.
    """
    state = ensure_channels(s3_client, bucket, folder, rollout)
    stable = state[STABLE][0] or read_pointer(s3_client, channel_uris(bucket, folder)["latest"])[0]
    mine = {"training_job_name": job, "frozen_sha256": frozen_sha256}
    already = any(version_of(state[channel][0]) == mine for channel in CHANNELS)
    return state[CANARY], stable, already
