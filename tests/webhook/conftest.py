"""Webhook tier: the real HTTPS server on 127.0.0.1 (a free port), certificates from
``certs/tls.py`` in ``tmp_path``, an in-memory cache stand-in (``FakeIndex``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from k8s_ext_connector.certs.tls import Issued
from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.webhook.inject import InjectionSettings
from k8s_ext_connector.webhook.server import ServingCertificate, WebhookServer
from tests.webhook.harness import (
    FakeIndex,
    LoopThread,
    Reply,
    https,
    loop_thread,
    new_ca,
    write_serving_pair,
)

MY_SERVICE = ServiceRef("ns1", "my-service1")


@dataclass
class Webhook:
    server: WebhookServer
    index: FakeIndex
    ca: Issued
    tls_dir: Path
    loop: LoopThread

    @property
    def port(self) -> int:
        return self.server.port

    def post(self, document: Any, raw: bytes | None = None) -> Reply:
        body = raw if raw is not None else json.dumps(document).encode()
        return https(
            self.port, self.ca, "POST", "/mutate", body, {"Content-Type": "application/json"}
        )

    def get(self, path: str) -> Reply:
        return https(self.port, self.ca, "GET", path)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    with loop_thread() as thread:
        yield thread


def start_webhook(
    loop: LoopThread, tmp_path: Path, settings: InjectionSettings, index: FakeIndex
) -> Webhook:
    ca = new_ca()
    tls_dir = tmp_path / "tls"
    write_serving_pair(tls_dir, ca)
    certificate = ServingCertificate(tls_dir / "tls.crt", tls_dir / "tls.key")
    server = WebhookServer(index, settings, certificate)
    loop.run(server.start("127.0.0.1", 0))
    return Webhook(server, index, ca, tls_dir, loop)


@pytest.fixture
def settings() -> InjectionSettings:
    return InjectionSettings(image="registry.example/ext-connector:test")


@pytest.fixture
def webhook(loop: LoopThread, tmp_path: Path, settings: InjectionSettings) -> Iterator[Webhook]:
    hook = start_webhook(loop, tmp_path, settings, FakeIndex([(MY_SERVICE, {"app": "my-app"})]))
    yield hook
    loop.run(hook.server.stop())
