"""The gateway agent: an asyncssh server on every source IP it holds.

Why asyncssh and not sshd: the outbound connection must leave from the IP the client
reached (``local_addr=(source_ip, 0)``), which sshd cannot do. A ``direct-tcpip`` channel
is accepted only when the authenticated key is authorised for that source IP *and* the
requested ``address:port`` is in that key's allow-list under the config in force now;
anything else is refused and logged with the key's fingerprint (never the key). There is
no shell, no exec, no remote forwarding: the server is not an open proxy.

Reload applies a new config as a diff: listeners for new source IPs start, removed ones
stop; connections whose key lost its authorisation and channels whose target is no
longer allowed are closed; everything still allowed keeps flowing. A new host key
(``replace_host_key``) is handed to the running listeners: connections accepted from then
on present it, established ones keep the key they were accepted with.

Ingress (``gateway/ingress.py``) runs in the same agent: the relay listeners and the
filter chain that backs their peer check (``gateway/rules.py``) follow the same config.
So does the nat chain that keeps every source IP as the source of what leaves from it
(``rules.render_snat_rules``), so that a node that masquerades its egress cannot replace
it with the node's address. The chains are applied before anything else changes, so a
failure to apply them leaves the running config wholly in force; they are removed at stop
and replaced at start. Every ``rules_check_interval`` seconds the agent observes them
again and repairs any drift as a diff, above all a CNI's resync inserting a rule above the
SNAT jump, which must stay first in POSTROUTING; when nothing drifted nothing is written.
iptables runs on a worker thread (a node's nat table can be large), one transaction at a
time under a lock, and nothing is applied once ``stop`` has removed the chains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field

import asyncssh

from k8s_ext_connector.core import iptables
from k8s_ext_connector.core.bridge import Splice
from k8s_ext_connector.core.config import Endpoint, GatewayConfig
from k8s_ext_connector.core.fields import canonical_ip
from k8s_ext_connector.core.ssh import WINDOW, tuned_options
from k8s_ext_connector.gateway import rules
from k8s_ext_connector.gateway.addresses import AddressManager, reconcile_addresses
from k8s_ext_connector.gateway.ingress import IngressRelay

log = logging.getLogger(__name__)
LISTEN_RETRY_SECONDS = 2.0
RULES_CHECK_SECONDS = 10.0


def _public_key_text(key: asyncssh.SSHKey) -> str:
    algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
    return f"{algorithm} {blob}"


@dataclass(eq=False)
class _Session:
    """One authenticated client connection on one source IP."""

    source_ip: str
    connection: asyncssh.SSHServerConnection
    public_key: str = ""
    fingerprint: str = ""
    channels: dict[Splice, Endpoint] = field(default_factory=dict)


class _SourceIPServer(asyncssh.SSHServer):
    """asyncssh callbacks for one client connection on one source IP."""

    def __init__(self, agent: GatewayAgent, source_ip: str) -> None:
        self._agent = agent
        self._source_ip = source_ip
        self._session: _Session | None = None
        self._candidate: tuple[str, str] = ("", "")

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._session = _Session(self._source_ip, conn)
        self._agent._sessions.add(self._session)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._session is not None:
            self._agent._sessions.discard(self._session)

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        text = _public_key_text(key)
        fingerprint = key.get_fingerprint()
        source = self._agent.config.source(self._source_ip)
        if source is None or source.client_for(text) is None:
            log.warning(
                "refused key %s on %s: not authorised for this source IP",
                fingerprint,
                self._source_ip,
            )
            return False
        # asyncssh asks again for the signed attempt right before auth_completed, so the
        # last candidate validated is the key that authenticated.
        self._candidate = (text, fingerprint)
        return True

    def auth_completed(self) -> None:
        assert self._session is not None
        self._session.public_key, self._session.fingerprint = self._candidate
        client = self._agent.client_name(self._source_ip, self._session.public_key)
        log.info(
            "client %s (%s) connected to %s", client, self._session.fingerprint, self._source_ip
        )

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
        session = self._session
        assert session is not None
        try:
            target = Endpoint(canonical_ip(dest_host), dest_port)
        except ValueError:
            target = None
        if target is None or not self._agent.allowed(session, target):
            log.warning(
                "refused channel from %s on %s to %s:%s: not in its allow-list",
                session.fingerprint,
                self._source_ip,
                dest_host,
                dest_port,
            )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "target not allowed for this key"
            )
        return self._open(session, target)

    async def _open(self, session: _Session, target: Endpoint) -> asyncssh.SSHTCPSession[bytes]:
        def forget(splice: Splice) -> None:
            session.channels.pop(splice, None)

        splice = Splice(on_close=forget)
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: splice.tcp_side,
                target.address,
                target.port,
                local_addr=(self._source_ip, 0),
            )
        except OSError as error:
            log.info("target %s unreachable from %s: %s", target, self._source_ip, error.strerror)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, f"{target}: {error.strerror}"
            ) from None
        session.channels[splice] = target
        return splice.channel_side


class GatewayAgent:
    """Serves a ``GatewayConfig``; ``apply`` moves it to a new one without a restart.

    ``firewalls`` holds the iptables of each address family whose chains the agent
    manages (none: no rules at all, the relay's own peer check is the only one, e.g. in
    unit tests). ``snat_guard`` off: no SNAT chain (a leftover one is removed).
    ``rules_check_interval``: seconds between checks of the applied rules.
    """

    def __init__(
        self,
        config: GatewayConfig,
        host_key: asyncssh.SSHKey,
        addresses: AddressManager | None = None,
        firewalls: Mapping[iptables.Family, iptables.Iptables] | None = None,
        snat_guard: bool = True,
        rules_check_interval: float = RULES_CHECK_SECONDS,
    ) -> None:
        self.config = config
        self._host_key = host_key
        self._addresses = addresses
        self._firewalls = dict(firewalls or {})
        self._snat_guard = snat_guard
        self._rules_check_interval = rules_check_interval
        self._listeners: dict[str, asyncssh.SSHAcceptor] = {}
        self._sessions: set[_Session] = set()
        self._retry: asyncio.Task[None] | None = None
        self._check: asyncio.Task[None] | None = None
        self.ingress = IngressRelay()
        self._rules_lock = threading.Lock()
        # The config whose rules are in force; None before the first apply and after stop.
        self._rules_config: GatewayConfig | None = None
        self._rules_touched = False  # something may have been written: stop removes it
        self._stopped = False

    def client_name(self, source_ip: str, public_key: str) -> str:
        source = self.config.source(source_ip)
        client = source.client_for(public_key) if source else None
        return client.name if client else "?"

    def allowed(self, session: _Session, target: Endpoint) -> bool:
        source = self.config.source(session.source_ip)
        client = source.client_for(session.public_key) if source else None
        return client is not None and target in client.allow

    async def start(self) -> None:
        self._stopped = False
        await self.apply(self.config)
        self._retry = asyncio.create_task(self._retry_listeners())
        if self._firewalls:
            self._check = asyncio.create_task(self._check_rules())

    async def replace_host_key(self, host_key: asyncssh.SSHKey) -> None:
        """New connections get ``host_key``; established ones are not touched."""
        self._host_key = host_key
        for listener in self._listeners.values():
            # asyncssh applies updated options to connections accepted after the call
            # only, and without closing the listening socket: no connection is refused.
            listener.update(server_host_keys=[host_key])
        log.info("host key now %s for new connections", host_key.get_fingerprint())

    def readiness(self) -> tuple[bool, str]:
        """Ready when every SSH listener and every ingress relay listener is up."""
        problems = [
            f"not listening on {source.source_ip}:{self.config.ssh_port}"
            for source in self.config.sources
            if source.source_ip not in self._listeners
        ]
        missing = self.ingress.missing()
        if missing:
            problems.append(f"{missing} ingress listener(s) not up")
        return (not problems), ("; ".join(problems) or "ready")

    async def apply(self, config: GatewayConfig) -> None:
        # First: if it fails, nothing else has changed.
        await asyncio.to_thread(self._apply_rules, config)
        port_changed = config.ssh_port != self.config.ssh_port
        self.config = config
        wanted = {source.source_ip for source in config.sources}
        # Close sessions while their address still exists, so clients get a FIN at once
        # instead of finding out from keepalives that the address went away.
        for source_ip in sorted(self._listeners):
            if source_ip not in wanted or port_changed:
                await self._stop_listener(source_ip)
        if self._addresses is not None:
            reconcile_addresses(self._addresses, wanted)
        # Ingress before SSH: a port one of them gives up may be the one the other takes.
        await self.ingress.apply(config)
        await self._start_missing_listeners()
        self._close_revoked()

    def _rule_sets(
        self, config: GatewayConfig, family: iptables.Family
    ) -> list[tuple[str, iptables.ChainSet]]:
        snat = (
            rules.render_snat_rules(config, family)
            if self._snat_guard
            else iptables.ChainSet(
                table=rules.SNAT_TABLE, chains={}, owned_prefix=rules.SNAT_OWNED_PREFIX
            )
        )
        return [
            ("ingress filter", rules.render_ingress_rules(config, family)),
            ("source IP SNAT", snat),
        ]

    def _apply_rules(self, config: GatewayConfig | None) -> None:
        """Apply the rules of ``config``, or (None) check those in force and repair drift."""
        with self._rules_lock:
            if self._stopped:
                return  # stop removed them: a late reload or check must not bring them back
            repair = config is None
            config = self._rules_config if config is None else config
            if config is None:
                return
            self._rules_touched = bool(self._firewalls)
            for family, firewall in sorted(self._firewalls.items()):
                for what, desired in self._rule_sets(config, family):
                    try:
                        if not iptables.apply(firewall, desired):
                            continue
                    except iptables.IptablesError as error:
                        if any(desired.chains.values()):
                            raise  # rules to install: the running config stays in force
                        # Nothing but an empty chain for this family in a table the node
                        # cannot provide (e.g. no IPv6 nat): nothing is lost by skipping it.
                        log.debug("%s rules (%s) skipped: %s", what, family, error)
                        continue
                    if repair:
                        log.warning(
                            "%s rules (%s) had drifted (changed by someone else, or a rule "
                            "inserted above a jump that must be first): restored",
                            what,
                            family,
                        )
                    else:
                        log.info("%s rules (%s) updated", what, family)
            if repair:
                log.debug("iptables rules checked")
            self._rules_config = config

    async def _check_rules(self) -> None:
        """Observe the rules every interval; any drift is repaired as a diff."""
        while True:
            await asyncio.sleep(self._rules_check_interval)
            try:
                await asyncio.to_thread(self._apply_rules, None)
            except Exception as error:  # logged and retried: the check never dies silently
                log.error(
                    "checking iptables rules failed: %s; retrying in %ss",
                    error,
                    self._rules_check_interval,
                )

    def _remove_rules(self) -> None:
        with self._rules_lock:
            self._stopped = True
            self._rules_config = None
            if not self._rules_touched:
                return
            for family, firewall in sorted(self._firewalls.items()):
                for table, prefix in (
                    (rules.TABLE, rules.OWNED_PREFIX),
                    (rules.SNAT_TABLE, rules.SNAT_OWNED_PREFIX),
                ):
                    try:
                        iptables.remove(firewall, table, prefix)
                    except iptables.IptablesError as error:  # the others are still removed
                        log.error("cannot remove our %s rules (%s): %s", table, family, error)
            self._rules_touched = False

    async def _start_missing_listeners(self) -> None:
        for source in self.config.sources:
            if source.source_ip in self._listeners:
                continue
            source_ip = source.source_ip
            try:
                self._listeners[source_ip] = await asyncssh.listen(
                    host=source_ip,
                    port=self.config.ssh_port,
                    server_host_keys=[self._host_key],
                    server_factory=lambda ip=source_ip: _SourceIPServer(self, ip),
                    reuse_address=True,
                    allow_scp=False,
                    agent_forwarding=False,
                    x11_forwarding=False,
                    window=WINDOW,
                    **tuned_options(),
                )
                log.info("serving source IP %s on port %s", source_ip, self.config.ssh_port)
            except OSError as error:
                log.error(
                    "cannot listen on %s:%s (%s); retrying every %ss",
                    source_ip,
                    self.config.ssh_port,
                    error.strerror,
                    LISTEN_RETRY_SECONDS,
                )

    async def _retry_listeners(self) -> None:
        while True:
            await asyncio.sleep(LISTEN_RETRY_SECONDS)
            if len(self._listeners) < len(self.config.sources):
                await self._start_missing_listeners()
            if self.ingress.missing():
                await self.ingress.start_missing()

    async def _stop_listener(self, source_ip: str) -> None:
        listener = self._listeners.pop(source_ip)
        listener.close()
        await listener.wait_closed()
        for session in [s for s in self._sessions if s.source_ip == source_ip]:
            session.connection.close()
        log.info("stopped serving source IP %s", source_ip)

    def _close_revoked(self) -> None:
        for session in list(self._sessions):
            source = self.config.source(session.source_ip)
            if not session.public_key:
                continue  # still authenticating; validate_public_key sees the new config
            if source is None or source.client_for(session.public_key) is None:
                log.info(
                    "closing %s on %s: key no longer authorised",
                    session.fingerprint,
                    session.source_ip,
                )
                session.connection.close()
                continue
            for splice, target in list(session.channels.items()):
                if not self.allowed(session, target):
                    log.info("closing channel to %s: no longer allowed", target)
                    splice.close()

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self._check is not None:
            self._check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._check
            # A check already on its worker thread finishes under the lock; one that has
            # not taken it yet finds the agent stopped and writes nothing.
        await self.ingress.stop()
        for source_ip in sorted(self._listeners):
            await self._stop_listener(source_ip)
        await asyncio.to_thread(self._remove_rules)
        if self._addresses is not None:
            reconcile_addresses(self._addresses, ())
