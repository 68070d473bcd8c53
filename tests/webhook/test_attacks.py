"""Issue 18 item 3: what anyone who reaches port 8443 could do to the webhook, scaled to a
shared 2-core machine (bench/webhook_attack.py runs them at full size). The server runs in
a process of its own so that its memory can be read. After each attack an ordinary
admission answers within 100 ms and the server's RSS returns within 20% of its start."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from k8s_ext_connector.certs.tls import Issued
from tests.polling import wait_for
from tests.webhook.harness import (
    HOSTNAME,
    client_context,
    https,
    new_ca,
    review,
    write_serving_pair,
)

ROOT = Path(__file__).resolve().parents[2]
LIMITS = {"header_timeout": 2.0, "body_timeout": 1.0, "queue_timeout": 0.5}


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns1", "labels": {"app": "my-app"}},
        "spec": {"containers": [{"name": "app", "image": "app"}], **spec},
    }


ORDINARY = json.dumps(review(pod())).encode()


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int
    ca: Issued
    log: Path

    def rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1])

    def admit(self, body: bytes = ORDINARY) -> tuple[int, bytes, float]:
        started = time.perf_counter()
        reply = https(self.port, self.ca, "POST", "/mutate", body)
        return reply.status, reply.body, time.perf_counter() - started

    def established(self) -> int:
        local = f"0100007F:{self.port:04X}"
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
        return sum(1 for r in rows if r.split()[1] == local and r.split()[3] == "01")

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def assert_recovered(self, rss_start: int) -> None:
        """An ordinary admission within 100 ms (of a few tries: the machine is shared) and
        RSS within 20% of the start (the heap is trimmed every 10 s)."""

        def quick() -> bool:
            status, body, seconds = self.admit()
            assert status == 200, body
            assert b'"patch"' in body
            return seconds < 0.1

        wait_for(quick, timeout=5, what="an ordinary admission within 100 ms", interval=0.2)
        wait_for(
            lambda: self.rss() <= rss_start * 1.2,
            timeout=30,
            what=f"RSS back within 20% of {rss_start} kB (now {self.rss()} kB)",
            interval=0.5,
        )


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    ca = new_ca()
    write_serving_pair(tmp_path, ca)
    limits = {**LIMITS, **getattr(request, "param", {})}
    log = tmp_path / "webhook.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.webhook.server_process",
                str(tmp_path),
                json.dumps(limits),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        assert process.stdout is not None
        hook = Server(process, int(process.stdout.readline()), ca, log)
        for _ in range(3):  # warm: imports, first handshakes
            assert hook.admit()[0] == 200
        yield hook
    finally:
        process.terminate()
        process.wait(10)


async def _hold(server: Server, count: int, data: bytes) -> list[asyncio.StreamWriter]:
    context: ssl.SSLContext = client_context(server.ca)

    async def one() -> asyncio.StreamWriter | None:
        try:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=context, server_hostname=HOSTNAME
            )
            writer.write(data)
            await asyncio.wait_for(writer.drain(), 5)
            return writer
        except (OSError, TimeoutError):
            return None  # the server already cut it off

    return [w for w in await asyncio.gather(*(one() for _ in range(count))) if w is not None]


def _attack(server: Server, count: int, data: bytes, until: float) -> int:
    """Open ``count`` connections that send ``data`` and stall; the most ESTABLISHED at
    the server afterwards, and wait until none is left (or ``until`` seconds)."""

    async def run() -> int:
        writers = await _hold(server, count, data)
        opened = server.established()
        deadline = time.monotonic() + until
        while server.established() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for writer in writers:
            writer.transport.abort()
        return opened

    return asyncio.run(run())


def test_unfinished_bodies_are_cut_off_and_memory_returns(server: Server) -> None:
    """Before: no body deadline, 2 MiB accepted per request and no cap, so 100 stalled
    bodies took 260 MiB that stayed after they closed."""
    start = server.rss()
    head = (
        b"POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    opened = _attack(server, 40, head + b"x" * 990_000, until=6)
    assert opened > 0
    assert server.established() == 0, "stalled bodies still open after 6 s"
    lines = [x for x in server.log_lines() if "refused" in x]
    assert lines
    assert all(("408 read_timeout" in x or "429 overloaded" in x) for x in lines)
    server.assert_recovered(start)


def test_unfinished_request_heads_are_closed_at_the_header_deadline(server: Server) -> None:
    """Before: 1,000 connections with unfinished heads were all still open after 90 s."""
    start = server.rss()
    started = time.monotonic()
    opened = _attack(server, 150, b"POST /mutate HTTP/1.1\r\nHost: webhook\r\nX-Slow: ", until=8)
    assert opened > 100
    assert server.established() == 0
    assert time.monotonic() - started < LIMITS["header_timeout"] + 6
    server.assert_recovered(start)


@pytest.mark.parametrize("server", [{"max_connections": 20}], indirect=True)
def test_a_full_connection_cap_still_admits_the_api_server(server: Server) -> None:
    """Stalled connections fill the cap; a new connection takes the oldest idle one's place."""

    async def run() -> tuple[int, int]:
        writers = await _hold(server, 40, b"POST /mutate HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        status, _, _ = await asyncio.to_thread(server.admit)
        held = server.established()
        for writer in writers:
            writer.transport.abort()
        return held, status

    held, status = asyncio.run(run())
    assert status == 200
    assert held <= 20


def test_cpu_heavy_bodies_are_answered_quickly_and_memory_returns(server: Server) -> None:
    """Before: one 1.8 MB body of 600,000 empty objects took 4.2 s of the event loop, 16 at
    once stalled every admission for a minute; 100,000 containers took 1.25 s each."""
    start = server.rss()
    empty = json.dumps(review(pod(x=0)), separators=(",", ":"))
    in_a_field = empty.replace('"x":0', '"x":[' + ",".join(["{}"] * 340_000) + "]").encode()
    containers = json.dumps(review(pod(containers=[{}] * 340_000)), separators=(",", ":"))
    bodies = [in_a_field, containers.encode()] * 4
    assert all(len(b) < 1024 * 1024 for b in bodies)

    async def run() -> list[tuple[int, bytes, float]]:
        return await asyncio.gather(*(asyncio.to_thread(server.admit, b) for b in bodies))

    results = asyncio.run(run())
    assert {status for status, _, _ in results} <= {200, 429}
    assert max(seconds for _, _, seconds in results) < 4
    answered = [json.loads(body)["response"] for status, body, _ in results if status == 200]
    assert any("more than 1000" in " ".join(r.get("warnings", [])) for r in answered)
    over = json.dumps(review(pod(containers=[{"name": f"c{i}"} for i in range(100_000)])))
    assert server.admit(over.encode())[0] == 413
    server.assert_recovered(start)


@pytest.mark.parametrize("depth", [500, 1000, 100_000])
def test_deep_json_is_one_log_line_and_a_400_or_an_answer(server: Server, depth: int) -> None:
    """Before: 1,000+ deep was aiohttp's 500 page (no uid, not counted); 500 deep wrote
    140 kB of traceback to the log."""
    before = len(server.log_lines())
    body = json.dumps(review(pod(x=0), uid="deep-uid"), separators=(",", ":"))
    status, answer, _ = server.admit(
        body.replace('"x":0', '"x":' + "[" * depth + "]" * depth).encode()
    )
    new = server.log_lines()[before:]
    if status == 200:  # parsed: nothing the webhook does with a pod recurses into it
        assert json.loads(answer)["response"]["uid"] == "deep-uid"
        assert not new
    else:
        assert status == 400
        assert b"nested too deep" in answer
        assert b"deep-uid" in answer
        assert len(new) == 1, new
        assert "deep-uid" in new[0]
    metrics = https(server.port, server.ca, "GET", "/metrics").body.decode()
    assert ('k8s_ext_connector_webhook_rejected_total{reason="malformed"} 1' in metrics) == (
        status == 400
    )
    server.assert_recovered(server.rss())
