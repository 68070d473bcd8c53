"""The seed's egress scenario on real namespaces: real iptables, SSH, TCP and source IPs."""

from __future__ import annotations

import pytest

from k8s_ext_connector.lab.client import run_gets
from k8s_ext_connector.lab.netns import sh
from k8s_ext_connector.lab.topology import EXTERNAL_SERVER_IP, SERVICE_IP, SOURCE_IPS, Lab
from tests.netns.conftest import SeedLab

pytestmark = pytest.mark.root


def gets(lab: Lab, pod: str, host: str, port: int, count: int = 1) -> list[str]:
    """Bodies (the source IP the server saw) or 'error: ...' for each connection."""
    outcomes = lab.in_pod(pod, lambda: run_gets(host, port, count))
    assert isinstance(outcomes, list)
    return [o.body if o.ok else f"error: {o.body}" for o in outcomes]


@pytest.mark.parametrize(
    ("pod", "source_ip"), [("my-pod1", SOURCE_IPS[0]), ("my-pod2", SOURCE_IPS[1])]
)
def test_each_pod_leaves_with_its_source_ip(seed_lab: SeedLab, pod: str, source_ip: str) -> None:
    assert gets(seed_lab.lab, pod, SERVICE_IP, 8000) == [source_ip]
    assert seed_lab.lab.server_log() == [{"port": 8000, "client": source_ip, "path": "/"}]


def test_fifty_concurrent_connections_per_pod_all_carry_the_right_ip(seed_lab: SeedLab) -> None:
    lab = seed_lab.lab
    assert gets(lab, "my-pod1", SERVICE_IP, 8000, 50) == [SOURCE_IPS[0]] * 50
    assert gets(lab, "my-pod2", SERVICE_IP, 8000, 50) == [SOURCE_IPS[1]] * 50
    clients = [str(record["client"]) for record in lab.server_log()]
    assert sorted(clients) == [SOURCE_IPS[0]] * 50 + [SOURCE_IPS[1]] * 50


def test_dialling_the_target_directly_is_intercepted_too(seed_lab: SeedLab) -> None:
    assert gets(seed_lab.lab, "my-pod1", EXTERNAL_SERVER_IP, 8000) == [SOURCE_IPS[0]]


def _packets_to_server(lab: Lab) -> int:
    """Packets that reached the external server's port 8000 (a counting rule in its netns)."""
    out = sh(
        ["ip", "netns", "exec", lab.ext_ns, "iptables-nft", "-L", "INPUT", "-v", "-x", "-n"]
    ).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if "dpt:8000" in line)


def test_pod_without_a_rule_is_refused_and_nothing_reaches_the_server(seed_lab: SeedLab) -> None:
    lab = seed_lab.lab
    sh(
        [
            "ip",
            "netns",
            "exec",
            lab.ext_ns,
            "iptables-nft",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "8000",
        ]
    )
    assert _packets_to_server(lab) == 0
    result = gets(lab, "other-pod", SERVICE_IP, 8000)
    assert result == ["error: ConnectionRefusedError"]
    # Dialling the target itself from a pod without a sidecar goes nowhere either.
    lab.in_pod("other-pod", lambda: _expect_no_connection(EXTERNAL_SERVER_IP, 8000))
    # A pod with a sidecar, to a destination none of its rules intercepts: refused too.
    assert gets(lab, "my-pod1", "198.51.100.131", 8000)[0].startswith("error: ")
    assert _packets_to_server(lab) == 0
    assert lab.server_log() == []


def _expect_no_connection(host: str, port: int) -> None:
    import socket

    with (
        pytest.raises(OSError, match=r"timed out|unreachable|refused"),
        socket.create_connection((host, port), timeout=1),
    ):
        pass


def test_sidecar_rules_are_exactly_the_rendered_ones(seed_lab: SeedLab) -> None:
    rules = [
        line
        for line in seed_lab.lab.iptables_save(seed_lab.lab.pods["my-pod1"].netns).splitlines()
        if line.startswith("-A")
    ]
    assert rules == [
        '-A OUTPUT -p tcp -m comment --comment "k8s-ext-connector: egress to external services"'
        " -j EXTCONN-EGRESS",
        "-A EXTCONN-EGRESS -d 198.51.100.130/32 -p tcp -m tcp --dport 8000 -m comment --comment"
        ' "external-services/my-externalservice:8000 via 203.0.113.200" -j REDIRECT --to-ports'
        " 15001",
        "-A EXTCONN-EGRESS -d 203.0.113.10/32 -p tcp -m tcp --dport 8000 -m comment --comment"
        ' "external-services/my-externalservice:8000 via 203.0.113.200" -j REDIRECT --to-ports'
        " 15001",
    ]
