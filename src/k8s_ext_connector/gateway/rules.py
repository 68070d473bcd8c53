"""Pure rendering of the gateway's ingress filter rules (golden-file tested).

One chain of ours in the filter table, hooked into INPUT by a single commented jump. For
each ``sourceIP:port`` the relay listens on: ACCEPT from each allowed peer, then reset any
other *new* connection. This repeats the relay's own peer check in the kernel (defence in
depth: a bug in the relay cannot open it to anyone else), and the ACCEPT lets allowed
peers through on nodes whose INPUT policy drops by default.

Only new connections are reset: after a reload narrows who may connect, connections that
are already established fall through to the node's own rules and are left to finish, as
the relay leaves them (a reload decides who may open *new* connections).
"""

from __future__ import annotations

import ipaddress

from k8s_ext_connector.core.config import GatewayConfig
from k8s_ext_connector.core.iptables import ChainSet, Family, Jump, comment

INGRESS_CHAIN = "EXTCONN-INGRESS"
OWNED_PREFIX = "EXTCONN-INGRESS"
TABLE = "filter"


def family_of(address: str) -> Family:
    return "ipv6" if ":" in address else "ipv4"


def render_ingress_rules(config: GatewayConfig, family: Family = "ipv4") -> ChainSet:
    """filter-table rules for the ingress entries of ``config`` whose source IP is ``family``."""
    host = "/128" if family == "ipv6" else "/32"
    specs: list[str] = []
    for source in config.sources:
        if family_of(source.source_ip) != family:
            continue
        listen = f"-d {source.source_ip}{host} -p tcp -m tcp"
        for port, (_, peers) in sorted(source.ingress_ports().items()):
            where = (
                f"{source.source_ip}:{port}"
                if family == "ipv4"
                else (f"[{source.source_ip}]:{port}")
            )
            for peer in sorted(peers, key=ipaddress.ip_address):
                specs.append(
                    f"-s {peer}{host} {listen} --dport {port} "
                    f"{comment(f'ingress {where} from {peer}')} -j ACCEPT"
                )
            specs.append(
                f"{listen} --dport {port} -m conntrack --ctstate NEW "
                f"{comment(f'ingress {where} from anyone else')} "
                "-j REJECT --reject-with tcp-reset"
            )
    hook = comment("k8s-ext-connector: ingress through source IPs")
    jump = Jump(chain="INPUT", spec=f"-p tcp {hook} -j {INGRESS_CHAIN}")
    return ChainSet(
        table=TABLE, chains={INGRESS_CHAIN: tuple(specs)}, jumps=(jump,), owned_prefix=OWNED_PREFIX
    )
