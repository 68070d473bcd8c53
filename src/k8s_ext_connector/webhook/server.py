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
- a request that is not an AdmissionReview v1 (not JSON, wrong apiVersion or kind,
  missing request, uid or object, body over ``max_body`` bytes): HTTP 400 with a message;
- an internal error (a bug, a cache that raises, the cache not synced yet): allowed, not
  mutated, a ``warnings`` entry the user sees in kubectl, an error counted in ``/metrics``
  and logged. This is the same outcome ``failurePolicy: Ignore`` gives a webhook outage:
  the pod starts without the sidecar and the operator names it in the ExternalService's
  status (SidecarsMissing) with the fix (``kubectl rollout restart``).

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
import datetime
import hashlib
import json
import logging
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

from k8s_ext_connector.webhook import metrics
from k8s_ext_connector.webhook.cache import SourceIndex
from k8s_ext_connector.webhook.inject import (
    INJECT_ANNOTATION,
    InjectionContext,
    InjectionSettings,
    admission_patch,
    skip_reason,
)

log = logging.getLogger(__name__)

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
# etcd stores objects up to 1.5 MiB: room for the largest pod and the review around it.
MAX_BODY = 2 * 1024 * 1024
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
WARNING_PREFIX = "k8s-ext-connector: sidecar not injected"


class BadRequest(ValueError):
    """The request is not an AdmissionReview v1 this webhook can answer (HTTP 400)."""


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
        annotations = (review.pod.get("metadata") or {}).get("annotations") or {}
        asked = annotations.get(INJECT_ANNOTATION) == "true" and reason != "already injected"
        return "skipped", None, [f"{WARNING_PREFIX}: {reason}"] if asked else []
    patch = admission_patch(review.pod, context)
    # The patch is applied to the object as sent: never let it touch what we filled in.
    if any(op.get("path") == "/metadata/namespace" for op in patch):
        raise RuntimeError("patch would change metadata.namespace")
    return "injected", patch, []


class CacheNotReady(RuntimeError):
    pass


async def read_capped(request: web.Request, limit: int) -> bytes:
    """The body, or ``BadRequest`` past ``limit`` bytes (declared or actually sent)."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(f"the body is {request.content_length} bytes; the limit is {limit}")
    data = bytearray()
    while chunk := await request.content.read(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise BadRequest(f"the body is over the limit of {limit} bytes")
    return bytes(data)


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
        max_body: int = MAX_BODY,
    ) -> None:
        self.index = index
        self.settings = settings
        self.certificate = certificate
        self.max_body = max_body
        self.metrics = WebhookMetrics()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._stopping = False

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post("/mutate", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, host: str = "0.0.0.0", port: int = 8443) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port."""
        self.certificate.check()
        self._runner = web.AppRunner(
            self.application(), access_log=None, handle_signals=False, shutdown_timeout=5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.certificate.context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("webhook listening on https://%s:%d", host, self.port)
        return self.port

    def draining(self) -> None:
        """Report not ready (while the endpoints drop this pod) but keep answering."""
        self._stopping = True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
            review = parse_review(await read_capped(request, self.max_body))
        except BadRequest as error:
            self.metrics.requests.inc("rejected")
            log.warning("bad admission request from %s: %s", request.remote, error)
            return web.Response(status=400, text=f"bad AdmissionReview: {error}\n")
        try:
            result, patch, warnings = decide(review, self.index, self.settings)
        except Exception as error:
            reason = "cache_not_ready" if isinstance(error, CacheNotReady) else "exception"
            if reason == "exception":
                log.exception("admission of %s failed; admitted without the sidecar", _who(review))
            else:
                log.warning(
                    "admission of %s: %s; admitted without the sidecar", _who(review), error
                )
            self.metrics.errors.inc(reason)
            result, patch = "error", None
            warnings = [f"{WARNING_PREFIX}: webhook {reason.replace('_', ' ')} ({error})"[:200]]
        log.debug("%s: %s%s", _who(review), result, " (dry run)" if review.dry_run else "")
        answer = web.json_response(review_response(review.uid, patch, warnings))
        self.metrics.requests.inc(result)
        self.metrics.latency.observe(time.perf_counter() - started)
        return answer

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
            [self.metrics.requests, self.metrics.errors, self.metrics.latency, *gauges]
        )
        return web.Response(body=text.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})


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
