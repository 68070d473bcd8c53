"""ExternalService parsing: the seed's manifest applies unchanged; what it cannot serve fails."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from k8s_ext_connector.core.api import (
    ExternalPort,
    ExternalService,
    ExternalServiceSpec,
    ServiceRef,
    Source,
)
from k8s_ext_connector.core.errors import ConfigError
from tests.unit.samples import DELETE, SEED_MANIFEST, patched, seed_spec

SEED_SOURCES = (
    Source(ServiceRef("ns1", "my-service1"), "192.168.122.200"),
    Source(ServiceRef("ns2", "my-service2"), "192.168.122.201"),
)


def test_seed_manifest_applies_unchanged() -> None:
    es = ExternalService.from_object(yaml.safe_load(SEED_MANIFEST))
    assert es == ExternalService(
        namespace="default",
        name="my-externalservice",
        spec=ExternalServiceSpec(
            target_ip="192.168.122.139",
            sources=SEED_SOURCES,
            ports=(ExternalPort(port=8000, target_port=8000, protocol="TCP"),),
        ),
    )
    assert es.ref == ServiceRef("default", "my-externalservice")
    assert str(es.ref) == "default/my-externalservice"


def test_object_keeps_its_namespace_and_ignores_status() -> None:
    obj = yaml.safe_load(SEED_MANIFEST)
    obj["metadata"] |= {"namespace": "team-a", "uid": "1234", "generation": 3}
    obj["status"] = {"conditions": []}
    es = ExternalService.from_object(obj)
    assert es.ref == ServiceRef("team-a", "my-externalservice")
    assert es.spec == ExternalServiceSpec.from_dict(seed_spec())


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        pytest.param({"port": 8000}, ExternalPort(8000, 8000), id="target-port-defaults-to-port"),
        pytest.param({"port": 80, "targetPort": 8080}, ExternalPort(80, 8080),
                     id="target-port-differs"),
        pytest.param({"port": 80, "targetPort": None}, ExternalPort(80, 80), id="null-target-port"),
        pytest.param({"port": 5432, "protocol": "TCP", "name": "pg"},
                     ExternalPort(5432, 5432, "TCP", "pg"), id="named-port"),
    ],
)
def test_ports(port: dict[str, Any], expected: ExternalPort) -> None:
    spec = ExternalServiceSpec.from_dict(patched(seed_spec(), ("ports", 0), port))
    assert spec.ports == (expected,)


# IPv6 parses (canonically); the planner refuses it as IPv6NotSupported (test_planner.py).
@pytest.mark.parametrize(
    ("target", "canonical"),
    [
        pytest.param("2001:db8::139", "2001:db8::139", id="ipv6"),
        pytest.param("2001:0DB8:0000:0000::0139", "2001:db8::139", id="ipv6-canonicalised"),
        pytest.param("fd00::1", "fd00::1", id="ula"),
    ],
)
def test_ipv6_target_ip_accepted(target: str, canonical: str) -> None:
    spec = ExternalServiceSpec.from_dict(patched(seed_spec(), ("targetIP",), target))
    assert spec.target_ip == canonical


# (path to change, new value or DELETE, expected field, expected value, words in the reason)
SPEC_ERRORS = [
    pytest.param(("ports", 0, "targetPort"), "http", "spec.ports[0].targetPort", "http",
                 "no named ports", id="named-target-port"),
    pytest.param(("ports", 0, "protocol"), "UDP", "spec.ports[0].protocol", "UDP", "TCP",
                 id="udp"),
    pytest.param(("ports", 0, "protocol"), "SCTP", "spec.ports[0].protocol", "SCTP", "TCP",
                 id="sctp"),
    pytest.param(("sources",), [], "spec.sources", [], "at least one source",
                 id="empty-sources"),
    pytest.param(("ports",), [], "spec.ports", [], "at least one port", id="empty-ports"),
    pytest.param(("ports", 0, "port"), 0, "spec.ports[0].port", 0, "1-65535", id="port-0"),
    pytest.param(("ports", 0, "port"), 70000, "spec.ports[0].port", 70000, "1-65535",
                 id="port-70000"),
    pytest.param(("ports", 0, "port"), "8000", "spec.ports[0].port", "8000", "1-65535",
                 id="port-string"),
    pytest.param(("ports", 0, "targetPort"), 0, "spec.ports[0].targetPort", 0, "1-65535",
                 id="target-port-0"),
    pytest.param(("ports", 0, "port"), DELETE, "spec.ports[0].port", None, "required",
                 id="missing-port"),
    pytest.param(("targetIP",), "192.168.122.1390", "spec.targetIP", "192.168.122.1390",
                 "dotted-quad", id="invalid-target-ip"),
    pytest.param(("targetIP",), "192.168.122.010", "spec.targetIP", "192.168.122.010",
                 "without leading zeros", id="leading-zero"),
    pytest.param(("sources", 0, "sourceIP"), "192.168.122.00", "spec.sources[0].sourceIP",
                 "192.168.122.00", "without leading zeros", id="leading-zero-source"),
    pytest.param(("targetIP",), DELETE, "spec.targetIP", None, "required",
                 id="missing-target-ip"),
    pytest.param(("sources", 1, "sourceIP"), "192.168.122", "spec.sources[1].sourceIP",
                 "192.168.122", "dotted-quad", id="invalid-source-ip"),
    pytest.param(("sources", 0, "service", "name"), DELETE, "spec.sources[0].service.name", None,
                 "required", id="missing-service-name"),
    pytest.param(("sources", 0, "service", "nam"), "x", "spec.sources[0].service.nam", "x",
                 "unknown field", id="unknown-service-field"),
    pytest.param(("sources", 0, "service"), "ns1/my-service1", "spec.sources[0].service",
                 "ns1/my-service1", "mapping", id="service-not-a-mapping"),
    pytest.param(("sourceIP",), "192.168.122.200", "spec.sourceIP", "192.168.122.200",
                 "unknown field", id="unknown-spec-field"),
]


@pytest.mark.parametrize(("path", "value", "field", "shown", "reason"), SPEC_ERRORS)
def test_spec_error(path: tuple[str | int, ...], value: Any, field: str, shown: object,
                    reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ExternalServiceSpec.from_dict(patched(seed_spec(), path, value))
    error = caught.value
    assert error.field == field
    assert error.value == shown
    assert field in str(error)
    assert str(shown) in str(error)
    assert reason in error.reason


def test_udp_message_mentions_tcp() -> None:
    with pytest.raises(ConfigError, match=r"spec\.ports\[0\]\.protocol: 'UDP': only TCP"):
        ExternalServiceSpec.from_dict(patched(seed_spec(), ("ports", 0, "protocol"), "UDP"))


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        pytest.param({"spec": seed_spec()}, "metadata", id="missing-metadata"),
        pytest.param({"metadata": {}, "spec": seed_spec()}, "metadata.name", id="missing-name"),
        pytest.param({"metadata": {"name": "x"}}, "spec", id="missing-spec"),
        pytest.param({"metadata": {"name": "x"}, "spec": []}, "spec", id="spec-not-a-mapping"),
    ],
)
def test_object_errors(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ExternalService.from_object(obj)
    assert caught.value.field == field
