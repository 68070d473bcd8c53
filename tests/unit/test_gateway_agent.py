"""The gateway agent on loopback (no root): per-source-IP apply, SSH hardening, log safety.

Source IPs are 127.0.0.2 and 127.0.0.3 (loopback, always bindable) and 203.0.113.77
(TEST-NET, not on this machine: binding it fails as an address that is not there does).
Clients connect from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping

import asyncssh
import pytest

from k8s_ext_connector.core.config import (
    AuthorizedClient,
    Endpoint,
    GatewayConfig,
    IngressRule,
    SourceIPConfig,
)
from k8s_ext_connector.core.logsafe import untrusted
from k8s_ext_connector.core.ssh import SERVER_VERSION
from k8s_ext_connector.gateway import agent as agent_module
from k8s_ext_connector.gateway.agent import FailureBudget, GatewayAgent, LogLimiter
from k8s_ext_connector.gateway.rules import INGRESS_CHAIN
from tests import ports
from tests.polling import wait_for_async
from tests.unit.fake_iptables import FakeIptables

pytestmark = pytest.mark.timeout(60)

A, B, ABSENT = "127.0.0.2", "127.0.0.3", "203.0.113.77"
TARGET = Endpoint("127.0.0.1", 9)
LOGGER = "k8s_ext_connector.gateway.agent"


def _key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def _public(key: asyncssh.SSHKey) -> str:
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def _source(ip: str, key: asyncssh.SSHKey, *ingress: IngressRule) -> SourceIPConfig:
    client = AuthorizedClient(f"ns/{ip}", _public(key), (TARGET,))
    return SourceIPConfig(ip, (client,), tuple(ingress))


def _config(ssh_port: int, *sources: SourceIPConfig) -> GatewayConfig:
    return GatewayConfig(sources=sources, ssh_port=ssh_port, ssh_allow_from=("10.0.0.0/8",))


async def _authenticates(ip: str, port: int, key: asyncssh.SSHKey) -> bool:
    try:
        async with asyncssh.connect(ip, port, username="probe", client_keys=[key],
                                    known_hosts=None, agent_path=None, config=None):
            return True
    except asyncssh.PermissionDenied:
        return False


class FakeAddresses:
    """Addresses of a node: ``refuse`` maps an address to the error ``ip addr add`` gives."""

    def __init__(self, refuse: dict[str, str], node_own: dict[str, str] | None = None) -> None:
        self.refuse = refuse
        self.present_now: set[str] = set()
        self.node_own = dict(node_own or {})  # the node's own addresses -> interface

    def foreign(self) -> dict[str, str]:
        return dict(self.node_own)

    def owned(self) -> set[str]:
        return set(self.present_now)

    def present(self) -> set[str]:
        return set(self.present_now)

    def add(self, address: str) -> None:
        if address in self.refuse:
            raise OSError(self.refuse[address])
        self.present_now.add(address)

    def remove(self, address: str) -> None:
        self.present_now.discard(address)

    def problem(self, address: str) -> str | None:
        return "--manage-addresses: only IPv4 source IPs can be managed" if ":" in address else None


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "LISTEN_RETRY_SECONDS", 0.05)
    return


# ---- one entry that cannot be served does not stop the others -------------------------


def test_unservable_entries_are_reported_and_the_others_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's case: an IPv6 source IP with --manage-addresses (and an address the node
    refuses) next to a valid one. Only the valid one is in force, wholly; the log is true."""
    keys = {ip: _key() for ip in (A, "2001:db8::5", B)}
    fake = FakeIptables()
    addresses = FakeAddresses({B: "RTNETLINK answers: File exists"})

    async def body() -> None:
        port = ports.free_port(A)
        config = _config(port, *(_source(ip, key) for ip, key in keys.items()))
        agent = GatewayAgent(config, _key(), addresses,
                             firewalls={"ipv4": fake, "ipv6": FakeIptables()})
        await agent.start()
        assert [s.source_ip for s in agent.config.sources] == [A]
        assert set(agent.failed) == {"2001:db8::5", B}
        assert "only IPv4 source IPs can be managed" in agent.failed["2001:db8::5"]
        assert "File exists" in agent.failed[B]
        assert addresses.present_now == {A}
        chain = "\n".join(fake.tables["filter"][INGRESS_CHAIN])
        assert f"-d {A}/32" in chain
        assert B not in chain
        assert "2001:db8::5" not in chain
        ready, why = agent.readiness()
        assert not ready
        assert "2001:db8::5 not served" in why
        assert f"{B} not served" in why
        assert await _authenticates(A, port, keys[A])
        # The failed entry's key is authorised nowhere: it is not partially live.
        assert agent.client_name(B, _public(keys[B])) == "?"
        await agent.stop()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        asyncio.run(body())
    lines = [r.getMessage() for r in caplog.records if "source IPs" in r.getMessage()]
    assert lines[0].startswith("applied 1 of 3 source IPs; 127.0.0.3 not applied: cannot add")
    assert "2001:db8::5 not applied: --manage-addresses" in lines[0]


def test_a_source_ip_that_is_the_nodes_own_address_is_refused_and_reported(
    fast_retry: None,
) -> None:
    """With --manage-addresses, a source IP already on one of the node's interfaces without
    being one the gateway added is the node's own (e.g. a second interface the Node object
    does not list): it is not served, the others are, and the report reaches ``on_failed``
    (the gateway's Lease) at once and again when the address goes away."""
    keys = {ip: _key() for ip in (A, B)}
    addresses = FakeAddresses({}, node_own={B: "eth1"})
    reports: list[Mapping[str, str]] = []
    fake = FakeIptables()

    async def body() -> None:
        port = ports.free_port(A)
        config = _config(port, *(_source(ip, key) for ip, key in keys.items()))
        agent = GatewayAgent(
            config, _key(), addresses, firewalls={"ipv4": fake}, on_failed=reports.append
        )
        await agent.start()
        await asyncio.sleep(0.3)  # a few retries
        # The node's address never got the filter chain, not even for a moment: it would
        # reset new connections to the node's own services on that address.
        assert fake.restores
        assert not [text for text in fake.restores if B in text]
        assert [s.source_ip for s in agent.config.sources] == [A]
        assert agent.failed == {
            B: f"{B} is already an address of this node (on eth1) and not one the gateway "
            "added: refusing to take over the node's own address"
        }
        assert reports[-1] == agent.failed
        assert addresses.present_now == {A}  # not added a second time, not taken over
        assert agent.client_name(B, _public(keys[B])) == "?"
        assert await _authenticates(A, port, keys[A])
        # The node no longer has it (the administrator moved it): the retry serves it.
        addresses.node_own.clear()
        await wait_for_async(lambda: not agent.failed, what="the entry applied on retry")
        assert reports[-1] == {}
        assert addresses.present_now == {A, B}
        assert f"-d {B}/32" in "\n".join(fake.tables["filter"][INGRESS_CHAIN])
        await agent.stop()
        assert addresses.present_now == set()

    asyncio.run(body())


def test_an_address_that_is_not_there_fails_its_entry_and_is_retried_quietly(
    caplog: pytest.LogCaptureFixture, fast_retry: None
) -> None:
    async def body() -> None:
        port = ports.free_port(A)
        key = _key()
        agent = GatewayAgent(_config(port, _source(A, key), _source(ABSENT, key)), _key())
        await agent.start()
        assert [s.source_ip for s in agent.config.sources] == [A]
        assert agent.failed[ABSENT].startswith(f"cannot listen on {ABSENT}:{port}: ")
        assert await _authenticates(A, port, key)
        await asyncio.sleep(0.5)  # about ten retries
        await agent.stop()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        asyncio.run(body())
    outcome = [r for r in caplog.records if "source IPs" in r.getMessage()]
    assert len(outcome) == 1  # retries that change nothing say nothing


def test_a_new_ingress_port_that_is_taken_keeps_the_previous_version_of_its_entry(
    fast_retry: None,
) -> None:
    async def body() -> None:
        ssh_port, old_port, new_port = (ports.free_port(A) for _ in range(3))
        backend = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        to = Endpoint("127.0.0.1", backend.sockets[0].getsockname()[1])
        key_a, key_b = _key(), _key()
        first = _config(ssh_port, _source(A, key_a, IngressRule("127.0.0.1", old_port, to)))
        fake = FakeIptables()
        agent = GatewayAgent(first, _key(), firewalls={"ipv4": fake})
        await agent.start()
        squatter = socket.create_server((A, new_port))  # someone else holds the new port
        try:
            second = _config(
                ssh_port,
                _source(A, key_a, IngressRule("127.0.0.1", new_port, to)),
                _source(B, key_b),
            )
            await agent.apply(second)
            assert agent.config.source(A) == first.source(A)  # the previous version
            assert agent.config.source(B) == second.source(B)
            assert f"{A}:{new_port}" in agent.failed[A]
            chain = "\n".join(fake.tables["filter"][INGRESS_CHAIN])
            assert f"--dport {old_port}" in chain
            assert f"--dport {new_port}" not in chain
            _reader, writer = await asyncio.open_connection(A, old_port)  # still relayed
            writer.close()
            assert await _authenticates(B, ssh_port, key_b)
        finally:
            squatter.close()
        # Once the port is free, the retry brings the new version in.
        await wait_for_async(lambda: not agent.failed, what="the entry applied on retry")
        assert agent.config == second
        chain = "\n".join(fake.tables["filter"][INGRESS_CHAIN])
        assert f"--dport {new_port}" in chain
        assert f"--dport {old_port}" not in chain
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(A, old_port)
        await agent.stop()
        backend.close()

    asyncio.run(body())


# ---- who may connect, how often, and what the log shows ------------------------------


def test_ssh_allowed_from_the_listed_networks_and_the_node_only() -> None:
    agent = GatewayAgent(_config(2022, _source(A, _key())), _key())
    assert agent.ssh_allowed_from("10.1.2.3")
    assert agent.ssh_allowed_from("127.0.0.1")  # the node itself
    assert not agent.ssh_allowed_from("198.51.100.7")
    assert not agent.ssh_allowed_from("?")


def test_more_than_three_keys_end_the_connection_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> GatewayAgent:
        port = ports.free_port(A)
        agent = GatewayAgent(_config(port, _source(A, _key())), _key())
        await agent.start()
        strangers = [_key() for _ in range(10)]
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
            async with asyncssh.connect(A, port, username="probe", client_keys=strangers,
                                        known_hosts=None, agent_path=None, config=None):
                pass
        await wait_for_async(lambda: not agent._sessions, what="the connection closed")
        await agent.stop()
        return agent

    with caplog.at_level(logging.INFO, logger=LOGGER):
        agent = asyncio.run(body())
    assert agent.counters.refused_keys == 3
    assert agent.counters.too_many_attempts == 1
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].startswith("refused 3 key(s) from 127.0.0.1 on")


def test_an_address_over_its_failure_budget_is_dropped_at_connect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> GatewayAgent:
        port = ports.free_port(A)
        agent = GatewayAgent(_config(port, _source(A, _key())), _key())
        agent.failures = FailureBudget(burst=4, rate=0.001)
        await agent.start()
        for _ in range(6):
            with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError,
                                ConnectionError)):
                async with asyncssh.connect(A, port, username="probe", client_keys=[_key()],
                                            known_hosts=None, agent_path=None, config=None):
                    pass
        await agent.stop()
        return agent

    with caplog.at_level(logging.INFO, logger=LOGGER):
        agent = asyncio.run(body())
    assert agent.counters.refused_keys == 4
    assert agent.counters.throttled == 2
    throttled = [r for r in caplog.records if "too many failed" in r.getMessage()]
    assert len(throttled) == 1  # the repeat is suppressed


def test_a_newline_in_the_channel_host_cannot_forge_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forged = "10.0.0.1\n2026-01-01 INFO client ns/admin connected"

    async def body() -> None:
        port = ports.free_port(A)
        key = _key()
        agent = GatewayAgent(_config(port, _source(A, key)), _key())
        await agent.start()
        async with asyncssh.connect(A, port, username="probe", client_keys=[key],
                                    known_hosts=None, agent_path=None, config=None) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection(forged, 80)
        await agent.stop()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        asyncio.run(body())
    (line,) = [r.getMessage() for r in caplog.records if "refused channel" in r.getMessage()]
    assert "\n" not in line
    assert "10.0.0.1\\n2026-01-01 INFO client ns/admin connected:80" in line


def test_the_banner_names_no_version() -> None:
    async def body() -> bytes:
        port = ports.free_port(A)
        agent = GatewayAgent(_config(port, _source(A, _key())), _key())
        await agent.start()
        reader, writer = await asyncio.open_connection(A, port)
        banner = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        await agent.stop()
        return banner

    banner = asyncio.run(body())
    assert banner == f"SSH-2.0-{SERVER_VERSION}\r\n".encode()
    assert not any(ch.isdigit() for ch in banner.decode().removeprefix("SSH-2.0-"))


def test_failure_budget_refills_at_its_rate() -> None:
    budget = FailureBudget(burst=2, rate=1.0)
    budget.fail("10.0.0.1", now=0.0)
    budget.fail("10.0.0.1", now=0.0)
    assert budget.exhausted("10.0.0.1", now=0.5)
    assert not budget.exhausted("10.0.0.2", now=0.5)  # per address
    assert not budget.exhausted("10.0.0.1", now=1.0)


def test_log_limiter_counts_what_it_suppressed() -> None:
    limiter = LogLimiter(period=10)
    assert limiter.allow("k", "a", now=0) == (True, 0)
    assert limiter.allow("k", "a", now=1) == (False, 0)
    assert limiter.allow("k", "a", now=2) == (False, 0)
    assert limiter.allow("k", "b", now=2) == (True, 0)
    assert limiter.allow("k", "a", now=11) == (True, 2)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("db.example", "db.example"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("back\\slash", "back\\\\slash"),
        ("\u202eevil", "\\u202eevil"),
        ("é", "é"),
    ],
)
def test_untrusted_escapes_what_is_not_printable(raw: str, shown: str) -> None:
    assert untrusted(raw) == shown


def test_untrusted_bounds_the_length() -> None:
    assert untrusted("x" * 1000) == "x" * 200 + "...(cut)"
