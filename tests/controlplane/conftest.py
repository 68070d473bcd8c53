"""Control-plane tier: a project-owned API server emulator on real HTTP, driven by kubectl,
kopf and a small HTTP client exactly as they would drive a cluster.

Fixtures: ``apiserver`` (a fresh emulator per test, on its own thread), ``kubeconfig`` (its
path, also exported as KUBECONFIG) and ``kubectl`` (runs kubectl 1.32 against it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from k8s_ext_connector_testbed.emulator import ApiServer

T = TypeVar("T")
Obj = dict[str, Any]
CMS = "/api/v1/namespaces/default/configmaps"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
WIDGETS = "/apis/example.com/v1/namespaces/default/widgets"
MERGE, JSON_PATCH, STRATEGIC = (
    "application/merge-patch+json",
    "application/json-patch+json",
    "application/strategic-merge-patch+json",
)
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
WIDGET_CRD: Obj = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {
            "plural": "widgets",
            "singular": "widget",
            "kind": "Widget",
            "shortNames": ["wdg"],
            "categories": ["gadgetry"],
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Target", "type": "string", "jsonPath": ".spec.targetIP"},
                    {
                        "name": "Ready",
                        "type": "string",
                        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                    },
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size", "priority": 1},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }
        ],
    },
}


def cm(
    name: str, namespace: str = "default", labels: dict[str, str] | None = None, **data: str
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "data": data,
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
    }


def widget(name: str, **spec: Any) -> Obj:
    return {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "spec": spec,
        "metadata": {"name": name, "namespace": "default"},
    }


@dataclass
class Http:
    """A minimal JSON client: (status, body) for every call, errors included."""

    url: str

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = (
            None
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, result = self.call(method, path, body, **kw)
        assert status < 300, (status, result)
        return result

    def watch(
        self, path: str, until: Callable[[list[Obj]], bool], timeout: float = 10.0
    ) -> list[Obj]:
        """Read watch events until ``until(events)`` holds or the server ends the stream."""
        events: list[Obj] = []
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            for line in response:
                events.append(json.loads(line))
                if until(events):
                    break
        return events


@pytest.fixture
def apiserver() -> Iterator[ApiServer]:
    """A fresh emulator on 127.0.0.1 (free port), serving from its own thread."""
    with ApiServer().run_in_thread() as server:
        yield server


@pytest.fixture
def kubeconfig(apiserver: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = apiserver.write_kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


@pytest.fixture
def http(apiserver: ApiServer) -> Http:
    return Http(apiserver.url)


Kubectl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path) -> Kubectl:
    """``kubectl(*args, input=None, check=True)`` with a per-test discovery cache."""
    binary = shutil.which("kubectl")
    assert binary is not None, "kubectl is required (scripts/install.sh installs it)"

    def run(
        *args: str,
        input: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [
                binary,
                "--kubeconfig",
                str(kubeconfig),
                "--cache-dir",
                str(tmp_path / "cache"),
                *args,
            ],
            input=input,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    return run
