"""Issue #10: the sidecar fails closed through its whole life, on a pod network that routes.

The lab's node normally does not forward, so a pod could not reach the external server
without the tunnel and a leak would not show. Here it does (``Lab.enable_routing``, as in
a real cluster), and an app in the pod dials targetIP:targetPort every 20 ms while the
sidecar waits for its config, runs, is SIGTERMed, crashes on an exception (its health port
taken) and restarts. Not one of those connections may reach the server from the pod's own
address; the control shows that, without the sidecar, one does.

Also: one rule that cannot be served (a gateway on an unreachable IPv6 address, an IPv6
destination) fails alone, and ``/ready`` names it.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from k8s_ext_connector.core.config import EgressRule, Endpoint, GatewayEndpoint
from k8s_ext_connector.lab import netns
from k8s_ext_connector.lab.scenario import SERVICE1, ScenarioKeys, plan_seed
from k8s_ext_connector.lab.topology import EXTERNAL_SERVER_IP, SOURCE_IPS, Lab
from k8s_ext_connector.sidecar.rules import HOLD_CHAIN
from tests.netns.conftest import SeedLab
from tests.netns.test_sidecar import egress_rules, first
from tests.polling import wait_for

pytestmark = pytest.mark.root

POD = "my-pod1"
TARGET_PORT = 8000
HEALTH_PORT = 15021
EVERY = 0.02  # the app's dial interval, seconds


@dataclass(frozen=True)
class Dial:
    phase: str  # what the test was doing when the dial started
    ok: bool
    seen: str  # the client address the server answered, or the error


def dial(host: str, port: int) -> tuple[bool, str]:
    """One HTTP GET; the echo server answers the client address it saw."""
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
    except OSError as error:
        return False, type(error).__name__
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.0 200"), body.decode(errors="replace").strip()


class Dialer:
    """The app: dials from the pod's namespace every ``EVERY`` seconds until stopped."""

    def __init__(self, lab: Lab, pod: str, host: str, port: int) -> None:
        self.phase = "start"
        self.dials: list[Dial] = []
        self._stop = threading.Event()
        ns = lab.pods[pod].netns
        self._thread = threading.Thread(
            target=lambda: netns.call_in_netns(ns, lambda: self._loop(host, port), 900),
            name="dialer",
            daemon=True,
        )

    def _loop(self, host: str, port: int) -> None:
        while not self._stop.is_set():
            phase = self.phase
            self.dials.append(Dial(phase, *dial(host, port)))
            self._stop.wait(EVERY)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def of(self, phase: str) -> list[Dial]:
        return [d for d in self.dials if d.phase == phase]

    def wait_dials(self, phase: str, count: int = 10) -> None:
        wait_for(lambda: len(self.of(phase)) >= count, 20, f"{count} dials in phase {phase}")

    def wait_tunnelled(self, phase: str) -> None:
        wait_for(lambda: any(d.ok and d.seen == SOURCE_IPS[0] for d in self.of(phase)), 20,
                 f"a dial through the tunnel in phase {phase}")


def listen_on(port: int) -> socket.socket:
    """A socket holding ``port`` on every address (created in the caller's namespace)."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("0.0.0.0", port))
    holder.listen()
    return holder


@pytest.fixture
def routed() -> Iterator[tuple[Lab, ScenarioKeys]]:
    with Lab.create([POD]) as lab:
        lab.start_external_server()
        lab.enable_routing()  # the pod network routes to the external server
        keys = ScenarioKeys.generate()
        lab.start_gateway(plan_seed(keys, lab.host_key).gateway)
        yield lab, keys


def test_no_direct_connection_leaves_the_pod_at_any_stage_of_the_sidecar(
    routed: tuple[Lab, ScenarioKeys],
) -> None:
    lab, keys = routed
    pod = lab.pods[POD]
    config = plan_seed(keys, lab.host_key).sidecars[SERVICE1]
    key = keys.clients[SERVICE1]
    assert Endpoint(EXTERNAL_SERVER_IP, TARGET_PORT) in config.rules[0].intercept

    # Control: without the sidecar a direct dial reaches the server from the pod's address.
    assert lab.in_pod(POD, lambda: dial(EXTERNAL_SERVER_IP, TARGET_PORT)) == (True, pod.ip)
    assert [e["client"] for e in lab.server_log()] == [pod.ip]
    mark = len(lab.server_log())

    dialer = Dialer(lab, POD, EXTERNAL_SERVER_IP, TARGET_PORT)
    holder: socket.socket | None = None
    try:
        # Before it first starts: waiting for the operator's config (the hold is in).
        lab.start_sidecar(POD, config, key, wait_ready=False, write_files=False,
                          args=["--wait-for-config"])
        wait_for(lambda: HOLD_CHAIN in lab.iptables_save(pod.netns, "filter"), 20, "the hold")
        dialer.phase = "waiting"
        dialer.start()
        dialer.wait_dials("waiting")

        dialer.phase = "running"
        lab.write_sidecar_files(POD, config, key)
        lab.wait_sidecar_ready(POD)
        dialer.wait_tunnelled("running")
        rules = egress_rules(lab, POD)
        assert HOLD_CHAIN not in lab.iptables_save(pod.netns, "filter")

        dialer.phase = "sigterm"
        assert pod.sidecar is not None
        assert pod.sidecar.stop(signal.SIGTERM) == 0
        dialer.phase = "stopped"
        dialer.wait_dials("stopped")

        # A crash by exception: the restarted sidecar finds its health port taken.
        holder = netns.call_in_netns(pod.netns, lambda: listen_on(HEALTH_PORT))
        dialer.phase = "crashing"
        crashing = lab.start_sidecar(POD, config, key, wait_ready=False)
        wait_for(lambda: not crashing.alive(), 20, "the sidecar to crash")
        assert crashing.popen.returncode not in (0, 2)
        assert "address already in use" in crashing.output()
        dialer.phase = "crashed"
        dialer.wait_dials("crashed")

        holder.close()
        holder = None
        dialer.phase = "restarted"
        lab.start_sidecar(POD, config, key)
        dialer.wait_tunnelled("restarted")
        assert egress_rules(lab, POD) == rules  # taken over, not duplicated
    finally:
        dialer.stop()
        if holder is not None:
            holder.close()

    leaked = [e for e in lab.server_log()[mark:] if e["client"] == pod.ip]
    summary = {p: sum(d.ok for d in dialer.of(p)) for p in dict.fromkeys(
        d.phase for d in dialer.dials)}
    assert leaked == [], f"{len(leaked)} direct connections leaked; ok dials by phase {summary}"
    assert not [d for d in dialer.dials if d.seen == pod.ip]
    for phase in ("waiting", "stopped", "crashed"):
        outcomes = {d.seen for d in dialer.of(phase)}
        assert outcomes == {"ConnectionRefusedError"}, (phase, outcomes)
    assert {e["client"] for e in lab.server_log()[mark:]} == {SOURCE_IPS[0]}


def test_an_unservable_rule_fails_alone_and_readiness_names_it(seed_lab: SeedLab) -> None:
    """The issue's case: an IPv6 sourceIP made unrelated pods' sidecars NotReady."""
    lab = seed_lab.lab
    good = seed_lab.plan.sidecars[SERVICE1]
    bad_gateway = GatewayEndpoint("2001:db8::5", lab.host_key.public_openssh)
    config = replace(good, rules=(
        *good.rules,
        EgressRule("ns1/v6-gateway:9000", (Endpoint("198.51.100.131", 9000),), bad_gateway,
                   Endpoint("203.0.113.10", 9000)),
        EgressRule("ns1/v6-target:443", (Endpoint("2001:db8::10", 443),), bad_gateway,
                   Endpoint("2001:db8::10", 443)),
    ))
    lab.start_sidecar("other-pod", config, seed_lab.keys.clients[SERVICE1],
                      args=["--startup-grace", "1"])
    status, detail = lab.sidecar_ready("other-pod")
    assert status == 200
    assert detail.startswith("degraded: ")
    assert "gateway [2001:db8::5]:2022 (rules ns1/v6-gateway:9000): " in detail
    assert "ns1/v6-target:443 (rules[2].intercept[0]) [2001:db8::10]:443" in detail
    assert good.rules[0].name not in detail  # the served rule is not named
    assert first(lab, "other-pod") == SOURCE_IPS[0]  # the good rule carries traffic
    # The bad gateway's own destination is refused, never sent on directly.
    assert lab.in_pod("other-pod", lambda: dial("198.51.100.131", 9000)) == (
        False, "ConnectionResetError")
