"""The sidecar agent: redirect intercepted destinations to one transparent listener, and
carry each connection over the shared SSH session to its rule's gateway.

Fail closed: a connection whose original destination has no rule, whose gateway session
is down, or whose channel the gateway refuses is reset at once. Nothing is ever sent on
directly, so the node's IP never leaks to the external server. The rules outlive the
agent: it never removes them (not on SIGTERM, not on an exception), so while no listener
is up they redirect to a closed loopback port and the app's connection is refused. They
die with the pod's network namespace; a restarted agent takes them over as a diff.
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
from k8s_ext_connector.sidecar.readiness import STARTUP_GRACE, readiness
from k8s_ext_connector.sidecar.rules import (
    EGRESS_CHAIN,
    release_hold,
    render_egress_rules,
    render_hold_rules,
    served,
)
from k8s_ext_connector.sidecar.sessions import SessionPool

log = logging.getLogger(__name__)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
CHANNEL_OPEN_TIMEOUT = 5.0
LISTEN_HOST = "127.0.0.1"  # REDIRECT from nat OUTPUT lands on loopback; other pods can't reach it


def hold(firewall: iptables.Iptables) -> bool:
    """Refuse the pod's new TCP connections until the first config's rules are in.

    Not when egress rules of an earlier run are in force: they keep failing closed for
    their destinations, and the pod's other traffic (its app may be running) is left alone.
    Returns whether the hold is in force.
    """
    nat = iptables.ObservedTable.parse(firewall.save("nat"))
    if EGRESS_CHAIN in nat.chains:
        return False
    iptables.apply(firewall, render_hold_rules())
    return True


def take_over(firewall: iptables.Iptables, config: SidecarConfig) -> None:
    """Make the egress rules ``config``'s (a diff over whatever is there), then drop the hold.

    In this order, so there is no moment without either.
    """
    iptables.apply(firewall, render_egress_rules(config))
    iptables.apply(firewall, release_hold())


def original_destination(sock: socket.socket) -> Endpoint:
    """Where the app meant to connect before REDIRECT rewrote it (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return Endpoint(socket.inet_ntoa(packed), port)


class SidecarAgent:
    def __init__(
        self,
        config: SidecarConfig,
        client_key: asyncssh.SSHKey,
        firewall: iptables.Iptables,
        startup_grace: float = STARTUP_GRACE,
    ) -> None:
        self._set_config(config)
        self._firewall = firewall
        self._startup_grace = startup_grace
        self._pool = SessionPool(client_key)
        self._server: asyncio.Server | None = None
        self._opening: set[asyncio.Task[None]] = set()
        self._splices: set[Splice] = set()
        self._been_ready = False

    def _set_config(self, config: SidecarConfig) -> None:
        split = served(config)
        self.config = split.config  # what is served: rules, sessions, routing
        self.problems = split.problems  # what is not, for /ready
        for problem in self.problems:
            log.warning("%s", problem)

    async def start(self) -> None:
        """Rules first (a no-op when ``take_over`` already ran), then listener, sessions."""
        take_over(self._firewall, self.config)
        self._server = await asyncio.get_running_loop().create_server(
            self._accept, LISTEN_HOST, self.config.listen_port, reuse_address=True, backlog=4096
        )
        await self._pool.update(self.config.gateways())
        log.info(
            "intercepting %d destinations of %d rules",
            sum(len(r.intercept) for r in self.config.rules),
            len(self.config.rules),
        )

    async def apply(self, config: SidecarConfig) -> None:
        """Move to a new config; connections of rules that remain keep flowing."""
        if config.listen_port != self.config.listen_port:
            raise ConfigError("listenPort", config.listen_port, "cannot change without a restart")
        new = served(config).config
        await self._pool.update(tuple(dict.fromkeys(self.config.gateways() + new.gateways())))
        iptables.apply(self._firewall, render_egress_rules(new))
        self._set_config(config)
        await self._pool.update(self.config.gateways())

    async def replace_key(self, client_key: asyncssh.SSHKey) -> None:
        await self._pool.replace_key(client_key)

    def readiness(self) -> tuple[bool, str]:
        ready, detail = readiness(
            self.config,
            self.problems,
            self._pool.status(),
            listening=self._server is not None and self._server.is_serving(),
            starting=not self._been_ready,
            grace=self._startup_grace,
        )
        self._been_ready |= ready
        return ready, detail

    async def stop(self) -> None:
        """Stop serving; the rules stay (module docstring), so the pod stays fail-closed."""
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
