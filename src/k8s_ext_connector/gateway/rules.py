"""Pure rendering of the gateway's iptables rules (golden-file tested).

**Source IPs guarded** (``render_ingress_rules``): one chain of ours in the filter table,
``EXTCONN-INGRESS``, hooked into INPUT by a single commented jump. For each source IP:

- the SSH port is accepted from the node itself (``-i lo``) and from each network of
  ``sshAllowFrom`` (the cluster's pod CIDRs and node addresses): a stolen client key is
  useless from anywhere else;
- each ``sourceIP:port`` the ingress relay listens on is accepted from its allowed peers
  (the targetIPs), repeating the relay's own peer check in the kernel (defence in depth);
- any other *new* connection to the source IP is refused: TCP with a reset, anything else
  with ICMP port unreachable. Refused, not dropped: a pod or target that is not allowed
  fails at once instead of hanging until its timeout, and a scanner learns nothing a
  silent drop would hide (that the address is there shows in the ARP and the SSH port's
  answers to the cluster anyway). So the node's other services (NodePorts bound to all
  addresses excepted, as they are DNATed before INPUT), kubelet, anything on 0.0.0.0, are
  not reachable through a source IP.

An empty ``sshAllowFrom`` leaves SSH to the node itself: fail closed. The ACCEPTs let allowed
peers through on nodes whose INPUT policy drops by default.

Only new connections are refused: replies to the gateway's own connections from the source
IP, and connections already established when a reload narrowed who may connect, fall
through to the node's own rules and are left to finish, as the relay and the SSH server
leave them (a reload decides who may open *new* connections).

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
    """filter-table rules guarding every ``family`` source IP of ``config``."""
    host = "/128" if family == "ipv6" else "/32"
    reject_other = "icmp6-port-unreachable" if family == "ipv6" else "icmp-port-unreachable"
    allow_from = [network for network in config.ssh_allow_from if family_of(network) == family]
    specs: list[str] = []
    for source in config.sources:
        if family_of(source.source_ip) != family:
            continue
        to = f"-d {source.source_ip}{host}"
        ssh = f"{to} -p tcp -m tcp --dport {config.ssh_port}"
        where = _where(source.source_ip, config.ssh_port, family)
        specs.append(
            f"{to} -i lo -p tcp -m tcp --dport {config.ssh_port} "
            f"{comment(f'ssh {where} from the node itself')} -j ACCEPT"
        )
        for network in allow_from:
            specs.append(f"-s {network} {ssh} {comment(f'ssh {where} from {network}')} -j ACCEPT")
        listen = f"{to} -p tcp -m tcp"
        for port, (_, peers) in sorted(source.ingress_ports().items()):
            where = _where(source.source_ip, port, family)
            for peer in sorted(peers, key=ipaddress.ip_address):
                specs.append(
                    f"-s {peer}{host} {listen} --dport {port} "
                    f"{comment(f'ingress {where} from {peer}')} -j ACCEPT"
                )
        specs.append(
            f"{to} -p tcp -m conntrack --ctstate NEW "
            f"{comment(f'{source.source_ip}: any other TCP connection')} "
            "-j REJECT --reject-with tcp-reset"
        )
        specs.append(
            f"{to} -m conntrack --ctstate NEW "
            f"{comment(f'{source.source_ip}: anything else')} "
            f"-j REJECT --reject-with {reject_other}"
        )
    hook = comment("k8s-ext-connector: only the cluster and targets reach source IPs")
    jump = Jump(chain="INPUT", spec=f"{hook} -j {INGRESS_CHAIN}")
    return ChainSet(
        table=TABLE, chains={INGRESS_CHAIN: tuple(specs)}, jumps=(jump,), owned_prefix=OWNED_PREFIX
    )


def _where(address: str, port: int, family: Family) -> str:
    return f"[{address}]:{port}" if family == "ipv6" else f"{address}:{port}"


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
