"""The operator's pure core: observed snapshot + keys -> every object it should own, and
the status of every ExternalService.

Objects owned (all labelled ``app.kubernetes.io/managed-by=k8s-ext-connector``):

- per ExternalService: a selector-less ClusterIP Service ``<name>`` in the connector
  namespace exposing the spec's ports (clients resolve ``<name>.<connector ns>``);
- per source Service: ConfigMap ``ext-connector-<service>`` in its namespace with
  ``sidecar.yaml`` (what the injected sidecar mounts) and the client public key as an
  annotation (the record of which key was issued; the operator never reads Secrets back);
- one ConfigMap ``ext-connector-gateway`` in the connector namespace with ``<node>.yaml``
  per eligible gateway node, and the nodes' public host keys as an annotation.

Private keys are not part of this module: the reconciler issues them into Secrets.

An ExternalService whose name cannot name a Service (``InvalidName``), whose name another
one already uses (``NameConflict``), or whose connector Service slot is taken by a Service
we did not create (``ForeignObject``) gets no Service and is left out of the plan. Writes
the API server refused (``failures``, filled in by the reconciler) are reported on the
ExternalServices that own the object.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from k8s_ext_connector.core.api import GATEWAY_NODE_LABEL, ServiceRef
from k8s_ext_connector.core.config import (
    GatewayConfig,
    SidecarConfig,
    SourceIPConfig,
    dump,
    unique_networks,
)
from k8s_ext_connector.core.gateway_status import (  # re-exported: its old home
    host_key_secret_name as host_key_secret_name,
)
from k8s_ext_connector.core.planner import (
    INVALID_NAME,
    ClusterFacts,
    KeyMaterial,
    PlanOptions,
    Problem,
    SourceServiceFacts,
    name_problem,
    plan,
    spec_problems,
)
from k8s_ext_connector.operator.assign import assign_gateways, eligible_nodes
from k8s_ext_connector.operator.snapshot import (
    HOST_KEYS_ANNOTATION,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PUBLIC_KEY_ANNOTATION,
    ExternalServiceRecord,
    GatewayLeaseRecord,
    NodeRecord,
    PodRecord,
    ServiceRecord,
    selects,
)

GATEWAY_CONFIGMAP = "ext-connector-gateway"
EXTERNALSERVICE_LABEL = "ext-connector.submariner.io/externalservice"
SOURCE_LABEL = "ext-connector.submariner.io/source-service"
MAX_PODS_NAMED = 5
MAX_LABEL_VALUE = 63

# Reasons of problems with the objects the operator writes (not with the spec itself).
FOREIGN_OBJECT = "ForeignObject"
WRITE_REJECTED = "WriteRejected"
# A gateway reports (through its Lease) that it does not serve a source IP assigned to it.
SOURCE_IP_NOT_SERVED = "SourceIPNotServed"

# (kind, namespace, name) of an object the operator writes, e.g. ("Service", ns, name).
ObjectRef = tuple[str, str, str]


@dataclass(frozen=True)
class OperatorSettings:
    connector_namespace: str = "external-services"
    gateway_label: tuple[str, str] = GATEWAY_NODE_LABEL
    ssh_port: int = 2022
    listen_port: int = 15001
    intercept_target: bool = True
    own_namespace_sources: bool = False  # planner.PlanOptions.own_namespace_sources
    # Extra networks allowed to the gateways' SSH port (chart gateway.sshAllowFrom), for
    # clusters whose Nodes carry no podCIDRs (e.g. Calico IPAM); see ssh_allow_from.
    ssh_allow_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    externalservices: Sequence[ExternalServiceRecord]  # oldest first: earlier claims win
    services: Mapping[ServiceRef, ServiceRecord]
    nodes: Sequence[NodeRecord]
    pods: Sequence[PodRecord]
    # node -> its gateway's report (the gateway Leases in the connector namespace)
    gateway_leases: Mapping[str, GatewayLeaseRecord] = field(default_factory=dict)

    @cached_property
    def _pods_by_namespace(self) -> dict[str, list[PodRecord]]:
        by_namespace: dict[str, list[PodRecord]] = {}
        for pod in self.pods:
            by_namespace.setdefault(pod.namespace, []).append(pod)
        return by_namespace

    def pods_in(self, namespace: str) -> list[PodRecord]:
        return self._pods_by_namespace.get(namespace, [])


@dataclass(frozen=True)
class KeyBook:
    """Public keys issued so far (from the ConfigMaps that record them)."""

    clients: Mapping[ServiceRef, str] = field(default_factory=dict)
    hosts: Mapping[str, str] = field(default_factory=dict)  # node -> host public key


def sidecar_configmap_name(service: ServiceRef) -> str:
    return f"ext-connector-{service.name}"


def client_secret_name(service: ServiceRef) -> str:
    return f"ext-connector-{service.name}-key"


def managed_labels(**extra: str) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGED_BY, **extra}


def externalservice_label(es: ServiceRef) -> str:
    """``<namespace>.<name>`` of the ExternalService a connector Service serves, as a label
    value: at most 63 characters, so a long pair is cut and made unique by a hash (the
    API server would refuse the whole Service otherwise)."""
    value = f"{es.namespace}.{es.name}"
    if len(value) <= MAX_LABEL_VALUE:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{value[: MAX_LABEL_VALUE - len(digest) - 1]}-{digest}"


def foreign_object(ref: ObjectRef) -> Problem:
    """A Service or ConfigMap in our slot without our label: never adopted or overwritten."""
    kind, namespace, name = ref
    fix = (
        "delete it or give this ExternalService another name"
        if kind == "Service"
        else "delete or rename it (names starting with ext-connector- are the operator's)"
    )
    return Problem(
        FOREIGN_OBJECT,
        f"{kind} {namespace}/{name} exists but is not managed by k8s-ext-connector (no label "
        f"{MANAGED_BY_LABEL}={MANAGED_BY}); the operator left it untouched: {fix}",
    )


def foreign_secret(ref: ObjectRef) -> Problem:
    """A Secret in our slot that this operator did not just create: it cannot read it."""
    kind, namespace, name = ref
    return Problem(
        FOREIGN_OBJECT,
        f"{kind} {namespace}/{name} already exists; the operator never reads Secrets, so it "
        "cannot tell who made it and left it untouched: without the label "
        f"{MANAGED_BY_LABEL}={MANAGED_BY} it is someone else's (delete or rename it); with "
        "it, it is a leftover of an interrupted key issue (delete it and a new key is issued)",
    )


def write_rejected(verb: str, ref: ObjectRef, error: object) -> Problem:
    """A write the API server refused for good (a 4xx): retried when something changes."""
    kind, namespace, name = ref
    return Problem(
        WRITE_REJECTED, f"the API server refused to {verb} {kind} {namespace}/{name}: {error}"
    )


@dataclass(frozen=True)
class Desired:
    services: Mapping[tuple[str, str], dict[str, Any]]  # (namespace, name) -> manifest
    configmaps: Mapping[tuple[str, str], dict[str, Any]]
    statuses: Mapping[ServiceRef, dict[str, Any]]  # ExternalService -> status (no timestamps)
    assignment: Mapping[str, str | None]
    needs_client_keys: tuple[ServiceRef, ...]
    needs_host_keys: tuple[str, ...]


def active(snapshot: Snapshot) -> list[ExternalServiceRecord]:
    return [es for es in snapshot.externalservices if not es.deleting]


def referenced_services(
    snapshot: Snapshot, refused: Set[ServiceRef] = frozenset()
) -> list[ServiceRef]:
    """Source services of valid, live ExternalServices that exist: they need a client key.

    ``refused``: ExternalServices whose spec alone is unacceptable (a name no Service can
    have, a reserved or node address); nothing is written for them, not even a key.
    """
    refs = {
        source.service
        for es in active(snapshot)
        if es.spec is not None and es.ref not in refused
        for source in es.spec.sources
        if source.service in snapshot.services
    }
    return sorted(refs)


def previous_assignment(snapshot: Snapshot) -> dict[str, str]:
    previous: dict[str, str] = {}
    for es in snapshot.externalservices:
        for source in es.status.get("sources") or []:
            if isinstance(source, Mapping) and source.get("gatewayNode"):
                previous.setdefault(str(source.get("sourceIP")), str(source["gatewayNode"]))
    return previous


def _held(snapshot: Snapshot, settings: OperatorSettings) -> dict[ServiceRef, Problem]:
    """ExternalServices that get no connector Service, and why: a name no Service can have,
    a name an older ExternalService has, or a Service of that name that is not ours."""
    held: dict[ServiceRef, Problem] = {}
    name_owner: dict[str, ServiceRef] = {}
    for es in active(snapshot):
        invalid = name_problem(es.name)
        if invalid is not None:
            held[es.ref] = invalid  # never a claim: the API server would refuse the Service
            continue
        owner = name_owner.setdefault(es.name, es.ref)  # the oldest claim on a name wins
        if owner != es.ref:
            held[es.ref] = Problem(
                "NameConflict",
                f"metadata.name: {es.name!r} is already used by ExternalService {owner}; "
                f"both would be {es.name}.{settings.connector_namespace}",
            )
            continue
        existing = snapshot.services.get(ServiceRef(settings.connector_namespace, es.name))
        if existing is not None and (MANAGED_BY_LABEL, MANAGED_BY) not in existing.labels:
            held[es.ref] = foreign_object(("Service", settings.connector_namespace, es.name))
    return held


def object_owners(
    snapshot: Snapshot,
    settings: OperatorSettings,
    assignment: Mapping[str, str | None],
    held: Mapping[ServiceRef, Problem],
) -> dict[ObjectRef, tuple[ServiceRef, ...]]:
    """Each object the operator may write -> the ExternalServices that need it."""
    owners: dict[ObjectRef, list[ServiceRef]] = defaultdict(list)
    namespace = settings.connector_namespace
    for es in active(snapshot):
        if es.spec is None:
            continue
        if es.ref not in held:
            owners[("Service", namespace, es.name)].append(es.ref)
        owners[("ConfigMap", namespace, GATEWAY_CONFIGMAP)].append(es.ref)
        for source in es.spec.sources:
            service = source.service
            owners[("ConfigMap", service.namespace, sidecar_configmap_name(service))].append(es.ref)
            owners[("Secret", service.namespace, client_secret_name(service))].append(es.ref)
            node = assignment.get(source.source_ip)
            if node is not None:
                owners[("Secret", namespace, host_key_secret_name(node))].append(es.ref)
    return {ref: tuple(dict.fromkeys(refs)) for ref, refs in owners.items()}


def compute(
    snapshot: Snapshot,
    keys: KeyBook,
    settings: OperatorSettings,
    failures: Mapping[ObjectRef, Problem] | None = None,
) -> Desired:
    """Every object to own and every status; ``failures``: writes the API server refused
    in this pass, reported on the ExternalServices that own those objects."""
    live = active(snapshot)
    gateways = eligible_nodes(snapshot.nodes, settings.gateway_label)
    source_ips = [s.source_ip for es in live if es.spec for s in es.spec.sources]
    assignment = assign_gateways(source_ips, gateways, previous_assignment(snapshot))

    # Nothing at all is written for an ExternalService whose spec alone is unacceptable.
    node_addresses = {address: node.name for node in snapshot.nodes for address in node.addresses}
    refused = {
        es.ref
        for es in live
        if es.parsed and spec_problems(es.parsed, node_addresses, settings.own_namespace_sources)
    }
    # Connector Services: one per ExternalService that may have one.
    held = _held(snapshot, settings)
    services: dict[tuple[str, str], dict[str, Any]] = {}
    for es in live:
        if es.spec is not None and es.ref not in held and es.ref not in refused:
            services[(settings.connector_namespace, es.name)] = _connector_service(es, settings)

    connector_ips = {
        es.ref: record.cluster_ip
        for es in live
        if (record := snapshot.services.get(ServiceRef(settings.connector_namespace, es.name)))
        and record.cluster_ip
        and (settings.connector_namespace, es.name) in services
    }
    facts = ClusterFacts(
        connector_ips=connector_ips,
        source_services={
            ref: SourceServiceFacts(record.cluster_ip, record.tcp_ports)
            for ref, record in snapshot.services.items()
        },
        node_addresses=node_addresses,
    )
    host_keys = {
        ip: keys.hosts[node]
        for ip, node in assignment.items()
        if node is not None and node in keys.hosts
    }
    plannable = [es.parsed for es in live if es.parsed and es.ref not in held]
    result = plan(
        [es for es in plannable if es is not None],
        facts,
        KeyMaterial(client_keys=keys.clients, gateway_host_keys=host_keys),
        PlanOptions(
            settings.ssh_port,
            settings.listen_port,
            settings.intercept_target,
            settings.own_namespace_sources,
        ),
    )

    configmaps: dict[tuple[str, str], dict[str, Any]] = {}
    for service in referenced_services(snapshot, refused):
        if service not in keys.clients:
            continue
        config = result.sidecars.get(
            service, SidecarConfig(rules=(), listen_port=settings.listen_port)
        )
        configmaps[(service.namespace, sidecar_configmap_name(service))] = _sidecar_configmap(
            service, config, keys.clients[service]
        )
    configmaps[(settings.connector_namespace, GATEWAY_CONFIGMAP)] = _gateway_configmap(
        result.gateway, assignment, gateways, keys, settings, snapshot.nodes
    )

    # Problems of ExternalServices held back (not planned): the reason they are held,
    # then whatever else their spec alone shows.
    problems = dict(result.problems)
    for es_ref, reason in held.items():
        parsed = next((es.parsed for es in live if es.ref == es_ref), None)
        extra = (
            spec_problems(parsed, node_addresses, settings.own_namespace_sources)
            if parsed is not None
            else ()
        )
        problems[es_ref] = tuple(dict.fromkeys((reason, *extra)))
    # Writes refused in this pass, on the ExternalServices that need those objects.
    owners = object_owners(snapshot, settings, assignment, held) if failures else {}
    for object_ref, problem in sorted((failures or {}).items()):
        for es_ref in owners.get(object_ref, ()):
            problems[es_ref] = tuple(dict.fromkeys((*problems.get(es_ref, ()), problem)))
    statuses = {
        es.ref: _status(
            es,
            snapshot,
            problems,
            result.warnings.get(es.ref, ()),
            result.gateway,
            held,
            connector_ips,
            assignment,
            settings,
        )
        for es in live
    }
    return Desired(
        services=services,
        configmaps=configmaps,
        statuses=statuses,
        assignment=assignment,
        needs_client_keys=tuple(
            s for s in referenced_services(snapshot, refused) if s not in keys.clients
        ),
        needs_host_keys=tuple(n for n in gateways if n not in keys.hosts),
    )


def _connector_service(es: ExternalServiceRecord, settings: OperatorSettings) -> dict[str, Any]:
    assert es.spec is not None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": es.name,
            "namespace": settings.connector_namespace,
            "labels": managed_labels(**{EXTERNALSERVICE_LABEL: externalservice_label(es.ref)}),
        },
        "spec": {
            "type": "ClusterIP",
            # No selector and no endpoints: only intercepted traffic gets anywhere; any
            # other client is refused by kube-proxy instead of leaking with a node's IP.
            "ports": [
                {
                    "name": p.service_port_name,
                    "protocol": "TCP",
                    "port": p.port,
                    "targetPort": p.target_port,
                }
                for p in es.spec.ports
            ],
        },
    }


def _sidecar_configmap(
    service: ServiceRef, config: SidecarConfig, public_key: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": sidecar_configmap_name(service),
            "namespace": service.namespace,
            "labels": managed_labels(**{SOURCE_LABEL: service.name}),
            "annotations": {PUBLIC_KEY_ANNOTATION: public_key},
        },
        "data": {"sidecar.yaml": dump(config)},
    }


def ssh_allow_from(nodes: Sequence[NodeRecord], settings: OperatorSettings) -> tuple[str, ...]:
    """Who may reach the gateways' SSH port: the cluster. Every node's pod CIDRs (its pods)
    and InternalIPs (pods a CNI masquerades to their node's address, hostNetwork pods),
    plus the operator's own list. Nodes that are not Ready count too: their pods may still
    run and dial."""
    networks = [*settings.ssh_allow_from]
    for node in nodes:
        networks.extend(node.pod_cidrs)
        networks.extend(node.internal_ips)
    return unique_networks(networks)


def _gateway_configmap(
    planned: GatewayConfig,
    assignment: Mapping[str, str | None],
    gateways: list[str],
    keys: KeyBook,
    settings: OperatorSettings,
    nodes: Sequence[NodeRecord],
) -> dict[str, Any]:
    data = {}
    for node in gateways:
        sources: tuple[SourceIPConfig, ...] = tuple(
            s for s in planned.sources if assignment.get(s.source_ip) == node
        )
        data[f"{node}.yaml"] = dump(
            GatewayConfig(
                sources=sources,
                ssh_port=settings.ssh_port,
                ssh_allow_from=ssh_allow_from(nodes, settings),
            )
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": GATEWAY_CONFIGMAP,
            "namespace": settings.connector_namespace,
            "labels": managed_labels(),
            "annotations": {HOST_KEYS_ANNOTATION: json.dumps(dict(sorted(keys.hosts.items())))},
        },
        "data": data,
    }


def _condition(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message}


def _observed(conditions: list[dict[str, Any]], generation: int) -> list[dict[str, Any]]:
    """Each condition says which spec it describes (the API conventions' observedGeneration):
    while no operator runs, a condition below metadata.generation is visibly stale, and
    ``kubectl wait --for=condition=Ready`` keeps waiting."""
    return [{**condition, "observedGeneration": generation} for condition in conditions]


def _status(
    es: ExternalServiceRecord,
    snapshot: Snapshot,
    problems: Mapping[ServiceRef, tuple[Problem, ...]],
    warnings: Sequence[Problem],
    planned: GatewayConfig,
    held: Mapping[ServiceRef, Problem],
    connector_ips: Mapping[ServiceRef, str],
    assignment: Mapping[str, str | None],
    settings: OperatorSettings,
) -> dict[str, Any]:
    status: dict[str, Any] = {"observedGeneration": es.generation}
    if es.spec is None:
        name = held.get(es.ref)
        both = [name] if name is not None and name.reason == INVALID_NAME else []
        both.append(Problem("InvalidSpec", es.invalid))
        message = "; ".join(both)
        accepted = _condition("Accepted", False, both[0].reason, message)
        ready = _condition("Ready", False, both[0].reason, "fix the spec: " + message)
        status.update(
            sourceCount=0,
            ready="0/0",
            conditions=_observed([accepted, ready], es.generation),
            sources=[],
        )
        return status

    found = list(problems.get(es.ref, ()))
    # A missing host key only means the gateway is not assigned yet: GatewayAssigned says so.
    # Ingress warnings are not in ``found``: egress works without ingress, so they show in
    # the Ingress condition only, never in Accepted or Ready.
    blocking = [p for p in found if p.reason not in ("NoGatewayNode", "ClientKeyPending")]
    accepted = (
        _condition("Accepted", False, blocking[0].reason, "; ".join(blocking))
        if blocking
        else _condition("Accepted", True, "Valid", "the spec is valid")
    )
    label = "=".join(settings.gateway_label)
    unheld = sorted({s.source_ip for s in es.spec.sources if assignment.get(s.source_ip) is None})
    gateway = (
        _condition(
            "GatewayAssigned",
            False,
            "NoGatewayNode",
            f"no Ready node labelled {label} can hold {', '.join(unheld)}; label one: "
            f"kubectl label node <node> {label}",
        )
        if unheld
        else _condition("GatewayAssigned", True, "Assigned", "every source IP has a gateway node")
    )
    unserved = not_served(es, snapshot, assignment)
    if unserved:
        said = "; ".join(
            f"the gateway on node {node} does not serve sourceIP {ip}: {reason}"
            for ip, (node, reason) in unserved.items()
        )
        if unheld:
            gateway = {**gateway, "message": f"{gateway['message']}; {said}"}
        else:
            gateway = _condition(
                "GatewayAssigned",
                False,
                SOURCE_IP_NOT_SERVED,
                f"{said} (it retries; its log and /ready on that node say more)",
            )

    ingress_ports = _ingress_ports(es, snapshot, planned)
    sources = []
    missing_sidecars: list[str] = []
    not_ready: list[str] = []
    ready_count = 0
    for source in es.spec.sources:
        record = snapshot.services.get(source.service)
        pods = [
            p
            for p in snapshot.pods_in(source.service.namespace)
            if record is not None and p.running and selects(record.selector, p.labels)
        ]
        without = sorted(f"{p.namespace}/{p.name}" for p in pods if not p.has_sidecar)
        ready_pods = [p for p in pods if p.sidecar_ready]
        missing_sidecars += without
        not_ready += sorted(
            f"{p.namespace}/{p.name}" for p in pods if p.has_sidecar and not p.sidecar_ready
        )
        node = assignment.get(source.source_ip)
        is_ready = (
            bool(pods)
            and len(ready_pods) == len(pods)
            and node is not None
            and not found
            and source.source_ip not in unserved
        )
        ready_count += is_ready
        entry: dict[str, Any] = {
            "service": str(source.service),
            "sourceIP": source.source_ip,
            "podsSelected": len(pods),
            "podsReady": len(ready_pods),
        }
        if node is not None:
            entry["gatewayNode"] = node
        if without:
            entry["podsWithoutSidecar"] = without[:MAX_PODS_NAMED]
        ports = ingress_ports.get(source.source_ip)
        if ports:
            entry["ingressPorts"] = ports
        sources.append(entry)

    if missing_sidecars:
        named = ", ".join(missing_sidecars[:MAX_PODS_NAMED])
        more = (
            f" and {len(missing_sidecars) - MAX_PODS_NAMED} more"
            if len(missing_sidecars) > MAX_PODS_NAMED
            else ""
        )
        sidecars = _condition(
            "SidecarsReady",
            False,
            "SidecarsMissing",
            f"{len(missing_sidecars)} selected pods run without the forwarder sidecar "
            f"({named}{more}); they were created before injection was possible: recreate "
            "them, e.g. kubectl rollout restart deployment -n <namespace> <name>, in a "
            "namespace labelled external-service-injection=enabled",
        )
    elif not_ready:
        sidecars = _condition(
            "SidecarsReady",
            False,
            "SidecarsNotReady",
            f"sidecars not ready yet in {', '.join(not_ready[:MAX_PODS_NAMED])}",
        )
    elif idle := [s["service"] for s in sources if not s["podsSelected"]]:
        sidecars = _condition(
            "SidecarsReady",
            False,
            "NoPods",
            f"{', '.join(idle)} select(s) no running pods yet, so no tunnel is in use",
        )
    else:
        sidecars = _condition(
            "SidecarsReady", True, "AllReady", "every selected pod's sidecar is ready"
        )

    if warnings:
        ingress = _condition("Ingress", False, warnings[0].reason, "; ".join(warnings))
    elif blocking:
        ingress = _condition("Ingress", False, blocking[0].reason, "; ".join(blocking))
    elif unserved:  # nothing listens on a source IP its gateway does not serve
        ingress = _condition(
            "Ingress", False, SOURCE_IP_NOT_SERVED, gateway["message"] if not unheld else said
        )
    elif found:  # keys or gateway pending: GatewayAssigned and Ready say what is missing
        ingress = {**_condition("Ingress", False, "Pending", "; ".join(found)), "status": "Unknown"}
    else:
        ingress = _condition(
            "Ingress",
            True,
            "Relayed",
            f"{es.spec.target_ip} reaches each source service on its ports through its sourceIP",
        )
    ready = _ready(accepted, gateway, sidecars, es.ref in connector_ips)
    status.update(
        clusterIP=connector_ips.get(es.ref, ""),
        sourceCount=len(es.spec.sources),
        ready=f"{ready_count}/{len(es.spec.sources)}",
        conditions=_observed([accepted, gateway, sidecars, ingress, ready], es.generation),
        sources=sources,
    )
    return status


def not_served(
    es: ExternalServiceRecord, snapshot: Snapshot, assignment: Mapping[str, str | None]
) -> dict[str, tuple[str, str]]:
    """sourceIP -> (node, reason) for each source IP of ``es`` that the gateway of the node
    it is assigned to reports it does not serve. A report of another node (the IP moved
    since) or of a gateway that stopped cleanly (released Lease) counts for nothing."""
    assert es.spec is not None
    found: dict[str, tuple[str, str]] = {}
    for source in es.spec.sources:
        node = assignment.get(source.source_ip)
        lease = snapshot.gateway_leases.get(node) if node is not None else None
        reason = lease.unserved_reason(source.source_ip) if lease is not None else None
        if node is not None and reason is not None:
            found.setdefault(source.source_ip, (node, reason))
    return found


def _ingress_ports(
    es: ExternalServiceRecord, snapshot: Snapshot, planned: GatewayConfig
) -> dict[str, list[int]]:
    """sourceIP -> ports the gateway relays from targetIP to its source service (as planned)."""
    assert es.spec is not None
    ports: dict[str, list[int]] = {}
    for source in es.spec.sources:
        record = snapshot.services.get(source.service)
        config = planned.source(source.source_ip)
        if record is None or record.cluster_ip is None or config is None:
            continue
        ports[source.source_ip] = sorted(
            rule.port
            for rule in config.ingress
            if rule.allow_from == es.spec.target_ip and rule.backend.address == record.cluster_ip
        )
    return ports


def _ready(
    accepted: dict[str, Any],
    gateway: dict[str, Any],
    sidecars: dict[str, Any],
    has_cluster_ip: bool,
) -> dict[str, Any]:
    for condition in (accepted, gateway):
        if condition["status"] != "True":
            return _condition("Ready", False, condition["reason"], condition["message"])
    if not has_cluster_ip:
        return _condition(
            "Ready", False, "ServicePending", "the connector Service has no ClusterIP yet"
        )
    if sidecars["status"] != "True":
        return _condition("Ready", False, sidecars["reason"], sidecars["message"])
    return _condition("Ready", True, "TunnelsReady", "every source's tunnels are ready")


def with_transition_times(
    new: Sequence[Mapping[str, Any]], old: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """Keep lastTransitionTime where a condition's status did not change."""
    previous = {c.get("type"): c for c in old if isinstance(c, Mapping)}
    merged = []
    for condition in new:
        before = previous.get(condition["type"])
        same = before is not None and before.get("status") == condition["status"]
        stamp = before.get("lastTransitionTime", now) if same and before else now
        merged.append({**condition, "lastTransitionTime": stamp})
    return merged


def condition_events(
    new: Sequence[Mapping[str, Any]], old: Sequence[Mapping[str, Any]]
) -> list[tuple[str, str, str]]:
    """(type, reason, message) of Events for conditions that changed (status or reason)."""
    previous = {c.get("type"): c for c in old if isinstance(c, Mapping)}
    events = []
    for condition in new:
        before = previous.get(condition["type"])
        if (
            before
            and before.get("status") == condition["status"]
            and before.get("reason") == condition["reason"]
        ):
            continue
        if condition["status"] == "False":
            events.append(("Warning", condition["reason"], condition["message"]))
        elif condition["type"] == "Ready":
            events.append(("Normal", condition["reason"], condition["message"]))
    return events
