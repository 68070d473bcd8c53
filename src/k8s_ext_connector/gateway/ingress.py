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
longer wanted stop accepting, and established relayed connections are left to finish. It
moves one source IP at a time: new listeners are bound before old ones close, so a port
that cannot be bound leaves that source IP as it was (``apply`` says why) and the others
go ahead.
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

    async def apply(self, config: GatewayConfig) -> dict[str, str]:
        """Move to the ingress entries of ``config``, one source IP at a time.

        A source IP's new listeners are bound before anything of it is closed; if one of
        them cannot be bound, those bound in this call are closed again and that source IP
        keeps its previous listeners, peers and backends (none if it is new). Returns
        source IP -> why, for those; every other source IP is moved to ``config``.
        """
        wanted = ingress_listeners(config)
        by_source: dict[str, list[Endpoint]] = {}
        for listen in wanted:
            by_source.setdefault(listen.address, []).append(listen)
        failed: dict[str, str] = {}
        for source_ip, listens in sorted(by_source.items()):
            bound: dict[Endpoint, asyncio.AbstractServer] = {}
            for listen in sorted(set(listens) - set(self._servers)):
                try:
                    bound[listen] = await self._listen(listen)
                except OSError as error:
                    failed[source_ip] = (
                        f"cannot listen on {listen} for ingress: {error.strerror or error}"
                    )
                    break
            if source_ip in failed:
                for server in bound.values():
                    server.close()
                continue
            for listen, server in bound.items():
                self._servers[listen] = server
                log.info(
                    "relaying %s to %s, from %s",
                    listen,
                    wanted[listen].backend,
                    ", ".join(sorted(wanted[listen].peers)),
                )
        served = {
            listen: listener for listen, listener in wanted.items() if listen.address not in failed
        }
        served.update(
            (listen, listener)
            for listen, listener in self._wanted.items()
            if listen.address in failed
        )
        for listen in sorted(set(self._servers) - set(served)):
            self._servers.pop(listen).close()  # stop accepting; established ones finish
            log.info("stopped relaying %s", listen)
        for listen, listener in sorted(served.items()):
            before = self._wanted.get(listen)
            if before is not None and before != listener:
                log.info(
                    "relaying %s to %s now, from %s",
                    listen,
                    listener.backend,
                    ", ".join(sorted(listener.peers)),
                )
        self._wanted = served
        return failed

    async def _listen(self, listen: Endpoint) -> asyncio.AbstractServer:
        return await asyncio.get_running_loop().create_server(
            self._factory(listen),
            listen.address,
            listen.port,
            reuse_address=True,
            backlog=BACKLOG,
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
