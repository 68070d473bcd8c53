"""The webhook over real HTTPS: AdmissionReview in, AdmissionReview out."""

from __future__ import annotations

import base64
import copy
import json
import re
import ssl
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from k8s_ext_connector.webhook.inject import (
    INJECT_ANNOTATION,
    SOURCE_ANNOTATION,
    InjectionContext,
    InjectionSettings,
    inject,
)
from k8s_ext_connector.webhook.server import ServingCertificate
from tests.polling import wait_for
from tests.webhook.conftest import MY_SERVICE, Webhook, start_webhook
from tests.webhook.harness import (
    Connection,
    FakeIndex,
    LoopThread,
    client_context,
    https,
    new_ca,
    review,
    write_serving_pair,
)

Obj = dict[str, Any]


def pod(
    name: str = "my-pod",
    labels: dict[str, str] | None = None,
    namespace: str | None = "ns1",
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> Obj:
    meta: Obj = {"name": name, "labels": {"app": "my-app"} if labels is None else labels}
    if namespace is not None:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "app", "image": "busybox"}], **spec},
    }


def answer(webhook: Webhook, document: Obj) -> Obj:
    reply = webhook.post(document)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert (body["apiVersion"], body["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    assert body["response"]["allowed"] is True
    result: Obj = body["response"]
    return result


def patched(original: Obj, response: Obj) -> Obj:
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    result: Obj = jsonpatch.apply_patch(original, patch)
    return result


def counter(webhook: Webhook, line: str) -> float:
    text = webhook.get("/metrics").body.decode()
    match = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    assert match, f"{line} not in metrics:\n{text}"
    return float(match.group(1))


INJECTED_PODS = {
    "plain": pod(),
    "with init containers and volumes": pod(
        initContainers=[{"name": "migrate", "image": "busybox"}],
        volumes=[{"name": "data", "emptyDir": {}}],
    ),
    "with annotations": pod(annotations={"team": "a"}),
    "generateName, no name": {
        **pod(),
        "metadata": {"generateName": "my-pod-", "namespace": "ns1", "labels": {"app": "my-app"}},
    },
}


@pytest.mark.parametrize("original", INJECTED_PODS.values(), ids=INJECTED_PODS.keys())
def test_patch_applied_to_the_pod_equals_inject(
    webhook: Webhook, settings: InjectionSettings, original: Obj
) -> None:
    response = answer(webhook, review(copy.deepcopy(original), uid="uid-1"))
    assert response["uid"] == "uid-1"
    expected = inject(original, InjectionContext((MY_SERVICE,), settings))
    assert patched(original, response) == expected
    assert "warnings" not in response


def test_namespace_from_the_request_when_the_object_has_none(
    webhook: Webhook, settings: InjectionSettings
) -> None:
    original = pod(namespace=None)
    document = review(copy.deepcopy(original))
    document["request"]["namespace"] = "ns1"
    result = patched(original, answer(webhook, document))
    expected = inject(pod(namespace="ns1"), InjectionContext((MY_SERVICE,), settings))
    del expected["metadata"]["namespace"]
    assert result == expected


@pytest.mark.parametrize("native", [True, False])
def test_settings_reach_the_sidecar(loop: LoopThread, tmp_path: Path, native: bool) -> None:
    settings = InjectionSettings(image="example/x:1", native_sidecar=native, cpu_limit="2")
    hook = start_webhook(loop, tmp_path, settings, FakeIndex([(MY_SERVICE, {"app": "my-app"})]))
    try:
        result = patched(pod(), answer(hook, review(pod())))
        containers = result["spec"]["initContainers" if native else "containers"]
        assert containers[0]["image"] == "example/x:1"
        assert containers[0]["resources"]["limits"]["cpu"] == "2"
        assert result == inject(pod(), InjectionContext((MY_SERVICE,), settings))
    finally:
        loop.run(hook.server.stop())


def test_dry_run_gets_the_same_answer(webhook: Webhook) -> None:
    wet = answer(webhook, review(pod()))
    dry = answer(webhook, review(pod(), dry_run=True))
    assert dry == wet


SKIPPED = {
    "no source selects it": pod(labels={"app": "other"}),
    "other namespace": pod(namespace="ns2"),
    "hostNetwork": pod(hostNetwork=True),
    "opted out": pod(annotations={INJECT_ANNOTATION: "false"}),
}


@pytest.mark.parametrize("original", SKIPPED.values(), ids=SKIPPED.keys())
def test_skipped_pods_are_allowed_without_patch(webhook: Webhook, original: Obj) -> None:
    response = answer(webhook, review(original, uid="u-skip"))
    assert response == {"uid": "u-skip", "allowed": True}


def test_reinjection_changes_nothing(webhook: Webhook, settings: InjectionSettings) -> None:
    once = inject(pod(), InjectionContext((MY_SERVICE,), settings))
    assert answer(webhook, review(once, uid="u")) == {"uid": "u", "allowed": True}
    assert counter(webhook, 'k8s_ext_connector_webhook_admission_requests_total{result="skipped"}')


def test_asked_for_but_not_injectable_says_why(webhook: Webhook) -> None:
    original = pod(labels={"app": "other"}, annotations={INJECT_ANNOTATION: "true"})
    response = answer(webhook, review(original))
    assert "patch" not in response
    assert SOURCE_ANNOTATION in response["warnings"][0]


def test_opt_in_with_a_named_source(webhook: Webhook, settings: InjectionSettings) -> None:
    annotations = {INJECT_ANNOTATION: "true", SOURCE_ANNOTATION: "later-service"}
    original = pod(labels={"app": "other"}, annotations=annotations)
    result = patched(original, answer(webhook, review(original)))
    assert result == inject(original, InjectionContext((), settings))


@pytest.mark.parametrize(
    ("operation", "kind"),
    [
        ("UPDATE", None),
        ("CREATE", {"group": "apps", "version": "v1", "kind": "Deployment"}),
    ],
)
def test_anything_but_pod_create_is_ignored(
    webhook: Webhook, operation: str, kind: Obj | None
) -> None:
    response = answer(webhook, review(pod(), uid="u2", operation=operation, kind=kind))
    assert response == {"uid": "u2", "allowed": True}
    assert counter(webhook, 'k8s_ext_connector_webhook_admission_requests_total{result="ignored"}')


def _without(path: str) -> Obj:
    document = review(pod())
    parent, _, key = path.rpartition(".")
    target = document
    for part in filter(None, parent.split(".")):
        target = target[part]
    del target[key]
    return document


BAD = {
    "not JSON": (b"{not json", "not JSON"),
    "not an object": (b"[1, 2]", "JSON object"),
    "wrong kind": (
        json.dumps({**review(pod()), "kind": "TokenReview"}).encode(),
        "kind AdmissionReview",
    ),
    "wrong apiVersion": (
        json.dumps({**review(pod()), "apiVersion": "admission.k8s.io/v1beta1"}).encode(),
        "apiVersion admission.k8s.io/v1",
    ),
    "missing request": (json.dumps(_without("request")).encode(), "request: missing"),
    "missing uid": (json.dumps(_without("request.uid")).encode(), "request.uid"),
    "empty uid": (
        json.dumps({**review(pod()), "request": {**review(pod())["request"], "uid": ""}}).encode(),
        "request.uid",
    ),
    "missing object": (json.dumps(_without("request.object")).encode(), "request.object"),
    "huge body": (
        json.dumps(review(pod(annotations={"big": "x" * (3 * 1024 * 1024)}))).encode(),
        "limit",
    ),
    "nested too deep": (
        json.dumps(review(pod(x=0))).replace('"x": 0', '"x": ' + "[" * 5000 + "]" * 5000).encode(),
        "nested too deep",
    ),
}
STATUS = {"huge body": 413}  # the others: 400


@pytest.mark.parametrize(("body", "message"), BAD.values(), ids=BAD.keys())
def test_bad_requests_get_400_with_a_message(webhook: Webhook, body: bytes, message: str) -> None:
    reply = webhook.post(None, raw=body)
    assert reply.status == STATUS.get(next(k for k, v in BAD.items() if v[0] == body), 400)
    assert message in reply.body.decode()
    assert webhook.get("/healthz").status == 200  # still serving
    assert counter(webhook, 'k8s_ext_connector_webhook_admission_requests_total{result="rejected"}')


def test_huge_body_without_content_length(webhook: Webhook) -> None:
    """Chunked transfer: the cap applies to what is read, not only to the header."""

    def chunks() -> Any:
        for _ in range(64):  # 4 MiB
            yield b"x" * 65536

    connection = Connection(webhook.port, client_context(webhook.ca))
    try:
        connection.request("POST", "/mutate", body=chunks(), encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413
        assert b"limit" in response.read()
    finally:
        connection.close()


def test_internal_error_admits_unmutated_with_warning_and_metric(webhook: Webhook) -> None:
    webhook.index.error = RuntimeError("cache exploded")
    line = 'k8s_ext_connector_webhook_admission_errors_total{reason="exception"}'
    before = counter(webhook, line)
    response = answer(webhook, review(pod(), uid="u-err"))
    assert response["uid"] == "u-err"
    assert "patch" not in response
    assert "patchType" not in response
    assert response["warnings"][0].startswith("k8s-ext-connector: sidecar not injected")
    assert "cache exploded" in response["warnings"][0]
    assert counter(webhook, line) == before + 1
    assert counter(webhook, 'k8s_ext_connector_webhook_admission_requests_total{result="error"}')


def test_unsynced_cache_admits_unmutated_and_is_not_ready(webhook: Webhook) -> None:
    webhook.index.ready = False
    response = answer(webhook, review(pod()))
    assert "patch" not in response
    assert "not synced" in response["warnings"][0]
    ready = webhook.get("/readyz")
    assert (ready.status, ready.body) == (503, b"cache not synced\n")
    line = 'k8s_ext_connector_webhook_admission_errors_total{reason="cache_not_ready"}'
    assert counter(webhook, line) == 1


def test_health_ready_and_metrics(webhook: Webhook) -> None:
    assert (webhook.get("/healthz").status, webhook.get("/healthz").body) == (200, b"ok\n")
    assert webhook.get("/readyz").status == 200
    answer(webhook, review(pod()))
    answer(webhook, review(pod(labels={})))
    metrics = webhook.get("/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert counter(webhook, 'k8s_ext_connector_webhook_admission_requests_total{result="injected"}')
    assert counter(webhook, "k8s_ext_connector_webhook_admission_duration_seconds_count") == 2
    assert counter(
        webhook, 'k8s_ext_connector_webhook_admission_duration_seconds_bucket{le="+Inf"}'
    )
    assert counter(webhook, "k8s_ext_connector_webhook_ready") == 1
    assert counter(webhook, "k8s_ext_connector_webhook_certificate_reloads_total") == 1
    assert counter(webhook, "k8s_ext_connector_webhook_certificate_expiry_timestamp_seconds") > 0
    assert webhook.get("/nope").status == 404
    assert https(webhook.port, webhook.ca, "GET", "/mutate").status == 405


# -- certificates ----------------------------------------------------------------------


def _handshake(webhook: Webhook, ca: Any) -> bool:
    try:
        return https(webhook.port, ca, "GET", "/healthz").status == 200
    except (ssl.SSLError, OSError):
        return False


def test_certificate_rotation_without_restart(webhook: Webhook) -> None:
    old_ca, new_ca_ = webhook.ca, new_ca("rotated-ca")
    poll = webhook.loop.call(
        lambda: webhook.loop.loop.create_task(webhook.server.certificate.follow(0.05))
    )
    try:
        write_serving_pair(webhook.tls_dir, new_ca_)
        wait_for(lambda: _handshake(webhook, new_ca_), timeout=5, what="the new certificate")
        assert not _handshake(webhook, old_ca)
        assert webhook.server.certificate.reloads == 2
    finally:
        webhook.loop.call(poll.cancel)


def test_half_written_rotation_keeps_the_old_pair(webhook: Webhook) -> None:
    """write_pair writes the key, then the certificate: a check in between must not
    break serving (the mismatched pair is refused, the old one stays)."""
    certificate = webhook.server.certificate
    new = new_ca("rotated-ca")
    staging = webhook.tls_dir.parent / "staging"
    write_serving_pair(staging, new)
    (webhook.tls_dir / "tls.key").write_bytes((staging / "tls.key").read_bytes())
    assert webhook.loop.call(certificate.check) is False
    assert _handshake(webhook, webhook.ca)
    (webhook.tls_dir / "tls.crt").write_bytes((staging / "tls.crt").read_bytes())
    assert webhook.loop.call(certificate.check) is True
    assert _handshake(webhook, new)
    assert not _handshake(webhook, webhook.ca)


def test_certificate_appearing_after_start(tmp_path: Path) -> None:
    certificate = ServingCertificate(tmp_path / "tls.crt", tmp_path / "tls.key")
    assert certificate.check() is False
    assert not certificate.loaded
    write_serving_pair(tmp_path, new_ca())
    assert certificate.check() is True
    assert certificate.loaded
    assert certificate.check() is False  # same content: nothing to do


def test_draining_reports_not_ready_but_still_answers(webhook: Webhook) -> None:
    webhook.loop.call(webhook.server.draining)
    assert webhook.get("/readyz").status == 503
    assert b"shutting down" in webhook.get("/readyz").body
    assert "patch" in answer(webhook, review(pod()))
