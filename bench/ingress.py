"""Ingress benchmark: the external server to a pod, direct vs kernel DNAT+SNAT vs our relay.

Why one run on one lab (as in ``dataplane.py``): on a small box the figures move with
whatever else runs, so the three paths are measured back to back with the same client code,
the same pod server and the same namespaces, and the ratios are what to read.

Paths, all from the external server netns (203.0.113.10) to ``my-pod1``'s servers (HTTP on
80, a byte-counting sink on 9000; see ``lab/topology.py``):

- direct: the gateway netns routes (``Lab.enable_routing``) and the client dials the pod IP;
  the kernel baseline.
- kernel DNAT+SNAT: what the gateway could have done instead of relaying: nat PREROUTING
  DNAT ``203.0.113.201:<port>`` (from the target only) to the pod, masquerade towards the
  pod network, ip_forward=1. Measured, not shipped (docs/architecture.md, "Ingress").
- ours: the real gateway agent relays ``203.0.113.200:<port>`` to the source Service's
  ClusterIP, which the lab's "node" DNATs to the pod as kube-proxy would.

Every measurement is a separate client process in the external netns, running the workers
of ``bench/dataplane.py``. Everything lives in the lab's namespaces and is removed on exit.

Usage: ``.venv/bin/python bench/ingress.py [--size BYTES] [--repeat N] [--quick]``
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dataplane  # the sibling script (its directory is sys.path[0] when run as a script)

SCRIPT = Path(__file__).resolve()
DNAT_CHAIN = "LAB-BENCH-DNAT"


@dataclass
class Settings:
    size: int
    repeat: int
    latency_samples: int
    rate_seconds: float
    rate_concurrency: int


@dataclass
class PathResult:
    name: str
    throughput_mbs: float | None = None
    throughput_runs: list[float] = field(default_factory=list)
    cpu_s_per_gb: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rate: float | None = None
    clients_seen: list[str] = field(default_factory=list)  # by the pod, during this path
    errors: dict[str, Any] = field(default_factory=dict)


def measure(ns: str, name: str, host: str, http_port: int, sink_port: int,
            pids: list[int], settings: Settings) -> PathResult:
    result = PathResult(name)
    step = dataplane._step
    warm = dataplane.run_worker(ns, "burst", {"host": host, "port": http_port, "count": 20})
    if warm["errors"]:
        raise dataplane.BenchError(f"{name}: warm-up failed: {warm['errors']}")

    step(f"{name}: new-connection latency, {settings.latency_samples} sequential GETs")
    latency = dataplane.run_worker(ns, "latency", {"host": host, "port": http_port,
                                                   "samples": settings.latency_samples,
                                                   "warmup": 20})
    if latency["ms"]:
        result.p50_ms = dataplane.percentile(latency["ms"], 50)
        result.p99_ms = dataplane.percentile(latency["ms"], 99)
    if latency["errors"]:
        result.errors["latency"] = latency["errors"]

    step(f"{name}: new connections/s, {settings.rate_concurrency} clients for "
         f"{settings.rate_seconds:g}s")
    rate = dataplane.run_worker(ns, "rate", {"host": host, "port": http_port,
                                             "concurrency": settings.rate_concurrency,
                                             "seconds": settings.rate_seconds})
    result.rate = rate["ok"] / rate["elapsed"]
    if rate["errors"]:
        result.errors["rate"] = rate["errors"]

    step(f"{name}: throughput, {settings.repeat} x {settings.size:,} bytes")
    cpu_before = dataplane.cpu_seconds(pids) if pids else 0.0
    tput = dataplane.run_worker(ns, "throughput", {"host": host, "port": sink_port,
                                                   "size": settings.size,
                                                   "repeat": settings.repeat},
                                timeout=60 + settings.repeat * settings.size / 5e6)
    moved = settings.size * len(tput["seconds"]) / 1e9
    if pids and moved:
        result.cpu_s_per_gb = (dataplane.cpu_seconds(pids) - cpu_before) / moved
    result.throughput_runs = [settings.size / s / 1e6 for s in tput["seconds"]]
    if result.throughput_runs:
        result.throughput_mbs = statistics.median(result.throughput_runs)
    if tput["errors"]:
        result.errors["throughput"] = tput["errors"]
    return result


def kernel_dnat(lab: Any, source_ip: str, pod_ip: str, ports: tuple[int, ...]) -> None:
    """The alternative design, for comparison: DNAT from the target to the pod (the lab's
    emulated kube-proxy already masquerades DNATed connections towards the pod network)."""
    from k8s_ext_connector.core import iptables
    from k8s_ext_connector.lab.topology import EXTERNAL_SERVER_IP, NetnsIptables

    rules = tuple(
        f"-s {EXTERNAL_SERVER_IP}/32 -d {source_ip}/32 -p tcp -m tcp --dport {port} "
        f"-j DNAT --to-destination {pod_ip}:{port}"
        for port in ports
    )
    iptables.apply(NetnsIptables(lab.gw_ns), iptables.ChainSet(
        table="nat", chains={DNAT_CHAIN: rules},
        jumps=(iptables.Jump("PREROUTING", f"-d {source_ip}/32 -j {DNAT_CHAIN}"),),
        owned_prefix=DNAT_CHAIN))


def run_all(settings: Settings) -> list[PathResult]:
    from k8s_ext_connector.core.planner import SourceServiceFacts
    from k8s_ext_connector.lab.scenario import SERVICE1, SERVICE2, ScenarioKeys, plan_seed
    from k8s_ext_connector.lab.topology import (
        POD_HTTP_PORT,
        POD_SINK_PORT,
        SOURCE_IPS,
        SOURCE_SERVICE_IPS,
        Lab,
    )

    ports = (POD_HTTP_PORT, POD_SINK_PORT)
    with Lab.create(["my-pod1"]) as lab:
        pod = lab.pods["my-pod1"]
        dataplane._step("building the lab: pod server, emulated ClusterIP, gateway")
        lab.start_pod_server("my-pod1", sink=True)
        lab.emulate_cluster_ip(SOURCE_SERVICE_IPS[0], "my-pod1", ports)
        planned = plan_seed(ScenarioKeys.generate(), lab.host_key, source_services={
            SERVICE1: SourceServiceFacts(SOURCE_SERVICE_IPS[0], ports),
            SERVICE2: SourceServiceFacts(None),
        })
        gateway = lab.start_gateway(planned.gateway)
        for port in ports:
            lab.wait_tcp(lab.ext_ns, SOURCE_IPS[0], port, process=gateway)
        lab.enable_routing()  # direct and kernel DNAT need the node to forward
        kernel_dnat(lab, SOURCE_IPS[1], pod.ip, ports)

        paths = [("direct", pod.ip, []), ("kernel DNAT+SNAT", SOURCE_IPS[1], []),
                 ("ours (relay)", SOURCE_IPS[0], [gateway.popen.pid])]
        results = []
        for name, host, pids in paths:
            logged = len(lab.pod_server_log("my-pod1"))
            results.append(measure(lab.ext_ns, name, host, POD_HTTP_PORT, POD_SINK_PORT, pids,
                                   settings))
            results[-1].clients_seen = sorted(
                {str(r["client"]) for r in lab.pod_server_log("my-pod1")[logged:]})
        if not gateway.alive():
            raise dataplane.BenchError(f"gateway exited: {gateway.output()[-300:]}")
        return results


def table(results: list[PathResult], settings: Settings) -> list[list[str]]:
    direct, kernel, ours = results
    fmt = dataplane._fmt

    def row(label: str, values: list[float | None], digits: int) -> list[str]:
        ratio = (f"{values[2] / values[0]:.2f}x" if values[0] and values[2] else "-")
        return [label, *(fmt(v, digits) for v in values), ratio]

    size = (f"{settings.size / dataplane.GIB:g} GiB" if settings.size >= dataplane.GIB
            else f"{settings.size:,} B")
    return [
        ["metric", direct.name, kernel.name, ours.name, "ours÷direct"],
        row(f"throughput, MB/s (median of {settings.repeat} x {size})",
            [r.throughput_mbs for r in results], 0),
        row("gateway CPU seconds per GB", [r.cpu_s_per_gb for r in results], 2),
        row(f"new-connection latency p50, ms ({settings.latency_samples} sequential GETs)",
            [r.p50_ms for r in results], 2),
        row("new-connection latency p99, ms", [r.p99_ms for r in results], 2),
        row(f"new connections/s ({settings.rate_concurrency} clients, "
            f"{settings.rate_seconds:g} s)", [r.rate for r in results], 0),
        ["client address the pod sees", *(", ".join(r.clients_seen) for r in results), "-"],
    ]


def write_markdown(path: Path, command: str, env: dict[str, str], rows: list[list[str]],
                   results: list[PathResult], elapsed: float) -> None:
    runs = [f"- {r.name}: " + ", ".join(f"{v:,.0f}" for v in r.throughput_runs) + " MB/s"
            for r in results]
    errors = [f"- {r.name}: {r.errors}" for r in results if r.errors] or ["- none"]
    path.write_text("\n".join([
        "# Ingress benchmark: direct vs kernel DNAT+SNAT vs our relay",
        "",
        f"Command: `{command}`",
        "",
        *(f"- {key}: {value}" for key, value in env.items()),
        f"- total runtime: {elapsed:.0f} s",
        "",
        "All paths from the external server netns (203.0.113.10) to my-pod1's servers (HTTP on",
        "80, a byte-counting sink on 9000) in the namespace lab. direct = the gateway netns",
        "routes and the client dials the pod IP (the rig's ceiling); kernel DNAT+SNAT = nat",
        "PREROUTING DNAT of 203.0.113.201:<port> to the pod plus masquerade, ip_forward=1 (the",
        "design not chosen, measured for comparison); ours = the real gateway agent relays",
        "203.0.113.200:<port> to the source Service's ClusterIP (DNATed to the pod by the lab's",
        "emulated kube-proxy). Each measurement is a separate client process (the workers of",
        "bench/dataplane.py). Client, Python pod server and gateway share the same CPUs; the",
        "pod's Python HTTP server bounds the connection rate of every path. MB = 10^6 bytes.",
        "",
        dataplane.render_markdown(rows),
        "",
        "## Throughput runs",
        "",
        *runs,
        "",
        "## Errors",
        "",
        *errors,
        "",
    ]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, help="bytes per throughput run (default 1 GiB)")
    parser.add_argument("--repeat", type=int, help="throughput runs per path (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller everything (smoke run); writes ingress-quick.md")
    parser.add_argument("--output", type=Path, help="markdown report path")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("ingress.py: needs root (network namespaces, iptables)", file=sys.stderr)
        return 1
    settings = Settings(
        size=args.size or (256 << 20 if args.quick else dataplane.GIB),
        repeat=args.repeat or (1 if args.quick else 3),
        latency_samples=100 if args.quick else 500,
        rate_seconds=2 if args.quick else 5,
        rate_concurrency=64,
    )
    output = args.output or dataplane.RESULTS_DIR / (
        "ingress-quick.md" if args.quick else "ingress.md")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = dataplane.environment()
    started = time.monotonic()
    try:
        results = run_all(settings)
    except dataplane.BenchError as error:
        print(f"ingress.py: error: {error}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    rows = table(results, settings)
    print(dataplane.render_text(rows))
    for r in results:
        if r.errors:
            print(f"errors: {r.name}: {r.errors}")
    command = shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(
        os.getcwd()) else sys.executable, os.path.relpath(SCRIPT), *argv])
    write_markdown(output, command, env, rows, results, elapsed)
    print(f"\n[bench] done in {elapsed:.0f} s; wrote {os.path.relpath(output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
