"""The parts of a node the lab plays itself: kubelet, kube-proxy, and the gateway DaemonSet's
pod. Every action is announced through ``say`` as the lab's, never the product's.

- **kubelet** of ``gw1``, with a client certificate for ``system:node:gw1`` in
  ``system:nodes`` (so the Node authorizer and NodeRestriction judge each call as they judge
  a real kubelet's): registers the Node (Ready, capacity, addresses) and renews its Lease in
  ``kube-node-lease`` (the node lifecycle controller's heartbeat). It runs the Pods the real
  scheduler bound to ``gw1``, each in the lab namespace named after it (``my-pod1``,
  ``my-pod2``, ``other-pod``: its "sandbox"); for each, it makes
  its ConfigMap, Secret and emptyDir volumes into files (re-synced every 0.2 s; a real
  kubelet takes up to a minute or so), runs the injected ``ext-connector`` init container
  (``restartPolicy: Always``) with the container's own args, paths mapped to those files,
  in the pod's netns; probes its ``/ready`` from the node and starts the app containers only
  once that startup probe passed (native sidecar semantics); restarts exited containers;
  reports ``phase``, ``podIP`` and container readiness in the Pod's status, which is
  what the operator's status is computed from. Every app container is played by the lab's
  echo server on port 80. A Pod being deleted (graceful deletion) has its processes stopped,
  then the kubelet deletes it for good (grace period 0), as a real one confirms a deletion.
- **gateway DaemonSet pod** on ``gw1`` once the node has the gateway label (the
  DaemonSet's nodeSelector): ``<node>.yaml`` of the ConfigMap ``ext-connector-gateway`` as
  a file (no Pod object names it, so the lab reads it as the administrator; a real kubelet
  reads it as the node), and ``k8s-ext-connector gateway`` with the chart's arguments in the
  gateway netns: ``--wait-for-config``, ``--host-key-secret`` (a GET through the API with
  the gateway ServiceAccount's token), its Lease, ``--manage-addresses ext0``; restarted if
  it exits.
- **kube-proxy** on ``gw1``: for Services with a selector, a nat OUTPUT DNAT from
  ClusterIP:port to the running pods (what the gateway's ingress relay dials). Services
  without endpoints, such as the connector Service, keep refusing (the Service CIDR is a
  local route in the gateway netns).

The sidecar follows its key file (a re-issued key Secret is picked up without a restart),
as on a real cluster.

Files the lab writes into a namespace are checked first: an address outside TEST-NET is
refused with an error instead of reaching a namespace.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import re
import shutil
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k8s_ext_connector.core.iptables import ChainSet, Jump, apply, comment
from k8s_ext_connector.lab import netns
from k8s_ext_connector.lab.cluster import (
    CONNECTOR_NAMESPACE,
    GATEWAY_LABEL,
    NODE_NAME,
    USER_AGENT,
    ApiCallError,
    ControlPlane,
    is_test_net,
)
from k8s_ext_connector.lab.topology import (
    GATEWAY_EXTERNAL_IP,
    GATEWAY_IFACE,
    POD_CIDR,
    POD_GATEWAY_IP,
    SERVICE_CIDR,
    CrashBackoff,
    Lab,
    Pod,
    Process,
)
from k8s_ext_connector.operator.desired import GATEWAY_CONFIGMAP, host_key_secret_name
from k8s_ext_connector.operator.snapshot import SIDECAR_CONTAINER

Obj = dict[str, Any]
Say = Callable[[str], None]
SYNC_INTERVAL = 0.2
APP_PORT = 80
BACKOFF_START, BACKOFF_MAX, BACKOFF_RESET = 0.5, 10.0, 60.0
PROXY_CHAIN = "LABPROXY-SERVICES"
KUBELET_AGENT = f"{USER_AGENT} (kubelet)"
NODE_LEASE_NAMESPACE = "kube-node-lease"
NODE_LEASE_SECONDS = 40  # a kubelet's default
NODE_LEASE_RENEW = 10.0
NODE_CAPACITY = {"cpu": "2", "memory": "4Gi", "pods": "110"}
_IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")


class NotTestNet(netns.LabError):
    pass


def check_test_net(text: str, what: str) -> None:
    """Refuse text (a config about to reach a namespace) naming a non-TEST-NET address."""
    for candidate in _IPV4.findall(text):
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(candidate)
            if not is_test_net(candidate):
                raise NotTestNet(
                    f"{what} names {candidate}, outside TEST-NET: the lab will not put it"
                    " into a namespace"
                )


def _write(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Write atomically (as a volume update swaps files); False if already so."""
    with contextlib.suppress(OSError):
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.chmod(mode)
    temporary.replace(path)
    return True


def _sync_dir(directory: Path, files: Mapping[str, bytes] | None, mode: int) -> bool:
    """Make ``directory`` hold exactly ``files`` (None: the object is gone: empty)."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = dict(files or {})
    changed = False
    for existing in directory.iterdir():
        if existing.name not in wanted and not existing.name.startswith("."):
            existing.unlink()
            changed = True
    for name, data in wanted.items():
        changed |= _write(directory / name, data, mode)
    return changed


def _digest(directory: Path) -> str:
    """Of the files in ``directory``; "" when there are none."""
    digest = hashlib.sha256()
    files = [
        p
        for p in (sorted(directory.glob("*")) if directory.is_dir() else [])
        if p.is_file() and not p.name.startswith(".")
    ]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest() if files else ""


def _probe_ready(ns: str, host: str, port: int, path: str = "/ready") -> bool:
    """An HTTP GET probe from the node (the gateway netns), as the kubelet sends it."""

    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                sock.settimeout(1)
                sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                head = sock.recv(64).split(b"\r\n", 1)[0].split()
                return len(head) > 1 and head[1].startswith(b"2")
        except OSError:
            return False

    return netns.call_in_netns(ns, probe, timeout=5)


@dataclass
class Container:
    """One process the kubelet keeps running (restartPolicy Always)."""

    name: str
    process: Process | None = None
    restarts: int = 0
    next_start: float = 0.0
    started: float = 0.0
    backoff: CrashBackoff = field(
        default_factory=lambda: CrashBackoff(BACKOFF_START, BACKOFF_MAX, reset_after=BACKOFF_RESET)
    )
    key_digest: str = ""  # of its key files when it started
    restart_reason: str = ""  # set when the lab itself stops it to start it again

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def restart(self, reason: str) -> None:
        """Stop it now; the next sync starts it again at once (no crash backoff)."""
        self.restart_reason = reason
        self.stop()

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.stop(timeout=5)


@dataclass
class PodRuntime:
    namespace: str
    name: str
    uid: str
    lab_pod: Pod
    root: Path
    sidecar_spec: Obj | None
    app_names: tuple[str, ...]
    volume_dirs: dict[str, Path] = field(default_factory=dict)
    secret_volumes: set[str] = field(default_factory=set)
    sidecar: Container = field(default_factory=lambda: Container(SIDECAR_CONTAINER))
    app: Container = field(default_factory=lambda: Container("app"))
    sidecar_ready: bool = False
    startup_passed: bool = False
    reported: Obj | None = None
    announced: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def app_log(self) -> Path:
        return self.root / "app.jsonl"

    def key_dirs(self) -> list[Path]:
        """Secret volumes the sidecar mounts (its SSH key)."""
        if self.sidecar_spec is None:
            return []
        return [
            self.volume_dirs[m["name"]]
            for m in self.sidecar_spec.get("volumeMounts") or []
            if m.get("name") in self.secret_volumes
        ]

    def key_digest(self) -> str:
        return "".join(_digest(d) for d in self.key_dirs())


class Kubelet:
    """See the module docstring. ``start()`` runs the sync loop on a thread."""

    def __init__(self, lab: Lab, plane: ControlPlane, say: Say, node: str = NODE_NAME) -> None:
        self.lab = lab
        self.plane = plane
        self.say = say
        self.node = node
        self.api = plane.node_client(node, KUBELET_AGENT)
        self.root = lab.workdir / f"node-{node}"
        self.pods: dict[tuple[str, str], PodRuntime] = {}
        self.gateway = Container("gateway")
        self.errors: list[str] = []
        # The announced deviation (module docstring); False is what a real kubelet does.
        self.restart_on_key_change = False  # the sidecar follows its key file itself
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proxy: ChainSet | None = None
        self._gateway_config_seen = ""
        self._unschedulable: set[str] = set()
        self._lease_renewed = 0.0
        self._gateway_kubeconfig: Path | None = None
        self._last_error = ""
        self._on_change: list[Callable[[], None]] = []

    # ---- node ---------------------------------------------------------------------------
    def register_node(self) -> None:
        # The pod network, as a node IPAM controller assigns it: the operator allows it
        # (and the InternalIP) to the gateway's SSH port.
        self.api.call(
            "POST",
            "/api/v1/nodes",
            {
                "metadata": {"name": self.node},
                "spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]},
            },
        )
        self.api.call(
            "PATCH",
            f"/api/v1/nodes/{self.node}/status",
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "the lab's kubelet",
                            "lastHeartbeatTime": _now(),
                            "lastTransitionTime": _now(),
                        }
                    ],
                    # Both of the node's own addresses, as a cloud provider reports a
                    # node's private and public ones: the operator refuses either as a
                    # sourceIP (NodeAddress) only if the Node lists it.
                    "addresses": [
                        {"type": "InternalIP", "address": POD_GATEWAY_IP},
                        {"type": "ExternalIP", "address": GATEWAY_EXTERNAL_IP},
                    ],
                    "capacity": NODE_CAPACITY,
                    "allocatable": NODE_CAPACITY,
                }
            },
            "application/strategic-merge-patch+json",
        )
        self._renew_lease()
        self.say(
            f"lab as kubelet: registered Node {self.node} as system:node:{self.node} (Ready,"
            f" InternalIP {POD_GATEWAY_IP}, ExternalIP {GATEWAY_EXTERNAL_IP}, podCIDR"
            f" {POD_CIDR}); it is the gateway netns; REAL: the scheduler binds the pods to it"
        )

    def _renew_lease(self) -> None:
        """The node's heartbeat: without it the node lifecycle controller marks the node
        NotReady after its grace period and taints it (pods are then evicted)."""
        if time.monotonic() - self._lease_renewed < NODE_LEASE_RENEW:
            return
        path = f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases"
        spec = {
            "holderIdentity": self.node,
            "leaseDurationSeconds": NODE_LEASE_SECONDS,
            "renewTime": _now(micro=True),
        }
        try:
            self.api.call(
                "PATCH", f"{path}/{self.node}", {"spec": spec}, "application/merge-patch+json"
            )
        except ApiCallError as error:
            if error.status != 404:
                raise
            self.api.call(
                "POST",
                path,
                {
                    "metadata": {
                        "name": self.node,
                        # As a kubelet's: the Node owns its Lease.
                        "ownerReferences": [self._node_owner()],
                    },
                    "spec": spec,
                },
            )
        self._lease_renewed = time.monotonic()

    def _node_owner(self) -> Obj:
        node = self.api.get("nodes", "", self.node) or {}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "name": self.node,
            "uid": (node.get("metadata") or {}).get("uid", ""),
        }

    def on_change(self, callback: Callable[[], None]) -> None:
        """Called (on the kubelet thread) after processes start or stop."""
        self._on_change.append(callback)

    # ---- loop -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lab-kubelet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as error:  # keep syncing, as a kubelet does; say it once
                text = f"{type(error).__name__}: {error}"
                if text != self._last_error:
                    self._last_error = text
                    self.errors.append(text)
                    self.say(f"lab as kubelet: sync failed: {text}")
                    if not isinstance(error, netns.LabError | ApiCallError):
                        traceback.print_exc(file=sys.stderr)
            self._stop.wait(SYNC_INTERVAL)

    def sync_once(self) -> None:
        with self._lock:
            self._renew_lease()
            changed = self._sync_pods()
            changed |= self._sync_gateway()
            self._sync_proxy()
        if changed:
            for callback in self._on_change:
                callback()

    # ---- pods -------------------------------------------------------------------------------
    def _sync_pods(self) -> bool:
        stored = {
            (p["metadata"]["namespace"], p["metadata"]["name"]): p
            for p in self.api.objects("pods", fieldSelector=f"spec.nodeName={self.node}")
        }
        changed = False
        for key, runtime in list(self.pods.items()):
            pod = stored.get(key)
            if (
                pod is None
                or pod["metadata"]["uid"] != runtime.uid
                or pod["metadata"].get("deletionTimestamp")
            ):
                self._stop_pod(runtime)
                del self.pods[key]
                changed = True
        for key, pod in stored.items():
            if pod["metadata"].get("deletionTimestamp"):
                self._confirm_deletion(pod)
                continue
            if key not in self.pods:
                scheduled = self._schedule(pod)
                if scheduled is None:
                    continue
                self.pods[key] = scheduled
            changed |= self._sync_pod(self.pods[key], pod)
        return changed

    def _confirm_deletion(self, pod: Obj) -> None:
        """A Pod being deleted whose containers are stopped: delete it for good (grace
        period 0), as a kubelet does; the API server keeps it until then."""
        meta = pod["metadata"]
        try:
            self.api.call(
                "DELETE",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )
        except ApiCallError as error:
            if error.status not in (404, 409):
                raise
            return
        self.say(f"lab as kubelet: pod {meta['namespace']}/{meta['name']} deleted (grace 0)")

    def _schedule(self, pod: Obj) -> PodRuntime | None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        lab_pod = self.lab.pods.get(name)
        busy = {r.lab_pod.name for r in self.pods.values()}
        if lab_pod is None or name in busy:
            if f"{namespace}/{name}" not in self._unschedulable:
                self._unschedulable.add(f"{namespace}/{name}")
                self.say(
                    f"lab as kubelet: pod {namespace}/{name} stays Pending: the lab has a"
                    f" netns only for {', '.join(sorted(self.lab.pods))} (one pod each)"
                )
            return None
        self._unschedulable.discard(f"{namespace}/{name}")
        spec = pod.get("spec") or {}
        containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
        sidecar = next((c for c in containers if c.get("name") == SIDECAR_CONTAINER), None)
        apps = tuple(
            str(c.get("name"))
            for c in spec.get("containers") or []
            if c.get("name") != SIDECAR_CONTAINER
        )
        root = self.root / "pods" / f"{namespace}_{name}_{pod['metadata']['uid'][:8]}"
        root.mkdir(parents=True, exist_ok=True)
        runtime = PodRuntime(namespace, name, pod["metadata"]["uid"], lab_pod, root, sidecar, apps)
        self.say(
            f"REAL scheduler bound pod {namespace}/{name} to {self.node}; lab as kubelet: runs"
            f" it in netns"
            f" {lab_pod.netns}, IP {lab_pod.ip};"
            + (
                " injected sidecar found: running it first"
                if sidecar
                else " no sidecar (not injected)"
            )
        )
        return runtime

    def _stop_pod(self, runtime: PodRuntime) -> None:
        runtime.app.stop()
        runtime.sidecar.stop()  # SIGTERM: the sidecar stops, its rules stay (fail closed)
        self.lab.reset_pod_network(runtime.lab_pod.name)  # the pod's netns would die here
        shutil.rmtree(runtime.root, ignore_errors=True)
        self.say(f"lab as kubelet: pod {runtime.key} is being deleted: its containers stopped")

    def _volumes(self, runtime: PodRuntime, pod: Obj) -> bool:
        """Materialise the pod's volumes; True if a file changed."""
        changed = False
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            name = str(volume.get("name"))
            directory = runtime.volume_dirs.setdefault(name, runtime.root / "volumes" / name)
            if "configMap" in volume:
                source = volume["configMap"]
                obj = self.api.get("configmaps", runtime.namespace, source.get("name", ""))
                files = (
                    {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
                    if obj
                    else None
                )
                for key, data in (files or {}).items():
                    check_test_net(
                        data.decode(errors="replace"), f"ConfigMap {source['name']}/{key}"
                    )
                changed |= _sync_dir(directory, files, 0o644)
            elif "secret" in volume:
                source = volume["secret"]
                obj = self.api.get("secrets", runtime.namespace, source.get("secretName", ""))
                files = (
                    {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
                    if obj
                    else None
                )
                changed |= _sync_dir(directory, files, int(source.get("defaultMode", 0o644)))
                runtime.secret_volumes.add(name)
            else:  # emptyDir and anything else: an empty directory
                directory.mkdir(parents=True, exist_ok=True)
        return changed

    def _sidecar_argv(self, runtime: PodRuntime) -> list[str]:
        """The container's args with each mountPath replaced by its volume's directory."""
        assert runtime.sidecar_spec is not None
        mounts = {
            str(m["mountPath"]).rstrip("/"): runtime.volume_dirs[m["name"]]
            for m in runtime.sidecar_spec.get("volumeMounts") or []
            if m.get("name") in runtime.volume_dirs
        }
        args = []
        for arg in [
            *(runtime.sidecar_spec.get("command") or [])[1:],
            *(runtime.sidecar_spec.get("args") or []),
        ]:
            for mount, directory in mounts.items():
                if arg == mount or arg.startswith(mount + "/"):
                    arg = str(directory) + arg[len(mount) :]
                    break
            args.append(arg)
        return [sys.executable, "-m", "k8s_ext_connector", *args]

    def _health_port(self, runtime: PodRuntime) -> int:
        assert runtime.sidecar_spec is not None
        probe = runtime.sidecar_spec.get("startupProbe") or runtime.sidecar_spec.get(
            "readinessProbe"
        )
        port = ((probe or {}).get("httpGet") or {}).get("port", 15021)
        return int(port)

    def _sync_pod(self, runtime: PodRuntime, pod: Obj) -> bool:
        changed = False
        try:
            self._volumes(runtime, pod)
        except NotTestNet as error:
            self._once(runtime, str(error), f"lab as kubelet: {runtime.key}: {error}")
            return False
        now = time.monotonic()
        if runtime.sidecar_spec is not None:
            sidecar = runtime.sidecar
            digest = runtime.key_digest()
            if sidecar.alive() and not sidecar.key_digest:
                sidecar.key_digest = digest  # it waits for its files and reads the first key
            if (
                self.restart_on_key_change
                and sidecar.alive()
                and sidecar.key_digest
                and digest not in ("", sidecar.key_digest)
            ):
                self.say(
                    f"lab as kubelet: {runtime.key}: the key Secret changed under the running"
                    " sidecar, which reads its key only at start: RESTARTING it (lab"
                    " deviation: a real kubelet would only update the file)"
                )
                sidecar.restart("restarted for its new key")
            if not sidecar.alive() and now >= sidecar.next_start:
                changed |= self._start_container(
                    runtime.key,
                    sidecar,
                    runtime.lab_pod.netns,
                    self._sidecar_argv(runtime),
                    f"{runtime.namespace}.{runtime.name}.{SIDECAR_CONTAINER}",
                )
                sidecar.key_digest = digest
                runtime.sidecar_ready = False
            was_ready = runtime.sidecar_ready
            runtime.sidecar_ready = sidecar.alive() and _probe_ready(
                self.lab.gw_ns, runtime.lab_pod.ip, self._health_port(runtime)
            )
            if runtime.sidecar_ready != was_ready:
                self.say(
                    f"lab as kubelet: {runtime.key}: sidecar /ready probe"
                    f" {'passes' if runtime.sidecar_ready else 'FAILS'}"
                )
            if runtime.sidecar_ready and not runtime.startup_passed:
                runtime.startup_passed = True
                self.say(
                    f"lab as kubelet: {runtime.key}: startup probe passed; starting the app"
                    " containers now (native sidecar order)"
                )
        app_may_start = runtime.sidecar_spec is None or runtime.startup_passed
        if app_may_start and not runtime.app.alive() and now >= runtime.app.next_start:
            changed |= self._start_container(
                runtime.key,
                runtime.app,
                runtime.lab_pod.netns,
                [
                    sys.executable,
                    "-m",
                    "k8s_ext_connector.lab.echo_server",
                    "--port",
                    str(APP_PORT),
                    "--log",
                    str(runtime.app_log),
                ],
                f"{runtime.namespace}.{runtime.name}.app",
                announce=f"app {'/'.join(runtime.app_names)} played by the lab's echo"
                f" server on :{APP_PORT}",
            )
        self._report(runtime)
        return changed

    def _once(self, runtime: PodRuntime, key: str, text: str) -> None:
        if key not in runtime.announced:
            runtime.announced.add(key)
            self.say(text)

    def _start_container(
        self,
        owner: str,
        container: Container,
        ns: str,
        argv: list[str],
        process_name: str,
        announce: str = "",
    ) -> bool:
        if container.process is not None:  # it ran before: this is a restart
            container.restarts += 1
            if container.restart_reason:
                reason, container.restart_reason = container.restart_reason, ""
            else:
                code = container.process.popen.poll()
                delay = container.backoff.after_exit(time.monotonic() - container.started)
                reason = f"exited ({code}); back-off {delay:.1f}s"
                container.next_start = time.monotonic() + delay
            self.say(
                f"lab as kubelet: {owner}: container {container.name} {reason};"
                f" restart #{container.restarts}"
            )
            container.process = None
            if time.monotonic() < container.next_start:
                return True
        container.process = self.lab.spawn(process_name, ns, argv)
        container.started = time.monotonic()
        self.say(
            f"lab as kubelet: {owner}: started {announce or container.name}"
            f" (pid {container.process.popen.pid})"
        )
        return True

    def _report(self, runtime: PodRuntime) -> None:
        app_up = runtime.app.alive()
        ip = runtime.lab_pod.ip

        def state(up: bool) -> Obj:
            return {"running": {}} if up else {"waiting": {"reason": "ContainerCreating"}}

        ready = app_up and (runtime.sidecar_spec is None or runtime.sidecar_ready)
        status: Obj = {
            "phase": "Running" if app_up else "Pending",
            "hostIP": POD_GATEWAY_IP,
            "hostIPs": [{"ip": POD_GATEWAY_IP}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            # Merged by type (strategic merge patch): the scheduler's PodScheduled stays.
            "conditions": [
                {"type": kind, "status": "True" if ready else "False"}
                for kind in ("ContainersReady", "Ready")
            ],
            "containerStatuses": [
                {
                    "name": name,
                    "ready": app_up,
                    "started": app_up,
                    "restartCount": runtime.app.restarts,
                    "image": "lab/echo-server",
                    "state": state(app_up),
                }
                for name in runtime.app_names
            ],
        }
        if runtime.sidecar_spec is not None:
            status["initContainerStatuses"] = [
                {
                    "name": SIDECAR_CONTAINER,
                    "ready": runtime.sidecar_ready,
                    "started": runtime.sidecar.alive(),
                    "restartCount": runtime.sidecar.restarts,
                    "image": str(runtime.sidecar_spec.get("image", "")),
                    "state": state(runtime.sidecar.alive()),
                }
            ]
        if status == runtime.reported:
            return
        try:
            self.api.call(
                "PATCH",
                f"/api/v1/namespaces/{runtime.namespace}/pods/{runtime.name}/status",
                {"status": status},
                "application/strategic-merge-patch+json",
            )
        except ApiCallError as error:
            if error.status != 404:  # deleted meanwhile: the next sync stops it
                raise
            return
        runtime.reported = status

    # ---- the gateway DaemonSet's pod --------------------------------------------------------
    def _sync_gateway(self) -> bool:
        directory = self.root / "gateway"
        config_dir = directory / "config"
        # No Pod object names the ConfigMap (the lab plays the DaemonSet's pod), so the Node
        # authorizer would refuse the node: read as the administrator.
        config = self.plane.get("configmaps", CONNECTOR_NAMESPACE, GATEWAY_CONFIGMAP)
        text = str(((config or {}).get("data") or {}).get(f"{self.node}.yaml", ""))
        if text:
            try:
                check_test_net(text, f"ConfigMap {GATEWAY_CONFIGMAP}/{self.node}.yaml")
            except NotTestNet as error:
                if text != self._gateway_config_seen:
                    self._gateway_config_seen = text
                    self.say(f"lab as gateway DaemonSet: {error}")
                return False
        _sync_dir(config_dir, {f"{self.node}.yaml": text.encode()} if text else None, 0o644)
        if text and text != self._gateway_config_seen:
            sources = text.count("sourceIP:")
            self.say(
                f"lab as kubelet: gateway pod's ConfigMap volume {GATEWAY_CONFIGMAP}/"
                f"{self.node}.yaml {'written' if not self._gateway_config_seen else 'updated'}"
                f" ({sources} source IP{'s' if sources != 1 else ''})"
            )
            self._gateway_config_seen = text
        gateway = self.gateway
        if gateway.alive() or time.monotonic() < gateway.next_start:
            return False
        if gateway.process is None and not self._gateway_node():
            return False
        if self._gateway_kubeconfig is None:
            self._gateway_kubeconfig = self.plane.service_account_kubeconfig("gateway")
        self._start_container(
            f"gateway pod on {self.node}",
            gateway,
            self.lab.gw_ns,
            [
                sys.executable,
                "-m",
                "k8s_ext_connector",
                "gateway",
                "--config",
                str(config_dir / f"{self.node}.yaml"),
                "--wait-for-config",
                "--host-key-secret",
                host_key_secret_name(self.node),
                "--namespace",
                CONNECTOR_NAMESPACE,
                "--kubeconfig",
                str(self._gateway_kubeconfig),
                "--node-name",
                self.node,
                "--manage-addresses",
                GATEWAY_IFACE,
            ],
            "gateway",
            announce=f"REAL `k8s-ext-connector gateway --host-key-secret"
            f" {host_key_secret_name(self.node)} --manage-addresses {GATEWAY_IFACE}` (its"
            f" ServiceAccount's token; host key and Lease through the API) in netns"
            f" {self.lab.gw_ns}",
        )
        return True

    def _gateway_node(self) -> bool:
        """Whether the DaemonSet's nodeSelector (the gateway label) selects this node."""
        node = self.api.get("nodes", "", self.node) or {}
        labels = (node.get("metadata") or {}).get("labels") or {}
        key, value = GATEWAY_LABEL
        return bool(labels.get(key) == value)

    def restart_gateway(self) -> None:
        """Stop the gateway process; the sync loop starts it again (a pod restart)."""
        with self._lock:
            self.gateway.restart("restarted (asked to)")

    # ---- kube-proxy ---------------------------------------------------------------------------
    def _sync_proxy(self) -> None:
        rules: list[str] = []
        network = ipaddress.ip_network(SERVICE_CIDR)
        for service in self.api.objects("services"):
            meta, spec = service["metadata"], service.get("spec") or {}
            selector = spec.get("selector") or {}
            cluster_ip = spec.get("clusterIP") or ""
            if not selector or not is_test_net(cluster_ip):
                continue
            if ipaddress.ip_address(cluster_ip) not in network:
                continue
            endpoints = sorted(
                r.lab_pod.ip
                for r in self.pods.values()
                if r.namespace == meta["namespace"]
                and r.app.alive()
                and self._labels_match(selector, r)
            )
            for port in spec.get("ports") or []:
                target = port.get("targetPort", port.get("port"))
                if not isinstance(target, int) or port.get("protocol", "TCP") != "TCP":
                    continue
                for index, ip in enumerate(endpoints):
                    left = len(endpoints) - index
                    pick = (
                        f"-m statistic --mode random --probability {1 / left:.11f} "
                        if left > 1
                        else ""
                    )
                    name = f"{meta['namespace']}/{meta['name']}:{port['port']}"
                    rules.append(
                        f"-d {cluster_ip}/32 -p tcp {comment(name)}"
                        f" -m tcp --dport {port['port']} {pick}"
                        f"-j DNAT --to-destination {ip}:{target}"
                    )
        desired = ChainSet(
            table="nat",
            chains={PROXY_CHAIN: tuple(rules)},
            jumps=(Jump("OUTPUT", f"{comment('lab kube-proxy: Services')} -j {PROXY_CHAIN}"),),
            owned_prefix="LABPROXY-",
        )
        if desired == self._proxy:
            return
        apply(_NetnsIptables(self.lab.gw_ns), desired)
        if self._proxy is not None or rules:
            self.say(
                f"lab as kube-proxy: {len(rules)} ClusterIP DNAT rule(s) in the gateway netns"
                " (Services with running pods)"
            )
        self._proxy = desired

    def _labels_match(self, selector: Mapping[str, str], runtime: PodRuntime) -> bool:
        pod = self.api.get("pods", runtime.namespace, runtime.name) or {}
        labels = (pod.get("metadata") or {}).get("labels") or {}
        return all(labels.get(k) == v for k, v in selector.items())

    # ---- views --------------------------------------------------------------------------------
    def runtime(self, namespace: str, name: str) -> PodRuntime | None:
        with self._lock:
            return self.pods.get((namespace, name))

    def containers(self) -> list[tuple[str, Container]]:
        """The gateway's and every pod's sidecar container, for diagnostics."""
        with self._lock:
            listed = [("gateway", self.gateway)]
            listed += [
                (f"{r.key} {SIDECAR_CONTAINER}", r.sidecar)
                for r in self.pods.values()
                if r.sidecar_spec is not None
            ]
            return listed

    def processes(self) -> list[dict[str, object]]:
        with self._lock:
            listed: list[tuple[str, Container, str]] = [("gateway", self.gateway, self.lab.gw_ns)]
            for runtime in self.pods.values():
                if runtime.sidecar_spec is not None:
                    listed.append(
                        (
                            f"{runtime.key} {SIDECAR_CONTAINER}",
                            runtime.sidecar,
                            runtime.lab_pod.netns,
                        )
                    )
                listed.append((f"{runtime.key} app", runtime.app, runtime.lab_pod.netns))
            return [
                {
                    "name": name,
                    "pid": c.process.popen.pid if c.process else None,
                    "netns": ns,
                    "restarts": c.restarts,
                }
                for name, c, ns in listed
                if c.process is not None
            ]


def _now(micro: bool = False) -> str:
    """A timestamp as the API writes it (MicroTime for Leases)."""
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class _NetnsIptables:
    """iptables-nft in a lab namespace."""

    ns: str

    def save(self, table: str) -> str:
        return netns.sh(["ip", "netns", "exec", self.ns, "iptables-nft-save", "-t", table]).stdout

    def restore(self, text: str) -> None:
        netns.sh(
            ["ip", "netns", "exec", self.ns, "iptables-nft-restore", "--noflush", "--wait"],
            input_text=text,
        )


def app_log_records(runtime: PodRuntime) -> list[dict[str, object]]:
    if not runtime.app_log.exists():
        return []
    records = []
    for line in runtime.app_log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records
