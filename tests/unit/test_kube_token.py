"""A token file is followed: each request carries the file's current token (the kubelet
rotates projected service account tokens in place; security.md W12)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from k8s_ext_connector.core import kube
from k8s_ext_connector.core.kube import SECRETS, Credentials, KubeClient, load_credentials


def test_every_request_carries_the_token_files_current_content(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    seen: list[str] = []

    async def secret(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"kind": "Secret", "metadata": {"name": "s"}})

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/ns/secrets/s", secret)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        credentials = Credentials(server=f"http://127.0.0.1:{port}", token_file=str(token_file))
        try:
            async with KubeClient(credentials) as client:
                await client.get(SECRETS, "ns", "s")
                token_file.write_text("second\n")
                stat = token_file.stat()  # a rotation within the same mtime tick still shows
                os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
                await client.get(SECRETS, "ns", "s")
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    assert seen == ["Bearer first", "Bearer second"]


def test_kubeconfig_token_file_is_used_and_never_shown(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"tokenFile": str(token_file)}}],
            }
        )
    )
    credentials = load_credentials(str(kubeconfig))
    assert credentials.bearer() == "s3cret"
    assert "s3cret" not in repr(credentials)


def test_in_cluster_ipv6_api_address_is_bracketed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("t")
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00:10:96::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert load_credentials().server == "https://[fd00:10:96::1]:443"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert load_credentials().server == "https://10.96.0.1:443"
