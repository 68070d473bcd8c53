"""Pure rendering of the sidecar's rules (golden-file tested).

Only the intercepted destinations are redirected, so the sidecar's own SSH traffic to the
gateways is never caught (the config refuses a rule that intercepts a gateway endpoint).
Everything sits in one chain of ours, hooked into nat OUTPUT by a single commented jump.

The rules are never removed by the sidecar (see docs/architecture.md, "Fail closed"):
they live as long as the pod's network namespace, and a restarted sidecar takes them over
as a diff. Before the first config exists, the hold chain rejects the pod's new TCP
connections (but loopback), so nothing leaves the pod before there are rules to follow.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from k8s_ext_connector.core.config import SidecarConfig
from k8s_ext_connector.core.iptables import ChainSet, Jump, comment

EGRESS_CHAIN = "EXTCONN-EGRESS"
OWNED_PREFIX = "EXTCONN-EGRESS"
HOLD_CHAIN = "EXTCONN-HOLD"


@dataclass(frozen=True)
class Served:
    """What the data plane can serve of a config, and what it cannot (named, one per line)."""

    config: SidecarConfig
    problems: tuple[str, ...] = ()


def served(config: SidecarConfig) -> Served:
    """Leave out what cannot be served (IPv6 intercepts) instead of refusing the whole config.

    A rule keeps its IPv4 intercepts; a rule left without any is dropped (so no session to
    its gateway either). Each left-out destination is reported with its rule, for /ready.
    """
    rules = []
    problems: list[str] = []
    for i, rule in enumerate(config.rules):
        kept = tuple(d for d in rule.intercept if ipaddress.ip_address(d.address).version == 4)
        for j, destination in enumerate(rule.intercept):
            if destination not in kept:
                problems.append(
                    f"rule {rule.name} (rules[{i}].intercept[{j}]) {destination}: "
                    "not intercepted, IPv6 egress is not supported yet"
                )
        if kept:
            rules.append(replace(rule, intercept=kept))
    return Served(replace(config, rules=tuple(rules)), tuple(problems))


def render_egress_rules(config: SidecarConfig) -> ChainSet:
    """nat-table rules that send each intercepted destination to the transparent listener.

    Only what ``served`` keeps is rendered: an IPv6 destination has no place in the IPv4 table.
    """
    specs: list[str] = []
    for rule in served(config).config.rules:
        for destination in rule.intercept:
            specs.append(
                f"-d {destination.address}/32 -p tcp -m tcp --dport {destination.port} "
                f"{comment(f'{rule.name} via {rule.gateway.address}')} "
                f"-j REDIRECT --to-ports {config.listen_port}"
            )
    hook = comment("k8s-ext-connector: egress to external services")
    jump = Jump(chain="OUTPUT", spec=f"-p tcp {hook} -j {EGRESS_CHAIN}")
    return ChainSet(
        table="nat", chains={EGRESS_CHAIN: tuple(specs)}, jumps=(jump,), owned_prefix=OWNED_PREFIX
    )


def render_hold_rules() -> ChainSet:
    """filter-table rules that refuse every new TCP connection of the pod but loopback.

    In force only while the sidecar waits for its first config: which destinations to
    intercept is not known yet, so none may leave. Established connections (the kubelet's
    probes, answered from the pod) and UDP (DNS) are not touched. Removed once the egress
    rules are in.
    """
    specs = (
        f"-o lo {comment('loopback stays open')} -j RETURN",
        f"-p tcp -m conntrack --ctstate NEW "
        f"{comment('k8s-ext-connector: no config yet, nothing leaves')} "
        f"-j REJECT --reject-with tcp-reset",
    )
    hook = comment("k8s-ext-connector: hold until the sidecar has its config")
    jump = Jump(chain="OUTPUT", spec=f"{hook} -j {HOLD_CHAIN}", first=True)
    return ChainSet(
        table="filter", chains={HOLD_CHAIN: specs}, jumps=(jump,), owned_prefix=HOLD_CHAIN
    )


def release_hold() -> ChainSet:
    """The desired filter table once the egress rules are in: no hold chain, no jump to it."""
    return ChainSet(table="filter", chains={}, owned_prefix=HOLD_CHAIN)
