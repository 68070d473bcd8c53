"""Which gateway node holds each source IP: deterministic, sticky, balanced.

A source IP stays on its node while that node is Ready and labelled (moving it breaks its
tunnels, so stability beats perfect balance). IPs without a node, or whose node went
NotReady or lost the label, go to the eligible node holding the fewest IPs, ties broken
by name. The same inputs always give the same answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from k8s_ext_connector.operator.snapshot import NodeRecord


def eligible_nodes(nodes: Iterable[NodeRecord], label: tuple[str, str]) -> list[str]:
    return sorted(n.name for n in nodes if n.ready and label in n.labels)


def assign_gateways(
    source_ips: Iterable[str], eligible: list[str], previous: Mapping[str, str]
) -> dict[str, str | None]:
    ips = sorted(set(source_ips))
    assignment: dict[str, str | None] = {}
    load: Counter[str] = Counter({node: 0 for node in eligible})
    for ip in ips:
        node = previous.get(ip)
        if node is not None and node in load:
            assignment[ip] = node
            load[node] += 1
    for ip in ips:
        if ip in assignment:
            continue
        if not eligible:
            assignment[ip] = None
            continue
        node = min(eligible, key=lambda name: (load[name], name))
        assignment[ip] = node
        load[node] += 1
    return assignment
