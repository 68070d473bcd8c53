"""`helm install` of the chart into an upstream API server (OpenAPI validation on), then the
chart's own commands (container args and env exactly as rendered into the Deployments) run
against it, each with a token of its own ServiceAccount under the chart's rendered RBAC.

The harness plays the kubelet for those containers and says so: ``$(VAR)`` references
are expanded from the env the chart declares, a mounted Secret becomes a directory with
the keys the chart's volume names (group-readable by the pod's fsGroup), a listening port
the chart declares is mapped to a free local one, and the API is reached through
$KUBECONFIG holding a token of the pod's ServiceAccount (TokenRequest) instead of the
projected in-cluster token file. Run as root (CI), each command runs as the
pod's uid and gid (65532, which has no passwd entry on this machine either) with only the
env a container gets, so a component that needs a home, a user name or a writable path
outside /tmp fails here as it would in the image.

The control plane listens on this machine's loopback (no test namespace: here nothing
needs the API server to call the webhook; test_admission.py does that).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s_ext_connector.core.api import GATEWAY_NODE_LABEL
from k8s_ext_connector.operator.desired import GATEWAY_CONFIGMAP, host_key_secret_name
from k8s_ext_connector_testbed.controlplane import ControlPlane
from tests.chart.helm import CHART, RELEASE_NAMESPACE, helm
from tests.polling import wait_for
from tests.ports import free_port
from tests.unit.samples import SEED_MANIFEST

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]
RELEASE = "ext-connector"
CONNECTOR_NAMESPACE = "external-services"
FULLNAME = "k8s-ext-connector"
CRD = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/externalservices.submariner.io"


@dataclass
class Installed:
    cp: ControlPlane
    workdir: Path
    notes: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, as_: Path | None = None
    ) -> str:
        result = self.cp.kubectl(*args, input_text=stdin, check=False, kubeconfig=as_)
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def get(self, path: str) -> dict[str, Any] | None:
        status, body = self.cp.api("GET", path)
        return body if status == 200 else None

    def workload(self, kind: str, component: str) -> dict[str, Any]:
        plural = {"Deployment": "deployments", "DaemonSet": "daemonsets"}[kind]
        namespace = CONNECTOR_NAMESPACE if component == "gateway" else RELEASE_NAMESPACE
        found = self.get(f"/apis/apps/v1/namespaces/{namespace}/{plural}/{FULLNAME}-{component}")
        assert found is not None, (kind, component)
        return found

    def token_kubeconfig(self, spec: dict[str, Any]) -> Path:
        """A kubeconfig with a token of the pod's ServiceAccount, readable by its uid."""
        account = spec["serviceAccountName"]
        path = self.workdir / f"{account}.kubeconfig"
        shutil.copyfile(self.cp.service_account_kubeconfig(RELEASE_NAMESPACE, account), path)
        path.chmod(0o644)
        return path

    def run_container(
        self, component: str, ports: dict[str, int] | None = None
    ) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
        """Start the component's container command as the chart renders it."""
        spec = self.workload("Deployment", component)["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = {"POD_NAME": f"{component}-0", "POD_NAMESPACE": RELEASE_NAMESPACE}
        for variable in container.get("env", []):
            assert "valueFrom" in variable, variable
        mapped = {p["containerPort"]: free_port() for p in container.get("ports", [])}
        mounts = {m["mountPath"]: self._mount(spec, m["name"]) for m in container["volumeMounts"]}
        args = [self._expand(a, env, mapped, mounts) for a in container["args"]]
        log = (self.workdir / f"{component}.log").open("ab")
        process = subprocess.Popen(
            [*self._as_pod_user(spec, container), sys.executable, "-m", "k8s_ext_connector", *args],
            env={"PATH": "/usr/bin:/bin", **env, "KUBECONFIG": str(self.token_kubeconfig(spec))},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes.append(process)
        return process, mapped

    @staticmethod
    def _as_pod_user(spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
        security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
        uid, gid = security.get("runAsUser"), security.get("runAsGroup", security.get("runAsUser"))
        if uid is None or os.geteuid() != 0:
            return []  # not root: run as whoever runs the tests
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]

    def wait(self, check: Any, what: str, component: str) -> Any:
        """wait_for, failing with the component's log (read at the deadline)."""
        try:
            return wait_for(check, timeout=20, what=what)
        except AssertionError as timeout:
            raise AssertionError(
                f"{timeout}\n--- {component} log ---\n{self.log(component)}"
            ) from None

    def log(self, component: str) -> str:
        path = self.workdir / f"{component}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def _mount(self, spec: dict[str, Any], name: str) -> Path:
        (volume,) = [v for v in spec["volumes"] if v["name"] == name]
        directory = self.workdir / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            directory.chmod(0o1777)  # writable by the pod's uid, as the kubelet makes it
        if "secret" in volume:
            secret = wait_for(
                lambda: self.get(
                    f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets/"
                    + volume["secret"]["secretName"]
                ),
                timeout=20,
                what=f"Secret {volume['secret']['secretName']} for volume {name}",
            )
            group = spec.get("securityContext", {}).get("fsGroup", 0)
            for item in volume["secret"]["items"]:
                path = directory / item["path"]
                path.write_bytes(base64.b64decode(secret["data"][item["key"]]))
                os.chmod(path, 0o440)  # defaultMode 0400, group-readable through fsGroup
                if os.geteuid() == 0:
                    os.chown(path, 0, group)
        return directory

    @staticmethod
    def _expand(
        arg: str, env: dict[str, str], ports: dict[int, int], mounts: dict[str, Path]
    ) -> str:
        arg = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)
        flag, sep, value = arg.partition("=")
        for path in sorted(mounts, key=len, reverse=True):
            if sep and (value == path or value.startswith(path + "/")):
                return f"{flag}={mounts[path]}{value[len(path) :]}"
        if sep and flag.endswith("port") and value.isdigit() and int(value) in ports:
            return f"{flag}={ports[int(value)]}"
        return arg


@pytest.fixture
def installed() -> Iterator[Installed]:
    # Not tmp_path: pytest keeps it under a root-only directory the pods' uid cannot enter.
    workdir = Path(tempfile.mkdtemp(prefix="extconn-helm-"))
    workdir.chmod(0o755)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        cp = cleanup.enter_context(ControlPlane())
        result = helm(
            "--kubeconfig", str(cp.kubeconfig), "install", RELEASE, str(CHART),
            "-n", RELEASE_NAMESPACE, "--create-namespace",
        )  # fmt: skip
        release = Installed(cp, workdir, result.stdout)
        try:
            yield release
        finally:
            for process in release.processes:
                process.terminate()
            for process in release.processes:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _rendered() -> str:
    return helm("template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE).stdout


def test_install_creates_every_object_and_prints_the_next_three_commands(
    installed: Installed,
) -> None:
    names = installed.kubectl("get", "-f", "-", "-o", "name", stdin=_rendered()).split()
    assert len(names) == len([d for d in yaml.safe_load_all(_rendered()) if d])
    assert installed.get(CRD)
    for command in (
        "kubectl label node <node> node-restriction.kubernetes.io/ext-connector-gateway=true",
        "kubectl label namespace <namespace> external-service-injection=enabled",
        "kubectl apply -f -",
    ):
        assert command in installed.notes


def test_the_charts_commands_issue_certificates_serve_and_reconcile(
    installed: Installed,
) -> None:
    """certs sync fills the chart's MutatingWebhookConfiguration; the webhook serves its
    Service name with that chain; the operator takes its Lease in the release namespace,
    answers /healthz and writes the gateway's host key where the gateway DaemonSet reads it."""
    c = installed
    c.run_container("certs")

    def bundle() -> bytes | None:
        config = c.get(
            f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{FULLNAME}"
        )
        encoded = (config or {}).get("webhooks", [{}])[0].get("clientConfig", {}).get("caBundle")
        return base64.b64decode(encoded) if encoded else None

    ca = c.wait(bundle, "caBundle from certs sync", "certs")

    _, webhook_ports = c.run_container("webhook")
    (port,) = webhook_ports.values()
    context = ssl.create_default_context(cadata=ca.decode())
    service_name = f"{FULLNAME}-webhook.{RELEASE_NAMESPACE}.svc"

    def webhook_ready() -> bool:
        """GET /readyz on the local port, verifying the certificate for the Service's name."""
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname=service_name) as tls,
            ):
                tls.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return tls.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    c.wait(webhook_ready, "webhook /readyz over TLS", "webhook")

    _, operator_ports = c.run_container("operator")
    (health,) = operator_ports.values()
    c.wait(
        lambda: c.get(
            f"/apis/coordination.k8s.io/v1/namespaces/{RELEASE_NAMESPACE}/leases/"
            "k8s-ext-connector-operator"
        ),
        "the operator's Lease in the release namespace",
        "operator",
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as response:
        assert response.status == 200

    c.kubectl("create", "namespace", "ns1")
    c.kubectl("create", "namespace", "ns2")
    for namespace, name in (("ns1", "my-service1"), ("ns2", "my-service2")):
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}]},
        }
        c.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(service))
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "gw1", "labels": {GATEWAY_NODE_LABEL[0]: GATEWAY_NODE_LABEL[1]}},
    }
    assert c.cp.api("POST", "/api/v1/nodes", node)[0] == 201
    ready = '{"status": {"conditions": [{"type": "Ready", "status": "True"}]}}'
    c.kubectl("patch", "node", "gw1", "--subresource=status", "--type=merge", "-p", ready)
    c.kubectl("apply", "-n", "ns1", "-f", "-", stdin=SEED_MANIFEST)
    daemonset = c.workload("DaemonSet", "gateway")["spec"]["template"]["spec"]
    args = daemonset["containers"][0]["args"]
    secret = next(a for a in args if a.startswith("--host-key-secret=")).split("=", 1)[1]
    assert secret.replace("$(NODE_NAME)", "gw1") == host_key_secret_name("gw1")
    c.wait(
        lambda: c.get(
            f"/api/v1/namespaces/{CONNECTOR_NAMESPACE}/secrets/{host_key_secret_name('gw1')}"
        ),
        "gw1's host key Secret",
        "operator",
    )

    def gateway_config() -> dict[str, Any] | None:
        found = c.get(f"/api/v1/namespaces/{CONNECTOR_NAMESPACE}/configmaps/{GATEWAY_CONFIGMAP}")
        return found if found and "gw1.yaml" in (found.get("data") or {}) else None

    c.wait(gateway_config, "gw1.yaml in the gateway ConfigMap", "operator")
    (volume,) = [v for v in daemonset["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == GATEWAY_CONFIGMAP

    # Each ran under its own ServiceAccount's token and the chart's rendered RBAC: a call
    # outside it would have been a real 403, which each logs.
    for component in ("certs", "webhook", "operator"):
        log = (c.workdir / f"{component}.log").read_text()
        assert not re.search(r"\b403\b|Forbidden", log), f"--- {component} log ---\n{log}"
    # ... and one the operator never needs is refused: it writes the host keys but may
    # not read any Secret back.
    operator = c.token_kubeconfig(c.workload("Deployment", "operator")["spec"]["template"]["spec"])
    denied = c.cp.kubectl(
        "get", "secret", host_key_secret_name("gw1"), "-n", CONNECTOR_NAMESPACE,
        kubeconfig=operator, check=False,
    )  # fmt: skip
    assert denied.returncode == 1
    assert (
        f'User "system:serviceaccount:{RELEASE_NAMESPACE}:{FULLNAME}-operator" cannot get'
        f' resource "secrets" in API group "" in the namespace "{CONNECTOR_NAMESPACE}"'
    ) in denied.stderr


def test_uninstall_removes_everything_but_the_kept_namespace_and_the_crd(
    installed: Installed,
) -> None:
    helm(
        "--kubeconfig", str(installed.cp.kubeconfig), "uninstall", RELEASE, "-n",
        RELEASE_NAMESPACE,
    )  # fmt: skip
    left = installed.kubectl(
        "get", "-f", "-", "-o", "name", "--ignore-not-found", stdin=_rendered()
    ).split()
    assert left == [f"namespace/{CONNECTOR_NAMESPACE}"]
    assert installed.get(CRD)
