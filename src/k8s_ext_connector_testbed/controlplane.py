"""A local upstream control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Configured as a production cluster is (docs/kubernetes.md has each flag and why): mutual
TLS everywhere (etcd included), client certificates from one CA, a ServiceAccount token
issuer, ``--authorization-mode=Node,RBAC``, the admission plugins kubeadm's clusters run
plus NodeRestriction, controllers with one ServiceAccount each. Not run: kubelet,
kube-proxy, DNS (no node runs pods; a Pod stays Pending unless a test binds it).

Where: by default every process listens on free ports of 127.0.0.1 in this machine's own
namespace (nothing about its network changes), so several instances run at once. With
``netns=`` every process runs inside that (caller-made) network namespace and listens on
``address`` there; the harness's own calls then join the namespace too.

Teardown: ``close()`` (the context manager's exit) kills every process and removes the
instance directory, also when start-up failed half-way. The processes die with the
process that started them (``setpriv --pdeathsig KILL``; start it from a thread that
lives as long as the instance: the signal follows the *thread* that forked), SIGTERM
unwinds through ``close()`` when no other handler is installed, and the directories of
instances whose process is gone are removed by the next ``start()``.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

import yaml

from k8s_ext_connector.certs.tls import Issued
from k8s_ext_connector.lab.netns import call_in_netns
from k8s_ext_connector_testbed import audit, binaries, pki

T = TypeVar("T")
Obj = dict[str, Any]

# TEST-NET-3, clear of every address the lab uses (pods 198.51.100.0/25, its Service CIDR
# 198.51.100.128/25, the external network's 203.0.113.1/.10/.11/.200/.201). Only the API
# server knows this range: nothing routes it unless a caller's namespace does.
DEFAULT_SERVICE_CIDR = "203.0.113.64/26"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# kubeadm's defaults (NamespaceLifecycle, LimitRanger, ServiceAccount, PodSecurity, the
# webhook and policy plugins, ResourceQuota, ... are on by default in v1.34) named
# explicitly, plus NodeRestriction, which kubeadm adds.
ADMISSION_PLUGINS = (
    "NamespaceLifecycle",
    "LimitRanger",
    "ServiceAccount",
    "PodSecurity",
    "Priority",
    "DefaultTolerationSeconds",
    "DefaultStorageClass",
    "StorageObjectInUseProtection",
    "PersistentVolumeClaimResize",
    "RuntimeClass",
    "CertificateApproval",
    "CertificateSigning",
    "CertificateSubjectRestriction",
    "DefaultIngressClass",
    "TaintNodesByCondition",
    "MutatingAdmissionWebhook",
    "ValidatingAdmissionWebhook",
    "ValidatingAdmissionPolicy",
    "ResourceQuota",
    "NodeRestriction",
)
BASE_DIR_NAME = "extconn-controlplanes"
STOP_GRACE_SECONDS = 3.0
_counter = itertools.count()


class ControlPlaneError(RuntimeError):
    pass


@dataclass(frozen=True)
class Ports:
    apiserver: int
    etcd_client: int
    etcd_peer: int
    controller_manager: int
    scheduler: int


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


def base_dir() -> Path:
    return Path(tempfile.gettempdir()) / BASE_DIR_NAME


def sweep_orphans(root: Path | None = None) -> list[Path]:
    """Remove instance directories (``<pid>-<n>``) whose creating process is gone."""
    root = root or base_dir()
    removed = []
    for entry in sorted(root.glob("*-*")) if root.is_dir() else []:
        pid = entry.name.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def kubeconfig_yaml(server: str, ca_pem: bytes, user: Obj, name: str = "extconn") -> str:
    """A kubeconfig with everything inline (the files can move or be read as one)."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": name,
                    "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)},
                }
            ],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name,
        },
        sort_keys=False,
    )


def client_cert_user(issued: Issued) -> Obj:
    return {
        "client-certificate-data": base64.b64encode(issued.cert_pem).decode(),
        "client-key-data": base64.b64encode(issued.key_pem).decode(),
    }


class ControlPlane:
    """One control plane; use as a context manager (``with ControlPlane() as cp:``)."""

    def __init__(
        self,
        *,
        netns: str | None = None,
        address: str = "127.0.0.1",
        service_cidr: str = DEFAULT_SERVICE_CIDR,
        start_timeout: float = 120.0,
        say: Callable[[str], None] | None = None,
        audit_log: bool = False,
    ) -> None:
        network = ipaddress.ip_network(service_cidr)
        self.netns = netns
        self.address = address
        self.service_cidr = service_cidr
        self.kubernetes_service_ip = str(next(network.hosts()))
        self.start_timeout = start_timeout
        self._say = say or (lambda text: None)
        self.audit_log = audit_log  # record every request (audit.py; ``audit_calls``)
        self.binaries = binaries.find()
        self.directory = base_dir() / f"{os.getpid()}-{next(_counter)}"
        self._processes: list[_Process] = []
        self._previous_sigterm: Any = None
        self.ports: Ports | None = None
        self.pki: pki.ClusterPki | None = None
        self.startup_seconds: float | None = None
        self._files: pki.PkiFiles | None = None
        self._tls: ssl.SSLContext | None = None

    # ---- paths ------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        """The administrator's kubeconfig (system:masters)."""
        return self.directory / "admin.kubeconfig"

    @property
    def server(self) -> str:
        assert self.ports is not None, "not started"
        return f"https://{self.address}:{self.ports.apiserver}"

    @property
    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self._processes}

    # ---- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> ControlPlane:
        self._install_sigterm()
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        started = time.monotonic()
        sweep_orphans()
        self.directory.mkdir(parents=True, mode=0o700)
        self.ports = Ports(*(self._in_ns(self._free_port) for _ in range(5)))
        self.pki = pki.cluster_pki(self.address, self.kubernetes_service_ip)
        files = self._files = pki.write(self.pki, self.directory / "pki")
        for stem, _, _ in pki.CLIENTS:
            user = client_cert_user(self.pki.clients[stem])
            self._write(
                f"{stem}.kubeconfig", kubeconfig_yaml(self.server, self.pki.ca.cert_pem, user)
            )
        deadline = started + self.start_timeout
        self._spawn("etcd", self._etcd_args(files))
        self._spawn("kube-apiserver", self._apiserver_args(files))
        self._wait(deadline, "kube-apiserver /readyz", lambda: self._get_status("/readyz") == 200)
        self._spawn("kube-controller-manager", self._controller_manager_args(files))
        self._spawn("kube-scheduler", self._scheduler_args(files))
        for name, port in (
            ("kube-controller-manager", self.ports.controller_manager),
            ("kube-scheduler", self.ports.scheduler),
        ):
            url = f"https://{self.address}:{port}/healthz"
            self._wait(deadline, f"{name} /healthz", lambda u=url: self._healthz(u))  # type: ignore[misc]
        # Pods can be created in `default` once its ServiceAccount (ServiceAccount admission)
        # and the root CA ConfigMap (projected token volumes) exist.
        for path in (
            "/api/v1/namespaces/default/serviceaccounts/default",
            "/api/v1/namespaces/default/configmaps/kube-root-ca.crt",
        ):
            self._wait(deadline, f"GET {path}", lambda p=path: self._get_status(p) == 200)  # type: ignore[misc]
        self.startup_seconds = time.monotonic() - started
        self._say(f"control plane up in {self.startup_seconds:.1f}s at {self.server}")

    def close(self) -> None:
        """Stop every process, last started first (SIGTERM, SIGKILL after a grace), then
        remove the directory. In that order each stops at once: an API server whose
        controllers still watch it, or an etcd whose API server still talks to it, lingers."""
        self._restore_sigterm()  # a second SIGTERM now ends us; pdeathsig and the sweep clean up
        for process in reversed(self._processes):
            if process.popen.poll() is None:
                process.popen.terminate()
            try:
                process.popen.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        self._processes.clear()
        shutil.rmtree(self.directory, ignore_errors=True)

    # ---- clients ----------------------------------------------------------------------------
    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input_text: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """kubectl of the pinned release against this control plane (admin by default)."""
        argv = [*self._ns_prefix(), str(self.binaries.kubectl)]
        argv += ["--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        result = subprocess.run(
            argv,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def api(
        self,
        method: str,
        path: str,
        body: Obj | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Obj]:
        """One API call as the administrator: (HTTP status, decoded JSON body); a body that
        is not JSON (``/readyz`` answers ``ok``) comes back as ``{"text": ...}``. A PATCH
        names its kind in ``content_type`` (``application/merge-patch+json``, ...)."""

        def call() -> tuple[int, Obj]:
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(self.server + path, data=data, method=method)  # noqa: S310
            request.add_header("Content-Type", content_type)
            try:
                with urllib.request.urlopen(request, context=self._client_tls(), timeout=10) as r:  # noqa: S310
                    return r.status, _decode(r.read())
            except urllib.error.HTTPError as error:
                return error.code, _decode(error.read())

        return self._in_ns(call)

    def service_account_kubeconfig(
        self, namespace: str, name: str, expiration_seconds: int = 3600
    ) -> Path:
        """A kubeconfig holding a token of ServiceAccount ``namespace/name`` (TokenRequest)."""
        assert self.pki is not None, "not started"
        status, body = self.api(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
        )
        if status != 201:
            raise ControlPlaneError(
                f"TokenRequest for serviceaccount {namespace}/{name}: HTTP {status}"
                f" {body.get('message', body)}"
            )
        text = kubeconfig_yaml(
            self.server, self.pki.ca.cert_pem, {"token": body["status"]["token"]}
        )
        return self._write(f"sa-{namespace}-{name}.kubeconfig", text)

    def audit_calls(self, user: str | None = None) -> list[audit.AuditCall]:
        """The resource requests the API server recorded so far (``audit_log=True``)."""
        assert self.audit_log, "started without audit_log=True"
        return audit.read(self.directory / "audit" / "audit.log", user)

    def node_kubeconfig(self, node: str) -> Path:
        """A kubeconfig with the client certificate a kubelet of ``node`` holds
        (``system:node:<node>`` in ``system:nodes``): what the Node authorizer and the
        NodeRestriction admission plugin judge."""
        assert self.pki is not None, "not started"
        user = client_cert_user(pki.node_client(self.pki.ca, node))
        text = kubeconfig_yaml(self.server, self.pki.ca.cert_pem, user)
        return self._write(f"node-{node}.kubeconfig", text)

    # ---- processes --------------------------------------------------------------------------
    def _ns_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _spawn(self, name: str, args: list[str]) -> None:
        binary = str(getattr(self.binaries, name.replace("-", "_")))
        log = self.directory / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *self._ns_prefix(), binary, *args]
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self._processes.append(_Process(name, popen, log))

    def _wait(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        while True:
            for process in self._processes:
                if process.popen.poll() is not None:
                    raise ControlPlaneError(
                        f"{process.name} exited {process.popen.returncode} while waiting for"
                        f" {what}; last log lines:\n{_tail(process.log)}"
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{_tail(p.log)}" for p in self._processes)
                raise ControlPlaneError(f"{what} not ready within {self.start_timeout}s\n{logs}")
            time.sleep(0.1)

    def _etcd_args(self, files: pki.PkiFiles) -> list[str]:
        assert self.ports is not None
        client = f"https://127.0.0.1:{self.ports.etcd_client}"
        peer = f"http://127.0.0.1:{self.ports.etcd_peer}"  # one member: no peer traffic
        return [
            "--name=default",
            f"--data-dir={self.directory / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            f"--cert-file={files.cert('etcd-server')}",
            f"--key-file={files.key('etcd-server')}",
            "--client-cert-auth=true",
            f"--trusted-ca-file={files.cert('ca')}",
            # A test's data is thrown away: fsync only slows it on a shared, busy disk.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self, files: pki.PkiFiles) -> list[str]:
        assert self.ports is not None
        return [
            f"--advertise-address={self.address}",
            f"--bind-address={self.address}",
            f"--secure-port={self.ports.apiserver}",
            f"--etcd-servers=https://127.0.0.1:{self.ports.etcd_client}",
            f"--etcd-cafile={files.cert('ca')}",
            f"--etcd-certfile={files.cert('apiserver-etcd-client')}",
            f"--etcd-keyfile={files.key('apiserver-etcd-client')}",
            f"--cert-dir={self.directory / 'apiserver'}",
            f"--tls-cert-file={files.cert('apiserver')}",
            f"--tls-private-key-file={files.key('apiserver')}",
            f"--client-ca-file={files.cert('ca')}",
            f"--kubelet-client-certificate={files.cert('apiserver-kubelet-client')}",
            f"--kubelet-client-key={files.key('apiserver-kubelet-client')}",
            "--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname",
            f"--proxy-client-cert-file={files.cert('front-proxy-client')}",
            f"--proxy-client-key-file={files.key('front-proxy-client')}",
            f"--requestheader-client-ca-file={files.cert('front-proxy-ca')}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={files.sa_pub}",
            f"--service-account-signing-key-file={files.sa_key}",
            f"--service-cluster-ip-range={self.service_cidr}",
            "--authorization-mode=Node,RBAC",
            f"--enable-admission-plugins={','.join(ADMISSION_PLUGINS)}",
            "--allow-privileged=true",
            "--enable-bootstrap-token-auth=true",
            # Webhooks (and aggregated APIs) are called at an endpoint's IP, not the
            # Service's ClusterIP: no kube-proxy runs on the API server's side.
            "--enable-aggregator-routing=true",
            "--profiling=false",
            *(audit.apiserver_args(self.directory / "audit") if self.audit_log else []),
        ]

    def _component_common(
        self, files: pki.PkiFiles, stem: str, serving: str, port: int
    ) -> list[str]:
        kubeconfig = self.directory / f"{stem}.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={self.address}",
            f"--secure-port={port}",
            f"--tls-cert-file={files.cert(serving)}",
            f"--tls-private-key-file={files.key(serving)}",
            f"--client-ca-file={files.cert('ca')}",
            f"--requestheader-client-ca-file={files.cert('front-proxy-ca')}",
            "--leader-elect=false",  # one instance; electing costs seconds at start
            "--profiling=false",
        ]

    def _controller_manager_args(self, files: pki.PkiFiles) -> list[str]:
        assert self.ports is not None
        return [
            *self._component_common(
                files,
                pki.CONTROLLER_MANAGER[0],
                "controller-manager-serving",
                self.ports.controller_manager,
            ),
            # kubeadm's set: every default controller plus the bootstrap-token ones.
            "--controllers=*,bootstrapsigner,tokencleaner",
            "--use-service-account-credentials=true",  # each controller its own identity
            f"--root-ca-file={files.cert('ca')}",
            f"--service-account-private-key-file={files.sa_key}",
            f"--cluster-signing-cert-file={files.cert('ca')}",
            f"--cluster-signing-key-file={files.key('ca')}",
            f"--service-cluster-ip-range={self.service_cidr}",
        ]

    def _scheduler_args(self, files: pki.PkiFiles) -> list[str]:
        assert self.ports is not None
        return self._component_common(
            files, pki.SCHEDULER[0], "scheduler-serving", self.ports.scheduler
        )

    # ---- helpers ----------------------------------------------------------------------------
    def _write(self, name: str, text: str) -> Path:
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return path

    def _free_port(self) -> int:
        with socket.socket() as sock:
            sock.bind((self.address, 0))
            return int(sock.getsockname()[1])

    def _in_ns(self, function: Callable[[], T]) -> T:
        return call_in_netns(self.netns, function) if self.netns else function()

    def _client_tls(self) -> ssl.SSLContext:
        if self._tls is None:
            assert self.pki is not None, "not started"
            assert self._files is not None, "not started"
            self._tls = ssl.create_default_context(cadata=self.pki.ca.cert_pem.decode())
            admin = pki.ADMIN[0]
            self._tls.load_cert_chain(self._files.cert(admin), self._files.key(admin))
        return self._tls

    def _get_status(self, path: str) -> int:
        with contextlib.suppress(OSError):
            return self.api("GET", path)[0]
        return 0

    def _healthz(self, url: str) -> bool:
        assert self.pki is not None
        context = ssl.create_default_context(cadata=self.pki.ca.cert_pem.decode())

        def call() -> bool:
            try:
                with urllib.request.urlopen(url, context=context, timeout=5) as response:  # noqa: S310
                    return bool(response.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        return self._in_ns(call)

    # SIGTERM -> SystemExit, so ``with`` blocks unwind through close(); only when nobody
    # else handles SIGTERM, and only on the main thread (where Python delivers signals).
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._previous_sigterm = signal.signal(signal.SIGTERM, handler)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def _decode(data: bytes) -> Obj:
    try:
        decoded = json.loads(data or b"{}")
    except ValueError:
        return {"text": data.decode(errors="replace")}
    return decoded if isinstance(decoded, dict) else {"value": decoded}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def control_plane(**kwargs: Any) -> Iterator[ControlPlane]:
    with ControlPlane(**kwargs) as instance:
        yield instance
