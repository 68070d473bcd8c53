"""A small asynchronous Kubernetes API client: the few calls the operator makes itself.

kopf does the watching; this client does the writes (Services, ConfigMaps, Secrets,
status, Leases). Each call names its resource, so the RBAC the code needs can be derived
from the calls (``operator/rbac.py``). Errors are mapped once: ``NotFound``/``Conflict``
for the cases callers handle, ``TransientError`` for what deserves a retry (5xx, 429,
connection problems), ``ApiError`` for the rest.

Credentials: the in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``
(token, token file, client certificate, or none for a local test API). Never logged. A token
file is read again whenever it changes: the kubelet rotates a projected service account
token in place, and an API server stops accepting the old one (after 90 days on some
providers), so a long-running component must follow the file.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import logging
import os
import ssl
import tempfile
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import yaml

from k8s_ext_connector import __version__
from k8s_ext_connector.core.errors import ConfigError, TransientError

USER_AGENT = f"k8s-ext-connector/{__version__}"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class Resource:
    """An API resource as RBAC names it (group "" is core)."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        parts = [base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


SERVICES = Resource("", "v1", "services")
CONFIGMAPS = Resource("", "v1", "configmaps")
SECRETS = Resource("", "v1", "secrets")
EVENTS = Resource("", "v1", "events")
LEASES = Resource("coordination.k8s.io", "v1", "leases")
EXTERNALSERVICES = Resource("submariner.io", "v1alpha1", "externalservices")


class ApiError(RuntimeError):
    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"HTTP {status} {reason}: {message}")


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: AlreadyExists on create, or a stale resourceVersion on update."""


@dataclass(frozen=True)
class Credentials:
    server: str
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token_file: str | None = None  # wins over ``token``; followed when it changes

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"Credentials(server={self.server!r})"

    def bearer(self) -> str | None:
        """The token to send now: the token file's current content, else ``token``."""
        if self.token_file is None:
            return self.token
        return _read_token_file(self.token_file) or self.token

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.server.startswith("https"):
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


_token_cache: dict[str, tuple[int, str]] = {}  # path -> (mtime_ns, token)


def _read_token_file(path: str) -> str | None:
    """The file's token, re-read only when its mtime changes (one stat per request)."""
    try:
        mtime = os.stat(path).st_mtime_ns
        cached = _token_cache.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        token = Path(path).read_text().strip()
    except OSError:
        cached = _token_cache.get(path)
        return cached[1] if cached else None  # mid-swap: keep the last one read
    _token_cache[path] = (mtime, token)
    return token


def load_credentials(kubeconfig: str | None = None) -> Credentials:
    if kubeconfig is None and (SERVICE_ACCOUNT / "token").exists():
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:  # an IPv6 address (IPv6-only or IPv6-first clusters)
            host = f"[{host}]"
        return Credentials(
            server=f"https://{host}:{port}",
            token_file=str(SERVICE_ACCOUNT / "token"),
            ca_file=str(SERVICE_ACCOUNT / "ca.crt"),
        )
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    try:
        config = yaml.safe_load(Path(path).read_text())
        current = config.get("current-context")
        context = next(c["context"] for c in config["contexts"] if c["name"] == current)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        users = [
            u.get("user") or {}
            for u in config.get("users") or []
            if u["name"] == context.get("user")
        ]
        cluster["server"]
    except OSError as error:
        raise ConfigError("--kubeconfig", path, error.strerror or "cannot be read") from None
    except (yaml.YAMLError, AttributeError, KeyError, TypeError, StopIteration):
        raise ConfigError(
            "--kubeconfig", path, "is not a kubeconfig with a current context and cluster"
        ) from None
    user = users[0] if users else {}
    return Credentials(
        server=cluster["server"].rstrip("/"),
        token=user.get("token"),
        token_file=user.get("tokenFile"),
        ca_file=_materialise(cluster, "certificate-authority"),
        cert_file=_materialise(user, "client-certificate"),
        key_file=_materialise(user, "client-key"),
    )


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _materialise(section: dict[str, Any], key: str) -> str | None:
    """kubeconfig gives files or inline base64 data; ssl wants files."""
    if section.get(key):
        return str(section[key])
    data = section.get(f"{key}-data")
    if not data:
        return None
    handle = tempfile.NamedTemporaryFile(delete=False, prefix="extconn-", suffix=".pem")  # noqa: SIM115
    os.chmod(handle.name, 0o600)
    atexit.register(_remove, handle.name)  # a client key must not outlive the process
    handle.write(base64.b64decode(data))
    handle.close()
    return handle.name


async def reconnected(connect: Callable[[], KubeClient], old: KubeClient) -> KubeClient:
    """A client with the credentials read again (the kubelet rotates a projected token in
    its file), the old one closed; on a ConfigError the old one is kept and it is said."""
    try:
        client = connect()
    except ConfigError as error:
        logging.getLogger(__name__).warning("credentials not reloaded: %s", error)
        return old
    await old.close()
    return client


class KubeClient:
    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = self._credentials.ssl_context()
            connector = aiohttp.TCPConnector(ssl=context if context is not None else False)
            self._session = aiohttp.ClientSession(
                base_url=self._credentials.server,
                headers=self._headers,
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    def _auth(self) -> dict[str, str]:
        token = self._credentials.bearer()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _call(
        self, method: str, path: str, body: object = None, content_type: str = "application/json"
    ) -> dict[str, Any]:
        try:
            async with self._http().request(
                method, path, json=body, headers={"Content-Type": content_type, **self._auth()}
            ) as response:
                payload = (
                    await response.json(content_type=None) if response.content_length != 0 else {}
                )
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            raise TransientError(f"{method} {path}: {error}") from None
        if status < 300:
            return payload if isinstance(payload, dict) else {}
        reason = str(payload.get("reason", "")) if isinstance(payload, dict) else ""
        message = str(payload.get("message", "")) if isinstance(payload, dict) else ""
        if status == 404:
            raise NotFound(status, reason or "NotFound", message)
        if status == 409:
            raise Conflict(status, reason or "Conflict", message)
        if status >= 500 or status == 429:
            raise TransientError(f"{method} {path}: HTTP {status} {reason}: {message}")
        raise ApiError(status, reason, message)

    async def get(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any]:
        return await self._call("GET", resource.path(namespace, name))

    async def create(
        self, resource: Resource, namespace: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._call("POST", resource.path(namespace), body)

    async def replace(
        self, resource: Resource, namespace: str | None, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._call("PUT", resource.path(namespace, name), body)

    async def merge_patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        return await self._call(
            "PATCH",
            resource.path(namespace, name, subresource),
            patch,
            "application/merge-patch+json",
        )

    async def json_patch(
        self, resource: Resource, namespace: str | None, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """RFC 6902 patch: all operations or none; a failed ``test`` answers 422."""
        return await self._call(
            "PATCH", resource.path(namespace, name), ops, "application/json-patch+json"
        )

    async def delete(self, resource: Resource, namespace: str | None, name: str) -> None:
        with contextlib.suppress(NotFound):
            await self._call("DELETE", resource.path(namespace, name))

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> dict[str, Any]:
        """One list call: ``{"items": [...], "metadata": {"resourceVersion": ...}}``.

        ``namespace`` None lists across all namespaces (or a cluster-scoped resource).
        Watch caches list once, then follow with ``watch`` from the list's resourceVersion.
        """
        query = {"labelSelector": label_selector} if label_selector else {}
        path = resource.path(namespace) + (f"?{urlencode(query)}" if query else "")
        return await self._call("GET", path)

    async def watch(
        self,
        resource: Resource,
        resource_version: str,
        timeout_seconds: int,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Watch events (``{"type": ADDED|MODIFIED|DELETED|BOOKMARK, "object": ...}``) after
        ``resource_version``, until the server ends the stream (``timeout_seconds``).

        The body is newline-delimited JSON, read in chunks and split here (no line-length
        limit). An ``ERROR`` event, or an error status on the request, raises: ``ApiError``
        with status 410 when ``resource_version`` is too old (the caller lists again),
        ``TransientError`` for 5xx/429 and connection failures (the caller retries with
        backoff from the last resourceVersion it saw), ``ApiError`` otherwise.
        """
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_seconds),
            "allowWatchBookmarks": "true",
        }
        if label_selector:
            query["labelSelector"] = label_selector
        path = f"{resource.path(namespace)}?{urlencode(query)}"
        # The stream is idle between events: only connecting and a silent peer time out.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_seconds + 30)

        def failure(status: int, payload: object) -> Exception:
            body = payload if isinstance(payload, dict) else {}
            reason, message = str(body.get("reason", "")), str(body.get("message", ""))
            if status >= 500 or status == 429:
                return TransientError(f"WATCH {path}: HTTP {status} {reason}: {message}")
            return ApiError(status, reason or "Error", message)

        def event_of(line: bytes) -> dict[str, Any]:
            try:
                event = json.loads(line)
            except ValueError as error:
                raise TransientError(f"WATCH {path}: unreadable event: {error}") from None
            if not isinstance(event, dict):
                raise TransientError(f"WATCH {path}: unreadable event: {line[:80]!r}")
            if event.get("type") == "ERROR":
                status = event.get("object") or {}
                code = status.get("code", 500) if isinstance(status, dict) else 500
                raise failure(int(code), status)
            return event

        try:
            async with self._http().get(path, timeout=timeout, headers=self._auth()) as response:
                if response.status >= 300:
                    try:
                        payload = await response.json(content_type=None)
                    except ValueError:
                        payload = {}
                    raise failure(response.status, payload)
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    if b"\n" not in chunk:
                        continue
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield event_of(line)
                if buffer.strip():
                    yield event_of(buffer)  # a last event without its newline
        except (aiohttp.ClientError, TimeoutError) as error:
            raise TransientError(f"WATCH {path}: {error}") from None
