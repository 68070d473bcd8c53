"""The kind e2e harness: the tools it needs, commands with deadlines, the cluster and the
external containers, their clean-up, and what to print when something fails.

The scenario is the seed's walkthrough (shared/seed README; on this machine
``k8s-ext-connector lab`` plays the same on network namespaces): an external server and a
gateway node holding two extra IPs on the same network (kind's Docker network here), the
chart installed, the seed's ExternalService applied with those addresses, pods behind
``ns1/my-service1`` and ``ns2/my-service2`` (and ``ns1/other-pod`` behind no source).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from k8s_ext_connector.core.api import GATEWAY_NODE_LABEL, ServiceRef
from k8s_ext_connector.operator.desired import client_secret_name, sidecar_configmap_name
from k8s_ext_connector.operator.snapshot import SIDECAR_CONTAINER
from tests.polling import wait_for

T = TypeVar("T")
Obj = dict[str, Any]
Say = Callable[[str], None]

ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent
KIND_CONFIG = E2E_DIR / "kind-config.yaml"
TOOLS_BIN = ROOT / ".tools" / "bin"
CHART = ROOT / "charts" / "k8s-ext-connector"

IMAGE = "k8s-ext-connector:e2e"
RELEASE = "ext-connector"
RELEASE_NAMESPACE = "k8s-ext-connector"  # operator, webhook, certs
CONNECTOR_NAMESPACE = "external-services"  # connector Services, gateways, their config
GATEWAY_LABEL = "=".join(GATEWAY_NODE_LABEL)
INJECTION_LABEL = "external-service-injection=enabled"
COMPONENT_SELECTOR = "app.kubernetes.io/name=k8s-ext-connector"
ES_NAME = "my-externalservice"
ES_NAMESPACE = "default"  # the seed's manifest names none: it lands in the default namespace
ES_PLURAL = "externalservices"
TARGET_PORT = 8000  # the external server's port (the seed's SimpleHTTPServer)
SERVICE_PORT = 80  # the source Services' port (the seed's `kubectl expose --port=80`)
APP_CONTAINER = "app"
SERVER_LOG = "/tmp/access.log"  # inside the containers, as the seed's `tail /tmp/access.log`
KIND_NETWORK = "kind"

# Deadlines (seconds). Everything waits by polling with these; nothing sleeps blindly.
BUILD_TIMEOUT = 1200.0
CLUSTER_TIMEOUT = 600.0
HELM_TIMEOUT = 600.0
POD_READY_TIMEOUT = 300.0
ES_READY_TIMEOUT = 300.0
CHECK_TIMEOUT = 90.0


@dataclass(frozen=True)
class SeedPod:
    namespace: str
    name: str
    service: str | None  # the source Service selecting it; None: no Service selects it

    @property
    def labels(self) -> dict[str, str]:
        return {"app": self.service or self.name}

    @property
    def ref(self) -> ServiceRef | None:
        return ServiceRef(self.namespace, self.service) if self.service else None


POD1 = SeedPod("ns1", "my-pod1", "my-service1")
POD2 = SeedPod("ns2", "my-pod2", "my-service2")
OTHER_POD = SeedPod("ns1", "other-pod", None)
PODS = (POD1, POD2, OTHER_POD)
SOURCE_PODS = (POD1, POD2)  # in the ExternalService's source order: sourceIP 1, sourceIP 2
NAMESPACES = ("ns1", "ns2")


# ---- tools --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tools:
    docker: str
    kind: str
    helm: str
    kubectl: str


def find_tool(name: str) -> str | None:
    """``name`` in the checkout's .tools/bin (where `make` installs kind and helm) or PATH."""
    return shutil.which(name, path=os.pathsep.join([str(TOOLS_BIN), os.environ.get("PATH", "")]))


def preflight() -> tuple[Tools | None, list[str]]:
    """The tools, or every reason the suite cannot run here (one line each)."""
    problems: list[str] = []
    found = {name: find_tool(name) for name in ("docker", "kind", "helm", "kubectl")}
    docker = found["docker"]
    if docker is None:
        problems.append("docker: no docker CLI on PATH")
    else:
        try:
            info = subprocess.run(
                [docker, "info"], capture_output=True, text=True, timeout=60, check=False
            )
        except subprocess.TimeoutExpired:
            problems.append("docker: `docker info` did not answer within 60s")
        else:
            if info.returncode != 0:
                first = next((ln for ln in info.stderr.splitlines() if ln.strip()), "no output")
                problems.append(
                    f"docker: the Docker daemon is not reachable (`docker info`: {first})"
                )
    hints = {
        "kind": "`make e2e` installs the pinned release: tests/e2e/install-kind.sh",
        "helm": "`make install` fetches it into .tools/bin",
        "kubectl": "`make install` fetches it into .tools/bin",
    }
    for name, hint in hints.items():
        if found[name] is None:
            problems.append(f"{name}: not found on PATH or in .tools/bin ({hint})")
    if not (CHART / "Chart.yaml").exists():
        problems.append(f"chart: {CHART.relative_to(ROOT)}/Chart.yaml does not exist")
    kind, helm, kubectl = found["kind"], found["helm"], found["kubectl"]
    if problems or docker is None or kind is None or helm is None or kubectl is None:
        return None, problems
    return Tools(docker=docker, kind=kind, helm=helm, kubectl=kubectl), []


# ---- commands -----------------------------------------------------------------------------
class CommandError(AssertionError):
    """A command the suite needed failed; the message carries its output's tail."""


def _tail(text: str, lines: int = 40) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in kept)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    stdin: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise CommandError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f}s") from None
    if check and result.returncode != 0:
        raise CommandError(
            f"`{shlex.join(argv)}` exited {result.returncode}:\n"
            f"{_tail(result.stdout)}\n{_tail(result.stderr)}"
        )
    return result


def run_logged(argv: Sequence[str], log: Path, *, timeout: float) -> None:
    """A long command (image build, cluster creation) with its output in ``log``."""
    with log.open("ab") as handle:
        handle.write(f"$ {shlex.join(argv)}\n".encode())
        handle.flush()
        try:
            code = subprocess.run(
                list(argv), stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        what = f"did not finish within {timeout:.0f}s" if code is None else f"exited {code}"
        text = log.read_text(errors="replace")
        raise CommandError(f"`{shlex.join(argv)}` {what} (full log {log}):\n{_tail(text, 60)}")


def until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 1.0) -> T:
    """``wait_for`` at a pace for commands that ask the API server or Docker."""
    return wait_for(check, timeout=timeout, what=what, interval=interval)


def until_seen(seen: Callable[[], str], expected: str, timeout: float, what: str) -> str:
    """Poll ``seen()`` until it equals ``expected``; the failure names the last value seen."""
    last: list[str] = []

    def check() -> bool:
        value = seen()
        last[:] = [value]
        return value == expected

    try:
        until(check, timeout, what)
    except AssertionError as error:
        raise AssertionError(
            f"{what}: expected {expected!r}, last seen {last[0] if last else '(nothing)'!r}"
            f" ({error})"
        ) from None
    return expected


# ---- clean-up -----------------------------------------------------------------------------
class Cleanup:
    """Undo steps, run last first and only once: at the fixture's teardown, or at exit when
    an interrupt skipped it."""

    def __init__(self, say: Say) -> None:
        self._say = say
        self._steps: list[tuple[str, Callable[[], object]]] = []
        self._done = False
        atexit.register(self.run)

    def push(self, what: str, step: Callable[[], object]) -> None:
        self._steps.append((what, step))

    def cancel(self) -> None:
        """Leave everything up (EXTCONN_E2E_KEEP=1), also at exit."""
        self._done = True

    def run(self) -> None:
        if self._done:
            return
        self._done = True
        for what, step in reversed(self._steps):
            try:
                step()
            except Exception as error:  # keep undoing the rest
                self._say(f"clean-up of {what} FAILED: {error}")
            else:
                self._say(f"removed {what}")


# ---- the cluster and Docker ------------------------------------------------------------------
@dataclass
class Kind:
    tools: Tools
    name: str
    workdir: Path
    say: Say

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def gateway_node(self) -> str:
        return f"{self.name}-worker"

    @property
    def pod_node(self) -> str:
        return f"{self.name}-worker2"

    @property
    def server(self) -> str:
        return f"{self.name}-server"

    @property
    def stranger(self) -> str:
        return f"{self.name}-stranger"

    def kubectl_result(
        self, *args: str, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.tools.kubectl, "--kubeconfig", str(self.kubeconfig), *args]
        return run(argv, stdin=stdin, timeout=timeout, check=False)

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 60) -> str:
        argv = [self.tools.kubectl, "--kubeconfig", str(self.kubeconfig), *args]
        return run(argv, stdin=stdin, timeout=timeout).stdout

    def user(self, *args: str, stdin: str | None = None, show: str = "") -> str:
        """A kubectl command of the seed's walkthrough, echoed as the user would type it."""
        self.say(f"user: $ {show or shlex.join(['kubectl', *args])}")
        return self.kubectl(*args, stdin=stdin)

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        """The object, or None when it does not exist or cannot be read right now: these
        calls run inside polls with deadlines, so a transient API error (a control plane
        still settling, a timeout) is said and the poll goes on instead of aborting."""
        args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
        result = self.kubectl_result(*args)
        if result.returncode != 0:
            if "NotFound" not in result.stderr and "not found" not in result.stderr:
                self.say(f"kubectl {shlex.join(args)} failed, polling on: {result.stderr.strip()}")
            return None
        obj: Obj = json.loads(result.stdout)
        return obj

    def exists(self, kind: str, name: str, namespace: str) -> bool:
        """Whether the object exists, asked with `-o name` (a Secret's data is never read)."""
        result = self.kubectl_result("get", kind, name, "-n", namespace, "-o", "name")
        if result.returncode == 0:
            return True
        if "NotFound" not in result.stderr and "not found" not in result.stderr:
            self.say(
                f"kubectl get {kind} {name} -n {namespace} failed, polling on: "
                f"{result.stderr.strip()}"
            )
        return False

    def apply(self, manifest: Obj | Iterable[Obj], show: str = "") -> None:
        docs = [manifest] if isinstance(manifest, dict) else list(manifest)
        self.user("apply", "-f", "-", stdin=yaml.safe_dump_all(docs, sort_keys=False), show=show)

    def docker(
        self, *args: str, timeout: float = 60, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run([self.tools.docker, *args], timeout=timeout, check=check, stdin=stdin)


# ---- the kind network's addresses ------------------------------------------------------------
def kind_ipv4_network(
    inspect_output: str,
) -> tuple[ipaddress.IPv4Network, set[ipaddress.IPv4Address]]:
    """The IPv4 subnet of ``docker network inspect kind`` and the addresses in use on it."""
    data = json.loads(inspect_output)
    network = data[0] if isinstance(data, list) else data
    subnets = [
        ipaddress.ip_network(config["Subnet"], strict=False)
        for config in (network.get("IPAM") or {}).get("Config") or []
        if config.get("Subnet")
    ]
    ipv4 = [s for s in subnets if isinstance(s, ipaddress.IPv4Network)]
    if not ipv4:
        raise AssertionError(f"the {KIND_NETWORK} Docker network has no IPv4 subnet: {subnets}")
    used: set[ipaddress.IPv4Address] = set()
    for config in (network.get("IPAM") or {}).get("Config") or []:
        with contextlib.suppress(ValueError, KeyError):
            used.add(ipaddress.IPv4Address(config["Gateway"]))
    for container in (network.get("Containers") or {}).values():
        with contextlib.suppress(ValueError, KeyError):
            used.add(ipaddress.IPv4Interface(container["IPv4Address"]).ip)
    return ipv4[0], used


def free_addresses(
    subnet: ipaddress.IPv4Network, used: set[ipaddress.IPv4Address], count: int
) -> list[str]:
    """The ``count`` highest host addresses of ``subnet`` that are not in ``used``: Docker
    hands out addresses from the bottom, so the top stays free for the source IPs."""
    picked: list[str] = []
    candidate = subnet.broadcast_address - 1
    while len(picked) < count and candidate > subnet.network_address:
        if candidate not in used:
            picked.append(str(candidate))
        candidate -= 1
    if len(picked) < count:
        raise AssertionError(f"no {count} free addresses left in {subnet}")
    return picked


# ---- the seed's objects -----------------------------------------------------------------------
def namespace_manifest(name: str) -> Obj:
    key, value = INJECTION_LABEL.split("=", 1)
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {key: value}},
    }


def service_manifest(pod: SeedPod) -> Obj:
    assert pod.service is not None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": pod.service, "namespace": pod.namespace},
        "spec": {
            "selector": pod.labels,
            "ports": [{"protocol": "TCP", "port": SERVICE_PORT, "targetPort": SERVICE_PORT}],
        },
    }


def pod_manifest(pod: SeedPod, node: str) -> Obj:
    """The seed's `kubectl run my-pod1 ... python -m SimpleHTTPServer 80`, with the project's
    own image and its echo server (it answers GET / with "<pod name> <client IP>", so the
    external server's call back says which pod it reached)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
        "spec": {
            # Not the gateway node: pod -> gateway and gateway -> pod cross nodes.
            "nodeSelector": {"kubernetes.io/hostname": node},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": APP_CONTAINER,
                    "image": IMAGE,
                    "imagePullPolicy": "Never",
                    "command": [
                        "python",
                        "-m",
                        "k8s_ext_connector.lab.echo_server",
                        "--port",
                        str(SERVICE_PORT),
                        "--log",
                        SERVER_LOG,
                        "--name",
                        pod.name,
                    ],
                    # Port 80, as the seed's pods; the image's default user is 65532.
                    "securityContext": {"runAsUser": 0, "runAsNonRoot": False},
                    "ports": [{"containerPort": SERVICE_PORT, "protocol": "TCP"}],
                    "readinessProbe": {
                        "tcpSocket": {"port": SERVICE_PORT},
                        "periodSeconds": 1,
                    },
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                }
            ],
        },
    }


def externalservice_manifest(target_ip: str, source_ips: Sequence[str]) -> Obj:
    """The seed's example ExternalService, with this cluster's addresses."""
    return {
        "apiVersion": "submariner.io/v1alpha1",
        "kind": "ExternalService",
        "metadata": {"name": ES_NAME},
        "spec": {
            "targetIP": target_ip,
            "sources": [
                {
                    "service": {"namespace": pod.namespace, "name": pod.service},
                    "sourceIP": source_ip,
                }
                for pod, source_ip in zip(SOURCE_PODS, source_ips, strict=True)
            ],
            "ports": [{"protocol": "TCP", "port": TARGET_PORT, "targetPort": TARGET_PORT}],
        },
    }


def has_sidecar(pod: Obj) -> bool:
    spec = pod.get("spec") or {}
    return any(
        c.get("name") == SIDECAR_CONTAINER
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    )


def operator_objects(pod: SeedPod) -> list[tuple[str, str]]:
    """What the operator writes for a source Service's pods: (kind, name) in its namespace."""
    assert pod.ref is not None
    return [
        ("configmap", sidecar_configmap_name(pod.ref)),
        ("secret", client_secret_name(pod.ref)),
    ]


def pod_ready(pod: Obj | None) -> bool:
    conditions = ((pod or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def es_ready(es: Obj | None) -> bool:
    """READY n/n for the current generation, as `kubectl get externalservices` shows it."""
    if not es:
        return False
    status, meta = es.get("status") or {}, es.get("metadata") or {}
    n = len((es.get("spec") or {}).get("sources") or [])
    fresh = status.get("observedGeneration") == meta.get("generation")
    return bool(fresh and n and status.get("ready") == f"{n}/{n}")


def es_summary(es: Obj | None) -> str:
    if not es:
        return "ExternalService not found"
    status = es.get("status") or {}
    lines = [f"ready={status.get('ready')!r}"]
    lines += [
        f"{c.get('type')}={c.get('status')} {c.get('reason')}: {c.get('message')}"
        for c in status.get("conditions") or []
    ]
    return "; ".join(lines)


def table_rows(text: str) -> list[dict[str, str]]:
    """`kubectl get` output as dicts keyed by the header (columns split on 2+ spaces)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = re.split(r"\s{2,}", lines[0].strip())
    return [
        dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=False)) for line in lines[1:]
    ]


# ---- the clients (the project's lab client, inside the pod or container) -----------------------
CLIENT = (
    "import sys\n"
    "from k8s_ext_connector.lab.client import run_gets\n"
    "for o in run_gets(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])):\n"
    "    print('ok' if o.ok else 'error', o.body, flush=True)\n"
)


def client_argv(host: str, port: int, count: int) -> list[str]:
    return ["python", "-c", CLIENT, host, str(port), str(count)]


def outcome(output: str, first_word: bool = False) -> str:
    """The clients' outcomes as the lab's table shows them: the distinct answers (the source
    IP the server saw, or the pod that answered), ``refused``, or ``error: ...``."""
    seen: set[str] = set()
    for line in output.splitlines():
        status, _, body = line.partition(" ")
        if status == "ok":
            seen.add(body.split()[0] if first_word and body.split() else body)
        elif "ConnectionRefused" in body:
            seen.add("refused")
        elif status == "error":
            seen.add(f"error: {body}")
    return ",".join(sorted(seen)) or f"no answer ({output.strip()[:200]!r})"


# ---- diagnostics ------------------------------------------------------------------------------
@dataclass
class Diagnostics:
    """kubectl get/describe/logs of our components and the seed's objects, the gateway
    node's addresses and rules, and the external server's log. No Secret data is shown."""

    kind: Kind
    sections: list[str] = field(default_factory=list)

    def _add(self, title: str, text: str) -> None:
        self.sections.append(f"----- {title}\n{text.rstrip()}")

    def _kubectl(self, *args: str) -> None:
        try:
            result = self.kind.kubectl_result(*args, timeout=60)
            text = result.stdout + (result.stderr if result.returncode else "")
        except CommandError as error:
            text = str(error)
        self._add("$ kubectl " + shlex.join(args), text)

    def _docker(self, *args: str) -> None:
        try:
            result = self.kind.docker(*args, timeout=60, check=False)
            text = result.stdout + result.stderr
        except CommandError as error:
            text = str(error)
        self._add("$ docker " + shlex.join(args), text)

    def collect(self, brief: bool = False) -> str:
        self._kubectl("get", ES_PLURAL, "-A", "-o", "wide")
        self._kubectl("describe", ES_PLURAL, "-A")
        self._kubectl("get", "pods", "-A", "-o", "wide")
        if brief:
            return "\n".join(self.sections)
        self._kubectl("get", "nodes", "-o", "wide", "--show-labels")
        namespaces = (RELEASE_NAMESPACE, CONNECTOR_NAMESPACE, *NAMESPACES)
        for namespace in namespaces:
            self._kubectl(
                "get",
                "deployments,daemonsets,services,endpointslices,configmaps,secrets,leases",
                "-n",
                namespace,
                "-o",
                "wide",
            )
        self._kubectl("get", "mutatingwebhookconfigurations")
        self._kubectl(
            "get", "configmap", "ext-connector-gateway", "-n", CONNECTOR_NAMESPACE, "-o", "yaml"
        )
        self._kubectl("get", "events", "-A", "--sort-by=.lastTimestamp")
        for namespace in namespaces:
            self._kubectl("describe", "pods", "-n", namespace)
            self._logs(namespace)
        node = self.kind.gateway_node
        self._docker("exec", node, "ip", "-4", "addr", "show", "dev", "eth0")
        self._docker("exec", node, "ss", "-ltn")
        self._docker("exec", node, "iptables-save", "-t", "nat")
        self._docker("exec", node, "iptables-save", "-t", "filter")
        self._docker("exec", self.kind.server, "tail", "-n", "200", SERVER_LOG)
        self._docker("logs", "--tail", "100", self.kind.server)
        return "\n".join(self.sections)

    def _logs(self, namespace: str) -> None:
        result = self.kind.kubectl_result("get", "pods", "-n", namespace, "-o", "json")
        if result.returncode != 0:
            return
        for pod in json.loads(result.stdout).get("items") or []:
            name = pod["metadata"]["name"]
            spec, status = pod.get("spec") or {}, pod.get("status") or {}
            restarted = {
                s.get("name")
                for s in [
                    *(status.get("initContainerStatuses") or []),
                    *(status.get("containerStatuses") or []),
                ]
                if s.get("restartCount")
            }
            for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
                cname = container["name"]
                self._kubectl("logs", "-n", namespace, name, "-c", cname, "--tail=300")
                if cname in restarted:
                    self._kubectl(
                        "logs", "-n", namespace, name, "-c", cname, "--previous", "--tail=100"
                    )


def stderr_say(text: str) -> None:
    print(f"[e2e] {text}", file=sys.stderr, flush=True)
