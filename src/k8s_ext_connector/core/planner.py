"""The planner: ExternalServices + cluster facts + key material -> agent configurations.

This is the one place where the seed's semantics live:

- a client behind a source service connects to ``<name>.<connector ns>:<port>``, i.e. the
  connector Service's ClusterIP and ``port`` (and, unless disabled, to ``targetIP:targetPort``
  directly); the connection reaches ``targetIP:targetPort`` (``targetPort`` defaults to
  ``port``) with source IP ``sourceIP``;
- the gateway SSH server for a source IP listens on ``sourceIP:ssh_port``; a client key is
  allowed to open exactly the ``targetIP:targetPort`` pairs of the ExternalServices that
  list its source service with that source IP;
- ingress: a connection from ``targetIP`` to ``sourceIP:<p>``, for each port ``p`` of the
  source Service, is relayed by the gateway to that Service's ``ClusterIP:<p>``; nobody
  else may connect there.

The planner is pure. A problem with one ExternalService (a name no Service can have, an
IPv6 address (the data plane serves IPv4 only), a targetIP or sourceIP that is loopback,
link-local, unspecified, multicast or broadcast, a sourceIP that is the targetIP or a
node's own address, a sourceIP, Service, port or port name listed twice, a missing source
service, a source IP claimed by two services for the same target port, ...) is reported
for that ExternalService, which is left out of the plan; the others are planned as usual. Where two
ExternalServices conflict, the one earlier in the input order keeps its claim (the operator
passes them oldest first).

Ingress never keeps an ExternalService out: egress works without it. What stops a source's
ingress (a Service without ports or ClusterIP, a port already leading elsewhere on that
source IP) is a *warning*: the affected ingress entries are left out, the rest is planned.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from k8s_ext_connector.core.api import ExternalService, ServiceRef, is_dns1035_label
from k8s_ext_connector.core.config import (
    DEFAULT_LISTEN_PORT,
    DEFAULT_SSH_PORT,
    AuthorizedClient,
    EgressRule,
    Endpoint,
    GatewayConfig,
    GatewayEndpoint,
    IngressRule,
    SidecarConfig,
    SourceIPConfig,
)


class Problem(str):
    """A user-facing sentence (what and where) with a CamelCase ``reason`` for conditions."""

    reason: str

    def __new__(cls, reason: str, message: str) -> Problem:
        problem = super().__new__(cls, message)
        problem.reason = reason
        return problem


# Reasons of problems found in the spec alone (besides the parser's InvalidSpec). The
# CRD refuses the same at apply where CEL can tell (not NodeAddress, SourceOutsideNamespace).
INVALID_NAME = "InvalidName"
IPV6_NOT_SUPPORTED = "IPv6NotSupported"
RESERVED_ADDRESS = "ReservedAddress"
NODE_ADDRESS = "NodeAddress"
SOURCE_IP_IS_TARGET = "SourceIPIsTarget"
DUPLICATE_SOURCE_IP = "DuplicateSourceIP"
SOURCE_LISTED_TWICE = "SourceListedTwice"
DUPLICATE_PORT = "DuplicatePort"
DUPLICATE_PORT_NAME = "DuplicatePortName"
SOURCE_OUTSIDE_NAMESPACE = "SourceOutsideNamespace"

# Reasons of warnings: ingress does not work (fully), egress is unaffected.
NO_INGRESS_PORTS = "NoIngressPorts"
INGRESS_CONFLICT = "IngressConflict"
WARNING_REASONS = (NO_INGRESS_PORTS, INGRESS_CONFLICT)


@dataclass(frozen=True)
class SourceServiceFacts:
    """What the cluster says about a source Service: ingress goes to ``cluster_ip:ports``."""

    cluster_ip: str | None
    ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class ClusterFacts:
    """Observed state the plan depends on."""

    # ClusterIP of each ExternalService's connector Service, once it exists.
    connector_ips: Mapping[ServiceRef, str]
    # Source Services that exist, by reference.
    source_services: Mapping[ServiceRef, SourceServiceFacts]
    # Nodes' own addresses (InternalIP, ExternalIP, canonical text) -> node name.
    node_addresses: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class KeyMaterial:
    """Public keys only: the planner never sees a private key."""

    client_keys: Mapping[ServiceRef, str]  # one client identity per source service
    gateway_host_keys: Mapping[str, str]  # host key of the gateway holding each source IP


@dataclass(frozen=True)
class PlanOptions:
    ssh_port: int = DEFAULT_SSH_PORT
    listen_port: int = DEFAULT_LISTEN_PORT
    intercept_target: bool = True  # also catch apps that dial targetIP:targetPort directly
    # Multi-tenant clusters: an ExternalService may only name Services of its own namespace
    # (the seed's example names Services of other namespaces, so this is off by default).
    own_namespace_sources: bool = False


@dataclass(frozen=True)
class Plan:
    sidecars: Mapping[ServiceRef, SidecarConfig]
    gateway: GatewayConfig
    # ExternalService -> why it was left out of the plan.
    problems: Mapping[ServiceRef, tuple[Problem, ...]] = field(default_factory=dict)
    # ExternalService -> why (part of) its ingress was left out; it is planned otherwise.
    warnings: Mapping[ServiceRef, tuple[Problem, ...]] = field(default_factory=dict)


def plan(
    externalservices: Sequence[ExternalService],
    facts: ClusterFacts,
    keys: KeyMaterial,
    options: PlanOptions = PlanOptions(),
) -> Plan:
    rules: dict[ServiceRef, list[EgressRule]] = defaultdict(list)
    allow: dict[str, dict[ServiceRef, set[Endpoint]]] = defaultdict(lambda: defaultdict(set))
    # (sourceIP, target endpoint) -> source service that owns it (ingress must be unambiguous)
    claims: dict[tuple[str, Endpoint], tuple[ServiceRef, ServiceRef]] = {}
    # (source service, intercepted destination) -> ExternalService that owns it
    intercepts: dict[tuple[ServiceRef, Endpoint], ServiceRef] = {}
    problems: dict[ServiceRef, tuple[Problem, ...]] = {}
    # sourceIP -> port -> (backend, ExternalService that claimed it first)
    ingress: dict[str, dict[int, tuple[Endpoint, ServiceRef]]] = defaultdict(dict)
    ingress_rules: dict[str, set[IngressRule]] = defaultdict(set)
    warnings: dict[ServiceRef, tuple[Problem, ...]] = {}

    for es in externalservices:
        found = _problems(es, facts, keys, claims, intercepts, options)
        if found:
            problems[es.ref] = found
            continue
        connector_ip = facts.connector_ips.get(es.ref)
        for source in es.spec.sources:
            gateway = GatewayEndpoint(
                address=source.source_ip,
                port=options.ssh_port,
                host_key=keys.gateway_host_keys[source.source_ip],
            )
            for port in es.spec.ports:
                target = Endpoint(es.spec.target_ip, port.target_port)
                # Within one ExternalService two ports may share a targetPort: the target
                # itself is intercepted once, by the first of them.
                caught = tuple(
                    destination
                    for destination in _intercepted(connector_ip, port.port, target, options)
                    if (source.service, destination) not in intercepts
                )
                if caught:  # else nothing to catch yet (no ClusterIP, target not intercepted)
                    rules[source.service].append(
                        EgressRule(
                            name=f"{es.ref}:{port.port}",
                            intercept=caught,
                            gateway=gateway,
                            target=target,
                        )
                    )
                allow[source.source_ip][source.service].add(target)
                claims[(source.source_ip, target)] = (source.service, es.ref)
                for destination in caught:
                    intercepts[(source.service, destination)] = es.ref
        found = _plan_ingress(es, facts, options, ingress, ingress_rules)
        if found:
            warnings[es.ref] = found

    sidecars = {
        service: SidecarConfig(rules=tuple(service_rules), listen_port=options.listen_port)
        for service, service_rules in sorted(rules.items())
    }
    gateway_config = GatewayConfig(
        ssh_port=options.ssh_port,
        sources=tuple(
            SourceIPConfig(
                source_ip=source_ip,
                clients=tuple(
                    AuthorizedClient(
                        name=str(service),
                        public_key=keys.client_keys[service],
                        allow=tuple(sorted(targets)),
                    )
                    for service, targets in sorted(by_service.items())
                ),
                ingress=tuple(sorted(ingress_rules.get(source_ip, ()))),
            )
            for source_ip, by_service in sorted(allow.items())
        ),
    )
    return Plan(sidecars=sidecars, gateway=gateway_config, problems=problems, warnings=warnings)


def _plan_ingress(
    es: ExternalService,
    facts: ClusterFacts,
    options: PlanOptions,
    claims: dict[str, dict[int, tuple[Endpoint, ServiceRef]]],
    rules: dict[str, set[IngressRule]],
) -> tuple[Problem, ...]:
    """Add the ingress entries of a planned ``es``; warnings for those that cannot be."""
    found: list[Problem] = []
    for i, source in enumerate(es.spec.sources):
        where = f"spec.sources[{i}].service"
        service = facts.source_services[source.service]
        if (":" in es.spec.target_ip) != (":" in source.source_ip):
            found.append(
                Problem(
                    INGRESS_CONFLICT,
                    f"{where}: targetIP {es.spec.target_ip} and sourceIP {source.source_ip} "
                    "are of different address families; no connection can go between them",
                )
            )
            continue
        if service.cluster_ip is None or not service.ports:
            missing = "no ClusterIP (headless)" if service.cluster_ip is None else "no ports"
            found.append(
                Problem(
                    NO_INGRESS_PORTS,
                    f"{where}: Service {source.service} has {missing}; {es.spec.target_ip} "
                    f"cannot reach it through {source.source_ip} (egress is unaffected)",
                )
            )
            continue
        for port in sorted(set(service.ports)):
            backend = Endpoint(service.cluster_ip, port)
            if port == options.ssh_port:
                found.append(
                    Problem(
                        INGRESS_CONFLICT,
                        f"{where}: port {port} of Service {source.service} is the gateway's "
                        f"SSH port on {source.source_ip}; it cannot be relayed",
                    )
                )
                continue
            holder, owner = claims[source.source_ip].setdefault(port, (backend, es.ref))
            if holder != backend:
                found.append(
                    Problem(
                        INGRESS_CONFLICT,
                        f"{where}: {source.source_ip}:{port} already leads to {holder} "
                        f"(in ExternalService {owner}); it cannot also lead to "
                        f"{source.service}",
                    )
                )
                continue
            rules[source.source_ip].add(IngressRule(es.spec.target_ip, port, backend))
    return tuple(dict.fromkeys(found))


def _intercepted(
    connector_ip: str | None, port: int, target: Endpoint, options: PlanOptions
) -> tuple[Endpoint, ...]:
    caught = []
    if connector_ip is not None:
        caught.append(Endpoint(connector_ip, port))
    if options.intercept_target:
        caught.append(target)
    return tuple(dict.fromkeys(caught))


def name_problem(name: str) -> Problem | None:
    """Why ``name`` cannot be an ExternalService's name, if it cannot.

    The CRD accepts any object name (a DNS subdomain: dots, a leading digit, up to 253
    characters), but the connector Service is named after the ExternalService, and a
    Service name must be a DNS-1035 label; the API server would refuse it (422).
    """
    if is_dns1035_label(name):
        return None
    return Problem(
        INVALID_NAME,
        f"metadata.name: {name!r} is not a DNS-1035 label (lowercase letters, digits and '-', "
        "starting with a letter, ending with a letter or digit, at most 63 characters), so "
        "no connector Service can be named after it; recreate the ExternalService under "
        "such a name",
    )


_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


def ipv6_problem(where: str, value: str) -> Problem | None:
    """IPv6 parses but is not served yet: the sidecar intercepts and the gateway holds and
    filters IPv4 only, so one IPv6 address in a gateway config would fail all of it."""
    if ipaddress.ip_address(value).version == 4:
        return None
    return Problem(
        IPV6_NOT_SUPPORTED,
        f"{where}: {value} is an IPv6 address; IPv6 is not supported yet: give an IPv4 address",
    )


def address_problem(where: str, value: str) -> Problem | None:
    """Why ``value`` (at field ``where``) can be neither a targetIP nor a sourceIP.

    Loopback, link-local (including the cloud metadata address 169.254.169.254),
    unspecified, multicast and broadcast addresses: from a gateway node (host network,
    outside any NetworkPolicy) such a target reaches the node itself or its link, and such
    a source is no address a server can answer or a gateway can hold. IPv4-mapped IPv6
    addresses are judged by their IPv4 address.
    """
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(value)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK):
        kind = "the unspecified address" if ip.is_unspecified else "a 'this network' address"
    elif ip.is_loopback:
        kind = "a loopback address"
    elif ip.is_link_local:
        kind = "a link-local address (cloud instance metadata lives there)"
    elif ip.is_multicast:
        kind = "a multicast address"
    elif ip == _BROADCAST:
        kind = "the broadcast address"
    else:
        return None
    why = (
        "the gateway node would connect to itself or its own link, not to an external server"
        if where == "spec.targetIP"
        else "no gateway can hold it and no server can answer to it"
    )
    return Problem(RESERVED_ADDRESS, f"{where}: {value} is {kind}; {why}")


def spec_problems(
    es: ExternalService,
    node_addresses: Mapping[str, str],
    own_namespace_sources: bool = False,
) -> tuple[Problem, ...]:
    """What is wrong with ``es`` whatever the other ExternalServices say: its name, its
    addresses (IPv6, reserved, a sourceIP that is the targetIP or a node's own address:
    ``node_addresses`` maps address -> node name), entries listed twice, and, where the
    cluster asks for it, sources outside its namespace. An ExternalService with any of
    these gets nothing written, so it cannot disturb the others (the gateway serves IPv4
    only: one IPv6 source in its config would fail the whole config)."""
    found: list[Problem] = []
    if own_namespace_sources:
        for i, source in enumerate(es.spec.sources):
            if source.service.namespace != es.namespace:
                found.append(
                    Problem(
                        SOURCE_OUTSIDE_NAMESPACE,
                        f"spec.sources[{i}].service.namespace: {source.service.namespace!r} "
                        f"is not this ExternalService's namespace {es.namespace!r}; this "
                        "cluster only lets an ExternalService name Services of its own "
                        "namespace (operator --own-namespace-sources): create it in "
                        f"{source.service.namespace!r}",
                    )
                )
    invalid_name = name_problem(es.name)
    if invalid_name is not None:
        found.append(invalid_name)
    target = ipv6_problem("spec.targetIP", es.spec.target_ip) or address_problem(
        "spec.targetIP", es.spec.target_ip
    )
    if target is not None:
        found.append(target)
    first_with_ip: dict[str, int] = {}
    first_with_service: dict[ServiceRef, int] = {}
    for i, source in enumerate(es.spec.sources):
        where = f"spec.sources[{i}].sourceIP"
        address = ipv6_problem(where, source.source_ip) or address_problem(
            where, source.source_ip
        )
        if address is not None:
            found.append(address)
        elif source.source_ip == es.spec.target_ip:
            found.append(
                Problem(
                    SOURCE_IP_IS_TARGET,
                    f"{where}: {source.source_ip} is also spec.targetIP; the gateway would "
                    "hold the address of the server itself: choose another sourceIP",
                )
            )
        elif (node := node_addresses.get(source.source_ip)) is not None:
            found.append(
                Problem(
                    NODE_ADDRESS,
                    f"{where}: {source.source_ip} is an address of node {node}; the gateway "
                    "would filter that node's own traffic on it (SSH, kubelet, ...) and "
                    "answer for the node: choose an address no node has",
                )
            )
        earlier = first_with_ip.setdefault(source.source_ip, i)
        if earlier != i:
            found.append(
                Problem(
                    DUPLICATE_SOURCE_IP,
                    f"{where}: {source.source_ip} is already the sourceIP of "
                    f"spec.sources[{earlier}]; the server tells sources apart by their "
                    "source IP: give each its own",
                )
            )
        earlier = first_with_service.setdefault(source.service, i)
        if earlier != i:
            found.append(
                Problem(
                    SOURCE_LISTED_TWICE,
                    f"spec.sources[{i}].service: {source.service} is already listed in "
                    f"spec.sources[{earlier}]; its pods leave with one source IP: keep one",
                )
            )
    first_with_port: dict[int, int] = {}
    first_with_name: dict[str, int] = {}
    for i, port in enumerate(es.spec.ports):
        earlier = first_with_port.setdefault(port.port, i)
        if earlier != i:
            found.append(
                Problem(
                    DUPLICATE_PORT,
                    f"spec.ports[{i}].port: {port.port} is already listed in "
                    f"spec.ports[{earlier}]; clients could not tell which targetPort they "
                    "reach: keep one",
                )
            )
            continue
        earlier = first_with_name.setdefault(port.service_port_name, i)
        if earlier != i:
            found.append(
                Problem(
                    DUPLICATE_PORT_NAME,
                    f"spec.ports[{i}].name: {port.service_port_name!r} is already the name "
                    f"of spec.ports[{earlier}] (a port without a name is called "
                    "tcp-<port>); the connector Service needs unique port names",
                )
            )
    return tuple(found)


def _problems(
    es: ExternalService,
    facts: ClusterFacts,
    keys: KeyMaterial,
    claims: Mapping[tuple[str, Endpoint], tuple[ServiceRef, ServiceRef]],
    intercepts: Mapping[tuple[ServiceRef, Endpoint], ServiceRef],
    options: PlanOptions,
) -> tuple[Problem, ...]:
    """Everything that keeps ``es`` out of the plan, as user-facing sentences."""
    found: list[Problem] = list(
        spec_problems(es, facts.node_addresses, options.own_namespace_sources)
    )
    connector_ip = facts.connector_ips.get(es.ref)
    for i, source in enumerate(es.spec.sources):
        where = f"spec.sources[{i}]"
        if source.service not in facts.source_services:
            found.append(
                Problem(
                    "SourceServiceNotFound",
                    f"{where}.service: Service {source.service} does not exist",
                )
            )
        if source.service not in keys.client_keys:
            found.append(
                Problem(
                    "ClientKeyPending",
                    f"{where}.service: no client key issued yet for {source.service}",
                )
            )
        if source.source_ip not in keys.gateway_host_keys:
            found.append(
                Problem(
                    "NoGatewayNode", f"{where}.sourceIP: {source.source_ip} is held by no gateway"
                )
            )
        for port in es.spec.ports:
            target = Endpoint(es.spec.target_ip, port.target_port)
            claim = (source.source_ip, target)
            # Claims of earlier ExternalServices (within one, spec_problems has the
            # duplicates).
            other, owner = claims.get(claim, (source.service, es.ref))
            if other != source.service:
                found.append(
                    Problem(
                        "SourceIPConflict",
                        f"{where}.sourceIP: {source.source_ip} already carries {other} to {target} "
                        f"(in ExternalService {owner}); the server could not tell the two "
                        "apart on the way back",
                    )
                )
            for destination in _intercepted(connector_ip, port.port, target, options):
                holder = intercepts.get((source.service, destination))
                if holder is not None and holder != es.ref:
                    found.append(
                        Problem(
                            "DestinationConflict",
                            f"{where}.service: pods of {source.service} already reach "
                            f"{destination} through ExternalService {holder}",
                        )
                    )
    return tuple(dict.fromkeys(found))
