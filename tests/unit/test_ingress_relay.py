"""The ingress relay and the gateway agent's ingress chain, on loopback (no root needed).

The relay listens on 127.0.0.2 (the "source IP"); the backend (the "ClusterIP") is an echo
server on 127.0.0.1; clients bind 127.0.0.1 (the allowed "targetIP") or 127.0.0.3 (anyone
else). Each test runs on the standard loop and on uvloop, which the gateway uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncssh
import pytest
import uvloop

from k8s_ext_connector.core.config import Endpoint, GatewayConfig, IngressRule, SourceIPConfig
from k8s_ext_connector.core.iptables import IptablesError
from k8s_ext_connector.gateway.agent import GatewayAgent
from k8s_ext_connector.gateway.ingress import IngressListener, IngressRelay, ingress_listeners
from k8s_ext_connector.gateway.rules import INGRESS_CHAIN
from tests import ports
from tests.unit.fake_iptables import FakeIptables

SOURCE_IP = "127.0.0.2"
TARGET_IP = "127.0.0.1"
STRANGER_IP = "127.0.0.3"

pytestmark = pytest.mark.timeout(60)


def free_port(host: str = SOURCE_IP) -> int:
    return ports.free_port(host)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    def runner(coroutine: Coroutine[Any, Any, None]) -> None:
        if request.param == "uvloop":
            uvloop.run(coroutine)
        else:
            asyncio.run(coroutine)

    return runner


class Backend:
    """Echoes what it reads; on EOF answers ``bye`` and closes. Counts connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> Endpoint:
        self.server = await asyncio.start_server(self._serve, TARGET_IP, 0)
        return Endpoint(TARGET_IP, self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write(b"bye")
        await writer.drain()
        writer.close()


def config(port: int, backend: Endpoint, peers: tuple[str, ...] = (TARGET_IP,)) -> GatewayConfig:
    rules = tuple(IngressRule(peer, port, backend) for peer in peers)
    return GatewayConfig(sources=(SourceIPConfig(SOURCE_IP, (), rules),), ssh_port=free_port())


async def connect(
    port: int, bind: str = TARGET_IP
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(SOURCE_IP, port, local_addr=(bind, 0))


async def exchange(port: int, payload: bytes = b"hello", bind: str = TARGET_IP) -> bytes:
    reader, writer = await connect(port, bind)
    writer.write(payload)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def relay_for(cfg: GatewayConfig) -> IngressRelay:
    relay = IngressRelay(connect_timeout=2)
    assert await relay.apply(cfg) == {}
    return relay


def test_ingress_listeners_group_peers_per_source_ip_and_port() -> None:
    backend = Endpoint("10.96.1.1", 80)
    cfg = config(80, backend, (TARGET_IP, "10.0.0.9"))
    assert ingress_listeners(cfg) == {
        Endpoint(SOURCE_IP, 80): IngressListener(backend, frozenset({TARGET_IP, "10.0.0.9"}))
    }


def test_allowed_peer_reaches_the_backend_both_ways_with_half_close(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def body() -> None:
        backend = Backend()
        port = free_port()
        relay = await relay_for(config(port, await backend.start()))
        assert await exchange(port) == b"hellobye"
        # Interactive: the reply comes while our side is still open.
        reader, writer = await connect(port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        writer.close()
        await relay.stop()

    run(body())


def test_any_other_peer_is_reset_and_the_backend_never_dialled(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def body() -> None:
        backend = Backend()
        port = free_port()
        relay = await relay_for(config(port, await backend.start()))
        with pytest.raises(ConnectionResetError):
            await exchange(port, bind=STRANGER_IP)
        assert backend.accepted == 0
        assert relay.connections() == {}
        assert await exchange(port) == b"hellobye"  # and the allowed peer still gets through
        await relay.stop()

    run(body())


def test_unreachable_backend_resets_at_once(run: Callable[[Awaitable[None]], None]) -> None:
    async def body() -> None:
        port = free_port()
        relay = await relay_for(config(port, Endpoint(TARGET_IP, free_port(TARGET_IP))))
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            await exchange(port)
        assert time.monotonic() - started < 1.0
        await relay.stop()

    run(body())


def test_large_transfer_is_intact_under_back_pressure(
    run: Callable[[Awaitable[None]], None],
) -> None:
    size = 32 << 20

    async def body() -> None:
        backend = Backend()
        port = free_port()
        relay = await relay_for(config(port, await backend.start()))
        reader, writer = await connect(port)
        payload = bytes(range(256)) * (size // 256)

        async def send() -> None:
            for offset in range(0, size, 1 << 20):
                writer.write(payload[offset : offset + (1 << 20)])
                await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        received = hashlib.sha256()
        total = 0
        # We do not read yet: back-pressure must reach our own writer (the relay pauses
        # instead of buffering it all).
        async with asyncio.timeout(10):
            while writer.transport.get_write_buffer_size() == 0:
                await asyncio.sleep(0.01)
        assert not sending.done()
        buffered = sum(
            half.transport.get_write_buffer_size()
            for splice in relay._splices
            for half in (splice.accepted, splice.opened)
            if half.transport is not None
        )
        assert buffered < 1 << 20
        while chunk := await reader.read(1 << 20):
            received.update(chunk)
            total += len(chunk)
        await sending
        assert total == size + 3
        assert received.hexdigest() == hashlib.sha256(payload + b"bye").hexdigest()
        writer.close()
        await relay.stop()

    run(body())


def test_reload_stops_new_connections_of_removed_entries_and_lets_established_finish(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def body() -> None:
        backend = Backend()
        port = free_port()
        cfg = config(port, await backend.start())
        relay = await relay_for(cfg)
        reader, writer = await connect(port)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        assert relay.connections() == {Endpoint(SOURCE_IP, port): 1}

        await relay.apply(GatewayConfig(sources=(SourceIPConfig(SOURCE_IP),)))
        with pytest.raises(ConnectionRefusedError):
            await connect(port)
        writer.write(b"after")  # the established one still flows both ways
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"afterbye"
        writer.close()

        await relay.apply(cfg)  # and the entry comes back
        assert await exchange(port) == b"hellobye"
        await relay.stop()

    run(body())


def test_reload_changes_peers_for_new_connections_only(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def body() -> None:
        backend = Backend()
        port = free_port()
        address = await backend.start()
        relay = await relay_for(config(port, address))
        reader, writer = await connect(port)
        await relay.apply(config(port, address, (STRANGER_IP,)))
        assert await exchange(port, bind=STRANGER_IP) == b"hellobye"
        with pytest.raises(ConnectionResetError):
            await exchange(port)
        writer.write(b"still")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"stillbye"
        writer.close()
        await relay.stop()

    run(body())


def test_stop_closes_every_relayed_connection(run: Callable[[Awaitable[None]], None]) -> None:
    async def body() -> None:
        backend = Backend()
        port = free_port()
        relay = await relay_for(config(port, await backend.start()))
        reader, writer = await connect(port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        await relay.stop()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert relay.connections() == {}
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await connect(port)

    run(body())


# ---- the agent: chain applied first, replaced on reload, removed at stop ----------------


class FailingIptables(FakeIptables):
    def restore(self, text: str) -> None:
        raise IptablesError("iptables-nft-restore --noflush --wait failed: test")


def test_agent_applies_the_chain_follows_reloads_and_removes_it_at_stop(
    run: Callable[[Awaitable[None]], None],
) -> None:
    fake = FakeIptables()
    fake.add("filter", "EXTCONN-INGRESS-OLD", "-j RETURN")  # a leftover of an older version

    async def body() -> None:
        backend = Backend()
        port = free_port()
        address = await backend.start()
        first = config(port, address)
        agent = GatewayAgent(
            first, asyncssh.generate_private_key("ssh-ed25519"), firewalls={"ipv4": fake}
        )
        await agent.start()
        chain = fake.tables["filter"][INGRESS_CHAIN]
        ssh = first.ssh_port
        assert [spec.split(" -m comment")[0] for spec in chain] == [
            f"-d {SOURCE_IP}/32 -i lo -p tcp -m tcp --dport {ssh}",
            f"-s {TARGET_IP}/32 -d {SOURCE_IP}/32 -p tcp -m tcp --dport {port}",
            f"-d {SOURCE_IP}/32 -p tcp -m conntrack --ctstate NEW",
            f"-d {SOURCE_IP}/32 -m conntrack --ctstate NEW",
        ]
        assert "EXTCONN-INGRESS-OLD" not in fake.tables["filter"]
        assert await exchange(port) == b"hellobye"

        second = GatewayConfig(sources=(SourceIPConfig(SOURCE_IP),), ssh_port=first.ssh_port)
        await agent.apply(second)
        assert not any(f"--dport {port}" in spec for spec in fake.tables["filter"][INGRESS_CHAIN])
        assert len(fake.tables["filter"]["INPUT"]) == 1

        await agent.stop()
        assert INGRESS_CHAIN not in fake.tables["filter"]
        assert fake.tables["filter"]["INPUT"] == []

    run(body())


def test_agent_keeps_the_running_config_when_the_chain_cannot_be_applied(
    run: Callable[[Awaitable[None]], None],
) -> None:
    failing = FailingIptables()

    async def body() -> None:
        backend = Backend()
        port = free_port()
        address = await backend.start()
        first = config(port, address)
        agent = GatewayAgent(first, asyncssh.generate_private_key("ssh-ed25519"))
        await agent.start()
        agent._firewalls = {"ipv4": failing}  # the node's iptables breaks after start
        with pytest.raises(IptablesError):
            await agent.apply(
                GatewayConfig(sources=(SourceIPConfig(SOURCE_IP),), ssh_port=first.ssh_port)
            )
        assert agent.config == first
        assert await exchange(port) == b"hellobye"
        agent._firewalls = {}
        await agent.stop()

    run(body())
