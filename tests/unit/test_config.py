"""SidecarConfig / GatewayConfig: strict parsing, round trips and every validation error."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from k8s_ext_connector.core.config import (
    AuthorizedClient,
    EgressRule,
    Endpoint,
    GatewayConfig,
    GatewayEndpoint,
    IngressRule,
    SidecarConfig,
    SourceIPConfig,
    canonical_public_key,
    dump,
    dump_json,
    load_gateway_config,
    load_sidecar_config,
    parse_document,
)
from k8s_ext_connector.core.errors import ConfigError
from tests.unit.samples import (
    DELETE,
    KEY_A,
    KEY_B,
    KEY_C,
    KEY_D,
    gateway_doc,
    patched,
    sidecar_doc,
)

SEED_RULE = EgressRule(
    name="default/my-externalservice:8000",
    intercept=(Endpoint("10.96.0.10", 8000), Endpoint("192.168.122.139", 8000)),
    gateway=GatewayEndpoint(address="192.168.122.200", host_key=KEY_A, port=2022),
    target=Endpoint("192.168.122.139", 8000),
)


def _rule(name: str, intercept: list[tuple[str, int]], gateway: str, key: str,
          target: tuple[str, int] = ("192.168.122.139", 8000)) -> dict[str, Any]:
    return {
        "name": name,
        "intercept": [{"address": a, "port": p} for a, p in intercept],
        "gateway": {"address": gateway, "hostKey": key},
        "target": {"address": target[0], "port": target[1]},
    }


def _assert_names(error: ConfigError, field: str, value: object) -> None:
    assert error.field == field
    assert error.value == value
    assert field in str(error)
    assert str(value) in str(error)
    assert "\n" not in str(error)


# --- happy paths -------------------------------------------------------------------------


def test_sidecar_from_dict_reads_the_seed_rule() -> None:
    config = SidecarConfig.from_dict(sidecar_doc())
    assert config == SidecarConfig(rules=(SEED_RULE,), listen_port=15001)


def test_gateway_from_dict_reads_the_seed_sources() -> None:
    config = GatewayConfig.from_dict(gateway_doc())
    allow = (Endpoint("192.168.122.139", 8000),)
    assert config == GatewayConfig(
        ssh_port=2022,
        sources=(
            SourceIPConfig("192.168.122.200", (AuthorizedClient("ns1/my-service1", KEY_C, allow),),
                           (IngressRule("192.168.122.139", 80, Endpoint("10.96.1.1", 80)),)),
            SourceIPConfig("192.168.122.201", (AuthorizedClient("ns2/my-service2", KEY_D, allow),)),
        ),
    )


@pytest.mark.parametrize(
    ("load", "doc"),
    [
        pytest.param(SidecarConfig.from_dict, sidecar_doc(), id="sidecar"),
        pytest.param(GatewayConfig.from_dict, gateway_doc(), id="gateway"),
    ],
)
def test_canonical_document_round_trips_unchanged(load: Any, doc: dict[str, Any]) -> None:
    config = load(copy.deepcopy(doc))
    assert config.to_dict() == doc
    assert load(config.to_dict()) == config


@pytest.mark.parametrize(
    ("path", "given", "canonical"),
    [
        pytest.param(("rules", 0, "gateway", "hostKey"), KEY_A + " someone@laptop\n", KEY_A,
                     id="host-key-comment-and-newline-dropped"),
        pytest.param(("rules", 0, "target", "address"), "2001:0DB8:0000::0001", "2001:db8::1",
                     id="ipv6-target-canonical"),
        pytest.param(("rules", 0, "gateway", "port"), DELETE, 2022, id="gateway-port-default"),
        pytest.param(("listenPort",), DELETE, 15001, id="listen-port-default"),
        pytest.param(("version",), DELETE, 1, id="version-default"),
        pytest.param(("listenPort",), None, 15001, id="null-means-default"),
    ],
)
def test_sidecar_to_dict_is_canonical(path: tuple[str | int, ...], given: Any,
                                      canonical: Any) -> None:
    config = SidecarConfig.from_dict(patched(sidecar_doc(), path, given))
    assert config.to_dict() == patched(sidecar_doc(), path, canonical)


def test_gateway_allow_lists_are_sorted_and_deduplicated() -> None:
    doc = gateway_doc()
    doc["sources"][0]["clients"][0]["allow"] = [
        {"address": "10.0.0.2", "port": 80},
        {"address": "10.0.0.1", "port": 443},
        {"address": "10.0.0.2", "port": 80},
        {"address": "10.0.0.1", "port": 80},
    ]
    client = GatewayConfig.from_dict(doc).sources[0].clients[0]
    assert client.allow == (Endpoint("10.0.0.1", 80), Endpoint("10.0.0.1", 443),
                            Endpoint("10.0.0.2", 80))


def test_gateway_clients_default_to_none() -> None:
    config = GatewayConfig.from_dict({"sources": [{"sourceIP": "10.0.0.1"}]})
    assert config.sources == (SourceIPConfig("10.0.0.1", ()),)


def test_rule_for_and_gateways() -> None:
    doc = sidecar_doc()
    doc["rules"].append(_rule("b", [("10.96.0.11", 5432)], "192.168.122.201", KEY_B))
    doc["rules"].append(_rule("c", [("10.96.0.12", 80)], "192.168.122.200", KEY_A))
    config = SidecarConfig.from_dict(doc)
    assert config.rule_for(Endpoint("10.96.0.11", 5432)) == config.rules[1]
    assert config.rule_for(Endpoint("192.168.122.139", 8000)) == config.rules[0]
    assert config.rule_for(Endpoint("10.96.0.11", 80)) is None
    assert [g.address for g in config.gateways()] == ["192.168.122.200", "192.168.122.201"]
    assert config.gateways()[0] == config.rules[0].gateway


@pytest.mark.parametrize(
    ("endpoint", "text"),
    [
        pytest.param(Endpoint("10.0.0.1", 80), "10.0.0.1:80", id="ipv4"),
        pytest.param(Endpoint("2001:db8::1", 443), "[2001:db8::1]:443", id="ipv6"),
    ],
)
def test_endpoint_str(endpoint: Endpoint, text: str) -> None:
    assert str(endpoint) == text


# --- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "parse", "doc"),
    [
        pytest.param(load_sidecar_config, SidecarConfig.from_dict, sidecar_doc(), id="sidecar"),
        pytest.param(load_gateway_config, GatewayConfig.from_dict, gateway_doc(), id="gateway"),
    ],
)
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_load_from_file(tmp_path: Path, load: Any, parse: Any, doc: dict[str, Any],
                        fmt: str) -> None:
    expected = parse(copy.deepcopy(doc))
    path = tmp_path / f"config.{fmt}"
    path.write_text(dump(expected) if fmt == "yaml" else dump_json(expected))
    assert load(path) == expected
    assert json.loads(dump_json(load(path))) == doc


@pytest.mark.parametrize("load", [load_sidecar_config, load_gateway_config],
                         ids=["sidecar", "gateway"])
def test_load_missing_file_names_the_path(tmp_path: Path, load: Any) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load(path)
    _assert_names(caught.value, str(path), "No such file or directory")
    assert "cannot be read" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("rules:\n- name: a\n  intercept: [\n", "line 4", id="unclosed-flow-list"),
        pytest.param("listenPort: 1\n rules: []\n", "line 2", id="bad-indent"),
        pytest.param("version: 1\nlistenPort: 15001\nrules: [}\n", "line 3", id="stray-brace"),
        pytest.param('{"rules": [1,}', "line 1", id="broken-json"),
    ],
)
def test_malformed_yaml_names_the_line(tmp_path: Path, text: str, line: str) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_sidecar_config(path)
    _assert_names(caught.value, str(path), line)
    assert "is not valid YAML/JSON" in str(caught.value)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    """Bug: ``_read`` only maps OSError; a non-UTF-8 file escapes as UnicodeDecodeError."""
    path = tmp_path / "sidecar.yaml"
    path.write_bytes(b"listenPort: \xff\xfe\n")
    with pytest.raises(ConfigError) as caught:
        load_sidecar_config(path)
    assert caught.value.field == str(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", None, id="empty"),
        pytest.param("a: 1", {"a": 1}, id="yaml"),
        pytest.param('{"a": [1, 2]}', {"a": [1, 2]}, id="json"),
    ],
)
def test_parse_document(text: str, expected: object) -> None:
    assert parse_document(text, "x") == expected


@pytest.mark.parametrize("text", ["", "   ", None, 42], ids=["empty", "blank", "null", "int"])
def test_canonical_public_key_rejects_non_lines(text: object) -> None:
    with pytest.raises(ConfigError) as caught:
        canonical_public_key(text, "hostKey")
    assert caught.value.field == "hostKey"


# --- sidecar validation errors -----------------------------------------------------------

# (path to change, new value or DELETE, expected field, expected value in the error)
SIDECAR_ERRORS = [
    pytest.param(("listenport",), 15001, "listenport", 15001, id="unknown-top-field"),
    pytest.param(("rules", 0, "gateway", "hostkey"), KEY_A, "rules[0].gateway.hostkey", KEY_A,
                 id="unknown-nested-field"),
    pytest.param(("rules", 0, "targets"), [], "rules[0].targets", [], id="unknown-rule-field"),
    pytest.param(("rules", 0, "intercept", 1, "address"), "192.168.122.300",
                 "rules[0].intercept[1].address", "192.168.122.300", id="invalid-ipv4"),
    pytest.param(("rules", 0, "gateway", "address"), "my-gateway", "rules[0].gateway.address",
                 "my-gateway", id="hostname-not-ip"),
    pytest.param(("rules", 0, "target", "address"), 3232266891, "rules[0].target.address",
                 3232266891, id="ip-as-integer"),
    pytest.param(("rules", 0, "target", "address"), "10.0.0.0/24", "rules[0].target.address",
                 "10.0.0.0/24", id="cidr-not-ip"),
    pytest.param(("rules", 0, "target", "port"), 0, "rules[0].target.port", 0, id="port-0"),
    pytest.param(("rules", 0, "target", "port"), 70000, "rules[0].target.port", 70000,
                 id="port-70000"),
    pytest.param(("rules", 0, "target", "port"), "80", "rules[0].target.port", "80",
                 id="port-string"),
    pytest.param(("rules", 0, "target", "port"), True, "rules[0].target.port", True,
                 id="port-true"),
    pytest.param(("rules", 0, "intercept", 0, "port"), -1, "rules[0].intercept[0].port", -1,
                 id="port-negative"),
    pytest.param(("rules", 0, "gateway", "port"), 65536, "rules[0].gateway.port", 65536,
                 id="gateway-port-65536"),
    pytest.param(("listenPort",), 0, "listenPort", 0, id="listen-port-0"),
    pytest.param(("listenPort",), 8000.0, "listenPort", 8000.0, id="listen-port-float"),
    pytest.param(("version",), 2, "version", 2, id="version-2"),
    pytest.param(("rules",), DELETE, "rules", None, id="missing-rules"),
    pytest.param(("rules",), {"name": "x"}, "rules", {"name": "x"}, id="rules-not-a-list"),
    pytest.param(("rules", 0, "name"), DELETE, "rules[0].name", None, id="missing-name"),
    pytest.param(("rules", 0, "name"), "", "rules[0].name", "", id="empty-name"),
    pytest.param(("rules", 0, "target"), DELETE, "rules[0].target", None, id="missing-target"),
    pytest.param(("rules", 0, "target"), "192.168.122.139:8000", "rules[0].target",
                 "192.168.122.139:8000", id="target-not-a-mapping"),
    pytest.param(("rules", 0, "target", "port"), DELETE, "rules[0].target.port", None,
                 id="missing-target-port"),
    pytest.param(("rules", 0, "gateway", "hostKey"), DELETE, "rules[0].gateway.hostKey", None,
                 id="missing-host-key"),
    pytest.param(("rules", 0, "intercept"), [], "rules[0].intercept", [], id="empty-intercept"),
    # one destination intercepted by two rules
    pytest.param(("rules", 1),
                 _rule("b", [("10.96.0.11", 80), ("10.96.0.10", 8000)], "192.168.122.200", KEY_A),
                 "rules[1].intercept[1]", "10.96.0.10:8000",
                 id="intercept-duplicated-across-rules"),
    # a rule intercepting its own gateway's SSH endpoint, and another rule's
    pytest.param(("rules", 0, "intercept", 2), {"address": "192.168.122.200", "port": 2022},
                 "rules[0].intercept[2]", "192.168.122.200:2022", id="intercepts-own-gateway"),
    pytest.param(("rules", 1), _rule("b", [("192.168.122.200", 2022)], "192.168.122.201", KEY_B),
                 "rules[1].intercept[0]", "192.168.122.200:2022",
                 id="intercepts-other-rules-gateway"),
    # the same gateway endpoint pinned with two host keys
    pytest.param(("rules", 1), _rule("b", [("10.96.0.11", 80)], "192.168.122.200", KEY_B),
                 "rules[1].gateway.hostKey", "192.168.122.200:2022", id="conflicting-host-keys"),
    pytest.param(("rules", 1),
                 _rule("b", [("10.96.0.11", 80)], "2001:db8::1", KEY_B),
                 None, None, id="other-gateway-other-key-ok"),
]


@pytest.mark.parametrize(("path", "value", "field", "shown"), SIDECAR_ERRORS)
def test_sidecar_validation_error(path: tuple[str | int, ...], value: Any, field: str | None,
                                  shown: object) -> None:
    doc = patched(sidecar_doc(), path, value)
    if field is None:
        SidecarConfig.from_dict(doc)  # the control case: valid
        return
    with pytest.raises(ConfigError) as caught:
        SidecarConfig.from_dict(doc)
    _assert_names(caught.value, field, shown)


@pytest.mark.parametrize("data", [None, [], "rules: []", 3], ids=["null", "list", "str", "int"])
def test_top_level_must_be_a_mapping(data: object) -> None:
    for load in (SidecarConfig.from_dict, GatewayConfig.from_dict):
        with pytest.raises(ConfigError) as caught:
            load(data)
        assert caught.value.field == "(top level)"
        assert "must be a mapping" in str(caught.value)


# Keys that are not OpenSSH public keys. The error may show the start of the text but must
# never echo the whole key (nor its base64 blob) back into logs and status.
_BLOB = KEY_A.split()[1]
BAD_KEYS = [
    pytest.param(KEY_A[:-12], id="truncated"),
    pytest.param(KEY_A[:40] + "!!!!" + KEY_A[44:], id="corrupted-base64"),
    pytest.param("ssh-ed25519 " + _BLOB[::-1], id="wrong-blob"),
    pytest.param("ssh-rsa " + _BLOB, id="wrong-algorithm"),
    pytest.param("-----BEGIN OPENSSH PRIVATE KEY-----\n" + _BLOB + "\n", id="private-key-like"),
    pytest.param("not a key at all, but long enough to be cut", id="garbage"),
]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_host_key_is_named_but_not_echoed(bad: str) -> None:
    doc = patched(sidecar_doc(), ("rules", 0, "gateway", "hostKey"), bad)
    with pytest.raises(ConfigError) as caught:
        SidecarConfig.from_dict(doc)
    error = caught.value
    assert error.field == "rules[0].gateway.hostKey"
    assert "is not an OpenSSH public key" in str(error)
    assert bad.strip() not in str(error)
    assert _BLOB not in str(error)
    assert _BLOB[-16:] not in str(error)
    assert str(error.value) in str(error)


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_client_public_key_is_named_but_not_echoed(bad: str) -> None:
    doc = patched(gateway_doc(), ("sources", 1, "clients", 0, "publicKey"), bad)
    with pytest.raises(ConfigError) as caught:
        GatewayConfig.from_dict(doc)
    error = caught.value
    assert error.field == "sources[1].clients[0].publicKey"
    assert bad.strip() not in str(error)
    assert _BLOB not in str(error)


# --- gateway validation errors -----------------------------------------------------------

GATEWAY_ERRORS = [
    pytest.param(("sshport",), 2022, "sshport", 2022, id="unknown-top-field"),
    pytest.param(("sources", 0, "clients", 0, "allowed"), [], "sources[0].clients[0].allowed", [],
                 id="unknown-client-field"),
    pytest.param(("sources", 0, "sourceIP"), "192.168.122.256", "sources[0].sourceIP",
                 "192.168.122.256", id="invalid-source-ip"),
    pytest.param(("sources", 0, "clients", 0, "allow", 0, "address"), "example.com",
                 "sources[0].clients[0].allow[0].address", "example.com", id="invalid-allow-ip"),
    pytest.param(("sshPort",), 0, "sshPort", 0, id="ssh-port-0"),
    pytest.param(("sshPort",), 70000, "sshPort", 70000, id="ssh-port-70000"),
    pytest.param(("sshPort",), "22", "sshPort", "22", id="ssh-port-string"),
    pytest.param(("sshPort",), True, "sshPort", True, id="ssh-port-true"),
    pytest.param(("sources", 0, "clients", 0, "allow", 0, "port"), 0,
                 "sources[0].clients[0].allow[0].port", 0, id="allow-port-0"),
    pytest.param(("sources",), DELETE, "sources", None, id="missing-sources"),
    pytest.param(("sources", 0, "sourceIP"), DELETE, "sources[0].sourceIP", None,
                 id="missing-source-ip"),
    pytest.param(("sources", 0, "clients", 0, "name"), DELETE, "sources[0].clients[0].name", None,
                 id="missing-client-name"),
    pytest.param(("sources", 0, "clients", 0, "allow"), DELETE, "sources[0].clients[0].allow",
                 None, id="missing-allow"),
    pytest.param(("sources", 0, "clients", 0, "publicKey"), DELETE,
                 "sources[0].clients[0].publicKey", None, id="missing-public-key"),
    pytest.param(("sources", 1, "sourceIP"), "192.168.122.200", "sources[1].sourceIP",
                 "192.168.122.200", id="duplicate-source-ip"),
    pytest.param(("sources", 2), {"sourceIP": "2001:0db8::0001"}, None, None,
                 id="ipv6-source-ok"),
    pytest.param(("sources", 1, "clients", 1),
                 {"name": "ns3/again", "publicKey": KEY_D + " other-comment", "allow": []},
                 "sources[1].clients[1].publicKey", "ns3/again", id="duplicate-client-key"),
    pytest.param(("sources", 1, "clients", 1),
                 {"name": "ns1/my-service1", "publicKey": KEY_C, "allow": []},
                 None, None, id="same-key-on-another-source-ok"),
    pytest.param(("sources", 0, "ingress", 0, "port"), 2022, "sources[0].ingress[0].port", 2022,
                 id="ingress-port-is-ssh-port"),
    pytest.param(("sources", 0, "ingress", 0, "allowfrom"), "10.0.0.1",
                 "sources[0].ingress[0].allowfrom", "10.0.0.1", id="unknown-ingress-field"),
    pytest.param(("sources", 0, "ingress", 0, "allowFrom"), "any",
                 "sources[0].ingress[0].allowFrom", "any", id="ingress-allow-from-not-an-ip"),
    pytest.param(("sources", 0, "ingress", 0, "allowFrom"), "0.0.0.0/0",
                 "sources[0].ingress[0].allowFrom", "0.0.0.0/0", id="ingress-allow-from-a-cidr"),
    pytest.param(("sources", 0, "ingress", 0, "allowFrom"), "2001:db8::1",
                 "sources[0].ingress[0].allowFrom", "2001:db8::1", id="ingress-other-family"),
    pytest.param(("sources", 0, "ingress", 0, "port"), 0, "sources[0].ingress[0].port", 0,
                 id="ingress-port-0"),
    pytest.param(("sources", 0, "ingress", 0, "backend"), DELETE, "sources[0].ingress[0].backend",
                 None, id="ingress-missing-backend"),
    pytest.param(("sources", 0, "ingress", 0, "backend", "address"), "my-service1.ns1",
                 "sources[0].ingress[0].backend.address", "my-service1.ns1",
                 id="ingress-backend-not-an-ip"),
    pytest.param(("sources", 0, "ingress", 1),
                 {"allowFrom": "192.168.122.139", "port": 80,
                  "backend": {"address": "10.96.1.1", "port": 80}},
                 "sources[0].ingress[1]", "10.96.1.1:80", id="ingress-entry-repeated"),
    pytest.param(("sources", 0, "ingress", 1),
                 {"allowFrom": "192.168.122.140", "port": 80,
                  "backend": {"address": "10.96.1.9", "port": 80}},
                 "sources[0].ingress[1].backend", "10.96.1.9:80", id="ingress-port-two-backends"),
    pytest.param(("sources", 0, "ingress", 1),
                 {"allowFrom": "192.168.122.140", "port": 80,
                  "backend": {"address": "10.96.1.1", "port": 80}},
                 None, None, id="ingress-port-two-peers-ok"),
    pytest.param(("sources", 1, "ingress"),
                 [{"allowFrom": "192.168.122.139", "port": 80,
                   "backend": {"address": "10.96.1.2", "port": 80}}],
                 None, None, id="ingress-same-port-on-another-source-ip-ok"),
    pytest.param(("sources", 0, "ingress", 0, "backend", "port"), 2022, None, None,
                 id="ingress-backend-port-may-be-anything"),
    pytest.param(("sshAllowFrom",), "10.244.0.0/16", "sshAllowFrom", "10.244.0.0/16",
                 id="ssh-allow-from-not-a-list"),
    pytest.param(("sshAllowFrom",), ["10.244.0.0/16", "10.244.1.5/24"], "sshAllowFrom[1]",
                 "10.244.1.5/24", id="ssh-allow-from-host-bits"),
    pytest.param(("sshAllowFrom",), ["pods"], "sshAllowFrom[0]", "pods",
                 id="ssh-allow-from-not-a-cidr"),
    pytest.param(("sshAllowFrom",), [24], "sshAllowFrom[0]", 24, id="ssh-allow-from-number"),
    pytest.param(("sshAllowFrom",), ["10.244.0.0/16", "fd00::/64", "192.168.122.10"], None,
                 None, id="ssh-allow-from-both-families-and-a-bare-address-ok"),
]


@pytest.mark.parametrize(("path", "value", "field", "shown"), GATEWAY_ERRORS)
def test_gateway_validation_error(path: tuple[str | int, ...], value: Any, field: str | None,
                                  shown: object) -> None:
    doc = patched(gateway_doc(), path, value)
    if field is None:
        GatewayConfig.from_dict(doc)  # the control case: valid
        return
    with pytest.raises(ConfigError) as caught:
        GatewayConfig.from_dict(doc)
    _assert_names(caught.value, field, shown)


def test_duplicate_source_ip_detected_across_spellings() -> None:
    doc = {"sources": [{"sourceIP": "2001:db8::1"}, {"sourceIP": "2001:0DB8:0:0::1"}]}
    with pytest.raises(ConfigError) as caught:
        GatewayConfig.from_dict(doc)
    _assert_names(caught.value, "sources[1].sourceIP", "2001:db8::1")
    assert "sources[0]" in caught.value.reason


def test_config_error_within_nests_the_field() -> None:
    error = ConfigError("rules[0].name", "", "must be a non-empty string").within("cm/sidecar")
    assert error.field == "cm/sidecar.rules[0].name"
    assert str(error) == "cm/sidecar.rules[0].name: '': must be a non-empty string"
    assert ConfigError("", 1, "bad").within("x").field == "x"


def test_ingress_port_equal_to_ssh_port_says_why() -> None:
    doc = patched(gateway_doc(), ("sshPort",), 80)
    with pytest.raises(ConfigError) as caught:
        GatewayConfig.from_dict(doc)
    _assert_names(caught.value, "sources[0].ingress[0].port", 80)
    assert "sshPort" in caught.value.reason


def test_ingress_ports_group_peers_per_listener() -> None:
    doc = patched(gateway_doc(), ("sources", 0, "ingress", 1),
                  {"allowFrom": "192.168.122.140", "port": 80,
                   "backend": {"address": "10.96.1.1", "port": 80}})
    doc = patched(doc, ("sources", 0, "ingress", 2),
                  {"allowFrom": "192.168.122.139", "port": 443,
                   "backend": {"address": "10.96.1.1", "port": 8443}})
    source = GatewayConfig.from_dict(doc).sources[0]
    assert source.ingress_ports() == {
        80: (Endpoint("10.96.1.1", 80), frozenset({"192.168.122.139", "192.168.122.140"})),
        443: (Endpoint("10.96.1.1", 8443), frozenset({"192.168.122.139"})),
    }


def test_ssh_allow_from_is_canonical_deduplicated_and_round_trips() -> None:
    doc = patched(gateway_doc(), ("sshAllowFrom",),
                  ["fd00:0:0::/64", "192.168.122.10", "10.244.0.0/16", "10.244.0.0/16"])
    config = GatewayConfig.from_dict(doc)
    assert config.ssh_allow_from == ("10.244.0.0/16", "192.168.122.10/32", "fd00::/64")
    assert GatewayConfig.from_dict(config.to_dict()) == config
    assert "sshAllowFrom" not in GatewayConfig.from_dict(gateway_doc()).to_dict()


def test_egress_only_source_has_no_ingress_key() -> None:
    config = GatewayConfig.from_dict(gateway_doc())
    assert "ingress" not in config.sources[1].to_dict()
    assert config.sources[1].ingress == ()
