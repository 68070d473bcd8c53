"""The applier: observe (kopf's in-memory indexes) -> compute (desired.py) -> diff -> apply.

One reconcile covers every ExternalService at once, because the gateway config and a
source service's sidecar config combine several of them. Changes are coalesced: any watch
event marks the world dirty and one pass runs shortly after. A pass writes only what
differs, so a rerun is a no-op. Transient API errors retry with backoff; an invalid spec
is a status, not an error, so it is never retried in a loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from k8s_ext_connector.certs.ssh import generate_key_pair
from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.core.errors import TransientError
from k8s_ext_connector.core.kube import (
    CONFIGMAPS,
    EVENTS,
    EXTERNALSERVICES,
    SECRETS,
    SERVICES,
    ApiError,
    Conflict,
    KubeClient,
    NotFound,
)
from k8s_ext_connector.operator.desired import (
    GATEWAY_CONFIGMAP,
    SOURCE_LABEL,
    KeyBook,
    OperatorSettings,
    Snapshot,
    client_secret_name,
    compute,
    condition_events,
    host_key_secret_name,
    managed_labels,
    with_transition_times,
)
from k8s_ext_connector.operator.snapshot import (
    HOST_KEYS_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
    ManagedConfigMap,
    ServiceRecord,
    service_record,
)

log = logging.getLogger(__name__)
DEBOUNCE = 0.05
BACKOFF_MAX = 30.0


@dataclass
class Observed:
    """Live views the kopf indexes fill; read at the start of each pass."""

    snapshot: Callable[[], Snapshot]
    configmaps: Callable[[], list[ManagedConfigMap]]
    managed_services: Callable[[], list[ServiceRecord]]


@dataclass
class Reconciler:
    client: KubeClient
    settings: OperatorSettings
    observed: Observed
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)
    _passes: int = 0
    _issued_clients: dict[ServiceRef, str] = field(default_factory=dict)
    _issued_hosts: dict[str, str] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def trigger(self) -> None:
        self._dirty.set()

    @property
    def passes(self) -> int:
        return self._passes

    async def run(self) -> None:
        backoff = 0.5
        while True:
            await self._dirty.wait()
            await asyncio.sleep(DEBOUNCE)
            self._dirty.clear()
            try:
                await self.reconcile_exclusive()
                backoff = 0.5
            except (TransientError, ApiError) as error:
                log.warning("reconcile failed, retrying in %.1fs: %s", backoff, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                self._dirty.set()

    def _keybook(self, configmaps: list[ManagedConfigMap]) -> KeyBook:
        """Public keys on record in our ConfigMaps, plus those issued but not yet seen there."""
        clients: dict[ServiceRef, str] = {}
        hosts: dict[str, str] = {}
        for cm in configmaps:
            annotations = dict(cm.annotations)
            source = dict(cm.labels).get(SOURCE_LABEL)
            if source and PUBLIC_KEY_ANNOTATION in annotations:
                clients[ServiceRef(cm.namespace, source)] = annotations[PUBLIC_KEY_ANNOTATION]
            if cm.name == GATEWAY_CONFIGMAP and cm.namespace == self.settings.connector_namespace:
                hosts.update(json.loads(annotations.get(HOST_KEYS_ANNOTATION) or "{}"))
        for service, key in list(self._issued_clients.items()):
            if clients.get(service) == key:
                del self._issued_clients[service]  # on record now
        for node, key in list(self._issued_hosts.items()):
            if hosts.get(node) == key:
                del self._issued_hosts[node]
        clients.update(self._issued_clients)
        hosts.update(self._issued_hosts)
        return KeyBook(clients=clients, hosts=hosts)

    async def reconcile_exclusive(self, deleting: ServiceRef | None = None) -> None:
        """One pass at a time; ``deleting`` is treated as gone (its finalizer holds it)."""
        async with self._lock:
            await self.reconcile_once(deleting)

    async def reconcile_once(self, deleting: ServiceRef | None = None) -> None:
        self._passes += 1
        log.debug("reconcile pass %d", self._passes)
        snapshot = self.observed.snapshot()
        if deleting is not None:
            snapshot = replace(
                snapshot,
                externalservices=[es for es in snapshot.externalservices if es.ref != deleting],
            )
        configmaps = self.observed.configmaps()
        keys = self._keybook(configmaps)
        desired = compute(snapshot, keys, self.settings)
        if desired.needs_client_keys or desired.needs_host_keys:
            for service in desired.needs_client_keys:
                self._issued_clients[service] = await self._issue_client_key(service)
            for node in desired.needs_host_keys:
                self._issued_hosts[node] = await self._issue_host_key(node)
            keys = self._keybook(configmaps)
            desired = compute(snapshot, keys, self.settings)

        created = await self._apply_services(desired.services)
        if created:
            # New connector Services already have their ClusterIP in the create response:
            # plan with it now rather than publish a status that is stale on arrival.
            snapshot = replace(snapshot, services={**snapshot.services, **created})
            desired = compute(snapshot, keys, self.settings)
        await self._apply_configmaps(desired.configmaps, configmaps)
        await self._apply_statuses(snapshot, desired.statuses)

    # ---- keys -------------------------------------------------------------------------
    async def _write_secret(
        self, namespace: str, name: str, private: bytes, labels: dict[str, str]
    ) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/ssh-auth",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "data": {"ssh-privatekey": base64.b64encode(private).decode()},
        }
        try:
            await self.client.create(SECRETS, namespace, body)
        except Conflict:
            # A leftover from a pass that died before recording its public key: we cannot
            # (and need not) read it, so replace it with the key we are about to record.
            await self.client.replace(SECRETS, namespace, name, body)

    async def _issue_client_key(self, service: ServiceRef) -> str:
        pair = generate_key_pair()
        await self._write_secret(
            service.namespace,
            client_secret_name(service),
            pair.private_openssh,
            managed_labels(**{SOURCE_LABEL: service.name}),
        )
        log.info("issued client key for %s", service)
        return pair.public_openssh

    async def _issue_host_key(self, node: str) -> str:
        pair = generate_key_pair()
        await self._write_secret(
            self.settings.connector_namespace,
            host_key_secret_name(node),
            pair.private_openssh,
            managed_labels(),
        )
        log.info("issued gateway host key for node %s", node)
        return pair.public_openssh

    # ---- owned objects ------------------------------------------------------------------
    async def _apply_services(
        self, desired: Mapping[tuple[str, str], dict[str, Any]]
    ) -> dict[ServiceRef, ServiceRecord]:
        """Create/patch/delete connector Services; returns the records of those created."""
        created: dict[ServiceRef, ServiceRecord] = {}
        observed = {(s.ref.namespace, s.ref.name): s for s in self.observed.managed_services()}
        for (namespace, name), manifest in desired.items():
            current = observed.get((namespace, name))
            wanted_ports = tuple(p["port"] for p in manifest["spec"]["ports"])
            if current is None:
                try:
                    body = await self.client.create(SERVICES, namespace, manifest)
                    record = service_record(body)
                    created[record.ref] = record
                    log.info("created Service %s/%s", namespace, name)
                    continue
                except Conflict:
                    pass  # exists but not yet in our cache (or lost its label): patch it
            elif current.ports == wanted_ports and set(
                manifest["metadata"]["labels"].items()
            ) <= set(current.labels):
                continue
            await self.client.merge_patch(
                SERVICES,
                namespace,
                name,
                {
                    "metadata": {"labels": manifest["metadata"]["labels"]},
                    "spec": {"ports": manifest["spec"]["ports"]},
                },
            )
            log.info("updated Service %s/%s", namespace, name)
        for key in sorted(set(observed) - set(desired)):
            await self.client.delete(SERVICES, *key)
            log.info("deleted Service %s/%s", *key)
        return created

    async def _apply_configmaps(
        self,
        desired: Mapping[tuple[str, str], dict[str, Any]],
        observed_list: list[ManagedConfigMap],
    ) -> None:
        observed = {(cm.namespace, cm.name): cm for cm in observed_list}
        for (namespace, name), manifest in desired.items():
            current = observed.get((namespace, name))
            data = manifest["data"]
            annotations = manifest["metadata"]["annotations"]
            if current is None:
                try:
                    await self.client.create(CONFIGMAPS, namespace, manifest)
                    continue
                except Conflict:
                    pass
            elif dict(current.data) == data and set(annotations.items()) <= set(
                current.annotations
            ):
                continue
            removed = {k: None for k in dict(current.data) if k not in data} if current else {}
            await self.client.merge_patch(
                CONFIGMAPS,
                namespace,
                name,
                {
                    "metadata": {
                        "labels": manifest["metadata"]["labels"],
                        "annotations": annotations,
                    },
                    "data": {**removed, **data},
                },
            )
        for namespace, name in sorted(set(observed) - set(desired)):
            await self.client.delete(CONFIGMAPS, namespace, name)
            source = dict(observed[(namespace, name)].labels).get(SOURCE_LABEL)
            if source:
                service = ServiceRef(namespace, source)
                await self.client.delete(SECRETS, namespace, client_secret_name(service))
                self._issued_clients.pop(service, None)
                log.info("removed config and key of %s (no ExternalService uses it)", service)

    # ---- status and events ------------------------------------------------------------
    async def _apply_statuses(
        self, snapshot: Snapshot, statuses: Mapping[ServiceRef, dict[str, Any]]
    ) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for es in snapshot.externalservices:
            status = statuses.get(es.ref)
            if status is None:
                continue
            old_conditions = list(es.status.get("conditions") or [])
            conditions = with_transition_times(status["conditions"], old_conditions, now)
            new_status = {**status, "conditions": conditions}
            if _same_status(new_status, es.status):
                continue
            try:
                await self.client.merge_patch(
                    EXTERNALSERVICES,
                    es.namespace,
                    es.name,
                    {"status": new_status},
                    subresource="status",
                )
            except NotFound:
                continue  # deleted meanwhile
            for kind, reason, message in condition_events(status["conditions"], old_conditions):
                await self._event(es.namespace, es.name, es.uid, kind, reason, message)

    async def _event(
        self, namespace: str, name: str, uid: str, kind: str, reason: str, message: str
    ) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": EXTERNALSERVICES.api_version,
                "kind": "ExternalService",
                "name": name,
                "namespace": namespace,
                "uid": uid,
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "k8s-ext-connector-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": "k8s-ext-connector-operator",
        }
        try:
            await self.client.create(EVENTS, namespace, body)
        except ApiError as error:
            log.warning("could not post event %s on %s/%s: %s", reason, namespace, name, error)


def _same_status(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    def strip(status: Mapping[str, Any]) -> dict[str, Any]:
        conditions = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in status.get("conditions") or []
            if isinstance(c, Mapping)
        ]
        return {**status, "conditions": conditions}

    return strip(new) == strip(old)
