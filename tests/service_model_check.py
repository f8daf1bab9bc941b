"""A request checked against botocore's service model for what botocore's own validator leaves out.

botocore's ``ParamValidator`` (run by every client call) checks required members, types and
``min``, not ``max``, ``pattern`` or ``enum``: AWS checks those server-side. moto has no
Greengrass V2, so this walks the operation's input shape and checks them here, from the
same JSON model the client uses (``botocore/data/<service>/<version>/service-2.json``).
"""
from __future__ import annotations

import re
from typing import Any

import botocore.session


def request_problems(service: str, operation: str, params: dict[str, Any]) -> list[str]:
    """What the service would refuse in ``params`` of ``operation``: one line per field."""
    model = botocore.session.get_session().get_service_model(service)
    return shape_problems(model.operation_model(operation).input_shape, params, operation)


def shape_problems(shape: Any, value: Any, path: str) -> list[str]:
    problems: list[str] = []
    meta = shape.metadata
    if shape.type_name == "structure":
        problems += [f"{path}.{name}: required" for name in shape.required_members if name not in value]
        problems += [f"{path}.{name}: not in the model" for name in value if name not in shape.members]
        for name, member in shape.members.items():
            if name in value:
                problems += shape_problems(member, value[name], f"{path}.{name}")
        return problems
    if shape.type_name == "list":
        problems += _size(meta, len(value), path, "items")
        for index, item in enumerate(value):
            problems += shape_problems(shape.member, item, f"{path}[{index}]")
        return problems
    if shape.type_name == "map":
        problems += _size(meta, len(value), path, "entries")
        for key, item in value.items():
            problems += shape_problems(shape.key, key, f"{path} key {key!r}")
            problems += shape_problems(shape.value, item, f"{path}[{key!r}]")
        return problems
    if shape.type_name in ("string", "blob"):
        problems += _size(meta, len(value), path, "characters" if shape.type_name == "string" else "bytes")
        enum = getattr(shape, "enum", None)  # a StringShape's; blobs have none
        if enum and value not in enum:
            problems.append(f"{path}: {value!r} is not one of {enum}")
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            problems.append(f"{path}: {value!r} does not match {meta['pattern']}")
        return problems
    if shape.type_name in ("integer", "long", "double", "float"):
        if "min" in meta and value < meta["min"]:
            problems.append(f"{path}: {value} < min {meta['min']}")
        if "max" in meta and value > meta["max"]:
            problems.append(f"{path}: {value} > max {meta['max']}")
    return problems


def _size(meta: dict, size: int, path: str, unit: str) -> list[str]:
    if "min" in meta and size < meta["min"]:
        return [f"{path}: {size} {unit} < min {meta['min']}"]
    if "max" in meta and size > meta["max"]:
        return [f"{path}: {size} {unit} > max {meta['max']}"]
    return []
