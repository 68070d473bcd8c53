"""Leader election on a coordination.k8s.io Lease, so two replicas never fight.

Only the leader runs kopf. The decision is a pure function of the Lease and the clock;
the loop around it renews every ``RENEW`` seconds and, if it cannot renew before the
lease would expire, stops the operator (the process exits and is restarted as a
candidate) rather than risk two writers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from k8s_ext_connector.core.errors import TransientError
from k8s_ext_connector.core.kube import LEASES, ApiError, Conflict, KubeClient, NotFound

log = logging.getLogger(__name__)
LEASE_NAME = "k8s-ext-connector-operator"
DURATION = 15  # seconds a lease is valid without renewal
RENEW = 5
FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

Decision = Literal["acquire", "renew", "wait"]


def decide(spec: Mapping[str, Any] | None, identity: str, now: datetime) -> Decision:
    if not spec or not spec.get("holderIdentity"):
        return "acquire"
    if spec["holderIdentity"] == identity:
        return "renew"
    renewed = spec.get("renewTime")
    duration = int(spec.get("leaseDurationSeconds") or DURATION)
    if not renewed:
        return "acquire"
    expires = datetime.strptime(renewed, FORMAT).replace(tzinfo=UTC) + timedelta(seconds=duration)
    return "acquire" if now >= expires else "wait"


def lease_spec(
    identity: str, now: datetime, previous: Mapping[str, Any] | None, decision: Decision
) -> dict[str, Any]:
    stamp = now.strftime(FORMAT)
    spec: dict[str, Any] = {
        "holderIdentity": identity,
        "leaseDurationSeconds": DURATION,
        "renewTime": stamp,
        "acquireTime": (previous or {}).get("acquireTime", stamp) if decision == "renew" else stamp,
    }
    if decision == "acquire":
        spec["leaseTransitions"] = int((previous or {}).get("leaseTransitions") or 0) + 1
    return spec


class LeaderElector:
    def __init__(self, client: KubeClient, namespace: str, identity: str) -> None:
        self._client = client
        self._namespace = namespace
        self.identity = identity

    async def _attempt(self) -> bool:
        now = datetime.now(UTC)
        try:
            lease = await self._client.get(LEASES, self._namespace, LEASE_NAME)
        except NotFound:
            lease = None
        spec = (lease or {}).get("spec")
        decision = decide(spec, self.identity, now)
        if decision == "wait":
            return False
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEASE_NAME, "namespace": self._namespace},
            "spec": lease_spec(self.identity, now, spec, decision),
        }
        try:
            if lease is None:
                await self._client.create(LEASES, self._namespace, body)
            else:
                body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
                await self._client.replace(LEASES, self._namespace, LEASE_NAME, body)
        except Conflict:
            return False  # someone else won this round
        return True

    async def acquire(self) -> None:
        while True:
            try:
                if await self._attempt():
                    log.info("leading as %s", self.identity)
                    return
            except (TransientError, ApiError) as error:
                log.warning("lease: %s", error)
            await asyncio.sleep(RENEW)

    async def hold(self) -> None:
        """Renew until leadership cannot be confirmed in time; then return."""
        last = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(RENEW)
            try:
                if await self._attempt():
                    last = asyncio.get_running_loop().time()
                    continue
                log.error("lease taken over by another replica")
                return
            except (TransientError, ApiError) as error:
                log.warning("lease renewal failed: %s", error)
            if asyncio.get_running_loop().time() - last > DURATION - RENEW:
                log.error("could not renew the lease in time; stepping down")
                return
