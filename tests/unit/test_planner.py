"""The planner: ExternalServices + cluster facts + public keys -> sidecar and gateway configs."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
import yaml

from k8s_ext_connector.core.api import ExternalService, ExternalServiceSpec, ServiceRef
from k8s_ext_connector.core.config import (
    AuthorizedClient,
    EgressRule,
    Endpoint,
    GatewayConfig,
    GatewayEndpoint,
    IngressRule,
    SidecarConfig,
    SourceIPConfig,
)
from k8s_ext_connector.core.planner import (
    DUPLICATE_PORT,
    DUPLICATE_PORT_NAME,
    DUPLICATE_SOURCE_IP,
    INGRESS_CONFLICT,
    INVALID_NAME,
    IPV6_NOT_SUPPORTED,
    NO_INGRESS_PORTS,
    NODE_ADDRESS,
    RESERVED_ADDRESS,
    SOURCE_IP_IS_TARGET,
    SOURCE_LISTED_TWICE,
    ClusterFacts,
    KeyMaterial,
    Plan,
    PlanOptions,
    SourceServiceFacts,
    plan,
    spec_problems,
)
from tests.unit.samples import KEY_A, KEY_B, KEY_C, KEY_D, SEED_MANIFEST, seed_spec

SVC1 = ServiceRef("ns1", "my-service1")
SVC2 = ServiceRef("ns2", "my-service2")
SVC3 = ServiceRef("ns3", "my-service3")
IP1, IP2 = "192.168.122.200", "192.168.122.201"
TARGET = "192.168.122.139"

# ClusterIPs of the connector Services, by ExternalService.
CONNECTORS = {
    ServiceRef("default", "my-externalservice"): "10.96.0.10",
    ServiceRef("default", "es1"): "10.96.0.11",
    ServiceRef("default", "es2"): "10.96.0.12",
    ServiceRef("default", "es3"): "10.96.0.13",
}
FACTS = ClusterFacts(
    connector_ips=CONNECTORS,
    source_services={
        SVC1: SourceServiceFacts("10.96.1.1", (80,)),
        SVC2: SourceServiceFacts("10.96.1.2", (80,)),
        SVC3: SourceServiceFacts("10.96.1.3"),
    },
)
KEYS = KeyMaterial(
    client_keys={SVC1: KEY_C, SVC2: KEY_D, SVC3: KEY_B},
    gateway_host_keys={IP1: KEY_A, IP2: KEY_B},
)
SEED = ExternalService.from_object(yaml.safe_load(SEED_MANIFEST))


def _source(service: ServiceRef, source_ip: str) -> dict[str, Any]:
    return {"service": {"namespace": service.namespace, "name": service.name},
            "sourceIP": source_ip}


def _es(name: str, sources: list[tuple[ServiceRef, str]], ports: list[dict[str, Any]] | None = None,
        target_ip: str = TARGET) -> ExternalService:
    spec = {"targetIP": target_ip, "sources": [_source(s, ip) for s, ip in sources],
            "ports": ports or [{"port": 8000}]}
    return ExternalService("default", name, ExternalServiceSpec.from_dict(spec))


def _gw(address: str, key: str) -> GatewayEndpoint:
    return GatewayEndpoint(address=address, host_key=key, port=2022)


def test_seed_example_plans_exactly() -> None:
    result = plan([SEED], FACTS, KEYS)
    target = Endpoint(TARGET, 8000)
    intercept = (Endpoint("10.96.0.10", 8000), target)
    name = "default/my-externalservice:8000"
    assert result == Plan(
        sidecars={
            SVC1: SidecarConfig(
                rules=(EgressRule(name, intercept, _gw(IP1, KEY_A), target),), listen_port=15001),
            SVC2: SidecarConfig(
                rules=(EgressRule(name, intercept, _gw(IP2, KEY_B), target),), listen_port=15001),
        },
        gateway=GatewayConfig(
            ssh_port=2022,
            sources=(
                SourceIPConfig(IP1, (AuthorizedClient("ns1/my-service1", KEY_C, (target,)),),
                               (IngressRule(TARGET, 80, Endpoint("10.96.1.1", 80)),)),
                SourceIPConfig(IP2, (AuthorizedClient("ns2/my-service2", KEY_D, (target,)),),
                               (IngressRule(TARGET, 80, Endpoint("10.96.1.2", 80)),)),
            ),
        ),
        problems={},
        warnings={},
    )
    # The gateway endpoint a sidecar dials is sourceIP:2022, pinned to that gateway's key.
    assert result.sidecars[SVC1].gateways() == (_gw(IP1, KEY_A),)
    assert str(result.sidecars[SVC1].gateways()[0].endpoint) == "192.168.122.200:2022"


@pytest.mark.parametrize(
    ("ports", "intercept", "allow"),
    [
        pytest.param([{"port": 80, "targetPort": 8080}],
                     [[("10.96.0.11", 80), (TARGET, 8080)]], [(TARGET, 8080)],
                     id="target-port-differs"),
        pytest.param([{"port": 80}, {"port": 443, "targetPort": 8443}],
                     [[("10.96.0.11", 80), (TARGET, 80)], [("10.96.0.11", 443), (TARGET, 8443)]],
                     [(TARGET, 80), (TARGET, 8443)], id="two-ports"),
    ],
)
def test_ports_and_target_ports(ports: list[dict[str, Any]],
                                intercept: list[list[tuple[str, int]]],
                                allow: list[tuple[str, int]]) -> None:
    result = plan([_es("es1", [(SVC1, IP1)], ports)], FACTS, KEYS)
    rules = result.sidecars[SVC1].rules
    assert [r.name for r in rules] == [f"default/es1:{p['port']}" for p in ports]
    assert [list(r.intercept) for r in rules] == [[Endpoint(*e) for e in i] for i in intercept]
    assert [r.target for r in rules] == [
        Endpoint(TARGET, p.get("targetPort", p["port"])) for p in ports
    ]
    assert result.gateway.sources[0].clients[0].allow == tuple(Endpoint(*e) for e in allow)


@pytest.mark.parametrize(
    ("options", "intercept"),
    [
        pytest.param(PlanOptions(), [("10.96.0.10", 8000), (TARGET, 8000)], id="default"),
        pytest.param(PlanOptions(intercept_target=False), [("10.96.0.10", 8000)],
                     id="intercept-target-false"),
    ],
)
def test_intercept_target_option(options: PlanOptions, intercept: list[tuple[str, int]]) -> None:
    result = plan([SEED], FACTS, KEYS, options)
    for service in (SVC1, SVC2):
        (rule,) = result.sidecars[service].rules
        assert rule.intercept == tuple(Endpoint(*e) for e in intercept)
        assert rule.target == Endpoint(TARGET, 8000)


def test_no_connector_ip_yet_intercepts_the_target_only() -> None:
    facts = ClusterFacts(connector_ips={}, source_services=FACTS.source_services)
    result = plan([SEED], facts, KEYS)
    assert result.sidecars[SVC1].rules[0].intercept == (Endpoint(TARGET, 8000),)


def test_options_reach_the_configs() -> None:
    result = plan([SEED], FACTS, KEYS, PlanOptions(ssh_port=2200, listen_port=16000))
    assert result.gateway.ssh_port == 2200
    assert result.sidecars[SVC1].listen_port == 16000
    assert result.sidecars[SVC1].rules[0].gateway == GatewayEndpoint(IP1, KEY_A, 2200)


# --- problems: the faulty ExternalService is left out, the others still plan ---------------


def test_missing_source_service_leaves_only_that_es_out() -> None:
    missing = ServiceRef("ns1", "missing")
    bad = _es("es1", [(missing, IP1)])
    good = _es("es2", [(SVC2, IP2)], [{"port": 5432}])
    keys = KeyMaterial({**KEYS.client_keys, missing: KEY_D}, KEYS.gateway_host_keys)
    result = plan([bad, good], FACTS, keys)
    assert result.problems == {
        bad.ref: ("spec.sources[0].service: Service ns1/missing does not exist",),
    }
    assert list(result.sidecars) == [SVC2]
    assert [r.name for r in result.sidecars[SVC2].rules] == ["default/es2:5432"]
    assert [s.source_ip for s in result.gateway.sources] == [IP2]


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        pytest.param(KeyMaterial(KEYS.client_keys, {IP2: KEY_B}),
                     "spec.sources[0].sourceIP: 192.168.122.200 is held by no gateway",
                     id="missing-gateway-host-key"),
        pytest.param(KeyMaterial({SVC2: KEY_D}, KEYS.gateway_host_keys),
                     "spec.sources[0].service: no client key issued yet for ns1/my-service1",
                     id="missing-client-key"),
    ],
)
def test_missing_key_is_a_problem(keys: KeyMaterial, problem: str) -> None:
    result = plan([SEED], FACTS, keys)
    assert result.problems == {SEED.ref: (problem,)}
    assert result.sidecars == {}
    assert result.gateway == GatewayConfig(sources=())


def test_every_problem_of_an_es_is_reported() -> None:
    missing = ServiceRef("ns9", "nothing")
    es = _es("es1", [(missing, "10.9.9.9")])
    result = plan([es], FACTS, KEYS)
    assert result.problems == {es.ref: (
        "spec.sources[0].service: Service ns9/nothing does not exist",
        "spec.sources[0].service: no client key issued yet for ns9/nothing",
        "spec.sources[0].sourceIP: 10.9.9.9 is held by no gateway",
    )}


def test_source_ip_claimed_by_two_services_problem_on_the_later_es_only() -> None:
    first = _es("es1", [(SVC1, IP1)])
    later = _es("es2", [(SVC2, IP1)])
    result = plan([first, later], FACTS, KEYS)
    assert list(result.problems) == [later.ref]
    (problem,) = result.problems[later.ref]
    assert problem.startswith("spec.sources[0].sourceIP: 192.168.122.200 already carries "
                              "ns1/my-service1 to 192.168.122.139:8000 (in ExternalService "
                              "default/es1)")
    assert list(result.sidecars) == [SVC1]
    assert result.sidecars[SVC1].rules[0].name == "default/es1:8000"
    assert [c.name for s in result.gateway.sources for c in s.clients] == ["ns1/my-service1"]


def test_source_ip_claimed_twice_within_one_es() -> None:
    es = _es("es1", [(SVC1, IP1), (SVC2, IP1)])
    result = plan([es], FACTS, KEYS)
    assert list(result.problems) == [es.ref]
    (problem,) = result.problems[es.ref]
    assert problem.reason == DUPLICATE_SOURCE_IP
    assert problem == ("spec.sources[1].sourceIP: 192.168.122.200 is already the sourceIP of "
                       "spec.sources[0]; the server tells sources apart by their source IP: "
                       "give each its own")


@pytest.mark.parametrize(
    ("second", "problem"),
    [
        pytest.param([(SVC1, IP2)],
                     "spec.sources[0].service: pods of ns1/my-service1 already reach "
                     "192.168.122.139:8000 through ExternalService default/es1",
                     id="other-source-ip"),
        pytest.param([(SVC1, IP1)],
                     "spec.sources[0].service: pods of ns1/my-service1 already reach "
                     "192.168.122.139:8000 through ExternalService default/es1",
                     id="same-source-ip"),
    ],
)
def test_same_service_in_two_es_to_the_same_target_port(second: list[tuple[ServiceRef, str]],
                                                         problem: str) -> None:
    first = _es("es1", [(SVC1, IP1)])
    later = _es("es2", second)
    result = plan([first, later], FACTS, KEYS)
    assert result.problems == {later.ref: (problem,)}
    assert [r.name for r in result.sidecars[SVC1].rules] == ["default/es1:8000"]


def test_different_services_same_target_different_source_ips_is_fine() -> None:
    result = plan([_es("es1", [(SVC1, IP1)]), _es("es2", [(SVC2, IP2)])], FACTS, KEYS)
    assert result.problems == {}
    assert list(result.sidecars) == [SVC1, SVC2]


def test_two_es_sharing_source_ip_and_key_merge_into_one_client() -> None:
    es1 = _es("es1", [(SVC1, IP1)], [{"port": 8000}])
    es2 = _es("es2", [(SVC1, IP1), (SVC2, IP2)], [{"port": 5432}], target_ip="192.168.122.140")
    es3 = _es("es3", [(SVC1, IP1)], [{"port": 443, "targetPort": 8443}], target_ip="10.20.0.1")
    result = plan([es1, es2, es3], FACTS, KEYS)
    assert result.problems == {}
    assert result.gateway == GatewayConfig(
        ssh_port=2022,
        sources=(
            SourceIPConfig(IP1, (AuthorizedClient("ns1/my-service1", KEY_C, (
                Endpoint("10.20.0.1", 8443),
                Endpoint(TARGET, 8000),
                Endpoint("192.168.122.140", 5432),
            )),), (
                # one listener, 192.168.122.200:80, open to the three targets
                IngressRule("10.20.0.1", 80, Endpoint("10.96.1.1", 80)),
                IngressRule(TARGET, 80, Endpoint("10.96.1.1", 80)),
                IngressRule("192.168.122.140", 80, Endpoint("10.96.1.1", 80)),
            )),
            SourceIPConfig(IP2, (AuthorizedClient("ns2/my-service2", KEY_D, (
                Endpoint("192.168.122.140", 5432),
            )),), (IngressRule("192.168.122.140", 80, Endpoint("10.96.1.2", 80)),)),
        ),
    )
    assert [r.name for r in result.sidecars[SVC1].rules] == [
        "default/es1:8000", "default/es2:5432", "default/es3:443"]
    # one gateway session for the three rules
    assert result.sidecars[SVC1].gateways() == (_gw(IP1, KEY_A),)


def test_clients_of_one_source_ip_sorted_by_service() -> None:
    es1 = _es("es1", [(SVC2, IP1)], [{"port": 80}])
    es2 = _es("es2", [(SVC1, IP1)], [{"port": 81}])
    result = plan([es1, es2], FACTS, KEYS)
    assert [c.name for c in result.gateway.sources[0].clients] == [
        "ns1/my-service1", "ns2/my-service2"]


# --- determinism and validity of the output -------------------------------------------------


def _scenario() -> list[ExternalService]:
    return [
        _es("es3", [(SVC3, IP2), (SVC1, IP1)], [{"port": 9000}], target_ip="10.20.0.3"),
        SEED,
        _es("es1", [(SVC1, IP1)], [{"port": 5432}, {"port": 80, "targetPort": 8080}],
            target_ip="10.20.0.1"),
    ]


def test_determinism_same_input_same_output() -> None:
    first = plan(_scenario(), FACTS, KEYS)
    again = plan(copy.deepcopy(_scenario()), copy.deepcopy(FACTS), copy.deepcopy(KEYS))
    assert first == again
    assert [list(s.to_dict()) for s in first.sidecars.values()] == [
        list(s.to_dict()) for s in again.sidecars.values()]
    assert first.gateway.to_dict() == again.gateway.to_dict()
    assert list(first.sidecars) == sorted(first.sidecars)


def test_determinism_independent_of_mapping_order() -> None:
    reversed_facts = ClusterFacts(
        connector_ips=dict(reversed(list(FACTS.connector_ips.items()))),
        source_services=dict(reversed(list(FACTS.source_services.items()))),
    )
    reversed_keys = KeyMaterial(
        client_keys=dict(reversed(list(KEYS.client_keys.items()))),
        gateway_host_keys=dict(reversed(list(KEYS.gateway_host_keys.items()))),
    )
    first = plan(_scenario(), FACTS, KEYS)
    other = plan(_scenario(), reversed_facts, reversed_keys)
    assert first == other
    assert list(first.sidecars) == list(other.sidecars)
    assert first.gateway.to_dict() == other.gateway.to_dict()


_NO_CONNECTORS = ClusterFacts(connector_ips={}, source_services=FACTS.source_services)

# Every config the planner emits must pass the agents' own validation: otherwise the sidecar
# or gateway refuses it at load time, after the operator has reported success.
VALIDITY_CASES = [
    pytest.param([SEED], FACTS, PlanOptions(), id="seed"),
    pytest.param(_scenario(), FACTS, PlanOptions(), id="mixed"),
    pytest.param(_scenario(), FACTS, PlanOptions(intercept_target=False), id="no-target-intercept"),
    pytest.param([SEED], _NO_CONNECTORS, PlanOptions(), id="no-connector-ip"),
    # Bug: one ES listing the same source service twice (two source IPs) yields two rules
    # intercepting the same destinations, which SidecarConfig.from_dict rejects.
    pytest.param([_es("es1", [(SVC1, IP1), (SVC1, IP2)])], FACTS, PlanOptions(),
                 id="same-service-twice-in-one-es"),
    # Bug: no connector ClusterIP yet and intercept_target=False yields a rule intercepting
    # nothing, which SidecarConfig.from_dict rejects ("must list at least one destination").
    pytest.param([SEED], _NO_CONNECTORS, PlanOptions(intercept_target=False),
                 id="no-connector-ip-and-no-target-intercept"),
    # Bug: two ports of one ES with the same targetPort (valid in a Service) yield two rules
    # that both intercept targetIP:targetPort, which SidecarConfig.from_dict rejects.
    pytest.param([_es("es1", [(SVC1, IP1)], [{"port": 80, "targetPort": 8080},
                                             {"port": 81, "targetPort": 8080}])],
                 FACTS, PlanOptions(), id="two-ports-same-target-port"),
    # Ingress: a source Service port equal to the SSH port would make the gateway refuse
    # its whole config; two services on one source IP must not share a listener.
    pytest.param([SEED], FACTS, PlanOptions(ssh_port=80), id="service-port-is-ssh-port"),
    pytest.param([_es("es1", [(SVC1, IP1)]), _es("es2", [(SVC2, IP1)], target_ip="10.20.0.2")],
                 FACTS, PlanOptions(), id="two-services-one-source-ip-same-port"),
]


@pytest.mark.parametrize(("externalservices", "facts", "options"), VALIDITY_CASES)
def test_planned_configs_pass_validation(externalservices: list[ExternalService],
                                         facts: ClusterFacts, options: PlanOptions) -> None:
    result = plan(externalservices, facts, KEYS, options)
    for config in result.sidecars.values():
        assert SidecarConfig.from_dict(config.to_dict()) == config
    assert GatewayConfig.from_dict(result.gateway.to_dict()) == result.gateway


def test_seed_spec_helper_matches_manifest() -> None:
    assert ExternalServiceSpec.from_dict(seed_spec()) == SEED.spec


# --- ingress: targetIP -> sourceIP:<service port> -> the source Service's ClusterIP ---------


def _ingress(result: Plan, source_ip: str) -> tuple[IngressRule, ...]:
    source = result.gateway.source(source_ip)
    assert source is not None
    return source.ingress


def test_every_port_of_the_source_service_is_relayed_from_the_target_only() -> None:
    facts = ClusterFacts(CONNECTORS, {**FACTS.source_services,
                                      SVC1: SourceServiceFacts("10.96.1.1", (443, 80, 80))})
    result = plan([SEED], facts, KEYS)
    assert _ingress(result, IP1) == (
        IngressRule(TARGET, 80, Endpoint("10.96.1.1", 80)),
        IngressRule(TARGET, 443, Endpoint("10.96.1.1", 443)),
    )
    assert result.warnings == {}
    # The spec's ports are egress ports; they play no part in ingress.
    assert all(rule.port != 8000 for rule in _ingress(result, IP1))


@pytest.mark.parametrize(
    ("service", "missing"),
    [
        pytest.param(SourceServiceFacts("10.96.1.3"), "no ports", id="no-ports"),
        pytest.param(SourceServiceFacts(None, (80,)), "no ClusterIP (headless)", id="headless"),
    ],
)
def test_source_service_without_ports_or_cluster_ip_warns_and_egress_still_plans(
        service: SourceServiceFacts, missing: str) -> None:
    facts = ClusterFacts(CONNECTORS, {**FACTS.source_services, SVC1: service})
    result = plan([SEED], facts, KEYS)
    assert result.problems == {}
    assert result.warnings == {SEED.ref: (
        f"spec.sources[0].service: Service ns1/my-service1 has {missing}; 192.168.122.139 "
        "cannot reach it through 192.168.122.200 (egress is unaffected)",)}
    assert result.warnings[SEED.ref][0].reason == NO_INGRESS_PORTS
    assert _ingress(result, IP1) == ()
    assert _ingress(result, IP2) == (IngressRule(TARGET, 80, Endpoint("10.96.1.2", 80)),)
    assert [r.name for r in result.sidecars[SVC1].rules] == ["default/my-externalservice:8000"]
    assert result.gateway.sources[0].clients[0].allow == (Endpoint(TARGET, 8000),)


def test_same_source_ip_and_port_to_another_backend_warns_on_the_later_es() -> None:
    first = _es("es1", [(SVC1, IP1)])
    later = _es("es2", [(SVC2, IP1)], target_ip="10.20.0.2")  # egress is fine: other target
    result = plan([first, later], FACTS, KEYS)
    assert result.problems == {}
    assert list(result.warnings) == [later.ref]
    (warning,) = result.warnings[later.ref]
    assert warning.reason == INGRESS_CONFLICT
    assert warning == ("spec.sources[0].service: 192.168.122.200:80 already leads to "
                       "10.96.1.1:80 (in ExternalService default/es1); it cannot also lead to "
                       "ns2/my-service2")
    assert _ingress(result, IP1) == (IngressRule(TARGET, 80, Endpoint("10.96.1.1", 80)),)
    assert [c.name for c in result.gateway.sources[0].clients] == [
        "ns1/my-service1", "ns2/my-service2"]
    # Earlier wins regardless of names: swap the order, swap the winner.
    swapped = plan([later, first], FACTS, KEYS)
    assert list(swapped.warnings) == [first.ref]
    assert _ingress(swapped, IP1) == (
        IngressRule("10.20.0.2", 80, Endpoint("10.96.1.2", 80)),)


def test_same_backend_from_two_targets_is_one_listener_not_a_conflict() -> None:
    first = _es("es1", [(SVC1, IP1)])
    later = _es("es2", [(SVC1, IP1)], [{"port": 5432}], target_ip="10.20.0.2")
    result = plan([first, later], FACTS, KEYS)
    assert result.warnings == {}
    source = result.gateway.source(IP1)
    assert source is not None
    assert source.ingress_ports() == {80: (Endpoint("10.96.1.1", 80),
                                           frozenset({TARGET, "10.20.0.2"}))}


def test_service_port_equal_to_the_ssh_port_is_not_relayed() -> None:
    facts = ClusterFacts(CONNECTORS, {**FACTS.source_services,
                                      SVC1: SourceServiceFacts("10.96.1.1", (80, 2022))})
    result = plan([SEED], facts, KEYS)
    assert _ingress(result, IP1) == (IngressRule(TARGET, 80, Endpoint("10.96.1.1", 80)),)
    (warning,) = result.warnings[SEED.ref]
    assert warning.reason == INGRESS_CONFLICT
    assert "port 2022 of Service ns1/my-service1 is the gateway's SSH port" in warning


def test_an_es_left_out_contributes_no_ingress() -> None:
    result = plan([SEED], FACTS, KeyMaterial({SVC2: KEY_D}, KEYS.gateway_host_keys))
    assert result.gateway == GatewayConfig(sources=())
    assert result.warnings == {}


# --- what the data plane cannot serve, and duplicates: refused, the others planned (#10) -------


@pytest.mark.parametrize(
    "address",
    ["2001:db8::5", "::1", "::ffff:127.0.0.1", "fe80::1", "::", "ff02::1", "::ffff:192.168.122.5"],
)
def test_ipv6_is_refused_and_the_others_are_planned(address: str) -> None:
    """The gateway holds and filters IPv4 only: an IPv6 source in its config used to fail
    the whole config, i.e. every other ExternalService's tunnels too."""
    canonical = str(ipaddress.ip_address(address))
    bad_target = _es("es1", [(SVC1, IP1)], target_ip=address)
    bad_source = _es("es2", [(SVC2, IP2), (SVC3, address)], [{"port": 5432}])
    good = _es("es3", [(SVC1, "192.168.122.202")], [{"port": 9000}])
    keys = KeyMaterial(KEYS.client_keys, {**KEYS.gateway_host_keys, canonical: KEY_C,
                                          "192.168.122.202": KEY_D})
    result = plan([bad_target, bad_source, good], FACTS, keys)
    assert result.problems[bad_target.ref] == (
        f"spec.targetIP: {canonical} is an IPv6 address; IPv6 is not supported yet: give an "
        "IPv4 address",
    )
    (problem,) = result.problems[bad_source.ref]
    assert problem.reason == IPV6_NOT_SUPPORTED
    assert problem.startswith(f"spec.sources[1].sourceIP: {canonical} is an IPv6 address")
    assert [s.source_ip for s in result.gateway.sources] == ["192.168.122.202"]
    assert list(result.sidecars) == [SVC1]


def _spec(sources: list[tuple[ServiceRef, str]], ports: list[dict[str, Any]],
          target_ip: str = TARGET) -> ExternalService:
    return _es("es1", sources, ports, target_ip)


@pytest.mark.parametrize(
    ("es", "reason", "message"),
    [
        pytest.param(_spec([(SVC1, IP1), (SVC2, TARGET)], [{"port": 8000}]), SOURCE_IP_IS_TARGET,
                     "spec.sources[1].sourceIP: 192.168.122.139 is also spec.targetIP; the "
                     "gateway would hold the address of the server itself: choose another "
                     "sourceIP", id="source-is-target"),
        pytest.param(_spec([(SVC1, IP1), (SVC1, IP2)], [{"port": 8000}]), SOURCE_LISTED_TWICE,
                     "spec.sources[1].service: ns1/my-service1 is already listed in "
                     "spec.sources[0]; its pods leave with one source IP: keep one",
                     id="same-service"),
        pytest.param(_spec([(SVC1, IP1)], [{"port": 8000}, {"port": 8000, "targetPort": 9000}]),
                     DUPLICATE_PORT,
                     "spec.ports[1].port: 8000 is already listed in spec.ports[0]; clients could "
                     "not tell which targetPort they reach: keep one", id="same-port"),
        pytest.param(_spec([(SVC1, IP1)], [{"port": 8000, "name": "web"},
                                           {"port": 8001, "name": "web"}]),
                     DUPLICATE_PORT_NAME,
                     "spec.ports[1].name: 'web' is already the name of spec.ports[0] (a port "
                     "without a name is called tcp-<port>); the connector Service needs unique "
                     "port names", id="same-port-name"),
        pytest.param(_spec([(SVC1, IP1)], [{"port": 8001}, {"port": 8000, "name": "tcp-8001"}]),
                     DUPLICATE_PORT_NAME, "spec.ports[1].name: 'tcp-8001' is already the name "
                     "of spec.ports[0]", id="name-of-an-unnamed-port"),
    ],
)
def test_spec_problems_with_their_reasons(es: ExternalService, reason: str, message: str) -> None:
    keys = KeyMaterial(KEYS.client_keys, {**KEYS.gateway_host_keys, TARGET: KEY_C})
    (problem,) = spec_problems(es, {})
    assert problem.reason == reason
    assert problem.startswith(message)
    good = _es("es2", [(SVC3, "192.168.122.202")], [{"port": 9000}])
    keys = KeyMaterial(KEYS.client_keys, {**keys.gateway_host_keys, "192.168.122.202": KEY_D})
    result = plan([es, good], FACTS, keys)
    assert result.problems == {es.ref: (problem,)}
    assert [s.source_ip for s in result.gateway.sources] == ["192.168.122.202"]


# --- names and addresses no ExternalService may have (W8, W1) ---------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("db.prod", id="dotted"),
        pytest.param("1db", id="leading-digit"),
        pytest.param("a" * 64, id="64-characters"),
        pytest.param("db-", id="trailing-dash"),
    ],
)
def test_a_name_no_service_can_have_is_refused_and_spares_the_others(name: str) -> None:
    bad = _es(name, [(SVC1, IP1)])
    good = _es("es2", [(SVC2, IP2)])
    result = plan([bad, good], FACTS, KEYS)
    (problem,) = result.problems[bad.ref]
    assert problem.reason == INVALID_NAME
    assert problem.startswith(f"metadata.name: {name!r} is not a DNS-1035 label")
    assert list(result.sidecars) == [SVC2]
    assert [s.source_ip for s in result.gateway.sources] == [IP2]


def test_the_longest_valid_name_is_accepted() -> None:
    es = _es("a" * 63, [(SVC1, IP1)])
    assert plan([es], FACTS, KEYS).problems == {}


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        pytest.param("127.0.0.1", "a loopback address", id="loopback"),
        pytest.param("127.1.2.3", "a loopback address", id="loopback-8"),
        pytest.param("169.254.169.254", "a link-local address", id="cloud-metadata"),
        pytest.param("0.0.0.0", "the unspecified address", id="unspecified"),
        pytest.param("0.1.2.3", "a 'this network' address", id="this-network"),
        pytest.param("224.0.0.1", "a multicast address", id="multicast"),
        pytest.param("255.255.255.255", "the broadcast address", id="broadcast"),
    ],
)
def test_reserved_target_and_source_addresses_are_refused(address: str, kind: str) -> None:
    canonical = str(ipaddress.ip_address(address))
    bad_target = _es("es1", [(SVC1, IP1)], target_ip=address)
    bad_source = _es("es2", [(SVC2, IP2), (SVC3, address)], [{"port": 5432}])
    good = _es("es3", [(SVC1, "192.168.122.202")], [{"port": 9000}])
    # Every IP has a gateway: the address itself is the only problem.
    keys = KeyMaterial(KEYS.client_keys, {**KEYS.gateway_host_keys, canonical: KEY_C,
                                          "192.168.122.202": KEY_D})
    result = plan([bad_target, bad_source, good], FACTS, keys)

    (target_problem,) = result.problems[bad_target.ref]
    assert target_problem.reason == RESERVED_ADDRESS
    assert target_problem.startswith(f"spec.targetIP: {canonical} is {kind}")
    assert "not to an external server" in target_problem
    (source_problem,) = result.problems[bad_source.ref]
    assert source_problem.reason == RESERVED_ADDRESS
    assert source_problem.startswith(f"spec.sources[1].sourceIP: {canonical} is {kind}")
    # Nothing of theirs is planned; the good one is.
    assert list(result.sidecars) == [SVC1]
    assert [r.name for r in result.sidecars[SVC1].rules] == ["default/es3:9000"]
    assert [s.source_ip for s in result.gateway.sources] == ["192.168.122.202"]


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "192.168.122.139", "100.64.0.1", "172.16.0.1", "8.8.8.8",
     "169.253.255.255", "169.255.0.1", "255.255.255.254"],
)
def test_ordinary_addresses_are_not_reserved(address: str) -> None:
    es = _es("es1", [(SVC1, IP1)], target_ip=address)
    assert plan([es], FACTS, KEYS).problems == {}


def test_a_source_ip_that_is_a_node_address_is_refused() -> None:
    facts = ClusterFacts(CONNECTORS, FACTS.source_services,
                         node_addresses={IP2: "gw1", "10.0.0.5": "worker1"})
    result = plan([SEED, _es("es1", [(SVC1, "192.168.122.202")], [{"port": 9000}])], facts,
                  KeyMaterial(KEYS.client_keys,
                              {**KEYS.gateway_host_keys, "192.168.122.202": KEY_D}))
    (problem,) = result.problems[SEED.ref]
    assert problem.reason == NODE_ADDRESS
    assert problem.startswith("spec.sources[1].sourceIP: 192.168.122.201 is an address of "
                              "node gw1")
    assert list(result.problems) == [SEED.ref]
    assert [s.source_ip for s in result.gateway.sources] == ["192.168.122.202"]


def test_a_target_ip_that_is_a_node_address_is_not_refused_here() -> None:
    # Only sourceIPs capture a node's traffic (the gateway's ingress filter); a node as
    # the target is W1's cluster-CIDR question, left to admission policy.
    facts = ClusterFacts(CONNECTORS, FACTS.source_services, node_addresses={TARGET: "gw1"})
    assert plan([SEED], facts, KEYS).problems == {}
