"""The webhook's watch cache: which Services are sources, and what they select.

Admission must answer in milliseconds and never list per request, so the answer comes
from memory. ``SourceCache`` is the pure, synchronous state (Services by namespace and
name with their selectors; the source ServiceRefs of every non-deleting ExternalService
that the operator does not refuse, ``injection_refusal``); ``follow`` fills it by list +
watch through ``KubeClient``:

- one list per resource, then a watch from the list's resourceVersion; the cache is
  ``ready`` only once both initial lists are in;
- a watch that ends (server timeout) resumes from the last resourceVersion seen
  (bookmarks included); a connection failure resumes the same way after a backoff
  (0.1 s doubling to 10 s); 410 Gone (the resourceVersion is too old) lists again and
  replaces that resource's state wholesale, so nothing deleted meanwhile lingers.

Only the event loop that runs ``follow`` touches the cache, so no locking is needed; the
server reads it from the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.core.errors import TransientError
from k8s_ext_connector.core.kube import EXTERNALSERVICES, SERVICES, ApiError, Resource
from k8s_ext_connector.core.planner import spec_problems
from k8s_ext_connector.operator.snapshot import ExternalServiceRecord, externalservice_record
from k8s_ext_connector.webhook.inject import sources_selecting

log = logging.getLogger(__name__)
Obj = Mapping[str, Any]


class SourceIndex(Protocol):
    """What the admission path needs from a cache (the server takes any such object)."""

    @property
    def ready(self) -> bool: ...

    def sources_for(self, pod: Obj) -> tuple[ServiceRef, ...]: ...


class ListWatchClient(Protocol):
    """The two ``KubeClient`` calls the cache makes (tests pass fakes)."""

    async def list(
        self, resource: Resource, namespace: str | None = None, label_selector: str | None = None
    ) -> dict[str, Any]: ...

    def watch(
        self, resource: Resource, resource_version: str, timeout_seconds: int
    ) -> AsyncGenerator[dict[str, Any], None]: ...


def _key(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _selector(obj: Obj) -> dict[str, str]:
    selector = (obj.get("spec") or {}).get("selector")
    if not isinstance(selector, Mapping):
        return {}
    return {str(k): str(v) for k, v in selector.items()}


def injection_refusal(record: ExternalServiceRecord, own_namespace_sources: bool) -> str:
    """Why the pods of ``record``'s sources must not get the sidecar, or "".

    The webhook injects only what the operator serves, or a pod would wait forever for a
    config and key that never come (and whoever may write an ExternalService could stall
    another tenant's pods). Two sources, so that neither a fresh ExternalService nor one
    the operator has not seen yet is decided on a guess: the same spec checks as the
    operator (``planner.spec_problems``, with the same own-namespace setting; node
    addresses are the operator's to know), and the operator's recorded refusal of this
    generation (``Accepted=False``), which covers whatever else it refuses.
    """
    parsed = record.parsed
    if parsed is None:
        return record.invalid or "invalid spec"
    problems = spec_problems(parsed, {}, own_namespace_sources)
    if problems:
        return "; ".join(f"{p.reason}: {p}" for p in problems)
    return record.refusal()


def _sources(obj: Obj, own_namespace_sources: bool) -> frozenset[ServiceRef]:
    """The source services of an acceptable ExternalService that is not being deleted."""
    try:
        record = externalservice_record(obj)
    except (ValueError, TypeError, AttributeError) as error:  # not what an API server sends
        log.warning("ignoring a malformed ExternalService %s: %s", _key(obj), error)
        return frozenset()
    if record.deleting:
        return frozenset()
    refusal = injection_refusal(record, own_namespace_sources)
    if refusal:
        log.info("ExternalService %s: no injection for its sources: %s", record.ref, refusal)
        return frozenset()
    assert record.spec is not None
    return frozenset(source.service for source in record.spec.sources)


class SourceCache:
    """Services and ExternalService sources in memory; ``sources_for`` is the fast path."""

    def __init__(self, own_namespace_sources: bool = False) -> None:
        # The operator's --own-namespace-sources: sources elsewhere are never injected.
        self._own_namespace_sources = own_namespace_sources
        # namespace -> name -> selector (Services without a selector select nothing)
        self._services: dict[str, dict[str, dict[str, str]]] = {}
        # ExternalService (namespace, name) -> its source services
        self._externalservices: dict[tuple[str, str], frozenset[ServiceRef]] = {}
        # namespace -> source service name -> how many ExternalServices name it
        self._sources: dict[str, dict[str, int]] = {}
        # namespace -> the (source service, selector) pairs to match, built on first use
        self._candidates: dict[str, list[tuple[ServiceRef, Mapping[str, str]]]] = {}
        self._synced: set[str] = set()

    # -- reading (the admission path) ---------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the initial lists of Services and ExternalServices are in."""
        return {"services", "externalservices"} <= self._synced

    def sources_for(self, pod: Obj) -> tuple[ServiceRef, ...]:
        """The source services (of some valid ExternalService) that select ``pod``."""
        meta = pod.get("metadata") or {}
        namespace = str(meta.get("namespace", ""))
        labels = meta.get("labels") or {}
        if namespace not in self._sources or not isinstance(labels, Mapping):
            return ()
        candidates = self._candidates.get(namespace)
        if candidates is None:
            services = self._services.get(namespace, {})
            candidates = [
                (ServiceRef(namespace, name), services[name])
                for name in sorted(self._sources[namespace])
                if services.get(name)
            ]
            self._candidates[namespace] = candidates
        if not candidates:
            return ()
        return sources_selecting({str(k): str(v) for k, v in labels.items()}, namespace, candidates)

    def counts(self) -> tuple[int, int]:
        """(Services, ExternalServices) held, for metrics and logs."""
        return sum(len(v) for v in self._services.values()), len(self._externalservices)

    # -- writing (the watch) ------------------------------------------------------------

    def mark_synced(self, kind: str) -> None:
        self._synced.add(kind)

    def replace_services(self, items: Iterable[Obj]) -> None:
        self._services, self._candidates = {}, {}
        for item in items:
            self.put_service(item)

    def put_service(self, obj: Obj) -> None:
        namespace, name = _key(obj)
        self._services.setdefault(namespace, {})[name] = _selector(obj)
        self._candidates.pop(namespace, None)

    def delete_service(self, obj: Obj) -> None:
        namespace, name = _key(obj)
        names = self._services.get(namespace, {})
        names.pop(name, None)
        if not names:
            self._services.pop(namespace, None)
        self._candidates.pop(namespace, None)

    def replace_externalservices(self, items: Iterable[Obj]) -> None:
        self._externalservices, self._sources, self._candidates = {}, {}, {}
        for item in items:
            self.put_externalservice(item)

    def put_externalservice(self, obj: Obj) -> None:
        key = _key(obj)
        self._count(self._externalservices.pop(key, frozenset()), -1)
        sources = _sources(obj, self._own_namespace_sources)
        if sources:
            self._externalservices[key] = sources
            self._count(sources, +1)

    def delete_externalservice(self, obj: Obj) -> None:
        self._count(self._externalservices.pop(_key(obj), frozenset()), -1)

    def _count(self, refs: Iterable[ServiceRef], delta: int) -> None:
        for ref in refs:
            self._candidates.pop(ref.namespace, None)
            names = self._sources.setdefault(ref.namespace, {})
            names[ref.name] = names.get(ref.name, 0) + delta
            if names[ref.name] <= 0:
                del names[ref.name]
            if not names:
                del self._sources[ref.namespace]


@dataclass(frozen=True)
class _Feed:
    """How one resource's list and events reach the cache."""

    kind: str
    resource: Resource
    replace: Callable[[list[Obj]], None]
    put: Callable[[Obj], None]
    delete: Callable[[Obj], None]


@dataclass(frozen=True)
class WatchSettings:
    timeout_seconds: int = 300  # the server ends each watch after this; we resume
    backoff_initial: float = 0.1
    backoff_max: float = 10.0


async def follow(
    cache: SourceCache, client: ListWatchClient, settings: WatchSettings = WatchSettings()
) -> None:
    """Fill ``cache`` by list + watch of Services and ExternalServices until cancelled."""
    feeds = [
        _Feed(
            "services",
            SERVICES,
            cache.replace_services,
            cache.put_service,
            cache.delete_service,
        ),
        _Feed(
            "externalservices",
            EXTERNALSERVICES,
            cache.replace_externalservices,
            cache.put_externalservice,
            cache.delete_externalservice,
        ),
    ]
    async with asyncio.TaskGroup() as group:
        for feed in feeds:
            group.create_task(_reflect(feed, cache, client, settings), name=f"watch-{feed.kind}")


async def _reflect(
    feed: _Feed, cache: SourceCache, client: ListWatchClient, settings: WatchSettings
) -> None:
    """List and watch one resource until cancelled. Anything unexpected (a bug, a malformed
    object) is logged with its traceback and answered with a fresh list after a backoff:
    the cache must never silently stop following the cluster."""
    while True:
        try:
            await _list_and_watch(feed, cache, client, settings)
        except Exception:
            log.exception("%s: unexpected failure; listing again", feed.kind)
            await asyncio.sleep(settings.backoff_max)


async def _list_and_watch(
    feed: _Feed, cache: SourceCache, client: ListWatchClient, settings: WatchSettings
) -> None:
    backoff = settings.backoff_initial

    async def pause(error: Exception) -> None:
        nonlocal backoff
        log.warning("%s: %s; retrying in %.1fs", feed.kind, error, backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, settings.backoff_max)

    while True:  # list (until it works), then watch until 410 Gone
        try:
            listing = await client.list(feed.resource)
            break
        except (TransientError, ApiError) as error:
            await pause(error)
    items = [i for i in listing.get("items") or [] if isinstance(i, Mapping)]
    feed.replace(items)
    cache.mark_synced(feed.kind)
    version = str((listing.get("metadata") or {}).get("resourceVersion", ""))
    log.info("%s: listed %d at resourceVersion %s", feed.kind, len(items), version)
    backoff = settings.backoff_initial
    loop = asyncio.get_running_loop()
    while True:
        started, seen = loop.time(), 0
        try:
            async with contextlib.aclosing(
                client.watch(feed.resource, version, settings.timeout_seconds)
            ) as events:
                async for event in events:
                    version = _apply(feed, event) or version
                    seen += 1
                    backoff = settings.backoff_initial
            if not seen and loop.time() - started < 1.0:  # a server ending every watch
                await pause(TransientError("watch ended at once"))
        except ApiError as error:
            if error.status == 410:
                log.info("%s: resourceVersion %s expired; listing again", feed.kind, version)
                return
            await pause(error)
        except TransientError as error:
            await pause(error)


def _apply(feed: _Feed, event: Mapping[str, Any]) -> str | None:
    """Apply one watch event; returns the resourceVersion it carries."""
    obj = event.get("object")
    if not isinstance(obj, Mapping):
        return None
    kind = event.get("type")
    if kind in ("ADDED", "MODIFIED"):
        feed.put(obj)
    elif kind == "DELETED":
        feed.delete(obj)
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None
