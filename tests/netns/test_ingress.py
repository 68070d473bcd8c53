"""The seed's ingress on real namespaces: the external server calls each source service
through its source IP; anyone else, and any other port, is refused.

The lab's "node" emulates the source Services' ClusterIPs as kube-proxy would for a
connection the node opens (``Lab.emulate_cluster_ip``), so the pods see the node's
pod-side address, ``POD_GATEWAY_IP``, as the client.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest

from k8s_ext_connector.core import iptables
from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.core.config import GatewayConfig
from k8s_ext_connector.core.planner import Plan, SourceServiceFacts
from k8s_ext_connector.gateway.rules import INGRESS_CHAIN, render_ingress_rules
from k8s_ext_connector.lab.client import run_gets
from k8s_ext_connector.lab.netns import call_in_netns, sh
from k8s_ext_connector.lab.scenario import (
    INGRESS_SERVICES,
    SERVICE1,
    SERVICE2,
    ScenarioKeys,
    plan_seed,
)
from k8s_ext_connector.lab.topology import (
    OTHER_EXTERNAL_IP,
    POD_GATEWAY_IP,
    POD_HTTP_PORT,
    SERVICE_IP,
    SOURCE_IPS,
    SOURCE_SERVICE_IPS,
    Lab,
    NetnsIptables,
)

pytestmark = pytest.mark.root
PODS = ("my-pod1", "my-pod2")


@dataclass
class IngressLab:
    lab: Lab
    keys: ScenarioKeys
    plan: Plan

    def reload(self, services: Mapping[ServiceRef, SourceServiceFacts]) -> GatewayConfig:
        self.plan = plan_seed(self.keys, self.lab.host_key, source_services=services)
        self.lab.write_gateway_config(self.plan.gateway)
        return self.plan.gateway

    def get(self, source_ip: str, port: int = POD_HTTP_PORT, bind: str | None = None) -> str:
        """GET / from the external network; the body or ``error: <exception>``."""
        result = call_in_netns(self.lab.ext_ns, lambda: http_get(source_ip, port, bind))
        assert isinstance(result, str)
        return result


def http_get(host: str, port: int, bind: str | None = None, path: str = "/") -> str:
    try:
        with socket.socket() as sock:
            sock.settimeout(5)
            if bind is not None:
                sock.bind((bind, 0))
            sock.connect((host, port))
            sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as error:
        return f"error: {type(error).__name__}"
    response = b"".join(chunks)
    if not response:
        return "error: closed without an answer"
    return response.split(b"\r\n\r\n", 1)[-1].decode().strip()


@pytest.fixture
def ingress_lab() -> Iterator[IngressLab]:
    """Pods serving HTTP behind emulated ClusterIPs, the gateway with the seed's ingress."""
    with Lab.create(list(PODS)) as lab:
        for pod, cluster_ip in zip(PODS, SOURCE_SERVICE_IPS, strict=True):
            lab.start_pod_server(pod)
            lab.emulate_cluster_ip(cluster_ip, pod, [POD_HTTP_PORT])
        lab.add_external_address()
        keys = ScenarioKeys.generate()
        planned = plan_seed(keys, lab.host_key, source_services=INGRESS_SERVICES)
        lab.start_gateway(planned.gateway)
        for source_ip in SOURCE_IPS:
            lab.wait_tcp(lab.ext_ns, source_ip, POD_HTTP_PORT, process=lab.gateway)
        yield IngressLab(lab, keys, planned)


def filter_rules(lab: Lab) -> str:
    return lab.iptables_save(lab.gw_ns, "filter")


def test_target_reaches_each_source_service_through_its_source_ip(
    ingress_lab: IngressLab,
) -> None:
    assert ingress_lab.get(SOURCE_IPS[0]) == f"my-pod1 {POD_GATEWAY_IP}"
    assert ingress_lab.get(SOURCE_IPS[1]) == f"my-pod2 {POD_GATEWAY_IP}"
    # The pod sees the node's address: the relay connects from the node, kube-proxy style.
    for pod in PODS:
        clients = {record["client"] for record in ingress_lab.lab.pod_server_log(pod)}
        assert clients == {POD_GATEWAY_IP}


def test_egress_and_ingress_share_the_source_ip(ingress_lab: IngressLab) -> None:
    lab = ingress_lab.lab
    lab.start_external_server()
    lab.start_sidecar("my-pod1", ingress_lab.plan.sidecars[SERVICE1],
                      ingress_lab.keys.clients[SERVICE1])
    outcomes = lab.in_pod("my-pod1", lambda: run_gets(SERVICE_IP, 8000, 5))
    assert isinstance(outcomes, list)
    assert [o.body for o in outcomes] == [SOURCE_IPS[0]] * 5
    assert ingress_lab.get(SOURCE_IPS[0]) == f"my-pod1 {POD_GATEWAY_IP}"


def test_another_address_on_the_external_network_is_refused(ingress_lab: IngressLab) -> None:
    lab = ingress_lab.lab
    for source_ip in SOURCE_IPS:
        assert ingress_lab.get(source_ip, bind=OTHER_EXTERNAL_IP) == (
            "error: ConnectionRefusedError"
        )
    assert all(lab.pod_server_log(pod) == [] for pod in PODS)
    assert ingress_lab.get(SOURCE_IPS[0]) == f"my-pod1 {POD_GATEWAY_IP}"  # target still in


def test_the_relay_refuses_another_address_even_without_the_filter_chain(
    ingress_lab: IngressLab,
) -> None:
    """Defence in depth: with our chain flushed behind the gateway's back, the relay's own
    peer check still resets the connection before anything reaches the pod."""
    lab = ingress_lab.lab
    sh(["ip", "netns", "exec", lab.gw_ns, "iptables-nft", "-F", INGRESS_CHAIN])
    result = ingress_lab.get(SOURCE_IPS[0], bind=OTHER_EXTERNAL_IP)
    assert result in ("error: ConnectionResetError", "error: closed without an answer"), result
    assert lab.pod_server_log("my-pod1") == []
    assert lab.gateway is not None
    assert f"refused ingress from {OTHER_EXTERNAL_IP}" in lab.gateway.output()


@pytest.mark.parametrize("port", [8080, 8000, 443])
def test_a_port_the_service_does_not_have_is_refused(ingress_lab: IngressLab, port: int) -> None:
    assert ingress_lab.get(SOURCE_IPS[0], port) == "error: ConnectionRefusedError"
    assert ingress_lab.lab.pod_server_log("my-pod1") == []


def test_the_node_holds_exactly_the_rendered_chain(ingress_lab: IngressLab) -> None:
    lab = ingress_lab.lab
    node = NetnsIptables(lab.gw_ns)
    # What the gateway installed is what the pure renderer says, in iptables-save's own
    # canonical form: applying it again changes nothing.
    assert iptables.apply(node, render_ingress_rules(ingress_lab.plan.gateway)) is False
    rules = filter_rules(lab)
    assert rules.count(f"-j {INGRESS_CHAIN}") == 1
    assert rules.count("-j REJECT --reject-with tcp-reset") == len(SOURCE_IPS)


def _download(size: int) -> dict[str, object]:
    """A slow download from my-pod1 through 203.0.113.200, run from the server: 64 KiB
    every 50 ms (~6 s for 8 MiB), long enough to outlive reloads on a loaded machine."""
    result: dict[str, object] = {}
    body = http_get(SOURCE_IPS[0], POD_HTTP_PORT, path=f"/bytes?n={size}&delay=0.05")
    result["length"] = len(body)
    result["digest"] = hashlib.sha256(body.encode()).hexdigest()
    return result


def _start_download(
    ingress_lab: IngressLab, size: int
) -> tuple[threading.Thread, dict[str, object]]:
    lab = ingress_lab.lab
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(call_in_netns(lab.ext_ns, lambda: _download(size)))
    )
    thread.start()
    Lab.wait_until(
        lambda: any(r["path"] == "/bytes" for r in lab.pod_server_log("my-pod1")),
        5,
        lambda: "the download did not start",
    )
    return thread, result


def test_removing_a_source_ingress_stops_new_connections_while_an_established_one_finishes(
    ingress_lab: IngressLab,
) -> None:
    lab = ingress_lab.lab
    size = 8 * 1024 * 1024
    thread, result = _start_download(ingress_lab, size)

    # my-service1 loses its ports: no ingress for 203.0.113.200 any more.
    ingress_lab.reload({**INGRESS_SERVICES, SERVICE1: SourceServiceFacts(SOURCE_SERVICE_IPS[0])})
    Lab.wait_until(
        lambda: ingress_lab.get(SOURCE_IPS[0]) == "error: ConnectionRefusedError",
        10,
        lambda: "203.0.113.200:80 still accepts after the reload",
    )
    assert thread.is_alive(), "the download should still be in flight during the reload"
    assert ingress_lab.get(SOURCE_IPS[1]) == f"my-pod2 {POD_GATEWAY_IP}"  # the other stays
    assert f"-d {SOURCE_IPS[0]}/32 -p tcp -m tcp --dport {POD_HTTP_PORT}" not in filter_rules(lab)
    thread.join(30)
    assert result == {"length": size, "digest": hashlib.sha256(b"x" * size).hexdigest()}


def test_adding_and_removing_other_entries_leaves_a_remaining_one_undisturbed(
    ingress_lab: IngressLab,
) -> None:
    size = 8 * 1024 * 1024
    thread, result = _start_download(ingress_lab, size)
    without_2 = {**INGRESS_SERVICES, SERVICE2: SourceServiceFacts(SOURCE_SERVICE_IPS[1])}
    ingress_lab.reload(without_2)
    Lab.wait_until(
        lambda: ingress_lab.get(SOURCE_IPS[1]) == "error: ConnectionRefusedError",
        10,
        lambda: "203.0.113.201:80 still accepts after the reload",
    )
    ingress_lab.reload(INGRESS_SERVICES)  # and back
    Lab.wait_until(
        lambda: ingress_lab.get(SOURCE_IPS[1]) == f"my-pod2 {POD_GATEWAY_IP}",
        10,
        lambda: "203.0.113.201:80 not back after the reload",
    )
    assert thread.is_alive(), "the download should have outlived both reloads"
    thread.join(30)
    assert result == {"length": size, "digest": hashlib.sha256(b"x" * size).hexdigest()}


def test_a_backend_without_a_server_resets_at_once(ingress_lab: IngressLab) -> None:
    lab = ingress_lab.lab
    server = next(p for p in lab.processes if p.name == "server-my-pod1")
    server.stop()
    started = time.monotonic()
    result = ingress_lab.get(SOURCE_IPS[0])
    assert result in ("error: ConnectionResetError", "error: closed without an answer"), result
    assert time.monotonic() - started < 1.0
    assert ingress_lab.get(SOURCE_IPS[1]) == f"my-pod2 {POD_GATEWAY_IP}"


def test_gateway_stop_removes_the_chain_and_a_restart_replaces_leftovers(
    ingress_lab: IngressLab,
) -> None:
    lab = ingress_lab.lab
    assert lab.gateway is not None
    before = filter_rules(lab)
    assert INGRESS_CHAIN in before
    assert lab.gateway.stop(signal.SIGTERM) == 0
    assert "EXTCONN" not in filter_rules(lab)
    ip6 = sh(["ip", "netns", "exec", lab.gw_ns, "ip6tables-nft-save", "-t", "filter"]).stdout
    assert "EXTCONN" not in ip6
    assert "LAB-SERVICES" in lab.iptables_save(lab.gw_ns, "nat")  # not ours: untouched

    lab.start_gateway()
    lab.wait_tcp(lab.ext_ns, SOURCE_IPS[0], POD_HTTP_PORT, process=lab.gateway)
    lab.gateway.stop(signal.SIGKILL)  # a crash leaves the chain behind...
    assert filter_rules(lab) == before
    lab.start_gateway()  # ...and the next start replaces it rather than adding to it
    lab.wait_tcp(lab.ext_ns, SOURCE_IPS[0], POD_HTTP_PORT, process=lab.gateway)
    assert filter_rules(lab) == before
    assert ingress_lab.get(SOURCE_IPS[0]) == f"my-pod1 {POD_GATEWAY_IP}"
