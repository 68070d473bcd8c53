"""The HTTP face of the emulator: routing, verbs, watch streams, recording, kubeconfig."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from k8s_ext_connector.emulator import patch, protobuf, selectors, tables
from k8s_ext_connector.emulator.errors import ApiError
from k8s_ext_connector.emulator.resources import Registry, ResourceType
from k8s_ext_connector.emulator.store import Store, WatchEvent

Obj = dict[str, Any]
AdmissionHook = Callable[[Obj], "Obj | Awaitable[Obj | None] | None"]
VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-emulator", "platform": "linux/amd64",
           "goVersion": "go1.23", "compiler": "gc", "gitTreeState": "clean",
           "buildDate": "2024-12-11T00:00:00Z", "gitCommit": "emulator"}
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
class Target:
    """What a resource URL addresses; namespace None means all namespaces or cluster scope."""

    rt: ResourceType
    namespace: str | None
    name: str
    subresource: str

    @property
    def ns(self) -> str:
        return self.namespace or ""


def _verb(method: str, target: Target, query: Any) -> str:
    if method == "GET":
        return "watch" if query.get("watch") in ("true", "1") else (
            "get" if target.name else "list")
    if method == "DELETE":
        return "delete" if target.name else "deletecollection"
    if method not in _WRITE_VERBS or (method == "POST") == bool(target.name):
        raise ApiError(405, "MethodNotAllowed",
                       "the server does not allow this method on the requested resource")
    return _WRITE_VERBS[method]


class ApiServer:
    """A Kubernetes API server emulator on real HTTP (see the package docstring)."""

    def __init__(self, admission_hook: AdmissionHook | None = None,
                 history: int = 10_000) -> None:
        self.registry = Registry()
        self.store = Store(self.registry, history)
        self.requests: list[RecordedRequest] = []
        self.admission_hook = admission_hook
        self.url = ""
        self._runner: web.AppRunner | None = None
        ns_rt = self._rt("", "v1", "namespaces")
        for name in SYSTEM_NAMESPACES:
            self.store.create(ns_rt, "", {"metadata": {"name": name}})

    # Life cycle.

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, shutdown_timeout=2.0).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        """End every watch stream cleanly, then close the listener."""
        self.store.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

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
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [{"name": "emulator", "context": {
                "cluster": "emulator", "user": "emulator", "namespace": namespace}}],
            "current-context": "emulator",
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config))
        return path

    # Direct store access for tests (no HTTP, no admission, not recorded).

    def _rt(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self.registry.lookup(group, version, plural)
        if rt is None:
            raise KeyError(f"{plural}.{group}/{version} is not served")
        return rt

    def get_object(self, group: str, version: str, plural: str, namespace: str,
                   name: str) -> Obj | None:
        try:
            return self.store.get(self._rt(group, version, plural), namespace, name)
        except ApiError:
            return None

    def list_objects(self, group: str, version: str, plural: str,
                     namespace: str | None = None) -> list[Obj]:
        return self.store.select(self._rt(group, version, plural), namespace)[0]

    def create_object(self, obj: Obj) -> Obj:
        """Seed an object by its apiVersion and kind (namespace from its metadata)."""
        rt = self.registry.by_kind(obj["apiVersion"], obj["kind"])
        if rt is None:
            raise KeyError(f"{obj['apiVersion']} {obj['kind']} is not served")
        return self.store.create(rt, obj.get("metadata", {}).get("namespace", ""), obj)

    # HTTP.

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)

    def _record(self, request: web.Request, verb: str, target: Target | None) -> None:
        rt = target.rt if target else None
        self.requests.append(RecordedRequest(
            verb=verb, api_group=rt.group if rt else "", resource=rt.plural if rt else "",
            subresource=target.subresource if target else "",
            namespace=target.ns if target else "", name=target.name if target else "",
            user_agent=request.headers.get("User-Agent", ""), method=request.method,
            path=request.path))

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        document = self._non_resource(request.path) if request.method == "GET" else None
        if document is not None:
            self._record(request, "get", None)
            if isinstance(document, str):
                return web.Response(text=document)
            return web.json_response(document)
        target = self._parse(request.path)
        verb = _verb(request.method, target, request.query)
        self._record(request, verb, target)
        if target.subresource and (target.subresource != "status" or not target.rt.status
                                   or verb not in ("get", "update", "patch")):
            raise ApiError.not_found_path()
        if "dryRun" in request.query:
            raise ApiError.bad_request("dryRun is not emulated")
        handler = getattr(self, f"_do_{verb}")
        response: web.StreamResponse = await handler(request, target)
        return response

    def _non_resource(self, path: str) -> Obj | str | None:
        parts = path.strip("/").split("/")
        head, n = parts[0], len(parts)
        documents: dict[tuple[str, int], Callable[[], Obj | str]] = {
            ("version", 1): lambda: VERSION,
            ("api", 1): self.registry.api_versions,
            ("api", 2): lambda: self.registry.resource_list("", parts[1]),
            ("apis", 1): self.registry.api_group_list,
            ("apis", 2): lambda: self.registry.api_group(parts[1]),
            ("apis", 3): lambda: self.registry.resource_list(parts[1], parts[2]),
            ("healthz", 1): lambda: "ok", ("livez", 1): lambda: "ok", ("readyz", 1): lambda: "ok",
        }
        if head == "openapi" and parts[1:2] == ["v3"]:
            if n == 2:
                return self.registry.openapi_root()
            group, version = ("", parts[3]) if parts[2:3] == ["api"] else (parts[3], parts[-1])
            return self.registry.openapi_gv(group, version)
        if head == "openapi":
            raise ApiError.not_found_path()
        make = documents.get((head, n))
        return make() if make else None

    def _parse(self, path: str) -> Target:
        parts = path.strip("/").split("/")
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
        return Target(rt, namespace, rest[1] if len(rest) > 1 else "",
                      rest[2] if len(rest) > 2 else "")

    @staticmethod
    async def _body(request: web.Request) -> Any:
        if "protobuf" in request.content_type:
            return protobuf.decode(await request.read())
        text = await request.text()
        try:
            if "yaml" in request.content_type:
                return yaml.safe_load(text)
            return json.loads(text)
        except (ValueError, yaml.YAMLError) as e:
            raise ApiError.bad_request(f"the request body is not valid: {e}") from e

    @staticmethod
    def _check_identity(target: Target, obj: Any) -> Obj:
        """The real server answers 400 BadRequest when body and URL disagree."""
        if not isinstance(obj, dict):
            raise ApiError.bad_request("the request body must be an object")
        meta = obj.get("metadata") or {}
        if target.name and meta.get("name") != target.name:
            raise ApiError.bad_request(f"the name of the object ({meta.get('name')}) does not "
                                       f"match the name on the URL ({target.name})")
        if target.rt.namespaced and meta.get("namespace") not in (None, "", target.namespace):
            raise ApiError.bad_request("the namespace of the provided object does not match "
                                       "the namespace sent on the request")
        return obj

    def _render(self, request: web.Request, rt: ResourceType, objs: list[Obj], rv: str,
                single: Obj | None) -> Obj:
        """Table if the client asked for one (kubectl get), else the object or a typed list."""
        if "as=Table" in request.headers.get("Accept", ""):
            return tables.table(rt, objs, request.query.get("includeObject", "Metadata"), rv)
        if single is not None:
            return single
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": rv}, "items": objs}

    # Verbs.

    async def _do_get(self, request: web.Request, target: Target) -> web.Response:
        obj = self.store.get(target.rt, target.ns, target.name)
        return web.json_response(self._render(request, target.rt, [obj], "", obj))

    async def _do_list(self, request: web.Request, target: Target) -> web.Response:
        match = selectors.both(request.query.get("labelSelector"),
                               request.query.get("fieldSelector"))
        items, rv = self.store.select(target.rt, target.namespace, match)
        return web.json_response(self._render(request, target.rt, items, rv, None))

    async def _do_create(self, request: web.Request, target: Target) -> web.Response:
        obj = self._check_identity(target, await self._body(request))
        if target.rt.kind == "Pod" and not target.rt.group and self.admission_hook:
            obj = await self._admit(target, obj)
        return web.json_response(self.store.create(target.rt, target.ns, obj), status=201)

    async def _admit(self, target: Target, pod: Obj) -> Obj:
        """Mutating admission, before name generation as on the real server."""
        assert self.admission_hook is not None
        pod = copy.deepcopy(pod)
        pod.setdefault("metadata", {})["namespace"] = target.ns
        try:
            result = self.admission_hook(pod)
            if inspect.isawaitable(result):
                result = await result
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(500, "InternalError",
                           f"Internal error occurred: failed calling admission hook: {e}") from e
        return pod if result is None else result

    async def _do_update(self, request: web.Request, target: Target) -> web.Response:
        obj = self._check_identity(target, await self._body(request))
        return web.json_response(
            self.store.update(target.rt, target.ns, target.name, obj, target.subresource))

    async def _do_patch(self, request: web.Request, target: Target) -> web.Response:
        body = await self._body(request)
        with self.store.lock:
            current = self.store.get(target.rt, target.ns, target.name)
            patched = self._check_identity(
                target, patch.apply(request.content_type, current, body))
            return web.json_response(self.store.update(
                target.rt, target.ns, target.name, patched, target.subresource))

    async def _do_delete(self, request: web.Request, target: Target) -> web.Response:
        return web.json_response(self.store.delete(target.rt, target.ns, target.name))

    async def _do_deletecollection(self, request: web.Request, target: Target) -> web.Response:
        match = selectors.both(request.query.get("labelSelector"),
                               request.query.get("fieldSelector"))
        with self.store.lock:
            items, rv = self.store.select(target.rt, target.namespace, match)
            gone = [self.store.delete(target.rt, o["metadata"].get("namespace", ""),
                                      o["metadata"]["name"]) for o in items]
        return web.json_response(self._render(request, target.rt, gone, rv, None))

    async def _do_watch(self, request: web.Request, target: Target) -> web.StreamResponse:
        """Backlog then live events until timeoutSeconds or server stop; 410 as an ERROR."""
        match = selectors.both(request.query.get("labelSelector"),
                               request.query.get("fieldSelector"))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()

        def listener(event: WatchEvent | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            backlog = self.store.subscribe(listener, request.query.get("resourceVersion"),
                                           target.rt)
        except ApiError as e:
            if e.code != 410:
                raise
            await response.prepare(request)
            await response.write(json.dumps({"type": "ERROR", "object": e.status()}).encode())
            return response
        try:
            await response.prepare(request)
            timeout = float(request.query.get("timeoutSeconds") or 0) or None
            for event in backlog:
                await self._send(response, request, target, match, event)
            async for event in self._live(queue, timeout):
                await self._send(response, request, target, match, event)
        except ConnectionResetError:
            pass  # the client went away
        finally:
            self.store.unsubscribe(listener)
        return response

    @staticmethod
    async def _live(queue: asyncio.Queue[WatchEvent | None],
                    timeout: float | None) -> AsyncIterator[WatchEvent]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                event = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                return
            if event is None:
                return
            yield event

    async def _send(self, response: web.StreamResponse, request: web.Request, target: Target,
                    match: selectors.Match, event: WatchEvent) -> None:
        """One event as the watcher sees it: selector entry/exit become ADDED/DELETED."""
        rt = target.rt
        if (event.group, event.plural) != (rt.group, rt.plural):
            return
        new = self.store.out(rt, event.obj)
        old = self.store.out(rt, event.old) if event.old is not None else None

        def visible(obj: Obj | None) -> bool:
            return obj is not None and match(obj) and (
                target.namespace is None or obj["metadata"].get("namespace") == target.namespace)

        kind, seen_new = event.type, visible(new)
        if kind == "MODIFIED" and seen_new != visible(old):
            kind = "ADDED" if seen_new else "DELETED"
        elif not seen_new:
            return
        body = self._render(request, rt, [new], new["metadata"]["resourceVersion"], new)
        await response.write(json.dumps({"type": kind, "object": body}).encode() + b"\n")
