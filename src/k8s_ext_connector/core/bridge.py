"""Splices: join two byte streams, both directions, with back-pressure.

- ``Splice``: one TCP connection and one SSH channel. Used at both ends of egress: the
  sidecar joins an intercepted app connection to a ``direct-tcpip`` channel; the gateway
  joins that channel to the outbound connection bound to the source IP.
- ``TcpSplice``: two TCP connections. The gateway's ingress relay joins a connection
  accepted on ``sourceIP:port`` to the one it opens to the source Service's ClusterIP.

Protocol callbacks (no streams, no per-chunk tasks) keep the copy path short, which is
what bounds throughput in Python. Half-close is propagated; either side closing or
failing closes the other. The first side stays paused until the second is attached, so
no byte is read before there is somewhere to put it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import cast

import asyncssh


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with a TCP RST, so a client fails fast instead of reading an orderly EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


class Splice:
    """State shared by the two halves; either half may be created first."""

    def __init__(
        self,
        on_close: Callable[[Splice], None] | None = None,
        on_tcp_made: Callable[[Splice], None] | None = None,
    ) -> None:
        self.tcp: asyncio.Transport | None = None
        self._on_tcp_made = on_tcp_made
        self.channel: asyncssh.SSHTCPChannel[bytes] | None = None
        self._on_close = on_close
        self._eof_from_tcp = False
        self._eof_from_channel = False
        self._closed = False
        self._started = False
        self._early: list[bytes] = []
        self.tcp_side = _TcpSide(self)
        self.channel_side = _ChannelSide(self)

    def close(self, rst: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tcp is not None:
            if rst:
                reset(self.tcp)
            else:
                self.tcp.close()
        if self.channel is not None:
            self.channel.close()
        if self._on_close is not None:
            self._on_close(self)

    def _maybe_finish(self) -> None:
        if self._eof_from_tcp and self._eof_from_channel:
            self.close()


class _TcpSide(asyncio.Protocol):
    def __init__(self, splice: Splice) -> None:
        self._s = splice

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._s.tcp = transport
        transport.pause_reading()  # until the channel is attached
        if self._s.channel is not None:
            transport.resume_reading()
        if self._s._on_tcp_made is not None:
            self._s._on_tcp_made(self._s)

    def data_received(self, data: bytes) -> None:
        if not self._s._started:
            # Some loops (uvloop) start reading right after connection_made despite the
            # pause; hold the bytes until the channel has started.
            self._s._early.append(data)
            self._s.tcp.pause_reading()  # type: ignore[union-attr]
            return
        assert self._s.channel is not None  # started implies attached
        self._s.channel.write(data)

    def eof_received(self) -> bool:
        self._s._eof_from_tcp = True
        if self._s.channel is not None and self._s._started:
            self._s.channel.write_eof()
        self._s._maybe_finish()
        return True  # keep our write half open for the rest of the reply

    def connection_lost(self, exc: Exception | None) -> None:
        self._s.close()

    def pause_writing(self) -> None:
        if self._s.channel is not None:
            self._s.channel.pause_reading()

    def resume_writing(self) -> None:
        if self._s.channel is not None:
            self._s.channel.resume_reading()


class _ChannelSide(asyncssh.SSHTCPSession[bytes]):
    def __init__(self, splice: Splice) -> None:
        self._s = splice

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._s.channel = chan
        if self._s._closed:  # the TCP side went away while the channel was opening
            chan.close()

    def session_started(self) -> None:
        self._s._started = True
        chan = self._s.channel
        assert chan is not None
        for data in self._s._early:
            chan.write(data)
        self._s._early.clear()
        if self._s._eof_from_tcp:
            chan.write_eof()
        if self._s.tcp is not None and not self._s._closed:
            self._s.tcp.resume_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._s.tcp is not None:
            self._s.tcp.write(data)

    def eof_received(self) -> bool:
        self._s._eof_from_channel = True
        if self._s.tcp is not None and self._s.tcp.can_write_eof():
            self._s.tcp.write_eof()
        self._s._maybe_finish()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._s.close()

    def pause_writing(self) -> None:
        if self._s.tcp is not None:
            self._s.tcp.pause_reading()

    def resume_writing(self) -> None:
        if self._s.tcp is not None:
            self._s.tcp.resume_reading()


class TcpSplice:
    """Two TCP connections joined both ways; either may be made first."""

    def __init__(
        self,
        on_close: Callable[[TcpSplice], None] | None = None,
        on_accepted: Callable[[TcpSplice], None] | None = None,
    ) -> None:
        self._on_close = on_close
        self._on_accepted = on_accepted  # e.g. check the peer, then open the other side
        self._closed = False
        self._started = False
        self.accepted = _TcpHalf(self)  # the connection a listener accepted
        self.opened = _TcpHalf(self)  # the connection opened for it
        self.accepted.other, self.opened.other = self.opened, self.accepted

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, rst: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        for half in (self.accepted, self.opened):
            if half.transport is not None:
                if rst:
                    reset(half.transport)
                else:
                    half.transport.close()
        if self._on_close is not None:
            self._on_close(self)

    def _maybe_start(self) -> None:
        if self._started or self._closed:
            return
        if self.accepted.transport is None or self.opened.transport is None:
            return
        self._started = True
        for half in (self.accepted, self.opened):
            half.flush()
        for half in (self.accepted, self.opened):
            if not half.eof and half.transport is not None:
                half.transport.resume_reading()

    def _maybe_finish(self) -> None:
        if self.accepted.eof and self.opened.eof:
            self.close()


class _TcpHalf(asyncio.Protocol):
    """One connection of a TcpSplice: what it reads goes to ``other``."""

    def __init__(self, splice: TcpSplice) -> None:
        self._s = splice
        self.other: _TcpHalf = self
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self._s.closed:
            reset(self.transport)
            return
        self.transport.pause_reading()  # until the other side exists
        if self is self._s.accepted and self._s._on_accepted is not None:
            self._s._on_accepted(self._s)
        self._s._maybe_start()

    def flush(self) -> None:
        """Hand over what arrived before the other side existed (and an early EOF)."""
        target = self.other.transport
        assert target is not None
        for data in self._early:
            target.write(data)
        self._early.clear()
        if self.eof and target.can_write_eof():
            target.write_eof()

    def data_received(self, data: bytes) -> None:
        if not self._s._started:
            # Some loops (uvloop) deliver data right after connection_made despite the pause.
            self._early.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        target = self.other.transport
        if target is not None and not target.is_closing():
            target.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        target = self.other.transport
        if self._s._started and target is not None and target.can_write_eof():
            target.write_eof()
        self._s._maybe_finish()
        return True  # keep our write half open for the rest of the reply

    def connection_lost(self, exc: Exception | None) -> None:
        self._s.close()

    def pause_writing(self) -> None:
        if self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other.transport is not None and not self.other.eof:
            self.other.transport.resume_reading()
