"""The real operator (kopf's runner, as a subprocess) against the emulated API server.

The user's actions go through kubectl. The harness plays the parts no API server plays:
the kubelet (Node Ready conditions, pod container statuses including the sidecar's
readiness) and the webhook (pods are created with the sidecar container already in
them). Each is done explicitly below, over HTTP, and named so.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s_ext_connector.core.api import GATEWAY_NODE_LABEL, ServiceRef
from k8s_ext_connector.core.gateway_status import lease_body
from k8s_ext_connector.emulator import ApiServer
from k8s_ext_connector.emulator.clients import run_kubectl
from k8s_ext_connector.operator import rbac
from k8s_ext_connector.webhook.inject import InjectionContext, inject
from tests.unit.samples import SEED_MANIFEST

ROOT = Path(__file__).parents[2]
CRD = ROOT / "charts" / "k8s-ext-connector" / "crds" / "externalservices.submariner.io.yaml"
GATEWAY_LABEL = GATEWAY_NODE_LABEL[0]

SEED = SEED_MANIFEST  # the seed's example, unchanged


@dataclass
class Cluster:
    api: ApiServer
    kubeconfig: Path
    workdir: Path
    operator: subprocess.Popen[bytes] | None = None

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = run_kubectl(self.kubeconfig, args, stdin, self.workdir / "kube-cache")
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
        request = urllib.request.Request(
            self.api.url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": content_type, "User-Agent": "test-harness"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read() or b"{}")
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
        self.http(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            {"status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}},
        )

    def pod(
        self, namespace: str, name: str, app: str, sidecar: bool = True, ready: bool = True
    ) -> None:
        """A pod as the webhook would have injected it and the kubelet would report it."""
        body: dict[str, Any] = {
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": {"containers": [{"name": "app", "image": "app"}]},
        }
        if sidecar:
            body = inject(body, InjectionContext((ServiceRef(namespace, app),)))
        self.http("POST", f"/api/v1/namespaces/{namespace}/pods", body, "application/json")
        statuses = [{"name": "ext-connector", "ready": ready}] if sidecar else []
        self.http(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            {
                "status": {
                    "phase": "Running",
                    "initContainerStatuses": statuses,
                    "containerStatuses": [{"name": "app", "ready": True}],
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
        handle = (self.workdir / log_name).open("ab")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "k8s_ext_connector",
                "operator",
                "--kubeconfig",
                str(self.kubeconfig),
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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Emulated API with the CRD, namespaces, source Services, a gateway node, and the
    operator running."""
    api = ApiServer()
    with api.run_in_thread():
        c = Cluster(api, api.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path)
        c.kubectl("apply", "-f", str(CRD))
        for ns in ("external-services", "ns1", "ns2"):
            c.kubectl("create", "ns", ns)
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
        c.node("gw1")
        c.operator = c.start_operator("--no-leader-election")
        try:
            yield c
        finally:
            c.operator.terminate()
            try:
                c.operator.wait(10)
            except subprocess.TimeoutExpired:
                c.operator.kill()


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
        "NAME",
        "TARGET",
        "SOURCES",
        "READY",
        "GENERATION",
        "OBSERVED",
        "AGE",
    ]
    assert table.split("\n")[1].split()[:6] == [
        "my-externalservice",
        "192.168.122.139",
        "2",
        "2/2",
        "1",
        "1",
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


BAD_CASES = {
    "invalid-target-ip": (
        "targetIP: 192.168.122.139",
        "targetIP: 300.1.1.1",
        ("Accepted", "False", "InvalidSpec"),
        "spec.targetIP: '300.1.1.1'",
    ),
    "udp": (
        "{protocol: TCP, port: 8000",
        "{protocol: UDP, port: 8000",
        ("Accepted", "False", "InvalidSpec"),
        "only TCP",
    ),
    "missing-service": (
        "name: my-service2}",
        "name: nothing}",
        ("Accepted", "False", "SourceServiceNotFound"),
        "ns2/nothing",
    ),
    "unknown-field": (
        "  targetIP:",
        "  colour: blue\n  targetIP:",
        ("Accepted", "False", "InvalidSpec"),
        "spec.colour",
    ),
    # What the CRD refuses at apply on a real API server, but an older CRD (or this
    # emulator, which evaluates no CEL) lets through: refused in status, never Accepted.
    "ipv6-source": (
        "sourceIP: 192.168.122.201",
        "sourceIP: '2001:db8::5'",
        ("Accepted", "False", "IPv6NotSupported"),
        "spec.sources[1].sourceIP: 2001:db8::5 is an IPv6 address; IPv6 is not supported yet",
    ),
    "leading-zero": (
        "targetIP: 192.168.122.139",
        "targetIP: 192.168.122.010",
        ("Accepted", "False", "InvalidSpec"),
        "spec.targetIP: '192.168.122.010': must be an IPv4 address in dotted-quad form "
        "without leading zeros",
    ),
    "duplicate-source-ip": (
        "sourceIP: 192.168.122.201",
        "sourceIP: 192.168.122.200",
        ("Accepted", "False", "DuplicateSourceIP"),
        "spec.sources[1].sourceIP: 192.168.122.210 is already the sourceIP of spec.sources[0]",
    ),
    "duplicate-port": (
        "- {protocol: TCP, port: 8000, targetPort: 8000}",
        "- {protocol: TCP, port: 8000, targetPort: 8000}\n  - {port: 8000, targetPort: 9000}",
        ("Accepted", "False", "DuplicatePort"),
        "spec.ports[1].port: 8000 is already listed in spec.ports[0]",
    ),
    "source-is-target": (
        "sourceIP: 192.168.122.201",
        "sourceIP: 192.168.122.139",
        ("Accepted", "False", "SourceIPIsTarget"),
        "spec.sources[1].sourceIP: 192.168.122.140 is also spec.targetIP",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_shows_in_status_and_events_and_spares_others(
    cluster: Cluster, case: str
) -> None:
    c = cluster
    ready_pods(c)
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready")[0] == "True", "the good one Ready")
    old, new, (kind, status, reason), message = BAD_CASES[case]
    # Another target, so the only problem is the one under test.
    bad = SEED.replace(old, new).replace("name: my-externalservice", "name: bad")
    bad = bad.replace("192.168.122.139", "192.168.122.140")
    bad = bad.replace("192.168.122.200", "192.168.122.210").replace(
        "192.168.122.201", "192.168.122.211"
    )
    c.kubectl("apply", "-f", "-", stdin=bad)
    c.wait(lambda: c.condition(kind, "bad") == (status, reason), f"{kind}={status} {reason}")
    conditions = c.es("bad")["status"]["conditions"]
    assert message in next(x["message"] for x in conditions if x["type"] == kind)
    c.wait(
        lambda: any(
            e["reason"] == reason and e["involvedObject"]["name"] == "bad"
            for e in c.api.list_objects("", "v1", "events", "default")
        ),
        "a Warning event",
    )
    assert c.condition("Ready") == ("True", "TunnelsReady")  # the other one is unaffected
    assert "Ready" in c.kubectl("describe", "externalservice", "bad")
    # Nothing of the bad one reaches the gateway (an IPv6 source there failed its whole
    # config, and with it every other ExternalService's tunnels).
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
    used = {
        (r.api_group, r.resource + (f"/{r.subresource}" if r.subresource else ""), r.verb)
        for r in c.api.requests
        if r.resource
        and (r.user_agent.startswith("kopf") or r.user_agent.startswith("k8s-ext-connector"))
    }
    granted = {
        (rule.group, rule.resource, verb)
        for rule in rbac.CLUSTER_RULES + rbac.OPERATOR_CONNECTOR_RULES
        for verb in rule.verbs
    }
    assert used - granted == set(), "calls the RBAC does not allow"
    # The connector namespace's Role is a Role: its calls stay in that namespace.
    in_connector = {
        (r.api_group, r.resource, r.verb) for rule in rbac.OPERATOR_CONNECTOR_RULES
        for r in c.api.requests
        if (r.api_group, r.resource) == (rule.group, rule.resource)
        and r.user_agent.startswith("k8s-ext-connector")
        and r.namespace == "external-services"
    }  # fmt: skip
    assert in_connector == {("coordination.k8s.io", "leases", v) for v in ("list", "watch")}
    elsewhere = [r.path for r in c.api.requests if r.resource == "leases"]
    assert all("/namespaces/external-services/" in path for path in elsewhere), elsewhere
    # Everything granted is used, except paths this scenario does not reach.
    unused = granted - used - {("", "services", "patch"), ("", "configmaps", "delete")}
    assert unused == set() or unused <= {("", "configmaps", "delete")}, unused


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
    c.operator.terminate()
    c.operator.wait(10)
    first = c.start_operator("--identity", "replica-a", log_name="replica-a.log")
    c.wait(
        lambda: c.api.get_object(
            "coordination.k8s.io", "v1", "leases", "external-services", "k8s-ext-connector-operator"
        ),
        "a Lease",
    )
    second = c.start_operator("--identity", "replica-b", log_name="replica-b.log")
    try:
        ready_pods(c)
        c.kubectl("apply", "-f", "-", stdin=SEED)
        c.wait(lambda: c.condition("Ready")[0] == "True", "Ready under the leader")
        lease = c.api.get_object(
            "coordination.k8s.io", "v1", "leases", "external-services", "k8s-ext-connector-operator"
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
    c = cluster
    ready_pods(c)
    # Applied first (older), with the seed's very spec: they must claim nothing either.
    for name in INVALID_NAMES:
        c.kubectl(
            "apply", "-f", "-", stdin=SEED.replace("name: my-externalservice", f"name: '{name}'")
        )

    def refused(name: str) -> bool:
        return c.condition("Accepted", name) == ("False", "InvalidName")

    for name in INVALID_NAMES:
        c.wait(functools.partial(refused, name), f"{name}: Accepted=False InvalidName")
    c.kubectl("apply", "-f", "-", stdin=SEED)
    c.wait(lambda: c.condition("Ready") == ("True", "TunnelsReady"), "the seed Ready")
    for name in INVALID_NAMES:
        message = _message(c, "Accepted", name)
        assert message.startswith(f"metadata.name: '{name}' is not a DNS-1035 label"), message
        assert c.condition("Ready", name) == ("False", "InvalidName")
        c.wait(functools.partial(_warned, c, name, "InvalidName"), f"{name}: a Warning Event")
        # Nothing is written for it.
        assert c.api.get_object("", "v1", "services", "external-services", name) is None
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
        "create",
        "secret",
        "generic",
        "ext-connector-my-service2-key",
        "-n",
        "ns2",
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
            {
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": address},
                        {"type": "Hostname", "address": "gw1"},
                    ]
                }
            },
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
    waited = run_kubectl(
        c.kubeconfig,
        ("wait", "--for=condition=Ready", "--timeout=2s", "externalservice/my-externalservice"),
        None,
        c.workdir / "kube-cache",
    )
    assert waited.returncode != 0, waited.stdout  # kubectl wait compares observedGeneration
    c.operator = c.start_operator("--no-leader-election")
    c.wait(lambda: _row(c) == ["2/2", "2", "2"], "the new generation observed")
    assert {x["observedGeneration"] for x in c.es()["status"]["conditions"]} == {2}
    c.kubectl(
        "wait", "--for=condition=Ready", "--timeout=20s", "externalservice/my-externalservice"
    )


def operator_stopped(c: Cluster) -> bool:
    assert c.operator is not None
    c.operator.terminate()
    return c.operator.wait(10) is not None
