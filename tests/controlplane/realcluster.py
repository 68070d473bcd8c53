"""The chart on a real upstream control plane inside a test network namespace.

Why a namespace: the API server calls a webhook at its Service's endpoint address, and it
refuses loopback endpoints; inside a namespace this test creates, the control plane listens
on 127.0.0.1 and the webhook on ``WEBHOOK_IP`` (TEST-NET-2, on that namespace's ``lo``
only), so the API server dials the webhook for real and nothing of this machine's own
network changes. No kubelet runs: the chart's pods stay Pending, a test runs a component's
command itself (with that component's ServiceAccount token) and gives the webhook's
Service an EndpointSlice naming where it listens, as the endpointslice controller would
for a ready pod.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from k8s_ext_connector.lab import netns
from k8s_ext_connector_testbed.controlplane import ControlPlane
from tests.chart.helm import CHART, RELEASE_NAMESPACE, helm_binary
from tests.polling import wait_for

Obj = dict[str, Any]
RELEASE = "ext-connector"
FULLNAME = "k8s-ext-connector"
WEBHOOK_SERVICE = f"{FULLNAME}-webhook"
WEBHOOK_IP = "198.51.100.250"  # only inside the test's namespace
ENDPOINT_SLICE = f"{WEBHOOK_SERVICE}-test"


@dataclass
class NetnsCluster:
    netns: str
    cp: ControlPlane
    workdir: Path

    def kubectl(
        self, *args: str, stdin: str | None = None, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """kubectl in the namespace (admin unless ``kubeconfig``); never raises."""
        return self.cp.kubectl(*args, kubeconfig=kubeconfig, input_text=stdin, check=False)

    def ok(self, *args: str, stdin: str | None = None, kubeconfig: Path | None = None) -> str:
        result = self.kubectl(*args, stdin=stdin, kubeconfig=kubeconfig)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def apply(self, obj: Obj) -> None:
        self.ok("apply", "-f", "-", stdin=yaml.safe_dump(obj))

    def get(self, path: str) -> Obj | None:
        status, body = self.cp.api("GET", path)
        return body if status == 200 else None

    def call_as(
        self,
        kubeconfig: Path,
        method: str,
        path: str,
        body: Obj | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Obj]:
        """One raw API call with the token of ``kubeconfig`` (kubectl would GET first,
        which a write-only rule refuses): (HTTP status, decoded body)."""
        token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
        assert self.cp.pki is not None
        context = ssl.create_default_context(cadata=self.cp.pki.ca.cert_pem.decode())
        request = urllib.request.Request(
            self.cp.server + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
        )

        def call() -> tuple[int, Obj]:
            try:
                with urllib.request.urlopen(request, context=context, timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        return netns.call_in_netns(self.netns, call)

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns, helm_binary(),
             "--kubeconfig", str(self.cp.kubeconfig), *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
        return result

    def install(self, *values: str) -> str:
        """``helm install`` of the chart, OpenAPI validation on; the NOTES it prints."""
        return self.helm(
            "install", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--create-namespace",
            *values,
        ).stdout  # fmt: skip

    def service_account(self, component: str) -> Path:
        """A kubeconfig with the token of the chart's ServiceAccount for ``component``."""
        return self.cp.service_account_kubeconfig(RELEASE_NAMESPACE, f"{FULLNAME}-{component}")

    def container_args(self, component: str) -> list[str]:
        path = f"/apis/apps/v1/namespaces/{RELEASE_NAMESPACE}/deployments/{FULLNAME}-{component}"
        deployment = self.get(path)
        assert deployment is not None, path
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return list(container["args"])

    def certs_sync_once(self) -> bytes:
        """The chart's ``certs sync`` command, once (no ``--loop``), as the certs
        ServiceAccount; returns the caBundle it wrote into the chart's configuration."""
        args = [a for a in self.container_args("certs") if not a.startswith("--loop")]
        kubeconfig = self.service_account("certs")
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "k8s_ext_connector",
             *args, f"--kubeconfig={kubeconfig}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"certs sync: {result.stdout}{result.stderr}"
        path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{FULLNAME}"
        configuration = self.get(path)
        assert configuration is not None
        return base64.b64decode(configuration["webhooks"][0]["clientConfig"]["caBundle"])

    def write_serving_pair(self, directory: Path) -> None:
        """The Secret the webhook pods mount, as the kubelet would project it."""
        name = next(
            a.split("=", 1)[1] for a in self.container_args("certs") if a.startswith("--secret=")
        )
        secret = self.get(f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets/{name}")
        assert secret is not None, name
        directory.mkdir(parents=True, exist_ok=True)
        for key in ("tls.crt", "tls.key"):
            (directory / key).write_bytes(base64.b64decode(secret["data"][key]))
            (directory / key).chmod(0o400)

    def point_webhook_service_at(self, port: int) -> None:
        """An EndpointSlice of the webhook's Service: ``WEBHOOK_IP:port``, ready."""
        self.apply(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": ENDPOINT_SLICE,
                    "namespace": RELEASE_NAMESPACE,
                    "labels": {
                        "kubernetes.io/service-name": WEBHOOK_SERVICE,
                        # Not the endpointslice controller's: it leaves this slice alone.
                        "endpointslice.kubernetes.io/managed-by": "extconn-tests",
                    },
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [WEBHOOK_IP], "conditions": {"ready": True}}],
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            }
        )

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """A namespace whose pods can be created: ServiceAccount admission refuses pods
        until the serviceaccount controller has made the namespace's ``default``."""
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": labels or {}},
            }
        )
        wait_for(
            lambda: self.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
            timeout=30,
            what=f"the default ServiceAccount of {name}",
        )


@contextlib.contextmanager
def netns_cluster(role: str) -> Iterator[NetnsCluster]:
    """A namespace named like the lab's (swept if this process dies), ``WEBHOOK_IP`` on
    its loopback, a control plane in it; all removed on the way out, failures included."""
    name = f"xcl{os.getpid()}n{uuid.uuid4().int % 10000}-{role}"
    workdir = Path(tempfile.mkdtemp(prefix=f"extconn-{role}-"))
    try:
        netns.add(name)
        netns.sh(["ip", "-n", name, "addr", "add", f"{WEBHOOK_IP}/32", "dev", "lo"])
        with ControlPlane(netns=name) as cp:
            yield NetnsCluster(name, cp, workdir)
    finally:
        netns.delete(name)
        shutil.rmtree(workdir, ignore_errors=True)
