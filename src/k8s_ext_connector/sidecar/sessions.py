"""Long-lived SSH sessions to gateways, one per gateway endpoint, shared by all connections.

A new SSH session per connection costs ~15 ms; a channel on a warm session ~2 ms. Each
session reconnects with exponential backoff (capped low, so a restarted gateway is back in
use within about a second) and is declared dead by keepalives when the network goes quiet.
While a session is down, ``connection()`` returns None at once: callers refuse the app's
connection immediately instead of letting it hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import asyncssh

from k8s_ext_connector.core.config import GatewayEndpoint
from k8s_ext_connector.core.ssh import WINDOW, tuned_options

log = logging.getLogger(__name__)
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class GatewayStatus:
    """One gateway session as readiness sees it."""

    gateway: GatewayEndpoint
    up: bool
    error: str  # why it is down ("" when up)
    connected_once: bool  # has this session ever been up
    down_for: float  # seconds since it started or was lost (0 when up)


class GatewaySession:
    def __init__(self, gateway: GatewayEndpoint, client_key: asyncssh.SSHKey) -> None:
        self.gateway = gateway
        self._client_key = client_key
        self._conn: asyncssh.SSHClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_error = "not connected yet"
        self._connected_once = False
        self._down_since = time.monotonic()

    @property
    def connection(self) -> asyncssh.SSHClientConnection | None:
        return self._conn

    def status(self, now: float) -> GatewayStatus:
        up = self._conn is not None
        return GatewayStatus(
            self.gateway,
            up,
            "" if up else self.last_error,
            self._connected_once,
            0.0 if up else now - self._down_since,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"ssh {self.gateway.endpoint}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        host_key = asyncssh.import_public_key(self.gateway.host_key)
        while True:
            try:
                conn = await asyncio.wait_for(
                    asyncssh.connect(
                        self.gateway.address,
                        self.gateway.port,
                        username="ext-connector",
                        client_keys=[self._client_key],
                        known_hosts=([host_key], [], []),  # pinned: no other key accepted
                        agent_path=None,
                        config=None,
                        password=None,
                        preferred_auth="publickey",
                        window=WINDOW,
                        **tuned_options(),
                    ),
                    CONNECT_TIMEOUT,
                )
            except (OSError, asyncssh.Error, TimeoutError) as error:
                reason = str(error) or type(error).__name__
                if reason != self.last_error:
                    log.warning(
                        "gateway %s unavailable: %s (retrying)", self.gateway.endpoint, reason
                    )
                self.last_error = reason
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self._conn = conn
            self._connected_once = True
            self.last_error = ""
            backoff = BACKOFF_FIRST
            log.info("session to gateway %s established", self.gateway.endpoint)
            await conn.wait_closed()
            self._conn = None
            self._down_since = time.monotonic()
            self.last_error = "session closed"
            log.warning("session to gateway %s lost; reconnecting", self.gateway.endpoint)


class SessionPool:
    """The sessions a config needs, kept in step with it by ``update``."""

    def __init__(self, client_key: asyncssh.SSHKey) -> None:
        self._client_key = client_key
        self._sessions: dict[GatewayEndpoint, GatewaySession] = {}

    def get(self, gateway: GatewayEndpoint) -> asyncssh.SSHClientConnection | None:
        session = self._sessions.get(gateway)
        return session.connection if session else None

    async def update(self, gateways: tuple[GatewayEndpoint, ...]) -> None:
        for gateway in gateways:
            if gateway not in self._sessions:
                session = GatewaySession(gateway, self._client_key)
                self._sessions[gateway] = session
                session.start()
        for gateway in [g for g in self._sessions if g not in gateways]:
            await self._sessions.pop(gateway).stop()

    async def replace_key(self, client_key: asyncssh.SSHKey) -> None:
        """A re-issued key (its Secret changed): new sessions authenticate with it."""
        self._client_key = client_key
        gateways = tuple(self._sessions)
        for gateway in gateways:
            await self._sessions.pop(gateway).stop()
        await self.update(gateways)
        log.info("client key changed: %d gateway sessions restarted", len(gateways))

    def status(self) -> tuple[GatewayStatus, ...]:
        """Every session's state, for readiness."""
        now = time.monotonic()
        return tuple(s.status(now) for s in self._sessions.values())

    async def close(self) -> None:
        await self.update(())
