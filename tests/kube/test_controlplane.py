"""The upstream control plane the later tiers build on: it starts, it is the pinned release,
it serves the project's CRD, its controllers and scheduler work, RBAC answers for real,
and nothing of it outlives its ``with`` block (or the process that started it).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from k8s_ext_connector.lab import netns
from k8s_ext_connector_testbed import binaries
from k8s_ext_connector_testbed.controlplane import ControlPlane, sweep_orphans
from tests.polling import wait_for
from tests.unit.samples import SEED_MANIFEST

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "charts" / "k8s-ext-connector" / "crds" / "externalservices.submariner.io.yaml"


def _get(cp: ControlPlane, path: str) -> dict[str, Any] | None:
    status, body = cp.api("GET", path)
    return body if status == 200 else None


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_ready_and_the_pinned_release(control_plane: ControlPlane) -> None:
    assert control_plane.api("GET", "/readyz")[0] == 200
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["clientVersion"]["gitVersion"] == binaries.KUBE_VERSION
    assert version["serverVersion"]["gitVersion"] == binaries.KUBE_VERSION
    etcd = subprocess.run(
        [str(control_plane.binaries.etcd), "--version"], capture_output=True, text=True, check=True
    )
    assert f"etcd Version: {binaries.ETCD_VERSION.removeprefix('v')}" in etcd.stdout


def test_crd_installs_and_the_seed_manifest_applies_unchanged(control_plane: ControlPlane) -> None:
    control_plane.kubectl("apply", "-f", str(CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "crd/externalservices.submariner.io", "--timeout=60s"
    )
    applied = control_plane.kubectl("apply", "-f", "-", input_text=SEED_MANIFEST)
    assert "externalservice.submariner.io/my-externalservice created" in applied.stdout
    table = control_plane.kubectl("get", "externalservices").stdout.splitlines()
    assert table[0].split() == [
        "NAME", "TARGET", "SOURCES", "READY", "GENERATION", "OBSERVED", "AGE"
    ]  # fmt: skip
    assert table[1].split()[:2] == ["my-externalservice", "192.168.122.139"]


def test_deployment_becomes_replicaset_and_pod_scheduled_to_a_node(
    control_plane: ControlPlane,
) -> None:
    """Controllers (deployment, replicaset, serviceaccount, garbage collector) and the
    scheduler: the Pod lands on a Node object made here; no kubelet runs it."""
    cp = control_plane
    node = f"node-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", "apps")
    status, _ = cp.api(
        "POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}
    )
    assert status == 201
    capacity = {"cpu": "4", "memory": "8Gi", "pods": "110"}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    cp.kubectl(
        "patch", "node", node, "--subresource=status", "--type=merge", "-p",
        json.dumps({"status": {"capacity": capacity, "allocatable": capacity, "conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady",
             "lastHeartbeatTime": now, "lastTransitionTime": now}]}}),
    )  # fmt: skip
    # TaintNodesByCondition marked the new Node not-ready; a kubelet would clear that.
    cp.kubectl("patch", "node", node, "--type=merge", "-p", '{"spec": {"taints": null}}')
    cp.kubectl(
        "create", "deployment", "web", "-n", "apps", "--image=registry.invalid/web:1",
        "--replicas=1",
    )  # fmt: skip

    def pod() -> dict[str, Any] | None:
        items = (_get(cp, "/api/v1/namespaces/apps/pods") or {}).get("items", [])
        return next((p for p in items if p["spec"].get("nodeName")), None)

    scheduled = wait_for(pod, timeout=60, what="the Deployment's Pod scheduled", interval=0.2)
    assert scheduled["spec"]["nodeName"] == node
    owner = scheduled["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ReplicaSet"
    replicaset = _get(cp, f"/apis/apps/v1/namespaces/apps/replicasets/{owner['name']}")
    assert replicaset is not None
    assert replicaset["metadata"]["ownerReferences"][0]["name"] == "web"
    assert scheduled["status"]["phase"] == "Pending"  # no kubelet: never runs

    # The garbage collector follows the owner references down. A Pod bound to a node is
    # deleted gracefully: it stays, marked, until its kubelet confirms (none runs here).
    cp.kubectl("delete", "deployment", "web", "-n", "apps", "--wait=false")
    pod_path = f"/api/v1/namespaces/apps/pods/{scheduled['metadata']['name']}"
    wait_for(
        lambda: (_get(cp, pod_path) or {}).get("metadata", {}).get("deletionTimestamp"),
        timeout=60,
        what="the garbage collector deleting the ReplicaSet and its Pod",
        interval=0.2,
    )
    assert _get(cp, f"/apis/apps/v1/namespaces/apps/replicasets/{owner['name']}") is None


def test_service_account_token_gets_what_rbac_grants_and_a_real_403(
    control_plane: ControlPlane,
) -> None:
    cp = control_plane
    cp.kubectl("create", "namespace", "rbac")
    cp.kubectl("create", "serviceaccount", "reader", "-n", "rbac")
    cp.kubectl("create", "role", "pods", "-n", "rbac", "--verb=get,list", "--resource=pods")
    cp.kubectl(
        "create", "rolebinding", "reader-pods", "-n", "rbac", "--role=pods",
        "--serviceaccount=rbac:reader",
    )  # fmt: skip
    kubeconfig = cp.service_account_kubeconfig("rbac", "reader")
    assert "token:" in kubeconfig.read_text()
    whoami = json.loads(cp.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert whoami["status"]["userInfo"]["username"] == "system:serviceaccount:rbac:reader"
    cp.kubectl("get", "pods", "-n", "rbac", kubeconfig=kubeconfig)  # allowed
    denied = cp.kubectl("get", "secrets", "-n", "rbac", kubeconfig=kubeconfig, check=False)
    assert denied.returncode == 1
    assert (
        'User "system:serviceaccount:rbac:reader" cannot list resource "secrets"' in denied.stderr
    )
    assert "Forbidden" in denied.stderr


def test_two_instances_at_once_are_independent_and_leave_nothing(
    control_plane: ControlPlane,
) -> None:
    with ControlPlane() as second:
        assert second.server != control_plane.server
        second.kubectl("create", "namespace", "only-in-second")
        assert _get(second, "/api/v1/namespaces/only-in-second") is not None
        assert _get(control_plane, "/api/v1/namespaces/only-in-second") is None
        pids, directory = second.pids, second.directory
        assert len(pids) == 4
        assert all(not _gone(pid) for pid in pids.values())
    assert all(_gone(pid) for pid in pids.values()), pids
    assert not directory.exists()
    assert control_plane.api("GET", "/readyz")[0] == 200  # the first one is untouched


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from k8s_ext_connector_testbed.controlplane import ControlPlane
    with ControlPlane() as cp:
        print(json.dumps({"pids": cp.pids, "dir": str(cp.directory)}), flush=True)
        time.sleep(600)
    """
)


def test_a_terminated_or_killed_test_process_leaves_nothing() -> None:
    """SIGTERM unwinds through close(); after SIGKILL the processes die with their parent
    (pdeathsig) and the next instance's start sweeps the directory."""
    children = {
        signum: subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        for signum in (signal.SIGTERM, signal.SIGKILL)
    }
    started: dict[signal.Signals, dict[str, Any]] = {}
    try:
        for signum, child in children.items():
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line, f"child for {signum.name} exited {child.wait()} before starting"
            started[signum] = json.loads(line)
        for signum, child in children.items():
            child.send_signal(signum)
            child.wait(timeout=30)
            pids: list[int] = list(started[signum]["pids"].values())

            def all_gone(pids: list[int] = pids) -> bool:
                return all(_gone(pid) for pid in pids)

            wait_for(all_gone, timeout=15, what=f"the processes gone after {signum.name}")
        assert not Path(started[signal.SIGTERM]["dir"]).exists()
        killed_dir = Path(started[signal.SIGKILL]["dir"])
        assert killed_dir.exists()  # nobody ran close(): the next start sweeps it
        assert killed_dir in sweep_orphans()
        assert not killed_dir.exists()
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.mark.root
def test_inside_a_network_namespace() -> None:
    """``netns=``: every process in a namespace the caller made, nothing on this machine's
    own loopback (the lab's later use)."""
    name = f"xcl{os.getpid()}n{uuid.uuid4().int % 1000}-kube"
    netns.add(name)
    try:
        with ControlPlane(netns=name) as cp:
            assert cp.api("GET", "/readyz")[0] == 200
            assert cp.kubectl("get", "namespace", "default", "-o", "name").stdout.strip() == (
                "namespace/default"
            )
            assert cp.ports is not None
            listening = netns.sh(["ip", "netns", "exec", name, "ss", "-Htln"]).stdout
            assert f"127.0.0.1:{cp.ports.apiserver}" in listening
            assert set(netns.pids_in(name)) == set(cp.pids.values())
            pids, directory = cp.pids, cp.directory
    finally:
        netns.delete(name)
    assert all(_gone(pid) for pid in pids.values())
    assert not directory.exists()
