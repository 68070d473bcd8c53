"""The lab's "app": plain TCP/HTTP clients, run inside a pod namespace by the caller."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    ok: bool
    body: str  # the server's answer (the client IP it saw) or the error


async def http_get(host: str, port: int, path: str = "/", timeout: float = 10) -> Outcome:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as error:
        return Outcome(False, type(error).__name__)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, TimeoutError) as error:
        return Outcome(False, type(error).__name__)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0] + b" ":
        return Outcome(False, f"bad response: {head[:60]!r}")
    return Outcome(True, body.decode(errors="replace").strip())


async def many_gets(host: str, port: int, count: int, path: str = "/") -> list[Outcome]:
    """``count`` connections at once (each its own TCP connection)."""
    return list(await asyncio.gather(*(http_get(host, port, path) for _ in range(count))))


def run_gets(host: str, port: int, count: int = 1, path: str = "/") -> list[Outcome]:
    return asyncio.run(many_gets(host, port, count, path))
