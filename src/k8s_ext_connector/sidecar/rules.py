"""Pure rendering of the sidecar's nat rules (golden-file tested).

Only the intercepted destinations are redirected, so the sidecar's own SSH traffic to the
gateways is never caught (the config refuses a rule that intercepts a gateway endpoint).
Everything sits in one chain of ours, hooked into nat OUTPUT by a single commented jump.
"""

from __future__ import annotations

from k8s_ext_connector.core.config import SidecarConfig
from k8s_ext_connector.core.iptables import ChainSet, Jump, comment

EGRESS_CHAIN = "EXTCONN-EGRESS"
OWNED_PREFIX = "EXTCONN-EGRESS"


def render_egress_rules(config: SidecarConfig) -> ChainSet:
    """nat-table rules that send each intercepted destination to the transparent listener."""
    specs: list[str] = []
    for rule in config.rules:
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
