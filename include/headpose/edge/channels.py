"""Channels a device follows, and which devices are canaries. Standard library only.

``published/channels/canary.json`` and ``published/channels/stable.json`` are v3 records
with ``channel`` and the ``rollout`` settings in force, so a device works out its own
membership from the pointer it reads (no list of devices is kept anywhere). The rollout
DAG imports this module too: both sides must agree on who is a canary.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping

CANARY, STABLE, LATEST = "canary", "stable", "latest"
CHANNELS = (CANARY, STABLE)
# AWS IoT thing names: the id a device reports under is its thing name.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9:_-]{1,128}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)


def is_valid_device_id(device_id: str) -> bool:
    return bool(_DEVICE_ID_RE.match(device_id or ""))


def is_canary(device_id: str, rollout: Mapping[str, Any] | None) -> bool:
    """Whether ``device_id`` runs the canary: named in ``canary_devices``, or hashed into ``canary_share``.

    The hash (the first 8 bytes of the id's sha256 as a fraction of 2**64) is the same on
    every device and in the DAG, and spreads ids evenly whatever their naming scheme.
    """
    if not rollout:
        return False
    if rollout.get("canary_devices") is not None:
        return device_id in rollout["canary_devices"]
    share = float(rollout.get("canary_share") or 0.0)
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big") / 2**64 < share


def channel_uri(channels_prefix: str, channel: str) -> str:
    """``<prefix>canary.json`` or ``<prefix>stable.json``."""
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    return channels_prefix.rstrip("/") + f"/{channel}.json"


def published_prefix_of(channels_prefix: str) -> str:
    """``s3://b/f/published/`` of ``s3://b/f/published/channels/``."""
    stripped = channels_prefix.rstrip("/")
    if not stripped.endswith("/channels"):
        raise ValueError(f"{channels_prefix} is not a .../published/channels/ prefix")
    return stripped[: -len("channels")]
