"""The seed's walkthrough on one machine with the real control plane: build, apply, check.

``LabSession.open`` builds the namespaces (``topology``), starts the external server, the
upstream control plane with the operator and webhook (``cluster``) and the lab's node
(``kubelet``), and does the cluster
admin's and the user's steps with kubectl: namespaces ns1/ns2 labelled for injection,
Services my-service1/my-service2, the gateway label on node gw1. ``walkthrough`` applies
the ExternalService, creates the pods through the API (the webhook injects them), and
waits for ``READY n/n``. ``checks`` runs the seed's connectivity checks.

DNS is not emulated: pods dial the connector Service's ClusterIP where the seed's
``curl my-externalservice.external-services:8000`` would resolve the name to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from k8s_ext_connector.core.config import GatewayConfig, SourceIPConfig
from k8s_ext_connector.lab import netns, state
from k8s_ext_connector.lab.client import run_gets
from k8s_ext_connector.lab.cluster import (
    CONNECTOR_NAMESPACE,
    ES_PLURAL,
    GATEWAY_LABEL,
    INJECTION_LABEL,
    NODE_NAME,
    ControlPlane,
)
from k8s_ext_connector.lab.kubelet import Kubelet, PodRuntime, app_log_records, check_test_net
from k8s_ext_connector.lab.topology import (
    EXTERNAL_SERVER_IP,
    HTTP_PORTS,
    SOURCE_IPS,
    Lab,
)
from k8s_ext_connector.operator.desired import GATEWAY_CONFIGMAP

Obj = dict[str, Any]
Say = Callable[[str], None]
Ref = tuple[str, str]  # namespace, name


@dataclass(frozen=True)
class LabPod:
    namespace: str
    name: str
    service: str | None  # the source Service selecting it (None: no Service selects it)

    @property
    def labels(self) -> dict[str, str]:
        return {"app": self.service or self.name}


PODS = (
    LabPod("ns1", "my-pod1", "my-service1"),
    LabPod("ns2", "my-pod2", "my-service2"),
    LabPod("ns1", "other-pod", None),
)
SERVICE_PORT = 80


def seed_manifest(ports: tuple[tuple[int, int], ...] = ((8000, 8000),)) -> str:
    """The seed's example ExternalService, on the lab's TEST-NET addresses."""
    return yaml.safe_dump(
        {
            "apiVersion": "submariner.io/v1alpha1",
            "kind": "ExternalService",
            "metadata": {"name": "my-externalservice"},
            "spec": {
                "targetIP": EXTERNAL_SERVER_IP,
                "sources": [
                    {
                        "service": {"namespace": "ns1", "name": "my-service1"},
                        "sourceIP": SOURCE_IPS[0],
                    },
                    {
                        "service": {"namespace": "ns2", "name": "my-service2"},
                        "sourceIP": SOURCE_IPS[1],
                    },
                ],
                "ports": [
                    {"protocol": "TCP", "port": port, "targetPort": target}
                    for port, target in ports
                ],
            },
        },
        sort_keys=False,
    )


def parse_manifest(text: str) -> Ref:
    """The ExternalService's (namespace, name); refuses addresses outside TEST-NET."""
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise netns.LabError(f"the manifest is not YAML: {error}") from None
    if not isinstance(obj, dict) or obj.get("kind") != "ExternalService":
        raise netns.LabError("the manifest must be one ExternalService")
    check_test_net(json.dumps(obj.get("spec")), "the ExternalService")
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


def source_services(text: str) -> set[Ref]:
    """The (namespace, name) of the manifest's source Services."""
    spec = (yaml.safe_load(text) or {}).get("spec") or {}
    return {
        (str(s["service"].get("namespace", "")), str(s["service"].get("name", "")))
        for s in spec.get("sources") or []
        if isinstance(s, dict) and isinstance(s.get("service"), dict)
    }


@dataclass(frozen=True)
class Check:
    name: str
    expected: str
    seen: str
    skipped: bool = False

    @property
    def passed(self) -> bool:
        return not self.skipped and self.expected == self.seen

    @property
    def result(self) -> str:
        return "SKIP" if self.skipped else ("pass" if self.passed else "FAIL")


def all_passed(checks: list[Check]) -> bool:
    return bool(checks) and all(c.passed or c.skipped for c in checks)


def ingress_built() -> bool:
    return "ingress" in {f.name for f in dataclasses.fields(SourceIPConfig)}


def table(checks: list[Check]) -> str:
    rows = [("check", "expected", "seen", "result")]
    rows += [(c.name, c.expected, c.seen, c.result) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# Until READY n/n: seconds on a warm machine; a fresh machine's first run (binaries just
# built, caches cold) was seen to need more than 30 s once.
READY_TIMEOUT = 90.0


class LabSession:
    """Build with ``LabSession.open``; always ``close()``."""

    def __init__(self, lab: Lab, state_dir: Path, say: Say, connections: int = 10) -> None:
        self.lab = lab
        self.state_dir = state_dir
        self.say = say
        self.connections = connections
        self.plane: ControlPlane | None = None
        self.kubelet: Kubelet | None = None
        self._processes_lock = threading.Lock()  # the kubelet and the operator keeper write

    @property
    def cluster(self) -> ControlPlane:
        if self.plane is None:
            raise netns.LabError("the control plane is not up")
        return self.plane

    @property
    def node(self) -> Kubelet:
        if self.kubelet is None:
            raise netns.LabError("the lab's kubelet is not up")
        return self.kubelet

    # ---- bring-up ---------------------------------------------------------------------------
    @staticmethod
    def open(state_dir: Path, say: Say, connections: int = 10, mode: str = "run") -> LabSession:
        say(
            "building network namespaces: external server, gateway node gw1,"
            f" pods {', '.join(p.name for p in PODS)} (separate pod and external networks)"
        )
        lab = Lab.create([p.name for p in PODS])
        session = LabSession(lab, state_dir, say, connections)
        try:
            state.write_record(
                state_dir,
                state.LabRecord(os.getpid(), lab.prefix, str(lab.workdir), mode, time.time()),
            )
            session._bring_up()
        except BaseException:
            session.close()
            raise
        return session

    def _bring_up(self) -> None:
        say, lab = self.say, self.lab
        say(
            f"external server {EXTERNAL_SERVER_IP}: HTTP on"
            f" {', '.join(map(str, HTTP_PORTS))}, logging each client's source IP"
        )
        lab.start_external_server()
        say(
            "lab plays: the kubelet of node gw1 (runs pods as processes in their netns), kube-proxy"
            " (ClusterIP DNAT on gw1), the gateway DaemonSet's pod, the operator's Deployment"
            " (restarts), DNS (pods dial ClusterIPs); REAL: etcd, kube-apiserver,"
            " kube-controller-manager, kube-scheduler, kubectl, the operator, webhook, gateway and"
            " sidecars"
        )
        self.plane = plane = ControlPlane.start(
            lab, lab.workdir, self.state_dir / "kubeconfig", say
        )
        self.write_processes()
        plane.install()
        plane.on_operator_change(self.write_processes)
        plane.start_operator()
        plane.start_webhook()
        self.kubelet = kubelet = Kubelet(lab, plane, say)
        kubelet.on_change(self.write_processes)
        self.user("kubectl", "create", "namespace", "ns1")
        self.user("kubectl", "create", "namespace", "ns2")
        self.user("kubectl", "label", "namespace", "ns1", "ns2", "=".join(INJECTION_LABEL))
        for pod in PODS:
            if pod.service:
                manifest = {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": pod.service, "namespace": pod.namespace},
                    "spec": {
                        "selector": pod.labels,
                        "ports": [{"protocol": "TCP", "port": SERVICE_PORT}],
                    },
                }
                self.user(
                    "kubectl",
                    "apply",
                    "-f",
                    "-",
                    stdin=yaml.safe_dump(manifest),
                    show=f"kubectl apply -f {pod.service}.yaml  # selector app={pod.service},"
                    f" port {SERVICE_PORT}",
                )
        kubelet.register_node()
        self.user("kubectl", "label", "node", NODE_NAME, "=".join(GATEWAY_LABEL))
        kubelet.start()
        self.write_processes()

    def user(self, *argv: str, stdin: str | None = None, show: str = "") -> str:
        """A command the seed's user types (kubectl only), echoed as such."""
        assert argv[0] == "kubectl"
        self.say(f"user: $ {show or ' '.join(argv)}")
        return self.cluster.kubectl(*argv[1:], stdin=stdin)

    def walkthrough(self, manifest: str, timeout: float = READY_TIMEOUT) -> Ref:
        ref = self.apply(manifest)
        self.create_pods(source_services(manifest))
        self.wait_ready(ref, timeout)
        return ref

    def apply(self, manifest: str) -> Ref:
        ref = parse_manifest(manifest)
        self.user(
            "kubectl",
            "apply",
            "-f",
            "-",
            stdin=manifest,
            show="kubectl apply -f externalservice.yaml",
        )
        return ref

    def delete(self, ref: Ref, timeout: float = 15) -> None:
        self.user("kubectl", "delete", ES_PLURAL, ref[1], "-n", ref[0])
        plane = self.cluster
        _until(
            lambda: plane.externalservice(*ref) is None,
            timeout,
            f"ExternalService {ref[0]}/{ref[1]} to be gone (its finalizer released)",
        )

    def create_pods(self, sources: set[Ref], timeout: float = 10) -> None:
        """Pods after the ExternalService: the webhook injects only pods a source selects
        when they are created (earlier ones would be named in SidecarsMissing)."""
        plane = self.cluster
        for namespace in sorted({pod.namespace for pod in PODS}):
            # The ServiceAccount admission plugin refuses pods until the serviceaccount
            # controller made the namespace's `default` ServiceAccount.
            _until(
                lambda ns=namespace: plane.get("serviceaccounts", ns, "default"),  # type: ignore[misc]
                timeout,
                f"ServiceAccount {namespace}/default (the serviceaccount controller's)",
            )
        for pod in PODS:
            if pod.service and (pod.namespace, pod.service) in sources:
                _until(
                    lambda pod=pod: plane.webhook_selects(pod.namespace, pod.labels),  # type: ignore[misc]
                    timeout,
                    f"the webhook's cache to see a source selecting {pod.namespace}/{pod.name}",
                )
        for pod in PODS:
            if plane.get("pods", pod.namespace, pod.name) is not None:
                continue
            self.user(
                "kubectl",
                "run",
                pod.name,
                "-n",
                pod.namespace,
                "--image=python:3",
                f"--labels=app={pod.labels['app']}",
                "--restart=Never",
                "--command",
                "--",
                "python",
                "-m",
                "http.server",
                str(SERVICE_PORT),
            )
            stored = plane.get("pods", pod.namespace, pod.name) or {}
            spec = stored.get("spec") or {}
            injected = any(
                c.get("name") == "ext-connector"
                for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
            )
            how = (
                "WITH the ext-connector sidecar (injected by the webhook)"
                if injected
                else "as is (not injected)"
            )
            self.say(f"REAL API server: pod {pod.namespace}/{pod.name} stored {how}")

    def wait_ready(self, ref: Ref, timeout: float = READY_TIMEOUT) -> Obj:
        plane = self.cluster
        self.say(f"waiting for ExternalService {ref[0]}/{ref[1]} READY n/n (operator status)")

        def ready() -> Obj | None:
            es = plane.externalservice(*ref)
            if not es:
                return None
            status, meta = es.get("status") or {}, es["metadata"]
            n = len((es.get("spec") or {}).get("sources") or [])
            fresh = status.get("observedGeneration") == meta.get("generation")
            return es if fresh and n and status.get("ready") == f"{n}/{n}" else None

        try:
            es: Obj = _until(ready, timeout, f"ExternalService {ref[0]}/{ref[1]} READY n/n")
            return es
        except netns.LabError as error:
            raise netns.LabError(f"{error}\n{self.diagnose(ref)}") from None

    def diagnose(self, ref: Ref) -> str:
        es = self.cluster.externalservice(*ref) or {}
        conditions = (es.get("status") or {}).get("conditions") or []
        lines = [
            f"  {c.get('type')}={c.get('status')} {c.get('reason')}: {c.get('message')}"
            for c in conditions
        ]
        if self.cluster.operator is not None:
            lines.append("--- operator log (tail) ---")
            lines.append(self.cluster.operator.output()[-1500:])
        if self.kubelet is not None and self.kubelet.errors:
            lines.append("--- kubelet errors ---")
            lines += self.kubelet.errors[-5:]
        if self.kubelet is not None:
            for name, container in self.kubelet.containers():
                if container.process is not None:
                    lines.append(f"--- {name} log (tail) ---")
                    lines.append(container.process.output()[-1200:])
        return "\n".join(lines)

    # ---- checks -----------------------------------------------------------------------------
    def checks(self, ref: Ref) -> list[Check]:
        plane, kubelet = self.cluster, self.node
        es = plane.externalservice(*ref)
        if es is None:
            return [Check(f"ExternalService {ref[0]}/{ref[1]}", "exists", "not found")]
        spec = es.get("spec") or {}
        connector = plane.get("services", CONNECTOR_NAMESPACE, ref[1]) or {}
        cluster_ip = str((connector.get("spec") or {}).get("clusterIP") or "")
        ports = [int(p["port"]) for p in spec.get("ports") or []]
        target = f"{ref[1]}:{{port}}"
        checks: list[Check] = []
        selected: set[str] = set()
        for source in spec.get("sources") or []:
            service = source["service"]
            runtimes = self._selected(service["namespace"], service["name"])
            if not runtimes:
                checks.append(
                    Check(f"pods of {service['name']} -> {ref[1]}", source["sourceIP"], "no pod")
                )
            for runtime in runtimes:
                selected.add(runtime.key)
                for port in ports:
                    checks.append(
                        Check(
                            f"{runtime.name} -> {target.format(port=port)}",
                            str(source["sourceIP"]),
                            self._egress(runtime, cluster_ip, port),
                        )
                    )
        for runtime in sorted(kubelet.pods.values(), key=lambda r: r.key):
            if runtime.key not in selected and ports:
                outcome = self._egress(runtime, cluster_ip, ports[0], count=1)
                checks.append(
                    Check(f"{runtime.name} -> {target.format(port=ports[0])}", "refused", outcome)
                )
        return checks + self._ingress_checks(spec)

    def _selected(self, namespace: str, service: str) -> list[PodRuntime]:
        svc = self.cluster.get("services", namespace, service) or {}
        selector = (svc.get("spec") or {}).get("selector") or {}
        runtimes = []
        for pod in self.cluster.objects("pods", namespace):
            labels = pod["metadata"].get("labels") or {}
            runtime = self.node.runtime(namespace, pod["metadata"]["name"])
            if selector and runtime and all(labels.get(k) == v for k, v in selector.items()):
                runtimes.append(runtime)
        return sorted(runtimes, key=lambda r: r.key)

    def _egress(self, runtime: PodRuntime, cluster_ip: str, port: int, count: int = 0) -> str:
        if not cluster_ip:
            return "no ClusterIP"
        n = count or self.connections
        outcomes = netns.call_in_netns(
            runtime.lab_pod.netns, lambda: run_gets(cluster_ip, port, n), timeout=60
        )
        seen = sorted(
            {
                o.body
                if o.ok
                else ("refused" if "ConnectionRefused" in o.body else f"error: {o.body}")
                for o in outcomes
            }
        )
        return ",".join(seen)

    def _ingress_checks(self, spec: Obj) -> list[Check]:
        """The server back to each source Service through its source IP."""
        configmap = self.cluster.get("configmaps", CONNECTOR_NAMESPACE, GATEWAY_CONFIGMAP) or {}
        text = (configmap.get("data") or {}).get(f"{NODE_NAME}.yaml", "")
        config = GatewayConfig.from_dict(yaml.safe_load(text)) if text else None
        checks = []
        for source in spec.get("sources") or []:
            service = source["service"]
            source_ip = str(source["sourceIP"])
            held = config.source(source_ip) if config else None
            entries = tuple(getattr(held, "ingress", ())) if held else ()
            svc = self.cluster.get("services", service["namespace"], service["name"]) or {}
            expected = ",".join(
                r.name for r in self._selected(service["namespace"], service["name"])
            )
            for port in (svc.get("spec") or {}).get("ports") or []:
                name = f"server -> {source_ip}:{port['port']} ({service['name']})"
                if not entries:
                    reason = (
                        "ingress: not built yet"
                        if not ingress_built()
                        else "ingress: no entry in the gateway config yet"
                    )
                    checks.append(Check(name, expected or "a pod", reason, skipped=True))
                    continue
                checks.append(Check(name, expected, self._ingress(source_ip, int(port["port"]))))
        return checks

    def _ingress(self, source_ip: str, port: int) -> str:
        path = f"/lab-ingress-{uuid.uuid4().hex[:12]}"
        outcome = netns.call_in_netns(
            self.lab.ext_ns, lambda: run_gets(source_ip, port, 1, path), timeout=30
        )[0]
        if not outcome.ok:
            return "refused" if "ConnectionRefused" in outcome.body else f"error: {outcome.body}"
        reached = sorted(
            r.name
            for r in list(self.node.pods.values())
            if any(rec.get("path") == path for rec in app_log_records(r))
        )
        return ",".join(reached) or f"answered by no lab pod ({outcome.body})"

    def wait_checks(self, ref: Ref, timeout: float = 20) -> list[Check]:
        """Run the checks until they all pass (or are skipped), or the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            checks = self.checks(ref)
            if all_passed(checks) or time.monotonic() > deadline:
                return checks
            time.sleep(0.2)

    # ---- views ------------------------------------------------------------------------------
    def get_externalservices(self) -> str:
        return self.cluster.kubectl("get", ES_PLURAL, "-A")

    def write_processes(self) -> None:
        with self._processes_lock:
            self._write_processes()

    def _write_processes(self) -> None:
        processes: list[dict[str, object]] = []
        if self.plane is not None:
            processes += [
                {"name": name, "pid": pid, "netns": self.plane.upstream.netns or ""}
                for name, pid in self.plane.pids().items()
            ]
        if self.plane is not None and self.plane.operator is not None:
            processes.append(
                {
                    "name": "operator",
                    "pid": self.plane.operator.popen.pid,
                    "netns": self.plane.upstream.netns or "",
                    "restarts": self.plane.operator_restarts,
                }
            )
        processes += [
            {"name": p.name, "pid": p.popen.pid, "netns": self.lab.ext_ns}
            for p in self.lab.processes
            if p.name == "external-server"
        ]
        if self.kubelet is not None:
            processes += self.kubelet.processes()
        state.write_processes(self.state_dir, processes)

    # ---- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.plane is not None:
            self.plane.close()
        self.lab.close()


def _until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise netns.LabError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
