"""Data-plane benchmark: direct routing vs OpenSSH ``-L`` vs our sidecar+gateway, one run.

Why one run on one lab: the design's targets are relative (throughput >= OpenSSH on the same
path, latency added over the kernel path), and on a 2 vCPU box the figures move with
whatever else runs. Measuring the three paths back to back, with the same client code, the
same external server and the same namespaces, keeps the ratios honest.

Paths, all from one pod netns to the external server (see ``lab/topology.py``):

- direct: the gateway netns routes (``Lab.enable_routing``); the kernel baseline.
- OpenSSH: ``sshd`` in the gateway netns on a source IP, ``ssh -N -L`` in the pod, aes128-gcm.
- ours: the real gateway and sidecar agents as ``lab/main.py`` starts them; the client
  connects to the ExternalService's ClusterIP and iptables redirects it to the sidecar.

Every measurement runs in a separate client process inside the pod netns (``ip netns exec``),
so the measuring process never shares a GIL with the load. OpenSSH's latency is also taken
through an interactive ``ssh -tt`` session: only that one sets TCP_NODELAY, and with ``-N``
Nagle plus delayed ACKs add ~40 ms per small response (the "-N" row is not a fair bar).

Everything started here lives in the lab's namespaces and is removed on exit, failure or
Ctrl-C (``/run/sshd`` too, when this run created it).

Usage: ``.venv/bin/python bench/dataplane.py [--size BYTES] [--repeat N] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from k8s_ext_connector.lab.topology import Lab, Process

SCRIPT = Path(__file__).resolve()
RESULTS_DIR = SCRIPT.parent / "results"
GIB = 1 << 30
HTTP_PORT = 8000
SSH_PORT = 2222
SSH_LOCAL_SINK = 19000  # ssh -L listeners inside the pod netns
SSH_LOCAL_HTTP = 18000
SSH_LOCAL_HTTP_TTY = 28000
SSHD_RUN_DIR = Path("/run/sshd")  # sshd's privilege-separation chroot; must exist
REQUEST = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
NOFILE = 20_000
# What sshd logs for the readiness probe (connect, then close before the SSH banner).
PROBE_NOISE = "kex_exchange_identification: Connection closed by remote host"


# ---- client workers (run inside the pod netns, one process per measurement) ----------------


def _status_ok(response: bytes) -> bool:
    return b" 200 " in response.split(b"\r\n", 1)[0] + b" "


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def worker_throughput(host: str, port: int, size: int, repeat: int) -> dict[str, Any]:
    """One connection per run: push ``size`` bytes to the sink, wait for its byte count."""
    block = memoryview(bytes(4 << 20))
    seconds: list[float] = []
    errors: list[str] = []
    for _ in range(repeat):
        started = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=120) as sock:
                remaining = size
                while remaining:
                    n = min(len(block), remaining)
                    sock.sendall(block[:n])
                    remaining -= n
                sock.shutdown(socket.SHUT_WR)
                answer = _recv_all(sock)
        except OSError as error:
            errors.append(type(error).__name__)
            continue
        elapsed = time.perf_counter() - started
        if answer.strip() != str(size).encode():
            errors.append(f"sink counted {answer.strip()[:20]!r}")
            continue
        seconds.append(elapsed)
    return {"seconds": seconds, "errors": errors}


def worker_latency(host: str, port: int, samples: int, warmup: int) -> dict[str, Any]:
    """Sequential connect + GET + full response + close, timed one by one."""
    millis: list[float] = []
    errors: Counter[str] = Counter()
    for index in range(warmup + samples):
        started = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(REQUEST)
                response = _recv_all(sock)
            ok = _status_ok(response)
            kind = "bad response"
        except OSError as error:
            ok, kind = False, type(error).__name__
        elapsed = (time.perf_counter() - started) * 1000
        if index < warmup:
            continue
        if ok:
            millis.append(elapsed)
        else:
            errors[kind] += 1
    return {"ms": millis, "errors": dict(errors)}


class _Get(asyncio.Protocol):
    """Minimal HTTP/1.0 GET as a protocol: less client CPU than streams, so the client is
    less likely to be what limits the connection rate."""

    def __init__(self, done: asyncio.Future[bytes]) -> None:
        self._done = done
        self._chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done.done():
            return
        if exc is None:
            self._done.set_result(b"".join(self._chunks))
        else:
            self._done.set_exception(exc)


async def _one_get(host: str, port: int, timeout: float) -> str | None:
    """None when a full 200 response came back, else the kind of error."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: _Get(done), host, port), timeout)
    except (OSError, TimeoutError) as error:
        return type(error).__name__
    try:
        response = await asyncio.wait_for(done, timeout)
    except (OSError, TimeoutError) as error:
        transport.abort()
        return type(error).__name__
    return None if _status_ok(response) else "bad response"


async def _rate(host: str, port: int, concurrency: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    ok = 0
    errors: Counter[str] = Counter()

    async def client() -> None:
        nonlocal ok
        while loop.time() < deadline:
            error = await _one_get(host, port, 10)
            if error is None:
                ok += 1
            else:
                errors[error] += 1

    started = loop.time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"ok": ok, "errors": dict(errors), "elapsed": loop.time() - started}


async def _burst(host: str, port: int, count: int) -> dict[str, Any]:
    outcomes = await asyncio.gather(*(_one_get(host, port, 30) for _ in range(count)))
    errors = Counter(o for o in outcomes if o is not None)
    return {"ok": count - sum(errors.values()), "errors": dict(errors)}


def _run_async(coroutine: Any) -> dict[str, Any]:
    """uvloop when installed, on every path alike (the client should not be the limit)."""
    try:
        import uvloop
    except ImportError:
        return cast(dict[str, Any], asyncio.run(coroutine))
    return cast(dict[str, Any], uvloop.run(coroutine))


def worker_hold(host: str, port: int, count: int) -> None:
    """Open ``count`` sink connections, report, wait for a line on stdin, then prove each
    one is live end to end (1 byte in, byte count ``1`` back) and report errors."""
    sockets: list[socket.socket] = []
    open_errors: Counter[str] = Counter()
    started = time.perf_counter()
    for _ in range(count):
        try:
            sockets.append(socket.create_connection((host, port), timeout=10))
        except OSError as error:
            open_errors[type(error).__name__] += 1
    print(json.dumps({"opened": len(sockets), "errors": dict(open_errors),
                      "seconds": time.perf_counter() - started}), flush=True)
    sys.stdin.readline()
    errors: Counter[str] = Counter(open_errors)
    live: list[socket.socket] = []
    for sock in sockets:
        try:
            sock.settimeout(30)
            sock.sendall(b"x")
            sock.shutdown(socket.SHUT_WR)
            live.append(sock)
        except OSError as error:
            errors[f"send: {type(error).__name__}"] += 1
            sock.close()
    ok = 0
    for sock in live:
        try:
            answer = _recv_all(sock)
            if answer.strip() == b"1":
                ok += 1
            else:
                errors[f"answer {answer.strip()[:10]!r}"] += 1
        except OSError as error:
            errors[f"recv: {type(error).__name__}"] += 1
        finally:
            sock.close()
    print(json.dumps({"ok": ok, "errors": dict(errors)}), flush=True)


def worker_main(kind: str, params: dict[str, Any]) -> None:
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    host, port = str(params["host"]), int(params["port"])
    result: dict[str, Any]
    if kind == "throughput":
        result = worker_throughput(host, port, int(params["size"]), int(params["repeat"]))
    elif kind == "latency":
        result = worker_latency(host, port, int(params["samples"]), int(params["warmup"]))
    elif kind == "rate":
        result = _run_async(_rate(host, port, int(params["concurrency"]),
                                  float(params["seconds"])))
    elif kind == "burst":
        result = _run_async(_burst(host, port, int(params["count"])))
    elif kind == "hold":
        worker_hold(host, port, int(params["count"]))
        return
    else:
        raise SystemExit(f"unknown worker {kind}")
    print(json.dumps(result), flush=True)


# ---- the measuring side ----------------------------------------------------------------


class BenchError(RuntimeError):
    pass


def _step(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _worker_argv(ns: str, kind: str, params: dict[str, Any]) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, str(SCRIPT), "_worker", kind,
            json.dumps(params)]


def run_worker(ns: str, kind: str, params: dict[str, Any], timeout: float = 300) -> Any:
    result = subprocess.run(_worker_argv(ns, kind, params), capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        raise BenchError(f"{kind} worker failed ({result.returncode}): {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _proc_status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def rss_kb(pids: list[int]) -> int:
    return sum(_proc_status_kb(pid, "VmRSS") for pid in pids)


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of the processes themselves (fields 14, 15 of /proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def open_fds(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def pids_named(ns: str, comm: str) -> list[int]:
    from k8s_ext_connector.lab import netns

    found = []
    for pid in netns.pids_in(ns):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                found.append(pid)
    return found


def established_to(ns: str, port: int) -> int:
    from k8s_ext_connector.lab import netns

    out = netns.sh(["ip", "netns", "exec", ns, "ss", "-Htn", "state", "established",
                    f"( sport = :{port} )"]).stdout
    return len(out.splitlines())


def listen_overflows(namespaces: list[str]) -> dict[str, int]:
    """TcpExt ListenOverflows per netns: SYNs dropped because an accept queue was full, which
    turns into 1 s, 3 s, ... connect delays (ssh listens with a backlog of 128)."""
    from k8s_ext_connector.lab import netns

    counts = {}
    for ns in namespaces:
        lines = netns.sh(["ip", "netns", "exec", ns, "cat", "/proc/net/netstat"]).stdout
        header, values = [line.split() for line in lines.splitlines()
                          if line.startswith("TcpExt:")][:2]
        counts[ns] = int(dict(zip(header, values, strict=True))["ListenOverflows"])
    return counts


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


@dataclass
class Settings:
    size: int
    repeat: int
    latency_samples: int
    rate_seconds: float
    rate_concurrency: int
    idle_connections: int
    burst: int


@dataclass
class Endpoints:
    """Where the pod's client connects for one path, and which processes carry it."""

    name: str
    sink: tuple[str, int]
    http: tuple[str, int]
    tunnel_pids: Callable[[], list[int]] | None  # None: the kernel alone (direct)


@dataclass
class PathResult:
    name: str
    throughput_mbs: float | None = None
    throughput_runs: list[float] = field(default_factory=list)
    throughput_errors: list[str] = field(default_factory=list)
    cpu_s_per_gb: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    tty_p50_ms: float | None = None  # OpenSSH only: interactive session, TCP_NODELAY
    tty_p99_ms: float | None = None
    latency_errors: int = 0
    rate: float | None = None
    rate_errors: int = 0
    rss_per_1000_mb: float | None = None
    held_seconds: float | None = None
    held_errors: int = 0
    fds_leaked: int | None = None
    burst_errors: int = 0
    notes: list[str] = field(default_factory=list)


def measure_held(ns: str, ext_ns: str, path: Endpoints, n: int, result: PathResult) -> None:
    """Hold ``n`` idle sink connections; take the tunnel's RSS once all of them have reached
    the server (counted there with ss), then check each one still carries data."""
    from k8s_ext_connector.lab.topology import SINK_PORT

    pids = path.tunnel_pids() if path.tunnel_pids else []
    before = rss_kb(pids) if pids else 0
    hold = subprocess.Popen(_worker_argv(ns, "hold", {"host": path.sink[0], "port": path.sink[1],
                                                      "count": n}),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout is not None
        assert hold.stdin is not None
        opened = json.loads(hold.stdout.readline() or "{}")
        if "opened" not in opened:
            raise BenchError(f"{path.name}: hold worker died")
        started = time.monotonic()
        count, last_change, last = 0, started, -1
        while time.monotonic() - started < 60:
            count = established_to(ext_ns, SINK_PORT)
            if count >= opened["opened"]:
                break
            if count != last:
                last, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > 5:
                break
            time.sleep(0.05)
        result.held_seconds = opened["seconds"] + time.monotonic() - started
        if count < opened["opened"]:
            result.notes.append(f"only {count} of {opened['opened']} held connections reached "
                                "the server")
        time.sleep(0.5)
        if pids:
            pids = path.tunnel_pids() if path.tunnel_pids else []
            result.rss_per_1000_mb = (rss_kb(pids) - before) / 1024 * 1000 / n
        hold.stdin.write("go\n")
        hold.stdin.flush()
        final = json.loads(hold.stdout.readline() or "{}")
        hold.wait(60)
    finally:
        if hold.poll() is None:
            hold.kill()
            hold.wait()
    if "ok" not in final:
        raise BenchError(f"{path.name}: hold worker gave no result")
    result.held_errors = sum(final["errors"].values())
    if final["errors"]:
        result.notes.append(f"held connections: {final['errors']}")


def measure(ns: str, ext_ns: str, path: Endpoints, settings: Settings) -> PathResult:
    """All figures for one path, in an order that keeps RSS from earlier phases out of the
    memory figure (throughput, which grows buffers, comes last)."""
    result = PathResult(path.name)
    namespaces = sorted({ns, ext_ns, ns.rsplit("-", 1)[0] + "-gw"})
    overflows_before = listen_overflows(namespaces)
    sink_host, sink_port = path.sink
    http_host, http_port = path.http

    _step(f"{path.name}: warm-up")
    warm = run_worker(ns, "burst", {"host": http_host, "port": http_port, "count": 20})
    if warm["errors"]:
        raise BenchError(f"{path.name}: warm-up failed: {warm['errors']}")

    pids = path.tunnel_pids() if path.tunnel_pids else []
    fds_before = open_fds(pids) if pids else 0
    _step(f"{path.name}: {settings.idle_connections} idle connections held through the path")
    measure_held(ns, ext_ns, path, settings.idle_connections, result)

    _step(f"{path.name}: {settings.burst} GETs at once")
    burst = run_worker(ns, "burst", {"host": http_host, "port": http_port,
                                     "count": settings.burst})
    result.burst_errors = sum(burst["errors"].values())
    if burst["errors"]:
        result.notes.append(f"burst of {settings.burst}: {burst['errors']}")

    _step(f"{path.name}: new-connection latency, {settings.latency_samples} sequential GETs")
    latency = run_worker(ns, "latency", {"host": http_host, "port": http_port,
                                         "samples": settings.latency_samples, "warmup": 20})
    if latency["ms"]:
        result.p50_ms = percentile(latency["ms"], 50)
        result.p99_ms = percentile(latency["ms"], 99)
    result.latency_errors = sum(latency["errors"].values())
    if latency["errors"]:
        result.notes.append(f"latency: {latency['errors']}")

    _step(f"{path.name}: new connections/s, {settings.rate_concurrency} clients for "
          f"{settings.rate_seconds:g}s")
    rate = run_worker(ns, "rate", {"host": http_host, "port": http_port,
                                   "concurrency": settings.rate_concurrency,
                                   "seconds": settings.rate_seconds})
    result.rate = rate["ok"] / rate["elapsed"]
    result.rate_errors = sum(rate["errors"].values())
    if rate["errors"]:
        result.notes.append(f"connection rate: {rate['errors']}")

    _step(f"{path.name}: throughput, {settings.repeat} x {settings.size:,} bytes")
    pids = path.tunnel_pids() if path.tunnel_pids else []
    cpu_before = cpu_seconds(pids) if pids else 0.0
    tput = run_worker(ns, "throughput", {"host": sink_host, "port": sink_port,
                                         "size": settings.size, "repeat": settings.repeat},
                      timeout=60 + settings.repeat * settings.size / 5e6)
    if pids:
        moved = settings.size * len(tput["seconds"]) / 1e9
        if moved:
            result.cpu_s_per_gb = (cpu_seconds(pids) - cpu_before) / moved
    result.throughput_runs = [settings.size / s / 1e6 for s in tput["seconds"]]
    if result.throughput_runs:
        result.throughput_mbs = statistics.median(result.throughput_runs)
    result.throughput_errors = tput["errors"]
    if tput["errors"]:
        result.notes.append(f"throughput: {tput['errors']}")
    if pids:  # every connection of every phase has ended: the fds should be back
        deadline = time.monotonic() + 5
        while (leaked := open_fds(pids) - fds_before) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        result.fds_leaked = leaked
    overflows = {name.rsplit("-", 1)[1]: count - overflows_before[name]
                 for name, count in listen_overflows(namespaces).items()
                 if count > overflows_before[name]}
    if overflows:
        result.notes.append(f"listen queue overflows per netns: {overflows} (SYNs dropped by a "
                            "full accept queue; the client retries after 1 s, then 3 s...)")
    return result


# ---- the three paths -----------------------------------------------------------------------


@contextlib.contextmanager
def sshd_run_dir() -> Iterator[None]:
    """sshd refuses to start without its privsep dir; create it only if missing, and
    remove it only if we created it."""
    created = False
    if not SSHD_RUN_DIR.exists():
        SSHD_RUN_DIR.mkdir(mode=0o755)
        created = True
    try:
        yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                SSHD_RUN_DIR.rmdir()


def ssh_argv(workdir: Path, forwards: list[str], interactive: bool = False) -> list[str]:
    """The OpenSSH client, pinned to the generated host key, key-only, aes128-gcm.

    ``interactive`` asks for a tty session (``-tt`` + a command) instead of ``-N``: only
    then does ssh set TCP_NODELAY on its connection, which decides small-message latency.
    """
    from k8s_ext_connector.lab.topology import SOURCE_IPS

    options = {
        "IdentitiesOnly": "yes", "IdentityAgent": "none", "BatchMode": "yes",
        "UserKnownHostsFile": str(workdir / "known_hosts"), "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes", "HostKeyAlgorithms": "ssh-ed25519",
        "Ciphers": "aes128-gcm@openssh.com", "Compression": "no", "ExitOnForwardFailure": "yes",
        "ServerAliveInterval": "5", "LogLevel": "ERROR",
    }
    argv = ["ssh", "-F", "none", "-tt" if interactive else "-N",
            "-i", str(workdir / "client_key"), "-p", str(SSH_PORT)]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    for forward in forwards:
        argv += ["-L", forward]
    return [*argv, f"root@{SOURCE_IPS[0]}", *(["sleep", "infinity"] if interactive else [])]


def spawn_detached(lab: Lab, name: str, ns: str, argv: list[str]) -> Process:
    """``Lab.spawn`` with stdin from /dev/null: ``ssh -tt`` must never touch our terminal.
    Registered with the lab, so ``Lab.close`` stops it like any other lab process."""
    from k8s_ext_connector.lab.topology import Process

    log_path = lab.workdir / f"{name}.log"
    with log_path.open("ab") as handle:
        popen = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                 stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    process = Process(name, popen, log_path)
    lab.processes.append(process)
    return process


def openssh_nodelay_latency(lab: Lab, pod_ns: str, workdir: Path,
                            settings: Settings) -> tuple[float | None, float | None]:
    """The same latency run through a second, interactive ssh (TCP_NODELAY on)."""
    from k8s_ext_connector.lab.topology import EXTERNAL_SERVER_IP

    ssh = spawn_detached(lab, "ssh-tty", pod_ns, ssh_argv(
        workdir, [f"127.0.0.1:{SSH_LOCAL_HTTP_TTY}:{EXTERNAL_SERVER_IP}:{HTTP_PORT}"],
        interactive=True))
    try:
        lab.wait_tcp(pod_ns, "127.0.0.1", SSH_LOCAL_HTTP_TTY, process=ssh)
        latency = run_worker(pod_ns, "latency", {"host": "127.0.0.1", "port": SSH_LOCAL_HTTP_TTY,
                                                 "samples": settings.latency_samples,
                                                 "warmup": 20})
    finally:
        ssh.stop()
    if not latency["ms"] or latency["errors"]:
        raise BenchError(f"interactive ssh latency run failed: {latency['errors']}")
    return percentile(latency["ms"], 50), percentile(latency["ms"], 99)


def openssh_setup(lab: Lab, pod_ns: str, workdir: Path) -> tuple[Process, Process]:
    """sshd on a source IP in the gateway netns, ``ssh -N -L`` in the pod; keys pinned."""
    from k8s_ext_connector.certs.ssh import generate_key_pair, write_private_key
    from k8s_ext_connector.lab import netns
    from k8s_ext_connector.lab.topology import EXTERNAL_SERVER_IP, SINK_PORT, SOURCE_IPS

    source_ip = SOURCE_IPS[0]
    host_key, client_key = generate_key_pair(), generate_key_pair()
    write_private_key(workdir / "ssh_host_ed25519_key", host_key)
    write_private_key(workdir / "client_key", client_key)
    (workdir / "authorized_keys").write_text(client_key.public_openssh + "\n")
    (workdir / "known_hosts").write_text(f"[{source_ip}]:{SSH_PORT} {host_key.public_openssh}\n")
    config = workdir / "sshd_config"
    config.write_text("\n".join([
        f"ListenAddress {source_ip}",
        f"Port {SSH_PORT}",
        f"HostKey {workdir / 'ssh_host_ed25519_key'}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
        # The key files are 0600 in a 0700 temp dir, but /tmp above it is world-writable,
        # which StrictModes rejects for any path outside the user's home.
        "StrictModes no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "AllowTcpForwarding yes",
        f"PermitOpen {EXTERNAL_SERVER_IP}:{SINK_PORT} {EXTERNAL_SERVER_IP}:{HTTP_PORT}",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "PermitTTY yes",  # only for the interactive latency variant
        "Ciphers aes128-gcm@openssh.com",
        "Compression no",
        "UseDNS no",
        "LogLevel ERROR",
        "",
    ]))
    checked = netns.sh(["/usr/sbin/sshd", "-t", "-f", str(config)], check=False)
    if checked.returncode != 0:
        raise BenchError(f"sshd config rejected: {checked.stderr.strip()}")
    netns.sh(["ip", "-n", lab.gw_ns, "addr", "add", f"{source_ip}/32", "dev", "ext0"])
    sshd = lab.spawn("sshd", lab.gw_ns, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)])
    lab.wait_tcp(lab.gw_ns, source_ip, SSH_PORT, process=sshd)
    ssh = spawn_detached(lab, "ssh", pod_ns, ssh_argv(workdir, [
        f"127.0.0.1:{SSH_LOCAL_SINK}:{EXTERNAL_SERVER_IP}:{SINK_PORT}",
        f"127.0.0.1:{SSH_LOCAL_HTTP}:{EXTERNAL_SERVER_IP}:{HTTP_PORT}",
    ]))
    lab.wait_tcp(pod_ns, "127.0.0.1", SSH_LOCAL_HTTP, process=ssh)
    return sshd, ssh


def openssh_teardown(lab: Lab, sshd: Process, ssh: Process) -> None:
    from k8s_ext_connector.lab import netns
    from k8s_ext_connector.lab.topology import SOURCE_IPS

    ssh.stop()
    sshd.stop()
    for pid in pids_named(lab.gw_ns, "sshd"):  # session processes outlive a stopped listener
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    netns.sh(["ip", "-n", lab.gw_ns, "addr", "del", f"{SOURCE_IPS[0]}/32", "dev", "ext0"],
             check=False)


def log_anomalies(process: Process, every_line: bool = False) -> list[str]:
    """Warnings, errors and refusals logged during the run (OpenSSH at LogLevel ERROR logs
    nothing else, so there every line counts)."""
    words = ("WARNING", "ERROR", "Traceback", "refusing")
    interesting = [line for line in process.output().splitlines() if line.strip() and (
        every_line or any(word in line for word in words)) and PROBE_NOISE not in line]
    if not interesting:
        return []
    shown = "; ".join(line[-160:] for line in interesting[:3])
    return [f"{process.name} logged {len(interesting)} warning/error lines, e.g.: {shown}"]


def run_all(settings: Settings) -> list[PathResult]:
    from k8s_ext_connector.lab.scenario import SERVICE1, ScenarioKeys, plan_seed
    from k8s_ext_connector.lab.topology import (
        EXTERNAL_SERVER_IP,
        SERVICE_IP,
        SINK_PORT,
        Lab,
    )

    results: list[PathResult] = []
    _step("building the lab: pod, gateway node, external server")
    with Lab.create(["bench"]) as lab, sshd_run_dir(), \
            tempfile.TemporaryDirectory(prefix="bench-sshd-") as sshd_dir:
        pod_ns = lab.pods["bench"].netns
        server = lab.start_external_server()
        lab.wait_tcp(lab.ext_ns, EXTERNAL_SERVER_IP, SINK_PORT, process=server)
        lab.enable_routing()

        results.append(measure(pod_ns, lab.ext_ns, Endpoints(
            "direct", (EXTERNAL_SERVER_IP, SINK_PORT), (EXTERNAL_SERVER_IP, HTTP_PORT), None),
            settings))

        _step("starting sshd in the gateway netns and ssh -N -L in the pod")
        sshd, ssh = openssh_setup(lab, pod_ns, Path(sshd_dir))
        try:
            results.append(measure(pod_ns, lab.ext_ns, Endpoints(
                "OpenSSH", ("127.0.0.1", SSH_LOCAL_SINK), ("127.0.0.1", SSH_LOCAL_HTTP),
                lambda: [ssh.popen.pid, *pids_named(lab.gw_ns, "sshd")]), settings))
            _step("OpenSSH: latency again through an interactive session (TCP_NODELAY)")
            results[-1].tty_p50_ms, results[-1].tty_p99_ms = openssh_nodelay_latency(
                lab, pod_ns, Path(sshd_dir), settings)
            results[-1].notes += log_anomalies(sshd, every_line=True)
            results[-1].notes += log_anomalies(ssh, every_line=True)
        finally:
            openssh_teardown(lab, sshd, ssh)

        _step("starting the gateway and sidecar agents (as lab/main.py does)")
        keys = ScenarioKeys.generate()
        planned = plan_seed(keys, lab.host_key, ports=((SINK_PORT, SINK_PORT),
                                                       (HTTP_PORT, HTTP_PORT)))
        gateway = lab.start_gateway(planned.gateway)
        sidecar = lab.start_sidecar("bench", planned.sidecars[SERVICE1], keys.clients[SERVICE1])
        results.append(measure(pod_ns, lab.ext_ns, Endpoints(
            "ours", (SERVICE_IP, SINK_PORT), (SERVICE_IP, HTTP_PORT),
            lambda: [sidecar.popen.pid, gateway.popen.pid]), settings))
        for process in (sidecar, gateway):
            if not process.alive():
                results[-1].notes.append(f"{process.name} exited: {process.output()[-300:]}")
            results[-1].notes += log_anomalies(process)
    return results


# ---- reporting -----------------------------------------------------------------------------


def _fmt(value: float | int | None, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _ratio(a: float | int | None, b: float | int | None) -> str:
    if a is None or b is None or a <= 0 or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def table_rows(results: list[PathResult], settings: Settings) -> list[list[str]]:
    direct, openssh, ours = results

    def row(label: str, get: Callable[[PathResult], float | int | None], digits: int,
            ratio: bool = True) -> list[str]:
        values = [get(r) for r in (direct, openssh, ours)]
        ratios = [_ratio(values[2], values[1]), _ratio(values[2], values[0])] if ratio \
            else ["-", "-"]
        return [label, *(_fmt(v, digits) for v in values), *ratios]

    size = f"{settings.size / GIB:g} GiB" if settings.size >= GIB else f"{settings.size:,} B"
    return [
        ["metric", "direct", "OpenSSH", "ours", "ours÷OpenSSH", "ours÷direct"],
        row(f"throughput, MB/s (median of {settings.repeat} x {size})",
            lambda r: r.throughput_mbs, 0),
        row("tunnel CPU seconds per GB", lambda r: r.cpu_s_per_gb, 2),
        row(f"new-connection latency p50, ms ({settings.latency_samples} sequential GETs)",
            lambda r: r.p50_ms, 2),
        row("new-connection latency p99, ms", lambda r: r.p99_ms, 2),
        row("latency p50, ms, OpenSSH in an interactive session (TCP_NODELAY)",
            lambda r: r.tty_p50_ms if r is openssh else r.p50_ms, 2),
        row("latency p99, ms, OpenSSH in an interactive session (TCP_NODELAY)",
            lambda r: r.tty_p99_ms if r is openssh else r.p99_ms, 2),
        row("added latency p50 over direct, ms",
            lambda r: None if r.p50_ms is None or direct.p50_ms is None
            else r.p50_ms - direct.p50_ms, 2, ratio=False),
        row(f"new connections/s ({settings.rate_concurrency} clients, "
            f"{settings.rate_seconds:g} s)", lambda r: r.rate, 0),
        row("errors in the connection-rate run", lambda r: r.rate_errors, 0, ratio=False),
        row(f"tunnel RSS per 1,000 idle connections, MB ({settings.idle_connections} held)",
            lambda r: r.rss_per_1000_mb, 1),
        row(f"seconds to open {settings.idle_connections} held connections up to the server",
            lambda r: r.held_seconds, 2),
        row(f"errors, {settings.idle_connections} concurrent held connections",
            lambda r: r.held_errors, 0, ratio=False),
        row(f"errors, {settings.burst} GETs at once", lambda r: r.burst_errors, 0, ratio=False),
        row("tunnel fds still open after all phases, minus before", lambda r: r.fds_leaked, 0,
            ratio=False),
    ]


def targets(results: list[PathResult], settings: Settings) -> list[list[str]]:
    direct, openssh, ours = results

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    rows = [["target", "measured", "met?"]]
    if ours.throughput_mbs is not None and openssh.throughput_mbs is not None:
        rows.append(["throughput >= OpenSSH's on the same path",
                     f"{ours.throughput_mbs:,.0f} vs {openssh.throughput_mbs:,.0f} MB/s "
                     f"({ours.throughput_mbs / openssh.throughput_mbs:.2f}x)",
                     met(ours.throughput_mbs >= openssh.throughput_mbs)])
    if ours.p50_ms is not None and direct.p50_ms is not None:
        added = ours.p50_ms - direct.p50_ms
        rows.append(["added new-connection latency p50 < 1 ms",
                     f"{added:.2f} ms ({ours.p50_ms:.2f} vs direct {direct.p50_ms:.2f} ms)",
                     met(added < 1.0)])
    if ours.rate is not None:
        rows.append([">= 2,000 new connections/s",
                     f"{ours.rate:,.0f}/s, {ours.rate_errors} errors (direct on this rig: "
                     f"{_fmt(direct.rate, 0)}/s)",
                     met(ours.rate >= 2000 and ours.rate_errors == 0)])
    full = settings.idle_connections >= 1000 and settings.burst >= 1000
    rows.append([f"1,000 concurrent connections without errors{'' if full else ' (reduced)'}",
                 f"{settings.idle_connections} held: {ours.held_errors} errors; "
                 f"{settings.burst} at once: {ours.burst_errors} errors",
                 met(full and ours.held_errors == 0 and ours.burst_errors == 0)])
    return rows


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def render_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(rows[0]))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def environment() -> dict[str, str]:
    import asyncssh

    try:
        uvloop_version = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uvloop_version = "not installed"
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True,
                                 check=False).stderr.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True,
                                check=False).stdout.strip(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "asyncssh": asyncssh.__version__,
        "uvloop": uvloop_version,
        "openssh": ssh_version,
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def write_markdown(path: Path, command: str, env: dict[str, str], rows: list[list[str]],
                   goals: list[list[str]], results: list[PathResult], elapsed: float) -> None:
    notes = [f"- {r.name}: {note}" for r in results for note in r.notes] or ["- none"]
    runs = [f"- {r.name}: " + ", ".join(f"{v:,.0f}" for v in r.throughput_runs) + " MB/s"
            for r in results]
    text = "\n".join([
        "# Data-plane benchmark: direct vs OpenSSH -L vs ours",
        "",
        f"Command: `{command}`",
        "",
        *(f"- {key}: {value}" for key, value in env.items()),
        f"- total runtime: {elapsed:.0f} s",
        "",
        "Paths, all from one pod netns to the external server netns of the namespace lab:",
        "direct = kernel routing through the gateway netns; OpenSSH = `ssh -N -L` in the pod to",
        "`sshd` on 203.0.113.200:2222 in the gateway netns (aes128-gcm, no compression, pinned",
        "host key, key-only auth); ours = the real sidecar and gateway agents, client to the",
        "ClusterIP redirected by iptables. Each measurement is a separate client process in the",
        "pod netns (the same code for every path). Client, Python external server and tunnel",
        "processes all share the same CPUs, so the direct column is this rig's ceiling, not the",
        "kernel's. MB = 10^6 bytes. Tunnel CPU and RSS count sidecar+gateway (ours) or",
        "ssh+all sshd processes (OpenSSH).",
        "",
        "OpenSSH latency: ssh sets TCP_NODELAY on its connection only for an interactive (tty)",
        "session. With `-N` the SSH connection runs Nagle's algorithm, and the lab's HTTP server",
        "writes headers and body as two segments, so each response waits for a delayed ACK",
        "(~40 ms). The \"interactive session\" rows repeat the latency run through a second",
        "`ssh -tt ... sleep infinity` with the same options on the same sshd (direct and ours",
        "repeat their own figures there, so the ratios compare against that variant).",
        "Each throughput run is one connection, timed from connect to the sink's byte-count",
        "answer, so with a small `--size` that ~40 ms tail also lowers OpenSSH's MB/s.",
        "",
        render_markdown(rows),
        "",
        "## Targets",
        "",
        render_markdown(goals),
        "",
        "## Throughput runs",
        "",
        *runs,
        "",
        "## Anomalies",
        "",
        *notes,
        "",
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:
        worker_main(argv[1], json.loads(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, help="bytes per throughput run (default 1 GiB)")
    parser.add_argument("--repeat", type=int, help="throughput runs per path (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller everything (smoke run); writes dataplane-quick.md")
    parser.add_argument("--output", type=Path, help="markdown report path")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("dataplane.py: needs root (network namespaces, iptables)", file=sys.stderr)
        return 1
    quick = bool(args.quick)
    settings = Settings(
        size=args.size or (256 << 20 if quick else GIB),
        repeat=args.repeat or (1 if quick else 3),
        latency_samples=100 if quick else 500,
        rate_seconds=2 if quick else 5,
        rate_concurrency=64,
        idle_connections=200 if quick else 1000,
        burst=200 if quick else 1000,
    )
    output = args.output or RESULTS_DIR / ("dataplane-quick.md" if quick else "dataplane.md")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NOFILE if hard == resource.RLIM_INFINITY else max(soft, min(NOFILE, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))  # inherited by sshd, ssh, agents
    # SIGTERM unwinds like Ctrl-C, so the lab is closed by the same finally/with blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    env = environment()
    started = time.monotonic()
    try:
        results = run_all(settings)
    except BenchError as error:
        print(f"dataplane.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dataplane.py: interrupted; lab removed", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    rows, goals = table_rows(results, settings), targets(results, settings)
    print(render_text(rows))
    print()
    print(render_text(goals))
    for r in results:
        for note in r.notes:
            print(f"note: {r.name}: {note}")
    command = shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(
        os.getcwd()) else sys.executable, os.path.relpath(SCRIPT), *argv])
    write_markdown(output, command, env, rows, goals, results, elapsed)
    print(f"\n[bench] done in {elapsed:.0f} s; wrote {os.path.relpath(output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
