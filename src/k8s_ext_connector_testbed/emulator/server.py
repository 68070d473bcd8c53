"""The HTTP face of the emulator: routing, verbs, watch streams, recording, kubeconfig."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from k8s_ext_connector_testbed.emulator import patch, protobuf, selectors, tables
from k8s_ext_connector_testbed.emulator.errors import ApiError
from k8s_ext_connector_testbed.emulator.resources import (
    CRD_GROUP,
    CRD_PLURAL,
    Registry,
    ResourceType,
)
from k8s_ext_connector_testbed.emulator.store import Store, WatchEvent

Obj = dict[str, Any]
AdmissionHook = Callable[[Obj], "Obj | Awaitable[Obj | None] | None"]
VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-emulator", "platform": "linux/amd64"}
API_VERSIONS = {
    "kind": "APIVersions",
    "versions": ["v1"],
    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
}
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_WRITE_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


@dataclass(frozen=True)
class RecordedRequest:
    """One API call in RBAC terms (resource is "" for non-resource URLs such as /api)."""

    verb: str
    api_group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    user_agent: str
    method: str
    path: str


@dataclass(frozen=True)
class Call:
    """A parsed resource request; namespace None means all namespaces or cluster scope."""

    request: web.Request
    rt: ResourceType
    namespace: str | None
    name: str
    subresource: str

    @property
    def ns(self) -> str:
        return self.namespace or ""

    @property
    def verb(self) -> str:
        method, query = self.request.method, self.request.query
        if method == "GET":
            return (
                "watch" if query.get("watch") in ("true", "1") else ("get" if self.name else "list")
            )
        if method == "DELETE":
            return "delete" if self.name else "deletecollection"
        if method not in _WRITE_VERBS or (method == "POST") == bool(self.name):
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        return _WRITE_VERBS[method]

    def match(self) -> selectors.Match:
        return selectors.both(
            self.request.query.get("labelSelector"), self.request.query.get("fieldSelector")
        )

    def render(self, objs: list[Obj], rv: str, single: Obj | None = None) -> Obj:
        """A Table if the client asked for one (kubectl get), else the object or a list."""
        if "as=Table" in self.request.headers.get("Accept", ""):
            include = self.request.query.get("includeObject", "Metadata")
            return tables.table(self.rt, objs, include, rv)
        return (
            single
            if single is not None
            else {
                "kind": f"{self.rt.kind}List",
                "apiVersion": self.rt.api_version,
                "metadata": {"resourceVersion": rv},
                "items": objs,
            }
        )

    async def body(self) -> Any:
        """JSON, YAML or (from kubectl create) protobuf."""
        request = self.request
        if "protobuf" in request.content_type:
            return protobuf.decode(await request.read())
        try:
            text = await request.text()
            return yaml.safe_load(text) if "yaml" in request.content_type else json.loads(text)
        except (ValueError, yaml.YAMLError) as e:
            raise ApiError.bad_request(f"the request body is not valid: {e}") from e

    def crd_removed(self, event: WatchEvent) -> bool:
        """Whether ``event`` removes this resource's CRD (which ends a watch on it)."""
        return (
            event.type == "DELETED"
            and (event.group, event.plural) == (CRD_GROUP, CRD_PLURAL)
            and event.obj["metadata"]["name"] == self.rt.qualified
        )

    def check(self, obj: Any) -> Obj:
        """The body as an object whose name and namespace agree with the URL (else 400)."""
        if not isinstance(obj, dict):
            raise ApiError.bad_request("the request body must be an object")
        meta = obj.get("metadata") or {}
        if self.name and meta.get("name") != self.name:
            raise ApiError.bad_request(
                f"the name of the object ({meta.get('name')}) does not "
                f"match the name on the URL ({self.name})"
            )
        if self.rt.namespaced and meta.get("namespace") not in (None, "", self.namespace):
            raise ApiError.bad_request(
                "the namespace of the provided object does not match "
                "the namespace sent on the request"
            )
        return obj


class ApiServer:
    """A Kubernetes API server emulator on real HTTP (see the package docstring)."""

    def __init__(self, admission_hook: AdmissionHook | None = None, history: int = 10_000) -> None:
        self.registry = Registry()
        self.store = Store(self.registry, history)
        self.requests: list[RecordedRequest] = []
        self.admission_hook = admission_hook
        self.url = ""
        self._runner: web.AppRunner | None = None
        for name in SYSTEM_NAMESPACES:
            self.create_object(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        """End every watch stream cleanly, then close the listener."""
        self.store.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @contextlib.contextmanager
    def run_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[ApiServer]:
        """Serve from an event loop on its own thread, for synchronous tests and tools."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="k8s-emulator", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(host, port), loop).result(timeout=10)
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """Plain http, no credentials, current-context set: kubectl and kopf accept it."""
        path = Path(path)
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "emulator",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "emulator", "user": {}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {
                                "cluster": "emulator",
                                "user": "emulator",
                                "namespace": namespace,
                            },
                        }
                    ],
                }
            )
        )
        return path

    # Direct store access for tests (thread-safe; no HTTP, no admission, not recorded).

    def _rt(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self.registry.lookup(group, version, plural)
        if rt is None:
            raise KeyError(f"{plural}.{group}/{version} is not served")
        return rt

    def get_object(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> Obj | None:
        try:
            return self.store.get(self._rt(group, version, plural), namespace, name)
        except ApiError:
            return None

    def list_objects(
        self, group: str, version: str, plural: str, namespace: str | None = None
    ) -> list[Obj]:
        return self.store.select(self._rt(group, version, plural), namespace)[0]

    def create_object(self, obj: Obj) -> Obj:
        """Seed an object by its apiVersion and kind (namespace from its metadata)."""
        rt = self.registry.find(api_version=obj["apiVersion"], kind=obj["kind"])
        if rt is None:
            raise KeyError(f"{obj['apiVersion']} {obj['kind']} is not served")
        return self.store.create(rt, obj.get("metadata", {}).get("namespace", ""), obj)

    # HTTP.

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            document = self._non_resource(request.path) if request.method == "GET" else None
            if document is not None:
                self._record(request, "get")
                return (
                    web.json_response(document)
                    if isinstance(document, dict)
                    else web.Response(text=document)
                )
            call = self._parse(request)
            self._record(request, call.verb, call)
            if call.subresource and (
                call.subresource != "status"
                or not call.rt.status
                or call.verb not in ("get", "update", "patch")
            ):
                raise ApiError.not_found_path()
            if "dryRun" in request.query:
                raise ApiError.bad_request("dryRun is not emulated")
            response: web.StreamResponse = await getattr(self, f"_do_{call.verb}")(call)
            return response
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)

    def _record(self, request: web.Request, verb: str, call: Call | None = None) -> None:
        self.requests.append(
            RecordedRequest(
                verb,
                call.rt.group if call else "",
                call.rt.plural if call else "",
                call.subresource if call else "",
                call.ns if call else "",
                call.name if call else "",
                request.headers.get("User-Agent", ""),
                request.method,
                request.path,
            )
        )

    def _non_resource(self, path: str) -> Obj | str | None:
        parts = path.strip("/").split("/")
        if parts[0] == "openapi":
            if parts[1:] == ["v3"]:
                return self.registry.openapi_root()
            if parts[1:3] == ["v3", "api"] and len(parts) == 4:
                return self.registry.openapi("", parts[3])
            if parts[1:3] == ["v3", "apis"] and len(parts) == 5:
                return self.registry.openapi(parts[3], parts[4])
            raise ApiError.not_found_path()  # no OpenAPI v2: kubectl copes
        documents: dict[tuple[str, int], Callable[[], Obj | str]] = {
            ("version", 1): lambda: VERSION,
            ("api", 1): lambda: API_VERSIONS,
            ("api", 2): lambda: self.registry.resource_list("", parts[1]),
            ("apis", 1): self.registry.api_group_list,
            ("apis", 2): lambda: self.registry.api_group(parts[1]),
            ("apis", 3): lambda: self.registry.resource_list(parts[1], parts[2]),
            ("healthz", 1): lambda: "ok",
            ("livez", 1): lambda: "ok",
            ("readyz", 1): lambda: "ok",
        }
        make = documents.get((parts[0], len(parts)))
        return make() if make else None

    def _parse(self, request: web.Request) -> Call:
        parts = request.path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError.not_found_path()
        namespace = None
        inner = self.registry.lookup(group, version, rest[2]) if len(rest) >= 3 else None
        if rest[0] == "namespaces" and inner and inner.namespaced:
            namespace, rest = rest[1], rest[2:]
        rt = self.registry.lookup(group, version, rest[0])
        if rt is None or len(rest) > 3 or (rt.namespaced and namespace is None and len(rest) > 1):
            raise ApiError.not_found_path()
        return Call(request, rt, namespace, *[*rest[1:], "", ""][:2])

    # Verbs.

    async def _do_get(self, call: Call) -> web.Response:
        obj = self.store.get(call.rt, call.ns, call.name)
        return web.json_response(call.render([obj], obj["metadata"]["resourceVersion"], obj))

    async def _do_list(self, call: Call) -> web.Response:
        return web.json_response(
            call.render(*self.store.select(call.rt, call.namespace, call.match()))
        )

    async def _do_create(self, call: Call) -> web.Response:
        obj = call.check(await call.body())
        if (call.rt.group, call.rt.kind) == ("", "Pod") and self.admission_hook:
            obj = await self._admit(call, obj)
        return web.json_response(self.store.create(call.rt, call.ns, obj), status=201)

    async def _admit(self, call: Call, pod: Obj) -> Obj:
        """Mutating admission, before name generation as on the real server. A hook denies
        by raising ApiError; any other exception is a failing webhook (500)."""
        assert self.admission_hook is not None
        pod = copy.deepcopy(pod)
        pod.setdefault("metadata", {})["namespace"] = call.ns
        try:
            result = self.admission_hook(pod)
            result = await result if inspect.isawaitable(result) else result
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(
                500, "InternalError", f"Internal error occurred: failed calling admission hook: {e}"
            ) from e
        return pod if result is None else result

    async def _do_update(self, call: Call) -> web.Response:
        return web.json_response(
            self.store.update(
                call.rt, call.ns, call.name, call.check(await call.body()), call.subresource
            )
        )

    async def _do_patch(self, call: Call) -> web.Response:
        body = await call.body()
        with self.store.lock:
            current = self.store.get(call.rt, call.ns, call.name)
            patched = call.check(patch.apply(call.request.content_type, current, body))
            return web.json_response(
                self.store.update(call.rt, call.ns, call.name, patched, call.subresource)
            )

    async def _do_delete(self, call: Call) -> web.Response:
        return web.json_response(self.store.delete(call.rt, call.ns, call.name))

    async def _do_deletecollection(self, call: Call) -> web.Response:
        with self.store.lock:
            items, rv = self.store.select(call.rt, call.namespace, call.match())
            gone = [
                self.store.delete(
                    call.rt, o["metadata"].get("namespace", ""), o["metadata"]["name"]
                )
                for o in items
            ]
        return web.json_response(call.render(gone, rv))

    async def _do_watch(self, call: Call) -> web.StreamResponse:
        """Backlog then live events until timeoutSeconds, server stop or the removal of the
        resource's CRD; a too old resourceVersion is an ERROR 410 event, as for real."""
        match, loop = call.match(), asyncio.get_running_loop()
        queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()

        def listener(event: WatchEvent | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            backlog = self.store.subscribe(
                listener, call.request.query.get("resourceVersion"), call.rt
            )
        except ApiError as e:
            if e.code != 410:
                raise
            await response.prepare(call.request)
            await response.write(json.dumps({"type": "ERROR", "object": e.status()}).encode())
            return response
        timeout = float(call.request.query.get("timeoutSeconds") or 0) or None
        deadline = None if timeout is None else loop.time() + timeout
        try:
            await response.prepare(call.request)
            for event in backlog:
                await self._send(response, call, match, event)
            if call.request.query.get("sendInitialEvents") == "true":  # watch-list clients
                await response.write(
                    json.dumps(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": call.rt.kind,
                                "apiVersion": call.rt.api_version,
                                "metadata": {
                                    "resourceVersion": self.store.resource_version,
                                    "annotations": {"k8s.io/initial-events-end": "true"},
                                },
                            },
                        }
                    ).encode()
                    + b"\n"
                )
            while True:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                live = await asyncio.wait_for(queue.get(), remaining)
                if live is None:
                    break
                await self._send(response, call, match, live)
                if call.crd_removed(live):
                    break
        except (TimeoutError, ConnectionResetError):
            pass  # timeoutSeconds, or the client went away
        finally:
            self.store.unsubscribe(listener)
        return response

    async def _send(
        self, response: web.StreamResponse, call: Call, match: selectors.Match, event: WatchEvent
    ) -> None:
        """One event as the watcher sees it: selector entry/exit become ADDED/DELETED."""
        if (event.group, event.plural) != (call.rt.group, call.rt.plural):
            return

        def visible(obj: Obj | None) -> bool:
            return (
                obj is not None
                and match(obj)
                and (call.namespace is None or obj["metadata"].get("namespace") == call.namespace)
            )

        new = self.store.out(call.rt, event.obj)
        old = None if event.old is None else self.store.out(call.rt, event.old)
        kind, seen = event.type, visible(new)
        if kind == "MODIFIED" and seen != visible(old):
            kind = "ADDED" if seen else "DELETED"
        elif not seen:
            return
        body = call.render([new], new["metadata"]["resourceVersion"], new)
        await response.write(json.dumps({"type": kind, "object": body}).encode() + b"\n")
