"""The object store: writes with the real server's metadata rules, and the watch history.

Every write takes the next global resourceVersion and is appended to a bounded history,
so a watch can resume after any resourceVersion it saw (older than the history: 410
Expired, which clients answer with a new list). Deletion follows the real lifecycle:
finalizers hold an object with a deletionTimestamp; namespaces and CRDs hold until their
contents are gone; dependents whose owners are all gone are deleted (garbage collection).

Methods are synchronous and serialised by one lock, so tests on other threads may read
(and seed) the store directly while the server's event loop writes.
"""

from __future__ import annotations

import base64
import copy
import random
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from k8s_ext_connector_testbed.emulator.errors import ApiError
from k8s_ext_connector_testbed.emulator.resources import (
    CRD_GROUP,
    CRD_PLURAL,
    Registry,
    ResourceType,
    crd_types,
)
from k8s_ext_connector_testbed.emulator.tables import TIME_FORMAT

Obj = dict[str, Any]
Key = tuple[str, str]  # namespace ("" when cluster-scoped), name
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SUFFIX = "bcdfghjklmnpqrstvwxz2456789"  # the real generateName alphabet (no vowels)
_SYSTEM_META = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "name",
    "namespace",
)


@dataclass(frozen=True)
class WatchEvent:
    """One change; ``old`` lets a selector-filtered watch turn MODIFIED into ADDED/DELETED."""

    rv: int
    type: str
    group: str
    plural: str
    obj: Obj
    old: Obj | None = None


Listener = Callable[[WatchEvent | None], None]  # None: the server is stopping


def now() -> str:
    return datetime.now(UTC).strftime(TIME_FORMAT)


def _body(obj: Obj) -> Obj:
    """What a spec change is: everything but metadata and status (drives generation)."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _same(a: Obj, b: Obj) -> bool:
    strip = ("resourceVersion", "managedFields")
    return {**a, "metadata": {k: v for k, v in a["metadata"].items() if k not in strip}} == {
        **b,
        "metadata": {k: v for k, v in b["metadata"].items() if k not in strip},
    }


class Store:
    """Objects by (group, plural) then (namespace, name); versions share one storage."""

    def __init__(self, registry: Registry, history: int = 10_000) -> None:
        self.registry = registry
        self.lock = threading.RLock()
        self._buckets: dict[tuple[str, str], dict[Key, Obj]] = {}
        self._rv = 0
        self._compacted = 0  # watches from before this resourceVersion get 410 Expired
        self._history: deque[WatchEvent] = deque(maxlen=history)
        self._listeners: list[Listener] = []
        self._ips = 9  # the next Service gets 10.96.0.10

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def _bucket(self, group: str, plural: str) -> dict[Key, Obj]:
        return self._buckets.setdefault((group, plural), {})

    @staticmethod
    def _key(rt: ResourceType, namespace: str, name: str) -> Key:
        return (namespace if rt.namespaced else "", name)

    @staticmethod
    def out(rt: ResourceType, obj: Obj) -> Obj:
        """A copy as served at ``rt``'s version (no conversion beyond apiVersion)."""
        return {**copy.deepcopy(obj), "apiVersion": rt.api_version}

    def _current(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        obj = self._bucket(rt.group, rt.plural).get(self._key(rt, namespace, name))
        if obj is None:
            raise ApiError.not_found(rt.qualified, name)
        return obj

    # Reading.

    def get(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        with self.lock:
            return self.out(rt, self._current(rt, namespace, name))

    def select(
        self, rt: ResourceType, namespace: str | None, match: Callable[[Obj], bool] = lambda _: True
    ) -> tuple[list[Obj], str]:
        """Matching objects sorted by namespace and name, and the list's resourceVersion."""
        with self.lock:
            bucket = self._bucket(rt.group, rt.plural)
            items = [
                self.out(rt, bucket[k])
                for k in sorted(bucket)
                if namespace is None or k[0] == namespace
            ]
            return [o for o in items if match(o)], self.resource_version

    def iter_all(self) -> Iterator[tuple[ResourceType, Obj]]:
        for (group, plural), bucket in list(self._buckets.items()):
            rt = self.registry.find(group=group, plural=plural)
            if rt is not None:
                yield from ((rt, obj) for obj in list(bucket.values()))

    # Watching.

    def subscribe(
        self, listener: Listener, since: str | None, rt: ResourceType
    ) -> list[WatchEvent]:
        """Register ``listener``; return the events it missed (all objects as ADDED if none)."""
        with self.lock:
            if since in (None, "", "0"):
                bucket = self._bucket(rt.group, rt.plural)
                backlog = [
                    WatchEvent(self._rv, "ADDED", rt.group, rt.plural, bucket[k])
                    for k in sorted(bucket)
                ]
            else:
                if not str(since).isdigit():
                    raise ApiError.bad_request(f"invalid resourceVersion {since!r}")
                if int(str(since)) < self._compacted:
                    raise ApiError(410, "Expired", f"too old resource version: {since}")
                backlog = [
                    e
                    for e in self._history
                    if e.rv > int(str(since)) and (e.group, e.plural) == (rt.group, rt.plural)
                ]
            self._listeners.append(listener)
            return backlog

    def unsubscribe(self, listener: Listener) -> None:
        with self.lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def close(self) -> None:
        """End every watch (server stop)."""
        with self.lock:
            for listener in list(self._listeners):
                listener(None)

    def _emit(self, kind: str, rt: ResourceType, obj: Obj, old: Obj | None) -> None:
        event = WatchEvent(self._rv, kind, rt.group, rt.plural, obj, old)
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv
        self._history.append(event)
        for listener in list(self._listeners):
            listener(event)

    def _put(self, rt: ResourceType, obj: Obj, kind: str, old: Obj | None = None) -> Obj:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        meta = obj["metadata"]
        self._bucket(rt.group, rt.plural)[(meta.get("namespace", ""), meta["name"])] = obj
        self._emit(kind, rt, obj, old)
        return self.out(rt, obj)

    # Writing.

    def _check_namespace(self, namespace: str) -> None:
        ns = self._bucket("", "namespaces").get(("", namespace))
        if ns is None:
            raise ApiError.not_found("namespaces", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f"unable to create new content in namespace "
                f"{namespace} because it is being terminated",
            )

    def create(self, rt: ResourceType, namespace: str, body: Obj) -> Obj:
        with self.lock:
            obj = copy.deepcopy(body)
            meta = obj.setdefault("metadata", {})
            if rt.namespaced:
                self._check_namespace(namespace)
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices(_SUFFIX, k=5))  # noqa: S311
            name = meta.get("name") or ""
            if not name or (rt.group != "rbac.authorization.k8s.io" and not _NAME.match(name)):
                raise ApiError.invalid(
                    rt.qualified,
                    name,
                    f"metadata.name: Invalid value: "
                    f"{name!r}: must be a lowercase RFC 1123 subdomain",
                )
            if (meta.get("namespace", ""), name) in self._bucket(rt.group, rt.plural):
                raise ApiError.exists(rt.qualified, name)
            for key in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                meta.pop(key, None)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
            obj.update(apiVersion=rt.api_version, kind=rt.kind)
            if rt.status:
                obj.pop("status", None)
            self._system_fields(rt, obj, None)
            return self._put(rt, obj, "ADDED")

    def update(
        self, rt: ResourceType, namespace: str, name: str, body: Obj, subresource: str = ""
    ) -> Obj:
        """PUT (and the result of a PATCH): optimistic concurrency on metadata.resourceVersion."""
        with self.lock:
            current = self._current(rt, namespace, name)
            rv = (body.get("metadata") or {}).get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise ApiError.conflict(rt.qualified, name)
            if subresource:
                new = {**copy.deepcopy(current), "status": copy.deepcopy(body.get("status"))}
            else:
                new = {**copy.deepcopy(body), "apiVersion": rt.api_version, "kind": rt.kind}
                meta = {
                    k: v for k, v in (body.get("metadata") or {}).items() if k not in _SYSTEM_META
                }
                meta.update({k: v for k, v in current["metadata"].items() if k in _SYSTEM_META})
                new["metadata"] = meta
                if rt.status:
                    new["status"] = copy.deepcopy(current.get("status"))
                if _body(new) != _body(current):
                    new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
            if new.get("status") is None:
                new.pop("status", None)
            self._system_fields(rt, new, current)
            if _same(new, current):
                return self.out(rt, current)
            written = self._put(rt, new, "MODIFIED", old=current)
            self._finish(rt, self._key(rt, namespace, name))
            return written

    def delete(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        """Remove, or mark for deletion while finalizers or contents remain."""
        with self.lock:
            current = self._current(rt, namespace, name)
            key = self._key(rt, namespace, name)
            container = rt.kind == "Namespace" or (rt.group, rt.plural) == (CRD_GROUP, CRD_PLURAL)
            if not container and not current["metadata"].get("finalizers"):
                return self._remove(rt, key)
            if current["metadata"].get("deletionTimestamp"):
                return self.out(rt, current)
            marked = copy.deepcopy(current)
            marked["metadata"].update(deletionTimestamp=now(), deletionGracePeriodSeconds=0)
            if rt.kind == "Namespace":
                marked["status"] = {"phase": "Terminating"}
            written = self._put(rt, marked, "MODIFIED", old=current)
            for content_rt, obj in self._contents(rt, marked):
                self._delete_if_present(content_rt, obj)
            return self._finish(rt, key) or written

    def _contents(self, rt: ResourceType, obj: Obj) -> list[tuple[ResourceType, Obj]]:
        """What a namespace or a CRD waits for before it can go."""
        name = obj["metadata"]["name"]
        if rt.kind == "Namespace":
            return [(r, o) for r, o in self.iter_all() if o["metadata"].get("namespace") == name]
        if (rt.group, rt.plural) == (CRD_GROUP, CRD_PLURAL):
            spec = obj.get("spec", {})
            target = (spec.get("group"), spec.get("names", {}).get("plural"))
            return [(r, o) for r, o in self.iter_all() if (r.group, r.plural) == target]
        return []

    def _finish(self, rt: ResourceType, key: Key) -> Obj | None:
        obj = self._bucket(rt.group, rt.plural).get(key)
        if (
            obj
            and obj["metadata"].get("deletionTimestamp")
            and not obj["metadata"].get("finalizers")
            and not self._contents(rt, obj)
        ):
            return self._remove(rt, key)
        return None

    def _remove(self, rt: ResourceType, key: Key) -> Obj:
        obj = self._bucket(rt.group, rt.plural).pop(key)
        self._rv += 1
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._emit("DELETED", rt, gone, obj)
        if (rt.group, rt.plural) == (CRD_GROUP, CRD_PLURAL):
            spec = obj["spec"]
            self.registry.unregister(spec["group"], spec["names"]["plural"])
            self._buckets.pop((spec["group"], spec["names"]["plural"]), None)
        self._collect(obj)
        self._reap(rt, obj)
        return self.out(rt, gone)

    def _collect(self, owner: Obj) -> None:
        """Garbage-collect dependents whose every owner is gone (background propagation)."""
        uid, namespace = owner["metadata"]["uid"], owner["metadata"].get("namespace")
        live = {o["metadata"]["uid"] for _, o in self.iter_all()}
        for rt, obj in self.iter_all():
            refs = {r.get("uid") for r in obj["metadata"].get("ownerReferences", [])}
            same_scope = namespace is None or obj["metadata"].get("namespace") == namespace
            if uid in refs and same_scope and not refs & live:
                self._delete_if_present(rt, obj)

    def _delete_if_present(self, rt: ResourceType, obj: Obj) -> None:
        """Cascades may already have removed ``obj``."""
        meta = obj["metadata"]
        if self._bucket(rt.group, rt.plural).get((meta.get("namespace", ""), meta["name"])):
            self.delete(rt, meta.get("namespace", ""), meta["name"])

    def _reap(self, rt: ResourceType, removed: Obj) -> None:
        """A terminating namespace or CRD may have lost its last content."""
        namespace = removed["metadata"].get("namespace")
        if namespace:
            ns_rt = self.registry.lookup("", "v1", "namespaces")
            assert ns_rt is not None
            self._finish(ns_rt, ("", namespace))
        crd_rt = self.registry.lookup(CRD_GROUP, "v1", CRD_PLURAL)
        if rt.group and crd_rt:
            self._finish(crd_rt, ("", f"{rt.plural}.{rt.group}"))

    def _cluster_ip(self, svc: Obj, current: Obj | None) -> None:
        """The apiserver's allocator: one address from 10.96.0.0/12, kept for life."""
        spec = svc.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        kept = (current or {}).get("spec", {}).get("clusterIP")
        if spec["type"] == "ExternalName" or spec.get("clusterIP") == "None":
            return
        if not spec.get("clusterIP"):
            if kept:
                spec["clusterIP"] = kept
            else:
                self._ips += 1
                spec["clusterIP"] = f"10.96.{self._ips // 256}.{self._ips % 256}"
        spec["clusterIPs"] = [spec["clusterIP"]]

    def _system_fields(self, rt: ResourceType, obj: Obj, current: Obj | None) -> None:
        """What the real server fills in itself: ClusterIPs, CRDs served at once, etc."""
        if rt.kind == "Service" and not rt.group:
            self._cluster_ip(obj, current)
        elif rt.kind == "Secret" and not rt.group and "stringData" in obj:
            obj["data"] = {
                **obj.get("data", {}),
                **{
                    k: base64.b64encode(v.encode()).decode()
                    for k, v in obj.pop("stringData").items()
                },
            }
        elif rt.kind == "Namespace":
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            terminating = obj["metadata"].get("deletionTimestamp")
            obj["status"] = {"phase": "Terminating" if terminating else "Active"}
        elif (rt.group, rt.plural) == (CRD_GROUP, CRD_PLURAL):
            types = crd_types(obj)
            spec = obj["spec"]
            self.registry.unregister(spec["group"], spec["names"]["plural"])
            self.registry.register(types)
            obj["status"] = {
                "acceptedNames": spec["names"],
                "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
                "conditions": [
                    {
                        "type": t,
                        "status": "True",
                        "reason": r,
                        "message": "",
                        "lastTransitionTime": obj["metadata"]["creationTimestamp"],
                    }
                    for t, r in (
                        ("NamesAccepted", "NoConflicts"),
                        ("Established", "InitialNamesAccepted"),
                    )
                ],
            }
