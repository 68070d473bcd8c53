"""Ingress: the external server reaches a source Service through the source IP it knows.

For every ``(sourceIP, port)`` of the config's ingress entries, the relay listens on
``sourceIP:port``, accepts a connection only from the peers allowed there (the
ExternalServices' targetIPs; anyone else is reset at once) and splices it to the source
Service's ``ClusterIP:port``, opened from the node.

Why a userspace relay and not in-kernel DNAT: connecting to the ClusterIP from the node
lets kube-proxy (or whatever implements Services) pick a ready endpoint on any node and
follow endpoint changes, so the gateway needs neither the endpoints nor a route to the
pods, nor ip_forward, nor SNAT/conntrack state of its own, and established connections are
untouched by endpoint churn. The price: the pod sees the node's address as the client, not
the targetIP, and bytes are copied in Python (docs/architecture.md, "Ingress").

The filter chain rendered by ``gateway.rules`` enforces the same peer check in the kernel
(defence in depth). A reload changes who may open *new* connections: listeners that are no
longer wanted stop accepting, and established relayed connections are left to finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from k8s_ext_connector.core.bridge import TcpSplice
from k8s_ext_connector.core.config import Endpoint, GatewayConfig
from k8s_ext_connector.core.fields import canonical_ip

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 10.0
BACKLOG = 4096


@dataclass(frozen=True)
class IngressListener:
    """What one ``sourceIP:port`` listener does: who may connect, where it leads."""

    backend: Endpoint
    peers: frozenset[str]


def ingress_listeners(config: GatewayConfig) -> dict[Endpoint, IngressListener]:
    """Listen address -> listener, for every ingress entry of ``config`` (pure)."""
    return {
        Endpoint(source.source_ip, port): IngressListener(backend, peers)
        for source in config.sources
        for port, (backend, peers) in sorted(source.ingress_ports().items())
    }


class IngressRelay:
    """Serves the ingress entries of a GatewayConfig; ``apply`` moves to a new one."""

    def __init__(self, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self._connect_timeout = connect_timeout
        self._wanted: dict[Endpoint, IngressListener] = {}
        self._servers: dict[Endpoint, asyncio.AbstractServer] = {}
        self._splices: dict[TcpSplice, Endpoint] = {}
        self._connecting: set[asyncio.Task[None]] = set()

    def connections(self) -> dict[Endpoint, int]:
        """Relayed connections open now, by listen address (also those of removed entries)."""
        counts: dict[Endpoint, int] = {}
        for listen in self._splices.values():
            counts[listen] = counts.get(listen, 0) + 1
        return counts

    def missing(self) -> int:
        return len(set(self._wanted) - set(self._servers))

    async def apply(self, config: GatewayConfig) -> None:
        wanted = ingress_listeners(config)
        for listen in sorted(set(self._servers) - set(wanted)):
            self._servers.pop(listen).close()  # stop accepting; established ones finish
            log.info("stopped relaying %s", listen)
        for listen, listener in sorted(wanted.items()):
            before = self._wanted.get(listen)
            if before is not None and before != listener and listen in self._servers:
                log.info(
                    "relaying %s to %s now, from %s",
                    listen,
                    listener.backend,
                    ", ".join(sorted(listener.peers)),
                )
        self._wanted = wanted
        await self.start_missing()

    async def start_missing(self) -> None:
        loop = asyncio.get_running_loop()
        for listen, listener in sorted(self._wanted.items()):
            if listen in self._servers:
                continue
            try:
                self._servers[listen] = await loop.create_server(
                    self._factory(listen),
                    listen.address,
                    listen.port,
                    reuse_address=True,
                    backlog=BACKLOG,
                )
            except OSError as error:
                log.error("cannot listen on %s for ingress (%s); retrying", listen, error.strerror)
                continue
            log.info(
                "relaying %s to %s, from %s",
                listen,
                listener.backend,
                ", ".join(sorted(listener.peers)),
            )

    def _factory(self, listen: Endpoint) -> Callable[[], asyncio.Protocol]:
        def accept() -> asyncio.Protocol:
            splice = TcpSplice(on_close=self._forget, on_accepted=lambda s: self._admit(listen, s))
            self._splices[splice] = listen
            return splice.accepted

        return accept

    def _forget(self, splice: TcpSplice) -> None:
        self._splices.pop(splice, None)

    def _admit(self, listen: Endpoint, splice: TcpSplice) -> None:
        """Reset a just-accepted connection unless its peer may use ``listen`` now."""
        transport = splice.accepted.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        try:
            address = canonical_ip(peer[0])
        except (TypeError, IndexError, ValueError):
            address = "?"
        listener = self._wanted.get(listen)
        if listener is None or address not in listener.peers:
            log.warning("refused ingress from %s to %s: not an allowed peer", address, listen)
            splice.close(rst=True)
            return
        task = asyncio.get_running_loop().create_task(
            self._open(listen, listener.backend, splice, address)
        )
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _open(
        self, listen: Endpoint, backend: Endpoint, splice: TcpSplice, peer: str
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: splice.opened, backend.address, backend.port),
                self._connect_timeout,
            )
        except (OSError, TimeoutError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            log.info(
                "ingress from %s to %s: backend %s unreachable: %s", peer, listen, backend, reason
            )
            splice.close(rst=True)

    async def stop(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        self._wanted = {}
        for task in list(self._connecting):
            task.cancel()
        for splice in list(self._splices):
            splice.close()
