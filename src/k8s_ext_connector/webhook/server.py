"""The admission webhook over HTTPS (aiohttp): ``/mutate``, ``/healthz``, ``/readyz``, ``/metrics``.

``POST /mutate`` takes an ``admission.k8s.io/v1`` AdmissionReview and answers one with the
request's ``uid``. Only Pod CREATE is mutated: the pod gets the sidecar when a source
Service of a valid ExternalService selects it (from the watch cache, never a list per
request), as a ``JSONPatch`` computed by ``inject.admission_patch``. Other answers:

- a pod that ``skip_reason`` leaves alone: allowed, no patch (a pod that asked for
  injection with the annotation but cannot get it also gets a ``warnings`` entry saying why);
- anything but a Pod CREATE (a misconfigured rule): allowed, no patch;
- ``dryRun: true``: the same answer as without it. The webhook has no side effects
  (``sideEffects: None`` in its configuration), so there is nothing to hold back;
- a request that is not an AdmissionReview v1 (not JSON, nested too deep for the
  parser, wrong apiVersion or kind, missing request, uid or object): HTTP 400; a body
  over ``Limits.max_body``: 413; a body not received within ``Limits.body_timeout``: 408;
  no free slot within ``Limits.queue_timeout``: 429. Each is one log line (with the uid
  when it can be read) and counted by reason; the API server treats any of them as a
  failed call and applies the configuration's ``failurePolicy``;
- an internal error (a bug, a cache that raises, the cache not synced yet): allowed, not
  mutated, a ``warnings`` entry the user sees in kubectl, an error counted in ``/metrics``
  and logged. This is the same outcome ``failurePolicy: Ignore`` gives a webhook outage:
  the pod starts without the sidecar and the operator names it in the ExternalService's
  status (SidecarsMissing) with the fix (``kubectl rollout restart``).

Limits (``Limits``; docs/security.md "The webhook under attack"): whoever reaches port
8443 may try to exhaust the webhook, so each connection must finish its TLS handshake
and each request head within deadlines, connections and requests in progress are capped,
bodies are capped in size and read within a deadline, and nothing done per request grows
faster than the body (the patch is written op by op, ``inject.admission_patch``).

TLS: one ``ssl.SSLContext``; ``ServingCertificate`` polls ``tls.crt``/``tls.key`` every
second (a mounted Secret changes by a symlink swap and sends no event) and, when their
*content* changed and the new pair is valid, loads it into the same context again.
OpenSSL copies the certificate into each new connection at accept time, so new handshakes
use the new certificate at once and established connections keep theirs; no restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import datetime
import gc
import hashlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

from k8s_ext_connector.webhook import metrics
from k8s_ext_connector.webhook.cache import SourceIndex
from k8s_ext_connector.webhook.inject import (
    INJECT_ANNOTATION,
    MALFORMED,
    InjectionContext,
    InjectionSettings,
    admission_patch,
    skip_reason,
)

log = logging.getLogger(__name__)

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
WARNING_PREFIX = "k8s-ext-connector: sidecar not injected"


@dataclass(frozen=True)
class Limits:
    """What one client can make the webhook spend; each number is argued in
    docs/security.md ("The webhook under attack")."""

    # Real pods are a few kB, large ones ~100 kB; etcd refuses objects over 1.5 MiB (in
    # its own encoding) and the API server bodies over 3 MiB. 1 MiB of JSON is ten times
    # the largest real pod and bounds what a parse can cost (~30 ms, ~25 MB).
    max_body: int = 1024 * 1024
    # Requests being read or answered at once (the rest wait for a slot up to
    # ``queue_timeout``, then get 429): bounds bodies and parsed objects in memory.
    max_concurrent: int = 4
    queue_timeout: float = 1.0
    # The API server sends a request at once; a client that trickles its body is cut off.
    body_timeout: float = 2.0
    # A connection must complete its TLS handshake, and each request head, within these
    # (from the connection or the previous answer); idle keep-alive connections close then.
    handshake_timeout: float = 5.0
    header_timeout: float = 10.0
    # Connections held at once; beyond it the oldest connection with no request in
    # progress is closed to make room (an idle or unfinished one: the API server's next
    # call gets in even while the cap is full of stalled connections).
    max_connections: int = 256
    max_header_bytes: int = 8190


DEFAULT_LIMITS = Limits()
MAX_BODY = DEFAULT_LIMITS.max_body


class BadRequest(ValueError):
    """The request is not an AdmissionReview v1 this webhook can answer (HTTP 400)."""

    status = 400
    reason = "malformed"


class TooLarge(BadRequest):
    status = 413
    reason = "too_large"


_UID = re.compile(rb'"uid"\s*:\s*"([0-9A-Za-z._-]{1,64})"')


def uid_of(body: bytes) -> str | None:
    """The request's uid read from the raw body, for logging a body that does not parse
    (the API server writes it near the start)."""
    match = _UID.search(body[: 64 * 1024])
    return match.group(1).decode() if match else None


@dataclass(frozen=True)
class Review:
    """The parts of an AdmissionReview request the webhook uses."""

    uid: str
    pod_create: bool  # a Pod CREATE (the only thing mutated)
    pod: Mapping[str, Any]  # with metadata.namespace filled from request.namespace
    dry_run: bool


def parse_review(body: bytes) -> Review:
    """Check and parse an AdmissionReview v1 request body; ``BadRequest`` says what is wrong."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"the body is not JSON: {error}") from None
    except RecursionError:
        raise BadRequest("the body is JSON nested too deep to parse") from None
    if not isinstance(document, dict):
        raise BadRequest("the body must be a JSON object (an AdmissionReview)")
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if (api_version, kind) != (API_VERSION, KIND):
        raise BadRequest(
            f"expected apiVersion {API_VERSION} and kind {KIND}, got {api_version!r} {kind!r}"
        )
    request = document.get("request")
    if not isinstance(request, dict):
        raise BadRequest("request: missing (an AdmissionReview to answer has a request)")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadRequest(f"request.uid: {uid!r}: must be a non-empty string")
    resource_kind, operation = request.get("kind"), request.get("operation")
    if not isinstance(resource_kind, dict) or not isinstance(operation, str):
        raise BadRequest("request.kind and request.operation: missing")
    pod_create = (
        {k: resource_kind.get(k) for k in POD_KIND} == POD_KIND
        and operation == "CREATE"
        and not request.get("subResource")
    )
    obj = request.get("object")
    pod: dict[str, Any] = {}
    if pod_create:
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata", {}), dict):
            raise BadRequest("request.object: missing or not an object (a Pod CREATE has one)")
        pod = dict(obj)
        meta = dict(pod.get("metadata") or {})
        if not meta.get("namespace") and isinstance(request.get("namespace"), str):
            meta["namespace"] = request["namespace"]  # often empty in the object itself
        pod["metadata"] = meta
    return Review(uid, pod_create, pod, bool(request.get("dryRun")))


def review_response(
    uid: str, patch: list[dict[str, Any]] | None, warnings: list[str]
) -> dict[str, Any]:
    """The AdmissionReview answer: always allowed; a JSONPatch only when there is one."""
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warnings:
        response["warnings"] = warnings
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def decide(
    review: Review, index: SourceIndex, settings: InjectionSettings
) -> tuple[str, list[dict[str, Any]] | None, list[str]]:
    """(result, patch, warnings) for a parsed review; raises on internal errors."""
    if not review.pod_create:
        return "ignored", None, []
    if not index.ready:
        raise CacheNotReady("the webhook's cache has not synced yet")
    context = InjectionContext(index.sources_for(review.pod), settings)
    reason = skip_reason(review.pod, context)
    if reason is not None:
        annotations = (review.pod.get("metadata") or {}).get("annotations")
        wanted = annotations.get(INJECT_ANNOTATION) if isinstance(annotations, dict) else None
        asked = wanted == "true" and reason != "already injected"
        warn = asked or reason.startswith(MALFORMED)
        return "skipped", None, [f"{WARNING_PREFIX}: {reason}"[:200]] if warn else []
    patch = admission_patch(review.pod, context)
    # The patch is applied to the object as sent: never let it touch what we filled in.
    if any(op.get("path") == "/metadata/namespace" for op in patch):
        raise RuntimeError("patch would change metadata.namespace")
    return "injected", patch, []


class CacheNotReady(RuntimeError):
    pass


async def read_capped(request: web.Request, limit: int) -> bytes:
    """The body, or ``TooLarge`` past ``limit`` bytes (declared or actually sent)."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
    data = bytearray()
    while chunk := await request.content.read(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise TooLarge(f"the body is over the limit of {limit} bytes")
    return bytes(data)


class _Refused(asyncio.Protocol):
    """Stands in for a connection over ``Limits.max_connections`` when every connection
    has a request in progress: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _release_memory() -> None:
    """Give freed heap back to the system (glibc keeps it after large, fragmented
    allocations, e.g. many bodies buffered at once); a no-op elsewhere."""
    gc.collect()  # cycles left by refused requests (exceptions, tracebacks) hold memory
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ServingCertificate:
    """``tls.crt``/``tls.key`` loaded into one long-lived server ``SSLContext``.

    ``check`` reloads when the files' content changed. A new pair is first loaded into a
    scratch context: an incomplete rotation (key written, certificate not yet) is skipped,
    never half-applied, and retried at the next check. The bytes are handed to OpenSSL
    through an anonymous in-memory file, so what was checked is exactly what is loaded.
    """

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self.cert_path, self.key_path = cert_path, key_path
        self.context = _server_context()
        self.loaded = False
        self.reloads = 0
        self.not_after: datetime.datetime | None = None
        self._digest: bytes | None = None
        self._rejected: bytes | None = None

    def check(self) -> bool:
        """Load the pair if its content changed and is valid; True when a new one is in use."""
        try:
            cert_pem, key_pem = self.cert_path.read_bytes(), self.key_path.read_bytes()
        except OSError as error:
            if self._rejected != b"missing":
                log.warning("serving certificate not readable yet: %s", error)
                self._rejected = b"missing"
            return False
        digest = hashlib.sha256(cert_pem + b"\0" + key_pem).digest()
        if digest in (self._digest, self._rejected):
            return False
        try:
            _load_pair(_server_context(), cert_pem, key_pem)
            not_after = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
        except (ssl.SSLError, OSError, ValueError) as error:
            log.warning("serving certificate pair not usable (yet), keeping the current: %s", error)
            self._rejected = digest
            return False
        _load_pair(self.context, cert_pem, key_pem)
        self._digest, self.loaded, self.not_after = digest, True, not_after
        self.reloads += 1
        log.info("serving certificate loaded (valid until %s)", not_after.isoformat())
        return True

    async def follow(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.check()


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _load_pair(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("webhook-tls", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as handle:
            handle.write(key_pem + b"\n" + cert_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


@dataclass
class WebhookMetrics:
    requests: metrics.Counter = field(
        default_factory=lambda: metrics.Counter(
            "k8s_ext_connector_webhook_admission_requests_total",
            "AdmissionReviews answered, by result (injected, skipped, ignored: not a Pod "
            "CREATE, error: admitted unmutated after an internal error, rejected: HTTP 400)",
            ("result",),
        ).preset(("injected",), ("skipped",), ("ignored",), ("error",), ("rejected",))
    )
    errors: metrics.Counter = field(
        default_factory=lambda: metrics.Counter(
            "k8s_ext_connector_webhook_admission_errors_total",
            "internal errors; each pod concerned was admitted without the sidecar",
            ("reason",),
        ).preset(("exception",), ("cache_not_ready",))
    )
    rejected: metrics.Counter = field(
        default_factory=lambda: metrics.Counter(
            "k8s_ext_connector_webhook_rejected_total",
            "requests answered with an HTTP error (malformed: 400, too_large: 413, "
            "read_timeout: 408, overloaded: 429) and connections closed at accept "
            "(too_many_connections); the API server then applies failurePolicy",
            ("reason",),
        ).preset(
            ("malformed",),
            ("too_large",),
            ("read_timeout",),
            ("overloaded",),
            ("too_many_connections",),
        )
    )
    latency: metrics.Histogram = field(
        default_factory=lambda: metrics.Histogram(
            "k8s_ext_connector_webhook_admission_duration_seconds",
            "time to answer /mutate, from the request's arrival to the answer",
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
    )


class WebhookServer:
    """The aiohttp application and its HTTPS listener."""

    def __init__(
        self,
        index: SourceIndex,
        settings: InjectionSettings,
        certificate: ServingCertificate,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.index = index
        self.settings = settings
        self.certificate = certificate
        self.limits = limits
        self.metrics = WebhookMetrics()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(limits.max_concurrent)
        # json.loads holds the GIL, but the checks around it do not block the loop.
        self._parsers = ThreadPoolExecutor(limits.max_concurrent, "admission-parse")
        self._busy: set[object] = set()  # connections with a request in progress
        self._trim: asyncio.TimerHandle | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._stopping = False

    def application(self) -> web.Application:
        @web.middleware
        async def busy(request: web.Request, handler: Any) -> web.StreamResponse:
            self._busy.add(request.protocol)
            try:
                response: web.StreamResponse = await handler(request)
                return response
            finally:
                self._busy.discard(request.protocol)

        app = web.Application(client_max_size=self.limits.max_body, middlewares=[busy])
        app.router.add_post("/mutate", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, host: str = "0.0.0.0", port: int = 8443) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port."""
        self.certificate.check()
        limits = self.limits
        # aiohttp's keep-alive timer runs from the connection (or the previous answer) and
        # is not reset by bytes of an unfinished head: it is the header deadline too.
        self._runner = web.AppRunner(
            self.application(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=5,
            keepalive_timeout=limits.header_timeout,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            lingering_time=1.0,
        )
        await self._runner.setup()
        handler = self._runner.server
        assert handler is not None

        def protocol() -> asyncio.BaseProtocol:
            # Checked at accept: connections still in their TLS handshake are not counted
            # (the handshake deadline bounds them), so the cap is met again at the next one.
            connections = handler.connections  # oldest first
            excess = len(connections) - limits.max_connections + 1
            if excess > 0:
                idle = [c for c in connections if c not in self._busy][:excess]
                self.metrics.rejected.inc("too_many_connections", amount=excess)
                for connection in idle:
                    connection.force_close()
                if len(idle) < excess:
                    return _Refused()
            return handler()

        self._listener = await asyncio.get_running_loop().create_server(
            protocol,
            host,
            port,
            ssl=self.certificate.context,
            ssl_handshake_timeout=limits.handshake_timeout,
            backlog=128,
            reuse_address=True,
        )
        self._trimmer = asyncio.create_task(self._trim_now_and_then(), name="malloc-trim")
        self.port = int(self._listener.sockets[0].getsockname()[1])
        log.info("webhook listening on https://%s:%d", host, self.port)
        return self.port

    def draining(self) -> None:
        """Report not ready (while the endpoints drop this pod) but keep answering."""
        self._stopping = True

    async def _trim_now_and_then(self, interval: float = 10.0) -> None:
        """Closed connections free their buffers to the heap, not to the system: trim it
        now and then (a few ms) so that memory returns to its level after an attack."""
        while True:
            await asyncio.sleep(interval)
            _release_memory()

    async def stop(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trimmer
            self._trimmer = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._parsers.shutdown(wait=False, cancel_futures=True)
        if self._trim is not None:
            self._trim.cancel()

    def ready(self) -> tuple[bool, str]:
        problems = [
            why
            for bad, why in (
                (self._stopping, "shutting down"),
                (not self.index.ready, "cache not synced"),
                (not self.certificate.loaded, "no serving certificate loaded"),
            )
            if bad
        ]
        return not problems, "; ".join(problems) or "ok"

    # -- routes -------------------------------------------------------------------------

    async def _mutate(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.limits.queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            return self._reject(request, 429, "overloaded", "too many admissions in progress")
        try:
            return await self._answer(request, started)
        finally:
            self._slots.release()

    async def _answer(self, request: web.Request, started: float) -> web.Response:
        body = b""
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                body = await read_capped(request, self.limits.max_body)
            loop = asyncio.get_running_loop()
            review = await loop.run_in_executor(self._parsers, parse_review, body)
        except TimeoutError:
            return self._reject(
                request, 408, "read_timeout", f"body not received in {self.limits.body_timeout:g} s"
            )
        except BadRequest as error:
            return self._reject(request, error.status, error.reason, str(error), uid_of(body))
        try:
            result, patch, warnings = decide(review, self.index, self.settings)
        except Exception as error:
            reason = "cache_not_ready" if isinstance(error, CacheNotReady) else "exception"
            # One line (a deep or hostile input must not fill the log); the stack at debug.
            log.error(
                "admission of %s failed (%s%s); admitted without the sidecar",
                _who(review),
                _where(error),
                f": {error}"[:200],
                exc_info=log.isEnabledFor(logging.DEBUG) and reason == "exception",
            )
            self.metrics.errors.inc(reason)
            result, patch = "error", None
            warnings = [f"{WARNING_PREFIX}: webhook {reason.replace('_', ' ')} ({error})"[:200]]
        if len(body) > 256 * 1024:
            self._release_memory_soon()
        log.debug("%s: %s%s", _who(review), result, " (dry run)" if review.dry_run else "")
        answer = web.json_response(review_response(review.uid, patch, warnings))
        self.metrics.requests.inc(result)
        self.metrics.latency.observe(time.perf_counter() - started)
        return answer

    def _release_memory_soon(self) -> None:
        """After refusals (an attack, typically), trim the heap once things calm down."""
        if self._trim is not None:
            self._trim.cancel()
        self._trim = asyncio.get_running_loop().call_later(2.0, _release_memory)

    def _reject(
        self, request: web.Request, status: int, reason: str, why: str, uid: str | None = None
    ) -> web.Response:
        """An HTTP error, one log line, counted; the connection is closed after it (its
        unread rest is not worth waiting for)."""
        self.metrics.requests.inc("rejected")
        self.metrics.rejected.inc(reason)
        who = f" (uid {uid})" if uid else ""
        log.warning(
            "admission request from %s%s refused (%d %s): %s",
            request.remote,
            who,
            status,
            reason,
            why[:300],
        )
        self._release_memory_soon()
        headers = {"Retry-After": "1"} if status == 429 else {}
        response = web.Response(
            status=status, text=f"bad AdmissionReview{who}: {why[:300]}\n", headers=headers
        )
        response.force_close()
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, why = self.ready()
        return web.Response(status=200 if ok else 503, text=why + "\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        expiry = self.certificate.not_after
        gauges = [
            metrics.Gauge(
                "k8s_ext_connector_webhook_ready",
                "1 when the cache is synced and a serving certificate is loaded",
                lambda: float(self.ready()[0]),
            ),
            metrics.Gauge(
                "k8s_ext_connector_webhook_certificate_reloads_total",
                "serving certificates loaded since start (the first load counts)",
                lambda: float(self.certificate.reloads),
                kind="counter",
            ),
            metrics.Gauge(
                "k8s_ext_connector_webhook_certificate_expiry_timestamp_seconds",
                "notAfter of the serving certificate in use (0: none)",
                lambda: expiry.timestamp() if expiry else 0.0,
            ),
        ]
        text = metrics.render(
            [
                self.metrics.requests,
                self.metrics.errors,
                self.metrics.rejected,
                self.metrics.latency,
                *gauges,
            ]
        )
        return web.Response(body=text.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})


def _where(error: BaseException) -> str:
    """The exception's type and innermost frame, e.g. ``RecursionError at copy.py:128``."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return type(error).__name__
    code = frame.tb_frame.f_code
    return f"{type(error).__name__} at {Path(code.co_filename).name}:{frame.tb_lineno}"


def _who(review: Review) -> str:
    meta = review.pod.get("metadata") or {}
    name = meta.get("name") or f"{meta.get('generateName', '')}*"
    return f"pod {meta.get('namespace', '')}/{name} (uid {review.uid})"


async def serve_until(server: WebhookServer, stop: asyncio.Event, drain_seconds: float) -> None:
    """Run the certificate poll until ``stop``; then report not ready for
    ``drain_seconds`` while still answering (the API server keeps calling an endpoint
    for a moment after it starts terminating), then close."""
    follower = asyncio.create_task(server.certificate.follow(), name="certificate-reload")
    try:
        await stop.wait()
        server.draining()
        if drain_seconds > 0:
            await asyncio.sleep(drain_seconds)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await server.stop()
