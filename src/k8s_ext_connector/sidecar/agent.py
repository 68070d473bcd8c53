"""The sidecar agent: redirect intercepted destinations to one transparent listener, and
carry each connection over the shared SSH session to its rule's gateway.

Fail closed: a connection whose original destination has no rule, whose gateway session
is down, or whose channel the gateway refuses is reset at once. Nothing is ever sent on
directly, so the node's IP never leaks to the external server. While the agent runs,
its rules redirect; when it stops, it removes them (and replaces leftovers at start).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

import asyncssh

from k8s_ext_connector.core import iptables
from k8s_ext_connector.core.bridge import Splice
from k8s_ext_connector.core.config import Endpoint, SidecarConfig
from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.sidecar.rules import OWNED_PREFIX, render_egress_rules
from k8s_ext_connector.sidecar.sessions import SessionPool

log = logging.getLogger(__name__)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
CHANNEL_OPEN_TIMEOUT = 5.0
LISTEN_HOST = "127.0.0.1"  # REDIRECT from nat OUTPUT lands on loopback; other pods can't reach it


def check_supported(config: SidecarConfig) -> None:
    """What the data plane cannot do yet, as a config error before anything is touched."""
    for i, rule in enumerate(config.rules):
        for j, destination in enumerate(rule.intercept):
            if ":" in destination.address:
                raise ConfigError(
                    f"rules[{i}].intercept[{j}].address",
                    destination.address,
                    "IPv6 egress is not supported yet",
                )


def original_destination(sock: socket.socket) -> Endpoint:
    """Where the app meant to connect before REDIRECT rewrote it (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return Endpoint(socket.inet_ntoa(packed), port)


class SidecarAgent:
    def __init__(
        self, config: SidecarConfig, client_key: asyncssh.SSHKey, firewall: iptables.Iptables
    ) -> None:
        self.config = config
        self._firewall = firewall
        self._pool = SessionPool(client_key)
        self._server: asyncio.Server | None = None
        self._opening: set[asyncio.Task[None]] = set()
        self._splices: set[Splice] = set()
        self._rules_applied = False

    async def start(self) -> None:
        await self._pool.update(self.config.gateways())
        self._server = await asyncio.get_running_loop().create_server(
            self._accept, LISTEN_HOST, self.config.listen_port, reuse_address=True, backlog=4096
        )
        iptables.apply(self._firewall, render_egress_rules(self.config))
        self._rules_applied = True
        log.info(
            "intercepting %d destinations of %d rules",
            sum(len(r.intercept) for r in self.config.rules),
            len(self.config.rules),
        )

    async def apply(self, config: SidecarConfig) -> None:
        """Move to a new config; connections of rules that remain keep flowing."""
        check_supported(config)
        if config.listen_port != self.config.listen_port:
            raise ConfigError("listenPort", config.listen_port, "cannot change without a restart")
        await self._pool.update(tuple(dict.fromkeys(self.config.gateways() + config.gateways())))
        iptables.apply(self._firewall, render_egress_rules(config))
        self.config = config
        await self._pool.update(config.gateways())

    async def replace_key(self, client_key: asyncssh.SSHKey) -> None:
        await self._pool.replace_key(client_key)

    def readiness(self) -> tuple[bool, str]:
        if not self._rules_applied:
            return False, "rules not applied"
        down = self._pool.down()
        return (not down), ("; ".join(down) or "ready")

    async def stop(self) -> None:
        if self._rules_applied:
            iptables.remove(self._firewall, "nat", OWNED_PREFIX)
            self._rules_applied = False
        if self._server is not None:
            self._server.close()
        for splice in list(self._splices):
            splice.close()
        await self._pool.close()

    def _accept(self) -> asyncio.Protocol:
        splice = Splice(on_close=self._splices.discard, on_tcp_made=self._route)
        self._splices.add(splice)
        return splice.tcp_side

    def _route(self, splice: Splice) -> None:
        assert splice.tcp is not None
        try:
            destination = original_destination(splice.tcp.get_extra_info("socket"))
        except OSError:
            splice.close(rst=True)
            return
        rule = self.config.rule_for(destination)
        conn = self._pool.get(rule.gateway) if rule else None
        if rule is None or conn is None:
            log.info(
                "refusing connection to %s: %s",
                destination,
                "no rule" if rule is None else "gateway session down",
            )
            splice.close(rst=True)
            return
        task = asyncio.create_task(self._open_channel(splice, conn, rule.target))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open_channel(
        self, splice: Splice, conn: asyncssh.SSHClientConnection, target: Endpoint
    ) -> None:
        try:
            await asyncio.wait_for(
                conn.create_connection(lambda: splice.channel_side, target.address, target.port),
                CHANNEL_OPEN_TIMEOUT,
            )
        except (asyncssh.Error, OSError, TimeoutError) as error:
            log.info("refusing connection to %s: %s", target, str(error) or type(error).__name__)
            splice.close(rst=True)
