"""The gateway on a node that masquerades its egress, as kindnet, ip-masq-agent and Calico's
natOutgoing do: real namespaces, real iptables (nft and legacy), real SSH and TCP.

The seed's lab, plus what kindnet's KIND-MASQ-AGENT amounts to in the gateway's netns (the
"node"): ``nat POSTROUTING -m addrtype ! --dst-type LOCAL -j MASQUERADE``, added by "the
CNI" before the gateway starts. Without the gateway's SNAT guard, that rule rewrites the
source of the gateway's egress connections (bound to 203.0.113.200/.201) to the node's
primary address on that link, ``GATEWAY_EXTERNAL_IP`` (203.0.113.1), and the external
server no longer sees the source IP; with it, the server sees .200 for my-pod1 and .201
for my-pod2. The same lab, the same rule, only ``--no-snat-guard`` differs: the guard is
what makes the difference.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest

from k8s_ext_connector.core.config import GatewayConfig
from k8s_ext_connector.core.iptables import Family
from k8s_ext_connector.core.planner import Plan
from k8s_ext_connector.gateway.rules import SNAT_CHAIN, render_snat_rules
from k8s_ext_connector.lab.client import run_gets
from k8s_ext_connector.lab.netns import sh
from k8s_ext_connector.lab.scenario import SERVICE1, SERVICE2, ScenarioKeys, plan_seed
from k8s_ext_connector.lab.topology import (
    GATEWAY_EXTERNAL_IP,
    GATEWAY_IFACE,
    SERVICE_IP,
    SOURCE_IPS,
    Lab,
    Process,
)
from tests.polling import wait_for

pytestmark = pytest.mark.root

PODS = {"my-pod1": SOURCE_IPS[0], "my-pod2": SOURCE_IPS[1]}
# kindnet's rule reduced to its effect (KIND-MASQ-AGENT returns only for the pod CIDR).
CNI_MASQUERADE = ("-m", "addrtype", "!", "--dst-type", "LOCAL", "-j", "MASQUERADE")
CNI_RULE = "-A POSTROUTING -m addrtype ! --dst-type LOCAL -j MASQUERADE"
BACKENDS = ("nft", "legacy")
CHECK_SECONDS = 0.5


@dataclass
class MasqueradingLab:
    lab: Lab
    keys: ScenarioKeys
    plan: Plan
    backend: str

    def iptables(self, *args: str, family: Family = "ipv4") -> str:
        binary = "iptables" if family == "ipv4" else "ip6tables"
        return sh(["ip", "netns", "exec", self.lab.gw_ns, f"{binary}-{self.backend}", *args]).stdout

    def nat(self, family: Family = "ipv4") -> list[str]:
        """The node's nat table: chain declarations and rules, as iptables-save prints them."""
        binary = "iptables" if family == "ipv4" else "ip6tables"
        out = sh(["ip", "netns", "exec", self.lab.gw_ns, f"{binary}-{self.backend}-save",
                  "-t", "nat"]).stdout
        return [line.split(" [")[0] if line.startswith(":") else line
                for line in out.splitlines() if line.startswith(("-A ", ":"))]

    def start_gateway(self, *flags: str) -> Process:
        """``Lab.start_gateway`` with extra gateway options (the config is already written)."""
        lab = self.lab
        lab.gateway = lab.spawn("gateway", lab.gw_ns, lab.agent_argv(
            "gateway",
            "--config", str(lab.write_gateway_config(self.plan.gateway)),
            "--host-key", str(lab.workdir / "gateway-host-key"),
            "--manage-addresses", GATEWAY_IFACE,
            "--reload-interval", "0.2",
            *flags,
        ))
        for source in self.plan.gateway.sources:
            lab.wait_tcp(lab.gw_ns, source.source_ip, self.plan.gateway.ssh_port,
                         process=lab.gateway)
        return lab.gateway

    def restart_gateway(self, *flags: str) -> Process:
        assert self.lab.gateway is not None
        assert self.lab.gateway.stop(signal.SIGTERM) == 0
        return self.start_gateway(*flags)

    def seen_by_server(self, pod: str) -> str:
        """One new connection from ``pod`` to the ExternalService: the source IP the
        external server saw, or ``error: ...``."""
        outcomes = self.lab.in_pod(pod, lambda: run_gets(SERVICE_IP, 8000, 1))
        assert isinstance(outcomes, list)
        (outcome,) = outcomes
        return outcome.body if outcome.ok else f"error: {outcome.body}"

    def wait_seen(self, pod: str, expected: str, timeout: float = 15) -> None:
        """New connections until one is seen from ``expected`` (after a gateway restart the
        sidecar's session comes back with backoff; failures in between are resets)."""
        wait_for(lambda: self.seen_by_server(pod) == expected, timeout,
                 f"{pod}'s connections seen from {expected}")


@contextmanager
def masquerading_lab(backend: str, *gateway_flags: str) -> Iterator[MasqueradingLab]:
    """The seed lab whose node masquerades its egress; the gateway started with the flags."""
    with Lab.create(list(PODS)) as lab:
        lab.start_external_server()
        keys = ScenarioKeys.generate()
        m = MasqueradingLab(lab, keys, plan_seed(keys, lab.host_key), backend)
        m.iptables("-t", "nat", "-A", "POSTROUTING", *CNI_MASQUERADE)  # the CNI was first
        m.start_gateway(*gateway_flags)
        lab.start_sidecar("my-pod1", m.plan.sidecars[SERVICE1], keys.clients[SERVICE1])
        lab.start_sidecar("my-pod2", m.plan.sidecars[SERVICE2], keys.clients[SERVICE2])
        yield m


def guarded_nat(config: GatewayConfig, family: Family = "ipv4") -> list[str]:
    """What the node's nat table must hold with the guard: our jump first, the CNI's rule
    untouched after it, our chain with exactly the rendered rules."""
    desired = render_snat_rules(config, family)
    return [
        ":PREROUTING ACCEPT", ":INPUT ACCEPT", ":OUTPUT ACCEPT", ":POSTROUTING ACCEPT",
        f":{SNAT_CHAIN} -",
        f"-A POSTROUTING {desired.jumps[0].spec}",
        *([CNI_RULE] if family == "ipv4" else []),
        *(f"-A {SNAT_CHAIN} {spec}" for spec in desired.chains[SNAT_CHAIN]),
    ]


def unguarded_nat(family: Family = "ipv4") -> list[str]:
    return [":PREROUTING ACCEPT", ":INPUT ACCEPT", ":OUTPUT ACCEPT", ":POSTROUTING ACCEPT",
            *([CNI_RULE] if family == "ipv4" else [])]


def server_clients(lab: Lab) -> list[str]:
    return [str(record["client"]) for record in lab.server_log()]


# ---- (1) with the guard, the server sees each pod's source IP -------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_the_guard_each_pod_leaves_with_its_source_ip(backend: str) -> None:
    with masquerading_lab(backend) as m:
        for pod, source_ip in PODS.items():
            assert m.seen_by_server(pod) == source_ip
        assert server_clients(m.lab) == list(PODS.values())
        # Detected backend: the node's rules were in ``backend``, so ours are there too.
        assert m.nat() == guarded_nat(m.plan.gateway)
        # The node has IPv6: ip6tables holds the same jump, first, to an empty chain.
        assert m.nat("ipv6") == guarded_nat(m.plan.gateway, "ipv6")


# ---- (2) the control: the same node without the guard shows the node's address ---------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_the_guard_the_server_sees_the_gateways_address(backend: str) -> None:
    with masquerading_lab(backend, "--no-snat-guard") as m:
        assert m.nat() == unguarded_nat()
        for pod in PODS:
            assert m.seen_by_server(pod) == GATEWAY_EXTERNAL_IP
        assert server_clients(m.lab) == [GATEWAY_EXTERNAL_IP] * len(PODS)
        # Same lab, same CNI rule: only the flag changes, and the source IPs come back.
        m.restart_gateway()
        for pod, source_ip in PODS.items():
            m.wait_seen(pod, source_ip)
        assert m.nat() == guarded_nat(m.plan.gateway)


# ---- (3) a rule inserted above the jump: the jump is back on top within the check period ----


def _handles(m: MasqueradingLab, chain: str) -> list[str]:
    """nft rule handles of a chain of the ip nat table, in order: a rule deleted and added
    again (even with the same text) gets a new handle, so equal handles mean no rewrite."""
    out = sh(["ip", "netns", "exec", m.lab.gw_ns, "nft", "-a", "list", "chain", "ip", "nat",
              chain]).stdout
    return [match.group(1) for line in out.splitlines() if "{" not in line  # rules only
            for match in [re.search(r"# handle (\d+)$", line)] if match]


def _postrouting(m: MasqueradingLab) -> list[str]:
    return [rule for rule in m.nat() if rule.startswith("-A POSTROUTING ")]


def _checks(m: MasqueradingLab) -> int:
    assert m.lab.gateway is not None
    return m.lab.gateway.output().count("iptables rules checked")


def _wait_checks(m: MasqueradingLab, count: int) -> None:
    checks = _checks(m)
    wait_for(lambda: _checks(m) >= checks + count, 10 * CHECK_SECONDS, f"{count} rule checks")


def test_a_rule_inserted_above_the_jump_gets_the_jump_back_on_top_within_the_check_period() -> None:
    flags = ("--rules-check-interval", str(CHECK_SECONDS), "--log-level", "debug")
    with masquerading_lab("nft", *flags) as m:
        jump = f"-A POSTROUTING {render_snat_rules(m.plan.gateway).jumps[0].spec}"
        assert _postrouting(m) == [jump, CNI_RULE]
        # While the jump is first, checks write nothing: every rule keeps its nft handle.
        before = {chain: _handles(m, chain) for chain in ("POSTROUTING", SNAT_CHAIN)}
        _wait_checks(m, 3)
        assert {chain: _handles(m, chain) for chain in before} == before

        # The CNI resyncs and inserts its rule at the top, above our jump.
        m.iptables("-t", "nat", "-I", "POSTROUTING", "1", "-m", "comment", "--comment",
                   "cni resync", *CNI_MASQUERADE)
        inserted = '-A POSTROUTING -m comment --comment "cni resync" ' + CNI_RULE[15:]
        started = time.monotonic()
        wait_for(lambda: _postrouting(m)[0] == jump, CHECK_SECONDS + 3, "the jump back on top")
        assert time.monotonic() - started < CHECK_SECONDS + 3
        assert _postrouting(m) == [jump, inserted, CNI_RULE]  # only our jump moved
        assert _handles(m, SNAT_CHAIN) == before[SNAT_CHAIN]  # our chain was not rewritten
        assert _handles(m, "POSTROUTING")[2] == before["POSTROUTING"][1]  # the CNI's neither
        assert m.nat() == [*guarded_nat(m.plan.gateway)[:5], jump, inserted,
                           *guarded_nat(m.plan.gateway)[6:]]
        assert m.lab.gateway is not None
        assert "source IP SNAT rules (ipv4) had drifted" in m.lab.gateway.output()
        for pod, source_ip in PODS.items():
            assert m.seen_by_server(pod) == source_ip

        # And no churn afterwards either.
        after = {chain: _handles(m, chain) for chain in ("POSTROUTING", SNAT_CHAIN)}
        _wait_checks(m, 3)
        assert {chain: _handles(m, chain) for chain in after} == after


# ---- (4) stop: our chain and jump go, the CNI's masquerade stays ----------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_removes_the_chain_and_jump_and_leaves_the_cni_rule(backend: str) -> None:
    with masquerading_lab(backend) as m:
        assert m.nat() == guarded_nat(m.plan.gateway)
        assert m.lab.gateway is not None
        assert m.lab.gateway.stop(signal.SIGTERM) == 0
        assert m.nat() == unguarded_nat()
        assert m.nat("ipv6") == unguarded_nat("ipv6")


# ---- leftovers, reloads --------------------------------------------------------------------


def test_leftovers_of_a_killed_gateway_are_replaced_at_start() -> None:
    with masquerading_lab("nft") as m:
        expected = guarded_nat(m.plan.gateway)
        assert m.lab.gateway is not None
        m.lab.gateway.stop(signal.SIGKILL)  # a crash: the chain and jump stay behind
        assert m.nat() == expected
        m.iptables("-t", "nat", "-I", "POSTROUTING", "1", *CNI_MASQUERADE)  # and a resync
        m.start_gateway()
        # One jump, first again; the resync's duplicate of the CNI rule is not ours to touch.
        assert m.nat() == [*expected[:6], CNI_RULE, *expected[6:]]
        for pod, source_ip in PODS.items():
            m.wait_seen(pod, source_ip)


def test_reload_follows_the_source_ips() -> None:
    with masquerading_lab("nft") as m:
        full = m.plan.gateway
        # my-service2's source IP leaves this gateway, then comes back.
        one = replace(full, sources=full.sources[:1])
        m.lab.write_gateway_config(one)
        wait_for(lambda: m.nat() == guarded_nat(one), 10, "one SNAT rule")
        assert m.seen_by_server("my-pod1") == SOURCE_IPS[0]
        m.lab.write_gateway_config(full)
        wait_for(lambda: m.nat() == guarded_nat(m.plan.gateway), 10, "both SNAT rules again")
        m.wait_seen("my-pod2", SOURCE_IPS[1])
        assert m.seen_by_server("my-pod1") == SOURCE_IPS[0]
