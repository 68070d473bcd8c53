"""What a gateway's source IPs answer, and to whom, on real namespaces (issue #10).

- A full TCP connect scan (ports 1-65535) of both source IPs from the external network:
  from the targetIP only the ingress port answers; from another external address nothing
  does, neither the SSH port nor a node service listening on all addresses (a stand-in for
  the kubelet). From a pod address the SSH port answers.
- ``ssh-audit`` against the gateway: no failure and no warning for key exchange, host key,
  ciphers and MACs, and no version in the banner.
- One source IP the gateway cannot serve (IPv6 with ``--manage-addresses``, the issue's
  case) leaves every other one served, also one added afterwards, and the log says so.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from k8s_ext_connector.core.config import load_gateway_config
from k8s_ext_connector.lab.client import run_gets
from k8s_ext_connector.lab.netns import call_in_netns
from k8s_ext_connector.lab.scenario import (
    INGRESS_SERVICES,
    SERVICE1,
    SERVICE2,
    ScenarioKeys,
    plan_seed,
)
from k8s_ext_connector.lab.topology import (
    EXTERNAL_SERVER_IP,
    OTHER_EXTERNAL_IP,
    POD_HTTP_PORT,
    SERVICE_IP,
    SOURCE_IPS,
    SOURCE_SERVICE_IPS,
    Lab,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]
PODS = ("my-pod1", "my-pod2", "other-pod")
SSH_PORT = 2022
NODE_SERVICE_PORT = 10250  # something of the node's on all addresses (as the kubelet is)


def _scan(hosts: tuple[str, ...], bind: str | None, ports: range) -> set[tuple[str, int]]:
    """TCP connect scan with non-blocking sockets and epoll: the (host, port) pairs that
    accept a connection. A refused port answers with a reset at once; a port that does not
    answer within 2 s counts as closed (none does here: refusals are resets)."""
    pending = [(host, port) for host in hosts for port in ports]
    open_: set[tuple[str, int]] = set()
    poller = select.epoll()
    in_flight: dict[int, tuple[socket.socket, tuple[str, int], float]] = {}
    try:
        while pending or in_flight:
            while pending and len(in_flight) < 2000:
                target = pending.pop()
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if bind:
                    sock.bind((bind, 0))
                sock.connect_ex(target)
                poller.register(sock.fileno(), select.EPOLLOUT | select.EPOLLERR)
                in_flight[sock.fileno()] = (sock, target, time.monotonic() + 2)
            for fd, _ in poller.poll(0.1):
                sock, target, _ = in_flight.pop(fd)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    open_.add(target)
                poller.unregister(fd)
                sock.close()
            now = time.monotonic()
            for fd, (sock, _, deadline) in list(in_flight.items()):
                if now > deadline:
                    poller.unregister(fd)
                    sock.close()
                    del in_flight[fd]
    finally:
        for sock, _, _ in in_flight.values():
            sock.close()
        poller.close()
    return open_


def scan(ns: str, bind: str | None, ports: range = range(1, 65536)) -> set[tuple[str, int]]:
    return call_in_netns(ns, lambda: _scan(SOURCE_IPS, bind, ports), timeout=300)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """The seed with ingress (port 80 of each source Service), a node service on all
    addresses, another address on the external network, my-pod1/2 with sidecars."""
    with Lab.create(list(PODS)) as lab:
        lab.start_external_server()
        for pod, cluster_ip in zip(PODS[:2], SOURCE_SERVICE_IPS, strict=True):
            lab.start_pod_server(pod)
            lab.emulate_cluster_ip(cluster_ip, pod, [POD_HTTP_PORT])
        lab.add_external_address()
        keys = ScenarioKeys.generate()
        planned = plan_seed(keys, lab.host_key, source_services=INGRESS_SERVICES)
        lab.start_gateway(planned.gateway)
        lab.start_sidecar("my-pod1", planned.sidecars[SERVICE1], keys.clients[SERVICE1])
        lab.start_sidecar("my-pod2", planned.sidecars[SERVICE2], keys.clients[SERVICE2])
        node_service = lab.spawn(
            "node-service", lab.gw_ns,
            [sys.executable, "-c", "import socket, time\n"
             f"s = socket.create_server(('0.0.0.0', {NODE_SERVICE_PORT}))\ntime.sleep(3600)"])
        lab.wait_tcp(lab.gw_ns, "127.0.0.1", NODE_SERVICE_PORT, process=node_service)
        yield lab


def test_a_full_port_scan_finds_only_the_ingress_ports_and_only_from_the_target(
    lab: Lab,
) -> None:
    from_target = scan(lab.ext_ns, EXTERNAL_SERVER_IP)
    assert from_target == {(ip, POD_HTTP_PORT) for ip in SOURCE_IPS}
    from_other = scan(lab.ext_ns, OTHER_EXTERNAL_IP)
    assert from_other == set()
    # From the pod network the SSH port answers (and the node's own service does not).
    from_pod = scan(lab.pods["other-pod"].netns, None, range(1, 65536))
    assert from_pod == {(ip, SSH_PORT) for ip in SOURCE_IPS}
    # The tunnels still work, both ways.
    outcomes = lab.in_pod("my-pod1", lambda: run_gets(SERVICE_IP, 8000, 1))
    assert [o.body for o in outcomes] == [SOURCE_IPS[0]]  # type: ignore[attr-defined]


def test_ssh_audit_finds_no_weak_algorithm_and_no_version(lab: Lab) -> None:
    audit = Path(sys.executable).with_name("ssh-audit")
    assert audit.exists(), "ssh-audit is a dev dependency: make install"
    result = subprocess.run(
        ["ip", "netns", "exec", lab.pods["other-pod"].netns, str(audit), "-j",
         "--skip-rate-test", "-p", str(SSH_PORT), SOURCE_IPS[0]],
        capture_output=True, text=True, timeout=120, check=False,
    )
    report = json.loads(result.stdout)
    assert report["banner"]["raw"] == "SSH-2.0-ExtConnector"
    findings = {
        (section, item["algorithm"], level): item["notes"][level]
        for section in ("kex", "key", "enc", "mac")
        for item in report[section]
        for level in ("fail", "warn")
        if item.get("notes", {}).get(level)
    }
    assert findings == {}
    offered = {section: [item["algorithm"] for item in report[section]]
               for section in ("kex", "key", "enc", "mac")}
    assert offered["key"] == ["ssh-ed25519"]
    assert offered["enc"] == ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                              "chacha20-poly1305@openssh.com"]
    assert "mlkem768x25519-sha256" in offered["kex"]
    assert report["cves"] == []


def test_a_source_ip_the_gateway_cannot_serve_leaves_the_others_served(lab: Lab) -> None:
    """The issue's case: an IPv6 sourceIP, which --manage-addresses cannot add, arrives
    with the config; then a new valid source IP. The others keep working, the new one is
    served, and the log says exactly what was applied."""
    gateway = lab.gateway
    assert gateway is not None
    current = load_gateway_config(lab.workdir / "gateway.yaml")
    ipv6 = replace(current.sources[0], source_ip="2001:db8::5", ingress=())
    lab.write_gateway_config(replace(current, sources=(*current.sources, ipv6)))
    lab.wait_until(lambda: "applied 2 of 3 source IPs; 2001:db8::5 not applied: "
                   "--manage-addresses: only IPv4 source IPs can be managed"
                   in gateway.output(), 10, lambda: gateway.output()[-2000:],
                   process=gateway)
    third = replace(current.sources[0], source_ip="203.0.113.202", ingress=())
    lab.write_gateway_config(replace(current, sources=(*current.sources, ipv6, third)))
    lab.wait_until(lambda: "applied 3 of 4 source IPs; 2001:db8::5 not applied"
                   in gateway.output(), 10, lambda: gateway.output()[-2000:],
                   process=gateway)
    lab.wait_tcp(lab.pods["other-pod"].netns, "203.0.113.202", SSH_PORT, process=gateway)
    outcomes = lab.in_pod("my-pod2", lambda: run_gets(SERVICE_IP, 8000, 1))
    assert [o.body for o in outcomes] == [SOURCE_IPS[1]]  # type: ignore[attr-defined]
    assert "keeping the running one" not in gateway.output()


def _refused(host: str, port: int, bind: str) -> bool:
    with socket.socket() as sock:
        sock.settimeout(3)
        sock.bind((bind, 0))
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return True
        return False


def test_the_ssh_port_refuses_the_target_at_once(lab: Lab) -> None:
    """Refused, not dropped: a peer that is not allowed learns it at once."""
    assert call_in_netns(lab.ext_ns, lambda: _refused(SOURCE_IPS[0], SSH_PORT, EXTERNAL_SERVER_IP))
