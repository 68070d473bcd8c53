"""Pure rendering of the gateway's iptables rules (golden-file tested).

**Ingress** (``render_ingress_rules``): one chain of ours in the filter table, hooked into
INPUT by a single commented jump. For each ``sourceIP:port`` the relay listens on: ACCEPT
from each allowed peer, then reset any other *new* connection. This repeats the relay's
own peer check in the kernel (defence in depth: a bug in the relay cannot open it to
anyone else), and the ACCEPT lets allowed peers through on nodes whose INPUT policy drops
by default.

Only new connections are reset: after a reload narrows who may connect, connections that
are already established fall through to the node's own rules and are left to finish, as
the relay leaves them (a reload decides who may open *new* connections).

**Source IPs kept** (``render_snat_rules``): one chain of ours in the nat table, jumped to
from the very top of POSTROUTING, with one ``-s <sourceIP> -j SNAT --to-source <sourceIP>``
per source IP. Many clusters masquerade everything a node sends to non-cluster
destinations (kindnet's masq agent, GKE/EKS ip-masq-agent, Calico natOutgoing): the
gateway's egress connections, bound to a source IP on the hostNetwork, would reach the
external server with the node's address. A same-address SNAT sets the connection's
source NAT binding (the kernel sets it up once per connection): the chain ends there, and
no later nat rule can rewrite the source, neither below our jump nor in a nat chain of
another table that the hook runs after ours (e.g. kube-proxy in nftables mode, Calico).
ACCEPT would only end this table's chain. The rules match any protocol: a source IP
belongs to the gateway alone. The jump is ``first``: when a CNI inserts a rule above it,
the diff moves it back to the top (and changes nothing while it is already there).
"""

from __future__ import annotations

import ipaddress

from k8s_ext_connector.core.config import GatewayConfig
from k8s_ext_connector.core.iptables import ChainSet, Family, Jump, comment

INGRESS_CHAIN = "EXTCONN-INGRESS"
OWNED_PREFIX = "EXTCONN-INGRESS"
TABLE = "filter"

SNAT_CHAIN = "EXTCONN-SNAT"
SNAT_OWNED_PREFIX = "EXTCONN-SNAT"
SNAT_TABLE = "nat"


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


def render_snat_rules(config: GatewayConfig, family: Family = "ipv4") -> ChainSet:
    """nat-table rules that keep each ``family`` source IP of ``config`` as the source."""
    host = "/128" if family == "ipv6" else "/32"
    specs = tuple(
        f"-s {source.source_ip}{host} {comment(f'keep source IP {source.source_ip}')} "
        f"-j SNAT --to-source {source.source_ip}"
        for source in config.sources
        if family_of(source.source_ip) == family
    )
    hook = comment("k8s-ext-connector: source IPs are never masqueraded")
    jump = Jump(chain="POSTROUTING", spec=f"{hook} -j {SNAT_CHAIN}", first=True)
    return ChainSet(
        table=SNAT_TABLE,
        chains={SNAT_CHAIN: specs},
        jumps=(jump,),
        owned_prefix=SNAT_OWNED_PREFIX,
    )
