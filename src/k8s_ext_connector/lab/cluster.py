"""The lab's control plane: upstream Kubernetes, the real webhook and the real operator.

What runs, and who plays which part:

- **API server, controller-manager, scheduler, etcd**: the pinned upstream binaries
  (``k8s_ext_connector_testbed.ControlPlane``: mTLS, Node,RBAC authorization, the
  production admission plugins with NodeRestriction), inside the lab's control-plane
  netns at ``CONTROL_PLANE_IP`` on the pod network (``Lab.add_control_plane``), with the
  lab's Service CIDR. The gateway node and the pods reach it there; this host's kubectl
  reaches it through a TCP relay on 127.0.0.1 (``Relay``: the root namespace gets no
  address or route), which the administrator's kubeconfig names.
- **Installed as the chart does**: its CRD, the connector namespace, one ServiceAccount per
  component with the chart's RBAC (``operator/rbac.py``, which the chart renders), the
  chart's MutatingWebhookConfiguration with the lab CA's caBundle, and the webhook Service
  with an EndpointSlice at the webhook's address: the API server calls the webhook itself
  (``--enable-aggregator-routing``: at the endpoint, no kube-proxy needed).
- **Webhook**: ``webhook.main.serve`` (the real command's body) on an event loop thread that
  joined the control-plane netns, listening on ``CONTROL_PLANE_IP``, with its
  ServiceAccount's token.
- **Operator**: ``k8s-ext-connector operator --no-leader-election`` with its
  ServiceAccount's token, a subprocess in the control-plane netns that dies with its
  parent. The lab plays its Deployment: an operator that exits is reaped and started again
  after a crash back-off (``CrashBackoff``, as the kubelet's), and the restart is
  announced and counted (``lab status``).

The kubelet, kube-proxy and the gateway DaemonSet's pod are the lab's own (``lab/kubelet.py``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from k8s_ext_connector.certs.tls import (
    Issued,
    generate_ca,
    issue_serving_cert,
    service_dns_names,
    write_pair,
)
from k8s_ext_connector.core.api import GATEWAY_NODE_LABEL
from k8s_ext_connector.lab import netns
from k8s_ext_connector.lab.netns import LabError
from k8s_ext_connector.lab.topology import (
    CONTROL_PLANE_IP,
    SERVICE_CIDR,
    CrashBackoff,
    Lab,
    Process,
)
from k8s_ext_connector.operator import rbac
from k8s_ext_connector.webhook.inject import InjectionSettings
from k8s_ext_connector.webhook.main import WebhookCommand, serve
from k8s_ext_connector.webhook.server import WebhookServer
from k8s_ext_connector_testbed import binaries, pki
from k8s_ext_connector_testbed.controlplane import (
    ControlPlane as Upstream,
)
from k8s_ext_connector_testbed.controlplane import (
    ControlPlaneError,
    client_cert_user,
    kubeconfig_yaml,
)

T = TypeVar("T")
Obj = dict[str, Any]
Say = Callable[[str], None]

CONNECTOR_NAMESPACE = "external-services"  # also the release's namespace in the lab
WEBHOOK_SERVICE = "k8s-ext-connector-webhook"
WEBHOOK_PORT = 8443
OPERATOR_POLL_SECONDS = 0.2
NODE_NAME = "gw1"
GATEWAY_LABEL = GATEWAY_NODE_LABEL  # an administrator's label (NodeRestriction)
INJECTION_LABEL = ("external-service-injection", "enabled")
ES_GROUP, ES_VERSION, ES_PLURAL = "submariner.io", "v1alpha1", "externalservices"
USER_AGENT = "k8s-ext-connector-lab"
# The components' tokens and the cluster's certificates last as long as a lab may stay up.
TOKEN_SECONDS = 24 * 3600 - 600
TEST_NETS = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)


def component_name(component: str) -> str:
    """The chart's name for a component's ServiceAccount and RBAC objects."""
    return f"k8s-ext-connector-{component}"


def chart_dir() -> Path:
    """The Helm chart of this checkout (the lab installs its CRD and webhook configuration)."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "charts" / "k8s-ext-connector"
        if (candidate / "crds").is_dir():
            return candidate
    raise LabError("charts/k8s-ext-connector not found: run the lab from a source checkout")


def kubectl_binary() -> str:
    """The pinned kubectl ``make install`` built with the control plane (the user's)."""
    try:
        return str(binaries.find().kubectl)
    except binaries.MissingBinaries as error:
        raise LabError(str(error)) from None


def is_test_net(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in TEST_NETS)


class LoopThread:
    """An asyncio event loop on a daemon thread."""

    def __init__(self, name: str, ns: str | None = None) -> None:
        """``ns``: the thread joins that network namespace first (so do the threads it
        starts): the loop's sockets are that namespace's."""
        self.loop = asyncio.new_event_loop()
        self._ns = ns
        self._joined = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._joined.wait(10)
        if self._error is not None:
            raise LabError(f"thread {name} could not join netns {ns}: {self._error}")

    def _main(self) -> None:
        try:
            if self._ns:
                netns.join(self._ns)
        except OSError as error:
            self._error = error
            self._joined.set()
            return
        self._joined.set()
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, function: Callable[[], T], timeout: float = 10.0) -> T:
        async def call() -> T:
            return function()

        return self.run(call(), timeout)

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class ApiCallError(LabError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Relay:
    """TCP from 127.0.0.1:``port`` of this namespace to ``host:target_port`` in netns ``ns``.

    The API server listens inside the lab; this host's kubectl, and the lab's own clients,
    reach it here without an address or route in the root namespace. Bytes are relayed as
    they are (TLS end to end: the server's certificate names 127.0.0.1 too).
    """

    def __init__(self, ns: str, host: str, target_port: int) -> None:
        self.ns, self.host, self.target_port = ns, host, target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="lab-api-relay", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = netns.call_in_netns(
                    self.ns,
                    lambda: socket.create_connection((self.host, self.target_port), timeout=10),
                    timeout=15,
                )
            except (OSError, LabError):
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
        finally:
            with self._lock:
                self._sockets.discard(source)
            source.close()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for end in list(self._sockets):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class ApiClient:
    """API calls as one identity (a client certificate), through the relay."""

    server: str
    context: ssl.SSLContext
    agent: str = USER_AGENT

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        content_type: str = "application/json",
    ) -> Obj:
        request = urllib.request.Request(  # noqa: S310 - https://127.0.0.1:<relay> + a path
            self.server + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": content_type, "User-Agent": self.agent},
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=15) as response:  # noqa: S310
                result: Obj = json.loads(response.read() or b"{}")
                return result
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:400]
            raise ApiCallError(error.code, f"{method} {path}: {error.code} {detail}") from None

    def get(self, plural: str, namespace: str, name: str, group: str = "") -> Obj | None:
        try:
            return self.call("GET", f"{_collection(plural, namespace, group)}/{name}")
        except ApiCallError as error:
            if error.status == 404:
                return None
            raise

    def objects(
        self, plural: str, namespace: str | None = None, group: str = "", **query: str
    ) -> list[Obj]:
        path = _collection(plural, namespace, group)
        if query:
            path += "?" + urllib.parse.urlencode(query)
        try:
            items: list[Obj] = self.call("GET", path).get("items") or []
        except ApiCallError as error:
            if error.status == 404:  # a CRD not established yet
                return []
            raise
        return items


def _collection(plural: str, namespace: str | None, group: str = "") -> str:
    base = f"/apis/{group}/{ES_VERSION if group == ES_GROUP else 'v1'}" if group else "/api/v1"
    return f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"


@dataclass
class ControlPlane:
    """Build with ``ControlPlane.start``; always ``close()``."""

    lab: Lab
    kubeconfig: Path  # the administrator's, through the relay: what the user's kubectl uses
    workdir: Path
    say: Say
    upstream: Upstream
    relay: Relay | None = None
    admin: ApiClient | None = None
    kubectl_path: str = "kubectl"
    ca: Issued | None = None
    webhook: WebhookServer | None = None
    operator: Process | None = None
    operator_restarts: int = 0
    operator_backoff: CrashBackoff = field(default_factory=CrashBackoff)
    _operator_kubeconfig: Path | None = None
    _operator_started: float = 0.0
    _operator_keeper: threading.Thread | None = None
    _operator_callbacks: list[Callable[[], None]] = field(default_factory=list)
    _operator_lock: threading.Lock = field(default_factory=threading.Lock)
    _closing: threading.Event = field(default_factory=threading.Event)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _loop: LoopThread | None = None
    _webhook_stop: asyncio.Event | None = None
    _webhook_serving: Any = None

    @staticmethod
    def start(lab: Lab, workdir: Path, kubeconfig: Path, say: Say) -> ControlPlane:
        ns = lab.add_control_plane()
        try:
            upstream = Upstream(
                netns=ns, address=CONTROL_PLANE_IP, service_cidr=SERVICE_CIDR, start_timeout=120
            )
        except binaries.MissingBinaries as error:
            raise LabError(str(error)) from None
        plane = ControlPlane(lab, kubeconfig, workdir, say, upstream, kubectl_path=kubectl_binary())
        try:
            started = time.monotonic()
            try:
                plane._stack.enter_context(upstream)
            except ControlPlaneError as error:
                raise LabError(f"the control plane did not start: {error}") from None
            assert upstream.ports is not None
            plane.relay = relay = Relay(ns, CONTROL_PLANE_IP, upstream.ports.apiserver)
            plane._stack.callback(relay.close)
            assert upstream.pki is not None
            admin = upstream.pki.clients[pki.ADMIN[0]]
            kubeconfig.parent.mkdir(parents=True, exist_ok=True)
            kubeconfig.write_text(
                kubeconfig_yaml(
                    f"https://127.0.0.1:{relay.port}",
                    upstream.pki.ca.cert_pem,
                    client_cert_user(admin),
                    "k8s-ext-connector-lab",
                )
            )
            kubeconfig.chmod(0o600)
            plane.admin = plane.client(admin, "admin", USER_AGENT)
            say(
                f"REAL: etcd {binaries.ETCD_VERSION}, kube-apiserver, kube-controller-manager,"
                f" kube-scheduler {binaries.KUBE_VERSION} up in {time.monotonic() - started:.1f}s"
                f" in netns {ns} at {upstream.server} (Node,RBAC; NodeRestriction; Service CIDR"
                f" {SERVICE_CIDR})"
            )
            say(
                f"lab: this host reaches the API server through a relay on 127.0.0.1:{relay.port};"
                f" kubeconfig {kubeconfig} (administrator, pinned kubectl {plane.kubectl_path})"
            )
        except BaseException:
            plane.close()
            raise
        return plane

    # ---- clients ------------------------------------------------------------------------
    def client(self, issued: Issued, stem: str, agent: str) -> ApiClient:
        """An API client presenting ``issued`` (files under the work directory, 0600)."""
        assert self.upstream.pki is not None
        assert self.relay is not None
        directory = self.workdir / "clients"
        write_pair(directory, issued, f"{stem}.crt", f"{stem}.key")
        context = ssl.create_default_context(cadata=self.upstream.pki.ca.cert_pem.decode())
        context.load_cert_chain(directory / f"{stem}.crt", directory / f"{stem}.key")
        return ApiClient(f"https://127.0.0.1:{self.relay.port}", context, agent)

    def node_client(self, node: str, agent: str) -> ApiClient:
        """As a kubelet is: ``system:node:<node>`` in ``system:nodes`` (Node authorizer and
        NodeRestriction decide what it may do)."""
        assert self.upstream.pki is not None
        issued = pki.client_certificate(
            self.upstream.pki.ca, f"system:node:{node}", ("system:nodes",)
        )
        return self.client(issued, f"node-{node}", agent)

    @property
    def api(self) -> ApiClient:
        if self.admin is None:
            raise LabError("the control plane is not up")
        return self.admin

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        """The pinned kubectl with the administrator's kubeconfig, as the user types it."""
        result = subprocess.run(
            [
                self.kubectl_path,
                "--kubeconfig",
                str(self.kubeconfig),
                "--cache-dir",
                str(self.workdir / "kube-cache"),
                *args,
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise LabError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout + (result.stderr if result.returncode else "")

    def call(
        self, method: str, path: str, body: object = None, content_type: str = "application/json"
    ) -> Obj:
        return self.api.call(method, path, body, content_type)

    def get(self, plural: str, namespace: str, name: str, group: str = "") -> Obj | None:
        return self.api.get(plural, namespace, name, group)

    def objects(self, plural: str, namespace: str | None = None, group: str = "") -> list[Obj]:
        return self.api.objects(plural, namespace, group)

    def externalservice(self, namespace: str, name: str) -> Obj | None:
        return self.get(ES_PLURAL, namespace, name, ES_GROUP)

    def pids(self) -> dict[str, int]:
        """The control plane's processes (``lab status``, ``lab down``)."""
        return dict(self.upstream.pids)

    # ---- what the chart installs ---------------------------------------------------------
    def install(self) -> None:
        chart = chart_dir()
        for crd in sorted((chart / "crds").glob("*.yaml")):
            self.kubectl("apply", "-f", str(crd))
        self.kubectl(
            "wait", "--for=condition=Established", "--timeout=30s",
            f"customresourcedefinition/{ES_PLURAL}.{ES_GROUP}",
        )  # fmt: skip
        self.kubectl("create", "namespace", CONNECTOR_NAMESPACE)
        documents: list[Obj] = []
        for component in ("operator", "webhook", "gateway"):
            documents.append(
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {
                        "name": component_name(component),
                        "namespace": CONNECTOR_NAMESPACE,
                    },
                }
            )
            documents += rbac.manifests(component, CONNECTOR_NAMESPACE, CONNECTOR_NAMESPACE)
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
        self.say(
            f"installed the chart's CRD (Established), namespace {CONNECTOR_NAMESPACE}, and a"
            " ServiceAccount with the chart's RBAC for each of operator, webhook, gateway"
        )

    def service_account_kubeconfig(self, component: str) -> Path:
        """A token of the component's ServiceAccount (TokenRequest), the API server at its
        address in the lab (for processes inside the lab's namespaces)."""
        try:
            return self.upstream.service_account_kubeconfig(
                CONNECTOR_NAMESPACE, component_name(component), TOKEN_SECONDS
            )
        except ControlPlaneError as error:
            raise LabError(str(error)) from None

    def start_webhook(self) -> None:
        ca = generate_ca("k8s-ext-connector-lab-webhook-ca", datetime.timedelta(days=1))
        tls_dir = self.workdir / "webhook-tls"
        write_pair(
            tls_dir,
            issue_serving_cert(
                ca,
                service_dns_names(WEBHOOK_SERVICE, CONNECTOR_NAMESPACE),
                datetime.timedelta(days=1),
            ),
        )
        self.ca = ca
        command = WebhookCommand(
            tls_dir=tls_dir,
            host=CONTROL_PLANE_IP,
            port=WEBHOOK_PORT,
            kubeconfig=str(self.service_account_kubeconfig("webhook")),
            injection=InjectionSettings(),
            drain_seconds=0,
            log_level="info",
        )
        self._loop = LoopThread("lab-webhook", self.upstream.netns)
        started: list[WebhookServer] = []
        self._webhook_stop = self._loop.call(asyncio.Event)
        self._webhook_serving = asyncio.run_coroutine_threadsafe(
            serve(command, self._webhook_stop, started.append), self._loop.loop
        )
        _wait(lambda: bool(started) or self._webhook_serving.done(), 15, "the webhook to listen")
        if not started:
            self._webhook_serving.result(0)  # raises what stopped it
        self.webhook = started[0]
        _wait(lambda: self._webhook_ready(), 15, "the webhook's cache to sync")
        port = self.webhook.port
        # The chart's Service selects the webhook's pods; the lab has no such pod, so the
        # Service has no selector and the lab writes its EndpointSlice (the endpoint slice
        # controller's part) at the webhook's address.
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": WEBHOOK_SERVICE, "namespace": CONNECTOR_NAMESPACE},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port}]},
        }
        endpoints = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{WEBHOOK_SERVICE}-lab",
                "namespace": CONNECTOR_NAMESPACE,
                "labels": {
                    "kubernetes.io/service-name": WEBHOOK_SERVICE,
                    "endpointslice.kubernetes.io/managed-by": "lab.k8s-ext-connector",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [CONTROL_PLANE_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        }
        configuration = yaml.safe_load(
            (chart_dir() / "files" / "mutatingwebhookconfiguration.yaml").read_text()
        )
        for hook in configuration["webhooks"]:
            hook["clientConfig"]["caBundle"] = base64.b64encode(ca.cert_pem).decode()
        self.kubectl(
            "apply", "-f", "-", stdin=yaml.safe_dump_all([service, endpoints, configuration])
        )
        self.say(
            f"REAL: the webhook (`webhook` serve(), its ServiceAccount's token) listens at"
            f" https://{CONTROL_PLANE_IP}:{port} in netns {self.upstream.netns}; the API server"
            " calls it through the chart's MutatingWebhookConfiguration (caBundle: the lab's"
            f" CA) and Service {WEBHOOK_SERVICE}.{CONNECTOR_NAMESPACE}, whose EndpointSlice the"
            " lab writes (no webhook pod runs)"
        )

    def _webhook_ready(self) -> bool:
        server, loop = self.webhook, self._loop
        assert server is not None
        assert loop is not None
        ready, _ = loop.call(server.ready)
        return ready

    def webhook_selects(self, namespace: str, labels: dict[str, str]) -> bool:
        """Whether the webhook's own watch cache has a source selecting such a pod yet."""
        server, loop = self.webhook, self._loop
        if server is None or loop is None:
            return False
        pod = {"metadata": {"namespace": namespace, "labels": labels}}
        return bool(loop.call(lambda: server.index.sources_for(pod)))

    def start_operator(self) -> Process:
        """Start the operator and keep it running, as its Deployment would: a process that
        exits is started again after a crash back-off (doubling, capped, reset once a run
        lasted long enough), and ``on_operator_change`` callbacks hear of every new pid."""
        self._operator_kubeconfig = self.service_account_kubeconfig("operator")
        process = self._spawn_operator()
        self.say(
            "REAL: operator `k8s-ext-connector operator --no-leader-election` with its"
            f" ServiceAccount's token (pid {process.popen.pid}) in netns {self.upstream.netns};"
            " lab: restarts it if it exits, as its Deployment would"
        )
        self._operator_keeper = threading.Thread(
            target=self._keep_operator, name="lab-operator-keeper", daemon=True
        )
        self._operator_keeper.start()
        return process

    def on_operator_change(self, callback: Callable[[], None]) -> None:
        self._operator_callbacks.append(callback)

    def _spawn_operator(self) -> Process:
        assert self._operator_kubeconfig is not None
        assert self.upstream.netns is not None
        log_path = self.workdir / "operator.log"
        handle = log_path.open("ab")
        popen = subprocess.Popen(
            [
                "setpriv",
                "--pdeathsig",
                "KILL",  # dies with the lab, even if the lab is killed
                "--",
                "ip",
                "netns",
                "exec",
                self.upstream.netns,
                sys.executable,
                "-m",
                "k8s_ext_connector",
                "operator",
                "--kubeconfig",
                str(self._operator_kubeconfig),
                "--no-leader-election",
                "--identity",
                "lab",
                "--log-level",
                "info",
            ],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        handle.close()
        self.operator = Process("operator", popen, log_path)
        self._operator_started = time.monotonic()
        return self.operator

    def _keep_operator(self) -> None:
        """Reap an exited operator (no zombie) and start it again after the back-off."""
        while not self._closing.wait(OPERATOR_POLL_SECONDS):
            process = self.operator
            if process is None or process.alive():
                continue
            ran = time.monotonic() - self._operator_started
            delay = self.operator_backoff.after_exit(ran)
            self.operator_restarts += 1
            self.say(
                f"as the operator's Deployment: operator pid {process.popen.pid} exited"
                f" ({process.popen.returncode}) after {ran:.1f}s; restart"
                f" #{self.operator_restarts} in {delay:.1f}s (crash back-off)"
            )
            if self._closing.wait(delay):
                return
            with self._operator_lock:
                if self._closing.is_set():
                    return
                restarted = self._spawn_operator()
            self.say(f"as the operator's Deployment: restarted it (pid {restarted.popen.pid})")
            for callback in self._operator_callbacks:
                callback()

    # ---- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        self._closing.set()
        if self._operator_keeper is not None:
            self._operator_keeper.join(10)
        with self._operator_lock:
            if self.operator is not None:
                with contextlib.suppress(Exception):
                    self.operator.stop(timeout=5)
        if self._loop is not None:
            if self._webhook_stop is not None and self._webhook_serving is not None:
                self._loop.loop.call_soon_threadsafe(self._webhook_stop.set)
                with contextlib.suppress(Exception):
                    self._webhook_serving.result(10)
            self._loop.close()
            self._loop = None
        self._stack.close()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
