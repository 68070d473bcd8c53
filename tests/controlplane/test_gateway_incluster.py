"""The gateway's host key Secret against a real API server (the chart's RBAC, the gateway's
own ServiceAccount token; the audit log records what it asked), without root: what ends it (exit 2,
one line naming the Secret and namespace) and what only makes it wait.

Every case here stops before the agent would touch iptables, addresses or listeners, so
the real ``k8s-ext-connector gateway`` process runs in the test's own network namespace.
Serving, following a new key and /ready: tests/netns/test_gateway_incluster.py (root).
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s_ext_connector.operator import rbac
from k8s_ext_connector_testbed.audit import service_account_user
from k8s_ext_connector_testbed.controlplane import ControlPlane
from tests.controlplane import chartcluster as realcluster
from tests.controlplane.chartcluster import (  # noqa: F401
    CONNECTOR_NAMESPACE,
    control_plane,
)
from tests.polling import wait_for
from tests.unit.samples import gateway_doc

pytestmark = pytest.mark.kube
NAMESPACE = CONNECTOR_NAMESPACE
SECRET = "ext-connector-gateway-gw1-host-key"
SECRET_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}"


def _gateway(config_dir: Path, kubeconfig: Path) -> subprocess.Popen[str]:
    config = config_dir / "gw1.yaml"
    config.write_text(yaml.safe_dump(gateway_doc()))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "k8s_ext_connector",
            "gateway",
            "--config",
            str(config),
            "--host-key-secret",
            SECRET,
            "--namespace",
            NAMESPACE,
            "--kubeconfig",
            str(kubeconfig),
            "--node-name",
            "gw1",
            "--iptables-backend",
            "nft",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, list[str]]:
    try:
        _, err = process.communicate(timeout=15)
    finally:
        process.kill()
    return process.returncode, err.splitlines()


def _asked(cp: ControlPlane, user: str, since: int = 0) -> list[tuple[str, str, str, str]]:
    """(verb, resource, namespace, name) of every call ``user`` made, from the audit log."""
    return [(c.verb, c.resource, c.namespace, c.name) for c in cp.audit_calls(user)[since:]]


def test_forbidden_secret_ends_with_one_line_naming_it(
    control_plane: ControlPlane,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A token without the gateway's Role (the namespace's ``default`` ServiceAccount):
    the real RBAC refuses the read."""
    cp = control_plane
    kubeconfig = cp.service_account_kubeconfig(NAMESPACE, "default")
    code, lines = _finish(_gateway(tmp_path, kubeconfig))
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"k8s-ext-connector gateway: error: --host-key-secret: '{SECRET}': "
        f"cannot be read in namespace {NAMESPACE}: HTTP 403 Forbidden: "
    )
    assert "system:serviceaccount:external-services:default" in lines[0]  # the server's words
    # Asked once: a refusal is not retried.
    user = service_account_user(NAMESPACE, "default")
    assert _asked(cp, user) == [("get", "secrets", NAMESPACE, SECRET)]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(
            {"ssh-privatekey": base64.b64encode(b"hello\n").decode()},
            "data.ssh-privatekey is not an OpenSSH private key",
            id="not-a-key",
        ),
        pytest.param({"other": "eA=="}, "has no data.ssh-privatekey", id="no-key"),
    ],
)
def test_waits_for_a_missing_secret_and_rejects_one_without_a_key(
    control_plane: ControlPlane,  # noqa: F811
    tmp_path: Path,
    data: dict[str, str],
    reason: str,
) -> None:
    cp = control_plane
    user = realcluster.user("gateway")
    since = len(cp.audit_calls(user))
    gateway = _gateway(tmp_path, realcluster.kubeconfig(cp, "gateway"))
    try:
        # 404: it keeps asking (with backoff) instead of failing.
        wait_for(
            lambda: len(_asked(cp, user, since)) >= 2,
            10,
            "the gateway to ask for its Secret again after a 404",
        )
        assert gateway.poll() is None
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NAMESPACE},
            "data": data,
        }
        assert cp.api("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", secret)[0] == 201
        code, lines = _finish(gateway)
    finally:
        gateway.kill()
        cp.api("DELETE", SECRET_PATH)
    assert code == 2
    assert lines[-1] == (
        f"k8s-ext-connector gateway: error: --host-key-secret: '{SECRET}': "
        f"in namespace {NAMESPACE}: {reason}"
    )
    assert "not found yet" in lines[0]  # the wait was said, once
    assert sum("waiting for Secret" in line for line in lines) == 1
    recorded = cp.audit_calls(user)[since:]
    assert {(c.verb, c.resource, c.namespace, c.name) for c in recorded} == {
        ("get", "secrets", NAMESPACE, SECRET)
    }
    # ... which the gateway's Role grants (operator/rbac.py, the chart's Role): the server
    # answered 404, then 200, never 403. Its Lease rules are used once it serves
    # (tests/controlplane/test_gateway_lease.py).
    assert {c.code for c in recorded} == {404, 200}
    spec = rbac.COMPONENTS["gateway"]
    assert not spec.cluster_rules
    assert realcluster.used(recorded) <= realcluster.granted(*spec.namespace_rules)
