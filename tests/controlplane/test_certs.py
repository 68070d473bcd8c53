"""``certs sync`` against a real API server, with the certs component's own ServiceAccount
token under the chart's Role (its writes, read back from the server's audit log, are the
ones its Role grants): the CA Secret, the serving Secret and
every webhook's caBundle are created, kept, rotated before expiry (seconds-long
certificates), and a rerun with nothing due writes nothing. After every sync the serving
Secret (the one the webhook pods mount) holds no CA key; an older Secret that did has it
moved to the CA Secret. A TLS server with the rotated files is trusted by a client that
knows only the published caBundle, as the API server would be.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from k8s_ext_connector.certs import main as certs_main
from k8s_ext_connector.certs.rotation import SyncResult, SyncSettings, sync
from k8s_ext_connector.certs.tls import (
    Issued,
    generate_ca,
    issue_serving_cert,
    load_certificates,
    service_dns_names,
    signed_by,
    write_pair,
)
from k8s_ext_connector.core.kube import KubeClient, load_credentials
from k8s_ext_connector.operator import rbac
from k8s_ext_connector_testbed.audit import AuditCall
from k8s_ext_connector_testbed.controlplane import ControlPlane
from tests.chart.helm import RELEASE_NAMESPACE
from tests.controlplane import chartcluster as realcluster
from tests.controlplane.chartcluster import control_plane  # noqa: F401
from tests.polling import wait_for, wait_for_async

pytestmark = pytest.mark.kube
# The chart's names: its Role for the certs component names exactly these objects.
NS, SECRET, SERVICE = RELEASE_NAMESPACE, realcluster.TLS_SECRET, "webhook"
CONFIG, CA_SECRET = realcluster.WEBHOOK_CONFIGURATION, realcluster.CA_SECRET
WEBHOOKS = ("inject.ext-connector.submariner.io", "second.ext-connector.submariner.io")
WRITES = {"create", "update", "patch", "delete"}
LONG = SyncSettings(NS, SECRET, CA_SECRET, SERVICE, CONFIG, overlap=datetime.timedelta(0))


def _webhook(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "clientConfig": {
            "service": {"namespace": NS, "name": SERVICE, "path": "/mutate"},
        },
        # Nothing serves it here: it must not stand in the way of the control plane's pods.
        "failurePolicy": "Ignore",
        "namespaceSelector": {"matchLabels": {"example.com/no-namespace-has-this": "x"}},
        "rules": [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
            }
        ],
    }


def _path(group: str, plural: str, namespace: str = "", name: str = "") -> str:
    path = "/api/v1" if not group else f"/apis/{group}/v1"
    path += f"/namespaces/{namespace}" if namespace else ""
    return f"{path}/{plural}" + (f"/{name}" if name else "")


PLURALS = {"Secret": ("", "secrets"), "Namespace": ("", "namespaces")}
PLURALS["MutatingWebhookConfiguration"] = (
    "admissionregistration.k8s.io",
    "mutatingwebhookconfigurations",
)


@dataclass
class Api:
    """The test's side of the real API server (as its administrator), and the audit log's
    record of what the certs component's ServiceAccount asked."""

    cp: ControlPlane

    def create_object(self, obj: dict[str, Any]) -> None:
        group, plural = PLURALS[obj["kind"]]
        namespace = obj["metadata"].get("namespace", "")
        status, body = self.cp.api("POST", _path(group, plural, namespace), obj)
        assert status == 201, (status, body)

    def get_object(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        status, body = self.cp.api("GET", _path(group, plural, namespace, name))
        return body if status == 200 else None

    def delete(self, group: str, plural: str, namespace: str, name: str) -> None:
        status, body = self.cp.api("DELETE", _path(group, plural, namespace, name))
        assert status in (200, 404), (status, body)

    @property
    def requests(self) -> list[AuditCall]:
        return self.cp.audit_calls(realcluster.user("certs"))


def _add_webhook_configuration(api: Api, name: str, hooks: tuple[str, ...]) -> None:
    api.create_object(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [_webhook(n) for n in hooks],
        }
    )


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[Api]:  # noqa: F811
    """The chart's RBAC, the release's webhook configuration, neither Secret yet."""
    api = Api(control_plane)
    _add_webhook_configuration(api, CONFIG, WEBHOOKS)
    yield api
    api.delete(*PLURALS["MutatingWebhookConfiguration"], "", CONFIG)
    for name in (SECRET, CA_SECRET):
        api.delete("", "secrets", NS, name)


Run = Callable[[SyncSettings], SyncResult]


@pytest.fixture
def run(api: Api, kubeconfig: Path) -> Run:
    """One sync over HTTP, as the CLI does it (a fresh client each time). After every
    sync, whatever it did: the serving Secret holds no CA key."""
    credentials = load_credentials(str(kubeconfig))

    async def once(settings: SyncSettings) -> SyncResult:
        async with KubeClient(credentials) as client:
            return await sync(client, settings)

    def checked(settings: SyncSettings) -> SyncResult:
        result = asyncio.run(once(settings))
        _assert_no_ca_key_served(api)
        return result

    return checked


def _assert_no_ca_key_served(api: Api) -> None:
    serving = api.get_object("", "v1", "secrets", NS, SECRET)
    if serving is not None:
        assert "ca.key" not in (serving.get("data") or {}), "the CA key is in the mounted Secret"


@pytest.fixture
def kubeconfig(control_plane: ControlPlane) -> Path:  # noqa: F811
    """The certs component's own ServiceAccount token."""
    return realcluster.kubeconfig(control_plane, "certs")


def _writes(api: Api, since: int = 0) -> list[str]:
    """``verb resource/name`` of each write the certs component made, in order."""
    return [f"{r.verb} {r.resource}/{r.name}" for r in api.requests[since:] if r.verb in WRITES]


def _get_secret(api: Api, name: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    secret = api.get_object("", "v1", "secrets", NS, name)
    assert secret is not None
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}, secret


def _secret(api: Api) -> tuple[Issued, Issued, dict[str, Any]]:
    """The CA (from the CA Secret), the serving pair and the serving Secret, checking the
    layout: ca.key only in the CA Secret; the serving Secret's ca.crt is that CA."""
    ca_data, _ = _get_secret(api, CA_SECRET)
    data, secret = _get_secret(api, SECRET)
    assert "ca.key" not in data
    assert data["ca.crt"] == ca_data["ca.crt"]
    return (
        Issued(ca_data["ca.crt"], ca_data["ca.key"]),
        Issued(data["tls.crt"], data["tls.key"]),
        secret,
    )


def _versions(api: Api) -> list[str]:
    return [
        _get_secret(api, name)[1]["metadata"]["resourceVersion"] for name in (CA_SECRET, SECRET)
    ]


def _bundles(api: Api, name: str = CONFIG) -> list[bytes]:
    config = api.get_object(
        "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", "", name
    )
    assert config is not None
    return [base64.b64decode(w["clientConfig"].get("caBundle", "")) for w in config["webhooks"]]


def _trusted(serving: Issued, bundle: bytes) -> bool:
    return any(signed_by(serving.certificate, ca) for ca in load_certificates(bundle))


def test_first_sync_creates_the_secret_and_publishes_the_bundle(api: Api, run: Run) -> None:
    result = run(LONG)
    assert result.secret_written
    assert result.ca_secret_written
    assert not result.moved_ca_key
    assert result.patched_webhooks == WEBHOOKS
    ca, serving, secret = _secret(api)
    assert secret["type"] == "kubernetes.io/tls"
    assert sorted(secret["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    _, ca_secret = _get_secret(api, CA_SECRET)
    assert ca_secret["type"] == "Opaque"
    assert sorted(ca_secret["data"]) == ["ca.crt", "ca.key"]
    assert ca.certificate.subject == ca.certificate.issuer  # the CA, not a leaf
    assert _bundles(api) == [ca.cert_pem, ca.cert_pem]
    assert _trusted(serving, ca.cert_pem)
    # One patch for both webhooks, then the CA Secret and the serving Secret created.
    assert [r.split()[0] for r in _writes(api)] == ["patch", "create", "create"]
    ca_version, serving_version = map(int, _versions(api))
    assert ca_version < serving_version  # the CA first


def test_rerun_with_nothing_due_writes_nothing(api: Api, run: Run) -> None:
    run(LONG)
    before, seen = len(api.requests), _versions(api)
    result = run(LONG)
    assert not result.changed
    assert result.summary() == "nothing due"
    assert _writes(api, before) == []
    assert _versions(api) == seen


def test_existing_secret_keeps_its_metadata_and_other_keys(api: Api, run: Run) -> None:
    api.create_object(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": SECRET,
                "namespace": NS,
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": "extconn"},
            },
            "data": {"extra": base64.b64encode(b"kept").decode(), "tls.crt": "", "tls.key": ""},
        }
    )
    api.create_object(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": CA_SECRET,
                "namespace": NS,
                "labels": {"team": "platform"},
                "annotations": {"note": "kept too"},
            },
            "data": {"other": base64.b64encode(b"also kept").decode()},
        }
    )
    result = run(LONG)
    assert result.secret_written
    assert result.ca_secret_written
    _, _, secret = _secret(api)
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "Helm"}
    assert secret["metadata"]["annotations"] == {"meta.helm.sh/release-name": "extconn"}
    assert base64.b64decode(secret["data"]["extra"]) == b"kept"
    ca_data, ca_secret = _get_secret(api, CA_SECRET)
    assert ca_secret["metadata"]["labels"] == {"team": "platform"}
    assert ca_secret["metadata"]["annotations"] == {"note": "kept too"}
    assert ca_data["other"] == b"also kept"
    assert [r.split()[0] for r in _writes(api)][-2:] == ["update", "update"]


def test_missing_webhook_configuration_is_published_once_it_appears(
    api: Api, run: Run
) -> None:
    # Not yet there, under the one name the certs Role may touch (the chart's).
    api.delete(*PLURALS["MutatingWebhookConfiguration"], "", CONFIG)
    settings = LONG
    first = run(settings)
    assert first.secret_written
    assert not first.webhook_config_found
    assert "not found" in first.summary()
    _add_webhook_configuration(api, CONFIG, WEBHOOKS[:1])
    second = run(settings)
    assert not second.secret_written
    assert not second.ca_secret_written
    assert second.patched_webhooks == WEBHOOKS[:1]
    assert _bundles(api) == [_secret(api)[0].cert_pem]


# Migration from the older layout: one kubernetes.io/tls Secret with ca.key in it.


def _old_layout(
    api: Api, ca_lifetime: datetime.timedelta = datetime.timedelta(days=3650)
) -> tuple[Issued, Issued]:
    """The serving Secret as an earlier ``certs sync`` wrote it (all four keys), with the
    caBundle it published, plus chart metadata and a key of someone else's."""
    ca = generate_ca("old webhook CA", ca_lifetime)
    serving = issue_serving_cert(ca, service_dns_names(SERVICE, NS), datetime.timedelta(days=365))
    encoded = {
        "ca.crt": ca.cert_pem,
        "ca.key": ca.key_pem,
        "tls.crt": serving.cert_pem,
        "tls.key": serving.key_pem,
        "extra": b"kept",
    }
    api.create_object(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": SECRET,
                "namespace": NS,
                "labels": {"app.kubernetes.io/component": "webhook"},
                "annotations": {"kept": "yes"},
            },
            "data": {k: base64.b64encode(v).decode() for k, v in encoded.items()},
        }
    )
    config = api.get_object(
        "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", "", CONFIG
    )
    assert config is not None
    for webhook in config["webhooks"]:
        webhook["clientConfig"]["caBundle"] = base64.b64encode(ca.cert_pem).decode()
    _replace(api, "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "", config)
    return ca, serving


def _replace(api: Api, group: str, plural: str, namespace: str, obj: dict[str, Any]) -> None:
    """Change an object as the administrator (not the certs component's call)."""
    path = _path(group, plural, namespace, obj["metadata"]["name"])
    status, body = api.cp.api("PUT", path, obj)
    assert status == 200, (status, body)


def test_old_layout_moves_the_ca_key_to_the_ca_secret(api: Api, run: Run) -> None:
    old_ca, old_serving = _old_layout(api)
    before = len(api.requests)
    result = run(LONG)
    assert result.reasons == ()  # nothing was due: the same CA and serving pair, moved
    assert result.moved_ca_key
    assert result.ca_secret_written
    assert result.secret_written
    assert result.patched_webhooks == ()
    assert "moved ca.key" in result.summary()
    # The CA Secret first, then ca.key out of the serving Secret.
    assert _writes(api, before) == [
        f"create secrets/{CA_SECRET}",
        f"update secrets/{SECRET}",
    ]
    ca, serving, secret = _secret(api)
    assert ca == old_ca
    assert serving == old_serving  # the webhook keeps serving what it has
    assert sorted(secret["data"]) == ["ca.crt", "extra", "tls.crt", "tls.key"]
    assert base64.b64decode(secret["data"]["extra"]) == b"kept"
    assert secret["metadata"]["annotations"] == {"kept": "yes"}
    assert secret["type"] == "kubernetes.io/tls"

    before = len(api.requests)
    again = run(LONG)
    assert not again.changed
    assert _writes(api, before) == []


def test_old_layout_with_a_ca_due_rotates_while_moving(api: Api, run: Run) -> None:
    """The old CA lives longer than configured: a new CA, the old one still trusted in the
    caBundle meanwhile, and no CA key in the serving Secret either way."""
    old_ca, old_serving = _old_layout(api)
    settings = dataclasses.replace(LONG, ca_lifetime=datetime.timedelta(days=365))
    before = len(api.requests)
    result = run(settings)
    assert result.moved_ca_key
    assert any(r.startswith("CA lifetime") for r in result.reasons)
    assert [w.split()[0] for w in _writes(api, before)] == ["patch", "create", "update"]
    ca, serving, _ = _secret(api)
    assert ca != old_ca
    for bundle in _bundles(api):
        assert load_certificates(bundle) == [ca.certificate, old_ca.certificate]
        assert _trusted(old_serving, bundle)
        assert _trusted(serving, bundle)


def test_interrupted_migration_finishes_with_the_ca_secrets_ca(api: Api, run: Run) -> None:
    """A run stopped between its two writes: the CA Secret is written, the serving Secret
    still has ca.key. The CA Secret is the one that counts; ca.key goes, nothing else."""
    old_ca, old_serving = _old_layout(api)
    api.create_object(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": CA_SECRET, "namespace": NS},
            "data": {
                "ca.crt": base64.b64encode(old_ca.cert_pem).decode(),
                "ca.key": base64.b64encode(old_ca.key_pem).decode(),
            },
        }
    )
    before = len(api.requests)
    result = run(LONG)
    assert result.moved_ca_key
    assert not result.ca_secret_written
    assert _writes(api, before) == [f"update secrets/{SECRET}"]
    assert _secret(api)[:2] == (old_ca, old_serving)


def test_the_ca_secret_wins_over_a_stale_ca_key_in_the_serving_secret(
    api: Api, run: Run
) -> None:
    _, old_serving = _old_layout(api)
    other = generate_ca("the CA Secret's CA", datetime.timedelta(days=3650))
    api.create_object(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": CA_SECRET, "namespace": NS},
            "data": {
                "ca.crt": base64.b64encode(other.cert_pem).decode(),
                "ca.key": base64.b64encode(other.key_pem).decode(),
            },
        }
    )
    result = run(LONG)
    assert result.moved_ca_key
    assert result.reasons == ("serving certificate is not signed by the current CA",)
    ca, serving, _ = _secret(api)
    assert ca == other
    assert serving != old_serving
    assert _trusted(serving, ca.cert_pem)


def test_serving_secret_without_ca_crt_gets_it(api: Api, run: Run) -> None:
    """Both pairs current, but the serving Secret lacks ca.crt (written by hand, say):
    only that Secret is rewritten, nothing reissued."""
    run(LONG)
    data, secret = _get_secret(api, SECRET)
    del secret["data"]["ca.crt"]
    _replace(api, "", "secrets", NS, secret)
    before = len(api.requests)
    result = run(LONG)
    assert result.reasons == ()
    assert result.secret_written
    assert not result.ca_secret_written
    assert "rewrote the serving Secret" in result.summary()
    assert _writes(api, before) == [f"update secrets/{SECRET}"]
    assert _get_secret(api, SECRET)[0] == data


def _until_written(run: Run, settings: SyncSettings, api: Api, timeout: float) -> float:
    """Sync repeatedly until one writes the Secret; every earlier run must write nothing.
    Returns when (wall clock) it happened."""

    def rotated() -> float | None:
        before = len(api.requests)
        if run(settings).secret_written:
            return time.time()
        assert _writes(api, before) == [], "a run with nothing due wrote something"
        return None

    return wait_for(rotated, timeout, "a rotation", interval=0.1)


def test_short_lived_serving_certificate_rotates_before_expiry(api: Api, run: Run) -> None:
    settings = SyncSettings(
        NS,
        SECRET,
        CA_SECRET,
        SERVICE,
        CONFIG,
        serving_lifetime=datetime.timedelta(seconds=4),
        renew_at_fraction=1 / 3,
        overlap=datetime.timedelta(0),
    )
    run(settings)
    ca, first, _ = _secret(api)
    cert = first.certificate
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    renew_point = (cert.not_valid_after_utc - span / 3).timestamp()

    before = len(api.requests)
    rotated_at = _until_written(run, settings, api, timeout=10)
    assert renew_point - 1 <= rotated_at < cert.not_valid_after_utc.timestamp()  # X.509: 1 s
    ca_after, second, _ = _secret(api)
    assert second.cert_pem != first.cert_pem
    assert ca_after == ca  # the CA was not due
    # Only the serving Secret was rewritten: same CA, same caBundle.
    assert _writes(api, before) == [f"update secrets/{SECRET}"]
    for bundle in _bundles(api):
        assert _trusted(second, bundle)  # the chain verifies with the published bundle


def test_short_lived_ca_rotation_overlaps_then_drops_the_old_ca(
    api: Api, run: Run, tmp_path: Path
) -> None:
    # Renewing at 60% left leaves the old serving certificate about four seconds to prove it is
    # still trusted during the overlap.
    lifetime = datetime.timedelta(seconds=6)
    settings = SyncSettings(
        NS,
        SECRET,
        CA_SECRET,
        SERVICE,
        CONFIG,
        ca_lifetime=lifetime,
        serving_lifetime=lifetime,
        renew_at_fraction=0.6,
        overlap=datetime.timedelta(0),
    )
    run(settings)
    old_ca, old_serving, _ = _secret(api)
    write_pair(tmp_path / "old", old_serving)

    before = len(api.requests)
    _until_written(run, settings, api, timeout=10)
    new_ca, new_serving, _ = _secret(api)
    assert new_ca != old_ca
    # caBundle patch first, then the CA Secret, then the serving Secret.
    assert _writes(api, before) == [
        f"patch mutatingwebhookconfigurations/{CONFIG}",
        f"update secrets/{CA_SECRET}",
        f"update secrets/{SECRET}",
    ]
    for bundle in _bundles(api):
        assert load_certificates(bundle) == [new_ca.certificate, old_ca.certificate]
        assert _trusted(old_serving, bundle)  # the webhook may not have reloaded yet
        assert _trusted(new_serving, bundle)
    overlap_bundle = _bundles(api)[0]
    write_pair(tmp_path / "new", new_serving)
    assert asyncio.run(_handshake(tmp_path / "old", overlap_bundle)) == b"ok"
    assert asyncio.run(_handshake(tmp_path / "new", overlap_bundle)) == b"ok"

    dropped = run(settings)  # the next run: only the new CA
    assert not dropped.secret_written
    assert dropped.patched_webhooks == WEBHOOKS
    assert _bundles(api) == [new_ca.cert_pem, new_ca.cert_pem]
    assert asyncio.run(_handshake(tmp_path / "new", new_ca.cert_pem)) == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_handshake(tmp_path / "old", new_ca.cert_pem))


async def _handshake(files: Path, ca_bundle: bytes) -> bytes:
    """Serve ``files`` (tls.crt/tls.key) over TLS; connect as the API server would: trusting
    only ``ca_bundle`` and checking the Service name."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(files / "tls.crt", files / "tls.key")
    client_context = ssl.create_default_context(cadata=ca_bundle.decode())

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname=f"{SERVICE}.{NS}.svc"
            ),
            timeout=5,
        )
        data = await reader.read()
        writer.close()
        return data
    finally:
        server.close()


def test_cli_sync_once_and_in_a_loop(
    api: Api,
    kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(certs_main, "setup_logging", lambda level: None)
    parser = argparse.ArgumentParser()
    certs_main.add_arguments(parser)
    args = parser.parse_args(
        [
            "sync",
            "--namespace",
            NS,
            "--secret",
            SECRET,
            "--ca-secret",
            CA_SECRET,
            "--service",
            SERVICE,
            "--webhook-config",
            CONFIG,
            "--kubeconfig",
            str(kubeconfig),
        ]
    )
    assert certs_main.run(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{NS}/{SECRET}: reissued: CA missing")
    assert "BEGIN" not in out

    # The loop: three rounds, nothing due, nothing written; stops when asked.
    before = len(api.requests)

    async def loop() -> None:
        stop = asyncio.Event()
        settings = certs_main.settings_from(args)
        task = asyncio.create_task(
            certs_main.sync_forever(load_credentials(str(kubeconfig)), settings, 0.05, stop)
        )
        await wait_for_async(
            lambda: (
                sum(r.verb == "get" and r.resource == "secrets" for r in api.requests[before:]) >= 3
            ),
            what="three rounds",
        )
        stop.set()
        await asyncio.wait_for(task, timeout=5)

    asyncio.run(loop())
    assert _writes(api, before) == []


def test_the_loop_comes_back_soon_while_the_webhook_configuration_is_missing(
    api: Api, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first install creates the configuration and the certs Deployment together: a loop
    with an hour's interval must not leave the caBundle empty for that hour."""
    monkeypatch.setattr(certs_main, "PENDING_RETRY", 0.2)  # the harness's clock, not 10 s
    # Not yet there, under the one name the certs Role may touch (the chart's).
    api.delete(*PLURALS["MutatingWebhookConfiguration"], "", CONFIG)
    settings = LONG

    async def loop() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            certs_main.sync_forever(load_credentials(str(kubeconfig)), settings, 3600, stop)
        )
        await wait_for_async(  # the first round ran without the configuration
            lambda: api.get_object("", "v1", "secrets", NS, SECRET), what="the first round"
        )
        _add_webhook_configuration(api, CONFIG, WEBHOOKS[:1])
        await wait_for_async(lambda: _bundles(api)[0], what="the caBundle")
        stop.set()
        await asyncio.wait_for(task, timeout=5)

    asyncio.run(loop())
    assert _bundles(api) == [_secret(api)[0].cert_pem]


def test_sync_requests_match_its_rbac(api: Api, run: Run) -> None:
    run(LONG)
    run(LONG)
    run(dataclasses.replace(LONG, serving_lifetime=datetime.timedelta(days=30)))  # update
    assert {r.code for r in api.requests} <= {200, 201, 404}  # never a 403
    used = realcluster.used(api.requests)
    granted = {
        (rule.group, rule.resource, verb)
        for rule in rbac.CERTS_CLUSTER_RULES + rbac.CERTS_NAMESPACE_RULES
        for verb in rule.verbs
    }
    assert used == granted  # no new verb: secrets get/create/update, the config get/patch
    named = {r.name for r in api.requests if r.resource == "secrets" and r.name}
    assert named == {SECRET, CA_SECRET}  # the two Secrets its Role names, nothing else
