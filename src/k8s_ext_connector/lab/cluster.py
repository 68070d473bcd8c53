"""The lab's control plane: the project's API emulator, the real webhook and the real operator.

What runs, and who plays which part:

- **API server**: ``emulator.ApiServer`` on 127.0.0.1 (thread), with a kubeconfig at a
  known path, so ``kubectl --kubeconfig ...`` works against it. Its Service ClusterIPs come
  from the lab's Service CIDR (``LabApiServer``), as a cluster's
  ``--service-cluster-ip-range`` would make them: the lab's namespaces only ever see
  TEST-NET addresses.
- **Admission**: the emulator's admission hook ``emulator.admission.webhook_admission``
  makes the call kube-apiserver makes, with the chart's MutatingWebhookConfiguration and
  its caBundle (a CA made with ``certs/tls.py``). The Service -> webhook pod routing that
  kube-proxy and DNS would do is a URL map to the webhook's 127.0.0.1 port.
- **Webhook**: ``webhook.main.serve`` (the real command's body) on an event loop thread.
- **Operator**: ``k8s-ext-connector operator --no-leader-election``, a subprocess that
  dies with its parent. The lab plays its Deployment: an operator that exits is reaped and
  started again after a crash back-off (``CrashBackoff``, as the kubelet's), and the
  restart is announced and counted (``lab status``).

The kubelet, scheduler and kube-proxy are the lab's own (``lab/kubelet.py``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
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
from k8s_ext_connector.emulator import ApiError, ApiServer
from k8s_ext_connector.emulator.admission import webhook_admission
from k8s_ext_connector.emulator.clients import run_kubectl
from k8s_ext_connector.emulator.resources import Registry
from k8s_ext_connector.emulator.server import SYSTEM_NAMESPACES, AdmissionHook
from k8s_ext_connector.emulator.store import Store
from k8s_ext_connector.lab.netns import LabError
from k8s_ext_connector.lab.topology import SERVICE_CIDR, CrashBackoff, Process
from k8s_ext_connector.webhook.inject import InjectionSettings
from k8s_ext_connector.webhook.main import WebhookCommand, serve
from k8s_ext_connector.webhook.server import WebhookServer

T = TypeVar("T")
Obj = dict[str, Any]
Say = Callable[[str], None]

CONNECTOR_NAMESPACE = "external-services"
WEBHOOK_SERVICE = "k8s-ext-connector-webhook"
OPERATOR_POLL_SECONDS = 0.2
NODE_NAME = "gw1"
GATEWAY_LABEL = GATEWAY_NODE_LABEL  # an administrator's label (NodeRestriction)
INJECTION_LABEL = ("external-service-injection", "enabled")
ES_GROUP, ES_VERSION, ES_PLURAL = "submariner.io", "v1alpha1", "externalservices"
USER_AGENT = "k8s-ext-connector-lab"
TEST_NETS = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)


def chart_dir() -> Path:
    """The Helm chart of this checkout (the lab installs its CRD and webhook configuration)."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "charts" / "k8s-ext-connector"
        if (candidate / "crds").is_dir():
            return candidate
    raise LabError("charts/k8s-ext-connector not found: run the lab from a source checkout")


def kubectl_binary() -> str:
    """kubectl on PATH, else the one ``make install`` fetched into the checkout's .tools/bin."""
    found = shutil.which("kubectl")
    if found:
        return found
    with contextlib.suppress(LabError):
        local = chart_dir().parents[1] / ".tools" / "bin" / "kubectl"
        if local.exists():
            return str(local)
    raise LabError("kubectl is not installed (`make install` fetches it into .tools/bin)")


def is_test_net(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in TEST_NETS)


class _ServiceCidrStore(Store):
    """The emulator's store, allocating ClusterIPs from ``cidr`` instead of 10.96.0.0/12.

    The emulator has no setting for its range (its allocator is fixed to 10.96.x.y); a
    real API server takes ``--service-cluster-ip-range``. Only the choice of a free
    address differs: explicit, kept and headless ClusterIPs behave as in ``Store``.
    """

    def __init__(self, registry: Registry, cidr: str) -> None:
        super().__init__(registry)
        self._network = ipaddress.ip_network(cidr)

    def _cluster_ip(self, svc: Obj, current: Obj | None) -> None:
        spec = svc.setdefault("spec", {})
        kept = (current or {}).get("spec", {}).get("clusterIP")
        if (
            spec.get("type", "ClusterIP") != "ExternalName"
            and not spec.get("clusterIP")
            and not kept
        ):
            used = {
                obj.get("spec", {}).get("clusterIP")
                for rt, obj in self.iter_all()
                if (rt.group, rt.kind) == ("", "Service")
            }
            # The first address is the `kubernetes` Service's on a real cluster: skip it.
            free = (str(ip) for ip in list(self._network.hosts())[1:] if str(ip) not in used)
            spec["clusterIP"] = next(free, None)
            if spec["clusterIP"] is None:
                raise ApiError(
                    500, "InternalError", f"failed to allocate a serviceIP: {self._network} is full"
                )
        super()._cluster_ip(svc, current)


class LabApiServer(ApiServer):
    """``ApiServer`` whose Service ClusterIPs come from ``service_cidr``."""

    def __init__(self, service_cidr: str, admission_hook: AdmissionHook | None = None) -> None:
        super().__init__(admission_hook)
        self.store = _ServiceCidrStore(self.registry, service_cidr)
        for name in SYSTEM_NAMESPACES:
            self.create_object(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )


class LoopThread:
    """An asyncio event loop on a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

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


@dataclass
class ControlPlane:
    """Build with ``ControlPlane.start``; always ``close()``."""

    api: LabApiServer
    kubeconfig: Path
    workdir: Path
    say: Say
    kubectl_path: str = "kubectl"
    ca: Issued | None = None
    webhook: WebhookServer | None = None
    operator: Process | None = None
    operator_restarts: int = 0
    operator_backoff: CrashBackoff = field(default_factory=CrashBackoff)
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
    def start(workdir: Path, kubeconfig: Path, say: Say) -> ControlPlane:
        api = LabApiServer(SERVICE_CIDR)
        plane = ControlPlane(api, kubeconfig, workdir, say, kubectl_binary())
        try:
            plane._stack.enter_context(api.run_in_thread())
            kubeconfig.parent.mkdir(parents=True, exist_ok=True)
            api.write_kubeconfig(kubeconfig)
            say(
                f"API server: the project's emulator at {api.url}, Service CIDR {SERVICE_CIDR};"
                f" kubeconfig {kubeconfig}"
            )
        except BaseException:
            plane.close()
            raise
        return plane

    # ---- clients ------------------------------------------------------------------------
    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = run_kubectl(
            self.kubeconfig, args, stdin, self.workdir / "kube-cache", self.kubectl_path
        )
        if check and result.returncode != 0:
            raise LabError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout + (result.stderr if result.returncode else "")

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        content_type: str = "application/json",
        agent: str = USER_AGENT,
    ) -> Obj:
        """One API request over HTTP (so it is recorded and, for pods, admitted)."""
        # The URL is always the emulator's http://127.0.0.1:<port> plus an API path.
        request = urllib.request.Request(  # noqa: S310
            self.api.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": content_type, "User-Agent": agent},
        )
        try:
            with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310
                result: Obj = json.loads(response.read() or b"{}")
                return result
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:300]
            raise ApiCallError(error.code, f"{method} {path}: {error.code} {detail}") from None

    def get(self, plural: str, namespace: str, name: str, group: str = "") -> Obj | None:
        version = ES_VERSION if group == ES_GROUP else "v1"
        return self.api.get_object(group, version, plural, namespace, name)

    def objects(self, plural: str, namespace: str | None = None, group: str = "") -> list[Obj]:
        version = ES_VERSION if group == ES_GROUP else "v1"
        try:
            return self.api.list_objects(group, version, plural, namespace)
        except KeyError:  # a CRD not created yet
            return []

    def externalservice(self, namespace: str, name: str) -> Obj | None:
        try:
            return self.get(ES_PLURAL, namespace, name, ES_GROUP)
        except KeyError:
            return None

    # ---- what the chart will install ---------------------------------------------------------
    def install(self) -> None:
        chart = chart_dir()
        for crd in sorted((chart / "crds").glob("*.yaml")):
            self.kubectl("apply", "-f", str(crd))
        self.kubectl("create", "namespace", CONNECTOR_NAMESPACE)
        self.say(f"installed the CRD from {chart / 'crds'}; namespace {CONNECTOR_NAMESPACE}")

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
            host="127.0.0.1",
            port=0,
            kubeconfig=str(self.kubeconfig),
            injection=InjectionSettings(),
            drain_seconds=0,
            log_level="info",
        )
        self._loop = LoopThread("lab-webhook")
        started: list[WebhookServer] = []
        self._webhook_stop = self._loop.call(asyncio.Event)
        self._webhook_serving = asyncio.run_coroutine_threadsafe(
            serve(command, self._webhook_stop, started.append), self._loop.loop
        )
        _wait(lambda: bool(started) or self._webhook_serving.done(), 15, "the webhook to listen")
        if not started:
            self._webhook_serving.result(0)  # raises what stopped it
        self.webhook = started[0]
        url = f"https://127.0.0.1:{self.webhook.port}"
        _wait(lambda: self._webhook_ready(), 15, "the webhook's cache to sync")
        configuration = yaml.safe_load(
            (chart_dir() / "files" / "mutatingwebhookconfiguration.yaml").read_text()
        )
        for hook in configuration["webhooks"]:
            hook["clientConfig"]["caBundle"] = base64.b64encode(ca.cert_pem).decode()
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(configuration))
        self.api.admission_hook = webhook_admission(
            self.api, {(CONNECTOR_NAMESPACE, WEBHOOK_SERVICE): url}
        )
        self.say(
            f"webhook: `webhook` serve() at {url} (TLS from a lab CA via certs/tls.py);"
            " the chart's MutatingWebhookConfiguration applied with that caBundle; the"
            " emulator's admission hook makes the API server's call"
            f" ({WEBHOOK_SERVICE}.{CONNECTOR_NAMESPACE}.svc -> {url})"
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
        process = self._spawn_operator()
        self.say(
            "operator: `k8s-ext-connector operator --kubeconfig ... --no-leader-election`"
            f" (pid {process.popen.pid}); the lab restarts it if it exits, as its Deployment"
            " would"
        )
        self._operator_keeper = threading.Thread(
            target=self._keep_operator, name="lab-operator-keeper", daemon=True
        )
        self._operator_keeper.start()
        return process

    def on_operator_change(self, callback: Callable[[], None]) -> None:
        self._operator_callbacks.append(callback)

    def _spawn_operator(self) -> Process:
        log_path = self.workdir / "operator.log"
        handle = log_path.open("ab")
        popen = subprocess.Popen(
            [
                "setpriv",
                "--pdeathsig",
                "KILL",  # dies with the lab, even if the lab is killed
                "--",
                sys.executable,
                "-m",
                "k8s_ext_connector",
                "operator",
                "--kubeconfig",
                str(self.kubeconfig),
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
        self.api.admission_hook = None
        self._stack.close()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def control_plane(workdir: Path, kubeconfig: Path, say: Say) -> Iterator[ControlPlane]:
    plane = ControlPlane.start(workdir, kubeconfig, say)
    try:
        yield plane
    finally:
        plane.close()
