"""Webhook exhaustion attacks (issue 18, item 3): what each does to the server's memory,
to an ordinary admission's latency, and how many attacking connections it keeps open.

Each attack gets a **fresh webhook server process** (``--serve``: ``WebhookServer`` on
127.0.0.1 with a certificate from ``certs/tls.py`` and uvloop, as ``k8s-ext-connector
webhook`` runs; its cache holds one source Service, as in tests/webhook). Its log goes to
a file, whose growth is reported. While the attack runs, a probe thread sends an ordinary
AdmissionReview (a pod selected by the source Service: answer with a patch) every 100 ms
on a new TLS connection, as the API server may; after the attack has stopped, a last
probe measures the latency "after".

Attacks (defaults scaled to a 2-core shared machine; the issue's figures in brackets):

- ``slow-body``: ``--body-connections`` TLS connections [100] each send headers with
  ``Content-Length: 2000000`` and all but 10 kB of the body, then hold ``--hold`` seconds;
- ``slow-headers``: ``--header-connections`` [1,000] send an unfinished request head and
  hold ``--hold-headers`` seconds [90];
- ``empty-objects``: ``--cpu-parallel`` [16] Pod CREATEs at once whose spec carries
  600,000 empty objects (1.8 MB);
- ``containers``: one Pod CREATE with 100,000 containers;
- ``empty-objects-1MiB`` / ``containers-1MiB``: the same cut to just under 1 MiB, the
  body limit since the fix (340,000 empty objects; 58,000 containers);
- ``deep-1000`` / ``deep-500``: a body nested 1,000 deep; a 1.3 kB one nested 500 deep.

Columns: RSS (VmRSS of the server process) before, peak (sampled every 50 ms) and
``--settle`` s (12; the "before" run used 5) after the attacking connections closed;
the ordinary admission's worst latency during the attack and its latency after; attacking
connections the server still had ESTABLISHED at
the end of the hold (``/proc/net/tcp``); what the attacker got back; bytes of log written.

Usage: ``.venv/bin/python bench/webhook_attack.py [--output bench/results/webhook-attack.md]
[--label before|after] [--only slow-body,...]``; ``--output`` appends a section per run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Attack = Callable[[int, ssl.SSLContext], Coroutine[Any, Any, tuple[str, str]]]

SCRIPT = Path(__file__).resolve()
SERVICE, NAMESPACE = "k8s-ext-connector-webhook", "external-services"
HOSTNAME = f"{SERVICE}.{NAMESPACE}.svc"


# ---- the server process -------------------------------------------------------------------


async def serve(tls_dir: Path) -> None:
    from k8s_ext_connector.webhook.cache import SourceCache
    from k8s_ext_connector.webhook.inject import InjectionSettings
    from k8s_ext_connector.webhook.server import ServingCertificate, WebhookServer

    cache = SourceCache()
    cache.put_service(
        {
            "metadata": {"namespace": "ns1", "name": "my-service1"},
            "spec": {"selector": {"app": "my-app"}, "ports": [{"port": 80}]},
        }
    )
    cache.put_externalservice(
        {
            "metadata": {"namespace": "ns1", "name": "es"},
            "spec": {
                "targetIP": "192.0.2.10",
                "sources": [
                    {
                        "service": {"namespace": "ns1", "name": "my-service1"},
                        "sourceIP": "198.51.100.1",
                    }
                ],
                "ports": [{"protocol": "TCP", "port": 8000}],
            },
        }
    )
    cache.mark_synced("services")
    cache.mark_synced("externalservices")
    certificate = ServingCertificate(tls_dir / "tls.crt", tls_dir / "tls.key")
    server = WebhookServer(cache, InjectionSettings(), certificate)
    port = await server.start("127.0.0.1", 0)
    follower = asyncio.create_task(certificate.follow())
    print(port, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        follower.cancel()
        await server.stop()


# ---- bodies ---------------------------------------------------------------------------------


def review(pod: dict[str, Any], uid: str = "probe") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "ns1",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": False,
        },
    }


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "app-", "namespace": "ns1", "labels": {"app": "my-app"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}], **spec},
    }


ORDINARY = json.dumps(review(pod())).encode()


def nested(depth: int) -> bytes:
    """A Pod CREATE whose spec carries a list nested ``depth`` deep."""
    text = json.dumps(review(pod(x=0), uid="deep"), separators=(",", ":"))
    return text.replace('"x":0', '"x":' + "[" * depth + "]" * depth).encode()


def empty_objects(count: int = 600_000) -> bytes:
    body = review({**pod(), "spec": {"containers": [{"name": "app", "image": "x"}]}}, uid="cpu")
    text = json.dumps(body, separators=(",", ":"))
    return text.replace('"containers":[', '"containers":[' + "{}," * count, 1).encode()


def many_containers(count: int = 100_000) -> bytes:
    containers = [{"name": f"c{i}"} for i in range(count)]
    document = review({**pod(), "spec": {"containers": containers}}, uid="many")
    return json.dumps(document, separators=(",", ":")).encode()


# ---- measuring ------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def established(port: int) -> int:
    """Server-side ESTABLISHED TCP connections on 127.0.0.1:port."""
    local = f"0100007F:{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "01":
            count += 1
    return count


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca_pem.decode())


def post(
    port: int, context: ssl.SSLContext, body: bytes, timeout: float = 120.0
) -> tuple[int, bytes]:
    """One POST /mutate on a new connection: (status, body); status 0 on a network error."""
    import http.client

    class Connection(http.client.HTTPSConnection):
        def connect(self) -> None:
            sock = socket.create_connection((self.host, self.port), self.timeout)
            self.sock = context.wrap_socket(sock, server_hostname=HOSTNAME)

    connection = Connection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/mutate", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    except OSError as error:
        return 0, str(error).encode()
    finally:
        connection.close()


@dataclass
class Probe:
    """Ordinary admissions every 100 ms on a thread; RSS sampled every 50 ms."""

    port: int
    context: ssl.SSLContext
    pid: int
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    peak_rss: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _admissions(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            status, _ = post(self.port, self.context, ORDINARY)
            self.latencies.append(time.perf_counter() - started)
            self.failures += status != 200
            self._stop.wait(0.1)

    def _memory(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss_mib(self.pid))
            self._stop.wait(0.05)

    def __enter__(self) -> Probe:
        self._threads = [
            threading.Thread(target=t, daemon=True) for t in (self._admissions, self._memory)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(150)


@dataclass
class Row:
    attack: str
    rss_before: float
    rss_peak: float
    rss_after: float
    worst_ms: float
    after_ms: float
    still_open: str
    outcome: str
    log_bytes: int


# ---- attacks --------------------------------------------------------------------------------


async def _open(
    port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=HOSTNAME, ssl_handshake_timeout=30
    )


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(65536), 0.05)
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 4") or reader.at_eof()


async def hold_connections(
    port: int, context: ssl.SSLContext, count: int, head: bytes, body: bytes, hold: float
) -> tuple[int, str, list[asyncio.StreamWriter]]:
    """Open ``count`` connections, send ``head`` + ``body`` and keep them; after ``hold``
    seconds: (server-side ESTABLISHED count, what the attacker saw, writers)."""
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    refused = 0

    async def one() -> None:
        nonlocal refused
        try:
            reader, writer = await _open(port, context)
            writer.write(head + body)
            await asyncio.wait_for(writer.drain(), hold)
        except (OSError, ssl.SSLError, TimeoutError):
            refused += 1
            return
        readers.append(reader)
        writers.append(writer)

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    await asyncio.sleep(max(0.0, hold - (time.monotonic() - started)))
    open_now = established(port)
    closed = sum([await _closed_by_server(r) for r in readers])
    return open_now, f"{refused} failed to send, {closed} closed by the server", writers


def run_attack(
    name: str,
    attack: Attack,
    ca_pem: bytes,
    tls_dir: Path,
    log_path: Path,
    settle: float,
) -> Row:
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--serve", "--tls-dir", str(tls_dir)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        context = client_context(ca_pem)
        for _ in range(5):  # warm up (imports, first TLS handshakes)
            post(port, context, ORDINARY)
        time.sleep(1)
        before = rss_mib(server.pid)
        log_start = log_path.stat().st_size
        with Probe(port, context, server.pid) as probe:
            still_open, outcome = asyncio.run(attack(port, context))
            time.sleep(0.3)
        time.sleep(settle)
        started = time.perf_counter()
        status, _ = post(port, context, ORDINARY)
        after_ms = (time.perf_counter() - started) * 1000 if status == 200 else float("nan")
        return Row(
            name,
            before,
            max(probe.peak_rss, rss_mib(server.pid)),
            rss_mib(server.pid),
            max(probe.latencies, default=float("nan")) * 1000,
            after_ms,
            still_open,
            outcome + (f"; {probe.failures} ordinary admissions failed" if probe.failures else ""),
            log_path.stat().st_size - log_start,
        )
    finally:
        server.terminate()
        server.wait(10)


def attacks(
    args: argparse.Namespace,
) -> dict[str, Attack]:
    async def slow_body(port: int, context: ssl.SSLContext) -> tuple[str, str]:
        head = (
            b"POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2000000\r\n\r\n"
        )
        open_now, outcome, writers = await hold_connections(
            port, context, args.body_connections, head, b"x" * 1_990_000, args.hold
        )
        for writer in writers:
            writer.transport.abort()
        return f"{open_now} of {args.body_connections} after {args.hold:g} s", outcome

    async def slow_headers(port: int, context: ssl.SSLContext) -> tuple[str, str]:
        head = b"POST /mutate HTTP/1.1\r\nHost: webhook\r\nX-Slow: "
        open_now, outcome, writers = await hold_connections(
            port, context, args.header_connections, head, b"", args.hold_headers
        )
        for writer in writers:
            writer.transport.abort()
        return f"{open_now} of {args.header_connections} after {args.hold_headers:g} s", outcome

    def bodies(body: bytes, parallel: int) -> Attack:
        async def attack(port: int, context: ssl.SSLContext) -> tuple[str, str]:
            def one() -> tuple[int, bytes, float]:
                started = time.perf_counter()
                status, answer = post(port, context, body)
                return status, answer, time.perf_counter() - started

            results = await asyncio.gather(*(asyncio.to_thread(one) for _ in range(parallel)))
            statuses = sorted({s for s, _, _ in results})
            slowest = max(t for _, _, t in results)
            sample = results[0][1][:60].decode(errors="replace").strip().replace("\n", " ")
            uid = "uid echoed" if b'"uid"' in results[0][1] else "no uid"
            return (
                "-",
                f"{parallel} x {len(body) / 1e3:,.1f} kB: HTTP {statuses}, slowest {slowest:.2f} s,"
                f" {uid} ({sample!r})",
            )

        return attack

    return {
        "slow-body": slow_body,
        "slow-headers": slow_headers,
        "empty-objects": bodies(empty_objects(), args.cpu_parallel),
        "empty-objects-1MiB": bodies(empty_objects(340_000), args.cpu_parallel),
        "containers": bodies(many_containers(), 1),
        "containers-1MiB": bodies(many_containers(58_000), 1),
        "deep-1000": bodies(nested(1000), 1),
        "deep-500": bodies(nested(500), 1),
    }


def table(rows: list[Row]) -> str:
    lines = [
        "| attack | RSS before / peak / after (MiB) "
        "| ordinary admission: worst during / after (ms) "
        "| attacking connections open | what the attacker got | log bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.attack} | {r.rss_before:.0f} / {r.rss_peak:.0f} / {r.rss_after:.0f} "
            f"| {r.worst_ms:.0f} / {r.after_ms:.0f} | {r.still_open} | {r.outcome} "
            f"| {r.log_bytes} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--body-connections", type=int, default=100)
    parser.add_argument("--hold", type=float, default=15.0)
    parser.add_argument("--header-connections", type=int, default=300)
    parser.add_argument("--hold-headers", type=float, default=30.0)
    parser.add_argument("--cpu-parallel", type=int, default=16)
    parser.add_argument(
        "--settle", type=float, default=12.0, help="seconds after the attack for 'after'"
    )
    parser.add_argument("--only", help="comma-separated attack names")
    parser.add_argument("--label", default="", help="section title in the output")
    parser.add_argument("--output", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        from k8s_ext_connector.core.run import setup_logging
        from k8s_ext_connector.core.ssh import install_fast_event_loop

        setup_logging("info")
        install_fast_event_loop()
        asyncio.run(serve(Path(args.tls_dir)))
        return 0

    from k8s_ext_connector.certs.tls import (
        generate_ca,
        issue_serving_cert,
        service_dns_names,
        write_pair,
    )

    command = shlex.join([".venv/bin/python", "bench/webhook_attack.py", *(argv or sys.argv[1:])])
    chosen = attacks(args)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="webhook-attack-") as workdir:
        ca = generate_ca("bench-ca", datetime.timedelta(hours=1))
        write_pair(
            Path(workdir),
            issue_serving_cert(
                ca, service_dns_names(SERVICE, NAMESPACE), datetime.timedelta(hours=1)
            ),
        )
        for name, attack in chosen.items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(
                run_attack(
                    name,
                    attack,
                    ca.cert_pem,
                    Path(workdir),
                    Path(workdir) / f"{name}.log",
                    args.settle,
                )
            )
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.output is not None:
        today = datetime.date.today().isoformat()
        head = f"\n## {args.label or 'run'} ({today}, {os.cpu_count()} CPUs)\n\n"
        with args.output.open("a") as out:
            out.write(f"{head}`{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
