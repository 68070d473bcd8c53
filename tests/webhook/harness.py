"""Helpers for webhook tests: an event loop on a thread, TLS material, an HTTPS client
that verifies the server as the API server does (by the Service's DNS name), and an
in-memory stand-in for the watch cache."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from k8s_ext_connector.certs.tls import (
    Issued,
    generate_ca,
    issue_serving_cert,
    service_dns_names,
    write_pair,
)
from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.webhook.inject import sources_selecting

T = TypeVar("T")
Obj = dict[str, Any]
SERVICE, NAMESPACE = "k8s-ext-connector-webhook", "external-services"
HOSTNAME = f"{SERVICE}.{NAMESPACE}.svc"  # the name the API server verifies
DAY = datetime.timedelta(days=1)


class LoopThread:
    """An asyncio loop on its own thread; ``run`` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self.run(call())

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextmanager
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


def new_ca(name: str = "test-ca") -> Issued:
    return generate_ca(name, DAY)


def write_serving_pair(directory: Path, ca: Issued) -> None:
    write_pair(directory, issue_serving_cert(ca, service_dns_names(SERVICE, NAMESPACE), DAY))


def client_context(ca: Issued) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca.cert_pem.decode())


class Connection(http.client.HTTPSConnection):
    """Connects to 127.0.0.1 but verifies the certificate for ``HOSTNAME``."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", port, context=context, timeout=10)
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=HOSTNAME)


@dataclass
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def https(
    port: int,
    ca: Issued,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    connection = Connection(port, client_context(ca))
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return Reply(response.status, response.read(), dict(response.getheaders()))
    finally:
        connection.close()


def review(
    pod: Obj | None,
    uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002",
    operation: str = "CREATE",
    kind: Obj | None = None,
    dry_run: bool = False,
) -> Obj:
    """An AdmissionReview as the API server sends it for a pod."""
    meta = (pod or {}).get("metadata") or {}
    request: Obj = {
        "uid": uid,
        "kind": kind or {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": kind or {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", "ns1"),
        "operation": operation,
        "userInfo": {"username": "admin", "groups": ["system:authenticated"]},
        "object": pod,
        "oldObject": None,
        "dryRun": dry_run,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


@dataclass
class FakeIndex:
    """The cache's interface from a plain list; ``error`` makes ``sources_for`` raise."""

    services: list[tuple[ServiceRef, dict[str, str]]] = field(default_factory=list)
    ready: bool = True
    error: Exception | None = None

    def sources_for(self, pod: Mapping[str, Any]) -> tuple[ServiceRef, ...]:
        if self.error is not None:
            raise self.error
        meta = pod.get("metadata") or {}
        return sources_selecting(meta.get("labels") or {}, meta.get("namespace", ""), self.services)
