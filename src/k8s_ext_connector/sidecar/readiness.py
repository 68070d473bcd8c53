"""Pure readiness of a sidecar: which rules it serves, and whether the pod may count on it.

The choice (docs/architecture.md, "Readiness"): one rule that cannot be served (an IPv6
destination, a gateway that is unreachable or down) fails alone and is named in the
``/ready`` body; it does not make the sidecar NotReady while another rule is served, so
one bad ExternalService cannot hold every pod of its source Service back. The sidecar is
NotReady when it serves nothing it was asked to serve (no session up), and, until it has
been ready once, while a gateway session is still within its first ``grace`` seconds
without having connected: the native sidecar's startup probe then holds the app until
every tunnel is up, or has had its chance.
"""

from __future__ import annotations

from k8s_ext_connector.core.config import GatewayEndpoint, SidecarConfig
from k8s_ext_connector.sidecar.sessions import GatewayStatus

STARTUP_GRACE = 10.0


def readiness(
    config: SidecarConfig,
    problems: tuple[str, ...],
    sessions: tuple[GatewayStatus, ...],
    *,
    listening: bool,
    starting: bool,
    grace: float = STARTUP_GRACE,
) -> tuple[bool, str]:
    """``(ready, detail)``; ``starting``: the sidecar has not been ready yet."""
    if not listening:
        return False, "listener not up"
    rules_via: dict[GatewayEndpoint, list[str]] = {}
    for rule in config.rules:
        rules_via.setdefault(rule.gateway, []).append(rule.name)
    failing = [
        *problems,
        *(
            f"gateway {s.gateway.endpoint} (rules {', '.join(rules_via.get(s.gateway, []))}): "
            f"{s.error}"
            for s in sessions
            if not s.up
        ),
    ]
    if starting and any(
        not s.up and not s.connected_once and s.down_for < grace for s in sessions
    ):
        return False, "connecting: " + "; ".join(failing)
    if (config.rules or problems) and not any(s.up for s in sessions):
        return False, "; ".join(failing)
    if failing:
        return True, "degraded: " + "; ".join(failing)
    return True, "ready"
