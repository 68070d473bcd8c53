"""The CRD and the RBAC manifest: valid Kubernetes objects, a schema that reads well, accepts
the seed's example and rejects each invalid field, printer columns backed by real status."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel

from k8s_ext_connector.core.api import ExternalServiceSpec, ServiceRef
from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.operator import rbac
from k8s_ext_connector.operator.desired import KeyBook, OperatorSettings, Snapshot, compute
from k8s_ext_connector.operator.snapshot import ServiceRecord, externalservice_record
from tests.unit.samples import SEED_MANIFEST

CHART = Path(__file__).parents[2] / "charts" / "k8s-ext-connector"
CRD_PATH = CHART / "crds" / "externalservices.submariner.io.yaml"
RULES_PATH = CHART / "files" / "rbac-rules.yaml"
COMPONENTS = sorted(rbac.COMPONENTS)
CRD = yaml.safe_load(CRD_PATH.read_text())
VERSION = CRD["spec"]["versions"][0]
CEL = celpy.Environment()
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def test_crd_passes_strict_kubernetes_validation() -> None:
    kubernetes_validate.validate(CRD, "1.32.0", strict=True)


def test_chart_rules_file_is_what_the_code_renders() -> None:
    assert RULES_PATH.read_text() == rbac.render_chart_rules(), (
        f"run: k8s-ext-connector rbac rules > {RULES_PATH}"
    )


@pytest.mark.parametrize("component", COMPONENTS)
def test_hand_install_rbac_passes_strict_validation(component: str) -> None:
    documents = list(yaml.safe_load_all(rbac.render(component)))
    assert documents, component
    for document in documents:
        kubernetes_validate.validate(document, "1.32.0", strict=True)


def test_rbac_never_reads_secrets() -> None:
    assert not rbac.allowed("", "secrets", "get")
    assert not rbac.allowed("", "secrets", "list")
    assert not rbac.allowed("", "secrets", "watch")


def _walk(schema: dict[str, Any], path: str) -> list[str]:
    """Paths of properties that lack a description (kubectl explain would show nothing)."""
    missing = []
    for name, prop in (schema.get("properties") or {}).items():
        where = f"{path}.{name}"
        if name != "metadata" and not prop.get("description"):
            missing.append(where)
        missing += _walk(prop, where)
        if "items" in prop:
            missing += _walk(prop["items"], where + "[]")
    return missing


def test_every_field_has_a_description() -> None:
    assert _walk(SCHEMA, "") == []


def test_names_status_and_columns() -> None:
    assert CRD["spec"]["group"] == "submariner.io"
    assert CRD["spec"]["scope"] == "Namespaced"
    assert CRD["spec"]["names"]["kind"] == "ExternalService"
    assert "extsvc" in CRD["spec"]["names"]["shortNames"]
    assert VERSION["subresources"] == {"status": {}}
    assert [c["name"] for c in VERSION["additionalPrinterColumns"]] == [
        "Target",
        "Sources",
        "Ready",
        "Generation",
        "Observed",
        "Age",
    ]


# Property names that are CEL keywords are seen by the API server's CEL as __<name>__.
_CEL_RESERVED = {"namespace", "in", "as", "break", "const", "continue", "else", "for",
                 "function", "if", "import", "let", "loop", "package", "return", "var",
                 "void", "while", "true", "false", "null"}


def _escaped(value: Any) -> Any:
    if isinstance(value, dict):
        return {(f"__{k}__" if k in _CEL_RESERVED else k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


def _evaluate(expression: str, value: Any) -> Any:
    return CEL.program(CEL.compile(expression)).evaluate({"self": json_to_cel(_escaped(value))})


def _cel_failures(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule where it sits, as the API server does
    (``self`` is the value at that node), with cel-python; the messages of the failures
    (from ``messageExpression`` where there is one, as the server shows them)."""
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        result = _evaluate(rule["rule"], value)
        if not (isinstance(result, celtypes.BoolType) and bool(result)):
            message = rule["message"]
            if "messageExpression" in rule:
                message = str(_evaluate(rule["messageExpression"], value))
            failures.append(f"{path or '<root>'}: {' '.join(message.split())}")
    if isinstance(value, dict):
        for name, child in (schema.get("properties") or {}).items():
            if name in value:
                failures += _cel_failures(child, value[name], f"{path}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            failures += _cel_failures(schema["items"], item, f"{path}[{index}]")
    return failures


def _validate(obj: dict[str, Any]) -> None:
    jsonschema.validate(obj, SCHEMA, format_checker=jsonschema.FormatChecker())
    if failures := _cel_failures(SCHEMA, obj):
        raise jsonschema.ValidationError("; ".join(failures))


SEED = yaml.safe_load(SEED_MANIFEST)


def test_the_seed_example_is_accepted_unchanged() -> None:
    _validate(SEED)
    ExternalServiceSpec.from_dict(SEED["spec"])


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    obj: dict[str, Any] = copy.deepcopy(SEED)
    target: Any = obj
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return obj


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("spec", "targetIP"), "300.1.1.1", id="targetIP-not-an-ip"),
        pytest.param(("spec", "targetIP"), "server.example", id="targetIP-a-name"),
        pytest.param(("spec", "targetIP"), _DELETE, id="targetIP-missing"),
        pytest.param(("spec", "sources"), [], id="no-sources"),
        pytest.param(("spec", "sources", 0, "sourceIP"), "1.2.3", id="sourceIP-bad"),
        pytest.param(("spec", "sources", 0, "service", "name"), "My_Service", id="svc-name-bad"),
        pytest.param(("spec", "sources", 0, "service", "namespace"), _DELETE, id="svc-ns-missing"),
        pytest.param(("spec", "ports"), [], id="no-ports"),
        pytest.param(("spec", "ports", 0, "port"), 0, id="port-0"),
        pytest.param(("spec", "ports", 0, "port"), 70000, id="port-70000"),
        pytest.param(("spec", "ports", 0, "targetPort"), "http", id="targetPort-named"),
        pytest.param(("spec", "ports", 0, "protocol"), "UDP", id="udp"),
        pytest.param(("spec", "ports", 0, "name"), "HTTP", id="port-name-upper"),
    ],
)
def test_invalid_fields_are_rejected(path: tuple[Any, ...], value: Any) -> None:
    obj = _with(path, value)
    with pytest.raises(jsonschema.ValidationError):
        _validate(obj)
    with pytest.raises(ConfigError):  # the operator's own parser agrees
        ExternalServiceSpec.from_dict(obj["spec"])


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("my-externalservice", True),
        ("a" * 63, True),
        ("db.prod", False),
        ("1db", False),
        ("db-", False),
        ("a" * 64, False),
    ],
)
def test_names_no_connector_service_can_have_are_refused_at_apply(
    name: str, accepted: bool
) -> None:
    """The CRD's CEL rule and the planner's InvalidName agree on every case."""
    obj = _with(("metadata", "name"), name)
    failures = _cel_failures(SCHEMA, obj)
    assert (failures == []) is accepted, failures
    if not accepted:
        assert "metadata.name must be a DNS-1035 label" in failures[0]


def _ports(*ports: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", **port} for port in ports]


SVC1, SVC2 = SEED["spec"]["sources"][0]["service"], SEED["spec"]["sources"][1]["service"]

# What the data plane cannot serve or the operator refuses, refused at apply by the CRD with
# a message naming the value, and in status by the operator (for objects that got past an
# older CRD or another API server): (change, words of the CRD's message, operator's reason).
REFUSED = [
    pytest.param(("spec", "targetIP"), "2001:db8::10",
                 ".spec.targetIP: targetIP 2001:db8::10 is IPv6, which is not supported yet",
                 "IPv6NotSupported", id="ipv6-target"),
    pytest.param(("spec", "sources", 0, "sourceIP"), "2001:db8::5",
                 ".spec.sources[0].sourceIP: sourceIP 2001:db8::5 is IPv6, which is not "
                 "supported yet", "IPv6NotSupported", id="ipv6-source"),
    pytest.param(("spec", "sources", 0, "sourceIP"), "::ffff:192.168.122.200",
                 "is IPv6, which is not supported yet", "IPv6NotSupported", id="ipv4-mapped"),
    pytest.param(("spec", "targetIP"), "192.168.122.010",
                 ".spec.targetIP: targetIP 192.168.122.010 is not an IPv4 address in "
                 "dotted-quad form without leading zeros", "InvalidSpec", id="leading-zero"),
    pytest.param(("spec", "sources", 1, "sourceIP"), "192.168.122.00",
                 "sourceIP 192.168.122.00 is not an IPv4 address", "InvalidSpec",
                 id="leading-zero-source"),
    pytest.param(("spec", "sources", 1, "sourceIP"), " 192.168.122.201",
                 "is not an IPv4 address", "InvalidSpec", id="space"),
    pytest.param(("spec", "targetIP"), "127.0.0.1",
                 "targetIP 127.0.0.1 is a reserved address", "ReservedAddress", id="loopback"),
    pytest.param(("spec", "sources", 0, "sourceIP"), "169.254.169.254",
                 "sourceIP 169.254.169.254 is a reserved address", "ReservedAddress",
                 id="link-local"),
    pytest.param(("spec", "sources", 0, "sourceIP"), "0.1.2.3",
                 "is a reserved address", "ReservedAddress", id="this-network"),
    pytest.param(("spec", "targetIP"), "239.1.1.1", "is a reserved address", "ReservedAddress",
                 id="multicast"),
    pytest.param(("spec", "targetIP"), "255.255.255.255", "is a reserved address",
                 "ReservedAddress", id="broadcast"),
    pytest.param(("spec", "sources", 1, "sourceIP"), "192.168.122.200",
                 ".spec.sources: a sourceIP is listed more than once",
                 "DuplicateSourceIP", id="same-source-ip"),
    pytest.param(("spec", "sources", 1, "service"), SVC1,
                 ".spec.sources: a Service is listed more than once",
                 "SourceListedTwice", id="same-service"),
    pytest.param(("spec", "sources", 1, "sourceIP"), "192.168.122.139",
                 ".spec: sourceIP 192.168.122.139 is also the targetIP", "SourceIPIsTarget",
                 id="source-is-target"),
    pytest.param(("spec", "ports"), _ports({"port": 8000}, {"port": 8000, "targetPort": 9000}),
                 ".spec.ports: a port is listed more than once", "DuplicatePort",
                 id="same-port"),
    pytest.param(("spec", "ports"),
                 _ports({"port": 8000, "name": "web"}, {"port": 8001, "name": "web"}),
                 ".spec.ports: a port name is used more than once", "DuplicatePortName",
                 id="same-port-name"),
]


def _accepted(obj: dict[str, Any]) -> tuple[str, str]:
    """The operator's Accepted condition for ``obj`` (status, reason)."""
    body = {**obj, "metadata": {**obj["metadata"], "namespace": "default", "generation": 1}}
    services = {
        ref: ServiceRecord(ref, "10.96.0.10", (("app", ref.name),), (80,))
        for ref in (ServiceRef("ns1", "my-service1"), ServiceRef("ns2", "my-service2"))
    }
    snapshot = Snapshot([externalservice_record(body)], services, [], [])
    status = compute(snapshot, KeyBook(), OperatorSettings()).statuses[
        ServiceRef("default", obj["metadata"]["name"])
    ]
    accepted = next(c for c in status["conditions"] if c["type"] == "Accepted")
    return accepted["status"], accepted["reason"]


@pytest.mark.parametrize(("path", "value", "message", "reason"), REFUSED)
def test_the_crd_refuses_what_the_operator_refuses(
    path: tuple[Any, ...], value: Any, message: str, reason: str
) -> None:
    obj = _with(path, value)
    failures = _cel_failures(SCHEMA, obj)
    assert any(message in failure for failure in failures), failures
    assert _accepted(obj) == ("False", reason)


def test_a_name_that_an_unnamed_port_gets_is_the_operators_to_refuse() -> None:
    """Port 8001 without a name is tcp-8001 on the connector Service. A CEL rule building
    'tcp-' + string(port) exceeds the API server's estimated cost budget, so only the
    operator refuses this one."""
    obj = _with(("spec", "ports"), _ports({"port": 8001}, {"port": 8000, "name": "tcp-8001"}))
    assert _cel_failures(SCHEMA, obj) == []
    assert _accepted(obj) == ("False", "DuplicatePortName")


@pytest.mark.parametrize(
    "address",
    ["192.168.122.10", "1.2.3.4", "10.0.0.0", "100.64.0.1", "126.255.255.255", "128.0.0.1",
     "169.253.1.1", "169.255.0.1", "172.16.0.1", "203.0.113.200", "223.255.255.255",
     "240.0.0.1", "255.255.255.254"],
)
def test_addresses_the_operator_accepts_pass_the_crd(address: str) -> None:
    obj = _with(("spec", "targetIP"), address)
    assert _cel_failures(SCHEMA, obj) == []
    assert _accepted(obj) == ("True", "Valid")


def test_the_seed_passes_every_rule_and_the_operator() -> None:
    assert _cel_failures(SCHEMA, SEED) == []
    assert _accepted(SEED) == ("True", "Valid")


def test_ip_fields_have_no_lenient_format() -> None:
    """The API server's format: ipv4 takes leading zeros and says "must be of type ipv4"
    where IPv6 is meant: the CEL rules above decide, with their messages."""
    spec = SCHEMA["properties"]["spec"]["properties"]
    for field in (spec["targetIP"], spec["sources"]["items"]["properties"]["sourceIP"]):
        assert "format" not in field
        assert "anyOf" not in field


def test_the_udp_rule_says_why() -> None:
    assert _cel_failures(SCHEMA, _with(("spec", "ports", 0, "protocol"), "UDP")) == [
        ".spec.ports[0].protocol: only TCP is supported for now (UDP is planned)"
    ]


def _jsonpath(obj: dict[str, Any], path: str) -> Any:
    value: Any = obj
    for key in path.strip(".").split("."):
        value = value[key]
    return value


def test_printer_columns_point_at_fields_the_operator_writes() -> None:
    body = {
        "metadata": {
            "name": "my-externalservice",
            "namespace": "default",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "generation": 1,
        },
        "spec": SEED["spec"],
    }
    snapshot = Snapshot([externalservice_record(body)], {}, [], [])
    status = compute(snapshot, KeyBook(), OperatorSettings()).statuses[
        ServiceRef("default", "my-externalservice")
    ]
    obj = {**body, "status": status}
    for column in VERSION["additionalPrinterColumns"]:
        assert _jsonpath(obj, column["jsonPath"]) is not None, column
    status_schema = SCHEMA["properties"]["status"]["properties"]
    assert set(status) <= set(status_schema), "status fields the CRD would prune"
