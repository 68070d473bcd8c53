"""A minimal HTTP health endpoint for kubelet probes (``/healthz``, ``/ready``).

Plain asyncio, not a web framework: two fixed routes, no request bodies, bounded reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


async def serve_health(
    host: str, port: int, ready: Callable[[], tuple[bool, str]]
) -> asyncio.Server:
    """``/healthz`` answers 200 while the process runs; ``/ready`` reports ``ready()``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else ""
            if path == "/healthz":
                status, body = 200, "ok"
            elif path == "/ready":
                ok, why = ready()
                status, body = (200 if ok else 503), why
            else:
                status, body = 404, "not found"
            payload = body.encode() + b"\n"
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
