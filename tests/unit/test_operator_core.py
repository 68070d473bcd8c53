"""The operator's pure parts: records, gateway assignment, desired objects, status, Lease."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from k8s_ext_connector.core.api import GATEWAY_NODE_LABEL, ServiceRef
from k8s_ext_connector.core.gateway_status import UNSERVED_ANNOTATION, lease_body, released_body
from k8s_ext_connector.core.planner import Problem
from k8s_ext_connector.operator.assign import assign_gateways, eligible_nodes
from k8s_ext_connector.operator.desired import (
    GATEWAY_CONFIGMAP,
    KeyBook,
    ObjectRef,
    OperatorSettings,
    Snapshot,
    compute,
    condition_events,
    externalservice_label,
    foreign_object,
    with_transition_times,
    write_rejected,
)
from k8s_ext_connector.operator.leader import FORMAT, decide, lease_spec
from k8s_ext_connector.operator.snapshot import (
    NodeRecord,
    externalservice_record,
    gateway_lease_record,
    node_record,
    pod_record,
    service_record,
)
from k8s_ext_connector.webhook.inject import InjectionContext, inject
from tests.unit.samples import KEY_A, KEY_B, KEY_C, seed_spec

LABEL = GATEWAY_NODE_LABEL
SVC1 = ServiceRef("ns1", "my-service1")
SVC2 = ServiceRef("ns2", "my-service2")
SETTINGS = OperatorSettings()


def node(name: str, ready: bool = True, labelled: bool = True) -> NodeRecord:
    return NodeRecord(name, (LABEL,) if labelled else (), ready)


# ---- assignment ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ips", "nodes", "previous", "expected"),
    [
        pytest.param(["10.0.0.1"], ["gw1"], {}, {"10.0.0.1": "gw1"}, id="one-node"),
        pytest.param(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"], ["gw1", "gw2"], {},
                     {"10.0.0.1": "gw1", "10.0.0.2": "gw2", "10.0.0.3": "gw1",
                      "10.0.0.4": "gw2"}, id="balanced"),
        pytest.param(["10.0.0.1", "10.0.0.2"], ["gw1", "gw2"],
                     {"10.0.0.1": "gw2", "10.0.0.2": "gw2"},
                     {"10.0.0.1": "gw2", "10.0.0.2": "gw2"}, id="sticky"),
        pytest.param(["10.0.0.1", "10.0.0.2"], ["gw2"], {"10.0.0.1": "gw1", "10.0.0.2": "gw2"},
                     {"10.0.0.1": "gw2", "10.0.0.2": "gw2"}, id="moves-off-a-lost-node"),
        pytest.param(["10.0.0.1"], [], {"10.0.0.1": "gw1"}, {"10.0.0.1": None}, id="no-node"),
    ],
)
def test_assign_gateways(ips: list[str], nodes: list[str], previous: dict[str, str],
                         expected: dict[str, str | None]) -> None:
    assert assign_gateways(ips, nodes, previous) == expected
    assert assign_gateways(list(reversed(ips)), nodes, previous) == expected  # order-free


def test_eligible_nodes_are_ready_and_labelled() -> None:
    nodes = [node("b"), node("a"), node("c", ready=False), node("d", labelled=False)]
    assert eligible_nodes(nodes, LABEL) == ["a", "b"]


# ---- records ------------------------------------------------------------------------------


def test_records_from_bodies() -> None:
    es = externalservice_record({"metadata": {"name": "x", "namespace": "default",
                                              "generation": 3}, "spec": {"targetIP": "nope"}})
    assert es.spec is None
    assert es.invalid == ("spec.targetIP: 'nope': must be an IPv4 address in dotted-quad form "
                          "without leading zeros, e.g. 192.168.122.10")
    svc = service_record({"metadata": {"name": "s", "namespace": "n"},
                          "spec": {"clusterIP": "None", "selector": {"app": "a"},
                                   "ports": [{"port": 80}]}})
    assert (svc.cluster_ip, svc.selector, svc.ports) == (None, (("app", "a"),), (80,))
    ready = node_record({"metadata": {"name": "gw1"},
                         "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    assert ready.ready
    pod = pod_record({**injected_pod("n", "p", "a"),
                      "status": {"phase": "Running", "initContainerStatuses": [
                          {"name": "ext-connector", "ready": True}]}})
    assert (pod.has_sidecar, pod.sidecar_ready, pod.running) == (True, True, True)


def injected_pod(ns: str, name: str, app: str) -> dict[str, Any]:
    """A pod as the webhook injects it (source Service ``app``)."""
    plain = {"metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
             "spec": {"containers": [{"name": "app", "image": "app"}]}}
    return inject(plain, InjectionContext((ServiceRef(ns, app),)))


def test_a_container_named_like_the_sidecar_is_not_taken_for_it() -> None:
    """Only the injected sidecar counts as one (and as a ready one), not any container
    that happens to be named ext-connector."""
    impostor = pod_record({"metadata": {"name": "p", "namespace": "n"},
                           "spec": {"initContainers": [{"name": "ext-connector", "image": "x"}],
                                    "containers": [{"name": "app", "image": "app"}]},
                           "status": {"phase": "Running", "initContainerStatuses": [
                               {"name": "ext-connector", "ready": True}]}})
    assert (impostor.has_sidecar, impostor.sidecar_ready) == (False, False)


# ---- desired state ------------------------------------------------------------------------


def es_body(name: str = "my-externalservice", namespace: str = "default",
            spec: dict[str, Any] | None = None, created: str = "2026-01-01T00:00:00Z",
            status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                         "generation": 1, "creationTimestamp": created},
            "spec": seed_spec() if spec is None else spec, "status": status or {}}


def svc(ns: str, name: str, cluster_ip: str, labels: dict[str, str] | None = None) -> Any:
    return service_record({"metadata": {"name": name, "namespace": ns, "labels": labels or {}},
                           "spec": {"clusterIP": cluster_ip, "selector": {"app": name},
                                    "ports": [{"port": 80}]}})


def pod(ns: str, name: str, app: str, sidecar: bool = True, ready: bool = True) -> Any:
    plain = {"metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
             "spec": {"containers": [{"name": "app", "image": "app"}]}}
    return pod_record({
        **(injected_pod(ns, name, app) if sidecar else plain),
        "status": {"phase": "Running",
                   "initContainerStatuses": [{"name": "ext-connector", "ready": ready}]
                   if sidecar else []},
    })


def snapshot(*ess: dict[str, Any], nodes: tuple[NodeRecord, ...] = (node("gw1"),),
             pods: tuple[Any, ...] = (), connector_ip: bool = True) -> Snapshot:
    services = [svc("ns1", "my-service1", "10.96.1.1"), svc("ns2", "my-service2", "10.96.2.2")]
    if connector_ip:
        services.append(svc("external-services", "my-externalservice", "10.96.0.10",
                            {"app.kubernetes.io/managed-by": "k8s-ext-connector"}))
    return Snapshot(externalservices=[externalservice_record(b) for b in ess],
                    services={s.ref: s for s in services}, nodes=list(nodes), pods=list(pods))


KEYS = KeyBook(clients={SVC1: KEY_A, SVC2: KEY_B}, hosts={"gw1": KEY_C})
READY_PODS = (pod("ns1", "p1", "my-service1"), pod("ns2", "p2", "my-service2"))


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_seed_example_desired_objects_and_ready_status() -> None:
    desired = compute(snapshot(es_body(), pods=READY_PODS), KEYS, SETTINGS)
    service = desired.services[("external-services", "my-externalservice")]
    assert "selector" not in service["spec"]
    assert service["spec"]["ports"] == [{"name": "tcp-8000", "protocol": "TCP", "port": 8000,
                                         "targetPort": 8000}]
    sidecar = yaml.safe_load(desired.configmaps[("ns1", "ext-connector-my-service1")]["data"]
                             ["sidecar.yaml"])
    assert sidecar["rules"][0]["intercept"] == [{"address": "10.96.0.10", "port": 8000},
                                                {"address": "192.168.122.139", "port": 8000}]
    assert sidecar["rules"][0]["gateway"] == {"address": "192.168.122.200", "port": 2022,
                                              "hostKey": KEY_C}
    gateway = desired.configmaps[("external-services", GATEWAY_CONFIGMAP)]
    gw1 = yaml.safe_load(gateway["data"]["gw1.yaml"])
    assert [s["sourceIP"] for s in gw1["sources"]] == ["192.168.122.200", "192.168.122.201"]
    assert gw1["sources"][0]["ingress"] == [{"allowFrom": "192.168.122.139", "port": 80,
                                             "backend": {"address": "10.96.1.1", "port": 80}}]
    status = desired.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(status) == {"Accepted": ("True", "Valid"),
                                  "GatewayAssigned": ("True", "Assigned"),
                                  "SidecarsReady": ("True", "AllReady"),
                                  "Ingress": ("True", "Relayed"),
                                  "Ready": ("True", "TunnelsReady")}
    assert (status["ready"], status["sourceCount"], status["clusterIP"]) == ("2/2", 2, "10.96.0.10")
    assert status["sources"][0] == {"service": "ns1/my-service1", "sourceIP": "192.168.122.200",
                                    "podsSelected": 1, "podsReady": 1, "gatewayNode": "gw1",
                                    "ingressPorts": [80]}


@pytest.mark.parametrize(
    ("snap", "keys", "condition", "expected"),
    [
        pytest.param(snapshot(es_body(spec={"targetIP": "x"})), KEYS, "Accepted",
                     ("False", "InvalidSpec"), id="invalid-spec"),
        pytest.param(snapshot(es_body(spec={**seed_spec(), "sources": [
            {"service": {"namespace": "ns1", "name": "ghost"}, "sourceIP": "192.168.122.9"}]})),
            KEYS, "Accepted", ("False", "SourceServiceNotFound"), id="missing-service"),
        pytest.param(snapshot(es_body(), nodes=()), KEYS, "GatewayAssigned",
                     ("False", "NoGatewayNode"), id="no-gateway-node"),
        pytest.param(snapshot(es_body(), nodes=(node("gw1", ready=False),)), KEYS, "Ready",
                     ("False", "NoGatewayNode"), id="gateway-not-ready"),
        pytest.param(snapshot(es_body()), KEYS, "SidecarsReady", ("False", "NoPods"),
                     id="no-pods"),
        pytest.param(snapshot(es_body(), pods=(pod("ns1", "old", "my-service1", sidecar=False),)),
                     KEYS, "SidecarsReady", ("False", "SidecarsMissing"), id="pods-without"),
        pytest.param(snapshot(es_body(), pods=(pod("ns1", "p", "my-service1", ready=False),)),
                     KEYS, "Ready", ("False", "SidecarsNotReady"), id="sidecar-not-ready"),
        pytest.param(snapshot(es_body(), pods=READY_PODS, connector_ip=False), KEYS, "Ready",
                     ("False", "ServicePending"), id="no-cluster-ip-yet"),
    ],
)
def test_status_conditions(snap: Snapshot, keys: KeyBook, condition: str,
                           expected: tuple[str, str]) -> None:
    desired = compute(snap, keys, SETTINGS)
    status = desired.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(status)[condition] == expected
    assert conditions(status)["Ready"][0] == "False"


def test_pods_without_sidecar_are_named_with_the_fix() -> None:
    snap = snapshot(es_body(), pods=(pod("ns1", "old", "my-service1", sidecar=False),))
    status = compute(snap, KEYS, SETTINGS).statuses[ServiceRef("default", "my-externalservice")]
    message = next(c["message"] for c in status["conditions"] if c["type"] == "SidecarsReady")
    assert "ns1/old" in message
    assert "kubectl rollout restart" in message
    assert status["sources"][0]["podsWithoutSidecar"] == ["ns1/old"]


def _with_service(snap: Snapshot, ns: str, name: str, ports: list[dict[str, Any]],
                  cluster_ip: str = "10.96.1.1") -> Snapshot:
    record = service_record({"metadata": {"name": name, "namespace": ns, "labels": {}},
                             "spec": {"clusterIP": cluster_ip, "selector": {"app": name},
                                      "ports": ports}})
    return Snapshot(snap.externalservices, {**snap.services, record.ref: record}, snap.nodes,
                    snap.pods)


@pytest.mark.parametrize(
    ("ports", "cluster_ip", "reason", "words"),
    [
        pytest.param([], "10.96.1.1", "NoIngressPorts", "has no ports", id="no-ports"),
        pytest.param([{"port": 80}], "None", "NoIngressPorts", "no ClusterIP (headless)",
                     id="headless"),
        pytest.param([{"port": 2022}], "10.96.1.1", "IngressConflict", "the gateway's SSH port",
                     id="ssh-port"),
    ],
)
def test_ingress_problems_leave_the_es_accepted_and_ready(
        ports: list[dict[str, Any]], cluster_ip: str, reason: str, words: str) -> None:
    snap = _with_service(snapshot(es_body(), pods=READY_PODS), "ns1", "my-service1", ports,
                         cluster_ip)
    desired = compute(snap, KEYS, SETTINGS)
    status = desired.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(status) == {"Accepted": ("True", "Valid"),
                                  "GatewayAssigned": ("True", "Assigned"),
                                  "SidecarsReady": ("True", "AllReady"),
                                  "Ingress": ("False", reason),
                                  "Ready": ("True", "TunnelsReady")}
    assert status["ready"] == "2/2"  # egress works for both sources
    message = next(c["message"] for c in status["conditions"] if c["type"] == "Ingress")
    assert message.startswith("spec.sources[0].service: ")
    assert words in message
    assert "ingressPorts" not in status["sources"][0]
    assert status["sources"][1]["ingressPorts"] == [80]
    gw1 = yaml.safe_load(desired.configmaps[("external-services", GATEWAY_CONFIGMAP)]["data"]
                         ["gw1.yaml"])
    assert "ingress" not in gw1["sources"][0]
    assert gw1["sources"][1]["ingress"][0]["backend"] == {"address": "10.96.2.2", "port": 80}
    assert ("Warning", reason, message) in condition_events(status["conditions"], [])


def test_ingress_is_unknown_while_keys_are_pending_and_false_for_an_invalid_es() -> None:
    pending = compute(snapshot(es_body()), KeyBook(), SETTINGS)
    status = pending.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(status)["Ingress"] == ("Unknown", "Pending")
    assert not any(e[1] == "Pending" for e in condition_events(status["conditions"], []))
    spec = {**seed_spec(), "sources": [
        {"service": {"namespace": "ns1", "name": "ghost"}, "sourceIP": "192.168.122.9"}]}
    missing = compute(snapshot(es_body(spec=spec)), KEYS, SETTINGS)
    status = missing.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(status)["Ingress"] == ("False", "SourceServiceNotFound")


def test_ingress_ports_list_the_service_tcp_ports_relayed() -> None:
    snap = _with_service(snapshot(es_body(), pods=READY_PODS), "ns1", "my-service1",
                         [{"port": 443}, {"port": 80, "protocol": "TCP"},
                          {"port": 53, "protocol": "UDP"}])
    status = compute(snap, KEYS, SETTINGS).statuses[ServiceRef("default", "my-externalservice")]
    assert status["sources"][0]["ingressPorts"] == [80, 443]
    assert conditions(status)["Ingress"] == ("True", "Relayed")


def test_invalid_es_does_not_affect_another() -> None:
    bad = es_body(name="bad", spec={"targetIP": "1.2.3.4", "sources": [], "ports": []})
    desired = compute(snapshot(es_body(), bad, pods=READY_PODS), KEYS, SETTINGS)
    assert conditions(desired.statuses[ServiceRef("default", "bad")])["Accepted"] == (
        "False", "InvalidSpec")
    assert conditions(desired.statuses[ServiceRef("default", "my-externalservice")])["Ready"] == (
        "True", "TunnelsReady")
    assert list(desired.services) == [("external-services", "my-externalservice")]


def test_same_name_in_two_namespaces_is_a_conflict_for_the_younger() -> None:
    older = es_body(created="2026-01-01T00:00:00Z")
    younger = es_body(namespace="other", created="2026-02-01T00:00:00Z")
    desired = compute(snapshot(older, younger, pods=READY_PODS), KEYS, SETTINGS)
    assert conditions(desired.statuses[ServiceRef("other", "my-externalservice")])[
        "Accepted"] == ("False", "NameConflict")
    assert conditions(desired.statuses[ServiceRef("default", "my-externalservice")])[
        "Ready"] == ("True", "TunnelsReady")


def test_keys_needed_are_listed_and_nothing_is_planned_without_them() -> None:
    desired = compute(snapshot(es_body()), KeyBook(), SETTINGS)
    assert desired.needs_client_keys == (SVC1, SVC2)
    assert desired.needs_host_keys == ("gw1",)
    assert set(desired.configmaps) == {("external-services", GATEWAY_CONFIGMAP)}


def test_deleting_es_contributes_nothing() -> None:
    body = es_body()
    body["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    desired = compute(snapshot(body, pods=READY_PODS), KEYS, SETTINGS)
    assert desired.services == {}
    assert desired.statuses == {}
    gw = yaml.safe_load(desired.configmaps[("external-services", GATEWAY_CONFIGMAP)]["data"]
                        ["gw1.yaml"])
    assert gw["sources"] == []


def test_assignment_sticks_to_the_node_in_status() -> None:
    status = {"sources": [{"sourceIP": "192.168.122.200", "gatewayNode": "gw2"}]}
    snap = snapshot(es_body(status=status), nodes=(node("gw1"), node("gw2")))
    keys = KeyBook(KEYS.clients, {"gw1": KEY_C, "gw2": KEY_A})
    assert compute(snap, keys, SETTINGS).assignment == {"192.168.122.200": "gw2",
                                                        "192.168.122.201": "gw1"}


def test_compute_is_deterministic() -> None:
    snap = snapshot(es_body(), pods=READY_PODS)
    assert compute(snap, KEYS, SETTINGS) == compute(snap, KEYS, SETTINGS)


def test_transition_times_and_events() -> None:
    old = [{"type": "Ready", "status": "False", "reason": "NoPods", "message": "",
            "lastTransitionTime": "T0"},
           {"type": "Accepted", "status": "True", "reason": "Valid", "message": "",
            "lastTransitionTime": "T0"}]
    new = [{"type": "Ready", "status": "True", "reason": "TunnelsReady", "message": "ok"},
           {"type": "Accepted", "status": "True", "reason": "Valid", "message": ""}]
    merged = with_transition_times(new, old, "T1")
    assert [c["lastTransitionTime"] for c in merged] == ["T1", "T0"]
    assert condition_events(new, old) == [("Normal", "TunnelsReady", "ok")]
    assert condition_events(old, new) == [("Warning", "NoPods", "")]


def test_node_record_keeps_internal_and_external_ips() -> None:
    record = node_record({"metadata": {"name": "gw1"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "10.0.0.5"},
        {"type": "ExternalIP", "address": "2001:DB8::5"},
        {"type": "Hostname", "address": "gw1"},
        {"type": "InternalDNS", "address": "gw1.internal"},
        {"type": "InternalIP", "address": "not-an-ip"},
    ]}})
    assert record.addresses == ("10.0.0.5", "2001:db8::5")


def _message(status: dict[str, Any], kind: str) -> str:
    return str(next(c["message"] for c in status["conditions"] if c["type"] == kind))


@pytest.mark.parametrize("name", ["db.prod", "1db", "a" * 64])
def test_a_name_no_service_can_have_gets_nothing_and_spares_the_others(name: str) -> None:
    bad = es_body(name=name, spec={**seed_spec(), "targetIP": "192.168.122.140", "sources": [
        {"service": {"namespace": "ns1", "name": "my-service1"},
         "sourceIP": "192.168.122.210"}]})
    desired = compute(snapshot(es_body(), bad, pods=READY_PODS), KEYS, SETTINGS)
    status = desired.statuses[ServiceRef("default", name)]
    assert conditions(status)["Accepted"] == ("False", "InvalidName")
    assert conditions(status)["Ready"] == ("False", "InvalidName")
    assert _message(status, "Accepted").startswith(f"metadata.name: {name!r} is not a DNS-1035")
    assert list(desired.services) == [("external-services", "my-externalservice")]
    gw1 = yaml.safe_load(desired.configmaps[("external-services", GATEWAY_CONFIGMAP)]["data"]
                         ["gw1.yaml"])
    assert "192.168.122.210" not in [s["sourceIP"] for s in gw1["sources"]]
    assert conditions(desired.statuses[ServiceRef("default", "my-externalservice")])[
        "Ready"] == ("True", "TunnelsReady")
    assert ("Warning", "InvalidName", _message(status, "Accepted")) in condition_events(
        status["conditions"], [])


def test_an_invalid_name_and_an_invalid_spec_are_both_reported() -> None:
    desired = compute(snapshot(es_body(name="db.prod", spec={"targetIP": "x"})), KEYS, SETTINGS)
    status = desired.statuses[ServiceRef("default", "db.prod")]
    assert conditions(status)["Accepted"] == ("False", "InvalidName")
    assert "metadata.name: 'db.prod'" in _message(status, "Accepted")
    assert "spec.targetIP: 'x'" in _message(status, "Accepted")


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        pytest.param("db.prod", seed_spec(), id="invalid-name"),
        pytest.param("my-externalservice", {**seed_spec(), "targetIP": "127.0.0.1"},
                     id="loopback-target"),
    ],
)
def test_nothing_is_written_for_an_es_refused_for_its_spec(name: str,
                                                           spec: dict[str, Any]) -> None:
    desired = compute(snapshot(es_body(name=name, spec=spec), pods=READY_PODS), KeyBook(),
                      SETTINGS)
    assert desired.services == {}
    assert desired.needs_client_keys == ()  # no key Secret, no sidecar ConfigMap
    assert set(desired.configmaps) == {("external-services", GATEWAY_CONFIGMAP)}
    assert conditions(desired.statuses[ServiceRef("default", name)])["Accepted"][0] == "False"


def test_the_connector_service_label_fits_a_label_value() -> None:
    assert externalservice_label(ServiceRef("default", "db")) == "default.db"
    long_ns, long_name = "n" * 40, "s" * 40
    value = externalservice_label(ServiceRef(long_ns, long_name))
    assert len(value) == 63
    assert value.startswith(f"{long_ns}.")
    assert value[-1].isalnum()
    assert value != externalservice_label(ServiceRef(long_ns, long_name[:-1] + "t"))
    desired = compute(snapshot(es_body(name="s" * 63, namespace="n" * 63)), KEYS, SETTINGS)
    (service,) = desired.services.values()
    label = service["metadata"]["labels"]["ext-connector.submariner.io/externalservice"]
    assert len(label) <= 63


def test_a_reserved_target_is_refused_in_status() -> None:
    spec = {**seed_spec(), "targetIP": "169.254.169.254"}
    desired = compute(snapshot(es_body(spec=spec), pods=READY_PODS), KEYS, SETTINGS)
    status = desired.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(status)["Accepted"] == ("False", "ReservedAddress")
    assert _message(status, "Accepted").startswith("spec.targetIP: 169.254.169.254 is a "
                                                   "link-local address")


def test_a_source_ip_that_is_a_node_address_is_refused_in_status() -> None:
    gw1 = node_record({"metadata": {"name": "gw1", "labels": dict([LABEL])}, "status": {
        "conditions": [{"type": "Ready", "status": "True"}],
        "addresses": [{"type": "InternalIP", "address": "192.168.122.200"}]}})
    desired = compute(snapshot(es_body(), nodes=(gw1,), pods=READY_PODS), KEYS, SETTINGS)
    status = desired.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(status)["Accepted"] == ("False", "NodeAddress")
    assert _message(status, "Accepted").startswith(
        "spec.sources[0].sourceIP: 192.168.122.200 is an address of node gw1")


def test_a_foreign_service_in_the_connector_slot_is_left_alone_and_reported() -> None:
    snap = snapshot(es_body(), pods=READY_PODS, connector_ip=False)
    foreign = svc("external-services", "my-externalservice", "10.96.0.99")  # no label
    snap = Snapshot(snap.externalservices, {**snap.services, foreign.ref: foreign}, snap.nodes,
                    snap.pods)
    desired = compute(snap, KEYS, SETTINGS)
    assert desired.services == {}
    status = desired.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(status)["Accepted"] == ("False", "ForeignObject")
    assert _message(status, "Accepted").startswith(
        "Service external-services/my-externalservice exists but is not managed by "
        "k8s-ext-connector")
    assert status["clusterIP"] == ""  # the foreign Service's address is never intercepted
    sidecar = yaml.safe_load(desired.configmaps[("ns1", "ext-connector-my-service1")]["data"]
                             ["sidecar.yaml"])
    assert sidecar["rules"] == []


def test_refused_writes_are_reported_on_the_externalservices_that_need_the_object() -> None:
    other = es_body(name="other", spec={**seed_spec(), "targetIP": "192.168.122.140", "sources": [
        {"service": {"namespace": "ns2", "name": "my-service2"},
         "sourceIP": "192.168.122.211"}]})
    snap = snapshot(es_body(), other, pods=READY_PODS)
    cm: ObjectRef = ("ConfigMap", "ns1", "ext-connector-my-service1")
    problem = foreign_object(cm)
    desired = compute(snap, KEYS, SETTINGS, {cm: problem})
    seed = desired.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(seed)["Accepted"] == ("False", "ForeignObject")
    assert _message(seed, "Accepted") == problem
    assert seed["ready"] == "0/2"
    # "other" does not use my-service1: unaffected, and nothing else changes for anyone.
    assert conditions(desired.statuses[ServiceRef("default", "other")])["Accepted"] == (
        "True", "Valid")
    assert desired.services == compute(snap, KEYS, SETTINGS).services
    assert desired.configmaps == compute(snap, KEYS, SETTINGS).configmaps

    gateway: ObjectRef = ("ConfigMap", "external-services", GATEWAY_CONFIGMAP)
    refused = write_rejected("update", gateway, "HTTP 422 Invalid: too big")
    assert refused == ("the API server refused to update ConfigMap "
                       "external-services/ext-connector-gateway: HTTP 422 Invalid: too big")
    everyone = compute(snap, KEYS, SETTINGS, {gateway: refused})
    for name in ("my-externalservice", "other"):
        assert conditions(everyone.statuses[ServiceRef("default", name)])["Accepted"] == (
            "False", "WriteRejected")
    nobody = compute(snap, KEYS, SETTINGS, {("Service", "x", "y"): Problem("WriteRejected", "")})
    assert nobody.statuses == compute(snap, KEYS, SETTINGS).statuses


# ---- leader election ------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(None, "acquire", id="no-lease"),
        pytest.param({"holderIdentity": "me"}, "renew", id="mine"),
        pytest.param({"holderIdentity": "other", "leaseDurationSeconds": 15,
                      "renewTime": (NOW - timedelta(seconds=5)).strftime(FORMAT)}, "wait",
                     id="other-fresh"),
        pytest.param({"holderIdentity": "other", "leaseDurationSeconds": 15,
                      "renewTime": (NOW - timedelta(seconds=16)).strftime(FORMAT)}, "acquire",
                     id="other-expired"),
    ],
)
def test_lease_decision(spec: dict[str, Any] | None, expected: str) -> None:
    assert decide(spec, "me", NOW) == expected


def test_lease_spec_counts_transitions() -> None:
    spec = lease_spec("me", NOW, {"leaseTransitions": 2, "acquireTime": "old"}, "acquire")
    assert spec["leaseTransitions"] == 3
    assert spec["holderIdentity"] == "me"
    assert lease_spec("me", NOW, {"acquireTime": "old"}, "renew")["acquireTime"] == "old"


def test_own_namespace_sources_refuses_other_namespaces_and_writes_nothing_for_them() -> None:
    strict = OperatorSettings(own_namespace_sources=True)
    desired = compute(snapshot(es_body(), pods=READY_PODS), KEYS, strict)
    status = desired.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(status)["Accepted"] == ("False", "SourceOutsideNamespace")
    assert _message(status, "Accepted").startswith(
        "spec.sources[0].service.namespace: 'ns1' is not this ExternalService's namespace "
        "'default'")
    assert desired.services == {}
    assert not [key for key in desired.configmaps if key[0] in ("ns1", "ns2")]
    # The default (the seed's semantics) allows them.
    default = compute(snapshot(es_body(), pods=READY_PODS), KEYS, SETTINGS)
    assert conditions(default.statuses[ServiceRef("default", "my-externalservice")])[
        "Accepted"][0] == "True"


def test_own_namespace_sources_accepts_sources_of_its_own_namespace() -> None:
    spec = {**seed_spec(), "sources": [
        {"service": {"namespace": "ns1", "name": "my-service1"}, "sourceIP": "192.168.122.200"}]}
    strict = OperatorSettings(own_namespace_sources=True)
    desired = compute(snapshot(es_body(namespace="ns1", spec=spec), pods=READY_PODS), KEYS, strict)
    status = desired.statuses[ServiceRef("ns1", "my-externalservice")]
    assert conditions(status)["Accepted"][0] == "True"


def test_node_record_keeps_pod_cidrs_and_internal_ips_for_ssh() -> None:
    record = node_record({"metadata": {"name": "w1"},
                          "spec": {"podCIDR": "10.244.1.0/24",
                                   "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64", "bad"]},
                          "status": {"addresses": [
                              {"type": "InternalIP", "address": "10.0.0.6"},
                              {"type": "ExternalIP", "address": "203.0.113.9"}]}})
    assert record.pod_cidrs == ("10.244.1.0/24", "fd00:10:244:1::/64")
    assert record.internal_ips == ("10.0.0.6",)
    legacy = node_record({"metadata": {"name": "w2"}, "spec": {"podCIDR": "10.244.2.0/24"}})
    assert legacy.pod_cidrs == ("10.244.2.0/24",)


def test_gateway_configs_allow_ssh_from_every_nodes_pods_and_addresses_only() -> None:
    """The SSH port answers the cluster: every node's pod CIDRs and InternalIPs (not its
    ExternalIPs), plus the operator's own list (chart gateway.sshAllowFrom)."""
    gw1 = node_record({"metadata": {"name": "gw1", "labels": dict([LABEL])},
                       "spec": {"podCIDRs": ["10.244.0.0/24"]},
                       "status": {"conditions": [{"type": "Ready", "status": "True"}],
                                  "addresses": [{"type": "InternalIP", "address": "10.0.0.5"},
                                                {"type": "ExternalIP",
                                                 "address": "203.0.113.5"}]}})
    worker = node_record({"metadata": {"name": "w1"}, "spec": {"podCIDRs": ["10.244.1.0/24"]},
                          "status": {"addresses": [{"type": "InternalIP",
                                                    "address": "10.0.0.6"}]}})
    settings = replace(SETTINGS, ssh_allow_from=("192.168.50.0/24",))
    desired = compute(snapshot(es_body(), nodes=(gw1, worker), pods=READY_PODS), KEYS, settings)
    data = desired.configmaps[("external-services", GATEWAY_CONFIGMAP)]["data"]
    config = yaml.safe_load(data["gw1.yaml"])
    assert config["sshAllowFrom"] == ["10.0.0.5/32", "10.0.0.6/32", "10.244.0.0/24",
                                      "10.244.1.0/24", "192.168.50.0/24"]
    without = compute(snapshot(es_body(), pods=READY_PODS), KEYS, SETTINGS)
    bare = yaml.safe_load(without.configmaps[("external-services", GATEWAY_CONFIGMAP)]["data"]
                          ["gw1.yaml"])
    assert "sshAllowFrom" not in bare  # nothing known: the gateway refuses SSH (fail closed)


# ---- what the data plane cannot serve; a status that says which spec it describes (#10) ----


def test_every_condition_says_which_generation_it_describes() -> None:
    body = es_body()
    body["metadata"]["generation"] = 7
    bad = es_body(name="bad", spec={**seed_spec(), "targetIP": "nope"})
    bad["metadata"]["generation"] = 3
    desired = compute(snapshot(body, bad, pods=READY_PODS), KEYS, SETTINGS)
    for name, generation in (("my-externalservice", 7), ("bad", 3)):
        status = desired.statuses[ServiceRef("default", name)]
        assert status["observedGeneration"] == generation
        assert [c["observedGeneration"] for c in status["conditions"]] == [generation] * len(
            status["conditions"]
        ), name


def test_an_ipv6_source_is_refused_gets_nothing_and_spares_the_others() -> None:
    """An IPv6 sourceIP (IPv4 target) used to be Accepted; the gateway, IPv4 only, then
    failed its whole config, i.e. every ExternalService's tunnels."""
    bad = es_body(name="v6", spec={**seed_spec(), "targetIP": "192.168.122.140", "sources": [
        {"service": {"namespace": "ns1", "name": "my-service1"}, "sourceIP": "2001:db8::5"}]})
    desired = compute(snapshot(es_body(), bad, pods=READY_PODS), KEYS, SETTINGS)
    status = desired.statuses[ServiceRef("default", "v6")]
    assert conditions(status)["Accepted"] == ("False", "IPv6NotSupported")
    assert conditions(status)["Ready"] == ("False", "IPv6NotSupported")
    assert _message(status, "Accepted") == (
        "spec.sources[0].sourceIP: 2001:db8::5 is an IPv6 address; IPv6 is not supported yet: "
        "give an IPv4 address")
    assert ("external-services", "v6") not in desired.services
    gateway = yaml.safe_load(
        desired.configmaps[("external-services", GATEWAY_CONFIGMAP)]["data"]["gw1.yaml"])
    assert [s["sourceIP"] for s in gateway["sources"]] == ["192.168.122.200", "192.168.122.201"]
    good = desired.statuses[ServiceRef("default", "my-externalservice")]
    assert conditions(good)["Ready"] == ("True", "TunnelsReady")


# ---- gateway reports (their Leases) -------------------------------------------------------


def gateway_lease(node: str, unserved: dict[str, str], held: bool = True) -> Any:
    """A gateway Lease as the gateway writes it (core/gateway_status.lease_body)."""
    body = lease_body("external-services", node, unserved, datetime(2026, 1, 1, tzinfo=UTC),
                      10.0, None, None)
    return gateway_lease_record(body if held else released_body(body))


def test_a_source_ip_its_gateway_does_not_serve_fails_gateway_assigned_and_ready() -> None:
    reason = ("192.168.122.201 is already an address of this node (on eth1) and not one the "
              "gateway added: refusing to take over the node's own address")
    snap = replace(snapshot(es_body(), pods=READY_PODS),
                   gateway_leases={"gw1": gateway_lease("gw1", {"192.168.122.201": reason})})
    status = compute(snap, KEYS, SETTINGS).statuses[ServiceRef("default", "my-externalservice")]
    found = conditions(status)
    assert found["GatewayAssigned"] == ("False", "SourceIPNotServed")
    assert found["Ready"] == ("False", "SourceIPNotServed")
    assert found["Ingress"] == ("False", "SourceIPNotServed")
    assert found["Accepted"] == ("True", "Valid")  # the spec is fine
    message = next(c["message"] for c in status["conditions"] if c["type"] == "GatewayAssigned")
    assert message.startswith(
        f"the gateway on node gw1 does not serve sourceIP 192.168.122.201: {reason}")
    assert "192.168.122.200" not in message
    assert status["ready"] == "1/2"  # the other source is served and counted


def test_other_externalservices_and_other_reports_are_unaffected() -> None:
    other = es_body("other", spec={**seed_spec(), "sources": [
        {"service": {"namespace": "ns1", "name": "my-service1"}, "sourceIP": "192.168.122.210"}]})
    leases = {
        "gw1": gateway_lease("gw1", {"192.168.122.201": "cannot listen"}),
        # a report about an IP this node is not assigned, and a stopped gateway's report
        "gw2": gateway_lease("gw2", {"192.168.122.210": "stale"}, held=False),
        "gw3": gateway_lease("gw3", {"192.168.122.210": "not assigned here"}),
    }
    snap = replace(snapshot(es_body(), other, pods=READY_PODS, nodes=(node("gw1"),)),
                   gateway_leases=leases)
    statuses = compute(snap, KEYS, SETTINGS).statuses
    assert conditions(statuses[ServiceRef("default", "other")])["GatewayAssigned"] == (
        "True", "Assigned")
    assert conditions(statuses[ServiceRef("default", "my-externalservice")])[
        "GatewayAssigned"] == ("False", "SourceIPNotServed")
    served = replace(snap, gateway_leases={"gw1": gateway_lease("gw1", {})})
    assert conditions(compute(served, KEYS, SETTINGS).statuses[
        ServiceRef("default", "my-externalservice")])["Ready"] == ("True", "TunnelsReady")


def test_gateway_lease_body_and_record() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    body = lease_body("external-services", "gw1", {"203.0.113.9": "x"}, now, 10.0, None, None)
    assert body["metadata"]["name"] == "ext-connector-gateway-gw1"
    assert body["spec"] == {"holderIdentity": "gw1", "leaseDurationSeconds": 30,
                            "acquireTime": "2026-01-01T12:00:00.000000Z",
                            "renewTime": "2026-01-01T12:00:00.000000Z", "leaseTransitions": 0}
    assert body["metadata"]["annotations"] == {UNSERVED_ANNOTATION: '{"203.0.113.9": "x"}'}
    # A new process takes an existing Lease: one more transition; its renewals keep it.
    later = now + timedelta(seconds=10)
    taken = lease_body("external-services", "gw1", {}, later, 10.0, body, None)
    assert taken["spec"]["leaseTransitions"] == 1
    renewed = lease_body("external-services", "gw1", {}, later, 10.0, taken, now)
    assert renewed["spec"]["leaseTransitions"] == 1
    assert renewed["spec"]["acquireTime"] == "2026-01-01T12:00:00.000000Z"
    record = gateway_lease_record(body)
    assert record is not None
    assert (record.node, record.held, record.unserved_reason("203.0.113.9")) == ("gw1", True, "x")
    released = gateway_lease_record(released_body(body))
    assert released is not None
    assert (released.held, released.unserved_reason("203.0.113.9")) == (False, None)
    assert gateway_lease_record({"metadata": {"name": "k8s-ext-connector-operator"}}) is None
    broken = gateway_lease_record({**body, "metadata": {**body["metadata"], "annotations": {
        UNSERVED_ANNOTATION: "[1]"}}})
    assert broken is not None
    assert (broken.unserved, broken.problem) == ((), f"annotation {UNSERVED_ANNOTATION} is not "
                                                  "an object of strings")
