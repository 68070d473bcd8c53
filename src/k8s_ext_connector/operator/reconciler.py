"""The applier: observe (kopf's in-memory indexes) -> compute (desired.py) -> diff -> apply.

One reconcile covers every ExternalService at once, because the gateway config and a
source service's sidecar config combine several of them. Changes are coalesced: any watch
event marks the world dirty and one pass runs shortly after. A pass writes only what
differs, so a rerun is a no-op. Transient API errors retry with backoff; an invalid spec
is a status, not an error, so it is never retried in a loop.

Writes fail one object at a time. A write the API server refuses for good (a 4xx: an
invalid object, a namespace being deleted, ...) is logged once, reported on the
ExternalServices that need that object (condition and Warning Event) and the pass goes on
with the others; it is tried again on the next pass (any change, or ``RECHECK`` seconds).

The operator never adopts an object it did not create. When a create meets an existing
object (409), a JSON patch whose only operation tests our managed-by label tells, without
reading the object, whether it is ours (the cache had not seen it yet: patch it) or not
(422: leave it untouched and report it). Secrets cannot be checked that way without being
read (a successful patch returns the object), so a Secret in the way is always reported
and never replaced.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
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
    Resource,
)
from k8s_ext_connector.core.planner import Problem
from k8s_ext_connector.operator.desired import (
    GATEWAY_CONFIGMAP,
    SOURCE_LABEL,
    KeyBook,
    ObjectRef,
    OperatorSettings,
    Snapshot,
    client_secret_name,
    compute,
    condition_events,
    foreign_object,
    foreign_secret,
    host_key_secret_name,
    managed_labels,
    sidecar_configmap_name,
    with_transition_times,
    write_rejected,
)
from k8s_ext_connector.operator.snapshot import (
    HOST_KEYS_ANNOTATION,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PUBLIC_KEY_ANNOTATION,
    ManagedConfigMap,
    ServiceRecord,
    service_record,
)

log = logging.getLogger(__name__)
DEBOUNCE = 0.05
BACKOFF_MAX = 30.0
RECHECK = 60.0  # refused writes are tried again after this long even if nothing changed
# RFC 6901 pointer to our managed-by label ("/" in a key is written "~1").
MANAGED_BY_POINTER = "/metadata/labels/" + MANAGED_BY_LABEL.replace("~", "~0").replace("/", "~1")


class Ownership(Enum):
    ABSENT = "absent"
    OURS = "ours"
    FOREIGN = "foreign"


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
    # Writes refused in the current pass, and what has been logged already (once each).
    _failures: dict[ObjectRef, Problem] = field(default_factory=dict)
    _logged: dict[ObjectRef, str] = field(default_factory=dict)
    _recheck: asyncio.TimerHandle | None = None

    def trigger(self) -> None:
        self._dirty.set()

    def _fail(self, ref: ObjectRef, problem: Problem) -> None:
        """Record a refused write for this pass's statuses; log it once, not every pass."""
        self._failures[ref] = problem
        if self._logged.get(ref) != str(problem):
            self._logged[ref] = str(problem)
            log.warning("%s: %s", problem.reason, problem)

    def _schedule_recheck(self) -> None:
        """Refused writes may be fixed by something no watch shows us (an unlabelled
        ConfigMap deleted): try again later, even if nothing we watch changes."""
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._failures:
            self._recheck = asyncio.get_running_loop().call_later(RECHECK, self.trigger)

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
                self._schedule_recheck()
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
        self._failures = {}
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
            observed_cms = {(cm.namespace, cm.name) for cm in configmaps}
            for service in desired.needs_client_keys:
                client_key = await self._issue_client_key(service, observed_cms)
                if client_key is not None:
                    self._issued_clients[service] = client_key
            for node in desired.needs_host_keys:
                host_key = await self._issue_host_key(node)
                if host_key is not None:
                    self._issued_hosts[node] = host_key
            keys = self._keybook(configmaps)
            desired = compute(snapshot, keys, self.settings)

        created = await self._apply_services(desired.services)
        if created:
            # New connector Services already have their ClusterIP in the create response:
            # plan with it now rather than publish a status that is stale on arrival.
            snapshot = replace(snapshot, services={**snapshot.services, **created})
            desired = compute(snapshot, keys, self.settings)
        await self._apply_configmaps(desired.configmaps, configmaps)
        statuses = desired.statuses
        if self._failures:  # refused writes show on the ExternalServices that need them
            statuses = compute(snapshot, keys, self.settings, self._failures).statuses
        await self._apply_statuses(snapshot, statuses)
        for ref in set(self._logged) - set(self._failures):
            del self._logged[ref]  # written (or no longer wanted): log it again if it recurs

    # ---- ownership ----------------------------------------------------------------------
    async def _ownership(self, resource: Resource, ref: ObjectRef) -> Ownership:
        """Whether a Service or ConfigMap is ours, without reading it (no ``get`` needed):
        a JSON patch of one ``test`` operation on our label changes nothing; the API
        server answers 422 when the test fails and 404 when there is no such object."""
        _, namespace, name = ref
        try:
            await self.client.json_patch(
                resource,
                namespace,
                name,
                [{"op": "test", "path": MANAGED_BY_POINTER, "value": MANAGED_BY}],
            )
        except NotFound:
            return Ownership.ABSENT
        except ApiError as error:
            if error.status == 422:
                return Ownership.FOREIGN
            raise
        return Ownership.OURS

    async def _create(
        self, resource: Resource, ref: ObjectRef, manifest: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, bool]:
        """Create ``ref``: (the created object or None, whether an object of ours already
        exists that the caller should patch). Refusals and foreign objects are recorded."""
        _, namespace, _ = ref
        try:
            return await self.client.create(resource, namespace, manifest), False
        except Conflict:
            pass
        except ApiError as error:
            self._fail(ref, write_rejected("create", ref, error))
            return None, False
        try:
            ownership = await self._ownership(resource, ref)
        except ApiError as error:
            self._fail(ref, write_rejected("check the labels of", ref, error))
            return None, False
        if ownership is Ownership.FOREIGN:
            self._fail(ref, foreign_object(ref))
        elif ownership is Ownership.ABSENT:
            self.trigger()  # gone meanwhile: the next pass creates it
        return None, ownership is Ownership.OURS

    async def _patch(self, resource: Resource, ref: ObjectRef, patch: dict[str, Any]) -> bool:
        _, namespace, name = ref
        try:
            await self.client.merge_patch(resource, namespace, name, patch)
        except NotFound:
            self.trigger()  # deleted since the cache saw it: the next pass creates it
            return False
        except ApiError as error:
            self._fail(ref, write_rejected("update", ref, error))
            return False
        return True

    async def _delete(self, resource: Resource, ref: ObjectRef) -> bool:
        _, namespace, name = ref
        try:
            await self.client.delete(resource, namespace, name)  # a 404 is success
        except ApiError as error:
            self._fail(ref, write_rejected("delete", ref, error))
            return False
        return True

    # ---- keys -------------------------------------------------------------------------
    async def _write_secret(self, ref: ObjectRef, private: bytes, labels: dict[str, str]) -> bool:
        """Create a key Secret; never replace one. The operator cannot read Secrets, so an
        existing one is someone else's as far as it can tell (it may be a leftover of a
        pass that died before recording its public key): reported, left untouched."""
        _, namespace, name = ref
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
            self._fail(ref, foreign_secret(ref))
            return False
        except ApiError as error:
            self._fail(ref, write_rejected("create", ref, error))
            return False
        return True

    async def _issue_client_key(
        self, service: ServiceRef, observed_cms: set[tuple[str, str]]
    ) -> str | None:
        """A new key for ``service`` in its Secret; None if the Secret or the ConfigMap
        that records the key cannot be ours (no key is issued into a slot we cannot use)."""
        cm: ObjectRef = ("ConfigMap", service.namespace, sidecar_configmap_name(service))
        if (service.namespace, cm[2]) not in observed_cms:
            try:
                ownership = await self._ownership(CONFIGMAPS, cm)
            except ApiError as error:
                self._fail(cm, write_rejected("check the labels of", cm, error))
                return None
            if ownership is Ownership.FOREIGN:
                self._fail(cm, foreign_object(cm))
                return None
        pair = generate_key_pair()
        secret: ObjectRef = ("Secret", service.namespace, client_secret_name(service))
        if not await self._write_secret(
            secret, pair.private_openssh, managed_labels(**{SOURCE_LABEL: service.name})
        ):
            return None
        log.info("issued client key for %s", service)
        return pair.public_openssh

    async def _issue_host_key(self, node: str) -> str | None:
        pair = generate_key_pair()
        secret: ObjectRef = (
            "Secret",
            self.settings.connector_namespace,
            host_key_secret_name(node),
        )
        if not await self._write_secret(secret, pair.private_openssh, managed_labels()):
            return None
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
            ref: ObjectRef = ("Service", namespace, name)
            current = observed.get((namespace, name))
            wanted_ports = tuple(p["port"] for p in manifest["spec"]["ports"])
            if current is None:
                body, ours = await self._create(SERVICES, ref, manifest)
                if body is not None:
                    record = service_record(body)
                    created[record.ref] = record
                    log.info("created Service %s/%s", namespace, name)
                if not ours:
                    continue
                # else ours, but not in the cache yet: patch it like any other
            elif current.ports == wanted_ports and set(
                manifest["metadata"]["labels"].items()
            ) <= set(current.labels):
                continue
            patch = {
                "metadata": {"labels": manifest["metadata"]["labels"]},
                "spec": {"ports": manifest["spec"]["ports"]},
            }
            if await self._patch(SERVICES, ref, patch):
                log.info("updated Service %s/%s", namespace, name)
        for namespace, name in sorted(set(observed) - set(desired)):
            if await self._delete(SERVICES, ("Service", namespace, name)):
                log.info("deleted Service %s/%s", namespace, name)
        return created

    async def _apply_configmaps(
        self,
        desired: Mapping[tuple[str, str], dict[str, Any]],
        observed_list: list[ManagedConfigMap],
    ) -> None:
        observed = {(cm.namespace, cm.name): cm for cm in observed_list}
        for (namespace, name), manifest in desired.items():
            ref: ObjectRef = ("ConfigMap", namespace, name)
            current = observed.get((namespace, name))
            data = manifest["data"]
            annotations = manifest["metadata"]["annotations"]
            if current is None:
                _, ours = await self._create(CONFIGMAPS, ref, manifest)
                if not ours:
                    continue
                # else ours, but not in the cache yet: patch it like any other
            elif dict(current.data) == data and set(annotations.items()) <= set(
                current.annotations
            ):
                continue
            removed = {k: None for k in dict(current.data) if k not in data} if current else {}
            patch = {
                "metadata": {
                    "labels": manifest["metadata"]["labels"],
                    "annotations": annotations,
                },
                "data": {**removed, **data},
            }
            await self._patch(CONFIGMAPS, ref, patch)
        for namespace, name in sorted(set(observed) - set(desired)):
            # The key first: while the ConfigMap stays, a failed delete is tried again.
            source = dict(observed[(namespace, name)].labels).get(SOURCE_LABEL)
            service = ServiceRef(namespace, source) if source else None
            if service is not None:
                secret: ObjectRef = ("Secret", namespace, client_secret_name(service))
                if not await self._delete(SECRETS, secret):
                    continue
                self._issued_clients.pop(service, None)
            if await self._delete(CONFIGMAPS, ("ConfigMap", namespace, name)) and service:
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
            except ApiError as error:  # nowhere to report it but the log; the others go on
                ref: ObjectRef = ("ExternalService", es.namespace, es.name)
                self._fail(ref, write_rejected("update the status of", ref, error))
                continue
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
