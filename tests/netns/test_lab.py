"""``k8s-ext-connector lab`` end to end: namespaces, the real operator, webhook, gateway and
sidecars, upstream Kubernetes (API server, controller-manager, scheduler), and the pinned
kubectl as the user.

One lab for the module (bring-up is the slow part); the tests run in file order and each
leaves the seed's ExternalService applied and Ready. Every wait polls with a deadline.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from k8s_ext_connector.lab import netns, state
from k8s_ext_connector.lab.client import run_gets
from k8s_ext_connector.lab.cluster import (
    CONNECTOR_NAMESPACE,
    ApiCallError,
    is_test_net,
    kubectl_binary,
)
from k8s_ext_connector.lab.kubelet import PodRuntime
from k8s_ext_connector.lab.session import (
    Check,
    LabSession,
    Ref,
    ingress_built,
    seed_manifest,
    table,
)
from k8s_ext_connector.lab.topology import (
    EXTERNAL_SERVER_IP,
    GATEWAY_EXTERNAL_IP,
    SERVICE_CIDR,
    SINK_PORT,
    SOURCE_IPS,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.kube,  # the upstream binaries `make install` builds
]
T = TypeVar("T")
LOG: list[str] = []  # the lab's progress lines, shown when a wait fails
REF: Ref = ("default", "my-externalservice")
PORT_8001 = ((8000, 8000), (8001, 8001))


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = "\n".join(LOG[-40:])
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")
        time.sleep(0.05)


def expected_rows(ports: tuple[int, ...] = (8000,)) -> set[tuple[str, str, str, str]]:
    """The table the seed's walkthrough must print (ingress rows pass once it is built)."""
    rows = set()
    for pod, source_ip in (("my-pod1", SOURCE_IPS[0]), ("my-pod2", SOURCE_IPS[1])):
        for port in ports:
            rows.add((f"{pod} -> my-externalservice:{port}", source_ip, source_ip, "pass"))
    rows.add(("other-pod -> my-externalservice:8000", "refused", "refused", "pass"))
    for pod, source_ip, service in (
        ("my-pod1", SOURCE_IPS[0], "my-service1"),
        ("my-pod2", SOURCE_IPS[1], "my-service2"),
    ):
        name = f"server -> {source_ip}:80 ({service})"
        if ingress_built():
            rows.add((name, pod, pod, "pass"))
        else:
            rows.add((name, pod, "ingress: not built yet", "SKIP"))
    return rows


def rows(checks: list[Check]) -> set[tuple[str, str, str, str]]:
    return {(c.name, c.expected, c.seen, c.result) for c in checks}


def assert_table(session: LabSession, ports: tuple[int, ...] = (8000,)) -> None:
    checks = session.wait_checks(REF, timeout=20)
    tail = "\n".join(LOG[-40:])
    assert rows(checks) == expected_rows(ports), f"\n{table(checks)}\n{tail}"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSession]:
    lab = LabSession.open(tmp_path_factory.mktemp("lab-state"), LOG.append, connections=5)
    try:
        lab.walkthrough(seed_manifest())
        yield lab
    finally:
        lab.close()


def es(session: LabSession) -> dict[str, Any]:
    obj = session.cluster.externalservice(*REF)
    assert obj is not None
    return obj


def test_the_seed_walkthrough_passes_with_the_real_control_plane(session: LabSession) -> None:
    assert_table(session)
    listing = session.get_externalservices()
    assert listing.split("\n")[1].split()[:5] == [
        "default",
        "my-externalservice",
        "203.0.113.10",
        "2",
        "2/2",
    ], listing
    # The pods came out of the API injected by the webhook, and the kubelet's reports
    # are what made the operator's status true.
    for namespace, pod in (("ns1", "my-pod1"), ("ns2", "my-pod2")):
        stored = session.cluster.get("pods", namespace, pod)
        assert stored is not None
        init = stored["spec"]["initContainers"]
        assert init[0]["name"] == "ext-connector"
        assert init[0]["restartPolicy"] == "Always"
        assert stored["status"]["initContainerStatuses"][0]["ready"] is True
    other = session.cluster.get("pods", "ns1", "other-pod")
    assert other is not None
    assert "initContainers" not in other["spec"]
    conditions = {c["type"]: c["status"] for c in es(session)["status"]["conditions"]}
    assert conditions["Ready"] == "True", conditions


def test_the_control_plane_is_upstream_and_the_kubelet_is_a_node(session: LabSession) -> None:
    """The API server is the pinned release; the real scheduler bound the pods; the lab's
    kubelet is judged as system:node:gw1 (the Node authorizer lets it read only Secrets of
    pods bound to gw1); the gateway read its host key and wrote its Lease through the API."""
    plane = session.cluster
    version = json.loads(plane.kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == "v1.34.4", version
    for namespace, pod in (("ns1", "my-pod1"), ("ns2", "my-pod2"), ("ns1", "other-pod")):
        stored = plane.get("pods", namespace, pod)
        assert stored is not None
        assert stored["spec"]["nodeName"] == "gw1"
        events = plane.objects("events", namespace)
        assert any(
            e["involvedObject"]["name"] == pod
            and e["reason"] == "Scheduled"
            and e.get("reportingComponent") == "default-scheduler"
            for e in events
        ), events
    node = session.node.api
    key = node.get("secrets", "ns1", "ext-connector-my-service1-key")
    assert key is not None
    assert key["type"] == "kubernetes.io/ssh-auth"
    with pytest.raises(ApiCallError) as refused:
        node.get("secrets", CONNECTOR_NAMESPACE, "ext-connector-gateway-gw1-host-key")
    assert refused.value.status == 403, refused.value
    lease = plane.get(
        "leases", CONNECTOR_NAMESPACE, "ext-connector-gateway-gw1", "coordination.k8s.io"
    )
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "gw1", lease
    gateway = session.node.gateway.process
    assert gateway is not None
    assert "read from Secret ext-connector-gateway-gw1-host-key in namespace external-services" in (
        gateway.output()
    ), gateway.output()[-2000:]


def test_every_address_in_the_namespaces_is_test_net(session: LabSession) -> None:
    cluster_ips = [s["spec"]["clusterIP"] for s in session.cluster.objects("services")]
    assert cluster_ips
    assert all(is_test_net(ip) for ip in cluster_ips), cluster_ips
    connector = session.cluster.get("services", CONNECTOR_NAMESPACE, REF[1])
    assert connector is not None
    assert ipaddress.ip_address(connector["spec"]["clusterIP"]) in ipaddress.ip_network(
        SERVICE_CIDR
    )
    for ns in (session.lab.gw_ns, *[p.netns for p in session.lab.pods.values()]):
        addresses = json.loads(netns.sh(["ip", "-j", "-n", ns, "addr"]).stdout)
        for link in addresses:
            for info in link.get("addr_info", []):
                if info["family"] == "inet" and not info["local"].startswith("127."):
                    assert is_test_net(info["local"]), (ns, info["local"])


def test_editing_the_externalservice_adds_a_port(session: LabSession) -> None:
    session.apply(seed_manifest(PORT_8001))
    wait_for(
        lambda: es(session)["status"].get("observedGeneration") == 2,
        10,
        "the operator to see the edit",
    )
    assert_table(session, (8000, 8001))
    ports = session.cluster.get("services", CONNECTOR_NAMESPACE, REF[1])
    assert ports is not None
    assert [p["port"] for p in ports["spec"]["ports"]] == [8000, 8001]
    session.apply(seed_manifest())
    wait_for(lambda: es(session)["status"].get("observedGeneration") == 3, 10, "the edit back")
    assert_table(session)


def test_the_gateway_nodes_own_address_is_refused_as_a_source_ip(session: LabSession) -> None:
    """gw1's address on the external network used to be accepted as a sourceIP: the gateway
    then held it and relayed its ports (the node's own) to the source Service."""
    ref = session.apply(f"""\
apiVersion: submariner.io/v1alpha1
kind: ExternalService
metadata: {{name: node-address, namespace: default}}
spec:
  targetIP: {EXTERNAL_SERVER_IP}
  sources:
  - service: {{namespace: ns1, name: my-service1}}
    sourceIP: {GATEWAY_EXTERNAL_IP}
  ports:
  - {{port: {SINK_PORT}}}
""")

    def accepted() -> tuple[str, str] | None:
        obj = session.cluster.externalservice(*ref)
        for c in (obj or {}).get("status", {}).get("conditions", []):
            if c["type"] == "Accepted":
                return c["status"], c["message"]
        return None

    status, message = wait_for(accepted, 10, "the operator's verdict")
    assert status == "False", message
    assert message.startswith(
        f"spec.sources[0].sourceIP: {GATEWAY_EXTERNAL_IP} is an address of node gw1"
    ), message
    gateway = session.cluster.get("configmaps", CONNECTOR_NAMESPACE, "ext-connector-gateway")
    assert gateway is not None
    sources = yaml.safe_load(gateway["data"]["gw1.yaml"])["sources"]
    assert [s["sourceIP"] for s in sources] == list(SOURCE_IPS)
    session.delete(ref)
    assert_table(session)


def test_deleting_and_reapplying_the_externalservice(session: LabSession) -> None:
    before = es(session)["metadata"]["uid"]
    old_ip = es(session)["status"]["clusterIP"]
    restarts = {
        key: runtime.sidecar.restarts
        for key, runtime in session.node.pods.items()
        if runtime.sidecar_spec is not None
    }
    session.delete(REF)
    # Gone for real: the operator removed what it owned, and the pods fail closed.
    wait_for(
        lambda: session.cluster.get("services", CONNECTOR_NAMESPACE, REF[1]) is None,
        10,
        "the connector Service to be deleted",
    )
    pod1 = session.lab.pods["my-pod1"]

    def refused() -> bool:
        outcome = netns.call_in_netns(pod1.netns, lambda: run_gets(old_ip, 8000, 1))
        return not outcome[0].ok

    wait_for(refused, 15, "my-pod1's connections to fail once the ExternalService is gone")
    session.apply(seed_manifest())
    wait_for(lambda: es(session)["metadata"]["uid"] != before, 10, "the new object")
    # The operator issued new client keys; the running sidecars follow their key files.
    session.wait_ready(REF, 20)
    assert_table(session)
    assert {key: session.node.pods[key].sidecar.restarts for key in restarts} == restarts, (
        "no restart needed for a re-issued key"
    )


def test_the_gateway_restarting(session: LabSession) -> None:
    gateway = session.node.gateway
    assert gateway.process is not None
    old_pid = gateway.process.popen.pid
    os.kill(old_pid, signal.SIGKILL)  # a crash: the kubelet restarts the container
    wait_for(
        lambda: (
            gateway.process is not None and gateway.process.popen.pid != old_pid and gateway.alive()
        ),
        15,
        "the kubelet to restart the gateway",
    )
    assert_table(session)
    session.node.restart_gateway()  # and a clean stop/start
    assert_table(session)


def test_a_killed_operator_is_restarted_like_its_deployment(session: LabSession) -> None:
    """The operator's Deployment restarts a crashed operator: the lab reaps it (no zombie),
    starts it again after a back-off, records the new pid, and the new one reconciles."""
    plane = session.cluster
    assert plane.operator is not None
    old = plane.operator.popen
    restarts = plane.operator_restarts
    os.kill(old.pid, signal.SIGKILL)
    wait_for(
        lambda: (
            plane.operator is not None
            and plane.operator.popen.pid != old.pid
            and plane.operator.alive()
        ),
        20,
        "the lab to restart the operator",
    )
    assert old.poll() is not None  # reaped: not left a zombie
    assert plane.operator_restarts == restarts + 1
    new_pid = plane.operator.popen.pid

    def recorded_operator() -> dict[str, Any] | None:
        listed = {p["name"]: p for p in state.read_processes(session.state_dir)}
        operator = listed.get("operator")
        return operator if operator and operator["pid"] == new_pid else None

    recorded = wait_for(recorded_operator, 10, "the processes file to name the new operator")
    assert recorded["restarts"] == restarts + 1
    # The new operator does its job: an edit is reconciled into the data path.
    for ports in (PORT_8001, ((8000, 8000),)):
        session.apply(seed_manifest(ports))
        wait_for(
            lambda: (
                es(session)["status"].get("observedGeneration")
                == es(session)["metadata"]["generation"]
            ),
            15,
            "the restarted operator to see the edit",
        )
        assert_table(session, tuple(port for port, _ in ports))


def test_reissued_keys_are_followed_without_a_restart(session: LabSession) -> None:
    """Deleting and re-applying the ExternalService makes the operator issue new client
    keys; the kubelet swaps the mounted Secret files and the running sidecars pick the new
    keys up themselves: no restart, READY comes back."""
    kubelet = session.node
    assert not kubelet.restart_on_key_change
    pods = [r for r in kubelet.pods.values() if r.sidecar_spec is not None]
    restarts = {r.key: r.sidecar.restarts for r in pods}
    session.delete(REF)
    session.apply(seed_manifest())
    session.wait_ready(REF, 30)
    assert {r.key: r.sidecar.restarts for r in pods} == restarts
    assert_table(session)


def _sidecar_log(runtime: PodRuntime) -> str:
    process = runtime.sidecar.process
    return process.output() if process is not None else ""


def test_up_status_down_after_a_crash(tmp_path: Path) -> None:
    """The CLI: `lab up` leaves a supervisor; killing it (a crash) leaves processes and
    namespaces behind; `lab down` removes them all."""
    state_dir = tmp_path / "state"
    cli = [sys.executable, "-m", "k8s_ext_connector", "lab"]
    record: state.LabRecord | None = None
    processes: list[int] = []
    up = subprocess.run(
        [*cli, "up", "--state-dir", str(state_dir), "--connections", "2"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "all checks passed" not in up.stdout  # that is the one-shot's line
        assert "The lab is up" in up.stdout
        kubeconfig = state_dir / "kubeconfig"
        listing = subprocess.run(
            [kubectl_binary(), "--kubeconfig", str(kubeconfig), "get", "externalservices", "-A"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "2/2" in listing, listing
        status = subprocess.run(
            [*cli, "status", "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "gateway" in status.stdout
        assert "2/2" in status.stdout
        record = state.read_record(state_dir)
        assert record is not None
        processes = [p["pid"] for p in state.read_processes(state_dir)]
        assert processes
        os.kill(record.pid, signal.SIGKILL)
        wait_for(lambda: not state.is_ours(record.pid), 10, "the supervisor to die")
        leftovers = sorted(netns.NETNS_DIR.glob(f"{record.prefix}-*"))
        assert leftovers, "a crashed lab leaves its namespaces until `lab down`"
    finally:
        down = subprocess.run(
            [*cli, "down", "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert down.returncode == 0, down.stdout + down.stderr
    assert record is not None
    assert not sorted(netns.NETNS_DIR.glob(f"{record.prefix}-*"))
    assert not [pid for pid in processes if state.is_ours(pid)]
    assert not state_dir.exists()
    assert not Path(record.workdir).exists()
