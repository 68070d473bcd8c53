"""The gateway's host key Secret against a real HTTP API, without root: what ends it (exit 2,
one line naming the Secret and namespace) and what only makes it wait.

Every case here stops before the agent would touch iptables, addresses or listeners, so
the real ``k8s-ext-connector gateway`` process runs in the test's own network namespace.
Serving, following a new key and /ready: tests/netns/test_gateway_incluster.py (root).
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from k8s_ext_connector.emulator import ApiServer
from k8s_ext_connector.operator import rbac
from tests.polling import wait_for
from tests.unit.samples import gateway_doc

NAMESPACE = "external-services"
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


@pytest.fixture
def forbidding_api(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """An API server that answers every request as RBAC would without the gateway's Role."""
    seen: list[str] = []

    async def forbid(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "Forbidden",
                "code": 403,
                "message": f'secrets "{SECRET}" is forbidden: User '
                '"system:serviceaccount:external-services:gateway" cannot get resource '
                f'"secrets" in API group "" in the namespace "{NAMESPACE}"',
            },
            status=403,
        )

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forbid)
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    try:
        port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "current-context": "c",
                    "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                    "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                    "users": [{"name": "u", "user": {"token": "not-allowed"}}],
                }
            )
        )
        yield kubeconfig, seen
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_forbidden_secret_ends_with_one_line_naming_it(
    forbidding_api: tuple[Path, list[str]], tmp_path: Path
) -> None:
    kubeconfig, seen = forbidding_api
    code, lines = _finish(_gateway(tmp_path, kubeconfig))
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"k8s-ext-connector gateway: error: --host-key-secret: '{SECRET}': "
        f"cannot be read in namespace {NAMESPACE}: HTTP 403 Forbidden: "
    )
    assert seen == [f"GET {SECRET_PATH}"]  # asked once: a refusal is not retried


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
    apiserver: ApiServer,
    kubeconfig: Path,
    tmp_path: Path,
    data: dict[str, str],
    reason: str,
) -> None:
    apiserver.create_object(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    )
    gateway = _gateway(tmp_path, kubeconfig)
    try:
        # 404: it keeps asking (with backoff) instead of failing.
        wait_for(
            lambda: sum(r.path == SECRET_PATH for r in apiserver.requests) >= 2,
            10,
            "the gateway to ask for its Secret again after a 404",
        )
        assert gateway.poll() is None
        apiserver.create_object(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": SECRET, "namespace": NAMESPACE},
                "data": data,
            }
        )
        code, lines = _finish(gateway)
    finally:
        gateway.kill()
    assert code == 2
    assert lines[-1] == (
        f"k8s-ext-connector gateway: error: --host-key-secret: '{SECRET}': "
        f"in namespace {NAMESPACE}: {reason}"
    )
    assert "not found yet" in lines[0]  # the wait was said, once
    assert sum("waiting for Secret" in line for line in lines) == 1
    assert {(r.verb, r.method, r.path) for r in apiserver.requests} == {("get", "GET", SECRET_PATH)}
    # ... which the gateway's Role grants (operator/rbac.py, the chart's Role); its Lease
    # rules are used once it serves (tests/controlplane/test_gateway_lease.py).
    spec = rbac.COMPONENTS["gateway"]
    granted = {(r.group, r.resource, verb) for r in spec.namespace_rules for verb in r.verbs}
    assert not spec.cluster_rules
    assert {(r.api_group, r.resource, r.verb) for r in apiserver.requests} == {
        ("", "secrets", "get")
    }
    assert ("", "secrets", "get") in granted
