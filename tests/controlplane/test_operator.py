"""The real operator (kopf's runner, as a subprocess) against a real API server.

The operator runs with its own ServiceAccount's token under the chart's RBAC (rendered by
helm), so a call its Role does not grant is a real 403; the API server's audit log says
what it asked for. The CRD is the chart's, enforced by the server. The user's actions go
through kubectl (the pinned release) as the cluster's administrator. The harness plays
the parts nothing runs here: the kubelet (Node Ready conditions and addresses, pod
container statuses including the sidecar's readiness; its pods name a scheduler that does
not run, so none is bound to a node no kubelet serves) and the webhook (pods are created
with the sidecar container already in them). Each is done explicitly below, as the
administrator, and named so.

One control plane serves the module; each test starts from the same state (the
``cluster`` fixture puts back what a test changed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s_ext_connector.core.api import (
    GATEWAY_NODE_LABEL,
    SELF_ASSIGNABLE_GATEWAY_LABEL,
    ServiceRef,
)
from k8s_ext_connector.core.gateway_status import lease_body
from k8s_ext_connector.operator import rbac
from k8s_ext_connector.webhook.inject import InjectionContext, inject
from k8s_ext_connector_testbed.controlplane import ControlPlane
from tests.chart.helm import RELEASE_NAMESPACE
from tests.controlplane import chartcluster as realcluster
from tests.controlplane.chartcluster import (  # noqa: F401
    CONNECTOR_NAMESPACE,
    control_plane,
)
from tests.unit.samples import SEED_MANIFEST

pytestmark = pytest.mark.kube
GATEWAY_LABEL = GATEWAY_NODE_LABEL[0]
SOURCE_NAMESPACES = ("ns1", "ns2")
NO_SCHEDULER = "example.com/no-scheduler"  # no scheduler of that name runs: pods stay unbound

SEED = SEED_MANIFEST  # the seed's example, unchanged


def _path(group: str, plural: str, namespace: str = "", name: str = "") -> str:
    path = "/api/v1" if not group else f"/apis/{group}/v1"
    if group == "submariner.io":
        path = "/apis/submariner.io/v1alpha1"
    path += f"/namespaces/{namespace}" if namespace else ""
    return f"{path}/{plural}" + (f"/{name}" if name else "")


@dataclass
class Objects:
    """Reading objects as the administrator."""

    cp: ControlPlane

    def get_object(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        status, body = self.cp.api("GET", _path(group, plural, namespace, name))
        assert status in (200, 404), (status, body)
        return body if status == 200 else None

    def list_objects(
        self, group: str, version: str, plural: str, namespace: str
    ) -> list[dict[str, Any]]:
        status, body = self.cp.api("GET", _path(group, plural, namespace))
        assert status == 200, (status, body)
        items: list[dict[str, Any]] = body["items"]
        return items


@dataclass
class Cluster:
    cp: ControlPlane
    workdir: Path
    operator: subprocess.Popen[bytes] | None = None
    audit_since: int = 0  # the operator's calls before this test (the audit log's index)

    @property
    def api(self) -> Objects:
        return Objects(self.cp)

    @property
    def operator_kubeconfig(self) -> Path:
        return realcluster.kubeconfig(self.cp, "operator")

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = self.cp.kubectl(*args, input_text=stdin, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
        return result.stdout

    def http(
        self,
        method: str,
        path: str,
        body: object = None,
        content_type: str = "application/merge-patch+json",
    ) -> dict[str, Any]:
        status, result = self.cp.api(method, path, body, content_type)  # type: ignore[arg-type]
        assert status < 300, (method, path, status, result)
        return result

    # -- the kubelet's part --------------------------------------------------------------
    def node(self, name: str, ready: bool = True, gateway: bool = True) -> None:
        labels = {GATEWAY_LABEL: "true"} if gateway else {}
        if self.api.get_object("", "v1", "nodes", "", name) is None:
            self.http(
                "POST",
                "/api/v1/nodes",
                {"metadata": {"name": name, "labels": labels}},
                "application/json",
            )
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {
            "type": "Ready",
            "status": "True" if ready else "False",
            "reason": "KubeletReady" if ready else "KubeletNotReady",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        self.http(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            {"status": {"conditions": [condition]}},
            "application/strategic-merge-patch+json",
        )

    def pod(
        self, namespace: str, name: str, app: str, sidecar: bool = True, ready: bool = True
    ) -> None:
        """A pod as the webhook would have injected it and the kubelet would report it."""
        body: dict[str, Any] = {
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": {
                "schedulerName": NO_SCHEDULER,
                "containers": [{"name": "app", "image": "app"}],
            },
        }
        if sidecar:
            body = inject(body, InjectionContext((ServiceRef(namespace, app),)))
        created = self.http(
            "POST", f"/api/v1/namespaces/{namespace}/pods", body, "application/json"
        )
        sidecars = [c["name"] for c in created["spec"].get("initContainers", [])]
        statuses = [_status(n, ready) for n in sidecars]
        self.http(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            {
                "status": {
                    "phase": "Running",
                    "initContainerStatuses": statuses,
                    "containerStatuses": [_status("app", True)],
                }
            },
        )

    # -- reading -------------------------------------------------------------------------
    def es(self, name: str = "my-externalservice", namespace: str = "default") -> dict[str, Any]:
        obj = self.api.get_object("submariner.io", "v1alpha1", "externalservices", namespace, name)
        return obj or {}

    def condition(
        self, kind: str, name: str = "my-externalservice", namespace: str = "default"
    ) -> tuple[str, str]:
        for c in self.es(name, namespace).get("status", {}).get("conditions", []):
            if c["type"] == kind:
                return c["status"], c["reason"]
        return "", ""

    def wait(self, what: Callable[[], object], describe: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = what()
            if value:
                return value
            time.sleep(0.05)
        log = (self.workdir / "operator.log").read_text()[-3000:]
        status = json.dumps(self.es().get("status"), indent=1)[-2000:]
        raise AssertionError(
            f"timed out waiting for {describe}\n--- status ---\n{status}\n--- log ---\n{log}"
        )

    def start_operator(
        self,
        *extra: str,
        log_name: str = "operator.log",
    ) -> subprocess.Popen[bytes]:
        """The operator as the chart runs it: its own token, its Lease in the release
        namespace."""
        handle = (self.workdir / log_name).open("ab")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "k8s_ext_connector",
                "operator",
                "--kubeconfig",
                str(self.operator_kubeconfig),
                "--lease-namespace",
                RELEASE_NAMESPACE,
                "--log-level",
                "info",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        handle.close()
        return process


def _status(name: str, ready: bool) -> dict[str, Any]:
    """A container status with the fields a kubelet writes."""
    return {
        "name": name,
        "ready": ready,
        "restartCount": 0,
        "image": "example.com/image:1",
        "imageID": "",
        "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}},
    }


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _source_services(c: Cluster) -> None:
    for ns, name in (("ns1", "my-service1"), ("ns2", "my-service2")):
        c.kubectl(
            "apply",
            "-f",
            "-",
            stdin=yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"selector": {"app": name}, "ports": [{"port": 80}]},
                }
            ),
        )


def _reset(c: Cluster) -> None:
    """Back to the module's starting state: no ExternalService (finalizers dropped: no
    operator runs now), none of the objects a test made, no nodes."""
    for es in c.api.list_objects("submariner.io", "v1alpha1", "externalservices", ""):
        meta = es["metadata"]
        path = _path("submariner.io", "externalservices", meta["namespace"], meta["name"])
        c.cp.api("PATCH", path, {"metadata": {"finalizers": None}}, "application/merge-patch+json")
        c.cp.api("DELETE", path)
    kinds = "services,configmaps,secrets,pods,leases,events"
    for ns in (*SOURCE_NAMESPACES, CONNECTOR_NAMESPACE):
        c.kubectl("delete", kinds, "--all", "-n", ns, "--wait=false")
    c.kubectl("delete", "leases,events", "--all", "-n", RELEASE_NAMESPACE, "--wait=false")
    c.kubectl("delete", "events", "--all", "-n", "default", "--wait=false")
    c.kubectl("delete", "nodes", "--all", "--wait=false")


@pytest.fixture(scope="module")
def namespaces(control_plane: ControlPlane) -> ControlPlane:  # noqa: F811
    """The source namespaces, each with its ``default`` ServiceAccount (pods need it)."""
    for ns in SOURCE_NAMESPACES:
        control_plane.kubectl("create", "ns", ns)
    for ns in SOURCE_NAMESPACES:
        deadline = time.monotonic() + 30
        path = f"/api/v1/namespaces/{ns}/serviceaccounts/default"
        while control_plane.api("GET", path)[0] != 200:
            assert time.monotonic() < deadline, f"no default ServiceAccount in {ns}"
            time.sleep(0.1)
    return control_plane


@pytest.fixture
def cluster(namespaces: ControlPlane, tmp_path: Path) -> Iterator[Cluster]:
    """The CRD and the chart's RBAC, the source namespaces and Services, a gateway node,
    and the operator running with its own token."""
    c = Cluster(namespaces, tmp_path)
    try:
        _source_services(c)
        c.node("gw1")
        c.audit_since = len(realcluster.calls(c.cp, "operator"))
        c.operator = c.start_operator("--no-leader-election")
        yield c
    finally:
        _stop(c.operator)
        _reset(c)


def ready_pods(c: Cluster) -> None:
    c.pod("ns1", "my-pod1", "my-service1")
    c.pod("ns2", "my-pod2", "my-service2")


def test_seed_example_becomes_ready_with_every_object(cluster: Cluster) -> None:
    c = cluster
    ready_pods(c)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "Ready")

    service = c.api.get_object("", "v1", "services", "external-services", "my-externalservice")
    assert service is not None
    assert "selector" not in service["spec"]
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]
    for ns, svc in (("ns1", "my-service1"), ("ns2", "my-service2")):
        secret = c.api.get_object("", "v1", "secrets", ns, f"ext-connector-{svc}-key")
        assert secret is not None
        assert secret["type"] == "kubernetes.io/ssh-auth"
        cm = c.api.get_object("", "v1", "configmaps", ns, f"ext-connector-{svc}")
        assert cm is not None
        sidecar = yaml.safe_load(cm["data"]["sidecar.yaml"])
        assert sidecar["rules"][0]["target"] == {"address": "192.168.122.139", "port": 8000}
    gateway = c.api.get_object("", "v1", "configmaps", "external-services", "ext-connector-gateway")
    assert gateway is not None
    gw1 = yaml.safe_load(gateway["data"]["gw1.yaml"])
    assert [s["sourceIP"] for s in gw1["sources"]] == ["192.168.122.200", "192.168.122.201"]
    assert (
        c.api.get_object(
            "", "v1", "secrets", "external-services", "ext-connector-gateway-gw1-host-key"
        )
        is not None
    )

    status = c.es()["status"]
    assert status["ready"] == "2/2"
    assert status["observedGeneration"] == c.es()["metadata"]["generation"]
    assert [s["gatewayNode"] for s in status["sources"]] == ["gw1", "gw1"]
    table = c.kubectl("get", "externalservices")
    assert table.split("\n")[0].split() == [
        "NAME", "TARGET", "SOURCES", "READY", "GENERATION", "OBSERVED", "AGE"
    ]
    assert table.split("\n")[1].split()[:6] == [
        "my-externalservice", "192.168.122.139", "2", "2/2", "1", "1"
    ]
    assert "my-externalservice" in c.kubectl("get", "extsvc", "-A")
    events = c.api.list_objects("", "v1", "events", "default")
    assert any(e["reason"] == "TunnelsReady" for e in events)
    # The ClusterIP comes with the Service's creation: no stale "pending" Warning first.
    assert not any(e["reason"] == "ServicePending" for e in events)
    # Private keys never reach the log.
    log = (c.workdir / "operator.log").read_text()
    assert "PRIVATE KEY" not in log


def test_edit_then_delete_follows_and_cleans_up(cluster: Cluster) -> None:
    c = cluster
    ready_pods(c)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready")[0] == "True", "Ready")
    c.kubectl(
        "apply",
        "-f",
        "-",
        stdin=SEED.replace(
            "  - {protocol: TCP, port: 8000, targetPort: 8000}\n",
            "  - {protocol: TCP, port: 8000, targetPort: 8000}\n"
            "  - {port: 9000, targetPort: 9443}\n",
        ),
    )

    def two_ports() -> bool:
        svc = c.api.get_object("", "v1", "services", "external-services", "my-externalservice")
        return svc is not None and [p["port"] for p in svc["spec"]["ports"]] == [8000, 9000]

    c.wait(two_ports, "the connector Service to expose the new port")
    c.wait(lambda: c.es()["status"].get("observedGeneration") == 2, "observedGeneration 2")
    cm = c.api.get_object("", "v1", "configmaps", "ns1", "ext-connector-my-service1")
    assert cm is not None
    rules = yaml.safe_load(cm["data"]["sidecar.yaml"])["rules"]
    assert [r["target"]["port"] for r in rules] == [8000, 9443]

    c.kubectl("delete", "externalservice", "my-externalservice", "--wait=false")
    c.wait(lambda: not c.es(), "the ExternalService to be released by its finalizer")
    c.wait(
        lambda: (
            c.api.get_object("", "v1", "services", "external-services", "my-externalservice")
            is None
        ),
        "Service removal",
    )
    c.wait(
        lambda: (
            c.api.get_object("", "v1", "configmaps", "ns1", "ext-connector-my-service1") is None
        ),
        "sidecar CM removal",
    )
    assert c.api.get_object("", "v1", "secrets", "ns1", "ext-connector-my-service1-key") is None
    gateway = c.api.get_object("", "v1", "configmaps", "external-services", "ext-connector-gateway")
    assert gateway is not None
    assert yaml.safe_load(gateway["data"]["gw1.yaml"])["sources"] == []


def _bad(old: str, new: str) -> str:
    """The seed with one change, named ``bad``, on another target and other source IPs, so
    the only problem is the one under test."""
    bad = SEED.replace(old, new).replace("name: my-externalservice", "name: bad")
    bad = bad.replace("192.168.122.139", "192.168.122.140")
    return bad.replace("192.168.122.200", "192.168.122.210").replace(
        "192.168.122.201", "192.168.122.211"
    )


# What the CRD's schema and CEL rules refuse at apply on a real API server: (old, new, what
# the server says). The operator's own check of each (for an older CRD that lets them
# through, which the emulator played) stays in tests/unit; here the object never exists.
REFUSED_AT_APPLY = {
    "invalid-target-ip": (
        "targetIP: 192.168.122.139",
        "targetIP: 300.1.1.1",
        "spec.targetIP: Invalid value: \"string\": targetIP 300.1.1.1 is not an IPv4 address",
    ),
    "udp": (
        "{protocol: TCP, port: 8000",
        "{protocol: UDP, port: 8000",
        "spec.ports[0].protocol: Invalid value: \"string\": only TCP is supported for now",
    ),
    "unknown-field": (
        "  targetIP:",
        "  colour: blue\n  targetIP:",
        'strict decoding error: unknown field "spec.colour"',
    ),
    "ipv6-source": (
        "sourceIP: 192.168.122.201",
        "sourceIP: '2001:db8::5'",
        "spec.sources[1].sourceIP: Invalid value: \"string\": sourceIP 2001:db8::5 is IPv6",
    ),
    "leading-zero": (
        "targetIP: 192.168.122.139",
        "targetIP: 192.168.122.010",
        "targetIP 192.168.122.010 is not an IPv4 address in dotted-quad form without leading "
        "zeros",
    ),
    "duplicate-source-ip": (
        "sourceIP: 192.168.122.201",
        "sourceIP: 192.168.122.200",
        "spec.sources: Invalid value: \"array\": a sourceIP is listed more than once",
    ),
    "duplicate-port": (
        "- {protocol: TCP, port: 8000, targetPort: 8000}",
        "- {protocol: TCP, port: 8000, targetPort: 8000}\n  - {port: 8000, targetPort: 9000}",
        "spec.ports: Invalid value: \"array\": a port is listed more than once",
    ),
    "source-is-target": (
        "sourceIP: 192.168.122.201",
        "sourceIP: 192.168.122.139",
        "sourceIP 192.168.122.140 is also the targetIP",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_AT_APPLY))
def test_bad_input_is_refused_at_apply_naming_the_field_and_spares_others(
    cluster: Cluster, case: str
) -> None:
    c = cluster
    ready_pods(c)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready")[0] == "True", "the good one Ready")
    old, new, said = REFUSED_AT_APPLY[case]
    applied = c.cp.kubectl("apply", "-f", "-", input_text=_bad(old, new), check=False)
    assert applied.returncode != 0, applied.stdout
    assert said in applied.stderr, applied.stderr
    assert c.es("bad") == {}
    assert c.condition("Ready") == ("True", "TunnelsReady")  # the other one is unaffected
    gateway = c.api.get_object("", "v1", "configmaps", "external-services", "ext-connector-gateway")
    assert gateway is not None
    sources = yaml.safe_load(gateway["data"]["gw1.yaml"])["sources"]
    assert [s["sourceIP"] for s in sources] == ["192.168.122.200", "192.168.122.201"]


def test_an_unknown_field_kubectl_does_not_check_is_pruned_by_the_server(
    cluster: Cluster,
) -> None:
    """``--validate=false`` (or a client without field validation): the structural schema
    drops the field before the operator sees it; what remains is a valid ExternalService."""
    c = cluster
    ready_pods(c)
    c.kubectl("apply", "--validate=false", "-f", "-", stdin=SEED.replace(
        "  targetIP:", "  colour: blue\n  targetIP:"
    ))  # fmt: skip
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "Ready")
    assert "colour" not in c.es()["spec"]


def test_a_missing_source_service_shows_in_status_and_events_and_spares_others(
    cluster: Cluster,
) -> None:
    """What no schema can know (another object's existence) is the operator's to report."""
    c = cluster
    ready_pods(c)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready")[0] == "True", "the good one Ready")
    c.kubectl("apply", "-f", "-", stdin=_bad("name: my-service2}", "name: nothing}"))
    kind, status, reason = "Accepted", "False", "SourceServiceNotFound"
    c.wait(lambda: c.condition(kind, "bad") == (status, reason), f"{kind}={status} {reason}")
    conditions = c.es("bad")["status"]["conditions"]
    assert "ns2/nothing" in next(x["message"] for x in conditions if x["type"] == kind)
    c.wait(
        lambda: any(
            e["reason"] == reason and e["involvedObject"]["name"] == "bad"
            for e in c.api.list_objects("", "v1", "events", "default")
        ),
        "a Warning event",
    )
    assert c.condition("Ready") == ("True", "TunnelsReady")  # the other one is unaffected
    assert "Ready" in c.kubectl("describe", "externalservice", "bad")
    gateway = c.api.get_object("", "v1", "configmaps", "external-services", "ext-connector-gateway")
    assert gateway is not None
    sources = yaml.safe_load(gateway["data"]["gw1.yaml"])["sources"]
    assert [s["sourceIP"] for s in sources] == ["192.168.122.200", "192.168.122.201"]


def test_conflicting_source_ip_is_reported_on_the_newer(cluster: Cluster) -> None:
    c = cluster
    ready_pods(c)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready")[0] == "True", "Ready")
    other = """\
apiVersion: submariner.io/v1alpha1
kind: ExternalService
metadata: {name: other}
spec:
  targetIP: 192.168.122.139
  sources:
  - service: {namespace: ns2, name: my-service2}
    sourceIP: 192.168.122.200
  ports:
  - {port: 8000}
"""
    c.kubectl("apply", "-f", "-", stdin=other)
    c.wait(lambda: c.condition("Accepted", "other")[0] == "False", "the newer one refused")
    message = next(
        x["message"] for x in c.es("other")["status"]["conditions"] if x["type"] == "Accepted"
    )
    assert "192.168.122.200 already carries ns1/my-service1" in message
    assert c.condition("Ready") == ("True", "TunnelsReady")


def test_no_gateway_then_label_a_node_then_failover(cluster: Cluster) -> None:
    c = cluster
    ready_pods(c)
    c.node("gw1", ready=False)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("GatewayAssigned") == ("False", "NoGatewayNode"), "no gateway")
    message = next(
        x["message"] for x in c.es()["status"]["conditions"] if x["type"] == "GatewayAssigned"
    )
    assert "kubectl label node" in message
    c.node("gw2")
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "Ready on gw2")
    assert {s["gatewayNode"] for s in c.es()["status"]["sources"]} == {"gw2"}
    c.node("gw1", ready=True)  # back: the IPs stay where they are (stability first)

    def gw1_eligible_again() -> bool:  # the operator has seen gw1 return: it has a config
        cm = c.api.get_object("", "v1", "configmaps", "external-services", "ext-connector-gateway")
        return cm is not None and "gw1.yaml" in cm.get("data", {})

    c.wait(gw1_eligible_again, "the operator to see gw1 Ready again")
    assert {s["gatewayNode"] for s in c.es()["status"]["sources"]} == {"gw2"}
    c.kubectl("label", "node", "gw2", f"{GATEWAY_LABEL}-")  # gw2 loses the label: move
    c.wait(
        lambda: {s.get("gatewayNode") for s in c.es()["status"]["sources"]} == {"gw1"},
        "failover to gw1",
    )


def test_pods_without_the_sidecar_are_counted_and_named(cluster: Cluster) -> None:
    c = cluster
    c.pod("ns1", "old-pod", "my-service1", sidecar=False)
    c.pod("ns2", "my-pod2", "my-service2")
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("SidecarsReady") == ("False", "SidecarsMissing"), "missing")
    status = c.es()["status"]
    assert status["sources"][0]["podsWithoutSidecar"] == ["ns1/old-pod"]
    assert status["ready"] == "1/2"
    message = next(x["message"] for x in status["conditions"] if x["type"] == "SidecarsReady")
    assert "kubectl rollout restart" in message


def test_operator_requests_match_its_rbac(cluster: Cluster) -> None:
    """The server's audit log of the operator's ServiceAccount over a whole life cycle
    (create, Ready, delete, clean-up): never refused, nothing the chart's Roles do not
    grant, and everything they grant used (least privilege)."""
    c = cluster
    ready_pods(c)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready")[0] == "True", "Ready")
    c.kubectl("delete", "externalservice", "my-externalservice", "--wait=false")
    c.wait(
        lambda: (
            c.api.get_object("", "v1", "secrets", "ns1", "ext-connector-my-service1-key") is None
        ),
        "cleanup",
    )
    calls = realcluster.calls(c.cp, "operator", c.audit_since)
    refused = [call for call in calls if call.code == 403]
    assert refused == [], "calls the server refused"
    used = realcluster.used(calls)
    granted = realcluster.granted(*rbac.CLUSTER_RULES, *rbac.OPERATOR_CONNECTOR_RULES)
    assert used - granted == set(), "calls the RBAC does not allow"
    # The connector namespace's Role is a Role: its lease calls stay in that namespace.
    leases = [call for call in calls if call.resource == "leases"]
    assert {(call.verb, call.namespace) for call in leases} == {
        ("list", CONNECTOR_NAMESPACE),
        ("watch", CONNECTOR_NAMESPACE),
    }
    # Everything granted is used, except paths this scenario does not reach.
    unused = granted - used - {("", "services", "patch"), ("", "configmaps", "delete")}
    assert unused == set(), unused


def test_a_source_ip_its_gateway_reports_unserved_shows_in_the_status(cluster: Cluster) -> None:
    """The gateway on gw1 reports through its Lease (written here as the gateway writes it:
    core/gateway_status.lease_body) that it does not serve one of the seed's source IPs.
    kubectl describe then says which source IP, which node and why; once the gateway
    serves it again, the ExternalService is Ready again."""
    c = cluster
    ready_pods(c)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "Ready")
    reason = (
        "192.168.122.201 is already an address of this node (on eth1) and not one the gateway "
        "added: refusing to take over the node's own address"
    )
    lease = lease_body(
        "external-services",
        "gw1",
        {"192.168.122.201": reason},
        datetime.now(UTC),
        10.0,
        None,
        None,
    )
    path = "/apis/coordination.k8s.io/v1/namespaces/external-services/leases"
    written = c.http("POST", path, lease, "application/json")
    c.wait(
        lambda: c.condition("GatewayAssigned") == ("False", "SourceIPNotServed"),
        "GatewayAssigned=False from the gateway's report",
    )
    assert c.condition("Ready") == ("False", "SourceIPNotServed")
    assert c.es()["status"]["ready"] == "1/2"
    described = " ".join(c.kubectl("describe", "externalservice", "my-externalservice").split())
    assert f"the gateway on node gw1 does not serve sourceIP 192.168.122.201: {reason}" in (
        described
    )
    events = c.api.list_objects("", "v1", "events", "default")
    assert any(e["reason"] == "SourceIPNotServed" for e in events)

    served = lease_body("external-services", "gw1", {}, datetime.now(UTC), 10.0, written, None)
    served["metadata"]["resourceVersion"] = written["metadata"]["resourceVersion"]
    c.http("PUT", f"{path}/{served['metadata']['name']}", served, "application/json")
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "Ready again")


def test_two_replicas_one_leader(cluster: Cluster) -> None:
    c = cluster
    assert c.operator is not None
    _stop(c.operator)
    first = c.start_operator("--identity", "replica-a", log_name="replica-a.log")
    c.wait(
        lambda: c.api.get_object(
            "coordination.k8s.io", "v1", "leases", RELEASE_NAMESPACE, "k8s-ext-connector-operator"
        ),
        "a Lease",
    )
    second = c.start_operator("--identity", "replica-b", log_name="replica-b.log")
    try:
        ready_pods(c)
        c.kubectl("apply", "-f", "-", stdin=SEED)
        c.wait(lambda: c.condition("Ready")[0] == "True", "Ready under the leader")
        lease = c.api.get_object(
            "coordination.k8s.io", "v1", "leases", RELEASE_NAMESPACE, "k8s-ext-connector-operator"
        )
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == "replica-a"
        assert "leading as" not in (c.workdir / "replica-b.log").read_text()
        first.terminate()
        first.wait(10)
        c.wait(
            lambda: "leading as replica-b" in (c.workdir / "replica-b.log").read_text(),
            "the standby to take over",
            timeout=40,
        )
    finally:
        for process in (first, second):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def test_source_service_selector_change_is_followed(cluster: Cluster) -> None:
    c = cluster
    ready_pods(c)
    c.pod("ns1", "canary", "canary", sidecar=False)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "Ready")
    # The user points my-service1 at other pods: the status follows, naming the new pod.
    c.kubectl(
        "patch",
        "service",
        "my-service1",
        "-n",
        "ns1",
        "--type",
        "merge",
        "-p",
        '{"spec": {"selector": {"app": "canary"}}}',
    )
    c.wait(lambda: c.condition("SidecarsReady") == ("False", "SidecarsMissing"), "missing")
    assert c.es()["status"]["sources"][0]["podsWithoutSidecar"] == ["ns1/canary"]
    c.kubectl("delete", "pod", "canary", "-n", "ns1")
    c.wait(lambda: c.condition("Ready") == ("False", "NoPods"), "Ready=False NoPods")
    assert c.es()["status"]["ready"] == "1/2"
    message = next(x["message"] for x in c.es()["status"]["conditions"] if x["type"] == "Ready")
    assert "ns1/my-service1" in message


# ---- what one ExternalService must never do to the others, or to objects not ours ------------


def _message(c: Cluster, kind: str, name: str) -> str:
    conditions = c.es(name).get("status", {}).get("conditions", [])
    return str(next((x["message"] for x in conditions if x["type"] == kind), ""))


def _warned(c: Cluster, name: str, reason: str) -> bool:
    return any(
        e["type"] == "Warning" and e["reason"] == reason and e["involvedObject"]["name"] == name
        for e in c.api.list_objects("", "v1", "events", "default")
    )


INVALID_NAMES = ("db.prod", "1db", "a" * 64)  # valid object names, invalid Service names


def test_names_no_service_can_have_are_refused_and_the_seed_still_becomes_ready(
    cluster: Cluster,
) -> None:
    """The CRD's CEL rule refuses them at apply on a real server (the operator's InvalidName
    for an older CRD: tests/unit); nothing of them exists, the seed becomes Ready."""
    c = cluster
    ready_pods(c)
    for name in INVALID_NAMES:
        applied = c.cp.kubectl(
            "apply", "-f", "-",
            input_text=SEED.replace("name: my-externalservice", f"name: '{name}'"),
            check=False,
        )  # fmt: skip
        assert applied.returncode != 0, applied.stdout
        assert "metadata.name must be a DNS-1035 label" in applied.stderr, applied.stderr
        assert "it names the connector Service" in applied.stderr, applied.stderr
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "the seed Ready")
    for name in INVALID_NAMES:
        assert c.es(name) == {}
    services = c.api.list_objects("", "v1", "services", "external-services")
    assert [s["metadata"]["name"] for s in services] == ["my-externalservice"]


def test_a_refused_write_is_reported_logged_once_and_spares_the_others(cluster: Cluster) -> None:
    c = cluster
    ready_pods(c)
    # A source Service in a namespace being deleted (held by the Service's finalizer):
    # the API server refuses new objects there with 403 Forbidden.
    c.kubectl("create", "ns", "ns3")
    c.http(
        "POST",
        "/api/v1/namespaces/ns3/services",
        {
            "metadata": {"name": "my-service3", "finalizers": ["example.com/hold"]},
            "spec": {"selector": {"app": "my-service3"}, "ports": [{"port": 80}]},
        },
        "application/json",
    )
    c.kubectl("delete", "ns", "ns3", "--wait=false")
    doomed = (
        SEED.replace("name: my-externalservice", "name: doomed")
        .replace("192.168.122.139", "192.168.122.140")
        .replace("{namespace: ns1, name: my-service1}", "{namespace: ns3, name: my-service3}")
        .replace("192.168.122.200", "192.168.122.210")
        .replace("192.168.122.201", "192.168.122.211")
    )
    c.kubectl("apply", "-f", "-", stdin=doomed)
    c.wait(
        lambda: c.condition("Accepted", "doomed") == ("False", "WriteRejected"),
        "doomed: Accepted=False WriteRejected",
    )
    message = _message(c, "Accepted", "doomed")
    assert message.startswith(
        "the API server refused to create Secret ns3/ext-connector-my-service3-key: HTTP 403"
    ), message
    assert "being terminated" in message
    c.wait(lambda: _warned(c, "doomed", "WriteRejected"), "a Warning Event")

    c.kubectl("apply", "-f", "-", stdin=SEED)  # every later pass meets the same refusal
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "the seed Ready")
    assert c.condition("Accepted", "doomed") == ("False", "WriteRejected")
    log = (c.workdir / "operator.log").read_text()
    assert log.count("refused to create Secret ns3/ext-connector-my-service3-key") == 1, log

    # The namespace goes: the refusal is replaced by what is true now.
    c.http(
        "PATCH", "/api/v1/namespaces/ns3/services/my-service3", {"metadata": {"finalizers": None}}
    )
    c.wait(
        lambda: c.condition("Accepted", "doomed") == ("False", "SourceServiceNotFound"),
        "doomed: SourceServiceNotFound once ns3 is gone",
    )


def test_objects_not_ours_are_never_adopted_and_are_reported(cluster: Cluster) -> None:
    c = cluster
    ready_pods(c)
    # A user's objects in the slots the seed's ExternalService would use.
    c.kubectl(
        "create", "configmap", "ext-connector-my-service1", "-n", "ns1", "--from-literal=owner=me"
    )
    c.kubectl(
        "create", "secret", "generic", "ext-connector-my-service2-key", "-n", "ns2",
        "--from-literal=password=hunter2",
    )
    c.kubectl(
        "apply",
        "-f",
        "-",
        stdin=yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "my-externalservice", "namespace": "external-services"},
                "spec": {"selector": {"app": "mine"}, "ports": [{"port": 5432}]},
            }
        ),
    )
    slots = (
        ("configmaps", "ns1", "ext-connector-my-service1"),
        ("secrets", "ns2", "ext-connector-my-service2-key"),
        ("services", "external-services", "my-externalservice"),
    )
    before = {slot: c.api.get_object("", "v1", *slot) for slot in slots}

    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Accepted") == ("False", "ForeignObject"), "ForeignObject")

    def names_all_three() -> bool:
        message = _message(c, "Accepted", "my-externalservice")
        return all(
            words in message
            for words in (
                "Service external-services/my-externalservice exists but is not managed",
                "ConfigMap ns1/ext-connector-my-service1 exists but is not managed",
                "Secret ns2/ext-connector-my-service2-key already exists",
            )
        )

    c.wait(names_all_three, "the message to name the Service, the ConfigMap and the Secret")
    c.wait(lambda: _warned(c, "my-externalservice", "ForeignObject"), "a Warning Event")
    assert c.condition("Ready") == ("False", "ForeignObject")
    # Left untouched: same content, same resourceVersion; no key issued into the ConfigMap's
    # source namespace either (its key could not be recorded there).
    for slot, obj in before.items():
        assert c.api.get_object("", "v1", *slot) == obj, slot
    assert c.api.get_object("", "v1", "secrets", "ns1", "ext-connector-my-service1-key") is None
    log = (c.workdir / "operator.log").read_text()
    assert log.count("ConfigMap ns1/ext-connector-my-service1 exists") == 1, log

    # The user removes them (the Service last: a change the operator watches): it recovers.
    c.kubectl("delete", "configmap", "ext-connector-my-service1", "-n", "ns1")
    c.kubectl("delete", "secret", "ext-connector-my-service2-key", "-n", "ns2")
    c.kubectl("delete", "service", "my-externalservice", "-n", "external-services")
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "Ready once they are gone")
    cm = c.api.get_object("", "v1", "configmaps", "ns1", "ext-connector-my-service1")
    assert cm is not None
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "k8s-ext-connector"


def test_a_source_ip_that_is_a_node_address_is_refused(cluster: Cluster) -> None:
    c = cluster
    ready_pods(c)

    def addresses(address: str) -> None:  # the kubelet's part
        c.http(
            "PATCH",
            "/api/v1/nodes/gw1/status",
            {"status": {"addresses": [{"type": "InternalIP", "address": address},
                                      {"type": "Hostname", "address": "gw1"}]}},
        )

    addresses("192.168.122.201")
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Accepted") == ("False", "NodeAddress"), "NodeAddress")
    message = _message(c, "Accepted", "my-externalservice")
    assert message.startswith(
        "spec.sources[1].sourceIP: 192.168.122.201 is an address of node gw1"
    ), message
    c.wait(lambda: _warned(c, "my-externalservice", "NodeAddress"), "a Warning Event")
    gateway = c.api.get_object("", "v1", "configmaps", "external-services", "ext-connector-gateway")
    assert gateway is not None
    assert yaml.safe_load(gateway["data"]["gw1.yaml"])["sources"] == []
    addresses("192.168.122.5")  # the node's address changes: nothing stands in the way now
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "Ready")


# ---- while no operator runs (#10) ------------------------------------------------------------


def _row(c: Cluster) -> list[str]:
    """READY, GENERATION, OBSERVED of the seed's row in ``kubectl get externalservices``."""
    lines = c.kubectl("get", "externalservices").splitlines()
    assert lines[0].split()[3:6] == ["READY", "GENERATION", "OBSERVED"], lines[0]
    return lines[1].split()[3:6]


def test_a_spec_the_operator_has_not_seen_shows_as_such(cluster: Cluster) -> None:
    c = cluster
    ready_pods(c)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "Ready")
    c.wait(lambda: _row(c) == ["2/2", "1", "1"], "READY 2/2 for generation 1")
    assert operator_stopped(c)
    c.kubectl("apply", "-f", "-", stdin=SEED.replace("targetPort: 8000", "targetPort: 8080"))
    # Nothing rewrites the status now: the columns and the conditions say it is old.
    assert _row(c) == ["2/2", "2", "1"]
    ready = next(x for x in c.es()["status"]["conditions"] if x["type"] == "Ready")
    assert (ready["status"], ready["observedGeneration"]) == ("True", 1)
    waited = c.cp.kubectl(
        "wait", "--for=condition=Ready", "--timeout=2s", "externalservice/my-externalservice",
        check=False,
    )
    assert waited.returncode != 0, waited.stdout  # kubectl wait compares observedGeneration
    c.operator = c.start_operator("--no-leader-election")
    c.wait(lambda: _row(c) == ["2/2", "2", "2"], "the new generation observed")
    assert {x["observedGeneration"] for x in c.es()["status"]["conditions"]} == {2}
    c.kubectl("wait", "--for=condition=Ready", "--timeout=20s",
              "externalservice/my-externalservice")


def operator_stopped(c: Cluster) -> bool:
    assert c.operator is not None
    c.operator.terminate()
    return c.operator.wait(10) is not None


# ---- what each component's token may not do (the chart's RBAC, enforced) ---------------------


def test_each_components_token_is_refused_what_its_role_does_not_grant(
    namespaces: ControlPlane,
) -> None:
    """The operator never reads a Secret back and the gateway reads its one host key by
    name: a real 403 for the operator's read and the gateway's list, with the server's
    reason, and the audit log holds the refusals."""
    cp = namespaces
    cp.kubectl("create", "secret", "generic", "some-key", "-n", "ns1", "--from-literal=k=v")
    try:
        ns = CONNECTOR_NAMESPACE
        cases = (
            ("operator", ("secret", "some-key", "-n", "ns1"), 'secrets "some-key"', "get", "ns1"),
            ("gateway", ("secrets", "-n", ns), "secrets", "list", ns),
        )
        for component, args, what, verb, namespace in cases:
            since = len(realcluster.calls(cp, component))
            kubeconfig = realcluster.kubeconfig(cp, component)
            result = cp.kubectl("get", *args, kubeconfig=kubeconfig, check=False)
            assert result.returncode != 0, result.stdout
            assert (
                f"Error from server (Forbidden): {what}"
                f' is forbidden: User "{realcluster.user(component)}" cannot {verb} resource'
                f' "secrets" in API group "" in the namespace "{namespace}"'
            ) in result.stderr, result.stderr
            recorded = realcluster.calls(cp, component, since)
            refused = [(c.verb, c.resource, c.code) for c in recorded]
            assert refused == [(verb, "secrets", 403)], refused
    finally:
        cp.kubectl("delete", "secret", "some-key", "-n", "ns1")


# ---- who may make a node a gateway (NodeRestriction, docs/security.md W17) ------------------


def test_a_node_cannot_give_itself_the_default_gateway_label(namespaces: ControlPlane) -> None:
    """A kubelet's identity (system:node:<name> in system:nodes, a client certificate from the
    cluster's CA) registers its Node and updates it, but the NodeRestriction admission plugin
    refuses the default gateway label (node-restriction.kubernetes.io/...) on itself, at
    registration and later. The prototype's label is one a kubelet may set on itself: the
    reason the default changed. Only an administrator labels a node a gateway."""
    cp = namespaces
    node = "self-labelling-node"
    as_node = cp.node_kubeconfig(node)
    default = "=".join(GATEWAY_NODE_LABEL)
    prototype = "=".join(SELF_ASSIGNABLE_GATEWAY_LABEL)

    def register(labels: dict[str, str]) -> subprocess.CompletedProcess[str]:
        metadata = {"name": node, "labels": labels}
        manifest = {"apiVersion": "v1", "kind": "Node", "metadata": metadata}
        return cp.kubectl("create", "-f", "-", kubeconfig=as_node,
                          input_text=json.dumps(manifest), check=False)  # fmt: skip

    try:
        refused = register(dict([GATEWAY_NODE_LABEL]))
        assert refused.returncode != 0
        assert "Forbidden" in refused.stderr, refused.stderr
        assert f"is not allowed to set the following labels: {GATEWAY_LABEL}" in refused.stderr
        assert register({}).returncode == 0  # its own Node, no such label: allowed
        # It may update its own Node: annotations, and labels outside the restricted prefix.
        annotated = cp.kubectl(
            "annotate", "node", node, "example.com/kubelet=was-here", kubeconfig=as_node,
            check=False,
        )  # fmt: skip
        assert annotated.returncode == 0, annotated.stderr
        allowed = cp.kubectl("label", "node", node, prototype, kubeconfig=as_node, check=False)
        assert allowed.returncode == 0, allowed.stderr
        # ... but not the default gateway label.
        forbidden = cp.kubectl("label", "node", node, default, kubeconfig=as_node, check=False)
        assert forbidden.returncode != 0
        assert "Forbidden" in forbidden.stderr, forbidden.stderr
        assert f"is not allowed to modify labels: {GATEWAY_LABEL}" in forbidden.stderr
        labels = cp.api("GET", f"/api/v1/nodes/{node}")[1]["metadata"]["labels"]
        assert GATEWAY_LABEL not in labels
        assert labels[SELF_ASSIGNABLE_GATEWAY_LABEL[0]] == "true"
        # The cluster's administrator may.
        cp.kubectl("label", "node", node, default)
    finally:
        cp.kubectl("delete", "node", node, "--ignore-not-found")
