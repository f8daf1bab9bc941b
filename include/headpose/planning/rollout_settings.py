"""The ``rollout`` and ``greengrass`` deployment settings: their schemas and the values in force.

``rollout`` turns the channels on (DESIGN.md, Publishing): ``publish`` moves
``channels/canary.json`` only, and ``headpose_rollout`` moves ``channels/stable.json`` from
the devices' reports. Absent, publishing is as before. ``greengrass`` describes the
component written beside each version. Standard library only: the DAG files import it.
"""
from __future__ import annotations

from typing import Any, Mapping

from headpose.edge.channels import DEVICE_ID_PATTERN

ROLLOUT_DEFAULTS: dict[str, Any] = {
    "min_canaries": 1, "soak_minutes": 60.0, "max_error_rate": 0.01, "max_p95_latency_ratio": 1.5,
}
ROLLOUT_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "properties": {
        "canary_share": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "canary_devices": {"type": "array", "minItems": 1, "maxItems": 500, "uniqueItems": True,
                           "items": {"type": "string", "pattern": DEVICE_ID_PATTERN}},
        "min_canaries": {"type": "integer", "minimum": 1},
        "soak_minutes": {"type": "number", "minimum": 0},
        "max_error_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "max_p95_latency_ratio": {"type": "number", "minimum": 1},
    },
    "additionalProperties": False,
    # exactly one of the share and the list
    "oneOf": [{"required": ["canary_share"], "not": {"required": ["canary_devices"]}},
              {"required": ["canary_devices"], "not": {"required": ["canary_share"]}}],
    "description": 'null, or {"canary_share": 0<x<=1 | "canary_devices": [thing names], "min_canaries": n>=1, '
                   '"soak_minutes": m>=0, "max_error_rate": 0..1, "max_p95_latency_ratio": >=1} '
                   "(exactly one of canary_share and canary_devices)",
}
GREENGRASS_DEFAULTS: dict[str, Any] = {
    "component_name": "com.headpose.EdgeClient", "format": None, "create_component": False, "interval_seconds": 60,
}
GREENGRASS_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "properties": {
        "component_name": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,128}$"},
        "format": {"type": ["string", "null"], "minLength": 1},
        "create_component": {"type": "boolean"},
        "interval_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
    },
    "additionalProperties": False,
    "description": 'null, or {"component_name": "com.headpose.EdgeClient", "format": <edge format>, '
                   '"create_component": false, "interval_seconds": 60}',
}


def rollout_in_force(rollout: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The profile's ``rollout`` with its defaults filled in; None: no channels."""
    return {**ROLLOUT_DEFAULTS, **dict(rollout)} if rollout else None


def greengrass_in_force(greengrass: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return {**GREENGRASS_DEFAULTS, **dict(greengrass)} if greengrass else None
