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

The planner is pure. A problem with one ExternalService (a missing source service, a
source IP claimed by two services for the same target port, ...) is reported for that
ExternalService, which is left out of the plan; the others are planned as usual. Where two
ExternalServices conflict, the one earlier in the input order keeps its claim (the operator
passes them oldest first).

Ingress never keeps an ExternalService out: egress works without it. What stops a source's
ingress (a Service without ports or ClusterIP, a port already leading elsewhere on that
source IP) is a *warning*: the affected ingress entries are left out, the rest is planned.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from k8s_ext_connector.core.api import ExternalService, ServiceRef
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
    return Plan(
        sidecars=sidecars, gateway=gateway_config, problems=problems, warnings=warnings
    )


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


def _problems(
    es: ExternalService,
    facts: ClusterFacts,
    keys: KeyMaterial,
    claims: Mapping[tuple[str, Endpoint], tuple[ServiceRef, ServiceRef]],
    intercepts: Mapping[tuple[ServiceRef, Endpoint], ServiceRef],
    options: PlanOptions,
) -> tuple[Problem, ...]:
    """Everything that keeps ``es`` out of the plan, as user-facing sentences."""
    found: list[Problem] = []
    own_claims: dict[tuple[str, Endpoint], ServiceRef] = {}
    connector_ip = facts.connector_ips.get(es.ref)
    listed: dict[ServiceRef, int] = {}
    for i, source in enumerate(es.spec.sources):
        where = f"spec.sources[{i}]"
        if source.service in listed:
            found.append(
                Problem(
                    "SourceListedTwice",
                    f"{where}.service: {source.service} is already listed in "
                    f"spec.sources[{listed[source.service]}]; its pods leave with one source IP",
                )
            )
        listed.setdefault(source.service, i)
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
            other = own_claims.get(claim) or (claims[claim][0] if claim in claims else None)
            if other is not None and other != source.service:
                owner = (
                    f"ExternalService {claims[claim][1]}"
                    if claim in claims
                    else "this ExternalService"
                )
                found.append(
                    Problem(
                        "SourceIPConflict",
                        f"{where}.sourceIP: {source.source_ip} already carries {other} to {target} "
                        f"(in {owner}); the server could not tell the two apart on the way back",
                    )
                )
            own_claims[claim] = source.service
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
