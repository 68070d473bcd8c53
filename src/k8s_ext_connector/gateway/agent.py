"""The gateway agent: an asyncssh server on every source IP it holds.

Why asyncssh and not sshd: the outbound connection must leave from the IP the client
reached (``local_addr=(source_ip, 0)``), which sshd cannot do. A ``direct-tcpip`` channel
is accepted only when the authenticated key is authorised for that source IP *and* the
requested ``address:port`` is in that key's allow-list under the config in force now;
anything else is refused and logged with the key's fingerprint (never the key). There is
no shell, no exec, no remote forwarding: the server is not an open proxy.

Who may connect: the kernel admits the SSH port only from ``sshAllowFrom`` (the cluster)
and the node itself (``gateway/rules.py``); the server checks it again at connect. An
address whose failed authentications exceed a budget (a token bucket per address) is
dropped at connect; a connection that offers MAX_AUTH_ATTEMPTS refused keys is closed; one
that has not authenticated within LOGIN_TIMEOUT too. Refusals are counted
(``AuthCounters``) and logged once per connection, repeats from one address rate-limited;
every client-chosen string in a log line is escaped (``core/logsafe.py``). The banner
names no version and only modern algorithms are offered (``core/ssh.py``).

Reload applies a new config as a diff, one source IP at a time (``apply``): each entry
(address, SSH listener, ingress listeners, rules) is wholly in force or reported as failed
with its reason while the others go ahead, and ``config`` (what authorises keys and
channels) holds the served entries only. Connections whose key lost its authorisation and
channels whose target is no longer allowed are closed; everything still allowed keeps
flowing. A new host key
(``replace_host_key``) is handed to the running listeners: connections accepted from then
on present it, established ones keep the key they were accepted with.

Ingress (``gateway/ingress.py``) runs in the same agent: the relay listeners and the
filter chain that backs their peer check (``gateway/rules.py``) follow the same config.
So does the nat chain that keeps every source IP as the source of what leaves from it
(``rules.render_snat_rules``), so that a node that masquerades its egress cannot replace
it with the node's address. The chains are applied before anything else changes, so a
failure to apply them leaves the running config wholly in force (the one all-or-nothing
step); once the entries are applied they are narrowed to the served ones; they are removed at stop
and replaced at start. Every ``rules_check_interval`` seconds the agent observes them
again and repairs any drift as a diff, above all a CNI's resync inserting a rule above the
SNAT jump, which must stay first in POSTROUTING; when nothing drifted nothing is written.
iptables runs on a worker thread (a node's nat table can be large), one transaction at a
time under a lock, and nothing is applied once ``stop`` has removed the chains.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

import asyncssh

from k8s_ext_connector.core import iptables
from k8s_ext_connector.core.bridge import Splice
from k8s_ext_connector.core.config import Endpoint, GatewayConfig, SourceIPConfig
from k8s_ext_connector.core.fields import canonical_ip
from k8s_ext_connector.core.logsafe import untrusted
from k8s_ext_connector.core.ssh import WINDOW, server_options
from k8s_ext_connector.gateway import rules
from k8s_ext_connector.gateway.addresses import (
    AddressManager,
    node_own_addresses,
    reconcile_addresses,
)
from k8s_ext_connector.gateway.ingress import IngressRelay

log = logging.getLogger(__name__)
LISTEN_RETRY_SECONDS = 2.0
RULES_CHECK_SECONDS = 10.0
MAX_AUTH_ATTEMPTS = 3  # refused keys per connection before it is closed (OpenSSH: 6)
LOGIN_TIMEOUT = 10.0  # seconds from TCP accept to authenticated (asyncssh: 120)
# Failed authentications per client address: a bucket of FAIL_BURST refilled at
# FAIL_RATE per second; a connection from an address whose bucket is empty is closed at
# once. A sidecar with an outdated key retries about once a second, below the rate.
FAIL_BURST = 20.0
FAIL_RATE = 2.0
LOG_REPEAT_SECONDS = 30.0  # one line per kind of refusal and client address per period


def _public_key_text(key: asyncssh.SSHKey) -> str:
    algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
    return f"{algorithm} {blob}"


@dataclass
class AuthCounters:
    """Authentication outcomes since start (for metrics; the log shows one line per
    connection at most, rate-limited)."""

    connections: int = 0  # TCP connections accepted by the SSH servers
    authenticated: int = 0
    refused_keys: int = 0  # keys offered that the source IP does not authorise
    too_many_attempts: int = 0  # connections closed after MAX_AUTH_ATTEMPTS refused keys
    throttled: int = 0  # connections closed at once: their address's failure budget is spent
    not_allowed: int = 0  # connections from an address outside sshAllowFrom


class FailureBudget:
    """A token bucket of failed authentications per client address."""

    def __init__(self, burst: float = FAIL_BURST, rate: float = FAIL_RATE) -> None:
        self._burst = burst
        self._rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)

    def _tokens(self, address: str, now: float) -> float:
        tokens, when = self._buckets.get(address, (self._burst, now))
        return min(self._burst, tokens + (now - when) * self._rate)

    def exhausted(self, address: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self._tokens(address, now) < 1.0

    def fail(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._buckets[address] = (max(0.0, self._tokens(address, now) - 1.0), now)
        if len(self._buckets) > 4096:  # forget full buckets: they equal no entry
            self._buckets = {
                a: b for a, b in self._buckets.items() if self._tokens(a, now) < self._burst
            }


class LogLimiter:
    """At most one line per key (kind of event, client address) per period; the next one
    that passes says how many were suppressed."""

    def __init__(self, period: float = LOG_REPEAT_SECONDS) -> None:
        self._period = period
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (when, suppressed)

    def allow(self, kind: str, address: str, now: float | None = None) -> tuple[bool, int]:
        """(log it?, lines suppressed since the last one logged)."""
        now = time.monotonic() if now is None else now
        when, suppressed = self._last.get((kind, address), (-self._period, 0))
        if now - when < self._period:
            self._last[(kind, address)] = (when, suppressed + 1)
            return False, 0
        self._last[(kind, address)] = (now, 0)
        if len(self._last) > 4096:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self._period}
        return True, suppressed


@dataclass(eq=False)
class _Session:
    """One authenticated client connection on one source IP."""

    source_ip: str
    connection: asyncssh.SSHServerConnection
    peer: str = "?"
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
        self._peer = "?"
        self._refused: list[str] = []  # fingerprints of the keys refused on this connection

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        agent = self._agent
        agent.counters.connections += 1
        peer = conn.get_extra_info("peername")
        try:
            self._peer = canonical_ip(str(peer[0]))
        except (TypeError, IndexError, ValueError):
            self._peer = "?"
        self._session = _Session(self._source_ip, conn, self._peer)
        agent._sessions.add(self._session)
        if not agent.ssh_allowed_from(self._peer):
            # The kernel refuses these first (gateway/rules.py); this is the second line.
            agent.counters.not_allowed += 1
            agent._log_refusal(
                "not-allowed",
                self._peer,
                "refused SSH connection from %s to %s: not in sshAllowFrom",
                self._peer,
                self._source_ip,
            )
            conn.abort()
        elif agent.failures.exhausted(self._peer):
            agent.counters.throttled += 1
            agent._log_refusal(
                "throttled",
                self._peer,
                "refused SSH connection from %s to %s: too many failed authentications "
                "from that address",
                self._peer,
                self._source_ip,
            )
            conn.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._session is not None:
            self._agent._sessions.discard(self._session)
            if not self._session.public_key and self._refused:
                self._agent._log_refusal(
                    "refused-keys",
                    self._peer,
                    "refused %d key(s) from %s on %s: not authorised for this source IP (%s)",
                    len(self._refused),
                    self._peer,
                    self._source_ip,
                    ", ".join(self._refused),
                )

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
            self._agent.counters.refused_keys += 1
            self._agent.failures.fail(self._peer)
            if fingerprint not in self._refused:
                self._refused.append(fingerprint)
            if len(self._refused) >= MAX_AUTH_ATTEMPTS and self._session is not None:
                self._agent.counters.too_many_attempts += 1
                self._session.connection.disconnect(
                    asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                    "too many authentication attempts",
                )
            return False
        # asyncssh asks again for the signed attempt right before auth_completed, so the
        # last candidate validated is the key that authenticated.
        self._candidate = (text, fingerprint)
        return True

    def auth_completed(self) -> None:
        assert self._session is not None
        self._agent.counters.authenticated += 1
        self._session.public_key, self._session.fingerprint = self._candidate
        client = self._agent.client_name(self._source_ip, self._session.public_key)
        log.info(
            "client %s (%s) connected to %s from %s",
            client,
            self._session.fingerprint,
            self._source_ip,
            self._peer,
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
            self._agent._log_refusal(
                "channel",
                session.fingerprint,
                "refused channel from %s on %s to %s:%s: not in its allow-list",
                session.fingerprint,
                self._source_ip,
                untrusted(dest_host),
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
    ``rules_check_interval``: seconds between checks of the applied rules. ``on_failed``
    is given ``failed`` after every apply (the gateway's Lease reports it to the operator).

    ``wanted`` is the config last given to ``apply``; ``config`` the part of it in force
    (the served entries, and what authorises keys and channels); ``failed`` maps each
    source IP of ``wanted`` that is not served as given to the reason.
    """

    def __init__(
        self,
        config: GatewayConfig,
        host_key: asyncssh.SSHKey,
        addresses: AddressManager | None = None,
        firewalls: Mapping[iptables.Family, iptables.Iptables] | None = None,
        snat_guard: bool = True,
        rules_check_interval: float = RULES_CHECK_SECONDS,
        on_failed: Callable[[Mapping[str, str]], None] | None = None,
    ) -> None:
        self.wanted = config
        self.config = replace(config, sources=())  # nothing is served before start
        self.failed: dict[str, str] = {}
        self._permanent: set[str] = set()  # failed for a reason a retry cannot change
        self._host_key = host_key
        self._addresses = addresses
        self._firewalls = dict(firewalls or {})
        self._snat_guard = snat_guard
        self._rules_check_interval = rules_check_interval
        self._on_failed = on_failed
        self._listeners: dict[str, asyncssh.SSHAcceptor] = {}
        self._sessions: set[_Session] = set()
        self._retry: asyncio.Task[None] | None = None
        self._check: asyncio.Task[None] | None = None
        self._apply_lock = asyncio.Lock()
        self._last_outcome: tuple[object, ...] = ()
        self.ingress = IngressRelay()
        self.counters = AuthCounters()
        self.failures = FailureBudget()
        self._log_limiter = LogLimiter()
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

    def ssh_allowed_from(self, peer: str) -> bool:
        """Whether ``peer`` may connect to the SSH port: a network of sshAllowFrom, or the
        node itself (loopback, or one of the node's addresses reaching it over lo)."""
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if address.is_loopback or peer in {s.source_ip for s in self.wanted.sources}:
            return True
        return any(address in ipaddress.ip_network(n) for n in self.config.ssh_allow_from)

    def _log_refusal(self, kind: str, address: str, message: str, *args: object) -> None:
        """A warning, at most once per kind and client address per LOG_REPEAT_SECONDS."""
        allowed, suppressed = self._log_limiter.allow(kind, address)
        if allowed:
            more = f" ({suppressed} similar line(s) suppressed)" if suppressed else ""
            log.warning(message + "%s", *args, more)

    async def start(self) -> None:
        self._stopped = False
        await self.apply(self.wanted)
        self._retry = asyncio.create_task(self._retry_failed())
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
        """Ready when every source IP of the config is served; otherwise which are not."""
        problems = [
            f"{source_ip} not served: {reason}" for source_ip, reason in sorted(self.failed.items())
        ]
        if self.wanted.sources and not self.wanted.ssh_allow_from:
            problems.append("sshAllowFrom is empty: SSH is refused from everywhere but the node")
        return (not problems), ("; ".join(problems) or "ready")

    async def apply(self, config: GatewayConfig) -> None:
        """Serve ``config``, each source IP on its own.

        A source IP's entry (its address, SSH listener, ingress listeners and rules) is
        either wholly in force or reported in ``failed`` while the others go ahead; an
        entry that was served before and whose new version fails keeps its previous
        version when that is still wholly in force (a new ingress port that cannot be
        bound), and is stopped otherwise. Only the rules transaction is all or nothing: if
        it fails this raises and nothing has changed. Failed entries are retried every
        LISTEN_RETRY_SECONDS, unless their reason cannot change.
        """
        async with self._apply_lock:
            await self._apply(config)

    async def _apply(self, config: GatewayConfig) -> None:
        failed: dict[str, str] = {}
        permanent: set[str] = set()
        for source in config.sources:
            reason = self._unservable(source.source_ip)
            if reason:
                failed[source.source_ip] = reason
                permanent.add(source.source_ip)
        if self._addresses is not None:
            # Before the rules: the node's own address must never get our filter chain
            # (it would reset new connections to the node's services on that address).
            failed.update(
                await asyncio.to_thread(
                    node_own_addresses,
                    self._addresses,
                    [s.source_ip for s in config.sources if s.source_ip not in failed],
                )
            )
        candidates = replace(
            config, sources=tuple(s for s in config.sources if s.source_ip not in failed)
        )
        # First: if it fails, nothing else has changed.
        await asyncio.to_thread(self._apply_rules, candidates)
        port_changed = config.ssh_port != self.config.ssh_port
        previous = {} if port_changed else {s.source_ip: s for s in self.config.sources}
        self.wanted = config
        wanted = {source.source_ip for source in candidates.sources}
        # Close sessions while their address still exists, so clients get a FIN at once
        # instead of finding out from keepalives that the address went away.
        for source_ip in sorted(self._listeners):
            if source_ip not in wanted or port_changed:
                await self._stop_listener(source_ip)
        if self._addresses is not None:
            failed.update(await asyncio.to_thread(reconcile_addresses, self._addresses, wanted))
        attempt = replace(
            candidates, sources=tuple(s for s in candidates.sources if s.source_ip not in failed)
        )
        # Ingress before SSH: a port one of them gives up may be the one the other takes.
        ingress_failed = await self.ingress.apply(attempt)
        failed.update(ingress_failed)
        for source in attempt.sources:
            if source.source_ip not in failed:
                reason = await self._start_listener(source.source_ip, config.ssh_port)
                if reason:
                    failed[source.source_ip] = reason
        served: list[SourceIPConfig] = []
        for source in config.sources:
            ip = source.source_ip
            if ip not in failed:
                served.append(source)
            elif ip in ingress_failed and ip in previous and ip in self._listeners:
                served.append(previous[ip])  # its previous version is wholly in force still
        in_force = replace(config, sources=tuple(served))
        if failed:
            # Take back what the failed entries got on the way: their listeners, the
            # addresses added for them, their rules.
            kept = {s.source_ip for s in served}
            for source_ip in sorted(set(self._listeners) - kept):
                await self._stop_listener(source_ip)
            await self.ingress.apply(in_force)
            if self._addresses is not None:
                await asyncio.to_thread(reconcile_addresses, self._addresses, kept)
            try:
                await asyncio.to_thread(self._apply_rules, in_force)
            except iptables.IptablesError as error:
                # The chains allow a little more than is served (nothing listens there);
                # the periodic check retries with the served config.
                log.error("cannot narrow the rules to the served source IPs: %s", error)
                with self._rules_lock:
                    if not self._stopped:
                        self._rules_config = in_force
        self.config = in_force
        self.failed = failed
        self._permanent = permanent & set(failed)
        self._close_revoked()
        self._log_outcome(config)
        if self._on_failed is not None:
            self._on_failed(dict(failed))

    def _unservable(self, source_ip: str) -> str | None:
        """Why this node can never serve ``source_ip`` (checked before any side effect)."""
        family = rules.family_of(source_ip)
        if self._firewalls and family not in self._firewalls:
            return f"no {family} iptables on this node to guard it"
        if self._addresses is not None:
            return self._addresses.problem(source_ip)
        return None

    def _log_outcome(self, config: GatewayConfig) -> None:
        """One true line per distinct outcome (a retry that changes nothing is silent)."""
        outcome = (config, tuple(sorted(self.failed.items())))
        if outcome == self._last_outcome:
            return
        self._last_outcome = outcome
        total = len(config.sources)
        served = total - len(self.failed)
        if not self.failed:
            log.info("applied %d of %d source IPs", served, total)
            return
        kept = {s.source_ip for s in self.config.sources}
        details = "; ".join(
            f"{ip} not applied{' (its previous version still served)' if ip in kept else ''}"
            f": {reason}"
            for ip, reason in sorted(self.failed.items())
        )
        log.error("applied %d of %d source IPs; %s", served, total, details)

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

    async def _start_listener(self, source_ip: str, port: int) -> str | None:
        """Listen on ``source_ip:port`` unless already; the reason when that fails."""
        if source_ip in self._listeners:
            return None
        try:
            self._listeners[source_ip] = await asyncssh.listen(
                host=source_ip,
                port=port,
                server_host_keys=[self._host_key],
                server_factory=lambda ip=source_ip: _SourceIPServer(self, ip),
                reuse_address=True,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
                window=WINDOW,
                login_timeout=LOGIN_TIMEOUT,
                **server_options(),
            )
        except OSError as error:
            return f"cannot listen on {Endpoint(source_ip, port)}: {error.strerror or error}"
        log.info("serving source IP %s on port %s", source_ip, port)
        return None

    async def _retry_failed(self) -> None:
        """Apply the wanted config again while an entry failed for a reason that may pass
        (an address taken by another host, a port in use)."""
        while True:
            await asyncio.sleep(LISTEN_RETRY_SECONDS)
            if set(self.failed) - self._permanent:
                try:
                    await self.apply(self.wanted)
                except Exception as error:  # logged; the next round tries again
                    log.error("retrying failed source IPs: %s", error)

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
            if not self.ssh_allowed_from(session.peer):
                log.info("closing the session from %s: no longer in sshAllowFrom", session.peer)
                session.connection.close()
                continue
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
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        async with self._apply_lock:  # an apply in progress finishes first
            await self._stop()

    async def _stop(self) -> None:
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
