"""The seed's "different networks" topology on network namespaces.

::

    pod netns (one per pod)           gateway netns ("node")             external netns
    eth0 198.51.100.1x/25  --veth--  br0 198.51.100.1/25
    default via .1                    ext0 203.0.113.1/24  ----veth----  eth0 203.0.113.10/24
                                      + source IPs 203.0.113.200, .201   HTTP server logging
                                        (added by the gateway agent)     client source IPs

- The gateway netns does not forward (ip_forward=0) and the external netns has no route to
  the pod network: pods cannot reach the external server except through the gateway.
- 198.51.100.128/25 plays the Service CIDR: it is a local route on the "node" with
  nothing listening, so a ClusterIP without endpoints refuses connections, as kube-proxy
  makes it do. The ExternalService's ClusterIP is ``SERVICE_IP``.
- Every process runs inside a lab namespace and is killed with it; ``close()`` removes
  everything even after a failure, and ``sweep_orphans`` after a crash.

For ingress (opt-in, so the egress tests see the node exactly as before):

- ``start_pod_server`` runs an HTTP server on port 80 in a pod that answers
  "<pod name> <client IP it sees>";
- ``emulate_cluster_ip`` gives a source Service a ClusterIP in 198.51.100.128/25. The lab
  has no kube-proxy, so the "node" (gateway netns) gets what kube-proxy would install
  for a connection the node itself opens to a ClusterIP: DNAT in nat OUTPUT to the pod,
  and masquerade towards the pod network (kube-proxy masquerades node-originated Service
  traffic), so the pod sees the node's pod-side address, 198.51.100.1;
- ``add_external_address`` puts a second address (``OTHER_EXTERNAL_IP``) on the external
  server's interface: "another host" on the external network, for refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from k8s_ext_connector.certs.ssh import KeyPair, generate_key_pair, write_private_key
from k8s_ext_connector.core import iptables
from k8s_ext_connector.core.config import GatewayConfig, SidecarConfig, dump
from k8s_ext_connector.lab import netns

POD_GATEWAY_IP = "198.51.100.1"
# The control-plane "node" of the lab (``Lab.add_control_plane``): on the pod network, as
# a cluster's API server is reachable from its nodes and pods.
CONTROL_PLANE_IP = "198.51.100.2"
POD_PREFIX = 25
POD_CIDR = f"198.51.100.0/{POD_PREFIX}"  # the pods' network: what may reach the SSH port
SERVICE_CIDR = "198.51.100.128/25"
SERVICE_IP = "198.51.100.130"
GATEWAY_EXTERNAL_IP = "203.0.113.1"
EXTERNAL_SERVER_IP = "203.0.113.10"
EXTERNAL_PREFIX = 24
SOURCE_IPS = ("203.0.113.200", "203.0.113.201")
GATEWAY_IFACE = "ext0"
HTTP_PORTS = (8000, 8001)
SINK_PORT = 9000
POD_HTTP_PORT = 80
POD_SINK_PORT = 9000
# ClusterIPs of the source Services my-service1 and my-service2 (emulate_cluster_ip).
SOURCE_SERVICE_IPS = ("198.51.100.140", "198.51.100.141")
OTHER_EXTERNAL_IP = "203.0.113.11"
LAB_SERVICES_CHAIN = "LAB-SERVICES"  # not EXTCONN-: the agents must never own or remove it

_counter = itertools.count()


@dataclass
class CrashBackoff:
    """Restart delays after exits, as a kubelet's CrashLoopBackOff: doubling from ``start``
    up to ``maximum``, back to ``start`` once a run lasted ``reset_after`` seconds."""

    start: float = 0.5
    maximum: float = 10.0
    reset_after: float = 60.0
    delay: float = 0.0  # the next delay; 0 means start

    def after_exit(self, ran_for: float) -> float:
        """The delay before the next start of something that just exited."""
        if ran_for >= self.reset_after or self.delay == 0.0:
            self.delay = self.start
        current = self.delay
        self.delay = min(self.delay * 2, self.maximum)
        return current


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@dataclass
class Pod:
    name: str
    ip: str
    netns: str
    sidecar: Process | None = None
    config_path: Path | None = None
    key_path: Path | None = None


@dataclass
class Lab:
    """Build with ``Lab.create(pods=[...])``; always ``close()`` (or use ``with``)."""

    prefix: str
    workdir: Path
    ext_ns: str
    gw_ns: str
    pods: dict[str, Pod] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    cp_ns: str | None = None  # see add_control_plane
    gateway: Process | None = None
    host_key: KeyPair = field(default_factory=generate_key_pair)
    # Emulated ClusterIP -> (pod IP, ports), see emulate_cluster_ip.
    cluster_ips: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------
    @staticmethod
    def create(pod_names: Sequence[str]) -> Lab:
        if not netns.is_root():
            raise netns.LabError("the namespace lab needs root (ip netns, veth, iptables)")
        netns.sweep_orphans()
        prefix = f"xcl{os.getpid()}n{next(_counter)}"
        lab = Lab(
            prefix=prefix,
            workdir=Path(tempfile.mkdtemp(prefix=f"{prefix}-")),
            ext_ns=f"{prefix}-ext",
            gw_ns=f"{prefix}-gw",
        )
        try:
            lab.host_key = generate_key_pair()
            write_private_key(lab.workdir / "gateway-host-key", lab.host_key)
            lab._build(pod_names)
        except BaseException:
            lab.close()
            raise
        return lab

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self, pod_names: Sequence[str]) -> None:
        ip = self._ip
        netns.add(self.ext_ns)
        netns.add(self.gw_ns)
        ip(
            self.gw_ns,
            "link",
            "add",
            GATEWAY_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.ext_ns,
        )
        ip(
            self.gw_ns,
            "addr",
            "add",
            f"{GATEWAY_EXTERNAL_IP}/{EXTERNAL_PREFIX}",
            "dev",
            GATEWAY_IFACE,
        )
        ip(self.gw_ns, "link", "set", GATEWAY_IFACE, "up")
        ip(self.ext_ns, "addr", "add", f"{EXTERNAL_SERVER_IP}/{EXTERNAL_PREFIX}", "dev", "eth0")
        ip(self.ext_ns, "link", "set", "eth0", "up")
        ip(self.gw_ns, "link", "add", "br0", "type", "bridge")
        ip(self.gw_ns, "addr", "add", f"{POD_GATEWAY_IP}/{POD_PREFIX}", "dev", "br0")
        ip(self.gw_ns, "link", "set", "br0", "up")
        ip(self.gw_ns, "route", "add", "local", SERVICE_CIDR, "dev", "lo")
        netns.sh(["ip", "netns", "exec", self.gw_ns, "sysctl", "-qw", "net.ipv4.ip_forward=0"])
        for index, name in enumerate(pod_names):
            pod = Pod(name=name, ip=f"198.51.100.{11 + index}", netns=f"{self.prefix}-{name}")
            netns.add(pod.netns)
            veth = f"vp{index}"
            ip(
                self.gw_ns,
                "link",
                "add",
                veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.netns,
            )
            ip(self.gw_ns, "link", "set", veth, "master", "br0", "up")
            ip(pod.netns, "addr", "add", f"{pod.ip}/{POD_PREFIX}", "dev", "eth0")
            ip(pod.netns, "link", "set", "eth0", "up")
            ip(pod.netns, "route", "add", "default", "via", POD_GATEWAY_IP)
            self.pods[name] = pod

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        netns.sh(["ip", "-n", ns, *args])

    def add_control_plane(self) -> str:
        """A namespace for the control plane, ``CONTROL_PLANE_IP`` on the pod network's
        bridge: the gateway node and the pods reach the API server there, and the API
        server reaches a webhook listening in the same namespace. Returns its name."""
        self.cp_ns = f"{self.prefix}-cp"
        netns.add(self.cp_ns)
        self._ip(
            self.gw_ns, "link", "add", "vcp", "type", "veth", "peer", "name", "eth0",
            "netns", self.cp_ns,
        )  # fmt: skip
        self._ip(self.gw_ns, "link", "set", "vcp", "master", "br0", "up")
        self._ip(self.cp_ns, "addr", "add", f"{CONTROL_PLANE_IP}/{POD_PREFIX}", "dev", "eth0")
        self._ip(self.cp_ns, "link", "set", "eth0", "up")
        return self.cp_ns

    def enable_routing(self) -> None:
        """Benchmark baseline only: let the node route pods straight to the server."""
        netns.sh(["ip", "netns", "exec", self.gw_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self._ip(
            self.ext_ns, "route", "add", f"198.51.100.0/{POD_PREFIX}", "via", GATEWAY_EXTERNAL_IP
        )

    def emulate_cluster_ip(self, cluster_ip: str, pod_name: str, ports: Sequence[int]) -> None:
        """What kube-proxy does on the node for a connection the node opens to a ClusterIP.

        nat OUTPUT: DNAT ``cluster_ip:port`` to the pod; nat POSTROUTING: masquerade such
        connections towards the pod network. Connections from pods are not affected.
        """
        self.cluster_ips[cluster_ip] = (self.pods[pod_name].ip, tuple(ports))
        dnat = tuple(
            f"-d {ip}/32 -p tcp -m tcp --dport {port} -j DNAT --to-destination {pod_ip}:{port}"
            for ip, (pod_ip, ports_of) in sorted(self.cluster_ips.items())
            for port in ports_of
        )
        masquerade = (f"-d 198.51.100.0/{POD_PREFIX} -m conntrack --ctstate DNAT -j MASQUERADE",)
        hook = iptables.comment("lab: emulated kube-proxy")
        iptables.apply(
            NetnsIptables(self.gw_ns),
            iptables.ChainSet(
                table="nat",
                chains={LAB_SERVICES_CHAIN: dnat, f"{LAB_SERVICES_CHAIN}-MASQ": masquerade},
                jumps=(
                    iptables.Jump("OUTPUT", f"-d {SERVICE_CIDR} {hook} -j {LAB_SERVICES_CHAIN}"),
                    iptables.Jump("POSTROUTING", f"{hook} -j {LAB_SERVICES_CHAIN}-MASQ"),
                ),
                owned_prefix=LAB_SERVICES_CHAIN,
            ),
        )

    def add_external_address(self, address: str = OTHER_EXTERNAL_IP) -> None:
        """A second host on the external network (an address clients can bind to)."""
        self._ip(self.ext_ns, "addr", "add", f"{address}/{EXTERNAL_PREFIX}", "dev", "eth0")

    # ---- processes ------------------------------------------------------------------
    def spawn(self, name: str, ns: str, argv: Sequence[str]) -> Process:
        log_path = self.workdir / f"{name}.log"
        handle = log_path.open("ab")
        popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def agent_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "k8s_ext_connector", *args]

    def start_external_server(self) -> Process:
        argv = [
            sys.executable,
            "-m",
            "k8s_ext_connector.lab.echo_server",
            "--log",
            str(self.server_log_path),
            "--sink-port",
            str(SINK_PORT),
        ]
        for port in HTTP_PORTS:
            argv += ["--port", str(port)]
        server = self.spawn("external-server", self.ext_ns, argv)
        for port in (*HTTP_PORTS, SINK_PORT):
            self.wait_tcp(self.ext_ns, EXTERNAL_SERVER_IP, port, process=server)
        return server

    def start_pod_server(self, pod_name: str, sink: bool = False) -> Process:
        """HTTP on ``POD_HTTP_PORT`` in the pod, answering "<pod name> <client IP>"
        (``sink``: also a byte-counting sink on ``POD_SINK_PORT``, for benchmarks)."""
        pod = self.pods[pod_name]
        argv = [
            sys.executable,
            "-m",
            "k8s_ext_connector.lab.echo_server",
            "--log",
            str(self.pod_server_log_path(pod_name)),
            "--name",
            pod_name,
            "--port",
            str(POD_HTTP_PORT),
        ]
        if sink:
            argv += ["--sink-port", str(POD_SINK_PORT)]
        server = self.spawn(f"server-{pod_name}", pod.netns, argv)
        for port in (POD_HTTP_PORT, *((POD_SINK_PORT,) if sink else ())):
            self.wait_tcp(pod.netns, pod.ip, port, process=server)
        return server

    def pod_server_log_path(self, pod_name: str) -> Path:
        return self.workdir / f"server-{pod_name}.jsonl"

    def pod_server_log(self, pod_name: str) -> list[dict[str, object]]:
        path = self.pod_server_log_path(pod_name)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def server_log_path(self) -> Path:
        return self.workdir / "external-server.jsonl"

    def server_log(self) -> list[dict[str, object]]:
        if not self.server_log_path.exists():
            return []
        return [
            json.loads(line)
            for line in self.server_log_path.read_text().splitlines()
            if line.strip()
        ]

    def write_gateway_config(self, config: GatewayConfig) -> Path:
        path = self.workdir / "gateway.yaml"
        _write_atomically(path, dump(config))
        return path

    def start_gateway(self, config: GatewayConfig | None = None, wait: bool = True) -> Process:
        path = self.workdir / "gateway.yaml"
        if config is not None:
            self.write_gateway_config(config)
        self.gateway = self.spawn(
            "gateway",
            self.gw_ns,
            self.agent_argv(
                "gateway",
                "--config",
                str(path),
                "--host-key",
                str(self.workdir / "gateway-host-key"),
                "--manage-addresses",
                GATEWAY_IFACE,
                "--reload-interval",
                "0.2",
            ),
        )
        if wait:
            current = GatewayConfig.from_dict(_load_yaml(path))
            for source in current.sources:
                self.wait_tcp(self.gw_ns, source.source_ip, current.ssh_port, process=self.gateway)
        return self.gateway

    def write_sidecar_config(self, pod_name: str, config: SidecarConfig) -> Path:
        pod = self.pods[pod_name]
        pod.config_path = self.workdir / f"sidecar-{pod_name}.yaml"
        _write_atomically(pod.config_path, dump(config))
        return pod.config_path

    def start_sidecar(
        self,
        pod_name: str,
        config: SidecarConfig,
        client_key: KeyPair,
        wait_ready: bool = True,
        wrapper: Sequence[str] = (),
        args: Sequence[str] = (),
        write_files: bool = True,
    ) -> Process:
        """``wrapper`` prefixes the command, e.g. setpriv to run with reduced capabilities;
        ``args`` are added to the sidecar's; ``write_files=False`` starts it before its
        config and key exist (with ``--wait-for-config``: ``write_sidecar_files`` later)."""
        pod = self.pods[pod_name]
        pod.config_path = self.workdir / f"sidecar-{pod_name}.yaml"
        pod.key_path = self.workdir / f"client-key-{pod_name}"
        if write_files:
            self.write_sidecar_files(pod_name, config, client_key)
        pod.sidecar = self.spawn(
            f"sidecar-{pod_name}",
            pod.netns,
            [
                *wrapper,
                *self.agent_argv(
                    "sidecar",
                    "--config",
                    str(pod.config_path),
                    "--ssh-key",
                    str(pod.key_path),
                    "--reload-interval",
                    "0.2",
                    *args,
                ),
            ],
        )
        if wait_ready:
            self.wait_sidecar_ready(pod_name)
        return pod.sidecar

    def write_sidecar_files(
        self, pod_name: str, config: SidecarConfig, client_key: KeyPair
    ) -> None:
        """The config and the key, as the kubelet fills a pod's mounted volumes."""
        self.write_sidecar_config(pod_name, config)
        pod = self.pods[pod_name]
        pod.key_path = self.workdir / f"client-key-{pod_name}"
        write_private_key(pod.key_path, client_key)

    def reset_pod_network(self, pod_name: str) -> None:
        """What a pod's end does to the rules in its network namespace: they die with it.

        The sidecar never removes its rules; the lab reuses one namespace per pod name, so
        it removes ours (``EXTCONN-*`` in nat and filter) when it plays a pod's deletion.
        """
        firewall = NetnsIptables(self.pods[pod_name].netns)
        for table in ("nat", "filter"):
            iptables.remove(firewall, table, "EXTCONN-")

    def sidecar_ready(self, pod_name: str) -> tuple[int, str]:
        pod = self.pods[pod_name]

        async def probe() -> tuple[int, str]:
            reader, writer = await asyncio.open_connection(pod.ip, 15021)
            writer.write(b"GET /ready HTTP/1.0\r\n\r\n")
            response = (await reader.read()).decode()
            writer.close()
            return int(response.split()[1]), response.split("\r\n\r\n", 1)[-1].strip()

        return netns.call_in_netns(pod.netns, lambda: asyncio.run(probe()))

    def wait_sidecar_ready(self, pod_name: str, timeout: float = 15) -> None:
        pod = self.pods[pod_name]
        last = "no answer"

        def ready() -> bool:
            nonlocal last
            try:
                status, last = self.sidecar_ready(pod_name)
            except OSError as error:
                last = str(error)
                return False
            return status == 200

        self.wait_until(
            ready, timeout, lambda: f"sidecar in {pod_name} not ready: {last}", process=pod.sidecar
        )

    # ---- probes -----------------------------------------------------------------------
    def wait_tcp(
        self, ns: str, host: str, port: int, timeout: float = 15, process: Process | None = None
    ) -> None:
        def accepting() -> bool:
            return netns.call_in_netns(ns, lambda: _try_connect(host, port))

        self.wait_until(
            accepting, timeout, lambda: f"{host}:{port} in {ns} not accepting", process=process
        )

    @staticmethod
    def wait_until(
        condition: Callable[[], bool],
        timeout: float,
        describe: Callable[[], str],
        process: Process | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if process is not None and not process.alive():
                raise netns.LabError(f"{process.name} exited: {process.output()[-2000:]}")
            time.sleep(0.05)
        raise netns.LabError(f"{describe()} after {timeout}s")

    def in_pod(self, pod_name: str, function: Callable[[], object], timeout: float = 120) -> object:
        return netns.call_in_netns(self.pods[pod_name].netns, function, timeout)

    def iptables_save(self, ns: str, table: str = "nat") -> str:
        """The table as iptables-save prints it, without its timestamped comment lines."""
        out = netns.sh(["ip", "netns", "exec", ns, "iptables-nft-save", "-t", table]).stdout
        return "".join(line + "\n" for line in out.splitlines() if not line.startswith("#"))

    # ---- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop(timeout=5)
        namespaces = [pod.netns for pod in self.pods.values()] + [self.gw_ns, self.ext_ns]
        for ns in namespaces + ([self.cp_ns] if self.cp_ns else []):
            netns.delete(ns)
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass(frozen=True)
class NetnsIptables:
    """``core.iptables.Iptables`` (nft backend) of one lab namespace, for the lab's own rules."""

    ns: str

    def save(self, table: str) -> str:
        return netns.sh(["ip", "netns", "exec", self.ns, "iptables-nft-save", "-t", table]).stdout

    def restore(self, text: str) -> None:
        netns.sh(
            ["ip", "netns", "exec", self.ns, "iptables-nft-restore", "--noflush"], input_text=text
        )


def _try_connect(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _write_atomically(path: Path, text: str) -> None:
    """Write a sibling then rename, as a ConfigMap update swaps files: no torn reads."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _load_yaml(path: Path) -> object:
    import yaml

    return yaml.safe_load(path.read_text())
