"""What the operator observes, reduced to typed, frozen records.

The kopf indexes keep one record per watched object (``*_record`` functions), so a
reconcile reads the whole picture from memory: no list call per reconcile.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from k8s_ext_connector.core.api import ExternalService, ExternalServiceSpec, ServiceRef
from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.core.fields import canonical_ip
from k8s_ext_connector.core.gateway_status import (
    UNSERVED_ANNOTATION,
    decode_unserved,
    node_of_lease,
)
from k8s_ext_connector.core.sidecar_identity import SIDECAR_CONTAINER as SIDECAR_CONTAINER
from k8s_ext_connector.core.sidecar_identity import injected_sidecar

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "k8s-ext-connector"
PUBLIC_KEY_ANNOTATION = "ext-connector.submariner.io/public-key"
HOST_KEYS_ANNOTATION = "ext-connector.submariner.io/host-keys"


@dataclass(frozen=True)
class ExternalServiceRecord:
    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    deleting: bool
    spec: ExternalServiceSpec | None  # None when the spec is invalid
    invalid: str = ""  # the one-line reason when spec is None
    status: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> ServiceRef:
        return ServiceRef(self.namespace, self.name)

    @property
    def accepted(self) -> bool:
        """Whether the last status written says Accepted=True."""
        return any(
            isinstance(c, Mapping) and c.get("type") == "Accepted" and c.get("status") == "True"
            for c in self.status.get("conditions") or []
        )

    @property
    def parsed(self) -> ExternalService | None:
        return ExternalService(self.namespace, self.name, self.spec) if self.spec else None

    def refusal(self) -> str:
        """The operator's recorded refusal of this very spec (Accepted=False written for the
        current generation): its reason and message, or "" when there is none. A refusal of
        an older generation says nothing about the current spec."""
        for condition in self.status.get("conditions") or []:
            if not isinstance(condition, Mapping) or condition.get("type") != "Accepted":
                continue
            observed = condition.get("observedGeneration", self.status.get("observedGeneration"))
            if condition.get("status") == "False" and observed == self.generation:
                return f"{condition.get('reason', '')}: {condition.get('message', '')}"
        return ""


@dataclass(frozen=True)
class ServiceRecord:
    ref: ServiceRef
    cluster_ip: str | None
    selector: tuple[tuple[str, str], ...]
    ports: tuple[int, ...]
    labels: tuple[tuple[str, str], ...] = ()
    tcp_ports: tuple[int, ...] = ()  # what ingress relays (a UDP port is not a TCP one)


NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")


@dataclass(frozen=True)
class NodeRecord:
    name: str
    labels: tuple[tuple[str, str], ...]
    ready: bool
    # The node's own IPs (status.addresses InternalIP/ExternalIP), canonical text: no
    # sourceIP may be one of them.
    addresses: tuple[str, ...] = ()
    # What may dial a gateway's SSH port from this node (sshAllowFrom): its pods'
    # networks (spec.podCIDRs) and its InternalIPs (pods masqueraded to the node's address).
    pod_cidrs: tuple[str, ...] = ()
    internal_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class PodRecord:
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    has_sidecar: bool
    sidecar_ready: bool
    running: bool  # not Succeeded/Failed, not being deleted


@dataclass(frozen=True)
class ManagedConfigMap:
    namespace: str
    name: str
    data: tuple[tuple[str, str], ...]
    annotations: tuple[tuple[str, str], ...]
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GatewayLeaseRecord:
    """A gateway's report through its node's Lease (``core/gateway_status.py``)."""

    node: str
    held: bool  # a gateway runs on the node and reports (holderIdentity is the node)
    renew_time: str
    unserved: tuple[tuple[str, str], ...] = ()  # (sourceIP, reason): not served now
    problem: str = ""  # why the report could not be read ("" when it could)

    def unserved_reason(self, source_ip: str) -> str | None:
        """Why the gateway does not serve ``source_ip`` (None: it does, or it reports
        nothing: a released Lease belongs to a gateway that stopped cleanly)."""
        return dict(self.unserved).get(source_ip) if self.held else None


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def _pairs(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in value.items()))


def externalservice_record(body: Mapping[str, Any]) -> ExternalServiceRecord:
    meta = _meta(body)
    spec: ExternalServiceSpec | None = None
    invalid = ""
    try:
        spec = ExternalServiceSpec.from_dict(body.get("spec"))
    except ConfigError as error:
        invalid = str(error)
    status = body.get("status")
    return ExternalServiceRecord(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
        created=str(meta.get("creationTimestamp", "")),
        deleting=bool(meta.get("deletionTimestamp")),
        spec=spec,
        invalid=invalid,
        status=dict(status) if isinstance(status, Mapping) else {},
    )


def service_record(body: Mapping[str, Any]) -> ServiceRecord:
    meta = _meta(body)
    spec = body.get("spec") or {}
    cluster_ip = spec.get("clusterIP")
    listed = [p for p in spec.get("ports") or [] if isinstance(p, Mapping) and "port" in p]
    return ServiceRecord(
        ref=ServiceRef(str(meta.get("namespace", "")), str(meta.get("name", ""))),
        cluster_ip=cluster_ip if cluster_ip and cluster_ip != "None" else None,
        selector=_pairs(spec.get("selector")),
        ports=tuple(int(p["port"]) for p in listed),
        labels=_pairs(meta.get("labels")),
        tcp_ports=tuple(int(p["port"]) for p in listed if p.get("protocol", "TCP") == "TCP"),
    )


def _node_addresses(listed: object, types: tuple[str, ...] = NODE_ADDRESS_TYPES) -> tuple[str, ...]:
    found = set()
    for entry in listed if isinstance(listed, list) else []:
        if isinstance(entry, Mapping) and entry.get("type") in types:
            try:
                found.add(canonical_ip(str(entry.get("address", ""))))
            except ValueError:
                continue  # a malformed address is not one a sourceIP can equal
    return tuple(sorted(found))


def _pod_cidrs(spec: Mapping[str, Any]) -> tuple[str, ...]:
    listed = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    found = set()
    for cidr in listed if isinstance(listed, list) else []:
        try:
            found.add(str(ipaddress.ip_network(str(cidr), strict=False)))
        except ValueError:
            continue  # a malformed CIDR allows nothing
    return tuple(sorted(found))


def node_record(body: Mapping[str, Any]) -> NodeRecord:
    meta = _meta(body)
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
        if isinstance(c, Mapping)
    )
    return NodeRecord(
        name=str(meta.get("name", "")),
        labels=_pairs(meta.get("labels")),
        ready=ready,
        addresses=_node_addresses(status.get("addresses")),
        pod_cidrs=_pod_cidrs(spec if isinstance(spec, Mapping) else {}),
        internal_ips=_node_addresses(status.get("addresses"), ("InternalIP",)),
    )


def pod_record(body: Mapping[str, Any]) -> PodRecord:
    meta = _meta(body)
    status = body.get("status") or {}
    # Ours by shape and annotation, not by name alone (core/sidecar_identity.py).
    has_sidecar = injected_sidecar(body) is not None
    statuses = list(status.get("initContainerStatuses") or []) + list(
        status.get("containerStatuses") or []
    )
    sidecar_ready = has_sidecar and any(
        s.get("name") == SIDECAR_CONTAINER and s.get("ready") is True for s in statuses
    )
    return PodRecord(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        labels=_pairs(meta.get("labels")),
        has_sidecar=has_sidecar,
        sidecar_ready=sidecar_ready,
        running=status.get("phase") not in ("Succeeded", "Failed")
        and not meta.get("deletionTimestamp"),
    )


def configmap_record(body: Mapping[str, Any]) -> ManagedConfigMap:
    meta = _meta(body)
    return ManagedConfigMap(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        data=_pairs(body.get("data")),
        annotations=_pairs(meta.get("annotations")),
        labels=_pairs(meta.get("labels")),
    )


def gateway_lease_record(body: Mapping[str, Any]) -> GatewayLeaseRecord | None:
    """The report in a gateway Lease; None for a Lease that is not a gateway's."""
    meta = _meta(body)
    node = node_of_lease(str(meta.get("name", "")))
    if node is None:
        return None
    spec = body.get("spec") or {}
    spec = spec if isinstance(spec, Mapping) else {}
    annotations = meta.get("annotations") or {}
    annotations = annotations if isinstance(annotations, Mapping) else {}
    unserved, problem = decode_unserved(annotations.get(UNSERVED_ANNOTATION))
    return GatewayLeaseRecord(
        node=node,
        held=spec.get("holderIdentity") == node,
        renew_time=str(spec.get("renewTime") or ""),
        unserved=tuple(sorted(unserved.items())),
        problem=problem,
    )


def selects(selector: tuple[tuple[str, str], ...], labels: tuple[tuple[str, str], ...]) -> bool:
    """A Service selector matches a pod; an empty selector selects nothing (as for Services)."""
    return bool(selector) and set(selector) <= set(labels)
