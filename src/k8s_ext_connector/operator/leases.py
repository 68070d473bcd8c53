"""The gateways' reports: a list + watch of the Leases in the connector namespace.

Why not a kopf index like the other resources: kopf watches every namespaced resource
across the cluster (the operator runs cluster-wide), which would need cluster-wide
``list``/``watch`` on Leases and bring every node heartbeat (kube-node-lease) to the
operator. This follows the connector namespace only, so its Role is namespaced
(``operator/rbac.py``, ``CONNECTOR_NAMESPACE_RULES``).

The reports only add conditions (``SourceIPNotServed``); nothing is created or deleted from
them, so reconciles do not wait for the first list: until then (or while the API refuses,
e.g. a chart without the Role) no gateway reports anything, which is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from k8s_ext_connector.core.errors import TransientError
from k8s_ext_connector.core.kube import LEASES, ApiError, KubeClient
from k8s_ext_connector.operator.snapshot import GatewayLeaseRecord, gateway_lease_record

log = logging.getLogger(__name__)
WATCH_SECONDS = 300
BACKOFF_START = 0.2
BACKOFF_MAX = 10.0


class GatewayLeases:
    """node -> its gateway's report, kept current by ``follow``."""

    def __init__(self) -> None:
        self._by_name: dict[str, GatewayLeaseRecord] = {}

    def records(self) -> dict[str, GatewayLeaseRecord]:
        return {r.node: r for r in self._by_name.values()}

    def replace(self, items: list[Mapping[str, Any]]) -> bool:
        before = dict(self._by_name)
        self._by_name = {}
        for item in items:
            self._put(item)
        return before != self._by_name

    def apply(self, event: Mapping[str, Any]) -> bool:
        """One watch event; whether a report changed."""
        obj = event.get("object")
        if not isinstance(obj, Mapping):
            return False
        name = str((obj.get("metadata") or {}).get("name", ""))
        before = self._by_name.get(name)
        if event.get("type") == "DELETED":
            self._by_name.pop(name, None)
        elif event.get("type") in ("ADDED", "MODIFIED"):
            self._put(obj)
        return self._by_name.get(name) != before

    def _put(self, obj: Mapping[str, Any]) -> None:
        record = gateway_lease_record(obj)
        if record is None:
            return
        if record.problem:
            log.warning("gateway Lease of node %s: %s; ignored", record.node, record.problem)
        name = str((obj.get("metadata") or {}).get("name", ""))
        self._by_name[name] = record


async def follow(
    leases: GatewayLeases,
    client: KubeClient,
    namespace: str,
    on_change: Callable[[], None],
) -> None:
    """List and watch the Leases of ``namespace`` until cancelled; ``on_change`` after any
    change of a gateway's report. Failures are logged once per kind and retried."""
    backoff, said = BACKOFF_START, ""

    async def pause(error: Exception) -> None:
        nonlocal backoff, said
        text = " ".join(str(error).split())
        if text != said:
            log.warning("gateway Leases in %s: %s; retrying", namespace, text)
            said = text
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)

    while True:
        try:
            listing = await client.list(LEASES, namespace)
        except (TransientError, ApiError) as error:
            await pause(error)
            continue
        items = [i for i in listing.get("items") or [] if isinstance(i, Mapping)]
        if leases.replace(items):
            on_change()
        version = str((listing.get("metadata") or {}).get("resourceVersion", ""))
        if said:
            log.info("gateway Leases in %s: listed again", namespace)
            said = ""
        backoff = BACKOFF_START
        loop = asyncio.get_running_loop()
        try:
            while True:
                started, seen = loop.time(), 0
                async with contextlib.aclosing(
                    client.watch(LEASES, version, WATCH_SECONDS, namespace=namespace)
                ) as events:
                    async for event in events:
                        seen += 1
                        if leases.apply(event):
                            on_change()
                        obj = event.get("object") or {}
                        version = str((obj.get("metadata") or {}).get("resourceVersion", version))
                if not seen and loop.time() - started < 1.0:
                    raise TransientError("the watch ended at once")
        except (TransientError, ApiError) as error:
            # Any failure (410 Gone included) lists again: the reports are few and small.
            await pause(error)
