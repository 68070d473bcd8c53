"""The three PATCH flavours kubectl and kopf send: merge, JSON and strategic merge.

Strategic merge has no schema here. A list is merged by key only where the patch itself
says so, and kubectl always does for lists it merges: ``$setElementOrder/<field>`` lists
the merge key of every element (``[{"port": 80}]``) and deleted elements carry
``$patch: delete``. Any other list is replaced, as in a merge patch.
"""

from __future__ import annotations

import copy
from typing import Any

from k8s_ext_connector_testbed.emulator.errors import ApiError

MERGE, JSON, STRATEGIC = (
    "application/merge-patch+json",
    "application/json-patch+json",
    "application/strategic-merge-patch+json",
)


def apply(content_type: str, target: dict[str, Any], patch: Any) -> dict[str, Any]:
    """Apply ``patch`` of the given content type; 415 for others (server-side apply)."""
    kind = content_type.split(";")[0].strip()
    try:
        if kind == MERGE:
            result = merge_patch(target, patch)
        elif kind == JSON:
            result = json_patch(target, patch)
        elif kind == STRATEGIC:
            result = strategic_merge(target, patch)
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format: {kind}",
            )
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        raise ApiError(422, "Invalid", f"the patch cannot be applied: {e!r}") from e
    if not isinstance(result, dict):
        raise ApiError(422, "Invalid", "the patch does not leave an object")
    return result


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path and not path.startswith("/"):
        raise ValueError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _walk(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        doc = doc[int(token)] if isinstance(doc, list) else doc[token]
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    parent, last = _walk(doc, tokens[:-1]), tokens[-1]
    return parent.pop(int(last)) if isinstance(parent, list) else parent.pop(last)


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _walk(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if not 0 <= index <= len(parent):
            raise IndexError(f"index {index} out of range")
        parent.insert(index, value)
    else:
        parent[last] = value
    return doc


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902: add, remove, replace, move, copy, test, applied in order to a copy."""
    doc = copy.deepcopy(doc)
    for op in ops:
        path, kind = _pointer(op["path"]), op["op"]
        if kind == "test":
            if _walk(doc, path) != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        elif kind == "remove":
            _remove(doc, path)
        elif kind in ("add", "replace"):
            if kind == "replace" and path:
                _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            source = _pointer(op["from"])
            value = _remove(doc, source) if kind == "move" else copy.deepcopy(_walk(doc, source))
            doc = _add(doc, path, value)
        else:
            raise ValueError(f"unknown op {kind!r}")
    return doc


def _strip(value: Any) -> Any:
    """Drop directive keys from content that is inserted as is."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _merge_key(order: list[Any] | None, items: list[Any]) -> str | None:
    for item in (order or []) + items:
        if isinstance(item, dict):
            keys = [k for k in item if not k.startswith("$")]
            if len(keys) == 1 and (item in (order or []) or "$patch" in item):
                return str(keys[0])
    return None


def _merge_list(
    current: Any, items: list[Any], order: list[Any] | None, deleted: list[Any]
) -> list[Any]:
    current = list(current) if isinstance(current, list) else []
    key = _merge_key(order, items)
    merging = (
        order is not None
        or bool(deleted)
        or any(isinstance(i, dict) and "$patch" in i for i in items)
    )
    if not merging:
        return [_strip(i) for i in items]
    if key is None:  # a merging list of primitives
        result = [x for x in current + [i for i in items if i not in current] if x not in deleted]
    else:
        result = [copy.deepcopy(x) for x in current]
        for item in items:
            at = next(
                (
                    n
                    for n, x in enumerate(result)
                    if isinstance(x, dict) and x.get(key) == item.get(key)
                ),
                None,
            )
            if item.get("$patch") == "delete":
                result = result if at is None else result[:at] + result[at + 1 :]
            elif at is None:
                result.append(_strip(item))
            else:
                result[at] = strategic_merge(result[at], item)
    if order is not None:
        ids = [o.get(key) if key and isinstance(o, dict) else o for o in order]
        rank = {repr(i): n for n, i in enumerate(ids)}
        result.sort(key=lambda x: rank.get(repr(x.get(key) if key else x), len(ids)))
    return result


def strategic_merge(target: Any, patch: Any) -> Any:
    """Merge patch plus the directives kubectl apply/label/annotate generate."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return _strip(patch)
    result = dict(target) if isinstance(target, dict) else {}
    fields = {k for k in patch if not k.startswith("$")} | {
        k.split("/", 1)[1]
        for k in patch
        if k.startswith(("$setElementOrder/", "$deleteFromPrimitiveList/"))
    }
    for key in fields:
        value = patch.get(key, result.get(key))
        if key in patch and value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _merge_list(
                result.get(key),
                value if key in patch else [],
                patch.get(f"$setElementOrder/{key}"),
                patch.get(f"$deleteFromPrimitiveList/{key}", []),
            )
        elif isinstance(value, dict) and value.get("$patch") == "delete":
            result.pop(key, None)
        elif key in patch:
            result[key] = strategic_merge(result.get(key), value)
    if "$retainKeys" in patch:
        result = {k: v for k, v in result.items() if k in patch["$retainKeys"]}
    return result
