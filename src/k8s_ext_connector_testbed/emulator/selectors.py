"""Label and field selectors, parsed once per request into a predicate over objects."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from k8s_ext_connector_testbed.emulator.errors import ApiError

Match = Callable[[dict[str, Any]], bool]
_LABEL = re.compile(
    r"^(?P<neg>!)?(?P<key>[\w./-]+)"
    r"(?:(?P<op>==|=|!=)(?P<value>[\w.-]*)|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?$"
)
_FIELD = re.compile(r"^(?P<key>[\w.]+)(?P<op>==|=|!=)(?P<value>.*)$")


def _split(text: str) -> list[str]:
    """Top-level comma split: commas inside ``in (a,b)`` do not separate requirements."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [p for p in parts if p]


def _requirement(text: str) -> Callable[[dict[str, str]], bool]:
    m = _LABEL.match(text)
    if not m or (m["neg"] and (m["op"] or m["set"])):
        raise ApiError.bad_request(f"unable to parse requirement: {text!r}")
    key, value = m["key"], m["value"]
    if m["op"]:
        return (
            (lambda labels: labels.get(key) != value)
            if m["op"] == "!="
            else (lambda labels: labels.get(key) == value)
        )
    if m["set"]:
        values = {v.strip() for v in m["values"].split(",")}
        if m["set"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    return (lambda labels: key not in labels) if m["neg"] else (lambda labels: key in labels)


def label_selector(text: str | None) -> Match:
    """``a=b,c!=d,e in (f,g),h notin (i),j,!k`` as the real server parses it."""
    reqs = [_requirement(r) for r in _split(text or "")]
    return lambda obj: all(r(obj.get("metadata", {}).get("labels") or {}) for r in reqs)


def _field_value(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def field_selector(text: str | None) -> Match:
    """``metadata.name=x,spec.nodeName!=y``: any dotted path, compared as strings."""
    reqs = []
    for part in _split(text or ""):
        m = _FIELD.match(part)
        if not m:
            raise ApiError.bad_request(f"invalid field selector: {part!r}")
        reqs.append((m["key"], m["op"] == "!=", m["value"]))
    return lambda obj: all((_field_value(obj, k) == v) != neg for k, neg, v in reqs)


def both(labels: str | None, fields: str | None) -> Match:
    by_label, by_field = label_selector(labels), field_selector(fields)
    return lambda obj: by_label(obj) and by_field(obj)
