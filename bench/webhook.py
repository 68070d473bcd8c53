"""Webhook benchmark: admission latency and throughput over HTTPS with 10,000 cached Services.

What it does:

1. Issues a CA and a serving certificate (``certs/tls.py``) into a temporary directory.
2. Starts the webhook server in a **separate process** (``--serve``; uvloop, as
   ``k8s-ext-connector webhook`` runs), its ``SourceCache`` filled directly (no API server):
   ``--services`` Services over ``--namespaces`` namespaces, each selecting ``app=<name>``,
   and ExternalServices naming every ``--source-every``-th Service as a source (two
   sources each). The process prints its port and serves until killed.
3. The load generator (this process, aiohttp, one keep-alive connection pool, TLS verified
   against the CA by the Service's DNS name as the API server does) sends AdmissionReviews
   for Pod CREATEs: half of the pods are selected by a source Service (answer: a JSONPatch
   with the sidecar), half are not (answer: allowed, no patch). Each answer is checked
   (uid echoed, allowed, patch present exactly for selected pods).
4. Open-loop phases at each ``--rates`` offered load for ``--seconds``: request *i* is
   scheduled at ``start + i/rate`` whatever happened to earlier ones (a slow answer does
   not delay the next request). Latency is measured from sending to the answer; how late
   each request was sent against its schedule is reported too, so a load generator that
   could not keep up is visible. A warm-up phase precedes them.
5. A closed-loop phase (``--concurrency`` requests in flight) measures the most the server
   answers per second.

Reported per phase: offered and achieved requests/s, latency p50/p99/max (ms), errors,
and the server process's CPU seconds per 1,000 requests. Client and server share the
machine's CPUs (``nproc`` is in the results), so the load generator's own cost is part of
the picture on small machines.

Usage: ``.venv/bin/python bench/webhook.py [--services 10000] [--rates 100,1000]
[--seconds 10] [--quick] [--output bench/results/webhook.md]``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from k8s_ext_connector.certs.tls import (
    generate_ca,
    issue_serving_cert,
    service_dns_names,
    write_pair,
)
from k8s_ext_connector.webhook.cache import SourceCache
from k8s_ext_connector.webhook.inject import InjectionSettings
from k8s_ext_connector.webhook.server import (
    ServingCertificate,
    WebhookServer,
    decide,
    parse_review,
    review_response,
)

SCRIPT = Path(__file__).resolve()
RESULTS = SCRIPT.parent / "results" / "webhook.md"
SERVICE, NAMESPACE = "k8s-ext-connector-webhook", "external-services"
HOSTNAME = f"{SERVICE}.{NAMESPACE}.svc"
TARGET_P99_MS = 10.0
ANALYSIS = "## Analysis"  # a hand-written section from this heading on is kept by reruns
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the server process -------------------------------------------------------------------


def fill(cache: SourceCache, services: int, namespaces: int, source_every: int) -> int:
    """Services ``svc-<i>`` in ``ns-<i % namespaces>``; returns how many are sources."""
    per_ns: list[list[str]] = [[] for _ in range(namespaces)]
    for i in range(services):
        ns = f"ns-{i % namespaces}"
        cache.put_service(
            {
                "metadata": {"namespace": ns, "name": f"svc-{i}"},
                "spec": {"selector": {"app": f"svc-{i}"}, "ports": [{"port": 80}]},
            }
        )
        if i % source_every == 0:
            per_ns[i % namespaces].append(f"svc-{i}")
    sources = [(f"ns-{n}", name) for n, names in enumerate(per_ns) for name in names]
    for k in range(0, len(sources), 2):
        pair = sources[k : k + 2]
        cache.put_externalservice(
            {
                "metadata": {"namespace": "default", "name": f"es-{k // 2}"},
                "spec": {
                    "targetIP": "192.0.2.10",
                    "sources": [
                        {
                            "service": {"namespace": ns, "name": name},
                            "sourceIP": f"198.51.100.{1 + (k + j) % 250}",
                        }
                        for j, (ns, name) in enumerate(pair)
                    ],
                    "ports": [{"protocol": "TCP", "port": 8000}],
                },
            }
        )
    cache.mark_synced("services")
    cache.mark_synced("externalservices")
    return len(sources)


async def serve(args: argparse.Namespace) -> None:
    cache = SourceCache()
    fill(cache, args.services, args.namespaces, args.source_every)
    tls = Path(args.tls_dir)
    certificate = ServingCertificate(tls / "tls.crt", tls / "tls.key")
    server = WebhookServer(cache, InjectionSettings(), certificate)
    port = await server.start("127.0.0.1", 0)
    follower = asyncio.create_task(certificate.follow())  # as deployed: the 1 s file poll
    print(port, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        follower.cancel()
        await server.stop()


# ---- the load generator -------------------------------------------------------------------


def review(i: int, args: argparse.Namespace) -> tuple[bytes, bool]:
    """The i-th AdmissionReview body and whether its pod is selected by a source."""
    selected = i % 2 == 0
    # Source services are every source_every-th; pick one for selected pods, a non-source
    # (or no Service at all) for the others.
    k = (i // 2) % max(1, args.services // args.source_every)
    svc = k * args.source_every if selected else k * args.source_every + 1
    ns = f"ns-{svc % args.namespaces}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"app-{svc}-",
            "namespace": ns,
            "labels": {"app": f"svc-{svc}", "pod-template-hash": "5d8f7c9b6"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"app-{svc}-5d8f7c9b6",
                    "uid": "5b1e1d8e-2c5f-4a3e-9d3a-0c1f3c0e9a11",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/app:1.2.3",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "volumeMounts": [
                        {
                            "name": "kube-api-access",
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                            "readOnly": True,
                        }
                    ],
                }
            ],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": []}}],
            "restartPolicy": "Always",
            "serviceAccountName": "default",
        },
    }
    document = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": f"uid-{i}",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": False,
        },
    }
    return json.dumps(document).encode(), selected


@dataclass
class Phase:
    name: str
    offered: float | None  # requests/s; None for the closed loop
    latencies_ms: list[float] = field(default_factory=list)
    lateness_ms: list[float] = field(default_factory=list)  # send time minus due time
    errors: int = 0
    elapsed: float = 0.0
    server_cpu: float = 0.0

    @property
    def done(self) -> int:
        return len(self.latencies_ms)

    def pct(self, q: float, samples: list[float] | None = None) -> float:
        values = sorted(self.latencies_ms if samples is None else samples)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]

    @property
    def achieved(self) -> float:
        return self.done / self.elapsed if self.elapsed else 0.0


class Client:
    def __init__(self, port: int, ca_pem: bytes, args: argparse.Namespace) -> None:
        self.url = f"https://127.0.0.1:{port}/mutate"
        self.args = args
        context = ssl.create_default_context(cadata=ca_pem.decode())
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=args.connections),
            timeout=aiohttp.ClientTimeout(total=10),
        )
        self.counter = 0

    async def one(self, i: int) -> None:
        body, selected = review(i, self.args)
        async with self.session.post(
            self.url,
            data=body,
            server_hostname=HOSTNAME,
            headers={"Content-Type": "application/json"},
        ) as reply:
            answer = await reply.json()
        response = answer["response"]
        if reply.status != 200 or response["uid"] != f"uid-{i}" or not response["allowed"]:
            raise RuntimeError(f"bad answer: {reply.status} {response}")
        if selected != ("patch" in response):
            raise RuntimeError(f"request {i}: selected={selected} but answer {response}")

    async def close(self) -> None:
        await self.session.close()


async def open_loop(client: Client, phase: Phase, seconds: float, cpu: Callable[[], float]) -> None:
    assert phase.offered is not None
    # time.perf_counter, not loop.time(): uvloop's clock has a 1 ms resolution
    now = time.perf_counter
    total = int(phase.offered * seconds)
    tasks: list[asyncio.Task[None]] = []
    cpu_before, start = cpu(), now()

    async def send(i: int, due: float) -> None:
        sent = now()
        phase.lateness_ms.append((sent - due) * 1000)
        try:
            await client.one(client.counter + i)
            phase.latencies_ms.append((now() - sent) * 1000)
        except Exception:
            phase.errors += 1

    for i in range(total):
        due = start + i / phase.offered
        delay = due - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i, due)))
    await asyncio.gather(*tasks)
    phase.elapsed = now() - start
    phase.server_cpu = cpu() - cpu_before
    client.counter += total


async def closed_loop(
    client: Client, phase: Phase, seconds: float, concurrency: int, cpu: Callable[[], float]
) -> None:
    now = time.perf_counter
    cpu_before, start = cpu(), now()
    end = start + seconds

    async def worker(w: int) -> None:
        n = 0
        while now() < end:
            i = client.counter + w + n * concurrency
            n += 1
            sent = now()
            try:
                await client.one(i)
                phase.latencies_ms.append((now() - sent) * 1000)
            except Exception:
                phase.errors += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    phase.elapsed = now() - start
    phase.server_cpu = cpu() - cpu_before


def process_cpu(pid: int) -> Callable[[], float]:
    def read() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    return read


async def drive(port: int, ca_pem: bytes, pid: int, args: argparse.Namespace) -> list[Phase]:
    client = Client(port, ca_pem, args)
    cpu = process_cpu(pid)
    phases: list[Phase] = []
    try:
        await open_loop(client, Phase("warm-up", 100.0), args.warmup, cpu)
        for rate in args.rates:
            phase = Phase(f"open loop {rate:,} req/s", float(rate))
            await open_loop(client, phase, args.seconds, cpu)
            phases.append(phase)
        phase = Phase(f"closed loop, {args.concurrency} in flight", None)
        await closed_loop(client, phase, args.seconds, args.concurrency, cpu)
        phases.append(phase)
    finally:
        await client.close()
    return phases


# ---- reporting ----------------------------------------------------------------------------


def table(phases: list[Phase]) -> str:
    rows = [
        "| phase | offered req/s | achieved req/s | p50 ms | p99 ms | max ms | errors "
        "| server CPU s per 1,000 req | sender late p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        offered = f"{p.offered:,.0f}" if p.offered else "-"
        cpu = p.server_cpu / p.done * 1000 if p.done else float("nan")
        late = f"{p.pct(99, p.lateness_ms):.2f}" if p.lateness_ms else "-"
        rows.append(
            f"| {p.name} | {offered} | {p.achieved:,.0f} | {p.pct(50):.2f} | {p.pct(99):.2f} "
            f"| {max(p.latencies_ms, default=float('nan')):.2f} | {p.errors} | {cpu:.2f} "
            f"| {late} |"
        )
    return "\n".join(rows)


def versions() -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (
        f"python {platform.python_version()}, aiohttp {version('aiohttp')}, "
        f"uvloop {version('uvloop')}, jsonpatch {version('jsonpatch')}, {ssl.OPENSSL_VERSION}"
    )


def verdict(phases: list[Phase], rate: int = 100) -> str:
    target = next((p for p in phases if p.offered == rate), None)
    if target is None:
        return f"no {rate} req/s phase was run"
    ok = target.pct(99) < TARGET_P99_MS and target.errors == 0
    return (
        f"target p99 < {TARGET_P99_MS:.0f} ms at {rate} req/s: "
        f"**{'met' if ok else 'NOT met'}** (p99 {target.pct(99):.2f} ms, "
        f"{target.errors} errors)"
    )


def compute_cost(args: argparse.Namespace, count: int = 2000) -> tuple[float, float]:
    """Milliseconds per request of the pure path (parse, decide, encode) in this process,
    for (selected pods, other pods): what the server spends beyond HTTP and TLS."""
    cache = SourceCache()
    fill(cache, args.services, args.namespaces, args.source_every)
    settings = InjectionSettings()
    costs = []
    for parity in (0, 1):
        bodies = [review(i, args)[0] for i in range(parity, 2 * count, 2)]
        started = time.perf_counter()
        for body in bodies:
            parsed = parse_review(body)
            _, patch, warnings = decide(parsed, cache, settings)
            json.dumps(review_response(parsed.uid, patch, warnings))
        costs.append((time.perf_counter() - started) / count * 1000)
    return costs[0], costs[1]


def report(
    args: argparse.Namespace,
    phases: list[Phase],
    command: str,
    runtime: float,
    costs: tuple[float, float],
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    size = len(review(0, args)[0])
    sources = args.services // args.source_every
    return f"""# Webhook benchmark: admission latency and throughput

Command: `{command}`

- date: {now}
- nproc: {os.cpu_count()}
- kernel: {platform.release()}
- {versions()}
- load average at the end: {load}
- total runtime: {runtime:.0f} s

Setup: the webhook server (`WebhookServer`, uvloop) runs in its own process on 127.0.0.1,
its cache filled directly with {args.services:,} Services over {args.namespaces} namespaces,
every {args.source_every}th of them a source of an ExternalService ({sources:,} sources). The
load generator is another process on the same machine: aiohttp over HTTPS (certificate
verified by the Service's DNS name, as the API server does), a keep-alive pool of up to
{args.connections} connections, AdmissionReviews for Pod CREATEs ({size:,} bytes), half of
them selected (answered with the sidecar patch), half not (allowed, no patch); every answer
is checked. Open-loop phases schedule request *i* at `start + i/rate` whatever happened to
earlier ones; latency runs from sending to the answer, and "sender late" is how far behind
schedule requests were sent (timers have ~1 ms granularity; a large value would mean the
generator could not offer the load). {args.seconds:g} s per phase after a {args.warmup:g} s
warm-up at 100 req/s. Client and server share the {os.cpu_count()} CPUs.

{verdict(phases)}

{table(phases)}

Pure path in-process (parse the review, look the pod up in the cache, `admission_patch`,
encode the answer), per request: {costs[0]:.3f} ms for a selected pod (most of it
`jsonpatch.make_patch` inside `admission_patch`), {costs[1]:.3f} ms for one that no source
selects. The rest of the server's CPU per request is HTTP, JSON and TLS. CPU and median
latency per request are higher at 100 req/s than at 1,000 req/s; the likely reason (not
measured further) is that at 100 req/s every request wakes an idle process.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--source-every", type=int, default=5)
    parser.add_argument(
        "--rates", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000]
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 s phases, print only")
    parser.add_argument("--output", type=Path, help=f"default: {RESULTS} (not with --quick)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        from k8s_ext_connector.core.ssh import install_fast_event_loop

        install_fast_event_loop()
        asyncio.run(serve(args))
        return 0
    if args.quick:
        args.seconds, args.warmup = 2.0, 1.0
    output = args.output or (None if args.quick else RESULTS)
    command = shlex.join([".venv/bin/python", "bench/webhook.py", *(argv or sys.argv[1:])])
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="webhook-bench-") as workdir:
        ca = generate_ca("bench-ca", datetime.timedelta(hours=1))
        serving = issue_serving_cert(
            ca, service_dns_names(SERVICE, NAMESPACE), datetime.timedelta(hours=1)
        )
        write_pair(Path(workdir), serving)
        server = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                "--serve",
                "--tls-dir",
                workdir,
                "--services",
                str(args.services),
                "--namespaces",
                str(args.namespaces),
                "--source-every",
                str(args.source_every),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            phases = run_phases(port, ca.cert_pem, server.pid, args)
        finally:
            server.terminate()
            server.wait(10)
    runtime = time.monotonic() - started
    print(verdict(phases))
    print(table(phases))
    if output is not None:
        text = report(args, phases, command, runtime, compute_cost(args))
        previous = output.read_text() if output.exists() else ""
        if ANALYSIS in previous:  # a hand-written analysis is kept across reruns
            text += "\n" + previous[previous.index(ANALYSIS) :]
        output.write_text(text)
        print(f"wrote {output}")
    return 0


def run_phases(port: int, ca_pem: bytes, pid: int, args: argparse.Namespace) -> list[Phase]:
    from k8s_ext_connector.core.ssh import install_fast_event_loop

    install_fast_event_loop()  # the load generator needs the speed as much as the server
    return asyncio.run(drive(port, ca_pem, pid, args))


if __name__ == "__main__":
    sys.exit(main())
