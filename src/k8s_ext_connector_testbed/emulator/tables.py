"""Server-side printing: the ``meta.k8s.io/v1 Table`` that ``kubectl get`` asks for.

kubectl prints what the server puts in the table, so a CRD's additionalPrinterColumns only
show up if the server evaluates them: simple JSONPaths (``.a.b``, ``[0]``, ``[*]`` and
``[?(@.type=="Ready")]``), with ``date`` columns rendered as an age, as the real server does.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from k8s_ext_connector_testbed.emulator.resources import ResourceType

Obj = dict[str, Any]
_TOKEN = re.compile(
    r"\.(?P<name>[^.\[\]]+)|\[(?P<index>\d+)\]|\[\*\]"
    r"|\[\?\(@\.(?P<fkey>[\w.-]+)\s*==\s*['\"]?(?P<fval>[^'\")]*)['\"]?\)\]"
)
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def jsonpath(obj: Any, path: str) -> list[Any]:
    """All values ``path`` selects in ``obj``; ValueError for syntax outside the subset."""
    path, values, pos = path.strip().removeprefix("{").removesuffix("}"), [obj], 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if not m:
            raise ValueError(f"unsupported JSONPath {path!r}")
        pos, found = m.end(), []
        for v in values:
            if m["name"] is not None and isinstance(v, dict) and m["name"] in v:
                found.append(v[m["name"]])
            elif m["index"] is not None and isinstance(v, list) and int(m["index"]) < len(v):
                found.append(v[int(m["index"])])
            elif m["fkey"] is not None and isinstance(v, list):
                found += [
                    x
                    for x in v
                    if jsonpath(x, "." + m["fkey"])
                    and _text(jsonpath(x, "." + m["fkey"])[0]) == m["fval"]
                ]
            elif m.group(0) == "[*]":
                found += (
                    v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else []
                )
        values = found
    return values


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery's HumanDuration, slightly coarser beyond two days."""
    s = int(seconds)
    if s < 0:
        return "0s" if s >= -1 else "<invalid>"
    if s < 120:
        return f"{s}s"
    minutes, hours = s // 60, s // 3600
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    return f"{hours}h" if hours < 48 else f"{hours // 24}d"


def age(timestamp: Any) -> str | None:
    try:
        then = datetime.strptime(str(timestamp), TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
    return human_duration((datetime.now(UTC) - then).total_seconds())


def _cell(column: Obj, obj: Obj) -> Any:
    """The first value, as the real table convertor does; dates as ages."""
    try:
        value = next(iter(jsonpath(obj, column["jsonPath"])), None)
    except ValueError:
        return None
    if value is None or column.get("type") != "date":
        return json.dumps(value) if isinstance(value, dict | list) else value
    return age(value)


def _row_object(obj: Obj, include: str) -> Obj | None:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata", {}),
    }


def table(rt: ResourceType, objs: list[Obj], include: str, resource_version: str) -> Obj:
    """NAME plus the CRD's printer columns, or NAME and AGE where it declares none."""
    columns = rt.columns or (_AGE,)
    definitions = [{"name": "Name", "type": "string", "format": "name", "priority": 0}] + [
        {
            "name": c["name"],
            "type": c.get("type", "string"),
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": c.get("priority", 0),
        }
        for c in columns
    ]
    rows = []
    for obj in objs:
        row: Obj = {"cells": [obj["metadata"]["name"]] + [_cell(c, obj) for c in columns]}
        row_object = _row_object(obj, include)
        if row_object is not None:
            row["object"] = row_object
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions,
        "rows": rows,
    }
