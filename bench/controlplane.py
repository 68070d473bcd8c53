"""Control-plane benchmark: the real operator against the emulated API at 1,000 ExternalServices.

What it does, in order:

1. Starts the project's API emulator (``ApiServer().run_in_thread()``, in this process).
2. Seeds the world **directly into the emulator's store** (``create_object``: no HTTP, not
   recorded, no watch backlog cost for the operator beyond its initial lists): the CRD, the
   connector namespace ``external-services``, N namespaces, one source Service per source of
   each ExternalService and one pod behind each (as the webhook would have injected it: an
   ``ext-connector`` init container). The harness then plays the kubelet over HTTP: Ready
   gateway nodes labelled ``node-restriction.kubernetes.io/ext-connector-gateway=true``
   and each pod's status
   (Running, ready ``ext-connector`` init container status).
3. Starts the operator as a subprocess, exactly as deployed minus the Lease:
   ``python -m k8s_ext_connector operator --kubeconfig K --no-leader-election``, and waits for
   its first pass (gateway ConfigMap with every node's host key) and for quiet.
4. Creates the ExternalServices through the HTTP API as fast as it can (concurrent POSTs)
   and waits until every one has ``Ready=True`` (or the deadline). A listener on the
   emulator's store records the moment each one first turns Ready (exact, and cheap: polling
   with a deep-copying list of 1,000 objects took a quarter of the emulator's CPU).
5. Edits single ExternalServices at full scale (a merge PATCH adding a port) and measures the
   time from the PATCH to ``status.observedGeneration`` catching up, to Ready again, to quiet
   (the operator's last request) and to idle (its CPU at rest again: passes that write nothing
   count). Then annotates a few selected pods, an event that changes nothing the operator
   computes, and measures what that costs (time to idle, CPU, requests).
6. Kills the operator, stops the emulator (also on failure or Ctrl-C).

Measured: time to all Ready, operator RSS (VmHWM/VmRSS) and CPU, the operator's API requests
(user agents ``kopf/*`` and ``k8s-ext-connector/*``) per ExternalService by verb and by
resource, and list calls (the design says no list per reconcile: the kopf indexes are the
watch caches). The operator does not log its reconcile passes, so list calls are reported in
total (and per phase), not per pass.

``--profile DIR`` records py-spy profiles (raw collapsed stacks: operator start-up, ramp and
edits; this process, i.e. the emulator, during the ramp) and prints their top frames;
``.venv/bin/pip install py-spy`` first.

The emulator keeps a larger watch history than its default (``--history``): the real API
server sends bookmarks that keep a quiet watch's resourceVersion fresh, the emulator does not,
so with a small history a quiet watch (nodes) reconnecting after kopf's 300 s server timeout
would get 410 and re-list, an artefact of the emulator rather than of the operator.

Usage: ``.venv/bin/python bench/controlplane.py [--count 1000] [--namespaces 200] [--quick]``
(``--quick`` is 100 over 20 and prints only unless ``--output`` is given).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import ipaddress
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from k8s_ext_connector.core.api import GATEWAY_NODE_LABEL
from k8s_ext_connector_testbed.emulator import ApiServer, RecordedRequest
from k8s_ext_connector_testbed.emulator.store import WatchEvent

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
RESULTS = SCRIPT.parent / "results" / "controlplane.md"
CRD = ROOT / "charts" / "k8s-ext-connector" / "crds" / "externalservices.submariner.io.yaml"
CONNECTOR_NS = "external-services"
GATEWAY_LABEL = GATEWAY_NODE_LABEL[0]
GATEWAY_CM = "ext-connector-gateway"
HOST_KEYS_ANNOTATION = "ext-connector.submariner.io/host-keys"
ES = ("submariner.io", "v1alpha1", "externalservices")
ES_PATH = "/apis/submariner.io/v1alpha1/namespaces/{ns}/externalservices"
OPERATOR_AGENTS = ("kopf", "k8s-ext-connector")
MIB = 1024 * 1024
TARGET_READY_S = 60.0
ANALYSIS = "## Analysis"  # a hand-written section from this heading on is kept by reruns
TARGET_RSS_MIB = 250.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the world ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    namespace: str
    service: str
    source_ip: str

    @property
    def pod(self) -> str:
        return f"pod-{self.service}"


@dataclass(frozen=True)
class EsSpec:
    namespace: str
    name: str
    target_ip: str
    port: int
    sources: tuple[SourceSpec, ...]

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "submariner.io/v1alpha1",
            "kind": "ExternalService",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "targetIP": self.target_ip,
                "sources": [
                    {
                        "service": {"namespace": s.namespace, "name": s.service},
                        "sourceIP": s.source_ip,
                    }
                    for s in self.sources
                ],
                "ports": [{"protocol": "TCP", "port": self.port, "targetPort": self.port}],
            },
        }


def address_pool(first: Sequence[str], overflow: str) -> Iterator[str]:
    """Hosts of the documentation /24s first, then of a 10.x /16 (nothing is routed)."""
    for net in first:
        yield from (str(ip) for ip in ipaddress.ip_network(net).hosts())
    yield from (str(ip) for ip in ipaddress.ip_network(overflow).hosts())


def world(count: int, namespaces: int) -> list[EsSpec]:
    """ES i lives in namespace i % N; odd ones get a second source in the next namespace.

    Names are globally unique (the connector Service is ``<es name>`` in one namespace),
    every source Service and source IP is used once, every target IP once: no conflicts.
    """
    sources_ips = address_pool(("198.51.100.0/24", "203.0.113.0/24"), "10.200.0.0/16")
    target_ips = address_pool(("192.0.2.0/24",), "10.201.0.0/16")
    specs = []
    for i in range(count):
        ns = f"bench-{i % namespaces:03d}"
        sources = [SourceSpec(ns, f"src-{i:04d}-a", next(sources_ips))]
        if i % 2:
            other = f"bench-{(i + 1) % namespaces:03d}"
            sources.append(SourceSpec(other, f"src-{i:04d}-b", next(sources_ips)))
        specs.append(
            EsSpec(ns, f"es-{i:04d}", next(target_ips), 8000 + i % 7, tuple(sources))
        )
    return specs


def seed(api: ApiServer, specs: list[EsSpec], namespaces: int) -> None:
    """Bulk setup straight into the store (create_object): CRD, namespaces, Services, pods."""
    api.create_object(yaml.safe_load(CRD.read_text()))
    for ns in [CONNECTOR_NS, *(f"bench-{k:03d}" for k in range(namespaces))]:
        api.create_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for es in specs:
        for s in es.sources:
            api.create_object({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": s.service, "namespace": s.namespace},
                "spec": {"selector": {"app": s.service}, "ports": [{"port": 80}]},
            })
            # As the webhook injects it: the sidecar is a restartable init container.
            api.create_object({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": s.pod, "namespace": s.namespace, "labels": {"app": s.service}},
                "spec": {
                    "initContainers": [
                        {"name": "ext-connector", "image": "k8s-ext-connector",
                         "restartPolicy": "Always"}
                    ],
                    "containers": [{"name": "app", "image": "app"}],
                },
            })


# ---- HTTP (the user's and the kubelet's part) ------------------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: Any = None
    content_type: str = "application/json"


async def _run_calls(url: str, calls: Sequence[Call], concurrency: int, agent: str) -> list[str]:
    """Run ``calls`` with ``concurrency`` in flight; return the error of each failure."""
    errors: list[str] = []
    queue: asyncio.Queue[Call] = asyncio.Queue()
    for call in calls:
        queue.put_nowait(call)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        base_url=url, connector=connector, headers={"User-Agent": agent}
    ) as session:

        async def worker() -> None:
            while not queue.empty():
                call = queue.get_nowait()
                async with session.request(
                    call.method, call.path, json=call.body,
                    headers={"Content-Type": call.content_type},
                ) as response:
                    text = await response.text()
                    if response.status >= 300:
                        errors.append(f"{call.method} {call.path}: {response.status} {text[:200]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


def run_calls(url: str, calls: Sequence[Call], concurrency: int, agent: str) -> None:
    errors = asyncio.run(_run_calls(url, calls, concurrency, agent))
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, e.g. {errors[0]}")


def kubelet_calls(specs: list[EsSpec], nodes: int) -> tuple[list[Call], list[Call]]:
    """Node objects with Ready conditions, then every pod's status with a ready sidecar."""
    node_calls: list[Call] = []
    for k in range(1, nodes + 1):
        node_calls.append(Call("POST", "/api/v1/nodes", {
            "metadata": {"name": f"gw-{k}", "labels": {GATEWAY_LABEL: "true"}}}))
    status_calls = [
        Call("PATCH", f"/api/v1/nodes/gw-{k}/status",
             {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
             "application/merge-patch+json")
        for k in range(1, nodes + 1)
    ]
    for es in specs:
        for s in es.sources:
            status_calls.append(Call(
                "PATCH", f"/api/v1/namespaces/{s.namespace}/pods/{s.pod}/status",
                {"status": {
                    "phase": "Running",
                    "initContainerStatuses": [{"name": "ext-connector", "ready": True}],
                    "containerStatuses": [{"name": "app", "ready": True}],
                }},
                "application/merge-patch+json"))
    return node_calls, status_calls


# ---- observing ----------------------------------------------------------------------------


def condition(obj: dict[str, Any], kind: str) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return str(c.get("status"))
    return ""


def is_operator(r: RecordedRequest) -> bool:
    return r.user_agent.startswith(OPERATOR_AGENTS)


def operator_requests(api: ApiServer, start: int, end: int | None = None) -> list[RecordedRequest]:
    return [r for r in api.requests[start:end] if is_operator(r)]


@dataclass
class ProcStats:
    rss_kib: int = 0
    hwm_kib: int = 0
    cpu_s: float = 0.0


def read_proc(pid: int) -> ProcStats | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    values = dict(
        (line.split(":", 1)[0], line.split(":", 1)[1].split()[0])
        for line in status.splitlines()
        if line.startswith(("VmRSS", "VmHWM"))
    )
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return ProcStats(int(values.get("VmRSS", 0)), int(values.get("VmHWM", 0)), cpu)


@dataclass
class Sampler:
    """Samples the operator's RSS every ``interval`` seconds on a thread."""

    pid: int
    interval: float = 0.2
    max_rss_kib: int = 0
    last: ProcStats = field(default_factory=ProcStats)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> ProcStats:
        stats = read_proc(self.pid)
        if stats is not None:
            self.last = stats
            self.max_rss_kib = max(self.max_rss_kib, stats.rss_kib)
        return self.last


def self_cpu() -> float:
    times = os.times()
    return times.user + times.system


class RequestClock:
    """When each recorded request arrived (to 5 ms): the emulator records no times."""

    def __init__(self, api: ApiServer) -> None:
        self._api = api
        self.last_change = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="request-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen = len(self._api.requests)
        while not self._stop.wait(0.005):
            now = len(self._api.requests)
            if now != seen:
                seen, self.last_change = now, time.monotonic()

    def wait_quiet(self, quiet: float, timeout: float) -> tuple[float, int]:
        """Wait until no request arrives for ``quiet`` s; return (time of the last request,
        number of requests so far)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            count, last = len(self._api.requests), self.last_change
            if time.monotonic() - last >= quiet and count == len(self._api.requests):
                return last, count
            time.sleep(0.05)
        raise TimeoutError(f"requests kept coming for {timeout:.0f} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_idle(sampler: Sampler, window: float = 0.25, busy: float = 0.02, windows: int = 2,
              timeout: float = 120) -> float:
    """Wait for ``windows`` consecutive ``window``s in each of which the operator used less
    than ``busy`` CPU seconds; return when the first began. Passes that write nothing count
    as work, and two windows bridge kopf's batching and the reconciler's debounce."""
    deadline = time.monotonic() + timeout
    before, since = sampler.sample().cpu_s, time.monotonic()
    idle_since: float | None = None
    idle_windows = 0
    while time.monotonic() < deadline:
        time.sleep(window)
        now = sampler.sample().cpu_s
        if now - before < busy:
            idle_since = since if idle_since is None else idle_since
            idle_windows += 1
            if idle_windows >= windows:
                return idle_since
        else:
            idle_since, idle_windows = None, 0
        before, since = now, time.monotonic()
    raise TimeoutError(f"the operator stayed busy for {timeout:.0f} s")


def wait_for(what: Callable[[], object], timeout: float, describe: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {describe}")


class EsWatch:
    """Every ExternalService change as the store commits it: a store listener, so the times
    are exact and nothing is deep-copied or sent over HTTP (a deep-copying list of 1,000
    objects every 0.5 s took a quarter of the emulator's CPU). It runs on the emulator's
    thread under the store lock, so it only reads a few fields."""

    def __init__(self, api: ApiServer) -> None:
        rt = api.registry.lookup(*ES)
        if rt is None:
            raise RuntimeError("the ExternalService CRD is not served")
        self._api = api
        self.ready: set[str] = set()
        self.first_ready: dict[str, float] = {}
        self.generation_at: dict[tuple[str, int], float] = {}  # first observedGeneration=g
        self.ready_at: dict[tuple[str, int], float] = {}  # first Ready=True at that generation
        api.store.subscribe(self._event, None, rt)

    def _event(self, event: WatchEvent | None) -> None:
        if event is None or (event.group, event.plural) != (ES[0], ES[2]):
            return
        name = event.obj["metadata"]["name"]
        if event.type == "DELETED":
            self.ready.discard(name)
            return
        now = time.monotonic()
        observed = int((event.obj.get("status") or {}).get("observedGeneration") or 0)
        self.generation_at.setdefault((name, observed), now)
        if condition(event.obj, "Ready") == "True":
            self.ready.add(name)
            self.first_ready.setdefault(name, now)
            self.ready_at.setdefault((name, observed), now)
        else:
            self.ready.discard(name)

    def close(self) -> None:
        self._api.store.unsubscribe(self._event)


# ---- the run --------------------------------------------------------------------------------


@dataclass
class Edit:
    name: str
    observed_generation_s: float
    ready_s: float
    quiet_s: float  # the operator's last request for it
    idle_s: float  # the operator's CPU idle again (passes that write nothing count too)
    cpu_s: float
    requests: Counter[str]


@dataclass
class Touch:
    """An event that changes nothing the operator computes (an annotation on a pod)."""

    idle_s: float
    cpu_s: float
    requests: int


@dataclass
class Result:
    count: int
    namespaces: int
    nodes: int
    sources: int
    watched_at_start: dict[str, int] = field(default_factory=dict)
    seed_s: float = 0.0
    startup_s: float = 0.0
    startup_idle_s: float = 0.0
    startup_cpu_s: float = 0.0
    startup_requests: Counter[str] = field(default_factory=Counter)
    create_s: float = 0.0
    first_ready_s: float | None = None
    half_ready_s: float | None = None
    all_ready_s: float | None = None
    ready: int = 0
    deadline_s: float = 0.0
    quiet_s: float | None = None
    idle_s: float | None = None
    ramp_requests: list[RecordedRequest] = field(default_factory=list)
    timeline: list[tuple[float, int]] = field(default_factory=list)
    ramp_operator_cpu_s: float = 0.0
    ramp_bench_cpu_s: float = 0.0
    rss_ramp_peak_mib: float = 0.0
    rss_end_mib: float = 0.0
    hwm_end_mib: float = 0.0
    idle_rss_mib: float = 0.0
    edits: list[Edit] = field(default_factory=list)
    touches: list[Touch] = field(default_factory=list)
    log_warnings: list[str] = field(default_factory=list)
    log_lines: int = 0
    handler_success_lines: int = 0
    events_posted: int = 0
    lists_total: Counter[str] = field(default_factory=Counter)
    profiles: list[Path] = field(default_factory=list)


def start_operator(kubeconfig: Path, log: Path, level: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "k8s_ext_connector", "operator", "--kubeconfig",
             str(kubeconfig), "--no-leader-election", "--log-level", level],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
        )


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class Profiler:
    """``py-spy record`` (collapsed stacks) of named phases, if asked for and installed."""

    directory: Path | None
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)

    def start(self, name: str, pid: int) -> None:
        if self.directory is None:
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            print("py-spy not found, no profile (.venv/bin/pip install py-spy)", file=sys.stderr)
            self.directory = None
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / f"{name}.txt"
        self.running[name] = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
             "--nonblocking", "--output", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.written.append(out)

    def stop(self, *names: str) -> None:
        """py-spy writes its output on SIGINT (Ctrl-C), not on SIGTERM."""
        for name in names or tuple(self.running):
            process = self.running.pop(name, None)
            if process is not None:
                stop_process(process, signal.SIGINT)


def request_counter(requests: list[RecordedRequest]) -> Counter[str]:
    return Counter(
        f"{r.verb} {r.resource or 'non-resource'}{'/' + r.subresource if r.subresource else ''}"
        for r in requests
    )


def edit_one(
    api: ApiServer, clock: RequestClock, watch: EsWatch, sampler: Sampler, spec: EsSpec, port: int
) -> Edit:
    """Add a port to one ExternalService: time observedGeneration, Ready, quiet and idle."""
    clock.wait_quiet(1.0, 60)
    wait_idle(sampler)
    before = api.get_object(*ES, spec.namespace, spec.name)
    assert before is not None
    generation = int(before["metadata"]["generation"]) + 1
    ports = [*before["spec"]["ports"], {"protocol": "TCP", "port": port, "targetPort": port}]
    start_index, cpu0 = len(api.requests), sampler.sample().cpu_s
    t0 = time.monotonic()
    run_calls(api.url, [Call("PATCH", f"{ES_PATH.format(ns=spec.namespace)}/{spec.name}",
                             {"spec": {"ports": ports}}, "application/merge-patch+json")],
              1, "bench-user")
    key = (spec.name, generation)
    wait_for(lambda: key in watch.ready_at, 60, f"{spec.name} Ready at generation {generation}",
             step=0.005)
    idle = wait_idle(sampler)
    cpu = sampler.sample().cpu_s - cpu0
    last, end_index = clock.wait_quiet(1.0, 60)
    return Edit(
        spec.name,
        watch.generation_at[key] - t0,
        watch.ready_at[key] - t0,
        max(0.0, last - t0),
        max(0.0, idle - t0),
        cpu,
        request_counter(operator_requests(api, start_index, end_index)),
    )


def touch_pod(
    api: ApiServer, clock: RequestClock, sampler: Sampler, source: SourceSpec, k: int
) -> Touch:
    """An annotation on a selected pod: a watch event that changes nothing the operator
    computes (its record keeps labels, sidecar and readiness). Time to CPU idle again."""
    clock.wait_quiet(1.0, 60)
    wait_idle(sampler)
    start_index, cpu0 = len(api.requests), sampler.sample().cpu_s
    t0 = time.monotonic()
    run_calls(api.url, [Call(
        "PATCH", f"/api/v1/namespaces/{source.namespace}/pods/{source.pod}",
        {"metadata": {"annotations": {"bench.example/touched": str(k)}}},
        "application/merge-patch+json")], 1, "bench-user")
    idle = wait_idle(sampler)
    cpu = sampler.sample().cpu_s - cpu0
    return Touch(max(0.0, idle - t0), cpu, len(operator_requests(api, start_index)))


def run(args: argparse.Namespace, workdir: Path) -> Result:
    specs = world(args.count, args.namespaces)
    result = Result(args.count, args.namespaces, args.nodes, sum(len(s.sources) for s in specs))
    api = ApiServer(history=args.history)
    with api.run_in_thread():
        kubeconfig = api.write_kubeconfig(workdir / "kubeconfig")
        t = time.monotonic()
        seed(api, specs, args.namespaces)
        node_calls, status_calls = kubelet_calls(specs, args.nodes)
        run_calls(api.url, node_calls, 4, "bench-kubelet")
        run_calls(api.url, status_calls, 32, "bench-kubelet")
        result.seed_s = time.monotonic() - t
        result.watched_at_start = {
            plural: len(api.list_objects("", "v1", plural))
            for plural in ("services", "pods", "nodes")
        }
        print(f"seeded {result.sources} source Services/pods over {args.namespaces} namespaces, "
              f"{args.nodes} gateway nodes in {result.seed_s:.1f} s", flush=True)

        watch = EsWatch(api)
        clock = RequestClock(api)
        log = workdir / "operator.log"
        start_index = len(api.requests)
        t = time.monotonic()
        operator = start_operator(kubeconfig, log, args.log_level)
        profiler = Profiler(args.profile)
        profiler.start("operator-startup", operator.pid)
        try:
            with Sampler(operator.pid) as sampler:

                def first_pass() -> bool:
                    if operator.poll() is not None:
                        raise RuntimeError(f"operator exited: {log.read_text()[-3000:]}")
                    cm = api.get_object("", "v1", "configmaps", CONNECTOR_NS, GATEWAY_CM) or {}
                    keys = (cm.get("metadata", {}).get("annotations") or {}).get(
                        HOST_KEYS_ANNOTATION, "")
                    return all(f'"gw-{k}"' in keys for k in range(1, args.nodes + 1))

                wait_for(first_pass, 300, "the operator's first pass")
                result.startup_s = time.monotonic() - t
                result.startup_idle_s = wait_idle(sampler) - t
                last, ramp_index = clock.wait_quiet(1.0, 60)
                result.startup_cpu_s = sampler.sample().cpu_s
                result.startup_requests = request_counter(
                    operator_requests(api, start_index, ramp_index))
                result.idle_rss_mib = sampler.sample().rss_kib / 1024
                print(f"operator: first pass {result.startup_s:.1f} s after start, CPU idle "
                      f"after {result.startup_idle_s:.1f} s (RSS {result.idle_rss_mib:.0f} MiB)",
                      flush=True)
                profiler.stop("operator-startup")
                profiler.start("operator-ramp", operator.pid)
                profiler.start("emulator-ramp", os.getpid())

                cpu0, bench0 = sampler.sample().cpu_s, self_cpu()
                creates = [
                    Call("POST", ES_PATH.format(ns=s.namespace), s.manifest()) for s in specs
                ]
                t0 = time.monotonic()
                run_calls(api.url, creates, args.concurrency, "bench-user")
                result.create_s = time.monotonic() - t0
                print(f"created {args.count} ExternalServices in {result.create_s:.1f} s",
                      flush=True)

                result.deadline_s = args.deadline
                total, reported = args.count, 0.0
                while len(watch.ready) < total:
                    now = time.monotonic() - t0
                    if now > args.deadline or operator.poll() is not None:
                        break
                    if now - reported >= 10:
                        reported = now
                        print(f"  {now:6.1f} s: {len(watch.ready)}/{total} Ready, RSS "
                              f"{sampler.last.rss_kib / 1024:.0f} MiB", flush=True)
                    time.sleep(0.1)
                result.ready = len(watch.ready)
                times = sorted(v - t0 for v in watch.first_ready.values())
                result.timeline = [(v, i + 1) for i, v in enumerate(times)]
                if times:
                    result.first_ready_s = times[0]
                if len(times) * 2 >= total:
                    result.half_ready_s = times[(total + 1) // 2 - 1]
                if result.ready == total:
                    result.all_ready_s = times[-1]
                print(f"Ready: {result.ready}/{total} after "
                      f"{fmt_s(result.all_ready_s or time.monotonic() - t0)}", flush=True)
                if operator.poll() is None:
                    result.idle_s = wait_idle(sampler) - t0
                last, end_index = clock.wait_quiet(2.0, 120)
                result.quiet_s = last - t0
                result.ramp_requests = operator_requests(api, ramp_index, end_index)
                result.ramp_operator_cpu_s = sampler.sample().cpu_s - cpu0
                result.ramp_bench_cpu_s = self_cpu() - bench0
                result.rss_ramp_peak_mib = sampler.max_rss_kib / 1024
                profiler.stop()

                if result.all_ready_s is not None and operator.poll() is None:
                    profiler.start("operator-edits", operator.pid)
                    picks = sorted({args.count // 4, args.count // 2, (3 * args.count) // 4})
                    for k, i in enumerate(picks):
                        edit = edit_one(api, clock, watch, sampler, specs[i], 9100 + k)
                        result.edits.append(edit)
                        print(f"edit {edit.name}: observedGeneration "
                              f"{edit.observed_generation_s:.2f} s, Ready {edit.ready_s:.2f} s, "
                              f"quiet {edit.quiet_s:.2f} s, idle {edit.idle_s:.2f} s, "
                              f"CPU {edit.cpu_s:.2f} s", flush=True)
                    for k, i in enumerate(picks):
                        touch = touch_pod(api, clock, sampler, specs[i].sources[0], k)
                        result.touches.append(touch)
                        print(f"pod annotation: idle after {touch.idle_s:.2f} s, CPU "
                              f"{touch.cpu_s:.2f} s, {touch.requests} requests", flush=True)

                end = sampler.sample()
                result.rss_end_mib = end.rss_kib / 1024
                result.hwm_end_mib = end.hwm_kib / 1024
                everything = operator_requests(api, start_index)
                result.events_posted = sum(
                    1 for r in everything if r.resource == "events" and r.verb == "create")
                result.lists_total = Counter(r.resource for r in everything if r.verb == "list")
        finally:
            watch.close()
            clock.close()
            profiler.stop()
            result.profiles = [p for p in profiler.written if p.exists()]
            stop_process(operator)
        text = log.read_text(errors="replace")
        lines = text.splitlines()
        result.log_lines = len(lines)
        result.handler_success_lines = sum(1 for line in lines if "succeeded." in line)
        result.log_warnings = [line for line in lines if " WARNING " in line or " ERROR " in line]
        if args.keep:
            print(f"operator log: {log}")
    return result


# ---- reporting --------------------------------------------------------------------------------


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(args: argparse.Namespace, result: Result, command: str, started: float) -> str:
    n = result.count
    ramp = result.ramp_requests
    lists = [r for r in ramp if r.verb == "list"]
    watches = [r for r in ramp if r.verb == "watch"]
    by_verb = Counter(r.verb for r in ramp)
    by_resource = Counter(
        (r.verb, r.resource + (f"/{r.subresource}" if r.subresource else "") or "non-resource")
        for r in ramp
    )
    all_ready = result.all_ready_s
    all_ready_text = (
        fmt_s(all_ready)
        if all_ready is not None
        else f"not reached: {result.ready}/{n} Ready after {result.deadline_s:.0f} s"
    )
    peak = max(result.rss_ramp_peak_mib, result.hwm_end_mib)
    start_lists = sum(v for k, v in result.startup_requests.items() if k.startswith("list "))
    watched = ", ".join(f"{v} {k}" for k, v in result.watched_at_start.items())
    lines = [
        "# Control-plane benchmark: the operator at scale against the API emulator",
        "",
        f"Command: `{command}`",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"- nproc: {os.cpu_count()}",
        f"- python: {platform.python_version()}",
        f"- kopf: {importlib.metadata.version('kopf')}, aiohttp: "
        f"{importlib.metadata.version('aiohttp')}",
        f"- git: {git_state()}",
        f"- load average at start: {args.load_at_start}",
        f"- total runtime: {time.monotonic() - started:.0f} s",
        "",
        f"World: {n} ExternalServices over {result.namespaces} namespaces, {result.sources} "
        "sources (one source Service + one pod each; odd ExternalServices have a second "
        f"source in the next namespace), {result.nodes} Ready gateway nodes. The CRD, "
        "namespaces, Services and pods are seeded with `create_object` straight into the "
        "emulator's store (bulk setup, not measured, not recorded); the node objects and every "
        "node and pod status (Running, ready `ext-connector` init container) go over HTTP as "
        "the kubelet would send them. The ExternalServices are POSTed over HTTP "
        f"({args.concurrency} in flight). The emulator runs on a thread of the benchmark "
        "process (one GIL with the benchmark's HTTP client); watch history "
        f"{args.history} events. Ready times are exact: a store listener records each "
        "ExternalService's first Ready=True as it is written. \"idle\" = the start of the "
        "first 0.5 s in which the operator used < 20 ms CPU per 0.25 s (so passes that write "
        "nothing count); \"quiet\" = its last API request (5 ms resolution).",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        f"| seed (setup, not measured) | {result.seed_s:.1f} s | |",
        f"| operator start: first pass / CPU idle | {result.startup_s:.1f} s / "
        f"{result.startup_idle_s:.1f} s ({result.startup_cpu_s:.1f} s CPU; watches {watched}) "
        "| |",
        f"| POST {n} ExternalServices | {result.create_s:.1f} s | |",
        f"| first Ready=True (from the first POST) | {fmt_s(result.first_ready_s)} | |",
        f"| half Ready | {fmt_s(result.half_ready_s)} | |",
        f"| **all {n} Ready** | {all_ready_text} | < {TARGET_READY_S:.0f} s: "
        f"{verdict(all_ready is not None and all_ready < TARGET_READY_S)} |",
        f"| operator quiet / idle after the ramp | {fmt_s(result.quiet_s)} / "
        f"{fmt_s(result.idle_s)} | |",
        f"| operator CPU during the ramp | {result.ramp_operator_cpu_s:.1f} s | |",
        f"| benchmark+emulator CPU during the ramp | {result.ramp_bench_cpu_s:.1f} s | |",
        f"| operator RSS idle before the ramp | {result.idle_rss_mib:.0f} MiB | |",
        f"| **operator RSS peak** (VmHWM; VmRSS sampled every 0.2 s) | {peak:.0f} MiB | "
        f"< {TARGET_RSS_MIB:.0f} MiB: {verdict(peak < TARGET_RSS_MIB)} |",
        f"| operator RSS at the end (VmRSS) | {result.rss_end_mib:.0f} MiB | |",
        f"| operator requests during the ramp | {len(ramp)} ({len(ramp) / n:.1f} per ES) | |",
        f"| per ES by verb | {per_es(by_verb, n)} | |",
        f"| **list calls** after start-up (ramp) | {len(lists)} "
        f"({', '.join(f'{k} {v}' for k, v in Counter(r.resource for r in lists).items()) or '-'})"
        f" | O(1) per reconcile: {verdict(not lists)} |",
        f"| list calls at operator start | {start_lists} (one per watched resource) | |",
        f"| list calls, whole run (start-up, ramp, edits, no-op events) | "
        f"{sum(result.lists_total.values())} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(result.lists_total.items()))}) | |",
        f"| watch (re)connects during the ramp | {len(watches)} | |",
        f"| Events posted (whole run) | {result.events_posted} | |",
    ]
    if result.edits:
        og = [e.observed_generation_s for e in result.edits]
        lines += [
            f"| **single edit at {n}**: PATCH to observedGeneration (median of {len(og)}) | "
            f"{statistics.median(og):.2f} s ({', '.join(f'{v:.2f}' for v in og)}) | |",
            "| single edit: PATCH to Ready / quiet / idle | "
            + "; ".join(f"{e.ready_s:.2f} / {e.quiet_s:.2f} / {e.idle_s:.2f} s"
                        for e in result.edits) + " | |",
            "| single edit: operator CPU | "
            + ", ".join(f"{e.cpu_s:.2f} s" for e in result.edits) + " | |",
            "| single edit: operator requests | "
            + "; ".join(", ".join(f"{k} {v}" for k, v in sorted(e.requests.items()))
                        for e in result.edits) + " | |",
        ]
    if result.touches:
        lines.append(
            "| no-op event (annotate a selected pod): to idle / CPU / requests | "
            + "; ".join(f"{t.idle_s:.2f} s / {t.cpu_s:.2f} s / {t.requests}"
                        for t in result.touches) + " | |"
        )
    lines += [
        f"| operator log lines (whole run) | {result.log_lines}, of which "
        f"{result.handler_success_lines} \"Handler ... succeeded.\" | |",
        "",
        "The operator does not log its reconcile passes, so list calls are reported in total: "
        "after one list per watched resource at start-up there were none, whatever the number "
        "of passes (the kopf indexes are the caches).",
        "",
        "Operator requests during the ramp (from the first POST until 2 s without requests), "
        "by verb and resource:",
        "",
        "| verb | resource | calls | per ES |",
        "|---|---|---|---|",
        *(
            f"| {verb} | {resource} | {calls} | {calls / n:.2f} |"
            for (verb, resource), calls in sorted(by_resource.items(), key=lambda kv: -kv[1])
        ),
        "",
        "Operator requests at start-up (before the first POST): "
        + ", ".join(f"{k} {v}" for k, v in sorted(result.startup_requests.items())),
        "",
        "Time from the first POST until N ExternalServices were Ready: "
        + ", ".join(f"{r}: {t:.1f} s" for t, r in milestones(result.timeline, n)),
        "",
    ]
    if result.log_warnings:
        lines += [
            f"Operator log: {len(result.log_warnings)} WARNING/ERROR lines, e.g.:",
            "",
            "```",
            *(w[:300] for w in result.log_warnings[:5]),
            "```",
            "",
        ]
    else:
        lines += ["Operator log: no WARNING/ERROR lines.", ""]
    return "\n".join(lines)


def per_es(counter: Counter[str], n: int) -> str:
    return ", ".join(f"{verb} {calls / n:.2f}" for verb, calls in counter.most_common())


def milestones(points: list[tuple[float, int]], total: int) -> list[tuple[float, int]]:
    """(time, count) when 1, 10%, 25%, 50%, 75%, 90% and all were Ready."""
    wanted = sorted({1, *(max(1, total * p // 100) for p in (10, 25, 50, 75, 90, 100))})
    return [points[k - 1] for k in wanted if k <= len(points)]


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"{head}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def top_frames(path: Path, keep: int = 12) -> str:
    """Summarise a py-spy raw (collapsed) profile: leaf functions and our own frames."""
    leaf: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        leaf[frames[-1]] += samples
        for frame in set(frames):
            if "k8s_ext_connector" in frame or "kopf" in frame:
                ours[frame] += samples
    if not total:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples", "  top leaf frames:"]
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in leaf.most_common(keep)]
    out += ["  inclusive, k8s_ext_connector/kopf frames:"]
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in ours.most_common(keep)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1000, help="ExternalServices")
    parser.add_argument("--namespaces", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=3, help="Ready gateway nodes")
    parser.add_argument("--quick", action="store_true", help="100 over 20, print only")
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="seconds to wait for all Ready")
    parser.add_argument("--concurrency", type=int, default=32, help="POSTs in flight")
    parser.add_argument("--history", type=int, default=200_000, help="emulator watch history")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument("--output", type=Path, help=f"results file (default {RESULTS} "
                        "unless --quick)")
    parser.add_argument("--profile", type=Path,
                        help="directory for py-spy raw profiles (operator start-up, ramp and "
                        "edits; this process, i.e. the emulator, during the ramp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.namespaces = 100, 20
    output = args.output or (None if args.quick else RESULTS)
    args.load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    command = shlex.join([str(python), *sys.argv])
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-controlplane-"))
    try:
        result = run(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(args, result, command, started)
    print()
    print(text)
    for profile in result.profiles:
        print(top_frames(profile))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        kept = ""
        if output.exists() and ANALYSIS in (old := output.read_text()):
            kept = "\n" + old[old.index(ANALYSIS):]  # the hand-written part survives a rerun
        output.write_text(text + kept)
        print(f"written to {output}")
    return 0 if result.all_ready_s is not None else 1


if __name__ == "__main__":
    sys.exit(main())
