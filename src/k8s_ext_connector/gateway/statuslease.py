"""The gateway's report to the operator: its node's Lease (``core/gateway_status.py``).

Why a Lease: it is the API's object for "this holder is alive and says so every N
seconds", small, namespaced and cheap to update; the operator lists and watches the
connector namespace's Leases and folds each node's report (the source IPs its gateway
does not serve, with the reasons) into the status of the ExternalServices concerned. A
later liveness check can use the same renewals.

- ``report(unserved)`` is called after every apply (``GatewayAgent(on_failed=...)``); a
  change is written at once, and the Lease is renewed every ``interval`` seconds anyway.
- A write that fails (API down, 403, a conflict) is logged once per distinct problem and
  retried with backoff up to ``interval``; it never stops the gateway. On 401 the
  credentials are read again (a rotated service-account token).
- ``release()`` at a clean stop removes the holder and empties the report: a gateway that
  stopped serves nothing and reports nothing.

Calls: GET, then POST (create) or PUT (update) of that one Lease; RBAC in
``operator/rbac.py`` (``GATEWAY_NAMESPACE_RULES``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from k8s_ext_connector.core.errors import TransientError
from k8s_ext_connector.core.gateway_status import (
    RENEW_SECONDS,
    gateway_lease_name,
    lease_body,
    released_body,
)
from k8s_ext_connector.core.kube import (
    LEASES,
    ApiError,
    Conflict,
    KubeClient,
    NotFound,
    reconnected,
)

log = logging.getLogger(__name__)
BACKOFF_START = 0.5
RELEASE_TIMEOUT = 5.0


class StatusLease:
    def __init__(
        self,
        connect: Callable[[], KubeClient],
        namespace: str,
        node: str,
        interval: float = RENEW_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._connect = connect
        self._client = connect()
        self.namespace = namespace
        self.node = node
        self.name = gateway_lease_name(node)
        self._interval = interval
        self._clock = clock
        self._unserved: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._lease: dict[str, Any] | None = None  # as last written (or read): for the PUT
        self._acquired: datetime | None = None
        self.writes = 0  # successful writes (for tests and debugging)

    def __str__(self) -> str:
        return f"Lease {self.name} in namespace {self.namespace}"

    def report(self, unserved: Mapping[str, str]) -> None:
        """The source IPs not served now, with their reasons; a change is written at once."""
        if dict(unserved) != self._unserved:
            self._unserved = dict(unserved)
            self._changed.set()

    async def run(self) -> None:
        """Write now, then on every change and every interval, until cancelled."""
        problem, delay = "", BACKOFF_START
        while True:
            self._changed.clear()
            now = await self._attempt()
            if now != problem:
                if now:
                    log.warning("cannot write %s: %s; retrying", self, now)
                else:
                    log.info("reporting through %s", self)
                problem = now
            wait = self._interval if not now else min(delay, self._interval)
            delay = BACKOFF_START if not now else min(delay * 2, self._interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    async def _attempt(self) -> str:
        """One write; returns what went wrong ("" when it was written)."""
        try:
            await self._write()
        except Conflict:
            self._lease = None  # written by someone else meanwhile: read it again
            return f"{self} changed meanwhile (conflict)"
        except TransientError as error:
            return str(error)
        except ApiError as error:
            if error.status == 401:
                await self._reconnect()
            return " ".join(str(error).split())
        except Exception as error:  # never end the gateway over its report
            log.debug("writing %s failed", self, exc_info=True)
            return f"{type(error).__name__}: {error}"
        return ""

    async def _write(self) -> None:
        lease = self._lease
        if lease is None:
            try:
                lease = await self._client.get(LEASES, self.namespace, self.name)
            except NotFound:
                lease = None
        now = self._clock()
        body = lease_body(
            self.namespace,
            self.node,
            self._unserved,
            now,
            self._interval,
            lease,
            self._acquired,
        )
        if lease is None:
            written = await self._client.create(LEASES, self.namespace, body)
        else:
            body["metadata"]["resourceVersion"] = (lease.get("metadata") or {}).get(
                "resourceVersion"
            )
            written = await self._client.replace(LEASES, self.namespace, self.name, body)
        self._lease = written or body
        if self._acquired is None:
            self._acquired = now
        self.writes += 1

    async def release(self, timeout: float = RELEASE_TIMEOUT) -> None:
        """At a clean stop: no holder, nothing reported. Logged, never raised."""
        if self._acquired is None:
            return  # never written: nothing to release
        try:
            async with asyncio.timeout(timeout):
                lease = self._lease or await self._client.get(LEASES, self.namespace, self.name)
                try:
                    await self._client.replace(
                        LEASES, self.namespace, self.name, released_body(lease)
                    )
                except Conflict:
                    lease = await self._client.get(LEASES, self.namespace, self.name)
                    await self._client.replace(
                        LEASES, self.namespace, self.name, released_body(lease)
                    )
        except (TimeoutError, TransientError, ApiError) as error:
            log.warning("cannot release %s: %s", self, " ".join(str(error).split()))
            return
        log.info("released %s", self)

    async def close(self) -> None:
        await self._client.close()

    async def _reconnect(self) -> None:
        self._client = await reconnected(self._connect, self._client)
